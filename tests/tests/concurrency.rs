//! 32 clients committing at once: no lost update, no 5xx, history complete; reads are
//! served while commits are in flight.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use keel_e2e::{Keeld, KeeldOptions};
use serde_json::json;

const CLIENTS: usize = 32;
const COMMITS_EACH: usize = 5;

#[test]
fn concurrent_commits_are_all_kept() {
    let keeld = Keeld::start_with(KeeldOptions {
        history: 1000,
        ..Default::default()
    });
    let socket = keeld.socket.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let client = apiclient::Client::new(socket.clone());
            tasks.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                for i in 0..COMMITS_EACH {
                    let tx = format!("client-{c}-{i}");
                    let body = json!({"kernel": {"sysctl": {format!("keel.c{c}"): i.to_string()}}});
                    let r = client
                        .request(
                            http::Method::PATCH,
                            &format!("/settings?tx={tx}"),
                            Some(body.to_string().into_bytes()),
                        )
                        .await
                        .unwrap();
                    statuses.push(r.status);
                    let r = client
                        .request(http::Method::POST, &format!("/tx/commit?tx={tx}"), None)
                        .await
                        .unwrap();
                    statuses.push(r.status);
                    let r = client
                        .request(http::Method::GET, "/settings", None)
                        .await
                        .unwrap();
                    statuses.push(r.status);
                }
                statuses
            }));
        }
        for task in tasks {
            for status in task.await.unwrap() {
                assert!(status < 300, "status {status}");
            }
        }
    });
    let live = keeld.raw("GET", "/settings", None).json();
    for c in 0..CLIENTS {
        assert_eq!(
            live["kernel"]["sysctl"][format!("keel.c{c}")],
            (COMMITS_EACH - 1).to_string(),
            "client {c}'s last write"
        );
    }
    let history = keeld.raw("GET", "/history", None).json();
    let txs: BTreeSet<String> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["tx"].as_str().unwrap().to_owned())
        .collect();
    for c in 0..CLIENTS {
        for i in 0..COMMITS_EACH {
            assert!(
                txs.contains(&format!("client-{c}-{i}")),
                "history lacks client-{c}-{i}"
            );
        }
    }
    let generations: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(generations.len(), CLIENTS * COMMITS_EACH + 1);
    assert!(
        generations.windows(2).all(|w| w[0] == w[1] + 1),
        "generations are contiguous"
    );
}
