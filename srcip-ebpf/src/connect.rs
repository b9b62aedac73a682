//! `cgroup/connect4` and `connect6`: the one moment a program's `connect()` can still be
//! changed or refused. They record the owner of a socket created before srcip started
//! (`owner.rs`), and carry out the policy's `pin` and `block` actions. `cgroup/sendmsg4`
//! and `sendmsg6` do the same for each datagram of an unconnected UDP socket; they are
//! attached only while they are needed (the policy pins UDP, the audit is scoped, or UDP
//! blocking is kept past the daemon: `KernelPrograms::needs_datagram_programs`), because
//! with any program there the kernel locks every unconnected UDP socket around every
//! datagram. Without them the egress program blocks datagrams.
//!
//! The source is not chosen yet here: the route lookup that chooses it comes after this
//! hook. So:
//! - `pin` binds a socket that has no source to the rule's pin source (`bpf_bind`, port 0:
//!   the kernel still picks the port), and the route lookup then keeps it. A socket the
//!   program bound itself keeps its address: its choice is judged at egress like any other.
//! - `block` judges the source the socket will leave with: the one the program bound, or,
//!   when it bound none, the one user space predicted from the routing tables for that
//!   destination (`PREDICTED_V4_SOURCES`/`PREDICTED_V6_SOURCES`). Refusing here gives the
//!   program `EPERM` at once; dropping the SYN at egress would leave it waiting for minutes.
//!
//! For a datagram the source is set, not bound: `msg_src_ip4/6`, which the kernel fills with
//! the bound or `IP_PKTINFO` source and uses for the route lookup. A source that is not on
//! the host there would fail the datagram, so it is set only when user space has seen the
//! pin source on the host in the socket's namespace (`PRESENT_PIN_SOURCES`).
//!
//! Only audited sockets (an owner entry exists) are ever touched, and only when the policy
//! has an enforcing rule (`PolicyState::enforcing`): auditing alone costs this hook an owner
//! lookup, a store to its flags and a read of the policy state.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_current_uid_gid, generated::bpf_bind},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use srcip_common::{
    owner::{OWNER_PIN_ERRORS, OWNER_PINNED, SocketOwner},
    policy::{ACTION_BLOCK, ACTION_PIN, KernelRule, PinSource},
    record::{AF_INET, AF_INET6, Counter, IPPROTO_UDP, RecordFlags},
};

use crate::{
    address::{address_v4, mapped_v4, nonzero, read, read_v6, socket_source},
    maps::{PREDICTED_V4_SOURCES, PREDICTED_V6_SOURCES, PRESENT_PIN_SOURCES, count},
    owner::{calling_owner, release_tcp_owner},
    policy::{self, Connection, Delivery, allows_source, enforcing_rule},
    report::record,
};

/// What a `cgroup_sock_addr` program returns: go on with `connect()`, or fail it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn srcip_connect4(ctx: SockAddrContext) -> i32 {
    connecting(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn srcip_connect6(ctx: SockAddrContext) -> i32 {
    connecting(&ctx, AF_INET6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn srcip_sendmsg4(ctx: SockAddrContext) -> i32 {
    sending(&ctx, AF_INET)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn srcip_sendmsg6(ctx: SockAddrContext) -> i32 {
    sending(&ctx, AF_INET6)
}

/// A datagram of an unconnected UDP socket (a connected one's never comes here). A socket
/// with no owner yet is adopted by its sender when the sender is audited (`calling_owner`).
#[inline(always)]
fn sending(ctx: &SockAddrContext, hook_family: u8) -> i32 {
    // SAFETY: the context pointer the kernel passed to this program; `sk` is never null here.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let Some(owner) = calling_owner(ctx) else {
        return ALLOW;
    };
    // The marks say whether this datagram was pinned, or why not, not an earlier one's.
    owner.flags &= !(OWNER_PINNED | OWNER_PIN_ERRORS);
    if policy::state().enforcing == 0 {
        return ALLOW;
    }
    // SAFETY: as above; readable for the program run.
    let address = unsafe { &mut *ctx.sock_addr };
    let (family, dst, dst_port) = destination(address, hook_family);
    // The source the program chose (bound, or `IP_PKTINFO`), in the hook's family.
    let chosen = message_source(address, hook_family);
    let connection = Connection {
        family,
        protocol: IPPROTO_UDP,
        src: chosen.as_ref().unwrap_or(&[0; 16]),
        dst: &dst,
        dst_port,
        mark: 0,
    };
    let Some((index, rule)) = enforcing_rule(&connection) else {
        return ALLOW;
    };
    match rule.action {
        // A datagram to an IPv4-mapped address is sent through sendmsg4, so in sendmsg6 the
        // destination is IPv6: its family is the hook's.
        ACTION_PIN if chosen.is_some() => {
            owner.flags |= RecordFlags::PIN_BOUND_ADDRESS;
            ALLOW
        }
        ACTION_PIN if family == hook_family => {
            owner.flags |= match set_pin_source(address, rule, hook_family, owner.netns_cookie) {
                Ok(()) => OWNER_PINNED,
                Err(error) => error,
            };
            ALLOW
        }
        ACTION_BLOCK => {
            // SAFETY: as above.
            let (src_port, routed_as_predicted) =
                unsafe { (read(&(*sk).src_port) as u16, routed_as_predicted(&*sk)) };
            judge_block(
                owner,
                &connection,
                chosen.ok_or(routed_as_predicted),
                index,
                src_port,
            )
        }
        _ => ALLOW,
    }
}

/// `block`: refuses, and records, a connection or datagram whose source the rule with
/// `rule_index` does not allow, where that source is known exactly here: the one its program
/// `chosen`, or else (`Err(routed_as_predicted)`: the socket names no device and sets no
/// mark) the one user space predicted for exactly its destination. Everything else goes on,
/// and the egress program judges, and stops, what it sends. `src_port`: the socket's, when
/// bound.
#[inline(always)]
fn judge_block(
    owner: &SocketOwner,
    connection: &Connection,
    chosen: Result<[u8; 16], bool>,
    rule_index: u32,
    src_port: u16,
) -> i32 {
    let (src, flags) = match chosen {
        Ok(src) => (src, RecordFlags::REFUSED),
        Err(true) => {
            match predicted_source(connection.family, connection.dst, owner.netns_cookie) {
                Some(src) => (src, RecordFlags::REFUSED | RecordFlags::PREDICTED),
                // No exact prediction (not one for the whole destination, no route, another
                // namespace, or not read yet): the packet at egress tells.
                None => return ALLOW,
            }
        }
        Err(false) => return ALLOW,
    };
    if allows_source(rule_index, connection.family, &src) {
        return ALLOW;
    }
    let refused = Connection {
        src: &src,
        ..*connection
    };
    let delivery = Delivery::Violation { rule: rule_index };
    // The process refused is the one on the CPU: its user. (The socket's own is not
    // readable in this hook; it is the same unless the socket was made by another user.)
    record(owner, &refused, &src, src_port, delivery, flags, || {
        bpf_get_current_uid_gid() as u32
    });
    REFUSE
}

/// `msg_src_ip4/6`: the source the datagram will leave with when the program chose one, in
/// the record layout.
#[inline(always)]
fn message_source(address: &bpf_sock_addr, hook_family: u8) -> Option<[u8; 16]> {
    let src = if hook_family == AF_INET {
        address_v4(read(&address.msg_src_ip4))
    } else {
        read_v6(&address.msg_src_ip6)
    };
    nonzero(src)
}

/// Sets the datagram's source to `rule`'s pin source for `family` (the hook's: each hook may
/// write only its own family's field), when the host has it in the socket's namespace; else
/// the datagram takes the route's source, and the `RecordFlags::PIN_*` bit says why.
#[inline(always)]
fn set_pin_source(
    address: &mut bpf_sock_addr,
    rule: &KernelRule,
    family: u8,
    netns_cookie: u64,
) -> Result<(), u32> {
    let mut pin = PinSource {
        family: u32::from(family),
        addr: [0; 16],
    };
    if family == AF_INET {
        pin.addr[..4].copy_from_slice(&rule.pin_v4);
    } else {
        pin.addr = rule.pin_v6;
    }
    if pin.addr == [0; 16] {
        return Err(RecordFlags::PIN_NO_SOURCE);
    }
    let present = PRESENT_PIN_SOURCES
        .get_ptr(&pin)
        // SAFETY: a hash map value stays readable for the program run.
        .is_some_and(|cookie| unsafe { *cookie } == netns_cookie);
    if !present {
        count(Counter::PinFailures);
        return Err(RecordFlags::PIN_ABSENT);
    }
    // Each word is written on its own: the context allows only 4-byte stores.
    if family == AF_INET {
        address.msg_src_ip4 = u32::from_ne_bytes(rule.pin_v4);
    } else {
        let word = |index: usize| {
            let at = index * 4;
            u32::from_ne_bytes([
                rule.pin_v6[at],
                rule.pin_v6[at + 1],
                rule.pin_v6[at + 2],
                rule.pin_v6[at + 3],
            ])
        };
        address.msg_src_ip6[0] = word(0);
        address.msg_src_ip6[1] = word(1);
        address.msg_src_ip6[2] = word(2);
        address.msg_src_ip6[3] = word(3);
    }
    Ok(())
}

/// `hook_family`: `AF_INET` for connect4, `AF_INET6` for connect6.
#[inline(always)]
fn connecting(ctx: &SockAddrContext, hook_family: u8) -> i32 {
    let Some(owner) = calling_owner(ctx) else {
        return ALLOW;
    };
    // A UDP socket connected again keeps its owner: the marks say whether this connection
    // was pinned, or why not, not an earlier one's.
    owner.flags &= !(OWNER_PINNED | OWNER_PIN_ERRORS);
    if policy::state().enforcing == 0 {
        return ALLOW;
    }
    let verdict = enforce(ctx, owner, hook_family);
    if verdict == REFUSE {
        release_tcp_owner(ctx);
    }
    verdict
}

#[inline(always)]
fn enforce(ctx: &SockAddrContext, owner: &mut SocketOwner, hook_family: u8) -> i32 {
    // SAFETY: the context pointer the kernel passed to this program; `sk` is never null in
    // these hooks and readable for the program run.
    let (address, socket) = unsafe {
        let address = &*ctx.sock_addr;
        (address, &*address.__bindgen_anon_1.sk)
    };
    let (family, dst, dst_port) = destination(address, hook_family);
    let bound = socket_source(socket, family);
    let connection = Connection {
        family,
        protocol: address.protocol as u8,
        src: bound.as_ref().unwrap_or(&[0; 16]),
        dst: &dst,
        dst_port,
        mark: 0,
    };
    let Some((index, rule)) = enforcing_rule(&connection) else {
        return ALLOW;
    };
    match rule.action {
        ACTION_PIN if bound.is_some() => {
            owner.flags |= RecordFlags::PIN_BOUND_ADDRESS;
            ALLOW
        }
        ACTION_PIN => {
            owner.flags |= match pin(ctx.sock_addr, socket, rule, family) {
                Ok(()) => OWNER_PINNED,
                Err(error) => error,
            };
            ALLOW
        }
        ACTION_BLOCK => {
            let src_port = read(&socket.src_port) as u16;
            let chosen = bound.ok_or(routed_as_predicted(socket));
            judge_block(owner, &connection, chosen, index, src_port)
        }
        _ => ALLOW,
    }
}

/// The destination's family on the wire, its address in the record layout (an IPv4-mapped
/// address given to connect6 is IPv4) and its port.
#[inline(always)]
fn destination(address: &bpf_sock_addr, hook_family: u8) -> (u8, [u8; 16], u16) {
    // The port as the program gave it, in network order in the low 16 bits.
    let port = u16::from_be(address.user_port as u16);
    if hook_family == AF_INET {
        return (AF_INET, address_v4(read(&address.user_ip4)), port);
    }
    let dst = read_v6(&address.user_ip6);
    match mapped_v4(&dst) {
        Some(v4) => (AF_INET, v4, port),
        None => (AF_INET6, dst, port),
    }
}

/// Whether the route lookup for this socket is the one user space predicted with: no device
/// (`SO_BINDTODEVICE`) and no mark (`SO_MARK`), which policy routing may select on. (Its
/// uid matters only where a rule selects by uid, and then nothing is predicted.)
#[inline(always)]
fn routed_as_predicted(socket: &bpf_sock) -> bool {
    read(&socket.bound_dev_if) == 0 && read(&socket.mark) == 0
}

/// What the route module predicted the kernel will choose for `dst`, for a socket of the
/// network namespace with `netns_cookie`.
#[inline(always)]
fn predicted_source(family: u8, dst: &[u8; 16], netns_cookie: u64) -> Option<[u8; 16]> {
    let predicted = if family == AF_INET {
        PREDICTED_V4_SOURCES.get(Key::new(32, [dst[0], dst[1], dst[2], dst[3]]))
    } else {
        PREDICTED_V6_SOURCES.get(Key::new(128, *dst))
    }?;
    (predicted.netns_cookie == netns_cookie).then_some(predicted.addr)
}

/// `struct sockaddr_in` and `sockaddr_in6`, as `bpf_bind` takes them.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    /// Network order; zero lets the kernel choose the port at connect.
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

/// Binds the socket to `rule`'s pin source for `family`. When the rule has none of that
/// family, the program bound a port, or the kernel refused (the address is gone from the
/// socket's namespace), the connection goes on with the route's choice, and the
/// `RecordFlags::PIN_*` bit says why.
#[inline(always)]
fn pin(
    ctx: *mut bpf_sock_addr,
    socket: &bpf_sock,
    rule: &KernelRule,
    family: u8,
) -> Result<(), u32> {
    // A bound port cannot be bound again.
    if read(&socket.src_port) != 0 {
        return Err(RecordFlags::PIN_BOUND_PORT);
    }
    let result = if socket.family == u32::from(AF_INET) {
        if rule.pin_v4 == [0; 4] {
            return Err(RecordFlags::PIN_NO_SOURCE);
        }
        let mut address = SockaddrIn {
            family: u16::from(AF_INET),
            port: 0,
            addr: rule.pin_v4,
            zero: [0; 8],
        };
        // SAFETY: the program's context and a whole `sockaddr_in` on this stack.
        unsafe {
            bpf_bind(
                ctx,
                (&raw mut address).cast(),
                size_of::<SockaddrIn>() as i32,
            )
        }
    } else {
        let mut addr = [0; 16];
        if family == AF_INET {
            if rule.pin_v4 == [0; 4] {
                return Err(RecordFlags::PIN_NO_SOURCE);
            }
            // An IPv6 socket reaches an IPv4 destination from `::ffff:a.b.c.d`.
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..].copy_from_slice(&rule.pin_v4);
        } else {
            if rule.pin_v6 == [0; 16] {
                return Err(RecordFlags::PIN_NO_SOURCE);
            }
            addr = rule.pin_v6;
        }
        let mut address = SockaddrIn6 {
            family: u16::from(AF_INET6),
            port: 0,
            flowinfo: 0,
            addr,
            scope_id: 0,
        };
        // SAFETY: the program's context and a whole `sockaddr_in6` on this stack.
        unsafe {
            bpf_bind(
                ctx,
                (&raw mut address).cast(),
                size_of::<SockaddrIn6>() as i32,
            )
        }
    };
    if result != 0 {
        count(Counter::PinFailures);
        return Err(RecordFlags::PIN_ABSENT);
    }
    Ok(())
}
