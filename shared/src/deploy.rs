//! Deployments: exact commits to named environments (`POST /deploy`), their ids and the
//! summaries `POST /deploy/status` answers from.
//!
//! The gateway validates a request, writes an `in_progress` summary to `IAC_DEPLOYMENTS` and
//! stores a [`DeployRequest`] on `iac.events.deploy.<env>`; the worker serving that environment
//! runs it and writes the final summary. Both sides share the types and rules of this module.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::ServiceResult;
use crate::names::DEPLOY_SUBJECT_PREFIX;

/// The environments deployed to when `DEPLOY_ENVS` is unset.
pub const DEFAULT_DEPLOY_ENVS: &str = "staging,production";
/// The environment pushes to `GIT_BRANCH` deploy to when `PUSH_ENV` is unset.
pub const DEFAULT_PUSH_ENV: &str = "production";
/// The environment without a suffix: `ENV_SUFFIX` is empty for it.
pub const PRODUCTION: &str = "production";
/// What the original runner's clients send as `services` for "every service".
pub const ALL_SERVICES: &str = "__all__";
/// Longest accepted environment name.
pub const MAX_ENV_LEN: usize = 32;

/// An environment name: a lowercase letter, then lowercase letters, digits or `_`, at most
/// [`MAX_ENV_LEN`] characters. It is a NATS subject token, part of a consumer name and of a
/// directory name, so nothing else is allowed (the original refused `-` and `/` too).
pub fn is_valid_env(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_ENV_LEN
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// One environment name from configuration: trimmed, `prod` read as `production` (as the
/// original did), then checked with [`is_valid_env`].
pub fn parse_env(s: &str) -> Result<String, String> {
    let name = s.trim();
    let name = if name == "prod" { PRODUCTION } else { name };
    if is_valid_env(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "invalid environment name {:?}: expected a lowercase letter, then lowercase letters, \
             digits or '_' (at most {MAX_ENV_LEN})",
            crate::events::truncate_chars(name, 40)
        ))
    }
}

/// `DEPLOY_ENVS`: comma-separated environment names, at least one, no repeats.
pub fn parse_env_list(s: &str) -> Result<Vec<String>, String> {
    let mut envs: Vec<String> = Vec::new();
    for part in s.split(',') {
        let env = parse_env(part)?;
        if envs.contains(&env) {
            return Err(format!("environment {env:?} is listed twice"));
        }
        envs.push(env);
    }
    Ok(envs)
}

/// `PUSH_ENV`: the environment pushes to `GIT_BRANCH` and `/sync` requests deploy to, or
/// `None` when set empty (`PUSH_ENV=`): then they get no `DEPLOY_ENV`, as before environments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEnv(pub Option<String>);

/// Parses `PUSH_ENV`: empty (or blank) is "no push environment", anything else an environment
/// name as [`parse_env`] reads it.
pub fn parse_push_env(s: &str) -> Result<PushEnv, String> {
    if s.trim().is_empty() {
        Ok(PushEnv(None))
    } else {
        parse_env(s).map(|env| PushEnv(Some(env)))
    }
}

/// The environments of one installation (`DEPLOY_ENVS` and `PUSH_ENV`, equal in every service),
/// and how the worker's consumers divide them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environments {
    /// `DEPLOY_ENVS`: where `/deploy` may deploy.
    pub deploy: Vec<String>,
    /// `PUSH_ENV`.
    pub push: Option<String>,
}

/// `DEPLOY_ENVS` and `PUSH_ENV`, read alike by every service and `iac-worker provision`.
#[derive(Debug, Clone, clap::Args)]
pub struct EnvironmentArgs {
    /// Comma-separated environments `/deploy` may deploy to, each served by the worker apart
    /// from the others; equal in every service.
    #[arg(
        long = "deploy-envs",
        env = "DEPLOY_ENVS",
        value_name = "DEPLOY_ENVS",
        default_value = DEFAULT_DEPLOY_ENVS,
        value_parser = parse_env_list_arg
    )]
    pub deploy_envs: EnvList,

    /// The environment pushes to `GIT_BRANCH` and `/sync` requests deploy to; empty
    /// (`PUSH_ENV=`) for none: their tasks then get no `DEPLOY_ENV`. Equal in every service.
    #[arg(
        long = "push-env",
        env = "PUSH_ENV",
        value_name = "PUSH_ENV",
        default_value = DEFAULT_PUSH_ENV,
        value_parser = parse_push_env
    )]
    pub push_env: PushEnv,
}

/// `DEPLOY_ENVS` as parsed (a newtype: clap would read a `Vec` as one value per item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvList(pub Vec<String>);

fn parse_env_list_arg(s: &str) -> Result<EnvList, String> {
    parse_env_list(s).map(EnvList)
}

impl EnvironmentArgs {
    pub fn environments(&self) -> Environments {
        Environments {
            deploy: self.deploy_envs.0.clone(),
            push: self.push_env.0.clone(),
        }
    }
}

impl Default for Environments {
    fn default() -> Self {
        Environments {
            deploy: parse_env_list(DEFAULT_DEPLOY_ENVS).expect("the default environments"),
            push: Some(DEFAULT_PUSH_ENV.to_string()),
        }
    }
}

impl Environments {
    /// The environments served apart from pushes, each by its own consumer and workspace:
    /// every deploy environment but the push environment.
    pub fn separate(&self) -> impl Iterator<Item = &str> {
        self.deploy
            .iter()
            .map(String::as_str)
            .filter(|env| Some(*env) != self.push.as_deref())
    }
}

/// The subject a deployment to `env` is stored on: `iac.events.deploy.<env>`.
pub fn deploy_subject(env: &str) -> String {
    format!("{DEPLOY_SUBJECT_PREFIX}.{env}")
}

/// The environment of a deploy subject, if `subject` is one.
pub fn env_of_subject(subject: &str) -> Option<&str> {
    subject
        .strip_prefix(DEPLOY_SUBJECT_PREFIX)?
        .strip_prefix('.')
        .filter(|env| is_valid_env(env))
}

/// The isolation variables a task deploying to `env` gets, as the original runner set them:
/// `DEPLOY_ENV`, and `ENV_SUFFIX` / `ENV_DOMAIN_SUFFIX` (empty for production, else `-<env>`
/// with `_` written `-`, so names and domains of environments never collide).
pub fn isolation_vars(env: &str) -> [(&'static str, String); 3] {
    let suffix = if env == PRODUCTION {
        String::new()
    } else {
        format!("-{}", env.replace('_', "-"))
    };
    [
        ("DEPLOY_ENV", env.to_string()),
        ("ENV_SUFFIX", suffix.clone()),
        ("ENV_DOMAIN_SUFFIX", suffix),
    ]
}

/// The services of a request in canonical form: trimmed, sorted, each once; `None` (every
/// service) is `["__all__"]`, as the original runner's clients compute it.
pub fn normalize_services(services: Option<&[String]>) -> Vec<String> {
    match services {
        None => vec![ALL_SERVICES.to_string()],
        Some(list) => {
            let mut out: Vec<String> = list.iter().map(|s| s.trim().to_string()).collect();
            out.sort();
            out.dedup();
            out
        }
    }
}

/// The id of a deployment: the first 16 hex digits of SHA-256 over `env:ref:services` (the
/// normalized services joined by `,`), the same id the original runner and its clients compute.
/// Equal requests have equal ids, so a repeated request finds the deployment already running
/// or just finished.
pub fn deployment_id(env: &str, commit: &str, normalized_services: &[String]) -> String {
    let digest = Sha256::digest(format!("{env}:{commit}:{}", normalized_services.join(",")));
    hex::encode(&digest[..8])
}

/// Whether `id` has the shape of a deployment id: 16 lowercase hex digits.
pub fn is_deployment_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `commit` is an exact commit id: 40 lowercase hex digits.
pub fn is_exact_commit(commit: &str) -> bool {
    commit.len() == 40
        && commit
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A deployment, as stored on `iac.events.deploy.<env>` by the gateway (or typed by an
/// operator with `nats pub`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// [`deployment_id`] of `env`, `commit` and the normalized services.
    pub deployment_id: String,
    pub env: String,
    /// An exact commit (40 hex digits).
    #[serde(rename = "ref")]
    pub commit: String,
    /// Normalized service names: `layer/name` keys or the original's short names (`redis`);
    /// `["__all__"]` for every service.
    pub services: Vec<String>,
    /// Who asked (the request's `triggered_by`), for logs and statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggered_by: Option<String>,
    /// Run the tasks even where they would be skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

impl DeployRequest {
    /// Whether the request covers every service.
    pub fn all(&self) -> bool {
        self.services.iter().any(|s| s == ALL_SERVICES)
    }
}

/// Where a deployment is, as `/deploy/status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    InProgress,
    Completed,
    Failed,
}

/// The outcome part of a summary: what each service did, never its output (the internet-facing
/// gateway reads summaries; task output stays in `IAC_RESULTS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentResult {
    pub success: bool,
    pub commit: Option<String>,
    pub services: Vec<ServiceSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// One service's outcome in a [`DeploymentResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub service: String,
    pub outcome: crate::events::SyncOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
}

impl From<&ServiceResult> for ServiceSummary {
    fn from(r: &ServiceResult) -> Self {
        ServiceSummary {
            service: r.service.clone(),
            outcome: r.outcome,
            exit_code: r.exit_code,
            duration_ms: r.duration_ms,
        }
    }
}

/// A deployment summary: the value of key `<deployment_id>` in the `IAC_DEPLOYMENTS` bucket,
/// written `in_progress` by the gateway that accepted the request and final by the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSummary {
    pub status: DeploymentStatus,
    pub deployment_id: String,
    pub env: String,
    #[serde(rename = "ref")]
    pub commit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggered_by: Option<String>,
    pub requested_services: Vec<String>,
    /// RFC 3339: when the gateway accepted the request.
    pub accepted_at: String,
    /// RFC 3339: when this summary was written.
    pub updated_at: String,
    /// The final outcome (`completed` or `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<DeploymentResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_ids_match_the_original_runners() {
        // sha256("staging:<ref>:__all__")[:16] and sha256("production:<ref>:api,redis")[:16],
        // as the original's `_deployment_id` computes them.
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let all = normalize_services(None);
        let expected_all = hex::encode(&Sha256::digest(format!("staging:{commit}:__all__"))[..8]);
        assert_eq!(deployment_id("staging", commit, &all), expected_all);
        let some = normalize_services(Some(&[" redis".into(), "api".into(), "redis".into()]));
        assert_eq!(some, ["api", "redis"]);
        let id = deployment_id("production", commit, &some);
        assert!(is_deployment_id(&id), "{id}");
        assert_ne!(id, deployment_id("staging", commit, &some));
    }

    #[test]
    fn environment_names_are_subject_tokens() {
        assert_eq!(parse_env(" prod ").unwrap(), "production");
        assert_eq!(
            parse_env_list("staging,production").unwrap(),
            ["staging", "production"]
        );
        for bad in ["", "Staging", "stag-ing", "a/b", "a.b", "1st", "a*", "a>"] {
            assert!(parse_env(bad).is_err(), "{bad:?}");
        }
        assert!(parse_env_list("staging,staging").is_err());
        assert_eq!(env_of_subject("iac.events.deploy.staging"), Some("staging"));
        assert_eq!(env_of_subject("iac.events.deploy"), None);
        assert_eq!(env_of_subject("iac.events.push"), None);
    }

    #[test]
    fn an_empty_push_environment_is_none_and_other_environments_are_served_apart() {
        assert_eq!(parse_push_env("").unwrap(), PushEnv(None));
        assert_eq!(
            parse_push_env("prod").unwrap(),
            PushEnv(Some("production".into()))
        );
        assert!(parse_push_env("Prod").is_err());
        let envs = Environments::default();
        assert_eq!(envs.separate().collect::<Vec<_>>(), ["staging"]);
        let none = Environments { push: None, ..envs };
        assert_eq!(
            none.separate().collect::<Vec<_>>(),
            ["staging", "production"]
        );
    }

    #[test]
    fn isolation_variables_follow_the_original() {
        assert_eq!(isolation_vars("production")[1].1, "");
        assert_eq!(isolation_vars("staging")[1].1, "-staging");
        assert_eq!(isolation_vars("qa_eu")[2].1, "-qa-eu");
    }

    #[test]
    fn exact_commits_are_forty_lowercase_hex_digits() {
        assert!(is_exact_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_exact_commit("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_exact_commit("main"));
        assert!(!is_exact_commit("0123456"));
    }
}
