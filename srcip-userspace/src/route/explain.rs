//! `reason`: one sentence on why the kernel chose a source, and the policy-routing rules an
//! operator may believe protect a destination when they do not.

use std::net::IpAddr;

use netlink_packet_route::route::RouteType;

use super::{HostRouting, MAIN_TABLE, MatchedRoute, Prediction, Query, prefix_text, table_name};
use crate::policy::{self, Protocol};

/// Why the kernel would choose `prediction.src` for `query`, naming the route and its table,
/// and the rule that chose the table when it is not the usual `lookup main`.
pub fn reason(query: &Query, prediction: &Prediction, host: &HostRouting) -> String {
    let Some(route) = &prediction.route else {
        let why = prediction.unreachable.as_deref().unwrap_or("no route");
        return format!("no route to {}: {why}", query.dst);
    };
    if route.kind == RouteType::Local {
        return format!(
            "{} is an address of this host (route {} in table local)",
            query.dst,
            prefix_text(route.prefix)
        );
    }
    let mut text = match (route.pref_src, prediction.src) {
        (Some(_), _) => format!("route {}", describe(route)),
        (None, Some(src)) => format!(
            "no src on the route {}; {}",
            describe(route),
            default_choice(src, route, host)
        ),
        (None, None) => format!("route {}, which gives no source", describe(route)),
    };
    if let Some(rule) = selecting_rule(query, route.table, host)
        && !(route.table == MAIN_TABLE && rule.priority == 32766)
    {
        text.push_str(&format!(
            "; table {} by rule \"{}\"",
            table_name(route.table),
            rule.text
        ));
    }
    text
}

/// `PREFIX [via GW] dev DEV [src SRC] in table T`, as `ip route` prints a route.
fn describe(route: &MatchedRoute) -> String {
    let mut text = prefix_text(route.prefix);
    if let Some(gateway) = route.gateway {
        text.push_str(&format!(" via {gateway}"));
    }
    if let Some(oif) = &route.oif {
        text.push_str(&format!(" dev {oif}"));
    }
    if let Some(src) = route.pref_src {
        text.push_str(&format!(" src {src}"));
    }
    text.push_str(&format!(" in table {}", table_name(route.table)));
    text
}

/// What the kernel does when the route names no source.
fn default_choice(src: IpAddr, route: &MatchedRoute, host: &HostRouting) -> String {
    let oif = route.oif.as_deref().unwrap_or("the output interface");
    let owner = host
        .addresses
        .iter()
        .find(|address| address.address.addr() == src);
    match (src, owner) {
        (IpAddr::V4(_), Some(address)) if address.interface == oif && !address.secondary => {
            format!("the kernel took the first primary address of {oif}")
        }
        (IpAddr::V4(_), Some(address)) => format!(
            "the kernel took {src} of {}, as no primary address of {oif} fits",
            address.interface
        ),
        (IpAddr::V6(_), _) => format!(
            "the kernel chose {src} among the host's addresses by IPv6 source address selection (RFC 6724) for {oif}"
        ),
        (IpAddr::V4(_), None) => format!("the kernel took {src} for {oif}"),
    }
}

/// The first rule, in priority order, that sends a lookup like `query`'s to `table`.
fn selecting_rule<'a>(
    query: &Query,
    table: u32,
    host: &'a HostRouting,
) -> Option<&'a super::PolicyRule> {
    let protocol = query.protocol.map(Protocol::number);
    host.rules.iter().find(|rule| {
        rule.table == Some(table)
            && rule.family_matches(query.dst)
            && rule.matches_unbound(query.dst, protocol, query.dst_port, query.program)
    })
}

/// Source-keyed rules (`ip rule add from ALLOWED lookup T`) that an operator may believe
/// protect this destination but that a program that never binds never reaches: such a
/// program looks its route up without a source, so `from` never matches it. One sentence
/// each; none when the lookup already goes to the rule's table.
pub fn unprotecting_rules(
    rule: &policy::Rule,
    query: &Query,
    prediction: &Prediction,
    host: &HostRouting,
) -> Vec<String> {
    host.rules
        .iter()
        .filter(|host_rule| {
            let Some(from) = host_rule.from else {
                return false;
            };
            !host_rule.inverted
                && host_rule.table.is_some()
                && host_rule.table != prediction.table
                && host_rule.family_matches(query.dst)
                && host_rule.to.is_none_or(|to| to.contains(&query.dst))
                && rule
                    .allowed_sources
                    .iter()
                    .any(|allowed| from.contains(&allowed.addr()) || allowed.contains(&from.addr()))
        })
        .map(|host_rule| {
            let from = host_rule.from.map(prefix_text).unwrap_or_default();
            let chosen = prediction
                .src
                .map_or_else(|| "no source".to_owned(), |src| src.to_string());
            format!(
                "ip rule \"{}\" does not protect {}: it applies only to connections already bound to {from}; a program that does not bind gets {chosen} from table {}",
                host_rule.text,
                query.dst,
                prediction.table.map_or_else(|| "main".to_owned(), table_name)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{HostRouting, PolicyRule, Program};

    fn query() -> Query {
        Query {
            dst: "198.51.100.50".parse().unwrap(),
            protocol: None,
            dst_port: None,
            program: Program::default(),
        }
    }

    fn prediction(pref_src: Option<&str>, src: &str) -> Prediction {
        Prediction {
            src: Some(src.parse().unwrap()),
            oif: Some("eth0".into()),
            gateway: Some("203.0.113.1".parse().unwrap()),
            table: Some(MAIN_TABLE),
            route: Some(MatchedRoute {
                prefix: "0.0.0.0/0".parse().unwrap(),
                kind: RouteType::Unicast,
                gateway: Some("203.0.113.1".parse().unwrap()),
                oif: Some("eth0".into()),
                pref_src: pref_src.map(|src| src.parse().unwrap()),
                table: MAIN_TABLE,
                multipath: false,
            }),
            unreachable: None,
        }
    }

    #[test]
    fn reason_names_the_route_and_how_the_source_was_taken() {
        let host = HostRouting::for_tests(&["eth0 203.0.113.10/24"], vec![]);
        assert_eq!(
            reason(
                &query(),
                &prediction(Some("203.0.113.11"), "203.0.113.11"),
                &host
            ),
            "route default via 203.0.113.1 dev eth0 src 203.0.113.11 in table main"
        );
        assert_eq!(
            reason(&query(), &prediction(None, "203.0.113.10"), &host),
            "no src on the route default via 203.0.113.1 dev eth0 in table main; the kernel took the first primary address of eth0"
        );
        let unreachable = Prediction {
            src: None,
            oif: None,
            gateway: None,
            table: None,
            route: None,
            unreachable: Some("Network is unreachable".into()),
        };
        assert_eq!(
            reason(&query(), &unreachable, &host),
            "no route to 198.51.100.50: Network is unreachable"
        );
    }

    #[test]
    fn a_source_keyed_rule_for_an_allowed_source_is_named_as_not_protecting() {
        let rule = crate::policy::parse(
            std::path::Path::new("test.toml"),
            "[[rule]]\nname = \"partner\"\ndestinations = [\"198.51.100.50\"]\nallowed_sources = [\"203.0.113.10\"]\n",
        )
        .unwrap()
        .rules
        .remove(0);
        let host = HostRouting::for_tests(
            &["eth0 203.0.113.10/24"],
            vec![
                PolicyRule::source_keyed(200, "203.0.113.10/32", 200),
                // Another source's rule says nothing about this destination.
                PolicyRule::source_keyed(201, "192.0.2.7/32", 201),
            ],
        );
        let warnings =
            unprotecting_rules(&rule, &query(), &prediction(None, "203.0.113.11"), &host);
        assert_eq!(
            warnings,
            [
                "ip rule \"200: from 203.0.113.10 lookup 200\" does not protect 198.51.100.50: it applies only to connections already bound to 203.0.113.10; a program that does not bind gets 203.0.113.11 from table main"
            ]
        );
    }
}
