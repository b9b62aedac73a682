//! UDP: the source address each datagram really carries.
//!
//! Hook: `cgroup_skb/egress`. UDP has no connect callback that sees the source: a connected
//! socket gets its source in `ip4_datagram_connect`, after `cgroup/connect4/6`, and an
//! unconnected one per datagram in `udp_sendmsg`, after `cgroup/sendmsg4/6` (and a program may
//! set it per datagram with `IP_PKTINFO`). The only place that sees every one of them is the
//! packet on its way out, so this program reads the IP and UDP headers there. It runs for
//! every packet of every socket, so it leaves at once for anything but a UDP socket that has
//! an audited owner, and then remembers which (socket, source, destination, port) it has
//! seen: each is decided and reported once, not per datagram.
//!
//! Attribution comes from the socket's owner record (`owner.rs`): the current-task helpers
//! are not allowed here before 6.10, and the sender is not always current anyway.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_socket_cookie, bpf_sk_fullsock},
    macros::{cgroup_skb, map},
    maps::LruHashMap,
    programs::SkBuffContext,
};
use srcip_common::{
    record::{AF_INET, AF_INET6, IPPROTO_UDP},
    udp::{SEEN_DATAGRAM_FLOWS, SeenFlow},
};

use crate::{owner::audited_owner_of, policy::Connection, report::report};

/// Flows already reported; the least recently used is forgotten first, after which its
/// next datagram is reported again (a duplicate, never a loss).
#[map]
static UDP_FLOWS: LruHashMap<SeenFlow, u8> = LruHashMap::with_max_entries(SEEN_DATAGRAM_FLOWS, 0);

/// cgroup_skb programs decide whether the packet may leave: srcip always lets it.
const PASS: i32 = 1;

#[cgroup_skb(egress)]
pub fn srcip_udp_egress(ctx: SkBuffContext) -> i32 {
    record_datagram(&ctx);
    PASS
}

#[inline(always)]
fn record_datagram(ctx: &SkBuffContext) {
    // SAFETY: the context pointer the kernel passed to this program.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is the packet's socket, as the kernel gave it; the helper checks it.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: a non-null full socket is readable for this program run.
    if sk.is_null() || unsafe { (*sk).protocol } != u32::from(IPPROTO_UDP) {
        return;
    }
    let Some(owner) = audited_owner_of(sk) else {
        return;
    };
    let Some(datagram) = Datagram::read(ctx) else {
        return;
    };
    // The common case, a socket sending to the same place again: one comparison.
    let fingerprint = datagram.fingerprint();
    if owner.last_udp_flow == fingerprint {
        return;
    }
    let flow = SeenFlow {
        // SAFETY: the context is the helper's argument; it names the packet's socket.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        src: datagram.src,
        dst: datagram.dst,
        dst_port: datagram.dst_port,
        family: datagram.family,
        reserved: [0; 5],
    };
    // A flow this socket sent before, though not last (a resolver): one lookup. An insert
    // that loses a race with another CPU leaves the report to that CPU.
    let seen = UDP_FLOWS.get_ptr(&flow).is_some()
        || UDP_FLOWS.insert(&flow, &0, BPF_NOEXIST.into()).is_err();
    // The flow is decided below, in this same run, so a matching fingerprint later means
    // "already reported".
    owner.last_udp_flow = fingerprint;
    if seen {
        return;
    }
    let connection = Connection {
        family: datagram.family,
        protocol: IPPROTO_UDP,
        src: &datagram.src,
        dst: &datagram.dst,
        dst_port: datagram.dst_port,
    };
    report(owner, &connection, datagram.src_port);
}

/// The addresses and ports a datagram carries, in the record layout.
struct Datagram {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
}

impl Datagram {
    /// At cgroup egress the packet starts with its IP header. One load takes what the
    /// smallest UDP datagram of either family has (an IPv4 header without options and the
    /// ports: 28 bytes); only an IPv4 header with options, or IPv6, needs a second.
    /// IPv6 extension headers are not followed: a datagram behind one is not seen.
    #[inline(always)]
    fn read(ctx: &SkBuffContext) -> Option<Self> {
        let head: [u8; 28] = ctx.skb.load(0).ok()?;
        let mut src = [0; 16];
        let mut dst = [0; 16];
        let (family, ports): (u8, [u8; 4]) = match head[0] >> 4 {
            4 => {
                if head[9] != IPPROTO_UDP {
                    return None;
                }
                src[..4].copy_from_slice(&head[12..16]);
                dst[..4].copy_from_slice(&head[16..20]);
                let header_length = usize::from(head[0] & 0x0f) * 4;
                let ports = if header_length == 20 {
                    [head[20], head[21], head[22], head[23]]
                } else {
                    ctx.skb.load(header_length).ok()?
                };
                (AF_INET, ports)
            }
            6 => {
                if head[6] != IPPROTO_UDP {
                    return None;
                }
                let header: [u8; 44] = ctx.skb.load(0).ok()?;
                src.copy_from_slice(&header[8..24]);
                dst.copy_from_slice(&header[24..40]);
                (AF_INET6, [header[40], header[41], header[42], header[43]])
            }
            _ => return None,
        };
        Some(Self {
            family,
            src,
            dst,
            src_port: u16::from_be_bytes([ports[0], ports[1]]),
            dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        })
    }

    /// An FNV-style hash of the flow, a word at a time (fixed indexes: the verifier follows
    /// them without loops). Two flows share one by accident with odds of 2⁻⁶⁴; it is not meant
    /// to resist a program that crafts destinations to collide with its own last one.
    fn fingerprint(&self) -> u64 {
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
            u64::from(self.dst_port) << 8 | u64::from(self.family),
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
