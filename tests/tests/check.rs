//! `srcip check`: the source the kernel would choose now for every destination of a policy,
//! why, and a fix that works, in namespaces of the test's own.

use serde_json::Value;
use srcip_tests::{
    ALLOWED_V4, OTHER_V4, PARTNER_POLICY, PARTNER_V4, PolicyFile, Topology, ask_in, check_in,
    check_in_with, ip_in, shell_in,
};

fn row_for<'a>(rows: &'a [Value], dst: &str) -> &'a Value {
    rows.iter()
        .find(|row| row["dst"] == dst)
        .unwrap_or_else(|| panic!("no row for {dst}: {rows:#?}"))
}

#[test]
fn a_route_with_a_wrong_src_fails_check_and_its_first_fix_makes_it_pass() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);

    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 0, "{rows:#?}");
    let before = row_for(&rows, PARTNER_V4);
    assert_eq!(before["predicted_src"], ALLOWED_V4);
    assert_eq!(before["compliant"], true);
    assert_eq!(
        before["reason"],
        "no src on the route default via 203.0.113.1 dev v0 in table main; the kernel took the first primary address of v0"
    );
    // The IPv6 prefix is checked with a representative address, and the route's src named.
    let v6 = row_for(&rows, "2001:db8:50::1");
    assert_eq!(v6["destination"], "2001:db8:50::/64");
    assert_eq!(v6["predicted_src"], "2001:db8::10");
    assert_eq!(
        v6["reason"],
        "route default via 2001:db8::1 dev v0 src 2001:db8::10 in table main"
    );

    topology.route_partner_via_other_source();
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 3, "{rows:#?}");
    let after = row_for(&rows, PARTNER_V4);
    assert_eq!(after["compliant"], false);
    assert_eq!(after["predicted_src"], OTHER_V4);
    assert_eq!(after["oif"], "v0");
    assert_eq!(after["gateway"], "203.0.113.1");
    assert_eq!(
        after["reason"],
        "route 198.51.100.50 via 203.0.113.1 dev v0 src 203.0.113.11 in table main"
    );
    let fix = after["fix"][0].as_str().unwrap();
    assert!(
        fix.starts_with("ip route replace 198.51.100.50 via 203.0.113.1 dev v0 src 203.0.113.10"),
        "{fix}"
    );
    assert!(
        after["fix"]
            .as_array()
            .unwrap()
            .iter()
            .all(|fix| !fix.as_str().unwrap().contains("rule add from")),
        "a fix must never be a source-keyed rule: {after:#?}"
    );

    shell_in(&topology.host, fix);
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(
        code, 0,
        "the first fix, run as printed, did not fix it: {rows:#?}"
    );
    assert_eq!(row_for(&rows, PARTNER_V4)["predicted_src"], ALLOWED_V4);
}

/// The second remedy, destination-keyed policy routing, is two entries, each one complete
/// command (no `&&` chain that stops half-way); pasted in order into `sh` they make `check`
/// pass, for an IPv6 destination too (`ip -6 rule`, which `ip rule` without `-6` refuses).
#[test]
fn the_policy_routing_fix_runs_as_printed_in_both_families() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    topology.route_partner_via_other_source();
    ip_in(
        &topology.host.name,
        "-6 route replace 2001:db8:50::/64 via 2001:db8::1 src 2001:db8::11",
    );
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 3, "{rows:#?}");
    for dst in [PARTNER_V4, "2001:db8:50::1"] {
        let row = row_for(&rows, dst);
        let fixes: Vec<&str> = row["fix"]
            .as_array()
            .unwrap()
            .iter()
            .map(|fix| fix.as_str().unwrap())
            .collect();
        assert!(fixes.iter().all(|fix| !fix.contains("&&")), "{fixes:#?}");
        assert!(fixes[1].contains(" table "), "{fixes:#?}");
        assert!(fixes[2].contains(" rule add to "), "{fixes:#?}");
        shell_in(&topology.host, fixes[1]);
        shell_in(&topology.host, fixes[2]);
    }
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(
        code, 0,
        "the policy-routing fix, run as printed, did not fix it: {rows:#?}"
    );
    assert_eq!(
        row_for(&rows, "2001:db8:50::1")["predicted_src"],
        "2001:db8::10"
    );
}

/// Two rules on one destination that want different sources (TCP 8080 from .11, UDP 5353
/// from .10): a route for the whole destination would suit one and undo the other, run after
/// run. The fix is policy routing keyed by protocol and port, in a table of each rule's own;
/// run as printed, it makes `check` pass in one round, and the other rule stays compliant.
#[test]
fn two_rules_on_one_destination_get_fixes_that_converge_in_one_round() {
    let topology = Topology::new();
    let policy = PolicyFile::new(&format!(
        r#"
[[rule]]
name = "api"
destinations = ["{PARTNER_V4}"]
ports = [8080]
protocol = "tcp"
allowed_sources = ["{OTHER_V4}"]

[[rule]]
name = "dns"
destinations = ["{PARTNER_V4}"]
ports = [5353]
protocol = "udp"
allowed_sources = ["{ALLOWED_V4}"]
"#
    ));
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 3, "{rows:#?}");
    let api = rows.iter().find(|row| row["rule"] == "api").unwrap();
    let dns = rows.iter().find(|row| row["rule"] == "dns").unwrap();
    assert_eq!(
        (&api["compliant"], &dns["compliant"]),
        (&Value::Bool(false), &Value::Bool(true)),
        "{rows:#?}"
    );
    let commands: Vec<&str> = api["fix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|fix| fix.as_str().unwrap())
        .filter(|fix| !fix.starts_with('#'))
        .collect();
    assert!(
        commands
            .iter()
            .any(|command| command.contains("ipproto tcp dport 8080 lookup")),
        "{commands:#?}"
    );
    assert!(
        !commands
            .iter()
            .any(|command| command.starts_with("ip route replace") && !command.contains(" table ")),
        "a route for the whole destination would undo the other rule: {commands:#?}"
    );
    for command in &commands {
        shell_in(&topology.host, command);
    }
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 0, "one round did not converge: {rows:#?}");
}

#[test]
fn a_destination_keyed_rule_with_src_in_another_table_is_honoured_and_named() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    ip_in(
        &topology.host.name,
        "route add 198.51.100.0/24 via 203.0.113.1 src 203.0.113.11 table 100",
    );
    ip_in(
        &topology.host.name,
        "rule add to 198.51.100.0/24 lookup 100 priority 100",
    );

    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 3, "{rows:#?}");
    let row = row_for(&rows, PARTNER_V4);
    assert_eq!(row["predicted_src"], OTHER_V4);
    assert_eq!(row["table"], "100");
    assert_eq!(
        row["reason"],
        "route 198.51.100.0/24 via 203.0.113.1 dev v0 src 203.0.113.11 in table 100; table 100 by rule \"100: from all to 198.51.100.0/24 lookup 100\""
    );
    // The fix writes into the table the lookup goes to.
    let fix = row["fix"][0].as_str().unwrap();
    shell_in(&topology.host, fix);
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 0, "{fix} did not fix it: {rows:#?}");
}

#[test]
fn a_source_keyed_rule_is_reported_as_not_protecting_the_unbound_program() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    topology.route_partner_via_other_source();
    // The seed's "proper" fix: it steers only traffic already bound to .10.
    ip_in(
        &topology.host.name,
        "route add default via 203.0.113.1 src 203.0.113.10 table 200",
    );
    ip_in(
        &topology.host.name,
        "rule add from 203.0.113.10 lookup 200 priority 200",
    );

    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 3, "{rows:#?}");
    let row = row_for(&rows, PARTNER_V4);
    assert_eq!(row["predicted_src"], OTHER_V4);
    let warnings = row["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{row:#?}");
    assert_eq!(
        warnings[0],
        "ip rule \"200: from 203.0.113.10 lookup 200\" does not protect 198.51.100.50: it applies only to connections already bound to 203.0.113.10; a program that does not bind gets 203.0.113.11 from table main"
    );
}

#[test]
fn a_port_keyed_rule_is_honoured_for_a_rule_with_that_port() {
    let topology = Topology::new();
    let policy = PolicyFile::new(
        r#"
[[rule]]
name = "partner-https"
destinations = ["198.51.100.50"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.10"]

[[rule]]
name = "partner-http"
destinations = ["198.51.100.50"]
ports = [80]
protocol = "tcp"
allowed_sources = ["203.0.113.10"]
"#,
    );
    ip_in(
        &topology.host.name,
        "route add default via 203.0.113.1 src 203.0.113.11 table 300",
    );
    ip_in(
        &topology.host.name,
        "rule add ipproto tcp dport 443 lookup 300 priority 300",
    );

    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 3, "{rows:#?}");
    let https = rows
        .iter()
        .find(|row| row["rule"] == "partner-https")
        .unwrap();
    assert_eq!(
        (https["dst_port"].as_u64(), https["protocol"].as_str()),
        (Some(443), Some("tcp"))
    );
    assert_eq!(https["predicted_src"], OTHER_V4);
    assert_eq!(https["table"], "300");
    let http = rows
        .iter()
        .find(|row| row["rule"] == "partner-http")
        .unwrap();
    assert_eq!(http["predicted_src"], ALLOWED_V4);
    assert_eq!(http["compliant"], true);
}

#[test]
fn host_names_are_resolved_and_local_destinations_explained() {
    let topology = Topology::new();
    let policy = PolicyFile::new(
        r#"
[[rule]]
name = "local"
destinations = ["localhost"]
allowed_sources = ["127.0.0.1", "::1"]
"#,
    );
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 0, "{rows:#?}");
    let row = row_for(&rows, "127.0.0.1");
    assert_eq!(row["predicted_src"], "127.0.0.1");
    assert_eq!(
        row["reason"],
        "127.0.0.1 is an address of this host (route 127.0.0.1 in table local)"
    );
}

#[test]
fn uid_and_mark_keyed_rules_are_honoured_for_the_program_given() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    let host = &topology.host.name;
    ip_in(
        host,
        "route add 198.51.100.50 via 203.0.113.1 src 203.0.113.11 table 100",
    );
    ip_in(host, "rule add priority 100 uidrange 4242-4242 lookup 100");
    ip_in(host, "rule add priority 101 fwmark 0x7 lookup 100");

    // As the user running check, with no mark: neither rule applies.
    let (code, rows) = check_in(&topology.host, &policy.path);
    assert_eq!(code, 0, "{rows:#?}");
    assert_eq!(row_for(&rows, PARTNER_V4)["predicted_src"], ALLOWED_V4);

    let (code, rows) = check_in_with(&topology.host, &policy.path, &["--uid", "4242"]);
    assert_eq!(code, 3, "{rows:#?}");
    let row = row_for(&rows, PARTNER_V4);
    assert_eq!(row["uid"], 4242);
    assert_eq!(row["predicted_src"], OTHER_V4);
    assert_eq!(row["table"], "100");
    assert_eq!(
        row["reason"],
        "route 198.51.100.50 via 203.0.113.1 dev v0 src 203.0.113.11 in table 100; table 100 by rule \"100: from all uidrange 4242-4242 lookup 100\""
    );

    let (code, rows) = check_in_with(&topology.host, &policy.path, &["--mark", "0x7"]);
    assert_eq!(code, 3, "{rows:#?}");
    let row = row_for(&rows, PARTNER_V4);
    assert_eq!(row["mark"], 7);
    assert_eq!(row["predicted_src"], OTHER_V4);
    assert_eq!(
        row["reason"],
        "route 198.51.100.50 via 203.0.113.1 dev v0 src 203.0.113.11 in table 100; table 100 by rule \"101: from all fwmark 0x7 lookup 100\""
    );
    // The first fix, for that program, works for it.
    let fix = row["fix"][0].as_str().unwrap().to_owned();
    shell_in(&topology.host, &fix);
    let (code, rows) = check_in_with(&topology.host, &policy.path, &["--mark", "0x7"]);
    assert_eq!(code, 0, "after {fix}: {rows:#?}");
}

/// One destination, asked about with no policy: which source the kernel would choose for
/// that port and protocol, by which route and why; with `--from`, whether that source would
/// be used (exit 3 when not), and a fix that, run as printed, makes it so.
#[test]
fn one_destination_is_asked_about_without_a_policy() {
    let topology = Topology::new();
    ip_in(
        &topology.host.name,
        "route add default via 203.0.113.1 src 203.0.113.11 table 300",
    );
    ip_in(
        &topology.host.name,
        "rule add ipproto tcp dport 443 lookup 300 priority 300",
    );

    let (code, rows) = ask_in(&topology.host, &["198.51.100.50:443/tcp"]);
    assert_eq!((code, rows.len()), (0, 1), "{rows:#?}");
    let https = &rows[0];
    assert_eq!(
        (
            https["dst_port"].as_u64(),
            https["protocol"].as_str(),
            https["predicted_src"].as_str(),
            https["table"].as_str()
        ),
        (Some(443), Some("tcp"), Some(OTHER_V4), Some("300")),
        "{https:#}"
    );
    assert_eq!(https["allowed_sources"], serde_json::json!([]));
    assert_eq!(https["fix"], serde_json::json!([]));
    let (_, rows) = ask_in(&topology.host, &["198.51.100.50:80/tcp"]);
    assert_eq!(rows[0]["predicted_src"], ALLOWED_V4, "{rows:#?}");
    let (_, rows) = ask_in(&topology.host, &["[2001:db8:50::50]:443"]);
    assert_eq!(rows[0]["predicted_src"], "2001:db8::10", "{rows:#?}");

    let (code, rows) = ask_in(
        &topology.host,
        &["198.51.100.50:443/tcp", "--from", OTHER_V4],
    );
    assert_eq!((code, &rows[0]["compliant"]), (0, &Value::Bool(true)));
    let (code, rows) = ask_in(
        &topology.host,
        &["198.51.100.50:443/tcp", "--from", ALLOWED_V4],
    );
    assert_eq!(
        (code, &rows[0]["compliant"]),
        (3, &Value::Bool(false)),
        "{rows:#?}"
    );
    let fix = rows[0]["fix"][0].as_str().expect("a fix").to_owned();
    shell_in(&topology.host, &fix);
    let (code, rows) = ask_in(
        &topology.host,
        &["198.51.100.50:443/tcp", "--from", ALLOWED_V4],
    );
    assert_eq!(code, 0, "after `{fix}`: {rows:#?}");

    for wrong in [
        &["198.51.100.0/24"][..],
        &["198.51.100.50:https"],
        &["--from", ALLOWED_V4],
        &["198.51.100.50", "--policy", "/etc/srcip/policy.toml"],
    ] {
        let (code, rows) = ask_in(&topology.host, wrong);
        assert_eq!((code, rows.len()), (2, 0), "{wrong:?}");
    }
}
