//! The gateway's configuration: one clap struct, every flag also an environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use iac_shared::deploy::EnvironmentArgs;
use iac_shared::events::parse_branch;
use iac_shared::nats::{NatsArgs, parse_duration, parse_positive_duration, parse_secret};
use iac_shared::rules::{Rules, RulesError};
use iac_shared::telemetry::LogArgs;
use secrecy::{ExposeSecret, SecretString};

/// Shorter webhook secrets are refused at start: GitHub's HMAC is only as strong as its key.
pub const MIN_SECRET_BYTES: usize = 16;

/// The command line: no subcommand serves, `sign` prints a signature.
#[derive(Debug, Parser)]
#[command(
    name = "iac-gateway",
    version,
    about = "Verifies GitHub webhooks and manual sync requests and stores them in JetStream before answering.",
    after_help = "`iac-gateway deploy --help`: the client that deploys a commit through a gateway's POST /deploy."
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prints the `X-Hub-Signature-256` value of BODY under WEBHOOK_SECRET.
    Sign {
        /// The exact request body that will be sent.
        body: String,
    },
}

/// Everything `run` needs.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub log: LogArgs,

    /// HMAC secret shared with GitHub (and with operators calling POST /sync).
    #[arg(
        long = "webhook-secret",
        env = "WEBHOOK_SECRET",
        value_name = "WEBHOOK_SECRET",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub webhook_secret: SecretString,

    /// HTTP port.
    #[arg(
        long = "webhook-port",
        env = "WEBHOOK_PORT",
        value_name = "WEBHOOK_PORT",
        default_value_t = 8080
    )]
    pub port: u16,

    /// HTTP bind address.
    #[arg(
        long = "webhook-bind",
        env = "WEBHOOK_BIND",
        value_name = "WEBHOOK_BIND",
        default_value = "0.0.0.0"
    )]
    pub bind: IpAddr,

    /// The deployed branch; pushes to other refs are ignored.
    #[arg(
        long = "git-branch",
        env = "GIT_BRANCH",
        value_name = "GIT_BRANCH",
        default_value = "main",
        value_parser = parse_branch
    )]
    pub branch: String,

    /// Largest accepted request body, in bytes.
    #[arg(
        long = "max-body-bytes",
        env = "MAX_BODY_BYTES",
        value_name = "MAX_BODY_BYTES",
        default_value_t = 26_214_400,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_body_bytes: u64,

    /// How long to wait for JetStream to acknowledge an event before answering 503.
    #[arg(
        long = "publish-timeout",
        env = "PUBLISH_TIMEOUT",
        value_name = "PUBLISH_TIMEOUT",
        default_value = "5s",
        value_parser = parse_positive_duration
    )]
    pub publish_timeout: Duration,

    /// How long a request body may take to arrive before answering 408.
    #[arg(
        long = "body-read-timeout",
        env = "BODY_READ_TIMEOUT",
        value_name = "BODY_READ_TIMEOUT",
        default_value = "10s",
        value_parser = parse_positive_duration
    )]
    pub body_read_timeout: Duration,

    /// How long a connection may take to send a request's headers, and may stay idle between
    /// requests, before it is closed.
    #[arg(
        long = "header-read-timeout",
        env = "HEADER_READ_TIMEOUT",
        value_name = "HEADER_READ_TIMEOUT",
        default_value = "10s",
        value_parser = parse_positive_duration
    )]
    pub header_read_timeout: Duration,

    /// Connections served at once; more are answered 503 and closed.
    #[arg(
        long = "max-connections",
        env = "MAX_CONNECTIONS",
        value_name = "MAX_CONNECTIONS",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,

    /// Bytes of request bodies held, over all connections, before their signature is checked;
    /// a body that does not fit is answered 503. At least one largest `/sync` body (64 KiB).
    #[arg(
        long = "max-pending-body-bytes",
        env = "MAX_PENDING_BODY_BYTES",
        value_name = "MAX_PENDING_BODY_BYTES",
        default_value_t = 67_108_864,
        value_parser = clap::value_parser!(u32).range(crate::http::SYNC_MAX_BODY_BYTES as i64..)
    )]
    pub max_pending_body_bytes: u32,

    /// TOML file of path-to-service rules (the built-in table when absent).
    #[arg(long = "iac-rules", env = "IAC_RULES", value_name = "IAC_RULES")]
    pub rules: Option<PathBuf>,

    /// The reporter's GitHub App: a check run's or suite's Re-run is stored only when the run
    /// belongs to it (unset: Re-run is answered "ignored").
    #[arg(
        long = "github-app-id",
        env = "GITHUB_APP_ID",
        value_name = "GITHUB_APP_ID"
    )]
    pub github_app_id: Option<u64>,

    #[command(flatten)]
    pub deploy: DeployArgs,
}

/// `POST /deploy`, the timestamped signatures and the repository check.
#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    /// HMAC secret of `/deploy` and `/deploy/status` (WEBHOOK_SECRET when unset, as the
    /// original runner's clients sign with that one).
    #[arg(
        long = "deploy-secret",
        env = "DEPLOY_SECRET",
        value_name = "DEPLOY_SECRET",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub deploy_secret: Option<SecretString>,

    /// `DEPLOY_ENVS` (what `/deploy` accepts) and `PUSH_ENV`, equal across the services: the
    /// gateway creates the worker's consumer of each environment before it stores an event for
    /// it (a consumer created later would not see it).
    #[command(flatten)]
    pub environments: EnvironmentArgs,

    /// How long a `wait: true` deployment request is held before it is answered 202
    /// in_progress.
    #[arg(
        long = "deploy-wait-timeout",
        env = "DEPLOY_WAIT_TIMEOUT",
        value_name = "DEPLOY_WAIT_TIMEOUT",
        default_value = "30m",
        value_parser = parse_positive_duration
    )]
    pub wait_timeout: Duration,

    /// How long a final deployment is answered from its summary (`cached`) instead of being
    /// run again, as the original's RECENT_DEPLOY_TTL_SECONDS.
    #[arg(
        long = "deploy-cache-ttl",
        env = "DEPLOY_CACHE_TTL",
        value_name = "DEPLOY_CACHE_TTL",
        default_value = "10m",
        value_parser = parse_duration
    )]
    pub cache_ttl: Duration,

    /// Whether `POST /sync` is served (`false`: answered 404).
    #[arg(
        long = "legacy-sync",
        env = "LEGACY_SYNC",
        value_name = "LEGACY_SYNC",
        default_value = "true",
        value_parser = parse_switch,
        action = clap::ArgAction::Set
    )]
    pub legacy_sync: bool,

    /// `owner/repo` whose pushes are accepted; pushes for another repository are ignored.
    #[arg(
        long = "github-repo",
        env = "GITHUB_REPO",
        value_name = "GITHUB_REPO",
        value_parser = parse_repository
    )]
    pub github_repo: Option<String>,

    /// The deployed repository's clone URL; its `owner/repo` is the accepted repository when
    /// GITHUB_REPO is unset.
    #[arg(
        long = "git-repo-url",
        env = "GIT_REPO_URL",
        value_name = "GIT_REPO_URL",
        hide_env_values = true
    )]
    pub git_repo_url: Option<String>,
}

/// `true`/`false` and the words operators use for them.
fn parse_switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// `owner/repo`: two non-empty parts of letters, digits, `-`, `_` and `.`.
fn parse_repository(s: &str) -> Result<String, String> {
    let s = s.trim();
    let mut parts = s.split('/');
    let valid = match (parts.next(), parts.next(), parts.next()) {
        (Some(owner), Some(name), None) => [owner, name].iter().all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.len() <= 100
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }),
        _ => false,
    };
    if valid {
        Ok(s.to_string())
    } else {
        Err("expected owner/repo".into())
    }
}

/// The `owner/repo` of a GitHub clone URL (`https://github.com/o/r.git`,
/// `git@github.com:o/r.git`, `ssh://git@host/o/r`): its last two path parts, `.git` removed.
pub fn repository_of_url(url: &str) -> Option<String> {
    let url = url.trim().trim_end_matches('/');
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?.1,
        None => url.split_once(':')?.1,
    };
    let path = path.strip_suffix(".git").unwrap_or(path);
    let mut parts = path.rsplit('/');
    let (name, owner) = (parts.next()?, parts.next()?);
    parse_repository(&format!("{owner}/{name}")).ok()
}

impl DeployArgs {
    /// The repository pushes must be for, if the gateway knows it.
    pub fn repository(&self) -> Option<String> {
        self.github_repo
            .clone()
            .or_else(|| self.git_repo_url.as_deref().and_then(repository_of_url))
    }
}

impl Cli {
    /// Parses the process's arguments; prints help, the version or the error and exits as
    /// clap does.
    pub fn parse_process() -> Self {
        Self::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the first item is the program name), falling back to the environment,
    /// where a variable set to the empty string counts as unset.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = iac_shared::env::empty_is_unset(Cli::command());
        let mut matches = command.try_get_matches_from_mut(args)?;
        let cli = Cli::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))?;
        // Checked here rather than in a value parser, whose error would quote the secret.
        let secrets = [
            ("WEBHOOK_SECRET", Some(&cli.config.webhook_secret)),
            ("DEPLOY_SECRET", cli.config.deploy.deploy_secret.as_ref()),
        ];
        for (name, secret) in secrets {
            if secret.is_some_and(|s| s.expose_secret().len() < MIN_SECRET_BYTES) {
                return Err(command.error(
                    ErrorKind::ValueValidation,
                    format!(
                        "{name} must be at least {MIN_SECRET_BYTES} bytes long \
                         (e.g. the output of `openssl rand -hex 32`)"
                    ),
                ));
            }
        }
        if let Some(url) = &cli.config.deploy.git_repo_url
            && cli.config.deploy.github_repo.is_none()
            && repository_of_url(url).is_none()
        {
            return Err(command.error(
                ErrorKind::ValueValidation,
                "GIT_REPO_URL: cannot read owner/repo from it; set GITHUB_REPO",
            ));
        }
        Ok(cli)
    }
}

impl Config {
    /// The secret of `/deploy` and `/deploy/status`: DEPLOY_SECRET, else WEBHOOK_SECRET.
    pub fn deploy_secret(&self) -> SecretString {
        self.deploy
            .deploy_secret
            .clone()
            .unwrap_or_else(|| self.webhook_secret.clone())
    }

    /// The rules the previews use: `IAC_RULES` when set, else the built-in table.
    pub fn load_rules(&self) -> Result<Rules, RulesError> {
        Rules::load_or_default(self.rules.as_deref())
    }

    /// A configuration from command-line arguments (without the program name), environment
    /// variables filling what they do not give: how tests build one.
    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let program = std::iter::once(std::ffi::OsString::from("iac-gateway"));
        Cli::try_parse_args(program.chain(args.into_iter().map(Into::into))).map(|cli| cli.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "config-test-secret-1234";

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::try_from_args(["--webhook-secret", SECRET]).unwrap();
        assert_eq!(config.port, 8080);
        assert_eq!(config.bind.to_string(), "0.0.0.0");
        assert_eq!(config.branch, "main");
        assert_eq!(config.max_body_bytes, 25 * 1024 * 1024);
        assert_eq!(config.publish_timeout, Duration::from_secs(5));
        assert_eq!(config.body_read_timeout, Duration::from_secs(10));
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.max_connections, 256);
        assert_eq!(config.max_pending_body_bytes, 64 * 1024 * 1024);
        assert!(config.rules.is_none());
        assert_eq!(
            config.deploy.environments.deploy_envs.0,
            ["staging", "production"]
        );
        assert_eq!(config.deploy.wait_timeout, Duration::from_secs(30 * 60));
        assert_eq!(config.deploy.cache_ttl, Duration::from_secs(600));
        assert!(config.deploy.legacy_sync);
        assert_eq!(config.deploy_secret().expose_secret(), SECRET);
        assert_eq!(config.deploy.repository(), None);
    }

    #[test]
    fn the_deploy_settings_are_read_as_documented() {
        let config = Config::try_from_args([
            "--webhook-secret",
            SECRET,
            "--deploy-secret",
            "another-secret-of-24-b",
            "--deploy-envs",
            "qa, prod",
            "--deploy-wait-timeout",
            "90",
            "--legacy-sync",
            "false",
            "--git-repo-url",
            "https://token@github.com/acme/infra.git",
        ])
        .unwrap();
        assert_eq!(
            config.deploy_secret().expose_secret(),
            "another-secret-of-24-b"
        );
        assert_eq!(
            config.deploy.environments.deploy_envs.0,
            ["qa", "production"]
        );
        assert_eq!(config.deploy.wait_timeout, Duration::from_secs(90));
        assert!(!config.deploy.legacy_sync);
        assert_eq!(config.deploy.repository().as_deref(), Some("acme/infra"));
    }

    #[test]
    fn the_repository_is_read_from_every_kind_of_clone_url() {
        for url in [
            "https://github.com/acme/infra.git",
            "https://x-access-token:t@github.com/acme/infra",
            "git@github.com:acme/infra.git",
            "ssh://git@github.com/acme/infra.git/",
        ] {
            assert_eq!(
                repository_of_url(url).as_deref(),
                Some("acme/infra"),
                "{url}"
            );
        }
        for url in ["/srv/git/infra", "infra", "https://github.com/"] {
            assert_eq!(repository_of_url(url), None, "{url}");
        }
    }

    #[test]
    fn a_deploy_secret_shorter_than_16_bytes_is_refused_without_being_shown() {
        let err = Config::try_from_args([
            "--webhook-secret",
            SECRET,
            "--deploy-secret",
            "short-secret",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("DEPLOY_SECRET") && err.contains("16"), "{err}");
        assert!(!err.contains("short-secret"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_variable() {
        for (flag, value, variable) in [
            ("--publish-timeout", "0s", "PUBLISH_TIMEOUT"),
            ("--body-read-timeout", "soon", "BODY_READ_TIMEOUT"),
            ("--max-body-bytes", "0", "MAX_BODY_BYTES"),
            ("--git-branch", "a..b", "GIT_BRANCH"),
            ("--webhook-bind", "everywhere", "WEBHOOK_BIND"),
            ("--header-read-timeout", "0", "HEADER_READ_TIMEOUT"),
            ("--max-connections", "0", "MAX_CONNECTIONS"),
            ("--deploy-envs", "staging,Prod-EU", "DEPLOY_ENVS"),
            ("--deploy-envs", "staging,staging", "DEPLOY_ENVS"),
            ("--deploy-wait-timeout", "0", "DEPLOY_WAIT_TIMEOUT"),
            ("--legacy-sync", "sometimes", "LEGACY_SYNC"),
            ("--github-repo", "just-a-name", "GITHUB_REPO"),
            ("--git-repo-url", "/srv/git/infra", "GIT_REPO_URL"),
            (
                "--max-pending-body-bytes",
                "65535",
                "MAX_PENDING_BODY_BYTES",
            ),
        ] {
            let err = Config::try_from_args(["--webhook-secret", SECRET, flag, value]).unwrap_err();
            assert!(err.to_string().contains(variable), "{flag}: {err}");
        }
        let err = Config::try_from_args(["--webhook-secret", ""]).unwrap_err();
        assert!(err.to_string().contains("WEBHOOK_SECRET"), "{err}");
    }

    #[test]
    fn a_webhook_secret_shorter_than_16_bytes_is_refused_without_being_shown() {
        let err = Config::try_from_args(["--webhook-secret", "fifteen-bytes!!"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("WEBHOOK_SECRET") && err.contains("16"),
            "{err}"
        );
        assert!(!err.contains("fifteen-bytes!!"), "{err}");
        assert!(Config::try_from_args(["--webhook-secret", "sixteen-bytes!!!"]).is_ok());
    }

    #[test]
    fn durations_are_also_bare_seconds() {
        let config = Config::try_from_args(["--webhook-secret", SECRET, "--publish-timeout", "7"]);
        assert_eq!(config.unwrap().publish_timeout, Duration::from_secs(7));
    }

    #[test]
    fn empty_variables_count_as_unset() {
        if !iac_shared::env::in_child_with_empty_variables(
            module_path!(),
            "empty_variables_count_as_unset",
            &Cli::command(),
        ) {
            return;
        }
        let config = Config::try_from_args(["--webhook-secret", SECRET]).unwrap();
        assert_eq!(config.port, 8080);
        assert_eq!(config.branch, "main");
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert!(config.rules.is_none());
        assert!(config.nats.user.is_none() && config.nats.creds.is_none());
    }
}
