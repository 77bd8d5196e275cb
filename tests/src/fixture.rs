//! A real git monorepo per test, laid out like the infrastructure repositories the runner syncs.
//!
//! The files come from `tests/data/monorepo/` (the root `tasks.py` from the example monorepo in
//! `deploy/example-infra/`); every service's `sync` task appends a start and
//! an end record to a log the test reads back with [`Fixture::runs`].
//!
//! `platform/__init__.py` makes `platform/` a package named like Python's standard `platform`
//! module (it is no service: services are `platform/{nn}.{name}/` directories), and every task
//! imports `uuid`, which needs the standard one: a task that sees the repository ahead of the
//! standard library fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::tools::workspace_root;

/// One record of a task run, written by `libs/fixture_sync.py`.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskRun {
    pub task: Option<String>,
    pub service: Option<String>,
    pub commit: Option<String>,
    pub force: bool,
    pub dir: String,
    pub pid: u32,
    pub cwd: String,
    /// `start` or `end`.
    pub phase: String,
    /// The task's whole environment.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Seconds since the epoch.
    pub t: f64,
}

/// A bare "remote" the worker clones from, and a work tree the test commits in.
pub struct Fixture {
    dir: TempDir,
    work: PathBuf,
    remote: PathBuf,
    log: PathBuf,
}

impl Fixture {
    /// The fixture monorepo with one initial commit on `main`, pushed to the remote.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for the fixture");
        let work = dir.path().join("work");
        let remote = dir.path().join("infra.git");
        let log = dir.path().join("task-runs.jsonl");
        copy_dir(&workspace_root().join("tests/data/monorepo"), &work);
        // The root collection is the example monorepo's: one namespace per deploy.py.
        std::fs::copy(
            workspace_root().join("deploy/example-infra/tasks.py"),
            work.join("tasks.py"),
        )
        .expect("copying the example's tasks.py");
        std::fs::write(
            work.join("fixture.json"),
            serde_json::to_string(&json!({ "log": log })).unwrap(),
        )
        .unwrap();
        git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", "infra.git"],
        );
        git(&work, &["init", "-q", "-b", "main"]);
        git(
            &work,
            &["remote", "add", "origin", remote.to_str().unwrap()],
        );
        let fixture = Fixture {
            dir,
            work,
            remote,
            log,
        };
        fixture.commit("initial monorepo");
        fixture
    }

    /// The URL the worker clones (`GIT_REPO_URL`).
    pub fn url(&self) -> String {
        self.remote.display().to_string()
    }

    pub fn work_tree(&self) -> &Path {
        &self.work
    }

    /// A scratch directory that lives as long as the fixture (workspaces, logs).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// Writes a file in the work tree (not committed yet).
    pub fn write(&self, path: &str, content: &str) {
        let full = self.work.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }

    /// Removes a file or directory from the work tree (not committed yet).
    pub fn remove(&self, path: &str) {
        let full = self.work.join(path);
        if full.is_dir() {
            std::fs::remove_dir_all(full).unwrap();
        } else {
            std::fs::remove_file(full).unwrap();
        }
    }

    /// Makes a service's task sleep and/or exit with a code (committed with the next commit).
    pub fn set_behaviour(&self, service_dir: &str, sleep_secs: f64, exit: i32) {
        self.write(
            &format!("{service_dir}/behaviour.json"),
            &json!({ "sleep": sleep_secs, "exit": exit }).to_string(),
        );
    }

    /// Sets a service's whole `behaviour.json` (see `libs/fixture_sync.py`), committed with the
    /// next commit.
    pub fn set_behaviour_json(&self, service_dir: &str, behaviour: Value) {
        self.write(
            &format!("{service_dir}/behaviour.json"),
            &behaviour.to_string(),
        );
    }

    /// Whether a git hook planted by a task ever ran (see `plant_hook`).
    pub fn hook_ran(&self) -> bool {
        self.log.with_file_name("hook-ran.txt").exists()
    }

    /// Commits everything and pushes to the remote's `main`; returns the new commit id.
    pub fn commit(&self, message: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        git(&self.work, &["push", "-q", "origin", "main"]);
        self.head()
    }

    /// Appends a line to `path` and commits it: the usual "a file in that service changed".
    pub fn change(&self, path: &str) -> String {
        let full = self.work.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        let mut content = std::fs::read_to_string(&full).unwrap_or_default();
        content.push_str(&format!("# change {}\n", content.lines().count()));
        std::fs::write(&full, content).unwrap();
        self.commit(&format!("change {path}"))
    }

    pub fn head(&self) -> String {
        git(&self.work, &["rev-parse", "HEAD"]).trim().to_string()
    }

    /// Every task run recorded so far, in the order they were written.
    pub fn runs(&self) -> Vec<TaskRun> {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("a task run record"))
            .collect()
    }

    /// The tasks that finished (`end` records), in order.
    pub fn finished_tasks(&self) -> Vec<String> {
        self.runs()
            .into_iter()
            .filter(|r| r.phase == "end")
            .filter_map(|r| r.task)
            .collect()
    }

    /// A GitHub push payload for `before..after`, listing `paths` as modified in one commit.
    pub fn push_payload(&self, before: &str, after: &str, paths: &[&str]) -> Value {
        push_payload("refs/heads/main", before, after, paths)
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// A push payload shaped like GitHub's (the fields the runner reads, and some it does not).
pub fn push_payload(git_ref: &str, before: &str, after: &str, paths: &[&str]) -> Value {
    json!({
        "ref": git_ref,
        "before": before,
        "after": after,
        "created": false,
        "deleted": false,
        "forced": false,
        "repository": { "id": 1, "name": "infra", "full_name": "acme/infra" },
        "pusher": { "name": "octocat", "email": "octocat@example.com" },
        "head_commit": { "id": after, "message": "change", "added": [], "removed": [], "modified": paths },
        "commits": [
            { "id": after, "message": "change", "added": [], "removed": [], "modified": paths }
        ]
    })
}

/// Runs git in `dir` with a fixed identity; panics with git's output on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=Fixture",
            "-c",
            "user.email=fixture@example.com",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running git");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() == "__pycache__" {
                continue;
            }
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
