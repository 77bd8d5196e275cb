//! The worker's decisions, as pure functions over plain types: which event a message is,
//! which commit to check out, which services to run, and what the results say.

use iac_shared::dependencies::{Dependencies, Reason};
use iac_shared::deploy::{
    DeployRequest, DeploymentResult, DeploymentStatus, DeploymentSummary, ServiceSummary,
    env_of_subject, is_deployment_id, is_exact_commit,
};
use iac_shared::events::{
    FinishedState, PushEvent, RequestError, ServiceResult, SyncFinished, SyncOutcome, SyncRequest,
    SyncStarted, TaskStarted, Totals, Trigger, is_null_commit, now_rfc3339,
};
use iac_shared::names::{PUSH_SUBJECT, SYNC_SUBJECT};
use iac_shared::rules::{FanOut, Rules, Service};
use iac_shared::runtime::Envelope;
use std::time::Duration;

use crate::task::TaskEnd;

/// Where a delivered event came from and how it asks to be handled (from its headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event_id: String,
    pub subject: String,
    /// Sequence of the event in `IAC_EVENTS`.
    pub seq: u64,
    /// Which delivery of the event this is (1 for the first).
    pub delivered: i64,
    pub replay_of: Option<u64>,
    /// `Iac-Force: true`: run tasks even where they would be skipped.
    pub force: bool,
}

impl From<Envelope> for Delivery {
    /// A message published by hand without an id header gets `seq-<seq>`.
    fn from(envelope: Envelope) -> Self {
        Delivery {
            event_id: envelope
                .event_id
                .unwrap_or_else(|| format!("seq-{}", envelope.seq)),
            subject: envelope.subject,
            seq: envelope.seq,
            delivered: envelope.delivered,
            replay_of: envelope.replay_of,
            force: envelope.force,
        }
    }
}

impl Delivery {
    /// Reads the event id (`Iac-Event-Id`, else `Nats-Msg-Id`, else `seq-<seq>` for messages
    /// published by hand), `Iac-Replay-Of` and `Iac-Force` through `header`.
    pub fn new(
        subject: &str,
        seq: u64,
        delivered: i64,
        header: impl Fn(&str) -> Option<String>,
    ) -> Self {
        Envelope::read(subject, seq, delivered, header).into()
    }

    /// True on the delivery after the last allowed attempt: report giving up, do not run.
    pub fn attempts_exhausted(&self, max_attempts: i64) -> bool {
        self.delivered > max_attempts
    }
}

/// An event the worker can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Push(PushEvent),
    Sync(SyncRequest),
    Deploy(DeployRequest),
}

/// Why a message is not an event the worker can act on (never retried).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("Unknown event subject {0:?}")]
    UnknownSubject(String),
    #[error("Malformed push event: {0}")]
    BadPush(String),
    #[error("Invalid sync request: {0}")]
    BadRequest(#[from] RequestError),
    #[error("Invalid deployment: {0}")]
    BadDeploy(String),
}

/// Parses a message by its subject.
pub fn parse_event(subject: &str, payload: &[u8]) -> Result<Event, EventError> {
    match subject {
        PUSH_SUBJECT => serde_json::from_slice::<PushEvent>(payload)
            .map(Event::Push)
            .map_err(|e| EventError::BadPush(e.to_string())),
        SYNC_SUBJECT => Ok(Event::Sync(SyncRequest::parse(payload)?)),
        other if env_of_subject(other).is_some() => {
            parse_deploy(env_of_subject(other).unwrap_or_default(), payload).map(Event::Deploy)
        }
        other => Err(EventError::UnknownSubject(
            iac_shared::events::truncate_chars(other, 200),
        )),
    }
}

/// A deployment stored on the subject of `env`: well formed, for that environment, an exact
/// commit.
fn parse_deploy(env: &str, payload: &[u8]) -> Result<DeployRequest, EventError> {
    let bad = |reason: String| EventError::BadDeploy(reason);
    let request: DeployRequest = serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
    if request.env != env {
        return Err(bad(format!(
            "env {:?} stored on the subject of {env:?}",
            iac_shared::events::truncate_chars(&request.env, 40)
        )));
    }
    if !is_exact_commit(&request.commit) {
        return Err(bad(format!(
            "ref {:?} is not an exact commit (40 lowercase hex digits)",
            iac_shared::events::truncate_chars(&request.commit, 60)
        )));
    }
    if !is_deployment_id(&request.deployment_id) {
        return Err(bad("deployment_id is not 16 lowercase hex digits".into()));
    }
    if request.services.is_empty() {
        return Err(bad("no services named".into()));
    }
    Ok(request)
}

/// The deployment a refused message on a deploy subject was, when it still names one of that
/// environment (a deployment with a bad commit): its summary must end `failed`. A request for
/// another environment names no summary this consumer may touch.
pub fn refused_deployment(subject: &str, payload: &[u8]) -> Option<DeployRequest> {
    let env = env_of_subject(subject)?;
    serde_json::from_slice::<DeployRequest>(payload)
        .ok()
        .filter(|request| request.env == env && is_deployment_id(&request.deployment_id))
}

/// The final summary of `request` once `finished` is stored: `completed` when it succeeded,
/// else `failed`; the result without any task output. What the accepting gateway wrote
/// (`accepted_at`, `triggered_by`, the requested services) is kept from `previous`.
pub fn final_summary(
    request: &DeployRequest,
    finished: &SyncFinished,
    previous: Option<&DeploymentSummary>,
) -> DeploymentSummary {
    let success = finished.state == FinishedState::Success;
    let now = now_rfc3339();
    DeploymentSummary {
        status: if success {
            DeploymentStatus::Completed
        } else {
            DeploymentStatus::Failed
        },
        deployment_id: request.deployment_id.clone(),
        env: request.env.clone(),
        commit: request.commit.clone(),
        triggered_by: previous
            .and_then(|p| p.triggered_by.clone())
            .or_else(|| request.triggered_by.clone()),
        requested_services: previous
            .map(|p| p.requested_services.clone())
            .unwrap_or_else(|| request.services.clone()),
        accepted_at: previous.map_or_else(|| now.clone(), |p| p.accepted_at.clone()),
        updated_at: now,
        result: Some(DeploymentResult {
            success,
            commit: finished.commit.clone(),
            services: finished.services.iter().map(ServiceSummary::from).collect(),
            error: finished.error.clone(),
            duration_ms: finished.duration_ms,
        }),
    }
}

/// The commit a sync must check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The deployed branch's head at the time the sync runs.
    BranchHead,
    /// A full commit id a push named, fetched by id when the branch no longer holds it.
    Commit(String),
    /// What a manual request or a deployment names (the branch, a tag, a commit id): run only
    /// when its commit is on the branch or on a tag matching `DEPLOY_TAG_PATTERN`.
    Ref(String),
}

/// What triggered a message; unparseable messages count as manual.
pub fn trigger_of(subject: &str) -> Trigger {
    if subject == PUSH_SUBJECT {
        Trigger::Push
    } else if env_of_subject(subject).is_some() {
        Trigger::Deploy
    } else {
        Trigger::Sync
    }
}

impl Event {
    pub fn trigger(&self) -> Trigger {
        match self {
            Event::Push(_) => Trigger::Push,
            Event::Sync(_) => Trigger::Sync,
            Event::Deploy(_) => Trigger::Deploy,
        }
    }

    /// `after` for a push (the branch head when it named none), `ref` for a manual sync.
    pub fn target(&self) -> Target {
        match self {
            Event::Push(push) => match push.after.as_deref() {
                Some(after) if !after.is_empty() && !is_null_commit(after) => {
                    Target::Commit(after.to_string())
                }
                _ => Target::BranchHead,
            },
            Event::Sync(request) => match request.git_ref.as_deref() {
                Some(r) if r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Target::Ref(r.to_ascii_lowercase())
                }
                Some(r) => Target::Ref(r.to_string()),
                None => Target::BranchHead,
            },
            Event::Deploy(request) => Target::Ref(request.commit.clone()),
        }
    }

    /// The repository results name: the push's, else the one derived from `GIT_REPO_URL`.
    pub fn repository(&self, configured: Option<&str>) -> Option<String> {
        match self {
            Event::Push(PushEvent {
                repository: Some(repository),
                ..
            }) => Some(repository.clone()),
            _ => configured.map(str::to_string),
        }
    }

    pub fn force(&self) -> bool {
        match self {
            Event::Sync(request) => request.force,
            Event::Deploy(request) => request.force,
            Event::Push(_) => false,
        }
    }

    /// The deployment this event is, if it is one.
    pub fn deployment(&self) -> Option<&DeployRequest> {
        match self {
            Event::Deploy(request) => Some(request),
            _ => None,
        }
    }
}

/// The services a push runs, each with why, and the changed paths that select nothing.
///
/// `git_diff` holds the paths git reports between `before` and the checked-out commit; it is
/// `None` when git cannot tell (new branch, or `before` unknown after a force push). Then the
/// payload's paths are used, unless they were cut short: then every discovered service runs.
/// `deps` are the declared dependencies, when there are any (see [`Rules::fan_out`]).
pub fn push_services(
    push: &PushEvent,
    git_diff: Option<&[String]>,
    rules: &Rules,
    discovered: &[Service],
    deps: Option<&Dependencies>,
) -> FanOut {
    let paths: &[String] = match git_diff {
        Some(paths) => paths,
        None if push.paths_truncated => {
            let why = "the push listed too many paths to tell which changed";
            return FanOut {
                selected: every(discovered, Reason::All(Some(why.into()))),
                unselected: Vec::new(),
            };
        }
        None => &push.paths,
    };
    rules.fan_out(paths.iter().map(String::as_str), discovered, deps)
}

/// The paths a push's services are chosen from: git's diff from the push's `before` joined
/// with git's diff from the environment's applied head (`None` when that head is the commit
/// itself or not one of its ancestors), so a service changed in a push that was never synced
/// is still synced. Each path once, in the order first seen; `None` when git can tell neither.
/// When only the applied diff is known, the payload's own paths are joined too.
pub fn joined_diff(
    push: &PushEvent,
    from_before: Option<Vec<String>>,
    from_applied: Option<Vec<String>>,
) -> Option<Vec<String>> {
    let (first, second) = match (from_before, from_applied) {
        (None, None) => return None,
        (Some(before), None) => return Some(before),
        (Some(before), Some(applied)) => (before, applied),
        (None, Some(applied)) if push.paths_truncated => return Some(applied),
        (None, Some(applied)) => (push.paths.clone(), applied),
    };
    let mut seen = std::collections::HashSet::with_capacity(first.len() + second.len());
    Some(
        first
            .into_iter()
            .chain(second)
            .filter(|path| seen.insert(path.clone()))
            .collect(),
    )
}

/// The push synced in place of `in_hand` and the pushes queued behind it up to `newest`: the
/// newest commit, diffed from the oldest `before`, with every skipped push's paths (cut short
/// when any was).
pub fn merged_push(in_hand: &PushEvent, skipped: &[&PushEvent], newest: &PushEvent) -> PushEvent {
    let mut seen = std::collections::HashSet::new();
    let paths = std::iter::once(in_hand)
        .chain(skipped.iter().copied())
        .chain(std::iter::once(newest))
        .flat_map(|push| push.paths.iter())
        .filter(|path| seen.insert(path.as_str()))
        .cloned()
        .collect();
    let truncated = std::iter::once(in_hand)
        .chain(skipped.iter().copied())
        .chain(std::iter::once(newest))
        .any(|push| push.paths_truncated);
    PushEvent {
        before: in_hand.before.clone(),
        paths,
        paths_truncated: truncated,
        ..newest.clone()
    }
}

fn every(discovered: &[Service], reason: Reason) -> Vec<(Service, Reason)> {
    discovered
        .iter()
        .map(|s| (s.clone(), reason.clone()))
        .collect()
}

/// The services a manual request runs, in key order, each with why, and the keys it named
/// that do not exist.
pub fn requested_services(
    request: &SyncRequest,
    discovered: &[Service],
) -> (Vec<(Service, Reason)>, Vec<String>) {
    if request.all {
        return (every(discovered, Reason::All(None)), Vec::new());
    }
    let mut keys: Vec<&str> = request.services.iter().map(String::as_str).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for key in keys {
        match discovered.iter().find(|s| s.key == key) {
            Some(service) => found.push((service.clone(), Reason::Manual)),
            None => unknown.push(key.to_string()),
        }
    }
    (found, unknown)
}

/// The services a deployment runs, in key order, and the names it gave that match no service.
///
/// A name is a `layer/name` key, or the original runner's short name (`redis`) when exactly one
/// service has it; a short name several services share is reported unknown, as is a name no
/// service has.
pub fn deploy_services(
    request: &DeployRequest,
    discovered: &[Service],
) -> (Vec<(Service, Reason)>, Vec<String>) {
    if request.all() {
        return (every(discovered, Reason::All(None)), Vec::new());
    }
    let mut found: Vec<(Service, Reason)> = Vec::new();
    let mut unknown = Vec::new();
    for name in &request.services {
        let by_key = discovered.iter().find(|s| s.key == *name);
        let mut by_short = discovered.iter().filter(|s| short_name(&s.key) == name);
        let service = by_key.or_else(|| match (by_short.next(), by_short.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        });
        match service {
            Some(service) if !found.iter().any(|(s, _)| s.key == service.key) => {
                found.push((service.clone(), Reason::Manual))
            }
            Some(_) => {}
            None => unknown.push(name.clone()),
        }
    }
    found.sort_by(|(a, _), (b, _)| a.key.cmp(&b.key));
    (found, unknown)
}

/// The original runner's name of a service: its key without the layer (`platform/redis` →
/// `redis`).
fn short_name(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(_, name)| name)
}

/// The result a task end reports.
pub fn service_result(service: &Service, end: TaskEnd, duration: Duration) -> ServiceResult {
    let (outcome, exit_code, output_tail) = match end {
        TaskEnd::Exited { code: Some(0), .. } => (SyncOutcome::Synced, Some(0), Vec::new()),
        TaskEnd::Exited { code, tail } => (SyncOutcome::Failed, code, tail),
        TaskEnd::TimedOut { tail } => (SyncOutcome::TimedOut, None, tail),
        TaskEnd::CannotStart(reason) | TaskEnd::Refused(reason) => {
            (SyncOutcome::Failed, None, vec![reason])
        }
        TaskEnd::Interrupted => (SyncOutcome::Failed, None, vec!["interrupted".into()]),
    };
    ServiceResult {
        service: service.key.clone(),
        task: Some(service.task.clone()),
        outcome,
        exit_code,
        output_tail,
        duration_ms: duration.as_millis().try_into().unwrap_or(u64::MAX),
        reason: None,
    }
}

/// The result of a service that did not run because `by`, a service it comes after, ended
/// with `outcome`.
pub fn blocked_service(service: &Service, by: &str, outcome: SyncOutcome) -> ServiceResult {
    let what = match outcome {
        SyncOutcome::TimedOut => "timed out",
        SyncOutcome::Blocked => "was blocked",
        _ => "failed",
    };
    ServiceResult {
        service: service.key.clone(),
        task: Some(service.task.clone()),
        outcome: SyncOutcome::Blocked,
        exit_code: None,
        output_tail: vec![format!("Blocked: {by} {what}")],
        duration_ms: 0,
        reason: None,
    }
}

/// The result for a service a request named but the commit does not have.
pub fn unknown_service(key: &str) -> ServiceResult {
    ServiceResult {
        service: key.to_string(),
        task: None,
        outcome: SyncOutcome::Unknown,
        exit_code: None,
        output_tail: Vec::new(),
        duration_ms: 0,
        reason: Some(Reason::Manual.to_string()),
    }
}

/// Facts every result about one event repeats.
#[derive(Debug, Clone)]
pub struct ResultHeader {
    pub event_id: String,
    pub event_seq: u64,
    pub trigger: Trigger,
    pub repository: Option<String>,
    pub replay_of: Option<u64>,
    /// The commit a push's queued status is on: where an error before checkout is shown.
    pub status_commit: Option<String>,
    /// The environment the event deploys to (`None`: a push or sync with `PUSH_ENV=`).
    pub env: Option<String>,
    pub deployment_id: Option<String>,
}

impl ResultHeader {
    /// The header of results about `event` (`None` when it cannot be parsed); `configured` is
    /// the repository derived from `GIT_REPO_URL`, `env` the environment the consumer that
    /// delivered it serves.
    pub fn new(
        delivery: &Delivery,
        event: Option<&Event>,
        configured: Option<&str>,
        env: Option<&str>,
    ) -> Self {
        ResultHeader {
            event_id: delivery.event_id.clone(),
            event_seq: delivery.seq,
            trigger: event.map_or(trigger_of(&delivery.subject), Event::trigger),
            repository: match event {
                Some(event) => event.repository(configured),
                None => configured.map(str::to_string),
            },
            replay_of: delivery.replay_of,
            status_commit: match event {
                Some(Event::Push(push)) => push.status_commit().map(str::to_string),
                // A refused deployment's error is shown on the commit it named.
                Some(Event::Deploy(request)) => Some(request.commit.clone()),
                _ => None,
            },
            env: env.map(str::to_string),
            deployment_id: event
                .and_then(Event::deployment)
                .map(|d| d.deployment_id.clone()),
        }
    }

    pub fn started(
        &self,
        commit: &str,
        services: &[(Service, Reason)],
        unknown: &[String],
    ) -> SyncStarted {
        let mut keys: Vec<String> = services.iter().map(|(s, _)| s.key.clone()).collect();
        keys.extend(unknown.iter().cloned());
        let mut reasons: std::collections::BTreeMap<String, String> = services
            .iter()
            .map(|(s, reason)| (s.key.clone(), reason.to_string()))
            .collect();
        reasons.extend(
            unknown
                .iter()
                .map(|k| (k.clone(), Reason::Manual.to_string())),
        );
        SyncStarted {
            event_id: self.event_id.clone(),
            event_seq: self.event_seq,
            trigger: self.trigger,
            repository: self.repository.clone(),
            commit: commit.to_string(),
            services: keys,
            reasons,
            replay_of: self.replay_of,
            started_at: now_rfc3339(),
            env: self.env.clone(),
            deployment_id: self.deployment_id.clone(),
        }
    }

    /// One service's task starting at `commit`, selected for `reason`.
    pub fn task_started(&self, commit: &str, service: &Service, reason: &Reason) -> TaskStarted {
        TaskStarted {
            event_id: self.event_id.clone(),
            event_seq: self.event_seq,
            trigger: self.trigger,
            repository: self.repository.clone(),
            commit: commit.to_string(),
            service: service.key.clone(),
            task: service.task.clone(),
            reason: Some(reason.to_string()),
            replay_of: self.replay_of,
            started_at: now_rfc3339(),
            env: self.env.clone(),
            deployment_id: self.deployment_id.clone(),
        }
    }

    /// A sync that ran: its state follows from the services' outcomes.
    pub fn finished(
        &self,
        commit: &str,
        services: Vec<ServiceResult>,
        duration_ms: u64,
    ) -> SyncFinished {
        let totals = Totals::of(&services);
        SyncFinished {
            state: SyncFinished::state_of(&totals),
            commit: Some(commit.to_string()),
            services,
            totals,
            error: None,
            ..self.base(duration_ms)
        }
    }

    /// A sync that could not run, shown on `commit`, else on the push's own commit (so that
    /// its queued status does not stay pending).
    pub fn error(&self, commit: Option<&str>, reason: String, duration_ms: u64) -> SyncFinished {
        SyncFinished {
            commit: commit
                .map(str::to_string)
                .or_else(|| self.status_commit.clone()),
            error: Some(reason),
            ..self.base(duration_ms)
        }
    }

    /// A push not synced on its own: the sync of `by`, a newer push that descends from it,
    /// covered it. Shown on `commit` (else the push's own commit), ending as that sync ended.
    pub fn superseded(
        &self,
        commit: Option<&str>,
        by: &str,
        state: FinishedState,
        totals: Totals,
        duration_ms: u64,
    ) -> SyncFinished {
        SyncFinished {
            commit: commit
                .map(str::to_string)
                .or_else(|| self.status_commit.clone()),
            state,
            totals,
            superseded_by: Some(by.to_string()),
            ..self.base(duration_ms)
        }
    }

    /// An event given up after its last attempt. When an attempt got as far as `started`,
    /// the result is on that commit and names each started service as not finished, so that
    /// no status the attempt set to pending stays pending.
    pub fn given_up(
        &self,
        started: Option<&SyncStarted>,
        reason: String,
        duration_ms: u64,
    ) -> SyncFinished {
        let Some(started) = started else {
            return self.error(None, reason, duration_ms);
        };
        let services: Vec<ServiceResult> = started
            .services
            .iter()
            .map(|service| ServiceResult {
                service: service.clone(),
                task: None,
                outcome: SyncOutcome::NotFinished,
                exit_code: None,
                output_tail: Vec::new(),
                duration_ms: 0,
                reason: started.reasons.get(service).cloned(),
            })
            .collect();
        SyncFinished {
            totals: Totals::of(&services),
            services,
            ..self.error(Some(&started.commit), reason, duration_ms)
        }
    }

    fn base(&self, duration_ms: u64) -> SyncFinished {
        SyncFinished {
            event_id: self.event_id.clone(),
            event_seq: self.event_seq,
            trigger: self.trigger,
            repository: self.repository.clone(),
            commit: None,
            state: FinishedState::Error,
            services: Vec::new(),
            totals: Totals::default(),
            error: None,
            duration_ms,
            replay_of: self.replay_of,
            finished_at: now_rfc3339(),
            env: self.env.clone(),
            deployment_id: self.deployment_id.clone(),
            superseded_by: None,
        }
    }
}

/// The `error` text of an event given up after its last attempt.
pub fn gave_up_reason(max_attempts: i64) -> String {
    format!("gave up after {max_attempts} attempts")
}

/// Room left in a result message for its headers when a result is fitted to `max_payload`.
pub const RESULT_HEADER_ROOM: usize = 4096;
/// The payload limit assumed when the server has not told one (the NATS default).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Room kept in a cut tail for the line that says how many lines were cut.
const CUT_MARK_ROOM: usize = 96;
/// Room a non-empty `output_tail` field takes besides its lines (`,"output_tail":[]`).
const TAIL_FIELD_ROOM: usize = 24;

/// `finished`, cut to fit one NATS message of `max_payload` bytes (as the server announced,
/// `0` when unknown): a result that cannot be stored would be retried for ever and stall
/// every later event.
///
/// Output tails are cut first, from their oldest lines: each service gets an equal share of
/// the room, and a service whose tail is smaller than its share leaves the rest to the others.
/// A cut tail starts with a line saying how many lines were cut. A result that does not fit
/// even without its tails (thousands of services) becomes an error result without services.
pub fn fit_to_message(mut finished: SyncFinished, max_payload: usize) -> SyncFinished {
    let max_payload = if max_payload == 0 {
        DEFAULT_MAX_PAYLOAD
    } else {
        max_payload
    };
    let limit = max_payload.saturating_sub(RESULT_HEADER_ROOM);
    let size = json_len(&finished);
    if size <= limit {
        return finished;
    }
    let tails: Vec<Vec<String>> = finished
        .services
        .iter_mut()
        .map(|s| std::mem::take(&mut s.output_tail))
        .collect();
    let with_tails = tails.iter().filter(|t| !t.is_empty()).count();
    let room =
        limit.checked_sub(json_len(&finished) + with_tails * (TAIL_FIELD_ROOM + CUT_MARK_ROOM));
    if let Some(room) = room {
        let shares = fair_shares(&tails.iter().map(|t| tail_len(t)).collect::<Vec<_>>(), room);
        for ((service, tail), share) in finished.services.iter_mut().zip(tails).zip(shares) {
            service.output_tail = last_lines_within(tail, share);
        }
        if json_len(&finished) <= limit {
            return finished;
        }
    }
    too_large(finished, size, limit)
}

/// The result stored in place of one too large for a message even without output tails.
fn too_large(finished: SyncFinished, size: usize, limit: usize) -> SyncFinished {
    let reason = format!(
        "the result of this sync ({} services, {size} bytes) does not fit in one message of \
         {limit} bytes even without the tasks' output; the services' results are not stored",
        finished.services.len()
    );
    SyncFinished {
        state: FinishedState::Error,
        services: Vec::new(),
        totals: Totals::default(),
        error: Some(reason),
        ..finished
    }
}

/// How much of `room` each of `wants` gets: an equal share, where what a small want leaves
/// over goes to the larger ones.
fn fair_shares(wants: &[usize], room: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by_key(|&i| wants[i]);
    let mut shares = vec![0; wants.len()];
    let mut left = room;
    for (given, &i) in order.iter().enumerate() {
        let share = wants[i].min(left / (wants.len() - given));
        shares[i] = share;
        left -= share;
    }
    shares
}

/// The newest lines of `tail` whose JSON takes at most `room` bytes; when some are dropped,
/// a first line says how many. A last line larger than the room on its own is cut too.
fn last_lines_within(mut tail: Vec<String>, room: usize) -> Vec<String> {
    if tail_len(&tail) <= room {
        return tail;
    }
    if room < 64 {
        return vec![format!(
            "… [{} lines cut to fit the result in one message]",
            tail.len()
        )];
    }
    let mut used = 0;
    let mut first_kept = tail.len();
    while first_kept > 0 && used + line_len(&tail[first_kept - 1]) <= room {
        first_kept -= 1;
        used += line_len(&tail[first_kept]);
    }
    if first_kept == tail.len() {
        // Not even the newest line fits whole: keep its beginning.
        first_kept -= 1;
        let line = &mut tail[first_kept];
        let mark_room = 40;
        let mut kept = 0;
        let mut escaped = 0;
        for (i, c) in line.char_indices() {
            escaped += escaped_len(c);
            if escaped + mark_room + 3 > room {
                break;
            }
            kept = i + c.len_utf8();
        }
        let cut = line.len() - kept;
        line.truncate(kept);
        line.push_str(&format!("… [cut: {cut} bytes]"));
    }
    let dropped = first_kept;
    let mut kept = tail.split_off(first_kept);
    if dropped > 0 {
        kept.insert(
            0,
            format!("… [{dropped} earlier lines cut to fit the result in one message]"),
        );
    }
    kept
}

/// Bytes `tail` takes as a JSON array's elements (without the brackets).
fn tail_len(tail: &[String]) -> usize {
    tail.iter().map(|line| line_len(line)).sum()
}

/// Bytes `line` takes as a JSON string and the comma after it.
fn line_len(line: &str) -> usize {
    line.chars().map(escaped_len).sum::<usize>() + 3
}

/// Bytes `c` takes inside a JSON string, at most (control characters as `\u00XX`).
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

fn json_len(finished: &SyncFinished) -> usize {
    serde_json::to_vec(finished).map_or(usize::MAX, |json| json.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn push_of(before: &str, after: &str, paths: &[&str]) -> PushEvent {
        PushEvent {
            delivery_id: format!("d-{after}"),
            repository: None,
            git_ref: "refs/heads/main".into(),
            before: Some(before.into()),
            after: Some(after.into()),
            head_commit: Some(after.into()),
            pusher: None,
            paths: paths.iter().map(|p| p.to_string()).collect(),
            paths_truncated: false,
        }
    }

    fn owned(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_push_diffs_from_its_before_and_from_the_applied_head_alike() {
        let push = push_of("b", "c", &["payload/only"]);
        let joined = joined_diff(
            &push,
            Some(owned(&["platform/01.postgres/a", "shared/x"])),
            Some(owned(&["shared/x", "platform/02.redis/b"])),
        );
        assert_eq!(
            joined.unwrap(),
            ["platform/01.postgres/a", "shared/x", "platform/02.redis/b"]
        );
        assert_eq!(joined_diff(&push, None, None), None);
        assert_eq!(
            joined_diff(&push, Some(owned(&["a/b"])), None).unwrap(),
            ["a/b"]
        );
        // `before` unknown (force push): the payload's paths and the applied diff.
        assert_eq!(
            joined_diff(&push, None, Some(owned(&["a/b"]))).unwrap(),
            ["payload/only", "a/b"]
        );
        let cut = PushEvent {
            paths_truncated: true,
            ..push
        };
        assert_eq!(
            joined_diff(&cut, None, Some(owned(&["a/b"]))).unwrap(),
            ["a/b"]
        );
    }

    #[test]
    fn the_newest_push_is_synced_from_the_oldest_before_with_every_skipped_push_paths() {
        let in_hand = push_of("a", "b", &["platform/01.postgres/x"]);
        let skipped = push_of("b", "c", &["finance_report/finance_report/10.app/y"]);
        let mut newest = push_of("c", "d", &["platform/01.postgres/x", "platform/02.redis/z"]);
        newest.pusher = Some("octocat".into());
        let merged = merged_push(&in_hand, &[&skipped], &newest);
        assert_eq!(merged.before.as_deref(), Some("a"));
        assert_eq!(merged.after.as_deref(), Some("d"));
        assert_eq!(merged.delivery_id, "d-d");
        assert_eq!(merged.pusher.as_deref(), Some("octocat"));
        assert_eq!(
            merged.paths,
            [
                "platform/01.postgres/x",
                "finance_report/finance_report/10.app/y",
                "platform/02.redis/z"
            ]
        );
        assert!(!merged.paths_truncated);
        let cut = PushEvent {
            paths_truncated: true,
            ..skipped
        };
        assert!(merged_push(&in_hand, &[&cut], &newest).paths_truncated);
    }

    #[test]
    fn a_superseded_push_ends_on_its_own_commit_as_the_covering_sync_ended() {
        let delivery = Delivery::new(PUSH_SUBJECT, 7, 1, |_| Some("e-7".to_string()));
        let event = Event::Push(push_of("a", "b", &[]));
        let header = ResultHeader::new(
            &delivery,
            Some(&event),
            Some("acme/infra"),
            Some("production"),
        );
        let totals = Totals {
            total: 3,
            synced: 3,
            ..Totals::default()
        };
        let finished = header.superseded(None, "d", FinishedState::Success, totals, 5);
        assert_eq!(finished.commit.as_deref(), Some("b"));
        assert_eq!(finished.superseded_by.as_deref(), Some("d"));
        assert_eq!(
            (finished.state, finished.totals),
            (FinishedState::Success, totals)
        );
        assert!(finished.services.is_empty() && finished.error.is_none());
        assert_eq!(finished.event_seq, 7);
    }

    fn discovered() -> Vec<Service> {
        Rules::default().discover([
            "platform/01.postgres/deploy.py",
            "platform/02.redis/deploy.py",
            "finance_report/finance_report/10.app/deploy.py",
            "bootstrap/01.vault/deploy.py",
            "libs/__init__.py",
        ])
    }

    fn push(paths: &[&str], truncated: bool) -> PushEvent {
        PushEvent {
            delivery_id: "d-1".into(),
            repository: Some("acme/infra".into()),
            git_ref: "refs/heads/main".into(),
            before: Some("a".repeat(40)),
            after: Some("b".repeat(40)),
            head_commit: None,
            pusher: None,
            paths: paths.iter().map(|p| p.to_string()).collect(),
            paths_truncated: truncated,
        }
    }

    fn keys(services: &[(Service, Reason)]) -> Vec<&str> {
        services.iter().map(|(s, _)| s.key.as_str()).collect()
    }

    #[test]
    fn the_event_id_prefers_our_header_then_the_message_id_then_the_sequence() {
        let headers = HashMap::from([("Iac-Event-Id", "ev-1"), ("Nats-Msg-Id", "msg-1")]);
        let d = Delivery::new(SYNC_SUBJECT, 7, 1, |n| {
            headers.get(n).map(|v| v.to_string())
        });
        assert_eq!(d.event_id, "ev-1");
        let d = Delivery::new(SYNC_SUBJECT, 7, 1, |n| {
            (n == "Nats-Msg-Id").then(|| "msg-1".to_string())
        });
        assert_eq!(d.event_id, "msg-1");
        let d = Delivery::new(SYNC_SUBJECT, 7, 1, |_| None);
        assert_eq!(d.event_id, "seq-7");
        assert_eq!((d.replay_of, d.force), (None, false));
    }

    #[test]
    fn replay_headers_are_read() {
        let headers = HashMap::from([("Iac-Replay-Of", "42"), ("Iac-Force", "true")]);
        let d = Delivery::new(PUSH_SUBJECT, 50, 1, |n| {
            headers.get(n).map(|v| v.to_string())
        });
        assert_eq!(d.replay_of, Some(42));
        assert!(d.force);
    }

    #[test]
    fn the_delivery_after_the_last_attempt_gives_up() {
        let d = |n| Delivery::new(PUSH_SUBJECT, 1, n, |_| None);
        assert!(!d(3).attempts_exhausted(3));
        assert!(d(4).attempts_exhausted(3));
        assert_eq!(gave_up_reason(3), "gave up after 3 attempts");
    }

    #[test]
    fn messages_are_parsed_by_subject() {
        assert!(matches!(
            parse_event(SYNC_SUBJECT, br#"{"all": true}"#),
            Ok(Event::Sync(_))
        ));
        let body = serde_json::to_vec(&push(&["x"], false)).unwrap();
        assert!(matches!(
            parse_event(PUSH_SUBJECT, &body),
            Ok(Event::Push(_))
        ));
        assert_eq!(
            parse_event(SYNC_SUBJECT, b"{}"),
            Err(EventError::BadRequest(RequestError::NoServices))
        );
        assert!(matches!(
            parse_event(PUSH_SUBJECT, b"not json"),
            Err(EventError::BadPush(_))
        ));
        assert!(matches!(
            parse_event("iac.events.other", b"{}"),
            Err(EventError::UnknownSubject(_))
        ));
    }

    #[test]
    fn a_push_checks_out_its_after_commit_or_the_branch_head() {
        let event = Event::Push(push(&[], false));
        assert_eq!(event.target(), Target::Commit("b".repeat(40)));
        let mut headless = push(&[], false);
        headless.after = None;
        assert_eq!(Event::Push(headless).target(), Target::BranchHead);
    }

    #[test]
    fn a_manual_sync_checks_out_its_ref_or_the_branch_head() {
        let request = |r: Option<&str>| {
            Event::Sync(SyncRequest {
                all: true,
                git_ref: r.map(str::to_string),
                ..Default::default()
            })
        };
        assert_eq!(request(None).target(), Target::BranchHead);
        assert_eq!(
            request(Some("release/1")).target(),
            Target::Ref("release/1".into())
        );
        let sha = "ABCDEF0123456789abcdef0123456789abcdef01";
        assert_eq!(
            request(Some(sha)).target(),
            Target::Ref(sha.to_ascii_lowercase())
        );
        assert_eq!(
            request(None).repository(Some("acme/infra")).as_deref(),
            Some("acme/infra")
        );
    }

    fn deploy(services: &[&str]) -> DeployRequest {
        DeployRequest {
            deployment_id: "0123456789abcdef".into(),
            env: "staging".into(),
            commit: "c".repeat(40),
            services: services.iter().map(|s| s.to_string()).collect(),
            triggered_by: None,
            force: false,
        }
    }

    #[test]
    fn a_deployment_is_parsed_from_its_environments_subject_and_checks_out_its_commit() {
        let body = serde_json::to_vec(&deploy(&["__all__"])).unwrap();
        let event = parse_event("iac.events.deploy.staging", &body).unwrap();
        assert_eq!(event.trigger(), Trigger::Deploy);
        assert_eq!(event.target(), Target::Ref("c".repeat(40)));
        let err = parse_event("iac.events.deploy.production", &body).unwrap_err();
        assert!(err.to_string().contains("staging"), "{err}");
        assert_eq!(
            refused_deployment("iac.events.deploy.production", &body),
            None
        );
        let mut short = deploy(&["redis"]);
        short.commit = "main".into();
        let body = serde_json::to_vec(&short).unwrap();
        let err = parse_event("iac.events.deploy.staging", &body).unwrap_err();
        assert!(err.to_string().contains("exact commit"), "{err}");
        assert_eq!(
            refused_deployment("iac.events.deploy.staging", &body),
            Some(short),
            "a refused deployment still gets its failed summary"
        );
        assert_eq!(trigger_of("iac.events.deploy.staging"), Trigger::Deploy);
    }

    #[test]
    fn a_final_summary_keeps_what_the_gateway_accepted_and_drops_the_output() {
        let request = deploy(&["redis"]);
        let delivery = Delivery::new("iac.events.deploy.staging", 3, 1, |_| None);
        let event = Event::Deploy(request.clone());
        let header = ResultHeader::new(&delivery, Some(&event), None, Some("staging"));
        let mut failed = service_result(
            &discovered()[0],
            TaskEnd::Exited {
                code: Some(2),
                tail: vec!["secret output".into()],
            },
            Duration::from_millis(5),
        );
        failed.service = "platform/redis".into();
        let finished = header.finished(&request.commit, vec![failed], 7);
        assert_eq!(finished.env.as_deref(), Some("staging"));
        assert_eq!(finished.deployment_id.as_deref(), Some("0123456789abcdef"));
        let accepted = DeploymentSummary {
            status: DeploymentStatus::InProgress,
            triggered_by: Some("ci".into()),
            accepted_at: "2026-01-01T00:00:00Z".into(),
            result: None,
            ..final_summary(&request, &finished, None)
        };
        let summary = final_summary(&request, &finished, Some(&accepted));
        assert_eq!(summary.status, DeploymentStatus::Failed);
        assert_eq!(summary.accepted_at, "2026-01-01T00:00:00Z");
        assert_eq!(summary.triggered_by.as_deref(), Some("ci"));
        let json = serde_json::to_string(&summary).unwrap();
        assert!(!json.contains("secret output"), "{json}");
        let ok = header.finished(&request.commit, Vec::new(), 1);
        assert_eq!(
            final_summary(&request, &ok, None).status,
            DeploymentStatus::Completed
        );
    }

    #[test]
    fn a_deployment_names_services_by_key_or_by_a_unique_short_name() {
        let (found, unknown) = deploy_services(
            &deploy(&["redis", "platform/postgres", "app"]),
            &discovered(),
        );
        assert_eq!(
            keys(&found),
            ["finance_report/app", "platform/postgres", "platform/redis"]
        );
        assert!(unknown.is_empty());
        let (found, unknown) = deploy_services(&deploy(&["mongo", "redis"]), &discovered());
        assert_eq!(keys(&found), ["platform/redis"]);
        assert_eq!(unknown, ["mongo"]);
        let mut twice = discovered();
        let mut other = twice[0].clone();
        other.key = "other/redis".into();
        twice.push(other);
        let (found, unknown) = deploy_services(&deploy(&["redis"]), &twice);
        assert!(found.is_empty(), "an ambiguous short name ran {found:?}");
        assert_eq!(unknown, ["redis"]);
        let (all, _) = deploy_services(&deploy(&["__all__"]), &discovered());
        assert_eq!(all, every(&discovered(), Reason::All(None)));
    }

    #[test]
    fn a_push_runs_the_services_git_says_changed() {
        let rules = Rules::default();
        let diff = vec!["platform/01.postgres/compose.yaml".to_string()];
        let selected = push_services(
            &push(&["README.md"], false),
            Some(&diff),
            &rules,
            &discovered(),
            None,
        )
        .selected;
        assert_eq!(keys(&selected), ["platform/postgres"]);
    }

    #[test]
    fn libs_run_every_service_and_bootstrap_runs_none() {
        let rules = Rules::default();
        let all = push_services(
            &push(&[], false),
            Some(&["libs/x.py".into()]),
            &rules,
            &discovered(),
            None,
        )
        .selected;
        assert_eq!(
            keys(&all),
            ["finance_report/app", "platform/postgres", "platform/redis"]
        );
        let none = push_services(
            &push(&[], false),
            Some(&["bootstrap/01.vault/compose.yaml".into()]),
            &rules,
            &discovered(),
            None,
        )
        .selected;
        assert!(none.is_empty());
    }

    #[test]
    fn without_a_git_diff_the_payload_paths_decide_unless_truncated() {
        let rules = Rules::default();
        let listed = push_services(
            &push(&["platform/02.redis/compose.yaml"], false),
            None,
            &rules,
            &discovered(),
            None,
        )
        .selected;
        assert_eq!(keys(&listed), ["platform/redis"]);
        let truncated = push_services(
            &push(&["platform/02.redis/compose.yaml"], true),
            None,
            &rules,
            &discovered(),
            None,
        )
        .selected;
        assert_eq!(truncated.len(), 3);
    }

    #[test]
    fn a_removed_service_is_not_run() {
        let rules = Rules::default();
        let remaining = rules.discover(["platform/02.redis/deploy.py"]);
        let selected = push_services(
            &push(&[], false),
            Some(&["platform/01.postgres/deploy.py".into()]),
            &rules,
            &remaining,
            None,
        )
        .selected;
        assert!(selected.is_empty());
    }

    #[test]
    fn a_manual_sync_runs_named_services_and_reports_unknown_ones() {
        let request = SyncRequest {
            services: vec![
                "platform/redis".into(),
                "platform/nope".into(),
                "platform/postgres".into(),
                "platform/redis".into(),
            ],
            ..Default::default()
        };
        let (found, unknown) = requested_services(&request, &discovered());
        assert_eq!(keys(&found), ["platform/postgres", "platform/redis"]);
        assert_eq!(unknown, ["platform/nope"]);
        let all = SyncRequest {
            all: true,
            ..Default::default()
        };
        assert_eq!(requested_services(&all, &discovered()).0.len(), 3);
    }

    #[test]
    fn a_push_that_cannot_run_or_is_given_up_is_reported_where_its_statuses_are() {
        let delivery = Delivery::new(PUSH_SUBJECT, 4, 2, |_| None);
        let mut event = push(&[], false);
        event.after = Some("b".repeat(40));
        let header = ResultHeader::new(&delivery, Some(&Event::Push(event)), None, None);
        assert_eq!(header.repository.as_deref(), Some("acme/infra"));
        let error = header.error(None, "Failed to update git repository: x".into(), 1);
        assert_eq!(
            error.commit,
            Some("b".repeat(40)),
            "the queued status's commit"
        );

        // No attempt got as far as `started`: the error goes on the push's commit.
        let gave_up = header.given_up(None, gave_up_reason(1), 1);
        assert_eq!(gave_up.commit, Some("b".repeat(40)));
        assert!(gave_up.services.is_empty());

        // An attempt started: its commit, and every service it set pending, not finished.
        let redis = Rules::default().discover(["platform/02.redis/deploy.py"]);
        let started = header.started(
            &"c".repeat(40),
            &[(
                redis[0].clone(),
                Reason::Changed("platform/02.redis/x".into()),
            )],
            &["platform/nope".to_string()],
        );
        assert_eq!(
            started.reasons.get("platform/redis").map(String::as_str),
            Some("changed platform/02.redis/x")
        );
        assert_eq!(
            started.reasons.get("platform/nope").map(String::as_str),
            Some("manual")
        );
        let gave_up = header.given_up(Some(&started), gave_up_reason(1), 1);
        assert_eq!(gave_up.state, FinishedState::Error);
        assert_eq!(gave_up.commit, Some("c".repeat(40)));
        assert_eq!(gave_up.error.as_deref(), Some("gave up after 1 attempts"));
        let outcomes: Vec<(&str, SyncOutcome)> = gave_up
            .services
            .iter()
            .map(|s| (s.service.as_str(), s.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("platform/redis", SyncOutcome::NotFinished),
                ("platform/nope", SyncOutcome::NotFinished)
            ]
        );
        assert_eq!((gave_up.totals.total, gave_up.totals.not_finished), (2, 2));

        // A manual sync names no commit before it runs.
        let manual = Delivery::new(SYNC_SUBJECT, 5, 2, |_| None);
        let header = ResultHeader::new(
            &manual,
            Some(&Event::Sync(SyncRequest::default())),
            None,
            None,
        );
        assert_eq!(header.error(None, "x".into(), 1).commit, None);
    }

    #[test]
    fn results_carry_the_event_and_their_state_follows_the_outcomes() {
        let delivery = Delivery::new(SYNC_SUBJECT, 9, 1, |_| None);
        let header = ResultHeader::new(&delivery, None, Some("acme/infra"), None);
        let ok = ServiceResult {
            outcome: SyncOutcome::Synced,
            ..unknown_service("platform/redis")
        };
        let finished = header.finished("c1", vec![ok.clone()], 5);
        assert_eq!(finished.state, FinishedState::Success);
        assert_eq!((finished.event_seq, finished.totals.synced), (9, 1));
        let finished = header.finished("c1", vec![ok, unknown_service("platform/nope")], 5);
        assert_eq!(finished.state, FinishedState::Failure);
        let error = header.error(None, "Failed to update git repository: x".into(), 1);
        assert_eq!(error.state, FinishedState::Error);
        assert_eq!(error.event_id, "seq-9");
        let nothing = header.finished("c1", Vec::new(), 1);
        assert_eq!(
            (nothing.state, nothing.totals.total),
            (FinishedState::Success, 0)
        );
    }

    #[test]
    fn task_ends_become_outcomes() {
        let service = Service {
            key: "platform/postgres".into(),
            task: "postgres.sync".into(),
            dir: "platform/01.postgres".into(),
            refused: None,
        };
        let d = Duration::from_millis(1500);
        let ok = service_result(
            &service,
            TaskEnd::Exited {
                code: Some(0),
                tail: vec!["x".into()],
            },
            d,
        );
        assert_eq!(
            (ok.outcome, ok.exit_code, ok.duration_ms),
            (SyncOutcome::Synced, Some(0), 1500)
        );
        assert!(ok.output_tail.is_empty());
        let failed = service_result(
            &service,
            TaskEnd::Exited {
                code: Some(3),
                tail: vec!["boom".into()],
            },
            d,
        );
        assert_eq!(
            (failed.outcome, failed.exit_code),
            (SyncOutcome::Failed, Some(3))
        );
        assert_eq!(failed.output_tail, ["boom"]);
        let timed_out = service_result(&service, TaskEnd::TimedOut { tail: vec![] }, d);
        assert_eq!(timed_out.outcome, SyncOutcome::TimedOut);
        let missing = service_result(&service, TaskEnd::CannotStart("cannot start".into()), d);
        assert_eq!(missing.outcome, SyncOutcome::Failed);
        let refused = service_result(&service, TaskEnd::Refused("refused: x".into()), d);
        assert_eq!(
            (refused.outcome, refused.exit_code, refused.output_tail),
            (SyncOutcome::Failed, None, vec!["refused: x".to_string()])
        );
    }

    fn result_with_tails(tails: &[Vec<String>]) -> SyncFinished {
        let header = ResultHeader::new(
            &Delivery::new(PUSH_SUBJECT, 9, 1, |_| None),
            None,
            None,
            None,
        );
        let services = tails
            .iter()
            .enumerate()
            .map(|(i, tail)| ServiceResult {
                service: format!("platform/s{i}"),
                task: Some(format!("s{i}.sync")),
                outcome: SyncOutcome::Failed,
                exit_code: Some(1),
                output_tail: tail.clone(),
                duration_ms: 5,
                reason: None,
            })
            .collect();
        header.finished(&"c".repeat(40), services, 10)
    }

    fn lines(n: usize, bytes: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("{i:06}{}", "x".repeat(bytes)))
            .collect()
    }

    const MB: usize = 1024 * 1024;

    #[test]
    fn a_result_that_fits_is_stored_as_it_is() {
        let finished = result_with_tails(&[lines(20, 100)]);
        assert_eq!(fit_to_message(finished.clone(), MB), finished);
    }

    #[test]
    fn big_tails_keep_their_newest_lines_and_say_how_many_were_cut() {
        let finished = result_with_tails(&[lines(100, 16 * 1024), lines(3, 10)]);
        let fitted = fit_to_message(finished.clone(), MB);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= MB - RESULT_HEADER_ROOM);
        assert_eq!(
            (fitted.state, fitted.totals),
            (finished.state, finished.totals)
        );
        let big = &fitted.services[0].output_tail;
        assert!(big.len() > 40, "most of the room is used: {}", big.len());
        let cut = 100 - (big.len() - 1);
        assert_eq!(
            big[0],
            format!("… [{cut} earlier lines cut to fit the result in one message]")
        );
        assert_eq!(big.last(), finished.services[0].output_tail.last());
        assert_eq!(
            fitted.services[1].output_tail,
            finished.services[1].output_tail
        );
    }

    #[test]
    fn one_line_larger_than_its_share_keeps_its_beginning() {
        let finished = result_with_tails(&[vec!["a".repeat(3 * MB)], vec!["b".repeat(MB)]]);
        let fitted = fit_to_message(finished, MB);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= MB - RESULT_HEADER_ROOM);
        for service in &fitted.services {
            let line = service.output_tail.last().unwrap();
            assert!(
                line.len() > 100_000 && line.contains("… [cut: "),
                "{}",
                &line[line.len() - 40..]
            );
        }
    }

    #[test]
    fn escaped_output_is_counted_as_it_is_written() {
        let quotes = vec!["\"\u{1}\\".repeat(10_000); 200];
        let fitted = fit_to_message(result_with_tails(&[quotes]), 256 * 1024);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= 256 * 1024 - RESULT_HEADER_ROOM);
        assert!(fitted.services[0].output_tail.len() > 2);
    }

    #[test]
    fn a_result_too_large_without_output_becomes_a_small_error() {
        let tails: Vec<Vec<String>> = (0..5000).map(|_| lines(1, 100)).collect();
        let fitted = fit_to_message(result_with_tails(&tails), 64 * 1024);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= 64 * 1024);
        assert_eq!(fitted.state, FinishedState::Error);
        assert!(fitted.services.is_empty());
        assert!(fitted.error.unwrap().contains("5000 services"));
    }

    #[test]
    fn an_unknown_payload_limit_is_taken_as_the_nats_default() {
        let fitted = fit_to_message(result_with_tails(&[lines(200, 16 * 1024)]), 0);
        let size = serde_json::to_vec(&fitted).unwrap().len();
        assert!(size <= MB - RESULT_HEADER_ROOM && size > MB / 2, "{size}");
    }

    #[test]
    fn shares_are_equal_and_what_small_wants_leave_goes_to_the_large() {
        assert_eq!(fair_shares(&[10, 1000, 1000], 610), [10, 300, 300]);
        assert_eq!(fair_shares(&[5, 5], 100), [5, 5]);
        assert_eq!(fair_shares(&[], 100), Vec::<usize>::new());
    }
}
