//! Apply benchmark: how long after a commit the rendered file is there, beyond the
//! durable commit itself, and how long rendering every configuration file takes.
//!
//! keeld runs as on a host: state on disk (the temporary directory's file system), the
//! render root and the runtime directory, where the apply journal lives, on tmpfs
//! (`/dev/shm`).
//!
//! Run with `packaging/dev/bench.sh` (it builds the release binaries first).
//! `KEEL_BENCH_COMMITS` sets the number of commits per row (default 1000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keel_agent::apply::render::Templates;
use keel_agent::apply::ServicesMeta;
use keel_e2e::updates::SlotHost;
use keel_e2e::{cpu_time, raw_request, repo_root, Keeld, KeeldOptions};
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn summary(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0),
    )
}

/// A full settings set touching every group that has a template.
fn full_settings() -> serde_json::Value {
    json!({
        "motd": "Welcome to the benchmark",
        "ntp": {"time-servers": ["169.254.169.123", "2.amazon.pool.ntp.org", "ntp://time.example.com"]},
        "network": {"hostname": "node-1.example.com", "https-proxy": "proxy.example.com:3128",
                    "no-proxy": ["10.0.0.0/8", ".internal.example.com"]},
        "dns": {"name-servers": ["10.0.0.2", "10.0.0.3"], "search-list": ["example.com", "internal.example.com"]},
        "container-registry": {
            "mirrors": [{"registry": "*", "endpoint": ["https://mirror.example.com"]},
                        {"registry": "docker.io", "endpoint": ["https://dockerhub-mirror.example.com"]}],
            "credentials": [{"registry": "registry.example.com", "username": "u", "password": "p"}]
        },
        "container-runtime": {"max-container-log-line-size": 16384, "max-concurrent-downloads": 4,
                              "enable-unprivileged-icmp": true, "enable-unprivileged-ports": true},
        "kernel": {"sysctl": {"vm.max_map_count": "262144", "net.core.somaxconn": "1024",
                              "user.max_user_namespaces": "16384"}},
        "kubernetes": {
            "api-server": "https://k8s.example.com", "cluster-name": "bench",
            "cluster-certificate": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJnakNDQVNtZ0F3SUJBZ0lVS0NuUFdjQ0sxR3ZGYm0wcmVIZmZtbEJ2c2N3d0NnWUlLb1pJemowRUF3SXcKRmpFVU1CSUdBMVVFQXd3TGEyVmxiQ0IwWlhOMElHRXdJQmNOTWpZeE1qQTFNVEl3TWpRMldoZ1BNakV5TmpFeApNVEV4TWpBeU5EWmFNQll4RkRBU0JnTlZCQU1NQzJ0bFpXd2dkR1Z6ZENCaE1Ga3dFd1lIS29aSXpqMENBUVlJCktvWkl6ajBEQVFjRFFnQUVtZEZvRGE4NHVkKzF5MzRlbFpSL0UyWlpkcFVsOWdZcDhLNFUvRjBVNE94MEU1UjUKSGY5eGJacXN2NWt2czZNWWt5V1V2anJxb2MvcGR6d3FHeFhNZ0tOVE1GRXdIUVlEVlIwT0JCWUVGT0xocFpCRAo0aFBVOW9VWGtEU0lKaEhhNVBCWk1COEdBMVVkSXdRWU1CYUFGT0xocFpCRDRoUFU5b1VYa0RTSUpoSGE1UEJaCk1BOEdBMVVkRXdFQi93UUZNQU1CQWY4d0NnWUlLb1pJemowRUF3SURSd0F3UkFJZ0N4ZGp2K0FrY2U4Q1FYai8KYXhuTkFHQ0l6bDE3TVNRQmZCU2Z4dHJzMVNVQ0lIcC8yZjNxajlITFB4aXAxZnF6bThRUjZTQ2RjcHhxL3hiYQpTMHJ5blhkMgotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==",
            "cluster-dns-ip": ["10.100.0.10"], "max-pods": 110,
            "node-labels": {"role": "bench", "team": "keel"},
            "node-taints": {"dedicated": ["bench:NoSchedule"]},
            "eviction-hard": {"memory.available": "15%"},
            "kube-reserved": {"cpu": "100m", "memory": "512Mi"},
            "system-reserved": {"cpu": "100m", "memory": "256Mi"},
            "credential-providers": {"ecr-credential-provider": {"enabled": true, "cache-duration": "30m",
                "image-patterns": ["*.dkr.ecr.us-east-2.amazonaws.com"]}}
        },
        "pki": {"bundle": {"trusted": true,
            "data": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJnakNDQVNtZ0F3SUJBZ0lVS0NuUFdjQ0sxR3ZGYm0wcmVIZmZtbEJ2c2N3d0NnWUlLb1pJemowRUF3SXcKRmpFVU1CSUdBMVVFQXd3TGEyVmxiQ0IwWlhOMElHRXdJQmNOTWpZeE1qQTFNVEl3TWpRMldoZ1BNakV5TmpFeApNVEV4TWpBeU5EWmFNQll4RkRBU0JnTlZCQU1NQzJ0bFpXd2dkR1Z6ZENCaE1Ga3dFd1lIS29aSXpqMENBUVlJCktvWkl6ajBEQVFjRFFnQUVtZEZvRGE4NHVkKzF5MzRlbFpSL0UyWlpkcFVsOWdZcDhLNFUvRjBVNE94MEU1UjUKSGY5eGJacXN2NWt2czZNWWt5V1V2anJxb2MvcGR6d3FHeFhNZ0tOVE1GRXdIUVlEVlIwT0JCWUVGT0xocFpCRAo0aFBVOW9VWGtEU0lKaEhhNVBCWk1COEdBMVVkSXdRWU1CYUFGT0xocFpCRDRoUFU5b1VYa0RTSUpoSGE1UEJaCk1BOEdBMVVkRXdFQi93UUZNQU1CQWY4d0NnWUlLb1pJemowRUF3SURSd0F3UkFJZ0N4ZGp2K0FrY2U4Q1FYai8KYXhuTkFHQ0l6bDE3TVNRQmZCU2Z4dHJzMVNVQ0lIcC8yZjNxajlITFB4aXAxZnF6bThRUjZTQ2RjcHhxL3hiYQpTMHJ5blhkMgotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg=="}},
        "boot": {"kernel-parameters": {"console": ["tty0", "ttyS0,115200n8"]}}
    })
}

/// Commits `motd` `n` times through `commit_path`; when `check_file` is set, each
/// sample ends only once the rendered /etc/motd holds the new value.
fn commit_loop(
    keeld: &Keeld,
    n: usize,
    commit_path: &str,
    check_file: bool,
    tag: &str,
) -> Vec<Duration> {
    let motd = keeld.render_root().join("etc/motd");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let value = format!("{tag} {i}");
        let body = json!({ "motd": value }).to_string();
        let started = Instant::now();
        let r = raw_request(
            &keeld.socket,
            "PATCH",
            "/settings?tx=bench",
            Some(body.as_bytes()),
        );
        assert_eq!(r.status, 204, "{}", r.text());
        let r = raw_request(
            &keeld.socket,
            "POST",
            &format!("{commit_path}?tx=bench"),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        if check_file {
            loop {
                if std::fs::read_to_string(&motd).is_ok_and(|m| m.contains(&value)) {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        samples.push(started.elapsed());
    }
    samples
}

/// Clients committing and applying at once.
const CLIENTS: usize = 8;

/// `CLIENTS` threads, each making `n / CLIENTS` PATCH + commit_and_apply cycles on its
/// own transaction. Answers cycles per second and applies per commit (from the apply
/// ids keeld answers with: concurrent requests share an apply).
fn concurrent_commit_and_apply(keeld: &Keeld, n: usize) -> (f64, f64) {
    let per_client = (n / CLIENTS).max(1);
    let started = Instant::now();
    let ids: Vec<Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                scope.spawn(move || {
                    let mut ids = Vec::new();
                    for i in 0..per_client {
                        let tx = format!("/settings?tx=c{client}");
                        let body = json!({ "motd": format!("client {client} cycle {i}") });
                        let body = body.to_string();
                        let patched =
                            raw_request(&keeld.socket, "PATCH", &tx, Some(body.as_bytes()));
                        assert_eq!(patched.status, 204);
                        let commit = format!("/tx/commit_and_apply?tx=c{client}");
                        let answer = raw_request(&keeld.socket, "POST", &commit, None);
                        assert_eq!(answer.status, 200);
                        let id = answer
                            .headers
                            .iter()
                            .find(|(name, _)| name.eq_ignore_ascii_case("x-keel-apply-id"))
                            .map(|(_, value)| value.clone())
                            .expect("an apply id");
                        ids.push(id);
                    }
                    ids
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let commits = ids.iter().map(Vec::len).sum::<usize>();
    let applies = ids
        .into_iter()
        .flatten()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    (commits as f64 / elapsed, applies as f64 / commits as f64)
}

fn main() {
    let n: usize = std::env::var("KEEL_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // The boot parameters of the full settings go to loader entries: slots and an ESP as
    // files, through the real keel-slot-writer.
    let host_dir = tempfile::tempdir().unwrap();
    let host = SlotHost::create(host_dir.path(), 1 << 20, 1 << 16);
    // As on a host: the render root and the runtime directory (the apply journal) on
    // tmpfs, the state directory on disk.
    let keeld = Keeld::start_with(KeeldOptions {
        extra_args: vec!["--update-writer-command".into(), host.writer_command()],
        tmpfs_render: true,
        ..KeeldOptions::default()
    });
    // Warm up, and make the model realistic.
    let body = full_settings().to_string();
    raw_request(
        &keeld.socket,
        "PATCH",
        "/settings?tx=seed",
        Some(body.as_bytes()),
    );
    let seeded = raw_request(&keeld.socket, "POST", "/tx/commit_and_apply?tx=seed", None);
    assert_eq!(seeded.status, 200, "{}", seeded.text());
    let log = raw_request(&keeld.socket, "GET", "/apply/log", None).json();
    assert_eq!(log["applies"][0]["success"], true, "{log}");

    // The seed's apply is over, but its host-container and boot work may still run: let
    // it settle so that the CPU figures below are the rows' own.
    std::thread::sleep(Duration::from_secs(2));
    // keeld's CPU per cycle of each 1-client row (user + system, all its threads).
    let cpu_per_cycle = |cpu_before: Duration| {
        cpu_time(keeld.pid())
            .saturating_sub(cpu_before)
            .as_secs_f64()
            * 1e6
            / n as f64
    };
    let before = cpu_time(keeld.pid());
    let commit = summary(commit_loop(&keeld, n, "/tx/commit", false, "c"));
    let commit_cpu = cpu_per_cycle(before);
    let before = cpu_time(keeld.pid());
    let applied = summary(commit_loop(&keeld, n, "/tx/commit_and_apply", true, "a"));
    let applied_cpu = cpu_per_cycle(before);

    let (concurrent_rate, concurrent_applies) = concurrent_commit_and_apply(&keeld, n);

    let templates = Templates::load(&repo_root().join("packaging/templates")).unwrap();
    let meta = ServicesMeta::load(&repo_root().join("packaging/services.toml")).unwrap();
    let settings = settings_model::validate(&full_settings()).unwrap();
    let os = json!({"arch": "x86_64", "build_id": "bench", "pretty_name": "Keel", "variant_id": "bench", "version_id": "0"});
    let singles: Vec<_> = meta
        .configuration_files
        .values()
        .filter(|f| templates.render(&f.template_path, &settings, &os).is_ok())
        .map(|f| f.template_path.clone())
        .collect();
    let mut renders = Vec::new();
    let mut bytes = 0;
    for _ in 0..500 {
        let started = Instant::now();
        let context = Templates::context(&settings, &os);
        bytes = 0;
        for template in &singles {
            bytes += templates.render_in(template, &context).unwrap().len();
        }
        renders.push(started.elapsed());
    }
    let render = summary(renders);

    println!();
    println!("keeld apply benchmark — {n} commits per row, motd, 2 CPUs");
    println!();
    println!(
        "{:<52} {:>9} {:>9} {:>9}",
        "figure", "p50 ms", "p99 ms", "max ms"
    );
    println!("{}", "-".repeat(82));
    println!(
        "{:<52} {:>9.3} {:>9.3} {:>9.3}",
        "PATCH + POST /tx/commit (durable commit)", commit.0, commit.1, commit.2
    );
    println!(
        "{:<52} {:>9.3} {:>9.3} {:>9.3}",
        "PATCH + commit_and_apply → /etc/motd rendered", applied.0, applied.1, applied.2
    );
    println!(
        "{:<52} {:>9.3} {:>9} {:>9}",
        "  beyond the durable commit (p50 difference)",
        applied.0 - commit.0,
        "",
        ""
    );
    println!(
        "{:<52} {:>9.0} µs (commit), {:.0} µs (commit_and_apply)",
        "keeld CPU per 1-client cycle (new connection each)", commit_cpu, applied_cpu
    );
    println!(
        "{:<52} {:>9.0} cycles/s, {:.2} applies per commit",
        format!("{CLIENTS} clients, PATCH + commit_and_apply each"),
        concurrent_rate,
        concurrent_applies
    );
    println!(
        "{:<52} {:>9.3} {:>9.3} {:>9.3}",
        format!(
            "render all {} files from a full settings set ({bytes} B)",
            singles.len()
        ),
        render.0,
        render.1,
        render.2
    );
    println!(
        "BENCH_JSON {}",
        json!({
            "commits": n,
            "commit_ms": {"p50": commit.0, "p99": commit.1, "max": commit.2},
            "keeld_cpu_us_per_cycle": {"commit": commit_cpu, "commit_and_apply": applied_cpu},
            "commit_to_file_ms": {"p50": applied.0, "p99": applied.1, "max": applied.2},
            "beyond_commit_p50_ms": applied.0 - commit.0,
            "concurrent": {"clients": CLIENTS, "cycles_per_sec": concurrent_rate, "applies_per_commit": concurrent_applies},
            "full_render_ms": {"p50": render.0, "p99": render.1, "max": render.2, "files": singles.len(), "bytes": bytes},
        })
    );
}
