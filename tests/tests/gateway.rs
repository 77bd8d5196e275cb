//! The gateway against a real nats-server: what GitHub and operators see, and what is stored.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::StreamMessage};
use iac_gateway::Config;
use iac_shared::events::{PushEvent, SyncRequest};
use iac_shared::names::*;
use iac_shared::signature::{SIGNATURE_HEADER, sign};
use iac_tests::fixture::push_payload;
use iac_tests::gateway_client::{self, Response, get, request, sample, send_raw};
use iac_tests::nats::NatsServer;
use iac_tests::process::ServiceProcess;
use iac_tests::services::InProcessGateway;
use iac_tests::tools::project_binary;
use iac_tests::wait_for;
use serde_json::{Value, json};

const SECRET: &str = "gateway-test-secret-5e1f0c";
const HEAD: &str = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c";
const BEFORE: &str = "9049f1265b7d61be4a8904a9a27120d2064dab3b";

/// Starts a gateway on `nats_url` without waiting for it to be ready.
async fn start_gateway_on(nats_url: &str, extra: &[&str]) -> InProcessGateway {
    let mut args = vec![
        "--webhook-secret",
        SECRET,
        "--nats-url",
        nats_url,
        "--publish-timeout",
        "2s",
    ];
    args.extend_from_slice(extra);
    let config = Config::try_from_args(args).expect("a valid configuration");
    InProcessGateway::start(config).await
}

/// Starts a gateway on `server` and waits until it is ready.
async fn start_gateway(server: &NatsServer, extra: &[&str]) -> InProcessGateway {
    let gateway = start_gateway_on(&server.url(), extra).await;
    gateway.wait_ready().await;
    gateway
}

/// Requests signed with the secret the test gateways are started with.
trait Signed {
    async fn push(&self, delivery: &str, body: &Value) -> Response;
    async fn sync(&self, body: &str) -> Response;
}

impl Signed for InProcessGateway {
    async fn push(&self, delivery: &str, body: &Value) -> Response {
        gateway_client::webhook(
            self.addr,
            SECRET,
            "push",
            delivery,
            body.to_string().as_bytes(),
        )
        .await
    }

    async fn sync(&self, body: &str) -> Response {
        gateway_client::sync(self.addr, SECRET, body.as_bytes()).await
    }
}

/// Every message in `IAC_EVENTS`, oldest first.
async fn stored_events(server: &NatsServer) -> Vec<StreamMessage> {
    let js = jetstream::new(server.client().await);
    let mut stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for seq in state.first_sequence..=state.last_sequence {
        messages.push(stream.direct_get(seq).await.unwrap());
    }
    messages
}

fn header(message: &StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

fn push_to_main(paths: &[&str]) -> Value {
    push_payload("refs/heads/main", BEFORE, HEAD, paths)
}

fn invalid_signature() -> Value {
    json!({"error": "Invalid signature"})
}

#[tokio::test]
async fn a_push_to_the_branch_is_stored_then_answered_with_its_services() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;

    let answer = gateway_client::webhook(
        gateway.addr,
        SECRET,
        "push",
        "delivery-1",
        &sample("push.json"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json(),
        json!({
            "status": "accepted",
            "services": ["finance_report/app", "platform/postgres"],
            "commit": "0d1a26e6",
            "event_id": "delivery-1",
        })
    );

    let stored = stored_events(&server).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].subject.as_str(), PUSH_SUBJECT);
    assert_eq!(header(&stored[0], MSG_ID_HEADER), "delivery-1");
    assert_eq!(header(&stored[0], EVENT_ID_HEADER), "delivery-1");
    let event: PushEvent = serde_json::from_slice(&stored[0].payload).unwrap();
    assert_eq!(event.delivery_id, "delivery-1");
    assert_eq!(event.repository.as_deref(), Some("acme/infra"));
    assert_eq!(event.git_ref, "refs/heads/main");
    assert_eq!(event.before.as_deref(), Some(BEFORE));
    assert_eq!(event.after.as_deref(), Some(HEAD));
    assert_eq!(event.head_commit.as_deref(), Some(HEAD));
    assert_eq!(event.pusher.as_deref(), Some("octocat"));
    // In the order the payload lists them, commit by commit.
    assert_eq!(
        event.paths,
        [
            "platform/01.postgres/compose.yaml",
            "finance_report/finance_report/10.app/settings.env",
            "docs/old-runbook.md",
            "README.md",
            "bootstrap/01.vault/compose.yaml",
        ]
    );
    assert!(!event.paths_truncated);
    assert!(
        !String::from_utf8_lossy(&stored[0].payload).contains("Mona Lisa"),
        "the raw payload is not stored"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn pushes_that_change_no_service_are_stored_as_no_changes_and_libs_as_all() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;

    let docs = gateway
        .push(
            "d-docs",
            &push_to_main(&["README.md", "bootstrap/01.vault/x"]),
        )
        .await;
    assert_eq!(
        docs.json(),
        json!({"status": "no_changes", "services": [], "commit": "0d1a26e6", "event_id": "d-docs"})
    );
    let libs = gateway
        .push("d-libs", &push_to_main(&["libs/common.py"]))
        .await;
    assert_eq!(libs.json()["status"], "accepted");
    assert_eq!(libs.json()["services"], json!(["__all__"]));

    let ids: Vec<String> = stored_events(&server)
        .await
        .iter()
        .map(|m| header(m, EVENT_ID_HEADER))
        .collect();
    assert_eq!(ids, ["d-docs", "d-libs"]);
}

#[tokio::test]
async fn ping_is_answered_with_the_hook_id_and_not_stored() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let answer =
        gateway_client::webhook(gateway.addr, SECRET, "ping", "d-ping", &sample("ping.json")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json(),
        json!({"status": "pong", "hook_id": 478213664})
    );
    assert!(stored_events(&server).await.is_empty());
}

#[tokio::test]
async fn other_events_branches_tags_and_deletions_are_ignored_and_not_stored() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;

    let issue = gateway_client::webhook(
        gateway.addr,
        SECRET,
        "issues",
        "d-1",
        br#"{"action":"opened"}"#,
    )
    .await;
    assert_eq!(issue.status, 200);
    assert_eq!(
        issue.json(),
        json!({"status": "ignored", "event": "issues"})
    );

    let mut deleted = push_to_main(&["platform/01.postgres/x"]);
    deleted["deleted"] = json!(true);
    let mut zero_after = push_to_main(&["platform/01.postgres/x"]);
    zero_after["after"] = json!("0000000000000000000000000000000000000000");
    for (body, reason) in [
        (
            push_payload("refs/heads/dev", BEFORE, HEAD, &["platform/01.postgres/x"]),
            "another branch",
        ),
        (
            push_payload(
                "refs/tags/v1.2.0",
                BEFORE,
                HEAD,
                &["platform/01.postgres/x"],
            ),
            "a tag",
        ),
        (deleted, "deleted"),
        (zero_after, "deleted"),
    ] {
        let answer = gateway.push("d-2", &body).await;
        assert_eq!(answer.status, 200);
        let answer = answer.json();
        assert_eq!(answer["status"], "ignored");
        assert!(
            answer["reason"].as_str().unwrap().contains(reason),
            "{answer}"
        );
    }
    assert!(stored_events(&server).await.is_empty());
}

#[tokio::test]
async fn redelivered_push_is_stored_once_and_answered_200_each_time() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let body = push_to_main(&["platform/02.redis/compose.yaml"]);
    let mut duplicates = 0;
    for _ in 0..5 {
        let answer = gateway
            .push("72d3162e-cc78-11e3-81ab-4c9367dc0958", &body)
            .await;
        assert_eq!(answer.status, 200);
        let answer = answer.json();
        assert_eq!(answer["status"], "accepted");
        assert_eq!(answer["services"], json!(["platform/redis"]));
        if answer["duplicate"] == json!(true) {
            duplicates += 1;
        }
    }
    assert_eq!(duplicates, 4);
    assert_eq!(stored_events(&server).await.len(), 1);

    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("iac_gateway_duplicates_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"iac_gateway_events_published_total{subject="iac.events.push"} 5"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"iac_gateway_requests_total{endpoint="webhook",outcome="accepted"} 5"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("iac_gateway_request_duration_seconds"),
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_pushes_are_each_stored_once_and_each_answer_is_its_own() {
    // Events that arrive together are published together: the answers must not mix.
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let pushes = 40;
    let requests = (0..pushes).flat_map(|n| {
        // Every delivery twice at once, as a redelivery racing the original.
        let body = push_to_main(&[&format!("platform/{n:02}.svc{n}/compose.yaml")]);
        let gateway = &gateway;
        (0..2).map(move |_| {
            let body = body.clone();
            async move { (n, gateway.push(&format!("delivery-{n}"), &body).await) }
        })
    });
    let answers = futures::future::join_all(requests).await;
    let mut duplicates = vec![0; pushes];
    for (n, answer) in answers {
        assert_eq!(answer.status, 200, "{}", answer.text());
        let answer = answer.json();
        assert_eq!(answer["event_id"], format!("delivery-{n}"));
        assert_eq!(answer["services"], json!([format!("platform/svc{n}")]));
        if answer["duplicate"] == json!(true) {
            duplicates[n] += 1;
        }
    }
    assert!(
        duplicates.iter().all(|&d| d == 1),
        "one of each pair is the duplicate: {duplicates:?}"
    );
    let stored = stored_events(&server).await;
    assert_eq!(stored.len(), pushes);
    let mut seen: Vec<String> = stored
        .iter()
        .map(|message| {
            let event: PushEvent = serde_json::from_slice(&message.payload).unwrap();
            let n: usize = event.delivery_id["delivery-".len()..].parse().unwrap();
            assert_eq!(header(message, MSG_ID_HEADER), event.delivery_id);
            assert_eq!(
                event.paths,
                [format!("platform/{n:02}.svc{n}/compose.yaml")]
            );
            event.delivery_id
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), pushes, "each delivery stored once");
}

#[tokio::test]
async fn a_push_without_delivery_id_gets_a_generated_event_id() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let body = push_to_main(&["platform/01.postgres/x"]).to_string();
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let answer = request(
        gateway.addr,
        "POST",
        "/webhook",
        &[("X-GitHub-Event", "push"), (SIGNATURE_HEADER, &signature)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let event_id = answer.json()["event_id"].as_str().unwrap().to_string();
    assert_eq!(event_id.len(), 36, "a uuid: {event_id}");
    let stored = stored_events(&server).await;
    assert_eq!(header(&stored[0], MSG_ID_HEADER), event_id);
}

#[tokio::test]
async fn unsigned_and_wrongly_signed_requests_are_refused_before_the_body_is_read() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let body = push_to_main(&["platform/01.postgres/x"]).to_string();
    let good = sign(SECRET.as_bytes(), body.as_bytes());
    let other_secret = sign(b"not the secret", body.as_bytes());
    let other_body = sign(SECRET.as_bytes(), b"{}");
    let sha1_style = good.replace("sha256=", "sha1=");
    for path in ["/webhook", "/sync"] {
        for headers in [
            vec![],
            vec![(SIGNATURE_HEADER, "sha256=zz")],
            vec![(SIGNATURE_HEADER, other_secret.as_str())],
            vec![(SIGNATURE_HEADER, other_body.as_str())],
            vec![(SIGNATURE_HEADER, sha1_style.as_str())],
            vec![("X-Hub-Signature", sha1_style.as_str())],
        ] {
            let mut headers = headers;
            headers.push(("X-GitHub-Event", "push"));
            let answer = request(gateway.addr, "POST", path, &headers, body.as_bytes()).await;
            assert_eq!(answer.status, 401, "{path} {headers:?}");
            assert_eq!(answer.json(), invalid_signature());
        }
    }
    assert!(stored_events(&server).await.is_empty());
}

#[tokio::test]
async fn githubs_documented_test_vector_is_accepted_over_http() {
    let server = NatsServer::start();
    let mut args = vec!["--nats-url".to_string(), server.url()];
    args.extend([
        "--webhook-secret".into(),
        "It's a Secret to Everybody".into(),
    ]);
    let config = Config::try_from_args(args).unwrap();
    let gateway = InProcessGateway::start(config).await;
    let addr = gateway.addr;

    let documented = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    let send = |signature: &'static str| async move {
        request(
            addr,
            "POST",
            "/webhook",
            &[("X-GitHub-Event", "ping"), (SIGNATURE_HEADER, signature)],
            b"Hello, World!",
        )
        .await
    };
    // The signature passes; "Hello, World!" is then refused for not being JSON.
    let answer = send(documented).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(
        answer.json()["error"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let tampered = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e18";
    assert_eq!(send(tampered).await.status, 401);
    gateway.stop().await;
}

/// `application/x-www-form-urlencoded` encoding of a form value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn form_encoded_deliveries_are_read_from_the_payload_field() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let push = String::from_utf8(sample("push.json")).unwrap();
    let send = |body: String| async move {
        let signature = sign(SECRET.as_bytes(), body.as_bytes());
        request(
            gateway.addr,
            "POST",
            "/webhook",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("X-GitHub-Event", "push"),
                ("X-GitHub-Delivery", "d-form"),
                (SIGNATURE_HEADER, &signature),
            ],
            body.as_bytes(),
        )
        .await
    };
    let answer = send(format!("payload={}", form_encode(&push))).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json()["services"],
        json!(["finance_report/app", "platform/postgres"])
    );

    let missing = send("other=1".into()).await;
    assert_eq!(missing.status, 400);
    assert_eq!(
        missing.json(),
        json!({"error": "Form body has no payload field"})
    );
    assert_eq!(stored_events(&server).await.len(), 1);
}

#[tokio::test]
async fn bad_bodies_are_refused_with_400_saying_what_is_wrong() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let cases: [(&[u8], &str); 4] = [
        (b"{\"ref\": ", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (
            br#"{"after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"}"#,
            "no ref",
        ),
        (br#"{"ref": ["refs/heads/main"]}"#, "not valid JSON"),
    ];
    for (body, words) in cases {
        let answer = gateway_client::webhook(gateway.addr, SECRET, "push", "d-bad", body).await;
        assert_eq!(answer.status, 400, "{}", String::from_utf8_lossy(body));
        let error = answer.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(words), "{error:?} should say {words:?}");
    }
    let no_after = gateway
        .push("d-head", &json!({"ref": "refs/heads/main"}))
        .await;
    assert_eq!(no_after.status, 200);
    assert_eq!(no_after.json()["status"], "no_changes");
    let stored = stored_events(&server).await;
    assert_eq!(stored.len(), 1);
    let event: PushEvent = serde_json::from_slice(&stored[0].payload).unwrap();
    assert_eq!(
        event.after, None,
        "no after: the branch head when the sync runs"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_with_413_without_being_read() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--max-body-bytes", "1024"]).await;

    // Announced too large: answered before a byte of the body is sent.
    let announced = send_raw(
        gateway.addr,
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\nX-GitHub-Event: push\r\n\r\n",
    )
    .await;
    assert_eq!(announced.status, 413);
    assert!(announced.json()["error"].as_str().unwrap().contains("1024"));

    // Chunked, no length: refused once the chunks pass the limit, the rest never sent.
    let chunk = "x".repeat(800);
    let chunked = format!(
        "POST /sync HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n{chunk}\r\n320\r\n{chunk}\r\n"
    );
    let answer = send_raw(gateway.addr, chunked.as_bytes()).await;
    assert_eq!(answer.status, 413);

    // Within the limit, chunked: read to the end and handled.
    let body = r#"{"all": true}"#;
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let small = format!(
        "POST /sync HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{SIGNATURE_HEADER}: {signature}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let answer = send_raw(gateway.addr, small.as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(stored_events(&server).await.len(), 1);
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--body-read-timeout", "300ms"]).await;
    let started = Instant::now();
    let answer = send_raw(
        gateway.addr,
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nX-GitHub-Event: push\r\n\r\n{\"ref\": ",
    )
    .await;
    assert_eq!(answer.status, 408);
    assert!(answer.json()["error"].as_str().unwrap().contains("300ms"));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn manual_sync_requests_are_validated_and_stored() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;

    let one = gateway
        .sync(r#"{"services": ["platform/postgres"], "ref": "main", "force": true}"#)
        .await;
    assert_eq!(one.status, 200, "{}", one.text());
    let one = one.json();
    assert_eq!(one["status"], "accepted");
    assert_eq!(one["services"], json!(["platform/postgres"]));
    let all = gateway.sync(r#"{"all": true}"#).await.json();
    assert_eq!(all["services"], json!(["__all__"]));

    let none = gateway.sync("{}").await;
    assert_eq!(none.status, 400);
    assert_eq!(none.json(), json!({"error": "No services specified"}));
    let bad = gateway.sync(r#"{"services": ["platform/../etc"]}"#).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("platform/../etc")
    );
    let typo = gateway.sync(r#"{"service": ["platform/postgres"]}"#).await;
    assert_eq!(typo.status, 400);

    let stored = stored_events(&server).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].subject.as_str(), SYNC_SUBJECT);
    assert_eq!(
        header(&stored[0], EVENT_ID_HEADER),
        one["event_id"].as_str().unwrap()
    );
    assert_eq!(
        header(&stored[0], MSG_ID_HEADER),
        one["event_id"].as_str().unwrap()
    );
    let request: SyncRequest = serde_json::from_slice(&stored[0].payload).unwrap();
    assert_eq!(request.services, ["platform/postgres"]);
    assert_eq!(request.git_ref.as_deref(), Some("main"));
    assert!(request.force);
    let request: SyncRequest = serde_json::from_slice(&stored[1].payload).unwrap();
    assert!(request.all);
}

#[tokio::test]
async fn nats_outage_is_answered_503_quickly_and_the_gateway_recovers_by_itself() {
    let mut server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let body = push_to_main(&["platform/01.postgres/x"]);
    assert_eq!(gateway.push("before-outage", &body).await.status, 200);

    server.stop();
    wait_for(
        "/ready to report the outage",
        Duration::from_secs(10),
        || async { (get(gateway.addr, "/ready").await.status == 503).then_some(()) },
    )
    .await;
    let started = Instant::now();
    let answer = gateway.push("during-outage", &body).await;
    assert_eq!(answer.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "503 within the publish timeout"
    );
    let error = answer.json()["error"].as_str().unwrap().to_string();
    assert!(error.starts_with("Event store unavailable: "), "{error}");
    let sync = gateway.sync(r#"{"all": true}"#).await;
    assert_eq!(sync.status, 503);
    assert_eq!(get(gateway.addr, "/health").await.status, 200);

    server.restart();
    gateway.wait_ready().await;
    let after = gateway.push("after-outage", &body).await;
    assert_eq!(after.status, 200, "{}", after.text());

    let ids: Vec<String> = stored_events(&server)
        .await
        .iter()
        .map(|m| header(m, EVENT_ID_HEADER))
        .collect();
    assert_eq!(
        ids,
        ["before-outage", "after-outage"],
        "nothing answered 503 was stored"
    );
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("iac_gateway_publish_failures_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_store_without_the_events_stream_is_answered_503_never_200() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let js = jetstream::new(server.client().await);
    js.delete_stream(EVENTS_STREAM).await.unwrap();

    let answer = gateway
        .push("lost", &push_to_main(&["platform/01.postgres/x"]))
        .await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(
        answer.json(),
        json!({"error": "Event store unavailable: no stream stores the subject"})
    );
    let sync = gateway.sync(r#"{"all": true}"#).await;
    assert_eq!(sync.status, 503);
}

#[tokio::test]
async fn the_gateway_answers_health_before_nats_exists_and_becomes_ready_when_it_does() {
    let mut server = NatsServer::start();
    server.stop();
    let gateway = start_gateway_on(&server.url(), &[]).await;
    wait_for("/health", Duration::from_secs(5), || async {
        let health = get(gateway.addr, "/health").await;
        (health.status == 200).then_some(())
    })
    .await;
    assert_eq!(
        get(gateway.addr, "/health").await.json(),
        json!({"status": "healthy"})
    );
    assert_eq!(get(gateway.addr, "/ready").await.status, 503);
    let answer = gateway.push("too-early", &push_to_main(&["libs/x"])).await;
    assert_eq!(answer.status, 503);

    server.restart();
    gateway.wait_ready().await;
    assert_eq!(
        gateway
            .push("in-time", &push_to_main(&["libs/x"]))
            .await
            .status,
        200
    );
    let js = jetstream::new(server.client().await);
    let events = js.get_stream(EVENTS_STREAM).await.unwrap();
    events
        .consumer_info(WORKER_CONSUMER)
        .await
        .expect("provisioned the worker's consumer");
    assert_eq!(stored_events(&server).await.len(), 1);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_in_json() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let missing = get(gateway.addr, "/nope").await;
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].is_string());
    for (method, path) in [("GET", "/webhook"), ("GET", "/sync"), ("POST", "/health")] {
        let answer = request(gateway.addr, method, path, &[], b"").await;
        assert_eq!(answer.status, 405, "{method} {path}");
        assert!(answer.json()["error"].is_string());
    }
    let metrics = get(gateway.addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(
        text.contains("iac_gateway_publish_failures_total 0"),
        "{text}"
    );
}

#[tokio::test]
async fn the_stream_holds_exactly_the_events_that_should_be_there() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let body = push_to_main(&["platform/01.postgres/x"]);
    let raw = body.to_string();

    gateway.push("good-1", &body).await;
    request(
        gateway.addr,
        "POST",
        "/webhook",
        &[("X-GitHub-Event", "push")],
        raw.as_bytes(),
    )
    .await;
    gateway_client::webhook(gateway.addr, "wrong", "push", "forged", raw.as_bytes()).await;
    gateway_client::webhook(gateway.addr, SECRET, "push", "broken", b"{").await;
    gateway
        .push(
            "other-branch",
            &push_payload("refs/heads/dev", BEFORE, HEAD, &["libs/x"]),
        )
        .await;
    gateway_client::webhook(gateway.addr, SECRET, "ping", "ping", &sample("ping.json")).await;
    gateway.sync(r#"{"services": []}"#).await;
    let sync = gateway
        .sync(r#"{"services": ["platform/redis"]}"#)
        .await
        .json();
    gateway.push("good-1", &body).await;
    gateway.push("good-2", &body).await;

    let ids: Vec<(String, String)> = stored_events(&server)
        .await
        .iter()
        .map(|m| (m.subject.to_string(), header(m, EVENT_ID_HEADER)))
        .collect();
    assert_eq!(
        ids,
        [
            (PUSH_SUBJECT.to_string(), "good-1".to_string()),
            (
                SYNC_SUBJECT.to_string(),
                sync["event_id"].as_str().unwrap().to_string()
            ),
            (PUSH_SUBJECT.to_string(), "good-2".to_string()),
        ]
    );
}

#[tokio::test]
async fn a_push_too_large_for_one_message_is_stored_with_its_paths_cut() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    // About 3 MB of paths: three times the server's max_payload.
    let paths: Vec<String> = (0..40_000)
        .map(|i| {
            format!(
                "platform/01.postgres/generated/config-{i:06}-{}.yaml",
                "x".repeat(40)
            )
        })
        .collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let answer = gateway.push("huge", &push_to_main(&refs)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["services"], json!(["platform/postgres"]));

    let stored = stored_events(&server).await;
    assert_eq!(stored.len(), 1);
    let event: PushEvent = serde_json::from_slice(&stored[0].payload).unwrap();
    assert!(event.paths_truncated);
    assert!(!event.paths.is_empty() && event.paths.len() < paths.len());
    assert_eq!(event.after.as_deref(), Some(HEAD));
}

#[test]
fn the_gateway_refuses_to_start_without_a_secret() {
    let output = Command::new(project_binary("iac-gateway"))
        .env_clear()
        .env("WEBHOOK_PORT", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("WEBHOOK_SECRET"), "{stderr}");
}

#[test]
fn help_never_shows_the_secret() {
    let output = Command::new(project_binary("iac-gateway"))
        .arg("--help")
        .env_clear()
        .env("WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("WEBHOOK_SECRET"), "{help}");
    assert!(!help.contains(SECRET), "{help}");
}

#[tokio::test]
async fn the_signature_printed_by_sign_is_accepted() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let body = r#"{"services": ["platform/postgres"]}"#;
    let output = Command::new(project_binary("iac-gateway"))
        .args(["sign", body])
        .env_clear()
        .env("WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let signature = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert!(signature.starts_with("sha256="), "{signature}");
    let answer = request(
        gateway.addr,
        "POST",
        "/sync",
        &[(SIGNATURE_HEADER, &signature)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test]
async fn the_secret_never_appears_in_the_logs() {
    let server = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let nats_url = server.url();
    let mut gateway = ServiceProcess::spawn(
        "iac-gateway",
        [
            ("WEBHOOK_SECRET", SECRET),
            ("WEBHOOK_PORT", "0"),
            ("WEBHOOK_BIND", "127.0.0.1"),
            ("NATS_URL", nats_url.as_str()),
            ("RUST_LOG", "trace"),
        ],
        logs.path().join("gateway.log"),
    );
    let addr = wait_for(
        "the gateway binary to be ready",
        Duration::from_secs(15),
        || {
            assert!(
                gateway.is_running(),
                "the gateway exited:\n{}",
                gateway.output()
            );
            let port = gateway.logged_port("gateway listening");
            async move {
                let addr: SocketAddr = ([127, 0, 0, 1], port?).into();
                (get(addr, "/ready").await.status == 200).then_some(addr)
            }
        },
    )
    .await;

    let body = push_to_main(&["platform/01.postgres/x"]).to_string();
    let good = sign(SECRET.as_bytes(), body.as_bytes());
    let wrong = sign(b"guess", body.as_bytes());
    assert_eq!(
        gateway_client::webhook(addr, SECRET, "push", "logged-delivery", body.as_bytes())
            .await
            .status,
        200
    );
    for signature in [&wrong, &good] {
        request(
            addr,
            "POST",
            "/webhook",
            &[(SIGNATURE_HEADER, signature.as_str())],
            b"{}",
        )
        .await;
    }
    gateway_client::sync(addr, SECRET, b"{}").await;

    let status = gateway
        .terminate(Duration::from_secs(10))
        .expect("the gateway was running");
    assert!(status.success(), "graceful stop on SIGTERM: {status}");
    let logs = gateway.output();
    assert!(
        logs.contains("logged-delivery"),
        "the logs were captured: {logs}"
    );
    for secret in [SECRET, &good[7..], &wrong[7..]] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
}

/// Everything the gateway sends on `stream` until it closes the connection; fails the test
/// when it is still open after `within`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection was still open after {within:?}"
    );
    received
}

async fn connect(addr: SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting")
}

#[tokio::test]
async fn silent_half_sent_and_idle_connections_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--header-read-timeout", "1s"]).await;

    let mut silent = connect(gateway.addr).await;
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(10))
            .await
            .is_empty()
    );

    let mut half_sent = connect(gateway.addr).await;
    half_sent
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Ev")
        .await
        .unwrap();
    let answer = read_until_closed(&mut half_sent, Duration::from_secs(10)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 2"), "{answer:?}");

    // Keep-alive: answered, then closed once it sends no next request.
    let mut idle = connect(gateway.addr).await;
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn a_connection_over_the_limit_is_refused_and_counted() {
    use tokio::io::AsyncWriteExt;
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--max-connections", "2"]).await;
    let held = [connect(gateway.addr).await, connect(gateway.addr).await];

    let mut extra = connect(gateway.addr).await;
    // The write may fail when the gateway closed first: the read below tells what happened.
    let _ = extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut extra, Duration::from_secs(10)).await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    drop(held);
    let metrics = wait_for(
        "the gateway to serve again once connections closed",
        Duration::from_secs(10),
        || async {
            // Not `get`, which fails the test on a refused connection.
            let mut probe = connect(gateway.addr).await;
            let asked = probe
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let answer = read_until_closed(&mut probe, Duration::from_secs(10)).await;
            let answer = String::from_utf8_lossy(&answer).into_owned();
            (asked.is_ok() && answer.starts_with("HTTP/1.1 200")).then_some(answer)
        },
    )
    .await;
    assert!(
        metrics.contains("iac_gateway_connections_refused_total 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_sync_body_over_64_kib_is_refused_with_413() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let request = r#"{"all": true}"#;

    // Announced over 64 KiB: answered before a byte of the body is sent (a client still
    // sending would see the connection closed under it).
    let over = send_raw(
        gateway.addr,
        format!(
            "POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            65 * 1024
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(over.status, 413, "{}", over.text());
    assert!(over.json()["error"].as_str().unwrap().contains("65536"));
    assert!(stored_events(&server).await.is_empty());

    let padded = |size: usize| format!("{request}{}", " ".repeat(size - request.len()));

    let within = gateway.sync(&padded(64 * 1024)).await;
    assert_eq!(within.status, 200, "{}", within.text());
    assert_eq!(stored_events(&server).await.len(), 1);
}
