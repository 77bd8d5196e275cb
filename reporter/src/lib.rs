//! iac-reporter: turns sync results into GitHub commit statuses, in order, through failures,
//! with any number of processes sharing the work.
//!
//! - [`config`]: the settings (flags and environment variables).
//! - [`status`]: which statuses an event or result asks for (pure).
//! - [`order`]: the claim per commit and context that keeps an older status from overwriting a
//!   newer one, with the lease that allows one post in flight at a time, and the decisions
//!   taken on it (pure).
//! - [`github`]: the commit status and check run client, its error kinds, backoff and the
//!   rate-limit gate.
//! - [`app_auth`]: GitHub App authentication: the JWT and the installation token, refreshed.
//! - [`checks`]: one check run per service and sync (`CHECK_RUNS=true`): what to send (pure),
//!   and its id and last state kept in `IAC_STATUSES`.
//! - [`deliver`]: one message end to end: plan, claim, post, ack, retry or give up.
//! - [`undelivered`]: the statuses given up, kept in `IAC_UNDELIVERED`: when to give up (pure),
//!   and `iac-reporter undelivered list|replay`.
//! - [`notify`]: failures and recoveries announced to `NOTIFY_URL`, decided once per state
//!   change in `IAC_NOTIFY` and sent in a task of their own.
//! - [`metrics`]: the Prometheus metrics.
//! - [`web`]: the run pages on `WEB_PORT` and the signed links statuses carry to them.

pub mod app_auth;
pub mod checks;
pub mod config;
pub mod deliver;
pub mod github;
pub mod metrics;
pub mod notify;
pub mod order;
pub mod status;
pub mod undelivered;
pub mod web;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use iac_shared::names::*;
use iac_shared::nats::{
    ProvisionError, REPORTER_DEFAULT_ACK_WAIT, connect, ensure_notify_bucket, ensure_status_bucket,
    ensure_stream, reporter_consumer_config, reporter_events_consumer_config,
    undelivered_stream_config,
};
use iac_shared::runtime::{retry_until_shutdown, start_consumers};
use iac_shared::shutdown::Shutdown;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use config::Config;
use deliver::Reporter;
use github::Gate;
use metrics::Metrics;
use status::StatusSettings;

/// Runs the reporter until `shutdown`, then finishes the messages in hand.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let github = config
        .github
        .client()
        .context("building the GitHub client")?;
    if github.is_none() {
        tracing::warn!(
            "GITHUB_TOKEN is not set: log-only mode, each status is logged instead of posted"
        );
    } else if github.as_ref().is_some_and(|g| g.is_app()) {
        tracing::info!(
            check_runs = config.checks.check_runs,
            commit_statuses = config.checks.commit_statuses,
            "authenticating as a GitHub App installation"
        );
    }
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let web_metrics = web::WebMetrics::register(&mut registry);
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
    let Some(statuses) = when_ready(&shutdown, STATUS_BUCKET, || {
        ensure_status_bucket(&js, &config.nats.streams)
    })
    .await?
    else {
        return Ok(());
    };
    let undelivered = undelivered_stream_config(&config.nats.streams);
    if when_ready(&shutdown, UNDELIVERED_STREAM, || {
        ensure_stream(&js, undelivered.clone())
    })
    .await?
    .is_none()
    {
        return Ok(());
    }

    let Some(notifications) = start_notifier(&config, &js, &metrics, &shutdown).await? else {
        return Ok(());
    };
    let (notifier, notifier_task) = notifications.unzip();

    let Some(run_links) = start_web(&config, &js, web_metrics, &shutdown).await? else {
        return Ok(());
    };
    let reporter = Arc::new(Reporter {
        settings: StatusSettings {
            run_links,
            ..config.status_settings()
        },
        github,
        statuses,
        gate: Gate::default(),
        metrics,
        lease: config.github.lease(),
        give_up_after: config.give_up_after,
        js,
        notifier,
        check_runs: config.checks.check_runs,
        commit_statuses: config.checks.commit_statuses,
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
    // Every handle to the notifier is gone with the consumers: it decides what is queued, ends.
    if let Some(task) = notifier_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

type Notifications = Option<(notify::Notifier, tokio::task::JoinHandle<()>)>;

/// The notification task with `IAC_NOTIFY`, when `NOTIFY_URL` is set: `Ok(Some(None))` when it
/// is not, `Ok(None)` when shutdown came first.
async fn start_notifier(
    config: &Config,
    js: &jetstream::Context,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<Notifications>> {
    let Some(url) = &config.notify.url else {
        return Ok(Some(None));
    };
    let Some(store) = when_ready(shutdown, NOTIFY_BUCKET, || {
        ensure_notify_bucket(js, &config.nats.streams)
    })
    .await?
    else {
        return Ok(None);
    };
    let started = notify::start(
        &config.notify,
        url.clone(),
        store,
        metrics.clone(),
        shutdown.clone(),
    )
    .context("building the notification client")?;
    tracing::info!(
        format = ?config.notify.format,
        signed = config.notify.secret.is_some(),
        "notifying failures and recoveries to NOTIFY_URL"
    );
    Ok(Some(Some(started)))
}

/// Serves the run pages, and gives the links statuses carry with `PUBLIC_URL`. The pages are no
/// reason to stop posting statuses: a port that cannot be bound is logged and left off.
/// `Ok(None)` when shutdown came first.
async fn start_web(
    config: &Config,
    js: &jetstream::Context,
    metrics: web::WebMetrics,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<Option<web::RunLinks>>> {
    let web = &config.web;
    if web.port == 0 && web.public_url.is_none() {
        return Ok(Some(None));
    }
    let Some(secret) = when_ready(shutdown, RUN_LINKS_BUCKET, || {
        web::link_secret(js, &config.nats.streams, web)
    })
    .await?
    else {
        return Ok(None);
    };
    let signer = web::LinkSigner::new(secret);
    match web::serve(web, js.clone(), signer.clone(), metrics, shutdown.clone()).await {
        Ok(Some(bound)) => tracing::info!(%bound, "serving the run pages"),
        Ok(None) => {}
        Err(e) => tracing::error!(
            error = %e,
            port = web.port,
            "WEB_PORT: cannot listen; the run pages are off, statuses are posted as usual"
        ),
    }
    let links = web
        .public_url
        .as_ref()
        .map(|url| web::RunLinks::new(url, signer));
    Ok(Some(links))
}

/// What the reporter keeps besides its consumers (`IAC_STATUSES`, `IAC_UNDELIVERED`), created
/// by `ensure` when missing and NATS lets this user (local mode), else provisioned by the
/// operator: retried until there. `Ok(None)` when shutdown came first.
async fn when_ready<T, Fut>(
    shutdown: &Shutdown,
    what: &str,
    ensure: impl FnMut() -> Fut,
) -> anyhow::Result<Option<T>>
where
    Fut: std::future::Future<Output = Result<T, ProvisionError>>,
{
    let ready = retry_until_shutdown(shutdown, Duration::from_millis(200), ensure, |e, delay| {
        if matches!(e, ProvisionError::Drift { .. }) {
            return false;
        }
        tracing::warn!(error = %e, retry_in = ?delay, "{what} not ready yet");
        true
    })
    .await;
    match ready {
        Ok(value) => Ok(Some(value)),
        Err(_) if shutdown.is_triggered() => Ok(None),
        Err(e) => Err(e).with_context(|| format!("checking {what}")),
    }
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
