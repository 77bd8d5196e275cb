//! The checkout: cloning, fetching and checking out exactly one commit, and asking git what
//! changed. Every message that leaves this module has the repository's credentials removed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use iac_shared::events::is_valid_git_ref;
use secrecy::ExposeSecret;

use crate::decide::Target;
use crate::repo_url::RepoUrl;

/// Longest any single git command may take (a hung remote must not hold the queue forever).
const GIT_TIMEOUT: Duration = Duration::from_secs(600);

/// A credential helper answering git's `get` with the credentials of `GIT_REPO_URL`.
const CREDENTIAL_HELPER: &str = "credential.helper=!f() { test \"$1\" = get && printf 'username=%s\\npassword=%s\\n' \"$IAC_GIT_USERNAME\" \"$IAC_GIT_PASSWORD\"; }; f";

/// Why the checkout could not be brought to the wanted commit. Texts are already redacted.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git {command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("git {command} did not finish within {}", humantime::format_duration(*after))]
    TimedOut { command: String, after: Duration },
    #[error("cannot run git: {0}")]
    Spawn(String),
    #[error("commit {0} is not in the repository")]
    UnknownCommit(String),
    #[error("{0:?} is not a valid git ref")]
    BadRef(String),
    #[error("cannot prepare the checkout directory: {0}")]
    Workspace(String),
    /// The rule of what may be deployed: its text is the whole error a user sees.
    #[error(
        "{what} is not on {branch} nor on a tag matching {pattern}: only commits on the \
         branch or on such a tag are deployed"
    )]
    NotDeployable {
        what: String,
        branch: String,
        pattern: String,
    },
}

/// A working copy of the monorepo at `dir`, cloned from `url`.
///
/// Only the branch and the tags are ever fetched for a manual sync or a deployment (never
/// `refs/pull/*` or another ref), and what they name runs only when its commit is on the
/// branch or on a tag matching `tag_pattern`.
#[derive(Debug, Clone)]
pub struct Checkout {
    url: RepoUrl,
    branch: String,
    tag_pattern: String,
    dir: PathBuf,
}

impl Checkout {
    pub fn new(url: RepoUrl, branch: String, tag_pattern: String, dir: PathBuf) -> Self {
        Checkout {
            url,
            branch,
            tag_pattern,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Brings the working copy to exactly the commit `target` names, with no file left from
    /// earlier runs; returns the full commit id.
    pub async fn update(&self, target: &Target) -> Result<String, GitError> {
        self.clone_if_missing().await?;
        // A git command killed with an earlier worker may have left its lock behind; we hold
        // the workspace lock, so no other git runs here.
        let _ = tokio::fs::remove_file(self.dir.join(".git/index.lock")).await;
        let branch_ref = format!("+refs/heads/{0}:refs/remotes/origin/{0}", self.branch);
        let mut fetch = vec![
            "fetch",
            "--quiet",
            "--force",
            "--prune",
            "origin",
            &branch_ref,
        ];
        if matches!(target, Target::Ref(_)) {
            fetch.push("+refs/tags/*:refs/tags/*");
        }
        self.git(&fetch).await?;
        let commit = match target {
            Target::Commit(id) if is_full_commit_id(id) => self.check_out_full_id(id).await?,
            Target::Ref(name) => {
                let commit = self.resolve_deployable(name).await?;
                self.check_out(&commit).await?;
                commit
            }
            _ => {
                let commit = self.resolve(target).await?;
                self.check_out(&commit).await?;
                commit
            }
        };
        self.git(&["clean", "-ffdxq"]).await?;
        Ok(commit)
    }

    /// Checks out a full commit id (what every GitHub push names) without asking git to
    /// resolve it first: the checkout fails when the commit is not here, and only then is it
    /// fetched by id. Returns the commit the checkout landed on.
    async fn check_out_full_id(&self, id: &str) -> Result<String, GitError> {
        if self.check_out(id).await.is_err() {
            // Not on the branch (any more): ask for the commit itself.
            self.git(&["fetch", "--quiet", "origin", id])
                .await
                .map_err(|_| GitError::UnknownCommit(id.to_string()))?;
            self.check_out(id).await?;
        }
        self.head().await
    }

    async fn check_out(&self, commit: &str) -> Result<(), GitError> {
        self.git(&["checkout", "--quiet", "--force", "--detach", commit])
            .await
            .map(drop)
    }

    /// The commit checked out: read from `.git/HEAD`, which a detached checkout sets to the
    /// commit's id (a tag's id given to it lands on the tagged commit); asked of git when the
    /// file says something else (another ref storage).
    async fn head(&self) -> Result<String, GitError> {
        let file = tokio::fs::read_to_string(self.dir.join(".git/HEAD")).await;
        match file.as_deref().map(str::trim) {
            Ok(id) if is_full_commit_id(id) => Ok(id.to_string()),
            _ => self.rev_parse("HEAD").await,
        }
    }

    /// The commit `name` (the branch, a tag, a commit id) names among the fetched branch and
    /// tags, when it is on the branch or on a tag matching the pattern.
    async fn resolve_deployable(&self, name: &str) -> Result<String, GitError> {
        if !is_valid_git_ref(name) {
            return Err(GitError::BadRef(name.to_string()));
        }
        let not_deployable = |what: String| GitError::NotDeployable {
            what,
            branch: self.branch.clone(),
            pattern: self.tag_pattern.clone(),
        };
        let remote_branch = format!("refs/remotes/origin/{}", self.branch);
        let branch_names = [
            self.branch.clone(),
            format!("refs/heads/{}", self.branch),
            format!("origin/{}", self.branch),
            remote_branch.clone(),
        ];
        let tag = format!("refs/tags/{name}");
        let is_commit_id = name.len() >= 4 && name.bytes().all(|b| b.is_ascii_hexdigit());
        // Never a local branch: the clone's own `main` stays where it was cloned.
        let candidate = if branch_names.iter().any(|b| b == name) {
            remote_branch.clone()
        } else if name.starts_with("refs/tags/") {
            name.to_string()
        } else if self.rev_parse(&tag).await.is_ok() {
            tag
        } else if is_commit_id {
            name.to_string()
        } else {
            return Err(not_deployable(format!("ref {name:?}")));
        };
        let what = if is_commit_id {
            format!("commit {name}")
        } else {
            format!("ref {name:?}")
        };
        let commit = self
            .rev_parse(&candidate)
            .await
            .map_err(|_| not_deployable(what.clone()))?;
        let on_branch = self
            .git(&["merge-base", "--is-ancestor", &commit, &remote_branch])
            .await
            .is_ok();
        if on_branch || self.on_matching_tag(&commit).await? {
            Ok(commit)
        } else {
            Err(not_deployable(what))
        }
    }

    /// Whether a tag matching the pattern contains `commit`.
    async fn on_matching_tag(&self, commit: &str) -> Result<bool, GitError> {
        let tags = format!("refs/tags/{}", self.tag_pattern);
        let out = self
            .git(&[
                "for-each-ref",
                "--count=1",
                "--format=%(refname)",
                "--contains",
                commit,
                &tags,
            ])
            .await?;
        Ok(!out.trim().is_empty())
    }

    async fn resolve(&self, target: &Target) -> Result<String, GitError> {
        match target {
            Target::BranchHead => {
                self.rev_parse(&format!("refs/remotes/origin/{}", self.branch))
                    .await
            }
            Target::Commit(commit) => {
                if !is_valid_git_ref(commit) {
                    return Err(GitError::BadRef(commit.clone()));
                }
                if let Ok(id) = self.rev_parse(commit).await {
                    return Ok(id);
                }
                // Not on the branch (any more): ask for the commit itself.
                self.git(&["fetch", "--quiet", "origin", commit])
                    .await
                    .map_err(|_| GitError::UnknownCommit(commit.clone()))?;
                self.rev_parse(commit)
                    .await
                    .map_err(|_| GitError::UnknownCommit(commit.clone()))
            }
            Target::Ref(name) => self.resolve_deployable(name).await,
        }
    }

    async fn clone_if_missing(&self) -> Result<(), GitError> {
        if self.dir.join(".git").is_dir() {
            return self.forget_stored_credentials().await;
        }
        if self.dir.exists() {
            tokio::fs::remove_dir_all(&self.dir)
                .await
                .map_err(|e| GitError::Workspace(e.to_string()))?;
        }
        if let Some(parent) = self.dir.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| GitError::Workspace(e.to_string()))?;
        }
        tracing::info!(repository = %self.url, dir = %self.dir.display(), "cloning the repository");
        let dir = self.dir.to_string_lossy().into_owned();
        let result = run_git(
            &self.url,
            None,
            &[
                "clone",
                "--quiet",
                "--no-checkout",
                "--",
                &self.url.for_git(),
                &dir,
            ],
        )
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&self.dir).await;
        }
        result.map(drop)
    }

    /// Takes the credentials out of a checkout an earlier version cloned with them in the URL.
    async fn forget_stored_credentials(&self) -> Result<(), GitError> {
        let secrets = self.url.secrets();
        if secrets.is_empty() {
            return Ok(());
        }
        let config = tokio::fs::read_to_string(self.dir.join(".git/config"))
            .await
            .unwrap_or_default();
        if secrets.iter().any(|secret| config.contains(secret)) {
            tracing::info!("removing the credentials stored in the checkout's git config");
            self.git(&["remote", "set-url", "origin", &self.url.for_git()])
                .await?;
        }
        Ok(())
    }

    /// True when `ancestor` is `descendant` or one of its ancestors (both present here).
    pub async fn is_ancestor(&self, ancestor: &str, descendant: &str) -> bool {
        is_valid_git_ref(ancestor)
            && is_valid_git_ref(descendant)
            && self
                .git(&["merge-base", "--is-ancestor", ancestor, descendant])
                .await
                .is_ok()
    }

    /// True when `commit` is on the deployed branch as last fetched.
    pub async fn on_branch(&self, commit: &str) -> bool {
        let branch = format!("refs/remotes/origin/{}", self.branch);
        self.is_ancestor(commit, &branch).await
    }

    /// The deployed branch's head on the remote now (`git ls-remote`), without fetching;
    /// `None` when the branch does not exist there.
    pub async fn remote_head(&self) -> Result<Option<String>, GitError> {
        let branch = format!("refs/heads/{}", self.branch);
        let out = run_git(
            &self.url,
            None,
            &["ls-remote", "--", &self.url.for_git(), &branch],
        )
        .await?;
        Ok(out
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(_, name)| *name == branch)
            .map(|(id, _)| id.to_string())
            .filter(|id| is_full_commit_id(id)))
    }

    /// True when `commit` names a commit present in the working copy.
    pub async fn has_commit(&self, commit: &str) -> bool {
        is_valid_git_ref(commit)
            && self
                .git(&["cat-file", "-e", &format!("{commit}^{{commit}}")])
                .await
                .is_ok()
    }

    /// Every tracked file at the checked-out commit.
    pub async fn files(&self) -> Result<Vec<String>, GitError> {
        let out = self.git(&["ls-files", "-z"]).await?;
        Ok(split_nul(&out))
    }

    /// Paths that differ between two commits (renames as a removal plus an addition).
    pub async fn changed_paths(&self, before: &str, after: &str) -> Result<Vec<String>, GitError> {
        for commit in [before, after] {
            if !is_valid_git_ref(commit) {
                return Err(GitError::BadRef(commit.to_string()));
            }
        }
        let out = self
            .git(&[
                "diff",
                "--name-only",
                "--no-renames",
                "-z",
                before,
                after,
                "--",
            ])
            .await?;
        Ok(split_nul(&out))
    }

    async fn rev_parse(&self, name: &str) -> Result<String, GitError> {
        let out = self
            .git(&[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{name}^{{commit}}"),
            ])
            .await?;
        Ok(out.trim().to_string())
    }

    async fn git(&self, args: &[&str]) -> Result<String, GitError> {
        run_git(&self.url, Some(&self.dir), args).await
    }
}

async fn run_git(url: &RepoUrl, cwd: Option<&Path>, args: &[&str]) -> Result<String, GitError> {
    // The URL is an argument of `clone`; name the command by its first word only.
    let command = args.first().copied().unwrap_or_default().to_string();
    let mut cmd = tokio::process::Command::new("git");
    // Hooks are off: a task runs in this checkout and could plant one in `.git/hooks`.
    cmd.args([
        "-c",
        "advice.detachedHead=false",
        "-c",
        "core.quotePath=false",
        "-c",
        "core.hooksPath=/dev/null",
    ]);
    if let Some((user, password)) = url.http_credentials() {
        // The helper reads the credentials from git's environment (never its command line,
        // which any process can read), and only git and its helper ever see them.
        cmd.args(["-c", "credential.helper=", "-c", CREDENTIAL_HELPER])
            .env("IAC_GIT_USERNAME", user)
            .env("IAC_GIT_PASSWORD", password.expose_secret());
    }
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let output = match tokio::time::timeout(GIT_TIMEOUT, cmd.output()).await {
        Ok(output) => output.map_err(|e| GitError::Spawn(e.to_string()))?,
        Err(_) => {
            return Err(GitError::TimedOut {
                command,
                after: GIT_TIMEOUT,
            });
        }
    };
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = url.scrub(stderr.trim());
    Err(GitError::Failed {
        command,
        stderr: if stderr.is_empty() {
            format!("exit status {}", output.status.code().unwrap_or(-1))
        } else {
            stderr
        },
    })
}

/// 40 lowercase hexadecimal digits: a full SHA-1 commit id as GitHub writes it.
pub(crate) fn is_full_commit_id(id: &str) -> bool {
    id.len() == 40 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn split_nul(out: &str) -> Vec<String> {
    out.split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
