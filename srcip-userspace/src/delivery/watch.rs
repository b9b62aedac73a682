//! `--socket`: the unix socket that `srcip watch` and `srcip status` ask, and those two
//! commands.
//!
//! A client says what it wants with one line when it connects: `status json` or
//! `status text` gets the daemon's state (`status.rs`) and the end of the stream;
//! `format json` or `format text` makes it a watcher. Every watcher gets the daemon's `started` line first (what it is attached to), then the
//! `route_drift` of each destination drifting now (a late watcher learns what is wrong
//! already), then every alert as it is delivered. A client that says nothing within
//! [`REQUEST_WAIT`] (a plain `socat` or `nc -U`) is a watcher of JSON lines. Watchers share one broadcast queue of
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

use super::{
    SharedAlert, lost_line,
    status::{DaemonState, SinkInfo},
};
use crate::{
    alerts::{AlertWriter, host_name},
    metrics::Metrics,
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
/// How long `srcip status` waits for the daemon's answer, which takes milliseconds.
const STATUS_WAIT: Duration = Duration::from_secs(10);
/// How long a new watcher has to say which format it wants.
const REQUEST_WAIT: Duration = Duration::from_millis(200);

pub struct WatchServer {
    socket: SocketFile,
    alerts: broadcast::Sender<SharedAlert>,
    state: Arc<Mutex<DaemonState>>,
    shutdown: Arc<Notify>,
    accepting: JoinHandle<()>,
}

impl WatchServer {
    /// Listens on `path`, root-only. Creates its folder (mode 0700) when missing, replaces a
    /// socket left by a daemon that died, and refuses when another daemon listens there.
    /// `metrics` are the daemon's, which `srcip status` reports from.
    pub fn bind(path: &Path, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
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
        let state = Arc::new(Mutex::new(DaemonState::new(metrics)));
        let shutdown = Arc::new(Notify::new());
        let accepting = tokio::spawn(accept(
            listener,
            alerts.clone(),
            Arc::clone(&state),
            Arc::clone(&shutdown),
        ));
        info!("srcip watch can attach at {}", path.display());
        Ok(Self {
            socket: SocketFile(path.to_owned()),
            alerts,
            state,
            shutdown,
            accepting,
        })
    }

    /// The sinks `srcip status` reports on.
    pub fn set_sinks(&self, sinks: Vec<SinkInfo>) {
        lock(&self.state).set_sinks(sinks);
    }

    /// Sends `alert` to every watcher, and notes what it changes in the daemon's state;
    /// never waits.
    pub fn publish(&self, alert: &SharedAlert) {
        // Noted before it is sent, under the lock `accept` takes: a watcher attaching now
        // gets it either among its first lines or from the queue, never both or neither.
        let mut state = lock(&self.state);
        state.note(alert);
        // An error only means that nobody watches.
        let _ = self.alerts.send(alert.clone());
        drop(state);
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

/// The state, also after a panic while it was held: it is only ever noted into.
fn lock(state: &Mutex<DaemonState>) -> std::sync::MutexGuard<'_, DaemonState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn accept(
    listener: UnixListener,
    alerts: broadcast::Sender<SharedAlert>,
    state: Arc<Mutex<DaemonState>>,
    shutdown: Arc<Notify>,
) {
    let host: Arc<str> = host_name().into();
    let mut watchers = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.notified() => break,
            accepted = listener.accept() => match accepted {
                // Subscribed at once, under the lock `publish` takes (see there): a watcher
                // gets every alert from the moment it connected, also those that come while
                // it says what it wants.
                Ok((stream, _)) => {
                    let (first, queue) = {
                        let state = lock(&state);
                        (state.watcher_lines(), alerts.subscribe())
                    };
                    watchers.spawn(serve(stream, first, queue, Arc::clone(&state), Arc::clone(&host)));
                }
                Err(error) => warn!("accepting a client failed: {error}"),
            },
            // Reap finished watchers as they go.
            Some(_) = watchers.join_next(), if !watchers.is_empty() => {}
        }
    }
    // The queue is closed now: each watcher writes what is left, then ends.
    drop(alerts);
    while watchers.join_next().await.is_some() {}
}

/// One client of the socket: a status it asks for, or a watcher, which gets `first` and
/// then what comes in `alerts`.
async fn serve(
    stream: UnixStream,
    first: Vec<SharedAlert>,
    alerts: broadcast::Receiver<SharedAlert>,
    state: Arc<Mutex<DaemonState>>,
    host: Arc<str>,
) {
    let (request, mut stream) = stream.into_split();
    match read_request(request).await {
        Request::Status(format) => {
            drop(alerts);
            let status = lock(&state).render(format, &host);
            debug!("a client asked for the status");
            if let Err(error) = write_within(&mut stream, status.as_bytes()).await {
                debug!("the status could not be sent: {error}");
            }
        }
        Request::Watch(format) => {
            debug!("a watcher attached");
            follow(stream, format, first, alerts, &host).await;
        }
    }
}

/// One watcher: `first` (the `started` line and the drifts now), then every alert, until
/// the daemon stops or the watcher falls behind.
async fn follow(
    mut stream: OwnedWriteHalf,
    format: Format,
    first: Vec<SharedAlert>,
    mut alerts: broadcast::Receiver<SharedAlert>,
    host: &str,
) {
    let mut lines = AlertWriter::new(format, host.to_owned(), Vec::new());
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

/// What a client asks for in its first line.
enum Request {
    /// `format json`, `format text`, or nothing: the alerts, as they come.
    Watch(Format),
    /// `status json` or `status text`: the daemon's state, once.
    Status(Format),
}

impl Request {
    fn line(&self) -> &'static str {
        match self {
            Self::Watch(Format::Json) => "format json",
            Self::Watch(Format::Text) => "format text",
            Self::Status(Format::Json) => "status json",
            Self::Status(Format::Text) => "status text",
        }
    }
}

/// The client's request; JSON alerts when it asks for nothing in time (a plain `socat`) or
/// for something unknown.
async fn read_request(request: OwnedReadHalf) -> Request {
    let mut line = String::new();
    let mut request = BufReader::new(request.take(64));
    let known = [
        Request::Watch(Format::Json),
        Request::Watch(Format::Text),
        Request::Status(Format::Json),
        Request::Status(Format::Text),
    ];
    match tokio::time::timeout(REQUEST_WAIT, request.read_line(&mut line)).await {
        Ok(Ok(_)) => known
            .into_iter()
            .find(|known| known.line() == line.trim())
            .unwrap_or_else(|| {
                if !line.is_empty() {
                    debug!(
                        "a client asked for {line:?}, which srcip does not know: JSON alerts it is"
                    );
                }
                Request::Watch(Format::Json)
            }),
        _ => Request::Watch(Format::Json),
    }
}

async fn send(
    stream: &mut OwnedWriteHalf,
    lines: &mut AlertWriter<Vec<u8>>,
    batch: &[SharedAlert],
) -> io::Result<()> {
    lines.write_batch(batch.iter().map(|alert| &**alert))?;
    let bytes = std::mem::take(lines.get_mut());
    write_within(stream, &bytes).await
}

/// Writes `bytes`, or fails when the client takes none for [`STALLED_WRITE`].
async fn write_within(stream: &mut OwnedWriteHalf, bytes: &[u8]) -> io::Result<()> {
    match tokio::time::timeout(STALLED_WRITE, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )),
    }
}

/// `srcip watch`: prints the alerts of the daemon listening on `socket` as they come, in
/// `format`, until it stops.
pub fn watch(socket: &Path, format: Format) -> anyhow::Result<()> {
    ask(socket, &Request::Watch(format))
}

/// `srcip status`: prints the state of the daemon listening on `socket`, in `format`.
pub fn status(socket: &Path, format: Format) -> anyhow::Result<()> {
    ask(socket, &Request::Status(format))
}

/// Sends `request` to the daemon listening on `socket`, and copies its answer to stdout
/// until the daemon ends it.
fn ask(socket: &Path, request: &Request) -> anyhow::Result<()> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|error| match error.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
                "no srcip run is listening on {}: start `srcip run`, or give the --socket it uses",
                socket.display()
            ),
            io::ErrorKind::PermissionDenied => {
                anyhow::anyhow!("{} is root-only: run srcip as root", socket.display())
            }
            _ => {
                anyhow::Error::new(error).context(format!("cannot connect to {}", socket.display()))
            }
        })?;
    let line = request.line();
    io::Write::write_all(&mut stream, format!("{line}\n").as_bytes())
        .with_context(|| format!("cannot ask {} for {line}", socket.display()))?;
    // A status is answered at once; a daemon that says nothing for long is stuck, and the
    // operator must hear so rather than wait. A watcher's stream may be quiet for hours.
    if matches!(request, Request::Status(_)) {
        stream.set_read_timeout(Some(STATUS_WAIT))?;
    }
    let mut stdout = io::stdout().lock();
    match io::copy(
        &mut io::BufReader::new(stream),
        &mut LineFlushing(&mut stdout),
    ) {
        Ok(_) => Ok(()),
        // Whoever read our output is gone (`srcip watch | head`).
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            anyhow::bail!(
                "the srcip run listening on {} did not answer within {} s: it may be stuck; its log (journalctl -u srcip) may say why",
                socket.display(),
                STATUS_WAIT.as_secs()
            )
        }
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
