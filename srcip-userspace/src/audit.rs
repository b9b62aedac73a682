//! A live audit: kernel records in, alerts out.
//!
//! kernel → ring buffer → decode → decide (here) → attribute and fold (`attribute.rs`, its
//! own thread) → alerts.
//! The kernel wakes user space at once for violations and when the ring buffer is half full;
//! other records (`--all` reporting of compliant connections) wait for the next poll, every
//! [`POLL_INTERVAL`] (see `srcip-ebpf/src/maps.rs`).

use std::{
    path::Path,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, PerCpuArray};
use srcip_common::record::Counter;
use tracing::{debug, info, warn};

use crate::{
    adopt::{self, adopt_sockets},
    alerts::{Alert, AlertBody, BlockedAt, ConnectionReport, Verdict},
    attribute::{Attributed, Attribution, ReportKind, Unattributed},
    cgroup::{AuditedCgroup, CgroupNames},
    drift::SharedPredictions,
    events::{
        ConnectEvent, Enforcement, EventRing, KernelDecision, KernelEvent, KernelVerdict, PinError,
    },
    folding::Folding,
    loader::{AuditSettings, KernelPrograms},
    metrics::{Metrics, ProtocolLabels},
    netns::NetnsInodes,
    policy::{Action, ConnectionKey, Decision, Matcher, Rule},
    policy_maps::{KernelPolicy, RoutingMaps},
    route::Program,
};

/// Longest time a record the kernel did not wake us for waits in the ring buffer.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the kernel's counters are read and audited cgroups are checked for having been
/// recreated.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// `allowed_sources` of a connection no rule matched: shared, not allocated per line.
static NO_SOURCES: LazyLock<Arc<[String]>> = LazyLock::new(|| Arc::from(Vec::new()));

pub struct AuditSession {
    programs: KernelPrograms,
    ring: EventRing,
    counters: PerCpuArray<MapData, u64>,
    audited: Vec<AuditedCgroup>,
    audited_ids: HashMap<MapData, u64, u8>,
    matcher: Matcher,
    policy: KernelPolicy,
    /// Whether the policy in force needs the sendmsg programs (they are attached).
    datagram_programs: bool,
    report_all: bool,
    /// The next stage: names what is reported, and folds repeated violations.
    attribution: Attribution,
    metrics: Arc<Metrics>,
    lost_reported: u64,
    /// Records that could not be decoded; they are reported as lost.
    undecodable: u64,
    hook_errors_reported: u64,
    pin_failures_reported: u64,
    housekeeping_at: Instant,
    /// The drift watch's latest predictions, for `reason` on violations (empty without one).
    predictions: SharedPredictions,
    /// What enforcement needs of the route module in the kernel, until the drift watch
    /// takes it to keep it current.
    routing_maps: Option<RoutingMaps>,
    /// `SRCIP_TEST_CROSS_CHECK`: decide again what the kernel decided, and count the
    /// decisions that differ (said at stop; the tests hold them at none).
    cross_check: Option<CrossCheck>,
}

#[derive(Default)]
struct CrossCheck {
    decided: u64,
    differed: u64,
}

impl AuditSession {
    /// Loads and attaches the programs. Auditing is live when this returns.
    pub fn start(
        matcher: Matcher,
        settings: AuditSettings<'_>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let tables = matcher.kernel_tables();
        let (mut programs, maps) = KernelPrograms::load_and_attach(settings, &tables)?;
        let datagram_programs = programs.needs_datagram_programs(&tables);
        programs.enforce_datagrams(datagram_programs)?;
        let mut netns = NetnsInodes::new(maps.socket_owners);
        // Predictions read srcip's own routes, so they judge only its own namespace's sockets.
        let own_netns = netns.cookie_at(Path::new("/proc/self/ns/net"));
        if own_netns.is_none() {
            warn!(
                "cannot learn srcip's network namespace cookie: block judges only sockets whose program bound a source, and pin sets no datagram's source"
            );
        }
        let routing_maps = RoutingMaps::new(
            maps.predicted_v4,
            maps.predicted_v6,
            maps.present_pin_sources,
            own_netns.unwrap_or(0),
        );
        // After the attach, so that no socket falls between the scan and `sock_create`.
        adopt_sockets(
            &mut netns,
            &adopt::Scope {
                cgroup2_mount: settings.cgroup2_mount,
                audited: settings.audited,
            },
        );
        // Parsing and compiling a large policy leaves much freed heap behind (the kernel
        // tables live in kernel maps now); give it back rather than keep it resident for
        // the daemon's life. SAFETY: glibc's malloc_trim only releases free memory.
        unsafe { libc::malloc_trim(0) };
        let ring = EventRing::new(maps.events)
            .map_err(|error| anyhow::anyhow!("cannot poll the EVENTS ring buffer: {error}"))?;
        let attribution = Attribution::start(
            CgroupNames::new(settings.cgroup2_mount.to_owned()),
            netns,
            Folding::new(maps.folds, settings.fold_window),
            ring.clock(),
        )
        .context("starting the attribution thread")?;
        Ok(Self {
            programs,
            ring,
            counters: maps.counters,
            audited: settings.audited.to_vec(),
            audited_ids: maps.audited_cgroups,
            matcher,
            policy: maps.policy,
            datagram_programs,
            report_all: settings.report_all,
            attribution,
            metrics,
            lost_reported: 0,
            undecodable: 0,
            hook_errors_reported: 0,
            pin_failures_reported: 0,
            housekeeping_at: Instant::now(),
            predictions: SharedPredictions::default(),
            routing_maps: Some(routing_maps),
            cross_check: std::env::var_os("SRCIP_TEST_CROSS_CHECK").map(|_| CrossCheck::default()),
        })
    }

    /// Where a drift watch keeps its predictions for this session's violations.
    pub fn predictions(&self) -> SharedPredictions {
        Arc::clone(&self.predictions)
    }

    /// The kernel maps of predicted sources and present pin sources, for the drift watch to
    /// keep current; `None` once taken.
    pub fn take_routing_maps(&mut self) -> Option<RoutingMaps> {
        self.routing_maps.take()
    }

    /// Waits for records or attributed connections and returns the alerts they produce
    /// (possibly none). Cancel-safe: records are only taken from the ring buffer after the
    /// last await point.
    pub async fn next_alerts(&mut self) -> Vec<Alert> {
        tokio::select! {
            () = self.ring.wakeup() => {}
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            attributed = self.attribution.next_alerts() => return self.note_violators(attributed),
        }
        self.drain()
    }

    /// The alerts attribution made; each program seen violating a rule is noted for the
    /// drift watch, now that its violation goes out first.
    fn note_violators(&self, attributed: Vec<Attributed>) -> Vec<Alert> {
        let mut predictions = self
            .predictions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        attributed
            .into_iter()
            .map(|Attributed { alert, violator }| {
                if let Some(program) = violator {
                    predictions.note_program(program);
                }
                alert
            })
            .collect()
    }

    /// Decides every record in the ring buffer now and hands what is reported to
    /// attribution; returns the alerts for lost records.
    fn drain(&mut self) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let (matcher, kernel_policy, attribution, cross_check) = (
            &self.matcher,
            &self.policy,
            &mut self.attribution,
            &mut self.cross_check,
        );
        let report_all = self.report_all;
        let undecodable = &mut self.undecodable;
        let predictions = self
            .predictions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.ring.drain(|decoded| match decoded {
            Ok(KernelEvent::Connect(event)) => {
                let decision = decide(&event, matcher, kernel_policy, cross_check);
                let (rule, verdict, violation) = rule_and_verdict(decision);
                let pinned = event.enforcement == Enforcement::Pinned && !violation;
                // Attribution costs file-system walks: only for what will be reported.
                if !violation && !pinned && !report_all {
                    return;
                }
                let program = Program {
                    uid: Some(event.uid),
                    mark: event.mark,
                };
                // The kernel's choice (not bound, not translated) has the drift watch's reason.
                let reason = (violation && event.wire_src.is_none())
                    .then(|| {
                        rule.and_then(|rule| {
                            predictions.reason_for(&rule.name, event.dst, event.src, program)
                        })
                    })
                    .flatten()
                    .cloned();
                // One line per connection: under `--all`, a violating or pinned connection
                // is written once, as its `violation` or `pinned` line.
                let kind = if violation {
                    ReportKind::Violation
                } else if pinned {
                    ReportKind::Pinned
                } else {
                    ReportKind::Connect
                };
                attribution.submit(Unattributed {
                    time: event.time,
                    kind,
                    netns_cookie: event.netns_cookie,
                    fold_window: event.fold_window,
                    violator: (violation && rule.is_some()).then_some(program),
                    report: Self::report(rule, verdict, event, reason),
                });
            }
            Err(error) => {
                warn!("a kernel record cannot be decoded, counted as lost: {error}");
                *undecodable += 1;
            }
        });
        drop(predictions);
        if self.housekeeping_at.elapsed() >= HOUSEKEEPING_INTERVAL {
            self.housekeeping_at = Instant::now();
            self.follow_recreated_cgroups();
            alerts.extend(self.read_counters());
        }
        alerts
    }

    /// A `lost` alert when records were dropped (by the kernel, or undecodable) since the
    /// last read. Brings the metrics the kernel counts up to date.
    fn read_counters(&mut self) -> Option<Alert> {
        for (protocol, observed, decided) in [
            ("tcp", Counter::ObservedTcp, Counter::DecidedInKernelTcp),
            ("udp", Counter::ObservedUdp, Counter::DecidedInKernelUdp),
        ] {
            let labels = ProtocolLabels {
                protocol: protocol.to_owned(),
            };
            Metrics::set_total(
                &self.metrics.observed.get_or_create(&labels),
                self.counter_total(observed),
            );
            Metrics::set_total(
                &self.metrics.decided_in_kernel.get_or_create(&labels),
                self.counter_total(decided),
            );
        }
        let pin_failures = self.counter_total(Counter::PinFailures);
        Metrics::set_total(&self.metrics.pin_failures, pin_failures);
        if let Some(count) = increase_since(pin_failures, &mut self.pin_failures_reported) {
            warn!(
                "{count} connections of a pin rule could not be bound to its source (not an address of their network namespace): they left with the route's source"
            );
        }
        let hook_errors = self.counter_total(Counter::HookErrors);
        Metrics::set_total(&self.metrics.hook_errors, hook_errors);
        if let Some(count) = increase_since(hook_errors, &mut self.hook_errors_reported) {
            warn!("{count} kernel hook invocations failed before recording a connection");
        }
        let lost = self.counter_total(Counter::LostRecords)
            + self.undecodable
            + self.attribution.overflowed();
        increase_since(lost, &mut self.lost_reported)
            .map(|count| Alert::now(AlertBody::Lost { count, sink: None }))
    }

    fn counter_total(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// A systemd unit's cgroup gets a new directory, and so a new id, on every restart of the
    /// unit. The kernel's cgroup_mkdir program audits the new one in `mkdir` itself; this
    /// once-a-second look is the fallback for a path too long for it to recognise.
    fn follow_recreated_cgroups(&mut self) {
        for cgroup in &mut self.audited {
            let Some(id) = cgroup.current_id().filter(|id| *id != cgroup.id) else {
                continue;
            };
            if let Err(error) = self.audited_ids.insert(id, 0, 0) {
                warn!("cannot audit the recreated cgroup {}: {error}", cgroup.path);
                continue;
            }
            // The kernel's cgroup_rmdir program has usually taken it out already.
            if let Err(error) = self.audited_ids.remove(&cgroup.id) {
                debug!(
                    "the old id of cgroup {} is not in the audited set: {error}",
                    cgroup.path
                );
            }
            info!(
                "cgroup {} was recreated; auditing its new instance",
                cgroup.path
            );
            cgroup.id = id;
        }
    }

    /// The line of a connection, but for what attribution names.
    fn report(
        rule: Option<&Rule>,
        verdict: Verdict,
        event: ConnectEvent,
        reason: Option<Arc<str>>,
    ) -> ConnectionReport {
        let blocking = rule.is_some_and(|rule| rule.action == Action::Block);
        let (refused, predicted, blocked_at) = match event.enforcement {
            Enforcement::Refused {
                predicted,
                at_egress,
            } => (
                true,
                predicted,
                Some(if at_egress {
                    BlockedAt::Egress
                } else {
                    BlockedAt::Connect
                }),
            ),
            _ => (false, false, None),
        };
        let pinning = rule.filter(|rule| rule.action == Action::Pin);
        let pin_error = match (verdict, pinning) {
            (Verdict::Violation, Some(rule)) => pin_error(rule, &event),
            _ => None,
        };
        ConnectionReport {
            blocked: (verdict == Verdict::Violation && blocking).then_some(refused),
            blocked_at,
            predicted,
            pin_error,
            rule: rule.map(|rule| Arc::clone(&rule.name)),
            action: rule.map_or("alert", |rule| rule.action.as_str()),
            protocol: event.protocol.as_str(),
            family: event.family.as_str(),
            src: event.src,
            wire_src: event.wire_src,
            src_port: event.src_port,
            dst: event.dst,
            dst_port: event.dst_port,
            allowed_sources: rule.map_or_else(
                || Arc::clone(&NO_SOURCES),
                |rule| Arc::clone(&rule.allowed_sources_text),
            ),
            pid: event.pid,
            comm: event.comm,
            uid: event.uid,
            cgroup_id: event.cgroup_id,
            netns: None,
            unit: None,
            container: None,
            cgroup: None,
            verdict,
            reason,
            folded: None,
        }
    }

    /// Detaches every program, then reads what is left in the ring buffer, lets attribution
    /// name it and close the open folding windows, so that no connection the kernel saw goes
    /// unreported. The last alert is `stopped`.
    pub fn stop(mut self) -> Vec<Alert> {
        self.programs.detach();
        let mut alerts = self.drain();
        alerts.extend(self.attribution.finish());
        if let Some(check) = &self.cross_check {
            info!(
                "cross-check: {} decisions of the kernel decided again, {} differed",
                check.decided, check.differed
            );
        }
        alerts.extend(self.read_counters());
        alerts.push(Alert::now(AlertBody::Stopped {
            decided_in_kernel: self.counter_total(Counter::DecidedInKernelTcp)
                + self.counter_total(Counter::DecidedInKernelUdp),
        }));
        alerts
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// Decides with `matcher` from the next connection on, in the kernel and here. Records
    /// the kernel made before are decided again with it when they are read. On error the
    /// current policy stays, whole, and so do the programs attached for it.
    pub fn reload(&mut self, matcher: Matcher) -> anyhow::Result<()> {
        let tables = matcher.kernel_tables();
        // The sendmsg programs are in place before a policy that needs them, and go after
        // the last one that did.
        let datagram_programs = self.programs.needs_datagram_programs(&tables);
        if datagram_programs {
            self.programs.enforce_datagrams(true)?;
        }
        if let Err(error) = self.policy.replace(&tables) {
            if let Err(detach) = self.programs.enforce_datagrams(self.datagram_programs) {
                warn!("{detach:#}");
            }
            return Err(error.into());
        }
        self.matcher = matcher;
        self.datagram_programs = datagram_programs;
        // In force now: a failure to detach programs the new policy does not need is said,
        // and they are detached at the next reload or stop.
        if !datagram_programs && let Err(error) = self.programs.enforce_datagrams(false) {
            warn!("{error:#}");
        }
        Ok(())
    }
}

/// Why a violation of the `pin` rule `rule` was not pinned, in words: what the kernel said
/// when it tried, or the translation that changed the pinned source on the way out.
fn pin_error(rule: &Rule, event: &ConnectEvent) -> Option<Arc<str>> {
    let pin_source = || {
        rule.pin_sources
            .iter()
            .map(|(source, _)| *source)
            .find(|source| source.is_ipv4() == event.dst.is_ipv4())
    };
    let text = match event.pin_error {
        Some(PinError::BoundAddress) => format!(
            "the program chose its own source, {}, and a chosen source is kept",
            event.src
        ),
        Some(PinError::BoundPort) => format!(
            "the socket was already bound to port {}: a bound socket cannot be bound again",
            event.src_port
        ),
        Some(PinError::Absent) => match pin_source() {
            Some(source) => {
                format!("{source} is not an address of this host in the socket's network namespace")
            }
            None => "the pin source is not an address of this host".to_owned(),
        },
        Some(PinError::NoSource) => {
            format!("the rule has no {} source to pin", event.family.as_str())
        }
        None => match event.wire_src {
            Some(wire) => format!(
                "address translation on this host changed the source to {wire} on the way out"
            ),
            None => return None,
        },
    };
    Some(Arc::from(text))
}

/// How `event` is decided, once: what the kernel decided under the policy in force is
/// taken as it is; only what it could not decide (or decided under the policy before a
/// reload) is decided here. The partner sees the wire source: that is the one judged.
fn decide<'a>(
    event: &ConnectEvent,
    matcher: &'a Matcher,
    kernel_policy: &KernelPolicy,
    cross_check: &mut Option<CrossCheck>,
) -> Decision<'a> {
    let judged_src = event.wire_src.unwrap_or(event.src);
    let decide_here = || {
        matcher.decide(&ConnectionKey {
            protocol: event.protocol,
            src: judged_src,
            dst: event.dst,
            dst_port: event.dst_port,
        })
    };
    let taken = event
        .kernel_decision
        .and_then(|kernel| taken_from_kernel(kernel, matcher, kernel_policy));
    match taken {
        Some(decision) => {
            if let Some(check) = cross_check {
                check.compare(decision, decide_here(), event);
            }
            decision
        }
        None => {
            debug!(
                "decided in user space ({:?}): {} {} -> {}:{}",
                event.kernel_decision,
                event.protocol.as_str(),
                judged_src,
                event.dst,
                event.dst_port
            );
            decide_here()
        }
    }
}

/// The kernel's decision as the policy in force says it, when the kernel decided under that
/// policy and named a rule it has.
fn taken_from_kernel<'a>(
    kernel: KernelDecision,
    matcher: &'a Matcher,
    policy: &KernelPolicy,
) -> Option<Decision<'a>> {
    let rule = match kernel.rule {
        Some(rule) => {
            let place = policy.rule_in_force(kernel.generation, rule)?;
            Some(matcher.policy().rules.get(place)?)
        }
        // No rule matched, under the policy in force. (A reload that lands between the
        // kernel's lookup and its record is not seen here, as it is by a rule's half of
        // `RULES`; such a record is judged as the previous policy judged it.)
        None if kernel.generation == policy.generation() => None,
        None => return None,
    };
    Some(match (kernel.verdict, rule) {
        (KernelVerdict::Compliant, Some(rule)) => Decision::Compliant(rule),
        (KernelVerdict::Violation, Some(rule)) => Decision::Violation(rule),
        (KernelVerdict::Violation, None) => Decision::UnmatchedViolation,
        (KernelVerdict::Unmatched, None) => Decision::Unmatched,
        // Not a decision the kernel makes: decided here.
        (KernelVerdict::Compliant, None) | (KernelVerdict::Unmatched, Some(_)) => return None,
    })
}

impl CrossCheck {
    fn compare(&mut self, kernel: Decision<'_>, here: Decision<'_>, event: &ConnectEvent) {
        self.decided += 1;
        let said = |decision: Decision<'_>| match decision {
            Decision::Compliant(rule) => format!("compliant with {}", rule.name),
            Decision::Violation(rule) => format!("violation of {}", rule.name),
            Decision::UnmatchedViolation => "unmatched, reported".to_owned(),
            Decision::Unmatched => "unmatched, ignored".to_owned(),
        };
        let (kernel, here) = (said(kernel), said(here));
        if kernel != here {
            self.differed += 1;
            warn!(
                "cross-check: the kernel decided {kernel}, user space {here}, for {} {} -> {}:{}",
                event.protocol.as_str(),
                event.wire_src.unwrap_or(event.src),
                event.dst,
                event.dst_port
            );
        }
    }
}

/// The rule, the verdict the connection's line carries, and whether it is reported as a
/// violation: under `unmatched = "alert"`, a connection no rule matched is a `violation`
/// line whose verdict says why, `unmatched`.
fn rule_and_verdict(decision: Decision<'_>) -> (Option<&Rule>, Verdict, bool) {
    match decision {
        Decision::Compliant(rule) => (Some(rule), Verdict::Compliant, false),
        Decision::Violation(rule) => (Some(rule), Verdict::Violation, true),
        Decision::UnmatchedViolation => (None, Verdict::Unmatched, true),
        Decision::Unmatched => (None, Verdict::Unmatched, false),
    }
}

/// How much a kernel counter grew since `reported`, which then becomes `total`; `None` when
/// it did not.
fn increase_since(total: u64, reported: &mut u64) -> Option<u64> {
    (total > *reported).then(|| total - std::mem::replace(reported, total))
}
