//! Notifications (`NOTIFY_URL`) against a real nats-server, a fake GitHub and an HTTP endpoint
//! in the test: one POST when a service starts failing, one when it recovers, at most once per
//! state change with several reporters, signed, in Slack's shape, retried without holding up a
//! status.

use std::time::Duration;

use async_nats::jetstream;
use iac_reporter::Config;
use iac_shared::events::*;
use iac_shared::names::*;
use iac_shared::nats::{StreamSettings, provision};
use iac_shared::signature::verify;
use iac_tests::fake_github::FakeGithub;
use iac_tests::nats::NatsServer;
use iac_tests::services::InProcessReporter;
use iac_tests::wait_for;
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const TOKEN: &str = "ghp_test0123456789abcdefTOKEN";
const REPO: &str = "acme/infra";
const SYNC: &str = "IaC Runner / Sync";
const HOOK: &str = "/hooks/iac";
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test waits to be sure nothing more is sent.
const QUIET: Duration = Duration::from_millis(1500);

/// A nats-server with the streams, a fake GitHub, an endpoint for notifications, and reporters
/// running in this process.
struct TestApp {
    nats: NatsServer,
    github: FakeGithub,
    endpoint: MockServer,
    js: jetstream::Context,
    reporters: Vec<InProcessReporter>,
}

impl TestApp {
    async fn start() -> Self {
        let nats = NatsServer::start();
        let js = jetstream::new(nats.client().await);
        provision(&js, &StreamSettings::default()).await.unwrap();
        TestApp {
            nats,
            github: FakeGithub::start().await,
            endpoint: MockServer::start().await,
            js,
            reporters: Vec::new(),
        }
    }

    /// The endpoint answers `code` (after `delay`) to the next `times` notifications, or to
    /// every one after those already set up.
    async fn answer(&self, code: u16, delay: Duration, times: Option<u64>) {
        let mock = Mock::given(method("POST"))
            .and(path(HOOK))
            .respond_with(ResponseTemplate::new(code).set_delay(delay));
        match times {
            Some(n) => mock.up_to_n_times(n).with_priority(1),
            None => mock.with_priority(2),
        }
        .mount(&self.endpoint)
        .await;
    }

    fn spawn_reporter(&mut self, extra: &[&str]) {
        let url = self.nats.url();
        let api = self.github.url();
        let hook = format!("{}{HOOK}", self.endpoint.uri());
        let args = [
            "iac-reporter",
            "--nats-url",
            &url,
            "--github-api-url",
            &api,
            "--github-token",
            TOKEN,
            "--github-timeout",
            "5s",
            "--notify-url",
            &hook,
            "--status-target-url",
            "https://ci.example.com/runs/{event_id}",
        ];
        let config = Config::from_args(args.iter().chain(extra)).unwrap();
        self.reporters.push(InProcessReporter::start(config));
    }

    fn assert_reporters_alive(&self) {
        for reporter in &self.reporters {
            reporter.task.assert_running();
        }
    }

    async fn finished(&self, finished: &SyncFinished) {
        self.js
            .publish(
                FINISHED_SUBJECT,
                serde_json::to_vec(finished).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Every notification the endpoint received so far, answered or not.
    async fn notifications(&self) -> Vec<Request> {
        self.endpoint.received_requests().await.unwrap_or_default()
    }

    /// Waits until the endpoint received `n` notifications and returns them.
    async fn wait_for_notifications(&self, n: usize) -> Vec<Request> {
        wait_for(&format!("{n} notification(s)"), TIMEOUT, || {
            self.assert_reporters_alive();
            async move {
                let received = self.notifications().await;
                (received.len() >= n).then_some(received)
            }
        })
        .await
    }

    /// Waits until GitHub shows `state` on the whole-sync status of `commit`.
    async fn wait_for_shown(&self, commit: &str, state: &str) {
        wait_for(&format!("{state} on {commit}"), TIMEOUT, || {
            self.assert_reporters_alive();
            let shown = self
                .github
                .shown(commit, SYNC)
                .filter(|shown| shown.state() == state)
                .map(|_| ());
            async move { shown }
        })
        .await
    }

    /// Waits `QUIET`, then returns every notification received.
    async fn after_a_quiet_while(&self) -> Vec<Request> {
        tokio::time::sleep(QUIET).await;
        self.assert_reporters_alive();
        self.notifications().await
    }
}

fn sha(n: u64) -> String {
    format!("{:040x}", 0x00c0_ffee_0000_u64 + n)
}

fn result(service: &str, outcome: SyncOutcome) -> ServiceResult {
    ServiceResult {
        service: service.into(),
        task: Some("sync".into()),
        outcome,
        exit_code: match outcome {
            SyncOutcome::Synced => Some(0),
            SyncOutcome::Failed => Some(2),
            _ => None,
        },
        output_tail: vec![],
        duration_ms: 120,
        reason: None,
    }
}

/// The result of event `event_seq` on commit `sha(event_seq)` in production.
fn finished(event_seq: u64, services: Vec<ServiceResult>) -> SyncFinished {
    let totals = Totals::of(&services);
    SyncFinished {
        event_id: format!("event-{event_seq}"),
        event_seq,
        trigger: Trigger::Push,
        repository: Some(REPO.into()),
        commit: Some(sha(event_seq)),
        state: SyncFinished::state_of(&totals),
        services,
        totals,
        error: None,
        duration_ms: 300,
        replay_of: None,
        finished_at: now_rfc3339(),
        env: Some("production".into()),
        deployment_id: None,
        superseded_by: None,
    }
}

fn postgres(event_seq: u64, outcome: SyncOutcome) -> SyncFinished {
    finished(event_seq, vec![result("platform/postgres", outcome)])
}

fn json(request: &Request) -> Value {
    serde_json::from_slice(&request.body).unwrap()
}

fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_failure_then_a_recovery_send_two_notifications_saying_what_happened_where() {
    let mut app = TestApp::start().await;
    app.answer(200, Duration::ZERO, None).await;
    app.spawn_reporter(&[]);

    app.finished(&postgres(1, SyncOutcome::Failed)).await;
    let failure = json(&app.wait_for_notifications(1).await[0]);
    assert_eq!(failure["event"], "failure");
    assert_eq!(failure["service"], "platform/postgres");
    assert_eq!(failure["env"], "production");
    assert_eq!(failure["repository"], REPO);
    assert_eq!(failure["commit"], sha(1));
    assert_eq!(failure["outcome"], "failed");
    assert_eq!(failure["description"], "Failed with exit code 2");
    assert_eq!(failure["target_url"], "https://ci.example.com/runs/event-1");
    assert!(
        failure["time"].as_str().unwrap().starts_with("20"),
        "{failure}"
    );

    app.finished(&postgres(2, SyncOutcome::Synced)).await;
    let received = app.wait_for_notifications(2).await;
    let recovery = json(&received[1]);
    assert_eq!(recovery["event"], "recovery");
    assert_eq!(recovery["outcome"], "synced");
    assert_eq!(recovery["commit"], sha(2));
    assert!(
        header(&received[1], "x-hub-signature-256").is_none(),
        "unsigned without NOTIFY_SECRET"
    );
    assert_eq!(app.after_a_quiet_while().await.len(), 2);
}

#[tokio::test]
async fn a_success_after_a_success_and_a_failure_after_a_failure_send_nothing_new() {
    let mut app = TestApp::start().await;
    app.answer(200, Duration::ZERO, None).await;
    app.spawn_reporter(&[]);

    app.finished(&postgres(1, SyncOutcome::Synced)).await;
    app.finished(&postgres(2, SyncOutcome::Synced)).await;
    app.wait_for_shown(&sha(2), "success").await;
    assert!(app.after_a_quiet_while().await.is_empty());

    // Any outcome but synced is a failure, and a failure that goes on is announced once.
    app.finished(&postgres(3, SyncOutcome::TimedOut)).await;
    app.finished(&postgres(4, SyncOutcome::Blocked)).await;
    app.wait_for_shown(&sha(4), "failure").await;
    let received = app.after_a_quiet_while().await;
    assert_eq!(received.len(), 1);
    assert_eq!(json(&received[0])["outcome"], "timed_out");
}

#[tokio::test]
async fn a_notification_is_signed_with_notify_secret_over_its_body() {
    let mut app = TestApp::start().await;
    app.answer(200, Duration::ZERO, None).await;
    app.spawn_reporter(&["--notify-secret", "hook-secret"]);

    app.finished(&postgres(1, SyncOutcome::Failed)).await;
    let request = app.wait_for_notifications(1).await.remove(0);
    let signature = header(&request, "x-hub-signature-256");
    assert!(signature.is_some_and(|s| s.starts_with("sha256=")));
    assert!(verify(b"hook-secret", &request.body, signature));
    assert!(!verify(b"another-secret", &request.body, signature));
}

#[tokio::test]
async fn notify_format_slack_sends_a_text_a_slack_webhook_accepts() {
    let mut app = TestApp::start().await;
    app.answer(200, Duration::ZERO, None).await;
    app.spawn_reporter(&["--notify-format", "slack"]);

    app.finished(&postgres(1, SyncOutcome::Failed)).await;
    let body = json(&app.wait_for_notifications(1).await[0]);
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("*platform/postgres* failed to sync in production"),
        "{text}"
    );
    assert!(text.contains("Failed with exit code 2"), "{text}");
    assert!(
        text.contains("<https://ci.example.com/runs/event-1|run>"),
        "{text}"
    );
    assert!(body.get("event").is_none(), "{body}");
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_until_it_accepts_once_and_never_holds_up_a_status() {
    let mut app = TestApp::start().await;
    // The first notification hangs past its timeout, the next one gets a 503, then all is well.
    app.answer(200, Duration::from_secs(30), Some(1)).await;
    app.answer(503, Duration::ZERO, Some(1)).await;
    app.answer(200, Duration::ZERO, None).await;
    let port = iac_tests::free_port();
    let port_arg = port.to_string();
    app.spawn_reporter(&["--notify-timeout", "2s", "--metrics-port", &port_arg]);

    app.finished(&postgres(1, SyncOutcome::Failed)).await;
    app.wait_for_notifications(1).await;
    // The status does not wait for the endpoint, which is still holding the first request.
    tokio::time::timeout(
        Duration::from_secs(1),
        app.wait_for_shown(&sha(1), "failure"),
    )
    .await
    .expect("the status is posted while the endpoint hangs");
    app.finished(&postgres(2, SyncOutcome::Failed)).await;
    app.wait_for_shown(&sha(2), "failure").await;

    let received = app.wait_for_notifications(3).await;
    let ids: Vec<_> = received
        .iter()
        .map(|r| header(r, "x-iac-notification-id").unwrap().to_string())
        .collect();
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    assert_eq!(json(&received[2])["commit"], sha(1));
    assert_eq!(app.after_a_quiet_while().await.len(), 3);

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"iac_reporter_notifications_total{event="failure",outcome="retried"} 2"#,
        r#"iac_reporter_notifications_total{event="failure",outcome="sent"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn three_reporters_send_one_notification_per_change_of_state() {
    let mut app = TestApp::start().await;
    app.answer(200, Duration::ZERO, None).await;
    for _ in 0..3 {
        app.spawn_reporter(&["--reporter-concurrency", "2"]);
    }
    let services = ["platform/postgres", "platform/redis", "apps/web"];
    let all = |event_seq: u64, outcome| {
        finished(
            event_seq,
            services.iter().map(|s| result(s, outcome)).collect(),
        )
    };

    // Each result twice, as a redelivery or a replay would bring it, handled side by side.
    for event_seq in 1..=3 {
        for _ in 0..2 {
            app.finished(&all(event_seq, SyncOutcome::Failed)).await;
        }
    }
    app.wait_for_notifications(3).await;
    for event_seq in 4..=6 {
        for _ in 0..2 {
            app.finished(&all(event_seq, SyncOutcome::Synced)).await;
        }
    }
    app.wait_for_notifications(6).await;

    let received = app.after_a_quiet_while().await;
    let mut seen: Vec<_> = received
        .iter()
        .map(json)
        .map(|n| {
            let service = n["service"].as_str().unwrap().to_string();
            let event = n["event"].as_str().unwrap().to_string();
            (service, event)
        })
        .collect();
    seen.sort();
    let mut expected: Vec<_> = services
        .iter()
        .flat_map(|s| {
            [
                (s.to_string(), "failure".to_string()),
                (s.to_string(), "recovery".to_string()),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_notification_left_unsent_by_a_stopped_reporter_is_sent_by_the_next_one() {
    let mut app = TestApp::start().await;
    app.answer(503, Duration::ZERO, Some(1)).await;
    app.spawn_reporter(&[]);
    app.finished(&postgres(1, SyncOutcome::Failed)).await;
    app.wait_for_notifications(1).await;
    app.reporters.pop().unwrap().stop().await;

    // The endpoint is back; the stopped reporter's wait before its next attempt runs out.
    app.answer(200, Duration::ZERO, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.spawn_reporter(&[]);
    let received = app.wait_for_notifications(2).await;
    assert_eq!(json(&received[1])["event"], "failure");
    assert_eq!(json(&received[1])["commit"], sha(1));
    assert_eq!(app.after_a_quiet_while().await.len(), 2);
}
