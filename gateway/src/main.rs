use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use iac_gateway::{Cli, Command, run};
use iac_shared::{shutdown, signature, telemetry};
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> ExitCode {
    // The client needs none of the server's settings (WEBHOOK_SECRET may be absent in CI).
    if std::env::args_os().nth(1).is_some_and(|a| a == "deploy") {
        let program = std::iter::once("iac-gateway deploy".into());
        return iac_gateway::client::main(program.chain(std::env::args_os().skip(2))).await;
    }
    let cli = Cli::parse_process();
    if let Some(Command::Sign { body }) = &cli.command {
        let secret = cli.config.webhook_secret.expose_secret().as_bytes();
        println!("{}", signature::sign(secret, body.as_bytes()));
        return ExitCode::SUCCESS;
    }
    telemetry::init(&cli.config.log);
    match serve(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let addr = SocketAddr::new(cli.config.bind, cli.config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("WEBHOOK_BIND/WEBHOOK_PORT: cannot listen on {addr}"))?;
    run(cli.config, listener, shutdown::on_signal()).await
}
