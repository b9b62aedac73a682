//! The sinks, each on a thread of its own: stdout, `file:` and syslog (`syslog.rs`).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::PathBuf,
    sync::mpsc,
    thread::JoinHandle,
};

use anyhow::Context as _;
use tracing::warn;

use super::SharedAlert;
use super::{
    SinkAccess, SinkCounters, SpoolSettings,
    nats::{NatsTarget, write_nats},
    spool::Spool,
    syslog::{SyslogTarget, write_syslog},
    webhook::{self, WebhookTarget, write_webhook},
};
use crate::{
    alerts::{AlertWriter, host_name},
    output::Format,
};

/// Alerts written in one go, at most: a batch is one write and one flush.
pub(super) const BATCH_ALERTS: usize = 1024;

/// A `--sink URL`, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// `file:PATH`: JSON lines appended to PATH.
    File(PathBuf),
    /// `syslog:[PATH]`, `syslog+udp://HOST:PORT`, `syslog+tcp://HOST:PORT`.
    Syslog(SyslogTarget),
    /// `nats://HOST:PORT/SUBJECT?stream=NAME`: NATS JetStream.
    Nats(NatsTarget),
    /// `https://…` or `http://…`: a webhook.
    Webhook(WebhookTarget),
}

impl std::str::FromStr for SinkSpec {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("file:") {
            // `file:///var/log/x` and `file:/var/log/x` name the same file.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("file: needs a path, e.g. file:/var/log/srcip/alerts.json".into());
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        if let Some(target) = SyslogTarget::parse(url) {
            return target.map(Self::Syslog);
        }
        if let Some(target) = NatsTarget::parse(url) {
            return target.map(Self::Nats);
        }
        if let Some(target) = WebhookTarget::parse(url) {
            return target.map(Self::Webhook);
        }
        Err(format!(
            "{url} is not a sink URL: expected file:PATH, syslog:[PATH], syslog+udp://HOST:PORT, syslog+tcp://HOST:PORT, nats://HOST:PORT/SUBJECT?stream=NAME or https://…"
        ))
    }
}

/// A sink ready to write.
pub(super) enum Sink {
    Stdout {
        format: Format,
        /// Told why stdout failed, and so why srcip should stop.
        closed: tokio::sync::oneshot::Sender<io::Error>,
    },
    File {
        path: PathBuf,
        file: File,
    },
    /// Connects on its own thread: a receiver that is down at start is retried there.
    Syslog {
        target: SyslogTarget,
        spool: Spool,
    },
    /// Connects on its own thread too.
    Nats {
        target: NatsTarget,
        access: SinkAccess,
        spool: Spool,
    },
    Webhook {
        target: WebhookTarget,
        client: reqwest::Client,
        spool: Spool,
    },
}

impl Sink {
    /// Opens what the sink writes to now (its file, or its spool in `spool`; a webhook's
    /// client, with `access`'s CA), so that a path srcip cannot write stops it at start with
    /// a message, not at the first alert.
    pub fn open(
        spec: &SinkSpec,
        spool: &SpoolSettings,
        access: &SinkAccess,
    ) -> anyhow::Result<Self> {
        match spec {
            SinkSpec::File(path) => Ok(Self::File {
                file: open_append(path)
                    .with_context(|| format!("cannot open the sink file:{}", path.display()))?,
                path: path.clone(),
            }),
            SinkSpec::Syslog(target) => Ok(Self::Syslog {
                spool: spool.open(&target.url())?,
                target: target.clone(),
            }),
            SinkSpec::Nats(target) => Ok(Self::Nats {
                spool: spool.open_renaming(&target.name(), &target.url())?,
                target: target.clone(),
                access: access.clone(),
            }),
            SinkSpec::Webhook(target) => Ok(Self::Webhook {
                client: webhook::client(access.ca.as_deref())?,
                // Earlier srcips named it after the whole URL: taken over, with what it
                // holds.
                spool: spool.open_renaming(&target.name(), &target.url)?,
                target: target.clone(),
            }),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::Stdout { .. } => "stdout".to_owned(),
            Self::File { path, .. } => format!("file:{}", path.display()),
            Self::Syslog { target, .. } => target.url(),
            Self::Nats { target, .. } => target.name(),
            Self::Webhook { target, .. } => target.name(),
        }
    }

    /// The file of its spool, for sinks that have one.
    pub fn spool_path(&self) -> Option<PathBuf> {
        match self {
            Self::Stdout { .. } | Self::File { .. } => None,
            Self::Syslog { spool, .. } | Self::Nats { spool, .. } | Self::Webhook { spool, .. } => {
                Some(spool.path().to_owned())
            }
        }
    }

    /// Writes what arrives in `alerts` on a thread of its own until the queue is closed,
    /// counting in `counters` what it writes and what it cannot.
    pub fn spawn(
        self,
        alerts: mpsc::Receiver<SharedAlert>,
        counters: SinkCounters,
    ) -> anyhow::Result<JoinHandle<()>> {
        let name = self.name();
        std::thread::Builder::new()
            .name(format!("sink {name}"))
            .spawn(move || match self {
                Self::Stdout { format, closed } => {
                    write_stdout(format, closed, &alerts, &counters);
                }
                Self::File { path, file } => write_file(&path, file, &alerts, &counters),
                Self::Syslog { target, spool } => {
                    write_syslog(&target, &alerts, &counters, spool);
                }
                Self::Nats {
                    target,
                    access,
                    spool,
                } => write_nats(&target, &access, &alerts, &counters, spool),
                Self::Webhook {
                    target,
                    client,
                    spool,
                } => write_webhook(&target, &client, &alerts, &counters, spool),
            })
            .with_context(|| format!("cannot start the thread of sink {name}"))
    }
}

/// The next batch: waits for one alert, then takes what else is queued. `None`: the queue
/// is closed and empty.
pub(super) fn next_batch(alerts: &mpsc::Receiver<SharedAlert>) -> Option<Vec<SharedAlert>> {
    let first = alerts.recv().ok()?;
    let mut batch = vec![first];
    batch.extend(alerts.try_iter().take(BATCH_ALERTS - 1));
    Some(batch)
}

fn write_stdout(
    format: Format,
    closed: tokio::sync::oneshot::Sender<io::Error>,
    alerts: &mpsc::Receiver<SharedAlert>,
    counters: &SinkCounters,
) {
    let mut writer = AlertWriter::new(format, host_name(), io::stdout());
    while let Some(batch) = next_batch(alerts) {
        if let Err(error) = writer.write_batch(batch.iter().map(|alert| &**alert)) {
            counters.not_written(batch.len());
            // Whoever read stdout is gone (or it broke): srcip stops, as the reader asked.
            let _ = closed.send(error);
            return;
        }
        counters.written(batch.len());
    }
}

/// Appends JSON lines to `path`. When the file is renamed or removed (logrotate), the next
/// batch goes to a new file at `path`. A batch that cannot be written is counted as lost,
/// and the file is reopened for the next.
fn write_file(
    path: &std::path::Path,
    file: File,
    alerts: &mpsc::Receiver<SharedAlert>,
    counters: &SinkCounters,
) {
    let mut writer = Some(AlertWriter::new(Format::Json, host_name(), file));
    let mut failing = false;
    while let Some(batch) = next_batch(alerts) {
        let current = match writer.take() {
            Some(open) if still_at(open.get_ref(), path) => Ok(open),
            _ => open_append(path).map(|file| AlertWriter::new(Format::Json, host_name(), file)),
        };
        let result = current.and_then(|mut open| {
            open.write_batch(batch.iter().map(|alert| &**alert))?;
            writer = Some(open);
            Ok(())
        });
        match result {
            Ok(()) => {
                counters.written(batch.len());
                failing = false;
            }
            Err(error) => {
                counters.not_written(batch.len());
                if !failing {
                    warn!("cannot write alerts to {}: {error}", path.display());
                    failing = true;
                }
            }
        }
    }
}

/// Appending, created when missing (with its folders, as `/var/log/srcip/` on a host that
/// never had one), readable by its owner and group only: alerts name processes, users and
/// addresses.
fn open_append(path: &std::path::Path) -> io::Result<File> {
    if let Some(folder) = path
        .parent()
        .filter(|folder| !folder.as_os_str().is_empty())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(folder)?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Whether `file` is still the file at `path` (not renamed away or removed).
fn still_at(file: &File, path: &std::path::Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_urls_parse_or_say_what_is_expected() {
        assert_eq!(
            "file:/var/log/srcip.json".parse(),
            Ok(SinkSpec::File("/var/log/srcip.json".into()))
        );
        assert_eq!(
            "file:///var/log/srcip.json".parse(),
            Ok(SinkSpec::File("/var/log/srcip.json".into()))
        );
        assert!(
            "file:"
                .parse::<SinkSpec>()
                .unwrap_err()
                .contains("needs a path")
        );
        assert_eq!(
            "syslog+udp://127.0.0.1:514".parse(),
            Ok(SinkSpec::Syslog(SyslogTarget::Udp("127.0.0.1:514".into())))
        );
        assert_eq!(
            "nats://127.0.0.1:4222/srcip.alerts?stream=SRCIP".parse(),
            Ok(SinkSpec::Nats(NatsTarget {
                tls: false,
                server: "127.0.0.1:4222".into(),
                subject: "srcip.alerts".into(),
                stream: "SRCIP".into(),
            }))
        );
        assert_eq!(
            "tls://nats.example.net:4222/srcip?stream=SRCIP".parse(),
            Ok(SinkSpec::Nats(NatsTarget {
                tls: true,
                server: "nats.example.net:4222".into(),
                subject: "srcip".into(),
                stream: "SRCIP".into(),
            }))
        );
        assert!(
            "nats://127.0.0.1:4222/alerts"
                .parse::<SinkSpec>()
                .unwrap_err()
                .contains("stream=NAME")
        );
        assert_eq!(
            "https://hooks.example.net/srcip".parse(),
            Ok(SinkSpec::Webhook(WebhookTarget {
                url: "https://hooks.example.net/srcip".into()
            }))
        );
        assert!(
            "ftp://x"
                .parse::<SinkSpec>()
                .unwrap_err()
                .contains("expected file:PATH")
        );
    }
}
