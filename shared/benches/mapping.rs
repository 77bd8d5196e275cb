//! How long path rules take: mapping many changed paths to services, and discovering services
//! among a repository's files. (The gateway's whole per-request work, against HMAC alone, is
//! `cargo bench -p iac-gateway --bench request`.)

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use iac_shared::rules::Rules;

const SERVICES: usize = 1_000;
const PATHS: usize = 10_000;

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

criterion_group!(benches, mapping);
criterion_main!(benches);
