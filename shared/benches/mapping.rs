//! How long the gateway's per-request work takes: mapping many changed paths to services,
//! and verifying + parsing + mapping a typical push compared with verifying its HMAC alone.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use iac_shared::rules::Rules;
use iac_shared::signature::{sign, verify};
use serde::Deserialize;

const SERVICES: usize = 1_000;
const PATHS: usize = 10_000;
const SECRET: &[u8] = b"bench-secret";

/// 10,000 changed paths spread over 1,000 services, with some shared and ignored paths.
fn changed_paths() -> Vec<String> {
    (0..PATHS)
        .map(|i| match i % 50 {
            0 => format!("libs/module_{i}.py"),
            1 => format!("bootstrap/01.vault/policy_{i}.hcl"),
            2 => format!("docs/page_{i}.md"),
            _ if i % 2 == 0 => format!(
                "platform/{:03}.svc{}/config/file_{i}.yaml",
                i % SERVICES,
                i % SERVICES
            ),
            _ => format!(
                "finance_report/finance_report/{:03}.app{}/settings_{i}.env",
                i % SERVICES,
                i % SERVICES
            ),
        })
        .collect()
}

/// A push payload of about 8 KB, shaped like GitHub's.
fn push_body() -> Vec<u8> {
    let commits: Vec<serde_json::Value> = (0..20)
        .map(|c| {
            serde_json::json!({
                "id": format!("{c:040x}"),
                "message": "update service configuration",
                "timestamp": "2024-05-15T17:19:02+02:00",
                "author": {"name": "The Octocat", "email": "octocat@github.com", "username": "octocat"},
                "added": [format!("platform/{c:02}.svc{c}/compose.yaml")],
                "modified": [format!("platform/{c:02}.svc{c}/deploy.py"), "libs/common.py"],
                "removed": [format!("finance_report/finance_report/{c:02}.app{c}/old.env")],
            })
        })
        .collect();
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "before": "9049f1265b7d61be4a8904a9a27120d2064dab3b",
        "after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        "repository": {"full_name": "acme/infra", "name": "infra", "private": true},
        "pusher": {"name": "octocat", "email": "octocat@github.com"},
        "commits": commits,
        "head_commit": {"id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", "added": [], "modified": [], "removed": []},
    });
    serde_json::to_vec(&body).unwrap()
}

#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    _git_ref: String,
    commits: Vec<Commit>,
}

#[derive(Deserialize)]
struct Commit {
    added: Vec<String>,
    modified: Vec<String>,
    removed: Vec<String>,
}

fn mapping(c: &mut Criterion) {
    let rules = Rules::default();
    let paths = changed_paths();
    c.bench_function("map_paths 10k paths over 1k services", |b| {
        b.iter(|| rules.map_paths(black_box(&paths).iter().map(String::as_str)))
    });
    let files: Vec<String> = (0..SERVICES)
        .flat_map(|i| {
            [
                format!("platform/{i:03}.svc{i}/deploy.py"),
                format!("platform/{i:03}.svc{i}/compose.yaml"),
            ]
        })
        .collect();
    c.bench_function("discover 1k services among 2k files", |b| {
        b.iter(|| rules.discover(black_box(&files).iter().map(String::as_str)))
    });
}

fn push_request(c: &mut Criterion) {
    let rules = Rules::default();
    let body = push_body();
    assert!(
        (7_000..10_000).contains(&body.len()),
        "{} bytes",
        body.len()
    );
    let signature = sign(SECRET, &body);
    let mut group = c.benchmark_group("8 KB push");
    group.bench_function("verify HMAC only", |b| {
        b.iter(|| verify(SECRET, black_box(&body), Some(&signature)))
    });
    group.bench_function("verify + parse + map", |b| {
        b.iter(|| {
            assert!(verify(SECRET, black_box(&body), Some(&signature)));
            let push: Push = serde_json::from_slice(&body).unwrap();
            let paths = push
                .commits
                .iter()
                .flat_map(|c| c.added.iter().chain(&c.modified).chain(&c.removed));
            rules.map_paths(paths.map(String::as_str))
        })
    });
    group.finish();
}

criterion_group!(benches, mapping, push_request);
criterion_main!(benches);
