//! What `sync_interval: always` (fsync every JetStream write) costs: events stored per second,
//! published with ack at 16 in flight, by one nats-server with the default (fsync every two
//! minutes) and by one with `sync_interval: always`, in the same run.
//!
//! `cargo bench -p iac-tests --bench durability` measures; without `--bench` (as
//! `cargo test --benches` runs it) it does a tiny run to prove it works.

use std::time::Instant;

use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use iac_shared::names::PUSH_SUBJECT;
use iac_shared::nats::{StreamSettings, provision};
use iac_tests::nats::NatsServer;

const IN_FLIGHT: usize = 16;

async fn events_per_second(jetstream_options: &str, events: usize, payload: &[u8]) -> f64 {
    let server = NatsServer::start_with_jetstream_options(jetstream_options);
    let js = jetstream::new(server.client().await);
    provision(&js, &StreamSettings::default()).await.unwrap();
    let payload = bytes::Bytes::copy_from_slice(payload);
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for i in 0..events {
        let js = js.clone();
        let payload = payload.clone();
        in_flight.push(async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("bench-{i}").as_str());
            js.publish_with_headers(PUSH_SUBJECT, headers, payload)
                .await
                .unwrap()
                .await
                .unwrap()
        });
        if in_flight.len() >= IN_FLIGHT {
            in_flight.next().await;
        }
    }
    while in_flight.next().await.is_some() {}
    events as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let events = if measuring { 5_000 } else { 50 };
    let payload = vec![b'x'; 2048];
    let mut default = Vec::new();
    let mut always = Vec::new();
    // Alternate the two, three rounds each, so drift on a shared machine hits both alike.
    for _ in 0..if measuring { 3 } else { 1 } {
        default.push(events_per_second("", events, &payload).await);
        always.push(events_per_second("sync_interval: always", events, &payload).await);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (d, a) = (median(&mut default), median(&mut always));
    println!("durability: {events} events of 2 KiB, {IN_FLIGHT} in flight, median of rounds");
    println!("  default (fsync every 2 min): {d:>9.0} events/s");
    println!("  sync_interval: always:       {a:>9.0} events/s");
    println!("  ratio always/default:        {:>9.2}", a / d);
}
