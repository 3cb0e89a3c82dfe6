//! One supervisor task per host container: it makes containerd match what the settings
//! want for that container, and keeps it so.
//!
//! - On start it looks first: a running task whose record carries the same config hash
//!   is re-attached (a keeld restart never restarts healthy containers); anything else
//!   is stopped and recreated.
//! - An exited container is started again after a back-off that doubles up to a cap,
//!   and resets once a run lasted long enough.
//! - A failure to get the image or start the task is shown as `failed` with its reason
//!   and retried on the same back-off.
//! - containerd going away is not the container's failure: the supervisor waits for it
//!   and re-attaches (the shim, and so the container, outlives containerd).
//! - New settings for this container (a different config hash) stop it (SIGTERM, grace
//!   period, SIGKILL) and start it again; settings that do not change its hash do
//!   nothing. Disabled or removed: stopped, and record, snapshot and user-data removed;
//!   a removal that fails is shown as `failed` and retried on the back-off.
//! - A task that exited while keeld was away counts as an exit seen: its code is
//!   recorded and its restart waits the back-off.
//! - When keeld itself stops, supervisors just end: containers keep running.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

use super::desired::DesiredContainer;
use super::registry::RegistryConfig;
use super::runtime::{RunError, Runtime};
use super::status::{ContainerKind, ContainerStatus, RunState, StatusBoard};

/// Timings of supervision.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorConfig {
    /// Between SIGTERM and SIGKILL when stopping.
    pub grace: Duration,
    /// First delay before restarting an exited or failed container.
    pub backoff_initial: Duration,
    /// The delay doubles up to this.
    pub backoff_max: Duration,
    /// A run at least this long resets the delay to `backoff_initial`.
    pub backoff_reset_after: Duration,
    /// How often to look for containerd while it is away.
    pub containerd_poll: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            grace: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            backoff_reset_after: Duration::from_secs(60),
            containerd_poll: Duration::from_secs(1),
        }
    }
}

/// Exponential back-off: initial, ×2 each time, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now; the one after is twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next.min(self.max);
        self.next = now.saturating_mul(2).min(self.max);
        now
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// What a supervisor follows: its container's desired state (`None` = remove it) and
/// the registry configuration for pulls.
pub struct Inputs {
    pub desired: watch::Receiver<Option<DesiredContainer>>,
    pub registries: watch::Receiver<Arc<RegistryConfig>>,
}

/// Runs until keeld stops (the desired sender is dropped).
pub async fn supervise<R: Runtime>(
    runtime: Arc<R>,
    board: StatusBoard,
    config: SupervisorConfig,
    kind: ContainerKind,
    name: String,
    mut inputs: Inputs,
) {
    let status = Reporter {
        board: board.clone(),
        kind,
        name: name.clone(),
    };
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let mut started_before = false;
    // The reason last logged for settings that cannot become a container: said once,
    // not at every retry of a removal.
    let mut broken_said: Option<String> = None;
    loop {
        let desired = inputs.desired.borrow_and_update().clone();
        let Some(desired) = desired else {
            // Removed or disabled: clean up, then idle until enabled again (the
            // supervisor stays, so there is never a second one for the same name).
            if !remove(
                &*runtime,
                &status,
                &config,
                &mut backoff,
                kind,
                &name,
                &mut inputs,
            )
            .await
            {
                return;
            }
            if inputs.desired.borrow().is_none() && inputs.desired.changed().await.is_err() {
                return;
            }
            started_before = false;
            backoff.reset();
            continue;
        };
        status.init(&desired);
        let id = desired.id();
        // Settings that cannot become this container (no source, undecodable user-data):
        // it is not created, a container made from earlier settings does not go on
        // running in its place, and its status says why until the settings change.
        let hash = match desired.config_hash() {
            Ok(hash) => {
                broken_said = None;
                hash
            }
            Err(e) => {
                let reason = e.to_string();
                if broken_said.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(container = %id, reason = %reason, "its settings cannot become a container");
                    broken_said = Some(reason.clone());
                }
                let cleared = match runtime.find(&id).await {
                    Ok(None) => Ok(()),
                    Ok(Some(_)) => {
                        status.state(RunState::Stopping, None);
                        match runtime.stop(&id, config.grace).await {
                            Ok(_) => runtime.remove(kind, &name).await,
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                // Nothing but new settings can change the reason; a removal that failed is
                // tried again, after containerd's poll when it is away, else after the
                // back-off, and the status says so.
                let (shown, retry) = match &cleared {
                    Ok(()) => (reason, None),
                    Err(err) if err.is_unavailable() => (reason, Some(config.containerd_poll)),
                    Err(err) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(container = %id, error = %err, retry_in = ?delay, "cannot remove the container its earlier settings made");
                        (
                            format!("{reason}; the container its earlier settings made cannot be removed: {err}"),
                            Some(delay),
                        )
                    }
                };
                status.state(RunState::Failed, Some(shown));
                let more = match retry {
                    None => inputs.desired.changed().await.is_ok(),
                    Some(delay) => pause(&mut inputs.desired, delay).await,
                };
                if !more {
                    return;
                }
                if retry.is_none() {
                    // New settings: a first start, as after a disable.
                    started_before = false;
                    backoff.reset();
                }
                continue;
            }
        };

        let existing = match runtime.find(&id).await {
            Ok(e) => e,
            Err(e) => {
                let delay = status.failed(&e, &config, &mut backoff);
                if !pause(&mut inputs.desired, delay).await {
                    return;
                }
                continue;
            }
        };
        let mut attached = None;
        if let Some(existing) = existing {
            match existing.task {
                Some(task)
                    if task.running && !task.created_only && existing.config_hash == hash =>
                {
                    tracing::info!(container = %id, pid = task.pid, "re-attached to the running container");
                    status.set(|s| {
                        s.image_digest =
                            Some(existing.image_digest.clone()).filter(|d| !d.is_empty());
                        // Whatever kept it from running (waiting for the boot or for
                        // containerd) is over: a re-attach does not pass `starting`.
                        s.reason = None;
                    });
                    attached = Some(task.pid);
                    started_before = true;
                }
                Some(task) if !task.running => {
                    // It exited while keeld was away: recorded as an exit seen here,
                    // and restarted after the same back-off (a container that crashes
                    // at once must not restart at full speed across keeld restarts).
                    let code = task.exit_status as i32;
                    if let Err(e) = runtime.delete_task(&id).await {
                        let delay = status.failed(&e, &config, &mut backoff);
                        if !pause(&mut inputs.desired, delay).await {
                            return;
                        }
                        continue;
                    }
                    started_before = true;
                    if existing.config_hash == hash {
                        let delay = backoff.next_delay();
                        tracing::warn!(container = %id, exit_code = code, restart_in = ?delay, "exited while keeld was away");
                        status.exited(code, delay);
                        if !pause(&mut inputs.desired, delay).await {
                            return;
                        }
                        continue;
                    }
                    // Its settings changed meanwhile: recreated now, as a running one
                    // would be.
                    tracing::info!(container = %id, exit_code = code, "exited while keeld was away; settings changed");
                    status.set(|s| s.last_exit_code = Some(code));
                }
                Some(_) => {
                    status.state(RunState::Stopping, None);
                    if let Err(e) = runtime.stop(&id, config.grace).await {
                        let delay = status.failed(&e, &config, &mut backoff);
                        if !pause(&mut inputs.desired, delay).await {
                            return;
                        }
                        continue;
                    }
                }
                None => {}
            }
        }

        let pid = match attached {
            Some(pid) => pid,
            None => {
                status.state(RunState::Starting, None);
                let registries = inputs.registries.borrow().clone();
                let started = async {
                    let prepared = runtime.prepare(&desired, &registries).await?;
                    status.set(|s| s.image_digest = Some(prepared.image_digest.clone()));
                    let pid = runtime.start(&id).await?;
                    Ok::<_, RunError>((pid, prepared.fetch_failed))
                }
                .await;
                match started {
                    Ok((pid, fetch_failed)) => {
                        if started_before {
                            status.set(|s| s.restarts += 1);
                        }
                        started_before = true;
                        // Why, in full: a registry that failed a digest check must not
                        // look like one that was down.
                        let note = fetch_failed.map(|why| {
                            let why: String = why.chars().take(2000).collect();
                            format!("image fetch failed, running the cached image: {why}")
                        });
                        tracing::info!(container = %id, pid, "started");
                        status.set(|s| s.reason = note);
                        pid
                    }
                    Err(e) => {
                        let delay = status.failed(&e, &config, &mut backoff);
                        if !pause(&mut inputs.desired, delay).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        status.running(pid);

        // Run until the task exits or this container's settings change.
        let began = Instant::now();
        let wait = runtime.wait(&id);
        tokio::pin!(wait);
        let outcome = loop {
            tokio::select! {
                exited = &mut wait => break Some(exited),
                changed = inputs.desired.changed() => {
                    if changed.is_err() {
                        // keeld is stopping: the container keeps running.
                        return;
                    }
                    let same = matches!(
                        inputs.desired.borrow().as_ref().map(DesiredContainer::config_hash),
                        Some(Ok(new)) if new == hash
                    );
                    if !same {
                        break None;
                    }
                }
            }
        };
        match outcome {
            None => {
                tracing::info!(container = %id, "settings changed; stopping");
                status.state(RunState::Stopping, None);
                match runtime.stop(&id, config.grace).await {
                    Ok(code) => status.set(|s| s.last_exit_code = code.or(s.last_exit_code)),
                    Err(e) => tracing::warn!(container = %id, error = %e, "stop failed"),
                }
                backoff.reset();
            }
            Some(Ok(code)) => {
                let _ = runtime.delete_task(&id).await;
                if began.elapsed() >= config.backoff_reset_after {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(container = %id, exit_code = code, restart_in = ?delay, "exited");
                status.exited(code, delay);
                if !pause(&mut inputs.desired, delay).await {
                    return;
                }
            }
            Some(Err(e)) => {
                let delay = status.failed(&e, &config, &mut backoff);
                if !pause(&mut inputs.desired, delay).await {
                    return;
                }
            }
        }
    }
}

/// Stops and removes the container, retrying while containerd is away and, on the
/// same back-off as a failed start, while the removal fails (the container is then
/// shown as `failed` with the reason: it may still run). `false` when keeld is
/// stopping.
async fn remove<R: Runtime>(
    runtime: &R,
    status: &Reporter,
    config: &SupervisorConfig,
    backoff: &mut Backoff,
    kind: ContainerKind,
    name: &str,
    inputs: &mut Inputs,
) -> bool {
    let id = super::desired::container_id(kind, name);
    loop {
        if status.exists() {
            status.state(RunState::Stopping, None);
        }
        let stopped = runtime.stop(&id, config.grace).await;
        let removed = match stopped {
            Ok(_) => runtime.remove(kind, name).await,
            Err(e) => Err(e),
        };
        let delay = match removed {
            Ok(()) => {
                tracing::info!(container = %id, "stopped and removed");
                status.remove();
                return true;
            }
            Err(e) if e.is_unavailable() => {
                status.state(RunState::WaitingForContainerd, Some(e.to_string()));
                config.containerd_poll
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(container = %id, error = %e, retry_in = ?delay, "removal failed");
                status.state(RunState::Failed, Some(format!("cannot remove it: {e}")));
                delay
            }
        };
        if !pause(&mut inputs.desired, delay).await {
            return false;
        }
        if inputs.desired.borrow().is_some() {
            // Enabled again meanwhile: the main loop recreates it anyway.
            return true;
        }
    }
}

/// Sleeps `delay`, waking early when the desired state changes. `false` when keeld is
/// stopping.
async fn pause(desired: &mut watch::Receiver<Option<DesiredContainer>>, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        changed = desired.changed() => changed.is_ok(),
    }
}

/// Writes one container's entry on the status board.
struct Reporter {
    board: StatusBoard,
    kind: ContainerKind,
    name: String,
}

impl Reporter {
    fn blank(&self, desired: Option<&DesiredContainer>) -> ContainerStatus {
        ContainerStatus::new(
            &self.name,
            self.kind,
            desired.map_or("host", |d| d.tier.as_str()),
            desired.map_or("", |d| d.source.as_str()),
        )
    }

    fn exists(&self) -> bool {
        self.board.get(self.kind, &self.name).is_some()
    }

    fn init(&self, desired: &DesiredContainer) {
        let blank = self.blank(Some(desired));
        self.board.update(
            self.kind,
            &self.name,
            |s| {
                s.tier = desired.tier.as_str();
                s.source = desired.source.clone();
            },
            || blank,
        );
    }

    fn set(&self, change: impl FnOnce(&mut ContainerStatus)) {
        let blank = self.blank(None);
        self.board.update(self.kind, &self.name, change, || blank);
    }

    fn state(&self, state: RunState, reason: Option<String>) {
        self.set(|s| {
            if s.state != state {
                s.since = crate::store::now_rfc3339();
            }
            s.state = state;
            s.reason = reason;
            s.next_start = None;
            if !matches!(state, RunState::Running | RunState::Stopping) {
                s.pid = None;
            }
        });
    }

    fn running(&self, pid: u32) {
        self.set(|s| {
            if s.state != RunState::Running {
                s.since = crate::store::now_rfc3339();
            }
            s.state = RunState::Running;
            s.pid = Some(pid);
            s.next_start = None;
        });
    }

    fn exited(&self, code: i32, delay: Duration) {
        self.set(|s| {
            s.state = RunState::Exited;
            s.since = crate::store::now_rfc3339();
            s.pid = None;
            s.last_exit_code = Some(code);
            s.reason = None;
            s.next_start = Some(in_rfc3339(delay));
        });
    }

    /// Records a failure and answers how long to wait before trying again.
    fn failed(&self, e: &RunError, config: &SupervisorConfig, backoff: &mut Backoff) -> Duration {
        if e.is_unavailable() {
            tracing::debug!(container = %self.name, error = %e, "containerd unavailable");
            self.state(RunState::WaitingForContainerd, Some(e.to_string()));
            return config.containerd_poll;
        }
        let delay = backoff.next_delay();
        tracing::warn!(container = %self.name, error = %e, retry_in = ?delay, "failed");
        self.state(RunState::Failed, Some(e.to_string()));
        self.set(|s| s.next_start = Some(in_rfc3339(delay)));
        delay
    }

    fn remove(&self) {
        self.board.remove(self.kind, &self.name);
    }
}

fn in_rfc3339(delay: Duration) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + delay).to_string()
}

#[cfg(test)]
mod tests;
