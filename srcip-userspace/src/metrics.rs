//! `--metrics ADDR`: Prometheus (OpenMetrics) text at `http://ADDR/metrics`.
//!
//! The audit and the delivery stage update the metrics as they go (the kernel's counters
//! once a second, with the rest of the audit's housekeeping); a scrape only encodes them, so
//! it never waits on the kernel or a sink.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::{
    alerts::{Alert, AlertBody},
    policy::{Action, Policy, Unmatched},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    /// Empty for a violation no rule matched (`unmatched = "alert"`). Shared with the rule,
    /// as `action` is static: counting an alert allocates nothing.
    rule: Option<Arc<str>>,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// `ok` or `error`.
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

/// Totals over every rule, as [`Metrics::alert_counts`] reads them.
pub struct AlertCounts {
    pub violations: u64,
    pub blocked: u64,
    pub lost_records: u64,
    pub reloads_applied: u64,
    pub reloads_refused: u64,
}

/// Every metric srcip serves. Counters named `x` are served as `x_total`.
pub struct Metrics {
    registry: Registry,
    /// Connections (TCP) and flows (UDP) the kernel saw, by protocol.
    pub observed: Family<ProtocolLabels, Counter>,
    /// Of those, the ones the kernel found compliant (or unmatched and ignored) itself.
    pub decided_in_kernel: Family<ProtocolLabels, Counter>,
    violations: Family<RuleLabels, Counter>,
    /// Violations the kernel refused (`block`), and connections it pinned (`pin`), by rule.
    blocked: Family<RuleLabels, Counter>,
    pinned: Family<RuleLabels, Counter>,
    /// `pin` binds the kernel refused (the pin source is not on the host any more).
    pub pin_failures: Counter,
    /// Records lost between the kernel and srcip.
    lost_records: Counter,
    pub hook_errors: Counter,
    /// Per sink: alerts written, alerts lost (not taken, or not written), and waiting now.
    pub sink_delivered: Family<SinkLabels, Counter>,
    pub sink_failed: Family<SinkLabels, Counter>,
    /// Alerts a network sink put in its spool before sending.
    pub sink_spooled: Family<SinkLabels, Counter>,
    pub sink_backlog: Family<SinkLabels, Gauge>,
    /// Alerts a network sink's receiver refused for good, kept in its spool's dead letters.
    pub sink_dead_letters: Family<SinkLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    /// All rules' violations and blocked connections together, for `srcip status`: summing
    /// the families' series would take every series' lock.
    violations_all: Counter,
    blocked_all: Counter,
    /// Destinations whose predicted source their rule does not allow now, by rule.
    routes_drifting: Family<DriftLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("srcip"),
            observed: Family::default(),
            decided_in_kernel: Family::default(),
            violations: Family::default(),
            blocked: Family::default(),
            pinned: Family::default(),
            pin_failures: Counter::default(),
            lost_records: Counter::default(),
            hook_errors: Counter::default(),
            sink_delivered: Family::default(),
            sink_failed: Family::default(),
            sink_spooled: Family::default(),
            sink_backlog: Family::default(),
            sink_dead_letters: Family::default(),
            reloads: Family::default(),
            violations_all: Counter::default(),
            blocked_all: Counter::default(),
            routes_drifting: Family::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "connections_observed",
            "Outbound connections (TCP) and flows (UDP) srcip saw, by protocol",
            metrics.observed.clone(),
        );
        registry.register(
            "connections_decided_in_kernel",
            "Connections the kernel found compliant, or unmatched and ignored, without waking srcip",
            metrics.decided_in_kernel.clone(),
        );
        registry.register(
            "violations",
            "Connections from a source their rule does not allow, by rule and action (rule empty: no rule matched)",
            metrics.violations.clone(),
        );
        registry.register(
            "blocked",
            "Violations the kernel refused at connect (action block), by rule",
            metrics.blocked.clone(),
        );
        registry.register(
            "pinned",
            "Connections the kernel bound to their rule's source (action pin), by rule",
            metrics.pinned.clone(),
        );
        registry.register(
            "pin_failures",
            "Pins the kernel could not bind (the source is not an address of the socket's network namespace): those connections left with the route's source",
            metrics.pin_failures.clone(),
        );
        registry.register(
            "lost_records",
            "Records lost between the kernel and srcip",
            metrics.lost_records.clone(),
        );
        registry.register(
            "kernel_hook_errors",
            "Kernel hook runs that failed before recording a connection",
            metrics.hook_errors.clone(),
        );
        registry.register(
            "sink_delivered",
            "Alerts a sink wrote or sent",
            metrics.sink_delivered.clone(),
        );
        registry.register(
            "sink_failed",
            "Alerts a sink lost: its queue was full, or writing or sending failed for good",
            metrics.sink_failed.clone(),
        );
        registry.register(
            "sink_spooled",
            "Alerts a network sink put in its spool before sending",
            metrics.sink_spooled.clone(),
        );
        registry.register(
            "sink_backlog",
            "Alerts waiting in a sink's queue or spool",
            metrics.sink_backlog.clone(),
        );
        registry.register(
            "sink_dead_letters",
            "Alerts a network sink's receiver refused for good (an HTTP 4xx, too large), kept in the sink's spool",
            metrics.sink_dead_letters.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy reloads (and new addresses of its host names), by result (ok, or error: the previous policy stayed)",
            metrics.reloads.clone(),
        );
        registry.register(
            "routes_drifting",
            "Destinations for which the kernel would now choose a source their rule does not allow, by rule",
            metrics.routes_drifting.clone(),
        );
        registry.register(
            "build",
            "The srcip serving these metrics",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Every series that can be known at start is there from the start, at 0, so that
        // `rate()` and `increase()` see its first event.
        for result in ["ok", "error"] {
            create(
                &metrics.reloads,
                &ReloadLabels {
                    result: result.to_owned(),
                },
            );
        }
        for protocol in ["tcp", "udp"] {
            let labels = ProtocolLabels {
                protocol: protocol.to_owned(),
            };
            create(&metrics.observed, &labels);
            create(&metrics.decided_in_kernel, &labels);
        }
        metrics
    }

    /// Makes the series of `policy`'s rules (at 0 when new): violations of each rule, blocked
    /// for `block` rules, pinned for `pin` rules, drifting routes of each. Series of rules a
    /// reload removed stay, with their last values: counters never go back.
    pub fn policy_in_force(&self, policy: &Policy) {
        for rule in &policy.rules {
            let labels = RuleLabels {
                rule: Some(rule.name.clone()),
                action: rule.action.as_str(),
            };
            create(&self.violations, &labels);
            match rule.action {
                Action::Block => create(&self.blocked, &labels),
                Action::Pin => create(&self.pinned, &labels),
                Action::Alert => {}
            }
            create(
                &self.routes_drifting,
                &DriftLabels {
                    rule: rule.name.to_string(),
                },
            );
        }
        if policy.unmatched == Unmatched::Alert {
            create(
                &self.violations,
                &RuleLabels {
                    rule: None,
                    action: Action::Alert.as_str(),
                },
            );
        }
    }

    /// `count` destinations of `rule` drift now.
    pub fn routes_drifting(&self, rule: &str, count: usize) {
        self.routes_drifting
            .get_or_create(&DriftLabels {
                rule: rule.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts what `alert` stands for: violations (a folded line for its `count`), blocked
    /// and pinned connections, records lost before any sink, and policies put in force or
    /// refused (a reload, or new addresses of its host names).
    pub fn observe(&self, alert: &Alert) {
        let reload = |result: &str| {
            self.reloads
                .get_or_create(&ReloadLabels {
                    result: result.to_owned(),
                })
                .inc();
        };
        match &alert.body {
            AlertBody::Violation(report) => {
                let labels = RuleLabels {
                    rule: report.rule.clone(),
                    action: report.action,
                };
                let count = report.folded.as_ref().map_or(1, |folded| folded.count);
                if report.blocked == Some(true) {
                    self.blocked.get_or_create(&labels).inc_by(count);
                    self.blocked_all.inc_by(count);
                }
                self.violations.get_or_create(&labels).inc_by(count);
                self.violations_all.inc_by(count);
            }
            AlertBody::Pinned(report) => {
                let labels = RuleLabels {
                    rule: report.rule.clone(),
                    action: report.action,
                };
                self.pinned.get_or_create(&labels).inc();
            }
            AlertBody::Lost { count, sink: None } => {
                self.lost_records.inc_by(*count);
            }
            AlertBody::Reloaded { .. } => reload("ok"),
            AlertBody::PolicyError { .. } => reload("error"),
            _ => {}
        }
    }

    /// The alerts' counts `srcip status` gives.
    pub fn alert_counts(&self) -> AlertCounts {
        let reloads = |result: &str| {
            self.reloads
                .get(&ReloadLabels {
                    result: result.to_owned(),
                })
                .map_or(0, |counter| counter.get())
        };
        AlertCounts {
            violations: self.violations_all.get(),
            blocked: self.blocked_all.get(),
            lost_records: self.lost_records.get(),
            reloads_applied: reloads("ok"),
            reloads_refused: reloads("error"),
        }
    }

    /// Sets a counter the kernel keeps (a running total) to its current value.
    pub fn set_total(counter: &Counter, total: u64) {
        counter
            .inner()
            .store(total, std::sync::atomic::Ordering::Relaxed);
    }

    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Creates `labels`' series in `family`, at 0 when it is new.
fn create<S: Clone + std::hash::Hash + Eq, M: Default>(family: &Family<S, M>, labels: &S) {
    drop(family.get_or_create(labels));
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Connections served at once, at most: a Prometheus server needs one. Beyond it a new
/// connection is closed at once, so that idle connections cannot take the daemon's file
/// descriptors, which attribution (opening cgroups by id) needs too.
const MAX_CONNECTIONS: usize = 16;
/// How long a connection is served: a scrape takes milliseconds, and one that sends nothing
/// (or keeps its connection for the next scrape) gives its place up.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// After a failed accept (out of file descriptors), before the next: not a busy loop.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `metrics` on `address` until the runtime stops. Binds now, so that a busy or
/// unusable address stops `srcip run` at start with a message.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot serve metrics on {address} (--metrics)"))?;
    info!("Prometheus metrics at http://{address}/metrics");
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!("accepting a metrics connection failed: {error}");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
                debug!("{MAX_CONNECTIONS} metrics connections are open: closing a new one");
                continue;
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&metrics, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // A connection that outlived its time is simply closed.
                if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await
                {
                    warn!("serving metrics failed: {error}");
                }
                drop(place);
            });
        }
    });
    Ok(())
}

fn respond(metrics: &Metrics, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "srcip serves /metrics only\n".into(),
        );
    }
    match metrics.encode() {
        Ok(text) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "encoding the metrics failed\n".into(),
        ),
    }
}
