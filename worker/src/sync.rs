//! Running one event: check out its commit, decide its services, run their tasks one after
//! another, and store the `started` and `finished` results (or the error that ended it).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, kv, message::PublishMessage};
use iac_shared::deploy::{DeployRequest, DeploymentSummary};
use iac_shared::events::{ServiceResult, SyncFinished, SyncOutcome, SyncStarted};
use iac_shared::history::newest_results;
use iac_shared::names::{EVENT_ID_HEADER, FINISHED_SUBJECT, MSG_ID_HEADER, STARTED_SUBJECT};
use iac_shared::rules::{Rules, Service};
use iac_shared::runtime::retry_until_shutdown;
use iac_shared::shutdown::Shutdown;
use serde::Serialize;

use crate::config::Config;
use crate::decide::{self, Delivery, Event, ResultHeader};
use crate::git::{self, Checkout};
use crate::metrics::Metrics;
use crate::requirements::{RequirementsError, TaskRequirements};
use crate::task::{self, TaskEnd, TaskRunner};
use crate::task_env::{TaskEnv, TaskEnvSettings};
use crate::workspace::Workspace;

/// How many of the newest results a given-up event's `started` is looked for among.
const STARTED_SCAN_LIMIT: u64 = 100;

/// How long looking for a given-up event's `started` may take.
const STARTED_SCAN_BOUND: Duration = Duration::from_secs(5);

/// The first wait before storing a result again; it doubles up to a bound.
const PUBLISH_RETRY_DELAY: Duration = Duration::from_millis(100);

/// What one event's handling needs, shared by every event of one consumer.
pub(crate) struct Context {
    /// The environment this consumer's events deploy to (`None`: pushes with `PUSH_ENV=`).
    pub env: Option<String>,
    pub deployments: kv::Store,
    pub config: Config,
    pub rules: Rules,
    pub js: jetstream::Context,
    pub metrics: Metrics,
    pub workspace: Workspace,
    pub checkout: Checkout,
    pub runner: TaskRunner,
    pub task_env: TaskEnvSettings,
    pub requirements: TaskRequirements,
    pub repository: Option<String>,
    pub shutdown: Shutdown,
}

/// How handling an event ended, which decides how it is acknowledged.
pub(crate) enum Handled {
    /// A finished result is stored: acknowledge.
    Done,
    /// Given up after the last attempt: terminate redelivery.
    GaveUp,
    /// Shutting down before the sync finished: hand it back at once.
    HandedBack,
}

/// Handles one delivered event to the end: its `finished` result, and for a deployment its
/// final summary, are stored unless shutdown came first.
pub(crate) async fn process(ctx: &Context, delivery: &Delivery, payload: &[u8]) -> Handled {
    let started = Instant::now();
    let event = decide::parse_event(&delivery.subject, payload);
    let deployment = match &event {
        Ok(event) => event.deployment().cloned(),
        Err(_) => decide::refused_deployment(&delivery.subject, payload),
    };
    let mut header = ResultHeader::new(
        delivery,
        event.as_ref().ok(),
        ctx.repository.as_deref(),
        ctx.env.as_deref(),
    );
    header.deployment_id = deployment.as_ref().map(|d| d.deployment_id.clone());

    let (finished, handled) = if delivery.attempts_exhausted(ctx.config.consumer.max_attempts) {
        let reason = decide::gave_up_reason(ctx.config.consumer.max_attempts);
        tracing::error!("{reason}; giving up on this event");
        let last_started = last_started(ctx, delivery.seq).await;
        let finished = header.given_up(last_started.as_ref(), reason, elapsed_ms(started));
        (finished, Handled::GaveUp)
    } else {
        match event {
            Ok(event) => match sync(ctx, delivery, &event, &header, started).await {
                Some(finished) => (finished, Handled::Done),
                None => return Handled::HandedBack,
            },
            Err(e) => {
                tracing::warn!(error = %e, "refusing a malformed event");
                let finished = header.error(None, e.to_string(), elapsed_ms(started));
                (finished, Handled::Done)
            }
        }
    };
    if publish_finished(ctx, delivery, &finished).await.is_none() {
        return Handled::HandedBack;
    }
    if let Some(request) = &deployment {
        // Until the summary is written the deployment shows `in_progress`: hand it back rather
        // than leave it so.
        if write_summary(ctx, request, &finished).await.is_none() {
            return Handled::HandedBack;
        }
    }
    handled
}

/// Writes the final summary of `request` to `IAC_DEPLOYMENTS`, retrying while NATS is away;
/// `None` when shutdown came first.
async fn write_summary(
    ctx: &Context,
    request: &DeployRequest,
    finished: &SyncFinished,
) -> Option<()> {
    let key = request.deployment_id.as_str();
    let written = retry_until_shutdown(
        &ctx.shutdown,
        PUBLISH_RETRY_DELAY,
        || async {
            let previous = ctx
                .deployments
                .entry(key)
                .await
                .map_err(|e| e.to_string())?;
            let previous: Option<DeploymentSummary> =
                previous.and_then(|entry| serde_json::from_slice(&entry.value).ok());
            let summary = decide::final_summary(request, finished, previous.as_ref());
            let value = serde_json::to_vec(&summary).expect("summaries serialize to JSON");
            ctx.deployments
                .put(key, value.into())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(summary.status)
        },
        |e, _| {
            tracing::warn!(error = %e, "cannot write the deployment summary yet; retrying");
            true
        },
    )
    .await;
    let status = written.ok()?;
    tracing::info!(deployment_id = key, ?status, "deployment summary written");
    Some(())
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
    // Read before anything runs, so a missing secrets file stops the whole sync.
    let mut env = match ctx.task_env.build(
        |name| std::env::var(name).ok(),
        &ctx.config.repo_url.secrets(),
    ) {
        Ok(env) => env.for_environment(ctx.env.as_deref()),
        Err(e) => {
            let reason = format!("Cannot build the task environment: {e}");
            tracing::error!("{reason}");
            return Some(header.error(None, reason, elapsed_ms(started)));
        }
    };

    let commit = match ctx.checkout.update(&event.target()).await {
        Ok(commit) => commit,
        Err(e @ git::GitError::NotDeployable { .. }) => {
            let reason = e.to_string();
            tracing::warn!("refusing to run: {reason}");
            return Some(header.error(None, reason, elapsed_ms(started)));
        }
        Err(e) => {
            let reason = format!("Failed to update git repository: {e}");
            tracing::error!("{reason}");
            return Some(header.error(None, reason, elapsed_ms(started)));
        }
    };
    // Held until the tasks are done, so no other sync removes the environment under them.
    let _python_env = match (ctx.requirements)
        .prepare(ctx.checkout.dir(), &mut env, ctx.shutdown.wait())
        .await
    {
        Ok(in_use) => in_use,
        Err(RequirementsError::Interrupted) => return None,
        Err(e) => {
            let reason = format!("Cannot prepare the tasks' Python packages: {e}");
            tracing::error!(%commit, "{reason}");
            return Some(header.error(Some(&commit), reason, elapsed_ms(started)));
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
        results.push(run_task(ctx, service, &commit, force, &env).await?);
    }
    for key in &unknown {
        tracing::warn!(service = %key, "no such service at this commit");
        results.push(decide::unknown_service(key));
        ctx.metrics.task_finished(SyncOutcome::Unknown, 0.0);
    }
    Some(header.finished(&commit, results, elapsed_ms(started)))
}

/// The services the event runs at `commit` and, for a manual sync or a deployment, the unknown
/// names.
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
        Event::Deploy(request) => {
            let files = ctx.checkout.files().await?;
            let discovered = ctx.rules.discover(files.iter().map(String::as_str));
            Ok(decide::deploy_services(request, &discovered))
        }
    }
}

/// Runs one task; `None` when the shutdown grace ran out and it was killed.
async fn run_task(
    ctx: &Context,
    service: &Service,
    commit: &str,
    force: bool,
    env: &TaskEnv,
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
        .run(service, ctx.checkout.dir(), commit, force, env, grace_over)
        .await;
    if end == TaskEnd::Interrupted {
        tracing::warn!(service = %service.key, "task killed: the shutdown grace period ran out");
        return None;
    }
    let result = decide::service_result(service, end, began.elapsed());
    ctx.metrics
        .task_finished(result.outcome, began.elapsed().as_secs_f64());
    match result.outcome {
        SyncOutcome::Synced => {
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
/// `None` when shutdown came first, or when the result is too large for one message: waiting
/// cannot mend that, so the event is handed back and, after its last attempt, given up with a
/// small result.
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
    let stored = retry_until_shutdown(
        &ctx.shutdown,
        PUBLISH_RETRY_DELAY,
        || async {
            let message = PublishMessage::build()
                .payload(payload.clone().into())
                .header(EVENT_ID_HEADER, delivery.event_id.as_str())
                .header(MSG_ID_HEADER, msg_id.as_str());
            match ctx.js.send_publish(subject, message).await {
                Ok(ack) => ack.await.map(drop),
                Err(e) => Err(e),
            }
        },
        |e, _| {
            if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                tracing::error!(error = %e, %subject, bytes = payload.len(), "the result is too large to store");
                return false;
            }
            tracing::warn!(error = %e, %subject, "cannot store the result yet; retrying");
            true
        },
    )
    .await;
    stored.ok()
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis().try_into().unwrap_or(u64::MAX)
}
