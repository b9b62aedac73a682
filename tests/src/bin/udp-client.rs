//! Test helper: joins a cgroup and a network namespace and sends UDP datagrams the ways
//! programs do, then prints one JSON line: `{"pid":…,"src":…,"src_port":…,"error":…,"sent":…}`
//! (the socket's address and port, `null` or the error that stopped it, and how many
//! datagrams the kernel took).
//!
//! `udp-client --cgroup DIR --netns NAME [--bind ADDR] [--connect | --pktinfo SRC |
//!            --connected-pktinfo SRC |
//!            --sendmmsg | --threads N [--staggered]] [--count N] [--ipv6-header KIND]
//!            [--created-in DIR | --passed-from DIR] DST_ADDR[,DST_ADDR…] DST_PORT`
//!
//! - default: `sendto()` each destination from one unconnected socket;
//! - `--connect`: `connect()` to the one destination, then `send()`;
//! - `--pktinfo SRC`: `sendmsg()` with `IP_PKTINFO`/`IPV6_PKTINFO` choosing the source SRC
//!   per datagram, as DNS servers on multi-IP hosts do;
//! - `--connected-pktinfo SRC`: `connect()` to the one destination, then `sendmsg()` with no
//!   address and `IP_PKTINFO` choosing the source SRC;
//! - `--sendmmsg`: one `sendmmsg()` call with a datagram to each destination;
//! - `--threads N`: `sendto()` each destination from N threads at the same moment, on the
//!   one unconnected socket: each datagram of a flow is its socket's first of that flow. A
//!   refused datagram does not end the client: `sent` tells how many passed. With
//!   `--staggered`, thread i sends to the destination i places further in the list, so
//!   that the threads send different flows at the same moment.
//!
//! A refused `connect()` or `sendto()` ends the client; its report then has `error` (the
//! errno's name, such as `EPERM`).
//!
//! `--count N` sends N datagrams to each destination (with `--sendmmsg`, N calls).
//! `--wait` makes the socket (bound and connected as asked), prints `ready`, and sends only
//! after a line on stdin: a socket made before srcip started.
//! `--spread N` makes the destinations the N consecutive IPv4 addresses from DST_ADDR.
//! `--ip-options` puts IPv4 options on the socket's datagrams, `--ipv6-header KIND` IPv6
//! extension headers (`srcip_tests::add_ipv6_header`).
//!
//! Where the socket comes from (default: made by this process in `--cgroup`):
//! - `--created-in DIR`: made while this process is in cgroup DIR, which then moves into
//!   `--cgroup` before it binds, connects or sends;
//! - `--passed-from DIR`: made by another process, in cgroup DIR, and passed to this one in
//!   `--cgroup` with `SCM_RIGHTS`, as systemd's socket activation passes sockets.

use std::{
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use nix::libc;
use socket2::{Domain, SockAddr, Socket, Type};

enum Mode {
    SendTo,
    Connect,
    PacketInfo(IpAddr),
    ConnectedPacketInfo(IpAddr),
    SendMmsg,
    /// `--threads N`.
    Racing {
        threads: usize,
        staggered: bool,
    },
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut cgroup, mut netns, mut bind) = (None, None, None);
    let mut mode = Mode::SendTo;
    let mut count = 1;
    let mut spread = None;
    let mut wait = false;
    let mut ip_options = false;
    let mut ipv6_header = None;
    let mut created_in = None;
    let mut passed_from = None;
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => cgroup = args.next(),
            "--netns" => netns = args.next(),
            "--bind" => bind = args.next(),
            "--connect" => mode = Mode::Connect,
            "--pktinfo" => {
                let source = args.next().and_then(|text| text.parse().ok());
                mode = Mode::PacketInfo(source.expect("--pktinfo ADDR"));
            }
            "--connected-pktinfo" => {
                let source = args.next().and_then(|text| text.parse().ok());
                mode = Mode::ConnectedPacketInfo(source.expect("--connected-pktinfo ADDR"));
            }
            "--sendmmsg" => mode = Mode::SendMmsg,
            "--threads" => {
                let threads = args.next().and_then(|n| n.parse().ok());
                mode = Mode::Racing {
                    threads: threads.expect("--threads N"),
                    staggered: false,
                };
            }
            "--staggered" => match &mut mode {
                Mode::Racing { staggered, .. } => *staggered = true,
                _ => panic!("--staggered goes after --threads N"),
            },
            "--count" => count = args.next().and_then(|n| n.parse().ok()).expect("--count N"),
            "--spread" => spread = args.next().and_then(|n| n.parse::<u32>().ok()),
            "--wait" => wait = true,
            "--ip-options" => ip_options = true,
            "--ipv6-header" => ipv6_header = args.next(),
            "--created-in" => created_in = args.next(),
            "--passed-from" => passed_from = args.next(),
            _ => positional.push(arg),
        }
    }
    let [destinations, port] = positional.as_slice() else {
        panic!(
            "usage: udp-client --cgroup DIR --netns NAME [--bind ADDR] [--connect | --pktinfo SRC | --connected-pktinfo SRC | --sendmmsg | --threads N [--staggered]] [--count N] [--ipv6-header KIND] [--created-in DIR | --passed-from DIR] DST_ADDR[,DST_ADDR...] DST_PORT"
        );
    };
    let port: u16 = port.parse().expect("DST_PORT");
    let mut destinations: Vec<SocketAddr> = destinations
        .split(',')
        .map(|address| SocketAddr::new(address.parse().expect("DST_ADDR"), port))
        .collect();
    if let (Some(spread), IpAddr::V4(first)) = (spread, destinations[0].ip()) {
        destinations = (0..spread)
            .map(|offset| SocketAddr::new(IpAddr::V4((u32::from(first) + offset).into()), port))
            .collect();
    }

    let new_socket = || {
        let socket =
            Socket::new(Domain::for_address(destinations[0]), Type::DGRAM, None).expect("socket");
        if ip_options {
            srcip_tests::add_ip_options(&socket);
        }
        if let Some(kind) = &ipv6_header {
            srcip_tests::add_ipv6_header(&socket, kind);
        }
        socket
    };
    let socket = srcip_tests::client_socket(cgroup, netns, created_in, passed_from, new_socket);
    if let Some(address) = bind {
        let address: IpAddr = address.parse().expect("--bind ADDR");
        socket
            .bind(&SocketAddr::new(address, 0).into())
            .expect("bind");
    }
    if let Mode::Connect | Mode::ConnectedPacketInfo(_) = mode
        && let Err(error) = socket.connect(&destinations[0].into())
    {
        report(&socket, Some(&error), 0);
        return;
    }
    if wait {
        println!("ready");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("stdin");
    }
    let payload = b"srcip test datagram";
    let mut sent = 0;
    // `--threads`: the first refusal, which does not end the client.
    let mut refused = None;
    for _ in 0..count {
        match mode {
            Mode::SendTo => {
                for destination in &destinations {
                    if let Err(error) = socket.send_to(payload, &(*destination).into()) {
                        report(&socket, Some(&error), sent);
                        return;
                    }
                    sent += 1;
                }
            }
            Mode::Connect => {
                // Nobody listens: a port-unreachable from an earlier datagram may surface here.
                match socket.send(payload) {
                    Err(error) if error.kind() != std::io::ErrorKind::ConnectionRefused => {
                        panic!("send: {error}")
                    }
                    Err(_) => {}
                    Ok(_) => sent += 1,
                }
            }
            Mode::PacketInfo(source) => {
                for destination in &destinations {
                    let result = send_with_source(&socket, Some(*destination), source, payload);
                    if let Err(error) = result {
                        report(&socket, Some(&error), sent);
                        return;
                    }
                    sent += 1;
                }
            }
            Mode::ConnectedPacketInfo(source) => {
                if let Err(error) = send_with_source(&socket, None, source, payload) {
                    report(&socket, Some(&error), sent);
                    return;
                }
                sent += 1;
            }
            Mode::SendMmsg => {
                if let Err(error) = send_to_all(&socket, &destinations, payload) {
                    report(&socket, Some(&error), sent);
                    return;
                }
                sent += destinations.len();
            }
            Mode::Racing { threads, staggered } => {
                let (passed, error) =
                    send_racing(&socket, &destinations, threads, staggered, payload);
                sent += passed;
                refused = refused.or(error);
            }
        }
    }
    report(&socket, refused.as_ref(), sent);
}

/// Sends a datagram to each destination in turn from `threads` threads, which wait for each
/// other before each one (spinning, so that they leave within a few hundred nanoseconds of
/// each other); `staggered`, thread i sends to the destination i places further. Returns
/// how many the kernel took, and the first refusal.
fn send_racing(
    socket: &Socket,
    destinations: &[SocketAddr],
    threads: usize,
    staggered: bool,
    payload: &[u8],
) -> (usize, Option<std::io::Error>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let arrived = AtomicUsize::new(0);
    let send_all = |thread: usize| {
        let (mut sent, mut refused) = (0, None);
        for round in 0..destinations.len() {
            let offset = if staggered { thread } else { 0 };
            let destination = &destinations[(round + offset) % destinations.len()];
            arrived.fetch_add(1, Ordering::SeqCst);
            let mut spins = 0u32;
            while arrived.load(Ordering::SeqCst) < (round + 1) * threads {
                // On a machine with fewer CPUs than threads, let the others run.
                spins += 1;
                if spins.is_multiple_of(4096) {
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
            match socket.send_to(payload, &(*destination).into()) {
                Ok(_) => sent += 1,
                Err(error) => {
                    refused.get_or_insert(error);
                }
            }
        }
        (sent, refused)
    };
    std::thread::scope(|scope| {
        let senders: Vec<_> = (0..threads)
            .map(|thread| scope.spawn(move || send_all(thread)))
            .collect();
        senders
            .into_iter()
            .map(|sender| sender.join().expect("a sending thread panicked"))
            .fold((0, None), |(sent, refused), (more, error)| {
                (sent + more, refused.or(error))
            })
    })
}

/// Prints the report line: the socket's address as the kernel has it now, the error that
/// stopped the client (a refused `connect()` or `sendto()`), if one did, and how many
/// datagrams the kernel took.
fn report(socket: &Socket, error: Option<&std::io::Error>, sent: usize) {
    let local = socket
        .local_addr()
        .expect("getsockname")
        .as_socket()
        .expect("an IP socket");
    let error = error.map(|error| match error.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None => error.to_string(),
    });
    println!(
        "{}",
        serde_json::json!({
            "pid": std::process::id(),
            "src": local.ip().to_string(),
            "src_port": local.port(),
            "error": error,
            "sent": sent,
        })
    );
}

/// `sendmsg()` with the source chosen by `IP_PKTINFO` or `IPV6_PKTINFO`, to `destination`
/// (`None`: the connected socket's peer).
fn send_with_source(
    socket: &Socket,
    destination: Option<SocketAddr>,
    source: IpAddr,
    payload: &[u8],
) -> std::io::Result<()> {
    let address = destination.map(SockAddr::from);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // Room for either control message, aligned as cmsghdr wants.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some(address) = &address {
        message.msg_name = address.as_ptr().cast_mut().cast();
        message.msg_namelen = address.len();
    }
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_* compute sizes and pointers inside `control`, which is large enough.
    unsafe {
        let (level, kind, length) = match source {
            IpAddr::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                size_of::<libc::in_pktinfo>(),
            ),
            IpAddr::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                size_of::<libc::in6_pktinfo>(),
            ),
        };
        message.msg_controllen = libc::CMSG_SPACE(length as u32) as usize;
        let header = libc::CMSG_FIRSTHDR(&raw const message);
        (*header).cmsg_level = level;
        (*header).cmsg_type = kind;
        (*header).cmsg_len = libc::CMSG_LEN(length as u32) as usize;
        let data = libc::CMSG_DATA(header);
        match source {
            IpAddr::V4(v4) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
            IpAddr::V6(v6) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
        }
        if libc::sendmsg(socket.as_raw_fd(), &raw const message, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One `sendmmsg()` with a datagram to each destination; the error when its first datagram
/// was refused (the call then sends none).
fn send_to_all(
    socket: &Socket,
    destinations: &[SocketAddr],
    payload: &[u8],
) -> std::io::Result<()> {
    let addresses: Vec<SockAddr> = destinations.iter().map(|&d| SockAddr::from(d)).collect();
    let mut iovs: Vec<libc::iovec> = destinations
        .iter()
        .map(|_| libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = addresses
        .iter()
        .zip(iovs.iter_mut())
        .map(|(address, iov)| {
            // SAFETY: mmsghdr is plain data; its pointers outlive the call below.
            let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
            message.msg_hdr.msg_name = address.as_ptr().cast_mut().cast();
            message.msg_hdr.msg_namelen = address.len();
            message.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            message.msg_hdr.msg_iovlen = 1;
            message
        })
        .collect();
    // SAFETY: `messages` holds valid headers for the whole call.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            messages.as_mut_ptr(),
            messages.len() as u32,
            0,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    assert_eq!(sent, messages.len() as i32, "sendmmsg sent only {sent}");
    Ok(())
}
