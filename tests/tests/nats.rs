//! The NATS JetStream sink against a real nats-server: every alert lands in the stream,
//! acknowledged, and a consumer started afterwards replays them all; alerts made while the
//! server is down wait in the spool.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures_util::StreamExt as _;
use srcip_tests::{
    DELIVERY_TIMEOUT, Daemon, Line, PARTNER_POLICY, PolicyFile, Signal, TestCgroup, Topology,
    free_port, make_violation,
    nats::{NatsConfig, NatsServer, nkey_user, operator_mode_user},
    webhook::TestCertificates,
};

/// Every message of `stream` on the server at `port`, read by a new consumer from the
/// start: (subject, the alert's `type`, the alert's `src_port` if any). `None` while the
/// stream does not exist.
fn replay(port: u16, stream: &str) -> Option<Vec<(String, String, Option<u64>)>> {
    replay_from(
        &format!("127.0.0.1:{port}"),
        async_nats::ConnectOptions::new(),
        stream,
    )
}

/// As [`replay`], from the server at `url`, connected with `options`.
fn replay_from(
    url: &str,
    options: async_nats::ConnectOptions,
    stream: &str,
) -> Option<Vec<(String, String, Option<u64>)>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = options.connect(url).await.unwrap();
        let jetstream = jetstream::new(client);
        let stream = jetstream.get_stream(stream).await.ok()?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        let mut replayed = Vec::new();
        while let Some(message) = messages.next().await {
            let message = message.unwrap();
            let alert: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            replayed.push((
                message.subject.to_string(),
                alert["type"].as_str().unwrap().to_owned(),
                alert["src_port"].as_u64(),
            ));
            message.ack().await.unwrap();
        }
        Some(replayed)
    })
}

fn host_token() -> String {
    nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[test]
fn the_stream_holds_every_alert_and_a_later_consumer_replays_them() {
    let server = NatsServer::start(free_port());
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let sink = format!("nats://127.0.0.1:{}/srcip.alerts?stream=SRCIP", server.port);
    let mut daemon = Daemon::start(
        &policy.path,
        &[
            "--sink",
            &sink,
            "--fold-window",
            "0",
            "--cgroup",
            cgroup.path.to_str().unwrap(),
        ],
    );
    let mut ports = Vec::new();
    for _ in 0..2 {
        let client = make_violation(&mut daemon, &topology, &cgroup.path);
        ports.push(u64::from(client.src_port));
    }
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());

    let replayed = replay(server.port, "SRCIP").expect("the sink created the stream");
    let host = host_token();
    let kinds: Vec<&str> = replayed.iter().map(|(_, kind, _)| kind.as_str()).collect();
    // Every line of stdout, in order: the two violations, and whatever `route_drift` the
    // routes of the machine's own namespace give for the partner's addresses.
    let written: Vec<&str> = lines.iter().map(Line::kind).collect();
    assert_eq!(kinds, written, "{replayed:#?}");
    let violations = kinds.iter().filter(|kind| **kind == "violation").count();
    assert_eq!(
        (kinds.first(), kinds.last(), violations),
        (Some(&"started"), Some(&"stopped"), 2)
    );
    for (subject, kind, _) in &replayed {
        assert_eq!(subject, &format!("srcip.alerts.{host}.{kind}"));
    }
    let violation_ports: Vec<u64> = replayed.iter().filter_map(|(_, _, port)| *port).collect();
    assert_eq!(violation_ports, ports);
}

#[test]
fn alerts_made_while_the_server_is_down_reach_the_stream_when_it_is_back() {
    let port = free_port();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let sink = format!("nats://127.0.0.1:{port}/srcip.alerts?stream=SRCIP");
    let mut daemon = Daemon::start(
        &policy.path,
        &["--sink", &sink, "--cgroup", cgroup.path.to_str().unwrap()],
    );
    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    std::thread::sleep(Duration::from_millis(500));
    let server = NatsServer::start(port);
    // The sink retries with backoff; wait until both spooled alerts are in the stream.
    let deadline = std::time::Instant::now() + DELIVERY_TIMEOUT;
    loop {
        if let Some(replayed) = replay(server.port, "SRCIP")
            && replayed.iter().any(|(_, kind, port)| {
                kind == "violation" && *port == Some(u64::from(client.src_port))
            })
        {
            assert_eq!(replayed[0].1, "started", "{replayed:#?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the spooled violation never arrived"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A server whose `max_payload` is smaller than an alert: the alert goes to the spool's
/// dead letters, a `dead_letter` line says so on stdout, and the sink goes on with the
/// next alerts instead of retrying that one forever.
#[test]
fn an_alert_over_the_servers_max_payload_is_dead_lettered_and_the_next_ones_arrive() {
    // `stopped` fits; a violation (some 500 bytes) does not.
    let server = NatsServer::start_with_max_payload(free_port(), 400);
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let sink = format!("nats://127.0.0.1:{}/srcip.alerts?stream=SRCIP", server.port);
    let mut daemon = Daemon::start(
        &policy.path,
        &[
            "--sink",
            &sink,
            "--fold-window",
            "0",
            "--cgroup",
            cgroup.path.to_str().unwrap(),
        ],
    );
    make_violation(&mut daemon, &topology, &cgroup.path);
    let is_dead_letter = |line: &Line| matches!(line, Line::DeadLetter { .. });
    // Other lines too large (`started` on a kernel with a long `degraded`, `route_drift`)
    // may have been dead-lettered before the violation was.
    let line = match daemon.seen.iter().find(|line| is_dead_letter(line)) {
        Some(line) => line.clone(),
        None => daemon.wait_for("a dead letter", is_dead_letter),
    };
    let Line::DeadLetter {
        sink: named, error, ..
    } = line
    else {
        unreachable!()
    };
    assert_eq!(named, sink);
    assert!(error.contains("large"), "{error}");
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success());
    assert!(
        lines
            .iter()
            .filter(|line| is_dead_letter(line))
            .all(|line| matches!(line, Line::DeadLetter { sink: named, .. } if *named == sink)),
        "{lines:#?}"
    );

    let replayed = replay(server.port, "SRCIP").expect("the sink created the stream");
    let kinds: Vec<&str> = replayed.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds.last(),
        Some(&"stopped"),
        "the sink went on: {kinds:?}"
    );
    assert!(!kinds.contains(&"violation"), "{kinds:?}");
}

/// Audits one violation with a NATS sink at `sink` and the extra `options`, stops, and
/// returns the violation's source port.
fn violation_through(sink: &str, options: &[&str]) -> u16 {
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let mut arguments = vec![
        "--sink",
        sink,
        "--fold-window",
        "0",
        "--cgroup",
        cgroup.path.to_str().unwrap(),
    ];
    arguments.extend(options);
    let mut daemon = Daemon::start(&policy.path, &arguments);
    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    let (status, lines) = daemon.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{lines:#?}");
    client.src_port
}

/// A server that speaks only TLS, in operator mode, as `nsc` sets a production one up: the
/// sink given as `tls://`, trusting `--sink-ca`, and authenticated by a `.creds` file,
/// delivers every alert; the stream, read back as that user, holds the violation.
#[test]
fn a_tls_server_in_operator_mode_takes_the_alerts_of_a_user_with_a_creds_file() {
    let certificates = TestCertificates::new();
    let (authorization, creds) = operator_mode_user();
    let server = NatsServer::start_with(
        free_port(),
        NatsConfig {
            tls: Some((certificates.certificate(), certificates.key())),
            authorization: Some(authorization),
            ..NatsConfig::default()
        },
    );
    let folder = tempfile::tempdir().unwrap();
    let creds_file = folder.path().join("srcip.creds");
    std::fs::write(&creds_file, &creds).unwrap();
    let sink = format!("tls://127.0.0.1:{}/srcip.alerts?stream=SRCIP", server.port);
    let src_port = violation_through(
        &sink,
        &[
            "--sink-ca",
            certificates.ca.to_str().unwrap(),
            "--nats-creds",
            creds_file.to_str().unwrap(),
        ],
    );

    let options = async_nats::ConnectOptions::new()
        .add_root_certificates(certificates.ca.clone())
        .credentials(&creds)
        .unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port);
    let replayed = replay_from(&url, options, "SRCIP").expect("the sink created the stream");
    assert_eq!(replayed[0].1, "started", "{replayed:#?}");
    assert!(
        replayed
            .iter()
            .any(|(_, kind, port)| kind == "violation" && *port == Some(u64::from(src_port))),
        "{replayed:#?}"
    );
}

/// A server that knows its users by nkey: a file holding the user's seed is enough, and
/// a connection without it is refused (so the alerts did not get in without it).
#[test]
fn a_server_that_knows_its_users_by_nkey_takes_the_alerts_of_a_seed_file() {
    let (authorization, seed) = nkey_user();
    let server = NatsServer::start_with(
        free_port(),
        NatsConfig {
            authorization: Some(authorization),
            ..NatsConfig::default()
        },
    );
    let folder = tempfile::tempdir().unwrap();
    let seed_file = folder.path().join("srcip.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let sink = format!("nats://127.0.0.1:{}/srcip.alerts?stream=SRCIP", server.port);
    let src_port = violation_through(&sink, &["--nats-creds", seed_file.to_str().unwrap()]);

    let url = format!("127.0.0.1:{}", server.port);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let anonymous = runtime.block_on(async_nats::ConnectOptions::new().connect(url.as_str()));
    assert!(anonymous.is_err(), "the server takes anyone");
    let replayed = replay_from(&url, async_nats::ConnectOptions::with_nkey(seed), "SRCIP")
        .expect("the sink created the stream");
    assert!(
        replayed
            .iter()
            .any(|(_, kind, port)| kind == "violation" && *port == Some(u64::from(src_port))),
        "{replayed:#?}"
    );
}
