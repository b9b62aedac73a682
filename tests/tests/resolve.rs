//! Host names in the policy are resolved again when their records expire: a partner that
//! moves its service to a new address is audited there without a reload, and an address it
//! left stays audited for `--keep-resolved`, then leaves the policy.
//!
//! The name server is a real dnsmasq in the partner's namespace, answering with a TTL of
//! one second; srcip reaches it through `--resolv-conf`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use srcip_tests::{
    Daemon, LINE_TIMEOUT, Line, OTHER_V4, PolicyFile, TestCgroup, Topology, check_in_with,
    connection_line, dns::NameServer, ip_in, nft_in, run,
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

/// A daemon with `--all` in the topology's host namespace, auditing `cgroup`, asking `dns`.
fn audit_by_name(
    topology: &Topology,
    policy: &PolicyFile,
    cgroup: &TestCgroup,
    dns: &NameServer,
    extra: &[&str],
) -> Daemon {
    let mut args = vec![
        "--all",
        "--cgroup",
        cgroup.path.to_str().unwrap(),
        "--resolv-conf",
        dns.resolv_conf.to_str().unwrap(),
    ];
    args.extend(extra);
    Daemon::start_in(&topology.host, &policy.path, &args)
}

/// Connects from the source the policy does not allow and returns the verdict and rule of
/// the daemon's one line for it (`--all`).
fn verdict_of_connection(
    daemon: &mut Daemon,
    topology: &Topology,
    cgroup: &TestCgroup,
    dst: &str,
) -> (String, Option<String>) {
    let line = connection_line(
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
    // Long enough for the checks below on an emulated VM; short for the test.
    let mut daemon = audit_by_name(
        &topology,
        &policy,
        &cgroup,
        &dns,
        &["--keep-resolved", "10s"],
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

/// New answers that would make the policy invalid (the name moves onto an address another
/// rule claims for the same port) are refused with a `policy_error`: the addresses in force
/// stay, and the name is asked again only after a pause, not at each expiry of its
/// one-second records, which would repeat the error every second.
#[test]
fn answers_that_would_make_the_policy_invalid_leave_the_addresses_in_force() {
    let topology = Topology::new();
    let dns = NameServer::start(&topology.partner, "203.0.113.1", NAME, &[FIRST], 1);
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(&format!(
        "{POLICY}\n[[rule]]\nname = \"moved-by-address\"\ndestinations = [\"{MOVED}\"]\nports = [443]\nprotocol = \"tcp\"\nallowed_sources = [\"203.0.113.10\"]\n"
    ));
    let mut daemon = audit_by_name(&topology, &policy, &cgroup, &dns, &[]);

    dns.change(NAME, &[MOVED]);
    let refused = daemon.wait_for("the refused answers", |line| {
        matches!(line, Line::PolicyError { .. })
    });
    let Line::PolicyError { errors, .. } = refused else {
        unreachable!()
    };
    assert!(
        errors.iter().any(|error| error.contains(&format!(
            "rules \"partner-by-name\" and \"moved-by-address\" can both match {MOVED}/32"
        ))),
        "{errors:#?}"
    );
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, FIRST),
        violation_of_rule(),
        "the name's address in force stays"
    );
    let again = daemon.wait_at_most(Duration::from_secs(5), "a second policy_error", |line| {
        matches!(line, Line::PolicyError { .. })
    });
    assert!(again.is_none(), "asked again at once: {again:?}");
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

#[test]
fn a_stop_signal_while_a_name_server_is_silent_stops_the_daemon_at_once() {
    let topology = Topology::new();
    let _dns = NameServer::start(&topology.partner, "203.0.113.1", NAME, &[FIRST], 1);
    // The same server, waited for far longer than the daemon may take to stop.
    let patient = tempfile::tempdir().unwrap();
    let resolv_conf = patient.path().join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        "nameserver 203.0.113.1\noptions timeout:60 attempts:1\n",
    )
    .unwrap();
    let policy = PolicyFile::new(POLICY);
    let daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &["--resolv-conf", resolv_conf.to_str().unwrap()],
    );
    // The server falls silent: the daemon's next lookup (its answer expires within a
    // second) waits for an answer that never comes.
    nft_in(
        &topology.partner.name,
        "add table inet silent; \
         add chain inet silent input { type filter hook input priority 0; }; \
         add rule inet silent input udp dport 53 counter drop",
    );
    let deadline = Instant::now() + LINE_TIMEOUT;
    while dropped_queries(&topology.partner.name) == 0 {
        assert!(Instant::now() < deadline, "srcip asked no name server");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{status:?}");
    assert!(
        matches!(lines.last(), Some(Line::Stopped { .. })),
        "{lines:#?}"
    );
}

/// Datagrams to port 53 the `silent` table of `namespace` dropped.
fn dropped_queries(namespace: &str) -> u64 {
    let output = run(
        "ip",
        &[
            "netns", "exec", namespace, "nft", "list", "chain", "inet", "silent", "input",
        ],
    );
    let listing = String::from_utf8_lossy(&output.stdout);
    listing
        .split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|count| count.parse().ok())
        .expect("the drop rule's counter")
}
