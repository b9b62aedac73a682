//! A running `srcip run`, read line by line; killed and reaped on drop.
//!
//! Every daemon a test starts runs with `SRCIP_TEST_CROSS_CHECK`: user space decides again
//! each connection the kernel decided, and logs each decision that differs. A test whose
//! daemon logged one fails, at stop or when the daemon is dropped, whatever else it checks:
//! so every path the tests drive (pin, block, translation, extension headers, reloads)
//! holds the kernel's decision to the one user space would make.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::{Line, Netns, srcip_bin};

/// How long any expected line may take. Generous: CI machines are shared and noisy, and
/// the matrix's guests run under software emulation beside another test's daemon loading.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `srcip run` may take to load and attach: the verifier checks every program
/// first. Under the matrix's software emulation a start on 5.10 takes about 8 s on an idle
/// guest (25 s while the verifier walked the policy's loops on every path, docs/design.md),
/// and twice that with another test's daemon loading beside it; the limit leaves room for
/// a slower machine. Every test that starts a daemon of its own waits this long for its
/// first line.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Makes srcip decide again what its kernel programs decided (see the module's comment).
const CROSS_CHECK: &str = "SRCIP_TEST_CROSS_CHECK";
/// How srcip's log begins a decision of the kernel that user space decided otherwise.
const DIFFERENT_DECISION: &str = "cross-check: the kernel decided";

pub struct Daemon {
    child: Child,
    lines: Receiver<String>,
    /// A line [`Daemon::has_written`] took from `lines` and nobody has waited for yet.
    pending: Option<String>,
    stderr: Arc<Mutex<String>>,
    /// Closed when srcip's stderr is: everything it logged has been read.
    stderr_closed: Receiver<()>,
    /// Every line read so far, in order.
    pub seen: Vec<Line>,
    /// The socket `srcip watch` attaches to: one per daemon, so that tests run in parallel.
    pub socket: PathBuf,
    /// Holds the socket, and the spool unless the test gives its own `--spool`.
    _folder: tempfile::TempDir,
}

impl Daemon {
    /// `srcip status --format FORMAT` against this daemon's socket.
    pub fn status(&self, format: &str) -> String {
        let socket = self.socket.to_str().unwrap();
        let output = crate::run(
            srcip_bin().to_str().unwrap(),
            &["status", "--format", format, "--socket", socket],
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Starts `srcip run --policy POLICY --format json --socket (its own) ARGS…`, with a
    /// spool of its own unless ARGS give `--spool`, and waits for `started`.
    pub fn start(policy: &Path, args: &[&str]) -> Self {
        Self::start_with(Command::new(srcip_bin()), policy, args)
    }

    /// As [`Daemon::start`], with the daemon in network namespace `netns`: its drift watch
    /// then predicts that namespace's routes. (Auditing is the same from any namespace.)
    pub fn start_in(netns: &Netns, policy: &Path, args: &[&str]) -> Self {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", netns.name))
            .arg(srcip_bin());
        Self::start_with(command, policy, args)
    }

    /// As [`Daemon::start`], with `command` running srcip: srcip itself, or a program that
    /// execs it with the arguments that follow (nsenter, prlimit, unshare), so that the child
    /// is srcip itself. srcip's arguments are added to `command`'s.
    pub fn start_with(command: Command, policy: &Path, args: &[&str]) -> Self {
        let mut daemon = Self::spawn_with(command, policy, args);
        daemon.wait_started();
        daemon
    }

    /// As [`Daemon::start`], with at most `files` open file descriptors (`prlimit` execs
    /// srcip, so the child is srcip itself), as a service's `LimitNOFILE` would set.
    pub fn start_with_file_limit(policy: &Path, args: &[&str], files: u64) -> Self {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={files}:{files}"))
            .arg(srcip_bin());
        Self::start_with(command, policy, args)
    }

    /// As [`Daemon::start`], with `environment` added to srcip's: `NOTIFY_SOCKET` for a
    /// service manager listening (as systemd sets it for a `Type=notify` unit), a
    /// `SRCIP_TEST_*` fault to inject.
    pub fn start_with_environment(
        policy: &Path,
        args: &[&str],
        environment: &[(&str, &OsStr)],
    ) -> Self {
        let mut command = Command::new(srcip_bin());
        command.envs(environment.iter().copied());
        Self::start_with(command, policy, args)
    }

    /// As [`Daemon::start`], returning at once, while srcip is still starting; see
    /// [`Daemon::wait_started`] and [`Daemon::has_written`].
    pub fn spawn(policy: &Path, args: &[&str]) -> Self {
        Self::spawn_with(Command::new(srcip_bin()), policy, args)
    }

    /// Waits for the `started` line.
    pub fn wait_started(&mut self) {
        let started = self.wait_at_most(START_TIMEOUT, "started", |line| {
            matches!(line, Line::Started { .. })
        });
        if started.is_none() {
            self.fail(&format!("no started line within {START_TIMEOUT:?}"));
        }
    }

    /// Whether srcip has written a line yet (which, at start, is `started`); the line is
    /// kept for [`Daemon::wait_for`] and the others.
    pub fn has_written(&mut self) -> bool {
        if self.pending.is_some() {
            return true;
        }
        match self.lines.try_recv() {
            Ok(text) => {
                self.pending = Some(text);
                true
            }
            Err(_) => false,
        }
    }

    /// Whether srcip's process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn spawn_with(mut command: Command, policy: &Path, args: &[&str]) -> Self {
        let folder = tempfile::tempdir().expect("a folder for the watch socket and spool");
        let socket = folder.path().join("srcip.sock");
        command
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .args(["--format", "json"])
            .arg("--socket")
            .arg(&socket);
        if !args.contains(&"--spool") {
            command.arg("--spool").arg(folder.path().join("spool"));
        }
        let mut child = command
            .env(CROSS_CHECK, "1")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning srcip run");

        let (sender, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let collected = Arc::clone(&stderr);
        let (closing, stderr_closed) = channel::<()>();
        std::thread::spawn(move || {
            let _closing = closing;
            let mut buffer = [0; 4096];
            while let Ok(read @ 1..) = pipe.read(&mut buffer) {
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });

        Self {
            child,
            lines,
            pending: None,
            stderr,
            stderr_closed,
            seen: Vec::new(),
            socket,
            _folder: folder,
        }
    }

    /// The next line (after those already seen) that satisfies `wanted`.
    pub fn wait_for(&mut self, what: &str, wanted: impl Fn(&Line) -> bool) -> Line {
        match self.wait_at_most(LINE_TIMEOUT, what, wanted) {
            Some(line) => line,
            None => self.fail(&format!("no {what} line within {LINE_TIMEOUT:?}")),
        }
    }

    /// The next `dead_letter` line: its sink, count and the receiver's answer.
    pub fn wait_for_dead_letter(&mut self) -> (String, u64, String) {
        match self.wait_for("the dead letter", |line| {
            matches!(line, Line::DeadLetter { .. })
        }) {
            Line::DeadLetter {
                sink, count, error, ..
            } => (sink, count, error),
            _ => unreachable!("only a dead letter is waited for"),
        }
    }

    /// Like [`Daemon::wait_for`], but `None` when no such line comes within `timeout`.
    pub fn wait_at_most(
        &mut self,
        timeout: Duration,
        what: &str,
        wanted: impl Fn(&Line) -> bool,
    ) -> Option<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = match self.pending.take() {
                Some(text) => Ok(text),
                None => self.lines.recv_timeout(left),
            };
            match next {
                Ok(text) => {
                    let line = Line::parse(&text);
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("srcip closed stdout before a {what} line"))
                }
            }
        }
    }

    /// What srcip wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal)
            .expect("signalling srcip");
    }

    /// Sends `signal` and waits for the exit; returns the status and every line read.
    pub fn stop_with(self, signal: Signal) -> (ExitStatus, Vec<Line>) {
        let (status, lines, _) = self.stop_with_logs(signal);
        (status, lines)
    }

    /// As [`Daemon::stop_with`], with everything srcip wrote to stderr.
    pub fn stop_with_logs(mut self, signal: Signal) -> (ExitStatus, Vec<Line>, String) {
        self.signal(signal);
        let deadline = Instant::now() + LINE_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for srcip") {
                break status;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "srcip did not exit within {LINE_TIMEOUT:?} of {signal}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(text) = self.pending.take() {
            self.seen.push(Line::parse(&text));
        }
        while let Ok(text) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(Line::parse(&text));
        }
        // Disconnected (not a timeout) once the reader saw the end of stderr.
        let _ = self.stderr_closed.recv_timeout(Duration::from_secs(2));
        // The cross-check is held on drop, as this returns.
        (status, std::mem::take(&mut self.seen), self.stderr())
    }

    /// The kernel's decisions that user space decided otherwise, in words; `None` when none.
    fn different_decisions(&self) -> Option<String> {
        let stderr = self.stderr();
        let differences: Vec<&str> = stderr
            .lines()
            .filter(|line| line.contains(DIFFERENT_DECISION))
            .collect();
        (!differences.is_empty()).then(|| {
            format!(
                "the kernel's decision differs from user space's:\n{}",
                differences.join("\n")
            )
        })
    }

    fn fail(&self, message: &str) -> ! {
        panic!(
            "{message}\nlines so far: {:#?}\nsrcip's stderr:\n{}",
            self.seen,
            self.stderr.lock().unwrap()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Still running when a test failed or did not stop it: SIGKILL (which works on a
        // stopped process too) closes srcip's bpf links, which detaches its programs.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Every daemon of a test that has not failed otherwise is held to the cross-check
        // here, once: stopped by the test or not.
        if !std::thread::panicking() {
            let _ = self.stderr_closed.recv_timeout(Duration::from_secs(2));
            if let Some(difference) = self.different_decisions() {
                self.fail(&difference);
            }
        }
    }
}
