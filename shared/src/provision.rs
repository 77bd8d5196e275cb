//! `iac-worker provision`: the operator creates, or brings back to the expected configuration,
//! everything the services rely on (both streams, the durable consumers, the buckets and the
//! reporter's dead-letter stream), as the NATS admin user, before the services start. The services' own NATS users may
//! only check that it is there (see `deploy/nats/permissions.conf`).

use std::time::Duration;

use async_nats::jetstream;
use clap::Args;

use crate::deploy::EnvironmentArgs;
use crate::nats::{
    ConnectError, ConsumerSettings, NatsArgs, ProvisionError, REPORTER_DEFAULT_ACK_WAIT,
    WorkerConsumerArgs, provision_all,
};
use crate::shutdown::Shutdown;

/// How long provisioning waits for JetStream to answer (a cluster electing its leader).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The worker's consumer settings, read from the same variables and with the same checks as
/// the worker, so what is provisioned is what the worker expects.
#[derive(Debug, Clone, Args)]
pub struct ProvisionCommand {
    #[command(flatten)]
    pub worker: WorkerConsumerArgs,

    #[command(flatten)]
    pub environments: EnvironmentArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionCommandError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("JetStream did not answer within {0:?}")]
    NotReady(Duration),
}

impl ProvisionCommand {
    /// The consumer settings this command provisions with.
    pub fn consumer_settings(&self) -> ConsumerSettings {
        ConsumerSettings {
            worker_ack_wait: self.worker.ack_wait,
            worker_max_deliver: self.worker.max_deliver(),
            reporter_ack_wait: REPORTER_DEFAULT_ACK_WAIT,
            environments: self.environments.environments(),
        }
    }

    /// Connects, provisions (retrying while JetStream is not ready, at most [`READY_WITHIN`])
    /// and prints what is in place.
    pub async fn run(
        &self,
        nats: &NatsArgs,
        client_name: &str,
    ) -> Result<(), ProvisionCommandError> {
        let client = crate::nats::connect_once(nats, client_name).await?;
        let js = jetstream::new(client);
        let consumers = self.consumer_settings();
        let never = Shutdown::never();
        let attempts = crate::runtime::retry_until_shutdown(
            &never,
            Duration::from_millis(200),
            || provision_all(&js, &nats.streams, &consumers),
            |e, delay| {
                if matches!(e, ProvisionError::Drift { .. }) {
                    return false;
                }
                tracing::warn!(error = %e, retry_in = ?delay, "JetStream not ready yet");
                true
            },
        );
        tokio::time::timeout(READY_WITHIN, attempts)
            .await
            .map_err(|_| ProvisionCommandError::NotReady(READY_WITHIN))??;
        let mut workers = vec![crate::names::WORKER_CONSUMER.to_string()];
        workers.extend(
            consumers
                .environments
                .separate()
                .map(crate::nats::worker_env_consumer),
        );
        println!(
            "provisioned: streams IAC_EVENTS, IAC_RESULTS and IAC_UNDELIVERED ({} replicas, kept \
             {}), IAC_RUNLOGS (kept {}), consumers {}, iac-reporter and iac-reporter-events, \
             buckets IAC_STATUSES, IAC_DEPLOYMENTS, IAC_NOTIFY, IAC_APPLIED and IAC_RUN_LINKS",
            nats.streams.replicas,
            humantime::format_duration(nats.streams.max_age),
            humantime::format_duration(nats.streams.run_log_max_age),
            workers.join(", "),
        );
        Ok(())
    }
}
