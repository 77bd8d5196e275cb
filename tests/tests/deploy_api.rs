//! `POST /deploy` and `POST /deploy/status` against a real nats-server: what the original
//! runner's clients see, signatures accepted once across restarts and gateways, summaries read
//! from `IAC_DEPLOYMENTS` (written final here the way the worker writes them), `/sync`'s two
//! signature forms, and the repository check.

use std::time::Duration;

use async_nats::jetstream::{self, kv, message::StreamMessage};
use iac_gateway::Config;
use iac_shared::deploy::{
    DeployRequest, DeploymentResult, DeploymentStatus, DeploymentSummary, ServiceSummary,
    deployment_id, normalize_services,
};
use iac_shared::events::SyncOutcome;
use iac_shared::names::*;
use iac_tests::fixture::push_payload;
use iac_tests::gateway_client::{
    self, Response, fresh_nonce, signed_now, timestamped, timestamped_within, unix_now,
};
use iac_tests::nats::NatsServer;
use iac_tests::services::InProcessGateway;
use iac_tests::tools::{project_binary, tool, workspace_root};
use serde_json::{Value, json};

const SECRET: &str = "deploy-test-secret-7c2e91";
const COMMIT: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
const OTHER_COMMIT: &str = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c";

async fn start_gateway(server: &NatsServer, extra: &[&str]) -> InProcessGateway {
    let url = server.url();
    let mut args = vec![
        "--webhook-secret",
        SECRET,
        "--nats-url",
        &url,
        "--publish-timeout",
        "2s",
    ];
    args.extend_from_slice(extra);
    let config = Config::try_from_args(args).expect("a valid configuration");
    let gateway = InProcessGateway::start(config).await;
    gateway.wait_ready().await;
    gateway
}

async fn post(gateway: &InProcessGateway, path: &str, body: &Value) -> Response {
    signed_now(gateway.addr, path, SECRET, body.to_string().as_bytes()).await
}

async fn deploy(gateway: &InProcessGateway, body: &Value) -> Response {
    post(gateway, "/deploy", body).await
}

async fn status(gateway: &InProcessGateway, body: &Value) -> Response {
    post(gateway, "/deploy/status", body).await
}

fn id_of(env: &str, commit: &str, services: Option<&[&str]>) -> String {
    let services: Option<Vec<String>> = services.map(|s| s.iter().map(|s| s.to_string()).collect());
    deployment_id(env, commit, &normalize_services(services.as_deref()))
}

async fn summaries(server: &NatsServer) -> kv::Store {
    jetstream::new(server.client().await)
        .get_key_value(DEPLOYMENTS_BUCKET)
        .await
        .expect("the deployments bucket")
}

async fn stored_summary(server: &NatsServer, id: &str) -> Option<DeploymentSummary> {
    let value = summaries(server).await.get(id).await.unwrap()?;
    Some(serde_json::from_slice(&value).expect("a summary"))
}

/// Writes the final summary of `id` as the worker does once the deployment's result is
/// published: the accepted summary, its status and outcome replaced.
async fn finish(server: &NatsServer, id: &str, success: bool) {
    let bucket = summaries(server).await;
    let entry = bucket
        .entry(id)
        .await
        .unwrap()
        .expect("an accepted summary");
    let mut summary: DeploymentSummary = serde_json::from_slice(&entry.value).unwrap();
    summary.status = if success {
        DeploymentStatus::Completed
    } else {
        DeploymentStatus::Failed
    };
    summary.updated_at = iac_shared::events::now_rfc3339();
    summary.result = Some(DeploymentResult {
        success,
        commit: Some(summary.commit.clone()),
        services: vec![ServiceSummary {
            service: "platform/redis".into(),
            outcome: if success {
                SyncOutcome::Synced
            } else {
                SyncOutcome::Failed
            },
            exit_code: Some(if success { 0 } else { 1 }),
            duration_ms: 1200,
        }],
        error: (!success).then(|| "platform/redis failed".to_string()),
        duration_ms: 1500,
    });
    let value = serde_json::to_vec(&summary).unwrap();
    bucket
        .update(id, value.into(), entry.revision)
        .await
        .expect("the final summary is written over the accepted one");
}

/// Every deployment event stored in `IAC_EVENTS`, oldest first.
async fn deploy_events(server: &NatsServer) -> Vec<StreamMessage> {
    let js = jetstream::new(server.client().await);
    let mut stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut messages = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.direct_get(seq).await
            && message.subject.starts_with(DEPLOY_SUBJECT_PREFIX)
        {
            messages.push(message);
        }
    }
    messages
}

async fn event_count(server: &NatsServer) -> u64 {
    let js = jetstream::new(server.client().await);
    let mut stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn a_deployment_is_stored_for_its_environment_and_answered_with_the_originals_id() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;

    let answer = deploy(
        &gateway,
        &json!({"env": "production", "ref": COMMIT.to_uppercase(), "services": ["redis", "api"],
                "triggered_by": "ci", "source_ref": "main"}),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    let id = id_of("production", COMMIT, Some(&["api", "redis"]));
    assert_eq!(
        answer.json(),
        json!({
            "status": "in_progress",
            "deployment_id": id,
            "env": "production",
            "ref": COMMIT,
            "triggered_by": "ci",
            "requested_services": ["api", "redis"],
            "status_url": "/deploy/status",
            "wait": false,
        })
    );

    let events = deploy_events(&server).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].subject.as_str(), "iac.events.deploy.production");
    let event: DeployRequest = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(event.deployment_id, id);
    assert_eq!(event.commit, COMMIT);
    assert_eq!(event.services, ["api", "redis"]);
    assert_eq!(event.triggered_by.as_deref(), Some("ci"));
    let event_id = events[0].headers.get(EVENT_ID_HEADER).unwrap().to_string();
    assert!(event_id.starts_with(&format!("deploy-{id}-")), "{event_id}");
    assert_eq!(
        events[0].headers.get(MSG_ID_HEADER).unwrap().as_str(),
        event_id
    );

    let summary = stored_summary(&server, &id).await.expect("a summary");
    assert_eq!(summary.status, DeploymentStatus::InProgress);
    assert_eq!(summary.env, "production");
    assert_eq!(summary.requested_services, ["api", "redis"]);

    let all = deploy(&gateway, &json!({"ref": COMMIT})).await;
    assert_eq!(all.status, 202, "{}", all.text());
    assert_eq!(all.json()["env"], "staging", "staging is the default");
    assert_eq!(all.json()["requested_services"], json!(["__all__"]));
    assert_eq!(all.json()["deployment_id"], id_of("staging", COMMIT, None));
    assert_eq!(
        deploy_events(&server).await[1].subject.as_str(),
        "iac.events.deploy.staging"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_replayed_nonce_is_refused_also_after_a_restart_and_by_a_second_gateway() {
    let server = NatsServer::start();
    let first = start_gateway(&server, &[]).await;
    let body = json!({"ref": COMMIT}).to_string();
    let (now, nonce) = (unix_now(), fresh_nonce());
    let send = |addr| timestamped(addr, "/deploy", SECRET, body.as_bytes(), now, &nonce);

    assert_eq!(send(first.addr).await.status, 202);
    let replay = send(first.addr).await;
    assert_eq!(replay.status, 401, "{}", replay.text());
    assert!(
        replay.text().contains("X-IAC-Nonce was used before"),
        "{}",
        replay.text()
    );

    let second = start_gateway(&server, &[]).await;
    assert_eq!(send(second.addr).await.status, 401, "a second gateway");
    first.stop().await;
    let restarted = start_gateway(&server, &[]).await;
    assert_eq!(send(restarted.addr).await.status, 401, "after a restart");
    assert_eq!(deploy_events(&server).await.len(), 1, "stored once");

    // The same body with a new nonce is a new request (answered as a duplicate).
    let again = deploy(&restarted, &json!({"ref": COMMIT})).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["duplicate"], true);
}

#[tokio::test]
async fn stale_future_and_malformed_signatures_are_refused_without_using_up_the_nonce() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let body = json!({"ref": COMMIT}).to_string();
    let body = body.as_bytes();
    let now = unix_now();
    let nonce = fresh_nonce();
    let cases = [
        (now - 301, nonce.as_str(), SECRET, "300 seconds"),
        (now + 301, nonce.as_str(), SECRET, "300 seconds"),
        (now, "short", SECRET, "X-IAC-Nonce"),
        (now, "has/slash:1234", SECRET, "X-IAC-Nonce"),
        (
            now,
            nonce.as_str(),
            "another-secret-0000",
            "Invalid signature",
        ),
    ];
    for (timestamp, nonce, secret, words) in cases {
        let answer = timestamped(gateway.addr, "/deploy", secret, body, timestamp, nonce).await;
        assert_eq!(answer.status, 401, "{timestamp} {nonce}: {}", answer.text());
        assert!(answer.text().contains(words), "{}", answer.text());
    }
    let body_only = gateway_client::request(
        gateway.addr,
        "POST",
        "/deploy",
        &[(
            "X-Hub-Signature-256",
            &iac_shared::signature::sign(SECRET.as_bytes(), body),
        )],
        body,
    )
    .await;
    assert_eq!(
        body_only.status, 401,
        "the body signature alone is not enough"
    );
    assert!(deploy_events(&server).await.is_empty());

    // None of the refused requests recorded the nonce.
    let answer = timestamped(gateway.addr, "/deploy", SECRET, body, now, &nonce).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
}

#[tokio::test]
async fn each_bad_request_is_answered_400_saying_what_is_wrong() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--deploy-envs", "staging,production"]).await;
    let cases = [
        (json!(["not", "an", "object"]), "JSON object required"),
        (json!({"ref": "main"}), "exact 40-character commit"),
        (json!({"tag": "v1.2.3"}), "exact 40-character commit"),
        (
            json!({"ref": COMMIT, "env": "qa"}),
            "Invalid env (must be one of staging, production)",
        ),
        (
            json!({"ref": COMMIT, "wait": "later"}),
            "wait must be a boolean",
        ),
        (
            json!({"ref": COMMIT, "services": "redis"}),
            "services must be a list of strings",
        ),
        (
            json!({"ref": COMMIT, "services": []}),
            "non-empty list of non-empty strings",
        ),
        (
            json!({"ref": COMMIT, "services": [" "]}),
            "non-empty list of non-empty strings",
        ),
    ];
    for (body, words) in &cases {
        for path in ["/deploy", "/deploy/status"] {
            let answer = post(&gateway, path, body).await;
            assert_eq!(answer.status, 400, "{path} {body}: {}", answer.text());
            assert!(
                answer.json()["error"].as_str().unwrap().contains(words),
                "{path} {body}: {}",
                answer.text()
            );
        }
    }
    let bad_id = status(&gateway, &json!({"ref": COMMIT, "deployment_id": "XYZ"})).await;
    assert_eq!(bad_id.status, 400);
    assert!(
        bad_id.text().contains("16 lowercase hex"),
        "{}",
        bad_id.text()
    );
    assert!(deploy_events(&server).await.is_empty());
}

#[tokio::test]
async fn a_repeated_request_is_a_duplicate_while_in_progress_and_cached_once_final() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let request = json!({"env": "staging", "ref": COMMIT, "services": ["redis"]});
    let id = id_of("staging", COMMIT, Some(&["redis"]));
    assert_eq!(deploy(&gateway, &request).await.status, 202);

    let duplicate = deploy(&gateway, &request).await;
    assert_eq!(duplicate.status, 202);
    assert_eq!(duplicate.json()["duplicate"], true);
    assert_eq!(duplicate.json()["deployment_id"], id);
    assert_eq!(
        deploy_events(&server).await.len(),
        1,
        "a duplicate is not stored"
    );

    finish(&server, &id, false).await;
    let cached = deploy(&gateway, &request).await;
    assert_eq!(cached.status, 200, "{}", cached.text());
    let body = cached.json();
    assert_eq!(body["status"], "failed");
    assert_eq!(body["cached"], true);
    assert_eq!(body["error"], "platform/redis failed");
    assert_eq!(body["result"]["services"][0]["service"], "platform/redis");
    assert_eq!(body["result"]["services"][0]["outcome"], "failed");
    let waiting = deploy(
        &gateway,
        &json!({"env": "staging", "ref": COMMIT, "services": ["redis"], "wait": true}),
    )
    .await;
    assert_eq!(
        waiting.status, 500,
        "a waiting caller learns the failure from the status code"
    );
    assert_eq!(waiting.json()["cached"], true);
    assert_eq!(
        deploy_events(&server).await.len(),
        1,
        "a cached answer is not stored"
    );
}

#[tokio::test]
async fn the_same_deployment_asked_of_two_gateways_at_once_is_stored_once() {
    let server = NatsServer::start();
    let gateways = [
        start_gateway(&server, &[]).await,
        start_gateway(&server, &[]).await,
    ];
    let request = json!({"ref": COMMIT, "services": ["redis"]});
    let answers =
        futures::future::join_all((0..12).map(|i| deploy(&gateways[i % 2], &request))).await;
    let accepted = answers
        .iter()
        .filter(|a| a.status == 202 && a.json().get("duplicate").is_none())
        .count();
    let duplicates = answers
        .iter()
        .filter(|a| a.status == 202 && a.json()["duplicate"] == true)
        .count();
    assert_eq!((accepted, duplicates), (1, 11), "{answers:#?}");
    assert_eq!(deploy_events(&server).await.len(), 1, "stored once");
}

#[tokio::test]
async fn a_deployment_final_longer_than_the_cache_window_ago_runs_again() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--deploy-cache-ttl", "1s"]).await;
    let request = json!({"ref": COMMIT});
    let id = id_of("staging", COMMIT, None);
    assert_eq!(deploy(&gateway, &request).await.status, 202);
    finish(&server, &id, true).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let again = deploy(&gateway, &request).await;
    assert_eq!(again.status, 202, "{}", again.text());
    assert_eq!(again.json()["status"], "in_progress");
    assert_eq!(again.json().get("duplicate"), None);
    let summary = stored_summary(&server, &id).await.unwrap();
    assert_eq!(summary.status, DeploymentStatus::InProgress);
    assert_eq!(summary.result, None, "the old outcome is replaced");
    let events = deploy_events(&server).await;
    assert_eq!(events.len(), 2, "stored again");
    let ids: Vec<String> = events
        .iter()
        .map(|m| m.headers.get(MSG_ID_HEADER).unwrap().to_string())
        .collect();
    assert_ne!(ids[0], ids[1], "each acceptance has its own message id");
}

#[tokio::test]
async fn a_deployment_that_could_not_be_stored_is_answered_503_and_can_be_asked_for_again() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let js = jetstream::new(server.client().await);
    js.delete_stream(EVENTS_STREAM).await.unwrap();
    let request = json!({"ref": COMMIT});
    let lost = deploy(&gateway, &request).await;
    assert_eq!(lost.status, 503, "{}", lost.text());
    let id = id_of("staging", COMMIT, None);
    assert_eq!(
        stored_summary(&server, &id).await,
        None,
        "no in_progress summary is left to answer later requests as duplicates"
    );

    iac_shared::nats::provision(&js, &Default::default())
        .await
        .unwrap();
    let retried = deploy(&gateway, &request).await;
    assert_eq!(retried.status, 202, "{}", retried.text());
    assert_eq!(retried.json().get("duplicate"), None);
    assert_eq!(deploy_events(&server).await.len(), 1);
}

#[tokio::test]
async fn status_is_answered_from_the_bucket_after_a_gateway_restart() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let redis = id_of("staging", COMMIT, Some(&["redis"]));
    let unknown = status(&gateway, &json!({"ref": COMMIT, "services": ["redis"]})).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.json(),
        json!({"status": "not_found", "deployment_id": redis, "env": "staging", "ref": COMMIT})
    );
    assert_eq!(
        deploy(&gateway, &json!({"ref": COMMIT, "services": ["redis"]}))
            .await
            .status,
        202
    );
    gateway.stop().await;

    let gateway = start_gateway(&server, &[]).await;
    let running = status(
        &gateway,
        &json!({"ref": COMMIT, "services": ["redis"], "deployment_id": redis}),
    )
    .await;
    assert_eq!(running.status, 200, "{}", running.text());
    assert_eq!(running.json()["status"], "in_progress");
    assert_eq!(running.json()["status_url"], "/deploy/status");
    // Without services, the one deployment of this commit is meant.
    let legacy = status(&gateway, &json!({"ref": COMMIT})).await;
    assert_eq!(legacy.json()["deployment_id"], redis, "{}", legacy.text());

    finish(&server, &redis, true).await;
    let done = status(&gateway, &json!({"ref": COMMIT, "services": ["redis"]})).await;
    assert_eq!(done.status, 200);
    assert_eq!(done.json()["status"], "completed");
    assert_eq!(done.json()["result"]["success"], true);
    assert_eq!(done.json()["requested_services"], json!(["redis"]));

    let mismatch = status(
        &gateway,
        &json!({"ref": COMMIT, "services": ["redis"], "deployment_id": "0123456789abcdef"}),
    )
    .await;
    assert_eq!(mismatch.status, 409);
    assert_eq!(mismatch.json()["expected_deployment_id"], redis);

    assert_eq!(
        deploy(&gateway, &json!({"ref": COMMIT, "services": ["api"]}))
            .await
            .status,
        202
    );
    let ambiguous = status(&gateway, &json!({"ref": COMMIT})).await;
    assert_eq!(ambiguous.status, 409, "{}", ambiguous.text());
    let mut candidates = vec![redis.clone(), id_of("staging", COMMIT, Some(&["api"]))];
    candidates.sort();
    assert_eq!(
        ambiguous.json()["candidate_deployment_ids"],
        json!(candidates)
    );
    let elsewhere = status(&gateway, &json!({"ref": OTHER_COMMIT, "env": "production"})).await;
    assert_eq!(elsewhere.status, 404);
    assert_eq!(
        elsewhere.json()["deployment_id"],
        id_of("production", OTHER_COMMIT, None)
    );
}

#[tokio::test]
async fn a_waiting_request_is_answered_when_the_summary_turns_final() {
    let server = NatsServer::start();
    // A header timeout shorter than the wait: it must not cut a held request.
    let gateway = start_gateway(&server, &["--header-read-timeout", "1s"]).await;
    let id = id_of("staging", COMMIT, None);
    let body = json!({"ref": COMMIT, "wait": true}).to_string();
    let held = timestamped_within(
        gateway.addr,
        "/deploy",
        SECRET,
        body.as_bytes(),
        Duration::from_secs(30),
    );
    let finisher = async {
        iac_tests::wait_for(
            "the held deployment to be stored",
            Duration::from_secs(10),
            || async { (stored_summary(&server, &id).await.is_some()).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        finish(&server, &id, true).await;
    };
    let (answer, ()) = tokio::join!(held, finisher);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["status"], "completed");
    assert_eq!(answer.json()["deployment_id"], id);
    assert_eq!(answer.json()["result"]["services"][0]["outcome"], "synced");
}

#[tokio::test]
async fn a_waiting_request_is_answered_in_progress_at_the_wait_timeout_and_at_shutdown() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--deploy-wait-timeout", "2s"]).await;
    let body = json!({"ref": COMMIT, "wait": "true"}).to_string();
    let started = std::time::Instant::now();
    let answer = timestamped_within(
        gateway.addr,
        "/deploy",
        SECRET,
        body.as_bytes(),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(answer.json()["status"], "in_progress");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "held for the wait timeout"
    );

    let gateway = {
        gateway.stop().await;
        start_gateway(&server, &[]).await
    };
    let body = json!({"ref": OTHER_COMMIT, "wait": true}).to_string();
    let addr = gateway.addr;
    let held = tokio::spawn(async move {
        timestamped_within(
            addr,
            "/deploy",
            SECRET,
            body.as_bytes(),
            Duration::from_secs(30),
        )
        .await
    });
    let id = id_of("staging", OTHER_COMMIT, None);
    iac_tests::wait_for(
        "the held deployment to be stored",
        Duration::from_secs(10),
        || async { (stored_summary(&server, &id).await.is_some()).then_some(()) },
    )
    .await;
    let stopped = std::time::Instant::now();
    gateway.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "shutdown does not wait 30 minutes"
    );
    let answer = held.await.unwrap();
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(answer.json()["status"], "in_progress");
}

#[tokio::test]
async fn sync_takes_the_timestamped_form_when_its_headers_are_sent_and_can_be_turned_off() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &["--deploy-secret", "a-separate-deploy-secret"]).await;
    let body = br#"{"services":["platform/redis"]}"#;
    let legacy = gateway_client::sync(gateway.addr, SECRET, body).await;
    assert_eq!(legacy.status, 200, "{}", legacy.text());

    let (now, nonce) = (unix_now(), fresh_nonce());
    let signed = timestamped(gateway.addr, "/sync", SECRET, body, now, &nonce).await;
    assert_eq!(signed.status, 200, "{}", signed.text());
    assert_eq!(signed.json()["status"], "accepted");
    let replay = timestamped(gateway.addr, "/sync", SECRET, body, now, &nonce).await;
    assert_eq!(replay.status, 401, "{}", replay.text());
    let stale = timestamped(
        gateway.addr,
        "/sync",
        SECRET,
        body,
        now - 600,
        &fresh_nonce(),
    )
    .await;
    assert_eq!(stale.status, 401, "{}", stale.text());
    // /sync keeps WEBHOOK_SECRET; /deploy takes DEPLOY_SECRET only.
    let deploy_with_webhook_secret = deploy(&gateway, &json!({"ref": COMMIT})).await;
    assert_eq!(deploy_with_webhook_secret.status, 401);
    let with_deploy_secret = signed_now(
        gateway.addr,
        "/deploy",
        "a-separate-deploy-secret",
        json!({"ref": COMMIT}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        with_deploy_secret.status,
        202,
        "{}",
        with_deploy_secret.text()
    );
    assert_eq!(
        event_count(&server).await,
        3,
        "two syncs and one deployment"
    );
    gateway.stop().await;

    let off = start_gateway(&server, &["--legacy-sync", "false"]).await;
    let answer = gateway_client::sync(off.addr, SECRET, body).await;
    assert_eq!(answer.status, 404, "{}", answer.text());
    assert_eq!(answer.json()["error"], "Legacy sync endpoint disabled");
    assert_eq!(event_count(&server).await, 3);
}

#[tokio::test]
async fn a_push_for_another_repository_is_ignored_and_not_stored() {
    let server = NatsServer::start();
    let gateway = start_gateway(
        &server,
        &["--git-repo-url", "https://github.com/acme/infra.git"],
    )
    .await;
    let mut push = push_payload(
        "refs/heads/main",
        OTHER_COMMIT,
        COMMIT,
        &["platform/02.redis/x"],
    );
    push["repository"]["full_name"] = json!("mallory/infra");
    let answer = gateway_client::webhook(
        gateway.addr,
        SECRET,
        "push",
        "d-fork",
        push.to_string().as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["status"], "ignored");
    let reason = answer.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("mallory/infra") && reason.contains("acme/infra"),
        "{reason}"
    );
    assert_eq!(event_count(&server).await, 0);

    push["repository"]["full_name"] = json!("acme/infra");
    let ours = gateway_client::webhook(
        gateway.addr,
        SECRET,
        "push",
        "d-ours",
        push.to_string().as_bytes(),
    )
    .await;
    assert_eq!(ours.json()["status"], "accepted", "{}", ours.text());
    assert_eq!(event_count(&server).await, 1);
}

/// Runs `script` with the pinned Python (the one with httpx), the original's client importable.
fn python(script: &str, env: &[(&str, String)]) -> std::process::Output {
    let python = tool("PYTHON_BIN", "python3");
    let mut command = std::process::Command::new(python);
    command.arg("-c").arg(script).env(
        "PYTHONPATH",
        workspace_root().join("tests/data/upstream-client"),
    );
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("running python")
}

#[tokio::test]
async fn the_original_client_script_drives_deploy_and_status_unchanged() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let env = [
        ("URL", format!("http://{}", gateway.addr)),
        ("SECRET", SECRET.to_string()),
        ("REF", COMMIT.to_string()),
    ];
    // Blocking calls, off the runtime the gateway runs on.
    let trigger_env = env.to_vec();
    let trigger = tokio::task::spawn_blocking(move || {
        python(
            r#"
import hashlib, json, os, iac_runner_client as c
answer = c.trigger_platform_deploy(env="staging", ref=os.environ["REF"], services=["redis"],
                                   base_url=os.environ["URL"], secret=os.environ["SECRET"])
expected = hashlib.sha256(f"staging:{os.environ['REF']}:redis".encode()).hexdigest()[:16]
assert answer["deployment_id"] == expected, (answer, expected)
print(json.dumps(answer))
"#,
            &trigger_env,
        )
    })
    .await
    .unwrap();
    assert!(
        trigger.status.success(),
        "{}",
        String::from_utf8_lossy(&trigger.stderr)
    );
    let answer: Value = serde_json::from_slice(&trigger.stdout).unwrap();
    assert_eq!(answer["status"], "in_progress");
    let id = answer["deployment_id"].as_str().unwrap().to_string();

    // The poller sees in_progress until the worker's final summary arrives.
    let mut child_env = env.to_vec();
    child_env.push(("ID", id.clone()));
    let poller = tokio::task::spawn_blocking(move || {
        python(
            r#"
import json, os, iac_runner_client as c
print(json.dumps(c.poll_platform_deploy_status(
    env="staging", ref=os.environ["REF"], services=["redis"], deployment_id=os.environ["ID"],
    base_url=os.environ["URL"], secret=os.environ["SECRET"], attempts=80, interval=0.25)))
"#,
            &child_env,
        )
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    finish(&server, &id, true).await;
    let polled = poller.await.unwrap();
    assert!(
        polled.status.success(),
        "{}",
        String::from_utf8_lossy(&polled.stderr)
    );
    let last: Value = serde_json::from_slice(&polled.stdout).unwrap();
    assert_eq!(last["status"], "completed");
    assert_eq!(last["deployment_id"], id.as_str());
}

#[tokio::test]
async fn the_deploy_client_exits_0_only_when_the_deployment_completed() {
    let server = NatsServer::start();
    let gateway = start_gateway(&server, &[]).await;
    let url = format!("http://{}", gateway.addr);
    let run = |commit: &'static str, services: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(project_binary("iac-gateway"))
                .args(["deploy", "--url", &url, "--env", "staging", "--ref", commit])
                .args(["--services", services, "--interval", "1"])
                .env_clear()
                .env("DEPLOY_SECRET", SECRET)
                .output()
                .expect("running iac-gateway deploy")
        })
    };
    let completing = run(COMMIT, "redis,api");
    let failing = run(OTHER_COMMIT, "redis");
    let ok_id = id_of("staging", COMMIT, Some(&["api", "redis"]));
    let failed_id = id_of("staging", OTHER_COMMIT, Some(&["redis"]));
    for id in [&ok_id, &failed_id] {
        gateway
            .task
            .wait_for(
                "the client's deployment",
                Duration::from_secs(20),
                || async { stored_summary(&server, id).await.map(drop) },
            )
            .await;
    }
    finish(&server, &ok_id, true).await;
    finish(&server, &failed_id, false).await;
    let completed = completing.await.unwrap();
    assert!(
        completed.status.success(),
        "{}",
        String::from_utf8_lossy(&completed.stderr)
    );
    assert!(String::from_utf8_lossy(&completed.stdout).contains("\"completed\""));
    let failed = failing.await.unwrap();
    assert!(
        !failed.status.success(),
        "a failed deployment exits non-zero"
    );
    assert!(String::from_utf8_lossy(&failed.stderr).contains("failed"));
}
