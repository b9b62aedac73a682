//! What crosses the kernel/user boundary: ring-buffer records, map names, map values.
//!
//! Every type here is `#[repr(C)]` with explicit field widths and no implicit padding, so
//! the kernel and user space agree byte for byte. A compile-time guard next to each type
//! fails the build if its size ever changes by accident.
#![no_std]

pub mod fold;
pub mod owner;
pub mod policy;
pub mod record;
pub mod scope;
pub mod udp;

/// Names of the maps and globals in the eBPF object, shared so that a rename breaks the
/// build instead of failing at load time.
pub mod names {
    /// Ring buffer of [`crate::record`] records, kernel → user space.
    pub const EVENTS: &str = "EVENTS";
    /// Global: unread bytes in `EVENTS` above which every record wakes the reader.
    pub const EVENTS_WAKEUP_BYTES: &str = "EVENTS_WAKEUP_BYTES";
    /// Per-CPU `u64` counters indexed by [`crate::record::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Hash of audited cgroup ids, see [`crate::scope`].
    pub const AUDITED_CGROUPS: &str = "AUDITED_CGROUPS";
    /// Hash of `scope::CgroupPath` → unused byte: the audited cgroups' paths, whose new
    /// instances the cgroup tracepoint programs add to `AUDITED_CGROUPS`.
    pub const AUDITED_CGROUP_PATHS: &str = "AUDITED_CGROUP_PATHS";
    /// The `cgroup:cgroup_mkdir` and `cgroup:cgroup_rmdir` tracepoint programs.
    pub const CGROUP_MKDIR_PROGRAM: &str = "srcip_cgroup_mkdir";
    pub const CGROUP_RMDIR_PROGRAM: &str = "srcip_cgroup_rmdir";
    /// Global bit mask of the cgroup levels present in `AUDITED_CGROUPS`.
    pub const AUDITED_CGROUP_LEVELS: &str = "AUDITED_CGROUP_LEVELS";
    /// LPM tries of destination prefixes → `policy::Candidates`, one per family for the
    /// policies of even generations and one for odd ones: a reload writes the pair not in
    /// use.
    pub const V4_DESTINATIONS_EVEN: &str = "V4_DESTINATIONS_EVEN";
    pub const V4_DESTINATIONS_ODD: &str = "V4_DESTINATIONS_ODD";
    pub const V6_DESTINATIONS_EVEN: &str = "V6_DESTINATIONS_EVEN";
    pub const V6_DESTINATIONS_ODD: &str = "V6_DESTINATIONS_ODD";
    /// Array of `policy::KernelRule`, in two halves: a reload writes the half not in use.
    pub const RULES: &str = "RULES";
    /// One `policy::PolicyState`: what a reload changes besides the tables.
    pub const POLICY_STATE: &str = "POLICY_STATE";
    /// LPM tries of blocking rules' destination prefixes → `policy::PredictedSource`.
    pub const PREDICTED_V4_SOURCES: &str = "PREDICTED_V4_SOURCES";
    pub const PREDICTED_V6_SOURCES: &str = "PREDICTED_V6_SOURCES";
    /// Hash of `policy::PinSource` → network namespace cookie: pin sources the host has.
    pub const PRESENT_PIN_SOURCES: &str = "PRESENT_PIN_SOURCES";
    /// Global: non-zero reports every connection (`run --all`).
    pub const REPORT_ALL: &str = "REPORT_ALL";
    /// Global: srcip's own process id; its sockets are recorded but never audited.
    pub const DAEMON_TGID: &str = "DAEMON_TGID";
    /// Hash of `fold::FoldKey` → `fold::FoldState`: violation windows being folded.
    pub const FOLDS: &str = "FOLDS";
    /// Global: the folding window in nanoseconds; zero folds nothing.
    pub const FOLD_WINDOW_NS: &str = "FOLD_WINDOW_NS";
    /// Global: non-zero audits srcip's own sockets too.
    pub const AUDIT_DAEMON: &str = "AUDIT_DAEMON";
    pub const FINDS_MPTCP_SOCKETS: &str = "FINDS_MPTCP_SOCKETS";
    /// Socket-local storage of `owner::UdpOwner`.
    pub const SOCKET_OWNERS: &str = "SOCKET_OWNERS";
    /// The `cgroup/sock_create` program that records a socket's owner.
    pub const SOCK_CREATE_PROGRAM: &str = "srcip_sock_create";
    /// The `cgroup/connect4` and `connect6` programs that adopt sockets created before srcip,
    /// and pin or block.
    pub const CONNECT4_PROGRAM: &str = "srcip_connect4";
    pub const CONNECT6_PROGRAM: &str = "srcip_connect6";
    /// The `cgroup/sendmsg4` and `sendmsg6` programs that pin and block unconnected UDP
    /// datagrams; attached only while needed (the policy pins UDP, the audit is scoped, or
    /// UDP blocking is kept with `--keep-enforcing`).
    pub const SENDMSG4_PROGRAM: &str = "srcip_sendmsg4";
    pub const SENDMSG6_PROGRAM: &str = "srcip_sendmsg6";
    /// The `cgroup_skb/egress` program that records the source TCP SYNs and UDP datagrams
    /// leave with.
    pub const EGRESS_PROGRAM: &str = "srcip_egress";
}
