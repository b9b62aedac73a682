//! TCP: the source address the kernel really chose for an outbound connection.
//!
//! Hook: sock_ops at `BPF_SOCK_OPS_TCP_CONNECT_CB` (no callback flags needed). `tcp_connect()`
//! calls it after the route lookup chose the source address and after the source port was
//! chosen. Reads `bpf_sock_ops.op`, `family`, `local_ip4`/`remote_ip4` and
//! `local_ip6`/`remote_ip6` (network order), `local_port` (host order), `remote_port`
//! (network order in the upper 16 bits) and `sk`.
//!
//! Who connected comes from the socket's owner record (`owner.rs`), never from the task on
//! the CPU: sock_ops may run outside the owner's context, and before Linux 6.10 it may not
//! call the current-task helpers at all. So this program calls only helpers every supported
//! kernel allows in sock_ops: socket storage, the ring buffer and the clock.
//!
//! Why not earlier: at `cgroup/connect4/6` the source is not chosen yet. Why not the
//! `sock:inet_sock_set_state` tracepoint: the source port may still be zero there, and it
//! cannot read socket storage.

use aya_ebpf::{bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, macros::sock_ops, programs::SockOpsContext};
use srcip_common::record::{AF_INET, AF_INET6, IPPROTO_TCP};

use crate::{owner::audited_owner_of, policy::Connection, report::report};

#[sock_ops]
pub fn srcip_tcp_connect(ctx: SockOpsContext) -> u32 {
    // sock_ops runs for several callbacks per connection; only the connect one matters.
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        record_connect(&ctx);
    }
    // The return value is ignored for this callback; the connection always proceeds.
    1
}

fn record_connect(ctx: &SockOpsContext) {
    // SAFETY: the context pointer the kernel passed to this program.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let Some(owner) = audited_owner_of(sk) else {
        return;
    };
    let Some((family, src_addr, dst_addr)) = addresses(ctx) else {
        return;
    };
    let connection = Connection {
        family,
        protocol: IPPROTO_TCP,
        src: &src_addr,
        dst: &dst_addr,
        dst_port: u16::from_be((ctx.remote_port() >> 16) as u16),
    };
    report(owner, &connection, ctx.local_port() as u16);
}

/// The family on the wire and both addresses in network order. An IPv6 socket connecting to
/// an IPv4-mapped address sends IPv4, so it is reported as IPv4.
fn addresses(ctx: &SockOpsContext) -> Option<(u8, [u8; 16], [u8; 16])> {
    match ctx.family() {
        family if family == u32::from(AF_INET) => Some((
            AF_INET,
            ipv4_in_16(ctx.local_ip4()),
            ipv4_in_16(ctx.remote_ip4()),
        )),
        family if family == u32::from(AF_INET6) => {
            let (local, remote) = (ctx.local_ip6(), ctx.remote_ip6());
            if is_ipv4_mapped(&remote) {
                Some((AF_INET, ipv4_in_16(local[3]), ipv4_in_16(remote[3])))
            } else {
                Some((AF_INET6, ipv6_bytes(&local), ipv6_bytes(&remote)))
            }
        }
        _ => None,
    }
}

/// `::ffff:a.b.c.d`; the words hold network-order bytes, so compare them as bytes.
fn is_ipv4_mapped(words: &[u32; 4]) -> bool {
    words[0] == 0 && words[1] == 0 && words[2].to_ne_bytes() == [0, 0, 0xff, 0xff]
}

fn ipv4_in_16(network_order: u32) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..4].copy_from_slice(&network_order.to_ne_bytes());
    bytes
}

fn ipv6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut bytes = [0; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    bytes
}
