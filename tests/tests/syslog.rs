//! Syslog sinks against a real rsyslogd: the local socket, UDP and TCP, each message with the
//! alert's fields as RFC 5424 structured data; and a TCP receiver that comes up late.

use srcip_tests::{
    Daemon, OTHER_V4, PARTNER_POLICY, PARTNER_V4, PolicyFile, Signal, TestCgroup, Topology,
    free_port, make_violation, rsyslog::Rsyslog,
};

#[test]
fn each_syslog_transport_delivers_the_violation_with_its_fields() {
    let port = free_port();
    let rsyslog = Rsyslog::start(port);
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let local = format!("syslog:{}", rsyslog.socket.display());
    let udp = format!("syslog+udp://127.0.0.1:{port}");
    let tcp = format!("syslog+tcp://127.0.0.1:{port}");
    let mut daemon = Daemon::start(
        &policy.path,
        &[
            "--sink",
            &local,
            "--sink",
            &udp,
            "--sink",
            &tcp,
            "--cgroup",
            cgroup.path.to_str().unwrap(),
        ],
    );

    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    let port_field = format!("src_port=\"{}\"", client.src_port);
    for input in ["imuxsock", "imudp", "imtcp"] {
        let lines = rsyslog.wait_for(input, |line| {
            line.starts_with(&format!("{input}|")) && line.contains(&port_field)
        });
        let line = lines
            .iter()
            .find(|line| line.starts_with(&format!("{input}|")) && line.contains(&port_field))
            .unwrap();
        let fields: Vec<&str> = line.splitn(5, '|').collect();
        assert_eq!(fields[1], "srcip", "{line}");
        assert_eq!(fields[2], "violation", "{line}");
        let data = fields[3];
        assert!(data.starts_with("[srcip@32473 "), "{line}");
        for expected in [
            format!("src=\"{OTHER_V4}\""),
            format!("dst=\"{PARTNER_V4}\""),
            "rule=\"partner\"".to_owned(),
            format!("pid=\"{}\"", client.pid),
            "allowed_sources=\"203.0.113.10,2001:db8::10\"".to_owned(),
        ] {
            assert!(data.contains(&expected), "{expected} missing: {line}");
        }
        assert!(fields[4].contains("VIOLATION rule=partner"), "{line}");
    }
}

#[test]
fn a_tcp_receiver_that_comes_up_late_gets_what_waited_for_it() {
    let port = free_port();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let tcp = format!("syslog+tcp://127.0.0.1:{port}");
    let mut daemon = Daemon::start(
        &policy.path,
        &["--sink", &tcp, "--cgroup", cgroup.path.to_str().unwrap()],
    );
    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    // Nothing listens yet: the sink retries with backoff until rsyslogd is up.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let rsyslog = Rsyslog::start(port);
    let port_field = format!("src_port=\"{}\"", client.src_port);
    let lines = rsyslog.wait_for("the waiting violation", |line| {
        line.starts_with("imtcp|") && line.contains(&port_field)
    });
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("imtcp|srcip|started|")),
        "the started line waited too: {lines:#?}"
    );
}

#[test]
fn alerts_wait_in_the_spool_across_a_restart_until_the_receiver_is_back() {
    let port = free_port();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let spool = tempfile::tempdir().unwrap();
    let tcp = format!("syslog+tcp://127.0.0.1:{port}");
    let args = [
        "--sink",
        &tcp,
        "--spool",
        spool.path().to_str().unwrap(),
        "--cgroup",
        cgroup.path.to_str().unwrap(),
    ];
    // The receiver is down for the whole life of the first daemon.
    let mut ports = Vec::new();
    for _ in 0..2 {
        let mut daemon = Daemon::start(&policy.path, &args);
        let client = make_violation(&mut daemon, &topology, &cgroup.path);
        ports.push(client.src_port);
        if ports.len() == 1 {
            let (status, _) = daemon.stop_with(srcip_tests::Signal::SIGTERM);
            assert!(status.success());
        } else {
            // The second daemon sends what the first left, once the receiver is up.
            let rsyslog = Rsyslog::start(port);
            for port in &ports {
                let field = format!("src_port=\"{port}\"");
                rsyslog.wait_for("a spooled violation", |line| {
                    line.starts_with("imtcp|srcip|violation|") && line.contains(&field)
                });
            }
            let lines = rsyslog.wait_for("the first daemon's stopped line", |line| {
                line.starts_with("imtcp|srcip|stopped|")
            });
            let started = lines
                .iter()
                .filter(|line| line.starts_with("imtcp|srcip|started|"))
                .count();
            assert_eq!(started, 2, "{lines:#?}");
        }
    }
}

/// An alert larger than a UDP datagram can carry (a `policy_error` that lists thousands of
/// mistakes) is never sent by `syslog+udp://`: it goes to the spool's dead letters, a
/// `dead_letter` line says so, and the sink goes on with the next alerts instead of trying
/// the same datagram forever.
#[test]
fn an_alert_too_large_for_a_datagram_is_dead_lettered_and_the_next_ones_arrive() {
    let port = free_port();
    let rsyslog = Rsyslog::start(port);
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let udp = format!("syslog+udp://127.0.0.1:{port}");
    let mut daemon = Daemon::start(
        &policy.path,
        &["--sink", &udp, "--cgroup", cgroup.path.to_str().unwrap()],
    );

    // Each rule's unknown key is one located error: about 100 KB of `policy_error`.
    let mistakes: String = (0..1500)
        .map(|index| format!("[[rule]]\nname = \"r{index}\"\nunknown_key_{index} = 1\n"))
        .collect();
    std::fs::write(&policy.path, mistakes).unwrap();
    daemon.signal(Signal::SIGHUP);
    let (sink, count, error) = daemon.wait_for_dead_letter();
    assert_eq!(sink, format!("syslog+udp://127.0.0.1:{port}"));
    assert_eq!(count, 1);
    assert!(error.contains("larger than a datagram"), "{error}");

    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    let port_field = format!("src_port=\"{}\"", client.src_port);
    rsyslog.wait_for("the violation after the dead letter", |line| {
        line.starts_with("imudp|") && line.contains(&port_field)
    });
    let delivered = rsyslog.wait_for("anything", |_| true);
    assert!(
        !delivered.iter().any(|line| line.contains("unknown_key_")),
        "a part of the oversize alert reached the receiver: {delivered:?}"
    );
}
