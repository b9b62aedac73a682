//! Reloading the policy while auditing: a file that does not validate keeps the policy in
//! force; a good one (noticed when the file changes, or on SIGHUP) decides the next
//! connection, in the kernel too.

use srcip_tests::{
    ALLOWED_V4, Daemon, Line, OTHER_V4, PARTNER_POLICY, PARTNER_V4, PolicyFile, Signal, TestCgroup,
    Topology, attempt_connect, connect, connection_line, make_violation,
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

/// Connects from `bind` (the kernel's choice when `None`) and returns the connection line's
/// verdict and rule, with the source the kernel chose.
fn verdict_of_connection(
    daemon: &mut Daemon,
    topology: &Topology,
    cgroup: &TestCgroup,
    bind: Option<&str>,
) -> (String, Option<String>, String) {
    let line = connection_line(daemon, &topology.host, &cgroup.path, bind, PARTNER_V4, 443);
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
    // The kernel's own choice, .10, is now the wrong one (its one line is its violation).
    assert_eq!(
        verdict_of_connection(&mut daemon, &topology, &cgroup, None),
        (
            "violation".into(),
            Some("partner-moved".into()),
            ALLOWED_V4.into()
        )
    );
    assert!(daemon.seen.last().unwrap().violation().is_some());

    // SIGHUP reads the file again, changed or not.
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for("reloaded", |line| matches!(line, Line::Reloaded { .. }));
    // `srcip status` counts what the stream said: two reloads applied, one refused, and
    // the policy's third revision in force.
    let status: serde_json::Value = serde_json::from_str(&daemon.status("json")).unwrap();
    assert_eq!(
        (
            &status["counts"]["reloads_applied"],
            &status["counts"]["reloads_refused"],
            &status["policy"]["revision"],
            &status["policy"]["refused_reload"],
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(1),
            &serde_json::json!(3),
            &serde_json::Value::Null,
        ),
        "{status:#}"
    );
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

/// The partner now takes .11 as well on 443, and refuses all but .11 on 8443 (which no other
/// test here uses: srcip audits the whole host in the test below). Its tables take four
/// writes: three IPv4 destinations and one IPv6.
const WIDER_POLICY_THAT_BLOCKS: &str = r#"
[[rule]]
name = "partner"
destinations = ["198.51.100.50", "2001:db8:50::/64"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.10", "203.0.113.11", "2001:db8::10"]

[[rule]]
name = "partner-8443"
destinations = ["198.51.100.50", "198.51.100.51"]
ports = [8443]
allowed_sources = ["203.0.113.11"]
action = "block"

# Pinning UDP needs the sendmsg programs (blocking alone does not).
[[rule]]
name = "loopback-resolver"
destinations = ["198.51.100.53"]
protocol = "udp"
allowed_sources = ["127.0.0.1"]
action = "pin"
"#;

/// srcip's bpf links, each a program it attached.
fn links_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|entry| {
            let target = std::fs::read_link(entry.as_ref().unwrap().path()).unwrap_or_default();
            target.as_os_str() == "anon_inode:bpf_link"
        })
        .count()
}

/// A reload whose kernel write fails half-way (`SRCIP_TEST_FAIL_RELOAD_AT`: the second trie
/// write of the first reload fails, as an allocation the kernel refuses would) leaves the old
/// policy deciding, whole, in the kernel and in srcip, and detaches the sendmsg programs it
/// attached for the new one; the next reload puts the new policy in force.
#[test]
fn a_reload_that_fails_half_way_leaves_the_old_policy_whole_and_nothing_attached() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    // The whole host: a scoped audit keeps the sendmsg programs attached anyway. Every
    // violation written: the two blocked connections below are one flow.
    let mut daemon = Daemon::start_with_environment(
        &policy.path,
        &["--fold-window", "0"],
        &[("SRCIP_TEST_FAIL_RELOAD_AT", "2".as_ref())],
    );
    let links_at_start = links_of(daemon.pid());

    replace(&policy, WIDER_POLICY_THAT_BLOCKS);
    let line = daemon.wait_for("policy_error", |line| {
        matches!(line, Line::PolicyError { .. })
    });
    let Line::PolicyError { errors, .. } = line else {
        unreachable!()
    };
    assert!(
        errors
            .iter()
            .any(|error| error.contains("SRCIP_TEST_FAIL_RELOAD_AT")),
        "{errors:#?}"
    );
    assert_eq!(
        links_of(daemon.pid()),
        links_at_start,
        "the sendmsg programs attached for the new policy are detached again"
    );
    // The old policy decides: .11 to 443 is a violation of it, and 8443 has no rule.
    make_violation(&mut daemon, &topology, &cgroup.path);
    let violation = daemon.seen.last().and_then(Line::violation).unwrap();
    assert_eq!(violation.rule.as_deref(), Some("partner"));
    let unblocked = attempt_connect(
        &topology.host,
        &cgroup.path,
        Some(ALLOWED_V4),
        PARTNER_V4,
        8443,
    );
    assert_ne!(unblocked.error.as_deref(), Some("EPERM"));

    // Asked again, it goes in whole.
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for("reloaded", |line| matches!(line, Line::Reloaded { .. }));
    assert_eq!(links_of(daemon.pid()), links_at_start + 2);
    let blocked = attempt_connect(
        &topology.host,
        &cgroup.path,
        Some(ALLOWED_V4),
        PARTNER_V4,
        8443,
    );
    assert_eq!(blocked.error.as_deref(), Some("EPERM"));
    // .11 to 443 is compliant now: the next violation is the one made after it.
    let compliant = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let marker = attempt_connect(
        &topology.host,
        &cgroup.path,
        Some(ALLOWED_V4),
        PARTNER_V4,
        8443,
    );
    daemon.wait_for("the blocked connection's violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.pid == marker.pid)
    });
    assert!(
        !daemon
            .seen
            .iter()
            .filter_map(Line::violation)
            .any(|violation| violation.src_port == compliant.src_port),
        "a compliant connection was reported"
    );
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}

/// Connections made while the policy is reloaded again and again: each is decided by the
/// policy in force before a reload or the one after it, never by a half-written table (a
/// decision that read one generation while the next reload emptied its trie would find no
/// rule, and the violation would pass as unmatched). Both policies flag the .11 source, under
/// two rule names.
#[test]
fn connections_during_a_storm_of_reloads_are_each_decided_by_a_whole_policy() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let renamed = PARTNER_POLICY.replace("name = \"partner\"", "name = \"partner-again\"");
    let mut daemon = Daemon::start(
        &policy.path,
        &[
            "--cgroup",
            cgroup.path.to_str().unwrap(),
            "--fold-window",
            "0",
        ],
    );
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    let done = AtomicBool::new(false);
    let both = std::collections::BTreeSet::from(["partner".to_owned(), "partner-again".to_owned()]);
    let mut rules = std::collections::BTreeSet::new();
    let mut rounds = 0;
    /// Stops the reloader also when a wait below fails (the scope joins it before the panic
    /// goes on).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let reloads = std::thread::scope(|scope| {
        let stop = StopOnDrop(&done);
        let reloader = scope.spawn(|| {
            let mut reloads = 0;
            while !done.load(Ordering::Relaxed) {
                let text = if reloads % 2 == 0 {
                    &renamed
                } else {
                    PARTNER_POLICY
                };
                replace(&policy, text);
                nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
                reloads += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            reloads
        });
        // Rounds of connections until both policies have decided some (a busy machine may
        // take its first reload only after a whole round); every connection must be decided.
        while rounds < 5 || (rules != both && rounds < 40) {
            let clients = srcip_tests::connect_many(
                &topology.host,
                &cgroup.path,
                Some(OTHER_V4),
                PARTNER_V4,
                443,
                100,
            );
            for client in &clients {
                let line = daemon.wait_for("each connection's violation", |line| {
                    line.violation()
                        .is_some_and(|v| v.src_port == client.src_port)
                });
                rules.insert(line.violation().unwrap().rule.clone().unwrap_or_default());
            }
            rounds += 1;
        }
        drop(stop);
        reloader.join().unwrap()
    });
    assert!(
        reloads >= 5,
        "only {reloads} reloads during {rounds} rounds of connections"
    );
    assert_eq!(
        rules, both,
        "connections were decided under each policy in {rounds} rounds"
    );
}
