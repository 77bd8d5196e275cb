//! The iac-runner worker: takes events from `IAC_EVENTS` one at a time through the durable
//! consumer `iac-worker`, checks out the exact commit, runs the affected services' tasks and
//! publishes what happened to `IAC_RESULTS`.
//!
//! - [`config`]: the settings (`GIT_REPO_URL`, `SYNC_COMMAND`, timeouts, ...).
//! - [`repo_url`]: `GIT_REPO_URL` and its credentials: parsed once, shown only redacted.
//! - [`sync`]: one event end to end: checkout, services, tasks, results.
//! - [`decide`]: pure decisions: event ids, parsing, the commit, the services, every result.
//! - [`git`]: the checkout and what changed, with credentials kept out of every message.
//! - [`task`]: running one task in its own process group, with a timeout and an output tail.
//! - [`task_env`]: the environment a task gets, built not inherited, and the masking of secrets.
//! - [`workspace`]: the workspace lock and the record of the running tasks.
//! - [`schedule`]: the order of one sync's tasks, and which a failure blocks.
//! - [`metrics`]: the Prometheus metrics served on `METRICS_PORT`.
//!
//! This file holds start-up and the pull and acknowledge loop.

pub mod config;
pub mod decide;
pub mod git;
pub mod metrics;
pub mod repo_url;
pub mod schedule;
pub mod sync;
pub mod task;
pub mod task_env;
pub mod workspace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use iac_shared::names::EVENTS_STREAM;
use iac_shared::nats::{connect, worker_consumer_config};
use iac_shared::rules::Rules;
use iac_shared::runtime::{Envelope, start_consumers, with_progress};
use iac_shared::shutdown::Shutdown;
use tracing::Instrument;

pub use config::Config;
use decide::Delivery;
use git::Checkout;
use metrics::Metrics;
pub use repo_url::RepoUrl;
use sync::{Context, Handled};
use task::TaskRunner;
use workspace::Workspace;

/// How long shutdown waits for the last acknowledgements to leave.
const FLUSH_BOUND: Duration = Duration::from_secs(2);

/// How long one pull waits for an event before the loop looks at shutdown and the queue again.
const PULL_EXPIRY: Duration = Duration::from_secs(5);

/// Runs the worker until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    Worker::start(config, shutdown).await?.wait().await
}

/// A started worker: its metrics address, and the loop to wait for.
pub struct Worker {
    metrics_addr: Option<SocketAddr>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Validates what is left of the configuration, serves metrics, and starts taking events
    /// in the background (connecting to NATS as soon as it is reachable).
    pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        task::forbid_inspection().context("cannot make the worker process undumpable")?;
        let rules = Rules::load_or_default(config.rules.as_deref()).context("IAC_RULES")?;
        std::fs::create_dir_all(&config.workspace)
            .with_context(|| format!("WORKSPACE: cannot create {}", config.workspace.display()))?;
        let (metrics, registry) = Metrics::new();
        let ready = Arc::new(AtomicBool::new(false));
        let metrics_addr = if config.metrics_port == 0 {
            None
        } else {
            let flag = ready.clone();
            let addr = SocketAddr::from(([0, 0, 0, 0], config.metrics_port));
            let bound = iac_shared::ops::serve(
                addr,
                Arc::new(registry),
                Arc::new(move || flag.load(Ordering::Relaxed)),
                shutdown.clone(),
            )
            .await
            .with_context(|| format!("METRICS_PORT: cannot listen on {addr}"))?;
            Some(bound)
        };
        let task = tokio::spawn(serve_events(config, rules, metrics, ready, shutdown));
        Ok(Worker { metrics_addr, task })
    }

    /// Where `/metrics`, `/health` and `/ready` are served (`None` when `METRICS_PORT=0`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits until the worker has shut down.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the worker loop panicked")?
    }
}

async fn serve_events(
    config: Config,
    rules: Rules,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let client = connect(&config.nats, "iac-worker").await?;
    let js = jetstream::new(client.clone());
    let wanted = [(
        EVENTS_STREAM,
        worker_consumer_config(config.consumer.ack_wait, config.consumer.max_deliver()),
    )];
    let Some([consumer]) = start_consumers(&js, &config.nats.streams, wanted, &shutdown).await?
    else {
        return Ok(());
    };
    let workspace = Workspace::new(config.workspace.clone());
    let ctx = Context {
        checkout: Checkout::new(
            config.repo_url.clone(),
            config.branch.clone(),
            workspace.checkout(&config.repo_url.repo_name()),
        ),
        runner: TaskRunner {
            command: config.sync_command.clone(),
            timeout: config.sync_timeout,
            tail_lines: config.output_tail_lines.into(),
            groups: workspace.task_groups(),
        },
        task_env: config.task_env(),
        repository: config.repo_url.owner_and_name(),
        workspace,
        rules,
        js,
        metrics,
        shutdown: shutdown.clone(),
        config,
    };
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        repository = %ctx.config.repo_url,
        branch = %ctx.config.branch,
        workspace = %ctx.workspace.root().display(),
        "worker ready, waiting for events"
    );
    while !shutdown.is_triggered() {
        // Everything before an event is in hand gives way to shutdown (NATS may be gone).
        let next = async {
            refresh_queue_depth(&consumer, &ctx.metrics).await;
            next_message(&consumer).await
        };
        let message = tokio::select! {
            message = next => message,
            _ = shutdown.wait() => break,
        };
        if let Some(message) = message {
            handle(&ctx, message).await;
        }
    }
    ready.store(false, Ordering::Relaxed);
    // Acknowledgements are sent in the background: make sure they left before exiting, but
    // do not wait for a NATS server that is gone (unacknowledged work comes back to a worker).
    match tokio::time::timeout(FLUSH_BOUND, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot flush the NATS connection"),
        Err(_) => {
            tracing::warn!("NATS unreachable at shutdown; unacknowledged work will be redelivered")
        }
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Pulls at most one event, waiting up to [`PULL_EXPIRY`].
async fn next_message(consumer: &PullConsumer) -> Option<jetstream::Message> {
    let batch = consumer
        .batch()
        .max_messages(1)
        .expires(PULL_EXPIRY)
        .messages()
        .await;
    let mut batch = match batch {
        Ok(batch) => batch,
        Err(e) => {
            tracing::warn!(error = %e, "cannot pull events; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return None;
        }
    };
    match batch.next().await {
        Some(Ok(message)) => Some(message),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "pulling events failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            None
        }
        None => None,
    }
}

async fn refresh_queue_depth(consumer: &PullConsumer, metrics: &Metrics) {
    if let Ok(info) = consumer.get_info().await {
        metrics.set_queue_depth(info.num_pending);
    }
}

async fn handle(ctx: &Context, message: jetstream::Message) {
    let delivery: Delivery = match Envelope::of(&message) {
        Ok(envelope) => envelope.into(),
        Err(e) => {
            tracing::error!(error = %e, "dropping a message that cannot be tracked");
            let _ = message.ack().await;
            return;
        }
    };
    let span = tracing::info_span!(
        "event",
        event_id = %delivery.event_id,
        seq = delivery.seq,
        subject = %delivery.subject,
        delivered = delivery.delivered
    );
    async {
        tracing::info!("event received");
        let work = sync::process(ctx, &delivery, &message.payload);
        let handled = with_progress(&message, ctx.config.progress_interval(), work).await;
        let acked = match handled {
            Handled::Done => message.double_ack().await,
            Handled::GaveUp => message.double_ack_with(AckKind::Term).await,
            Handled::HandedBack => {
                tracing::info!("shutting down before the sync finished; handing the event back");
                message.double_ack_with(AckKind::Nak(None)).await
            }
        };
        if let Err(e) = acked {
            tracing::warn!(error = %e, "cannot acknowledge the event; it will be delivered again");
        }
    }
    .instrument(span)
    .await
}
