//! `srcip status`: what a running `srcip run` is doing, as it answers on its socket.
//!
//! The daemon's state is kept from the alerts it delivers: the watch server notes each one
//! as it publishes it (`started`, `reloaded`, `policy_error`, `route_drift`,
//! `route_recovered`, violations that say a pin failed), and reads the running counts from
//! the metrics, which the audit and the sinks keep anyway. Answering costs the audit
//! nothing, and a status can never say something the alert stream did not.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime},
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::Serialize;

use super::SharedAlert;
use crate::{
    alerts::{AlertBody, rfc3339, text_message},
    check::DestinationCheck,
    metrics::{Metrics, ProtocolLabels, SinkLabels},
    output::Format,
};

/// A sink as the status names it, and its spool's file when it has one.
#[derive(Clone)]
pub struct SinkInfo {
    pub name: String,
    pub spool: Option<PathBuf>,
}

/// What the daemon is, noted from the alerts it delivered.
pub struct DaemonState {
    /// The `started` line, which every watcher gets first.
    started: Option<SharedAlert>,
    /// When the `started` line was noted: the uptime's origin (a monotonic clock, so that a
    /// step of the wall clock does not change it).
    started_clock: Option<Instant>,
    policy: Option<PolicyInForce>,
    /// The latest reload refused since the policy in force was applied.
    refused_reload: Option<SharedAlert>,
    /// The latest `route_drift` of each destination drifting now, in the order they began.
    drifting: Vec<Drifting>,
    failing_pins: Vec<FailingPin>,
    sinks: Vec<SinkInfo>,
    metrics: Arc<Metrics>,
}

struct PolicyInForce {
    path: String,
    rules: usize,
    /// 1 for the policy srcip started with, one more for each reload it applied.
    revision: u64,
    since: SystemTime,
}

struct Drifting {
    since: SystemTime,
    latest: SharedAlert,
}

/// A `pin` rule whose pins failed, until one of its connections is pinned again or its
/// destination's route recovers.
struct FailingPin {
    rule: Arc<str>,
    error: Arc<str>,
    count: u64,
    last: SystemTime,
}

impl DaemonState {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            started: None,
            started_clock: None,
            policy: None,
            refused_reload: None,
            drifting: Vec::new(),
            failing_pins: Vec::new(),
            sinks: Vec::new(),
            metrics,
        }
    }

    pub fn set_sinks(&mut self, sinks: Vec<SinkInfo>) {
        self.sinks = sinks;
    }

    /// Takes in what `alert` changes.
    pub fn note(&mut self, alert: &SharedAlert) {
        match &alert.body {
            AlertBody::Started { policy, rules, .. } => {
                self.started = Some(alert.clone());
                self.started_clock = Some(Instant::now());
                self.policy = Some(PolicyInForce {
                    path: policy.clone(),
                    rules: *rules,
                    revision: 1,
                    since: alert.time,
                });
            }
            AlertBody::Reloaded { policy, rules } => {
                self.refused_reload = None;
                let revision = self.policy.as_ref().map_or(1, |known| known.revision + 1);
                self.policy = Some(PolicyInForce {
                    path: policy.clone(),
                    rules: *rules,
                    revision,
                    since: alert.time,
                });
            }
            AlertBody::PolicyError { .. } => self.refused_reload = Some(alert.clone()),
            AlertBody::RouteDrift(check) => {
                match self
                    .drifting
                    .iter_mut()
                    .find(|known| same_destination(&known.latest, check))
                {
                    Some(known) => known.latest = alert.clone(),
                    None => self.drifting.push(Drifting {
                        since: alert.time,
                        latest: alert.clone(),
                    }),
                }
                self.count_drifting(&check.rule);
            }
            AlertBody::RouteRecovered(check) => {
                self.drifting
                    .retain(|known| !same_destination(&known.latest, check));
                self.failing_pins.retain(|pin| *pin.rule != *check.rule);
                self.count_drifting(&check.rule);
            }
            AlertBody::Violation(report) => {
                let count = report.folded.as_ref().map_or(1, |folded| folded.count);
                if let (Some(rule), Some(error)) = (&report.rule, &report.pin_error) {
                    match self.failing_pins.iter_mut().find(|pin| pin.rule == *rule) {
                        Some(pin) => {
                            pin.error = error.clone();
                            pin.count += count;
                            pin.last = alert.time;
                        }
                        None => self.failing_pins.push(FailingPin {
                            rule: rule.clone(),
                            error: error.clone(),
                            count,
                            last: alert.time,
                        }),
                    }
                }
            }
            AlertBody::Pinned(report) => {
                self.failing_pins
                    .retain(|pin| Some(&pin.rule) != report.rule.as_ref());
            }
            _ => {}
        }
    }

    /// Sets `rule`'s `srcip_routes_drifting`.
    fn count_drifting(&self, rule: &str) {
        let count = self
            .drifting
            .iter()
            .filter(|drift| match &drift.latest.body {
                AlertBody::RouteDrift(check) => check.rule == rule,
                _ => false,
            })
            .count();
        self.metrics.routes_drifting(rule, count);
    }

    /// What a watcher attaching now is told first: the `started` line, and the latest
    /// `route_drift` of each destination drifting now.
    pub fn watcher_lines(&self) -> Vec<SharedAlert> {
        self.started
            .iter()
            .cloned()
            .chain(self.drifting.iter().map(|drift| drift.latest.clone()))
            .collect()
    }

    /// The status in `format`, ending with a newline.
    pub fn render(&self, format: Format, host: &str) -> String {
        let report = self.report(host);
        match format {
            Format::Json => {
                let mut line = serde_json::to_string(&report)
                    .expect("a status serializes into memory: strings, numbers and addresses");
                line.push('\n');
                line
            }
            Format::Text => report.text(),
        }
    }

    fn report<'a>(&'a self, host: &'a str) -> StatusReport<'a> {
        let started = self.started.as_deref().and_then(|alert| match &alert.body {
            AlertBody::Started {
                cgroups,
                kernel,
                degraded,
                ..
            } => Some((alert.time, cgroups, kernel, degraded)),
            _ => None,
        });
        let metrics = &self.metrics;
        let alerts = metrics.alert_counts();
        let by_protocol = |family: &Family<ProtocolLabels, Counter>| ByProtocol {
            tcp: count_of(
                family,
                &ProtocolLabels {
                    protocol: "tcp".to_owned(),
                },
            ),
            udp: count_of(
                family,
                &ProtocolLabels {
                    protocol: "udp".to_owned(),
                },
            ),
        };
        StatusReport {
            kind: "status",
            time: rfc3339(SystemTime::now()),
            host,
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            starting: started.is_none(),
            started_at: started.map(|(time, ..)| rfc3339(time)),
            uptime_seconds: self
                .started_clock
                .map_or(0, |clock| clock.elapsed().as_secs()),
            policy: self.policy.as_ref().map(|policy| PolicyReport {
                path: &policy.path,
                revision: policy.revision,
                rules: policy.rules,
                since: rfc3339(policy.since),
                refused_reload: self.refused_reload.as_deref().and_then(|alert| {
                    match &alert.body {
                        AlertBody::PolicyError { errors, .. } => Some(RefusedReport {
                            at: rfc3339(alert.time),
                            errors,
                        }),
                        _ => None,
                    }
                }),
            }),
            cgroups: started.map_or(&[][..], |(_, cgroups, ..)| cgroups),
            kernel: started.map(|(_, _, kernel, _)| kernel.as_str()),
            degraded: started.map_or(&[][..], |(.., degraded)| degraded),
            drifting: self
                .drifting
                .iter()
                .filter_map(|drift| match &drift.latest.body {
                    AlertBody::RouteDrift(check) => Some(DriftReport {
                        since: rfc3339(drift.since),
                        check,
                        text: text_message(&drift.latest.body),
                    }),
                    _ => None,
                })
                .collect(),
            failing_pins: self
                .failing_pins
                .iter()
                .map(|pin| PinReport {
                    rule: &pin.rule,
                    error: &pin.error,
                    count: pin.count,
                    last: rfc3339(pin.last),
                })
                .collect(),
            sinks: self
                .sinks
                .iter()
                .map(|sink| {
                    let labels = SinkLabels {
                        sink: sink.name.clone(),
                    };
                    SinkReport {
                        name: &sink.name,
                        delivered: count_of(&metrics.sink_delivered, &labels),
                        failed: count_of(&metrics.sink_failed, &labels),
                        backlog: metrics
                            .sink_backlog
                            .get(&labels)
                            .map_or(0, |gauge| gauge.get().max(0)),
                        dead_letters: count_of(&metrics.sink_dead_letters, &labels),
                        spool: sink.spool.as_ref().map(|path| SpoolReport {
                            path: path.display().to_string(),
                            // The file's size: what the spool takes on disk, which is what
                            // `--spool-max` and a full disk are about.
                            file_bytes: std::fs::metadata(path).map_or(0, |file| file.len()),
                        }),
                    }
                })
                .collect(),
            counts: Counts {
                observed: by_protocol(&metrics.observed),
                decided_in_kernel: by_protocol(&metrics.decided_in_kernel),
                violations: alerts.violations,
                blocked: alerts.blocked,
                pin_failures: metrics.pin_failures.get(),
                lost_records: alerts.lost_records,
                reloads_applied: alerts.reloads_applied,
                reloads_refused: alerts.reloads_refused,
            },
        }
    }
}

/// The count of `labels` in `family`, 0 when it has none yet. Read with `get`, which never
/// creates a series: `get_or_create` returns a read guard, and a second call in the same
/// expression that must create takes the write lock under it, which never comes.
fn count_of<S>(family: &Family<S, Counter>, labels: &S) -> u64
where
    S: Clone + std::hash::Hash + Eq,
{
    family.get(labels).map_or(0, |counter| counter.get())
}

/// Whether the drift `known` is about the destination `check` is (its rule, destination,
/// port, protocol, and the program it was predicted for).
pub fn same_destination(known: &SharedAlert, check: &DestinationCheck) -> bool {
    let AlertBody::RouteDrift(known) = &known.body else {
        return false;
    };
    (
        &known.rule,
        &known.destination,
        known.protocol,
        known.dst_port,
        known.uid,
        known.mark,
    ) == (
        &check.rule,
        &check.destination,
        check.protocol,
        check.dst_port,
        check.uid,
        check.mark,
    )
}

/// `srcip status --format json`: one object.
#[derive(Serialize)]
struct StatusReport<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    host: &'a str,
    version: &'static str,
    pid: u32,
    /// True while the daemon starts (before its `started` line): most fields are empty.
    starting: bool,
    started_at: Option<String>,
    uptime_seconds: u64,
    policy: Option<PolicyReport<'a>>,
    cgroups: &'a [String],
    kernel: Option<&'a str>,
    degraded: &'a [String],
    drifting: Vec<DriftReport<'a>>,
    failing_pins: Vec<PinReport<'a>>,
    sinks: Vec<SinkReport<'a>>,
    counts: Counts,
}

#[derive(Serialize)]
struct PolicyReport<'a> {
    path: &'a str,
    revision: u64,
    rules: usize,
    since: String,
    refused_reload: Option<RefusedReport<'a>>,
}

#[derive(Serialize)]
struct RefusedReport<'a> {
    at: String,
    errors: &'a [String],
}

#[derive(Serialize)]
struct DriftReport<'a> {
    since: String,
    #[serde(flatten)]
    check: &'a DestinationCheck,
    #[serde(skip)]
    text: String,
}

#[derive(Serialize)]
struct PinReport<'a> {
    rule: &'a str,
    error: &'a str,
    count: u64,
    last: String,
}

#[derive(Serialize)]
struct SinkReport<'a> {
    name: &'a str,
    delivered: u64,
    failed: u64,
    backlog: i64,
    dead_letters: u64,
    spool: Option<SpoolReport>,
}

#[derive(Serialize)]
struct SpoolReport {
    path: String,
    file_bytes: u64,
}

#[derive(Serialize)]
struct Counts {
    observed: ByProtocol,
    decided_in_kernel: ByProtocol,
    violations: u64,
    blocked: u64,
    pin_failures: u64,
    lost_records: u64,
    reloads_applied: u64,
    reloads_refused: u64,
}

#[derive(Serialize)]
struct ByProtocol {
    tcp: u64,
    udp: u64,
}

impl StatusReport<'_> {
    /// `srcip status --format text`: a few readable lines, the things to act on first.
    fn text(&self) -> String {
        let mut lines = Vec::new();
        let mut head = format!("srcip {} on {}, pid {}", self.version, self.host, self.pid);
        match &self.started_at {
            Some(started) => head.push_str(&format!(
                ", up {} (since {started})",
                humantime::format_duration(std::time::Duration::from_secs(self.uptime_seconds))
            )),
            None => head.push_str(", starting"),
        }
        lines.push(head);
        if let Some(kernel) = self.kernel {
            lines.push(format!(
                "kernel: Linux {kernel}; degraded: {}",
                listed(self.degraded, "; ")
            ));
            lines.push(format!(
                "audited: {}",
                if self.cgroups.is_empty() {
                    "every process".to_owned()
                } else {
                    self.cgroups.join(", ")
                }
            ));
        }
        if let Some(policy) = &self.policy {
            lines.push(format!(
                "policy: {}, revision {}, {} rule{}, in force since {}",
                policy.path,
                policy.revision,
                policy.rules,
                if policy.rules == 1 { "" } else { "s" },
                policy.since
            ));
            if let Some(refused) = &policy.refused_reload {
                lines.push(format!(
                    "  RELOAD REFUSED at {}: {}",
                    refused.at,
                    refused.errors.join("; ")
                ));
            }
        }
        lines.push(format!("drifting now: {}", self.drifting.len()));
        for drift in &self.drifting {
            lines.push(format!("  since {}: {}", drift.since, drift.text));
        }
        lines.push(format!("failing pins: {}", self.failing_pins.len()));
        for pin in &self.failing_pins {
            lines.push(format!(
                "  rule {}: {} time{}, last at {}: {}",
                pin.rule,
                pin.count,
                if pin.count == 1 { "" } else { "s" },
                pin.last,
                pin.error
            ));
        }
        lines.push("sinks:".to_owned());
        for sink in &self.sinks {
            let mut line = format!(
                "  {}: delivered {}, failed {}, backlog {}",
                sink.name, sink.delivered, sink.failed, sink.backlog
            );
            if sink.dead_letters > 0 {
                line.push_str(&format!(", dead letters {}", sink.dead_letters));
            }
            if let Some(spool) = &sink.spool {
                line.push_str(&format!(
                    ", spool {} ({} bytes)",
                    spool.path, spool.file_bytes
                ));
            }
            lines.push(line);
        }
        let counts = &self.counts;
        lines.push(format!(
            "counts: observed {} tcp, {} udp; decided in the kernel {} tcp, {} udp; violations {}, blocked {}, pin failures {}, lost records {}; reloads applied {}, refused {}",
            counts.observed.tcp,
            counts.observed.udp,
            counts.decided_in_kernel.tcp,
            counts.decided_in_kernel.udp,
            counts.violations,
            counts.blocked,
            counts.pin_failures,
            counts.lost_records,
            counts.reloads_applied,
            counts.reloads_refused
        ));
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

fn listed(items: &[String], separator: &str) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(separator)
    }
}
