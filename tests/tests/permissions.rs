//! The NATS users of `deploy/nats/permissions.conf`: each service may do what it needs and
//! nothing of the others' work.

use std::time::Duration;

use async_nats::jetstream;
use iac_shared::names::*;
use iac_shared::nats::{StreamSettings, provision};
use iac_tests::nats::NatsServer;
use iac_tests::tools::workspace_root;

const USERS: [(&str, &str, &str); 3] = [
    ("gateway", "NATS_GATEWAY_PASSWORD", "gw-pass-1"),
    ("worker", "NATS_WORKER_PASSWORD", "wk-pass-2"),
    ("reporter", "NATS_REPORTER_PASSWORD", "rp-pass-3"),
];

fn server() -> NatsServer {
    // The file as deployed, inlined (nats-server resolves includes relative to the config).
    let permissions =
        std::fs::read_to_string(workspace_root().join("deploy/nats/permissions.conf")).unwrap();
    let env: Vec<(&str, &str)> = USERS.iter().map(|(_, var, pass)| (*var, *pass)).collect();
    NatsServer::start_with_config_and_env(Some(&permissions), &env)
}

async fn connect_as(server: &NatsServer, user: &str) -> jetstream::Context {
    let password = USERS.iter().find(|(u, _, _)| *u == user).unwrap().2;
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"));
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js
}

/// Whether `subject` accepts a JetStream publish from this connection.
async fn can_store(js: &jetstream::Context, subject: &'static str) -> bool {
    match js.publish(subject, "{}".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn every_service_user_can_provision_the_streams_it_relies_on() {
    let server = server();
    for (user, _, _) in USERS {
        let js = connect_as(&server, user).await;
        provision(&js, &StreamSettings::default())
            .await
            .unwrap_or_else(|e| panic!("{user} cannot provision: {e}"));
    }
}

#[tokio::test]
async fn only_the_gateway_and_replays_store_events_and_only_the_worker_and_replays_store_results() {
    let server = server();
    provision(
        &connect_as(&server, "gateway").await,
        &StreamSettings::default(),
    )
    .await
    .unwrap();
    let gateway = connect_as(&server, "gateway").await;
    let worker = connect_as(&server, "worker").await;
    let reporter = connect_as(&server, "reporter").await;

    assert!(can_store(&gateway, PUSH_SUBJECT).await);
    assert!(can_store(&gateway, SYNC_SUBJECT).await);
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

/// Whether this connection can take a message from the `iac-worker` consumer.
async fn take_one_event(js: &jetstream::Context) -> bool {
    use futures::StreamExt;
    let Ok(stream) = js.get_stream(EVENTS_STREAM).await else {
        return false;
    };
    let Ok(consumer) = stream
        .get_consumer::<jetstream::consumer::pull::Config>(WORKER_CONSUMER)
        .await
    else {
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
async fn the_gateway_cannot_read_events_or_touch_the_status_bucket() {
    let server = server();
    provision(
        &connect_as(&server, "gateway").await,
        &StreamSettings::default(),
    )
    .await
    .unwrap();
    let gateway = connect_as(&server, "gateway").await;
    assert!(can_store(&gateway, PUSH_SUBJECT).await);
    assert!(
        !take_one_event(&gateway).await,
        "the gateway took an event from the worker's consumer"
    );
    let worker = connect_as(&server, "worker").await;
    assert!(
        take_one_event(&worker).await,
        "the worker could not take it"
    );
    assert!(
        gateway
            .create_key_value(jetstream::kv::Config {
                bucket: STATUS_BUCKET.into(),
                ..Default::default()
            })
            .await
            .is_err(),
        "the gateway could create the status bucket"
    );
}
