//! API throughput and latency of the real keeld, over its Unix socket, next to the
//! physical floor of a durable write on the same file system.
//!
//! Run with `packaging/dev/bench.sh` (builds the release binaries first). Prints a table
//! and, last, one `BENCH_JSON {...}` line for tooling. Not a pass/fail test.
//!
//! `KEEL_BENCH_SECS` (default 3) sets how long each measurement runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use keel_e2e::{bin_dir, cpu_times, cpu_times_of, Keeld, KeeldOptions};
use serde_json::{json, Value};
use tokio::net::UnixStream;

const CLIENT_COUNTS: [usize; 2] = [1, 8];

/// CPU time, user and system apart: the system part is what the kernel spends on a
/// process's behalf (socket wake-ups, the durable write), which no change to keeld's own
/// code can take away. The kernel measures the total exactly but splits it by sampling
/// at each tick, so over a few seconds the split is close, not exact.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    user: Duration,
    system: Duration,
}

impl Cpu {
    fn of(pid: u32) -> Cpu {
        let (user, system) = cpu_times(pid);
        Cpu { user, system }
    }

    fn of_this_thread() -> Cpu {
        let (user, system) = cpu_times_of("thread-self");
        Cpu { user, system }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    fn per(self, n: usize) -> Cpu {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        Cpu {
            user: self.user / n,
            system: self.system / n,
        }
    }

    fn total(self) -> Duration {
        self.user + self.system
    }

    fn us(d: Duration) -> f64 {
        d.as_secs_f64() * 1e6
    }

    /// `total µs (user U + system S)`.
    fn show(self) -> String {
        format!(
            "{:.0} µs (user {:.0} + system {:.0})",
            Cpu::us(self.total()),
            Cpu::us(self.user),
            Cpu::us(self.system)
        )
    }

    fn json(self) -> Value {
        json!({
            "total": Cpu::us(self.total()),
            "user": Cpu::us(self.user),
            "system": Cpu::us(self.system),
        })
    }
}

/// One keep-alive HTTP/1.1 connection to keeld.
struct Conn {
    socket: PathBuf,
    sender: SendRequest<Full<Bytes>>,
}

/// What one request gave back.
struct Answer {
    status: u16,
    body: Bytes,
}

impl Conn {
    async fn open(socket: &Path) -> Conn {
        let sender = Self::handshake(socket).await;
        Conn {
            socket: socket.to_owned(),
            sender,
        }
    }

    async fn handshake(socket: &Path) -> SendRequest<Full<Bytes>> {
        let stream = UnixStream::connect(socket).await.expect("connect to keeld");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        sender
    }

    /// Sends one request on this connection. A transport error (the connection was
    /// closed under us) is returned as `Err`, and the connection is reopened for the next
    /// request.
    async fn request(
        &mut self,
        method: http::Method,
        uri: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, String> {
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .expect("valid request");
        let result = async {
            self.sender.ready().await.map_err(|e| e.to_string())?;
            let answer = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = answer.status().as_u16();
            let body = answer
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok(Answer { status, body })
        }
        .await;
        if result.is_err() {
            self.sender = Self::handshake(&self.socket).await;
        }
        result
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    GetAll,
    GetKey,
    SetCommit,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::GetAll => "GET /settings",
            Workload::GetKey => "GET /settings?keys=settings.motd",
            Workload::SetCommit => "PATCH+commit (durable)",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Workload::GetAll => "get_settings",
            Workload::GetKey => "get_settings_key",
            Workload::SetCommit => "set_commit",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::SetCommit => "cycles/s",
            _ => "req/s",
        }
    }
}

/// What one client saw during a run.
#[derive(Default)]
struct ClientResult {
    latencies: Vec<Duration>,
    requests: u64,
    non_2xx: u64,
    transport_errors: u64,
    noop_commits: u64,
    first_failure: Option<String>,
}

/// The figures for one (workload, clients) run.
struct Figures {
    workload: Workload,
    clients: usize,
    ops: usize,
    requests: u64,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    non_2xx: u64,
    transport_errors: u64,
    noop_commits: u64,
    first_failure: Option<String>,
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A value no commit has written before, so that every commit changes something.
static NEXT_VALUE: AtomicU64 = AtomicU64::new(0);

async fn client_loop(
    mut conn: Conn,
    workload: Workload,
    client: usize,
    start: Instant,
    deadline: Instant,
) -> ClientResult {
    let mut result = ClientResult {
        latencies: Vec::with_capacity(64 * 1024),
        ..Default::default()
    };
    let tx = format!("bench-{client}");
    let patch_uri = format!("/settings?tx={tx}");
    let commit_uri = format!("/tx/commit?tx={tx}");
    tokio::time::sleep_until(start.into()).await;
    while Instant::now() < deadline {
        let began = Instant::now();
        let mut steps: Vec<(http::Method, &str, Option<Vec<u8>>)> = match workload {
            Workload::GetAll => vec![(http::Method::GET, "/settings", None)],
            Workload::GetKey => vec![(http::Method::GET, "/settings?keys=settings.motd", None)],
            Workload::SetCommit => {
                let n = NEXT_VALUE.fetch_add(1, Ordering::Relaxed);
                let body = json!({ "motd": format!("bench {n}") })
                    .to_string()
                    .into_bytes();
                vec![
                    (http::Method::PATCH, patch_uri.as_str(), Some(body)),
                    (http::Method::POST, commit_uri.as_str(), None),
                ]
            }
        };
        let mut ok = true;
        for (method, uri, body) in steps.drain(..) {
            let is_commit = method == http::Method::POST;
            result.requests += 1;
            match conn.request(method.clone(), uri, body.as_deref()).await {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    if is_commit {
                        let changed: Value =
                            serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
                        if changed.as_array().map_or(0, Vec::len) == 0 {
                            result.noop_commits += 1;
                        }
                    }
                }
                Ok(answer) => {
                    result.non_2xx += 1;
                    result.first_failure.get_or_insert_with(|| {
                        format!(
                            "{method} {uri}: {} {}",
                            answer.status,
                            String::from_utf8_lossy(&answer.body).trim_end()
                        )
                    });
                    ok = false;
                    break;
                }
                Err(e) => {
                    result.transport_errors += 1;
                    result
                        .first_failure
                        .get_or_insert_with(|| format!("{method} {uri}: {e}"));
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            result.latencies.push(began.elapsed());
        }
    }
    result
}

async fn measure(socket: &Path, workload: Workload, clients: usize, secs: f64) -> Figures {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Conn::open(socket).await);
    }
    // Every client connects first, then all start together.
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(client, conn)| tokio::spawn(client_loop(conn, workload, client, start, deadline)))
        .collect();
    let mut all = ClientResult::default();
    for task in tasks {
        let r = task.await.expect("client task");
        all.latencies.extend(r.latencies);
        all.requests += r.requests;
        all.non_2xx += r.non_2xx;
        all.transport_errors += r.transport_errors;
        all.noop_commits += r.noop_commits;
        if all.first_failure.is_none() {
            all.first_failure = r.first_failure;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies.sort_unstable();
    Figures {
        workload,
        clients,
        ops: all.latencies.len(),
        requests: all.requests,
        per_sec: all.latencies.len() as f64 / elapsed,
        p50: percentile(&all.latencies, 50.0),
        p99: percentile(&all.latencies, 99.0),
        max: all.latencies.last().copied().unwrap_or_default(),
        non_2xx: all.non_2xx,
        transport_errors: all.transport_errors,
        noop_commits: all.noop_commits,
        first_failure: all.first_failure,
    }
}

/// The floor under a durable commit: write 4 KiB to a temp file, fsync it, rename it over
/// the target, fsync the directory — as keeld's store does for every batch.
struct Floor {
    ops: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// CPU of the measuring thread per op.
    cpu: Cpu,
}

fn measure_floor(parent: &Path, secs: f64) -> Floor {
    let dir = tempfile::tempdir_in(parent).expect("floor temp dir");
    let dir_handle = File::open(dir.path()).expect("open floor dir");
    let temp = dir.path().join("data.json.tmp");
    let target = dir.path().join("data.json");
    let block = vec![b'k'; 4096];
    let mut latencies = Vec::with_capacity(64 * 1024);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        let began = Instant::now();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .expect("create temp");
        file.write_all(&block).expect("write");
        file.sync_all().expect("fsync file");
        drop(file);
        fs::rename(&temp, &target).expect("rename");
        dir_handle.sync_all().expect("fsync dir");
        latencies.push(began.elapsed());
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Floor {
        ops: latencies.len(),
        per_sec: latencies.len() as f64 / elapsed,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or_default(),
        cpu: Cpu::default(),
    }
}

/// The floor under one durable append, as keeld's store writes a commit: `pwrite` of
/// 4 KiB into a preallocated file, then `fdatasync`.
fn measure_append_floor(parent: &Path, secs: f64) -> Floor {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir_in(parent).expect("floor temp dir");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("log"))
        .expect("create");
    let block = vec![b'k'; 4096];
    file.write_all_at(&vec![0u8; 1 << 20], 0)
        .expect("preallocate");
    file.sync_all().expect("fsync");
    let mut latencies = Vec::with_capacity(64 * 1024);
    let cpu_before = Cpu::of_this_thread();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut offset = 0u64;
    while Instant::now() < deadline {
        let began = Instant::now();
        file.write_all_at(&block, offset).expect("pwrite");
        file.sync_data().expect("fdatasync");
        offset = (offset + 4096) % (1 << 20);
        latencies.push(began.elapsed());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = Cpu::of_this_thread().since(cpu_before);
    latencies.sort_unstable();
    Floor {
        ops: latencies.len(),
        per_sec: latencies.len() as f64 / elapsed,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or_default(),
        cpu: cpu.per(latencies.len()),
    }
}

/// Rounds of the history comparison. Each round measures both keelds in turn, the order
/// alternating, so that a change in the disk's speed during the run (this is a shared,
/// virtual disk) falls on both alike instead of on whichever ran second.
const HISTORY_ROUNDS: u32 = 6;

/// set+commit figures of one keeld in the history comparison.
struct HistoryFigures {
    c1: f64,
    c8: f64,
    /// keeld's CPU per cycle over its 1-client slices.
    cpu: Cpu,
}

/// A keeld that keeps `history` generations and has already made `prefill` commits.
fn prefilled(runtime: &tokio::runtime::Runtime, history: u32, prefill: usize) -> Keeld {
    let keeld = Keeld::start_with(KeeldOptions {
        history,
        ..KeeldOptions::default()
    });
    let socket = keeld.socket.clone();
    runtime.block_on(async {
        let mut conn = Conn::open(&socket).await;
        for i in 0..prefill {
            let body = json!({ "motd": format!("prefill {i}") }).to_string();
            conn.request(
                http::Method::PATCH,
                "/settings?tx=prefill",
                Some(body.as_bytes()),
            )
            .await
            .expect("prefill patch");
            conn.request(http::Method::POST, "/tx/commit?tx=prefill", None)
                .await
                .expect("prefill commit");
        }
    });
    keeld
}

/// set+commit with 1 and 8 clients against a keeld keeping 10 generations (200 commits
/// in) and one keeping 10,000 (2,000 in), interleaved in [`HISTORY_ROUNDS`] rounds of
/// `secs / HISTORY_ROUNDS` each; answers the figures of both, in that order.
fn history_runs(runtime: &tokio::runtime::Runtime, secs: f64) -> [HistoryFigures; 2] {
    let keelds = [
        prefilled(runtime, 10, 200),
        prefilled(runtime, 10_000, 2_000),
    ];
    let slice = secs / f64::from(HISTORY_ROUNDS);
    // (ops, seconds) per keeld, for 1 and for 8 clients.
    let mut tally = [[(0usize, 0f64); 2]; 2];
    // Only the keeld being measured works: the other is idle, so each keeld's CPU over
    // the whole 1-client phase is its CPU over its own slices.
    let mut cpu = [Cpu::default(); 2];
    for (c, clients) in CLIENT_COUNTS.into_iter().enumerate() {
        let before = keelds.each_ref().map(|k| Cpu::of(k.pid()));
        for round in 0..HISTORY_ROUNDS {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let f = runtime.block_on(measure(
                    &keelds[i].socket,
                    Workload::SetCommit,
                    clients,
                    slice,
                ));
                tally[i][c].0 += f.ops;
                if f.per_sec > 0.0 {
                    tally[i][c].1 += f.ops as f64 / f.per_sec;
                }
            }
        }
        if c == 0 {
            for (i, k) in keelds.iter().enumerate() {
                cpu[i] = Cpu::of(k.pid()).since(before[i]);
            }
        }
    }
    std::array::from_fn(|i| {
        let rate = |(ops, secs): (usize, f64)| if secs > 0.0 { ops as f64 / secs } else { 0.0 };
        HistoryFigures {
            c1: rate(tally[i][0]),
            c8: rate(tally[i][1]),
            cpu: cpu[i].per(tally[i][0].0),
        }
    })
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A realistic node: 22 keys across the usual groups.
fn seed_model() -> Value {
    json!({
        "motd": "Welcome to Keel (bench node)",
        "kernel": {
            "sysctl": {
                "net.ipv4.ip_forward": "1",
                "vm.max_map_count": "262144",
                "fs.inotify.max_user_watches": "524288",
                "net.core.somaxconn": "4096"
            }
        },
        "host-containers": {
            "admin": {
                "enabled": true,
                "source": "public.ecr.aws/bottlerocket/bottlerocket-admin:v0.11.13",
                "superpowered": true
            },
            "control": {
                "enabled": true,
                "source": "public.ecr.aws/bottlerocket/bottlerocket-control:v0.7.17",
                "superpowered": false
            }
        },
        "ntp": {
            "time-servers": ["169.254.169.123", "2.amazon.pool.ntp.org"]
        },
        "dns": {
            "name-servers": ["10.0.0.2"],
            "search-list": ["ec2.internal", "cluster.local"]
        },
        "network": {
            "hostname": "ip-10-0-0-42.ec2.internal"
        },
        "kubernetes": {
            "cluster-name": "bench",
            "cluster-dns-ip": "10.100.0.10",
            "cluster-domain": "cluster.local",
            "max-pods": 110,
            "node-labels": {
                "node.kubernetes.io/role": "worker",
                "topology.kubernetes.io/zone": "us-west-2a",
                "team": "platform"
            }
        }
    })
}

fn count_leaves(value: &Value) -> usize {
    match value {
        Value::Object(map) => map.values().map(count_leaves).sum(),
        _ => 1,
    }
}

async fn seed(socket: &Path) -> (usize, usize) {
    let model = seed_model();
    let mut conn = Conn::open(socket).await;
    let body = model.to_string().into_bytes();
    let r = conn
        .request(http::Method::PATCH, "/settings?tx=bench-seed", Some(&body))
        .await
        .expect("seed PATCH");
    assert!(
        (200..300).contains(&r.status),
        "seed PATCH refused: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let r = conn
        .request(http::Method::POST, "/tx/commit?tx=bench-seed", None)
        .await
        .expect("seed commit");
    assert!(
        (200..300).contains(&r.status),
        "seed commit refused: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let r = conn
        .request(http::Method::GET, "/settings", None)
        .await
        .expect("GET /settings");
    assert_eq!(r.status, 200);
    let live: Value = serde_json::from_slice(&r.body).expect("settings JSON");
    let r = conn
        .request(http::Method::GET, "/settings?keys=settings.motd", None)
        .await
        .expect("GET /settings?keys");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    (count_leaves(&live), r.body.len())
}

fn file_size(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.len())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let secs: f64 = std::env::var("KEEL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(3.0);
    let bins = bin_dir();
    let keeld_size = file_size(&bins.join("keeld"));
    let apiclient_size = file_size(&bins.join("apiclient"));

    let keeld = Keeld::start_with(KeeldOptions::default());
    let pid = keeld.pid();
    let socket = keeld.socket.clone();
    let state_parent = keeld
        .state_dir
        .parent()
        .expect("state dir has a parent")
        .to_owned();
    // Let it settle, then read its idle footprint.
    std::thread::sleep(Duration::from_millis(200));
    let (rss_idle, _) = rss_kib(pid);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let socket_ref = socket;
    let (leaves, key_body_len) = runtime.block_on(seed(&socket_ref));
    let settings_len = keel_e2e::raw_request(&socket_ref, "GET", "/settings", None)
        .body
        .len();

    let mut results = Vec::new();
    // keeld's CPU per request of the cheapest one: what serving any request costs.
    let mut get_cpu = Cpu::default();
    for workload in [Workload::GetAll, Workload::GetKey, Workload::SetCommit] {
        for clients in CLIENT_COUNTS {
            let cpu_before = Cpu::of(pid);
            let figures = runtime.block_on(measure(&socket_ref, workload, clients, secs));
            if workload == Workload::GetKey && clients == 1 && figures.requests > 0 {
                get_cpu = Cpu::of(pid)
                    .since(cpu_before)
                    .per(usize::try_from(figures.requests).unwrap_or(usize::MAX));
            }
            results.push(figures);
        }
    }
    let (rss_after, rss_peak) = rss_kib(pid);
    let floor = measure_floor(&state_parent, secs);
    let append_floor = measure_append_floor(&state_parent, secs);
    // History cost: the same set+commit with 10 and with 10,000 kept generations, the
    // latter after 2,000 commits, interleaved.
    let [h10, h10k] = history_runs(&runtime, secs);

    // The table.
    println!();
    println!(
        "keeld API benchmark — {secs} s per row, keep-alive connections, {} CPUs, \
         {leaves} seeded settings (GET /settings = {settings_len} B, ?keys=motd = {key_body_len} B)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    let header = format!(
        "{:<34} {:>7} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "workload", "clients", "rate", "unit", "p50 ms", "p99 ms", "max ms", "non2xx", "io-err"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    for f in &results {
        println!(
            "{:<34} {:>7} {:>12.0} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>7}",
            f.workload.label(),
            f.clients,
            f.per_sec,
            f.workload.unit(),
            ms(f.p50),
            ms(f.p99),
            ms(f.max),
            f.non_2xx,
            f.transport_errors
        );
    }
    println!(
        "{:<34} {:>7} {:>12.0} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>7}",
        "floor: write 4K+fsync+rename+fsync",
        1,
        floor.per_sec,
        "ops/s",
        ms(floor.p50),
        ms(floor.p99),
        ms(floor.max),
        "-",
        "-"
    );
    println!();
    let set1 = results
        .iter()
        .find(|f| f.workload == Workload::SetCommit && f.clients == 1)
        .expect("set+commit, 1 client");
    let set8 = results
        .iter()
        .find(|f| f.workload == Workload::SetCommit && f.clients == 8)
        .expect("set+commit, 8 clients");
    let ratio = |x: f64| {
        if floor.per_sec > 0.0 {
            x / floor.per_sec
        } else {
            0.0
        }
    };
    println!(
        "{:<44} {:>8.2}",
        "set+commit 1 client  / floor (cycles/ops)",
        ratio(set1.per_sec)
    );
    println!(
        "{:<44} {:>8.2}",
        "set+commit 8 clients / floor (cycles/ops)",
        ratio(set8.per_sec)
    );
    println!();
    println!(
        "{:<44} {:>8.0} ops/s",
        "floor: pwrite 4K + fdatasync", append_floor.per_sec
    );
    println!(
        "{:<28} {:>12} {:>12} {:>14}",
        "set+commit (cycles/s)", "1 client", "8 clients", "keeld CPU/cycle"
    );
    for (label, h) in [("--history 10", &h10), ("--history 10000 (2000 in)", &h10k)] {
        println!(
            "{:<28} {:>12.0} {:>12.0}   {}",
            label,
            h.c1,
            h.c8,
            h.cpu.show()
        );
    }
    let over = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "{:<44} {:>8.2} (1 client), {:.2} (8 clients); goal >= 0.9",
        "history 10000 / history 10",
        over(h10k.c1, h10.c1),
        over(h10k.c8, h10.c8)
    );
    // What a PATCH + commit cycle cannot cost less than: two requests (each at least
    // what the cheapest GET costs keeld) and one durable append.
    let cycle_floor = Cpu {
        user: get_cpu.user * 2 + append_floor.cpu.user,
        system: get_cpu.system * 2 + append_floor.cpu.system,
    };
    println!(
        "{:<44} {} per request (GET ?keys, 1 client)",
        "keeld CPU serving a request",
        get_cpu.show()
    );
    println!(
        "{:<44} {} per op",
        "CPU of pwrite 4K + fdatasync",
        append_floor.cpu.show()
    );
    println!(
        "{:<44} {} (2 requests + 1 append); goal for a cycle <= 100 µs",
        "CPU floor of a PATCH+commit cycle",
        cycle_floor.show()
    );
    println!(
        "{:<44} {:>8.2} (1 client; goal >= 0.3), {:.2} (8 clients; goal >= 0.6)",
        "set+commit / append floor",
        over(h10.c1, append_floor.per_sec),
        over(h10.c8, append_floor.per_sec)
    );
    let noop: u64 = results.iter().map(|f| f.noop_commits).sum();
    println!("{:<44} {:>8}", "commits that changed nothing", noop);
    println!();
    println!(
        "{:<44} {:>8} KiB",
        "keeld VmRSS idle (after start)", rss_idle
    );
    println!("{:<44} {:>8} KiB", "keeld VmRSS after load", rss_after);
    println!("{:<44} {:>8} KiB", "keeld VmHWM (peak RSS)", rss_peak);
    let size = |s: Option<u64>| {
        s.map_or_else(
            || "missing".to_owned(),
            |b| format!("{:.2} MiB", b as f64 / 1048576.0),
        )
    };
    println!(
        "{:<44} {:>12}",
        format!("{}", bins.join("keeld").display()),
        size(keeld_size)
    );
    println!(
        "{:<44} {:>12}",
        format!("{}", bins.join("apiclient").display()),
        size(apiclient_size)
    );
    for f in &results {
        if let Some(failure) = &f.first_failure {
            println!(
                "first failure in {} x{}: {failure}",
                f.workload.label(),
                f.clients
            );
        }
    }
    println!();

    let mut runs = serde_json::Map::new();
    for f in &results {
        runs.insert(
            format!("{}_c{}", f.workload.id(), f.clients),
            json!({
                "workload": f.workload.label(),
                "clients": f.clients,
                "ops": f.ops,
                "requests": f.requests,
                "per_sec": f.per_sec,
                "unit": f.workload.unit(),
                "p50_ms": ms(f.p50),
                "p99_ms": ms(f.p99),
                "max_ms": ms(f.max),
                "non_2xx": f.non_2xx,
                "transport_errors": f.transport_errors,
                "noop_commits": f.noop_commits,
            }),
        );
    }
    let report = json!({
        "secs": secs,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "seeded_settings": leaves,
        "settings_body_bytes": settings_len,
        "runs": runs,
        "floor": {
            "ops": floor.ops,
            "per_sec": floor.per_sec,
            "p50_ms": ms(floor.p50),
            "p99_ms": ms(floor.p99),
            "max_ms": ms(floor.max),
        },
        "append_floor_per_sec": append_floor.per_sec,
        "cpu_us": {
            "keeld_per_get": Cpu::us(get_cpu.total()),
            "append_floor_per_op": Cpu::us(append_floor.cpu.total()),
            "cycle_floor": Cpu::us(cycle_floor.total()),
            "split": {
                "keeld_per_get": get_cpu.json(),
                "append_floor_per_op": append_floor.cpu.json(),
                "cycle_floor": cycle_floor.json(),
                "h10_per_cycle": h10.cpu.json(),
                "h10000_per_cycle": h10k.cpu.json(),
            },
        },
        "history": {
            "h10": {"c1": h10.c1, "c8": h10.c8, "cpu_us_per_cycle": Cpu::us(h10.cpu.total())},
            "h10000": {"c1": h10k.c1, "c8": h10k.c8, "cpu_us_per_cycle": Cpu::us(h10k.cpu.total())},
        },
        "ratio_set_commit_c1_to_floor": ratio(set1.per_sec),
        "ratio_set_commit_c8_to_floor": ratio(set8.per_sec),
        "rss_kib": { "idle": rss_idle, "after_load": rss_after, "peak": rss_peak },
        "binary_bytes": { "keeld": keeld_size, "apiclient": apiclient_size },
    });
    println!("BENCH_JSON {report}");
    drop(keeld);
}
