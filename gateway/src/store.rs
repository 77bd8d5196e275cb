//! The event store: JetStream, reached through a client that reconnects by itself.
//!
//! An event counts as stored only when JetStream acknowledged it; anything else is a
//! [`StoreError`] and the request is answered 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind, publish::PublishAck};
use async_nats::{Client, HeaderMap};
use iac_shared::names::{EVENT_ID_HEADER, MSG_ID_HEADER};
use iac_shared::nats::{StreamSettings, provision_until_ready};
use iac_shared::shutdown::Shutdown;

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
}

impl EventStore {
    /// A store publishing through `client`, waiting at most `timeout` for each acknowledgement.
    pub fn new(client: Client, timeout: Duration) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        EventStore {
            client,
            js,
            provisioned: AtomicBool::new(false),
            timeout,
        }
    }

    /// Creates the streams and missing consumers, retrying until NATS answers or shutdown.
    /// Nothing is published before this succeeded, so no event lacks its consumers.
    pub async fn provision(&self, settings: &StreamSettings, shutdown: &Shutdown) {
        match provision_until_ready(&self.js, settings, shutdown).await {
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
    /// and waits for JetStream's acknowledgement.
    pub async fn publish(
        &self,
        subject: &'static str,
        event_id: &str,
        payload: Vec<u8>,
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
        let publish = async {
            self.js
                .publish_with_headers(subject, headers, payload.into())
                .await?
                .await
        };
        let ack: PublishAck = tokio::time::timeout(self.timeout, publish)
            .await
            .map_err(|_| StoreError::TimedOut(self.timeout))?
            .map_err(|e| match e.kind() {
                PublishErrorKind::TimedOut => StoreError::TimedOut(self.timeout),
                PublishErrorKind::StreamNotFound => StoreError::NoStream,
                PublishErrorKind::MaxPayloadExceeded => StoreError::TooLarge,
                PublishErrorKind::BrokenPipe => StoreError::Disconnected,
                _ => StoreError::Publish(e.to_string()),
            })?;
        Ok(Stored {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}
