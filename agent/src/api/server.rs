//! The socket: created with its final mode and group before anyone can connect, then an
//! accept loop that serves each connection on its own task.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tower::ServiceExt;

use super::peer::Peer;

/// A client must send its request head within this time; a slow client cannot hold a
/// connection (and its task) forever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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

/// How long a stopping keeld waits, from the signal, for requests in flight, exec
/// sessions and the applies running or queued (one grace for all of them) before it
/// exits anyway. Below systemd's default stop timeout (90 s).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(45);

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
        tokio::spawn(async move {
            let _slot = slot;
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
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
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
