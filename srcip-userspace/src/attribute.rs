//! The attribution stage of a live audit: names the cgroup (path, unit, container) and the
//! network namespace of each connection to be reported, and folds repeated violations, on a
//! thread of its own.
//!
//! Naming costs file-system walks, and an unknown namespace a thread that enters it
//! (`netns.rs`): with many namespaces, that is milliseconds per connection. On the reader's
//! thread it delayed the next read of the ring buffer, reloads and the drift watch; here it
//! delays only the lines it names. Reports come in on a bounded queue; one that finds the queue
//! full is counted and reported as lost (`lost`), never dropped silently. Folding lives here
//! because a folded line repeats the first violation's report, attribution and all.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc as tokio_mpsc;
use tracing::{error, warn};

use crate::{
    alerts::{Alert, AlertBody, ConnectionReport},
    cgroup::CgroupNames,
    events::{BootClock, OpenedWindow},
    folding::Folding,
    netns::NetnsInodes,
    route::Program,
};

/// Reports waiting for attribution, at most: a few seconds of a violation storm. The queue
/// takes memory only for what waits in it.
const QUEUE_BOUND: usize = 65_536;
/// How often folding windows are looked at when no report comes.
const FOLD_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A connection to report, as the reader decided it; the stage fills in `cgroup`, `unit`,
/// `container` and `netns`.
pub struct Unattributed {
    pub time: SystemTime,
    pub kind: ReportKind,
    pub report: ConnectionReport,
    pub netns_cookie: u64,
    /// The folding window this violation opened, if any.
    pub fold_window: Option<OpenedWindow>,
    /// The program (uid and mark) of a violation of a rule, which the drift watch then
    /// predicts for; given back with the alert, so that a drift this violation reveals is
    /// never written before the violation itself.
    pub violator: Option<Program>,
}

/// An alert the stage made, and the program of the violation it reports, if any.
pub struct Attributed {
    pub alert: Alert,
    pub violator: Option<Program>,
}

/// Which line a connection is reported as.
#[derive(Clone, Copy)]
pub enum ReportKind {
    Violation,
    Pinned,
    Connect,
}

/// The reader's end of the stage.
pub struct Attribution {
    queue: Option<mpsc::Sender<Unattributed>>,
    /// Reports in the queue now: the sender counts up, the stage down.
    queued: Arc<AtomicUsize>,
    attributed: tokio_mpsc::UnboundedReceiver<Attributed>,
    thread: Option<JoinHandle<()>>,
    /// Reports that found the queue full, since start.
    overflowed: u64,
}

impl Attribution {
    /// Starts the stage's thread, which owns the caches of names and the folding windows.
    pub fn start(
        cgroup_names: CgroupNames,
        netns: NetnsInodes,
        folding: Folding,
        clock: BootClock,
    ) -> std::io::Result<Self> {
        let (queue, incoming) = mpsc::channel();
        let (attributed_sender, attributed) = tokio_mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let stage = Stage {
            cgroup_names,
            netns,
            folding,
            clock,
            queued: Arc::clone(&queued),
            attributed: attributed_sender,
        };
        let thread = std::thread::Builder::new()
            .name("srcip-attribute".to_owned())
            .spawn(move || stage.run(&incoming))?;
        Ok(Self {
            queue: Some(queue),
            queued,
            attributed,
            thread: Some(thread),
            overflowed: 0,
        })
    }

    /// Hands `connection` to the stage, or counts it when the queue is full.
    pub fn submit(&mut self, connection: Unattributed) {
        let Some(queue) = &self.queue else {
            self.overflowed += 1;
            return;
        };
        if self.queued.fetch_add(1, Ordering::AcqRel) >= QUEUE_BOUND {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.overflowed += 1;
            return;
        }
        if queue.send(connection).is_err() {
            // The stage is gone (it panicked, and said so): nothing will name this one.
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.overflowed += 1;
        }
    }

    /// Reports that found the queue full (or the stage gone) since start.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Waits for the next attributed alerts, and returns them with every other one ready.
    /// Cancel-safe.
    pub async fn next_alerts(&mut self) -> Vec<Attributed> {
        let Some(first) = self.attributed.recv().await else {
            return std::future::pending().await;
        };
        let mut alerts = vec![first];
        while let Ok(alert) = self.attributed.try_recv() {
            alerts.push(alert);
        }
        alerts
    }

    /// Lets the stage name what it was given, close every folding window (the programs are
    /// detached: nothing counts in them any more), and stop; returns every alert it made that
    /// was not taken yet.
    pub fn finish(&mut self) -> Vec<Alert> {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("the attribution stage panicked: connections it held are lost");
        }
        let mut alerts = Vec::new();
        while let Ok(attributed) = self.attributed.try_recv() {
            alerts.push(attributed.alert);
        }
        alerts
    }
}

/// The stage's own state, on its thread.
struct Stage {
    cgroup_names: CgroupNames,
    netns: NetnsInodes,
    folding: Folding,
    clock: BootClock,
    queued: Arc<AtomicUsize>,
    attributed: tokio_mpsc::UnboundedSender<Attributed>,
}

impl Stage {
    fn run(mut self, incoming: &mpsc::Receiver<Unattributed>) {
        loop {
            match incoming.recv_timeout(FOLD_CHECK_INTERVAL) {
                Ok(connection) => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    let violator = connection.violator;
                    let alert = self.attribute(connection);
                    self.send(alert, violator);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let clock = self.clock_now();
            let closed = self.folding.closed(BootClock::boot_ns_now(), clock);
            closed.into_iter().for_each(|alert| self.send(alert, None));
        }
        let clock = self.clock_now();
        let closed = self.folding.close_all(clock);
        closed.into_iter().for_each(|alert| self.send(alert, None));
    }

    fn attribute(&mut self, connection: Unattributed) -> Alert {
        let Unattributed {
            time,
            kind,
            mut report,
            netns_cookie,
            fold_window,
            violator: _,
        } = connection;
        if let Some(name) = self.cgroup_names.name_of(report.cgroup_id) {
            report.unit = name.unit;
            report.container = name.container;
            report.cgroup = Some(name.path);
        }
        report.netns = self.netns.inode_of(netns_cookie, report.pid);
        if let Some(window) = fold_window {
            self.folding.opened(window, report.clone());
        }
        let body = match kind {
            ReportKind::Violation => AlertBody::Violation(report),
            ReportKind::Pinned => AlertBody::Pinned(report),
            ReportKind::Connect => AlertBody::Connect(report),
        };
        Alert { time, body }
    }

    /// The wall clock's offset from `CLOCK_BOOTTIME`, taken again, so that a step of the
    /// wall clock shows at once in folded lines' times (as in `EventRing::drain`).
    fn clock_now(&mut self) -> BootClock {
        // Cannot fail on Linux; were it to, the previous offset serves.
        if let Ok(now) = BootClock::now() {
            self.clock = now;
        }
        self.clock
    }

    fn send(&self, alert: Alert, violator: Option<Program>) {
        // The reader's end goes only after this thread has ended (`finish`).
        if self
            .attributed
            .send(Attributed { alert, violator })
            .is_err()
        {
            warn!("an attributed alert found no reader");
        }
    }
}
