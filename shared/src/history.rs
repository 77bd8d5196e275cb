//! What the pipeline did lately, read from the streams (`iac-worker status`), and what each
//! environment last synced (the applied state in `IAC_APPLIED`, written by the worker).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use async_nats::jetstream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::events::{FinishedState, SyncFinished, SyncOutcome};
use crate::names::{
    APPLIED_BUCKET, EVENTS_STREAM, FINISHED_SUBJECT, RESULTS_STREAM, WORKER_CONSUMER,
};

/// `status`: how many syncs to show (NATS is reached through the global NATS flags).
#[derive(Debug, Clone, clap::Args)]
pub struct StatusCommand {
    /// How many of the last syncs to show.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub count: usize,

    /// Which environments' applied state to show (`PUSH_ENV`, `DEPLOY_ENVS`).
    #[command(flatten)]
    pub environments: crate::deploy::EnvironmentArgs,
}

impl StatusCommand {
    /// Connects and prints the last syncs, the queue depth and each environment's applied
    /// state.
    pub async fn run(
        &self,
        nats: &crate::nats::NatsArgs,
        client_name: &str,
    ) -> Result<(), async_nats::Error> {
        let client = crate::nats::connect_once(nats, client_name).await?;
        let js = jetstream::new(client);
        let syncs = recent_syncs(&js, self.count).await?;
        let queue = queue_depth(&js).await?;
        // The syncs, each environment's applied state, then the queue (the last line, as
        // it always was).
        print!("{}", format_syncs(&syncs));
        let envs = self.environments.environments();
        let mut names: Vec<Option<String>> = vec![envs.push.clone()];
        names.extend(envs.separate().map(|e| Some(e.to_string())));
        // An installation provisioned before the bucket existed has no applied state yet.
        match js.get_key_value(APPLIED_BUCKET).await {
            Ok(bucket) => print_applied(&bucket, &names).await?,
            Err(_) => {
                println!("applied: no {APPLIED_BUCKET} bucket yet (run `iac-worker provision`)")
            }
        }
        print!("{}", format_queue(queue));
        Ok(())
    }
}

/// Prints the applied state of each of `envs`.
async fn print_applied(
    bucket: &jetstream::kv::Store,
    envs: &[Option<String>],
) -> Result<(), async_nats::Error> {
    let now = OffsetDateTime::now_utc();
    for env in envs {
        let applied = read_json::<Applied>(bucket, &applied_key(env.as_deref())).await?;
        let branch = read_json::<BranchSeen>(bucket, &branch_key(env.as_deref())).await?;
        print!(
            "{}",
            format_applied(env.as_deref(), applied.as_ref(), branch.as_ref(), now)
        );
    }
    Ok(())
}

/// The entry at `key` as JSON; `None` when absent or unreadable (a newer writer's shape).
async fn read_json<T: DeserializeOwned>(
    bucket: &jetstream::kv::Store,
    key: &str,
) -> Result<Option<T>, async_nats::Error> {
    Ok(bucket
        .get(key)
        .await?
        .and_then(|value| serde_json::from_slice(&value).ok()))
}

/// What one environment last synced (`applied.<env>` in `IAC_APPLIED`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The commit of the environment's last push sync (or the baseline): later pushes diff
    /// from it, and reconciliation compares the branch head with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<AppliedHead>,
    /// Each service's last sync in the environment, by service key.
    #[serde(default)]
    pub services: BTreeMap<String, AppliedService>,
}

/// The environment's last synced branch commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedHead {
    pub commit: String,
    /// How that sync ended; absent for a baseline (nothing synced: the branch head found when
    /// there was no applied state yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<FinishedState>,
    /// RFC 3339.
    pub at: String,
    /// The event whose sync it was (`reconcile-<commit>` for one reconciliation published).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

/// One service's last sync in an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedService {
    pub commit: String,
    pub outcome: SyncOutcome,
    /// RFC 3339.
    pub at: String,
}

/// The branch head reconciliation last saw on the remote (`branch.<env>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchSeen {
    pub head: String,
    /// RFC 3339.
    pub at: String,
    /// Which services the head changes, when reconciliation could work it out (absent in
    /// entries written before it did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
}

/// The services the changes from an applied head to the branch head select, as a push of
/// those changes would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// The applied head the changes were taken from: once the environment applies another
    /// commit, this drift no longer says anything.
    pub from: String,
    /// Service keys, in key order; services the head adds are among them.
    pub services: Vec<String>,
}

/// How an environment is written in keys: its name, `-` for pushes without one (`PUSH_ENV=`).
pub fn env_token(env: Option<&str>) -> &str {
    env.unwrap_or("-")
}

/// The key of an environment's [`Applied`].
pub fn applied_key(env: Option<&str>) -> String {
    format!("applied.{}", env_token(env))
}

/// The key of the branch head reconciliation last saw for an environment.
pub fn branch_key(env: Option<&str>) -> String {
    format!("branch.{}", env_token(env))
}

/// The key marking the event at `seq` of `IAC_EVENTS` as covered by a newer push's sync.
pub fn covered_key(seq: u64) -> String {
    format!("covered.{seq}")
}

/// An environment's applied state: its head, then one line per service with the commit, the
/// outcome, the age and whether the branch head has changes for it not synced yet (drift).
/// Services the branch head changes that never synced get a line too. When which services the
/// head changes is unknown, the environment's line says so and each service shows `?`.
pub fn format_applied(
    env: Option<&str>,
    applied: Option<&Applied>,
    branch: Option<&BranchSeen>,
    now: OffsetDateTime,
) -> String {
    let name = env.unwrap_or("(no environment)");
    let Some(head) = applied.and_then(|a| a.head.as_ref()) else {
        return format!("applied {name}: nothing synced yet\n");
    };
    let short = |c: &str| c.chars().take(8).collect::<String>();
    let ahead = branch.filter(|b| b.head != head.commit);
    // Only a drift worked out from the applied head shown says which services are behind.
    let drifted = ahead
        .and_then(|b| b.drift.as_ref())
        .filter(|d| d.from == head.commit)
        .map(|d| &d.services);
    let mut out = match &head.state {
        None => format!(
            "applied {name}: baseline {} (the branch head when there was no applied state; nothing synced)\n",
            short(&head.commit)
        ),
        Some(state) => format!(
            "applied {name}: head {} {} {} ago\n",
            short(&head.commit),
            format!("{state:?}").to_lowercase(),
            age(&head.at, now)
        ),
    };
    if let Some(branch) = ahead {
        out.push_str(&format!(
            "  branch head {} not synced yet (seen {} ago){}\n",
            short(&branch.head),
            age(&branch.at, now),
            if drifted.is_some() {
                ""
            } else {
                ", drift unknown"
            }
        ));
    }
    let services = applied.map(|a| &a.services);
    let names: BTreeSet<&String> = services
        .into_iter()
        .flat_map(|s| s.keys())
        .chain(drifted.into_iter().flatten())
        .collect();
    for service in names {
        let mark = match (ahead, drifted) {
            (None, _) => "-",
            (Some(_), None) => "?",
            (Some(_), Some(drifted)) if drifted.contains(service) => "drift",
            (Some(_), Some(_)) => "-",
        };
        match services.and_then(|s| s.get(service)) {
            Some(s) => out.push_str(&format!(
                "  {:<30} {} {:<12} {:>6} ago  {mark}\n",
                service,
                short(&s.commit),
                outcome_word(s.outcome),
                age(&s.at, now),
            )),
            None => out.push_str(&format!(
                "  {:<30} {:<8} {:<12} {:>6}      {mark}\n",
                service, "-", "never synced", ""
            )),
        }
    }
    out
}

/// How long ago an RFC 3339 time was, in whole units (`45s`, `3m`, `2h`, `4d`).
fn age(at: &str, now: OffsetDateTime) -> String {
    let Ok(then) = OffsetDateTime::parse(at, &Rfc3339) else {
        return "?".into();
    };
    let secs = (now - then).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
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

/// One line per sync: time, commit, trigger, state, duration, per-service outcome; then the
/// queue.
pub fn format_table(syncs: &[SyncFinished], queue: QueueDepth) -> String {
    format_syncs(syncs) + &format_queue(queue)
}

/// The queue in front of the worker, in one line.
fn format_queue(queue: QueueDepth) -> String {
    format!(
        "queue: {} waiting, {} in progress\n",
        queue.waiting, queue.in_progress
    )
}

/// One line per sync: time, commit, trigger, state, duration, per-service outcome.
fn format_syncs(syncs: &[SyncFinished]) -> String {
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
    use crate::events::{ServiceResult, Totals, Trigger};

    fn at(rfc3339: &str) -> OffsetDateTime {
        OffsetDateTime::parse(rfc3339, &Rfc3339).unwrap()
    }

    fn service(commit: &str, outcome: SyncOutcome, at: &str) -> AppliedService {
        AppliedService {
            commit: commit.into(),
            outcome,
            at: at.into(),
        }
    }

    /// Production applied `aaaaaaaa11`: postgres failed there, redis synced earlier.
    fn production() -> Applied {
        Applied {
            head: Some(AppliedHead {
                commit: "aaaaaaaa11".into(),
                state: Some(FinishedState::Failure),
                at: "2026-01-01T00:57:00Z".into(),
                event_id: None,
            }),
            services: [
                (
                    "platform/postgres".to_string(),
                    service("aaaaaaaa11", SyncOutcome::Failed, "2026-01-01T00:59:15Z"),
                ),
                (
                    "platform/redis".to_string(),
                    service("9999999900", SyncOutcome::Synced, "2026-01-01T00:10:00Z"),
                ),
            ]
            .into(),
        }
    }

    /// The line of `service` in `shown`.
    fn line_of<'a>(shown: &'a str, service: &str) -> &'a str {
        shown
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{service} ")))
            .unwrap_or_else(|| panic!("no line for {service} in:\n{shown}"))
    }

    #[test]
    fn applied_state_shows_each_services_commit_outcome_age_and_drift() {
        let now = at("2026-01-01T01:00:00Z");
        let branch = BranchSeen {
            head: "bbbbbbbb22".into(),
            at: "2026-01-01T00:59:50Z".into(),
            drift: Some(Drift {
                from: "aaaaaaaa11".into(),
                services: vec!["platform/postgres".into()],
            }),
        };
        let shown = format_applied(Some("production"), Some(&production()), Some(&branch), now);
        assert!(
            shown.starts_with("applied production: head aaaaaaaa failure 3m ago\n"),
            "{shown}"
        );
        assert!(
            shown.contains("  branch head bbbbbbbb not synced yet (seen 10s ago)\n"),
            "{shown}"
        );
        let postgres = line_of(&shown, "platform/postgres");
        assert!(
            postgres.contains("aaaaaaaa failed")
                && postgres.contains("45s ago")
                && postgres.ends_with(" drift"),
            "{postgres}"
        );
        let redis = line_of(&shown, "platform/redis");
        assert!(
            redis.contains("99999999 synced") && redis.ends_with(" -"),
            "{redis}"
        );

        let level = BranchSeen {
            head: "aaaaaaaa11".into(),
            ..branch
        };
        let shown = format_applied(Some("production"), Some(&production()), Some(&level), now);
        assert!(
            !shown.contains("drift") && !shown.contains("not synced yet"),
            "{shown}"
        );
    }

    #[test]
    fn a_service_the_branch_head_adds_is_shown_never_synced_with_drift() {
        let now = at("2026-01-01T01:00:00Z");
        let branch = BranchSeen {
            head: "bbbbbbbb22".into(),
            at: "2026-01-01T00:59:50Z".into(),
            drift: Some(Drift {
                from: "aaaaaaaa11".into(),
                services: vec!["platform/kafka".into()],
            }),
        };
        let shown = format_applied(Some("production"), Some(&production()), Some(&branch), now);
        let kafka = line_of(&shown, "platform/kafka");
        assert!(
            kafka.contains(" never synced ") && kafka.ends_with(" drift"),
            "{kafka}"
        );
        // In key order, between the services that synced.
        let order: Vec<&str> = shown
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            order,
            ["platform/kafka", "platform/postgres", "platform/redis"]
        );
        assert!(
            line_of(&shown, "platform/postgres").ends_with(" -"),
            "{shown}"
        );
    }

    #[test]
    fn without_a_drift_worked_out_from_the_applied_head_drift_is_unknown() {
        let now = at("2026-01-01T01:00:00Z");
        // Worked out before the environment applied `aaaaaaaa11`: it no longer says anything.
        let stale = BranchSeen {
            head: "bbbbbbbb22".into(),
            at: "2026-01-01T00:59:50Z".into(),
            drift: Some(Drift {
                from: "8888888800".into(),
                services: vec!["platform/redis".into()],
            }),
        };
        let unknown = BranchSeen {
            drift: None,
            ..stale.clone()
        };
        for branch in [stale, unknown] {
            let shown = format_applied(Some("production"), Some(&production()), Some(&branch), now);
            assert!(
                shown.contains(
                    "branch head bbbbbbbb not synced yet (seen 10s ago), drift unknown\n"
                ),
                "{shown}"
            );
            for service in ["platform/postgres", "platform/redis"] {
                assert!(line_of(&shown, service).ends_with(" ?"), "{shown}");
            }
            assert!(!shown.contains(" drift\n"), "{shown}");
        }
    }

    #[test]
    fn a_baseline_and_an_empty_environment_say_that_nothing_synced() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            format_applied(Some("staging"), None, None, now),
            "applied staging: nothing synced yet\n"
        );
        let baseline = Applied {
            head: Some(AppliedHead {
                commit: "cccccccc33".into(),
                state: None,
                at: now.format(&Rfc3339).unwrap(),
                event_id: None,
            }),
            services: BTreeMap::new(),
        };
        let shown = format_applied(None, Some(&baseline), None, now);
        assert!(
            shown.starts_with("applied (no environment): baseline cccccccc"),
            "{shown}"
        );
        assert!(shown.contains("nothing synced"), "{shown}");
    }

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
            superseded_by: None,
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
            superseded_by: None,
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
