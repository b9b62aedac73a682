//! Deciding in the kernel whether user space must see a connection, from the compiled policy
//! (`srcip_common::policy`). Compliant connections, and unmatched ones the policy ignores,
//! need no record (unless pinned, which is reported): they cost the connecting task a trie
//! lookup and nothing more.

use aya_ebpf::maps::lpm_trie::Key;
use srcip_common::{
    fold::NO_RULE,
    policy::{
        ACTION_ALERT, ACTION_PIN, Candidates, KernelRule, MAX_ALLOWED_SOURCES, MAX_CANDIDATES,
        MAX_PORT_RANGES, PROTOCOL_TCP, PROTOCOL_UDP, PolicyState,
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
    /// The packet's mark at egress; 0 where no packet exists yet (`connect()`).
    pub mark: u32,
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
    /// With the next poll: a connection srcip pinned to its `pin` rule's source.
    Pinned,
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

/// `pinned`: srcip bound the connection's socket to a `pin` rule's source.
pub fn delivery(connection: &Connection, pinned: bool) -> Delivery {
    match verdict(connection) {
        Verdict::Violation { rule } => Delivery::Violation { rule },
        Verdict::Undecided => Delivery::Undecided,
        Verdict::Fine { action } if pinned && action == ACTION_PIN => Delivery::Pinned,
        Verdict::Fine { .. } if reports_all() => Delivery::Quiet,
        Verdict::Fine { .. } => Delivery::Skip,
    }
}

enum Verdict {
    /// Compliant with a rule of `action`, or unmatched and ignored (`ACTION_ALERT`).
    Fine {
        action: u32,
    },
    Undecided,
    Violation {
        rule: u32,
    },
}

fn verdict(connection: &Connection) -> Verdict {
    let unmatched = if state().report_unmatched != 0 {
        Verdict::Violation { rule: NO_RULE }
    } else {
        Verdict::Fine {
            action: ACTION_ALERT,
        }
    };
    match lookup(connection) {
        Lookup::Rule(_, rule) if rule.undecidable != 0 => Verdict::Undecided,
        Lookup::Rule(index, rule) if !allows_source(rule, connection.family, connection.src) => {
            Verdict::Violation { rule: index }
        }
        Lookup::Rule(_, rule) => Verdict::Fine {
            action: rule.action,
        },
        Lookup::Truncated => Verdict::Undecided,
        Lookup::Unmatched => unmatched,
    }
}

enum Lookup {
    /// The rule with this index in `RULES` applies.
    Rule(u32, &'static KernelRule),
    /// No listed candidate applies, but more rules apply at the prefix than were listed.
    Truncated,
    Unmatched,
}

fn lookup(connection: &Connection) -> Lookup {
    let dst = connection.dst;
    let candidates = if connection.family == AF_INET {
        V4_DESTINATIONS.get(Key::new(32, [dst[0], dst[1], dst[2], dst[3]]))
    } else {
        V6_DESTINATIONS.get(Key::new(128, *dst))
    };
    let Some(candidates) = candidates else {
        return Lookup::Unmatched;
    };
    match first_matching_rule(candidates, connection) {
        Some((index, rule)) => Lookup::Rule(index, rule),
        None if candidates.truncated != 0 => Lookup::Truncated,
        None => Lookup::Unmatched,
    }
}

/// The rule that applies to `connection` when it pins or blocks, with its index. (The
/// connection's `src` is not read.)
pub fn enforcing_rule(connection: &Connection) -> Option<(u32, &'static KernelRule)> {
    match lookup(connection) {
        Lookup::Rule(index, rule) if rule.action != ACTION_ALERT && rule.undecidable == 0 => {
            Some((index, rule))
        }
        _ => None,
    }
}
/// The first candidate rule whose protocol and ports include the connection, with its index.
fn first_matching_rule(
    candidates: &Candidates,
    connection: &Connection,
) -> Option<(u32, &'static KernelRule)> {
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

/// Whether `rule` allows `src`, an address of `family` in the record layout.
pub fn allows_source(rule: &KernelRule, family: u8, src: &[u8; 16]) -> bool {
    for index in 0..MAX_ALLOWED_SOURCES {
        if index as u32 >= rule.source_count {
            break;
        }
        let allowed = &rule.sources[index];
        if allowed.family != u32::from(family) {
            continue;
        }
        let mut inside = true;
        for byte in 0..16 {
            if src[byte] & allowed.mask[byte] != allowed.addr[byte] {
                inside = false;
            }
        }
        if inside {
            return true;
        }
    }
    false
}
