//! Who is on the other end of the socket, and whether they may use the API.
//!
//! The accept loop reads `SO_PEERCRED` once per connection and attaches a [`Peer`] to
//! every request; [`require_access`] is a layer over the whole router, so every endpoint,
//! present and future, is covered by construction.

use std::os::fd::AsRawFd;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::store::Caller;

/// The peer's credentials as the kernel reported them when it connected.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups at connect time (`SO_PEERGROUPS`), like uid and gid
    /// fixed by the kernel when the peer connected, so no pid can be reused to lie.
    pub groups: Vec<u32>,
    /// `/proc/<pid>/comm`, read once per connection when first needed.
    comm: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl Peer {
    pub fn of(stream: &tokio::net::UnixStream) -> Option<Peer> {
        let cred = stream.peer_cred().ok()?;
        Some(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: peer_groups(stream.as_raw_fd()),
            comm: Default::default(),
        })
    }

    /// The caller as recorded in history; `comm` is read on first use, best effort.
    ///
    /// `comm` is the name the calling process gave itself (`PR_SET_NAME` can set it to
    /// anything): a hint for people reading history, never an identity; `uid`, `gid`
    /// and `pid` are the kernel's. Reading `/proc/<pid>/comm` on an async worker is
    /// safe: procfs answers from kernel memory and cannot be made to block by the
    /// caller (no disk, no FIFO: /proc is mounted by the host, not the caller).
    pub fn caller(&self) -> Caller {
        let comm = self.comm.get_or_init(|| {
            self.pid
                .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
                .map(|s| s.trim_end().to_owned())
                .unwrap_or_default()
        });
        Caller {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid.unwrap_or(0),
            comm: comm.clone(),
        }
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups when it connected.
/// Not in the libc crate for every architecture; 59 is its value on all but mips/sparc.
const SO_PEERGROUPS: libc::c_int = 59;

fn peer_groups(fd: std::os::fd::RawFd) -> Vec<u32> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` is a valid, writable buffer of `len` bytes for the duration of
        // the call, and `len` is a valid socklen_t the kernel updates.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = usize::try_from(len).unwrap_or(0) / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return groups;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            break;
        }
        // Too small: the kernel said how much it needs.
        groups = vec![0; count.max(groups.len() * 2)];
    }
    Vec::new()
}

/// Who may call the API: root, keeld's own user, and members of the API group.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    pub api_gid: Option<u32>,
    pub own_uid: u32,
}

impl AccessPolicy {
    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        match self.api_gid {
            Some(gid) => peer.gid == gid || peer.groups.contains(&gid),
            None => false,
        }
    }
}

/// Middleware: refuses with 403 any request whose peer is not allowed, or unknown.
pub async fn require_access(
    axum::extract::State(policy): axum::extract::State<AccessPolicy>,
    request: Request,
    next: Next,
) -> Response {
    match request.extensions().get::<Peer>() {
        Some(peer) if policy.allows(peer) => {
            let peer = peer.clone();
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let response = next.run(request).await;
            // Every refusal leaves a trace at info: what was asked, by whom, and the
            // key it was about (values are not logged: they may be secrets). A 423 is
            // not a refusal but "busy, ask again" (an update command running), which
            // `apiclient update` asks four times a second: at debug.
            let status = response.status();
            if status.is_client_error() {
                let key = response
                    .extensions()
                    .get::<super::error::Refused>()
                    .and_then(|r| r.key.clone());
                let key = key.as_deref().unwrap_or("-");
                let (code, uid, pid) = (status.as_u16(), peer.uid, peer.pid);
                if status == StatusCode::LOCKED {
                    tracing::debug!(status = code, %method, path, uid, ?pid, key, "request refused");
                } else {
                    tracing::info!(status = code, %method, path, uid, ?pid, key, "request refused");
                }
            }
            response
        }
        Some(peer) => {
            tracing::warn!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "API caller refused");
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "uid {} is not allowed to use the API (root or the API group only)",
                    peer.uid
                ),
            )
            .into_response()
        }
        None => ApiError::new(StatusCode::FORBIDDEN, "caller credentials unknown").into_response(),
    }
}
