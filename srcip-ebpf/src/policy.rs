//! Deciding in the kernel whether user space must see a connection, from the compiled policy
//! (`srcip_common::policy`). Compliant connections, and unmatched ones the policy ignores,
//! need no record (unless pinned, which is reported): they cost the connecting task a trie
//! lookup and nothing more.
//!
//! The two loops over the policy, finding the rule (candidates, and each one's port ranges)
//! and testing the source against it (allowed sources, byte by byte), are global functions:
//! the verifier checks a global function once, on its own, for any arguments, where it
//! checks a static one (or inlined code) again on every path that reaches it. Those paths
//! are many in every hook (socket families, owner tables, pin and block), and walking the
//! loops on each made up most of what the verifier walked: about 19 s of every start on
//! 5.10 under the kernel matrix's emulation, 2 s with them global (docs/design.md). Before
//! 5.12 a global function takes only scalars (and the context), so the connection crosses
//! as words.

use aya_ebpf::maps::lpm_trie::Key;
use srcip_common::{
    fold::NO_RULE,
    policy::{
        ACTION_ALERT, ACTION_BLOCK, ACTION_PIN, Candidates, KernelRule, MAX_ALLOWED_SOURCES,
        MAX_CANDIDATES, MAX_PORT_RANGES, PROTOCOL_TCP, PROTOCOL_UDP, PolicyState,
    },
    record::{AF_INET, IPPROTO_TCP, RecordFlags},
};

use crate::maps::{
    POLICY_STATE, RULES, V4_DESTINATIONS_EVEN, V4_DESTINATIONS_ODD, V6_DESTINATIONS_EVEN,
    V6_DESTINATIONS_ODD,
};

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

/// How a connection reaches user space, with the index in `RULES` of the rule the kernel's
/// decision names (`NO_RULE`: none matched). Kept to a word and a tag: 5.10's verifier counts
/// the egress program's frames at their largest, and has 512 bytes for all of them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Not at all: the policy finds nothing to report.
    Skip,
    /// With the next poll (`--all` reporting of a connection the policy finds fine).
    Quiet { rule: u32 },
    /// At once: a connection the kernel cannot decide.
    Undecided,
    /// At once: a violation of rule `rule` (`NO_RULE`: unmatched, and the policy alerts).
    Violation { rule: u32 },
    /// With the next poll: a connection srcip pinned to its `pin` rule's source.
    Pinned { rule: u32 },
}

impl Delivery {
    /// The `RecordFlags::DECIDED_*` bit the record carries; none when undecided.
    pub fn decided_flag(self) -> u32 {
        match self {
            Self::Violation { .. } => RecordFlags::DECIDED_VIOLATION,
            Self::Quiet { rule: NO_RULE } => RecordFlags::DECIDED_UNMATCHED,
            Self::Quiet { .. } | Self::Pinned { .. } => RecordFlags::DECIDED_COMPLIANT,
            Self::Skip | Self::Undecided => 0,
        }
    }
}

/// The generation of the policy in force, read in place. A record made just as a reload
/// put a new policy in force may carry the new generation with a rule of the old: the rule's
/// index then lies in the other half of `RULES`, and user space decides that record itself.
pub fn generation() -> u32 {
    match POLICY_STATE.get_ptr(0) {
        // SAFETY: an array's entry, valid for the program's run.
        Some(state) => unsafe { (*state).generation },
        None => 0,
    }
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
#[inline(always)]
pub fn delivery(connection: &Connection, pinned: bool) -> Delivery {
    match verdict(connection) {
        Verdict::Violation { rule } => Delivery::Violation { rule },
        Verdict::Undecided => Delivery::Undecided,
        Verdict::Fine { action, rule } if pinned && action == ACTION_PIN => {
            Delivery::Pinned { rule }
        }
        Verdict::Fine { rule, .. } if reports_all() => Delivery::Quiet { rule },
        Verdict::Fine { .. } => Delivery::Skip,
    }
}

enum Verdict {
    /// Compliant with rule `rule` of `action`, or unmatched (`NO_RULE`) and ignored
    /// (`ACTION_ALERT`).
    Fine {
        action: u32,
        rule: u32,
    },
    Undecided,
    Violation {
        rule: u32,
    },
}

#[inline(always)]
fn verdict(connection: &Connection) -> Verdict {
    let unmatched = if state().report_unmatched != 0 {
        Verdict::Violation { rule: NO_RULE }
    } else {
        Verdict::Fine {
            action: ACTION_ALERT,
            rule: NO_RULE,
        }
    };
    match lookup(connection) {
        Lookup::Rule(_, rule) if rule.undecidable != 0 => Verdict::Undecided,
        Lookup::Rule(index, _) if !allows_source(index, connection.family, connection.src) => {
            Verdict::Violation { rule: index }
        }
        Lookup::Rule(index, rule) => Verdict::Fine {
            action: rule.action,
            rule: index,
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
    let (dst_high, dst_low) = address_words(connection.dst);
    let found = srcip_policy_rule(
        u64::from(connection.family),
        u64::from(connection.protocol),
        u64::from(connection.dst_port),
        dst_high,
        dst_low,
    );
    match found {
        FOUND_TRUNCATED => Lookup::Truncated,
        FOUND_NONE => Lookup::Unmatched,
        // The index the function read from the candidates, so `RULES` has it.
        index => match RULES.get(index as u32) {
            Some(rule) => Lookup::Rule(index as u32, rule),
            None => Lookup::Unmatched,
        },
    }
}

/// What [`srcip_policy_rule`] returns besides a rule's index (which is below 2³²).
const FOUND_NONE: u64 = u64::MAX;
const FOUND_TRUNCATED: u64 = u64::MAX - 1;

/// The index in `RULES` of the rule that applies to a connection of `family` and
/// `protocol` to `dst_port` at the address whose record-layout words are `dst_high` and
/// `dst_low`; `FOUND_TRUNCATED` when none of the listed candidates does but more rules
/// apply there than were listed, else `FOUND_NONE`. A global function: see the module's
/// comment.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn srcip_policy_rule(
    family: u64,
    protocol: u64,
    dst_port: u64,
    dst_high: u64,
    dst_low: u64,
) -> u64 {
    let dst = address_from_words(dst_high, dst_low);
    // The tries of the policy in force (see `srcip_common::policy`).
    let odd = state().generation % 2 != 0;
    let candidates = if family == u64::from(AF_INET) {
        let key = Key::new(32, [dst[0], dst[1], dst[2], dst[3]]);
        if odd {
            V4_DESTINATIONS_ODD.get(key)
        } else {
            V4_DESTINATIONS_EVEN.get(key)
        }
    } else {
        let key = Key::new(128, dst);
        if odd {
            V6_DESTINATIONS_ODD.get(key)
        } else {
            V6_DESTINATIONS_EVEN.get(key)
        }
    };
    let Some(candidates) = candidates else {
        return FOUND_NONE;
    };
    match first_matching_rule(candidates, protocol as u8, dst_port as u16) {
        Some(index) => u64::from(index),
        None if candidates.truncated != 0 => FOUND_TRUNCATED,
        None => FOUND_NONE,
    }
}

/// Whether the rule with `rule_index` (`NO_RULE`: none) blocks what violates it.
pub fn blocks(rule_index: u32) -> bool {
    rule_index != NO_RULE
        && RULES
            .get(rule_index)
            .is_some_and(|rule| rule.action == ACTION_BLOCK)
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

/// The index of the first candidate rule whose protocol and ports include the connection.
fn first_matching_rule(candidates: &Candidates, protocol: u8, dst_port: u16) -> Option<u32> {
    let protocol = if protocol == IPPROTO_TCP {
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
        if rule.protocols & protocol != 0 && includes_port(rule, dst_port) {
            return Some(rule_index);
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

/// Whether the rule with `rule_index` in `RULES` allows `src`, an address of `family` in
/// the record layout.
pub fn allows_source(rule_index: u32, family: u8, src: &[u8; 16]) -> bool {
    let (src_high, src_low) = address_words(src);
    srcip_policy_allows(u64::from(rule_index), u64::from(family), src_high, src_low) != 0
}

/// 1 when the rule with `rule_index` allows the source of `family` whose record-layout
/// words are `src_high` and `src_low`, else 0. A global function: see the module's comment.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn srcip_policy_allows(
    rule_index: u64,
    family: u64,
    src_high: u64,
    src_low: u64,
) -> u64 {
    let Some(rule) = RULES.get(rule_index as u32) else {
        return 0;
    };
    let src = address_from_words(src_high, src_low);
    for index in 0..MAX_ALLOWED_SOURCES {
        if index as u32 >= rule.source_count {
            break;
        }
        let allowed = &rule.sources[index];
        if u64::from(allowed.family) != family {
            continue;
        }
        let mut inside = true;
        for byte in 0..16 {
            if src[byte] & allowed.mask[byte] != allowed.addr[byte] {
                inside = false;
            }
        }
        if inside {
            return 1;
        }
    }
    0
}

/// An address in the record layout as two words, its first 8 bytes and its last, for a
/// global function's arguments.
fn address_words(address: &[u8; 16]) -> (u64, u64) {
    let mut high = [0; 8];
    let mut low = [0; 8];
    high.copy_from_slice(&address[..8]);
    low.copy_from_slice(&address[8..]);
    (u64::from_ne_bytes(high), u64::from_ne_bytes(low))
}

/// The address [`address_words`] made the words of.
fn address_from_words(high: u64, low: u64) -> [u8; 16] {
    let mut address = [0; 16];
    address[..8].copy_from_slice(&high.to_ne_bytes());
    address[8..].copy_from_slice(&low.to_ne_bytes());
    address
}
