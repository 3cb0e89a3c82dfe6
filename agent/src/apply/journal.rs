//! The apply journal: the apply log and the apply in progress, kept in keeld's runtime
//! directory so that both survive a keeld restart within one boot.
//!
//! A commit is durable before its apply starts, so a keeld killed between the two would
//! leave the render root behind the live settings with no trace. Each apply records
//! itself (`apply-inflight.json`) before it writes anything and is cleared once its
//! report is in the log (`apply-log.json`, the last [`super::LOG_SIZE`] applies). At
//! start, [`Applier::recover`] renders every file against the live settings and
//! re-applies the services whose files differ from what is on disk, plus those of an
//! apply that was in progress (its restart commands may not have run).
//!
//! Both files live on the runtime tmpfs and are written as a temp file renamed into
//! place, without fsync: a rename is atomic against a crash, and a power loss starts a
//! new boot, whose full render makes the journal moot. Mode 0600: the log holds the
//! output of restart commands.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{Applier, ApplyReport, LOG_SIZE};
use crate::store::Store;

const LOG_FILE: &str = "apply-log.json";
const IN_FLIGHT_FILE: &str = "apply-inflight.json";

/// An apply that has started and not yet been recorded in the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct InFlight {
    pub id: u64,
    /// The live generation when it started.
    pub generation: u64,
    pub keys: Vec<String>,
    pub services: BTreeMap<String, Vec<String>>,
}

/// The journaled log.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct LogFile {
    reboot_required: bool,
    applies: Vec<ApplyReport>,
}

/// What [`Applier::load_journal`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// A journal existed: keeld ran in this boot before, and the render root holds
    /// what it rendered then.
    pub existed: bool,
    pub in_flight: Option<InFlight>,
}

/// Writes `bytes` to `dir/name` as a temp file renamed into place (see the module
/// documentation for why no fsync).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&temp, dir.join(name))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the apply journal");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the apply journal is unreadable; ignoring it");
            None
        }
    }
}

impl Applier {
    /// Loads the journal: the log (and `reboot-required`) of earlier applies in this
    /// boot, the next apply id, and an apply that was in progress.
    pub fn load_journal(&self) -> Loaded {
        let Some(dir) = &self.inner.config.journal_dir else {
            return Loaded::default();
        };
        let log: Option<LogFile> = read_json(&dir.join(LOG_FILE));
        let in_flight: Option<InFlight> = read_json(&dir.join(IN_FLIGHT_FILE));
        let existed = log.is_some() || in_flight.is_some();
        let mut next = in_flight.as_ref().map_or(1, |f| f.id + 1);
        if let Some(log) = log {
            next = next.max(log.applies.iter().map(|a| a.id + 1).max().unwrap_or(1));
            self.inner
                .reboot_required
                .store(log.reboot_required, Ordering::Relaxed);
            if let Ok(mut memory) = self.inner.log.lock() {
                memory.clear();
                let skip = log.applies.len().saturating_sub(LOG_SIZE);
                memory.extend(log.applies.into_iter().skip(skip));
            }
        }
        self.inner.next_id.fetch_max(next, Ordering::Relaxed);
        Loaded { existed, in_flight }
    }

    /// Records `in_flight` before anything is written.
    pub(super) async fn journal(&self, in_flight: InFlight) {
        let Some(dir) = self.inner.config.journal_dir.clone() else {
            return;
        };
        let Ok(bytes) = serde_json::to_vec(&in_flight) else {
            return;
        };
        run_blocking(
            move || write_atomic(&dir, IN_FLIGHT_FILE, &bytes),
            "record the apply in progress",
        )
        .await;
    }

    /// Writes the log and clears the apply in progress.
    pub(super) async fn journal_done(&self) {
        let Some(dir) = self.inner.config.journal_dir.clone() else {
            return;
        };
        let file = LogFile {
            reboot_required: self.inner.reboot_required.load(Ordering::Relaxed),
            applies: self
                .inner
                .log
                .lock()
                .map(|log| log.iter().cloned().collect())
                .unwrap_or_default(),
        };
        let bytes = match serde_json::to_vec(&file) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialize the apply log");
                return;
            }
        };
        run_blocking(
            move || {
                write_atomic(&dir, LOG_FILE, &bytes)?;
                match std::fs::remove_file(dir.join(IN_FLIGHT_FILE)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            },
            "journal the apply",
        )
        .await;
    }

    /// Brings the render root in line with the live settings after keeld restarted
    /// within a boot (`loaded` from [`Applier::load_journal`]): every file is rendered,
    /// and the services whose files differ from what is on disk, or that an apply in
    /// progress had not finished, are applied again (files written, restart commands
    /// run). Nothing to do on the first start of a boot: the boot renders everything.
    pub async fn recover(&self, store: &Store, loaded: Loaded) -> Option<ApplyReport> {
        if !loaded.existed {
            return None;
        }
        let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut keys = BTreeSet::new();
        if let Some(in_flight) = loaded.in_flight {
            tracing::warn!(
                id = in_flight.id,
                generation = in_flight.generation,
                "an apply was interrupted by a keeld restart; applying again"
            );
            keys.extend(in_flight.keys);
            for (service, service_keys) in in_flight.services {
                services.entry(service).or_default().extend(service_keys);
            }
        }
        let this = self.clone();
        let settings = store.snapshot();
        let all = vec!["settings".to_owned()];
        let differing =
            tokio::task::spawn_blocking(move || this.plan(settings.live_settings(), &all)).await;
        let stale_files: Option<BTreeSet<String>> = match differing {
            Ok(Ok(diffs)) => Some(
                diffs
                    .into_iter()
                    .map(|d| d.name.split('[').next().unwrap_or_default().to_owned())
                    .collect(),
            ),
            // Cannot tell which files differ: apply every service.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot render the live settings to compare; applying every service");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "comparing the render root stopped; applying every service");
                None
            }
        };
        for (name, def) in &self.inner.meta.services {
            let stale = match &stale_files {
                Some(files) => def.configuration_files.iter().any(|f| files.contains(f)),
                None => true,
            };
            if stale {
                let prefixes = self
                    .inner
                    .meta
                    .affected_services
                    .iter()
                    .filter(|(_, affected)| affected.contains(name))
                    .map(|(prefix, _)| prefix.clone());
                let entry = services.entry(name.clone()).or_default();
                entry.extend(prefixes.clone());
                keys.extend(prefixes);
            }
        }
        if services.is_empty() {
            return None;
        }
        for service_keys in services.values_mut() {
            service_keys.sort();
            service_keys.dedup();
        }
        tracing::info!(services = ?services.keys().collect::<Vec<_>>(), "the render root is behind the live settings; applying");
        Some(
            self.apply_services(store, keys.into_iter().collect(), services)
                .await,
        )
    }
}

async fn run_blocking(
    job: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    what: &'static str,
) {
    match tokio::task::spawn_blocking(job).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot {what}"),
        Err(e) => tracing::warn!(error = %e, "cannot {what}"),
    }
}
