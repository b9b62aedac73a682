//! TCP auditing end to end: the real `srcip run` with its real programs, real connections
//! inside namespaces and cgroups the tests create. Needs root; fails (never skips) without.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use srcip_tests::{
    ALLOWED_V4, ALLOWED_V6, Connection, Daemon, LINE_TIMEOUT, Line, OTHER_V4, OTHER_V6,
    PARTNER_POLICY, PARTNER_V4, PARTNER_V6, PolicyFile, START_TIMEOUT, Signal, TestCgroup,
    Topology, client, connect, connect_many, has_mptcp, kernel_at_least, srcip_bin,
};

/// A daemon auditing only `cgroup` (so that other tests' traffic never shows up here).
fn audit(policy: &PolicyFile, cgroup: &std::path::Path, all: bool) -> Daemon {
    let cgroup = cgroup.to_str().unwrap();
    let mut args = vec!["--cgroup", cgroup];
    if all {
        args.push("--all");
    }
    Daemon::start(&policy.path, &args)
}

fn is_connect_from(port: u16) -> impl Fn(&Line) -> bool {
    move |line| line.connect().is_some_and(|c| c.src_port == port)
}

fn is_violation_from(port: u16) -> impl Fn(&Line) -> bool {
    move |line| line.violation().is_some_and(|c| c.src_port == port)
}

/// The egress program reads a packet's headers in place, and one whose IPv4 header has
/// options through its socket and a helper instead: such a connection is judged all the same.
#[test]
fn a_connection_whose_ipv4_header_has_options_is_judged() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, false);

    let options = ["--bind", OTHER_V4, "--ip-options"];
    let wrong = client(&topology.host, &cgroup.path, &options, PARTNER_V4, 443)
        .pop()
        .expect("tcp-client reports its connection");
    let line = daemon.wait_for("the violation", is_violation_from(wrong.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(
        (
            violation.src.as_str(),
            violation.dst.as_str(),
            violation.dst_port
        ),
        (OTHER_V4, PARTNER_V4, 443)
    );
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let violations = lines.iter().filter_map(Line::violation).count();
    assert_eq!(violations, 1, "{lines:#?}");
}

#[test]
fn compliant_connection_gives_no_alert() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, true);

    let client = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    assert_eq!(
        client.src, ALLOWED_V4,
        "the kernel should pick the primary address"
    );
    let line = daemon.wait_for("connect", is_connect_from(client.src_port));
    assert_eq!(line.connect().unwrap().verdict, "compliant");

    // A second connection marks the point by which a violation for the first would have
    // been written (one ring buffer, read in order).
    let marker = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    daemon.wait_for("connect", is_connect_from(marker.src_port));
    let violations: Vec<_> = daemon.seen.iter().filter_map(Line::violation).collect();
    assert!(
        violations.is_empty(),
        "unexpected violations: {violations:#?}"
    );
}

#[test]
fn wrong_source_gives_a_violation_with_every_field() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, false);

    let client = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let line = daemon.wait_for("violation", is_violation_from(client.src_port));
    let violation = line.violation().unwrap();
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(
        violation,
        &Connection {
            time: violation.time.clone(),
            host,
            rule: Some("partner".into()),
            action: "alert".into(),
            protocol: "tcp".into(),
            family: "ipv4".into(),
            src: OTHER_V4.into(),
            wire_src: None,
            src_port: client.src_port,
            dst: PARTNER_V4.into(),
            dst_port: 443,
            allowed_sources: vec![ALLOWED_V4.into(), ALLOWED_V6.into()],
            pid: client.pid,
            comm: "tcp-client".into(),
            uid: 0,
            cgroup_id: TestCgroup::id(&cgroup.path),
            cgroup: Some(TestCgroup::relative(&cgroup.path)),
            netns: Some(topology.host.inode()),
            unit: None,
            container: None,
            verdict: "violation".into(),
            // The program bound its source: not the kernel's choice, so no reason.
            reason: None,
            blocked: None,
            blocked_at: None,
            pin_error: None,
            predicted: None,
            count: None,
            first_time: None,
            last_time: None,
        }
    );
    assert!(
        violation.time.ends_with('Z') && violation.time.contains('.'),
        "time must be RFC 3339 UTC with fractional seconds: {}",
        violation.time
    );
}

#[test]
fn route_change_alone_is_caught() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, true);

    let before = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    assert_eq!(before.src, ALLOWED_V4);
    let line = daemon.wait_for("connect", is_connect_from(before.src_port));
    assert_eq!(line.connect().unwrap().verdict, "compliant");

    // The same unmodified program, after a route change: the kernel now picks .11.
    topology.route_partner_via_other_source();
    let after = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    assert_eq!(
        after.src, OTHER_V4,
        "the route change should change the kernel's choice"
    );
    let line = daemon.wait_for("violation", is_violation_from(after.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(
        (violation.src.as_str(), violation.dst.as_str()),
        (OTHER_V4, PARTNER_V4)
    );
    assert_eq!(violation.pid, after.pid);
}

#[test]
fn ipv6_violation_is_reported() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, true);

    let good = connect(&topology.host, &cgroup.path, None, PARTNER_V6, 443);
    assert_eq!(good.src, ALLOWED_V6);
    let line = daemon.wait_for("connect", is_connect_from(good.src_port));
    let compliant = line.connect().unwrap();
    assert_eq!(
        (compliant.family.as_str(), compliant.verdict.as_str()),
        ("ipv6", "compliant")
    );

    let bad = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V6),
        PARTNER_V6,
        443,
    );
    let line = daemon.wait_for("violation", is_violation_from(bad.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.family, "ipv6");
    assert_eq!(violation.src, OTHER_V6);
    assert_eq!(violation.dst, PARTNER_V6);
    assert_eq!(violation.rule.as_deref(), Some("partner"));
}

#[test]
fn ipv4_mapped_connection_is_reported_as_ipv4() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, false);

    // An AF_INET6 socket to ::ffff:198.51.100.50, bound to ::ffff:203.0.113.11.
    let mapped_partner = format!("::ffff:{PARTNER_V4}");
    let mapped_source = format!("::ffff:{OTHER_V4}");
    let client = connect(
        &topology.host,
        &cgroup.path,
        Some(&mapped_source),
        &mapped_partner,
        443,
    );
    assert_eq!(client.src, mapped_source, "the socket itself is IPv6");
    let line = daemon.wait_for("violation", is_violation_from(client.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.family, "ipv4");
    assert_eq!(violation.src, OTHER_V4);
    assert_eq!(violation.dst, PARTNER_V4);
    assert_eq!(violation.rule.as_deref(), Some("partner"));
}

#[test]
fn process_outside_the_audited_cgroup_is_ignored() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["audited", "other"]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.child("audited"), true);

    let outside = connect(
        &topology.host,
        &cgroup.child("other"),
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let inside = connect(
        &topology.host,
        &cgroup.child("audited"),
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    daemon.wait_for("violation", is_violation_from(inside.src_port));

    // The kernel writes records in order, so the outside connection would be before this.
    let from_outside: Vec<_> = daemon
        .seen
        .iter()
        .filter_map(|line| line.connect().or(line.violation()))
        .filter(|connection| connection.pid == outside.pid)
        .collect();
    assert!(
        from_outside.is_empty(),
        "audited a process outside --cgroup: {from_outside:#?}"
    );
}

#[test]
fn descendants_of_the_audited_cgroup_are_audited() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["service", "service/worker"]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.child("service"), false);

    let worker = cgroup.child("service/worker");
    let client = connect(&topology.host, &worker, Some(OTHER_V4), PARTNER_V4, 443);
    let line = daemon.wait_for("violation", is_violation_from(client.src_port));
    assert_eq!(
        line.violation().unwrap().cgroup,
        Some(TestCgroup::relative(&worker))
    );
}

#[test]
fn started_names_the_kernel_and_nothing_else_is_degraded_for_root() {
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let daemon = audit(&policy, &cgroup.path, false);
    let Some(Line::Started {
        kernel, degraded, ..
    }) = daemon.seen.first()
    else {
        panic!("the first line is not started: {:#?}", daemon.seen);
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(kernel, release.trim());
    // Before 5.19 srcip cannot tell an MPTCP subflow's socket, and says so where the kernel
    // has MPTCP; nothing else.
    if kernel_at_least(5, 19) || !has_mptcp() {
        assert!(degraded.is_empty(), "{degraded:?}");
    } else {
        assert_eq!(degraded.len(), 1, "{degraded:?}");
        assert!(degraded[0].starts_with("mptcp: "), "{degraded:?}");
    }
}

#[test]
fn sigterm_and_sigint_give_stopped_and_exit_0() {
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let daemon = audit(&policy, &cgroup.path, false);
        let (status, lines) = daemon.stop_with(signal);
        assert_eq!(status.code(), Some(0), "exit status after {signal}");
        assert!(
            matches!(lines.last(), Some(Line::Stopped { .. })),
            "last line after {signal} must be stopped: {lines:#?}"
        );
    }
}

#[test]
fn host_names_in_destinations_are_resolved_at_load() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    // /etc/hosts resolves localhost without any network.
    let policy = PolicyFile::new(
        r#"
[[rule]]
name = "local-service"
destinations = ["localhost"]
allowed_sources = ["127.0.0.2"]
"#,
    );
    let mut daemon = audit(&policy, &cgroup.path, false);

    let client = connect(&topology.host, &cgroup.path, None, "127.0.0.1", 9);
    let line = daemon.wait_for("violation", is_violation_from(client.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.rule.as_deref(), Some("local-service"));
    assert_eq!(
        (violation.src.as_str(), violation.dst.as_str()),
        ("127.0.0.1", "127.0.0.1")
    );
}

#[test]
fn an_audited_cgroup_that_is_recreated_stays_audited() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&["unit"]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let unit = cgroup.child("unit");
    let mut daemon = audit(&policy, &unit, false);

    // What systemd does on every restart of a unit: a new directory, with a new id.
    std::fs::remove_dir(&unit).unwrap();
    std::fs::create_dir(&unit).unwrap();

    // srcip notices within about a second; until then connections may be missed.
    for _ in 0..20 {
        let client = connect(&topology.host, &unit, Some(OTHER_V4), PARTNER_V4, 443);
        let seen = daemon.wait_at_most(
            std::time::Duration::from_millis(500),
            "violation",
            is_violation_from(client.src_port),
        );
        if let Some(line) = seen {
            assert_eq!(line.violation().unwrap().cgroup_id, TestCgroup::id(&unit));
            return;
        }
    }
    panic!(
        "connections from the recreated cgroup were never audited: {:#?}",
        daemon.seen
    );
}

#[test]
fn records_the_kernel_cannot_deliver_are_counted_as_lost() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let path = cgroup.path.to_str().unwrap();
    // 4 KiB holds 39 records; srcip is stopped while 100 connections are made.
    let mut daemon = Daemon::start(
        &policy.path,
        &["--cgroup", path, "--all", "--ring-buffer-size", "4096"],
    );
    daemon.signal(Signal::SIGSTOP);
    let clients = connect_many(&topology.host, &cgroup.path, None, PARTNER_V4, 443, 100);
    daemon.signal(Signal::SIGCONT);

    let Line::Lost { count, .. } =
        daemon.wait_for("lost", |line| matches!(line, Line::Lost { .. }))
    else {
        unreachable!()
    };
    let ports: Vec<u16> = clients.iter().map(|client| client.src_port).collect();
    let delivered = daemon
        .seen
        .iter()
        .filter_map(Line::connect)
        .filter(|connection| ports.contains(&connection.src_port))
        .count();
    assert!(
        delivered > 0 && count > 0,
        "delivered {delivered}, lost {count}"
    );
    assert_eq!(
        delivered as u64 + count,
        100,
        "every connection is either reported or counted"
    );
}

/// Under `unmatched = "alert"`, a connection no rule matched is a `violation` line with no
/// rule, whose verdict says why: `unmatched` (the reference and the contract say so).
#[test]
fn an_unmatched_connection_under_unmatched_alert_is_a_violation_whose_verdict_is_unmatched() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(&format!("unmatched = \"alert\"\n{PARTNER_POLICY}"));
    let mut daemon = audit(&policy, &cgroup.path, false);

    let unmatched = connect(&topology.host, &cgroup.path, None, "203.0.113.1", 22);
    let line = daemon.wait_for(
        "the unmatched violation",
        is_violation_from(unmatched.src_port),
    );
    let violation = line.violation().unwrap();
    assert_eq!(
        (
            violation.rule.as_deref(),
            violation.verdict.as_str(),
            violation.action.as_str()
        ),
        (None, "unmatched", "alert"),
        "{violation:#?}"
    );
    let compliant = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    let wrong = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let line = daemon.wait_for("the rule's violation", is_violation_from(wrong.src_port));
    assert_eq!(line.violation().unwrap().verdict, "violation");
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(
        !lines
            .iter()
            .filter_map(Line::violation)
            .any(|line| line.src_port == compliant.src_port),
        "{lines:#?}"
    );
}

#[test]
fn compliant_and_ignored_connections_are_decided_in_the_kernel() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, false);

    // Three compliant connections, and one no rule matches (the policy ignores those).
    connect_many(&topology.host, &cgroup.path, None, PARTNER_V4, 443, 3);
    connect(&topology.host, &cgroup.path, None, "203.0.113.1", 22);
    let marker = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    daemon.wait_for("violation", is_violation_from(marker.src_port));

    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0));
    let Some(Line::Stopped {
        decided_in_kernel, ..
    }) = lines.last()
    else {
        panic!("no stopped line: {lines:#?}")
    };
    assert_eq!(*decided_in_kernel, 4, "{lines:#?}");
    let reported: Vec<_> = lines.iter().filter_map(Line::violation).collect();
    assert_eq!(
        reported.len(),
        1,
        "only the violation reaches user space: {lines:#?}"
    );
}

#[test]
fn a_connection_the_kernel_makes_for_a_socket_is_audited_and_attributed_to_its_owner() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, false);

    // The program creates and binds the socket; an io_uring worker connects it, outside the
    // program's context: a kernel thread in the root cgroup before Linux 5.12 (and 5.10.162),
    // an `iou-wrk-TID` thread with a name of its own since.
    let options = ["--bind", OTHER_V4, "--io-uring"];
    let client = client(&topology.host, &cgroup.path, &options, PARTNER_V4, 443)
        .pop()
        .expect("tcp-client reports its socket");
    let line = daemon.wait_for("violation", is_violation_from(client.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.src, OTHER_V4);
    assert_eq!(violation.pid, client.pid);
    assert_eq!(violation.comm, "tcp-client");
    assert_eq!(violation.cgroup_id, TestCgroup::id(&cgroup.path));
    assert_eq!(
        violation.cgroup.as_deref(),
        Some(TestCgroup::relative(&cgroup.path).as_str())
    );
    assert_eq!(violation.netns, Some(topology.host.inode()));
}

#[test]
fn a_socket_whose_owner_slot_was_taken_before_it_connected_keeps_its_owner() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, false);

    // The socket waits, unconnected, while tens of thousands of others are made, until one
    // takes its slot of the owner table; then a task of another name connects it.
    let options = [
        "--bind",
        OTHER_V4,
        "--comm",
        "early-creator",
        "--displace-owner",
    ];
    let client = client(&topology.host, &cgroup.path, &options, PARTNER_V4, 443)
        .pop()
        .expect("tcp-client reports its socket");
    let line = daemon.wait_for("violation", is_violation_from(client.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.src, OTHER_V4);
    assert_eq!(violation.pid, client.pid);
    assert_eq!(
        violation.comm, "early-creator",
        "the owner recorded when the socket was made, not the connecting task"
    );
}

#[test]
fn a_process_named_with_a_newline_cannot_forge_a_text_alert_line() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let socket = tempfile::tempdir().unwrap();
    // In the topology's namespace, where the partner's routes are allowed: no `route_drift`
    // line can come after the violation, which must be the last line.
    let mut srcip = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.host.name))
        .arg(srcip_bin())
        .args(["run", "--format", "text", "--policy"])
        .arg(&policy.path)
        .arg("--socket")
        .arg(socket.path().join("srcip.sock"))
        .arg("--cgroup")
        .arg(&cgroup.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning srcip run");
    let (sender, lines) = mpsc::channel();
    let stdout = srcip.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut seen = vec![lines.recv_timeout(START_TIMEOUT).expect("a started line")];
    assert!(seen[0].contains(" started: "), "{seen:?}");

    // 15 bytes, the most a name holds: what a forged line would start with.
    let forger = "x\nZ VIOLATION";
    let options = ["--bind", OTHER_V4, "--comm", forger];
    let client = client(&topology.host, &cgroup.path, &options, PARTNER_V4, 443)
        .pop()
        .expect("tcp-client reports its connection");
    let port = format!(":{} ", client.src_port);
    while !seen.last().unwrap().contains(&port) {
        seen.push(
            lines
                .recv_timeout(LINE_TIMEOUT)
                .expect("the violation's line"),
        );
    }
    srcip.kill().unwrap();
    srcip.wait().unwrap();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        seen.push(line);
    }

    let violation = seen.last().unwrap();
    assert!(
        violation.contains(" VIOLATION ") && violation.contains(" comm=x\\nZ\\x20VIOLATION "),
        "the name must be escaped: {violation}"
    );
    for line in &seen {
        assert!(
            line.starts_with("20") && line.contains('Z'),
            "every line starts with its time: {line:?} in {seen:#?}"
        );
    }
}

#[test]
fn cgroups_named_like_a_systemd_unit_or_a_container_name_them() {
    let topology = Topology::new();
    let id = "4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e";
    let container_scope = format!("docker-{id}.scope");
    let cgroup = TestCgroup::new(&["payments.service", &container_scope]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup.path, false);

    let unit = connect(
        &topology.host,
        &cgroup.child("payments.service"),
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let line = daemon.wait_for("the unit's violation", is_violation_from(unit.src_port));
    let violation = line.violation().unwrap();
    assert_eq!(violation.unit.as_deref(), Some("payments.service"));
    assert_eq!(violation.container, None);

    let container = connect(
        &topology.host,
        &cgroup.child(&container_scope),
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let line = daemon.wait_for(
        "the container's violation",
        is_violation_from(container.src_port),
    );
    let violation = line.violation().unwrap();
    assert_eq!(violation.container.as_deref(), Some(id));
    assert_eq!(violation.unit.as_deref(), Some(container_scope.as_str()));
}
