//! `iac-reporter`: parses the configuration, sets up logging and posts statuses until SIGTERM;
//! `iac-reporter replay …` publishes stored results again (statuses are posted again).

use std::process::ExitCode;

use clap::Parser;
use iac_reporter::Config;
use iac_shared::names::{FINISHED_SUBJECT, RESULTS_STREAM, STARTED_SUBJECT};
use iac_shared::replay::ReplayCommand;

/// Operator commands, read from the streams.
#[derive(Debug, Parser)]
#[command(name = "iac-reporter", version)]
enum Operation {
    /// Publish selected results of IAC_RESULTS again, so their statuses are posted again
    /// (after a GitHub outage or a token change).
    Replay(ReplayCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("replay") {
        let Operation::Replay(command) = Operation::parse();
        iac_shared::telemetry::init_for_command();
        let subjects = [STARTED_SUBJECT, FINISHED_SUBJECT];
        return match command
            .run("iac-reporter replay", RESULTS_STREAM, &subjects)
            .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("iac-reporter replay: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = Config::parse();
    iac_shared::telemetry::init(&config.log);
    match iac_reporter::run(config, iac_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-reporter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
