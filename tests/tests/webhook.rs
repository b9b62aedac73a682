//! The webhook sink against a real HTTPS receiver that is down for a while, during which the
//! daemon restarts: every alert arrives at least once, none missing.

use srcip_tests::{
    Daemon, PARTNER_POLICY, PolicyFile, Signal, TestCgroup, Topology, free_port, make_violation,
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
