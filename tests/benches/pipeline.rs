//! The whole pipeline, measured end to end against a real nats-server, the three real
//! binaries, a real git repository and a fake GitHub:
//!
//! - push → final status: a push webhook until GitHub answers the final ✅ for its commit,
//!   with the task `true`, next to the sum of its parts measured in the same run (the
//!   gateway's answer, the worker's event stored → started and started → finished, the
//!   reporter's finished → status answered), and the worker's part next to its ceiling: a
//!   bare `git checkout` of the same commits in a warm clone;
//! - memory: the peak RSS of each service after 100,000 webhooks (one in a hundred a push to
//!   the deployed branch, which the worker syncs and the reporter reports; the others pushes
//!   to other branches, pings and other events, which the gateway verifies and answers).
//!
//! `cargo build --release --bins && cargo bench -p iac-tests --bench pipeline` measures;
//! without `--bench` (as `cargo test --benches` runs it) it does a tiny run to prove it works.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use iac_shared::events::{FinishedState, SyncFinished};
use iac_shared::names::{FINISHED_SUBJECT, STARTED_SUBJECT};
use iac_tests::fake_github::FakeGithub;
use iac_tests::fixture::{git, push_payload};
use iac_tests::free_port;
use iac_tests::measure::{ms, peak_rss_mb, quantile};
use iac_tests::pipeline::Pipeline;
use iac_tests::process::ServiceProcess;

const CONTEXT: &str = "IaC Runner / Sync";
const SERVICE_FILE: &str = "platform/01.postgres/compose.yaml";

struct Services {
    gateway: ServiceProcess,
    worker: ServiceProcess,
    reporter: ServiceProcess,
}

async fn start(pipeline: &mut Pipeline) -> Services {
    pipeline.set_env("worker", "SYNC_COMMAND", "true {task}");
    for service in ["gateway", "worker", "reporter"] {
        pipeline.set_env(service, "RUST_LOG", "warn");
    }
    // Logging only warnings, the gateway does not say which port it bound: it gets one.
    pipeline.set_env("gateway", "WEBHOOK_PORT", &free_port().to_string());
    Services {
        gateway: pipeline.start_gateway().await,
        worker: pipeline.start_worker(),
        reporter: pipeline.start_reporter(),
    }
}

/// Waits until GitHub shows `state` for `commit` and returns when it was answered.
async fn shown(github: &FakeGithub, commit: &str, state: &str) -> Instant {
    github
        .wait_for_shown(commit, CONTEXT, state, Duration::from_secs(60))
        .await
        .landed
}

async fn end_to_end(pushes: usize) {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    let services = start(&mut pipeline).await;
    let client = pipeline.nats.as_ref().unwrap().client().await;
    let mut started = client.subscribe(STARTED_SUBJECT).await.unwrap();
    let mut finished = client.subscribe(FINISHED_SUBJECT).await.unwrap();
    client.flush().await.unwrap();

    // The first push clones the repository; it is not counted.
    let (warm, status, _) = pipeline.push_change(SERVICE_FILE).await;
    assert_eq!(status, 200);
    shown(&github, &warm, "success").await;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), started.next()).await {
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), finished.next()).await
    {
    }

    let (mut total, mut gateway, mut before_task, mut task, mut report) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut commits = Vec::new();
    for _ in 0..pushes {
        let (commit, delivery, payload) = pipeline.commit_change(SERVICE_FILE);
        let sent = Instant::now();
        let (status, _) = pipeline.webhook("push", &delivery, &payload).await;
        let answered = Instant::now();
        assert_eq!(status, 200);
        started.next().await.expect("a started result");
        let started_at = Instant::now();
        let message = finished.next().await.expect("a finished result");
        let finished_at = Instant::now();
        let result: SyncFinished = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(result.state, FinishedState::Success);
        let landed = shown(&github, &commit, "success").await;
        total.push(landed - sent);
        gateway.push(answered - sent);
        before_task.push(started_at - answered);
        task.push(finished_at - started_at);
        report.push(landed.saturating_duration_since(finished_at));
        commits.push(commit);
    }

    // The worker's ceiling: checking the same commits out in a warm clone, one git process each.
    let clone = pipeline.fixture.scratch("checkout-ceiling");
    git(&clone, &["clone", "-q", &pipeline.fixture.url(), "."]);
    let mut checkout = Vec::new();
    for commit in &commits {
        let t = Instant::now();
        git(&clone, &["checkout", "-q", "--detach", commit]);
        checkout.push(t.elapsed());
    }

    let p50 = |v: &[Duration]| quantile(v, 0.5);
    let parts = p50(&gateway) + p50(&before_task) + p50(&task) + p50(&report);
    println!("push -> final status over {pushes} pushes (task `true`, warm checkout):");
    println!("{:<42} {:>8} {:>8}", "", "p50 ms", "p99 ms");
    for (name, values) in [
        ("  gateway: webhook sent -> 200", &gateway),
        ("  worker: event stored -> started stored", &before_task),
        ("  worker: started -> finished stored", &task),
        ("  reporter: finished -> status answered", &report),
        ("  end to end: webhook sent -> final status", &total),
        ("  ceiling: git checkout of the same commit", &checkout),
    ] {
        println!(
            "{name:<42} {:>8.1} {:>8.1}",
            ms(p50(values)),
            ms(quantile(values, 0.99))
        );
    }
    println!(
        "  end to end p50 / sum of the parts' p50 ({:.1} ms): {:.2}",
        ms(parts),
        p50(&total).as_secs_f64() / parts.as_secs_f64()
    );
    println!(
        "  worker event stored -> started p50 / git checkout p50: {:.1}",
        p50(&before_task).as_secs_f64() / p50(&checkout).as_secs_f64()
    );
    drop(services);
}

async fn memory(webhooks: usize) {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    let services = start(&mut pipeline).await;
    let client = pipeline.nats.as_ref().unwrap().client().await;
    let mut finished = client.subscribe(FINISHED_SUBJECT).await.unwrap();
    client.flush().await.unwrap();

    // One push to the deployed branch in a hundred, each its own commit.
    let pushes: Vec<_> = (0..webhooks.div_ceil(100))
        .map(|_| pipeline.commit_change(SERVICE_FILE))
        .collect();
    let pushes = Arc::new(pushes);
    let pipeline = Arc::new(pipeline);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let senders: Vec<_> = (0..16)
        .map(|_| {
            let (pipeline, pushes, next) = (pipeline.clone(), pushes.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= webhooks {
                        break;
                    }
                    let delivery = format!("memory-{n}");
                    let (event, payload) = match n % 100 {
                        0 => ("push", pushes[n / 100].2.clone()),
                        1..=79 => (
                            "push",
                            push_payload(
                                "refs/heads/feature",
                                &"1".repeat(40),
                                &"2".repeat(40),
                                &[SERVICE_FILE],
                            ),
                        ),
                        80..=89 => (
                            "ping",
                            serde_json::json!({"zen": "Keep it simple.", "hook_id": 1}),
                        ),
                        _ => ("issues", serde_json::json!({"action": "opened"})),
                    };
                    let (status, _) = pipeline.webhook(event, &delivery, &payload).await;
                    assert_eq!(status, 200, "webhook {n}");
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    let sent_in = started.elapsed();
    let mut synced = 0;
    while synced < pushes.len() {
        let message = tokio::time::timeout(Duration::from_secs(60), finished.next())
            .await
            .expect("the worker keeps finishing syncs")
            .expect("a finished result");
        let result: SyncFinished = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(result.state, FinishedState::Success);
        synced += 1;
    }
    for (commit, _, _) in pushes.iter() {
        shown(&github, commit, "success").await;
    }
    println!(
        "{webhooks} webhooks sent in {:.1} s; {} pushes synced and reported after {:.1} s",
        sent_in.as_secs_f64(),
        pushes.len(),
        started.elapsed().as_secs_f64()
    );
    println!("peak RSS after them (target: gateway <= 30, worker <= 40, reporter <= 30 MB):");
    for (name, process) in [
        ("gateway", &services.gateway),
        ("worker", &services.worker),
        ("reporter", &services.reporter),
    ] {
        println!(
            "  {name:<8} {:>6.1} MB",
            peak_rss_mb(process.pid().unwrap())
        );
    }
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    end_to_end(if measuring { 50 } else { 2 }).await;
    memory(if measuring { 100_000 } else { 200 }).await;
}
