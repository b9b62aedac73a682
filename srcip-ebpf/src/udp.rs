//! The UDP flows already decided: a datagram is decided, and reported if it must be, once per
//! (socket, source, destination, destination port), not once per datagram; the flow's
//! verdict is kept with it, so that every datagram of a flow a `block` rule refuses is
//! stopped. The egress hook (`egress.rs`) asks here only when the socket's last flow was
//! another one.

use core::ptr;

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_get_socket_cookie, macros::map,
    maps::LruHashMap, programs::SkBuffContext,
};
use srcip_common::udp::{SEEN_DATAGRAM_FLOWS, SeenFlow};

use crate::egress::Packet;

/// Flows already decided → their verdict (`PASSED`, `BLOCKED`), or `UNDECIDED` while the
/// program run that remembered the flow decides it. The least recently used is forgotten
/// first, after which its next datagram is decided and reported again (a duplicate, never a
/// loss).
#[map]
static UDP_FLOWS: LruHashMap<SeenFlow, u8> = LruHashMap::with_max_entries(SEEN_DATAGRAM_FLOWS, 0);

const PASSED: u8 = 0;
const BLOCKED: u8 = 1;
/// A datagram of the flow sent meanwhile, by another thread on another CPU, is decided
/// again by its own run rather than passed as "seen": it may be one a `block` rule stops.
const UNDECIDED: u8 = 2;

pub enum Flow {
    /// Decided before: `blocked` says whether its datagrams are stopped.
    Seen { blocked: bool },
    /// Not decided yet: decide it, and set its verdict here (`set_verdict`). `None`: another
    /// run remembered it and has not decided yet, or at the same moment; both decide.
    New(Option<&'static mut u8>),
}

/// Ends a new flow's `UNDECIDED`: from here on its datagrams cost one lookup.
#[inline(always)]
pub fn set_verdict(verdict: &mut u8, blocked: bool) {
    let value = if blocked { BLOCKED } else { PASSED };
    // SAFETY: a map value, writable for the program run; one byte, stored whole.
    unsafe { ptr::write_volatile(verdict, value) };
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
    if let Some(verdict) = UDP_FLOWS.get_ptr(&flow) {
        // SAFETY: a map value stays readable for the program run; one byte, read whole.
        return match unsafe { ptr::read_volatile(verdict) } {
            UNDECIDED => Flow::New(None),
            verdict => Flow::Seen {
                blocked: verdict == BLOCKED,
            },
        };
    }
    if UDP_FLOWS
        .insert(&flow, &UNDECIDED, BPF_NOEXIST.into())
        .is_err()
    {
        return Flow::New(None);
    }
    // SAFETY: as above; the value is one byte another run may read at the same time.
    Flow::New(
        UDP_FLOWS
            .get_ptr_mut(&flow)
            .map(|verdict| unsafe { &mut *verdict }),
    )
}
