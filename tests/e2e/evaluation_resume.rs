//! Evaluations open when the coordinator restarts are resumed: a committed round's evaluate
//! phase, and the cross-site evaluation of a completed run's final model.

use std::time::Duration;

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;
use medfl_proto::v1;

/// Trains by sending the global model back unchanged, or scores the model with `accuracy`.
async fn answer(site: &mut RawSite, task: &v1::Task, accuracy: f64) {
    if task.kind == v1::TaskKind::Evaluate as i32 {
        site.evaluate(task, accuracy)
            .await
            .expect("evaluation taken");
    } else {
        let global = site.download(&task.global_sha256).await;
        site.push(task, &global, 10).await.expect("update taken");
    }
}

/// Polls until a task arrives, retrying while a restarted coordinator comes up.
async fn next_task_after_restart(site: &mut RawSite) -> v1::Task {
    let poll = async {
        loop {
            match site
                .client
                .poll_task(site.req(v1::PollTaskRequest {}))
                .await
            {
                Ok(reply) => {
                    if let Some(task) = reply.into_inner().task {
                        return task;
                    }
                }
                // The connection to the killed coordinator is gone; the channel reconnects.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .expect("a task after the restart")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cross_site_evaluation_collecting_answers_survives_a_restart() {
    let mut fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    let mut late = RawSite::register(&fed.coordinator, "late").await;
    let spec = breast_cancer_spec("cross-site-resumes", 1, 3, 60);
    let run = create_run(&mut client, &spec).await;
    // `late` trains and scores round 1, then holds its task for the final model.
    let task = loop {
        let task = late.next_task().await;
        if task.round == 0 {
            break task;
        }
        answer(&mut late, &task, 0.5).await;
    };
    assert_eq!(task.kind, v1::TaskKind::Evaluate as i32);
    let before = watch_until(&mut client, &run, |d| {
        d.final_evaluation.len() == 2 && d.evaluating
    })
    .await;
    assert!(before.final_evaluation.iter().all(|e| e.site != "late"));

    fed.coordinator.restart();
    // Only the site that had not answered is asked again, in the same evaluation.
    let again = next_task_after_restart(&mut late).await;
    assert_eq!(
        (again.round, again.kind, again.attempt, &again.global_sha256),
        (0, task.kind, task.attempt, &task.global_sha256)
    );
    let mut client = fed.coordinator.runs().await;
    let resumed = watch_until(&mut client, &run, |_| true).await;
    assert!(resumed.evaluating, "the evaluation is still collecting");
    late.evaluate(&again, 0.25).await.expect("answer taken");

    let detail = wait_for_completion(&mut client, &run).await;
    assert!(!detail.evaluating);
    let sites: Vec<&str> = detail
        .final_evaluation
        .iter()
        .map(|e| e.site.as_str())
        .collect();
    assert_eq!(sites.len(), 3, "{sites:?}");
    let answer = detail
        .final_evaluation
        .iter()
        .find(|e| e.site == "late")
        .expect("late's answer");
    assert_eq!(answer.metrics["accuracy"], 0.25);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rounds_evaluation_open_at_a_restart_is_finished_before_the_next_round() {
    let mut fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    let mut slow = RawSite::register(&fed.coordinator, "slow-scorer").await;
    let spec = breast_cancer_spec("round-evaluation-resumes", 2, 3, 60);
    let run = create_run(&mut client, &spec).await;
    let train = slow.next_task().await;
    assert_eq!((train.round, train.kind), (1, v1::TaskKind::Train as i32));
    answer(&mut slow, &train, 0.5).await;
    // Round 1 is committed; its evaluation waits for `slow` once the others answered.
    let task = slow.next_task().await;
    assert_eq!((task.round, task.kind), (1, v1::TaskKind::Evaluate as i32));
    watch_until(&mut client, &run, |d| {
        d.rounds.len() == 1 && d.current_phase == "evaluate" && d.current_reported == 2
    })
    .await;

    fed.coordinator.restart();
    let again = next_task_after_restart(&mut slow).await;
    assert_eq!(
        (again.round, again.kind, &again.global_sha256),
        (1, task.kind, &task.global_sha256)
    );
    answer(&mut slow, &again, 0.25).await;
    // The run goes on; `slow` answers whatever else it is asked.
    let rest = tokio::spawn(async move {
        loop {
            let task = slow.next_task().await;
            answer(&mut slow, &task, 0.5).await;
        }
    });
    let mut client = fed.coordinator.runs().await;
    wait_for_completion(&mut client, &run).await;
    let detail = client
        .get_run(v1::GetRunRequest {
            run_id: run.clone(),
            sites_of_round: 1,
        })
        .await
        .expect("get run")
        .into_inner();
    rest.abort();
    let first = &detail.rounds[0];
    assert_eq!(detail.rounds.len(), 2);
    assert!(first.eval_metrics.contains_key("accuracy"), "{first:?}");
    let scored: Vec<(&str, f64)> = first
        .sites
        .iter()
        .filter_map(|s| Some((s.site.as_str(), *s.eval_metrics.get("accuracy")?)))
        .collect();
    assert_eq!(
        scored.len(),
        3,
        "every site's evaluation counts: {scored:?}"
    );
    assert!(scored.contains(&("slow-scorer", 0.25)), "{scored:?}");
    fed.stop().await;
}
