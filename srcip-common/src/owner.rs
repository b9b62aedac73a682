//! Who owns a socket, as the kernel side keeps it: in an array slot picked by the socket
//! cookie for TCP, in socket-local storage for UDP (`srcip-ebpf/src/owner.rs` says why).
//!
//! The hook that sees a connection's final source (the packet at `cgroup_skb/egress`) may run
//! outside the owner's context (an io_uring worker, a kernel thread), and on Linux before 6.10
//! it cannot ask who is current anyway. So the owner is taken where it is certain: when the
//! socket is created (`cgroup/sock_create`, in the creating task), or, for a socket created
//! before srcip started, when it connects (`cgroup/connect4/6`, in the connecting task). Both
//! hooks have every attribution helper on every supported kernel. Socket storage is freed
//! with the socket; a TCP slot is freed at the SYN, and given to the socket
//! `TCP_OWNER_ENTRIES` cookies later whether it was or not.

/// Slots of the TCP owner table: how many sockets may be created after a TCP socket before
/// it loses its owner if it has not sent its SYN yet. 32,768 slots of 64 bytes take 2 MiB
/// of kernel memory, allocated when srcip starts. A power of two: the slot is the cookie's
/// low bits.
pub const TCP_OWNER_ENTRIES: u32 = 32 * 1024;

/// The socket's owner. Present for sockets whose owner is audited (`--cgroup`), and for
/// srcip's own UDP sockets, which are never audited: the daemon reads their `netns_cookie` to
/// learn a namespace's cookie (`srcip-userspace/src/netns.rs`). An absent entry means "not
/// ours to report".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOwner {
    /// cgroup v2 id of the task that created the socket: the socket's own cgroup.
    pub cgroup_id: u64,
    /// Cookie of the socket's network namespace.
    pub netns_cookie: u64,
    /// Thread-group id of the creating task.
    pub pid: u32,
    /// Keeps the size a multiple of 8 bytes: owners are copied a word at a time. (The user
    /// is not kept here: it is the socket's own, read when a record is made, see
    /// `srcip-ebpf/src/report.rs`.)
    pub padding: u32,
    /// Command name of the creating thread, NUL-padded; all zero when the kernel refused it.
    pub comm: [u8; 16],
    /// Non-zero: the socket's connections are audited.
    pub audited: u32,
    /// `OWNER_*` bits.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<SocketOwner>() == 48);

/// What a UDP socket's storage holds: its owner, and the last flow its datagrams were decided
/// for, so that the next datagram of that flow costs a comparison, not a map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpOwner {
    pub owner: SocketOwner,
    /// Held while `last_flow` is read or written: two threads may send on one socket at once,
    /// from two CPUs, and a flow read half old and half new could pass for a third flow, or
    /// carry the verdict of another. Neither user space's reads nor its writes touch it.
    pub last_flow_lock: bpf_spin_lock,
    /// Keeps `last_flow` 8-byte aligned; always zero.
    pub reserved: u32,
    pub last_flow: LastFlow,
}

const _: () = assert!(core::mem::size_of::<UdpOwner>() == 104);

/// The kernel's spin lock for BPF map values. The verifier finds it in the value's BTF by
/// this name and size, as a member of the value itself (not of a nested struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(non_camel_case_types)]
pub struct bpf_spin_lock {
    val: u32,
}

/// A UDP flow as the words of its headers, compared whole: a hash of it would let a program
/// that wants to hide a datagram send a decoy whose hash is the same first. All zero (family
/// 0) matches no datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastFlow {
    /// Source and destination addresses as they lie in the packet (IPv4: the first word).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Source and destination ports, as they lie in the packet.
    pub ports: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// `PolicyState::generation` the flow was decided under: a reload decides it again.
    pub generation: u32,
    /// Non-zero: the flow violates a `block` rule, and each of its datagrams is stopped.
    pub blocked: u32,
}

/// `SocketOwner::flags`: srcip bound the socket to a `pin` rule's source at `connect()`, so
/// its connection is reported as pinned.
pub const OWNER_PINNED: u32 = 1 << 0;

/// `SocketOwner::flags`: why the last connection or datagram of a `pin` rule was not
/// pinned, as `RecordFlags::PIN_ERRORS` spells it (the record copies these bits).
pub const OWNER_PIN_ERRORS: u32 = crate::record::RecordFlags::PIN_ERRORS;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with explicit widths and no padding (size asserted above).
    unsafe impl aya::Pod for super::SocketOwner {}
    // SAFETY: as above (size asserted above, every field an integer).
    unsafe impl aya::Pod for super::UdpOwner {}
}
