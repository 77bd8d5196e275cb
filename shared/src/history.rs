//! What the pipeline did lately, read from the streams (`iac-worker status`).

use std::ops::ControlFlow;

use async_nats::jetstream;
use serde::de::DeserializeOwned;

use crate::events::{SyncFinished, SyncOutcome};
use crate::names::{EVENTS_STREAM, FINISHED_SUBJECT, RESULTS_STREAM, WORKER_CONSUMER};

/// `status`: how many syncs to show (NATS is reached through the global NATS flags).
#[derive(Debug, Clone, clap::Args)]
pub struct StatusCommand {
    /// How many of the last syncs to show.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub count: usize,
}

impl StatusCommand {
    /// Connects and prints the last syncs and the queue depth.
    pub async fn run(
        &self,
        nats: &crate::nats::NatsArgs,
        client_name: &str,
    ) -> Result<(), async_nats::Error> {
        let client = crate::nats::connect_once(nats, client_name).await?;
        let js = jetstream::new(client);
        let syncs = recent_syncs(&js, self.count).await?;
        let queue = queue_depth(&js).await?;
        print!("{}", format_table(&syncs, queue));
        Ok(())
    }
}

/// At most this many results are read backwards looking for finished syncs.
const SCAN_LIMIT: u64 = 10_000;

/// The queue in front of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Events stored but not yet handed to a worker.
    pub waiting: u64,
    /// Events a worker is running now (0 or 1).
    pub in_progress: u64,
}

/// The last `count` finished syncs, newest first.
pub async fn recent_syncs(
    js: &jetstream::Context,
    count: usize,
) -> Result<Vec<SyncFinished>, async_nats::Error> {
    let mut found = Vec::new();
    if count == 0 {
        return Ok(found);
    }
    newest_results(
        js,
        FINISHED_SUBJECT,
        SCAN_LIMIT,
        |finished: SyncFinished| {
            found.push(finished);
            if found.len() < count {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        },
    )
    .await?;
    Ok(found)
}

/// Hands the results on `subject` that parse as `T` to `visit`, newest first, until it breaks,
/// looking at most at the last `limit` messages of [`RESULTS_STREAM`] (fewer when the stream
/// holds fewer).
pub async fn newest_results<T: DeserializeOwned>(
    js: &jetstream::Context,
    subject: &str,
    limit: u64,
    mut visit: impl FnMut(T) -> ControlFlow<()>,
) -> Result<(), async_nats::Error> {
    let mut stream = js.get_stream(RESULTS_STREAM).await?;
    let state = stream.info().await?.state.clone();
    let lowest = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(limit))
        .max(1);
    for seq in (lowest..=state.last_sequence).rev() {
        if let Ok(message) = stream.get_raw_message(seq).await
            && message.subject.as_str() == subject
            && let Ok(result) = serde_json::from_slice::<T>(&message.payload)
            && visit(result).is_break()
        {
            break;
        }
    }
    Ok(())
}

/// How many events wait for the worker.
pub async fn queue_depth(js: &jetstream::Context) -> Result<QueueDepth, async_nats::Error> {
    let stream = js.get_stream(EVENTS_STREAM).await?;
    let info = stream.consumer_info(WORKER_CONSUMER).await?;
    Ok(QueueDepth {
        waiting: info.num_pending,
        in_progress: info.num_ack_pending as u64,
    })
}

/// One line per sync: time, commit, trigger, state, duration, per-service outcome.
pub fn format_table(syncs: &[SyncFinished], queue: QueueDepth) -> String {
    let mut out = format!(
        "{:<20} {:<8} {:<7} {:<7} {:>9}  SERVICES\n",
        "FINISHED", "COMMIT", "TRIGGER", "STATE", "DURATION"
    );
    for sync in syncs {
        let commit = sync
            .commit
            .as_deref()
            .map(|c| c.chars().take(8).collect::<String>())
            .unwrap_or_else(|| "-".into());
        let services = if let Some(error) = &sync.error {
            error.clone()
        } else if sync.services.is_empty() {
            "(none)".to_string()
        } else {
            sync.services
                .iter()
                .map(|s| match (s.outcome, s.exit_code) {
                    (SyncOutcome::Failed, Some(code)) => format!("{}=failed({code})", s.service),
                    (outcome, _) => format!("{}={}", s.service, outcome_word(outcome)),
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push_str(&format!(
            "{:<20} {:<8} {:<7} {:<7} {:>8.1}s  {}\n",
            format!("{}Z", sync.finished_at.chars().take(19).collect::<String>()),
            commit,
            format!("{:?}", sync.trigger).to_lowercase(),
            format!("{:?}", sync.state).to_lowercase(),
            sync.duration_ms as f64 / 1000.0,
            services
        ));
        out.push_str(&format_reasons(sync));
    }
    out.push_str(&format!(
        "queue: {} waiting, {} in progress\n",
        queue.waiting, queue.in_progress
    ));
    out
}

/// One indented line per service that says why it was selected and, when blocked, by what.
fn format_reasons(sync: &SyncFinished) -> String {
    let mut out = String::new();
    for s in &sync.services {
        let Some(reason) = &s.reason else { continue };
        out.push_str(&format!("    {}: {reason}", s.service));
        if s.outcome == SyncOutcome::Blocked
            && let Some(blocked) = s.output_tail.first()
        {
            out.push_str(&format!("; {blocked}"));
        }
        out.push('\n');
    }
    out
}

fn outcome_word(outcome: SyncOutcome) -> &'static str {
    match outcome {
        SyncOutcome::Synced => "synced",
        SyncOutcome::Failed => "failed",
        SyncOutcome::TimedOut => "timed_out",
        SyncOutcome::Unknown => "unknown",
        SyncOutcome::NotFinished => "not_finished",
        SyncOutcome::Blocked => "blocked",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{FinishedState, ServiceResult, Totals, Trigger};

    #[test]
    fn the_table_shows_each_services_outcome_and_the_queue() {
        let services = vec![
            ServiceResult {
                service: "platform/postgres".into(),
                task: Some("postgres.sync".into()),
                outcome: SyncOutcome::Failed,
                exit_code: Some(3),
                output_tail: vec![],
                duration_ms: 10,
                reason: None,
            },
            ServiceResult {
                service: "platform/redis".into(),
                task: Some("redis.sync".into()),
                outcome: SyncOutcome::Synced,
                exit_code: Some(0),
                output_tail: vec![],
                duration_ms: 10,
                reason: None,
            },
        ];
        let sync = SyncFinished {
            event_id: "e".into(),
            event_seq: 1,
            trigger: Trigger::Push,
            repository: None,
            commit: Some("59b20b8d5a1e".into()),
            state: FinishedState::Failure,
            totals: Totals::of(&services),
            services,
            error: None,
            duration_ms: 5400,
            replay_of: None,
            finished_at: "2026-11-25T21:00:05.123Z".into(),
            env: None,
            deployment_id: None,
        };
        let table = format_table(
            &[sync],
            QueueDepth {
                waiting: 2,
                in_progress: 1,
            },
        );
        assert!(
            table.contains("2026-11-25T21:00:05Z 59b20b8d push    failure"),
            "{table}"
        );
        assert!(table.contains("platform/postgres=failed(3) platform/redis=synced"));
        assert!(table.contains("5.4s"));
        assert!(table.ends_with("queue: 2 waiting, 1 in progress\n"));
    }

    #[test]
    fn the_table_says_why_each_service_ran_and_what_blocked_one() {
        let result = |service: &str, outcome, reason: &str, tail: &[&str]| ServiceResult {
            service: service.into(),
            task: None,
            outcome,
            exit_code: None,
            output_tail: tail.iter().map(|l| l.to_string()).collect(),
            duration_ms: 0,
            reason: Some(reason.into()),
        };
        let services = vec![
            result(
                "platform/alerting",
                SyncOutcome::Blocked,
                "depends on libs/** via libs/common.py",
                &["Blocked: platform/postgres failed"],
            ),
            result(
                "platform/postgres",
                SyncOutcome::Failed,
                "changed platform/01.postgres/compose.yaml",
                &["boom"],
            ),
        ];
        let sync = SyncFinished {
            event_id: "e".into(),
            event_seq: 1,
            trigger: Trigger::Push,
            repository: None,
            commit: Some("59b20b8d5a1e".into()),
            state: FinishedState::Failure,
            totals: Totals::of(&services),
            services,
            error: None,
            duration_ms: 5400,
            replay_of: None,
            finished_at: "2026-11-25T21:00:05.123Z".into(),
            env: None,
            deployment_id: None,
        };
        let table = format_table(
            &[sync],
            QueueDepth {
                waiting: 0,
                in_progress: 0,
            },
        );
        assert!(
            table.contains("platform/alerting=blocked platform/postgres=failed"),
            "{table}"
        );
        assert!(
            table.contains(
                "\n    platform/alerting: depends on libs/** via libs/common.py; Blocked: platform/postgres failed\n"
            ),
            "{table}"
        );
        assert!(
            table.contains("\n    platform/postgres: changed platform/01.postgres/compose.yaml\n"),
            "{table}"
        );
    }
}
