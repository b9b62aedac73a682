//! Delivering alerts beyond stdout: `file:` sinks, `--quiet`, and `srcip watch` on the
//! daemon's unix socket, with a watcher that stops reading.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use srcip_tests::{
    Daemon, LINE_TIMEOUT, Line, OTHER_V4, PARTNER_POLICY, PARTNER_V4, PolicyFile, START_TIMEOUT,
    Signal, TestCgroup, Topology, connect, make_violation, srcip_bin, udp_client,
};

/// The JSON lines of `path` once `done` holds for them, waiting up to `timeout`.
fn file_lines_until(path: &Path, timeout: Duration, done: impl Fn(&[Line]) -> bool) -> Vec<Line> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Only whole lines: the sink may be writing the last one.
        let lines: Vec<Line> = text
            .split_inclusive('\n')
            .filter(|line| line.ends_with('\n'))
            .map(|line| Line::parse(line.trim_end()))
            .collect();
        if done(&lines) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} never got the expected lines: {lines:#?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_file_sink_gets_every_alert_and_quiet_keeps_stdout_empty() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let folder = tempfile::tempdir().unwrap();
    // In folders that do not exist yet: srcip makes them.
    let file = folder.path().join("log/srcip/alerts.json");
    let srcip = Command::new(srcip_bin())
        .args(["run", "--quiet", "--policy"])
        .arg(&policy.path)
        .arg("--sink")
        .arg(format!("file:{}", file.display()))
        .arg("--socket")
        .arg(folder.path().join("srcip.sock"))
        .arg("--cgroup")
        .arg(&cgroup.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning srcip run");
    let stop = |srcip: std::process::Child| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(srcip.id() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        srcip.wait_with_output().unwrap()
    };
    file_lines_until(&file, START_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|line| matches!(line, Line::Started { .. }))
    });

    let client = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    file_lines_until(&file, LINE_TIMEOUT, |lines| {
        lines
            .iter()
            .filter_map(Line::violation)
            .any(|violation| violation.src_port == client.src_port)
    });
    let output = stop(srcip);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.stdout.is_empty(), "--quiet writes nothing to stdout");
    let lines = file_lines_until(&file, LINE_TIMEOUT, |lines| {
        lines
            .iter()
            .any(|line| matches!(line, Line::Stopped { .. }))
    });
    assert!(
        matches!(lines.first(), Some(Line::Started { .. })),
        "{lines:#?}"
    );
    assert!(
        matches!(lines.last(), Some(Line::Stopped { .. })),
        "{lines:#?}"
    );
    let violation = lines.iter().find_map(Line::violation).unwrap();
    assert_eq!(violation.src, OTHER_V4);
    assert_eq!(violation.pid, client.pid);
    // Alerts name processes and users: the file is not for everyone.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o007, 0, "mode {mode:o}");
}

/// `srcip watch --socket SOCKET`, its stdout read line by line on a thread.
struct Watcher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    fn attach(socket: &Path) -> Self {
        let mut child = Command::new(srcip_bin())
            .arg("watch")
            .arg("--socket")
            .arg(socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning srcip watch");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Self { child, lines }
    }

    fn next(&self) -> Line {
        let text = self
            .lines
            .recv_timeout(LINE_TIMEOUT)
            .expect("a line from srcip watch");
        Line::parse(&text)
    }
}

#[test]
fn watchers_get_the_started_line_then_every_alert_until_the_daemon_stops() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    // In the topology's namespace, whose routes give the partner an allowed source: no
    // `route_drift` line comes between the started line and the violation.
    let mut daemon = Daemon::start_in(
        &topology.host,
        &policy.path,
        &["--cgroup", cgroup.path.to_str().unwrap()],
    );
    let watchers = [
        Watcher::attach(&daemon.socket),
        Watcher::attach(&daemon.socket),
    ];
    for watcher in &watchers {
        match watcher.next() {
            Line::Started { policy: named, .. } => {
                assert_eq!(named, policy.path.display().to_string())
            }
            other => panic!("a watcher's first line must be started: {other:?}"),
        }
    }

    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    for watcher in &watchers {
        let line = watcher.next();
        let violation = line.violation().expect("the violation, next");
        assert_eq!(violation.src_port, client.src_port);
    }

    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    for mut watcher in watchers {
        assert!(matches!(watcher.next(), Line::Stopped { .. }));
        assert!(
            watcher.child.wait().unwrap().success(),
            "watch exits 0 when the daemon stops"
        );
    }
}

#[test]
fn a_stalled_watcher_is_cut_loose_and_told_how_many_it_missed() {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut daemon = Daemon::start(
        &policy.path,
        &[
            "--all",
            "--ring-buffer-size",
            "8388608",
            "--cgroup",
            cgroup.path.to_str().unwrap(),
        ],
    );
    // Attached, and not read: more alerts come than its socket and its backlog hold. One
    // UDP socket to 10,000 destinations is 10,000 `connect` lines.
    let stalled = UnixStream::connect(&daemon.socket).unwrap();
    udp_client(
        &topology.host,
        &cgroup.path,
        &["--spread", "10000"],
        "10.1.0.0",
        5353,
    );
    for _ in 0..10_000 {
        daemon.wait_for("a connect line", |line| line.connect().is_some());
    }

    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let lines: Vec<Line> = BufReader::new(stalled)
        .lines()
        .map(|line| Line::parse(&line.expect("reading the watch socket")))
        .collect();
    assert!(matches!(lines.first(), Some(Line::Started { .. })));
    let connects = lines.iter().filter(|line| line.connect().is_some()).count();
    match lines.last() {
        Some(Line::Lost {
            count,
            sink: Some(sink),
            ..
        }) => {
            assert_eq!(sink, "watch");
            assert!(*count > 0);
            assert!(connects as u64 + count <= 10_000, "{connects} + {count}");
        }
        other => panic!("the last line must say what was missed: {other:?}"),
    }
    // The daemon went on: it still delivers to stdout and to new watchers.
    let watcher = Watcher::attach(&daemon.socket);
    assert!(matches!(watcher.next(), Line::Started { .. }));
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let policy = PolicyFile::new(PARTNER_POLICY);
    let cgroup = TestCgroup::new(&[]);
    let daemon = Daemon::start(&policy.path, &["--cgroup", cgroup.path.to_str().unwrap()]);
    let output = Command::new(srcip_bin())
        .args(["run", "--policy"])
        .arg(&policy.path)
        .arg("--socket")
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("another srcip run is listening on"),
        "{stderr}"
    );
}

/// A daemon that takes the connection and never answers (stuck): `srcip status` gives up
/// after its wait and says so, rather than hanging its operator's shell.
#[test]
fn status_of_a_daemon_that_does_not_answer_gives_up_and_says_so() {
    let folder = tempfile::tempdir().unwrap();
    let socket = folder.path().join("srcip.sock");
    let _stuck = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let output = Command::new(srcip_bin())
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("did not answer within 10 s"), "{stderr}");
}

#[test]
fn watch_and_status_without_a_daemon_say_what_to_do() {
    let folder = tempfile::tempdir().unwrap();
    for command in ["watch", "status"] {
        let output = Command::new(srcip_bin())
            .arg(command)
            .arg("--socket")
            .arg(folder.path().join("srcip.sock"))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("no srcip run is listening on") && stderr.contains("start `srcip run`"),
            "{command}: {stderr}"
        );
    }
}
