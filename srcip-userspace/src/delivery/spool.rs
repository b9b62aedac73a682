//! A network sink's spool: the alerts its receiver has not yet acknowledged, on disk, so
//! that an outage, or a restart of srcip during one, loses none of them.
//!
//! One redb file per sink under `--spool DIR`, named after the sink's URL. redb is a
//! single-file ACID B-tree: an append is one committed (fsynced) transaction, batched, and
//! a crash leaves the last committed state. Entries are keyed by a sequence number, so
//! reading from the start gives the oldest first. `--spool-max` bounds the bytes of the
//! entries; appending beyond it evicts the oldest, which the caller counts as lost.

use std::{
    io,
    path::{Path, PathBuf},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use backon::{BackoffBuilder as _, ExponentialBuilder};
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tracing::{info, warn};

use super::SharedAlert;
use super::{SinkCounters, sink::BATCH_ALERTS};
use crate::alerts::Alert;

const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");
/// Alerts the receiver refused for good, with its answer, under their `ALERTS` key: kept
/// for an operator to look at (or resend), never retried.
const DEAD_LETTERS: TableDefinition<u64, (&str, &[u8])> = TableDefinition::new("dead_letters");

/// Spooled alerts handed to the receiver in one send, at most.
const SEND_BATCH: usize = 256;
/// The longest wait between two attempts to reach a receiver that is down, jitter included.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a receiver did not take a send.
#[derive(Debug)]
pub(super) enum SendError {
    /// Down, busy, or the connection broke: sent again after a backoff.
    Retry(io::Error),
    /// The receiver will never take these alerts (an HTTP 4xx, a message too large); its
    /// answer.
    Refused(String),
}

impl From<io::Error> for SendError {
    fn from(error: io::Error) -> Self {
        Self::Retry(error)
    }
}

/// Moves what arrives in `alerts` through `spool` to a receiver, until the queue is closed:
/// each alert is rendered by `render` and committed to the spool first, and leaves it once
/// `send` has taken it. A failed send is retried, oldest first, after an exponential
/// backoff with jitter (200 ms up to [`MAX_BACKOFF`]), while new alerts keep going to the
/// spool. A batch the receiver refuses for good is sent again one alert at a time, and
/// each alert it refuses goes to the spool's dead-letter table (see [`SendError`]). When
/// srcip stops, one last attempt is made; what is still spooled then is sent when srcip runs
/// again.
pub(super) fn forward(
    name: &str,
    alerts: &mpsc::Receiver<SharedAlert>,
    counters: &SinkCounters,
    mut spool: Spool,
    mut render: impl FnMut(&Alert) -> Vec<u8>,
    mut send: impl FnMut(&[Vec<u8>]) -> Result<(), SendError>,
) {
    let new_backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            // backon's jitter adds up to the delay itself, so the delay stops at half the
            // longest wait.
            .with_max_delay(MAX_BACKOFF / 2)
            .with_jitter()
            .without_max_times()
            .build()
    };
    if !spool.is_empty() {
        info!(
            "{} alerts for {name} waited in the spool {}; sending them first",
            spool.len(),
            spool.path().display()
        );
        counters.waiting_from_before(spool.len());
    }
    let mut backoff = new_backoff();
    let mut next_attempt = Instant::now();
    let mut failing = false;
    loop {
        // Take in what arrived; wait for more only until the next attempt is due.
        let arrived = if spool.is_empty() {
            alerts.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            alerts.recv_timeout(next_attempt.saturating_duration_since(Instant::now()))
        };
        match arrived {
            Ok(first) => {
                let batch: Vec<SharedAlert> = std::iter::once(first)
                    .chain(alerts.try_iter().take(BATCH_ALERTS - 1))
                    .collect();
                let rendered: Vec<Vec<u8>> = batch.iter().map(|alert| render(alert)).collect();
                match spool.append(&rendered) {
                    Ok(evicted) => {
                        counters.spooled(rendered.len());
                        if evicted > 0 {
                            warn!(
                                "the spool of {name} is full (--spool-max): its {evicted} oldest alerts are dropped"
                            );
                            counters.not_written(evicted as usize);
                        }
                    }
                    Err(error) => {
                        warn!("cannot spool alerts for {name}: {error}");
                        counters.not_written(rendered.len());
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // srcip stops: one last attempt, no waiting.
                while !spool.is_empty()
                    && send_oldest(&mut spool, &mut send, counters, SEND_BATCH).is_ok()
                {
                }
                if !spool.is_empty() {
                    info!(
                        "{} alerts for {name} stay in the spool {} until srcip runs again",
                        spool.len(),
                        spool.path().display()
                    );
                }
                return;
            }
        }
        if spool.is_empty() || Instant::now() < next_attempt {
            continue;
        }
        match send_oldest(&mut spool, &mut send, counters, SEND_BATCH) {
            Ok(()) => {
                if failing {
                    info!("{name} takes alerts again");
                    failing = false;
                }
                backoff = new_backoff();
            }
            Err(error) => {
                let wait = backoff.next().unwrap_or(MAX_BACKOFF);
                if !failing {
                    warn!(
                        "cannot send alerts to {name}: {error}; they wait in the spool, next attempt in {wait:?}"
                    );
                    failing = true;
                }
                next_attempt = Instant::now() + wait;
            }
        }
    }
}

/// Sends the oldest spooled alerts (up to `limit`) and removes them once sent. A batch the
/// receiver refuses is sent again alert by alert, so that only what it refuses is
/// dead-lettered.
fn send_oldest(
    spool: &mut Spool,
    send: &mut impl FnMut(&[Vec<u8>]) -> Result<(), SendError>,
    counters: &SinkCounters,
    limit: usize,
) -> io::Result<()> {
    let (messages, last) = spool.oldest(limit).map_err(io::Error::other)?;
    if messages.is_empty() {
        return Ok(());
    }
    match send(&messages) {
        Ok(()) => {
            spool.remove_through(last).map_err(io::Error::other)?;
            counters.written(messages.len());
            Ok(())
        }
        Err(SendError::Retry(error)) => Err(error),
        Err(SendError::Refused(answer)) if messages.len() == 1 => {
            spool
                .dead_letter_oldest(&answer)
                .map_err(io::Error::other)?;
            counters.dead_lettered(1, answer);
            Ok(())
        }
        Err(SendError::Refused(_)) => {
            for _ in 0..messages.len() {
                send_oldest(spool, send, counters, 1)?;
            }
            Ok(())
        }
    }
}

pub struct Spool {
    db: Database,
    path: PathBuf,
    /// The key of the next entry.
    next: u64,
    entries: u64,
    bytes: u64,
    max_bytes: u64,
}

impl Spool {
    /// Opens (or creates) the spool of `sink` in `folder`, and counts what a previous run
    /// left in it.
    /// The file of sink `sink`'s spool in `folder`.
    pub fn path_of(folder: &Path, sink: &str) -> PathBuf {
        let name: String = sink
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        folder.join(format!("{name}.redb"))
    }

    pub fn open(folder: &Path, sink: &str, max_bytes: u64) -> anyhow::Result<Self> {
        let path = Self::path_of(folder, sink);
        let db = Database::create(&path).with_context(|| {
            format!(
                "cannot open the spool {} of sink {sink} (is another srcip run using this --spool?)",
                path.display()
            )
        })?;
        let mut spool = Self {
            db,
            path,
            next: 0,
            entries: 0,
            bytes: 0,
            max_bytes,
        };
        // A write transaction, though it only counts: it creates the table in a new spool,
        // so that readers later find it.
        let write = spool.db.begin_write()?;
        {
            let table = write.open_table(ALERTS)?;
            for entry in table.iter()? {
                let (key, value) = entry?;
                spool.next = key.value() + 1;
                spool.entries += 1;
                spool.bytes += value.value().len() as u64;
            }
        }
        write.commit()?;
        Ok(spool)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Appends `messages` in one transaction; returns how many of the oldest entries had to
    /// go to stay within `--spool-max`.
    pub fn append(&mut self, messages: &[Vec<u8>]) -> Result<u64, redb::Error> {
        let write = self.db.begin_write()?;
        // Counted as the store will be once committed, and taken only then: a failed commit
        // leaves the store, and so the counts, as they were.
        let (mut next, mut entries, mut bytes) = (self.next, self.entries, self.bytes);
        let mut evicted = 0;
        {
            let mut table = write.open_table(ALERTS)?;
            for message in messages {
                table.insert(next, message.as_slice())?;
                next += 1;
                entries += 1;
                bytes += message.len() as u64;
            }
            while bytes > self.max_bytes {
                let Some((_, value)) = table.pop_first()? else {
                    break;
                };
                bytes -= value.value().len() as u64;
                entries -= 1;
                evicted += 1;
            }
        }
        write.commit()?;
        (self.next, self.entries, self.bytes) = (next, entries, bytes);
        Ok(evicted)
    }

    /// Up to `limit` of the oldest entries, with the key of the last.
    pub fn oldest(&self, limit: usize) -> Result<(Vec<Vec<u8>>, u64), redb::Error> {
        let read = self.db.begin_read()?;
        let table = read.open_table(ALERTS)?;
        let mut messages = Vec::new();
        let mut last = 0;
        for entry in table.iter()?.take(limit) {
            let (key, value) = entry?;
            last = key.value();
            messages.push(value.value().to_vec());
        }
        Ok((messages, last))
    }

    /// Removes every entry up to and including `last`: the receiver has them.
    pub fn remove_through(&mut self, last: u64) -> Result<(), redb::Error> {
        let write = self.db.begin_write()?;
        let (mut entries, mut bytes) = (self.entries, self.bytes);
        {
            let mut table = write.open_table(ALERTS)?;
            for entry in table.extract_from_if(..=last, |_, _| true)? {
                let (_, value) = entry?;
                bytes -= value.value().len() as u64;
                entries -= 1;
            }
        }
        write.commit()?;
        (self.entries, self.bytes) = (entries, bytes);
        Ok(())
    }

    /// Moves the oldest entry to the dead-letter table with the receiver's `answer`, in one
    /// transaction.
    pub fn dead_letter_oldest(&mut self, answer: &str) -> Result<(), redb::Error> {
        let write = self.db.begin_write()?;
        let (mut entries, mut bytes) = (self.entries, self.bytes);
        {
            let mut alerts = write.open_table(ALERTS)?;
            let mut dead_letters = write.open_table(DEAD_LETTERS)?;
            if let Some((key, value)) = alerts.pop_first()? {
                dead_letters.insert(key.value(), (answer, value.value()))?;
                bytes -= value.value().len() as u64;
                entries -= 1;
            }
        }
        write.commit()?;
        (self.entries, self.bytes) = (entries, bytes);
        Ok(())
    }

    /// How many entries the dead-letter table holds.
    #[cfg(test)]
    fn dead_letters(&self) -> Result<u64, redb::Error> {
        use redb::ReadableTableMetadata as _;
        let read = self.db.begin_read()?;
        match read.open_table(DEAD_LETTERS) {
            Ok(table) => Ok(table.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(error) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_reopen_and_leave_oldest_first() {
        let folder = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(folder.path(), "syslog+tcp://127.0.0.1:514", 1 << 20).unwrap();
        spool.append(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        drop(spool);
        let mut spool = Spool::open(folder.path(), "syslog+tcp://127.0.0.1:514", 1 << 20).unwrap();
        assert_eq!(spool.len(), 2);
        spool.append(&[b"three".to_vec()]).unwrap();
        let (oldest, last) = spool.oldest(2).unwrap();
        assert_eq!(oldest, [b"one".to_vec(), b"two".to_vec()]);
        spool.remove_through(last).unwrap();
        assert_eq!(spool.oldest(10).unwrap().0, [b"three".to_vec()]);
        assert_eq!(spool.len(), 1);
    }

    #[test]
    fn a_dead_letter_leaves_the_alerts_for_its_own_table_in_one_step() {
        let folder = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(folder.path(), "https://x:443", 1 << 20).unwrap();
        spool
            .append(&[b"refused".to_vec(), b"next".to_vec()])
            .unwrap();
        spool
            .dead_letter_oldest("the receiver answered 400")
            .unwrap();
        assert_eq!((spool.len(), spool.dead_letters().unwrap()), (1, 1));
        drop(spool);
        let spool = Spool::open(folder.path(), "https://x:443", 1 << 20).unwrap();
        assert_eq!(spool.oldest(10).unwrap().0, [b"next".to_vec()]);
        assert_eq!(spool.dead_letters().unwrap(), 1);
    }

    #[test]
    fn the_bound_evicts_the_oldest_and_says_how_many() {
        let folder = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(folder.path(), "nats://x/y", 10).unwrap();
        assert_eq!(
            spool.append(&[b"aaaa".to_vec(), b"bbbb".to_vec()]).unwrap(),
            0
        );
        assert_eq!(spool.append(&[b"cccc".to_vec()]).unwrap(), 1);
        assert_eq!(
            spool.oldest(10).unwrap().0,
            [b"bbbb".to_vec(), b"cccc".to_vec()]
        );
    }
}
