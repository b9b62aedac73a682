//! The UDP flows already decided: a datagram is decided, and reported if it must be, once per
//! (socket, source, destination, destination port), not once per datagram; the flow's
//! verdict is kept with it, so that every datagram of a flow a `block` rule refuses is
//! stopped. The egress hook (`egress.rs`) asks here only when the socket's last flow was
//! another one.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_get_socket_cookie, macros::map,
    maps::LruHashMap, programs::SkBuffContext,
};
use srcip_common::udp::{SEEN_DATAGRAM_FLOWS, SeenFlow};

use crate::egress::Packet;

/// Flows already decided → non-zero when a `block` rule refuses them. The least recently
/// used is forgotten first, after which its next datagram is decided and reported again (a
/// duplicate, never a loss).
#[map]
static UDP_FLOWS: LruHashMap<SeenFlow, u8> = LruHashMap::with_max_entries(SEEN_DATAGRAM_FLOWS, 0);

pub enum Flow {
    /// Decided before: `blocked` says whether its datagrams are stopped.
    Seen { blocked: bool },
    /// Not decided yet: decide it, and set its verdict here when it is blocked (`None`:
    /// another CPU remembered it at the same moment; both decide).
    New(Option<&'static mut u8>),
}

/// This socket's flow of `packet` under the policy of `generation`; remembered when new.
#[inline(always)]
pub fn flow(ctx: &SkBuffContext, packet: &Packet, generation: u32) -> Flow {
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
    if let Some(blocked) = UDP_FLOWS.get_ptr(&flow) {
        // SAFETY: a map value stays readable for the program run.
        return Flow::Seen {
            blocked: unsafe { *blocked } != 0,
        };
    }
    if UDP_FLOWS.insert(&flow, &0, BPF_NOEXIST.into()).is_err() {
        return Flow::New(None);
    }
    // SAFETY: as above; the value is one byte another run may write at the same time.
    Flow::New(
        UDP_FLOWS
            .get_ptr_mut(&flow)
            .map(|blocked| unsafe { &mut *blocked }),
    )
}
