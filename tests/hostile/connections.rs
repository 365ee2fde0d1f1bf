//! Floods: more idle connections than the coordinator serves, then every oversized message a
//! site can send, one after another.

use std::time::{Duration, Instant};

use medfl_proto::v1;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;

use crate::{code, Attack, Footprint};

/// Idle connections opened: more than the default `max_connections` (4,096).
const IDLE: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_leave_the_coordinator_bounded_in_memory_and_on_disk() {
    let _turn = crate::turn().await;
    // This process holds both ends of every connection; the coordinator raises its own limit
    // to fit its cap, the test raises it further for the client ends.
    let fits = medfl_coordinator::open_files::fit_connections(2 * IDLE as u32 + 1024);
    assert!(
        fits as usize >= 2 * IDLE,
        "the open-file hard limit is too low for this test (ulimit -Hn)"
    );
    let Attack {
        fed,
        mut client,
        mut hostile,
        run,
        task,
    } = Attack::beside("beside-a-flood", 3).await;
    let global = hostile.download(&task.global_sha256).await;
    let bytes = medfl_core::safetensors::encode(&global);
    // One refused upload first, so that buffers allocated once are in the baseline.
    let mut header = hostile.header_for(&task, &bytes, 10);
    header.run_id = "x".repeat(1 << 20);
    assert_eq!(
        code(hostile.push_raw(header, bytes.clone(), 0).await),
        Code::InvalidArgument
    );
    let before = Footprint::of(&fed.coordinator);

    // 1. More idle TCP connections than the coordinator serves: they never start a handshake.
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let tcp = TcpStream::connect(fed.coordinator.addr)
            .await
            .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
        idle.push(tcp);
    }
    // A researcher connecting now waits in the backlog at most until the idle connections ahead
    // of it have had their 3 s to say something, then is served.
    let asked = Instant::now();
    let mut late = fed.coordinator.runs().await;
    late.list_sites(v1::ListSitesRequest::default())
        .await
        .expect("a researcher is served during the flood");
    let waited = asked.elapsed();
    assert!(waited < Duration::from_secs(10), "served after {waited:?}");
    // Every idle connection is closed by the coordinator: those accepted at once after 3 s,
    // those that waited beyond the cap 3 s after they were accepted in turn.
    let closed_by = Instant::now() + Duration::from_secs(30);
    for (i, tcp) in idle.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let left = closed_by.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("idle connection {i} was sent {n} bytes"),
            Err(_) => panic!("idle connection {i} still open after 30 s"),
        }
    }
    drop(idle);

    // 2. Two hundred refused uploads, each naming a 1 MB run id.
    for _ in 0..200 {
        let mut header = hostile.header_for(&task, &bytes, 10);
        header.run_id = "x".repeat(1 << 20);
        let refused = hostile.push_raw(header, bytes.clone(), 0).await;
        assert_eq!(code(refused), Code::InvalidArgument);
    }
    // 3. Twenty evaluations with 60,000 metric names each.
    for _ in 0..20 {
        let report = crate::report_metrics(&mut hostile, &task, 60_000).await;
        assert_eq!(report, Code::InvalidArgument);
    }
    // 4. Twenty registrations with 3 MB of column names each.
    for _ in 0..20 {
        let registered = crate::register_columns(&mut hostile, 150_000).await;
        assert_eq!(registered, Code::InvalidArgument);
    }

    println!("a researcher waited {waited:.1?} behind {IDLE} idle connections");
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);

    // The honest run beside it completes.
    let detail =
        crate::declined_until_complete(hostile, &task, "giving up", &mut client, &run).await;
    assert_eq!(detail.rounds.len(), 3);
    fed.stop().await;
}
