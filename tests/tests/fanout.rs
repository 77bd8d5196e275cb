//! Declared fan-out and ordered parallel syncs against real parts: a real nats-server, the
//! fixture monorepo in real git, and the pinned `invoke`. The dependency manifest is committed
//! in the fixture, so the worker reads it at the synced commit as it would in production.

use std::collections::BTreeMap;

use iac_shared::events::{FinishedState, SyncFinished, SyncOutcome};
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
    assert!(
        h.fixture.runs().is_empty(),
        "no task runs with a bad manifest: {:?}",
        started_tasks(&h)
    );

    // Mended, the next push runs.
    commit_manifest(&h, "version: 1\nservices: {}\n");
    let (_, seq) = h.push_change(&format!("{APP}/compose.yaml")).await;
    let finished = h.finished_for(seq).await;
    assert_eq!(
        outcomes(&finished),
        [("finance_report/app", SyncOutcome::Synced)]
    );
    worker.stop().await;
}
