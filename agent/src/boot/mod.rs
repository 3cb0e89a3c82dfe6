//! Boot: from an empty (or existing) datastore to a configured host.
//!
//! The phases, each recorded in [`status::BootRecord`] and visible at `GET /boot`:
//! 1. first boot: stage the OS defaults into the `launch` transaction (a default never
//!    overwrites a value already set);
//! 2. first boot: run the user-data providers in order ([`providers`]), patching each
//!    source's settings into `launch`; then, with the `imds` provider, derive from the
//!    instance metadata what they leave unset ([`derived`]);
//! 3. commit `launch`, mark the first boot done, render every configuration file and
//!    run the restart commands;
//! 4. bootstrap commands, then bootstrap containers, each kind by name: an essential one
//!    that fails halts the boot in `failed` (the API stays up); a `once` one that
//!    succeeded is switched to `off` by a committed transaction;
//! 5. with `settings.boot.reboot-to-reconcile`, when the kernel and init parameters the
//!    next boot gets differ from the ones this boot got (user-data or a bootstrap
//!    container changed them): `rebooting`, through the reboot command;
//! 6. otherwise `configured`: host containers may start.
//!
//! Socket binding and `READY=1` happen before this runs (in [`crate::run`]), so the API
//! answers while the boot goes on. A keeld restart in the middle of a boot resumes it
//! from the record in the runtime directory: finished steps are not run again, and a
//! bootstrap container that was running is waited for, never started twice.

pub mod bootstrap;
pub mod derived;
pub mod imds;
pub mod providers;
pub mod runtime;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::apply::Applier;
use crate::containers::desired::{self, DesiredContainer};
use crate::containers::registry::RegistryConfig;
use crate::containers::status::{RunState, StatusBoard};
use crate::store::{Caller, Store, StoreError};
use bootstrap::ContainerRun;
use providers::Provider;
use runtime::BootRuntime;
use settings_model::model::BootstrapMode;
use status::{BootPhase, BootRecord, BootTracker, StepOutcome};

/// The transaction the boot builds the first settings in.
pub const LAUNCH_TX: &str = "launch";
/// In the state directory: present once a first boot committed its user-data.
pub const FIRST_BOOT_DONE: &str = "first-boot-done";

/// What the boot needs to know.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    /// The OS defaults (`packaging/defaults.toml`); absent = none.
    pub os_defaults: PathBuf,
    pub providers: Vec<Provider>,
    /// Run the providers at every boot, not only the first.
    pub user_data_every_boot: bool,
    pub apiclient: PathBuf,
    pub socket: PathBuf,
    /// Run for `reboot-to-reconcile` (argv, no shell).
    pub reboot_command: Vec<String>,
    /// Times steps across keeld restarts.
    pub clock: BootClock,
}

/// Time since the kernel booted: what a bootstrap container's timeout counts in, so
/// that a keeld restarted while the container runs waits only what is left of it.
#[derive(Clone)]
pub struct BootClock(Arc<dyn Fn() -> Duration + Send + Sync>);

impl BootClock {
    /// `CLOCK_BOOTTIME`: monotonic, shared by every process of this boot, and counting
    /// suspend.
    pub fn kernel() -> BootClock {
        BootClock(Arc::new(|| {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
            Duration::new(
                u64::try_from(t.tv_sec).unwrap_or(0),
                u32::try_from(t.tv_nsec).unwrap_or(0),
            )
        }))
    }

    /// Any source of "time since boot" (tests use tokio's paused clock).
    pub fn from_fn(now: impl Fn() -> Duration + Send + Sync + 'static) -> BootClock {
        BootClock(Arc::new(now))
    }

    pub fn now(&self) -> Duration {
        (self.0)()
    }
}

impl std::fmt::Debug for BootClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootClock({:?})", self.now())
    }
}

/// How far the boot got, for what waits on it (the host containers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootGate {
    /// Still running.
    Pending,
    Configured,
    /// Failed: host containers are not started in this boot.
    Failed,
    /// Failed at the user-data: the OS defaults alone were committed and applied, and
    /// the host containers they enable run (so the operator can get in).
    FailedOnDefaults,
}

/// Everything the boot runner works with.
pub struct Boot {
    pub config: BootConfig,
    pub store: Store,
    pub applier: Applier,
    /// The container engine (containerd in keeld; a fake in unit tests): see
    /// [`runtime`] for why it is an object.
    pub runtime: Arc<dyn BootRuntime>,
    pub board: StatusBoard,
    pub publish: watch::Sender<BootRecord>,
    /// Hears of each change of phase.
    pub events: crate::events::EventBus,
    /// Where the boot ended: host containers wait for it.
    pub configured: watch::Sender<BootGate>,
}

/// How often, and how long, a configured boot tries again to hand over boot parameters
/// whose hand-over was deferred (the boot was itself on trial: it is blessed by
/// `systemd-bless-boot` shortly after `configured`).
const DEFERRED_RETRY: Duration = Duration::from_secs(5);
const DEFERRED_FOR: Duration = Duration::from_secs(600);

/// Hands over `settings.boot`'s parameters again, until the slot writer takes them or
/// [`DEFERRED_FOR`] has passed (then the next boot's apply does).
async fn hand_over_deferred_parameters(applier: Applier, store: Store) {
    let until = Instant::now() + DEFERRED_FOR;
    while applier.boot_parameters_deferred() && Instant::now() < until {
        tokio::time::sleep(DEFERRED_RETRY).await;
        let report = applier.apply(&store, &["settings.boot".to_owned()]).await;
        if !applier.boot_parameters_deferred() {
            tracing::info!(
                success = report.success,
                "deferred boot parameters handed over"
            );
        }
    }
}

/// Why the boot stopped; becomes the record's `reason`.
#[derive(Debug)]
struct Halt(String);

/// How the steps ended when nothing halted them.
#[derive(Debug, PartialEq, Eq)]
enum Finish {
    Configured,
    /// The reboot command was run (`reboot-to-reconcile`); the detail says why.
    Rebooting(String),
}

/// The boot step that reboots for changed boot parameters.
const RECONCILE_STEP: &str = "reboot-to-reconcile";

impl From<status::RecordError> for Halt {
    fn from(e: status::RecordError) -> Self {
        Halt(e.to_string())
    }
}

impl Boot {
    /// Runs (or resumes) this boot to `configured` or `failed`, and says which on
    /// `configured`.
    pub async fn run(self) {
        let began = Instant::now();
        let marker = self.config.state_dir.join(FIRST_BOOT_DONE);
        let every = self.config.user_data_every_boot;
        // A store that `--accept-state-loss` left with nothing (no intact generation to
        // continue from: before the recovery's there is at most the empty generation 0
        // every store starts with) holds no OS defaults and no user-data. The host is new again: the first-boot marker goes (durably), so this
        // boot stages them as the first boot did, and a user-data source that fails now
        // is tried again at the next boot, as on a new host.
        let recovered_to_nothing = {
            let snapshot = self.store.snapshot();
            let before = (snapshot.history.len().checked_sub(2))
                .and_then(|i| snapshot.history.iter().nth(i));
            before.is_none_or(|g| g.generation == 0)
                && snapshot.live().tx == crate::store::RECOVERY_TX
                && snapshot
                    .live_settings()
                    .as_object()
                    .is_some_and(serde_json::Map::is_empty)
        };
        if recovered_to_nothing {
            tracing::warn!("the store was recovered to nothing (--accept-state-loss): this host boots as a new one, with its OS defaults and user-data");
            if let Err(e) = crate::updates::durable::remove(&marker) {
                tracing::error!(path = %marker.display(), error = %e, "cannot remove the first-boot marker");
            }
        }
        // Only a marker known to be missing makes a first boot: one that cannot be looked
        // at (an I/O error) must not stage user-data over what the API has changed since.
        let mut marker_unknown = None;
        let mut tracker = BootTracker::open(
            &self.config.runtime_dir,
            || {
                if every || recovered_to_nothing {
                    return true;
                }
                match marker.try_exists() {
                    Ok(exists) => !exists,
                    Err(e) => {
                        marker_unknown = Some(format!(
                            "cannot tell whether this host booted before: {}: {e}",
                            marker.display()
                        ));
                        false
                    }
                }
            },
            self.publish.clone(),
            self.events.clone(),
        );
        if let Some(reason) = marker_unknown {
            tracing::error!(%reason, "boot failed");
            if let Err(e) = tracker.finish(BootPhase::Failed, Some(reason), began.elapsed()) {
                tracing::error!(error = %e, "could not record the boot failure");
            }
            self.configured.send_replace(BootGate::Failed);
            return;
        }
        if tracker.record().booted_parameters.is_none() && !tracker.record().is_done() {
            // First thing in this boot: where a trial of new boot parameters stands (kept,
            // failed, running), and so what this boot's kernel got (a later keeld start
            // in the same boot keeps it).
            if let Some((booted, failed)) = self.settle_boot_parameters().await {
                if let Err(e) = tracker.update(|r| {
                    r.booted_parameters = Some(booted);
                    r.failed_parameters = failed;
                }) {
                    tracing::error!(error = %e, "could not record this boot's parameters");
                }
            }
        }
        match tracker.record().phase {
            BootPhase::Rebooting => {
                tracing::warn!("the reboot to reconcile boot parameters was already requested (keeld restarted)");
                return;
            }
            BootPhase::Configured => {
                tracing::info!("boot already configured (keeld restarted)");
                self.configured.send_replace(BootGate::Configured);
                return;
            }
            BootPhase::Failed => {
                tracing::warn!(reason = ?tracker.record().reason, "boot already failed (keeld restarted); staying failed");
                self.configured
                    .send_replace(if tracker.record().defaults_only {
                        BootGate::FailedOnDefaults
                    } else {
                        BootGate::Failed
                    });
                return;
            }
            _ => {}
        }
        // A panic in a step (a bug) fails the boot with a reason, instead of leaving it
        // running for ever: host containers would wait for it, `boot wait` would hang.
        let steps = std::panic::AssertUnwindSafe(self.steps(&mut tracker));
        let outcome = futures_util::FutureExt::catch_unwind(steps)
            .await
            .unwrap_or_else(|panic| {
                // The fake runtime's way of killing keeld mid-step (tests) goes on up.
                #[cfg(test)]
                if panic.is::<crate::containers::fake::SimulatedCrash>() {
                    std::panic::resume_unwind(panic);
                }
                let _ = panic;
                Err(Halt(
                    "keeld failed unexpectedly during the boot (a bug; its log has the details)"
                        .to_owned(),
                ))
            });
        match outcome {
            Ok(Finish::Rebooting(why)) => {
                if let Err(e) = tracker.finish(BootPhase::Rebooting, Some(why), began.elapsed()) {
                    tracing::error!(error = %e, "could not record the reboot");
                }
            }
            Ok(Finish::Configured) => {
                let finished = tracker.finish(BootPhase::Configured, None, began.elapsed());
                if let Err(e) = finished {
                    tracing::error!(error = %e, "could not record the end of boot");
                }
                tracing::info!(elapsed = ?began.elapsed(), "boot configured");
                self.configured.send_replace(BootGate::Configured);
                if self.applier.boot_parameters_deferred() {
                    tokio::spawn(hand_over_deferred_parameters(
                        self.applier.clone(),
                        self.store.clone(),
                    ));
                }
            }
            Err(Halt(reason)) => {
                tracing::error!(%reason, "boot failed");
                if let Err(e) = tracker.finish(BootPhase::Failed, Some(reason), began.elapsed()) {
                    tracing::error!(error = %e, "could not record the boot failure");
                }
                self.configured
                    .send_replace(if tracker.record().defaults_only {
                        BootGate::FailedOnDefaults
                    } else {
                        BootGate::Failed
                    });
            }
        }
    }

    async fn steps(&self, t: &mut BootTracker) -> Result<Finish, Halt> {
        if t.record().defaults_only {
            // keeld restarted in the middle of falling back: finish that.
            let reason = t
                .record()
                .steps
                .iter()
                .find(|s| s.outcome == StepOutcome::Failed)
                .and_then(|s| s.detail.clone())
                .unwrap_or_else(|| "user-data refused".to_owned());
            return self
                .fall_back_to_defaults(t, reason)
                .await
                .map(|()| Finish::Configured);
        }
        if t.record().first_boot {
            t.set_phase(BootPhase::Defaults)?;
            self.stage_os_defaults(t).await?;
            t.set_phase(BootPhase::UserData)?;
            for provider in &self.config.providers {
                // Resumed after a refusal (keeld restarted during the fall-back): the
                // step is recorded as failed; fall back again, never commit what it
                // staged.
                let refused = t
                    .record()
                    .step(provider.step_name())
                    .filter(|s| s.outcome == StepOutcome::Failed)
                    .map(|s| s.detail.clone().unwrap_or_default());
                let result = match refused {
                    Some(reason) => Err(Halt(reason)),
                    None => self.run_provider(t, provider).await,
                };
                if let Err(Halt(reason)) = result {
                    return self
                        .fall_back_to_defaults(t, reason)
                        .await
                        .map(|()| Finish::Configured);
                }
            }
            self.derive_from_metadata(t).await?;
        }
        t.set_phase(BootPhase::Apply)?;
        if let Err(Halt(reason)) = self.commit_launch(t).await {
            // The whole candidate (defaults + user-data) was refused at commit (a rule
            // across keys, a file that cannot render): on a first boot that is the
            // user-data's doing.
            if t.record().first_boot && !t.record().defaults_only {
                return self
                    .fall_back_to_defaults(t, reason)
                    .await
                    .map(|()| Finish::Configured);
            }
            return Err(Halt(reason));
        }
        let settings = self.live_settings()?;
        // The bootstrap containers' images are made ready while the files render (the
        // containers themselves still run one after another, after the commands).
        let registries = RegistryConfig::from_settings(&settings);
        let prefetch: Vec<_> = desired::bootstrap_containers(&settings)
            .into_values()
            .filter(|d| {
                let mode = settings
                    .bootstrap_containers
                    .as_ref()
                    .and_then(|m| m.iter().find(|(n, _)| n.as_str() == d.name))
                    .and_then(|(_, bc)| bc.mode);
                matches!(mode, Some(BootstrapMode::Once | BootstrapMode::Always))
                    && !Self::done(t, &format!("bootstrap-container:{}", d.name))
            })
            .map(|d| {
                let runtime = self.runtime.clone();
                let registries = registries.clone();
                tokio::spawn(async move { runtime.prefetch(&d.source, &registries).await })
            })
            .collect();
        self.render(t).await?;

        t.set_phase(BootPhase::BootstrapCommands)?;
        for (name, command) in settings.bootstrap_commands.iter().flatten() {
            self.run_command(t, name.as_str(), command).await?;
        }
        t.set_phase(BootPhase::BootstrapContainers)?;
        for fetch in prefetch {
            let _ = fetch.await;
        }
        // Bootstrap commands may have changed settings (that is what they are for).
        let settings = self.live_settings()?;
        let registries = RegistryConfig::from_settings(&settings);
        let containers = desired::bootstrap_containers(&settings);
        // One that is to run but names no image cannot run: said so, not skipped.
        for (name, bc) in settings.bootstrap_containers.iter().flatten() {
            let mode = bc.mode.unwrap_or(BootstrapMode::Off);
            if bc.source.is_none() && mode != BootstrapMode::Off {
                self.fail_sourceless(t, name.as_str(), bc.essential.unwrap_or(false))?;
            }
        }
        for (name, desired) in &containers {
            let Some(bc) = settings
                .bootstrap_containers
                .as_ref()
                .and_then(|m| m.iter().find(|(n, _)| n.as_str() == name).map(|(_, bc)| bc))
            else {
                continue;
            };
            // The model's own reading of the duration: the one its validation accepted
            // (Go syntax, `1.5m` included), never a silent "no timeout".
            let timeout = bc
                .timeout
                .as_ref()
                .map(|d| d.to_std())
                .transpose()
                .map_err(|e| Halt(format!("settings.bootstrap-containers.{name}.timeout: {e}")))?;
            let spec = StepSpec {
                mode: bc.mode.unwrap_or(BootstrapMode::Off),
                essential: bc.essential.unwrap_or(false),
                timeout,
            };
            self.run_container(t, desired, &registries, spec).await?;
        }
        self.reboot_to_reconcile(t).await
    }

    /// The parameters this boot's kernel got, after the slot writer settled the trial
    /// (from the record of what was last staged when the writer cannot be asked), and the
    /// staged ones when they failed their trial (this boot's verdict, or an earlier one's
    /// that `settings.boot` still asks for). `None` on a host without loader entries Keel
    /// manages.
    async fn settle_boot_parameters(&self) -> Option<(String, Option<String>)> {
        use crate::updates::loader::ParameterTrial;
        let settled = self.applier.settle_boot_parameters().await?;
        let staged = self.applier.staged_boot_parameters().await;
        let booted = match (settled, staged) {
            // The staged parameters are in no entry and no trial holds them: a trial's
            // verdict was lost (keeld or the power went down between the writer's removal
            // of a failed trial and the record of it). They failed all the same; without
            // this, reboot-to-reconcile would reboot for them at every boot. Not when
            // there is no record at all: that says nothing was handed over (a state
            // directory reset), and the boot's apply hands the settings' parameters over.
            (Ok(settled), Some(staged))
                if matches!(settled.trial, ParameterTrial::None)
                    && staged != settled.kept
                    && self.applier.boot_parameters_recorded() =>
            {
                tracing::error!(failed = %staged, booted = %settled.kept, "the staged boot parameters are in no loader entry and no trial holds them (their trial failed, or they were set back, and the record of it was lost): taken as failed");
                if let Err(e) = self.applier.record_failed_boot_parameters(staged).await {
                    tracing::error!(error = %e, "cannot record the boot parameters that failed their trial");
                }
                settled.kept
            }
            (Ok(settled), _) => match settled.trial {
                ParameterTrial::Running { parameters, entry } => {
                    tracing::info!(entry = %entry, parameters = %parameters, "this boot tries new boot parameters: they are kept once it is configured");
                    parameters
                }
                ParameterTrial::Failed { parameters, entry } => {
                    tracing::error!(entry = %entry, failed = %parameters, booted = %settled.kept, "the boot with new boot parameters did not reach configured: this boot came back with the kept ones, and the new ones are not handed over again until settings.boot changes");
                    if let Err(e) = self.applier.record_failed_boot_parameters(parameters).await {
                        tracing::error!(error = %e, "cannot record the boot parameters that failed their trial (the next boot takes them as failed again)");
                    }
                    settled.kept
                }
                ParameterTrial::None
                | ParameterTrial::Pending { .. }
                | ParameterTrial::Kept { .. }
                | ParameterTrial::Deferred { .. } => settled.kept,
            },
            (Err(e), staged) => {
                tracing::warn!(error = %e, "cannot settle the boot parameters' trial with the slot writer: this boot's parameters are taken from the record of what was last staged");
                staged?
            }
        };
        Some((booted, self.applier.failed_boot_parameters().await))
    }

    /// With `settings.boot.reboot-to-reconcile`, reboots when the parameters Keel's
    /// loader entries now hold (this boot's applies, through user-data or a bootstrap
    /// container) differ from the ones this boot's kernel got. Never on a host without
    /// such entries; never twice for the same parameters (the next boot got them).
    async fn reboot_to_reconcile(&self, t: &mut BootTracker) -> Result<Finish, Halt> {
        let settings = self.live_settings()?;
        let wanted = settings
            .boot
            .as_ref()
            .and_then(|b| b.reboot_to_reconcile)
            .unwrap_or(false);
        let Some(booted) = t.record().booted_parameters.clone() else {
            return Ok(Finish::Configured);
        };
        // Every apply of this boot has finished (the boot's own, and any a bootstrap
        // container asked for) before the entries are compared.
        self.applier.idle().await;
        if !wanted {
            return Ok(Finish::Configured);
        }
        // An unreadable record says nothing about the next boot: no reboot on a guess,
        // and the boot says why it did not reconcile.
        let Some(next) = self.applier.staged_boot_parameters().await else {
            return Err(Halt(
                "reboot-to-reconcile: the record of the boot parameters handed to the loader \
                 entries cannot be read, so whether this boot has them is unknown"
                    .to_owned(),
            ));
        };
        if next == booted {
            return Ok(Finish::Configured);
        }
        // The staged parameters failed their trial (in an earlier boot; recorded in the
        // state directory until other parameters are staged): the next boot does not get
        // them either, and rebooting for them would never end.
        if t.record().failed_parameters.as_deref() == Some(next.as_str()) {
            tracing::warn!(parameters = %next, "reboot-to-reconcile: the staged boot parameters failed their trial; no reboot for them");
            return Ok(Finish::Configured);
        }
        let show = |p: &str| {
            if p.is_empty() {
                "none".to_owned()
            } else {
                format!("{p:?}")
            }
        };
        let why = format!(
            "settings.boot changed in this boot (reboot-to-reconcile): the kernel got {}, \
             the next boot gets {}",
            show(&booted),
            show(&next)
        );
        let started = Instant::now();
        t.begin(RECONCILE_STEP, true)?;
        match crate::reboot::reboot(&self.config.reboot_command).await {
            Ok(()) => {
                t.end(
                    RECONCILE_STEP,
                    StepOutcome::Succeeded,
                    Some(why.clone()),
                    started.elapsed(),
                )?;
                tracing::warn!(reason = %why, "rebooting so that the boot parameters take effect");
                Ok(Finish::Rebooting(why))
            }
            Err(e) => {
                let reason = format!("{why}; the reboot failed: {e}");
                t.end(
                    RECONCILE_STEP,
                    StepOutcome::Failed,
                    Some(reason.clone()),
                    started.elapsed(),
                )?;
                Err(Halt(reason))
            }
        }
    }

    fn live_settings(&self) -> Result<settings_model::Settings, Halt> {
        let snapshot = self.store.snapshot();
        serde_json::from_value(snapshot.live_settings().clone())
            .map_err(|e| Halt(format!("the committed settings do not parse: {e}")))
    }

    fn done(t: &BootTracker, step: &str) -> bool {
        t.record()
            .step(step)
            .is_some_and(|s| s.outcome != StepOutcome::Running)
    }

    /// How a step this boot already ended (before a keeld restart) stands; `None` when it
    /// has not ended. An essential step that failed halts the boot again, as it did then:
    /// a restart between recording the failure and ending the boot (a bootstrap
    /// container's clean-up, say) must not turn it into a success.
    fn ended(t: &BootTracker, step: &str) -> Option<Result<(), Halt>> {
        let s = t
            .record()
            .step(step)
            .filter(|s| s.outcome != StepOutcome::Running)?;
        Some(if s.essential && s.outcome == StepOutcome::Failed {
            Err(Halt(match &s.detail {
                Some(detail) => format!("essential {step} failed: {detail}"),
                None => format!("essential {step} failed"),
            }))
        } else {
            Ok(())
        })
    }

    /// A bootstrap container whose mode runs it but that has no `source`.
    fn fail_sourceless(
        &self,
        t: &mut BootTracker,
        name: &str,
        essential: bool,
    ) -> Result<(), Halt> {
        let step = format!("bootstrap-container:{name}");
        if let Some(outcome) = Self::ended(t, &step) {
            return outcome;
        }
        let reason = format!(
            "settings.bootstrap-containers.{}.source is not set: there is no image to run",
            settings_model::key::format_segment(name)
        );
        if t.record().step(&step).is_none() {
            t.begin(&step, essential)?;
        }
        Self::failed(t, &step, essential, reason, Duration::ZERO)
    }

    /// Records a bootstrap step as failed: an essential one halts the boot; any other is
    /// logged, and the boot goes on.
    fn failed(
        t: &mut BootTracker,
        step: &str,
        essential: bool,
        reason: String,
        took: Duration,
    ) -> Result<(), Halt> {
        t.end(step, StepOutcome::Failed, Some(reason.clone()), took)?;
        if essential {
            Err(Halt(format!("essential {step} failed: {reason}")))
        } else {
            tracing::warn!(%step, %reason, "non-essential bootstrap step failed; boot goes on");
            Ok(())
        }
    }

    /// For a bootstrap item found done at a resume: a `once` item that succeeded, whose
    /// settings still say `once`, had its switch to `off` cut short by the restart (it is
    /// committed after the step is recorded); it is committed now, or the next boot would
    /// run the item again.
    async fn finish_once(
        &self,
        t: &BootTracker,
        step: &str,
        mode: BootstrapMode,
        group: &str,
        name: &str,
    ) -> Result<(), Halt> {
        let succeeded = t
            .record()
            .step(step)
            .is_some_and(|s| s.outcome == StepOutcome::Succeeded);
        if succeeded && mode == BootstrapMode::Once {
            self.switch_off(group, name).await?;
        }
        Ok(())
    }

    async fn stage_os_defaults(&self, t: &mut BootTracker) -> Result<(), Halt> {
        const STEP: &str = "os-defaults";
        if let Some(outcome) = Self::ended(t, STEP) {
            return outcome;
        }
        let path = &self.config.os_defaults;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                t.skip(STEP, &format!("no OS defaults at {}", path.display()))?;
                return Ok(());
            }
            Err(e) => return Err(Halt(format!("OS defaults {}: {e}", path.display()))),
        };
        t.begin(STEP, true)?;
        let started = Instant::now();
        let source = format!("OS defaults {}", path.display());
        let defaults = settings_model::userdata::parse_user_data(&source, &text)
            .map_err(|e| Halt(format!("{source}: {e}")))?;
        let existing = self.store.snapshot().live_settings().clone();
        let patch = providers::missing_only(&defaults, &existing);
        self.patch_launch(&source, patch).await?;
        t.end(STEP, StepOutcome::Succeeded, None, started.elapsed())?;
        Ok(())
    }

    /// The user-data was refused (`reason` names the source, line or key): everything
    /// it staged is discarded, the OS defaults alone are committed and every file is
    /// rendered from them, and the boot fails with `reason`. Host containers the
    /// defaults enable then start (see [`BootGate::FailedOnDefaults`]); bootstrap
    /// commands and containers do not run, and `configured` is not reached. The
    /// first-boot marker is not written, so the next boot runs the providers again
    /// (after the user-data is fixed).
    async fn fall_back_to_defaults(&self, t: &mut BootTracker, reason: String) -> Result<(), Halt> {
        const STEP: &str = "commit-os-defaults";
        tracing::error!(%reason, "user-data refused; committing the OS defaults alone");
        t.update(|r| r.defaults_only = true)?;
        t.set_phase(BootPhase::Apply)?;
        if !Self::done(t, STEP) {
            t.begin(STEP, true)?;
            let started = Instant::now();
            let committed = async {
                match self.store.discard(LAUNCH_TX).await {
                    Ok(_) | Err(StoreError::NothingPending(_)) => {}
                    Err(e) => return Err(format!("discarding {LAUNCH_TX}: {e}")),
                }
                if let Some(defaults) = self.os_defaults_patch().map_err(|Halt(r)| r)? {
                    self.patch_launch("OS defaults", defaults)
                        .await
                        .map_err(|Halt(r)| r)?;
                }
                match self.store.commit(LAUNCH_TX, Caller::keeld()).await {
                    Ok(changed) => Ok(format!("{} keys changed", changed.len())),
                    Err(StoreError::NothingPending(_)) => Ok("nothing to commit".to_owned()),
                    Err(e) => Err(format!("committing the OS defaults: {e}")),
                }
            }
            .await;
            match committed {
                Ok(detail) => t.end(
                    STEP,
                    StepOutcome::Succeeded,
                    Some(detail),
                    started.elapsed(),
                )?,
                Err(e) => {
                    t.end(
                        STEP,
                        StepOutcome::Failed,
                        Some(e.clone()),
                        started.elapsed(),
                    )?;
                    return Err(Halt(format!("{reason}; and then {e}")));
                }
            }
        }
        if let Err(Halt(e)) = self.render(t).await {
            return Err(Halt(format!("{reason}; and then {e}")));
        }
        Err(Halt(reason))
    }

    /// The OS defaults as a patch that sets only what the live settings leave unset;
    /// `None` when there is no defaults file.
    fn os_defaults_patch(&self) -> Result<Option<Value>, Halt> {
        let path = &self.config.os_defaults;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Halt(format!("OS defaults {}: {e}", path.display()))),
        };
        let source = format!("OS defaults {}", path.display());
        let defaults = settings_model::userdata::parse_user_data(&source, &text)
            .map_err(|e| Halt(format!("{source}: {e}")))?;
        let existing = self.store.snapshot().live_settings().clone();
        Ok(Some(providers::missing_only(&defaults, &existing)))
    }

    async fn patch_launch(&self, source: &str, patch: Value) -> Result<(), Halt> {
        if patch.as_object().is_some_and(|o| o.is_empty()) {
            return Ok(());
        }
        self.store
            .patch(LAUNCH_TX, patch)
            .await
            .map_err(|e| Halt(format!("{source}: {e}")))
    }

    async fn run_provider(&self, t: &mut BootTracker, provider: &Provider) -> Result<(), Halt> {
        let step = provider.step_name();
        if Self::done(t, step) {
            return Ok(());
        }
        let source = provider.source_name();
        t.begin(step, true)?;
        let started = Instant::now();
        let text = match provider.fetch().await {
            Ok(Some(text)) => text,
            Ok(None) => {
                t.end(
                    step,
                    StepOutcome::Skipped,
                    Some(format!("{source}: no user-data")),
                    started.elapsed(),
                )?;
                return Ok(());
            }
            Err(e) => {
                let reason = format!("{source}: {e}");
                t.end(
                    step,
                    StepOutcome::Failed,
                    Some(reason.clone()),
                    started.elapsed(),
                )?;
                return Err(Halt(reason));
            }
        };
        let parsed = settings_model::userdata::parse_user_data(&source, &text);
        let outcome = match parsed {
            Ok(patch) => self.patch_launch(&source, patch).await,
            // Name the source once (a syntax error names it already).
            Err(e) => {
                let e = e.to_string();
                Err(Halt(if e.starts_with(&source) {
                    e
                } else {
                    format!("{source}: {e}")
                }))
            }
        };
        match outcome {
            Ok(()) => {
                t.end(
                    step,
                    StepOutcome::Succeeded,
                    Some(source),
                    started.elapsed(),
                )?;
                Ok(())
            }
            Err(Halt(reason)) => {
                t.end(
                    step,
                    StepOutcome::Failed,
                    Some(reason.clone()),
                    started.elapsed(),
                )?;
                Err(Halt(reason))
            }
        }
    }

    async fn commit_launch(&self, t: &mut BootTracker) -> Result<(), Halt> {
        const STEP: &str = "commit";
        if let Some(outcome) = Self::ended(t, STEP) {
            return outcome;
        }
        t.begin(STEP, true)?;
        let started = Instant::now();
        let detail = match self.store.commit(LAUNCH_TX, Caller::keeld()).await {
            Ok(changed) => format!("{} keys changed", changed.len()),
            Err(StoreError::NothingPending(_)) => "nothing to commit".to_owned(),
            Err(e) => {
                let reason = format!("committing {LAUNCH_TX}: {e}");
                t.end(
                    STEP,
                    StepOutcome::Failed,
                    Some(reason.clone()),
                    started.elapsed(),
                )?;
                return Err(Halt(reason));
            }
        };
        if t.record().first_boot {
            // Two fsyncs on the state disk: off the async workers.
            let marker = self.config.state_dir.join(FIRST_BOOT_DONE);
            tokio::task::spawn_blocking(move || write_marker(&marker))
                .await
                .map_err(|e| Halt(format!("cannot mark the first boot done: {e}")))?
                .map_err(|e| Halt(format!("cannot mark the first boot done: {e}")))?;
        }
        t.end(
            STEP,
            StepOutcome::Succeeded,
            Some(detail),
            started.elapsed(),
        )?;
        Ok(())
    }

    async fn render(&self, t: &mut BootTracker) -> Result<(), Halt> {
        const STEP: &str = "render";
        if let Some(outcome) = Self::ended(t, STEP) {
            return outcome;
        }
        t.begin(STEP, true)?;
        let started = Instant::now();
        let report = self.applier.apply_at_boot(&self.store).await;
        let written = report
            .files
            .iter()
            .filter(|f| f.result == crate::apply::FileResult::Written)
            .count();
        if report.success {
            let detail = format!(
                "{} files written, {} restart commands",
                written,
                report.commands.len()
            );
            t.end(
                STEP,
                StepOutcome::Succeeded,
                Some(detail),
                started.elapsed(),
            )?;
            return Ok(());
        }
        let failures: Vec<String> = report
            .files
            .iter()
            .filter(|f| f.result == crate::apply::FileResult::Failed)
            .map(|f| format!("{}: {}", f.path, f.error.clone().unwrap_or_default()))
            .chain(report.commands.iter().filter(|c| !c.success).map(|c| {
                let how = match (&c.error, c.exit_code) {
                    (Some(error), _) => error.clone(),
                    (None, Some(code)) => format!("exited {code}"),
                    (None, None) => "exited without a code".to_owned(),
                };
                format!("{}: {how}", c.argv.join(" "))
            }))
            .collect();
        let reason = format!("rendering configuration failed: {}", failures.join("; "));
        t.end(
            STEP,
            StepOutcome::Failed,
            Some(reason.clone()),
            started.elapsed(),
        )?;
        Err(Halt(reason))
    }

    async fn run_command(
        &self,
        t: &mut BootTracker,
        name: &str,
        command: &settings_model::model::BootstrapCommand,
    ) -> Result<(), Halt> {
        let step = format!("bootstrap-command:{name}");
        let mode = command.mode.unwrap_or(BootstrapMode::Off);
        let essential = command.essential.unwrap_or(false);
        if let Some(outcome) = Self::ended(t, &step) {
            outcome?;
            return self
                .finish_once(t, &step, mode, "bootstrap-commands", name)
                .await;
        }
        if mode == BootstrapMode::Off {
            t.skip(&step, "mode off")?;
            return Ok(());
        }
        if t.record().step(&step).is_some() {
            // Started before keeld restarted: its commands may have half run. Not run
            // again; recorded as failed.
            let reason = "interrupted by a keeld restart; not run again in this boot".to_owned();
            t.end(
                &step,
                StepOutcome::Failed,
                Some(reason.clone()),
                Duration::ZERO,
            )?;
            return if essential {
                Err(Halt(format!("{step}: {reason}")))
            } else {
                Ok(())
            };
        }
        t.begin(&step, essential)?;
        let started = Instant::now();
        let commands = command.commands.clone().unwrap_or_default();
        match bootstrap::run_commands(&commands, &self.config.apiclient, &self.config.socket).await
        {
            Ok(detail) => {
                t.end(
                    &step,
                    StepOutcome::Succeeded,
                    Some(detail),
                    started.elapsed(),
                )?;
                if mode == BootstrapMode::Once {
                    self.switch_off("bootstrap-commands", name).await?;
                }
                Ok(())
            }
            Err(reason) => Self::failed(t, &step, essential, reason, started.elapsed()),
        }
    }

    async fn run_container(
        &self,
        t: &mut BootTracker,
        desired: &DesiredContainer,
        registries: &RegistryConfig,
        spec: StepSpec,
    ) -> Result<(), Halt> {
        let step = format!("bootstrap-container:{}", desired.name);
        if let Some(outcome) = Self::ended(t, &step) {
            // A keeld stopped between recording the outcome and cleaning up left the
            // container behind.
            if let Ok(Some(_)) = self.runtime.find(&desired.id()).await {
                bootstrap::clean_up(&*self.runtime, desired).await;
            }
            outcome?;
            return self
                .finish_once(t, &step, spec.mode, "bootstrap-containers", &desired.name)
                .await;
        }
        if spec.mode == BootstrapMode::Off {
            t.skip(&step, "mode off")?;
            // What a `once` run switched off and a crash kept from being cleaned up.
            if let Ok(Some(_)) = self.runtime.find(&desired.id()).await {
                bootstrap::clean_up(&*self.runtime, desired).await;
            }
            return Ok(());
        }
        let resume = t.record().step(&step).is_some();
        let now = self.config.clock.now();
        // How long it ran under an earlier keeld of this boot: its timeout and duration
        // count from its start, not from this keeld's (a record without the time, from
        // an older keeld, counts from now).
        let ran_before = if resume {
            t.record()
                .step(&step)
                .and_then(|s| s.started_boottime_ms)
                .map_or(Duration::ZERO, |ms| {
                    now.saturating_sub(Duration::from_millis(ms))
                })
        } else {
            t.begin_at(&step, spec.essential, Some(now))?;
            Duration::ZERO
        };
        let began = now.saturating_sub(ran_before);
        let elapsed = || self.config.clock.now().saturating_sub(began);
        let ran = bootstrap::run_container(
            &*self.runtime,
            &self.board,
            desired,
            registries,
            spec.timeout,
            ran_before,
            resume,
        )
        .await;
        let failure = match ran {
            Ok(ContainerRun::Exited(0)) => {
                bootstrap::report_end(&self.board, desired, RunState::Succeeded, Some(0), None);
                t.end(
                    &step,
                    StepOutcome::Succeeded,
                    Some("exited 0".into()),
                    elapsed(),
                )?;
                // `once` is over the moment it succeeded: switched off (a durable commit)
                // before the clean-up, whose containerd calls can take a while at boot.
                // The record above is on tmpfs, so a power cut during the clean-up would
                // otherwise run the container again at the next boot. A container left
                // behind by a crash is cleaned up at the next start (above, or as an
                // `off` one below).
                let switched = match spec.mode {
                    BootstrapMode::Once => {
                        self.switch_off("bootstrap-containers", &desired.name).await
                    }
                    _ => Ok(()),
                };
                bootstrap::clean_up(&*self.runtime, desired).await;
                return switched;
            }
            Ok(ContainerRun::Exited(code)) => {
                bootstrap::report_end(
                    &self.board,
                    desired,
                    RunState::Failed,
                    Some(code),
                    Some(format!("exited {code}")),
                );
                format!("exited {code}")
            }
            Ok(ContainerRun::TimedOut { limit, kill_failed }) => {
                let mut reason = format!("timed out after {}", humantime::format_duration(limit));
                if let Some(e) = kill_failed {
                    reason.push_str(&format!(
                        ", and could not be killed (it may still run): {e}"
                    ));
                }
                bootstrap::report_end(
                    &self.board,
                    desired,
                    RunState::Failed,
                    None,
                    Some(reason.clone()),
                );
                reason
            }
            Err(e) => {
                let reason = e.to_string();
                bootstrap::report_end(
                    &self.board,
                    desired,
                    RunState::Failed,
                    None,
                    Some(reason.clone()),
                );
                reason
            }
        };
        t.end(&step, StepOutcome::Failed, Some(failure.clone()), elapsed())?;
        bootstrap::clean_up(&*self.runtime, desired).await;
        if spec.essential {
            Err(Halt(format!("essential {step} failed: {failure}")))
        } else {
            tracing::warn!(%step, reason = %failure, "non-essential bootstrap container failed; boot goes on");
            Ok(())
        }
    }

    /// Commits `mode = off` for a `once` item that succeeded, as its own transaction
    /// (so history shows who switched it and when).
    async fn switch_off(&self, group: &str, name: &str) -> Result<(), Halt> {
        let tx = format!("boot-{group}-{name}");
        let patch = json!({ group: { name: { "mode": "off" } } });
        let done = async {
            self.store.patch(&tx, patch).await?;
            self.store.commit(&tx, Caller::keeld()).await
        }
        .await;
        done.map(drop)
            .map_err(|e| Halt(format!("switching {group}.{name} to off: {e}")))
    }
}

/// A bootstrap item's mode, essential flag and timeout.
#[derive(Debug, Clone, Copy)]
struct StepSpec {
    mode: BootstrapMode,
    essential: bool,
    timeout: Option<Duration>,
}

/// Creates `path` durably: the file is fsync'd, then its directory, so a crash right
/// after cannot make a later boot run the providers again.
fn write_marker(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
