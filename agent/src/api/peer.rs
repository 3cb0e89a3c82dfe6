//! Who is on the other end of the socket, and whether they may use the API.
//!
//! The accept loop reads `SO_PEERCRED` once per connection and attaches a [`Peer`] to
//! every request; [`require_access`] is a layer over the whole router, so every endpoint,
//! present and future, is covered by construction.

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
            comm: Default::default(),
        })
    }

    /// The caller as recorded in history; `comm` is read on first use, best effort.
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

    /// Supplementary groups from `/proc/<pid>/status`; empty when unreadable.
    fn supplementary_groups(&self) -> Vec<u32> {
        let Some(pid) = self.pid else {
            return Vec::new();
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return Vec::new();
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|groups| {
                groups
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
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
            Some(gid) => peer.gid == gid || peer.supplementary_groups().contains(&gid),
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
        Some(peer) if policy.allows(peer) => next.run(request).await,
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
