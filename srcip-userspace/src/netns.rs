//! Network namespaces: the kernel side can only read a namespace's cookie; users know a
//! namespace by its inode (`lsns`, `/proc/PID/ns/net`, `ip netns`).
//!
//! To learn a namespace's cookie, a short-lived thread enters it (`setns`, which needs
//! CAP_SYS_ADMIN), creates a socket there, and reads back the cookie that srcip's own
//! `cgroup/sock_create` program stored for that socket (`srcip_common::owner`). This works on
//! every kernel srcip supports; `SO_NETNS_COOKIE`, the direct way, needs Linux 5.14.
//!
//! Only two places are searched, both cheap, so that writing an alert never waits on a scan
//! of every process: the namespace of the socket's owner (`/proc/PID/ns/net`) and the named
//! ones (`/run/netns`). A namespace found in neither is reported as `null`.

use std::{
    fs::{self, File},
    io,
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{MapData, SkStorage};
use lru::LruCache;
use nix::{
    sched::{CloneFlags, setns},
    sys::{
        socket::{AddressFamily, SockFlag, SockType, socket},
        statfs::{NSFS_MAGIC, statfs},
    },
};
use srcip_common::owner::UdpOwner;

use crate::cgroup::ScopeError;

/// The inode of the network namespace an operator names (`--netns`): a name of `ip netns`
/// (`/run/netns/NAME`), or a path such as `/proc/PID/ns/net`.
pub fn inode_of_given(given: &str) -> Result<u64, ScopeError> {
    let path = if given.contains('/') {
        PathBuf::from(given)
    } else {
        Path::new("/run/netns").join(given)
    };
    let metadata = fs::metadata(&path).map_err(|_| ScopeError::NetnsNotFound {
        given: given.to_owned(),
        path: path.clone(),
    })?;
    // A namespace's file belongs to the nsfs file system; anything else is not one.
    let nsfs = statfs(&path).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC);
    if !nsfs {
        return Err(ScopeError::NotNetns {
            given: given.to_owned(),
            path,
        });
    }
    Ok(metadata.ino())
}

/// Namespaces remembered, each way: a host with more (containers come and go) forgets the
/// least recently used, and probes it again should it come back.
const REMEMBERED: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// How long a namespace searched for and not found stays unknown before it is searched
/// again: its process may have been too quick for the search, and be named at the next.
const MISS_EXPIRY: Duration = Duration::from_secs(60);

pub struct NetnsInodes {
    owners: SkStorage<MapData, UdpOwner>,
    /// The inode of each cookie found, or when a search did not find it. A cookie is never
    /// reused, so a found one is not searched again.
    inode_by_cookie: LruCache<u64, Result<u64, Instant>>,
    /// The cookie each probed inode had. Inodes are reused once a namespace is gone, so a
    /// probed inode whose cookie differs from the one sought is probed again.
    cookie_by_inode: LruCache<u64, u64>,
}

impl NetnsInodes {
    /// `owners` is the kernel's socket-owner storage, where the probe sockets' cookies land.
    pub fn new(owners: SkStorage<MapData, UdpOwner>) -> Self {
        Self {
            owners,
            inode_by_cookie: LruCache::new(REMEMBERED),
            cookie_by_inode: LruCache::new(REMEMBERED),
        }
    }

    /// The inode of the namespace with `cookie`; `pid` is the socket's owner.
    pub fn inode_of(&mut self, cookie: u64, pid: u32) -> Option<u64> {
        match self.inode_by_cookie.get(&cookie) {
            Some(Ok(inode)) => return Some(*inode),
            Some(Err(searched)) if searched.elapsed() < MISS_EXPIRY => return None,
            _ => {}
        }
        let owners = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let found = std::iter::once(owners)
            .chain(dir_entries("/run/netns"))
            .find_map(|candidate| self.probe(&candidate, cookie));
        self.inode_by_cookie
            .put(cookie, found.ok_or_else(Instant::now));
        found
    }

    /// The cookie of the namespace at `path` (such as `/proc/PID/ns/net`).
    pub fn cookie_at(&mut self, path: &Path) -> Option<u64> {
        let inode = fs::metadata(path).ok()?.ino();
        if let Some(cookie) = self.cookie_by_inode.get(&inode) {
            return Some(*cookie);
        }
        let cookie = cookie_of(&self.owners, path).ok()?;
        self.cookie_by_inode.put(inode, cookie);
        self.inode_by_cookie.put(cookie, Ok(inode));
        Some(cookie)
    }

    /// The socket-owner storage itself, which adoption (`adopt.rs`) writes.
    pub fn owners_mut(&mut self) -> &mut SkStorage<MapData, UdpOwner> {
        &mut self.owners
    }

    /// The inode of the namespace at `path` when its cookie is `wanted`.
    fn probe(&mut self, path: &Path, wanted: u64) -> Option<u64> {
        let inode = fs::metadata(path).ok()?.ino();
        if self.cookie_by_inode.get(&inode) != Some(&wanted) {
            let cookie = cookie_of(&self.owners, path).ok()?;
            self.cookie_by_inode.put(inode, cookie);
            self.inode_by_cookie.put(cookie, Ok(inode));
        }
        (self.cookie_by_inode.get(&inode) == Some(&wanted)).then_some(inode)
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
fn cookie_of(owners: &SkStorage<MapData, UdpOwner>, path: &Path) -> io::Result<u64> {
    let namespace = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&namespace, CloneFlags::CLONE_NEWNET)?;
                let socket = socket(
                    AddressFamily::Inet,
                    SockType::Datagram,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                let owner = owners.get(&socket, 0).map_err(io::Error::other)?;
                Ok(owner.owner.netns_cookie)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace probe thread panicked")))
    })
}
