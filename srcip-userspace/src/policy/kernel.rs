//! The compiled policy in the kernel's layout (`srcip_common::policy`), built from the same
//! flattened tables the user-space matcher uses, so both decide alike.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use srcip_common::{
    policy::{
        Candidates, KernelRule, MAX_ALLOWED_SOURCES, MAX_CANDIDATES, MAX_PORT_RANGES, PROTOCOL_TCP,
        PROTOCOL_UDP, PortRange as KernelPortRange, SourcePrefix,
    },
    record::{AF_INET, AF_INET6},
};

use super::{Protocol, ProtocolSelector, Rule, Unmatched};

/// What the loader writes to the kernel's policy maps.
pub struct KernelTables {
    pub v4: Vec<(Ipv4Net, Candidates)>,
    pub v6: Vec<(Ipv6Net, Candidates)>,
    /// Indexed by the rule numbers in `Candidates`.
    pub rules: Vec<KernelRule>,
    /// `unmatched = "alert"`: connections no rule matches must be reported.
    pub report_unmatched: bool,
}

pub(super) fn compile(
    rules: &[Rule],
    unmatched: Unmatched,
    v4: &PrefixMap<Ipv4Net, Vec<usize>>,
    v6: &PrefixMap<Ipv6Net, Vec<usize>>,
) -> KernelTables {
    KernelTables {
        v4: v4
            .iter()
            .map(|(net, list)| (net, candidates(list)))
            .collect(),
        v6: v6
            .iter()
            .map(|(net, list)| (net, candidates(list)))
            .collect(),
        rules: rules.iter().map(kernel_rule).collect(),
        report_unmatched: unmatched == Unmatched::Alert,
    }
}

fn candidates(list: &[usize]) -> Candidates {
    let mut compiled = Candidates {
        count: list.len().min(MAX_CANDIDATES) as u32,
        truncated: u32::from(list.len() > MAX_CANDIDATES),
        rules: [0; MAX_CANDIDATES],
    };
    for (slot, rule) in compiled.rules.iter_mut().zip(list) {
        *slot = *rule as u32;
    }
    compiled
}

fn kernel_rule(rule: &Rule) -> KernelRule {
    let mut compiled = KernelRule {
        protocols: match rule.protocol {
            ProtocolSelector::Only(Protocol::Tcp) => PROTOCOL_TCP,
            ProtocolSelector::Only(Protocol::Udp) => PROTOCOL_UDP,
            ProtocolSelector::Any => PROTOCOL_TCP | PROTOCOL_UDP,
        },
        ..KernelRule::default()
    };
    let ports = rule.ports.as_deref().unwrap_or_default();
    if ports.len() > MAX_PORT_RANGES || rule.allowed_sources.len() > MAX_ALLOWED_SOURCES {
        compiled.undecidable = 1;
        return compiled;
    }
    compiled.port_range_count = ports.len() as u32;
    for (slot, range) in compiled.port_ranges.iter_mut().zip(ports) {
        *slot = KernelPortRange {
            first: range.first,
            last: range.last,
        };
    }
    compiled.source_count = rule.allowed_sources.len() as u32;
    for (slot, net) in compiled.sources.iter_mut().zip(&rule.allowed_sources) {
        *slot = source_prefix(*net);
    }
    compiled
}

/// Address and mask in the record layout: network order, IPv4 in the first 4 bytes.
fn source_prefix(net: IpNet) -> SourcePrefix {
    let mut prefix = SourcePrefix::default();
    match net {
        IpNet::V4(v4) => {
            prefix.family = u32::from(AF_INET);
            prefix.addr[..4].copy_from_slice(&v4.network().octets());
            prefix.mask[..4].copy_from_slice(&v4.netmask().octets());
        }
        IpNet::V6(v6) => {
            prefix.family = u32::from(AF_INET6);
            prefix.addr = v6.network().octets();
            prefix.mask = v6.netmask().octets();
        }
    }
    prefix
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{Matcher, parse};

    fn compile_text(text: &str) -> KernelTables {
        Matcher::new(parse(Path::new("p.toml"), text).unwrap())
            .unwrap()
            .kernel_tables()
    }

    #[test]
    fn rules_compile_to_kernel_entries() {
        let tables = compile_text(
            r#"
unmatched = "alert"

[[rule]]
name = "wide"
destinations = ["198.51.100.0/24"]
protocol = "udp"
allowed_sources = ["203.0.113.0/24", "2001:db8::/32"]

[[rule]]
name = "narrow"
destinations = ["198.51.100.50"]
ports = [443, "8000-8100"]
allowed_sources = ["203.0.113.10"]
"#,
        );
        assert!(tables.report_unmatched);
        let narrow: Ipv4Net = "198.51.100.50/32".parse().unwrap();
        let (_, candidates) = tables.v4.iter().find(|(net, _)| *net == narrow).unwrap();
        assert_eq!((candidates.count, candidates.truncated), (2, 0));
        assert_eq!(&candidates.rules[..2], &[1, 0], "longest prefix first");

        let wide = &tables.rules[0];
        assert_eq!(wide.protocols, PROTOCOL_UDP);
        assert_eq!(wide.port_range_count, 0);
        assert_eq!(wide.source_count, 2);
        assert_eq!(&wide.sources[0].addr[..4], &[203, 0, 113, 0]);
        assert_eq!(&wide.sources[0].mask[..5], &[255, 255, 255, 0, 0]);
        assert_eq!(wide.sources[1].family, u32::from(AF_INET6));
        assert_eq!(&wide.sources[1].mask[..5], &[255, 255, 255, 255, 0]);

        let narrow = &tables.rules[1];
        assert_eq!(narrow.protocols, PROTOCOL_TCP | PROTOCOL_UDP);
        assert_eq!(narrow.port_range_count, 2);
        assert_eq!(
            narrow.port_ranges[1],
            KernelPortRange {
                first: 8000,
                last: 8100
            }
        );
    }

    #[test]
    fn what_does_not_fit_is_left_to_user_space() {
        let ports: Vec<String> = (1..=9).map(|port| port.to_string()).collect();
        let tables = compile_text(&format!(
            "[[rule]]\nname = \"many-ports\"\ndestinations = [\"192.0.2.1\"]\nports = [{}]\nallowed_sources = [\"203.0.113.10\"]\n",
            ports.join(", ")
        ));
        assert_eq!(tables.rules[0].undecidable, 1);

        let mut policy = String::new();
        for index in 0..=MAX_CANDIDATES {
            policy.push_str(&format!(
                "[[rule]]\nname = \"r{index}\"\ndestinations = [\"10.0.0.0/{}\"]\nallowed_sources = [\"203.0.113.10\"]\n",
                8 + index
            ));
        }
        let tables = compile_text(&policy);
        let deepest: Ipv4Net = format!("10.0.0.0/{}", 8 + MAX_CANDIDATES).parse().unwrap();
        let (_, candidates) = tables.v4.iter().find(|(net, _)| *net == deepest).unwrap();
        assert_eq!(candidates.count as usize, MAX_CANDIDATES);
        assert_eq!(candidates.truncated, 1);
    }
}
