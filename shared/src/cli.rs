//! One command-line shape for the worker and the reporter: with no subcommand the service
//! runs with its configuration; a subcommand is an operator command (`replay`, `status`).
//!
//! The NATS and logging flags are global, so `iac-worker --log-format json status` and
//! `iac-worker status --log-format json` mean the same, and `--help` lists the subcommands.
//! A subcommand does not need the service's own required settings (such as `GIT_REPO_URL`).

use clap::{FromArgMatches, Parser, Subcommand};

use crate::nats::NatsArgs;
use crate::telemetry::LogArgs;

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation<C, O> {
    /// Run the service.
    Serve(C),
    /// Run an operator command against NATS.
    Operate {
        operation: O,
        nats: NatsArgs,
        log: LogArgs,
    },
}

impl<C: Parser, O: Subcommand> Invocation<C, O> {
    /// Parses the process's arguments; prints help, the version or the error and exits as clap
    /// does.
    pub fn parse() -> Self {
        Self::try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the first item is the program name), falling back to the environment.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let command = crate::env::empty_is_unset(O::augment_subcommands(C::command()))
            .subcommand_negates_reqs(true);
        let mut matches = command.try_get_matches_from(args)?;
        if matches.subcommand().is_none() {
            return C::from_arg_matches_mut(&mut matches).map(Invocation::Serve);
        }
        let operation = O::from_arg_matches_mut(&mut matches)?;
        Ok(Invocation::Operate {
            operation,
            nats: NatsArgs::from_arg_matches_mut(&mut matches)?,
            log: LogArgs::from_arg_matches_mut(&mut matches)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, Parser, Subcommand};

    use super::*;
    use crate::telemetry::LogFormat;

    #[derive(Debug, Parser)]
    #[command(name = "svc")]
    struct Config {
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        log: LogArgs,
        #[arg(long, env = "SVC_TEST_REQUIRED_SETTING")]
        required: String,
    }

    #[derive(Debug, Subcommand)]
    enum Operation {
        /// Shows things.
        Status(Count),
    }

    #[derive(Debug, Args)]
    struct Count {
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
    }

    type Cli = Invocation<Config, Operation>;

    #[test]
    fn without_a_subcommand_the_service_configuration_is_parsed_and_checked() {
        let Ok(Cli::Serve(config)) = Cli::try_parse_from(["svc", "--required", "x"]) else {
            panic!("serve expected");
        };
        assert_eq!(config.required, "x");
        let err = Cli::try_parse_from(["svc"]).unwrap_err().to_string();
        assert!(err.contains("--required"), "{err}");
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand_without_service_settings() {
        for args in [
            &[
                "svc",
                "--log-format",
                "json",
                "--nats-url",
                "nats://h:1",
                "status",
                "-n",
                "3",
            ][..],
            &[
                "svc",
                "status",
                "-n",
                "3",
                "--log-format",
                "json",
                "--nats-url",
                "nats://h:1",
            ],
        ] {
            let Ok(Cli::Operate {
                operation: Operation::Status(count),
                nats,
                log,
            }) = Cli::try_parse_from(args)
            else {
                panic!("{args:?}: an operator command expected");
            };
            assert_eq!(count.n, 3);
            assert_eq!(log.format, LogFormat::Json);
            assert_eq!(nats.urls[0].host(), "h", "{args:?}");
        }
    }

    #[test]
    fn help_lists_the_subcommands() {
        let err = Cli::try_parse_from(["svc", "--help"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        let help = err.to_string();
        assert!(
            help.contains("status") && help.contains("Shows things"),
            "{help}"
        );
    }
}
