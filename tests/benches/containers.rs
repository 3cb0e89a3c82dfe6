//! Host-container start latency: keeld next to containerd's own `ctr run`, on the same
//! private containerd, the same image and the same bind mount, interleaved in one run.
//!
//! A sample ends when the container has created its marker file. For keeld it starts
//! when `apiclient set host-containers.bench.enabled=true` is run (the image source was
//! committed earlier, while disabled); for the baseline when `ctr run -d` is spawned. One
//! warm-up start of each comes first (it imports and unpacks the image) and is reported
//! apart.
//!
//! Run with `packaging/dev/bench.sh` (it builds the release binaries first). Needs root,
//! containerd, runc and busybox-static. Prints a table and, last, one `BENCH_JSON {...}`
//! line for tooling. Not a pass/fail test.
//!
//! `KEEL_BENCH_ITERS` (default 7) sets the number of starts of each kind;
//! `KEEL_BENCH_CTR_ARGS` adds options to `ctr run` (e.g. `--null-io`, or `--log-uri
//! binary://...` to give it keeld's logger); `KEEL_BENCH_KEEP_LOG=<path>` copies keeld's log there at the end (with
//! `KEELD_LOG=debug` to see each step).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_e2e::containerd::Containerd;
use keel_e2e::image::ImageBuilder;
use keel_e2e::{Keeld, KeeldOptions};
use serde_json::{json, Value};

/// The host container's name in the settings (keeld's container ID is `host-bench`).
const NAME: &str = "bench";
/// The container ID used with `ctr run`.
const CTR_ID: &str = "ctr-bench";
/// Where both containers see their persistent directory.
const MOUNT_POINT: &str = "/.bottlerocket/host-containers/bench";
/// The snapshotter keeld always uses; `ctr run` is given the same.
const SNAPSHOTTER: &str = "overlayfs";
/// How often the marker file is looked for.
const POLL: Duration = Duration::from_micros(200);
/// Give up on one start (or stop) after this long.
const TIMEOUT: Duration = Duration::from_secs(60);
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
    fn of(samples: &[Duration]) -> Stats {
        let mut sorted: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
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
            samples: samples.iter().map(|d| ms(*d)).collect(),
        }
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
        "the containers benchmark runs containers and needs root"
    );
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(6000);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    &text[start..]
}

/// Everything one side of the comparison needs.
struct Bench<'a> {
    containerd: &'a Containerd,
    keeld: &'a Keeld,
    /// The marker the keeld-run container creates.
    keeld_marker: PathBuf,
    /// The directory bind-mounted into the ctr-run container, and its marker.
    ctr_dir: PathBuf,
    ctr_marker: PathBuf,
    /// The image record keeld made (named after the `source` setting).
    image: String,
    /// More `ctr run` options, from `KEEL_BENCH_CTR_ARGS`.
    ctr_extra: Vec<String>,
}

impl Bench<'_> {
    fn apiclient_ok(&self, args: &[&str]) {
        let out = self.keeld.apiclient(args);
        assert!(
            out.status.success(),
            "apiclient {args:?} failed: {}\nkeeld log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.keeld.log())
        );
    }

    /// Whether `GET /containers` lists the bench host container.
    fn keeld_lists_it(&self) -> bool {
        let r = self.keeld.raw("GET", "/containers", None);
        assert_eq!(r.status, 200, "GET /containers: {}", r.text());
        r.json()
            .as_array()
            .is_some_and(|all| all.iter().any(|s| s["name"] == NAME && s["kind"] == "host"))
    }

    /// `apiclient set host-containers.bench.enabled=true` → marker file.
    fn keeld_start(&self) -> Duration {
        let _ = std::fs::remove_file(&self.keeld_marker);
        std::thread::scope(|scope| {
            let began = Instant::now();
            let mut client = Some(scope.spawn(|| {
                self.keeld
                    .apiclient(&["set", &format!("host-containers.{NAME}.enabled=true")])
            }));
            let check = |out: std::process::Output| {
                assert!(
                    out.status.success(),
                    "apiclient set enabled=true failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            let elapsed = loop {
                if self.keeld_marker.exists() {
                    break began.elapsed();
                }
                if client.as_ref().is_some_and(|c| c.is_finished()) {
                    check(
                        client
                            .take()
                            .expect("client")
                            .join()
                            .expect("apiclient thread"),
                    );
                }
                assert!(
                    began.elapsed() < TIMEOUT,
                    "keeld did not start the container within {TIMEOUT:?}; status: {}\nkeeld log:\n{}",
                    self.keeld.raw("GET", "/containers", None).text(),
                    tail(&self.keeld.log())
                );
                std::thread::sleep(POLL);
            };
            if let Some(client) = client {
                check(client.join().expect("apiclient thread"));
            }
            elapsed
        })
    }

    /// `apiclient set host-containers.bench.enabled=false`, until keeld no longer lists it.
    fn keeld_stop(&self) {
        self.apiclient_ok(&["set", &format!("host-containers.{NAME}.enabled=false")]);
        let began = Instant::now();
        while self.keeld_lists_it() {
            assert!(
                began.elapsed() < TIMEOUT,
                "keeld did not remove the container within {TIMEOUT:?}\nkeeld log:\n{}",
                tail(&self.keeld.log())
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.keeld_marker);
    }

    /// Spawning `ctr run -d` → marker file.
    fn ctr_start(&self) -> Duration {
        let _ = std::fs::remove_file(&self.ctr_marker);
        let mount = format!(
            "type=bind,src={},dst={MOUNT_POINT},options=rbind:rw",
            self.ctr_dir.display()
        );
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.containerd.socket())
            .args(["--namespace", self.containerd.namespace()])
            .args(["run", "-d", "--snapshotter", SNAPSHOTTER, "--mount", &mount])
            .args(&self.ctr_extra)
            .args([self.image.as_str(), CTR_ID])
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let began = Instant::now();
        let mut child = Some(command.spawn().expect("spawn ctr run"));
        let check = |child: std::process::Child| {
            let out = child.wait_with_output().expect("wait for ctr run");
            assert!(
                out.status.success(),
                "ctr run failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let elapsed = loop {
            if self.ctr_marker.exists() {
                break began.elapsed();
            }
            let exited = child
                .as_mut()
                .is_some_and(|c| c.try_wait().expect("try_wait ctr").is_some());
            if exited {
                check(child.take().expect("ctr child"));
            }
            assert!(
                began.elapsed() < TIMEOUT,
                "ctr run did not start the container within {TIMEOUT:?}"
            );
            std::thread::sleep(POLL);
        };
        if let Some(child) = child {
            check(child);
        }
        elapsed
    }

    /// Kill, delete the task, delete the container (and its snapshot).
    fn ctr_stop(&self) {
        self.containerd
            .ctr_ok(&["task", "kill", "-s", "KILL", CTR_ID]);
        let began = Instant::now();
        loop {
            let tasks = self.containerd.ctr_ok(&["task", "ls"]);
            let stopped = tasks.lines().all(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.first() != Some(&CTR_ID) || fields.last() == Some(&"STOPPED")
            });
            if stopped {
                break;
            }
            assert!(
                began.elapsed() < TIMEOUT,
                "ctr task {CTR_ID} did not stop within {TIMEOUT:?}: {tasks}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.containerd.ctr_ok(&["task", "rm", CTR_ID]);
        self.containerd.ctr_ok(&["container", "rm", CTR_ID]);
        let snapshots = self
            .containerd
            .ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
        if snapshots
            .lines()
            .any(|l| l.split_whitespace().next() == Some(CTR_ID))
        {
            self.containerd
                .ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "rm", CTR_ID]);
        }
        let _ = std::fs::remove_file(&self.ctr_marker);
    }
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
    let archive = work.path().join("bench.tar");
    let script = format!("touch {MOUNT_POINT}/started; exec sleep 100000");
    let info = ImageBuilder::busybox()
        .cmd(&["/bin/sh", "-c", &script])
        .write_oci_archive(&archive, "v1");
    let source = format!("oci-archive:{}", archive.display());

    let keeld = Keeld::start_with(KeeldOptions {
        containerd: Some((
            containerd.socket().to_path_buf(),
            containerd.namespace().to_owned(),
        )),
        // `sleep` as PID 1 ignores SIGTERM: do not wait 10 s for it on every stop.
        extra_args: vec!["--stop-grace".to_owned(), "100ms".to_owned()],
        ..KeeldOptions::default()
    });

    let ctr_dir = work.path().join("ctr-persistent");
    std::fs::create_dir(&ctr_dir).expect("create the ctr bind-mount source");
    let mut bench = Bench {
        containerd: &containerd,
        keeld: &keeld,
        keeld_marker: keeld
            .persistent_dir()
            .join("host-containers")
            .join(NAME)
            .join("started"),
        ctr_marker: ctr_dir.join("started"),
        ctr_dir,
        image: String::new(),
        ctr_extra: std::env::var("KEEL_BENCH_CTR_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    };

    // The source goes in first, in a commit of its own, while the container is disabled.
    bench.apiclient_ok(&[
        "set",
        &format!("host-containers.{NAME}.enabled=false"),
        &format!("host-containers.{NAME}.source={source}"),
    ]);
    assert!(!bench.keeld_lists_it(), "disabled container is listed");

    // Warm-up: keeld imports and unpacks the image; ctr then runs the same image record.
    let keeld_first = bench.keeld_start();
    bench.keeld_stop();
    let images = containerd.ctr_ok(&["images", "ls", "-q"]);
    bench.image = images
        .lines()
        .map(str::trim)
        .find(|name| *name == source)
        .unwrap_or_else(|| panic!("keeld made no image named {source}; images:\n{images}"))
        .to_owned();
    let ctr_first = bench.ctr_start();
    bench.ctr_stop();

    // Interleaved, alternating which goes first.
    let mut keeld_samples = Vec::with_capacity(iters);
    let mut ctr_samples = Vec::with_capacity(iters);
    for i in 0..iters {
        if i % 2 == 0 {
            keeld_samples.push(bench.keeld_start());
            bench.keeld_stop();
            ctr_samples.push(bench.ctr_start());
            bench.ctr_stop();
        } else {
            ctr_samples.push(bench.ctr_start());
            bench.ctr_stop();
            keeld_samples.push(bench.keeld_start());
            bench.keeld_stop();
        }
    }
    let keeld_stats = Stats::of(&keeld_samples);
    let ctr_stats = Stats::of(&ctr_samples);
    let ratio = if ctr_stats.median > 0.0 {
        keeld_stats.median / ctr_stats.median
    } else {
        0.0
    };
    let overhead = keeld_stats.median - ctr_stats.median;
    let overhead_pct = (ratio - 1.0) * 100.0;
    let within = overhead_pct < TARGET_PCT;

    if let Some(path) = std::env::var_os("KEEL_BENCH_KEEP_LOG") {
        std::fs::write(&path, keeld.log()).expect("write keeld's log");
    }
    drop(bench);
    drop(keeld);
    drop(containerd);
    let secs = total.elapsed().as_secs_f64();

    // The table.
    println!();
    println!(
        "keeld host-container start benchmark — {iters} starts each, interleaved, {} CPUs, \
         {SNAPSHOTTER}, busybox image {} (one {} B layer)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        &info.manifest_digest[..19.min(info.manifest_digest.len())],
        std::fs::metadata(&archive).map_or(0, |m| m.len()),
    );
    println!();
    let header = format!(
        "{:<52} {:>9} {:>9} {:>9}",
        "figure", "median ms", "min ms", "max ms"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    for (label, s) in [
        (
            "keeld: `apiclient set …enabled=true` → marker",
            &keeld_stats,
        ),
        ("ctr: `ctr run -d` spawned → marker", &ctr_stats),
    ] {
        println!(
            "{:<52} {:>9.1} {:>9.1} {:>9.1}",
            label, s.median, s.min, s.max
        );
    }
    println!(
        "{:<52} {:>9.1}",
        "keeld warm-up start (import + unpack)",
        ms(keeld_first)
    );
    println!(
        "{:<52} {:>9.1}",
        "ctr warm-up start (image already unpacked)",
        ms(ctr_first)
    );
    println!();
    println!("{:<52} {:>9.2}", "keeld / ctr (medians)", ratio);
    println!(
        "{:<52} {:>9.1} ms ({overhead_pct:+.1}%; target < {TARGET_PCT}%: {})",
        "keeld overhead (median difference)",
        overhead,
        if within { "met" } else { "NOT met" }
    );
    println!("{:<52} {:>9.1} s", "whole benchmark", secs);
    println!();
    println!(
        "BENCH_JSON {}",
        json!({
            "iterations": iters,
            "keeld_start_ms": keeld_stats.json(),
            "ctr_start_ms": ctr_stats.json(),
            "warmup_ms": {"keeld": ms(keeld_first), "ctr": ms(ctr_first)},
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
