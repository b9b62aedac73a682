//! Route drift: `route_drift` when the kernel would now choose a disallowed source for a
//! destination of the policy, `route_recovered` when it is allowed again, with no traffic
//! needed.
//!
//! A task of its own subscribes to rtnetlink's address, route and rule notifications for
//! IPv4 and IPv6. Any notification (or a lost one: the socket's buffer overran) makes it
//! predict every destination again, as `srcip check` does, a short moment later so that a
//! burst of changes (an interface coming up with its addresses and routes) is one
//! evaluation. It predicts once at start too, before the daemon writes `started`, so a
//! destination that is already wrong is reported then, and `block` and `pin` are in force.
//! Predictions are per destination, per program routed apart (uid and mark, see
//! [`Predictions::note_program`]) and per routing change, never per connection.
//! Those of blocking rules' destinations also go to the kernel, where `block` judges a
//! socket that bound no source by them (`srcip-ebpf/src/connect.rs`). Alerts go to the
//! daemon's loop through a channel; a reloaded policy comes back through another, and is
//! evaluated at once.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;
use ipnet::IpNet;
use rtnetlink::{MulticastGroup, sys::AsyncSocket as _};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, warn};

use crate::{
    alerts::{Alert, AlertBody},
    check::{SharedDestinations, check_destination},
    policy::{Action, Destination, Policy},
    policy_maps::RoutingMaps,
    route::{Program, Router},
};

/// Without notifications (the subscription failed), how often routes are read instead.
const POLL_WITHOUT_NOTIFICATIONS: Duration = Duration::from_secs(1);
/// Socket buffer for notifications: a full table flap fits without an overrun.
const NOTIFICATION_BUFFER_BYTES: usize = 4 << 20;

/// How many programs (uid and mark) seen violating are predicted for besides srcip itself.
const MAX_PROGRAMS: usize = 16;

/// The latest prediction of each destination of the policy. The audit session reads it to
/// give a violation whose source is the predicted one the same `reason`.
#[derive(Debug, Default)]
pub struct Predictions {
    by_rule: HashMap<Arc<str>, Vec<PredictedDestination>>,
    /// Programs (uid and mark) seen violating a rule. Policy routing may route them apart
    /// from srcip (`ip rule ... uidrange`, `fwmark`), so while the host has such rules,
    /// destinations are predicted for each of them too.
    programs: BTreeSet<Program>,
    /// Woken when `programs` grew: the drift task predicts again, if the host has such
    /// rules. A `Notify` keeps the wake-up of a program noted while a reading runs, so none
    /// is missed.
    programs_grew: Arc<Notify>,
}

#[derive(Debug)]
struct PredictedDestination {
    destination: IpNet,
    /// [`Program::default`]: predicted as srcip itself.
    program: Program,
    src: Option<IpAddr>,
    /// Shared with every violation that carries it.
    reason: Arc<str>,
}

/// Written by the drift task, read by the audit session; both on the daemon's one thread,
/// never held across an await.
pub type SharedPredictions = Arc<Mutex<Predictions>>;

impl Predictions {
    /// Why the kernel chose `src` for `dst` under `rule` for `program`'s connection, when
    /// `src` is the source predicted for the most specific of the rule's destinations that
    /// holds `dst`: the connection then left with the kernel's choice. `None` otherwise (the
    /// program bound another source). The prediction for `program` is used when there is
    /// one (the host routes by uid or mark), srcip's own otherwise.
    pub fn reason_for(
        &self,
        rule: &str,
        dst: IpAddr,
        src: IpAddr,
        program: Program,
    ) -> Option<&Arc<str>> {
        let predicted = self.by_rule.get(rule)?;
        let made_for = |wanted: Program| {
            predicted
                .iter()
                .filter(|predicted| {
                    predicted.program == wanted && predicted.destination.contains(&dst)
                })
                .max_by_key(|predicted| predicted.destination.prefix_len())
        };
        made_for(program)
            .or_else(|| made_for(Program::default()))
            .filter(|predicted| predicted.src == Some(src))
            .map(|predicted| &predicted.reason)
    }

    /// `program` violated a rule: predict for it from now on (up to [`MAX_PROGRAMS`]), so
    /// that its next violations have their own `reason`. srcip itself is always predicted.
    pub fn note_program(&mut self, program: Program) {
        if program.is_srcip()
            || self.programs.len() >= MAX_PROGRAMS
            || !self.programs.insert(program)
        {
            return;
        }
        self.programs_grew.notify_one();
    }
}

/// The daemon's side of the drift task.
pub struct DriftWatch {
    alerts: mpsc::UnboundedReceiver<Vec<Alert>>,
    policy: watch::Sender<Arc<Policy>>,
}

impl DriftWatch {
    /// Reads the routes once and starts the task on the current tokio runtime with the
    /// policy in force; it keeps `predictions`, and the kernel's `routing_maps` for `block`
    /// and `pin`, current. Returns the first reading's alerts: the daemon says it started
    /// only once `block` judges by predictions and `pin` knows which sources the host has.
    /// `settle`: how long after a notification the routes are read again, so that a burst
    /// of changes (an interface coming up with its addresses and routes) is one reading.
    pub async fn start(
        router: Router,
        policy: Arc<Policy>,
        predictions: SharedPredictions,
        routing_maps: Option<RoutingMaps>,
        settle: Duration,
    ) -> (Self, Vec<Alert>) {
        let (alerts_tx, alerts) = mpsc::unbounded_channel();
        let mut readings = Readings {
            router,
            compliant: HashMap::new(),
            shared: Shared {
                predictions,
                routing_maps,
            },
        };
        // Subscribed first, so that a change made during the first reading is read again.
        let notifications = subscribe();
        let first = readings.read(&policy, false).await;
        let (policy_tx, policy_rx) = watch::channel(policy);
        tokio::spawn(watch_routes(
            readings,
            notifications,
            policy_rx,
            alerts_tx,
            settle,
        ));
        let watch = Self {
            alerts,
            policy: policy_tx,
        };
        (watch, first)
    }

    /// The next drift alerts. Cancel-safe.
    pub async fn next_alerts(&mut self) -> Vec<Alert> {
        match self.alerts.recv().await {
            Some(alerts) => alerts,
            // The task ended (it only does when the daemon stops): nothing more to say.
            None => std::future::pending().await,
        }
    }

    /// A reload: predict the new policy's destinations.
    pub fn policy_changed(&self, policy: Arc<Policy>) {
        self.policy.send_replace(policy);
    }
}

/// A destination of a rule, for srcip or a program; drift is tracked per key.
type Key = (Arc<str>, IpNet, Program);

/// Where the task's predictions go besides its alerts.
struct Shared {
    /// For `reason` on violations.
    predictions: SharedPredictions,
    /// For `block` and `pin`, in the kernel.
    routing_maps: Option<RoutingMaps>,
}

/// What each reading needs, and what it leaves for the next.
struct Readings {
    router: Router,
    /// Each destination's verdict at the last reading: a change is an alert.
    compliant: HashMap<Key, bool>,
    shared: Shared,
}

impl Readings {
    /// Predicts every destination of `policy` (see [`evaluate`]); a reading that fails is
    /// logged and leaves the previous state.
    async fn read(&mut self, policy: &Policy, for_programs_only: bool) -> Vec<Alert> {
        let reading = evaluate(
            &self.router,
            policy,
            &mut self.compliant,
            &mut self.shared,
            for_programs_only,
        );
        reading.await.unwrap_or_else(|error| {
            warn!("cannot predict the policy's sources: {error:#}");
            Vec::new()
        })
    }
}

/// After the first reading: reads again at each change of routes, addresses, rules or
/// policy, and at each program newly seen violating.
async fn watch_routes(
    mut readings: Readings,
    mut notifications: Option<Notifications>,
    mut policy: watch::Receiver<Arc<Policy>>,
    alerts: mpsc::UnboundedSender<Vec<Alert>>,
    settle: Duration,
) {
    let programs_grew = Arc::clone(&lock(&readings.shared.predictions).programs_grew);
    loop {
        // Whether this reading is only for a newly noted program: it is worth making only
        // while the host routes by uid or mark.
        let for_programs_only = tokio::select! {
            changed = policy.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            () = programs_grew.notified() => true,
            () = next_notification(&mut notifications) => {
                // Let the rest of a burst arrive, then read everything once.
                tokio::time::sleep(settle).await;
                if let Some(events) = &mut notifications {
                    while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, events.next()).await {}
                }
                false
            }
        };
        let current = Arc::clone(&policy.borrow_and_update());
        let found = readings.read(&current, for_programs_only).await;
        if !found.is_empty() && alerts.send(found).is_err() {
            return;
        }
    }
}

type Notifications = futures_util::stream::BoxStream<'static, ()>;

/// Route, address and rule notifications of both families, each one a `()`: a lost
/// notification (the kernel's overrun message) too, since every one leads to a full read.
fn subscribe() -> Option<Notifications> {
    let groups = [
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
    ];
    let (mut connection, _handle, messages) = match rtnetlink::new_multicast_connection(&groups) {
        Ok(subscription) => subscription,
        Err(error) => {
            warn!(
                "cannot subscribe to route changes ({error}); reading routes every {} s instead",
                POLL_WITHOUT_NOTIFICATIONS.as_secs()
            );
            return None;
        }
    };
    if let Err(error) = connection
        .socket_mut()
        .socket_mut()
        .set_rx_buf_sz(NOTIFICATION_BUFFER_BYTES)
    {
        debug!("cannot enlarge the route notification buffer: {error}");
    }
    tokio::spawn(connection);
    Some(messages.map(|_| ()).boxed())
}

/// The next notification; a subscription that ended (or never began) is tried again, and
/// meanwhile routes are read once a second, so there is never a gap without a reading.
async fn next_notification(notifications: &mut Option<Notifications>) {
    if let Some(events) = notifications {
        if events.next().await.is_some() {
            return;
        }
        warn!("the route notification socket closed; subscribing again");
    }
    tokio::time::sleep(POLL_WITHOUT_NOTIFICATIONS).await;
    *notifications = subscribe();
}

/// Predicts every destination of `policy`; a drift alert for each that became disallowed
/// (or is at the first reading), a recovery for each that became allowed again. With
/// `for_programs_only`, nothing when the host routes every program as srcip.
async fn evaluate(
    router: &Router,
    policy: &Policy,
    compliant: &mut HashMap<Key, bool>,
    shared: &mut Shared,
    for_programs_only: bool,
) -> anyhow::Result<Vec<Alert>> {
    let host = router.host().await?;
    let mut alerts = Vec::new();
    let mut by_rule: HashMap<Arc<str>, Vec<PredictedDestination>> = HashMap::new();
    // srcip's own lookup; and, while the host routes by uid or mark, each violating
    // program's.
    let mut programs = vec![Program::default()];
    let routes_by_program = host
        .rules
        .iter()
        .any(|rule| rule.uid_range.is_some() || rule.fwmark.is_some());
    if routes_by_program {
        programs.extend(lock(&shared.predictions).programs.iter().copied());
    } else if for_programs_only {
        return Ok(Vec::new());
    }
    // Rebuilt each time, so that destinations a reload removed are forgotten.
    let mut now = HashMap::new();
    let mut blocking = Vec::new();
    let shared_destinations = SharedDestinations::of(policy);
    for (place, rule) in policy.rules.iter().enumerate() {
        for (destination, _) in &rule.destinations {
            let Destination::Prefix(prefix) = destination else {
                continue;
            };
            for program in &programs {
                let check = check_destination(
                    router,
                    &host,
                    (policy, &shared_destinations),
                    place,
                    *prefix,
                    *program,
                )
                .await?;
                let key = (rule.name.clone(), *prefix, *program);
                let allowed = check.compliant;
                // The kernel's map has one prediction per destination: srcip's, and only
                // one that holds for the whole destination; the others are judged on the
                // packet at egress.
                if let (Action::Block, Some(src), true, true) = (
                    rule.action,
                    check.predicted_src,
                    *program == Program::default(),
                    check.exact,
                ) {
                    blocking.push((*prefix, src));
                }
                by_rule
                    .entry(rule.name.clone())
                    .or_default()
                    .push(PredictedDestination {
                        destination: *prefix,
                        program: *program,
                        src: check.predicted_src,
                        reason: Arc::from(check.route_reason.as_str()),
                    });
                match (compliant.get(&key).copied(), allowed) {
                    (None | Some(true), false) => {
                        alerts.push(Alert::now(AlertBody::RouteDrift(check)));
                    }
                    (Some(false), true) => {
                        alerts.push(Alert::now(AlertBody::RouteRecovered(check)));
                    }
                    _ => {}
                }
                now.insert(key, allowed);
            }
        }
    }
    *compliant = now;
    if let Some(maps) = &mut shared.routing_maps {
        // What cannot be written leaves the previous state: `block` then judges by the
        // previous prediction, and the packet at egress still reports what it leaves with.
        if let Err(error) = maps.replace_predictions(&blocking) {
            warn!("cannot update the predicted sources block judges by: {error:#}");
        }
        let present: Vec<IpAddr> = policy
            .rules
            .iter()
            .flat_map(|rule| &rule.pin_sources)
            .map(|(source, _)| *source)
            .filter(|source| host.owns(*source))
            .collect();
        if let Err(error) = maps.replace_present_pin_sources(&present) {
            warn!("cannot update the pin sources the host has: {error:#}");
        }
    }
    lock(&shared.predictions).by_rule = by_rule;
    Ok(alerts)
}

fn lock(predictions: &SharedPredictions) -> std::sync::MutexGuard<'_, Predictions> {
    predictions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
