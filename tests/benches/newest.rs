//! Newest commit wins, measured: pushes arriving while a slow sync runs, against the worker
//! binary on a real nats-server and the fixture monorepo (real git, real invoke):
//!
//! - 50 pushes stored during a 30 s sync (a redis task that sleeps): how many syncs ran in all
//!   (the slow one and one of the newest are the floor), that every push got a finished result
//!   (a sync of its own, or superseded by the newest), and how long after the slow sync ended
//!   the last push was final;
//! - the cost of one reconcile check (`git ls-remote` of the branch, the branch head recorded
//!   in `IAC_APPLIED`, the applied state read; the branch level, so nothing published), in
//!   process, against a bare `git ls-remote` of the same remote.
//!
//! `cargo bench -p iac-tests --bench newest` measures; without `--bench` (as
//! `cargo test --benches` runs it) it does a tiny run (5 pushes during a 2 s sync).

use std::process::Command;
use std::time::{Duration, Instant};

use iac_shared::events::{FinishedState, SyncFinished, SyncStarted};
use iac_shared::names::{APPLIED_BUCKET, FINISHED_SUBJECT, STARTED_SUBJECT, WORKER_CONSUMER};
use iac_shared::rules::Rules;
use iac_shared::shutdown::Shutdown;
use iac_tests::measure::{ms, quantile};
use iac_tests::worker_harness::WorkerHarness;
use iac_worker::Config;
use iac_worker::git::Checkout;
use iac_worker::metrics::Metrics;
use iac_worker::newest::{AppliedState, Reconciled, Reconciler};
use iac_worker::workspace::Workspace;

const REDIS: &str = "platform/02.redis";
const CHANGED: [&str; 2] = [
    "platform/01.postgres/compose.yaml",
    "finance_report/finance_report/10.app/compose.yaml",
];

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (slow_secs, pushes, checks) = if measuring {
        (30.0, 50, 200)
    } else {
        (2.0, 5, 5)
    };
    let h = WorkerHarness::new().await;
    let workspace = h.workspace("ws");
    let args = h.args(&workspace, &["--reconcile-interval", "0"]);
    let log = h.workspace("logs").join("worker.log");
    let mut worker = h.spawn_process(&args, &[], log);

    h.fixture.set_behaviour(REDIS, slow_secs, 0);
    let (_, slow) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    h.started_for(slow).await;
    let mut seqs = Vec::with_capacity(pushes);
    for i in 0..pushes {
        let (_, seq) = h.push_change(CHANGED[i % 2]).await;
        seqs.push(seq);
    }
    let slow_done = h.finished_for(slow).await;
    assert_eq!(slow_done.state, FinishedState::Success, "{slow_done:#?}");
    let slow_ended = Instant::now();
    let deadline = slow_ended + Duration::from_secs(120);
    let finals = loop {
        let finished: Vec<SyncFinished> = h.finished().await;
        let finals: Vec<SyncFinished> = seqs
            .iter()
            .filter_map(|seq| finished.iter().find(|f| f.event_seq == *seq).cloned())
            .collect();
        if finals.len() == seqs.len() {
            break finals;
        }
        assert!(
            Instant::now() < deadline,
            "not every push got a final result"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let all_final_after = slow_ended.elapsed();
    let syncs = h.results::<SyncStarted>(STARTED_SUBJECT).await.len();
    let superseded = finals.iter().filter(|f| f.superseded_by.is_some()).count();
    assert!(
        finals.iter().all(|f| f.state == FinishedState::Success),
        "{finals:#?}"
    );
    assert!(syncs <= 2, "{syncs} syncs for {pushes} pushes behind one");
    worker.terminate(Duration::from_secs(30));

    println!("newest: {pushes} pushes stored during a {slow_secs} s sync");
    println!("  syncs in all (the slow one included): {syncs}");
    println!(
        "  pushes with a final result: {} of {pushes} ({superseded} superseded)",
        finals.len()
    );
    println!(
        "  last push final {:.0} ms after the slow sync's result",
        ms(all_final_after)
    );

    // One reconcile check, the branch level with what was applied.
    let config = Config::from_args(args).unwrap();
    let bucket = h.js.get_key_value(APPLIED_BUCKET).await.unwrap();
    let (metrics, _registry) = Metrics::new();
    let reconciler = Reconciler {
        checkout: Checkout::new(
            config.repo_url.clone(),
            config.branch.clone(),
            config.deploy_tag_pattern.clone(),
            workspace.join(config.repo_url.repo_name()),
        ),
        workspace: Workspace::new(workspace.clone()),
        rules: Rules::load_or_default(config.rules.as_deref()).unwrap(),
        applied: AppliedState {
            bucket,
            env: Some("production".into()),
        },
        js: h.js.clone(),
        consumer: WORKER_CONSUMER.into(),
        config: config.clone(),
        metrics,
        shutdown: Shutdown::never(),
    };
    let mut check = Vec::with_capacity(checks);
    let mut bare = Vec::with_capacity(checks);
    let remote = h.fixture.url();
    for _ in 0..checks {
        let began = Instant::now();
        let outcome = reconciler.check().await.unwrap();
        check.push(began.elapsed());
        assert_eq!(outcome, Reconciled::UpToDate);
        let began = Instant::now();
        let listed = Command::new("git")
            .args(["ls-remote", "--", &remote, "refs/heads/main"])
            .output()
            .unwrap();
        bare.push(began.elapsed());
        assert!(listed.status.success());
    }
    let (p50, p99) = (quantile(&check, 0.5), quantile(&check, 0.99));
    let (b50, b99) = (quantile(&bare, 0.5), quantile(&bare, 0.99));
    println!(
        "  one reconcile check, {checks} times: p50 {:.2} / p99 {:.2} ms",
        ms(p50),
        ms(p99)
    );
    println!(
        "  ceiling: a bare `git ls-remote` of the same remote: p50 {:.2} / p99 {:.2} ms ({:.2}x)",
        ms(b50),
        ms(b99),
        ms(p50) / ms(b50)
    );
    // The finished results of the slow sync and of the pushes, read once more, for the log.
    let stored = h.results::<SyncFinished>(FINISHED_SUBJECT).await.len();
    println!("  finished results stored: {stored}");
}
