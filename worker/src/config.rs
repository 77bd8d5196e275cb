//! The worker's settings: one clap struct, every flag also an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use iac_shared::deploy::EnvironmentArgs;
use iac_shared::events::parse_branch;
use iac_shared::nats::{NatsArgs, WorkerConsumerArgs, parse_duration, parse_positive_duration};
use iac_shared::telemetry::LogArgs;

use crate::repo_url::RepoUrl;
use crate::requirements::{self, ENVS_DIR, TaskRequirements};
use crate::task::SyncCommand;
use crate::task_env::{TaskEnvSettings, parse_pass_name};

/// Runs the syncs of iac-runner: one at a time, from git, durable across crashes.
#[derive(Debug, Clone, Parser)]
#[command(name = "iac-worker", version, about, args_override_self = true)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub log: LogArgs,

    /// The monorepo to clone; may carry credentials (`https://user:token@host/owner/repo.git`).
    #[arg(
        long = "git-repo-url",
        env = "GIT_REPO_URL",
        value_name = "GIT_REPO_URL",
        hide_env_values = true,
        value_parser = parse_repo_url
    )]
    pub repo_url: RepoUrl,

    /// The deployed branch.
    #[arg(
        long = "git-branch",
        env = "GIT_BRANCH",
        value_name = "GIT_BRANCH",
        default_value = "main",
        value_parser = parse_branch
    )]
    pub branch: String,

    /// Directory holding the checkout, the workspace lock and the running task's process group.
    #[arg(
        long = "workspace",
        env = "WORKSPACE",
        value_name = "WORKSPACE",
        default_value = "/workspace"
    )]
    pub workspace: PathBuf,

    /// Command run for each service, `{task}` replaced by its invoke task (no shell involved).
    #[arg(
        long = "sync-command",
        env = "SYNC_COMMAND",
        value_name = "SYNC_COMMAND",
        default_value = "invoke {task}",
        value_parser = SyncCommand::parse
    )]
    pub sync_command: SyncCommand,

    /// Longest a single service's task may run before it is killed and reported `timed_out`.
    #[arg(
        long = "sync-timeout",
        env = "SYNC_TIMEOUT",
        value_name = "SYNC_TIMEOUT",
        default_value = "30m",
        value_parser = parse_positive_duration
    )]
    pub sync_timeout: Duration,

    /// Port of `/metrics`, `/health` and `/ready` (0 = off).
    #[arg(
        long = "metrics-port",
        env = "METRICS_PORT",
        value_name = "METRICS_PORT",
        default_value_t = 0
    )]
    pub metrics_port: u16,

    /// TOML file replacing the default path-to-service rules.
    #[arg(long = "iac-rules", env = "IAC_RULES", value_name = "IAC_RULES")]
    pub rules: Option<PathBuf>,

    #[command(flatten)]
    pub consumer: WorkerConsumerArgs,

    #[command(flatten)]
    pub environments: EnvironmentArgs,

    #[command(flatten)]
    pub run_log: crate::runlog::RunLogArgs,

    /// Tags whose commits may be deployed besides those on `GIT_BRANCH`: a git glob over the
    /// tag's name (`v*` matches `v1.2.0`).
    #[arg(
        long = "deploy-tag-pattern",
        env = "DEPLOY_TAG_PATTERN",
        value_name = "DEPLOY_TAG_PATTERN",
        default_value = "v*",
        value_parser = parse_tag_pattern
    )]
    pub deploy_tag_pattern: String,

    /// How often the push environment's applied commit is compared with the branch head
    /// (`git ls-remote`), at start and then at this interval; a head never synced (its
    /// webhook never came) is published as a push. `0` turns it off.
    #[arg(
        long = "reconcile-interval",
        env = "RECONCILE_INTERVAL",
        value_name = "RECONCILE_INTERVAL",
        default_value = "5m",
        value_parser = parse_duration
    )]
    pub reconcile_interval: Duration,

    /// On SIGTERM, how long a running sync may go on before it is killed and handed back.
    #[arg(
        long = "shutdown-grace",
        env = "SHUTDOWN_GRACE",
        value_name = "SHUTDOWN_GRACE",
        default_value = "25s",
        value_parser = parse_duration
    )]
    pub shutdown_grace: Duration,

    /// Lines of a failed task's output kept in its result.
    #[arg(
        long = "output-tail-lines",
        env = "OUTPUT_TAIL_LINES",
        value_name = "OUTPUT_TAIL_LINES",
        default_value_t = 20,
        value_parser = clap::value_parser!(u16).range(1..=1000)
    )]
    pub output_tail_lines: u16,

    /// Dotenv file whose variables every task gets, read again at every sync so a rotated
    /// secret applies without a restart; its values of 6 or more characters are masked.
    #[arg(
        long = "task-env-file",
        env = "TASK_ENV_FILE",
        value_name = "TASK_ENV_FILE"
    )]
    pub task_env_file: Option<PathBuf>,

    /// Comma-separated names of worker variables passed to every task as they are (never the
    /// worker's own secrets: GITHUB_TOKEN, WEBHOOK_SECRET, NATS_*, GIT_*).
    #[arg(
        long = "task-env-pass",
        env = "TASK_ENV_PASS",
        value_name = "TASK_ENV_PASS",
        value_delimiter = ',',
        value_parser = parse_pass_name
    )]
    pub task_env_pass: Vec<String>,

    /// Repository-relative requirements file, or `pyproject.toml` beside its `uv.lock`, whose
    /// packages the tasks get: installed with uv into an environment under `WORKSPACE`, built
    /// again only when the file changes.
    #[arg(
        long = "task-requirements",
        env = "TASK_REQUIREMENTS",
        value_name = "TASK_REQUIREMENTS",
        value_parser = requirements::parse_path
    )]
    pub task_requirements: Option<String>,

    /// The uv program that builds the `TASK_REQUIREMENTS` environments.
    #[arg(
        long = "task-uv",
        env = "TASK_UV",
        value_name = "TASK_UV",
        default_value = "uv"
    )]
    pub task_uv: PathBuf,

    /// Repository-relative path of the dependency manifest, read at each synced commit: which
    /// services a shared path reaches, and which services run after which.
    #[arg(
        long = "dependencies-file",
        env = "DEPENDENCIES_FILE",
        value_name = "DEPENDENCIES_FILE",
        value_parser = parse_repository_path
    )]
    pub dependencies_file: Option<String>,

    /// Tasks of one sync run at once (a service still waits for those it comes `after`).
    #[arg(
        long = "sync-parallelism",
        env = "SYNC_PARALLELISM",
        value_name = "SYNC_PARALLELISM",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub sync_parallelism: u16,
}

/// A glob over tag names: what a tag name may hold, plus the glob characters `*`, `?`, `[`, `]`.
fn parse_tag_pattern(s: &str) -> Result<String, String> {
    let pattern = s.trim();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "*?[]!-_./+@".contains(c);
    if pattern.is_empty() || pattern.starts_with(['-', '/']) || !pattern.chars().all(allowed) {
        return Err(format!(
            "{pattern:?} is not a tag pattern: expected a glob such as v* (letters, digits, \
             - _ . / + @ and the glob characters * ? [ ] !)"
        ));
    }
    Ok(pattern.to_string())
}

/// A path inside the repository: relative, without `.` or `..` components, so that it cannot
/// name a file outside the checkout.
fn parse_repository_path(s: &str) -> Result<String, String> {
    let path = s.trim();
    let components_ok = path
        .split('/')
        .all(|part| !part.is_empty() && part != "." && part != "..");
    if path.is_empty() || path.starts_with('/') || !components_ok {
        return Err("must be a path inside the repository, like deploy-dependencies.yaml".into());
    }
    Ok(path.to_string())
}

// Never fails: clap would quote the raw value, credentials included, in its error. The URL is
// checked by `Config::validate`, whose messages show it redacted.
fn parse_repo_url(s: &str) -> Result<RepoUrl, std::convert::Infallible> {
    Ok(RepoUrl::new(s.trim()))
}

impl Config {
    /// Parses flags (the first item is the program name), falling back to the environment.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = iac_shared::env::empty_is_unset(Config::command());
        let mut matches = command.try_get_matches_from_mut(args)?;
        Config::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))
    }

    /// Checks what clap cannot check without printing a secret; the error names the variable.
    pub fn validate(&self) -> Result<(), String> {
        self.repo_url
            .check()
            .map_err(|e| format!("GIT_REPO_URL: {e}"))
    }

    /// How each sync builds its tasks' environment.
    pub fn task_env(&self) -> TaskEnvSettings {
        TaskEnvSettings {
            file: self.task_env_file.clone(),
            pass: self.task_env_pass.clone(),
        }
    }

    /// How each sync gets its tasks' Python packages, in the workspace at `workspace`.
    pub fn task_requirements(&self, workspace: &std::path::Path) -> TaskRequirements {
        TaskRequirements {
            file: self.task_requirements.clone(),
            uv: self.task_uv.clone(),
            envs: workspace.join(ENVS_DIR),
            command: self.sync_command.clone(),
            timeout: self.sync_timeout,
            tail_lines: self.output_tail_lines.into(),
        }
    }

    /// How often a running sync tells NATS it is still working.
    pub fn progress_interval(&self) -> Duration {
        self.consumer.ack_wait / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_repository_url_is_refused_without_showing_its_credentials() {
        let config = Config::from_args([
            "iac-worker",
            "--git-repo-url",
            "https://deploy:hunter22@github.com",
        ])
        .unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.starts_with("GIT_REPO_URL: "), "{err}");
        assert!(!err.contains("hunter22"), "{err}");
        let ok = Config::from_args(["iac-worker", "--git-repo-url", "https://x/acme/infra.git"]);
        assert!(ok.unwrap().validate().is_ok());
    }

    #[test]
    fn a_bad_setting_names_its_variable() {
        let err = Config::try_parse_from([
            "iac-worker",
            "--git-repo-url",
            "https://x/acme/infra.git",
            "--sync-command",
            "invoke deploy",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("SYNC_COMMAND"), "{err}");
    }

    #[test]
    fn passing_a_worker_secret_to_tasks_is_a_start_up_error() {
        let parse = |pass: &str| {
            Config::try_parse_from([
                "iac-worker",
                "--git-repo-url",
                "https://x/acme/infra.git",
                "--task-env-pass",
                pass,
            ])
        };
        let err = parse("DOKPLOY_URL,GITHUB_TOKEN").unwrap_err().to_string();
        assert!(
            err.contains("TASK_ENV_PASS") && err.contains("GITHUB_TOKEN"),
            "{err}"
        );
        let ok = parse("DOKPLOY_URL, VAULT_ADDR").unwrap();
        assert_eq!(ok.task_env().pass, ["DOKPLOY_URL", "VAULT_ADDR"]);
    }

    #[test]
    fn empty_variables_count_as_unset() {
        if !iac_shared::env::in_child_with_empty_variables(
            module_path!(),
            "empty_variables_count_as_unset",
            &Config::command(),
        ) {
            return;
        }
        let config =
            Config::from_args(["iac-worker", "--git-repo-url", "https://x/acme/infra.git"])
                .unwrap();
        assert_eq!(config.consumer.max_attempts, 3);
        assert_eq!(config.shutdown_grace, Duration::from_secs(25));
        assert!(config.task_env_file.is_none() && config.task_env_pass.is_empty());
        assert!(config.nats.token.is_none());
        assert_eq!(config.deploy_tag_pattern, "v*");
        assert_eq!(
            config.environments.environments().deploy,
            ["staging", "production"]
        );
        // The one exception: an empty PUSH_ENV means "no push environment".
        assert_eq!(config.environments.environments().push, None);
    }

    #[test]
    fn environments_default_to_staging_and_production_with_pushes_to_production() {
        let config =
            Config::from_args(["iac-worker", "--git-repo-url", "https://x/acme/infra.git"])
                .unwrap();
        let envs = config.environments.environments();
        assert_eq!(envs.push.as_deref(), Some("production"));
        assert_eq!(envs.separate().collect::<Vec<_>>(), ["staging"]);
        let parse = |flag: &str, value: &str| {
            Config::try_parse_from([
                "iac-worker",
                "--git-repo-url",
                "https://x/acme/infra.git",
                flag,
                value,
            ])
        };
        let err = parse("--deploy-envs", "staging,Prod")
            .unwrap_err()
            .to_string();
        assert!(err.contains("DEPLOY_ENVS"), "{err}");
        let err = parse("--deploy-tag-pattern", "v* --all")
            .unwrap_err()
            .to_string();
        assert!(err.contains("DEPLOY_TAG_PATTERN"), "{err}");
        assert_eq!(
            parse("--deploy-tag-pattern", "release-*")
                .unwrap()
                .deploy_tag_pattern,
            "release-*"
        );
    }

    #[test]
    fn the_dependency_manifest_must_be_inside_the_repository() {
        let parse = |path: &str| {
            Config::try_parse_from([
                "iac-worker",
                "--git-repo-url",
                "https://x/acme/infra.git",
                "--dependencies-file",
                path,
            ])
        };
        for bad in ["/etc/passwd", "../x.yaml", "docs/../../x", "a//b", "./x"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("DEPENDENCIES_FILE"), "{bad}: {err}");
        }
        let ok = parse("docs/ssot/deploy-dependencies.yaml").unwrap();
        assert_eq!(
            ok.dependencies_file.as_deref(),
            Some("docs/ssot/deploy-dependencies.yaml")
        );
        assert_eq!(ok.sync_parallelism, 1, "one task at a time unless asked");
    }

    #[test]
    fn durations_are_also_bare_seconds() {
        let config = Config::from_args([
            "iac-worker",
            "--git-repo-url",
            "https://x/acme/infra.git",
            "--shutdown-grace",
            "40",
        ]);
        assert_eq!(config.unwrap().shutdown_grace, Duration::from_secs(40));
    }

    #[test]
    fn reconciliation_runs_every_five_minutes_unless_set_and_zero_turns_it_off() {
        let with = |extra: &[&str]| {
            let mut args = vec!["iac-worker", "--git-repo-url", "https://x/acme/infra.git"];
            args.extend(extra);
            Config::from_args(args).unwrap().reconcile_interval
        };
        assert_eq!(with(&[]), Duration::from_secs(300));
        assert_eq!(
            with(&["--reconcile-interval", "90"]),
            Duration::from_secs(90)
        );
        assert_eq!(with(&["--reconcile-interval", "0"]), Duration::ZERO);
        let bad = Config::from_args([
            "iac-worker",
            "--git-repo-url",
            "https://x/acme/infra.git",
            "--reconcile-interval",
            "soon",
        ]);
        assert!(bad.unwrap_err().to_string().contains("RECONCILE_INTERVAL"));
    }
}
