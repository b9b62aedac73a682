//! Enforcement: `pin` binds an unmodified program in an audited cgroup to its rule's source,
//! `block` refuses a disallowed source at `connect()`, whether the program bound it or the
//! routing tables would choose it. Processes outside the audited cgroups, and everything
//! after the daemon stops, are left alone. Each test's host namespace routes the partner
//! from the disallowed address, as in the incident.

use std::{path::PathBuf, process::Command};

use srcip_tests::{
    ALLOWED_V4, ALLOWED_V6, Connection, Daemon, Line, MptcpListener, OTHER_V4, OTHER_V6,
    PARTNER_V4, PARTNER_V6, PolicyFile, Signal, TestCgroup, Topology, WaitingUdpClient,
    attempt_client, attempt_connect, attempt_udp_client, cgroup_attach_types, client, connect,
    has_mptcp, ip_in, kernel_at_least, nft_in, run, srcip_bin, udp_client, unique_name,
};

fn policy_with(action: &str) -> String {
    format!(
        r#"
[[rule]]
name = "partner"
destinations = ["198.51.100.50", "2001:db8:50::/64"]
ports = [443]
allowed_sources = ["203.0.113.10", "2001:db8::10"]
action = "{action}"
"#
    )
}

/// The incident in both families: the kernel now prefers .11 and ::11 for the partner.
fn route_partner_via_other_sources(topology: &Topology) {
    topology.route_partner_via_other_source();
    ip_in(
        &topology.host.name,
        "-6 route replace 2001:db8:50::/64 via 2001:db8::1 src 2001:db8::11",
    );
}

/// A daemon in the topology's host namespace auditing `cgroup`'s child `audited`, with the
/// partner routed from the wrong addresses. Nothing is folded: each test tells its
/// connections apart by their lines.
fn enforcing_daemon(topology: &Topology, cgroup: &TestCgroup, policy: &PolicyFile) -> Daemon {
    enforcing_daemon_with(topology, cgroup, policy, &[])
}

/// As [`enforcing_daemon`], with `extra` arguments.
fn enforcing_daemon_with(
    topology: &Topology,
    cgroup: &TestCgroup,
    policy: &PolicyFile,
    extra: &[&str],
) -> Daemon {
    route_partner_via_other_sources(topology);
    let audited = cgroup.child("audited");
    let mut args = vec!["--cgroup", audited.to_str().unwrap(), "--fold-window", "0"];
    args.extend(extra);
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &args);
    // The drift watch's first reading is in the kernel when srcip writes `started`. A `pin`
    // rule's destinations are compliant while the host has the pin sources: no drift.
    let pinning = std::fs::read_to_string(&policy.path)
        .unwrap()
        .contains("action = \"pin\"");
    if pinning {
        return daemon;
    }
    let mut drifted = Vec::new();
    while drifted.len() < 2 {
        let line = daemon.wait_for("a drift", |line| line.route_drift().is_some());
        drifted.push(line.route_drift().unwrap().destination.clone());
    }
    drifted.sort();
    assert_eq!(drifted, [PARTNER_V4, "2001:db8:50::/64"]);
    daemon
}

/// Makes the partner's namespace count the datagrams to port 443 that arrive from each of
/// `sources`: what a partner's firewall would see. The rules go with the namespace.
fn count_arrivals_at_partner(topology: &Topology, sources: &[&str]) {
    let mut commands = "add table inet arrivals; \
        add chain inet arrivals input { type filter hook input priority 0; }; "
        .to_owned();
    for source in sources {
        let family = if source.contains(':') { "ip6" } else { "ip" };
        commands += &format!(
            "add rule inet arrivals input {family} saddr {source} udp dport 443 counter; "
        );
    }
    nft_in(&topology.partner.name, &commands);
}

/// Makes the partner's namespace count the TCP SYNs to port 443 that arrive from each of
/// `sources`.
fn count_syns_at_partner(topology: &Topology, sources: &[&str]) {
    let mut commands = "add table inet syns; \
        add chain inet syns input { type filter hook input priority 0; }; "
        .to_owned();
    for source in sources {
        let family = if source.contains(':') { "ip6" } else { "ip" };
        commands += &format!(
            "add rule inet syns input {family} saddr {source} tcp dport 443 tcp flags syn counter; "
        );
    }
    nft_in(&topology.partner.name, &commands);
}

/// TCP SYNs from `source` counted since [`count_syns_at_partner`].
fn syns_counted(topology: &Topology, source: &str) -> u64 {
    counted(topology, "syns", source)
}

/// Datagrams from `source` counted since [`count_arrivals_at_partner`], once there is one:
/// a datagram sent before the host knew the partner's link address (IPv6's neighbour
/// discovery, slow while tests run in parallel) waits for it, up to a few seconds.
fn arrivals_at_partner(topology: &Topology, source: &str) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let arrived = arrivals_counted(topology, source);
        if arrived > 0 || std::time::Instant::now() > deadline {
            return arrived;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn arrivals_counted(topology: &Topology, source: &str) -> u64 {
    counted(topology, "arrivals", source)
}

/// The packets the rule for `source` of the partner's counting `table` saw.
fn counted(topology: &Topology, table: &str, source: &str) -> u64 {
    let output = run(
        "ip",
        &[
            "netns",
            "exec",
            &topology.partner.name,
            "nft",
            "list",
            "chain",
            "inet",
            table,
            "input",
        ],
    );
    let listing = String::from_utf8_lossy(&output.stdout);
    let rule = listing
        .lines()
        .find(|line| line.contains(&format!("saddr {source} ")))
        .unwrap_or_else(|| panic!("no {table} rule for {source}: {listing}"));
    let packets = rule
        .split_once("packets ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no packet count in {rule}"));
    packets.parse().expect("a packet count")
}

/// The `pinned` line of the connection from `src_port`.
fn pinned_line(daemon: &mut Daemon, src_port: u16) -> Connection {
    let line = daemon.wait_for("the pinned line", |line| {
        line.pinned()
            .is_some_and(|pinned| pinned.src_port == src_port)
    });
    line.pinned().unwrap().clone()
}

#[test]
fn pin_binds_an_unmodified_client_in_the_cgroup_and_leaves_the_others_alone() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited", "other"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");

    for (dst, pinned_src) in [(PARTNER_V4, ALLOWED_V4), (PARTNER_V6, ALLOWED_V6)] {
        let client = connect(&topology.host, &audited, None, dst, 443);
        assert_eq!(client.src, pinned_src, "the kernel bound the pin source");
        let pinned = pinned_line(&mut daemon, client.src_port);
        assert_eq!(
            (pinned.rule.as_deref(), pinned.action.as_str()),
            (Some("partner"), "pin")
        );
        assert_eq!(
            (pinned.src.as_str(), pinned.dst.as_str()),
            (pinned_src, dst)
        );
        assert_eq!(
            (pinned.pid, pinned.verdict.as_str()),
            (client.pid, "compliant")
        );
    }

    // Outside the audited cgroup the route's choice stands.
    let other = cgroup.child("other");
    assert_eq!(
        connect(&topology.host, &other, None, PARTNER_V4, 443).src,
        OTHER_V4
    );
    assert_eq!(
        connect(&topology.host, &other, None, PARTNER_V6, 443).src,
        OTHER_V6
    );
    // A program that bound a source itself keeps it, and its violation is reported.
    let bound = connect(&topology.host, &audited, Some(OTHER_V4), PARTNER_V4, 443);
    assert_eq!(bound.src, OTHER_V4);
    daemon.wait_for("the bound client's violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == bound.src_port)
    });

    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    assert!(
        lines.iter().all(|line| line
            .violation()
            .is_none_or(|violation| violation.src_port == bound.src_port)),
        "no pinned connection is a violation: {lines:#?}"
    );

    // Stopped: nothing is enforced any more.
    assert_eq!(
        connect(&topology.host, &audited, None, PARTNER_V4, 443).src,
        OTHER_V4
    );
}

#[test]
fn pin_binds_connected_udp_in_both_families() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");

    for (dst, pinned_src) in [(PARTNER_V4, ALLOWED_V4), (PARTNER_V6, ALLOWED_V6)] {
        let client = udp_client(&topology.host, &audited, &["--connect"], dst, 443);
        assert_eq!(client.src, pinned_src);
        let pinned = pinned_line(&mut daemon, client.src_port);
        assert_eq!(
            (pinned.protocol.as_str(), pinned.src.as_str()),
            ("udp", pinned_src)
        );
    }
}

#[test]
fn pin_sets_the_source_of_unconnected_udp_unless_the_program_chose_one() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");
    count_arrivals_at_partner(&topology, &[ALLOWED_V4, ALLOWED_V6]);

    for (dst, pinned_src) in [(PARTNER_V4, ALLOWED_V4), (PARTNER_V6, ALLOWED_V6)] {
        let client = udp_client(&topology.host, &audited, &[], dst, 443);
        // The packet's source as srcip saw it leave, and as the partner received it.
        assert_eq!(pinned_line(&mut daemon, client.src_port).src, pinned_src);
        assert_eq!(
            arrivals_at_partner(&topology, pinned_src),
            1,
            "from {pinned_src}"
        );
    }

    // A source the program chose per datagram (`IP_PKTINFO`) is its own: reported, kept.
    let chosen = udp_client(
        &topology.host,
        &audited,
        &["--pktinfo", OTHER_V4],
        PARTNER_V4,
        443,
    );
    let line = daemon.wait_for("the chosen source's violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == chosen.src_port)
    });
    assert_eq!(line.violation().unwrap().src, OTHER_V4);
}

#[test]
fn block_refuses_a_bound_or_predicted_wrong_source_at_once_and_lets_the_right_one_through() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited", "other"]);
    let policy = PolicyFile::new(&policy_with("block"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");

    // Bound by the program: the source is known at connect.
    let bound = attempt_connect(&topology.host, &audited, Some(OTHER_V4), PARTNER_V4, 443);
    assert_eq!(bound.error.as_deref(), Some("EPERM"));
    let line = daemon.wait_for("the blocked bound connection", |line| {
        line.violation()
            .is_some_and(|violation| violation.pid == bound.pid)
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (
            violation.action.as_str(),
            violation.blocked,
            violation.predicted
        ),
        ("block", Some(true), None)
    );
    assert_eq!(violation.src, OTHER_V4);

    // Never bound: the source the routing tables would choose, as predicted.
    for (dst, predicted) in [(PARTNER_V4, OTHER_V4), (PARTNER_V6, OTHER_V6)] {
        let client = attempt_connect(&topology.host, &audited, None, dst, 443);
        assert_eq!(client.error.as_deref(), Some("EPERM"), "to {dst}");
        let line = daemon.wait_for("the blocked predicted connection", |line| {
            line.violation()
                .is_some_and(|violation| violation.pid == client.pid)
        });
        let violation = line.violation().unwrap();
        assert_eq!(
            (
                violation.blocked,
                violation.blocked_at.as_deref(),
                violation.predicted
            ),
            (Some(true), Some("connect"), Some(true))
        );
        assert_eq!(
            (violation.src.as_str(), violation.dst.as_str()),
            (predicted, dst)
        );
        assert!(violation.reason.is_some(), "{violation:#?}");
    }

    // UDP is refused the same way: a connected socket at connect, an unconnected one per
    // datagram, whether its source is predicted or chosen with `IP_PKTINFO`.
    for options in [&["--connect"][..], &[], &["--pktinfo", OTHER_V4]] {
        let udp = attempt_udp_client(&topology.host, &audited, options, PARTNER_V4, 443);
        assert_eq!(
            udp.error.as_deref(),
            Some("EPERM"),
            "udp-client {options:?}"
        );
    }
    // The allowed source passes (`udp_client` fails the test on EPERM).
    udp_client(
        &topology.host,
        &audited,
        &["--pktinfo", ALLOWED_V4],
        PARTNER_V4,
        443,
    );

    // Compliant traffic passes, and so does everything outside the audited cgroup.
    connect(&topology.host, &audited, Some(ALLOWED_V4), PARTNER_V4, 443);
    let other = connect(
        &topology.host,
        &cgroup.child("other"),
        None,
        PARTNER_V4,
        443,
    );
    assert_eq!(other.src, OTHER_V4);

    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    // Nothing is blocked once srcip stopped: `connect` fails the test on EPERM.
    connect(&topology.host, &audited, Some(OTHER_V4), PARTNER_V4, 443);
}

/// Between a routing change and srcip's next reading of the routes (`--route-settle`, made
/// long here), the prediction in the kernel says the connection is allowed: it is not
/// refused at `connect()`, and its SYN is stopped at egress, on the source it carries.
#[test]
fn until_srcip_reads_a_routing_change_block_stops_the_wrong_source_at_egress() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("block"));
    let audited = cgroup.child("audited");
    // Wrong at start, then right again: the `route_recovered` line says that the right
    // prediction is in the kernel, however slowly the first reading came.
    topology.route_partner_via_other_source();
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &[
            "--cgroup",
            audited.to_str().unwrap(),
            "--route-settle",
            "5s",
        ],
    );
    daemon.wait_for("the drift at start", |line| line.route_drift().is_some());
    ip_in(&topology.host.name, "route del 198.51.100.50/32");
    daemon.wait_for("the recovery", |line| line.route_recovered().is_some());

    count_syns_at_partner(&topology, &[OTHER_V4]);
    topology.route_partner_via_other_source();
    let early = connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(early.src, OTHER_V4);
    let line = daemon.wait_for("the violation stopped at egress", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == early.src_port)
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (violation.blocked, violation.blocked_at.as_deref()),
        (Some(true), Some("egress"))
    );
    // Its retransmissions are stopped too: nothing from .11 reached the partner.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(syns_counted(&topology, OTHER_V4), 0);

    daemon.wait_for("the drift", |line| line.route_drift().is_some());
    let late = attempt_connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(late.error.as_deref(), Some("EPERM"));
}

#[test]
fn a_reload_from_alert_to_pin_decides_the_next_connection() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("alert"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");

    assert_eq!(
        connect(&topology.host, &audited, None, PARTNER_V4, 443).src,
        OTHER_V4
    );
    std::fs::write(&policy.path, policy_with("pin")).unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for("the reload", |line| line.kind() == "reloaded");
    let client = connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(client.src, ALLOWED_V4);
    pinned_line(&mut daemon, client.src_port);
}

#[test]
fn a_pin_source_the_host_does_not_have_is_refused_with_its_location() {
    let topology = Topology::new();
    // Scoped, so that a regression that accepted the policy would pin no one else.
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(
        "[[rule]]\nname = \"partner\"\ndestinations = [\"198.51.100.50\"]\nallowed_sources = [\"203.0.113.99\", \"203.0.113.10\"]\naction = \"pin\"\n",
    );
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.host.name))
        .arg(srcip_bin())
        .args(["run", "--cgroup"])
        .arg(&cgroup.path)
        .arg("--policy")
        .arg(&policy.path)
        .output()
        .expect("run srcip");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:4:20: action = \"pin\" binds to 203.0.113.99, which is not an address of this host",
            policy.path.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_reload_to_a_pin_source_the_host_does_not_have_is_refused_and_pin_goes_on() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);

    // Written in place: the daemon notices the change and reads the file again.
    std::fs::write(
        &policy.path,
        "[[rule]]\nname = \"partner\"\ndestinations = [\"198.51.100.50\"]\nallowed_sources = [\"203.0.113.99\", \"203.0.113.10\"]\naction = \"pin\"\n",
    )
    .unwrap();
    let refused = daemon.wait_for("the refused reload", |line| {
        matches!(line, Line::PolicyError { .. })
    });
    let Line::PolicyError { errors, .. } = refused else {
        unreachable!()
    };
    let expected = format!(
        "{}:4:20: action = \"pin\" binds to 203.0.113.99, which is not an address of this host",
        policy.path.display()
    );
    assert!(
        errors.iter().any(|error| error.starts_with(&expected)),
        "{errors:#?}"
    );

    // The policy in force still pins to .10.
    let client = connect(
        &topology.host,
        &cgroup.child("audited"),
        None,
        PARTNER_V4,
        443,
    );
    assert_eq!(client.src, ALLOWED_V4);
    pinned_line(&mut daemon, client.src_port);
}

/// A folder of the test's own on the bpf file system, for `--kept-links`; removed on drop,
/// which detaches whatever is still pinned in it.
struct KeptLinksDir(PathBuf);

impl Drop for KeptLinksDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("could not remove {}: {error}", self.0.display());
        }
    }
}

#[test]
fn keep_enforcing_pins_while_srcip_is_down_and_the_next_start_takes_it_over() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let kept = KeptLinksDir(PathBuf::from("/sys/fs/bpf").join(unique_name()));
    let kept_links = kept.0.to_str().unwrap();
    let audited = cgroup.child("audited");

    let daemon = enforcing_daemon_with(
        &topology,
        &cgroup,
        &policy,
        &["--keep-enforcing", "--kept-links", kept_links],
    );
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    // srcip is down; the kernel still pins.
    let pinned = connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(pinned.src, ALLOWED_V4, "pinned while srcip is down");
    let kept_count = std::fs::read_dir(&kept.0).unwrap().count();
    assert!(
        kept_count >= 2,
        "connect4 and connect6 are kept: {kept_count}"
    );

    // A start without the flag takes them over; once it stops, nothing is left.
    let mut daemon =
        enforcing_daemon_with(&topology, &cgroup, &policy, &["--kept-links", kept_links]);
    assert_eq!(std::fs::read_dir(&kept.0).unwrap().count(), 0);
    let taken_over = connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(taken_over.src, ALLOWED_V4, "the new run pins");
    pinned_line(&mut daemon, taken_over.src_port);
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    assert_eq!(
        std::fs::read_dir(&kept.0).unwrap().count(),
        0,
        "a run without --keep-enforcing keeps nothing"
    );
    let after = connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(after.src, OTHER_V4, "nothing is enforced any more");
}

/// A pin source that leaves the host after srcip started: `route_drift` says so before any
/// traffic, and the bind that would fail is not made to fail the connection, which leaves
/// with the route's source and is reported.
#[test]
fn a_pin_source_that_disappears_leaves_connections_working_and_reported() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");

    // Pinned while the source is there, so what follows is pin's failure, not its absence.
    let pinned = connect(&topology.host, &audited, None, PARTNER_V6, 443);
    assert_eq!(pinned.src, ALLOWED_V6);
    // IPv6: deleting the primary IPv4 address would take the secondary and the routes along.
    ip_in(&topology.host.name, "-6 addr del 2001:db8::10/64 dev v0");
    // Said before any traffic: the destination's route_drift. Once that reading is done,
    // an unconnected socket's datagram is not given the missing source either.
    let line = daemon.wait_for("the drift", |line| line.route_drift().is_some());
    let drift = line.route_drift().unwrap();
    assert_eq!(
        (drift.destination.as_str(), drift.compliant),
        ("2001:db8:50::/64", false)
    );
    assert!(
        drift
            .reason
            .starts_with("pin cannot apply: 2001:db8::10 is not an address of this host; "),
        "{drift:#?}"
    );
    let tcp = connect(&topology.host, &audited, None, PARTNER_V6, 443);
    assert_eq!(tcp.src, OTHER_V6);
    let line = daemon.wait_for("the unpinned connection's violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == tcp.src_port)
    });
    let violation = line.violation().unwrap();
    assert_eq!(violation.action, "pin");
    assert_eq!(
        violation.pin_error.as_deref(),
        Some("2001:db8::10 is not an address of this host in the socket's network namespace")
    );
    let udp = attempt_udp_client(&topology.host, &audited, &[], PARTNER_V6, 443);
    assert_eq!(udp.error, None);
    let line = daemon.wait_for("the unpinned datagram's violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == udp.src_port)
    });
    let violation = line.violation().unwrap();
    assert_eq!(violation.src, OTHER_V6);
    assert!(
        violation
            .pin_error
            .as_deref()
            .is_some_and(|error| error.contains("is not an address of this host")),
        "{violation:#?}"
    );
}

/// `srcip status` asks the live daemon what is wrong now: the destination that drifts since
/// a pin source went away, and since when; the pin that fails, with its error and count;
/// and its policy, sinks and counts, in JSON and in text.
#[test]
fn status_tells_a_drifting_destination_and_a_failing_pin() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");
    let before = daemon.status("json");
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_eq!(
        (&before["drifting"], &before["failing_pins"]),
        (&serde_json::json!([]), &serde_json::json!([])),
        "{before:#}"
    );

    ip_in(&topology.host.name, "-6 addr del 2001:db8::10/64 dev v0");
    daemon.wait_for("the drift", |line| line.route_drift().is_some());
    let tcp = connect(&topology.host, &audited, None, PARTNER_V6, 443);
    daemon.wait_for("the unpinned connection's violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == tcp.src_port)
    });

    let json = daemon.status("json");
    let now: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(now["type"], "status");
    assert_eq!(now["starting"], false);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(now["kernel"].as_str(), Some(kernel.trim()), "{now:#}");
    assert_eq!(
        (
            now["policy"]["path"].as_str(),
            &now["policy"]["revision"],
            &now["policy"]["rules"]
        ),
        (
            policy.path.to_str(),
            &serde_json::json!(1),
            &serde_json::json!(1)
        ),
        "{now:#}"
    );
    let drifting = now["drifting"].as_array().unwrap();
    assert_eq!(drifting.len(), 1, "{now:#}");
    assert_eq!(
        (
            drifting[0]["rule"].as_str(),
            drifting[0]["destination"].as_str()
        ),
        (Some("partner"), Some("2001:db8:50::/64"))
    );
    assert!(drifting[0]["since"].is_string(), "{now:#}");
    let pins = now["failing_pins"].as_array().unwrap();
    assert_eq!(pins.len(), 1, "{now:#}");
    assert_eq!(
        (
            pins[0]["rule"].as_str(),
            pins[0]["error"].as_str(),
            &pins[0]["count"]
        ),
        (
            Some("partner"),
            Some("2001:db8::10 is not an address of this host in the socket's network namespace"),
            &serde_json::json!(1)
        )
    );
    assert_eq!(now["sinks"][0]["name"], "stdout", "{now:#}");
    assert!(now["sinks"][0]["delivered"].as_u64() >= Some(3), "{now:#}");
    assert_eq!(now["counts"]["violations"], 1, "{now:#}");
    // The kernel's counters reach the daemon once a second.
    let deadline = std::time::Instant::now() + srcip_tests::DELIVERY_TIMEOUT;
    loop {
        let counts: serde_json::Value = serde_json::from_str(&daemon.status("json")).unwrap();
        let counts = &counts["counts"];
        if counts["observed"]["tcp"] == 1 && counts["pin_failures"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the connection and its pin failure were never counted: {counts:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let text = daemon.status("text");
    for expected in [
        "drifting now: 1\n",
        "failing pins: 1\n  rule partner: 1 time, last at ",
        ", revision 1, 1 rule, in force since ",
        "violations 1,",
    ] {
        assert!(text.contains(expected), "{expected:?} in {text}");
    }
}

/// A `pin` rule's violation says why srcip could not pin it: a socket bound to a port only
/// (clients that fix their source port), or one whose program chose its source.
#[test]
fn a_violation_of_a_pin_rule_says_why_it_was_not_pinned() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let policy = PolicyFile::new(&policy_with("pin"));
    let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
    let audited = cgroup.child("audited");

    let port_bound = client(
        &topology.host,
        &audited,
        &["--bind-port", "40001"],
        PARTNER_V4,
        443,
    );
    assert_eq!(port_bound[0].src, OTHER_V4);
    let line = daemon.wait_for("the port-bound violation", |line| {
        line.violation().is_some_and(|v| v.src_port == 40001)
    });
    assert_eq!(
        line.violation().unwrap().pin_error.as_deref(),
        Some("the socket was already bound to port 40001: a bound socket cannot be bound again")
    );

    let chosen = connect(&topology.host, &audited, Some(OTHER_V4), PARTNER_V4, 443);
    let line = daemon.wait_for("the chosen source's violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == chosen.src_port)
    });
    assert_eq!(
        line.violation().unwrap().pin_error.as_deref(),
        Some("the program chose its own source, 203.0.113.11, and a chosen source is kept")
    );
}

/// A `block` rule on a prefix is judged for each destination as the kernel routes it: a more
/// specific route inside the prefix gives one destination the allowed source and another
/// the wrong one. No single guess for the prefix decides: the compliant connection passes,
/// the wrong one is stopped on the source its packet carries, and the partner's side sees
/// only the compliant one.
#[test]
fn block_judges_each_destination_as_routed_never_one_guess_per_prefix() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let audited = cgroup.child("audited");
    let policy = PolicyFile::new(
        r#"
[[rule]]
name = "partner-net"
destinations = ["198.51.100.0/24"]
ports = [443]
allowed_sources = ["203.0.113.10"]
action = "block"
"#,
    );
    ip_in(&topology.partner.name, "addr add 198.51.100.60/32 dev lo");
    ip_in(
        &topology.host.name,
        "route add 198.51.100.0/24 via 203.0.113.1 src 203.0.113.11",
    );
    ip_in(
        &topology.host.name,
        "route add 198.51.100.50/32 via 203.0.113.1 src 203.0.113.10",
    );
    count_syns_at_partner(&topology, &[ALLOWED_V4, OTHER_V4]);
    count_arrivals_at_partner(&topology, &[OTHER_V4]);
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &["--cgroup", audited.to_str().unwrap(), "--fold-window", "0"],
    );
    // The prefix's first address is routed from .11: the prefix drifts, as `check` says.
    daemon.wait_for("the drift", |line| line.route_drift().is_some());

    let compliant = connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(compliant.src, ALLOWED_V4);
    let wrong = connect(&topology.host, &audited, None, "198.51.100.60", 443);
    assert_eq!(wrong.src, OTHER_V4);
    let line = daemon.wait_for("the violation stopped at egress", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == wrong.src_port)
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (violation.blocked, violation.blocked_at.as_deref()),
        (Some(true), Some("egress"))
    );
    // UDP the same way: the datagram is stopped, and its sender told at once.
    let datagram = attempt_udp_client(&topology.host, &audited, &[], "198.51.100.60", 443);
    assert_eq!(datagram.error.as_deref(), Some("EPERM"), "{datagram:?}");
    udp_client(&topology.host, &audited, &[], PARTNER_V4, 443);

    // The compliant SYN may wait for the partner's link address.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while syns_counted(&topology, ALLOWED_V4) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        syns_counted(&topology, ALLOWED_V4) >= 1,
        "the compliant SYN did not reach the partner"
    );
    assert_eq!(syns_counted(&topology, OTHER_V4), 0, "a SYN from .11 left");
    assert_eq!(
        arrivals_counted(&topology, OTHER_V4),
        0,
        "a datagram from .11 left"
    );
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let violations: Vec<_> = lines.iter().filter_map(Line::violation).collect();
    assert!(
        violations
            .iter()
            .all(|violation| violation.dst != PARTNER_V4),
        "the compliant destination was judged by the prefix's guess: {violations:#?}"
    );
}

/// A policy that blocks UDP, on a whole-host audit, attaches no sendmsg program (with one the
/// kernel would lock every unconnected UDP socket of the host around each datagram): the
/// egress program refuses a wrong datagram on the source it carries, and its sender gets
/// EPERM from that `sendto()`, however the source was chosen or the datagram sent: bound,
/// per datagram (`IP_PKTINFO`), several in one call (`sendmmsg`), behind IPv4 options or an
/// IPv6 extension header, or from a socket made before srcip started. The allowed source
/// passes. The destinations are this test's own, as the audit covers every process of the
/// host.
#[test]
fn block_refuses_unconnected_datagrams_at_egress_without_sendmsg_programs() {
    const RESOLVER_V4: &str = "198.51.100.77";
    const RESOLVER_V6: &str = "2001:db8:77::77";
    const PORT: u16 = 5377;
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(&format!(
        r#"
[[rule]]
name = "resolver"
destinations = ["{RESOLVER_V4}", "{RESOLVER_V6}"]
ports = [{PORT}]
protocol = "udp"
allowed_sources = ["{ALLOWED_V4}", "{ALLOWED_V6}"]
action = "block"
"#
    ));
    // Made before srcip started: adopted at its start.
    let early = WaitingUdpClient::start(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V4],
        RESOLVER_V4,
        PORT,
    );
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &["--fold-window", "0"]);
    // BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_UDP4_SENDMSG and BPF_CGROUP_UDP6_SENDMSG.
    let (connect4, sendmsg4, sendmsg6) = (10, 14, 15);
    let attached = cgroup_attach_types(daemon.pid());
    assert!(attached.contains(&connect4), "{attached:?}");
    assert!(
        !attached.contains(&sendmsg4) && !attached.contains(&sendmsg6),
        "sendmsg programs attached: {attached:?}"
    );

    let mut refused = vec![(
        "made before srcip started".to_owned(),
        early.attempt_send(),
        OTHER_V4,
    )];
    for (options, resolver, source) in [
        (&["--bind", OTHER_V4][..], RESOLVER_V4, OTHER_V4),
        (&["--bind", OTHER_V6], RESOLVER_V6, OTHER_V6),
        (&["--pktinfo", OTHER_V4], RESOLVER_V4, OTHER_V4),
        (&["--sendmmsg", "--bind", OTHER_V4], RESOLVER_V4, OTHER_V4),
        (&["--ip-options", "--bind", OTHER_V4], RESOLVER_V4, OTHER_V4),
        (
            &["--ipv6-header", "dstopts", "--bind", OTHER_V6],
            RESOLVER_V6,
            OTHER_V6,
        ),
    ] {
        let what = options.join(" ");
        let report = attempt_udp_client(&topology.host, &cgroup.path, options, resolver, PORT);
        refused.push((what, report, source));
    }
    for (what, report, source) in refused {
        assert_eq!(report.error.as_deref(), Some("EPERM"), "{what}: {report:?}");
        let line = daemon.wait_for(&format!("the blocked datagram ({what})"), |line| {
            line.violation()
                .is_some_and(|violation| violation.src_port == report.src_port)
        });
        let violation = line.violation().unwrap();
        assert_eq!(
            (
                violation.blocked,
                violation.blocked_at.as_deref(),
                violation.src.as_str()
            ),
            (Some(true), Some("egress"), source),
            "{what}"
        );
    }
    // `udp_client` fails the test on EPERM.
    let right = [
        udp_client(
            &topology.host,
            &cgroup.path,
            &["--bind", ALLOWED_V4],
            RESOLVER_V4,
            PORT,
        ),
        udp_client(
            &topology.host,
            &cgroup.path,
            &["--bind", ALLOWED_V6],
            RESOLVER_V6,
            PORT,
        ),
    ];
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    assert!(
        !lines
            .iter()
            .filter_map(Line::violation)
            .any(|violation| right
                .iter()
                .any(|report| violation.src_port == report.src_port)),
        "a compliant datagram was reported: {lines:#?}"
    );
}

/// A daemon auditing the whole host (so that no sendmsg program refuses a bound source
/// before its datagram reaches egress), whose policy blocks UDP to 198.51.100.128/25 on
/// `port` from any source but the allowed one; and its policy file.
fn blocking_udp_to_resolvers(topology: &Topology, port: u16) -> (PolicyFile, Daemon) {
    let policy = PolicyFile::new(&format!(
        r#"
[[rule]]
name = "resolvers"
destinations = ["198.51.100.128/25"]
ports = [{port}]
protocol = "udp"
allowed_sources = ["{ALLOWED_V4}"]
action = "block"
"#
    ));
    let daemon = Daemon::start_in(&topology.host, &policy.path, &["--fold-window", "0"]);
    (policy, daemon)
}

/// Two threads sending a socket's first datagram of a flow at the same moment, from two CPUs:
/// the run that finds the flow remembered by the other but not yet decided decides it too,
/// so no datagram of a blocked flow leaves unjudged as "seen". Each flow is a new
/// destination, so that each round is a socket's first datagram of its flow; with the
/// headers in place and behind IPv4 options.
#[test]
fn block_stops_both_first_datagrams_of_a_flow_two_threads_send_at_once() {
    const FIRST: &str = "198.51.100.130";
    const FLOWS: usize = 120;
    const PORT: u16 = 5378;
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let (_policy, mut daemon) = blocking_udp_to_resolvers(&topology, PORT);
    let flows = FLOWS.to_string();
    // With IPv4 options the headers are not where the egress program reads them in place:
    // each datagram is looked up in the flow table, and no last flow is kept.
    for header in [None, Some("--ip-options")] {
        let mut options = vec!["--bind", OTHER_V4, "--threads", "2", "--spread", &flows];
        options.extend(header);
        let report = attempt_udp_client(&topology.host, &cgroup.path, &options, FIRST, PORT);
        assert_eq!(
            (report.sent, report.error.as_deref()),
            (0, Some("EPERM")),
            "datagrams of blocked flows left ({header:?}): {report:?}"
        );
        // Every flow is reported, blocked at egress.
        let mut reported = std::collections::BTreeSet::new();
        while reported.len() < FLOWS {
            let line = daemon.wait_for("each blocked flow's violation", |line| {
                line.violation()
                    .is_some_and(|violation| violation.src_port == report.src_port)
            });
            let violation = line.violation().unwrap();
            assert_eq!(
                (violation.blocked, violation.blocked_at.as_deref()),
                (Some(true), Some("egress")),
                "{violation:?}"
            );
            reported.insert(violation.dst.clone());
        }
    }
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}

/// Two threads of one socket sending two flows at the same moment, one allowed and one that
/// `block` refuses: each datagram's check of the socket's last flow runs while the other
/// thread rewrites it. Each check sees a whole flow, never one half old and half new that
/// passes for the refused flow with the allowed one's verdict, or the other way round.
#[test]
fn block_stops_a_flow_while_another_thread_sends_an_allowed_one_on_its_socket() {
    const ALLOWED_DESTINATION: &str = "198.51.100.20";
    const BLOCKED_DESTINATION: &str = "198.51.100.140";
    const ROUNDS: usize = 5000;
    const PORT: u16 = 5379;
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let (_policy, mut daemon) = blocking_udp_to_resolvers(&topology, PORT);
    let rounds = ROUNDS.to_string();
    let report = attempt_udp_client(
        &topology.host,
        &cgroup.path,
        &[
            "--bind",
            OTHER_V4,
            "--threads",
            "2",
            "--staggered",
            "--count",
            &rounds,
        ],
        &format!("{ALLOWED_DESTINATION},{BLOCKED_DESTINATION}"),
        PORT,
    );
    // Each round, each thread sends one datagram to each destination: every allowed one
    // passes, no refused one does. (A check that read a flow half rewritten did either.)
    assert_eq!(
        (report.sent, report.error.as_deref()),
        (2 * ROUNDS, Some("EPERM")),
        "of {ROUNDS} allowed datagrams per thread, {} passed: {report:?}",
        report.sent
    );
    let line = daemon.wait_for("the blocked flow's violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == report.src_port)
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (violation.dst.as_str(), violation.blocked_at.as_deref()),
        (BLOCKED_DESTINATION, Some("egress"))
    );
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}

/// A socket `block` refused at `connect()` is connected again by its program, to a port an
/// `alert` rule covers: the refusal freed its owner's slot (marked taken), and the second
/// `connect()` claims it again, so the second attempt's SYN is judged at egress, with its
/// owner.
#[test]
fn a_socket_refused_at_connect_and_connected_again_is_judged_again() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let audited = cgroup.child("audited");
    route_partner_via_other_sources(&topology);
    let policy = PolicyFile::new(&format!(
        r#"
[[rule]]
name = "partner-https"
destinations = ["{PARTNER_V4}"]
ports = [443]
allowed_sources = ["{ALLOWED_V4}"]
action = "block"

[[rule]]
name = "partner-http"
destinations = ["{PARTNER_V4}"]
ports = [80]
allowed_sources = ["{ALLOWED_V4}"]
action = "alert"
"#
    ));
    let args = ["--cgroup", audited.to_str().unwrap(), "--fold-window", "0"];
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &args);
    let options = [
        "--bind",
        OTHER_V4,
        "--comm",
        "retrier",
        "--retry-port",
        "80",
    ];
    let reports = attempt_client(&topology.host, &audited, &options, PARTNER_V4, 443);
    let errors: Vec<_> = reports
        .iter()
        .map(|report| report.error.as_deref())
        .collect();
    assert_eq!(errors, [Some("EPERM"), None], "{reports:?}");
    let src_port = reports[0].src_port;
    for (dst_port, blocked_at) in [(443, Some("connect")), (80, None)] {
        let line = daemon.wait_for(&format!("the violation to port {dst_port}"), |line| {
            line.violation().is_some_and(|violation| {
                violation.src_port == src_port && violation.dst_port == dst_port
            })
        });
        let violation = line.violation().unwrap();
        assert_eq!(
            (
                violation.blocked_at.as_deref(),
                violation.comm.as_str(),
                violation.src.as_str()
            ),
            (blocked_at, "retrier", OTHER_V4),
            "port {dst_port}"
        );
    }
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}

/// A violation names its socket's user: a connection judged on its packet carries the
/// socket's own (the user the kernel routes it by), one refused at `connect()` the user of
/// the process refused. Here both are the client's, which runs as 4242.
#[test]
fn a_violation_names_the_user_of_its_socket_at_egress_and_at_connect() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let audited = cgroup.child("audited");
    for (action, bind, blocked_at) in [
        ("alert", None, None),
        ("block", Some(OTHER_V4), Some("connect")),
    ] {
        let policy = PolicyFile::new(&policy_with(action));
        let mut daemon = enforcing_daemon(&topology, &cgroup, &policy);
        let mut options = vec!["--uid", "4242"];
        options.extend(bind.iter().flat_map(|bind| ["--bind", bind]));
        let client = attempt_client(&topology.host, &audited, &options, PARTNER_V4, 443).remove(0);
        let line = daemon.wait_for(&format!("the {action} violation"), |line| {
            line.violation()
                .is_some_and(|violation| violation.pid == client.pid)
        });
        let violation = line.violation().unwrap();
        assert_eq!(
            (
                violation.uid,
                violation.blocked_at.as_deref(),
                violation.src.as_str()
            ),
            (4242, blocked_at, OTHER_V4),
            "{action}"
        );
        let (status, _) = daemon.stop_with(Signal::SIGTERM);
        assert!(status.success());
    }
}

/// What the prediction cannot know is judged on the packet: a connected UDP socket that
/// sets a wrong source per datagram with `IP_PKTINFO` is stopped at egress, and a program
/// whose mark policy routing sends from the allowed source is never refused, though srcip's
/// own (unmarked) prediction says the wrong one.
#[test]
fn block_judges_per_datagram_sources_and_marked_programs_on_the_wire() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let audited = cgroup.child("audited");
    let policy = PolicyFile::new(&policy_with("block"));
    topology.route_partner_via_other_source();
    ip_in(&topology.host.name, "rule add fwmark 7 lookup 100");
    ip_in(
        &topology.host.name,
        "route add 198.51.100.50/32 via 203.0.113.1 src 203.0.113.10 table 100",
    );
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &["--cgroup", audited.to_str().unwrap(), "--fold-window", "0"],
    );
    daemon.wait_for("the drift", |line| line.route_drift().is_some());

    // Marked 7: policy routing gives it .10, which is allowed.
    let marked = client(&topology.host, &audited, &["--mark", "7"], PARTNER_V4, 443);
    assert_eq!(marked[0].src, ALLOWED_V4);
    // Unmarked: .11, stopped at its SYN.
    let unmarked = connect(&topology.host, &audited, None, PARTNER_V4, 443);
    assert_eq!(unmarked.src, OTHER_V4);
    let line = daemon.wait_for("the unmarked violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == unmarked.src_port)
    });
    assert_eq!(
        line.violation().unwrap().blocked_at.as_deref(),
        Some("egress")
    );

    // Connected to the partner from the allowed source, then a datagram with IP_PKTINFO
    // choosing .11: stopped, and the sender gets EPERM.
    let options = ["--bind", ALLOWED_V4, "--connected-pktinfo", OTHER_V4];
    let sneaky = attempt_udp_client(&topology.host, &audited, &options, PARTNER_V4, 443);
    assert_eq!(sneaky.error.as_deref(), Some("EPERM"), "{sneaky:?}");
    let line = daemon.wait_for("the per-datagram violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.protocol == "udp")
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (violation.blocked, violation.blocked_at.as_deref()),
        (Some(true), Some("egress"))
    );
    // The same socket choosing the allowed source per datagram passes.
    let options = ["--bind", ALLOWED_V4, "--connected-pktinfo", ALLOWED_V4];
    udp_client(&topology.host, &audited, &options, PARTNER_V4, 443);
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    assert!(
        !lines
            .iter()
            .filter_map(Line::violation)
            .any(|v| v.src_port == marked[0].src_port),
        "the marked, compliant connection was reported: {lines:#?}"
    );
}

/// An MPTCP listener on the partner's port 443, and room for a second subflow on both sides.
fn mptcp_partner(topology: &Topology) -> MptcpListener {
    let listener = MptcpListener::start(&topology.partner, PARTNER_V4, 443);
    for namespace in [&topology.host.name, &topology.partner.name] {
        ip_in(namespace, "mptcp limits set subflow 2 add_addr_accepted 2");
    }
    listener
}

/// Has the host's path manager open a subflow from `source` for every MPTCP connection,
/// those already made too.
fn add_subflows_from(topology: &Topology, source: &str) {
    ip_in(
        &topology.host.name,
        &format!("mptcp endpoint add {source} dev v0 subflow"),
    );
}

/// MPTCP: the kernel's path manager opens a second subflow of a client's connection from the
/// host's other address, in a kernel worker. That subflow is a connection of the MPTCP
/// socket's owner, judged on its own source: reported under `--cgroup` with the client's
/// process, and under `block` refused, so that no SYN from that address reaches the partner,
/// while the connection goes on over its first subflow.
#[test]
fn every_mptcp_subflow_is_a_connection_of_its_sockets_owner_judged_on_its_own_source() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let audited = cgroup.child("audited");
    let args = ["--cgroup", audited.to_str().unwrap(), "--fold-window", "0"];
    let policy = PolicyFile::new(&policy_with("alert"));
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &args);
    if !finds_mptcp_sockets(&daemon) {
        return;
    }

    let _listener = mptcp_partner(&topology);
    add_subflows_from(&topology, OTHER_V4);
    count_syns_at_partner(&topology, &[OTHER_V4]);
    let first = client(&topology.host, &audited, &["--mptcp"], PARTNER_V4, 443);
    assert_eq!(
        first[0].src, ALLOWED_V4,
        "the first subflow leaves from .10"
    );
    let line = daemon.wait_for("the second subflow's violation", |line| {
        line.violation().is_some_and(|v| v.src == OTHER_V4)
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (
            violation.pid,
            violation.comm.as_str(),
            violation.protocol.as_str()
        ),
        (first[0].pid, "tcp-client", "tcp"),
        "{violation:#?}"
    );
    assert_eq!(violation.cgroup, Some(TestCgroup::relative(&audited)));
    assert!(
        syns_counted(&topology, OTHER_V4) >= 1,
        "the subflow reached the partner"
    );
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());

    std::fs::write(&policy.path, policy_with("block")).unwrap();
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &args);
    let arrived_before = syns_counted(&topology, OTHER_V4);
    let second = client(&topology.host, &audited, &["--mptcp"], PARTNER_V4, 443);
    assert_eq!(second[0].error, None, "the connection itself is compliant");
    let line = daemon.wait_for("the refused subflow", |line| {
        line.violation().is_some_and(|v| v.src == OTHER_V4)
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (violation.pid, violation.blocked),
        (second[0].pid, Some(true)),
        "{violation:#?}"
    );
    assert_eq!(
        syns_counted(&topology, OTHER_V4),
        arrived_before,
        "no SYN from the refused address reached the partner"
    );
}

/// An MPTCP connection made before srcip (re)started, whose path manager opens a subflow
/// from the wrong address only afterwards, in a kernel worker: srcip adopts the MPTCP socket
/// at start, from the process that holds it, and the subflow is that process's violation.
#[test]
fn a_subflow_of_an_mptcp_connection_made_before_srcip_started_is_its_owners() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited"]);
    let audited = cgroup.child("audited");
    if !kernel_at_least(5, 19) {
        let policy = PolicyFile::new(&policy_with("alert"));
        let daemon = Daemon::start(&policy.path, &["--cgroup", audited.to_str().unwrap()]);
        assert!(!finds_mptcp_sockets(&daemon));
        return;
    }
    let _listener = mptcp_partner(&topology);
    let mut early = KilledOnDrop(
        std::process::Command::new(srcip_tests::tcp_client_bin())
            .args(["--cgroup", audited.to_str().unwrap()])
            .args(["--netns", &topology.host.name])
            .args(["--mptcp", "--linger", "20000", PARTNER_V4, "443"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting tcp-client"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(early.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let client: srcip_tests::ClientReport = serde_json::from_str(&line).unwrap();
    assert_eq!(client.src, ALLOWED_V4);

    let policy = PolicyFile::new(&policy_with("alert"));
    let args = ["--cgroup", audited.to_str().unwrap(), "--fold-window", "0"];
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &args);
    add_subflows_from(&topology, OTHER_V4);
    let line = daemon.wait_for("the later subflow's violation", |line| {
        line.violation().is_some_and(|v| v.src == OTHER_V4)
    });
    let violation = line.violation().unwrap();
    assert_eq!(
        (violation.pid, violation.comm.as_str()),
        (client.pid, "tcp-client"),
        "{violation:#?}"
    );
}

/// An MPTCP socket made by a process in another cgroup and passed into the audited one with
/// `SCM_RIGHTS` (or made before its process moved in): its subflows are the audited
/// process's connections, the one the path manager opens from the wrong address included.
#[test]
fn the_subflows_of_an_mptcp_socket_passed_into_an_audited_process_are_its() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited", "elsewhere"]);
    let (audited, elsewhere) = (cgroup.child("audited"), cgroup.child("elsewhere"));
    let policy = PolicyFile::new(&policy_with("alert"));
    let args = ["--cgroup", audited.to_str().unwrap(), "--fold-window", "0"];
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &args);
    if !finds_mptcp_sockets(&daemon) {
        return;
    }
    let _listener = mptcp_partner(&topology);
    add_subflows_from(&topology, OTHER_V4);
    for origin in ["--passed-from", "--created-in"] {
        let options = ["--mptcp", origin, elsewhere.to_str().unwrap()];
        let client = client(&topology.host, &audited, &options, PARTNER_V4, 443).remove(0);
        let line = daemon.wait_for(
            &format!("the violation of the subflow of a socket {origin} elsewhere"),
            |line| {
                line.violation()
                    .is_some_and(|v| v.src == OTHER_V4 && v.pid == client.pid)
            },
        );
        let violation = line.violation().unwrap();
        assert_eq!(violation.comm, "tcp-client");
        assert_eq!(violation.cgroup, Some(TestCgroup::relative(&audited)));
    }
}

/// Whether srcip finds an MPTCP subflow's socket on this kernel (`bpf_skc_to_mptcp_sock`,
/// Linux 5.19). Where it cannot, the documented limit is asserted instead: `started` says
/// so where the kernel has MPTCP (Debian's 5.10 has none, and nothing is lost there).
fn finds_mptcp_sockets(daemon: &Daemon) -> bool {
    let Some(Line::Started { degraded, .. }) = daemon.seen.first() else {
        panic!("the first line is not started: {:#?}", daemon.seen);
    };
    let said = degraded.iter().any(|note| note.starts_with("mptcp: "));
    if kernel_at_least(5, 19) {
        assert!(!said, "{degraded:?}");
        return true;
    }
    assert_eq!(said, has_mptcp(), "{degraded:?}");
    false
}

/// A helper process that must not outlive the test (it holds the test's cgroup).
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
