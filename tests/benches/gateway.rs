//! Whole-process throughput of the gateway against a real local nats-server, each figure next
//! to its ceiling measured in the same run (absolute numbers drift on a shared machine):
//!
//! - accepted push (8 KB signed payload, stored before the 200) vs raw JetStream
//!   publish-with-ack of the same payload at the same concurrency;
//! - ignored push (another branch: verified, parsed, answered, nothing stored) vs a warp
//!   handler that only answers 200;
//! - the gateway's peak RSS after the runs.
//!
//! `cargo build --release --bins && cargo bench -p iac-tests --bench gateway` measures;
//! without `--bench` (as `cargo test --benches` runs it) it does a tiny run to prove it works.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use iac_shared::names::PUSH_SUBJECT;
use iac_shared::nats::{StreamSettings, provision};
use iac_shared::signature::sign;
use iac_tests::fixture::push_payload;
use iac_tests::measure::{cpu_seconds, peak_rss_mb, quantile};
use iac_tests::nats::NatsServer;
use iac_tests::pipeline::ServiceProcess;
use iac_tests::{free_port, http, wait_for};

const SECRET: &str = "bench-secret";

/// Requests per second and latency percentiles of one run.
struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

impl Run {
    fn from(latencies: &[Duration], elapsed: Duration) -> Run {
        Run {
            rps: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: quantile(latencies, 0.50),
            p99: quantile(latencies, 0.99),
        }
    }
}

/// Runs `op` from `concurrency` tasks for `duration`; each call gets a unique number.
async fn drive<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Run
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, counter) = (op.clone(), counter.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    op(n).await;
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    Run::from(&all, started.elapsed())
}

/// A push payload of about `size` bytes (paths padded), as GitHub would send it.
fn payload_of_size(git_ref: &str, size: usize) -> Vec<u8> {
    let mut paths: Vec<String> = Vec::new();
    let mut body = Vec::new();
    while body.len() < size {
        paths.push(format!(
            "platform/01.postgres/config/file-{:04}.yaml",
            paths.len()
        ));
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        body = serde_json::to_vec(&push_payload(
            git_ref,
            "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "59b20b8d5c6ff8d09518454d4dd8b7a30f095ab5",
            &refs,
        ))
        .unwrap();
    }
    body
}

/// A warp server that only answers 200, on its own runtime thread (the ceiling of the no-op path).
fn baseline_server() -> u16 {
    use warp::Filter;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let route =
                warp::post().map(|| warp::reply::json(&serde_json::json!({"status": "ok"})));
            warp::serve(route).incoming(listener).run().await;
        });
    });
    port
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let duration = Duration::from_millis(if measuring { 5_000 } else { 300 });

    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    provision(&js, &StreamSettings::default()).await.unwrap();
    let port = free_port();
    let env: HashMap<String, String> = [
        ("NATS_URL", nats.url()),
        ("WEBHOOK_SECRET", SECRET.to_string()),
        ("WEBHOOK_PORT", port.to_string()),
        ("WEBHOOK_BIND", "127.0.0.1".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let log = tempfile::NamedTempFile::new().unwrap();
    let gateway = ServiceProcess::spawn("iac-gateway", &env, log.path().to_path_buf());
    let ready = format!("http://127.0.0.1:{port}/ready");
    wait_for("the gateway", Duration::from_secs(20), || {
        let request = http().get(&ready).send();
        async move { request.await.ok().filter(|r| r.status().is_success()) }
    })
    .await;

    let accepted = Arc::new(payload_of_size("refs/heads/main", 8 * 1024));
    let ignored = Arc::new(payload_of_size("refs/heads/feature", 8 * 1024));
    let client = http();
    let webhook = format!("http://127.0.0.1:{port}/webhook");

    let post = |url: String, body: Arc<Vec<u8>>, prefix: &'static str| {
        let client = client.clone();
        let signature = sign(SECRET.as_bytes(), &body);
        move |n: u64| {
            let request = client
                .post(&url)
                .header("Content-Type", "application/json")
                .header("X-GitHub-Event", "push")
                .header("X-GitHub-Delivery", format!("{prefix}-{n}"))
                .header("X-Hub-Signature-256", &signature)
                .body(body.as_ref().clone());
            async move {
                let response = request.send().await.expect("the gateway answers");
                assert_eq!(response.status(), 200, "{:?}", response.text().await);
            }
        }
    };

    println!(
        "gateway benchmark: {} KB push, {:?} per run",
        accepted.len() / 1024,
        duration
    );
    println!(
        "{:<34} {:>5} {:>10} {:>9} {:>9} {:>10} {:>7}",
        "path", "conns", "req/s", "p50 ms", "p99 ms", "ceiling/s", "ratio"
    );
    for concurrency in [16, 64] {
        let js_raw = js.clone();
        let raw_payload = bytes::Bytes::from(accepted.as_ref().clone());
        let raw = drive(concurrency, duration, move |n| {
            let (js, payload) = (js_raw.clone(), raw_payload.clone());
            async move {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("raw-{n}").as_str());
                js.publish_with_headers(PUSH_SUBJECT, headers, payload)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        })
        .await;
        let prefix: &'static str = if concurrency == 16 { "a16" } else { "a64" };
        let cpu_before = cpu_seconds(gateway.pid().unwrap());
        let run = drive(
            concurrency,
            duration,
            post(webhook.clone(), accepted.clone(), prefix),
        )
        .await;
        let cpu = cpu_seconds(gateway.pid().unwrap()) - cpu_before;
        print_row(
            "accepted push (stored before 200)",
            concurrency,
            &run,
            raw.rps,
        );
        println!(
            "    gateway CPU: {:.0} µs per accepted push",
            cpu / (run.rps * duration.as_secs_f64()) * 1e6
        );
    }
    let baseline_port = baseline_server();
    let baseline = drive(
        16,
        duration,
        post(
            format!("http://127.0.0.1:{baseline_port}/"),
            ignored.clone(),
            "b",
        ),
    )
    .await;
    let run = drive(16, duration, post(webhook.clone(), ignored.clone(), "i")).await;
    print_row("ignored push (other branch)", 16, &run, baseline.rps);
    println!(
        "gateway peak RSS: {:.1} MB",
        peak_rss_mb(gateway.pid().unwrap())
    );
}

fn print_row(path: &str, concurrency: usize, run: &Run, ceiling: f64) {
    println!(
        "{:<34} {:>5} {:>10.0} {:>9.2} {:>9.2} {:>10.0} {:>7.2}",
        path,
        concurrency,
        run.rps,
        run.p50.as_secs_f64() * 1e3,
        run.p99.as_secs_f64() * 1e3,
        ceiling,
        run.rps / ceiling
    );
}
