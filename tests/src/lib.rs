//! Support for the cross-service tests: real `nats-server` processes, real git fixture
//! repositories laid out like an infrastructure monorepo, the services in this process or as
//! their binaries, a fake GitHub, request signing, and waiting.
//!
//! - [`nats`]: a `nats-server` with JetStream on a port it picks itself and a temporary store,
//!   its log shown when the test fails, killed on drop; and a three-node cluster.
//! - [`fixture`]: a git monorepo (`platform/`, `finance_report/`, `bootstrap/`, `libs/`, a root
//!   `tasks.py`) whose invoke tasks record every run in a log the test reads back.
//! - [`services`]: the gateway, worker and reporter running in the test's own process, with
//!   waits that fail as soon as the service's task has ended.
//! - [`process`]: one of the project's binaries running, its output in a file, shown when the
//!   test fails and checked for secrets.
//! - [`worker_harness`]: the worker in this process against one nats-server and the fixture,
//!   events published as the gateway would, results read back.
//! - [`pipeline`]: the three binaries on one nats-server or a cluster, one fixture repository,
//!   and a fake GitHub.
//! - [`fake_github`]: the commit status API over HTTP, recording what it received, with faults,
//!   and waits for what GitHub shows.
//! - [`gateway_client`]: sample GitHub payloads, signed requests, and a raw HTTP/1.1 client.
//! - [`load`]: a lean keep-alive HTTP/1.1 load generator for the throughput benchmarks.
//! - [`measure`]: CPU time, peak RSS and quantiles for the whole-process benchmarks.
//! - [`tools`]: where the pinned `nats-server` and `invoke` and the project's binaries are; a
//!   binary older than its sources is refused.
//! - [`wheel`]: tiny Python wheels built on the spot, for installs without network.

pub mod fake_github;
pub mod fixture;
pub mod gateway_client;
pub mod load;
pub mod measure;
pub mod nats;
pub mod pipeline;
pub mod process;
pub mod services;
pub mod tools;
pub mod wheel;
pub mod worker_harness;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 50 ms until it returns `Some`, failing the test loudly after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on loopback (bound then released). Another process may take it before it is
/// used: only for ports that must be known before anything starts (cluster routes, ports given
/// to scripts, metrics ports where 0 means off); services bind port 0 instead.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port on loopback")
}

/// An HTTP client for talking to the services under test (installs the TLS crypto provider
/// reqwest is built to expect).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
