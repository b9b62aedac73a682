//! Reloading the policy while auditing: a file that does not validate keeps the policy in
//! force; a good one (noticed when the file changes, or on SIGHUP) decides the next
//! connection, in the kernel too.

use srcip_tests::{
    ALLOWED_V4, Daemon, Line, OTHER_V4, PARTNER_POLICY, PARTNER_V4, PolicyFile, Signal, TestCgroup,
    Topology, connect, connect_line,
};

/// The partner changed its mind: now only .11 is allowed.
const NEW_POLICY: &str = r#"
[[rule]]
name = "partner-moved"
destinations = ["198.51.100.50"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.11"]
"#;

const BAD_POLICY: &str = r#"
[[rule]]
name = "partner"
destinations = ["198.51.100.50"]
allowed_sources = ["not-an-address"]
"#;

/// Replaces the file the way configuration tools do: a new file renamed over the old.
fn replace(policy: &PolicyFile, text: &str) {
    let next = policy.path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, &policy.path).unwrap();
}

/// Connects from `bind` (the kernel's choice when `None`) and returns the connect line's
/// verdict and rule, with the source the kernel chose.
fn verdict_of_connection(
    daemon: &mut Daemon,
    topology: &Topology,
    cgroup: &TestCgroup,
    bind: Option<&str>,
) -> (String, Option<String>, String) {
    let line = connect_line(daemon, &topology.host, &cgroup.path, bind, PARTNER_V4, 443);
    (line.verdict, line.rule, line.src)
}

#[test]
fn a_bad_reload_keeps_the_policy_and_a_good_one_decides_the_next_connection() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::start(
        &policy.path,
        &["--all", "--cgroup", cgroup.path.to_str().unwrap()],
    );

    replace(&policy, BAD_POLICY);
    let line = daemon.wait_for("policy_error", |line| {
        matches!(line, Line::PolicyError { .. })
    });
    let Line::PolicyError { errors, .. } = line else {
        unreachable!()
    };
    let location = format!("{}:5:", policy.path.display());
    assert!(
        errors.iter().any(|error| error.starts_with(&location)),
        "located errors expected: {errors:#?}"
    );
    // The old policy is still in force, in the kernel and in srcip.
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, Some(OTHER_V4)),
        ("violation".into(), Some("partner".into()), OTHER_V4.into())
    );

    replace(&policy, NEW_POLICY);
    let line = daemon.wait_for("reloaded", |line| matches!(line, Line::Reloaded { .. }));
    assert!(matches!(line, Line::Reloaded { rules: 1, .. }), "{line:?}");
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, Some(OTHER_V4)),
        (
            "compliant".into(),
            Some("partner-moved".into()),
            OTHER_V4.into()
        )
    );
    // The kernel's own choice, .10, is now the wrong one.
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, None),
        (
            "violation".into(),
            Some("partner-moved".into()),
            ALLOWED_V4.into()
        )
    );
    let line = daemon.wait_for("the violation", |line| line.violation().is_some());
    assert_eq!(line.violation().unwrap().src, ALLOWED_V4);

    // SIGHUP reads the file again, changed or not.
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for("reloaded", |line| matches!(line, Line::Reloaded { .. }));
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    assert!(matches!(lines.last(), Some(Line::Stopped { .. })));
}

#[test]
fn compliant_traffic_stays_decided_in_the_kernel_after_a_reload() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::start(&policy.path, &["--cgroup", cgroup.path.to_str().unwrap()]);
    replace(&policy, NEW_POLICY);
    daemon.wait_for("reloaded", |line| matches!(line, Line::Reloaded { .. }));
    // Ten compliant connections under the new policy, then one violation as a marker.
    for _ in 0..10 {
        connect(
            &topology.host,
            &cgroup.path,
            Some(OTHER_V4),
            PARTNER_V4,
            443,
        );
    }
    let marker = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    daemon.wait_for("the marker violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == marker.src_port)
    });
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let Some(Line::Stopped {
        decided_in_kernel, ..
    }) = lines.last()
    else {
        panic!("no stopped line: {lines:#?}")
    };
    assert_eq!(
        *decided_in_kernel, 10,
        "the kernel decided them with the new tables"
    );
    assert_eq!(lines.iter().filter_map(Line::violation).count(), 1);
}
