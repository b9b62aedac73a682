//! Host names in the policy are resolved again when their records expire: a partner that
//! moves its service to a new address is audited there without a reload, and an address it
//! left stays audited for `--keep-resolved`, then leaves the policy.
//!
//! The name server is a real dnsmasq in the partner's namespace, answering with a TTL of
//! one second; srcip reaches it through `--resolv-conf`.

use srcip_tests::{
    Daemon, Line, OTHER_V4, PolicyFile, TestCgroup, Topology, check_in_with, connect_line,
    dns::NameServer, ip_in,
};

const NAME: &str = "api.partner.srcip.test";
const FIRST: &str = "198.51.100.50";
const MOVED: &str = "198.51.100.51";

const POLICY: &str = r#"
[[rule]]
name = "partner-by-name"
destinations = ["api.partner.srcip.test"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.10"]
"#;

/// Connects from the source the policy does not allow and returns the verdict and rule of
/// the daemon's `connect` line for it (`--all`).
fn verdict_of_connection(
    daemon: &mut Daemon,
    topology: &Topology,
    cgroup: &TestCgroup,
    dst: &str,
) -> (String, Option<String>) {
    let line = connect_line(
        daemon,
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        dst,
        443,
    );
    (line.verdict, line.rule)
}

fn violation_of_rule() -> (String, Option<String>) {
    ("violation".to_owned(), Some("partner-by-name".to_owned()))
}

fn unmatched() -> (String, Option<String>) {
    ("unmatched".to_owned(), None)
}

#[test]
fn a_moved_name_is_audited_at_its_new_address_and_the_old_one_leaves_after_keep_resolved() {
    let topology = Topology::new();
    ip_in(
        &topology.partner.name,
        &format!("addr add {MOVED}/32 dev lo"),
    );
    let dns = NameServer::start(&topology.partner, "203.0.113.1", NAME, &[FIRST], 1);
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(POLICY);
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &[
            "--all",
            "--cgroup",
            cgroup.path.to_str().unwrap(),
            "--resolv-conf",
            dns.resolv_conf.to_str().unwrap(),
            // Long enough for the checks below on an emulated VM; short for the test.
            "--keep-resolved",
            "10s",
        ],
    );

    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, FIRST),
        violation_of_rule(),
        "the name's address is in the policy"
    );
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, MOVED),
        unmatched(),
        "{MOVED} is not the name's address yet"
    );

    dns.change(NAME, &[MOVED]);
    let resolved = daemon.wait_for(
        "the new address in force",
        |line| matches!(line, Line::Resolved { added, .. } if added.iter().any(|a| a == MOVED)),
    );
    let Line::Resolved {
        name,
        rules,
        addresses,
        removed,
        ..
    } = resolved
    else {
        unreachable!()
    };
    assert_eq!(name, NAME);
    assert_eq!(rules, ["partner-by-name"]);
    assert_eq!(
        addresses.iter().collect::<std::collections::BTreeSet<_>>(),
        [FIRST.to_owned(), MOVED.to_owned()].iter().collect(),
        "the old address stays for --keep-resolved"
    );
    assert!(removed.is_empty(), "{removed:?}");
    // The old address first: it is the one with a deadline.
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, FIRST),
        violation_of_rule(),
        "the old address is still audited"
    );
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, MOVED),
        violation_of_rule(),
        "the new address is audited, in the kernel too"
    );

    let left = daemon.wait_for(
        "the old address leaving",
        |line| matches!(line, Line::Resolved { removed, .. } if removed.iter().any(|a| a == FIRST)),
    );
    let Line::Resolved { addresses, .. } = left else {
        unreachable!()
    };
    assert_eq!(addresses, [MOVED]);
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, FIRST),
        unmatched(),
        "{FIRST} left the policy"
    );
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, MOVED),
        violation_of_rule()
    );
}

#[test]
fn check_resolves_through_the_given_name_servers() {
    let topology = Topology::new();
    let dns = NameServer::start(&topology.partner, "203.0.113.1", NAME, &[FIRST], 60);
    let policy = PolicyFile::new(POLICY);
    let (code, rows) = check_in_with(
        &topology.host,
        &policy.path,
        &["--resolv-conf", dns.resolv_conf.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{rows:?}");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["dst"], FIRST);
    assert_eq!(rows[0]["predicted_src"], "203.0.113.10");
}
