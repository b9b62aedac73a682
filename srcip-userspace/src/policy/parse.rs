//! Reading and validating a policy file.
//!
//! The TOML structure is checked by serde (unknown keys, wrong types); its first error stops
//! the parse. Every value is then validated on its own, so one run reports all the malformed
//! addresses, bad ports, duplicate names and conflicting rules at once, each with the line
//! and column of the offending value.

use std::{
    collections::HashMap,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use toml::Spanned;

use super::{
    Action, Destination, Location, Policy, PolicyError, PolicyLoadError, PortRange, Protocol,
    ProtocolSelector, Rule, Unmatched, matcher,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    unmatched: Option<Spanned<String>>,
    #[serde(default)]
    rule: Vec<Spanned<RuleTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    name: Spanned<String>,
    destinations: Spanned<Vec<Spanned<String>>>,
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    protocol: Option<Spanned<String>>,
    allowed_sources: Spanned<Vec<Spanned<String>>>,
    action: Option<Spanned<String>>,
}

/// Reads and validates the policy at `path`. Host names stay unresolved.
pub fn load(path: &Path) -> Result<Policy, PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyLoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Validates policy `text`; `path` names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Policy, PolicyLoadError> {
    let mut validator = Validator {
        text,
        errors: Vec::new(),
    };
    let policy = match toml::from_str::<PolicyFile>(text) {
        Ok(file) => Some(validator.policy(path.to_owned(), file)),
        Err(error) => {
            let span = error.span().unwrap_or(0..0);
            validator.error(&span, error.message().trim_end().to_owned());
            None
        }
    };
    validator
        .errors
        .sort_by_key(|error| (error.location.line, error.location.column));
    match policy {
        Some(policy) if validator.errors.is_empty() => Ok(policy),
        _ => Err(PolicyLoadError::Invalid {
            path: path.to_owned(),
            errors: validator.errors,
        }),
    }
}

struct Validator<'a> {
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Validator<'_> {
    fn location(&self, offset: usize) -> Location {
        let before = &self.text[..offset.min(self.text.len())];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    fn error(&mut self, span: &Range<usize>, message: String) {
        self.errors.push(PolicyError {
            location: self.location(span.start),
            message,
        });
    }

    fn policy(&mut self, path: PathBuf, file: PolicyFile) -> Policy {
        let unmatched = match &file.unmatched {
            None => Unmatched::Ignore,
            Some(value) => match value.get_ref().as_str() {
                "ignore" => Unmatched::Ignore,
                "alert" => Unmatched::Alert,
                other => {
                    self.error(
                        &value.span(),
                        format!("unmatched = \"{other}\": expected \"ignore\" or \"alert\""),
                    );
                    Unmatched::Ignore
                }
            },
        };
        let mut first_line_of_name: HashMap<String, usize> = HashMap::new();
        let mut rules = Vec::new();
        for table in file.rule {
            let table_span = table.span();
            let table = table.into_inner();
            let name = table.name.get_ref().trim().to_owned();
            if name.is_empty() {
                self.error(&table.name.span(), "rule name must not be empty".to_owned());
            } else if let Some(line) = first_line_of_name.get(&name) {
                self.error(
                    &table.name.span(),
                    format!("duplicate rule name \"{name}\" (first used on line {line})"),
                );
            } else {
                let line = self.location(table_span.start).line;
                first_line_of_name.insert(name.clone(), line);
            }
            rules.push(self.rule(name, table));
        }
        for conflict in matcher::equal_priority_conflicts(&rules) {
            self.errors.push(conflict);
        }
        Policy {
            path,
            unmatched,
            rules,
        }
    }

    fn rule(&mut self, name: String, table: RuleTable) -> Rule {
        if table.destinations.get_ref().is_empty() {
            self.error(
                &table.destinations.span(),
                format!("rule \"{name}\": destinations must not be empty"),
            );
        }
        let destinations = table
            .destinations
            .get_ref()
            .iter()
            .filter_map(|value| {
                let destination = self.destination(value)?;
                Some((destination, self.location(value.span().start)))
            })
            .collect();

        if table.allowed_sources.get_ref().is_empty() {
            self.error(
                &table.allowed_sources.span(),
                format!("rule \"{name}\": allowed_sources must not be empty"),
            );
        }
        let allowed_sources = table
            .allowed_sources
            .get_ref()
            .iter()
            .filter_map(|value| self.address_or_prefix(value))
            .collect();

        let ports = table.ports.as_ref().map(|ports| {
            if ports.get_ref().is_empty() {
                self.error(
                    &ports.span(),
                    "ports must not be empty: leave the key out to match every port".to_owned(),
                );
            }
            ports
                .get_ref()
                .iter()
                .filter_map(|port| self.port_range(port))
                .collect()
        });

        let protocol = match &table.protocol {
            None => ProtocolSelector::Any,
            Some(value) => match value.get_ref().as_str() {
                "tcp" => ProtocolSelector::Only(Protocol::Tcp),
                "udp" => ProtocolSelector::Only(Protocol::Udp),
                "any" => ProtocolSelector::Any,
                other => {
                    self.error(
                        &value.span(),
                        format!("protocol = \"{other}\": expected \"tcp\", \"udp\" or \"any\""),
                    );
                    ProtocolSelector::Any
                }
            },
        };

        let action = match &table.action {
            None => Action::Alert,
            Some(value) => match value.get_ref().as_str() {
                "alert" => Action::Alert,
                "block" => Action::Block,
                "pin" => Action::Pin,
                other => {
                    self.error(
                        &value.span(),
                        format!("action = \"{other}\": expected \"alert\", \"block\" or \"pin\""),
                    );
                    Action::Alert
                }
            },
        };

        Rule {
            name,
            destinations,
            ports,
            protocol,
            allowed_sources,
            action,
        }
    }

    fn destination(&mut self, value: &Spanned<String>) -> Option<Destination> {
        let text = value.get_ref().trim();
        if looks_like_address(text) {
            return self.address_or_prefix(value).map(Destination::Prefix);
        }
        if is_host_name(text) {
            return Some(Destination::Host(text.to_ascii_lowercase()));
        }
        self.error(
            &value.span(),
            format!("\"{text}\" is neither an IP address, a CIDR prefix nor a host name"),
        );
        None
    }

    /// An address (a host prefix) or a CIDR prefix with no host bits set.
    fn address_or_prefix(&mut self, value: &Spanned<String>) -> Option<IpNet> {
        let text = value.get_ref().trim();
        let parsed = match text.parse::<IpAddr>() {
            Ok(address) => Ok(IpNet::from(address)),
            Err(_) => text.parse::<IpNet>(),
        };
        let Ok(net) = parsed else {
            self.error(
                &value.span(),
                format!("\"{text}\" is not a valid IP address or CIDR prefix"),
            );
            return None;
        };
        if net != net.trunc() {
            self.error(
                &value.span(),
                format!(
                    "\"{text}\" has host bits set: did you mean \"{}\"?",
                    net.trunc()
                ),
            );
            return None;
        }
        Some(canonical(net))
    }

    fn port_range(&mut self, value: &Spanned<toml::Value>) -> Option<PortRange> {
        let range = match value.get_ref() {
            toml::Value::Integer(port) => port_number(&port.to_string()).map(|port| PortRange {
                first: port,
                last: port,
            }),
            toml::Value::String(text) => match text.split_once('-') {
                None => port_number(text).map(|port| PortRange {
                    first: port,
                    last: port,
                }),
                Some((first, last)) => match (port_number(first), port_number(last)) {
                    (Some(first), Some(last)) if first <= last => Some(PortRange { first, last }),
                    _ => None,
                },
            },
            _ => None,
        };
        if range.is_none() {
            self.error(
                &value.span(),
                format!(
                    "invalid port {}: expected a number from 1 to 65535 or a range \"FIRST-LAST\"",
                    value.get_ref()
                ),
            );
        }
        range
    }
}

fn port_number(text: &str) -> Option<u16> {
    text.trim().parse::<u16>().ok().filter(|port| *port != 0)
}

/// IPv4-mapped IPv6 prefixes (`::ffff:a.b.c.d/n`, n ≥ 96) stand for the IPv4 prefix they
/// carry: that is what the connection uses on the wire.
pub(super) fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// Anything with a colon or a slash, or made only of digits and dots, is meant as an address;
/// so "198.51.100.300" is reported as a bad address, not looked up as a host name.
fn looks_like_address(text: &str) -> bool {
    text.contains([':', '/']) || text.chars().all(|c| c.is_ascii_digit() || c == '.')
}

fn is_host_name(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Policy, Vec<String>> {
        parse(Path::new("policy.toml"), text).map_err(|error| match error {
            PolicyLoadError::Invalid { .. } => {
                error.to_string().lines().map(String::from).collect()
            }
            PolicyLoadError::Read { .. } => unreachable!("parse does not read files"),
        })
    }

    const REFERENCE_EXAMPLE: &str = r#"
# Connections whose destination matches no rule: "ignore" (default) or "alert".
unmatched = "ignore"

[[rule]]
name = "payment-gateway"                 # unique, required
destinations = ["198.51.100.50", "198.51.100.0/28", "2001:db8:50::/64", "api.example.com"]
ports = [443, "8000-8100"]               # optional; default: every port
protocol = "tcp"                         # "tcp", "udp" or "any" (default "any")
allowed_sources = ["203.0.113.10", "2001:db8::10"]   # addresses or CIDRs
action = "alert"                         # "alert" (default), "block" or "pin"
"#;

    #[test]
    fn contract_example_parses() {
        let policy = parse_str(REFERENCE_EXAMPLE).unwrap();
        assert_eq!(policy.unmatched, Unmatched::Ignore);
        let [rule] = policy.rules.as_slice() else {
            panic!("one rule expected")
        };
        assert_eq!(rule.name, "payment-gateway");
        let destinations: Vec<_> = rule.destinations.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(
            destinations,
            [
                Destination::Prefix("198.51.100.50/32".parse().unwrap()),
                Destination::Prefix("198.51.100.0/28".parse().unwrap()),
                Destination::Prefix("2001:db8:50::/64".parse().unwrap()),
                Destination::Host("api.example.com".into()),
            ]
        );
        assert_eq!(
            rule.destinations[0].1,
            Location {
                line: 7,
                column: 17
            }
        );
        assert_eq!(
            rule.ports,
            Some(vec![
                PortRange {
                    first: 443,
                    last: 443
                },
                PortRange {
                    first: 8000,
                    last: 8100
                }
            ])
        );
        assert_eq!(rule.protocol, ProtocolSelector::Only(Protocol::Tcp));
        assert_eq!(rule.action, Action::Alert);
        assert!(rule.allows_source("203.0.113.10".parse().unwrap()));
        assert!(!rule.allows_source("203.0.113.11".parse().unwrap()));
    }

    #[test]
    fn defaults_apply() {
        let policy = parse_str(
            "[[rule]]\nname = \"a\"\ndestinations = [\"10.0.0.0/8\"]\nallowed_sources = [\"10.1.0.0/16\"]\n",
        )
        .unwrap();
        assert_eq!(policy.unmatched, Unmatched::Ignore);
        let rule = &policy.rules[0];
        assert_eq!(rule.ports, None);
        assert_eq!(rule.protocol, ProtocolSelector::Any);
        assert_eq!(rule.action, Action::Alert);
        assert!(rule.allows_source("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_addresses_become_ipv4() {
        let policy = parse_str(
            "[[rule]]\nname = \"a\"\ndestinations = [\"::ffff:198.51.100.50\", \"::ffff:198.51.100.0/120\"]\nallowed_sources = [\"::ffff:203.0.113.10\"]\n",
        )
        .unwrap();
        let rule = &policy.rules[0];
        assert_eq!(
            rule.destinations[0].0,
            Destination::Prefix("198.51.100.50/32".parse().unwrap())
        );
        assert_eq!(
            rule.destinations[1].0,
            Destination::Prefix("198.51.100.0/24".parse().unwrap())
        );
        assert_eq!(
            rule.allowed_sources,
            ["203.0.113.10/32".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_location() {
        let errors = parse_str(
            r#"unmatched = "maybe"

[[rule]]
name = "a"
destinations = ["198.51.100.300", "10.0.0.1/8", "bad host!"]
ports = [0, "9-3", 70000, "x"]
protocol = "sctp"
allowed_sources = []
action = "drop"

[[rule]]
name = "a"
destinations = ["192.0.2.1"]
allowed_sources = ["203.0.113.10", "203.0.113.0/33"]
"#,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                r#"policy.toml:1:13: unmatched = "maybe": expected "ignore" or "alert""#,
                r#"policy.toml:5:17: "198.51.100.300" is not a valid IP address or CIDR prefix"#,
                r#"policy.toml:5:35: "10.0.0.1/8" has host bits set: did you mean "10.0.0.0/8"?"#,
                r#"policy.toml:5:49: "bad host!" is neither an IP address, a CIDR prefix nor a host name"#,
                r#"policy.toml:6:10: invalid port 0: expected a number from 1 to 65535 or a range "FIRST-LAST""#,
                r#"policy.toml:6:13: invalid port "9-3": expected a number from 1 to 65535 or a range "FIRST-LAST""#,
                r#"policy.toml:6:20: invalid port 70000: expected a number from 1 to 65535 or a range "FIRST-LAST""#,
                r#"policy.toml:6:27: invalid port "x": expected a number from 1 to 65535 or a range "FIRST-LAST""#,
                r#"policy.toml:7:12: protocol = "sctp": expected "tcp", "udp" or "any""#,
                "policy.toml:8:19: rule \"a\": allowed_sources must not be empty",
                r#"policy.toml:9:10: action = "drop": expected "alert", "block" or "pin""#,
                r#"policy.toml:12:8: duplicate rule name "a" (first used on line 3)"#,
                r#"policy.toml:14:36: "203.0.113.0/33" is not a valid IP address or CIDR prefix"#,
            ]
        );
    }

    #[test]
    fn unknown_keys_and_missing_fields_are_located() {
        let errors = parse_str(
            "[[rule]]\nname = \"a\"\ndestinations = [\"192.0.2.1\"]\nallowed_sources = [\"192.0.2.2\"]\nallowed_source = 1\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("policy.toml:5:1: unknown field `allowed_source`"),
            "{errors:?}"
        );

        let errors =
            parse_str("[[rule]]\nname = \"a\"\ndestinations = [\"192.0.2.1\"]\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("policy.toml:1:1: missing field `allowed_sources`"),
            "{errors:?}"
        );

        let errors = parse_str("unmatched = \n").unwrap_err();
        assert!(errors[0].starts_with("policy.toml:1:"), "{errors:?}");
    }

    #[test]
    fn equal_priority_rules_are_rejected() {
        let errors = parse_str(
            r#"
[[rule]]
name = "a"
destinations = ["198.51.100.0/24"]
ports = [443]
allowed_sources = ["203.0.113.10"]

[[rule]]
name = "b"
destinations = ["198.51.100.0/24"]
ports = ["400-500"]
protocol = "tcp"
allowed_sources = ["203.0.113.11"]

[[rule]]
name = "c"
destinations = ["198.51.100.0/24"]
protocol = "udp"
allowed_sources = ["203.0.113.11"]
"#,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "policy.toml:10:17: rules \"a\" and \"b\" can both match 198.51.100.0/24 with equal priority: make their ports or protocols disjoint"
            ]
        );
    }
}
