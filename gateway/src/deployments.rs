//! The gateway's part of the deployment state in JetStream: the nonces of accepted signed
//! requests (`IAC_NONCES`) and the deployment summaries (`IAC_DEPLOYMENTS`), written with
//! compare-and-set so that several gateways agree on which of them accepted a deployment.
//!
//! Only keys are read and written: the gateway's NATS user may not create consumers, so there
//! is no listing and no watch; the ids of one environment and commit are kept under an index
//! key, `ref.<env>.<commit>`.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use iac_shared::deploy::{DeploymentStatus, DeploymentSummary};
use iac_shared::nats::{StreamSettings, ensure_deploy_buckets};
use iac_shared::shutdown::Shutdown;

/// Why the deployment state could not be read or written (answered 503).
#[derive(Debug, thiserror::Error)]
pub enum DeploymentsError {
    #[error("deployment buckets not provisioned yet")]
    NotProvisioned,
    #[error("{0}")]
    Kv(String),
}

fn kv_err(what: &str, e: impl std::fmt::Display) -> DeploymentsError {
    DeploymentsError::Kv(format!("{what}: {e}"))
}

/// A summary as stored: its revision (for compare-and-set) and how long ago it was written.
#[derive(Debug, Clone)]
pub struct StoredSummary {
    pub summary: DeploymentSummary,
    pub revision: u64,
    pub age: Duration,
    /// The stored bytes, to put back when an acceptance is rolled back.
    pub raw: Bytes,
}

impl StoredSummary {
    pub fn is_final(&self) -> bool {
        self.summary.status != DeploymentStatus::InProgress
    }
}

struct Buckets {
    summaries: kv::Store,
    nonces: kv::Store,
}

pub struct Deployments {
    js: jetstream::Context,
    buckets: OnceLock<Buckets>,
}

impl Deployments {
    pub fn new(js: jetstream::Context) -> Self {
        Deployments {
            js,
            buckets: OnceLock::new(),
        }
    }

    /// Opens both buckets (creating them where this NATS user may), retrying until they exist
    /// or shutdown: `/deploy` is answered 503 until then.
    pub async fn provision(&self, settings: &StreamSettings, shutdown: &Shutdown) {
        let opened = iac_shared::runtime::retry_until_shutdown(
            shutdown,
            Duration::from_millis(200),
            || ensure_deploy_buckets(&self.js, settings),
            |e, delay| {
                tracing::warn!(error = %e, retry_in = ?delay, "deployment buckets not ready yet");
                !matches!(e, iac_shared::nats::ProvisionError::Drift { .. })
            },
        )
        .await;
        match opened {
            Ok((summaries, nonces)) => {
                let _ = self.buckets.set(Buckets { summaries, nonces });
                tracing::info!("deployment buckets ready; accepting deployments");
            }
            Err(e) if shutdown.is_triggered() => {
                tracing::debug!(error = %e, "opening the deployment buckets stopped by shutdown");
            }
            Err(e) => tracing::error!(
                error = %e,
                "cannot open the deployment buckets; every deployment will be answered 503"
            ),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.buckets.get().is_some()
    }

    fn buckets(&self) -> Result<&Buckets, DeploymentsError> {
        self.buckets.get().ok_or(DeploymentsError::NotProvisioned)
    }

    /// Records a nonce under `key`; `false` when it was recorded before (a replay).
    pub async fn record_nonce(&self, key: &str, timestamp: &str) -> Result<bool, DeploymentsError> {
        let nonces = &self.buckets()?.nonces;
        match nonces
            .create(key, Bytes::copy_from_slice(timestamp.as_bytes()))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(kv_err("recording the nonce", e)),
        }
    }

    /// The summary of deployment `id`, if there is one.
    pub async fn summary(&self, id: &str) -> Result<Option<StoredSummary>, DeploymentsError> {
        let summaries = &self.buckets()?.summaries;
        let entry = summaries
            .entry(id)
            .await
            .map_err(|e| kv_err("reading a summary", e))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        let summary: DeploymentSummary = serde_json::from_slice(&entry.value)
            .map_err(|e| kv_err(&format!("summary {id} is not a summary"), e))?;
        let age = SystemTime::now()
            .duration_since(SystemTime::from(entry.created))
            .unwrap_or_default();
        Ok(Some(StoredSummary {
            summary,
            revision: entry.revision,
            age,
            raw: entry.value,
        }))
    }

    /// Writes `summary` if the stored one is still `replacing` (`None`: there is none): the
    /// revision written, or `None` when another gateway wrote first.
    pub async fn claim(
        &self,
        summary: &DeploymentSummary,
        replacing: Option<u64>,
    ) -> Result<Option<u64>, DeploymentsError> {
        let summaries = &self.buckets()?.summaries;
        let value: Bytes = serde_json::to_vec(summary)
            .expect("a summary serializes")
            .into();
        let id = &summary.deployment_id;
        match replacing {
            None => match summaries.create(id, value).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(kv_err("writing a summary", e)),
            },
            Some(revision) => match summaries.update(id, value, revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(kv_err("writing a summary", e)),
            },
        }
    }

    /// Undoes a claim whose event could not be stored, so the deployment can be asked for
    /// again: the summary written at `revision` is deleted, or `previous` put back.
    pub async fn release(&self, id: &str, revision: u64, previous: Option<Bytes>) {
        let Ok(buckets) = self.buckets() else { return };
        let undone = match previous {
            None => buckets
                .summaries
                .delete_expect_revision(id, Some(revision))
                .await
                .map_err(|e| e.to_string()),
            Some(previous) => buckets
                .summaries
                .update(id, previous, revision)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = undone {
            tracing::warn!(
                deployment_id = id,
                error = %e,
                "could not undo the in_progress summary of a deployment that was not stored; \
                 it is answered as in progress until the worker or an operator writes it"
            );
        }
    }

    /// Adds `id` to the ids recorded for (env, commit).
    pub async fn index(&self, env: &str, commit: &str, id: &str) -> Result<(), DeploymentsError> {
        let summaries = &self.buckets()?.summaries;
        let key = index_key(env, commit);
        // Usually the first deployment of this commit: create the list, and read it only when
        // there is one. Compare-and-set: a concurrent writer makes the write fail, and the list
        // is read again.
        let mut known: Option<kv::Entry> = None;
        for _ in 0..10 {
            let written = match &known {
                None => {
                    let value = serde_json::to_vec(&[id]).expect("ids serialize");
                    summaries
                        .create(&key, value.into())
                        .await
                        .map_err(|e| e.kind() != kv::CreateErrorKind::AlreadyExists)
                }
                Some(entry) => {
                    let mut ids: Vec<String> =
                        serde_json::from_slice(&entry.value).unwrap_or_default();
                    if ids.iter().any(|known| known == id) {
                        return Ok(());
                    }
                    ids.push(id.to_string());
                    let value = serde_json::to_vec(&ids).expect("ids serialize");
                    summaries
                        .update(&key, value.into(), entry.revision)
                        .await
                        .map_err(|e| e.kind() != kv::UpdateErrorKind::WrongLastRevision)
                }
            };
            match written {
                Ok(_) => return Ok(()),
                Err(true) => return Err(DeploymentsError::Kv("writing the index".into())),
                Err(false) => {
                    known = summaries
                        .entry(&key)
                        .await
                        .map_err(|e| kv_err("reading the index", e))?
                        .filter(|e| e.operation == kv::Operation::Put);
                }
            }
        }
        Err(DeploymentsError::Kv(
            "writing the index: too many concurrent writers".into(),
        ))
    }

    /// The ids recorded for (env, commit).
    pub async fn indexed(&self, env: &str, commit: &str) -> Result<Vec<String>, DeploymentsError> {
        let summaries = &self.buckets()?.summaries;
        let entry = summaries
            .get(index_key(env, commit))
            .await
            .map_err(|e| kv_err("reading the index", e))?;
        Ok(entry
            .and_then(|value| serde_json::from_slice(&value).ok())
            .unwrap_or_default())
    }
}

/// The key listing the deployment ids of `env` at `commit`.
pub fn index_key(env: &str, commit: &str) -> String {
    format!("ref.{env}.{commit}")
}
