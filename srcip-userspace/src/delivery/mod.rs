//! Where alerts go once the audit has produced them.
//!
//! audit → [`Delivery::deliver`] → one bounded queue per sink → the sink's own thread (stdout,
//! `file:`, syslog, NATS, webhook), and the watch socket's subscribers (`watch.rs`).
//!
//! Each sink consumes at its own pace, so a slow or dead sink never slows the kernel reader
//! or the other sinks. What a full queue cannot take is counted, never dropped silently: the
//! next delivery carries a `lost` line that names the sink, to every sink; the sink's own
//! copy waits, with the count, until its queue has room.

mod nats;
mod sink;
mod spool;
mod status;
mod syslog;
mod watch;
mod webhook;

use anyhow::Context as _;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tracing::warn;

pub use nats::NatsCredentials;
pub use sink::SinkSpec;
pub use watch::{DEFAULT_SOCKET, WatchServer, status, watch};

use crate::{
    alerts::{Alert, AlertBody},
    metrics::{Metrics, SinkLabels},
    output::Format,
};

/// Alerts a sink's queue holds before further ones are counted as lost for it: several
/// seconds of `--all` on a busy host.
const SINK_QUEUE_ALERTS: usize = 65_536;

/// What network sinks connect with besides their URLs.
#[derive(Clone, Default)]
pub struct SinkAccess {
    /// CA certificates (PEM) that `https://` and `tls://` sinks trust instead of the
    /// system's (`--sink-ca`).
    pub ca: Option<std::path::PathBuf>,
    /// Who NATS sinks are to their server (`--nats-creds`).
    pub nats_credentials: Option<NatsCredentials>,
}

/// Where network sinks keep what their receiver has not taken (`--spool`, `--spool-max`).
pub struct SpoolSettings {
    pub folder: std::path::PathBuf,
    /// Bytes of alerts each sink's spool may hold.
    pub max_bytes: u64,
}

impl SpoolSettings {
    /// The spool of the sink `name`, in a folder only root can read (alerts name
    /// processes and users), created when missing.
    fn open(&self, name: &str) -> anyhow::Result<spool::Spool> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.folder)
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot create the spool folder {} (--spool): {error}",
                    self.folder.display()
                )
            })?;
        spool::Spool::open(&self.folder, name, self.max_bytes)
    }

    /// As [`SpoolSettings::open`], first renaming the spool an earlier srcip kept for this
    /// sink under `former_name`, when there is one and none under `name` yet.
    fn open_renaming(&self, name: &str, former_name: &str) -> anyhow::Result<spool::Spool> {
        let former = spool::Spool::path_of(&self.folder, former_name);
        let current = spool::Spool::path_of(&self.folder, name);
        if former != current && former.exists() && !current.exists() {
            std::fs::rename(&former, &current).with_context(|| {
                format!(
                    "cannot rename the spool {} to {}",
                    former.display(),
                    current.display()
                )
            })?;
        }
        self.open(name)
    }
}

/// A runtime for a network client (NATS, HTTP) inside its sink's thread: the sink's sends
/// block that thread only. `None`, said in the log, when it cannot be made.
fn client_runtime(sink: &str) -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .inspect_err(|error| tracing::error!("cannot start the sink {sink}: {error}"))
        .ok()
}

/// The line saying that sink `name` lost `count` alerts.
pub(super) fn lost_line(name: &str, count: u64) -> SharedAlert {
    SharedAlert::single(Alert::now(AlertBody::Lost {
        count,
        sink: Some(name.to_owned()),
    }))
}

/// An alert as sinks and watchers hold it: its place in the batch the audit made it in.
/// Handing it to every sink costs a reference count, not an allocation per alert (`--all`
/// hands over one per connection); the batch is freed once every sink is done with it.
#[derive(Clone)]
pub struct SharedAlert {
    batch: Arc<Vec<Alert>>,
    index: usize,
}

impl SharedAlert {
    /// An alert made apart from a batch (a sink's `lost` line).
    fn single(alert: Alert) -> Self {
        Self {
            batch: Arc::new(vec![alert]),
            index: 0,
        }
    }
}

impl std::ops::Deref for SharedAlert {
    type Target = Alert;

    fn deref(&self) -> &Alert {
        &self.batch[self.index]
    }
}

/// How long `stop` waits for each sink to write what it was given.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct Delivery {
    sinks: Vec<SinkQueue>,
    metrics: Arc<Metrics>,
    watch: Option<WatchServer>,
    /// Says why stdout failed: its reader has gone (`srcip run | head`, a normal way to
    /// stop), or another error.
    stdout_closed: Option<tokio::sync::oneshot::Receiver<std::io::Error>>,
    /// `dead_letter` lines from the sinks' threads, and the sending end each sink gets.
    dead_letter_lines: tokio::sync::mpsc::UnboundedReceiver<Alert>,
    dead_letter_sender: tokio::sync::mpsc::UnboundedSender<Alert>,
}

/// What the delivery stage tells the daemon between two deliveries.
pub enum DeliveryEvent {
    /// Writing to stdout failed: its reader has gone, or another error.
    StdoutFailed(std::io::Error),
    /// A sink dead-lettered alerts: its line, for [`Delivery::deliver_dead_letter`].
    DeadLetter(Box<Alert>),
}

/// The sending end of one sink's queue.
struct SinkQueue {
    /// Its name and spool, as `srcip status` reports them.
    info: status::SinkInfo,
    queue: mpsc::SyncSender<SharedAlert>,
    counters: SinkCounters,
    /// Alerts this sink lost whose `lost` line its full queue could not take either: the
    /// next line for it says them too.
    lost_unsaid: u64,
    thread: JoinHandle<()>,
}

/// What the delivery stage and a sink's thread count for the sink.
#[derive(Clone)]
pub(super) struct SinkCounters {
    /// Alerts the sink could not take (its queue was full) or write, and no `lost` line has
    /// reported yet.
    unreported_lost: Arc<AtomicU64>,
    /// Losses this sink's own `lost` lines said, which it could not write either (its spool
    /// refused them): its next `lost` line says them again. The other sinks heard of them
    /// once; a new announcement each time would be a line to every sink at every delivery
    /// for as long as the spool refuses.
    unsaid_own_losses: Arc<AtomicU64>,
    /// The sink's metrics.
    delivered: Counter,
    failed: Counter,
    spooled: Counter,
    backlog: Gauge,
    dead_letters: Counter,
    /// The sink's name and where its `dead_letter` lines go: to the delivery stage, which
    /// hands them to every other sink.
    name: Arc<str>,
    dead_letter_lines: tokio::sync::mpsc::UnboundedSender<Alert>,
}

impl SinkCounters {
    /// The counters of sink `name`; its spool's series (`spooled`, `dead_letters`) only
    /// when it `has_spool`: a sink without one counts into counters nobody serves.
    fn new(
        metrics: &Metrics,
        name: &str,
        has_spool: bool,
        dead_letter_lines: tokio::sync::mpsc::UnboundedSender<Alert>,
    ) -> Self {
        let labels = SinkLabels {
            sink: name.to_owned(),
        };
        let spool_series = |family: &Family<SinkLabels, Counter>| {
            if has_spool {
                family.get_or_create(&labels).clone()
            } else {
                Counter::default()
            }
        };
        Self {
            unreported_lost: Arc::default(),
            unsaid_own_losses: Arc::default(),
            delivered: metrics.sink_delivered.get_or_create(&labels).clone(),
            failed: metrics.sink_failed.get_or_create(&labels).clone(),
            spooled: spool_series(&metrics.sink_spooled),
            backlog: metrics.sink_backlog.get_or_create(&labels).clone(),
            dead_letters: spool_series(&metrics.sink_dead_letters),
            name: Arc::from(name),
            dead_letter_lines,
        }
    }

    /// `count` alerts went to the spool (they still wait).
    pub(super) fn spooled(&self, count: usize) {
        self.spooled.inc_by(count as u64);
    }

    /// `count` alerts a previous run left in the spool wait too.
    pub(super) fn waiting_from_before(&self, count: u64) {
        self.backlog.inc_by(count as i64);
    }

    /// `count` alerts were written or sent.
    pub(super) fn written(&self, count: usize) {
        self.delivered.inc_by(count as u64);
        self.backlog.dec_by(count as i64);
    }

    /// `count` queued alerts could not be written, for good.
    pub(super) fn not_written(&self, count: usize) {
        self.backlog.dec_by(count as i64);
        self.lost(count);
    }

    /// Queued `alerts` that could not be written, for good: its own `lost` lines' counts
    /// wait for the next (see `unsaid_own_losses`), the others are lost.
    pub(super) fn not_spooled(&self, alerts: &[SharedAlert]) {
        self.backlog.dec_by(alerts.len() as i64);
        self.failed.inc_by(alerts.len() as u64);
        let mut lost = 0;
        for alert in alerts {
            match &alert.body {
                AlertBody::Lost {
                    count,
                    sink: Some(sink),
                } if **sink == *self.name => {
                    self.unsaid_own_losses.fetch_add(*count, Ordering::Relaxed);
                }
                _ => lost += 1,
            }
        }
        self.unreported_lost.fetch_add(lost, Ordering::Relaxed);
    }

    /// `count` alerts the receiver refused for good (`error`, its answer) went to the
    /// spool's dead letters.
    pub(super) fn dead_lettered(&self, count: usize, error: String) {
        self.backlog.dec_by(count as i64);
        self.dead_letters.inc_by(count as u64);
        warn!(
            "sink {} refused {count} alerts for good ({error}); they are kept in its spool's dead letters",
            self.name
        );
        let line = Alert::now(AlertBody::DeadLetter {
            sink: self.name.to_string(),
            count: count as u64,
            error,
        });
        // The delivery stage is gone only when srcip stops: the log above says it then.
        let _ = self.dead_letter_lines.send(line);
    }

    fn lost(&self, count: usize) {
        self.unreported_lost
            .fetch_add(count as u64, Ordering::Relaxed);
        self.failed.inc_by(count as u64);
    }
}

impl Delivery {
    /// Starts a thread per sink: stdout (in `format`) unless `quiet`, and each of `sinks`.
    pub fn start(
        format: Format,
        quiet: bool,
        sinks: &[SinkSpec],
        spool: &SpoolSettings,
        access: &SinkAccess,
        watch: Option<WatchServer>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let (dead_letter_sender, dead_letter_lines) = tokio::sync::mpsc::unbounded_channel();
        let mut delivery = Self {
            sinks: Vec::new(),
            metrics,
            watch,
            stdout_closed: None,
            dead_letter_lines,
            dead_letter_sender,
        };
        if !quiet {
            let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
            delivery.stdout_closed = Some(closed_rx);
            delivery.add(sink::Sink::Stdout {
                format,
                closed: closed_tx,
            })?;
        }
        for spec in sinks {
            delivery.add(sink::Sink::open(spec, spool, access)?)?;
        }
        if let Some(watch) = &delivery.watch {
            watch.set_sinks(
                delivery
                    .sinks
                    .iter()
                    .map(|sink| sink.info.clone())
                    .collect(),
            );
        }
        Ok(delivery)
    }

    fn add(&mut self, sink: sink::Sink) -> anyhow::Result<()> {
        let (queue, alerts) = mpsc::sync_channel(SINK_QUEUE_ALERTS);
        let info = status::SinkInfo {
            name: sink.name(),
            spool: sink.spool_path(),
        };
        let counters = SinkCounters::new(
            &self.metrics,
            &info.name,
            info.spool.is_some(),
            self.dead_letter_sender.clone(),
        );
        let thread = sink.spawn(alerts, counters.clone())?;
        self.sinks.push(SinkQueue {
            info,
            queue,
            counters,
            lost_unsaid: 0,
            thread,
        });
        Ok(())
    }

    /// Hands `alerts` to every sink, without waiting for any.
    pub fn deliver(&mut self, alerts: Vec<Alert>) {
        self.deliver_except(alerts, None);
    }

    /// Hands a sink's `dead_letter` line to every sink but that one, which refused what the
    /// line is about and might refuse the line too.
    pub fn deliver_dead_letter(&mut self, line: Alert) {
        let refusing = match &line.body {
            AlertBody::DeadLetter { sink, .. } => Some(sink.clone()),
            _ => None,
        };
        self.deliver_except(vec![line], refusing.as_deref());
    }

    fn deliver_except(&mut self, alerts: Vec<Alert>, except: Option<&str>) {
        let batch = Arc::new(alerts);
        for index in 0..batch.len() {
            let alert = SharedAlert {
                batch: Arc::clone(&batch),
                index,
            };
            self.metrics.observe(&alert);
            for sink in &self.sinks {
                if except != Some(sink.info.name.as_str()) {
                    sink.offer(&alert);
                }
            }
            if let Some(watch) = &self.watch {
                watch.publish(&alert);
            }
        }
        self.report_lost();
    }

    /// A `lost` line for each sink that dropped alerts, to every sink and watcher. A sink
    /// whose queue cannot take the line about itself keeps the count, and its next line
    /// says it too, so that no loss goes unsaid where it happened; the others get each loss
    /// once. One that cannot take that line has lost one alert more, which its own next line
    /// says: counted as a new loss, it would be announced to the first sink, and two stalled
    /// sinks would tell each other of lost lines at every delivery.
    fn report_lost(&mut self) {
        for named in 0..self.sinks.len() {
            let sink = &mut self.sinks[named];
            let newly_lost = sink.counters.unreported_lost.swap(0, Ordering::Relaxed);
            sink.lost_unsaid +=
                newly_lost + sink.counters.unsaid_own_losses.swap(0, Ordering::Relaxed);
            sink.say_lost();
            if newly_lost == 0 {
                continue;
            }
            warn!("sink {} lost {newly_lost} alerts", sink.info.name);
            let line = lost_line(&sink.info.name, newly_lost);
            for (index, other) in self.sinks.iter_mut().enumerate() {
                if index != named && !other.try_offer(&line) {
                    other.lost_unsaid += 1;
                    other.counters.failed.inc();
                }
            }
            if let Some(watch) = &self.watch {
                watch.publish(&line);
            }
        }
    }

    /// The next thing the daemon must act on. Cancel-safe.
    pub async fn next_event(&mut self) -> DeliveryEvent {
        tokio::select! {
            error = stdout_failed(&mut self.stdout_closed) => DeliveryEvent::StdoutFailed(error),
            Some(line) = self.dead_letter_lines.recv() => DeliveryEvent::DeadLetter(Box::new(line)),
        }
    }

    /// Closes every queue and waits, up to a few seconds per sink, until each has written
    /// what it was given. Watchers get what was published and are disconnected.
    pub async fn stop(mut self) {
        self.report_lost();
        for mut sink in self.sinks {
            let deadline = std::time::Instant::now() + STOP_GRACE;
            // A loss its full queue could not say yet is said as soon as it has room.
            while !sink.say_lost() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if sink.lost_unsaid > 0 {
                warn!(
                    "sink {} lost {} alerts it had no room left to say so",
                    sink.info.name, sink.lost_unsaid
                );
            }
            drop(sink.queue);
            while !sink.thread.is_finished() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if sink.thread.is_finished() {
                let _ = sink.thread.join();
            } else {
                warn!(
                    "sink {} did not finish writing within {} s; its last alerts may be missing",
                    sink.info.name,
                    STOP_GRACE.as_secs()
                );
            }
        }
        if let Some(watch) = self.watch {
            watch.stop().await;
        }
    }
}

/// Resolves with stdout's error when writing to it failed; never, with `--quiet`.
async fn stdout_failed(
    closed: &mut Option<tokio::sync::oneshot::Receiver<std::io::Error>>,
) -> std::io::Error {
    if let Some(receiver) = closed {
        let result = receiver.await;
        *closed = None;
        if let Ok(error) = result {
            return error;
        }
    }
    // The stdout thread ended without an error, or there is none.
    std::future::pending().await
}

impl SinkQueue {
    /// Queues the `lost` line of all this sink lost and has not said yet; `false` while its
    /// queue has no room for it.
    fn say_lost(&mut self) -> bool {
        if self.lost_unsaid == 0 {
            return true;
        }
        let said = self.try_offer(&lost_line(&self.info.name, self.lost_unsaid));
        if said {
            self.lost_unsaid = 0;
        }
        said
    }

    /// Queues `alert`, or counts it as lost for this sink.
    fn offer(&self, alert: &SharedAlert) {
        if !self.try_offer(alert) {
            self.counters.lost(1);
        }
    }

    /// Queues `alert`; `false` when the queue is full or the sink's thread has ended
    /// (stdout's reader is gone): either way the sink will not write it.
    fn try_offer(&self, alert: &SharedAlert) -> bool {
        let queued = self.queue.try_send(alert.clone()).is_ok();
        if queued {
            self.counters.backlog.inc();
        }
        queued
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs::OpenOptions,
        io::Read as _,
        os::unix::fs::OpenOptionsExt as _,
        time::{Duration, Instant},
    };

    use super::*;

    #[test]
    fn a_spool_named_after_the_whole_url_is_taken_over_with_its_alerts() {
        let folder = tempfile::tempdir().unwrap();
        let url = "https://hooks.example.net/T0KEN";
        let mut former = spool::Spool::open(folder.path(), url, 1 << 20).unwrap();
        former.append(&[b"waiting".to_vec()]).unwrap();
        drop(former);
        let settings = SpoolSettings {
            folder: folder.path().to_owned(),
            max_bytes: 1 << 20,
        };
        let mut spool = settings
            .open_renaming("https://hooks.example.net:443#12345678", url)
            .unwrap();
        assert_eq!(spool.oldest(10).unwrap().0, [b"waiting".to_vec()]);
        let files: Vec<_> = std::fs::read_dir(folder.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["https___hooks.example.net_443_12345678.redb"]);
    }

    /// A sink whose reader stalls loses what its queue cannot hold, and says how much, even
    /// when its queue is still full as the loss is first reported: every alert delivered is
    /// either written or counted in a `lost` line for the sink. Another sink hears of each
    /// loss once.
    #[test]
    fn a_stalled_sink_says_how_many_alerts_it_lost() {
        let folder = tempfile::tempdir().unwrap();
        let pipe = folder.path().join("alerts");
        nix::unistd::mkfifo(&pipe, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Open before the sink opens its end, and not read yet: once the pipe is full, the
        // sink's thread blocks in its write and its queue fills up.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe)
            .unwrap();
        let spool = SpoolSettings {
            folder: folder.path().join("spool"),
            max_bytes: 1 << 20,
        };
        let file = folder.path().join("alerts.json");
        let sinks = [SinkSpec::File(pipe.clone()), SinkSpec::File(file.clone())];
        let metrics = Arc::new(Metrics::new());
        let mut delivery = Delivery::start(
            Format::Json,
            true,
            &sinks,
            &spool,
            &SinkAccess::default(),
            None,
            metrics,
        )
        .unwrap();
        // In batches the sink that reads keeps up with, so that only the stalled one loses.
        const BATCHES: usize = 80;
        const BATCH: usize = 1000;
        // More than the queue and the pipe hold.
        const _: () = assert!(BATCHES * BATCH > SINK_QUEUE_ALERTS + 10_000);
        let sent = BATCHES * BATCH;
        for _ in 0..BATCHES {
            // The reading sink is let catch up, however slow the machine.
            while delivery.sinks[1].counters.backlog.get() > (SINK_QUEUE_ALERTS / 2) as i64 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let alerts = (0..BATCH)
                .map(|_| {
                    Alert::now(AlertBody::Stopped {
                        decided_in_kernel: 0,
                    })
                })
                .collect();
            delivery.deliver(alerts);
        }
        assert!(
            delivery.sinks[0].lost_unsaid > 0,
            "the queue was full when the loss was reported"
        );

        // The reader comes back; the next deliveries carry the whole count.
        nix::fcntl::fcntl(
            &reader,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .unwrap();
        let reading = std::thread::spawn(move || {
            let mut text = String::new();
            reader.read_to_string(&mut text).unwrap();
            text
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while delivery.sinks[0].lost_unsaid > 0 {
            assert!(Instant::now() < deadline, "the lost line never got through");
            std::thread::sleep(Duration::from_millis(20));
            delivery.deliver(Vec::new());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(delivery.stop());

        let pipe_sink = format!("file:{}", pipe.display());
        let file_sink = format!("file:{}", file.display());
        let (written, lost) = tally(&reading.join().unwrap());
        let stalled_lost = lost.get(&pipe_sink).copied().unwrap_or(0);
        assert_eq!(
            written + stalled_lost,
            sent as u64,
            "{written} written, {lost:?} lost"
        );
        assert!(
            stalled_lost > 0,
            "nothing was lost: the test did not stall the sink"
        );
        let (written, lost) = tally(&std::fs::read_to_string(&file).unwrap());
        assert_eq!(
            lost.get(&pipe_sink).copied(),
            Some(stalled_lost),
            "the other sink hears of the loss once"
        );
        assert_eq!(
            written + lost.get(&file_sink).copied().unwrap_or(0),
            sent as u64
        );
    }

    /// The `stopped` lines written, and the counts of the `lost` lines per sink they name.
    fn tally(lines: &str) -> (u64, std::collections::HashMap<String, u64>) {
        let (mut written, mut lost) = (0, std::collections::HashMap::new());
        for line in lines.lines() {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            match line["type"].as_str() {
                Some("stopped") => written += 1,
                Some("lost") => {
                    let sink = line["sink"].as_str().unwrap().to_owned();
                    *lost.entry(sink).or_default() += line["count"].as_u64().unwrap();
                }
                other => panic!("unexpected line type {other:?}"),
            }
        }
        (written, lost)
    }
}
