//! Newest commit wins, nothing missed: pushes queued behind a slow sync are synced once, as the
//! newest; a commit a force push dropped ends `error`; a commit whose webhook never came is
//! synced by reconciliation, published once however many workers find it, and `status` marks
//! drift for the services it changes until then. Real NATS, git and invoke, GitHub faked.

use std::time::Duration;

use iac_shared::events::PushEvent;
use iac_shared::names::{EVENTS_STREAM, PUSH_SUBJECT, SYNC_SUBJECT};
use iac_tests::fake_github::FakeGithub;
use iac_tests::fixture::git;
use iac_tests::pipeline::Pipeline;
use iac_tests::wait_for;

const CONTEXT: &str = "IaC Runner / Sync";

/// How long a push may take to reach its final status.
const FINAL: Duration = Duration::from_secs(90);

const REDIS: &str = "platform/02.redis";

/// The commits the tasks ran at, one per `end` record, with the task.
fn ran_at(pipeline: &Pipeline, commit: &str) -> Vec<String> {
    pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end" && r.commit.as_deref() == Some(commit))
        .filter_map(|r| r.task)
        .collect()
}

/// Waits until a task has started (the worker is busy with the first push).
async fn wait_for_a_task_to_start(pipeline: &Pipeline) {
    wait_for("a task to start", Duration::from_secs(60), || {
        let started = pipeline.fixture.runs().iter().any(|r| r.phase == "start");
        async move { started.then_some(()) }
    })
    .await;
}

/// Every push event stored in `IAC_EVENTS` (single server only).
async fn stored_pushes(pipeline: &Pipeline) -> Vec<PushEvent> {
    let nats = pipeline
        .nats
        .as_ref()
        .expect("a pipeline on one nats-server");
    let js = async_nats::jetstream::new(nats.client().await);
    let stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let mut out = Vec::new();
    let mut next = 1;
    while let Ok(message) = stream
        .direct_get_next_for_subject(PUSH_SUBJECT, Some(next))
        .await
    {
        next = message.sequence + 1;
        out.push(serde_json::from_slice(&message.payload).expect("a push in the contract"));
    }
    out
}

/// Waits until `iac-worker status` shows `commit` as the push environment's applied head.
async fn wait_for_applied_head(pipeline: &Pipeline, commit: &str) {
    let line = format!("applied production: head {}", &commit[..8]);
    wait_for("the applied head", FINAL, || {
        let (_, status, _) = pipeline.operator("iac-worker", &["status"]);
        let shown = status.contains(&line);
        async move { shown.then_some(()) }
    })
    .await;
}

/// The worker's `/metrics` on `port`.
async fn metrics(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let response = iac_tests::http().get(&url).send().await.unwrap();
    response.text().await.unwrap()
}

#[tokio::test]
async fn pushes_queued_behind_a_slow_sync_are_synced_once_as_the_newest_and_every_commit_ends() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("worker", "RECONCILE_INTERVAL", "0");
    let port = iac_tests::free_port();
    pipeline.set_env("worker", "METRICS_PORT", &port.to_string());
    let _services = pipeline.start_all().await;

    pipeline.fixture.set_behaviour(REDIS, 4.0, 0);
    let (slow, status, answer) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    assert_eq!(status, 200, "{answer}");
    wait_for_a_task_to_start(&pipeline).await;

    // Three pushes while redis syncs: postgres, then the finance app (changed by no other
    // push), then redis again, fast this time.
    let (in_hand, _, _) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    let (skipped, _, _) = pipeline
        .push_change("finance_report/finance_report/10.app/compose.yaml")
        .await;
    pipeline.fixture.set_behaviour(REDIS, 0.0, 0);
    let (newest, _, _) = pipeline.push_change("platform/02.redis/compose.yaml").await;

    let shown = github
        .wait_for_shown(&newest, CONTEXT, "success", FINAL)
        .await;
    assert_eq!(shown.description(), "3 service(s) synced successfully");
    for superseded in [&in_hand, &skipped] {
        let shown = github
            .wait_for_shown(superseded, CONTEXT, "success", FINAL)
            .await;
        assert_eq!(
            shown.description(),
            format!("Superseded: synced as part of {}", &newest[..8]),
            "{superseded}"
        );
        assert!(ran_at(&pipeline, superseded).is_empty(), "{superseded}");
    }
    let shown = github
        .wait_for_shown(&slow, CONTEXT, "success", FINAL)
        .await;
    assert_eq!(shown.description(), "1 service(s) synced successfully");

    let mut at_newest = ran_at(&pipeline, &newest);
    at_newest.sort();
    assert_eq!(at_newest, ["fr-app.sync", "postgres.sync", "redis.sync"]);
    let ends = pipeline
        .fixture
        .runs()
        .iter()
        .filter(|r| r.phase == "end")
        .count();
    assert_eq!(ends, 4, "the slow sync and one sync of the newest");
    let metrics = metrics(port).await;
    assert!(
        metrics.contains("iac_worker_pushes_superseded_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"iac_worker_service_last_success_timestamp_seconds{env="production",service="finance_report/app"}"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_manual_sync_queued_between_pushes_is_never_overtaken() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("worker", "RECONCILE_INTERVAL", "0");
    let _services = pipeline.start_all().await;

    pipeline.fixture.set_behaviour(REDIS, 3.0, 0);
    pipeline.push_change("platform/02.redis/compose.yaml").await;
    wait_for_a_task_to_start(&pipeline).await;
    let (before_sync, _, _) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    let nats = pipeline.nats.as_ref().unwrap();
    let js = async_nats::jetstream::new(nats.client().await);
    js.publish(SYNC_SUBJECT, r#"{"services":["platform/postgres"]}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (after_sync, _, _) = pipeline
        .push_change("finance_report/finance_report/10.app/compose.yaml")
        .await;

    let shown = github
        .wait_for_shown(&before_sync, CONTEXT, "success", FINAL)
        .await;
    assert_eq!(shown.description(), "1 service(s) synced successfully");
    assert_eq!(ran_at(&pipeline, &before_sync), ["postgres.sync"]);
    // The manual sync ran at the branch head of its turn, then the last push on its own.
    let at_head = wait_for("the last push to sync", FINAL, || {
        let ran = ran_at(&pipeline, &after_sync);
        async move { (ran.len() == 2).then_some(ran) }
    })
    .await;
    assert_eq!(at_head, ["postgres.sync", "fr-app.sync"]);
}

#[tokio::test]
async fn a_commit_a_force_push_dropped_ends_error_and_the_new_head_syncs() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("worker", "RECONCILE_INTERVAL", "0");
    let _services = pipeline.start_all().await;

    pipeline.fixture.set_behaviour(REDIS, 4.0, 0);
    let (slow, _, _) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    wait_for_a_task_to_start(&pipeline).await;
    let (dropped, _, _) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;

    // The branch is rewritten from the slow commit on: `dropped` is no longer on it.
    let work = pipeline.fixture.work_tree();
    git(work, &["reset", "-q", "--hard", &slow]);
    pipeline.fixture.write(
        "finance_report/finance_report/10.app/compose.yaml",
        "# rewritten\n",
    );
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", "rewrite"]);
    git(work, &["push", "-q", "--force", "origin", "main"]);
    let head = pipeline.fixture.head();
    let payload = pipeline.fixture.push_payload(
        &dropped,
        &head,
        &["finance_report/finance_report/10.app/compose.yaml"],
    );
    let (status, answer) = pipeline.webhook("push", "delivery-forced", &payload).await;
    assert_eq!(status, 200, "{answer}");

    let shown = github
        .wait_for_shown(&dropped, CONTEXT, "error", FINAL)
        .await;
    assert_eq!(shown.description(), "Not synced: no longer on main");
    assert!(ran_at(&pipeline, &dropped).is_empty());
    github
        .wait_for_shown(&head, CONTEXT, "success", FINAL)
        .await;
    assert!(
        ran_at(&pipeline, &head).contains(&"fr-app.sync".to_string()),
        "{:?}",
        pipeline.fixture.runs()
    );
}

#[tokio::test]
async fn a_commit_whose_webhook_never_came_is_synced_by_reconciliation() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("worker", "RECONCILE_INTERVAL", "1");
    let port = iac_tests::free_port();
    pipeline.set_env("worker", "METRICS_PORT", &port.to_string());
    let _services = pipeline.start_all().await;
    let (first, _, _) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    github
        .wait_for_shown(&first, CONTEXT, "success", FINAL)
        .await;

    // Pushed to the branch, but GitHub's webhook is lost (or late).
    let before = pipeline.fixture.head();
    let missed = pipeline.fixture.change("platform/01.postgres/compose.yaml");

    let seen = github
        .wait_for_accepted(&missed, CONTEXT, "success", FINAL)
        .await;
    assert_eq!(seen[0].state(), "pending", "queued first: {seen:?}");
    assert_eq!(
        github.shown(&missed, CONTEXT).unwrap().description(),
        "1 service(s) synced successfully"
    );
    assert_eq!(ran_at(&pipeline, &missed), ["postgres.sync"]);
    let metrics = metrics(port).await;
    assert!(
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix("iac_worker_reconciled_total "))
            .any(|n| n.parse::<u64>().is_ok_and(|n| n >= 1)),
        "{metrics}"
    );
    let (ok, status, err) = pipeline.operator("iac-worker", &["status"]);
    assert!(ok, "{err}");
    assert!(
        status.contains(&format!(
            "applied production: head {} success",
            &missed[..8]
        )),
        "{status}"
    );
    assert!(
        status.contains(&format!("platform/postgres              {}", &missed[..8])),
        "{status}"
    );

    // The webhook comes after all: its commit is synced already, and nothing runs again.
    let payload =
        pipeline
            .fixture
            .push_payload(&before, &missed, &["platform/01.postgres/compose.yaml"]);
    let (code, answer) = pipeline.webhook("push", "delivery-late", &payload).await;
    assert_eq!(code, 200, "{answer}");
    let late = wait_for("the late webhook's final status", FINAL, || {
        let shown = github
            .shown(&missed, CONTEXT)
            .filter(|s| s.description().starts_with("Superseded"));
        async move { shown }
    })
    .await;
    assert_eq!(late.state(), "success");
    assert_eq!(
        late.description(),
        format!("Superseded: synced as part of {}", &missed[..8])
    );
    assert_eq!(ran_at(&pipeline, &missed), ["postgres.sync"]);
}

#[tokio::test]
async fn status_marks_drift_only_for_the_service_the_unsynced_branch_head_changes() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("worker", "RECONCILE_INTERVAL", "1");
    let _services = pipeline.start_all().await;
    pipeline.push_change("platform/02.redis/compose.yaml").await;
    let (synced, _, _) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    github
        .wait_for_shown(&synced, CONTEXT, "success", FINAL)
        .await;
    wait_for_applied_head(&pipeline, &synced).await;

    // Pushed without a webhook; its sync is slow, so `status` is read while it is behind.
    pipeline
        .fixture
        .set_behaviour("platform/01.postgres", 8.0, 0);
    let missed = pipeline.fixture.change("platform/01.postgres/compose.yaml");
    wait_for("the missed commit's sync to start", FINAL, || {
        let started = pipeline
            .fixture
            .runs()
            .iter()
            .any(|r| r.phase == "start" && r.commit.as_deref() == Some(missed.as_str()));
        async move { started.then_some(()) }
    })
    .await;

    let (ok, status, err) = pipeline.operator("iac-worker", &["status"]);
    assert!(ok, "{err}");
    let line_of = |service: &str| {
        status
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{service} ")))
            .unwrap_or_else(|| panic!("no line for {service} in:\n{status}"))
    };
    assert!(
        status.contains(&format!(
            "  branch head {} not synced yet (seen",
            &missed[..8]
        )),
        "{status}"
    );
    assert!(!status.contains("drift unknown"), "{status}");
    assert!(line_of("platform/postgres").ends_with(" drift"), "{status}");
    assert!(line_of("platform/redis").ends_with(" -"), "{status}");

    // Once synced, nothing is behind.
    wait_for_applied_head(&pipeline, &missed).await;
    let (_, status, _) = pipeline.operator("iac-worker", &["status"]);
    assert!(!status.contains("drift"), "{status}");
    assert!(!status.contains("not synced yet"), "{status}");
}

#[tokio::test]
async fn two_workers_reconciling_at_once_publish_the_missed_commit_once() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("worker", "RECONCILE_INTERVAL", "0");
    let _gateway = pipeline.start_gateway().await;
    let _reporter = pipeline.start_reporter();
    let worker = pipeline.start_worker();
    let (first, _, _) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    github
        .wait_for_shown(&first, CONTEXT, "success", FINAL)
        .await;
    // Its applied state is written just after its result.
    wait_for_applied_head(&pipeline, &first).await;
    drop(worker);

    let missed = pipeline.fixture.change("platform/01.postgres/compose.yaml");
    // Both check once, at start, side by side.
    pipeline.set_env("worker", "RECONCILE_INTERVAL", "1h");
    let _one = pipeline.start_worker();
    let _two = pipeline.start_worker();

    github
        .wait_for_shown(&missed, CONTEXT, "success", FINAL)
        .await;
    let published: Vec<PushEvent> = stored_pushes(&pipeline)
        .await
        .into_iter()
        .filter(|push| push.after.as_deref() == Some(missed.as_str()))
        .collect();
    assert_eq!(published.len(), 1, "{published:?}");
    assert!(published[0].delivery_id.starts_with("reconcile-"));
    assert_eq!(ran_at(&pipeline, &missed), ["postgres.sync"]);
}

#[tokio::test]
async fn with_no_applied_state_the_branch_head_becomes_the_baseline_and_nothing_syncs() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _worker = pipeline.start_worker();
    let head = pipeline.fixture.head();

    let status = wait_for("the baseline to be shown", FINAL, || {
        let (_, status, _) = pipeline.operator("iac-worker", &["status"]);
        async move { status.contains("baseline").then_some(status) }
    })
    .await;
    assert!(
        status.contains(&format!("applied production: baseline {}", &head[..8])),
        "{status}"
    );
    assert!(status.contains("nothing synced"), "{status}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pipeline.fixture.runs().is_empty(), "nothing ran");
    assert!(
        stored_pushes(&pipeline).await.is_empty(),
        "nothing published"
    );
}
