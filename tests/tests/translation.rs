//! The address the partner sees: address translation on the host (SNAT, MASQUERADE) in the
//! test's own namespace. srcip reports the socket's source as `src`, the translated one as
//! `wire_src`, and judges the policy on the wire.

use srcip_tests::{
    ALLOWED_V4, ALLOWED_V6, Daemon, Line, OTHER_V4, OTHER_V6, PARTNER_V4, PARTNER_V6, PolicyFile,
    Signal, TestCgroup, Topology, connect, udp_client,
};

/// The partner accepts HTTPS and DNS only from .10 and ::10.
const POLICY: &str = r#"
[[rule]]
name = "partner"
destinations = ["198.51.100.50", "2001:db8:50::/64"]
ports = [443, 53]
protocol = "any"
allowed_sources = ["203.0.113.10", "2001:db8::10"]
"#;

fn audit(policy: &PolicyFile, cgroup: &TestCgroup, all: bool) -> Daemon {
    let mut args = vec!["--cgroup", cgroup.path.to_str().unwrap()];
    if all {
        args.push("--all");
    }
    Daemon::start(&policy.path, &args)
}

fn violation_from(port: u16) -> impl Fn(&Line) -> bool {
    move |line| line.violation().is_some_and(|v| v.src_port == port)
}

#[test]
fn snat_to_a_disallowed_source_is_a_violation_on_the_wire_for_tcp_over_ipv4_and_ipv6() {
    let topology = Topology::new();
    topology.translate(
        "tcp dport 443 ip daddr 198.51.100.50",
        "snat ip to 203.0.113.11",
    );
    topology.translate(
        "tcp dport 443 ip6 daddr 2001:db8:50::50",
        "snat ip6 to 2001:db8::11",
    );
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(POLICY);
    let mut daemon = audit(&policy, &cgroup, false);

    for (partner, chosen, on_the_wire) in [
        (PARTNER_V4, ALLOWED_V4, OTHER_V4),
        (PARTNER_V6, ALLOWED_V6, OTHER_V6),
    ] {
        // The kernel picks the allowed source for the socket; the host rewrites it.
        let client = connect(&topology.host, &cgroup.path, None, partner, 443);
        assert_eq!(client.src, chosen);
        let line = daemon.wait_for("a violation on the wire", violation_from(client.src_port));
        let violation = line.violation().unwrap();
        assert_eq!(violation.src, chosen);
        assert_eq!(violation.wire_src.as_deref(), Some(on_the_wire));
        assert_eq!(violation.dst, partner);
        assert_eq!(violation.protocol, "tcp");
        assert_eq!(violation.rule.as_deref(), Some("partner"));
        assert_eq!(violation.pid, client.pid);
    }
}

#[test]
fn masquerade_onto_an_allowed_source_is_compliant() {
    let topology = Topology::new();
    // MASQUERADE leaves with the interface's primary address, .10.
    topology.translate("tcp dport 443 oifname v0", "masquerade");
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(POLICY);
    let mut daemon = audit(&policy, &cgroup, true);

    let client = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let line = daemon.wait_for("the connect line", |line| {
        line.connect()
            .is_some_and(|c| c.src_port == client.src_port)
    });
    let connect = line.connect().unwrap();
    assert_eq!(connect.src, OTHER_V4);
    assert_eq!(connect.wire_src.as_deref(), Some(ALLOWED_V4));
    assert_eq!(connect.verdict, "compliant");
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let violations: Vec<_> = lines.iter().filter_map(Line::violation).collect();
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn udp_is_judged_on_the_wire_connected_or_not() {
    let topology = Topology::new();
    topology.translate(
        "udp dport 53 ip daddr 198.51.100.50",
        "snat ip to 203.0.113.11",
    );
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(POLICY);
    let mut daemon = audit(&policy, &cgroup, false);

    // Connected: the socket holds the source the kernel chose, so the translation shows.
    let connected = udp_client(&topology.host, &cgroup.path, &["--connect"], PARTNER_V4, 53);
    let line = daemon.wait_for("a UDP violation", violation_from(connected.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.protocol, "udp");
    assert_eq!(violation.src, ALLOWED_V4);
    assert_eq!(violation.wire_src.as_deref(), Some(OTHER_V4));

    // Unconnected: the source is chosen per datagram and the socket holds none, so only the
    // wire's is known. It is still the one judged.
    let unconnected = udp_client(&topology.host, &cgroup.path, &[], PARTNER_V4, 53);
    let line = daemon.wait_for("a UDP violation", violation_from(unconnected.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.src, OTHER_V4);
    assert_eq!(violation.wire_src, None);
}
