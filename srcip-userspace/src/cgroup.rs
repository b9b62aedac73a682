//! cgroup v2: resolving `--cgroup` arguments, and naming the cgroup of an event.
//!
//! A cgroup v2 id is the inode number of its directory, which is what the kernel reports.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use walkdir::WalkDir;

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "--cgroup {given}: no such cgroup directory ({}); give a path under the cgroup2 mount {}, such as /system.slice/NAME.service",
        resolved.display(), mount.display()
    )]
    NotFound {
        given: String,
        resolved: PathBuf,
        mount: PathBuf,
    },
    #[error("--cgroup {given}: {} is not inside the cgroup2 mount {}", resolved.display(), mount.display())]
    OutsideMount {
        given: String,
        resolved: PathBuf,
        mount: PathBuf,
    },
}

/// A cgroup whose processes (and their descendants') are audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditedCgroup {
    pub id: u64,
    /// Depth below the cgroup2 root, which is level 0.
    pub level: u32,
    /// Path relative to the cgroup2 mount, starting with `/`.
    pub path: String,
    /// The directory itself, to notice when it is recreated.
    pub dir: PathBuf,
}

impl AuditedCgroup {
    /// The id of the directory now at this path: it differs from `id` once the cgroup was
    /// removed and created again (as systemd does on every restart of a unit).
    pub fn current_id(&self) -> Option<u64> {
        let metadata = std::fs::metadata(&self.dir).ok()?;
        metadata.is_dir().then(|| metadata.ino())
    }
}

/// Resolves a `--cgroup` argument: an absolute path under the cgroup2 mount, or a path
/// relative to that mount (`/system.slice/payments.service`).
pub fn resolve_audited(mount: &Path, given: &str) -> Result<AuditedCgroup, ScopeError> {
    let candidate = if Path::new(given).starts_with(mount) {
        PathBuf::from(given)
    } else {
        mount.join(given.trim_start_matches('/'))
    };
    let not_found = || ScopeError::NotFound {
        given: given.to_owned(),
        resolved: candidate.clone(),
        mount: mount.to_owned(),
    };
    let resolved = candidate.canonicalize().map_err(|_| not_found())?;
    let metadata = resolved.metadata().map_err(|_| not_found())?;
    if !metadata.is_dir() {
        return Err(not_found());
    }
    let relative = resolved
        .strip_prefix(mount)
        .map_err(|_| ScopeError::OutsideMount {
            given: given.to_owned(),
            resolved: resolved.clone(),
            mount: mount.to_owned(),
        })?;
    Ok(AuditedCgroup {
        id: metadata.ino(),
        level: relative.components().count() as u32,
        path: relative_path_string(relative),
        dir: resolved.clone(),
    })
}

fn relative_path_string(relative: &Path) -> String {
    format!("/{}", relative.display())
}

/// cgroup id → path relative to the cgroup2 mount, learnt by walking the hierarchy when an
/// unknown id shows up. One walk records every cgroup it passes, so a steady host walks once.
pub struct CgroupNames {
    mount: PathBuf,
    known: HashMap<u64, Option<String>>,
}

impl CgroupNames {
    pub fn new(mount: PathBuf) -> Self {
        Self {
            mount,
            known: HashMap::new(),
        }
    }

    /// The path of cgroup `id`, or `None` when it no longer exists.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(known) = self.known.get(&id) {
            return known.clone();
        }
        for entry in WalkDir::new(&self.mount)
            .same_file_system(true)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_type().is_dir())
        {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            let Ok(relative) = entry.path().strip_prefix(&self.mount) else {
                continue;
            };
            self.known
                .insert(metadata.ino(), Some(relative_path_string(relative)));
        }
        // Remember misses too: cgroup ids are not reused, so a vanished cgroup stays gone.
        self.known.entry(id).or_insert(None).clone()
    }
}
