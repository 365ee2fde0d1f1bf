//! Mutual TLS end to end: a real tonic server on `127.0.0.1:0` presenting a provisioned
//! coordinator kit behind [`tls_incoming`], and clients with a site kit, no certificate, a
//! foreign consortium's certificate, a revoked one, or no trust in the coordinator's CA. The
//! handshake refuses revoked certificates; an interceptor on the health service reads the
//! caller's identity from its certificate and checks the revocation list on every call too, for
//! connections made before a revocation.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medfl_pki::{
    client_tls, provision, server_tls, tls_incoming, Ca, Kit, PeerIdentity, PkiError, Provisioned,
    Role, WatchedRevocations, REVOKED_FILE,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A provisioned consortium in a temporary directory.
struct Consortium {
    _dir: tempfile::TempDir,
    done: Provisioned,
}

impl Consortium {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let done = provision(
            None,
            name,
            "localhost",
            &["hospital-a".to_string()],
            &["alice".to_string()],
            &[],
            &dir.path().join("kits"),
        )
        .unwrap();
        Self { _dir: dir, done }
    }

    fn kit(&self, name: &str) -> &Kit {
        self.done.kits.iter().find(|k| k.name == name).unwrap()
    }

    fn pem(path: &PathBuf) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// The kit's own settings, as a participant would build them.
    fn client(&self, name: &str) -> ClientTlsConfig {
        let kit = self.kit(name);
        client_tls(&kit.ca, &kit.cert, &kit.key, "localhost").unwrap()
    }

    fn identity(&self, name: &str) -> Identity {
        let kit = self.kit(name);
        Identity::from_pem(Self::pem(&kit.cert), Self::pem(&kit.key))
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(Self::pem(&self.kit("coordinator").ca))
    }
}

/// A coordinator-like server: the health service behind an identity-checking interceptor.
struct Coordinator {
    port: u16,
    seen: Arc<Mutex<Vec<PeerIdentity>>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Who called, from the certificate the TLS handshake verified; refused if revoked.
fn identify(
    request: &Request<()>,
    revocations: &WatchedRevocations,
) -> Result<PeerIdentity, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let peer = PeerIdentity::from_der(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
    revocations.check(&peer).map_err(|e| match e {
        PkiError::Revoked { .. } => Status::permission_denied(e.to_string()),
        other => Status::unavailable(other.to_string()),
    })?;
    Ok(peer)
}

impl Coordinator {
    async fn start(consortium: &Consortium) -> Self {
        let kit = consortium.kit("coordinator");
        // The CA's own list: a revocation is seen without copying it anywhere.
        let revocations =
            Arc::new(WatchedRevocations::open(&consortium.done.ca_dir.join(REVOKED_FILE)).unwrap());
        let tls = server_tls(&kit.cert, &kit.key, &kit.ca, Some(revocations.clone())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let interceptor = {
            let seen = seen.clone();
            move |request: Request<()>| {
                let peer = identify(&request, &revocations)?;
                seen.lock().unwrap().push(peer);
                Ok(request)
            }
        };
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::builder()
            .add_service(InterceptedService::new(health, interceptor))
            .serve_with_incoming_shutdown(tls_incoming(listener, tls, Default::default()), async {
                let _ = stopped.await;
            });
        Self {
            port,
            seen,
            stop,
            task: tokio::spawn(server),
        }
    }

    /// Dials `https://localhost:<port>`: a connection, handshake done.
    async fn connect(&self, tls: ClientTlsConfig) -> Result<Channel, Status> {
        Endpoint::from_shared(format!("https://localhost:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| Status::internal(format!("{e:?}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e:?}")))
    }

    /// Dials and asks for the overall health.
    async fn health(&self, tls: ClientTlsConfig) -> Result<ServingStatus, Status> {
        check(self.connect(tls).await?).await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Asks for the overall health over `channel`.
async fn check(channel: Channel) -> Result<ServingStatus, Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

#[tokio::test]
async fn a_site_kit_connects_and_is_identified() {
    let net = Consortium::new("Net");
    let coordinator = Coordinator::start(&net).await;
    let status = coordinator.health(net.client("hospital-a")).await.unwrap();
    assert_eq!(status, ServingStatus::Serving);
    let seen = coordinator.seen.lock().unwrap().clone();
    let site = net.kit("hospital-a");
    assert_eq!(
        seen,
        [PeerIdentity {
            role: Role::Site,
            name: "hospital-a".into(),
            serial_hex: site.serial_hex.clone(),
            sha256_hex: site.sha256_hex.clone(),
        }]
    );
    assert_eq!(
        coordinator.health(net.client("alice")).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(coordinator.seen.lock().unwrap()[1].role, Role::Researcher);
    coordinator.stop().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let net = Consortium::new("Net");
    let coordinator = Coordinator::start(&net).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(net.ca())
        .domain_name("localhost");
    let err = coordinator.health(tls).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("CertificateRequired"),
        "{err:?}"
    );
    assert!(coordinator.seen.lock().unwrap().is_empty());
    coordinator.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let net = Consortium::new("Net");
    let other = Consortium::new("Other");
    let coordinator = Coordinator::start(&net).await;
    // client_tls already refuses to pair our CA with a foreign certificate...
    let foreign = other.kit("hospital-a");
    let err = client_tls(
        &net.kit("hospital-a").ca,
        &foreign.cert,
        &foreign.key,
        "localhost",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not issued by the CA"), "{err}");
    // ...and the server refuses it when a client presents it anyway.
    let tls = ClientTlsConfig::new()
        .ca_certificate(net.ca())
        .identity(other.identity("hospital-a"))
        .domain_name("localhost");
    let err = coordinator.health(tls).await.unwrap_err();
    assert!(format!("{err:?}").contains("UnknownCA"), "{err:?}");
    assert!(coordinator.seen.lock().unwrap().is_empty());
    coordinator.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_coordinators_ca_fails() {
    let net = Consortium::new("Net");
    let other = Consortium::new("Other");
    let coordinator = Coordinator::start(&net).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(other.ca())
        .identity(net.identity("hospital-a"))
        .domain_name("localhost");
    let err = coordinator.health(tls).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("UnknownIssuer"),
        "expected an untrusted server certificate: {err:?}"
    );
    // Another consortium's complete kit fails the same way.
    coordinator
        .health(other.client("hospital-a"))
        .await
        .unwrap_err();
    assert!(coordinator.seen.lock().unwrap().is_empty());
    coordinator.stop().await;
}

#[tokio::test]
async fn the_server_name_is_checked() {
    let net = Consortium::new("Net");
    let coordinator = Coordinator::start(&net).await;
    let kit = net.kit("hospital-a");
    let tls = client_tls(&kit.ca, &kit.cert, &kit.key, "elsewhere.example.org").unwrap();
    let err = coordinator.health(tls).await.unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    coordinator.stop().await;
}

#[tokio::test]
async fn a_revocation_is_honoured_without_a_restart() {
    let net = Consortium::new("Net");
    let coordinator = Coordinator::start(&net).await;
    let channel_tls = net.client("hospital-a");
    let open = coordinator.connect(channel_tls.clone()).await.unwrap();
    check(open.clone()).await.unwrap();

    let mut ca = Ca::open(&net.done.ca_dir).unwrap();
    ca.revoke("hospital-a").unwrap();
    // A new connection is refused in the handshake...
    let err = coordinator.health(channel_tls).await.unwrap_err();
    assert!(format!("{err:?}").contains("CertificateRevoked"), "{err:?}");
    // ...and one made before the revocation is refused at its next call, naming who.
    let err = check(open).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("hospital-a"), "{err:?}");
    // Others are unaffected.
    coordinator.health(net.client("alice")).await.unwrap();

    // A damaged list refuses everyone, naming the file, until it is fixed.
    let list = net.done.ca_dir.join(REVOKED_FILE);
    let good = std::fs::read(&list).unwrap();
    std::fs::write(&list, "{ damaged").unwrap();
    let err = coordinator.health(net.client("alice")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(REVOKED_FILE), "{err:?}");
    std::fs::write(&list, good).unwrap();
    coordinator.health(net.client("alice")).await.unwrap();
    coordinator.stop().await;
}
