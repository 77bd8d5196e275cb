//! Bad input gets a clear answer and changes nothing: hostile or broken requests to the real
//! gateway binary, each with the status a user would expect, and afterwards `IAC_EVENTS` holds
//! exactly the events that were valid.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use async_nats::jetstream;
use iac_shared::names::{EVENTS_STREAM, PUSH_SUBJECT, SYNC_SUBJECT};
use iac_shared::signature::sign;
use iac_tests::fixture::push_payload;
use iac_tests::http;
use iac_tests::pipeline::{Pipeline, SECRET};
use serde_json::{Value, json};

/// One request of the table.
struct Case {
    name: &'static str,
    path: &'static str,
    event: Option<&'static str>,
    content_type: &'static str,
    body: Vec<u8>,
    signature: Signature,
    expected: u16,
}

enum Signature {
    /// A correct `X-Hub-Signature-256` over the body.
    Valid,
    /// No signature header at all.
    Missing,
    /// This exact `X-Hub-Signature-256` value.
    Header(String),
    /// Only GitHub's old SHA-1 header.
    Sha1Only,
    /// A correct signature, but over other bytes.
    OverOtherBody,
}

const COMMIT: &str = "59b20b8d5c6ff8d09518454d4dd8b7a30f095ab5";
const BEFORE: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";

fn push(git_ref: &str) -> Vec<u8> {
    serde_json::to_vec(&push_payload(
        git_ref,
        BEFORE,
        COMMIT,
        &["platform/01.postgres/compose.yaml"],
    ))
    .unwrap()
}

fn with(mut value: Value, key: &str, v: Value) -> Vec<u8> {
    value[key] = v;
    serde_json::to_vec(&value).unwrap()
}

fn sync(body: Value) -> Vec<u8> {
    serde_json::to_vec(&body).unwrap()
}

fn cases() -> Vec<Case> {
    let valid_push = push("refs/heads/main");
    let push_value: Value = serde_json::from_slice(&valid_push).unwrap();
    let case = |name, path, event, body: Vec<u8>, signature, expected| Case {
        name,
        path,
        event,
        content_type: "application/json",
        body,
        signature,
        expected,
    };
    let form = |name, body: &str, expected| Case {
        name,
        path: "/webhook",
        event: Some("push"),
        content_type: "application/x-www-form-urlencoded",
        body: body.as_bytes().to_vec(),
        signature: Signature::Valid,
        expected,
    };
    // Over the service limit, yet within the 64 KiB a /sync body may have (a larger body is
    // answered 413 before it is read: `gateway.rs` checks that over a raw connection).
    let too_many: Vec<String> = (0..1_001).map(|i| format!("p/s{i}")).collect();
    let mut no_ref = push_value.clone();
    no_ref.as_object_mut().unwrap().remove("ref");
    vec![
        // Signatures: checked before anything else.
        case(
            "no signature",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::Missing,
            401,
        ),
        case(
            "empty signature",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::Header(String::new()),
            401,
        ),
        case(
            "not hex",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::Header(format!("sha256={}", "g".repeat(64))),
            401,
        ),
        case(
            "bare hex without sha256=",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::Header(sign(SECRET.as_bytes(), &valid_push)[7..].to_string()),
            401,
        ),
        case(
            "another secret",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::Header(sign(b"not the secret", &valid_push)),
            401,
        ),
        case(
            "SHA-1 header only",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::Sha1Only,
            401,
        ),
        case(
            "signature over another body",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::OverOtherBody,
            401,
        ),
        case(
            "truncated signature",
            "/webhook",
            Some("push"),
            valid_push.clone(),
            Signature::Header(sign(SECRET.as_bytes(), &valid_push)[..40].to_string()),
            401,
        ),
        // Signed, but broken bodies.
        case(
            "empty body",
            "/webhook",
            Some("push"),
            Vec::new(),
            Signature::Valid,
            400,
        ),
        case(
            "truncated JSON",
            "/webhook",
            Some("push"),
            valid_push[..valid_push.len() / 2].to_vec(),
            Signature::Valid,
            400,
        ),
        case(
            "JSON array",
            "/webhook",
            Some("push"),
            b"[1, 2, 3]".to_vec(),
            Signature::Valid,
            400,
        ),
        case(
            "push without ref",
            "/webhook",
            Some("push"),
            serde_json::to_vec(&no_ref).unwrap(),
            Signature::Valid,
            400,
        ),
        case(
            "ref is a number",
            "/webhook",
            Some("push"),
            with(push_value.clone(), "ref", json!(42)),
            Signature::Valid,
            400,
        ),
        case(
            "not UTF-8",
            "/webhook",
            Some("push"),
            vec![0xff, 0xfe, b'{', 0x80],
            Signature::Valid,
            400,
        ),
        form("form without payload", "other=1", 400),
        form("form payload not JSON", "payload=%7Bnot-json", 400),
        // Signed, well-formed, but nothing to store.
        case(
            "unknown event",
            "/webhook",
            Some("issues"),
            b"{\"action\": \"opened\"}".to_vec(),
            Signature::Valid,
            200,
        ),
        case(
            "tag push",
            "/webhook",
            Some("push"),
            push("refs/tags/v1.0.0"),
            Signature::Valid,
            200,
        ),
        case(
            "other branch",
            "/webhook",
            Some("push"),
            push("refs/heads/feature"),
            Signature::Valid,
            200,
        ),
        case(
            "branch deletion",
            "/webhook",
            Some("push"),
            with(push_value.clone(), "deleted", json!(true)),
            Signature::Valid,
            200,
        ),
        case(
            "after all zeros",
            "/webhook",
            Some("push"),
            with(push_value.clone(), "after", json!("0".repeat(40))),
            Signature::Valid,
            200,
        ),
        case(
            "ping",
            "/webhook",
            Some("ping"),
            b"{\"zen\": \"Keep it logically awesome.\", \"hook_id\": 1}".to_vec(),
            Signature::Valid,
            200,
        ),
        // Manual syncs.
        case(
            "sync unsigned",
            "/sync",
            None,
            sync(json!({"all": true})),
            Signature::Missing,
            401,
        ),
        case(
            "sync with no services",
            "/sync",
            None,
            sync(json!({})),
            Signature::Valid,
            400,
        ),
        case(
            "sync with empty services",
            "/sync",
            None,
            sync(json!({"services": []})),
            Signature::Valid,
            400,
        ),
        case(
            "sync key with ..",
            "/sync",
            None,
            sync(json!({"services": ["platform/../etc"]})),
            Signature::Valid,
            400,
        ),
        case(
            "sync key with a second /",
            "/sync",
            None,
            sync(json!({"services": ["platform/a/b"]})),
            Signature::Valid,
            400,
        ),
        case(
            "sync key with shell characters",
            "/sync",
            None,
            sync(json!({"services": ["platform/$(rm -rf /)"]})),
            Signature::Valid,
            400,
        ),
        case(
            "sync key with NUL",
            "/sync",
            None,
            sync(json!({"services": ["platform/a\u{0}b"]})),
            Signature::Valid,
            400,
        ),
        case(
            "sync key with a leading dot",
            "/sync",
            None,
            sync(json!({"services": ["platform/.git"]})),
            Signature::Valid,
            400,
        ),
        case(
            "sync of 1,001 services",
            "/sync",
            None,
            sync(json!({"services": too_many})),
            Signature::Valid,
            400,
        ),
        case(
            "sync services not a list",
            "/sync",
            None,
            sync(json!({"services": "platform/postgres"})),
            Signature::Valid,
            400,
        ),
        case(
            "sync with a typo",
            "/sync",
            None,
            sync(json!({"service": ["platform/postgres"]})),
            Signature::Valid,
            400,
        ),
        case(
            "sync ref that is an option",
            "/sync",
            None,
            sync(json!({"all": true, "ref": "--upload-pack=touch /tmp/x"})),
            Signature::Valid,
            400,
        ),
        case(
            "sync truncated JSON",
            "/sync",
            None,
            b"{\"all\": tr".to_vec(),
            Signature::Valid,
            400,
        ),
        // The two valid requests: the only ones that may be stored.
        case(
            "valid push",
            "/webhook",
            Some("push"),
            valid_push,
            Signature::Valid,
            200,
        ),
        case(
            "valid sync",
            "/sync",
            None,
            sync(json!({"services": ["platform/postgres"]})),
            Signature::Valid,
            200,
        ),
    ]
}

/// Sends `head` over a raw connection, then whatever `then` writes; returns the start of the
/// answer (the gateway may answer before the request is complete).
async fn raw_request(
    port: u16,
    head: Vec<u8>,
    then: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> String {
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(&head).unwrap();
        then(&mut stream);
        let mut answer = vec![0u8; 64];
        let n = stream.read(&mut answer).unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn hostile_requests_get_clear_answers_and_only_valid_events_are_stored() {
    let mut pipeline = Pipeline::new("http://127.0.0.1:9");
    pipeline.set_env("gateway", "BODY_READ_TIMEOUT", "1s");
    let gateway = pipeline.start_gateway().await;
    let base = format!("http://127.0.0.1:{}", pipeline.gateway_port());
    let client = http();
    let cases = cases();
    assert!(cases.len() >= 30);
    for (i, case) in cases.iter().enumerate() {
        let mut request = client
            .post(format!("{base}{}", case.path))
            .header("Content-Type", case.content_type)
            .header("X-GitHub-Delivery", format!("hostile-{i}"))
            .body(case.body.clone());
        if let Some(event) = case.event {
            request = request.header("X-GitHub-Event", event);
        }
        request = match &case.signature {
            Signature::Valid => {
                request.header("X-Hub-Signature-256", sign(SECRET.as_bytes(), &case.body))
            }
            Signature::Missing => request,
            Signature::Header(value) => request.header("X-Hub-Signature-256", value),
            Signature::Sha1Only => request.header(
                "X-Hub-Signature",
                "sha1=0123456789abcdef0123456789abcdef01234567",
            ),
            Signature::OverOtherBody => {
                request.header("X-Hub-Signature-256", sign(SECRET.as_bytes(), b"{}"))
            }
        };
        let response = request.send().await.expect("the gateway answers");
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, case.expected, "{}: {answer}", case.name);
        if status >= 400 {
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(
                !error.is_empty(),
                "{}: no error message in {answer}",
                case.name
            );
        }
        if status == 401 {
            assert_eq!(
                answer,
                json!({"error": "Invalid signature"}),
                "{}",
                case.name
            );
        }
    }

    // Methods and routes.
    let get = client.get(format!("{base}/webhook")).send().await.unwrap();
    assert_eq!(get.status(), 405);
    let nowhere = client.post(format!("{base}/nowhere")).send().await.unwrap();
    assert_eq!(nowhere.status(), 404);

    // Bodies over MAX_BODY_BYTES (GitHub's 25 MiB), announced or streamed.
    // Announced: answered from the headers alone, before any of the body is sent.
    let port = pipeline.gateway_port();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: {}\r\n\r\n",
        26 * 1024 * 1024
    );
    let announced = raw_request(port, head.into_bytes(), |_| {}).await;
    assert!(
        announced.starts_with("HTTP/1.1 413"),
        "announced body answered: {announced:?}"
    );
    let head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunked = raw_request(port, head.to_vec(), |stream| {
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..27 {
            // The gateway may answer and close before everything is sent.
            if stream.write_all(b"100000\r\n").is_err()
                || stream.write_all(&chunk).is_err()
                || stream.write_all(b"\r\n").is_err()
            {
                break;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n");
    })
    .await;
    assert!(
        chunked.starts_with("HTTP/1.1 413"),
        "chunked body answered: {chunked:?}"
    );

    // A body slower than BODY_READ_TIMEOUT (1 s here): 7 of 100 bytes, then nothing.
    let head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: 100\r\n\r\n{\"ref\":";
    let slow = raw_request(port, head.to_vec(), |_| {}).await;
    assert!(
        slow.starts_with("HTTP/1.1 408"),
        "slow body answered: {slow:?}"
    );

    // Exactly the valid push and the valid sync were stored.
    let js = jetstream::new(pipeline.nats.as_ref().unwrap().client().await);
    let mut stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 2, "stored: {:?}", info.state);
    let first = stream.get_raw_message(1).await.unwrap();
    let second = stream.get_raw_message(2).await.unwrap();
    assert_eq!(first.subject.as_str(), PUSH_SUBJECT);
    assert_eq!(second.subject.as_str(), SYNC_SUBJECT);

    let output = gateway.output();
    assert!(!output.contains(SECRET), "the gateway logged its secret");
}
