//! The gateway's configuration: one clap struct, every flag also an environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use iac_shared::events::parse_branch;
use iac_shared::nats::{NatsArgs, parse_positive_duration, parse_secret};
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
    about = "Verifies GitHub webhooks and manual sync requests and stores them in JetStream before answering."
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
        if cli.config.webhook_secret.expose_secret().len() < MIN_SECRET_BYTES {
            return Err(command.error(
                ErrorKind::ValueValidation,
                format!(
                    "WEBHOOK_SECRET must be at least {MIN_SECRET_BYTES} bytes long \
                     (e.g. the output of `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(cli)
    }
}

impl Config {
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
