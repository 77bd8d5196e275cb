//! The workspace directory: the checkout, the lock that keeps two syncs out of it, and the
//! record of the running task's process group; one per environment the worker serves apart.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Layout of `WORKSPACE`.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    pub fn new(root: PathBuf) -> Self {
        Workspace { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The workspace of an environment served apart from pushes: `@<env>` in this one, a name
    /// no repository host gives a repository, so it never meets the checkout.
    pub fn environment(&self, env: &str) -> Workspace {
        Workspace::new(self.root.join(format!("@{env}")))
    }

    pub fn checkout(&self, repo_name: &str) -> PathBuf {
        self.root.join(repo_name)
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join(".sync.lock")
    }

    pub fn pgid_file(&self) -> PathBuf {
        self.root.join(".sync.pgid")
    }

    /// Takes the exclusive OS lock on the workspace, waiting while another process holds it.
    /// The lock is released when the returned file is dropped, or when this process dies.
    pub async fn lock(&self) -> std::io::Result<File> {
        std::fs::create_dir_all(&self.root)?;
        let path = self.lock_file();
        tokio::task::spawn_blocking(move || {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            file.lock()?;
            Ok(file)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}
