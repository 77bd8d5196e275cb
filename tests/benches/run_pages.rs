//! A run page of a large run: the `iac-reporter` binary on a real nats-server serves
//! `/runs/<id>` for a run whose two services printed 10 MiB between them, stored in
//! `IAC_RUNLOGS` as the worker stores it (32 KiB chunks). Measured: the time from the request to
//! the last byte of the page, against reading the same chunks straight from JetStream in this
//! process (what any page of that run must at least do) in the same run; and the reporter's
//! peak RSS while it serves the page again and again.
//!
//! `cargo build --release --bins && cargo bench -p iac-tests --bench run_pages` measures;
//! without `--bench` (as `cargo test --benches` runs it) it does a tiny run to prove it works.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use iac_reporter::web::LinkSigner;
use iac_reporter::web::runs::{follow_output, last_output_seq};
use iac_shared::events::{SyncFinished, SyncStarted, Trigger};
use iac_shared::names::*;
use iac_shared::nats::{ConsumerSettings, StreamSettings, provision_all, run_log_subject};
use iac_tests::measure::{ms, peak_rss_mb, quantile};
use iac_tests::nats::NatsServer;
use iac_tests::process::ServiceProcess;
use iac_tests::{free_port, wait_for};
use secrecy::SecretString;

const RUN: &str = "bench-run-1";
const SECRET: &str = "bench-link-secret";
const CHUNK: usize = 32 * 1024;
const SERVICES: [&str; 2] = ["platform/postgres", "platform/redis"];

/// Stores a finished run whose services printed `bytes` between them.
async fn store_run(js: &jetstream::Context, bytes: usize) {
    let started = SyncStarted {
        event_id: RUN.into(),
        event_seq: 1,
        trigger: Trigger::Push,
        repository: Some("acme/infra".into()),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        services: SERVICES.map(String::from).to_vec(),
        reasons: Default::default(),
        replay_of: None,
        started_at: "2026-12-02T00:00:00Z".into(),
        env: Some("production".into()),
        deployment_id: None,
    };
    let publish = |subject: &'static str, payload: Vec<u8>| async move {
        js.publish(subject, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    };
    publish(STARTED_SUBJECT, serde_json::to_vec(&started).unwrap()).await;
    let line = format!(
        "{}\n",
        "deploying <service> & checking \"health\" ".repeat(3)
    );
    let chunk: String = line.repeat(CHUNK / line.len());
    let mut stored = 0;
    let mut acks = Vec::new();
    while stored < bytes {
        let service = SERVICES[(stored / CHUNK) % SERVICES.len()];
        let mut headers = HeaderMap::new();
        headers.insert(SERVICE_HEADER, service);
        headers.insert(ATTEMPT_HEADER, "1");
        acks.push(
            js.publish_with_headers(run_log_subject(RUN), headers, chunk.clone().into())
                .await
                .unwrap(),
        );
        stored += chunk.len();
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let finished = serde_json::json!({
        "event_id": RUN, "event_seq": 1, "trigger": "push",
        "commit": started.commit, "state": "success", "duration_ms": 61_000,
        "finished_at": "2026-12-02T00:01:01Z",
        "totals": {"total": 2, "synced": 2, "failed": 0, "timed_out": 0, "unknown": 0},
        "services": SERVICES.map(|s| serde_json::json!({
            "service": s, "outcome": "synced", "exit_code": 0, "output_tail": [], "duration_ms": 30_000
        })),
    });
    let _: SyncFinished = serde_json::from_value(finished.clone()).unwrap();
    publish(FINISHED_SUBJECT, serde_json::to_vec(&finished).unwrap()).await;
}

/// Reads every chunk of the run's output with one ordered reader; the bytes read.
async fn read_all(js: &jetstream::Context) -> usize {
    let stream = js.get_stream(RUNLOGS_STREAM).await.unwrap();
    let last = last_output_seq(&stream, RUN).await.unwrap();
    let mut chunks = follow_output(&stream, &run_log_subject(RUN), 1, false)
        .await
        .unwrap();
    let mut read = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        read += chunk.text.len();
        if chunk.seq >= last {
            break;
        }
    }
    read
}

/// The time to the last byte of `url`, and the body's length.
async fn fetch(client: &reqwest::Client, url: &str) -> (Duration, usize) {
    let began = Instant::now();
    let answer = client.get(url).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let body = answer.bytes().await.unwrap();
    (began.elapsed(), body.len())
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (bytes, requests) = if measuring {
        (10 << 20, 20)
    } else {
        (256 << 10, 2)
    };
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    provision_all(
        &js,
        &StreamSettings::default(),
        &ConsumerSettings::default(),
    )
    .await
    .unwrap();
    store_run(&js, bytes).await;

    let port = free_port();
    let logs = tempfile::tempdir().unwrap();
    let reporter = ServiceProcess::spawn(
        "iac-reporter",
        [
            ("NATS_URL", nats.url()),
            ("WEB_PORT", port.to_string()),
            ("RUN_LINK_SECRET", SECRET.to_string()),
            ("RUST_LOG", "warn".to_string()),
        ],
        logs.path().join("reporter.log"),
    );
    let pid = reporter.pid().expect("the reporter runs");
    let signer = LinkSigner::new(SecretString::from(SECRET));
    let url = format!("http://127.0.0.1:{port}{}", signer.path(RUN));
    let client = iac_tests::http();
    wait_for("the run page", Duration::from_secs(30), || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let answer = client.get(&url).send().await.ok()?;
            let body = answer.text().await.ok()?;
            body.contains("success").then_some(())
        }
    })
    .await;
    let before = peak_rss_mb(pid);

    let (mut page, mut raw) = (Vec::new(), Vec::new());
    let mut page_bytes = 0;
    for _ in 0..requests {
        let (took, len) = fetch(&client, &url).await;
        page.push(took);
        page_bytes = len;
        let began = Instant::now();
        let read = read_all(&js).await;
        raw.push(began.elapsed());
        assert!(read >= bytes, "{read} bytes read");
    }
    let after = peak_rss_mb(pid);
    let (p50, worst, raw50) = (
        quantile(&page, 0.5),
        quantile(&page, 1.0),
        quantile(&raw, 0.5),
    );
    println!(
        "run_pages: a run page of {:.1} MiB of output ({:.1} MiB of HTML), {requests} requests",
        bytes as f64 / (1 << 20) as f64,
        page_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  page to the last byte: p50 {:.1} ms, slowest {:.1} ms (target <= 300 ms)",
        ms(p50),
        ms(worst)
    );
    println!(
        "  ceiling, the same chunks read from JetStream in process: p50 {:.1} ms; ratio {:.2}",
        ms(raw50),
        ms(p50) / ms(raw50)
    );
    println!("  reporter peak RSS: {before:.1} MB before, {after:.1} MB after (target <= 40 MB)");
}
