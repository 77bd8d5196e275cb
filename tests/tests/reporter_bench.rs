//! Throughput of the reporter against a GitHub that answers every status in 50 ms: one
//! reporter process versus three sharing the consumer. Ignored by default; run with
//! `cargo nextest run -p iac-tests --test reporter_bench --run-ignored only --no-capture`.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use iac_reporter::Config;
use iac_shared::events::*;
use iac_shared::names::FINISHED_SUBJECT;
use iac_shared::nats::{StreamSettings, provision};
use iac_shared::shutdown;
use iac_tests::fake_github::{FakeGithub, Faults};
use iac_tests::nats::NatsServer;
use iac_tests::wait_for;

const STATUSES: u64 = 240;

fn finished(event_seq: u64) -> SyncFinished {
    SyncFinished {
        event_id: format!("event-{event_seq}"),
        event_seq,
        trigger: Trigger::Push,
        repository: Some("acme/infra".into()),
        commit: Some(format!("{:040x}", 0xbe9c_0000_u64 + event_seq)),
        state: FinishedState::Success,
        services: vec![],
        totals: Totals::default(),
        error: None,
        duration_ms: 1,
        replay_of: None,
        finished_at: now_rfc3339(),
        env: None,
        deployment_id: None,
        superseded_by: None,
    }
}

/// Statuses per second posted by `reporters` processes (in-process tasks) sharing the work.
async fn statuses_per_second(reporters: usize) -> f64 {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    provision(&js, &StreamSettings::default()).await.unwrap();
    let github = FakeGithub::start().await;
    github.set_faults(Faults {
        latency: Duration::from_millis(50),
        ..Faults::default()
    });
    for seq in 1..=STATUSES {
        let body = serde_json::to_vec(&finished(seq)).unwrap();
        js.publish(FINISHED_SUBJECT, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let begin = Instant::now();
    let mut triggers = Vec::new();
    for _ in 0..reporters {
        let config = Config::from_args([
            "iac-reporter",
            "--nats-url",
            &nats.url(),
            "--github-api-url",
            &github.url(),
            "--github-token",
            "ghp_bench",
        ])
        .unwrap();
        let (trigger, shutdown) = shutdown::channel();
        tokio::spawn(iac_reporter::run(config, shutdown));
        triggers.push(trigger);
    }
    wait_for("every status posted", Duration::from_secs(120), || {
        let done = github.accepted().len() as u64 >= STATUSES;
        async move { done.then_some(()) }
    })
    .await;
    let elapsed = begin.elapsed();
    for trigger in triggers {
        trigger.trigger();
    }
    STATUSES as f64 / elapsed.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: prints figures"]
async fn three_reporters_post_about_three_times_as_fast_as_one() {
    let one = statuses_per_second(1).await;
    let three = statuses_per_second(3).await;
    println!(
        "{STATUSES} statuses, GitHub latency 50 ms, REPORTER_CONCURRENCY 8: \
         1 reporter {one:.0}/s, 3 reporters {three:.0}/s ({:.2}x)",
        three / one
    );
    assert!(three > one * 2.0, "1: {one:.0}/s, 3: {three:.0}/s");
}
