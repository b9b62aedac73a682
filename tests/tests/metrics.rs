//! `--metrics`: Prometheus text that a Prometheus parser reads, with counters that match
//! the connections made.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use srcip_tests::{
    ALLOWED_V4, Daemon, LINE_TIMEOUT, PARTNER_POLICY, PARTNER_V4, PolicyFile, TestCgroup, Topology,
    connect, free_port, make_violation,
    prometheus::{scrape, try_value, value},
};

#[test]
fn metrics_count_what_was_observed_decided_and_delivered() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    // In the topology's namespace, where the partner's routes are compliant: no drift lines
    // to count.
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &[
            "--metrics",
            &address,
            "--fold-window",
            "0",
            "--cgroup",
            cgroup.path.to_str().unwrap(),
        ],
    );

    let compliant = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    assert_eq!(compliant.src, ALLOWED_V4);
    for _ in 0..2 {
        make_violation(&mut daemon, &topology, &cgroup.path);
    }

    // The kernel's counters are read once a second.
    let deadline = Instant::now() + LINE_TIMEOUT;
    let scrape = loop {
        let (content_type, scrape) = scrape(Some(&topology.host), port);
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        let tcp = [("protocol", "tcp")];
        if try_value(&scrape, "srcip_connections_observed_total", &tcp) >= Some(3.0) {
            break scrape;
        }
        assert!(Instant::now() < deadline, "{:#?}", scrape.samples);
        std::thread::sleep(Duration::from_millis(200));
    };
    let tcp = [("protocol", "tcp")];
    assert_eq!(
        value(&scrape, "srcip_connections_observed_total", &tcp),
        3.0
    );
    assert_eq!(
        value(&scrape, "srcip_connections_decided_in_kernel_total", &tcp),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "srcip_violations_total",
            &[("rule", "partner"), ("action", "alert")]
        ),
        2.0
    );
    assert_eq!(value(&scrape, "srcip_lost_records_total", &[]), 0.0);
    assert_eq!(value(&scrape, "srcip_kernel_hook_errors_total", &[]), 0.0);
    // started and two violations, all written to stdout by now (the test read them there).
    assert_eq!(
        value(&scrape, "srcip_sink_delivered_total", &[("sink", "stdout")]),
        3.0
    );
    assert_eq!(
        value(&scrape, "srcip_sink_failed_total", &[("sink", "stdout")]),
        0.0
    );
    assert_eq!(
        value(&scrape, "srcip_sink_backlog", &[("sink", "stdout")]),
        0.0
    );
}

/// Every series that can be known at start is served from the start, at 0 (so that `rate()`
/// sees the first event): each rule's violations, `block` rules' blocked and `pin` rules'
/// pinned, each rule's drifting routes, reloads of both results, observed connections of
/// both protocols; `srcip_build_info` says the version. Spool series exist only for sinks
/// with a spool. A route change then shows in `srcip_routes_drifting` of its rule, and its
/// undoing takes it back to 0.
#[test]
fn every_series_is_served_at_zero_from_the_start_and_drifting_routes_are_a_gauge() {
    let topology = Topology::new();
    let policy = PolicyFile::new(
        r#"
unmatched = "alert"

[[rule]]
name = "partner"
destinations = ["198.51.100.50"]
allowed_sources = ["203.0.113.10"]

[[rule]]
name = "blocked-partner"
destinations = ["198.51.100.60"]
allowed_sources = ["203.0.113.10"]
action = "block"

[[rule]]
name = "pinned-partner"
destinations = ["198.51.100.70"]
allowed_sources = ["203.0.113.10"]
action = "pin"
"#,
    );
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let folder = tempfile::tempdir().unwrap();
    let file_sink = format!("file:{}", folder.path().join("alerts.json").display());
    // Nothing listens there: the webhook's alerts wait in its spool.
    let webhook = format!("http://127.0.0.1:{}/alerts", free_port());
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &[
            "--metrics",
            &address,
            "--sink",
            &file_sink,
            "--sink",
            &webhook,
        ],
    );

    let (_, at_start) = scrape(Some(&topology.host), port);
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(value(&at_start, name, labels), 0.0, "{name} {labels:?}");
    };
    for (rule, action) in [
        ("partner", "alert"),
        ("blocked-partner", "block"),
        ("pinned-partner", "pin"),
    ] {
        zero(
            "srcip_violations_total",
            &[("rule", rule), ("action", action)],
        );
        zero("srcip_routes_drifting", &[("rule", rule)]);
    }
    zero(
        "srcip_blocked_total",
        &[("rule", "blocked-partner"), ("action", "block")],
    );
    zero(
        "srcip_pinned_total",
        &[("rule", "pinned-partner"), ("action", "pin")],
    );
    for result in ["ok", "error"] {
        zero("srcip_policy_reloads_total", &[("result", result)]);
    }
    for protocol in ["tcp", "udp"] {
        zero(
            "srcip_connections_observed_total",
            &[("protocol", protocol)],
        );
        zero(
            "srcip_connections_decided_in_kernel_total",
            &[("protocol", protocol)],
        );
    }
    assert_eq!(
        value(
            &at_start,
            "srcip_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for sink in ["stdout", file_sink.as_str()] {
        assert_eq!(
            try_value(&at_start, "srcip_sink_spooled_total", &[("sink", sink)]),
            None,
            "{sink} has no spool"
        );
        zero("srcip_sink_failed_total", &[("sink", sink)]);
    }
    // The webhook is named without its path (which may hold a token).
    let webhook_origin = webhook.trim_end_matches("/alerts");
    assert!(
        at_start.samples.iter().any(|sample| {
            sample.metric == "srcip_sink_spooled_total"
                && sample
                    .labels
                    .get("sink")
                    .is_some_and(|sink| sink.starts_with(webhook_origin))
        }),
        "{:#?}",
        at_start.samples
    );

    topology.route_partner_via_other_source();
    daemon.wait_for("route_drift", |line| line.route_drift().is_some());
    let (_, drifting) = scrape(Some(&topology.host), port);
    assert_eq!(
        value(&drifting, "srcip_routes_drifting", &[("rule", "partner")]),
        1.0
    );
    srcip_tests::ip_in(&topology.host.name, "route del 198.51.100.50/32");
    daemon.wait_for("route_recovered", |line| line.route_recovered().is_some());
    let (_, recovered) = scrape(Some(&topology.host), port);
    assert_eq!(
        value(&recovered, "srcip_routes_drifting", &[("rule", "partner")]),
        0.0
    );
}

/// More idle connections to `--metrics` than srcip has file descriptors (the 1,024 of a
/// service's default limit): srcip serves a few and closes the rest at once, so that
/// attribution, which opens each cgroup it names, keeps working; and `/metrics` answers again
/// once the idle connections it served have had their time.
#[test]
fn thousands_of_idle_metrics_connections_take_neither_attribution_nor_metrics() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const IDLE: usize = 2000;
    // Room for the idle connections in this process (tests run as root, who may raise it).
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < 8192 {
        setrlimit(Resource::RLIMIT_NOFILE, 8192, hard.max(8192))
            .expect("raising this test's file descriptor limit to 8192");
    }

    let port = free_port();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let metrics = format!("127.0.0.1:{port}");
    let args = [
        "--metrics",
        &metrics,
        "--cgroup",
        cgroup.path.to_str().unwrap(),
        "--fold-window",
        "0",
    ];
    let mut daemon = Daemon::start_with_file_limit(&policy.path, &args, 1024);
    // A daemon that stops accepting leaves connections in the listen backlog (128), and then
    // unanswered. One that is only slow for a moment (a busy shared machine) is waited for:
    // each connection has five tries of two seconds.
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let connect =
        || (0..5).find_map(|_| TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok());
    let idle: Vec<TcpStream> = (0..IDLE).map_while(|_| connect()).collect();
    assert!(
        idle.len() > 1024,
        "srcip took only {} connections before it stopped accepting",
        idle.len()
    );

    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    let violation = daemon
        .seen
        .iter()
        .rev()
        .find_map(|line| line.violation().filter(|v| v.src_port == client.src_port))
        .unwrap()
        .clone();
    assert_eq!(
        violation.cgroup,
        Some(TestCgroup::relative(&cgroup.path)),
        "attribution has the file descriptors it needs"
    );

    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let answered = TcpStream::connect(("127.0.0.1", port)).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: srcip\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        });
        match answered {
            Ok(response) if response.starts_with("HTTP/1.0 200") => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            other => panic!("/metrics does not answer any more: {other:?}"),
        }
    }
    drop(idle);
}
