//! Whole-process throughput of the gateway against a real local nats-server, each figure next
//! to its ceiling measured in the same run (absolute numbers drift on a shared machine):
//!
//! - accepted push (8 KB signed payload, stored before the 200) vs raw JetStream
//!   publish-with-ack of the same payload at the same concurrency;
//! - ignored push (another branch: verified, parsed, answered, nothing stored) vs a warp
//!   handler that only answers 200;
//! - accepted `/deploy` (wait=false: nonce recorded, summary created, id indexed, event stored
//!   before the 202) vs raw JetStream publish-with-ack of the same event, with a raw key-value
//!   create in `IAC_NONCES` beside it: the cost of the nonce check alone;
//! - the gateway's peak RSS after the runs.
//!
//! Each pair runs in rounds, ceiling then gateway, and the median ratio of the rounds is the
//! result: the machine's other load comes and goes within seconds. Every run starts from an
//! empty events stream, and prints the CPU time each process spent per request, which shows
//! where the machine's two cores went. Requests come from [`iac_tests::load`], a generator
//! about as cheap per request as the in-process NATS client of the raw ceiling.
//!
//! `cargo build --release --bins && cargo bench -p iac-tests --bench gateway` measures;
//! without `--bench` (as `cargo test --benches` runs it) it does a tiny run to prove it works.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use iac_shared::names::{EVENTS_STREAM, NONCES_BUCKET, PUSH_SUBJECT};
use iac_shared::nats::{StreamSettings, provision};
use iac_shared::signature::{
    NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, sign_timestamped,
};
use iac_tests::fixture::push_payload;
use iac_tests::load::{KeepAlive, Load};
use iac_tests::measure::{cpu_seconds, peak_rss_mb, quantile};
use iac_tests::nats::NatsServer;
use iac_tests::process::ServiceProcess;
use iac_tests::{free_port, http, wait_for};

const SECRET: &str = "bench-secret-0a1b2c3d";

/// Requests per second, latency percentiles, and CPU per request of each process of one run.
struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// Microseconds of CPU per request, by process name.
    cpu: Vec<(&'static str, f64)>,
}

/// Runs `concurrency` copies of `task` for `duration` and reads the CPU time the `processes`
/// (name, pid) used meanwhile. A task takes request numbers from
/// the [`Load`] until it says the run is over, and returns the latency of each request.
async fn drive<F, Fut>(
    concurrency: usize,
    duration: Duration,
    processes: &[(&'static str, u32)],
    task: F,
) -> Run
where
    F: Fn(Arc<Load>) -> Fut,
    Fut: Future<Output = Vec<Duration>> + Send + 'static,
{
    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let load = Arc::new(Load::new(duration));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(task(load.clone())))
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("a load task"));
    }
    let elapsed = load.elapsed();
    let requests = latencies.len() as f64;
    Run {
        rps: requests / elapsed.as_secs_f64(),
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        cpu: processes
            .iter()
            .zip(cpu_before)
            .map(|((name, pid), before)| (*name, (cpu_seconds(*pid) - before) / requests * 1e6))
            .collect(),
    }
}

/// A load task posting `body` to `path` at `addr` as a GitHub push delivery, each request
/// with its own delivery id (`{prefix}-{n}`), and asserting every answer is 200.
fn poster(
    addr: SocketAddr,
    path: &'static str,
    body: Arc<Vec<u8>>,
    prefix: String,
) -> impl Fn(Arc<Load>) -> std::pin::Pin<Box<dyn Future<Output = Vec<Duration>> + Send>> {
    let signature = sign(SECRET.as_bytes(), &body);
    let head_start: Arc<[u8]> = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nX-GitHub-Event: push\r\n{SIGNATURE_HEADER}: {signature}\r\n\
         X-GitHub-Delivery: {prefix}-",
        body.len()
    )
    .into_bytes()
    .into();
    move |load| {
        let (head_start, body) = (head_start.clone(), body.clone());
        Box::pin(async move {
            let mut connection = KeepAlive::connect(addr).await.expect("connecting");
            let mut latencies = Vec::new();
            while let Some(n) = load.next() {
                let started = Instant::now();
                let status = connection
                    .send(&[&head_start, n.to_string().as_bytes(), b"\r\n\r\n", &body])
                    .await
                    .expect("the server answers");
                assert_eq!(status, 200, "request {n} answered {status}");
                latencies.push(started.elapsed());
            }
            latencies
        })
    }
}

/// A load task asking `addr` for a new deployment per request (`/deploy`, wait=false: a commit
/// of its own, so every request is accepted, not a duplicate), signed with a fresh nonce, and
/// asserting every answer is 202.
fn deployer(
    addr: SocketAddr,
    run: u32,
) -> impl Fn(Arc<Load>) -> std::pin::Pin<Box<dyn Future<Output = Vec<Duration>> + Send>> {
    move |load| {
        Box::pin(async move {
            let mut connection = KeepAlive::connect(addr).await.expect("connecting");
            let mut latencies = Vec::new();
            while let Some(n) = load.next() {
                let body = format!(
                    r#"{{"env":"staging","ref":"{run:08x}{n:032x}","services":["redis"],"triggered_by":"bench"}}"#
                );
                let timestamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    .to_string();
                let nonce = format!("bench-{run}-{n}");
                let signature =
                    sign_timestamped(SECRET.as_bytes(), &timestamp, &nonce, body.as_bytes());
                let head = format!(
                    "POST /deploy HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n{SIGNATURE_HEADER}: {signature}\r\n\
                     {TIMESTAMP_HEADER}: {timestamp}\r\n{NONCE_HEADER}: {nonce}\r\n\r\n",
                    body.len()
                );
                let started = Instant::now();
                let status = connection
                    .send(&[head.as_bytes(), body.as_bytes()])
                    .await
                    .expect("the server answers");
                assert_eq!(status, 202, "deployment {n} answered {status}");
                latencies.push(started.elapsed());
            }
            latencies
        })
    }
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
    let (duration, rounds) = if measuring {
        (Duration::from_secs(3), 3)
    } else {
        (Duration::from_millis(300), 1)
    };

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
    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let baseline_addr = SocketAddr::from(([127, 0, 0, 1], baseline_server()));
    let gateway_pid = gateway.pid().expect("the gateway runs");
    let nats_pid = nats.pid().expect("nats-server runs");
    let own_pid = std::process::id();

    println!(
        "gateway benchmark: {} KB push, {rounds} rounds of {duration:?} per run, each run \
         next to its ceiling; keep-alive HTTP/1.1 load generator",
        accepted.len() / 1024,
    );
    println!(
        "{:<34} {:>5} {:>10} {:>9} {:>9} {:>10} {:>7}",
        "path", "conns", "req/s", "p50 ms", "p99 ms", "ceiling/s", "ratio"
    );
    let raw_payload = bytes::Bytes::from(accepted.as_ref().clone());
    for concurrency in [16, 64] {
        let mut ratios = Vec::new();
        for round in 0..rounds {
            fresh_events_stream(&js).await;
            let raw = drive(
                concurrency,
                duration,
                &[("nats-server", nats_pid), ("bench client", own_pid)],
                |load| {
                    let (js, payload) = (js.clone(), raw_payload.clone());
                    async move {
                        let mut latencies = Vec::new();
                        while let Some(n) = load.next() {
                            let started = Instant::now();
                            let mut headers = async_nats::HeaderMap::new();
                            headers.insert("Nats-Msg-Id", format!("raw-{n}").as_str());
                            js.publish_with_headers(PUSH_SUBJECT, headers, payload.clone())
                                .await
                                .expect("publishing")
                                .await
                                .expect("an acknowledgement");
                            latencies.push(started.elapsed());
                        }
                        latencies
                    }
                },
            )
            .await;
            print_row("raw JetStream publish-with-ack", concurrency, &raw, None);
            fresh_events_stream(&js).await;
            let run = drive(
                concurrency,
                duration,
                &[
                    ("gateway", gateway_pid),
                    ("nats-server", nats_pid),
                    ("load generator", own_pid),
                ],
                poster(
                    gateway_addr,
                    "/webhook",
                    accepted.clone(),
                    format!("a{concurrency}-{round}"),
                ),
            )
            .await;
            print_row(
                "accepted push (stored before 200)",
                concurrency,
                &run,
                Some(raw.rps),
            );
            ratios.push(run.rps / raw.rps);
        }
        print_ratios("accepted push vs raw JetStream", concurrency, &ratios);
    }
    deploy_rounds(
        &js,
        gateway_addr,
        duration,
        rounds,
        [gateway_pid, nats_pid, own_pid],
    )
    .await;
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let baseline = drive(
            16,
            duration,
            &[("load generator", own_pid)],
            poster(baseline_addr, "/", ignored.clone(), format!("b-{round}")),
        )
        .await;
        print_row("bare warp answering 200", 16, &baseline, None);
        let run = drive(
            16,
            duration,
            &[("gateway", gateway_pid), ("load generator", own_pid)],
            poster(
                gateway_addr,
                "/webhook",
                ignored.clone(),
                format!("i-{round}"),
            ),
        )
        .await;
        print_row("ignored push (other branch)", 16, &run, Some(baseline.rps));
        ratios.push(run.rps / baseline.rps);
    }
    print_ratios("ignored push vs bare warp", 16, &ratios);
    println!("gateway peak RSS: {:.1} MB", peak_rss_mb(gateway_pid));
}

/// Accepted `/deploy` requests against raw JetStream publishes of the same event, and raw
/// nonce creates (what the nonce check costs nats-server and the client), 16 in flight.
async fn deploy_rounds(
    js: &jetstream::Context,
    gateway: SocketAddr,
    duration: Duration,
    rounds: u32,
    [gateway_pid, nats_pid, own_pid]: [u32; 3],
) {
    let event = bytes::Bytes::from_static(
        br#"{"deployment_id":"0123456789abcdef","env":"staging","ref":"0123456789abcdef0123456789abcdef01234567","services":["redis"],"triggered_by":"bench"}"#,
    );
    let nonces = js
        .get_key_value(NONCES_BUCKET)
        .await
        .expect("the gateway created the nonce bucket");
    let mut ratios = Vec::new();
    for round in 0..rounds {
        fresh_events_stream(js).await;
        let clients = [("nats-server", nats_pid), ("bench client", own_pid)];
        let raw = drive(16, duration, &clients, |load| {
            let (js, event) = (js.clone(), event.clone());
            async move {
                let mut latencies = Vec::new();
                while let Some(n) = load.next() {
                    let started = Instant::now();
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("raw-deploy-{n}").as_str());
                    js.publish_with_headers("iac.events.deploy.staging", headers, event.clone())
                        .await
                        .expect("publishing")
                        .await
                        .expect("an acknowledgement");
                    latencies.push(started.elapsed());
                }
                latencies
            }
        })
        .await;
        print_row("raw JetStream publish-with-ack", 16, &raw, None);
        let nonce = drive(16, duration, &clients, |load| {
            let nonces = nonces.clone();
            async move {
                let mut latencies = Vec::new();
                while let Some(n) = load.next() {
                    let started = Instant::now();
                    nonces
                        .create(format!("raw-{round}-{n}"), "1".into())
                        .await
                        .expect("a new nonce");
                    latencies.push(started.elapsed());
                }
                latencies
            }
        })
        .await;
        print_row("raw nonce create (KV, new key)", 16, &nonce, Some(raw.rps));
        fresh_events_stream(js).await;
        let run = drive(
            16,
            duration,
            &[
                ("gateway", gateway_pid),
                ("nats-server", nats_pid),
                ("load generator", own_pid),
            ],
            deployer(gateway, round),
        )
        .await;
        print_row("accepted /deploy (wait=false)", 16, &run, Some(raw.rps));
        ratios.push(run.rps / raw.rps);
    }
    print_ratios("accepted /deploy vs raw JetStream", 16, &ratios);
}

/// The median ratio of the rounds, with the lowest and highest.
fn print_ratios(what: &str, concurrency: usize, ratios: &[f64]) {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    println!(
        "=> {what}, {concurrency} conns: median ratio {:.2} (rounds {:.2}–{:.2})",
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1]
    );
}

/// Deletes and re-creates the events stream, so that each run starts from an empty stream and
/// de-duplication window: what a run stores makes nats-server's work per message grow (its
/// garbage collector scans the window's ids), which would favour whichever run goes first.
async fn fresh_events_stream(js: &jetstream::Context) {
    js.delete_stream(EVENTS_STREAM)
        .await
        .expect("deleting the events stream");
    provision(js, &StreamSettings::default())
        .await
        .expect("re-creating the streams");
}

/// One row; with a ceiling, the ratio to it. Below it, the CPU each process spent per request.
fn print_row(path: &str, concurrency: usize, run: &Run, ceiling: Option<f64>) {
    let (ceiling, ratio) = match ceiling {
        Some(c) => (format!("{c:.0}"), format!("{:.2}", run.rps / c)),
        None => ("-".to_string(), "-".to_string()),
    };
    println!(
        "{:<34} {:>5} {:>10.0} {:>9.2} {:>9.2} {:>10} {:>7}",
        path,
        concurrency,
        run.rps,
        run.p50.as_secs_f64() * 1e3,
        run.p99.as_secs_f64() * 1e3,
        ceiling,
        ratio
    );
    let cpu: Vec<String> = run
        .cpu
        .iter()
        .map(|(name, us)| format!("{name} {us:.0}"))
        .collect();
    println!("    CPU µs per request: {}", cpu.join(", "));
}
