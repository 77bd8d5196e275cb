//! The reporter's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    posted: Family<Labels, Counter>,
    skipped: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    undelivered: Counter,
    rate_limit_remaining: Gauge,
    replays: Counter,
    notifications: Family<Labels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "iac_reporter_statuses_posted",
            "Statuses GitHub accepted, by state",
            metrics.posted.clone(),
        );
        registry.register(
            "iac_reporter_statuses_skipped",
            "Statuses not posted: superseded by a newer one, already accepted, log-only mode, no commit",
            metrics.skipped.clone(),
        );
        registry.register(
            "iac_reporter_retries",
            "Messages handed back for a later attempt, by reason",
            metrics.retries.clone(),
        );
        registry.register(
            "iac_reporter_refusals",
            "GitHub answers refusing a status (4xx other than rate limits), by HTTP code",
            metrics.refusals.clone(),
        );
        registry.register(
            "iac_reporter_statuses_undelivered",
            "Statuses given up (a 401, or STATUS_GIVE_UP_AFTER of attempts) and kept in IAC_UNDELIVERED",
            metrics.undelivered.clone(),
        );
        registry.register(
            "iac_reporter_github_rate_limit_remaining",
            "Requests left in GitHub's rate-limit window, as last reported",
            metrics.rate_limit_remaining.clone(),
        );
        registry.register(
            "iac_reporter_replays",
            "Replayed results handled (published again by iac-reporter replay)",
            metrics.replays.clone(),
        );
        registry.register(
            "iac_reporter_notifications",
            "Notifications (NOTIFY_URL) by event (failure, recovery) and outcome: sent, retried (an \
             attempt failed), given_up, cancelled (the state it announced ended before it was sent), \
             dropped (the queue was full; event unknown)",
            metrics.notifications.clone(),
        );
        metrics
    }

    pub fn notification(&self, event: &str, outcome: &str) {
        self.notifications
            .get_or_create(&vec![("event", event.into()), ("outcome", outcome.into())])
            .inc();
    }

    pub fn replay(&self) {
        self.replays.inc();
    }

    pub fn posted(&self, state: &str) {
        self.posted
            .get_or_create(&vec![("state", state.into())])
            .inc();
    }

    pub fn skipped(&self, reason: &str) {
        self.skipped
            .get_or_create(&vec![("reason", reason.into())])
            .inc();
    }

    pub fn retry(&self, reason: &str) {
        self.retries
            .get_or_create(&vec![("reason", reason.into())])
            .inc();
    }

    pub fn undelivered(&self) {
        self.undelivered.inc();
    }

    pub fn refused(&self, code: u16) {
        self.refusals
            .get_or_create(&vec![("code", code.to_string())])
            .inc();
    }

    pub fn rate_limit_remaining(&self, remaining: i64) {
        self.rate_limit_remaining.set(remaining);
    }
}
