//! The workspace directory: the checkout, the lock that keeps two syncs out of it, and the
//! record of the running tasks' process groups; one per environment the worker serves apart.

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

    /// Where a worker that ran one task at a time recorded its process group.
    pub fn pgid_file(&self) -> PathBuf {
        self.root.join(".sync.pgid")
    }

    /// The record of the process groups of the tasks running now.
    pub fn task_groups(&self) -> TaskGroups {
        TaskGroups {
            dir: self.root.join(".sync.pgids"),
            single: self.pgid_file(),
        }
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

/// The process groups of the running tasks, one empty file per group named by its id, so that
/// tasks starting and ending at once never rewrite a shared file, and a worker starting after
/// a crash finds every group the crashed one left.
#[derive(Debug, Clone)]
pub struct TaskGroups {
    dir: PathBuf,
    /// The one-group record of earlier versions, still read so that an upgrade kills what the
    /// previous version left running.
    single: PathBuf,
}

impl TaskGroups {
    pub fn record(&self, pgid: i32) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join(pgid.to_string()), b"")
    }

    pub fn forget(&self, pgid: i32) {
        let _ = std::fs::remove_file(self.dir.join(pgid.to_string()));
    }

    /// Every recorded group, in id order.
    pub fn recorded(&self) -> Vec<i32> {
        let mut groups: Vec<i32> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        if let Ok(text) = std::fs::read_to_string(&self.single)
            && let Ok(pgid) = text.trim().parse()
        {
            groups.push(pgid);
        }
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// Forgets every group.
    pub fn clear(&self) {
        for pgid in self.recorded() {
            self.forget(pgid);
        }
        let _ = std::fs::remove_file(&self.single);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_recorded_one_by_one_and_the_old_single_record_is_read_too() {
        let root = std::env::temp_dir().join(format!("iac-groups-{}", std::process::id()));
        let workspace = Workspace::new(root.clone());
        let groups = workspace.task_groups();
        assert!(groups.recorded().is_empty());
        groups.record(40).unwrap();
        groups.record(7).unwrap();
        std::fs::write(workspace.pgid_file(), "12\n").unwrap();
        assert_eq!(groups.recorded(), [7, 12, 40]);
        groups.forget(40);
        assert_eq!(groups.recorded(), [7, 12]);
        groups.clear();
        assert!(groups.recorded().is_empty());
        assert!(!workspace.pgid_file().exists());
        std::fs::remove_dir_all(root).unwrap();
    }
}
