//! cgroup v2: resolving `--cgroup` arguments, and naming the cgroup of an event.
//!
//! A cgroup v2 id is the inode number of its directory, which is what the kernel reports. It
//! is also the cgroup's kernfs file handle, so `open_by_handle_at` on the cgroup2 mount opens
//! the directory of an id directly (Linux ≥ 5.5, CAP_DAC_READ_SEARCH), without walking the
//! hierarchy. A removed cgroup can no longer be opened and is named `null`.

use std::{
    fs::File,
    num::NonZeroUsize,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use lru::LruCache;

use crate::workload;

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
    #[error(
        "--netns {given}: no network namespace at {}: give a name `ip netns list` shows, or a path such as /proc/PID/ns/net",
        path.display()
    )]
    NetnsNotFound { given: String, path: PathBuf },
    #[error(
        "--netns {given}: {} is not a network namespace (`ip netns add` makes one under /run/netns; a process's is /proc/PID/ns/net)",
        path.display()
    )]
    NotNetns { given: String, path: PathBuf },
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

/// How many cgroup names are remembered: far more than the cgroups a host reports on at once.
const CACHED_NAMES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// cgroup id → path relative to the cgroup2 mount, opened by handle and remembered in a
/// bounded cache.
pub struct CgroupNames {
    mount: PathBuf,
    /// The mount's root directory, which `open_by_handle_at` resolves handles against.
    root: Option<File>,
    known: LruCache<u64, Option<CgroupName>>,
}

/// A cgroup's path and the workload its path names, worked out once per cgroup and shared
/// by every alert about it.
#[derive(Debug, Clone)]
pub struct CgroupName {
    /// Relative to the cgroup2 mount, starting with `/`.
    pub path: Arc<str>,
    pub unit: Option<Arc<str>>,
    pub container: Option<Arc<str>>,
}

impl CgroupName {
    fn new(path: String) -> Self {
        Self {
            unit: workload::unit_of(&path).map(Arc::from),
            container: workload::container_of(&path).map(Arc::from),
            path: path.into(),
        }
    }
}

impl CgroupNames {
    pub fn new(mount: PathBuf) -> Self {
        Self {
            root: File::open(&mount).ok(),
            mount,
            known: LruCache::new(CACHED_NAMES),
        }
    }

    /// The names of cgroup `id`, or `None` when it no longer exists. Misses are remembered
    /// too: cgroup ids are never reused, so a vanished cgroup stays gone.
    pub fn name_of(&mut self, id: u64) -> Option<CgroupName> {
        if let Some(known) = self.known.get(&id) {
            return known.clone();
        }
        let path = self.open(id).and_then(|directory| {
            let target = std::fs::read_link(format!("/proc/self/fd/{}", directory.as_raw_fd()));
            let target = target.ok()?;
            target
                .strip_prefix(&self.mount)
                .ok()
                .map(|path| CgroupName::new(relative_path_string(path)))
        });
        self.known.put(id, path.clone());
        path
    }

    fn open(&self, id: u64) -> Option<OwnedFd> {
        /// `struct file_handle` with the 8 bytes a kernfs handle has.
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        /// `FILEID_KERNFS` in the kernel's `include/linux/exportfs.h`.
        const FILEID_KERNFS: i32 = 0xfe;
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        let root = self.root.as_ref()?;
        // SAFETY: `handle` is a valid `file_handle` with `handle_bytes` bytes of payload, and
        // lives across the call; the returned descriptor is owned by nobody else.
        let fd = unsafe {
            libc::open_by_handle_at(
                root.as_raw_fd(),
                std::ptr::from_mut(&mut handle).cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        // SAFETY: a non-negative result is a new descriptor that this process owns.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
