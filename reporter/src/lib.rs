//! iac-reporter: turns sync results into GitHub commit statuses, in order, through failures,
//! with any number of processes sharing the work.
//!
//! - [`config`]: the settings (flags and environment variables).
//! - [`status`]: which statuses an event or result asks for (pure).
//! - [`order`]: the claim per commit and context that keeps an older status from overwriting a
//!   newer one, with the lease that allows one post in flight at a time, and the decisions
//!   taken on it (pure).
//! - [`github`]: the commit status client, its error kinds, backoff and the rate-limit gate.
//! - [`deliver`]: one message end to end: plan, claim, post, ack or retry.
//! - [`metrics`]: the Prometheus metrics.

pub mod config;
pub mod deliver;
pub mod github;
pub mod metrics;
pub mod order;
pub mod status;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv};
use futures::StreamExt;
use iac_shared::names::*;
use iac_shared::nats::{
    ProvisionError, REPORTER_DEFAULT_ACK_WAIT, connect, ensure_status_bucket,
    reporter_consumer_config, reporter_events_consumer_config,
};
use iac_shared::runtime::{retry_until_shutdown, start_consumers};
use iac_shared::shutdown::Shutdown;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use config::Config;
use deliver::Reporter;
use github::{Gate, GithubClient};
use metrics::Metrics;

/// Runs the reporter until `shutdown`, then finishes the messages in hand.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let github = match &config.github_token {
        Some(token) => Some(
            GithubClient::new(
                config.github_api_url.clone(),
                token.clone(),
                config.github_timeout,
            )
            .context("building the GitHub client")?,
        ),
        None => {
            tracing::warn!(
                "GITHUB_TOKEN is not set: log-only mode, each status is logged instead of posted"
            );
            None
        }
    };
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    if config.metrics_port != 0 {
        let ready = ready.clone();
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.metrics_port));
        let bound = iac_shared::ops::serve(
            addr,
            Arc::new(registry),
            Arc::new(move || ready.load(Ordering::Relaxed)),
            shutdown.clone(),
        )
        .await
        .with_context(|| format!("METRICS_PORT: cannot listen on {addr}"))?;
        tracing::info!(%bound, "serving /metrics, /health and /ready");
    }

    let client = connect(&config.nats, "iac-reporter").await?;
    let js = jetstream::new(client);
    let wanted = [
        (
            RESULTS_STREAM,
            reporter_consumer_config(REPORTER_DEFAULT_ACK_WAIT),
        ),
        (
            EVENTS_STREAM,
            reporter_events_consumer_config(REPORTER_DEFAULT_ACK_WAIT),
        ),
    ];
    let Some([results, events]) =
        start_consumers(&js, &config.nats.streams, wanted, &shutdown).await?
    else {
        return Ok(());
    };
    let statuses = status_bucket(&js, &config, &shutdown).await?;

    let reporter = Arc::new(Reporter {
        settings: config.status_settings(),
        github,
        statuses,
        gate: Gate::default(),
        metrics,
        lease: config.github_timeout + order::LEASE_MARGIN,
    });
    let slots = Arc::new(Semaphore::new(config.concurrency.into()));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        concurrency = config.concurrency,
        "reporting statuses from {RESULTS_STREAM} and queued pushes from {EVENTS_STREAM}"
    );
    tokio::join!(
        consume(results, reporter.clone(), slots.clone(), shutdown.clone()),
        consume(events, reporter, slots, shutdown),
    );
    tracing::info!("stopped");
    Ok(())
}

/// `IAC_STATUSES`: the newest claimed status per (repository, commit, context). Created here
/// when missing and NATS lets this user (local mode); else provisioned by the operator.
async fn status_bucket(
    js: &jetstream::Context,
    config: &Config,
    shutdown: &Shutdown,
) -> anyhow::Result<kv::Store> {
    retry_until_shutdown(
        shutdown,
        Duration::from_millis(200),
        || ensure_status_bucket(js, &config.nats.streams),
        |e, delay| {
            if matches!(e, ProvisionError::Drift { .. }) {
                return false;
            }
            tracing::warn!(error = %e, retry_in = ?delay, "status bucket {STATUS_BUCKET} not ready yet");
            true
        },
    )
    .await
    .with_context(|| format!("checking the {STATUS_BUCKET} bucket"))
}

/// Pulls from `consumer` and hands each message to a task, at most as many at once as there
/// are free `slots`; on shutdown stops pulling and waits for the tasks.
async fn consume(
    consumer: PullConsumer,
    reporter: Arc<Reporter>,
    slots: Arc<Semaphore>,
    shutdown: Shutdown,
) {
    let mut tasks = JoinSet::new();
    let batch = slots.available_permits().max(1);
    'pull: while !shutdown.is_triggered() {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(batch)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull messages yet");
                if shutdown.sleep_or_shutdown(Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = shutdown.wait() => break 'pull,
            };
            match next {
                Some(Ok(message)) => {
                    // Both consumers share the slots, so wait for one only with a message in hand.
                    let slot = tokio::select! {
                        slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                        _ = shutdown.wait() => {
                            // Hand it back now rather than after the ack wait.
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                            break 'pull;
                        }
                    };
                    let reporter = reporter.clone();
                    tasks.spawn(async move {
                        reporter.handle(message).await;
                        drop(slot);
                    });
                }
                Some(Err(e)) => tracing::warn!(error = %e, "pulling messages failed; continuing"),
                None => break,
            }
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
}
