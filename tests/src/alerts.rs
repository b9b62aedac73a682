//! The alert stream's schema as the tests hold srcip to it: unknown fields fail the
//! deserialization, so any drift from docs/reference.md fails a test.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Line {
    Started {
        time: String,
        host: String,
        version: String,
        policy: String,
        rules: u64,
        cgroups: Vec<String>,
        kernel: String,
        degraded: Vec<String>,
    },
    Violation(Connection),
    Pinned(Connection),
    Connect(Connection),
    RouteDrift(RouteCheck),
    RouteRecovered(RouteCheck),
    Reloaded {
        time: String,
        host: String,
        policy: String,
        rules: u64,
    },
    PolicyError {
        time: String,
        host: String,
        policy: String,
        errors: Vec<String>,
    },
    Lost {
        time: String,
        host: String,
        count: u64,
        /// The sink that lost them; absent for records lost between the kernel and srcip.
        #[serde(default)]
        sink: Option<String>,
    },
    DeadLetter {
        time: String,
        host: String,
        sink: String,
        count: u64,
        error: String,
    },
    Resolved {
        time: String,
        host: String,
        name: String,
        rules: Vec<String>,
        addresses: Vec<String>,
        added: Vec<String>,
        removed: Vec<String>,
    },
    Stopped {
        time: String,
        host: String,
        decided_in_kernel: u64,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    pub time: String,
    pub host: String,
    pub rule: Option<String>,
    pub action: String,
    pub protocol: String,
    pub family: String,
    pub src: String,
    /// Required, unlike the folding fields: with `deserialize_with` serde does not default
    /// a missing `Option` to `None`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub wire_src: Option<String>,
    pub src_port: u16,
    pub dst: String,
    pub dst_port: u16,
    pub allowed_sources: Vec<String>,
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub netns: Option<u64>,
    pub unit: Option<String>,
    pub container: Option<String>,
    pub verdict: String,
    /// On a violation whose source the kernel chose as predicted: why it did.
    #[serde(default)]
    pub reason: Option<String>,
    /// On a violation of a `block` rule: whether the kernel refused it.
    #[serde(default)]
    pub blocked: Option<bool>,
    /// On a blocked violation: `connect` (EPERM at `connect()`/`sendmsg()`) or `egress`.
    #[serde(default)]
    pub blocked_at: Option<String>,
    /// On a violation of a `pin` rule: why it was not pinned.
    #[serde(default)]
    pub pin_error: Option<String>,
    /// On a blocked connection that bound no source: `src` is the predicted one.
    #[serde(default)]
    pub predicted: Option<bool>,
    /// On a folded violation: the connections it stands for, the first's and last's times.
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default)]
    pub first_time: Option<String>,
    #[serde(default)]
    pub last_time: Option<String>,
}

/// A destination's predicted source: the fields of `route_drift` and `route_recovered`
/// (and of a `srcip check --format json` row, without `time` and `host`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteCheck {
    pub time: String,
    pub host: String,
    pub rule: String,
    pub destination: String,
    pub dst: String,
    pub protocol: Option<String>,
    pub dst_port: Option<u16>,
    /// The program's uid, when the prediction was made for a program of its own.
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub mark: Option<u32>,
    pub predicted_src: Option<String>,
    pub oif: Option<String>,
    pub gateway: Option<String>,
    pub table: Option<String>,
    pub allowed_sources: Vec<String>,
    pub compliant: bool,
    pub reason: String,
    pub fix: Vec<String>,
    pub warnings: Vec<String>,
}

impl Line {
    /// The line's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::Violation(_) => "violation",
            Self::Pinned(_) => "pinned",
            Self::Connect(_) => "connect",
            Self::RouteDrift(_) => "route_drift",
            Self::RouteRecovered(_) => "route_recovered",
            Self::Reloaded { .. } => "reloaded",
            Self::PolicyError { .. } => "policy_error",
            Self::Lost { .. } => "lost",
            Self::DeadLetter { .. } => "dead_letter",
            Self::Resolved { .. } => "resolved",
            Self::Stopped { .. } => "stopped",
        }
    }

    pub fn parse(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_else(|error| {
            panic!("alert line does not match the contract ({error}): {text}")
        })
    }

    pub fn violation(&self) -> Option<&Connection> {
        match self {
            Self::Violation(connection) => Some(connection),
            _ => None,
        }
    }

    pub fn pinned(&self) -> Option<&Connection> {
        match self {
            Self::Pinned(pinned) => Some(pinned),
            _ => None,
        }
    }

    pub fn connect(&self) -> Option<&Connection> {
        match self {
            Self::Connect(connection) => Some(connection),
            _ => None,
        }
    }

    /// The connection of a `connect`, `violation` or `pinned` line: under `--all`, each
    /// connection has exactly one of them.
    pub fn connection(&self) -> Option<&Connection> {
        match self {
            Self::Connect(connection) | Self::Violation(connection) | Self::Pinned(connection) => {
                Some(connection)
            }
            _ => None,
        }
    }

    pub fn route_drift(&self) -> Option<&RouteCheck> {
        match self {
            Self::RouteDrift(check) => Some(check),
            _ => None,
        }
    }

    pub fn route_recovered(&self) -> Option<&RouteCheck> {
        match self {
            Self::RouteRecovered(check) => Some(check),
            _ => None,
        }
    }
}
