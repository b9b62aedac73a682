//! Recording each audited socket's owner in socket-local storage (see
//! `srcip_common::owner`), so that the egress hook attributes a connection to the socket's
//! owner and scopes it by the socket's cgroup, whoever is on the CPU when the packet leaves.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_sk_storage_get},
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use srcip_common::{
    owner::SocketOwner,
    record::{AF_INET, AF_INET6, Counter, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{maps::count, scope::current_task_is_audited};

#[btf_map]
static SOCKET_OWNERS: SkStorage<SocketOwner> = SkStorage::new();

/// srcip's own process id, set by the loader.
#[unsafe(no_mangle)]
static DAEMON_TGID: u32 = 0;
/// Set by the loader for `srcip demo`, whose client is a thread of srcip.
#[unsafe(no_mangle)]
static AUDIT_DAEMON: u32 = 0;

/// Both cgroup hooks allow the operation whatever srcip finds: it observes, it never refuses.
const ALLOW: i32 = 1;

/// Runs in the task that creates the socket, so the current task is the owner and its cgroup
/// is the socket's cgroup.
#[cgroup_sock(sock_create)]
pub fn srcip_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer the kernel passed to this program.
    let sock = unsafe { &*ctx.sock };
    let inet = sock.family == u32::from(AF_INET) || sock.family == u32::from(AF_INET6);
    let transport =
        sock.protocol == u32::from(IPPROTO_TCP) || sock.protocol == u32::from(IPPROTO_UDP);
    if !(inet && transport) {
        return ALLOW;
    }
    let daemon = current_task_is_daemon();
    let audited = (!daemon || audits_daemon()) && current_task_is_audited();
    if audited || daemon {
        // In this hook the storage helper takes the context itself as the socket.
        store_current_task_as_owner(ctx.sock.cast(), ctx.sock.cast(), audited);
    }
    ALLOW
}

/// A socket created before srcip started has no owner yet: the task connecting it (or, for
/// unconnected UDP, sending on it), which is current here, is the best owner there is.
#[cgroup_sock_addr(connect4)]
pub fn srcip_connect4(ctx: SockAddrContext) -> i32 {
    adopt_unowned(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn srcip_connect6(ctx: SockAddrContext) -> i32 {
    adopt_unowned(&ctx);
    ALLOW
}

/// An unconnected UDP socket created before srcip started is adopted by its first sender.
#[cgroup_sock_addr(sendmsg4)]
pub fn srcip_sendmsg4(ctx: SockAddrContext) -> i32 {
    adopt_unowned(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn srcip_sendmsg6(ctx: SockAddrContext) -> i32 {
    adopt_unowned(&ctx);
    ALLOW
}

fn adopt_unowned(ctx: &SockAddrContext) {
    // SAFETY: the context pointer the kernel passed to this program; `sk` is never null in
    // connect hooks.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if owner_of(sk).is_none()
        && (!current_task_is_daemon() || audits_daemon())
        && current_task_is_audited()
    {
        store_current_task_as_owner(ctx.sock_addr.cast(), sk, true);
    }
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

/// The owner of `sk` when its connections are audited.
pub fn audited_owner_of(sk: *mut bpf_sock) -> Option<&'static mut SocketOwner> {
    owner_of(sk).filter(|owner| owner.audited != 0)
}

fn owner_of(sk: *mut bpf_sock) -> Option<&'static mut SocketOwner> {
    // SAFETY: `sk` is a socket pointer the kernel gave this hook; without the create flag the
    // helper only looks up. The map pointer is the map's own definition, as the helper expects.
    let owner = unsafe {
        bpf_sk_storage_get(owners_map(), sk.cast(), ptr::null_mut(), 0).cast::<SocketOwner>()
    };
    // SAFETY: a non-null result points at the socket's storage, which lives as long as the
    // socket, and so for the whole program run. Other CPUs may write `last_flow` at the
    // same time; it is one aligned 8-byte word, and every other field is written only when
    // the storage is created.
    unsafe { owner.as_mut() }
}

/// `ctx` is the program's context, which the namespace helper takes; `sk` the socket.
fn store_current_task_as_owner(ctx: *mut c_void, sk: *mut bpf_sock, audited: bool) {
    let owner = SocketOwner {
        // SAFETY: helpers without arguments, or with the program's own context.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx) },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        // A missing name must not lose the owner: the connection is still reported.
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        audited: u32::from(audited),
        reserved: 0,
        last_flow: 0,
    };
    // SAFETY: as in `owner_of`; the helper copies `owner` into the new storage.
    let stored = unsafe {
        bpf_sk_storage_get(
            owners_map(),
            sk.cast(),
            ptr::from_ref(&owner).cast_mut().cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    };
    // Out of memory: this socket's connections cannot be attributed, and the daemon says so.
    if stored.is_null() {
        count(Counter::HookErrors);
    }
}

/// aya-ebpf keeps `SkStorage::as_ptr` private and its accessors take only connect contexts.
fn owners_map() -> *mut c_void {
    ptr::from_ref(&SOCKET_OWNERS).cast_mut().cast()
}
