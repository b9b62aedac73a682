//! `--metrics`: Prometheus text that a Prometheus parser reads, with counters that match
//! the connections made.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use srcip_tests::{
    ALLOWED_V4, Daemon, LINE_TIMEOUT, Netns, PARTNER_POLICY, PARTNER_V4, PolicyFile, TestCgroup,
    Topology, connect, free_port, make_violation,
};

/// `GET /metrics` on the loopback of `netns`, where the daemon runs: the content type and
/// the parsed samples.
fn scrape(netns: &Netns, port: u16) -> (String, prometheus_parse::Scrape) {
    let namespace = std::fs::File::open(format!("/run/netns/{}", netns.name)).unwrap();
    // setns moves only the calling thread: a thread of its own enters the namespace.
    let mut stream = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the daemon's namespace");
                TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics")
            })
            .join()
            .unwrap()
    });
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: srcip\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let content_type = head
        .lines()
        .find_map(|line| line.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    let lines = body.lines().map(|line| Ok(line.to_owned()));
    (
        content_type,
        prometheus_parse::Scrape::parse(lines).expect("Prometheus text"),
    )
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    try_value(scrape, name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in {:#?}", scrape.samples))
}

fn try_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(value))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => value,
            _ => f64::NAN,
        })
}

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
        let (content_type, scrape) = scrape(&topology.host, port);
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
