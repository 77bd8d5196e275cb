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
/// `cargo build --bins` before the tests run (`./tests/run.sh` does).
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
    path
}
