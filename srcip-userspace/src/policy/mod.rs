//! The policy: which source addresses are allowed for which destinations.
//!
//! `parse` turns a TOML file into a validated [`Policy`] (every error with its line and
//! column), `resolve` turns host names into addresses (again when their records expire), and `matcher` compiles the result
//! into prefix tables and decides each connection. The compiled tables are flat (one
//! longest-prefix lookup, then a short ordered candidate list) so the same layout can later
//! be written to kernel LPM-trie maps for in-kernel decisions.

mod kernel;
mod matcher;
mod parse;
mod resolve;

use std::{fmt, net::IpAddr, path::PathBuf, sync::Arc};

use ipnet::IpNet;

pub use kernel::KernelTables;
pub use matcher::{ConnectionKey, Decision, Matcher};
pub use parse::{load, parse};
pub use resolve::{Answers, HostNames, NameChange, ResolvConfError};

/// A single address prints as the address, as the user wrote it; a prefix as CIDR.
pub fn display_net(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Ignore,
    Alert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the kernel and rtnetlink take it.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => srcip_common::record::IPPROTO_TCP,
            Self::Udp => srcip_common::record::IPPROTO_UDP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// The `protocol` key of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolSelector {
    Only(Protocol),
    Any,
}

impl ProtocolSelector {
    pub fn includes(self, protocol: Protocol) -> bool {
        match self {
            Self::Only(only) => only == protocol,
            Self::Any => true,
        }
    }

    fn overlaps(self, other: Self) -> bool {
        match (self, other) {
            (Self::Only(a), Self::Only(b)) => a == b,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Alert,
    Block,
    Pin,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Block => "block",
            Self::Pin => "pin",
        }
    }
}

/// An inclusive port range; a single port is `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    fn overlaps(self, other: Self) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// 1-based line and column in the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Prefix(IpNet),
    /// A host name, resolved when the policy is loaded for `run`.
    Host(String),
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Shared with every alert about the rule.
    pub name: Arc<str>,
    pub destinations: Vec<(Destination, Location)>,
    /// `None`: every port.
    pub ports: Option<Vec<PortRange>>,
    pub protocol: ProtocolSelector,
    pub allowed_sources: Vec<IpNet>,
    /// `allowed_sources` as alerts write them (`display_net`), made once.
    pub allowed_sources_text: Arc<[String]>,
    pub action: Action,
    /// With `action = "pin"`: the first allowed source of each family (an address) and where
    /// the file names it. The kernel binds connections of that family to it.
    pub pin_sources: Vec<(IpAddr, Location)>,
}

impl Rule {
    pub fn allows_source(&self, source: IpAddr) -> bool {
        self.allowed_sources.iter().any(|net| net.contains(&source))
    }

    pub fn includes_port(&self, port: u16) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|range| range.contains(port)))
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub path: PathBuf,
    pub unmatched: Unmatched,
    pub rules: Vec<Rule>,
}

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub location: Location,
    pub message: String,
}

/// Why a policy could not be used. Every variant is the operator's to fix in the file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("{}: cannot read the policy file", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Printed as one `FILE:LINE:COL: message` line per error.
    #[error("{}", InvalidLines { path, errors })]
    Invalid {
        path: PathBuf,
        errors: Vec<PolicyError>,
    },
}

struct InvalidLines<'a> {
    path: &'a PathBuf,
    errors: &'a [PolicyError],
}

impl fmt::Display for InvalidLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            let Location { line, column } = error.location;
            write!(
                f,
                "{}:{line}:{column}: {}",
                self.path.display(),
                error.message
            )?;
        }
        Ok(())
    }
}
