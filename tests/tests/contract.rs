//! The event contract against a real nats-server: streams, consumers, de-duplication, drift.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use iac_shared::names::*;
use iac_shared::nats::{StreamSettings, ensure_stream, events_stream_config, provision};
use iac_tests::nats::NatsServer;

#[tokio::test]
async fn provisioning_creates_the_streams_and_consumers_of_the_contract() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    provision(&js, &StreamSettings::default()).await.unwrap();

    let mut events = js.get_stream(EVENTS_STREAM).await.unwrap();
    let config = events.info().await.unwrap().config.clone();
    assert_eq!(config.subjects, ["iac.events.>"]);
    assert_eq!(config.retention, stream::RetentionPolicy::Limits);
    assert_eq!(config.storage, stream::StorageType::File);
    assert_eq!(config.max_age, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(config.duplicate_window, Duration::from_secs(120));

    let mut results = js.get_stream(RESULTS_STREAM).await.unwrap();
    assert_eq!(
        results.info().await.unwrap().config.subjects,
        ["iac.results.>"]
    );

    let worker = events.consumer_info(WORKER_CONSUMER).await.unwrap();
    assert_eq!(worker.config.max_ack_pending, 1);
    assert_eq!(
        worker.config.ack_policy,
        jetstream::consumer::AckPolicy::Explicit
    );
    let reporter = results.consumer_info(REPORTER_CONSUMER).await.unwrap();
    assert_eq!(
        reporter.config.ack_policy,
        jetstream::consumer::AckPolicy::Explicit
    );
    assert!(reporter.config.deliver_subject.is_none(), "a pull consumer");
    let queued = events
        .consumer_info(REPORTER_EVENTS_CONSUMER)
        .await
        .unwrap();
    assert_eq!(queued.config.filter_subject, PUSH_SUBJECT);
}

#[tokio::test]
async fn provisioning_twice_changes_nothing_and_keeps_messages() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    provision(&js, &StreamSettings::default()).await.unwrap();
    js.publish(SYNC_SUBJECT, r#"{"all": true}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    provision(&js, &StreamSettings::default()).await.unwrap();
    let mut events = js.get_stream(EVENTS_STREAM).await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn a_drifted_stream_is_corrected_at_start() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    provision(&js, &StreamSettings::default()).await.unwrap();
    let mut drifted = events_stream_config(&StreamSettings::default());
    drifted.max_age = Duration::from_secs(600);
    js.update_stream(&drifted).await.unwrap();

    provision(&js, &StreamSettings::default()).await.unwrap();
    let mut events = js.get_stream(EVENTS_STREAM).await.unwrap();
    assert_eq!(
        events.info().await.unwrap().config.max_age,
        Duration::from_secs(30 * 24 * 3600)
    );
}

#[tokio::test]
async fn a_drift_that_cannot_be_corrected_is_reported_by_field() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let mut memory = events_stream_config(&StreamSettings::default());
    memory.storage = stream::StorageType::Memory;
    js.create_stream(memory).await.unwrap();

    let err = ensure_stream(&js, events_stream_config(&StreamSettings::default()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("IAC_EVENTS"), "{err}");
    assert!(err.contains("storage"), "{err}");
}

#[tokio::test]
async fn the_same_message_id_inside_the_window_is_stored_once() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    provision(&js, &StreamSettings::default()).await.unwrap();
    for _ in 0..5 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID_HEADER, "72d3162e-cc78-11e3-81ab-4c9367dc0958");
        let ack = js
            .publish_with_headers(PUSH_SUBJECT, headers, "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, 1);
    }
    let mut events = js.get_stream(EVENTS_STREAM).await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 1);
}
