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
//! TCP SYN or a UDP datagram of a socket with an audited owner. Attribution comes from that
//! owner record (`owner.rs`): the current-task helpers are not allowed here before 6.10, and
//! the sender is not always current anyway.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT, bpf_sock},
    helpers::generated::{bpf_get_socket_cookie, bpf_sk_fullsock},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use srcip_common::{
    owner::SocketOwner,
    record::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    owner::{audited_udp_owner, take_tcp_owner},
    policy::{self, Connection},
    report::report,
    udp,
};

/// cgroup_skb programs decide whether the packet may leave: srcip always lets it.
const PASS: i32 = 1;

#[cgroup_skb(egress)]
pub fn srcip_egress(ctx: SkBuffContext) -> i32 {
    observe(&ctx);
    PASS
}

#[inline(always)]
fn observe(ctx: &SkBuffContext) {
    // SAFETY: the context pointer the kernel passed to this program.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is the packet's socket, as the kernel gave it; the helper checks it.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return;
    }
    // SAFETY: a non-null full socket is readable for this program run.
    let socket = unsafe { &*sk };
    match socket.protocol as u8 {
        // Only the SYN: a connection's one packet sent in SYN_SENT (or its retransmission).
        IPPROTO_TCP if socket.state == BPF_TCP_SYN_SENT => {
            // SAFETY: the context is the helper's argument; it names the packet's socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
            // Taken, not read: the owner is needed for this one packet, and a retransmitted
            // SYN finds nothing, so it is not reported twice.
            let Some(owner) = take_tcp_owner(cookie) else {
                return;
            };
            let Some(packet) = Packet::read(ctx, IPPROTO_TCP) else {
                return;
            };
            decide(ctx, socket, owner, &packet);
        }
        IPPROTO_UDP => {
            let Some(owner) = audited_udp_owner(sk) else {
                return;
            };
            let Some(packet) = Packet::read(ctx, IPPROTO_UDP) else {
                return;
            };
            // The common case, a socket sending to the same place again: one comparison. A
            // reload changes the generation, so flows are decided again.
            let generation = policy::state().generation;
            let fingerprint = packet.fingerprint(generation);
            if owner.last_flow == fingerprint {
                return;
            }
            // A flow this socket sent before, though not last (a resolver): one lookup.
            let seen = udp::seen_before(ctx, &packet, generation);
            // The flow is decided below, in this same run, so a matching fingerprint later
            // means "already reported".
            owner.last_flow = fingerprint;
            if !seen {
                decide(ctx, socket, owner, &packet);
            }
        }
        _ => {}
    }
}

#[inline(always)]
fn decide(ctx: &SkBuffContext, socket: &bpf_sock, owner: &SocketOwner, packet: &Packet) {
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
    // The socket's own port: the packet's may have been translated with its address.
    report(owner, &connection, &socket_src, socket.src_port as u16);
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
    // SAFETY: fields of the context the kernel passed to this program.
    let (data, data_end) = unsafe { ((*ctx.skb.skb).data, (*ctx.skb.skb).data_end) };
    let (data, data_end) = (data as usize, data_end as usize);
    if data + N <= data_end {
        // SAFETY: the N bytes from `data` are in the packet (checked against `data_end`,
        // which the verifier follows); the array's alignment is one byte.
        return Some(unsafe { ptr::read(data as *const [u8; N]) });
    }
    ctx.skb.load(0).ok()
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
    /// needs a second. IPv6 extension headers are not followed: a packet behind one is not
    /// seen.
    #[inline(always)]
    fn read(ctx: &SkBuffContext, protocol: u8) -> Option<Self> {
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
                if head[6] != protocol {
                    return None;
                }
                let header: [u8; 44] = packet_start(ctx)?;
                src.copy_from_slice(&header[8..24]);
                dst.copy_from_slice(&header[24..40]);
                (AF_INET6, [header[42], header[43]])
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

    /// An FNV-style hash of the flow and the policy `generation`, a word at a time (fixed indexes: the verifier follows
    /// them without loops). Two flows share one by accident with odds of 2⁻⁶⁴; it is not meant
    /// to resist a program that crafts destinations to collide with its own last one.
    fn fingerprint(&self, generation: u32) -> u64 {
        let word = |bytes: &[u8; 16], half: usize| {
            let at = half * 8;
            u64::from_ne_bytes([
                bytes[at],
                bytes[at + 1],
                bytes[at + 2],
                bytes[at + 3],
                bytes[at + 4],
                bytes[at + 5],
                bytes[at + 6],
                bytes[at + 7],
            ])
        };
        let words = [
            word(&self.src, 0),
            word(&self.src, 1),
            word(&self.dst, 0),
            word(&self.dst, 1),
            u64::from(generation) << 32 | u64::from(self.dst_port) << 8 | u64::from(self.family),
        ];
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for word in words {
            hash = (hash ^ word).wrapping_mul(0x0100_0000_01b3);
            hash ^= hash >> 29;
        }
        // Zero means "no flow yet".
        hash | 1
    }
}
