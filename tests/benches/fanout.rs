//! What `SYNC_PARALLELISM` buys, and what the worker costs per task: one manual sync of every
//! service of a real git repository of 100 services, run by the `iac-worker` binary (logging
//! at `info` to a file, as deployed) on a real nats-server, its tasks `sh -c 'sleep 0.1'`:
//!
//! - the sync's time from the request stored to its finished result stored, at
//!   `SYNC_PARALLELISM=8` against 1, in the same run;
//! - the worker's overhead per task: at `SYNC_PARALLELISM=1`, what the sync of every service
//!   takes beyond the sync of one service (the checkout and the results, paid once per sync)
//!   and beyond the tasks' own 100 ms, per further task; and the same with the task `true`,
//!   which does nothing but start and exit.
//!
//! Each worker syncs one service first, so the clone is not counted. Rounds alternate the
//! settings, so drift on a shared machine hits them alike; the median round is reported.
//!
//! `cargo build --release --bins && cargo bench -p iac-tests --bench fanout` measures; without
//! `--bench` (as `cargo test --benches` runs it) it does a tiny run to prove it works.

use std::time::{Duration, Instant};

use iac_shared::events::{FinishedState, SyncFinished};
use iac_shared::names::{FINISHED_SUBJECT, SYNC_SUBJECT};
use iac_tests::worker_harness::{WorkerHarness, results};

/// A repository of `services` services and nothing else, committed.
fn repository(h: &WorkerHarness, services: usize) {
    h.fixture.remove("platform/01.postgres");
    h.fixture.remove("platform/02.redis");
    h.fixture.remove("finance_report");
    for i in 0..services {
        h.fixture.write(
            &format!("platform/{i:03}.s{i:03}/deploy.py"),
            "# a service\n",
        );
    }
    h.fixture.commit("services for the benchmark");
}

/// Publishes a manual sync and waits for its finished result, which must show `services`
/// synced; the time between the two.
async fn timed_sync(h: &WorkerHarness, body: &str, services: usize) -> Duration {
    let began = Instant::now();
    let seq = h.publish_bare(SYNC_SUBJECT, body).await;
    let deadline = began + Duration::from_secs(300);
    loop {
        let finished = results::<SyncFinished>(&h.js, FINISHED_SUBJECT)
            .await
            .into_iter()
            .map(|(_, f)| f)
            .find(|f| f.event_seq == seq);
        if let Some(finished) = finished {
            let elapsed = began.elapsed();
            assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
            assert_eq!(finished.totals.synced, services, "{finished:#?}");
            return elapsed;
        }
        assert!(
            Instant::now() < deadline,
            "the sync of event {seq} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What one worker took: a sync of one service, then of every service.
#[derive(Debug, Clone, Copy)]
struct Round {
    one: Duration,
    all: Duration,
}

/// A sync of one service, then of every service, by a worker of `parallelism` running
/// `command`.
async fn round(
    h: &WorkerHarness,
    name: &str,
    command: &str,
    parallelism: u16,
    services: usize,
) -> Round {
    let workspace = h.workspace(name);
    let args = h.args(
        &workspace,
        &[
            "--sync-command",
            command,
            "--sync-parallelism",
            &parallelism.to_string(),
        ],
    );
    let log = h.workspace("logs").join(format!("{name}.log"));
    let mut worker = h.spawn_process(&args, &[], log);
    // The first sync clones the repository: not counted.
    let single = r#"{"services":["platform/s000"]}"#;
    timed_sync(h, single, 1).await;
    let one = timed_sync(h, single, 1).await;
    let all = timed_sync(h, r#"{"all": true}"#, services).await;
    worker.terminate(Duration::from_secs(30));
    Round { one, all }
}

/// The ceiling of a task's cost: starting `true` in its own process group with its output
/// piped, and waiting for it, from this process, once per service; milliseconds per task.
fn bare_spawn_ms(services: usize) -> f64 {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let began = Instant::now();
    for _ in 0..services {
        let status = Command::new("true")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .status()
            .unwrap();
        assert!(status.success());
    }
    began.elapsed().as_secs_f64() * 1000.0 / services as f64
}

/// The round whose sync of every service took the median time.
fn median(mut rounds: Vec<Round>) -> Round {
    rounds.sort_unstable_by_key(|r| r.all);
    rounds[rounds.len() / 2]
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (services, task_ms, rounds) = if measuring { (100, 100, 3) } else { (4, 10, 1) };
    let h = WorkerHarness::new().await;
    repository(&h, services);
    let sleep = format!("sh -c 'sleep {}' {{task}}", task_ms as f64 / 1000.0);
    let (mut one, mut eight, mut noop) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        one.push(round(&h, &format!("one-{r}"), &sleep, 1, services).await);
        eight.push(round(&h, &format!("eight-{r}"), &sleep, 8, services).await);
        noop.push(round(&h, &format!("noop-{r}"), "true {task}", 1, services).await);
    }
    let (one, eight, noop) = (median(one), median(eight), median(noop));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Per further task: the sync of every service, less the sync of one, less the task itself.
    let further = (services - 1) as f64;
    let overhead = |r: Round, task_ms: f64| (ms(r.all) - ms(r.one)) / further - task_ms;
    println!(
        "fanout: one sync of {services} services, tasks `sleep {task_ms} ms`, median of {rounds} rounds"
    );
    for (n, r) in [(1, one), (8, eight)] {
        println!(
            "  SYNC_PARALLELISM={n}: {:>7.0} ms (a sync of one service: {:.0} ms)",
            ms(r.all),
            ms(r.one)
        );
    }
    println!(
        "  speed-up 8 over 1:  {:>7.2}x",
        ms(one.all) / ms(eight.all)
    );
    println!(
        "  worker overhead per task, N=1, beyond the task's {task_ms} ms: {:.2} ms",
        overhead(one, task_ms as f64)
    );
    println!(
        "  per task with `true`, N=1: {:.2} ms (every service {:.0} ms, one {:.0} ms)",
        overhead(noop, 0.0),
        ms(noop.all),
        ms(noop.one)
    );
    println!(
        "  ceiling: `true` started and waited for by a bare loop: {:.2} ms per task",
        bare_spawn_ms(services)
    );
}
