//! Recording each audited socket's owner (see `srcip_common::owner`), so that the egress
//! hook attributes a connection to the socket's owner and scopes it by the socket's cgroup,
//! whoever is on the CPU when the packet leaves.
//!
//! Two stores, by how long the owner is needed:
//! - A TCP socket needs it from creation to its SYN, which `connect()` sends at once: an
//!   array slot picked by the socket cookie, written and cleared with plain stores. Socket-
//!   local storage would allocate (and charge to a memory cgroup) at every `socket()` and
//!   free it through RCU at every close, which cost compliant TCP traffic about a tenth of a
//!   refused-connect storm's rate; an LRU hash took a lock and a free-list element at each
//!   insert and delete, about half of `sock_create`'s time (docs/BENCHMARKS.md). Cookies
//!   grow, so a slot is wanted by another socket only after about `TCP_OWNER_ENTRIES`
//!   more sockets were made (or at once, rarely, by a CPU whose batch of cookies is that
//!   far ahead). The socket holding it then has not sent its SYN yet (or never will: a
//!   listener, a failed connect); its owner is moved to an LRU hash, and back into its
//!   slot when its socket connects.
//! - A UDP socket sends for as long as it lives: socket-local storage, freed with it.
//! - An MPTCP socket too, as it may open a subflow at any time: each subflow is a TCP socket
//!   the kernel makes itself (no `sock_create`), from whichever of the host's addresses its
//!   path manager picks, in a kernel worker. Its `connect4/6` finds the MPTCP socket
//!   (`bpf_skc_to_mptcp_sock`, Linux 5.19) and gives the subflow that socket's owner, in
//!   the subflow's TCP slot; from there on it is a TCP connection like any other.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_sk_storage_get, bpf_skc_to_mptcp_sock,
        },
    },
    macros::{btf_map, cgroup_sock, map},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockContext},
};
use srcip_common::{
    owner::{SocketOwner, TCP_OWNER_ENTRIES, UdpOwner},
    record::{AF_INET, AF_INET6, Counter, IPPROTO_MPTCP, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{maps::count, scope::current_task_is_audited};

/// UDP and MPTCP sockets' owners (and srcip's own UDP sockets', see
/// `srcip_common::owner`). An MPTCP socket's `last_flow` is unused.
#[btf_map]
static SOCKET_OWNERS: SkStorage<UdpOwner> = SkStorage::new();

/// Audited TCP sockets' owners, in the slot `cookie % TCP_OWNER_ENTRIES`. Cookies are
/// never reused, so a slot left behind by a closed socket is only one the next socket with
/// that remainder will take.
#[map]
static TCP_OWNERS: Array<TcpOwnerSlot> = Array::with_max_entries(TCP_OWNER_ENTRIES, 0);

/// Owners moved out of their `TCP_OWNERS` slot by a later socket before their SYN. The
/// least recently used is forgotten first: only after `TCP_OWNER_ENTRIES` such moves, most
/// of them owners of sockets that never send a SYN, is a socket's owner lost, and then taken
/// again at `connect4/6` from the connecting task, the owner in all but the io_uring case.
/// An owner moved back into its slot stays here marked not audited, until the LRU reuses it.
#[map]
static DISPLACED_TCP_OWNERS: LruHashMap<u64, SocketOwner> =
    LruHashMap::with_max_entries(TCP_OWNER_ENTRIES, 0);

/// TCP sockets whose SYN `block` stopped at egress, until their `connect()` times out. The
/// least recently used is forgotten first: 4,096 connections trying at once, each for two
/// minutes, before one retransmission leaves.
#[map]
static BLOCKED_SYNS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

/// See [`scratch`].
#[map]
static OWNER_SCRATCH: PerCpuArray<SocketOwner> = PerCpuArray::with_max_entries(1, 0);

/// A slot of `TCP_OWNERS`: the owner of the socket with `cookie`, free while `cookie` is 0
/// (no socket has that cookie) or `taken` (the socket's SYN has taken its owner, or its
/// `connect()` was refused).
///
/// The SYN marks the slot taken by writing its own cookie to `taken`, never by clearing
/// `cookie`: 5.10's BPF has no compare-and-swap, so the SYN's write may land just after
/// another socket claimed the slot. A cleared `cookie` then erased that socket's claim, and
/// its SYN found no owner; a `taken` that names another socket leaves the claim whole.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpOwnerSlot {
    cookie: u64,
    taken: u64,
    owner: SocketOwner,
}

impl TcpOwnerSlot {
    /// Whether the slot holds the owner of the socket with `cookie`, not yet taken.
    ///
    /// # Safety
    /// `slot` points at a slot of `TCP_OWNERS`.
    unsafe fn holds(slot: *const Self, cookie: u64) -> bool {
        // SAFETY: as the caller promises; volatile keeps the reads where they are written.
        unsafe {
            ptr::read_volatile(&(*slot).cookie) == cookie
                && ptr::read_volatile(&(*slot).taken) != cookie
        }
    }

    /// Marks the owner of the socket with `cookie` taken, which frees the slot.
    ///
    /// # Safety
    /// As for [`Self::holds`].
    unsafe fn take(slot: *mut Self, cookie: u64) {
        // SAFETY: as the caller promises.
        unsafe { ptr::write_volatile(&mut (*slot).taken, cookie) };
    }
}

const _: () = assert!(TCP_OWNER_ENTRIES.is_power_of_two());

/// srcip's own process id, set by the loader.
#[unsafe(no_mangle)]
static DAEMON_TGID: u32 = 0;
/// Set by the loader for `srcip demo`, whose client is a thread of srcip.
#[unsafe(no_mangle)]
static AUDIT_DAEMON: u32 = 0;
/// Set by the loader when the kernel has `bpf_skc_to_mptcp_sock` (Linux 5.19): the
/// verifier sees a constant, and on older kernels never reaches the call, which it would
/// refuse.
#[unsafe(no_mangle)]
static FINDS_MPTCP_SOCKETS: u32 = 0;

/// Protocols as a socket holds them, compared whole (see `IPPROTO_MPTCP`).
const TCP: u32 = IPPROTO_TCP as u32;
const UDP: u32 = IPPROTO_UDP as u32;

/// `sock_create` allows every socket: srcip refuses connections, never sockets.
const ALLOW: i32 = 1;

/// Runs in the task that creates the socket, so the current task is the owner and its cgroup
/// is the socket's cgroup.
#[cgroup_sock(sock_create)]
pub fn srcip_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer the kernel passed to this program.
    let sock = unsafe { &*ctx.sock };
    let inet = sock.family == u32::from(AF_INET) || sock.family == u32::from(AF_INET6);
    if !inet {
        return ALLOW;
    }
    let daemon = current_task_is_daemon();
    let audited = (!daemon || audits_daemon()) && current_task_is_audited();
    // In this hook the helpers take the context itself as the socket.
    let context = ctx.sock.cast();
    match sock.protocol {
        TCP if audited => {
            // SAFETY: the program's context, as the helper expects in this hook.
            let cookie = unsafe { bpf_get_socket_cookie(context) };
            store_tcp_owner(cookie, &current_task_as_owner(context, true));
        }
        // srcip's own UDP sockets are recorded too: the daemon learns namespace cookies
        // from them.
        UDP if audited || daemon => {
            store_socket_owner(ctx.sock, &current_task_as_owner(context, audited));
        }
        IPPROTO_MPTCP if audited => {
            store_socket_owner(ctx.sock, &current_task_as_owner(context, true));
        }
        _ => {}
    }
    ALLOW
}

/// The owner of the socket `connect()` or `sendmsg()` is running for, when it is audited. A
/// socket with no owner yet gets the calling task, which is current in `cgroup/connect4/6`
/// and `sendmsg4/6`, when that task is audited: a socket created before srcip started, one
/// created by another process and passed in (`SCM_RIGHTS`, systemd's socket activation), or
/// one created before its process was moved into an audited cgroup. It is audited from its
/// first connect or unconnected datagram in the audited process.
pub fn calling_owner(ctx: &SockAddrContext) -> Option<&'static mut SocketOwner> {
    let context = ctx.sock_addr.cast();
    // SAFETY: the context pointer the kernel passed to this program; `sk` is never null in
    // these hooks.
    let (sk, protocol) = unsafe {
        (
            (*ctx.sock_addr).__bindgen_anon_1.sk,
            (*ctx.sock_addr).protocol,
        )
    };
    let may_adopt = || (!current_task_is_daemon() || audits_daemon()) && current_task_is_audited();
    match protocol {
        TCP => {
            // SAFETY: the program's context, as the helper expects in this hook.
            let cookie = unsafe { bpf_get_socket_cookie(context) };
            if let Some(owner) = tcp_owner(cookie) {
                return Some(owner);
            }
            // An MPTCP subflow connects in a kernel worker as often as in the owner: it is
            // a connection of its MPTCP socket's owner, whoever is on the CPU.
            if let Some(connection) = mptcp_socket(sk) {
                let stored = match stored_owner(connection) {
                    Some(stored) => stored,
                    // An MPTCP socket made before srcip started (or passed in): adopted
                    // at its first subflow's connect, which runs in its program.
                    None if may_adopt() => {
                        store_socket_owner(connection, &current_task_as_owner(context, true))?
                    }
                    None => return None,
                };
                if stored.owner.audited == 0 {
                    return None;
                }
                return store_tcp_owner(cookie, &stored.owner);
            }
            if !may_adopt() {
                return None;
            }
            store_tcp_owner(cookie, &current_task_as_owner(context, true))
        }
        UDP => match stored_owner(sk) {
            Some(udp) => (udp.owner.audited != 0).then_some(&mut udp.owner),
            None if may_adopt() => store_socket_owner(sk, &current_task_as_owner(context, true))
                .map(|udp| &mut udp.owner),
            None => None,
        },
        _ => None,
    }
}

/// The MPTCP socket whose subflow `sk` is, on kernels that can tell (`FINDS_MPTCP_SOCKETS`).
fn mptcp_socket(sk: *mut bpf_sock) -> Option<*mut bpf_sock> {
    // SAFETY: a global set by the loader; volatile keeps the default from being folded in.
    if unsafe { core::ptr::read_volatile(&FINDS_MPTCP_SOCKETS) } == 0 {
        return None;
    }
    // SAFETY: `sk` is the socket the kernel gave this hook; the helper returns null for a
    // socket that is not an MPTCP subflow. The result is a kernel `struct mptcp_sock`,
    // which starts with its `struct sock`: socket-local storage takes it as a socket.
    let connection = unsafe { bpf_skc_to_mptcp_sock(sk.cast()) };
    (!connection.is_null()).then_some(connection.cast())
}

fn audits_daemon() -> bool {
    // SAFETY: a global set by the loader; volatile keeps the default from being folded in.
    unsafe { core::ptr::read_volatile(&AUDIT_DAEMON) != 0 }
}

/// srcip does not audit itself, unless told to: its own connections (alert delivery) would
/// report on the reports.
fn current_task_is_daemon() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a global set by the loader; volatile keeps the default from being folded in.
    tgid == unsafe { core::ptr::read_volatile(&DAEMON_TGID) }
}

/// The slot of the TCP socket with `cookie`, whoever holds it now.
fn tcp_slot(cookie: u64) -> Option<*mut TcpOwnerSlot> {
    TCP_OWNERS.get_ptr_mut(cookie as u32 & (TCP_OWNER_ENTRIES - 1))
}

/// The owner of the TCP socket with `cookie`, always in its slot: one that was displaced is
/// moved back there (and the socket holding the slot now is displaced in turn). Callers
/// thus see one kind of pointer, which keeps the verifier of 5.10 from checking the rest of
/// each program once for each map the owner could be in.
fn tcp_owner(cookie: u64) -> Option<&'static mut SocketOwner> {
    let slot = tcp_slot(cookie)?;
    // SAFETY: an array value stays valid as long as the map. Only the socket's own
    // `connect()` writes its owner (`flags`), before its SYN, whose egress run frees the slot.
    unsafe {
        if TcpOwnerSlot::holds(slot, cookie) {
            return Some(&mut (*slot).owner);
        }
    }
    // Sockets not audited come here too: one lookup in a table that is nearly empty.
    let displaced = displaced_tcp_owner(cookie)?;
    // Copied out first: displacing the slot's holder inserts into the same LRU hash, which
    // may hand this very entry to the holder.
    let moving = scratch()?;
    copy_owner(displaced, moving);
    // Taken: the slot has it now.
    displaced.audited = 0;
    store_tcp_owner(cookie, moving)
}

/// The owner of the TCP socket with `cookie`, taken: only audited sockets have one, and only
/// until their SYN, so that a retransmitted SYN finds none. The owner is copied out of its
/// slot before the slot is freed, since another socket may take a free slot at once. The
/// copy is the one pointer callers see, wherever the owner was.
pub fn take_tcp_owner(cookie: u64) -> Option<&'static SocketOwner> {
    let slot = tcp_slot(cookie)?;
    let taken = scratch()?;
    // SAFETY: as in `tcp_owner`. Volatile accesses keep their order, so the second look at
    // the slot's cookie comes after the copy: a socket that took the slot meanwhile marked it
    // free first and moved this owner to `DISPLACED_TCP_OWNERS`, whole, where it is taken.
    // One that takes it between that look and the mark keeps its claim (`TcpOwnerSlot`),
    // and the copy it moved aside is found by a retransmission of this SYN: reported again,
    // never lost.
    unsafe {
        if TcpOwnerSlot::holds(slot, cookie) {
            copy_owner(&raw const (*slot).owner, taken);
            if ptr::read_volatile(&(*slot).cookie) == cookie {
                TcpOwnerSlot::take(slot, cookie);
                return Some(taken);
            }
        }
    }
    // Displaced before its SYN: taken from that table, leaving the slot to its holder.
    let displaced = displaced_tcp_owner(cookie)?;
    copy_owner(displaced, taken);
    displaced.audited = 0;
    Some(taken)
}

/// Notes that the SYN of the TCP socket with `cookie` was stopped (`block`), so that its
/// retransmissions, which find no owner, are stopped too.
pub fn block_syn(cookie: u64) {
    if BLOCKED_SYNS.insert(&cookie, &0, 0).is_err() {
        count(Counter::HookErrors);
    }
}

/// Whether the TCP socket with `cookie`, in `SYN_SENT` with no owner left, had its SYN
/// stopped: a retransmission.
pub fn blocked_syn(cookie: u64) -> bool {
    BLOCKED_SYNS.get_ptr(&cookie).is_some()
}

/// Frees the slot of a TCP socket whose `connect()` srcip refused: it sends no SYN, and a
/// held slot would make the next socket to want it move the owner aside for nothing.
pub fn release_tcp_owner(ctx: &SockAddrContext) {
    // SAFETY: the context pointer the kernel passed to this program.
    if unsafe { (*ctx.sock_addr).protocol } != TCP {
        return;
    }
    // SAFETY: the program's context, as the helper expects in this hook.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let Some(slot) = tcp_slot(cookie) else {
        return;
    };
    // SAFETY: as in `tcp_owner`.
    unsafe {
        if TcpOwnerSlot::holds(slot, cookie) {
            TcpOwnerSlot::take(slot, cookie);
        }
    }
}

fn displaced_tcp_owner(cookie: u64) -> Option<&'static mut SocketOwner> {
    // SAFETY: a value of a preallocated map stays valid for the program run.
    let owner = unsafe { &mut *DISPLACED_TCP_OWNERS.get_ptr_mut(&cookie)? };
    (owner.audited != 0).then_some(owner)
}

/// This CPU's room for an owner on its way between tables: the programs' stacks have no
/// room for one (the egress program is near 5.10's 512 bytes).
fn scratch() -> Option<&'static mut SocketOwner> {
    // SAFETY: a per-CPU value, used by one program run at a time on its CPU.
    OWNER_SCRATCH
        .get_ptr_mut(0)
        .map(|owner| unsafe { &mut *owner })
}

/// `to = from`, a word at a time with volatile accesses: they keep their order around the
/// slot's `cookie`, and a whole-struct copy would go through the stack.
fn copy_owner(from: *const SocketOwner, to: *mut SocketOwner) {
    let (from, to) = (from.cast::<u64>(), to.cast::<u64>());
    for word in 0..size_of::<SocketOwner>() / 8 {
        // SAFETY: both point at whole owners (6 aligned words, `srcip_common::owner`).
        unsafe { ptr::write_volatile(to.add(word), ptr::read_volatile(from.add(word))) };
    }
}

/// The owner of the UDP socket `sk` when its datagrams are audited.
pub fn audited_udp_owner(sk: *mut bpf_sock) -> Option<&'static mut UdpOwner> {
    stored_owner(sk).filter(|udp| udp.owner.audited != 0)
}

/// The owner in the socket-local storage of `sk`, a UDP or MPTCP socket.
fn stored_owner(sk: *mut bpf_sock) -> Option<&'static mut UdpOwner> {
    // SAFETY: `sk` is a socket pointer the kernel gave this hook; without the create flag the
    // helper only looks up. The map pointer is the map's own definition, as the helper expects.
    let owner = unsafe {
        bpf_sk_storage_get(owners_map(), sk.cast(), ptr::null_mut(), 0).cast::<UdpOwner>()
    };
    // SAFETY: a non-null result points at the socket's storage, which lives as long as the
    // socket, and so for the whole program run. Other CPUs may write `last_flow` (under its
    // lock, see `egress.rs`) and `flags` (one aligned 4-byte word, at each connect and each
    // datagram) at the same time; every other field is written only when the storage is
    // created. Two threads sending on one socket at once may see each other's
    // `OWNER_PINNED`: the mark is best effort there.
    unsafe { owner.as_mut() }
}

/// `ctx` is the program's context, which the namespace helper takes.
fn current_task_as_owner(ctx: *mut c_void, audited: bool) -> SocketOwner {
    SocketOwner {
        // SAFETY: helpers without arguments, or with the program's own context.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx) },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        padding: 0,
        // A missing name must not lose the owner: the connection is still reported.
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        audited: u32::from(audited),
        flags: 0,
    }
}

/// Writes `owner` into the slot of the socket with `cookie`, and returns it there. A socket
/// holding the slot, which has not sent its SYN (yet, or ever), has its owner moved to
/// `DISPLACED_TCP_OWNERS` first.
fn store_tcp_owner(cookie: u64, owner: &SocketOwner) -> Option<&'static mut SocketOwner> {
    // Every index below the array's size has a slot; the check is for the verifier.
    let Some(slot) = tcp_slot(cookie) else {
        count(Counter::HookErrors);
        return None;
    };
    // SAFETY: as in `tcp_owner`. The slot is marked free while the owner is written, so the
    // socket that held it looks in `DISPLACED_TCP_OWNERS`, where its owner already is.
    // `taken` is cleared before the claim: this socket's own refused `connect()` may have
    // set it, and its next one claims the slot again.
    unsafe {
        let holder = ptr::read_volatile(&(*slot).cookie);
        if holder != 0
            && holder != cookie
            && TcpOwnerSlot::holds(slot, holder)
            && DISPLACED_TCP_OWNERS
                .insert(&holder, &(*slot).owner, 0)
                .is_err()
        {
            count(Counter::HookErrors);
        }
        ptr::write_volatile(&mut (*slot).cookie, 0);
        ptr::write_volatile(&mut (*slot).taken, 0);
        copy_owner(owner, &raw mut (*slot).owner);
        ptr::write_volatile(&mut (*slot).cookie, cookie);
        Some(&mut (*slot).owner)
    }
}

/// `sk` is the socket, or in `sock_create` the program's context, which the helper takes
/// as the socket there. Returns the stored owner.
fn store_socket_owner(sk: *mut bpf_sock, owner: &SocketOwner) -> Option<&'static mut UdpOwner> {
    // SAFETY: as in `stored_owner`. Created zeroed (not audited, no last flow) and then filled
    // in place: an initial value would take a `UdpOwner` of room on the stack, which the
    // sendmsg programs do not have.
    let stored = unsafe {
        bpf_sk_storage_get(
            owners_map(),
            sk.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    };
    // Out of memory: this socket's connections cannot be attributed, and the daemon says so.
    if stored.is_null() {
        count(Counter::HookErrors);
    }
    // SAFETY: as in `stored_owner`.
    let stored = unsafe { stored.cast::<UdpOwner>().as_mut() }?;
    copy_owner(owner, &raw mut stored.owner);
    Some(stored)
}

/// aya-ebpf keeps `SkStorage::as_ptr` private and its accessors take only connect contexts.
fn owners_map() -> *mut c_void {
    ptr::from_ref(&SOCKET_OWNERS).cast_mut().cast()
}
