//! Complete capture: connections that reach the kernel by paths a plain client does not take
//! are still audited. A unit's cgroup removed and made again (a systemd restart), TCP and UDP
//! sockets that arrive in an audited process from outside it, IPv6 extension headers in
//! front of TCP or UDP, and a daemon started with `ip netns exec`.

use std::path::Path;

use srcip_tests::{
    ALLOWED_V4, Daemon, Line, OTHER_V4, OTHER_V6, PARTNER_V4, PARTNER_V6, PolicyFile, Signal,
    TestCgroup, Topology, attempt_client, attempt_udp_client, client, make_violation, srcip_bin,
    udp_client,
};

/// The partner takes HTTPS and DNS only from .10 and ::10.
const POLICY: &str = r#"
[[rule]]
name = "partner-https"
destinations = ["198.51.100.50", "2001:db8:50::/64"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.10", "2001:db8::10"]

[[rule]]
name = "partner-dns"
destinations = ["198.51.100.50", "2001:db8:50::/64"]
ports = [53]
protocol = "udp"
allowed_sources = ["203.0.113.10", "2001:db8::10"]
"#;

fn audit(policy: &PolicyFile, cgroup: &Path) -> Daemon {
    // Unfolded: each connection is asserted by its own source port.
    let args = ["--cgroup", cgroup.to_str().unwrap(), "--fold-window", "0"];
    Daemon::start(&policy.path, &args)
}

fn violation_from_port(port: u16) -> impl Fn(&Line) -> bool {
    move |line| line.violation().is_some_and(|v| v.src_port == port)
}

#[test]
fn a_unit_cgroup_removed_and_made_again_is_audited_from_its_first_socket() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["unit"]);
    let unit = cgroup.child("unit");
    let policy = PolicyFile::new(POLICY);
    let mut daemon = audit(&policy, &unit);

    // What systemd does at each restart of a unit: remove the cgroup, make it again, start
    // the service in it at once. Its first TCP connection and its first UDP socket come
    // within milliseconds of the `mkdir`.
    for round in 0..3 {
        std::fs::remove_dir(&unit).expect("removing the unit's cgroup");
        std::fs::create_dir(&unit).expect("making the unit's cgroup again");
        let tcp = client(
            &topology.host,
            &unit,
            &["--bind", OTHER_V4],
            PARTNER_V4,
            443,
        );
        let udp = udp_client(&topology.host, &unit, &["--bind", OTHER_V4], PARTNER_V4, 53);
        let id = TestCgroup::id(&unit);
        for (protocol, port) in [("tcp", tcp[0].src_port), ("udp", udp.src_port)] {
            let line = daemon.wait_for(
                &format!("round {round}'s {protocol} violation"),
                violation_from_port(port),
            );
            let violation = line.violation().unwrap();
            assert_eq!(violation.protocol, protocol);
            assert_eq!(violation.src, OTHER_V4);
            assert_eq!(
                violation.cgroup_id, id,
                "attributed to the new instance of the unit's cgroup"
            );
        }
    }
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success(), "srcip run exited with {status}");
}

#[test]
fn udp_sockets_that_reach_an_audited_process_from_outside_are_audited() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited", "elsewhere"]);
    let (audited, elsewhere) = (cgroup.child("audited"), cgroup.child("elsewhere"));
    let policy = PolicyFile::new(POLICY);
    let mut daemon = audit(&policy, &audited);
    let elsewhere_dir = elsewhere.to_str().unwrap();

    // Made by another process outside the audited cgroup and passed in with SCM_RIGHTS, as
    // systemd's socket activation does; and made before the process moved in.
    for origin in ["--passed-from", "--created-in"] {
        for (source, partner) in [(OTHER_V4, PARTNER_V4), (OTHER_V6, PARTNER_V6)] {
            let options = [origin, elsewhere_dir, "--bind", source];
            let report = udp_client(&topology.host, &audited, &options, partner, 53);
            let line = daemon.wait_for(
                &format!("the violation of a socket {origin} elsewhere to {partner}"),
                violation_from_port(report.src_port),
            );
            let violation = line.violation().unwrap();
            assert_eq!(
                (violation.src.as_str(), violation.dst.as_str()),
                (source, partner)
            );
            assert_eq!(
                (violation.pid, violation.comm.as_str()),
                (report.pid, "udp-client"),
                "attributed to the audited process that sent it"
            );
            assert_eq!(violation.cgroup_id, TestCgroup::id(&audited));
        }
    }

    // The same violation sent from outside the audited cgroup is none of srcip's business.
    let outside = udp_client(
        &topology.host,
        &elsewhere,
        &["--bind", OTHER_V4],
        PARTNER_V4,
        53,
    );
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(
        !lines.iter().any(violation_from_port(outside.src_port)),
        "a datagram from an unaudited cgroup was reported: {lines:#?}"
    );
}

#[test]
fn a_udp_socket_passed_into_an_audited_process_is_blocked() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited", "elsewhere"]);
    let (audited, elsewhere) = (cgroup.child("audited"), cgroup.child("elsewhere"));
    let policy = PolicyFile::new(&POLICY.replace(
        "protocol = \"udp\"",
        "protocol = \"udp\"\naction = \"block\"",
    ));
    let mut daemon = audit(&policy, &audited);
    let options = [
        "--passed-from",
        elsewhere.to_str().unwrap(),
        "--bind",
        OTHER_V4,
    ];
    let report = attempt_udp_client(&topology.host, &audited, &options, PARTNER_V4, 53);
    assert_eq!(report.error.as_deref(), Some("EPERM"), "{report:?}");
    let line = daemon.wait_for("the blocked datagram", |line| {
        line.violation().is_some_and(|v| v.blocked == Some(true))
    });
    assert_eq!(line.violation().unwrap().pid, report.pid);
    // A compliant datagram on a passed socket is not refused.
    let options = ["--passed-from", elsewhere.to_str().unwrap()];
    udp_client(&topology.host, &audited, &options, PARTNER_V4, 53);
}

/// TCP sockets that reach an audited process from outside (made by a process in another
/// cgroup and passed in with `SCM_RIGHTS`, or made before the process moved in): their
/// connections are reported as the audited process's, and refused under `block`, while a
/// compliant one on such a socket is not.
#[test]
fn tcp_sockets_that_reach_an_audited_process_from_outside_are_audited_and_blocked() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited", "elsewhere"]);
    let (audited, elsewhere) = (cgroup.child("audited"), cgroup.child("elsewhere"));
    let elsewhere_dir = elsewhere.to_str().unwrap();
    let policy = PolicyFile::new(POLICY);
    let mut daemon = audit(&policy, &audited);
    for origin in ["--passed-from", "--created-in"] {
        for (source, partner) in [(OTHER_V4, PARTNER_V4), (OTHER_V6, PARTNER_V6)] {
            let options = [origin, elsewhere_dir, "--bind", source];
            let report = client(&topology.host, &audited, &options, partner, 443).remove(0);
            let line = daemon.wait_for(
                &format!("the violation of a TCP socket {origin} elsewhere to {partner}"),
                violation_from_port(report.src_port),
            );
            let violation = line.violation().unwrap();
            assert_eq!(
                (violation.src.as_str(), violation.protocol.as_str()),
                (source, "tcp")
            );
            assert_eq!(
                (violation.pid, violation.comm.as_str()),
                (report.pid, "tcp-client"),
                "attributed to the audited process that connected"
            );
            assert_eq!(violation.cgroup_id, TestCgroup::id(&audited));
        }
    }
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());

    let blocking = PolicyFile::new(&POLICY.replace(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\naction = \"block\"",
    ));
    let mut daemon = audit(&blocking, &audited);
    for origin in ["--passed-from", "--created-in"] {
        let options = [origin, elsewhere_dir, "--bind", OTHER_V4];
        let report = attempt_client(&topology.host, &audited, &options, PARTNER_V4, 443).remove(0);
        assert_eq!(
            report.error.as_deref(),
            Some("EPERM"),
            "{origin}: {report:?}"
        );
        let line = daemon.wait_for("the blocked connection", |line| {
            line.violation().is_some_and(|v| v.pid == report.pid)
        });
        assert_eq!(line.violation().unwrap().blocked, Some(true));
        // Compliant on such a socket: not refused (`client` fails the test on an error).
        let options = [origin, elsewhere_dir, "--bind", ALLOWED_V4];
        client(&topology.host, &audited, &options, PARTNER_V4, 443);
    }
}

#[test]
fn tcp_and_udp_behind_ipv6_extension_headers_are_reported() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(POLICY);
    let mut daemon = audit(&policy, &cgroup.path);

    // A destination options header; and a segment routing header, which any user may set,
    // that sends the packets to the partner's router first: the IPv6 header's destination is
    // the router, the connection's is the header's last segment.
    for header in ["dstopts", "srh:2001:db8::1"] {
        let tcp = client(
            &topology.host,
            &cgroup.path,
            &["--bind", OTHER_V6, "--ipv6-header", header],
            PARTNER_V6,
            443,
        );
        let udp = udp_client(
            &topology.host,
            &cgroup.path,
            &["--bind", OTHER_V6, "--ipv6-header", header, "--count", "3"],
            PARTNER_V6,
            53,
        );
        for (protocol, port) in [("tcp", tcp[0].src_port), ("udp", udp.src_port)] {
            let line = daemon.wait_for(
                &format!("the {protocol} violation behind {header}"),
                violation_from_port(port),
            );
            let violation = line.violation().unwrap();
            assert_eq!(violation.protocol, protocol);
            assert_eq!(
                (violation.src.as_str(), violation.dst.as_str()),
                (OTHER_V6, PARTNER_V6)
            );
        }
    }
    // Three datagrams of each flow, one report each.
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let violations = lines.iter().filter_map(Line::violation).count();
    assert_eq!(violations, 4, "{lines:#?}");
}

/// How many cgroup2 mounts this test process sees.
fn cgroup2_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.contains(" - cgroup2 "))
        .count()
}

/// `ip netns exec NAME srcip run` (how an operator runs a command in a namespace): it gives
/// srcip a mount namespace with a fresh `/sys`, which hides the host's cgroup2 mount. srcip
/// mounts the hierarchy again in that namespace only, audits the cgroup named by its path
/// from the cgroup root as on the host, and leaves the host's mounts as they were.
#[test]
fn a_daemon_started_with_ip_netns_exec_audits_as_on_the_host() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(POLICY);
    let mounts_before = cgroup2_mounts();
    let mut command = std::process::Command::new("ip");
    command
        .args(["netns", "exec", &topology.host.name])
        .arg(srcip_bin());
    let relative = TestCgroup::relative(&cgroup.path);
    let mut daemon = Daemon::start_with(
        command,
        &policy.path,
        &["--cgroup", &relative, "--fold-window", "0"],
    );
    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    let violation = daemon.seen.last().and_then(Line::violation).unwrap();
    assert_eq!(
        (violation.pid, violation.cgroup.as_deref()),
        (client.pid, Some(relative.as_str()))
    );
    assert_eq!(violation.netns, Some(topology.host.inode()));
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success(), "srcip run exited with {status}");
    assert_eq!(
        cgroup2_mounts(),
        mounts_before,
        "srcip changed the host's cgroup2 mounts"
    );
}
