//! Mutual TLS with kits from `medfl provision`: the breast cancer federation runs over it, and
//! callers without the right certificate or role are refused with a status naming the rule.

use std::path::Path;

use medfl_e2e::{
    breast_cancer_spec, init_logs, site_config, site_config_with, split_breast_cancer, test_config,
    wait_for_completion, Coordinator, Site,
};
use medfl_pki::{provision, Ca, Kit, Role};
use medfl_proto::v1;
use medfl_proto::v1::run_service_client::RunServiceClient;
use medfl_proto::v1::site_service_client::SiteServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

fn pem(path: &Path) -> String {
    std::fs::read_to_string(path).expect("a PEM file")
}

async fn channel(url: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string())?
        .tls_config(tls)?
        .connect()
        .await
}

/// A channel authenticated with `kit`'s certificate.
async fn as_participant(url: &str, kit: &Kit) -> Channel {
    let tls = medfl_pki::client_tls(&kit.ca, &kit.cert, &kit.key, "localhost").expect("TLS");
    channel(url, tls).await.expect("connect")
}

fn register(site: &str) -> tonic::Request<v1::RegisterRequest> {
    tonic::Request::new(v1::RegisterRequest {
        site: site.into(),
        token: "a-token-of-at-least-16-bytes".into(),
        datasets: vec![],
        version: "test".into(),
        signing_public_key: vec![7; 32],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federation_runs_over_mutual_tls_and_impostors_are_refused() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = ["site-a", "site-b", "site-c"].map(String::from);
    // The shipped default: mutual TLS with kits from the consortium's CA.
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let pki = coordinator.pki.clone().expect("a TLS coordinator");
    let url = coordinator.url();

    // Two hospitals with their kits train over mutual TLS.
    let (csvs, _test) = split_breast_cancer(dir.path(), 2);
    let mut running = Vec::new();
    for (name, csv) in sites.iter().zip(&csvs) {
        let mut site = Site::start(site_config(name, &coordinator, &dir.path().join(name), csv));
        site.registered(1).await;
        running.push(site);
    }
    let alice = &pki.kit(Role::Researcher, "alice");
    let mut runs = RunServiceClient::new(as_participant(&url, alice).await);
    let run_id = runs
        .create_run(v1::CreateRunRequest {
            spec_toml: breast_cancer_spec("over-tls", 2, 2, 60),
        })
        .await
        .expect("a researcher creates a run")
        .into_inner()
        .run_id;
    wait_for_completion(&mut runs, &run_id).await;

    // No client certificate: the handshake or the first call fails.
    let ca = Certificate::from_pem(pem(&alice.ca));
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name("localhost");
    let refused = match channel(&url, anonymous).await {
        Err(_) => true,
        Ok(ch) => RunServiceClient::new(ch)
            .list_runs(v1::ListRunsRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a caller without a certificate was served");

    // A certificate from another consortium's CA.
    let other = provision(
        None,
        "other-consortium",
        "localhost",
        &[],
        &["mallory".to_string()],
        &[],
        &dir.path().join("other-kits"),
    )
    .expect("provisioning");
    let mallory = other
        .kits
        .iter()
        .find(|k| k.name == "mallory")
        .expect("mallory's kit");
    let foreign = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(Identity::from_pem(pem(&mallory.cert), pem(&mallory.key)))
        .domain_name("localhost");
    let refused = match channel(&url, foreign.clone()).await {
        Err(_) => true,
        Ok(ch) => RunServiceClient::new(ch)
            .list_runs(v1::ListRunsRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a certificate of another CA was accepted");

    // Refused handshakes are audited, rate-limited: a flood of them writes at most a minute's
    // allowance, each entry naming the peer and the reason.
    for _ in 0..20 {
        if let Ok(ch) = channel(&url, foreign.clone()).await {
            let _ = RunServiceClient::new(ch)
                .list_runs(v1::ListRunsRequest {})
                .await;
        }
    }
    let log = coordinator.data_dir.join("audit.jsonl");
    let refusals = |log: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "handshake_refused")
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut every = tokio::time::interval(std::time::Duration::from_millis(20));
    while refusals(&log).is_empty() && std::time::Instant::now() < deadline {
        every.tick().await;
    }
    let written = refusals(&log);
    assert!(
        !written.is_empty() && written.len() <= medfl_coordinator::refusals::PER_MINUTE as usize,
        "{written:?}"
    );
    assert!(written.iter().all(|e| {
        e["details"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
            && e["details"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
    }));

    // A site acting as another site.
    let mut site_a =
        SiteServiceClient::new(as_participant(&url, &pki.kit(Role::Site, "site-a")).await);
    let err = site_a
        .register(register("site-b"))
        .await
        .expect_err("impostor");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("cannot act as site `site-b`"),
        "{}",
        err.message()
    );

    // A researcher calling a site-only RPC, and a site calling the run service.
    let mut as_site = SiteServiceClient::new(as_participant(&url, alice).await);
    let err = as_site
        .poll_task(v1::PollTaskRequest {})
        .await
        .expect_err("researcher polling tasks");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("researcher `alice` may not call SiteService")
            && err.message().contains("only sites"),
        "{}",
        err.message()
    );
    let mut site_runs =
        RunServiceClient::new(as_participant(&url, &pki.kit(Role::Site, "site-a")).await);
    let err = site_runs
        .list_runs(v1::ListRunsRequest {})
        .await
        .expect_err("a site listing runs");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A revoked site is refused without a coordinator restart: on a connection it already
    // holds, from its next call on; a new connection, in the TLS handshake.
    let site_c = &pki.kit(Role::Site, "site-c");
    let mut c = SiteServiceClient::new(as_participant(&url, site_c).await);
    c.register(register("site-c"))
        .await
        .expect("not revoked yet");
    let mut ca_admin = Ca::open(&pki.ca_dir()).expect("the CA");
    assert_eq!(ca_admin.revoke("site-c").expect("revoke").role, Role::Site);
    let err = c.register(register("site-c")).await.expect_err("revoked");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("site-c"), "{}", err.message());
    // The site daemon tells its hospital so in plain words (and retries hourly).
    let site_config = medfl_site::SiteConfig::load(Some(&site_c.config)).expect("site-c's kit");
    let why = medfl_site::daemon::certificate_refused(
        &medfl_site::SiteError::Rpc(err.clone()),
        &site_config,
        0,
    )
    .expect("a revocation, said as one");
    assert!(why.contains("medfl provision reissue site-c"), "{why}");
    let tls =
        medfl_pki::client_tls(&site_c.ca, &site_c.cert, &site_c.key, "localhost").expect("TLS");
    let refused = match channel(&url, tls).await {
        Err(e) => format!("{e:?}"),
        Ok(ch) => format!(
            "{:?}",
            SiteServiceClient::new(ch)
                .register(register("site-c"))
                .await
                .expect_err("a revoked site on a new connection")
        ),
    };
    // In TLS 1.3 the client finishes its side of the handshake before the server checks its
    // certificate: the client sees the server's alert, or, when the server has closed first,
    // only a closed connection (closed, reset, broken pipe). The call is refused either way,
    // and an alert, when it arrives, says why.
    let alert = refused.contains("AlertReceived") || refused.contains("InvalidCertificate");
    assert!(
        !alert || refused.contains("CertificateRevoked"),
        "{refused}"
    );

    for s in running {
        s.stop().await;
    }
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_refuses_a_global_model_tampered_with_on_the_way() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(medfl_e2e::test_config(&dir.path().join("c"))).await;
    let (csvs, _test) = split_breast_cancer(dir.path(), 1);
    let tables = format!(
        "[datasets.breast_cancer]\npath = \"{}\"\n",
        csvs[0].display()
    );
    let config = site_config_with("wary", &coordinator, &dir.path().join("wary"), &tables);
    // Registered, then away while the run is created and its model altered on disk.
    let mut site = Site::start(config.clone());
    site.registered(1).await;
    site.stop().await;
    let mut runs = coordinator.runs().await;
    let spec =
        breast_cancer_spec("tampered", 1, 1, 5).replace("max_retries = 2", "max_retries = 0");
    let run = medfl_e2e::create_run(&mut runs, &spec).await;
    let initial = coordinator.store().run(&run).expect("run").initial_sha256;
    let blob = coordinator.blob_path(&initial);
    let mut bytes = std::fs::read(&blob).expect("blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    // Swapped in whole: the coordinator may be reading the blob's size to open round 1,
    // and must never see it truncated half-way through the edit.
    let altered = dir.path().join("altered");
    std::fs::write(&altered, bytes).expect("tamper");
    std::fs::rename(&altered, &blob).expect("tamper");

    let site = Site::start(config.clone());
    let detail = medfl_e2e::wait_for_end(&mut runs, &run).await;
    assert_eq!(medfl_e2e::status(&detail), v1::RunStatus::Failed as i32);
    // The site said why, in its audit log, and trained on nothing.
    let audit = std::fs::read_to_string(config.data_dir.join("audit.jsonl")).expect("audit");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("task_failed") && l.contains("hash")),
        "{audit}"
    );
    assert!(!audit.contains("update_sent"), "{audit}");
    site.stop().await;
    coordinator.stop().await;
}
