//! Running one service's task: the configured command without a shell, in the checkout, in its
//! own process group, its output streamed to the log, killed on timeout or with the worker.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iac_shared::rules::Service;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tracing::Instrument;

use crate::task_env::{Masker, TaskEnv};

const TASK_PLACEHOLDER: &str = "{task}";

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

/// Everything a task run needs besides the service.
#[derive(Debug, Clone)]
pub struct TaskRunner {
    pub command: SyncCommand,
    pub timeout: Duration,
    pub tail_lines: usize,
    /// Where the running task's process group id is kept for a successor to find.
    pub pgid_file: PathBuf,
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
        let argv = self.command.for_task(&service.task);
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(checkout)
            .env_clear()
            .envs(&env.vars)
            .env("PYTHONPATH", checkout)
            .env("PYTHONUNBUFFERED", "1")
            .env("IAC_SERVICE", &service.key)
            .env("IAC_TASK", &service.task)
            .env("IAC_COMMIT", commit)
            .env_remove("IAC_FORCE")
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
        if let Err(e) = std::fs::write(&self.pgid_file, pgid.to_string()) {
            tracing::warn!(error = %e, file = %self.pgid_file.display(), "cannot record the task's process group");
        }
        let tail: Tail = Arc::default();
        let readers = [
            child
                .stdout
                .take()
                .map(|out| self.stream(out, service, &env.masker, &tail)),
            child
                .stderr
                .take()
                .map(|err| self.stream(err, service, &env.masker, &tail)),
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
        let _ = std::fs::remove_file(&self.pgid_file);
        for reader in readers.into_iter().flatten() {
            if tokio::time::timeout(Duration::from_secs(2), reader)
                .await
                .is_err()
            {
                tracing::debug!("task output still open after the task ended");
            }
        }
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
    ) -> tokio::task::JoinHandle<()> {
        let tail = tail.clone();
        let key = service.key.clone();
        let keep = self.tail_lines;
        let masker = masker.clone();
        let span = tracing::Span::current();
        let read = async move {
            let mut reader = BufReader::new(output);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = masker.mask(String::from_utf8_lossy(&buf).trim_end());
                tracing::info!(service = %key, "| {line}");
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == keep {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
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

/// Kills the process group a previous worker recorded in `pgid_file`, if it still runs, and
/// waits until it is gone.
pub async fn kill_orphaned_task(pgid_file: &Path) {
    let Ok(text) = tokio::fs::read_to_string(pgid_file).await else {
        return;
    };
    let pgid: i32 = text.trim().parse().unwrap_or(0);
    if group_alive(pgid) {
        tracing::warn!(
            pgid,
            "a task of an earlier sync is still running; killing it"
        );
        kill_group(pgid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while group_alive(pgid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = tokio::fs::remove_file(pgid_file).await;
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
