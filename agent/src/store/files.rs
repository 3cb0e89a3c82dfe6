//! The store's on-disk form, in the state directory.
//!
//! - `generations.0` / `generations.1` hold the kept generations, oldest first, and the
//!   recent committed transaction ids: two slots written in turn, each write one
//!   checksummed `pwrite` + `fdatasync` (see [`super::slots`] for why that is atomic and
//!   durable, and how a torn write is told from damage). `generations.held` marks a
//!   directory whose slots have been written. A store from before the slots
//!   (`generations.json`) is read once and then superseded.
//! - `pending-<seq>.json` holds the named pending transactions. Each write creates the next
//!   sequence number's file and then unlinks the previous one; `load` takes the highest
//!   file that parses. A keeld crash (SIGKILL, panic) can leave a torn newest file only
//!   while the previous one still exists, so nothing is lost. These files are not
//!   fsync'd, and deliberately not renamed over an existing file either (ext4 flushes
//!   data on rename-over-existing, which would cost as much as the fsync we avoid):
//!   a pending transaction is uncommitted work, and paying a flush on every PATCH
//!   would halve commit throughput. After a power loss the pending transactions may be
//!   older, or gone; committed generations are not affected.
//! - A commit does not rewrite the pending file: the committed state also keeps the ids of
//!   the last `COMMITTED_WINDOW` committed transactions (far more than the kept history),
//!   and `load` drops a pending transaction whose id is among them. Each pending file
//!   records the generation it was written at; if commits it could list have since left
//!   the window (only after a power loss left a very old pending file behind), `load`
//!   sets the whole file aside rather than risk reviving a committed transaction.
//!
//! `state.lock` (flock) keeps a second keeld away from the same directory.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::slots::{Loss, Opened, Slots};
use super::{Caller, Generation, PendingTx, Recovered, Snapshot, StoreError};

const FORMAT: u32 = 1;
const GENERATIONS: &str = "generations.json";
const PENDING_PREFIX: &str = "pending-";
const PENDING_SUFFIX: &str = ".json";
const LOCK: &str = "state.lock";

#[derive(Deserialize)]
struct GenerationsFile {
    format: u32,
    generations: Vec<Generation>,
    /// `(generation, transaction id)` of recent commits, oldest first.
    #[serde(default)]
    committed: VecDeque<(u64, u64)>,
}

/// The same shape, borrowed, so that writing does not copy the history.
#[derive(Serialize)]
struct GenerationsFileRef<'a> {
    format: u32,
    generations: &'a [Generation],
    committed: &'a VecDeque<(u64, u64)>,
}

#[derive(Deserialize)]
struct PendingFile {
    format: u32,
    /// The live generation when the file was written.
    #[serde(default)]
    as_of: u64,
    transactions: BTreeMap<String, PendingTx>,
}

#[derive(Serialize)]
struct PendingFileRef<'a> {
    format: u32,
    as_of: u64,
    transactions: &'a BTreeMap<String, PendingTx>,
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct StoreFiles {
    dir: PathBuf,
    slots: Slots,
    /// What the slots held at open, until `load` takes it.
    opened: Option<Opened>,
    /// What `load` recovered from, with `--accept-state-loss`.
    recovered: Option<Recovered>,
    /// Sequence number of the newest pending file on disk (0: none yet).
    pending_seq: std::sync::atomic::AtomicU64,
    /// Held for the life of the process; the flock goes with it.
    _lock: File,
}

impl StoreFiles {
    pub fn new(dir: &Path) -> Result<StoreFiles, StoreError> {
        Self::open(dir, false)
    }

    /// Locks `dir` and reads its slots. `accept_loss`: continue from the newest intact
    /// state even if a newer one may have been lost (`--accept-state-loss`); otherwise
    /// that is [`StoreError::Damaged`].
    pub fn open(dir: &Path, accept_loss: bool) -> Result<StoreFiles, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK))
            .map_err(io)?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(StoreError::Io {
                path: dir.join(LOCK),
                source: std::io::Error::other(
                    "another keeld holds this state directory (flock busy)",
                ),
            });
        }
        let (slots, opened) = Slots::open(dir, accept_loss)?;
        Ok(StoreFiles {
            dir: dir.to_owned(),
            slots,
            opened: Some(opened),
            recovered: None,
            pending_seq: std::sync::atomic::AtomicU64::new(0),
            _lock: lock,
        })
    }

    /// Reads the state; no written slot (and no legacy `generations.json`) means a fresh
    /// store holding generation 0, the empty model. A new, migrated or recovered store is
    /// written into both slots (and marked) before this returns.
    pub fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.remove_temp_files();
        let gen_path = self.dir.join(GENERATIONS);
        let Opened {
            payload,
            must_initialise,
            loss,
        } = self.opened.take().ok_or_else(|| StoreError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other("the store was loaded twice"),
        })?;
        let stored = match payload {
            Some(bytes) => Ok(bytes),
            // A recovery with nothing intact left starts empty: a `generations.json`
            // beside slots that were written is long superseded.
            None if loss.is_some() => Err(std::io::ErrorKind::NotFound.into()),
            // No slot written yet: a store from before the slots, or a new one.
            None => fs::read(&gen_path),
        };
        let (mut history, committed) = match stored {
            Ok(bytes) => {
                let file: GenerationsFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: gen_path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.format != FORMAT {
                    return Err(StoreError::Corrupt {
                        path: gen_path,
                        reason: format!("unknown format {}", file.format),
                    });
                }
                if file.generations.is_empty() {
                    return Err(StoreError::Corrupt {
                        path: gen_path,
                        reason: "no generations".to_owned(),
                    });
                }
                let mut committed = file.committed;
                if committed.is_empty() {
                    committed = file
                        .generations
                        .iter()
                        .filter_map(|g| Some((g.generation, g.tx_id?)))
                        .collect();
                }
                (file.generations, committed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                vec![Generation {
                    generation: 0,
                    time: super::now_rfc3339(),
                    tx: "initial".to_owned(),
                    tx_id: None,
                    caller: Caller::keeld(),
                    changed_keys: Vec::new(),
                    rollback_of: None,
                    settings: Arc::new(Value::Object(Default::default())),
                }],
                VecDeque::new(),
            ),
            Err(source) => {
                return Err(StoreError::Io {
                    path: gen_path,
                    source,
                })
            }
        };

        let (as_of, mut pending) = self.load_pending();
        if let Some(loss) = loss {
            let discarded: Vec<String> = pending.keys().cloned().collect();
            pending.clear();
            self.write_pending(&pending, 0)?;
            self.recovered = Some(recover(&mut history, loss, discarded));
        }
        if must_initialise {
            let bytes = self.serialize(&history, &committed)?;
            let generation = history.last().map_or(0, |g| g.generation);
            self.slots
                .initialise(&bytes, generation)
                .map_err(|source| StoreError::Io {
                    path: self.slots.next_path().to_owned(),
                    source,
                })?;
        }
        let window_full = committed.len() >= super::COMMITTED_WINDOW;
        let window_start = committed.front().map_or(0, |(generation, _)| *generation);
        if window_full && as_of + 1 < window_start && !pending.is_empty() {
            // Commits after the file was written have left the window: any of its
            // transactions could be among them. Uncommitted work is lost, never revived.
            tracing::warn!(
                as_of,
                window_start,
                "pending transactions file is older than the committed-id window; setting it aside"
            );
            pending.clear();
        }
        let ids: HashSet<u64> = committed.iter().map(|(_, id)| *id).collect();
        pending.retain(|name, tx| {
            let keep = !ids.contains(&tx.id);
            if !keep {
                tracing::info!(tx = %name, "dropping pending transaction already committed");
            }
            keep
        });
        Ok(Snapshot {
            history,
            pending,
            committed,
        })
    }

    fn pending_files(&self) -> Vec<(u64, PathBuf)> {
        let mut files: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let seq = name
                    .strip_prefix(PENDING_PREFIX)?
                    .strip_suffix(PENDING_SUFFIX)?
                    .parse()
                    .ok()?;
                Some((seq, entry.path()))
            })
            .collect();
        files.sort();
        files
    }

    /// The newest pending file that parses, and the generation it was written at; older
    /// files (and torn newer ones) are removed.
    fn load_pending(&self) -> (u64, BTreeMap<String, PendingTx>) {
        let files = self.pending_files();
        let mut chosen = None;
        for (seq, path) in files.iter().rev() {
            let parsed = fs::read(path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<PendingFile>(&bytes).ok())
                .filter(|file| file.format == FORMAT);
            match parsed {
                Some(file) => {
                    chosen = Some((*seq, (file.as_of, file.transactions)));
                    break;
                }
                None => tracing::warn!(path = %path.display(),
                    "pending transactions file unreadable (crash or power loss?); trying an older one"),
            }
        }
        let (seq, (as_of, pending)) = chosen.unwrap_or_default();
        self.pending_seq.store(
            files.last().map_or(0, |(s, _)| *s),
            std::sync::atomic::Ordering::Relaxed,
        );
        for (other, path) in &files {
            if *other != seq {
                let _ = fs::remove_file(path);
            }
        }
        (as_of, pending)
    }

    fn remove_temp_files(&self) {
        let _ = fs::remove_file(self.dir.join(format!("{GENERATIONS}.tmp")));
        let _ = fs::remove_file(self.dir.join(format!("{}.tmp", super::slots::MARKER)));
    }

    /// What `load` recovered from, if it did (`--accept-state-loss`).
    pub fn recovered(&mut self) -> Option<Recovered> {
        self.recovered.take()
    }

    fn serialize(
        &self,
        generations: &[Generation],
        committed: &VecDeque<(u64, u64)>,
    ) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&GenerationsFileRef {
            format: FORMAT,
            generations,
            committed,
        })
        .map_err(|e| StoreError::Io {
            path: self.dir.join(GENERATIONS),
            source: std::io::Error::other(e),
        })
    }

    /// Durably writes the committed state into the next slot (see `slots` for why this is
    /// atomic and durable).
    pub fn write_generations(
        &mut self,
        generations: &[Generation],
        committed: &VecDeque<(u64, u64)>,
    ) -> Result<(), StoreError> {
        let bytes = self.serialize(generations, committed)?;
        let generation = generations.last().map_or(0, |g| g.generation);
        self.slots
            .write(&bytes, generation)
            .map_err(|source| StoreError::Io {
                path: self.slots.next_path().to_owned(),
                source,
            })
    }

    /// Test hook: the next durable write fails as on a full disk.
    #[cfg(test)]
    pub fn fail_next_write(&mut self) {
        self.slots.fail_next_write = true;
    }

    /// Test hook: the next durable write lands only its first `sectors` sectors and
    /// fails, as if keeld were killed in the middle of it.
    #[cfg(test)]
    pub fn tear_next_write(&mut self, sectors: usize) {
        self.slots.tear_next_write = Some(sectors);
    }

    /// Writes the pending transactions as the next `pending-<seq>.json`, then removes the
    /// previous file (see the module comment for why this is safe and why no fsync).
    pub fn write_pending(
        &self,
        pending: &BTreeMap<String, PendingTx>,
        as_of: u64,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let previous = self.pending_seq.load(Ordering::Relaxed);
        let seq = previous + 1;
        let path = self
            .dir
            .join(format!("{PENDING_PREFIX}{seq}{PENDING_SUFFIX}"));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&PendingFileRef {
            format: FORMAT,
            as_of,
            transactions: pending,
        })
        .map_err(|e| io(std::io::Error::other(e)))?;
        let written = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(&bytes));
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(io(e));
        }
        self.pending_seq.store(seq, Ordering::Relaxed);
        if previous > 0 {
            let old = self
                .dir
                .join(format!("{PENDING_PREFIX}{previous}{PENDING_SUFFIX}"));
            if let Err(e) = fs::remove_file(&old) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %old.display(), error = %e, "cannot remove old pending file");
                }
            }
        }
        Ok(())
    }
}

/// Continues `history` after an accepted loss: a new generation equal to the newest intact
/// one (or empty), numbered above every generation the lost records can have reached, so
/// that no number a client may have seen is given again. A lost record's header names its
/// generation; when the header is gone too, the record was at most one write newer than
/// the intact one (writes alternate), and one write carries at most
/// `MAX_GENERATIONS_PER_WRITE` generations.
fn recover(history: &mut Vec<Generation>, loss: Loss, discarded: Vec<String>) -> Recovered {
    let live = history.last().map_or(0, |g| g.generation);
    let known = loss.lost_generation.unwrap_or(0).max(live);
    let margin = if loss.unknown {
        super::writer::MAX_GENERATIONS_PER_WRITE
    } else {
        0
    };
    let generation = (known + margin + 1).max(live + 1);
    let settings = history.last().map_or_else(
        || Arc::new(Value::Object(Default::default())),
        |g| g.settings.clone(),
    );
    tracing::error!(
        reason = %loss.reason,
        continued_from = live,
        generation,
        discarded_pending = ?discarded,
        "--accept-state-loss: continuing from the newest intact state; what the damaged file held is lost"
    );
    history.push(Generation {
        generation,
        time: super::now_rfc3339(),
        tx: super::RECOVERY_TX.to_owned(),
        tx_id: None,
        caller: Caller::keeld(),
        changed_keys: Vec::new(),
        rollback_of: None,
        settings,
    });
    Recovered {
        reason: loss.reason,
        continued_from: live,
        generation,
        discarded_pending: discarded,
    }
}
