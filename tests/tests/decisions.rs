//! Deciding once: the kernel decides each connection its tables can decide, and user space
//! takes that decision (verdict and rule) as it is; only what the kernel cannot decide is
//! decided in user space. Every test's daemon runs with `SRCIP_TEST_CROSS_CHECK`, which makes
//! user space decide again what the kernel decided (tests/src/daemon.rs); here the count of
//! decisions it says at stop is checked too, so that the kernel is seen to have decided.

use srcip_tests::{
    ALLOWED_V4, ALLOWED_V6, Daemon, Line, OTHER_V4, OTHER_V6, PARTNER_V4, PARTNER_V6, PolicyFile,
    Signal, TestCgroup, Topology, attempt_connect, udp_client,
};

/// Nested prefixes, ports and port ranges, both protocols and families, unmatched
/// connections reported, and a rule too large for the kernel's tables (nine allowed
/// sources), which user space decides.
const POLICY: &str = r#"
unmatched = "alert"

[[rule]]
name = "web"
destinations = ["198.51.100.50"]
protocol = "tcp"
ports = [443, "8000-8080"]
allowed_sources = ["203.0.113.10"]

[[rule]]
name = "dns"
destinations = ["198.51.100.50"]
protocol = "udp"
ports = [53]
allowed_sources = ["203.0.113.11"]

[[rule]]
name = "partner-net"
destinations = ["198.51.100.0/24"]
allowed_sources = ["203.0.113.11"]

[[rule]]
name = "v6-web"
destinations = ["2001:db8:50::/64"]
protocol = "tcp"
allowed_sources = ["2001:db8::10"]

[[rule]]
name = "v6-mdns"
destinations = ["2001:db8:50::50"]
protocol = "udp"
ports = [5353]
allowed_sources = ["2001:db8::11", "2001:db8::21", "2001:db8::22", "2001:db8::23", "2001:db8::24", "2001:db8::25", "2001:db8::26", "2001:db8::27", "2001:db8::28"]
"#;

#[derive(Clone, Copy)]
enum Protocol {
    Tcp,
    Udp,
}

/// One connection, and the verdict and rule its line must carry.
struct Case {
    protocol: Protocol,
    src: &'static str,
    dst: &'static str,
    port: u16,
    verdict: &'static str,
    rule: Option<&'static str>,
}

#[test]
fn the_kernel_decides_once_and_user_space_agrees_where_both_can() {
    use Protocol::{Tcp, Udp};
    let case = |protocol, src, dst, port, verdict, rule| Case {
        protocol,
        src,
        dst,
        port,
        verdict,
        rule,
    };
    let cases = [
        case(Tcp, ALLOWED_V4, PARTNER_V4, 443, "compliant", Some("web")),
        case(Tcp, OTHER_V4, PARTNER_V4, 443, "violation", Some("web")),
        case(Tcp, OTHER_V4, PARTNER_V4, 8080, "violation", Some("web")),
        case(
            Tcp,
            OTHER_V4,
            PARTNER_V4,
            22,
            "compliant",
            Some("partner-net"),
        ),
        case(
            Tcp,
            ALLOWED_V4,
            PARTNER_V4,
            22,
            "violation",
            Some("partner-net"),
        ),
        case(Udp, OTHER_V4, PARTNER_V4, 53, "compliant", Some("dns")),
        case(Udp, ALLOWED_V4, PARTNER_V4, 53, "violation", Some("dns")),
        case(
            Udp,
            ALLOWED_V4,
            PARTNER_V4,
            9,
            "violation",
            Some("partner-net"),
        ),
        case(
            Tcp,
            ALLOWED_V6,
            PARTNER_V6,
            443,
            "compliant",
            Some("v6-web"),
        ),
        case(Tcp, OTHER_V6, PARTNER_V6, 443, "violation", Some("v6-web")),
        case(Udp, ALLOWED_V6, PARTNER_V6, 9, "unmatched", None),
        // Decided in user space: the rule does not fit the kernel's tables.
        case(
            Udp,
            OTHER_V6,
            PARTNER_V6,
            5353,
            "compliant",
            Some("v6-mdns"),
        ),
        case(
            Udp,
            ALLOWED_V6,
            PARTNER_V6,
            5353,
            "violation",
            Some("v6-mdns"),
        ),
    ];
    let decided_in_user_space = 2;

    let topology = Topology::new();
    let cgroup = TestCgroup::new(&[]);
    let policy = PolicyFile::new(POLICY);
    let mut daemon = Daemon::start(
        &policy.path,
        &["--all", "--cgroup", cgroup.path.to_str().unwrap()],
    );
    for case in &cases {
        assert_line(&mut daemon, &topology, &cgroup, case, "");
    }
    // The next policy lives in the other half of the kernel's tables: the rule the kernel
    // names is found there. Its rules are the same, renamed.
    let renamed = POLICY.replace("name = \"", "name = \"next-");
    std::fs::write(policy.path.with_extension("next"), &renamed).unwrap();
    std::fs::rename(policy.path.with_extension("next"), &policy.path).unwrap();
    daemon.wait_for("reloaded", |line| matches!(line, Line::Reloaded { .. }));
    for case in &cases {
        assert_line(&mut daemon, &topology, &cgroup, case, "next-");
    }

    let (status, _, stderr) = daemon.stop_with_logs(Signal::SIGTERM);
    assert!(status.success());
    let decided_in_kernel = 2 * (cases.len() - decided_in_user_space);
    let said = format!(
        "cross-check: {decided_in_kernel} decisions of the kernel decided again, 0 differed"
    );
    assert!(stderr.contains(&said), "{said:?} in {stderr}");
}

/// Makes `case`'s connection and checks its line, whose rule's name starts with `prefix`.
fn assert_line(
    daemon: &mut Daemon,
    topology: &Topology,
    cgroup: &TestCgroup,
    case: &Case,
    prefix: &str,
) {
    let src_port = match case.protocol {
        Protocol::Tcp => {
            attempt_connect(
                &topology.host,
                &cgroup.path,
                Some(case.src),
                case.dst,
                case.port,
            )
            .src_port
        }
        Protocol::Udp => {
            udp_client(
                &topology.host,
                &cgroup.path,
                &["--bind", case.src],
                case.dst,
                case.port,
            )
            .src_port
        }
    };
    let line = daemon.wait_for("the connection's line", |line| {
        line.connection()
            .is_some_and(|connection| connection.src_port == src_port)
    });
    let connection = line.connection().unwrap();
    assert_eq!(
        (
            connection.verdict.as_str(),
            connection.rule.as_deref(),
            connection.src.as_str()
        ),
        (
            case.verdict,
            case.rule.map(|rule| format!("{prefix}{rule}")).as_deref(),
            case.src
        ),
        "{} to {}:{}",
        connection.protocol,
        case.dst,
        case.port
    );
}
