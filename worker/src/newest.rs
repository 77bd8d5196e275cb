//! Newest commit wins, nothing missed: the applied state of each environment (`IAC_APPLIED`),
//! looking ahead in `IAC_EVENTS` for newer pushes that one sync can cover, the marks of the
//! pushes so covered, and reconciliation of the push environment with the branch head.

use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage};
use iac_shared::events::{FinishedState, PushEvent, SyncFinished, Totals, now_rfc3339};
use iac_shared::history::{
    Applied, AppliedHead, AppliedService, BranchSeen, Drift, applied_key, branch_key, covered_key,
    env_token,
};
use iac_shared::names::{
    EVENT_ID_HEADER, EVENTS_STREAM, MSG_ID_HEADER, PUSH_SUBJECT, RECONCILE_SOURCE,
    REPLAY_OF_HEADER, SOURCE_HEADER, SYNC_SUBJECT,
};
use iac_shared::rules::Rules;
use iac_shared::runtime::retry_until_shutdown;
use iac_shared::shutdown::Shutdown;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::decide::{Delivery, Target};
use crate::git::{Checkout, is_full_commit_id};
use crate::metrics::Metrics;
use crate::sync::{DecideError, dependencies_in};
use crate::workspace::Workspace;

/// Most events looked at behind the one in hand: a longer queue is covered in several steps.
const LOOKAHEAD_LIMIT: u64 = 1000;

/// The first wait before writing the applied state again; it doubles up to a bound.
const WRITE_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The longest wait before a reconcile check that failed (NATS or the remote away) is tried
/// again.
const RETRY_FAILED_CHECK: Duration = Duration::from_secs(30);

/// The longest a reconcile check spends working out which services the branch head changes
/// (waiting for the workspace, fetching, diffing); past it the drift is recorded unknown.
const DRIFT_BOUND: Duration = Duration::from_secs(120);

/// The prefix of the delivery id (and message id) of a push published by reconciliation; the
/// rest is the commit, so every worker publishing it for the same commit publishes one event.
pub const RECONCILE_ID_PREFIX: &str = "reconcile-";

/// An event of `IAC_EVENTS` covered by a newer push's sync (`covered.<seq>`): when it is
/// delivered, it is acknowledged with that sync's outcome and never run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covered {
    /// The commit the covering sync ran.
    pub by_commit: String,
    /// The sequence of the push whose results the covering sync published.
    pub by_seq: u64,
    pub state: FinishedState,
    pub totals: Totals,
}

/// The applied state of one environment and the covered marks, in `IAC_APPLIED`.
#[derive(Clone)]
pub struct AppliedState {
    pub bucket: kv::Store,
    pub env: Option<String>,
}

impl AppliedState {
    /// What the environment last synced; empty when nothing was, or it cannot be read (the
    /// diff then comes from the push alone, as before there was an applied state).
    pub async fn read(&self) -> Applied {
        match self.bucket.get(applied_key(self.env.as_deref())).await {
            Ok(Some(value)) => serde_json::from_slice(&value).unwrap_or_default(),
            Ok(None) => Applied::default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the applied state; diffing from the push alone");
                Applied::default()
            }
        }
    }

    /// Records what a finished sync applied: each service's outcome, and for a push the new
    /// head. Retried while NATS is away; `None` when shutdown came first.
    pub async fn record(
        &self,
        finished: &SyncFinished,
        push: bool,
        shutdown: &Shutdown,
        metrics: &Metrics,
    ) -> Option<()> {
        let Some(commit) = finished.commit.as_deref() else {
            return Some(());
        };
        // A sync that could not run applied nothing.
        if finished.state == FinishedState::Error || finished.superseded_by.is_some() {
            return Some(());
        }
        let key = applied_key(self.env.as_deref());
        let written = retry_until_shutdown(
            shutdown,
            WRITE_RETRY_DELAY,
            || async {
                let mut applied = self.read().await;
                let at = now_rfc3339();
                if push {
                    applied.head = Some(AppliedHead {
                        commit: commit.to_string(),
                        state: Some(finished.state),
                        at: at.clone(),
                        event_id: Some(finished.event_id.clone()),
                    });
                }
                for result in &finished.services {
                    applied.services.insert(
                        result.service.clone(),
                        AppliedService {
                            commit: commit.to_string(),
                            outcome: result.outcome,
                            at: at.clone(),
                        },
                    );
                }
                let value = serde_json::to_vec(&applied).expect("the applied state serializes");
                self.bucket.put(&key, value.into()).await.map(drop)
            },
            |e, _| {
                tracing::warn!(error = %e, "cannot write the applied state yet; retrying");
                true
            },
        )
        .await;
        written.ok()?;
        let env = env_token(self.env.as_deref());
        for result in &finished.services {
            if result.outcome == iac_shared::events::SyncOutcome::Synced {
                metrics.service_synced(env, &result.service);
            }
        }
        Some(())
    }

    /// The mark of the event at `seq`, if a newer push's sync covered it.
    pub async fn covered(&self, seq: u64) -> Option<Covered> {
        match self.bucket.get(covered_key(seq)).await {
            Ok(value) => value.and_then(|v| serde_json::from_slice(&v).ok()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read whether the event was covered; running it");
                None
            }
        }
    }

    /// Marks each of `seqs` covered by `covered`; `None` when shutdown came first.
    pub async fn cover(&self, seqs: &[u64], covered: &Covered, shutdown: &Shutdown) -> Option<()> {
        let value = serde_json::to_vec(covered).expect("covered marks serialize");
        for seq in seqs {
            retry_until_shutdown(
                shutdown,
                WRITE_RETRY_DELAY,
                || self.bucket.put(covered_key(*seq), value.clone().into()),
                |e, _| {
                    tracing::warn!(error = %e, "cannot mark a covered push yet; retrying");
                    true
                },
            )
            .await
            .ok()?;
        }
        Some(())
    }
}

/// A push waiting in `IAC_EVENTS` behind the one in hand.
#[derive(Debug, Clone)]
pub(crate) struct Waiting {
    pub delivery: Delivery,
    pub push: PushEvent,
    /// Its `after`: a full commit id.
    pub commit: String,
}

/// The pushes of `git_ref` stored after `seq`, oldest first, up to the first event that must
/// not be overtaken: a manual request or deployment this consumer serves, a replayed push,
/// or a push naming no exact commit. Events of other consumers are passed over.
pub(crate) async fn waiting_pushes(
    js: &jetstream::Context,
    seq: u64,
    git_ref: &str,
    env: Option<&str>,
) -> Result<Vec<Waiting>, async_nats::Error> {
    let mut stream = js.get_stream(EVENTS_STREAM).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut waiting = Vec::new();
    for next in (seq + 1)..=last.min(seq.saturating_add(LOOKAHEAD_LIMIT)) {
        // A gap: deleted or aged out.
        let Ok(message) = stream.get_raw_message(next).await else {
            continue;
        };
        let subject = message.subject.as_str();
        let is_barrier = subject == SYNC_SUBJECT
            || (env.is_some() && iac_shared::deploy::env_of_subject(subject) == env);
        if is_barrier {
            break;
        }
        if subject != PUSH_SUBJECT {
            continue;
        }
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_string())
        };
        if header(REPLAY_OF_HEADER).is_some() {
            break;
        }
        let Ok(push) = serde_json::from_slice::<PushEvent>(&message.payload) else {
            break;
        };
        if push.git_ref != git_ref {
            continue;
        }
        let Some(commit) = push.after.clone().filter(|c| is_full_commit_id(c)) else {
            break;
        };
        waiting.push(Waiting {
            delivery: Delivery::new(subject, next, 1, header),
            push,
            commit,
        });
    }
    Ok(waiting)
}

/// What one sync will cover in place of the push in hand.
pub(crate) struct Coalesced {
    /// The newest waiting push that descends from the one in hand.
    pub newest: Waiting,
    /// The waiting pushes before it whose commits it contains (they are skipped).
    pub skipped: Vec<Waiting>,
}

/// The newest of `waiting` that is on the branch and descends from `commit` (the push in
/// hand, checked out and on the branch), with the pushes before it that it contains. `None`
/// when none does: the push in hand syncs alone.
pub(crate) async fn coalesce(
    checkout: &Checkout,
    commit: &str,
    mut waiting: Vec<Waiting>,
) -> Option<Coalesced> {
    while let Some(newest) = waiting.pop() {
        if newest.commit == commit
            || !checkout.on_branch(&newest.commit).await
            || !checkout.is_ancestor(commit, &newest.commit).await
        {
            continue;
        }
        let mut skipped = Vec::with_capacity(waiting.len());
        for older in waiting {
            if checkout.is_ancestor(&older.commit, &newest.commit).await {
                skipped.push(older);
            }
        }
        return Some(Coalesced { newest, skipped });
    }
    None
}

/// What reconciliation needs: the branch on the remote, the push environment's applied state,
/// its consumer, and where to publish; the consumer's workspace and rules to tell which
/// services the branch head changes.
pub struct Reconciler {
    pub checkout: Checkout,
    pub workspace: Workspace,
    pub rules: Rules,
    pub applied: AppliedState,
    pub js: jetstream::Context,
    pub consumer: String,
    pub config: Config,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
}

/// What one reconcile check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// The branch head is the applied head.
    UpToDate,
    /// No applied state yet: the branch head became the baseline, nothing synced.
    Baseline(String),
    /// Events are queued or running: they move the applied head, the next check decides.
    Busy,
    /// A push-equivalent event for the head was stored (`true`) or was already stored by
    /// another worker (`false`).
    Published(String, bool),
    /// The branch is not on the remote.
    NoBranch,
}

impl Reconciler {
    /// Checks at start and then every `interval` until shutdown; a check that failed is tried
    /// again within [`RETRY_FAILED_CHECK`].
    pub async fn run(self, interval: Duration) {
        loop {
            let mut wait = interval;
            match self.check().await {
                Ok(Reconciled::Published(head, true)) => {
                    tracing::info!(%head, "the branch head was never synced (no webhook came); published it as a push");
                }
                Ok(Reconciled::Published(head, false)) => {
                    tracing::info!(%head, "the branch head was already published by another worker");
                }
                Ok(Reconciled::Baseline(head)) => tracing::info!(
                    %head,
                    "no applied state yet: the branch head is the baseline, nothing synced"
                ),
                Ok(Reconciled::NoBranch) => {
                    tracing::warn!(branch = %self.config.branch, "reconcile: the branch is not on the remote")
                }
                Ok(Reconciled::UpToDate | Reconciled::Busy) => {}
                Err(e) => {
                    wait = interval.min(RETRY_FAILED_CHECK);
                    tracing::warn!(error = %e, retry_in = ?wait, "reconcile check failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.wait() => return,
            }
        }
    }

    /// One check: the branch head (`git ls-remote`) against the applied head. The head is
    /// recorded as seen, with which services it changes when the worker is idle to tell.
    pub async fn check(&self) -> Result<Reconciled, async_nats::Error> {
        let Some(head) = self.checkout.remote_head().await? else {
            return Ok(Reconciled::NoBranch);
        };
        let env = self.applied.env.as_deref();
        let key = applied_key(env);
        let entry = self.applied.bucket.entry(&key).await?;
        let applied: Applied = entry
            .as_ref()
            .and_then(|e| serde_json::from_slice(&e.value).ok())
            .unwrap_or_default();
        let Some(applied_head) = applied.head else {
            self.saw(&head, None).await?;
            let baseline = Applied {
                head: Some(AppliedHead {
                    commit: head.clone(),
                    state: None,
                    at: now_rfc3339(),
                    event_id: None,
                }),
                ..applied
            };
            let value = serde_json::to_vec(&baseline).expect("the applied state serializes");
            // Only over what was read (a manual sync or a deployment may have recorded its
            // services): a push sync that finished meanwhile wins, and the next check sees it.
            let bucket = &self.applied.bucket;
            let _ = match entry {
                Some(entry) => bucket
                    .update(&key, value.into(), entry.revision)
                    .await
                    .map(drop)
                    .map_err(drop),
                None => bucket
                    .create(&key, value.into())
                    .await
                    .map(drop)
                    .map_err(drop),
            };
            return Ok(Reconciled::Baseline(head));
        };
        if applied_head.commit == head {
            self.saw(&head, None).await?;
            return Ok(Reconciled::UpToDate);
        }
        let stream = self.js.get_stream(EVENTS_STREAM).await?;
        let info = stream.consumer_info(&self.consumer).await?;
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            // A busy worker cannot work the drift out again: what was found for this head
            // stays (`status` shows it only while the applied head it came from stays).
            let earlier = self.drift_seen(&head).await?;
            self.saw(&head, earlier).await?;
            return Ok(Reconciled::Busy);
        }
        // Recorded before publishing, so `status` names the services while they sync.
        let drift = self.drift(&applied_head.commit, &head).await;
        self.saw(&head, drift).await?;
        let id = format!("{RECONCILE_ID_PREFIX}{head}");
        let push = PushEvent::<String> {
            delivery_id: id.clone(),
            repository: self.config.repo_url.owner_and_name(),
            git_ref: format!("refs/heads/{}", self.config.branch),
            before: Some(applied_head.commit),
            after: Some(head.clone()),
            head_commit: Some(head.clone()),
            pusher: None,
            paths: Vec::new(),
            paths_truncated: false,
        };
        let payload = serde_json::to_vec(&push).expect("push events serialize");
        let message = PublishMessage::build()
            .payload(payload.into())
            .header(MSG_ID_HEADER, id.as_str())
            .header(EVENT_ID_HEADER, id.as_str())
            .header(SOURCE_HEADER, RECONCILE_SOURCE);
        let ack = self.js.send_publish(PUSH_SUBJECT, message).await?.await?;
        if !ack.duplicate {
            self.metrics.head_reconciled();
        }
        Ok(Reconciled::Published(head, !ack.duplicate))
    }

    /// Records `head` as the branch head seen now, with which services it changes.
    async fn saw(&self, head: &str, drift: Option<Drift>) -> Result<(), async_nats::Error> {
        let seen = BranchSeen {
            head: head.to_string(),
            at: now_rfc3339(),
            drift,
        };
        let seen = serde_json::to_vec(&seen).expect("branch heads serialize");
        let key = branch_key(self.applied.env.as_deref());
        self.applied.bucket.put(key, seen.into()).await?;
        Ok(())
    }

    /// The drift recorded when `head` was last seen, if it was the head then too.
    async fn drift_seen(&self, head: &str) -> Result<Option<Drift>, async_nats::Error> {
        let key = branch_key(self.applied.env.as_deref());
        Ok(self
            .applied
            .bucket
            .get(key)
            .await?
            .and_then(|value| serde_json::from_slice::<BranchSeen>(&value).ok())
            .filter(|seen| seen.head == head)
            .and_then(|seen| seen.drift))
    }

    /// The services the changes from `from` (the applied head) to `head` select, as a push of
    /// them would; `None` when that cannot be worked out within [`DRIFT_BOUND`].
    async fn drift(&self, from: &str, head: &str) -> Option<Drift> {
        match tokio::time::timeout(DRIFT_BOUND, self.drifted_services(from, head)).await {
            Ok(Ok(services)) => Some(Drift {
                from: from.to_string(),
                services,
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, %head, "cannot tell which services the branch head changes");
                None
            }
            Err(_) => {
                tracing::warn!(%head, bound = ?DRIFT_BOUND, "timed out telling which services the branch head changes");
                None
            }
        }
    }

    /// Checks out `head` and selects services from the paths changed since `from`, with the
    /// rules and the dependency manifest at `head`, as a push would.
    async fn drifted_services(&self, from: &str, head: &str) -> Result<Vec<String>, DriftError> {
        // The checkout is the consumer's: a sync holds this lock throughout, and the next one
        // checks out its own commit again.
        let _lock = self.workspace.lock().await.map_err(DriftError::Lock)?;
        let head = self
            .checkout
            .update(&Target::Commit(head.to_string()))
            .await
            .map_err(DecideError::from)?;
        let (files, changed) = tokio::join!(
            self.checkout.files(),
            self.checkout.changed_paths(from, &head)
        );
        let discovered = self
            .rules
            .discover(files.map_err(DecideError::from)?.iter().map(String::as_str));
        let deps = dependencies_in(
            &self.rules,
            self.config.dependencies_file.as_deref(),
            self.checkout.dir(),
            &discovered,
        )?;
        let changed = changed.map_err(DecideError::from)?;
        let fan_out = self.rules.fan_out(
            changed.iter().map(String::as_str),
            &discovered,
            deps.as_ref(),
        );
        Ok(fan_out.selected.into_iter().map(|(s, _)| s.key).collect())
    }
}

/// Why a reconcile check could not tell which services the branch head changes.
#[derive(Debug, thiserror::Error)]
enum DriftError {
    #[error("Cannot lock the workspace: {0}")]
    Lock(std::io::Error),
    #[error(transparent)]
    Decide(#[from] DecideError),
}
