//! Boot with bootstrap containers: keeld booting to `configured` with three bootstrap
//! containers from local archives, next to the same three containers run one after
//! another with containerd's own `ctr run --rm`, on one private containerd, interleaved
//! in one run.
//!
//! Each container is a busybox image running `sh -c 'echo done >
//! /.bottlerocket/bootstrap-containers/<name>/ran'`; on both sides that path is a bind
//! mount of a host directory. A keeld sample is one fresh keeld (new state, runtime and
//! persistent directories, the shared containerd): its wall time runs from just before
//! the harness spawns it (the harness first writes its services.toml, well under a
//! millisecond) until `GET /boot`, polled every [`POLL`], says `configured`; the boot
//! record's own `duration-ms` and the three bootstrap steps' `duration-ms` are reported
//! too. A ctr sample is the wall time of the three `ctr run --rm` in the foreground,
//! each waited for. One warm-up of each kind comes first and is discarded: keeld's
//! imports and unpacks the images, and ctr then runs the image records keeld made, so
//! both sides start from unpacked images.
//!
//! Two reference rows put the figures in context: a keeld boot with no bootstrap
//! container at all (keeld's fixed boot cost: user-data, commit, render, restart
//! commands) and three `ctr version` (ctr's fixed cost of doing nothing: process start,
//! connect, one call).
//!
//! Run with `packaging/dev/bench.sh` (it builds the release binaries first). Needs root,
//! containerd, runc and busybox-static. Prints a table and, last, one `BENCH_JSON {...}`
//! line for tooling. Not a pass/fail test.
//!
//! `KEEL_BENCH_ITERS` (default 7) sets the number of samples of each kind;
//! `KEEL_BENCH_CTR_ARGS` adds options to `ctr run` (e.g. `--null-io`);
//! `KEEL_BENCH_KEEP_LOG=<path>` writes every keeld's log there at the end (with
//! `KEELD_LOG=debug` to see each step).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_e2e::containerd::Containerd;
use keel_e2e::image::ImageBuilder;
use keel_e2e::{Keeld, KeeldOptions};
use serde_json::{json, Value};

/// The bootstrap containers, in the order keeld runs them (by name).
const NAMES: [&str; 3] = ["bench-a", "bench-b", "bench-c"];
/// Where every container sees its persistent directory: `<MOUNT_BASE>/<name>`.
const MOUNT_BASE: &str = "/.bottlerocket/bootstrap-containers";
/// The file each container writes in its persistent directory.
const MARKER: &str = "ran";
/// Prefix of the container IDs used with `ctr run`.
const CTR_PREFIX: &str = "ctr-boot-";
/// The snapshotter keeld always uses; `ctr run` is given the same.
const SNAPSHOTTER: &str = "overlayfs";
/// How often `GET /boot` is asked.
const POLL: Duration = Duration::from_millis(1);
/// Give up on one boot (or one `ctr run`) after this long.
const TIMEOUT: Duration = Duration::from_secs(90);
/// The overhead keeld should stay under, in percent of ctr's time.
const TARGET_PCT: f64 = 10.0;

/// Summary of a set of samples, in milliseconds.
struct Stats {
    median: f64,
    min: f64,
    max: f64,
    samples: Vec<f64>,
}

impl Stats {
    fn of_ms(samples: &[f64]) -> Stats {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Stats {
            median,
            min: sorted.first().copied().unwrap_or_default(),
            max: sorted.last().copied().unwrap_or_default(),
            samples: samples.to_vec(),
        }
    }

    fn of(samples: &[Duration]) -> Stats {
        Self::of_ms(&samples.iter().map(|d| ms(*d)).collect::<Vec<_>>())
    }

    fn json(&self) -> Value {
        json!({
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "samples": self.samples,
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn require_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "the boot benchmark runs containers and needs root"
    );
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(6000);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    &text[start..]
}

/// One keeld boot, as measured.
struct BootSample {
    /// Spawn → `GET /boot` says configured.
    wall: Duration,
    /// The record's own `duration-ms`.
    record_ms: f64,
    /// Sum of the bootstrap-container steps' `duration-ms`.
    bootstrap_ms: f64,
    /// Every step's `duration-ms`, by name.
    steps: Vec<(String, f64)>,
}

/// Everything both sides need.
struct Bench<'a> {
    containerd: &'a Containerd,
    work: &'a Path,
    /// The image record of each container (named after its `source`), for ctr.
    images: Vec<String>,
    /// More `ctr run` options, from `KEEL_BENCH_CTR_ARGS`.
    ctr_extra: Vec<String>,
    /// Every keeld's log, kept when `KEEL_BENCH_KEEP_LOG` is set.
    logs: Option<String>,
}

impl Bench<'_> {
    /// A fresh keeld booting from `user_data`, until configured; checks that each of
    /// `expect_ran` left its marker, drops keeld and checks nothing is left in
    /// containerd.
    fn keeld_boot(&mut self, label: &str, user_data: &Path, expect_ran: &[&str]) -> BootSample {
        let absent = |name: &str| self.work.join(name).display().to_string();
        let options = KeeldOptions {
            containerd: Some((
                self.containerd.socket().to_path_buf(),
                self.containerd.namespace().to_owned(),
            )),
            wait_for_boot: false,
            extra_args: vec![
                "--user-data-file".to_owned(),
                user_data.display().to_string(),
                "--user-data-defaults".to_owned(),
                absent("absent-defaults.toml"),
                "--user-data-overrides".to_owned(),
                absent("absent-overrides.toml"),
                "--os-defaults".to_owned(),
                absent("absent-os-defaults.toml"),
            ],
            ..KeeldOptions::default()
        };
        let began = Instant::now();
        let keeld = Keeld::start_with(options);
        let (wall, record) = loop {
            let record = keeld.raw("GET", "/boot", None).json();
            if record["phase"] == "configured" || record["phase"] == "failed" {
                break (began.elapsed(), record);
            }
            assert!(
                began.elapsed() < TIMEOUT,
                "keeld did not boot within {TIMEOUT:?}: {record:#}\nkeeld log:\n{}",
                tail(&keeld.log())
            );
            std::thread::sleep(POLL);
        };
        assert_eq!(
            record["phase"],
            "configured",
            "{record:#}\nkeeld log:\n{}",
            tail(&keeld.log())
        );
        for name in expect_ran {
            let marker = keeld
                .persistent_dir()
                .join("bootstrap-containers")
                .join(name)
                .join(MARKER);
            assert!(
                marker.exists(),
                "{} missing after the boot: {record:#}",
                marker.display()
            );
        }
        let steps: Vec<(String, f64)> = record["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or_default().to_owned(),
                    s["duration-ms"].as_f64().unwrap_or_default(),
                )
            })
            .collect();
        let bootstrap_ms = steps
            .iter()
            .filter(|(name, _)| name.starts_with("bootstrap-container:"))
            .map(|(_, d)| d)
            .sum();
        if let Some(logs) = self.logs.as_mut() {
            logs.push_str(&format!("===== keeld {label} =====\n{}\n", keeld.log()));
        }
        drop(keeld);
        self.assert_clean(label);
        BootSample {
            wall,
            record_ms: record["duration-ms"].as_f64().unwrap_or_default(),
            bootstrap_ms,
            steps,
        }
    }

    /// No container, task or container snapshot is left; anything found is removed
    /// (so the next sample starts clean) and the benchmark fails.
    fn assert_clean(&self, after: &str) {
        let containers = self.containerd.ctr_ok(&["containers", "ls", "-q"]);
        let left: Vec<&str> = containers
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        for id in &left {
            let _ = self.containerd.ctr(&["tasks", "kill", "-s", "KILL", id]);
            let _ = self.containerd.ctr(&["tasks", "rm", "-f", id]);
            let _ = self.containerd.ctr(&["containers", "rm", id]);
        }
        let snapshots = self
            .containerd
            .ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
        let stale: Vec<String> = snapshots
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|key| key.starts_with("bootstrap-") || key.starts_with(CTR_PREFIX))
            .map(str::to_owned)
            .collect();
        for key in &stale {
            let _ = self
                .containerd
                .ctr(&["snapshots", "--snapshotter", SNAPSHOTTER, "rm", key]);
        }
        assert!(
            left.is_empty() && stale.is_empty(),
            "left behind after {after}: containers {left:?}, snapshots {stale:?}"
        );
    }

    /// The three containers with `ctr run --rm`, one after another in the foreground.
    fn ctr_three(&self) -> Duration {
        let dirs: Vec<PathBuf> = NAMES
            .iter()
            .map(|name| {
                let dir = self.work.join("ctr").join(name);
                std::fs::create_dir_all(&dir).expect("create the ctr bind-mount source");
                let _ = std::fs::remove_file(dir.join(MARKER));
                dir
            })
            .collect();
        let commands: Vec<Command> = NAMES
            .iter()
            .zip(&dirs)
            .zip(&self.images)
            .map(|((name, dir), image)| {
                let mount = format!(
                    "type=bind,src={},dst={MOUNT_BASE}/{name},options=rbind:rw",
                    dir.display()
                );
                let mut command = self.ctr_command();
                command
                    .args([
                        "run",
                        "--rm",
                        "--snapshotter",
                        SNAPSHOTTER,
                        "--mount",
                        &mount,
                    ])
                    .args(&self.ctr_extra)
                    .args([image.as_str(), &format!("{CTR_PREFIX}{name}")]);
                command
            })
            .collect();
        let began = Instant::now();
        for command in commands {
            run_to_end(command, "ctr run --rm");
        }
        let elapsed = began.elapsed();
        for dir in &dirs {
            assert!(
                dir.join(MARKER).exists(),
                "ctr run left no {}",
                dir.join(MARKER).display()
            );
        }
        self.assert_clean("ctr run --rm");
        elapsed
    }

    /// Three `ctr version` in a row: ctr's own cost, with no container.
    fn ctr_nothing(&self) -> Duration {
        let began = Instant::now();
        for _ in NAMES {
            let mut command = self.ctr_command();
            command.arg("version");
            run_to_end(command, "ctr version");
        }
        began.elapsed()
    }

    fn ctr_command(&self) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.containerd.socket())
            .args(["--namespace", self.containerd.namespace()])
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }
}

/// Runs `command` to its end (killing it after [`TIMEOUT`]); panics unless it succeeds.
fn run_to_end(mut command: Command, what: &str) {
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let began = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if began.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let iters: usize = std::env::var("KEEL_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(7);
    require_root();
    let total = Instant::now();

    let containerd = Containerd::start();
    assert_eq!(
        containerd.snapshotter(),
        SNAPSHOTTER,
        "keeld needs the overlayfs snapshotter (set TMPDIR to a directory not on overlayfs)"
    );
    let work = tempfile::tempdir().expect("tempdir");

    // Three images, the same command but for the container's own name.
    let mut sources = Vec::new();
    let mut user_data = String::new();
    for name in NAMES {
        let archive = work.path().join(format!("{name}.tar"));
        let script = format!("echo done > {MOUNT_BASE}/{name}/{MARKER}");
        ImageBuilder::busybox()
            .cmd(&["/bin/sh", "-c", &script])
            .write_oci_archive(&archive, "v1");
        let source = format!("oci-archive:{}", archive.display());
        user_data.push_str(&format!(
            "[settings.bootstrap-containers.{name}]\nsource = \"{source}\"\nmode = \"always\"\nessential = true\n\n"
        ));
        sources.push(source);
    }
    let archive_bytes =
        std::fs::metadata(work.path().join(format!("{}.tar", NAMES[0]))).map_or(0, |m| m.len());
    let three = work.path().join("user-data-three.toml");
    std::fs::write(&three, &user_data).expect("user-data");
    let none = work.path().join("user-data-none.toml");
    std::fs::write(&none, "[settings]\nmotd = \"boot benchmark\"\n").expect("user-data");

    let mut bench = Bench {
        containerd: &containerd,
        work: work.path(),
        images: Vec::new(),
        ctr_extra: std::env::var("KEEL_BENCH_CTR_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        logs: std::env::var_os("KEEL_BENCH_KEEP_LOG").map(|_| String::new()),
    };

    // Warm-up, discarded: keeld imports and unpacks the images; ctr then runs the same
    // image records.
    let warm_keeld = bench.keeld_boot("warm-up", &three, &NAMES);
    let listed = containerd.ctr_ok(&["images", "ls", "-q"]);
    bench.images = sources
        .iter()
        .map(|source| {
            listed
                .lines()
                .map(str::trim)
                .find(|name| name == source)
                .unwrap_or_else(|| panic!("keeld made no image named {source}; images:\n{listed}"))
                .to_owned()
        })
        .collect();
    let warm_ctr = bench.ctr_three();
    let _ = bench.keeld_boot("warm-up, no bootstrap container", &none, &[]);
    let _ = bench.ctr_nothing();

    // Interleaved, alternating which side goes first.
    let mut keeld_samples: Vec<BootSample> = Vec::with_capacity(iters);
    let mut empty_samples: Vec<BootSample> = Vec::with_capacity(iters);
    let mut ctr_samples = Vec::with_capacity(iters);
    let mut nothing_samples = Vec::with_capacity(iters);
    for i in 0..iters {
        let label = format!("iteration {i}");
        if i % 2 == 0 {
            keeld_samples.push(bench.keeld_boot(&label, &three, &NAMES));
            ctr_samples.push(bench.ctr_three());
            empty_samples.push(bench.keeld_boot(&format!("{label}, empty"), &none, &[]));
            nothing_samples.push(bench.ctr_nothing());
        } else {
            ctr_samples.push(bench.ctr_three());
            keeld_samples.push(bench.keeld_boot(&label, &three, &NAMES));
            nothing_samples.push(bench.ctr_nothing());
            empty_samples.push(bench.keeld_boot(&format!("{label}, empty"), &none, &[]));
        }
    }

    let keeld_stats = Stats::of(&keeld_samples.iter().map(|s| s.wall).collect::<Vec<_>>());
    let record_stats = Stats::of_ms(
        &keeld_samples
            .iter()
            .map(|s| s.record_ms)
            .collect::<Vec<_>>(),
    );
    let bootstrap_stats = Stats::of_ms(
        &keeld_samples
            .iter()
            .map(|s| s.bootstrap_ms)
            .collect::<Vec<_>>(),
    );
    let empty_stats = Stats::of(&empty_samples.iter().map(|s| s.wall).collect::<Vec<_>>());
    let ctr_stats = Stats::of(&ctr_samples);
    let nothing_stats = Stats::of(&nothing_samples);
    // Each step's median over the three-container boots, in the record's order.
    let mut step_order: Vec<String> = Vec::new();
    let mut by_step: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for sample in &keeld_samples {
        for (name, d) in &sample.steps {
            if !step_order.contains(name) {
                step_order.push(name.clone());
            }
            by_step.entry(name.clone()).or_default().push(*d);
        }
    }
    let step_stats: Vec<(String, Stats)> = step_order
        .iter()
        .map(|name| (name.clone(), Stats::of_ms(&by_step[name])))
        .collect();

    let ratio = if ctr_stats.median > 0.0 {
        keeld_stats.median / ctr_stats.median
    } else {
        0.0
    };
    let overhead = keeld_stats.median - ctr_stats.median;
    let overhead_pct = (ratio - 1.0) * 100.0;
    let within = overhead_pct < TARGET_PCT;

    if let (Some(path), Some(logs)) = (std::env::var_os("KEEL_BENCH_KEEP_LOG"), &bench.logs) {
        std::fs::write(&path, logs).expect("write keeld's logs");
    }
    drop(bench);
    drop(containerd);
    drop(work);
    let secs = total.elapsed().as_secs_f64();

    // The table.
    println!();
    println!(
        "keeld boot benchmark — {} bootstrap containers, {iters} samples each, interleaved, \
         {} CPUs, {SNAPSHOTTER}, busybox images ({archive_bytes} B archives)",
        NAMES.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    let header = format!(
        "{:<58} {:>9} {:>9} {:>9}",
        "figure", "median ms", "min ms", "max ms"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    let row = |label: &str, s: &Stats| {
        println!(
            "{:<58} {:>9.1} {:>9.1} {:>9.1}",
            label, s.median, s.min, s.max
        );
    };
    row(
        "keeld: spawn → GET /boot configured (3 containers)",
        &keeld_stats,
    );
    row("  boot record duration-ms", &record_stats);
    row("  sum of the 3 bootstrap-container steps", &bootstrap_stats);
    row("ctr: 3 × `ctr run --rm`, one after another", &ctr_stats);
    row(
        "keeld: spawn → configured, no bootstrap container",
        &empty_stats,
    );
    row(
        "ctr: 3 × `ctr version` (ctr's fixed cost, no container)",
        &nothing_stats,
    );
    println!(
        "{:<58} {:>9.1}",
        "keeld warm-up boot (import + unpack, discarded)",
        ms(warm_keeld.wall)
    );
    println!(
        "{:<58} {:>9.1}",
        "ctr warm-up (images unpacked, discarded)",
        ms(warm_ctr)
    );
    println!();
    println!("keeld boot steps (3 containers), duration-ms from the record:");
    for (name, s) in &step_stats {
        row(&format!("  {name}"), s);
    }
    println!();
    println!(
        "\"Own run time\" of the containers = the ctr figure (3 × `ctr run --rm`, which \
         includes ctr's own process start, as the last ctr row shows)."
    );
    println!("{:<58} {:>9.2}", "keeld / ctr (medians)", ratio);
    println!(
        "{:<58} {:>9.1} ms ({overhead_pct:+.1}%; target < {TARGET_PCT}%: {})",
        "keeld overhead (keeld boot − ctr, medians)",
        overhead,
        if within { "met" } else { "NOT met" }
    );
    println!("{:<58} {:>9.1} s", "whole benchmark", secs);
    println!();
    println!(
        "BENCH_JSON {}",
        json!({
            "iterations": iters,
            "bootstrap_containers": NAMES.len(),
            "keeld_boot_ms": keeld_stats.json(),
            "keeld_record_duration_ms": record_stats.json(),
            "keeld_bootstrap_steps_ms": bootstrap_stats.json(),
            "keeld_boot_no_containers_ms": empty_stats.json(),
            "ctr_three_ms": ctr_stats.json(),
            "ctr_version_three_ms": nothing_stats.json(),
            "keeld_steps_ms": step_stats
                .iter()
                .map(|(name, s)| (name.clone(), s.json()))
                .collect::<serde_json::Map<String, Value>>(),
            "warmup_ms": {"keeld": ms(warm_keeld.wall), "ctr": ms(warm_ctr)},
            "ratio_keeld_to_ctr": ratio,
            "overhead_ms": overhead,
            "overhead_pct": overhead_pct,
            "target_pct": TARGET_PCT,
            "within_target": within,
            "snapshotter": SNAPSHOTTER,
            "poll_us": POLL.as_micros() as u64,
            "total_secs": secs,
        })
    );
}
