//! `iac-worker`: parses the configuration, sets up logging and runs the worker until SIGTERM;
//! `iac-worker replay …` publishes stored events again, `iac-worker status` shows the last syncs,
//! `iac-worker provision` creates the streams, consumers and buckets (as the NATS admin user).

use std::process::ExitCode;

use clap::Subcommand;
use iac_shared::cli::Invocation;
use iac_shared::history::StatusCommand;
use iac_shared::names::{DEPLOY_SUBJECT_PREFIX, EVENTS_STREAM, PUSH_SUBJECT, SYNC_SUBJECT};
use iac_shared::provision::ProvisionCommand;
use iac_shared::replay::ReplayCommand;
use iac_shared::telemetry;
use iac_worker::Config;

/// Operator commands.
#[derive(Debug, Subcommand)]
enum Operation {
    /// Publish selected events of IAC_EVENTS again: they go through the serialized path and
    /// sync once more.
    Replay(ReplayCommand),
    /// Show the last syncs (time, commit, trigger, per-service outcome, duration) and the queue.
    Status(StatusCommand),
    /// Create the streams, the consumers and the buckets, or bring them back to the
    /// expected configuration (run once as the NATS admin user, before the services start).
    Provision(ProvisionCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let (operation, nats, log) = match Invocation::<Config, Operation>::parse() {
        Invocation::Serve(config) => return serve(config).await,
        Invocation::Operate {
            operation,
            nats,
            log,
        } => (operation, nats, log),
    };
    telemetry::init_for_command(&log);
    let outcome = match operation {
        Operation::Replay(command) => command
            .run(
                &nats,
                "iac-worker replay",
                EVENTS_STREAM,
                &[
                    PUSH_SUBJECT,
                    SYNC_SUBJECT,
                    &format!("{DEPLOY_SUBJECT_PREFIX}.*"),
                ],
            )
            .await
            .map_err(|e| e.to_string()),
        Operation::Status(command) => command
            .run(&nats, "iac-worker status")
            .await
            .map_err(|e| e.to_string()),
        Operation::Provision(command) => command
            .run(&nats, "iac-worker provision")
            .await
            .map_err(|e| e.to_string()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    telemetry::init(&config.log);
    match iac_worker::run(config, iac_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
