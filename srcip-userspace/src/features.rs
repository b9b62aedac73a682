//! What the kernel must offer srcip, probed before anything is loaded.
//!
//! Each requirement is probed the way `bpftool feature probe` does, by asking the kernel to
//! create a tiny map or load a tiny program (aya's `is_*_supported`), so that a kernel that
//! lacks a feature gets one short line per missing feature (what, since which Linux, what to
//! do) instead of a verifier dump. The README's feature table is this list.
//!
//! Every kernel of the test matrix (Debian's 5.10, 6.1, 6.12 and the host's) has all of
//! them, so srcip has one set of programs. One feature is optional: finding an MPTCP
//! subflow's socket (Linux 5.19), which 5.10 lacks; `started.degraded` says so there.

use std::os::fd::FromRawFd as _;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use crate::system::HandledSignalsDeferred;

/// A feature srcip cannot audit without.
pub struct Requirement {
    /// A short name, for `SRCIP_TEST_MISSING_FEATURE`.
    pub id: &'static str,
    /// What the kernel must have.
    pub feature: &'static str,
    /// The first Linux release that has it.
    pub since: &'static str,
    /// What srcip does with it.
    pub used_for: &'static str,
    probe: Probe,
}

enum Probe {
    Map(MapType),
    Program(ProgramType),
    Helper(ProgramType, BpfHelper),
}

const ANCESTOR_CGROUP: BpfHelper = BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id;
const NETNS_COOKIE: BpfHelper = BpfHelper::BPF_FUNC_get_netns_cookie;
const SK_STORAGE_GET: BpfHelper = BpfHelper::BPF_FUNC_sk_storage_get;
const SK_FULLSOCK: BpfHelper = BpfHelper::BPF_FUNC_sk_fullsock;
const READ_KERNEL_STRING: BpfHelper = BpfHelper::BPF_FUNC_probe_read_kernel_str;

/// In the order a reader would fix them: program types, maps, then helpers per hook.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        id: "cgroup-sock",
        feature: "cgroup sock_create programs",
        since: "4.10",
        used_for: "recording who owns each socket",
        probe: Probe::Program(ProgramType::CgroupSock),
    },
    Requirement {
        id: "cgroup-sock-addr",
        feature: "cgroup connect4/connect6 programs",
        since: "4.17",
        used_for: "recording who owns sockets created before srcip started",
        probe: Probe::Program(ProgramType::CgroupSockAddr),
    },
    Requirement {
        id: "cgroup-skb",
        feature: "cgroup_skb programs",
        since: "4.10",
        used_for: "seeing the source address TCP connections and UDP datagrams leave with",
        probe: Probe::Program(ProgramType::CgroupSkb),
    },
    Requirement {
        id: "tracepoint",
        feature: "tracepoint programs",
        since: "4.7",
        used_for: "--cgroup: auditing a restarted unit's new cgroup from its first socket",
        probe: Probe::Program(ProgramType::TracePoint),
    },
    Requirement {
        id: "ring-buffer",
        feature: "BPF ring buffer maps",
        since: "5.8",
        used_for: "passing connection records from the kernel to srcip",
        probe: Probe::Map(MapType::RingBuf),
    },
    Requirement {
        id: "socket-storage",
        feature: "socket-local storage maps",
        since: "5.2",
        used_for: "keeping each socket's owner with the socket",
        probe: Probe::Map(MapType::SkStorage),
    },
    Requirement {
        id: "lru-hash",
        feature: "LRU hash maps",
        since: "4.10",
        used_for: "reporting each UDP flow once",
        probe: Probe::Map(MapType::LruHash),
    },
    Requirement {
        id: "lpm-trie",
        feature: "longest-prefix-match trie maps",
        since: "4.11",
        used_for: "deciding compliant connections in the kernel",
        probe: Probe::Map(MapType::LpmTrie),
    },
    Requirement {
        id: "sock-create-storage",
        feature: "bpf_sk_storage_get in cgroup sock_create programs",
        since: "5.9",
        used_for: "recording who owns each socket",
        probe: Probe::Helper(ProgramType::CgroupSock, SK_STORAGE_GET),
    },
    Requirement {
        id: "sock-create-netns",
        feature: "bpf_get_netns_cookie in cgroup sock_create programs",
        since: "5.7",
        used_for: "the `netns` field",
        probe: Probe::Helper(ProgramType::CgroupSock, NETNS_COOKIE),
    },
    Requirement {
        id: "sock-create-ancestor",
        feature: "bpf_get_current_ancestor_cgroup_id in cgroup sock_create programs",
        since: "5.7",
        used_for: "--cgroup (auditing a cgroup and its descendants)",
        probe: Probe::Helper(ProgramType::CgroupSock, ANCESTOR_CGROUP),
    },
    Requirement {
        id: "tracepoint-string",
        feature: "bpf_probe_read_kernel_str in tracepoint programs",
        since: "5.5",
        used_for: "--cgroup: recognising a restarted unit's new cgroup by its path",
        probe: Probe::Helper(ProgramType::TracePoint, READ_KERNEL_STRING),
    },
    Requirement {
        id: "egress-fullsock",
        feature: "bpf_sk_fullsock in cgroup_skb programs",
        since: "5.1",
        used_for: "finding the socket of a packet, and whether it is a TCP SYN",
        probe: Probe::Helper(ProgramType::CgroupSkb, SK_FULLSOCK),
    },
    Requirement {
        id: "egress-storage",
        feature: "bpf_sk_storage_get in cgroup_skb programs",
        since: "5.2",
        used_for: "attributing each connection and datagram to its socket's owner",
        probe: Probe::Helper(ProgramType::CgroupSkb, SK_STORAGE_GET),
    },
];

/// `SRCIP_TEST_MISSING_FEATURE` for [`finds_mptcp_sockets`].
pub const MPTCP_SOCKETS: &str = "mptcp-subflows";

/// What srcip loses where the kernel has MPTCP and [`finds_mptcp_sockets`] is false, for
/// `started.degraded`.
pub const WITHOUT_MPTCP_SOCKETS: &str = "mptcp: this kernel (before 5.19) has no bpf_skc_to_mptcp_sock, so srcip cannot tell which MPTCP socket a subflow belongs to; the subflows the kernel adds after the first are attributed to the task that opened them (a kernel worker), and under --cgroup they are not audited";

/// Whether the kernel has `bpf_skc_to_mptcp_sock` (Linux 5.19), with which srcip gives each
/// MPTCP subflow its socket's owner. Optional: without it srcip audits on, and says what it
/// loses ([`WITHOUT_MPTCP_SOCKETS`]). Probed in a cgroup_skb program, which needs no attach
/// type: the kernels that have the helper offer it to every socket program srcip loads (it
/// is one of the socket helpers every such program type may call).
/// Probed once: `run` says what it loses, the loader sets the programs' constant.
pub fn finds_mptcp_sockets() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        // A signal during the probe's load makes aya take the helper as present (a SIGHUP
        // during start once made srcip load MPTCP's helper on 5.10, which refused it).
        let _deferred = HandledSignalsDeferred::new();
        std::env::var("SRCIP_TEST_MISSING_FEATURE").as_deref() != Ok(MPTCP_SOCKETS)
            && is_helper_supported(
                ProgramType::CgroupSkb,
                BpfHelper::BPF_FUNC_skc_to_mptcp_sock,
            )
            .unwrap_or(false)
    })
}

/// Whether programs here can make MPTCP sockets (built in, and `net.mptcp.enabled` in
/// srcip's network namespace): where they cannot, not finding an MPTCP socket loses nothing.
pub fn has_mptcp() -> bool {
    // SAFETY: a plain socket(2) call; the descriptor, when there is one, is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is the descriptor just made, and nothing else owns it.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    true
}

/// Features the kernel lacks, one line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", lines.join("\n"))]
pub struct MissingFeatures {
    lines: Vec<String>,
}

/// Probes every requirement. `SRCIP_TEST_MISSING_FEATURE=ID` makes the probe of `ID` fail,
/// so that tests can see, on any kernel, what a user of an older one sees.
pub fn check(kernel_release: &str) -> Result<(), MissingFeatures> {
    // The probes load programs, which a signal would interrupt.
    let _deferred = HandledSignalsDeferred::new();
    let pretend_missing = std::env::var("SRCIP_TEST_MISSING_FEATURE").ok();
    let lines: Vec<String> = REQUIREMENTS
        .iter()
        .filter(|requirement| {
            pretend_missing.as_deref() == Some(requirement.id) || !requirement.is_met()
        })
        .map(|requirement| requirement.missing_line(kernel_release))
        .collect();
    if lines.is_empty() {
        Ok(())
    } else {
        Err(MissingFeatures { lines })
    }
}

impl Requirement {
    fn is_met(&self) -> bool {
        // A probe that cannot even run (a syscall failure other than "unsupported") is not
        // held against the kernel: loading will then tell what is wrong.
        match self.probe {
            Probe::Map(map) => is_map_supported(map).unwrap_or(true),
            Probe::Program(program) => is_program_supported(program).unwrap_or(true),
            Probe::Helper(program, helper) => is_helper_supported(program, helper).unwrap_or(true),
        }
    }

    fn missing_line(&self, kernel_release: &str) -> String {
        format!(
            "this kernel ({kernel_release}) lacks {}, which srcip needs for {}: run srcip on Linux {} or later",
            self.feature, self.used_for, self.since
        )
    }
}

/// The line of a verifier log that says why a program was refused, to show instead of the
/// whole log: the missing helper when that is the cause, else the last line before the
/// verifier's statistics.
pub fn verifier_refusal(log: &str) -> &str {
    let lines = || log.lines().map(str::trim).filter(|line| !line.is_empty());
    lines()
        .find(|line| {
            line.contains("unknown func")
                || line.contains("cannot use helper")
                || line.contains("invalid func")
        })
        .or_else(|| {
            lines().rfind(|line| {
                !["processed ", "verification time", "stack depth"]
                    .iter()
                    .any(|statistics| line.starts_with(statistics))
            })
        })
        .unwrap_or("the verifier gave no reason")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusing_line_is_found_in_a_verifier_log() {
        let log = "0: (b7) r1 = 0\n1: (85) call bpf_get_current_pid_tgid#14\nunknown func bpf_get_current_pid_tgid#14\nprocessed 2 insns";
        assert_eq!(
            verifier_refusal(log),
            "unknown func bpf_get_current_pid_tgid#14"
        );
        let log = "0: (61) r2 = *(u32 *)(r1 +0)\nR1 invalid mem access 'scalar'\nprocessed 1 insns (limit 1000000)\n";
        assert_eq!(verifier_refusal(log), "R1 invalid mem access 'scalar'");
    }

    #[test]
    fn requirement_ids_are_unique() {
        let mut ids: Vec<_> = REQUIREMENTS.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), REQUIREMENTS.len());
    }
}
