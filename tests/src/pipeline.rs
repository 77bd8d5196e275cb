//! The whole pipeline as a user runs it: the three real binaries on a real `nats-server`, a
//! real fixture repository and real `invoke`, with GitHub faked by an in-test HTTP server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use iac_shared::events::SyncFinished;
use iac_shared::names::FINISHED_SUBJECT;
use serde_json::Value;

use crate::fixture::Fixture;
use crate::nats::NatsServer;
use crate::process::ServiceProcess;
use crate::tools::{invoke, project_binary};
use crate::wait_for;
use crate::worker_harness::results;

/// The webhook secret the pipeline's gateway is started with.
pub const SECRET: &str = "pipeline-test-secret-7f3a9c";
/// The GitHub token the pipeline's reporter is started with.
pub const TOKEN: &str = "ghp_pipelineTestToken0123456789abcdef";

/// The three services of a pipeline, stopped (and checked for secrets in their output) when
/// dropped, the reporter first.
pub struct Running {
    pub reporter: ServiceProcess,
    pub worker: ServiceProcess,
    pub gateway: ServiceProcess,
}

/// NATS, the fixture repository, and the environment each service is started with.
pub struct Pipeline {
    /// The single server, unless the pipeline runs on a cluster.
    pub nats: Option<NatsServer>,
    pub fixture: Fixture,
    /// Chosen by the gateway at its first start (it binds port 0), then kept.
    gateway_port: AtomicU16,
    /// Numbers the services' log files.
    started: AtomicUsize,
    pub github_url: String,
    gateway_env: HashMap<String, String>,
    worker_env: HashMap<String, String>,
    reporter_env: HashMap<String, String>,
    logs: PathBuf,
    /// One client for every webhook, so its connections are reused.
    client: reqwest::Client,
}

impl Pipeline {
    /// Prepares (does not start) the services on a fresh single `nats-server`, against a fake
    /// GitHub at `github_url`.
    pub fn new(github_url: &str) -> Self {
        let nats = NatsServer::start();
        let url = nats.url();
        let mut pipeline = Self::with_nats(github_url, &url, 1);
        pipeline.nats = Some(nats);
        pipeline
    }

    /// Prepares the services on the NATS servers at `nats_urls` (comma-separated), with
    /// `replicas` stream replicas.
    pub fn with_nats(github_url: &str, nats_urls: &str, replicas: u8) -> Self {
        let fixture = Fixture::new();
        let logs = fixture.scratch("logs");
        let workspace = fixture.scratch("workspace");
        let common = |extra: &[(&str, String)]| -> HashMap<String, String> {
            let mut env: HashMap<String, String> = [
                ("NATS_URL", nats_urls.to_string()),
                ("STREAM_REPLICAS", replicas.to_string()),
                ("RUST_LOG", "info".to_string()),
                ("GIT_BRANCH", "main".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
            env
        };
        Pipeline {
            gateway_env: common(&[
                ("WEBHOOK_SECRET", SECRET.to_string()),
                ("WEBHOOK_BIND", "127.0.0.1".to_string()),
            ]),
            worker_env: common(&[
                ("GIT_REPO_URL", fixture.url()),
                ("WORKSPACE", workspace.display().to_string()),
                ("SYNC_COMMAND", format!("{} {{task}}", invoke().display())),
            ]),
            reporter_env: common(&[
                ("GITHUB_TOKEN", TOKEN.to_string()),
                ("GITHUB_API_URL", github_url.to_string()),
                ("GITHUB_REPO", "acme/infra".to_string()),
            ]),
            nats: None,
            fixture,
            gateway_port: AtomicU16::new(0),
            started: AtomicUsize::new(0),
            github_url: github_url.to_string(),
            logs,
            client: crate::http(),
        }
    }

    /// Overrides or adds an environment variable of one service (`gateway`, `worker`, `reporter`).
    pub fn set_env(&mut self, service: &str, key: &str, value: &str) {
        let env = match service {
            "gateway" => &mut self.gateway_env,
            "worker" => &mut self.worker_env,
            "reporter" => &mut self.reporter_env,
            other => panic!("no service {other}"),
        };
        env.insert(key.to_string(), value.to_string());
    }

    /// Every secret any service was given: none may appear in any service's output.
    fn secrets(&self) -> Vec<&str> {
        let mut secrets = vec![SECRET, TOKEN];
        for env in [&self.gateway_env, &self.worker_env, &self.reporter_env] {
            for key in [
                "NATS_PASSWORD",
                "NATS_TOKEN",
                "WEBHOOK_SECRET",
                "GITHUB_TOKEN",
            ] {
                if let Some(value) = env.get(key) {
                    secrets.push(value.as_str());
                }
            }
        }
        secrets
    }

    /// Starts the gateway (waiting until it is ready), a worker and a reporter; they run until
    /// the returned value is dropped.
    pub async fn start_all(&self) -> Running {
        let gateway = self.start_gateway().await;
        Running {
            reporter: self.start_reporter(),
            worker: self.start_worker(),
            gateway,
        }
    }

    /// The port the gateway listens on (known once it has started).
    pub fn gateway_port(&self) -> u16 {
        match self.gateway_port.load(Ordering::SeqCst) {
            0 => panic!("the gateway's port is known once it has started"),
            port => port,
        }
    }

    /// Starts the gateway and waits until it is ready: the first one on a port it binds itself,
    /// later ones on that same port, where senders expect it.
    pub async fn start_gateway(&self) -> ServiceProcess {
        let mut env = self.gateway_env.clone();
        // A port set with `set_env` wins (a gateway logging only warnings never says which
        // port it bound).
        let known = match env.get("WEBHOOK_PORT") {
            Some(port) => port.parse().expect("WEBHOOK_PORT is a port number"),
            None => self.gateway_port.load(Ordering::SeqCst),
        };
        env.insert("WEBHOOK_PORT".to_string(), known.to_string());
        let mut process = ServiceProcess::spawn("iac-gateway", &env, self.log_path("gateway"))
            .forbid_in_output(&self.secrets());
        let client = crate::http();
        let port = wait_for("the gateway to be ready", Duration::from_secs(20), || {
            assert!(
                process.is_running(),
                "the gateway exited:\n{}",
                process.output()
            );
            let port = Some(known)
                .filter(|p| *p != 0)
                .or_else(|| process.logged_port("gateway listening"));
            let client = client.clone();
            async move {
                let url = format!("http://127.0.0.1:{}/ready", port?);
                let ready = client.get(&url).send().await.ok()?;
                ready.status().is_success().then_some(port?)
            }
        })
        .await;
        self.gateway_port.store(port, Ordering::SeqCst);
        process
    }

    /// A log file of its own for the next service started.
    fn log_path(&self, service: &str) -> PathBuf {
        let n = self.started.fetch_add(1, Ordering::SeqCst);
        self.logs.join(format!("{service}-{n}.log"))
    }

    /// Starts a worker (several may run: they share the consumer and the workspace).
    pub fn start_worker(&self) -> ServiceProcess {
        ServiceProcess::spawn("iac-worker", &self.worker_env, self.log_path("worker"))
            .forbid_in_output(&self.secrets())
    }

    /// Starts a reporter (several may run).
    pub fn start_reporter(&self) -> ServiceProcess {
        ServiceProcess::spawn(
            "iac-reporter",
            &self.reporter_env,
            self.log_path("reporter"),
        )
        .forbid_in_output(&self.secrets())
    }

    /// Runs an operator command (`iac-worker replay …`, `iac-worker status`, …) against this
    /// pipeline's NATS; returns its exit status, stdout and stderr.
    pub fn operator(&self, binary: &str, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(project_binary(binary))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NATS_URL", &self.worker_env["NATS_URL"])
            .output()
            .expect("running an operator command");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Signs and sends a GitHub webhook; returns the status code and the JSON answer.
    pub async fn webhook(&self, event: &str, delivery: &str, payload: &Value) -> (u16, Value) {
        let body = serde_json::to_vec(payload).unwrap();
        let response = self
            .client
            .post(format!("http://127.0.0.1:{}/webhook", self.gateway_port()))
            .header("Content-Type", "application/json")
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", delivery)
            .header(
                iac_shared::signature::SIGNATURE_HEADER,
                iac_shared::signature::sign(SECRET.as_bytes(), &body),
            )
            .body(body)
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Changes `path` in the fixture and pushes; returns the commit, a delivery id and the
    /// push payload GitHub would send for it.
    pub fn commit_change(&self, path: &str) -> (String, String, Value) {
        let before = self.fixture.head();
        let after = self.fixture.change(path);
        let payload = self.fixture.push_payload(&before, &after, &[path]);
        let delivery = format!("delivery-{}", &after[..12]);
        (after, delivery, payload)
    }

    /// Changes `path` in the fixture, pushes, and sends the push webhook; returns the commit
    /// and the gateway's answer.
    pub async fn push_change(&self, path: &str) -> (String, u16, Value) {
        let (commit, delivery, payload) = self.commit_change(path);
        let (status, answer) = self.webhook("push", &delivery, &payload).await;
        (commit, status, answer)
    }

    /// Waits for the newest finished result at `commit` in `IAC_RESULTS` (single server only).
    pub async fn finished_at(&self, commit: &str) -> SyncFinished {
        let nats = self.nats.as_ref().expect("a pipeline on one nats-server");
        let js = async_nats::jetstream::new(nats.client().await);
        wait_for(
            &format!("the finished result at {commit}"),
            Duration::from_secs(60),
            || async {
                results::<SyncFinished>(&js, FINISHED_SUBJECT)
                    .await
                    .into_iter()
                    .map(|(_, finished)| finished)
                    .rfind(|finished| finished.commit.as_deref() == Some(commit))
            },
        )
        .await
    }
}
