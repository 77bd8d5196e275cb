//! The worker in this process against a real nats-server and the fixture monorepo, with
//! events published as the gateway (or an operator with `nats pub`) would, and the results
//! read back from `IAC_RESULTS`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use iac_shared::deploy::{
    DeployRequest, DeploymentSummary, deploy_subject, deployment_id, normalize_services,
};
use iac_shared::events::{PushEvent, SyncFinished, SyncStarted};
use iac_shared::names::*;
use iac_shared::nats::{StreamSettings, provision};
use iac_worker::Config;
use serde::de::DeserializeOwned;

use crate::fixture::Fixture;
use crate::nats::NatsServer;
use crate::process::ServiceProcess;
use crate::services::{InProcessWorker, ServiceWatch};
use crate::tools::invoke;
use crate::{free_port, wait_for};

/// How long a harness waits for a result.
const WAIT: Duration = Duration::from_secs(60);

/// Every message on `subject` in `IAC_RESULTS`, oldest first, with its headers.
pub async fn results<T: DeserializeOwned>(
    js: &jetstream::Context,
    subject: &str,
) -> Vec<(HeaderMap, T)> {
    let Ok(stream) = js.get_stream(RESULTS_STREAM).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut next = 1;
    while let Ok(message) = stream
        .direct_get_next_for_subject(subject, Some(next))
        .await
    {
        next = message.sequence + 1;
        let value = serde_json::from_slice(&message.payload).expect("a result in the contract");
        out.push((message.headers, value));
    }
    out
}

/// A nats-server, a fixture monorepo, and workers started against them.
pub struct WorkerHarness {
    pub nats: NatsServer,
    pub fixture: Fixture,
    pub js: jetstream::Context,
    /// Every worker started in this process: a wait fails as soon as one stops on its own.
    workers: Mutex<Vec<ServiceWatch>>,
}

impl WorkerHarness {
    pub async fn new() -> Self {
        let nats = NatsServer::start();
        let js = jetstream::new(nats.client().await);
        // As the gateway does before it stores anything: events wait for the worker.
        provision(&js, &StreamSettings::default()).await.unwrap();
        WorkerHarness {
            nats,
            fixture: Fixture::new(),
            js,
            workers: Mutex::new(Vec::new()),
        }
    }

    pub fn workspace(&self, name: &str) -> PathBuf {
        self.fixture.scratch(name)
    }

    /// The worker's settings as flags, `extra` appended (later flags win).
    pub fn args(&self, workspace: &Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "iac-worker",
            "--nats-url",
            &self.nats.url(),
            "--git-repo-url",
            &self.fixture.url(),
            "--workspace",
            workspace.to_str().unwrap(),
            "--sync-command",
            &format!("{} {{task}}", invoke().display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn start(&self, workspace: &Path, extra: &[&str]) -> InProcessWorker {
        let config = Config::from_args(self.args(workspace, extra)).unwrap();
        let worker = InProcessWorker::start(config);
        self.workers.lock().unwrap().push(worker.task.watch());
        worker
    }

    /// Like [`wait_for`], failing at once if a worker of this process stops on its own.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        wait_for(what, timeout, || {
            for worker in self.workers.lock().unwrap().iter() {
                worker.assert_running();
            }
            check()
        })
        .await
    }

    /// The worker binary with the settings of `args` (as [`WorkerHarness::args`] makes them) and
    /// `env`, its output in `log`.
    pub fn spawn_process(
        &self,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> ServiceProcess {
        let mut env = env.to_vec();
        env.push(("RUST_LOG", "info"));
        ServiceProcess::spawn_with_args("iac-worker", &args[1..], env, log)
    }

    /// A verified push as the gateway stores it; returns its stream sequence.
    pub async fn push(&self, before: &str, after: &str, paths: &[&str]) -> u64 {
        let delivery_id = format!("delivery-{after}-{}", free_port());
        let event = PushEvent {
            delivery_id: delivery_id.clone(),
            repository: Some("acme/infra".into()),
            git_ref: "refs/heads/main".into(),
            before: Some(before.into()),
            after: Some(after.into()),
            head_commit: Some(after.into()),
            pusher: Some("octocat".into()),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            paths_truncated: false,
        };
        let message = PublishMessage::build()
            .payload(serde_json::to_vec(&event).unwrap().into())
            .message_id(&delivery_id)
            .header(EVENT_ID_HEADER, delivery_id.as_str());
        self.js
            .send_publish(PUSH_SUBJECT, message)
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// A deployment of `commit` to `env` as the gateway stores it (services as given, `None`
    /// for every service); returns its stream sequence and deployment id.
    pub async fn deploy(
        &self,
        env: &str,
        commit: &str,
        services: Option<&[&str]>,
    ) -> (u64, String) {
        let services: Option<Vec<String>> =
            services.map(|s| s.iter().map(|s| s.to_string()).collect());
        let services = normalize_services(services.as_deref());
        let id = deployment_id(env, commit, &services);
        let request = DeployRequest {
            deployment_id: id.clone(),
            env: env.to_string(),
            commit: commit.to_string(),
            services,
            triggered_by: Some("ci".into()),
            force: false,
        };
        let event_id = format!("deploy-{id}-{}", free_port());
        let message = PublishMessage::build()
            .payload(serde_json::to_vec(&request).unwrap().into())
            .message_id(&event_id)
            .header(EVENT_ID_HEADER, event_id.as_str());
        let seq = self
            .js
            .send_publish(deploy_subject(env), message)
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence;
        (seq, id)
    }

    /// The summary of deployment `id` in `IAC_DEPLOYMENTS`, if there is one.
    pub async fn summary(&self, id: &str) -> Option<DeploymentSummary> {
        let bucket = self.js.get_key_value(DEPLOYMENTS_BUCKET).await.ok()?;
        let value = bucket.get(id).await.ok()??;
        Some(serde_json::from_slice(&value).expect("a summary in the contract"))
    }

    /// Waits until the summary of deployment `id` is final (`completed` or `failed`).
    pub async fn final_summary(&self, id: &str) -> DeploymentSummary {
        self.wait_for(&format!("the final summary of {id}"), WAIT, || async {
            self.summary(id)
                .await
                .filter(|s| s.status != iac_shared::deploy::DeploymentStatus::InProgress)
        })
        .await
    }

    /// An event replayed by an operator: a copy of `body` naming the original's sequence.
    pub async fn replay(&self, subject: &str, body: &str, original: u64, force: bool) -> u64 {
        let message = PublishMessage::build()
            .payload(body.to_string().into())
            .header(REPLAY_OF_HEADER, original.to_string().as_str())
            .header(FORCE_HEADER, if force { "true" } else { "false" });
        self.js
            .send_publish(subject.to_string(), message)
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// A commit changing `path`, pushed and announced; returns (commit, event sequence).
    pub async fn push_change(&self, path: &str) -> (String, u64) {
        let before = self.fixture.head();
        let after = self.fixture.change(path);
        let seq = self.push(&before, &after, &[path]).await;
        (after, seq)
    }

    /// A message without headers, as `nats pub` publishes it; returns its stream sequence.
    pub async fn publish_bare(&self, subject: &str, body: &str) -> u64 {
        self.js
            .publish(subject.to_string(), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// Every message on `subject` in `IAC_RESULTS`, with its headers.
    pub async fn results<T: DeserializeOwned>(&self, subject: &str) -> Vec<(HeaderMap, T)> {
        results(&self.js, subject).await
    }

    pub async fn finished(&self) -> Vec<SyncFinished> {
        self.results::<SyncFinished>(FINISHED_SUBJECT)
            .await
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// Waits for the finished result of the event stored at `seq`.
    pub async fn finished_for(&self, seq: u64) -> SyncFinished {
        self.wait_for(
            &format!("the finished result of event {seq}"),
            WAIT,
            || async {
                self.finished()
                    .await
                    .into_iter()
                    .find(|f| f.event_seq == seq)
            },
        )
        .await
    }

    pub async fn started_for(&self, seq: u64) -> SyncStarted {
        self.wait_for(
            &format!("the started result of event {seq}"),
            WAIT,
            || async {
                self.results::<SyncStarted>(STARTED_SUBJECT)
                    .await
                    .into_iter()
                    .map(|(_, s)| s)
                    .find(|s| s.event_seq == seq)
            },
        )
        .await
    }
}
