//! The runner past one machine: a three-node NATS cluster with `STREAM_REPLICAS=3`, and the node
//! the gateway is connected to killed while pushes keep coming. Every push answered 200 is
//! synced; a push answered 503 during the fail-over is redelivered, as GitHub lets an operator.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use iac_shared::events::{FinishedState, SyncFinished};
use iac_shared::names::FINISHED_SUBJECT;
use iac_shared::nats::{ConsumerSettings, StreamSettings, provision_all};
use iac_tests::nats::{NatsCluster, cluster_password};
use iac_tests::pipeline::Pipeline;
use iac_tests::wait_for;
use iac_tests::worker_harness::results;

#[tokio::test]
async fn pushes_survive_killing_the_node_the_gateway_is_connected_to() {
    let mut cluster = NatsCluster::start();
    let js = jetstream::new(cluster.connect_as("admin").await);
    let settings = StreamSettings {
        replicas: 3,
        ..Default::default()
    };
    wait_for(
        "the cluster to hold R3 streams",
        Duration::from_secs(30),
        || {
            let (js, settings) = (js.clone(), settings.clone());
            async move {
                provision_all(&js, &settings, &ConsumerSettings::default())
                    .await
                    .ok()
            }
        },
    )
    .await;

    // GitHub is not needed here: the reporter does not run.
    let mut pipeline = Pipeline::with_nats("http://127.0.0.1:9", &cluster.urls(), 3);
    for user in ["gateway", "worker"] {
        pipeline.set_env(user, "NATS_USER", user);
        pipeline.set_env(user, "NATS_PASSWORD", cluster_password(user));
    }
    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker();
    let node = wait_for(
        "the gateway's NATS connection",
        Duration::from_secs(10),
        || cluster.node_of_client("iac-gateway"),
    )
    .await;

    let mut accepted = Vec::new();
    let mut unavailable = 0;
    for i in 0..10 {
        if i == 3 {
            cluster.kill_node(node);
        }
        let (commit, delivery, payload) =
            pipeline.commit_change("platform/01.postgres/compose.yaml");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, answer) = pipeline.webhook("push", &delivery, &payload).await;
            match status {
                200 => break,
                503 => unavailable += 1,
                other => panic!("push {i} answered {other}: {answer}"),
            }
            assert!(Instant::now() < deadline, "push {i} never stored");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        accepted.push(commit);
    }

    // Each accepted push ends synced: on its own, or as part of a newer one queued behind it
    // (its result then names the commit synced); the last one always runs.
    let wanted: BTreeSet<String> = accepted.iter().cloned().collect();
    wait_for(
        "every accepted push synced",
        Duration::from_secs(120),
        || async {
            let synced: BTreeSet<String> = results::<SyncFinished>(&js, FINISHED_SUBJECT)
                .await
                .into_iter()
                .map(|(_, finished)| finished)
                .filter(|f| f.state == FinishedState::Success)
                .filter_map(|f| f.commit)
                .collect();
            wanted.is_subset(&synced).then_some(())
        },
    )
    .await;
    let last = accepted.last().unwrap();
    let runs = pipeline.fixture.runs();
    assert!(
        runs.iter().any(|r| r.commit.as_ref() == Some(last)),
        "the last push ran: {runs:?}"
    );
    eprintln!("{unavailable} answers were 503 during the fail-over");
}
