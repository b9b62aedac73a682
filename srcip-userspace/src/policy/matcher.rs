//! Deciding a connection: which rule it matches, and whether its source is allowed.
//!
//! A connection matches the rule whose destination prefix is the longest match and whose
//! ports and protocol include it; at the same prefix a rule with ports comes before one
//! without. The tables are compiled once: for every prefix named in the policy, the ordered
//! list of every rule that could apply (its own rules, then those of each shorter covering
//! prefix). A lookup is then one longest-prefix match and a scan of a short list.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::{Prefix, PrefixMap};
use srcip_common::policy::MAX_CANDIDATES;

use super::{
    Action, Destination, KernelTables, Location, Policy, PolicyError, PolicyLoadError, Protocol,
    Rule, Unmatched, kernel,
};

/// What the policy says about one connection.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'a> {
    Compliant(&'a Rule),
    /// The destination matches the rule, and the source is not among its allowed sources.
    Violation(&'a Rule),
    /// No rule matches, and the policy says `unmatched = "alert"`.
    UnmatchedViolation,
    /// No rule matches, and the policy ignores such connections.
    Unmatched,
}

/// One connection as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionKey {
    pub protocol: Protocol,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dst_port: u16,
}

pub struct Matcher {
    /// Shared with the drift watch, which predicts the same rules.
    policy: Arc<Policy>,
    v4: PrefixMap<Ipv4Net, Vec<usize>>,
    v6: PrefixMap<Ipv6Net, Vec<usize>>,
}

impl Matcher {
    /// Compiles a policy whose host names have been resolved (`resolve_hosts`); host names
    /// left in it match nothing.
    pub fn new(policy: Policy) -> Result<Self, PolicyLoadError> {
        let errors = equal_priority_conflicts(&policy.rules);
        if !errors.is_empty() {
            return Err(PolicyLoadError::Invalid {
                path: policy.path,
                errors,
            });
        }
        let mut v4_direct: PrefixMap<Ipv4Net, Vec<usize>> = PrefixMap::new();
        let mut v6_direct: PrefixMap<Ipv6Net, Vec<usize>> = PrefixMap::new();
        for (index, rule) in policy.rules.iter().enumerate() {
            for (destination, _) in &rule.destinations {
                let rules = match destination {
                    Destination::Prefix(IpNet::V4(net)) => v4_direct.entry(*net).or_default(),
                    Destination::Prefix(IpNet::V6(net)) => v6_direct.entry(*net).or_default(),
                    Destination::Host(_) => continue,
                };
                if !rules.contains(&index) {
                    rules.push(index);
                }
            }
        }
        let (v4, v6) = (
            flatten(&v4_direct, &policy.rules),
            flatten(&v6_direct, &policy.rules),
        );
        let lists = v4.iter().map(|(_, list)| list);
        let errors = unenforceable(&policy.rules, lists.chain(v6.iter().map(|(_, list)| list)));
        if !errors.is_empty() {
            return Err(PolicyLoadError::Invalid {
                path: policy.path,
                errors,
            });
        }
        Ok(Self {
            v4,
            v6,
            policy: Arc::new(policy),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The policy, shared rather than copied: a large one takes a kilobyte per rule.
    pub fn shared_policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy)
    }

    /// The same tables in the kernel's layout, for in-kernel decisions.
    pub fn kernel_tables(&self) -> KernelTables {
        kernel::compile(
            &self.policy.rules,
            self.policy.unmatched,
            &self.v4,
            &self.v6,
        )
    }

    /// IPv4-mapped addresses are decided as the IPv4 address they carry.
    pub fn decide(&self, connection: &ConnectionKey) -> Decision<'_> {
        let connection = ConnectionKey {
            src: canonical_address(connection.src),
            dst: canonical_address(connection.dst),
            ..*connection
        };
        match self.rule_for(&connection) {
            Some(rule) if rule.allows_source(connection.src) => Decision::Compliant(rule),
            Some(rule) => Decision::Violation(rule),
            None if self.policy.unmatched == Unmatched::Alert => Decision::UnmatchedViolation,
            None => Decision::Unmatched,
        }
    }

    fn rule_for(&self, connection: &ConnectionKey) -> Option<&Rule> {
        let candidates = match connection.dst {
            IpAddr::V4(address) => lookup(&self.v4, Ipv4Net::from(address)),
            IpAddr::V6(address) => lookup(&self.v6, Ipv6Net::from(address)),
        }?;
        candidates
            .iter()
            .map(|&index| &self.policy.rules[index])
            .find(|rule| {
                rule.protocol.includes(connection.protocol)
                    && rule.includes_port(connection.dst_port)
            })
    }
}

fn lookup<P: Prefix>(table: &PrefixMap<P, Vec<usize>>, host: P) -> Option<&Vec<usize>> {
    table.get_lpm(&host).map(|(_, candidates)| candidates)
}

/// For each prefix, its own rules (with ports first) followed by those of every shorter
/// prefix that covers it, longest first.
fn flatten<P: Prefix + Copy>(
    direct: &PrefixMap<P, Vec<usize>>,
    rules: &[Rule],
) -> PrefixMap<P, Vec<usize>> {
    let mut flat = PrefixMap::new();
    for (prefix, _) in direct.iter() {
        let covering: Vec<_> = direct.cover(&prefix).collect();
        let mut candidates = Vec::new();
        for (_, at_prefix) in covering.into_iter().rev() {
            let mut at_prefix = at_prefix.clone();
            at_prefix.sort_by_key(|&index| rules[index].ports.is_none());
            candidates.extend(at_prefix);
        }
        flat.insert(prefix, candidates);
    }
    flat
}

/// Pairs of rules that could both match one connection with equal priority: the same
/// destination prefix, overlapping protocols, and either both without ports or with
/// overlapping ports. Reported at the later rule's destination.
/// The kernel lists at most `MAX_CANDIDATES` rules per destination prefix; a pinning or
/// blocking rule beyond them would never be enforced there.
fn unenforceable<'a>(
    rules: &[Rule],
    candidate_lists: impl Iterator<Item = &'a Vec<usize>>,
) -> Vec<PolicyError> {
    let mut reported = std::collections::BTreeSet::new();
    for list in candidate_lists {
        for &index in list.iter().skip(MAX_CANDIDATES) {
            if rules[index].action != Action::Alert {
                reported.insert(index);
            }
        }
    }
    reported
        .into_iter()
        .map(|index| {
            let rule = &rules[index];
            PolicyError {
                location: rule
                    .destinations
                    .first()
                    .map_or(Location { line: 1, column: 1 }, |(_, location)| *location),
                message: format!(
                    "rule \"{}\": action = \"{}\" cannot be enforced: more than {MAX_CANDIDATES} rules apply to one of its destinations, and the kernel takes {MAX_CANDIDATES}; narrow the overlapping rules",
                    rule.name,
                    rule.action.as_str()
                ),
            }
        })
        .collect()
}

pub(super) fn equal_priority_conflicts(rules: &[Rule]) -> Vec<PolicyError> {
    let mut rules_at: HashMap<IpNet, Vec<usize>> = HashMap::new();
    let mut errors = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        for (destination, location) in &rule.destinations {
            let Destination::Prefix(prefix) = destination else {
                continue;
            };
            let earlier = rules_at.entry(*prefix).or_default();
            for &other in earlier.iter().filter(|&&other| other != index) {
                if can_match_same_connection(&rules[other], rule) {
                    errors.push(PolicyError {
                        location: *location,
                        message: format!(
                            "rules \"{}\" and \"{}\" can both match {prefix} with equal priority: make their ports or protocols disjoint",
                            rules[other].name, rule.name
                        ),
                    });
                }
            }
            if !earlier.contains(&index) {
                earlier.push(index);
            }
        }
    }
    errors
}

fn can_match_same_connection(a: &Rule, b: &Rule) -> bool {
    a.protocol.overlaps(b.protocol)
        && match (&a.ports, &b.ports) {
            (None, None) => true,
            (Some(a_ports), Some(b_ports)) => a_ports
                .iter()
                .any(|a_range| b_ports.iter().any(|b_range| a_range.overlaps(*b_range))),
            _ => false,
        }
}

/// The canonical form of an address seen on a socket: IPv4-mapped IPv6 becomes IPv4.
fn canonical_address(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::*;

    fn matcher(text: &str) -> Matcher {
        Matcher::new(crate::policy::parse(Path::new("p.toml"), text).unwrap()).unwrap()
    }

    fn tcp(src: &str, dst: &str, dst_port: u16) -> ConnectionKey {
        ConnectionKey {
            protocol: Protocol::Tcp,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            dst_port,
        }
    }

    fn rule_name<'a>(decision: &Decision<'a>) -> Option<&'a str> {
        match decision {
            Decision::Compliant(rule) | Decision::Violation(rule) => Some(&rule.name),
            Decision::UnmatchedViolation | Decision::Unmatched => None,
        }
    }

    const LAYERED: &str = r#"
[[rule]]
name = "wide"
destinations = ["198.51.100.0/24"]
allowed_sources = ["203.0.113.0/24"]

[[rule]]
name = "narrow-https"
destinations = ["198.51.100.50"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.10"]

[[rule]]
name = "narrow-any-port"
destinations = ["198.51.100.50"]
allowed_sources = ["203.0.113.12"]

[[rule]]
name = "v6"
destinations = ["2001:db8:50::/64"]
ports = ["8000-8100"]
allowed_sources = ["2001:db8::10"]
"#;

    #[test]
    fn longest_prefix_then_ports_decide_the_rule() {
        let m = matcher(LAYERED);
        let cases = [
            (tcp("203.0.113.10", "198.51.100.50", 443), "narrow-https"),
            (tcp("203.0.113.10", "198.51.100.50", 80), "narrow-any-port"),
            (tcp("203.0.113.10", "198.51.100.7", 443), "wide"),
        ];
        for (key, expected) in cases {
            assert_eq!(rule_name(&m.decide(&key)), Some(expected), "{key:?}");
        }
    }

    #[test]
    fn a_rule_whose_ports_exclude_the_connection_falls_back_to_a_shorter_prefix() {
        let m = matcher(
            r#"
[[rule]]
name = "wide"
destinations = ["198.51.100.0/24"]
allowed_sources = ["203.0.113.0/24"]

[[rule]]
name = "narrow-https"
destinations = ["198.51.100.50"]
ports = [443]
allowed_sources = ["203.0.113.10"]
"#,
        );
        let decision = m.decide(&tcp("203.0.113.11", "198.51.100.50", 22));
        assert!(matches!(decision, Decision::Compliant(rule) if &*rule.name == "wide"));
    }

    #[test]
    fn sources_outside_the_allow_list_are_violations() {
        let m = matcher(LAYERED);
        assert!(matches!(
            m.decide(&tcp("203.0.113.11", "198.51.100.50", 443)),
            Decision::Violation(rule) if &*rule.name == "narrow-https"
        ));
        assert!(matches!(
            m.decide(&tcp("203.0.113.10", "198.51.100.50", 443)),
            Decision::Compliant(_)
        ));
        assert!(matches!(
            m.decide(&tcp("2001:db8::11", "2001:db8:50::50", 8080)),
            Decision::Violation(rule) if &*rule.name == "v6"
        ));
        assert!(matches!(
            m.decide(&tcp("2001:db8::10", "2001:db8:50::50", 8080)),
            Decision::Compliant(_)
        ));
    }

    #[test]
    fn unmatched_connections_follow_the_unmatched_setting() {
        let ignore = matcher(LAYERED);
        assert!(matches!(
            ignore.decide(&tcp("203.0.113.11", "192.0.2.1", 443)),
            Decision::Unmatched
        ));
        assert!(matches!(
            ignore.decide(&tcp("2001:db8::11", "2001:db8:50::50", 22)),
            Decision::Unmatched
        ));
        let alert = matcher(&format!("unmatched = \"alert\"\n{LAYERED}"));
        assert!(matches!(
            alert.decide(&tcp("203.0.113.11", "192.0.2.1", 443)),
            Decision::UnmatchedViolation
        ));
    }

    #[test]
    fn protocol_restricts_the_rule() {
        let m = matcher(LAYERED);
        let udp = ConnectionKey {
            protocol: Protocol::Udp,
            ..tcp("203.0.113.12", "198.51.100.50", 443)
        };
        assert!(matches!(
            m.decide(&udp),
            Decision::Compliant(rule) if &*rule.name == "narrow-any-port"
        ));
    }

    #[test]
    fn ipv4_mapped_addresses_are_matched_as_ipv4() {
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 51, 100, 50).to_ipv6_mapped());
        assert_eq!(
            canonical_address(mapped),
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 50))
        );
        let m = matcher(LAYERED);
        let key = ConnectionKey {
            dst: mapped,
            ..tcp("203.0.113.11", "198.51.100.50", 443)
        };
        assert!(matches!(m.decide(&key), Decision::Violation(_)));
    }
}
