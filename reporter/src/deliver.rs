//! Handling one message: plan its statuses, claim each in `IAC_STATUSES`, post it, and decide
//! whether the message is done (ack), must come back later (NAK with a delay), or a status is
//! given up and kept in `IAC_UNDELIVERED`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, kv};
use iac_shared::events::{PushEvent, SyncFinished, SyncStarted, TaskStarted};
use iac_shared::names::*;
use iac_shared::nats::{REPORTER_DEFAULT_ACK_WAIT, REPORTER_MAX_DELIVER};
use iac_shared::runtime::{Envelope, with_progress};
use tracing::Instrument;

use crate::checks::{self, CheckError, CheckRuns, PlannedCheck};
use crate::github::{Gate, GithubClient, PostError, backoff};
use crate::metrics::Metrics;
use crate::order::{AfterPost, Attempts, Claim, Decision, after_post, decide, now_ms, status_key};
use crate::status::{self, PlannedStatus, SkipReason, Status, StatusSettings};
use crate::undelivered::{LAST_ATTEMPT, UndeliveredStatus, epoch_ms, gives_up, retry_delay, since};

/// The longest a post waits in-process for the rate-limit gate; longer holds hand the message
/// back to JetStream so it is not held past its ack wait.
const MAX_GATE_HOLD: Duration = Duration::from_secs(5);
/// How often a status waiting for a post in flight reads the claim again: at first, and at most.
const FIRST_LEASE_POLL: Duration = Duration::from_millis(10);
const LAST_LEASE_POLL: Duration = Duration::from_millis(250);

/// Why a status could not be delivered this time.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// `failing_since_ms`: when the status first failed, as its claim records it.
    #[error("{error}")]
    Github {
        error: PostError,
        failing_since_ms: Option<u64>,
    },
    #[error("status bucket unavailable: {0}")]
    Store(String),
    #[error("other reporters kept posting statuses on the same commit and context")]
    Busy,
    #[error("the status could not be kept in {UNDELIVERED_STREAM}: {0}")]
    Undelivered(String),
}

impl DeliverError {
    fn github(error: PostError, failing_since_ms: Option<u64>) -> Self {
        DeliverError::Github {
            error,
            failing_since_ms,
        }
    }
}

/// What became of one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    Posted,
    /// Not posted, and rightly so: the reason, as counted in `iac_reporter_statuses_skipped`.
    Skipped(&'static str),
    /// Given up and kept in `IAC_UNDELIVERED`.
    GivenUp,
}

/// What becomes of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    RetryIn(Duration),
}

/// One attempt at the statuses of a message.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    /// Which delivery of the message this is (1 for the first).
    pub delivered: i64,
    /// Replayed by an operator: the status already accepted or given up is posted again.
    pub replayed: bool,
    /// When the message was stored (ms since the epoch): where its attempts are counted from
    /// when no claim recorded them.
    pub stored_ms: u64,
    /// Give a failing status up into `IAC_UNDELIVERED`; false for `undelivered replay`, which
    /// reports a failure to the operator and leaves the dead letter where it is.
    pub may_give_up: bool,
}

impl Turn {
    fn last_attempt(&self) -> bool {
        self.may_give_up && self.delivered >= LAST_ATTEMPT
    }
}

/// What a message asked for, once parsed.
struct Parsed {
    event_id: String,
    plan: status::Plan,
    /// A finished result, for the notifier.
    finished: Option<SyncFinished>,
    /// Empty unless `CHECK_RUNS=true`.
    checks: Vec<PlannedCheck>,
}

/// A lease taken, or the reason there is nothing to post.
enum Lease {
    Taken { revision: u64, claim: Box<Claim> },
    Skip(&'static str),
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
    /// How long a status may keep failing before it is given up (`STATUS_GIVE_UP_AFTER`).
    pub give_up_after: Duration,
    /// Where given-up statuses are kept.
    pub js: jetstream::Context,
    /// Announces failures and recoveries (`NOTIFY_URL`); `None` when not configured.
    pub notifier: Option<crate::notify::Notifier>,
    /// `CHECK_RUNS`: a check run per service and sync.
    pub check_runs: bool,
    /// `COMMIT_STATUSES`: false leaves only the check runs.
    pub commit_statuses: bool,
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
        let turn = Turn {
            delivered: envelope.delivered,
            replayed: envelope.replay_of.is_some(),
            stored_ms: message
                .info()
                .map_or_else(|_| now_ms(), |info| epoch_ms(info.published)),
            may_give_up: true,
        };
        let span = tracing::info_span!(
            "message",
            subject = %envelope.subject,
            seq = envelope.seq,
            delivered = turn.delivered,
            event_id = tracing::field::Empty,
            replay_of = envelope.replay_of.map_or_else(|| "-".to_string(), |seq| seq.to_string()),
        );
        if turn.replayed && turn.delivered <= 1 {
            self.metrics.replay();
            span.in_scope(|| tracing::info!("a replayed message"));
        }
        let disposition = async {
            match parse(&message, &envelope, &self.settings, self.check_runs) {
                Err(reason) => {
                    tracing::error!(%reason, "dropping a message that cannot be read");
                    Disposition::Ack
                }
                Ok(parsed) => {
                    tracing::Span::current().record("event_id", parsed.event_id.as_str());
                    if let (Some(notifier), Some(finished)) = (&self.notifier, parsed.finished) {
                        notifier.offer(finished, &parsed.plan);
                    }
                    let work = async {
                        let (statuses, checks) = tokio::join!(
                            self.report(parsed.plan, turn),
                            self.report_checks(&parsed.checks, turn)
                        );
                        worse(statuses, checks)
                    };
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

    async fn report(&self, plan: status::Plan, turn: Turn) -> Disposition {
        let planned = match plan {
            Ok(_) if !self.commit_statuses => return Disposition::Ack,
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
            futures::future::join_all(planned.iter().map(|s| self.deliver(s, turn))).await;
        let mut disposition = Disposition::Ack;
        for (status, result) in planned.iter().zip(results) {
            let result = match result {
                // Failures that left no record on the claim (no answer, the gate, the bucket).
                Err(e) if turn.last_attempt() => self.give_up_unclaimed(status, e, turn).await,
                other => other,
            };
            disposition = worse(disposition, self.settle(status, result, turn));
        }
        disposition
    }

    /// Creates or updates the check runs; any failure but a refused token brings the message
    /// back (a check run is never given up into `IAC_UNDELIVERED`).
    async fn report_checks(&self, checks: &[PlannedCheck], turn: Turn) -> Disposition {
        let Some(github) = self.github.as_ref().filter(|_| !checks.is_empty()) else {
            return Disposition::Ack;
        };
        let runs = CheckRuns {
            github,
            records: &self.statuses,
            lease: self.lease,
        };
        let results = futures::future::join_all(checks.iter().map(|c| runs.deliver(c))).await;
        let mut disposition = Disposition::Ack;
        for (check, result) in checks.iter().zip(results) {
            let Err(error) = result else { continue };
            if let CheckError::Github(e) = &error
                && e.is_final()
            {
                tracing::error!(error = %e, check_run = %check.name, commit = %check.commit, "GitHub refused the check run; not trying again");
                continue;
            }
            let delay = match &error {
                CheckError::Github(PostError::RateLimited { wait, .. }) => {
                    self.gate.hold(*wait);
                    *wait
                }
                _ => backoff(turn.delivered, rand::random()),
            };
            self.metrics.retry("check_run");
            tracing::warn!(%error, check_run = %check.name, commit = %check.commit, retry_in = ?delay, "check run not updated yet; retrying");
            disposition = worse(disposition, Disposition::RetryIn(delay));
        }
        disposition
    }

    /// Maps the outcome of one status to ack or retry, logging and counting it: the one place
    /// where errors are sorted.
    fn settle(
        &self,
        planned: &PlannedStatus,
        result: Result<Delivered, DeliverError>,
        turn: Turn,
    ) -> Disposition {
        let context = planned.status.context.as_str();
        let jitter: f64 = rand::random();
        let backoff = backoff(turn.delivered, jitter);
        let (reason, delay, failing_since) = match result {
            Ok(_) => return Disposition::Ack,
            Err(DeliverError::Github {
                error: PostError::Refused { code, message },
                failing_since_ms,
            }) => {
                tracing::warn!(
                    code,
                    reason = %message,
                    repository = %planned.repository,
                    commit = %planned.commit,
                    context,
                    "GitHub refused the status; trying again until STATUS_GIVE_UP_AFTER"
                );
                ("refused", backoff, failing_since_ms)
            }
            Err(DeliverError::Github {
                error: PostError::RateLimited { wait, .. },
                failing_since_ms,
            }) => (
                "rate_limited",
                wait + Duration::from_secs(1).mul_f64(jitter),
                failing_since_ms,
            ),
            Err(DeliverError::Github {
                error: PostError::Transient { reason, .. },
                failing_since_ms,
            }) => (reason, backoff, failing_since_ms),
            Err(DeliverError::Store(_)) => ("store", backoff, None),
            Err(DeliverError::Busy) => ("busy", backoff, None),
            Err(DeliverError::Undelivered(_)) => ("undelivered", backoff, None),
        };
        self.metrics.retry(reason);
        let failing_for = since(failing_since.unwrap_or(turn.stored_ms));
        let delay = retry_delay(delay, failing_for, self.give_up_after, turn.delivered);
        if turn.delivered >= REPORTER_MAX_DELIVER {
            tracing::error!(
                context,
                commit = %planned.commit,
                attempts = turn.delivered,
                reason,
                "the status could neither be posted nor kept in {UNDELIVERED_STREAM} by the last delivery; it is lost"
            );
        } else {
            tracing::warn!(context, commit = %planned.commit, reason, retry_in = ?delay, "status not posted yet; retrying");
        }
        Disposition::RetryIn(delay)
    }

    /// Takes the lease on (repository, commit, context) and posts, unless a newer status is
    /// already claimed; gives the lease back once GitHub answered, recording a failure on the
    /// claim, or giving the status up when its failures have lasted long enough.
    pub async fn deliver(
        &self,
        planned: &PlannedStatus,
        turn: Turn,
    ) -> Result<Delivered, DeliverError> {
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
            return Ok(Delivered::Skipped("log_only"));
        };
        // Waiting for the gate happens before the lease, which only covers the request itself.
        if let Some(wait) = self.gate.remaining() {
            if wait > MAX_GATE_HOLD {
                let error = PostError::RateLimited { wait, code: None };
                return Err(DeliverError::github(error, None));
            }
            tokio::time::sleep(wait).await;
        }
        let key = status_key(
            &planned.repository,
            &planned.commit,
            &planned.status.context,
        );
        let (revision, leased) = match self.take_lease(&key, planned, turn.replayed).await? {
            Lease::Taken { revision, claim } => (revision, claim),
            Lease::Skip(reason) => return Ok(Delivered::Skipped(reason)),
        };
        let result = self.post(github, planned, &leased.status).await;
        let failing_since = leased.failing.as_ref().map(|a| a.first_ms);
        let error = match (after_post(&result), result) {
            (_, Ok(())) => {
                self.release(&key, revision, &leased.released(false)).await;
                return Ok(Delivered::Posted);
            }
            (AfterPost::Keep, Err(error)) => {
                tracing::warn!(
                    context = %leased.status.context,
                    commit = %planned.commit,
                    "GitHub did not answer; the status may still be applied, so nothing else is posted here until the lease expires"
                );
                return Err(DeliverError::github(error, failing_since));
            }
            (AfterPost::Release { .. }, Err(error)) => error,
        };
        let attempts = Attempts::after(
            leased.failing.as_ref(),
            now_ms(),
            error.http_status(),
            error.to_string(),
        );
        if turn.may_give_up && gives_up(&error, &attempts, self.give_up_after, turn.last_attempt())
        {
            // The dead letter first: a claim marked given up without one would lose the status.
            let letter = UndeliveredStatus::new(&leased.planned(), &attempts);
            if let Err(e) = self.keep_undelivered(&letter).await {
                self.release(&key, revision, &leased.failed(attempts)).await;
                return Err(e);
            }
            self.release(&key, revision, &leased.given_up(attempts))
                .await;
            return Ok(Delivered::GivenUp);
        }
        let first_ms = attempts.first_ms;
        self.release(&key, revision, &leased.failed(attempts)).await;
        Err(DeliverError::github(error, Some(first_ms)))
    }

    /// At the last attempt, keeps a status whose failure left no record on its claim.
    async fn give_up_unclaimed(
        &self,
        planned: &PlannedStatus,
        error: DeliverError,
        turn: Turn,
    ) -> Result<Delivered, DeliverError> {
        let (http_status, first_ms) = match &error {
            DeliverError::Github {
                error,
                failing_since_ms,
            } => (error.http_status(), *failing_since_ms),
            _ => (None, None),
        };
        let attempts = Attempts {
            count: u32::try_from(turn.delivered).unwrap_or(u32::MAX),
            first_ms: first_ms.unwrap_or(turn.stored_ms),
            last_ms: now_ms(),
            last_http_status: http_status,
            last_error: error.to_string(),
        };
        self.keep_undelivered(&UndeliveredStatus::new(planned, &attempts))
            .await?;
        Ok(Delivered::GivenUp)
    }

    /// Stores a dead letter in `IAC_UNDELIVERED`, counts and logs it.
    async fn keep_undelivered(&self, letter: &UndeliveredStatus) -> Result<(), DeliverError> {
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID_HEADER, letter.message_id().as_str());
        let payload = serde_json::to_vec(letter).expect("a dead letter serializes");
        let ack = self
            .js
            .publish_with_headers(UNDELIVERED_STATUS_SUBJECT, headers, payload.into())
            .await
            .map_err(|e| DeliverError::Undelivered(e.to_string()))?
            .await
            .map_err(|e| DeliverError::Undelivered(e.to_string()))?;
        if !ack.duplicate {
            self.metrics.undelivered();
        }
        tracing::error!(
            repository = %letter.repository,
            commit = %letter.commit,
            context = %letter.context,
            state = letter.state.as_str(),
            attempts = letter.attempts,
            last_http_status = letter.last_http_status,
            last_error = %letter.last_error,
            undelivered_seq = ack.sequence,
            "gave up on the status; kept in {UNDELIVERED_STREAM} (`iac-reporter undelivered replay` posts it again)"
        );
        Ok(())
    }

    /// Waits until no post is in flight, then takes the lease (compare-and-set) with the claim
    /// to post, or says why there is nothing to post.
    async fn take_lease(
        &self,
        key: &str,
        planned: &PlannedStatus,
        replayed: bool,
    ) -> Result<Lease, DeliverError> {
        let mine = Claim::of(planned);
        let waiting_since = Instant::now();
        let mut pause = FIRST_LEASE_POLL;
        loop {
            let (revision, stored) = self.read(key).await?;
            let skip = match decide(stored.as_ref(), &mine, now_ms(), replayed) {
                Decision::Superseded => "superseded",
                Decision::AlreadyPosted => "already_posted",
                Decision::GivenUp => "given_up",
                Decision::Wait(left) => {
                    // Leases expire, so this only trips when others keep taking them.
                    if waiting_since.elapsed() > self.lease * 2 {
                        return Err(DeliverError::Busy);
                    }
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(LAST_LEASE_POLL);
                    continue;
                }
                Decision::Post(claim) => {
                    let until = now_ms() + self.lease.as_millis() as u64;
                    let leased = Box::new(claim.leased(until));
                    match self.write(key, revision, &leased).await? {
                        Some(revision) => {
                            return Ok(Lease::Taken {
                                revision,
                                claim: leased,
                            });
                        }
                        None => continue,
                    }
                }
            };
            tracing::debug!(context = %planned.status.context, skip, "not posting the status");
            self.metrics.skipped(skip);
            return Ok(Lease::Skip(skip));
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
            Err(PostError::RateLimited { wait, .. }) => {
                tracing::warn!(wait = ?wait, "GitHub rate limit reached; slowing every post");
                self.gate.hold(*wait);
            }
            Err(PostError::Refused { code, .. }) => self.metrics.refused(*code),
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
    check_runs: bool,
) -> Result<Parsed, String> {
    let payload = &message.payload;
    match message.subject.as_str() {
        STARTED_SUBJECT => {
            let started: SyncStarted =
                serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            Ok(Parsed {
                plan: status::for_started(&started, settings),
                checks: if check_runs {
                    checks::for_started(&started, settings)
                } else {
                    Vec::new()
                },
                event_id: started.event_id,
                finished: None,
            })
        }
        FINISHED_SUBJECT => {
            let finished: SyncFinished =
                serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            Ok(Parsed {
                plan: status::for_finished(&finished, settings),
                checks: if check_runs {
                    checks::for_finished(&finished, settings)
                } else {
                    Vec::new()
                },
                event_id: finished.event_id.clone(),
                finished: Some(finished),
            })
        }
        // Only check runs follow each task; commit statuses change with the whole sync.
        TASK_STARTED_SUBJECT => {
            let task: TaskStarted = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            Ok(Parsed {
                plan: Ok(Vec::new()),
                checks: if check_runs {
                    checks::for_task_started(&task, settings)
                        .into_iter()
                        .collect()
                } else {
                    Vec::new()
                },
                event_id: task.event_id,
                finished: None,
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
                checks: Vec::new(),
                event_id,
                finished: None,
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
