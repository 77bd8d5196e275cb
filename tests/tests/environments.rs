//! Deployments to named environments against real parts: a real nats-server, the fixture
//! monorepo in real git and the pinned `invoke`. Deployments are stored on
//! `iac.events.deploy.<env>` as the gateway stores them; the tests read back what the tasks
//! recorded, the results and the summaries in `IAC_DEPLOYMENTS`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::consumer;
use iac_shared::deploy::{
    DeploymentStatus, DeploymentSummary, deploy_subject, deployment_id, normalize_services,
};
use iac_shared::events::{FinishedState, SyncOutcome, Trigger};
use iac_shared::names::*;
use iac_shared::nats::{StreamSettings, ensure_deployments_bucket};
use iac_tests::fixture::{Fixture, TaskRun};
use iac_tests::worker_harness::WorkerHarness as Harness;

const POSTGRES: &str = "platform/01.postgres";
const REDIS: &str = "platform/02.redis";
const RULE: &str = "is not on main nor on a tag matching v*";

/// One task process: its start record and when it ended.
#[derive(Debug)]
struct Run {
    task: String,
    commit: String,
    cwd: String,
    env: BTreeMap<String, String>,
    start: f64,
    end: Option<f64>,
}

fn runs(fixture: &Fixture) -> Vec<Run> {
    let records: Vec<TaskRun> = fixture.runs();
    let mut runs: Vec<Run> = records
        .iter()
        .filter(|r| r.phase == "start")
        .map(|r| Run {
            task: r.task.clone().unwrap_or_default(),
            commit: r.commit.clone().unwrap_or_default(),
            cwd: r.cwd.clone(),
            env: r.env.clone(),
            start: r.t,
            end: records
                .iter()
                .find(|e| e.phase == "end" && e.pid == r.pid)
                .map(|e| e.t),
        })
        .collect();
    runs.sort_by(|a, b| a.start.total_cmp(&b.start));
    runs
}

/// The run of `task` in environment `env` (by the `DEPLOY_ENV` it saw).
fn run_in<'a>(runs: &'a [Run], task: &str, env: &str) -> &'a Run {
    runs.iter()
        .find(|r| r.task == task && r.env.get("DEPLOY_ENV").map(String::as_str) == Some(env))
        .unwrap_or_else(|| panic!("no run of {task} in {env}: {runs:#?}"))
}

fn git(work: &Path, args: &[&str]) -> String {
    iac_tests::fixture::git(work, args).trim().to_string()
}

/// A commit that only a branch other than `main` holds, pushed to the remote; the work tree is
/// back on `main` afterwards.
fn commit_on_branch(fixture: &Fixture, branch: &str) -> String {
    let work = fixture.work_tree();
    git(work, &["checkout", "-q", "-b", branch]);
    std::fs::write(work.join(format!("{branch}.txt")), "unmerged\n").unwrap();
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", branch]);
    git(work, &["push", "-q", "origin", branch]);
    let commit = git(work, &["rev-parse", "HEAD"]);
    git(work, &["checkout", "-q", "main"]);
    commit
}

#[tokio::test]
async fn a_slow_staging_deployment_does_not_delay_production_and_each_environment_runs_one_at_a_time()
 {
    let h = Harness::new().await;
    h.fixture.set_behaviour(REDIS, 4.0, 0);
    let commit = h.fixture.commit("redis takes its time");
    let workspace = h.workspace("ws");
    let worker = h.start(&workspace, &[]);

    let (slow, _) = h.deploy("staging", &commit, Some(&["redis"])).await;
    let (queued, _) = h.deploy("staging", &commit, Some(&["postgres"])).await;
    h.wait_for(
        "the slow staging task to start",
        Duration::from_secs(60),
        || async { (!runs(&h.fixture).is_empty()).then_some(()) },
    )
    .await;
    let (production, _) = h.deploy("production", &commit, Some(&["postgres"])).await;

    let finished = h.finished_for(production).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(finished.env.as_deref(), Some("production"));
    assert_eq!(finished.trigger, Trigger::Deploy);
    for seq in [slow, queued] {
        assert_eq!(h.finished_for(seq).await.state, FinishedState::Success);
    }

    let runs = runs(&h.fixture);
    let staging_redis = run_in(&runs, "redis.sync", "staging");
    let staging_postgres = run_in(&runs, "postgres.sync", "staging");
    let production_postgres = run_in(&runs, "postgres.sync", "production");
    let slow_end = staging_redis.end.expect("the slow task ended");
    assert!(
        production_postgres.start < slow_end,
        "production waited for staging: {runs:#?}"
    );
    assert!(
        staging_postgres.start >= slow_end,
        "two staging deployments ran at once: {runs:#?}"
    );
    // Each environment in its own checkout; production, the push environment, in the one
    // pushes always used.
    let checkout = workspace.join("infra");
    assert!(
        Path::new(&production_postgres.cwd).starts_with(&checkout),
        "{runs:#?}"
    );
    assert!(
        Path::new(&staging_redis.cwd).starts_with(workspace.join("@staging")),
        "{runs:#?}"
    );
    assert!(runs.iter().all(|r| r.commit == commit));

    // What the original runner's tasks were given.
    let vars = |run: &Run| {
        ["DEPLOY_ENV", "ENV_SUFFIX", "ENV_DOMAIN_SUFFIX"].map(|n| run.env.get(n).cloned())
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        vars(staging_redis),
        [some("staging"), some("-staging"), some("-staging")]
    );
    assert_eq!(
        vars(production_postgres),
        [some("production"), some(""), some("")]
    );
    worker.stop().await;
}

#[tokio::test]
async fn short_names_are_resolved_and_the_final_summary_keeps_what_the_gateway_accepted() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let commit = h.fixture.head();
    // The gateway's `in_progress` summary, written when it accepted the request.
    let services = normalize_services(Some(&["redis".into(), "platform/postgres".into()]));
    let id = deployment_id("staging", &commit, &services);
    let accepted = DeploymentSummary {
        status: DeploymentStatus::InProgress,
        deployment_id: id.clone(),
        env: "staging".into(),
        commit: commit.clone(),
        triggered_by: Some("release workflow".into()),
        requested_services: services.clone(),
        accepted_at: "2026-01-02T03:04:05Z".into(),
        updated_at: "2026-01-02T03:04:05Z".into(),
        result: None,
    };
    // The summary the gateway writes when it accepts (it creates the bucket when it is first).
    let bucket = ensure_deployments_bucket(&h.js, &StreamSettings::default())
        .await
        .unwrap();
    bucket
        .put(&id, serde_json::to_vec(&accepted).unwrap().into())
        .await
        .unwrap();

    let (seq, published_id) = h
        .deploy("staging", &commit, Some(&["redis", "platform/postgres"]))
        .await;
    assert_eq!(published_id, id);
    let finished = h.finished_for(seq).await;
    assert_eq!(finished.deployment_id.as_deref(), Some(id.as_str()));
    let ran: Vec<&str> = finished
        .services
        .iter()
        .map(|s| s.service.as_str())
        .collect();
    assert_eq!(ran, ["platform/postgres", "platform/redis"]);

    let summary = h.final_summary(&id).await;
    assert_eq!(summary.status, DeploymentStatus::Completed, "{summary:#?}");
    assert_eq!(summary.accepted_at, "2026-01-02T03:04:05Z");
    assert_eq!(summary.triggered_by.as_deref(), Some("release workflow"));
    let result = summary.result.expect("the result");
    assert!(result.success);
    assert_eq!(result.commit.as_deref(), Some(commit.as_str()));
    let outcomes: Vec<(&str, SyncOutcome)> = result
        .services
        .iter()
        .map(|s| (s.service.as_str(), s.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("platform/postgres", SyncOutcome::Synced),
            ("platform/redis", SyncOutcome::Synced)
        ]
    );

    // A name no service has is reported unknown, and the deployment failed.
    let (seq, id) = h.deploy("staging", &commit, Some(&["mongo"])).await;
    let finished = h.finished_for(seq).await;
    assert_eq!(finished.services[0].service, "mongo");
    assert_eq!(finished.services[0].outcome, SyncOutcome::Unknown);
    let summary = h.final_summary(&id).await;
    assert_eq!(summary.status, DeploymentStatus::Failed, "{summary:#?}");
    worker.stop().await;
}

#[tokio::test]
async fn an_unmerged_commit_is_refused_with_nothing_run_and_a_failed_summary() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let unmerged = commit_on_branch(&h.fixture, "feature");

    let (seq, id) = h.deploy("staging", &unmerged, None).await;
    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Error, "{finished:#?}");
    let error = finished.error.clone().unwrap();
    assert!(error.contains(RULE), "{error}");
    assert!(error.contains(&unmerged), "{error}");
    let summary = h.final_summary(&id).await;
    assert_eq!(summary.status, DeploymentStatus::Failed);
    assert!(
        summary.result.unwrap().error.unwrap().contains(RULE),
        "the summary names the rule"
    );

    // A deployment naming a branch instead of a commit is refused before anything is fetched.
    let (seq, id) = h.deploy("staging", "main", None).await;
    let error = h.finished_for(seq).await.error.unwrap_or_default();
    assert!(error.contains("not an exact commit"), "{error}");
    assert_eq!(h.final_summary(&id).await.status, DeploymentStatus::Failed);

    // A manual sync may not name it either: not by id, not by its branch.
    for git_ref in [unmerged.as_str(), "feature", "refs/pull/1/head"] {
        let body = format!(r#"{{"all": true, "ref": "{git_ref}"}}"#);
        let seq = h.publish_bare(SYNC_SUBJECT, &body).await;
        let finished = h.finished_for(seq).await;
        assert_eq!(finished.state, FinishedState::Error, "{git_ref}");
        let error = finished.error.unwrap();
        assert!(error.contains(RULE), "{git_ref}: {error}");
    }
    assert!(runs(&h.fixture).is_empty(), "a refused commit ran");

    // The branch itself, by name, still syncs.
    let seq = h
        .publish_bare(
            SYNC_SUBJECT,
            r#"{"services": ["platform/redis"], "ref": "main"}"#,
        )
        .await;
    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(finished.commit.as_deref(), Some(h.fixture.head().as_str()));
    worker.stop().await;
}

#[tokio::test]
async fn a_commit_on_a_matching_tag_is_deployed_and_one_on_another_tag_is_not() {
    let h = Harness::new().await;
    let worker = h.start(&h.workspace("ws"), &[]);
    let work = h.fixture.work_tree().to_path_buf();
    let released = commit_on_branch(&h.fixture, "release");
    git(
        &work,
        &["tag", "-a", "-m", "release 2", "v2.0.0", &released],
    );
    git(&work, &["push", "-q", "origin", "v2.0.0"]);
    git(&work, &["push", "-q", "origin", "--delete", "release"]);
    let tag_object = git(&work, &["rev-parse", "v2.0.0"]);
    assert_ne!(tag_object, released);
    let beta = commit_on_branch(&h.fixture, "beta");
    git(&work, &["tag", "beta-1", &beta]);
    git(&work, &["push", "-q", "origin", "beta-1"]);
    git(&work, &["push", "-q", "origin", "--delete", "beta"]);

    let (seq, id) = h.deploy("production", &released, Some(&["postgres"])).await;
    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(
        h.final_summary(&id).await.status,
        DeploymentStatus::Completed
    );

    // A sync naming the tag, or the tag object's id, runs the tagged commit.
    for git_ref in ["v2.0.0", tag_object.as_str()] {
        let body = format!(r#"{{"services": ["platform/postgres"], "ref": "{git_ref}"}}"#);
        let seq = h.publish_bare(SYNC_SUBJECT, &body).await;
        let finished = h.finished_for(seq).await;
        assert_eq!(
            finished.state,
            FinishedState::Success,
            "{git_ref}: {finished:#?}"
        );
        assert_eq!(finished.commit.as_deref(), Some(released.as_str()));
    }

    let (seq, _) = h.deploy("staging", &beta, None).await;
    let error = h.finished_for(seq).await.error.unwrap_or_default();
    assert!(error.contains(RULE), "{error}");
    let ran: Vec<String> = runs(&h.fixture).into_iter().map(|r| r.commit).collect();
    assert_eq!(ran, [released.as_str(); 3]);
    worker.stop().await;
}

#[tokio::test]
async fn with_an_empty_push_env_pushes_run_as_before_and_every_environment_apart() {
    let h = Harness::new().await;
    let workspace = h.workspace("ws");
    let worker = h.start(&workspace, &["--push-env", ""]);

    let (commit, seq) = h.push_change(&format!("{POSTGRES}/compose.yaml")).await;
    let finished = h.finished_for(seq).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(finished.env, None);
    let (deployed, _) = h.deploy("production", &commit, Some(&["redis"])).await;
    assert_eq!(
        h.finished_for(deployed).await.env.as_deref(),
        Some("production")
    );

    let runs = runs(&h.fixture);
    let pushed = runs.iter().find(|r| r.task == "postgres.sync").unwrap();
    assert!(
        !pushed.env.keys().any(|k| k.contains("ENV_")),
        "a push got an environment: {:?}",
        pushed.env
    );
    assert!(Path::new(&pushed.cwd).starts_with(workspace.join("infra")));
    let production = run_in(&runs, "redis.sync", "production");
    assert!(
        Path::new(&production.cwd).starts_with(workspace.join("@production")),
        "{runs:#?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn an_iac_worker_consumer_from_before_environments_is_given_its_filters() {
    let h = Harness::new().await;
    let events = h.js.get_stream(EVENTS_STREAM).await.unwrap();
    events.delete_consumer(WORKER_CONSUMER).await.unwrap();
    events
        .create_consumer(consumer::pull::Config {
            durable_name: Some(WORKER_CONSUMER.into()),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1,
            max_deliver: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    let worker = h.start(&h.workspace("ws"), &[]);

    let (_, seq) = h.push_change(&format!("{REDIS}/compose.yaml")).await;
    assert_eq!(h.finished_for(seq).await.state, FinishedState::Success);
    let info =
        h.js.get_stream(EVENTS_STREAM)
            .await
            .unwrap()
            .consumer_info(WORKER_CONSUMER)
            .await
            .unwrap()
            .clone();
    assert_eq!(
        info.config.filter_subjects,
        [
            PUSH_SUBJECT.to_string(),
            SYNC_SUBJECT.to_string(),
            deploy_subject("production")
        ]
    );
    worker.stop().await;
}
