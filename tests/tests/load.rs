//! 64 concurrent clients mixing reads and commits for a fixed number of operations:
//! zero 5xx, zero lost or duplicated commits, history complete. Prints throughput and
//! latency percentiles (figures, not assertions: the machine is shared).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_e2e::{Keeld, KeeldOptions};
use serde_json::json;

const CLIENTS: usize = 64;
const OPS_EACH: usize = 40;
/// One operation in four is a commit (PATCH + commit); the rest are reads.
const COMMIT_EVERY: usize = 4;

#[test]
fn sixty_four_clients_mixing_reads_and_commits() {
    let keeld = Keeld::start_with(KeeldOptions {
        history: 2000,
        ..KeeldOptions::default()
    });
    let socket = keeld.socket.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let results = runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let client = apiclient::Client::new(socket.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let mut committed = Vec::new();
                for i in 0..OPS_EACH {
                    let t0 = Instant::now();
                    let (kind, status) = if i % COMMIT_EVERY == 0 {
                        let tx = format!("load-{c}-{i}");
                        let body =
                            json!({"kernel": {"sysctl": {format!("keel.load{c}"): i.to_string()}}});
                        let r = client
                            .request(
                                http::Method::PATCH,
                                &format!("/settings?tx={tx}"),
                                Some(body.to_string().into_bytes()),
                            )
                            .await
                            .expect("patch");
                        let status = if r.status == 204 {
                            client
                                .request(http::Method::POST, &format!("/tx/commit?tx={tx}"), None)
                                .await
                                .expect("commit")
                                .status
                        } else {
                            r.status
                        };
                        if status == 200 {
                            committed.push(tx);
                        }
                        ("commit", status)
                    } else {
                        let target = [
                            "/settings",
                            "/",
                            "/settings?keys=settings.motd",
                            "/boot",
                            "/containers",
                        ][i % 5];
                        let r = client
                            .request(http::Method::GET, target, None)
                            .await
                            .expect("read");
                        ("read", r.status)
                    };
                    out.push((kind, status, t0.elapsed()));
                }
                (out, committed)
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.push(task.await.expect("client"));
        }
        all
    });
    let elapsed = started.elapsed();

    let mut latencies: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut committed = Vec::new();
    for (ops, txs) in results {
        for (kind, status, latency) in ops {
            assert!(status < 500, "{kind}: status {status}");
            assert!(status < 300, "{kind}: status {status}");
            latencies.entry(kind).or_default().push(latency);
        }
        committed.extend(txs);
    }
    let expected_commits = CLIENTS * OPS_EACH.div_ceil(COMMIT_EVERY);
    assert_eq!(
        committed.len(),
        expected_commits,
        "every commit acknowledged"
    );

    // History: each acknowledged transaction exactly once.
    let history = keeld.raw("GET", "/history?limit=5000", None).json();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for generation in history.as_array().into_iter().flatten() {
        if let Some(tx) = generation["tx"].as_str() {
            *seen.entry(tx.to_owned()).or_default() += 1;
        }
    }
    for tx in &committed {
        assert_eq!(seen.get(tx), Some(&1), "{tx} in history exactly once");
    }
    // The live value of each client is its last commit.
    let live = keeld.raw("GET", "/settings", None).json();
    let last = ((OPS_EACH - 1) / COMMIT_EVERY * COMMIT_EVERY).to_string();
    for c in 0..CLIENTS {
        assert_eq!(
            live["kernel"]["sysctl"][format!("keel.load{c}")],
            last.as_str()
        );
    }

    let total: usize = latencies.values().map(Vec::len).sum();
    println!(
        "load: {CLIENTS} clients, {total} operations ({expected_commits} commits) in {:.2} s = {:.0} ops/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    for (kind, mut values) in latencies {
        values.sort();
        let pct = |p: f64| values[((values.len() as f64 - 1.0) * p) as usize];
        println!(
            "  {kind:<6} n={:<5} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            values.len(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            pct(1.0).as_secs_f64() * 1e3
        );
    }
}
