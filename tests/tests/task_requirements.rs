//! The repository's own Python packages (`TASK_REQUIREMENTS`), against real parts: a real
//! nats-server, a real git fixture monorepo, the pinned `invoke` and the pinned `uv`. Nothing
//! comes from the network: the packages are tiny wheels the test builds and commits, which
//! the requirements reach with `--no-index --find-links`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use iac_shared::events::{FinishedState, SyncFinished};
use iac_tests::services::InProcessWorker;
use iac_tests::tools::tool;
use iac_tests::worker_harness::WorkerHarness as Harness;

/// A service whose task imports the modules its `imports.txt` lists (one a line), so a
/// package missing from the environment fails it.
const SERVICE: &str = "platform/60.greeter";

const DEPLOY_PY: &str = r#"import pathlib

from invoke import task

from libs.fixture_sync import run_sync


@task
def sync(c):
    names = (pathlib.Path(__file__).parent / "imports.txt").read_text().split()
    for name in names:
        module = __import__(name)
        print(f"imported {name} {module.VERSION}")
    run_sync(__file__)
"#;

/// Writes a wheel of the package `name` into the fixture's `wheels/`.
fn wheel(h: &Harness, name: &str, version: &str) {
    iac_tests::wheel::wheel(&h.fixture.work_tree().join("wheels"), name, version);
}

/// The requirements file offline, requiring `packages`, and the greeter importing them.
fn require(h: &Harness, packages: &[&str]) {
    let mut requirements = String::from("--no-index\n--find-links ./wheels\n");
    for package in packages {
        requirements.push_str(&format!("{package}==1.0\n"));
    }
    h.fixture.write("requirements.txt", &requirements);
    h.fixture.write(&format!("{SERVICE}/deploy.py"), DEPLOY_PY);
    h.fixture
        .write(&format!("{SERVICE}/imports.txt"), &packages.join("\n"));
}

fn uv() -> PathBuf {
    tool("UV_BIN", "uv")
}

fn start(h: &Harness, workspace: &Path, extra: &[&str]) -> InProcessWorker {
    let uv = uv();
    let mut args = vec![
        "--task-requirements",
        "requirements.txt",
        "--task-uv",
        uv.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    h.start(workspace, &args)
}

/// A commit changing the greeter, pushed; its finished result.
async fn sync_greeter(h: &Harness) -> SyncFinished {
    let (_, seq) = h.push_change(&format!("{SERVICE}/compose.yaml")).await;
    h.finished_for(seq).await
}

/// The environments in the workspace, by name.
fn environments(workspace: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(workspace.join(".iac-task-envs"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The whole reason of an `error` result.
fn reason(finished: &SyncFinished) -> String {
    assert_eq!(finished.state, FinishedState::Error, "{finished:#?}");
    finished.error.clone().unwrap_or_default()
}

#[tokio::test]
async fn a_task_imports_a_package_of_the_requirements_and_the_next_sync_reuses_the_environment() {
    let h = Harness::new().await;
    wheel(&h, "greet", "1.0");
    require(&h, &["greet"]);
    let workspace = h.workspace("ws");
    // What a worker killed in the middle of a build leaves.
    let half_built = workspace.join(".iac-task-envs/.build-0123");
    std::fs::create_dir_all(half_built.join("bin")).unwrap();
    let worker = start(&h, &workspace, &[]);

    let first = sync_greeter(&h).await;
    assert_eq!(first.state, FinishedState::Success, "{first:#?}");
    let envs = environments(&workspace);
    assert_eq!(envs.len(), 1, "{envs:?}");
    let env_dir = workspace.join(".iac-task-envs").join(&envs[0]);
    let run = h.fixture.runs().pop().unwrap();
    assert_eq!(run.env["VIRTUAL_ENV"], env_dir.display().to_string());
    assert!(
        !half_built.exists(),
        "the half-built environment is removed"
    );
    let built = std::fs::metadata(&env_dir).unwrap().ino();

    let second = sync_greeter(&h).await;
    assert_eq!(second.state, FinishedState::Success, "{second:#?}");
    assert_eq!(environments(&workspace), envs);
    assert_eq!(
        std::fs::metadata(&env_dir).unwrap().ino(),
        built,
        "the environment is not built again"
    );
    assert_eq!(h.fixture.finished_tasks(), ["greeter.sync", "greeter.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn each_commit_adding_a_dependency_gets_it_and_the_last_three_environments_are_kept() {
    let h = Harness::new().await;
    let names = ["alpha", "beta", "gamma", "delta"];
    for name in names {
        wheel(&h, name, "1.0");
    }
    let workspace = h.workspace("ws");
    let worker = start(&h, &workspace, &[]);

    let mut seen = Vec::new();
    for count in 1..=names.len() {
        require(&h, &names[..count]);
        let finished = sync_greeter(&h).await;
        assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
        let envs = environments(&workspace);
        seen.extend(
            envs.iter()
                .filter(|e| !seen.contains(*e))
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            seen.len(),
            count,
            "a new environment for each change: {seen:?}"
        );
        assert_eq!(envs.len(), count.min(3), "{envs:?}");
    }
    assert!(
        !environments(&workspace).contains(&seen[0]),
        "the oldest environment is removed"
    );
    assert_eq!(h.fixture.finished_tasks().len(), names.len());
    worker.stop().await;
}

#[tokio::test]
async fn an_install_failure_ends_the_sync_in_error_with_the_installer_s_last_lines_and_runs_nothing()
 {
    let h = Harness::new().await;
    wheel(&h, "greet", "1.0");
    // The missing package is named like a secret of the tasks, which must show masked.
    require(&h, &["greet", "missing-secret-pkg"]);
    let env_file = h.workspace("secrets").join("task.env");
    std::fs::write(&env_file, "INDEX_PASSWORD=missing-secret-pkg\n").unwrap();
    let workspace = h.workspace("ws");
    let worker = start(
        &h,
        &workspace,
        &["--task-env-file", env_file.to_str().unwrap()],
    );

    let reason = reason(&sync_greeter(&h).await);
    assert!(
        reason.contains("uv pip install failed") && reason.contains("was not found"),
        "the installer's own words: {reason}"
    );
    assert!(
        !reason.contains("missing-secret-pkg") && reason.contains("***"),
        "{reason}"
    );
    assert!(h.fixture.runs().is_empty(), "{:?}", h.fixture.runs());
    let left: Vec<_> = std::fs::read_dir(workspace.join(".iac-task-envs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|name| name != ".build.lock" && name != ".uv-cache")
        .collect();
    assert!(
        left.is_empty(),
        "nothing of the failed build is left: {left:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_missing_requirements_file_or_one_leading_out_of_the_checkout_ends_the_sync_in_error() {
    let h = Harness::new().await;
    h.fixture.write(&format!("{SERVICE}/deploy.py"), DEPLOY_PY);
    h.fixture.write(&format!("{SERVICE}/imports.txt"), "");
    let workspace = h.workspace("ws");
    let worker = start(&h, &workspace, &[]);

    let missing = reason(&sync_greeter(&h).await);
    assert!(
        missing.contains("TASK_REQUIREMENTS: requirements.txt: no such file at this commit"),
        "{missing}"
    );

    std::os::unix::fs::symlink(
        "/etc/passwd",
        h.fixture.work_tree().join("requirements.txt"),
    )
    .unwrap();
    let escaping = reason(&sync_greeter(&h).await);
    assert!(
        escaping.contains("requirements.txt: leads out of the repository"),
        "{escaping}"
    );
    assert!(h.fixture.runs().is_empty(), "{:?}", h.fixture.runs());
    worker.stop().await;
}

#[test]
fn a_requirements_path_outside_the_repository_stops_the_worker_at_start() {
    for bad in [
        "/etc/requirements.txt",
        "../requirements.txt",
        "tasks/../../x.txt",
    ] {
        let err = iac_worker::Config::from_args([
            "iac-worker",
            "--git-repo-url",
            "https://x/acme/infra.git",
            "--task-requirements",
            bad,
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("TASK_REQUIREMENTS") && err.contains("inside the repository"),
            "{bad}: {err}"
        );
    }
}

#[tokio::test]
async fn a_pyproject_is_installed_from_its_uv_lock() {
    let h = Harness::new().await;
    wheel(&h, "greet", "1.0");
    h.fixture.write(&format!("{SERVICE}/deploy.py"), DEPLOY_PY);
    h.fixture.write(&format!("{SERVICE}/imports.txt"), "greet");
    h.fixture.write(
        "tasks/pyproject.toml",
        "[project]\nname = \"infra-tasks\"\nversion = \"0\"\nrequires-python = \">=3.8\"\n\
         dependencies = [\"greet==1.0\"]\n\n[tool.uv]\nno-index = true\n\
         find-links = [\"../wheels\"]\npackage = false\n",
    );
    let locked = Command::new(uv())
        .args(["lock", "--offline", "--quiet"])
        .current_dir(h.fixture.work_tree().join("tasks"))
        .env("UV_CACHE_DIR", h.workspace("uv-cache"))
        .status()
        .unwrap();
    assert!(locked.success(), "uv lock");
    let workspace = h.workspace("ws");
    let worker = start(
        &h,
        &workspace,
        &["--task-requirements", "tasks/pyproject.toml"],
    );

    let finished = sync_greeter(&h).await;
    assert_eq!(finished.state, FinishedState::Success, "{finished:#?}");
    assert_eq!(environments(&workspace).len(), 1);
    assert_eq!(h.fixture.finished_tasks(), ["greeter.sync"]);
    worker.stop().await;
}

#[tokio::test]
async fn two_syncs_preparing_the_same_environment_at_once_build_it_once_with_invoke_importable() {
    let dir = tempfile::tempdir().unwrap();
    let checkout = dir.path().join("infra");
    iac_tests::wheel::wheel(&checkout.join("wheels"), "greet", "1.0");
    std::fs::write(
        checkout.join("requirements.txt"),
        "--no-index\n--find-links ./wheels\ngreet==1.0\n",
    )
    .unwrap();
    let workspace = dir.path();
    let (uv, invoke) = (uv(), iac_tests::tools::invoke());
    let config = iac_worker::Config::from_args([
        "iac-worker",
        "--git-repo-url",
        "https://x/acme/infra.git",
        "--workspace",
        workspace.to_str().unwrap(),
        "--sync-command",
        &format!("{} {{task}}", invoke.display()),
        "--task-requirements",
        "requirements.txt",
        "--task-uv",
        uv.to_str().unwrap(),
    ])
    .unwrap();
    let requirements = config.task_requirements(workspace);
    let env = config
        .task_env()
        .build(|name| std::env::var(name).ok(), &[])
        .unwrap();
    let (mut env_a, mut env_b) = (env.clone(), env);

    // Each holds its own lock file descriptors, as two worker processes would.
    let (a, b) = tokio::join!(
        requirements.prepare(&checkout, &mut env_a, std::future::pending()),
        requirements.prepare(&checkout, &mut env_b, std::future::pending()),
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(a.dir(), b.dir());
    assert_eq!(environments(workspace).len(), 1);
    assert_eq!(env_a.vars["VIRTUAL_ENV"], a.dir().display().to_string());
    // invoke is not among the requirements, yet the environment's Python imports it.
    let imports = Command::new(a.dir().join("bin/python"))
        .args(["-P", "-c", "import greet, invoke.main"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        imports.status.success(),
        "{}",
        String::from_utf8_lossy(&imports.stderr)
    );
}
