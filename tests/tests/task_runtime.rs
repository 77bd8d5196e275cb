//! What a task receives and what the worker keeps of it, against real parts: a real
//! nats-server (with its 1 MB `max_payload`), a real git fixture monorepo and the pinned
//! `invoke`. The fixture has a `platform/__init__.py` package that would shadow the standard
//! library's `platform`, and every fixture task imports `uuid` and `libs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use iac_shared::events::{FinishedState, PushEvent, ServiceResult, SyncFinished, SyncOutcome};
use iac_shared::names::*;
use iac_shared::nats::{StreamSettings, provision};
use iac_shared::shutdown::{self, ShutdownTrigger};
use iac_tests::fixture::Fixture;
use iac_tests::nats::NatsServer;
use iac_tests::tools::invoke;
use iac_tests::{free_port, wait_for};
use iac_worker::Config;

const WAIT: Duration = Duration::from_secs(60);
const POSTGRES: &str = "platform/01.postgres";
const REDIS: &str = "platform/02.redis";

/// A nats-server, a fixture monorepo, and a worker started against them.
struct Harness {
    _nats: NatsServer,
    fixture: Fixture,
    js: jetstream::Context,
    nats_url: String,
}

/// A worker running in this process; stopped when dropped.
struct InProcessWorker {
    trigger: ShutdownTrigger,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessWorker {
    async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the worker stops after shutdown")
            .expect("the worker did not panic")
            .expect("the worker ended without error");
    }
}

impl Harness {
    async fn new() -> Self {
        let nats = NatsServer::start();
        let js = jetstream::new(nats.client().await);
        provision(&js, &StreamSettings::default()).await.unwrap();
        Harness {
            nats_url: nats.url(),
            _nats: nats,
            fixture: Fixture::new(),
            js,
        }
    }

    /// A worker with the default-shaped `SYNC_COMMAND` (`invoke {task}`, with the pinned
    /// invoke's path), `extra` flags appended.
    fn start(&self, extra: &[&str]) -> InProcessWorker {
        let workspace: PathBuf = self.fixture.scratch("ws");
        let mut args: Vec<String> = [
            "iac-worker",
            "--nats-url",
            &self.nats_url,
            "--git-repo-url",
            &self.fixture.url(),
            "--workspace",
            workspace.to_str().unwrap(),
            "--sync-command",
            &format!("{} {{task}}", invoke().display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = Config::from_args(args).unwrap();
        let (trigger, shutdown) = shutdown::channel();
        let handle = tokio::spawn(iac_worker::run(config, shutdown));
        InProcessWorker { trigger, handle }
    }

    /// A commit changing `path` (after what the test wrote), pushed and announced as the
    /// gateway stores it; returns the event's stream sequence.
    async fn push_change(&self, path: &str) -> u64 {
        let before = self.fixture.head();
        let after = self.fixture.change(path);
        let delivery_id = format!("delivery-{after}-{}", free_port());
        let event = PushEvent {
            delivery_id: delivery_id.clone(),
            repository: Some("acme/infra".into()),
            git_ref: "refs/heads/main".into(),
            before: Some(before),
            after: Some(after.clone()),
            head_commit: Some(after),
            pusher: Some("octocat".into()),
            paths: vec![path.to_string()],
            paths_truncated: false,
        };
        let message = PublishMessage::build()
            .payload(serde_json::to_vec(&event).unwrap().into())
            .message_id(&delivery_id)
            .header(EVENT_ID_HEADER, delivery_id.as_str());
        self.js
            .send_publish(PUSH_SUBJECT, message)
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// Waits for the finished result of the event stored at `seq`.
    async fn finished_for(&self, seq: u64) -> SyncFinished {
        let stream = self.js.get_stream(RESULTS_STREAM).await.unwrap();
        wait_for(
            &format!("the finished result of event {seq}"),
            WAIT,
            || async {
                let mut next = 1;
                while let Ok(message) = stream
                    .direct_get_next_for_subject(FINISHED_SUBJECT, Some(next))
                    .await
                {
                    next = message.sequence + 1;
                    let finished: SyncFinished =
                        serde_json::from_slice(&message.payload).expect("a result in the contract");
                    if finished.event_seq == seq {
                        return Some(finished);
                    }
                }
                None
            },
        )
        .await
    }
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
    let worker = h.start(&[]);
    let seq = h.push_change(&format!("{POSTGRES}/compose.yaml")).await;

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
    let worker = h.start(&["--output-tail-lines", "100"]);
    let flooded = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    let next = h.push_change(&format!("{POSTGRES}/compose.yaml")).await;

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
    let worker = h.start(&[]);
    let seq = h.push_change("platform/50.vault/compose.yaml").await;

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
    let worker = h.start(&[]);
    let seq = h.push_change("platform/-l/compose.yaml").await;

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
