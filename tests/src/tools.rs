//! The pinned tools (`nats-server`, `invoke`, installed by `./tests/run.sh` into `.venv/`) and
//! the project's own binaries.

use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Finds a pinned tool: `$<VAR>` if set, else `.venv/bin/<name>` in the workspace, else `PATH`.
pub fn tool(var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let venv = workspace_root().join(".venv/bin").join(name);
    if venv.exists() {
        return venv;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: run ./tests/run.sh (it installs the pinned version) or set {var}"
            )
        })
}

pub fn nats_server() -> PathBuf {
    tool("NATS_SERVER_BIN", "nats-server")
}

pub fn invoke() -> PathBuf {
    tool("INVOKE_BIN", "invoke")
}

/// A binary of this workspace (`iac-gateway`, `iac-worker`, `iac-reporter`), built by
/// `cargo build --bins` before the tests run (`./tests/run.sh` does). Panics when the binary
/// is older than its sources, so a test never passes or fails on code it was not given.
pub fn project_binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --bins` (./tests/run.sh does)",
        path.display()
    );
    refuse_stale(&path, name);
    path
}

/// Panics when a file under the binary's crate `src/` or under `shared/src/` changed after
/// the binary was built.
fn refuse_stale(binary: &Path, name: &str) {
    let built = modified(binary);
    let root = workspace_root();
    let crate_dir = name.strip_prefix("iac-").unwrap_or(name);
    for sources in [root.join(crate_dir).join("src"), root.join("shared/src")] {
        if let Some(newer) = newest_file(&sources).filter(|(time, _)| *time > built) {
            let shown = |p: &Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();
            panic!(
                "{} is older than {}: run cargo build --bins",
                shown(binary),
                shown(&newer.1)
            );
        }
    }
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("reading the time {} changed: {e}", path.display()))
}

/// The most recently changed file under `dir` (none if `dir` does not exist).
fn newest_file(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            Some((modified(&path), path))
        };
        if let Some(candidate) = candidate
            && newest.as_ref().is_none_or(|(time, _)| candidate.0 > *time)
        {
            newest = Some(candidate);
        }
    }
    newest
}
