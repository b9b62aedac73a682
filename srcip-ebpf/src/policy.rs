//! Deciding in the kernel whether user space must see a connection, from the compiled policy
//! (`srcip_common::policy`). Compliant connections, and unmatched ones the policy ignores,
//! need no record: they cost the connecting task a trie lookup and nothing more.

use aya_ebpf::maps::lpm_trie::Key;
use srcip_common::{
    fold::NO_RULE,
    policy::{
        Candidates, KernelRule, MAX_ALLOWED_SOURCES, MAX_CANDIDATES, MAX_PORT_RANGES, PROTOCOL_TCP,
        PROTOCOL_UDP, PolicyState,
    },
    record::{AF_INET, IPPROTO_TCP},
};

use crate::maps::{POLICY_STATE, RULES, V4_DESTINATIONS, V6_DESTINATIONS};

/// Set by the loader; the verifier sees a constant.
#[unsafe(no_mangle)]
static REPORT_ALL: u32 = 0;

/// The connection as the policy sees it; addresses in the record layout.
pub struct Connection<'a> {
    pub family: u8,
    pub protocol: u8,
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
    pub dst_port: u16,
}

/// How a connection reaches user space.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Not at all: the policy finds nothing to report.
    Skip,
    /// With the next poll (`--all` reporting of a connection the policy finds fine).
    Quiet,
    /// At once: a connection the kernel cannot decide.
    Undecided,
    /// At once: a violation of rule `rule` (`NO_RULE`: unmatched, and the policy alerts).
    Violation { rule: u32 },
}

/// What a reload changes besides the tables. The entry always exists (an array's).
pub fn state() -> PolicyState {
    POLICY_STATE.get(0).copied().unwrap_or_default()
}

/// Whether `--all` is on: every connection is recorded.
pub fn reports_all() -> bool {
    // SAFETY: a global set by the loader; volatile keeps the default from being folded in.
    unsafe { core::ptr::read_volatile(&REPORT_ALL) != 0 }
}

pub fn delivery(connection: &Connection) -> Delivery {
    match verdict(connection) {
        Verdict::Violation { rule } => Delivery::Violation { rule },
        Verdict::Undecided => Delivery::Undecided,
        Verdict::Fine if reports_all() => Delivery::Quiet,
        Verdict::Fine => Delivery::Skip,
    }
}

enum Verdict {
    Fine,
    Undecided,
    Violation { rule: u32 },
}

fn verdict(connection: &Connection) -> Verdict {
    let unmatched = if state().report_unmatched != 0 {
        Verdict::Violation { rule: NO_RULE }
    } else {
        Verdict::Fine
    };
    let dst = connection.dst;
    let candidates = if connection.family == AF_INET {
        V4_DESTINATIONS.get(Key::new(32, [dst[0], dst[1], dst[2], dst[3]]))
    } else {
        V6_DESTINATIONS.get(Key::new(128, *dst))
    };
    let Some(candidates) = candidates else {
        return unmatched;
    };
    match first_matching_rule(candidates, connection) {
        Some((_, rule)) if rule.undecidable != 0 => Verdict::Undecided,
        Some((index, rule)) if !allows_source(rule, connection) => {
            Verdict::Violation { rule: index }
        }
        Some(_) => Verdict::Fine,
        None if candidates.truncated != 0 => Verdict::Undecided,
        None => unmatched,
    }
}

/// The first candidate rule whose protocol and ports include the connection, with its index.
fn first_matching_rule<'a>(
    candidates: &Candidates,
    connection: &Connection,
) -> Option<(u32, &'a KernelRule)> {
    let protocol = if connection.protocol == IPPROTO_TCP {
        PROTOCOL_TCP
    } else {
        PROTOCOL_UDP
    };
    for index in 0..MAX_CANDIDATES {
        if index as u32 >= candidates.count {
            break;
        }
        let rule_index = candidates.rules[index];
        let rule = RULES.get(rule_index)?;
        if rule.protocols & protocol != 0 && includes_port(rule, connection.dst_port) {
            return Some((rule_index, rule));
        }
    }
    None
}

fn includes_port(rule: &KernelRule, port: u16) -> bool {
    if rule.port_range_count == 0 {
        return true;
    }
    for index in 0..MAX_PORT_RANGES {
        if index as u32 >= rule.port_range_count {
            break;
        }
        let range = &rule.port_ranges[index];
        if range.first <= port && port <= range.last {
            return true;
        }
    }
    false
}

fn allows_source(rule: &KernelRule, connection: &Connection) -> bool {
    for index in 0..MAX_ALLOWED_SOURCES {
        if index as u32 >= rule.source_count {
            break;
        }
        let allowed = &rule.sources[index];
        if allowed.family != u32::from(connection.family) {
            continue;
        }
        let mut inside = true;
        for byte in 0..16 {
            if connection.src[byte] & allowed.mask[byte] != allowed.addr[byte] {
                inside = false;
            }
        }
        if inside {
            return true;
        }
    }
    false
}
