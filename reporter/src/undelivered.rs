//! Dead letters: a status given up is kept in `IAC_UNDELIVERED` with everything needed to post
//! it again, never silently dropped. When to give up and how long to wait before the next
//! attempt are decided here (pure); `iac-reporter undelivered list|replay` reads them back.

use std::time::Duration;

use async_nats::jetstream;
use clap::{Args, Subcommand};
use iac_shared::names::{STATUS_BUCKET, UNDELIVERED_STREAM};
use iac_shared::nats::{NatsArgs, REPORTER_MAX_DELIVER};
use iac_shared::replay::{RangeMessage, RangeReader};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::GithubArgs;
use crate::deliver::{Delivered, Reporter, Turn};
use crate::github::{BACKOFF_CAP, Gate, PostError};
use crate::metrics::Metrics;
use crate::order::{Attempts, now_ms, status_key};
use crate::status::{OrderKey, Phase, PlannedStatus, Status, StatusSettings, StatusState};

/// The delivery from which a failing status is given up whatever its budget says. One short of
/// the consumer's last, so that a dead letter NATS did not store gets one more delivery.
pub const LAST_ATTEMPT: i64 = REPORTER_MAX_DELIVER - 1;

/// A status given up, as kept in `IAC_UNDELIVERED` (`iac.undelivered.status`). It holds what
/// a post needs and what the attempts met, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndeliveredStatus {
    pub repository: String,
    pub commit: String,
    pub context: String,
    pub state: StatusState,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_url: Option<String>,
    /// The event (and its `IAC_EVENTS` sequence) the status is about.
    pub event_id: String,
    pub event_seq: u64,
    /// Which status of that event: `queued`, `started` or `finished`.
    pub phase: Phase,
    /// GitHub's answer to the last attempt; absent when it did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_http_status: Option<u16>,
    pub last_error: String,
    pub attempts: u32,
    pub first_attempt_at: String,
    pub last_attempt_at: String,
}

impl UndeliveredStatus {
    pub fn new(planned: &PlannedStatus, attempts: &Attempts) -> Self {
        let status = &planned.status;
        UndeliveredStatus {
            repository: planned.repository.clone(),
            commit: planned.commit.clone(),
            context: status.context.clone(),
            state: status.state,
            description: status.description.clone(),
            target_url: status.target_url.clone(),
            event_id: planned.event_id.clone(),
            event_seq: planned.order.event_seq,
            phase: planned.order.phase,
            last_http_status: attempts.last_http_status,
            last_error: attempts.last_error.clone(),
            attempts: attempts.count,
            first_attempt_at: rfc3339_ms(attempts.first_ms),
            last_attempt_at: rfc3339_ms(attempts.last_ms),
        }
    }

    /// The status to post again, ordered as it was.
    pub fn planned(&self) -> PlannedStatus {
        PlannedStatus {
            repository: self.repository.clone(),
            commit: self.commit.clone(),
            order: OrderKey {
                event_seq: self.event_seq,
                phase: self.phase,
            },
            status: Status {
                state: self.state,
                description: self.description.clone(),
                context: self.context.clone(),
                target_url: self.target_url.clone(),
            },
            event_id: self.event_id.clone(),
        }
    }

    /// `Nats-Msg-Id`: two reporters giving up the same failing status store it once.
    pub fn message_id(&self) -> String {
        let key = status_key(&self.repository, &self.commit, &self.context);
        let phase = serde_json::to_value(self.phase).unwrap_or_default();
        format!(
            "undelivered-{key}-{}-{}-{}",
            self.event_seq,
            phase.as_str().unwrap_or_default(),
            self.first_attempt_at
        )
    }
}

fn rfc3339_ms(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Whether a failed post ends the attempts at its status: a 401 at once, anything else once
/// the status has failed for `give_up_after`, or at the message's last attempt.
pub fn gives_up(
    error: &PostError,
    attempts: &Attempts,
    give_up_after: Duration,
    last_attempt: bool,
) -> bool {
    error.is_final() || last_attempt || attempts.span() >= give_up_after
}

/// The wait before the next delivery: `base`, stretched when the deliveries left up to
/// [`LAST_ATTEMPT`], each waiting at most [`BACKOFF_CAP`], would end before the status has
/// failed for `give_up_after`. Early retries stay quick; the stretch falls on the last ones.
pub fn retry_delay(
    base: Duration,
    failing_for: Duration,
    give_up_after: Duration,
    delivered: i64,
) -> Duration {
    let left = give_up_after.saturating_sub(failing_for);
    let later_waits = (LAST_ATTEMPT - delivered - 1).max(0) as u32;
    base.max(left.saturating_sub(BACKOFF_CAP * later_waits))
}

/// `iac-reporter undelivered …`: the statuses given up.
#[derive(Debug, Args)]
pub struct UndeliveredCommand {
    #[command(subcommand)]
    pub action: UndeliveredAction,
}

#[derive(Debug, Subcommand)]
pub enum UndeliveredAction {
    /// List the statuses given up, oldest first, with GitHub's last answer.
    List(Selection),
    /// Post them again (GITHUB_TOKEN needed), except where a newer status was claimed since.
    Replay {
        #[command(flatten)]
        select: Selection,
        #[command(flatten)]
        github: GithubArgs,
    },
}

/// Which dead letters: all, those kept since a time, or one.
#[derive(Debug, Clone, Args)]
pub struct Selection {
    /// Only those kept at or after this time: RFC 3339 (2026-11-25T10:00:00Z) or a duration
    /// ago (2h).
    #[arg(long, value_parser = iac_shared::replay::parse_time, conflicts_with = "seq")]
    pub since: Option<OffsetDateTime>,
    /// Only the one at this sequence of IAC_UNDELIVERED.
    #[arg(long)]
    pub seq: Option<u64>,
}

/// A dead letter as read back.
#[derive(Debug)]
pub struct Kept {
    pub seq: u64,
    pub kept_at: OffsetDateTime,
    pub status: Result<UndeliveredStatus, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UndeliveredError {
    #[error("reading {UNDELIVERED_STREAM}: {0}")]
    Read(String),
    #[error("{UNDELIVERED_STREAM} holds no message at sequence {0}")]
    NoSuchSeq(u64),
    #[error("GITHUB_TOKEN is not set: nothing can be posted")]
    NoToken,
    #[error("GitHub client: {0}")]
    Client(String),
    #[error("opening the {STATUS_BUCKET} bucket: {0}")]
    Bucket(String),
    #[error("{0} status(es) not posted")]
    NotPosted(usize),
}

impl UndeliveredCommand {
    /// Connects, then lists or replays, one line per dead letter on stdout.
    pub async fn run(&self, nats: &NatsArgs) -> Result<(), UndeliveredError> {
        let client = iac_shared::nats::connect_once(nats, "iac-reporter undelivered")
            .await
            .map_err(|e| UndeliveredError::Read(e.to_string()))?;
        let js = jetstream::new(client);
        match &self.action {
            UndeliveredAction::List(select) => {
                let kept = read(&js, select).await?;
                println!("SEQ\tKEPT\tREPOSITORY\tCOMMIT\tCONTEXT\tSTATE\tHTTP\tATTEMPTS\tERROR");
                for letter in &kept {
                    println!("{}", list_line(letter));
                }
                eprintln!("{} undelivered status(es)", kept.len());
                Ok(())
            }
            UndeliveredAction::Replay { select, github } => {
                let reporter = replaying_reporter(&js, github).await?;
                let kept = read(&js, select).await?;
                let mut not_posted = 0;
                for letter in &kept {
                    let outcome = match &letter.status {
                        Ok(status) => match reporter.deliver(&status.planned(), REPLAY).await {
                            Ok(Delivered::Posted) => "posted".to_string(),
                            Ok(Delivered::Skipped(reason)) => format!("not posted: {reason}"),
                            Ok(Delivered::GivenUp) => unreachable!("a replay never gives up"),
                            Err(e) => {
                                not_posted += 1;
                                format!("failed: {e}")
                            }
                        },
                        Err(_) => "skipped: unreadable".to_string(),
                    };
                    println!("{}\t{outcome}", list_line(letter));
                }
                eprintln!("replayed {} undelivered status(es)", kept.len());
                match not_posted {
                    0 => Ok(()),
                    n => Err(UndeliveredError::NotPosted(n)),
                }
            }
        }
    }
}

/// An operator's replay: the status is posted once more even where it was given up, never over
/// a newer one; a failure is reported, and the dead letter stays where it is.
const REPLAY: Turn = Turn {
    delivered: 1,
    replayed: true,
    stored_ms: 0,
    may_give_up: false,
};

async fn replaying_reporter(
    js: &jetstream::Context,
    github: &GithubArgs,
) -> Result<Reporter, UndeliveredError> {
    let client = github
        .client()
        .map_err(|e| UndeliveredError::Client(e.to_string()))?
        .ok_or(UndeliveredError::NoToken)?;
    let statuses = js
        .get_key_value(STATUS_BUCKET)
        .await
        .map_err(|e| UndeliveredError::Bucket(e.to_string()))?;
    Ok(Reporter {
        // Only read to plan statuses from messages, which a replay does not do.
        settings: StatusSettings {
            context: String::new(),
            per_service: false,
            target_url: None,
            default_repository: None,
            push_env: None,
            run_links: None,
        },
        github: Some(client),
        statuses,
        gate: Gate::default(),
        metrics: Metrics::default(),
        lease: github.lease(),
        give_up_after: Duration::MAX,
        js: js.clone(),
        // A replayed status is no sync result: nothing to notify.
        notifier: None,
        check_runs: false,
        commit_statuses: true,
    })
}

fn list_line(letter: &Kept) -> String {
    let kept_at = letter.kept_at.format(&Rfc3339).unwrap_or_default();
    match &letter.status {
        Ok(s) => format!(
            "{}\t{kept_at}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            letter.seq,
            s.repository,
            s.commit,
            s.context,
            s.state.as_str(),
            s.last_http_status
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            s.attempts,
            s.last_error,
        ),
        Err(e) => format!("{}\t{kept_at}\tunreadable: {e}", letter.seq),
    }
}

/// The dead letters `select` names, oldest first; never those stored after the read began.
pub async fn read(
    js: &jetstream::Context,
    select: &Selection,
) -> Result<Vec<Kept>, UndeliveredError> {
    let read_err = |e: &dyn std::fmt::Display| UndeliveredError::Read(e.to_string());
    let mut stream = js
        .get_stream(UNDELIVERED_STREAM)
        .await
        .map_err(|e| read_err(&e))?;
    let state = stream.info().await.map_err(|e| read_err(&e))?.state.clone();
    let upper = select.seq.unwrap_or(state.last_sequence);
    if state.messages == 0 || upper > state.last_sequence {
        return match select.seq {
            Some(seq) => Err(UndeliveredError::NoSuchSeq(seq)),
            None => Ok(Vec::new()),
        };
    }
    let mut reader = RangeReader::open(&stream, select.seq, select.since, None, upper)
        .await
        .map_err(|e| read_err(&e))?;
    let mut kept = Vec::new();
    while let Some(RangeMessage {
        message,
        seq,
        time: kept_at,
    }) = reader.next().await.map_err(|e| read_err(&e))?
    {
        kept.push(Kept {
            seq,
            kept_at,
            status: serde_json::from_slice(&message.payload).map_err(|e| e.to_string()),
        });
    }
    if let Some(seq) = select.seq
        && kept.first().is_none_or(|k| k.seq != seq)
    {
        return Err(UndeliveredError::NoSuchSeq(seq));
    }
    Ok(kept)
}

/// Milliseconds since the epoch of a stored message's time.
pub fn epoch_ms(time: OffsetDateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// How long since `since_ms`.
pub fn since(since_ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(since_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn refused(code: u16) -> PostError {
        PostError::Refused {
            code,
            message: "Not Found".into(),
        }
    }

    fn failing_for(span: Duration) -> Attempts {
        let first = Attempts::after(None, 1_000, Some(404), "Not Found".into());
        Attempts::after(
            Some(&first),
            1_000 + span.as_millis() as u64,
            Some(404),
            "Not Found".into(),
        )
    }

    #[test]
    fn a_401_is_given_up_at_once_and_other_refusals_only_after_the_budget() {
        let budget = 30 * MINUTE;
        assert!(gives_up(
            &refused(401),
            &failing_for(Duration::ZERO),
            budget,
            false
        ));
        for code in [403, 404, 422] {
            assert!(!gives_up(
                &refused(code),
                &failing_for(29 * MINUTE),
                budget,
                false
            ));
            assert!(gives_up(
                &refused(code),
                &failing_for(30 * MINUTE),
                budget,
                false
            ));
        }
        let timeout = PostError::Transient {
            reason: "timeout",
            detail: String::new(),
            code: None,
        };
        assert!(gives_up(&timeout, &failing_for(MINUTE), budget, true));
    }

    #[test]
    fn retries_stay_quick_early_and_stretch_so_the_last_attempt_comes_after_the_budget() {
        let budget = 30 * MINUTE;
        let quick = Duration::from_millis(250);
        assert_eq!(retry_delay(quick, Duration::ZERO, budget, 1), quick);
        // One wait left before the last attempt: it covers all the budget left.
        assert_eq!(
            retry_delay(quick, 10 * MINUTE, budget, LAST_ATTEMPT - 1),
            20 * MINUTE
        );
        // However the waits went, the ones left add up to the budget.
        let mut failing = Duration::ZERO;
        for delivered in 1..LAST_ATTEMPT {
            failing += retry_delay(quick, failing, budget, delivered);
        }
        assert!(failing >= budget, "{failing:?}");
        assert_eq!(retry_delay(quick, 31 * MINUTE, budget, 5), quick);
    }

    #[test]
    fn a_dead_letter_holds_what_a_post_needs_and_no_token() {
        let planned = PlannedStatus {
            repository: "acme/infra".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            order: OrderKey {
                event_seq: 42,
                phase: Phase::Finished,
            },
            status: Status {
                state: StatusState::Success,
                description: "1 service(s) synced successfully".into(),
                context: "IaC Runner / Sync".into(),
                target_url: Some("https://ci.example/42".into()),
            },
            event_id: "delivery-1".into(),
        };
        let attempts = failing_for(30 * MINUTE);
        let letter = UndeliveredStatus::new(&planned, &attempts);
        assert_eq!(letter.planned(), planned);
        let json = serde_json::to_value(&letter).unwrap();
        assert_eq!(json["phase"], "finished");
        assert_eq!(json["state"], "success");
        assert_eq!(json["last_http_status"], 404);
        assert_eq!(json["attempts"], 2);
        assert_eq!(json["first_attempt_at"], "1970-01-01T00:00:01Z");
        assert_eq!(json["last_attempt_at"], "1970-01-01T00:30:01Z");
        assert!(letter.message_id().contains("-42-finished-"));
        let parsed: UndeliveredStatus = serde_json::from_value(json).unwrap();
        assert_eq!(parsed, letter);
    }
}
