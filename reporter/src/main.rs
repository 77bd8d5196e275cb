//! `iac-reporter`: parses the configuration, sets up logging and posts statuses until SIGTERM;
//! `iac-reporter replay …` publishes stored results again (statuses are posted again);
//! `iac-reporter undelivered list|replay` shows and posts again the statuses given up.

use std::process::ExitCode;

use clap::Subcommand;
use iac_reporter::Config;
use iac_reporter::undelivered::UndeliveredCommand;
use iac_shared::cli::Invocation;
use iac_shared::names::{FINISHED_SUBJECT, RESULTS_STREAM, STARTED_SUBJECT};
use iac_shared::replay::ReplayCommand;
use iac_shared::telemetry;

/// Operator commands, read from the streams.
#[derive(Debug, Subcommand)]
enum Operation {
    /// Publish selected results of IAC_RESULTS again, so their statuses are posted again
    /// (after a GitHub outage or a token change).
    Replay(ReplayCommand),
    /// The statuses given up (a 401, or STATUS_GIVE_UP_AFTER of attempts) and kept in
    /// IAC_UNDELIVERED: `list` them, or `replay` them (post them again).
    Undelivered(UndeliveredCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    match Invocation::<Config, Operation>::parse() {
        Invocation::Serve(config) => serve(config).await,
        Invocation::Operate {
            operation: Operation::Undelivered(command),
            nats,
            log,
        } => {
            telemetry::init_for_command(&log);
            match command.run(&nats).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("iac-reporter undelivered: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Invocation::Operate {
            operation: Operation::Replay(command),
            nats,
            log,
        } => {
            telemetry::init_for_command(&log);
            let subjects = [STARTED_SUBJECT, FINISHED_SUBJECT];
            match command
                .run(&nats, "iac-reporter replay", RESULTS_STREAM, &subjects)
                .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("iac-reporter replay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    telemetry::init(&config.log);
    match iac_reporter::run(config, iac_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-reporter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
