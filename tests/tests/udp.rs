//! UDP auditing end to end: connected, unconnected, per-datagram sources, IPv4 and IPv6.

use std::collections::HashMap;

use srcip_tests::{
    ALLOWED_V4, Connection, Daemon, Line, Netns, OTHER_V4, OTHER_V6, PARTNER_V4, PARTNER_V6,
    PolicyFile, Signal, TestCgroup, Topology, WaitingUdpClient, udp_client, unique_name,
};

/// The partner's resolver takes DNS only from .10 and ::10.
const DNS_POLICY: &str = r#"
[[rule]]
name = "partner-dns"
destinations = ["198.51.100.0/24", "2001:db8:50::/64"]
ports = [53]
protocol = "udp"
allowed_sources = ["203.0.113.10", "2001:db8::10"]
"#;

/// A resolver on loopback, which takes DNS only from 127.0.0.2: every namespace's own
/// loopback sends from 127.0.0.1.
const LOOPBACK_DNS_POLICY: &str = r#"
[[rule]]
name = "loopback-dns"
destinations = ["127.0.0.53"]
ports = [53]
protocol = "udp"
allowed_sources = ["127.0.0.2"]
"#;

fn audit(policy: &PolicyFile, cgroup: &TestCgroup, extra: &[&str]) -> Daemon {
    let cgroup = cgroup.path.to_str().unwrap();
    let mut args = vec!["--cgroup", cgroup];
    args.extend(extra);
    Daemon::start(&policy.path, &args)
}

fn violation_to(dst: &str) -> impl Fn(&Line) -> bool + '_ {
    move |line| line.violation().is_some_and(|v| v.dst == dst)
}

fn assert_udp_violation(violation: &Connection, src: &str, dst: &str, pid: u32) {
    assert_eq!(violation.protocol, "udp");
    assert_eq!((violation.src.as_str(), violation.dst.as_str()), (src, dst));
    assert_eq!(violation.dst_port, 53);
    assert_eq!(violation.rule.as_deref(), Some("partner-dns"));
    assert_eq!(
        (violation.pid, violation.comm.as_str()),
        (pid, "udp-client")
    );
}

#[test]
fn connected_udp_from_a_wrong_source_is_a_violation_over_ipv4_and_ipv6() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    let mut daemon = audit(&policy, &cgroup, &[]);

    for (source, partner, family) in [
        (OTHER_V4, PARTNER_V4, "ipv4"),
        (OTHER_V6, PARTNER_V6, "ipv6"),
    ] {
        let options = ["--bind", source, "--connect", "--count", "3"];
        let client = udp_client(&topology.host, &cgroup.path, &options, partner, 53);
        let line = daemon.wait_for("a UDP violation", violation_to(partner));
        let violation = line.violation().unwrap();
        assert_udp_violation(violation, source, partner, client.pid);
        assert_eq!(violation.family, family);
        assert_eq!(violation.src_port, client.src_port);
        assert_eq!(violation.netns, Some(topology.host.inode()));
        assert_eq!(violation.count, None);
    }
    // Three datagrams per socket, one report each: no more violations come.
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let violations: Vec<_> = lines.iter().filter_map(Line::violation).collect();
    assert_eq!(violations.len(), 2, "{violations:#?}");
}

#[test]
fn connected_udp_to_an_ipv4_mapped_address_is_reported_as_ipv4() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    let mut daemon = audit(&policy, &cgroup, &[]);
    // An AF_INET6 socket bound to ::ffff:203.0.113.11, connected to ::ffff:198.51.100.50:
    // IPv4 on the wire, and the socket holds its source as ::ffff:a.b.c.d.
    let source = format!("::ffff:{OTHER_V4}");
    let partner = format!("::ffff:{PARTNER_V4}");
    let options = ["--bind", &source, "--connect", "--count", "3"];
    let client = udp_client(&topology.host, &cgroup.path, &options, &partner, 53);
    let line = daemon.wait_for("a UDP violation", violation_to(PARTNER_V4));
    let violation = line.violation().unwrap();
    assert_udp_violation(violation, OTHER_V4, PARTNER_V4, client.pid);
    assert_eq!(violation.family, "ipv4");
    assert_eq!(violation.wire_src, None, "nothing translated it");
    assert_eq!(violation.src_port, client.src_port);
}

#[test]
fn unconnected_sendto_reports_the_source_each_datagram_carries() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    // Both violations are the same (rule, source, destination, port, cgroup): unfolded, so
    // that each is written with its own source port.
    let mut daemon = audit(&policy, &cgroup, &["--fold-window", "0"]);

    let bound = udp_client(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V4],
        PARTNER_V4,
        53,
    );
    let line = daemon.wait_for("the bound socket's violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == bound.src_port)
    });
    assert_udp_violation(line.violation().unwrap(), OTHER_V4, PARTNER_V4, bound.pid);

    // No bind at all: the kernel picks .10, compliant; after the route change, .11.
    let before = udp_client(&topology.host, &cgroup.path, &[], PARTNER_V4, 53);
    topology.route_partner_via_other_source();
    let after = udp_client(&topology.host, &cgroup.path, &[], PARTNER_V4, 53);
    let line = daemon.wait_for("the route change's violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == after.src_port)
    });
    assert_udp_violation(line.violation().unwrap(), OTHER_V4, PARTNER_V4, after.pid);
    assert!(
        !daemon.seen.iter().any(|line| line
            .violation()
            .is_some_and(|v| v.src_port == before.src_port)),
        "the compliant datagram was reported: {:#?}",
        daemon.seen
    );
}

#[test]
fn a_source_set_per_datagram_with_pktinfo_is_the_one_reported() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    let mut daemon = audit(&policy, &cgroup, &[]);

    for (source, partner) in [(OTHER_V4, PARTNER_V4), (OTHER_V6, PARTNER_V6)] {
        let client = udp_client(
            &topology.host,
            &cgroup.path,
            &["--pktinfo", source],
            partner,
            53,
        );
        let line = daemon.wait_for("the pktinfo datagram's violation", violation_to(partner));
        let violation = line.violation().unwrap();
        assert_udp_violation(violation, source, partner, client.pid);
        assert_eq!(violation.src_port, client.src_port);
    }
}

#[test]
fn sendmmsg_to_several_destinations_reports_each_destination() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    let mut daemon = audit(&policy, &cgroup, &[]);

    let destinations = ["198.51.100.50", "198.51.100.51", "198.51.100.52"];
    let options = ["--bind", OTHER_V4, "--sendmmsg"];
    let client = udp_client(
        &topology.host,
        &cgroup.path,
        &options,
        &destinations.join(","),
        53,
    );
    for destination in destinations {
        let line = daemon.wait_for("a violation per destination", violation_to(destination));
        assert_udp_violation(line.violation().unwrap(), OTHER_V4, destination, client.pid);
    }
}

/// srcip attaches no hook that sees an unconnected datagram's sender (see
/// srcip-userspace/src/adopt.rs): sockets made before it started are adopted at start.
#[test]
fn udp_sockets_made_before_srcip_started_are_audited_and_attributed_to_their_process() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let outside = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    let unconnected = WaitingUdpClient::start(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V4],
        PARTNER_V4,
        53,
    );
    let connected = WaitingUdpClient::start(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V6, "--connect"],
        PARTNER_V6,
        53,
    );
    let unaudited = WaitingUdpClient::start(
        &topology.host,
        &outside.path,
        &["--bind", OTHER_V4],
        PARTNER_V4,
        53,
    );
    let mut daemon = audit(&policy, &cgroup, &[]);

    let unaudited = unaudited.send();
    let unconnected = unconnected.send();
    let line = daemon.wait_for(
        "the unconnected socket's violation",
        violation_to(PARTNER_V4),
    );
    let violation = line.violation().unwrap();
    assert_udp_violation(violation, OTHER_V4, PARTNER_V4, unconnected.pid);
    assert_eq!(violation.src_port, unconnected.src_port);
    let audited = TestCgroup::relative(&cgroup.path);
    assert_eq!(violation.cgroup.as_deref(), Some(audited.as_str()));

    let connected = connected.send();
    let line = daemon.wait_for("the connected socket's violation", violation_to(PARTNER_V6));
    let violation = line.violation().unwrap();
    assert_udp_violation(violation, OTHER_V6, PARTNER_V6, connected.pid);

    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(
        !lines.iter().any(|line| line
            .violation()
            .is_some_and(|v| v.src_port == unaudited.src_port)),
        "a process outside the audited cgroup was adopted: {lines:#?}"
    );
}

#[test]
fn a_compliant_udp_flow_gives_no_alert() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    let mut daemon = audit(&policy, &cgroup, &["--all"]);

    let good = udp_client(
        &topology.host,
        &cgroup.path,
        &["--bind", ALLOWED_V4, "--count", "5"],
        PARTNER_V4,
        53,
    );
    let line = daemon.wait_for("the compliant flow", |line| {
        line.connect().is_some_and(|c| c.src_port == good.src_port)
    });
    let connect = line.connect().unwrap();
    assert_eq!(
        (connect.protocol.as_str(), connect.verdict.as_str()),
        ("udp", "compliant")
    );
    // A violating marker, read after anything the compliant flow could have caused.
    let marker = udp_client(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V4],
        PARTNER_V4,
        53,
    );
    daemon.wait_for("the marker", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == marker.src_port)
    });
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let about_good: Vec<_> = lines
        .iter()
        .filter(|line| {
            line.violation()
                .is_some_and(|v| v.src_port == good.src_port)
        })
        .collect();
    assert!(about_good.is_empty(), "{about_good:#?}");
    let connects = lines
        .iter()
        .filter(|line| line.connect().is_some_and(|c| c.src_port == good.src_port))
        .count();
    assert_eq!(connects, 1, "five datagrams of one flow are one report");
}

/// The egress program reads a packet's headers in place, and one whose IPv4 header has
/// options through its socket and a helper instead: such datagrams are judged all the same,
/// once per flow.
#[test]
fn datagrams_whose_ipv4_header_has_options_are_judged_once_per_flow() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(DNS_POLICY);
    let mut daemon = audit(&policy, &cgroup, &["--all"]);

    let wrong = udp_client(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V4, "--ip-options", "--count", "3"],
        PARTNER_V4,
        53,
    );
    let right = udp_client(
        &topology.host,
        &cgroup.path,
        &["--ip-options", "--count", "3"],
        PARTNER_V4,
        53,
    );
    let line = daemon.wait_for("the datagrams' violation", violation_to(PARTNER_V4));
    assert_udp_violation(line.violation().unwrap(), OTHER_V4, PARTNER_V4, wrong.pid);
    daemon.wait_for("the compliant flow", |line| {
        line.connect()
            .is_some_and(|c| c.src_port == right.src_port && c.verdict == "compliant")
    });
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    for client in [&wrong, &right] {
        let reports = lines
            .iter()
            .filter(|line| {
                line.connection()
                    .is_some_and(|c| c.src_port == client.src_port)
            })
            .count();
        // Under `--all` too: the violating flow's one line is its violation.
        assert_eq!(
            reports, 1,
            "three datagrams of one flow are one line: {lines:#?}"
        );
    }
}

/// The UDP_FLOWS map's memory, as the kernel accounts it (fdinfo of srcip's map descriptors).
fn lru_map_memlock(pid: u32) -> u64 {
    let mut largest = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        // BPF_MAP_TYPE_LRU_HASH is 9.
        if info
            .lines()
            .any(|line| line.split_whitespace().eq(["map_type:", "9"]))
        {
            let memlock = info
                .lines()
                .find_map(|line| line.strip_prefix("memlock:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            largest = largest.max(memlock);
        }
    }
    largest
}

#[test]
fn ten_thousand_destinations_from_one_socket_lose_no_violation_within_the_memory_bound() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(
        r#"
[[rule]]
name = "fleet"
destinations = ["10.1.0.0/16"]
protocol = "udp"
allowed_sources = ["203.0.113.10"]
"#,
    );
    // A buffer for the burst: this test is about the kernel's flow memory, not the reader.
    let mut daemon = audit(&policy, &cgroup, &["--ring-buffer-size", "8388608"]);
    let client = udp_client(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V4, "--spread", "10000"],
        "10.1.0.0",
        5353,
    );
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 10_000 {
        let line = daemon.wait_for("violations to every destination", |line| {
            line.violation().is_some() || matches!(line, Line::Lost { .. })
        });
        match &line {
            Line::Lost { count, .. } => panic!("{count} records lost"),
            _ => {
                let violation = line.violation().unwrap();
                assert_eq!(
                    (violation.pid, violation.src.as_str()),
                    (client.pid, OTHER_V4)
                );
                seen.insert(violation.dst.clone());
            }
        }
    }
    // Documented bound: 32,768 flows, about 4 MiB (docs/reference.md).
    let memlock = lru_map_memlock(daemon.pid());
    assert!(
        memlock > 0 && memlock <= 8 << 20,
        "UDP_FLOWS holds {memlock} bytes"
    );
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(!lines.iter().any(|line| matches!(line, Line::Lost { .. })));
}

/// Each namespace srcip has not seen yet costs a probe (a thread that enters it), made by the
/// attribution stage, off the reader's path: every violation still names its own namespace,
/// whether its process is still there to be asked or already gone. (Not folded: the
/// violations differ only by namespace.)
#[test]
fn violations_from_many_network_namespaces_each_name_their_own() {
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(LOOPBACK_DNS_POLICY);
    let mut daemon = audit(&policy, &cgroup, &["--fold-window", "0"]);
    let namespaces: Vec<Netns> = (0..16).map(|_| Netns::new(unique_name())).collect();

    let sent: HashMap<u32, u64> = namespaces
        .iter()
        .map(|namespace| {
            let client = udp_client(namespace, &cgroup.path, &["--connect"], "127.0.0.53", 53);
            (client.pid, namespace.inode())
        })
        .collect();
    let mut reported = HashMap::new();
    while reported.len() < sent.len() {
        let line = daemon.wait_for("a violation from one of the namespaces", |line| {
            line.violation()
                .is_some_and(|violation| sent.contains_key(&violation.pid))
        });
        let violation = line.violation().unwrap();
        assert_eq!(
            (violation.src.as_str(), violation.rule.as_deref()),
            ("127.0.0.1", Some("loopback-dns"))
        );
        reported.insert(violation.pid, violation.netns);
    }
    for (pid, inode) in &sent {
        assert_eq!(reported[pid], Some(*inode), "the namespace of pid {pid}");
    }
}
