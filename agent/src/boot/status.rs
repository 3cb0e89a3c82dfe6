//! The boot record: which phase the boot is in and what each step did, as
//! `GET /boot` and `apiclient boot status` show it.
//!
//! It lives in the runtime directory (`/run/keel/boot.json`, a tmpfs): a keeld restart
//! within the same boot finds it and resumes from it, and a reboot starts with none. It
//! is written before each step starts and after it ends (temp file + rename), so
//! a step that was running when keeld died is known, and never started a second time.
//! Each change of phase is published as a `boot-phase` event.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::events::{BootPhaseEvent, EventBody, EventBus};

/// Where the boot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootPhase {
    /// Staging OS defaults into the `launch` transaction (first boot).
    Defaults,
    /// Running the user-data providers (first boot).
    UserData,
    /// Committing `launch` and rendering every configuration file.
    Apply,
    BootstrapCommands,
    BootstrapContainers,
    /// Done: host containers start, and units ordered after keel-boot run.
    Configured,
    /// An essential step failed; `reason` says which and why. The API stays up.
    Failed,
    /// `settings.boot` changed during this boot and `reboot-to-reconcile` is set: the
    /// host reboots so that its kernel gets the new parameters. Host containers do not
    /// start in this boot.
    Rebooting,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    Running,
    Succeeded,
    Failed,
    /// Nothing to do (no user-data from a source, mode `off`, already done).
    Skipped,
}

/// One step of the boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BootStep {
    /// `defaults`, `user-data:<source>`, `commit`, `render`, `bootstrap-command:<name>`,
    /// `bootstrap-container:<name>`.
    pub name: String,
    pub outcome: StepOutcome,
    #[serde(default)]
    pub essential: bool,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// What happened, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When it began, in milliseconds since the kernel booted (`CLOCK_BOOTTIME`, which
    /// neither a keeld restart nor a change of the wall clock disturbs): a step resumed
    /// by a later keeld counts its timeout and duration from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_boottime_ms: Option<u64>,
}

/// The whole record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BootRecord {
    pub boot_id: String,
    pub phase: BootPhase,
    /// Whether this boot ran the user-data providers.
    pub first_boot: bool,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why the boot failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The user-data was refused: only the OS defaults were committed and applied, so
    /// that host containers the defaults enable (a control container) still run and
    /// the operator can get in. The boot is `failed` all the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub defaults_only: bool,
    /// `settings.boot`'s parameters this boot's kernel got: what Keel's loader entries
    /// held when keeld first started in this boot (absent on a host without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_parameters: Option<String>,
    /// New `settings.boot` parameters whose trial boot did not reach `configured`, while
    /// `settings.boot` still asks for them: the boot loader came back to the kept entry,
    /// so this boot has [`BootRecord::booted_parameters`] instead. They are not handed to
    /// the boot loader again until `settings.boot` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_parameters: Option<String>,
    pub steps: Vec<BootStep>,
}

impl BootRecord {
    pub fn new(first_boot: bool) -> BootRecord {
        BootRecord {
            boot_id: boot_id(),
            phase: BootPhase::Defaults,
            first_boot,
            started: crate::store::now_rfc3339(),
            finished: None,
            duration_ms: None,
            reason: None,
            defaults_only: false,
            booted_parameters: None,
            failed_parameters: None,
            steps: Vec::new(),
        }
    }

    pub fn step(&self, name: &str) -> Option<&BootStep> {
        self.steps.iter().find(|s| s.name == name)
    }

    pub fn is_done(&self) -> bool {
        matches!(
            self.phase,
            BootPhase::Configured | BootPhase::Failed | BootPhase::Rebooting
        )
    }
}

/// The kernel's boot id, or a random one where there is none.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| format!("{:032x}", rand::random::<u128>()))
}

/// Why the boot record could not be saved.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot record {path}: {source}")]
pub struct RecordError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Owns the record: every change is saved, then published to `GET /boot` (and a change
/// of phase to the event bus).
#[derive(Debug)]
pub struct BootTracker {
    path: PathBuf,
    record: BootRecord,
    publish: watch::Sender<BootRecord>,
    events: EventBus,
}

impl BootTracker {
    /// The record of this boot (from the runtime directory), or a new one. Its phase is
    /// the first `boot-phase` event of this keeld (`from` null).
    pub fn open(
        runtime_dir: &Path,
        first_boot: impl FnOnce() -> bool,
        publish: watch::Sender<BootRecord>,
        events: EventBus,
    ) -> BootTracker {
        let path = runtime_dir.join("boot.json");
        let record = std::fs::read(&path)
            .ok()
            .and_then(|bytes| match serde_json::from_slice::<BootRecord>(&bytes) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable boot record; starting the boot over");
                    None
                }
            })
            .unwrap_or_else(|| BootRecord::new(first_boot()));
        publish.send_replace(record.clone());
        events.publish(phase_event(&record, None));
        BootTracker {
            path,
            record,
            publish,
            events,
        }
    }

    pub fn record(&self) -> &BootRecord {
        &self.record
    }

    /// Saves and publishes after `change`. The record must survive a keeld crash, not
    /// a power loss: it lives on the runtime tmpfs, and a power loss is a new boot with
    /// no record anyway. Writing a temp file and renaming it over the record is atomic
    /// against a crash (the page cache outlives the process), so no fsync is needed.
    pub fn update(&mut self, change: impl FnOnce(&mut BootRecord)) -> Result<(), RecordError> {
        let before = self.record.phase;
        change(&mut self.record);
        self.publish.send_replace(self.record.clone());
        if self.record.phase != before {
            self.events.publish(phase_event(&self.record, Some(before)));
        }
        let err = |source| RecordError {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let temp = self.path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec_pretty(&self.record).map_err(|e| err(std::io::Error::other(e)))?;
        // Mode 0600: the record holds failure reasons, which may quote user-data. It
        // is served to API callers through `GET /boot`; the file is keeld's alone.
        let _ = std::fs::remove_file(&temp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(err)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
        file.write_all(&bytes).map_err(err)?;
        drop(file);
        std::fs::rename(&temp, &self.path).map_err(err)
    }

    pub fn set_phase(&mut self, phase: BootPhase) -> Result<(), RecordError> {
        self.update(|r| r.phase = phase)
    }

    /// Records that step `name` started (replacing an earlier entry of that name).
    pub fn begin(&mut self, name: &str, essential: bool) -> Result<(), RecordError> {
        self.begin_at(name, essential, None)
    }

    /// [`Self::begin`], recording also when, as time since the kernel booted.
    pub fn begin_at(
        &mut self,
        name: &str,
        essential: bool,
        since_kernel_boot: Option<std::time::Duration>,
    ) -> Result<(), RecordError> {
        let started_boottime_ms =
            since_kernel_boot.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.update(|r| {
            r.steps.retain(|s| s.name != name);
            r.steps.push(BootStep {
                name: name.to_owned(),
                outcome: StepOutcome::Running,
                essential,
                started: crate::store::now_rfc3339(),
                finished: None,
                duration_ms: None,
                detail: None,
                started_boottime_ms,
            });
        })
    }

    /// Records how step `name` ended.
    pub fn end(
        &mut self,
        name: &str,
        outcome: StepOutcome,
        detail: Option<String>,
        elapsed: std::time::Duration,
    ) -> Result<(), RecordError> {
        self.update(|r| {
            if let Some(step) = r.steps.iter_mut().find(|s| s.name == name) {
                step.outcome = outcome;
                step.finished = Some(crate::store::now_rfc3339());
                step.duration_ms = Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                step.detail = detail;
            }
        })
    }

    /// A step that had nothing to do.
    pub fn skip(&mut self, name: &str, detail: &str) -> Result<(), RecordError> {
        self.begin(name, false)?;
        self.end(
            name,
            StepOutcome::Skipped,
            Some(detail.to_owned()),
            std::time::Duration::ZERO,
        )
    }

    /// Ends the boot in `phase` (configured or failed).
    pub fn finish(
        &mut self,
        phase: BootPhase,
        reason: Option<String>,
        elapsed: std::time::Duration,
    ) -> Result<(), RecordError> {
        self.update(|r| {
            r.phase = phase;
            r.reason = reason;
            r.finished = Some(crate::store::now_rfc3339());
            r.duration_ms = Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        })
    }
}

/// The event of `record` reaching its phase from `from`.
fn phase_event(record: &BootRecord, from: Option<BootPhase>) -> EventBody {
    EventBody::BootPhase(BootPhaseEvent {
        boot_id: record.boot_id.clone(),
        from,
        to: record.phase,
        reason: record.reason.clone(),
        failed_parameters: record.failed_parameters.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_readable_by_keeld_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("boot.json");
        // An older keeld left it world-readable, and a stale temp file too.
        std::fs::write(&path, "{}").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(dir.path().join("boot.json.tmp"), "x").expect("write");
        let (publish, _view) = watch::channel(BootRecord::new(true));
        let mut tracker = BootTracker::open(dir.path(), || true, publish, EventBus::default());
        tracker.set_phase(BootPhase::Defaults).expect("update");
        let mode = std::fs::metadata(&path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600, "boot.json mode {mode:o}");
    }

    #[test]
    fn a_record_survives_a_restart_and_a_new_runtime_dir_starts_over() {
        let dir = tempfile::tempdir().expect("dir");
        let (tx, rx) = watch::channel(BootRecord::new(true));
        let mut tracker = BootTracker::open(dir.path(), || true, tx, EventBus::default());
        tracker.begin("bootstrap-container:a", true).expect("begin");
        assert_eq!(rx.borrow().steps.len(), 1);
        drop(tracker);

        let (tx, _rx) = watch::channel(BootRecord::new(false));
        let again = BootTracker::open(dir.path(), || false, tx, EventBus::default());
        let step = again.record().step("bootstrap-container:a").expect("step");
        assert_eq!(step.outcome, StepOutcome::Running);
        assert!(
            again.record().first_boot,
            "the record, not the closure, decides"
        );

        let fresh = tempfile::tempdir().expect("dir");
        let (tx, _rx) = watch::channel(BootRecord::new(false));
        let new = BootTracker::open(fresh.path(), || false, tx, EventBus::default());
        assert!(new.record().steps.is_empty());
        assert_eq!(new.record().phase, BootPhase::Defaults);
    }

    #[tokio::test]
    async fn each_change_of_phase_is_an_event() {
        let dir = tempfile::tempdir().expect("dir");
        let events = EventBus::new(16);
        let (tx, _rx) = watch::channel(BootRecord::new(true));
        let mut tracker = BootTracker::open(dir.path(), || true, tx, events.clone());
        tracker.begin("defaults", false).expect("begin");
        tracker.set_phase(BootPhase::UserData).expect("phase");
        tracker.set_phase(BootPhase::UserData).expect("phase");
        tracker
            .finish(
                BootPhase::Failed,
                Some("bad".into()),
                std::time::Duration::ZERO,
            )
            .expect("finish");
        let mut sub = events
            .subscribe(crate::events::Resume::Start, false, None)
            .expect("subscribe");
        let mut seen = Vec::new();
        while let Some(batch) = sub.next_batch().await {
            for item in batch {
                seen.push(serde_json::from_slice::<serde_json::Value>(&item.line()).expect("json"));
            }
        }
        let phases: Vec<_> = seen
            .iter()
            .map(|e| (e["from"].clone(), e["to"].clone()))
            .collect();
        assert_eq!(
            phases,
            vec![
                (serde_json::Value::Null, "defaults".into()),
                ("defaults".into(), "user-data".into()),
                ("user-data".into(), "failed".into()),
            ]
        );
        assert_eq!(seen[2]["kind"], "boot-phase");
        assert_eq!(seen[2]["reason"], "bad");
        assert_eq!(seen[2]["boot-id"], tracker.record().boot_id.as_str());
    }
}
