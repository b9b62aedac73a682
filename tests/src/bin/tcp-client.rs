//! Test helper: joins a cgroup and a network namespace, starts TCP connections, and prints
//! what the kernel chose for each as one JSON line: `{"pid":…,"src":"…","src_port":…}`.
//!
//! `tcp-client --cgroup DIR --netns NAME [--bind ADDR] [--count N] DST_ADDR DST_PORT`
//!
//! The connection is non-blocking: the source is chosen when `connect()` returns, so the
//! helper does not need anyone to answer; it then waits briefly for the handshake to end.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut cgroup = None;
    let mut netns = None;
    let mut bind = None;
    let mut count = 1;
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => cgroup = args.next(),
            "--netns" => netns = args.next(),
            "--bind" => bind = args.next(),
            "--count" => count = args.next().and_then(|n| n.parse().ok()).expect("--count N"),
            _ => positional.push(arg),
        }
    }
    let [dst, port] = positional.as_slice() else {
        panic!("usage: tcp-client --cgroup DIR --netns NAME [--bind ADDR] DST_ADDR DST_PORT");
    };
    let dst: IpAddr = dst.parse().expect("DST_ADDR");
    let port: u16 = port.parse().expect("DST_PORT");

    let cgroup = cgroup.expect("--cgroup");
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    let netns = netns.expect("--netns");
    let namespace = File::open(format!("/run/netns/{netns}")).expect("opening the namespace");
    setns(&namespace, CloneFlags::CLONE_NEWNET).expect("entering the namespace");

    let bind: Option<IpAddr> = bind.map(|address| address.parse().expect("--bind ADDR"));
    // Kept open until the end, so that every connection gets its own source port.
    let sockets: Vec<Socket> = (0..count)
        .map(|_| start_connection(SocketAddr::new(dst, port), bind))
        .collect();
    // Let the handshakes (or the refusals) finish before the sockets close.
    std::thread::sleep(Duration::from_millis(200));
    drop(sockets);
}

/// Starts a non-blocking connection and prints the source the kernel chose for it.
fn start_connection(dst: SocketAddr, bind: Option<IpAddr>) -> Socket {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("socket");
    if let Some(address) = bind {
        socket
            .bind(&SocketAddr::new(address, 0).into())
            .expect("bind");
    }
    socket.set_nonblocking(true).expect("non-blocking");
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(error) => panic!("connect: {error}"),
    }
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
        })
    );
    socket
}
