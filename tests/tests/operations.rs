//! What operators do with the streams: replay events and results, read the last syncs.

use std::time::Duration;

use iac_tests::fake_github::FakeGithub;
use iac_tests::fixture::TaskRun;
use iac_tests::pipeline::Pipeline;
use iac_tests::wait_for;

const POSTGRES: &str = "platform/01.postgres/compose.yaml";
const CONTEXT: &str = "IaC Runner / Sync";

fn ended(pipeline: &Pipeline, task: &str) -> Vec<TaskRun> {
    pipeline
        .fixture
        .runs()
        .into_iter()
        .filter(|r| r.phase == "end" && r.task.as_deref() == Some(task))
        .collect()
}

async fn wait_for_runs(pipeline: &Pipeline, task: &str, count: usize) -> Vec<TaskRun> {
    wait_for(
        &format!("{count} run(s) of {task}"),
        Duration::from_secs(60),
        || async {
            let runs = ended(pipeline, task);
            (runs.len() >= count).then_some(runs)
        },
    )
    .await
}

/// Runs a manual sync of redis and waits for it: everything queued before it has run.
async fn drain(pipeline: &Pipeline) {
    let before = ended(pipeline, "redis.sync").len();
    let (ok, out, err) = pipeline.operator("iac-worker", &["status"]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let client = pipeline.nats.as_ref().unwrap().client().await;
    let js = async_nats::jetstream::new(client);
    js.publish(
        "iac.events.sync",
        r#"{"services":["platform/redis"]}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_for_runs(pipeline, "redis.sync", before + 1).await;
}

#[tokio::test]
async fn replaying_by_sequence_runs_the_sync_again_and_force_reaches_the_task() {
    let pipeline = Pipeline::new("http://127.0.0.1:9");
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let (commit, status, _) = pipeline.push_change(POSTGRES).await;
    assert_eq!(status, 200);
    wait_for_runs(&pipeline, "postgres.sync", 1).await;

    let (ok, out, err) = pipeline.operator(
        "iac-worker",
        &["replay", "--from-seq", "1", "--to-seq", "1"],
    );
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let line = out.lines().nth(1).expect("one replayed line");
    assert!(line.starts_with("1\t"), "{out}");
    assert!(
        line.contains("iac.events.push") && line.contains(&commit),
        "{out}"
    );
    let runs = wait_for_runs(&pipeline, "postgres.sync", 2).await;
    assert_eq!(runs[1].commit.as_deref(), Some(commit.as_str()));
    assert!(!runs[1].force);

    let (ok, out, err) = pipeline.operator(
        "iac-worker",
        &["replay", "--from-seq", "1", "--to-seq", "1", "--force"],
    );
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let runs = wait_for_runs(&pipeline, "postgres.sync", 3).await;
    assert!(runs[2].force, "the forced replay did not reach the task");
}

#[tokio::test]
async fn a_dry_run_lists_what_would_be_replayed_and_runs_nothing() {
    let pipeline = Pipeline::new("http://127.0.0.1:9");
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let (commit, _, _) = pipeline.push_change(POSTGRES).await;
    wait_for_runs(&pipeline, "postgres.sync", 1).await;

    let (ok, out, err) =
        pipeline.operator("iac-worker", &["replay", "--from-seq", "1", "--dry-run"]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    assert!(out.contains(&commit), "{out}");
    assert!(err.contains("would replay 1 message"), "{err}");
    drain(&pipeline).await;
    assert_eq!(
        ended(&pipeline, "postgres.sync").len(),
        1,
        "a dry run ran a sync"
    );
}

#[tokio::test]
async fn replaying_since_a_time_takes_the_events_stored_after_it() {
    let pipeline = Pipeline::new("http://127.0.0.1:9");
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let (first, _, _) = pipeline.push_change(POSTGRES).await;
    wait_for_runs(&pipeline, "postgres.sync", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (second, _, _) = pipeline.push_change(POSTGRES).await;
    wait_for_runs(&pipeline, "postgres.sync", 2).await;

    let (ok, out, err) = pipeline.operator(
        "iac-worker",
        &["replay", "--since", &since, "--subject", "iac.events.push"],
    );
    assert!(ok, "stdout: {out}\nstderr: {err}");
    assert!(out.contains(&second) && !out.contains(&first), "{out}");
    let runs = wait_for_runs(&pipeline, "postgres.sync", 3).await;
    assert_eq!(runs[2].commit.as_deref(), Some(second.as_str()));

    let (ok, _, err) = pipeline.operator("iac-worker", &["replay", "--since", "yesterday"]);
    assert!(!ok && err.contains("RFC 3339"), "{err}");
    let (ok, _, err) = pipeline.operator(
        "iac-worker",
        &[
            "replay",
            "--from-seq",
            "1",
            "--subject",
            "iac.results.finished",
        ],
    );
    assert!(!ok && err.contains("iac.events.push"), "{err}");
}

#[tokio::test]
async fn status_shows_the_syncs_just_run_and_the_queue() {
    let pipeline = Pipeline::new("http://127.0.0.1:9");
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    pipeline.fixture.set_behaviour("platform/02.redis", 0.0, 4);
    let (commit, _, _) = pipeline.push_change("platform/02.redis/compose.yaml").await;
    wait_for_runs(&pipeline, "redis.sync", 1).await;

    let table = wait_for("the sync in status", Duration::from_secs(20), || async {
        let (ok, out, _) = pipeline.operator("iac-worker", &["status", "-n", "5"]);
        (ok && out.contains(&commit[..8])).then_some(out)
    })
    .await;
    let row = table.lines().find(|l| l.contains(&commit[..8])).unwrap();
    assert!(row.contains("push"), "{table}");
    assert!(row.contains("failure"), "{table}");
    assert!(row.contains("platform/redis=failed(4)"), "{table}");
    assert!(
        table
            .trim_end()
            .ends_with("queue: 0 waiting, 0 in progress"),
        "{table}"
    );
}

#[tokio::test]
async fn replaying_results_posts_the_statuses_again() {
    let github = FakeGithub::start().await;
    let pipeline = Pipeline::new(&github.url());
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let reporter = pipeline.start_reporter();
    let (commit, _, _) = pipeline.push_change(POSTGRES).await;
    let successes = || {
        github
            .accepted()
            .iter()
            .filter(|r| r.commit == commit && r.state() == "success" && r.context() == CONTEXT)
            .count()
    };
    wait_for("the success status", Duration::from_secs(60), || async {
        (successes() == 1).then_some(())
    })
    .await;

    let (ok, out, err) = pipeline.operator(
        "iac-reporter",
        &[
            "replay",
            "--from-seq",
            "1",
            "--subject",
            "iac.results.finished",
        ],
    );
    assert!(ok, "stdout: {out}\nstderr: {err}");
    assert!(out.contains(&commit), "{out}");
    wait_for(
        "the success status posted again",
        Duration::from_secs(60),
        || async { (successes() == 2).then_some(()) },
    )
    .await;
    let log = reporter.output();
    assert!(log.contains("a replayed message"), "{log}");
}

#[tokio::test]
async fn operator_commands_take_the_global_flags_on_either_side_and_help_lists_them() {
    let pipeline = Pipeline::new("http://127.0.0.1:9");
    // The gateway provisions the streams; the operator's environment has no GIT_REPO_URL.
    let _gateway = pipeline.start_gateway().await;
    for args in [
        &["--log-format", "json", "status", "-n", "1"][..],
        &["status", "-n", "1", "--log-format", "json"],
    ] {
        let (ok, out, err) = pipeline.operator("iac-worker", args);
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains("queue: 0 waiting"), "{args:?}: {out}");
    }
    // A flag before the command's name is the command's: this NATS URL is unreachable.
    let (ok, _, err) = pipeline.operator(
        "iac-worker",
        &["--nats-url", "nats://127.0.0.1:9", "status"],
    );
    assert!(
        !ok,
        "status used the environment's NATS_URL instead of the flag: {err}"
    );
    for (binary, commands) in [
        ("iac-worker", &["replay", "status"][..]),
        ("iac-reporter", &["replay"]),
    ] {
        let (ok, out, _) = pipeline.operator(binary, &["--help"]);
        assert!(ok, "{binary} --help");
        for command in commands {
            assert!(
                out.lines().any(|l| l.trim_start().starts_with(command)),
                "{binary} --help does not list {command}:\n{out}"
            );
        }
    }
}

#[tokio::test]
async fn replaying_an_environments_deployments_runs_them_there_again() {
    use iac_shared::deploy::{DeployRequest, deploy_subject, deployment_id, normalize_services};

    let pipeline = Pipeline::new("http://127.0.0.1:9");
    let _worker = pipeline.start_worker();
    let commit = pipeline.fixture.head();
    let services = normalize_services(Some(&["redis".to_string()]));
    let request = DeployRequest {
        deployment_id: deployment_id("staging", &commit, &services),
        env: "staging".into(),
        commit: commit.clone(),
        services,
        triggered_by: Some("operations test".into()),
        force: false,
    };
    let js = async_nats::jetstream::new(pipeline.nats.as_ref().unwrap().client().await);
    // Published straight to NATS, as the gateway would once the consumer exists (it takes only
    // what is stored after it).
    wait_for("the staging consumer", Duration::from_secs(30), || async {
        let stream = js.get_stream("IAC_EVENTS").await.ok()?;
        stream
            .consumer_info("iac-worker-staging")
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    js.publish(
        deploy_subject("staging"),
        serde_json::to_vec(&request).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let runs = wait_for_runs(&pipeline, "redis.sync", 1).await;
    assert_eq!(
        runs[0].env.get("DEPLOY_ENV").map(String::as_str),
        Some("staging")
    );

    let (ok, out, err) = pipeline.operator(
        "iac-worker",
        &[
            "replay",
            "--subject",
            "iac.events.deploy.staging",
            "--since",
            "1h",
            "--force",
        ],
    );
    assert!(ok, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("iac.events.deploy.staging") && out.contains(&commit),
        "{out}"
    );
    let runs = wait_for_runs(&pipeline, "redis.sync", 2).await;
    assert_eq!(
        runs[1].env.get("DEPLOY_ENV").map(String::as_str),
        Some("staging")
    );
    assert!(runs[1].force, "the forced replay did not reach the task");

    let (ok, _, err) = pipeline.operator(
        "iac-worker",
        &[
            "replay",
            "--subject",
            "iac.events.deploy.>",
            "--since",
            "1h",
        ],
    );
    assert!(!ok, "a wildcard was taken as a subject");
    assert!(err.contains("iac.events.deploy.*"), "{err}");
}
