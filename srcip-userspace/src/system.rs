//! What the host must provide before anything is loaded: privileges, BTF, cgroup v2, and
//! the bpf and trace file systems. Each failure says what to do about it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::mount::{MsFlags, mount};
use tracing::info;

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
}

/// The mounts of this process's mount namespace, from `/proc/self/mountinfo`.
fn mounts() -> Result<Vec<Mount>, SystemError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| SystemError::Read {
        path: "/proc/self/mountinfo",
        source,
    })?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: the mount point is the
/// fifth field, the file-system type the first after the `-` separator.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let point = before.split(' ').nth(4)?;
    let fstype = after.split(' ').next()?;
    Some(Mount {
        point: PathBuf::from(unescape_octal(point)),
        fstype: fstype.to_owned(),
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
pub fn cgroup2_mount() -> Result<PathBuf, SystemError> {
    mounts()?
        .into_iter()
        .find(|mount| mount.fstype == "cgroup2")
        .map(|mount| mount.point)
        .ok_or(SystemError::NoCgroup2)
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
        })?;
        info!("mounted {fstype} at {target} (it was missing)");
    }
    Ok(())
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
        let escaped = parse_mountinfo_line("1 2 0:1 / /mnt/a\\040b rw - tmpfs tmpfs rw").unwrap();
        assert_eq!(escaped.point, Path::new("/mnt/a b"));
    }
}
