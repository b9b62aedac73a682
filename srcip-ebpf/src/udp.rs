//! The UDP flows already decided: a datagram is decided, and reported if it must be, once per
//! (socket, source, destination, destination port), not once per datagram. The egress hook
//! (`egress.rs`) asks here only when the socket's last flow was another one.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_get_socket_cookie, macros::map,
    maps::LruHashMap, programs::SkBuffContext,
};
use srcip_common::udp::{SEEN_DATAGRAM_FLOWS, SeenFlow};

use crate::egress::Packet;

/// Flows already reported; the least recently used is forgotten first, after which its
/// next datagram is reported again (a duplicate, never a loss).
#[map]
static UDP_FLOWS: LruHashMap<SeenFlow, u8> = LruHashMap::with_max_entries(SEEN_DATAGRAM_FLOWS, 0);

/// Whether this socket's datagrams of `packet`'s flow were decided before, under the policy
/// of `generation`; remembers the flow if not. An insert that loses a race with another CPU leaves the report to that CPU.
#[inline(always)]
pub fn seen_before(ctx: &SkBuffContext, packet: &Packet, generation: u32) -> bool {
    let flow = SeenFlow {
        // SAFETY: the context is the helper's argument; it names the packet's socket.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        src: packet.src,
        dst: packet.dst,
        dst_port: packet.dst_port,
        family: packet.family,
        reserved: 0,
        generation,
    };
    UDP_FLOWS.get_ptr(&flow).is_some() || UDP_FLOWS.insert(&flow, &0, BPF_NOEXIST.into()).is_err()
}
