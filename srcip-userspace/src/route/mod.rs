//! What the kernel would do now for a connection to a destination: which route, table,
//! output interface, gateway and source address, as `ip route get` shows it, read over
//! rtnetlink. `srcip check` and the daemon's drift watch (`drift.rs`) ask here.
//!
//! A prediction takes two route lookups. The plain one is the kernel's own answer for a
//! connection: the source it would choose (`RTA_PREFSRC` of the reply), the interface, the
//! gateway and the table. The second, with `RTM_F_FIB_MATCH`, returns the route entry that
//! matched, so that `reason` can name it and say whether it carries a `src` of its own. The
//! lookups carry the protocol and destination port when the policy rule names them, so that
//! `ip rule ... ipproto tcp dport 443` policy routing is honoured as it is for the program's
//! connection, and the program's uid and mark where srcip knows them (`uidrange` and
//! `fwmark` rules).

mod explain;
mod fix;
mod host;

use std::{io, net::IpAddr};

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType},
};

pub use explain::{reason, unprotecting_rules};
pub use fix::{Fix, fixes};
pub use host::{HostRouting, PolicyRule};

use crate::policy::Protocol;

/// The table `ip` calls `main`.
pub const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot open a netlink socket to ask the kernel for routes: {0}")]
    Connect(io::Error),
    #[error("the kernel did not answer a route lookup for {dst}: {source}")]
    Lookup {
        dst: IpAddr,
        source: rtnetlink::Error,
    },
    #[error("cannot read the host's {what} over netlink: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
}

/// A connection as the kernel would route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub dst: IpAddr,
    /// Given when the policy rule names one protocol, or ports (then TCP unless UDP).
    pub protocol: Option<Protocol>,
    pub dst_port: Option<u16>,
    pub program: Program,
}

/// Who makes the connection, as policy routing sees it: `uidrange` and `fwmark` rules
/// select on these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Program {
    /// `None`: the uid of whoever asks (srcip, or the user running `check`), which is what
    /// the kernel takes for a lookup without one.
    pub uid: Option<u32>,
    /// The socket's mark (`SO_MARK`); 0 for a program that sets none.
    pub mark: u32,
}

impl Program {
    /// The uid the kernel matches `uidrange` rules against for this program.
    pub fn effective_uid(self) -> u32 {
        self.uid.unwrap_or_else(own_uid)
    }

    /// Whether policy routing sees this program as it sees srcip (same uid, no mark): its
    /// predictions are srcip's own.
    pub fn is_srcip(self) -> bool {
        self.effective_uid() == own_uid() && self.mark == 0
    }
}

/// srcip's uid, read once.
fn own_uid() -> u32 {
    static OWN_UID: std::sync::LazyLock<u32> =
        std::sync::LazyLock::new(|| nix::unistd::getuid().as_raw());
    *OWN_UID
}

/// The kernel's answer for a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prediction {
    /// The source address the kernel would choose; `None` when it has no route.
    pub src: Option<IpAddr>,
    pub oif: Option<String>,
    pub gateway: Option<IpAddr>,
    pub table: Option<u32>,
    /// The route entry that matched.
    pub route: Option<MatchedRoute>,
    /// Why there is no route (`Network is unreachable`), when there is none.
    pub unreachable: Option<String>,
}

/// A route entry as `ip route` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchedRoute {
    pub prefix: IpNet,
    pub kind: RouteType,
    pub gateway: Option<IpAddr>,
    pub oif: Option<String>,
    /// The route's own `src`, when it has one.
    pub pref_src: Option<IpAddr>,
    pub table: u32,
    /// Several next hops (ECMP): the source may differ from one connection to the next.
    pub multipath: bool,
}

/// A netlink connection for route lookups and dumps; clones share it.
#[derive(Clone)]
pub struct Router {
    handle: rtnetlink::Handle,
}

impl Router {
    /// Opens the connection; its driver runs on the current tokio runtime.
    pub fn new() -> Result<Self, RouteError> {
        // The plain connection: with strict checking on, the kernel refuses a route lookup
        // whose header carries the table or type the request builder sets.
        let (connection, handle, _) = rtnetlink::new_connection().map_err(RouteError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The kernel's route and source for `query` now. `host` names interfaces.
    pub async fn predict(
        &self,
        query: &Query,
        host: &HostRouting,
    ) -> Result<Prediction, RouteError> {
        let resolved = match self.lookup(query, false).await {
            Ok(reply) => reply,
            Err(rtnetlink::Error::NetlinkError(error)) if error.code.is_some() => {
                return Ok(Prediction {
                    src: None,
                    oif: None,
                    gateway: None,
                    table: None,
                    route: None,
                    unreachable: Some(error.to_io().to_string()),
                });
            }
            Err(source) => {
                return Err(RouteError::Lookup {
                    dst: query.dst,
                    source,
                });
            }
        };
        let matched = self
            .lookup(query, true)
            .await
            .map_err(|source| RouteError::Lookup {
                dst: query.dst,
                source,
            })?;
        let attributes = Attributes::of(&resolved);
        Ok(Prediction {
            src: attributes.pref_src,
            oif: attributes.oif.and_then(|index| host.interface_name(index)),
            gateway: attributes.gateway,
            table: Some(attributes.table.unwrap_or(u32::from(resolved.header.table))),
            route: Some(MatchedRoute::from_reply(&matched, host)),
            unreachable: None,
        })
    }

    /// Addresses, interfaces and policy rules of the host now.
    pub async fn host(&self) -> Result<HostRouting, RouteError> {
        HostRouting::read(&self.handle).await
    }

    async fn lookup(
        &self,
        query: &Query,
        fib_match: bool,
    ) -> Result<RouteMessage, rtnetlink::Error> {
        let mut message = RouteMessage::default();
        let (family, length) = match query.dst {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        message.header.address_family = family;
        message.header.destination_prefix_length = length;
        // Without LookupTable, an IPv4 reply names table main whichever table answered.
        message.header.flags = if fib_match {
            RouteFlags::LookupTable | RouteFlags::FibMatch
        } else {
            RouteFlags::LookupTable
        };
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(query.dst)));
        if let Some(protocol) = query.protocol {
            message
                .attributes
                .push(RouteAttribute::IpProto(protocol.number()));
        }
        if let Some(port) = query.dst_port {
            message.attributes.push(RouteAttribute::Dport(port));
        }
        if let Some(uid) = query.program.uid {
            message.attributes.push(RouteAttribute::Uid(uid));
        }
        if query.program.mark != 0 {
            message
                .attributes
                .push(RouteAttribute::Mark(query.program.mark));
        }
        let mut replies = self.handle.route().get(message).execute();
        replies
            .try_next()
            .await?
            .ok_or(rtnetlink::Error::RequestFailed)
    }
}

impl MatchedRoute {
    fn from_reply(reply: &RouteMessage, host: &HostRouting) -> Self {
        let attributes = Attributes::of(reply);
        let unspecified = match reply.header.address_family {
            AddressFamily::Inet6 => IpAddr::from([0u16; 8]),
            _ => IpAddr::from([0u8; 4]),
        };
        let prefix = IpNet::new(
            attributes.destination.unwrap_or(unspecified),
            reply.header.destination_prefix_length,
        )
        .unwrap_or_else(|_| IpNet::from(unspecified));
        Self {
            prefix: prefix.trunc(),
            kind: reply.header.kind,
            gateway: attributes.gateway,
            oif: attributes.oif.and_then(|index| host.interface_name(index)),
            pref_src: attributes.pref_src,
            table: attributes.table.unwrap_or(u32::from(reply.header.table)),
            multipath: attributes.multipath,
        }
    }
}

/// The attributes of a route message srcip reads.
#[derive(Default)]
struct Attributes {
    destination: Option<IpAddr>,
    gateway: Option<IpAddr>,
    pref_src: Option<IpAddr>,
    oif: Option<u32>,
    table: Option<u32>,
    multipath: bool,
}

impl Attributes {
    fn of(message: &RouteMessage) -> Self {
        let address = |address: &RouteAddress| match address {
            RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
            RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
            _ => None,
        };
        let mut found = Self::default();
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(destination) => {
                    found.destination = address(destination)
                }
                RouteAttribute::Gateway(gateway) => found.gateway = address(gateway),
                RouteAttribute::PrefSource(source) => found.pref_src = address(source),
                RouteAttribute::Oif(index) => found.oif = Some(*index),
                RouteAttribute::Table(table) => found.table = Some(*table),
                RouteAttribute::MultiPath(hops) => found.multipath = hops.len() > 1,
                _ => {}
            }
        }
        found
    }
}

/// How `ip` names a routing table.
pub fn table_name(table: u32) -> String {
    match table {
        MAIN_TABLE => "main".to_owned(),
        253 => "default".to_owned(),
        255 => "local".to_owned(),
        other => other.to_string(),
    }
}

/// A prefix as `ip` prints it: a single address without its length.
pub fn prefix_text(prefix: IpNet) -> String {
    if prefix.prefix_len() == prefix.max_prefix_len() {
        prefix.addr().to_string()
    } else if prefix.prefix_len() == 0 {
        "default".to_owned()
    } else {
        prefix.to_string()
    }
}
