//! `fix`: commands that would make the kernel choose an allowed source for a destination,
//! modelled on the three remedies an operator has. The first is runnable as printed and
//! makes `srcip check` pass; each says in a trailing comment what it changes and whether it
//! lasts across a reboot. None is a source-keyed `ip rule from` alone, which does not change
//! the source of a program that never binds (see `explain::unprotecting_rules`).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{HostRouting, MAIN_TABLE, MatchedRoute, Prediction, prefix_text, table_name};
use crate::policy::{self, ProtocolSelector};

/// Where the fix applies.
pub struct Fix<'a> {
    pub rule: &'a policy::Rule,
    /// The policy's destination the checked address stands for.
    pub destination: IpNet,
    pub prediction: &'a Prediction,
    pub host: &'a HostRouting,
    /// Another rule of the policy shares this destination and allows other sources: a
    /// route for the whole destination that suits `rule` would undo its fix, run after run.
    pub shared: bool,
    /// The rule's place in the policy: its policy routing takes the place-th free table,
    /// so that the fixes of one check never write into the same one.
    pub place: usize,
}

/// The commands, best first; empty when the destination is compliant.
pub fn fixes(fix: &Fix<'_>) -> Vec<String> {
    let Fix {
        rule,
        destination,
        prediction,
        host,
        shared,
        place,
    } = fix;
    let Some(route) = &prediction.route else {
        return vec![format!(
            "# no route to {}: add one, with src set to an allowed source of rule \"{}\"",
            prefix_text(*destination),
            rule.name
        )];
    };
    let Some(source) = allowed_host_source(rule, destination.addr(), route, host) else {
        let allowed: Vec<_> = rule
            .allowed_sources
            .iter()
            .map(|net| prefix_text(*net))
            .collect();
        return vec![format!(
            "# no allowed source of rule \"{}\" ({}) is an address of this host: add one to {} first",
            rule.name,
            allowed.join(", "),
            route.oif.as_deref().unwrap_or("the output interface")
        )];
    };
    // The route to write must be at least as specific as the one that matched, or the
    // lookup would still find the old one.
    let target = if destination.prefix_len() >= route.prefix.prefix_len() {
        *destination
    } else {
        route.prefix
    };
    let target_text = prefix_text(target);
    let next_hop = next_hop(route);
    let in_table = if route.table == MAIN_TABLE {
        String::new()
    } else {
        format!(" table {}", table_name(route.table))
    };
    let table = free_table(host, *place);
    let priority = free_priority_before(route.table, host);
    // `ip rule` takes an IPv6 selector only with `-6` ("Invalid dst address" otherwise).
    let ip_rule = if target.addr().is_ipv6() {
        "ip -6 rule"
    } else {
        "ip rule"
    };
    let selectors = selectors(rule);
    if *shared && !selectors.is_empty() {
        // Only policy routing keyed by the rule's protocol and ports leaves the connections
        // of the other rules of this destination where they are.
        let steps = selectors.len() + 1;
        let mut keyed = vec![format!(
            "ip route replace {target_text}{next_hop} src {source} table {table}  # 1 of {steps}: the route in a table of its own, unused until the rules that follow; keyed by protocol and port because another rule of this destination allows other sources"
        )];
        keyed.extend(selectors.iter().enumerate().map(|(index, selector)| {
            format!(
                "{ip_rule} add to {target_text} {selector} lookup {table} priority {priority}  # {} of {steps}: only rule \"{}\"'s connections; lost at reboot unless written to the network configuration",
                index + 2,
                rule.name
            )
        }));
        keyed.push(format!(
            "# or make the program bind {source} itself (for example curl --interface {source}, or a bind() before connect()): it then leaves from {source} whatever the routes say, across reboots"
        ));
        return keyed;
    }
    vec![
        format!(
            "ip route replace {target_text}{next_hop} src {source}{in_table}  # takes effect at once; lost at reboot unless added to the interface's configuration (ifupdown post-up, or PreferredSource= in a systemd-networkd [Route])"
        ),
        // Policy routing is two commands, each complete on its own: the route alone changes
        // nothing (no rule looks into its table yet), and the rule then sends the lookup there.
        format!(
            "ip route replace {target_text}{next_hop} src {source} table {table}  # policy routing, 1 of 2: the route in a table of its own, unused until the rule of 2 of 2"
        ),
        format!(
            "{ip_rule} add to {target_text} lookup {table} priority {priority}  # policy routing, 2 of 2: destination-keyed, before the rule in effect; both lost at reboot unless written to the network configuration"
        ),
        // `action = "pin"` joins this remedy when srcip enforces it (see docs/reference.md).
        format!(
            "# or make the program bind {source} itself (for example curl --interface {source}, or a bind() before connect()): it then leaves from {source} whatever the routes say, across reboots"
        ),
    ]
}

/// An address of this host that the rule allows, of the destination's family: preferably
/// one on the route's interface.
fn allowed_host_source(
    rule: &policy::Rule,
    dst: IpAddr,
    route: &MatchedRoute,
    host: &HostRouting,
) -> Option<IpAddr> {
    let candidates: Vec<_> = host
        .addresses
        .iter()
        .filter(|address| {
            let ip = address.address.addr();
            ip.is_ipv6() == dst.is_ipv6() && rule.allows_source(ip)
        })
        .collect();
    candidates
        .iter()
        .find(|address| Some(&address.interface) == route.oif.as_ref())
        .or_else(|| candidates.first())
        .map(|address| address.address.addr())
}

/// ` via GW dev DEV`, or ` dev DEV` for a directly connected destination.
fn next_hop(route: &MatchedRoute) -> String {
    let mut text = String::new();
    if let Some(gateway) = route.gateway {
        text.push_str(&format!(" via {gateway}"));
    }
    if let Some(oif) = &route.oif {
        text.push_str(&format!(" dev {oif}"));
    }
    text
}

/// The `place`-th routing table no rule uses, from 100 up.
fn free_table(host: &HostRouting, place: usize) -> u32 {
    (100..)
        .filter(|table| !host.rules.iter().any(|rule| rule.table == Some(*table)))
        .nth(place)
        .unwrap_or(100)
}

/// The `ip rule` selectors that match only `rule`'s connections (`ipproto tcp dport 443`),
/// one per protocol and port range; empty for a rule of every protocol and port.
fn selectors(rule: &policy::Rule) -> Vec<String> {
    let protocols: Vec<Option<&str>> = match (rule.protocol, &rule.ports) {
        (ProtocolSelector::Only(protocol), _) => vec![Some(protocol.as_str())],
        (ProtocolSelector::Any, None) => return Vec::new(),
        (ProtocolSelector::Any, Some(_)) => vec![Some("tcp"), Some("udp")],
    };
    let ports: Vec<Option<String>> = match &rule.ports {
        None => vec![None],
        Some(ranges) => ranges
            .iter()
            .map(|range| {
                Some(if range.first == range.last {
                    range.first.to_string()
                } else {
                    format!("{}-{}", range.first, range.last)
                })
            })
            .collect(),
    };
    protocols
        .iter()
        .flat_map(|protocol| {
            ports.iter().map(move |port| {
                let mut selector = String::new();
                if let Some(protocol) = protocol {
                    selector.push_str(&format!("ipproto {protocol}"));
                }
                if let Some(port) = port {
                    selector.push_str(&format!(" dport {port}"));
                }
                selector
            })
        })
        .collect()
}

/// A rule priority no rule has, just before the first rule that sends lookups to `table`
/// (or to `main`), so that the new rule is consulted first.
fn free_priority_before(table: u32, host: &HostRouting) -> u32 {
    let before = host
        .rules
        .iter()
        .find(|rule| rule.table == Some(table))
        .map_or(32766, |rule| rule.priority);
    (1..before)
        .rev()
        .find(|priority| !host.rules.iter().any(|rule| rule.priority == *priority))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::route::RouteType;

    use super::*;
    use crate::{policy, route::PolicyRule};

    fn rule() -> policy::Rule {
        policy::parse(
            std::path::Path::new("test.toml"),
            "[[rule]]\nname = \"partner\"\ndestinations = [\"198.51.100.0/24\"]\nallowed_sources = [\"203.0.113.10\"]\n",
        )
        .unwrap()
        .rules
        .remove(0)
    }

    fn prediction(prefix: &str, table: u32) -> Prediction {
        Prediction {
            src: Some("203.0.113.11".parse().unwrap()),
            oif: Some("eth0".into()),
            gateway: Some("203.0.113.1".parse().unwrap()),
            table: Some(table),
            route: Some(MatchedRoute {
                prefix: prefix.parse().unwrap(),
                kind: RouteType::Unicast,
                gateway: Some("203.0.113.1".parse().unwrap()),
                oif: Some("eth0".into()),
                pref_src: None,
                table,
                multipath: false,
            }),
            unreachable: None,
        }
    }

    #[test]
    fn the_first_fix_is_a_route_in_the_table_used_at_least_as_specific_as_the_match() {
        let rule = rule();
        let host =
            HostRouting::for_tests(&["eth0 203.0.113.10/24", "eth0 203.0.113.11/24"], vec![]);
        // The policy's /24 is more specific than the default route: the fix writes the /24.
        let default = prediction("0.0.0.0/0", MAIN_TABLE);
        let written = fixes(&Fix {
            rule: &rule,
            destination: "198.51.100.0/24".parse().unwrap(),
            prediction: &default,
            host: &host,
            shared: false,
            place: 0,
        });
        assert!(
            written[0].starts_with(
                "ip route replace 198.51.100.0/24 via 203.0.113.1 dev eth0 src 203.0.113.10  #"
            ),
            "{written:#?}"
        );
        // A /32 route inside the /24 matched, in table 100: the fix replaces that one there.
        let narrow = prediction("198.51.100.50/32", 100);
        let written = fixes(&Fix {
            rule: &rule,
            destination: "198.51.100.0/24".parse().unwrap(),
            prediction: &narrow,
            host: &host,
            shared: false,
            place: 0,
        });
        assert!(
            written[0].starts_with("ip route replace 198.51.100.50 via 203.0.113.1 dev eth0 src 203.0.113.10 table 100  #"),
            "{written:#?}"
        );
        assert!(written.iter().all(|fix| !fix.contains("rule add from")));
        assert!(
            written.iter().all(|fix| !fix.contains("&&")),
            "{written:#?}"
        );
    }

    #[test]
    fn an_ipv6_destination_gets_ip_6_rule() {
        let rule = policy::parse(
            std::path::Path::new("test.toml"),
            "[[rule]]\nname = \"partner\"\ndestinations = [\"2001:db8:50::/64\"]\nallowed_sources = [\"2001:db8::10\"]\n",
        )
        .unwrap()
        .rules
        .remove(0);
        let host =
            HostRouting::for_tests(&["eth0 2001:db8::10/64", "eth0 2001:db8::11/64"], vec![]);
        let mut prediction = prediction("::/0", MAIN_TABLE);
        prediction.src = Some("2001:db8::11".parse().unwrap());
        if let Some(route) = &mut prediction.route {
            route.gateway = Some("2001:db8::1".parse().unwrap());
        }
        let written = fixes(&Fix {
            rule: &rule,
            destination: "2001:db8:50::/64".parse().unwrap(),
            prediction: &prediction,
            host: &host,
            shared: false,
            place: 0,
        });
        assert!(
            written[2].starts_with("ip -6 rule add to 2001:db8:50::/64 lookup 100 priority "),
            "{written:#?}"
        );
    }

    #[test]
    fn an_allowed_source_the_host_lacks_is_named_not_used() {
        let rule = rule();
        let host = HostRouting::for_tests(&["eth0 203.0.113.11/24"], vec![]);
        let written = fixes(&Fix {
            rule: &rule,
            destination: "198.51.100.0/24".parse().unwrap(),
            prediction: &prediction("0.0.0.0/0", MAIN_TABLE),
            host: &host,
            shared: false,
            place: 0,
        });
        assert_eq!(
            written,
            [
                "# no allowed source of rule \"partner\" (203.0.113.10) is an address of this host: add one to eth0 first"
            ]
        );
    }

    #[test]
    fn policy_routing_takes_a_free_table_and_a_priority_before_the_rule_in_effect() {
        let host = HostRouting::for_tests(
            &["eth0 203.0.113.10/24"],
            vec![
                PolicyRule::source_keyed(100, "203.0.113.10/32", 100),
                PolicyRule::source_keyed(32765, "203.0.113.11/32", 101),
            ],
        );
        assert_eq!(free_table(&host, 0), 102);
        assert_eq!(free_table(&host, 1), 103);
        // No rule names main here, so the new one goes just before 32766, where main's is.
        assert_eq!(free_priority_before(MAIN_TABLE, &host), 32764);
        assert_eq!(free_priority_before(100, &host), 99);
    }
}
