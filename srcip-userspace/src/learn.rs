//! `srcip policy learn`: watch outbound connections for a while and write the policy that
//! allows exactly what was seen, so that an operator starts from the host's real traffic
//! instead of a blank file.
//!
//! Rules: for each destination address, the sources seen per protocol and port. Where every
//! (protocol, port) of a destination came from the same sources, one rule lists those ports;
//! otherwise each differing (protocol, port) gets its own rule. Destinations whose rules would
//! be identical (same name, protocol, ports and sources) share one rule. A rule is named
//! after the systemd unit that made the connections, or else the process name.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::{
    alerts::{AlertBody, ConnectionReport},
    audit::AuditSession,
    cgroup::{self, AuditedCgroup},
    loader::AuditSettings,
    netns,
    output::counted,
    policy::{self, Matcher, Policy, Unmatched},
    run::prepare_host,
    system,
};

pub struct LearnConfig {
    /// Zero: until SIGINT or SIGTERM.
    pub duration: Duration,
    pub cgroups: Vec<String>,
    /// `None`: stdout.
    pub output: Option<PathBuf>,
    /// `--netns NAME|PATH`: only this network namespace's connections.
    pub netns: Option<String>,
}

/// Says on stderr that, run in a network namespace of its own without `--netns`, learning
/// still sees every namespace's connections (the kernel's programs see the whole host).
fn warn_when_in_another_namespace() {
    use std::os::unix::fs::MetadataExt as _;
    let inode = |path: &str| std::fs::metadata(path).map(|metadata| metadata.ino()).ok();
    if let (Some(own), Some(host)) = (inode("/proc/self/ns/net"), inode("/proc/1/ns/net"))
        && own != host
    {
        eprintln!(
            "srcip: note: this network namespace is not the host's, but learning sees every namespace's connections; add --netns /proc/self/ns/net to learn only this one's"
        );
    }
}

/// How often progress is written to stderr.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// The folder of `output` takes a file now, not only after the whole `--duration`: a file
/// made there and removed at once says so.
fn require_writable_folder(output: &Path) -> anyhow::Result<()> {
    let folder = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let probe = folder.join(format!(".srcip-learn-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "cannot write the learnt policy to {}: make its folder {} (and let srcip write there) before learning",
                output.display(),
                folder.display()
            )
        })
}

pub async fn learn(config: LearnConfig) -> anyhow::Result<()> {
    if let Some(output) = &config.output {
        require_writable_folder(output)?;
    }
    let only_netns = config
        .netns
        .as_deref()
        .map(netns::inode_of_given)
        .transpose()?;
    if only_netns.is_none() {
        warn_when_in_another_namespace();
    }
    system::require_privileges()?;
    let host = prepare_host()?;
    let audited = config
        .cgroups
        .iter()
        .map(|given| cgroup::resolve_audited(&host.cgroup2_mount, given))
        .collect::<Result<Vec<AuditedCgroup>, _>>()?;
    // No rules: every connection is unmatched, and `report_all` sends each one here.
    let empty = Policy {
        path: PathBuf::from("(learning)"),
        unmatched: Unmatched::Ignore,
        rules: Vec::new(),
    };
    let mut session = AuditSession::start(
        Matcher::new(empty)?,
        AuditSettings {
            cgroup2_mount: &host.cgroup2_mount,
            audited: &audited,
            ring_buffer_bytes: srcip_common::record::EVENTS_RING_BYTES,
            report_all: true,
            audit_self: false,
            fold_window: Duration::ZERO,
            fold_entries: 1,
            kept_links: None,
        },
        // Nobody scrapes them here.
        Default::default(),
    )?;
    let until = if config.duration.is_zero() {
        "until Ctrl-C".to_owned()
    } else {
        format!("for {}", humantime::format_duration(config.duration))
    };
    let scope = match &config.netns {
        Some(netns) => format!(" of network namespace {netns}"),
        None => String::new(),
    };
    eprintln!("srcip: learning outbound connections{scope} {until}");

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let started = Instant::now();
    let deadline = (!config.duration.is_zero()).then(|| started + config.duration);
    let mut seen = Seen {
        only_netns,
        ..Seen::default()
    };
    let mut progress_at = started;
    loop {
        let remaining = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            break;
        }
        let alerts = tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: writing what was learnt"); break }
            _ = sigterm.recv() => { info!("SIGTERM: writing what was learnt"); break }
            () = tokio::time::sleep(remaining.unwrap_or(Duration::MAX)) => break,
            alerts = session.next_alerts() => alerts,
        };
        seen.add(alerts.iter().map(|alert| &alert.body));
        if progress_at.elapsed() >= PROGRESS_INTERVAL {
            progress_at = Instant::now();
            eprintln!(
                "srcip: {} s: {} connections seen to {} destinations",
                started.elapsed().as_secs(),
                seen.connections,
                seen.destinations()
            );
        }
    }
    let last = session.stop();
    seen.add(last.iter().map(|alert| &alert.body));
    let text = seen.policy_text();
    // What is written must be usable as written.
    let path = config
        .output
        .as_deref()
        .unwrap_or(Path::new("(learnt policy)"));
    policy::parse(path, &text).context("the learnt policy does not validate (a bug in srcip)")?;
    match &config.output {
        Some(path) => std::fs::write(path, &text)
            .with_context(|| format!("writing the policy to {}", path.display()))?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    eprintln!(
        "srcip: learnt {} to {}: {}{}",
        counted(seen.connections as usize, "connection", "connections"),
        counted(seen.destinations(), "destination", "destinations"),
        counted(seen.rules().len(), "rule", "rules"),
        config
            .output
            .as_ref()
            .map_or_else(String::new, |path| format!(
                ", written to {}",
                path.display()
            ))
    );
    Ok(())
}

/// Sources seen, by destination, protocol and port, with who made the connections.
#[derive(Default)]
struct Seen {
    /// With `--netns`: the namespace's inode; connections of others are not learnt.
    only_netns: Option<u64>,
    connections: u64,
    /// destination → (protocol, port) → sources.
    flows: BTreeMap<IpAddr, BTreeMap<(&'static str, u16), BTreeSet<IpAddr>>>,
    /// (destination, protocol, port) → the unit (or process) that made its first connection.
    makers: BTreeMap<(IpAddr, &'static str, u16), String>,
}

/// One rule of the learnt policy.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct LearntRule {
    maker: String,
    protocol: &'static str,
    ports: BTreeSet<u16>,
    sources: BTreeSet<IpAddr>,
}

impl Seen {
    fn add<'a>(&mut self, alerts: impl Iterator<Item = &'a AlertBody>) {
        for alert in alerts {
            if let AlertBody::Connect(report) = alert {
                // A connection whose namespace srcip could not name is not known to be of
                // the one asked for.
                if self
                    .only_netns
                    .is_none_or(|inode| report.netns == Some(inode))
                {
                    self.record(report);
                }
            }
        }
    }

    fn record(&mut self, report: &ConnectionReport) {
        self.connections += 1;
        self.flows
            .entry(report.dst)
            .or_default()
            .entry((report.protocol, report.dst_port))
            .or_default()
            // The policy judges what the partner sees.
            .insert(report.wire_src.unwrap_or(report.src));
        self.makers
            .entry((report.dst, report.protocol, report.dst_port))
            .or_insert_with(|| {
                report
                    .unit
                    .as_deref()
                    .map_or_else(|| report.comm.to_string(), str::to_owned)
            });
    }

    fn destinations(&self) -> usize {
        self.flows.len()
    }

    /// Rules with their destinations, in a stable order.
    fn rules(&self) -> BTreeMap<LearntRule, BTreeSet<IpAddr>> {
        let mut rules: BTreeMap<LearntRule, BTreeSet<IpAddr>> = BTreeMap::new();
        for (destination, flows) in &self.flows {
            let maker = |(protocol, port): &(&'static str, u16)| {
                self.makers
                    .get(&(*destination, *protocol, *port))
                    .cloned()
                    .unwrap_or_default()
            };
            let source_sets: BTreeSet<&BTreeSet<IpAddr>> = flows.values().collect();
            let protocols: BTreeSet<&str> = flows.keys().map(|(protocol, _)| *protocol).collect();
            if source_sets.len() == 1 && protocols.len() == 1 {
                // One rule for every port of this destination.
                let first = flows.keys().next().expect("a destination has a flow");
                rules
                    .entry(LearntRule {
                        maker: maker(first),
                        protocol: first.0,
                        ports: flows.keys().map(|(_, port)| *port).collect(),
                        sources: flows.values().next().expect("one source set").clone(),
                    })
                    .or_default()
                    .insert(*destination);
            } else {
                for (flow, sources) in flows {
                    rules
                        .entry(LearntRule {
                            maker: maker(flow),
                            protocol: flow.0,
                            ports: BTreeSet::from([flow.1]),
                            sources: sources.clone(),
                        })
                        .or_default()
                        .insert(*destination);
                }
            }
        }
        rules
    }

    fn policy_text(&self) -> String {
        let mut text = String::from(
            "# Written by `srcip policy learn`: the sources each destination was reached from.\n\
             # Review it before enforcing it: it allows what happened, not what should.\n\
             unmatched = \"ignore\"\n",
        );
        let mut used: BTreeMap<String, usize> = BTreeMap::new();
        for (rule, destinations) in self.rules() {
            // Unique names: the unit or process, numbered from its second rule on.
            let base = toml_safe_name(&rule.maker);
            let index = used.entry(base.clone()).or_insert(0);
            *index += 1;
            let name = if *index == 1 {
                base
            } else {
                format!("{base}-{index}")
            };
            let list = |items: Vec<String>| items.join(", ");
            let _ = write!(
                text,
                "\n[[rule]]\nname = \"{name}\"\ndestinations = [{}]\nports = [{}]\nprotocol = \"{}\"\nallowed_sources = [{}]\n",
                list(destinations.iter().map(|d| format!("\"{d}\"")).collect()),
                list(rule.ports.iter().map(u16::to_string).collect()),
                rule.protocol,
                list(rule.sources.iter().map(|s| format!("\"{s}\"")).collect()),
            );
        }
        text
    }
}

/// A name safe inside a TOML basic string and readable in alerts.
fn toml_safe_name(maker: &str) -> String {
    let name: String = maker
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "learnt".to_owned()
    } else {
        name
    }
}
