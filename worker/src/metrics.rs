//! The worker's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use iac_shared::events::{FinishedState, SyncOutcome};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabel {
    consumer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    env: String,
    service: String,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    syncs: Family<StateLabel, Counter>,
    tasks: Family<OutcomeLabel, Counter>,
    task_duration: Histogram,
    queue_depth: Family<ConsumerLabel, Gauge>,
    replays: Counter,
    superseded: Counter,
    reconciled: Counter,
    last_success: Family<ServiceLabel, Gauge>,
}

impl Metrics {
    /// The metrics, registered in a new registry under the `iac_worker` prefix.
    pub fn new() -> (Self, Registry) {
        let metrics = Metrics {
            syncs: Family::default(),
            tasks: Family::default(),
            // 0.25 s .. about 2.3 h
            task_duration: Histogram::new(exponential_buckets(0.25, 2.0, 16)),
            queue_depth: Family::default(),
            replays: Counter::default(),
            superseded: Counter::default(),
            reconciled: Counter::default(),
            last_success: Family::default(),
        };
        let mut registry = Registry::with_prefix("iac_worker");
        registry.register(
            "syncs",
            "Syncs finished, by state (success, failure, error)",
            metrics.syncs.clone(),
        );
        registry.register(
            "tasks",
            "Service tasks run, by outcome",
            metrics.tasks.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "How long service tasks ran",
            metrics.task_duration.clone(),
        );
        registry.register(
            "queue_depth",
            "Events waiting for the worker, by consumer (one per environment served apart)",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "replays",
            "Replayed events handled",
            metrics.replays.clone(),
        );
        registry.register(
            "pushes_superseded",
            "Pushes not synced on their own: a newer push that descends from them was synced in their place",
            metrics.superseded.clone(),
        );
        registry.register(
            "reconciled",
            "Branch heads found not synced (their webhook never came) and published as a push",
            metrics.reconciled.clone(),
        );
        registry.register(
            "service_last_success_timestamp_seconds",
            "When each service last synced successfully, by environment (Unix time)",
            metrics.last_success.clone(),
        );
        (metrics, registry)
    }

    pub fn push_superseded(&self) {
        self.superseded.inc();
    }

    pub fn head_reconciled(&self) {
        self.reconciled.inc();
    }

    /// Records that `service` synced in `env` (`-` without a push environment) just now.
    pub fn service_synced(&self, env: &str, service: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_success
            .get_or_create(&ServiceLabel {
                env: env.into(),
                service: service.into(),
            })
            .set(now.try_into().unwrap_or(i64::MAX));
    }

    pub fn sync_finished(&self, state: FinishedState, replay: bool) {
        let state = match state {
            FinishedState::Success => "success",
            FinishedState::Failure => "failure",
            FinishedState::Error => "error",
        };
        self.syncs
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .inc();
        if replay {
            self.replays.inc();
        }
    }

    pub fn task_finished(&self, outcome: SyncOutcome, seconds: f64) {
        let outcome = match outcome {
            SyncOutcome::Synced => "synced",
            SyncOutcome::Failed => "failed",
            SyncOutcome::TimedOut => "timed_out",
            SyncOutcome::Unknown => "unknown",
            SyncOutcome::NotFinished => "not_finished",
            SyncOutcome::Blocked => "blocked",
        };
        self.tasks
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
        self.task_duration.observe(seconds);
    }

    pub fn set_queue_depth(&self, consumer: &str, pending: u64) {
        self.queue_depth
            .get_or_create(&ConsumerLabel {
                consumer: consumer.into(),
            })
            .set(pending.try_into().unwrap_or(i64::MAX));
    }
}
