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
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use rtnetlink::IpVersion;

use super::{Program, RouteError, prefix_text};

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
        Ok(Self {
            addresses,
            rules,
            interfaces,
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
            interfaces: HashMap::new(),
        }
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
