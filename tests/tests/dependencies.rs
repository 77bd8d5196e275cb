//! Every dependency a crate declares is one its code uses: an unused one still costs build
//! time, lock-file churn and supply-chain surface, and nothing else would notice it.
//!
//! A dependency counts as used when its crate name (dashes as underscores) appears in the
//! crate's sources as the start of a path (`name::`) or in `use name` / `extern crate name`.
//! Whole-line comments are not sources: a crate only mentioned in a doc comment is unused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Dependencies the code never names but needs (only for a feature they switch on, or for
/// linking), as (package, dependency, why). Keep it short: an entry here is a dependency the
/// check can no longer see go unused. None is needed today.
const USED_WITHOUT_BEING_NAMED: &[(&str, &str, &str)] = &[];

const TABLES: &[&str] = &["dependencies", "build-dependencies", "dev-dependencies"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn read_manifest(path: &Path) -> toml::Table {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The declared dependencies of a manifest, as `(table, name)`, including target-specific
/// tables (`[target.'cfg(unix)'.dependencies]`).
fn declared_dependencies(manifest: &toml::Table) -> Vec<(String, String)> {
    let mut tables = vec![manifest];
    if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
        tables.extend(targets.values().filter_map(toml::Value::as_table));
    }
    let mut declared = Vec::new();
    for table in tables {
        for kind in TABLES {
            let Some(deps) = table.get(*kind).and_then(toml::Value::as_table) else {
                continue;
            };
            declared.extend(deps.keys().map(|name| (kind.to_string(), name.clone())));
        }
    }
    declared
}

/// All `.rs` text of a crate: `src/`, `tests/`, `benches/`, `examples/` and `build.rs`.
fn crate_sources(dir: &Path) -> String {
    let mut files = Vec::new();
    for sub in ["src", "tests", "benches", "examples"] {
        collect_rust_files(&dir.join(sub), &mut files);
    }
    let build_script = dir.join("build.rs");
    if build_script.is_file() {
        files.push(build_script);
    }
    let mut text = String::new();
    for file in files {
        let source = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        text.push_str(&source);
        text.push('\n');
    }
    text
}

fn without_line_comments(sources: &str) -> String {
    sources
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn collect_rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("listing a source directory").path();
        if path.is_dir() {
            collect_rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `sources` names the crate `name` (already with underscores) as a crate, not as a
/// module of something else (`other::name::` does not count, `::name::` does).
fn names_crate(sources: &str, name: &str) -> bool {
    let as_path = format!("{name}::");
    let as_path_start = sources.match_indices(&as_path).any(|(at, _)| {
        let before = &sources[..at];
        match before.strip_suffix("::") {
            Some(rest) => !rest.ends_with(|c: char| is_ident_char(c) || c == '>'),
            None => !before.ends_with(is_ident_char),
        }
    });
    as_path_start
        || [
            format!("use {name};"),
            format!("use {name} as "),
            format!("extern crate {name}"),
        ]
        .iter()
        .any(|form| {
            sources
                .match_indices(form.as_str())
                .any(|(at, _)| !sources[..at].ends_with(is_ident_char))
        })
}

/// The dependencies of `manifest` that `sources` never names, as `table: name`, less the
/// allowed ones of `package`.
fn unused_dependencies(package: &str, manifest: &toml::Table, sources: &str) -> Vec<String> {
    let allowed: BTreeSet<&str> = USED_WITHOUT_BEING_NAMED
        .iter()
        .filter(|(p, _, _)| *p == package)
        .map(|(_, name, _)| *name)
        .collect();
    let sources = without_line_comments(sources);
    declared_dependencies(manifest)
        .into_iter()
        .filter(|(_, name)| !allowed.contains(name.as_str()))
        .filter(|(_, name)| !names_crate(&sources, &name.replace('-', "_")))
        .map(|(table, name)| format!("{table}: {name}"))
        .collect()
}

fn members(root: &toml::Table) -> Vec<String> {
    root["workspace"]["members"]
        .as_array()
        .expect("[workspace] members is a list")
        .iter()
        .map(|m| m.as_str().expect("a member is a path").to_string())
        .collect()
}

#[test]
fn every_crate_uses_every_dependency_it_declares() {
    let root = workspace_root();
    let members = members(&read_manifest(&root.join("Cargo.toml")));
    assert!(
        members.len() >= 5,
        "expected the five crates, found {members:?}"
    );
    let mut unused = Vec::new();
    for member in &members {
        let dir = root.join(member);
        let manifest = read_manifest(&dir.join("Cargo.toml"));
        let package = manifest["package"]["name"].as_str().expect("package.name");
        for dependency in unused_dependencies(package, &manifest, &crate_sources(&dir)) {
            unused.push(format!("{member}/Cargo.toml [{dependency}]"));
        }
    }
    assert!(
        unused.is_empty(),
        "dependencies no code of their crate names (remove them, or add them with a reason \
         to USED_WITHOUT_BEING_NAMED):\n  {}",
        unused.join("\n  ")
    );
}

#[test]
fn every_workspace_dependency_is_used_by_some_crate() {
    let root = workspace_root();
    let workspace = read_manifest(&root.join("Cargo.toml"));
    let mut used = BTreeSet::new();
    for member in members(&workspace) {
        let manifest = read_manifest(&root.join(&member).join("Cargo.toml"));
        used.extend(declared_dependencies(&manifest).into_iter().map(|(_, n)| n));
    }
    let unused: Vec<&String> = workspace["workspace"]["dependencies"]
        .as_table()
        .expect("[workspace.dependencies]")
        .keys()
        .filter(|name| !used.contains(*name))
        .collect();
    assert!(
        unused.is_empty(),
        "[workspace.dependencies] no crate uses: {unused:?}"
    );
}

// The made-up crate names below are no real dependency of this crate, so that this file's
// own text never counts as a use of one.
#[test]
fn the_check_flags_a_dependency_the_sources_never_name() {
    let manifest: toml::Table = r#"
        [package]
        name = "made-up"

        [dependencies]
        made-up-json = "1"
        made-up-runtime = "1"
        made-up-whole = "1"
        made-up-commented = "1"
        made-up-module = "1"
        made-up-never-named = "1"

        [dev-dependencies]
        made-up-test-only = "1"

        [target.'cfg(unix)'.dependencies]
        made-up-unix = "1"
    "#
    .parse()
    .unwrap();
    let sources = r#"
        use made_up_whole;
        // made_up_commented::f() is only named in this comment
        #[made_up_runtime::test]
        async fn a() { made_up_json::to_string(&1); crate::made_up_module::X; }
        fn b() { other_made_up_test_only::Y; my_made_up_unix::Z; }
    "#;
    assert_eq!(
        unused_dependencies("made-up", &manifest, sources),
        [
            "dependencies: made-up-commented",
            "dependencies: made-up-module",
            "dependencies: made-up-never-named",
            "dev-dependencies: made-up-test-only",
            "dependencies: made-up-unix",
        ]
    );
}
