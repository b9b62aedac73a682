//! The compiled policy in the kernel's layout (`srcip_common::policy`), built from the same
//! flattened tables the user-space matcher uses, so both decide alike.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use srcip_common::{
    policy::{
        ACTION_ALERT, ACTION_BLOCK, ACTION_PIN, Candidates, KernelRule, MAX_ALLOWED_SOURCES,
        MAX_CANDIDATES, MAX_PORT_RANGES, PROTOCOL_TCP, PROTOCOL_UDP, PortRange as KernelPortRange,
        SourcePrefix,
    },
    record::{AF_INET, AF_INET6},
};

use super::{Action, Protocol, ProtocolSelector, Rule, Unmatched};

/// What the loader writes to the kernel's policy maps.
pub struct KernelTables {
    pub v4: Vec<(Ipv4Net, Candidates)>,
    pub v6: Vec<(Ipv6Net, Candidates)>,
    /// Indexed by the rule numbers in `Candidates`.
    pub rules: Vec<KernelRule>,
    /// `unmatched = "alert"`: connections no rule matches must be reported.
    pub report_unmatched: bool,
    /// Some rule pins or blocks.
    pub enforcing: bool,
    /// Some rule pins UDP: unconnected datagrams get their source from the sendmsg programs.
    pub pins_udp: bool,
    /// Some rule blocks UDP. The egress program refuses a wrong datagram on the source it
    /// carries (its sender gets EPERM from that `send()`); the sendmsg programs refuse it
    /// earlier only where they are attached anyway (see `KernelPrograms::needs_datagram_programs`).
    pub blocks_udp: bool,
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
        enforcing: rules.iter().any(|rule| rule.action != Action::Alert),
        pins_udp: rules
            .iter()
            .any(|rule| rule.action == Action::Pin && rule.protocol.includes(Protocol::Udp)),
        blocks_udp: rules
            .iter()
            .any(|rule| rule.action == Action::Block && rule.protocol.includes(Protocol::Udp)),
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
        action: match rule.action {
            Action::Alert => ACTION_ALERT,
            Action::Block => ACTION_BLOCK,
            Action::Pin => ACTION_PIN,
        },
        ..KernelRule::default()
    };
    for (source, _) in &rule.pin_sources {
        match source {
            IpAddr::V4(v4) => compiled.pin_v4 = v4.octets(),
            IpAddr::V6(v6) => compiled.pin_v6 = v6.octets(),
        }
    }
    let ports = rule.ports.as_deref().unwrap_or_default();
    // Parsing refuses enforcing rules that do not fit, so only alerting ones get here. Ports
    // that fit are written all the same, so that only the rule's own connections are left
    // to user space; a rule whose ports do not fit claims every port (none listed).
    if ports.len() <= MAX_PORT_RANGES {
        compiled.port_range_count = ports.len() as u32;
        for (slot, range) in compiled.port_ranges.iter_mut().zip(ports) {
            *slot = KernelPortRange {
                first: range.first,
                last: range.last,
            };
        }
    }
    if ports.len() > MAX_PORT_RANGES || rule.allowed_sources.len() > MAX_ALLOWED_SOURCES {
        compiled.undecidable = 1;
        return compiled;
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
    fn actions_and_pin_sources_compile() {
        let tables = compile_text(
            r#"
[[rule]]
name = "pinned"
destinations = ["198.51.100.50", "2001:db8:50::/64"]
allowed_sources = ["203.0.113.10", "2001:db8::10"]
action = "pin"

[[rule]]
name = "blocked"
destinations = ["192.0.2.0/24"]
allowed_sources = ["203.0.113.10"]
action = "block"
"#,
        );
        assert!(tables.enforcing);
        let (pinned, blocked) = (&tables.rules[0], &tables.rules[1]);
        assert_eq!(pinned.action, ACTION_PIN);
        assert_eq!(pinned.pin_v4, [203, 0, 113, 10]);
        assert_eq!(pinned.pin_v6[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(pinned.pin_v6[15], 0x10);
        assert_eq!((blocked.action, blocked.pin_v4), (ACTION_BLOCK, [0; 4]));
        assert!(!compile_text(
            "[[rule]]\nname = \"a\"\ndestinations = [\"192.0.2.1\"]\nallowed_sources = [\"203.0.113.10\"]\n"
        )
        .enforcing);
    }

    #[test]
    fn an_enforcing_rule_the_kernel_would_not_list_is_refused() {
        let mut policy = String::new();
        for index in 0..=MAX_CANDIDATES {
            let action = if index == 0 { "block" } else { "alert" };
            policy.push_str(&format!(
                "[[rule]]\nname = \"r{index}\"\ndestinations = [\"10.0.0.0/{}\"]\nallowed_sources = [\"203.0.113.10\"]\naction = \"{action}\"\n",
                8 + index
            ));
        }
        let error = Matcher::new(parse(Path::new("p.toml"), &policy).unwrap())
            .err()
            .expect("refused");
        assert!(
            error
                .to_string()
                .starts_with("p.toml:3:17: rule \"r0\": action = \"block\" cannot be enforced"),
            "{error}"
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
        // Claims every port: none listed.
        assert_eq!(tables.rules[0].port_range_count, 0);

        // Too many sources, ports that fit: only the rule's own port is left to user space.
        let sources: Vec<String> = (1..=9)
            .map(|host| format!("\"203.0.113.{host}\""))
            .collect();
        let tables = compile_text(&format!(
            "[[rule]]\nname = \"many-sources\"\ndestinations = [\"192.0.2.1\"]\nports = [5353]\nallowed_sources = [{}]\n",
            sources.join(", ")
        ));
        let rule = &tables.rules[0];
        assert_eq!(
            (
                rule.undecidable,
                rule.port_range_count,
                rule.port_ranges[0].first
            ),
            (1, 1, 5353)
        );

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
