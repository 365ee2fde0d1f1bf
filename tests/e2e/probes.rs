//! The coordinator's plaintext health address (`health_listen`), as Kubernetes' `grpc` probe
//! uses it: the shipped binary with its `medfl provision` kit serves mutual TLS on its port and
//! only the standard health service, without a certificate, on the other.

use std::process::{Command, Stdio};
use std::sync::mpsc;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::trial::{binary, logged_addr, wait_for, Daemons};

#[tokio::test]
async fn the_health_address_answers_probes_without_a_certificate_while_the_port_is_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let made = medfl_pki::provision(
        None,
        "probes",
        "localhost",
        &[],
        &[],
        &[],
        &dir.path().join("kits"),
    )
    .unwrap();
    let config = made.kits[0].config.clone();
    let mut cmd = Command::new(binary("target/release/medfl-coordinator"));
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("MEDFL_")) {
        cmd.env_remove(key);
    }
    cmd.arg("--config")
        .arg(&config)
        .env("MEDFL_LISTEN", "127.0.0.1:0")
        .env("MEDFL_HEALTH_LISTEN", "127.0.0.1:0")
        .env("MEDFL_DATA_DIR", dir.path().join("data"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    let (tx, lines) = mpsc::channel();
    let mut daemons = Daemons::default();
    daemons.start(cmd, "coordinator", &tx);
    let (mut health, mut main) = (None, None);
    while health.is_none() || main.is_none() {
        let (what, addr) = wait_for(&lines, "the coordinator to serve", |_, line| {
            logged_addr(line, "health serving")
                .map(|a| ("health", a))
                .or_else(|| logged_addr(line, "coordinator serving").map(|a| ("main", a)))
        });
        match what {
            "health" => health = Some(addr),
            _ => main = Some(addr),
        }
    }
    let (health, main) = (health.unwrap(), main.unwrap());
    assert_ne!(health, main);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{health}"))
        .unwrap()
        .connect()
        .await
        .expect("a plaintext connection to the health address");
    let mut client = HealthClient::new(channel);
    for service in ["", "medfl.v1.RunService", "medfl.v1.SiteService"] {
        let status = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of `{service}`: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "`{service}`");
    }

    // The main port takes no plaintext call, health included.
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{main}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let refused = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await;
        assert!(
            refused.is_err(),
            "plaintext health on the TLS port: {refused:?}"
        );
    }
    drop(daemons);
}
