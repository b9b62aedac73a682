//! `srcip policy learn` writes a policy that allows exactly the traffic it saw.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
};

use srcip_tests::{
    ALLOWED_V4, ALLOWED_V6, Daemon, Line, OTHER_V4, PARTNER_V4, PARTNER_V6, PolicyFile,
    START_TIMEOUT, Signal, TestCgroup, Topology, connect, udp_client,
};

/// Runs `srcip policy learn ARGS` for 10 s, makes `traffic` once it says it learns, and
/// returns what it said on stderr and the policy it wrote.
fn learn_during(args: &[&str], traffic: impl FnOnce()) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let learnt = dir.path().join("learnt.toml");
    let mut learn = Command::new(srcip_tests::srcip_bin())
        // Long enough for the clients of a test under the matrix's software emulation,
        // where spawning one into its cgroup and namespace can take a second.
        .args(["policy", "learn", "--duration", "10s"])
        .args(args)
        .arg("--output")
        .arg(&learnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning srcip policy learn");
    let (sender, lines) = mpsc::channel();
    let stderr = learn.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut said = Vec::new();
    while !said
        .iter()
        .any(|line: &String| line.contains("learning outbound connections"))
    {
        said.push(
            lines
                .recv_timeout(START_TIMEOUT)
                .unwrap_or_else(|_| panic!("learn says it is learning: {said:#?}")),
        );
    }
    traffic();
    let status = learn.wait().unwrap();
    // Everything it wrote, up to the end of its stderr.
    reader.join().unwrap();
    said.extend(lines.try_iter());
    assert!(status.success(), "{status}: {said:#?}");
    let text = std::fs::read_to_string(&learnt).unwrap();
    (said, text)
}

#[test]
fn a_learnt_policy_validates_and_allows_exactly_the_sources_seen() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let (said, text) = learn_during(&["--cgroup", cgroup.path.to_str().unwrap()], || {
        // The host's everyday traffic, from the addresses the kernel picks.
        let tcp = connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
        let tcp6 = connect(&topology.host, &cgroup.path, None, PARTNER_V6, 443);
        udp_client(&topology.host, &cgroup.path, &[], PARTNER_V4, 53);
        assert_eq!(
            (tcp.src.as_str(), tcp6.src.as_str()),
            (ALLOWED_V4, ALLOWED_V6)
        );
    });
    assert!(
        said.iter()
            .any(|line| line.contains("learnt 3 connections to 2 destinations")),
        "{said:#?}"
    );
    let validate = Command::new(srcip_tests::srcip_bin())
        .args(["policy", "validate"])
        .arg(PolicyFile::new(&text).path)
        .output()
        .unwrap();
    assert_eq!(validate.status.code(), Some(0), "{text}");

    // The same traffic under the learnt policy: no alert; another source: a violation.
    let policy = PolicyFile::new(&text);
    let mut daemon = Daemon::start(&policy.path, &["--cgroup", cgroup.path.to_str().unwrap()]);
    connect(&topology.host, &cgroup.path, None, PARTNER_V4, 443);
    connect(&topology.host, &cgroup.path, None, PARTNER_V6, 443);
    udp_client(&topology.host, &cgroup.path, &[], PARTNER_V4, 53);
    let other = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let line = daemon.wait_for("the other source's violation", |line| {
        line.violation()
            .is_some_and(|v| v.src_port == other.src_port)
    });
    assert!(line.violation().unwrap().rule.is_some(), "{text}");
    let (_, lines) = daemon.stop_with(Signal::SIGTERM);
    let violations: Vec<_> = lines.iter().filter_map(Line::violation).collect();
    assert_eq!(violations.len(), 1, "{violations:#?}\n{text}");
}

/// `--netns` learns one network namespace's connections only: the same cgroup connects from
/// two namespaces, and the policy has only the destination of the one named.
#[test]
fn learn_with_netns_learns_only_that_namespaces_connections() {
    let learnt = Topology::new();
    let other = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let (said, text) = learn_during(
        &[
            "--cgroup",
            cgroup.path.to_str().unwrap(),
            "--netns",
            &learnt.host.name,
        ],
        || {
            connect(&other.host, &cgroup.path, None, "203.0.113.1", 22);
            connect(&learnt.host, &cgroup.path, None, PARTNER_V4, 443);
            connect(&other.host, &cgroup.path, None, "203.0.113.1", 22);
        },
    );
    assert!(
        said.iter()
            .any(|line| line.contains("learnt 1 connection to 1 destination")),
        "{said:#?}\n{text}"
    );
    assert!(text.contains(PARTNER_V4), "{text}");
    assert!(!text.contains("203.0.113.1\""), "{text}");
}
