//! Running one service's task: the configured command without a shell, in the checkout, in its
//! own process group, its output streamed to the log, killed on timeout or with the worker.
//!
//! When the command's program is invoke's script, the worker starts invoke itself through the
//! script's Python (or the Python of the `TASK_REQUIREMENTS` environment, which sees invoke
//! too) with [`INVOKE_BOOTSTRAP`], so that the checkout's modules are importable
//! but never ahead of the standard library (a repository's `platform/` package must not hide
//! Python's `platform`). Any other command runs as written, with nothing added to its
//! `PYTHONPATH`.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iac_shared::rules::Service;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::Instrument;

use crate::runlog::TaskOutput;
use crate::task_env::{Masker, TaskEnv};
use crate::workspace::TaskGroups;

const TASK_PLACEHOLDER: &str = "{task}";

/// Longest output line kept: the rest of a longer line is dropped, and counted in a mark.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// How much task output is read at a time.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// Names of the scripts invoke installs.
const INVOKE_SCRIPTS: &[&str] = &["invoke", "inv"];

/// Python run as `<python> -P -c INVOKE_BOOTSTRAP <args>` in place of invoke's script. `-P`
/// keeps the current directory off the front of `sys.path`; the checkout (the current
/// directory) is appended to the end instead, behind the standard library and the installed
/// packages. Invoke's loader then finds it already on `sys.path` and does not insert it first.
pub const INVOKE_BOOTSTRAP: &str = "import os, sys; sys.path.append(os.getcwd()); \
sys.argv[0] = 'invoke'; from invoke.main import program; sys.exit(program.run())";

/// `SYNC_COMMAND`, split into arguments once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCommand {
    args: Vec<String>,
}

impl SyncCommand {
    /// Splits like a POSIX shell would (quotes, escapes) but runs no shell; it must name a
    /// program and contain `{task}`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let args = shell_words::split(s).map_err(|e| format!("cannot split: {e}"))?;
        if args.is_empty() {
            return Err("must name a program".into());
        }
        if !args.iter().any(|a| a.contains(TASK_PLACEHOLDER)) {
            return Err(format!(
                "must contain {TASK_PLACEHOLDER}, e.g. `invoke {{task}}`"
            ));
        }
        Ok(SyncCommand { args })
    }

    /// The program and its arguments for one invoke task.
    pub fn for_task(&self, task: &str) -> Vec<String> {
        self.args
            .iter()
            .map(|a| a.replace(TASK_PLACEHOLDER, task))
            .collect()
    }
}

/// The program and arguments that start `argv` (a command with its task filled in).
///
/// When the program is invoke's script (named `invoke` or `inv`) and `script_head`, the
/// script's first line, names its interpreter (`#!/opt/venv/bin/python` or
/// `#!/usr/bin/env python3`), invoke is started through that interpreter with
/// [`INVOKE_BOOTSTRAP`]. Anything else (another program, an invoke that is not a Python
/// script) is started as it is.
pub fn launch_argv(argv: &[String], script_head: Option<&str>) -> Vec<String> {
    let interpreter = script_head.and_then(python_interpreter);
    match (is_invoke(argv), interpreter) {
        (true, Some(interpreter)) => invoke_through(&interpreter, argv),
        _ => argv.to_vec(),
    }
}

/// `argv` (invoke's script and its arguments) started as `<interpreter> -P -c
/// INVOKE_BOOTSTRAP <arguments>`.
fn invoke_through(interpreter: &[&str], argv: &[String]) -> Vec<String> {
    interpreter
        .iter()
        .map(|word| word.to_string())
        .chain(["-P".into(), "-c".into(), INVOKE_BOOTSTRAP.into()])
        .chain(argv[1..].iter().cloned())
        .collect()
}

/// Whether `argv` runs invoke's script (a program named `invoke` or `inv`).
pub(crate) fn is_invoke(argv: &[String]) -> bool {
    argv.first()
        .and_then(|program| Path::new(program).file_name())
        .and_then(|name| name.to_str())
        .is_some_and(|name| INVOKE_SCRIPTS.contains(&name))
}

/// The words of a script's first line up to its Python interpreter (`/usr/bin/env python3`
/// or `/opt/venv/bin/python`); `None` when the script is not run by Python.
pub(crate) fn python_interpreter(script_head: &str) -> Option<Vec<&str>> {
    let words: Vec<&str> = script_head.strip_prefix("#!")?.split_whitespace().collect();
    let python = words.iter().position(|word| {
        Path::new(word)
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("python"))
    })?;
    Some(words[..=python].to_vec())
}

/// The file `program` starts: a path with a `/` taken from `dir` (where the command runs),
/// else the first executable of that name on `path` (the task's `PATH`, as the task will be
/// started with it).
pub(crate) fn resolve_program(program: &str, dir: &Path, path: Option<&str>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return Some(dir.join(program));
    }
    std::env::split_paths(path?)
        .map(|entry| dir.join(entry).join(program))
        .find(|candidate| executable(candidate))
}

/// The first line of a script, if it starts with `#!`.
pub(crate) fn script_head(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .ok()?;
    let head = &head[..read];
    let line = head.split(|&b| b == b'\n').next()?;
    line.starts_with(b"#!")
        .then(|| String::from_utf8_lossy(line).trim_end().to_string())
}

/// Everything a task run needs besides the service.
#[derive(Debug, Clone)]
pub struct TaskRunner {
    pub command: SyncCommand,
    pub timeout: Duration,
    pub tail_lines: usize,
    /// Where the running tasks' process groups are recorded for a successor to find.
    pub groups: TaskGroups,
    /// Where each task's whole output goes, for the run pages.
    pub run_log: crate::runlog::RunLog,
}

/// How a task run ended, before it becomes a [`ServiceResult`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEnd {
    Exited {
        code: Option<i32>,
        tail: Vec<String>,
    },
    TimedOut {
        tail: Vec<String>,
    },
    /// The worker is shutting down and the grace period ran out.
    Interrupted,
    CannotStart(String),
    /// The service must not run (see [`Service::refused`]); nothing was started.
    Refused(String),
}

type Tail = Arc<Mutex<VecDeque<String>>>;

impl TaskRunner {
    /// Runs `service`'s task at `commit` in `checkout` with only the variables of `env`
    /// (and the `IAC_*` ones); `interrupt` resolving kills it.
    pub async fn run(
        &self,
        service: &Service,
        checkout: &Path,
        commit: &str,
        force: bool,
        env: &TaskEnv,
        interrupt: impl Future<Output = ()>,
    ) -> TaskEnd {
        if let Some(reason) = refusal(service) {
            tracing::warn!(service = %service.key, dir = %service.dir, "{reason}");
            return TaskEnd::Refused(reason);
        }
        let argv = self.command.for_task(&service.task);
        let path = env.vars.get("PATH").map(String::as_str);
        let argv = match crate::requirements::active_python(&env.vars) {
            // A TASK_REQUIREMENTS environment runs invoke on its own Python (see `requirements`).
            Some(python) if is_invoke(&argv) => {
                invoke_through(&[python.to_string_lossy().as_ref()], &argv)
            }
            _ => {
                let head = resolve_program(&argv[0], checkout, path).and_then(|p| script_head(&p));
                launch_argv(&argv, head.as_deref())
            }
        };
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(checkout)
            .env_clear()
            .envs(&env.vars)
            .env("PYTHONUNBUFFERED", "1")
            .env("IAC_SERVICE", &service.key)
            .env("IAC_TASK", &service.task)
            .env("IAC_COMMIT", commit)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if force {
            cmd.env("IAC_FORCE", "1");
        }
        die_with_parent(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return TaskEnd::CannotStart(format!("cannot start {:?}: {e}", argv[0])),
        };
        let Some(pgid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
            return TaskEnd::CannotStart("the task exited before it could be tracked".into());
        };
        if let Err(e) = self.groups.record(pgid) {
            tracing::warn!(error = %e, pgid, "cannot record the task's process group");
        }
        let tail: Tail = Arc::default();
        let output = env.run_log.task(&service.key);
        let readers = [
            child
                .stdout
                .take()
                .map(|out| self.stream(out, service, &env.masker, &tail, &output)),
            child
                .stderr
                .take()
                .map(|err| self.stream(err, service, &env.masker, &tail, &output)),
        ];
        tracing::info!(service = %service.key, task = %service.task, pgid, "task started");

        let end = tokio::select! {
            status = child.wait() => Ok(status.ok().and_then(|s| s.code())),
            _ = tokio::time::sleep(self.timeout) => Err(false),
            _ = interrupt => Err(true),
        };
        // Leftover background processes of the task go with it, so nothing it started can
        // overlap the next sync, and its output pipes close.
        kill_group(pgid);
        let _ = child.wait().await;
        self.groups.forget(pgid);
        for reader in readers.into_iter().flatten() {
            if tokio::time::timeout(Duration::from_secs(2), reader)
                .await
                .is_err()
            {
                tracing::debug!("task output still open after the task ended");
            }
        }
        output.finish().await;
        let tail: Vec<String> = tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        match end {
            Ok(code) => TaskEnd::Exited { code, tail },
            Err(false) => TaskEnd::TimedOut { tail },
            Err(true) => TaskEnd::Interrupted,
        }
    }

    fn stream(
        &self,
        output: impl AsyncRead + Unpin + Send + 'static,
        service: &Service,
        masker: &Masker,
        tail: &Tail,
        run_log: &TaskOutput,
    ) -> tokio::task::JoinHandle<()> {
        let tail = tail.clone();
        let run_log = run_log.clone();
        let key = service.key.clone();
        let keep = self.tail_lines;
        let masker = masker.clone();
        let span = tracing::Span::current();
        let read = async move {
            let mut output = output;
            let keep_line = |line: String| {
                let line = masker.mask(&line);
                tracing::info!(service = %key, "| {line}");
                run_log.line(&line);
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == keep {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            };
            // Fixed-size reads: a task printing endlessly without a newline costs at most
            // one chunk and one cut line.
            let mut chunk = vec![0u8; READ_CHUNK_BYTES];
            let mut lines = LineCutter::default();
            loop {
                match output.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => lines.feed(&chunk[..n], keep_line),
                }
            }
            if let Some(last) = lines.finish() {
                keep_line(last);
            }
        };
        tokio::spawn(read.instrument(span))
    }
}

/// Makes the worker process not dumpable: a task running as the same user can then neither
/// read `/proc/<worker>/environ` (the worker's secrets) nor attach to it. Linux only.
pub fn forbid_inspection() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Why a service must not run, if it must not: the reason discovery found, or a task that a
/// command would read as an option.
fn refusal(service: &Service) -> Option<String> {
    service.refused.clone().or_else(|| {
        service.task.starts_with('-').then(|| {
            format!(
                "refused: the task {:?} of {} starts with '-', which a command would read as an option",
                service.task, service.dir
            )
        })
    })
}

/// Splits output into lines as it arrives, keeping at most [`MAX_LINE_BYTES`] of each line
/// and counting what it drops, so that a line without end costs bounded memory.
#[derive(Debug, Default)]
struct LineCutter {
    kept: Vec<u8>,
    cut: usize,
}

impl LineCutter {
    /// Takes the next piece of output, handing each line it completes to `emit`.
    fn feed(&mut self, mut piece: &[u8], mut emit: impl FnMut(String)) {
        while let Some(end) = piece.iter().position(|&b| b == b'\n') {
            self.take(&piece[..end]);
            emit(self.line());
            piece = &piece[end + 1..];
        }
        self.take(piece);
    }

    /// The unfinished last line, when the output ended without a newline.
    fn finish(&mut self) -> Option<String> {
        (!self.kept.is_empty() || self.cut > 0).then(|| self.line())
    }

    fn take(&mut self, part: &[u8]) {
        let room = MAX_LINE_BYTES - self.kept.len();
        let kept = part.len().min(room);
        self.kept.extend_from_slice(&part[..kept]);
        self.cut += part.len() - kept;
    }

    fn line(&mut self) -> String {
        let mut line = String::from_utf8_lossy(&self.kept).trim_end().to_string();
        if self.cut > 0 {
            line.push_str(&format!("… [cut: {} bytes]", self.cut));
        }
        self.kept.clear();
        self.cut = 0;
        line
    }
}

/// Makes the kernel kill the task when the worker dies, so a redelivered sync never overlaps
/// an orphan of the previous one.
fn die_with_parent(cmd: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The worker may have died between fork and prctl.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the worker exited"));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// SIGKILL to a whole process group.
pub fn kill_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: plain syscall on a process group id we started.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// True while some process of the group exists and is not a zombie (a killed process whose
/// parent has not collected it yet can do no more harm).
pub fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if pgid <= 1 || unsafe { libc::killpg(pgid, 0) } != 0 {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| live_group_of(&stat))
            == Some(pgid)
    })
}

/// The process group in a `/proc/<pid>/stat` line, unless the process is a zombie.
fn live_group_of(stat: &str) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    (state != "Z").then_some(pgrp)
}

/// Kills the process groups a previous worker recorded in `groups` that still run, and waits
/// until they are gone.
pub async fn kill_orphaned_tasks(groups: &TaskGroups) {
    let alive: Vec<i32> = groups
        .recorded()
        .into_iter()
        .filter(|&pgid| group_alive(pgid))
        .collect();
    for &pgid in &alive {
        tracing::warn!(
            pgid,
            "a task of an earlier sync is still running; killing it"
        );
        kill_group(pgid);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive.iter().any(|&pgid| group_alive(pgid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    groups.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_split_without_a_shell_and_the_task_filled_in() {
        let command =
            SyncCommand::parse(r#"/opt/venv/bin/invoke --echo "{task}" -f 'my file'"#).unwrap();
        assert_eq!(
            command.for_task("postgres.sync"),
            [
                "/opt/venv/bin/invoke",
                "--echo",
                "postgres.sync",
                "-f",
                "my file"
            ]
        );
        let injected = SyncCommand::parse("invoke {task}").unwrap();
        assert_eq!(injected.for_task("x; rm -rf /"), ["invoke", "x; rm -rf /"]);
    }

    #[test]
    fn a_command_without_a_program_or_task_is_refused() {
        assert!(SyncCommand::parse("").unwrap_err().contains("program"));
        assert!(
            SyncCommand::parse("invoke deploy")
                .unwrap_err()
                .contains("{task}")
        );
        assert!(
            SyncCommand::parse("invoke '{task}")
                .unwrap_err()
                .contains("split")
        );
    }

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn invoke_runs_through_its_python_with_the_checkout_behind_the_standard_library() {
        let argv = args(&["/opt/venv/bin/invoke", "--echo", "postgres.sync"]);
        assert_eq!(
            launch_argv(&argv, Some("#!/opt/venv/bin/python")),
            [
                "/opt/venv/bin/python",
                "-P",
                "-c",
                INVOKE_BOOTSTRAP,
                "--echo",
                "postgres.sync"
            ]
        );
        let env = launch_argv(&args(&["inv", "x.sync"]), Some("#!/usr/bin/env python3 -u"));
        assert_eq!(env[..4], ["/usr/bin/env", "python3", "-P", "-c"]);
        assert_eq!(env.last().map(String::as_str), Some("x.sync"));
        assert!(INVOKE_BOOTSTRAP.contains("sys.path.append"));
        assert!(!INVOKE_BOOTSTRAP.contains("insert"));
    }

    #[test]
    fn other_commands_and_an_invoke_that_is_not_a_python_script_run_as_written() {
        for (argv, head) in [
            (args(&["make", "postgres.sync"]), Some("#!/usr/bin/python3")),
            (args(&["/usr/bin/python3", "-m", "invoke", "x"]), None),
            (args(&["invoke", "x"]), Some("#!/bin/sh")),
            (args(&["invoke", "x"]), None),
            (args(&["./invoke-wrapper", "x"]), Some("#!/usr/bin/python3")),
        ] {
            assert_eq!(launch_argv(&argv, head), argv, "{argv:?} {head:?}");
        }
    }

    #[test]
    fn the_pinned_invoke_script_is_found_on_path_with_its_interpreter() {
        let dir = std::env::temp_dir().join(format!("iac-worker-task-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("invoke");
        std::fs::write(&script, "#!/some/python3\nimport sys\n").unwrap();
        assert_eq!(script_head(&script).as_deref(), Some("#!/some/python3"));
        std::fs::write(&script, "not a script").unwrap();
        assert_eq!(script_head(&script), None);
        assert_eq!(
            resolve_program("bin/invoke", &dir, None),
            Some(dir.join("bin/invoke"))
        );
        let path = Some("/usr/bin:/bin");
        assert!(resolve_program("sh", &dir, path).is_some_and(|p| p.is_absolute()));
        assert_eq!(resolve_program("no-such-program-here", &dir, path), None);
        assert_eq!(
            resolve_program("sh", &dir, None),
            None,
            "no PATH, nothing found"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn cut_lines(pieces: &[&[u8]]) -> Vec<String> {
        let mut cutter = LineCutter::default();
        let mut lines = Vec::new();
        for piece in pieces {
            cutter.feed(piece, |line| lines.push(line));
        }
        lines.extend(cutter.finish());
        lines
    }

    #[test]
    fn output_is_split_into_lines_across_reads() {
        assert_eq!(
            cut_lines(&[b"one\ntw", b"o\r\n", b"\nthree"]),
            ["one", "two", "", "three"]
        );
        assert!(cut_lines(&[b""]).is_empty());
    }

    #[test]
    fn a_line_over_16_kib_is_cut_and_marked_however_it_arrives() {
        let long = vec![b'x'; 61440];
        let whole = cut_lines(&[&long, b"\nnext\n"]);
        let expected = format!("{}… [cut: 45056 bytes]", "x".repeat(MAX_LINE_BYTES));
        assert_eq!(whole, [expected.as_str(), "next"]);
        let in_pieces: Vec<&[u8]> = long.chunks(1000).chain([&b"\nnext\n"[..]]).collect();
        assert_eq!(cut_lines(&in_pieces), whole);
    }

    #[test]
    fn endless_output_without_a_newline_keeps_one_bounded_line() {
        let mut cutter = LineCutter::default();
        let chunk = vec![b'y'; READ_CHUNK_BYTES];
        for _ in 0..1000 {
            cutter.feed(&chunk, |_| panic!("no newline, no line"));
            assert!(cutter.kept.len() <= MAX_LINE_BYTES);
        }
        let last = cutter.finish().unwrap();
        assert!(last.ends_with(&format!(
            "… [cut: {} bytes]",
            1000 * READ_CHUNK_BYTES - MAX_LINE_BYTES
        )));
    }

    #[test]
    fn a_refused_service_or_a_task_like_an_option_is_never_started() {
        let service = |task: &str, refused: Option<&str>| Service {
            key: "platform/x".into(),
            task: task.into(),
            dir: "platform/01.x".into(),
            refused: refused.map(str::to_string),
        };
        assert_eq!(refusal(&service("x.sync", None)), None);
        let told = refusal(&service("x.sync", Some("refused: because"))).unwrap();
        assert_eq!(told, "refused: because");
        let option = refusal(&service("--list", None)).unwrap();
        assert!(option.contains("'-'") && option.contains("platform/01.x"));
    }

    #[test]
    fn zombies_do_not_count_as_a_running_group() {
        assert_eq!(live_group_of("42 (python3 (x)) S 1 42 42 0"), Some(42));
        assert_eq!(live_group_of("42 (sleep) Z 1 42 42 0"), None);
        assert_eq!(live_group_of("garbage"), None);
        assert!(!group_alive(0) && !group_alive(1));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_worker_process_becomes_undumpable() {
        forbid_inspection().unwrap();
        // SAFETY: PR_GET_DUMPABLE reads a flag of this process.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
