//! `iac-gateway deploy`: asks a gateway to deploy an exact commit to an environment, signed in
//! the timestamped form, then polls `/deploy/status` until the deployment is final. It exits 0
//! only when the deployment completed, so a CI step fails with the deployment.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use iac_shared::signature::{NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_timestamped};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// The command line of `iac-gateway deploy`.
#[derive(Debug, Parser)]
#[command(
    name = "iac-gateway deploy",
    about = "Deploys an exact commit to an environment through a gateway's POST /deploy and \
             waits for the outcome; exits 0 only when the deployment completed."
)]
pub struct DeployCli {
    /// The gateway's base URL, e.g. https://iac.example.com.
    #[arg(long, env = "IAC_GATEWAY_URL")]
    pub url: String,
    /// The environment (one of the gateway's DEPLOY_ENVS).
    #[arg(long)]
    pub env: String,
    /// The exact commit: 40 hex digits.
    #[arg(long = "ref", value_name = "SHA")]
    pub commit: String,
    /// Services to deploy, comma-separated (every service when absent).
    #[arg(long, value_delimiter = ',')]
    pub services: Option<Vec<String>>,
    /// Ask the gateway to hold the request until the outcome (up to its DEPLOY_WAIT_TIMEOUT).
    #[arg(long)]
    pub wait: bool,
    /// Who asks, shown in the gateway's log and the summary.
    #[arg(long, env = "GITHUB_ACTOR", default_value = "iac-gateway deploy")]
    pub triggered_by: String,
    /// Time between two status questions.
    #[arg(long, default_value = "10s", value_parser = iac_shared::nats::parse_positive_duration)]
    pub interval: Duration,
    /// Give up (exit 1) when the deployment is not final after this long.
    #[arg(long, default_value = "60m", value_parser = iac_shared::nats::parse_positive_duration)]
    pub timeout: Duration,
    /// The gateway's DEPLOY_SECRET (or, when it has none, its WEBHOOK_SECRET).
    #[arg(long, env = "DEPLOY_SECRET", hide_env_values = true, value_parser = iac_shared::nats::parse_secret)]
    pub deploy_secret: Option<SecretString>,
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true, value_parser = iac_shared::nats::parse_secret, hide = true)]
    pub webhook_secret: Option<SecretString>,
}

/// Why the client stopped without a final outcome.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("set DEPLOY_SECRET (or WEBHOOK_SECRET) to the gateway's secret")]
    NoSecret,
    #[error("--ref must be an exact commit: 40 hex digits")]
    BadRef,
    #[error("{0}: {1}")]
    Http(String, reqwest::Error),
    #[error("{path} answered {status}: {body}")]
    Refused {
        path: &'static str,
        status: u16,
        body: String,
    },
    #[error("the deployment is not final after {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

/// A signed `POST` of `body` to `path` under `secret`, with a fresh nonce.
fn signed_post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    secret: &SecretString,
    body: &[u8],
) -> reqwest::RequestBuilder {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string();
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let signature = sign_timestamped(secret.expose_secret().as_bytes(), &timestamp, &nonce, body);
    http.post(format!("{}{path}", base.trim_end_matches('/')))
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header(TIMESTAMP_HEADER, timestamp)
        .header(NONCE_HEADER, nonce)
        .body(body.to_vec())
}

/// Sends one signed request, returning the status and the JSON answer (`{}` when not JSON).
async fn call(
    http: &reqwest::Client,
    cli: &DeployCli,
    path: &'static str,
    secret: &SecretString,
    body: &Value,
) -> Result<(u16, Value), ClientError> {
    let bytes = body.to_string().into_bytes();
    let answer = signed_post(http, &cli.url, path, secret, &bytes)
        .send()
        .await
        .map_err(|e| ClientError::Http(format!("POST {path}"), e))?;
    let status = answer.status().as_u16();
    let text = answer
        .text()
        .await
        .map_err(|e| ClientError::Http(format!("reading the answer of {path}"), e))?;
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({}));
    match status {
        200 | 202 => Ok((status, value)),
        500 if value["status"] == "failed" => Ok((status, value)),
        404 if path.ends_with("status") && value["status"] == "not_found" => Ok((status, value)),
        _ => Err(ClientError::Refused {
            path,
            status,
            body: text.chars().take(500).collect(),
        }),
    }
}

/// Runs the deployment: `Ok(true)` when it completed, `Ok(false)` when it failed.
pub async fn deploy(cli: &DeployCli) -> Result<bool, ClientError> {
    let secret = cli
        .deploy_secret
        .as_ref()
        .or(cli.webhook_secret.as_ref())
        .ok_or(ClientError::NoSecret)?;
    let commit = cli.commit.trim().to_ascii_lowercase();
    if !iac_shared::deploy::is_exact_commit(&commit) {
        return Err(ClientError::BadRef);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(cli.timeout)
        .build()
        .map_err(|e| ClientError::Http("building the HTTP client".into(), e))?;
    let mut request = json!({
        "env": cli.env,
        "ref": commit,
        "triggered_by": cli.triggered_by,
        "wait": cli.wait,
    });
    if let Some(services) = &cli.services {
        request["services"] = json!(services);
    }
    let started = Instant::now();
    let (_, answer) = call(&http, cli, "/deploy", secret, &request).await?;
    report(&answer);
    if let Some(done) = final_outcome(&answer) {
        return Ok(done);
    }
    let mut question = json!({ "env": cli.env, "ref": commit, "triggered_by": cli.triggered_by });
    if let Some(services) = &cli.services {
        question["services"] = json!(services);
    }
    if let Some(id) = answer["deployment_id"].as_str() {
        question["deployment_id"] = json!(id);
    }
    loop {
        if started.elapsed() >= cli.timeout {
            return Err(ClientError::TimedOut(cli.timeout));
        }
        tokio::time::sleep(cli.interval).await;
        let (_, answer) = call(&http, cli, "/deploy/status", secret, &question).await?;
        if let Some(done) = final_outcome(&answer) {
            report(&answer);
            return Ok(done);
        }
    }
}

/// `Some(true)` for `completed`, `Some(false)` for `failed`, `None` while not final.
fn final_outcome(answer: &Value) -> Option<bool> {
    match answer["status"].as_str() {
        Some("completed") => Some(true),
        Some("failed") => Some(false),
        _ => None,
    }
}

fn report(answer: &Value) {
    println!("{answer}");
}

/// The whole command: parses, deploys, and turns the outcome into the exit code.
pub async fn main(args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = DeployCli::parse_from(args);
    match deploy(&cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("iac-gateway deploy: the deployment failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("iac-gateway deploy: {e}");
            ExitCode::FAILURE
        }
    }
}
