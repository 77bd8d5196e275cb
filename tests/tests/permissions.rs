//! The NATS users of `deploy/nats/permissions.conf`: only `admin` provisions; each service user
//! may do what its service needs and every other act is refused; the pipeline works under them.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use iac_reporter::undelivered::{Selection, read};
use iac_shared::deploy::{Environments, deploy_subject};
use iac_shared::names::*;
use iac_shared::nats::{
    ConsumerSettings, ProvisionError, StreamSettings, events_stream_config, provision,
    provision_all, undelivered_stream_config,
};
use iac_tests::fake_github::FakeGithub;
use iac_tests::nats::NatsServer;
use iac_tests::pipeline::Pipeline;
use iac_tests::tools::workspace_root;

const ADMIN_PASSWORD: &str = "ad-pass-0";
const USERS: [(&str, &str, &str); 4] = [
    ("admin", "NATS_ADMIN_PASSWORD", ADMIN_PASSWORD),
    ("gateway", "NATS_GATEWAY_PASSWORD", "gw-pass-1"),
    ("worker", "NATS_WORKER_PASSWORD", "wk-pass-2"),
    ("reporter", "NATS_REPORTER_PASSWORD", "rp-pass-3"),
];
const SERVICE_USERS: [&str; 3] = ["gateway", "worker", "reporter"];

fn server() -> NatsServer {
    // The file as deployed, inlined (nats-server resolves includes relative to the config).
    let permissions =
        std::fs::read_to_string(workspace_root().join("deploy/nats/permissions.conf")).unwrap();
    let env: Vec<(&str, &str)> = USERS.iter().map(|(_, var, pass)| (*var, *pass)).collect();
    NatsServer::start_with_config_and_env(Some(&permissions), &env)
}

fn password(user: &str) -> &'static str {
    USERS.iter().find(|(u, _, _)| *u == user).unwrap().2
}

async fn client_as(server: &NatsServer, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password(user).into())
        .custom_inbox_prefix(iac_shared::nats::inbox_prefix(user).expect("a token"))
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
}

/// A JetStream context as `user`. A refused request gets no answer (the server only tells the
/// connection), so it ends at this timeout.
async fn connect_as(server: &NatsServer, user: &str) -> jetstream::Context {
    let mut js = jetstream::new(client_as(server, user).await);
    js.set_timeout(Duration::from_secs(1));
    js
}

async fn provisioned_server() -> NatsServer {
    let server = server();
    provision_all(
        &connect_as(&server, "admin").await,
        &StreamSettings::default(),
        &ConsumerSettings::default(),
    )
    .await
    .expect("admin provisions");
    server
}

#[tokio::test]
async fn service_users_cannot_provision_and_find_what_the_admin_provisioned() {
    let server = server();
    for user in SERVICE_USERS {
        let err = provision(&connect_as(&server, user).await, &StreamSettings::default())
            .await
            .expect_err("a service user created the streams");
        assert!(
            matches!(err, ProvisionError::Missing { .. }),
            "{user}: {err}"
        );
        assert!(err.to_string().contains("iac-worker provision"), "{err}");
    }
    let admin = connect_as(&server, "admin").await;
    provision_all(
        &admin,
        &StreamSettings::default(),
        &ConsumerSettings::default(),
    )
    .await
    .unwrap();
    for user in SERVICE_USERS {
        provision(&connect_as(&server, user).await, &StreamSettings::default())
            .await
            .unwrap_or_else(|e| panic!("{user} cannot check the provisioned streams: {e}"));
    }
    admin
        .get_key_value(STATUS_BUCKET)
        .await
        .expect("the status bucket");
}

#[tokio::test]
async fn drift_a_service_user_may_not_correct_is_kept_and_the_service_goes_on() {
    let server = provisioned_server().await;
    let settings = StreamSettings {
        max_age: Duration::from_secs(3600),
        ..Default::default()
    };
    let gateway = connect_as(&server, "gateway").await;
    provision(&gateway, &settings)
        .await
        .expect("drift the gateway may not correct stops nothing");
    let admin = connect_as(&server, "admin").await;
    let mut events = admin.get_stream(EVENTS_STREAM).await.unwrap();
    let kept = events.info().await.unwrap().config.max_age;
    assert_eq!(
        kept,
        StreamSettings::default().max_age,
        "the gateway changed the stream"
    );
}

/// Every act no service user may do, tried as `user`; returns the acts that were not refused.
async fn forbidden_acts_allowed(server: &NatsServer, user: &str) -> Vec<String> {
    let js = connect_as(server, user).await;
    let mut allowed = Vec::new();
    let mut check = |act: &str, refused: bool| {
        if !refused {
            allowed.push(format!("{user}: {act}"));
        }
    };

    let mut shrunk = events_stream_config(&StreamSettings::default());
    shrunk.max_messages = 1;
    check("update a stream", js.update_stream(&shrunk).await.is_err());
    check("purge a stream", purge(&js, EVENTS_STREAM).await);
    check(
        "delete a stream",
        js.delete_stream(RESULTS_STREAM).await.is_err(),
    );
    check(
        "create a stream",
        js.create_stream(stream::Config {
            name: "INTRUDER".into(),
            subjects: vec!["intruder.>".into()],
            ..Default::default()
        })
        .await
        .is_err(),
    );

    let events = js
        .get_stream(EVENTS_STREAM)
        .await
        .expect("stream info is allowed");
    check(
        "create a durable consumer",
        events
            .create_consumer(consumer::pull::Config {
                durable_name: Some("intruder".into()),
                ..Default::default()
            })
            .await
            .is_err(),
    );
    let mut parallel = iac_shared::nats::worker_consumer_config(
        Duration::from_secs(30),
        4,
        &Environments::default(),
    );
    parallel.max_ack_pending = 50;
    check(
        "update a consumer",
        events.update_consumer(parallel.clone()).await.is_err(),
    );
    check(
        "update a consumer through a create",
        events.create_consumer(parallel.clone()).await.is_err(),
    );
    check(
        "update a consumer through an unnamed create",
        !answered_ok(
            &js,
            format!("CONSUMER.CREATE.{EVENTS_STREAM}"),
            serde_json::json!({"stream_name": EVENTS_STREAM, "config": parallel}),
        )
        .await,
    );
    check(
        "delete a consumer",
        events.delete_consumer(WORKER_CONSUMER).await.is_err(),
    );

    check(
        "subscribe to events",
        !receives(server, user, "iac.events.>", PUSH_SUBJECT).await,
    );
    check(
        "subscribe to results",
        !receives(server, user, "iac.results.>", FINISHED_SUBJECT).await,
    );
    check(
        "read the replies other users get",
        !receives(server, user, "_INBOX.>", "_INBOX.admin.reply").await,
    );
    allowed
}

async fn purge(js: &jetstream::Context, name: &str) -> bool {
    match js.get_stream(name).await {
        Ok(stream) => stream.purge().await.is_err(),
        Err(_) => true,
    }
}

/// Whether a raw JetStream API request gets an answer without an error.
async fn answered_ok(js: &jetstream::Context, subject: String, body: serde_json::Value) -> bool {
    let answer: Result<serde_json::Value, _> = js.request(subject, &body).await;
    matches!(answer, Ok(v) if v.get("error").is_none())
}

/// Whether `user`, subscribed directly to `filter`, sees a message the admin publishes.
async fn receives(server: &NatsServer, user: &str, filter: &str, subject: &'static str) -> bool {
    let client = client_as(server, user).await;
    let Ok(mut subscription) = client.subscribe(filter.to_string()).await else {
        return false;
    };
    let _ = client.flush().await;
    let admin = client_as(server, "admin").await;
    admin.publish(subject, "{}".into()).await.unwrap();
    admin.flush().await.unwrap();
    tokio::time::timeout(Duration::from_millis(500), subscription.next())
        .await
        .is_ok_and(|m| m.is_some())
}

#[tokio::test]
async fn every_forbidden_act_is_refused_for_every_service_user() {
    let server = provisioned_server().await;
    let admin = connect_as(&server, "admin").await;
    admin
        .publish(PUSH_SUBJECT, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let tried =
        futures::future::join_all(SERVICE_USERS.map(|user| forbidden_acts_allowed(&server, user)))
            .await;
    let allowed: Vec<String> = tried.into_iter().flatten().collect();
    assert!(allowed.is_empty(), "not refused: {allowed:#?}");

    // What a user would notice: nothing changed.
    let mut events = admin.get_stream(EVENTS_STREAM).await.unwrap();
    let info = events.info().await.unwrap().clone();
    assert_eq!(info.config.max_messages, -1, "IAC_EVENTS was shrunk");
    // One stored before, one per user by the subscription probes.
    assert_eq!(
        info.state.messages,
        1 + SERVICE_USERS.len() as u64,
        "IAC_EVENTS was purged"
    );
    // iac-worker, iac-worker-staging and iac-reporter-events.
    assert_eq!(
        info.state.consumer_count, 3,
        "a consumer was added or removed"
    );
    let worker = events.consumer_info(WORKER_CONSUMER).await.unwrap();
    assert_eq!(worker.config.max_ack_pending, 1, "iac-worker was changed");
    admin
        .get_stream(RESULTS_STREAM)
        .await
        .expect("IAC_RESULTS was deleted");
    assert!(admin.get_stream("INTRUDER").await.is_err());
}

/// Whether this connection can store a message on `subject`.
async fn can_store(js: &jetstream::Context, subject: &'static str) -> bool {
    match js.publish(subject, "{}".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn each_service_user_stores_only_its_own_subjects() {
    let server = provisioned_server().await;
    let gateway = connect_as(&server, "gateway").await;
    let worker = connect_as(&server, "worker").await;
    let reporter = connect_as(&server, "reporter").await;

    assert!(can_store(&gateway, PUSH_SUBJECT).await);
    assert!(can_store(&gateway, SYNC_SUBJECT).await);
    assert!(
        !can_store(&gateway, "iac.events.other").await,
        "the gateway stored another event"
    );
    assert!(
        !can_store(&gateway, FINISHED_SUBJECT).await,
        "the gateway wrote a result"
    );

    assert!(can_store(&worker, FINISHED_SUBJECT).await);
    assert!(
        !can_store(&reporter, SYNC_SUBJECT).await,
        "the reporter wrote an event"
    );
}

/// Whether this connection can take a message from the durable `name` on `stream`.
async fn take_one(js: &jetstream::Context, stream: &str, name: &str) -> bool {
    let Ok(stream) = js.get_stream(stream).await else {
        return false;
    };
    let Ok(consumer) = stream.get_consumer::<consumer::pull::Config>(name).await else {
        return false;
    };
    let batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_millis(500))
        .messages()
        .await;
    match batch {
        Ok(mut messages) => matches!(messages.next().await, Some(Ok(_))),
        Err(_) => false,
    }
}

#[tokio::test]
async fn each_service_user_pulls_only_from_its_own_consumers() {
    let server = provisioned_server().await;
    let gateway = connect_as(&server, "gateway").await;
    let worker = connect_as(&server, "worker").await;
    let reporter = connect_as(&server, "reporter").await;
    assert!(can_store(&gateway, PUSH_SUBJECT).await);
    assert!(can_store(&worker, FINISHED_SUBJECT).await);

    assert!(
        !take_one(&gateway, EVENTS_STREAM, WORKER_CONSUMER).await,
        "gateway took an event"
    );
    assert!(
        !take_one(&reporter, EVENTS_STREAM, WORKER_CONSUMER).await,
        "the reporter took the worker's event"
    );
    assert!(
        !take_one(&worker, EVENTS_STREAM, REPORTER_EVENTS_CONSUMER).await,
        "the worker took the reporter's push"
    );
    assert!(
        !take_one(&worker, RESULTS_STREAM, REPORTER_CONSUMER).await,
        "the worker took the reporter's result"
    );
    assert!(take_one(&worker, EVENTS_STREAM, WORKER_CONSUMER).await);
    assert!(take_one(&reporter, EVENTS_STREAM, REPORTER_EVENTS_CONSUMER).await);
    assert!(take_one(&reporter, RESULTS_STREAM, REPORTER_CONSUMER).await);
}

/// Whether this connection can take a message from the durable `name` on `stream` and have
/// its acknowledgement confirmed.
async fn take_and_ack(js: &jetstream::Context, stream: &str, name: &str) -> bool {
    let Ok(stream) = js.get_stream(stream).await else {
        return false;
    };
    let Ok(consumer) = stream.get_consumer::<consumer::pull::Config>(name).await else {
        return false;
    };
    let Ok(mut messages) = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_millis(500))
        .messages()
        .await
    else {
        return false;
    };
    match messages.next().await {
        Some(Ok(message)) => message.double_ack().await.is_ok(),
        _ => false,
    }
}

#[tokio::test]
async fn the_worker_takes_and_acknowledges_each_environments_deployments_and_nobody_else_does() {
    let server = provisioned_server().await;
    let admin = connect_as(&server, "admin").await;
    let staging = iac_shared::nats::worker_env_consumer("staging");
    for _ in 0..3 {
        admin
            .publish(deploy_subject("staging"), "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for user in ["gateway", "reporter"] {
        let js = connect_as(&server, user).await;
        assert!(
            !take_one(&js, EVENTS_STREAM, &staging).await,
            "{user} took a deployment"
        );
    }
    let worker = connect_as(&server, "worker").await;
    assert!(take_and_ack(&worker, EVENTS_STREAM, &staging).await);
    assert!(take_and_ack(&worker, EVENTS_STREAM, &staging).await);
    let events = admin.get_stream(EVENTS_STREAM).await.unwrap();
    let info = events.consumer_info(&staging).await.unwrap();
    assert_eq!(info.ack_floor.consumer_sequence, 2, "{info:#?}");
}

#[tokio::test]
async fn only_the_worker_writes_deployment_summaries_and_it_cannot_reconfigure_their_bucket() {
    let server = provisioned_server().await;
    let worker = connect_as(&server, "worker").await;
    let bucket = worker.get_key_value(DEPLOYMENTS_BUCKET).await.unwrap();
    bucket
        .put("0123456789abcdef", r#"{"status":"completed"}"#.into())
        .await
        .unwrap();
    let read = bucket.entry("0123456789abcdef").await.unwrap();
    assert!(read.is_some(), "the worker cannot read its summary back");
    let mut shrunk = iac_shared::nats::deployments_bucket_config(&StreamSettings::default());
    shrunk.max_age = Duration::from_secs(60);
    assert!(worker.create_or_update_key_value(shrunk).await.is_err());
    assert!(worker.delete_key_value(DEPLOYMENTS_BUCKET).await.is_err());
    let reporter = connect_as(&server, "reporter").await;
    let written = match reporter.get_key_value(DEPLOYMENTS_BUCKET).await {
        Ok(bucket) => bucket.put("0123456789abcdef", "{}".into()).await.is_ok(),
        Err(_) => false,
    };
    assert!(!written, "the reporter wrote a deployment summary");
}

#[tokio::test]
async fn only_the_worker_keeps_the_applied_state_and_it_cannot_reconfigure_or_remove_it() {
    let server = provisioned_server().await;
    let worker = connect_as(&server, "worker").await;
    let bucket = worker.get_key_value(APPLIED_BUCKET).await.unwrap();
    bucket
        .put("head.production", r#"{"commit":"abc"}"#.into())
        .await
        .unwrap();
    assert!(bucket.get("head.production").await.unwrap().is_some());
    let mut shrunk = iac_shared::nats::applied_bucket_config(&StreamSettings::default());
    shrunk.max_age = Duration::from_secs(60);
    assert!(worker.create_or_update_key_value(shrunk).await.is_err());
    assert!(worker.delete_key_value(APPLIED_BUCKET).await.is_err());
    assert!(
        purge(&worker, &format!("KV_{APPLIED_BUCKET}")).await,
        "the worker purged the applied state"
    );
    for user in ["gateway", "reporter"] {
        let js = connect_as(&server, user).await;
        let written = match js.get_key_value(APPLIED_BUCKET).await {
            Ok(bucket) => bucket.put("head.production", "{}".into()).await.is_ok(),
            Err(_) => false,
        };
        assert!(!written, "{user} wrote the applied state");
    }
}

#[tokio::test]
async fn only_the_reporter_touches_the_status_bucket_and_it_cannot_reconfigure_it() {
    let server = provisioned_server().await;
    for user in ["gateway", "worker"] {
        let js = connect_as(&server, user).await;
        assert!(
            js.get_key_value(STATUS_BUCKET).await.is_err(),
            "{user} opened the bucket"
        );
    }
    let reporter = connect_as(&server, "reporter").await;
    let bucket = reporter.get_key_value(STATUS_BUCKET).await.unwrap();
    bucket.put("acme.abc.ctx", "pending".into()).await.unwrap();
    assert!(bucket.get("acme.abc.ctx").await.unwrap().is_some());
    let mut shrunk = iac_shared::nats::status_bucket_config(&StreamSettings::default());
    shrunk.max_age = Duration::from_secs(60);
    assert!(reporter.create_or_update_key_value(shrunk).await.is_err());
    assert!(reporter.delete_key_value(STATUS_BUCKET).await.is_err());
    let admin = connect_as(&server, "admin").await;
    let mut kv_stream = admin
        .get_stream(format!("KV_{STATUS_BUCKET}"))
        .await
        .unwrap();
    let info = kv_stream.info().await.unwrap();
    assert_eq!(info.config.max_age, StreamSettings::default().max_age);
}

/// Whether this connection can read the dead letters back (`iac-reporter undelivered list`).
async fn reads_dead_letters(js: &jetstream::Context) -> bool {
    let all = Selection {
        since: None,
        seq: None,
    };
    read(js, &all).await.is_ok_and(|kept| !kept.is_empty())
}

#[tokio::test]
async fn only_the_reporter_keeps_and_reads_dead_letters_and_it_cannot_remove_them() {
    let server = provisioned_server().await;
    let reporter = connect_as(&server, "reporter").await;
    assert!(can_store(&reporter, UNDELIVERED_STATUS_SUBJECT).await);
    assert!(reads_dead_letters(&reporter).await);
    for user in ["gateway", "worker"] {
        let js = connect_as(&server, user).await;
        assert!(
            !can_store(&js, UNDELIVERED_STATUS_SUBJECT).await,
            "{user} wrote a dead letter"
        );
        assert!(
            !reads_dead_letters(&js).await,
            "{user} read the dead letters"
        );
    }
    let mut shrunk = undelivered_stream_config(&StreamSettings::default());
    shrunk.max_age = Duration::from_secs(60);
    assert!(
        reporter.update_stream(&shrunk).await.is_err(),
        "the reporter shortened IAC_UNDELIVERED"
    );
    assert!(
        purge(&reporter, UNDELIVERED_STREAM).await,
        "the reporter purged IAC_UNDELIVERED"
    );
    assert!(
        reporter.delete_stream(UNDELIVERED_STREAM).await.is_err(),
        "the reporter deleted IAC_UNDELIVERED"
    );
    for user in SERVICE_USERS {
        assert!(
            !receives(
                &server,
                user,
                UNDELIVERED_SUBJECTS,
                UNDELIVERED_STATUS_SUBJECT
            )
            .await,
            "{user} subscribed to the dead letters"
        );
    }

    // What an operator would notice: the reporter's dead letter and the admin's probes are all
    // there, and the stream is as provisioned.
    let admin = connect_as(&server, "admin").await;
    let mut stream = admin.get_stream(UNDELIVERED_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 1 + SERVICE_USERS.len() as u64);
    assert_eq!(info.config.max_age, StreamSettings::default().max_age);
}

const POSTGRES: &str = "platform/01.postgres/compose.yaml";
const CONTEXT: &str = "IaC Runner / Sync";
const SHOWN: Duration = Duration::from_secs(90);

#[tokio::test]
async fn the_pipeline_runs_under_the_service_users_after_the_admin_provisions() {
    let nats = server();
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::with_nats(&github.url(), &nats.url(), 1);
    let admin = ["--nats-user", "admin", "--nats-password", ADMIN_PASSWORD];
    let (ok, out, err) = pipeline.operator("iac-worker", &[&["provision"][..], &admin].concat());
    assert!(ok, "provision as admin failed: {out}\n{err}");
    assert!(out.contains("IAC_STATUSES"), "{out}");
    for user in SERVICE_USERS {
        pipeline.set_env(user, "NATS_USER", user);
        pipeline.set_env(user, "NATS_PASSWORD", password(user));
    }
    let _services = pipeline.start_all().await;

    let (commit, status, answer) = pipeline.push_change(POSTGRES).await;
    assert_eq!(status, 200, "{answer}");
    github
        .wait_for_shown(&commit, CONTEXT, "success", SHOWN)
        .await;
    let states: Vec<String> = github
        .accepted()
        .iter()
        .filter(|r| r.commit == commit)
        .map(|r| r.state().to_string())
        .collect();
    assert!(states.contains(&"pending".to_string()), "{states:?}");

    // The operator commands work as the service's own user.
    let worker = [
        "--nats-user",
        "worker",
        "--nats-password",
        password("worker"),
    ];
    let (ok, out, err) = pipeline.operator(
        "iac-worker",
        &[&["replay", "--from-seq", "1", "--dry-run"][..], &worker].concat(),
    );
    assert!(
        ok && out.contains(&commit),
        "replay as worker: {out}\n{err}"
    );
    let (ok, out, err) = pipeline.operator("iac-worker", &[&["status"][..], &worker].concat());
    assert!(
        ok && out.contains(&commit[..7]),
        "status as worker: {out}\n{err}"
    );
}

#[tokio::test]
async fn the_gateway_keeps_deployment_summaries_and_nonces_and_can_do_nothing_else_with_them() {
    let server = provisioned_server().await;
    let admin = connect_as(&server, "admin").await;
    admin
        .publish(FINISHED_SUBJECT, "{\"secret\":\"task output\"}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let gateway = connect_as(&server, "gateway").await;
    assert!(can_store(&gateway, "iac.events.deploy.staging").await);
    let summaries = gateway.get_key_value(DEPLOYMENTS_BUCKET).await.unwrap();
    summaries
        .create("0123456789abcdef", "{}".into())
        .await
        .unwrap();
    assert!(summaries.get("0123456789abcdef").await.unwrap().is_some());
    let nonces = gateway.get_key_value(NONCES_BUCKET).await.unwrap();
    nonces.create("ab12", "1767225600".into()).await.unwrap();
    assert!(
        nonces.create("ab12", "1767225600".into()).await.is_err(),
        "a nonce is kept once"
    );

    let mut allowed = Vec::new();
    let mut check = |act: &str, refused: bool| {
        if !refused {
            allowed.push(act.to_string());
        }
    };
    let results = gateway
        .get_stream(RESULTS_STREAM)
        .await
        .expect("stream info is allowed");
    check("read a result", results.direct_get(1).await.is_err());
    check(
        "read a result by msg get",
        results.get_raw_message(1).await.is_err(),
    );
    check(
        "open the status bucket",
        gateway.get_key_value(STATUS_BUCKET).await.is_err(),
    );
    check(
        "purge the nonces",
        purge(&gateway, &format!("KV_{NONCES_BUCKET}")).await,
    );
    check(
        "delete the nonce bucket",
        gateway.delete_key_value(NONCES_BUCKET).await.is_err(),
    );
    let mut forgetful = iac_shared::nats::nonces_bucket_config(&StreamSettings::default());
    forgetful.max_age = Duration::from_secs(1);
    check(
        "shorten how long nonces are kept",
        gateway.create_or_update_key_value(forgetful).await.is_err(),
    );
    check(
        "watch the summaries (a consumer)",
        summaries.watch_all().await.is_err(),
    );
    check(
        "subscribe to the nonces",
        !receives(
            &server,
            "gateway",
            "$KV.IAC_NONCES.>",
            "$KV.IAC_NONCES.cd34",
        )
        .await,
    );
    assert!(allowed.is_empty(), "the gateway may: {allowed:#?}");

    // The worker writes the final summaries, and never sees the nonces.
    let worker = connect_as(&server, "worker").await;
    let worker_summaries = worker.get_key_value(DEPLOYMENTS_BUCKET).await.unwrap();
    let entry = worker_summaries
        .entry("0123456789abcdef")
        .await
        .unwrap()
        .unwrap();
    worker_summaries
        .update("0123456789abcdef", "{\"final\":1}".into(), entry.revision)
        .await
        .expect("the worker writes the final summary");
    assert!(worker.get_key_value(NONCES_BUCKET).await.is_err());

    let reporter = connect_as(&server, "reporter").await;
    assert!(reporter.get_key_value(NONCES_BUCKET).await.is_err());
    assert!(reporter.get_key_value(DEPLOYMENTS_BUCKET).await.is_err());
    assert!(
        !can_store(&reporter, "iac.events.deploy.staging").await,
        "the reporter stored a deployment"
    );

    // What a user would notice: the nonces are still there, kept as long as before.
    let nonces = admin.get_key_value(NONCES_BUCKET).await.unwrap();
    assert!(nonces.get("ab12").await.unwrap().is_some());
    let mut kv_stream = admin
        .get_stream(format!("KV_{NONCES_BUCKET}"))
        .await
        .unwrap();
    let info = kv_stream.info().await.unwrap();
    assert_eq!(info.config.max_age, iac_shared::nats::NONCE_RETENTION);
}

#[tokio::test]
async fn the_reporter_notifies_under_its_own_user_and_only_it_opens_the_notification_bucket() {
    use iac_shared::events::{ServiceResult, SyncFinished, SyncOutcome, Totals, Trigger};
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let server = provisioned_server().await;
    for user in ["gateway", "worker"] {
        let js = connect_as(&server, user).await;
        assert!(
            js.get_key_value(NOTIFY_BUCKET).await.is_err(),
            "{user} opened the bucket"
        );
    }
    let reporter = connect_as(&server, "reporter").await;
    let mut changed = iac_shared::nats::notify_bucket_config(&StreamSettings::default());
    changed.history = 5;
    assert!(reporter.create_or_update_key_value(changed).await.is_err());
    assert!(reporter.delete_key_value(NOTIFY_BUCKET).await.is_err());

    // A notification a stopped reporter left unsent (found by listing the bucket), and a new
    // failure (decided with compare-and-set): both sent by a reporter under its own user.
    let admin = connect_as(&server, "admin").await;
    let unsent = serde_json::json!({
        "health": "failing",
        "event_seq": 1,
        "unsent": {
            "notification": {
                "event": "failure", "service": "platform/redis", "env": "production",
                "repository": "acme/infra", "commit": null, "outcome": "failed",
                "description": "Failed", "target_url": null, "time": "2026-01-01T00:00:00Z",
                "event_id": "event-1"
            },
            "decided_ms": 1
        }
    });
    admin
        .get_key_value(NOTIFY_BUCKET)
        .await
        .unwrap()
        .put(
            "production.platform/redis",
            serde_json::to_vec(&unsent).unwrap().into(),
        )
        .await
        .unwrap();
    let endpoint = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&endpoint)
        .await;
    let github = FakeGithub::start().await;
    let (nats_url, api, hook) = (server.url(), github.url(), endpoint.uri());
    let config = iac_reporter::Config::from_args([
        "iac-reporter",
        "--nats-url",
        &nats_url,
        "--nats-user",
        "reporter",
        "--nats-password",
        password("reporter"),
        "--github-api-url",
        &api,
        "--notify-url",
        &hook,
    ])
    .unwrap();
    let service = iac_tests::services::InProcessReporter::start(config);
    let services = vec![ServiceResult {
        service: "platform/postgres".into(),
        task: None,
        outcome: SyncOutcome::Failed,
        exit_code: Some(1),
        output_tail: vec![],
        duration_ms: 1,
        reason: None,
    }];
    let finished = SyncFinished {
        event_id: "event-2".into(),
        event_seq: 2,
        trigger: Trigger::Push,
        repository: Some("acme/infra".into()),
        commit: Some(format!("{:040x}", 2)),
        state: iac_shared::events::FinishedState::Failure,
        totals: Totals::of(&services),
        services,
        error: None,
        duration_ms: 1,
        replay_of: None,
        finished_at: iac_shared::events::now_rfc3339(),
        env: Some("production".into()),
        deployment_id: None,
        superseded_by: None,
    };
    admin
        .publish(
            FINISHED_SUBJECT,
            serde_json::to_vec(&finished).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut services: Vec<String> = iac_tests::wait_for("2 notifications", SHOWN, || {
        service.task.assert_running();
        let endpoint = &endpoint;
        async move {
            let received = endpoint.received_requests().await.unwrap_or_default();
            (received.len() >= 2).then_some(received)
        }
    })
    .await
    .iter()
    .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["service"].to_string())
    .collect();
    services.sort();
    assert_eq!(services, [r#""platform/postgres""#, r#""platform/redis""#]);
    service.stop().await;
}

/// A run-log chunk as the worker stores it.
async fn store_run_log(js: &jetstream::Context, run_id: &str, text: &str) -> bool {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(SERVICE_HEADER, "platform/postgres");
    headers.insert(ATTEMPT_HEADER, "1");
    let subject = iac_shared::nats::run_log_subject(run_id);
    match js
        .publish_with_headers(subject, headers, text.to_string().into())
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

/// Whether this connection reads a run's output back as the run page does: what it is made
/// of, then each chunk's text.
async fn reads_run_log(js: &jetstream::Context, run_id: &str) -> bool {
    use iac_reporter::web::runs::{chunk_text, read_output};
    let Ok(output) = read_output(js, run_id).await else {
        return false;
    };
    let Ok(stream) = js.get_stream(RUNLOGS_STREAM).await else {
        return false;
    };
    let mut read = 0;
    for (_, _, chunks) in &output.services {
        for chunk in chunks {
            match chunk_text(&stream, chunk.seq).await {
                Ok(text) => read += text.len(),
                Err(_) => return false,
            }
        }
    }
    read > 0 && read == output.bytes()
}

#[tokio::test]
async fn only_the_worker_writes_run_logs_only_the_reporter_reads_them_and_neither_can_remove_them()
{
    let server = provisioned_server().await;
    let worker = connect_as(&server, "worker").await;
    let reporter = connect_as(&server, "reporter").await;
    let gateway = connect_as(&server, "gateway").await;
    assert!(store_run_log(&worker, "run-1", "output of run-1\n").await);
    for (user, js) in [("gateway", &gateway), ("reporter", &reporter)] {
        assert!(
            !store_run_log(js, "run-1", "forged output\n").await,
            "{user} wrote task output"
        );
    }
    assert!(reads_run_log(&reporter, "run-1").await);
    for (user, js) in [("gateway", &gateway), ("worker", &worker)] {
        assert!(!reads_run_log(js, "run-1").await, "{user} read task output");
    }
    for (user, js) in [("worker", &worker), ("reporter", &reporter)] {
        assert!(purge(js, RUNLOGS_STREAM).await, "{user} purged IAC_RUNLOGS");
        assert!(
            js.delete_stream(RUNLOGS_STREAM).await.is_err(),
            "{user} deleted IAC_RUNLOGS"
        );
        let mut shortened = iac_shared::nats::runlogs_stream_config(&StreamSettings::default());
        shortened.max_age = Duration::from_secs(60);
        assert!(
            js.update_stream(&shortened).await.is_err(),
            "{user} shortened IAC_RUNLOGS"
        );
    }
    for user in SERVICE_USERS {
        assert!(
            !receives(&server, user, RUNLOGS_SUBJECTS, "iac.runlogs.72756e2d32").await,
            "{user} subscribed to task output"
        );
    }

    // The run-link secret: the reporter creates it once and reads the same back; nobody else
    // reads it.
    let settings = StreamSettings::default();
    let first = iac_reporter::web::links::secret(&reporter, &settings, None)
        .await
        .expect("the reporter keeps the run-link secret");
    let again = iac_reporter::web::links::secret(&reporter, &settings, None)
        .await
        .unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(first.expose_secret(), again.expose_secret());
    for (user, js) in [("gateway", &gateway), ("worker", &worker)] {
        let read = match js.get_key_value(RUN_LINKS_BUCKET).await {
            Ok(bucket) => bucket.get("secret").await.is_ok_and(|v| v.is_some()),
            Err(_) => false,
        };
        assert!(!read, "{user} read the run-link secret");
    }

    // What an operator would notice: the output is there, the stream as provisioned.
    let admin = connect_as(&server, "admin").await;
    let mut stream = admin.get_stream(RUNLOGS_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 1 + SERVICE_USERS.len() as u64);
    assert_eq!(info.config.max_age, settings.run_log_max_age);
}
