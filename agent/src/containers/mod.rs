//! Containers: host containers (long-running, supervised) and bootstrap containers
//! (run to completion at boot), through containerd.
//!
//! Where each behaviour lives:
//!
//! - [`client`]: the containerd connection (namespace and lease metadata, lazy
//!   reconnects; `Unavailable` means "retry later", never the container's failure).
//! - Images, a pipeline in which each module imports only those listed before it:
//!   1. [`oci`]: the shared types: `oci-spec`'s descriptor, index, manifest, config and
//!      media types, [`oci::ImageSource`] (a `source` setting, parsed once per start),
//!      [`oci::ArchiveStamp`], digests, platform selection, chain IDs, GC labels,
//!      [`oci::ImageError`];
//!   2. [`content`]: blobs in containerd's content store, leases; [`snapshot`]:
//!      unpacking one layer, snapshot stat and removal;
//!   3. the sources: [`archive`] (`oci-archive:` files, read in place) and [`registry`]
//!      (pulls: mirrors, credentials, proxy, plain HTTP only for loopback or `http://`);
//!   4. [`image`]: [`image::Images::ensure`]: the image record, unpacking, the archive
//!      cache, the cached image when a registry is unreachable.
//! - [`spec`]: a container's OCI runtime spec (`oci-spec`'s typed `Spec`); what each
//!   privilege tier grants is [`spec::Tier::rules`]; [`seccomp`]: containerd's default
//!   profile.
//! - [`desired`]: what the settings ask for, and the config hash; [`runtime`]: the
//!   per-container operations (prepare, start, wait, stop, remove) behind a trait;
//!   [`supervisor`]: one task per host container keeping containerd in line with it
//!   (re-attach, back-off, containerd restarts).
//! - [`engine`]: what else the boot and the host containers need of containerd: an
//!   image made ready ahead ([`engine::Prefetch`]), keeld's containers found by label
//!   ([`engine::Inventory`]).
//! - [`status`]: what `GET /containers` shows; [`logs`]: reading the logger's files.
//! - [`host_files`]: the copies of `/etc/hosts` and `/etc/resolv.conf` containers
//!   mount, kept up to date in place.
//! - [`exec`]: a process started in a running host container (`apiclient exec`), with
//!   the container's own process spec, its stdio FIFOs and their clean-up.
//!
//! This module never writes settings; it follows the store's live generation.
//!
//! The reconciler here and the supervisors are generic over [`Runtime`] +
//! [`Inventory`]: their logic runs against a fake engine in unit tests (`fake`: paused
//! time, no root) and against [`runtime::ContainerdRuntime`] in keeld.

pub mod archive;
pub mod client;
pub mod content;
pub mod desired;
pub mod engine;
pub mod exec;
#[cfg(test)]
pub mod fake;
pub mod host_files;
pub mod image;
pub mod logs;
pub mod oci;
pub mod registry;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod spec;
pub mod status;
pub mod supervisor;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;
use desired::DesiredContainer;
use engine::Inventory;
use registry::RegistryConfig;
use runtime::Runtime;
use status::{ContainerKind, StatusBoard};
use supervisor::{Inputs, SupervisorConfig};

/// The host containers' reconciler: one supervisor per name the settings have ever
/// mentioned (or containerd still holds), each fed its container's desired state.
pub struct HostContainers<R: Runtime> {
    runtime: Arc<R>,
    board: StatusBoard,
    config: SupervisorConfig,
    supervisors: BTreeMap<String, watch::Sender<Option<DesiredContainer>>>,
    registries: watch::Sender<Arc<RegistryConfig>>,
}

impl<R: Runtime> HostContainers<R> {
    pub fn new(runtime: Arc<R>, board: StatusBoard, config: SupervisorConfig) -> Self {
        HostContainers {
            runtime,
            board,
            config,
            supervisors: BTreeMap::new(),
            registries: watch::channel(Arc::new(RegistryConfig::default())).0,
        }
    }

    /// Runs the supervisor of host container `name`. One that panics (a bug) marks the
    /// container failed, saying so, and drops its channel: the next reconciliation (the
    /// next commit, or keeld's next start) starts a new one, which adopts the container
    /// as it finds it.
    fn spawn_supervisor(&self, name: String, inputs: Inputs) {
        let supervise = supervisor::supervise(
            self.runtime.clone(),
            self.board.clone(),
            self.config,
            ContainerKind::Host,
            name.clone(),
            inputs,
        );
        let board = self.board.clone();
        tokio::spawn(async move {
            let supervised = std::panic::AssertUnwindSafe(supervise);
            if futures_util::FutureExt::catch_unwind(supervised)
                .await
                .is_err()
            {
                tracing::error!(container = %name, "the supervisor of a host container panicked (a bug); a new one starts at the next commit");
                board.update(
                    ContainerKind::Host,
                    &name,
                    |s| {
                        s.state = status::RunState::Failed;
                        s.reason = Some(
                            "keeld's supervisor of this container failed unexpectedly (a bug; \
                             keeld's log has the details); it is supervised again after the next \
                             commit or keeld's next start"
                                .to_owned(),
                        );
                        s.next_start = None;
                    },
                    || status::ContainerStatus::new(&name, ContainerKind::Host, "host", ""),
                );
            }
        });
    }

    /// Brings every supervisor up to date with `settings`; `leftovers` are names that
    /// containerd holds but the settings may no longer mention (they get `None`).
    pub fn reconcile(&mut self, settings: &settings_model::Settings, leftovers: &[String]) {
        let registries = Arc::new(RegistryConfig::from_settings(settings));
        self.registries.send_replace(registries);
        let mut desired = desired::host_containers(settings);
        let names: std::collections::BTreeSet<String> = self
            .supervisors
            .keys()
            .cloned()
            .chain(desired.keys().cloned())
            .chain(leftovers.iter().cloned())
            .collect();
        for name in names {
            let want = desired.remove(&name);
            match self.supervisors.get(&name) {
                // A closed channel is a supervisor that panicked (see `spawn_supervisor`):
                // a new one takes over.
                Some(tx) if !tx.is_closed() => {
                    tx.send_if_modified(|current| {
                        let changed = *current != want;
                        if changed {
                            current.clone_from(&want);
                        }
                        changed
                    });
                }
                _ => {
                    let (tx, rx) = watch::channel(want);
                    let inputs = Inputs {
                        desired: rx,
                        registries: self.registries.subscribe(),
                    };
                    self.spawn_supervisor(name.clone(), inputs);
                    self.supervisors.insert(name, tx);
                }
            }
        }
    }
}

/// Shortest time between two reconciles of the host containers. Reconciling reads the
/// whole live settings into the typed model, which costs more than the rest of a small
/// commit (a fifth of keeld's instructions per PATCH+commit, measured with callgrind);
/// containers answer a change in seconds, so a burst of thousands of commits a second
/// gains nothing from a reconcile after each one.
pub(crate) const RECONCILE_PACE: Duration = Duration::from_millis(10);

/// Once the boot is configured, follows the store: on every new live generation,
/// reconciles the host containers (paced: see [`RECONCILE_PACE`]).
/// Host containers that containerd holds from an earlier run but the settings no longer
/// enable are found by label and removed.
pub async fn run_host_containers<R: Runtime + Inventory>(
    store: Store,
    runtime: Arc<R>,
    board: StatusBoard,
    config: SupervisorConfig,
    mut configured: watch::Receiver<crate::boot::BootGate>,
) {
    use crate::boot::BootGate;
    // Host containers start once the boot is configured (never after a failed boot);
    // until then each enabled one is listed as waiting, with why.
    let enabled = |store: &Store| -> Vec<(String, &'static str, String)> {
        // Read in place (`&Value` is a deserializer): no copy of the whole settings.
        <settings_model::Settings as serde::Deserialize>::deserialize(store.snapshot().live_settings())
            .map(|s| {
                desired::host_containers(&s)
                    .into_values()
                    .map(|d| (d.name.clone(), d.tier_name, d.source.clone()))
                    .collect()
            })
            .unwrap_or_else(|e| {
                // Committed settings always validate; this would be a bug, not bad input.
                tracing::error!(error = %e, "live settings do not parse; no host container listed as waiting");
                Vec::new()
            })
    };
    let show = |state: status::RunState, reason: &str| {
        for (name, tier, source) in enabled(&store) {
            board.update(
                ContainerKind::Host,
                &name,
                |s| {
                    s.state = state;
                    s.reason = Some(reason.to_owned());
                    s.since = crate::store::now_rfc3339();
                },
                || status::ContainerStatus::new(&name, ContainerKind::Host, tier, &source),
            );
        }
    };
    show(
        status::RunState::WaitingForBoot,
        "waiting for the boot to be configured",
    );
    match configured
        .wait_for(|g| *g != BootGate::Pending)
        .await
        .map(|g| *g)
    {
        Ok(BootGate::Configured) => {}
        Ok(BootGate::FailedOnDefaults) => {
            tracing::warn!("the boot failed at the user-data; starting the host containers the OS defaults enable");
        }
        Ok(BootGate::Failed) => {
            show(
                status::RunState::NotStarted,
                "the boot failed: host containers are not started in this boot (see apiclient boot status)",
            );
            return;
        }
        Ok(BootGate::Pending) | Err(_) => return,
    }
    let mut live = store.watch_live();
    let mut hosts = HostContainers::new(runtime.clone(), board, config);
    // Listed in the background: while containerd does not answer, the settings'
    // containers are reconciled (their supervisors wait for containerd on their own),
    // and the leftovers join once it does.
    let mut found = {
        let runtime = runtime.clone();
        tokio::spawn(async move { find_leftovers(&*runtime).await })
    };
    let mut leftovers: Option<Vec<String>> = None;
    let mut reconciled: Option<tokio::time::Instant> = None;
    loop {
        // Paced: a change after a quiet moment is reconciled at once; under a stream of
        // commits, at most once per RECONCILE_PACE, with the newest settings.
        if let Some(at) = reconciled {
            let next = at + RECONCILE_PACE;
            if next > tokio::time::Instant::now() {
                tokio::time::sleep_until(next).await;
            }
        }
        live.borrow_and_update();
        let snapshot = store.snapshot();
        match <settings_model::Settings as serde::Deserialize>::deserialize(
            snapshot.live_settings(),
        ) {
            Ok(settings) => {
                hosts.reconcile(&settings, leftovers.as_deref().unwrap_or_default());
                reconciled = Some(tokio::time::Instant::now());
            }
            // Committed settings always validate; this would be a bug, not bad input.
            Err(e) => {
                tracing::error!(error = %e, "live settings do not parse; containers unchanged")
            }
        }
        tokio::select! {
            changed = live.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            names = &mut found, if leftovers.is_none() => {
                leftovers = Some(names.unwrap_or_default());
            }
        }
    }
}

/// Names of host containers keeld created in an earlier run (and may have to remove:
/// the settings dropped them while keeld was stopped). Asked until containerd answers
/// (1 s, doubling to 8 s); another failure is said and leaves the list empty.
async fn find_leftovers<R: Inventory>(runtime: &R) -> Vec<String> {
    let mut backoff = supervisor::Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
    loop {
        match runtime.managed(ContainerKind::Host).await {
            Ok(names) => return names,
            Err(e) if e.is_unavailable() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot list containers left from an earlier run yet");
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers left from an earlier run");
                return Vec::new();
            }
        }
    }
}
