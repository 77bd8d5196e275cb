//! GitHub App authentication and check runs, end to end: the reporter signs its JWT with the
//! test key and the fake GitHub verifies it with the public key, hands out tokens that expire
//! within seconds (so refreshes happen during the test) and keeps the check runs, each request
//! of them (queued, in progress, completed); a signed
//! `check_run` `rerequested` webhook makes the gateway store a forced sync of that service.

use std::process::Command;
use std::time::Duration;

use iac_shared::events::Trigger;
use iac_tests::fake_github::{CheckRunRequest, FakeApp, FakeGithub};
use iac_tests::pipeline::Pipeline;
use iac_tests::tools::{project_binary, workspace_root};
use iac_tests::wait_for;
use serde_json::{Value, json};

const APP_ID: u64 = 4242;
const INSTALLATION_ID: u64 = 77;
const CHECK: &str = "IaC Runner / platform/postgres";
const REDIS_CHECK: &str = "IaC Runner / platform/redis";
const TOKEN_LIFETIME: Duration = Duration::from_secs(4);
const FINAL: Duration = Duration::from_secs(60);

fn key_file(name: &str) -> String {
    workspace_root()
        .join("tests/data/github-app")
        .join(name)
        .display()
        .to_string()
}

async fn fake_app() -> FakeGithub {
    FakeGithub::start_app(FakeApp {
        app_id: APP_ID,
        installation_id: INSTALLATION_ID,
        public_key_pem: std::fs::read(key_file("test-app-key.pub.pem")).unwrap(),
        token_lifetime: TOKEN_LIFETIME,
    })
    .await
}

/// A pipeline whose reporter is the App (no `GITHUB_TOKEN`) and posts check runs, and whose
/// gateway knows the App.
fn app_pipeline(github: &FakeGithub) -> Pipeline {
    let mut pipeline = Pipeline::new(&github.url());
    for (key, value) in [
        ("GITHUB_TOKEN", String::new()),
        ("GITHUB_APP_ID", APP_ID.to_string()),
        ("GITHUB_APP_PRIVATE_KEY_FILE", key_file("test-app-key.pem")),
        ("GITHUB_APP_INSTALLATION_ID", INSTALLATION_ID.to_string()),
        ("CHECK_RUNS", "true".to_string()),
        (
            "STATUS_TARGET_URL",
            "https://runner.example/runs/{event_id}".to_string(),
        ),
    ] {
        pipeline.set_env("reporter", key, &value);
    }
    pipeline.set_env("gateway", "GITHUB_APP_ID", &APP_ID.to_string());
    pipeline
}

/// Every accepted request about the check run `run`, in arrival order.
fn requests_for(github: &FakeGithub, run: &Value) -> Vec<CheckRunRequest> {
    let id = run["id"].as_u64().expect("a check run id");
    github
        .check_run_requests()
        .into_iter()
        .filter(|r| r.id == id)
        .collect()
}

/// The `status` each request set, a request sent again counted once.
fn statuses(requests: &[CheckRunRequest]) -> Vec<String> {
    let mut statuses: Vec<String> = requests
        .iter()
        .map(|r| r.body["status"].as_str().unwrap_or_default().to_string())
        .collect();
    statuses.dedup();
    statuses
}

fn phase_rank(status: &str) -> usize {
    ["queued", "in_progress", "completed"]
        .iter()
        .position(|s| *s == status)
        .unwrap_or_else(|| panic!("an unexpected check run status {status:?}"))
}

/// Pushes one commit that changes postgres (its task now sleeping a second) and redis, which
/// syncs after it (`SYNC_PARALLELISM=1`); returns the commit.
async fn push_two_services(pipeline: &Pipeline) -> String {
    let fixture = &pipeline.fixture;
    let before = fixture.head();
    fixture.set_behaviour("platform/01.postgres", 1.0, 0);
    let redis = "platform/02.redis/compose.yaml";
    let compose = std::fs::read_to_string(fixture.work_tree().join(redis)).unwrap();
    fixture.write(redis, &format!("{compose}# changed\n"));
    let after = fixture.commit("postgres slower, redis changed");
    let payload = fixture.push_payload(
        &before,
        &after,
        &["platform/01.postgres/behaviour.json", redis],
    );
    let (status, answer) = pipeline
        .webhook("push", &format!("delivery-{}", &after[..12]), &payload)
        .await;
    assert_eq!(status, 200, "{answer}");
    after
}

fn rerequested(commit: &str, external_id: &str, app_id: u64) -> Value {
    json!({
        "action": "rerequested",
        "check_run": {
            "id": 1001,
            "name": CHECK,
            "head_sha": commit,
            "external_id": external_id,
            "status": "completed",
            "app": { "id": app_id, "slug": "iac-runner" },
        },
        "repository": { "full_name": "acme/infra" },
    })
}

#[tokio::test]
async fn an_app_reports_a_check_run_per_service_refreshes_its_token_and_re_runs_on_request() {
    let github = fake_app().await;
    let pipeline = app_pipeline(&github);
    let services = pipeline.start_all().await;
    // A second reporter shares the work: each check run must still be created once.
    let _second_reporter = pipeline.start_reporter();

    let (commit, status, answer) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    assert_eq!(status, 200, "{answer}");
    let runs = github
        .wait_for_completed_runs(&commit, CHECK, 1, FINAL)
        .await;
    assert_eq!(
        runs.len(),
        1,
        "one check run per service and sync: {runs:?}"
    );
    let run = &runs[0];
    assert_eq!(run["conclusion"], "success");
    assert_eq!(run["external_id"], "platform/postgres");
    let event_id = answer["event_id"].as_str().unwrap();
    assert_eq!(
        run["details_url"],
        format!("https://runner.example/runs/{event_id}")
    );
    let summary = run["output"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("changed platform/01.postgres/compose.yaml"),
        "why it was selected: {summary}"
    );
    // Created, then only updated and moved forward, whichever reporter handled which result.
    let requests = requests_for(&github, run);
    assert_eq!(requests[0].method, "POST");
    assert!(
        requests[1..].iter().all(|r| r.method == "PATCH"),
        "{requests:?}"
    );
    let phases = statuses(&requests);
    assert_eq!(phases.last().map(String::as_str), Some("completed"));
    assert!(phases.is_sorted_by_key(|s| phase_rank(s)), "{phases:?}");
    // Commit statuses keep flowing beside the check runs.
    github
        .wait_for_shown(&commit, "IaC Runner / Sync", "success", FINAL)
        .await;
    assert!(
        github.refused_jwts().is_empty(),
        "{:?}",
        github.refused_jwts()
    );

    // The first token has expired: the next push is reported with a new one, never a 401.
    // It syncs redis after postgres, whose task takes a second: redis waits its turn queued.
    tokio::time::sleep(TOKEN_LIFETIME).await;
    let second = push_two_services(&pipeline).await;
    github
        .wait_for_completed_runs(&second, CHECK, 1, FINAL)
        .await;
    let [redis] = github
        .wait_for_completed_runs(&second, REDIS_CHECK, 1, FINAL)
        .await
        .try_into()
        .expect("one check run for redis");
    assert_eq!(redis["conclusion"], "success");
    let requests = requests_for(&github, &redis);
    assert_eq!(
        statuses(&requests),
        ["queued", "in_progress", "completed"],
        "{requests:?}"
    );
    assert_eq!(requests[0].method, "POST");
    assert!(
        requests[0].body.get("started_at").is_none(),
        "a queued check run has not started: {:?}",
        requests[0].body
    );
    let started_at = requests[1].body["started_at"].as_str().unwrap_or_default();
    assert!(started_at.starts_with("20"), "{:?}", requests[1].body);
    assert!(
        redis["output"]["summary"]
            .as_str()
            .unwrap()
            .contains("changed platform/02.redis/compose.yaml"),
        "{redis}"
    );
    assert!(github.issued_tokens().len() >= 2, "a refreshed token");
    assert!(
        github.requests().iter().all(|r| r.answered != 401),
        "no request went out with an expired token"
    );

    // A token revoked before it expires is answered 401 once, then replaced.
    github.revoke_tokens();
    let issued = github.issued_tokens().len();
    let (code, ignored) = pipeline
        .webhook(
            "check_run",
            "rerun-other-app",
            &rerequested(&commit, "platform/postgres", 9),
        )
        .await;
    assert_eq!(
        (code, ignored["status"].as_str()),
        (200, Some("ignored")),
        "{ignored}"
    );
    let (code, accepted) = pipeline
        .webhook(
            "check_run",
            "rerun-1",
            &rerequested(&commit, "platform/postgres", APP_ID),
        )
        .await;
    assert_eq!(code, 200, "{accepted}");
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["services"], json!(["platform/postgres"]));
    let (_, again) = pipeline
        .webhook(
            "check_run",
            "rerun-1",
            &rerequested(&commit, "platform/postgres", APP_ID),
        )
        .await;
    assert_eq!(
        again["duplicate"], true,
        "a redelivery is stored once: {again}"
    );

    let runs = github
        .wait_for_completed_runs(&commit, CHECK, 2, FINAL)
        .await;
    assert_eq!(runs.len(), 2, "the re-run is a sync of its own: {runs:?}");
    assert_eq!(runs[1]["conclusion"], "success");
    let finished = wait_for("the re-run's result", FINAL, || async {
        let finished = pipeline.finished_at(&commit).await;
        (finished.trigger == Trigger::Sync).then_some(finished)
    })
    .await;
    assert_eq!(finished.services.len(), 1);
    assert_eq!(finished.services[0].service, "platform/postgres");
    let forced_runs = pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end" && r.commit.as_deref() == Some(commit.as_str()))
        .count();
    assert_eq!(forced_runs, 2, "the task ran again at the re-run commit");
    assert!(
        github.issued_tokens().len() > issued,
        "a token after the 401"
    );
    assert!(
        github.requests().iter().any(|r| r.answered == 401),
        "the revoked token was refused once"
    );
    let logged = services.reporter.output();
    assert!(
        logged.contains("received a GitHub App installation token"),
        "{logged}"
    );
    for issued in github.issued_tokens() {
        assert!(!logged.contains(&issued.token), "a token in the log");
    }
    // Every JWT starts with the base64url of `{"typ":"JWT","alg":"RS256"}` or `{"alg":…`.
    assert!(!logged.contains("eyJ"), "a JWT in the log");
}

fn reporter_refuses_to_start(env: &[(&str, String)]) -> String {
    let output = Command::new(project_binary("iac-reporter"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // Nothing listens here: the configuration must be refused before connecting.
        .env("NATS_URL", "nats://127.0.0.1:1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_token_and_an_app_together_are_refused_at_start_naming_both() {
    let stderr = reporter_refuses_to_start(&[
        ("GITHUB_TOKEN", "ghp_x".into()),
        ("GITHUB_APP_ID", APP_ID.to_string()),
        ("GITHUB_APP_PRIVATE_KEY_FILE", key_file("test-app-key.pem")),
        ("GITHUB_APP_INSTALLATION_ID", INSTALLATION_ID.to_string()),
    ]);
    assert!(stderr.contains("GITHUB_TOKEN"), "{stderr}");
    assert!(stderr.contains("GITHUB_APP_ID"), "{stderr}");
}

#[test]
fn check_runs_without_an_app_are_refused_at_start() {
    let stderr = reporter_refuses_to_start(&[
        ("GITHUB_TOKEN", "ghp_x".into()),
        ("CHECK_RUNS", "true".into()),
    ]);
    assert!(stderr.contains("CHECK_RUNS"), "{stderr}");
    assert!(stderr.contains("GITHUB_APP_ID"), "{stderr}");
}

#[tokio::test]
async fn a_rerequested_check_suite_runs_its_pushs_services_again_forced() {
    let github = fake_app().await;
    let pipeline = app_pipeline(&github);
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let before = pipeline.fixture.head();
    let (commit, status, _) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    assert_eq!(status, 200);
    let ran = |pipeline: &Pipeline| {
        pipeline
            .fixture
            .runs()
            .into_iter()
            .filter(|r| r.phase == "end" && r.task.as_deref() == Some("postgres.sync"))
            .collect::<Vec<_>>()
    };
    wait_for("the push's sync", FINAL, || async {
        (ran(&pipeline).len() == 1).then_some(())
    })
    .await;
    assert!(!ran(&pipeline)[0].force);

    // "Re-run all checks" on the suite: the push again, its services derived from git, forced.
    let suite = json!({
        "action": "rerequested",
        "check_suite": {
            "head_sha": commit, "head_branch": "main", "before": before, "after": commit,
            "app": { "id": APP_ID },
        },
        "repository": { "full_name": "acme/infra" },
    });
    let (code, answer) = pipeline
        .webhook("check_suite", "suite-rerun-1", &suite)
        .await;
    assert_eq!(
        (code, answer["status"].as_str()),
        (200, Some("accepted")),
        "{answer}"
    );
    let runs = wait_for("the re-run", FINAL, || async {
        let runs = ran(&pipeline);
        (runs.len() == 2).then_some(runs)
    })
    .await;
    assert_eq!(runs[1].commit.as_deref(), Some(commit.as_str()));
    assert!(runs[1].force, "the suite's re-run did not force the task");
}
