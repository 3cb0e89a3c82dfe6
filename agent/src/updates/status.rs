//! The update status: Bottlerocket's `/updates/status` JSON (same names and shapes), the
//! fields Keel adds, and its durable record in the state directory.
//!
//! Owns the shapes and their persistence. Bottlerocket's fields: `update_state` (`Idle`,
//! `Available`, `Staged`, `Ready`), `available_updates`, `chosen_update`,
//! `active_partition` and `staging_partition` (`{image, next_to_boot}`),
//! `most_recent_command` (`cmd_type` `refresh|prepare|activate|deactivate`, `cmd_status`
//! `Success|Failed|Unknown`, `timestamp`, `exit_status`, `stderr`). Keel adds `slot` to
//! each partition, `running_command` (the command in progress, with download progress),
//! `chosen_update_reason` (why this update, or why none), `last_boot` (what the last
//! reboot after an activation did: the new slot, or a rollback) and `seed`. Clients that
//! know only Bottlerocket's fields ignore these.
//!
//! Must not run commands: `machine.rs` does, and writes the record through [`save`].

use std::path::Path;

use semver::Version;
use serde::{Deserialize, Serialize};

use super::durable;
use super::slots::Slot;

/// Where the update state machine stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    /// Nothing chosen.
    Idle,
    /// An update is chosen (`refresh-updates` found one).
    Available,
    /// The chosen update is written to the inactive slot.
    Staged,
    /// The staged slot boots next.
    Ready,
}

/// An image, as Bottlerocket names one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateImage {
    pub arch: String,
    pub version: Version,
    pub variant: String,
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedImage {
    pub image: UpdateImage,
    pub next_to_boot: bool,
    /// Keel: the slot (`a` or `b`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Slot>,
}

/// The update commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandType {
    Refresh,
    Prepare,
    Activate,
    Deactivate,
}

impl CommandType {
    pub fn action(self) -> &'static str {
        match self {
            CommandType::Refresh => "refresh-updates",
            CommandType::Prepare => "prepare-update",
            CommandType::Activate => "activate-update",
            CommandType::Deactivate => "deactivate-update",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandStatus {
    Success,
    Failed,
    Unknown,
}

/// How the last command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub cmd_type: CommandType,
    pub cmd_status: CommandStatus,
    /// RFC 3339, UTC, nanoseconds; strictly increasing from one command to the next (the
    /// update clients wait for it to change).
    pub timestamp: String,
    /// 0 on success, 1 on failure (Bottlerocket reports the updater's exit status).
    pub exit_status: i32,
    /// Why it failed; empty on success.
    pub stderr: String,
}

/// Download progress of a `prepare-update`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The target being written (`root`, `hash`, `kernel`, `initrd`).
    pub target: String,
}

/// Keel: the command in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningCommand {
    pub cmd_type: CommandType,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// Keel: what the last reboot after an activation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBoot {
    /// `updated`: the new slot booted; `rolled-back`: the previous slot booted again.
    pub outcome: BootOutcome,
    pub slot: Slot,
    pub version: Version,
    pub previous_version: Version,
    /// In the user's words.
    pub detail: String,
    /// When keeld noticed (RFC 3339).
    pub noticed: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootOutcome {
    /// The new slot booted from an entry that still counts tries: it is good once the
    /// host reaches `configured` (then `updated`); a boot that does not get there uses a
    /// try, and when they are gone the old slot boots (then `rolled-back`).
    OnTrial,
    Updated,
    RolledBack,
}

/// `GET /updates/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub update_state: UpdateState,
    pub available_updates: Vec<Version>,
    pub chosen_update: Option<UpdateImage>,
    pub active_partition: Option<StagedImage>,
    pub staging_partition: Option<StagedImage>,
    pub most_recent_command: Option<CommandResult>,
    pub running_command: Option<RunningCommand>,
    pub chosen_update_reason: Option<String>,
    pub last_boot: Option<LastBoot>,
    /// This host's place in the waves: `settings.updates.seed`, else one chosen at random
    /// once and kept.
    pub seed: u32,
}

/// What keeld keeps about the staged slot beyond the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedSlot {
    pub slot: Slot,
    pub image: UpdateImage,
    pub root_hash: String,
    /// Set by activation: the boot during which it happened, and the version then
    /// running, to tell after a restart whether the host rebooted and into which slot.
    #[serde(default)]
    pub activated_in_boot: Option<String>,
    #[serde(default)]
    pub activated_from: Option<Version>,
}

/// The durable record (`<state-dir>/updates/status.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub status: UpdateStatus,
    /// The slot written by the last successful prepare.
    pub staged: Option<StagedSlot>,
    /// A command that started and has not ended: found here after a crash, it ended
    /// with keeld.
    pub interrupted: Option<CommandType>,
    /// The seed chosen for this host when the setting is unset.
    pub own_seed: u32,
}

impl UpdateRecord {
    pub fn new(own_seed: u32) -> UpdateRecord {
        UpdateRecord {
            status: UpdateStatus {
                update_state: UpdateState::Idle,
                available_updates: Vec::new(),
                chosen_update: None,
                active_partition: None,
                staging_partition: None,
                most_recent_command: None,
                running_command: None,
                chosen_update_reason: None,
                last_boot: None,
                seed: own_seed,
            },
            staged: None,
            interrupted: None,
            own_seed,
        }
    }
}

/// Largest record read back.
const MAX_RECORD: u64 = 1024 * 1024;

/// Why the record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("update state {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("update state {path} is not valid: {reason}")]
    Corrupt { path: String, reason: String },
}

/// Reads the record; `None` when there is none yet.
pub fn load(path: &Path) -> Result<Option<UpdateRecord>, RecordError> {
    let bytes = match durable::read_bounded(path, MAX_RECORD) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RecordError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| RecordError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// Writes the record atomically and durably (temp file, fsync, rename, fsync of the
/// directory: a crash leaves the old record or the new one), before the state change it
/// records is answered or acted on.
pub fn save(path: &Path, record: &UpdateRecord) -> Result<(), RecordError> {
    let io = |source| RecordError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut bytes =
        serde_json::to_vec_pretty(record).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    bytes.push(b'\n');
    durable::replace(path, &bytes).map_err(io)
}

/// Now as RFC 3339 with nanoseconds, strictly after `previous` (an RFC 3339 time of this
/// module), so that clients waiting for the timestamp to change always see it change.
pub fn next_timestamp(previous: Option<&str>) -> String {
    let now = std::time::SystemTime::now();
    let floor = previous
        .and_then(|p| humantime::parse_rfc3339(p).ok())
        .map(|p| p + std::time::Duration::from_nanos(1));
    let at = match floor {
        Some(floor) if floor > now => floor,
        _ => now,
    };
    humantime::format_rfc3339_nanos(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_has_bottlerocket_names_and_shapes() {
        let mut record = UpdateRecord::new(7);
        record.status.update_state = UpdateState::Staged;
        record.status.available_updates = vec![Version::new(1, 1, 0)];
        let image = UpdateImage {
            arch: "x86_64".into(),
            version: Version::new(1, 1, 0),
            variant: "keel-dev".into(),
        };
        record.status.chosen_update = Some(image.clone());
        record.status.staging_partition = Some(StagedImage {
            image,
            next_to_boot: false,
            slot: Some(Slot::B),
        });
        record.status.most_recent_command = Some(CommandResult {
            cmd_type: CommandType::Prepare,
            cmd_status: CommandStatus::Success,
            timestamp: "2030-01-01T00:00:00.000000001Z".into(),
            exit_status: 0,
            stderr: String::new(),
        });
        let json = serde_json::to_value(&record.status).expect("json");
        assert_eq!(json["update_state"], "Staged");
        assert_eq!(json["available_updates"], serde_json::json!(["1.1.0"]));
        assert_eq!(json["chosen_update"]["version"], "1.1.0");
        assert_eq!(json["staging_partition"]["next_to_boot"], false);
        assert_eq!(json["staging_partition"]["image"]["variant"], "keel-dev");
        assert_eq!(json["most_recent_command"]["cmd_type"], "prepare");
        assert_eq!(json["most_recent_command"]["cmd_status"], "Success");
        assert_eq!(json["most_recent_command"]["exit_status"], 0);
        assert_eq!(json["active_partition"], serde_json::Value::Null);
    }

    #[test]
    fn the_record_survives_a_round_trip_and_a_torn_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("updates/status.json");
        assert_eq!(load(&path).expect("load"), None);
        let record = UpdateRecord::new(42);
        save(&path, &record).expect("save");
        assert_eq!(load(&path).expect("load"), Some(record));
        std::fs::write(&path, b"{\"status\":").expect("write");
        assert!(matches!(load(&path), Err(RecordError::Corrupt { .. })));
    }

    #[test]
    fn timestamps_always_move_forward() {
        let far = "2999-01-01T00:00:00.000000000Z";
        let next = next_timestamp(Some(far));
        assert_eq!(next, "2999-01-01T00:00:00.000000001Z");
        assert!(next_timestamp(None).ends_with('Z'));
    }
}
