//! The gateway's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubjectLabels {
    pub subject: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

type DurationFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `iac_gateway_requests_total{endpoint,outcome}`
    pub requests: Family<RequestLabels, Counter>,
    /// `iac_gateway_events_published_total{subject}`
    pub published: Family<SubjectLabels, Counter>,
    /// `iac_gateway_duplicates_total`
    pub duplicates: Counter,
    /// `iac_gateway_publish_failures_total`
    pub publish_failures: Counter,
    /// `iac_gateway_request_duration_seconds{endpoint}`
    pub duration: DurationFamily,
    /// `iac_gateway_connections_refused_total`
    pub connections_refused: Counter,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// The metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            requests: Family::default(),
            published: Family::default(),
            duplicates: Counter::default(),
            publish_failures: Counter::default(),
            duration: Family::new_with_constructor(duration_histogram),
            connections_refused: Counter::default(),
        };
        registry.register(
            "iac_gateway_requests",
            "Requests by endpoint and outcome",
            metrics.requests.clone(),
        );
        registry.register(
            "iac_gateway_events_published",
            "Events stored in JetStream",
            metrics.published.clone(),
        );
        registry.register(
            "iac_gateway_duplicates",
            "Redelivered events JetStream stored once",
            metrics.duplicates.clone(),
        );
        registry.register(
            "iac_gateway_publish_failures",
            "Events not stored (answered 503)",
            metrics.publish_failures.clone(),
        );
        registry.register(
            "iac_gateway_request_duration_seconds",
            "Time from request to answer",
            metrics.duration.clone(),
        );
        registry.register(
            "iac_gateway_connections_refused",
            "Connections closed at once because MAX_CONNECTIONS were open",
            metrics.connections_refused.clone(),
        );
        metrics
    }
}
