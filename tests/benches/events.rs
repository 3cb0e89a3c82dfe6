//! The event stream's cost, on the real keeld: how long after a commit 100 followers of
//! `GET /events?follow=true` have its event, and what 100 followers take from commit
//! throughput.
//!
//! Run with `cargo build --release --bins && cargo bench -p keel-e2e --bench events`
//! (keeld is found next to the bench, in target/release). Prints a table and one
//! `BENCH_JSON {...}` line. Not a pass/fail test. `KEEL_BENCH_SECS` (default 3) sets how
//! long each throughput run lasts; `KEEL_BENCH_COMMITS` (default 500) how many commits
//! the latency run makes.
//!
//! The followers run in this process, on a runtime thread of their own (as another
//! process would be: not in the committers' run queue): each reads its stream and
//! counts the event lines (`}` then a newline: JSON escapes newlines inside strings, and
//! the chunk framing never has that pair), with a timestamp per read. They compete with
//! keeld and the committers for the same CPUs, which is part of what is measured. Five
//! alternating rounds per mode: on this kind of VM one 3 s run of the same mode varies
//! by ±5 %, so the medians are compared.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use keel_e2e::{cpu_time, Keeld, KeeldOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const FOLLOWERS: usize = 100;
const COMMITTERS: usize = 8;

/// One keep-alive connection for PATCH + commit.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(socket: &Path) -> Conn {
        let stream = UnixStream::connect(socket).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Conn { sender }
    }

    async fn request(&mut self, method: http::Method, uri: &str, body: Option<Vec<u8>>) {
        let request = http::Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        self.sender.ready().await.expect("connection ready");
        let answer = self.sender.send_request(request).await.expect("request");
        let status = answer.status();
        let body = answer.into_body().collect().await.expect("body").to_bytes();
        assert!(
            status.is_success(),
            "{method} {uri}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// One commit that changes something (`n` is new each time).
    async fn commit(&mut self, tx: &str, n: u64) {
        let body = json!({ "motd": format!("events bench {n}") })
            .to_string()
            .into_bytes();
        self.request(
            http::Method::PATCH,
            &format!("/settings?tx={tx}"),
            Some(body),
        )
        .await;
        self.request(http::Method::POST, &format!("/tx/commit?tx={tx}"), None)
            .await;
    }
}

/// A follower: when it read each event line; ends when `stop` turns true.
struct Follower {
    task: tokio::task::JoinHandle<Vec<Instant>>,
}

/// Reads that brought at least one event, over all followers: events per read says how
/// much keeld batches each follower's wake-ups.
static READS: AtomicU64 = AtomicU64::new(0);

impl Follower {
    /// Follows commit events after cursor `since`, counting them into `events_seen`.
    async fn start(
        socket: &Path,
        since: u64,
        events_seen: Arc<AtomicU64>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Follower {
        let socket = socket.to_owned();
        let (connected, attached) = tokio::sync::oneshot::channel();
        let task = follower_runtime().spawn(async move {
            let mut stream = UnixStream::connect(&socket).await.expect("connect");
            let request = format!(
                "GET /events?since={since}&follow=true&kinds=commit HTTP/1.1\r\nHost: localhost\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.expect("request");
            let _ = connected.send(());
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut head: Option<Vec<u8>> = Some(Vec::new());
            let mut last = 0u8;
            loop {
                let n = tokio::select! {
                    read = stream.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                };
                let now = Instant::now();
                let mut data = &buf[..n];
                if let Some(mut got) = head.take() {
                    let before = got.len();
                    got.extend_from_slice(data);
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        head = Some(got);
                        continue;
                    };
                    assert!(got.starts_with(b"HTTP/1.1 200"), "follower refused");
                    data = &buf[end + 4 - before..n];
                }
                // An event line ends "}\n" (chunk-size lines of the chunked encoding
                // end in a hex digit). Found with memchr (SIMD): a byte-at-a-time loop
                // cost this process more per commit than keeld's whole fan-out.
                let mut count = 0;
                for at in memchr::memchr_iter(b'\n', data) {
                    let before = if at == 0 { last } else { data[at - 1] };
                    if before == b'}' {
                        count += 1;
                    }
                }
                if let Some(&end) = data.last() {
                    last = end;
                }
                if count > 0 {
                    READS.fetch_add(1, Ordering::Relaxed);
                }
                seen.extend(std::iter::repeat_n(now, count));
                events_seen.fetch_add(count as u64, Ordering::Relaxed);
            }
            seen
        });
        attached.await.expect("follower connected");
        Follower { task }
    }
}

/// Where the followers run: a runtime of their own, on one thread, as another process
/// would be. Sharing the committers' runtime made each commit's answer wait in this
/// process's run queue behind a hundred follower reads, a cost of the bench's client
/// and not of keeld; on a thread of their own they still compete for the CPUs, through
/// the kernel's scheduler.
fn follower_runtime() -> &'static tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("followers")
                .enable_all()
                .build()
                .expect("followers' runtime")
        })
        .handle()
}

/// `FOLLOWERS` followers after the newest cursor, all attached and reading.
struct Followers {
    followers: Vec<Follower>,
    seen: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Followers {
    async fn attach(socket: &Path) -> Followers {
        let since = newest_cursor(socket);
        let seen = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut followers = Vec::with_capacity(FOLLOWERS);
        for _ in 0..FOLLOWERS {
            followers.push(Follower::start(socket, since, seen.clone(), stopped.clone()).await);
        }
        // A probe commit every follower must see: then all are attached and reading.
        let mut conn = Conn::open(socket).await;
        conn.commit("probe", u64::MAX).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.load(Ordering::Relaxed) < FOLLOWERS as u64 {
            assert!(Instant::now() < deadline, "followers did not attach");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Followers {
            followers,
            seen,
            stop,
        }
    }

    /// Waits (up to 30 s) until every follower has read `events` events.
    async fn wait_for(&self, events: usize) -> bool {
        let want = (FOLLOWERS * events) as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.seen.load(Ordering::Relaxed) < want {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    /// Closes every stream; answers when each follower read each event.
    async fn detach(self) -> Vec<Vec<Instant>> {
        let _ = self.stop.send(true);
        let mut all = Vec::with_capacity(self.followers.len());
        for f in self.followers {
            all.push(f.task.await.expect("follower"));
        }
        all
    }
}

fn newest_cursor(socket: &Path) -> u64 {
    let r = keel_e2e::raw_request(socket, "GET", "/events", None);
    r.text()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|e| e["cursor"].as_u64())
        .unwrap_or(0)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Latency {
    commits: usize,
    /// Commit request sent → answered.
    commit_p50: Duration,
    commit_p99: Duration,
    /// Commit request sent → the event read by every follower (the last of them).
    all_p50: Duration,
    all_p99: Duration,
    all_max: Duration,
    /// Commit request sent → the event read, over every (commit, follower) pair.
    each_p99: Duration,
    /// Commit answered → the event read by every follower (0 when all had it before the
    /// answer arrived).
    after_answer_p99: Duration,
    /// The first follower's read → the last one's: the fan-out to all followers once
    /// keeld has published (the first read is as close to the publication as a client
    /// can see).
    spread_p50: Duration,
    spread_p99: Duration,
}

/// Sequential commits, each timed from the request to its event at all followers.
async fn latency_run(socket: &Path, commits: usize) -> Latency {
    let followers = Followers::attach(socket).await;
    let mut conn = Conn::open(socket).await;
    let mut sent = Vec::with_capacity(commits);
    let mut answered = Vec::with_capacity(commits);
    for n in 0..commits {
        // Every follower has the previous event (the probe, first): each commit is
        // measured on its own, not queued behind the last one's delivery.
        assert!(followers.wait_for(n + 1).await, "events lost");
        sent.push(Instant::now());
        conn.commit("latency", n as u64).await;
        answered.push(Instant::now());
    }
    assert!(followers.wait_for(commits + 1).await, "events lost");
    let per_follower = followers.detach().await;
    let mut all = Vec::with_capacity(commits);
    let mut each = Vec::with_capacity(commits * FOLLOWERS);
    let mut after_answer = Vec::with_capacity(commits);
    let mut spread = Vec::with_capacity(commits);
    for n in 0..commits {
        // Index 0 is the probe.
        let times: Vec<Instant> = per_follower.iter().map(|seen| seen[n + 1]).collect();
        let last = *times.iter().max().unwrap();
        let first = *times.iter().min().unwrap();
        spread.push(last - first);
        all.push(last - sent[n]);
        each.extend(times.iter().map(|t| *t - sent[n]));
        after_answer.push(last.saturating_duration_since(answered[n]));
    }
    let mut commit_times: Vec<Duration> =
        sent.iter().zip(&answered).map(|(s, a)| *a - *s).collect();
    commit_times.sort_unstable();
    all.sort_unstable();
    each.sort_unstable();
    after_answer.sort_unstable();
    spread.sort_unstable();
    Latency {
        commits,
        commit_p50: percentile(&commit_times, 50.0),
        commit_p99: percentile(&commit_times, 99.0),
        all_p50: percentile(&all, 50.0),
        all_p99: percentile(&all, 99.0),
        all_max: all.last().copied().unwrap_or_default(),
        each_p99: percentile(&each, 99.0),
        after_answer_p99: percentile(&after_answer, 99.0),
        spread_p50: percentile(&spread, 50.0),
        spread_p99: percentile(&spread, 99.0),
    }
}

/// Commits per second by `COMMITTERS` clients for `secs`.
async fn throughput(socket: &Path, secs: f64) -> f64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut conns = Vec::new();
    for _ in 0..COMMITTERS {
        conns.push(Conn::open(socket).await);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                let tx = format!("t{c}");
                let mut done = 0u64;
                while Instant::now() < deadline {
                    conn.commit(&tx, NEXT.fetch_add(1, Ordering::Relaxed)).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// What the throughput runs of one mode measured.
#[derive(Default)]
struct Mode {
    rates: Vec<f64>,
    /// Events each follower read per read (system call), each run.
    per_read: Vec<f64>,
    /// keeld's and this process's CPU time per commit, each run.
    keeld_cpu: Vec<Duration>,
    bench_cpu: Vec<Duration>,
}

impl Mode {
    async fn run(&mut self, socket: &Path, keeld: u32, secs: f64) {
        let (k, b) = (cpu_time(keeld), cpu_time(std::process::id()));
        let before = newest_cursor(socket);
        let rate = throughput(socket, secs).await;
        let made = u32::try_from(newest_cursor(socket) - before)
            .unwrap_or(u32::MAX)
            .max(1);
        self.keeld_cpu.push((cpu_time(keeld) - k) / made);
        self.bench_cpu
            .push((cpu_time(std::process::id()) - b) / made);
        self.rates.push(rate);
    }

    fn rate(&self) -> f64 {
        median(&self.rates)
    }

    fn per_read(&self) -> String {
        if self.per_read.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", median(&self.per_read))
        }
    }

    fn keeld_us(&self) -> f64 {
        median(
            &self
                .keeld_cpu
                .iter()
                .map(|d| d.as_secs_f64() * 1e6)
                .collect::<Vec<_>>(),
        )
    }

    fn bench_us(&self) -> f64 {
        median(
            &self
                .bench_cpu
                .iter()
                .map(|d| d.as_secs_f64() * 1e6)
                .collect::<Vec<_>>(),
        )
    }
}

/// Commit throughput with no follower and with `FOLLOWERS`, alternating, `rounds` times
/// each; answers both modes and whether every follower read every commit.
async fn throughput_runs(
    socket: &Path,
    keeld: u32,
    secs: f64,
    rounds: usize,
) -> (Mode, Mode, bool) {
    let (mut none, mut with) = (Mode::default(), Mode::default());
    let mut complete = true;
    for _ in 0..rounds {
        none.run(socket, keeld, secs).await;
        let followers = Followers::attach(socket).await;
        let before = newest_cursor(socket);
        let reads_before = READS.load(Ordering::Relaxed);
        with.run(socket, keeld, secs).await;
        let made = newest_cursor(socket) - before;
        // Each follower must have read them all (it follows commits only).
        complete &= followers.wait_for(1 + made as usize).await;
        let reads = READS.load(Ordering::Relaxed) - reads_before;
        with.per_read
            .push((made * FOLLOWERS as u64) as f64 / reads.max(1) as f64);
        followers.detach().await;
    }
    (none, with, complete)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let secs: f64 = std::env::var("KEEL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(3.0);
    let commits: usize = std::env::var("KEEL_BENCH_COMMITS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let keeld = Keeld::start_with(KeeldOptions::default());
    let socket = keeld.socket.clone();
    let latency = runtime.block_on(latency_run(&socket, commits));
    let rounds = 5;
    let (none, with, complete) =
        runtime.block_on(throughput_runs(&socket, keeld.pid(), secs, rounds));
    let ratio = with.rate() / none.rate();

    println!();
    println!(
        "keeld event stream benchmark — {FOLLOWERS} followers of GET /events?follow=true in this \
         process, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "latency, {} sequential commits (PATCH + POST /tx/commit):",
        latency.commits
    );
    println!(
        "  commit round trip                        p50 {:>7.3} ms   p99 {:>7.3} ms",
        ms(latency.commit_p50),
        ms(latency.commit_p99)
    );
    println!(
        "  commit sent -> event at all {FOLLOWERS} followers  p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms   (goal p99 < 5 ms)",
        ms(latency.all_p50),
        ms(latency.all_p99),
        ms(latency.all_max)
    );
    println!(
        "  commit sent -> event at one follower     p99 {:>7.3} ms",
        ms(latency.each_p99)
    );
    println!(
        "  commit answered -> event at all          p99 {:>7.3} ms",
        ms(latency.after_answer_p99)
    );
    println!(
        "  first follower -> all {FOLLOWERS} (fan-out)       p50 {:>7.3} ms   p99 {:>7.3} ms",
        ms(latency.spread_p50),
        ms(latency.spread_p99)
    );
    println!();
    println!("commit throughput, {COMMITTERS} committing clients, {secs} s per run, {rounds} runs each, alternating:");
    for (label, mode) in [("no follower", &none), ("100 followers", &with)] {
        println!(
            "  {label:<15} {:>8.0} commits/s   CPU per commit: keeld {:>6.1} µs, this process {:>6.1} µs   events per read {}   (runs: {})",
            mode.rate(),
            mode.keeld_us(),
            mode.bench_us(),
            mode.per_read(),
            mode.rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "  ratio                {:>8.3}   (goal >= 0.9); every follower read every commit: {complete}",
        ratio
    );
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "events",
            "followers": FOLLOWERS,
            "commits": latency.commits,
            "commit_p50_ms": ms(latency.commit_p50),
            "commit_p99_ms": ms(latency.commit_p99),
            "event_all_p50_ms": ms(latency.all_p50),
            "event_all_p99_ms": ms(latency.all_p99),
            "event_all_max_ms": ms(latency.all_max),
            "event_each_p99_ms": ms(latency.each_p99),
            "event_after_answer_p99_ms": ms(latency.after_answer_p99),
            "fanout_p50_ms": ms(latency.spread_p50),
            "fanout_p99_ms": ms(latency.spread_p99),
            "throughput_none": none.rates,
            "throughput_followers": with.rates,
            "keeld_cpu_us_per_commit_none": none.keeld_us(),
            "keeld_cpu_us_per_commit_followers": with.keeld_us(),
            "bench_cpu_us_per_commit_none": none.bench_us(),
            "bench_cpu_us_per_commit_followers": with.bench_us(),
            "throughput_ratio": ratio,
            "followers_complete": complete,
        })
    );
}
