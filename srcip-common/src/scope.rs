//! Which processes are audited when `--cgroup` is given.
//!
//! The programs are attached once, at the cgroup2 root, so that a systemd unit whose cgroup
//! directory is recreated on restart does not lose them. The kernel side then keeps a
//! connection only when an ancestor of the connecting task's cgroup (or the cgroup itself)
//! is in `AUDITED_CGROUPS`. `AUDITED_CGROUP_LEVELS` has bit `n` set when some audited cgroup
//! sits at depth `n` below the root (the root is depth 0); zero means "audit everything".

/// Capacity of the `AUDITED_CGROUPS` hash.
pub const MAX_AUDITED_CGROUPS: u32 = 1024;

/// Deepest cgroup level that can be audited (bits of the `u64` level mask).
pub const MAX_CGROUP_LEVEL: u32 = 63;

/// Bytes of an audited cgroup's path kept for the kernel to recognise it when it is created
/// again: longer paths are followed by user space's once-a-second look only.
pub const CGROUP_PATH_BYTES: usize = 256;

/// An audited cgroup's path from the cgroup2 hierarchy's root (`/system.slice/x.service`),
/// NUL-padded: the key of `AUDITED_CGROUP_PATHS`, compared whole with the path the kernel's
/// `cgroup:cgroup_mkdir` and `cgroup_rmdir` tracepoints give.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CgroupPath {
    pub bytes: [u8; CGROUP_PATH_BYTES],
}

impl CgroupPath {
    /// `None` when `path` does not fit with its NUL.
    pub fn new(path: &str) -> Option<Self> {
        let mut bytes = [0; CGROUP_PATH_BYTES];
        let path = path.as_bytes();
        // One byte short of the NUL's room: the kernel cuts a longer path to exactly that
        // length, which then equals no audited path.
        if path.len() >= CGROUP_PATH_BYTES - 1 {
            return None;
        }
        bytes[..path.len()].copy_from_slice(path);
        Some(Self { bytes })
    }
}

/// The cgroup2 hierarchy's id in the `root` field of the cgroup tracepoints (v1 hierarchies
/// have their own, from 1).
pub const CGROUP2_HIERARCHY: i32 = 0;

#[cfg(feature = "user")]
mod user {
    // SAFETY: a byte array.
    unsafe impl aya::Pod for super::CgroupPath {}
}
