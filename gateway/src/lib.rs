//! The internet-facing edge of iac-runner.
//!
//! It verifies GitHub webhooks, signed manual sync requests and signed deployment requests and
//! answers only once the event is stored in JetStream; when it cannot store, it answers 503 so
//! the sender retries.
//!
//! - [`config`]: the command line and environment (`WEBHOOK_SECRET`, `GIT_BRANCH`, limits,
//!   `DEPLOY_*`).
//! - [`webhook`]: what a verified body means: ping, ignored event, ignored push, push to store.
//! - [`deploy`]: what a `/deploy` or `/deploy/status` body asks, and the answers built from a
//!   deployment summary.
//! - [`deployments`]: the nonces and deployment summaries in their JetStream buckets.
//! - [`deploy_http`]: the two deployment endpoints: accept once, hold, or answer from a summary.
//! - [`client`]: `iac-gateway deploy`, the client a CI job runs.
//! - [`store`]: publishing to JetStream with a bounded wait for the acknowledgement.
//! - [`http`]: routes, bounded body reading, signatures, and the JSON answers.
//! - [`server`]: the accept loop: bounded connections, header and idle timeouts.
//! - [`error`]: every request failure and its HTTP status, in one place.
//! - [`metrics`]: the `iac_gateway_*` Prometheus metrics.

pub mod client;
pub mod config;
pub mod deploy;
pub mod deploy_http;
pub mod deployments;
pub mod error;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;
pub mod webhook;

use std::sync::Arc;

use anyhow::Context;
use iac_shared::nats::ConsumerSettings;
use iac_shared::shutdown::Shutdown;
use prometheus_client::registry::Registry;

pub use config::{Cli, Command, Config};

/// Serves on `listener` until `shutdown`, then lets in-flight requests finish.
///
/// NATS is reached in the background: `/health` answers at once, `/ready` and event requests
/// answer 503 until the streams are provisioned, and again whenever NATS is unreachable.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let rules = config
        .load_rules()
        .map_err(|e| anyhow::anyhow!("IAC_RULES: {e}"))?;
    let client = iac_shared::nats::connect(&config.nats, "iac-gateway")
        .await
        .context("NATS")?;
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let deploy_subjects = config
        .deploy
        .environments
        .deploy_envs
        .0
        .iter()
        .map(|env| &*String::leak(iac_shared::deploy::deploy_subject(env)))
        .collect();
    let consumers = ConsumerSettings {
        environments: config.deploy.environments.environments(),
        ..ConsumerSettings::default()
    };
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(config.publish_timeout)
        .build(client.clone());
    let app = Arc::new(http::App {
        deploy_secret: config.deploy_secret(),
        secret: config.webhook_secret,
        branch: config.branch,
        repository: config.deploy.repository(),
        envs: config.deploy.environments.deploy_envs.0,
        deploy_subjects,
        wait_timeout: config.deploy.wait_timeout,
        cache_ttl: config.deploy.cache_ttl,
        legacy_sync: config.deploy.legacy_sync,
        github_app_id: config.github_app_id,
        deployments: deployments::Deployments::new(js),
        shutdown: shutdown.clone(),
        rules,
        store: store::EventStore::new(client, config.publish_timeout),
        metrics,
        registry,
        max_body_bytes: config.max_body_bytes,
        body_read_timeout: config.body_read_timeout,
        pending_body_bytes: Arc::new(tokio::sync::Semaphore::new(
            config.max_pending_body_bytes as usize,
        )),
    });

    let provisioning = {
        let app = app.clone();
        let settings = config.nats.streams.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            app.store.provision(&settings, &consumers, &shutdown).await;
            app.deployments.provision(&settings, &shutdown).await;
        })
    };
    tracing::info!(
        address = %listener.local_addr().context("reading the bound address")?,
        branch = %app.branch,
        repository = app.repository.as_deref().unwrap_or("any"),
        environments = ?app.envs,
        legacy_sync = app.legacy_sync,
        "gateway listening"
    );
    let limits = server::ConnectionLimits {
        max_connections: config.max_connections as usize,
        header_read_timeout: config.header_read_timeout,
    };
    let refused = app.metrics.connections_refused.clone();
    server::serve(listener, http::routes(app), limits, refused, shutdown).await;
    provisioning.abort();
    tracing::info!("gateway stopped");
    Ok(())
}
