//! The socket: created with its final mode and group before anyone can connect, then an
//! accept loop that serves each connection on its own task.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tower::ServiceExt;

use super::peer::Peer;

/// A client must send its request head within this time; a slow client cannot hold a
/// connection (and its task) forever. A new connection's first bytes are waited for up
/// to this long to tell an event stream from the rest, then hyper waits up to this long
/// for the whole head: a first request has at most twice this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A client that accepts none of an answer for this long is taken to be gone, and its
/// connection is closed. hyper reads no further request while its answers wait to be
/// written, so without this a client that sends requests and never reads would hold a
/// connection slot for ever ([`HEADER_TIMEOUT`] never starts). A followed event
/// stream whose reader stalls this long is cut the same way (apiclient resumes it from
/// its cursor); an idle stream writes nothing and is not affected. Upgraded connections (exec
/// sessions) are not bound: a paused terminal is not a gone client.
pub const WRITE_STALL_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
}

/// Binds `path` with `mode` and group `gid`. The socket is bound under a temporary name,
/// given its mode and owner, and only then renamed into place, so there is no moment at
/// which it is reachable with looser permissions.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, SocketError> {
    let io = |what, source| SocketError::Io {
        path: path.to_owned(),
        what,
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create parent directory", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.to_owned()))
        }
        _ => {}
    }
    let temp = path.with_extension("sock.new");
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("chmod", e))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&temp, None, Some(gid)).map_err(|e| io("chown", e))?;
    }
    std::fs::rename(&temp, path).map_err(|e| io("rename into place", e))?;
    // Checked once more in place: what clients find is what keeld enforces.
    correct_socket(path, mode, gid).map_err(|e| io("check", e))?;
    Ok(listener)
}

/// The descriptors systemd passed (socket activation), taken from the environment.
///
/// [`Activation::take`] must run in `main` before any thread exists: it reads and
/// unsets `LISTEN_PID`/`LISTEN_FDS`, and changing the environment while other threads
/// may read it is undefined behaviour in glibc.
#[derive(Debug, Default)]
pub struct Activation {
    fd: Option<std::os::fd::OwnedFd>,
}

impl Activation {
    /// Takes the first descriptor systemd passed, if any. `listen_fds` checks
    /// `LISTEN_PID` and unsets the variables, so children never see them; no
    /// variables, no sockets.
    pub fn take() -> Self {
        use std::os::fd::FromRawFd;
        let fd = sd_notify::listen_fds()
            .ok()
            .and_then(|mut fds| fds.next())
            // SAFETY: systemd hands the descriptors from 3 on (LISTEN_FDS of them) to
            // this process alone, listen_fds validated LISTEN_PID, and the first one
            // is wrapped exactly once, here; `take` runs once, in main.
            .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        Activation { fd }
    }
}

/// The socket systemd passed (socket activation: `keeld.socket`), if any. systemd keeps
/// that socket, and so its inode, across keeld restarts: a container that has it
/// bind-mounted at `/run/api.sock` keeps a working socket, and clients queue in its
/// backlog while keeld restarts. `path` must be where that socket lives.
pub fn inherited(path: &Path, activation: Activation) -> Result<Option<UnixListener>, SocketError> {
    let io = |what, source| SocketError::Io {
        path: path.to_owned(),
        what,
        source,
    };
    let Some(fd) = activation.fd else {
        return Ok(None);
    };
    let listener = std::os::unix::net::UnixListener::from(fd);
    let local = listener
        .local_addr()
        .map_err(|e| io("inspect the inherited socket", e))?;
    if local.as_pathname() != Some(path) {
        return Err(io(
            "use the inherited socket",
            io::Error::other(format!(
                "systemd passed a socket bound to {:?}, not to --socket",
                local.as_pathname()
            )),
        ));
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| io("set the inherited socket non-blocking", e))?;
    UnixListener::from_std(listener)
        .map(Some)
        .map_err(|e| io("register the inherited socket", e))
}

/// How often the socket's mode and group are checked after start-up.
pub const SOCKET_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Puts the socket's mode and group back when something changed them (a stray
/// `chmod 666 /run/api.sock` would let every local user in as far as the kernel is
/// concerned; the peer check still refuses them, but the file should say what keeld
/// enforces). Answers whether anything had to be corrected.
pub fn correct_socket(path: &Path, mode: u32, gid: Option<u32>) -> io::Result<bool> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // Everything goes through one descriptor of the socket's inode (`O_PATH`, never
    // following a link): what is checked is what is changed, even if the name is
    // replaced in between. chmod/chown reach that inode through /proc/self/fd.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = handle.metadata()?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::other("no longer a socket"));
    }
    let by_fd = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&handle)
    ));
    let mut corrected = false;
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(&by_fd, std::fs::Permissions::from_mode(mode))?;
        corrected = true;
    }
    if let Some(gid) = gid {
        if meta.gid() != gid {
            std::os::unix::fs::chown(&by_fd, None, Some(gid))?;
            corrected = true;
        }
    }
    Ok(corrected)
}

/// Checks the socket every [`SOCKET_CHECK_INTERVAL`] and corrects its mode and group.
pub async fn guard_socket(path: std::path::PathBuf, mode: u32, gid: Option<u32>) {
    let mut tick = tokio::time::interval(SOCKET_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        match correct_socket(&path, mode, gid) {
            Ok(true) => {
                tracing::warn!(socket = %path.display(), mode = format!("{mode:o}"), ?gid, "the API socket's mode or group had been changed; corrected")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot check the API socket")
            }
        }
    }
}

/// Most connections served at once; further clients wait in the listen backlog until one
/// closes, so that keeld never runs out of file descriptors for its own state.
pub const MAX_CONNECTIONS: usize = 512;

/// Serves `app` on `listener` until `shutdown` completes, then drains: no new
/// connection is accepted, idle connections are closed, and a request in flight is
/// answered (its connection closes after it) within `grace`. Connections that open
/// with `GET /events` are served on `streams` ([`StreamThread`]), if given. Answers
/// whether every connection finished in time.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    streams: Option<&StreamThread>,
) -> bool {
    serve_with(listener, app, shutdown, grace, WRITE_STALL_LIMIT, streams).await
}

/// [`serve`], with the write-stall limit given (tests).
async fn serve_with(
    listener: UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    stall_limit: Duration,
    streams: Option<&StreamThread>,
) -> bool {
    tokio::pin!(shutdown);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (drain, draining) = tokio::sync::watch::channel(false);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer = Peer::of(&stream);
        let connection = Connection {
            slot,
            peer,
            app: app.clone(),
            draining: {
                let mut draining = draining.clone();
                draining.mark_unchanged();
                draining
            },
            stall_limit,
        };
        let streams = streams.map(|s| s.handle.clone());
        // Repoll: see its module (each request with a body wakes the connection's own
        // task mid-poll).
        tokio::spawn(super::repoll::Repoll::new(async move {
            // Event streams are served on the stream thread, if there is one.
            if let Some(streams) = streams {
                match opening(&stream).await {
                    Opening::EventStream => {
                        let moved = stream.into_std().map(|stream| {
                            streams.spawn(async move {
                                // Registered with the stream thread's reactor here.
                                match tokio::net::UnixStream::from_std(stream) {
                                    Ok(stream) => connection.serve(stream, KeepAlive::No).await,
                                    Err(e) => tracing::warn!(error = %e, "cannot serve an event stream on its thread"),
                                }
                            })
                        });
                        if let Err(e) = moved {
                            tracing::warn!(error = %e, "cannot move an event stream to its thread");
                        }
                        return;
                    }
                    Opening::Silent => return,
                    Opening::Other => {}
                }
            }
            connection.serve(stream, KeepAlive::Yes).await;
        }));
    }
    // Stop accepting: clients now wait in the backlog (of systemd's socket, for the
    // next keeld) or get ECONNREFUSED.
    drop(listener);
    let _ = drain.send(true);
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    let finished = tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_ok();
    match finished {
        true => true,
        false => {
            tracing::warn!(
                grace = ?grace,
                open = MAX_CONNECTIONS - slots.available_permits(),
                "connections still open after the shutdown grace; stopping anyway"
            );
            false
        }
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    /// Held while the connection is served: [`MAX_CONNECTIONS`].
    slot: tokio::sync::OwnedSemaphorePermit,
    peer: Option<Peer>,
    app: Router,
    draining: tokio::sync::watch::Receiver<bool>,
    stall_limit: Duration,
}

impl Connection {
    /// Serves HTTP/1.1 on `stream` until the client closes it, it stalls, or keeld
    /// drains (the request in flight is answered first); with [`KeepAlive::No`], only
    /// the first request.
    async fn serve(self, stream: tokio::net::UnixStream, keep_alive: KeepAlive) {
        let Connection {
            slot,
            peer,
            app,
            mut draining,
            stall_limit,
        } = self;
        let _slot = slot;
        let stream = StallLimit::new(stream, stall_limit);
        let http = stream.bound();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                if let Some(peer) = &peer {
                    request.extensions_mut().insert(peer.clone());
                }
                app.clone().oneshot(request)
            },
        );
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(keep_alive == KeepAlive::Yes)
            .serve_connection(TokioIo::new(stream), service)
            // `/exec` upgrades its connection to a WebSocket; the upgraded connection
            // then lives on in its session's task, outside this slot (sessions have
            // their own bound, `exec::MAX_SESSIONS`).
            .with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = async move {
                // The guard `wait_for` answers is not Send: drop it at once.
                let _ = draining.wait_for(|d| *d).await.map(|_| ());
            } => {
                // Finish the request in flight, if any, then close.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        // Served, or upgraded: an upgraded connection lives on unbound.
        http.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// How a request that opens an event stream begins.
const EVENT_STREAM_REQUEST: &[u8] = b"GET /events";

/// Whether a connection serves requests after its first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeepAlive {
    Yes,
    /// Event streams, on the stream thread: the answer says `Connection: close`, so a
    /// client's next request comes on a new connection, served where it belongs. (A
    /// commit on the stream thread would hold every follower behind its fsync, and
    /// make that low-priority thread the store's writer for the commits of others.)
    No,
}

/// What a connection's first bytes say it is.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    /// `GET /events…`: served on the stream thread.
    EventStream,
    /// Anything else, or a connection that closed or failed: hyper answers it (or
    /// notices it is gone) as usual.
    Other,
    /// Nothing within [`HEADER_TIMEOUT`]: closed, as hyper would close it.
    Silent,
}

/// Reads how the connection's first request begins without taking the bytes (hyper
/// reads them next), waiting for them up to [`HEADER_TIMEOUT`].
async fn opening(stream: &tokio::net::UnixStream) -> Opening {
    let peek = async {
        let mut first = [0u8; EVENT_STREAM_REQUEST.len()];
        loop {
            let Ok(ready) = stream.ready(tokio::io::Interest::READABLE).await else {
                return Opening::Other;
            };
            let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
                let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
                let (got, _) = rustix::net::recv(stream, &mut first[..], flags)?;
                let partial =
                    got > 0 && got < first.len() && EVENT_STREAM_REQUEST.starts_with(&first[..got]);
                if partial && !ready.is_read_closed() {
                    // Only the start of it so far: wait for more. The readiness this
                    // clears is set again by the next bytes to arrive (tokio clears it
                    // only if no readiness came in since it was read). A peer that
                    // closed its side sends no more (and its closed state is never
                    // cleared: waiting would spin): hyper reads what there is.
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(got)
            });
            match peeked {
                Ok(got) if first[..got] == *EVENT_STREAM_REQUEST => return Opening::EventStream,
                Ok(_) => return Opening::Other,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Opening::Other,
            }
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, peek)
        .await
        .unwrap_or(Opening::Silent)
}

/// The thread that serves event streams (connections that open with `GET /events`), on
/// a runtime of its own at a lower CPU priority ([`STREAM_NICENESS`]); the event bus
/// wakes its followers there too (`EventBus::wake_followers_on`).
///
/// Why: a commit fans out to every follower at once, a hundred socket writes in a burst.
/// On the workers that serve the API, that burst queued the commits arriving during it
/// behind it; on a thread of its own, the kernel's scheduler runs a commit's request
/// first and the burst in the time left over. Followers still get every event, in order,
/// paced as before (the events module); only the CPU they cost is second to commits.
pub struct StreamThread {
    handle: tokio::runtime::Handle,
    /// Dropped to stop the thread; its runtime then drops the streams still open.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// How much lower than keeld's other threads the stream thread runs, in `nice` steps.
/// Measured with the events bench (100 followers, 8 committing clients; commits' rate
/// with followers over without, per run): at 0 (a thread of its own alone) 0.85–0.86,
/// at 5 0.89, at 10 0.87–0.97 over twelve runs (median 0.92), at 19 0.89–0.90.
const STREAM_NICENESS: i32 = 10;

impl StreamThread {
    /// Where its tasks run.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Starts the thread, or, if it cannot be started, says so and answers `None`:
    /// event streams are then served beside every other connection. Never waits for
    /// the thread: its runtime is built here and handed to it.
    pub fn start() -> Option<StreamThread> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let started = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .and_then(|runtime| {
                let handle = runtime.handle().clone();
                let runtime = Unstarted(Some(runtime));
                std::thread::Builder::new()
                    .name("keel-events".to_owned())
                    .spawn(move || {
                        // PRIO_PROCESS of the calling thread: on Linux, this thread
                        // only. Relative to keeld's own niceness (its unit may set one);
                        // lowering a priority needs no privilege.
                        let lowered =
                            rustix::process::getpriority_process(None).and_then(|now| {
                                rustix::process::setpriority_process(
                                    None,
                                    (now + STREAM_NICENESS).min(19),
                                )
                            });
                        if let Err(e) = lowered {
                            tracing::warn!(error = %e, "cannot lower the event-stream thread's priority");
                        }
                        if let Some(runtime) = runtime.take() {
                            runtime.block_on(async move {
                                let _ = stopped.await;
                            });
                        }
                    })
                    .map(|_| handle)
            });
        match started {
            Ok(handle) => Some(StreamThread {
                handle,
                _stop: stop,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no thread of its own for event streams; serving them beside the API");
                None
            }
        }
    }
}

/// A runtime on its way to the thread that runs it. Should the thread not start, it is
/// dropped where `start` was called, inside keeld's own runtime, where dropping a runtime
/// the usual way (waiting for its blocking threads) panics: it is shut down in the
/// background instead. It has run nothing yet, so nothing is cut short.
struct Unstarted(Option<tokio::runtime::Runtime>);

impl Unstarted {
    fn take(mut self) -> Option<tokio::runtime::Runtime> {
        self.0.take()
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A connection's stream whose writes fail with `TimedOut` once one has made no progress
/// for the limit ([`WRITE_STALL_LIMIT`]), while the connection is bound (see
/// [`StallLimit::bound`]). hyper then closes the connection and frees its slot.
struct StallLimit<S> {
    inner: S,
    limit: Duration,
    /// Set while a write is waiting for the client: when it gives up.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    bound: Arc<AtomicBool>,
}

impl<S> StallLimit<S> {
    fn new(inner: S, limit: Duration) -> Self {
        StallLimit {
            inner,
            limit,
            stalled: None,
            bound: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether the limit holds; cleared once the connection is no longer plain HTTP.
    fn bound(&self) -> Arc<AtomicBool> {
        self.bound.clone()
    }

    /// After a write-side poll: progress clears the stall; `Pending` starts it (or
    /// checks it), and a stall past the limit becomes the answer.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() || !self.bound.load(Ordering::Relaxed) {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = None;
                tracing::info!(limit = ?limit, "closing a connection whose client read none of its answer");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing for the write-stall limit",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream thread's runtime that never reached its thread is dropped inside keeld's
    /// runtime without the panic a plain drop of a runtime there is.
    #[tokio::test]
    async fn a_runtime_whose_thread_never_started_drops_quietly_inside_a_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // A plain drop here, inside a runtime, panics (it would wait for blocking
        // threads such as this one).
        drop(runtime.spawn_blocking(|| std::thread::sleep(Duration::from_millis(50))));
        drop(Unstarted(Some(runtime)));
    }

    /// 64 KiB per answer: a few fill the socket's buffers.
    fn big_answers() -> Router {
        Router::new().route(
            "/big",
            axum::routing::get(|| async { vec![b'x'; 64 * 1024] }),
        )
    }

    /// A listener in a temporary directory, served with a 60 s stall limit under paused
    /// time, and a connected client.
    async fn serving() -> (
        tempfile::TempDir,
        tokio::net::UnixStream,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<bool>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            listener,
            big_answers(),
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
            Duration::from_secs(60),
            None,
        ));
        let client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        (dir, client, stop, server)
    }

    const REQUESTS: usize = 200;

    async fn send_requests(client: &mut tokio::net::UnixStream) {
        let request = b"GET /big HTTP/1.1\r\nHost: keel\r\n\r\n".repeat(REQUESTS);
        client.write_all(&request).await.expect("requests");
    }

    /// Reads, pausing between reads, until end-of-file or every answer arrived; gives up
    /// after 2 hours of the paused clock. Answers how many answers arrived, and
    /// whether the connection ended.
    async fn read_answers(client: &mut tokio::net::UnixStream, pause: Duration) -> (usize, bool) {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 4 << 20];
        let answers = |all: &[u8]| all.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count();
        let read = async {
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
                if answers(&all) == REQUESTS && all.ends_with(&[b'x'; 64 * 1024]) {
                    return false;
                }
                tokio::time::sleep(pause).await;
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(7200), read)
            .await
            .unwrap_or(false);
        (answers(&all), ended)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_none_of_its_answers_is_cut_and_frees_its_slot() {
        let (_dir, mut client, stop, server) = serving().await;
        send_requests(&mut client).await;
        // Nothing read for longer than the limit.
        tokio::time::sleep(Duration::from_secs(61)).await;
        let (answers, ended) = read_answers(&mut client, Duration::ZERO).await;
        assert!(
            ended && answers < REQUESTS,
            "{answers} answers; the connection was not cut"
        );
        // Its slot is free: the drain finds no connection left.
        let _ = stop.send(());
        assert!(server.await.expect("server"), "a connection was still open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_gets_every_answer() {
        let (_dir, mut client, stop, server) = serving().await;
        send_requests(&mut client).await;
        // A read every 20 s, of all there is: the server's writes progress within the
        // limit. (A unix socket's writer wakes only once the queue drained to a quarter
        // of its buffer: a reader taking little at a time can leave it stalled.)
        let (answers, ended) = read_answers(&mut client, Duration::from_secs(20)).await;
        assert_eq!((answers, ended), (REQUESTS, false), "cut before the end");
        let _ = stop.send(());
        let _ = server.await;
    }

    /// Answers which thread served the request, and at what niceness.
    fn where_served() -> Router {
        let answer = || async {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            let nice = rustix::process::getpriority_process(None).expect("getpriority");
            format!("{name} {nice}")
        };
        Router::new()
            .route("/events", axum::routing::get(answer))
            .route("/settings", axum::routing::get(answer))
            .route("/evidence", axum::routing::get(answer))
    }

    /// Sends `parts` with a pause between them, then reads the one answer's body.
    async fn served_by(path: &Path, parts: &[&str]) -> String {
        let mut client = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect");
        for part in parts {
            client.write_all(part.as_bytes()).await.expect("request");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("answer");
        let (_, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
        body.to_owned()
    }

    #[tokio::test]
    async fn event_streams_are_served_on_their_own_thread_at_a_lower_priority() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let streams = StreamThread::start().expect("stream thread");
        let server = tokio::spawn(async move {
            serve_with(
                listener,
                where_served(),
                async move {
                    let _ = stopped.await;
                },
                Duration::from_secs(5),
                Duration::from_secs(60),
                Some(&streams),
            )
            .await
        });
        let base = rustix::process::getpriority_process(None).expect("getpriority");
        let lowered = format!("keel-events {}", (base + STREAM_NICENESS).min(19));
        let close = "HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n";
        // Whole, and in pieces that split the part that tells it apart.
        let whole = format!("GET /events?follow=true {close}");
        assert_eq!(served_by(&path, &[&whole]).await, lowered);
        assert_eq!(
            served_by(&path, &["G", "ET /ev", &format!("ents {close}")]).await,
            lowered
        );
        // Everything else is served by the API's workers, at keeld's priority.
        for parts in [
            vec![format!("GET /settings {close}")],
            vec!["GET /".to_owned(), format!("settings {close}")],
            // Began as if it were one.
            vec!["GET /ev".to_owned(), format!("idence {close}")],
        ] {
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            let served = served_by(&path, &parts).await;
            assert!(
                !served.starts_with("keel-events") && served.ends_with(&format!(" {base}")),
                "{parts:?} served by {served}"
            );
        }
        // One request per connection on the stream thread: a second one, sent with the
        // first, is not served there; the answer says to reconnect.
        let mut client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let two = "GET /events HTTP/1.1\r\nHost: keel\r\n\r\nGET /settings HTTP/1.1\r\nHost: keel\r\n\r\n";
        client.write_all(two.as_bytes()).await.expect("requests");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("answer");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
        assert!(
            answer.contains("connection: close") && answer.ends_with(&lowered),
            "{answer}"
        );
        // The start of an event stream's request, then the client's side closed: no
        // wait for the rest (which would spin on the closed state until the header
        // timeout), hyper answers what there is at once.
        let mut client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        client.write_all(b"GET /ev").await.expect("request");
        client.shutdown().await.expect("shutdown");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut answer))
            .await
            .expect("closed at once")
            .expect("read");
        // A connection that closes at once, before a byte, harms nothing.
        drop(
            tokio::net::UnixStream::connect(&path)
                .await
                .expect("connect"),
        );
        let _ = stop.send(());
        assert!(server.await.expect("server"), "a connection was still open");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unbound_stream_waits_as_long_as_its_reader() {
        let (mut keeld, mut client) = tokio::io::duplex(1024);
        let mut keeld = StallLimit::new(&mut keeld, Duration::from_secs(60));
        keeld.bound().store(false, Ordering::Relaxed);
        let write = keeld.write_all(&[0u8; 4096]);
        tokio::pin!(write);
        assert!(
            tokio::time::timeout(Duration::from_secs(600), write.as_mut())
                .await
                .is_err(),
            "an unbound write gave up"
        );
        let mut all = vec![0u8; 4096];
        let (written, read) = tokio::join!(write, client.read_exact(&mut all));
        written.expect("written once read");
        read.expect("read");
    }
}
