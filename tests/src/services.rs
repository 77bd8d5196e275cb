//! The gateway, worker and reporter running in the test's own process, through the same
//! `run(config, shutdown)` their binaries call. Every wait checks that the service is still
//! running, so a service that stopped on its own fails the test at once with its error instead
//! of a timeout much later.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use iac_shared::shutdown::{self, Shutdown, ShutdownTrigger};
use tokio::task::JoinHandle;

use crate::gateway_client::get;

/// How long a service may take to stop after its shutdown is triggered.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A service's `run` as a task of the test's runtime, with how it ended once it has.
pub struct ServiceTask {
    trigger: ShutdownTrigger,
    task: JoinHandle<anyhow::Result<()>>,
    watch: ServiceWatch,
}

/// Whether a service stopped without being asked to; kept by harnesses whose waits do not own
/// the service (a test may stop one worker and wait on another).
#[derive(Clone)]
pub struct ServiceWatch {
    name: &'static str,
    /// How the service ended (its error or panic), once it has.
    ended: Arc<Mutex<Option<String>>>,
    /// Set before its shutdown is triggered: ending is then expected.
    stopping: Arc<AtomicBool>,
}

impl ServiceWatch {
    /// Panics, with the service's error, if it stopped without being asked to.
    pub fn assert_running(&self) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Some(how) = self.ended.lock().unwrap().as_ref() {
            panic!("the {} stopped on its own, {how}", self.name);
        }
    }
}

impl ServiceTask {
    /// Spawns `run(shutdown)` on the current runtime.
    pub fn spawn<F, Fut>(name: &'static str, run: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (trigger, shutdown) = shutdown::channel();
        let ended = Arc::new(Mutex::new(None));
        let record = ended.clone();
        let service = run(shutdown);
        let task = tokio::spawn(async move {
            let result = match AssertUnwindSafe(service).catch_unwind().await {
                Ok(result) => result,
                Err(panic) => Err(anyhow::anyhow!("panicked: {}", panic_message(&*panic))),
            };
            let how = match &result {
                Ok(()) => "without an error".to_string(),
                Err(e) => format!("with {e:#}"),
            };
            *record.lock().unwrap() = Some(how);
            result
        });
        ServiceTask {
            trigger,
            task,
            watch: ServiceWatch {
                name,
                ended,
                stopping: Arc::new(AtomicBool::new(false)),
            },
        }
    }

    /// Panics, with the service's error, if it stopped without being asked to.
    pub fn assert_running(&self) {
        self.watch.assert_running();
    }

    /// A handle that tells whether the service stopped on its own, for waits elsewhere.
    pub fn watch(&self) -> ServiceWatch {
        self.watch.clone()
    }

    /// Like [`crate::wait_for`], failing at once if the service stops meanwhile.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        crate::wait_for(what, timeout, || {
            self.assert_running();
            check()
        })
        .await
    }

    /// Triggers its shutdown and waits until it has stopped without an error.
    pub async fn stop(self) {
        let name = self.watch.name;
        self.watch.stopping.store(true, Ordering::SeqCst);
        self.trigger.trigger();
        tokio::time::timeout(STOP_TIMEOUT, self.task)
            .await
            .unwrap_or_else(|_| panic!("the {name} stops after shutdown"))
            .unwrap_or_else(|e| panic!("the {name} task was cancelled: {e}"))
            .unwrap_or_else(|e| panic!("the {name} ended with an error: {e:#}"));
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "with a value that is not a message".to_string())
}

/// A gateway serving on a port of loopback the operating system chose.
pub struct InProcessGateway {
    pub addr: SocketAddr,
    pub task: ServiceTask,
}

impl InProcessGateway {
    /// Starts a gateway without waiting for it to be ready.
    pub async fn start(config: iac_gateway::Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a port on loopback for the gateway");
        let addr = listener.local_addr().expect("the gateway's bound address");
        let task = ServiceTask::spawn("gateway", move |shutdown| {
            iac_gateway::run(config, listener, shutdown)
        });
        InProcessGateway { addr, task }
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        self.task
            .wait_for(
                "the gateway to be ready",
                Duration::from_secs(15),
                || async { (get(self.addr, "/ready").await.status == 200).then_some(()) },
            )
            .await;
    }

    /// What `/metrics` shows.
    pub async fn metrics(&self) -> String {
        get(self.addr, "/metrics").await.text()
    }

    pub async fn stop(self) {
        self.task.stop().await;
    }
}

/// A worker taking events until it is stopped.
pub struct InProcessWorker {
    pub task: ServiceTask,
}

impl InProcessWorker {
    pub fn start(config: iac_worker::Config) -> Self {
        InProcessWorker {
            task: ServiceTask::spawn("worker", move |shutdown| iac_worker::run(config, shutdown)),
        }
    }

    pub async fn stop(self) {
        self.task.stop().await;
    }
}

/// A reporter posting statuses until it is stopped.
pub struct InProcessReporter {
    pub task: ServiceTask,
}

impl InProcessReporter {
    pub fn start(config: iac_reporter::Config) -> Self {
        InProcessReporter {
            task: ServiceTask::spawn("reporter", move |shutdown| {
                iac_reporter::run(config, shutdown)
            }),
        }
    }

    pub async fn stop(self) {
        self.task.stop().await;
    }
}
