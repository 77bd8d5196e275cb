//! The messages on `IAC_EVENTS` and `IAC_RESULTS`, as JSON a person can read and type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A commit id of all zeros: GitHub's "no commit" (new branch `before`, deleted branch `after`).
pub const NULL_COMMIT: &str = "0000000000000000000000000000000000000000";

/// Most services one manual request may name; `{"all": true}` covers more.
pub const MAX_REQUESTED_SERVICES: usize = 1000;
/// Longest accepted service key.
pub const MAX_SERVICE_KEY_LEN: usize = 100;

/// A verified push to the deployed branch, as published on `iac.events.push`.
///
/// Only what the worker and the reporter need, never the raw GitHub payload (which may be far
/// larger than a NATS message).
///
/// `P` is how a path is held: owned text when an event is read, the payload's own JSON text
/// when the gateway writes one (so a large push is not copied and re-escaped path by path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEvent<P = String> {
    /// GitHub's `X-GitHub-Delivery`; also the message's `Nats-Msg-Id`.
    pub delivery_id: String,
    /// `owner/name` of the repository that was pushed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The pushed ref, `refs/heads/<branch>`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The branch head before the push; absent or all zeros for a new branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// The branch head after the push; absent means "the branch head when the sync runs".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// `head_commit.id` of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_commit: Option<String>,
    /// Who pushed (`pusher.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pusher: Option<String>,
    /// Paths the payload listed as added, modified or removed, each once, in the order the
    /// payload lists them (commit by commit). May be incomplete.
    #[serde(default)]
    pub paths: Vec<P>,
    /// True when `paths` was cut to fit a NATS message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paths_truncated: bool,
}

impl<P> PushEvent<P> {
    /// `before` when it names a commit (not absent, not all zeros).
    pub fn before_commit(&self) -> Option<&str> {
        self.before.as_deref().filter(|c| !is_null_commit(c))
    }

    /// The commit this push's statuses go on before its sync knows one: `after`, else
    /// `head_commit` (a hand-written push may name neither).
    pub fn status_commit(&self) -> Option<&str> {
        self.after
            .as_deref()
            .filter(|c| !c.is_empty() && !is_null_commit(c))
            .or(self.head_commit.as_deref())
    }
}

/// True for GitHub's all-zeros commit id.
pub fn is_null_commit(commit: &str) -> bool {
    !commit.is_empty() && commit.bytes().all(|b| b == b'0')
}

/// A manual sync request, as published on `iac.events.sync`:
/// `{"services": ["platform/postgres"]}` or `{"all": true}`, with optional `ref` and `force`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// A commit or branch; the deployed branch's head when absent.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Run the tasks even where they would be skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// Why a manual sync request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("No services specified")]
    NoServices,
    #[error("Too many services: {0} (at most {MAX_REQUESTED_SERVICES}; use {{\"all\": true}})")]
    TooManyServices(usize),
    #[error("Invalid service key {0:?}: expected layer/name of letters, digits, '-', '_' or '.'")]
    BadServiceKey(String),
    #[error("Invalid ref {0:?}: expected a branch name or a commit id")]
    BadRef(String),
    #[error("Invalid request: {0}")]
    Malformed(String),
}

impl SyncRequest {
    /// Parses and validates a request body.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        let request: SyncRequest =
            serde_json::from_slice(body).map_err(|e| RequestError::Malformed(e.to_string()))?;
        request.validate()?;
        Ok(request)
    }

    /// Checks what a request may name: at least one service (or `all`), well-formed keys and ref.
    pub fn validate(&self) -> Result<(), RequestError> {
        if !self.all && self.services.is_empty() {
            return Err(RequestError::NoServices);
        }
        if self.services.len() > MAX_REQUESTED_SERVICES {
            return Err(RequestError::TooManyServices(self.services.len()));
        }
        if let Some(bad) = self.services.iter().find(|s| !is_valid_service_key(s)) {
            return Err(RequestError::BadServiceKey(truncate_chars(bad, 120)));
        }
        if let Some(git_ref) = &self.git_ref
            && !is_valid_git_ref(git_ref)
        {
            return Err(RequestError::BadRef(truncate_chars(git_ref, 120)));
        }
        Ok(())
    }
}

/// `layer/name`: two components of letters, digits, `-`, `_` or `.`, none starting with a dot,
/// no `..`, at most [`MAX_SERVICE_KEY_LEN`] characters.
pub fn is_valid_service_key(key: &str) -> bool {
    if key.is_empty()
        || key.len() > MAX_SERVICE_KEY_LEN
        || key.as_bytes().windows(2).any(|pair| pair == b"..")
    {
        return false;
    }
    let mut parts = key.split('/');
    let (Some(layer), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    [layer, name].iter().all(|part| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    })
}

/// A conservative git ref: what `git check-ref-format` allows, minus anything a shell or
/// `git` option parser could misread (no leading `-`, no spaces or control characters).
pub fn is_valid_git_ref(git_ref: &str) -> bool {
    !git_ref.is_empty()
        && git_ref.len() <= 255
        && !git_ref.starts_with(['-', '/', '.'])
        && !git_ref.ends_with(['/', '.'])
        && !git_ref.contains("..")
        && !git_ref.contains("//")
        && !git_ref.contains("@{")
        && !git_ref.ends_with(".lock")
        && git_ref
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// A branch name from configuration (`GIT_BRANCH`): surrounding whitespace dropped, then it must
/// be a valid git ref (the clap value parser of the gateway and the worker).
pub fn parse_branch(s: &str) -> Result<String, String> {
    let branch = s.trim();
    if is_valid_git_ref(branch) {
        Ok(branch.to_string())
    } else {
        Err("not a valid branch name".into())
    }
}

/// At most `max` characters of `s`, cut on a character boundary.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// What started a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Push,
    Sync,
    /// A deployment of an exact commit to an environment (`POST /deploy`).
    Deploy,
}

/// Published on `iac.results.started` once the worker knows the commit and the services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStarted {
    pub event_id: String,
    /// The event's sequence in `IAC_EVENTS`: orders statuses for one commit.
    pub event_seq: u64,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub commit: String,
    pub services: Vec<String>,
    /// Why each service was selected (`changed platform/01.postgres/compose.yaml`,
    /// `depends on libs/** via libs/common.py`, `manual`, `all`), by service key. Absent in
    /// results of workers that did not say.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<u64>,
    /// RFC 3339.
    pub started_at: String,
    /// The environment the sync deployed to (`DEPLOY_ENV` of its tasks); absent when pushes
    /// deploy to no named environment (`PUSH_ENV=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// The deployment this sync ran, for a `/deploy` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
}

/// Published on `iac.results.task` right before one service's task starts; the services of a
/// sync may wait their turn long after its `started`. Never waited for long: a sync runs on
/// when it cannot be stored, so a reader must do without it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStarted {
    pub event_id: String,
    /// The event's sequence in `IAC_EVENTS`, as in its [`SyncStarted`].
    pub event_seq: u64,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub commit: String,
    /// The service key (`platform/postgres`).
    pub service: String,
    /// The task it runs (`postgres.sync`).
    pub task: String,
    /// Why the service was selected (as in [`SyncStarted::reasons`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<u64>,
    /// RFC 3339.
    pub started_at: String,
    /// As in [`SyncStarted::env`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
}

/// How a whole sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishedState {
    /// Every service synced (or there was nothing to sync).
    Success,
    /// At least one service failed, timed out or was unknown.
    Failure,
    /// The sync could not run or was given up: git trouble, a malformed request, attempts
    /// exhausted.
    Error,
}

/// How one service's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SyncOutcome {
    Synced,
    Failed,
    TimedOut,
    /// A manual request named a service that does not exist at that commit.
    Unknown,
    /// The sync was given up (its attempts ran out) before this service's task finished.
    NotFinished,
    /// Not run: a service of the same sync it comes `after` did not sync (the output tail
    /// says which: `Blocked: platform/postgres failed`).
    Blocked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceResult {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub outcome: SyncOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The last lines of the task's output, for failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_tail: Vec<String>,
    pub duration_ms: u64,
    /// Why the service was selected (as in [`SyncStarted::reasons`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub total: usize,
    pub synced: usize,
    pub failed: usize,
    pub timed_out: usize,
    pub unknown: usize,
    #[serde(default)]
    pub not_finished: usize,
    #[serde(default)]
    pub blocked: usize,
}

impl Totals {
    pub fn of(results: &[ServiceResult]) -> Self {
        let mut totals = Totals {
            total: results.len(),
            ..Totals::default()
        };
        for r in results {
            match r.outcome {
                SyncOutcome::Synced => totals.synced += 1,
                SyncOutcome::Failed => totals.failed += 1,
                SyncOutcome::TimedOut => totals.timed_out += 1,
                SyncOutcome::Unknown => totals.unknown += 1,
                SyncOutcome::NotFinished => totals.not_finished += 1,
                SyncOutcome::Blocked => totals.blocked += 1,
            }
        }
        totals
    }

    /// Services that did not sync.
    pub fn not_synced(&self) -> usize {
        self.failed + self.timed_out + self.unknown + self.not_finished + self.blocked
    }
}

/// Published on `iac.results.finished`; the event is acknowledged only after this is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFinished {
    pub event_id: String,
    pub event_seq: u64,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Absent when the sync failed before a commit was known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub state: FinishedState,
    #[serde(default)]
    pub services: Vec<ServiceResult>,
    #[serde(default)]
    pub totals: Totals,
    /// Why the sync could not run (state `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<u64>,
    /// RFC 3339.
    pub finished_at: String,
    /// The environment the sync deployed to (`DEPLOY_ENV` of its tasks); absent when pushes
    /// deploy to no named environment (`PUSH_ENV=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// The deployment this sync ran, for a `/deploy` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// Set when this push was not synced on its own: a newer push of the same branch, which
    /// descends from it, was synced in its place. The full commit of that sync; `state` and
    /// `totals` are that sync's, `services` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
}

impl SyncFinished {
    /// The state that follows from per-service results.
    pub fn state_of(totals: &Totals) -> FinishedState {
        if totals.not_synced() > 0 {
            FinishedState::Failure
        } else {
            FinishedState::Success
        }
    }
}

/// The current time as RFC 3339, for `started_at` / `finished_at`.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_typed_requests_parse() {
        let all = SyncRequest::parse(br#"{"all": true}"#).unwrap();
        assert!(all.all && all.services.is_empty());
        let one =
            SyncRequest::parse(br#"{"services":["platform/postgres"],"ref":"main","force":true}"#)
                .unwrap();
        assert_eq!(one.services, ["platform/postgres"]);
        assert_eq!(one.git_ref.as_deref(), Some("main"));
        assert!(one.force);
    }

    #[test]
    fn requests_without_services_are_refused() {
        assert_eq!(SyncRequest::parse(b"{}"), Err(RequestError::NoServices));
        assert_eq!(
            SyncRequest::parse(br#"{"services": []}"#),
            Err(RequestError::NoServices)
        );
        assert_eq!(
            RequestError::NoServices.to_string(),
            "No services specified"
        );
    }

    #[test]
    fn typos_and_wrong_shapes_are_refused_by_name() {
        let err = SyncRequest::parse(br#"{"service": ["platform/postgres"]}"#).unwrap_err();
        assert!(err.to_string().contains("service"), "{err}");
        assert!(matches!(
            SyncRequest::parse(br#"{"services": "platform/postgres"}"#),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            SyncRequest::parse(b"[1,2"),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn service_keys_must_be_layer_slash_name() {
        for good in [
            "platform/postgres",
            "finance_report/app",
            "platform/my-svc_2.0",
        ] {
            assert!(is_valid_service_key(good), "{good}");
        }
        let long = format!("platform/{}", "a".repeat(100));
        for bad in [
            "",
            "postgres",
            "platform/../etc",
            "platform/..",
            "../platform",
            "platform/postgres/extra",
            "/platform/postgres",
            "platform/.hidden",
            "platform/a;rm -rf",
            "platform/$(id)",
            "platform/a\0b",
            "platform/ä",
            "platform/",
            long.as_str(),
        ] {
            assert!(!is_valid_service_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_key_is_named_in_the_error() {
        let err = SyncRequest::parse(br#"{"services": ["platform/ok", "x/../y"]}"#).unwrap_err();
        assert_eq!(err, RequestError::BadServiceKey("x/../y".into()));
        assert!(err.to_string().contains("x/../y"));
    }

    #[test]
    fn refs_that_could_be_options_are_refused() {
        for good in ["main", "release/2024.1", "0123abcd", "v1.2.3"] {
            assert!(is_valid_git_ref(good), "{good}");
        }
        for bad in [
            "-x",
            "--upload-pack=x",
            "a..b",
            "a b",
            "a;b",
            "",
            "x.lock",
            "a@{1}",
        ] {
            assert!(!is_valid_git_ref(bad), "{bad:?}");
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("abc", 10), "abc");
    }

    #[test]
    fn results_without_reasons_or_blocked_counts_still_read() {
        let started: SyncStarted = serde_json::from_str(
            r#"{"event_id":"e","event_seq":1,"trigger":"push","commit":"c","services":["a/b"],"started_at":"t"}"#,
        )
        .unwrap();
        assert!(started.reasons.is_empty());
        let totals: Totals =
            serde_json::from_str(r#"{"total":1,"synced":0,"failed":1,"timed_out":0,"unknown":0}"#)
                .unwrap();
        assert_eq!((totals.blocked, totals.not_synced()), (0, 1));
        let blocked: ServiceResult = serde_json::from_str(
            r#"{"service":"a/b","outcome":"blocked","output_tail":["Blocked: a/c failed"],"duration_ms":0,"reason":"manual"}"#,
        )
        .unwrap();
        assert_eq!(blocked.outcome, SyncOutcome::Blocked);
        assert_eq!(Totals::of(&[blocked]).not_synced(), 1);
    }

    #[test]
    fn null_commit_is_recognised() {
        assert!(is_null_commit(NULL_COMMIT));
        assert!(!is_null_commit(""));
        assert!(!is_null_commit("0000000000000000000000000000000000000001"));
    }
}
