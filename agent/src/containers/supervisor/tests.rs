//! Supervision logic against a fake runtime, with tokio's paused clock: back-off
//! timing, re-attach, restart on changed settings, removal, failures and containerd
//! outages, deterministically and in milliseconds of real time.

use super::*;
use crate::containers::client::TaskState;
use crate::containers::fake::Fake;
use crate::containers::spec::Tier;

fn desired(user_data: &str) -> DesiredContainer {
    DesiredContainer {
        name: "admin".into(),
        kind: ContainerKind::Host,
        tier: Tier::Host,
        tier_name: "host",
        source: "oci-archive:/a.tar".into(),
        user_data: Some(user_data.as_bytes().to_vec()),
        user_data_digest: Some(user_data.into()),
        command: None,
        environment: Vec::new(),
        capabilities: Vec::new(),
        memory_limit_bytes: None,
        cpu_limit_millicores: None,
        problem: None,
    }
}

struct Harness {
    fake: Arc<Fake>,
    board: StatusBoard,
    desired: watch::Sender<Option<DesiredContainer>>,
    _registries: watch::Sender<Arc<RegistryConfig>>,
}

fn config() -> SupervisorConfig {
    SupervisorConfig {
        grace: Duration::from_secs(10),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
        backoff_reset_after: Duration::from_secs(60),
        containerd_poll: Duration::from_millis(500),
    }
}

fn start(fake: Fake, initial: Option<DesiredContainer>) -> Harness {
    let fake = Arc::new(fake);
    let board = StatusBoard::default();
    let (desired, rx) = watch::channel(initial);
    let (registries, reg_rx) = watch::channel(Arc::new(RegistryConfig::default()));
    tokio::spawn(supervise(
        fake.clone(),
        board.clone(),
        config(),
        ContainerKind::Host,
        "admin".into(),
        Inputs {
            desired: rx,
            registries: reg_rx,
        },
    ));
    Harness {
        fake,
        board,
        desired,
        _registries: registries,
    }
}

impl Harness {
    fn status(&self) -> Option<ContainerStatus> {
        self.board.get(ContainerKind::Host, "admin")
    }
}

/// Lets the supervisor run until it waits on time, advancing the paused clock by `d`.
async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn a_crashing_container_restarts_with_doubling_backoff_up_to_the_cap() {
    let fake = Fake::default();
    fake.with(|s| s.run_for = Some(Duration::from_millis(100)));
    let h = start(fake, Some(desired("x")));
    let t0 = tokio::time::Instant::now();
    advance(Duration::from_secs(40)).await;
    let starts = h.fake.with(|s| s.starts.clone());
    let gaps: Vec<u64> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    // Each run lasts 100 ms, then the delay: 1 s, 2 s, 4 s, 8 s, 8 s (capped) …
    assert_eq!(&gaps[..5], &[1100, 2100, 4100, 8100, 8100], "{gaps:?}");
    assert!(starts[0] - t0 < Duration::from_millis(1));
    let status = h.status().expect("status");
    assert_eq!(status.last_exit_code, Some(3));
    assert_eq!(status.restarts as usize, starts.len() - 1);
}

#[tokio::test(start_paused = true)]
async fn a_long_run_resets_the_backoff() {
    let fake = Fake::default();
    fake.with(|s| s.run_for = Some(Duration::from_secs(61)));
    let h = start(fake, Some(desired("x")));
    advance(Duration::from_secs(200)).await;
    let starts = h.fake.with(|s| s.starts.clone());
    let gaps: Vec<u64> = starts.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    assert!(gaps.len() >= 2 && gaps.iter().all(|g| *g == 62), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn a_running_container_with_the_same_settings_is_reattached_not_restarted() {
    let fake = Fake::default();
    let d = desired("x");
    fake.with(|s| {
        s.records.insert(
            d.id(),
            (
                d.config_hash().expect("hash"),
                Some(TaskState {
                    pid: 4242,
                    running: true,
                    created_only: false,
                    unknown: false,
                    exit_status: 0,
                }),
            ),
        )
    });
    let h = start(fake, Some(d));
    advance(Duration::from_secs(5)).await;
    assert!(h.fake.with(|s| s.starts.is_empty() && s.stops.is_empty()));
    let status = h.status().expect("status");
    assert_eq!(status.state, RunState::Running);
    assert_eq!(status.pid, Some(4242));
    assert_eq!(status.image_digest.as_deref(), Some("sha256:feed"));
}

#[tokio::test(start_paused = true)]
async fn a_running_container_with_older_settings_is_recreated() {
    let fake = Fake::default();
    let old = desired("old");
    fake.with(|s| {
        s.records.insert(
            old.id(),
            (
                old.config_hash().expect("hash"),
                Some(TaskState {
                    pid: 7,
                    running: true,
                    created_only: false,
                    unknown: false,
                    exit_status: 0,
                }),
            ),
        )
    });
    let h = start(fake, Some(desired("new")));
    advance(Duration::from_secs(1)).await;
    assert_eq!(h.fake.with(|s| (s.stops.len(), s.starts.len())), (1, 1));
    assert_eq!(h.status().expect("status").state, RunState::Running);
}

#[tokio::test(start_paused = true)]
async fn changed_settings_restart_only_when_the_hash_changes() {
    let h = start(Fake::default(), Some(desired("a")));
    advance(Duration::from_secs(1)).await;
    assert_eq!(h.fake.with(|s| s.starts.len()), 1);
    // The same desired state sent again: nothing happens.
    h.desired.send_replace(Some(desired("a")));
    advance(Duration::from_secs(1)).await;
    assert_eq!(h.fake.with(|s| (s.starts.len(), s.stops.len())), (1, 0));
    // New user-data: stopped and started again, at once (no back-off).
    h.desired.send_replace(Some(desired("b")));
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.fake.with(|s| (s.starts.len(), s.stops.len())), (2, 1));
    let status = h.status().expect("status");
    assert_eq!((status.state, status.restarts), (RunState::Running, 1));
}

#[tokio::test(start_paused = true)]
async fn disabling_stops_and_removes_then_enabling_starts_again() {
    let h = start(Fake::default(), Some(desired("a")));
    advance(Duration::from_secs(1)).await;
    h.desired.send_replace(None);
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.fake.with(|s| s.removes.clone()), ["host-admin"]);
    assert!(
        h.status().is_none(),
        "a removed container leaves the status board"
    );
    h.desired.send_replace(Some(desired("a")));
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.fake.with(|s| s.starts.len()), 2);
    assert_eq!(h.status().expect("status").state, RunState::Running);
}

#[tokio::test(start_paused = true)]
async fn a_failure_is_shown_with_its_reason_and_retried() {
    let fake = Fake::default();
    fake.with(|s| s.prepare_failures = 2);
    let h = start(fake, Some(desired("a")));
    advance(Duration::from_millis(10)).await;
    let status = h.status().expect("status");
    assert_eq!(status.state, RunState::Failed);
    assert_eq!(
        status.reason.as_deref(),
        Some("image: registry answered 500")
    );
    assert!(status.next_start.is_some());
    // Retries after 1 s, then 2 s.
    advance(Duration::from_secs(3)).await;
    assert_eq!(h.status().expect("status").state, RunState::Running);
    assert_eq!(h.fake.with(|s| s.starts.len()), 1);
}

#[tokio::test(start_paused = true)]
async fn settings_that_cannot_become_a_container_are_its_failure_not_a_start() {
    let mut broken = desired("a");
    broken.problem = Some("user-data is not base64: invalid padding".into());
    let h = start(Fake::default(), Some(broken));
    advance(Duration::from_secs(5)).await;
    assert!(h.fake.with(|s| s.starts.is_empty() && s.records.is_empty()));
    let status = h.status().expect("status");
    assert_eq!(status.state, RunState::Failed);
    assert_eq!(
        status.reason.as_deref(),
        Some("user-data is not base64: invalid padding")
    );
    // Fixed settings start it.
    h.desired.send_replace(Some(desired("a")));
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.status().expect("status").state, RunState::Running);
}

/// A running container whose settings stop making a container (its source unset) is
/// stopped and removed, not left running from the earlier settings; it waits for new
/// settings rather than retrying what cannot work.
#[tokio::test(start_paused = true)]
async fn a_running_container_whose_settings_break_is_removed_and_waits_for_new_ones() {
    let h = start(Fake::default(), Some(desired("a")));
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.status().expect("status").state, RunState::Running);
    let mut broken = desired("a");
    broken.source = String::new();
    broken.problem = Some("settings.host-containers.admin.source is not set".into());
    h.desired.send_replace(Some(broken));
    advance(Duration::from_secs(60)).await;
    assert!(
        h.fake.with(|s| s.records.is_empty()),
        "the old container is removed"
    );
    let status = h.status().expect("status");
    assert_eq!(status.state, RunState::Failed);
    assert_eq!(
        status.reason.as_deref(),
        Some("settings.host-containers.admin.source is not set")
    );
    assert_eq!(status.next_start, None, "no retry is promised");
    assert_eq!(h.fake.with(|s| s.starts.len()), 1);
    // Settings that work start it again.
    h.desired.send_replace(Some(desired("b")));
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.status().expect("status").state, RunState::Running);
    assert_eq!(h.fake.with(|s| s.starts.len()), 2);
}

/// A container running from earlier settings (keeld restarted meanwhile) whose removal
/// fails: the failure is in the status, and the removal is retried after the back-off,
/// until it goes.
#[tokio::test(start_paused = true)]
async fn a_failed_removal_of_the_old_container_is_shown_and_retried() {
    let fake = Fake::default();
    let old = desired("a");
    fake.running(&old.id(), &old.config_hash().expect("hash"), 7);
    fake.with(|s| s.stop_failures = 1);
    let mut broken = desired("a");
    broken.problem = Some("settings.host-containers.admin.source is not set".into());
    let h = start(fake, Some(broken));
    advance(Duration::from_millis(100)).await;
    let status = h.status().expect("status");
    assert_eq!(status.state, RunState::Failed);
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.starts_with("settings.host-containers.admin.source is not set; the container its earlier settings made cannot be removed"),
        "{reason}"
    );
    assert!(!h.fake.with(|s| s.records.is_empty()));
    advance(Duration::from_secs(5)).await;
    assert!(
        h.fake.with(|s| s.records.is_empty()),
        "removed at the retry"
    );
    assert_eq!(
        h.status().expect("status").reason.as_deref(),
        Some("settings.host-containers.admin.source is not set")
    );
}

#[tokio::test(start_paused = true)]
async fn while_containerd_is_down_it_waits_then_reattaches() {
    let h = start(Fake::default(), Some(desired("a")));
    advance(Duration::from_millis(10)).await;
    let pid = h.status().and_then(|s| s.pid).expect("pid");
    h.fake.with(|s| s.down = true);
    advance(Duration::from_secs(3)).await;
    let during = h.status().expect("status");
    assert_eq!(during.state, RunState::WaitingForContainerd, "{during:?}");
    assert!(during
        .reason
        .is_some_and(|r| r.contains("connection refused")));
    h.fake.with(|s| s.down = false);
    advance(Duration::from_secs(1)).await;
    let after = h.status().expect("status");
    assert_eq!((after.state, after.pid), (RunState::Running, Some(pid)));
    assert_eq!(after.reason, None, "the outage is over: {after:?}");
    assert_eq!(
        h.fake.with(|s| s.starts.len()),
        1,
        "re-attached, not restarted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_removal_that_fails_is_shown_and_retried_not_forgotten() {
    let h = start(Fake::default(), Some(desired("a")));
    advance(Duration::from_millis(10)).await;
    h.fake.with(|s| s.stop_failures = 2);
    h.desired.send_replace(None);
    advance(Duration::from_millis(10)).await;
    let during = h
        .status()
        .expect("a container that may still run stays on the board");
    assert_eq!(during.state, RunState::Failed, "{during:?}");
    assert!(
        during
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("cannot remove it: the fake refused to stop")),
        "{during:?}"
    );
    assert!(h.fake.with(|s| s.removes.is_empty()));
    // Retried after 1 s, then 2 s: the third try removes it.
    advance(Duration::from_secs(4)).await;
    assert_eq!(h.fake.with(|s| s.removes.clone()), ["host-admin"]);
    assert!(h.status().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_task_that_exited_while_keeld_was_away_counts_as_an_exit() {
    let fake = Fake::default();
    let d = desired("x");
    fake.with(|s| {
        s.records.insert(
            d.id(),
            (
                d.config_hash().expect("hash"),
                Some(TaskState {
                    pid: 4242,
                    running: false,
                    created_only: false,
                    unknown: false,
                    exit_status: 7,
                }),
            ),
        )
    });
    let h = start(fake, Some(d));
    advance(Duration::from_millis(500)).await;
    let status = h.status().expect("status");
    assert_eq!(
        (status.state, status.last_exit_code),
        (RunState::Exited, Some(7)),
        "{status:?}"
    );
    assert!(status.next_start.is_some());
    assert!(
        h.fake.with(|s| s.starts.is_empty()),
        "not before the back-off"
    );
    advance(Duration::from_secs(1)).await;
    let status = h.status().expect("status");
    assert_eq!((status.state, status.restarts), (RunState::Running, 1));
    assert_eq!(status.last_exit_code, Some(7));

    // Exited with settings changed meanwhile: recreated at once, its code kept.
    let fake = Fake::default();
    let old = desired("old");
    fake.with(|s| {
        s.records.insert(
            old.id(),
            (
                old.config_hash().expect("hash"),
                Some(TaskState {
                    pid: 4242,
                    running: false,
                    created_only: false,
                    unknown: false,
                    exit_status: 9,
                }),
            ),
        )
    });
    let h = start(fake, Some(desired("new")));
    advance(Duration::from_millis(10)).await;
    let status = h.status().expect("status");
    assert_eq!(status.state, RunState::Running, "{status:?}");
    assert_eq!(status.last_exit_code, Some(9));
}

#[test]
fn backoff_doubles_and_caps() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
    let seq: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
    assert_eq!(seq, [1, 2, 4, 5, 5]);
    b.reset();
    assert_eq!(b.next_delay().as_secs(), 1);
}

/// The host-container reconciler ([`crate::containers::run_host_containers`]) on a
/// real store in a temp dir, with the fake engine.
mod reconciler {
    use super::*;
    use crate::boot::BootGate;
    use crate::store::{Caller, Store};

    struct Node {
        _dir: tempfile::TempDir,
        store: Store,
        fake: Arc<Fake>,
        board: StatusBoard,
        gate: watch::Sender<BootGate>,
    }

    /// A store whose live settings enable host container `admin`, and containerd
    /// holding `host-old` (running), which the settings no longer mention.
    async fn node() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 10).expect("store");
        let patch = serde_json::json!({"host-containers": {"admin": {
            "enabled": true, "source": "oci-archive:/admin.tar"
        }}});
        store.patch("t", patch).await.expect("patch");
        store.commit("t", Caller::keeld()).await.expect("commit");
        let fake = Arc::new(Fake::default());
        fake.running("host-old", "an-older-hash", 55);
        let board = StatusBoard::default();
        let (gate, configured) = watch::channel(BootGate::Pending);
        tokio::spawn(crate::containers::run_host_containers(
            store.clone(),
            fake.clone(),
            board.clone(),
            config(),
            configured,
        ));
        Node {
            _dir: dir,
            store,
            fake,
            board,
            gate,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn host_containers_wait_for_the_boot_then_start_and_leftovers_are_removed() {
        let n = node().await;
        advance(Duration::from_secs(5)).await;
        let waiting = n.board.get(ContainerKind::Host, "admin").expect("status");
        assert_eq!(waiting.state, RunState::WaitingForBoot);
        assert!(n.fake.with(|s| s.started.is_empty() && s.stops.is_empty()));

        n.gate.send_replace(BootGate::Configured);
        advance(Duration::from_secs(1)).await;
        assert_eq!(n.fake.with(|s| s.started.clone()), ["host-admin"]);
        let admin = n.board.get(ContainerKind::Host, "admin").expect("status");
        assert_eq!(admin.state, RunState::Running);
        // Found by label, though no setting names it: stopped and removed.
        assert_eq!(n.fake.with(|s| s.removes.clone()), ["host-old"]);
        assert!(n.fake.with(|s| s.stops.contains(&"host-old".to_owned())));
        assert!(n.board.get(ContainerKind::Host, "old").is_none());

        // A commit that disables it reaches its supervisor.
        let off = serde_json::json!({"host-containers": {"admin": {"enabled": false}}});
        n.store.patch("t", off).await.expect("patch");
        n.store.commit("t", Caller::keeld()).await.expect("commit");
        advance(Duration::from_secs(1)).await;
        assert!(n
            .fake
            .with(|s| s.removes.contains(&"host-admin".to_owned())));
        assert!(n.board.get(ContainerKind::Host, "admin").is_none());
    }

    /// containerd does not answer when the boot is configured: the leftover is removed
    /// once it does (before, the list was asked once, and a container the settings
    /// dropped while keeld was stopped ran on unseen).
    #[tokio::test(start_paused = true)]
    async fn leftovers_are_found_once_containerd_answers() {
        let n = node().await;
        n.fake.with(|s| s.down = true);
        n.gate.send_replace(BootGate::Configured);
        advance(Duration::from_secs(5)).await;
        assert!(n.fake.with(|s| s.removes.is_empty()));
        n.fake.with(|s| s.down = false);
        advance(Duration::from_secs(10)).await;
        assert_eq!(n.fake.with(|s| s.removes.clone()), ["host-old"]);
        assert_eq!(n.fake.with(|s| s.started.clone()), ["host-admin"]);
    }

    /// A supervisor that panics (a bug): its container shows `failed` with the reason,
    /// and the next commit puts a new supervisor in charge, which starts it.
    #[tokio::test(start_paused = true)]
    async fn a_supervisor_that_panics_is_reported_and_replaced_at_the_next_commit() {
        let n = node().await;
        n.gate.send_replace(BootGate::Configured);
        advance(Duration::from_secs(5)).await;
        assert_eq!(n.fake.with(|s| s.started.clone()), ["host-admin"]);
        // Changed settings restart it; that start panics.
        n.fake.with(|s| s.bug_on_start = Some("host-admin".into()));
        let changed = serde_json::json!({"host-containers": {"admin": {"user-data": "aGk="}}});
        n.store.patch("t", changed).await.expect("patch");
        n.store.commit("t", Caller::keeld()).await.expect("commit");
        advance(Duration::from_secs(5)).await;
        let admin = n.board.get(ContainerKind::Host, "admin").expect("status");
        assert_eq!(admin.state, RunState::Failed);
        assert!(
            admin.reason.as_deref().is_some_and(|r| r.contains("a bug")),
            "{admin:?}"
        );
        assert_eq!(n.fake.with(|s| s.started.len()), 1);

        let motd = serde_json::json!({"motd": "any commit"});
        n.store.patch("t", motd).await.expect("patch");
        n.store.commit("t", Caller::keeld()).await.expect("commit");
        advance(Duration::from_secs(5)).await;
        assert_eq!(n.fake.with(|s| s.started.len()), 2);
        let admin = n.board.get(ContainerKind::Host, "admin").expect("status");
        assert_eq!(admin.state, RunState::Running);
    }

    /// A commit after a quiet moment is reconciled at once; one right after a reconcile
    /// waits for the pace, and then the newest settings are reconciled.
    #[tokio::test(start_paused = true)]
    async fn reconciles_are_paced_under_a_stream_of_commits() {
        let n = node().await;
        n.gate.send_replace(BootGate::Configured);
        advance(Duration::from_secs(5)).await;
        assert_eq!(n.fake.with(|s| s.started.len()), 1);
        let commit = |enabled: bool| {
            let store = n.store.clone();
            async move {
                let patch = serde_json::json!({"host-containers": {"admin": {"enabled": enabled}}});
                store.patch("t", patch).await.expect("patch");
                store.commit("t", Caller::keeld()).await.expect("commit");
            }
        };
        commit(false).await;
        advance(Duration::from_millis(1)).await;
        assert!(
            n.board.get(ContainerKind::Host, "admin").is_none(),
            "reconciled at once"
        );
        commit(true).await;
        advance(Duration::from_millis(1)).await;
        assert!(
            n.board.get(ContainerKind::Host, "admin").is_none(),
            "not before the pace"
        );
        // Two more commits inside the pace: only the newest counts.
        commit(false).await;
        commit(true).await;
        advance(crate::containers::RECONCILE_PACE).await;
        advance(Duration::from_secs(1)).await;
        assert_eq!(n.fake.with(|s| s.started.len()), 2);
        let admin = n.board.get(ContainerKind::Host, "admin").expect("status");
        assert_eq!(admin.state, RunState::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failed_boot_host_containers_are_not_started() {
        let n = node().await;
        n.gate.send_replace(BootGate::Failed);
        advance(Duration::from_secs(60)).await;
        let admin = n.board.get(ContainerKind::Host, "admin").expect("status");
        assert_eq!(admin.state, RunState::NotStarted);
        assert!(admin.reason.is_some_and(|r| r.contains("the boot failed")));
        // Nothing reached the engine: not even the leftover was touched.
        assert!(n
            .fake
            .with(|s| s.started.is_empty() && s.stops.is_empty() && s.removes.is_empty()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_boot_that_fell_back_to_the_os_defaults_starts_what_they_enable() {
        let n = node().await;
        n.gate.send_replace(BootGate::FailedOnDefaults);
        advance(Duration::from_secs(1)).await;
        assert_eq!(n.fake.with(|s| s.started.clone()), ["host-admin"]);
    }
}
