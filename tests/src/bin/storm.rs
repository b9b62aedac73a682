//! Benchmark load: joins a cgroup and a network namespace, then makes TCP connections as fast
//! as it can (or at a given rate) to a port where nothing listens, so that each costs the
//! connect path and nothing else: SYN out, RST back, refused. Prints one JSON line at the end:
//! `{"connects": N, "seconds": S}`.
//!
//! `storm --cgroup DIR --netns NAME [--threads N] [--seconds S] [--rate PER_SECOND]
//!        [--report-each] [--udp] DST_ADDR DST_PORT`
//!
//! `--udp` sends datagrams instead, each thread from one unconnected socket (the per-packet
//! path); `connects` then counts datagrams.
//!
//! `--report-each` prints `{"src_port": P, "unix_ns": T}` for every connection, with the time
//! `connect()` returned, for latency measurements (use it with a modest `--rate`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use socket2::{Domain, Socket, Type};

struct Options {
    threads: usize,
    seconds: f64,
    /// Connections per second over all threads; `None`: as fast as possible.
    rate: Option<f64>,
    report_each: bool,
    udp: bool,
    dst: SocketAddr,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut cgroup, mut netns) = (None, None);
    let mut options = Options {
        threads: 1,
        seconds: 3.0,
        rate: None,
        report_each: false,
        udp: false,
        dst: SocketAddr::from(([127, 0, 0, 1], 9)),
    };
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match arg.as_str() {
            "--cgroup" => cgroup = Some(value("--cgroup")),
            "--netns" => netns = Some(value("--netns")),
            "--threads" => options.threads = value("--threads").parse().expect("--threads N"),
            "--seconds" => options.seconds = value("--seconds").parse().expect("--seconds S"),
            "--rate" => options.rate = Some(value("--rate").parse().expect("--rate PER_SECOND")),
            "--report-each" => options.report_each = true,
            "--udp" => options.udp = true,
            _ => positional.push(arg),
        }
    }
    let [dst, port] = positional.as_slice() else {
        panic!(
            "usage: storm --cgroup DIR --netns NAME [--threads N] [--seconds S] [--rate PER_SECOND] [--report-each] DST_ADDR DST_PORT"
        );
    };
    let dst: IpAddr = dst.parse().expect("DST_ADDR");
    options.dst = SocketAddr::new(dst, port.parse().expect("DST_PORT"));

    srcip_tests::enter(cgroup, netns);

    let connects = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(options.seconds);
    std::thread::scope(|scope| {
        for _ in 0..options.threads {
            if options.udp {
                scope.spawn(|| datagrams(&options, deadline, &connects));
            } else {
                scope.spawn(|| storm(&options, deadline, &connects));
            }
        }
    });
    println!(
        "{}",
        serde_json::json!({
            "connects": connects.load(Ordering::Relaxed),
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
}

fn storm(options: &Options, deadline: Instant, connects: &AtomicU64) {
    // Each thread keeps its share of the rate on its own schedule.
    let interval = options
        .rate
        .map(|rate| Duration::from_secs_f64(options.threads as f64 / rate));
    let mut next = Instant::now();
    while Instant::now() < deadline {
        if let Some(interval) = interval {
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let socket =
            Socket::new(Domain::for_address(options.dst), Type::STREAM, None).expect("socket");
        if options.report_each {
            // A refused socket forgets its port: bind first, so that it can be reported.
            let any = SocketAddr::new(options.dst.ip(), 0);
            socket.bind(&any.into()).expect("bind");
        }
        // Refused at once on loopback: the SYN's RST comes back within connect().
        let _ = socket.connect(&options.dst.into());
        if options.report_each {
            let unix_ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("a clock after 1970")
                .as_nanos();
            let port = socket
                .local_addr()
                .ok()
                .and_then(|address| address.as_socket())
                .map_or(0, |address| address.port());
            println!(
                "{}",
                serde_json::json!({"src_port": port, "unix_ns": unix_ns})
            );
        }
        connects.fetch_add(1, Ordering::Relaxed);
    }
}

fn datagrams(options: &Options, deadline: Instant, sent: &AtomicU64) {
    let socket = Socket::new(Domain::for_address(options.dst), Type::DGRAM, None).expect("socket");
    let destination = options.dst.into();
    let payload = [0u8; 64];
    let mut count = 0;
    // Checking the clock every datagram would cost as much as the hooks measured.
    while count % 256 != 0 || Instant::now() < deadline {
        let _ = socket.send_to(&payload, &destination);
        count += 1;
    }
    sent.fetch_add(count, Ordering::Relaxed);
}
