//! Support for the integration tests: guards for what a test creates (network namespaces,
//! cgroups, a running `srcip run`), the incident's topology, and the alert schema.
//!
//! Every guard removes what it made when dropped, also when the test panics. Names carry
//! the test process's pid and a counter, so tests run in parallel without clashing.

pub mod alerts;
pub mod daemon;
pub mod dns;
pub mod nats;
pub mod prometheus;
pub mod rsyslog;
pub mod webhook;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

pub use alerts::{Connection, Line};
pub use daemon::{Daemon, LINE_TIMEOUT, START_TIMEOUT};
pub use nix::sys::signal::Signal;

/// How long an alert may take to reach a receiver that was down when srcip first tried it:
/// the sink waits up to 30 s between attempts (`MAX_BACKOFF` in
/// srcip-userspace/src/delivery/spool.rs), a wait that grows while the daemon starts and
/// connects under the matrix's emulation, and the attempt itself may take seconds there.
pub const DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);

/// How long a test's own server (rsyslogd, nats-server, dnsmasq, the webhook receiver) may
/// take to answer: in the matrix's 5.10 guest a process start alone takes up to 0.6 s, and
/// another test's daemon may be starting beside it (8 s there, 25 s before the policy's
/// loops became global functions): the limit leaves room for a slower machine.
pub const SERVER_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// For the helper binaries: moves this process into the cgroup directory `cgroup` and into
/// the network namespace `/run/netns/NETNS`. Threads created afterwards inherit both.
pub fn enter(cgroup: Option<String>, netns: Option<String>) {
    let cgroup = cgroup.expect("--cgroup DIR");
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    let namespace = std::fs::File::open(format!("/run/netns/{}", netns.expect("--netns NAME")))
        .expect("opening the namespace");
    nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("entering the namespace");
}

/// A client's socket, `new_socket()` made where `--created-in DIR` or `--passed-from DIR`
/// say (default: by this process in `--cgroup`), with this process in `--cgroup` and
/// `--netns` when it returns:
/// - `created_in`: made while this process is in cgroup DIR, which then moves into
///   `cgroup`;
/// - `passed_from`: made by another process, in cgroup DIR, and passed to this one in
///   `cgroup` with `SCM_RIGHTS`, as systemd's socket activation passes sockets.
pub fn client_socket(
    cgroup: Option<String>,
    netns: Option<String>,
    created_in: Option<String>,
    passed_from: Option<String>,
    new_socket: impl Fn() -> socket2::Socket,
) -> socket2::Socket {
    match (created_in, passed_from) {
        (Some(elsewhere), None) => {
            enter(Some(elsewhere), netns);
            let socket = new_socket();
            join_cgroup(&cgroup.expect("--cgroup DIR"));
            socket
        }
        (None, Some(elsewhere)) => {
            enter(Some(elsewhere), netns);
            socket_from_another_process(new_socket, &cgroup.expect("--cgroup DIR"))
        }
        (None, None) => {
            enter(cgroup, netns);
            new_socket()
        }
        (Some(_), Some(_)) => panic!("--created-in and --passed-from exclude each other"),
    }
}

/// Moves this process into the cgroup directory `cgroup`.
fn join_cgroup(cgroup: &str) {
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
}

/// A socket made by a child process that stays in this process's cgroup, and passed here
/// with `SCM_RIGHTS` after this process moved into `cgroup`.
fn socket_from_another_process(
    new_socket: impl Fn() -> socket2::Socket,
    cgroup: &str,
) -> socket2::Socket {
    use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let (here, there) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    // SAFETY: this process has one thread; the child only makes a socket, sends it and exits.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let socket = new_socket();
            let fds = [socket.as_raw_fd()];
            let sent = sendmsg::<()>(
                there.as_raw_fd(),
                &[std::io::IoSlice::new(b"socket")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            );
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { nix::libc::_exit(i32::from(sent.is_err())) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            join_cgroup(cgroup);
            let mut buffer = [0; 16];
            let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
            let mut control = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let message = recvmsg::<()>(
                here.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::empty(),
            )
            .expect("recvmsg");
            let fd = message
                .cmsgs()
                .expect("control messages")
                .find_map(|cmsg| match cmsg {
                    ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                    _ => None,
                })
                .expect("a socket passed with SCM_RIGHTS");
            let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
            assert!(
                matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
                "the socket's maker failed: {status:?}"
            );
            // SAFETY: a descriptor this process now owns, received just above.
            unsafe { socket2::Socket::from_raw_fd(fd) }
        }
    }
}

/// `--ip-options` of the clients: IPv4 options (three no-ops and an end, 4 bytes) on every
/// packet of the socket, so that its IPv4 header is 24 bytes instead of 20.
pub fn add_ip_options(socket: &impl std::os::fd::AsRawFd) {
    let options: [u8; 4] = [1, 1, 1, 0];
    // SAFETY: IP_OPTIONS reads `options.len()` bytes from the buffer given.
    let result = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            nix::libc::IPPROTO_IP,
            nix::libc::IP_OPTIONS,
            options.as_ptr().cast(),
            options.len() as nix::libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "setsockopt(IP_OPTIONS)");
}

/// `--ipv6-header KIND` of the clients: IPv6 extension headers on every packet of the
/// socket, which an egress program must look behind to find TCP or UDP:
/// - `dstopts`: a destination options header (padding only);
/// - `srh:VIA`: a segment routing header (type 4; any user may set one) that sends the packet
///   to VIA first: the IPv6 header's destination is then VIA, and the connection's own
///   destination is the header's last segment.
pub fn add_ipv6_header(socket: &impl std::os::fd::AsRawFd, kind: &str) {
    let (option, header): (i32, Vec<u8>) = match kind.split_once(':') {
        None if kind == "dstopts" => {
            // Next header (the kernel fills it in), length 0 (8 bytes), PadN of 4 bytes.
            (nix::libc::IPV6_DSTOPTS, vec![0, 0, 1, 4, 0, 0, 0, 0])
        }
        Some(("srh", via)) => {
            let via: std::net::Ipv6Addr = via.parse().expect("srh:VIA with an IPv6 address");
            // Two segments: the first (index 0, the last visited) is the destination the
            // kernel writes in at send time, the second VIA. Length: 4 units of 8 bytes past
            // the first 8; segments left 1, last entry 1.
            let mut header = vec![0, 4, 4, 1, 1, 0, 0, 0];
            header.extend([0; 16]);
            header.extend(via.octets());
            (nix::libc::IPV6_RTHDR, header)
        }
        _ => panic!("--ipv6-header dstopts|srh:VIA"),
    };
    // SAFETY: the option reads `header.len()` bytes from the buffer given.
    let result = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            nix::libc::IPPROTO_IPV6,
            option,
            header.as_ptr().cast(),
            header.len() as nix::libc::socklen_t,
        )
    };
    assert_eq!(
        result,
        0,
        "setsockopt({kind}): {}",
        std::io::Error::last_os_error()
    );
}

/// A loopback port nobody listens on now, for a server to be started on later.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A name unique to this test process and call: `srcip-t<pid>-<n>`.
/// Removes what test processes that died without unwinding (killed by a timeout, or
/// SIGKILL) left behind: network namespaces and cgroups named `srcip-tPID-…` whose PID no
/// longer runs. Once per test process, before its first namespace or cgroup: guards clean up
/// on panic, but nothing runs in a killed process.
fn sweep_leftovers() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        let of_dead_process = |name: &str| {
            name.strip_prefix("srcip-t")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        };
        let leftovers = |folder: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(folder)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|entry| entry.file_name().to_str().is_some_and(of_dead_process))
                        .map(|entry| entry.path())
                        .collect()
                })
                .unwrap_or_default()
        };
        for namespace in leftovers(Path::new("/run/netns")) {
            let name = namespace
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
        for cgroup in leftovers(&cgroup2_mount()) {
            remove_cgroup_tree(&cgroup);
        }
    });
}

/// Removes a cgroup and those below it, killing what still runs in them first.
fn remove_cgroup_tree(cgroup: &Path) {
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|pid| pid.parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while let Err(error) = std::fs::remove_dir(cgroup) {
        if std::time::Instant::now() > deadline {
            eprintln!(
                "could not remove the leftover cgroup {}: {error}",
                cgroup.display()
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "srcip-t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `srcip` binary under test: `SRCIP_BIN` (set by `cargo xtask test`), else the one
/// cargo built beside the test binaries (`cargo build --release`, then `cargo test
/// --release`).
pub fn srcip_bin() -> PathBuf {
    let path = std::env::var_os("SRCIP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_profile_dir().join("srcip"));
    assert!(
        path.exists(),
        "{} does not exist: run the integration tests with `cargo xtask test`, which builds srcip and sets SRCIP_BIN",
        path.display()
    );
    path
}

/// `target/<profile>`: test binaries live in its `deps` folder.
fn target_profile_dir() -> PathBuf {
    let test_binary = std::env::current_exe().expect("path of the test binary");
    test_binary
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_owned()
}

/// The `tcp-client` helper, built by cargo next to the test binaries' `deps` folder.
pub fn tcp_client_bin() -> PathBuf {
    let path = target_profile_dir().join("tcp-client");
    assert!(
        path.exists(),
        "{} is missing: build the tests with cargo",
        path.display()
    );
    path
}

/// How long a command [`run`] runs may take: generous, for the matrix's emulated guests,
/// but a command that hangs fails its test with its name rather than hanging the run.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// Runs a command and panics, with its output, if it fails or does not finish within
/// [`COMMAND_TIMEOUT`].
pub fn run(program: &str, args: &[&str]) -> Output {
    run_within(program, args, COMMAND_TIMEOUT)
}

fn run_within(program: &str, args: &[&str], timeout: std::time::Duration) -> Output {
    let command_line = || format!("{program} {}", args.join(" "));
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let output = match finished.recv_timeout(timeout) {
        Ok(output) => output.unwrap_or_else(|error| panic!("{}: {error}", command_line())),
        Err(_) => {
            // Not reaped yet (its waiter still waits), so the pid is still the command's.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!(
                "{} did not finish within {} s; killed",
                command_line(),
                timeout.as_secs()
            );
        }
    };
    assert!(
        output.status.success(),
        "{} failed: {}",
        command_line(),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `ip -n NS ARGS…`
pub fn ip_in(namespace: &str, args: &str) {
    let mut full = vec!["-n", namespace];
    full.extend(args.split_whitespace());
    run("ip", &full);
}

/// `nft COMMANDS` inside `namespace` (commands separated by `;`). What it adds lives in the
/// namespace and goes with it.
pub fn nft_in(namespace: &str, commands: &str) {
    run("ip", &["netns", "exec", namespace, "nft", commands]);
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        sweep_leftovers();
        run("ip", &["netns", "add", &name]);
        let namespace = Self { name };
        ip_in(&namespace.name, "link set lo up");
        namespace
    }

    /// Inode of the namespace, as `srcip` reports it in `netns`.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("stat of the namespace")
            .ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        if !matches!(status, Ok(status) if status.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

/// The seed incident, in two namespaces joined by a veth pair:
/// - `host`: the multi-IP server, 203.0.113.10 (primary) and .11, 2001:db8::10 and ::11,
///   default routes via the partner, preferring .10 and ::10;
/// - `partner`: the gateway, which also owns the partner's service addresses
///   198.51.100.50 and 2001:db8:50::50. Nothing listens: connections are refused, which is
///   enough, since the source is chosen when the SYN leaves.
pub struct Topology {
    pub host: Netns,
    pub partner: Netns,
}

pub const ALLOWED_V4: &str = "203.0.113.10";
pub const OTHER_V4: &str = "203.0.113.11";
pub const PARTNER_V4: &str = "198.51.100.50";
pub const ALLOWED_V6: &str = "2001:db8::10";
pub const OTHER_V6: &str = "2001:db8::11";
pub const PARTNER_V6: &str = "2001:db8:50::50";

impl Topology {
    pub fn new() -> Self {
        let base = unique_name();
        let topology = Self {
            host: Netns::new(format!("{base}-host")),
            partner: Netns::new(format!("{base}-partner")),
        };
        let (host, partner) = (&topology.host.name, &topology.partner.name);
        ip_in(
            host,
            &format!("link add v0 type veth peer name v1 netns {partner}"),
        );
        ip_in(host, "addr add 203.0.113.10/24 dev v0");
        ip_in(host, "addr add 203.0.113.11/24 dev v0");
        ip_in(host, "addr add 2001:db8::10/64 dev v0 nodad");
        ip_in(host, "addr add 2001:db8::11/64 dev v0 nodad");
        ip_in(host, "link set v0 up");
        ip_in(host, "route add default via 203.0.113.1");
        ip_in(
            host,
            "-6 route add default via 2001:db8::1 src 2001:db8::10",
        );
        ip_in(partner, "addr add 203.0.113.1/24 dev v1");
        ip_in(partner, "addr add 2001:db8::1/64 dev v1 nodad");
        ip_in(partner, "addr add 198.51.100.50/32 dev lo");
        ip_in(partner, "addr add 2001:db8:50::50/128 dev lo");
        ip_in(partner, "link set v1 up");
        topology
    }

    /// The incident: one route change in the host namespace, no change to any program.
    pub fn route_partner_via_other_source(&self) {
        ip_in(
            &self.host.name,
            "route replace 198.51.100.50/32 via 203.0.113.1 src 203.0.113.11",
        );
    }
}

impl Topology {
    /// Address translation on the host, as a NAT gateway or container host has it: the
    /// source of packets matching `selector` (nft syntax) is rewritten by `translation`
    /// (`snat ip to ADDR`, `masquerade`, …) on the way out.
    pub fn translate(&self, selector: &str, translation: &str) {
        nft_in(
            &self.host.name,
            &format!(
                "add table inet srcip_test; \
                 add chain inet srcip_test postrouting {{ type nat hook postrouting priority 100; }}; \
                 add rule inet srcip_test postrouting {selector} {translation}"
            ),
        );
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// An MPTCP listener in a namespace of the test's own, accepting connections, answering
/// each one's first byte (`tcp-client --mptcp`), and holding them (the kernel's further
/// subflows join them) until dropped. Its thread enters the namespace:
/// a thread's network namespace is its own.
pub struct MptcpListener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MptcpListener {
    pub fn start(netns: &Netns, address: &str, port: u16) -> Self {
        const IPPROTO_MPTCP: i32 = 262;
        let path = format!("/run/netns/{}", netns.name);
        let address = std::net::SocketAddr::new(address.parse().expect("an address"), port);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let (ready, started) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).expect("opening the namespace");
            nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the namespace");
            let listener = socket2::Socket::new(
                socket2::Domain::for_address(address),
                socket2::Type::STREAM,
                Some(socket2::Protocol::from(IPPROTO_MPTCP)),
            )
            .expect("an MPTCP socket (is MPTCP built in and net.mptcp.enabled 1?)");
            listener
                .bind(&address.into())
                .expect("binding the MPTCP listener");
            listener.listen(16).expect("listen");
            listener.set_nonblocking(true).expect("non-blocking");
            ready.send(()).unwrap();
            let mut held = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((connection, _)) => {
                        answer_a_byte(&connection);
                        held.push(connection);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        started.recv().expect("the MPTCP listener started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

/// Reads a byte and sends one back; a client that sends none is held all the same.
fn answer_a_byte(connection: &socket2::Socket) {
    use std::io::{Read as _, Write as _};
    let mut stream = connection;
    let mut byte = [0; 1];
    let answered = connection.set_nonblocking(false).is_ok()
        && connection
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .is_ok()
        && stream.read_exact(&mut byte).is_ok()
        && stream.write_all(b"!").is_ok();
    if !answered {
        eprintln!("the MPTCP listener got no byte to answer");
    }
}

impl Drop for MptcpListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The kernel's `bpf_attach_type` of each cgroup program the process `pid` has attached
/// through a bpf link (from each link's fdinfo): `BPF_CGROUP_UDP4_SENDMSG` (14) and
/// `BPF_CGROUP_UDP6_SENDMSG` (15) are srcip's sendmsg programs.
pub fn cgroup_attach_types(pid: u32) -> Vec<u32> {
    let mut types = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let path = entry.unwrap().path();
        let target = std::fs::read_link(&path).unwrap_or_default();
        if target.as_os_str() != "anon_inode:bpf_link" {
            continue;
        }
        let fd = path.file_name().unwrap().to_str().unwrap();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        types.extend(info.lines().find_map(|line| {
            let value = line.strip_prefix("attach_type:")?.trim();
            Some(value.parse::<u32>().unwrap_or_else(|_| {
                panic!("fdinfo of a bpf link has attach_type {value:?}: {info}")
            }))
        }));
    }
    types
}

/// Whether this kernel lets a program make an MPTCP socket (Debian's 5.10 has no MPTCP).
pub fn has_mptcp() -> bool {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(262)),
    )
    .is_ok()
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("the release");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|number| number.parse::<u32>().unwrap_or(0));
    let found = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    found >= (major, minor)
}

/// The cgroup2 mount of this machine (never hard-coded: hybrid hosts mount it elsewhere).
pub fn cgroup2_mount() -> PathBuf {
    let output = run("findmnt", &["-n", "-t", "cgroup2", "-o", "TARGET"]);
    let mount = String::from_utf8_lossy(&output.stdout);
    let first = mount.lines().next().expect("cgroup v2 is not mounted");
    PathBuf::from(first.trim())
}

/// A cgroup of the test's own under the cgroup2 root, with child cgroups; all removed on
/// drop (after the processes in them have exited).
pub struct TestCgroup {
    pub path: PathBuf,
    children: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn new(children: &[&str]) -> Self {
        sweep_leftovers();
        let path = cgroup2_mount().join(unique_name());
        std::fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("creating cgroup {}: {error}", path.display()));
        let mut cgroup = Self {
            path,
            children: Vec::new(),
        };
        for child in children {
            let child_path = cgroup.path.join(child);
            std::fs::create_dir(&child_path).unwrap_or_else(|error| {
                panic!("creating cgroup {}: {error}", child_path.display())
            });
            cgroup.children.push(child_path);
        }
        cgroup
    }

    pub fn child(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The path relative to the cgroup2 mount, as `srcip` reports it in `cgroup`.
    pub fn relative(path: &Path) -> String {
        let mount = cgroup2_mount();
        format!("/{}", path.strip_prefix(&mount).unwrap().display())
    }

    pub fn id(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat of the cgroup").ino()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in self
            .children
            .iter()
            .rev()
            .chain(std::iter::once(&self.path))
        {
            if let Err(error) = std::fs::remove_dir(dir) {
                eprintln!("could not remove cgroup {}: {error}", dir.display());
            }
        }
    }
}

/// What `tcp-client` reports about the connection it started.
#[derive(Debug, serde::Deserialize)]
pub struct ClientReport {
    pub pid: u32,
    pub src: String,
    pub src_port: u16,
    /// The errno's name when `connect()` failed at once (`EPERM`: blocked).
    pub error: Option<String>,
}

/// Starts one TCP connection from `cgroup` inside `netns` and returns what the kernel chose;
/// `connect()` must not fail (see [`attempt_connect`]).
pub fn connect(
    netns: &Netns,
    cgroup: &Path,
    bind: Option<&str>,
    dst: &str,
    port: u16,
) -> ClientReport {
    let report = attempt_connect(netns, cgroup, bind, dst, port);
    assert_eq!(
        report.error, None,
        "connect() to {dst} from {bind:?} failed"
    );
    report
}

/// As [`connect`], for a connection that may be refused (`block`): the caller checks `error`.
pub fn attempt_connect(
    netns: &Netns,
    cgroup: &Path,
    bind: Option<&str>,
    dst: &str,
    port: u16,
) -> ClientReport {
    let mut options = vec!["--count", "1"];
    if let Some(bind) = bind {
        options.extend(["--bind", bind]);
    }
    let mut reports = attempt_client(netns, cgroup, &options, dst, port);
    reports.pop().expect("tcp-client reports its connection")
}

/// Connects from the host's other address (which `PARTNER_POLICY` does not allow) to the
/// partner's port 443, and waits until `daemon` writes the violation.
pub fn make_violation(daemon: &mut Daemon, topology: &Topology, cgroup: &Path) -> ClientReport {
    let client = connect(&topology.host, cgroup, Some(OTHER_V4), PARTNER_V4, 443);
    daemon.wait_for("the violation", |line| {
        line.violation()
            .is_some_and(|violation| violation.src_port == client.src_port)
    });
    client
}

/// Connects like [`connect`] and returns the one line `daemon` (run with `--all`) writes
/// for that connection: its `connect` line, or its `violation` or `pinned` line.
pub fn connection_line(
    daemon: &mut Daemon,
    netns: &Netns,
    cgroup: &Path,
    bind: Option<&str>,
    dst: &str,
    port: u16,
) -> Connection {
    let client = connect(netns, cgroup, bind, dst, port);
    let line = daemon.wait_for("the connection's line", |line| {
        line.connection()
            .is_some_and(|c| c.src_port == client.src_port)
    });
    line.connection().unwrap().clone()
}

/// Waits until something listens on loopback `port` (a test server starting).
pub fn wait_until_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + SERVER_START_TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not start listening on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Starts `count` TCP connections from one process; returns what the kernel chose for each.
pub fn connect_many(
    netns: &Netns,
    cgroup: &Path,
    bind: Option<&str>,
    dst: &str,
    port: u16,
    count: usize,
) -> Vec<ClientReport> {
    let count = count.to_string();
    let mut options = vec!["--count", &count];
    if let Some(bind) = bind {
        options.extend(["--bind", bind]);
    }
    client(netns, cgroup, &options, dst, port)
}

/// Runs `tcp-client` with `options` (see its usage) from `cgroup` inside `netns`; returns
/// what the kernel chose for each connection, none of which may fail.
pub fn client(
    netns: &Netns,
    cgroup: &Path,
    options: &[&str],
    dst: &str,
    port: u16,
) -> Vec<ClientReport> {
    let reports = attempt_client(netns, cgroup, options, dst, port);
    for report in &reports {
        assert_eq!(
            report.error, None,
            "a connect() to {dst} ({options:?}) failed"
        );
    }
    reports
}

/// As [`client`], for connections that may be refused: the caller checks `error`.
pub fn attempt_client(
    netns: &Netns,
    cgroup: &Path,
    options: &[&str],
    dst: &str,
    port: u16,
) -> Vec<ClientReport> {
    let cgroup = cgroup.to_str().unwrap();
    let port = port.to_string();
    let mut args = vec!["--cgroup", cgroup, "--netns", &netns.name];
    args.extend(options);
    args.extend([dst, &port]);
    let output = run(tcp_client_bin().to_str().unwrap(), &args);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("tcp-client prints JSON lines"))
        .collect()
}

/// A policy file in a temporary directory, removed on drop.
pub struct PolicyFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl PolicyFile {
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, text).expect("writing the policy");
        Self { _dir: dir, path }
    }
}

/// `srcip check --format json --policy POLICY` run inside `netns`: its exit code and its
/// rows.
pub fn check_in(netns: &Netns, policy: &Path) -> (i32, Vec<serde_json::Value>) {
    check_in_with(netns, policy, &[])
}

/// As [`check_in`], with more arguments for `srcip check`.
pub fn check_in_with(netns: &Netns, policy: &Path, args: &[&str]) -> (i32, Vec<serde_json::Value>) {
    let policy = policy.to_str().expect("a policy path in UTF-8");
    let mut all = vec!["--policy", policy];
    all.extend(args);
    ask_in(netns, &all)
}

/// `srcip check --format json ARGS…` run inside `netns` (a policy, or a destination asked
/// about without one): its exit code and its rows.
pub fn ask_in(netns: &Netns, args: &[&str]) -> (i32, Vec<serde_json::Value>) {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", netns.name))
        .arg(srcip_bin())
        .args(["check", "--format", "json"])
        .args(args)
        .output()
        .expect("run srcip check");
    let rows = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("srcip check prints JSON lines"))
        .collect();
    let code = output.status.code().unwrap_or_else(|| {
        panic!(
            "srcip check was killed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (code, rows)
}

/// A shell command (such as a `fix` of `srcip check`) run as printed inside `netns`.
pub fn shell_in(netns: &Netns, command: &str) {
    run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{}", netns.name),
            "sh",
            "-c",
            command,
        ],
    );
}

/// The incident's policy: the partner accepts only 203.0.113.10 and 2001:db8::10.
pub const PARTNER_POLICY: &str = r#"
[[rule]]
name = "partner"
destinations = ["198.51.100.50", "2001:db8:50::/64"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.10", "2001:db8::10"]
"#;

/// The `udp-client` helper, built by cargo beside `tcp-client`.
pub fn udp_client_bin() -> PathBuf {
    target_profile_dir().join("udp-client")
}

/// What `udp-client` reports: its pid, its socket's address, and the error that stopped it.
#[derive(Debug, serde::Deserialize)]
pub struct UdpReport {
    pub pid: u32,
    /// The socket's address after sending: the bound or connected source, or unspecified.
    pub src: String,
    pub src_port: u16,
    /// The errno's name when `connect()` or `sendto()` was refused (`EPERM`: blocked).
    pub error: Option<String>,
    /// Datagrams the kernel took.
    pub sent: usize,
}

/// A `udp-client --wait` that has made its socket and waits to send; killed when dropped.
pub struct WaitingUdpClient {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl WaitingUdpClient {
    /// Starts `udp-client --wait` like [`udp_client`] and returns once its socket exists.
    pub fn start(
        netns: &Netns,
        cgroup: &Path,
        options: &[&str],
        destinations: &str,
        port: u16,
    ) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new(udp_client_bin())
            .args(["--cgroup", cgroup.to_str().unwrap(), "--netns", &netns.name])
            .arg("--wait")
            .args(options)
            .args([destinations, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn udp-client");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).expect("udp-client stdout");
        assert_eq!(ready.trim(), "ready", "udp-client did not get ready");
        Self { child, stdout }
    }

    /// Lets it send, and returns its report; the datagram must not fail.
    pub fn send(self) -> UdpReport {
        let report = self.attempt_send();
        assert_eq!(report.error, None, "udp-client's datagram failed");
        report
    }

    /// As [`WaitingUdpClient::send`], for a datagram that may be refused (`block`).
    pub fn attempt_send(mut self) -> UdpReport {
        use std::io::{BufRead as _, Write as _};
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"go\n").expect("udp-client stdin");
        let mut report = String::new();
        self.stdout
            .read_line(&mut report)
            .expect("udp-client stdout");
        let status = self.child.wait().expect("udp-client exit");
        assert!(status.success(), "udp-client failed: {status}");
        serde_json::from_str(&report).expect("udp-client prints one JSON line")
    }
}

impl Drop for WaitingUdpClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `udp-client` with `options` (see its usage) from `cgroup` inside `netns`.
pub fn udp_client(
    netns: &Netns,
    cgroup: &Path,
    options: &[&str],
    destinations: &str,
    port: u16,
) -> UdpReport {
    let report = attempt_udp_client(netns, cgroup, options, destinations, port);
    assert_eq!(
        report.error, None,
        "udp-client to {destinations} ({options:?}) failed"
    );
    report
}

/// As [`udp_client`], for datagrams that may be refused (`block`): the caller checks `error`.
pub fn attempt_udp_client(
    netns: &Netns,
    cgroup: &Path,
    options: &[&str],
    destinations: &str,
    port: u16,
) -> UdpReport {
    let cgroup = cgroup.to_str().unwrap();
    let port = port.to_string();
    let mut args = vec!["--cgroup", cgroup, "--netns", &netns.name];
    args.extend(options);
    args.extend([destinations, &port]);
    let output = run(udp_client_bin().to_str().unwrap(), &args);
    serde_json::from_slice(&output.stdout).expect("udp-client prints one JSON line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_hangs_fails_its_test_and_is_killed() {
        // An odd length, so that no other process sleeps with these arguments.
        let hung = std::panic::catch_unwind(|| {
            run_within("sleep", &["60.0417"], std::time::Duration::from_secs(1))
        });
        let message = hung.expect_err("a hung command fails");
        let message = message
            .downcast_ref::<String>()
            .expect("a panic with a message");
        assert!(
            message.contains("sleep 60.0417 did not finish within 1 s; killed"),
            "{message}"
        );
        let still_running = Command::new("pgrep")
            .args(["-f", "^sleep 60.0417$"])
            .status()
            .unwrap();
        assert!(!still_running.success(), "the hung command was not killed");
    }
}
