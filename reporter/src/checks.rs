//! Check runs (`CHECK_RUNS=true`): one per service and sync, named `IaC Runner / <service>`,
//! created queued when the sync starts, in progress when the service's task starts, and
//! completed when the sync finishes, with why the service was selected, its outcome and its
//! output tail. Planning is pure; [`CheckRuns::deliver`] keeps each check run's id and last
//! state in `IAC_STATUSES`, so several reporters create it once and never move it backwards,
//! whatever order the results are handled in.
//!
//! The phases are the commit statuses' [`Phase`]: `Queued` from `started`, `Started` from the
//! service's `TaskStarted`, `Finished` from `finished`.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use iac_shared::events::{
    ServiceResult, SyncFinished, SyncOutcome, SyncStarted, TaskStarted, truncate_chars,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::github::{GithubClient, PostError};
use crate::order::{now_ms, status_key};
use crate::status::{Phase, StatusSettings, is_postable_commit};

/// GitHub's limit on a check run's output summary, in characters.
const MAX_SUMMARY_CHARS: usize = 65_000;
/// The title of a check run whose task waits for its turn in the sync.
const QUEUED_TITLE: &str = "Queued: waiting for its turn in the sync";
/// How often a check run waiting for a request in flight reads its record again.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// One check run request to make, in the order of its sync's phases.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedCheck {
    pub repository: String,
    pub commit: String,
    /// The sync it belongs to: its event's sequence in `IAC_EVENTS`.
    pub event_seq: u64,
    pub phase: Phase,
    pub name: String,
    /// The body of the create (`head_sha` included) or update request.
    pub body: Value,
}

/// What re-runs a check run: the service, and the environment when not the push one
/// (`platform/postgres`, `platform/postgres@staging`). The gateway reads it back.
pub fn external_id(service: &str, env_suffix_env: Option<&str>) -> String {
    match env_suffix_env {
        Some(env) => format!("{service}@{env}"),
        None => service.to_string(),
    }
}

struct Sync<'a> {
    settings: &'a StatusSettings,
    repository: String,
    commit: String,
    event_id: &'a str,
    event_seq: u64,
    /// The environment, when it is not the push environment.
    env: Option<&'a str>,
}

impl<'a> Sync<'a> {
    fn new(
        settings: &'a StatusSettings,
        repository: Option<&str>,
        commit: Option<&str>,
        event_id: &'a str,
        event_seq: u64,
        env: Option<&'a str>,
    ) -> Option<Self> {
        let commit = commit.filter(|c| is_postable_commit(c))?;
        let repository = repository
            .filter(|r| crate::status::is_valid_repository(r))
            .or(settings.default_repository.as_deref())?;
        Some(Sync {
            repository: repository.to_string(),
            commit: commit.to_string(),
            env: env.filter(|e| Some(*e) != settings.push_env.as_deref()),
            settings,
            event_id,
            event_seq,
        })
    }

    fn check(&self, service: &str, phase: Phase, mut body: Value) -> PlannedCheck {
        let name = format!(
            "{}{}",
            self.settings.service_context(service),
            self.settings.env_suffix(self.env)
        );
        body["name"] = json!(name);
        body["head_sha"] = json!(self.commit);
        body["external_id"] = json!(external_id(service, self.env));
        if let Some(url) = self
            .settings
            .target_url(&self.repository, &self.commit, self.event_id)
        {
            body["details_url"] = json!(url);
        }
        PlannedCheck {
            repository: self.repository.clone(),
            commit: self.commit.clone(),
            event_seq: self.event_seq,
            phase,
            name,
            body,
        }
    }
}

/// A started sync: each service's check run, queued until its task starts.
pub fn for_started(started: &SyncStarted, settings: &StatusSettings) -> Vec<PlannedCheck> {
    let Some(sync) = Sync::new(
        settings,
        started.repository.as_deref(),
        Some(&started.commit),
        &started.event_id,
        started.event_seq,
        started.env.as_deref(),
    ) else {
        return Vec::new();
    };
    started
        .services
        .iter()
        .map(|service| {
            let why = started.reasons.get(service).map_or("", String::as_str);
            let body = json!({
                "status": "queued",
                "output": {
                    "title": QUEUED_TITLE,
                    "summary": summary(why, QUEUED_TITLE, &[]),
                },
            });
            sync.check(service, Phase::Queued, body)
        })
        .collect()
}

/// A service's task starting: its check run, in progress.
pub fn for_task_started(task: &TaskStarted, settings: &StatusSettings) -> Option<PlannedCheck> {
    let sync = Sync::new(
        settings,
        task.repository.as_deref(),
        Some(&task.commit),
        &task.event_id,
        task.event_seq,
        task.env.as_deref(),
    )?;
    let title = format!("Running {}", task.task);
    let body = json!({
        "status": "in_progress",
        "started_at": task.started_at,
        "output": {
            "title": title,
            "summary": summary(task.reason.as_deref().unwrap_or(""), &title, &[]),
        },
    });
    Some(sync.check(&task.service, Phase::Started, body))
}

/// A finished sync: each service's check run, completed with its conclusion.
pub fn for_finished(finished: &SyncFinished, settings: &StatusSettings) -> Vec<PlannedCheck> {
    let Some(sync) = Sync::new(
        settings,
        finished.repository.as_deref(),
        finished.commit.as_deref(),
        &finished.event_id,
        finished.event_seq,
        finished.env.as_deref(),
    ) else {
        return Vec::new();
    };
    finished
        .services
        .iter()
        .map(|result| {
            let (conclusion, title) = conclusion(result);
            let why = result.reason.as_deref().unwrap_or("");
            let body = json!({
                "status": "completed",
                "conclusion": conclusion,
                "completed_at": finished.finished_at,
                "output": {
                    "title": title,
                    "summary": summary(why, &title, &result.output_tail),
                },
            });
            sync.check(&result.service, Phase::Finished, body)
        })
        .collect()
}

/// The conclusion and the title of a service's result: a service that never ran (blocked
/// behind another) is neutral and one whose sync was given up is cancelled, not failures.
pub fn conclusion(result: &ServiceResult) -> (&'static str, String) {
    let seconds = result.duration_ms as f64 / 1000.0;
    match (result.outcome, result.exit_code) {
        (SyncOutcome::Synced, _) => ("success", format!("Synced in {seconds:.1} s")),
        (SyncOutcome::Failed, Some(code)) => ("failure", format!("Failed with exit code {code}")),
        (SyncOutcome::Failed, None) => ("failure", "Failed".to_string()),
        (SyncOutcome::TimedOut, _) => ("failure", format!("Timed out after {seconds:.0} s")),
        (SyncOutcome::Unknown, _) => ("failure", "Unknown service at this commit".to_string()),
        (SyncOutcome::NotFinished, _) => (
            "cancelled",
            "Not finished: the sync was given up".to_string(),
        ),
        (SyncOutcome::Blocked, _) => (
            "neutral",
            result
                .output_tail
                .first()
                .filter(|line| line.starts_with("Blocked: "))
                .cloned()
                .unwrap_or_else(|| "Blocked: a service it comes after did not sync".to_string()),
        ),
    }
}

/// Markdown: why the service was selected, the outcome, and the output tail.
fn summary(why: &str, outcome: &str, tail: &[String]) -> String {
    let why = if why.is_empty() { "not given" } else { why };
    let mut text = format!("**Selected because:** {why}\n\n**Outcome:** {outcome}\n");
    if !tail.is_empty() {
        let fence = "~~~~";
        text.push_str(&format!(
            "\n**Output (last lines):**\n\n{fence}\n{}\n{fence}\n",
            tail.join("\n")
        ));
    }
    truncate_chars(&text, MAX_SUMMARY_CHARS)
}

/// A check run as kept in `IAC_STATUSES`: its id once created, the newest phase asked for, and
/// a lease while a request is in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub phase: Phase,
    /// The request of `phase`, to make again when it may not have been applied.
    pub body: Value,
    /// GitHub may not show `phase` yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_until: Option<u64>,
}

/// What to do about a planned check run, given its record.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckDecision {
    /// GitHub shows this phase or a later one already.
    Done,
    /// A request is in flight; read again within this time.
    Wait(Duration),
    /// Take the lease with this record, then create (no id) or update the check run.
    Send(Box<CheckRecord>),
}

pub fn decide_check(
    stored: Option<&CheckRecord>,
    mine: &PlannedCheck,
    now_ms: u64,
) -> CheckDecision {
    let planned = CheckRecord {
        id: None,
        phase: mine.phase,
        body: mine.body.clone(),
        unconfirmed: false,
        leased_until: None,
    };
    let Some(stored) = stored else {
        return CheckDecision::Send(Box::new(planned));
    };
    if stored.phase >= mine.phase && !stored.unconfirmed {
        return CheckDecision::Done;
    }
    if let Some(until) = stored.leased_until.filter(|&until| until > now_ms) {
        return CheckDecision::Wait(Duration::from_millis(until - now_ms));
    }
    let newest = if stored.phase >= mine.phase {
        stored.clone()
    } else {
        CheckRecord {
            id: stored.id,
            ..planned
        }
    };
    CheckDecision::Send(Box::new(newest))
}

/// The bucket key of a check run: one per (repository, commit, sync, name).
pub fn check_key(check: &PlannedCheck) -> String {
    // A leading newline keeps it apart from any status context.
    let context = format!("\ncheck-run\n{}\n{}", check.event_seq, check.name);
    status_key(&check.repository, &check.commit, &context)
}

/// Why a check run was not brought up to date this time.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Github(#[from] PostError),
    #[error("status bucket unavailable: {0}")]
    Store(String),
}

/// Creates and updates check runs, with their records in `IAC_STATUSES`.
pub struct CheckRuns<'a> {
    pub github: &'a GithubClient,
    pub records: &'a kv::Store,
    /// How long a request may be in flight.
    pub lease: Duration,
}

impl CheckRuns<'_> {
    /// Brings the check run up to `check`'s phase unless it is there already.
    pub async fn deliver(&self, check: &PlannedCheck) -> Result<(), CheckError> {
        let key = check_key(check);
        let waiting_since = Instant::now();
        loop {
            let (revision, stored) = self.read(&key).await?;
            let record = match decide_check(stored.as_ref(), check, now_ms()) {
                CheckDecision::Done => return Ok(()),
                CheckDecision::Wait(left) => {
                    if waiting_since.elapsed() > self.lease * 2 {
                        return Err(CheckError::Store(
                            "other reporters kept updating the check run".into(),
                        ));
                    }
                    tokio::time::sleep(left.min(LEASE_POLL)).await;
                    continue;
                }
                CheckDecision::Send(record) => record,
            };
            let leased = CheckRecord {
                unconfirmed: true,
                leased_until: Some(now_ms() + self.lease.as_millis() as u64),
                ..*record.clone()
            };
            let Some(revision) = self.write(&key, revision, &leased).await? else {
                continue;
            };
            let sent = self
                .github
                .check_run(&check.repository, record.id, &record.body)
                .await;
            let released = match &sent {
                Ok(id) => CheckRecord {
                    id: Some(*id),
                    unconfirmed: false,
                    leased_until: None,
                    ..*record
                },
                // No answer: it may still be applied (or created), so the lease runs out.
                Err(PostError::Transient {
                    reason: "timeout" | "transport",
                    ..
                }) => return sent.map(drop).map_err(CheckError::from),
                Err(_) => CheckRecord {
                    unconfirmed: true,
                    leased_until: None,
                    ..*record
                },
            };
            if let Err(e) = self.records.update(&key, encode(&released), revision).await {
                tracing::warn!(error = %e, "could not record the check run; its lease expires by itself");
            }
            return sent.map(drop).map_err(CheckError::from);
        }
    }

    async fn read(&self, key: &str) -> Result<(Option<u64>, Option<CheckRecord>), CheckError> {
        match self.records.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&entry.value).ok();
                Ok((Some(entry.revision), record))
            }
            Ok(Some(entry)) => Ok((Some(entry.revision), None)),
            Ok(None) => Ok((None, None)),
            Err(e) => Err(CheckError::Store(e.to_string())),
        }
    }

    /// Compare-and-set; `None` when someone else wrote first.
    async fn write(
        &self,
        key: &str,
        revision: Option<u64>,
        record: &CheckRecord,
    ) -> Result<Option<u64>, CheckError> {
        let value = encode(record);
        match revision {
            None => match self.records.create(key, value).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(CheckError::Store(e.to_string())),
            },
            Some(revision) => match self.records.update(key, value, revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(CheckError::Store(e.to_string())),
            },
        }
    }
}

fn encode(record: &CheckRecord) -> bytes::Bytes {
    serde_json::to_vec(record)
        .expect("a check record serializes")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iac_shared::events::{FinishedState, Totals, Trigger};

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn settings() -> StatusSettings {
        StatusSettings {
            context: "IaC Runner / Sync".into(),
            per_service: false,
            target_url: Some("https://runner.example/runs/{event_id}".into()),
            default_repository: Some("acme/infra".into()),
            push_env: Some("production".into()),
            run_links: None,
        }
    }

    fn result(service: &str, outcome: SyncOutcome, tail: &[&str]) -> ServiceResult {
        ServiceResult {
            service: service.into(),
            task: None,
            outcome,
            exit_code: (outcome == SyncOutcome::Failed).then_some(2),
            output_tail: tail.iter().map(|s| s.to_string()).collect(),
            duration_ms: 1500,
            reason: Some("changed platform/postgres/compose.yaml".into()),
        }
    }

    fn finished(services: Vec<ServiceResult>, env: Option<&str>) -> SyncFinished {
        SyncFinished {
            event_id: "e-1".into(),
            event_seq: 7,
            trigger: Trigger::Push,
            repository: None,
            commit: Some(SHA.into()),
            state: FinishedState::Failure,
            totals: Totals::of(&services),
            services,
            error: None,
            duration_ms: 10,
            replay_of: None,
            finished_at: "2026-01-01T00:00:00Z".into(),
            env: env.map(str::to_string),
            deployment_id: None,
            superseded_by: None,
        }
    }

    #[test]
    fn a_started_sync_queues_each_service_with_why_it_was_selected() {
        let started = SyncStarted {
            event_id: "e-1".into(),
            event_seq: 7,
            trigger: Trigger::Push,
            repository: Some("acme/infra".into()),
            commit: SHA.into(),
            services: vec!["platform/postgres".into()],
            reasons: [("platform/postgres".to_string(), "manual".to_string())].into(),
            replay_of: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            env: Some("production".into()),
            deployment_id: None,
        };
        let [check] = for_started(&started, &settings()).try_into().unwrap();
        assert_eq!(check.name, "IaC Runner / platform/postgres");
        assert_eq!(check.phase, Phase::Queued);
        assert_eq!(check.body["status"], "queued");
        assert!(check.body.get("started_at").is_none(), "{}", check.body);
        assert_eq!(check.body["head_sha"], SHA);
        assert_eq!(check.body["external_id"], "platform/postgres");
        assert_eq!(check.body["details_url"], "https://runner.example/runs/e-1");
        let summary = check.body["output"]["summary"].as_str().unwrap();
        assert!(summary.contains("manual"), "{summary}");
    }

    fn task_started(env: Option<&str>) -> TaskStarted {
        TaskStarted {
            event_id: "e-1".into(),
            event_seq: 7,
            trigger: Trigger::Push,
            repository: None,
            commit: SHA.into(),
            service: "platform/postgres".into(),
            task: "postgres.sync".into(),
            reason: Some("changed platform/01.postgres/compose.yaml".into()),
            replay_of: None,
            started_at: "2026-01-01T00:00:05Z".into(),
            env: env.map(str::to_string),
            deployment_id: None,
        }
    }

    #[test]
    fn a_starting_task_puts_its_check_run_in_progress_under_the_same_name_and_key() {
        let check = for_task_started(&task_started(Some("production")), &settings()).unwrap();
        assert_eq!(check.phase, Phase::Started);
        assert_eq!(check.body["status"], "in_progress");
        assert_eq!(check.body["started_at"], "2026-01-01T00:00:05Z");
        assert_eq!(check.body["head_sha"], SHA);
        assert_eq!(check.body["external_id"], "platform/postgres");
        assert_eq!(check.repository, "acme/infra");
        let summary = check.body["output"]["summary"].as_str().unwrap();
        assert!(
            summary.contains("changed platform/01.postgres"),
            "{summary}"
        );
        let started = SyncStarted {
            event_id: "e-1".into(),
            event_seq: 7,
            trigger: Trigger::Push,
            repository: None,
            commit: SHA.into(),
            services: vec!["platform/postgres".into()],
            reasons: Default::default(),
            replay_of: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            env: None,
            deployment_id: None,
        };
        let [queued] = for_started(&started, &settings()).try_into().unwrap();
        assert_eq!(
            check_key(&check),
            check_key(&queued),
            "the task moves the check run its sync queued"
        );
        let staging = for_task_started(&task_started(Some("staging")), &settings()).unwrap();
        assert_eq!(staging.name, "IaC Runner / platform/postgres (staging)");
    }

    #[test]
    fn blocked_and_given_up_services_are_neutral_or_cancelled_not_failures() {
        let done = finished(
            vec![
                result("platform/a", SyncOutcome::Synced, &[]),
                result("platform/b", SyncOutcome::Failed, &["boom"]),
                result(
                    "platform/c",
                    SyncOutcome::Blocked,
                    &["Blocked: platform/b failed"],
                ),
                result("platform/d", SyncOutcome::NotFinished, &[]),
            ],
            None,
        );
        let checks = for_finished(&done, &settings());
        let conclusions: Vec<_> = checks
            .iter()
            .map(|c| c.body["conclusion"].clone())
            .collect();
        assert_eq!(conclusions, ["success", "failure", "neutral", "cancelled"]);
        assert_eq!(
            checks[2].body["output"]["title"],
            "Blocked: platform/b failed"
        );
        let summary = checks[1].body["output"]["summary"].as_str().unwrap();
        assert!(
            summary.contains("boom") && summary.contains("exit code 2"),
            "{summary}"
        );
        assert!(
            summary.contains("changed platform/postgres/compose.yaml"),
            "{summary}"
        );
    }

    #[test]
    fn a_sync_in_another_environment_names_it_and_carries_it_for_re_run() {
        let done = finished(
            vec![result("platform/a", SyncOutcome::Synced, &[])],
            Some("staging"),
        );
        let [check] = for_finished(&done, &settings()).try_into().unwrap();
        assert_eq!(check.name, "IaC Runner / platform/a (staging)");
        assert_eq!(check.body["external_id"], "platform/a@staging");
    }

    fn planned(phase: Phase) -> PlannedCheck {
        PlannedCheck {
            repository: "acme/infra".into(),
            commit: SHA.into(),
            event_seq: 7,
            phase,
            name: "IaC Runner / platform/a".into(),
            body: json!({ "phase": format!("{phase:?}") }),
        }
    }

    #[test]
    fn a_check_run_is_created_once_and_never_moved_backwards() {
        let started = planned(Phase::Started);
        let CheckDecision::Send(first) = decide_check(None, &started, 0) else {
            panic!("the first request creates it");
        };
        assert_eq!(first.id, None);
        let created = CheckRecord {
            id: Some(11),
            ..*first
        };
        let finished = planned(Phase::Finished);
        assert_eq!(
            decide_check(Some(&created), &finished, 0),
            CheckDecision::Send(Box::new(CheckRecord {
                id: Some(11),
                phase: Phase::Finished,
                body: finished.body.clone(),
                unconfirmed: false,
                leased_until: None,
            })),
            "the finished phase updates the same check run"
        );
        let completed = CheckRecord {
            phase: Phase::Finished,
            ..created.clone()
        };
        assert_eq!(
            decide_check(Some(&completed), &started, 0),
            CheckDecision::Done
        );
        let in_flight = CheckRecord {
            leased_until: Some(500),
            unconfirmed: true,
            ..created
        };
        assert_eq!(
            decide_check(Some(&in_flight), &finished, 100),
            CheckDecision::Wait(Duration::from_millis(400))
        );
    }

    /// What a record holds once GitHub accepted `phase`.
    fn shown(phase: Phase) -> CheckRecord {
        CheckRecord {
            id: Some(11),
            phase,
            body: planned(phase).body,
            unconfirmed: false,
            leased_until: None,
        }
    }

    #[test]
    fn a_check_run_goes_queued_then_in_progress_then_completed() {
        let queued = planned(Phase::Queued);
        let CheckDecision::Send(created) = decide_check(None, &queued, 0) else {
            panic!("the sync's started result creates it");
        };
        assert_eq!((created.id, created.phase), (None, Phase::Queued));
        let task = planned(Phase::Started);
        let CheckDecision::Send(moved) = decide_check(Some(&shown(Phase::Queued)), &task, 0) else {
            panic!("the task's start moves it along");
        };
        assert_eq!((moved.id, moved.phase), (Some(11), Phase::Started));
        assert_eq!(moved.body, task.body);
        let CheckDecision::Send(done) =
            decide_check(Some(&shown(Phase::Started)), &planned(Phase::Finished), 0)
        else {
            panic!("the sync's finished result completes it");
        };
        assert_eq!((done.id, done.phase), (Some(11), Phase::Finished));
    }

    #[test]
    fn a_task_start_handled_before_its_sync_start_creates_the_check_run_in_progress() {
        let CheckDecision::Send(created) = decide_check(None, &planned(Phase::Started), 0) else {
            panic!("the task's start creates it");
        };
        assert_eq!((created.id, created.phase), (None, Phase::Started));
        assert_eq!(
            decide_check(Some(&shown(Phase::Started)), &planned(Phase::Queued), 0),
            CheckDecision::Done,
            "the late started result does not queue it again"
        );
    }

    #[test]
    fn a_task_start_handled_after_its_sync_finished_leaves_the_check_run_completed() {
        assert_eq!(
            decide_check(Some(&shown(Phase::Finished)), &planned(Phase::Started), 0),
            CheckDecision::Done
        );
        let in_flight = CheckRecord {
            unconfirmed: true,
            leased_until: Some(500),
            ..shown(Phase::Finished)
        };
        assert_eq!(
            decide_check(Some(&in_flight), &planned(Phase::Started), 100),
            CheckDecision::Wait(Duration::from_millis(400)),
            "it waits for the completion in flight, then finds it done"
        );
    }

    #[test]
    fn a_newer_phase_that_may_have_failed_is_sent_again_by_an_older_message() {
        let failed = CheckRecord {
            id: Some(3),
            phase: Phase::Finished,
            body: json!({ "status": "completed" }),
            unconfirmed: true,
            leased_until: None,
        };
        assert_eq!(
            decide_check(Some(&failed), &planned(Phase::Started), 0),
            CheckDecision::Send(Box::new(failed.clone()))
        );
    }

    #[test]
    fn check_keys_differ_per_sync_and_from_status_keys() {
        let mut other = planned(Phase::Started);
        other.event_seq = 8;
        assert_ne!(check_key(&planned(Phase::Started)), check_key(&other));
        assert_ne!(
            check_key(&other),
            status_key("acme/infra", SHA, "IaC Runner / platform/a")
        );
    }
}
