//! What a verified request body means, decided without I/O: the JSON inside a webhook body,
//! the GitHub event it is, whether a push is for the deployed branch, and the [`PushEvent`]
//! that is stored for it.

use std::borrow::Cow;

use iac_shared::events::{
    PushEvent, SyncRequest, is_null_commit, is_valid_git_ref, truncate_chars,
};
use iac_shared::rules::Rules;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Why a signed body cannot be used; answered 400 with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("Body is not UTF-8")]
    NotUtf8,
    #[error("Body is not valid JSON: {0}")]
    NotJson(String),
    #[error("Form body has no payload field")]
    FormWithoutPayload,
    #[error("Form body is malformed: {0}")]
    BadForm(String),
    #[error("Missing X-GitHub-Event header")]
    MissingEvent,
    #[error("Push payload has no ref")]
    MissingRef,
    #[error("Push fields are too large to store even without paths")]
    TooLargeToStore,
}

/// The JSON document of a webhook body: the body itself, or the `payload` field of a form.
///
/// GitHub signs the raw body, so this runs only after the signature was verified.
pub fn payload_json<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
) -> Result<Cow<'a, str>, BodyError> {
    let is_form = content_type.is_some_and(|ct| {
        ct.split(';').next().is_some_and(|mime| {
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    if !is_form {
        return Ok(Cow::Borrowed(text));
    }
    #[derive(Deserialize)]
    struct Form {
        payload: Option<String>,
    }
    let form: Form =
        serde_urlencoded::from_bytes(body).map_err(|e| BodyError::BadForm(e.to_string()))?;
    form.payload
        .map(Cow::Owned)
        .ok_or(BodyError::FormWithoutPayload)
}

/// What to do with a verified webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    /// GitHub's `ping` when a hook is created.
    Pong { hook_id: Option<u64> },
    /// An event the runner does not act on.
    IgnoredEvent { event: String },
    /// A push the runner does not deploy (another branch, a tag, a deletion).
    IgnoredPush { reason: String },
    /// A push to the deployed branch: store it.
    Store(Box<PushPlan<'a>>),
    /// A `check_run` or `check_suite` event the runner does not act on (not `rerequested`).
    IgnoredCheck { reason: String },
    /// Re-run asked on a check run or a check suite: store it, if the App is this runner's.
    Rerun(Box<Rerun>),
}

/// What a `rerequested` check run or check suite asks to run again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rerun {
    /// One service's check run: a forced sync of that service at that commit.
    Service {
        app_id: Option<u64>,
        repository: Option<String>,
        request: SyncRequest,
    },
    /// The whole suite of a commit: its push again, whose services the worker derives from
    /// git (`before`..`after`), as it did for the push.
    Suite {
        app_id: Option<u64>,
        push: PushEvent,
    },
}

impl Rerun {
    /// The GitHub App the check run or suite belongs to.
    pub fn app_id(&self) -> Option<u64> {
        match self {
            Rerun::Service { app_id, .. } | Rerun::Suite { app_id, .. } => *app_id,
        }
    }

    /// The repository it names.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Rerun::Service { repository, .. } => repository.as_deref(),
            Rerun::Suite { push, .. } => push.repository.as_deref(),
        }
    }
}

/// A push to store, with what the answer shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushPlan<'a> {
    /// The event, its paths still the payload's own JSON text.
    pub event: PushEvent<ListedPath<'a>>,
    /// Services the listed paths map to ([`Mapping::preview`](iac_shared::rules::Mapping::preview)).
    pub services: Vec<String>,
    /// The first 8 characters of the pushed commit, when the payload names one.
    pub commit: Option<String>,
}

/// A path as the payload lists it: a JSON string, kept as the payload's text so that a push
/// of thousands of paths is neither copied path by path nor escaped again when stored.
#[derive(Debug, Clone, Copy)]
pub struct ListedPath<'a>(&'a RawValue);

impl<'a> ListedPath<'a> {
    /// The JSON string literal, quotes included.
    pub fn json(&self) -> &'a str {
        self.0.get()
    }

    /// The path itself; decoded (and so copied) only when the payload escaped a character.
    pub fn text(&self) -> Result<Cow<'a, str>, BodyError> {
        let json = self.json();
        let inner = &json[1..json.len() - 1];
        if memchr::memchr(b'\\', inner.as_bytes()).is_none() {
            return Ok(Cow::Borrowed(inner));
        }
        serde_json::from_str::<String>(json)
            .map(Cow::Owned)
            .map_err(|e| BodyError::NotJson(format!("a listed path: {e}")))
    }
}

impl PartialEq for ListedPath<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Eq for ListedPath<'_> {}

impl Serialize for ListedPath<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ListedPath<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <&'a RawValue>::deserialize(deserializer)?;
        if raw.get().len() < 2 || !raw.get().starts_with('"') {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Other(raw.get().get(..20).unwrap_or(raw.get())),
                &"a path (a string)",
            ));
        }
        Ok(ListedPath(raw))
    }
}

#[derive(Debug, Deserialize)]
struct Ping {
    hook_id: Option<u64>,
}

#[derive(Debug, Default)]
struct PushPayload<'a> {
    git_ref: Option<String>,
    before: Option<String>,
    after: Option<String>,
    deleted: Option<bool>,
    repository: Option<Repository>,
    pusher: Option<Pusher>,
    head_commit: Option<CommitPaths<'a>>,
    commits: Option<CommitPaths<'a>>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum PushField {
    Ref,
    Before,
    After,
    Deleted,
    Repository,
    Pusher,
    HeadCommit,
    Commits,
    #[serde(other)]
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for PushPayload<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PushVisitor(PhantomData))
    }
}

struct PushVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for PushVisitor<'a> {
    type Value = PushPayload<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a push payload (an object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        /// Refuses a field seen before, as serde's derived code does.
        fn unseen<T, E: serde::de::Error>(slot: &Option<T>, name: &'static str) -> Result<(), E> {
            match slot {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        /// Reads the value of a field seen for the first time into `slot`.
        fn read_once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
            map: &mut A,
            slot: &mut Option<T>,
            name: &'static str,
        ) -> Result<(), A::Error> {
            unseen(slot, name)?;
            *slot = map.next_value()?;
            Ok(())
        }
        let mut push = PushPayload::default();
        while let Some(field) = map.next_key()? {
            match field {
                PushField::Ref => read_once(&mut map, &mut push.git_ref, "ref")?,
                PushField::Before => read_once(&mut map, &mut push.before, "before")?,
                PushField::After => read_once(&mut map, &mut push.after, "after")?,
                PushField::Deleted => read_once(&mut map, &mut push.deleted, "deleted")?,
                PushField::Repository => read_once(&mut map, &mut push.repository, "repository")?,
                PushField::Pusher => read_once(&mut map, &mut push.pusher, "pusher")?,
                PushField::Commits => read_once(&mut map, &mut push.commits, "commits")?,
                PushField::HeadCommit => {
                    unseen(&push.head_commit, "head_commit")?;
                    // GitHub lists `commits` first, and the head commit is the last of them:
                    // its paths are then known already and only scanned, not kept.
                    let known = push.commits.as_ref().and_then(|c| c.last_id.as_deref());
                    push.head_commit = map.next_value_seed(HeadCommitSeed(known, PhantomData))?;
                }
                PushField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(push)
    }
}

/// Reads `head_commit` (or `null`), skipping the paths of a commit already read.
struct HeadCommitSeed<'a, 'k>(Option<&'k str>, PhantomData<&'a ()>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for HeadCommitSeed<'a, '_> {
    type Value = Option<CommitPaths<'a>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for HeadCommitSeed<'a, '_> {
    type Value = Option<CommitPaths<'a>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a commit")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let mut head = CommitPaths::default();
        head.last_id = deserializer.deserialize_map(CommitSeed {
            paths: &mut head.paths,
            known: self.0,
        })?;
        Ok(Some(head))
    }
}

#[derive(Debug, Deserialize)]
struct Repository {
    full_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Pusher {
    name: Option<String>,
}

/// The paths of `head_commit` (one commit) or of `commits` (a list), read into one list: a
/// push of thousands of commits costs no list per commit.
#[derive(Debug, Default)]
struct CommitPaths<'a> {
    /// Every listed path, commit by commit, in the order the payload lists them.
    paths: Vec<ListedPath<'a>>,
    /// The id of the (last) commit.
    last_id: Option<String>,
}

impl<'de: 'a, 'a> Deserialize<'de> for CommitPaths<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CommitPathsVisitor(PhantomData))
    }
}

struct CommitPathsVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for CommitPathsVisitor<'a> {
    type Value = CommitPaths<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a commit or a list of commits")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut one = CommitPaths::default();
        one.last_id = CommitSeed {
            paths: &mut one.paths,
            known: None,
        }
        .visit_map(map)?;
        Ok(one)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut all = CommitPaths::default();
        while let Some(id) = seq.next_element_seed(CommitSeed {
            paths: &mut all.paths,
            known: None,
        })? {
            all.last_id = id;
        }
        Ok(all)
    }
}

/// Reads one commit object: appends its paths, gives its id. The paths of commit `known`,
/// already read elsewhere, are skipped when its id comes before them (as GitHub orders keys).
struct CommitSeed<'s, 'a, 'k> {
    paths: &'s mut Vec<ListedPath<'a>>,
    known: Option<&'k str>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum CommitField {
    Id,
    Added,
    Modified,
    Removed,
    #[serde(other)]
    Other,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for CommitSeed<'_, 'a, '_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for CommitSeed<'_, 'a, '_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a commit")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let out = self.paths;
        let mut id: Option<String> = None;
        while let Some(field) = map.next_key()? {
            match field {
                CommitField::Id => id = map.next_value()?,
                CommitField::Added | CommitField::Modified | CommitField::Removed
                    if self.known.is_some() && id.as_deref() == self.known =>
                {
                    map.next_value::<IgnoredAny>()?;
                }
                CommitField::Added | CommitField::Modified | CommitField::Removed => {
                    map.next_value_seed(PathListSeed(&mut *out))?;
                }
                CommitField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(id)
    }
}

/// Reads one `added`/`modified`/`removed` list (or `null`) into the shared list.
struct PathListSeed<'s, 'a>(&'s mut Vec<ListedPath<'a>>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for PathListSeed<'_, 'a> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for PathListSeed<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of paths")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(path) = seq.next_element()? {
            self.0.push(path);
        }
        Ok(())
    }
}

/// Decides what a verified webhook of type `event` (`X-GitHub-Event`) means.
pub fn decide<'a>(
    event: Option<&str>,
    json: &'a str,
    delivery_id: &str,
    branch: &str,
    rules: &Rules,
) -> Result<Decision<'a>, BodyError> {
    let event = event.map(str::trim).filter(|e| !e.is_empty());
    match event {
        None => {
            // Still refuse a body that is not JSON first: that is the more useful message.
            parse::<serde::de::IgnoredAny>(json)?;
            Err(BodyError::MissingEvent)
        }
        Some("ping") => {
            let ping: Ping = parse(json)?;
            Ok(Decision::Pong {
                hook_id: ping.hook_id,
            })
        }
        Some("push") => decide_push(parse(json)?, delivery_id, branch, rules),
        Some("check_run") => Ok(decide_check_run(parse(json)?)),
        Some("check_suite") => Ok(decide_check_suite(parse(json)?, delivery_id, branch)),
        Some(other) => {
            parse::<serde::de::IgnoredAny>(json)?;
            Ok(Decision::IgnoredEvent {
                event: truncate_chars(other, 100),
            })
        }
    }
}

#[derive(Debug, Deserialize)]
struct CheckApp {
    id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct CheckRunPayload {
    action: Option<String>,
    check_run: Option<CheckRunFields>,
    repository: Option<Repository>,
}

#[derive(Debug, Deserialize)]
struct CheckRunFields {
    head_sha: Option<String>,
    external_id: Option<String>,
    app: Option<CheckApp>,
}

#[derive(Debug, Deserialize)]
struct CheckSuitePayload {
    action: Option<String>,
    check_suite: Option<CheckSuiteFields>,
    repository: Option<Repository>,
}

#[derive(Debug, Deserialize)]
struct CheckSuiteFields {
    head_sha: Option<String>,
    head_branch: Option<String>,
    before: Option<String>,
    after: Option<String>,
    app: Option<CheckApp>,
}

fn ignored_check(reason: impl Into<String>) -> Decision<'static> {
    Decision::IgnoredCheck {
        reason: reason.into(),
    }
}

/// A check run's Re-run: `external_id` is the service (`platform/postgres`), or the service and
/// a deployment environment (`platform/postgres@staging`), which only `/deploy` re-runs.
fn decide_check_run(payload: CheckRunPayload) -> Decision<'static> {
    let action = payload.action.unwrap_or_default();
    if action != "rerequested" {
        return ignored_check(format!(
            "check_run {} needs nothing",
            truncate_chars(&action, 40)
        ));
    }
    let Some(run) = payload.check_run else {
        return ignored_check("the check_run event has no check_run");
    };
    let external_id = run.external_id.unwrap_or_default();
    if let Some((_, env)) = external_id.split_once('@') {
        return ignored_check(format!(
            "the check run is a deployment to {}: deploy it again with POST /deploy",
            truncate_chars(env, 40)
        ));
    }
    let request = SyncRequest {
        services: vec![external_id],
        all: false,
        git_ref: run.head_sha,
        force: true,
    };
    if let Err(e) = request.validate() {
        return ignored_check(format!("the check run names no service to sync: {e}"));
    }
    Decision::Rerun(Box::new(Rerun::Service {
        app_id: run.app.and_then(|a| a.id),
        repository: payload.repository.and_then(|r| r.full_name),
        request,
    }))
}

/// A check suite's Re-run: the push of `before`..`after` on the deployed branch, again.
fn decide_check_suite(
    payload: CheckSuitePayload,
    delivery_id: &str,
    branch: &str,
) -> Decision<'static> {
    let action = payload.action.unwrap_or_default();
    if action != "rerequested" {
        return ignored_check(format!(
            "check_suite {} needs nothing",
            truncate_chars(&action, 40)
        ));
    }
    let Some(suite) = payload.check_suite else {
        return ignored_check("the check_suite event has no check_suite");
    };
    if suite.head_branch.as_deref() != Some(branch) {
        return ignored_check(format!("the check suite is not on {branch}"));
    }
    let after = suite.after.or(suite.head_sha);
    if after
        .as_deref()
        .is_none_or(|a| !is_valid_git_ref(a) || is_null_commit(a))
    {
        return ignored_check("the check suite names no commit");
    }
    Decision::Rerun(Box::new(Rerun::Suite {
        app_id: suite.app.and_then(|a| a.id),
        push: PushEvent {
            delivery_id: delivery_id.to_string(),
            repository: payload.repository.and_then(|r| r.full_name),
            git_ref: format!("refs/heads/{branch}"),
            before: suite.before.filter(|b| is_valid_git_ref(b)),
            head_commit: after.clone(),
            after,
            pusher: None,
            paths: Vec::new(),
            // No paths: the worker derives the services from git, as for a push too large
            // to list them.
            paths_truncated: true,
        },
    }))
}

fn parse<'a, T: Deserialize<'a>>(json: &'a str) -> Result<T, BodyError> {
    serde_json::from_str(json).map_err(|e| BodyError::NotJson(e.to_string()))
}

fn decide_push<'a>(
    push: PushPayload<'a>,
    delivery_id: &str,
    branch: &str,
    rules: &Rules,
) -> Result<Decision<'a>, BodyError> {
    let git_ref = push.git_ref.ok_or(BodyError::MissingRef)?;
    let deployed = format!("refs/heads/{branch}");
    if git_ref != deployed {
        let what = if git_ref.starts_with("refs/tags/") {
            "a tag"
        } else {
            "another branch"
        };
        return Ok(Decision::IgnoredPush {
            reason: format!(
                "{} is {what}, not {deployed}",
                truncate_chars(&git_ref, 255)
            ),
        });
    }
    let after = push.after.filter(|a| !a.is_empty());
    if push.deleted == Some(true) || after.as_deref().is_some_and(is_null_commit) {
        return Ok(Decision::IgnoredPush {
            reason: format!("{deployed} was deleted"),
        });
    }

    // Each path once, in the payload's order. GitHub's head commit is the last of `commits`;
    // its paths count only when it is not (hand-written payloads).
    let commits = push.commits.unwrap_or_default();
    let mut paths = commits.paths;
    let head_commit = push.head_commit.and_then(|head| {
        if head.last_id.is_none() || head.last_id != commits.last_id {
            paths.extend(head.paths);
        }
        head.last_id
    });
    let mut seen = foldhash::HashSet::with_capacity_and_hasher(paths.len(), Default::default());
    paths.retain(|path| seen.insert(path.json()));
    // Paths the payload escaped are decoded aside (rare); the rest are mapped as they are.
    let mut plain = Vec::with_capacity(paths.len());
    let mut decoded = Vec::new();
    for path in &paths {
        match path.text()? {
            Cow::Borrowed(text) => plain.push(text),
            Cow::Owned(text) => decoded.push(text),
        }
    }
    let services = rules
        .map_paths(plain.into_iter().chain(decoded.iter().map(String::as_str)))
        .preview();
    let commit = after
        .as_deref()
        .or(head_commit.as_deref())
        .map(|c| truncate_chars(c, 8));
    let event = PushEvent {
        delivery_id: delivery_id.to_string(),
        repository: push.repository.and_then(|r| r.full_name),
        git_ref,
        before: push.before,
        after,
        head_commit,
        pusher: push.pusher.and_then(|p| p.name),
        paths,
        paths_truncated: false,
    };
    Ok(Decision::Store(Box::new(PushPlan {
        event,
        services,
        commit,
    })))
}

/// Why a push for the deployed branch is still not stored: it is for another repository than
/// `expected` (GITHUB_REPO), so a hook installed on a fork or a copied secret deploys nothing.
/// `None` when the gateway does not know its repository, or the push is for it.
pub fn other_repository<P>(expected: Option<&str>, push: &PushEvent<P>) -> Option<String> {
    let expected = expected?;
    match push.repository.as_deref() {
        Some(name) if name.eq_ignore_ascii_case(expected) => None,
        Some(name) => Some(format!(
            "the push is for {}, not {expected}",
            truncate_chars(name, 200)
        )),
        None => Some(format!("the push names no repository; expected {expected}")),
    }
}

/// Room for the fields of an event other than its paths, when sizing its buffer.
const EVENT_ROOM: usize = 512;

/// Serializes `event`, cutting its path list (and setting `paths_truncated`) so that the
/// message is at most `limit` bytes. The worker decides from git, so a cut list loses nothing
/// but the preview of a very large push.
pub fn serialize_within<P: Serialize>(
    event: &mut PushEvent<P>,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut full = Vec::with_capacity(limit.min(EVENT_ROOM + event.paths.len() * 64));
    serde_json::to_writer(&mut full, &*event).expect("a PushEvent serializes");
    if full.len() <= limit {
        return Ok(full);
    }
    let paths = std::mem::take(&mut event.paths);
    event.paths_truncated = true;
    let base = serde_json::to_vec(&*event)
        .expect("a PushEvent serializes")
        .len();
    if base > limit {
        return Err(BodyError::TooLargeToStore);
    }
    let mut size = base;
    let mut kept = 0;
    for path in &paths {
        // The quoted, escaped path plus the comma separating it from the previous one.
        let cost = serde_json::to_vec(path).map_or(usize::MAX, |s| s.len()) + usize::from(kept > 0);
        if size.saturating_add(cost) > limit {
            break;
        }
        size += cost;
        kept += 1;
    }
    event.paths = paths;
    event.paths.truncate(kept);
    let out = serde_json::to_vec(&*event).expect("a PushEvent serializes");
    debug_assert!(out.len() <= limit);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_event(event: &str, body: serde_json::Value) -> Decision<'static> {
        let json: &'static str = Box::leak(body.to_string().into_boxed_str());
        decide(Some(event), json, "d-9", BRANCH, &Rules::default()).unwrap()
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn a_rerequested_check_run_is_a_forced_sync_of_its_service_at_its_commit() {
        let body = serde_json::json!({
            "action": "rerequested",
            "check_run": { "head_sha": SHA, "external_id": "platform/postgres", "app": { "id": 42 } },
            "repository": { "full_name": "acme/infra" },
        });
        let Decision::Rerun(rerun) = check_event("check_run", body) else {
            panic!("a rerun");
        };
        assert_eq!(
            *rerun,
            Rerun::Service {
                app_id: Some(42),
                repository: Some("acme/infra".into()),
                request: SyncRequest {
                    services: vec!["platform/postgres".into()],
                    all: false,
                    git_ref: Some(SHA.into()),
                    force: true,
                },
            }
        );
    }

    #[test]
    fn other_check_run_actions_and_deployments_are_ignored_with_a_reason() {
        for (action, external_id, words) in [
            ("created", "platform/postgres", "check_run created"),
            ("completed", "platform/postgres", "check_run completed"),
            ("rerequested", "platform/postgres@staging", "POST /deploy"),
            ("rerequested", "../etc", "no service"),
        ] {
            let body = serde_json::json!({
                "action": action,
                "check_run": { "head_sha": SHA, "external_id": external_id, "app": { "id": 42 } },
            });
            match check_event("check_run", body) {
                Decision::IgnoredCheck { reason } => assert!(reason.contains(words), "{reason}"),
                other => panic!("{action} {external_id}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_rerequested_check_suite_on_the_branch_is_its_push_again_without_paths() {
        let body = serde_json::json!({
            "action": "rerequested",
            "check_suite": { "head_sha": SHA, "head_branch": BRANCH, "before": "1".repeat(40), "after": SHA, "app": { "id": 42 } },
            "repository": { "full_name": "acme/infra" },
        });
        let Decision::Rerun(rerun) = check_event("check_suite", body) else {
            panic!("a rerun");
        };
        let Rerun::Suite { app_id, push } = *rerun else {
            panic!("a suite");
        };
        assert_eq!(app_id, Some(42));
        assert_eq!(push.after.as_deref(), Some(SHA));
        assert_eq!(push.git_ref, format!("refs/heads/{BRANCH}"));
        assert!(push.paths.is_empty() && push.paths_truncated);
        let elsewhere = serde_json::json!({
            "action": "rerequested",
            "check_suite": { "head_sha": SHA, "head_branch": "feature", "app": { "id": 42 } },
        });
        assert!(matches!(
            check_event("check_suite", elsewhere),
            Decision::IgnoredCheck { .. }
        ));
    }

    const BRANCH: &str = "main";

    fn push(body: serde_json::Value) -> Result<Decision<'static>, BodyError> {
        decide(
            Some("push"),
            String::leak(body.to_string()),
            "d-1",
            BRANCH,
            &Rules::default(),
        )
    }

    fn stored(decision: Result<Decision<'static>, BodyError>) -> PushPlan<'static> {
        match decision {
            Ok(Decision::Store(plan)) => *plan,
            other => panic!("expected a push to store, got {other:?}"),
        }
    }

    #[test]
    fn a_push_to_the_branch_previews_the_services_of_every_listed_path() {
        let plan = stored(push(serde_json::json!({
            "ref": "refs/heads/main",
            "before": "1111111111111111111111111111111111111111",
            "after": "abcdef0123456789abcdef0123456789abcdef01",
            "repository": {"full_name": "acme/infra"},
            "pusher": {"name": "octocat"},
            "commits": [
                {"id": "c1", "added": ["platform/01.postgres/compose.yaml"], "modified": [], "removed": []},
                {"id": "c2", "added": [], "modified": ["finance_report/finance_report/10.app/deploy.py"], "removed": ["README.md"]}
            ],
            "head_commit": {"id": "abcdef0123456789abcdef0123456789abcdef01", "added": [], "modified": ["platform/02.redis/x"], "removed": []}
        })));
        assert_eq!(
            plan.services,
            ["finance_report/app", "platform/postgres", "platform/redis"]
        );
        assert_eq!(plan.commit.as_deref(), Some("abcdef01"));
        assert_eq!(plan.event.repository.as_deref(), Some("acme/infra"));
        assert_eq!(plan.event.pusher.as_deref(), Some("octocat"));
        assert_eq!(plan.event.delivery_id, "d-1");
        assert_eq!(plan.event.paths.len(), 4);
    }

    #[test]
    fn each_path_is_kept_once_in_the_payloads_order() {
        let plan = stored(push(serde_json::json!({
            "ref": "refs/heads/main", "after": "c3",
            "commits": [
                {"id": "c1", "added": ["platform/02.redis/a"], "modified": ["libs/x.py"], "removed": null},
                {"id": "c2", "modified": ["platform/02.redis/a", "platform/01.postgres/b"]},
                {"id": "c3", "removed": ["libs/x.py", "docs/c.md"]}
            ],
            // GitHub repeats the last commit as the head commit.
            "head_commit": {"id": "c3", "removed": ["libs/x.py", "docs/c.md"]}
        })));
        let paths: Vec<&str> = plan.event.paths.iter().map(ListedPath::json).collect();
        assert_eq!(
            paths,
            [
                r#""platform/02.redis/a""#,
                r#""libs/x.py""#,
                r#""platform/01.postgres/b""#,
                r#""docs/c.md""#
            ]
        );
        assert_eq!(plan.event.head_commit.as_deref(), Some("c3"));
    }

    #[test]
    fn the_head_commit_counts_once_in_whichever_order_the_payload_lists_it() {
        let head_first = r#"{"ref": "refs/heads/main", "after": "c1",
            "head_commit": {"id": "c1", "added": ["platform/02.redis/a"]},
            "commits": [{"id": "c1", "added": ["platform/02.redis/a"]}]}"#;
        let head_last = r#"{"ref": "refs/heads/main", "after": "c1",
            "commits": [{"id": "c1", "added": ["platform/02.redis/a"]}],
            "head_commit": {"id": "c1", "added": ["platform/02.redis/a"]}}"#;
        let head_only = r#"{"ref": "refs/heads/main", "after": "c1", "commits": null,
            "head_commit": {"id": "c1", "added": ["platform/02.redis/a"]}}"#;
        for json in [head_first, head_last, head_only] {
            let plan = stored(decide(Some("push"), json, "d", BRANCH, &Rules::default()));
            let paths: Vec<&str> = plan.event.paths.iter().map(ListedPath::json).collect();
            assert_eq!(paths, [r#""platform/02.redis/a""#], "{json}");
            assert_eq!(plan.services, ["platform/redis"], "{json}");
        }
        let twice = r#"{"ref": "refs/heads/main", "ref": "refs/heads/other"}"#;
        assert!(matches!(
            decide(Some("push"), twice, "d", BRANCH, &Rules::default()),
            Err(BodyError::NotJson(e)) if e.contains("duplicate field `ref`")
        ));
    }

    #[test]
    fn escaped_paths_are_mapped_decoded_and_stored_as_written() {
        let json = r#"{"ref": "refs/heads/main", "after": "ab",
            "commits": [{"added": ["platform\/01.postgres\/caf\u00e9.yaml", "libs/\"q\".py"]}]}"#;
        let mut plan = stored(decide(Some("push"), json, "d", BRANCH, &Rules::default()));
        assert_eq!(plan.services, ["__all__", "platform/postgres"]);
        let bytes = serialize_within(&mut plan.event, 1 << 20).unwrap();
        let read: PushEvent = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            read.paths,
            ["platform/01.postgres/café.yaml", r#"libs/"q".py"#]
        );
    }

    #[test]
    fn a_path_that_is_not_a_string_is_refused() {
        for paths in [
            serde_json::json!([7]),
            serde_json::json!([{"a": 1}]),
            serde_json::json!("x"),
        ] {
            let refused = push(serde_json::json!({
                "ref": "refs/heads/main", "commits": [{"added": paths}]
            }));
            assert!(
                matches!(refused, Err(BodyError::NotJson(_))),
                "{paths}: {refused:?}"
            );
        }
        let lone_surrogate = r#"{"ref": "refs/heads/main", "commits": [{"added": ["a\ud800"]}]}"#;
        assert!(matches!(
            decide(Some("push"), lone_surrogate, "d", BRANCH, &Rules::default()),
            Err(BodyError::NotJson(_))
        ));
    }

    #[test]
    fn libs_preview_as_all_and_bootstrap_never_syncs() {
        let plan = stored(push(serde_json::json!({
            "ref": "refs/heads/main", "after": "ab",
            "commits": [{"added": ["libs/common.py", "bootstrap/01.vault/deploy.py"]}]
        })));
        assert_eq!(plan.services, ["__all__"]);
        let nothing = stored(push(serde_json::json!({
            "ref": "refs/heads/main", "after": "ab",
            "commits": [{"modified": ["bootstrap/01.vault/deploy.py"]}]
        })));
        assert!(nothing.services.is_empty());
    }

    #[test]
    fn a_push_without_after_means_the_branch_head() {
        let plan = stored(push(serde_json::json!({"ref": "refs/heads/main"})));
        assert_eq!(plan.event.after, None);
        assert_eq!(plan.commit, None);
    }

    #[test]
    fn other_branches_tags_and_deletions_are_ignored_with_a_reason() {
        for (body, words) in [
            (
                serde_json::json!({"ref": "refs/heads/dev", "after": "ab"}),
                "another branch",
            ),
            (
                serde_json::json!({"ref": "refs/tags/v1.0", "after": "ab"}),
                "a tag",
            ),
            (
                serde_json::json!({"ref": "refs/heads/main", "deleted": true}),
                "deleted",
            ),
            (
                serde_json::json!({"ref": "refs/heads/main", "after": "0000000000000000000000000000000000000000"}),
                "deleted",
            ),
        ] {
            match push(body.clone()) {
                Ok(Decision::IgnoredPush { reason }) => assert!(reason.contains(words), "{reason}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_push_for_another_repository_is_ignored_when_the_repository_is_known() {
        let plan = stored(push(serde_json::json!({
            "ref": "refs/heads/main",
            "repository": {"full_name": "Acme/Infra"},
        })));
        assert_eq!(other_repository(None, &plan.event), None);
        assert_eq!(other_repository(Some("acme/infra"), &plan.event), None);
        let reason = other_repository(Some("acme/other"), &plan.event).unwrap();
        assert!(
            reason.contains("Acme/Infra") && reason.contains("acme/other"),
            "{reason}"
        );
        let anonymous = stored(push(serde_json::json!({"ref": "refs/heads/main"})));
        assert!(other_repository(Some("acme/infra"), &anonymous.event).is_some());
    }

    #[test]
    fn a_push_without_ref_or_a_broken_body_is_refused_saying_why() {
        assert_eq!(
            push(serde_json::json!({"after": "ab"})),
            Err(BodyError::MissingRef)
        );
        let broken = decide(Some("push"), "{\"ref\":", "d", BRANCH, &Rules::default());
        assert!(matches!(broken, Err(BodyError::NotJson(_))));
        let wrong_type = push(serde_json::json!({"ref": 7}));
        assert!(matches!(wrong_type, Err(BodyError::NotJson(m)) if m.contains("string")));
    }

    #[test]
    fn ping_answers_with_the_hook_and_other_events_are_named() {
        let pong = decide(
            Some("ping"),
            r#"{"zen":"Keep it simple.","hook_id":42}"#,
            "d",
            BRANCH,
            &Rules::default(),
        );
        assert_eq!(pong, Ok(Decision::Pong { hook_id: Some(42) }));
        let issue = decide(Some("issues"), "{}", "d", BRANCH, &Rules::default());
        assert_eq!(
            issue,
            Ok(Decision::IgnoredEvent {
                event: "issues".into()
            })
        );
        assert_eq!(
            decide(None, "{}", "d", BRANCH, &Rules::default()),
            Err(BodyError::MissingEvent)
        );
    }

    #[test]
    fn form_bodies_carry_the_json_in_payload() {
        let form = "payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D";
        assert_eq!(
            payload_json(Some("application/x-www-form-urlencoded"), form.as_bytes()),
            Ok(Cow::Borrowed(r#"{"ref":"refs/heads/main"}"#))
        );
        assert_eq!(
            payload_json(
                Some("application/x-www-form-urlencoded; charset=utf-8"),
                b"other=1"
            ),
            Err(BodyError::FormWithoutPayload)
        );
        assert_eq!(
            payload_json(Some("application/json"), b"\xff\xfe"),
            Err(BodyError::NotUtf8)
        );
        assert_eq!(payload_json(None, b"{}"), Ok(Cow::Borrowed("{}")));
    }

    #[test]
    fn an_event_too_large_for_a_message_keeps_as_many_paths_as_fit() {
        let mut event = PushEvent {
            delivery_id: "d".into(),
            repository: None,
            git_ref: "refs/heads/main".into(),
            before: None,
            after: None,
            head_commit: None,
            pusher: None,
            paths: (0..1000)
                .map(|i| format!("platform/{i:04}.svc/\"file\""))
                .collect(),
            paths_truncated: false,
        };
        let small = serialize_within(&mut event.clone(), 1 << 20).unwrap();
        assert_eq!(serde_json::from_slice::<PushEvent>(&small).unwrap(), event);

        for limit in [200, 1000, 4096, 10_000] {
            let mut cut = event.clone();
            let bytes = serialize_within(&mut cut, limit).unwrap();
            assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
            let read: PushEvent = serde_json::from_slice(&bytes).unwrap();
            assert!(read.paths_truncated);
            assert_eq!(read.paths, event.paths[..read.paths.len()]);
            // One more path would not have fit.
            let mut longer = read.clone();
            longer.paths.push(event.paths[read.paths.len()].clone());
            assert!(serde_json::to_vec(&longer).unwrap().len() > limit);
        }
        assert_eq!(
            serialize_within(&mut event, 10),
            Err(BodyError::TooLargeToStore)
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn any_event() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("push".to_string())),
            Just(Some("ping".to_string())),
            any::<String>().prop_map(Some),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_and_headers_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            content_type in proptest::option::of(any::<String>()),
            event in any_event(),
            delivery in any::<String>(),
        ) {
            if let Ok(json) = payload_json(content_type.as_deref(), &body) {
                let _ = decide(event.as_deref(), &json, &delivery, "main", &Rules::default());
            }
        }

        #[test]
        fn arbitrary_push_shapes_never_panic(
            git_ref in prop_oneof![Just("refs/heads/main".to_string()), any::<String>()],
            after in proptest::option::of(prop_oneof![Just("0".repeat(40)), any::<String>()]),
            paths in proptest::collection::vec(any::<String>(), 0..20),
            limit in 0usize..4096,
        ) {
            let body = serde_json::json!({
                "ref": git_ref, "after": after,
                "commits": [{"added": paths, "modified": [], "removed": []}],
            });
            if let Ok(Decision::Store(mut plan)) =
                decide(Some("push"), &body.to_string(), "d", "main", &Rules::default())
                && let Ok(bytes) = serialize_within(&mut plan.event, limit)
            {
                prop_assert!(bytes.len() <= limit);
            }
        }

        #[test]
        fn arbitrary_paths_map_without_panic(
            paths in proptest::collection::vec(
                prop_oneof![
                    any::<String>(),
                    "(platform|libs|bootstrap|finance_report/finance_report)(/[0-9a-z.\\-]{0,12}){0,4}",
                ],
                0..50,
            ),
        ) {
            let mapping = Rules::default().map_paths(paths.iter().map(String::as_str));
            for key in mapping.preview() {
                prop_assert!(key == "__all__" || iac_shared::events::is_valid_service_key(&key), "{key}");
            }
        }
    }
}
