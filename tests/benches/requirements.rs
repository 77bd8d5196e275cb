//! What `TASK_REQUIREMENTS` costs a sync once its environment is built. The worker runs in
//! this process against a real nats-server and the fixture monorepo, each sync running the
//! real `postgres.sync` through invoke: syncs without `TASK_REQUIREMENTS` against syncs that
//! reuse the environment of a requirements file (one tiny wheel, installed offline), in
//! alternating rounds, each sync timed by its own `duration_ms`. Then the reuse step alone
//! (`TaskRequirements::prepare` finding the environment built), in process.
//!
//! `cargo bench -p iac-tests --bench requirements` measures; without `--bench` (as
//! `cargo test --benches` runs it) it does a tiny run to prove it works.

use std::path::Path;
use std::time::{Duration, Instant};

use iac_shared::events::FinishedState;
use iac_tests::measure::{ms, quantile};
use iac_tests::tools::tool;
use iac_tests::wheel::wheel;
use iac_tests::worker_harness::WorkerHarness as Harness;
use iac_worker::Config;

const SERVICE_FILE: &str = "platform/01.postgres/compose.yaml";

/// `count` syncs of one service by a worker started with `extra`, after one that is not
/// counted (it clones, or builds the environment); each sync's duration.
async fn syncs(h: &Harness, workspace: &Path, extra: &[&str], count: usize) -> Vec<Duration> {
    let worker = h.start(workspace, extra);
    let mut durations = Vec::with_capacity(count);
    for i in 0..=count {
        let (_, seq) = h.push_change(SERVICE_FILE).await;
        let finished = h.finished_for(seq).await;
        assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
        if i > 0 {
            durations.push(Duration::from_millis(finished.duration_ms));
        }
    }
    worker.stop().await;
    durations
}

/// The reuse step alone, `times` times, on the environment the worker with `args` built.
async fn prepare_times(args: Vec<String>, workspace: &Path, times: usize) -> Vec<Duration> {
    let config = Config::from_args(args).unwrap();
    let requirements = config.task_requirements(workspace);
    let checkout = workspace.join(config.repo_url.repo_name());
    let base = config
        .task_env()
        .build(|name| std::env::var(name).ok(), &[])
        .unwrap();
    let mut times_taken = Vec::with_capacity(times);
    for _ in 0..times {
        let mut env = base.clone();
        let started = Instant::now();
        let in_use = requirements
            .prepare(&checkout, &mut env, std::future::pending())
            .await
            .unwrap();
        times_taken.push(started.elapsed());
        assert!(in_use.is_some());
    }
    times_taken
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (rounds, count) = if measuring { (3, 15) } else { (1, 1) };
    let h = Harness::new().await;
    wheel(&h.fixture.work_tree().join("wheels"), "greet", "1.0");
    h.fixture.write(
        "requirements.txt",
        "--no-index\n--find-links ./wheels\ngreet==1.0\n",
    );
    h.fixture.commit("the tasks' requirements");
    let uv = tool("UV_BIN", "uv");
    let with = [
        "--task-requirements",
        "requirements.txt",
        "--task-uv",
        uv.to_str().unwrap(),
    ];
    let (plain_ws, reuse_ws) = (h.workspace("plain"), h.workspace("reuse"));

    let mut plain = Vec::new();
    let mut reuse = Vec::new();
    // Alternate the two, so drift on a shared machine hits both alike.
    for _ in 0..rounds {
        plain.extend(syncs(&h, &plain_ws, &[], count).await);
        reuse.extend(syncs(&h, &reuse_ws, &with, count).await);
    }
    let prepare = prepare_times(h.args(&reuse_ws, &with), &reuse_ws, count * 100).await;

    let (p, r) = (quantile(&plain, 0.5), quantile(&reuse, 0.5));
    println!(
        "requirements: {} syncs each of postgres.sync through invoke, {rounds} alternating rounds",
        plain.len()
    );
    println!(
        "  without TASK_REQUIREMENTS:        p50 {:>7.1} ms, p90 {:>7.1} ms",
        ms(p),
        ms(quantile(&plain, 0.9))
    );
    println!(
        "  reusing the environment:          p50 {:>7.1} ms, p90 {:>7.1} ms",
        ms(r),
        ms(quantile(&reuse, 0.9))
    );
    println!(
        "  difference of the p50s:               {:>+7.1} ms (target <= 20 ms)",
        ms(r) - ms(p)
    );
    println!(
        "  the reuse step alone, {} times:    p50 {:>7.3} ms, p99 {:>7.3} ms",
        prepare.len(),
        ms(quantile(&prepare, 0.5)),
        ms(quantile(&prepare, 0.99))
    );
}
