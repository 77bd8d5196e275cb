//! The whole pipeline end to end, as a user sees it: a signed push to the gateway, the worker
//! running the real `invoke` task in the fixture repository, and the commit status at (fake)
//! GitHub going from pending to its final state.

use std::time::Duration;

use iac_tests::fake_github::FakeGithub;
use iac_tests::pipeline::{Pipeline, TOKEN};
use iac_tests::wait_for;

const CONTEXT: &str = "IaC Runner / Sync";

/// How long a push may take to reach its final status.
const FINAL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_signed_push_syncs_the_changed_service_and_github_sees_pending_then_success() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _services = pipeline.start_all().await;

    let (commit, status, answer) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["services"], serde_json::json!(["platform/postgres"]));
    assert_eq!(answer["commit"], &commit[..8]);

    let seen = github
        .wait_for_accepted(&commit, CONTEXT, "success", FINAL)
        .await;
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
    let _services = pipeline.start_all().await;

    pipeline.fixture.set_behaviour("platform/02.redis", 0.0, 3);
    let (commit, status, answer) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    assert_eq!(status, 200, "{answer}");

    let seen = github
        .wait_for_accepted(&commit, CONTEXT, "failure", FINAL)
        .await;
    let failure = seen.iter().find(|r| r.state() == "failure").unwrap();
    assert_eq!(failure.description(), "1/1 service(s) failed to sync");
    assert_eq!(pipeline.fixture.finished_tasks(), ["redis.sync"]);
}

#[tokio::test]
async fn a_push_whose_commit_cannot_be_checked_out_turns_its_queued_status_to_error() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _services = pipeline.start_all().await;

    // GitHub names a commit the worker's remote does not have (a remote the worker cannot
    // read fails the same way): no sync can run, and the commit must not stay pending.
    let missing = "5".repeat(40);
    let payload =
        pipeline
            .fixture
            .push_payload(&pipeline.fixture.head(), &missing, &["platform/02.redis/a"]);
    let (status, answer) = pipeline.webhook("push", "delivery-missing", &payload).await;
    assert_eq!(status, 200, "{answer}");

    let seen = github
        .wait_for_accepted(&missing, CONTEXT, "error", FINAL)
        .await;
    assert_eq!(seen[0].state(), "pending", "queued first: {seen:?}");
    let error = github.shown(&missing, CONTEXT).unwrap();
    assert_eq!(error.state(), "error");
    assert!(
        error
            .description()
            .starts_with("Failed to update git repository"),
        "{error:?}"
    );
    assert!(pipeline.fixture.runs().is_empty(), "no task ran");
}

#[tokio::test]
async fn a_sync_given_up_after_its_last_attempt_leaves_no_status_pending() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("reporter", "STATUS_PER_SERVICE", "true");
    pipeline.set_env("worker", "WORKER_ACK_WAIT", "1s");
    pipeline.set_env("worker", "SYNC_MAX_ATTEMPTS", "1");
    let _gateway = pipeline.start_gateway().await;
    let _reporter = pipeline.start_reporter();
    let mut crashing = pipeline.start_worker();

    pipeline.fixture.set_behaviour("platform/02.redis", 30.0, 0);
    let (commit, status, answer) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    assert_eq!(status, 200, "{answer}");
    let redis = "IaC Runner / platform/redis";
    wait_for("redis to be shown syncing", Duration::from_secs(30), || {
        let shown = github.shown(&commit, redis);
        async move { shown.filter(|s| s.state() == "pending") }
    })
    .await;
    wait_for("redis.sync to start", Duration::from_secs(30), || {
        let started = pipeline
            .fixture
            .runs()
            .into_iter()
            .find(|r| r.phase == "start");
        async move { started }
    })
    .await;
    // The worker dies on its only attempt; a standby gives the event up.
    crashing.kill();
    let _standby = pipeline.start_worker();

    github
        .wait_for_accepted(&commit, CONTEXT, "error", FINAL)
        .await;
    let sync = github.shown(&commit, CONTEXT).unwrap();
    assert_eq!(
        (sync.state(), sync.description()),
        ("error", "gave up after 1 attempts")
    );
    let service = github.shown(&commit, redis).unwrap();
    assert_eq!(
        (service.state(), service.description()),
        ("error", "Not finished: the sync was given up")
    );
    let starts = pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "start")
        .count();
    assert_eq!(starts, 1, "not run again");
}

#[tokio::test]
async fn a_deployment_to_staging_runs_end_to_end_and_its_status_names_the_environment() {
    use iac_tests::gateway_client::{signed_now, timestamped_within};
    use iac_tests::pipeline::SECRET;

    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _services = pipeline.start_all().await;
    let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], pipeline.gateway_port()));
    let commit = pipeline.fixture.head();

    // As the original's CI asks: an exact commit, short service names, held until final.
    let body = serde_json::json!({
        "env": "staging",
        "ref": commit,
        "services": ["redis"],
        "triggered_by": "release workflow",
        "wait": true,
    })
    .to_string();
    let answer = timestamped_within(
        gateway,
        "/deploy",
        SECRET,
        body.as_bytes(),
        Duration::from_secs(60),
    )
    .await;
    let json = answer.json();
    assert_eq!(answer.status, 200, "{json}");
    assert_eq!(json["status"], "completed", "{json}");
    assert_eq!(json["requested_services"], serde_json::json!(["redis"]));
    let outcomes = &json["result"]["services"];
    assert_eq!(outcomes[0]["service"], "platform/redis", "{json}");
    assert_eq!(outcomes[0]["outcome"], "synced", "{json}");

    // The task ran once, in staging, on that commit.
    let runs: Vec<_> = pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end")
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].task.as_deref(), Some("redis.sync"));
    assert_eq!(runs[0].commit.as_deref(), Some(commit.as_str()));
    assert_eq!(
        runs[0].env.get("DEPLOY_ENV").map(String::as_str),
        Some("staging")
    );
    assert_eq!(
        runs[0].env.get("ENV_SUFFIX").map(String::as_str),
        Some("-staging")
    );

    // The commit's status names the environment, apart from the pushes' own context.
    let staging = "IaC Runner / Sync (staging)";
    github
        .wait_for_accepted(&commit, staging, "success", FINAL)
        .await;
    assert!(github.shown(&commit, CONTEXT).is_none());

    // Asked again, any gateway answers from the stored summary without running it again.
    let status_body = serde_json::json!({"env": "staging", "ref": commit}).to_string();
    let status = signed_now(gateway, "/deploy/status", SECRET, status_body.as_bytes()).await;
    assert_eq!(status.status, 200, "{}", status.text());
    assert_eq!(status.json()["status"], "completed");
    assert_eq!(pipeline.fixture.finished_tasks(), ["redis.sync"]);
}

#[tokio::test]
async fn a_deployment_stored_before_any_worker_started_runs_when_one_starts() {
    use iac_tests::gateway_client::signed_now;
    use iac_tests::pipeline::SECRET;

    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    for service in ["gateway", "worker"] {
        pipeline.set_env(service, "DEPLOY_ENVS", "qa,production");
    }
    // Only the gateway is up: it must have made qa's consumer before storing the deployment,
    // or a worker starting later would never see it.
    let _gateway = pipeline.start_gateway().await;
    let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], pipeline.gateway_port()));
    let commit = pipeline.fixture.head();
    let body = serde_json::json!({"env": "qa", "ref": commit, "services": ["redis"]}).to_string();
    let answer = signed_now(gateway, "/deploy", SECRET, body.as_bytes()).await;
    assert_eq!(answer.status, 202, "{}", answer.text());

    let _worker = pipeline.start_worker();
    wait_for("the qa deployment run", FINAL, || async {
        let runs = pipeline.fixture.runs();
        runs.iter()
            .find(|r| r.phase == "end" && r.task.as_deref() == Some("redis.sync"))
            .map(|r| r.env.get("DEPLOY_ENV").cloned())
    })
    .await
    .map(|env| assert_eq!(env, "qa"))
    .expect("DEPLOY_ENV");
}
