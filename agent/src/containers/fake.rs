//! A fake container engine for unit tests: [`Runtime`], [`Prefetch`] and
//! [`Inventory`] on a table in memory, with time from tokio's clock (tests pause it).
//! It records every call the logic under test made, so the supervisor's and the boot's
//! tests assert on what reached the engine, without root and in milliseconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::client::TaskState;
use super::desired::{container_id, DesiredContainer};
use super::engine::{Inventory, Prefetch};
use super::registry::RegistryConfig;
use super::runtime::{Existing, Prepared, RunError, Runtime};
use super::status::ContainerKind;

/// How a started task behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Script {
    /// How long it runs, from its start, before it exits; `None` = until stopped.
    pub run_for: Option<Duration>,
    /// Its exit code.
    pub exit_code: i32,
}

/// One call of [`Runtime::stop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub id: String,
    pub grace: Duration,
    pub at: tokio::time::Instant,
    /// A running task was stopped (not an exited or absent one).
    pub ended_a_run: bool,
}

#[derive(Debug, Default)]
pub struct FakeState {
    /// id → (config hash, task)
    pub records: HashMap<String, (String, Option<TaskState>)>,
    pub next_pid: u32,
    /// How long each task runs from its start before exiting with code 3; `None` =
    /// forever.
    /// A task with its own entry in `scripts` follows that instead.
    pub run_for: Option<Duration>,
    /// Per container id: how its task behaves (also a task that was already running).
    pub scripts: HashMap<String, Script>,
    /// Fail this many prepares first.
    pub prepare_failures: u32,
    /// Fail this many stops of a running task first (the task keeps running).
    pub stop_failures: u32,
    /// containerd "down": every call fails as unavailable.
    pub down: bool,
    /// When each start happened.
    pub starts: Vec<tokio::time::Instant>,
    /// Which container each start was for, in order.
    pub started: Vec<String>,
    /// When the task of each id started (or was found running, see [`Fake::running`]):
    /// a task's run is counted from there, whoever waits for it and whenever.
    pub started_at: HashMap<String, tokio::time::Instant>,
    /// Every stop's container id.
    pub stops: Vec<String>,
    /// Every stop in full: when, with what grace (zero: killed at once), and whether
    /// it ended a running task.
    pub stop_log: Vec<Stop>,
    pub removes: Vec<String>,
    /// Image sources prefetched, in order.
    pub prefetched: Vec<String>,
    /// Panic (what keeld's crash is to the code under test) right after deleting this
    /// container's task, once.
    pub crash_after_deleting_task: Option<String>,
    /// Panic as a bug would (an ordinary panic, which keeld outlives) right after
    /// deleting this container's task, once.
    pub bug_after_deleting_task: Option<String>,
    /// Panic as a bug would when asked to start this container's task, once.
    pub bug_on_start: Option<String>,
}

/// The fake engine; share it as `Arc<Fake>`.
#[derive(Debug, Default)]
pub struct Fake {
    state: Mutex<FakeState>,
}

impl Fake {
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().expect("fake lock"))
    }

    fn check_up(&self) -> Result<(), RunError> {
        if self.with(|s| s.down) {
            Err(RunError::Unavailable("connection refused".into()))
        } else {
            Ok(())
        }
    }

    /// A record for `id` with a task running since now, as a keeld before a restart
    /// left it.
    pub fn running(&self, id: &str, config_hash: &str, pid: u32) {
        self.with(|s| {
            s.started_at
                .insert(id.to_owned(), tokio::time::Instant::now());
            s.records.insert(
                id.to_owned(),
                (
                    config_hash.to_owned(),
                    Some(TaskState {
                        pid,
                        running: true,
                        created_only: false,
                        unknown: false,
                        exit_status: 0,
                    }),
                ),
            )
        });
    }

    /// The task of `id` runs for `run_for` from its start, then exits with `exit_code`.
    pub fn script(&self, id: &str, run_for: Option<Duration>, exit_code: i32) {
        self.with(|s| {
            s.scripts
                .insert(id.to_owned(), Script { run_for, exit_code })
        });
    }

    /// Whether `id` has a task (created, running or exited and not yet deleted).
    pub fn has_task(&self, id: &str) -> bool {
        self.with(|s| s.records.get(id).is_some_and(|r| r.1.is_some()))
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
                fetch_failed: None,
            })
        })
    }

    async fn start(&self, id: &str) -> Result<u32, RunError> {
        self.check_up()?;
        let bug = self.with(|s| {
            let bug = s.bug_on_start.as_deref() == Some(id);
            if bug {
                s.bug_on_start = None;
            }
            bug
        });
        assert!(!bug, "a bug when starting {id}");
        self.with(|s| {
            s.next_pid += 1;
            let pid = 100 + s.next_pid;
            let record = s
                .records
                .get_mut(id)
                .ok_or_else(|| RunError::Failed("no record".into()))?;
            record.1 = Some(TaskState {
                pid,
                running: true,
                created_only: false,
                unknown: false,
                exit_status: 0,
            });
            let now = tokio::time::Instant::now();
            s.starts.push(now);
            s.started.push(id.to_owned());
            s.started_at.insert(id.to_owned(), now);
            Ok(pid)
        })
    }

    async fn wait(&self, id: &str) -> Result<i32, RunError> {
        self.check_up()?;
        let called = tokio::time::Instant::now();
        loop {
            // An exited task answers at once, as containerd's Wait does; a deleted one
            // is an error.
            let task = self.with(|s| s.records.get(id).and_then(|r| r.1));
            match task {
                None => return Err(RunError::Failed(format!("task {id} not found"))),
                Some(t) if !t.running => return Ok(t.exit_status as i32),
                Some(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            // containerd going away breaks the wait call; the task runs on.
            self.check_up()?;
            let exited = self.with(|s| {
                let script = s.scripts.get(id).copied().unwrap_or(Script {
                    run_for: s.run_for,
                    exit_code: 3,
                });
                let began = s.started_at.get(id).copied().unwrap_or(called);
                let due = script.run_for.is_some_and(|d| began.elapsed() >= d);
                if !due {
                    return None;
                }
                if let Some((_, Some(task))) = s.records.get_mut(id) {
                    task.running = false;
                    task.exit_status = script.exit_code as u32;
                }
                Some(script.exit_code)
            });
            if let Some(code) = exited {
                return Ok(code);
            }
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<Option<i32>, RunError> {
        self.check_up()?;
        let refused = self.with(|s| {
            let running = s
                .records
                .get(id)
                .and_then(|r| r.1.as_ref())
                .is_some_and(|t| t.running);
            let refused = running && s.stop_failures > 0;
            if refused {
                s.stop_failures -= 1;
            }
            refused
        });
        if refused {
            return Err(RunError::Failed(format!("the fake refused to stop {id}")));
        }
        Ok(self.with(|s| {
            s.stops.push(id.to_owned());
            let task = s.records.get_mut(id).and_then(|r| r.1.take());
            s.stop_log.push(Stop {
                id: id.to_owned(),
                grace,
                at: tokio::time::Instant::now(),
                ended_a_run: task.is_some_and(|t| t.running),
            });
            task.map(|t| if t.running { 143 } else { t.exit_status as i32 })
        }))
    }

    async fn delete_task(&self, id: &str) -> Result<Option<i32>, RunError> {
        self.check_up()?;
        let (deleted, crash, bug) = self.with(|s| {
            let deleted = s
                .records
                .get_mut(id)
                .and_then(|r| r.1.take())
                .map(|t| t.exit_status as i32);
            let crash = s.crash_after_deleting_task.as_deref() == Some(id);
            if crash {
                s.crash_after_deleting_task = None;
            }
            let bug = s.bug_after_deleting_task.as_deref() == Some(id);
            if bug {
                s.bug_after_deleting_task = None;
            }
            (deleted, crash, bug)
        });
        assert!(!bug, "a bug after deleting the task of {id}");
        if crash {
            // keeld dying here: the boot's guard lets this one through (see `Boot::run`).
            std::panic::panic_any(SimulatedCrash(format!(
                "simulated crash after deleting the task of {id}"
            )));
        }
        Ok(deleted)
    }

    async fn remove(&self, kind: ContainerKind, name: &str) -> Result<(), RunError> {
        self.check_up()?;
        let id = container_id(kind, name);
        self.with(|s| {
            s.records.remove(&id);
            s.removes.push(id);
        });
        Ok(())
    }
}

impl Prefetch for Fake {
    async fn prefetch_image(&self, source: &str, _: &RegistryConfig) {
        self.with(|s| s.prefetched.push(source.to_owned()));
    }
}

impl Inventory for Fake {
    async fn managed(&self, kind: ContainerKind) -> Result<Vec<String>, RunError> {
        self.check_up()?;
        let prefix = format!("{}-", kind.as_str());
        Ok(self.with(|s| {
            let mut names: Vec<String> = s
                .records
                .keys()
                .filter_map(|id| id.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            names.sort();
            names
        }))
    }
}

/// The payload of the panic by which the fake simulates keeld dying mid-call: the boot's
/// panic guard passes it on instead of failing the boot, as a real death would.
#[derive(Debug)]
pub struct SimulatedCrash(pub String);
