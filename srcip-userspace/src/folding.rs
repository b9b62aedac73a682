//! User space's half of folding repeated violations (`srcip_common::fold`): remember each
//! window the kernel opened, and when it has closed, read its repeats, write them as one
//! `violation` with `count`, and delete the entry so that the next violation opens a new
//! window.

use std::{collections::VecDeque, time::Duration};

use aya::maps::{HashMap, MapData};
use srcip_common::fold::{FoldKey, FoldState};
use tracing::warn;

use crate::{
    alerts::{Alert, AlertBody, ConnectionReport, Folded, rfc3339},
    events::{BootClock, OpenedWindow},
};

/// Read a window this long after it closed: every repeat the kernel counted in it has
/// finished by then (a program adds within microseconds of checking the window).
const GRACE: Duration = Duration::from_millis(200);

pub struct Folding {
    folds: HashMap<MapData, FoldKey, FoldState>,
    window: Duration,
    /// Oldest first. Every window lasts as long, so this is also the order in which they
    /// close (records from different CPUs may arrive microseconds out of order, which only
    /// delays such a window to the next read).
    open: VecDeque<OpenWindow>,
}

struct OpenWindow {
    closes_ns: u64,
    key: FoldKey,
    /// The first violation's report, which the folded line repeats.
    report: ConnectionReport,
}

impl Folding {
    pub fn new(folds: HashMap<MapData, FoldKey, FoldState>, window: Duration) -> Self {
        Self {
            folds,
            window,
            open: VecDeque::new(),
        }
    }

    pub fn opened(&mut self, window: OpenedWindow, report: ConnectionReport) {
        let length = u64::try_from((self.window + GRACE).as_nanos()).unwrap_or(u64::MAX);
        self.open.push_back(OpenWindow {
            closes_ns: window.opened_ns.saturating_add(length),
            key: window.key,
            report,
        });
    }

    /// The folded lines of every window that has closed by `now_ns` (`CLOCK_BOOTTIME`). Called
    /// on every read of the ring buffer, so it looks only at the windows that are due.
    pub fn closed(&mut self, now_ns: u64, clock: BootClock) -> Vec<Alert> {
        let mut alerts = Vec::new();
        while let Some(window) = self.open.pop_front_if(|window| window.closes_ns <= now_ns) {
            alerts.extend(self.flush(window, clock));
        }
        alerts
    }

    /// Every window, closed or not: for shutdown, once the programs are detached and can no
    /// longer count.
    pub fn close_all(&mut self, clock: BootClock) -> Vec<Alert> {
        self.closed(u64::MAX, clock)
    }

    fn flush(&mut self, window: OpenWindow, clock: BootClock) -> Option<Alert> {
        let state = match self.folds.get(&window.key, 0) {
            Ok(state) => state,
            Err(error) => {
                warn!("a folding window has vanished from the kernel: {error}");
                return None;
            }
        };
        if let Err(error) = self.folds.remove(&window.key) {
            warn!("cannot close a folding window: {error}");
        }
        (state.repeats > 0).then(|| {
            let mut report = window.report;
            report.folded = Some(Folded {
                count: state.repeats,
                first_time: rfc3339(clock.wall_time(state.first_repeat_ns)),
                last_time: rfc3339(clock.wall_time(state.last_repeat_ns)),
            });
            Alert::now(AlertBody::Violation(report))
        })
    }
}
