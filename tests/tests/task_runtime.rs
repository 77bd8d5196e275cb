//! What a task receives and what the worker keeps of it, against real parts: a real
//! nats-server (with its 1 MB `max_payload`), a real git fixture monorepo and the pinned
//! `invoke`. The fixture has a `platform/__init__.py` package that would shadow the standard
//! library's `platform`, and every fixture task imports `uuid` and `libs`.

use std::path::Path;

use iac_shared::events::{FinishedState, ServiceResult, SyncFinished, SyncOutcome};
use iac_tests::services::InProcessWorker;
use iac_tests::worker_harness::WorkerHarness as Harness;

const POSTGRES: &str = "platform/01.postgres";
const REDIS: &str = "platform/02.redis";

/// A worker with the default-shaped `SYNC_COMMAND` (`invoke {task}`, with the pinned invoke's
/// path), `extra` flags appended.
fn start(h: &Harness, extra: &[&str]) -> InProcessWorker {
    h.start(&h.workspace("ws"), extra)
}

/// A commit changing `path` (after what the test wrote), pushed; the event's stream sequence.
async fn push_change(h: &Harness, path: &str) -> u64 {
    h.push_change(path).await.1
}

fn result_of<'a>(finished: &'a SyncFinished, service: &str) -> &'a ServiceResult {
    finished
        .services
        .iter()
        .find(|s| s.service == service)
        .unwrap_or_else(|| panic!("{service} in {finished:#?}"))
}

#[tokio::test]
async fn a_platform_package_at_the_root_does_not_shadow_the_standard_library() {
    let h = Harness::new().await;
    assert!(
        Path::new(h.fixture.work_tree())
            .join("platform/__init__.py")
            .exists()
    );
    let worker = start(&h, &[]);
    let seq = push_change(&h, &format!("{POSTGRES}/compose.yaml")).await;

    let finished = h.finished_for(seq).await;
    // The task imports `uuid` (which needs the standard `platform`) and `libs.fixture_sync`.
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(h.fixture.finished_tasks(), ["postgres.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn a_task_flooding_its_output_fails_with_a_cut_tail_and_the_queue_moves_on() {
    let h = Harness::new().await;
    // 100 lines of 60 KB and 5 MB without a newline: far more than one NATS message.
    h.fixture.write(
        &format!("{REDIS}/behaviour.json"),
        r#"{"exit": 1, "output_lines": 100, "line_bytes": 61440, "unterminated_bytes": 5000000}"#,
    );
    let worker = start(&h, &["--output-tail-lines", "100"]);
    let flooded = push_change(&h, &format!("{REDIS}/compose.yaml")).await;
    // Under way before the next push comes, which would otherwise be synced in its place.
    h.started_for(flooded).await;
    let next = push_change(&h, &format!("{POSTGRES}/compose.yaml")).await;

    let failed = h.finished_for(flooded).await;
    let redis = result_of(&failed, "platform/redis");
    assert_eq!(redis.outcome, SyncOutcome::Failed);
    assert_eq!(redis.exit_code, Some(1));
    let tail = &redis.output_tail;
    let ends: Vec<&str> = tail
        .iter()
        .map(|l| &l[l.floor_char_boundary(l.len().saturating_sub(60))..])
        .collect();
    // Each 60 KB line (6 digits and 61440 bytes) keeps its first 16 KiB.
    assert!(
        tail.iter().any(|l| l.ends_with("… [cut: 45062 bytes]")),
        "a long line is cut and marked: {ends:?}"
    );
    assert!(
        tail.iter().any(|l| l.ends_with("… [cut: 4983616 bytes]")),
        "output without a newline is cut and marked: {ends:?}"
    );
    assert!(
        tail.iter().all(|l| l.len() <= 16 * 1024 + 64),
        "no line is longer than 16 KiB and its mark"
    );
    assert!(
        tail[0].contains("earlier lines cut to fit the result in one message"),
        "the tail says that lines were dropped: {ends:?}"
    );
    assert!(
        tail.iter().any(|l| l == "deploy of 02.redis failed: boom"),
        "the end of the output is kept: {ends:?}"
    );

    let synced = h.finished_for(next).await;
    assert_eq!(synced.state, FinishedState::Success, "{synced:#?}");
    worker.stop().await;
}

#[tokio::test]
async fn a_service_sharing_its_task_with_a_bootstrap_service_is_refused_and_nothing_runs() {
    let h = Harness::new().await;
    // bootstrap/01.vault already answers to `vault.sync`.
    h.fixture.write(
        "platform/50.vault/deploy.py",
        "from invoke import task\n\n\n@task\ndef sync(c):\n    raise SystemExit('must not run')\n",
    );
    let worker = start(&h, &[]);
    let seq = push_change(&h, "platform/50.vault/compose.yaml").await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Failure, "{finished:#?}");
    let vault = result_of(&finished, "platform/vault");
    assert_eq!(vault.outcome, SyncOutcome::Failed);
    assert_eq!(vault.exit_code, None);
    let reason = vault.output_tail.join("\n");
    assert!(
        reason.contains("platform/50.vault") && reason.contains("bootstrap/01.vault"),
        "the refusal names both directories: {reason}"
    );
    assert!(h.fixture.runs().is_empty(), "{:?}", h.fixture.runs());
    worker.stop().await;
}

#[tokio::test]
async fn a_service_directory_named_like_an_option_is_refused_and_nothing_runs() {
    let h = Harness::new().await;
    h.fixture.write(
        "platform/-l/deploy.py",
        "from invoke import task\n\nfrom libs.fixture_sync import run_sync\n\n\n@task\ndef sync(c):\n    run_sync(__file__)\n",
    );
    let worker = start(&h, &[]);
    let seq = push_change(&h, "platform/-l/compose.yaml").await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Failure, "{finished:#?}");
    let refused = result_of(&finished, "platform/-l");
    assert_eq!(refused.outcome, SyncOutcome::Failed);
    let reason = refused.output_tail.join("\n");
    assert!(
        reason.contains("platform/-l") && reason.contains("'-'"),
        "the refusal says what is wrong: {reason}"
    );
    assert!(h.fixture.runs().is_empty(), "{:?}", h.fixture.runs());
    worker.stop().await;
}
