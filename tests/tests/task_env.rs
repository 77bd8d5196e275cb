//! What a task receives and what it never can, against the real binaries, NATS, git and
//! `invoke`: the environment is built (base, `TASK_ENV_PASS`, `TASK_ENV_FILE` read at every
//! sync), secrets are masked in output and results, and a hook a task plants never runs.

use std::collections::BTreeSet;
use std::time::Duration;

use iac_shared::events::{FinishedState, SyncOutcome};
use iac_tests::fake_github::FakeGithub;
use iac_tests::pipeline::Pipeline;
use iac_tests::process::ServiceProcess;
use iac_tests::wait_for;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const POSTGRES: &str = "platform/01.postgres";
const VAULT_TOKEN: &str = "s.vault-token-4f8e2a";
const WORKER_GITHUB_TOKEN: &str = "ghp_workerOwnToken9d8c7b6a";

/// A pipeline whose worker holds a secret of its own, passes `DOKPLOY_URL`, and reads
/// `TASK_ENV_FILE` from the fixture's scratch space.
fn pipeline(github: &FakeGithub) -> (Pipeline, std::path::PathBuf) {
    let mut pipeline = Pipeline::new(&github.url());
    let env_file = pipeline.fixture.scratch("secrets").join("task.env");
    for (key, value) in [
        ("TASK_ENV_PASS", "DOKPLOY_URL"),
        ("DOKPLOY_URL", "https://dokploy.example"),
        ("UNPASSED_SETTING", "kept-from-tasks"),
        ("GITHUB_TOKEN", WORKER_GITHUB_TOKEN),
        ("TASK_ENV_FILE", env_file.to_str().unwrap()),
    ] {
        pipeline.set_env("worker", key, value);
    }
    (pipeline, env_file)
}

fn task_env_names(pipeline: &Pipeline) -> BTreeSet<String> {
    let run = pipeline
        .fixture
        .runs()
        .into_iter()
        .rfind(|r| r.phase == "start")
        .expect("a task ran");
    run.env.keys().cloned().collect()
}

#[tokio::test]
async fn a_task_gets_the_base_the_passed_names_and_the_env_file_and_never_the_workers_secrets() {
    let github = FakeGithub::start().await;
    let (pipeline, env_file) = pipeline(&github);
    std::fs::write(&env_file, format!("VAULT_TOKEN={VAULT_TOKEN}\nMODE=prod\n")).unwrap();
    pipeline.fixture.set_behaviour_json(
        POSTGRES,
        json!({"exit": 3, "echo_env": ["VAULT_TOKEN", "GITHUB_TOKEN", "MODE"]}),
    );
    let _gateway = pipeline.start_gateway().await;
    let worker = pipeline
        .start_worker()
        .forbid_in_output(&[VAULT_TOKEN, WORKER_GITHUB_TOKEN]);

    let (commit, status, _) = pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    assert_eq!(status, 200);
    let finished = pipeline.finished_at(&commit).await;

    let names = task_env_names(&pipeline);
    let allowed: BTreeSet<&str> = [
        "PATH",
        "HOME",
        "LANG",
        "TZ",
        "LC_CTYPE", // Python's own locale coercion (PEP 538)
        "DOKPLOY_URL",
        "VAULT_TOKEN",
        "MODE",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "IAC_SERVICE",
        "IAC_TASK",
        "IAC_COMMIT",
        "IAC_FORCE",
        // Pushes deploy to PUSH_ENV (production by default).
        "DEPLOY_ENV",
        "ENV_SUFFIX",
        "ENV_DOMAIN_SUFFIX",
    ]
    .into();
    let unexpected: Vec<&String> = names
        .iter()
        .filter(|n| !allowed.contains(n.as_str()))
        .collect();
    assert!(unexpected.is_empty(), "the task saw {unexpected:?}");
    for wanted in ["PATH", "DOKPLOY_URL", "VAULT_TOKEN", "MODE", "IAC_COMMIT"] {
        assert!(names.contains(wanted), "{wanted} missing from {names:?}");
    }

    // The failed task printed its secrets: the result and the worker's log show them masked.
    let service = &finished.services[0];
    assert_eq!(service.outcome, SyncOutcome::Failed);
    let tail = service.output_tail.join("\n");
    assert!(tail.contains("VAULT_TOKEN=***"), "{tail}");
    assert!(tail.contains("GITHUB_TOKEN=None"), "{tail}");
    assert!(
        tail.contains("MODE=prod"),
        "short values are not masked: {tail}"
    );
    assert!(!tail.contains(VAULT_TOKEN), "{tail}");
    assert!(
        worker.output().contains("VAULT_TOKEN=***"),
        "the worker logs the task's output, masked"
    );

    // A rotated secret applies at the next sync, with no restart.
    std::fs::write(&env_file, "VAULT_TOKEN=rotated-token-2\n").unwrap();
    pipeline.fixture.set_behaviour_json(POSTGRES, json!({}));
    let (rotated, _, _) = pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    assert_eq!(
        pipeline.finished_at(&rotated).await.state,
        FinishedState::Success
    );
    let last = pipeline
        .fixture
        .runs()
        .into_iter()
        .rfind(|r| r.phase == "start")
        .unwrap();
    assert_eq!(
        last.env.get("VAULT_TOKEN").map(String::as_str),
        Some("rotated-token-2")
    );
    assert!(
        !last.env.contains_key("MODE"),
        "the file is read anew, not merged"
    );
}

#[tokio::test]
async fn a_missing_env_file_ends_the_sync_in_error_naming_it_and_nothing_runs() {
    let github = FakeGithub::start().await;
    let (pipeline, env_file) = pipeline(&github);
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();

    let (commit, status, _) = pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    assert_eq!(status, 200);
    let finished = pipeline.finished_at(&commit).await;
    assert_eq!(finished.state, FinishedState::Error);
    let reason = finished.error.unwrap_or_default();
    assert!(
        reason.contains("TASK_ENV_FILE") && reason.contains(env_file.to_str().unwrap()),
        "{reason}"
    );
    assert!(pipeline.fixture.runs().is_empty(), "no task may run");
}

#[tokio::test]
async fn a_git_hook_planted_by_a_task_never_runs() {
    let github = FakeGithub::start().await;
    let (pipeline, env_file) = pipeline(&github);
    std::fs::write(&env_file, "").unwrap();
    pipeline
        .fixture
        .set_behaviour_json(POSTGRES, json!({"plant_hook": true}));
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();

    let (planted, _, _) = pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    assert_eq!(
        pipeline.finished_at(&planted).await.state,
        FinishedState::Success
    );
    // The next sync fetches and checks out in the checkout the task planted its hooks in.
    pipeline.fixture.set_behaviour_json(POSTGRES, json!({}));
    let (next, _, _) = pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    assert_eq!(
        pipeline.finished_at(&next).await.state,
        FinishedState::Success
    );
    assert!(!pipeline.fixture.hook_ran(), "a planted git hook ran");
}

#[tokio::test]
async fn passing_a_worker_secret_to_tasks_stops_the_worker_at_start() {
    let github = FakeGithub::start().await;
    let (mut pipeline, _) = pipeline(&github);
    pipeline.set_env("worker", "TASK_ENV_PASS", "DOKPLOY_URL,WEBHOOK_SECRET");
    let mut worker: ServiceProcess = pipeline.start_worker();
    let exited = wait_for("the worker to refuse its settings", WAIT, || {
        let running = worker.is_running();
        async move { (!running).then_some(()) }
    });
    exited.await;
    let output = worker.output();
    assert!(
        output.contains("TASK_ENV_PASS") && output.contains("WEBHOOK_SECRET"),
        "{output}"
    );
}
