//! The JSON line of a connection alert (`violation`, `pinned`, `connect`), written field by
//! field. With `--all` a busy host writes one per connection; serde's generic path (an
//! internally tagged enum flattened into the line: every key escaped, every field through a
//! map serializer, a write call per token) took 40 % of srcip's CPU there
//! (docs/BENCHMARKS.md). Here keys and srcip's own words (`action`, `verdict`, ...) are
//! constants written as they are, numbers go through `itoa`, and only what comes from
//! outside (command names, paths, rule names, the host name) is escaped, by serde_json. The
//! fields are those serde writes for the same alert, in the same order; a test holds them
//! equal.

use std::{io::Write as _, net::IpAddr, time::SystemTime};

use super::ConnectionReport;

/// Appends the line (without its newline) for `report`, of type `type_name`, to `out`.
pub fn write_connection_line(
    out: &mut Vec<u8>,
    type_name: &str,
    report: &ConnectionReport,
    time: SystemTime,
    host: &str,
) {
    constant(out, "{\"type\":\"", type_name, "\"");
    out.extend_from_slice(b",\"rule\":");
    optional_string(out, report.rule.as_deref());
    constant(out, ",\"action\":\"", report.action, "\"");
    constant(out, ",\"protocol\":\"", report.protocol, "\"");
    constant(out, ",\"family\":\"", report.family, "\"");
    out.extend_from_slice(b",\"src\":");
    address(out, report.src);
    out.extend_from_slice(b",\"wire_src\":");
    match report.wire_src {
        Some(wire_src) => address(out, wire_src),
        None => out.extend_from_slice(b"null"),
    }
    number(out, ",\"src_port\":", report.src_port);
    out.extend_from_slice(b",\"dst\":");
    address(out, report.dst);
    number(out, ",\"dst_port\":", report.dst_port);
    out.extend_from_slice(b",\"allowed_sources\":[");
    for (index, source) in report.allowed_sources.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        string(out, source);
    }
    out.push(b']');
    number(out, ",\"pid\":", report.pid);
    out.extend_from_slice(b",\"comm\":");
    string(out, &report.comm);
    number(out, ",\"uid\":", report.uid);
    number(out, ",\"cgroup_id\":", report.cgroup_id);
    out.extend_from_slice(b",\"cgroup\":");
    optional_string(out, report.cgroup.as_deref());
    out.extend_from_slice(b",\"netns\":");
    match report.netns {
        Some(netns) => number(out, "", netns),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"unit\":");
    optional_string(out, report.unit.as_deref());
    out.extend_from_slice(b",\"container\":");
    optional_string(out, report.container.as_deref());
    constant(out, ",\"verdict\":\"", report.verdict.as_str(), "\"");
    if let Some(reason) = &report.reason {
        out.extend_from_slice(b",\"reason\":");
        string(out, reason);
    }
    if let Some(blocked) = report.blocked {
        out.extend_from_slice(if blocked {
            b",\"blocked\":true"
        } else {
            b",\"blocked\":false"
        });
    }
    if let Some(blocked_at) = report.blocked_at {
        constant(out, ",\"blocked_at\":\"", blocked_at.as_str(), "\"");
    }
    if let Some(pin_error) = &report.pin_error {
        out.extend_from_slice(b",\"pin_error\":");
        string(out, pin_error);
    }
    if report.predicted {
        out.extend_from_slice(b",\"predicted\":true");
    }
    if let Some(folded) = &report.folded {
        number(out, ",\"count\":", folded.count);
        out.extend_from_slice(b",\"first_time\":");
        string(out, &folded.first_time);
        out.extend_from_slice(b",\"last_time\":");
        string(out, &folded.last_time);
    }
    // Formatting into a Vec cannot fail.
    let _ = write!(
        out,
        ",\"time\":\"{}\"",
        humantime::format_rfc3339_micros(time)
    );
    out.extend_from_slice(b",\"host\":");
    string(out, host);
    out.push(b'}');
}

/// `before`, `value`, `after`: for srcip's own words, which need no escaping.
fn constant(out: &mut Vec<u8>, before: &str, value: &str, after: &str) {
    out.extend_from_slice(before.as_bytes());
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(after.as_bytes());
}

fn number(out: &mut Vec<u8>, key: &str, value: impl itoa::Integer) {
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// An address, quoted: its text has no character JSON escapes.
fn address(out: &mut Vec<u8>, address: IpAddr) {
    out.push(b'"');
    match address {
        // Four numbers through `itoa`: `Display` went through the formatting machinery, a
        // tenth of srcip's CPU under `--all`.
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
            }
        }
        // Formatting into a Vec cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
    out.push(b'"');
}

/// A string from outside srcip, quoted and escaped.
fn string(out: &mut Vec<u8>, value: &str) {
    serde_json::to_writer(&mut *out, value).expect("a string serializes into memory");
}

fn optional_string(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => string(out, value),
        None => out.extend_from_slice(b"null"),
    }
}
