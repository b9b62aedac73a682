//! Network namespaces: the kernel side can only read a namespace's cookie; users know a
//! namespace by its inode (`lsns`, `/proc/PID/ns/net`, `ip netns`). This maps one to the
//! other by entering candidate namespaces on a short-lived thread and asking a socket there
//! for its `SO_NETNS_COOKIE`. Results are cached, so each namespace is probed once.

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::{
    getsockopt_impl,
    sched::{CloneFlags, setns},
    sockopt_impl,
    sys::socket::{AddressFamily, SockFlag, SockType, getsockopt, socket},
};

sockopt_impl!(
    /// `SO_NETNS_COOKIE` (Linux ≥ 5.14): the cookie of the socket's network namespace.
    NetnsCookie,
    GetOnly,
    libc::SOL_SOCKET,
    libc::SO_NETNS_COOKIE,
    u64
);

#[derive(Default)]
pub struct NetnsInodes {
    /// `None`: searched everywhere and not found. Cookies are never reused, so a namespace
    /// that could not be found is not searched for again.
    inode_by_cookie: HashMap<u64, Option<u64>>,
    probed_inodes: HashSet<u64>,
}

impl NetnsInodes {
    /// The inode of the namespace with `cookie`. `pid` is the process that used it, the most
    /// likely place to find it; after that, named namespaces and every process are tried.
    pub fn inode_of(&mut self, cookie: u64, pid: u32) -> Option<u64> {
        if let Some(known) = self.inode_by_cookie.get(&cookie) {
            return *known;
        }
        let first = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let named = dir_entries("/run/netns");
        let every_process = dir_entries("/proc")
            .into_iter()
            .map(|process| process.join("ns/net"));
        for candidate in std::iter::once(first).chain(named).chain(every_process) {
            if self.probe(&candidate) == Some(cookie) {
                return self.inode_by_cookie.get(&cookie).copied().flatten();
            }
        }
        self.inode_by_cookie.insert(cookie, None);
        None
    }

    /// Records the cookie of the namespace at `path` unless that namespace was probed before.
    fn probe(&mut self, path: &Path) -> Option<u64> {
        let inode = fs::metadata(path).ok()?.ino();
        if !self.probed_inodes.insert(inode) {
            return None;
        }
        let cookie = cookie_of(path).ok()?;
        self.inode_by_cookie.insert(cookie, Some(inode));
        Some(cookie)
    }
}

fn dir_entries(dir: &str) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| Some(entry.ok()?.path()))
                .collect()
        })
        .unwrap_or_default()
}

/// `setns` moves only the calling thread, so a scoped thread enters the namespace and ends
/// there; the daemon's own threads never leave theirs.
fn cookie_of(path: &Path) -> io::Result<u64> {
    let namespace = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&namespace, CloneFlags::CLONE_NEWNET)?;
                let socket = socket(
                    AddressFamily::Unix,
                    SockType::Datagram,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                Ok(getsockopt(&socket, NetnsCookie)?)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace probe thread panicked")))
    })
}
