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
        if let Some(list) = &self.revocations {
            list.check(&peer).map_err(|e| match e {
                PkiError::Revoked { .. } => Status::permission_denied(e.to_string()),
                // Fail closed: an unreadable list refuses everyone until it is fixed.
                other => Status::unavailable(format!("revocation list: {other}")),
            })?;
        }
        Ok(peer)
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
