//! The iac-runner worker: takes events from `IAC_EVENTS` one at a time per environment, through
//! the durable consumer `iac-worker` (pushes, manual syncs and deployments to `PUSH_ENV`) and one
//! `iac-worker-<env>` per other environment, each with its own workspace; checks out the exact
//! commit, runs the affected services' tasks, publishes what happened to `IAC_RESULTS` and
//! writes each deployment's final summary to `IAC_DEPLOYMENTS`.
//!
//! - [`config`]: the settings (`GIT_REPO_URL`, `SYNC_COMMAND`, timeouts, ...).
//! - [`repo_url`]: `GIT_REPO_URL` and its credentials: parsed once, shown only redacted.
//! - [`sync`]: one event end to end: checkout, services, tasks, results.
//! - [`decide`]: pure decisions: event ids, parsing, the commit, the services, every result.
//! - [`git`]: the checkout and what changed, with credentials kept out of every message.
//! - [`task`]: running one task in its own process group, with a timeout and an output tail.
//! - [`task_env`]: the environment a task gets, built not inherited, and the masking of secrets.
//! - [`runlog`]: every task's masked output, published to `IAC_RUNLOGS` for the run pages.
//! - [`requirements`]: the repository's own Python packages (`TASK_REQUIREMENTS`), installed
//!   into a virtual environment the tasks run from.
//! - [`workspace`]: the workspace lock and the record of the running tasks.
//! - [`schedule`]: the order of one sync's tasks, and which a failure blocks.
//! - [`newest`]: newest commit wins: the applied state (`IAC_APPLIED`), one sync covering the
//!   pushes queued behind the one taken, and reconciliation with the branch head.
//! - [`metrics`]: the Prometheus metrics served on `METRICS_PORT`.
//!
//! This file holds start-up and the pull and acknowledge loops, one per consumer.

pub mod config;
pub mod decide;
pub mod git;
pub mod metrics;
pub mod newest;
pub mod repo_url;
pub mod requirements;
pub mod runlog;
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
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv};
use futures::StreamExt;
use iac_shared::deploy::Environments;
use iac_shared::names::EVENTS_STREAM;
use iac_shared::nats::{
    ConsumerSettings, ProvisionError, REPORTER_DEFAULT_ACK_WAIT, applied_bucket_config, connect,
    deployments_bucket_config, ensure_bucket, ensure_consumer, provision_until_ready_with,
    worker_consumer_configs,
};
use iac_shared::rules::Rules;
use iac_shared::runtime::{Envelope, retry_until_shutdown, with_progress};
use iac_shared::shutdown::Shutdown;
use tracing::Instrument;

pub use config::Config;
use decide::Delivery;
use git::Checkout;
use metrics::Metrics;
use newest::{AppliedState, Reconciler};
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
    let Some(consumers) = start_consumers(&js, &config, &shutdown).await? else {
        return Ok(());
    };
    let deployments = bucket(
        &js,
        deployments_bucket_config(&config.nats.streams),
        &shutdown,
    );
    let Some(deployments) = deployments.await? else {
        return Ok(());
    };
    let applied = bucket(&js, applied_bucket_config(&config.nats.streams), &shutdown);
    let Some(applied) = applied.await? else {
        return Ok(());
    };
    runlog::ensure_stream(&js, &config.nats.streams, &shutdown);
    let root = Workspace::new(config.workspace.clone());
    let mut loops = Vec::with_capacity(consumers.len());
    let mut reconciler = None;
    for (index, (env, consumer)) in consumers.into_iter().enumerate() {
        // The push environment keeps the workspace as it always was, so an upgrade keeps its
        // checkout; every other environment gets its own beside it.
        let workspace = match &env {
            Some(env) if index > 0 => root.environment(env),
            _ => root.clone(),
        };
        let applied = AppliedState {
            bucket: applied.clone(),
            env: env.clone(),
        };
        // The first consumer is `iac-worker`: pushes, and what deploys to their environment.
        let pushes = index == 0;
        if pushes && !config.reconcile_interval.is_zero() {
            reconciler = Some(Reconciler {
                checkout: Checkout::new(
                    config.repo_url.clone(),
                    config.branch.clone(),
                    config.deploy_tag_pattern.clone(),
                    workspace.checkout(&config.repo_url.repo_name()),
                ),
                workspace: workspace.clone(),
                rules: rules.clone(),
                applied: applied.clone(),
                js: js.clone(),
                consumer: consumer.cached_info().name.clone(),
                config: config.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            });
        }
        let ctx = Context {
            applied,
            coalesce: pushes,
            checkout: Checkout::new(
                config.repo_url.clone(),
                config.branch.clone(),
                config.deploy_tag_pattern.clone(),
                workspace.checkout(&config.repo_url.repo_name()),
            ),
            runner: TaskRunner {
                command: config.sync_command.clone(),
                timeout: config.sync_timeout,
                tail_lines: config.output_tail_lines.into(),
                groups: workspace.task_groups(),
                run_log: runlog::RunLog::new(
                    js.clone(),
                    config.run_log.max_bytes,
                    shutdown.clone(),
                ),
            },
            task_env: config.task_env(),
            // One set of task environments for every deployment environment: they are keyed
            // by the requirements' hash, built under a lock and pruned only when unused.
            requirements: config.task_requirements(root.root()),
            repository: config.repo_url.owner_and_name(),
            env,
            deployments: deployments.clone(),
            workspace,
            rules: rules.clone(),
            js: js.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            config: config.clone(),
        };
        loops.push(consume(ctx, consumer));
    }
    ready.store(true, Ordering::Relaxed);
    let reconcile = async {
        if let Some(reconciler) = reconciler {
            reconciler.run(config.reconcile_interval).await;
        }
    };
    // Every consumer's loop in this task, side by side: one environment's long sync never
    // holds another's events; reconciliation beside them.
    futures::future::join(futures::future::join_all(loops), reconcile).await;
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

/// Provisions what is missing (retrying while NATS starts), then starts every consumer of
/// [`worker_consumer_configs`], correcting drift; each with the environment it serves.
/// `Ok(None)` when shutdown came first.
async fn start_consumers(
    js: &jetstream::Context,
    config: &Config,
    shutdown: &Shutdown,
) -> Result<Option<Vec<(Option<String>, PullConsumer)>>, ProvisionError> {
    let envs: Environments = config.environments.environments();
    let settings = ConsumerSettings {
        worker_ack_wait: config.consumer.ack_wait,
        worker_max_deliver: config.consumer.max_deliver(),
        reporter_ack_wait: REPORTER_DEFAULT_ACK_WAIT,
        environments: envs.clone(),
    };
    if let Err(e) = provision_until_ready_with(js, &config.nats.streams, &settings, shutdown).await
    {
        return if shutdown.is_triggered() {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let wanted = worker_consumer_configs(
        config.consumer.ack_wait,
        config.consumer.max_deliver(),
        &envs,
    );
    let mut started = Vec::with_capacity(wanted.len());
    for (env, want) in wanted {
        started.push((env, ensure_consumer(js, EVENTS_STREAM, want, true).await?));
    }
    Ok(Some(started))
}

/// A bucket the worker writes, waited for like the consumers; `None` when shutdown came first.
async fn bucket(
    js: &jetstream::Context,
    want: kv::Config,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<kv::Store>> {
    let name = want.bucket.clone();
    let bucket = retry_until_shutdown(
        shutdown,
        Duration::from_millis(200),
        || ensure_bucket(js, want.clone()),
        |e, delay| {
            if matches!(e, ProvisionError::Drift { .. }) {
                return false;
            }
            tracing::warn!(error = %e, retry_in = ?delay, "bucket {name} not ready yet");
            true
        },
    )
    .await;
    match bucket {
        Ok(bucket) => Ok(Some(bucket)),
        Err(_) if shutdown.is_triggered() => Ok(None),
        Err(e) => Err(e).with_context(|| format!("checking the {name} bucket")),
    }
}

/// Takes the events of one consumer one at a time until shutdown.
async fn consume(ctx: Context, consumer: PullConsumer) {
    let name = consumer.cached_info().name.clone();
    tracing::info!(
        repository = %ctx.config.repo_url,
        branch = %ctx.config.branch,
        consumer = %name,
        env = ctx.env.as_deref().unwrap_or("-"),
        workspace = %ctx.workspace.root().display(),
        "worker ready, waiting for events"
    );
    while !ctx.shutdown.is_triggered() {
        // Everything before an event is in hand gives way to shutdown (NATS may be gone).
        let next = async {
            refresh_queue_depth(&consumer, &name, &ctx.metrics).await;
            next_message(&consumer).await
        };
        let message = tokio::select! {
            message = next => message,
            _ = ctx.shutdown.wait() => break,
        };
        if let Some(message) = message {
            handle(&ctx, message).await;
        }
    }
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

async fn refresh_queue_depth(consumer: &PullConsumer, name: &str, metrics: &Metrics) {
    if let Ok(info) = consumer.get_info().await {
        metrics.set_queue_depth(name, info.num_pending);
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
        env = ctx.env.as_deref().unwrap_or("-"),
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
