//! The event store: JetStream, reached through a client that reconnects by itself.
//!
//! An event counts as stored only when JetStream acknowledged it; anything else is a
//! [`StoreError`] and the request is answered 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use iac_shared::names::{EVENT_ID_HEADER, FORCE_HEADER, MSG_ID_HEADER};
use iac_shared::nats::{ConsumerSettings, StreamSettings, provision_until_ready_with};
use iac_shared::shutdown::Shutdown;
use tokio::sync::{mpsc, oneshot};

/// Room left in a message for its headers when an event is fitted to `max_payload`.
pub const HEADER_ROOM: usize = 4096;

/// Why an event was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not connected to NATS")]
    Disconnected,
    #[error("streams not provisioned yet")]
    NotProvisioned,
    #[error("no acknowledgement within {0:?}")]
    TimedOut(Duration),
    #[error("no stream stores the subject")]
    NoStream,
    #[error("event larger than the server's max_payload")]
    TooLarge,
    #[error("publish failed ({0})")]
    Publish(String),
    #[error("the publisher task stopped")]
    PublisherStopped,
}

/// A stored event: its stream sequence and whether JetStream had seen its id already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub sequence: u64,
    pub duplicate: bool,
}

pub struct EventStore {
    client: Client,
    js: jetstream::Context,
    provisioned: AtomicBool,
    timeout: Duration,
    publisher: mpsc::Sender<Job>,
}

impl EventStore {
    /// A store publishing through `client`, waiting at most `timeout` for each acknowledgement.
    pub fn new(client: Client, timeout: Duration) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        let (publisher, jobs) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publish_batches(js.clone(), jobs));
        EventStore {
            client,
            js,
            provisioned: AtomicBool::new(false),
            timeout,
            publisher,
        }
    }

    /// Creates the streams and missing consumers (the worker's for every environment of
    /// `consumers`), retrying until NATS answers or shutdown. Nothing is published before this
    /// succeeded, so no event lacks its consumer (they take only what is stored after them).
    pub async fn provision(
        &self,
        settings: &StreamSettings,
        consumers: &ConsumerSettings,
        shutdown: &Shutdown,
    ) {
        match provision_until_ready_with(&self.js, settings, consumers, shutdown).await {
            Ok(()) => {
                self.provisioned.store(true, Ordering::Release);
                tracing::info!("streams ready; accepting events");
            }
            Err(e) if shutdown.is_triggered() => {
                tracing::debug!(error = %e, "provisioning stopped by shutdown");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot provision the streams; every event will be answered 503")
            }
        }
    }

    /// Connected to NATS and the streams exist.
    pub fn is_ready(&self) -> bool {
        self.provisioned.load(Ordering::Acquire)
            && self.client.connection_state() == State::Connected
    }

    /// Largest event payload that fits a message of this server, headers included.
    pub fn payload_limit(&self) -> usize {
        self.client.max_payload().saturating_sub(HEADER_ROOM)
    }

    /// Publishes `payload` on `subject` with `event_id` as its event id and de-duplication id,
    /// through the publisher task, and waits for JetStream's acknowledgement.
    pub async fn publish(
        &self,
        subject: &'static str,
        event_id: &str,
        payload: Vec<u8>,
    ) -> Result<Stored, StoreError> {
        self.publish_event(subject, event_id, payload, false).await
    }

    /// [`publish`](Self::publish), with `Iac-Force` when `force`: the event's tasks run even
    /// where they would be skipped (a Re-run).
    pub async fn publish_event(
        &self,
        subject: &'static str,
        event_id: &str,
        payload: Vec<u8>,
        force: bool,
    ) -> Result<Stored, StoreError> {
        if !self.provisioned.load(Ordering::Acquire) {
            return Err(StoreError::NotProvisioned);
        }
        // While disconnected the client would buffer the message and send it after a
        // reconnect; answer now instead, GitHub's redelivery carries the same id.
        if self.client.connection_state() != State::Connected {
            return Err(StoreError::Disconnected);
        }
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID_HEADER, event_id);
        headers.insert(EVENT_ID_HEADER, event_id);
        if force {
            headers.insert(FORCE_HEADER, "true");
        }
        let timeout = self.timeout;
        let refused = move |e: PublishError| match e.kind() {
            PublishErrorKind::TimedOut => StoreError::TimedOut(timeout),
            PublishErrorKind::StreamNotFound => StoreError::NoStream,
            PublishErrorKind::MaxPayloadExceeded => StoreError::TooLarge,
            PublishErrorKind::BrokenPipe => StoreError::Disconnected,
            _ => StoreError::Publish(e.to_string()),
        };
        let publish = async {
            let (sent, ack) = oneshot::channel();
            let job = Job {
                subject,
                headers,
                payload: payload.into(),
                sent,
            };
            self.publisher
                .send(job)
                .await
                .map_err(|_| StoreError::PublisherStopped)?;
            let ack = ack.await.map_err(|_| StoreError::PublisherStopped)?;
            ack.map_err(refused)?.await.map_err(refused)
        };
        let ack: PublishAck = tokio::time::timeout(timeout, publish)
            .await
            .map_err(|_| StoreError::TimedOut(timeout))??;
        Ok(Stored {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

/// One event handed to the publisher task, and where its acknowledgement future goes.
struct Job {
    subject: &'static str,
    headers: HeaderMap,
    payload: Bytes,
    sent: oneshot::Sender<Result<PublishAckFuture, PublishError>>,
}

/// Most events the publisher sends in one go.
const BATCH: usize = 64;

/// Events waiting for the publisher; a handler finding the queue full waits (within its
/// publish timeout).
const PUBLISH_QUEUE: usize = 1024;

/// The publisher task: sends the events handed to it in batches. After the first event of a
/// batch it lets the other ready request handlers run up to their own publish, then sends all
/// of them back to back, so that they leave in one write, which nats-server then reads, stores
/// and acknowledges together. Sent one at a time as each handler got there, every event took
/// a write of its own, and nats-server read 1.5 events per read instead of 3 and spent more
/// CPU on each than on the same events arriving together.
async fn publish_batches(js: jetstream::Context, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(BATCH);
    while jobs.recv_many(&mut batch, BATCH).await > 0 {
        tokio::task::yield_now().await;
        while batch.len() < BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        for job in batch.drain(..) {
            if job.sent.is_closed() {
                // Its request already timed out and was answered 503: not stored.
                continue;
            }
            let message = PublishMessage::build()
                .payload(job.payload)
                .headers(job.headers);
            let sent = js.send_publish(job.subject, message).await;
            let _ = job.sent.send(sent);
        }
    }
}
