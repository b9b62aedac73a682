//! The source address a connection really leaves with, TCP and UDP: the packet on its way
//! out, at `cgroup_skb/egress`.
//!
//! Why here:
//! - It runs after the output path's netfilter hooks (`ip_finish_output`,
//!   `ip6_finish_output`), so the packet carries the address the partner will see, after any
//!   SNAT or MASQUERADE on this host, while the socket still holds the address the kernel
//!   chose for the program. The policy judges the packet's; a difference is `wire_src`.
//! - A TCP connection's SYN leaves while its socket is in `SYN_SENT`, which is a field of
//!   the socket: every later packet of the connection costs that one read and nothing more.
//!   Source address and port are both chosen by then.
//! - UDP has no callback that sees the chosen source: a connected socket gets it in
//!   `ip4_datagram_connect`, after `cgroup/connect4/6`, an unconnected one per datagram in
//!   `udp_sendmsg`, after `cgroup/sendmsg4/6`, and a program may set it per datagram
//!   (`IP_PKTINFO`). Only the packet has it.
//!
//! The hook runs for every packet of every socket, so it leaves at once for anything but a
//! TCP SYN or a UDP datagram of a socket with an audited owner, and decides that on the
//! packet's headers, read in place, before calling any helper. Attribution comes from that
//! owner record (`owner.rs`): the current-task helpers are not allowed here before 6.10, and
//! the sender is not always current anyway.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT, bpf_sock},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_sk_fullsock, bpf_spin_lock, bpf_spin_unlock,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use srcip_common::{
    owner::{LastFlow, SocketOwner, UdpOwner},
    record::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    owner::{audited_udp_owner, block_syn, blocked_syn, take_tcp_owner},
    policy::{self, Connection},
    report::report,
    udp,
};

/// cgroup_skb programs decide whether the packet may leave: srcip lets it, unless it
/// violates a `block` rule (a UDP sender then gets EPERM; a TCP SYN is retransmitted, and
/// stopped again, until `connect()` times out).
const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn srcip_egress(ctx: SkBuffContext) -> i32 {
    if observe(&ctx) { DROP } else { PASS }
}

/// Records what the packet tells; true when a `block` rule stops it.
#[inline(always)]
fn observe(ctx: &SkBuffContext) -> bool {
    // SAFETY: the context pointer the kernel passed to this program.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // Most packets (a connection's data and acknowledgements, the host's ICMP answers) leave
    // here, on their headers alone, before any helper is called.
    let kind = Kind::in_place(ctx);
    if matches!(kind, Some(Kind::Other)) {
        return false;
    }
    // SAFETY: `sk` is the packet's socket, as the kernel gave it; the helper checks it.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null full socket is readable for this program run.
    let socket = unsafe { &*sk };
    // Compared whole: see `IPPROTO_MPTCP` (an MPTCP socket's packets are its subflows').
    const TCP: u32 = IPPROTO_TCP as u32;
    const UDP: u32 = IPPROTO_UDP as u32;
    match (socket.protocol, kind) {
        // Only the SYN: a connection's one packet sent in SYN_SENT (or its retransmission).
        (TCP, Some(Kind::TcpSyn) | None) if socket.state == BPF_TCP_SYN_SENT => {
            // SAFETY: the context is the helper's argument; it names the packet's socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
            // Taken, not read: the owner is needed for this one packet, and a retransmitted
            // SYN finds nothing, so it is not reported twice.
            let Some(owner) = take_tcp_owner(cookie) else {
                // A retransmission of a SYN already stopped: stopped again, unreported.
                return blocked_syn(cookie);
            };
            let blocked = Packet::read(ctx, socket, IPPROTO_TCP)
                .is_some_and(|packet| decide(ctx, socket, owner, &packet));
            if blocked {
                block_syn(cookie);
            }
            blocked
        }
        (UDP, Some(Kind::Udp { .. }) | None) => {
            let Some(udp) = audited_udp_owner(sk) else {
                return false;
            };
            // The common case, a socket sending to the same place again: one comparison of
            // the whole flow. A reload changes the generation, so flows are decided again.
            let generation = policy::state().generation;
            // Not known without the headers in place: the flow table decides.
            let in_place = match kind {
                Some(Kind::Udp { family }) => Some(family),
                _ => None,
            };
            if let Some(family) = in_place
                && let Some(blocked) = last_flow_verdict(ctx, family, udp, generation)
            {
                return blocked;
            }
            let Some(packet) = Packet::read(ctx, socket, IPPROTO_UDP) else {
                return false;
            };
            // A flow this socket sent before, though not last (a resolver): one lookup.
            let blocked = match udp::flow(ctx, &packet, generation) {
                udp::Flow::Seen { blocked } => blocked,
                udp::Flow::New(verdict) => {
                    let blocked = decide(ctx, socket, &udp.owner, &packet);
                    if let Some(verdict) = verdict {
                        udp::set_verdict(verdict, blocked);
                    }
                    blocked
                }
            };
            remember_flow(ctx, in_place, udp, generation, blocked);
            blocked
        }
        _ => false,
    }
}

/// What a packet is, as far as this program cares.
#[derive(Clone, Copy)]
enum Kind {
    /// A TCP segment with SYN and without ACK: a connection's first packet.
    TcpSyn,
    /// A UDP datagram of `family` whose headers are in place (`is_last_flow`).
    Udp { family: u8 },
    /// Anything else: nothing to do.
    Other,
}

impl Kind {
    /// The packet's kind, from its headers read in place (direct packet access: loads, no
    /// helper). `None` when they are not all in the packet's linear part, or an IPv4 header
    /// has options: the socket then tells (`bpf_sk_fullsock`), as for every packet before.
    #[inline(always)]
    fn in_place(ctx: &SkBuffContext) -> Option<Self> {
        // Enough for an IPv4 header without options and the ports; TCP's flags and IPv6
        // need more, checked below.
        let head = Linear::<24>::at(ctx)?;
        match head.byte(0) {
            // IPv4, a 20-byte header.
            0x45 => match head.byte(9) {
                IPPROTO_TCP => Some(Self::tcp(Linear::<34>::at(ctx)?.byte(33))),
                IPPROTO_UDP => Some(Self::Udp { family: AF_INET }),
                _ => Some(Self::Other),
            },
            // IPv4 with options.
            0x46..=0x4f => None,
            // IPv6: the version is the first byte's high half. A transport header behind
            // extension headers is found by `Packet::read`.
            version_and_class if version_and_class >> 4 == 6 => match head.byte(6) {
                IPPROTO_TCP => Some(Self::tcp(Linear::<54>::at(ctx)?.byte(53))),
                IPPROTO_UDP => {
                    Linear::<44>::at(ctx)?;
                    Some(Self::Udp { family: AF_INET6 })
                }
                next if is_ipv6_extension(next) => None,
                _ => Some(Self::Other),
            },
            _ => Some(Self::Other),
        }
    }

    /// A TCP segment with these flags (the header's 14th byte).
    #[inline(always)]
    fn tcp(flags: u8) -> Self {
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        if flags & (SYN | ACK) == SYN {
            Self::TcpSyn
        } else {
            Self::Other
        }
    }
}

/// The header words of a UDP datagram of `family` whose headers are in place: source and
/// destination addresses (IPv4: one word each) and both ports. A socket's own port does not
/// change, so including it costs nothing.
#[inline(always)]
fn flow_words(ctx: &SkBuffContext, family: u8) -> Option<([u32; 4], [u32; 4], u32)> {
    if family == AF_INET {
        let head = Linear::<24>::at(ctx)?;
        return Some((
            [head.word(12), 0, 0, 0],
            [head.word(16), 0, 0, 0],
            head.word(20),
        ));
    }
    let head = Linear::<44>::at(ctx)?;
    Some((
        [head.word(8), head.word(12), head.word(16), head.word(20)],
        [head.word(24), head.word(28), head.word(32), head.word(36)],
        head.word(40),
    ))
}

/// Whether the datagram is blocked, when it is of the flow its socket decided last under
/// this policy `generation`: every word compared, so that no other flow passes for it.
#[inline(always)]
fn last_flow_verdict(
    ctx: &SkBuffContext,
    family: u8,
    udp: &mut UdpOwner,
    generation: u32,
) -> Option<bool> {
    let (src, dst, ports) = flow_words(ctx, family)?;
    with_last_flow(udp, |last| {
        let same = last.family == u32::from(family)
            && last.generation == generation
            && last.ports == ports
            && last.src == src
            && last.dst == dst;
        same.then_some(last.blocked != 0)
    })
}

/// Makes the datagram's flow its socket's last decided one, with its verdict; or, when its
/// headers are not in place (`family` is `None`), leaves none, as the next datagram could
/// not be compared without a lookup anyway.
#[inline(always)]
fn remember_flow(
    ctx: &SkBuffContext,
    family: Option<u8>,
    udp: &mut UdpOwner,
    generation: u32,
    blocked: bool,
) {
    match family.and_then(|family| Some((family, flow_words(ctx, family)?))) {
        Some((family, (src, dst, ports))) => with_last_flow(udp, |last| {
            *last = LastFlow {
                src,
                dst,
                ports,
                family: u32::from(family),
                generation,
                blocked: u32::from(blocked),
            }
        }),
        None => with_last_flow(udp, |last| last.family = 0),
    }
}

/// Runs `access` on the socket's last flow with its lock held, so that it reads or writes a
/// whole flow. Inlined, with nothing inside that calls: while a lock is held the verifier
/// allows no call but the one that releases it.
#[inline(always)]
fn with_last_flow<R>(udp: &mut UdpOwner, access: impl FnOnce(&mut LastFlow) -> R) -> R {
    let lock = (&raw mut udp.last_flow_lock).cast();
    // SAFETY: the lock is in the socket's storage, a map value with BTF that names it; the
    // storage lives for the whole program run, and the lock is released below.
    unsafe { bpf_spin_lock(lock) };
    let result = access(&mut udp.last_flow);
    // SAFETY: the lock taken above.
    unsafe { bpf_spin_unlock(lock) };
    result
}

/// The packet's first `N` bytes, where they are in its linear part: readable in place.
#[derive(Clone, Copy)]
struct Linear<const N: usize> {
    data: *const u8,
}

impl<const N: usize> Linear<N> {
    #[inline(always)]
    fn at(ctx: &SkBuffContext) -> Option<Self> {
        // SAFETY: fields of the context the kernel passed to this program.
        let (data, data_end) = unsafe { ((*ctx.skb.skb).data, (*ctx.skb.skb).data_end) };
        (data as usize + N <= data_end as usize).then_some(Self {
            data: data as *const u8,
        })
    }

    #[inline(always)]
    fn byte(self, at: usize) -> u8 {
        // SAFETY: `at` is below N, which `Linear::at` checked against the packet's end, a
        // check the verifier follows. Callers pass constants below N.
        unsafe { *self.data.add(at) }
    }

    /// All N bytes, copied.
    #[inline(always)]
    fn bytes(self) -> [u8; N] {
        // SAFETY: as in `byte`; the array's alignment is one byte.
        unsafe { ptr::read(self.data.cast::<[u8; N]>()) }
    }

    /// The 4 bytes at `at`, as they lie in memory, in one load (`read_unaligned` would be
    /// four, and this runs for every datagram).
    #[inline(always)]
    fn word(self, at: usize) -> u32 {
        // SAFETY: as in `byte`, for `at + 4 <= N`. Callers pass multiples of 4, and a packet
        // this host makes starts its IP header at an aligned offset of its buffer (the
        // link-layer headroom is reserved in 16-byte steps). Were one not aligned, the load
        // is still one instruction on the machines the kernel allows it on: the verifier
        // refuses a misaligned packet load where the CPU cannot make it.
        unsafe { ptr::read(self.data.add(at).cast::<u32>()) }
    }
}

/// Decides and reports the connection `packet` starts; true when a `block` rule stops it.
#[inline(always)]
fn decide(ctx: &SkBuffContext, socket: &bpf_sock, owner: &SocketOwner, packet: &Packet) -> bool {
    let socket_src = socket_source(socket, packet.family).unwrap_or(packet.src);
    let connection = Connection {
        family: packet.family,
        protocol: socket.protocol as u8,
        src: &packet.src,
        dst: &packet.dst,
        dst_port: packet.dst_port,
        // SAFETY: a field of the context the kernel passed to this program.
        mark: unsafe { (*ctx.skb.skb).mark },
    };
    // The socket's own port: the packet's may have been translated with its address. The
    // socket's user is the one the kernel routes it by (`ip rule ... uidrange`): its
    // creator's filesystem uid.
    report(
        owner,
        &connection,
        &socket_src,
        socket.src_port as u16,
        || {
            // SAFETY: the context is the helper's argument.
            unsafe { bpf_get_socket_uid(ctx.skb.skb) }
        },
    )
}

/// The source address the socket itself holds for a packet of `family`, in the record
/// layout, when that is the address the packet left with before any translation: a TCP
/// socket's and a connected UDP socket's. An unconnected UDP socket's source is chosen per
/// datagram (route, `IP_PKTINFO`), so the socket cannot tell it: `None`.
///
/// Not `address::socket_source`, which reads the same fields through the stack: this
/// program is near the verifier's 512-byte stack limit, and with it the verifier counted 528.
#[inline(always)]
fn socket_source(socket: &bpf_sock, family: u8) -> Option<[u8; 16]> {
    let connected =
        socket.protocol == u32::from(IPPROTO_TCP) || socket.state == BPF_TCP_ESTABLISHED;
    if !connected {
        return None;
    }
    // Each word is read on its own, at a constant offset: the verifier allows no arithmetic
    // on a socket pointer, so the words cannot be copied by a loop.
    let word = |index: usize| socket.src_ip6[index].to_ne_bytes();
    let mut src = [0; 16];
    match (socket.family as u8, family) {
        (AF_INET, AF_INET) => src[..4].copy_from_slice(&socket.src_ip4.to_ne_bytes()),
        // An IPv6 socket sending to an IPv4-mapped address holds `::ffff:a.b.c.d`.
        (AF_INET6, AF_INET) => src[..4].copy_from_slice(&word(3)),
        (AF_INET6, AF_INET6) => {
            src[..4].copy_from_slice(&word(0));
            src[4..8].copy_from_slice(&word(1));
            src[8..12].copy_from_slice(&word(2));
            src[12..].copy_from_slice(&word(3));
        }
        _ => return None,
    }
    (src != [0; 16]).then_some(src)
}

/// The packet's first `N` bytes. Read in place when the packet's linear part holds them, as
/// it does the headers of every packet this host makes: through `bpf_skb_load_bytes`,
/// reading the headers took about half of this program's time at a UDP datagram, 20 ns
/// more than in place (docs/BENCHMARKS.md). The helper is the fallback for the rest.
#[inline(always)]
fn packet_start<const N: usize>(ctx: &SkBuffContext) -> Option<[u8; N]> {
    match Linear::<N>::at(ctx) {
        Some(linear) => Some(linear.bytes()),
        None => ctx.skb.load(0).ok(),
    }
}

/// The addresses and ports a TCP or UDP packet carries, in the record layout.
pub struct Packet {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub dst_port: u16,
}

impl Packet {
    /// At cgroup egress the packet starts with its IP header. One read takes what the
    /// smallest packet of either protocol has (an IPv4 header without options and the ports,
    /// which TCP and UDP place alike: 24 bytes); only an IPv4 header with options, or IPv6,
    /// needs a second, and IPv6 extension headers one more per header. A packet whose
    /// transport header is not found is judged by its `socket` when the socket is connected.
    #[inline(always)]
    fn read(ctx: &SkBuffContext, socket: &bpf_sock, protocol: u8) -> Option<Self> {
        let head: [u8; 24] = packet_start(ctx)?;
        let mut src = [0; 16];
        let mut dst = [0; 16];
        let (family, dst_port): (u8, [u8; 2]) = match head[0] >> 4 {
            4 => {
                if head[9] != protocol {
                    return None;
                }
                src[..4].copy_from_slice(&head[12..16]);
                dst[..4].copy_from_slice(&head[16..20]);
                let header_length = usize::from(head[0] & 0x0f) * 4;
                let dst_port = if header_length == 20 {
                    [head[22], head[23]]
                } else {
                    ctx.skb.load(header_length + 2).ok()?
                };
                (AF_INET, dst_port)
            }
            6 => {
                let header: [u8; 44] = packet_start(ctx)?;
                src.copy_from_slice(&header[8..24]);
                dst.copy_from_slice(&header[24..40]);
                let dst_port = if header[6] == protocol {
                    [header[42], header[43]]
                } else {
                    match transport_behind_extensions(ctx, header[6], protocol, &mut dst) {
                        Some(transport) => ctx.skb.load(transport + 2).ok()?,
                        None => socket_destination_v6(socket, &mut dst)?,
                    }
                };
                (AF_INET6, dst_port)
            }
            _ => return None,
        };
        Some(Self {
            family,
            src,
            dst,
            dst_port: u16::from_be_bytes(dst_port),
        })
    }
}

/// IPv6 extension headers that may stand between the IPv6 header and TCP or UDP.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTHENTICATION: u8 = 51;
const DESTINATION_OPTIONS: u8 = 60;

/// How many extension headers are followed: a socket can have the kernel add hop-by-hop
/// options, destination options twice and a routing header, and the kernel itself a
/// fragment header; twice that leaves room for what a future kernel adds.
const MAX_IPV6_EXTENSIONS: usize = 8;

#[inline(always)]
fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        HOP_BY_HOP | ROUTING | FRAGMENT | AUTHENTICATION | DESTINATION_OPTIONS
    )
}

/// The offset of the `protocol` header behind the IPv6 extension headers that start with
/// `next` (the IPv6 header's next header), in at most `MAX_IPV6_EXTENSIONS` steps. A routing
/// header sends the packet to its first hop: `dst` is set to the destination it finally goes
/// to. `None`: not found (more headers, ESP, a later fragment).
#[inline(always)]
fn transport_behind_extensions(
    ctx: &SkBuffContext,
    mut next: u8,
    protocol: u8,
    dst: &mut [u8; 16],
) -> Option<usize> {
    let mut offset = 40;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        if next == protocol {
            return Some(offset);
        }
        // Next header, length, and for a routing header its type.
        let extension: [u8; 4] = ctx.skb.load(offset).ok()?;
        let units = usize::from(extension[1]);
        let length = match next {
            HOP_BY_HOP | DESTINATION_OPTIONS => (units + 1) * 8,
            ROUTING => {
                // Segment routing (type 4) lists its segments last first, so the final
                // destination is the first; types 0 and 2 list them in order, 16 bytes each
                // after 8 bytes of header.
                let final_destination = match extension[2] {
                    4 => 8,
                    _ if units >= 2 => units * 8 - 8,
                    _ => return None,
                };
                *dst = ctx.skb.load(offset + final_destination).ok()?;
                (units + 1) * 8
            }
            FRAGMENT => {
                // Only the first fragment carries the transport header.
                if u16::from_be_bytes([extension[2], extension[3]]) & 0xfff8 != 0 {
                    return None;
                }
                8
            }
            AUTHENTICATION => (units + 2) * 4,
            _ => return None,
        };
        next = extension[0];
        offset += length;
    }
    (next == protocol).then_some(offset)
}

/// A connected socket's destination (IPv6) and port, in the record layout: what a packet
/// whose headers could not be followed is judged by. `None` for an unconnected socket.
#[inline(always)]
fn socket_destination_v6(socket: &bpf_sock, dst: &mut [u8; 16]) -> Option<[u8; 2]> {
    let connected =
        socket.protocol == u32::from(IPPROTO_TCP) || socket.state == BPF_TCP_ESTABLISHED;
    if !connected {
        return None;
    }
    // Each word on its own, at a constant offset, as in `socket_source`.
    dst[..4].copy_from_slice(&socket.dst_ip6[0].to_ne_bytes());
    dst[4..8].copy_from_slice(&socket.dst_ip6[1].to_ne_bytes());
    dst[8..12].copy_from_slice(&socket.dst_ip6[2].to_ne_bytes());
    dst[12..].copy_from_slice(&socket.dst_ip6[3].to_ne_bytes());
    // A 4-byte load, which every kernel allows: 5.10's `dst_port` is a word whose low half,
    // as it lies in memory, is the port in network order.
    // SAFETY: a field of the full socket, readable for the program run.
    let word = unsafe { ptr::read_volatile((&raw const socket.dst_port).cast::<u32>()) };
    Some(word.to_ne_bytes()[..2].try_into().ok()?)
}
