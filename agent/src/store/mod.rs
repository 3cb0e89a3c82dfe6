//! The datastore: committed generations, named pending transactions, history.
//!
//! Owns every mutation of settings state and its durability. Readers get an immutable
//! [`Snapshot`] without locks (an `ArcSwap` load), so a read never waits for a writer's
//! fsync. Mutations are [`Op`]s queued to the [`writer`], which applies them in order and
//! persists a whole batch at once: concurrent commits share one fsync (group commit). Must not render files or talk to containerd: callers do that after a
//! commit answered.

mod files;
mod history;
mod log;
pub mod migrate;
mod pending;
mod slots;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

pub use history::{Chunked, History};

pub use files::StoreFiles;
pub(crate) use writer::candidate_of;

/// Who asked for a change, from the API socket's `SO_PEERCRED`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// `/proc/<pid>/comm` at the time of the request; empty when it could not be read.
    pub comm: String,
}

impl Caller {
    /// keeld itself (boot-time commits, defaults).
    pub fn keeld() -> Self {
        Caller {
            uid: 0,
            gid: 0,
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            comm: "keeld".to_owned(),
        }
    }
}

/// One committed state of the whole settings model, with who made it and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Generation {
    pub generation: u64,
    /// RFC 3339, UTC.
    pub time: String,
    /// The transaction that produced it (`rollback-to-<N>` for a rollback).
    pub tx: String,
    /// Identity of the pending transaction that produced it; lets `open` drop a pending
    /// transaction that was committed just before a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_id: Option<u64>,
    pub caller: Caller,
    pub changed_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    /// The whole settings model (canonical JSON, no `settings` wrapper).
    pub settings: Arc<Value>,
}

/// A named pending transaction: a merge-patch waiting for commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingTx {
    pub id: u64,
    /// Merge-patches in the order they arrived; applied one after another at commit.
    /// (Folding them into one patch is lossy: `{"a":null}` then `{"a":{"b":1}}` must
    /// replace `a`, which a single merge-patch cannot say.)
    pub patches: Vec<Arc<Value>>,
    /// Bytes (as JSON) of the patches received, counted against [`MAX_TX_BYTES`].
    #[serde(default)]
    pub bytes: usize,
}

impl PendingTx {
    /// Applies the transaction's patches, in order, to `settings`.
    pub fn apply_to(&self, settings: &mut Value) {
        for patch in &self.patches {
            settings_model::patch::merge_patch(settings, patch);
        }
    }

    /// The keys the transaction touches (a `null` leaf is a removal), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .patches
            .iter()
            .flat_map(|p| settings_model::patch::flatten(p).into_keys())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// A single view of what is pending, for display (`GET /tx`).
    pub fn view(&self) -> Value {
        let mut view = Value::Object(Default::default());
        for patch in &self.patches {
            compose_for_view(&mut view, patch);
        }
        view
    }
}

/// Whether folding merge-patch `next` into `acc` gives exactly the effect of applying the
/// two in turn. It does unless `acc` removes (`null`) a key under which `next` sets a
/// table: applied in turn, the table replaces the removed value; folded, it would merge
/// into the live one.
pub(crate) fn can_fold(acc: &Value, next: &Value) -> bool {
    let (Value::Object(acc), Value::Object(next)) = (acc, next) else {
        return true;
    };
    next.iter().all(|(key, value)| match (acc.get(key), value) {
        (Some(Value::Null), Value::Object(_)) => false,
        (Some(existing @ Value::Object(_)), Value::Object(_)) => can_fold(existing, value),
        _ => true,
    })
}

/// Folds `next` into `acc` (check [`can_fold`] first).
pub(crate) fn fold_patch(acc: &mut Value, next: &Value) {
    compose_for_view(acc, next)
}

/// Folds `next` into `acc`, keeping `null`s so that removals stay visible.
fn compose_for_view(acc: &mut Value, next: &Value) {
    match (acc, next) {
        (Value::Object(acc), Value::Object(next)) => {
            for (key, value) in next {
                match acc.get_mut(key) {
                    Some(existing @ Value::Object(_)) if value.is_object() => {
                        compose_for_view(existing, value)
                    }
                    _ => {
                        acc.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (acc, next) => *acc = next.clone(),
    }
}

/// Most patches one pending transaction may hold.
pub const MAX_PATCHES_PER_TX: usize = 4096;

/// An immutable view of the store, swapped in whole after each persisted batch.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Oldest first; never empty: generation 0 is the empty model. The writer copies
    /// the snapshot for each batch: a copy of the history shares its generations in
    /// chunks (see [`History`]), so it costs the same however many are kept.
    pub history: History,
    pub pending: BTreeMap<String, PendingTx>,
    /// `(generation, transaction id)` of the last [`COMMITTED_WINDOW`] commits, oldest
    /// first, kept beyond the history: for a store written before the committed state
    /// recorded which transactions are pending (see `files`), it tells `open` which
    /// entries of a pending file written before them are already committed.
    pub committed: Chunked<(u64, u64)>,
}

/// How many commits [`Snapshot::committed`] remembers. The committed transactions a
/// pending file can still list are among those pending when it was written (a batch that
/// writes it has already removed the ones it commits), at most [`MAX_PENDING_TXS`]; the
/// window holds twice that.
pub const COMMITTED_WINDOW: usize = 2 * MAX_PENDING_TXS;

/// Most transactions pending at once (Bottlerocket's own tools use one or two).
pub const MAX_PENDING_TXS: usize = 128;
/// Most bytes (as JSON) of patches one pending transaction may hold.
pub const MAX_TX_BYTES: usize = 4 * 1024 * 1024;
/// Most bytes the live settings may take as JSON. A commit writes every kept generation,
/// each with its own copy of the settings; a bound on them bounds what a commit costs.
pub const MAX_SETTINGS_BYTES: usize = 4 * 1024 * 1024;

impl Snapshot {
    pub fn live(&self) -> &Generation {
        // `open` guarantees at least one generation; an empty history is a bug.
        self.history.last().expect("store history is never empty")
    }

    pub fn live_settings(&self) -> &Value {
        &self.live().settings
    }

    pub fn find(&self, generation: u64) -> Option<&Generation> {
        self.history
            .iter()
            .find(|g| g.generation == generation)
            .map(|g| &**g)
    }
}

/// Why a store operation was refused. The HTTP layer maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The patch or the candidate it produces is not a valid settings model (400).
    #[error(transparent)]
    Invalid(#[from] settings_model::Error),
    /// Commit of a transaction that holds nothing (422).
    #[error("transaction {0:?} has nothing pending to commit")]
    NothingPending(String),
    /// The candidate is valid settings but a [`CommitCheck`] refused it (422).
    #[error("the candidate settings were refused: {0}")]
    Refused(CheckError),
    /// Rollback to a generation that is not in the kept history (404).
    #[error("generation {0} is not in the kept history")]
    UnknownGeneration(u64),
    /// The state directory could not be read or written; nothing changed (500/507).
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A state file exists but cannot be understood; keeld refuses to guess.
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A slot or the log is damaged, cut short, emptied or gone, and may have held a
    /// newer acknowledged state than the one still intact (see `slots` and `log`): keeld
    /// refuses to start rather than serve older settings silently. `path` is that file
    /// (the state directory when both slots are affected).
    #[error(
        "{path}: {reason}. Acknowledged commits may be lost, so keeld will not fall back to \
         an older state on its own. Keep a copy of the state directory, then start keeld \
         once with --accept-state-loss to continue from the newest intact state (an empty \
         store if none is left); the history then records a generation named \
         \"accept-state-loss\""
    )]
    Damaged { path: PathBuf, reason: String },
    /// A transaction, or the pending state as a whole, would grow past its bounds (409).
    #[error("transaction {tx:?} cannot take this patch: {reason}")]
    Full { tx: String, reason: String },
    /// The settings a commit or rollback would make are larger than
    /// [`MAX_SETTINGS_BYTES`] as JSON (409); nothing changed.
    #[error(
        "the settings would take {size} bytes as JSON, over the limit of {limit} bytes \
         ({} MiB) for the live settings; remove or shorten settings",
        limit / (1024 * 1024)
    )]
    SettingsTooLarge { size: usize, limit: usize },
    /// The writer thread is gone (keeld is shutting down).
    #[error("the datastore is shutting down")]
    Closed,
}

/// A veto on a commit beyond settings validation: the applier test-renders the files the
/// changed keys affect, so a candidate that cannot be rendered is never committed.
pub trait CommitCheck: Send + Sync + std::fmt::Debug {
    /// `candidate` is shared so that a check can hold it (the applier's render context
    /// does) without copying it; the check must not keep it beyond its return.
    fn check(&self, candidate: &Arc<Value>, changed: &[String]) -> Result<(), CheckError>;
}

/// Why a [`CommitCheck`] refused a candidate.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CheckError {
    pub message: String,
    pub key: Option<String>,
}

/// Mutations, applied in the order the writer receives them.
#[derive(Debug)]
pub(crate) enum Op {
    Patch {
        tx: String,
        patch: Value,
        /// Its size as JSON, counted against [`MAX_TX_BYTES`].
        size: usize,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Discard {
        tx: String,
        reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
    },
    Commit {
        tx: String,
        caller: Caller,
        /// The candidate validated and checked (rendered) before the op was queued.
        prechecked: Option<Box<writer::Prechecked>>,
        reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
    },
    Rollback {
        generation: u64,
        caller: Caller,
        reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
    },
    /// A settings migration: a new generation holding `settings` (validated in full),
    /// named `tx`; see `migrate.rs`.
    Migrate {
        tx: String,
        settings: Value,
        reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
    },
}

/// The handle the API and boot code hold. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    snapshot: Arc<ArcSwap<Snapshot>>,
    writer: Arc<writer::Writer>,
    live: tokio::sync::watch::Receiver<u64>,
    check: Option<Arc<dyn CommitCheck>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`, keeping at most `keep` generations, and
    /// starts its writer thread.
    pub fn open(dir: &Path, keep: usize) -> Result<Store, StoreError> {
        Self::open_with_check(dir, keep, None, crate::events::EventBus::default())
    }

    /// Like [`Store::open`], with a check that every commit and rollback must pass, and
    /// the bus that hears of each new generation once it is durable.
    pub fn open_with_check(
        dir: &Path,
        keep: usize,
        check: Option<Arc<dyn CommitCheck>>,
        events: crate::events::EventBus,
    ) -> Result<Store, StoreError> {
        let mut files = StoreFiles::new(dir)?;
        let snapshot = files.load()?;
        let (live_tx, live) = tokio::sync::watch::channel(snapshot.live().generation);
        let shared = Arc::new(ArcSwap::from_pointee(snapshot));
        let writer = Arc::new(writer::Writer::new(
            files,
            keep.max(1),
            check.clone(),
            shared.clone(),
            live_tx,
            events,
        ));
        Ok(Store {
            snapshot: shared,
            writer,
            live,
            check,
        })
    }

    /// `--accept-state-loss`: if the newest state in `dir` may have been lost (see
    /// [`StoreError::Damaged`]), continues from the newest intact state (or an empty
    /// store), durably, as a new generation named `accept-state-loss`, numbered above
    /// every generation the damaged files could have held; pending transactions are
    /// discarded (some may have been committed in what was lost). `None` when nothing was
    /// wrong: the store is left as it was. Run it before [`Store::open`].
    pub fn recover(dir: &Path) -> Result<Option<Recovered>, StoreError> {
        let mut files = StoreFiles::open(dir, true)?;
        files.load()?;
        Ok(files.recovered())
    }

    /// Test hook: the next durable write fails as on a full disk.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.writer.fail_next_write();
    }

    /// Test hook: the log may grow to `bytes` before a compaction (0: every commit writes
    /// a slot, as before the log).
    #[cfg(test)]
    pub(crate) fn set_min_log(&self, bytes: u64) {
        self.writer.set_min_log(bytes);
    }

    /// Test hook: a lower limit than [`MAX_SETTINGS_BYTES`] on the live settings.
    #[cfg(test)]
    pub(crate) fn set_max_settings_bytes(&self, limit: usize) {
        self.writer.set_max_settings_bytes(limit);
    }

    /// Test hook: the next durable write (a log append or a slot write) lands whole,
    /// then its `fdatasync` fails.
    #[cfg(test)]
    pub(crate) fn fail_next_sync(&self) {
        self.writer.fail_next_sync();
    }

    /// Test hook: the next durable write lands only its first `sectors` 512-byte sectors
    /// and fails, as if keeld were killed in the middle of it.
    #[cfg(test)]
    pub(crate) fn tear_next_write(&self, sectors: usize) {
        self.writer.tear_next_write(sectors);
    }

    /// Follows the live generation number: changes on every commit and rollback.
    pub fn watch_live(&self) -> tokio::sync::watch::Receiver<u64> {
        self.live.clone()
    }

    /// The current state; never blocks.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Merges `patch` into transaction `tx` once it passes `validate_patch` (so the caller
    /// learns of a bad key from the PATCH that introduced it), with keys given under an
    /// older name renamed (`settings_model::model::normalize_patch`).
    pub async fn patch(&self, tx: &str, mut patch: Value) -> Result<(), StoreError> {
        settings_model::validate_patch(&patch)?;
        settings_model::model::normalize_patch(&mut patch);
        let size = serde_json::to_vec(&patch).map_or(0, |v| v.len());
        self.send(|reply| Op::Patch {
            tx: tx.to_owned(),
            patch,
            size,
            reply,
        })
        .await
    }

    /// Drops transaction `tx`; answers the keys it held (empty if it did not exist).
    pub async fn discard(&self, tx: &str) -> Result<Vec<String>, StoreError> {
        self.send(|reply| Op::Discard {
            tx: tx.to_owned(),
            reply,
        })
        .await
    }

    /// Commits `tx` as a new generation; answers the keys whose values changed.
    /// Answers only once the generation is durable.
    ///
    /// The candidate is validated and checked (its files test-rendered) before the
    /// commit is queued, so the writer, which every PATCH and commit goes through, never
    /// renders: it reuses that work when nothing changed in between (same live
    /// generation, same pending patches), and only then does it again itself. The check
    /// runs on a blocking thread, unless the settings and the transaction are small (see
    /// [`small_enough_to_check_inline`]): then on this task, since the hand-off there and
    /// back would cost more than the check.
    pub async fn commit(&self, tx: &str, caller: Caller) -> Result<Vec<String>, StoreError> {
        let prechecked = self.precheck(tx).await.map(Box::new);
        self.send(|reply| Op::Commit {
            tx: tx.to_owned(),
            caller,
            prechecked,
            reply,
        })
        .await
    }

    /// See [`Store::commit`]: `None` when there is nothing to check (no such
    /// transaction) or the check could not run.
    async fn precheck(&self, tx: &str) -> Option<writer::Prechecked> {
        let snapshot = self.snapshot();
        let pending = snapshot.pending.get(tx)?.clone();
        let check = self.check.clone();
        let inline = small_enough_to_check_inline(snapshot.live_settings(), &pending);
        let run = move || writer::Prechecked::run(snapshot.live(), &pending, check.as_deref());
        if inline {
            // A panicking check (a bug) fails only the precheck, as on the blocking pool:
            // the writer then checks again under its own guard.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).ok()
        } else {
            tokio::task::spawn_blocking(run).await.ok()
        }
    }

    /// Makes a new generation equal to `generation`; answers the changed keys.
    pub async fn rollback(
        &self,
        generation: u64,
        caller: Caller,
    ) -> Result<Vec<String>, StoreError> {
        self.send(|reply| Op::Rollback {
            generation,
            caller,
            reply,
        })
        .await
    }

    /// Makes `settings` (a migration's result) the live settings as a generation named
    /// `tx`, validated in full against this keeld's model but not test-rendered (the
    /// migration is the image's, and must land for the image to read its settings);
    /// answers the changed keys (none: no generation).
    pub async fn migrate(&self, tx: &str, settings: Value) -> Result<Vec<String>, StoreError> {
        let settings = settings_model::validate(&settings)?;
        self.send(|reply| Op::Migrate {
            tx: tx.to_owned(),
            settings,
            reply,
        })
        .await
    }

    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let op = make(reply);
        // The submitting task may become the writer's leader and block its worker thread
        // on disk I/O for one batch (no thread hand-off: that is the point). Only one
        // leader exists at a time, so the other workers keep serving reads; keeld runs
        // enough workers for that (see main.rs).
        self.writer.submit(op);
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Most JSON values (objects, arrays and scalars, counted through the tree) the live
/// settings may hold for a commit's check to run on the committing task.
const INLINE_CHECK_VALUES: usize = 512;
/// Most bytes of patches the transaction may hold for the same.
const INLINE_CHECK_PATCH_BYTES: usize = 16 * 1024;

/// Whether a commit's check (validation of the touched groups and a test render of the
/// affected files, both proportional to the settings) costs less than a round trip
/// through the blocking pool, which it would otherwise take: small settings, a small
/// transaction. Decided from the input alone, so that a large commit never holds a
/// worker thread (a host has as few as two) whatever ran before it. The count stops at
/// the limit: at most [`INLINE_CHECK_VALUES`] values are visited.
fn small_enough_to_check_inline(live: &Value, pending: &PendingTx) -> bool {
    fn within(value: &Value, budget: &mut usize) -> bool {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        match value {
            Value::Object(map) => map.values().all(|v| within(v, budget)),
            Value::Array(items) => items.iter().all(|v| within(v, budget)),
            _ => true,
        }
    }
    let mut budget = INLINE_CHECK_VALUES;
    pending.bytes <= INLINE_CHECK_PATCH_BYTES && within(live, &mut budget)
}

/// What [`Store::recover`] did.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// What was wrong, naming the file(s).
    pub reason: String,
    /// The generation the store continued from (0 with an empty store).
    pub continued_from: u64,
    /// The `accept-state-loss` generation recorded.
    pub generation: u64,
    /// Pending transactions discarded.
    pub discarded_pending: Vec<String>,
}

/// Name of the generation [`Store::recover`] records.
pub const RECOVERY_TX: &str = "accept-state-loss";

/// Current time as RFC 3339 (UTC, milliseconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests;
