//! Faults an operator's worst day brings, and what srcip does through them: a reload asked
//! for while srcip is still starting, and a reader of its alerts that goes away.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use srcip_tests::{
    Daemon, LINE_TIMEOUT, Line, OTHER_V4, PARTNER_POLICY, PARTNER_V4, PolicyFile, Signal,
    TestCgroup, Topology, connect, srcip_bin,
};

/// Whether process `pid` has a handler for `signal` (`SigCgt` in its status).
fn catches(pid: u32, signal: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal as i32 - 1)) != 0)
}

/// `systemctl reload` while srcip starts: srcip takes SIGHUP from the first moment of `run`
/// on, and every SIGHUP that comes during the rest of the start (while the verifier checks
/// its programs) becomes a reload after it. srcip neither dies (SIGHUP's default action) nor
/// takes an interrupted load for a refusal.
#[test]
fn sighup_during_the_start_is_a_reload_after_it() {
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::spawn(&policy.path, &["--cgroup", cgroup.path.to_str().unwrap()]);
    let pid = daemon.pid();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !catches(pid, Signal::SIGHUP) {
        assert!(daemon.is_running(), "srcip exited while starting");
        assert!(Instant::now() < deadline, "srcip never took SIGHUP");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut sent = 0;
    while !daemon.has_written() && daemon.is_running() {
        daemon.signal(Signal::SIGHUP);
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sent > 0, "no SIGHUP was sent during the start");
    daemon.wait_started();
    daemon.wait_for("the reload", |line| matches!(line, Line::Reloaded { .. }));
    assert!(daemon.is_running(), "srcip lives on after {sent} SIGHUPs");
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}

/// The reader of srcip's stdout dies (`srcip run | consumer`): srcip stops with exit 1 and
/// says why, so that a service manager restarts it (`Restart=on-failure`), never exit 0.
#[test]
fn a_closed_stdout_is_an_error_exit_that_says_so() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let folder = tempfile::tempdir().unwrap();
    let mut child = Command::new(srcip_bin())
        .args(["run", "--format", "json", "--fold-window", "0", "--policy"])
        .arg(&policy.path)
        .arg("--cgroup")
        .arg(&cgroup.path)
        .arg("--socket")
        .arg(folder.path().join("srcip.sock"))
        .arg("--spool")
        .arg(folder.path().join("spool"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning srcip run");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).expect("the started line");
    assert!(first.contains(r#""type":"started""#), "{first}");
    drop(stdout);

    // A violation for srcip to write, where nobody reads any more.
    connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for srcip") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("srcip did not stop after its stdout closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stdout was closed"), "{stderr}");
}

/// Under systemd (`Type=notify`): `READY=1` once srcip audits, `RELOADING=1` with
/// `MONOTONIC_USEC` and then `READY=1` around a reload, `STOPPING=1` when it stops.
#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    manager.set_read_timeout(Some(LINE_TIMEOUT)).unwrap();
    let next = || {
        let mut message = [0; 512];
        let length = manager
            .recv(&mut message)
            .expect("a message to the service manager");
        String::from_utf8_lossy(&message[..length]).into_owned()
    };
    let mut daemon = Daemon::start_notifying(
        &policy.path,
        &["--cgroup", cgroup.path.to_str().unwrap()],
        &path,
    );
    assert!(next().lines().any(|line| line == "READY=1"));

    daemon.signal(Signal::SIGHUP);
    let reloading = next();
    assert!(
        reloading.lines().any(|line| line == "RELOADING=1")
            && reloading
                .lines()
                .any(|line| line.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    assert!(next().lines().any(|line| line == "READY=1"));
    daemon.wait_for("the reload", |line| matches!(line, Line::Reloaded { .. }));

    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    // The socket keeps what srcip sent before it exited.
    assert!(next().lines().any(|line| line == "STOPPING=1"));
}
