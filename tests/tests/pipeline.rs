//! The whole pipeline end to end, as a user sees it: a signed push to the gateway, the worker
//! running the real `invoke` task in the fixture repository, and the commit status at (fake)
//! GitHub going from pending to its final state.

use std::time::Duration;

use iac_tests::fake_github::{FakeGithub, StatusRequest};
use iac_tests::pipeline::{Pipeline, TOKEN};
use iac_tests::wait_for;

const CONTEXT: &str = "IaC Runner / Sync";

/// Every status GitHub accepted for `commit`, in arrival order, once one is `state`.
async fn wait_for_final(github: &FakeGithub, commit: &str, state: &str) -> Vec<StatusRequest> {
    wait_for(
        &format!("a {state} status on {commit}"),
        Duration::from_secs(60),
        || async {
            let seen: Vec<StatusRequest> = github
                .accepted()
                .into_iter()
                .filter(|r| r.commit == commit && r.context() == CONTEXT)
                .collect();
            seen.iter().any(|r| r.state() == state).then_some(seen)
        },
    )
    .await
}

#[tokio::test]
async fn a_signed_push_syncs_the_changed_service_and_github_sees_pending_then_success() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let _reporter = pipeline.start_reporter();

    let (commit, status, answer) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["services"], serde_json::json!(["platform/postgres"]));
    assert_eq!(answer["commit"], &commit[..8]);

    let seen = wait_for_final(&github, &commit, "success").await;
    let first_success = seen.iter().position(|r| r.state() == "success").unwrap();
    assert!(
        seen[..first_success].iter().any(|r| r.state() == "pending"),
        "pending before success: {seen:?}"
    );
    assert_eq!(
        seen[first_success].description(),
        "1 service(s) synced successfully"
    );
    assert_eq!(github.shown(&commit, CONTEXT).unwrap().state(), "success");

    let runs: Vec<_> = pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end")
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].task.as_deref(), Some("postgres.sync"));
    assert_eq!(runs[0].commit.as_deref(), Some(commit.as_str()));
    assert_eq!(
        seen[0].headers.get("authorization"),
        Some(&format!("Bearer {TOKEN}"))
    );
    // Dropping the processes checks that none of them logged a secret.
}

#[tokio::test]
async fn a_failing_task_turns_the_commit_status_to_failure() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let _reporter = pipeline.start_reporter();

    pipeline.fixture.set_behaviour("platform/02.redis", 0.0, 3);
    let (commit, status, answer) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    assert_eq!(status, 200, "{answer}");

    let seen = wait_for_final(&github, &commit, "failure").await;
    let failure = seen.iter().find(|r| r.state() == "failure").unwrap();
    assert_eq!(failure.description(), "1/1 service(s) failed to sync");
    assert_eq!(pipeline.fixture.finished_tasks(), ["redis.sync"]);
}
