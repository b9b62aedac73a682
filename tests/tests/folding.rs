//! Repeats of a violation are counted in the kernel and written once per window.

use std::time::Duration;

use srcip_tests::{
    Connection, Daemon, Line, OTHER_V4, OTHER_V6, PARTNER_POLICY, PARTNER_V4, PARTNER_V6,
    PolicyFile, Signal, TestCgroup, Topology, connect, connect_many,
};

fn audit(policy: &PolicyFile, cgroup: &TestCgroup, extra: &[&str]) -> Daemon {
    let cgroup = cgroup.path.to_str().unwrap();
    let mut args = vec!["--cgroup", cgroup];
    args.extend(extra);
    Daemon::start(&policy.path, &args)
}

fn violations(lines: &[Line]) -> Vec<&Connection> {
    lines.iter().filter_map(Line::violation).collect()
}

/// Connections a set of violation lines stands for.
fn total(lines: &[&Connection]) -> u64 {
    lines.iter().map(|line| line.count.unwrap_or(1)).sum()
}

#[test]
fn a_burst_of_identical_violations_gives_one_alert_then_one_folded_alert() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup, &["--fold-window", "2s"]);

    let burst = connect_many(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
        10,
    );
    let first = daemon.wait_for("the first violation", |line| line.violation().is_some());
    let first = first.violation().unwrap();
    assert_eq!(first.src_port, burst[0].src_port);
    assert_eq!(first.count, None, "the first is written at once, alone");

    let folded = daemon.wait_for("the folded violation", |line| {
        line.violation().is_some_and(|v| v.count.is_some())
    });
    let folded = folded.violation().unwrap();
    assert_eq!(folded.count, Some(9));
    assert_eq!(
        (folded.src.as_str(), folded.dst.as_str()),
        (OTHER_V4, PARTNER_V4)
    );
    assert_eq!(folded.rule.as_deref(), Some("partner"));
    let (first_time, last_time) = (
        folded.first_time.as_deref().unwrap(),
        folded.last_time.as_deref().unwrap(),
    );
    assert!(first_time <= last_time && first.time.as_str() <= first_time);

    // Nothing more: the window is closed and flushed.
    let extra = daemon.wait_at_most(Duration::from_secs(3), "more violations", |line| {
        line.violation().is_some()
    });
    assert!(extra.is_none(), "unexpected: {extra:?}");
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    let all = violations(&lines);
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(total(&all), 10);
}

#[test]
fn another_destination_in_the_middle_of_a_burst_is_reported_at_once() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = audit(&policy, &cgroup, &["--fold-window", "3s"]);

    let before = connect_many(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
        4,
    );
    let other = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V6),
        PARTNER_V6,
        443,
    );
    let after = connect_many(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
        4,
    );
    let line = daemon.wait_for("the other destination's violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == other.src_port)
    });
    assert_eq!(line.violation().unwrap().count, None);
    // It came before the burst's window closed.
    assert!(
        !daemon
            .seen
            .iter()
            .any(|line| line.violation().is_some_and(|v| v.count.is_some())),
        "{:#?}",
        daemon.seen
    );
    let folded = daemon.wait_for("the folded violation", |line| {
        line.violation().is_some_and(|v| v.count.is_some())
    });
    assert_eq!(folded.violation().unwrap().count, Some(7));
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    assert_eq!(
        total(&violations(&lines)),
        (before.len() + 1 + after.len()) as u64
    );
}

#[test]
fn a_full_folding_table_loses_no_count() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    // Every port: each destination port is a key of its own.
    let policy = PolicyFile::new(
        r#"
[[rule]]
name = "partner"
destinations = ["198.51.100.50"]
allowed_sources = ["203.0.113.10"]
"#,
    );
    let mut daemon = audit(
        &policy,
        &cgroup,
        &["--fold-window", "1h", "--fold-table-size", "2"],
    );
    let mut made = 0;
    for port in 1000..1006 {
        made += connect_many(
            &topology.host,
            &cgroup.path,
            Some(OTHER_V4),
            PARTNER_V4,
            port,
            3,
        )
        .len();
    }
    // Two keys fold (one line each so far); four keys do not fit and are written one by one.
    let expected_now = 2 + 4 * 3;
    for _ in 0..expected_now {
        daemon.wait_for("a violation", |line| line.violation().is_some());
    }
    // Stopping flushes the open windows, however long they still had.
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    let all = violations(&lines);
    assert_eq!(total(&all), made as u64, "{all:#?}");
    assert_eq!(all.iter().filter(|v| v.count == Some(2)).count(), 2);
}
