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
/// connection (and its task) forever.
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
/// answered (its connection closes after it) within `grace`. Answers whether every
/// connection finished in time.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> bool {
    serve_with(listener, app, shutdown, grace, WRITE_STALL_LIMIT).await
}

/// [`serve`], with the write-stall limit given (tests).
async fn serve_with(
    listener: UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    stall_limit: Duration,
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
        let app = app.clone();
        let mut draining = draining.clone();
        draining.mark_unchanged();
        // Repoll: see its module (each request with a body wakes the connection's own
        // task mid-poll).
        tokio::spawn(super::repoll::Repoll::new(async move {
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
                .serve_connection(TokioIo::new(stream), service)
                // `/exec` upgrades its connection to a WebSocket; the upgraded
                // connection then lives on in its session's task, outside this slot
                // (sessions have their own bound, `exec::MAX_SESSIONS`).
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
