//! What every service loop does the same way: start its durable consumers once NATS is ready,
//! retry with backoff until shutdown, keep a message in hand while working on it, and read the
//! event envelope from a message's headers.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};

use crate::events::truncate_chars;
use crate::names::{EVENT_ID_HEADER, FORCE_HEADER, MSG_ID_HEADER, REPLAY_OF_HEADER};
use crate::nats::{ProvisionError, StreamSettings, ensure_consumer, provision_until_ready};
use crate::shutdown::Shutdown;

/// The longest wait between two attempts of [`retry_until_shutdown`].
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The longest event id kept from a header; longer ones are cut.
const MAX_EVENT_ID_CHARS: usize = 200;

/// Runs `attempt` until it succeeds, waiting `first_delay` after the first failure and twice
/// as long after each next one (at most [`MAX_RETRY_DELAY`]).
///
/// `retry` is told each error and the coming delay (to log it) and may say `false` to stop at
/// once, for an error that waiting cannot mend. The last error is returned when `retry` stops
/// or shutdown comes during a wait.
pub async fn retry_until_shutdown<T, E, Fut>(
    shutdown: &Shutdown,
    first_delay: Duration,
    mut attempt: impl FnMut() -> Fut,
    mut retry: impl FnMut(&E, Duration) -> bool,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = first_delay;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => {
                if !retry(&e, delay) || shutdown.sleep_or_shutdown(delay).await {
                    return Err(e);
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Provisions the streams (retrying while NATS starts or a cluster elects a leader), then
/// starts each durable pull consumer this service owns, correcting a drifted configuration.
/// `Ok(None)` when shutdown came first.
///
/// Without NATS authentication this creates whatever is missing. Under the users of
/// `deploy/nats/permissions.conf` a service may not create or change anything: it waits (and
/// is not ready) until the operator has run `iac-worker provision`, and runs with drift it may
/// not correct, saying so in its log.
pub async fn start_consumers<const N: usize>(
    js: &jetstream::Context,
    settings: &StreamSettings,
    wanted: [(&str, consumer::pull::Config); N],
    shutdown: &Shutdown,
) -> Result<Option<[consumer::PullConsumer; N]>, ProvisionError> {
    if let Err(e) = provision_until_ready(js, settings, shutdown).await {
        return if shutdown.is_triggered() {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut started = Vec::with_capacity(N);
    for (stream, config) in wanted {
        started.push(ensure_consumer(js, stream, config, true).await?);
    }
    Ok(Some(started.try_into().unwrap_or_else(|_| {
        unreachable!("one consumer per wanted configuration")
    })))
}

/// Runs `work`, telling JetStream every `every` that `message` is still in hand, so it is not
/// redelivered to another process while the work goes on.
pub async fn with_progress<T>(
    message: &jetstream::Message,
    every: Duration,
    work: impl Future<Output = T>,
) -> T {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "cannot extend the message's ack wait");
                }
            }
        }
    }
}

/// What a delivered message's JetStream metadata and headers say about the event it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub subject: String,
    /// The message's sequence in its stream.
    pub seq: u64,
    /// Which delivery of the message this is (1 for the first).
    pub delivered: i64,
    /// `Iac-Event-Id`, else `Nats-Msg-Id`; `None` for a message published by hand without
    /// either.
    pub event_id: Option<String>,
    /// `Iac-Replay-Of`: the stream sequence of the original this message replays.
    pub replay_of: Option<u64>,
    /// `Iac-Force: true` (or `1`, `yes`): run tasks even where they would be skipped.
    pub force: bool,
}

/// A message without JetStream metadata (not delivered by a consumer).
#[derive(Debug, thiserror::Error)]
#[error("a message without JetStream metadata on {subject}: {reason}")]
pub struct NoMetadata {
    pub subject: String,
    pub reason: String,
}

impl Envelope {
    /// Reads the envelope of a message delivered by a JetStream consumer.
    pub fn of(message: &jetstream::Message) -> Result<Self, NoMetadata> {
        let info = message.info().map_err(|e| NoMetadata {
            subject: truncate_chars(message.subject.as_str(), MAX_EVENT_ID_CHARS),
            reason: e.to_string(),
        })?;
        Ok(Envelope::read(
            message.subject.as_str(),
            info.stream_sequence,
            info.delivered,
            |name| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            },
        ))
    }

    /// Builds the envelope from the metadata and a header look-up; blank headers count as
    /// absent.
    pub fn read(
        subject: &str,
        seq: u64,
        delivered: i64,
        header: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let present = |name: &str| {
            header(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Envelope {
            subject: subject.to_string(),
            seq,
            delivered,
            event_id: present(EVENT_ID_HEADER)
                .or_else(|| present(MSG_ID_HEADER))
                .map(|id| truncate_chars(&id, MAX_EVENT_ID_CHARS)),
            replay_of: present(REPLAY_OF_HEADER).and_then(|v| v.parse().ok()),
            force: present(FORCE_HEADER).is_some_and(|v| {
                v.eq_ignore_ascii_case("true") || v == "1" || v.eq_ignore_ascii_case("yes")
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::HashMap;

    use super::*;

    fn envelope(headers: &[(&str, &str)]) -> Envelope {
        let headers: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Envelope::read("iac.events.push", 7, 2, |name| headers.get(name).cloned())
    }

    #[test]
    fn the_event_id_comes_from_its_header_then_the_message_id() {
        let both = envelope(&[(EVENT_ID_HEADER, "evt"), (MSG_ID_HEADER, "msg")]);
        assert_eq!(both.event_id.as_deref(), Some("evt"));
        let msg_only = envelope(&[(EVENT_ID_HEADER, "  "), (MSG_ID_HEADER, "msg")]);
        assert_eq!(msg_only.event_id.as_deref(), Some("msg"));
        assert_eq!(envelope(&[]).event_id, None);
        let long = "x".repeat(500);
        let cut = envelope(&[(EVENT_ID_HEADER, long.as_str())]);
        assert_eq!(cut.event_id.map(|id| id.chars().count()), Some(200));
    }

    #[test]
    fn replay_and_force_headers_are_read_and_bad_values_ignored() {
        let replayed = envelope(&[(REPLAY_OF_HEADER, "41"), (FORCE_HEADER, "TRUE")]);
        assert_eq!((replayed.replay_of, replayed.force), (Some(41), true));
        for yes in ["1", "yes", "true"] {
            assert!(envelope(&[(FORCE_HEADER, yes)]).force, "{yes}");
        }
        let bad = envelope(&[(REPLAY_OF_HEADER, "forty"), (FORCE_HEADER, "no")]);
        assert_eq!((bad.replay_of, bad.force), (None, false));
        assert_eq!((bad.seq, bad.delivered), (7, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_wait_longer_each_time_up_to_the_bound_until_success() {
        let (calls, delays) = (Cell::new(0), std::cell::RefCell::new(Vec::new()));
        let out: Result<u32, &str> = retry_until_shutdown(
            &Shutdown::never(),
            Duration::from_secs(1),
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 6 { Err("not yet") } else { Ok(n) } }
            },
            |_, delay| {
                delays.borrow_mut().push(delay.as_secs());
                true
            },
        )
        .await;
        assert_eq!(out, Ok(6));
        assert_eq!(*delays.borrow(), [1, 2, 4, 5, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_error_or_a_shutdown_stops_the_retries_with_the_last_error() {
        let out: Result<(), &str> = retry_until_shutdown(
            &Shutdown::never(),
            Duration::from_secs(1),
            || async { Err("for good") },
            |_, _| false,
        )
        .await;
        assert_eq!(out, Err("for good"));

        let (trigger, shutdown) = crate::shutdown::channel();
        trigger.trigger();
        let calls = Cell::new(0);
        let out: Result<(), &str> = retry_until_shutdown(
            &shutdown,
            Duration::from_secs(1),
            || {
                calls.set(calls.get() + 1);
                async { Err("unreachable") }
            },
            |_, _| true,
        )
        .await;
        assert_eq!((out, calls.get()), (Err("unreachable"), 1));
    }
}
