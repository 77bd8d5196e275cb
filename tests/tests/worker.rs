//! The worker against real parts: a real nats-server, a real git fixture monorepo and the
//! pinned `invoke`. Events are published as the gateway (or an operator with `nats pub`)
//! would, and the tests read back what the tasks recorded and what the worker published.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use iac_shared::events::{FinishedState, NULL_COMMIT, SyncFinished, SyncOutcome};
use iac_shared::names::*;
use iac_tests::fixture::{Fixture, TaskRun};
use iac_tests::free_port;
use iac_tests::tools::project_binary;
use iac_tests::worker_harness::WorkerHarness as Harness;

const WAIT: Duration = Duration::from_secs(60);
const POSTGRES: &str = "platform/01.postgres";
const REDIS: &str = "platform/02.redis";
const APP: &str = "finance_report/finance_report/10.app";

/// One task process: its start record and, unless it was killed, its end.
#[derive(Debug)]
struct Run {
    task: String,
    commit: String,
    pid: u32,
    cwd: String,
    start: f64,
    end: Option<f64>,
}

fn task_runs(fixture: &Fixture) -> Vec<Run> {
    let records: Vec<TaskRun> = fixture.runs();
    let mut runs: Vec<Run> = records
        .iter()
        .filter(|r| r.phase == "start")
        .map(|r| Run {
            task: r.task.clone().unwrap_or_default(),
            commit: r.commit.clone().unwrap_or_default(),
            pid: r.pid,
            cwd: r.cwd.clone(),
            start: r.t,
            end: None,
        })
        .collect();
    for end in records.iter().filter(|r| r.phase == "end") {
        if let Some(run) = runs
            .iter_mut()
            .find(|run| run.pid == end.pid && run.end.is_none())
        {
            run.end = Some(end.t);
        }
    }
    runs.sort_by(|a, b| a.start.total_cmp(&b.start));
    runs
}

fn tasks(runs: &[Run]) -> Vec<&str> {
    let mut tasks: Vec<&str> = runs.iter().map(|r| r.task.as_str()).collect();
    tasks.sort_unstable();
    tasks
}

/// Fails if one task started before the previous one ended.
fn assert_no_overlap(runs: &[Run]) {
    for pair in runs.windows(2) {
        let end = pair[0].end.expect("every run but a killed one ends");
        assert!(
            pair[1].start >= end,
            "{} (pid {}) started before {} (pid {}) ended: {runs:#?}",
            pair[1].task,
            pair[1].pid,
            pair[0].task,
            pair[0].pid
        );
    }
}

fn outcome_of(finished: &SyncFinished, service: &str) -> SyncOutcome {
    finished
        .services
        .iter()
        .find(|s| s.service == service)
        .unwrap_or_else(|| panic!("{service} in {finished:#?}"))
        .outcome
}

/// True while the process exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_postgres_change_runs_exactly_postgres_sync_at_that_commit() {
    let h = Harness::new().await;
    let workspace = h.workspace("ws");
    let worker = h.start(&workspace, &[]);
    let (commit, seq) = h.push_change(&format!("{POSTGRES}/compose.yaml")).await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(finished.commit.as_deref(), Some(commit.as_str()));
    assert_eq!(finished.totals.synced, 1);
    assert_eq!(
        outcome_of(&finished, "platform/postgres"),
        SyncOutcome::Synced
    );
    let runs = task_runs(&h.fixture);
    assert_eq!(tasks(&runs), ["postgres.sync"]);
    assert_eq!(runs[0].commit, commit);
    let checkout = workspace.join("infra");
    assert_eq!(Path::new(&runs[0].cwd), checkout.canonicalize().unwrap());
    assert_eq!(
        iac_tests::fixture::git(&checkout, &["rev-parse", "HEAD"]).trim(),
        commit
    );

    let started = h.started_for(seq).await;
    assert_eq!(started.services, ["platform/postgres"]);
    assert_eq!(started.commit, commit);
    assert_eq!(started.repository.as_deref(), Some("acme/infra"));
    let (headers, _) = h
        .results::<SyncFinished>(FINISHED_SUBJECT)
        .await
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(
        headers.get(EVENT_ID_HEADER).map(|v| v.as_str()),
        Some(finished.event_id.as_str())
    );
    assert!(finished.event_id.starts_with("delivery-"));
    worker.stop().await;
}

#[tokio::test]
async fn a_libs_change_runs_every_platform_and_finance_task_and_no_bootstrap_task() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let (_, seq) = h.push_change("libs/shared.py").await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(finished.totals.synced, 3);
    assert_eq!(
        tasks(&task_runs(&h.fixture)),
        ["fr-app.sync", "postgres.sync", "redis.sync"]
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_bootstrap_change_runs_nothing_and_reports_success() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let (_, seq) = h.push_change("bootstrap/01.vault/compose.yaml").await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success);
    assert_eq!(finished.totals.total, 0);
    assert!(task_runs(&h.fixture).is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn a_push_of_many_commits_runs_the_service_changed_in_the_first_one() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let before = h.fixture.head();
    h.fixture.change(&format!("{REDIS}/compose.yaml"));
    for i in 0..24 {
        h.fixture.change(&format!("docs/note-{i}.md"));
    }
    let after = h.fixture.head();
    // GitHub lists at most the last commits' files; this payload names only the last one.
    let seq = h.push(&before, &after, &["docs/note-23.md"]).await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(tasks(&task_runs(&h.fixture)), ["redis.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn a_new_branch_push_uses_the_paths_of_the_payload() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let after = h.fixture.change(&format!("{POSTGRES}/compose.yaml"));
    // Without a previous head git cannot diff: the payload's list decides.
    let seq = h
        .push(NULL_COMMIT, &after, &[&format!("{REDIS}/compose.yaml")])
        .await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(tasks(&task_runs(&h.fixture)), ["redis.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn a_force_push_whose_previous_head_is_unknown_uses_the_paths_of_the_payload() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let after = h.fixture.change(&format!("{POSTGRES}/compose.yaml"));
    let gone = "1111111111111111111111111111111111111111";
    let seq = h
        .push(gone, &after, &[&format!("{APP}/compose.yaml")])
        .await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(tasks(&task_runs(&h.fixture)), ["fr-app.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn hand_published_sync_requests_run_the_named_services_or_all_and_report_unknown_ones() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let head = h.fixture.head();

    let one = h
        .publish_bare(SYNC_SUBJECT, r#"{"services":["platform/postgres"]}"#)
        .await;
    let finished = h.finished_for(one).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(finished.event_id, format!("seq-{one}"));
    assert_eq!(finished.commit.as_deref(), Some(head.as_str()));
    assert_eq!(tasks(&task_runs(&h.fixture)), ["postgres.sync"]);

    let all = h.publish_bare(SYNC_SUBJECT, r#"{"all": true}"#).await;
    let finished = h.finished_for(all).await;
    assert_eq!(finished.totals.synced, 3, "{finished:#?}");
    assert_eq!(task_runs(&h.fixture).len(), 4);

    let unknown = h
        .publish_bare(
            SYNC_SUBJECT,
            r#"{"services":["platform/redis","platform/nosuch"]}"#,
        )
        .await;
    let finished = h.finished_for(unknown).await;
    assert_eq!(finished.state, FinishedState::Failure, "{finished:#?}");
    assert_eq!(outcome_of(&finished, "platform/redis"), SyncOutcome::Synced);
    assert_eq!(
        outcome_of(&finished, "platform/nosuch"),
        SyncOutcome::Unknown
    );
    assert_eq!(finished.totals.unknown, 1);
    let runs = task_runs(&h.fixture);
    assert_eq!(
        runs.len(),
        5,
        "the unknown service was not guessed: {runs:#?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_forced_sync_request_tells_the_task() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let seq = h
        .publish_bare(
            SYNC_SUBJECT,
            r#"{"services":["platform/redis"],"force":true}"#,
        )
        .await;
    h.finished_for(seq).await;
    let runs = h.fixture.runs();
    assert!(runs.iter().all(|r| r.force), "{runs:#?}");
    worker.stop().await;
}

#[tokio::test]
async fn two_workers_never_run_syncs_at_the_same_time() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(POSTGRES, 0.7, 0);
    h.fixture.commit("slow postgres");
    let first = h.start(&h.workspace("ws-a"), &[]);
    let second = h.start(&h.workspace("ws-b"), &[]);

    let mut expected = Vec::new();
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let (commit, seq) = h.push_change(&format!("{POSTGRES}/compose.yaml")).await;
        expected.push(commit);
        seqs.push(seq);
        if seqs.len() == 1 {
            // Pushes queued behind a sync are synced once, as the newest: the first is
            // under way before the others come, so there are two syncs to keep apart.
            h.wait_for(
                "the first sync to start",
                Duration::from_secs(30),
                || async { (!task_runs(&h.fixture).is_empty()).then_some(()) },
            )
            .await;
        }
    }
    for seq in &seqs {
        let finished = h.finished_for(*seq).await;
        assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    }
    let runs = task_runs(&h.fixture);
    assert!(runs.len() >= 2, "{runs:#?}");
    assert_no_overlap(&runs);
    let commits: Vec<&str> = runs.iter().map(|r| r.commit.as_str()).collect();
    let mut pushed = expected.iter();
    assert!(
        commits.iter().all(|c| pushed.any(|e| e == c)),
        "the syncs ran at pushed commits, in order: {commits:?} of {expected:?}"
    );
    assert_eq!(commits.last().copied(), expected.last().map(String::as_str));
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_sync_cut_short_by_a_crashed_worker_runs_again_without_overlap() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(REDIS, 3.0, 0);
    h.fixture.commit("slow redis");
    let workspace = h.workspace("ws");
    let args = h.args(&workspace, &["--worker-ack-wait", "2s"]);
    let mut crashing = h.spawn_process(&args, &[], h.workspace("logs").join("a.log"));
    let (commit, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;

    let killed = h
        .wait_for("the first run of redis.sync", WAIT, || async {
            task_runs(&h.fixture).into_iter().next()
        })
        .await;
    crashing.kill();
    // A standby on another machine (its own workspace) takes the event over once the ack
    // wait runs out; only the kernel's parent-death signal stopped the first run.
    let standby = h.start(&h.workspace("ws-standby"), &["--worker-ack-wait", "2s"]);

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(finished.commit.as_deref(), Some(commit.as_str()));
    let runs = task_runs(&h.fixture);
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(runs[0].pid, killed.pid);
    assert_eq!(
        runs[0].end, None,
        "the first run died with its worker: {runs:#?}"
    );
    assert!(
        !process_alive(killed.pid),
        "the first run's process is gone"
    );
    assert!(runs[1].end.is_some());
    assert_eq!(h.finished().await.len(), 1, "one finished result");
    standby.stop().await;
}

#[tokio::test]
async fn a_task_past_its_timeout_is_killed_and_reported_timed_out() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(POSTGRES, 60.0, 0);
    h.fixture.commit("hanging postgres");
    let worker = h.start(&h.workspace("ws"), &["--sync-timeout", "1s"]);
    let (_, seq) = h.push_change("libs/shared.py").await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Failure, "{finished:#?}");
    assert_eq!(
        outcome_of(&finished, "platform/postgres"),
        SyncOutcome::TimedOut
    );
    assert_eq!(outcome_of(&finished, "platform/redis"), SyncOutcome::Synced);
    assert_eq!(finished.totals.timed_out, 1);
    let runs = task_runs(&h.fixture);
    let hung = runs.iter().find(|r| r.task == "postgres.sync").unwrap();
    assert_eq!(hung.end, None);
    assert!(!process_alive(hung.pid), "the timed-out task was killed");
    worker.stop().await;
}

#[tokio::test]
async fn a_failing_task_is_reported_with_its_exit_code_and_output_and_the_others_still_run() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(POSTGRES, 0.0, 3);
    h.fixture.commit("broken postgres");
    let worker = h.start(&h.workspace("ws"), &[]);
    let (_, seq) = h.push_change("libs/shared.py").await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Failure, "{finished:#?}");
    let postgres = finished
        .services
        .iter()
        .find(|s| s.service == "platform/postgres")
        .unwrap();
    assert_eq!(postgres.outcome, SyncOutcome::Failed);
    assert_eq!(postgres.exit_code, Some(3));
    assert!(
        postgres
            .output_tail
            .iter()
            .any(|l| l.contains("deploy of 01.postgres failed: boom")),
        "{postgres:#?}"
    );
    assert_eq!(finished.totals.synced, 2);
    assert_eq!(finished.totals.failed, 1);
    assert_eq!(
        h.fixture.finished_tasks().len(),
        3,
        "the tasks after the failure ran"
    );
    worker.stop().await;
}

#[tokio::test]
async fn an_unknown_commit_is_reported_as_an_error_and_the_next_event_still_runs() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let head = h.fixture.head();
    let missing = "2222222222222222222222222222222222222222";
    let bad = h.push(&head, missing, &[&format!("{POSTGRES}/x")]).await;

    let finished = h.finished_for(bad).await;
    assert_eq!(finished.state, FinishedState::Error, "{finished:#?}");
    let error = finished.error.unwrap();
    assert!(
        error.starts_with("Failed to update git repository: "),
        "{error}"
    );
    assert!(error.contains(missing), "{error}");

    let (_, good) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    assert_eq!(h.finished_for(good).await.state, FinishedState::Success);
    assert_eq!(tasks(&task_runs(&h.fixture)), ["redis.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn a_malformed_request_is_reported_as_an_error_and_the_next_message_flows() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let bad = h
        .publish_bare(SYNC_SUBJECT, r#"{"services": "platform/postgres"}"#)
        .await;
    let not_json = h.publish_bare(SYNC_SUBJECT, "sync postgres please").await;
    let good = h
        .publish_bare(SYNC_SUBJECT, r#"{"services":["platform/postgres"]}"#)
        .await;

    for seq in [bad, not_json] {
        let finished = h.finished_for(seq).await;
        assert_eq!(finished.state, FinishedState::Error, "{finished:#?}");
        assert!(
            finished
                .error
                .as_deref()
                .unwrap()
                .starts_with("Invalid sync request"),
            "{finished:#?}"
        );
    }
    assert_eq!(h.finished_for(good).await.state, FinishedState::Success);
    assert_eq!(tasks(&task_runs(&h.fixture)), ["postgres.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn repository_credentials_never_reach_the_logs_or_the_results() {
    let h = Harness::new().await;
    let secret = "s3cr3t-t0ken-4e1f";
    let url = format!(
        "http://deploy:{secret}@127.0.0.1:{}/acme/infra.git",
        free_port()
    );
    let workspace = h.workspace("ws");
    let mut args = h.args(&workspace, &[]);
    let at = args.iter().position(|a| a == "--git-repo-url").unwrap();
    args.drain(at..=at + 1);
    let env = [("GIT_REPO_URL", url.as_str())];

    let help = Command::new(project_binary("iac-worker"))
        .arg("--help")
        .envs(env)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains(secret));

    let mut worker = h.spawn_process(&args, &env, h.workspace("logs").join("w.log"));
    let seq = h.publish_bare(SYNC_SUBJECT, r#"{"all": true}"#).await;
    let finished = h.finished_for(seq).await;
    let status = worker.terminate(WAIT).expect("the worker was running");
    assert_ne!(
        status.signal(),
        Some(libc::SIGKILL),
        "the worker did not exit after SIGTERM"
    );

    assert_eq!(finished.state, FinishedState::Error);
    let error = finished.error.clone().unwrap();
    assert!(
        error.starts_with("Failed to update git repository: "),
        "{error}"
    );
    assert_eq!(finished.repository.as_deref(), Some("acme/infra"));
    let stored = serde_json::to_string(&h.finished().await).unwrap();
    assert!(!stored.contains(secret), "{stored}");
    let output = worker.output();
    assert!(
        output.contains("Failed to update git repository"),
        "{output}"
    );
    assert!(output.contains("http://***@127.0.0.1"), "{output}");
    assert!(!output.contains(secret), "{output}");
}

#[tokio::test]
async fn the_metrics_count_syncs_and_tasks() {
    let h = Harness::new().await;
    let port = free_port();
    let worker = h.start(&h.workspace("ws"), &["--metrics-port", &port.to_string()]);
    let (_, seq) = h.push_change(&format!("{POSTGRES}/compose.yaml")).await;
    h.finished_for(seq).await;

    let body = h
        .wait_for("metrics with the sync", WAIT, || async {
            let body = http_get(port, "/metrics").await?;
            body.contains(r#"iac_worker_syncs_total{state="success"} 1"#)
                .then_some(body)
        })
        .await;
    assert!(
        body.contains(r#"iac_worker_tasks_total{outcome="synced"} 1"#),
        "{body}"
    );
    assert!(
        body.contains("iac_worker_task_duration_seconds_count 1"),
        "{body}"
    );
    assert!(body.contains("iac_worker_queue_depth"), "{body}");
    assert!(body.contains("iac_worker_replays_total 0"), "{body}");
    worker.stop().await;
}

/// A plain HTTP/1.0 GET on loopback; the body, or `None` while nothing answers.
async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

#[tokio::test]
async fn a_replayed_event_names_its_original_and_forces_the_tasks() {
    let h = Harness::new().await;
    let port = free_port();
    let worker = h.start(&h.workspace("ws"), &["--metrics-port", &port.to_string()]);
    let body = r#"{"services":["platform/redis"]}"#;
    let original = h.publish_bare(SYNC_SUBJECT, body).await;
    assert_eq!(h.finished_for(original).await.replay_of, None);
    let replay = h.replay(SYNC_SUBJECT, body, original, true).await;

    let finished = h.finished_for(replay).await;
    assert_eq!(finished.replay_of, Some(original));
    assert_eq!(h.started_for(replay).await.replay_of, Some(original));
    let forced: Vec<bool> = h
        .fixture
        .runs()
        .iter()
        .filter(|r| r.phase == "start")
        .map(|r| r.force)
        .collect();
    assert_eq!(forced, [false, true]);
    h.wait_for("the replay counted", WAIT, || async {
        http_get(port, "/metrics")
            .await
            .filter(|b| b.contains("iac_worker_replays_total 1"))
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn on_shutdown_a_short_task_finishes_and_its_event_is_acknowledged() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(REDIS, 1.0, 0);
    h.fixture.commit("redis takes a second");
    let worker = h.start(&h.workspace("ws"), &["--shutdown-grace", "20s"]);
    let (_, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    h.wait_for("redis.sync to start", WAIT, || async {
        task_runs(&h.fixture).into_iter().next()
    })
    .await;
    worker.stop().await;

    let finished = h.finished().await;
    assert_eq!(finished.len(), 1, "{finished:#?}");
    assert_eq!(finished[0].event_seq, seq);
    assert_eq!(finished[0].state, FinishedState::Success);
    let consumer =
        h.js.get_stream(EVENTS_STREAM)
            .await
            .unwrap()
            .consumer_info(WORKER_CONSUMER)
            .await
            .unwrap();
    assert_eq!(consumer.num_ack_pending, 0, "the event was acknowledged");
    assert_eq!(consumer.num_pending, 0);
}

#[tokio::test]
async fn on_shutdown_a_long_task_is_killed_after_the_grace_and_its_event_handed_back_at_once() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(REDIS, 3.0, 0);
    h.fixture.commit("slow redis");
    let workspace = h.workspace("ws");
    let worker = h.start(&workspace, &["--shutdown-grace", "200ms"]);
    let (commit, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    let first = h
        .wait_for("redis.sync to start", WAIT, || async {
            task_runs(&h.fixture).into_iter().next()
        })
        .await;
    worker.stop().await;
    assert!(!process_alive(first.pid), "the task was killed");
    assert!(h.finished().await.is_empty(), "nothing finished");

    // The default ack wait is 30 s: finishing well before it shows the event was handed back.
    let standby = h.start(&workspace, &[]);
    let finished = h
        .wait_for("the standby's result", Duration::from_secs(20), || async {
            h.finished().await.into_iter().find(|f| f.event_seq == seq)
        })
        .await;
    assert_eq!(finished.state, FinishedState::Success);
    assert_eq!(finished.commit.as_deref(), Some(commit.as_str()));
    let runs = task_runs(&h.fixture);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].end, None);
    assert_no_overlap(&runs[1..]);
    standby.stop().await;
}

#[tokio::test]
async fn an_event_whose_attempts_ran_out_is_reported_as_an_error_and_not_run_again() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(REDIS, 30.0, 0);
    h.fixture.commit("hanging redis");
    let workspace = h.workspace("ws");
    let args = h.args(
        &workspace,
        &["--worker-ack-wait", "1s", "--sync-max-attempts", "1"],
    );
    let mut crashing = h.spawn_process(&args, &[], h.workspace("logs").join("a.log"));
    let (commit, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    h.wait_for("the only attempt to start", WAIT, || async {
        task_runs(&h.fixture).into_iter().next()
    })
    .await;
    crashing.kill();
    let standby = h.start(
        &workspace,
        &["--worker-ack-wait", "1s", "--sync-max-attempts", "1"],
    );

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Error, "{finished:#?}");
    assert_eq!(finished.error.as_deref(), Some("gave up after 1 attempts"));
    // Where the attempt started, and what it left unfinished, so no status stays pending.
    assert_eq!(finished.commit.as_deref(), Some(commit.as_str()));
    let outcomes: Vec<_> = finished
        .services
        .iter()
        .map(|s| (s.service.as_str(), s.outcome))
        .collect();
    assert_eq!(outcomes, [("platform/redis", SyncOutcome::NotFinished)]);
    assert_eq!(task_runs(&h.fixture).len(), 1, "not run again");
    standby.stop().await;
}

#[tokio::test]
async fn a_task_left_running_in_the_workspace_is_killed_before_the_next_sync_starts() {
    let h = Harness::new().await;
    let workspace = h.workspace("ws");
    // What a worker that died mid-task leaves behind: a process group and its record.
    let mut orphan = Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .unwrap();
    std::fs::write(workspace.join(".sync.pgid"), orphan.id().to_string()).unwrap();
    let worker = h.start(&workspace, &[]);
    let (_, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;

    assert_eq!(h.finished_for(seq).await.state, FinishedState::Success);
    let status = orphan.try_wait().unwrap().expect("the orphan was killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!workspace.join(".sync.pgid").exists());
    worker.stop().await;
}
