#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};

use super::*;

fn update(n: u64) -> EventBody {
    EventBody::Update(UpdateEvent::new(format!("s{n}"), None, json!(n)))
}

fn lines(items: &[Item]) -> Vec<Value> {
    items
        .iter()
        .map(|i| serde_json::from_slice(&i.line()).expect("JSON line"))
        .collect()
}

/// Everything a non-following subscription hands out.
async fn drain(mut sub: Subscription) -> Vec<Item> {
    let mut all = Vec::new();
    while let Some(batch) = sub.next_batch().await {
        all.extend(batch);
    }
    all
}

fn cursors(items: &[Item]) -> Vec<u64> {
    items.iter().map(Item::cursor).collect()
}

#[tokio::test]
async fn cursors_count_from_one_and_the_ring_keeps_the_newest() {
    let bus = EventBus::new(4);
    assert_eq!(bus.latest(), 0);
    for n in 1..=10 {
        assert_eq!(bus.publish(update(n)), n);
    }
    assert_eq!(bus.latest(), 10);
    // From the start: the first six went round the ring, and the reader is told.
    let items = drain(bus.subscribe(Resume::Start, false, None).unwrap()).await;
    let json = lines(&items);
    assert_eq!(json[0]["kind"], "gap");
    assert_eq!(json[0]["reason"], "fell-behind");
    assert_eq!(json[0]["first-lost"], 1);
    assert_eq!(json[0]["last-lost"], 6);
    assert_eq!(json[0]["lost"], 6);
    assert_eq!(
        json[0]["cursor"], 6,
        "resuming after the gap continues behind it"
    );
    assert_eq!(cursors(&items[1..]), vec![7, 8, 9, 10]);
    // From a cursor still held: exactly what followed, no gap.
    let after = Resume::After {
        stream: Some(bus.stream().to_owned()),
        cursor: 8,
    };
    let items = drain(bus.subscribe(after, false, None).unwrap()).await;
    assert_eq!(cursors(&items), vec![9, 10]);
    // From the newest: nothing, even when more than the ring holds go by before the
    // read (the reader stops where it was asked, so nothing it wanted was lost).
    let after = Resume::After {
        stream: None,
        cursor: 10,
    };
    let sub = bus.subscribe(after, false, None).unwrap();
    for n in 11..=16 {
        bus.publish(update(n));
    }
    assert!(drain(sub).await.is_empty());
}

#[tokio::test]
async fn an_empty_ring_has_nothing_and_no_gap() {
    let bus = EventBus::new(3);
    assert!(drain(bus.subscribe(Resume::Start, false, None).unwrap())
        .await
        .is_empty());
}

#[tokio::test]
async fn the_envelope_and_a_body_share_one_json_object() {
    let bus = EventBus::new(8);
    bus.publish(EventBody::Commit(CommitEvent {
        generation: 7,
        tx: "apiclient-set-x".into(),
        changed_keys: vec!["settings.motd".into()],
        changed_keys_omitted: 0,
        caller: crate::store::Caller {
            uid: 0,
            gid: 0,
            pid: 42,
            comm: "apiclient".into(),
        },
        rollback_of: None,
    }));
    let items = drain(bus.subscribe(Resume::Start, false, None).unwrap()).await;
    let line = items[0].line();
    assert!(line.ends_with(b"\n") && !line[..line.len() - 1].contains(&b'\n'));
    let json = &lines(&items)[0];
    assert_eq!(json["cursor"], 1);
    assert_eq!(json["stream"], bus.stream());
    assert_eq!(json["kind"], "commit");
    assert_eq!(json["generation"], 7);
    assert_eq!(json["tx"], "apiclient-set-x");
    assert_eq!(json["changed-keys"], json!(["settings.motd"]));
    assert_eq!(json["caller"]["pid"], 42);
    assert!(json.get("rollback-of").is_none());
    assert!(json.get("changed-keys-omitted").is_none());
    assert!(json["time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn a_reader_from_another_stream_is_told_and_starts_over() {
    let bus = EventBus::new(8);
    for n in 1..=3 {
        bus.publish(update(n));
    }
    for from in [
        Resume::After {
            stream: Some("0123".into()),
            cursor: 2,
        },
        // A cursor this stream never gave: from an earlier keeld.
        Resume::After {
            stream: None,
            cursor: 99,
        },
    ] {
        let items = drain(bus.subscribe(from, false, None).unwrap()).await;
        let json = lines(&items);
        assert_eq!(json[0]["kind"], "gap");
        assert_eq!(json[0]["reason"], "new-stream");
        assert_eq!(json[0]["cursor"], 0);
        assert_eq!(json[0]["lost"], Value::Null);
        assert_eq!(cursors(&items[1..]), vec![1, 2, 3]);
    }
}

#[tokio::test]
async fn a_filter_skips_other_kinds_but_never_gaps() {
    let bus = EventBus::new(2);
    bus.publish(update(1));
    bus.publish(EventBody::BootPhase(BootPhaseEvent {
        boot_id: "b".into(),
        from: None,
        to: crate::boot::status::BootPhase::Configured,
        reason: None,
        failed_parameters: None,
    }));
    bus.publish(update(3));
    let items = drain(
        bus.subscribe(Resume::Start, false, Some(vec![Kind::BootPhase]))
            .unwrap(),
    )
    .await;
    let json = lines(&items);
    assert_eq!(json.len(), 2, "{json:?}");
    assert_eq!(json[0]["kind"], "gap");
    assert_eq!(json[1]["kind"], "boot-phase");
    assert_eq!(json[1]["to"], "configured");
}

#[tokio::test]
async fn a_filtered_reader_reads_past_a_full_batch_of_other_kinds() {
    let bus = EventBus::new(2 * MAX_READ);
    for n in 0..(MAX_READ as u64 + 10) {
        bus.publish(update(n));
    }
    bus.publish(EventBody::BootPhase(BootPhaseEvent {
        boot_id: "b".into(),
        from: None,
        to: crate::boot::status::BootPhase::Apply,
        reason: None,
        failed_parameters: None,
    }));
    let items = drain(
        bus.subscribe(Resume::Start, false, Some(vec![Kind::BootPhase]))
            .unwrap(),
    )
    .await;
    assert_eq!(cursors(&items), vec![MAX_READ as u64 + 11]);
}

#[tokio::test]
async fn a_reader_that_does_not_follow_stops_at_what_was_there() {
    let bus = EventBus::new(8);
    bus.publish(update(1));
    let mut sub = bus.subscribe(Resume::Start, false, None).unwrap();
    bus.publish(update(2));
    assert_eq!(cursors(&sub.next_batch().await.unwrap()), vec![1]);
    assert!(sub.next_batch().await.is_none());
}

#[tokio::test]
async fn a_follower_wakes_for_new_events_and_ends_on_close() {
    let bus = EventBus::new(8);
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    let waiting = tokio::spawn(async move {
        let first = sub.next_batch().await;
        let rest = sub.next_batch().await;
        let end = sub.next_batch().await;
        (first, rest, end)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "nothing to read yet");
    bus.publish(update(1));
    // Published, then closed at once: the follower reads it before it ends.
    tokio::time::sleep(Duration::from_millis(20)).await;
    bus.publish(update(2));
    bus.close();
    let (first, rest, end) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the follower ended")
        .unwrap();
    assert_eq!(cursors(&first.unwrap()), vec![1]);
    assert_eq!(cursors(&rest.unwrap()), vec![2]);
    assert!(end.is_none());
}

#[tokio::test]
async fn a_slow_follower_gets_a_gap_never_a_silent_hole() {
    let bus = EventBus::new(4);
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    bus.publish(update(1));
    assert_eq!(cursors(&sub.next_batch().await.unwrap()), vec![1]);
    // The reader sleeps while ten more go by.
    for n in 2..=11 {
        bus.publish(update(n));
    }
    let batch = sub.next_batch().await.unwrap();
    let json = lines(&batch);
    assert_eq!(json[0]["kind"], "gap");
    assert_eq!(
        (json[0]["first-lost"].clone(), json[0]["last-lost"].clone()),
        (json!(2), json!(7))
    );
    assert_eq!(cursors(&batch[1..]), vec![8, 9, 10, 11]);
}

#[tokio::test]
async fn followers_are_bounded_and_give_their_place_back() {
    let bus = EventBus::new(4);
    let held: Vec<Subscription> = (0..MAX_FOLLOWERS)
        .map(|_| bus.subscribe(Resume::Start, true, None).unwrap())
        .collect();
    assert!(bus.subscribe(Resume::Start, true, None).is_err());
    // Reading without following is always possible.
    assert!(bus.subscribe(Resume::Start, false, None).is_ok());
    drop(held);
    assert!(bus.subscribe(Resume::Start, true, None).is_ok());
}

/// Many publishers at once, on threads, against followers reading on the runtime: every
/// cursor is handed out once, each follower sees them in order, each either as an event
/// or inside a gap, and never anything twice.
#[test]
fn concurrent_publishers_give_every_follower_each_cursor_once_in_order() {
    const PUBLISHERS: u64 = 8;
    const EACH: u64 = 2000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bus = EventBus::new(64);
    let followers: Vec<_> = (0..4)
        .map(|_| {
            let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
            runtime.spawn(async move {
                let mut next = 1;
                let (mut seen, mut lost) = (0u64, 0u64);
                while let Some(batch) = sub.next_batch().await {
                    for item in batch {
                        match item {
                            Item::Event(e) => {
                                assert_eq!(e.cursor, next, "in order, none twice, no hole");
                                seen += 1;
                                next += 1;
                            }
                            Item::Gap(g) => {
                                assert_eq!(g.first_lost, Some(next));
                                let last = g.last_lost.unwrap();
                                lost += last - next + 1;
                                next = last + 1;
                            }
                        }
                    }
                }
                (seen, lost, next - 1)
            })
        })
        .collect();
    let threads: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for n in 0..EACH {
                    mine.push(bus.publish(update(p * EACH + n)));
                }
                mine
            })
        })
        .collect();
    let mut given: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    given.sort_unstable();
    let total = PUBLISHERS * EACH;
    assert_eq!(given, (1..=total).collect::<Vec<_>>(), "each cursor once");
    bus.close();
    for follower in followers {
        let (seen, lost, last) = runtime.block_on(follower).unwrap();
        assert_eq!(last, total);
        assert_eq!(seen + lost, total);
    }
}

#[test]
fn a_commit_event_lists_so_many_keys_and_counts_the_rest() {
    let generation = crate::store::Generation {
        generation: 3,
        time: String::new(),
        tx: "t".into(),
        tx_id: None,
        caller: crate::store::Caller::keeld(),
        changed_keys: (0..100).map(|n| format!("settings.k{n:03}")).collect(),
        rollback_of: Some(1),
        settings: Default::default(),
    };
    let event = CommitEvent::of(&generation);
    assert_eq!(event.changed_keys.len(), kinds::MAX_KEYS);
    assert_eq!(event.changed_keys[0], "settings.k000");
    assert_eq!(event.changed_keys_omitted, 100 - kinds::MAX_KEYS);
    let json = serde_json::to_value(EventBody::Commit(event)).unwrap();
    assert_eq!(json["changed-keys-omitted"], 100 - kinds::MAX_KEYS);
    assert_eq!(json["rollback-of"], 1);
}

#[tokio::test]
async fn a_batch_gets_consecutive_cursors_and_one_wake_up() {
    let bus = EventBus::new(8);
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    assert_eq!(bus.publish_all([]), 0, "nothing published");
    assert_eq!(bus.publish_all((1..=3).map(update)), 3);
    assert_eq!(cursors(&sub.next_batch().await.unwrap()), vec![1, 2, 3]);
    assert_eq!(bus.publish(update(4)), 4);
    assert_eq!(cursors(&sub.next_batch().await.unwrap()), vec![4]);
}

#[tokio::test(start_paused = true)]
async fn events_in_quick_succession_wake_a_follower_once_per_pace() {
    let bus = EventBus::new(64);
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    let started = tokio::time::Instant::now();
    let (seen, mut batches) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(batch) = sub.next_batch().await {
            let _ = seen.send((started.elapsed(), cursors(&batch)));
        }
    });
    tokio::task::yield_now().await;
    // After a quiet moment: at once.
    bus.publish(update(1));
    assert_eq!(batches.recv().await.unwrap(), (Duration::ZERO, vec![1]));
    // Three more within PACE of that wake-up: one wake-up, PACE after it, with all three.
    for n in 2..=4 {
        bus.publish(update(n));
    }
    let (at, cursors) = batches.recv().await.unwrap();
    assert_eq!(cursors, vec![2, 3, 4]);
    assert!(at >= PACE && at < PACE * 3, "{at:?}");
    // Quiet again: at once.
    tokio::time::sleep(PACE * 10).await;
    let quiet = started.elapsed();
    bus.publish(update(5));
    assert_eq!(batches.recv().await.unwrap(), (quiet, vec![5]));
    // A close is not paced: the follower reads what is left and ends.
    bus.publish(update(6));
    bus.close();
    let (_, last) = batches.recv().await.unwrap();
    assert_eq!(last, vec![6]);
    assert!(batches.recv().await.is_none());
}

/// A steady stream of events doubles the pace at each busy wake-up, up to `PACE_MAX`
/// (one wake-up carrying many events instead of many carrying few); after a quiet
/// moment an event wakes followers at once and the pace is `PACE` again.
#[tokio::test(start_paused = true)]
async fn a_steady_stream_is_paced_longer_and_a_quiet_bus_shorter() {
    let bus = EventBus::new(1024);
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    let started = tokio::time::Instant::now();
    let (seen, mut batches) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(batch) = sub.next_batch().await {
            let _ = seen.send((started.elapsed(), cursors(&batch).len()));
        }
    });
    tokio::task::yield_now().await;
    let mut n = 0;
    let mut publish = |count: u64| {
        for _ in 0..count {
            n += 1;
            bus.publish(update(n));
        }
    };
    publish(1);
    let (mut last, _) = batches.recv().await.unwrap();
    let mut gaps = Vec::new();
    for _ in 0..7 {
        publish(10);
        let (at, carried) = batches.recv().await.unwrap();
        assert_eq!(carried, 10);
        gaps.push(at - last);
        last = at;
    }
    let ms = Duration::from_millis;
    assert_eq!(gaps, [ms(1), ms(2), ms(4), ms(8), ms(16), ms(16), ms(16)]);
    assert_eq!(PACE_MAX, ms(16));
    // Quiet: at once, and the next event within PACE again.
    tokio::time::sleep(PACE_MAX * 2).await;
    let quiet = started.elapsed();
    publish(1);
    assert_eq!(batches.recv().await.unwrap(), (quiet, 1));
    publish(1);
    assert_eq!(batches.recv().await.unwrap(), (quiet + PACE, 1));
}

/// With nobody reading, a publish wakes nothing and starts no pacing timer (at thousands
/// of commits a second that timer woke a worker thread every millisecond for no one);
/// a follower that comes later reads everything from the ring, and its first wake-up
/// is not held back by the publishes before it.
#[tokio::test(start_paused = true)]
async fn with_nobody_reading_a_publish_starts_no_timer() {
    let bus = EventBus::new(64);
    for n in 1..=20 {
        bus.publish(update(n));
    }
    {
        let pacer = bus.shared.pacer.lock().unwrap();
        assert!(!pacer.due && pacer.last.is_none(), "{pacer:?}");
    }
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    assert_eq!(
        cursors(&sub.next_batch().await.unwrap()),
        (1..=20).collect::<Vec<_>>()
    );
    let started = tokio::time::Instant::now();
    bus.publish(update(21));
    assert_eq!(cursors(&sub.next_batch().await.unwrap()), vec![21]);
    assert_eq!(started.elapsed(), Duration::ZERO, "woken at once");
}

/// `GET /events` writes what `next_lines` gives: the same lines, in the same order, as
/// the items `next_batch` hands keeld's own readers (gaps, a resume from another
/// stream, the kind filter and batches of `MAX_READ` included).
#[tokio::test]
async fn the_stream_s_lines_are_the_items_lines() {
    let bus = EventBus::new(MAX_READ + 8);
    for n in 1..=(MAX_READ as u64 + 20) {
        bus.publish(update(n));
    }
    let starts = || {
        [
            (Resume::Start, None),
            (
                Resume::After {
                    stream: Some("0123abcd".to_owned()),
                    cursor: 3,
                },
                None,
            ),
            (
                Resume::After {
                    stream: None,
                    cursor: 15,
                },
                Some(vec![Kind::Update]),
            ),
            (Resume::Start, Some(vec![Kind::Commit])),
        ]
    };
    // Every third event's line is made already: the first chunks below mix lines
    // copied under the lock with lines made after it; later ones copy only.
    for item in drain(bus.subscribe(Resume::Start, false, None).unwrap()).await {
        if item.cursor() % 3 == 0 {
            item.line();
        }
    }
    for ((from, kinds), (again, same)) in starts().into_iter().zip(starts()) {
        let mut items = bus.subscribe(from, false, kinds).unwrap();
        let mut lines = bus.subscribe(again, false, same).unwrap();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut batches = 0;
        // The lines first: they make the lines not made yet.
        while let Some(chunk) = lines.next_lines().await {
            got.extend_from_slice(&chunk);
            batches += 1;
            let batch = items.next_batch().await.expect("as many batches as chunks");
            want.extend(batch.iter().flat_map(|item| item.line()));
        }
        assert!(items.next_batch().await.is_none());
        assert!(batches >= 1);
        // Gaps carry the time they were made: compare without it.
        let strip = |bytes: &[u8]| -> Vec<Value> {
            bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let mut v: Value = serde_json::from_slice(l).expect("JSON line");
                    v.as_object_mut().unwrap().remove("time");
                    v
                })
                .collect()
        };
        assert!(got.ends_with(b"\n"));
        assert_eq!(strip(&got), strip(&want));
    }
}

/// Records the thread each wake-up came from.
#[derive(Default)]
struct WokenFrom(std::sync::Mutex<Vec<Option<String>>>);

impl std::task::Wake for WokenFrom {
    fn wake(self: Arc<Self>) {
        let thread = std::thread::current().name().map(str::to_owned);
        self.0.lock().unwrap().push(thread);
    }
}

impl WokenFrom {
    /// Waits up to 5 s for a wake-up; answers the thread it came from (every wake-up
    /// recorded since the last call came from that one).
    fn next(&self) -> Option<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let all: Vec<Option<String>> = self.0.lock().unwrap().drain(..).collect();
            if let Some(first) = all.first() {
                assert!(all.iter().all(|t| t == first), "woken from {all:?}");
                return first.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no wake-up");
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// A follower polled by hand, on this thread, with a waker that records where it was
/// woken from.
struct Polled {
    woken: Arc<WokenFrom>,
    waker: std::task::Waker,
}

impl Polled {
    fn new() -> Polled {
        let woken = Arc::new(WokenFrom::default());
        let waker = std::task::Waker::from(woken.clone());
        Polled { woken, waker }
    }

    /// Polls `sub` (nothing to read yet), runs `publish`, waits for the wake-up and
    /// reads: where the wake-up came from, and the cursors read (`None`: ended).
    fn read(
        &self,
        sub: &mut Subscription,
        publish: &dyn Fn(),
    ) -> (Option<String>, Option<Vec<u64>>) {
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(&self.waker);
        let mut batch = Box::pin(sub.next_batch());
        assert!(
            batch.as_mut().poll(&mut cx).is_pending(),
            "nothing to read yet"
        );
        publish();
        let from = self.woken.next();
        match batch.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(batch) => (from, batch.map(|b| cursors(&b))),
            std::task::Poll::Pending => panic!("woken with nothing to read"),
        }
    }
}

/// Followers woken through a home runtime (as `GET /events` streams are, through keeld's
/// stream thread) are woken from its thread, never from the publisher's: at once after
/// a quiet moment, and paced in a stream of events.
#[test]
fn followers_are_woken_from_their_home_runtime() {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let home = std::thread::Builder::new()
        .name("home".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(runtime.handle().clone()).unwrap();
            runtime.block_on(async move {
                let _ = stopped.await;
            });
        })
        .unwrap();
    let bus = EventBus::new(64);
    bus.wake_followers_on(handle_rx.recv().unwrap());
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    // Polled here, on a thread with no runtime: without the home runtime, a publish
    // from this thread would wake the follower from this thread.
    let polled = Polled::new();
    let read = |sub: &mut Subscription, publish: &dyn Fn()| polled.read(sub, publish);
    let home_thread = Some("home".to_owned());
    std::thread::sleep(Duration::from_millis(20));
    // After a quiet moment: at once.
    let one = || {
        bus.publish(update(1));
    };
    assert_eq!(read(&mut sub, &one), (home_thread.clone(), Some(vec![1])));
    // In quick succession: from the home runtime too (its timer, if paced).
    let three = || {
        for n in 2..=4 {
            bus.publish(update(n));
        }
    };
    assert_eq!(read(&mut sub, &three), (home_thread, Some(vec![2, 3, 4])));
    // A close (keeld stopping) wakes them from where it is called.
    assert_eq!(read(&mut sub, &|| bus.close()).1, None, "ended on close");
    let _ = stop.send(());
    home.join().unwrap();
}

/// Followers whose home runtime is gone (keeld stopping: the stream thread ends before
/// the last publishers) are still woken, from the publisher's thread, and the pace does
/// not stick: a paced wake-up whose timer task the dead runtime dropped unrun is done as
/// it is dropped, so later ones are not held back behind it for good.
#[test]
fn followers_are_woken_when_their_home_runtime_is_gone() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bus = EventBus::new(64);
    bus.wake_followers_on(runtime.handle().clone());
    drop(runtime);
    let mut sub = bus.subscribe(Resume::Start, true, None).unwrap();
    let polled = Polled::new();
    let read = |sub: &mut Subscription, publish: &dyn Fn()| polled.read(sub, publish).1;
    // Each wake-up below is a task the runtime, gone, drops unrun.
    let paced_from_now = || {
        bus.shared.pacer.lock().unwrap().last = Some(tokio::time::Instant::now());
    };
    // At once (the first wake-up).
    assert_eq!(
        read(&mut sub, &|| {
            bus.publish(update(1));
        }),
        Some(vec![1])
    );
    // Paced (the last wake-up was just now), twice: the first must not stay due.
    for n in [2, 3] {
        paced_from_now();
        assert_eq!(
            read(&mut sub, &|| {
                bus.publish(update(n));
            }),
            Some(vec![n])
        );
        assert!(!bus.shared.pacer.lock().unwrap().due, "a wake-up stays due");
    }
}
