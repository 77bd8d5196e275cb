//! Handling one message: plan its statuses, claim each in `IAC_STATUSES`, post it, and decide
//! whether the message is done (ack) or must come back later (NAK with a delay).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, kv};
use iac_shared::events::{PushEvent, SyncFinished, SyncStarted};
use iac_shared::names::*;
use iac_shared::nats::{REPORTER_DEFAULT_ACK_WAIT, REPORTER_MAX_DELIVER};
use iac_shared::runtime::{Envelope, with_progress};
use tracing::Instrument;

use crate::github::{Gate, GithubClient, PostError, backoff};
use crate::metrics::Metrics;
use crate::order::{AfterPost, Claim, Decision, after_post, decide, now_ms, status_key};
use crate::status::{self, PlannedStatus, SkipReason, Status, StatusSettings};

/// The longest a post waits in-process for the rate-limit gate; longer holds hand the message
/// back to JetStream so it is not held past its ack wait.
const MAX_GATE_HOLD: Duration = Duration::from_secs(5);
/// How often a status waiting for a post in flight reads the claim again: at first, and at most.
const FIRST_LEASE_POLL: Duration = Duration::from_millis(10);
const LAST_LEASE_POLL: Duration = Duration::from_millis(250);

/// Why a status could not be delivered this time.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error(transparent)]
    Github(#[from] PostError),
    #[error("status bucket unavailable: {0}")]
    Store(String),
    #[error("other reporters kept posting statuses on the same commit and context")]
    Busy,
}

/// What becomes of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    RetryIn(Duration),
}

/// What a message asked for, once parsed.
struct Parsed {
    event_id: String,
    plan: status::Plan,
}

/// Everything a reporter process shares between the messages it handles.
pub struct Reporter {
    pub settings: StatusSettings,
    /// `None`: log-only mode.
    pub github: Option<GithubClient>,
    pub statuses: kv::Store,
    pub gate: Gate,
    pub metrics: Metrics,
    /// How long a post may be in flight: the client's timeout plus [`crate::order::LEASE_MARGIN`].
    pub lease: Duration,
}

impl Reporter {
    /// Handles one message from either consumer and acknowledges it.
    pub async fn handle(self: Arc<Self>, message: jetstream::Message) {
        let envelope = match Envelope::of(&message) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::error!(error = %e, "dropping a message that cannot be tracked");
                let _ = message.ack().await;
                return;
            }
        };
        let (stream_seq, delivered) = (envelope.seq, envelope.delivered);
        let span = tracing::info_span!(
            "message",
            subject = %envelope.subject,
            seq = stream_seq,
            delivered,
            event_id = tracing::field::Empty,
            replay_of = envelope.replay_of.map_or_else(|| "-".to_string(), |seq| seq.to_string()),
        );
        if envelope.replay_of.is_some() && delivered <= 1 {
            self.metrics.replay();
            span.in_scope(|| tracing::info!("a replayed message"));
        }
        let disposition = async {
            match parse(&message, &envelope, &self.settings) {
                Err(reason) => {
                    tracing::error!(%reason, "dropping a message that cannot be read");
                    Disposition::Ack
                }
                Ok(parsed) => {
                    tracing::Span::current().record("event_id", parsed.event_id.as_str());
                    let work = self.report(parsed.plan, delivered, envelope.replay_of.is_some());
                    with_progress(&message, REPORTER_DEFAULT_ACK_WAIT / 3, work).await
                }
            }
        }
        .instrument(span.clone())
        .await;
        let ack = match disposition {
            Disposition::Ack => message.ack().await,
            Disposition::RetryIn(delay) => message.ack_with(AckKind::Nak(Some(delay))).await,
        };
        if let Err(e) = ack {
            span.in_scope(|| tracing::warn!(error = %e, "could not acknowledge the message; it will come back"));
        }
    }

    async fn report(&self, plan: status::Plan, delivered: i64, replayed: bool) -> Disposition {
        let planned = match plan {
            Ok(planned) => planned,
            Err(reason) => {
                match reason {
                    SkipReason::NoCommit => {
                        tracing::info!(
                            "no commit to report on (an error before checkout, or a deleted branch)"
                        )
                    }
                    SkipReason::NoRepository => tracing::warn!(
                        "no repository to report on: the event names none and GITHUB_REPO is not set"
                    ),
                }
                self.metrics.skipped(reason.as_str());
                return Disposition::Ack;
            }
        };
        // Each status has its own context and claim: post them side by side.
        let results =
            futures::future::join_all(planned.iter().map(|s| self.deliver(s, replayed))).await;
        planned
            .iter()
            .zip(results)
            .map(|(status, result)| self.settle(status, result, delivered))
            .fold(Disposition::Ack, worse)
    }

    /// Maps the outcome of one status to ack or retry, logging and counting it: the one place
    /// where errors are sorted.
    fn settle(
        &self,
        planned: &PlannedStatus,
        result: Result<(), DeliverError>,
        delivered: i64,
    ) -> Disposition {
        let context = planned.status.context.as_str();
        let jitter: f64 = rand::random();
        let (reason, delay) = match result {
            Ok(()) => return Disposition::Ack,
            Err(DeliverError::Github(PostError::Permanent { code, message })) => {
                tracing::error!(
                    code,
                    reason = %message,
                    repository = %planned.repository,
                    commit = %planned.commit,
                    context,
                    "GitHub refused the status; not retrying"
                );
                self.metrics.permanent_failure(code);
                return Disposition::Ack;
            }
            Err(DeliverError::Github(PostError::RateLimited { wait })) => (
                "rate_limited",
                wait + Duration::from_secs(1).mul_f64(jitter),
            ),
            Err(DeliverError::Github(PostError::Transient { reason, .. })) => {
                (reason, backoff(delivered, jitter))
            }
            Err(DeliverError::Store(_)) => ("store", backoff(delivered, jitter)),
            Err(DeliverError::Busy) => ("busy", backoff(delivered, jitter)),
        };
        self.metrics.retry(reason);
        if delivered >= REPORTER_MAX_DELIVER {
            tracing::error!(
                context,
                commit = %planned.commit,
                attempts = delivered,
                "giving up on the status after the last attempt"
            );
        } else {
            tracing::warn!(context, commit = %planned.commit, reason, retry_in = ?delay, "status not posted yet; retrying");
        }
        Disposition::RetryIn(delay)
    }

    /// Takes the lease on (repository, commit, context) and posts, unless a newer status is
    /// already claimed; gives the lease back once GitHub answered.
    async fn deliver(&self, planned: &PlannedStatus, replayed: bool) -> Result<(), DeliverError> {
        let Some(github) = &self.github else {
            let status = &planned.status;
            tracing::info!(
                repository = %planned.repository,
                commit = %planned.commit,
                context = %status.context,
                state = status.state.as_str(),
                description = %status.description,
                "log-only mode (no GITHUB_TOKEN): would post this status"
            );
            self.metrics.skipped("log_only");
            return Ok(());
        };
        // Waiting for the gate happens before the lease, which only covers the request itself.
        if let Some(wait) = self.gate.remaining() {
            if wait > MAX_GATE_HOLD {
                return Err(PostError::RateLimited { wait }.into());
            }
            tokio::time::sleep(wait).await;
        }
        let key = status_key(
            &planned.repository,
            &planned.commit,
            &planned.status.context,
        );
        let Some((revision, leased)) = self.take_lease(&key, planned, replayed).await? else {
            return Ok(());
        };
        let result = self.post(github, planned, &leased.status).await;
        match after_post(&result) {
            AfterPost::Release { unconfirmed } => {
                self.release(&key, revision, &leased.released(unconfirmed))
                    .await;
            }
            AfterPost::Keep => tracing::warn!(
                context = %leased.status.context,
                commit = %planned.commit,
                "GitHub did not answer; the status may still be applied, so nothing else is posted here until the lease expires"
            ),
        }
        Ok(result?)
    }

    /// Waits until no post is in flight, then takes the lease (compare-and-set) with the claim
    /// to post: the revision written and that claim, or `None` when there is nothing to post.
    async fn take_lease(
        &self,
        key: &str,
        planned: &PlannedStatus,
        replayed: bool,
    ) -> Result<Option<(u64, Claim)>, DeliverError> {
        let mine = Claim::of(planned);
        let waiting_since = Instant::now();
        let mut pause = FIRST_LEASE_POLL;
        loop {
            let (revision, stored) = self.read(key).await?;
            match decide(stored.as_ref(), &mine, now_ms(), replayed) {
                Decision::Superseded => {
                    tracing::debug!(context = %planned.status.context, "a newer status is already claimed; skipping");
                    self.metrics.skipped("superseded");
                    return Ok(None);
                }
                Decision::AlreadyPosted => {
                    tracing::debug!(context = %planned.status.context, "GitHub already accepted this status; skipping");
                    self.metrics.skipped("already_posted");
                    return Ok(None);
                }
                Decision::Wait(left) => {
                    // Leases expire, so this only trips when others keep taking them.
                    if waiting_since.elapsed() > self.lease * 2 {
                        return Err(DeliverError::Busy);
                    }
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(LAST_LEASE_POLL);
                }
                Decision::Post(claim) => {
                    let until = now_ms() + self.lease.as_millis() as u64;
                    let leased = claim.leased(until);
                    if let Some(taken) = self.write(key, revision, &leased).await? {
                        return Ok(Some((taken, leased)));
                    }
                }
            }
        }
    }

    /// Gives the lease taken at `revision` back, with `claim` as it now stands.
    async fn release(&self, key: &str, revision: u64, claim: &Claim) {
        // On conflict the lease expired and someone took it; they post after my post ended.
        if let Err(e) = self.statuses.update(key, encode(claim), revision).await
            && e.kind() != kv::UpdateErrorKind::WrongLastRevision
        {
            tracing::warn!(error = %e, "could not give the status lease back; it expires by itself");
        }
    }

    /// Posts and records what GitHub said about its budget.
    async fn post(
        &self,
        github: &GithubClient,
        planned: &PlannedStatus,
        status: &Status,
    ) -> Result<(), PostError> {
        let answer = github
            .post(&planned.repository, &planned.commit, status)
            .await;
        if let Some(remaining) = answer.rate_limit_remaining {
            self.metrics.rate_limit_remaining(remaining);
        }
        if let Some(wait) = answer.exhausted_for {
            self.gate.hold(wait);
        }
        match &answer.result {
            Ok(()) => {
                self.metrics.posted(status.state.as_str());
                tracing::info!(
                    repository = %planned.repository,
                    commit = %planned.commit,
                    context = %status.context,
                    state = status.state.as_str(),
                    description = %status.description,
                    "posted status"
                );
            }
            Err(PostError::RateLimited { wait }) => {
                tracing::warn!(wait = ?wait, "GitHub rate limit reached; slowing every post");
                self.gate.hold(*wait);
            }
            Err(_) => {}
        }
        answer.result
    }

    /// The entry's revision (`None`: no entry) and its claim (`None` also when deleted or
    /// unreadable, so that it is overwritten).
    async fn read(&self, key: &str) -> Result<(Option<u64>, Option<Claim>), DeliverError> {
        let entry = self
            .statuses
            .entry(key)
            .await
            .map_err(|e| DeliverError::Store(e.to_string()))?;
        Ok(match entry {
            None => (None, None),
            Some(entry) => {
                let claim = (entry.operation == kv::Operation::Put)
                    .then(|| serde_json::from_slice::<Claim>(&entry.value).ok())
                    .flatten();
                (Some(entry.revision), claim)
            }
        })
    }

    /// Compare-and-set: `Some(revision)` when written, `None` when someone else wrote first.
    async fn write(
        &self,
        key: &str,
        revision: Option<u64>,
        claim: &Claim,
    ) -> Result<Option<u64>, DeliverError> {
        let value = encode(claim);
        match revision {
            None => match self.statuses.create(key, value).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(DeliverError::Store(e.to_string())),
            },
            Some(revision) => match self.statuses.update(key, value, revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(DeliverError::Store(e.to_string())),
            },
        }
    }
}

fn encode(claim: &Claim) -> bytes::Bytes {
    serde_json::to_vec(claim)
        .expect("a claim serializes")
        .into()
}

fn worse(a: Disposition, b: Disposition) -> Disposition {
    match (a, b) {
        (Disposition::RetryIn(x), Disposition::RetryIn(y)) => Disposition::RetryIn(x.max(y)),
        (Disposition::RetryIn(x), _) | (_, Disposition::RetryIn(x)) => Disposition::RetryIn(x),
        _ => Disposition::Ack,
    }
}

fn parse(
    message: &jetstream::Message,
    envelope: &Envelope,
    settings: &StatusSettings,
) -> Result<Parsed, String> {
    let payload = &message.payload;
    match message.subject.as_str() {
        STARTED_SUBJECT => {
            let started: SyncStarted =
                serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            Ok(Parsed {
                plan: status::for_started(&started, settings),
                event_id: started.event_id,
            })
        }
        FINISHED_SUBJECT => {
            let finished: SyncFinished =
                serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            Ok(Parsed {
                plan: status::for_finished(&finished, settings),
                event_id: finished.event_id,
            })
        }
        PUSH_SUBJECT => {
            let push: PushEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            let event_id = envelope
                .event_id
                .clone()
                .unwrap_or_else(|| push.delivery_id.clone());
            Ok(Parsed {
                plan: status::for_push(&push, &event_id, envelope.seq, settings),
                event_id,
            })
        }
        other => Err(format!("unexpected subject {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_retried_when_any_of_its_statuses_must_be_and_after_the_longest_delay() {
        let (short, long) = (
            Disposition::RetryIn(Duration::from_secs(1)),
            Disposition::RetryIn(Duration::from_secs(9)),
        );
        assert_eq!(worse(Disposition::Ack, Disposition::Ack), Disposition::Ack);
        assert_eq!(worse(Disposition::Ack, short), short);
        assert_eq!(worse(long, Disposition::Ack), long);
        assert_eq!(worse(short, long), long);
    }
}
