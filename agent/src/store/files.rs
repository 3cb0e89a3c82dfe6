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
//!   has grown past twice the snapshot's size (compaction), so a commit's cost does not grow
//!   with the kept history. A snapshot that uses the log says so (`log-size`, format 2);
//!   one from before the log (format 1) is read as it is, and the first commit writes a
//!   snapshot that starts the log.
//! - `pending.log` holds the pending transactions, one appended line per change to one
//!   of them (see [`super::pending`]): a PATCH or discard writes only its own
//!   transaction, not fsync'd, and creates no file.
//! - A commit does not write the pending log: the committed state records which
//!   transactions were still pending when it was written (`pending-ids`) and the next id
//!   to be given (`next-tx-id`). On `load`, a pending transaction whose id is below that
//!   next id but not among those pending was committed (or discarded) before the last
//!   durable write, and is dropped; any other is genuinely pending. That holds however
//!   long a transaction stays pending and however many commits happen meanwhile.
//! - Previous forms of the pending transactions, read once and migrated into the log:
//!   `pending-tx-<id>.<rev>.json` (one file per transaction and revision; per id, the
//!   highest revision that parses) and, before that, `pending-<seq>.json` (all
//!   transactions in one file, with its older rule: the ids of the last
//!   `COMMITTED_WINDOW` commits, and the generation the file was written at).
//!
//! `state.lock` (flock) keeps a second keeld away from the same directory.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::log::Log;
use super::pending::{self, Change, PendingLog};
use super::slots::{Loss, Opened, Slots};
use super::{Caller, Chunked, Generation, History, PendingTx, Recovered, Snapshot, StoreError};

/// The snapshot's form: 1 without a log, 2 with (`log-size`). Written: 2.
const FORMAT: u32 = 2;
const FORMAT_NO_LOG: u32 = 1;
const GENERATIONS: &str = "generations.json";
const PENDING_PREFIX: &str = "pending-";
const PENDING_SUFFIX: &str = ".json";
const LOCK: &str = "state.lock";
/// The log may grow to this many times the snapshot before a compaction. A commit of a
/// generation of `r` bytes then writes `r` to the log and, amortised, `r / 2` of
/// snapshot: half of what a factor of 1 costs, for a log at most twice the snapshot to
/// read at open.
const LOG_PER_SNAPSHOT: u64 = 2;

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
    committed: &'a Chunked<(u64, u64)>,
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

const TX_FORMAT: u32 = 2;
const LEGACY_PENDING_FORMAT: u32 = 1;
const TX_PREFIX: &str = "pending-tx-";

/// Where a pending transaction found by `load` came from.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// `pending-<seq>.json`, the oldest form.
    Legacy,
    /// `pending-tx-<id>.<rev>.json`.
    TxFile,
    /// `pending.log`, today's form.
    Log,
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
    /// The pending transactions on disk.
    pending: PendingLog,
    /// What the committed state read at open says about pending transactions.
    record: PendingRecord,
    log: Log,
    dir_handle: File,
    accept_loss: bool,
    /// Bytes of the last snapshot written or read: the log may grow to
    /// [`LOG_PER_SNAPSHOT`] times this (at least [`super::log::MIN_LOG`]) before the next
    /// write compacts.
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
    /// Only for the log.
    FailSync,
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
            pending: PendingLog::new(dir),
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

        let (mut pending, previous_forms) = self.load_pending(record.as_ref(), &committed)?;
        if let Some(loss) = loss {
            // Some of them may have been committed in what was lost: never revive one.
            let discarded: Vec<String> = pending.keys().cloned().collect();
            pending.clear();
            self.recovered = Some(recover(&mut history, loss, discarded));
        }
        // Always written afresh: drops what was committed, discarded or torn, and
        // migrates the previous forms, whose files go only once the log holds them.
        self.pending
            .rewrite(&pending)
            .map_err(|source| StoreError::Io {
                path: self.pending.path(),
                source,
            })?;
        for path in previous_forms {
            let _ = fs::remove_file(path);
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
        let committed: Chunked<(u64, u64)> = committed.into_iter().collect();
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

    /// Reads the pending transactions: the log, and the files of the previous forms
    /// (returned, to remove once the log holds what they held). Drops those the committed
    /// state shows as committed or discarded (see the module comment).
    fn load_pending(
        &mut self,
        record: Option<&PendingRecord>,
        committed: &VecDeque<(u64, u64)>,
    ) -> Result<(BTreeMap<String, PendingTx>, Vec<PathBuf>), StoreError> {
        let (as_of, legacy, mut previous_forms) = self.load_legacy_pending();
        let (tx_files, tx_paths) = self.load_tx_files();
        previous_forms.extend(tx_paths);
        let log = PendingLog::read(&self.dir).map_err(|source| StoreError::Io {
            path: self.pending.path(),
            source,
        })?;
        if log.unreadable > 0 {
            tracing::warn!(
                lines = log.unreadable,
                "pending log lines unreadable (crash or power loss?); those changes to pending transactions are lost"
            );
        }
        // The log is the newest form: an id it names (even as gone) is its to say, whatever
        // an older form's leftover file holds for that id.
        let older = legacy
            .into_iter()
            .map(|(name, tx)| (name, tx, Source::Legacy))
            .chain(
                tx_files
                    .into_iter()
                    .map(|(name, tx)| (name, tx, Source::TxFile)),
            )
            .filter(|(_, tx, _)| !log.seen.contains(&tx.id));
        let candidates = older.chain(
            log.transactions
                .into_values()
                .map(|(name, tx)| (name, tx, Source::Log)),
        );
        let mut found: BTreeMap<String, (PendingTx, Source)> = BTreeMap::new();
        for (name, tx, source) in candidates {
            // Two ids under one name (a discard and a new transaction, cut by a crash):
            // the newer id is the later transaction. The same id: the newer form.
            let newer = found
                .get(&name)
                .is_none_or(|(held, held_source)| (tx.id, source) > (held.id, *held_source));
            if newer {
                found.insert(name, (tx, source));
            }
        }
        let window_ids: HashSet<u64> = committed.iter().map(|(_, id)| *id).collect();
        let window_full = committed.len() >= super::COMMITTED_WINDOW;
        let window_start = committed.front().map_or(0, |(generation, _)| *generation);
        let legacy_too_old = window_full && as_of + 1 < window_start;
        let mut pending = BTreeMap::new();
        let mut ids = HashSet::new();
        for (name, (tx, source)) in found {
            // One id under two names (forms written by different keelds, after a
            // downgrade and an upgrade): the pending log counts an id once.
            if !ids.insert(tx.id) {
                tracing::warn!(tx = %name, id = tx.id, "dropping a pending transaction whose id another one holds");
                continue;
            }
            let keep = match record {
                Some(record) => tx.id >= record.next_tx_id || record.pending_ids.contains(&tx.id),
                // A committed state from before the record: the window of committed ids,
                // and the previous form's check of how old its file is (commits after it
                // was written may have left the window: uncommitted work is lost, never
                // revived).
                None => {
                    let stale = source == Source::Legacy && legacy_too_old;
                    !window_ids.contains(&tx.id) && !stale
                }
            };
            if !keep {
                tracing::info!(tx = %name, "dropping a pending transaction already committed or discarded");
                continue;
            }
            pending.insert(name, tx);
        }
        Ok((pending, previous_forms))
    }

    /// The per-transaction files of the previous form: per id, the highest revision
    /// that parses; and every such file.
    fn load_tx_files(&self) -> (Vec<(String, PendingTx)>, Vec<PathBuf>) {
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
        let mut paths = Vec::new();
        for (id, mut revs) in by_id {
            revs.sort();
            for (_, path) in revs.iter().rev() {
                let parsed = fs::read(path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<TxFile>(&bytes).ok())
                    .filter(|file| file.format == TX_FORMAT && file.tx.id == id);
                match parsed {
                    Some(file) => {
                        found.push((file.name, file.tx));
                        break;
                    }
                    None => tracing::warn!(path = %path.display(),
                        "pending transaction file unreadable (crash or power loss?); trying an older one"),
                }
            }
            paths.extend(revs.into_iter().map(|(_, path)| path));
        }
        (found, paths)
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
        let _ = fs::remove_file(self.dir.join(pending::TMP));
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
    /// for why an append is atomic and durable); when the log has outgrown twice the snapshot,
    /// a compaction: the whole state into the next slot (see `slots`), after which the
    /// log starts again.
    pub fn write_generations(
        &mut self,
        generations: &History,
        committed: &Chunked<(u64, u64)>,
        next_tx_id: u64,
        pending_ids: &[u64],
    ) -> Result<(), StoreError> {
        let live = generations.last().map_or(0, |g| g.generation);
        // A failed slot write that could not be marked refused must be overwritten
        // first: a log record names the snapshot before it, which that write, should it
        // have landed, would hide after a restart.
        if self.log.ready() && !self.slots.must_write_next() {
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
                min => min.max(self.snapshot_len.saturating_mul(LOG_PER_SNAPSHOT)),
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
        committed: &Chunked<(u64, u64)>,
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

    /// Test hook: the next durable write (a log append or a slot write) lands whole,
    /// then its `fdatasync` fails.
    #[cfg(test)]
    pub fn fail_next_sync(&mut self) {
        self.fault = Some(Fault::FailSync);
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
            (Some(Fault::FailSync), true) => self.log.fail_next_sync = true,
            (Some(Fault::FailSync), false) => self.slots.fail_next_sync = true,
            (None, _) => {}
        }
    }

    /// Brings the pending log in line with `pending` for the transactions named in
    /// `names`: each one there gets a `put` line, and other ids under those names a
    /// `gone` line, except `committed` ids, which `load` drops once the committed state
    /// is durable (see the module comment). One write; transactions not named are not
    /// touched.
    pub fn write_pending(
        &mut self,
        pending: &BTreeMap<String, PendingTx>,
        names: &BTreeSet<String>,
        committed: &HashSet<u64>,
    ) -> Result<(), StoreError> {
        let mut changes = Vec::new();
        for name in names {
            let current = pending.get(name);
            if let Some(tx) = current {
                changes.push(Change::Put { name, tx });
            }
            changes.extend(
                self.pending
                    .ids_named(name)
                    .filter(|id| Some(*id) != current.map(|tx| tx.id) && !committed.contains(id))
                    .map(|id| Change::Gone { id }),
            );
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.pending
            .append(&changes)
            .map_err(|source| StoreError::Io {
                path: self.pending.path(),
                source,
            })
    }

    /// The names of the transactions the pending log holds.
    pub fn pending_names(&self) -> BTreeSet<String> {
        self.pending.names().map(str::to_owned).collect()
    }

    /// After a durable batch: the transactions it `committed` leave the pending log's
    /// count of what it holds, and the log is compacted to `pending` (all that is
    /// pending now) when it has outgrown that. A failed compaction is only logged: the
    /// log as it is stays correct.
    pub fn settle(&mut self, committed: &HashSet<u64>, pending: &BTreeMap<String, PendingTx>) {
        for id in committed {
            self.pending.forget(*id);
        }
        if self.pending.compaction_due() {
            if let Err(e) = self.pending.rewrite(pending) {
                tracing::warn!(path = %self.pending.path().display(), error = %e,
                    "cannot compact the pending log; appending to it as it is");
            }
        }
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
