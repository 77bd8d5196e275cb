//! What a verified `/deploy` or `/deploy/status` body asks, and the answers built from a
//! deployment summary, in the original runner's shapes (its client and workflow check them),
//! decided without I/O.

use iac_shared::deploy::{
    DeploymentStatus, DeploymentSummary, deployment_id, is_deployment_id, normalize_services,
};
use iac_shared::events::truncate_chars;
use serde_json::{Map, Value, json};

/// The environment a request without `env` deploys to, as in the original.
pub const DEFAULT_ENV: &str = "staging";
/// Who a request without `triggered_by` is from, as in the original.
pub const UNKNOWN_TRIGGER: &str = "unknown";
/// Where the original's clients poll.
pub const STATUS_URL: &str = "/deploy/status";
/// Longest kept `triggered_by`.
const MAX_TRIGGERED_BY: usize = 200;

/// Why a verified body is not a deployment request; answered 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployRequestError {
    #[error("Body is not valid JSON: {0}")]
    NotJson(String),
    #[error("JSON object required")]
    NotObject,
    #[error("wait must be a boolean")]
    BadWait,
    #[error("Ref must be an exact 40-character commit SHA")]
    BadRef,
    #[error("Invalid env (must be one of {0})")]
    BadEnv(String),
    #[error("services must be a list of strings")]
    ServicesNotStrings,
    #[error("services must be a non-empty list of non-empty strings")]
    EmptyServices,
    #[error("triggered_by must be a string")]
    BadTriggeredBy,
    #[error("deployment_id must be 16 lowercase hex characters")]
    BadDeploymentId,
}

/// A deployment request (`POST /deploy`) or a status question (`POST /deploy/status`): the
/// deployment it names and how to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployCall {
    pub env: String,
    /// The exact commit, lowercase.
    pub commit: String,
    /// The services as sent; `None` for every service (or, for a status question, "whichever
    /// deployment of this commit there is").
    pub services: Option<Vec<String>>,
    pub triggered_by: String,
    /// Hold the answer until the deployment is final (`/deploy` only).
    pub wait: bool,
    /// The id the caller expects (`/deploy/status` only).
    pub deployment_id: Option<String>,
}

impl DeployCall {
    /// The services in canonical form (`["__all__"]` for every service).
    pub fn normalized_services(&self) -> Vec<String> {
        normalize_services(self.services.as_deref())
    }

    /// The id of the deployment this call names.
    pub fn deployment_id(&self) -> String {
        deployment_id(&self.env, &self.commit, &self.normalized_services())
    }
}

/// Reads a request body the way the original runner did: `env` (default `staging`, one of
/// `envs`), `ref` or else `tag` (an exact commit, any case), `services` (absent, or a
/// non-empty list of non-empty strings), `triggered_by`, `wait` (a boolean or a boolean word)
/// and `deployment_id`. Other fields are ignored, as the original's workflow sends some.
pub fn parse_call(body: &[u8], envs: &[String]) -> Result<DeployCall, DeployRequestError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| DeployRequestError::NotJson(e.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(DeployRequestError::NotObject);
    };
    let wait = parse_bool(fields.get("wait")).ok_or(DeployRequestError::BadWait)?;
    let commit = commit_of(&fields).ok_or(DeployRequestError::BadRef)?;
    let env = match fields.get("env") {
        None | Some(Value::Null) => DEFAULT_ENV,
        Some(Value::String(env)) => env.as_str(),
        Some(_) => "",
    };
    if !envs.iter().any(|known| known == env) {
        return Err(DeployRequestError::BadEnv(envs.join(", ")));
    }
    let services = match fields.get("services") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let names: Option<Vec<String>> = items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect();
            let names = names.ok_or(DeployRequestError::ServicesNotStrings)?;
            if names.is_empty() || names.iter().any(|name| name.trim().is_empty()) {
                return Err(DeployRequestError::EmptyServices);
            }
            Some(names)
        }
        Some(_) => return Err(DeployRequestError::ServicesNotStrings),
    };
    let triggered_by = match fields.get("triggered_by") {
        None | Some(Value::Null) => UNKNOWN_TRIGGER.to_string(),
        Some(Value::String(who)) => truncate_chars(who, MAX_TRIGGERED_BY),
        Some(_) => return Err(DeployRequestError::BadTriggeredBy),
    };
    let deployment_id = match fields.get("deployment_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if is_deployment_id(id) => Some(id.clone()),
        Some(_) => return Err(DeployRequestError::BadDeploymentId),
    };
    Ok(DeployCall {
        env: env.to_string(),
        commit,
        services,
        triggered_by,
        wait,
        deployment_id,
    })
}

/// `ref`, or `tag` when `ref` is absent or empty, trimmed and lowercased, if it is an exact
/// commit.
fn commit_of(fields: &Map<String, Value>) -> Option<String> {
    let given = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let commit = given("ref")
        .or_else(|| given("tag"))?
        .trim()
        .to_ascii_lowercase();
    iac_shared::deploy::is_exact_commit(&commit).then_some(commit)
}

/// `true`, `false`, absent, or one of the words the original accepted.
fn parse_bool(value: Option<&Value>) -> Option<bool> {
    match value {
        None | Some(Value::Null) => Some(false),
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(word)) => match word.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "y" | "on" => Some(true),
            "0" | "false" | "no" | "n" | "off" | "" => Some(false),
            _ => None,
        },
        Some(_) => None,
    }
}

/// The `in_progress` answer for deployment `id`, as the original's `_in_progress_response`.
pub fn in_progress_answer(
    id: &str,
    env: &str,
    commit: &str,
    triggered_by: &str,
    requested_services: &[String],
) -> Value {
    json!({
        "status": "in_progress",
        "deployment_id": id,
        "env": env,
        "ref": commit,
        "triggered_by": triggered_by,
        "requested_services": requested_services,
        "status_url": STATUS_URL,
    })
}

/// What a summary answers: `in_progress` as [`in_progress_answer`], or the final outcome
/// (`completed`/`failed` with `result`, and `error` when the worker gave one).
pub fn summary_answer(summary: &DeploymentSummary) -> Value {
    let triggered_by = summary.triggered_by.as_deref().unwrap_or(UNKNOWN_TRIGGER);
    let status = match summary.status {
        DeploymentStatus::InProgress => {
            return in_progress_answer(
                &summary.deployment_id,
                &summary.env,
                &summary.commit,
                triggered_by,
                &summary.requested_services,
            );
        }
        DeploymentStatus::Completed => "completed",
        DeploymentStatus::Failed => "failed",
    };
    let mut answer = json!({
        "status": status,
        "deployment_id": summary.deployment_id,
        "env": summary.env,
        "ref": summary.commit,
        "triggered_by": triggered_by,
        "requested_services": summary.requested_services,
        "result": summary.result,
    });
    if let Some(error) = summary.result.as_ref().and_then(|r| r.error.as_ref()) {
        answer["error"] = json!(error);
    }
    answer
}

/// The `not_found` answer (404) of a status question.
pub fn not_found_answer(id: &str, env: &str, commit: &str) -> Value {
    json!({ "status": "not_found", "deployment_id": id, "env": env, "ref": commit })
}

/// Which deployment a status question without `services` means, from the ids accepted for its
/// environment and commit (`live` first: in progress, or final within the cache window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyLookup {
    /// This one (the only candidate, or the every-service id when there is none).
    One(String),
    /// More than one: the caller must name the services (409).
    Ambiguous(Vec<String>),
}

/// As the original: among the live deployments of (env, commit), exactly one is the answer and
/// more are ambiguous; with none live, the same rule over every one recorded; with none at all,
/// the every-service deployment.
pub fn legacy_lookup(call: &DeployCall, live: &[String], recorded: &[String]) -> LegacyLookup {
    let candidates = if live.is_empty() { recorded } else { live };
    match candidates {
        [] => LegacyLookup::One(deployment_id(
            &call.env,
            &call.commit,
            &normalize_services(None),
        )),
        [one] => LegacyLookup::One(one.clone()),
        many => {
            let mut ids = many.to_vec();
            ids.sort();
            LegacyLookup::Ambiguous(ids)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn envs() -> Vec<String> {
        vec!["staging".into(), "production".into()]
    }

    fn parse(body: Value) -> Result<DeployCall, DeployRequestError> {
        parse_call(body.to_string().as_bytes(), &envs())
    }

    #[test]
    fn a_request_gets_the_originals_defaults() {
        let call = parse(json!({"ref": COMMIT.to_uppercase(), "source_ref": "main"})).unwrap();
        assert_eq!(call.env, "staging");
        assert_eq!(call.commit, COMMIT);
        assert_eq!(call.services, None);
        assert_eq!(call.triggered_by, "unknown");
        assert!(!call.wait);
        assert_eq!(call.normalized_services(), ["__all__"]);
        let tag = parse(json!({"tag": COMMIT, "env": "production", "wait": "yes"})).unwrap();
        assert_eq!((tag.env.as_str(), tag.wait), ("production", true));
    }

    #[test]
    fn each_bad_field_is_refused_naming_it() {
        use DeployRequestError::*;
        let cases = [
            (json!([1]), NotObject),
            (json!({"ref": "main"}), BadRef),
            (json!({"ref": &COMMIT[..39]}), BadRef),
            (json!({}), BadRef),
            (
                json!({"ref": COMMIT, "env": "qa"}),
                BadEnv("staging, production".into()),
            ),
            (
                json!({"ref": COMMIT, "env": 5}),
                BadEnv("staging, production".into()),
            ),
            (json!({"ref": COMMIT, "wait": "maybe"}), BadWait),
            (
                json!({"ref": COMMIT, "services": "redis"}),
                ServicesNotStrings,
            ),
            (json!({"ref": COMMIT, "services": [1]}), ServicesNotStrings),
            (json!({"ref": COMMIT, "services": []}), EmptyServices),
            (
                json!({"ref": COMMIT, "services": ["redis", " "]}),
                EmptyServices,
            ),
            (json!({"ref": COMMIT, "triggered_by": {}}), BadTriggeredBy),
            (
                json!({"ref": COMMIT, "deployment_id": "ABCDEF0123456789"}),
                BadDeploymentId,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(parse(body.clone()), Err(expected), "{body}");
        }
        assert!(matches!(
            parse_call(b"{", &envs()),
            Err(DeployRequestError::NotJson(_))
        ));
    }

    #[test]
    fn the_id_is_the_originals_for_the_normalized_services() {
        let call = parse(json!({"ref": COMMIT, "services": ["redis", " api", "redis"]})).unwrap();
        assert_eq!(call.normalized_services(), ["api", "redis"]);
        assert_eq!(
            call.deployment_id(),
            deployment_id("staging", COMMIT, &["api".into(), "redis".into()])
        );
    }

    #[test]
    fn a_legacy_status_question_is_ambiguous_only_with_several_candidates() {
        let call = parse(json!({"ref": COMMIT})).unwrap();
        let all = deployment_id("staging", COMMIT, &normalize_services(None));
        let (a, b) = (
            "aaaaaaaaaaaaaaaa".to_string(),
            "bbbbbbbbbbbbbbbb".to_string(),
        );
        assert_eq!(legacy_lookup(&call, &[], &[]), LegacyLookup::One(all));
        assert_eq!(
            legacy_lookup(&call, &[], std::slice::from_ref(&a)),
            LegacyLookup::One(a.clone())
        );
        assert_eq!(
            legacy_lookup(&call, std::slice::from_ref(&b), &[a.clone(), b.clone()]),
            LegacyLookup::One(b.clone())
        );
        assert_eq!(
            legacy_lookup(&call, &[], &[b.clone(), a.clone()]),
            LegacyLookup::Ambiguous(vec![a, b])
        );
    }
}
