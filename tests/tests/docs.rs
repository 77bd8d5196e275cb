//! The documents point at tests and files by name; a renamed test or a moved file must not
//! leave them pointing at nothing. RELIABILITY.md in particular is only worth what the tests it
//! names show, so each of them must exist.
//!
//! A reference is an inline code span of the form `` `file.rs: test_name` ``, where a bare
//! `file.rs` is `tests/tests/file.rs` and a path (`gateway/src/webhook.rs`) is from the
//! repository root, or a span that is only a path with a `/` ending in `.rs`.

use std::path::{Path, PathBuf};

/// The documents checked, and whether a bare `file.rs` span in them names a test file (as in
/// RELIABILITY.md, whose tables say `permissions.rs`); elsewhere a bare `main.rs` is generic.
const DOCUMENTS: &[(&str, bool)] = &[
    ("RELIABILITY.md", true),
    ("README.md", false),
    ("BENCHMARKS.md", false),
    ("docs/development.md", false),
];

#[derive(Debug, PartialEq)]
enum Reference {
    Test { file: String, test: String },
    File(String),
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The inline code spans of a Markdown text, fenced code blocks left out.
fn code_spans(markdown: &str) -> Vec<String> {
    let mut in_fence = false;
    let prose: Vec<&str> = markdown
        .lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                in_fence = !in_fence;
                return false;
            }
            !in_fence
        })
        .collect();
    prose
        .join("\n")
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|span| span.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn is_rust_path(s: &str) -> bool {
    s.ends_with(".rs")
        && s.len() > 3
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/' | '.'))
}

fn references(markdown: &str, bare_files_are_tests: bool) -> Vec<Reference> {
    code_spans(markdown)
        .into_iter()
        .filter_map(|span| match span.split_once(": ") {
            Some((file, test))
                if is_rust_path(file)
                    && !test.is_empty()
                    && test.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                Some(Reference::Test {
                    file: file.to_string(),
                    test: test.to_string(),
                })
            }
            Some(_) => None,
            None if is_rust_path(&span) && (span.contains('/') || bare_files_are_tests) => {
                Some(Reference::File(span))
            }
            None => None,
        })
        .collect()
}

fn resolve(root: &Path, file: &str) -> PathBuf {
    if file.contains('/') {
        root.join(file)
    } else {
        root.join("tests/tests").join(file)
    }
}

/// Each reference that points at nothing, said in words.
fn broken(root: &Path, document: &str, references: &[Reference]) -> Vec<String> {
    let mut broken = Vec::new();
    for reference in references {
        match reference {
            Reference::Test { file, test } => {
                let path = resolve(root, file);
                match std::fs::read_to_string(&path) {
                    Ok(source) if source.contains(&format!("fn {test}(")) => {}
                    Ok(_) => broken.push(format!("{document}: {file} has no test {test}")),
                    Err(_) => {
                        broken.push(format!("{document}: {file} (for {test}) does not exist"))
                    }
                }
            }
            Reference::File(file) => {
                if !resolve(root, file).is_file() {
                    broken.push(format!("{document}: {file} does not exist"));
                }
            }
        }
    }
    broken
}

#[test]
fn every_test_and_file_the_documents_name_exists() {
    let root = workspace_root();
    let mut problems = Vec::new();
    let mut tests_in_reliability = 0;
    for (document, bare_files_are_tests) in DOCUMENTS {
        let text = std::fs::read_to_string(root.join(document))
            .unwrap_or_else(|e| panic!("reading {document}: {e}"));
        let references = references(&text, *bare_files_are_tests);
        if *document == "RELIABILITY.md" {
            tests_in_reliability = references
                .iter()
                .filter(|r| matches!(r, Reference::Test { .. }))
                .count();
        }
        problems.extend(broken(&root, document, &references));
    }
    // RELIABILITY.md names a test for every promise; finding few means the parsing broke.
    assert!(
        tests_in_reliability >= 20,
        "found only {tests_in_reliability} `file.rs: test_name` references in RELIABILITY.md"
    );
    assert!(
        problems.is_empty(),
        "the documents name tests or files that do not exist:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn references_are_read_from_code_spans_outside_fenced_blocks() {
    let markdown = "\
Tests: `worker.rs: two_workers_never_run`, `gateway/src/webhook.rs: a_b`, `main.rs`,
`permissions.rs`, `shared/src/rules.rs` and a span over `worker.rs:
split_over_lines`; not `IAC_EVENTS` nor `a.rs: not a test name`.

```rust
let x = `fenced.rs: not_counted`;
```
";
    let test = |file: &str, test: &str| Reference::Test {
        file: file.into(),
        test: test.into(),
    };
    assert_eq!(
        references(markdown, true),
        [
            test("worker.rs", "two_workers_never_run"),
            test("gateway/src/webhook.rs", "a_b"),
            Reference::File("main.rs".into()),
            Reference::File("permissions.rs".into()),
            Reference::File("shared/src/rules.rs".into()),
            test("worker.rs", "split_over_lines"),
        ]
    );
    assert_eq!(
        references(markdown, false)
            .iter()
            .filter(|r| matches!(r, Reference::File(_)))
            .count(),
        1,
        "a bare file outside RELIABILITY.md is generic, not a test file"
    );
}

#[test]
fn a_missing_test_or_file_is_named() {
    let root = workspace_root();
    let references = [
        Reference::Test {
            file: "docs.rs".into(),
            test: "a_missing_test_or_file_is_named".into(),
        },
        Reference::Test {
            file: "docs.rs".into(),
            test: "no_such_test".into(),
        },
        Reference::Test {
            file: "no_such_file.rs".into(),
            test: "anything".into(),
        },
        Reference::File("shared/src/no_such_module.rs".into()),
    ];
    assert_eq!(
        broken(&root, "X.md", &references),
        [
            "X.md: docs.rs has no test no_such_test",
            "X.md: no_such_file.rs (for anything) does not exist",
            "X.md: shared/src/no_such_module.rs does not exist",
        ]
    );
}
