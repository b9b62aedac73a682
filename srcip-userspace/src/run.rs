//! `srcip run`: audit until SIGINT or SIGTERM.

use std::{io, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;

use crate::{
    alerts::{Alert, AlertBody},
    audit::AuditSession,
    cgroup::{self, AuditedCgroup},
    delivery::{
        Delivery, DeliveryEvent, NatsCredentials, SinkAccess, SinkSpec, SpoolSettings, WatchServer,
    },
    drift::DriftWatch,
    features,
    loader::{AuditSettings, KeptLinks},
    metrics::{self, Metrics},
    output::Format,
    policy::HostNames,
    reload::{LoadedPolicy, PolicyWatch, load_policy, re_resolve, reload},
    route::Router,
    system, systemd,
};

pub struct RunConfig {
    pub policy: PathBuf,
    /// `--cgroup` arguments as given; empty: audit every process.
    pub cgroups: Vec<String>,
    pub format: Format,
    /// No alerts on stdout (`--quiet`).
    pub quiet: bool,
    pub sinks: Vec<SinkSpec>,
    /// The unix socket `srcip watch` reads.
    pub socket: PathBuf,
    /// Where network sinks keep what their receiver has not taken.
    pub spool: SpoolSettings,
    /// CA certificates (PEM) webhook and `tls://` NATS sinks trust instead of the system's.
    pub sink_ca: Option<PathBuf>,
    /// The NATS credentials file (`--nats-creds`).
    pub nats_creds: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`--metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    pub report_all: bool,
    pub ring_buffer_bytes: u32,
    pub fold_window: std::time::Duration,
    pub fold_entries: u32,
    /// How long after a routing change the drift watch reads the routes again.
    pub route_settle: std::time::Duration,
    /// Leave the enforcing programs attached when srcip stops (`--keep-enforcing`).
    pub keep_enforcing: bool,
    /// Where kept links are pinned, and looked for at start.
    pub kept_links: PathBuf,
    /// Name servers for the policy's host names (`--resolv-conf`); the system's when `None`.
    pub resolv_conf: Option<PathBuf>,
    /// How long a host name's address stays in force after the last answer that held it.
    pub keep_resolved: std::time::Duration,
}

/// What `srcip policy validate` checks beyond the file: each check `run` makes of the policy
/// before it touches the kernel (host names resolve, with `resolv_conf`'s name servers when
/// given; pin sources are addresses of this host; the rules compile).
pub async fn check_policy_on_host(
    path: &std::path::Path,
    resolv_conf: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let names = HostNames::new(resolv_conf, std::time::Duration::ZERO)?;
    let router = Router::new()?;
    load_policy(path, &names, &router).await.map(drop)
}

/// The host as auditing finds it.
pub struct Host {
    pub cgroup2_mount: PathBuf,
    /// The kernel release.
    pub kernel: String,
    /// What srcip cannot report here, and why.
    pub degraded: Vec<String>,
}

/// What `run` and `demo` need of the host besides privileges (checked first, by each): BTF,
/// every kernel feature srcip's programs use, cgroup v2, and the kernel file systems.
pub fn prepare_host() -> anyhow::Result<Host> {
    let kernel = system::kernel_release()?;
    system::require_btf()?;
    features::check(&kernel)?;
    let cgroup2_mount = system::cgroup2_mount()?;
    system::ensure_kernel_file_systems()?;
    let mut degraded = system::degraded_by_privileges()?;
    if features::has_mptcp() && !features::finds_mptcp_sockets() {
        degraded.push(features::WITHOUT_MPTCP_SOCKETS.to_owned());
    }
    Ok(Host {
        cgroup2_mount,
        kernel,
        degraded,
    })
}

/// Resolves when the policy should be read again: on SIGHUP, or when the file changed (never
/// without a watch); says which.
async fn reload_requested(
    sighup: &mut tokio::signal::unix::Signal,
    watch: &mut Option<PolicyWatch>,
) -> &'static str {
    let changed = async {
        match watch {
            Some(watch) => watch.changed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = sighup.recv() => "SIGHUP",
        () = changed => "the policy file changed",
    }
}

/// Resolves when the first answer for a host name of the policy has expired; never without
/// host names.
async fn expired(names: &HostNames) {
    match names.next_expiry() {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// SIGINT and SIGTERM, either of which stops the daemon.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Returns when a stop signal comes, and says which.
    async fn next(&mut self) {
        let why = tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        };
        info!("{why}: stopping");
    }
}

/// Awaits `work` (name lookups, which may take seconds when a name server is down) while
/// connections are still read and delivered, so that the kernel's ring buffer does not fill.
/// `None`: a stop signal came first, and `work` was abandoned, so that stopping never waits
/// for a name server.
async fn auditing_meanwhile<T>(
    work: impl Future<Output = T>,
    session: &mut AuditSession,
    delivery: &mut Delivery,
    stop: &mut StopSignals,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            () = stop.next() => return None,
            alerts = session.next_alerts() => delivery.deliver(alerts),
        }
    }
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    // Signals before any slow step: a SIGHUP (`systemctl reload`) or SIGTERM that comes while
    // srcip starts must not kill it (their default action), but wait for the start to end.
    let mut stop = StopSignals::install()?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Privileges first: without them nothing else matters, and the policy may be root-only.
    system::require_privileges()?;
    let mut names = HostNames::new(config.resolv_conf.as_deref(), config.keep_resolved)?;
    let router = Router::new()?;
    let LoadedPolicy { matcher, answers } = load_policy(&config.policy, &names, &router).await?;
    names.adopt(answers);
    let host = prepare_host()?;
    let mount = host.cgroup2_mount;
    let audited = config
        .cgroups
        .iter()
        .map(|given| cgroup::resolve_audited(&mount, given))
        .collect::<Result<Vec<AuditedCgroup>, _>>()?;

    let mut policy_watch = PolicyWatch::new(&config.policy);
    let metrics = Arc::new(Metrics::new());
    if let Some(address) = config.metrics {
        metrics::serve(address, Arc::clone(&metrics)).await?;
    }
    let access = SinkAccess {
        ca: config.sink_ca.clone(),
        nats_credentials: config
            .nats_creds
            .as_deref()
            .map(NatsCredentials::load)
            .transpose()?,
    };
    let watch = WatchServer::bind(&config.socket, Arc::clone(&metrics))?;
    let mut delivery = Delivery::start(
        config.format,
        config.quiet,
        &config.sinks,
        &config.spool,
        &access,
        Some(watch),
        Arc::clone(&metrics),
    )?;

    let mut session = AuditSession::start(
        matcher,
        AuditSettings {
            cgroup2_mount: &mount,
            audited: &audited,
            report_all: config.report_all,
            ring_buffer_bytes: config.ring_buffer_bytes,
            audit_self: false,
            fold_window: config.fold_window,
            fold_entries: config.fold_entries,
            kept_links: Some(KeptLinks {
                dir: &config.kept_links,
                keep: config.keep_enforcing,
            }),
        },
        Arc::clone(&metrics),
    )?;
    metrics.policy_in_force(session.matcher().policy());
    let (mut drift, first_drift) = DriftWatch::start(
        router.clone(),
        session.matcher().shared_policy(),
        session.predictions(),
        session.take_routing_maps(),
        config.route_settle,
    )
    .await;
    let started = AlertBody::Started {
        version: env!("CARGO_PKG_VERSION"),
        policy: config.policy.display().to_string(),
        rules: session.matcher().policy().rules.len(),
        cgroups: audited.iter().map(|cgroup| cgroup.path.clone()).collect(),
        kernel: host.kernel,
        degraded: host.degraded,
    };
    delivery.deliver(vec![Alert::now(started)]);
    delivery.deliver(first_drift);
    systemd::ready();
    let stdout_error = loop {
        let alerts = tokio::select! {
            () = stop.next() => break None,
            event = delivery.next_event() => match event {
                DeliveryEvent::StdoutFailed(error) => break Some(error),
                DeliveryEvent::DeadLetter(line) => {
                    delivery.deliver_dead_letter(*line);
                    Vec::new()
                }
            },
            why = reload_requested(&mut sighup, &mut policy_watch) => {
                info!("{why}: reloading {}", config.policy.display());
                systemd::reloading();
                let Some(loaded) = auditing_meanwhile(
                    load_policy(&config.policy, &names, &router), &mut session, &mut delivery, &mut stop,
                ).await else { break None };
                let outcome = reload(&mut session, &config.policy, loaded, &mut names, &metrics, &drift);
                systemd::reloaded();
                vec![outcome]
            }
            () = expired(&names) => {
                let Some(refreshed) = auditing_meanwhile(names.refresh(), &mut session, &mut delivery, &mut stop).await
                    else { break None };
                re_resolve(&mut session, &mut names, refreshed, &drift)
            }
            alerts = session.next_alerts() => alerts,
            alerts = drift.next_alerts() => alerts,
        };
        delivery.deliver(alerts);
    };
    systemd::stopping();
    delivery.deliver(session.stop());
    delivery.stop().await;
    match stdout_error {
        None => Ok(()),
        // Whoever read the alerts is gone: an error, so that a service manager restarts
        // srcip (`Restart=on-failure`) instead of taking it for a clean stop.
        Some(error) if error.kind() == io::ErrorKind::BrokenPipe => {
            anyhow::bail!(
                "stdout was closed (its reader stopped): alerts could not be written there"
            )
        }
        Some(error) => Err(anyhow::Error::new(error).context("writing alerts to stdout")),
    }
}
