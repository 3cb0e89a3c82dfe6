//! Update throughput: `prepare-update` (download from a TUF repository on 127.0.0.1,
//! `tough`'s verification of length and sha256, the slot writer's sha256 and dm-verity
//! tree check, the writes and their `fdatasync`) next to `dd bs=1M conv=fsync` of the same
//! root image onto the same partition file, interleaved in one run.
//!
//! The update is a real one: an erofs root image (`mkfs.erofs` of incompressible data),
//! its hash tree from `veritysetup format`, a kernel and an initrd, published in a
//! repository signed by keys the bench generates. The partitions are files on the file
//! system of the temporary directory (set `TMPDIR` to put them elsewhere); the source
//! bytes are in the page cache for both (the HTTP server sends them with `sendfile`, dd
//! reads them), so both sides
//! measure the same thing: moving the bytes and making them durable, plus, for keeld,
//! everything it checks. A keeld sample is the wall time from `POST
//! /actions/prepare-update` until `/updates/status` shows the prepare succeeded, polled
//! every [`POLL`]; it covers all four targets and the repository metadata, and its MB/s
//! count all of their bytes. A dd sample writes the root image alone.
//!
//! Every byte of the update is hashed (TUF's sha256 in keeld, the dm-verity tree in the
//! writer): where the disk writes faster than one core hashes, sha256 bounds the ratio,
//! so the bench also prints sha256 of the root image in memory and its ratio to dd.
//!
//! Run with `packaging/dev/bench.sh` (it builds the release binaries first); needs
//! mkfs.erofs and veritysetup (packaging/dev/deps.sh). `KEEL_BENCH_ITERS` (default 5)
//! sets the samples of each kind, `KEEL_BENCH_UPDATE_MIB` (default 256) the root image's
//! size. Prints a table and one `BENCH_JSON {...}` line. Not a pass/fail test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keel_e2e::http_server::FileServer;
use keel_e2e::tuf::{build_update, days_from_now, TufRepo};
use keel_e2e::updates::SlotHost;
use keel_e2e::{Keeld, KeeldOptions};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const VARIANT: &str = "keel-dev";
const POLL: Duration = Duration::from_millis(2);
/// The share of dd's MB/s the update should reach.
const GOAL: f64 = 0.7;

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut samples: Vec<f64>) -> Stats {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    Stats {
        median,
        min: samples[0],
        max: samples[n - 1],
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn status(keeld: &Keeld) -> Value {
    loop {
        let r = keeld.raw("GET", "/updates/status", None);
        if r.status == 200 {
            return r.json();
        }
        std::thread::sleep(POLL);
    }
}

/// One prepare; answers its wall time.
fn prepare(keeld: &Keeld) -> Duration {
    let before = status(keeld)["most_recent_command"]["timestamp"].clone();
    let started = Instant::now();
    let r = keeld.raw("POST", "/actions/prepare-update", None);
    assert_eq!(r.status, 204, "{}", r.text());
    loop {
        let r = keeld.raw("GET", "/updates/status", None);
        if r.status == 200 {
            let s = r.json();
            if s["most_recent_command"]["timestamp"] != before {
                let elapsed = started.elapsed();
                assert_eq!(s["most_recent_command"]["cmd_status"], "Success", "{s:#}");
                return elapsed;
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `dd` of `image` onto `partition` with `conv=fsync`; answers its wall time.
fn dd(image: &Path, partition: &Path) -> Duration {
    let started = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", partition.display()))
        .args(["bs=1M", "conv=fsync,notrunc", "status=none"])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(out.status.success(), "dd: {out:?}");
    elapsed
}

fn mb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

fn main() {
    let iters = env_number("KEEL_BENCH_ITERS", 5).max(1) as usize;
    let mib = env_number("KEEL_BENCH_UPDATE_MIB", 256);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();

    eprintln!("building a {mib} MiB root image and its hash tree...");
    let update = build_update(&path, "1.1.0", (mib as usize) << 20);
    let mut repo = TufRepo::create(&path.join("repo"));
    let manifest = path.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&json!({"updates": [update.manifest_entry(VARIANT, json!({}))]}))
            .unwrap(),
    )
    .unwrap();
    let names = update.names(VARIANT);
    let mut files: Vec<(&str, &Path)> = vec![("manifest.json", manifest.as_path())];
    files.extend(names.iter().map(|(n, p)| (n.as_str(), *p)));
    repo.publish(&files, days_from_now(30));
    let server = FileServer::start("127.0.0.1", repo.dir.clone());

    let root_bytes = std::fs::metadata(&update.root).unwrap().len();
    let hash_bytes = std::fs::metadata(&update.hash).unwrap().len();
    let total: u64 = names
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    let host = SlotHost::create(
        &path.join("host"),
        (root_bytes + (64 << 20)).next_multiple_of(1 << 20),
        (hash_bytes + (4 << 20)).next_multiple_of(1 << 20),
    );
    let keeld = Keeld::start_with(KeeldOptions {
        extra_args: host.keeld_args(&repo.root_json, "1.0.0"),
        ..KeeldOptions::default()
    });
    let out = keeld.apiclient(&[
        "set",
        "-j",
        &json!({"updates": {
            "metadata-base-url": server.url("metadata"),
            "targets-base-url": server.url("targets"),
        }})
        .to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = keeld.raw("POST", "/actions/refresh-updates", None);
    assert_eq!(r.status, 204);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&keeld)["update_state"] != "Available" {
        assert!(Instant::now() < deadline, "{}", status(&keeld));
        std::thread::sleep(POLL);
    }
    let partition: PathBuf = host.partition("keel-root-b");

    // Warm-up of each kind, discarded.
    prepare(&keeld);
    dd(&update.root, &partition);
    let (mut keeld_mbs, mut dd_mbs, mut keeld_s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = prepare(&keeld);
        keeld_s.push(t.as_secs_f64());
        keeld_mbs.push(mb_per_s(total, t));
        dd_mbs.push(mb_per_s(root_bytes, dd(&update.root, &partition)));
    }
    // The bound of any write that hashes every byte: sha256 of the root image already in
    // memory, one core (the sha2 crate, which the slot writer's dm-verity check uses).
    let image = std::fs::read(&update.root).unwrap();
    let sha_mbs: Vec<f64> = (0..3)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(Sha256::digest(&image));
            mb_per_s(root_bytes, started.elapsed())
        })
        .collect();
    drop(image);
    let sha = stats(sha_mbs);
    let k = stats(keeld_mbs);
    let d = stats(dd_mbs);
    let secs = stats(keeld_s);
    let ratio = k.median / d.median;
    println!(
        "update: root image {:.1} MiB, hash tree {:.1} MiB, {} bytes in all four targets; {iters} samples each, {} CPUs",
        root_bytes as f64 / 1048576.0,
        hash_bytes as f64 / 1048576.0,
        total,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<58}{:>10} {:>22}", "figure", "median", "[min – max]");
    println!(
        "{:<58}{:>10.1} {:>22}",
        "prepare-update (download+verify+write), MB/s",
        k.median,
        format!("[{:.1} – {:.1}]", k.min, k.max)
    );
    println!(
        "{:<58}{:>10.2} {:>22}",
        "  wall time, s",
        secs.median,
        format!("[{:.2} – {:.2}]", secs.min, secs.max)
    );
    println!(
        "{:<58}{:>10.1} {:>22}",
        "dd bs=1M conv=fsync of the root image, same file, MB/s",
        d.median,
        format!("[{:.1} – {:.1}]", d.min, d.max)
    );
    println!(
        "{:<58}{:>10.1} {:>22}",
        "sha256 of the root image in memory, one core, MB/s",
        sha.median,
        format!("[{:.1} – {:.1}]", sha.min, sha.max)
    );
    println!(
        "{:<58}{:>10.2}",
        "  ceiling of the ratio for one hash pass (sha256 / dd)",
        sha.median / d.median
    );
    println!(
        "{:<58}{:>10.2}   goal ≥ {GOAL} {}",
        "ratio update / dd",
        ratio,
        if ratio >= GOAL { "(met)" } else { "(NOT met)" }
    );
    println!(
        "BENCH_JSON {}",
        json!({
            "root_bytes": root_bytes,
            "total_bytes": total,
            "samples": iters,
            "prepare_mb_per_s": {"median": k.median, "min": k.min, "max": k.max},
            "prepare_s": {"median": secs.median, "min": secs.min, "max": secs.max},
            "dd_mb_per_s": {"median": d.median, "min": d.min, "max": d.max},
            "ratio_prepare_to_dd": ratio,
            "sha256_mb_per_s": {"median": sha.median, "min": sha.min, "max": sha.max},
            "ratio_sha256_to_dd": sha.median / d.median,
            "goal": GOAL,
        })
    );
}
