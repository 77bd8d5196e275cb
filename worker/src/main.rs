//! `iac-worker`: parses the configuration, sets up logging and runs the worker until SIGTERM;
//! `iac-worker replay …` publishes stored events again, `iac-worker status` shows the last syncs.

use std::process::ExitCode;

use clap::Parser;
use iac_shared::history::StatusCommand;
use iac_shared::names::{EVENTS_STREAM, PUSH_SUBJECT, SYNC_SUBJECT};
use iac_shared::replay::ReplayCommand;
use iac_shared::telemetry;

/// Operator commands, read from the streams.
#[derive(Debug, Parser)]
#[command(name = "iac-worker", version)]
enum Operation {
    /// Publish selected events of IAC_EVENTS again: they go through the serialized path and
    /// sync once more.
    Replay(ReplayCommand),
    /// Show the last syncs (time, commit, trigger, per-service outcome, duration) and the queue.
    Status(StatusCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    if matches!(
        std::env::args().nth(1).as_deref(),
        Some("replay" | "status")
    ) {
        telemetry::init_for_command();
        let outcome = match Operation::parse() {
            Operation::Replay(command) => command
                .run(
                    "iac-worker replay",
                    EVENTS_STREAM,
                    &[PUSH_SUBJECT, SYNC_SUBJECT],
                )
                .await
                .map_err(|e| e.to_string()),
            Operation::Status(command) => command
                .run("iac-worker status")
                .await
                .map_err(|e| e.to_string()),
        };
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("iac-worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = iac_worker::Config::parse();
    telemetry::init(&config.log);
    match iac_worker::run(config, iac_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
