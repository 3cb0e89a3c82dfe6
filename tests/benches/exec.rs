//! `apiclient exec` beside containerd's own `ctr task exec`, on the same private
//! containerd, the same running host container, interleaved in one run:
//!
//! - round trip: `apiclient exec bench true` against `ctr task exec … host-bench true`
//!   (process start to exit status, each a fresh process of the client); goal ≤ 1.2×;
//! - throughput: `sh -c 'cat /dev/zero | head -c N'` inside, its stdout read to the end
//!   by this process through a pipe, in MB/s; goal ≥ 0.8× of ctr's.
//!
//! Run with `cargo build --release --bins && cargo bench -p keel-e2e --bench exec`
//! (needs root, containerd, runc and busybox-static). Prints a table and, last, one
//! `BENCH_JSON {...}` line. Not a pass/fail test.
//!
//! `KEEL_BENCH_ITERS` (default 20) round trips of each kind; `KEEL_BENCH_EXEC_MB`
//! (default 1024) megabytes per throughput run; `KEEL_BENCH_EXEC_RUNS` (default 3)
//! throughput runs of each kind.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_e2e::containerd::Containerd;
use keel_e2e::image::ImageBuilder;
use keel_e2e::{bin, Keeld, KeeldOptions};
use serde_json::json;

const ROUND_TRIP_GOAL: f64 = 1.2;
const THROUGHPUT_GOAL: f64 = 0.8;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => samples[n / 2],
        _ => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

fn stats(mut samples: Vec<f64>) -> (f64, f64, f64) {
    let m = median(&mut samples);
    (
        m,
        samples.first().copied().unwrap_or_default(),
        samples.last().copied().unwrap_or_default(),
    )
}

struct Bench {
    keeld: Keeld,
    containerd: Containerd,
    execs: u64,
}

impl Bench {
    fn apiclient(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("apiclient"));
        c.arg("--socket-path")
            .arg(&self.keeld.socket)
            .arg("exec")
            .args(args);
        c
    }

    fn ctr(&mut self, args: &[&str]) -> Command {
        self.execs += 1;
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.containerd.socket())
            .arg("--namespace")
            .arg(self.containerd.namespace())
            .args(["task", "exec", "--exec-id"])
            .arg(format!("bench-{}", self.execs))
            .arg("host-bench")
            .args(args);
        c
    }
}

/// Runs `command` to its end; answers the time it took.
fn time(mut command: Command) -> Duration {
    let start = Instant::now();
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run");
    let took = start.elapsed();
    assert!(status.success(), "{command:?}: {status}");
    took
}

/// Runs `command`, reading its stdout to the end; answers MB/s.
fn throughput(mut command: Command, bytes: u64) -> f64 {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 256 * 1024];
    let mut read = 0u64;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read += n as u64,
            Err(e) => panic!("reading {command:?}: {e}"),
        }
    }
    let status = child.wait().expect("wait");
    let took = start.elapsed();
    assert!(status.success(), "{command:?}: {status}");
    assert_eq!(read, bytes, "{command:?} delivered {read} of {bytes} bytes");
    bytes as f64 / 1e6 / took.as_secs_f64()
}

fn main() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "the exec benchmark runs containers and needs root"
    );
    let iters = env_number("KEEL_BENCH_ITERS", 20);
    let megabytes = env_number("KEEL_BENCH_EXEC_MB", 1024);
    let runs = env_number("KEEL_BENCH_EXEC_RUNS", 3);
    let bytes = megabytes << 20;

    let containerd = Containerd::start();
    let work = tempfile::tempdir().expect("tempdir");
    let archive = work.path().join("bench.tar");
    ImageBuilder::busybox()
        .cmd(&["/bin/sh", "-c", "exec sleep 100000"])
        .write_oci_archive(&archive, "v1");
    let keeld = Keeld::start_with(KeeldOptions {
        containerd: Some((
            containerd.socket().to_path_buf(),
            containerd.namespace().to_owned(),
        )),
        ..KeeldOptions::default()
    });
    let patch = json!({"host-containers": {"bench": {
        "enabled": true, "source": format!("oci-archive:{}", archive.display())
    }}});
    let r = keeld.raw(
        "PATCH",
        "/settings?tx=b",
        Some(patch.to_string().as_bytes()),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = keeld.raw("POST", "/tx/commit_and_apply?tx=b", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = keeld.raw("GET", "/containers?kind=host", None);
        if r.json().as_array().is_some_and(|a| {
            a.iter()
                .any(|s| s["name"] == "bench" && s["state"] == "running")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "bench container not running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut bench = Bench {
        keeld,
        containerd,
        execs: 0,
    };

    // Warm-up: one of each (page cache, shim paths).
    time(bench.apiclient(&["bench", "true"]));
    time(bench.ctr(&["true"]));

    let (mut keel_rt, mut ctr_rt) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        keel_rt.push(time(bench.apiclient(&["bench", "true"])).as_secs_f64() * 1e3);
        ctr_rt.push(time(bench.ctr(&["true"])).as_secs_f64() * 1e3);
    }
    let script = format!("cat /dev/zero | head -c {bytes}");
    let (mut keel_tp, mut ctr_tp) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        keel_tp.push(throughput(
            bench.apiclient(&["-T", "bench", "sh", "-c", &script]),
            bytes,
        ));
        ctr_tp.push(throughput(bench.ctr(&["sh", "-c", &script]), bytes));
    }

    let (k_rt, k_rt_min, k_rt_max) = stats(keel_rt.clone());
    let (c_rt, c_rt_min, c_rt_max) = stats(ctr_rt.clone());
    let (k_tp, k_tp_min, k_tp_max) = stats(keel_tp.clone());
    let (c_tp, c_tp_min, c_tp_max) = stats(ctr_tp.clone());
    let rt_ratio = k_rt / c_rt;
    let tp_ratio = k_tp / c_tp;
    println!("exec round trip, `true`, {iters} each (ms: median [min, max])");
    println!("  apiclient exec    {k_rt:8.2} [{k_rt_min:.2}, {k_rt_max:.2}]");
    println!("  ctr task exec     {c_rt:8.2} [{c_rt_min:.2}, {c_rt_max:.2}]");
    println!(
        "  ratio             {rt_ratio:8.2}x  (goal <= {ROUND_TRIP_GOAL}x: {})",
        if rt_ratio <= ROUND_TRIP_GOAL {
            "met"
        } else {
            "NOT met"
        }
    );
    println!("exec throughput, {megabytes} MiB of zeros, {runs} each (MB/s: median [min, max])");
    println!("  apiclient exec    {k_tp:8.1} [{k_tp_min:.1}, {k_tp_max:.1}]");
    println!("  ctr task exec     {c_tp:8.1} [{c_tp_min:.1}, {c_tp_max:.1}]");
    println!(
        "  ratio             {tp_ratio:8.2}x  (goal >= {THROUGHPUT_GOAL}x: {})",
        if tp_ratio >= THROUGHPUT_GOAL {
            "met"
        } else {
            "NOT met"
        }
    );
    let report = json!({
        "round_trip_ms": {
            "apiclient": {"median": k_rt, "min": k_rt_min, "max": k_rt_max, "samples": keel_rt},
            "ctr": {"median": c_rt, "min": c_rt_min, "max": c_rt_max, "samples": ctr_rt},
            "ratio": rt_ratio, "goal": ROUND_TRIP_GOAL,
        },
        "throughput_mb_s": {
            "bytes": bytes,
            "apiclient": {"median": k_tp, "min": k_tp_min, "max": k_tp_max, "samples": keel_tp},
            "ctr": {"median": c_tp, "min": c_tp_min, "max": c_tp_max, "samples": ctr_tp},
            "ratio": tp_ratio, "goal": THROUGHPUT_GOAL,
        },
    });
    println!("BENCH_JSON {report}");
}
