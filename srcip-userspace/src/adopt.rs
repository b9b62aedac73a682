//! UDP and MPTCP sockets made before srcip started.
//!
//! `cgroup/sock_create` records the owner of every socket made while srcip runs, and
//! `cgroup/connect4/6` adopt a socket made earlier when it connects. An unconnected UDP
//! socket made earlier (a resolver, a syslog or metrics client started at boot) never
//! connects, and a connected one did so before srcip was there: no hook that knows the
//! sender sees them again, except `cgroup/sendmsg4/6`. Attaching either makes the kernel take
//! the socket's lock around every unconnected datagram of every socket on the host, which
//! cost a UDP send storm about 5 % (docs/BENCHMARKS.md). An MPTCP socket connected before
//! srcip started opens its later subflows in a kernel worker: `connect4/6` finds the MPTCP
//! socket (`srcip-ebpf/src/owner.rs`), but no owner on it, and the worker is no owner.
//!
//! So user space adopts them once, when srcip starts: it lists each process's sockets in
//! `/proc/PID/fd`, takes a copy of each with `pidfd_getfd` (Linux 5.6, CAP_SYS_PTRACE), and
//! stores the process as the owner in the socket-owner storage, which takes a socket
//! descriptor as its key. The programs are attached before the scan, so a socket made during
//! it is recorded by `sock_create`, and the scan never overwrites an entry (`BPF_NOEXIST`).
//! A socket shared by several processes is owned by the first one found.

use std::{
    collections::HashSet,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::MapError;
use srcip_common::owner::{SocketOwner, UdpOwner};
use tracing::{debug, info, warn};

use crate::{cgroup::AuditedCgroup, netns::NetnsInodes};

/// The map update flag "only if absent" (`linux/bpf.h`).
const BPF_NOEXIST: u64 = 1;

/// What a scan did, for the log.
#[derive(Debug, Default)]
pub struct Adoption {
    /// UDP and MPTCP sockets given an owner.
    pub sockets: usize,
    /// Processes whose sockets could not be copied (`pidfd_getfd` refused: no
    /// CAP_SYS_PTRACE, or a security module).
    pub refused: usize,
}

/// Which processes' sockets are audited: those in the audited cgroups or below them, or
/// every process when there are none.
pub struct Scope<'a> {
    pub cgroup2_mount: &'a Path,
    pub audited: &'a [AuditedCgroup],
}

/// Gives every audited process's UDP and MPTCP sockets that have no owner yet that process
/// as owner.
pub fn adopt_sockets(netns: &mut NetnsInodes, scope: &Scope<'_>) -> Adoption {
    let mut adoption = Adoption::default();
    let mut seen = HashSet::new();
    let own_pid = std::process::id();
    for pid in process_ids() {
        if pid == own_pid {
            continue;
        }
        // A process that exits during the scan has nothing left to adopt.
        match adopt_process(pid, netns, scope, &mut seen) {
            Ok(sockets) => adoption.sockets += sockets,
            Err(error) if error.raw_os_error() == Some(libc::EPERM) => adoption.refused += 1,
            Err(error) if error.raw_os_error() == Some(libc::ENOSYS) => {
                warn!(
                    "this kernel has no pidfd_getfd (Linux 5.6): UDP and MPTCP sockets made \
                     before srcip started are not audited"
                );
                return adoption;
            }
            Err(error) => debug!("adopting the sockets of process {pid}: {error}"),
        }
    }
    if adoption.refused > 0 {
        warn!(
            "could not copy the sockets of {} processes (pidfd_getfd needs CAP_SYS_PTRACE): \
             their UDP and MPTCP sockets made before srcip started are not audited",
            adoption.refused
        );
    }
    info!(
        "adopted {} UDP and MPTCP sockets made before srcip started",
        adoption.sockets
    );
    adoption
}

fn process_ids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The number of sockets of `pid` adopted. `seen` holds the socket inodes already handled.
fn adopt_process(
    pid: u32,
    netns: &mut NetnsInodes,
    scope: &Scope<'_>,
    seen: &mut HashSet<u64>,
) -> io::Result<usize> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Some(cgroup) = cgroup_dir(&proc_dir, scope.cgroup2_mount)? else {
        return Ok(0);
    };
    if !is_audited(&cgroup, scope) {
        return Ok(0);
    }
    let mut sockets = Vec::new();
    for entry in fs::read_dir(proc_dir.join("fd"))? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|target| target.strip_prefix("socket:["))
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| inode.parse::<u64>().ok());
        let fd = entry.file_name().to_str().and_then(|fd| fd.parse().ok());
        if let (Some(inode), Some(fd)) = (inode, fd)
            && seen.insert(inode)
        {
            sockets.push(fd);
        }
    }
    if sockets.is_empty() {
        return Ok(0);
    }
    let pidfd = pidfd_open(pid)?;
    let mut owner = None;
    let mut adopted = 0;
    for fd in sockets {
        let socket = match pidfd_getfd(&pidfd, fd) {
            Ok(socket) => socket,
            Err(error) if error.raw_os_error() == Some(libc::EBADF) => continue,
            Err(error) => return Err(error),
        };
        if !keeps_its_owner_in_storage(&socket) {
            continue;
        }
        let owner = match &mut owner {
            Some(owner) => owner,
            None => owner.insert(process_owner(&proc_dir, pid, &cgroup, netns)?),
        };
        let stored = UdpOwner {
            owner: *owner,
            ..UdpOwner::default()
        };
        match netns.owners_mut().insert(&socket, stored, BPF_NOEXIST) {
            Ok(()) => adopted += 1,
            // Recorded by `sock_create` or `connect4/6` meanwhile: theirs is exact.
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(error) => debug!("adopting socket {fd} of process {pid}: {error}"),
        }
    }
    Ok(adopted)
}

/// The process's cgroup directory, from its cgroup v2 line (`0::/PATH`); `None` for a
/// process in no cgroup v2 (a kernel thread).
fn cgroup_dir(proc_dir: &Path, mount: &Path) -> io::Result<Option<PathBuf>> {
    let text = fs::read_to_string(proc_dir.join("cgroup"))?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| mount.join(path.trim_start_matches('/'))))
}

/// Whether `cgroup` is an audited cgroup or below one, comparing directory inodes (cgroup
/// ids), as the kernel side does.
fn is_audited(cgroup: &Path, scope: &Scope<'_>) -> bool {
    if scope.audited.is_empty() {
        return true;
    }
    cgroup
        .ancestors()
        .take_while(|dir| dir.starts_with(scope.cgroup2_mount))
        .filter_map(|dir| fs::metadata(dir).ok())
        .any(|metadata| {
            scope
                .audited
                .iter()
                .any(|audited| audited.id == metadata.ino())
        })
}

/// The owner record the kernel would have made when the process created the socket.
fn process_owner(
    proc_dir: &Path,
    pid: u32,
    cgroup: &Path,
    netns: &mut NetnsInodes,
) -> io::Result<SocketOwner> {
    let name = fs::read_to_string(proc_dir.join("comm"))?;
    let mut comm = [0; 16];
    let name = name.trim_end_matches('\n').as_bytes();
    // The kernel's command name is at most 15 bytes and a NUL.
    let length = name.len().min(15);
    comm[..length].copy_from_slice(&name[..length]);
    Ok(SocketOwner {
        cgroup_id: fs::metadata(cgroup)?.ino(),
        // Without CAP_SYS_ADMIN the namespace cannot be entered: netns is then null.
        netns_cookie: netns
            .cookie_at(&proc_dir.join("ns/net"))
            .unwrap_or_default(),
        pid,
        padding: 0,
        comm,
        audited: 1,
        flags: 0,
    })
}

/// An IPv4 or IPv6 UDP or MPTCP socket: those whose owner is in the socket-owner storage.
fn keeps_its_owner_in_storage(socket: &OwnedFd) -> bool {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut length = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `length` are valid for the kernel to write an int into.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&raw mut value).cast(),
                &raw mut length,
            )
        };
        (result == 0).then_some(value)
    };
    matches!(
        option(libc::SO_DOMAIN),
        Some(libc::AF_INET | libc::AF_INET6)
    ) && matches!(
        option(libc::SO_PROTOCOL),
        Some(libc::IPPROTO_UDP | libc::IPPROTO_MPTCP)
    )
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    owned(fd)
}

/// A copy of descriptor `fd` of the process behind `pidfd`, as `dup` would make it.
fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: as in `pidfd_open`.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    owned(copy)
}

fn owned(result: libc::c_long) -> io::Result<OwnedFd> {
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(result).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
