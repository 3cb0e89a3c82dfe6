//! The store's on-disk form, in the state directory.
//!
//! - `generations.0` / `generations.1` hold the kept generations, oldest first, and the
//!   recent committed transaction ids: two slots written in turn, each write one
//!   checksummed `pwrite` + `fdatasync` (see [`super::slots`] for why that is atomic and
//!   durable, and how a torn write is told from damage). `generations.held` marks a
//!   directory whose slots have been written. A store from before the slots
//!   (`generations.json`) is read once and then superseded.
//! - `generations.log` holds what was committed since that snapshot, one appended
//!   record per durable batch (see [`super::log`]); a slot is written only when the log
//!   has grown past the snapshot's size (compaction), so a commit's cost does not grow
//!   with the kept history. A snapshot that uses the log says so (`log-size`, format 2);
//!   one from before the log (format 1) is read as it is, and the first commit writes a
//!   snapshot that starts the log.
//! - `pending-tx-<id>.<rev>.json` holds one pending transaction (its name, id and
//!   patches); a PATCH or discard touches only the file of its own transaction, so its
//!   cost does not grow with the number of transactions pending. A write creates the
//!   next revision's file and then unlinks the previous one; `load` takes, per id, the
//!   highest revision that parses. A keeld crash (SIGKILL, panic) can leave a torn newest
//!   file only while the previous one still exists, so nothing is lost. These files are
//!   not fsync'd, and deliberately not renamed over an existing file either (ext4
//!   flushes data on rename-over-existing, which would cost as much as the fsync we
//!   avoid): a pending transaction is uncommitted work, and paying a flush on every
//!   PATCH would halve commit throughput. After a power loss the pending transactions
//!   may be older, or gone; committed generations are not affected.
//! - A commit does not wait for its pending file: the file is unlinked after the
//!   committed state is durable, and the committed state records which transactions
//!   were still pending when it was written (`pending-ids`) and the next id to be given
//!   (`next-tx-id`). On `load`, a pending file whose id is below that next id but not
//!   among those pending was committed (or discarded) before the last durable write, and
//!   is dropped; any other is genuinely pending. That holds however long a transaction
//!   stays pending and however many commits happen meanwhile.
//! - `pending-<seq>.json` (all transactions in one file, rewritten on every change) is
//!   the previous form: read once, with its older rule (the ids of the last
//!   `COMMITTED_WINDOW` commits, and the generation the file was written at), and
//!   migrated.
//!
//! `state.lock` (flock) keeps a second keeld away from the same directory.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::log::Log;
use super::slots::{Loss, Opened, Slots};
use super::{Caller, Generation, History, PendingTx, Recovered, Snapshot, StoreError};

/// The snapshot's form: 1 without a log, 2 with (`log-size`). Written: 2.
const FORMAT: u32 = 2;
const FORMAT_NO_LOG: u32 = 1;
const GENERATIONS: &str = "generations.json";
const PENDING_PREFIX: &str = "pending-";
const PENDING_SUFFIX: &str = ".json";
const LOCK: &str = "state.lock";

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct GenerationsFile {
    format: u32,
    generations: Vec<Arc<Generation>>,
    /// `(generation, transaction id)` of recent commits, oldest first.
    #[serde(default)]
    committed: VecDeque<(u64, u64)>,
    /// The next pending transaction id when this was written (absent before per-
    /// transaction pending files).
    #[serde(default)]
    next_tx_id: Option<u64>,
    /// The ids of the transactions pending when this was written.
    #[serde(default)]
    pending_ids: Option<Vec<u64>>,
    /// The log's size when this was written: the log extends this snapshot (format 2).
    #[serde(default)]
    log_size: Option<u64>,
}

/// The same shape, borrowed, so that writing does not copy the history.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct GenerationsFileRef<'a> {
    format: u32,
    generations: &'a History,
    committed: &'a VecDeque<(u64, u64)>,
    next_tx_id: u64,
    pending_ids: &'a [u64],
    log_size: u64,
}

/// One log record: what a durable batch changed.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Delta {
    /// The generations the batch made, oldest first.
    generations: Vec<Arc<Generation>>,
    /// Their `(generation, transaction id)` pairs.
    committed: Vec<(u64, u64)>,
    /// The oldest generation still kept.
    first_kept: u64,
    next_tx_id: u64,
    pending_ids: Vec<u64>,
}

/// What the committed state says about pending transactions (see the module comment).
#[derive(Debug, Clone, Default)]
pub struct PendingRecord {
    /// The next id a new transaction gets.
    pub next_tx_id: u64,
    /// The ids of the transactions pending when the committed state was written.
    pub pending_ids: Vec<u64>,
}

/// The previous form: every pending transaction in one file.
#[derive(Deserialize)]
struct LegacyPendingFile {
    format: u32,
    /// The live generation when the file was written.
    #[serde(default)]
    as_of: u64,
    transactions: BTreeMap<String, PendingTx>,
}

/// One pending transaction, `pending-tx-<id>.<rev>.json`.
#[derive(Deserialize)]
struct TxFile {
    format: u32,
    name: String,
    tx: PendingTx,
}

#[derive(Serialize)]
struct TxFileRef<'a> {
    format: u32,
    name: &'a str,
    tx: &'a PendingTx,
}

const TX_FORMAT: u32 = 2;
const LEGACY_PENDING_FORMAT: u32 = 1;
const TX_PREFIX: &str = "pending-tx-";

/// A pending transaction's file on disk.
#[derive(Debug, Clone)]
struct OnDisk {
    name: String,
    rev: u64,
}

/// Where a pending transaction found by `load` came from.
enum Source {
    Tx,
    Legacy,
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
    /// The pending transaction files on disk, by id.
    on_disk: BTreeMap<u64, OnDisk>,
    /// What the committed state read at open says about pending transactions.
    record: PendingRecord,
    log: Log,
    dir_handle: File,
    accept_loss: bool,
    /// Bytes of the last snapshot written or read: the log may grow to this (at least
    /// [`super::log::MIN_LOG`]) before the next write compacts.
    snapshot_len: u64,
    /// The live generation of the last durable write: a log record carries what is newer.
    durable_generation: u64,
    /// [`super::log::MIN_LOG`]; lowered by tests.
    min_log: u64,
    /// Test hook for the next durable write, wherever it goes.
    #[cfg(test)]
    fault: Option<Fault>,
    /// Held for the life of the process; the flock goes with it.
    _lock: File,
}

#[cfg(test)]
#[derive(Debug, Clone, Copy)]
enum Fault {
    Fail,
    Tear(usize),
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
        let dir_handle = File::open(dir).map_err(io)?;
        Ok(StoreFiles {
            dir: dir.to_owned(),
            slots,
            opened: Some(opened),
            recovered: None,
            on_disk: BTreeMap::new(),
            record: PendingRecord::default(),
            log: Log::unread(dir),
            dir_handle,
            accept_loss,
            snapshot_len: 0,
            durable_generation: 0,
            min_log: super::log::MIN_LOG,
            #[cfg(test)]
            fault: None,
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
            mut must_initialise,
            mut loss,
            seq: base,
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
        let (mut history, mut committed, mut record, log_size) = match stored {
            Ok(bytes) => {
                self.snapshot_len = bytes.len() as u64;
                let file: GenerationsFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: gen_path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.format != FORMAT && file.format != FORMAT_NO_LOG {
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
                let record =
                    file.next_tx_id
                        .zip(file.pending_ids)
                        .map(|(next_tx_id, pending_ids)| PendingRecord {
                            next_tx_id,
                            pending_ids,
                        });
                let log_size = file.log_size.filter(|_| file.format == FORMAT);
                (file.generations, committed, record, log_size)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                vec![Arc::new(Generation {
                    generation: 0,
                    time: super::now_rfc3339(),
                    tx: "initial".to_owned(),
                    tx_id: None,
                    caller: Caller::keeld(),
                    changed_keys: Vec::new(),
                    rollback_of: None,
                    settings: Arc::new(Value::Object(Default::default())),
                })],
                VecDeque::new(),
                None,
                None,
            ),
            Err(source) => {
                return Err(StoreError::Io {
                    path: gen_path,
                    source,
                })
            }
        };

        // The log extends the snapshot it names. Its sequence numbers count whatever
        // state is used: a later write must never reuse one.
        let log_path = self.dir.join(super::log::NAME);
        let (log, scan) =
            Log::open(&self.dir, base, log_size.unwrap_or(0)).map_err(|source| StoreError::Io {
                path: log_path.clone(),
                source,
            })?;
        self.slots.observe_seq(scan.max_seq);
        // After an accepted loss of a slot the snapshot used is an older one than the log
        // extends, and the state is rebuilt without the log; a snapshot from before the
        // log has none.
        if let (Some(_), None) = (log_size, &loss) {
            if let Some(torn) = scan.torn {
                tracing::warn!(
                    sequence = torn,
                    "{}: an append torn by a crash before it was acknowledged was cut",
                    log_path.display()
                );
            }
            let last_read = scan.records.last().map_or(base, |r| r.seq);
            for entry in &scan.records {
                let delta: Delta =
                    serde_json::from_slice(&entry.payload).map_err(|e| StoreError::Corrupt {
                        path: log_path.clone(),
                        reason: format!("record {}: {e}", entry.seq),
                    })?;
                apply_delta(&mut history, &mut committed, &mut record, delta).map_err(
                    |reason| StoreError::Corrupt {
                        path: log_path.clone(),
                        reason: format!("record {}: {reason}", entry.seq),
                    },
                )?;
            }
            if let Some((reason, lost_generation)) = scan.damage {
                if !self.accept_loss {
                    return Err(StoreError::Damaged {
                        path: log_path,
                        reason,
                    });
                }
                // Every write numbered after the last record read may have been lost.
                loss = Some(Loss {
                    reason: format!("{}: {reason}", log_path.display()),
                    lost_generation,
                    unknown_writes: scan.max_seq.saturating_sub(last_read).max(1),
                });
                must_initialise = true;
            }
            self.log = log;
        }

        let mut pending = self.load_pending(record.as_ref(), &committed)?;
        if let Some(loss) = loss {
            // Some of them may have been committed in what was lost: never revive one.
            let discarded: Vec<String> = pending.keys().cloned().collect();
            let names: BTreeSet<String> = pending.keys().cloned().collect();
            pending.clear();
            self.write_pending(&pending, &names, &HashSet::new())?;
            self.recovered = Some(recover(&mut history, loss, discarded));
        }
        let ids = pending.values().map(|tx| tx.id);
        self.record = PendingRecord {
            next_tx_id: record
                .as_ref()
                .map_or(1, |r| r.next_tx_id)
                .max(ids.clone().max().map_or(1, |m| m + 1))
                .max(committed.iter().map(|(_, id)| id + 1).max().unwrap_or(1))
                .max(
                    history
                        .iter()
                        .filter_map(|g| g.tx_id)
                        .max()
                        .map_or(1, |m| m + 1),
                ),
            pending_ids: ids.collect(),
        };
        let history = History::from(history);
        self.durable_generation = history.last().map_or(0, |g| g.generation);
        if must_initialise {
            let next_tx_id = self.record.next_tx_id;
            let pending_ids = self.record.pending_ids.clone();
            self.write_snapshot(&history, &committed, next_tx_id, &pending_ids, true)?;
        }
        Ok(Snapshot {
            history,
            pending,
            committed,
        })
    }

    /// The first id a new pending transaction may take: above every id the store has
    /// recorded or holds.
    pub fn next_tx_id(&self) -> u64 {
        self.record.next_tx_id
    }

    /// Reads the pending transactions: the per-transaction files, and a `pending-<seq>.json`
    /// of the previous form (migrated here). Drops those the committed state shows as
    /// committed or discarded (see the module comment), and superseded or torn files.
    fn load_pending(
        &mut self,
        record: Option<&PendingRecord>,
        committed: &VecDeque<(u64, u64)>,
    ) -> Result<BTreeMap<String, PendingTx>, StoreError> {
        let (as_of, legacy, legacy_files) = self.load_legacy_pending();
        let mut found: BTreeMap<String, (PendingTx, Source)> = BTreeMap::new();
        for (name, tx) in legacy {
            found.insert(name, (tx, Source::Legacy));
        }
        for (name, tx) in self.load_tx_files() {
            // Two ids under one name (a discard and a new transaction, cut by a crash):
            // the newer id is the later transaction. Same id: the per-transaction file is
            // the newer form.
            match found.get(&name) {
                Some((held, _)) if held.id > tx.id => self.remove_tx(tx.id),
                Some((held, Source::Tx)) => {
                    let older = held.id;
                    self.remove_tx(older);
                    found.insert(name, (tx, Source::Tx));
                }
                _ => {
                    found.insert(name, (tx, Source::Tx));
                }
            }
        }
        let window_ids: HashSet<u64> = committed.iter().map(|(_, id)| *id).collect();
        let window_full = committed.len() >= super::COMMITTED_WINDOW;
        let window_start = committed.front().map_or(0, |(generation, _)| *generation);
        let legacy_too_old = window_full && as_of + 1 < window_start;
        let mut pending = BTreeMap::new();
        for (name, (tx, source)) in found {
            let keep = match record {
                Some(record) => tx.id >= record.next_tx_id || record.pending_ids.contains(&tx.id),
                // A committed state from before the record: the window of committed ids,
                // and the previous form's check of how old its file is (commits after it
                // was written may have left the window: uncommitted work is lost, never
                // revived).
                None => {
                    let stale = matches!(source, Source::Legacy) && legacy_too_old;
                    !window_ids.contains(&tx.id) && !stale
                }
            };
            if !keep {
                tracing::info!(tx = %name, "dropping a pending transaction already committed or discarded");
                if matches!(source, Source::Tx) {
                    self.remove_tx(tx.id);
                }
                continue;
            }
            if matches!(source, Source::Legacy) {
                self.write_tx(&name, &tx)?;
            }
            pending.insert(name, tx);
        }
        // Migrated (or superseded): the previous form's files go.
        for path in legacy_files {
            let _ = fs::remove_file(path);
        }
        Ok(pending)
    }

    /// The per-transaction files: per id, the highest revision that parses; the others
    /// (older revisions, a torn newer one) are removed.
    fn load_tx_files(&mut self) -> Vec<(String, PendingTx)> {
        let mut by_id: BTreeMap<u64, Vec<(u64, PathBuf)>> = BTreeMap::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let Some(file_name) = entry.file_name().into_string().ok() else {
                continue;
            };
            let Some((id, rev)) = parse_tx_file_name(&file_name) else {
                continue;
            };
            by_id.entry(id).or_default().push((rev, entry.path()));
        }
        let mut found = Vec::new();
        for (id, mut revs) in by_id {
            revs.sort();
            let mut chosen = None;
            for (rev, path) in revs.iter().rev() {
                let parsed = fs::read(path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<TxFile>(&bytes).ok())
                    .filter(|file| file.format == TX_FORMAT && file.tx.id == id);
                match parsed {
                    Some(file) => {
                        chosen = Some((*rev, file));
                        break;
                    }
                    None => tracing::warn!(path = %path.display(),
                        "pending transaction file unreadable (crash or power loss?); trying an older one"),
                }
            }
            for (rev, path) in &revs {
                if chosen.as_ref().is_none_or(|(kept, _)| kept != rev) {
                    let _ = fs::remove_file(path);
                }
            }
            if let Some((rev, file)) = chosen {
                self.on_disk.insert(
                    id,
                    OnDisk {
                        name: file.name.clone(),
                        rev,
                    },
                );
                found.push((file.name, file.tx));
            }
        }
        found
    }

    /// The newest `pending-<seq>.json` (previous form) that parses, with the generation it
    /// was written at, and every such file (to remove once migrated).
    fn load_legacy_pending(&self) -> (u64, BTreeMap<String, PendingTx>, Vec<PathBuf>) {
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
        let mut chosen = None;
        for (_, path) in files.iter().rev() {
            let parsed = fs::read(path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<LegacyPendingFile>(&bytes).ok())
                .filter(|file| file.format == LEGACY_PENDING_FORMAT);
            match parsed {
                Some(file) => {
                    chosen = Some((file.as_of, file.transactions));
                    break;
                }
                None => tracing::warn!(path = %path.display(),
                    "pending transactions file unreadable (crash or power loss?); trying an older one"),
            }
        }
        let (as_of, pending) = chosen.unwrap_or_default();
        (
            as_of,
            pending,
            files.into_iter().map(|(_, path)| path).collect(),
        )
    }

    fn remove_temp_files(&self) {
        let _ = fs::remove_file(self.dir.join(format!("{GENERATIONS}.tmp")));
        let _ = fs::remove_file(self.dir.join(format!("{}.tmp", super::slots::MARKER)));
    }

    /// What `load` recovered from, if it did (`--accept-state-loss`).
    pub fn recovered(&mut self) -> Option<Recovered> {
        self.recovered.take()
    }

    /// Durably records the committed state (`generations`, the kept history with the
    /// new generations last; `committed`; what it says about pending transactions:
    /// `next_tx_id` and the ids of those pending now). Usually one record appended to the
    /// log, holding only the generations newer than the last durable write (see `log`
    /// for why an append is atomic and durable); when the log has outgrown the snapshot,
    /// a compaction: the whole state into the next slot (see `slots`), after which the
    /// log starts again.
    pub fn write_generations(
        &mut self,
        generations: &History,
        committed: &VecDeque<(u64, u64)>,
        next_tx_id: u64,
        pending_ids: &[u64],
    ) -> Result<(), StoreError> {
        let live = generations.last().map_or(0, |g| g.generation);
        if self.log.ready() {
            let durable = self.durable_generation;
            // The new generations are the newest: read from the end, not the whole history.
            let mut new: Vec<Arc<Generation>> = generations
                .iter()
                .rev()
                .take_while(|g| g.generation > durable)
                .cloned()
                .collect();
            new.reverse();
            let delta = Delta {
                generations: new,
                committed: committed
                    .iter()
                    .filter(|(generation, _)| *generation > durable)
                    .copied()
                    .collect(),
                first_kept: generations.first().map_or(0, |g| g.generation),
                next_tx_id,
                pending_ids: pending_ids.to_vec(),
            };
            let bytes = serde_json::to_vec(&delta).map_err(|e| StoreError::Io {
                path: self.log.path().to_owned(),
                source: std::io::Error::other(e),
            })?;
            // (A `min_log` of 0, set by tests, sends every write to the slots.)
            let budget = match self.min_log {
                0 => 0,
                min => min.max(self.snapshot_len),
            };
            if self.log.len() + super::log::record_len(bytes.len()) <= budget {
                #[cfg(test)]
                self.arm_fault(true);
                let seq = self.slots.take_seq();
                self.log
                    .append(seq, live, &bytes)
                    .map_err(|source| StoreError::Io {
                        path: self.log.path().to_owned(),
                        source,
                    })?;
                self.durable_generation = live;
                return Ok(());
            }
        }
        self.write_snapshot(generations, committed, next_tx_id, pending_ids, false)
    }

    /// Writes the whole state into the next slot (`both`: into both, then the marker, for
    /// a new, migrated or recovered store), then starts the log again. The log file
    /// exists, durably, before a snapshot that names it; the log starts again only once
    /// the snapshot is durable, and its old records name an older snapshot, so a crash at
    /// any point leaves either the previous snapshot with its log, or the new one.
    fn write_snapshot(
        &mut self,
        generations: &History,
        committed: &VecDeque<(u64, u64)>,
        next_tx_id: u64,
        pending_ids: &[u64],
        both: bool,
    ) -> Result<(), StoreError> {
        let log_size = self
            .log
            .prepare(&self.dir_handle)
            .map_err(|source| StoreError::Io {
                path: self.log.path().to_owned(),
                source,
            })?;
        let bytes = serde_json::to_vec(&GenerationsFileRef {
            format: FORMAT,
            generations,
            committed,
            next_tx_id,
            pending_ids,
            log_size,
        })
        .map_err(|e| StoreError::Io {
            path: self.dir.join(GENERATIONS),
            source: std::io::Error::other(e),
        })?;
        let live = generations.last().map_or(0, |g| g.generation);
        #[cfg(test)]
        self.arm_fault(false);
        let written = if both {
            self.slots.initialise(&bytes, live)
        } else {
            self.slots.write(&bytes, live)
        };
        written.map_err(|source| StoreError::Io {
            path: self.slots.next_path().to_owned(),
            source,
        })?;
        self.log.restart(self.slots.seq());
        self.snapshot_len = bytes.len() as u64;
        self.durable_generation = live;
        Ok(())
    }

    /// Test hook: the next durable write fails as on a full disk.
    #[cfg(test)]
    pub fn fail_next_write(&mut self) {
        self.fault = Some(Fault::Fail);
    }

    /// Test hook: the next durable write lands only its first `sectors` sectors and
    /// fails, as if keeld were killed in the middle of it.
    #[cfg(test)]
    pub fn tear_next_write(&mut self, sectors: usize) {
        self.fault = Some(Fault::Tear(sectors));
    }

    /// Test hook: the log may grow to `bytes` before a compaction (0: every write is a
    /// compaction, into a slot).
    #[cfg(test)]
    pub fn set_min_log(&mut self, bytes: u64) {
        self.min_log = bytes;
    }

    /// Hands the test fault to the log (`log`) or the slots, whichever writes next.
    #[cfg(test)]
    fn arm_fault(&mut self, log: bool) {
        match (self.fault.take(), log) {
            (Some(Fault::Fail), true) => self.log.fail_next_write = true,
            (Some(Fault::Tear(n)), true) => self.log.tear_next_write = Some(n),
            (Some(Fault::Fail), false) => self.slots.fail_next_write = true,
            (Some(Fault::Tear(n)), false) => self.slots.tear_next_write = Some(n),
            (None, _) => {}
        }
    }

    /// Brings the files of the transactions named in `names` in line with `pending`:
    /// each one there gets its file rewritten (the next revision, then the previous one
    /// unlinked; see the module comment for why that is safe and why no fsync), and the
    /// files of other ids under those names are unlinked, except `committed` ids, whose
    /// files go only once the committed state is durable ([`StoreFiles::forget`]).
    /// Transactions not named are not touched.
    pub fn write_pending(
        &mut self,
        pending: &BTreeMap<String, PendingTx>,
        names: &BTreeSet<String>,
        committed: &HashSet<u64>,
    ) -> Result<(), StoreError> {
        for name in names {
            let current = pending.get(name);
            if let Some(tx) = current {
                self.write_tx(name, tx)?;
            }
            let stale: Vec<u64> = self
                .on_disk
                .iter()
                .filter(|(id, disk)| {
                    disk.name == *name
                        && Some(**id) != current.map(|tx| tx.id)
                        && !committed.contains(*id)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                self.unlink_tx(id)?;
            }
        }
        Ok(())
    }

    /// The names of the transactions with a file on disk.
    pub fn pending_names(&self) -> BTreeSet<String> {
        self.on_disk
            .values()
            .map(|disk| disk.name.clone())
            .collect()
    }

    /// Removes the files of transactions the durable committed state now records as
    /// committed. A failure only leaves a file that `load` drops.
    pub fn forget(&mut self, committed: &HashSet<u64>) {
        for id in committed {
            self.remove_tx(*id);
        }
    }

    /// Writes `tx`'s next revision, then unlinks the previous one.
    fn write_tx(&mut self, name: &str, tx: &PendingTx) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&TxFileRef {
            format: TX_FORMAT,
            name,
            tx,
        })
        .map_err(|e| StoreError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let previous = self.on_disk.get(&tx.id).map(|disk| disk.rev);
        let mut rev = previous.map_or(1, |r| r + 1);
        loop {
            let path = self.tx_path(tx.id, rev);
            let written = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut file| file.write_all(&bytes));
            match written {
                Ok(()) => break,
                // Left by a write whose clean-up failed: never overwrite a file in
                // place (a torn overwrite would lose both revisions); take the next.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && rev < u64::MAX => {
                    rev += 1;
                }
                Err(source) => {
                    let _ = fs::remove_file(&path);
                    return Err(StoreError::Io { path, source });
                }
            }
        }
        self.on_disk.insert(
            tx.id,
            OnDisk {
                name: name.to_owned(),
                rev,
            },
        );
        if let Some(old) = previous {
            let path = self.tx_path(tx.id, old);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a superseded pending file");
                }
            }
        }
        Ok(())
    }

    /// Unlinks the file of transaction `id`; it must go (a discarded transaction whose
    /// file stayed would come back at the next start).
    fn unlink_tx(&mut self, id: u64) -> Result<(), StoreError> {
        let Some(disk) = self.on_disk.get(&id) else {
            return Ok(());
        };
        let path = self.tx_path(id, disk.rev);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        self.on_disk.remove(&id);
        Ok(())
    }

    /// [`StoreFiles::unlink_tx`] where a failure is only logged.
    fn remove_tx(&mut self, id: u64) {
        if let Err(e) = self.unlink_tx(id) {
            tracing::warn!(error = %e, "cannot remove a pending transaction file");
        }
    }

    fn tx_path(&self, id: u64, rev: u64) -> PathBuf {
        self.dir
            .join(format!("{TX_PREFIX}{id}.{rev}{PENDING_SUFFIX}"))
    }
}

/// `(id, revision)` of a `pending-tx-<id>.<rev>.json` file name.
fn parse_tx_file_name(name: &str) -> Option<(u64, u64)> {
    let (id, rev) = name
        .strip_prefix(TX_PREFIX)?
        .strip_suffix(PENDING_SUFFIX)?
        .split_once('.')?;
    Some((id.parse().ok()?, rev.parse().ok()?))
}

/// Continues `history` after an accepted loss: a new generation equal to the newest intact
/// one (or empty), numbered above every generation the lost records can have reached, so
/// that no number a client may have seen is given again. A lost record's header names its
/// generation; when the header is gone too, it counts as every write it may stand for (a
/// slot: one, writes alternate; the log: every number after the last record read), and
/// one write carries at most `MAX_GENERATIONS_PER_WRITE` generations.
fn recover(history: &mut Vec<Arc<Generation>>, loss: Loss, discarded: Vec<String>) -> Recovered {
    let live = history.last().map_or(0, |g| g.generation);
    let known = loss.lost_generation.unwrap_or(0).max(live);
    let margin = super::writer::MAX_GENERATIONS_PER_WRITE.saturating_mul(loss.unknown_writes);
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
    history.push(Arc::new(Generation {
        generation,
        time: super::now_rfc3339(),
        tx: super::RECOVERY_TX.to_owned(),
        tx_id: None,
        caller: Caller::keeld(),
        changed_keys: Vec::new(),
        rollback_of: None,
        settings,
    }));
    Recovered {
        reason: loss.reason,
        continued_from: live,
        generation,
        discarded_pending: discarded,
    }
}

/// Applies one log record to the state read so far.
fn apply_delta(
    history: &mut Vec<Arc<Generation>>,
    committed: &mut VecDeque<(u64, u64)>,
    record: &mut Option<PendingRecord>,
    delta: Delta,
) -> Result<(), String> {
    let live = history.last().map_or(0, |g| g.generation);
    if let Some(first) = delta.generations.first() {
        if first.generation <= live {
            return Err(format!(
                "generation {} does not follow generation {live}",
                first.generation
            ));
        }
    }
    history.extend(delta.generations);
    history.retain(|g| g.generation >= delta.first_kept);
    if history.is_empty() {
        return Err(format!(
            "no generation is left at or after {}",
            delta.first_kept
        ));
    }
    committed.extend(delta.committed);
    while committed.len() > super::COMMITTED_WINDOW {
        committed.pop_front();
    }
    *record = Some(PendingRecord {
        next_tx_id: delta.next_tx_id,
        pending_ids: delta.pending_ids,
    });
    Ok(())
}
