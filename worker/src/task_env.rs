//! The environment a task runs in, built rather than inherited: a small base, the worker
//! variables `TASK_ENV_PASS` names, and `TASK_ENV_FILE` read again at every sync; and the
//! masker that turns every secret among them, and every secret the worker holds, into `***`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Worker variables every task gets as they are, when the worker has them.
pub const BASE_VARS: &[&str] = &["PATH", "HOME", "LANG", "TZ"];

/// `PATH` for a task when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Worker variables whose values are the worker's own secrets: masked wherever they appear.
const WORKER_SECRET_VARS: &[&str] = &[
    "GITHUB_TOKEN",
    "WEBHOOK_SECRET",
    "DEPLOY_SECRET",
    "RUN_LINK_SECRET",
    "WEB_PASSWORD",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_ADMIN_PASSWORD",
];

/// Families of worker variables a task never gets (NATS access, git and its credentials),
/// besides [`WORKER_SECRET_VARS`]: naming one in `TASK_ENV_PASS` is a start-up error.
const WORKER_ONLY_PREFIXES: &[&str] = &["NATS_", "GIT_", "GITHUB_"];

/// Values shorter than this in `TASK_ENV_FILE` are not masked: they are too likely to be
/// ordinary words (`true`, `prod`) whose masking would garble the output.
pub const MIN_MASKED_FILE_VALUE: usize = 6;

/// Secrets of the worker shorter than this are not masked, for the same reason.
const MIN_MASKED_WORKER_SECRET: usize = 4;

/// True when `name` is one of the worker's own secrets or settings a task must not get.
pub fn is_worker_secret(name: &str) -> bool {
    WORKER_SECRET_VARS.contains(&name)
        || name == "TASK_ENV_FILE"
        || WORKER_ONLY_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// One name of `TASK_ENV_PASS`: a variable name, and not one of the worker's secrets.
/// An empty name (`TASK_ENV_PASS=""`) is kept as empty and passes nothing.
pub fn parse_pass_name(s: &str) -> Result<String, String> {
    let name = s.trim();
    if name.is_empty() {
        return Ok(String::new());
    }
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(format!("{name:?} is not an environment variable name"));
    }
    if is_worker_secret(name) {
        return Err(format!(
            "{name} is one of the worker's own secrets and is never passed to a task"
        ));
    }
    Ok(name.to_string())
}

/// Why the task environment could not be built; the sync ends `error` and nothing runs.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnvError {
    #[error("TASK_ENV_FILE {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
}

/// How a task's environment is made (from the worker's configuration).
#[derive(Debug, Clone, Default)]
pub struct TaskEnvSettings {
    pub file: Option<PathBuf>,
    pub pass: Vec<String>,
}

/// The variables of one sync's tasks, and the masker for their output.
#[derive(Debug, Clone, Default)]
pub struct TaskEnv {
    pub vars: BTreeMap<String, String>,
    pub masker: Masker,
    /// Where the tasks' masked output goes for the run pages (nowhere by default).
    pub run_log: crate::runlog::RunOutput,
}

impl TaskEnvSettings {
    /// Builds the environment from the worker's variables (through `worker_env`) and the
    /// file, read now. Later sources win: base, then `TASK_ENV_PASS`, then the file. Every
    /// worker secret that `worker_env` shows is masked, whether or not it is passed.
    pub fn build(
        &self,
        worker_env: impl Fn(&str) -> Option<String>,
        extra_secrets: &[&str],
    ) -> Result<TaskEnv, TaskEnvError> {
        let mut vars = BTreeMap::new();
        let passed = self
            .pass
            .iter()
            .map(String::as_str)
            .filter(|n| !n.is_empty());
        for name in BASE_VARS.iter().copied().chain(passed) {
            if let Some(value) = worker_env(name) {
                vars.insert(name.to_string(), value);
            }
        }
        vars.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        let mut secrets: Vec<String> = extra_secrets.iter().map(|s| s.to_string()).collect();
        secrets.extend(
            WORKER_SECRET_VARS
                .iter()
                .filter_map(|name| worker_env(name))
                .filter(|v| v.len() >= MIN_MASKED_WORKER_SECRET),
        );
        if let Some(path) = &self.file {
            for (name, value) in read_env_file(path)? {
                if value.len() >= MIN_MASKED_FILE_VALUE {
                    secrets.push(value.clone());
                }
                vars.insert(name, value);
            }
        }
        Ok(TaskEnv {
            vars,
            masker: Masker::new(secrets),
            run_log: Default::default(),
        })
    }
}

impl TaskEnv {
    /// Adds the isolation variables of `env` (`DEPLOY_ENV`, `ENV_SUFFIX`, `ENV_DOMAIN_SUFFIX`),
    /// over any the file set: they name where the task deploys, which only the event decides.
    /// `None` (pushes with `PUSH_ENV=`) adds nothing.
    pub fn for_environment(mut self, env: Option<&str>) -> Self {
        for (name, value) in env
            .map(iac_shared::deploy::isolation_vars)
            .into_iter()
            .flatten()
        {
            self.vars.insert(name.to_string(), value);
        }
        self
    }
}

/// Reads a dotenv file (`NAME=value`, quotes, `#` comments, `export` allowed).
fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, TaskEnvError> {
    let fail = |reason: String| TaskEnvError::File {
        path: path.to_path_buf(),
        reason,
    };
    let entries = dotenvy::from_path_iter(path).map_err(|e| fail(describe(&e)))?;
    entries
        .map(|entry| entry.map_err(|e| fail(describe(&e))))
        .collect()
}

/// dotenvy's message without the values it may quote (a line with a syntax error may hold a
/// secret): the kind of error, and where.
fn describe(e: &dotenvy::Error) -> String {
    match e {
        dotenvy::Error::Io(io) => io.to_string(),
        dotenvy::Error::LineParse(_, index) => {
            format!("cannot parse the line at byte {index}")
        }
        dotenvy::Error::EnvVar(e) => e.to_string(),
        _ => "cannot read it".into(),
    }
}

/// Replaces every known secret in a text by `***`.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<String>,
}

impl Masker {
    pub fn new(mut secrets: Vec<String>) -> Self {
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Masker { secrets }
    }

    pub fn mask(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_worker_secrets_cannot_be_passed_and_names_must_be_names() {
        for secret in [
            "GITHUB_TOKEN",
            "WEBHOOK_SECRET",
            "NATS_PASSWORD",
            "GIT_REPO_URL",
        ] {
            let err = parse_pass_name(secret).unwrap_err();
            assert!(err.contains(secret) && err.contains("secrets"), "{err}");
        }
        assert!(parse_pass_name("A-B").is_err());
        assert!(parse_pass_name("1A").is_err());
        assert_eq!(parse_pass_name(" DOKPLOY_URL ").unwrap(), "DOKPLOY_URL");
    }

    #[test]
    fn a_task_gets_the_base_and_what_is_passed_and_nothing_else() {
        let settings = TaskEnvSettings {
            file: None,
            pass: vec!["DOKPLOY_URL".into()],
        };
        let worker = env(&[
            ("PATH", "/bin"),
            ("HOME", "/home/w"),
            ("DOKPLOY_URL", "https://dokploy"),
            ("GITHUB_TOKEN", "ghp_worker_token"),
            ("UNRELATED", "x"),
        ]);
        let built = settings.build(worker, &[]).unwrap();
        let names: Vec<&str> = built.vars.keys().map(String::as_str).collect();
        assert_eq!(names, ["DOKPLOY_URL", "HOME", "PATH"]);
        assert_eq!(
            built.masker.mask("token ghp_worker_token here"),
            "token *** here"
        );
        let bare = TaskEnvSettings::default().build(env(&[]), &[]).unwrap();
        assert_eq!(bare.vars["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn the_file_is_read_each_time_wins_and_its_long_values_are_masked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task.env");
        std::fs::write(
            &path,
            "# comment\nexport VAULT_TOKEN=\"s.abcdef123\"\nMODE=prod\nPATH=/opt/bin\n",
        )
        .unwrap();
        let settings = TaskEnvSettings {
            file: Some(path.clone()),
            pass: vec![],
        };
        let built = settings.build(env(&[("PATH", "/bin")]), &[]).unwrap();
        assert_eq!(built.vars["VAULT_TOKEN"], "s.abcdef123");
        assert_eq!(built.vars["PATH"], "/opt/bin");
        assert_eq!(
            built.masker.mask("using s.abcdef123 in prod"),
            "using *** in prod"
        );
        std::fs::write(&path, "VAULT_TOKEN=rotated-token\n").unwrap();
        let rotated = settings.build(env(&[]), &[]).unwrap();
        assert_eq!(rotated.vars["VAULT_TOKEN"], "rotated-token");
    }

    #[test]
    fn a_missing_or_broken_file_is_an_error_naming_it_without_its_values() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.env");
        let settings = TaskEnvSettings {
            file: Some(missing.clone()),
            pass: vec![],
        };
        let err = settings.build(env(&[]), &[]).unwrap_err().to_string();
        assert!(
            err.contains("TASK_ENV_FILE") && err.contains("missing.env"),
            "{err}"
        );

        let broken = dir.path().join("broken.env");
        std::fs::write(&broken, "GOOD=1\nBAD LINE s3cr3t-value\n").unwrap();
        let settings = TaskEnvSettings {
            file: Some(broken),
            pass: vec![],
        };
        let err = settings.build(env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("broken.env"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn the_longest_secret_is_masked_first() {
        let masker = Masker::new(vec!["abc".into(), "abcdef".into(), String::new()]);
        assert_eq!(masker.mask("xabcdefx abc"), "x***x ***");
    }
}
