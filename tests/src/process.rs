//! One of the project's binaries running as a user runs it: a clean environment, its output in
//! a file, printed when the test fails, and checked for secrets it must never print.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::tools::project_binary;

/// One of the project's binaries, running, with its output captured in a file.
pub struct ServiceProcess {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    /// Strings that must never appear in the output (checked when the process is dropped).
    secrets: Vec<String>,
}

impl ServiceProcess {
    /// Starts `binary` with exactly `env` (plus PATH and HOME), output to `log`.
    pub fn spawn<K, V>(binary: &str, env: impl IntoIterator<Item = (K, V)>, log: PathBuf) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        Self::spawn_with_args(binary, &[] as &[&str], env, log)
    }

    /// Like [`ServiceProcess::spawn`], with command-line arguments.
    pub fn spawn_with_args<A, K, V>(
        binary: &str,
        args: &[A],
        env: impl IntoIterator<Item = (K, V)>,
        log: PathBuf,
    ) -> Self
    where
        A: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating the log file {}: {e}", log.display()));
        let child = Command::new(project_binary(binary))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        ServiceProcess {
            name: binary.to_string(),
            child: Some(child),
            log,
            secrets: Vec::new(),
        }
    }

    /// Fails the test (when the process is dropped) if its output ever contains one of these.
    pub fn forbid_in_output(mut self, secrets: &[&str]) -> Self {
        self.secrets.extend(
            secrets
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.to_string()),
        );
        self
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the exit (up to `timeout`, then SIGKILL). Blocks the thread: a
    /// service running in the test's own runtime waits meanwhile.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port in the first line of output containing `message`: a service started on port 0
    /// logs the address it bound (`… gateway listening address=127.0.0.1:PORT …`).
    pub fn logged_port(&self, message: &str) -> Option<u16> {
        let output = self.output();
        let line = output.lines().find(|l| l.contains(message))?;
        let (_, after) = line.split_once("127.0.0.1:")?;
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} output ({}) ---\n{}--- end of {} output ---",
                self.name,
                self.log.display(),
                self.output(),
                self.name
            );
            return;
        }
        let output = self.output();
        for secret in &self.secrets {
            assert!(
                !output.contains(secret.as_str()),
                "{} printed a secret it must never log ({} in {})",
                self.name,
                secret.chars().take(4).collect::<String>() + "…",
                self.log.display()
            );
        }
    }
}
