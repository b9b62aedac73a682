//! The host's addresses, interfaces and policy-routing rules, as a route prediction needs
//! them: to name interfaces, to pick an allowed source the host owns for a fix, and to find
//! the rules that explain (or fail to explain) a table.

use std::{collections::HashMap, net::IpAddr, ops::RangeInclusive};

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressHeaderFlags},
    link::LinkAttribute,
    route::{RouteAddress, RouteAttribute, RouteMessage},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use rtnetlink::IpVersion;

use super::{MatchedRoute, Program, RouteError, prefix_text};

/// An address of the host, on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    pub interface: String,
    /// The address with its prefix length.
    pub address: IpNet,
    /// A secondary IPv4 address (never the kernel's default choice on its interface).
    pub secondary: bool,
}

/// An `ip rule`, as far as srcip reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub priority: u32,
    /// An `ip -6 rule`.
    pub ipv6: bool,
    /// `from PREFIX`: the rule applies only to a lookup whose source is already known.
    pub from: Option<IpNet>,
    pub to: Option<IpNet>,
    /// The table it sends a lookup to (`lookup TABLE`); `None` for other actions.
    pub table: Option<u32>,
    pub ip_protocol: Option<u8>,
    pub dst_ports: Option<RangeInclusive<u16>>,
    /// `fwmark MARK/MASK`: the rule applies when the program's mark agrees with MARK on
    /// the bits of MASK.
    pub fwmark: Option<(u32, u32)>,
    /// `uidrange FIRST-LAST`: the rule applies to programs of these uids.
    pub uid_range: Option<RangeInclusive<u32>>,
    /// `iif`, `oif`, source ports: selectors a check cannot know the audited program's
    /// value of.
    pub other_selectors: bool,
    /// `not`: the rule applies when its selectors do not match.
    pub inverted: bool,
    /// As `ip rule` prints it, for messages.
    pub text: String,
}

/// The host's routing state that predictions refer to.
#[derive(Debug, Clone, Default)]
pub struct HostRouting {
    pub addresses: Vec<HostAddress>,
    pub rules: Vec<PolicyRule>,
    /// The destination prefix of every route of every table, both families.
    routes: Vec<IpNet>,
    interfaces: HashMap<u32, String>,
}

impl HostRouting {
    pub(super) async fn read(handle: &rtnetlink::Handle) -> Result<Self, RouteError> {
        let dump = |what| move |source| RouteError::Dump { what, source };
        let mut interfaces = HashMap::new();
        let mut links = handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(dump("interfaces"))? {
            let name = link
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                });
            if let Some(name) = name {
                interfaces.insert(link.header.index, name);
            }
        }
        let mut addresses = Vec::new();
        let mut dumped = handle.address().get().execute();
        while let Some(message) = dumped.try_next().await.map_err(dump("addresses"))? {
            let ip = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    // IFA_LOCAL is the host's own address on point-to-point links; IFA_ADDRESS
                    // is the peer's there, and the same as IFA_LOCAL elsewhere.
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
            let ip = ip.or_else(|| {
                message
                    .attributes
                    .iter()
                    .find_map(|attribute| match attribute {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
            });
            let (Some(ip), Some(interface)) = (ip, interfaces.get(&message.header.index)) else {
                continue;
            };
            let Ok(address) = IpNet::new(ip, message.header.prefix_len) else {
                continue;
            };
            addresses.push(HostAddress {
                interface: interface.clone(),
                address,
                secondary: message.header.flags.contains(AddressHeaderFlags::Secondary),
            });
        }
        let mut rules = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut dumped = handle.rule().get(version).execute();
            while let Some(message) = dumped.try_next().await.map_err(dump("policy rules"))? {
                rules.push(PolicyRule::from_message(&message));
            }
        }
        rules.sort_by_key(|rule| rule.priority);
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            // No destination: a dump, of every table.
            let mut message = RouteMessage::default();
            message.header.address_family = family;
            let mut dumped = handle.route().get(message).execute();
            while let Some(message) = dumped.try_next().await.map_err(dump("routes"))? {
                routes.extend(route_prefix(&message));
            }
        }
        Ok(Self {
            addresses,
            rules,
            routes,
            interfaces,
        })
    }

    /// Whether the source predicted for one address of `prefix`, by the route `matched`,
    /// is the source the kernel chooses for every address of it, every port and every
    /// program that binds no source, sets no mark and names no device: `matched` covers
    /// the whole prefix with one next hop, no route of any table and no policy rule's `to`
    /// lies inside it, and no policy rule selects by uid, mark, protocol, port, interface
    /// or TOS. `block` refuses at `connect()` on such a prediction only; every other
    /// connection is judged on the packet it sends.
    pub fn predicts_whole(&self, prefix: IpNet, matched: Option<&MatchedRoute>) -> bool {
        let Some(matched) = matched else {
            return false;
        };
        let inside = |net: &IpNet| net.prefix_len() > prefix.prefix_len() && prefix.contains(net);
        !matched.multipath
            && matched.prefix.contains(&prefix)
            && !self.routes.iter().any(inside)
            && !self.rules.iter().any(|rule| {
                rule.uid_range.is_some()
                    || rule.fwmark.is_some()
                    || rule.ip_protocol.is_some()
                    || rule.dst_ports.is_some()
                    || rule.other_selectors
                    || rule.to.as_ref().is_some_and(inside)
            })
    }

    pub fn interface_name(&self, index: u32) -> Option<String> {
        self.interfaces.get(&index).cloned()
    }

    /// Whether `ip` is an address of this host.
    pub fn owns(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|host| host.address.addr() == ip)
    }
}

impl PolicyRule {
    fn from_message(message: &RuleMessage) -> Self {
        let header = &message.header;
        let mut rule = Self {
            priority: 0,
            ipv6: header.family == AddressFamily::Inet6,
            from: None,
            to: None,
            table: None,
            ip_protocol: None,
            dst_ports: None,
            fwmark: None,
            uid_range: None,
            other_selectors: false,
            inverted: header.flags.contains(RuleFlags::Invert),
            text: String::new(),
        };
        let mut table = u32::from(header.table);
        // The kernel's defaults: a mark without a mask compares every bit.
        let (mut mark, mut mask) = (None, None);
        for attribute in &message.attributes {
            match attribute {
                RuleAttribute::Priority(priority) => rule.priority = *priority,
                RuleAttribute::Source(ip) => rule.from = IpNet::new(*ip, header.src_len).ok(),
                RuleAttribute::Destination(ip) => rule.to = IpNet::new(*ip, header.dst_len).ok(),
                RuleAttribute::Table(id) => table = *id,
                RuleAttribute::IpProtocol(protocol) => {
                    rule.ip_protocol = Some(u8::from(*protocol));
                }
                RuleAttribute::DestinationPortRange(range) => {
                    rule.dst_ports = Some(range.start..=range.end);
                }
                RuleAttribute::FwMark(value) => mark = Some(*value),
                RuleAttribute::FwMask(value) => mask = Some(*value),
                RuleAttribute::UidRange(range) => rule.uid_range = Some(range.start..=range.end),
                RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::SourcePortRange(_) => rule.other_selectors = true,
                _ => {}
            }
        }
        // `tos`: a program may set its own.
        if header.tos != 0 {
            rule.other_selectors = true;
        }
        if mark.is_some() || mask.is_some() {
            rule.fwmark = Some((mark.unwrap_or(0), mask.unwrap_or(u32::MAX)));
        }
        if header.action == RuleAction::ToTable {
            rule.table = Some(table);
        }
        rule.text = rule.describe();
        rule
    }

    /// `PRIORITY: [not] from X to Y ipproto P dport N lookup T`, as `ip rule` prints it.
    fn describe(&self) -> String {
        let mut text = format!("{}:", self.priority);
        if self.inverted {
            text.push_str(" not");
        }
        let from = self.from.map_or_else(|| "all".to_owned(), prefix_text);
        text.push_str(&format!(" from {from}"));
        if let Some(to) = self.to {
            text.push_str(&format!(" to {}", prefix_text(to)));
        }
        match self.fwmark {
            Some((mark, u32::MAX)) => text.push_str(&format!(" fwmark {mark:#x}")),
            Some((mark, mask)) => text.push_str(&format!(" fwmark {mark:#x}/{mask:#x}")),
            None => {}
        }
        if let Some(uids) = &self.uid_range {
            text.push_str(&format!(" uidrange {}-{}", uids.start(), uids.end()));
        }
        if let Some(protocol) = self.ip_protocol {
            let name = match i32::from(protocol) {
                libc::IPPROTO_TCP => "tcp".to_owned(),
                libc::IPPROTO_UDP => "udp".to_owned(),
                other => other.to_string(),
            };
            text.push_str(&format!(" ipproto {name}"));
        }
        if let Some(ports) = &self.dst_ports {
            if ports.start() == ports.end() {
                text.push_str(&format!(" dport {}", ports.start()));
            } else {
                text.push_str(&format!(" dport {}-{}", ports.start(), ports.end()));
            }
        }
        match self.table {
            Some(table) => text.push_str(&format!(" lookup {}", super::table_name(table))),
            None => text.push_str(" (no lookup)"),
        }
        text
    }

    pub fn family_matches(&self, dst: IpAddr) -> bool {
        self.ipv6 == dst.is_ipv6()
    }

    /// Whether the rule's selectors match a lookup for `dst` with protocol and port, made
    /// by `program` before it has bound a source.
    pub fn matches_unbound(
        &self,
        dst: IpAddr,
        protocol: Option<u8>,
        dst_port: Option<u16>,
        program: Program,
    ) -> bool {
        let selected = self.from.is_none()
            && !self.other_selectors
            && self
                .fwmark
                .is_none_or(|(mark, mask)| (mark ^ program.mark) & mask == 0)
            && self
                .uid_range
                .as_ref()
                .is_none_or(|uids| uids.contains(&program.effective_uid()))
            && self.to.is_none_or(|to| to.contains(&dst))
            && self
                .ip_protocol
                .is_none_or(|wanted| protocol == Some(wanted))
            && self
                .dst_ports
                .as_ref()
                .is_none_or(|ports| dst_port.is_some_and(|port| ports.contains(&port)));
        selected != self.inverted
    }
}

/// A dumped route's destination prefix (a default route has no destination attribute).
fn route_prefix(message: &RouteMessage) -> Option<IpNet> {
    let destination = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        });
    let address = destination.unwrap_or(match message.header.address_family {
        AddressFamily::Inet6 => IpAddr::from([0u16; 8]),
        _ => IpAddr::from([0u8; 4]),
    });
    IpNet::new(address, message.header.destination_prefix_length)
        .ok()
        .map(|net| net.trunc())
}

#[cfg(test)]
impl HostRouting {
    /// A host with `addresses` (`INTERFACE ADDRESS/LEN`) and `rules`, for tests.
    pub fn for_tests(addresses: &[&str], rules: Vec<PolicyRule>) -> Self {
        let addresses = addresses
            .iter()
            .map(|entry| {
                let (interface, address) = entry.split_once(' ').unwrap();
                HostAddress {
                    interface: interface.to_owned(),
                    address: address.parse().unwrap(),
                    secondary: false,
                }
            })
            .collect();
        Self {
            addresses,
            rules,
            routes: Vec::new(),
            interfaces: HashMap::new(),
        }
    }

    /// The same host with routes to these prefixes, in some table.
    pub fn with_routes(mut self, routes: &[&str]) -> Self {
        self.routes = routes.iter().map(|route| route.parse().unwrap()).collect();
        self
    }
}

#[cfg(test)]
impl PolicyRule {
    /// `PRIORITY: from FROM lookup TABLE` of IPv4, for tests.
    pub fn source_keyed(priority: u32, from: &str, table: u32) -> Self {
        let mut rule = Self {
            priority,
            ipv6: false,
            from: Some(from.parse().unwrap()),
            to: None,
            table: Some(table),
            ip_protocol: None,
            dst_ports: None,
            fwmark: None,
            uid_range: None,
            other_selectors: false,
            inverted: false,
            text: String::new(),
        };
        rule.text = rule.describe();
        rule
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::route::RouteType;

    use super::*;

    fn matched(prefix: &str) -> MatchedRoute {
        MatchedRoute {
            prefix: prefix.parse().unwrap(),
            kind: RouteType::Unicast,
            gateway: None,
            oif: None,
            pref_src: None,
            table: super::super::MAIN_TABLE,
            multipath: false,
        }
    }

    #[test]
    fn a_prediction_holds_for_a_prefix_only_when_nothing_routes_part_of_it_apart() {
        let host = HostRouting::for_tests(&[], Vec::new()).with_routes(&[
            "0.0.0.0/0",
            "198.51.100.60/32",
            "203.0.113.0/24",
        ]);
        let default = matched("0.0.0.0/0");
        let whole = |prefix: &str, route: &MatchedRoute| {
            host.predicts_whole(prefix.parse().unwrap(), Some(route))
        };
        // A more specific route inside the /24 gives part of it another source.
        assert!(!whole("198.51.100.0/24", &default));
        assert!(whole("198.51.100.50/32", &default));
        assert!(whole("192.0.2.0/24", &default));
        // The matched route must cover the whole prefix.
        assert!(!whole("192.0.2.0/24", &matched("192.0.2.0/25")));
        // Several next hops: no one source.
        let multipath = MatchedRoute {
            multipath: true,
            ..default.clone()
        };
        assert!(!whole("192.0.2.0/24", &multipath));
        assert!(!host.predicts_whole("192.0.2.0/24".parse().unwrap(), None));
        // A rule that routes programs apart by uid: no one prediction for all of them.
        let mut by_uid = PolicyRule::source_keyed(100, "0.0.0.0/0", 100);
        by_uid.from = None;
        by_uid.uid_range = Some(1000..=1000);
        let host = HostRouting::for_tests(&[], vec![by_uid]).with_routes(&["0.0.0.0/0"]);
        assert!(!host.predicts_whole("198.51.100.50/32".parse().unwrap(), Some(&default)));
    }
}
