//! What keeld knows about each container it runs, as `GET /containers` and
//! `apiclient containers` show it. Written only by the supervisors and the boot runner.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Host container or bootstrap container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    Host,
    Bootstrap,
}

impl ContainerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerKind::Host => "host",
            ContainerKind::Bootstrap => "bootstrap",
        }
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Getting the image and creating the container.
    Starting,
    Running,
    /// Exited; a host container waits out its back-off before it starts again.
    Exited,
    /// Being stopped (SIGTERM, then SIGKILL after the grace period).
    Stopping,
    /// Stopped because it was disabled.
    Stopped,
    /// Could not be started; `reason` says why. Retried after a back-off.
    Failed,
    /// containerd cannot be reached; keeld retries and re-attaches when it is back.
    WaitingForContainerd,
    /// A bootstrap container that ran to completion with exit code 0.
    Succeeded,
    /// A host container waiting for the boot to be configured.
    WaitingForBoot,
    /// A host container that is not started in this boot, because the boot failed.
    NotStarted,
}

/// One container's status.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ContainerStatus {
    pub name: String,
    pub kind: ContainerKind,
    pub tier: &'static str,
    pub state: RunState,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Starts after the first since keeld started (crash restarts and restarts for
    /// changed settings).
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i32>,
    /// When the container entered `state` (RFC 3339).
    pub since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the next start is due, while backing off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_start: Option<String>,
}

impl ContainerStatus {
    /// A container just entering `starting`, with nothing known yet.
    pub fn new(name: &str, kind: ContainerKind, tier: &'static str, source: &str) -> Self {
        ContainerStatus {
            name: name.to_owned(),
            kind,
            tier,
            state: RunState::Starting,
            source: source.to_owned(),
            image_digest: None,
            pid: None,
            restarts: 0,
            last_exit_code: None,
            since: crate::store::now_rfc3339(),
            reason: None,
            next_start: None,
        }
    }
}

/// The shared table of statuses, keyed by `(kind, name)`.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<BTreeMap<(ContainerKind, String), ContainerStatus>>>,
}

impl StatusBoard {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(ContainerKind, String), ContainerStatus>> {
        // A panic while holding this lock leaves a consistent map (every update is a
        // single insert or field write), so a poisoned lock is safe to use.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every status, host containers first, each kind by name.
    pub fn list(&self) -> Vec<ContainerStatus> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, kind: ContainerKind, name: &str) -> Option<ContainerStatus> {
        self.lock().get(&(kind, name.to_owned())).cloned()
    }

    pub fn find(&self, name: &str) -> Vec<ContainerStatus> {
        self.lock()
            .values()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// Creates or changes one entry.
    pub fn update(
        &self,
        kind: ContainerKind,
        name: &str,
        change: impl FnOnce(&mut ContainerStatus),
        new: impl FnOnce() -> ContainerStatus,
    ) {
        let mut map = self.lock();
        let entry = map.entry((kind, name.to_owned())).or_insert_with(new);
        change(entry);
    }

    pub fn remove(&self, kind: ContainerKind, name: &str) {
        self.lock().remove(&(kind, name.to_owned()));
    }
}
