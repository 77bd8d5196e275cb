//! Nothing acknowledged is lost, under faults, with the project's own binaries on a real
//! nats-server, a real fixture repository, real `invoke`, and a fake GitHub over HTTP.

use std::collections::BTreeSet;
use std::time::Duration;

use iac_tests::fake_github::{FakeGithub, Faults};
use iac_tests::pipeline::Pipeline;
use iac_tests::wait_for;

const CONTEXT: &str = "IaC Runner / Sync";
const POSTGRES: &str = "platform/01.postgres/compose.yaml";

/// How long a push may take to be shown as synced, through the faults each test makes.
const SHOWN: Duration = Duration::from_secs(90);

fn synced_commits(pipeline: &Pipeline) -> BTreeSet<String> {
    pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end")
        .filter_map(|r| r.commit)
        .collect()
}

#[tokio::test]
async fn a_nats_restart_under_all_three_services_loses_no_accepted_push() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    let _services = pipeline.start_all().await;

    let (first, status, _) = pipeline.push_change(POSTGRES).await;
    assert_eq!(status, 200);
    github
        .wait_for_shown(&first, CONTEXT, "success", SHOWN)
        .await;

    pipeline.nats.as_mut().unwrap().stop();
    let (second, delivery, payload) = pipeline.commit_change(POSTGRES);
    let (status, answer) = pipeline.webhook("push", &delivery, &payload).await;
    assert_eq!(status, 503, "answered while NATS is down: {answer}");

    pipeline.nats.as_mut().unwrap().restart();
    // GitHub shows the failed delivery; the operator redelivers it once NATS is back.
    let redelivered = wait_for(
        "the gateway to store again",
        Duration::from_secs(30),
        || {
            let (delivery, payload) = (delivery.clone(), payload.clone());
            let pipeline = &pipeline;
            async move {
                let (status, _) = pipeline.webhook("push", &delivery, &payload).await;
                (status == 200).then_some(status)
            }
        },
    )
    .await;
    assert_eq!(redelivered, 200);
    let (third, status, _) = pipeline.push_change(POSTGRES).await;
    assert_eq!(status, 200);

    github
        .wait_for_shown(&second, CONTEXT, "success", SHOWN)
        .await;
    github
        .wait_for_shown(&third, CONTEXT, "success", SHOWN)
        .await;
    // The second may have been synced as part of the third (it was still queued when the
    // third came); its status says so, and it is final either way.
    let synced = synced_commits(&pipeline);
    for commit in [&first, &third] {
        assert!(synced.contains(commit), "{commit} never synced: {synced:?}");
    }
}

#[tokio::test]
async fn a_delivery_sent_five_times_is_synced_once() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _services = pipeline.start_all().await;

    let (commit, delivery, payload) = pipeline.commit_change(POSTGRES);
    for _ in 0..5 {
        let (status, answer) = pipeline.webhook("push", &delivery, &payload).await;
        assert_eq!(status, 200, "{answer}");
    }
    github
        .wait_for_shown(&commit, CONTEXT, "success", SHOWN)
        .await;
    // A later push proves the worker has moved past anything that could still be queued.
    let (next, _, _) = pipeline.push_change(POSTGRES).await;
    github
        .wait_for_shown(&next, CONTEXT, "success", SHOWN)
        .await;
    let runs_of_commit = pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end" && r.commit.as_deref() == Some(commit.as_str()))
        .count();
    assert_eq!(runs_of_commit, 1);
}

#[tokio::test]
async fn three_workers_sharing_a_workspace_never_sync_at_the_same_time() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _gateway = pipeline.start_gateway().await;
    let _workers = [
        pipeline.start_worker(),
        pipeline.start_worker(),
        pipeline.start_worker(),
    ];
    let _reporter = pipeline.start_reporter();

    pipeline
        .fixture
        .set_behaviour("platform/01.postgres", 0.4, 0);
    let mut commits = Vec::new();
    for _ in 0..5 {
        let (commit, status, _) = pipeline.push_change(POSTGRES).await;
        assert_eq!(status, 200);
        commits.push(commit);
    }
    for commit in &commits {
        github
            .wait_for_shown(commit, CONTEXT, "success", SHOWN)
            .await;
    }
    let runs = pipeline.fixture.runs();
    let mut intervals: Vec<(f64, f64)> = Vec::new();
    for start in runs.iter().filter(|r| r.phase == "start") {
        let end = runs
            .iter()
            .find(|r| r.phase == "end" && r.pid == start.pid)
            .expect("every started task ended");
        intervals.push((start.t, end.t));
    }
    intervals.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // Pushes queued behind a sync are synced once, as the newest: at least two syncs.
    assert!(intervals.len() >= 2, "{intervals:?}");
    for pair in intervals.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "two syncs overlapped: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test]
async fn killing_the_reporter_mid_post_loses_no_status() {
    let github = FakeGithub::start().await;
    // Every success takes three seconds to be answered: time to kill the reporter mid-post.
    github.set_faults(Faults {
        slow_state: Some(("success".into(), Duration::from_secs(3))),
        ..Faults::default()
    });
    let pipeline = Pipeline::new(&github.url());
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let mut reporter = pipeline.start_reporter();

    let (commit, status, _) = pipeline.push_change(POSTGRES).await;
    assert_eq!(status, 200);
    wait_for(
        "the success post to be in flight",
        Duration::from_secs(60),
        || async {
            github
                .requests()
                .iter()
                .any(|r| r.commit == commit && r.state() == "success")
                .then_some(())
        },
    )
    .await;
    reporter.kill();
    github.set_faults(Faults::default());
    let _replacement = pipeline.start_reporter();
    // The first post never got its answer to the reporter; the message was not acknowledged,
    // so the replacement posts it again.
    wait_for("a second success post", Duration::from_secs(90), || async {
        (github
            .requests()
            .iter()
            .filter(|r| r.commit == commit && r.state() == "success")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    github
        .wait_for_shown(&commit, CONTEXT, "success", SHOWN)
        .await;
}

#[tokio::test]
async fn hand_published_garbage_results_are_dropped_and_statuses_keep_flowing() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let reporter = pipeline.start_reporter();

    let js = async_nats::jetstream::new(pipeline.nats.as_ref().unwrap().client().await);
    for (subject, body) in [
        ("iac.results.finished", "not json"),
        ("iac.results.started", r#"{"event_id": 7}"#),
        ("iac.results.other", "{}"),
    ] {
        js.publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (commit, status, _) = pipeline.push_change(POSTGRES).await;
    assert_eq!(status, 200);
    github
        .wait_for_shown(&commit, CONTEXT, "success", SHOWN)
        .await;
    let log = reporter.output();
    assert!(
        log.matches("cannot be read").count() >= 3,
        "the reporter did not say it dropped the garbage:\n{log}"
    );
}

#[tokio::test]
async fn every_service_stops_on_sigterm_even_when_nats_is_gone() {
    let mut pipeline = Pipeline::new("http://127.0.0.1:9");
    let gateway = pipeline.start_gateway().await;
    let worker = pipeline.start_worker();
    let reporter = pipeline.start_reporter();
    let (commit, status, _) = pipeline.push_change(POSTGRES).await;
    assert_eq!(status, 200);
    wait_for("the push synced", Duration::from_secs(60), || async {
        synced_commits(&pipeline).contains(&commit).then_some(())
    })
    .await;

    pipeline.nats.as_mut().unwrap().stop();
    for mut process in [gateway, worker, reporter] {
        let asked = std::time::Instant::now();
        let exit = process.terminate(Duration::from_secs(30));
        let took = asked.elapsed();
        eprintln!("{} stopped in {took:?}", process.name);
        assert!(
            took < Duration::from_secs(15),
            "{} took {took:?} to stop without NATS",
            process.name
        );
        assert!(
            exit.is_some_and(|s| s.code().is_some()),
            "{} was killed: {exit:?}",
            process.name
        );
    }
}
