//! GitHub App authentication and check runs, end to end: the reporter signs its JWT with the
//! test key and the fake GitHub verifies it with the public key, hands out tokens that expire
//! within seconds (so refreshes happen during the test) and keeps the check runs; a signed
//! `check_run` `rerequested` webhook makes the gateway store a forced sync of that service.

use std::process::Command;
use std::time::Duration;

use iac_shared::events::Trigger;
use iac_tests::fake_github::{FakeApp, FakeGithub};
use iac_tests::pipeline::Pipeline;
use iac_tests::tools::{project_binary, workspace_root};
use iac_tests::wait_for;
use serde_json::{Value, json};

const APP_ID: u64 = 4242;
const INSTALLATION_ID: u64 = 77;
const CHECK: &str = "IaC Runner / platform/postgres";
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
    // Created in progress, then completed: the same check run, updated.
    let requests: Vec<_> = github
        .check_run_requests()
        .into_iter()
        .filter(|r| r.id == run["id"].as_u64().unwrap())
        .collect();
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].body["status"], "in_progress");
    assert_eq!(requests.last().unwrap().method, "PATCH");
    assert_eq!(requests.last().unwrap().body["status"], "completed");
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
    tokio::time::sleep(TOKEN_LIFETIME).await;
    let (second, _, _) = pipeline.push_change("platform/01.postgres/env.txt").await;
    github
        .wait_for_completed_runs(&second, CHECK, 1, FINAL)
        .await;
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
