//! Notifications (`NOTIFY_URL`): one POST when a service's sync starts failing in an environment,
//! one when it next syncs (a recovery), nothing while its state stays the same.
//!
//! Each (environment, service) has a record in `IAC_NOTIFY`: the last state notified and the
//! sequence of the event that set it. A finished result is decided against it with
//! compare-and-set, so however many reporters see results, one of them records a state change,
//! and only that one owes its notification. The notification is written into the record (unsent)
//! before it is sent, and cleared once the endpoint accepted it or it was given up; a reporter
//! that stops in between leaves it there for the next sweep of any reporter to finish.
//!
//! All of this runs in a task of its own behind a bounded queue: the status path only hands the
//! result over, so a slow or failing endpoint never delays a status or a sync.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use iac_shared::events::{SyncFinished, SyncOutcome};
use iac_shared::names::NOTIFY_BUCKET;
use iac_shared::shutdown::Shutdown;
use iac_shared::signature::{SIGNATURE_HEADER, sign};
use reqwest::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::config::{NotifyArgs, NotifyFormat};
use crate::metrics::Metrics;
use crate::order::now_ms;
use crate::status::{self, service_summary};
use crate::undelivered::since;

/// Finished results waiting to be decided; when it is full a result is not notified (logged
/// and counted as `dropped`) rather than wait: the status path must never be held up.
const QUEUE: usize = 1024;
/// Notifications sent at once by one reporter.
const MAX_SENDING: usize = 16;
/// How often each reporter looks for notifications left unsent (by a reporter that stopped).
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// A sender's lease covers its request's timeout plus this.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Waits between attempts: doubling from the first to the last, with jitter.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);
/// Identifies a notification to its receiver, which may see it twice (see RELIABILITY.md).
pub const NOTIFICATION_ID_HEADER: &str = "X-IAC-Notification-Id";
/// The key part of results that name no environment (`PUSH_ENV=`); no environment name has it.
const NO_ENV: &str = "-";

/// Whether a service's last sync in an environment synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Failing,
}

impl Health {
    /// Anything but `synced` is a failure: failed, timed out, unknown, not finished, blocked.
    pub fn of(outcome: SyncOutcome) -> Self {
        if outcome == SyncOutcome::Synced {
            Health::Healthy
        } else {
            Health::Failing
        }
    }
}

/// What a notification announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    Failure,
    Recovery,
}

impl NotifyEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Failure => "failure",
            NotifyEvent::Recovery => "recovery",
        }
    }

    fn announcing(health: Health) -> Self {
        match health {
            Health::Failing => NotifyEvent::Failure,
            Health::Healthy => NotifyEvent::Recovery,
        }
    }
}

/// The body of a notification (`NOTIFY_FORMAT=json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub event: NotifyEvent,
    pub service: String,
    /// `null` when pushes deploy to no named environment (`PUSH_ENV=`).
    pub env: Option<String>,
    pub repository: Option<String>,
    pub commit: Option<String>,
    pub outcome: SyncOutcome,
    /// As the service's commit status says it (`Failed with exit code 2`, `Synced`).
    pub description: String,
    /// The link of the commit status (the run), when statuses have one.
    pub target_url: Option<String>,
    /// When the sync finished (RFC 3339).
    pub time: String,
    pub event_id: String,
}

impl Notification {
    /// The body for `format`.
    pub fn body(&self, format: NotifyFormat) -> Vec<u8> {
        match format {
            NotifyFormat::Json => serde_json::to_vec(self),
            NotifyFormat::Slack => serde_json::to_vec(&serde_json::json!({ "text": self.text() })),
        }
        .expect("a notification serializes")
    }

    /// One line for a chat, in Slack's markup (`<url|label>`, with `&`, `<`, `>` escaped).
    pub fn text(&self) -> String {
        let env = self
            .env
            .as_deref()
            .map(|env| format!(" in {}", slack_escape(env)))
            .unwrap_or_default();
        let service = slack_escape(&self.service);
        let mut text = match self.event {
            NotifyEvent::Failure => format!(
                ":red_circle: *{service}* failed to sync{env}: {}",
                slack_escape(&self.description)
            ),
            NotifyEvent::Recovery => format!(":large_green_circle: *{service}* synced again{env}"),
        };
        if let Some(commit) = &self.commit {
            text.push_str(&format!(
                " (commit `{}`)",
                slack_escape(&commit[..commit.len().min(7)])
            ));
        }
        if let Some(url) = &self.target_url {
            text.push_str(&format!(" <{}|run>", slack_escape(url)));
        }
        text
    }

    /// Stable across attempts and reporters, so a receiver can drop a repeat.
    pub fn id(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.env.as_deref().unwrap_or(NO_ENV),
            self.service,
            self.event_id,
            self.event.as_str()
        )
    }
}

fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The record of one (environment, service) in `IAC_NOTIFY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The state last decided (and notified, or to be).
    pub health: Health,
    /// The `IAC_EVENTS` sequence of the result that was decided last: an older or the same
    /// result (a redelivery, a replay, another reporter's copy) changes nothing.
    pub event_seq: u64,
    /// The notification this state change owes, until sent or given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsent: Option<Unsent>,
}

/// A notification decided and not yet accepted by the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsent {
    pub notification: Notification,
    /// When it was decided (ms since the epoch): `NOTIFY_GIVE_UP_AFTER` counts from here.
    pub decided_ms: u64,
    #[serde(default)]
    pub attempts: u32,
    /// A reporter sending it, or waiting to try again, holds it until then.
    #[serde(default)]
    pub lease_until_ms: u64,
    /// Which reporter process holds it (random per process).
    #[serde(default)]
    pub holder: String,
}

/// What one service's result means for its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Already decided: the same or an older result.
    Stale,
    /// Record this, with nothing new to send. `cancelled`: an unsent notification the new state
    /// undoes (a failure not yet announced when the service synced again), so the receiver hears
    /// of neither.
    Keep {
        record: Box<Record>,
        cancelled: Option<NotifyEvent>,
    },
    /// A state change to announce.
    Notify(NotifyEvent),
}

/// Decides a result in `health` from the event at `event_seq` against the stored record.
pub fn decide(stored: Option<&Record>, health: Health, event_seq: u64) -> Decision {
    let keep = |unsent, cancelled| Decision::Keep {
        record: Box::new(Record {
            health,
            event_seq,
            unsent,
        }),
        cancelled,
    };
    let Some(stored) = stored else {
        // Nothing known yet: a first failure is news, a first success is not.
        return match health {
            Health::Failing => Decision::Notify(NotifyEvent::Failure),
            Health::Healthy => keep(None, None),
        };
    };
    if event_seq <= stored.event_seq {
        return Decision::Stale;
    }
    if health == stored.health {
        // Still failing, or still fine: what is owed is still owed.
        return keep(stored.unsent.clone(), None);
    }
    match &stored.unsent {
        Some(unsent) => keep(None, Some(unsent.notification.event)),
        None => Decision::Notify(NotifyEvent::announcing(health)),
    }
}

/// The key of (environment, service): `production.platform/postgres`; dots within the service
/// are written `=2E`, since a key's dots separate its parts.
pub fn notify_key(env: Option<&str>, service: &str) -> String {
    format!("{}.{}", env.unwrap_or(NO_ENV), service.replace('.', "=2E"))
}

/// The notifications `finished` may owe, one per service, before any record is read.
pub fn notifications_of(
    finished: &SyncFinished,
    repository: Option<String>,
    target_url: Option<String>,
) -> Vec<(Health, Notification)> {
    finished
        .services
        .iter()
        .map(|result| {
            let health = Health::of(result.outcome);
            let notification = Notification {
                event: NotifyEvent::announcing(health),
                service: result.service.clone(),
                env: finished.env.clone(),
                repository: repository.clone().or_else(|| finished.repository.clone()),
                commit: finished.commit.clone(),
                outcome: result.outcome,
                description: service_summary(result).1,
                target_url: target_url.clone(),
                time: finished.finished_at.clone(),
                event_id: finished.event_id.clone(),
            };
            (health, notification)
        })
        .collect()
}

/// A finished result handed over by the status path, with what its statuses said.
struct Offer {
    finished: SyncFinished,
    repository: Option<String>,
    target_url: Option<String>,
}

/// The status path's handle: hands finished results to the notification task.
#[derive(Clone)]
pub struct Notifier {
    offers: mpsc::Sender<Offer>,
    metrics: Metrics,
}

impl Notifier {
    /// Queues `finished` for deciding, never waiting; `plan` gives the repository and the link
    /// its statuses carry.
    pub fn offer(&self, finished: SyncFinished, plan: &status::Plan) {
        if finished.services.is_empty() {
            return;
        }
        let first = plan.as_ref().ok().and_then(|statuses| statuses.first());
        let offer = Offer {
            repository: first.map(|s| s.repository.clone()),
            target_url: first.and_then(|s| s.status.target_url.clone()),
            finished,
        };
        if let Err(e) = self.offers.try_send(offer) {
            let event_id = match &e {
                mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => {
                    o.finished.event_id.clone()
                }
            };
            self.metrics.notification("unknown", "dropped");
            tracing::warn!(
                %event_id,
                "the notification queue is full or closed; this result's failures and recoveries are not notified"
            );
        }
    }
}

/// Why a notification was not accepted.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The endpoint said no in a way a retry will not change (a 4xx other than 408 and 429).
    #[error("the endpoint refused the notification with HTTP {0}")]
    Refused(u16),
    #[error("{0}")]
    Transient(String),
}

/// The notification task's shared state.
struct Sender {
    store: kv::Store,
    http: reqwest::Client,
    url: SecretString,
    secret: Option<SecretString>,
    format: NotifyFormat,
    timeout: Duration,
    give_up_after: Duration,
    metrics: Metrics,
    /// This process, as it holds a notification's lease.
    id: String,
    /// Keys this process is sending, so a sweep does not start a second sender for one.
    sending: Mutex<HashSet<String>>,
    slots: Semaphore,
}

/// Starts the notification task; it ends once every [`Notifier`] is dropped, after deciding
/// what was queued. Sends in flight at `shutdown` are left unsent for a sweep to finish.
pub fn start(
    args: &NotifyArgs,
    url: SecretString,
    store: kv::Store,
    metrics: Metrics,
    shutdown: Shutdown,
) -> Result<(Notifier, tokio::task::JoinHandle<()>), reqwest::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(args.timeout)
        .connect_timeout(args.timeout)
        .build()?;
    let sender = Arc::new(Sender {
        store,
        http,
        url,
        secret: args.secret.clone(),
        format: args.format,
        timeout: args.timeout,
        give_up_after: args.give_up_after,
        metrics: metrics.clone(),
        id: format!("{:016x}", rand::random::<u64>()),
        sending: Mutex::new(HashSet::new()),
        slots: Semaphore::new(MAX_SENDING),
    });
    let (offers, received) = mpsc::channel(QUEUE);
    let task = tokio::spawn(sender.run(received, shutdown));
    Ok((Notifier { offers, metrics }, task))
}

impl Sender {
    async fn run(self: Arc<Self>, mut offers: mpsc::Receiver<Offer>, shutdown: Shutdown) {
        let mut sends = JoinSet::new();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        loop {
            tokio::select! {
                offer = offers.recv() => {
                    let Some(offer) = offer else { break };
                    for key in self.decide_all(offer).await {
                        if !stopping {
                            self.clone().spawn_send(&mut sends, key);
                        }
                    }
                }
                _ = sweep.tick(), if !stopping => {
                    for key in self.unsent_keys().await {
                        self.clone().spawn_send(&mut sends, key);
                    }
                }
                _ = shutdown.wait(), if !stopping => {
                    // Decided notifications are in the bucket; the next sweep finishes them.
                    stopping = true;
                    sends.abort_all();
                }
                Some(_) = sends.join_next(), if !sends.is_empty() => {}
            }
        }
        sends.abort_all();
        while sends.join_next().await.is_some() {}
    }

    fn spawn_send(self: Arc<Self>, sends: &mut JoinSet<()>, key: String) {
        if !self
            .sending
            .lock()
            .expect("not poisoned")
            .insert(key.clone())
        {
            return;
        }
        sends.spawn(async move {
            let _slot = self.slots.acquire().await.expect("never closed");
            self.send(&key).await;
            self.sending.lock().expect("not poisoned").remove(&key);
        });
    }

    /// Decides each service of a result; the keys whose notification this reporter now owes.
    async fn decide_all(&self, offer: Offer) -> Vec<String> {
        let finished = &offer.finished;
        let mut owed = Vec::new();
        for (health, notification) in notifications_of(finished, offer.repository, offer.target_url)
        {
            let key = notify_key(finished.env.as_deref(), &notification.service);
            match self
                .decide_one(&key, health, finished.event_seq, notification)
                .await
            {
                Ok(true) => owed.push(key),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    %key,
                    event_id = %finished.event_id,
                    "could not decide a notification; this result is not notified"
                ),
            }
        }
        owed
    }

    /// Records the result in `health` for `key` (compare-and-set); true when it owes a
    /// notification.
    async fn decide_one(
        &self,
        key: &str,
        health: Health,
        event_seq: u64,
        notification: Notification,
    ) -> Result<bool, String> {
        loop {
            let (revision, stored) = self.read(key).await?;
            let (record, owes, cancelled) = match decide(stored.as_ref(), health, event_seq) {
                Decision::Stale => return Ok(false),
                Decision::Keep { record, cancelled } => (*record, false, cancelled),
                Decision::Notify(_) => {
                    let unsent = Unsent {
                        notification: notification.clone(),
                        decided_ms: now_ms(),
                        attempts: 0,
                        lease_until_ms: 0,
                        holder: String::new(),
                    };
                    let record = Record {
                        health,
                        event_seq,
                        unsent: Some(unsent),
                    };
                    (record, true, None)
                }
            };
            if self.write(key, revision, &record).await?.is_some() {
                if let Some(event) = cancelled {
                    self.metrics.notification(event.as_str(), "cancelled");
                    tracing::info!(%key, event = event.as_str(), "an unsent notification is cancelled: the state it announced is over");
                }
                return Ok(owes);
            }
        }
    }

    /// Sends the notification `key` owes until the endpoint accepts it, it is given up, or
    /// another reporter holds it.
    async fn send(&self, key: &str) {
        loop {
            let (revision, record, unsent) = match self.read(key).await {
                Ok((Some(revision), Some(record))) => match record.unsent.clone() {
                    Some(unsent) => (revision, record, unsent),
                    None => return,
                },
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, %key, "could not read a notification; the next sweep tries again");
                    return;
                }
            };
            if unsent.lease_until_ms > now_ms() && unsent.holder != self.id {
                return;
            }
            let lease = self.timeout + LEASE_MARGIN;
            let attempt = Unsent {
                attempts: unsent.attempts + 1,
                lease_until_ms: now_ms() + lease.as_millis() as u64,
                holder: self.id.clone(),
                ..unsent
            };
            let record = Record {
                unsent: Some(attempt.clone()),
                ..record
            };
            let revision = match self.write(key, Some(revision), &record).await {
                Ok(Some(revision)) => revision,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, %key, "could not take a notification; the next sweep tries again");
                    return;
                }
            };
            let notification = &attempt.notification;
            let event = notification.event.as_str();
            let error = match self.post(notification).await {
                Ok(()) => {
                    self.metrics.notification(event, "sent");
                    tracing::info!(%key, event, event_id = %notification.event_id, "sent the notification");
                    self.clear(key, revision, record).await;
                    return;
                }
                Err(error) => error,
            };
            let refused = matches!(error, SendError::Refused(_));
            if refused || since(attempt.decided_ms) >= self.give_up_after {
                self.metrics.notification(event, "given_up");
                tracing::error!(%key, event, event_id = %notification.event_id, attempts = attempt.attempts, error = %error, "gave up on the notification");
                self.clear(key, revision, record).await;
                return;
            }
            self.metrics.notification(event, "retried");
            let delay = retry_delay(attempt.attempts, rand::random());
            tracing::warn!(%key, event, event_id = %notification.event_id, error = %error, retry_in = ?delay, "the notification was not accepted; trying again");
            // Hold it while waiting, so that no sweep starts a second sender.
            let waiting = Record {
                unsent: Some(Unsent {
                    lease_until_ms: now_ms() + delay.as_millis() as u64,
                    ..attempt
                }),
                ..record
            };
            let _ = self.write(key, Some(revision), &waiting).await;
            tokio::time::sleep(delay).await;
        }
    }

    /// Marks the notification of `record` (stored at `revision`) done, unless the record has
    /// moved on to another one meanwhile.
    async fn clear(&self, key: &str, mut revision: u64, mut record: Record) {
        let Some(done) = record.unsent.take() else {
            return;
        };
        loop {
            match self.write(key, Some(revision), &record).await {
                Ok(Some(_)) => return,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, %key, "could not record the notification as done; it may be sent again");
                    return;
                }
            }
            // A newer result was recorded in between: clear only what is still this one.
            match self.read(key).await {
                Ok((Some(now), Some(newer)))
                    if newer
                        .unsent
                        .as_ref()
                        .is_some_and(|u| u.notification == done.notification) =>
                {
                    (revision, record) = (
                        now,
                        Record {
                            unsent: None,
                            ..newer
                        },
                    );
                }
                _ => return,
            }
        }
    }

    async fn post(&self, notification: &Notification) -> Result<(), SendError> {
        let body = notification.body(self.format);
        let mut request = self
            .http
            .post(self.url.expose_secret())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static("iac-runner"))
            .header(NOTIFICATION_ID_HEADER, notification.id());
        if let Some(secret) = &self.secret {
            request = request.header(
                SIGNATURE_HEADER,
                sign(secret.expose_secret().as_bytes(), &body),
            );
        }
        // `without_url`: the URL may hold a token and must not reach the log.
        let answer = request
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Transient(e.without_url().to_string()))?;
        let code = answer.status();
        if code.is_success() {
            Ok(())
        } else if code.is_client_error() && code.as_u16() != 408 && code.as_u16() != 429 {
            Err(SendError::Refused(code.as_u16()))
        } else {
            Err(SendError::Transient(format!("HTTP {}", code.as_u16())))
        }
    }

    /// The keys with an unsent notification nobody holds.
    async fn unsent_keys(&self) -> Vec<String> {
        let prefix = format!("$KV.{NOTIFY_BUCKET}.");
        let subjects = match self
            .store
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
        {
            Ok(subjects) => subjects.try_collect::<Vec<_>>().await,
            Err(e) => Err(e),
        };
        let subjects = match subjects {
            Ok(subjects) => subjects,
            Err(e) => {
                tracing::warn!(error = %e, "could not list {NOTIFY_BUCKET} to finish unsent notifications");
                return Vec::new();
            }
        };
        let mut keys = Vec::new();
        for (subject, _) in subjects {
            let Some(key) = subject.strip_prefix(&prefix) else {
                continue;
            };
            if let Ok((_, Some(record))) = self.read(key).await
                && record
                    .unsent
                    .is_some_and(|unsent| unsent.lease_until_ms <= now_ms())
            {
                keys.push(key.to_string());
            }
        }
        keys
    }

    /// The entry's revision (`None`: no entry) and its record (`None` also when deleted or
    /// unreadable, so that it is overwritten).
    async fn read(&self, key: &str) -> Result<(Option<u64>, Option<Record>), String> {
        let entry = self.store.entry(key).await.map_err(|e| e.to_string())?;
        Ok(match entry {
            None => (None, None),
            Some(entry) => {
                let record = (entry.operation == kv::Operation::Put)
                    .then(|| serde_json::from_slice::<Record>(&entry.value).ok())
                    .flatten();
                (Some(entry.revision), record)
            }
        })
    }

    /// Compare-and-set: `Some(revision)` when written, `None` when someone else wrote first.
    async fn write(
        &self,
        key: &str,
        revision: Option<u64>,
        record: &Record,
    ) -> Result<Option<u64>, String> {
        let value: bytes::Bytes = serde_json::to_vec(record)
            .expect("a record serializes")
            .into();
        match revision {
            None => match self.store.create(key, value).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Some(revision) => match self.store.update(key, value, revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// The wait after the `attempts`-th failed attempt: from [`FIRST_RETRY`] doubling up to
/// [`LAST_RETRY`], each between half and all of that.
pub fn retry_delay(attempts: u32, jitter: f64) -> Duration {
    let full = FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(attempts.clamp(1, 16) - 1))
        .min(LAST_RETRY);
    full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(health: Health, event_seq: u64, unsent: Option<NotifyEvent>) -> Record {
        Record {
            health,
            event_seq,
            unsent: unsent.map(|event| Unsent {
                notification: notification(event),
                decided_ms: 1,
                attempts: 0,
                lease_until_ms: 0,
                holder: String::new(),
            }),
        }
    }

    fn notification(event: NotifyEvent) -> Notification {
        Notification {
            event,
            service: "platform/postgres".into(),
            env: Some("production".into()),
            repository: Some("acme/infra".into()),
            commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            outcome: SyncOutcome::Failed,
            description: "Failed with exit code 2".into(),
            target_url: Some("https://ci.example.com/runs/1?a=1&b=2".into()),
            time: "2026-01-01T00:00:00Z".into(),
            event_id: "e1".into(),
        }
    }

    #[test]
    fn a_first_failure_is_announced_and_a_first_success_is_not() {
        assert_eq!(
            decide(None, Health::Failing, 1),
            Decision::Notify(NotifyEvent::Failure)
        );
        assert_eq!(
            decide(None, Health::Healthy, 1),
            Decision::Keep {
                record: Box::new(record(Health::Healthy, 1, None)),
                cancelled: None
            }
        );
    }

    #[test]
    fn only_a_change_of_state_is_announced() {
        let healthy = record(Health::Healthy, 5, None);
        let failing = record(Health::Failing, 5, None);
        assert_eq!(
            decide(Some(&healthy), Health::Failing, 6),
            Decision::Notify(NotifyEvent::Failure)
        );
        assert_eq!(
            decide(Some(&failing), Health::Healthy, 6),
            Decision::Notify(NotifyEvent::Recovery)
        );
        assert!(matches!(
            decide(Some(&healthy), Health::Healthy, 6),
            Decision::Keep {
                cancelled: None,
                ..
            }
        ));
        assert!(matches!(
            decide(Some(&failing), Health::Failing, 6),
            Decision::Keep {
                cancelled: None,
                ..
            }
        ));
    }

    #[test]
    fn the_same_or_an_older_result_changes_nothing() {
        let failing = record(Health::Failing, 5, None);
        assert_eq!(decide(Some(&failing), Health::Healthy, 5), Decision::Stale);
        assert_eq!(decide(Some(&failing), Health::Healthy, 4), Decision::Stale);
    }

    #[test]
    fn an_unsent_notification_stays_owed_while_the_state_lasts_and_is_cancelled_when_it_ends() {
        let owed = record(Health::Failing, 5, Some(NotifyEvent::Failure));
        assert_eq!(
            decide(Some(&owed), Health::Failing, 6),
            Decision::Keep {
                record: Box::new(Record {
                    event_seq: 6,
                    ..owed.clone()
                }),
                cancelled: None
            }
        );
        assert_eq!(
            decide(Some(&owed), Health::Healthy, 6),
            Decision::Keep {
                record: Box::new(record(Health::Healthy, 6, None)),
                cancelled: Some(NotifyEvent::Failure)
            }
        );
    }

    #[test]
    fn keys_are_one_per_environment_and_service_and_valid_bucket_keys() {
        assert_eq!(
            notify_key(Some("production"), "platform/postgres"),
            "production.platform/postgres"
        );
        assert_eq!(notify_key(None, "platform/01.db."), "-.platform/01=2Edb=2E");
    }

    #[test]
    fn the_slack_text_names_service_environment_and_run_and_escapes_markup() {
        let mut n = notification(NotifyEvent::Failure);
        n.description = "Failed: <a> & b".into();
        let text = n.text();
        assert_eq!(
            text,
            ":red_circle: *platform/postgres* failed to sync in production: Failed: &lt;a&gt; &amp; b \
             (commit `0123456`) <https://ci.example.com/runs/1?a=1&amp;b=2|run>"
        );
        let body: serde_json::Value = serde_json::from_slice(&n.body(NotifyFormat::Slack)).unwrap();
        assert_eq!(body["text"], text);
        let recovery = Notification {
            env: None,
            target_url: None,
            ..notification(NotifyEvent::Recovery)
        };
        assert_eq!(
            recovery.text(),
            ":large_green_circle: *platform/postgres* synced again (commit `0123456`)"
        );
    }

    #[test]
    fn retries_start_within_a_second_and_never_wait_more_than_a_minute() {
        assert!(retry_delay(1, 0.0) >= Duration::from_millis(500));
        assert!(retry_delay(1, 1.0) <= FIRST_RETRY);
        assert!(retry_delay(3, 1.0) <= Duration::from_secs(4));
        assert_eq!(retry_delay(40, 1.0), LAST_RETRY);
    }
}
