//! What keeld knows about each container it runs, as `GET /containers` and
//! `apiclient containers` show it. Written only by the supervisors and the boot runner;
//! each change of a container's state is published as a `container` event.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::events::{ContainerEvent, EventBody, EventBus};

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
    /// Could not be started; `reason` says why. Retried after a back-off, except when the
    /// settings cannot become a container (no `source`): then when they change.
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
    events: EventBus,
}

impl StatusBoard {
    /// An empty board that publishes state changes on `events`.
    pub fn new(events: EventBus) -> Self {
        StatusBoard {
            inner: Default::default(),
            events,
        }
    }

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
        let key = (kind, name.to_owned());
        let before = map.get(&key).map(|s| s.state);
        let entry = map.entry(key).or_insert_with(new);
        change(entry);
        if before != Some(entry.state) {
            // Under the board's lock, so that one container's events keep their order;
            // publishing only takes the bus's own short lock.
            let event = state_change(entry, before, Some(entry.state));
            self.events.publish(EventBody::Container(event));
        }
    }

    pub fn remove(&self, kind: ContainerKind, name: &str) {
        let mut map = self.lock();
        if let Some(gone) = map.remove(&(kind, name.to_owned())) {
            let event = state_change(&gone, Some(gone.state), None);
            self.events.publish(EventBody::Container(event));
        }
    }
}

/// The event of `status`'s container going from `from` to `to` (`None`: no longer
/// tracked).
fn state_change(
    status: &ContainerStatus,
    from: Option<RunState>,
    to: Option<RunState>,
) -> ContainerEvent {
    ContainerEvent {
        name: status.name.clone(),
        container_kind: status.kind,
        from,
        to,
        reason: status.reason.clone(),
        last_exit_code: status.last_exit_code,
        restarts: status.restarts,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::events::{Item, Resume};

    async fn published(events: &EventBus) -> Vec<serde_json::Value> {
        let mut sub = events.subscribe(Resume::Start, false, None).unwrap();
        let mut all = Vec::new();
        while let Some(batch) = sub.next_batch().await {
            all.extend(
                batch
                    .iter()
                    .map(|i: &Item| serde_json::from_slice(&i.line()).unwrap()),
            );
        }
        all
    }

    #[tokio::test]
    async fn a_change_of_state_is_an_event_and_other_changes_are_not() {
        let events = EventBus::new(16);
        let board = StatusBoard::new(events.clone());
        let new = || ContainerStatus::new("admin", ContainerKind::Host, "host", "src");
        board.update(ContainerKind::Host, "admin", |_| {}, new);
        board.update(ContainerKind::Host, "admin", |s| s.pid = Some(4), new);
        board.update(
            ContainerKind::Host,
            "admin",
            |s| {
                s.state = RunState::Exited;
                s.last_exit_code = Some(3);
            },
            new,
        );
        board.remove(ContainerKind::Host, "admin");
        board.remove(ContainerKind::Host, "admin");
        let seen = published(&events).await;
        let states: Vec<_> = seen
            .iter()
            .map(|e| (e["from"].clone(), e["to"].clone()))
            .collect();
        assert_eq!(
            states,
            vec![
                (serde_json::Value::Null, "starting".into()),
                ("starting".into(), "exited".into()),
                ("exited".into(), serde_json::Value::Null),
            ]
        );
        assert_eq!(seen[1]["kind"], "container");
        assert_eq!(seen[1]["name"], "admin");
        assert_eq!(seen[1]["container-kind"], "host");
        assert_eq!(seen[1]["last-exit-code"], 3);
    }
}
