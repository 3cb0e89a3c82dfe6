//! Settings migrations at start-up: the live settings carried to the settings format of
//! this image, up after an update, down after a rollback (see
//! `settings_model::migration` for the vocabulary).
//!
//! Owns the record `settings-format.json` in the state directory: between which formats
//! the live settings are (`low`, `high`: equal once settled) and every migration step any
//! keeld on this host knew. An older keeld has no step to a newer format in its image;
//! the newer keeld recorded it, down operations included, before it migrated, so the
//! older one can carry the settings back.
//!
//! Why a crash at any instant is safe: the record is replaced atomically (temp file,
//! fsync, rename, fsync of the directory); before the migrated generation is committed
//! the record widens its range to include the target format, so whichever keeld starts
//! next knows the settings may be in either format; steps are idempotent, so running the
//! down steps from the top of the range and the up steps from its bottom brings settings
//! of any format in the range to the target; the generation commit is the store's own
//! atomic commit; only then does the record narrow to the target.
//!
//! Must not render or apply: the boot does that with the migrated settings.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use settings_model::migration::{Migrations, BASE_FORMAT};

use super::Store;
use crate::updates::durable;

/// Prefix of the generations a migration makes (`migrate-settings-1-to-2`); a history
/// rollback refuses generations older than the newest such one.
pub const TX_PREFIX: &str = "migrate-settings-";
/// The record's file name in the state directory.
pub const RECORD: &str = "settings-format.json";
const MAX_RECORD: u64 = 4 * 1024 * 1024;

/// The record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatRecord {
    pub low: u32,
    pub high: u32,
    pub steps: Migrations,
}

/// Why a migration did not run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Steps(#[from] settings_model::migration::MigrationError),
    #[error("the migrated settings are refused: {0}")]
    Store(#[from] super::StoreError),
}

/// What a start-up migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub from_low: u32,
    pub from_high: u32,
    pub to: u32,
    /// The keys the migration changed (none: the settings were already in shape).
    pub changed: Vec<String>,
}

/// The image's migrations file (`--migrations`); absent: no steps, format 1.
pub fn load_image_migrations(path: &Path) -> Result<Migrations, MigrateError> {
    let file = |reason: String| MigrateError::File {
        path: path.to_owned(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Migrations::default()),
        Err(e) => return Err(file(e.to_string())),
    };
    let migrations: Migrations = toml::from_str(&text).map_err(|e| file(e.to_string()))?;
    migrations.check().map_err(|e| file(e.to_string()))?;
    Ok(migrations)
}

fn read_record(path: &Path) -> Result<Option<FormatRecord>, MigrateError> {
    let file = |reason: String| MigrateError::File {
        path: path.to_owned(),
        reason,
    };
    match durable::read_bounded(path, MAX_RECORD) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| file(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file(e.to_string())),
    }
}

fn write_record(path: &Path, record: &FormatRecord) -> Result<(), MigrateError> {
    let mut bytes = serde_json::to_vec_pretty(record).map_err(|e| MigrateError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    durable::replace(path, &bytes).map_err(|e| MigrateError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MigrateError> + Send + 'static,
) -> Result<T, MigrateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MigrateError::File {
            path: PathBuf::from(RECORD),
            reason: e.to_string(),
        })?
}

/// Brings the live settings to the format of `image` (see the module header). Runs
/// before anything reads the settings.
pub async fn at_start(
    store: &Store,
    state_dir: &Path,
    image: &Migrations,
) -> Result<Option<Migrated>, MigrateError> {
    let path = state_dir.join(RECORD);
    let own = image.format();
    let record = {
        let path = path.clone();
        blocking(move || read_record(&path)).await?
    };
    let snapshot = store.snapshot();
    let record = match record {
        Some(record) => record,
        // No record: a store made before migrations existed holds format-1 settings; a
        // new store holds nothing, in this image's format.
        None => {
            let format = if snapshot.live().generation == 0 {
                own
            } else {
                BASE_FORMAT
            };
            FormatRecord {
                low: format,
                high: format,
                steps: Migrations::default(),
            }
        }
    };
    let steps = image.merged(&record.steps);
    let (low, high) = (record.low, record.high);
    if low == own && high == own {
        if steps != record.steps {
            let settled = FormatRecord {
                low: own,
                high: own,
                steps,
            };
            blocking(move || write_record(&path, &settled)).await?;
        }
        return Ok(None);
    }
    let mut settings = snapshot.live_settings().clone();
    if high > own {
        steps.migrate(&mut settings, high, own)?;
    }
    if low < own {
        steps.migrate(&mut settings, low, own)?;
    }
    // Widen first: until the commit is durable the settings may be in either format.
    let widened = FormatRecord {
        low: low.min(own),
        high: high.max(own),
        steps: steps.clone(),
    };
    {
        let path = path.clone();
        blocking(move || write_record(&path, &widened)).await?;
    }
    let from = if low == high {
        low.to_string()
    } else {
        format!("{low}..{high}")
    };
    let tx = format!("{TX_PREFIX}{from}-to-{own}");
    let changed = store.migrate(&tx, settings).await?;
    let settled = FormatRecord {
        low: own,
        high: own,
        steps,
    };
    blocking(move || write_record(&path, &settled)).await?;
    Ok(Some(Migrated {
        from_low: low,
        from_high: high,
        to: own,
        changed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn format_2() -> Migrations {
        toml::from_str(
            r#"
            [[step]]
            from = 1
            to = 2
            up = [{ op = "rename", from = "settings.metrics.send-metrics", to = "settings.updates.ignore-waves" },
                  { op = "set-default", key = "settings.ntp.time-servers", value = ["169.254.169.123"] }]
            down = [{ op = "rename", from = "settings.updates.ignore-waves", to = "settings.metrics.send-metrics" },
                    { op = "remove", key = "settings.ntp.time-servers" }]
            "#,
        )
        .expect("toml")
    }

    async fn commit(store: &Store, patch: serde_json::Value) {
        store.patch("t", patch).await.expect("patch");
        store
            .commit("t", crate::store::Caller::keeld())
            .await
            .expect("commit");
    }

    fn live(store: &Store) -> serde_json::Value {
        store.snapshot().live_settings().clone()
    }

    #[tokio::test]
    async fn an_update_migrates_up_and_a_rollback_reads_its_settings_back_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Version N (format 1) commits a setting.
        let store = Store::open(dir.path(), 10).expect("open");
        assert_eq!(
            at_start(&store, dir.path(), &Migrations::default())
                .await
                .expect("n"),
            None
        );
        commit(
            &store,
            json!({"metrics": {"send-metrics": true}, "motd": "m"}),
        )
        .await;
        drop(store);
        // Version N+1 (format 2) starts: up.
        let store = Store::open(dir.path(), 10).expect("open");
        let done = at_start(&store, dir.path(), &format_2())
            .await
            .expect("up")
            .expect("ran");
        assert_eq!((done.from_low, done.from_high, done.to), (1, 1, 2));
        assert_eq!(
            live(&store),
            json!({"motd": "m", "updates": {"ignore-waves": true},
                   "ntp": {"time-servers": ["169.254.169.123"]}})
        );
        assert_eq!(store.snapshot().live().tx, "migrate-settings-1-to-2");
        // N+1 changes the renamed setting.
        commit(&store, json!({"updates": {"ignore-waves": false}})).await;
        drop(store);
        // Rollback: version N starts again; its image has no step, the record has.
        let store = Store::open(dir.path(), 10).expect("open");
        let done = at_start(&store, dir.path(), &Migrations::default())
            .await
            .expect("down")
            .expect("ran");
        assert_eq!(done.to, 1);
        assert_eq!(
            live(&store),
            json!({"motd": "m", "metrics": {"send-metrics": false}})
        );
        assert_eq!(store.snapshot().live().tx, "migrate-settings-2-to-1");
        // Settled: nothing more to do.
        assert_eq!(
            at_start(&store, dir.path(), &Migrations::default())
                .await
                .expect("n"),
            None
        );
    }

    #[tokio::test]
    async fn a_migration_cut_short_before_its_commit_is_finished_by_either_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 10).expect("open");
        at_start(&store, dir.path(), &Migrations::default())
            .await
            .expect("n");
        commit(&store, json!({"metrics": {"send-metrics": true}})).await;
        // N+1 widened the record, then died before committing.
        write_record(
            &dir.path().join(RECORD),
            &FormatRecord {
                low: 1,
                high: 2,
                steps: format_2(),
            },
        )
        .expect("record");
        // N comes back: the settings are format 1 already; down changes nothing.
        assert!(at_start(&store, dir.path(), &Migrations::default())
            .await
            .expect("n")
            .expect("ran")
            .changed
            .is_empty());
        assert_eq!(live(&store), json!({"metrics": {"send-metrics": true}}));
        // Or N+1 comes back and finishes.
        write_record(
            &dir.path().join(RECORD),
            &FormatRecord {
                low: 1,
                high: 2,
                steps: format_2(),
            },
        )
        .expect("record");
        at_start(&store, dir.path(), &format_2())
            .await
            .expect("n+1");
        assert_eq!(
            live(&store),
            json!({"updates": {"ignore-waves": true}, "ntp": {"time-servers": ["169.254.169.123"]}})
        );
    }

    #[tokio::test]
    async fn a_new_store_starts_in_the_images_format_and_history_rollback_stops_at_a_migration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 10).expect("open");
        assert_eq!(
            at_start(&store, dir.path(), &format_2())
                .await
                .expect("new"),
            None
        );
        let record = read_record(&dir.path().join(RECORD))
            .expect("read")
            .expect("record");
        assert_eq!((record.low, record.high), (2, 2));

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 10).expect("open");
        commit(&store, json!({"metrics": {"send-metrics": true}})).await;
        let before = store.snapshot().live().generation;
        at_start(&store, dir.path(), &format_2()).await.expect("up");
        let err = store
            .rollback(before, crate::store::Caller::keeld())
            .await
            .expect_err("older format");
        assert!(
            err.to_string().contains("predates the settings migration"),
            "{err}"
        );
    }
}
