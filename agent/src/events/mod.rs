//! The event bus: what happened in keeld, in order, for `GET /events`.
//!
//! Owns a bounded in-memory ring of [`Event`]s. Each event gets a cursor (1, 2, 3, … from
//! each keeld start) and the [`EventBus::stream`] id of that start: cursors are not
//! persisted, so after a keeld restart they begin again at 1 under a new stream id, and a
//! client that resumes with the old id is told (a [`Gap`] with reason `new-stream`)
//! instead of being handed cursors that mean something else now.
//!
//! Publishers (the store's writer for commits, the applier, the container status board,
//! the boot tracker, and the updates API) call [`EventBus::publish`]. It never waits for
//! a reader: it takes one short write lock (readers hold the lock only to copy out
//! pointers or lines already made, never to serialize), pushes, drops the oldest event
//! when the ring is full, and wakes subscribers, at most once per [`PACE`], or per up to
//! [`PACE_MAX`] while events stream in (a wake-up due later is one timer task for the
//! bus; with no subscriber at all, nothing is woken and no timer started). A reader
//! ([`Subscription`]) that fell behind the ring gets a [`Gap`] naming the cursors it
//! lost, never a silent hole. Must not do I/O nor serialize on the publisher's path (an event's
//! JSON is made once, by its first reader).

pub mod kinds;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;

pub use kinds::{
    ApplyCommand, ApplyEvent, ApplyFile, BootPhaseEvent, CommitEvent, ContainerEvent, EventBody,
    Kind, UpdateEvent,
};

/// Events kept when keeld is not told otherwise (`--event-buffer`). Events are small (a
/// commit's is at most [`kinds::MAX_KEYS`] keys and its caller; an apply's its files and
/// commands, without their output): typically a few hundred bytes, so about a MiB.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Most events one read hands out: bounds the time a reader holds the ring's lock and
/// the size of one chunk written to a client (events are at most a few KiB: see
/// [`kinds::MAX_KEYS`]).
const MAX_READ: usize = 64;

/// Most subscribers following at once. Each holds one of the API's connections
/// (`api::server::MAX_CONNECTIONS`); half of them stay for everything else.
pub const MAX_FOLLOWERS: usize = 256;

/// One thing that happened.
#[derive(Debug, Serialize)]
pub struct Event {
    /// Position in this stream: 1 for the first event after keeld started, +1 for each.
    pub cursor: u64,
    /// The keeld start this cursor belongs to (see [`EventBus::stream`]).
    pub stream: Arc<str>,
    /// When it was published (RFC 3339, UTC).
    pub time: String,
    #[serde(flatten)]
    pub body: EventBody,
    /// The JSON line, made by the first reader that needs it.
    #[serde(skip)]
    line: OnceLock<Bytes>,
}

impl Event {
    pub fn kind(&self) -> Kind {
        self.body.kind()
    }

    /// The event as one line of JSON, newline included.
    pub fn line(&self) -> Bytes {
        self.line.get_or_init(|| json_line(self)).clone()
    }
}

/// Why a subscriber is told that events are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GapReason {
    /// The subscriber asked for (or read too slowly to keep) cursors the ring no longer
    /// holds: `first-lost` to `last-lost` are gone.
    FellBehind,
    /// The subscriber named a stream, or a cursor, of another keeld start: what happened
    /// since is unknown; it must re-read the state it cares about. What follows is
    /// everything this keeld still holds, from its oldest event.
    NewStream,
}

/// Events a subscriber will never see. Not stored in the ring: each subscriber gets its
/// own. Its `cursor` is the last one lost (0 for [`GapReason::NewStream`]), so resuming
/// after it with `since=<cursor>` continues right behind the gap.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Gap {
    pub cursor: u64,
    pub stream: Arc<str>,
    pub time: String,
    /// Always `"gap"`.
    pub kind: Kind,
    pub reason: GapReason,
    /// The first and last cursor lost, and how many (unknown for a new stream).
    pub first_lost: Option<u64>,
    pub last_lost: Option<u64>,
    pub lost: Option<u64>,
}

/// What a subscriber reads: an event, or a note that some are missing.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<Event>),
    Gap(Gap),
}

impl Item {
    /// The item as one line of JSON, newline included.
    pub fn line(&self) -> Bytes {
        match self {
            Item::Event(event) => event.line(),
            Item::Gap(gap) => json_line(gap),
        }
    }

    pub fn cursor(&self) -> u64 {
        match self {
            Item::Event(event) => event.cursor,
            Item::Gap(gap) => gap.cursor,
        }
    }
}

fn json_line(value: &impl Serialize) -> Bytes {
    // Every field is a string, number, bool, list or map with string keys: serializing
    // cannot fail. Should it ever, the line still parses and says so.
    let mut bytes = serde_json::to_vec(value).unwrap_or_else(|e| {
        serde_json::to_vec(&serde_json::json!({ "kind": "error", "error": e.to_string() }))
            .unwrap_or_default()
    });
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// The bus: cheap to clone; every clone publishes into the same ring.
#[derive(Debug, Clone)]
pub struct EventBus {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    stream: Arc<str>,
    capacity: usize,
    /// Written by publishers, read by every follower at once (an `RwLock`: a hundred
    /// followers woken by one publish copy out side by side).
    ring: RwLock<Ring>,
    /// Wakes subscribers: changed on publishes (at most once per pace: [`PACE`] to
    /// [`PACE_MAX`]) and on close.
    signal: watch::Sender<Signal>,
    pacer: Mutex<Pacer>,
    followers: AtomicUsize,
    /// The runtime the followers run on, if they have one of their own
    /// ([`EventBus::wake_followers_on`]).
    home: std::sync::OnceLock<tokio::runtime::Handle>,
}

/// Followers are woken at most once per this: events that come in quick succession
/// (thousands of commits a second) then reach each follower together, in one write and
/// one wake-up, instead of one write per event to every follower, which would take a
/// share of commit throughput growing with the number of followers. An event after a
/// quiet moment wakes them at once; in a stream of events, one waits at most the pace
/// (this, or up to [`PACE_MAX`] while the stream is steady) plus the timer's tick.
pub const PACE: std::time::Duration = std::time::Duration::from_millis(1);

/// The longest pace: under a steady stream of events (a wake-up that carried at least
/// [`BUSY_BATCH`] of them) the pace doubles, up to this; it halves back towards [`PACE`]
/// with each wake-up that carried fewer, and is [`PACE`] again after this long without
/// a wake-up. Batching more when events come fast (as a network card moderates its
/// interrupts) keeps the followers' share of the CPU from growing with the commit rate,
/// at the cost of up to this much latency while the stream lasts; an event after a quiet
/// moment still wakes followers at once.
pub const PACE_MAX: std::time::Duration = std::time::Duration::from_millis(16);

/// A wake-up handed to a runtime, done when its task drops it: when the task has run
/// (after the pace, if `paced`), or when the runtime drops the task unrun, because it
/// was shut down (the stream thread ends as keeld stops, and a spawn onto a runtime
/// already gone drops the task at once). Either way the followers are woken and a paced
/// wake-up is no longer due: a `due` left set with no timer to clear it would hold every
/// later wake-up back for good.
struct WakeOnDrop {
    shared: Arc<Shared>,
    paced: bool,
}

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        if self.paced {
            let mut pacer = self
                .shared
                .pacer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let batched = pacer.batched;
            pacer.woken(tokio::time::Instant::now(), batched);
        }
        self.shared.signal.send_modify(|_| {});
    }
}

/// Events carried by one paced wake-up that make the bus busy (see [`PACE_MAX`]).
const BUSY_BATCH: u32 = 4;

/// When followers were last woken, whether a wake-up is already due and how many
/// events it carries, and the pace now.
#[derive(Debug, Default)]
struct Pacer {
    last: Option<tokio::time::Instant>,
    due: bool,
    batched: u32,
    /// Zero until the first wake-up: [`PACE`].
    pace: std::time::Duration,
}

impl Pacer {
    fn pace(&self) -> std::time::Duration {
        self.pace.max(PACE)
    }

    /// A wake-up goes out now, having carried `batched` events.
    fn woken(&mut self, now: tokio::time::Instant, batched: u32) {
        self.pace = if batched >= BUSY_BATCH {
            (self.pace() * 2).min(PACE_MAX)
        } else {
            (self.pace() / 2).max(PACE)
        };
        self.last = Some(now);
        self.due = false;
        self.batched = 0;
    }
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    /// The cursor the next event gets.
    next: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Signal {
    closed: bool,
}

impl Default for EventBus {
    /// A bus of [`DEFAULT_CAPACITY`] events (components built without one in tests get
    /// their own, which nobody reads).
    fn default() -> Self {
        EventBus::new(DEFAULT_CAPACITY)
    }
}

impl EventBus {
    /// A bus keeping the last `capacity` events (at least one), with a new stream id.
    pub fn new(capacity: usize) -> EventBus {
        let capacity = capacity.max(1);
        EventBus {
            shared: Arc::new(Shared {
                stream: Arc::from(format!("{:032x}", rand::random::<u128>())),
                capacity,
                ring: RwLock::new(Ring {
                    events: VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY)),
                    next: 1,
                }),
                signal: watch::Sender::new(Signal::default()),
                pacer: Mutex::new(Pacer::default()),
                followers: AtomicUsize::new(0),
                home: std::sync::OnceLock::new(),
            }),
        }
    }

    /// This keeld start's stream id (32 hex digits, random): cursors are only comparable
    /// within one stream.
    pub fn stream(&self) -> &str {
        &self.shared.stream
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// The newest cursor given (0 before the first event).
    pub fn latest(&self) -> u64 {
        self.read_ring().next - 1
    }

    /// Publishes `body` as the next event; answers its cursor. Never waits for readers.
    pub fn publish(&self, body: EventBody) -> u64 {
        self.publish_all([body])
    }

    /// Publishes `bodies` as consecutive events and wakes the readers once (a batch of
    /// commits: one wake-up per follower, not one per commit); answers the last cursor
    /// (the newest one before, if `bodies` is empty).
    pub fn publish_all(&self, bodies: impl IntoIterator<Item = EventBody>) -> u64 {
        let time = crate::store::now_rfc3339();
        let (last, published) = {
            let mut ring = self
                .shared
                .ring
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = ring.next;
            for body in bodies {
                let cursor = ring.next;
                ring.next += 1;
                if ring.events.len() == self.shared.capacity {
                    ring.events.pop_front();
                }
                ring.events.push_back(Arc::new(Event {
                    cursor,
                    stream: self.shared.stream.clone(),
                    time: time.clone(),
                    body,
                    line: OnceLock::new(),
                }));
            }
            (ring.next - 1, ring.next - before)
        };
        if published > 0 {
            // Not under the ring's lock: a subscriber woken here takes that lock at once.
            self.wake(u32::try_from(published).unwrap_or(u32::MAX));
        }
        last
    }

    /// Wakes followers from `runtime`, where `GET /events` streams are served
    /// (`api::server::StreamThread`); set once, at start-up. A wake-up sent from another
    /// thread costs a system call per woken task on a single-threaded runtime (each
    /// unparks its reactor), so a fan-out from the publisher's thread made a hundred of
    /// them; from the followers' own thread, it makes none. The wake-up is handed over
    /// there instead, one task, one unpark.
    pub fn wake_followers_on(&self, runtime: tokio::runtime::Handle) {
        let _ = self.shared.home.set(runtime);
    }

    /// Wakes the subscribers for `events` new events now, or, if they were woken less
    /// than the pace ago ([`PACE`] to [`PACE_MAX`]), once it has passed (one timer for the
    /// bus, not one per follower). Nothing waits here.
    fn wake(&self, events: u32) {
        // Nobody reads (no `GET /events` open): nothing to wake, and no timer to start
        // (at thousands of commits a second, the pacer's timer task would wake a worker
        // thread every millisecond for no one). A subscriber that comes later reads the
        // ring from its cursor first.
        if self.shared.signal.receiver_count() == 0 {
            return;
        }
        let home = self.shared.home.get();
        let now = tokio::time::Instant::now();
        // Spawned once the pacer's lock is released: a runtime that is gone drops the
        // task, and with it the wake-up, which takes that lock, on this thread.
        let paced = {
            let mut pacer = self
                .shared
                .pacer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if pacer.due {
                // The wake-up already due reads these events too.
                pacer.batched = pacer.batched.saturating_add(events);
                return;
            }
            let pace = pacer.pace();
            if let Some(at) = pacer.last.map(|last| last + pace).filter(|at| *at > now) {
                let runtime = home
                    .cloned()
                    .or_else(|| tokio::runtime::Handle::try_current().ok());
                if let Some(runtime) = runtime {
                    pacer.due = true;
                    pacer.batched = events;
                    Some((runtime, at))
                } else {
                    // No runtime to wait on: wake them now.
                    pacer.woken(now, events);
                    None
                }
            } else {
                if pacer.last.is_none_or(|last| now - last >= PACE_MAX) {
                    pacer.pace = PACE;
                }
                pacer.woken(now, events);
                None
            }
        };
        if let Some((runtime, at)) = paced {
            let wake = WakeOnDrop {
                shared: self.shared.clone(),
                paced: true,
            };
            runtime.spawn(async move {
                tokio::time::sleep_until(at).await;
                drop(wake);
            });
            return;
        }
        match home {
            Some(home) => {
                let wake = WakeOnDrop {
                    shared: self.shared.clone(),
                    paced: false,
                };
                home.spawn(async move { drop(wake) });
            }
            None => self.shared.signal.send_modify(|_| {}),
        }
    }

    /// Ends every following subscription once it has read what is buffered (keeld is
    /// stopping: long-lived streams must not hold the shutdown up). Events published
    /// afterwards are still kept, for non-following reads.
    pub fn close(&self) {
        self.shared.signal.send_modify(|s| s.closed = true);
    }

    /// A reader starting at `from`. `follow`: wait for new events (until [`close`]);
    /// otherwise end after the events published before this call.
    ///
    /// [`close`]: EventBus::close
    pub fn subscribe(
        &self,
        from: Resume,
        follow: bool,
        kinds: Option<Vec<Kind>>,
    ) -> Result<Subscription, TooManyFollowers> {
        let follower = if follow {
            Some(FollowerSlot::take(&self.shared)?)
        } else {
            None
        };
        let latest = self.latest();
        let (after, leading) = match from {
            Resume::Start => (0, None),
            Resume::After { stream, cursor } => {
                let foreign = stream.as_deref().is_some_and(|s| s != self.stream());
                // A cursor this stream never gave was given by another keeld start.
                if foreign || cursor > latest {
                    (0, Some(self.new_stream_gap()))
                } else {
                    (cursor, None)
                }
            }
        };
        Ok(Subscription {
            bus: self.clone(),
            signal: self.shared.signal.subscribe(),
            after,
            until: (!follow).then_some(latest),
            leading,
            kinds,
            _follower: follower,
        })
    }

    fn new_stream_gap(&self) -> Gap {
        Gap {
            cursor: 0,
            stream: self.shared.stream.clone(),
            time: crate::store::now_rfc3339(),
            kind: Kind::Gap,
            reason: GapReason::NewStream,
            first_lost: None,
            last_lost: None,
            lost: None,
        }
    }

    fn read_ring(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        // Every change under this lock is a push and a pop: a panic cannot leave the
        // ring half changed, so a poisoned lock is safe to use (and so in `publish_all`).
        self.shared
            .ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands `batch` the events after cursor `after` (at most [`MAX_READ`], none beyond
    /// `until`) that `kinds` lets through, under the ring's lock, after a gap if the
    /// oldest kept event is past `after + 1`. Answers the last cursor handed out or
    /// skipped (`after` if none) and whether [`MAX_READ`] were read (there may be more).
    fn read(
        &self,
        after: u64,
        until: Option<u64>,
        kinds: Option<&[Kind]>,
        batch: &mut impl Batch,
    ) -> (u64, bool) {
        let ring = self.read_ring();
        let oldest = ring.events.front().map_or(ring.next, |e| e.cursor);
        let mut from = after.saturating_add(1);
        let limit = until.unwrap_or(u64::MAX);
        if from > limit {
            // A reader that is not following has read up to where it stops.
            return (after, false);
        }
        let mut last = after;
        if from < oldest {
            let (first, lost) = (from, (oldest - 1).min(limit));
            batch.gap(Gap {
                cursor: lost,
                stream: self.shared.stream.clone(),
                time: crate::store::now_rfc3339(),
                kind: Kind::Gap,
                reason: GapReason::FellBehind,
                first_lost: Some(first),
                last_lost: Some(lost),
                lost: Some(lost - first + 1),
            });
            from = oldest;
            last = lost;
        }
        let skip = usize::try_from(from - oldest).unwrap_or(usize::MAX);
        let mut read = 0;
        if skip < ring.events.len() {
            for event in ring
                .events
                .range(skip..)
                .take_while(|e| e.cursor <= limit)
                .take(MAX_READ)
            {
                read += 1;
                last = event.cursor;
                if kinds.is_none_or(|k| k.contains(&event.kind())) {
                    batch.event(event);
                }
            }
        }
        (last, read == MAX_READ)
    }
}

/// What one read of the ring fills: the items themselves (keeld's own readers), or
/// their lines of JSON (`GET /events`). Filled under the ring's read lock, so a
/// stream's batch is copied out there and then: once an event's line is made (by its
/// first reader, after the lock), the other followers copy it without taking and
/// dropping a reference to the event, each on its own thread.
trait Batch: Default {
    fn gap(&mut self, gap: Gap);
    fn event(&mut self, event: &Arc<Event>);
    fn is_empty(&self) -> bool;
}

impl Batch for Vec<Item> {
    fn gap(&mut self, gap: Gap) {
        self.push(Item::Gap(gap));
    }
    fn event(&mut self, event: &Arc<Event>) {
        self.push(Item::Event(event.clone()));
    }
    fn is_empty(&self) -> bool {
        Vec::is_empty(self)
    }
}

/// Lines of JSON, newline-terminated, in cursor order. An event whose line is not made
/// yet is only noted under the lock, and its line made (once, for every reader) after
/// the lock is released: a publisher never waits on a reader's serializing.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    /// Events whose line goes at this offset of `bytes`, once made.
    unmade: Vec<(usize, Arc<Event>)>,
}

impl Batch for Lines {
    fn gap(&mut self, gap: Gap) {
        self.bytes.extend_from_slice(&json_line(&gap));
    }
    fn event(&mut self, event: &Arc<Event>) {
        match event.line.get() {
            Some(line) => self.bytes.extend_from_slice(line),
            None => self.unmade.push((self.bytes.len(), event.clone())),
        }
    }
    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.unmade.is_empty()
    }
}

impl Lines {
    /// The chunk, every line made (outside the ring's lock).
    fn into_bytes(self) -> Bytes {
        if self.unmade.is_empty() {
            return Bytes::from(self.bytes);
        }
        let lines: Vec<(usize, Bytes)> = self
            .unmade
            .into_iter()
            .map(|(at, event)| (at, event.line()))
            .collect();
        let mut out = Vec::with_capacity(
            self.bytes.len() + lines.iter().map(|(_, l)| l.len()).sum::<usize>(),
        );
        let mut copied = 0;
        for (at, line) in lines {
            out.extend_from_slice(&self.bytes[copied..at]);
            out.extend_from_slice(&line);
            copied = at;
        }
        out.extend_from_slice(&self.bytes[copied..]);
        Bytes::from(out)
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// With the oldest event kept.
    Start,
    /// After `cursor` of `stream` (this keeld's if `None`).
    After { stream: Option<String>, cursor: u64 },
}

/// [`MAX_FOLLOWERS`] subscribers follow already.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{MAX_FOLLOWERS} clients follow the event stream already; try again later")]
pub struct TooManyFollowers;

/// A following subscriber's place, given back when the subscription is dropped.
#[derive(Debug)]
struct FollowerSlot(Arc<Shared>);

impl FollowerSlot {
    fn take(shared: &Arc<Shared>) -> Result<FollowerSlot, TooManyFollowers> {
        shared
            .followers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_FOLLOWERS).then_some(n + 1)
            })
            .map(|_| FollowerSlot(shared.clone()))
            .map_err(|_| TooManyFollowers)
    }
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One reader's position in the stream.
#[derive(Debug)]
pub struct Subscription {
    bus: EventBus,
    signal: watch::Receiver<Signal>,
    /// The last cursor handed out (or skipped by the filter, or lost).
    after: u64,
    /// Not following: the newest cursor to hand out.
    until: Option<u64>,
    /// A gap to hand out first (a resume from another stream).
    leading: Option<Gap>,
    kinds: Option<Vec<Kind>>,
    _follower: Option<FollowerSlot>,
}

impl Subscription {
    /// The next items, in cursor order, as soon as there are any; `None` once the
    /// subscription is over (not following: everything up to the start was read;
    /// following: the bus was closed and everything buffered was read).
    pub async fn next_batch(&mut self) -> Option<Vec<Item>> {
        self.next().await
    }

    /// [`Subscription::next_batch`] as the items' lines of JSON, one chunk: what
    /// `GET /events` writes.
    pub async fn next_lines(&mut self) -> Option<Bytes> {
        self.next::<Lines>().await.map(Lines::into_bytes)
    }

    async fn next<B: Batch>(&mut self) -> Option<B> {
        loop {
            let mut batch = B::default();
            if let Some(gap) = self.leading.take() {
                batch.gap(gap);
            }
            // Marked seen before reading: a publish from here on wakes `changed`.
            let closed = self.signal.borrow_and_update().closed;
            let (last, full) =
                self.bus
                    .read(self.after, self.until, self.kinds.as_deref(), &mut batch);
            self.after = last;
            if !batch.is_empty() {
                return Some(batch);
            }
            if full {
                // All filtered out, and there is more to read.
                continue;
            }
            if self.until.is_some() || closed {
                return None;
            }
            self.signal.changed().await.ok()?;
        }
    }
}

#[cfg(test)]
mod tests;
