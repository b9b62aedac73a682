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
