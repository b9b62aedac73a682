//! UDP datagram flows the egress hook has already reported.

/// A (socket, source, destination, destination port) the kernel has decided, and reported if
/// it had to: its further datagrams cost one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SeenFlow {
    pub socket_cookie: u64,
    /// Addresses in the record layout.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub dst_port: u16,
    pub family: u8,
    /// Explicit padding so the layout has no hidden holes; always zero.
    pub reserved: u8,
    /// `PolicyState::generation` the flow was decided under: a reload decides it again.
    pub generation: u32,
}

const _: () = assert!(core::mem::size_of::<SeenFlow>() == 48);

/// Capacity of the `UDP_FLOWS` LRU map: 32,768 flows of 48-byte keys, a few MiB of kernel
/// memory at most (with the map's per-entry overhead, about 4 MiB).
pub const SEEN_DATAGRAM_FLOWS: u32 = 32 * 1024;
