//! `--socket`: the unix socket that `srcip watch` reads, and `srcip watch` itself.
//!
//! Every watcher gets the daemon's `started` line first (what it is attached to), then the
//! `route_drift` of each destination drifting now (a late watcher learns what is wrong
//! already), then every alert as it is delivered. A watcher asks for its format with one
//! line when it connects (`format text` or `format json`); one that says nothing within
//! [`REQUEST_WAIT`] (a plain `socat` or `nc -U`) gets JSON lines. Watchers share one broadcast queue of
//! [`WATCH_BACKLOG`] alerts; one that falls further behind, or whose socket takes nothing for
//! [`STALLED_WRITE`], is cut loose: it is told how many alerts it missed (when it still
//! reads) and disconnected, and the daemon and other watchers go on unaffected.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        UnixListener, UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{Notify, broadcast},
    task::{JoinHandle, JoinSet},
};
use tracing::{debug, info, warn};

use super::{SharedAlert, lost_line};
use crate::{
    alerts::{AlertBody, AlertWriter, host_name},
    check::DestinationCheck,
    output::Format,
};

/// Where `srcip run` listens and `srcip watch` connects unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/srcip/srcip.sock";
/// How far a watcher may fall behind before it is cut loose.
const WATCH_BACKLOG: usize = 4096;
/// A watcher whose socket takes no bytes for this long is cut loose.
const STALLED_WRITE: Duration = Duration::from_secs(60);
/// How long stopping waits for watchers to receive the last lines.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a new watcher has to say which format it wants.
const REQUEST_WAIT: Duration = Duration::from_millis(200);

/// What a watcher attaching now is told before the alerts that follow.
#[derive(Default)]
struct Attached {
    /// The daemon's `started` line.
    started: Option<SharedAlert>,
    /// The latest `route_drift` of each destination drifting now, in the order they began.
    drifting: Vec<SharedAlert>,
}

impl Attached {
    fn note(&mut self, alert: &SharedAlert) {
        match &alert.body {
            AlertBody::Started { .. } => self.started = Some(alert.clone()),
            AlertBody::RouteDrift(check) => {
                match self
                    .drifting
                    .iter_mut()
                    .find(|known| same_destination(known, check))
                {
                    Some(known) => *known = alert.clone(),
                    None => self.drifting.push(alert.clone()),
                }
            }
            AlertBody::RouteRecovered(check) => {
                self.drifting
                    .retain(|known| !same_destination(known, check));
            }
            _ => {}
        }
    }

    fn lines(&self) -> Vec<SharedAlert> {
        self.started.iter().chain(&self.drifting).cloned().collect()
    }
}

/// Whether the drift `known` is about the destination `check` is (its rule, destination,
/// port, protocol, and the program it was predicted for).
fn same_destination(known: &SharedAlert, check: &DestinationCheck) -> bool {
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

pub struct WatchServer {
    socket: SocketFile,
    alerts: broadcast::Sender<SharedAlert>,
    attached: Arc<Mutex<Attached>>,
    shutdown: Arc<Notify>,
    accepting: JoinHandle<()>,
}

impl WatchServer {
    /// Listens on `path`, root-only. Creates its folder (mode 0700) when missing, replaces a
    /// socket left by a daemon that died, and refuses when another daemon listens there.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(folder) = path.parent().filter(|folder| !folder.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder)
                .with_context(|| format!("cannot create {} for --socket", folder.display()))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another srcip run is listening on {}: stop it, or give this one another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {} (--socket)", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} root-only", path.display()))?;
        let (alerts, _) = broadcast::channel(WATCH_BACKLOG);
        let attached = Arc::new(Mutex::new(Attached::default()));
        let shutdown = Arc::new(Notify::new());
        let accepting = tokio::spawn(accept(
            listener,
            alerts.clone(),
            Arc::clone(&attached),
            Arc::clone(&shutdown),
        ));
        info!("srcip watch can attach at {}", path.display());
        Ok(Self {
            socket: SocketFile(path.to_owned()),
            alerts,
            attached,
            shutdown,
            accepting,
        })
    }

    /// Sends `alert` to every watcher; never waits.
    pub fn publish(&self, alert: &SharedAlert) {
        // Noted before it is sent, under the lock `accept` takes: a watcher attaching now
        // gets it either among its first lines or from the queue, never both or neither.
        let mut attached = self
            .attached
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        attached.note(alert);
        // An error only means that nobody watches.
        let _ = self.alerts.send(alert.clone());
        drop(attached);
    }

    /// Stops accepting, lets each watcher write what it was sent (up to a moment), and
    /// removes the socket.
    pub async fn stop(self) {
        self.shutdown.notify_one();
        drop(self.alerts);
        if tokio::time::timeout(STOP_GRACE, self.accepting)
            .await
            .is_err()
        {
            debug!("watchers did not finish in time");
        }
        drop(self.socket);
    }
}

/// The socket's file, bound by this server: removed when the server goes, whether it was
/// stopped or the start failed after the bind (a failed start leaves nothing behind).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.0) {
            warn!("cannot remove the socket {}: {error}", self.0.display());
        }
    }
}

async fn accept(
    listener: UnixListener,
    alerts: broadcast::Sender<SharedAlert>,
    attached: Arc<Mutex<Attached>>,
    shutdown: Arc<Notify>,
) {
    let host: Arc<str> = host_name().into();
    let mut watchers = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.notified() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (first, queue) = {
                        let attached = attached.lock().unwrap_or_else(|poison| poison.into_inner());
                        (attached.lines(), alerts.subscribe())
                    };
                    debug!("a watcher attached");
                    watchers.spawn(serve(stream, first, queue, Arc::clone(&host)));
                }
                Err(error) => warn!("accepting a watcher failed: {error}"),
            },
            // Reap finished watchers as they go.
            Some(_) = watchers.join_next(), if !watchers.is_empty() => {}
        }
    }
    // The queue is closed now: each watcher writes what is left, then ends.
    drop(alerts);
    while watchers.join_next().await.is_some() {}
}

/// One watcher: in the format it asks for, `first` (the `started` line and the drifts now),
/// then every alert, until the daemon stops or the watcher falls behind.
async fn serve(
    stream: UnixStream,
    first: Vec<SharedAlert>,
    mut alerts: broadcast::Receiver<SharedAlert>,
    host: Arc<str>,
) {
    let (request, mut stream) = stream.into_split();
    let format = requested_format(request).await;
    let mut lines = AlertWriter::new(format, host.to_string(), Vec::new());
    let mut pending = first;
    loop {
        let mut missed = None;
        if pending.is_empty() {
            match alerts.recv().await {
                Ok(alert) => pending.push(alert),
                Err(broadcast::error::RecvError::Lagged(count)) => missed = Some(count),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        // Whatever else is queued goes in the same write.
        while missed.is_none() {
            match alerts.try_recv() {
                Ok(alert) => pending.push(alert),
                Err(broadcast::error::TryRecvError::Lagged(count)) => missed = Some(count),
                Err(_) => break,
            }
        }
        if let Some(count) = missed {
            pending.push(lost_line("watch", count));
        }
        if send(&mut stream, &mut lines, &pending).await.is_err() || missed.is_some() {
            debug!("a watcher was cut loose or went away");
            return;
        }
        pending.clear();
    }
}

/// The format a watcher asks for in its first line; JSON when it asks for nothing in time
/// or for something unknown.
async fn requested_format(request: OwnedReadHalf) -> Format {
    let mut line = String::new();
    let mut request = BufReader::new(request.take(64));
    match tokio::time::timeout(REQUEST_WAIT, request.read_line(&mut line)).await {
        Ok(Ok(_)) if line.trim() == TEXT_REQUEST => Format::Text,
        Ok(Ok(_)) if line.trim() == JSON_REQUEST || line.is_empty() => Format::Json,
        Ok(Ok(_)) => {
            debug!("a watcher asked for {line:?}, which is not a format: JSON it is");
            Format::Json
        }
        _ => Format::Json,
    }
}

const TEXT_REQUEST: &str = "format text";
const JSON_REQUEST: &str = "format json";

async fn send(
    stream: &mut OwnedWriteHalf,
    lines: &mut AlertWriter<Vec<u8>>,
    batch: &[SharedAlert],
) -> io::Result<()> {
    lines.write_batch(batch.iter().map(|alert| &**alert))?;
    let bytes = std::mem::take(lines.get_mut());
    match tokio::time::timeout(STALLED_WRITE, stream.write_all(&bytes)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the watcher stopped reading",
        )),
    }
}

/// `srcip watch`: prints the alerts of the daemon listening on `socket` as they come, in
/// `format`, until it stops.
pub fn watch(socket: &Path, format: Format) -> anyhow::Result<()> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|error| match error.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
                "no srcip run is listening on {}: start `srcip run`, or give the --socket it uses",
                socket.display()
            ),
            io::ErrorKind::PermissionDenied => {
                anyhow::anyhow!("{} is root-only: run srcip watch as root", socket.display())
            }
            _ => {
                anyhow::Error::new(error).context(format!("cannot connect to {}", socket.display()))
            }
        })?;
    let request = match format {
        Format::Json => JSON_REQUEST,
        Format::Text => TEXT_REQUEST,
    };
    io::Write::write_all(&mut stream, format!("{request}\n").as_bytes())
        .with_context(|| format!("cannot ask {} for {request}", socket.display()))?;
    let mut stdout = io::stdout().lock();
    match io::copy(
        &mut io::BufReader::new(stream),
        &mut LineFlushing(&mut stdout),
    ) {
        Ok(_) => Ok(()),
        // Whoever read our output is gone (`srcip watch | head`).
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(anyhow::Error::new(error).context("reading from the daemon")),
    }
}

/// Flushes after each write, so that a watcher on a pipe sees each alert when it comes.
struct LineFlushing<'a, W: io::Write>(&'a mut W);

impl<W: io::Write> io::Write for LineFlushing<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.0.write(bytes)?;
        self.0.flush()?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
