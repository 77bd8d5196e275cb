//! Declared fan-out and ordered parallel syncs against real parts: a real nats-server, the
//! fixture monorepo in real git, and the pinned `invoke`. The dependency manifest is committed
//! in the fixture, so the worker reads it at the synced commit as it would in production.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::Duration;

use iac_shared::events::{FinishedState, SyncFinished, SyncOutcome};
use iac_tests::fake_github::FakeGithub;
use iac_tests::fixture::TaskRun;
use iac_tests::pipeline::Pipeline;
use iac_tests::worker_harness::WorkerHarness as Harness;

const MANIFEST: &str = "deploy-dependencies.yaml";
const POSTGRES: &str = "platform/01.postgres";
const REDIS: &str = "platform/02.redis";
const APP: &str = "finance_report/finance_report/10.app";

/// The worker's flags for a manifest at the repository root.
const WITH_MANIFEST: &[&str] = &["--dependencies-file", MANIFEST];

/// Commits `manifest` as the dependency manifest.
fn commit_manifest(h: &Harness, manifest: &str) {
    h.fixture.write(MANIFEST, manifest);
    h.fixture.commit("dependency manifest");
}

fn outcomes(finished: &SyncFinished) -> Vec<(&str, SyncOutcome)> {
    finished
        .services
        .iter()
        .map(|s| (s.service.as_str(), s.outcome))
        .collect()
}

/// The tasks that started, in the order they started.
fn started_tasks(h: &Harness) -> Vec<String> {
    h.fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "start")
        .filter_map(|r| r.task)
        .collect()
}

#[tokio::test]
async fn a_libs_change_reaches_only_the_services_that_declare_it_and_says_why() {
    let h = Harness::new().await;
    commit_manifest(
        &h,
        "version: 1\nservices:\n  platform/redis:\n    depends_on:\n      - libs/**\n",
    );
    let worker = h.start(&h.workspace("ws"), WITH_MANIFEST);

    let before = h.fixture.head();
    h.fixture.write("libs/common.py", "# shared code\n");
    h.fixture.write("docs/notes.md", "nothing deploys this\n");
    let after = h.fixture.commit("shared code and notes");
    let seq = h
        .push(&before, &after, &["libs/common.py", "docs/notes.md"])
        .await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(
        outcomes(&finished),
        [("platform/redis", SyncOutcome::Synced)]
    );
    assert_eq!(started_tasks(&h), ["redis.sync"]);
    let started = h.started_for(seq).await;
    assert_eq!(started.services, ["platform/redis"]);
    assert_eq!(
        started.reasons,
        BTreeMap::from([(
            "platform/redis".to_string(),
            "depends on libs/** via libs/common.py".to_string()
        )])
    );
    assert_eq!(
        finished.services[0].reason.as_deref(),
        Some("depends on libs/** via libs/common.py")
    );

    // A service's own change says so; a manual request says "manual".
    let (_, seq) = h.push_change(&format!("{POSTGRES}/compose.yaml")).await;
    let started = h.started_for(seq).await;
    assert_eq!(
        started.reasons.get("platform/postgres").map(String::as_str),
        Some("changed platform/01.postgres/compose.yaml")
    );
    let seq = h
        .publish_bare("iac.events.sync", r#"{"services":["platform/redis"]}"#)
        .await;
    let started = h.started_for(seq).await;
    assert_eq!(
        started.reasons.get("platform/redis").map(String::as_str),
        Some("manual")
    );
    h.finished_for(seq).await;
    worker.stop().await;
}

#[tokio::test]
async fn each_bad_manifest_ends_the_sync_in_error_naming_the_file_and_the_problem() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), WITH_MANIFEST);
    let cases = [
        (Some("version: 1\nservices: [\n"), "not valid YAML"),
        (
            Some("version: 1\nservices:\n  platform/redis:\n    after: [platform/postgress]\n"),
            "services.platform/redis.after names platform/postgress, which is not a service at this commit",
        ),
        (
            Some(
                "version: 1\nservices:\n  platform/redis:\n    after: [platform/postgres]\n  platform/postgres:\n    after: [platform/redis]\n",
            ),
            "`after` makes a cycle: platform/postgres → platform/redis → platform/postgres",
        ),
        (
            Some("version: 2\nservices: {}\n"),
            "version 2 is not supported",
        ),
        (None, "no such file at this commit"),
    ];
    for (manifest, problem) in cases {
        match manifest {
            Some(text) => h.fixture.write(MANIFEST, text),
            None => {
                if h.fixture.work_tree().join(MANIFEST).exists() {
                    h.fixture.remove(MANIFEST);
                }
            }
        }
        let (commit, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
        let finished = h.finished_for(seq).await;
        assert_eq!(
            finished.state,
            FinishedState::Error,
            "{problem}: {finished:#?}"
        );
        assert_eq!(finished.commit.as_deref(), Some(commit.as_str()));
        let error = finished.error.clone().unwrap_or_default();
        assert!(
            error.starts_with(&format!("Bad dependency manifest {MANIFEST}: "))
                && error.contains(problem),
            "expected {problem:?} in {error:?}"
        );
        assert!(finished.services.is_empty(), "{finished:#?}");
    }
    // A symbolic link could make the worker read a file outside the checkout.
    std::os::unix::fs::symlink("/etc/passwd", h.fixture.work_tree().join(MANIFEST)).unwrap();
    let (_, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Error, "{finished:#?}");
    let error = finished.error.unwrap_or_default();
    assert!(
        error.contains("not a regular file of the repository"),
        "{error}"
    );
    h.fixture.remove(MANIFEST);

    assert!(
        h.fixture.runs().is_empty(),
        "no task runs with a bad manifest: {:?}",
        started_tasks(&h)
    );

    // Mended, the next push runs, and with it redis: its changes never synced (the pushes
    // that carried them ended in error), and a push diffs from the last synced commit.
    commit_manifest(&h, "version: 1\nservices: {}\n");
    let (_, seq) = h.push_change(&format!("{APP}/compose.yaml")).await;
    let finished = h.finished_for(seq).await;
    assert_eq!(
        outcomes(&finished),
        [
            ("finance_report/app", SyncOutcome::Synced),
            ("platform/redis", SyncOutcome::Synced)
        ]
    );
    worker.stop().await;
}

/// Adds a service `platform/{name}` (directory `platform/{nn}.{name}`) whose task behaves as
/// `behaviour.json` says (see `libs/fixture_sync.py`); committed with the next commit.
fn add_service(h: &Harness, nn: u32, name: &str, sleep_secs: f64, exit: i32) {
    let dir = format!("platform/{nn:02}.{name}");
    let deploy = std::fs::read_to_string(h.fixture.work_tree().join(REDIS).join("deploy.py"))
        .expect("the fixture's redis deploy.py");
    h.fixture.write(&format!("{dir}/deploy.py"), &deploy);
    h.fixture.set_behaviour(&dir, sleep_secs, exit);
}

/// One task run: the service, when it started and when it ended (seconds since the epoch).
#[derive(Debug, Clone)]
struct Span {
    service: String,
    pid: u32,
    start: f64,
    end: Option<f64>,
}

fn spans(runs: &[TaskRun]) -> Vec<Span> {
    let mut spans: Vec<Span> = runs
        .iter()
        .filter(|r| r.phase == "start")
        .map(|r| Span {
            service: r.service.clone().unwrap_or_default(),
            pid: r.pid,
            start: r.t,
            end: None,
        })
        .collect();
    for end in runs.iter().filter(|r| r.phase == "end") {
        if let Some(span) = spans.iter_mut().find(|s| s.pid == end.pid) {
            span.end = Some(end.t);
        }
    }
    spans.sort_by(|a, b| a.start.total_cmp(&b.start));
    spans
}

/// The most tasks that ran at the same moment.
fn most_at_once(spans: &[Span]) -> usize {
    spans
        .iter()
        .map(|s| {
            spans
                .iter()
                .filter(|o| o.start <= s.start && o.end.is_none_or(|end| end > s.start))
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn span_of<'a>(spans: &'a [Span], service: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.service == service)
        .unwrap_or_else(|| panic!("{service} ran: {spans:#?}"))
}

#[tokio::test]
async fn parallel_tasks_stay_within_the_limit_and_start_only_after_what_they_come_after() {
    let h = Harness::new().await;
    for (nn, name) in [(11, "s1"), (12, "s2"), (13, "s3"), (14, "s4"), (15, "s5")] {
        add_service(&h, nn, name, 0.6, 0);
    }
    commit_manifest(
        &h,
        "version: 1\nservices:\n  platform/s1:\n    after: [platform/s3]\n  platform/s2:\n    after: [platform/s3, platform/s1]\n",
    );
    let mut args = WITH_MANIFEST.to_vec();
    args.extend(["--sync-parallelism", "2"]);
    let worker = h.start(&h.workspace("ws"), &args);
    let request =
        r#"{"services":["platform/s1","platform/s2","platform/s3","platform/s4","platform/s5"]}"#;
    let seq = h.publish_bare("iac.events.sync", request).await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    let services: Vec<&str> = finished
        .services
        .iter()
        .map(|s| s.service.as_str())
        .collect();
    assert_eq!(
        services,
        [
            "platform/s1",
            "platform/s2",
            "platform/s3",
            "platform/s4",
            "platform/s5"
        ],
        "results in key order, whatever order the tasks ended in"
    );
    let spans = spans(&h.fixture.runs());
    assert_eq!(spans.len(), 5, "{spans:#?}");
    assert_eq!(
        most_at_once(&spans),
        2,
        "two at once, never more: {spans:#?}"
    );
    let s3_end = span_of(&spans, "platform/s3").end.unwrap();
    let s1 = span_of(&spans, "platform/s1");
    assert!(s1.start >= s3_end, "s1 comes after s3: {spans:#?}");
    let s2 = span_of(&spans, "platform/s2");
    assert!(s2.start >= s1.end.unwrap(), "s2 comes after s1: {spans:#?}");
    // The first two to start: of those free to start, the first in key order.
    let first: Vec<&str> = spans[..2].iter().map(|s| s.service.as_str()).collect();
    let mut first_sorted = first.clone();
    first_sorted.sort_unstable();
    assert_eq!(first_sorted, ["platform/s3", "platform/s4"], "{spans:#?}");
    worker.stop().await;
}

#[tokio::test]
async fn a_failed_predecessor_blocks_the_services_after_it_and_the_others_still_run() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(POSTGRES, 0.0, 3);
    commit_manifest(
        &h,
        "version: 1\nservices:\n  platform/redis:\n    after: [platform/postgres]\n  finance_report/app:\n    after: [platform/redis]\n",
    );
    add_service(&h, 11, "s1", 0.0, 0);
    h.fixture.commit("postgres fails; another service");
    let mut args = WITH_MANIFEST.to_vec();
    args.extend(["--sync-parallelism", "4"]);
    let worker = h.start(&h.workspace("ws"), &args);
    let seq = h.publish_bare("iac.events.sync", r#"{"all": true}"#).await;

    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Failure, "{finished:#?}");
    assert_eq!(
        outcomes(&finished),
        [
            ("finance_report/app", SyncOutcome::Blocked),
            ("platform/postgres", SyncOutcome::Failed),
            ("platform/redis", SyncOutcome::Blocked),
            ("platform/s1", SyncOutcome::Synced),
        ]
    );
    for blocked in ["finance_report/app", "platform/redis"] {
        let result = finished
            .services
            .iter()
            .find(|s| s.service == blocked)
            .unwrap();
        assert_eq!(
            result.output_tail,
            ["Blocked: platform/postgres failed"],
            "{blocked}"
        );
        assert_eq!(result.reason.as_deref(), Some("all"));
    }
    assert_eq!(
        (finished.totals.blocked, finished.totals.not_synced()),
        (2, 3)
    );
    let mut ran: Vec<String> = started_tasks(&h);
    ran.sort_unstable();
    assert_eq!(
        ran,
        ["postgres.sync", "s1.sync"],
        "blocked services never start"
    );
    worker.stop().await;
}

#[tokio::test]
async fn parallel_tasks_time_out_each_with_its_whole_process_group() {
    let h = Harness::new().await;
    h.fixture.set_behaviour(POSTGRES, 30.0, 0);
    h.fixture.set_behaviour(REDIS, 30.0, 0);
    h.fixture.commit("both hang");
    let worker = h.start(
        &h.workspace("ws"),
        &["--sync-parallelism", "2", "--sync-timeout", "2s"],
    );
    let seq = h
        .publish_bare(
            "iac.events.sync",
            r#"{"services":["platform/postgres","platform/redis"]}"#,
        )
        .await;

    let finished = h.finished_for(seq).await;
    assert_eq!(
        outcomes(&finished),
        [
            ("platform/postgres", SyncOutcome::TimedOut),
            ("platform/redis", SyncOutcome::TimedOut),
        ]
    );
    assert!(
        finished.duration_ms < 8_000,
        "the two timed out side by side, not one after the other: {} ms",
        finished.duration_ms
    );
    let spans = spans(&h.fixture.runs());
    assert_eq!(most_at_once(&spans), 2, "{spans:#?}");
    for span in &spans {
        assert!(!process_alive(span.pid), "{} was killed", span.service);
    }
    worker.stop().await;
}

#[tokio::test]
async fn every_task_group_left_running_in_the_workspace_is_killed_before_the_next_sync() {
    let h = Harness::new().await;
    let workspace = h.workspace("ws");
    // What a worker that died running several tasks leaves: their groups and their records,
    // and the single record of an earlier version.
    let mut orphans: Vec<std::process::Child> = (0..3)
        .map(|_| {
            Command::new("sleep")
                .arg("60")
                .process_group(0)
                .spawn()
                .unwrap()
        })
        .collect();
    let groups = workspace.join(".sync.pgids");
    std::fs::create_dir_all(&groups).unwrap();
    std::fs::write(groups.join(orphans[0].id().to_string()), "").unwrap();
    std::fs::write(groups.join(orphans[1].id().to_string()), "").unwrap();
    std::fs::write(workspace.join(".sync.pgid"), orphans[2].id().to_string()).unwrap();
    let worker = h.start(&workspace, &["--sync-parallelism", "4"]);
    let (_, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;

    assert_eq!(h.finished_for(seq).await.state, FinishedState::Success);
    for orphan in &mut orphans {
        let status = orphan.try_wait().unwrap().expect("the orphan was killed");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
    assert_eq!(
        std::fs::read_dir(&groups).unwrap().count(),
        0,
        "no record left"
    );
    assert!(!workspace.join(".sync.pgid").exists());
    worker.stop().await;
}

/// True while the process exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_blocked_service_gets_its_own_error_status_at_github() {
    let github = FakeGithub::start().await;
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("worker", "DEPENDENCIES_FILE", MANIFEST);
    pipeline.set_env("worker", "SYNC_PARALLELISM", "2");
    pipeline.set_env("reporter", "STATUS_PER_SERVICE", "true");
    pipeline.fixture.write(
        MANIFEST,
        "version: 1\nservices:\n  platform/redis:\n    depends_on: ['platform/01.postgres/**']\n    after: [platform/postgres]\n",
    );
    pipeline.fixture.set_behaviour(POSTGRES, 0.0, 2);
    pipeline
        .fixture
        .commit("redis follows postgres, which fails");
    let _services = pipeline.start_all().await;

    let (commit, status, answer) = pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    assert_eq!(status, 200, "{answer}");
    // The gateway previews from IAC_RULES alone: the manifest is the worker's to read.
    assert_eq!(answer["services"], serde_json::json!(["platform/postgres"]));

    let final_wait = Duration::from_secs(60);
    let redis = github
        .wait_for_accepted(&commit, "IaC Runner / platform/redis", "error", final_wait)
        .await;
    let blocked = redis.iter().find(|r| r.state() == "error").unwrap();
    assert_eq!(blocked.description(), "Blocked: platform/postgres failed");
    github
        .wait_for_accepted(&commit, "IaC Runner / Sync", "failure", final_wait)
        .await;
    let sync = github.shown(&commit, "IaC Runner / Sync").unwrap();
    assert_eq!(sync.description(), "2/2 service(s) failed to sync");
    assert_eq!(
        github
            .shown(&commit, "IaC Runner / platform/postgres")
            .unwrap()
            .description(),
        "Failed with exit code 2"
    );
    assert_eq!(pipeline.fixture.finished_tasks(), ["postgres.sync"]);
}
