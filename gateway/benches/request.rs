//! The gateway's in-process work for one push, against its ceiling: verifying the HMAC alone
//! over the same bytes. "Whole request" is what `POST /webhook` does between reading the body
//! and publishing: verify the signature, take the JSON, decide (parse, branch check, map the
//! listed paths to the preview), and serialize the event that is stored. A second floor is
//! shown for orientation: serde_json validating the body without keeping anything. For a
//! deployment request, "whole request" is what `POST /deploy` does in process: check the
//! timestamped signature, read the request, compute its id and serialize the event.
//!
//! `cargo bench -p iac-gateway --bench request`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use iac_gateway::deploy::parse_call;
use iac_gateway::webhook::{Decision, decide, payload_json, serialize_within};
use iac_shared::rules::Rules;
use iac_shared::signature::{sign, sign_timestamped, verify, verify_timestamped};

const SECRET: &[u8] = b"bench-secret";
/// The default `max_payload` of nats-server less the room the gateway keeps for headers.
const PAYLOAD_LIMIT: usize = (1 << 20) - 4096;

/// A push shaped like GitHub's: `commits` commits, each touching `paths_per_commit` files in
/// one of 40 services (some in `libs/`), with the fields GitHub sends and the runner ignores.
fn push_body(commits: usize, paths_per_commit: usize) -> Vec<u8> {
    let person = serde_json::json!({
        "name": "The Octocat", "email": "octocat@github.com", "username": "octocat"
    });
    let commits: Vec<serde_json::Value> = (0..commits)
        .map(|c| {
            let service = format!("platform/{:02}.svc{}", c % 40, c % 40);
            let files = |kind: &str, n: usize| -> Vec<String> {
                (0..n)
                    .map(|i| match i % 10 {
                        9 => format!("libs/iac/{kind}_{c}_{i}.py"),
                        _ => format!("{service}/config/{kind}_{c}_{i}.yaml"),
                    })
                    .collect()
            };
            let id = format!("{c:040x}");
            serde_json::json!({
                "id": id,
                "tree_id": format!("{:040x}", c + 1),
                "distinct": true,
                "message": "Update the service configuration\n\nRoll the new settings out.",
                "timestamp": "2026-05-15T17:19:02+02:00",
                "url": format!("https://github.com/acme/infra/commit/{id}"),
                "author": person,
                "committer": person,
                "added": files("added", paths_per_commit / 4),
                "modified": files("modified", paths_per_commit / 2),
                "removed": files("removed", paths_per_commit - paths_per_commit / 4 - paths_per_commit / 2),
            })
        })
        .collect();
    let head = commits.last().cloned().unwrap_or_default();
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "before": "9049f1265b7d61be4a8904a9a27120d2064dab3b",
        "after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        "created": false, "deleted": false, "forced": false,
        "base_ref": null,
        "compare": "https://github.com/acme/infra/compare/9049f1265b7d...0d1a26e67d8f",
        "repository": {
            "id": 1296269, "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5", "name": "infra",
            "full_name": "acme/infra", "private": true, "default_branch": "main",
            "owner": {"login": "acme", "id": 1, "type": "Organization"}
        },
        "pusher": {"name": "octocat", "email": "octocat@github.com"},
        "sender": {"login": "octocat", "id": 583231, "type": "User", "site_admin": false},
        "commits": commits,
        "head_commit": head,
    });
    serde_json::to_vec(&body).unwrap()
}

/// Everything `POST /webhook` does with a body before publishing it.
fn whole_request(body: &[u8], signature: &str, rules: &Rules) -> Vec<u8> {
    assert!(verify(SECRET, body, Some(signature)));
    let json = payload_json(Some("application/json"), body).unwrap();
    let Ok(Decision::Store(mut plan)) = decide(Some("push"), &json, "d-1", "main", rules) else {
        panic!("a push to main is stored");
    };
    serialize_within(&mut plan.event, PAYLOAD_LIMIT).unwrap()
}

fn push_request(c: &mut Criterion) {
    let rules = Rules::default();
    for (name, commits, paths, range) in [
        ("8 KB push", 8, 8, 7_000..10_000),
        ("1 MB push", 200, 95, 900_000..1_200_000),
    ] {
        let body = push_body(commits, paths);
        assert!(range.contains(&body.len()), "{name}: {} bytes", body.len());
        let signature = sign(SECRET, &body);
        assert!(!whole_request(&body, &signature, &rules).is_empty());
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("verify HMAC only", |b| {
            b.iter(|| verify(SECRET, black_box(&body), Some(&signature)))
        });
        // The least any JSON reading costs: serde_json checking the body and keeping nothing.
        group.bench_function("JSON validation only", |b| {
            b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).unwrap())
        });
        group.bench_function("whole request", |b| {
            b.iter(|| whole_request(black_box(&body), &signature, &rules))
        });
        group.finish();
    }
}

/// Everything `POST /deploy` does with a body in process (the nonce and the summary are
/// NATS round trips, measured by `cargo bench -p iac-tests --bench gateway`).
fn whole_deploy(body: &[u8], signature: &str, envs: &[String]) -> Vec<u8> {
    let now = 1_767_225_600;
    verify_timestamped(
        SECRET,
        body,
        Some(signature),
        Some("1767225600"),
        Some("0123456789abcdef0123456789abcdef"),
        now,
    )
    .unwrap();
    let call = parse_call(body, envs).unwrap();
    let request = iac_shared::deploy::DeployRequest {
        deployment_id: call.deployment_id(),
        env: call.env.clone(),
        commit: call.commit.clone(),
        services: call.normalized_services(),
        triggered_by: Some(call.triggered_by),
        force: false,
    };
    serde_json::to_vec(&request).unwrap()
}

fn deploy_request(c: &mut Criterion) {
    let envs = vec!["staging".to_string(), "production".to_string()];
    let body = br#"{"env":"staging","ref":"0123456789abcdef0123456789abcdef01234567","triggered_by":"deploy_v2","wait":false,"services":["redis"]}"#;
    let signature = sign_timestamped(
        SECRET,
        "1767225600",
        "0123456789abcdef0123456789abcdef",
        body,
    );
    assert!(!whole_deploy(body, &signature, &envs).is_empty());
    let plain = sign(SECRET, body);
    let mut group = c.benchmark_group("deploy request");
    group.bench_function("verify HMAC only", |b| {
        b.iter(|| verify(SECRET, black_box(body), Some(&plain)))
    });
    group.bench_function("whole request", |b| {
        b.iter(|| whole_deploy(black_box(body), &signature, &envs))
    });
    group.finish();
}

criterion_group!(benches, push_request, deploy_request);
criterion_main!(benches);
