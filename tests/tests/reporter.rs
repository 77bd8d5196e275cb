//! The reporter against a real nats-server and a fake GitHub: what it posts, in which order,
//! through failures, with several reporters sharing the work.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use iac_reporter::Config;
use iac_reporter::undelivered::{Selection, UndeliveredStatus, read};
use iac_shared::events::*;
use iac_shared::names::*;
use iac_shared::nats::{StreamSettings, provision};
use iac_tests::fake_github::{FakeGithub, Faults, StatusRequest};
use iac_tests::nats::NatsServer;
use iac_tests::process::ServiceProcess;
use iac_tests::services::InProcessReporter;
use iac_tests::wait_for;
use tempfile::TempDir;

const TOKEN: &str = "ghp_test0123456789abcdefTOKEN";
const REPO: &str = "acme/infra";
const SYNC: &str = "IaC Runner / Sync";
const TIMEOUT: Duration = Duration::from_secs(20);

/// A nats-server with the streams, a fake GitHub, and reporters running in this process.
struct TestApp {
    nats: NatsServer,
    github: FakeGithub,
    js: jetstream::Context,
    reporters: Vec<InProcessReporter>,
    /// The output of reporter binaries.
    logs: TempDir,
}

impl TestApp {
    async fn start() -> Self {
        let nats = NatsServer::start();
        let js = jetstream::new(nats.client().await);
        // The consumers exist before anything is published, as in production.
        provision(&js, &StreamSettings::default()).await.unwrap();
        TestApp {
            nats,
            github: FakeGithub::start().await,
            js,
            reporters: Vec::new(),
            logs: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, extra: &[&str]) -> Config {
        let url = self.nats.url();
        let api = self.github.url();
        let args = [
            "iac-reporter",
            "--nats-url",
            &url,
            "--github-api-url",
            &api,
            "--github-token",
            TOKEN,
        ];
        let timeout: &[&str] = if extra.contains(&"--github-timeout") {
            &[]
        } else {
            &["--github-timeout", "5s"]
        };
        Config::from_args(args.iter().chain(timeout).chain(extra)).unwrap()
    }

    fn spawn_reporter(&mut self, extra: &[&str]) {
        let config = self.config(extra);
        self.reporters.push(InProcessReporter::start(config));
    }

    fn assert_reporters_alive(&self) {
        for reporter in &self.reporters {
            reporter.task.assert_running();
        }
    }

    async fn publish(&self, subject: &'static str, body: &impl serde::Serialize) -> u64 {
        self.js
            .publish(subject, serde_json::to_vec(body).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    async fn started(&self, started: &SyncStarted) {
        self.publish(STARTED_SUBJECT, started).await;
    }

    async fn finished(&self, finished: &SyncFinished) {
        self.publish(FINISHED_SUBJECT, finished).await;
    }

    /// Publishes a push; returns its `IAC_EVENTS` sequence.
    async fn push(&self, commit: &str) -> u64 {
        self.publish(PUSH_SUBJECT, &push(commit)).await
    }

    /// Waits until `check` holds for the requests GitHub received.
    async fn wait_for_github<T>(
        &self,
        what: &str,
        check: impl Fn(&[StatusRequest]) -> Option<T>,
    ) -> T {
        wait_for(what, TIMEOUT, || {
            self.assert_reporters_alive();
            let found = check(&self.github.requests());
            async move { found }
        })
        .await
    }

    /// Waits until GitHub shows `(state, description)` for the whole-sync context of `commit`.
    async fn wait_for_shown(&self, commit: &str, state: &str) -> StatusRequest {
        self.wait_for_github(&format!("{state} on {commit}"), |_| {
            self.github
                .shown(commit, SYNC)
                .filter(|shown| shown.state() == state)
        })
        .await
    }

    /// Waits until both reporter consumers have nothing pending or unacknowledged.
    async fn wait_until_drained(&self) {
        let results = self.consumer(RESULTS_STREAM, REPORTER_CONSUMER).await;
        let events = self.consumer(EVENTS_STREAM, REPORTER_EVENTS_CONSUMER).await;
        wait_for("every message handled", TIMEOUT, || {
            self.assert_reporters_alive();
            let (mut results, mut events) = (results.clone(), events.clone());
            async move {
                let r = results.info().await.ok()?;
                let e = events.info().await.ok()?;
                (r.num_pending + e.num_pending == 0 && r.num_ack_pending + e.num_ack_pending == 0)
                    .then_some(())
            }
        })
        .await;
    }

    /// The statuses given up, as `IAC_UNDELIVERED` holds them, with their sequences.
    async fn undelivered(&self) -> Vec<(u64, UndeliveredStatus)> {
        let all = Selection {
            since: None,
            seq: None,
        };
        read(&self.js, &all)
            .await
            .unwrap()
            .into_iter()
            .map(|kept| (kept.seq, kept.status.unwrap()))
            .collect()
    }

    /// Waits until `IAC_UNDELIVERED` holds `n` statuses.
    async fn wait_for_undelivered(&self, n: usize) -> Vec<(u64, UndeliveredStatus)> {
        wait_for(&format!("{n} undelivered status(es)"), TIMEOUT, || {
            self.assert_reporters_alive();
            async move {
                let kept = read(
                    &self.js,
                    &Selection {
                        since: None,
                        seq: None,
                    },
                )
                .await
                .ok()?;
                (kept.len() >= n).then_some(())
            }
        })
        .await;
        self.undelivered().await
    }

    /// Runs `iac-reporter undelivered <args>` against this app: (success, stdout, stderr).
    fn undelivered_command(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(iac_tests::tools::project_binary("iac-reporter"))
            .arg("undelivered")
            .args(args)
            .env_clear()
            .env("NATS_URL", self.nats.url())
            .env("GITHUB_API_URL", self.github.url())
            .env("GITHUB_TOKEN", TOKEN)
            .output()
            .expect("running iac-reporter undelivered");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    async fn consumer(&self, stream: &str, name: &str) -> PullConsumer {
        self.js
            .get_stream(stream)
            .await
            .unwrap()
            .get_consumer(name)
            .await
            .unwrap()
    }

    async fn stop(self) {
        for reporter in self.reporters {
            reporter.stop().await;
        }
    }
}

/// A 40-hex-digit commit id made from `n`.
fn sha(n: u64) -> String {
    format!("{:040x}", 0x00c0_ffee_0000_u64 + n)
}

fn push(commit: &str) -> PushEvent {
    PushEvent {
        delivery_id: format!("delivery-{commit}"),
        repository: Some(REPO.into()),
        git_ref: "refs/heads/main".into(),
        before: None,
        after: Some(commit.into()),
        head_commit: Some(commit.into()),
        pusher: Some("octocat".into()),
        paths: vec!["platform/01.postgres/main.tf".into()],
        paths_truncated: false,
    }
}

fn started(event_seq: u64, commit: &str, services: &[&str]) -> SyncStarted {
    SyncStarted {
        event_id: format!("event-{event_seq}"),
        event_seq,
        trigger: Trigger::Push,
        repository: Some(REPO.into()),
        commit: commit.into(),
        services: services.iter().map(|s| s.to_string()).collect(),
        reasons: Default::default(),
        replay_of: None,
        started_at: now_rfc3339(),
        env: None,
        deployment_id: None,
    }
}

fn result(service: &str, outcome: SyncOutcome, exit_code: Option<i32>) -> ServiceResult {
    ServiceResult {
        service: service.into(),
        task: Some(format!("{}.sync", service.rsplit('/').next().unwrap())),
        outcome,
        exit_code,
        output_tail: vec![],
        duration_ms: 120,
        reason: None,
    }
}

fn finished(event_seq: u64, commit: &str, services: Vec<ServiceResult>) -> SyncFinished {
    let totals = Totals::of(&services);
    SyncFinished {
        event_id: format!("event-{event_seq}"),
        event_seq,
        trigger: Trigger::Push,
        repository: Some(REPO.into()),
        commit: Some(commit.into()),
        state: SyncFinished::state_of(&totals),
        services,
        totals,
        error: None,
        duration_ms: 300,
        replay_of: None,
        finished_at: now_rfc3339(),
        env: None,
        deployment_id: None,
        superseded_by: None,
    }
}

fn synced(services: &[&str]) -> Vec<ServiceResult> {
    services
        .iter()
        .map(|s| result(s, SyncOutcome::Synced, Some(0)))
        .collect()
}

#[tokio::test]
async fn a_started_sync_posts_pending_with_githubs_headers() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&[]);
    let commit = sha(1);
    app.started(&started(
        1,
        &commit,
        &["platform/postgres", "platform/redis"],
    ))
    .await;

    let posted = app.wait_for_shown(&commit, "pending").await;
    assert_eq!(posted.method, "POST");
    assert_eq!(posted.path, format!("/repos/acme/infra/statuses/{commit}"));
    assert_eq!(
        posted.body,
        serde_json::json!({
            "state": "pending",
            "description": "Syncing 2 service(s)...",
            "context": "IaC Runner / Sync",
        })
    );
    assert_eq!(posted.headers["authorization"], format!("Bearer {TOKEN}"));
    assert_eq!(posted.headers["accept"], "application/vnd.github+json");
    assert_eq!(posted.headers["x-github-api-version"], "2022-11-28");
    assert_eq!(
        posted.headers["user-agent"],
        format!("iac-runner/{}", env!("CARGO_PKG_VERSION"))
    );
    app.stop().await;
}

#[tokio::test]
async fn finished_syncs_post_success_failure_or_error_with_counts() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&[
        "--status-target-url",
        "https://ci.example.com/{repository}/{commit}?event={event_id}",
    ]);
    let (ok, failed, nothing, broken) = (sha(1), sha(2), sha(3), sha(4));
    app.finished(&finished(
        1,
        &ok,
        synced(&["platform/postgres", "platform/redis"]),
    ))
    .await;
    app.finished(&finished(
        2,
        &failed,
        vec![
            result("platform/postgres", SyncOutcome::Synced, Some(0)),
            result("platform/redis", SyncOutcome::Failed, Some(1)),
            result("bootstrap/vault", SyncOutcome::TimedOut, None),
        ],
    ))
    .await;
    app.finished(&finished(3, &nothing, vec![])).await;
    let mut error = finished(4, &broken, vec![]);
    error.state = FinishedState::Error;
    error.error = Some("git checkout failed: reference is not a tree".into());
    app.finished(&error).await;

    let shown = app.wait_for_shown(&ok, "success").await;
    assert_eq!(shown.description(), "2 service(s) synced successfully");
    assert_eq!(
        shown.body["target_url"],
        format!("https://ci.example.com/acme/infra/{ok}?event=event-1")
    );
    let shown = app.wait_for_shown(&failed, "failure").await;
    assert_eq!(shown.description(), "2/3 service(s) failed to sync");
    let shown = app.wait_for_shown(&nothing, "success").await;
    assert_eq!(shown.description(), "No services required sync");
    let shown = app.wait_for_shown(&broken, "error").await;
    assert_eq!(
        shown.description(),
        "git checkout failed: reference is not a tree"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_long_reason_is_cut_to_140_characters_between_characters() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&[]);
    let commit = sha(1);
    let mut error = finished(1, &commit, vec![]);
    error.state = FinishedState::Error;
    error.error = Some(format!("Fehler: {}", "ü€".repeat(200)));
    app.finished(&error).await;

    let shown = app.wait_for_shown(&commit, "error").await;
    let description = shown.description();
    assert_eq!(description.chars().count(), 140);
    assert!(error.error.unwrap().starts_with(description));
    app.stop().await;
}

#[tokio::test]
async fn per_service_statuses_follow_each_service() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&["--status-per-service", "true"]);
    let commit = sha(1);
    let services = ["platform/postgres", "platform/redis", "bootstrap/vault"];
    app.started(&started(1, &commit, &services)).await;
    app.wait_for_github("three per-service pending statuses", |requests| {
        let pending = requests
            .iter()
            .filter(|r| r.accepted() && r.description() == "Syncing...")
            .count();
        (pending == 3).then_some(())
    })
    .await;
    app.finished(&finished(
        1,
        &commit,
        vec![
            result("platform/postgres", SyncOutcome::Synced, Some(0)),
            result("platform/redis", SyncOutcome::Failed, Some(2)),
            result("bootstrap/vault", SyncOutcome::TimedOut, None),
        ],
    ))
    .await;

    app.wait_for_shown(&commit, "failure").await;
    let expected = [
        ("IaC Runner / platform/postgres", "success", "Synced"),
        (
            "IaC Runner / platform/redis",
            "failure",
            "Failed with exit code 2",
        ),
        (
            "IaC Runner / bootstrap/vault",
            "failure",
            "Failed: timed out",
        ),
    ];
    for (context, state, description) in expected {
        let shown = app
            .wait_for_github(context, |_| {
                app.github
                    .shown(&commit, context)
                    .filter(|s| s.state() != "pending")
            })
            .await;
        assert_eq!((shown.state(), shown.description()), (state, description));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_push_is_queued_then_replaced_by_its_sync() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&[]);
    let commit = sha(1);
    let seq = app.push(&commit).await;
    let queued = app.wait_for_shown(&commit, "pending").await;
    assert_eq!(
        queued.description(),
        "Queued: waiting for previous sync to complete"
    );

    app.started(&started(seq, &commit, &["platform/postgres"]))
        .await;
    app.wait_for_github("the syncing status", |_| {
        app.github
            .shown(&commit, SYNC)
            .filter(|s| s.description() == "Syncing 1 service(s)...")
    })
    .await;
    app.finished(&finished(seq, &commit, synced(&["platform/postgres"])))
        .await;
    let done = app.wait_for_shown(&commit, "success").await;
    assert_eq!(done.description(), "1 service(s) synced successfully");
    app.stop().await;
}

#[tokio::test]
async fn a_manual_sync_reports_on_the_commit_it_synced_in_github_repo() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&["--github-repo", "acme/monorepo"]);
    let commit = sha(7);
    let mut manual = finished(3, &commit, synced(&["platform/redis"]));
    manual.trigger = Trigger::Sync;
    manual.repository = None;
    app.finished(&manual).await;

    let shown = app.wait_for_shown(&commit, "success").await;
    assert_eq!(
        shown.path,
        format!("/repos/acme/monorepo/statuses/{commit}")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_result_without_a_commit_is_skipped_without_blocking_the_next() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&["--reporter-concurrency", "1"]);
    let mut early_error = finished(1, "unused", vec![]);
    early_error.commit = None;
    early_error.state = FinishedState::Error;
    early_error.error = Some("malformed request".into());
    app.finished(&early_error).await;
    let commit = sha(2);
    app.finished(&finished(2, &commit, synced(&["platform/postgres"])))
        .await;

    app.wait_for_shown(&commit, "success").await;
    app.wait_until_drained().await;
    assert_eq!(app.github.requests().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_status_older_than_the_one_posted_makes_no_request() {
    let mut app = TestApp::start().await;
    app.spawn_reporter(&[]);
    let commit = sha(1);
    app.finished(&finished(5, &commit, synced(&["platform/postgres"])))
        .await;
    app.wait_for_shown(&commit, "success").await;

    // A late "started" for the same event, and a "queued" of an earlier event.
    app.started(&started(5, &commit, &["platform/postgres"]))
        .await;
    app.started(&started(4, &commit, &["platform/postgres"]))
        .await;
    app.wait_until_drained().await;

    let requests = app.github.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(app.github.shown(&commit, SYNC).unwrap().state(), "success");
    app.stop().await;
}

#[tokio::test]
async fn a_slow_older_post_landing_last_is_corrected() {
    let mut app = TestApp::start().await;
    app.github.set_faults(Faults {
        slow_state: Some(("pending".into(), Duration::from_millis(800))),
        ..Faults::default()
    });
    app.spawn_reporter(&[]);
    let commit = sha(1);
    app.started(&started(1, &commit, &["platform/postgres"]))
        .await;
    app.wait_for_github("the pending post to arrive", |requests| {
        requests.iter().find(|r| r.state() == "pending").cloned()
    })
    .await;
    // The finished status overtakes the slow pending one at GitHub.
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;
    app.wait_until_drained().await;

    let requests = app.github.requests();
    let last = requests.iter().max_by_key(|r| r.landed).unwrap();
    assert_eq!(last.state(), "success", "{requests:#?}");
    assert_eq!(app.github.shown(&commit, SYNC).unwrap().state(), "success");
    app.stop().await;
}

/// For each (commit, context): the states GitHub applied, in the order they took effect.
fn applied_in_order(requests: &[StatusRequest]) -> HashMap<(String, String), Vec<String>> {
    let mut accepted: Vec<&StatusRequest> = requests.iter().filter(|r| r.accepted()).collect();
    accepted.sort_by_key(|r| (r.landed, r.number));
    let mut applied: HashMap<(String, String), Vec<String>> = HashMap::new();
    for r in accepted {
        applied
            .entry((r.commit.clone(), r.context().to_string()))
            .or_default()
            .push(r.state().to_string());
    }
    applied
}

/// Panics when any commit received a pending status after a final one.
fn assert_no_pending_after_a_final_state(requests: &[StatusRequest]) {
    for ((commit, context), states) in applied_in_order(requests) {
        if let Some(first_final) = states.iter().position(|s| s != "pending") {
            assert!(
                states[first_final..].iter().all(|s| s != "pending"),
                "{context} on {commit} went back to pending: {states:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_pending_post_that_timed_out_never_lands_after_the_final_status() {
    let mut app = TestApp::start().await;
    // GitHub applies the pending status two seconds later, after the reporter gave up on it.
    app.github.set_faults(Faults {
        slow_first: Some((1, Duration::from_secs(2))),
        ..Faults::default()
    });
    app.spawn_reporter(&["--github-timeout", "1s"]);
    let commit = sha(1);
    app.started(&started(1, &commit, &["platform/postgres"]))
        .await;
    app.wait_for_github("the pending post to arrive", |requests| {
        requests.iter().find(|r| r.state() == "pending").cloned()
    })
    .await;
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;
    app.wait_for_shown(&commit, "success").await;
    app.wait_until_drained().await;

    let requests = app.github.requests();
    assert_no_pending_after_a_final_state(&requests);
    let success = requests.iter().find(|r| r.state() == "success").unwrap();
    assert!(
        success.arrived >= requests[0].landed,
        "the final status was sent before the pending one could have been applied: {requests:#?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_final_status_whose_post_timed_out_is_posted_again() {
    let mut app = TestApp::start().await;
    app.github.set_faults(Faults {
        slow_first: Some((1, Duration::from_secs(3))),
        ..Faults::default()
    });
    app.spawn_reporter(&["--github-timeout", "1s"]);
    let commit = sha(1);
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;

    let posts = app
        .wait_for_github("the success status posted twice", |requests| {
            let posts: Vec<StatusRequest> = requests
                .iter()
                .filter(|r| r.state() == "success")
                .cloned()
                .collect();
            (posts.len() >= 2).then_some(posts)
        })
        .await;
    // Not before the lease of the unanswered post expired (timeout 1 s plus the margin).
    assert!(
        posts[1].arrived - posts[0].arrived >= Duration::from_secs(5),
        "{posts:#?}"
    );
    app.wait_for_shown(&commit, "success").await;
    app.wait_until_drained().await;
    app.stop().await;
}

#[tokio::test]
async fn a_secondary_rate_limit_403_is_retried_later_not_given_up() {
    let mut app = TestApp::start().await;
    app.github.set_faults(Faults {
        secondary_limit_first: Some(1),
        ..Faults::default()
    });
    let port = iac_tests::free_port().to_string();
    app.spawn_reporter(&["--metrics-port", &port]);
    let commit = sha(1);
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;
    app.wait_for_github("the rate-limited post", |requests| {
        requests.iter().find(|r| r.answered == 403).cloned()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // GitHub asks for a minute: nothing posted meanwhile, and the result is kept for later.
    assert_eq!(app.github.requests().len(), 1);
    let mut results = app.consumer(RESULTS_STREAM, REPORTER_CONSUMER).await;
    let info = results.info().await.unwrap();
    assert_eq!(
        info.num_pending + info.num_ack_pending as u64,
        1,
        "{info:#?}"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("iac_reporter_refusals_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("iac_reporter_retries_total{reason=\"rate_limited\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retried_until_every_status_is_posted() {
    let mut app = TestApp::start().await;
    app.github.set_faults(Faults {
        bad_gateway_every: Some(3),
        rate_limit_every: Some((7, 1)),
        ..Faults::default()
    });
    app.spawn_reporter(&[]);
    let commits: Vec<String> = (1..=10).map(sha).collect();
    for (i, commit) in commits.iter().enumerate() {
        let seq = i as u64 + 1;
        app.started(&started(seq, commit, &["platform/postgres"]))
            .await;
        app.finished(&finished(seq, commit, synced(&["platform/postgres"])))
            .await;
    }

    for commit in &commits {
        app.wait_for_shown(commit, "success").await;
    }
    app.wait_until_drained().await;
    let answered: Vec<u16> = app.github.requests().iter().map(|r| r.answered).collect();
    assert!(answered.contains(&502), "{answered:?}");
    assert!(answered.contains(&429), "{answered:?}");
    for commit in &commits {
        assert_eq!(app.github.shown(commit, SYNC).unwrap().state(), "success");
    }
    app.stop().await;
}

#[tokio::test]
async fn an_exhausted_rate_limit_holds_every_post_until_the_reset() {
    let mut app = TestApp::start().await;
    app.github.set_faults(Faults {
        exhausted_first: Some((1, 2)),
        ..Faults::default()
    });
    app.spawn_reporter(&["--reporter-concurrency", "1"]);
    let commits: Vec<String> = (1..=3).map(sha).collect();
    for (i, commit) in commits.iter().enumerate() {
        app.finished(&finished(
            i as u64 + 1,
            commit,
            synced(&["platform/postgres"]),
        ))
        .await;
    }

    for commit in &commits {
        app.wait_for_shown(commit, "success").await;
    }
    let requests = app.github.requests();
    assert_eq!(requests[0].answered, 403, "{requests:#?}");
    // The limited status and the others alike wait for the reset (at least a second away).
    let waited = requests[1].arrived - requests[0].arrived;
    assert!(
        waited >= Duration::from_millis(900),
        "next post after {waited:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_what_was_posted_skipped_and_refused() {
    let mut app = TestApp::start().await;
    let refused = sha(9);
    app.github.set_faults(Faults {
        refused_commits: HashMap::from([(refused.clone(), (422, "No commit found".into()))]),
        ..Faults::default()
    });
    let port = iac_tests::free_port().to_string();
    app.spawn_reporter(&[
        "--metrics-port",
        &port,
        "--reporter-concurrency",
        "1",
        "--status-give-up-after",
        "1",
    ]);
    let commit = sha(1);
    app.finished(&finished(2, &commit, synced(&["platform/postgres"])))
        .await;
    app.wait_for_shown(&commit, "success").await;
    app.started(&started(2, &commit, &["platform/postgres"]))
        .await;
    app.finished(&finished(3, &refused, synced(&["platform/postgres"])))
        .await;
    app.wait_until_drained().await;

    let metrics = wait_for("the metrics endpoint", TIMEOUT, || {
        let url = format!("http://127.0.0.1:{port}/metrics");
        async move { reqwest::get(url).await.ok()?.text().await.ok() }
    })
    .await;
    for line in [
        "iac_reporter_statuses_posted_total{state=\"success\"} 1",
        "iac_reporter_statuses_skipped_total{reason=\"superseded\"} 1",
        "iac_reporter_statuses_undelivered_total 1",
        "iac_reporter_github_rate_limit_remaining 4999",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let refusals = app
        .github
        .requests()
        .iter()
        .filter(|r| r.answered == 422)
        .count();
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("iac_reporter_refusals_total{{code=\"422\"}} {refusals}")),
        "{refusals} refusals in\n{metrics}"
    );
    assert!(
        metrics.contains("iac_reporter_retries_total{reason=\"refused\"}"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_refused_status_is_retried_for_its_budget_then_kept_undelivered_without_blocking_later_ones()
 {
    let mut app = TestApp::start().await;
    let refused = sha(1);
    app.github.set_faults(Faults {
        refused_commits: HashMap::from([(
            refused.clone(),
            (422, "No commit found for SHA".to_string()),
        )]),
        ..Faults::default()
    });
    app.spawn_reporter(&[
        "--reporter-concurrency",
        "1",
        "--status-give-up-after",
        "2s",
        "--status-target-url",
        "https://ci.example.com/{commit}",
    ]);
    app.finished(&finished(1, &refused, synced(&["platform/postgres"])))
        .await;
    let later = sha(2);
    app.finished(&finished(2, &later, synced(&["platform/postgres"])))
        .await;

    app.wait_for_shown(&later, "success").await;
    let kept = app.wait_for_undelivered(1).await;
    app.wait_until_drained().await;
    let attempts: Vec<StatusRequest> = app
        .github
        .requests()
        .into_iter()
        .filter(|r| r.commit == refused)
        .collect();
    assert!(attempts.len() >= 3, "retried: {attempts:#?}");
    let tried_for = attempts.last().unwrap().arrived - attempts[0].arrived;
    assert!(
        tried_for >= Duration::from_secs(2),
        "given up after {tried_for:?}"
    );

    let [(_, letter)] = &kept[..] else {
        panic!("one dead letter expected: {kept:#?}");
    };
    assert_eq!(
        (letter.repository.as_str(), letter.commit.as_str()),
        (REPO, refused.as_str())
    );
    assert_eq!(
        (letter.context.as_str(), letter.state.as_str()),
        (SYNC, "success")
    );
    assert_eq!(letter.description, "1 service(s) synced successfully");
    assert_eq!(
        letter.target_url.as_deref(),
        Some(format!("https://ci.example.com/{refused}").as_str())
    );
    assert_eq!((letter.event_id.as_str(), letter.event_seq), ("event-1", 1));
    assert_eq!(letter.last_http_status, Some(422));
    assert!(letter.last_error.contains("No commit found"), "{letter:?}");
    assert_eq!(letter.attempts as usize, attempts.len());
    assert!(
        letter.first_attempt_at < letter.last_attempt_at,
        "{letter:?}"
    );
    // Given up once: a redelivery does not post it again nor keep it twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.undelivered().await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_401_is_given_up_at_once_and_kept_without_the_token() {
    let mut app = TestApp::start().await;
    let commit = sha(1);
    app.github.set_faults(Faults {
        refused_commits: HashMap::from([(commit.clone(), (401, "Bad credentials".to_string()))]),
        ..Faults::default()
    });
    let port = iac_tests::free_port().to_string();
    app.spawn_reporter(&["--metrics-port", &port]);
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;

    let kept = app.wait_for_undelivered(1).await;
    app.wait_until_drained().await;
    assert_eq!(app.github.requests().len(), 1, "a 401 was retried");
    let (seq, letter) = &kept[0];
    assert_eq!((letter.last_http_status, letter.attempts), (Some(401), 1));
    let raw = app
        .js
        .get_stream(UNDELIVERED_STREAM)
        .await
        .unwrap()
        .get_raw_message(*seq)
        .await
        .unwrap();
    assert_eq!(raw.subject.as_str(), UNDELIVERED_STATUS_SUBJECT);
    let payload = String::from_utf8_lossy(&raw.payload);
    assert!(!payload.contains(TOKEN), "{payload}");
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "iac_reporter_statuses_undelivered_total 1"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn undelivered_list_shows_a_given_up_status_and_replay_posts_it_once_github_answers() {
    let mut app = TestApp::start().await;
    let commit = sha(1);
    app.github.set_faults(Faults {
        refused_commits: HashMap::from([(commit.clone(), (404, "Not Found".to_string()))]),
        ..Faults::default()
    });
    app.spawn_reporter(&["--status-give-up-after", "1s"]);
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;
    let kept = app.wait_for_undelivered(1).await;
    app.wait_until_drained().await;
    let seq = kept[0].0.to_string();

    let (ok, out, err) = app.undelivered_command(&["list", "--since", "1h"]);
    assert!(ok, "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&commit))
        .unwrap_or_else(|| panic!("{out}"));
    for field in [seq.as_str(), REPO, SYNC, "success", "404", "Not Found"] {
        assert!(line.contains(field), "{field} in {line}");
    }
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN));

    // GitHub refuses still: the replay says so and fails.
    let (ok, out, _) = app.undelivered_command(&["replay", "--seq", &seq]);
    assert!(!ok && out.contains("failed"), "{out}");
    assert!(app.github.accepted().is_empty());

    app.github.set_faults(Faults::default());
    let (ok, out, err) = app.undelivered_command(&["replay", "--seq", &seq]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("posted"), "{out}");
    let shown = app.wait_for_shown(&commit, "success").await;
    assert_eq!(shown.description(), "1 service(s) synced successfully");
    assert_eq!(app.github.accepted().len(), 1);
    // The reporter still running does not take it up again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.github.accepted().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_replayed_dead_letter_never_overwrites_a_newer_status() {
    let mut app = TestApp::start().await;
    let commit = sha(1);
    app.github.set_faults(Faults {
        refused_commits: HashMap::from([(commit.clone(), (404, "Not Found".to_string()))]),
        ..Faults::default()
    });
    app.spawn_reporter(&["--status-give-up-after", "1s"]);
    app.started(&started(1, &commit, &["platform/postgres"]))
        .await;
    let kept = app.wait_for_undelivered(1).await;
    app.wait_until_drained().await;
    assert_eq!(kept[0].1.state.as_str(), "pending");

    // GitHub answers again and the sync's final status is posted.
    app.github.set_faults(Faults::default());
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;
    app.wait_for_shown(&commit, "success").await;
    app.wait_until_drained().await;

    let (ok, out, err) = app.undelivered_command(&["replay", "--since", "1h"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("not posted: superseded"), "{out}");
    let accepted: Vec<String> = app
        .github
        .accepted()
        .iter()
        .map(|r| r.state().to_string())
        .collect();
    assert_eq!(accepted, ["success"]);
    assert_eq!(app.github.shown(&commit, SYNC).unwrap().state(), "success");
    app.stop().await;
}

/// A small deterministic shuffle (xorshift), so a failing order can be replayed.
fn scramble<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

#[derive(Clone, Copy)]
enum Step {
    Push(usize),
    Started(usize),
    Finished(usize),
}

#[tokio::test]
async fn three_reporters_racing_over_scrambled_results_leave_every_commit_final() {
    const COMMITS: usize = 30;
    let mut app = TestApp::start().await;
    app.github.set_faults(Faults {
        bad_gateway_every: Some(11),
        latency: Duration::from_millis(5),
        latency_spread: Duration::from_millis(30),
        ..Faults::default()
    });
    for _ in 0..3 {
        app.spawn_reporter(&["--reporter-concurrency", "4"]);
    }
    let commits: Vec<String> = (0..COMMITS as u64).map(sha).collect();
    let mut steps: Vec<Step> = (0..COMMITS)
        .flat_map(|i| [Step::Push(i), Step::Started(i), Step::Finished(i)])
        .collect();
    scramble(&mut steps, 0x5eed_1234_abcd);
    // Pushes are the only messages on IAC_EVENTS, so the k-th one published gets sequence k.
    let mut event_seq = vec![0u64; COMMITS];
    let mut next = 1;
    for step in &steps {
        if let Step::Push(i) = step {
            event_seq[*i] = next;
            next += 1;
        }
    }
    let failing = |i: usize| i.is_multiple_of(5);
    for step in steps {
        match step {
            Step::Push(i) => assert_eq!(app.push(&commits[i]).await, event_seq[i]),
            Step::Started(i) => {
                app.started(&started(event_seq[i], &commits[i], &["platform/postgres"]))
                    .await
            }
            Step::Finished(i) => {
                let outcome = if failing(i) {
                    result("platform/postgres", SyncOutcome::Failed, Some(1))
                } else {
                    result("platform/postgres", SyncOutcome::Synced, Some(0))
                };
                app.finished(&finished(event_seq[i], &commits[i], vec![outcome]))
                    .await
            }
        }
    }

    app.wait_until_drained().await;
    for (i, commit) in commits.iter().enumerate() {
        let want = if failing(i) { "failure" } else { "success" };
        let shown = app
            .github
            .shown(commit, SYNC)
            .unwrap_or_else(|| panic!("no status on {commit}"));
        assert_eq!(shown.state(), want, "commit {i}: {shown:#?}");
    }
    let accepted = app.github.accepted().len();
    assert!(accepted < COMMITS * 3 * 2, "{accepted} statuses posted");
    app.stop().await;
}

#[tokio::test]
async fn statuses_never_go_back_to_pending_under_flaky_github_three_reporters_and_quick_pushes() {
    const PUSHES: usize = 16;
    let mut app = TestApp::start().await;
    // A third of the answers are 502, one in seven a rate limit; answers take 5 to 35 ms.
    app.github.set_faults(Faults {
        bad_gateway_every: Some(3),
        rate_limit_every: Some((7, 1)),
        latency: Duration::from_millis(5),
        latency_spread: Duration::from_millis(30),
        ..Faults::default()
    });
    for _ in 0..3 {
        app.spawn_reporter(&[
            "--reporter-concurrency",
            "4",
            "--status-per-service",
            "true",
        ]);
    }
    let commits: Vec<String> = (0..PUSHES as u64).map(|i| sha(100 + i)).collect();
    // As the pipeline would: pushes arrive quickly while one worker syncs them in turn, so each
    // commit's queued, syncing and final statuses are all in flight at about the same time.
    let mut event_seq = Vec::new();
    for (i, commit) in commits.iter().enumerate() {
        event_seq.push(app.push(commit).await);
        if i > 0 {
            let (seq, previous) = (event_seq[i - 1], &commits[i - 1]);
            app.started(&started(seq, previous, &["platform/postgres"]))
                .await;
            app.finished(&finished(seq, previous, synced(&["platform/postgres"])))
                .await;
        }
    }
    let (seq, last) = (event_seq[PUSHES - 1], &commits[PUSHES - 1]);
    app.started(&started(seq, last, &["platform/postgres"]))
        .await;
    app.finished(&finished(seq, last, synced(&["platform/postgres"])))
        .await;

    for commit in &commits {
        app.wait_for_shown(commit, "success").await;
    }
    app.wait_until_drained().await;
    let requests = app.github.requests();
    let answered: Vec<u16> = requests.iter().map(|r| r.answered).collect();
    assert!(
        answered.contains(&502) && answered.contains(&429),
        "{answered:?}"
    );
    assert_no_pending_after_a_final_state(&requests);
    app.stop().await;
}

/// The reporter binary on the app's NATS and fake GitHub, with `env` added.
fn reporter_process(app: &TestApp, env: &[(&str, &str)]) -> ServiceProcess {
    let nats_url = app.nats.url();
    let api_url = app.github.url();
    let mut all = vec![
        ("NATS_URL", nats_url.as_str()),
        ("GITHUB_API_URL", api_url.as_str()),
        ("RUST_LOG", "debug"),
    ];
    all.extend_from_slice(env);
    let log = app
        .logs
        .path()
        .join(format!("reporter-{}.log", app.reporters.len()));
    ServiceProcess::spawn("iac-reporter", all, log)
}

/// SIGTERM, then waits for a clean exit; returns everything it printed.
fn stop_process(mut reporter: ServiceProcess) -> String {
    let status = reporter
        .terminate(TIMEOUT)
        .expect("the reporter was running");
    assert!(status.success(), "{status:?}\n{}", reporter.output());
    reporter.output()
}

#[tokio::test]
async fn without_a_token_statuses_are_only_logged() {
    let app = TestApp::start().await;
    let reporter = reporter_process(&app, &[]);
    let commit = sha(1);
    app.finished(&finished(1, &commit, synced(&["platform/postgres"])))
        .await;

    wait_for("the status in the log", TIMEOUT, || {
        let logged = reporter.output().contains("would post this status");
        async move { logged.then_some(()) }
    })
    .await;
    let output = stop_process(reporter);
    assert!(
        output.contains("GITHUB_TOKEN is not set: log-only mode"),
        "{output}"
    );
    let line = output
        .lines()
        .find(|l| l.contains("would post this status"))
        .unwrap();
    assert!(line.contains(&commit) && line.contains("success"), "{line}");
    assert!(app.github.requests().is_empty());
}

#[tokio::test]
async fn the_token_never_appears_in_the_output() {
    let app = TestApp::start().await;
    let refused = sha(2);
    app.github.set_faults(Faults {
        bad_gateway_every: Some(2),
        refused_commits: HashMap::from([(refused.clone(), (401, "Bad credentials".to_string()))]),
        ..Faults::default()
    });
    let reporter = reporter_process(&app, &[("GITHUB_TOKEN", TOKEN)]);
    let commit = sha(1);
    app.finished(&refused_finished(&refused)).await;
    app.finished(&finished(2, &commit, synced(&["platform/postgres"])))
        .await;
    let shown = app.wait_for_shown(&commit, "success").await;
    assert_eq!(shown.headers["authorization"], format!("Bearer {TOKEN}"));
    app.wait_until_drained().await;

    let output = stop_process(reporter);
    assert!(output.contains("Bad credentials"), "{output}");
    assert!(output.contains("posted status"), "{output}");
    assert!(!output.contains(TOKEN), "{output}");

    let help = Command::new(iac_tests::tools::project_binary("iac-reporter"))
        .arg("--help")
        .env("GITHUB_TOKEN", TOKEN)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("GITHUB_TOKEN"), "{help}");
    assert!(!help.contains(TOKEN), "{help}");
}

fn refused_finished(commit: &str) -> SyncFinished {
    finished(1, commit, synced(&["platform/postgres"]))
}
