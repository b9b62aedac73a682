//! The policy compiled for the kernel, so that the kernel can let compliant connections (and
//! unmatched ones the policy ignores) pass without a record and without waking user space.
//!
//! Layout: an LPM trie per family maps each destination prefix named in the policy to its
//! [`Candidates`], the ordered rules that could apply there (user space has already put the
//! longest prefix first and, at one prefix, rules with ports before rules without). The
//! first candidate whose protocol and ports include the connection decides. Rules are
//! entries of the `RULES` array. Addresses use the record layout: 16 bytes, network order,
//! IPv4 in the first 4.
//!
//! A reload changes the policy while programs run, and no connection may see half of it,
//! nor may a reload that fails half-way leave half of one: everything is written twice.
//! A policy of an even [`PolicyState::generation`] lives in the even tries and the first
//! half of `RULES`, one of an odd generation in the odd tries and the second half. A reload
//! empties the pair not in use, writes the new policy there, and last writes
//! [`PolicyState`] with the next generation, which is the one write that puts it in force.
//! A reload that fails before that leaves the kernel wholly on the policy in force.
//!
//! Whatever does not fit these fixed sizes is never decided in the kernel: such a rule is
//! marked `undecidable`, a prefix with too many candidates `truncated`, and the kernel then
//! reports the connection for user space to decide.

/// Rules that may apply to one destination prefix.
pub const MAX_CANDIDATES: usize = 8;
pub const MAX_PORT_RANGES: usize = 8;
pub const MAX_ALLOWED_SOURCES: usize = 8;

/// `KernelRule::protocols` bits.
pub const PROTOCOL_TCP: u32 = 1 << 0;
pub const PROTOCOL_UDP: u32 = 1 << 1;

/// `KernelRule::action`: what the kernel does at `connect()` besides reporting.
pub const ACTION_ALERT: u32 = 0;
/// Refuse a connection whose source (bound, or predicted, see `PREDICTED_SOURCES`) the rule
/// does not allow.
pub const ACTION_BLOCK: u32 = 1;
/// Bind a socket that has no source yet to the rule's pin source of its family.
pub const ACTION_PIN: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    pub count: u32,
    /// Non-zero: more rules apply here than fit; a connection none of the listed rules
    /// matches is reported rather than decided.
    pub truncated: u32,
    /// Indexes into `RULES`, in priority order.
    pub rules: [u32; MAX_CANDIDATES],
}

const _: () = assert!(core::mem::size_of::<Candidates>() == 40);

/// Inclusive, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A source is allowed when `family` matches and `source & mask == addr`, byte by byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourcePrefix {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    pub addr: [u8; 16],
    pub mask: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<SourcePrefix>() == 36);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelRule {
    /// `PROTOCOL_*` bits.
    pub protocols: u32,
    /// Non-zero: the rule does not fit these sizes; report what it matches.
    pub undecidable: u32,
    /// Zero: every port.
    pub port_range_count: u32,
    pub source_count: u32,
    pub port_ranges: [PortRange; MAX_PORT_RANGES],
    pub sources: [SourcePrefix; MAX_ALLOWED_SOURCES],
    /// `ACTION_*`. An enforcing rule is never `undecidable` (user space refuses such a
    /// policy).
    pub action: u32,
    /// The addresses `ACTION_PIN` binds to, network order; all zero: none of that family.
    pub pin_v4: [u8; 4],
    pub pin_v6: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<KernelRule>() == 16 + 32 + 36 * 8 + 24);

/// The single entry of `POLICY_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Non-zero: connections no rule matches are reported (`unmatched = "alert"`).
    pub report_unmatched: u32,
    /// Counts reloads. Flows decided under an earlier generation are decided again (UDP
    /// flows are remembered per generation).
    pub generation: u32,
    /// Non-zero when some rule pins or blocks: only then does `connect()` look the
    /// destination up, so that an auditing-only policy costs the connect path nothing.
    pub enforcing: u32,
}

/// The source the kernel would choose for a destination prefix of a blocking rule, as the
/// route module predicts it (user space rewrites it on every routing change): what `block`
/// judges a socket by when its program never bound one. Kept in one LPM trie per family,
/// `PREDICTED_V4_SOURCES` and `PREDICTED_V6_SOURCES`, keyed like the destination tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PredictedSource {
    /// Record layout: network order, IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// The network namespace whose routing tables were read (srcip's own): a socket of
    /// another namespace has other routes, and is not judged by this prediction.
    pub netns_cookie: u64,
}

const _: () = assert!(core::mem::size_of::<PredictedSource>() == 24);

/// A pin source of the policy, the key of `PRESENT_PIN_SOURCES`, whose value is the cookie
/// of the network namespace user space saw it in (srcip's own). A datagram's source is set
/// to a pin source only when it is there: the kernel fails a datagram from an address the
/// host does not have, where a failed bind at `connect()` only leaves the route's choice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PinSource {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Record layout.
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<PinSource>() == 20);

/// Rules (and prefixes per family) a policy map has room for when the policy had `count` at
/// start: a reload may grow the policy by a quarter, or 256, before srcip must restart. The
/// `RULES` array holds two halves of this size, and each destination trie this many prefixes.
pub const fn reload_room(count: usize) -> usize {
    count + count / 4 + 256
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with explicit widths and no padding.
    unsafe impl aya::Pod for super::PolicyState {}
    // SAFETY: plain-old-data with explicit widths and no padding (sizes asserted above).
    unsafe impl aya::Pod for super::Candidates {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PredictedSource {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PinSource {}
}
