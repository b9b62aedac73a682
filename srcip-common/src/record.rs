//! Records the kernel writes to the `EVENTS` ring buffer.
//!
//! Each record starts with a [`RecordHeader`] whose `kind` says which payload follows, so
//! later hooks (in-kernel pin and block decisions) add kinds without
//! changing the layout of the existing ones.

/// Default size of the `EVENTS` ring buffer; user space may choose another at load. A power
/// of two and a multiple of the page size, as the kernel requires. 256 KiB holds about 2000
/// connect records (each has an 8-byte ring-buffer header).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Stable numeric record kinds. Never reuse a number.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A [`ConnectRecord`]: an outbound connection whose source address the kernel chose.
    Connect = 1,
}

impl TryFrom<u32> for RecordKind {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Connect),
            unknown => Err(unknown),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecordHeader {
    /// A [`RecordKind`] value.
    pub kind: u32,
    /// Size of the whole record in bytes, header included.
    pub len: u32,
    /// `CLOCK_BOOTTIME` nanoseconds when the kernel made the record.
    pub boot_time_ns: u64,
}

const _: () = assert!(core::mem::size_of::<RecordHeader>() == 16);

/// Address families as the kernel numbers them (`AF_INET`, `AF_INET6`).
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// IP protocol numbers (`IPPROTO_TCP`, `IPPROTO_UDP`).
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// An MPTCP socket's protocol, as the socket holds it: more than a byte, so sockets'
/// protocols are compared whole (as a byte it reads as TCP's 6). Its packets leave through
/// subflows, TCP sockets of the kernel's own.
pub const IPPROTO_MPTCP: u32 = 262;

/// One outbound connection with the source the kernel chose for it.
///
/// IPv4-mapped IPv6 connections are reported by the kernel side as IPv4 (`family ==
/// AF_INET`): that is the family on the wire, and the policy treats them as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectRecord {
    pub header: RecordHeader,
    /// cgroup v2 id of the task that connected (the inode of its cgroup directory).
    pub cgroup_id: u64,
    /// Cookie of the socket's network namespace; user space maps it to the inode.
    pub netns_cookie: u64,
    /// Source address the kernel chose for the socket (or, for unconnected UDP, the one the
    /// datagram left with), in network byte order; an IPv4 address fills the first 4 bytes.
    pub src_addr: [u8; 16],
    /// Source address the packet carried on the wire, laid out like `src_addr`: the same
    /// unless [`RecordFlags::TRANSLATED`].
    pub wire_src_addr: [u8; 16],
    /// Destination address, laid out like `src_addr`.
    pub dst_addr: [u8; 16],
    /// Thread-group id, the process id users see.
    pub pid: u32,
    pub uid: u32,
    /// Ports in host byte order. `src_port` is the port the kernel chose or the program bound.
    pub src_port: u16,
    pub dst_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    /// Explicit padding so the layout has no hidden holes; always zero.
    pub reserved: [u8; 2],
    /// Command name of the socket owner's thread, NUL-padded.
    pub comm: [u8; 16],
    /// With one of the `DECIDED_*` [`RecordFlags`]: the index in `RULES` of the rule the
    /// kernel's decision names, [`crate::fold::NO_RULE`] when no rule matched.
    pub rule: u32,
    /// [`RecordFlags`] bits.
    pub flags: u32,
    /// The packet's mark as it left (the socket's `SO_MARK`, or what netfilter set), which
    /// `fwmark` policy routing selects on; 0 for a connection refused at `connect()`.
    pub mark: u32,
    /// The generation of the policy that decided (`srcip_common::policy`): `rule` is an
    /// index into that generation's half of `RULES`.
    pub generation: u32,
}

const _: () = assert!(core::mem::size_of::<ConnectRecord>() == 128);

/// `ConnectRecord::flags`.
pub struct RecordFlags;

impl RecordFlags {
    /// This violation opened a folding window in `FOLDS`: user space flushes its repeats
    /// when the window closes.
    pub const FOLD_WINDOW: u32 = 1 << 0;
    /// Address translation on this host (SNAT, MASQUERADE) changed the source between the
    /// socket and the wire: `wire_src_addr` differs from `src_addr`.
    pub const TRANSLATED: u32 = 1 << 1;
    /// The connection matched a `pin` rule and srcip bound it to the rule's source.
    pub const PINNED: u32 = 1 << 2;
    /// The kernel refused the connection or datagram (`block`): it never left.
    pub const REFUSED: u32 = 1 << 3;
    /// With `REFUSED`: the program had bound no source, so `src_addr` is the one the route
    /// module predicted the kernel would choose.
    pub const PREDICTED: u32 = 1 << 4;
    /// With `REFUSED`: stopped at egress, on the source the packet carried (a TCP
    /// `connect()` then fails by timeout), not at `connect()`/`sendmsg()`.
    pub const AT_EGRESS: u32 = 1 << 5;
    /// Why a `pin` rule's connection was not pinned (the same bits in
    /// `SocketOwner::flags`, set at its `connect()` or datagram): its program had chosen a
    /// source itself,
    pub const PIN_BOUND_ADDRESS: u32 = 1 << 6;
    /// its socket's port was bound (a bound socket cannot be bound again),
    pub const PIN_BOUND_PORT: u32 = 1 << 7;
    /// the pin source is not an address of the host in the socket's network namespace,
    pub const PIN_ABSENT: u32 = 1 << 8;
    /// or the rule has no pin source of the destination's family.
    pub const PIN_NO_SOURCE: u32 = 1 << 9;
    pub const PIN_ERRORS: u32 =
        Self::PIN_BOUND_ADDRESS | Self::PIN_BOUND_PORT | Self::PIN_ABSENT | Self::PIN_NO_SOURCE;
    /// What the kernel decided, with `rule`, so that user space does not decide again: the
    /// rule allows the source,
    pub const DECIDED_COMPLIANT: u32 = 1 << 10;
    /// the rule does not (with `NO_RULE`: no rule matched, and the policy reports that),
    pub const DECIDED_VIOLATION: u32 = 1 << 11;
    /// or no rule matched and the policy ignores that (recorded with `--all`). None of the
    /// three: the kernel could not decide (a rule too large for its tables, or more rules at
    /// the destination than it lists), and user space decides with its own matcher. (Bits
    /// of `flags` rather than a field of their own: on 5.10 the egress program has no stack
    /// to spare for one more value, docs/design.md.)
    pub const DECIDED_UNMATCHED: u32 = 1 << 12;
}

/// Indexes of the per-CPU `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum Counter {
    /// Records the kernel could not write because the ring buffer was full.
    LostRecords = 0,
    /// Hook invocations that failed before producing a record (a helper error).
    HookErrors = 1,
    /// TCP connections the kernel decided need no report (compliant, or unmatched and
    /// ignored).
    DecidedInKernelTcp = 2,
    /// Repeated violations counted in a folding window instead of recorded.
    Folded = 3,
    /// UDP flows the kernel decided need no report.
    DecidedInKernelUdp = 4,
    /// TCP connections and new UDP flows the kernel decided, whatever the outcome.
    ObservedTcp = 5,
    ObservedUdp = 6,
    /// `pin` binds that failed (the address is not on the host in the socket's namespace
    /// any more): the connection left with the route's source, and was judged by it.
    PinFailures = 7,
}

/// Number of entries in `COUNTERS`.
pub const COUNTER_COUNT: u32 = 8;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with explicit widths and no padding (size asserted above).
    unsafe impl aya::Pod for super::ConnectRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RecordHeader {}
}
