//! The writer: applies [`Op`]s in arrival order and persists them in batches.
//!
//! There is no writer thread. The request that finds the writer idle becomes its leader:
//! it runs the batch on its own thread (a blocking section of the async runtime), then
//! every batch that queued up meanwhile, and steps down when the queue is empty. A lone
//! client therefore pays no thread hand-off, and concurrent clients share batches (group
//! commit): N commits queued during one fsync cost one fsync, not N. Each op is validated
//! and applied to a working copy; if persisting the batch fails, the working copy is
//! thrown away, every op that changed something gets the error, and the published
//! snapshot is the old one — nothing changes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde_json::Value;
use settings_model::patch::{changed_keys, changed_keys_touched};
use tokio::sync::oneshot;

use super::files::StoreFiles;
use super::{Caller, CheckError, CommitCheck, Generation, Op, PendingTx, Snapshot, StoreError};
use crate::events::{CommitEvent, EventBody, EventBus};

/// Batches one leader runs before handing the rest of the queue to a blocking task, so
/// that a request is not held up indefinitely serving others under sustained load.
const LEADER_BATCHES: usize = 8;

/// What only the leader touches.
struct WriterState {
    files: StoreFiles,
    keep: usize,
    check: Option<Arc<dyn CommitCheck>>,
    /// The id the next new pending transaction gets: ids are sequential (small in the
    /// files) and never reused, starting above every id the store has seen.
    next_tx_id: u64,
    /// Transactions whose state in the pending log may differ from memory (a batch
    /// wrote them, then failed): the next batch writes them again from memory.
    pending_behind: Behind,
    /// [`super::MAX_SETTINGS_BYTES`]; lowered by tests.
    max_settings_bytes: usize,
    /// Hears of each generation once it is durable, before its commit is answered.
    events: EventBus,
}

/// Pending transactions whose state in the pending log may not match memory.
#[derive(Debug, Default)]
struct Behind {
    names: std::collections::BTreeSet<String>,
    /// Unknown which (a batch panicked): every one.
    all: bool,
}

struct Queue {
    ops: Vec<Op>,
    /// A leader is running batches; new ops only queue.
    busy: bool,
    /// How many commits recent durable batches carried (decaying): the concurrency the
    /// leader can expect, and so whether lingering for more commits is worth it.
    recent_commits: usize,
}

/// Most ops in one batch. Bounds a batch's latency, and keeps the commits of one batch
/// well inside the window of committed transaction ids (`COMMITTED_WINDOW`).
const MAX_BATCH: usize = 1024;

/// Most generations one durable write can carry: each commit or rollback is one op, and
/// a write persists one batch. A recovery that cannot read a lost record's number skips
/// this many (see `files::recover`).
pub(super) const MAX_GENERATIONS_PER_WRITE: u64 = MAX_BATCH as u64;

/// Longest a leader lingers for more commits before a durable write. Only done when
/// recent batches showed concurrent committers, so a lone client never waits: without
/// it, the first commit after a batch starts a batch of one and the others queue
/// behind its fsync, halving the sharing.
const LINGER: std::time::Duration = std::time::Duration::from_micros(150);

fn is_durable(op: &Op) -> bool {
    matches!(
        op,
        Op::Commit { .. } | Op::Rollback { .. } | Op::Migrate { .. }
    )
}

pub(super) struct Writer {
    queue: Mutex<Queue>,
    /// Signalled when an op is queued while a leader runs.
    arrived: std::sync::Condvar,
    /// Locked only by the leader, hence never contended.
    state: Mutex<WriterState>,
    shared: Arc<ArcSwap<Snapshot>>,
    /// The live generation, for watchers such as the container supervisor.
    live: tokio::sync::watch::Sender<u64>,
}

impl Writer {
    pub(super) fn new(
        files: StoreFiles,
        keep: usize,
        check: Option<Arc<dyn CommitCheck>>,
        shared: Arc<ArcSwap<Snapshot>>,
        live: tokio::sync::watch::Sender<u64>,
        events: EventBus,
    ) -> Writer {
        let next_tx_id = {
            let recorded = files.next_tx_id();
            let snapshot = shared.load();
            let history = snapshot.history.iter().filter_map(|g| g.tx_id);
            let committed = snapshot.committed.iter().map(|(_, id)| *id);
            let pending = snapshot.pending.values().map(|p| p.id);
            history
                .chain(committed)
                .chain(pending)
                .max()
                .map_or(1, |m| m + 1)
                .max(recorded)
        };
        Writer {
            queue: Mutex::new(Queue {
                ops: Vec::new(),
                busy: false,
                recent_commits: 0,
            }),
            arrived: std::sync::Condvar::new(),
            state: Mutex::new(WriterState {
                files,
                keep,
                check,
                next_tx_id,
                pending_behind: Behind::default(),
                max_settings_bytes: super::MAX_SETTINGS_BYTES,
                events,
            }),
            shared,
            live,
        }
    }

    /// Queues `op`; if no leader is running, runs batches until the queue is empty.
    /// May block on disk I/O: call it where blocking is allowed.
    pub(super) fn submit(self: &Arc<Self>, op: Op) {
        {
            let mut queue = lock(&self.queue);
            queue.ops.push(op);
            if queue.busy {
                self.arrived.notify_one();
                return;
            }
            queue.busy = true;
        }
        self.lead(LEADER_BATCHES);
    }

    fn lead(self: &Arc<Self>, mut budget: usize) {
        loop {
            let mut batch = {
                let mut queue = lock(&self.queue);
                if queue.ops.is_empty() {
                    queue.busy = false;
                    return;
                }
                if budget == 0 {
                    // Still busy: the continuation is the leader now.
                    drop(queue);
                    let writer = Arc::clone(self);
                    let handed = std::thread::Builder::new()
                        .name("keel-store".to_owned())
                        .spawn(move || writer.lead(LEADER_BATCHES));
                    if handed.is_ok() {
                        return;
                    }
                    // No thread could be made: keep leading ourselves.
                    budget = LEADER_BATCHES;
                    continue;
                }
                let take = queue.ops.len().min(MAX_BATCH);
                let mut batch: Vec<Op> = queue.ops.drain(..take).collect();
                let commits = batch.iter().filter(|op| is_durable(op)).count();
                if commits > 0 && commits < queue.recent_commits {
                    let deadline = std::time::Instant::now() + LINGER;
                    let mut waiting = commits;
                    while waiting < queue.recent_commits {
                        let now = std::time::Instant::now();
                        if now >= deadline {
                            break;
                        }
                        queue = self
                            .arrived
                            .wait_timeout(queue, deadline - now)
                            .map(|(guard, _)| guard)
                            .unwrap_or_else(|e| e.into_inner().0);
                        let take = queue.ops.len().min(MAX_BATCH.saturating_sub(batch.len()));
                        waiting += queue.ops[..take].iter().filter(|op| is_durable(op)).count();
                        batch.extend(queue.ops.drain(..take));
                        if batch.len() >= MAX_BATCH {
                            break;
                        }
                    }
                }
                let commits = batch.iter().filter(|op| is_durable(op)).count();
                if commits > 0 {
                    // Follow rises at once, forget slowly.
                    queue.recent_commits = commits.max((queue.recent_commits * 3 + commits) / 4);
                }
                batch
            };
            budget -= 1;
            let mut state = lock(&self.state);
            let size = batch.len();
            let started = std::time::Instant::now();
            // Ops that need no fsync go first, in their own batch, so that a PATCH does
            // not wait for the commits queued beside it.
            let mut cheap = split_cheap(&mut batch);
            for part in [&mut cheap, &mut batch] {
                if part.is_empty() {
                    continue;
                }
                // A panic (a bug) must not wedge the writer: its ops' reply channels are
                // dropped with the batch, so their callers get an error, and the next
                // batch starts from the published snapshot.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_batch(&mut state, &self.shared, part);
                    let live = self.shared.load().live().generation;
                    self.live
                        .send_if_modified(|seen| std::mem::replace(seen, live) != live)
                }));
                if ran.is_err() {
                    tracing::error!("a store batch panicked; its operations were refused");
                    part.clear();
                    state.pending_behind.all = true;
                }
            }
            tracing::trace!(
                ops = size,
                micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "store batch"
            );
        }
    }
}

/// Takes out of `batch` the ops that need no durable write (PATCH, discard) and may run
/// before the durable ones queued ahead of them. They may unless a commit of their own
/// transaction precedes them: a PATCH no longer depends on the live settings, so it
/// commutes with a commit or rollback of anything else.
fn split_cheap(batch: &mut Vec<Op>) -> Vec<Op> {
    let mut cheap = Vec::new();
    let mut durable = Vec::with_capacity(batch.len());
    let mut committed = std::collections::HashSet::new();
    for op in batch.drain(..) {
        match &op {
            Op::Commit { tx, .. } => {
                committed.insert(tx.clone());
                durable.push(op);
            }
            Op::Rollback { .. } | Op::Migrate { .. } => durable.push(op),
            Op::Patch { tx, .. } | Op::Discard { tx, .. } if !committed.contains(tx) => {
                cheap.push(op)
            }
            Op::Patch { .. } | Op::Discard { .. } => durable.push(op),
        }
    }
    *batch = durable;
    cheap
}

impl Writer {
    /// Test hook: runs `ops` as one batch, as a leader does with ops that queued up
    /// together.
    #[cfg(test)]
    pub(super) fn run_as_one_batch(&self, mut ops: Vec<Op>) {
        let mut state = lock(&self.state);
        run_batch(&mut state, &self.shared, &mut ops);
    }

    /// Test hook: the next durable write fails as on a full disk.
    #[cfg(test)]
    pub(super) fn fail_next_write(&self) {
        lock(&self.state).files.fail_next_write();
    }

    /// Test hook: a lower limit on the size of the live settings.
    #[cfg(test)]
    pub(super) fn set_max_settings_bytes(&self, limit: usize) {
        lock(&self.state).max_settings_bytes = limit;
    }

    /// Test hook: see [`StoreFiles::set_min_log`].
    #[cfg(test)]
    pub(super) fn set_min_log(&self, bytes: u64) {
        lock(&self.state).files.set_min_log(bytes);
    }

    /// Test hook: see [`StoreFiles::tear_next_write`].
    #[cfg(test)]
    pub(super) fn tear_next_write(&self, sectors: usize) {
        lock(&self.state).files.tear_next_write(sectors);
    }

    /// Test hook: see [`StoreFiles::fail_next_sync`].
    #[cfg(test)]
    pub(super) fn fail_next_sync(&self) {
        lock(&self.state).files.fail_next_sync();
    }
}

/// A poisoned lock only means a panic elsewhere while holding it; the data (a queue, the
/// files handle) stays usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A reply waiting for the batch to be persisted.
enum Answer {
    Unit(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
    Keys(
        oneshot::Sender<Result<Vec<String>, StoreError>>,
        Result<Vec<String>, StoreError>,
    ),
}

impl Answer {
    fn changed_state(&self) -> bool {
        match self {
            Answer::Unit(_, r) => r.is_ok(),
            Answer::Keys(_, r) => r.is_ok(),
        }
    }

    fn send(self, failure: Option<&StoreError>) {
        // The receiver may have gone (client disconnected); nothing to do then.
        match (self, failure) {
            (Answer::Unit(s, r), None) => drop(s.send(r)),
            (Answer::Keys(s, r), None) => drop(s.send(r)),
            (Answer::Unit(s, r), Some(e)) => drop(s.send(r.and(Err(copy_error(e))))),
            (Answer::Keys(s, r), Some(e)) => drop(s.send(r.and(Err(copy_error(e))))),
        }
    }
}

fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Io { path, source } => StoreError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => StoreError::Io {
            path: "state".into(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

fn run_batch(state: &mut WriterState, shared: &ArcSwap<Snapshot>, batch: &mut Vec<Op>) {
    let WriterState {
        files,
        keep,
        check,
        next_tx_id,
        pending_behind,
        max_settings_bytes,
        events,
    } = state;
    let keep = *keep;
    let max_settings = *max_settings_bytes;
    let check = check.as_deref();
    let mut work: Snapshot = Snapshot::clone(&shared.load());
    let mut generations_dirty = false;
    // The transactions whose pending-log state this batch must bring in line with memory.
    let mut dirty = std::mem::take(&mut pending_behind.names);
    if std::mem::take(&mut pending_behind.all) {
        dirty.extend(work.pending.keys().cloned());
        dirty.extend(files.pending_names());
    }
    // Transactions this batch commits into a new generation: the pending log stops
    // counting them once that generation is durable.
    let mut committed_ids = HashSet::new();
    let mut answers = Vec::with_capacity(batch.len());
    // The generations this batch makes, in order, for the event bus. Taken as they are
    // made: the history may keep fewer than one batch makes.
    let mut made: Vec<CommitEvent> = Vec::new();

    for op in batch.drain(..) {
        match op {
            Op::Patch {
                tx,
                patch,
                size,
                reply,
            } => {
                let result = patch_tx(&mut work, next_tx_id, &tx, &patch, size);
                if result.is_ok() {
                    dirty.insert(tx);
                }
                answers.push(Answer::Unit(reply, result));
            }
            Op::Discard { tx, reply } => {
                let keys = match work.pending.remove(&tx) {
                    Some(held) => {
                        dirty.insert(tx);
                        held.keys()
                    }
                    None => Vec::new(),
                };
                answers.push(Answer::Keys(reply, Ok(keys)));
            }
            Op::Commit {
                tx,
                caller,
                prechecked,
                reply,
            } => {
                let result = commit_tx(
                    &mut work,
                    keep,
                    check,
                    max_settings,
                    &tx,
                    caller,
                    prechecked.map(|p| *p),
                );
                if let Ok(outcome) = &result {
                    // A commit that made a generation writes nothing to the pending
                    // log: once the generation is durable, the committed state records
                    // it as no longer pending, and `load` drops its lines. One that made
                    // none leaves no trace: its `gone` line goes with this batch.
                    if outcome.new_generation {
                        generations_dirty = true;
                        committed_ids.insert(outcome.tx_id);
                        made.push(CommitEvent::of(work.live()));
                    } else {
                        dirty.insert(tx);
                    }
                }
                answers.push(Answer::Keys(reply, result.map(|o| o.changed)));
            }
            Op::Rollback {
                generation,
                caller,
                reply,
            } => {
                let result = rollback(&mut work, keep, check, max_settings, generation, caller);
                if result.as_ref().is_ok_and(|k| !k.is_empty()) {
                    generations_dirty = true;
                    made.push(CommitEvent::of(work.live()));
                }
                answers.push(Answer::Keys(reply, result));
            }
            Op::Migrate {
                tx,
                settings,
                reply,
            } => {
                let result = migrate(&mut work, keep, max_settings, tx, settings);
                if result.as_ref().is_ok_and(|k| !k.is_empty()) {
                    generations_dirty = true;
                    made.push(CommitEvent::of(work.live()));
                }
                answers.push(Answer::Keys(reply, result));
            }
        }
    }

    // The pending log first, only the transactions this batch changed: if it cannot be
    // written, the committed state is not (and nothing changes). If it was written but
    // the committed state then fails, it runs ahead of memory: it is brought back in
    // line at once (below), and, should that fail too, by the next batch; only a crash
    // before either could revive or lose uncommitted work.
    let mut failure = None;
    if !dirty.is_empty() {
        failure = files
            .write_pending(&work.pending, &dirty, &committed_ids)
            .err();
    }
    if failure.is_none() && generations_dirty {
        let pending_ids: Vec<u64> = work.pending.values().map(|tx| tx.id).collect();
        failure = files
            .write_generations(&work.history, &work.committed, *next_tx_id, &pending_ids)
            .err();
    }
    match &failure {
        None => {
            files.settle(&committed_ids, &work.pending);
            shared.store(Arc::new(work));
            // Durable and visible, not yet answered: a commit's event comes before
            // anything its caller does next (the apply that follows it).
            events.publish_all(made.into_iter().map(EventBody::Commit));
        }
        Some(e) => {
            tracing::error!(error = %e, "persisting a batch failed; state unchanged");
            // Memory keeps the old state; so must the pending log, now: a refused patch
            // that reached it (a commit and a patch of one transaction in this batch)
            // would otherwise be that transaction after a crash. What memory holds is
            // put again, and ids the log holds beyond it are marked gone.
            let unchanged = shared.load();
            match files.write_pending(&unchanged.pending, &dirty, &HashSet::new()) {
                Ok(()) => {}
                Err(restore) => {
                    tracing::error!(error = %restore, "cannot bring the pending log back in line; the next batch tries again");
                    pending_behind.names = dirty;
                }
            }
        }
    }
    for answer in answers {
        let failed = failure.as_ref().filter(|_| answer.changed_state());
        answer.send(failed);
    }
}

fn patch_tx(
    work: &mut Snapshot,
    next_tx_id: &mut u64,
    tx: &str,
    patch: &Value,
    size: usize,
) -> Result<(), StoreError> {
    let full = |reason: String| StoreError::Full {
        tx: tx.to_owned(),
        reason,
    };
    if !work.pending.contains_key(tx) && work.pending.len() >= super::MAX_PENDING_TXS {
        return Err(full(format!(
            "{} transactions are pending already; commit or discard some",
            super::MAX_PENDING_TXS
        )));
    }
    let mut pending = work.pending.get(tx).cloned().unwrap_or_else(|| {
        // An id taken by a patch that then fails is simply skipped.
        *next_tx_id += 1;
        PendingTx {
            id: *next_tx_id - 1,
            patches: Vec::new(),
            bytes: 0,
        }
    });
    if pending.patches.len() >= super::MAX_PATCHES_PER_TX {
        return Err(full(format!(
            "it holds {} patches that cannot be folded together",
            super::MAX_PATCHES_PER_TX
        )));
    }
    pending.bytes += size;
    if pending.bytes > super::MAX_TX_BYTES {
        return Err(full(format!(
            "it would hold more than {} bytes of patches",
            super::MAX_TX_BYTES
        )));
    }
    // Fold into the previous patch when that is exact (the usual case), so a long-lived
    // transaction stays one patch; keep it separate when folding would turn a removal
    // followed by a new table into a merge (see `PendingTx::patches`).
    match pending.patches.last_mut() {
        Some(last) if super::can_fold(last, patch) => {
            super::fold_patch(Arc::make_mut(last), patch);
        }
        _ => pending.patches.push(Arc::new(patch.clone())),
    }
    // No validation of the candidate here: `Store::patch` validated the patch, the live
    // model is valid, and validity is closed under merge-patch (every rule of the model
    // is about one value or one whole array, and a patch replaces arrays whole). Commit
    // validates the candidate in full all the same.
    work.pending.insert(tx.to_owned(), pending);
    Ok(())
}

struct CommitOutcome {
    changed: Vec<String>,
    new_generation: bool,
    tx_id: u64,
}

/// The settings committing `pending` would make, validated and canonical. Only the groups
/// the transaction touches are validated: the others come from the live model, which is
/// valid, and no rule spans groups (see `settings_model::validate_groups`). Top-level
/// groups are kept in name order, so the result does not depend on edit history.
pub(crate) fn candidate_of(live: &Value, pending: &PendingTx) -> Result<Value, StoreError> {
    candidate_within(live, pending, super::MAX_SETTINGS_BYTES)
}

/// [`candidate_of`], refused as [`StoreError::SettingsTooLarge`] past `limit` bytes.
fn candidate_within(live: &Value, pending: &PendingTx, limit: usize) -> Result<Value, StoreError> {
    let groups: std::collections::BTreeSet<String> = pending
        .patches
        .iter()
        .filter_map(|p| p.as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    // The patches touch only these top-level groups, so merging them into a copy of
    // just those groups gives what merging into a copy of everything would, there.
    let mut merged = Value::Object(
        groups
            .iter()
            .filter_map(|g| Some((g.clone(), live.get(g)?.clone())))
            .collect(),
    );
    pending.apply_to(&mut merged);
    // Only what the transaction brings in is refused: a rule between keys that the live
    // settings break already (stored by an older keeld) does not hold the commit back.
    let canonical = settings_model::validate_groups_over(&merged, live, &groups)?;
    let mut canonical = match canonical {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let mut candidate = live.clone();
    if let Value::Object(map) = &mut candidate {
        for group in &groups {
            match canonical.remove(group) {
                Some(value) => {
                    map.insert(group.clone(), value);
                }
                None => {
                    map.remove(group);
                }
            }
        }
        map.sort_keys();
    }
    check_size(&candidate, limit)?;
    Ok(candidate)
}

/// Refuses settings larger than `limit` bytes as JSON. Every commit writes the live
/// settings, and each kept generation holds a copy that every compaction rewrites:
/// unbounded settings make commits slow and the state files huge.
fn check_size(settings: &Value, limit: usize) -> Result<(), StoreError> {
    /// Counts bytes instead of keeping them.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing a `Value` into a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, settings);
    if count.0 > limit {
        return Err(StoreError::SettingsTooLarge {
            size: count.0,
            limit,
        });
    }
    Ok(())
}

/// A commit's candidate, validated and checked against one snapshot before the commit
/// reached the writer (on a blocking thread: the check renders files), with what it
/// was computed from, so the writer can tell whether it still holds.
#[derive(Debug)]
pub(crate) struct Prechecked {
    generation: u64,
    tx_id: u64,
    patches: Vec<Arc<Value>>,
    limit: usize,
    /// The candidate and its changed keys, or why it was refused.
    outcome: Result<(Value, Vec<String>), StoreError>,
}

impl Prechecked {
    pub(crate) fn run(
        live: &Generation,
        pending: &PendingTx,
        check: Option<&dyn CommitCheck>,
    ) -> Prechecked {
        let limit = super::MAX_SETTINGS_BYTES;
        Prechecked {
            generation: live.generation,
            tx_id: pending.id,
            patches: pending.patches.clone(),
            limit,
            outcome: checked_candidate(&live.settings, pending, check, limit),
        }
    }

    /// Whether this was computed from exactly the state the writer now has.
    fn holds_for(&self, live: u64, pending: &PendingTx, limit: usize) -> bool {
        self.generation == live
            && self.tx_id == pending.id
            && self.limit == limit
            && self.patches.len() == pending.patches.len()
            && self
                .patches
                .iter()
                .zip(&pending.patches)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// The candidate of committing `pending` on `live`, its changed keys, and the check.
fn checked_candidate(
    live: &Value,
    pending: &PendingTx,
    check: Option<&dyn CommitCheck>,
    limit: usize,
) -> Result<(Value, Vec<String>), StoreError> {
    let candidate = candidate_within(live, pending, limit)?;
    let patches: Vec<&Value> = pending.patches.iter().map(|p| &**p).collect();
    let changed = changed_keys_touched(live, &candidate, &patches);
    let candidate = match check.filter(|_| !changed.is_empty()) {
        Some(check) => checked(check, candidate, &changed)?,
        None => candidate,
    };
    Ok((candidate, changed))
}

/// Runs `check` on `candidate` and hands it back: shared for the check's while (see
/// [`CommitCheck::check`]), then unwrapped (copied only if a check kept it).
fn checked(
    check: &dyn CommitCheck,
    candidate: Value,
    changed: &[String],
) -> Result<Value, StoreError> {
    let candidate = Arc::new(candidate);
    check
        .check(&candidate, changed)
        .map_err(StoreError::Refused)?;
    Ok(Arc::try_unwrap(candidate).unwrap_or_else(|kept| Value::clone(&kept)))
}

fn commit_tx(
    work: &mut Snapshot,
    keep: usize,
    check: Option<&dyn CommitCheck>,
    max_settings: usize,
    tx: &str,
    caller: Caller,
    prechecked: Option<Prechecked>,
) -> Result<CommitOutcome, StoreError> {
    let pending = work
        .pending
        .get(tx)
        .ok_or_else(|| StoreError::NothingPending(tx.to_owned()))?;
    let live = work.live().generation;
    let (candidate, changed) = match prechecked {
        Some(p) if p.holds_for(live, pending, max_settings) => p.outcome?,
        // Something committed or patched in between: check again, here.
        _ => checked_candidate(work.live_settings(), pending, check, max_settings)?,
    };
    let tx_id = pending.id;
    work.pending.remove(tx);
    if changed.is_empty() {
        return Ok(CommitOutcome {
            changed,
            new_generation: false,
            tx_id,
        });
    }
    push_generation(
        work,
        keep,
        tx.to_owned(),
        Some(tx_id),
        caller,
        &changed,
        None,
        candidate,
    );
    Ok(CommitOutcome {
        changed,
        new_generation: true,
        tx_id,
    })
}

fn rollback(
    work: &mut Snapshot,
    keep: usize,
    check: Option<&dyn CommitCheck>,
    max_settings: usize,
    generation: u64,
    caller: Caller,
) -> Result<Vec<String>, StoreError> {
    let target = work
        .find(generation)
        .ok_or(StoreError::UnknownGeneration(generation))?;
    // A generation from before a settings migration holds settings in another format
    // than this keeld reads.
    if let Some(migration) = work
        .history
        .iter()
        .rev()
        .find(|g| g.tx.starts_with(super::migrate::TX_PREFIX))
        .filter(|m| m.generation > generation)
    {
        return Err(StoreError::Refused(CheckError {
            message: format!(
                "generation {generation} predates the settings migration of generation {} \
                 ({}): its settings are in another format; roll back to generation {} or \
                 later",
                migration.generation, migration.tx, migration.generation
            ),
            key: None,
        }));
    }
    let settings = Value::clone(&target.settings);
    // Kept from before a lower limit, perhaps: the limit holds for what becomes live.
    check_size(&settings, max_settings)?;
    // Valid when it was committed, but perhaps not under this version's model: a
    // migration that found nothing to change leaves no generation to stop at above (a
    // key renamed, absent from the live settings, present in an older generation), and
    // a later version may accept less. What becomes live must be valid now.
    if let Err(e) = settings_model::validate(&settings) {
        return Err(StoreError::Refused(CheckError {
            message: format!(
                "generation {generation}'s settings are not valid for this version of Keel: {e}"
            ),
            key: e.key().map(str::to_owned),
        }));
    }
    let changed = changed_keys(work.live_settings(), &settings);
    let settings = match check.filter(|_| !changed.is_empty()) {
        Some(check) => checked(check, settings, &changed)?,
        None => settings,
    };
    if !changed.is_empty() {
        push_generation(
            work,
            keep,
            format!("rollback-to-{generation}"),
            None,
            caller,
            &changed,
            Some(generation),
            settings,
        );
    }
    Ok(changed)
}

fn migrate(
    work: &mut Snapshot,
    keep: usize,
    max_settings: usize,
    tx: String,
    settings: Value,
) -> Result<Vec<String>, StoreError> {
    check_size(&settings, max_settings)?;
    let changed = changed_keys(work.live_settings(), &settings);
    if !changed.is_empty() {
        push_generation(
            work,
            keep,
            tx,
            None,
            Caller::keeld(),
            &changed,
            None,
            settings,
        );
    }
    Ok(changed)
}

#[allow(clippy::too_many_arguments)]
fn push_generation(
    work: &mut Snapshot,
    keep: usize,
    tx: String,
    tx_id: Option<u64>,
    caller: Caller,
    changed: &[String],
    rollback_of: Option<u64>,
    settings: Value,
) {
    let generation = work.live().generation + 1;
    if let Some(id) = tx_id {
        work.committed.push((generation, id));
        let excess = work.committed.len().saturating_sub(super::COMMITTED_WINDOW);
        work.committed.drop_oldest(excess);
    }
    work.history.push(Arc::new(Generation {
        generation,
        time: super::now_rfc3339(),
        tx,
        tx_id,
        caller,
        changed_keys: changed.to_vec(),
        rollback_of,
        settings: Arc::new(settings),
    }));
    if work.history.len() > keep {
        let excess = work.history.len() - keep;
        work.history.drop_oldest(excess);
    }
}
