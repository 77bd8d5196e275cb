//! The whole pipeline end to end, as a user sees it: a signed push to the gateway, the worker
//! running the real `invoke` task in the fixture repository, and the commit status at (fake)
//! GitHub going from pending to its final state.

use std::time::Duration;

use iac_tests::pipeline::{Pipeline, SECRET, TOKEN};
use iac_tests::wait_for;
use serde_json::Value;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn fake_github() -> MockServer {
    let github = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/repos/acme/infra/statuses/[0-9a-f]{40}$"))
        .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"id": 1})))
        .mount(&github)
        .await;
    github
}

/// (state, description) of every status GitHub received for `commit`, in arrival order.
async fn statuses(github: &MockServer, commit: &str) -> Vec<(String, String)> {
    github
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path().ends_with(commit))
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            (
                body["state"].as_str().unwrap_or_default().to_string(),
                body["description"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn wait_for_final(github: &MockServer, commit: &str, state: &str) -> Vec<(String, String)> {
    wait_for(
        &format!("a {state} status on {commit}"),
        Duration::from_secs(60),
        || async {
            let seen = statuses(github, commit).await;
            seen.iter().any(|(s, _)| s == state).then_some(seen)
        },
    )
    .await
}

#[tokio::test]
async fn a_signed_push_syncs_the_changed_service_and_github_sees_pending_then_success() {
    let github = fake_github().await;
    let pipeline = Pipeline::new(&github.uri());
    let gateway = pipeline.start_gateway().await;
    let worker = pipeline.start_worker();
    let reporter = pipeline.start_reporter();

    let (commit, status, answer) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["services"], serde_json::json!(["platform/postgres"]));
    assert_eq!(answer["commit"], &commit[..8]);

    let seen = wait_for_final(&github, &commit, "success").await;
    let first_success = seen.iter().position(|(s, _)| s == "success").unwrap();
    assert!(
        seen[..first_success].iter().any(|(s, _)| s == "pending"),
        "pending before success: {seen:?}"
    );
    assert_eq!(seen.last().unwrap().0, "success", "{seen:?}");
    assert_eq!(seen[first_success].1, "1 service(s) synced successfully");

    let runs: Vec<_> = pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end")
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].task.as_deref(), Some("postgres.sync"));
    assert_eq!(runs[0].commit.as_deref(), Some(commit.as_str()));

    let request = github.received_requests().await.unwrap().remove(0);
    assert_eq!(
        request.headers.get("authorization").unwrap(),
        &format!("Bearer {TOKEN}")
    );

    for process in [&gateway, &worker, &reporter] {
        let output = process.output();
        assert!(!output.is_empty(), "{} logged nothing", process.name);
        assert!(
            !output.contains(SECRET),
            "{} logged the webhook secret",
            process.name
        );
        assert!(
            !output.contains(TOKEN),
            "{} logged the GitHub token",
            process.name
        );
    }
}

#[tokio::test]
async fn a_failing_task_turns_the_commit_status_to_failure() {
    let github = fake_github().await;
    let pipeline = Pipeline::new(&github.uri());
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let _reporter = pipeline.start_reporter();

    pipeline.fixture.set_behaviour("platform/02.redis", 0.0, 3);
    let (commit, status, answer) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    assert_eq!(status, 200, "{answer}");

    let seen = wait_for_final(&github, &commit, "failure").await;
    let (_, description) = seen.iter().find(|(s, _)| s == "failure").unwrap();
    assert_eq!(description, "1/1 service(s) failed to sync");
    assert_eq!(pipeline.fixture.finished_tasks(), ["redis.sync"]);
}
