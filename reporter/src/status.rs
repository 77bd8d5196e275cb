//! Which commit statuses an event or result asks for: pure functions over the shared types.

use iac_shared::events::{
    FinishedState, PushEvent, ServiceResult, SyncFinished, SyncOutcome, SyncStarted,
    is_null_commit, truncate_chars,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// What an event id keeps unencoded in a link: letters, digits and RFC 3986's `-._~`.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// GitHub's limit on a status description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 140;
/// Description of a push waiting behind earlier syncs.
pub const QUEUED_DESCRIPTION: &str = "Queued: waiting for previous sync to complete";

/// The `state` of a GitHub commit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusState {
    Pending,
    Success,
    Failure,
    Error,
}

impl StatusState {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusState::Pending => "pending",
            StatusState::Success => "success",
            StatusState::Failure => "failure",
            StatusState::Error => "error",
        }
    }
}

/// The JSON body of `POST /repos/{owner}/{repo}/statuses/{sha}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: StatusState,
    pub description: String,
    pub context: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_url: Option<String>,
}

/// How far along a sync a status is; a later phase of the same event replaces an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Queued = 0,
    Started = 1,
    Finished = 2,
}

/// Orders statuses of one (repository, commit, context): a later event wins, then a later phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OrderKey {
    pub event_seq: u64,
    pub phase: Phase,
}

/// One status to post, with what orders it against others on the same commit and context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStatus {
    /// `owner/repo`.
    pub repository: String,
    pub commit: String,
    pub order: OrderKey,
    pub status: Status,
    /// The event the status is about, for the log and for a dead letter.
    pub event_id: String,
}

/// Why a message asks for no status at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// No commit to attach a status to (error before checkout, deleted branch).
    NoCommit,
    /// Neither the event nor `GITHUB_REPO` names a repository.
    NoRepository,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoCommit => "no_commit",
            SkipReason::NoRepository => "no_repository",
        }
    }
}

/// What to post for one message.
pub type Plan = Result<Vec<PlannedStatus>, SkipReason>;

/// The settings that shape statuses (`STATUS_*`, `GITHUB_REPO`).
#[derive(Debug, Clone)]
pub struct StatusSettings {
    /// Context of the whole-sync status, `IaC Runner / Sync` by default.
    pub context: String,
    /// Also post one status per service.
    pub per_service: bool,
    /// `target_url` template with `{commit}`, `{repository}`, `{event_id}`.
    pub target_url: Option<String>,
    /// Repository used when an event does not name one.
    pub default_repository: Option<String>,
    /// `PUSH_ENV`: results in another environment name it in their contexts.
    pub push_env: Option<String>,
    /// With `PUBLIC_URL`: every status links to its run page, in place of `target_url`.
    pub run_links: Option<crate::web::RunLinks>,
}

impl StatusSettings {
    /// ` (staging)` for a result in an environment other than the push environment, so its
    /// statuses stand beside those of pushes instead of replacing them; empty otherwise.
    pub fn env_suffix(&self, env: Option<&str>) -> String {
        match env {
            Some(env) if Some(env) != self.push_env.as_deref() => format!(" ({env})"),
            _ => String::new(),
        }
    }

    /// `IaC Runner / {service}`: the whole-sync context with its last part replaced.
    pub fn service_context(&self, service: &str) -> String {
        let prefix = self
            .context
            .rsplit_once(" / ")
            .map_or(self.context.as_str(), |(prefix, _)| prefix);
        format!("{prefix} / {service}")
    }

    /// The link, with the event id percent-encoded: unlike the repository and the commit,
    /// which are checked to be URL-safe, it is whatever delivery id the request carried.
    pub(crate) fn target_url(
        &self,
        repository: &str,
        commit: &str,
        event_id: &str,
    ) -> Option<String> {
        if let Some(links) = &self.run_links {
            return Some(links.url(event_id));
        }
        self.target_url.as_ref().map(|template| {
            let event_id = utf8_percent_encode(event_id, URL_COMPONENT).to_string();
            template
                .replace("{commit}", commit)
                .replace("{repository}", repository)
                .replace("{event_id}", &event_id)
        })
    }

    fn repository(&self, event: Option<&str>) -> Result<String, SkipReason> {
        event
            .filter(|r| is_valid_repository(r))
            .or(self.default_repository.as_deref())
            .map(str::to_string)
            .ok_or(SkipReason::NoRepository)
    }
}

/// `owner/repo` made of the characters GitHub allows.
pub fn is_valid_repository(repository: &str) -> bool {
    let mut parts = repository.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    [owner, name].iter().all(|part| {
        !part.is_empty()
            && part != &"."
            && part != &".."
            && part.len() <= 100
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    })
}

/// A commit id that can go into a URL path: 7 to 64 hex digits, not all zeros.
pub fn is_postable_commit(commit: &str) -> bool {
    (7..=64).contains(&commit.len())
        && commit.bytes().all(|b| b.is_ascii_hexdigit())
        && !is_null_commit(commit)
}

struct Builder<'a> {
    settings: &'a StatusSettings,
    /// Appended to every context (see [`StatusSettings::env_suffix`]).
    env_suffix: String,
    repository: String,
    commit: String,
    event_id: &'a str,
    order: OrderKey,
}

impl Builder<'_> {
    fn new<'a>(
        settings: &'a StatusSettings,
        repository: Option<&str>,
        commit: Option<&str>,
        event_id: &'a str,
        order: OrderKey,
    ) -> Result<Builder<'a>, SkipReason> {
        let commit = commit
            .filter(|c| is_postable_commit(c))
            .ok_or(SkipReason::NoCommit)?;
        Ok(Builder {
            env_suffix: String::new(),
            repository: settings.repository(repository)?,
            commit: commit.to_string(),
            settings,
            event_id,
            order,
        })
    }

    fn status(&self, context: String, state: StatusState, description: &str) -> PlannedStatus {
        PlannedStatus {
            repository: self.repository.clone(),
            commit: self.commit.clone(),
            order: self.order,
            status: Status {
                state,
                description: truncate_chars(description, MAX_DESCRIPTION_CHARS),
                context,
                target_url: self
                    .settings
                    .target_url(&self.repository, &self.commit, self.event_id),
            },
            event_id: self.event_id.to_string(),
        }
    }

    fn in_env(self, env: Option<&str>) -> Self {
        Builder {
            env_suffix: self.settings.env_suffix(env),
            ..self
        }
    }

    fn sync(&self, state: StatusState, description: &str) -> PlannedStatus {
        let context = format!("{}{}", self.settings.context, self.env_suffix);
        self.status(context, state, description)
    }

    fn service(&self, service: &str, state: StatusState, description: &str) -> PlannedStatus {
        let context = format!(
            "{}{}",
            self.settings.service_context(service),
            self.env_suffix
        );
        self.status(context, state, description)
    }
}

/// A stored push: `pending` "Queued" on `after` (else `head_commit`).
pub fn for_push(
    push: &PushEvent,
    event_id: &str,
    stream_seq: u64,
    settings: &StatusSettings,
) -> Plan {
    let commit = push.status_commit();
    let order = OrderKey {
        event_seq: stream_seq,
        phase: Phase::Queued,
    };
    let b = Builder::new(
        settings,
        push.repository.as_deref(),
        commit,
        event_id,
        order,
    )?;
    Ok(vec![b.sync(StatusState::Pending, QUEUED_DESCRIPTION)])
}

/// A started sync: `pending` "Syncing N service(s)..." (and "Syncing..." per service).
pub fn for_started(started: &SyncStarted, settings: &StatusSettings) -> Plan {
    let order = OrderKey {
        event_seq: started.event_seq,
        phase: Phase::Started,
    };
    let b = Builder::new(
        settings,
        started.repository.as_deref(),
        Some(&started.commit),
        &started.event_id,
        order,
    )?
    .in_env(started.env.as_deref());
    let description = format!("Syncing {} service(s)...", started.services.len());
    let mut plan = vec![b.sync(StatusState::Pending, &description)];
    if settings.per_service {
        plan.extend(
            started
                .services
                .iter()
                .map(|s| b.service(s, StatusState::Pending, "Syncing...")),
        );
    }
    Ok(plan)
}

/// A finished sync: `success`, `failure` with the count of failed services, or `error` with
/// the reason (and each service's own outcome).
pub fn for_finished(finished: &SyncFinished, settings: &StatusSettings) -> Plan {
    let order = OrderKey {
        event_seq: finished.event_seq,
        phase: Phase::Finished,
    };
    let b = Builder::new(
        settings,
        finished.repository.as_deref(),
        finished.commit.as_deref(),
        &finished.event_id,
        order,
    )?
    .in_env(finished.env.as_deref());
    let (state, description) = finished_summary(finished);
    let mut plan = vec![b.sync(state, &description)];
    if settings.per_service {
        plan.extend(finished.services.iter().map(|r| {
            let (state, description) = service_summary(r);
            b.service(&r.service, state, &description)
        }));
    }
    Ok(plan)
}

fn finished_summary(finished: &SyncFinished) -> (StatusState, String) {
    let totals = &finished.totals;
    if let Some(by) = &finished.superseded_by {
        // Not synced on its own: it ends as the newer push's sync that covered it ended.
        let state = match finished.state {
            FinishedState::Success => StatusState::Success,
            FinishedState::Failure => StatusState::Failure,
            FinishedState::Error => StatusState::Error,
        };
        let short = by.get(..8).unwrap_or(by);
        return (state, format!("Superseded: synced as part of {short}"));
    }
    match finished.state {
        FinishedState::Error => (
            StatusState::Error,
            finished
                .error
                .clone()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| "The sync could not run".to_string()),
        ),
        FinishedState::Failure => (
            StatusState::Failure,
            format!(
                "{}/{} service(s) failed to sync",
                totals.not_synced(),
                totals.total
            ),
        ),
        FinishedState::Success if totals.total == 0 => (
            StatusState::Success,
            "No services required sync".to_string(),
        ),
        FinishedState::Success => (
            StatusState::Success,
            format!("{} service(s) synced successfully", totals.total),
        ),
    }
}

/// The state and description of one service's status.
pub(crate) fn service_summary(result: &ServiceResult) -> (StatusState, String) {
    match (result.outcome, result.exit_code) {
        (SyncOutcome::Synced, _) => (StatusState::Success, "Synced".to_string()),
        (SyncOutcome::Failed, Some(code)) => (
            StatusState::Failure,
            format!("Failed with exit code {code}"),
        ),
        (SyncOutcome::Failed, None) => (StatusState::Failure, "Failed".to_string()),
        (SyncOutcome::TimedOut, _) => (StatusState::Failure, "Failed: timed out".to_string()),
        (SyncOutcome::Unknown, _) => (StatusState::Failure, "Failed: unknown service".to_string()),
        (SyncOutcome::NotFinished, _) => (
            StatusState::Error,
            "Not finished: the sync was given up".to_string(),
        ),
        // It never ran: an error, like a sync that could not run, with the worker's
        // "Blocked: platform/postgres failed".
        (SyncOutcome::Blocked, _) => (
            StatusState::Error,
            result
                .output_tail
                .first()
                .filter(|line| line.starts_with("Blocked: "))
                .cloned()
                .unwrap_or_else(|| "Blocked: a service it comes after did not sync".to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iac_shared::events::{Totals, Trigger};

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn settings() -> StatusSettings {
        StatusSettings {
            context: "IaC Runner / Sync".into(),
            per_service: false,
            target_url: None,
            default_repository: None,
            push_env: Some("production".into()),
            run_links: None,
        }
    }

    fn push(after: Option<&str>, head: Option<&str>) -> PushEvent {
        PushEvent {
            delivery_id: "d-1".into(),
            repository: Some("acme/infra".into()),
            git_ref: "refs/heads/main".into(),
            before: None,
            after: after.map(str::to_string),
            head_commit: head.map(str::to_string),
            pusher: None,
            paths: vec![],
            paths_truncated: false,
        }
    }

    fn started(services: &[&str]) -> SyncStarted {
        SyncStarted {
            event_id: "e-1".into(),
            event_seq: 7,
            trigger: Trigger::Push,
            repository: Some("acme/infra".into()),
            commit: SHA.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            reasons: Default::default(),
            replay_of: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            env: None,
            deployment_id: None,
        }
    }

    fn result(service: &str, outcome: SyncOutcome, exit_code: Option<i32>) -> ServiceResult {
        ServiceResult {
            service: service.into(),
            task: None,
            outcome,
            exit_code,
            output_tail: vec![],
            duration_ms: 1,
            reason: None,
        }
    }

    fn finished(state: FinishedState, services: Vec<ServiceResult>) -> SyncFinished {
        SyncFinished {
            event_id: "e-1".into(),
            event_seq: 7,
            trigger: Trigger::Push,
            repository: Some("acme/infra".into()),
            commit: Some(SHA.into()),
            state,
            totals: Totals::of(&services),
            services,
            error: None,
            duration_ms: 1,
            replay_of: None,
            finished_at: "2026-01-01T00:00:00Z".into(),
            env: None,
            deployment_id: None,
            superseded_by: None,
        }
    }

    fn only(plan: Plan) -> PlannedStatus {
        let mut statuses = plan.unwrap();
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        statuses.remove(0)
    }

    #[test]
    fn a_push_is_queued_on_its_after_commit_ordered_by_its_stream_sequence() {
        let planned = only(for_push(&push(Some(SHA), None), "d-1", 42, &settings()));
        assert_eq!(planned.repository, "acme/infra");
        assert_eq!(planned.commit, SHA);
        assert_eq!(planned.status.state, StatusState::Pending);
        assert_eq!(planned.status.description, QUEUED_DESCRIPTION);
        assert_eq!(planned.status.context, "IaC Runner / Sync");
        assert_eq!(
            planned.order,
            OrderKey {
                event_seq: 42,
                phase: Phase::Queued
            }
        );
    }

    #[test]
    fn a_push_without_after_uses_head_commit_and_without_either_posts_nothing() {
        let zeros = "0".repeat(40);
        let planned = only(for_push(
            &push(Some(&zeros), Some(SHA)),
            "d",
            1,
            &settings(),
        ));
        assert_eq!(planned.commit, SHA);
        assert_eq!(
            for_push(&push(None, None), "d", 1, &settings()),
            Err(SkipReason::NoCommit)
        );
    }

    #[test]
    fn started_says_how_many_services_are_syncing() {
        let planned = only(for_started(&started(&["a/b", "c/d"]), &settings()));
        assert_eq!(planned.status.state, StatusState::Pending);
        assert_eq!(planned.status.description, "Syncing 2 service(s)...");
        assert_eq!(planned.order.phase, Phase::Started);
    }

    #[test]
    fn finished_states_map_to_github_states_and_counts() {
        let ok = finished(
            FinishedState::Success,
            vec![result("a/b", SyncOutcome::Synced, Some(0))],
        );
        let planned = only(for_finished(&ok, &settings()));
        assert_eq!(planned.status.state, StatusState::Success);
        assert_eq!(
            planned.status.description,
            "1 service(s) synced successfully"
        );

        let failed = finished(
            FinishedState::Failure,
            vec![
                result("a/b", SyncOutcome::Synced, Some(0)),
                result("c/d", SyncOutcome::Failed, Some(2)),
                result("e/f", SyncOutcome::TimedOut, None),
            ],
        );
        let planned = only(for_finished(&failed, &settings()));
        assert_eq!(planned.status.state, StatusState::Failure);
        assert_eq!(planned.status.description, "2/3 service(s) failed to sync");

        let nothing = finished(FinishedState::Success, vec![]);
        assert_eq!(
            only(for_finished(&nothing, &settings())).status.description,
            "No services required sync"
        );

        let mut error = finished(FinishedState::Error, vec![]);
        error.error = Some("git fetch failed: no route to host".into());
        let planned = only(for_finished(&error, &settings()));
        assert_eq!(planned.status.state, StatusState::Error);
        assert_eq!(
            planned.status.description,
            "git fetch failed: no route to host"
        );
    }

    #[test]
    fn a_superseded_push_ends_as_the_sync_that_covered_it_and_says_which() {
        let mut covered = finished(FinishedState::Failure, vec![]);
        covered.superseded_by = Some("89abcdef0123456789abcdef0123456789abcdef".into());
        let planned = only(for_finished(&covered, &settings()));
        assert_eq!(planned.status.state, StatusState::Failure);
        assert_eq!(
            planned.status.description,
            "Superseded: synced as part of 89abcdef"
        );
    }

    #[test]
    fn a_result_without_a_commit_or_repository_posts_nothing() {
        let mut error = finished(FinishedState::Error, vec![]);
        error.commit = None;
        assert_eq!(for_finished(&error, &settings()), Err(SkipReason::NoCommit));
        let mut anonymous = started(&[]);
        anonymous.repository = None;
        assert_eq!(
            for_started(&anonymous, &settings()),
            Err(SkipReason::NoRepository)
        );
        let fallback = StatusSettings {
            default_repository: Some("acme/fallback".into()),
            ..settings()
        };
        assert_eq!(
            only(for_started(&anonymous, &fallback)).repository,
            "acme/fallback"
        );
    }

    #[test]
    fn long_descriptions_are_cut_to_140_whole_characters() {
        let mut error = finished(FinishedState::Error, vec![]);
        error.error = Some("é".repeat(200));
        let description = only(for_finished(&error, &settings())).status.description;
        assert_eq!(description.chars().count(), 140);
        assert!(description.chars().all(|c| c == 'é'));
    }

    #[test]
    fn results_in_another_environment_than_pushes_name_it_in_their_contexts() {
        let per_service = StatusSettings {
            per_service: true,
            ..settings()
        };
        let in_env = |env: Option<&str>| SyncStarted {
            env: env.map(str::to_string),
            trigger: Trigger::Deploy,
            ..started(&["platform/redis"])
        };
        let plan = for_started(&in_env(Some("staging")), &per_service).unwrap();
        assert_eq!(plan[0].status.context, "IaC Runner / Sync (staging)");
        assert_eq!(
            plan[1].status.context,
            "IaC Runner / platform/redis (staging)"
        );
        let plan = for_started(&in_env(Some("production")), &per_service).unwrap();
        assert_eq!(plan[0].status.context, "IaC Runner / Sync");
        let plan = for_started(&in_env(None), &per_service).unwrap();
        assert_eq!(plan[0].status.context, "IaC Runner / Sync");
        // With `PUSH_ENV=` every named environment is named.
        let no_push_env = StatusSettings {
            push_env: None,
            ..per_service
        };
        let plan = for_started(&in_env(Some("production")), &no_push_env).unwrap();
        assert_eq!(plan[0].status.context, "IaC Runner / Sync (production)");
    }

    #[test]
    fn per_service_contexts_carry_each_services_outcome() {
        let per_service = StatusSettings {
            per_service: true,
            ..settings()
        };
        let plan = for_started(&started(&["platform/postgres"]), &per_service).unwrap();
        assert_eq!(plan[1].status.context, "IaC Runner / platform/postgres");
        assert_eq!(plan[1].status.description, "Syncing...");

        let done = finished(
            FinishedState::Failure,
            vec![
                result("platform/postgres", SyncOutcome::Synced, Some(0)),
                result("platform/redis", SyncOutcome::Failed, Some(3)),
                result("platform/kafka", SyncOutcome::TimedOut, None),
                result("platform/nope", SyncOutcome::Unknown, None),
                result("platform/kafka2", SyncOutcome::NotFinished, None),
                ServiceResult {
                    output_tail: vec!["Blocked: platform/postgres failed".into()],
                    ..result("platform/app", SyncOutcome::Blocked, None)
                },
            ],
        );
        let plan = for_finished(&done, &per_service).unwrap();
        let summary: Vec<_> = plan[1..]
            .iter()
            .map(|p| (p.status.state, p.status.description.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (StatusState::Success, "Synced"),
                (StatusState::Failure, "Failed with exit code 3"),
                (StatusState::Failure, "Failed: timed out"),
                (StatusState::Failure, "Failed: unknown service"),
                (StatusState::Error, "Not finished: the sync was given up"),
                (StatusState::Error, "Blocked: platform/postgres failed"),
            ]
        );
    }

    #[test]
    fn the_target_url_template_is_filled_in() {
        let with_url = StatusSettings {
            target_url: Some("https://ci.example/{repository}/{commit}?e={event_id}".into()),
            ..settings()
        };
        let planned = only(for_started(&started(&[]), &with_url));
        assert_eq!(
            planned.status.target_url.as_deref(),
            Some(format!("https://ci.example/acme/infra/{SHA}?e=e-1").as_str())
        );
        let body =
            serde_json::to_value(&only(for_started(&started(&[]), &settings())).status).unwrap();
        assert!(body.get("target_url").is_none(), "{body}");
    }

    #[test]
    fn an_event_id_cannot_bend_the_target_url() {
        let with_url = StatusSettings {
            target_url: Some("https://ci.example/events/{event_id}?r={repository}".into()),
            ..settings()
        };
        let url = with_url.target_url("acme/infra", SHA, "a b?c&d#e/../f%");
        assert_eq!(
            url.as_deref(),
            Some("https://ci.example/events/a%20b%3Fc%26d%23e%2F..%2Ff%25?r=acme/infra")
        );
        let uuid = "72d3162e-cc78-11e3-81ab-4c9367dc0958";
        assert_eq!(
            with_url.target_url("acme/infra", SHA, uuid).as_deref(),
            Some(format!("https://ci.example/events/{uuid}?r=acme/infra").as_str())
        );
    }

    #[test]
    fn order_keys_compare_by_event_then_phase() {
        let key = |event_seq, phase| OrderKey { event_seq, phase };
        assert!(key(1, Phase::Finished) < key(2, Phase::Queued));
        assert!(key(2, Phase::Queued) < key(2, Phase::Started));
        assert!(key(2, Phase::Started) < key(2, Phase::Finished));
    }

    #[test]
    fn repositories_and_commits_that_would_bend_the_url_are_refused() {
        assert!(is_valid_repository("acme/infra.git-x_1"));
        for bad in ["acme", "acme/", "a/b/c", "acme/..", "acme/in fra", "../x"] {
            assert!(!is_valid_repository(bad), "{bad}");
        }
        assert!(is_postable_commit(SHA));
        assert!(!is_postable_commit("main"));
        assert!(!is_postable_commit("abc/../x"));
    }
}
