//! The repository's own Python packages (`TASK_REQUIREMENTS`): a virtual environment built with
//! uv from a requirements file, or from a `pyproject.toml` and its `uv.lock`, as they are at the
//! synced commit; the tasks run from it.
//!
//! Environments live in `WORKSPACE/.iac-task-envs/<key>`, the key a hash of what one is built
//! from (the files' content and the Python), so a commit that changes a dependency gets a new
//! environment while every other sync reuses one without starting a process. An environment is
//! built in `.build-<key>` under an exclusive lock and renamed into place once complete: a
//! half-built one (a crash, a second worker on the same workspace) is never used, and the next
//! build removes it. A sync holds a shared lock on the environment it uses; the
//! [`KEPT_ENVIRONMENTS`] most recently used are kept, older ones removed unless in use.
//!
//! invoke need not be among the repository's packages: when `SYNC_COMMAND` runs invoke, the
//! directory invoke is installed in is added at the end of the environment's `sys.path` (a
//! `.pth` file), behind the environment's own packages, and [`active_python`] tells the task
//! runner to start invoke on the environment's Python.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::task::{self, SyncCommand};
use crate::task_env::{Masker, TaskEnv};

/// How many environments are kept: the current one and the two before it, so a revert or a
/// rollback finds its environment built.
pub const KEPT_ENVIRONMENTS: usize = 3;

/// The directory under `WORKSPACE` holding the environments (and uv's cache).
pub const ENVS_DIR: &str = ".iac-task-envs";

/// The file in every complete environment that syncs lock (shared) while they use it; its
/// modification time is when it was last used.
const IN_USE: &str = ".in-use";
const BUILD_LOCK: &str = ".build.lock";
const BUILD_PREFIX: &str = ".build-";
const TRASH_PREFIX: &str = ".trash-";
const UV_CACHE: &str = ".uv-cache";
const INVOKE_PTH: &str = "iac_worker_invoke.pth";

/// Longest installer line kept in an error.
const MAX_ERROR_LINE: usize = 1000;

/// Prints the directory invoke is imported from.
const INVOKE_HOME: &str = "import invoke, os; \
print(os.path.dirname(os.path.dirname(os.path.abspath(invoke.__file__))))";

/// `TASK_REQUIREMENTS`: a path inside the repository (relative, without `..`). Whether it
/// exists, and stays inside the checkout through symbolic links, is checked at every sync.
pub fn parse_path(s: &str) -> Result<String, String> {
    let s = s.trim();
    let inside = Path::new(s)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if s.is_empty() || !inside {
        return Err(format!(
            "{s:?} must be a file's path inside the repository (relative, without `..`)"
        ));
    }
    Ok(s.to_string())
}

/// Why the tasks' environment could not be had; the sync ends `error` and nothing runs.
#[derive(Debug, thiserror::Error)]
pub enum RequirementsError {
    #[error("TASK_REQUIREMENTS: {file}: {reason}")]
    File { file: String, reason: String },
    #[error("no Python to build the environment with: {0}")]
    NoPython(String),
    #[error("in the workspace: {0}")]
    Workspace(String),
    /// The installer failed; `tail` holds its last lines, masked.
    #[error("{step} failed ({how}); its last lines:\n{tail}")]
    Install {
        step: String,
        how: String,
        tail: String,
    },
    /// The worker is shutting down: the sync is handed back.
    #[error("interrupted by shutdown")]
    Interrupted,
}

/// How the environments are made (from the worker's configuration).
#[derive(Debug, Clone)]
pub struct TaskRequirements {
    /// `TASK_REQUIREMENTS`; `None` runs the tasks as they are.
    pub file: Option<String>,
    /// The uv program (`TASK_UV`).
    pub uv: PathBuf,
    /// Where the environments live (`WORKSPACE/.iac-task-envs`).
    pub envs: PathBuf,
    /// `SYNC_COMMAND`, whose invoke (if it runs invoke) the environments must see.
    pub command: SyncCommand,
    /// Longest one installer step may run.
    pub timeout: Duration,
    /// Installer lines kept in an error.
    pub tail_lines: usize,
}

/// An environment a sync uses: it is not removed while this is held.
#[derive(Debug)]
pub struct InUse {
    dir: PathBuf,
    _lock: File,
}

impl InUse {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The complete environment at `dir`, locked for use and marked as used now; `None` when
    /// there is none (not built, or being removed).
    fn take(dir: &Path) -> Option<InUse> {
        let marker = dir.join(IN_USE);
        let file = File::options().read(true).write(true).open(&marker).ok()?;
        file.try_lock_shared().ok()?;
        // Removal renames an environment away while holding the lock: check this is still it.
        let same = std::fs::metadata(&marker)
            .and_then(|now| Ok(now.ino() == file.metadata()?.ino()))
            .unwrap_or(false);
        if !same {
            return None;
        }
        let _ = file.set_modified(SystemTime::now());
        Some(InUse {
            dir: dir.to_path_buf(),
            _lock: file,
        })
    }
}

/// The Python an environment is made for.
#[derive(Debug)]
struct Python {
    /// As the tasks would start it (a virtual environment's `bin/python` stays as it is).
    run: PathBuf,
    /// The interpreter behind it, so a new Python at the same path gets a new environment.
    real: PathBuf,
    /// Whether it is invoke's, so invoke must be importable from the environment.
    runs_invoke: bool,
}

/// What an environment is built from, read from the checkout.
#[derive(Debug)]
struct Inputs {
    /// `TASK_REQUIREMENTS` as configured.
    file: String,
    /// The file itself, inside the checkout.
    path: PathBuf,
    /// A `pyproject.toml` installed from its `uv.lock` (else a requirements file).
    project: bool,
    /// The file's content, and the lock's.
    contents: Vec<Vec<u8>>,
}

impl TaskRequirements {
    /// Makes the tasks of `env` run from the environment `TASK_REQUIREMENTS` describes at the
    /// commit checked out in `checkout`, building it first unless an earlier sync did;
    /// `interrupt` resolving stops a build. `Ok(None)` when `TASK_REQUIREMENTS` is not set.
    pub async fn prepare(
        &self,
        checkout: &Path,
        env: &mut TaskEnv,
        interrupt: impl Future<Output = ()>,
    ) -> Result<Option<InUse>, RequirementsError> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let inputs = Inputs::read(checkout, file)?;
        let python = self.python(checkout, &env.vars)?;
        let key = inputs.key(&python);
        let in_use = match InUse::take(&self.envs.join(&key)) {
            Some(in_use) => in_use,
            None => tokio::select! {
                built = self.build(&inputs, &python, &key, env) => built?,
                _ = interrupt => return Err(RequirementsError::Interrupted),
            },
        };
        activate(in_use.dir(), &mut env.vars);
        Ok(Some(in_use))
    }

    /// The Python of `SYNC_COMMAND`'s invoke script, else `python3`, found on the tasks' `PATH`.
    fn python(
        &self,
        checkout: &Path,
        vars: &BTreeMap<String, String>,
    ) -> Result<Python, RequirementsError> {
        let argv = self.command.for_task("sync");
        let path = vars.get("PATH").map(String::as_str);
        let invoke_python = task::is_invoke(&argv)
            .then(|| task::resolve_program(&argv[0], checkout, path))
            .flatten()
            .and_then(|script| task::script_head(&script))
            .and_then(|head| {
                task::python_interpreter(&head)
                    .and_then(|words| words.last().map(|w| w.to_string()))
            });
        let runs_invoke = invoke_python.is_some();
        let program = invoke_python.unwrap_or_else(|| "python3".into());
        let run = task::resolve_program(&program, checkout, path).ok_or_else(|| {
            RequirementsError::NoPython(format!("{program} is not on the tasks' PATH"))
        })?;
        let real = run
            .canonicalize()
            .map_err(|e| RequirementsError::NoPython(format!("{}: {e}", run.display())))?;
        Ok(Python {
            run,
            real,
            runs_invoke,
        })
    }

    /// Builds the environment `key` and takes it, or takes it when another worker built it
    /// while this one waited for the lock.
    async fn build(
        &self,
        inputs: &Inputs,
        python: &Python,
        key: &str,
        env: &TaskEnv,
    ) -> Result<InUse, RequirementsError> {
        let _building = self.lock_builds().await?;
        let dir = self.envs.join(key);
        if let Some(in_use) = InUse::take(&dir) {
            return Ok(in_use);
        }
        self.remove_leftovers(&dir);
        let started = Instant::now();
        tracing::info!(file = %inputs.file, environment = key, "building the tasks' Python environment");
        let building = self.envs.join(format!("{BUILD_PREFIX}{key}"));
        if let Err(e) = self.populate(inputs, python, &building, env).await {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
        let workspace = |what: &str, e: std::io::Error| {
            RequirementsError::Workspace(format!("cannot {what} {}: {e}", building.display()))
        };
        File::create(building.join(IN_USE)).map_err(|e| workspace("complete", e))?;
        std::fs::rename(&building, &dir).map_err(|e| workspace("move into place", e))?;
        let in_use = InUse::take(&dir).ok_or_else(|| {
            RequirementsError::Workspace(format!("cannot use {} once built", dir.display()))
        })?;
        tracing::info!(
            file = %inputs.file,
            environment = key,
            seconds = started.elapsed().as_secs_f64(),
            "built the tasks' Python environment"
        );
        prune(&self.envs, KEPT_ENVIRONMENTS);
        Ok(in_use)
    }

    /// Creates the environment at `venv` and installs everything into it.
    async fn populate(
        &self,
        inputs: &Inputs,
        python: &Python,
        venv: &Path,
        env: &TaskEnv,
    ) -> Result<(), RequirementsError> {
        let mut args = [
            "venv",
            "--quiet",
            "--relocatable",
            "--no-python-downloads",
            "--python",
        ]
        .map(OsStr::new)
        .to_vec();
        args.extend([python.run.as_os_str(), venv.as_os_str()]);
        self.run("uv venv", &self.uv(), &args, &self.envs, &[], env)
            .await?;
        self.install(inputs, venv, env).await?;
        if python.runs_invoke {
            self.add_invoke(python, venv, env).await?;
        }
        Ok(())
    }

    /// Installs the packages into the environment at `venv` with uv, from the checkout.
    async fn install(
        &self,
        inputs: &Inputs,
        venv: &Path,
        env: &TaskEnv,
    ) -> Result<(), RequirementsError> {
        let dir = inputs.path.parent().unwrap_or(Path::new("/"));
        if inputs.project {
            let args = ["sync", "--frozen", "--no-install-project"].map(OsStr::new);
            let target = [("UV_PROJECT_ENVIRONMENT", venv.as_os_str())];
            self.run("uv sync", &self.uv(), &args, dir, &target, env)
                .await?;
        } else {
            let python = venv.join("bin/python");
            let mut args = ["pip", "install", "--python"].map(OsStr::new).to_vec();
            args.extend([
                python.as_os_str(),
                OsStr::new("-r"),
                inputs.path.as_os_str(),
            ]);
            self.run("uv pip install", &self.uv(), &args, dir, &[], env)
                .await?;
        }
        Ok(())
    }

    /// Makes the worker's invoke importable from the environment, behind its own packages.
    async fn add_invoke(
        &self,
        python: &Python,
        venv: &Path,
        env: &TaskEnv,
    ) -> Result<(), RequirementsError> {
        let args = [OsStr::new("-c"), OsStr::new(INVOKE_HOME)];
        let home = self
            .run("finding invoke", &python.run, &args, &self.envs, &[], env)
            .await?;
        let site = std::fs::read_dir(venv.join("lib"))
            .ok()
            .and_then(|entries| {
                entries
                    .flatten()
                    .find(|e| e.file_name().as_bytes().starts_with(b"python"))
            })
            .map(|e| e.path().join("site-packages"))
            .ok_or_else(|| {
                RequirementsError::Workspace(format!("no site-packages in {}", venv.display()))
            })?;
        std::fs::write(site.join(INVOKE_PTH), format!("{}\n", home.trim())).map_err(|e| {
            RequirementsError::Workspace(format!("cannot write in {}: {e}", site.display()))
        })
    }

    /// Runs one step of a build with the tasks' environment; its standard output, or its last
    /// lines (masked) in the error.
    async fn run(
        &self,
        step: &str,
        program: &Path,
        args: &[&OsStr],
        dir: &Path,
        extra: &[(&str, &OsStr)],
        env: &TaskEnv,
    ) -> Result<String, RequirementsError> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(dir)
            .env_clear()
            .envs(&env.vars)
            .env_remove("VIRTUAL_ENV")
            // A build never downloads a Python: it uses the one the tasks run on.
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env("NO_COLOR", "1")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if !env.vars.contains_key("UV_CACHE_DIR") {
            cmd.env("UV_CACHE_DIR", self.envs.join(UV_CACHE));
        }
        let failed = |how: String, tail: String| RequirementsError::Install {
            step: step.into(),
            how,
            tail,
        };
        let output = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                return Err(failed(
                    format!("cannot start {}: {e}", program.display()),
                    String::new(),
                ));
            }
            Err(_) => {
                let after = humantime::format_duration(self.timeout);
                return Err(failed(format!("timed out after {after}"), String::new()));
            }
        };
        if !output.status.success() {
            let tail = last_lines(&output.stdout, &output.stderr, self.tail_lines, &env.masker);
            for line in tail.lines() {
                tracing::warn!("{step} | {line}");
            }
            return Err(failed(output.status.to_string(), tail));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// uv as configured, found on the worker's own `PATH` (a `TASK_ENV_FILE` may change the
    /// tasks').
    fn uv(&self) -> PathBuf {
        let path = std::env::var("PATH").ok();
        task::resolve_program(&self.uv.to_string_lossy(), &self.envs, path.as_deref())
            .unwrap_or_else(|| self.uv.clone())
    }

    /// Takes the lock that one build at a time holds, waiting for another worker's build.
    async fn lock_builds(&self) -> Result<File, RequirementsError> {
        let envs = self.envs.clone();
        let locked = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&envs)?;
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(envs.join(BUILD_LOCK))?;
            file.lock()?;
            Ok::<_, std::io::Error>(file)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|locked| locked);
        locked.map_err(|e| {
            RequirementsError::Workspace(format!("cannot lock {}: {e}", self.envs.display()))
        })
    }

    /// Removes what an interrupted build or removal left (under the build lock, so nothing
    /// else is building), and a directory at `dir` that is no complete environment.
    fn remove_leftovers(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.envs) else {
            return;
        };
        let leftovers = entries.flatten().map(|e| e.path()).filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(BUILD_PREFIX) || n.starts_with(TRASH_PREFIX))
        });
        for path in leftovers.chain(dir.exists().then(|| dir.to_path_buf())) {
            tracing::warn!(dir = %path.display(), "removing an incomplete task environment");
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove it");
            }
        }
    }
}

impl Inputs {
    fn read(checkout: &Path, file: &str) -> Result<Self, RequirementsError> {
        let root = checkout.canonicalize().map_err(|e| {
            RequirementsError::Workspace(format!("cannot read {}: {e}", checkout.display()))
        })?;
        let path = inside(&root, file)?;
        let project = Path::new(file).file_name() == Some(OsStr::new("pyproject.toml"));
        let mut files = vec![path.clone()];
        if project {
            let lock = Path::new(file).with_file_name("uv.lock");
            files.push(inside(&root, &lock.to_string_lossy())?);
        }
        let contents = files
            .iter()
            .map(|path| {
                std::fs::read(path).map_err(|e| RequirementsError::File {
                    file: file.into(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Inputs {
            file: file.into(),
            path,
            project,
            contents,
        })
    }

    /// The name of the environment these inputs and `python` make.
    fn key(&self, python: &Python) -> String {
        let mut hash = Sha256::new();
        // Raised when what is built from the same inputs changes.
        hash.update(b"iac-task-env 1");
        let parts = [
            &[u8::from(self.project), u8::from(python.runs_invoke)][..],
            python.run.as_os_str().as_bytes(),
            python.real.as_os_str().as_bytes(),
        ];
        for part in parts
            .into_iter()
            .chain(self.contents.iter().map(Vec::as_slice))
        {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        hash.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The real path of the repository file `file`, which must exist inside `root` (the checkout,
/// canonical) even through symbolic links.
fn inside(root: &Path, file: &str) -> Result<PathBuf, RequirementsError> {
    let fail = |reason: &str| RequirementsError::File {
        file: file.into(),
        reason: reason.into(),
    };
    let path = match root.join(file).canonicalize() {
        Ok(path) => path,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail("no such file at this commit"));
        }
        Err(e) => return Err(fail(&e.to_string())),
    };
    if !path.starts_with(root) {
        return Err(fail("leads out of the repository (a symbolic link)"));
    }
    if !path.is_file() {
        return Err(fail("is not a file"));
    }
    Ok(path)
}

/// Runs the tasks from the environment at `dir`: its `bin` first on `PATH`, and `VIRTUAL_ENV`.
fn activate(dir: &Path, vars: &mut BTreeMap<String, String>) {
    let bin = dir.join("bin").display().to_string();
    let path = match vars.get("PATH") {
        Some(path) if !path.is_empty() => format!("{bin}:{path}"),
        _ => bin,
    };
    vars.insert("PATH".into(), path);
    vars.insert("VIRTUAL_ENV".into(), dir.display().to_string());
}

/// The Python of the virtual environment a task's variables activate (`VIRTUAL_ENV`), which
/// then starts invoke.
pub fn active_python(vars: &BTreeMap<String, String>) -> Option<PathBuf> {
    let python = Path::new(vars.get("VIRTUAL_ENV")?).join("bin/python");
    python.exists().then_some(python)
}

/// Removes the environments in `envs` beyond the `keep` most recently used, except those a
/// sync is using.
fn prune(envs: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(envs) else {
        return;
    };
    let mut found: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| !e.file_name().as_bytes().starts_with(b".") && e.path().is_dir())
        .map(|e| {
            let used = std::fs::metadata(e.path().join(IN_USE))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (used, e.path())
        })
        .collect();
    found.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
    for (_, dir) in found.into_iter().skip(keep) {
        remove_unused(envs, &dir);
    }
}

/// Removes the environment at `dir` unless a sync holds it; renamed away first, under its
/// lock, so no sync takes it half-removed.
fn remove_unused(envs: &Path, dir: &Path) {
    let marker = File::options()
        .read(true)
        .write(true)
        .open(dir.join(IN_USE));
    if let Ok(marker) = &marker
        && marker.try_lock().is_err()
    {
        tracing::info!(dir = %dir.display(), "keeping an old task environment: a sync uses it");
        return;
    }
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let trash = envs.join(format!("{TRASH_PREFIX}{name}"));
    match std::fs::rename(dir, &trash) {
        Ok(()) => {
            drop(marker);
            tracing::info!(dir = %dir.display(), "removed an old task environment");
            if let Err(e) = std::fs::remove_dir_all(&trash) {
                tracing::warn!(dir = %trash.display(), error = %e, "cannot remove it");
            }
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an old task environment")
        }
    }
}

/// The last `keep` lines of an installer's output, each cut to [`MAX_ERROR_LINE`], masked.
fn last_lines(stdout: &[u8], stderr: &[u8], keep: usize, masker: &Masker) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(keep)..]
        .iter()
        .map(|line| {
            let mut end = line.len().min(MAX_ERROR_LINE);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            masker.mask(&line[..end])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_outside_the_repository_is_refused_at_start() {
        for bad in [
            "",
            "/etc/requirements.txt",
            "../requirements.txt",
            "a/../../b.txt",
        ] {
            let err = parse_path(bad).unwrap_err();
            assert!(err.contains("inside the repository"), "{bad}: {err}");
        }
        assert_eq!(
            parse_path(" tasks/requirements.txt ").unwrap(),
            "tasks/requirements.txt"
        );
        assert_eq!(parse_path("./pyproject.toml").unwrap(), "./pyproject.toml");
    }

    #[test]
    fn a_file_reached_through_a_symbolic_link_must_stay_in_the_checkout() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkout");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(dir.path().join("outside.txt"), "x").unwrap();
        std::fs::write(root.join("sub/inside.txt"), "x").unwrap();
        std::os::unix::fs::symlink("../outside.txt", root.join("out.txt")).unwrap();
        std::os::unix::fs::symlink("sub/inside.txt", root.join("in.txt")).unwrap();
        let root = root.canonicalize().unwrap();
        let err = inside(&root, "out.txt").unwrap_err().to_string();
        assert!(
            err.contains("out.txt") && err.contains("out of the repository"),
            "{err}"
        );
        assert!(inside(&root, "in.txt").is_ok());
        let missing = inside(&root, "nope.txt").unwrap_err().to_string();
        assert!(
            missing.contains("nope.txt") && missing.contains("no such file"),
            "{missing}"
        );
        assert!(
            inside(&root, "sub")
                .unwrap_err()
                .to_string()
                .contains("not a file")
        );
    }

    #[test]
    fn the_key_changes_with_the_content_and_the_python_only() {
        let inputs = |content: &str| Inputs {
            file: "requirements.txt".into(),
            path: "/x/requirements.txt".into(),
            project: false,
            contents: vec![content.as_bytes().to_vec()],
        };
        let python = |real: &str| Python {
            run: "/venv/bin/python".into(),
            real: real.into(),
            runs_invoke: true,
        };
        let key = inputs("rich\n").key(&python("/usr/bin/python3.11"));
        assert_eq!(key.len(), 32);
        assert_eq!(key, inputs("rich\n").key(&python("/usr/bin/python3.11")));
        assert_ne!(
            key,
            inputs("rich\nhttpx\n").key(&python("/usr/bin/python3.11"))
        );
        assert_ne!(key, inputs("rich\n").key(&python("/usr/bin/python3.12")));
    }

    #[test]
    fn activating_puts_the_environment_first_and_names_its_python() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        let mut vars = BTreeMap::from([("PATH".to_string(), "/usr/bin".to_string())]);
        assert_eq!(active_python(&vars), None);
        activate(dir.path(), &mut vars);
        assert_eq!(
            vars["PATH"],
            format!("{}/bin:/usr/bin", dir.path().display())
        );
        assert_eq!(active_python(&vars), None, "no python in it");
        std::fs::write(dir.path().join("bin/python"), "").unwrap();
        assert_eq!(active_python(&vars), Some(dir.path().join("bin/python")));
    }

    #[test]
    fn an_installer_error_keeps_its_last_lines_cut_and_masked() {
        let masker = Masker::new(vec!["s3cr3t-token".into()]);
        let stderr = format!(
            "line 1\nline 2\nurl https://x:s3cr3t-token@pypi\n{}\n",
            "y".repeat(5000)
        );
        let tail = last_lines(b"out\n", stderr.as_bytes(), 2, &masker);
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "url https://x:***@pypi");
        assert_eq!(lines[1].len(), MAX_ERROR_LINE);
    }

    #[test]
    fn only_the_most_recently_used_environments_are_kept_and_never_one_in_use() {
        let envs = tempfile::tempdir().unwrap();
        let make = |name: &str, age_secs: u64| {
            let dir = envs.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let marker = File::create(dir.join(IN_USE)).unwrap();
            marker
                .set_modified(SystemTime::now() - Duration::from_secs(age_secs))
                .unwrap();
            dir
        };
        for (name, age) in [("a", 50), ("b", 40), ("c", 30), ("d", 20), ("e", 10)] {
            make(name, age);
        }
        let held = InUse::take(&envs.path().join("a")).unwrap();
        // Taking it marks it used now: it is the newest, so keep an older one in use too.
        held._lock
            .set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        prune(envs.path(), 3);
        let mut left: Vec<String> = std::fs::read_dir(envs.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["a", "c", "d", "e"],
            "b is old and unused; a is in use"
        );
        drop(held);
        prune(envs.path(), 3);
        assert!(!envs.path().join("a").exists());
    }
}
