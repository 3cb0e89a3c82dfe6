//! Applies that no request can lose or cut short, and that concurrent requests share.
//!
//! Two rules, both about what a request's future may not decide:
//!
//! - **Commit and apply are one unit of work.** `commit_and_apply` and a rollback commit
//!   first and apply the changed keys after. Were the two steps run in the request's
//!   future, anything that drops that future after the commit reached the store's writer
//!   and before the apply started would leave the settings committed and not applied
//!   until the next boot: a connection that ends under the request, a timeout layer, or a
//!   client's hang-up (hyper's HTTP/1 server reads on while a handler runs, and an
//!   end-of-file there drops the handler's future). [`Applier::after_commit`] runs
//!   both on a task of their own; the request only waits for the outcome.
//! - **An apply runs to its end.** A restart command killed half way by a dropped future
//!   leaves a service in an unknown state and no record. [`Applier::apply_detached`]
//!   hands the keys to the apply queue, whose task runs the apply.
//!
//! The queue coalesces. Applies run one at a time, each rendering the live settings of
//! the moment it starts. A request that arrives while one runs joins the next, which
//! starts after the request's generation is live and so covers it, with the keys of every
//! request that joined. Eight clients that commit at once cost about three applies, not eight;
//! each client gets the report of the apply that covered its keys.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, PoisonError};

use tokio::sync::oneshot;

use super::{Applier, ApplyReport};
use crate::store::Store;

/// Requests waiting for the next apply, and whether the queue's task is running.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    keys: BTreeSet<String>,
    replies: Vec<oneshot::Sender<Arc<ApplyReport>>>,
    /// The task that runs applies while any request waits.
    running: bool,
}

impl Applier {
    /// Runs `commit` and then, when it changed keys, the apply of those keys, on a task
    /// that finishes whatever happens to the caller. Answers the commit's changed keys
    /// and the report of the apply that covered them (`None`: nothing changed, nothing
    /// applied).
    pub async fn after_commit<E, C>(
        &self,
        store: &Store,
        commit: C,
    ) -> Result<(Vec<String>, Option<Arc<ApplyReport>>), E>
    where
        C: Future<Output = Result<Vec<String>, E>> + Send + 'static,
        E: Send + 'static + From<ApplyTaskFailed>,
    {
        let applier = self.clone();
        let store = store.clone();
        let task = tokio::spawn(async move {
            let changed = commit.await?;
            if changed.is_empty() {
                return Ok((changed, None));
            }
            let report = applier.apply_detached(&store, changed.clone()).await;
            Ok((changed, Some(report)))
        });
        match task.await {
            Ok(outcome) => outcome,
            // The task panicked (a bug): the commit may or may not have landed.
            Err(e) => Err(E::from(ApplyTaskFailed(e.to_string()))),
        }
    }

    /// Queues the apply of `keys` and waits for the report of the apply that covers
    /// them. The apply runs on the queue's task: a caller that goes away cancels only
    /// its own wait.
    pub async fn apply_detached(&self, store: &Store, keys: Vec<String>) -> Arc<ApplyReport> {
        let (reply, report) = oneshot::channel();
        let start = {
            let mut waiting = self.queue();
            waiting.keys.extend(keys);
            waiting.replies.push(reply);
            !std::mem::replace(&mut waiting.running, true)
        };
        if start {
            let applier = self.clone();
            let store = store.clone();
            tokio::spawn(async move { applier.run_queue(&store).await });
        }
        match report.await {
            Ok(report) => report,
            // The queue's task panicked (a bug); say so rather than pretend it worked.
            Err(_) => Arc::new(ApplyReport::failed(
                "the apply task ended without a report".to_owned(),
            )),
        }
    }

    /// The queue's task: applies what is waiting, one batch at a time, until nothing is.
    async fn run_queue(&self, store: &Store) {
        // Marks the queue idle if this task ends early (a panic in an apply, the runtime
        // shutting down), so that later requests do not wait for a task that is gone.
        struct Idle<'a> {
            applier: &'a Applier,
            done: bool,
        }
        impl Drop for Idle<'_> {
            fn drop(&mut self) {
                if self.done {
                    return;
                }
                let mut waiting = self.applier.queue();
                waiting.running = false;
                // Dropping the replies tells their requests (see `apply_detached`).
                waiting.replies.clear();
                waiting.keys.clear();
            }
        }
        let mut idle = Idle {
            applier: self,
            done: false,
        };
        loop {
            let (keys, replies) = {
                let mut waiting = self.queue();
                if waiting.replies.is_empty() {
                    // Under the lock: a request from here on starts a new task.
                    waiting.running = false;
                    idle.done = true;
                    return;
                }
                (
                    std::mem::take(&mut waiting.keys),
                    std::mem::take(&mut waiting.replies),
                )
            };
            let report = Arc::new(self.apply(store, &Vec::from_iter(keys)).await);
            for reply in replies {
                // A request that went away no longer wants it; the apply is logged.
                let _ = reply.send(report.clone());
            }
        }
    }

    /// Whether the queue's task runs (an apply runs or waits to run).
    pub(super) fn queue_running(&self) -> bool {
        self.queue().running
    }

    /// The queue, locked. A poisoned lock (a panic while it was held) is taken as it
    /// is: no code holding it can panic half way through a change.
    fn queue(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The task that committed and applied panicked: a bug, reported as such.
#[derive(Debug, thiserror::Error)]
#[error("the commit and apply task failed: {0}")]
pub struct ApplyTaskFailed(pub String);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::apply::render::Templates;
    use crate::apply::{ApplyConfig, ServicesMeta};
    use crate::store::Caller;

    /// One service whose restart command takes `restart` seconds, so that applies
    /// overlap with the requests that arrive meanwhile.
    fn applier(root: &Path, restart: &str) -> Applier {
        let services = format!(
            r#"
[services.motd]
configuration-files = ["motd"]
restart-commands = [["/bin/sleep", "{restart}"]]

[configuration-files.motd]
path = "/etc/motd"
template-path = "motd"

[affected-services]
"settings.motd" = ["motd"]
"settings.host-containers" = ["motd"]
"#
        );
        let meta = ServicesMeta::parse(Path::new("services.toml"), &services).unwrap();
        let templates =
            Templates::from_sources([("motd".to_owned(), "{{ settings.motd }}\n".to_owned())])
                .unwrap();
        let config = ApplyConfig {
            render_root: root.to_owned(),
            restart_timeout: Duration::from_secs(10),
            journal_dir: None,
            events: Default::default(),
            boot_loader: None,
        };
        Applier::new(meta, templates, config, json!({}))
    }

    async fn set(store: &Store, tx: &str, motd: &str) {
        store.patch(tx, json!({ "motd": motd })).await.unwrap();
    }

    fn commit(
        store: &Store,
        tx: &str,
    ) -> impl Future<Output = Result<Vec<String>, ApplyTaskFailed>> + Send + 'static {
        let store = store.clone();
        let tx = tx.to_owned();
        async move { Ok(store.commit(&tx, Caller::keeld()).await.unwrap()) }
    }

    /// Commits `tx` and applies it, on a task of its own.
    fn spawn_after_commit(
        applier: &Applier,
        store: &Store,
        tx: &str,
    ) -> tokio::task::JoinHandle<(Vec<String>, Option<Arc<ApplyReport>>)> {
        let (a, s) = (applier.clone(), store.clone());
        let commit = commit(store, tx);
        tokio::spawn(async move { a.after_commit(&s, commit).await.unwrap() })
    }

    fn motd(root: &Path) -> String {
        std::fs::read_to_string(root.join("etc/motd")).unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_applies_and_each_is_covered() {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(state.path(), 10).unwrap();
        let applier = applier(root.path(), "0.3");
        // The first apply runs (and holds its restart command) while the others queue.
        set(&store, "first", "first").await;
        let first = spawn_after_commit(&applier, &store, "first");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut later = Vec::new();
        for i in 0..6 {
            let tx = format!("tx{i}");
            set(&store, &tx, &format!("motd {i}")).await;
            later.push(spawn_after_commit(&applier, &store, &tx));
        }
        let (changed, report) = first.await.unwrap();
        assert_eq!(changed, ["settings.motd"]);
        let first_id = report.unwrap().id;
        let mut ids = BTreeSet::new();
        for task in later {
            let (changed, report) = task.await.unwrap();
            assert_eq!(changed, ["settings.motd"]);
            let report = report.unwrap();
            assert!(report.success, "{report:?}");
            assert!(report.keys.contains(&"settings.motd".to_owned()));
            ids.insert(report.id);
        }
        // The six that arrived during the first apply shared the next one (or two, if
        // the first of them reached the queue just as it was emptied).
        assert!(!ids.contains(&first_id));
        assert!(ids.len() <= 2, "six commits took {} applies", ids.len());
        let live = store.snapshot().live_settings().clone();
        assert_eq!(
            format!("{}\n", live["motd"].as_str().unwrap()),
            motd(root.path())
        );
    }

    /// What keeld's stop waits for: the apply running and the one queued behind it. A
    /// waiter that only took a turn on the serial lock would get it between the two (the
    /// queue's task asks for its next turn only after the first apply returned).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_waits_for_the_running_apply_and_the_one_queued_behind_it() {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(state.path(), 10).unwrap();
        let applier = applier(root.path(), "0.3");
        set(&store, "first", "first").await;
        let first = spawn_after_commit(&applier, &store, "first");
        // The first apply holds its restart command; the second commit lands and its
        // apply waits in the queue.
        tokio::time::sleep(Duration::from_millis(100)).await;
        set(&store, "second", "second").await;
        let second = spawn_after_commit(&applier, &store, "second");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.snapshot().live_settings()["motd"] != "second" {
            assert!(
                std::time::Instant::now() < deadline,
                "the second commit never landed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(applier.queue_running());
        tokio::time::timeout(Duration::from_secs(10), applier.idle())
            .await
            .expect("idle never returned");
        // Both applies ran to their end, and the files show the second commit.
        let applies = applier.log(10)["applies"].clone();
        let finished: Vec<bool> = applies
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["success"].as_bool().unwrap())
            .collect();
        assert_eq!(finished, [true, true], "{applies}");
        assert_eq!(motd(root.path()), "second\n");
        assert!(!applier.queue_running());
        for task in [first, second] {
            let (_, report) = task.await.unwrap();
            assert!(report.unwrap().success);
        }
    }

    /// A commit check that tells when it runs and waits to be released.
    #[derive(Debug)]
    struct GatedCheck {
        started: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl crate::store::CommitCheck for GatedCheck {
        fn check(
            &self,
            _: &std::sync::Arc<serde_json::Value>,
            _: &[String],
        ) -> Result<(), crate::store::CheckError> {
            let _ = self.started.lock().unwrap().send(());
            let _ = self
                .release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30));
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_goes_away_mid_commit_loses_neither_commit_nor_apply() {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let check = Arc::new(GatedCheck {
            started: std::sync::Mutex::new(started_tx),
            release: std::sync::Mutex::new(release_rx),
        });
        let store =
            Store::open_with_check(state.path(), 10, Some(check), Default::default()).unwrap();
        let applier = applier(root.path(), "0");
        set(&store, "gone", "applied anyway").await;
        // The request's future is dropped while its commit is being checked: what a
        // client hanging up does to a handler.
        let request = tokio::spawn({
            let (a, s) = (applier.clone(), store.clone());
            let commit = commit(&store, "gone");
            async move { a.after_commit(&s, commit).await }
        });
        tokio::task::spawn_blocking(move || started.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the commit check never ran");
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while motd(root.path()) != "applied anyway\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit's apply never ran; motd {:?}, live {}",
                motd(root.path()),
                store.snapshot().live_settings()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.snapshot().live_settings()["motd"], "applied anyway");
    }
}
