//! The alert stream: what `srcip run` writes to stdout.
//!
//! # Format
//! `json`: one object per line. Every line has `type`, `time` (RFC 3339, UTC, microseconds)
//! and `host`. Types: `started`, `violation`, `connect` (with `--all`), `reloaded`,
//! `policy_error`, `lost`, `stopped`, `pinned` (a connection srcip bound to its `pin` rule's
//! source).
//! Connection lines carry `rule` (null when no rule matched), `action`, `protocol`,
//! `family` (on the wire), `src`, `wire_src` (null unless this host translated `src`),
//! `src_port`, `dst`, `dst_port`, `allowed_sources`, `pid`, `comm`, `uid`, `cgroup_id`, `cgroup` (relative to the cgroup2 mount; null when the cgroup
//! is gone), `netns` (inode; null when the namespace is gone) and `verdict` (`compliant`,
//! `violation` or `unmatched`); a violation of a `block` rule adds `blocked`, `blocked_at` when
//! it was, and `predicted` when the refused source was predicted, not bound. `lost` has `count`. `started` adds `version`, `policy`,
//! `rules`, `cgroups` (the audited cgroups, empty for all), `kernel` (the release) and
//! `degraded` (what srcip cannot report here, and why; empty when all works). `reloaded` has
//! `policy` and `rules`, `policy_error` `policy` and `errors`. `resolved` (a host name of the
//! policy stands for other addresses after its records expired) has `name`, `rules`,
//! `addresses` (in force now), `added` and `removed`. `stopped` adds
//! `decided_in_kernel`: connections the kernel found needed no report.
//!
//! `text`: the same content, one readable line per alert, for a terminal.

use std::{
    io::{self, Write},
    net::IpAddr,
    sync::Arc,
    time::SystemTime,
};

use serde::Serialize;

use crate::{check::DestinationCheck, events::Comm, output::Format};

mod connection_json;
use connection_json::write_connection_line;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AlertBody {
    Started {
        version: &'static str,
        policy: String,
        rules: usize,
        cgroups: Vec<String>,
        /// The kernel release.
        kernel: String,
        /// What srcip cannot do here and which fields that affects; empty when all works.
        degraded: Vec<String>,
    },
    Violation(ConnectionReport),
    /// A connection of a `pin` rule that srcip bound to the rule's source.
    Pinned(ConnectionReport),
    Connect(ConnectionReport),
    Lost {
        count: u64,
        /// The sink that lost them, when one did (its queue or spool was full); absent when
        /// they were lost between the kernel and srcip.
        #[serde(skip_serializing_if = "Option::is_none")]
        sink: Option<String>,
    },
    /// A network sink's receiver refused alerts for good (an HTTP 4xx, a message too large):
    /// they went to the spool's dead-letter table, and the sink went on with the next.
    /// Never sent to that sink.
    DeadLetter {
        /// The sink, named without secrets.
        sink: String,
        count: u64,
        /// The receiver's answer.
        error: String,
    },
    /// The kernel would now choose a disallowed source for a destination of the policy.
    RouteDrift(DestinationCheck),
    /// A destination that drifted is allowed again.
    RouteRecovered(DestinationCheck),
    /// The policy file was read again (SIGHUP, or the file changed) and is now in force.
    Reloaded {
        policy: String,
        rules: usize,
    },
    /// A reload was refused; the policy in force stays. `errors`: each located message.
    PolicyError {
        policy: String,
        errors: Vec<String>,
    },
    /// A host name of the policy, asked again when its records expired, now stands for
    /// other addresses; they are in force.
    Resolved {
        name: String,
        /// The rules that name it.
        rules: Vec<Arc<str>>,
        addresses: Vec<IpAddr>,
        added: Vec<IpAddr>,
        removed: Vec<IpAddr>,
    },
    Stopped {
        /// Connections the kernel found compliant (or unmatched and ignored) and so never
        /// sent to user space.
        decided_in_kernel: u64,
    },
}

impl AlertBody {
    /// The line's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::Violation(_) => "violation",
            Self::Pinned(_) => "pinned",
            Self::Connect(_) => "connect",
            Self::Lost { .. } => "lost",
            Self::DeadLetter { .. } => "dead_letter",
            Self::RouteDrift(_) => "route_drift",
            Self::RouteRecovered(_) => "route_recovered",
            Self::Reloaded { .. } => "reloaded",
            Self::PolicyError { .. } => "policy_error",
            Self::Resolved { .. } => "resolved",
            Self::Stopped { .. } => "stopped",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionReport {
    /// Shared with the rule: a line costs no copy of it.
    pub rule: Option<Arc<str>>,
    pub action: &'static str,
    pub protocol: &'static str,
    pub family: &'static str,
    pub src: IpAddr,
    /// The source on the wire when address translation on this host changed `src`; the
    /// policy judged this one.
    pub wire_src: Option<IpAddr>,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub allowed_sources: Arc<[String]>,
    pub pid: u32,
    pub comm: Comm,
    pub uid: u32,
    pub cgroup_id: u64,
    pub cgroup: Option<Arc<str>>,
    pub netns: Option<u64>,
    /// The systemd unit and the container the cgroup belongs to, when its path names them.
    pub unit: Option<Arc<str>>,
    pub container: Option<Arc<str>>,
    pub verdict: Verdict,
    /// On a violation whose source is the one the kernel is predicted to choose for its
    /// destination (not bound by the program, not translated): why the kernel chose it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Arc<str>>,
    /// On a violation of a `block` rule: whether the kernel refused it. `false` only when
    /// the kernel could not decide the rule (more ports, sources or overlapping rules than
    /// it holds, docs/design.md) and the connection left before user space judged it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<bool>,
    /// On a blocked violation: where the kernel stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_at: Option<BlockedAt>,
    /// On a violation of a `pin` rule: why it was not pinned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_error: Option<Arc<str>>,
    /// On a blocked connection whose program bound no source: `src` is the source the
    /// routing tables would have given it, as predicted, not one it left with.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub predicted: bool,
    /// Set on a folded `violation`: the repeats it stands for.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub folded: Option<Folded>,
}

/// Where `block` stopped a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockedAt {
    /// At `connect()` or `sendmsg()`, with EPERM: its source was known exactly there.
    Connect,
    /// Its first packet, on the source it carried: a UDP sender gets EPERM, a TCP
    /// `connect()` times out.
    Egress,
}

impl BlockedAt {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Egress => "egress",
        }
    }
}

/// Repeats of a violation written as one line when their window closed.
#[derive(Debug, Clone, Serialize)]
pub struct Folded {
    /// How many connections the line stands for.
    pub count: u64,
    /// RFC 3339 times of the first and the last of them.
    pub first_time: String,
    pub last_time: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Compliant,
    Violation,
    Unmatched,
}

impl Verdict {
    /// As lines write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Compliant => "compliant",
            Self::Violation => "violation",
            Self::Unmatched => "unmatched",
        }
    }
}

impl Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Alert {
    pub time: SystemTime,
    pub body: AlertBody,
}

impl Alert {
    pub fn now(body: AlertBody) -> Self {
        Self {
            time: SystemTime::now(),
            body,
        }
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    #[serde(flatten)]
    body: &'a AlertBody,
    time: Rfc3339,
    host: &'a str,
}

/// A time written as RFC 3339 straight into the line, without a string of its own.
struct Rfc3339(SystemTime);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

/// One alert as the JSON object of its line (no newline), for sinks that frame alerts
/// themselves.
pub fn json_object(alert: &Alert, host: &str) -> Vec<u8> {
    let mut object = Vec::new();
    write_json(&mut object, alert, host);
    object
}

/// Appends `alert`'s JSON object (no newline) to `out`. Connection lines, the ones `--all`
/// writes for every connection, have an encoder of their own (`connection_json`).
fn write_json(out: &mut Vec<u8>, alert: &Alert, host: &str) {
    let body = &alert.body;
    match body {
        AlertBody::Violation(report) | AlertBody::Pinned(report) | AlertBody::Connect(report) => {
            write_connection_line(out, body.type_name(), report, alert.time, host);
        }
        _ => serde_json::to_writer(
            out,
            &JsonLine {
                body,
                time: Rfc3339(alert.time),
                host,
            },
        )
        .expect("alerts serialize into memory: their fields are strings, numbers and addresses"),
    }
}

/// The host name every JSON line carries.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Writes alerts one line each. A batch goes out in one write: a violation is never held
/// back, and `--all` on a busy host does not cost a system call per line.
pub struct AlertWriter<W: Write> {
    format: Format,
    host: String,
    out: W,
    /// The batch's lines, kept between batches so that its memory is reused.
    lines: Vec<u8>,
}

impl<W: Write> AlertWriter<W> {
    pub fn new(format: Format, host: String, out: W) -> Self {
        Self {
            format,
            host,
            out,
            lines: Vec::with_capacity(64 * 1024),
        }
    }

    /// Writes `alerts` and flushes them.
    pub fn write_batch<'a>(
        &mut self,
        alerts: impl IntoIterator<Item = &'a Alert>,
    ) -> io::Result<()> {
        self.lines.clear();
        for alert in alerts {
            match self.format {
                Format::Json => write_json(&mut self.lines, alert, &self.host),
                Format::Text => self.lines.extend_from_slice(text_line(alert).as_bytes()),
            }
            self.lines.push(b'\n');
        }
        self.out.write_all(&self.lines)?;
        self.out.flush()
    }

    /// What it writes to (after `write_batch`, everything written has reached it).
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// As `get_ref`; for writers into memory, to take what was written.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

/// One readable line, for terminals and the demo.
pub fn text_line(alert: &Alert) -> String {
    format!("{} {}", rfc3339(alert.time), text_message(&alert.body))
}

/// The readable line without its time, for formats that carry the time apart (syslog).
pub fn text_message(body: &AlertBody) -> String {
    match body {
        AlertBody::Started {
            policy,
            rules,
            cgroups,
            kernel,
            degraded,
            ..
        } => {
            let scope = if cgroups.is_empty() {
                "every process".to_owned()
            } else {
                format!("cgroups {}", cgroups.join(", "))
            };
            let degraded = if degraded.is_empty() {
                String::new()
            } else {
                format!("; degraded: {}", degraded.join("; "))
            };
            format!(
                "started: policy {policy} ({rules} rules), auditing {scope} on Linux {kernel}{degraded}"
            )
        }
        AlertBody::Violation(report) if report.blocked == Some(true) => {
            let at = report.blocked_at.map_or("", |at| match at {
                BlockedAt::Connect => " at connect",
                BlockedAt::Egress => " at egress",
            });
            format!("VIOLATION BLOCKED{at} {}", connection_text(report))
        }
        AlertBody::Violation(report) => format!("VIOLATION {}", connection_text(report)),
        AlertBody::Pinned(report) => format!("pinned {}", connection_text(report)),
        AlertBody::Connect(report) => format!(
            "connect ({}) {}",
            report.verdict.as_str(),
            connection_text(report)
        ),
        AlertBody::Lost { count, sink: None } => {
            format!("LOST {count} events between the kernel and srcip")
        }
        AlertBody::Lost {
            count,
            sink: Some(sink),
        } => format!("LOST {count} alerts that sink {sink} could not take"),
        AlertBody::DeadLetter { sink, count, error } => format!(
            "DEAD LETTER {count} alerts that sink {sink} refused for good ({error}), kept in its spool"
        ),
        AlertBody::RouteDrift(check) => format!(
            "ROUTE DRIFT {}, allowed: {}; {}; fix: {}",
            prediction_text(check),
            check.allowed_sources.join(", "),
            check.reason,
            check.fix.first().map_or("-", String::as_str)
        ),
        AlertBody::RouteRecovered(check) => {
            format!(
                "route recovered {}; {}",
                prediction_text(check),
                check.reason
            )
        }
        AlertBody::Reloaded { policy, rules } => {
            format!("reloaded: policy {policy} ({rules} rules) is in force")
        }
        AlertBody::PolicyError { policy, errors } => format!(
            "POLICY ERROR: {policy} was not loaded, the previous policy stays in force: {}",
            errors.join("; ")
        ),
        AlertBody::Resolved {
            name,
            addresses,
            added,
            removed,
            ..
        } => format!(
            "resolved: {name} now stands for {} (added: {}; removed: {})",
            addresses_text(addresses),
            addresses_text(added),
            addresses_text(removed)
        ),
        AlertBody::Stopped { decided_in_kernel } => {
            format!("stopped ({decided_in_kernel} connections were found compliant in the kernel)")
        }
    }
}

/// `rule NAME: the kernel would choose SRC for DESTINATION (DST)`.
fn prediction_text(check: &DestinationCheck) -> String {
    let source = check
        .predicted_src
        .map_or_else(|| "no source".to_owned(), |src| src.to_string());
    format!(
        "rule {}: the kernel would choose {source} for {} ({})",
        check.rule, check.destination, check.dst
    )
}

fn connection_text(report: &ConnectionReport) -> String {
    let endpoint = |address: IpAddr, port: u16| match address {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    let folded = report.folded.as_ref().map_or_else(String::new, |folded| {
        format!(
            " count={} first={} last={}",
            folded.count, folded.first_time, folded.last_time
        )
    });
    let wire = report
        .wire_src
        .map_or_else(String::new, |wire| format!(" (on the wire {wire})"));
    let names: String = [("unit", &report.unit), ("container", &report.container)]
        .iter()
        .filter_map(|(key, value)| Some(format!(" {key}={}", escape(value.as_deref()?))))
        .collect();
    // Last: it is a sentence, written by srcip, not a field a process chooses.
    let reason = report
        .reason
        .as_ref()
        .map_or_else(String::new, |reason| format!("; reason: {reason}"));
    format!(
        "rule={} {} {}{wire} -> {} allowed=[{}] pid={} comm={} uid={} cgroup={} netns={}{names}{folded}{reason}",
        report.rule.as_deref().unwrap_or("-"),
        report.protocol,
        endpoint(report.src, report.src_port),
        endpoint(report.dst, report.dst_port),
        report.allowed_sources.join(","),
        report.pid,
        escape(&report.comm),
        report.uid,
        report.cgroup.as_deref().map_or("?".into(), escape),
        report
            .netns
            .map_or_else(|| "?".to_owned(), |inode| inode.to_string()),
    )
}

/// A process chooses its own name, and cgroup names are chosen by whoever creates them, so
/// neither may forge a line or a field: control characters, backslashes and spaces are
/// written as escapes (`\n`, `\\`, `\x20`, …).
fn escape(field: &str) -> std::borrow::Cow<'_, str> {
    let needs_escape = |c: char| c.is_control() || c == '\\' || c == ' ';
    if !field.contains(needs_escape) {
        return field.into();
    }
    let mut escaped = String::with_capacity(field.len() + 8);
    for c in field.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\\' => escaped.push_str("\\\\"),
            c if needs_escape(c) => escaped.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

/// Addresses for a text line: comma-separated, `-` for none.
fn addresses_text(addresses: &[IpAddr]) -> String {
    if addresses.is_empty() {
        return "-".to_owned();
    }
    addresses
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn violation() -> Alert {
        Alert {
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456),
            body: AlertBody::Violation(ConnectionReport {
                rule: Some("partner".into()),
                action: "alert",
                protocol: "tcp",
                family: "ipv6",
                src: "2001:db8::11".parse().unwrap(),
                wire_src: None,
                src_port: 40000,
                dst: "2001:db8:50::50".parse().unwrap(),
                dst_port: 443,
                allowed_sources: vec!["2001:db8::10".to_owned()].into(),
                reason: None,
                blocked: None,
                blocked_at: None,
                pin_error: None,
                predicted: false,
                pid: 42,
                comm: "curl".into(),
                uid: 0,
                cgroup_id: 7,
                cgroup: Some("/system.slice/payments.service".into()),
                netns: None,
                unit: Some("payments.service".into()),
                container: None,
                verdict: Verdict::Violation,
                folded: None,
            }),
        }
    }

    #[test]
    fn text_lines_are_readable_and_complete() {
        assert_eq!(
            text_line(&violation()),
            "2025-11-24T16:00:00.123456Z VIOLATION rule=partner tcp [2001:db8::11]:40000 -> \
             [2001:db8:50::50]:443 allowed=[2001:db8::10] pid=42 comm=curl uid=0 \
             cgroup=/system.slice/payments.service netns=? unit=payments.service"
        );
    }

    #[test]
    fn text_fields_cannot_forge_lines_or_fields() {
        assert_eq!(escape("curl"), "curl");
        assert_eq!(escape("a\nVIOLATION"), "a\\nVIOLATION");
        assert_eq!(escape("x uid=0"), "x\\x20uid=0");
        assert_eq!(escape("back\\slash\r\u{1b}"), "back\\\\slash\\r\\x1b");
    }

    /// The connection encoder writes what serde writes for the same alert, byte for byte.
    #[test]
    fn connection_lines_are_what_serde_would_write() {
        let plain = match violation().body {
            AlertBody::Violation(report) => report,
            _ => unreachable!(),
        };
        let everything = ConnectionReport {
            rule: Some("quote \" and \\ and \n".into()),
            wire_src: Some("198.51.100.7".parse().unwrap()),
            allowed_sources: vec!["10.0.0.1".to_owned(), "10.0.0.0/8".to_owned()].into(),
            comm: "tab\there \u{1b}é".into(),
            netns: Some(4_026_531_840),
            container: Some("0123abcd".into()),
            verdict: Verdict::Violation,
            reason: Some("route 198.51.100.0/24 via \"x\"".into()),
            blocked: Some(true),
            blocked_at: Some(BlockedAt::Egress),
            pin_error: Some("the socket was \"bound\"".into()),
            predicted: true,
            folded: Some(Folded {
                count: 12,
                first_time: "2025-11-24T16:00:00.000001Z".into(),
                last_time: "2025-11-24T16:00:09.999999Z".into(),
            }),
            ..plain.clone()
        };
        let unmatched = ConnectionReport {
            rule: None,
            cgroup: None,
            unit: None,
            verdict: Verdict::Unmatched,
            blocked: Some(false),
            allowed_sources: Vec::new().into(),
            ..plain.clone()
        };
        let compliant = ConnectionReport {
            verdict: Verdict::Compliant,
            // IPv4 is written by hand: zeros and every width of octet.
            src: "0.10.100.255".parse().unwrap(),
            dst: "255.0.9.0".parse().unwrap(),
            ..plain.clone()
        };
        let bodies = [
            AlertBody::Violation(plain.clone()),
            AlertBody::Violation(everything.clone()),
            AlertBody::Pinned(everything),
            AlertBody::Connect(unmatched),
            AlertBody::Connect(compliant),
        ];
        for body in bodies {
            let alert = Alert {
                time: violation().time,
                body,
            };
            // Byte for byte: the same fields, values, escapes and order.
            let ours = String::from_utf8(json_object(&alert, "web \"1\"")).unwrap();
            let serde = serde_json::to_string(&JsonLine {
                body: &alert.body,
                time: Rfc3339(alert.time),
                host: "web \"1\"",
            })
            .unwrap();
            assert_eq!(ours, serde);
        }
    }

    #[test]
    fn json_lines_carry_type_time_and_host() {
        let line = serde_json::to_value(JsonLine {
            body: &violation().body,
            time: Rfc3339(violation().time),
            host: "web-1",
        })
        .unwrap();
        assert_eq!(line["type"], "violation");
        assert_eq!(line["time"], "2025-11-24T16:00:00.123456Z");
        assert_eq!(line["host"], "web-1");
        assert_eq!(line["netns"], serde_json::Value::Null);
        assert_eq!(line["src"], "2001:db8::11");
        assert!(line["wire_src"].is_null(), "wire_src is always present");
    }
}
