//! Supervision logic against a fake runtime, with tokio's paused clock: back-off
//! timing, re-attach, restart on changed settings, removal, failures and containerd
//! outages, deterministically and in milliseconds of real time.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::containers::client::TaskState;
use crate::containers::runtime::{Existing, Prepared};
use crate::containers::spec::Tier;

#[derive(Default)]
struct FakeState {
    /// id → (config hash, task)
    records: HashMap<String, (String, Option<TaskState>)>,
    next_pid: u32,
    /// How long each started task runs before exiting with code 3; `None` = forever.
    run_for: Option<Duration>,
    /// Fail this many prepares first.
    prepare_failures: u32,
    /// containerd "down": every call fails as unavailable.
    down: bool,
    starts: Vec<tokio::time::Instant>,
    stops: Vec<String>,
    removes: Vec<String>,
}

#[derive(Default)]
struct Fake {
    state: Mutex<FakeState>,
}

impl Fake {
    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().expect("fake lock"))
    }

    fn check_up(&self) -> Result<(), RunError> {
        if self.with(|s| s.down) {
            Err(RunError::Unavailable("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

impl Runtime for Fake {
    async fn find(&self, id: &str) -> Result<Option<Existing>, RunError> {
        self.check_up()?;
        Ok(self.with(|s| {
            s.records.get(id).map(|(hash, task)| Existing {
                config_hash: hash.clone(),
                image_digest: "sha256:feed".into(),
                task: *task,
            })
        }))
    }

    async fn prepare(
        &self,
        desired: &DesiredContainer,
        _: &RegistryConfig,
    ) -> Result<Prepared, RunError> {
        self.check_up()?;
        self.with(|s| {
            if s.prepare_failures > 0 {
                s.prepare_failures -= 1;
                return Err(RunError::Failed("image: registry answered 500".into()));
            }
            let hash = desired
                .config_hash()
                .map_err(|e| RunError::Failed(e.to_string()))?;
            s.records.insert(desired.id(), (hash, None));
            Ok(Prepared {
                image_digest: "sha256:feed".into(),
                from_cache: false,
            })
        })
    }

    async fn start(&self, id: &str) -> Result<u32, RunError> {
        self.check_up()?;
        self.with(|s| {
            s.next_pid += 1;
            let pid = 100 + s.next_pid;
            s.starts.push(tokio::time::Instant::now());
            let record = s
                .records
                .get_mut(id)
                .ok_or_else(|| RunError::Failed("no record".into()))?;
            record.1 = Some(TaskState {
                pid,
                running: true,
                created_only: false,
                exit_status: 0,
            });
            Ok(pid)
        })
    }

    async fn wait(&self, id: &str) -> Result<i32, RunError> {
        self.check_up()?;
        let began = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            // containerd going away breaks the wait call; the task runs on.
            self.check_up()?;
            let due = self
                .with(|s| s.run_for)
                .is_some_and(|d| began.elapsed() >= d);
            if due {
                self.with(|s| {
                    if let Some((_, Some(task))) = s.records.get_mut(id) {
                        task.running = false;
                        task.exit_status = 3;
                    }
                });
                return Ok(3);
            }
        }
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<Option<i32>, RunError> {
        self.check_up()?;
        Ok(self.with(|s| {
            s.stops.push(id.to_owned());
            s.records.get_mut(id).and_then(|r| r.1.take()).map(|_| 143)
        }))
    }

    async fn delete_task(&self, id: &str) -> Result<Option<i32>, RunError> {
        self.check_up()?;
        Ok(self.with(|s| {
            s.records
                .get_mut(id)
                .and_then(|r| r.1.take())
                .map(|t| t.exit_status as i32)
        }))
    }

    async fn remove(&self, kind: ContainerKind, name: &str) -> Result<(), RunError> {
        self.check_up()?;
        let id = crate::containers::desired::container_id(kind, name);
        self.with(|s| {
            s.records.remove(&id);
            s.removes.push(id);
        });
        Ok(())
    }
}

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
    assert_eq!(
        h.fake.with(|s| s.starts.len()),
        1,
        "re-attached, not restarted"
    );
}

#[test]
fn backoff_doubles_and_caps() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
    let seq: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
    assert_eq!(seq, [1, 2, 4, 5, 5]);
    b.reset();
    assert_eq!(b.next_delay().as_secs(), 1);
}
