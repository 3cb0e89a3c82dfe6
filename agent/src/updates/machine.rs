//! The update state machine (Bottlerocket's): which command is allowed in which state,
//! the one lock, commands run in the background, and the record kept across keeld
//! restarts and reboots.
//!
//! Transitions, as `thar-be-updates` has them:
//! - `refresh-updates` in any state; from `Idle`/`Available` it goes to `Available` when an
//!   update is chosen, else `Idle`; later states keep their state;
//! - `prepare-update` from `Available` or `Staged` (404 without a chosen update) → `Staged`;
//! - `activate-update` from `Staged` (404 without a staged image) → `Ready`;
//! - `deactivate-update` from `Ready` → `Staged`;
//! - anything else is 409; any command while another runs is 423.
//!
//! A command is checked and recorded as started (durably) before the API answers 204; it
//! then runs on its own task, and its outcome goes into `most_recent_command` and the
//! state, durably, in one write. A prepare that fails after the inactive slot was given up
//! leaves `Available` (nothing is staged any more). At start, keeld reconciles the record
//! with the disk: a command the record shows as running ended with the previous keeld; an
//! activation made in an earlier boot either booted (the running slot is the activated
//! one: `last_boot.outcome = updated`) or rolled back (`rolled-back`, with what the
//! boot loader's counter says); and a staged or activated slot whose kernel or initrd is
//! no longer on the ESP is staged no more (its loader entry removed: an entry without
//! them would fail in the boot loader), with the reason where a failed command's goes.
//!
//! Every change it records is published on the event bus (`update` events): the end of
//! each command (its outcome, the state before and after) and what start-up found.
//!
//! Must not parse HTTP: `api/updates.rs` does.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use semver::Version;

use super::loader::EntryInfo;
use super::manifest::{choose, Wanted, MAX_SEED};
use super::prepare::{prepare, PrepareInput};
use super::protocol::{Inspection, Request};
use super::repository::{RepositoryConfig, UpdateRepository};
use super::settings::UpdateSettings;
use super::slots::Slot;
use super::status::{
    self, BootOutcome, CommandResult, CommandStatus, CommandType, LastBoot, Progress,
    RunningCommand, StagedImage, StagedSlot, UpdateImage, UpdateRecord, UpdateState, UpdateStatus,
};
use super::writer_client::{WriterEndpoint, WriterError, WriterSession};
use crate::events::{EventBody, EventBus, UpdateEvent};
use crate::os::OsInfo;
use crate::store::Store;

/// How long a command asked for waits for the lock while no command runs (see
/// [`Updates::start`]).
const BOOKKEEPING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How keeld updates this host.
#[derive(Debug, Clone)]
pub struct UpdatesConfig {
    pub repository: RepositoryConfig,
    /// The slot writer; `None` on a host without A/B slots (every prepare, activate and
    /// deactivate then fails saying so).
    pub writer: Option<WriterEndpoint>,
    /// The durable record (`<state-dir>/updates/status.json`).
    pub record: PathBuf,
    /// Boot attempts a newly activated slot gets.
    pub tries: u32,
}

/// Why a command was not started: answered to the caller at once.
#[derive(Debug, thiserror::Error)]
pub enum CommandRefused {
    /// 423, as Bottlerocket.
    #[error("Update lock held: another update command ({0}) is running")]
    Locked(String),
    /// 409.
    #[error("{command} is not allowed when the update state is {state:?}{needs}")]
    Disallowed {
        command: &'static str,
        state: UpdateState,
        needs: &'static str,
    },
    /// 404.
    #[error("No update has been chosen: run refresh-updates first")]
    UpdateDoesNotExist,
    /// 404.
    #[error("No update image applied to staging partition")]
    NoStagedImage,
    /// The record could not be written: nothing started (503).
    #[error("{0}")]
    Persist(String),
}

struct Inner {
    config: UpdatesConfig,
    store: Store,
    os: Arc<OsInfo>,
    /// Held by the command running (and by the start-up reconciliation).
    lock: Arc<tokio::sync::Mutex<CommandType>>,
    record: Mutex<UpdateRecord>,
    running: Mutex<Option<RunningCommand>>,
    /// Set once the start-up reconciliation ended: commands asked for before wait for it.
    reconciled: tokio::sync::watch::Sender<bool>,
    events: EventBus,
    /// Test hook: the reconciliation panics (a bug) as it starts.
    #[cfg(test)]
    panic_in_reconcile: std::sync::atomic::AtomicBool,
    /// Test hook: this many saves of a command's outcome fail (a full or failing disk).
    #[cfg(test)]
    fail_outcome_saves: std::sync::atomic::AtomicUsize,
}

/// The update machinery; cheap to clone.
#[derive(Clone)]
pub struct Updates {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Updates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updates").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Updates {
    /// Loads the record (a new one, with a random seed, on first use). Reconciliation
    /// with the disk runs in the background ([`Updates::reconcile`]), holding the lock.
    pub fn open(config: UpdatesConfig, store: Store, os: Arc<OsInfo>, events: EventBus) -> Updates {
        // A read that fails (not a record that reads wrong) may pass a moment later:
        // tried five times over about a second before the record is given up, since
        // starting over forgets an activated update (reconciliation would deactivate it).
        let mut loaded = status::load(&config.record);
        for _ in 0..4 {
            if !matches!(loaded, Err(status::RecordError::Io { .. })) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            loaded = status::load(&config.record);
        }
        let record = match loaded {
            Ok(Some(record)) => record,
            Ok(None) => UpdateRecord::new(rand::random::<u32>() % (MAX_SEED + 1)),
            Err(e) => {
                // Unreadable: start over rather than refuse to serve; the slots and the
                // loader entries on disk are the truth reconciliation reads. The file
                // is kept beside, for whoever looks into why.
                let aside = config.record.with_extension("json.unreadable");
                let kept = std::fs::rename(&config.record, &aside).map_err(|e| e.to_string());
                tracing::error!(error = %e, kept_as = %aside.display(), kept = ?kept, "the update record is unreadable; starting a new one");
                UpdateRecord::new(rand::random::<u32>() % (MAX_SEED + 1))
            }
        };
        let updates = Updates {
            inner: Arc::new(Inner {
                config,
                store,
                os,
                lock: Arc::new(tokio::sync::Mutex::new(CommandType::Refresh)),
                record: Mutex::new(record),
                running: Mutex::new(None),
                reconciled: tokio::sync::watch::channel(false).0,
                events,
                #[cfg(test)]
                panic_in_reconcile: std::sync::atomic::AtomicBool::new(false),
                #[cfg(test)]
                fail_outcome_saves: std::sync::atomic::AtomicUsize::new(0),
            }),
        };
        updates.set_active_partition(None);
        updates
    }

    fn running_version(&self) -> Result<Version, String> {
        Version::parse(&self.inner.os.version_id).map_err(|e| {
            format!(
                "the running version {:?} is not a semantic version: {e}",
                self.inner.os.version_id
            )
        })
    }

    fn running_image(&self) -> Option<UpdateImage> {
        Some(UpdateImage {
            arch: self.inner.os.arch.clone(),
            version: self.running_version().ok()?,
            variant: self.inner.os.variant_id.clone(),
        })
    }

    /// Keeps `active_partition` in line with the running image and the state.
    fn set_active_partition(&self, slot: Option<Slot>) {
        let image = self.running_image();
        let mut record = lock(&self.inner.record);
        let slot = slot.or(record.status.active_partition.as_ref().and_then(|p| p.slot));
        let ready = record.status.update_state == UpdateState::Ready;
        record.status.active_partition = image.map(|image| StagedImage {
            image,
            next_to_boot: !ready,
            slot,
        });
    }

    /// Whether the start-up reconciliation is still running (the status is then what was
    /// recorded before keeld started, not yet what happened meanwhile).
    pub fn reconciling(&self) -> bool {
        !*self.inner.reconciled.borrow()
    }

    /// `GET /updates/status`: the record, with the command in progress.
    pub fn status(&self) -> UpdateStatus {
        let mut status = lock(&self.inner.record).status.clone();
        status.running_command = lock(&self.inner.running).clone();
        status
    }

    /// Publishes an `update` event: the state now, the state before, and `detail`.
    fn publish(&self, previous: UpdateState, detail: serde_json::Value) {
        let status = self.status();
        let name = |state: UpdateState| format!("{state:?}");
        let mut detail = detail;
        if let serde_json::Value::Object(map) = &mut detail {
            if let Some(chosen) = &status.chosen_update {
                map.insert("chosen-version".into(), chosen.version.to_string().into());
            }
            if let Some(staged) = &status.staging_partition {
                map.insert(
                    "staged-version".into(),
                    staged.image.version.to_string().into(),
                );
                if let Some(slot) = staged.slot {
                    map.insert("staged-slot".into(), slot.as_str().into());
                }
            }
        }
        self.inner
            .events
            .publish(EventBody::Update(UpdateEvent::new(
                name(status.update_state),
                Some(&name(previous)),
                detail,
            )));
    }

    async fn save(&self) -> Result<(), String> {
        let record = lock(&self.inner.record).clone();
        let path = self.inner.config.record.clone();
        tokio::task::spawn_blocking(move || status::save(&path, &record))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Checks `command` against the state, records it as started (durably) and runs it
    /// on its own task. Answers once it started.
    pub async fn start(&self, command: CommandType) -> Result<(), CommandRefused> {
        // Right after keeld started, the record may not yet say what happened while it
        // was down: wait for that (it takes one look at the slots), not 423.
        let mut reconciled = self.inner.reconciled.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            reconciled.wait_for(|done| *done),
        )
        .await;
        let running = || lock(&self.inner.running).as_ref().map(|r| r.cmd_type);
        let guard = match self.inner.lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => match running() {
                Some(command) => return Err(CommandRefused::Locked(command.action().to_owned())),
                // No command runs: the lock is held for bookkeeping (a command's outcome
                // being saved after its status already shows it, the end of a trial
                // boot), which takes a moment. A client that saw the outcome and asks for
                // the next command waits for it, not 423.
                None => match tokio::time::timeout(
                    BOOKKEEPING_WAIT,
                    self.inner.lock.clone().lock_owned(),
                )
                .await
                {
                    Ok(guard) => guard,
                    Err(_) => {
                        let holder = running().map_or("update bookkeeping", |c| c.action());
                        return Err(CommandRefused::Locked(holder.to_owned()));
                    }
                },
            },
        };
        {
            let record = lock(&self.inner.record);
            let state = record.status.update_state;
            let disallowed = |needs| CommandRefused::Disallowed {
                command: command.action(),
                state,
                needs,
            };
            match command {
                CommandType::Refresh => {}
                CommandType::Prepare => {
                    if !matches!(state, UpdateState::Available | UpdateState::Staged) {
                        return Err(disallowed(" (it needs Available or Staged)"));
                    }
                    if record.status.chosen_update.is_none() {
                        return Err(CommandRefused::UpdateDoesNotExist);
                    }
                }
                CommandType::Activate => {
                    if state != UpdateState::Staged {
                        return Err(disallowed(" (it needs Staged)"));
                    }
                    if record.staged.is_none() {
                        return Err(CommandRefused::NoStagedImage);
                    }
                }
                CommandType::Deactivate => {
                    // Or Staged with an activation on record whose outcome is unknown
                    // (its answer was lost, the disk could not be read): deactivating
                    // makes sure the slot is not the next boot, as that error advises.
                    let unknown = state == UpdateState::Staged
                        && record
                            .staged
                            .as_ref()
                            .is_some_and(|s| s.activated_in_boot.is_some());
                    if state != UpdateState::Ready && !unknown {
                        return Err(disallowed(" (it needs Ready)"));
                    }
                    if record.staged.is_none() {
                        return Err(CommandRefused::NoStagedImage);
                    }
                }
            }
        }
        // From here on, on a task of its own, with the lock: a client that hangs up
        // while the start is being saved drops only its wait for the answer. (Dropped
        // with the save in flight, the record would say a command was running that
        // never ran, and the lock would be free while that save still wrote.)
        let this = self.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _guard = guard;
            let started = status::next_timestamp(None);
            lock(&this.inner.record).interrupted = Some(command);
            if let Err(e) = this.save().await {
                lock(&this.inner.record).interrupted = None;
                let _ = answer.send(Err(CommandRefused::Persist(format!(
                    "cannot record the start of {}: {e}",
                    command.action()
                ))));
                return;
            }
            *lock(&this.inner.running) = Some(RunningCommand {
                cmd_type: command,
                started,
                progress: None,
            });
            tracing::info!(command = command.action(), "update command started");
            let previous = lock(&this.inner.record).status.update_state;
            let _ = answer.send(Ok(()));
            // A panic (a bug) must still end the command, or every later one gets 423
            // until keeld restarts.
            let outcome = std::panic::AssertUnwindSafe(this.run(command))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!(command = command.action(), "the update command panicked");
                    Err(format!(
                        "{} failed unexpectedly (a bug in keeld; its log has the details)",
                        command.action()
                    ))
                });
            this.finish(command, previous, outcome).await;
        });
        answered.await.unwrap_or_else(|_| {
            Err(CommandRefused::Persist(format!(
                "{} did not start (a bug in keeld; its log has the details)",
                command.action()
            )))
        })
    }

    /// Records the outcome of `command` (durably) and ends it.
    async fn finish(
        &self,
        command: CommandType,
        previous: UpdateState,
        outcome: Result<(), String>,
    ) {
        {
            let mut record = lock(&self.inner.record);
            record_outcome(&mut record, command, outcome.clone());
            record.interrupted = None;
        }
        self.set_active_partition(None);
        self.save_outcome(command).await;
        *lock(&self.inner.running) = None;
        self.publish(
            previous,
            serde_json::json!({
                "command": command,
                "outcome": if outcome.is_ok() { "Success" } else { "Failed" },
                "error": outcome.as_ref().err(),
            }),
        );
        let state = lock(&self.inner.record).status.update_state;
        match &outcome {
            Ok(()) => {
                tracing::info!(command = command.action(), state = ?state, "update command succeeded")
            }
            Err(reason) => {
                tracing::warn!(command = command.action(), state = ?state, error = %reason, "update command failed")
            }
        }
    }

    /// Saves the record with a command's outcome, trying again a few times (a disk that
    /// was full a moment ago). The command holds the lock meanwhile, so no other starts
    /// on a record that does not say how this one ended. If the save still fails, the
    /// outcome says so (in memory, where clients read it): the disk shows the command as
    /// running, and a keeld that starts before the next save (every start of a command
    /// saves the whole record) closes it as interrupted, from what the slots show.
    async fn save_outcome(&self, command: CommandType) {
        let mut delay = OUTCOME_SAVE_DELAY;
        let mut tries = 0;
        let error = loop {
            tries += 1;
            #[cfg(test)]
            let result = if self
                .inner
                .fail_outcome_saves
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                Err("simulated: No space left on device".to_owned())
            } else {
                self.save().await
            };
            #[cfg(not(test))]
            let result = self.save().await;
            match result {
                Ok(()) => return,
                Err(e) if tries >= OUTCOME_SAVE_TRIES => break e,
                Err(e) => {
                    tracing::warn!(command = command.action(), error = %e, tries, "cannot save the outcome of an update command; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        };
        tracing::error!(command = command.action(), error = %error, "cannot save the outcome of an update command");
        let path = self.inner.config.record.display().to_string();
        if let Some(last) = lock(&self.inner.record).status.most_recent_command.as_mut() {
            let note = format!(
                "the outcome could not be saved in {path} ({error}): if keeld restarts \
                 before the record is saved again, {} reads as interrupted",
                command.action()
            );
            last.stderr = if last.stderr.is_empty() {
                note
            } else {
                format!("{}; {note}", last.stderr)
            };
        }
    }

    fn writer(&self) -> Result<&WriterEndpoint, String> {
        self.inner.config.writer.as_ref().ok_or_else(|| {
            "this host has no slot writer (keeld's --update-writer-socket or \
             --update-writer-command): it cannot install updates"
                .to_owned()
        })
    }

    fn settings(&self) -> Result<UpdateSettings, String> {
        let snapshot = self.inner.store.snapshot();
        UpdateSettings::from_live(snapshot.live_settings()).map_err(|e| e.to_string())
    }

    fn seed(&self, settings: &UpdateSettings) -> u32 {
        let mut record = lock(&self.inner.record);
        let seed = settings.seed.unwrap_or(record.own_seed);
        record.status.seed = seed;
        seed
    }

    async fn run(&self, command: CommandType) -> Result<(), String> {
        match command {
            CommandType::Refresh => self.refresh().await,
            CommandType::Prepare => self.prepare().await,
            CommandType::Activate => self.activate().await,
            CommandType::Deactivate => self.deactivate().await,
        }
    }

    async fn refresh(&self) -> Result<(), String> {
        let settings = self.settings()?;
        let seed = self.seed(&settings);
        let running = self.running_version()?;
        let (_, manifest) = UpdateRepository::load_with_manifest(
            &self.inner.config.repository,
            settings.metadata.clone(),
            settings.targets.clone(),
            settings.proxy.as_ref(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let choice = choose(
            &manifest,
            &Wanted {
                variant: &self.inner.os.variant_id,
                arch: &self.inner.os.arch,
                running: &running,
                lock: &settings.lock,
                seed,
                ignore_waves: settings.ignore_waves,
                now: jiff::Timestamp::now(),
            },
        )
        .map_err(|e| e.to_string())?;
        tracing::info!(chosen = ?choice.chosen.as_ref().map(|u| u.version.to_string()), reason = %choice.reason, "updates refreshed");
        let mut record = lock(&self.inner.record);
        record.status.available_updates = choice.available;
        record.status.chosen_update = choice.chosen.as_ref().map(|u| UpdateImage {
            arch: u.arch.clone(),
            version: u.version.clone(),
            variant: u.variant.clone(),
        });
        record.status.chosen_update_reason = Some(choice.reason);
        if matches!(
            record.status.update_state,
            UpdateState::Idle | UpdateState::Available
        ) {
            record.status.update_state = if choice.chosen.is_some() {
                UpdateState::Available
            } else {
                UpdateState::Idle
            };
        }
        Ok(())
    }

    async fn prepare(&self) -> Result<(), String> {
        let writer = self.writer()?.clone();
        let settings = self.settings()?;
        let seed = self.seed(&settings);
        let running = self.running_version()?;
        let chosen = lock(&self.inner.record)
            .status
            .chosen_update
            .clone()
            .ok_or_else(|| "no update is chosen".to_owned())?;
        let progress_sink = {
            let this = self.clone();
            Arc::new(move |progress: Progress| {
                if let Some(running) = lock(&this.inner.running).as_mut() {
                    running.progress = Some(progress);
                }
            })
        };
        let lock_setting = settings.lock.clone();
        let ignore_waves = settings.ignore_waves;
        let result = prepare(PrepareInput {
            repository: &self.inner.config.repository,
            writer: &writer,
            settings,
            wanted: Wanted {
                variant: &self.inner.os.variant_id,
                arch: &self.inner.os.arch,
                running: &running,
                lock: &lock_setting,
                seed,
                ignore_waves,
                now: jiff::Timestamp::now(),
            },
            chosen: &chosen,
            progress: progress_sink,
        })
        .await;
        let mut record = lock(&self.inner.record);
        match result {
            Ok(staged) => {
                record.status.staging_partition = Some(StagedImage {
                    image: staged.image.clone(),
                    next_to_boot: false,
                    slot: Some(staged.slot),
                });
                record.staged = Some(staged);
                record.status.update_state = UpdateState::Staged;
                Ok(())
            }
            Err(failure) => {
                if failure.touched {
                    // The inactive slot no longer holds what was staged, if anything.
                    record.staged = None;
                    record.status.staging_partition = None;
                    record.status.update_state = UpdateState::Available;
                }
                Err(failure.message)
            }
        }
    }

    async fn activate(&self) -> Result<(), String> {
        let writer = self.writer()?.clone();
        let staged = lock(&self.inner.record)
            .staged
            .clone()
            .ok_or_else(|| "no update is staged".to_owned())?;
        let mut session = WriterSession::open(&writer)
            .await
            .map_err(|e| e.to_string())?;
        let inspection = session.inspect().await.map_err(|e| e.to_string())?;
        // Written ahead, durably: once the entry exists, a crash or power cut before this
        // command's outcome is saved must still leave a record that knows the activation
        // happened in this boot, or the next start could not tell a trial boot or a
        // rollback (it would read `Ready` for a slot already running).
        {
            let mut record = lock(&self.inner.record);
            if let Some(staged) = record.staged.as_mut() {
                staged.activated_in_boot = Some(inspection.boot_id.clone());
                staged.activated_from = self.running_version().ok();
            }
        }
        if let Err(e) = self.save().await {
            if let Some(staged) = lock(&self.inner.record).staged.as_mut() {
                staged.activated_in_boot = None;
                staged.activated_from = None;
            }
            session.close().await;
            return Err(format!(
                "cannot record the activation before making it: {e}"
            ));
        }
        let activated = session
            .simple(&Request::Activate {
                slot: staged.slot,
                os_version: staged.image.version.to_string(),
                root_hash: staged.root_hash.clone(),
                tries: self.inner.config.tries,
            })
            .await;
        session.close().await;
        let refused = matches!(activated, Err(WriterError::Refused(_)));
        let outcome = match activated {
            Ok(_) => Ok(()),
            // The answer was lost, or a refusal came after the entry's rename (its
            // fsync, or removing an older entry, failed): the disk says whether the
            // entry is there (`inspect_after`). A staged slot has none before its
            // activation.
            Err(e) => {
                let written = inspect_after(&writer, &e)
                    .await
                    .ok()
                    .map(|i| entry_of(&i, staged.slot).is_some_and(|e| !e.is_bad()));
                match written {
                    Some(true) => {
                        tracing::warn!(slot = %staged.slot, error = %e, "the slot writer did not answer that it activated, but the slot's loader entry is written: activated");
                        Ok(())
                    }
                    // Refused, and the entries cannot be read: a refusal comes before the
                    // write far more often than after it.
                    None if refused => Err((e.to_string(), Some(false))),
                    other => Err((e.to_string(), other)),
                }
            }
        };
        let mut record = lock(&self.inner.record);
        match outcome {
            Ok(()) => {
                if let Some(partition) = record.status.staging_partition.as_mut() {
                    partition.next_to_boot = true;
                }
                record.status.update_state = UpdateState::Ready;
                Ok(())
            }
            Err((error, Some(false))) => {
                if let Some(staged) = record.staged.as_mut() {
                    staged.activated_in_boot = None;
                    staged.activated_from = None;
                }
                Err(error)
            }
            // Unknown: the activation stays on record, so that the boot that follows
            // is read for what it was either way.
            Err((error, _)) => Err(format!(
                "{error}; whether slot {} is the next boot is unknown: run \
                 deactivate-update to be sure it is not, or activate-update again",
                staged.slot
            )),
        }
    }

    async fn deactivate(&self) -> Result<(), String> {
        let writer = self.writer()?.clone();
        let slot = lock(&self.inner.record)
            .staged
            .as_ref()
            .map(|s| s.slot)
            .ok_or_else(|| "no update is staged".to_owned())?;
        let mut session = WriterSession::open(&writer)
            .await
            .map_err(|e| e.to_string())?;
        let deactivated = session.simple(&Request::Deactivate { slot }).await;
        session.close().await;
        if let Err(e) = deactivated {
            // The answer may be lost after the entry went: the disk says.
            let gone = inspect_after(&writer, &e)
                .await
                .ok()
                .map(|i| entry_of(&i, slot).is_none());
            if gone != Some(true) {
                return Err(e.to_string());
            }
            tracing::warn!(%slot, error = %e, "the slot writer did not answer that it deactivated, but the slot's loader entry is gone: deactivated");
        }
        let mut record = lock(&self.inner.record);
        if let Some(staged) = record.staged.as_mut() {
            staged.activated_in_boot = None;
            staged.activated_from = None;
        }
        if let Some(partition) = record.status.staging_partition.as_mut() {
            partition.next_to_boot = false;
        }
        record.status.update_state = UpdateState::Staged;
        Ok(())
    }

    /// The boot reached `configured`: a slot on trial is good (systemd-bless-boot marks
    /// its loader entry next), so the update is done. Waits for the start-up
    /// reconciliation first; nothing to do when no trial is on record.
    pub async fn boot_configured(&self) {
        let mut reconciled = self.inner.reconciled.subscribe();
        if reconciled.wait_for(|done| *done).await.is_err() {
            return;
        }
        let guard = self.inner.lock.clone().lock_owned().await;
        let running = self.running_version().ok();
        let previous = {
            let mut record = lock(&self.inner.record);
            let Some((trial, staged)) = trial_ended_by_this_boot(&record, running.as_ref()) else {
                return;
            };
            let previous = record.status.update_state;
            updated(
                &mut record,
                &staged,
                &trial.previous_version,
                &trial.version,
                status::next_timestamp(None),
            );
            previous
        };
        if let Err(e) = self.save().await {
            tracing::error!(error = %e, "cannot save the update record after the trial boot");
        }
        drop(guard);
        let status = self.status();
        tracing::info!(last_boot = ?status.last_boot, "the boot on trial reached configured: update done");
        self.publish(
            previous,
            serde_json::json!({ "configured": true, "last-boot": status.last_boot }),
        );
    }

    /// At start: brings the record in line with what happened while keeld was not
    /// running (a command cut short, a reboot into the activated slot, a rollback), holding
    /// the lock meanwhile (a command asked for then gets 423). Without a slot writer only
    /// an interrupted command is closed.
    pub async fn reconcile(&self) {
        let reconciled = std::panic::AssertUnwindSafe(self.reconcile_record()).catch_unwind();
        if reconciled.await.is_err() {
            // A bug: commands must not wait for a reconciliation that will never end.
            tracing::error!("reconciling the update record with the disk panicked; the update status shows what was recorded");
            self.inner.reconciled.send_replace(true);
        }
    }

    async fn reconcile_record(&self) {
        let guard = self.inner.lock.clone().lock_owned().await;
        #[cfg(test)]
        if self
            .inner
            .panic_in_reconcile
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            panic!("simulated bug in the reconciliation");
        }
        // An activate or deactivate cut short by keeld's end may still be running: its
        // writer session is a unit of its own and outlives keeld. Whether it wrote or
        // removed the entry is read once that session has ended (a settled inspect); if
        // that cannot be had, the rest is reconciled from what the disk says now, and the
        // command stays on record for the next start.
        let slot_change_interrupted = matches!(
            lock(&self.inner.record).interrupted,
            Some(CommandType::Activate | CommandType::Deactivate)
        );
        let (inspection, settled) = match &self.inner.config.writer {
            None => (None, true),
            Some(endpoint) => {
                let settled = if slot_change_interrupted {
                    inspect_settled(endpoint).await.map_err(|e| {
                        tracing::warn!(error = %e, "cannot read the slots once the interrupted command's writer session has ended; it stays on record for the next start");
                    }).ok()
                } else {
                    None
                };
                match settled {
                    Some(inspection) => (Some(inspection), true),
                    None => {
                        let now = inspect(endpoint).await.map_err(|e| {
                            tracing::warn!(error = %e, "cannot inspect the slots; the update status shows what was recorded");
                        });
                        (now.ok(), !slot_change_interrupted)
                    }
                }
            }
        };
        let running = self.running_version().ok();
        let (previous, interrupted, last_boot_before) = {
            let record = lock(&self.inner.record);
            (
                record.status.update_state,
                record.interrupted,
                record.status.last_boot.clone(),
            )
        };
        {
            let mut record = lock(&self.inner.record);
            close_interrupted(&mut record, inspection.as_ref().filter(|_| settled));
            if let (Some(inspection), Some(running)) = (&inspection, &running) {
                after_reboot(&mut record, inspection, running);
            }
        }
        let lost = inspection.as_ref().and_then(|inspection| {
            let record = lock(&self.inner.record);
            staged_files_lost(&record, inspection)
        });
        if let Some(lost) = &lost {
            // The entry goes first: if that fails, the record still says Ready, and an
            // activation or deactivation asked for later meets the same error.
            let removed = match (&self.inner.config.writer, lost.had_entry) {
                (Some(endpoint), true) => deactivate(endpoint, lost.slot).await,
                _ => Ok(()),
            };
            match removed {
                Ok(()) => {
                    tracing::error!(slot = %lost.slot, reason = %lost.reason, "the staged update is gone");
                    forget_lost(&mut lock(&self.inner.record), lost);
                }
                Err(e) => tracing::error!(
                    slot = %lost.slot, reason = %lost.reason, error = %e,
                    "the staged update is gone, and its loader entry cannot be removed"
                ),
            }
        }
        // (After a lost stage the inspection is stale: its entry was just removed.)
        let untracked = inspection
            .as_ref()
            .filter(|_| lost.is_none())
            .and_then(|inspection| {
                let record = lock(&self.inner.record);
                untracked_activation(&record, inspection)
            });
        if let (Some(untracked), Some(endpoint)) = (&untracked, &self.inner.config.writer) {
            // Booting it would put the host on a version nothing on record vouches for
            // (and whose trial nothing would follow): it is withdrawn, and the
            // update can be prepared again.
            match deactivate(endpoint, untracked.slot).await {
                Ok(()) => {
                    tracing::error!(slot = %untracked.slot, entry = %untracked.entry, "a loader entry activated the inactive slot without a record of it; removed");
                    record_outcome(
                        &mut lock(&self.inner.record),
                        CommandType::Activate,
                        Err(untracked.reason()),
                    );
                }
                Err(e) => tracing::error!(
                    slot = %untracked.slot, entry = %untracked.entry, error = %e,
                    "a loader entry activates the inactive slot without a record of it, and cannot be removed"
                ),
            }
        }
        self.set_active_partition(inspection.as_ref().map(|i| i.active));
        if let Err(e) = self.save().await {
            tracing::error!(error = %e, "cannot save the reconciled update record");
        }
        drop(guard);
        self.inner.reconciled.send_replace(true);
        let status = self.status();
        let last_boot_changed = status.last_boot != last_boot_before;
        if interrupted.is_some() || last_boot_changed || lost.is_some() || untracked.is_some() {
            // `null` when the last boot says nothing new.
            let last_boot = last_boot_changed
                .then(|| status.last_boot.clone())
                .flatten();
            self.publish(
                previous,
                serde_json::json!({
                    "at-start": true,
                    "interrupted": interrupted,
                    "last-boot": last_boot,
                    "staged-lost": lost.as_ref().map(|l| &l.reason),
                    "untracked-entry": untracked.as_ref().map(|u| &u.entry),
                }),
            );
        }
        tracing::info!(state = ?status.update_state, last_boot = ?status.last_boot, "update state reconciled");
    }
}

/// What the disk says now.
async fn inspect(endpoint: &WriterEndpoint) -> Result<Inspection, String> {
    inspect_by(endpoint, &Request::Inspect).await
}

/// What the disk says once no writer session holds the slots: after a slot change whose
/// answer was lost or given up on, that session may still be writing, and an inspect
/// answered at once could read the entries from before it (the session's hold on the
/// slots ends with it; the writer waits for it up to its `--session-wait`).
async fn inspect_settled(endpoint: &WriterEndpoint) -> Result<Inspection, String> {
    inspect_by(endpoint, &Request::InspectSettled).await
}

/// What the disk says after a slot change failed with `error`: at once after a refusal
/// (the session's last word on it); otherwise (the answer lost, or given up on: the
/// session may still be writing) once the session has ended.
async fn inspect_after(
    endpoint: &WriterEndpoint,
    error: &WriterError,
) -> Result<Inspection, String> {
    if matches!(error, WriterError::Refused(_)) {
        inspect(endpoint).await
    } else {
        inspect_settled(endpoint).await
    }
}

/// `request` is `Inspect` or `InspectSettled`, in a session of its own.
async fn inspect_by(endpoint: &WriterEndpoint, request: &Request) -> Result<Inspection, String> {
    let mut session = WriterSession::open(endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let inspection = session
        .inspect_with(request)
        .await
        .map_err(|e| e.to_string());
    session.close().await;
    inspection
}

async fn deactivate(endpoint: &WriterEndpoint, slot: Slot) -> Result<(), String> {
    let mut session = WriterSession::open(endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let done = session
        .simple(&Request::Deactivate { slot })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    session.close().await;
    done
}

/// A staged slot found without its boot files at start.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LostStage {
    slot: Slot,
    /// It was activated: its loader entry must go.
    had_entry: bool,
    reason: String,
}

/// At start, after the record is reconciled: is the slot it shows as staged (or
/// activated, and not running) still missing a kernel or initrd on the ESP? Activation
/// would refuse it, and a boot of its entry would fail in the boot loader.
fn staged_files_lost(record: &UpdateRecord, inspection: &Inspection) -> Option<LostStage> {
    let state = record.status.update_state;
    if !matches!(state, UpdateState::Staged | UpdateState::Ready) {
        return None;
    }
    let staged = record.staged.as_ref()?;
    if staged.slot == inspection.active {
        return None;
    }
    let (_, missing) = inspection
        .missing_boot_files
        .iter()
        .find(|(slot, _)| *slot == staged.slot)?;
    Some(LostStage {
        slot: staged.slot,
        had_entry: state == UpdateState::Ready || entry_of(inspection, staged.slot).is_some(),
        reason: format!(
            "at start, the update staged in slot {} ({}) is incomplete: {missing}. Run \
             prepare-update again",
            staged.slot, staged.image.version
        ),
    })
}

/// A loader entry that would boot the inactive slot on trial, with nothing staged on
/// record for it: the record was unreadable (and started over) or lost after the
/// activation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UntrackedActivation {
    slot: Slot,
    entry: String,
}

impl UntrackedActivation {
    fn reason(&self) -> String {
        format!(
            "at start, loader entry {} would boot slot {} on trial, but no update staged \
             there is on record (the update record was unreadable or lost): the entry was \
             removed, and the next boot stays on this slot. Run prepare-update again",
            self.entry, self.slot
        )
    }
}

fn untracked_activation(
    record: &UpdateRecord,
    inspection: &Inspection,
) -> Option<UntrackedActivation> {
    let entry = inspection
        .entries
        .iter()
        .find(|e| e.slot != inspection.active && e.is_counting() && !e.is_bad())?;
    if record.staged.as_ref().is_some_and(|s| s.slot == entry.slot) {
        return None;
    }
    // An update concluded on that slot whose entry systemd-bless-boot never renamed (the
    // host went down between the two, then the old slot was chosen by hand): the record
    // vouches for it, and its next boot is a trial that blesses it.
    if record
        .status
        .last_boot
        .as_ref()
        .is_some_and(|b| b.outcome == BootOutcome::Updated && b.slot == entry.slot)
    {
        return None;
    }
    Some(UntrackedActivation {
        slot: entry.slot,
        entry: entry.file.clone(),
    })
}

/// What [`staged_files_lost`] found, once the entry is gone: nothing is staged, and the
/// command that staged (or activated) it reads as failed, with the reason.
fn forget_lost(record: &mut UpdateRecord, lost: &LostStage) {
    let cmd_type = if record.status.update_state == UpdateState::Ready {
        CommandType::Activate
    } else {
        CommandType::Prepare
    };
    unstage(record);
    record_outcome(record, cmd_type, Err(lost.reason.clone()));
}

/// Nothing is staged: back to `Available` if an update is chosen, else `Idle`.
fn unstage(record: &mut UpdateRecord) {
    record.staged = None;
    record.status.staging_partition = None;
    record.status.update_state = if record.status.chosen_update.is_some() {
        UpdateState::Available
    } else {
        UpdateState::Idle
    };
}

/// `most_recent_command` becomes `cmd_type` with `outcome` (a failure's reason as its
/// stderr), stamped after the one it replaces.
fn record_outcome(record: &mut UpdateRecord, cmd_type: CommandType, outcome: Result<(), String>) {
    let previous = record
        .status
        .most_recent_command
        .as_ref()
        .map(|c| c.timestamp.clone());
    let (cmd_status, exit_status, stderr) = match outcome {
        Ok(()) => (CommandStatus::Success, 0, String::new()),
        Err(reason) => (CommandStatus::Failed, 1, reason),
    };
    record.status.most_recent_command = Some(CommandResult {
        cmd_type,
        cmd_status,
        timestamp: status::next_timestamp(previous.as_deref()),
        exit_status,
        stderr,
    });
}

fn entry_of(inspection: &Inspection, slot: Slot) -> Option<&EntryInfo> {
    inspection.entries.iter().find(|e| e.slot == slot)
}

/// A command the record shows as running ended with the previous keeld.
fn close_interrupted(record: &mut UpdateRecord, inspection: Option<&Inspection>) {
    let Some(command) = record.interrupted else {
        return;
    };
    if inspection.is_none() && matches!(command, CommandType::Activate | CommandType::Deactivate) {
        // Whether the entry was written or removed is on the ESP, which the slot writer
        // could not be asked about: the record stays as it is, and the next start
        // looks again.
        tracing::warn!(command = ?command, "an interrupted update command cannot be closed without the slot writer");
        return;
    }
    record.interrupted = None;
    let mut reason = format!("keeld stopped during {}", command.action());
    match command {
        CommandType::Refresh => {}
        CommandType::Prepare => {
            let slot = inspection.map(|i| i.active.other());
            reason.push_str(&match slot {
                Some(slot) => format!(
                    ": slot {slot} may hold a partial image; no loader entry names it, so the \
                     running slot stays the boot choice. Run prepare-update again"
                ),
                None => ": the inactive slot may hold a partial image and is not bootable. \
                          Run prepare-update again"
                    .to_owned(),
            });
            unstage(record);
        }
        CommandType::Activate | CommandType::Deactivate => {
            // Each is one file written or removed: the disk says which happened.
            let staged_slot = record.staged.as_ref().map(|s| s.slot);
            let entry = inspection
                .zip(staged_slot)
                .and_then(|(i, slot)| entry_of(i, slot));
            let activated = entry.is_some_and(|e| !e.is_bad());
            // An entry with no tries left was written too: the slot was tried and
            // failed (the power was cut before the outcome was saved, and no keeld on
            // the new slot recorded its trial). The activation stays on record, so that
            // `after_reboot` reports the rollback.
            let written = entry.is_some();
            record.status.update_state = if activated {
                UpdateState::Ready
            } else {
                UpdateState::Staged
            };
            if let Some(partition) = record.status.staging_partition.as_mut() {
                partition.next_to_boot = activated;
            }
            if !written {
                if let Some(staged) = record.staged.as_mut() {
                    staged.activated_in_boot = None;
                }
            }
            reason.push_str(&match (written, activated) {
                (_, true) | (false, _) => format!(
                    "; the staged slot's loader entry is {}: the state is {:?}",
                    if activated { "present" } else { "absent" },
                    record.status.update_state
                ),
                // The activation happened; what came of it is the boot's to tell.
                (true, false) => "; the staged slot's loader entry is there with no tries \
                                  left: the slot was tried, and `last_boot` says how that \
                                  ended"
                    .to_owned(),
            });
        }
    }
    record_outcome(record, command, Err(reason));
}

/// The trial on record that this boot, having reached `configured`, ends as an update:
/// the slot on trial, if the version running is the one tried. The trial is recorded
/// when keeld starts on the new slot; a start that could not inspect the slots (the
/// slot writer unreachable) leaves the previous boot's trial on record, and this boot
/// may then be the old slot after the tries ran out: not an update.
fn trial_ended_by_this_boot(
    record: &UpdateRecord,
    running: Option<&Version>,
) -> Option<(LastBoot, StagedSlot)> {
    let trial = record
        .status
        .last_boot
        .as_ref()
        .filter(|b| b.outcome == BootOutcome::OnTrial)?;
    let staged = record.staged.as_ref().filter(|s| s.slot == trial.slot)?;
    if running != Some(&trial.version) {
        tracing::warn!(tried = %trial.version, running = ?running.map(ToString::to_string),
            "configured, but not running the version on trial: the trial is left for the next start that can inspect the slots");
        return None;
    }
    Some((trial.clone(), staged.clone()))
}

/// An activation made in an earlier boot: did the host boot the new slot?
fn after_reboot(record: &mut UpdateRecord, inspection: &Inspection, running: &Version) {
    let Some(staged) = record.staged.clone() else {
        blessing_lost(record, inspection, running);
        return;
    };
    let Some(activated_in) = staged.activated_in_boot.as_deref() else {
        return;
    };
    if activated_in == inspection.boot_id {
        // keeld restarted within the boot of the activation: nothing happened yet.
        return;
    }
    let previous_version = staged
        .activated_from
        .clone()
        .unwrap_or_else(|| running.clone());
    let noticed = status::next_timestamp(None);
    if inspection.active == staged.slot {
        if let Some(entry) = entry_of(inspection, staged.slot).filter(|e| e.is_counting()) {
            // On trial: the boot loader counts this boot against the entry's tries.
            // The activation stays on record, so that a later start on the other slot
            // knows it was a rollback; `configured` ends the trial ([`Updates::boot_configured`]).
            let already = record
                .status
                .last_boot
                .as_ref()
                .is_some_and(|b| b.outcome == BootOutcome::OnTrial && b.slot == staged.slot);
            if !already {
                record.status.last_boot = Some(LastBoot {
                    outcome: BootOutcome::OnTrial,
                    slot: staged.slot,
                    version: staged.image.version.clone(),
                    previous_version: previous_version.clone(),
                    detail: format!(
                        "booted slot {} with {running} (was {previous_version}) on trial \
                         (loader entry {}): it counts as updated once the host is configured",
                        staged.slot, entry.file
                    ),
                    noticed,
                });
            }
            record.status.staging_partition = None;
            record.status.update_state = UpdateState::Idle;
            return;
        }
        updated(record, &staged, &previous_version, running, noticed);
    } else {
        let entry = entry_of(inspection, staged.slot);
        if let Some(e) = entry.filter(|e| !e.is_bad()) {
            // The old slot booted although the new one's entry has tries left: chosen in
            // the boot menu, or a one-time entry. That entry is still the next boot, so
            // the activation stays, as made in this boot.
            tracing::info!(slot = %staged.slot, entry = %e.file, running = %inspection.active, "the activated slot was not booted this time; its entry stays the next boot");
            if let Some(staged) = record.staged.as_mut() {
                staged.activated_in_boot = Some(inspection.boot_id.clone());
            }
            if let Some(partition) = record.status.staging_partition.as_mut() {
                partition.next_to_boot = true;
            }
            record.status.update_state = UpdateState::Ready;
            return;
        }
        let Some(e) = entry else {
            // No entry names the slot: the activation never wrote it (its outcome was
            // unknown when it ended), so the old slot booting is no rollback. The image
            // stays staged, to activate again.
            tracing::warn!(slot = %staged.slot, running = %inspection.active, "the activation on record never wrote its loader entry: still staged");
            if let Some(staged) = record.staged.as_mut() {
                staged.activated_in_boot = None;
                staged.activated_from = None;
            }
            if let Some(partition) = record.status.staging_partition.as_mut() {
                partition.next_to_boot = false;
            }
            record.status.update_state = UpdateState::Staged;
            return;
        };
        let why = format!(
            "slot {} ({}) did not complete its boot in {} tries (loader entry {}), so the \
             boot loader went back to slot {} ({running})",
            staged.slot,
            staged.image.version,
            e.tries_done.unwrap_or(0),
            e.file,
            inspection.active
        );
        record.status.last_boot = Some(LastBoot {
            outcome: BootOutcome::RolledBack,
            slot: staged.slot,
            version: staged.image.version.clone(),
            previous_version: running.clone(),
            detail: why,
            noticed,
        });
        // The image is still on the slot, but it failed: it is not offered again by
        // itself (refresh, prepare and activate to retry).
        if let Some(partition) = record.status.staging_partition.as_mut() {
            partition.next_to_boot = false;
        }
        record.staged = None;
        record.status.chosen_update = None;
        record.status.update_state = UpdateState::Idle;
    }
}

/// keeld records an update as done when the trial boot reaches `configured`, and
/// systemd-bless-boot marks the slot's loader entry good right after. A power cut between
/// the two leaves the record saying `updated` and the entry still counting; once its
/// tries run out the boot loader goes back to the other slot. Found at a start on the
/// other slot with that slot's entry spent, the outcome becomes what it was: a rollback.
fn blessing_lost(record: &mut UpdateRecord, inspection: &Inspection, running: &Version) {
    let Some(last) = record
        .status
        .last_boot
        .clone()
        .filter(|b| b.outcome == BootOutcome::Updated && b.slot != inspection.active)
    else {
        return;
    };
    let Some(entry) = entry_of(inspection, last.slot).filter(|e| e.is_bad()) else {
        return;
    };
    tracing::warn!(slot = %last.slot, entry = %entry.file, running = %inspection.active, "the updated slot's loader entry was never marked good, and its tries ran out");
    record.status.last_boot = Some(LastBoot {
        outcome: BootOutcome::RolledBack,
        slot: last.slot,
        version: last.version.clone(),
        previous_version: running.clone(),
        detail: format!(
            "slot {} ({}) reached configured, but the host went down before its loader entry \
             was marked good, and once its tries ran out (loader entry {}) the boot loader \
             went back to slot {} ({running})",
            last.slot, last.version, entry.file, inspection.active
        ),
        noticed: status::next_timestamp(None),
    });
}

/// The host runs the staged slot and its boot is good: the update is done.
fn updated(
    record: &mut UpdateRecord,
    staged: &StagedSlot,
    previous_version: &Version,
    running: &Version,
    noticed: String,
) {
    record.status.last_boot = Some(LastBoot {
        outcome: BootOutcome::Updated,
        slot: staged.slot,
        version: staged.image.version.clone(),
        previous_version: previous_version.clone(),
        detail: format!(
            "booted slot {} with {running} (was {previous_version})",
            staged.slot
        ),
        noticed,
    });
    record.staged = None;
    record.status.staging_partition = None;
    record.status.chosen_update = None;
    record.status.available_updates.clear();
    record.status.chosen_update_reason = None;
    record.status.update_state = UpdateState::Idle;
}

/// How many times a command's outcome is saved before the save is given up, and the
/// pause before the second try (doubled before each next).
const OUTCOME_SAVE_TRIES: u32 = 4;
const OUTCOME_SAVE_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    /// Updates on a fresh store, with no slot writer and a repository that cannot be
    /// read (a refresh fails at once, saying why).
    fn updates_in(dir: &std::path::Path) -> Updates {
        updates_with(dir, None)
    }

    /// [`updates_in`], with `writer` as its slot writer.
    fn updates_with(dir: &std::path::Path, writer: Option<WriterEndpoint>) -> Updates {
        let store = Store::open(&dir.join("state"), 10).expect("store");
        let os = Arc::new(OsInfo {
            arch: "x86_64".into(),
            build_id: "test".into(),
            pretty_name: "Keel".into(),
            variant_id: "test".into(),
            version_id: "1.0.0".into(),
        });
        let config = UpdatesConfig {
            repository: RepositoryConfig {
                root: dir.join("no-root.json"),
                datastore: dir.join("datastore"),
                timeouts: Default::default(),
            },
            writer,
            record: dir.join("status.json"),
            tries: 1,
        };
        Updates::open(config, store, os, EventBus::default())
    }

    /// At start, an activate or deactivate that keeld's end cut short is read from the
    /// disk once its writer session (a unit of its own, which outlives keeld) has ended:
    /// a settled inspect. Any other start inspects at once.
    #[tokio::test]
    async fn a_slot_change_cut_short_is_read_from_the_disk_once_its_session_has_ended() {
        for (interrupted, asked) in [
            (Some(CommandType::Activate), "inspect-settled"),
            (Some(CommandType::Deactivate), "inspect-settled"),
            (Some(CommandType::Refresh), "inspect"),
            (None, "inspect"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let answer = serde_json::to_string(&super::super::protocol::Answer::Inspection {
                ok: true,
                inspection: inspection(Slot::A, "boot-1", Vec::new()),
            })
            .expect("json");
            let requests = dir.path().join("requests");
            // A slot writer that writes down each request and answers an inspection.
            let script = format!(
                "while read -r line; do printf '%s\\n' \"$line\" >> '{}'; printf '%s\\n' '{answer}'; done",
                requests.display()
            );
            let updates = updates_with(
                dir.path(),
                Some(WriterEndpoint::Command(vec![
                    "/bin/sh".to_owned(),
                    "-c".to_owned(),
                    script,
                ])),
            );
            lock(&updates.inner.record).interrupted = interrupted;
            updates.reconcile().await;
            let sent = std::fs::read_to_string(&requests).expect("a request");
            let ops: Vec<String> = sent
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("json request");
                    v["op"].as_str().unwrap_or_default().to_owned()
                })
                .collect();
            assert_eq!(ops, vec![asked.to_owned()], "{interrupted:?}");
        }
    }

    /// A reconciliation that panics (a bug) still lets commands through at once: they
    /// wait for the reconciliation to end, and must not wait for one that never will
    /// (nor find its lock held).
    #[tokio::test]
    async fn a_reconciliation_that_panics_does_not_hold_commands_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let updates = updates_in(dir.path());
        updates
            .inner
            .panic_in_reconcile
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // On a task of its own, as keeld runs it: a panic that escaped would end only
        // that task.
        let reconciling = updates.clone();
        let _ = tokio::spawn(async move { reconciling.reconcile().await }).await;
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            updates.start(CommandType::Refresh),
        )
        .await
        .expect("answered without waiting for the reconciliation")
        .expect("started");
    }

    /// Runs a refresh (it fails at once here) and answers its outcome.
    async fn refresh_outcome(updates: &Updates) -> CommandResult {
        let before = updates.status().most_recent_command.map(|c| c.timestamp);
        updates.start(CommandType::Refresh).await.expect("started");
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let status = updates.status();
                match status.most_recent_command {
                    Some(last)
                        if status.running_command.is_none()
                            && Some(&last.timestamp) != before.as_ref() =>
                    {
                        return last
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        })
        .await
        .expect("the command ended")
    }

    /// A save of a command's outcome that fails is tried again; one that keeps failing
    /// is said in the outcome clients read, and the next command's start saves it.
    #[tokio::test]
    async fn an_outcome_that_cannot_be_saved_is_tried_again_then_said() {
        let dir = tempfile::tempdir().expect("tempdir");
        let updates = updates_in(dir.path());
        updates.reconcile().await;
        let on_disk = || {
            status::load(&dir.path().join("status.json"))
                .expect("readable")
                .expect("saved")
        };
        let failing = |n| {
            updates
                .inner
                .fail_outcome_saves
                .store(n, std::sync::atomic::Ordering::SeqCst)
        };
        // Fails twice, then is saved: nothing to say.
        failing(2);
        let last = refresh_outcome(&updates).await;
        assert!(
            !last.stderr.contains("could not be saved"),
            "{}",
            last.stderr
        );
        let saved = on_disk();
        assert!(saved.interrupted.is_none());
        assert_eq!(saved.status.most_recent_command, Some(last));
        // Never saved: the outcome says so, the disk still shows the command running.
        failing(OUTCOME_SAVE_TRIES as usize);
        let last = refresh_outcome(&updates).await;
        assert_eq!(last.cmd_status, CommandStatus::Failed);
        assert!(
            last.stderr.ends_with(&format!(
                "; the outcome could not be saved in {} (simulated: No space left on \
                 device): if keeld restarts before the record is saved again, \
                 refresh-updates reads as interrupted",
                dir.path().join("status.json").display()
            )),
            "{}",
            last.stderr
        );
        assert_eq!(on_disk().interrupted, Some(CommandType::Refresh));
        // Saves work again: the next outcome is on the disk.
        let next = refresh_outcome(&updates).await;
        assert_eq!(on_disk().status.most_recent_command, Some(next));
        assert_eq!(failing_left(&updates), 0);
    }

    fn failing_left(updates: &Updates) -> usize {
        updates
            .inner
            .fail_outcome_saves
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A client that hangs up as soon as its command has started (the API's handler
    /// future is dropped at its first wait) does not cut the start short: the command
    /// runs to its end and records its outcome, and the next command may start (no
    /// 423 from a lock left behind, no command recorded as running that never ran).
    #[tokio::test]
    async fn a_client_that_hangs_up_does_not_cut_a_command_short() {
        let dir = tempfile::tempdir().expect("tempdir");
        let updates = updates_in(dir.path());
        updates.reconcile().await;
        // Polled once, then dropped: the hang-up.
        assert!(updates.start(CommandType::Refresh).now_or_never().is_none());
        let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let status = updates.status();
                if status.running_command.is_none() && status.most_recent_command.is_some() {
                    return status;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the command ran to its end");
        let last = ended.most_recent_command.expect("an outcome");
        assert_eq!(last.cmd_type, CommandType::Refresh);
        assert_eq!(last.cmd_status, CommandStatus::Failed, "{}", last.stderr);
        assert!(lock(&updates.inner.record).interrupted.is_none());
        let on_disk = status::load(&dir.path().join("status.json"))
            .expect("readable")
            .expect("saved");
        assert!(on_disk.interrupted.is_none(), "the outcome was saved");
        // The next command is not refused by a lock left behind.
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            updates.start(CommandType::Refresh),
        )
        .await
        .expect("answered")
        .expect("started");
    }

    fn inspection(active: Slot, boot_id: &str, entries: Vec<EntryInfo>) -> Inspection {
        Inspection {
            active,
            boot_id: boot_id.into(),
            root_size: 1,
            hash_size: 1,
            entries,
            missing_boot_files: vec![],
        }
    }

    fn entry(file: &str) -> EntryInfo {
        let (slot, tries_left, tries_done) =
            crate::updates::loader::parse_entry_name(file).expect("entry name");
        EntryInfo {
            file: file.into(),
            slot,
            tries_left,
            tries_done,
            sort_version: Some(2),
            os_version: Some("1.1.0".into()),
            root_hash: None,
            trial: false,
        }
    }

    fn activated_record() -> UpdateRecord {
        let mut record = UpdateRecord::new(1);
        let image = UpdateImage {
            arch: "x86_64".into(),
            version: Version::new(1, 1, 0),
            variant: "keel-dev".into(),
        };
        record.status.update_state = UpdateState::Ready;
        record.status.chosen_update = Some(image.clone());
        record.status.staging_partition = Some(StagedImage {
            image: image.clone(),
            next_to_boot: true,
            slot: Some(Slot::B),
        });
        record.staged = Some(StagedSlot {
            slot: Slot::B,
            image,
            root_hash: "ab".repeat(32),
            activated_in_boot: Some("boot-1".into()),
            activated_from: Some(Version::new(1, 0, 0)),
        });
        record
    }

    #[test]
    fn a_counting_entry_of_the_inactive_slot_without_a_record_is_untracked() {
        let counting = inspection(
            Slot::A,
            "boot-1",
            vec![entry("keel-a.conf"), entry("keel-b+3.conf")],
        );
        // A fresh record (the old one was unreadable): nothing vouches for slot b.
        assert_eq!(
            untracked_activation(&UpdateRecord::new(1), &counting),
            Some(UntrackedActivation {
                slot: Slot::B,
                entry: "keel-b+3.conf".into()
            })
        );
        // On record: tracked.
        assert_eq!(untracked_activation(&activated_record(), &counting), None);
        // Blessed, spent, or the running slot's own trial: nothing to withdraw.
        for entries in [
            vec![entry("keel-a.conf"), entry("keel-b.conf")],
            vec![entry("keel-a.conf"), entry("keel-b+0-3.conf")],
        ] {
            let found = untracked_activation(
                &UpdateRecord::new(1),
                &inspection(Slot::A, "boot-1", entries),
            );
            assert_eq!(found, None);
        }
        let on_trial = inspection(
            Slot::B,
            "boot-2",
            vec![entry("keel-a.conf"), entry("keel-b+2-1.conf")],
        );
        assert_eq!(untracked_activation(&UpdateRecord::new(1), &on_trial), None);
    }

    #[test]
    fn a_reboot_into_the_activated_slot_is_an_update() {
        let mut record = activated_record();
        after_reboot(
            &mut record,
            &inspection(Slot::B, "boot-2", vec![entry("keel-b.conf")]),
            &Version::new(1, 1, 0),
        );
        assert_eq!(record.status.update_state, UpdateState::Idle);
        let last = record.status.last_boot.expect("last boot");
        assert_eq!(last.outcome, BootOutcome::Updated);
        assert_eq!(last.detail, "booted slot b with 1.1.0 (was 1.0.0)");
        assert_eq!(record.status.staging_partition, None);
        assert_eq!(record.staged, None);
    }

    #[test]
    fn a_bad_entry_and_the_old_slot_running_is_a_rollback_with_the_reason() {
        let mut record = activated_record();
        after_reboot(
            &mut record,
            &inspection(
                Slot::A,
                "boot-5",
                vec![entry("keel-a.conf"), entry("keel-b+0-3.conf")],
            ),
            &Version::new(1, 0, 0),
        );
        assert_eq!(record.status.update_state, UpdateState::Idle);
        let last = record.status.last_boot.expect("last boot");
        assert_eq!(last.outcome, BootOutcome::RolledBack);
        assert_eq!(
            last.detail,
            "slot b (1.1.0) did not complete its boot in 3 tries (loader entry \
             keel-b+0-3.conf), so the boot loader went back to slot a (1.0.0)"
        );
        assert_eq!(
            record.status.staging_partition.map(|p| p.next_to_boot),
            Some(false)
        );
    }

    /// The case the VM test found: the new slot boots on trial, its keeld starts, and
    /// the boot never reaches configured. The activation must stay on record, or the
    /// start on the old slot after the tries cannot tell a rollback.
    #[test]
    fn a_boot_on_trial_is_not_an_update_until_configured_and_can_still_roll_back() {
        let mut record = activated_record();
        after_reboot(
            &mut record,
            &inspection(
                Slot::B,
                "boot-2",
                vec![entry("keel-a.conf"), entry("keel-b+2-1.conf")],
            ),
            &Version::new(1, 1, 0),
        );
        let last = record.status.last_boot.clone().expect("last boot");
        assert_eq!(last.outcome, BootOutcome::OnTrial);
        assert!(last.detail.contains("keel-b+2-1.conf"), "{}", last.detail);
        assert!(record.staged.is_some(), "the activation stays on record");
        // A keeld restart in the same trial keeps what it said.
        let before = record.clone();
        after_reboot(
            &mut record,
            &inspection(
                Slot::B,
                "boot-2",
                vec![entry("keel-a.conf"), entry("keel-b+2-1.conf")],
            ),
            &Version::new(1, 1, 0),
        );
        assert_eq!(record, before);
        // The tries run out: the old slot boots, and it is a rollback.
        after_reboot(
            &mut record,
            &inspection(
                Slot::A,
                "boot-5",
                vec![entry("keel-a.conf"), entry("keel-b+0-3.conf")],
            ),
            &Version::new(1, 0, 0),
        );
        let last = record.status.last_boot.expect("last boot");
        assert_eq!(last.outcome, BootOutcome::RolledBack);
        assert_eq!(record.staged, None);
    }

    /// Slot b activated, booted on trial, and its boot reached `configured`.
    fn concluded_record() -> UpdateRecord {
        let mut record = activated_record();
        after_reboot(
            &mut record,
            &inspection(Slot::B, "boot-2", vec![entry("keel-b+2-1.conf")]),
            &Version::new(1, 1, 0),
        );
        let staged = record.staged.clone().expect("staged");
        let trial = record.status.last_boot.clone().expect("trial");
        updated(
            &mut record,
            &staged,
            &trial.previous_version,
            &trial.version,
            "now".into(),
        );
        record
    }

    #[test]
    fn a_trial_that_reaches_configured_is_an_update() {
        let record = concluded_record();
        let last = record.status.last_boot.expect("last boot");
        assert_eq!(last.outcome, BootOutcome::Updated);
        assert_eq!(last.detail, "booted slot b with 1.1.0 (was 1.0.0)");
        assert_eq!(record.staged, None);
        assert_eq!(record.status.update_state, UpdateState::Idle);
    }

    /// A power cut after keeld concluded the update but before systemd-bless-boot's
    /// rename reached the disk: the entry kept counting, and when its tries ran out the
    /// old slot booted. The record's `updated` becomes a rollback; while the entry has
    /// tries left (the old slot chosen by hand), or on the updated slot, it stays.
    #[test]
    fn an_update_whose_entry_was_never_blessed_and_ran_out_of_tries_is_a_rollback() {
        let mut record = concluded_record();
        let concluded = record.clone();
        for (active, entries) in [
            (
                Slot::B,
                vec![entry("keel-a.conf"), entry("keel-b+1-2.conf")],
            ),
            (Slot::B, vec![entry("keel-a.conf"), entry("keel-b.conf")]),
            (
                Slot::A,
                vec![entry("keel-a.conf"), entry("keel-b+1-2.conf")],
            ),
        ] {
            let mut again = concluded.clone();
            let inspection = inspection(active, "boot-3", entries);
            after_reboot(&mut again, &inspection, &Version::new(1, 1, 0));
            assert_eq!(again, concluded);
            // The entry still counting is the update's own, not one to withdraw.
            assert_eq!(untracked_activation(&again, &inspection), None);
        }
        after_reboot(
            &mut record,
            &inspection(
                Slot::A,
                "boot-5",
                vec![entry("keel-a.conf"), entry("keel-b+0-3.conf")],
            ),
            &Version::new(1, 0, 0),
        );
        let last = record.status.last_boot.expect("last boot");
        assert_eq!(last.outcome, BootOutcome::RolledBack);
        assert_eq!(last.slot, Slot::B);
        assert_eq!(last.version, Version::new(1, 1, 0));
        assert_eq!(last.previous_version, Version::new(1, 0, 0));
        assert!(
            last.detail.contains("keel-b+0-3.conf") && last.detail.contains("marked good"),
            "{}",
            last.detail
        );
    }

    #[test]
    fn a_restart_within_the_boot_of_the_activation_changes_nothing() {
        let mut record = activated_record();
        let before = record.clone();
        after_reboot(
            &mut record,
            &inspection(Slot::A, "boot-1", vec![entry("keel-b+3.conf")]),
            &Version::new(1, 0, 0),
        );
        assert_eq!(record, before);
    }

    #[test]
    fn a_prepare_cut_short_leaves_nothing_staged_and_says_why() {
        let mut record = activated_record();
        record.status.update_state = UpdateState::Available;
        record.interrupted = Some(CommandType::Prepare);
        close_interrupted(&mut record, Some(&inspection(Slot::A, "boot-1", vec![])));
        assert_eq!(record.status.update_state, UpdateState::Available);
        assert_eq!(record.staged, None);
        let command = record.status.most_recent_command.expect("command");
        assert_eq!(command.cmd_type, CommandType::Prepare);
        assert_eq!(command.cmd_status, CommandStatus::Failed);
        assert!(
            command.stderr.contains("no loader entry names it"),
            "{}",
            command.stderr
        );
        assert_eq!(record.interrupted, None);
    }

    fn missing_kernel(inspection: &mut Inspection, slot: Slot) {
        inspection.missing_boot_files.push((
            slot,
            "its vmlinuz is not on the ESP (/efi/keel/b/vmlinuz)".into(),
        ));
    }

    #[test]
    fn an_activated_slot_without_its_kernel_is_staged_no_more_and_its_entry_goes() {
        let mut record = activated_record();
        let mut disk = inspection(Slot::A, "boot-1", vec![entry("keel-b+3.conf")]);
        missing_kernel(&mut disk, Slot::B);
        let lost = staged_files_lost(&record, &disk).expect("lost");
        assert_eq!(lost.slot, Slot::B);
        assert!(lost.had_entry);
        assert_eq!(
            lost.reason,
            "at start, the update staged in slot b (1.1.0) is incomplete: its vmlinuz is not \
             on the ESP (/efi/keel/b/vmlinuz). Run prepare-update again"
        );
        forget_lost(&mut record, &lost);
        assert_eq!(record.status.update_state, UpdateState::Available);
        assert_eq!(record.staged, None);
        assert_eq!(record.status.staging_partition, None);
        let command = record.status.most_recent_command.expect("command");
        assert_eq!(command.cmd_type, CommandType::Activate);
        assert_eq!(command.cmd_status, CommandStatus::Failed);
        assert_eq!(command.stderr, lost.reason);
    }

    #[test]
    fn a_staged_slot_without_its_kernel_goes_back_to_available_as_a_failed_prepare() {
        let mut record = activated_record();
        record.status.update_state = UpdateState::Staged;
        record.staged.as_mut().expect("staged").activated_in_boot = None;
        let mut disk = inspection(Slot::A, "boot-1", vec![]);
        missing_kernel(&mut disk, Slot::B);
        let lost = staged_files_lost(&record, &disk).expect("lost");
        assert!(!lost.had_entry, "nothing to deactivate");
        forget_lost(&mut record, &lost);
        assert_eq!(record.status.update_state, UpdateState::Available);
        let command = record.status.most_recent_command.expect("command");
        assert_eq!(command.cmd_type, CommandType::Prepare);
    }

    #[test]
    fn complete_slots_the_running_one_and_other_states_are_left_alone() {
        let record = activated_record();
        // Complete: nothing to do.
        let disk = inspection(Slot::A, "boot-1", vec![entry("keel-b+3.conf")]);
        assert_eq!(staged_files_lost(&record, &disk), None);
        // The staged slot is the running one (a boot on trial): not this check's business.
        let mut running_b = inspection(Slot::B, "boot-2", vec![entry("keel-b+2-1.conf")]);
        missing_kernel(&mut running_b, Slot::B);
        assert_eq!(staged_files_lost(&record, &running_b), None);
        // Only the other slot misses files.
        let mut other = inspection(Slot::A, "boot-1", vec![entry("keel-b+3.conf")]);
        missing_kernel(&mut other, Slot::A);
        assert_eq!(staged_files_lost(&record, &other), None);
        // Nothing staged any more.
        let mut idle = activated_record();
        idle.status.update_state = UpdateState::Idle;
        let mut disk = inspection(Slot::A, "boot-1", vec![]);
        missing_kernel(&mut disk, Slot::B);
        assert_eq!(staged_files_lost(&idle, &disk), None);
    }

    /// The activation is recorded before its entry is written: a power cut after the
    /// entry and before the outcome was saved still reads as a trial boot.
    #[test]
    fn a_power_cut_between_the_entry_and_the_outcome_still_boots_on_trial() {
        let mut record = activated_record();
        record.status.update_state = UpdateState::Staged;
        record.interrupted = Some(CommandType::Activate);
        let disk = inspection(Slot::B, "boot-2", vec![entry("keel-b+2-1.conf")]);
        close_interrupted(&mut record, Some(&disk));
        assert_eq!(record.status.update_state, UpdateState::Ready);
        after_reboot(&mut record, &disk, &Version::new(1, 1, 0));
        let last = record.status.last_boot.clone().expect("last boot");
        assert_eq!(last.outcome, BootOutcome::OnTrial);
        assert_eq!(record.status.update_state, UpdateState::Idle);
        assert!(record.staged.is_some(), "the trial is still on record");
    }

    /// The same cut, then every try of the new slot failed before a keeld on it saved
    /// the trial (a kernel panic, a root that does not verify): the old slot finds the
    /// entry spent, and that is a rollback, not an activation that never happened.
    #[test]
    fn a_power_cut_between_the_entry_and_the_outcome_then_failed_tries_is_a_rollback() {
        let mut record = activated_record();
        record.status.update_state = UpdateState::Staged;
        record.interrupted = Some(CommandType::Activate);
        let disk = inspection(
            Slot::A,
            "boot-5",
            vec![entry("keel-a.conf"), entry("keel-b+0-3.conf")],
        );
        close_interrupted(&mut record, Some(&disk));
        after_reboot(&mut record, &disk, &Version::new(1, 0, 0));
        let last = record.status.last_boot.clone().expect("last boot");
        assert_eq!(last.outcome, BootOutcome::RolledBack);
        assert!(last.detail.contains("keel-b+0-3.conf"), "{}", last.detail);
        assert_eq!(record.status.update_state, UpdateState::Idle);
        assert_eq!(record.staged, None, "the failed image is not offered again");
    }

    /// `configured` ends a trial only on the version tried: a start on the old slot that
    /// could not inspect the slots left the trial on record.
    #[test]
    fn configured_on_another_version_does_not_end_the_trial_as_an_update() {
        let mut record = activated_record();
        after_reboot(
            &mut record,
            &inspection(
                Slot::B,
                "boot-2",
                vec![entry("keel-a.conf"), entry("keel-b+2-1.conf")],
            ),
            &Version::new(1, 1, 0),
        );
        assert!(trial_ended_by_this_boot(&record, Some(&Version::new(1, 1, 0))).is_some());
        assert!(trial_ended_by_this_boot(&record, Some(&Version::new(1, 0, 0))).is_none());
        assert!(trial_ended_by_this_boot(&record, None).is_none());
    }

    /// An activation whose outcome was unknown, and whose entry was in fact never
    /// written: the old slot booting again is no rollback, and the image stays staged.
    #[test]
    fn an_activation_that_never_wrote_its_entry_leaves_the_update_staged() {
        let mut record = activated_record();
        record.status.update_state = UpdateState::Staged;
        record
            .status
            .staging_partition
            .as_mut()
            .expect("staging")
            .next_to_boot = false;
        after_reboot(
            &mut record,
            &inspection(Slot::A, "boot-2", vec![entry("keel-a.conf")]),
            &Version::new(1, 0, 0),
        );
        assert_eq!(record.status.update_state, UpdateState::Staged);
        assert_eq!(record.status.last_boot, None, "not a rollback");
        let staged = record.staged.expect("still staged");
        assert_eq!(staged.activated_in_boot, None);
        assert!(record.status.chosen_update.is_some());
    }

    #[test]
    fn an_interrupted_activation_waits_for_the_slot_writer_to_be_closed() {
        let mut record = activated_record();
        record.status.update_state = UpdateState::Staged;
        record.interrupted = Some(CommandType::Activate);
        let before = record.clone();
        close_interrupted(&mut record, None);
        assert_eq!(record, before, "nothing is known without the disk");
    }

    #[test]
    fn the_old_slot_booted_while_the_new_entry_has_tries_keeps_the_activation() {
        let mut record = activated_record();
        after_reboot(
            &mut record,
            &inspection(
                Slot::A,
                "boot-2",
                vec![entry("keel-a.conf"), entry("keel-b+3.conf")],
            ),
            &Version::new(1, 0, 0),
        );
        assert_eq!(record.status.update_state, UpdateState::Ready);
        assert_eq!(record.status.last_boot, None, "not a rollback");
        let staged = record.staged.clone().expect("still staged");
        assert_eq!(staged.activated_in_boot.as_deref(), Some("boot-2"));
        // The next boot is the new slot, on trial.
        after_reboot(
            &mut record,
            &inspection(Slot::B, "boot-3", vec![entry("keel-b+2-1.conf")]),
            &Version::new(1, 1, 0),
        );
        let last = record.status.last_boot.expect("last boot");
        assert_eq!(last.outcome, BootOutcome::OnTrial);
        assert!(last.detail.contains("(was 1.0.0)"), "{}", last.detail);
    }

    #[test]
    fn an_activation_cut_short_is_ready_or_staged_as_the_disk_says() {
        for (entries, state) in [
            (vec![entry("keel-b+3.conf")], UpdateState::Ready),
            (vec![], UpdateState::Staged),
        ] {
            let mut record = activated_record();
            record.status.update_state = UpdateState::Staged;
            record.interrupted = Some(CommandType::Activate);
            close_interrupted(&mut record, Some(&inspection(Slot::A, "boot-1", entries)));
            assert_eq!(record.status.update_state, state);
        }
    }
}
