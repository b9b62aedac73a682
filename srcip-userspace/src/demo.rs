//! `srcip demo`: the seed incident, replayed in throw-away network namespaces.
//!
//! A server with two addresses (203.0.113.10, the one the partner allows, and .11) talks to
//! a partner at 198.51.100.50:443 whose firewall accepts only .10. The demo connects like an
//! unmodified program (no bind), changes one route so the kernel picks .11, shows srcip's
//! alert, shows that the popular source-keyed policy-routing fix does not help, applies
//! one that does, and removes everything it made, also on Ctrl-C or failure.

use std::{
    fs::File,
    io::{IsTerminal as _, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use srcip_common::record::EVENTS_RING_BYTES;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    alerts::{Alert, AlertBody, Verdict, text_line},
    audit::AuditSession,
    loader::AuditSettings,
    policy::{self, Matcher},
    run::prepare_host,
    system,
};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const PARTNER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 50)), 443);

const POLICY: &str = r#"# The partner's firewall accepts only 203.0.113.10.
[[rule]]
name = "payment-gateway"
destinations = ["198.51.100.50"]
ports = [443]
protocol = "tcp"
allowed_sources = ["203.0.113.10"]
"#;

/// How long the demo waits for srcip to report a connection.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn demo() -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        result = scenario() => result,
        // Dropping `scenario` detached the programs and deleted the namespaces.
        _ = sigint.recv() => Err(anyhow!("interrupted; everything the demo created has been removed")),
        _ = sigterm.recv() => Err(anyhow!("terminated; everything the demo created has been removed")),
    }
}

/// On a terminal, a short pause between steps lets a person read along.
async fn pause() {
    if std::io::stdout().is_terminal() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

async fn scenario() -> anyhow::Result<()> {
    system::require_privileges()?;
    let mount = prepare_host()?.cgroup2_mount;
    println!(
        "srcip demo: the 2 a.m. multi-IP incident, replayed in throw-away network namespaces\n"
    );

    let scene = Scene::build()?;
    let partner = Partner::start(&scene.partner)?;
    println!("\nPolicy:\n{POLICY}");
    let matcher = Matcher::new(policy::parse(Path::new("demo-policy.toml"), POLICY)?)?;
    let mut session = AuditSession::start(
        matcher,
        AuditSettings {
            cgroup2_mount: &mount,
            audited: &[],
            report_all: true,
            ring_buffer_bytes: EVENTS_RING_BYTES,
            // The demo's "payments app" is a thread of this process.
            audit_self: true,
            // Every connection of the demo is shown.
            fold_window: std::time::Duration::ZERO,
            fold_entries: 1,
            kept_links: None,
        },
        // Nobody scrapes them here.
        Default::default(),
    )?;
    println!("srcip is auditing every TCP connection on this machine.\n");

    println!("1. The payments app connects to the partner, as it does every day:");
    connect_and_expect(&mut session, &scene, Verdict::Compliant).await?;

    pause().await;
    println!("\n2. A network restart brings back an old route that prefers the secondary address:");
    scene.ip(
        &scene.host,
        "route replace 198.51.100.50/32 via 203.0.113.1 src 203.0.113.11",
    )?;
    connect_and_expect(&mut session, &scene, Verdict::Violation).await?;

    pause().await;
    println!(
        "\n3. The usual policy-routing fix is keyed on the source. It does not help: a program that\n   never binds gets its source from a lookup without one, which a `from` rule never matches:"
    );
    scene.ip(&scene.host, "rule add from 203.0.113.10 table 100")?;
    scene.ip(&scene.host, "route add default via 203.0.113.1 table 100")?;
    connect_and_expect(&mut session, &scene, Verdict::Violation).await?;

    pause().await;
    println!("\n4. Policy routing keyed on the destination, with the allowed source, does:");
    scene.ip(&scene.host, "rule del from 203.0.113.10 table 100")?;
    scene.ip(&scene.host, "rule add to 198.51.100.50 table 100")?;
    scene.ip(
        &scene.host,
        "route replace default via 203.0.113.1 src 203.0.113.10 table 100",
    )?;
    connect_and_expect(&mut session, &scene, Verdict::Compliant).await?;

    for alert in session.stop() {
        print_partner_alert(&alert);
    }
    partner.stop();
    drop(scene);
    println!("\nDone: programs detached, namespaces removed.");
    Ok(())
}

/// Connects from the host namespace and waits for srcip's report of that connection, which
/// must have `verdict`. Prints both sides: what the partner did and what srcip saw.
async fn connect_and_expect(
    session: &mut AuditSession,
    scene: &Scene,
    verdict: Verdict,
) -> anyhow::Result<()> {
    let outcome = connect_from(&scene.host)?;
    match &outcome.reply {
        Some(reply) => println!(
            "   payments app: from {} → partner answered {reply:?}",
            outcome.local
        ),
        None => println!(
            "   payments app: from {} → the partner's firewall closed the connection",
            outcome.local
        ),
    }
    let deadline = Instant::now() + REPORT_TIMEOUT;
    while Instant::now() < deadline {
        for alert in session.next_alerts().await {
            let report = match &alert.body {
                AlertBody::Connect(report) | AlertBody::Violation(report) => report,
                _ => continue,
            };
            if report.src_port != outcome.local.port() || report.dst != PARTNER.ip() {
                continue;
            }
            // Each connection has one line: its `violation`, or else its `connect` line.
            print_partner_alert(&alert);
            if report.verdict != verdict {
                bail!(
                    "srcip reported {:?}, the demo expected {verdict:?}",
                    report.verdict
                );
            }
            return Ok(());
        }
    }
    bail!(
        "srcip did not report the connection from {} within {REPORT_TIMEOUT:?}",
        outcome.local
    )
}

/// Prints srcip's alerts about the partner; the rest of the machine's traffic is not part
/// of the story.
fn print_partner_alert(alert: &Alert) {
    match &alert.body {
        AlertBody::Connect(report) | AlertBody::Violation(report) if report.dst == PARTNER.ip() => {
            println!("   srcip: {}", text_line(alert));
        }
        AlertBody::Lost { .. } => println!("   srcip: {}", text_line(alert)),
        _ => {}
    }
}

struct ConnectOutcome {
    local: SocketAddr,
    reply: Option<String>,
}

/// Connects to the partner like an unmodified program (no bind), from a thread that enters
/// the host namespace and ends there.
fn connect_from(namespace: &str) -> anyhow::Result<ConnectOutcome> {
    let namespace = File::open(format!("/run/netns/{namespace}"))
        .with_context(|| format!("opening network namespace {namespace}"))?;
    std::thread::Builder::new()
        .name("payments-app".to_owned())
        .spawn(move || -> anyhow::Result<ConnectOutcome> {
            setns(&namespace, CloneFlags::CLONE_NEWNET).context("entering the host namespace")?;
            let mut stream = TcpStream::connect_timeout(&PARTNER, Duration::from_secs(2))
                .context("connecting to the partner")?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let local = stream.local_addr()?;
            let mut reply = String::new();
            let read = stream.read_to_string(&mut reply).unwrap_or(0);
            Ok(ConnectOutcome {
                local,
                reply: (read > 0).then(|| reply.trim().to_owned()),
            })
        })?
        .join()
        .map_err(|_| anyhow!("the client thread panicked"))?
}

/// The two namespaces, deleted on drop.
struct Scene {
    host: String,
    partner: String,
}

impl Scene {
    fn build() -> anyhow::Result<Self> {
        let base = format!("srcip-demo-{}", std::process::id());
        let scene = Self {
            host: format!("{base}-host"),
            partner: format!("{base}-partner"),
        };
        run_ip(&format!("netns add {}", scene.host))?;
        run_ip(&format!("netns add {}", scene.partner))?;
        let (host, partner) = (&scene.host, &scene.partner);
        for (namespace, args) in [
            (
                host,
                format!("link add v0 type veth peer name v1 netns {partner}"),
            ),
            (host, "addr add 203.0.113.10/24 dev v0".to_owned()),
            (host, "addr add 203.0.113.11/24 dev v0".to_owned()),
            (host, "link set v0 up".to_owned()),
            (host, "link set lo up".to_owned()),
            (host, "route add default via 203.0.113.1".to_owned()),
            (partner, "addr add 203.0.113.1/24 dev v1".to_owned()),
            (partner, "addr add 198.51.100.50/32 dev lo".to_owned()),
            (partner, "link set v1 up".to_owned()),
            (partner, "link set lo up".to_owned()),
        ] {
            scene.ip(namespace, &args)?;
        }
        Ok(scene)
    }

    fn ip(&self, namespace: &str, args: &str) -> anyhow::Result<()> {
        run_ip(&format!("-n {namespace} {args}"))
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for namespace in [&self.host, &self.partner] {
            if let Err(error) = run_ip(&format!("netns delete {namespace}")) {
                eprintln!("srcip demo: {error:#}");
            }
        }
    }
}

fn run_ip(args: &str) -> anyhow::Result<()> {
    println!("   $ ip {args}");
    let output = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .context("running ip (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {args} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The partner's service and firewall: answers connections from 203.0.113.10, closes the
/// others. Runs on a thread inside the partner namespace until stopped.
struct Partner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Partner {
    fn start(namespace: &str) -> anyhow::Result<Self> {
        let namespace = File::open(format!("/run/netns/{namespace}"))
            .with_context(|| format!("opening network namespace {namespace}"))?;
        let listener = std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<TcpListener> {
                    setns(&namespace, CloneFlags::CLONE_NEWNET)?;
                    // A socket keeps the namespace it was created in, whatever thread uses it.
                    Ok(TcpListener::bind(PARTNER)?)
                })
                .join()
                .map_err(|_| anyhow!("the partner thread panicked"))?
        })
        .context("starting the partner's service")?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) if peer.ip() == ALLOWED => {
                        let _ = stream.write_all(b"200 payment accepted\n");
                    }
                    Ok((stream, peer)) => {
                        debug_assert_eq!(peer.ip(), OTHER);
                        drop(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        self.shut_down();
    }
}
