//! The iac-runner worker: takes events from `IAC_EVENTS` one at a time through the durable
//! consumer `iac-worker`, checks out the exact commit, runs the affected services' tasks and
//! publishes what happened to `IAC_RESULTS`.
//!
//! - [`config`]: the settings (`GIT_REPO_URL`, `SYNC_COMMAND`, timeouts, ...).
//! - [`decide`]: pure decisions: event ids, parsing, the commit, the services, the results.
//! - [`git`]: the checkout and what changed, with credentials kept out of every message.
//! - [`task`]: running one task in its own process group, with a timeout and an output tail.
//! - [`workspace`]: the workspace lock and the record of the running task.
//! - [`metrics`]: the Prometheus metrics served on `METRICS_PORT`.

pub mod config;
pub mod decide;
pub mod git;
pub mod metrics;
pub mod task;
pub mod workspace;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, message::PublishMessage};
use futures::StreamExt;
use iac_shared::events::{ServiceResult, SyncFinished, SyncStarted};
use iac_shared::history::newest_results;
use iac_shared::names::{
    EVENT_ID_HEADER, EVENTS_STREAM, FINISHED_SUBJECT, MSG_ID_HEADER, STARTED_SUBJECT,
};
use iac_shared::nats::{connect, ensure_consumer, provision_until_ready, worker_consumer_config};
use iac_shared::rules::{Rules, Service};
use iac_shared::shutdown::Shutdown;
use serde::Serialize;
use tracing::Instrument;

pub use config::{Config, RepoUrl};
use decide::{Delivery, Event, ResultHeader};
use git::Checkout;
use metrics::Metrics;
use task::{TaskEnd, TaskRunner};
use workspace::Workspace;

/// How long shutdown waits for the last acknowledgements to leave.
const FLUSH_BOUND: Duration = Duration::from_secs(2);

/// How many of the newest results a given-up event's `started` is looked for among.
const STARTED_SCAN_LIMIT: u64 = 100;

/// How long looking for a given-up event's `started` may take.
const STARTED_SCAN_BOUND: Duration = Duration::from_secs(5);

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

/// What one event's handling needs, shared by every event.
struct Context {
    config: Config,
    rules: Rules,
    js: jetstream::Context,
    metrics: Metrics,
    workspace: Workspace,
    checkout: Checkout,
    runner: TaskRunner,
    repository: Option<String>,
    shutdown: Shutdown,
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
    if let Err(e) = provision_until_ready(&js, &config.nats.streams, &shutdown).await {
        if shutdown.is_triggered() {
            return Ok(());
        }
        return Err(e.into());
    }
    let consumer = ensure_consumer(
        &js,
        EVENTS_STREAM,
        worker_consumer_config(config.ack_wait, config.max_deliver()),
        true,
    )
    .await?;
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
            pgid_file: workspace.pgid_file(),
            repo_url: config.repo_url.clone(),
        },
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

/// How handling an event ended, which decides how it is acknowledged.
enum Handled {
    /// A finished result is stored: acknowledge.
    Done,
    /// Given up after the last attempt: terminate redelivery.
    GaveUp,
    /// Shutting down before the sync finished: hand it back at once.
    HandedBack,
}

async fn handle(ctx: &Context, message: jetstream::Message) {
    let (seq, delivered) = match message.info() {
        Ok(info) => (info.stream_sequence, info.delivered),
        Err(e) => {
            tracing::error!(error = %e, subject = %message.subject, "a message without JetStream metadata; dropping it");
            let _ = message.ack().await;
            return;
        }
    };
    let delivery = Delivery::new(message.subject.as_str(), seq, delivered, |name| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    });
    let span = tracing::info_span!(
        "event",
        event_id = %delivery.event_id,
        seq,
        subject = %delivery.subject,
        delivered
    );
    async {
        tracing::info!("event received");
        let work = process(ctx, &delivery, &message.payload);
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

/// Tells NATS every `every` that the event is still being worked on, until `work` ends.
async fn with_progress<T>(
    message: &jetstream::Message,
    every: Duration,
    work: impl Future<Output = T>,
) -> T {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "cannot extend the event's ack wait");
                }
            }
        }
    }
}

async fn process(ctx: &Context, delivery: &Delivery, payload: &[u8]) -> Handled {
    let started = Instant::now();
    let event = decide::parse_event(&delivery.subject, payload);
    let header = ResultHeader::new(delivery, event.as_ref().ok(), ctx.repository.as_deref());

    if delivery.attempts_exhausted(ctx.config.max_attempts) {
        let reason = decide::gave_up_reason(ctx.config.max_attempts);
        tracing::error!("{reason}; giving up on this event");
        let last_started = last_started(ctx, delivery.seq).await;
        let finished = header.given_up(last_started.as_ref(), reason, elapsed_ms(started));
        return match publish_finished(ctx, delivery, &finished).await {
            Some(()) => Handled::GaveUp,
            None => Handled::HandedBack,
        };
    }
    let event = match event {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!(error = %e, "refusing a malformed event");
            let finished = header.error(None, e.to_string(), elapsed_ms(started));
            return match publish_finished(ctx, delivery, &finished).await {
                Some(()) => Handled::Done,
                None => Handled::HandedBack,
            };
        }
    };
    let Some(finished) = sync(ctx, delivery, &event, &header, started).await else {
        return Handled::HandedBack;
    };
    match publish_finished(ctx, delivery, &finished).await {
        Some(()) => Handled::Done,
        None => Handled::HandedBack,
    }
}

/// The newest `started` result of the event at `event_seq`, looked for among the last
/// [`STARTED_SCAN_LIMIT`] results (an event's attempts are the newest results, as events are
/// handled one at a time); `None` when no attempt got that far or the results cannot be read.
async fn last_started(ctx: &Context, event_seq: u64) -> Option<SyncStarted> {
    let found = async {
        let mut found = None;
        newest_results(
            &ctx.js,
            STARTED_SUBJECT,
            STARTED_SCAN_LIMIT,
            |started: SyncStarted| {
                if started.event_seq == event_seq {
                    found = Some(started);
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .await
        .map(|()| found)
    };
    match tokio::time::timeout(STARTED_SCAN_BOUND, found).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the results to find where the event started");
            None
        }
        Err(_) => {
            tracing::warn!("timed out reading the results to find where the event started");
            None
        }
    }
}

/// Runs one sync under the workspace lock; `None` when shutdown interrupted it.
async fn sync(
    ctx: &Context,
    delivery: &Delivery,
    event: &Event,
    header: &ResultHeader,
    started: Instant,
) -> Option<SyncFinished> {
    let _lock = match ctx.workspace.lock().await {
        Ok(lock) => lock,
        Err(e) => {
            let reason = format!("Cannot lock the workspace: {e}");
            tracing::error!("{reason}");
            return Some(header.error(None, reason, elapsed_ms(started)));
        }
    };
    task::kill_orphaned_task(&ctx.workspace.pgid_file()).await;

    let commit = match ctx.checkout.update(&event.target()).await {
        Ok(commit) => commit,
        Err(e) => {
            let reason = format!("Failed to update git repository: {e}");
            tracing::error!("{reason}");
            return Some(header.error(None, reason, elapsed_ms(started)));
        }
    };
    let (services, unknown) = match decide_services(ctx, event, &commit).await {
        Ok(decided) => decided,
        Err(e) => {
            let reason = format!("Failed to read git repository: {e}");
            tracing::error!(%commit, "{reason}");
            return Some(header.error(Some(&commit), reason, elapsed_ms(started)));
        }
    };
    let keys: Vec<&str> = services.iter().map(|s| s.key.as_str()).collect();
    tracing::info!(%commit, services = ?keys, unknown = ?unknown, "sync started");
    let started_result = header.started(&commit, &services, &unknown);
    publish(ctx, STARTED_SUBJECT, delivery, "started", &started_result).await?;

    let force = event.force() || delivery.force;
    let mut results: Vec<ServiceResult> = Vec::with_capacity(services.len() + unknown.len());
    for service in &services {
        if ctx.shutdown.is_triggered() {
            return None;
        }
        results.push(run_task(ctx, service, &commit, force).await?);
    }
    for key in &unknown {
        tracing::warn!(service = %key, "no such service at this commit");
        results.push(decide::unknown_service(key));
        ctx.metrics
            .task_finished(iac_shared::events::SyncOutcome::Unknown, 0.0);
    }
    Some(header.finished(&commit, results, elapsed_ms(started)))
}

/// The services the event runs at `commit` and, for a manual sync, the unknown names.
async fn decide_services(
    ctx: &Context,
    event: &Event,
    commit: &str,
) -> Result<(Vec<Service>, Vec<String>), git::GitError> {
    match event {
        Event::Push(push) => {
            // The diff is tried first: asking whether `before` exists costs a git process
            // on every push, and is only needed when the diff fails. Listing the files and
            // diffing only read the repository, so they run side by side.
            let diff = async {
                match push.before_commit() {
                    Some(before) => match ctx.checkout.changed_paths(before, commit).await {
                        Ok(paths) => Ok(Some(paths)),
                        Err(_) if !ctx.checkout.has_commit(before).await => {
                            tracing::info!(%before, "the previous head is not in the repository (force push); using the pushed paths");
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    },
                    None => Ok(None),
                }
            };
            let (files, diff) = tokio::join!(ctx.checkout.files(), diff);
            let discovered = ctx.rules.discover(files?.iter().map(String::as_str));
            let services = decide::push_services(push, diff?.as_deref(), &ctx.rules, &discovered);
            Ok((services, Vec::new()))
        }
        Event::Sync(request) => {
            let files = ctx.checkout.files().await?;
            let discovered = ctx.rules.discover(files.iter().map(String::as_str));
            Ok(decide::requested_services(request, &discovered))
        }
    }
}

/// Runs one task; `None` when the shutdown grace ran out and it was killed.
async fn run_task(
    ctx: &Context,
    service: &Service,
    commit: &str,
    force: bool,
) -> Option<ServiceResult> {
    let began = Instant::now();
    let shutdown = ctx.shutdown.clone();
    let grace = ctx.config.shutdown_grace;
    let grace_over = async move {
        shutdown.wait().await;
        tracing::info!(
            "shutdown requested; the running task has {} to finish",
            humantime::format_duration(grace)
        );
        tokio::time::sleep(grace).await;
    };
    let end = ctx
        .runner
        .run(service, ctx.checkout.dir(), commit, force, grace_over)
        .await;
    if end == TaskEnd::Interrupted {
        tracing::warn!(service = %service.key, "task killed: the shutdown grace period ran out");
        return None;
    }
    let result = task::service_result(service, end, began.elapsed());
    ctx.metrics
        .task_finished(result.outcome, began.elapsed().as_secs_f64());
    match result.outcome {
        iac_shared::events::SyncOutcome::Synced => {
            tracing::info!(service = %service.key, duration_ms = result.duration_ms, "task synced")
        }
        outcome => tracing::warn!(
            service = %service.key,
            ?outcome,
            exit_code = ?result.exit_code,
            duration_ms = result.duration_ms,
            "task did not sync"
        ),
    }
    Some(result)
}

/// Stores the finished result and counts it; `None` when shutdown came before it was stored.
async fn publish_finished(
    ctx: &Context,
    delivery: &Delivery,
    finished: &SyncFinished,
) -> Option<()> {
    let finished = &decide::fit_to_message(finished.clone(), ctx.js.client().max_payload());
    publish(ctx, FINISHED_SUBJECT, delivery, "finished", finished).await?;
    ctx.metrics
        .sync_finished(finished.state, finished.replay_of.is_some());
    tracing::info!(
        state = ?finished.state,
        synced = finished.totals.synced,
        not_synced = finished.totals.not_synced(),
        duration_ms = finished.duration_ms,
        "sync finished"
    );
    Some(())
}

/// Publishes a result and waits until the stream stored it, retrying while NATS is away;
/// `None` when shutdown came first.
async fn publish<T: Serialize>(
    ctx: &Context,
    subject: &'static str,
    delivery: &Delivery,
    kind: &str,
    result: &T,
) -> Option<()> {
    let payload = serde_json::to_vec(result).expect("results serialize to JSON");
    // The same attempt's retries are stored once; a redelivered event publishes anew.
    let msg_id = format!(
        "{}:{}:{}:{kind}",
        delivery.event_id, delivery.seq, delivery.delivered
    );
    let mut delay = Duration::from_millis(100);
    loop {
        let message = PublishMessage::build()
            .payload(payload.clone().into())
            .header(EVENT_ID_HEADER, delivery.event_id.as_str())
            .header(MSG_ID_HEADER, msg_id.as_str());
        let stored = match ctx.js.send_publish(subject, message).await {
            Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => return Some(()),
            Err(e) => {
                tracing::warn!(error = %e, %subject, "cannot store the result yet; retrying");
                if ctx.shutdown.sleep_or_shutdown(delay).await {
                    return None;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis().try_into().unwrap_or(u64::MAX)
}
