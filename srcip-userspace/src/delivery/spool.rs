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

use backon::{BackoffBuilder as _, ExponentialBuilder};
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tracing::{debug, info, warn};

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
    // While the spool refuses alerts (a full disk), until when batches are counted as lost
    // without a try: each try opens the database again, which reads the whole file. Said
    // once when it starts refusing, and once when it takes alerts again.
    let mut spool_backoff = new_backoff();
    let mut spool_refusing_until: Option<Instant> = None;
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
                let refusing = spool_refusing_until.is_some_and(|until| Instant::now() < until);
                let appended = if refusing {
                    None
                } else {
                    let rendered: Vec<Vec<u8>> = batch.iter().map(|alert| render(alert)).collect();
                    Some(
                        spool
                            .append(&rendered)
                            .map(|evicted| (rendered.len(), evicted)),
                    )
                };
                match appended {
                    None => counters.not_spooled(&batch),
                    Some(Ok((spooled, evicted))) => {
                        if spool_refusing_until.take().is_some() {
                            info!("the spool of {name} takes alerts again");
                            spool_backoff = new_backoff();
                        }
                        counters.spooled(spooled);
                        if evicted > 0 {
                            warn!(
                                "the spool of {name} is full (--spool-max): its {evicted} oldest alerts are dropped"
                            );
                            counters.not_written(evicted as usize);
                        }
                    }
                    Some(Err(error)) => {
                        if spool_refusing_until.is_none() {
                            warn!(
                                "cannot spool alerts for {name}: {error}; they are counted as lost until it can"
                            );
                        }
                        let wait = spool_backoff.next().unwrap_or(MAX_BACKOFF);
                        spool_refusing_until = Some(Instant::now() + wait);
                        counters.not_spooled(&batch);
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
            counters.written(messages.len());
            // Not removed (a full disk): they are not sent again all the same, and go with
            // the next write that commits.
            if let Err(error) = spool.remove_through(last, messages.len() as u64) {
                debug!("the alerts sent stay in the spool for now: {error}");
            }
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
    /// `None` after an I/O error: redb then refuses every transaction ("Previous I/O error
    /// occurred") until the file is opened again, which recovers its last committed state.
    /// A full disk is such an error: the spool is opened again at its next use.
    db: Option<Database>,
    path: PathBuf,
    /// Entries the receiver took whose removal did not commit (a full disk): the key of the
    /// last of them, and how many they are. They are not sent again, and go with the next
    /// write that commits. Kept in memory only: after a restart they are sent again.
    sent: Option<(u64, u64)>,
    /// The key of the next entry.
    next: u64,
    entries: u64,
    bytes: u64,
    max_bytes: u64,
}

impl Spool {
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

    /// Opens (or creates) the spool of `sink` in `folder`, and counts what a previous run
    /// left in it.
    pub fn open(folder: &Path, sink: &str, max_bytes: u64) -> anyhow::Result<Self> {
        let path = Self::path_of(folder, sink);
        let mut spool = Self {
            db: None,
            path,
            sent: None,
            next: 0,
            entries: 0,
            bytes: 0,
            max_bytes,
        };
        if let Err(error) = spool.db() {
            return Err(anyhow::Error::from(error).context(format!(
                "cannot open the spool {} of sink {sink} (is another srcip run using this --spool?)",
                spool.path.display()
            )));
        }
        Ok(spool)
    }

    /// The database, opened (again) if it is not, with what it holds counted.
    fn db(&mut self) -> Result<&Database, redb::Error> {
        let db = match self.db.take() {
            Some(db) => db,
            None => {
                let db = Database::create(&self.path)?;
                // A write transaction, though it only counts: it creates the table in a
                // new spool, so that readers later find it.
                let (mut next, mut entries, mut bytes) = (0, 0, 0);
                let write = db.begin_write()?;
                {
                    let table = write.open_table(ALERTS)?;
                    for entry in table.iter()? {
                        let (key, value) = entry?;
                        next = key.value() + 1;
                        entries += 1;
                        bytes += value.value().len() as u64;
                    }
                }
                write.commit()?;
                (self.next, self.entries, self.bytes) = (next, entries, bytes);
                db
            }
        };
        Ok(self.db.insert(db))
    }

    /// `result`, closing the database when it is an I/O error (see `db`).
    fn closing_after_io_error<T>(
        &mut self,
        result: Result<T, redb::Error>,
    ) -> Result<T, redb::Error> {
        if let Err(redb::Error::Io(_) | redb::Error::PreviousIo) = &result {
            self.db = None;
        }
        result
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries still to send.
    pub fn len(&self) -> u64 {
        self.entries - self.sent.map_or(0, |(_, count)| count)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first key still to send.
    fn first_unsent(&self) -> u64 {
        self.sent.map_or(0, |(last, _)| last + 1)
    }

    /// Removes, in `table` of a write transaction, the entries sent whose removal has not
    /// committed yet; returns the entries and bytes the store then holds.
    fn remove_sent(&self, table: &mut redb::Table<u64, &[u8]>) -> Result<(u64, u64), redb::Error> {
        let (mut entries, mut bytes) = (self.entries, self.bytes);
        if let Some((last, _)) = self.sent {
            for entry in table.extract_from_if(..=last, |_, _| true)? {
                let (_, value) = entry?;
                bytes -= value.value().len() as u64;
                entries -= 1;
            }
        }
        Ok((entries, bytes))
    }

    /// Appends `messages` in one transaction; returns how many of the oldest entries had to
    /// go to stay within `--spool-max`.
    pub fn append(&mut self, messages: &[Vec<u8>]) -> Result<u64, redb::Error> {
        let result = self.try_append(messages);
        self.closing_after_io_error(result)
    }

    fn try_append(&mut self, messages: &[Vec<u8>]) -> Result<u64, redb::Error> {
        let write = self.db()?.begin_write()?;
        // Counted as the store will be once committed, and taken only then: a failed commit
        // leaves the store, and so the counts, as they were.
        let mut next = self.next;
        let mut evicted = 0;
        let (entries, bytes) = {
            let mut table = write.open_table(ALERTS)?;
            let (mut entries, mut bytes) = self.remove_sent(&mut table)?;
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
            (entries, bytes)
        };
        write.commit()?;
        (self.next, self.entries, self.bytes, self.sent) = (next, entries, bytes, None);
        Ok(evicted)
    }

    /// Up to `limit` of the oldest entries still to send, with the key of the last.
    pub fn oldest(&mut self, limit: usize) -> Result<(Vec<Vec<u8>>, u64), redb::Error> {
        let result = self.try_oldest(limit);
        self.closing_after_io_error(result)
    }

    fn try_oldest(&mut self, limit: usize) -> Result<(Vec<Vec<u8>>, u64), redb::Error> {
        let read = self.db()?.begin_read()?;
        let table = read.open_table(ALERTS)?;
        let mut messages = Vec::new();
        let mut last = 0;
        for entry in table.range(self.first_unsent()..)?.take(limit) {
            let (key, value) = entry?;
            last = key.value();
            messages.push(value.value().to_vec());
        }
        Ok((messages, last))
    }

    /// Removes every entry up to and including `last`, the `count` oldest still to send:
    /// the receiver has them. Should the removal not commit, they are not sent again.
    pub fn remove_through(&mut self, last: u64, count: u64) -> Result<(), redb::Error> {
        let result = self.try_remove_through(last);
        if result.is_err() {
            let already = self.sent.map_or(0, |(_, count)| count);
            self.sent = Some((last, already + count));
        }
        self.closing_after_io_error(result)
    }

    fn try_remove_through(&mut self, last: u64) -> Result<(), redb::Error> {
        let write = self.db()?.begin_write()?;
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
        (self.entries, self.bytes, self.sent) = (entries, bytes, None);
        Ok(())
    }

    /// Moves the oldest entry to the dead-letter table with the receiver's `answer`, in one
    /// transaction.
    pub fn dead_letter_oldest(&mut self, answer: &str) -> Result<(), redb::Error> {
        let result = self.try_dead_letter_oldest(answer);
        self.closing_after_io_error(result)
    }

    fn try_dead_letter_oldest(&mut self, answer: &str) -> Result<(), redb::Error> {
        let write = self.db()?.begin_write()?;
        let (entries, bytes) = {
            let mut alerts = write.open_table(ALERTS)?;
            let mut dead_letters = write.open_table(DEAD_LETTERS)?;
            // The entries sent go first: the oldest left is the one refused.
            let (mut entries, mut bytes) = self.remove_sent(&mut alerts)?;
            if let Some((key, value)) = alerts.pop_first()? {
                dead_letters.insert(key.value(), (answer, value.value()))?;
                bytes -= value.value().len() as u64;
                entries -= 1;
            }
            (entries, bytes)
        };
        write.commit()?;
        (self.entries, self.bytes, self.sent) = (entries, bytes, None);
        Ok(())
    }

    /// How many entries the dead-letter table holds.
    #[cfg(test)]
    fn dead_letters(&mut self) -> Result<u64, redb::Error> {
        use redb::ReadableTableMetadata as _;
        let read = self.db()?.begin_read()?;
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
        spool.remove_through(last, 2).unwrap();
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
        let mut spool = Spool::open(folder.path(), "https://x:443", 1 << 20).unwrap();
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
