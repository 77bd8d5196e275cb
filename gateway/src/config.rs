//! The gateway's configuration: one clap struct, every flag also an environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use iac_shared::events::parse_branch;
use iac_shared::nats::{NatsArgs, parse_positive_duration, parse_secret};
use iac_shared::rules::{Rules, RulesError};
use iac_shared::telemetry::LogArgs;
use secrecy::SecretString;

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

    /// TOML file of path-to-service rules (the built-in table when absent).
    #[arg(long = "iac-rules", env = "IAC_RULES", value_name = "IAC_RULES")]
    pub rules: Option<PathBuf>,
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
        Cli::try_parse_from(program.chain(args.into_iter().map(Into::into))).map(|cli| cli.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::try_from_args(["--webhook-secret", "s"]).unwrap();
        assert_eq!(config.port, 8080);
        assert_eq!(config.bind.to_string(), "0.0.0.0");
        assert_eq!(config.branch, "main");
        assert_eq!(config.max_body_bytes, 25 * 1024 * 1024);
        assert_eq!(config.publish_timeout, Duration::from_secs(5));
        assert_eq!(config.body_read_timeout, Duration::from_secs(10));
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
        ] {
            let err = Config::try_from_args(["--webhook-secret", "s", flag, value]).unwrap_err();
            assert!(err.to_string().contains(variable), "{flag}: {err}");
        }
        let err = Config::try_from_args(["--webhook-secret", ""]).unwrap_err();
        assert!(err.to_string().contains("WEBHOOK_SECRET"), "{err}");
    }
}
