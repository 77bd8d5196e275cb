//! What a verified request body means, decided without I/O: the JSON inside a webhook body,
//! the GitHub event it is, whether a push is for the deployed branch, and the [`PushEvent`]
//! that is stored for it.

use std::collections::BTreeSet;

use iac_shared::events::{PushEvent, is_null_commit, truncate_chars};
use iac_shared::rules::Rules;
use serde::Deserialize;

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
pub fn payload_json(content_type: Option<&str>, body: &[u8]) -> Result<String, BodyError> {
    let is_form = content_type.is_some_and(|ct| {
        ct.split(';').next().is_some_and(|mime| {
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    if !is_form {
        return std::str::from_utf8(body)
            .map(str::to_string)
            .map_err(|_| BodyError::NotUtf8);
    }
    #[derive(Deserialize)]
    struct Form {
        payload: Option<String>,
    }
    std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    let form: Form =
        serde_urlencoded::from_bytes(body).map_err(|e| BodyError::BadForm(e.to_string()))?;
    form.payload.ok_or(BodyError::FormWithoutPayload)
}

/// What to do with a verified webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// GitHub's `ping` when a hook is created.
    Pong { hook_id: Option<u64> },
    /// An event the runner does not act on.
    IgnoredEvent { event: String },
    /// A push the runner does not deploy (another branch, a tag, a deletion).
    IgnoredPush { reason: String },
    /// A push to the deployed branch: store it.
    Store(Box<PushPlan>),
}

/// A push to store, with what the answer shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushPlan {
    pub event: PushEvent,
    /// Services the listed paths map to ([`Mapping::preview`](iac_shared::rules::Mapping::preview)).
    pub services: Vec<String>,
    /// The first 8 characters of the pushed commit, when the payload names one.
    pub commit: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Ping {
    hook_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    before: Option<String>,
    after: Option<String>,
    deleted: Option<bool>,
    repository: Option<Repository>,
    pusher: Option<Pusher>,
    head_commit: Option<Commit>,
    commits: Option<Vec<Commit>>,
}

#[derive(Debug, Deserialize)]
struct Repository {
    full_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Pusher {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Commit {
    id: Option<String>,
    added: Option<Vec<String>>,
    modified: Option<Vec<String>>,
    removed: Option<Vec<String>>,
}

impl Commit {
    fn paths(&self) -> impl Iterator<Item = &String> {
        [&self.added, &self.modified, &self.removed]
            .into_iter()
            .flatten()
            .flatten()
    }
}

/// Decides what a verified webhook of type `event` (`X-GitHub-Event`) means.
pub fn decide(
    event: Option<&str>,
    json: &str,
    delivery_id: &str,
    branch: &str,
    rules: &Rules,
) -> Result<Decision, BodyError> {
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
        Some(other) => {
            parse::<serde::de::IgnoredAny>(json)?;
            Ok(Decision::IgnoredEvent {
                event: truncate_chars(other, 100),
            })
        }
    }
}

fn parse<'a, T: Deserialize<'a>>(json: &'a str) -> Result<T, BodyError> {
    serde_json::from_str(json).map_err(|e| BodyError::NotJson(e.to_string()))
}

fn decide_push(
    push: PushPayload,
    delivery_id: &str,
    branch: &str,
    rules: &Rules,
) -> Result<Decision, BodyError> {
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

    let paths: BTreeSet<String> = push
        .commits
        .iter()
        .flatten()
        .chain(push.head_commit.iter())
        .flat_map(Commit::paths)
        .cloned()
        .collect();
    let services = rules.map_paths(paths.iter().map(String::as_str)).preview();
    let head_commit = push.head_commit.and_then(|c| c.id);
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
        paths: paths.into_iter().collect(),
        paths_truncated: false,
    };
    Ok(Decision::Store(Box::new(PushPlan {
        event,
        services,
        commit,
    })))
}

/// Serializes `event`, cutting its path list (and setting `paths_truncated`) so that the
/// message is at most `limit` bytes. The worker decides from git, so a cut list loses nothing
/// but the preview of a very large push.
pub fn serialize_within(event: &mut PushEvent, limit: usize) -> Result<Vec<u8>, BodyError> {
    let full = serde_json::to_vec(&*event).expect("a PushEvent serializes");
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
        let cost =
            serde_json::to_string(path).map_or(usize::MAX, |s| s.len()) + usize::from(kept > 0);
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

    const BRANCH: &str = "main";

    fn push(body: serde_json::Value) -> Result<Decision, BodyError> {
        decide(
            Some("push"),
            &body.to_string(),
            "d-1",
            BRANCH,
            &Rules::default(),
        )
    }

    fn stored(decision: Result<Decision, BodyError>) -> PushPlan {
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
            Ok(r#"{"ref":"refs/heads/main"}"#.to_string())
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
        assert_eq!(payload_json(None, b"{}"), Ok("{}".to_string()));
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
