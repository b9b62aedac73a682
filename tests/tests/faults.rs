//! Faults an operator's worst day brings, and what srcip does through them: a reload asked
//! for while srcip is still starting, a reader of its alerts that goes away, the service
//! manager's notifications, a full disk under a sink's spool, and a step of the wall clock.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
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
    let mut daemon = Daemon::start_with_environment(
        &policy.path,
        &["--cgroup", cgroup.path.to_str().unwrap()],
        &[("NOTIFY_SOCKET", path.as_os_str())],
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

/// CPU time (user and system) process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// A network sink's spool on a full disk (a 1 MiB tmpfs, in a mount namespace of the
/// daemon's own, so that nothing is left mounted whatever happens to the test), with its
/// receiver down: srcip keeps running without spinning, says how many alerts the sink lost,
/// and once the receiver is back delivers exactly what its spool took, each alert once.
#[test]
fn a_spool_on_a_full_disk_counts_what_it_drops_delivers_the_rest_once_and_does_not_spin() {
    use srcip_tests::{
        DELIVERY_TIMEOUT, connect_many, make_violation,
        prometheus::{scrape, value},
        webhook::{TestCertificates, WebhookReceiver},
    };

    let receiver_port = srcip_tests::free_port();
    let metrics_port = srcip_tests::free_port();
    let certificates = TestCertificates::new();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let folder = tempfile::tempdir().unwrap();
    let spool = folder.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let url = format!("https://127.0.0.1:{receiver_port}");
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=1m srcip-test-spool "$0" && exec "$@""#)
        .arg(&spool)
        .arg(srcip_bin());
    let args = [
        "--sink",
        &url,
        "--sink-ca",
        certificates.ca.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--metrics",
        &metrics,
        "--cgroup",
        cgroup.path.to_str().unwrap(),
        "--all",
    ];
    let mut daemon = Daemon::start_with(command, &policy.path, &args);
    let pid = daemon.pid();

    // A connect line per connection, each a few hundred bytes, until the disk is full.
    let lost_for_the_sink = |daemon: &Daemon| -> u64 {
        daemon
            .seen
            .iter()
            .filter_map(|line| match line {
                Line::Lost {
                    sink: Some(sink),
                    count,
                    ..
                } if sink.starts_with(&url) => Some(*count),
                _ => None,
            })
            .sum()
    };
    let mut connections = Vec::new();
    while lost_for_the_sink(&daemon) == 0 {
        assert!(
            connections.len() < 20_000,
            "a 1 MiB spool took {} connect lines without losing one",
            connections.len()
        );
        let made = connect_many(&topology.host, &cgroup.path, None, PARTNER_V4, 443, 500);
        for client in &made {
            daemon.wait_for("the connect line", |line| {
                line.connect()
                    .is_some_and(|connection| connection.src_port == client.src_port)
            });
        }
        connections.extend(made);
        // The `lost` line comes with the next delivery after the loss.
        make_violation(&mut daemon, &topology, &cgroup.path);
    }

    // Full disk, receiver down: retries wait, nothing spins. A spin takes a whole CPU;
    // what is left is a try of the spool now and then, which opens its file again, and
    // the daemon's own 100 ms poll (slow under the matrix's emulation).
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(5));
    let spent = cpu_time(pid) - before;
    assert!(
        spent < Duration::from_millis(2500),
        "srcip used {spent:?} of CPU in 5 s with a full spool"
    );

    let receiver = WebhookReceiver::start(receiver_port, &certificates);
    let sink_name = |scrape: &prometheus_parse::Scrape| {
        scrape
            .samples
            .iter()
            .find_map(|sample| {
                sample
                    .labels
                    .get("sink")
                    .filter(|sink| sink.starts_with(&url))
            })
            .map(str::to_owned)
            .expect("the webhook sink in the metrics")
    };
    // The sink retries at most 30 s apart.
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let spooled = loop {
        let (_, scrape) = scrape(None, metrics_port);
        let sink = sink_name(&scrape);
        let labels = [("sink", sink.as_str())];
        if value(&scrape, "srcip_sink_backlog", &labels) == 0.0 {
            break value(&scrape, "srcip_sink_spooled_total", &labels) as usize;
        }
        assert!(
            Instant::now() < deadline,
            "the spool did not drain: {:#?}\n{}",
            scrape.samples,
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let alerts_of = |posts: &[serde_json::Value]| -> Vec<serde_json::Value> {
        posts
            .iter()
            .flat_map(|post| post["alerts"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let alerts = alerts_of(&receiver.wait_for(|posts| alerts_of(posts).len() >= spooled));
    assert_eq!(alerts.len(), spooled, "each spooled alert arrives once");
    // Every connection's line arrived or was counted lost.
    let arrived = connections
        .iter()
        .filter(|client| {
            alerts.iter().any(|alert| {
                alert["type"] == "connect" && alert["src_port"] == u64::from(client.src_port)
            })
        })
        .count() as u64;
    assert!(
        arrived + lost_for_the_sink(&daemon) >= connections.len() as u64,
        "{arrived} connect lines arrived and {} were counted lost of {}",
        lost_for_the_sink(&daemon),
        connections.len()
    );
    assert!(arrived > 0, "none of the spooled connect lines arrived");
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}

/// Debian's libfaketime (package `libfaketime`, which `cargo xtask setup` installs).
fn faketime_library() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|entry| {
            let candidate = entry.ok()?.path().join("faketime/libfaketime.so.1");
            candidate.exists().then_some(candidate)
        })
        .next();
    found.expect("libfaketime is not installed: run `cargo xtask setup`")
}

/// How far the `time` of the violation from `client_port` is from `expected`.
fn time_error(daemon: &mut Daemon, client_port: u16, expected: SystemTime) -> Duration {
    let line = daemon.wait_for("the violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == client_port)
    });
    let time = humantime::parse_rfc3339(&line.violation().unwrap().time).unwrap();
    time.duration_since(expected)
        .or_else(|_| expected.duration_since(time))
        .unwrap()
}

/// The wall clock steps while srcip runs (NTP's first sync after boot, an operator's
/// `date -s`): the next event's time follows it at once, since srcip takes the wall-clock
/// time of boot again at each reading of its events rather than keeping the one of its
/// start. libfaketime moves srcip's wall clock an hour ahead, and only srcip's: its boot
/// clock, which the kernel's event stamps count, does not move.
#[test]
fn a_step_of_the_wall_clock_shows_in_the_next_events_time_at_once() {
    let library = faketime_library();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let offset = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(offset.path(), "+0\n").unwrap();
    let mut daemon = Daemon::start_with_environment(
        &policy.path,
        &[
            "--cgroup",
            cgroup.path.to_str().unwrap(),
            "--fold-window",
            "0",
        ],
        &[
            ("LD_PRELOAD", library.as_os_str()),
            ("FAKETIME_TIMESTAMP_FILE", offset.path().as_os_str()),
            // Read at every call, so the step is there for the next event.
            ("FAKETIME_NO_CACHE", "1".as_ref()),
            // The boot and monotonic clocks stay true, as in a real step.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".as_ref()),
        ],
    );
    // A minute of room for a slow machine; the step is an hour.
    let room = Duration::from_secs(60);
    let before = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let error = time_error(&mut daemon, before.src_port, SystemTime::now());
    assert!(
        error < room,
        "before the step, the event time is {error:?} off"
    );

    let step = Duration::from_secs(3600);
    std::fs::write(offset.path(), "+3600\n").unwrap();
    let after = connect(
        &topology.host,
        &cgroup.path,
        Some(OTHER_V4),
        PARTNER_V4,
        443,
    );
    let error = time_error(&mut daemon, after.src_port, SystemTime::now() + step);
    assert!(
        error < room,
        "after a step of an hour, the event time is {error:?} off the stepped clock"
    );
    let (status, _) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
}
