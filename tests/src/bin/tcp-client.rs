//! Test helper: joins a cgroup and a network namespace, starts TCP connections, and prints
//! what the kernel chose for each as one JSON line: `{"pid":…,"src":"…","src_port":…,
//! "error":…}` (`error`: null, or the errno's name when `connect()` failed at once, as a
//! blocked one does).
//!
//! `tcp-client --cgroup DIR --netns NAME [--bind ADDR | --bind-port PORT] [--count N] [--comm NAME]
//!            [--uid UID] [--mark MARK] [--ip-options] [--ipv6-header KIND] [--io-uring]
//!            [--displace-owner] [--mptcp] [--linger MS] [--created-in DIR | --passed-from DIR]
//!            [--retry-port PORT] DST_ADDR DST_PORT`
//!
//! `--retry-port PORT`: a socket whose `connect()` is refused at once (`block`) is connected
//! again, to DST_ADDR:PORT, as a client that tries another port of its partner does; the
//! second attempt gets a report line of its own.
//!
//! The connection is non-blocking: the source is chosen when `connect()` returns, so the
//! helper does not need anyone to answer; it then waits briefly for the handshake to end.
//!
//! `--bind-port PORT` binds each socket to PORT on the unspecified address (the kernel still
//! chooses the source), as clients that fix their source port do.
//!
//! `--comm NAME` renames the process before it creates its sockets; `--uid UID` makes it run
//! as that user (gid too) once it has joined the cgroup and namespace; `--mark MARK` sets
//! `SO_MARK` on each socket before it connects, `--ip-options` IPv4 options, `--ipv6-header`
//! IPv6 extension headers (`srcip_tests::add_ipv6_header`). `--io-uring` has the
//! kernel make the connection instead, in an io_uring worker (forced with `IOSQE_ASYNC`):
//! outside this program's context, as a kernel thread in the root cgroup before Linux 5.12
//! (and 5.10.162), and as an `iou-wrk-TID` thread with a name of its own after. It needs `--bind` (the source is then known before the connect)
//! and makes one connection.
//!
//! `--mptcp` makes each socket an MPTCP one (`IPPROTO_MPTCP`), sends a byte and waits for
//! one back (the path manager opens further subflows once the connection is fully
//! established, which takes data), and keeps it open for a second while the kernel opens
//! the subflows the namespace's MPTCP endpoints ask for (`ip mptcp endpoint ... subflow`).
//! The partner must answer (`srcip_tests::MptcpListener`).
//!
//! `--created-in DIR` and `--passed-from DIR` make the one socket elsewhere: while this
//! process is in cgroup DIR, before it moves into `--cgroup`, or in another process in
//! cgroup DIR, which passes it with `SCM_RIGHTS` (`srcip_tests::client_socket`); it then
//! connects from `--cgroup`. With `--bind`, `--mark`, `--mptcp`, `--linger` only.
//!
//! `--linger MS` keeps the sockets open that long after connecting (and exchanging), instead
//! of 200 ms (1 s with `--mptcp`). Each connection's line is printed, and flushed, at once.
//!
//! `--displace-owner` creates its socket, then more TCP sockets (each closed at once) until
//! one has a socket cookie that srcip's TCP owner table gives the same slot (the cookie's
//! low bits, `srcip_common::owner::TCP_OWNER_ENTRIES`), which moves the first socket's owner
//! out of it; then it renames itself `late-connector` and connects the first socket. The
//! connection's `comm` says whose owner srcip found: the creator's (`--comm`), or, had the
//! owner been lost, the connecting task's. It makes one connection.

use std::{
    ffi::CString,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use io_uring::{IoUring, opcode, squeue, types};
use socket2::{Domain, SockAddr, Socket, Type};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut cgroup = None;
    let mut netns = None;
    let mut bind = None;
    let mut bind_port = None;
    let mut count = 1;
    let mut comm = None;
    let mut io_uring = false;
    let mut uid: Option<u32> = None;
    let mut mark: Option<u32> = None;
    let mut ip_options = false;
    let mut ipv6_header = None;
    let mut displace_owner = false;
    let mut mptcp = false;
    let mut linger = None;
    let mut created_in = None;
    let mut passed_from = None;
    let mut retry_port = None;
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => cgroup = args.next(),
            "--netns" => netns = args.next(),
            "--bind" => bind = args.next(),
            "--bind-port" => {
                bind_port = Some(
                    args.next()
                        .and_then(|port| port.parse::<u16>().ok())
                        .expect("--bind-port PORT"),
                );
            }
            "--count" => count = args.next().and_then(|n| n.parse().ok()).expect("--count N"),
            "--comm" => comm = args.next(),
            "--io-uring" => io_uring = true,
            "--ip-options" => ip_options = true,
            "--ipv6-header" => ipv6_header = args.next(),
            "--displace-owner" => displace_owner = true,
            "--mptcp" => mptcp = true,
            "--created-in" => created_in = args.next(),
            "--passed-from" => passed_from = args.next(),
            "--retry-port" => {
                retry_port = Some(
                    args.next()
                        .and_then(|n| n.parse::<u16>().ok())
                        .expect("--retry-port PORT"),
                );
            }
            "--linger" => {
                linger = Some(
                    args.next()
                        .and_then(|ms| ms.parse::<u64>().ok())
                        .expect("--linger MS"),
                );
            }
            "--uid" => uid = Some(args.next().and_then(|n| n.parse().ok()).expect("--uid UID")),
            "--mark" => {
                mark = Some(
                    args.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--mark MARK"),
                );
            }
            _ => positional.push(arg),
        }
    }
    let [dst, port] = positional.as_slice() else {
        panic!(
            "usage: tcp-client --cgroup DIR --netns NAME [--bind ADDR | --bind-port PORT] [--count N] [--comm NAME] [--uid UID] [--mark MARK] [--ip-options] [--ipv6-header KIND] [--io-uring] [--displace-owner] [--mptcp] [--linger MS] [--created-in DIR | --passed-from DIR] [--retry-port PORT] DST_ADDR DST_PORT"
        );
    };
    let dst: IpAddr = dst.parse().expect("DST_ADDR");
    let port: u16 = port.parse().expect("DST_PORT");

    let dst_address = SocketAddr::new(dst, port);
    let make_socket = || new_socket(dst_address, ip_options, ipv6_header.as_deref(), mptcp);
    if created_in.is_some() || passed_from.is_some() {
        let socket =
            srcip_tests::client_socket(cgroup, netns, created_in, passed_from, make_socket);
        let bind = bind.map(|address| SocketAddr::new(address.parse().expect("--bind ADDR"), 0));
        let socket = connect(socket, dst_address, bind, mark).socket;
        if mptcp {
            exchange_a_byte(&socket);
        }
        std::thread::sleep(Duration::from_millis(linger.unwrap_or(200)));
        return;
    }
    srcip_tests::enter(cgroup, netns);
    if let Some(uid) = uid {
        nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).expect("setgid");
        nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).expect("setuid");
    }

    if let Some(comm) = comm {
        let name = CString::new(comm).expect("--comm without NUL bytes");
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        let result = unsafe { nix::libc::prctl(nix::libc::PR_SET_NAME, name.as_ptr()) };
        assert_eq!(result, 0, "prctl(PR_SET_NAME)");
    }
    let bind: Option<SocketAddr> = match (bind, bind_port) {
        (Some(address), None) => Some(SocketAddr::new(address.parse().expect("--bind ADDR"), 0)),
        (None, Some(port)) => Some(SocketAddr::new(unspecified_like(dst), port)),
        (None, None) => None,
        (Some(_), Some(_)) => panic!("--bind and --bind-port exclude each other"),
    };
    if io_uring {
        let bind = bind.expect("--io-uring needs --bind").ip();
        connect_in_io_uring_worker(SocketAddr::new(dst, port), bind);
        return;
    }
    if displace_owner {
        let socket = connect_after_displacing_owner(SocketAddr::new(dst, port), bind);
        std::thread::sleep(Duration::from_millis(200));
        drop(socket);
        return;
    }
    // Kept open until the end, so that every connection gets its own source port.
    let sockets: Vec<Socket> = (0..count)
        .map(|_| {
            let socket = connect(make_socket(), dst_address, bind, mark);
            if let Some(port) = retry_port
                && socket.refused
            {
                start_connect(&socket.socket, SocketAddr::new(dst, port));
            }
            socket.socket
        })
        .collect();
    if mptcp {
        sockets.iter().for_each(exchange_a_byte);
    }
    // Let the handshakes (or the refusals) finish before the sockets close; MPTCP's further
    // subflows start after the exchange.
    let linger = linger.unwrap_or(if mptcp { 1000 } else { 200 });
    std::thread::sleep(Duration::from_millis(linger));
    drop(sockets);
}

/// A TCP (or MPTCP) socket for `dst`, with the IP options or IPv6 extension headers asked
/// for.
fn new_socket(dst: SocketAddr, ip_options: bool, ipv6_header: Option<&str>, mptcp: bool) -> Socket {
    const IPPROTO_MPTCP: i32 = 262;
    let protocol = mptcp.then_some(socket2::Protocol::from(IPPROTO_MPTCP));
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, protocol).expect("socket");
    if ip_options {
        srcip_tests::add_ip_options(&socket);
    }
    if let Some(kind) = ipv6_header {
        srcip_tests::add_ipv6_header(&socket, kind);
    }
    socket
}

/// See `--mptcp`.
fn exchange_a_byte(socket: &Socket) {
    use std::io::{Read as _, Write as _};
    socket.set_nonblocking(false).expect("blocking");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("SO_RCVTIMEO");
    socket
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("SO_SNDTIMEO");
    let mut stream = socket;
    stream
        .write_all(b"?")
        .expect("sending a byte to the partner");
    let mut answer = [0; 1];
    stream
        .read_exact(&mut answer)
        .expect("the partner's answer (is it an MptcpListener?)");
}

/// See `--displace-owner`.
fn connect_after_displacing_owner(dst: SocketAddr, bind: Option<SocketAddr>) -> Socket {
    let slots = u64::from(srcip_common::owner::TCP_OWNER_ENTRIES);
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("socket");
    let first = cookie(&socket);
    // Cookies grow, in per-CPU batches: the slot comes round within a few wraps.
    let most = 16 * slots;
    let displaced = (0..most).any(|_| {
        let later = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("socket");
        let cookie = cookie(&later);
        cookie > first && (cookie - first).is_multiple_of(slots)
    });
    assert!(
        displaced,
        "no socket of {most} got the slot of cookie {first}"
    );
    let name = CString::new("late-connector").unwrap();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    let result = unsafe { nix::libc::prctl(nix::libc::PR_SET_NAME, name.as_ptr()) };
    assert_eq!(result, 0, "prctl(PR_SET_NAME)");
    connect(socket, dst, bind, None).socket
}

/// The socket's cookie (`SO_COOKIE`), which the kernel hands out on first use.
fn cookie(socket: &Socket) -> u64 {
    let mut cookie: u64 = 0;
    let mut length = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into the buffer of the length given.
    let result = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut length,
        )
    };
    assert_eq!(result, 0, "getsockopt(SO_COOKIE)");
    cookie
}

/// The unspecified address of `address`'s family.
fn unspecified_like(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    }
}

/// Starts a non-blocking connection and prints the source the kernel chose for it.
/// A socket whose connection was started, and whether `connect()` refused it at once.
struct Started {
    socket: Socket,
    refused: bool,
}

fn connect(
    socket: Socket,
    dst: SocketAddr,
    bind: Option<SocketAddr>,
    mark: Option<u32>,
) -> Started {
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
            .expect("SO_MARK");
    }
    if let Some(address) = bind {
        socket.bind(&address.into()).expect("bind");
    }
    socket.set_nonblocking(true).expect("non-blocking");
    let refused = start_connect(&socket, dst);
    Started { socket, refused }
}

/// Starts the connection of `socket` (non-blocking) to `dst` and reports it; whether
/// `connect()` refused it at once.
fn start_connect(socket: &Socket, dst: SocketAddr) -> bool {
    let error = match socket.connect(&dst.into()) {
        Ok(()) => None,
        Err(error) if error.raw_os_error() == Some(nix::libc::EINPROGRESS) => None,
        // Refused at once (`block`): reported, not fatal.
        Err(error) => error.raw_os_error(),
    };
    report(socket, error);
    error.is_some()
}

/// Prints the socket's local address as the kernel has it now, and the errno (by name) that
/// `connect()` failed with at once, if it did.
fn report(socket: &Socket, error: Option<i32>) {
    let local = socket
        .local_addr()
        .expect("getsockname")
        .as_socket()
        .expect("an IP socket");
    println!(
        "{}",
        serde_json::json!({
            "pid": std::process::id(),
            "src": local.ip().to_string(),
            "src_port": local.port(),
            "error": error.map(|code| format!("{:?}", nix::errno::Errno::from_raw(code))),
        })
    );
}

/// Binds a socket here, then has an io_uring worker connect it; prints the source first, as
/// the connection may be refused before this program sees its outcome.
fn connect_in_io_uring_worker(dst: SocketAddr, bind: IpAddr) {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(bind, 0).into()).expect("bind");
    report(&socket, None);
    let mut ring = IoUring::new(2).expect("io_uring_setup");
    let address = SockAddr::from(dst);
    let connect = opcode::Connect::new(
        types::Fd(socket.as_raw_fd()),
        address.as_ptr().cast(),
        address.len(),
    )
    .build()
    // Never tried inline: always handed to a worker.
    .flags(squeue::Flags::ASYNC);
    // SAFETY: `address` and the socket outlive the submission, which is waited for below.
    unsafe {
        ring.submission()
            .push(&connect)
            .expect("queueing the connect")
    };
    ring.submit_and_wait(1).expect("io_uring_enter");
    let completion = ring.completion().next().expect("a completion");
    // Refused (nobody listens) or connected: either way the SYN left.
    let result = completion.result();
    assert!(
        result == 0 || result == -nix::libc::ECONNREFUSED,
        "io_uring connect: {}",
        std::io::Error::from_raw_os_error(-result)
    );
}
