//! The README is part of the product: the names and variables it shows are the ones the code uses.

use std::collections::BTreeSet;
use std::process::Command;

use iac_shared::names::*;
use iac_tests::tools::{project_binary, workspace_root};

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md")
}

const NAMES: &[&str] = &[
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    PUSH_SUBJECT,
    SYNC_SUBJECT,
    RESULTS_STREAM,
    RESULTS_SUBJECTS,
    STARTED_SUBJECT,
    FINISHED_SUBJECT,
    TASK_STARTED_SUBJECT,
    WORKER_CONSUMER,
    REPORTER_CONSUMER,
    REPORTER_EVENTS_CONSUMER,
    STATUS_BUCKET,
    APPLIED_BUCKET,
    SOURCE_HEADER,
    RECONCILE_SOURCE,
    NOTIFY_BUCKET,
    UNDELIVERED_STREAM,
    UNDELIVERED_SUBJECTS,
    UNDELIVERED_STATUS_SUBJECT,
    DEPLOYMENTS_BUCKET,
    NONCES_BUCKET,
    EVENT_ID_HEADER,
    REPLAY_OF_HEADER,
    FORCE_HEADER,
    MSG_ID_HEADER,
    RUNLOGS_STREAM,
    RUNLOGS_SUBJECTS,
    RUN_LINKS_BUCKET,
    SERVICE_HEADER,
    ATTEMPT_HEADER,
];

#[test]
fn readme_documents_every_stream_subject_consumer_and_header() {
    let readme = readme();
    for name in NAMES {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README does not document {name}"
        );
    }
    let deploy_subject = format!("`{DEPLOY_SUBJECT_PREFIX}.<env>`");
    assert!(
        readme.contains(&deploy_subject),
        "README does not document {deploy_subject}"
    );
}

#[test]
fn readme_nats_cli_lines_use_the_names_the_code_uses() {
    let readme = readme();
    let known: BTreeSet<&str> = NAMES.iter().copied().collect();
    let mut checked = 0;
    for line in readme
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("nats "))
    {
        let command = line.split('#').next().unwrap();
        for word in command.split_whitespace() {
            let word = word.trim_matches(|c| c == '\'' || c == '"');
            let looks_like_a_name =
                word.starts_with("IAC_") || word.starts_with("iac.") || word.starts_with("iac-");
            if looks_like_a_name {
                assert!(
                    known.contains(word),
                    "README line {line:?} names unknown {word:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 8,
        "expected the README to show the nats CLI lines, found {checked} names"
    );
}

/// The `[env: NAME=…]` variables a binary's `--help` lists.
fn env_vars_in_help(binary: &str) -> BTreeSet<String> {
    let output = Command::new(project_binary(binary))
        .arg("--help")
        .env_clear()
        .output()
        .expect("running --help");
    let help = String::from_utf8_lossy(&output.stdout);
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().to_string())
        .collect()
}

#[test]
fn every_environment_variable_in_help_is_in_the_readme() {
    let readme = readme();
    for binary in ["iac-gateway", "iac-worker", "iac-reporter"] {
        let vars = env_vars_in_help(binary);
        assert!(
            vars.contains("NATS_URL"),
            "{binary} --help lists no NATS_URL"
        );
        for var in vars {
            assert!(
                readme.contains(&format!("`{var}`")),
                "{binary} reads {var}, the README does not document it"
            );
        }
    }
}

#[test]
fn readme_shows_the_two_commands_first() {
    let readme = readme();
    let up = readme
        .find("./deploy/up.sh")
        .expect("README shows ./deploy/up.sh");
    let run = readme
        .find("./tests/run.sh")
        .expect("README shows ./tests/run.sh");
    let first_section = readme.find("\n## ").unwrap();
    let second_section = readme[first_section + 4..].find("\n## ").unwrap() + first_section + 4;
    assert!(up < second_section && run < second_section);
}
