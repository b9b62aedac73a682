//! Route drift in the daemon: `route_drift` when a routing change makes a destination's
//! predicted source disallowed, with no traffic at all, and `route_recovered` when it is
//! undone. The daemon runs in the test's namespace, whose routes it then watches. A program
//! that `uidrange` or `fwmark` rules route apart gets predictions of its own.

use srcip_tests::{
    ALLOWED_V4, Daemon, OTHER_V4, OTHER_V6, PARTNER_POLICY, PARTNER_V4, PolicyFile, Signal,
    TestCgroup, Topology, alerts::RouteCheck, client, connect, ip_in, make_violation,
};

#[test]
fn a_route_change_drifts_without_traffic_and_recovers_when_undone() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &[]);

    topology.route_partner_via_other_source();
    let line = daemon.wait_for("route_drift", |line| line.route_drift().is_some());
    let drift = line.route_drift().unwrap();
    assert_eq!(drift.rule, "partner");
    assert_eq!(drift.dst, PARTNER_V4);
    assert_eq!(drift.predicted_src.as_deref(), Some(OTHER_V4));
    assert_eq!(drift.oif.as_deref(), Some("v0"));
    assert_eq!(drift.allowed_sources, ["203.0.113.10", "2001:db8::10"]);
    assert_eq!(
        drift.reason,
        "route 198.51.100.50 via 203.0.113.1 dev v0 src 203.0.113.11 in table main"
    );
    assert!(
        drift.fix[0].starts_with(&format!(
            "ip route replace 198.51.100.50 via 203.0.113.1 dev v0 src {ALLOWED_V4}"
        )),
        "{drift:#?}"
    );

    ip_in(&topology.host.name, "route del 198.51.100.50/32");
    let line = daemon.wait_for("route_recovered", |line| line.route_recovered().is_some());
    let recovered = line.route_recovered().unwrap();
    assert_eq!(recovered.dst, PARTNER_V4);
    assert_eq!(recovered.predicted_src.as_deref(), Some(ALLOWED_V4));

    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    let drifts = lines
        .iter()
        .filter(|line| line.route_drift().is_some())
        .count();
    assert_eq!(drifts, 1, "one change, one drift: {lines:#?}");
}

#[test]
fn an_address_removed_from_the_interface_drifts_too() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &[]);

    // The IPv6 default route names ::10 as its src; without ::10 the kernel takes ::11.
    ip_in(&topology.host.name, "-6 addr del 2001:db8::10/64 dev v0");
    let line = daemon.wait_for("route_drift", |line| line.route_drift().is_some());
    let drift = line.route_drift().unwrap();
    assert_eq!(drift.destination, "2001:db8:50::/64");
    assert_eq!(drift.predicted_src.as_deref(), Some(OTHER_V6));
}

#[test]
fn a_destination_already_wrong_at_start_drifts_at_start() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    topology.route_partner_via_other_source();
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &[]);
    let line = daemon.wait_for("route_drift", |line| line.route_drift().is_some());
    assert_eq!(line.route_drift().unwrap().dst, PARTNER_V4);
}

#[test]
fn a_violation_from_the_kernels_choice_names_the_route_and_a_bound_one_does_not() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &[
            "--cgroup",
            cgroup.path.to_str().unwrap(),
            "--fold-window",
            "0",
        ],
    );

    // The program bound the wrong source itself: the routes did not choose it.
    let bound = make_violation(&mut daemon, &topology, &cgroup.path);
    let line = daemon
        .seen
        .iter()
        .rev()
        .find(|line| {
            line.violation()
                .is_some_and(|v| v.src_port == bound.src_port)
        })
        .unwrap();
    assert_eq!(line.violation().unwrap().reason, None);

    topology.route_partner_via_other_source();
    daemon.wait_for("route_drift", |line| line.route_drift().is_some());
    let unbound = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    assert_eq!(unbound.src, OTHER_V4);
    let line = daemon.wait_for("the unbound violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == unbound.src_port)
    });
    assert_eq!(
        line.violation().unwrap().reason.as_deref(),
        Some("route 198.51.100.50 via 203.0.113.1 dev v0 src 203.0.113.11 in table main")
    );
}

/// A program that the host's policy routing sends through table 100, to the partner from
/// the disallowed .11, by `selector` (`uidrange …`, `fwmark …`), which the client's
/// `client_options` meet. srcip itself is routed by table main, from .10. Its first violation
/// teaches srcip about the program; srcip then predicts for it too (a `route_drift` that
/// `is_for_it`, whose reason names the rule), and its next violation has that reason, while
/// srcip's own prediction never drifts.
fn program_routed_apart(
    selector: &str,
    client_options: &[&str],
    is_for_it: impl Fn(&RouteCheck) -> bool,
) {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let host = &topology.host.name;
    ip_in(
        host,
        "route add 198.51.100.50 via 203.0.113.1 src 203.0.113.11 table 100",
    );
    ip_in(
        host,
        &format!("rule add priority 100 {selector} lookup 100"),
    );
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &[
            "--cgroup",
            cgroup.path.to_str().unwrap(),
            "--fold-window",
            "0",
        ],
    );
    let connect_as_program = || {
        client(
            &topology.host,
            &cgroup.path,
            client_options,
            PARTNER_V4,
            443,
        )
        .remove(0)
    };
    let first = connect_as_program();
    assert_eq!(first.src, OTHER_V4, "the rule routes the program");
    daemon.wait_for("the program's violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == first.src_port)
    });

    let drift = daemon.wait_for("route_drift for the program", |line| {
        line.route_drift().is_some_and(&is_for_it)
    });
    let drift = drift.route_drift().unwrap();
    assert_eq!(drift.predicted_src.as_deref(), Some(OTHER_V4));
    let reason = format!(
        "route 198.51.100.50 via 203.0.113.1 dev v0 src 203.0.113.11 in table 100; table 100 by rule \"100: from all {selector} lookup 100\""
    );
    assert_eq!(drift.reason, reason);

    let second = connect_as_program();
    let line = daemon.wait_for("the second violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == second.src_port)
    });
    assert_eq!(line.violation().unwrap().reason, Some(reason));
    assert!(
        !daemon.seen.iter().any(|line| line
            .route_drift()
            .is_some_and(|d| d.uid.is_none() && d.mark.is_none())),
        "srcip's own prediction did not drift: {:#?}",
        daemon.seen
    );
}

#[test]
fn a_program_routed_by_its_uid_drifts_for_its_uid_and_its_violation_names_the_rule() {
    program_routed_apart("uidrange 4242-4242", &["--uid", "4242"], |drift| {
        drift.uid == Some(4242)
    });
}

#[test]
fn a_marked_program_drifts_for_its_mark_and_its_violation_names_the_rule() {
    program_routed_apart("fwmark 0x7", &["--mark", "7"], |drift| {
        drift.mark == Some(7)
    });
}

/// The first `count` lines `srcip watch --format FORMAT` prints for the daemon on `socket`,
/// and whatever else it prints in the moment after them.
fn watch_lines(socket: &std::path::Path, format: &str, count: usize) -> Vec<String> {
    use std::io::BufRead as _;
    let mut watcher = std::process::Command::new(srcip_tests::srcip_bin())
        .args(["watch", "--format", format, "--socket"])
        .arg(socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawning srcip watch");
    let stdout = watcher.stdout.take().unwrap();
    let (sender, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = sender.send(line);
        }
    });
    let mut lines = Vec::new();
    for _ in 0..count {
        lines.push(
            received
                .recv_timeout(srcip_tests::DELIVERY_TIMEOUT)
                .unwrap_or_else(|_| panic!("srcip watch printed only {lines:#?}")),
        );
    }
    while let Ok(line) = received.recv_timeout(std::time::Duration::from_secs(1)) {
        lines.push(line);
    }
    watcher.kill().unwrap();
    watcher.wait().unwrap();
    lines
}

/// A watcher that attaches while a destination drifts learns it at once, after `started`,
/// in the format it asks for; one that attaches after the recovery hears of no drift.
#[test]
fn a_late_watcher_learns_what_drifts_now_in_the_format_it_asks_for() {
    let topology = Topology::new();
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::start_in(&topology.host, &policy.path, &[]);
    topology.route_partner_via_other_source();
    daemon.wait_for("route_drift", |line| line.route_drift().is_some());

    let text = watch_lines(&daemon.socket, "text", 2);
    assert!(text[0].contains("started: policy"), "{text:#?}");
    assert!(
        text[1].contains("ROUTE DRIFT")
            && text[1].contains(PARTNER_V4)
            && text[1].contains(OTHER_V4),
        "{text:#?}"
    );
    let json = watch_lines(&daemon.socket, "json", 2);
    let drift: serde_json::Value = serde_json::from_str(&json[1]).unwrap();
    assert_eq!(
        (drift["type"].as_str(), drift["dst"].as_str()),
        (Some("route_drift"), Some(PARTNER_V4)),
        "{json:#?}"
    );

    ip_in(&topology.host.name, "route del 198.51.100.50/32");
    daemon.wait_for("route_recovered", |line| line.route_recovered().is_some());
    let after = watch_lines(&daemon.socket, "json", 1);
    assert!(after[0].contains(r#""type":"started""#), "{after:#?}");
    assert!(
        after.iter().all(|line| !line.contains("route_drift")),
        "{after:#?}"
    );
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}
