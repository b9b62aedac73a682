//! Loading the eBPF object, attaching its programs at the cgroup2 root, detaching them.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, SkStorage},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, TracePoint,
        cgroup_skb::CgroupSkbLinkId,
        cgroup_sock::CgroupSockLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::{FdLink, PinnedLink},
        trace_point::TracePointLinkId,
    },
};
use nix::sys::resource::{Resource, setrlimit};
use srcip_common::{
    fold::{FoldKey, FoldState},
    names,
    owner::UdpOwner,
    policy::{PinSource, PredictedSource, reload_room},
    scope::{CgroupPath, MAX_CGROUP_LEVEL},
};
use tracing::{debug, info, warn};

use crate::{
    cgroup::AuditedCgroup,
    features,
    policy::KernelTables,
    policy_maps::{KernelPolicy, WriteError},
    system,
};

/// Where a program attaches: every cgroup hook is on the cgroup2 root.
#[derive(Clone, Copy)]
enum Hook {
    /// `cgroup/sock_create` or `cgroup/connect4/6`, whose attach type the object names.
    CgroupSock,
    CgroupSockAddr,
    /// `cgroup_skb/egress`.
    Egress,
    /// A tracepoint of the `cgroup` category.
    CgroupEvent(&'static str),
}

/// A program of the eBPF object and what srcip loses without it.
struct ProgramSpec {
    name: &'static str,
    hook: Hook,
    /// Shown in errors: the capability that stops working when the program is missing.
    provides: &'static str,
}

/// Every program srcip attaches at start, in this order: owners are recorded before any
/// connection is. All are required: auditing with a hook missing would silently miss
/// connections.
const PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec {
        name: names::SOCK_CREATE_PROGRAM,
        hook: Hook::CgroupSock,
        provides: "recording the owner of each new socket (cgroup/sock_create)",
    },
    ProgramSpec {
        name: names::CONNECT4_PROGRAM,
        hook: Hook::CgroupSockAddr,
        provides: "pin, block, and the owner of IPv4 sockets created before srcip started (cgroup/connect4)",
    },
    ProgramSpec {
        name: names::CONNECT6_PROGRAM,
        hook: Hook::CgroupSockAddr,
        provides: "pin, block, and the owner of IPv6 sockets created before srcip started (cgroup/connect6)",
    },
    ProgramSpec {
        name: names::EGRESS_PROGRAM,
        hook: Hook::Egress,
        provides: "recording the source address of TCP connections and UDP datagrams (cgroup_skb/egress)",
    },
];

/// Programs loaded at start (so that a kernel that refuses them is known at once) but
/// attached only while they are needed: with any program at sendmsg4/6 the kernel locks
/// every unconnected UDP socket around every datagram. They are needed while the policy
/// pins UDP (or blocks it with `--keep-enforcing`), and whenever `--cgroup` scopes the
/// audit: a socket that reaches an audited process from outside (passed in, or made before
/// the process moved in) is adopted at its first datagram there.
const DATAGRAM_PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec {
        name: names::SENDMSG4_PROGRAM,
        hook: Hook::CgroupSockAddr,
        provides: "pin and block of unconnected IPv4 UDP datagrams (cgroup/sendmsg4)",
    },
    ProgramSpec {
        name: names::SENDMSG6_PROGRAM,
        hook: Hook::CgroupSockAddr,
        provides: "pin and block of unconnected IPv6 UDP datagrams (cgroup/sendmsg6)",
    },
];

/// With `--cgroup`: the programs that put a new instance of an audited cgroup (a restarted
/// unit's) into the audited set in `mkdir` itself, and take a removed one out. Attached
/// before the others.
const CGROUP_PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec {
        name: names::CGROUP_MKDIR_PROGRAM,
        hook: Hook::CgroupEvent("cgroup_mkdir"),
        provides: "auditing a restarted unit's cgroup from its first socket (tracepoint cgroup:cgroup_mkdir)",
    },
    ProgramSpec {
        name: names::CGROUP_RMDIR_PROGRAM,
        hook: Hook::CgroupEvent("cgroup_rmdir"),
        provides: "forgetting a removed instance of an audited cgroup (tracepoint cgroup:cgroup_rmdir)",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "cannot keep enforcement in {}: {reason} (the folder must be on a bpf file system, as /sys/fs/bpf is)",
        dir.display()
    )]
    Keep {
        dir: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot open the cgroup2 root {}", path.display())]
    OpenCgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--cgroup {path} is {level} levels deep; srcip audits cgroups at most {MAX_CGROUP_LEVEL} levels deep"
    )]
    CgroupTooDeep { path: String, level: u32 },
    #[error("the kernel refused srcip's eBPF object")]
    Object(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}: the build is broken, rebuild srcip")]
    Missing(&'static str),
    /// Taking or writing the policy's maps at start.
    #[error(transparent)]
    PolicyMaps(#[from] WriteError),
    #[error("map {name}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot load or attach {name}, which srcip needs for {provides}")]
    Program {
        name: &'static str,
        provides: &'static str,
        source: aya::programs::ProgramError,
    },
    /// The verifier refused a program: its one telling line, not the log.
    #[error(
        "this kernel refuses {name}, which srcip needs for {provides}: \"{reason}\"; srcip's feature check did not foresee this, please report it with the output of `uname -r` (SRCIP_LOG=debug shows the verifier's log)"
    )]
    Refused {
        name: &'static str,
        provides: &'static str,
        reason: String,
    },
}

enum AttachedLink {
    Egress(CgroupSkbLinkId),
    Sock(CgroupSockLinkId),
    SockAddr(CgroupSockAddrLinkId),
    CgroupEvent(TracePointLinkId),
    /// An enforcing program's link pinned in bpffs (`--keep-enforcing`): it stays attached
    /// when srcip stops, until the pin is removed.
    Kept(PinnedLink),
}

/// The loaded object with its programs attached. Detach with [`KernelPrograms::detach`];
/// dropping it detaches too (aya's backstop) but cannot report failures.
pub struct KernelPrograms {
    ebpf: Ebpf,
    links: Vec<(&'static str, AttachedLink)>,
    /// The `DATAGRAM_PROGRAMS`' links while attached.
    datagram_links: Vec<(&'static str, AttachedLink)>,
    /// `--cgroup` scopes the audit: the `DATAGRAM_PROGRAMS` stay attached to adopt sockets
    /// that reach an audited process from outside.
    adopts_at_send: bool,
    cgroup_root: File,
    /// Where this run pins its enforcing links (`--keep-enforcing`).
    keep_in: Option<std::path::PathBuf>,
}

/// What to audit and how.
#[derive(Clone, Copy)]
pub struct AuditSettings<'a> {
    pub cgroup2_mount: &'a Path,
    /// Audit only these cgroups and their descendants; empty: every process.
    pub audited: &'a [AuditedCgroup],
    pub ring_buffer_bytes: u32,
    /// Report every connection (`run --all`), not only those the policy flags.
    pub report_all: bool,
    /// Audit srcip's own connections too (the demo's client is a thread of srcip).
    pub audit_self: bool,
    /// Fold repeats of a violation within this window; zero folds nothing.
    pub fold_window: std::time::Duration,
    /// Capacity of the kernel's folding table.
    pub fold_entries: u32,
    /// Where enforcing links are kept across a stop, and whether this run keeps its own;
    /// `None` (demo, learn): neither kept nor looked for.
    pub kept_links: Option<KeptLinks<'a>>,
}

/// `--keep-enforcing` and `--kept-links`.
#[derive(Clone, Copy)]
pub struct KeptLinks<'a> {
    /// A folder on a bpf file system.
    pub dir: &'a Path,
    /// Pin this run's enforcing links there, so that they outlive it.
    pub keep: bool,
}

/// Maps user space uses while auditing.
pub struct EventMaps {
    pub events: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Audited cgroup ids, kept current when an audited cgroup is recreated.
    pub audited_cgroups: HashMap<MapData, u64, u8>,
    /// Socket owners; srcip's own sockets' entries tell namespace cookies.
    pub socket_owners: SkStorage<MapData, UdpOwner>,
    /// Violation windows being folded; user space flushes and deletes closed ones.
    pub folds: HashMap<MapData, FoldKey, FoldState>,
    /// The policy the kernel decides with; a reload replaces it.
    pub policy: KernelPolicy,
    /// The LPM tries of predicted sources, which the drift watch keeps current.
    pub predicted_v4: LpmTrie<MapData, [u8; 4], PredictedSource>,
    pub predicted_v6: LpmTrie<MapData, [u8; 16], PredictedSource>,
    /// The pin sources the host has, which the drift watch keeps current.
    pub present_pin_sources: HashMap<MapData, PinSource, u64>,
}

impl KernelPrograms {
    /// Loads the object with the compiled `policy` and the `settings`, and attaches every
    /// program at the root of the cgroup2 hierarchy.
    pub fn load_and_attach(
        settings: AuditSettings<'_>,
        policy: &KernelTables,
    ) -> Result<(Self, EventMaps), LoadError> {
        let AuditSettings {
            cgroup2_mount,
            audited,
            ring_buffer_bytes,
            report_all,
            audit_self,
            fold_window,
            fold_entries,
            kept_links,
        } = settings;
        raise_memlock_limit();
        let mut level_mask = 0u64;
        for cgroup in audited {
            if cgroup.level > MAX_CGROUP_LEVEL {
                return Err(LoadError::CgroupTooDeep {
                    path: cgroup.path.clone(),
                    level: cgroup.level,
                });
            }
            level_mask |= 1 << cgroup.level;
        }
        let report_all = u32::from(report_all);
        let wakeup_bytes = u64::from(ring_buffer_bytes / 2);
        let daemon_tgid = std::process::id();
        let audit_daemon = u32::from(audit_self);
        let finds_mptcp_sockets = u32::from(features::finds_mptcp_sockets());
        let fold_window_ns = u64::try_from(fold_window.as_nanos()).unwrap_or(u64::MAX);
        // Room for the policy and a reload that grows it by a quarter: a pair of tries and
        // a half of `RULES` for each of the policy in force and the next one.
        let room = reload_room(policy.rules.len().max(policy.v4.len()).max(policy.v6.len()));
        let entries = |count: usize| u32::try_from(count).unwrap_or(u32::MAX);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::AUDITED_CGROUP_LEVELS, &level_mask, true)
            .override_global(names::REPORT_ALL, &report_all, true)
            .override_global(names::DAEMON_TGID, &daemon_tgid, true)
            .override_global(names::AUDIT_DAEMON, &audit_daemon, true)
            .override_global(names::FINDS_MPTCP_SOCKETS, &finds_mptcp_sockets, true)
            .override_global(names::FOLD_WINDOW_NS, &fold_window_ns, true)
            .map_max_entries(names::FOLDS, fold_entries.max(1))
            .map_max_entries(names::EVENTS, ring_buffer_bytes)
            .override_global(names::EVENTS_WAKEUP_BYTES, &wakeup_bytes, true)
            .map_max_entries(names::V4_DESTINATIONS_EVEN, entries(room))
            .map_max_entries(names::V4_DESTINATIONS_ODD, entries(room))
            .map_max_entries(names::V6_DESTINATIONS_EVEN, entries(room))
            .map_max_entries(names::V6_DESTINATIONS_ODD, entries(room))
            .map_max_entries(names::RULES, entries(2 * room))
            .map_max_entries(names::PREDICTED_V4_SOURCES, entries(2 * room))
            .map_max_entries(names::PREDICTED_V6_SOURCES, entries(2 * room))
            .map_max_entries(names::PRESENT_PIN_SOURCES, entries(2 * room))
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/srcip"
            )))?;
        // Every program reads the policy maps, so they are written before any attach.
        let kernel_policy = KernelPolicy::new(&mut ebpf, room, policy)?;

        let mut audited_cgroups: HashMap<MapData, u64, u8> =
            take_map(&mut ebpf, names::AUDITED_CGROUPS)?;
        let mut audited_paths: HashMap<MapData, CgroupPath, u8> =
            take_map(&mut ebpf, names::AUDITED_CGROUP_PATHS)?;
        for cgroup in audited {
            audited_cgroups
                .insert(cgroup.id, 0, 0)
                .map_err(|source| LoadError::Map {
                    name: names::AUDITED_CGROUPS,
                    source,
                })?;
            match CgroupPath::new(&cgroup.path) {
                Some(path) => {
                    audited_paths
                        .insert(path, 0, 0)
                        .map_err(|source| LoadError::Map {
                            name: names::AUDITED_CGROUP_PATHS,
                            source,
                        })?
                }
                None => warn!(
                    "--cgroup {}: the path is too long for the kernel to recognise a new instance of it; a restart of it is followed within a second",
                    cgroup.path
                ),
            }
        }
        let maps = EventMaps {
            events: take_map(&mut ebpf, names::EVENTS)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            audited_cgroups,
            socket_owners: take_map(&mut ebpf, names::SOCKET_OWNERS)?,
            folds: take_map(&mut ebpf, names::FOLDS)?,
            policy: kernel_policy,
            predicted_v4: take_map(&mut ebpf, names::PREDICTED_V4_SOURCES)?,
            predicted_v6: take_map(&mut ebpf, names::PREDICTED_V6_SOURCES)?,
            present_pin_sources: take_map(&mut ebpf, names::PRESENT_PIN_SOURCES)?,
        };

        let cgroup_root = File::open(cgroup2_mount).map_err(|source| LoadError::OpenCgroup {
            path: cgroup2_mount.to_owned(),
            source,
        })?;
        let mut programs = Self {
            ebpf,
            links: Vec::new(),
            datagram_links: Vec::new(),
            adopts_at_send: !audited.is_empty(),
            cgroup_root,
            keep_in: kept_links
                .filter(|kept| kept.keep)
                .map(|kept| kept.dir.to_owned()),
        };
        for spec in DATAGRAM_PROGRAMS {
            programs.load(spec)?;
        }
        let cgroup_programs = if audited.is_empty() {
            &[][..]
        } else {
            CGROUP_PROGRAMS
        };
        for spec in cgroup_programs.iter().chain(PROGRAMS) {
            programs.load(spec)?;
            // On error `programs` is dropped, which detaches what was already attached.
            let link = programs.attach(spec)?;
            info!(
                "attached {} at {} ({})",
                spec.name,
                cgroup2_mount.display(),
                spec.provides
            );
            programs.links.push((spec.name, link));
        }
        // Attached first, then the previous run's kept links removed: connect4/6 never lapse
        // across a restart (the sendmsg programs and the predictions follow; design.md).
        if let Some(kept) = kept_links {
            release_kept_links(kept.dir);
        }
        let links = std::mem::take(&mut programs.links);
        programs.links = programs.keep_enforcing(links)?;
        Ok((programs, maps))
    }

    /// With `--keep-enforcing`, pins the enforcing programs' links among `links` in the kept
    /// links folder; the others, and every link without it, are returned as they were.
    fn keep_enforcing(
        &mut self,
        links: Vec<(&'static str, AttachedLink)>,
    ) -> Result<Vec<(&'static str, AttachedLink)>, LoadError> {
        let Some(dir) = self.keep_in.clone() else {
            return Ok(links);
        };
        let keep_error = |reason: String| LoadError::Keep {
            dir: dir.clone(),
            reason,
        };
        std::fs::create_dir_all(&dir).map_err(|error| keep_error(error.to_string()))?;
        let mut kept = Vec::with_capacity(links.len());
        let mut links = links.into_iter();
        while let Some((name, link)) = links.next() {
            // The programs that pin and block are the sock_addr ones (connect4/6, sendmsg4/6).
            let AttachedLink::SockAddr(id) = link else {
                kept.push((name, link));
                continue;
            };
            match self.pin_link(name, id, &dir) {
                Ok(pinned) => {
                    info!(
                        "{name} is kept attached in {} (--keep-enforcing)",
                        dir.display()
                    );
                    kept.push((name, AttachedLink::Kept(pinned)));
                }
                Err(reason) => {
                    // A step that fails leaves nothing behind: what was pinned is removed,
                    // and what was not yet is detached.
                    kept.extend(links);
                    self.detach_links(kept, Kept::Remove);
                    return Err(keep_error(reason));
                }
            }
        }
        Ok(kept)
    }

    /// Takes the link of `name` from its program and pins it at `dir/name`.
    fn pin_link(
        &mut self,
        name: &'static str,
        id: CgroupSockAddrLinkId,
        dir: &Path,
    ) -> Result<PinnedLink, String> {
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the eBPF object has no {name}"))?
            .try_into()
            .map_err(|error: aya::programs::ProgramError| error.to_string())?;
        let owned = program.take_link(id).map_err(|error| error.to_string())?;
        FdLink::try_from(owned)
            .map_err(|error| error.to_string())?
            .pin(dir.join(name))
            .map_err(|error| error.to_string())
    }

    /// Whether a policy compiled to `tables` needs the sendmsg programs: to pin UDP, to adopt
    /// sockets at their first datagram (a scoped audit), or to go on blocking UDP while srcip
    /// is down (`--keep-enforcing` keeps them, not the egress program). A policy that only
    /// blocks UDP does not: the egress program refuses the datagram on its real source, and
    /// every unconnected UDP socket of the host is spared the socket lock the kernel takes
    /// around each datagram while any sendmsg program is attached.
    pub fn needs_datagram_programs(&self, tables: &KernelTables) -> bool {
        tables.pins_udp || self.adopts_at_send || (tables.blocks_udp && self.keep_in.is_some())
    }

    /// Attaches the sendmsg programs when `wanted` (see `needs_datagram_programs`) and
    /// detaches them when not; nothing when they already are as asked.
    pub fn enforce_datagrams(&mut self, wanted: bool) -> Result<(), LoadError> {
        let attached = !self.datagram_links.is_empty();
        if wanted == attached {
            return Ok(());
        }
        if !wanted {
            let links = std::mem::take(&mut self.datagram_links);
            self.detach_links(links, Kept::Remove);
            info!("detached the sendmsg programs: the policy no longer needs them");
            return Ok(());
        }
        let mut links = Vec::new();
        for spec in DATAGRAM_PROGRAMS {
            match self.attach(spec) {
                Ok(link) => {
                    info!("attached {} ({})", spec.name, spec.provides);
                    links.push((spec.name, link));
                }
                // All or none: what was attached for this call is detached again.
                Err(error) => {
                    self.detach_links(links, Kept::Remove);
                    return Err(error);
                }
            }
        }
        self.datagram_links = self.keep_enforcing(links)?;
        Ok(())
    }

    /// Loads `spec`'s program. The verifier gives up with EAGAIN (or EINTR) when a signal
    /// comes for the loading thread: that is no refusal. So the signals srcip handles
    /// (`systemctl reload` or stop during the start) wait while this thread loads, handled
    /// by another thread or once it is done, and a load another signal interrupts is made
    /// again.
    fn load(&mut self, spec: &ProgramSpec) -> Result<(), LoadError> {
        const ATTEMPTS: u32 = 10;
        let _deferred = system::HandledSignalsDeferred::new();
        let mut attempt = 1;
        loop {
            match self.load_once(spec)? {
                Err(aya::programs::ProgramError::LoadError { io_error, .. })
                    if attempt < ATTEMPTS
                        && matches!(io_error.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) =>
                {
                    debug!("loading {} was interrupted ({io_error}); again", spec.name);
                    attempt += 1;
                }
                result => return result.map_err(|source| refusal(spec, source)),
            }
        }
    }

    /// One attempt: the outer error is a broken build, the inner one the kernel's answer.
    fn load_once(
        &mut self,
        spec: &ProgramSpec,
    ) -> Result<Result<(), aya::programs::ProgramError>, LoadError> {
        let program = self
            .ebpf
            .program_mut(spec.name)
            .ok_or(LoadError::Missing(spec.name))?;
        Ok(match spec.hook {
            Hook::CgroupSock => <&mut CgroupSock>::try_from(program).and_then(|p| p.load()),
            Hook::CgroupSockAddr => <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.load()),
            Hook::Egress => <&mut CgroupSkb>::try_from(program).and_then(|p| p.load()),
            Hook::CgroupEvent(_) => <&mut TracePoint>::try_from(program).and_then(|p| p.load()),
        })
    }

    /// Attaches a loaded program at the cgroup2 root.
    fn attach(&mut self, spec: &ProgramSpec) -> Result<AttachedLink, LoadError> {
        let program_error = |source| refusal(spec, source);
        let Self {
            ebpf, cgroup_root, ..
        } = self;
        let program = ebpf
            .program_mut(spec.name)
            .ok_or(LoadError::Missing(spec.name))?;
        // `Single` goes through bpf_link_create, which never locks other programs out of the
        // cgroup (`AllowMultiple` fails with EINVAL on aya 0.14).
        let mode = CgroupAttachMode::Single;
        Ok(match spec.hook {
            Hook::CgroupSock => AttachedLink::Sock(
                <&mut CgroupSock>::try_from(program)
                    .map_err(program_error)?
                    .attach(&*cgroup_root, mode)
                    .map_err(program_error)?,
            ),
            Hook::CgroupSockAddr => AttachedLink::SockAddr(
                <&mut CgroupSockAddr>::try_from(program)
                    .map_err(program_error)?
                    .attach(&*cgroup_root, mode)
                    .map_err(program_error)?,
            ),
            Hook::Egress => AttachedLink::Egress(
                <&mut CgroupSkb>::try_from(program)
                    .map_err(program_error)?
                    .attach(&*cgroup_root, CgroupSkbAttachType::Egress, mode)
                    .map_err(program_error)?,
            ),
            Hook::CgroupEvent(event) => AttachedLink::CgroupEvent(
                <&mut TracePoint>::try_from(program)
                    .map_err(program_error)?
                    .attach("cgroup", event)
                    .map_err(program_error)?,
            ),
        })
    }

    /// Detaches every program, logging (not failing on) a program that will not detach, so
    /// that the others are still removed. Kept links (`--keep-enforcing`) stay attached.
    pub fn detach(&mut self) {
        let datagram_links = std::mem::take(&mut self.datagram_links);
        self.detach_links(datagram_links, Kept::Leave);
        let links = std::mem::take(&mut self.links);
        self.detach_links(links, Kept::Leave);
    }

    fn detach_links(&mut self, links: Vec<(&'static str, AttachedLink)>, kept: Kept) {
        // The reverse of the attach order: connections stop being recorded first.
        for (name, link) in links.into_iter().rev() {
            let program = self.ebpf.program_mut(name);
            let result = match link {
                AttachedLink::Kept(pinned) => match kept {
                    Kept::Leave => {
                        info!("{name} stays attached, kept by --keep-enforcing");
                        continue;
                    }
                    // Unpinned, the link's last reference is dropped with it: detached.
                    Kept::Remove => Some(
                        pinned
                            .unpin()
                            .map(drop)
                            .map_err(aya::programs::ProgramError::IOError),
                    ),
                },
                AttachedLink::Egress(link) => program
                    .and_then(|program| <&mut CgroupSkb>::try_from(program).ok())
                    .map(|program| program.detach(link)),
                AttachedLink::Sock(link) => program
                    .and_then(|program| <&mut CgroupSock>::try_from(program).ok())
                    .map(|program| program.detach(link)),
                AttachedLink::SockAddr(link) => program
                    .and_then(|program| <&mut CgroupSockAddr>::try_from(program).ok())
                    .map(|program| program.detach(link)),
                AttachedLink::CgroupEvent(link) => program
                    .and_then(|program| <&mut TracePoint>::try_from(program).ok())
                    .map(|program| program.detach(link)),
            };
            match result {
                Some(Ok(())) => debug!("detached {name}"),
                Some(Err(error)) => warn!("detaching {name} failed: {error}"),
                None => warn!("detaching {name} failed: program not found"),
            }
        }
    }
}

/// What detaching does with a kept link.
#[derive(Clone, Copy)]
enum Kept {
    /// Stopping: leave it attached, as `--keep-enforcing` asked.
    Leave,
    /// The policy no longer needs the program: remove it.
    Remove,
}

/// Removes the links a previous run left in `dir` (`--keep-enforcing`): each is detached
/// when its pin, its last reference, goes. A folder that does not exist holds none.
fn release_kept_links(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match PinnedLink::from_pin(&path).map(PinnedLink::unpin) {
            Ok(Ok(_detached_on_drop)) => {
                info!(
                    "removed {}, which a previous srcip kept enforcing",
                    path.display()
                );
            }
            Ok(Err(error)) => warn!("cannot remove {}: {error}", path.display()),
            Err(error) => warn!(
                "{} is not a link srcip can take over: {error}",
                path.display()
            ),
        }
    }
}

/// A verifier refusal becomes its one telling line; the whole log goes to the debug log.
fn refusal(spec: &ProgramSpec, source: aya::programs::ProgramError) -> LoadError {
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = &source {
        let log = verifier_log.to_string();
        debug!("the verifier's log for {}:\n{log}", spec.name);
        return LoadError::Refused {
            name: spec.name,
            provides: spec.provides,
            reason: features::verifier_refusal(&log).to_owned(),
        };
    }
    LoadError::Program {
        name: spec.name,
        provides: spec.provides,
        source,
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoadError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
    M::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// Kernels before 5.11 charge map memory to RLIMIT_MEMLOCK. Newer ones charge the memory
/// cgroup, and a root without CAP_SYS_RESOURCE cannot raise the limit: not an error.
fn raise_memlock_limit() {
    if let Err(error) = setrlimit(Resource::RLIMIT_MEMLOCK, u64::MAX, u64::MAX) {
        debug!("cannot raise RLIMIT_MEMLOCK ({error}); fine on Linux ≥ 5.11");
    }
}
