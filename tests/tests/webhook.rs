//! The webhook sink against a real HTTPS receiver that is down for a while, during which the
//! daemon restarts: every alert arrives at least once, none missing.

use srcip_tests::{
    Daemon, OTHER_V4, PARTNER_POLICY, PARTNER_V4, PolicyFile, Signal, TestCgroup, Topology, client,
    free_port, make_violation,
    webhook::{TestCertificates, WebhookReceiver},
};

#[test]
fn a_receiver_down_across_a_daemon_restart_gets_every_alert() {
    let port = free_port();
    let certificates = TestCertificates::new();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let spool = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{port}/alerts");
    let args = [
        "--sink",
        &url,
        "--sink-ca",
        certificates.ca.to_str().unwrap(),
        "--spool",
        spool.path().to_str().unwrap(),
        "--cgroup",
        cgroup.path.to_str().unwrap(),
    ];
    let mut violations = Vec::new();
    let mut daemon = Daemon::start(&policy.path, &args);
    for round in 0..2 {
        let client = make_violation(&mut daemon, &topology, &cgroup.path);
        violations.push(u64::from(client.src_port));
        if round == 0 {
            // The receiver is still down: the daemon restarts during the outage.
            let (status, _) = daemon.stop_with(Signal::SIGTERM);
            assert!(status.success());
            daemon = Daemon::start(&policy.path, &args);
        }
    }

    let receiver = WebhookReceiver::start(port, &certificates);
    let alerts_of = |posts: &[serde_json::Value]| -> Vec<serde_json::Value> {
        posts
            .iter()
            .flat_map(|post| post["alerts"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let posts = receiver.wait_for(|posts| {
        let alerts = alerts_of(posts);
        violations.iter().all(|port| {
            alerts
                .iter()
                .any(|alert| alert["type"] == "violation" && alert["src_port"] == *port)
        })
    });
    for post in &posts {
        assert_eq!(post["content_type"], "application/json");
    }
    let alerts = alerts_of(&posts);
    let count = |kind: &str| alerts.iter().filter(|alert| alert["type"] == kind).count();
    assert_eq!(count("started"), 2, "{alerts:#?}");
    assert_eq!(count("stopped"), 1, "the first daemon's: {alerts:#?}");
    assert_eq!(alerts[0]["type"], "started", "oldest first: {alerts:#?}");
}

/// A webhook URL with a token in its path and query (as webhook services give them): the
/// token goes in the request and nowhere else. Not in `/metrics`, the logs, the lines, or
/// the spool's file name; the sink is named by scheme, host and port, and a digest.
#[test]
fn a_webhook_token_shows_nowhere_but_in_the_request() {
    use std::io::{Read as _, Write as _};

    let port = free_port();
    let metrics_port = free_port();
    let certificates = TestCertificates::new();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let spool = tempfile::tempdir().unwrap();
    let url = format!(
        "https://srcip:s3cret-password@127.0.0.1:{port}/hooks/T0KEN-IN-PATH?key=T0KEN-IN-QUERY"
    );
    let metrics = format!("127.0.0.1:{metrics_port}");
    let args = [
        "--sink",
        &url,
        "--sink-ca",
        certificates.ca.to_str().unwrap(),
        "--spool",
        spool.path().to_str().unwrap(),
        "--metrics",
        &metrics,
        "--cgroup",
        cgroup.path.to_str().unwrap(),
    ];
    let secrets = ["s3cret-password", "T0KEN-IN-PATH", "T0KEN-IN-QUERY"];
    let mut daemon = Daemon::start(&policy.path, &args);
    // The receiver is down: the violation waits in the spool, and the sink logs its failures.
    let client = make_violation(&mut daemon, &topology, &cgroup.path);
    std::thread::sleep(std::time::Duration::from_secs(2));

    let mut scrape = String::new();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: srcip\r\n\r\n")
        .unwrap();
    stream.read_to_string(&mut scrape).unwrap();
    let name = format!("https://127.0.0.1:{port}#");
    assert!(
        scrape.contains(&format!("sink=\"{name}")),
        "the sink is named by scheme, host and port: {scrape}"
    );
    let spool_files: Vec<String> = std::fs::read_dir(spool.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let logs = daemon.stderr();
    let lines = format!("{:?}", daemon.seen);
    for secret in secrets {
        assert!(!scrape.contains(secret), "{secret} in /metrics: {scrape}");
        assert!(!logs.contains(secret), "{secret} in the logs: {logs}");
        assert!(!lines.contains(secret), "{secret} in the lines: {lines}");
        assert!(
            spool_files.iter().all(|file| !file.contains(secret)),
            "{secret} in the spool's files: {spool_files:?}"
        );
    }

    // The request itself has the whole URL: the receiver takes the violation.
    let receiver = WebhookReceiver::start(port, &certificates);
    receiver.wait_for(|posts| {
        posts.iter().any(|post| {
            post["alerts"].as_array().is_some_and(|alerts| {
                alerts.iter().any(|alert| {
                    alert["type"] == "violation" && alert["src_port"] == u64::from(client.src_port)
                })
            })
        })
    });
}

/// A receiver that refuses an alert for good (HTTP 400): that alert goes to the spool's
/// dead letters and a `dead_letter` line says so on every other sink, never to the refusing
/// one; the sink goes on with the next alerts instead of retrying forever.
#[test]
fn an_alert_the_receiver_refuses_is_dead_lettered_and_the_next_ones_arrive() {
    let port = free_port();
    let certificates = TestCertificates::new();
    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(PARTNER_POLICY);
    let spool = tempfile::tempdir().unwrap();
    let receiver = WebhookReceiver::start_refusing(port, &certificates, "poison-pill");
    let url = format!("https://127.0.0.1:{port}/alerts");
    let args = [
        "--sink",
        &url,
        "--sink-ca",
        certificates.ca.to_str().unwrap(),
        "--spool",
        spool.path().to_str().unwrap(),
        "--cgroup",
        cgroup.path.to_str().unwrap(),
        // Each violation its own line: folded, the next one would wait in the first's window.
        "--fold-window",
        "0",
    ];
    let mut daemon = Daemon::start(&policy.path, &args);
    let poison = client(
        &topology.host,
        &cgroup.path,
        &["--bind", OTHER_V4, "--comm", "poison-pill"],
        PARTNER_V4,
        443,
    );
    let (sink, count, error) = daemon.wait_for_dead_letter();
    assert!(
        sink.starts_with(&format!("https://127.0.0.1:{port}#")),
        "{sink}"
    );
    assert_eq!(count, 1);
    assert!(
        error.contains("400") && error.contains("rejected"),
        "{error}"
    );

    let next = make_violation(&mut daemon, &topology, &cgroup.path);
    let posts = receiver.wait_for(|posts| {
        posts.iter().any(|post| {
            post["alerts"].as_array().is_some_and(|alerts| {
                alerts.iter().any(|alert| {
                    alert["type"] == "violation" && alert["src_port"] == u64::from(next.src_port)
                })
            })
        })
    });
    let received: Vec<&serde_json::Value> = posts
        .iter()
        .flat_map(|post| post["alerts"].as_array().unwrap())
        .collect();
    assert!(
        received.iter().all(|alert| alert["type"] != "dead_letter"
            && alert["src_port"] != u64::from(poison[0].src_port)),
        "{received:#?}"
    );
    assert!(
        received.iter().any(|alert| alert["type"] == "started"),
        "the alerts batched with the refused one went on: {received:#?}"
    );
}
