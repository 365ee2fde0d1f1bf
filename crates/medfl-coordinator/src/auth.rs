//! Who is calling, from the client certificate mutual TLS verified, and what each role may call.
//! Without TLS (`insecure_dev`) nobody is identified here and every call passes.

use std::sync::Arc;

use medfl_pki::{PeerIdentity, PkiError, Role, WatchedRevocations};
use tonic::{Request, Status};

/// What every gate shares: whether callers have certificates, and the revocation list.
#[derive(Debug)]
pub struct Authority {
    tls: bool,
    revocations: Option<Arc<WatchedRevocations>>,
}

impl Authority {
    /// Identifies callers by certificate (`tls`), refusing those in `revocations` (also checked
    /// in the TLS handshake; checked here again for connections made before a revocation).
    pub fn new(tls: bool, revocations: Option<Arc<WatchedRevocations>>) -> Self {
        Self { tls, revocations }
    }

    /// The caller of `request`: its certificate's identity, unless revoked.
    fn identify(&self, request: &Request<()>) -> Result<PeerIdentity, Status> {
        let leaf = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let peer = PeerIdentity::from_der(&leaf)
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        check(self.revocations.as_deref(), &peer)?;
        Ok(peer)
    }
}

/// Refuses `peer` if `revocations` lists it.
fn check(revocations: Option<&WatchedRevocations>, peer: &PeerIdentity) -> Result<(), Status> {
    match revocations {
        Some(list) => list.check(peer).map_err(|e| match e {
            PkiError::Revoked { .. } => Status::permission_denied(e.to_string()),
            // Fail closed: an unreadable list refuses everyone until it is fixed.
            other => Status::unavailable(format!("revocation list: {other}")),
        }),
        None => Ok(()),
    }
}

/// A caller's standing, for calls that outlive their start (a run watch): checked again while
/// the call goes on, so a revocation ends the revoked identity's open streams too.
#[derive(Debug, Clone)]
pub struct Standing {
    peer: PeerIdentity,
    revocations: Option<Arc<WatchedRevocations>>,
}

impl Standing {
    /// How often a long call checks its caller's standing again.
    pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

    /// The standing of `request`'s caller; `None` without TLS (nobody is identified).
    pub fn of<T>(request: &Request<T>) -> Option<Self> {
        request.extensions().get::<Standing>().cloned()
    }

    /// An error once the caller is revoked (or the list cannot be read).
    pub fn check(&self) -> Result<(), Status> {
        check(self.revocations.as_deref(), &self.peer)
    }

    /// The caller's name.
    pub fn name(&self) -> &str {
        &self.peer.name
    }
}

/// An interceptor admitting only `allowed` roles to one service, and handing the caller's
/// identity to the handlers as a request extension.
#[derive(Debug, Clone)]
pub struct Gate {
    authority: Arc<Authority>,
    service: &'static str,
    allowed: &'static [Role],
    rule: &'static str,
}

impl Gate {
    /// The gate of the site service: sites only.
    pub fn sites(authority: Arc<Authority>) -> Self {
        Self {
            authority,
            service: "SiteService",
            allowed: &[Role::Site],
            rule: "only sites call the site service",
        }
    }

    /// The gate of the run service: researchers and operators.
    pub fn researchers(authority: Arc<Authority>) -> Self {
        Self {
            authority,
            service: "RunService",
            allowed: &[Role::Researcher, Role::Operator],
            rule: "only researchers and operators call the run service",
        }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if !self.authority.tls {
            return Ok(request);
        }
        let peer = self.authority.identify(&request)?;
        if !self.allowed.contains(&peer.role) {
            return Err(Status::permission_denied(format!(
                "{} `{}` may not call {} (rule: {})",
                peer.role.as_str(),
                peer.name,
                self.service,
                self.rule
            )));
        }
        request.extensions_mut().insert(Standing {
            peer: peer.clone(),
            revocations: self.authority.revocations.clone(),
        });
        request.extensions_mut().insert(peer);
        Ok(request)
    }
}

/// Refuses a site acting under another name than its certificate's.
pub fn check_site_name<T>(request: &Request<T>, claimed: &str) -> Result<(), Status> {
    match request.extensions().get::<PeerIdentity>() {
        Some(peer) if peer.name != claimed => Err(Status::permission_denied(format!(
            "the certificate of site `{}` cannot act as site `{claimed}` (rule: a site acts only \
             for itself)",
            peer.name
        ))),
        _ => Ok(()),
    }
}

/// Who made a run-service call, as runs record it: the certificate's name and role. Without
/// TLS (`insecure_dev`) nobody is identified: the name and role are empty and every caller may
/// act on every run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The certificate's name (empty without TLS).
    pub name: String,
    /// The certificate's role, lowercase (empty without TLS).
    pub role: String,
}

impl Caller {
    /// The caller of `request`, from the identity its gate attached.
    pub fn of<T>(request: &Request<T>) -> Self {
        match request.extensions().get::<PeerIdentity>() {
            Some(peer) => Self {
                name: peer.name.clone(),
                role: peer.role.as_str().to_owned(),
            },
            None => Self::default(),
        }
    }

    /// Whether this caller is identified (the coordinator runs TLS).
    fn identified(&self) -> bool {
        !self.role.is_empty()
    }

    /// Refuses to `act` (`stop`, `evaluate`) on run `run_id` created by `creator` unless the
    /// caller created it or is an operator. A run created without an identity (before runs had
    /// owners, or without TLS) is an operator's to act on once identities are in force.
    pub fn may_act_on(&self, act: &str, run_id: &str, creator: &str) -> Result<(), Status> {
        if !self.identified() || self.role == Role::Operator.as_str() {
            return Ok(());
        }
        if !creator.is_empty() && creator == self.name {
            return Ok(());
        }
        let owner = match creator {
            "" => "no recorded creator".to_owned(),
            name => format!("creator `{name}`"),
        };
        Err(Status::permission_denied(format!(
            "{} `{}` may not {act} run `{run_id}`, which has {owner} (rule: only a run's creator \
             or an operator may {act} it)",
            self.role, self.name
        )))
    }

    /// Who did it, for the audit log's details.
    pub fn audit(&self) -> serde_json::Value {
        serde_json::json!({ "by": self.name, "role": self.role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, role: &str) -> Caller {
        Caller {
            name: name.into(),
            role: role.into(),
        }
    }

    #[test]
    fn only_the_creator_or_an_operator_acts_on_a_run() {
        assert!(caller("r1", "researcher")
            .may_act_on("stop", "x", "r1")
            .is_ok());
        let e = caller("r2", "researcher")
            .may_act_on("stop", "x", "r1")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("`r1`") && e.message().contains("`r2`"),
            "{e:?}"
        );
        assert!(caller("ops", "operator")
            .may_act_on("stop", "x", "r1")
            .is_ok());
        // A run without a recorded creator is an operator's alone.
        assert!(caller("r1", "researcher")
            .may_act_on("evaluate", "x", "")
            .is_err());
        assert!(caller("ops", "operator")
            .may_act_on("evaluate", "x", "")
            .is_ok());
        // Without TLS nobody is identified, and every call passes.
        assert!(Caller::default().may_act_on("stop", "x", "r1").is_ok());
    }
}
