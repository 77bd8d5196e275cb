//! Running one event: check out its commit, decide its services, run their tasks (in their
//! declared order, up to `SYNC_PARALLELISM` at once), and store the `started` result, a
//! `TaskStarted` as each task starts, and the `finished` result (or the error that ended it).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, kv, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use iac_shared::dependencies::{Dependencies, Reason};
use iac_shared::deploy::{DeployRequest, DeploymentSummary};
use iac_shared::events::{
    PushEvent, ServiceResult, SyncFinished, SyncOutcome, SyncStarted, Totals, Trigger,
};
use iac_shared::history::newest_results;
use iac_shared::names::{
    EVENT_ID_HEADER, FINISHED_SUBJECT, MSG_ID_HEADER, STARTED_SUBJECT, TASK_STARTED_SUBJECT,
};
use iac_shared::rules::{Rules, Service};
use iac_shared::runtime::retry_until_shutdown;
use iac_shared::shutdown::Shutdown;
use serde::Serialize;

use crate::config::Config;
use crate::decide::{self, Delivery, Event, ResultHeader, Target};
use crate::git::{self, Checkout};
use crate::metrics::Metrics;
use crate::newest::{self, AppliedState, Coalesced, Covered, RECONCILE_ID_PREFIX};
use crate::requirements::{RequirementsError, TaskRequirements};
use crate::schedule::Schedule;
use crate::task::{self, TaskEnd, TaskRunner};
use crate::task_env::{TaskEnv, TaskEnvSettings};
use crate::workspace::Workspace;

/// How many of the newest results a given-up event's `started` is looked for among: after it
/// come the `iac.results.task` of each service its attempt started, so a sync of many
/// services needs room. The look ends at the newest `started` of the event.
const STARTED_SCAN_LIMIT: u64 = 1000;

/// How long looking for a given-up event's `started` may take.
const STARTED_SCAN_BOUND: Duration = Duration::from_secs(5);

/// The longest a task waits for its `TaskStarted` to be stored: it only moves a check run
/// along, so the task runs on without it.
const TASK_STARTED_BOUND: Duration = Duration::from_secs(2);

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
    /// This environment's applied state, and the covered marks.
    pub applied: AppliedState,
    /// True for the push consumer: a push taken syncs the newest waiting push that descends
    /// from it in its place.
    pub coalesce: bool,
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

    if let Ok(Event::Push(push)) = &event
        && ctx.coalesce
        && let Some(skip) = already_covered(ctx, delivery, push, &header, started).await
    {
        return match skip {
            Skip::Acknowledge => Handled::Done,
            Skip::Publish(finished) => match publish_finished(ctx, delivery, &finished).await {
                Some(()) => Handled::Done,
                None => Handled::HandedBack,
            },
        };
    }
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

/// How a push that needs no sync of its own is acknowledged.
enum Skip {
    /// Its results are stored already (the push a covering sync ran as).
    Acknowledge,
    /// With this result.
    Publish(Box<SyncFinished>),
}

/// How a push that needs no sync of its own ends: a newer push's sync covered it (its mark
/// says how that ended), or it is a reconciliation's push of the commit already applied.
/// `None` when it must run.
async fn already_covered(
    ctx: &Context,
    delivery: &Delivery,
    push: &PushEvent,
    header: &ResultHeader,
    started: Instant,
) -> Option<Skip> {
    if let Some(covered) = ctx.applied.covered(delivery.seq).await {
        if covered.by_seq == delivery.seq {
            tracing::info!("synced already, in place of an older push");
            return Some(Skip::Acknowledge);
        }
        tracing::info!(by = %covered.by_commit, "already synced as part of a newer push");
        return Some(Skip::Publish(Box::new(header.superseded(
            None,
            &covered.by_commit,
            covered.state,
            covered.totals,
            elapsed_ms(started),
        ))));
    }
    // Reconciliation and a late webhook may both name the branch head: the one handled second
    // finds it synced by the other (a reconciliation published again once the duplicate
    // window had passed, too). Any other push of an applied commit runs, as it always did.
    let reconciled = |id: &str| id.starts_with(RECONCILE_ID_PREFIX);
    if delivery.replay_of.is_some() {
        return None;
    }
    let head = ctx.applied.read().await.head?;
    let state = head.state?;
    let by_reconcile = head.event_id.as_deref().is_some_and(reconciled);
    let same_commit = push.after.as_deref() == Some(head.commit.as_str());
    (same_commit && (reconciled(&push.delivery_id) || by_reconcile)).then(|| {
        tracing::info!(commit = %head.commit, "commit already synced (reconciliation and its webhook)");
        Skip::Publish(Box::new(header.superseded(
            None,
            &head.commit,
            state,
            Totals::default(),
            elapsed_ms(started),
        )))
    })
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
    task::kill_orphaned_tasks(&ctx.workspace.task_groups()).await;
    // Read before anything runs, so a missing secrets file stops the whole sync.
    let env = match ctx.task_env.build(
        |name| std::env::var(name).ok(),
        &ctx.config.repo_url.secrets(),
    ) {
        Ok(env) => TaskEnv {
            run_log: ctx
                .runner
                .run_log
                .for_run(&delivery.event_id, delivery.delivered),
            ..env.for_environment(ctx.env.as_deref())
        },
        Err(e) => {
            let reason = format!("Cannot build the task environment: {e}");
            tracing::error!("{reason}");
            return Some(header.error(None, reason, elapsed_ms(started)));
        }
    };

    let commit = match checked_out(ctx, &event.target(), header, started).await {
        Ok(commit) => commit,
        Err(error) => return Some(error),
    };
    if let Event::Push(push) = event {
        // Only what the branch holds is synced: a force push may have dropped this commit
        // since it was queued, and no status of it may stay pending.
        if !ctx.checkout.on_branch(&commit).await {
            let reason = format!("Not synced: no longer on {}", ctx.config.branch);
            tracing::warn!(%commit, "{reason}");
            return Some(header.error(Some(&commit), reason, elapsed_ms(started)));
        }
        if ctx.coalesce
            && delivery.replay_of.is_none()
            && let Some(coalesced) = look_ahead(ctx, delivery, push, &commit).await
        {
            return sync_newest(
                ctx, delivery, push, header, &commit, coalesced, env, started,
            )
            .await;
        }
    }
    run_at(ctx, delivery, event, header, &commit, env, started).await
}

/// The checkout brought to `target`; the error result when it cannot be.
async fn checked_out(
    ctx: &Context,
    target: &Target,
    header: &ResultHeader,
    started: Instant,
) -> Result<String, SyncFinished> {
    match ctx.checkout.update(target).await {
        Ok(commit) => Ok(commit),
        Err(e @ git::GitError::NotDeployable { .. }) => {
            let reason = e.to_string();
            tracing::warn!("refusing to run: {reason}");
            Err(header.error(None, reason, elapsed_ms(started)))
        }
        Err(e) => {
            let reason = format!("Failed to update git repository: {e}");
            tracing::error!("{reason}");
            Err(header.error(None, reason, elapsed_ms(started)))
        }
    }
}

/// The waiting pushes one sync of the newest can cover in place of `push` (checked out at
/// `commit`); `None` when there are none, or the stream cannot be read (then `push` syncs
/// alone, as it would have).
async fn look_ahead(
    ctx: &Context,
    delivery: &Delivery,
    push: &PushEvent,
    commit: &str,
) -> Option<Coalesced> {
    let waiting = match newest::waiting_pushes(
        &ctx.js,
        delivery.seq,
        &push.git_ref,
        ctx.env.as_deref(),
    )
    .await
    {
        Ok(waiting) if waiting.is_empty() => return None,
        Ok(waiting) => waiting,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for newer pushes; syncing this one alone");
            return None;
        }
    };
    newest::coalesce(&ctx.checkout, commit, waiting).await
}

/// Syncs the newest waiting push of `coalesced` in place of `push` (at `commit`), from the
/// oldest `before` and with every skipped push's paths, publishing its results as that
/// push's; marks every push it covered, this one included; returns this push's result,
/// superseded by that sync. `None` when shutdown interrupted it.
#[allow(clippy::too_many_arguments)]
async fn sync_newest(
    ctx: &Context,
    delivery: &Delivery,
    push: &PushEvent,
    header: &ResultHeader,
    commit: &str,
    coalesced: Coalesced,
    env: TaskEnv,
    started: Instant,
) -> Option<SyncFinished> {
    let Coalesced { newest, skipped } = coalesced;
    let skipped_pushes: Vec<&PushEvent> = skipped.iter().map(|w| &w.push).collect();
    let merged = Event::Push(decide::merged_push(push, &skipped_pushes, &newest.push));
    // This attempt's results, under the newest push's identity (its statuses are on its own
    // commit); a new attempt publishes anew.
    let as_newest = Delivery {
        delivered: delivery.delivered,
        ..newest.delivery.clone()
    };
    let newest_header = ResultHeader::new(
        &as_newest,
        Some(&merged),
        ctx.repository.as_deref(),
        ctx.env.as_deref(),
    );
    tracing::info!(
        newest = %newest.commit,
        newest_seq = as_newest.seq,
        skipped = skipped.len(),
        "syncing the newest waiting push in place of this one"
    );
    let target = Target::Commit(newest.commit.clone());
    let newest_commit = match checked_out(ctx, &target, header, started).await {
        Ok(newest_commit) => newest_commit,
        Err(error) => return Some(error),
    };
    let finished = run_at(
        ctx,
        &as_newest,
        &merged,
        &newest_header,
        &newest_commit,
        env,
        started,
    )
    .await?;
    publish_finished(ctx, &as_newest, &finished).await?;
    let covered = Covered {
        by_commit: newest_commit.clone(),
        by_seq: as_newest.seq,
        state: finished.state,
        totals: finished.totals,
    };
    let mut seqs: Vec<u64> = skipped.iter().map(|w| w.delivery.seq).collect();
    seqs.extend([as_newest.seq, delivery.seq]);
    ctx.applied.cover(&seqs, &covered, &ctx.shutdown).await?;
    for _ in 0..=skipped.len() {
        ctx.metrics.push_superseded();
    }
    Some(header.superseded(
        Some(commit),
        &newest_commit,
        finished.state,
        finished.totals,
        elapsed_ms(started),
    ))
}

/// Prepares the tasks' packages at the checked-out `commit`, decides the services of `event`,
/// runs them and returns the finished result (its `started` stored); `None` when shutdown
/// interrupted it.
async fn run_at(
    ctx: &Context,
    delivery: &Delivery,
    event: &Event,
    header: &ResultHeader,
    commit: &str,
    mut env: TaskEnv,
    started: Instant,
) -> Option<SyncFinished> {
    let commit = commit.to_string();
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
    let decided = match decide_services(ctx, event, &commit).await {
        Ok(decided) => decided,
        Err(e) => {
            let reason = e.to_string();
            tracing::error!(%commit, "{reason}");
            return Some(header.error(Some(&commit), reason, elapsed_ms(started)));
        }
    };
    decided.log(&commit);
    let started_result = header.started(&commit, &decided.selected, &decided.unknown);
    publish(ctx, STARTED_SUBJECT, delivery, "started", &started_result).await?;

    let force = event.force() || delivery.force;
    let announce = Announce { delivery, header };
    let mut results = run_services(ctx, &decided, &commit, force, &env, announce).await?;
    for key in &decided.unknown {
        tracing::warn!(service = %key, "no such service at this commit");
        results.push(decide::unknown_service(key));
        ctx.metrics.task_finished(SyncOutcome::Unknown, 0.0);
    }
    Some(header.finished(&commit, results, elapsed_ms(started)))
}

/// What an event runs at its commit.
pub(crate) struct Decided {
    /// The services to run, in key order, each with why.
    selected: Vec<(Service, Reason)>,
    /// Keys a manual request named that are not services at the commit.
    unknown: Vec<String>,
    /// Changed paths that selected nothing.
    unselected: Vec<String>,
    /// The declared dependencies in force (their `after` orders the services).
    deps: Option<Dependencies>,
}

/// At most this many of the paths that selected nothing are named in the log.
const UNSELECTED_LOGGED: usize = 20;

impl Decided {
    /// Says what was selected and why, and which changed paths selected nothing.
    fn log(&self, commit: &str) {
        let keys: Vec<&str> = self.selected.iter().map(|(s, _)| s.key.as_str()).collect();
        tracing::info!(%commit, services = ?keys, unknown = ?self.unknown, "sync started");
        for (service, reason) in &self.selected {
            tracing::info!(service = %service.key, %reason, "selected");
        }
        if !self.unselected.is_empty() {
            let named: Vec<&str> = self
                .unselected
                .iter()
                .take(UNSELECTED_LOGGED)
                .map(String::as_str)
                .collect();
            tracing::info!(
                count = self.unselected.len(),
                paths = ?named,
                "changed paths that select no service"
            );
        }
    }
}

/// Why the services of an event could not be decided: the sync ends `error`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecideError {
    #[error("Failed to read git repository: {0}")]
    Git(#[from] git::GitError),
    #[error("Bad dependency manifest {file}: {problem}")]
    Manifest { file: String, problem: String },
}

/// Most bytes of a dependency manifest read.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// The dependencies declared for this commit: `IAC_RULES`'s `services` table and the
/// `DEPENDENCIES_FILE` of the checkout, merged, every `after` naming a service of `discovered`.
fn dependencies_at(
    ctx: &Context,
    discovered: &[Service],
) -> Result<Option<Dependencies>, DecideError> {
    dependencies_in(
        &ctx.rules,
        ctx.config.dependencies_file.as_deref(),
        ctx.checkout.dir(),
        discovered,
    )
}

/// The dependencies declared in `rules` and in `dependencies_file` of the checkout at
/// `checkout`, merged, every `after` naming a service of `discovered`.
pub(crate) fn dependencies_in(
    rules: &Rules,
    dependencies_file: Option<&str>,
    checkout: &std::path::Path,
    discovered: &[Service],
) -> Result<Option<Dependencies>, DecideError> {
    let from_rules = rules.dependencies();
    let (deps, file) = match dependencies_file {
        None => (from_rules.cloned(), "IAC_RULES".to_string()),
        Some(file) => {
            let bad = |problem: String| DecideError::Manifest {
                file: file.to_string(),
                problem,
            };
            let text = read_manifest(checkout, file).map_err(bad)?;
            let manifest = Dependencies::from_yaml(&text).map_err(|e| bad(e.to_string()))?;
            let deps = match from_rules {
                Some(rules) => rules.merged(&manifest).map_err(|e| bad(e.to_string()))?,
                None => manifest,
            };
            (Some(deps), file.to_string())
        }
    };
    let Some(deps) = deps else {
        return Ok(None);
    };
    deps.check_services(discovered)
        .map_err(|e| DecideError::Manifest {
            file: file.clone(),
            problem: e.to_string(),
        })?;
    let undiscovered = deps.undiscovered(discovered);
    if !undiscovered.is_empty() {
        tracing::warn!(%file, services = ?undiscovered, "declared services that are not services at this commit");
    }
    Ok(Some(deps))
}

/// The text of `file` in `checkout`: a regular file inside the checkout (a symbolic link, of
/// the file or of a directory on its way, could point out of it), of bounded size.
fn read_manifest(checkout: &std::path::Path, file: &str) -> Result<String, String> {
    use std::io::Read;
    let path = checkout.join(file);
    let meta = std::fs::symlink_metadata(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file at this commit".to_string(),
        _ => e.to_string(),
    })?;
    let inside = path
        .canonicalize()
        .and_then(|real| Ok(real.starts_with(checkout.canonicalize()?)))
        .unwrap_or(false);
    if !meta.is_file() || !inside {
        return Err("not a regular file of the repository (a symbolic link or a directory)".into());
    }
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!("larger than {MAX_MANIFEST_BYTES} bytes"));
    }
    Ok(text)
}

/// The services the event runs at `commit`, why, and for a manual sync or a deployment the
/// unknown names.
async fn decide_services(
    ctx: &Context,
    event: &Event,
    commit: &str,
) -> Result<Decided, DecideError> {
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
            let (files, diff, from_applied) =
                tokio::join!(ctx.checkout.files(), diff, diff_from_applied(ctx, commit));
            let discovered = ctx.rules.discover(files?.iter().map(String::as_str));
            let diff = decide::joined_diff(push, diff?, from_applied);
            let deps = dependencies_at(ctx, &discovered)?;
            let fan_out = decide::push_services(
                push,
                diff.as_deref(),
                &ctx.rules,
                &discovered,
                deps.as_ref(),
            );
            Ok(Decided {
                selected: fan_out.selected,
                unknown: Vec::new(),
                unselected: fan_out.unselected,
                deps,
            })
        }
        Event::Sync(request) => {
            let files = ctx.checkout.files().await?;
            let discovered = ctx.rules.discover(files.iter().map(String::as_str));
            let deps = dependencies_at(ctx, &discovered)?;
            let (selected, unknown) = decide::requested_services(request, &discovered);
            Ok(Decided {
                selected,
                unknown,
                unselected: Vec::new(),
                deps,
            })
        }
        Event::Deploy(request) => {
            let files = ctx.checkout.files().await?;
            let discovered = ctx.rules.discover(files.iter().map(String::as_str));
            let deps = dependencies_at(ctx, &discovered)?;
            let (selected, unknown) = decide::deploy_services(request, &discovered);
            Ok(Decided {
                selected,
                unknown,
                unselected: Vec::new(),
                deps,
            })
        }
    }
}

/// The paths changed from the environment's applied head to `commit`, when that head is one
/// of its ancestors (pushes that never synced lie between them); `None` otherwise, or when
/// git cannot tell.
async fn diff_from_applied(ctx: &Context, commit: &str) -> Option<Vec<String>> {
    let head = ctx.applied.read().await.head?;
    if head.commit == commit || !ctx.checkout.is_ancestor(&head.commit, commit).await {
        return None;
    }
    ctx.checkout.changed_paths(&head.commit, commit).await.ok()
}

/// Runs the selected services' tasks, up to `SYNC_PARALLELISM` at once, each only after
/// those it comes `after`; a service behind one that did not sync is reported blocked. The
/// results are in the services' order, whatever order the tasks ended in. `None` when
/// shutdown came before every service ran, or its grace ran out.
async fn run_services(
    ctx: &Context,
    decided: &Decided,
    commit: &str,
    force: bool,
    env: &TaskEnv,
    announce: Announce<'_>,
) -> Option<Vec<ServiceResult>> {
    let selected = &decided.selected;
    let keys: Vec<&str> = selected.iter().map(|(s, _)| s.key.as_str()).collect();
    let mut schedule = Schedule::new(&keys, |key| {
        decided
            .deps
            .as_ref()
            .map_or(&[][..], |deps| deps.after(key))
    });
    let limit = usize::from(ctx.config.sync_parallelism);
    let mut results: Vec<Option<ServiceResult>> = vec![None; selected.len()];
    let mut running = FuturesUnordered::new();
    let mut interrupted = false;
    loop {
        while running.len() < limit && !ctx.shutdown.is_triggered() {
            let Some(i) = schedule.start_next() else {
                break;
            };
            let (service, reason) = &selected[i];
            let task = run_task(ctx, service, reason, commit, force, env, announce);
            running.push(async move { (i, task.await) });
        }
        let Some((i, result)) = running.next().await else {
            break;
        };
        // The others were given the same grace: let them end too before handing back.
        let Some(mut result) = result else {
            interrupted = true;
            continue;
        };
        result.reason = Some(selected[i].1.to_string());
        let synced = result.outcome == SyncOutcome::Synced;
        results[i] = Some(result);
        for (j, root) in schedule.finish(i, synced) {
            let outcome = results[root]
                .as_ref()
                .map_or(SyncOutcome::Failed, |r| r.outcome);
            let mut blocked = decide::blocked_service(&selected[j].0, keys[root], outcome);
            tracing::warn!(service = keys[j], "{}", blocked.output_tail.join(" "));
            ctx.metrics.task_finished(SyncOutcome::Blocked, 0.0);
            blocked.reason = Some(selected[j].1.to_string());
            results[j] = Some(blocked);
        }
    }
    if interrupted {
        return None;
    }
    results.into_iter().collect()
}

/// Runs one task, once it is announced; `None` when the shutdown grace ran out and it was
/// killed.
async fn run_task(
    ctx: &Context,
    service: &Service,
    reason: &Reason,
    commit: &str,
    force: bool,
    env: &TaskEnv,
    announce: Announce<'_>,
) -> Option<ServiceResult> {
    announce.task_started(ctx, commit, service, reason).await;
    let began = Instant::now();
    let shutdown = ctx.shutdown.clone();
    let grace = ctx.config.shutdown_grace;
    let grace_over = async move {
        shutdown.wait().await;
        tracing::info!(
            service = %service.key,
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

/// What a task's `TaskStarted` repeats about its event.
#[derive(Clone, Copy)]
struct Announce<'a> {
    delivery: &'a Delivery,
    header: &'a ResultHeader,
}

impl Announce<'_> {
    /// Stores that `service`'s task starts, waiting at most [`TASK_STARTED_BOUND`]; a failure
    /// is logged and the task runs all the same.
    async fn task_started(&self, ctx: &Context, commit: &str, service: &Service, reason: &Reason) {
        let started = self.header.task_started(commit, service, reason);
        let payload = serde_json::to_vec(&started).expect("results serialize to JSON");
        let delivery = self.delivery;
        // A task started again by a redelivered event is announced anew.
        let msg_id = format!(
            "{}:{}:{}:task:{}",
            delivery.event_id, delivery.seq, delivery.delivered, service.key
        );
        let message = PublishMessage::build()
            .payload(payload.into())
            .header(EVENT_ID_HEADER, delivery.event_id.as_str())
            .header(MSG_ID_HEADER, msg_id.as_str());
        let stored = tokio::time::timeout(TASK_STARTED_BOUND, async {
            match ctx.js.send_publish(TASK_STARTED_SUBJECT, message).await {
                Ok(ack) => ack.await.map(drop),
                Err(e) => Err(e),
            }
        })
        .await;
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(service = %service.key, error = %e, "could not store that the task started; running it all the same")
            }
            Err(_) => tracing::warn!(
                service = %service.key,
                "storing that the task started took longer than {TASK_STARTED_BOUND:?}; running it all the same"
            ),
        }
    }
}

/// Stores the finished result and counts it; `None` when shutdown came before it was stored.
async fn publish_finished(
    ctx: &Context,
    delivery: &Delivery,
    finished: &SyncFinished,
) -> Option<()> {
    let finished = &decide::fit_to_message(finished.clone(), ctx.js.client().max_payload());
    publish(ctx, FINISHED_SUBJECT, delivery, "finished", finished).await?;
    let push = finished.trigger == Trigger::Push;
    ctx.applied
        .record(finished, push, &ctx.shutdown, &ctx.metrics)
        .await?;
    if let Some(by) = &finished.superseded_by {
        tracing::info!(state = ?finished.state, %by, "push acknowledged as superseded");
        return Some(());
    }
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
