#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde_json::json;

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn commit_is_durable_and_pending_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("a", json!({"motd": "one"})).await.unwrap();
        let changed = store.commit("a", Caller::keeld()).await.unwrap();
        assert_eq!(changed, vec!["settings.motd"]);
        store
            .patch("later", json!({"kernel": {"sysctl": {"vm.x": "1"}}}))
            .await
            .unwrap();
    });
    let store = reopen(dir.path(), 10);
    let snap = store.snapshot();
    assert_eq!(snap.live_settings(), &json!({"motd": "one"}));
    assert_eq!(snap.live().generation, 1);
    assert_eq!(snap.live().tx, "a");
    assert!(snap.pending.contains_key("later"));
}

#[test]
fn empty_commit_is_refused_and_invalid_patch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        assert!(matches!(
            store.commit("nothing", Caller::keeld()).await,
            Err(StoreError::NothingPending(_))
        ));
        let before = store.snapshot();
        let err = store
            .patch(
                "a",
                json!({"host-containers": {"admin": {"source": "NOT VALID"}}}),
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("settings.host-containers.admin.source"),
            "{err}"
        );
        let after = store.snapshot();
        assert!(after.pending.is_empty());
        assert_eq!(before.history, after.history);
    });
}

/// `creds` is `credentials` under its older name: renamed as each patch enters the
/// transaction, the later of the two wins, as any later patch does.
#[test]
fn creds_and_credentials_in_two_patches_of_one_transaction_keep_their_order() {
    let list = |user: &str| json!([{"registry": "docker.io", "username": user, "password": "p"}]);
    for (first, second, wins) in [("creds", "credentials", "b"), ("credentials", "creds", "b")] {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let store = Store::open(dir.path(), 10).unwrap();
            for (key, user) in [(first, "a"), (second, "b")] {
                store
                    .patch("t", json!({"container-registry": {key: list(user)}}))
                    .await
                    .unwrap();
            }
            store.commit("t", Caller::keeld()).await.unwrap();
            let live = store.snapshot().live_settings().clone();
            assert_eq!(
                live["container-registry"],
                json!({"credentials": list(wins)}),
                "{first} then {second}"
            );
        });
    }
    // A removal under the older name removes the list, unless the same patch gives it.
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        let registry = |value: Value| json!({"motd": "m", "container-registry": value});
        store
            .patch("t", registry(json!({"credentials": list("a")})))
            .await
            .unwrap();
        store
            .patch("t", registry(json!({"creds": null})))
            .await
            .unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
        assert_eq!(
            store.snapshot().live_settings().get("container-registry"),
            Some(&json!({})),
            "creds: null removed the list"
        );
        store
            .patch(
                "u",
                registry(json!({"creds": null, "credentials": list("b")})),
            )
            .await
            .unwrap();
        store.commit("u", Caller::keeld()).await.unwrap();
        assert_eq!(
            store.snapshot().live_settings()["container-registry"],
            json!({"credentials": list("b")})
        );
    });
}

#[test]
fn null_removes_and_patches_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store
            .patch("t", json!({"kernel": {"sysctl": {"a.b": "1", "c.d": "2"}}}))
            .await
            .unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
        // Remove the table, then put one key back: the result holds only that key.
        store
            .patch("t", json!({"kernel": {"sysctl": null}}))
            .await
            .unwrap();
        store
            .patch("t", json!({"kernel": {"sysctl": {"e.f": "3"}}}))
            .await
            .unwrap();
        let changed = store.commit("t", Caller::keeld()).await.unwrap();
        assert_eq!(
            store.snapshot().live_settings(),
            &json!({"kernel": {"sysctl": {"e.f": "3"}}})
        );
        assert_eq!(changed.len(), 3, "{changed:?}");
    });
}

#[test]
fn history_is_trimmed_and_rollback_makes_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 3).unwrap();
        for i in 0..5 {
            store
                .patch("t", json!({"motd": format!("m{i}")}))
                .await
                .unwrap();
            store.commit("t", Caller::keeld()).await.unwrap();
        }
        let snap = store.snapshot();
        let gens: Vec<u64> = snap.history.iter().map(|g| g.generation).collect();
        assert_eq!(gens, vec![3, 4, 5]);
        assert!(matches!(
            store.rollback(1, Caller::keeld()).await,
            Err(StoreError::UnknownGeneration(1))
        ));
        let changed = store.rollback(3, Caller::keeld()).await.unwrap();
        assert_eq!(changed, vec!["settings.motd"]);
        let snap = store.snapshot();
        assert_eq!(snap.live().generation, 6);
        assert_eq!(snap.live().rollback_of, Some(3));
        assert_eq!(snap.live_settings(), &json!({"motd": "m2"}));
    });
}

#[test]
fn failed_write_leaves_state_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("t", json!({"motd": "kept"})).await.unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
        store.patch("t", json!({"motd": "lost"})).await.unwrap();
        store.fail_next_write();
        let err = store.commit("t", Caller::keeld()).await.unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        let snap = store.snapshot();
        assert_eq!(snap.live_settings(), &json!({"motd": "kept"}));
        assert!(
            snap.pending.contains_key("t"),
            "the transaction is still pending"
        );
    });
}

#[test]
fn a_transaction_committed_before_a_crash_is_not_pending_after() {
    let dir = tempfile::tempdir().unwrap();
    let id = rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("t", json!({"motd": "x"})).await.unwrap();
        store.snapshot().pending["t"].id
    });
    // Simulate a crash between the two writes: the committed state says tx "t" (with the
    // pending id) committed, the pending file still holds it.
    let mut files = open_files(dir.path(), false).unwrap();
    let snapshot = files.load().unwrap();
    let mut history = snapshot.history.clone();
    history.push(Arc::new(Generation {
        generation: 1,
        time: "2026-01-01T00:00:00.000Z".to_owned(),
        tx: "t".to_owned(),
        tx_id: Some(id),
        caller: Caller::keeld(),
        changed_keys: vec!["settings.motd".to_owned()],
        rollback_of: None,
        settings: Arc::new(json!({"motd": "x"})),
    }));
    files
        .write_generations(&history, &[(1, id)].into_iter().collect(), id + 1, &[])
        .unwrap();
    drop(files);
    let store = reopen(dir.path(), 10);
    assert!(store.snapshot().pending.is_empty());
    assert_eq!(store.snapshot().live_settings(), &json!({"motd": "x"}));
}

#[test]
fn a_store_from_before_the_slots_is_read_and_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let generations = json!({"format": 1, "generations": [{
        "generation": 4, "time": "2026-01-01T00:00:00.000Z", "tx": "t",
        "caller": {"uid": 0, "gid": 0, "pid": 1, "comm": "x"},
        "changed-keys": ["settings.motd"], "settings": {"motd": "x"}
    }]});
    std::fs::write(dir.path().join("generations.json"), generations.to_string()).unwrap();
    drop(reopen(dir.path(), 10));
    // Migrated into the slots: found again with generations.json gone.
    std::fs::remove_file(dir.path().join("generations.json")).unwrap();
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 4);
    assert_eq!(store.snapshot().live_settings(), &json!({"motd": "x"}));
}

#[test]
fn second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path(), 10).unwrap();
    let err = Store::open(dir.path(), 10).unwrap_err();
    assert!(err.to_string().contains("another keeld"), "{err}");
}

#[test]
fn committed_transactions_never_come_back_even_with_a_short_history() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 1).unwrap();
        store.patch("a", json!({"motd": "a"})).await.unwrap();
        store
            .patch("b", json!({"ntp": {"time-servers": ["b.example"]}}))
            .await
            .unwrap();
        store.commit("a", Caller::keeld()).await.unwrap();
        store.commit("b", Caller::keeld()).await.unwrap();
        store.patch("c", json!({"motd": "c"})).await.unwrap();
        store.commit("c", Caller::keeld()).await.unwrap();
    });
    let store = reopen(dir.path(), 1);
    assert!(
        store.snapshot().pending.is_empty(),
        "{:?}",
        store.snapshot().pending
    );
    assert_eq!(store.snapshot().live_settings()["motd"], "c");
}

#[test]
fn a_torn_newest_pending_line_falls_back_to_the_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("kept", json!({"motd": "k"})).await.unwrap();
        store.patch("kept", json!({"motd": "k2"})).await.unwrap();
    });
    // A crash in the middle of appending the newest line leaves it torn.
    let path = dir.path().join("pending.log");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&path, &bytes).unwrap();
    let store = reopen(dir.path(), 10);
    assert_eq!(
        store.snapshot().pending["kept"].view(),
        json!({"motd": "k"})
    );
    assert_eq!(
        log_lines(dir.path()),
        vec![put("kept", 1)],
        "the log is written afresh, without the torn line"
    );
    drop(store);
    // Appends after the reopen are not swallowed by what was torn.
    let store = reopen(dir.path(), 10);
    rt().block_on(async {
        store.patch("kept", json!({"motd": "k3"})).await.unwrap();
    });
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(
        store.snapshot().pending["kept"].view(),
        json!({"motd": "k3"})
    );
}

/// Opens the state files once the previous handle has let go of the lock.
fn open_files(dir: &std::path::Path, accept_loss: bool) -> Result<StoreFiles, StoreError> {
    for _ in 0..200 {
        match StoreFiles::open(dir, accept_loss) {
            Err(StoreError::Io { source, .. }) if source.to_string().contains("another keeld") => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other,
        }
    }
    panic!("the store stayed locked")
}

/// Opens the store again once the previous handle's writer thread has let go of the lock.
fn reopen(dir: &std::path::Path, keep: usize) -> Store {
    for _ in 0..200 {
        match Store::open(dir, keep) {
            Ok(store) => return store,
            Err(StoreError::Io { .. }) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the store stayed locked")
}

#[test]
fn patches_fold_when_exact_and_stay_apart_when_not() {
    use super::{can_fold, fold_patch};
    let mut acc = json!({"motd": "a", "kernel": {"sysctl": {"x.y": "1"}}});
    let next = json!({"kernel": {"sysctl": {"x.y": null, "z.w": "2"}}});
    assert!(can_fold(&acc, &next));
    fold_patch(&mut acc, &next);
    assert_eq!(
        acc,
        json!({"motd": "a", "kernel": {"sysctl": {"x.y": null, "z.w": "2"}}})
    );
    // A removal, then a new table under it: folding would merge, so it must not fold.
    assert!(!can_fold(
        &json!({"kernel": {"sysctl": null}}),
        &json!({"kernel": {"sysctl": {"a.b": "1"}}})
    ));
    assert!(can_fold(
        &json!({"kernel": {"sysctl": null}}),
        &json!({"kernel": {"sysctl": null}})
    ));
}

#[test]
fn a_long_transaction_stays_one_patch() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        for i in 0..100 {
            store
                .patch("t", json!({"motd": format!("m{i}")}))
                .await
                .unwrap();
        }
        assert_eq!(store.snapshot().pending["t"].patches.len(), 1);
    });
}

#[test]
fn committed_transactions_stay_committed_across_restarts() {
    // keep = 1: the history alone cannot say that "a" was committed.
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 1).unwrap();
        store
            .patch("b", json!({"ntp": {"time-servers": ["b.example"]}}))
            .await
            .unwrap();
        store.patch("a", json!({"motd": "a"})).await.unwrap();
        store.commit("a", Caller::keeld()).await.unwrap();
    });
    let store = reopen(dir.path(), 1);
    rt().block_on(async {
        assert!(store.snapshot().pending.contains_key("b"));
        assert!(!store.snapshot().pending.contains_key("a"));
        store.commit("b", Caller::keeld()).await.unwrap();
    });
    drop(store);
    let store = reopen(dir.path(), 1);
    assert!(
        store.snapshot().pending.is_empty(),
        "{:?}",
        store.snapshot().pending
    );
}

#[test]
fn a_failed_commit_leaves_its_transaction_pending_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("t", json!({"motd": "x"})).await.unwrap();
        store.patch("u", json!({"motd": "y"})).await.unwrap();
        store.fail_next_write();
        assert!(store.commit("t", Caller::keeld()).await.is_err());
        // The next batch brings the pending file back in line with memory.
        store.patch("v", json!({"motd": "z"})).await.unwrap();
    });
    let store = reopen(dir.path(), 10);
    let pending = &store.snapshot().pending;
    assert!(
        pending.contains_key("t") && pending.contains_key("u") && pending.contains_key("v"),
        "{pending:?}"
    );
    assert_eq!(store.snapshot().live().generation, 0);
}

/// A batch that commits a transaction and then patches it again makes a new transaction
/// of that name in the pending log; when the committed state then cannot be written, both
/// are refused, and the pending log is put back at once: a crash right after (no batch
/// in between) finds the transaction as it was, not the refused patch.
#[test]
fn a_refused_patch_is_not_the_transaction_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("t", json!({"motd": "kept"})).await.unwrap();
        store.fail_next_write();
        let (commit, committed) = tokio::sync::oneshot::channel();
        let (patch, patched) = tokio::sync::oneshot::channel();
        let refused = json!({"ntp": {"time-servers": ["refused.example"]}});
        store.writer.run_as_one_batch(vec![
            Op::Commit {
                tx: "t".to_owned(),
                caller: Caller::keeld(),
                prechecked: None,
                reply: commit,
            },
            Op::Patch {
                tx: "t".to_owned(),
                size: refused.to_string().len(),
                patch: refused,
                reply: patch,
            },
        ]);
        assert!(committed.await.unwrap().is_err());
        assert!(patched.await.unwrap().is_err());
        assert_eq!(
            store.snapshot().pending["t"].patches,
            vec![Arc::new(json!({"motd": "kept"}))]
        );
    });
    let store = reopen(dir.path(), 10);
    let snapshot = store.snapshot();
    assert_eq!(snapshot.live().generation, 0);
    assert_eq!(
        snapshot.pending.get("t").map(|t| t.patches.clone()),
        Some(vec![Arc::new(json!({"motd": "kept"}))]),
        "{:?}",
        snapshot.pending
    );
}

/// A generation kept from an older version whose settings this version's model refuses
/// (a key since renamed by a migration that had nothing to change in the live settings)
/// is not rolled back to: the refusal names the key, and nothing changes.
#[test]
fn a_rollback_to_settings_this_model_refuses_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        // As an older keeld committed it: written without this model's validation.
        let (reply, done) = tokio::sync::oneshot::channel();
        store.writer.run_as_one_batch(vec![Op::Migrate {
            tx: "older-version".to_owned(),
            settings: json!({"motd": "old", "renamed-since": {"a": 1}}),
            reply,
        }]);
        assert!(done.await.unwrap().is_ok());
        // The live settings now: valid, without the old key.
        let (reply, done) = tokio::sync::oneshot::channel();
        store.writer.run_as_one_batch(vec![Op::Migrate {
            tx: "newer-version".to_owned(),
            settings: json!({"motd": "new"}),
            reply,
        }]);
        assert!(done.await.unwrap().is_ok());
        let before = store.snapshot();
        let err = store.rollback(1, Caller::keeld()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("generation 1's settings are not valid")
                && err.to_string().contains("settings.renamed-since"),
            "{err}"
        );
        assert_eq!(store.snapshot().live().generation, before.live().generation);
    });
}

#[derive(Debug)]
struct PanickingCheck;

impl CommitCheck for PanickingCheck {
    fn check(&self, _: &std::sync::Arc<serde_json::Value>, _: &[String]) -> Result<(), CheckError> {
        panic!("a bug in a commit check");
    }
}

#[test]
fn a_panicking_batch_does_not_wedge_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open_with_check(
            dir.path(),
            10,
            Some(Arc::new(PanickingCheck)),
            crate::events::EventBus::default(),
        )
        .unwrap();
        store.patch("t", json!({"motd": "x"})).await.unwrap();
        assert!(matches!(
            store.commit("t", Caller::keeld()).await,
            Err(StoreError::Closed)
        ));
        // Still serving.
        store.patch("u", json!({"motd": "y"})).await.unwrap();
        assert!(store.snapshot().pending.contains_key("u"));
        assert_eq!(store.snapshot().live().generation, 0);
    });
}

/// A check that holds until released, and counts its runs.
#[derive(Debug)]
struct GatedCheck {
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    started: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    started_rx: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>,
    runs: std::sync::atomic::AtomicUsize,
}

impl GatedCheck {
    /// Waits (off the async workers) until a check run has started.
    fn started_rx_wait(&self) -> impl std::future::Future<Output = ()> {
        let rx = self.started_rx.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                rx.lock()
                    .unwrap()
                    .recv_timeout(std::time::Duration::from_secs(10))
            })
            .await
            .unwrap()
            .expect("a check run started");
        }
    }
}

impl CommitCheck for GatedCheck {
    fn check(&self, _: &std::sync::Arc<serde_json::Value>, _: &[String]) -> Result<(), CheckError> {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.started.lock().unwrap().send(());
        let _ = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(std::time::Duration::from_secs(30));
        Ok(())
    }
}

/// The commit-time check (a render of the affected files) runs before the commit
/// reaches the writer: a slow one holds no one else's PATCH or commit, and it runs
/// once, not again in the writer.
#[test]
fn a_slow_commit_check_holds_up_no_other_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let check = Arc::new(GatedCheck {
        release: std::sync::Mutex::new(release_rx),
        started: std::sync::Mutex::new(started_tx),
        started_rx: Arc::new(std::sync::Mutex::new(started_rx)),
        runs: std::sync::atomic::AtomicUsize::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Store::open_with_check(
            dir.path(),
            10,
            Some(check.clone()),
            crate::events::EventBus::default(),
        )
        .unwrap();
        store.patch("slow", json!({"motd": "x"})).await.unwrap();
        let committing = tokio::spawn({
            let store = store.clone();
            async move { store.commit("slow", Caller::keeld()).await }
        });
        check.started_rx_wait().await;
        // While the check holds, an unrelated PATCH goes through the writer.
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store.patch("other", json!({"ntp": {"time-servers": ["a.example"]}})),
        )
        .await
        .expect("a PATCH waited for another commit's check")
        .unwrap();
        release_tx.send(()).unwrap();
        assert_eq!(committing.await.unwrap().unwrap(), ["settings.motd"]);
        assert_eq!(check.runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A transaction patched while its commit was being checked is checked again,
        // in the writer, and the newer patch is what commits.
        store.patch("again", json!({"motd": "y"})).await.unwrap();
        let committing = tokio::spawn({
            let store = store.clone();
            async move { store.commit("again", Caller::keeld()).await }
        });
        let started = check.started_rx_wait();
        started.await;
        store.patch("again", json!({"motd": "z"})).await.unwrap();
        release_tx.send(()).unwrap();
        check.started_rx_wait().await;
        release_tx.send(()).unwrap();
        assert_eq!(committing.await.unwrap().unwrap(), ["settings.motd"]);
        assert_eq!(check.runs.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(store.snapshot().live_settings()["motd"], "z");
    });
}

#[test]
fn pending_state_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        // About 1 MiB per patch, in values short enough for any single-line limit.
        let big = |round: usize| {
            let keys: serde_json::Map<String, serde_json::Value> = (0..256)
                .map(|k| (format!("k.v{round}x{k}"), json!("x".repeat(4090))))
                .collect();
            json!({"kernel": {"sysctl": keys}})
        };
        for round in 0..3 {
            store.patch("t", big(round)).await.unwrap();
        }
        let err = store.patch("t", big(9)).await.unwrap_err();
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
    });
}

#[test]
fn committed_settings_equal_a_full_validation() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        let patches = [
            json!({"motd": "m", "kernel": {"sysctl": {"b.b": "2", "a.a": "1"}}}),
            json!({"host-containers": {"admin": {"enabled": true, "source": "public.ecr.aws/x/admin:v1"}}}),
            json!({"kernel": {"sysctl": {"a.a": null}}, "dns": {"name-servers": ["10.0.0.2"]}}),
            json!({"motd": null}),
        ];
        for patch in patches {
            store.patch("t", patch).await.unwrap();
            store.commit("t", Caller::keeld()).await.unwrap();
            let live = store.snapshot().live_settings().clone();
            assert_eq!(settings_model::validate(&live).unwrap(), live);
            let keys: Vec<&String> = live.as_object().unwrap().keys().collect();
            let mut sorted = keys.clone();
            sorted.sort();
            assert_eq!(keys, sorted, "top-level groups in name order");
        }
    });
}

// ---- Damaged state: every case refuses to start, naming the file, unless the loss is
// ---- accepted; a torn unacknowledged write does not.

/// Commits `motd` values `m1..=mN` (long enough to span several sectors), each into a
/// slot (no log: these tests are about the slots); the live generation is then N.
fn committed_store(dir: &std::path::Path, commits: usize) {
    rt().block_on(async {
        let store = Store::open(dir, 10).unwrap();
        store.set_min_log(0);
        for i in 1..=commits {
            store.patch("t", json!({"motd": motd(i)})).await.unwrap();
            store.commit("t", Caller::keeld()).await.unwrap();
        }
    });
}

fn motd(i: usize) -> String {
    format!("m{i}-{}", "x".repeat(3000))
}

/// The slot holding the newest record, from the sequence numbers in the headers.
fn newest_slot(dir: &std::path::Path) -> std::path::PathBuf {
    let seq = |name: &str| {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        u64::from_le_bytes(bytes[8..16].try_into().unwrap())
    };
    let newest = if seq("generations.0") > seq("generations.1") {
        "generations.0"
    } else {
        "generations.1"
    };
    dir.join(newest)
}

fn older_slot(dir: &std::path::Path) -> std::path::PathBuf {
    let newest = newest_slot(dir);
    let name = if newest.ends_with("generations.0") {
        "generations.1"
    } else {
        "generations.0"
    };
    dir.join(name)
}

fn flip_byte(path: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// Opening is refused as damage; answers the path it names and the message.
fn refused(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let err = loop {
        match Store::open(dir, 10) {
            Err(StoreError::Io { source, .. }) if source.to_string().contains("another keeld") => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => break e,
            Ok(store) => panic!(
                "opened, serving generation {}",
                store.snapshot().live().generation
            ),
        }
    };
    let message = err.to_string();
    assert!(message.contains("--accept-state-loss"), "{message}");
    match err {
        StoreError::Damaged { path, .. } => (path, message),
        other => panic!("not a damage refusal: {other}"),
    }
}

fn recover(dir: &std::path::Path) -> Option<Recovered> {
    for _ in 0..200 {
        match Store::recover(dir) {
            Err(StoreError::Io { source, .. }) if source.to_string().contains("another keeld") => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other.unwrap(),
        }
    }
    panic!("the store stayed locked")
}

#[test]
fn a_flipped_payload_byte_in_the_newest_slot_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 3);
    let newest = newest_slot(dir.path());
    flip_byte(&newest, 512 + 700);
    let (path, message) = refused(dir.path());
    assert_eq!(path, newest, "{message}");
    assert!(message.contains("fails its checksum"), "{message}");
}

#[test]
fn a_changed_sequence_byte_in_the_header_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 3);
    let newest = newest_slot(dir.path());
    // Lower the newest record's sequence number below the older one's.
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes[8] = 0;
    std::fs::write(&newest, bytes).unwrap();
    let (path, message) = refused(dir.path());
    assert_eq!(path, newest, "{message}");
    assert!(message.contains("header"), "{message}");
}

#[test]
fn a_newest_slot_truncated_to_nothing_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 3);
    let newest = newest_slot(dir.path());
    std::fs::File::create(&newest).unwrap();
    let (path, message) = refused(dir.path());
    assert_eq!(path, newest, "{message}");
    // Cut short, but not to nothing: the same.
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 3);
    let newest = newest_slot(dir.path());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    file.set_len(2048).unwrap();
    let (path, message) = refused(dir.path());
    assert_eq!(path, newest, "{message}");
    assert!(message.contains("cut short"), "{message}");
}

#[test]
fn both_slots_truncated_or_deleted_refuse_to_start_never_an_empty_store() {
    for deleted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        committed_store(dir.path(), 2);
        for name in ["generations.0", "generations.1"] {
            if deleted {
                std::fs::remove_file(dir.path().join(name)).unwrap();
            } else {
                std::fs::File::create(dir.path().join(name)).unwrap();
            }
        }
        let (path, message) = refused(dir.path());
        assert_eq!(path, dir.path(), "{message}");
        assert!(message.contains("generations.held"), "{message}");
    }
}

#[test]
fn a_torn_unacknowledged_write_is_not_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 2);
    rt().block_on(async {
        let store = reopen(dir.path(), 10);
        store.set_min_log(0);
        store.patch("t", json!({"motd": motd(3)})).await.unwrap();
        // Killed after three of the record's sectors landed: never acknowledged.
        store.tear_next_write(3);
        assert!(store.commit("t", Caller::keeld()).await.is_err());
    });
    let store = reopen(dir.path(), 10);
    let snapshot = store.snapshot();
    assert_eq!(snapshot.live().generation, 2);
    assert_eq!(snapshot.live_settings()["motd"], motd(2));
    // The next write goes over the torn one, with a new sequence number, and a reopen
    // finds it.
    store.set_min_log(0);
    rt().block_on(async {
        store.patch("t", json!({"motd": motd(4)})).await.unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
    });
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 3);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(4));
}

#[test]
fn damage_to_the_older_slot_alone_is_not_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 3);
    flip_byte(&older_slot(dir.path()), 512 + 700);
    let store = reopen(dir.path(), 10);
    store.set_min_log(0);
    assert_eq!(store.snapshot().live().generation, 3);
    // The next commit overwrites it; nothing to warn about afterwards.
    rt().block_on(async {
        store.patch("t", json!({"motd": motd(4)})).await.unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
    });
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 4);
}

#[test]
fn accepting_the_loss_continues_from_the_intact_state_and_never_reuses_a_number() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 3);
    assert!(
        recover(dir.path()).is_none(),
        "nothing to recover in an intact store"
    );
    rt().block_on(async {
        let store = reopen(dir.path(), 10);
        store.patch("pending", json!({"motd": "p"})).await.unwrap();
    });
    // Generation 3, acknowledged, is damaged; generation 2 is intact.
    flip_byte(&newest_slot(dir.path()), 512 + 700);
    refused(dir.path());
    let recovered = recover(dir.path()).unwrap();
    assert_eq!(recovered.continued_from, 2);
    assert_eq!(
        recovered.generation, 4,
        "numbered above the lost generation 3, whose header is intact"
    );
    assert_eq!(recovered.discarded_pending, vec!["pending"]);
    assert!(recover(dir.path()).is_none(), "recovered durably, once");
    let store = reopen(dir.path(), 10);
    let snapshot = store.snapshot();
    assert_eq!(snapshot.live().generation, 4);
    assert_eq!(snapshot.live().tx, RECOVERY_TX);
    assert_eq!(snapshot.live_settings()["motd"], motd(2));
    assert!(snapshot.pending.is_empty());
    assert!(snapshot.find(3).is_none());
    rt().block_on(async {
        store.patch("t", json!({"motd": "after"})).await.unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
    });
    assert_eq!(store.snapshot().live().generation, 5);
}

#[test]
fn accepting_the_loss_of_an_unreadable_header_skips_a_whole_write_of_numbers() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 3);
    flip_byte(&newest_slot(dir.path()), 20);
    refused(dir.path());
    let recovered = recover(dir.path()).unwrap();
    assert_eq!(recovered.continued_from, 2);
    assert!(recovered.generation > 2 + writer::MAX_GENERATIONS_PER_WRITE);
}

#[test]
fn accepting_the_loss_of_both_slots_starts_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    committed_store(dir.path(), 2);
    for name in ["generations.0", "generations.1"] {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    refused(dir.path());
    let recovered = recover(dir.path()).unwrap();
    assert_eq!(recovered.continued_from, 0);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live_settings(), &json!({}));
    assert_eq!(store.snapshot().live().tx, RECOVERY_TX);
}

// ---- Pending transactions: one log, a line per change to one transaction.

/// `(kind, name, id)` of each line of the pending log: `put` names its transaction,
/// `gone` only its id.
fn log_lines(dir: &std::path::Path) -> Vec<(String, String, u64)> {
    std::fs::read(dir.join("pending.log"))
        .unwrap()
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let record: serde_json::Value = serde_json::from_slice(&line[9..]).unwrap();
            let (kind, body) = record.as_object().unwrap().iter().next().unwrap();
            match kind.as_str() {
                "put" => put(
                    body["name"].as_str().unwrap(),
                    body["tx"]["id"].as_u64().unwrap(),
                ),
                _ => (
                    "gone".to_owned(),
                    String::new(),
                    body["id"].as_u64().unwrap(),
                ),
            }
        })
        .collect()
}

fn put(name: &str, id: u64) -> (String, String, u64) {
    ("put".to_owned(), name.to_owned(), id)
}

fn gone(id: u64) -> (String, String, u64) {
    ("gone".to_owned(), String::new(), id)
}

#[test]
fn a_patch_writes_only_its_own_transaction() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        for name in ["a", "b", "c"] {
            store.patch(name, json!({"motd": name})).await.unwrap();
        }
        let ids: BTreeMap<String, u64> = store
            .snapshot()
            .pending
            .iter()
            .map(|(name, tx)| (name.clone(), tx.id))
            .collect();
        let lines = log_lines(dir.path());
        assert_eq!(
            lines,
            vec![put("a", ids["a"]), put("b", ids["b"]), put("c", ids["c"])]
        );
        store.patch("c", json!({"motd": "c2"})).await.unwrap();
        assert_eq!(log_lines(dir.path())[3..], [put("c", ids["c"])]);
        store.discard("b").await.unwrap();
        assert_eq!(log_lines(dir.path())[4..], [gone(ids["b"])]);
        // A commit that makes a generation writes nothing here: the committed state
        // says the transaction is no longer pending.
        store.commit("c", Caller::keeld()).await.unwrap();
        assert_eq!(log_lines(dir.path()).len(), 5);
        // One that makes none leaves no trace.
        store.patch("a", json!({"motd": "c2"})).await.unwrap();
        store.commit("a", Caller::keeld()).await.unwrap();
        assert_eq!(
            log_lines(dir.path())[5..],
            [put("a", ids["a"]), gone(ids["a"])]
        );
        store.patch("d", json!({"motd": "d"})).await.unwrap();
    });
    let store = reopen(dir.path(), 10);
    let pending = &store.snapshot().pending;
    assert_eq!(pending.keys().collect::<Vec<_>>(), vec!["d"]);
    assert_eq!(pending["d"].view(), json!({"motd": "d"}));
    assert_eq!(log_lines(dir.path()), vec![put("d", pending["d"].id)]);
}

#[test]
fn the_pending_log_is_compacted_and_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 2).unwrap();
        store.patch("long", json!({"motd": "long"})).await.unwrap();
        for i in 0..2_000 {
            store
                .patch("t", json!({"kernel": {"sysctl": {"a.b": i.to_string()}}}))
                .await
                .unwrap();
            store.commit("t", Caller::keeld()).await.unwrap();
        }
        store.patch("t", json!({"motd": "last"})).await.unwrap();
    });
    let size = std::fs::metadata(dir.path().join("pending.log"))
        .unwrap()
        .len();
    assert!(size <= super::pending::COMPACT_MIN + 1024, "{size} bytes");
    assert!(!dir.path().join("pending.log.tmp").exists());
    let store = reopen(dir.path(), 2);
    let pending = &store.snapshot().pending;
    assert_eq!(pending.keys().collect::<Vec<_>>(), vec!["long", "t"]);
    assert_eq!(pending["long"].view(), json!({"motd": "long"}));
    assert_eq!(pending["t"].view(), json!({"motd": "last"}));
    assert_eq!(
        store.snapshot().live_settings()["kernel"]["sysctl"]["a.b"],
        "1999"
    );
}

#[test]
fn pending_transaction_files_of_the_previous_form_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("c", json!({"motd": "c"})).await.unwrap();
        store.commit("c", Caller::keeld()).await.unwrap();
    });
    // Next tx id is 2 now: id 1 was committed, id 2 is pending in the previous form, with
    // a torn newer revision; a leftover of the committed one is dropped.
    let file = |name: &str, id: u64, motd: &str| {
        json!({"format": 2, "name": name, "tx": {"id": id, "patches": [{"motd": motd}], "bytes": 10}})
            .to_string()
    };
    std::fs::remove_file(dir.path().join("pending.log")).unwrap();
    std::fs::write(dir.path().join("pending-tx-1.3.json"), file("c", 1, "c")).unwrap();
    std::fs::write(dir.path().join("pending-tx-2.1.json"), file("p", 2, "old")).unwrap();
    std::fs::write(dir.path().join("pending-tx-2.2.json"), file("p", 2, "p")).unwrap();
    std::fs::write(
        dir.path().join("pending-tx-2.3.json"),
        b"{\"format\":2,\"na",
    )
    .unwrap();
    let store = reopen(dir.path(), 10);
    let pending = &store.snapshot().pending;
    assert_eq!(pending.keys().collect::<Vec<_>>(), vec!["p"]);
    assert_eq!(pending["p"].view(), json!({"motd": "p"}));
    assert_eq!(log_lines(dir.path()), vec![put("p", 2)]);
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("pending-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_long_pending_transaction_survives_many_commits_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 2).unwrap();
        store.patch("long", json!({"motd": "long"})).await.unwrap();
        // More commits than the window of committed ids, none touching "long".
        for i in 0..COMMITTED_WINDOW + 20 {
            store
                .patch("t", json!({"kernel": {"sysctl": {"a.b": i.to_string()}}}))
                .await
                .unwrap();
            store.commit("t", Caller::keeld()).await.unwrap();
        }
    });
    let store = reopen(dir.path(), 2);
    let pending = &store.snapshot().pending;
    assert_eq!(
        pending.keys().collect::<Vec<_>>(),
        vec!["long"],
        "{pending:?}"
    );
}

#[test]
fn a_leftover_file_of_the_previous_form_does_not_revive_what_the_log_discarded() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("t", json!({"motd": "t"})).await.unwrap();
        store.discard("t").await.unwrap();
    });
    // A file of the previous form for the same id, whose removal failed at migration.
    std::fs::write(
        dir.path().join("pending-tx-1.1.json"),
        json!({"format": 2, "name": "t", "tx": {"id": 1, "patches": [{"motd": "t"}], "bytes": 10}})
            .to_string(),
    )
    .unwrap();
    let store = reopen(dir.path(), 10);
    assert!(
        store.snapshot().pending.is_empty(),
        "{:?}",
        store.snapshot().pending
    );
}

#[test]
fn a_discarded_and_renewed_transaction_cut_by_a_crash_keeps_the_newer() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.patch("t", json!({"motd": "old"})).await.unwrap();
        store.discard("t").await.unwrap();
        store.patch("t", json!({"motd": "new"})).await.unwrap();
    });
    // As if the discard's line were lost: two ids under one name.
    let path = dir.path().join("pending.log");
    let kept: Vec<u8> = std::fs::read(&path)
        .unwrap()
        .split_inclusive(|b| *b == b'\n')
        .filter(|line| !line.windows(6).any(|w| w == b"\"gone\""))
        .flatten()
        .copied()
        .collect();
    std::fs::write(&path, kept).unwrap();
    assert_eq!(log_lines(dir.path()), vec![put("t", 1), put("t", 2)]);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().pending["t"].view(), json!({"motd": "new"}));
    assert_eq!(
        log_lines(dir.path()),
        vec![put("t", 2)],
        "the older one is dropped"
    );
}

#[test]
fn pending_transactions_in_the_previous_single_file_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    // A store from before the slots and the per-transaction files: generation 1 committed
    // tx id 1; tx id 2 pending.
    let generations = json!({"format": 1, "generations": [{
        "generation": 1, "time": "2026-01-01T00:00:00.000Z", "tx": "c", "tx-id": 1,
        "caller": {"uid": 0, "gid": 0, "pid": 1, "comm": "x"},
        "changed-keys": ["settings.motd"], "settings": {"motd": "x"}
    }]});
    std::fs::write(dir.path().join("generations.json"), generations.to_string()).unwrap();
    let pending = json!({"format": 1, "as_of": 1, "transactions": {
        "c": {"id": 1, "patches": [{"motd": "x"}], "bytes": 12},
        "p": {"id": 2, "patches": [{"motd": "pending"}], "bytes": 18}
    }});
    std::fs::write(dir.path().join("pending-5.json"), pending.to_string()).unwrap();
    drop(reopen(dir.path(), 10));
    assert!(!dir.path().join("pending-5.json").exists());
    assert_eq!(
        log_lines(dir.path()),
        vec![put("p", 2)],
        "the committed one is dropped, the pending one migrated"
    );
    let store = reopen(dir.path(), 10);
    let snapshot = store.snapshot();
    assert_eq!(snapshot.pending.keys().collect::<Vec<_>>(), vec!["p"]);
    assert_eq!(snapshot.pending["p"].id, 2);
    rt().block_on(async {
        store.patch("q", json!({"motd": "q"})).await.unwrap();
    });
    assert!(store.snapshot().pending["q"].id > 2, "ids never reused");
}

#[test]
fn settings_over_the_limit_are_refused_naming_it() {
    assert_eq!(MAX_SETTINGS_BYTES, 4 * 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Store::open(dir.path(), 10).unwrap();
        store.set_max_settings_bytes(10_000);
        store
            .patch("t", json!({"motd": "x".repeat(6_000)}))
            .await
            .unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
        store
            .patch(
                "t",
                json!({"kernel": {"sysctl": {"a.b": "y".repeat(4_000)}}}),
            )
            .await
            .unwrap();
        let err = store.commit("t", Caller::keeld()).await.unwrap_err();
        assert!(
            matches!(err, StoreError::SettingsTooLarge { limit: 10_000, size } if size > 10_000),
            "{err}"
        );
        assert!(err.to_string().contains("limit of 10000 bytes"), "{err}");
        assert_eq!(store.snapshot().live().generation, 1, "nothing changed");
        assert!(store.snapshot().pending.contains_key("t"), "still pending");
        // A rollback to settings over a (since lowered) limit is refused the same way.
        store.discard("t").await.unwrap();
        store.patch("t", json!({"motd": "short"})).await.unwrap();
        store.commit("t", Caller::keeld()).await.unwrap();
        store.set_max_settings_bytes(1_000);
        assert!(matches!(
            store.rollback(1, Caller::keeld()).await,
            Err(StoreError::SettingsTooLarge { .. })
        ));
    });
}

// ---- The generation log: a commit appends what it changed; compaction rewrites the
// ---- slots only once the log has outgrown them.

fn slot_bytes(dir: &std::path::Path) -> Vec<Vec<u8>> {
    ["generations.0", "generations.1"]
        .iter()
        .map(|name| std::fs::read(dir.join(name)).unwrap())
        .collect()
}

/// Commits `motd` values from `from` on, `count` of them, through the log.
fn commit_through_log(store: &Store, from: usize, count: usize) {
    rt().block_on(async {
        for i in from..from + count {
            store.patch("t", json!({"motd": motd(i)})).await.unwrap();
            store.commit("t", Caller::keeld()).await.unwrap();
        }
    });
}

#[test]
fn a_commit_writes_its_generation_not_the_whole_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1000).unwrap();
    commit_through_log(&store, 1, 20);
    // Far more history than the log holds: the slots are not rewritten by a commit.
    let slots = slot_bytes(dir.path());
    commit_through_log(&store, 21, 100);
    assert!(
        slot_bytes(dir.path()) == slots,
        "a commit rewrote a slot (the whole history)"
    );
    drop(store);
    let store = reopen(dir.path(), 1000);
    let snapshot = store.snapshot();
    assert_eq!(snapshot.live().generation, 120);
    assert_eq!(snapshot.history.len(), 121);
    assert_eq!(snapshot.live_settings()["motd"], motd(120));
    assert_eq!(snapshot.find(7).unwrap().settings["motd"], motd(7));
}

#[test]
fn compaction_keeps_the_state_and_starts_the_log_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 5).unwrap();
    store.set_min_log(16 * 1024);
    let slots = slot_bytes(dir.path());
    commit_through_log(&store, 1, 40);
    assert!(slot_bytes(dir.path()) != slots, "no compaction happened");
    rt().block_on(async {
        store.patch("p", json!({"motd": "pending"})).await.unwrap();
    });
    drop(store);
    let store = reopen(dir.path(), 5);
    let snapshot = store.snapshot();
    let gens: Vec<u64> = snapshot.history.iter().map(|g| g.generation).collect();
    assert_eq!(gens, vec![36, 37, 38, 39, 40]);
    assert_eq!(snapshot.live_settings()["motd"], motd(40));
    assert!(snapshot.pending.contains_key("p"));
    assert!(!snapshot.pending.contains_key("t"));
}

#[test]
fn a_torn_log_append_is_cut_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10).unwrap();
    commit_through_log(&store, 1, 3);
    rt().block_on(async {
        store.patch("t", json!({"motd": motd(4)})).await.unwrap();
        // Killed after two of the record's sectors landed: never acknowledged.
        store.tear_next_write(2);
        assert!(store.commit("t", Caller::keeld()).await.is_err());
    });
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 3);
    commit_through_log(&store, 5, 2);
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 5);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(6));
}

/// A commit refused because `fdatasync` failed does not come back after a restart, though
/// its record reached the file: the log is ended before it.
#[test]
fn a_commit_whose_fdatasync_failed_is_not_there_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10).unwrap();
    commit_through_log(&store, 1, 3);
    rt().block_on(async {
        store.patch("t", json!({"motd": motd(4)})).await.unwrap();
        store.fail_next_sync();
        assert!(store.commit("t", Caller::keeld()).await.is_err());
    });
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 3);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(3));
}

/// The same for a commit that went to a slot (a compaction): its record is marked refused,
/// so it neither comes back after a restart nor hides the acknowledged commits the log
/// holds after it (the log names the snapshot before it).
#[test]
fn a_snapshot_whose_fdatasync_failed_hides_nothing_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10).unwrap();
    store.set_min_log(0);
    commit_through_log(&store, 1, 1);
    rt().block_on(async {
        store.patch("t", json!({"motd": motd(2)})).await.unwrap();
        store.fail_next_sync();
        assert!(store.commit("t", Caller::keeld()).await.is_err());
    });
    // The next commits go to the log again.
    store.set_min_log(1 << 20);
    commit_through_log(&store, 3, 2);
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 3);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(4));
    // And with nothing after it: the state before it.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10).unwrap();
    store.set_min_log(0);
    commit_through_log(&store, 1, 1);
    rt().block_on(async {
        store.patch("t", json!({"motd": motd(2)})).await.unwrap();
        store.fail_next_sync();
        assert!(store.commit("t", Caller::keeld()).await.is_err());
    });
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 1);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(1));
}

#[test]
fn damage_in_the_log_refuses_to_start_and_can_be_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10).unwrap();
    commit_through_log(&store, 1, 3);
    drop(store);
    let log = dir.path().join("generations.log");
    // A byte of the second record's payload (the first record spans 9 sectors).
    flip_byte(&log, 9 * 512 + 100);
    let (path, message) = refused(dir.path());
    assert_eq!(path, log, "{message}");
    let recovered = recover(dir.path()).unwrap();
    assert_eq!(
        recovered.continued_from, 1,
        "up to the record before the damage"
    );
    assert!(
        recovered.generation > 3,
        "above every generation the log can have held"
    );
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(1));
    assert_eq!(store.snapshot().live().tx, RECOVERY_TX);
}

/// A log cut in the middle of a sector: accepting the loss must leave a store that opens
/// without the flag (the snapshot must not record a size its reader refuses).
#[test]
fn a_log_cut_mid_sector_can_be_accepted_and_then_opens() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10).unwrap();
    commit_through_log(&store, 1, 3);
    drop(store);
    let log = dir.path().join("generations.log");
    let file = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    file.set_len(9 * 512 + 100).unwrap();
    drop(file);
    let (path, message) = refused(dir.path());
    assert_eq!(path, log, "{message}");
    let recovered = recover(dir.path()).unwrap();
    assert_eq!(recovered.continued_from, 1, "the first record was whole");
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(1));
    commit_through_log(&store, 10, 2);
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(11));
    drop(store);
    assert!(recover(dir.path()).is_none(), "nothing left to accept");
}

#[test]
fn a_missing_or_cut_log_refuses_to_start() {
    for cut in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 10).unwrap();
        commit_through_log(&store, 1, 2);
        drop(store);
        let log = dir.path().join("generations.log");
        if cut {
            std::fs::File::create(&log).unwrap();
        } else {
            std::fs::remove_file(&log).unwrap();
        }
        let (path, message) = refused(dir.path());
        assert_eq!(path, log, "{message}");
    }
}

#[test]
fn a_store_from_before_the_log_is_read_and_starts_one() {
    let dir = tempfile::tempdir().unwrap();
    // Slots holding a format 1 snapshot (no log), as the previous keeld wrote them.
    let snapshot = json!({"format": 1, "generations": [{
        "generation": 7, "time": "2026-01-01T00:00:00.000Z", "tx": "t", "tx-id": 3,
        "caller": {"uid": 0, "gid": 0, "pid": 1, "comm": "x"},
        "changed-keys": ["settings.motd"], "settings": {"motd": "seven"}
    }], "committed": [[7, 3]], "next-tx-id": 4, "pending-ids": []});
    let (mut slots, _) = slots::Slots::open(dir.path(), false).unwrap();
    slots
        .initialise(snapshot.to_string().as_bytes(), 7)
        .unwrap();
    drop(slots);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 7);
    commit_through_log(&store, 1, 3);
    drop(store);
    let store = reopen(dir.path(), 10);
    let gens: Vec<u64> = store
        .snapshot()
        .history
        .iter()
        .map(|g| g.generation)
        .collect();
    assert_eq!(gens, vec![7, 8, 9, 10]);
    assert!(dir.path().join("generations.log").exists());
}

#[test]
fn a_torn_compaction_leaves_the_previous_snapshot_and_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 10).unwrap();
    commit_through_log(&store, 1, 3);
    // The next write compacts into a slot, and is killed half way.
    store.set_min_log(0);
    rt().block_on(async {
        store.patch("t", json!({"motd": motd(4)})).await.unwrap();
        store.tear_next_write(3);
        assert!(store.commit("t", Caller::keeld()).await.is_err());
    });
    drop(store);
    let store = reopen(dir.path(), 10);
    assert_eq!(store.snapshot().live().generation, 3);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(3));
    // The log goes on from the previous snapshot, then compacts for real.
    commit_through_log(&store, 5, 2);
    store.set_min_log(0);
    commit_through_log(&store, 7, 1);
    drop(store);
    let store = reopen(dir.path(), 10);
    let gens: Vec<u64> = store
        .snapshot()
        .history
        .iter()
        .map(|g| g.generation)
        .collect();
    assert_eq!(gens, vec![0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(store.snapshot().live_settings()["motd"], motd(7));
}

/// Each generation made durable is published once on the event bus, in order, before its
/// commit is answered; a commit that changed nothing or failed to persist publishes
/// nothing. Generations the history no longer keeps (here: it keeps one) are published
/// all the same.
#[test]
fn each_durable_generation_is_one_commit_event() {
    use crate::events::{EventBus, Resume};
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let events = EventBus::new(256);
        let store = Store::open_with_check(dir.path(), 1, None, events.clone()).unwrap();
        let caller = Caller {
            uid: 7,
            gid: 8,
            pid: 9,
            comm: "tester".into(),
        };
        store.patch("a", json!({"motd": "one"})).await.unwrap();
        store.commit("a", caller.clone()).await.unwrap();
        assert_eq!(events.latest(), 1, "published before the commit answered");
        store.patch("same", json!({"motd": "one"})).await.unwrap();
        assert!(store
            .commit("same", caller.clone())
            .await
            .unwrap()
            .is_empty());
        store.patch("lost", json!({"motd": "two"})).await.unwrap();
        store.fail_next_write();
        assert!(store.commit("lost", caller.clone()).await.is_err());
        assert_eq!(events.latest(), 1, "nothing made, nothing published");
        // Concurrent commits share batches; each generation is its own event.
        let commits: Vec<_> = (0..20)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let tx = format!("c{n}");
                    store
                        .patch(&tx, json!({"kernel": {"sysctl": {format!("k.{n}"): "1"}}}))
                        .await
                        .unwrap();
                    store.commit(&tx, Caller::keeld()).await.unwrap()
                })
            })
            .collect();
        for commit in commits {
            assert_eq!(commit.await.unwrap().len(), 1);
        }
        let mut sub = events.subscribe(Resume::Start, false, None).unwrap();
        let mut seen = Vec::new();
        while let Some(batch) = sub.next_batch().await {
            for item in batch {
                seen.push(serde_json::from_slice::<serde_json::Value>(&item.line()).unwrap());
            }
        }
        assert_eq!(seen.len(), 21, "{seen:#?}");
        assert_eq!(seen[0]["kind"], "commit");
        assert_eq!(seen[0]["tx"], "a");
        assert_eq!(seen[0]["changed-keys"], json!(["settings.motd"]));
        assert_eq!(
            seen[0]["caller"],
            json!({"uid": 7, "gid": 8, "pid": 9, "comm": "tester"})
        );
        let generations: Vec<u64> = seen
            .iter()
            .map(|e| e["generation"].as_u64().unwrap())
            .collect();
        assert_eq!(generations, (1..=21).collect::<Vec<_>>());
        assert_eq!(store.snapshot().history.len(), 1);
    });
}

#[test]
fn only_a_small_commit_is_checked_on_the_committing_task() {
    use super::small_enough_to_check_inline as inline;
    let tx = |bytes: usize| PendingTx {
        id: 1,
        patches: vec![Arc::new(json!({"motd": "x"}))],
        bytes,
    };
    let small = json!({"motd": "m", "kernel": {"sysctl": {"a.b": "1"}}});
    assert!(inline(&small, &tx(20)));
    assert!(!inline(&small, &tx(64 * 1024)), "a large transaction");
    let wide: serde_json::Map<String, serde_json::Value> =
        (0..600).map(|i| (format!("k.v{i}"), json!("1"))).collect();
    let large = json!({"kernel": {"sysctl": wide}});
    assert!(!inline(&large, &tx(20)), "large settings");
    let deep = (0..600).fold(json!(1), |v, _| json!([v]));
    assert!(!inline(&deep, &tx(20)), "deep settings");
}
