//! What the host must provide before anything is loaded: privileges, BTF, cgroup v2, and
//! the bpf and trace file systems. Each failure says what to do about it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask},
};
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(
        "srcip needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: run it with sudo"
    )]
    NotPrivileged,
    #[error(
        "the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): srcip needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error(
        "cgroup v2 is not mounted: mount it (mount -t cgroup2 none /sys/fs/cgroup) or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("{fstype} is not mounted at {} and mounting it failed", target.display())]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        source: nix::Error,
    },
}

/// Capability numbers from `linux/capability.h`.
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Loading and attaching cgroup programs needs CAP_BPF + CAP_NET_ADMIN, and reading the
/// current task's pid and comm in them needs CAP_PERFMON; CAP_SYS_ADMIN implies all three.
pub fn require_privileges() -> Result<(), SystemError> {
    let has = effective_capabilities()?;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN)) {
        Ok(())
    } else {
        Err(SystemError::NotPrivileged)
    }
}

/// What srcip cannot report with the capabilities it has (the `degraded` list of `started`).
pub fn degraded_by_privileges() -> Result<Vec<String>, SystemError> {
    let has = effective_capabilities()?;
    let mut degraded = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        degraded.push(
            "netns: entering a namespace to learn its inode needs CAP_SYS_ADMIN; netns is null"
                .to_owned(),
        );
    }
    if !has(CAP_DAC_READ_SEARCH) {
        degraded.push(
            "cgroup: opening a cgroup by its id needs CAP_DAC_READ_SEARCH; cgroup is null"
                .to_owned(),
        );
    }
    if !has(CAP_SYS_PTRACE) {
        degraded.push(
            "udp: adopting other processes' UDP and MPTCP sockets made before srcip started needs CAP_SYS_PTRACE (pidfd_getfd); their datagrams, and the MPTCP subflows opened later, are not audited"
                .to_owned(),
        );
    }
    Ok(degraded)
}

/// A test for each capability in this process's effective set.
fn effective_capabilities() -> Result<impl Fn(u32) -> bool, SystemError> {
    let status = fs::read_to_string("/proc/self/status").map_err(|source| SystemError::Read {
        path: "/proc/self/status",
        source,
    })?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    Ok(move |cap: u32| effective & (1 << cap) != 0)
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> Result<String, SystemError> {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .map_err(|source| SystemError::Read {
            path: "/proc/sys/kernel/osrelease",
            source,
        })
}

pub fn require_btf() -> Result<(), SystemError> {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err(SystemError::NoBtf)
    }
}

struct Mount {
    point: PathBuf,
    fstype: String,
    /// In a peer group (`shared:N`): a mount on it propagates to the peers' namespaces.
    shared: bool,
}

/// The mounts of this process's mount namespace, from `/proc/self/mountinfo`.
fn mounts() -> Result<Vec<Mount>, SystemError> {
    mounts_of("/proc/self/mountinfo")
}

/// The mounts listed in `mountinfo`, a `/proc/PID/mountinfo`.
fn mounts_of(mountinfo: &'static str) -> Result<Vec<Mount>, SystemError> {
    let text = fs::read_to_string(mountinfo).map_err(|source| SystemError::Read {
        path: mountinfo,
        source,
    })?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: the mount point is the
/// fifth field, optional fields (`shared:N`, `master:N`) follow the sixth up to the `-`
/// separator, and the file-system type is the first after it.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let point = before.split(' ').nth(4)?;
    let shared = before
        .split(' ')
        .skip(6)
        .any(|field| field.starts_with("shared:"));
    let fstype = after.split(' ').next()?;
    Some(Mount {
        point: PathBuf::from(unescape_octal(point)),
        fstype: fstype.to_owned(),
        shared,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(index) = rest.find('\\') {
        out.push_str(&rest[..index]);
        let code = rest.get(index + 1..index + 4);
        match code.and_then(|digits| u8::from_str_radix(digits, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[index + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[index + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified`
/// on a hybrid one. Never assume either.
///
/// `ip netns exec` runs its command in a mount namespace of its own with a fresh `/sys`,
/// which hides the cgroup file systems the host mounted under it. When this namespace has
/// no cgroup2 but PID 1's has, srcip mounts it at `/sys/fs/cgroup` here: the same
/// hierarchy, seen from this namespace only, and gone with it. Only where nothing
/// propagates back: the mount holding `/sys/fs/cgroup` must not be shared (`ip netns exec`
/// makes its mounts slaves of the host's; a shared one would carry the mount to the host).
pub fn cgroup2_mount() -> Result<PathBuf, SystemError> {
    let present = mounts()?;
    if let Some(mount) = present.iter().find(|mount| mount.fstype == "cgroup2") {
        return Ok(mount.point.clone());
    }
    let target = Path::new("/sys/fs/cgroup");
    let host_has_cgroup2 = mounts_of("/proc/1/mountinfo")
        .is_ok_and(|host| host.iter().any(|mount| mount.fstype == "cgroup2"));
    // The innermost mount that holds the target: the longest mount point above it.
    let holder = present
        .iter()
        .filter(|mount| target.starts_with(&mount.point))
        .max_by_key(|mount| mount.point.as_os_str().len());
    if !host_has_cgroup2 || holder.is_none_or(|mount| mount.shared) || !target.is_dir() {
        return Err(SystemError::NoCgroup2);
    }
    mount_file_system("cgroup2", target)?;
    info!(
        "mounted cgroup2 at {} in srcip's mount namespace, which hid the host's (ip netns exec)",
        target.display()
    );
    Ok(target.to_owned())
}

/// Mounts the kernel's file system `fstype` at `target`, as systemd mounts it at boot.
fn mount_file_system(fstype: &'static str, target: &Path) -> Result<(), SystemError> {
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| SystemError::Mount {
        fstype,
        target: target.into(),
        source,
    })
}

/// Mounts bpffs at /sys/fs/bpf and tracefs at /sys/kernel/tracing when they are missing, as
/// systemd would at boot; a minimal host or a fresh VM may have neither. They stay mounted,
/// like any system mount.
pub fn ensure_kernel_file_systems() -> Result<(), SystemError> {
    let present = mounts()?;
    for (fstype, target) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        if present.iter().any(|mount| mount.fstype == fstype) {
            continue;
        }
        mount_file_system(fstype, Path::new(target))?;
        info!("mounted {fstype} at {target} (it was missing)");
    }
    Ok(())
}

/// Blocks SIGHUP, SIGINT and SIGTERM in this thread until dropped: they stay pending, or go
/// to a thread that takes them, and are handled then. Around every `BPF_PROG_LOAD`: the
/// verifier gives up with EAGAIN when a signal is pending for its thread, which a program
/// load would report as a refusal, and a helper probe (aya's `is_helper_supported`) as a
/// helper the kernel has.
pub struct HandledSignalsDeferred {
    previous: Option<SigSet>,
}

impl HandledSignalsDeferred {
    pub fn new() -> Self {
        let mut handled = SigSet::empty();
        for signal in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM] {
            handled.add(signal);
        }
        let mut previous = SigSet::empty();
        let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled), Some(&mut previous));
        if let Err(error) = &blocked {
            debug!(
                "cannot defer signals while loading ({error}); a load they interrupt is made again"
            );
        }
        Self {
            previous: blocked.ok().map(|()| previous),
        }
    }
}

impl Drop for HandledSignalsDeferred {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous
            && let Err(error) = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(previous), None)
        {
            warn!("cannot restore the signal mask after loading: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_mount_point_and_type() {
        let mount = parse_mountinfo_line(
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw",
        )
        .unwrap();
        assert_eq!(mount.point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(mount.fstype, "cgroup2");
        assert!(mount.shared);
        let slave = parse_mountinfo_line("50 40 0:22 / /sys rw master:7 - sysfs sysfs rw").unwrap();
        assert!(!slave.shared);
        let escaped = parse_mountinfo_line("1 2 0:1 / /mnt/a\\040b rw - tmpfs tmpfs rw").unwrap();
        assert_eq!(escaped.point, Path::new("/mnt/a b"));
    }
}
