//! Running one bootstrap command list or one bootstrap container to completion.
//!
//! Bootstrap commands are `apiclient` invocations (the model refuses anything else),
//! run without a shell against keeld's own socket, one after another; the first that
//! fails ends the list. Bootstrap containers run in the bootstrap tier, with an
//! optional timeout after which they are killed; their task, record and snapshot are
//! removed once their outcome is recorded ([`clean_up`]), their persistent directory
//! kept.

use std::path::Path;
use std::time::Duration;

use super::runtime::BootRuntime;
use crate::containers::desired::DesiredContainer;
use crate::containers::registry::RegistryConfig;
use crate::containers::runtime::RunError;
use crate::containers::status::{ContainerKind, ContainerStatus, RunState, StatusBoard};

/// How long one bootstrap command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// How much of a failing command's output is kept for the boot record.
const OUTPUT_TAIL: usize = 2048;

/// Runs each argv in `commands` (argv\[0\] is `apiclient`, replaced by the real binary).
pub async fn run_commands(
    commands: &[Vec<String>],
    apiclient: &Path,
    socket: &Path,
) -> Result<String, String> {
    for (i, argv) in commands.iter().enumerate() {
        let Some(("apiclient", args)) = argv.split_first().map(|(a, rest)| (a.as_str(), rest))
        else {
            return Err(format!("command {i}: only apiclient may run at boot"));
        };
        let mut child = tokio::process::Command::new(apiclient);
        child
            .args(args)
            .env("APICLIENT_SOCKET", socket)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(COMMAND_TIMEOUT, child.output()).await {
            Err(_) => {
                return Err(format!(
                    "command {i} ({}) timed out after {COMMAND_TIMEOUT:?}",
                    shown(argv)
                ))
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "command {i}: cannot run {}: {e}",
                    apiclient.display()
                ))
            }
            Ok(Ok(o)) => o,
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail_start = stderr.len().saturating_sub(OUTPUT_TAIL);
            let tail_start = (tail_start..stderr.len())
                .find(|b| stderr.is_char_boundary(*b))
                .unwrap_or(stderr.len());
            return Err(format!(
                "command {i} ({}) failed ({}): {}",
                shown(argv),
                output.status,
                stderr[tail_start..].trim()
            ));
        }
    }
    Ok(format!("{} command(s) succeeded", commands.len()))
}

/// A command as the boot record shows it: `apiclient` and its subcommand; the rest is
/// counted, not shown (`apiclient set` arguments may be passwords or tokens, and the
/// record is served by GET /boot and logged).
fn shown(argv: &[String]) -> String {
    let words = argv
        .iter()
        .take(2)
        .take_while(|w| !w.contains('=') && !w.starts_with('{'))
        .count();
    let mut out = argv[..words].join(" ");
    if argv.len() > words {
        out.push_str(&format!(" (+{} arguments)", argv.len() - words));
    }
    out
}

/// How a bootstrap container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerRun {
    Exited(i32),
    /// Ran past its limit; `kill_failed` says why it could not be stopped (it may still
    /// run), `None` when it was.
    TimedOut {
        limit: Duration,
        kill_failed: Option<String>,
    },
}

/// How long the first wait for containerd lasts when it stops answering in the middle
/// of a bootstrap container; doubled each time up to [`OUTAGE_MAX`].
const OUTAGE_FIRST: Duration = Duration::from_secs(1);
const OUTAGE_MAX: Duration = Duration::from_secs(8);

/// What [`run_container`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Start it afresh (replacing whatever is there).
    Start,
    /// Ask containerd what is there. `gone_is_failure`: the task was started in this
    /// boot, so a missing task means it is gone, not that it still has to start.
    Look { gone_is_failure: bool },
    /// Wait for the running task to end.
    Wait,
}

/// Runs (or, after a keeld restart, resumes) bootstrap container `desired` to its end.
/// `resume` is true when the boot record shows it was started in this boot already:
/// it is then waited for, never started again, and its `timeout` has `ran_before` of
/// it used up.
///
/// containerd not answering (it restarted, or is not up yet) is not the container's
/// failure: keeld waits for it (1 s, doubling to 8 s), then looks at what is there and
/// goes on from it. A task keeps running while containerd is away (its shim holds it),
/// so a wait cut short is resumed, not taken for an exit; a task that was created and
/// never started is started afresh. The timeout counts from the start and keeps counting
/// through an outage: a container whose time is up while containerd does not answer
/// ends as timed out, not killed (it may still run).
pub async fn run_container(
    runtime: &dyn BootRuntime,
    board: &StatusBoard,
    desired: &DesiredContainer,
    registries: &RegistryConfig,
    timeout: Option<Duration>,
    ran_before: Duration,
    resume: bool,
) -> Result<ContainerRun, RunError> {
    let id = desired.id();
    let report = |change: &dyn Fn(&mut ContainerStatus)| {
        board.update(ContainerKind::Bootstrap, &desired.name, change, || {
            ContainerStatus::new(
                &desired.name,
                ContainerKind::Bootstrap,
                desired.tier.as_str(),
                &desired.source,
            )
        })
    };
    // The timeout counts from the container's start (not from the image pull or a wait
    // for containerd before it): set once the task is started, or, at a resume, from
    // what an earlier keeld used of it.
    let mut deadline = match resume {
        true => timeout.map(|limit| tokio::time::Instant::now() + limit.saturating_sub(ran_before)),
        false => None,
    };
    let started_now = |deadline: &mut Option<tokio::time::Instant>| {
        if deadline.is_none() {
            *deadline = timeout.map(|limit| tokio::time::Instant::now() + limit);
        }
    };
    let mut outage = crate::containers::supervisor::Backoff::new(OUTAGE_FIRST, OUTAGE_MAX);
    let mut next = if resume {
        Next::Look {
            gone_is_failure: true,
        }
    } else {
        Next::Start
    };
    loop {
        let step: Result<Option<ContainerRun>, RunError> = match next {
            Next::Start => {
                // A task left from an earlier boot (not this one: the record says this
                // one never started it), or created and never started, goes first.
                async {
                    runtime.stop(&id, Duration::ZERO).await?;
                    report(&|s| s.state = RunState::Starting);
                    let prepared = runtime.prepare(desired, registries).await?;
                    let pid = runtime.start(&id).await?;
                    started_now(&mut deadline);
                    report(&|s| {
                        s.state = RunState::Running;
                        s.pid = Some(pid);
                        s.image_digest = Some(prepared.image_digest.clone());
                        s.since = crate::store::now_rfc3339();
                    });
                    next = Next::Wait;
                    Ok(None)
                }
                .await
            }
            Next::Look { gone_is_failure } => match runtime.find(&id).await {
                Err(e) => Err(e),
                Ok(found) => match found.and_then(|existing| existing.task) {
                    Some(task) if task.created_only => {
                        tracing::info!(container = %id, "its task was created and never started; starting it afresh");
                        next = Next::Start;
                        Ok(None)
                    }
                    Some(task) if task.unknown => Err(RunError::Failed(format!(
                        "containerd cannot say what its task is doing (its shim does not answer; pid {})",
                        task.pid
                    ))),
                    Some(task) if task.running => {
                        started_now(&mut deadline);
                        tracing::info!(container = %id, pid = task.pid, "waiting for the bootstrap container started before");
                        report(&|s| {
                            s.state = RunState::Running;
                            s.pid = Some(task.pid);
                        });
                        next = Next::Wait;
                        Ok(None)
                    }
                    // It finished while keeld was away or containerd did not answer;
                    // its exit status is still there (and stays until [`clean_up`],
                    // after the outcome is recorded).
                    Some(task) => Ok(Some(ContainerRun::Exited(
                        i32::try_from(task.exit_status).unwrap_or(i32::MAX),
                    ))),
                    None if gone_is_failure => Err(RunError::Failed(
                        "it was started in this boot and its task is gone; not run again in this boot"
                            .into(),
                    )),
                    None => {
                        next = Next::Start;
                        Ok(None)
                    }
                },
            },
            Next::Wait => {
                let waited = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, runtime.wait(&id))
                        .await
                        .ok(),
                    None => Some(runtime.wait(&id).await),
                };
                match waited {
                    Some(Ok(code)) => Ok(Some(ContainerRun::Exited(code))),
                    Some(Err(e)) => Err(e),
                    None => {
                        let limit = timeout.unwrap_or_default();
                        tracing::warn!(container = %id, timeout = ?limit, "bootstrap container timed out; killing it");
                        let kill_failed = match runtime.stop(&id, Duration::ZERO).await {
                            Ok(_) => None,
                            Err(e) => {
                                tracing::error!(container = %id, error = %e, "cannot kill the timed-out bootstrap container; it may still run");
                                Some(e.to_string())
                            }
                        };
                        Ok(Some(ContainerRun::TimedOut { limit, kill_failed }))
                    }
                }
            }
        };
        match step {
            Ok(Some(run)) => return Ok(run),
            Ok(None) => outage.reset(),
            Err(e) if e.is_unavailable() => {
                // Started, and its time is up while containerd does not answer: it
                // cannot be killed now, and the boot does not wait for ever.
                if let (Some(limit), Some(due)) = (timeout, deadline) {
                    if tokio::time::Instant::now() >= due {
                        tracing::error!(container = %id, error = %e, "bootstrap container timed out while containerd does not answer; it may still run");
                        return Ok(ContainerRun::TimedOut {
                            limit,
                            kill_failed: Some(e.to_string()),
                        });
                    }
                }
                let mut delay = outage.next_delay();
                if let Some(due) = deadline {
                    delay = delay.min(due.saturating_duration_since(tokio::time::Instant::now()));
                }
                tracing::warn!(container = %id, error = %e, retry_in = ?delay, "containerd does not answer; the bootstrap container waits for it");
                tokio::time::sleep(delay).await;
                // Whatever was under way may or may not have reached containerd: look.
                next = Next::Look {
                    gone_is_failure: match next {
                        Next::Start => false,
                        Next::Look { gone_is_failure } => gone_is_failure,
                        Next::Wait => true,
                    },
                };
            }
            Err(e) => return Err(e),
        }
    }
}

/// Removes what a bootstrap container that ended leaves: its exited task, record and
/// snapshot (the persistent directory stays). Called once its outcome is recorded: the
/// exited task is where a keeld restarted before that finds the exit code again.
pub async fn clean_up(runtime: &dyn BootRuntime, desired: &DesiredContainer) {
    let id = desired.id();
    // An exited task left behind is replaced at the next start; say so only.
    if let Err(e) = runtime.delete_task(&id).await {
        tracing::warn!(container = %id, error = %e, "cannot delete the exited bootstrap task");
    }
    if let Err(e) = runtime
        .remove(ContainerKind::Bootstrap, &desired.name)
        .await
    {
        tracing::warn!(container = %desired.id(), error = %e, "cleaning up the bootstrap container failed");
    }
}

/// Marks a bootstrap container's final state on the status board.
pub fn report_end(
    board: &StatusBoard,
    desired: &DesiredContainer,
    state: RunState,
    code: Option<i32>,
    reason: Option<String>,
) {
    board.update(
        ContainerKind::Bootstrap,
        &desired.name,
        |s| {
            s.state = state;
            s.pid = None;
            s.last_exit_code = code.or(s.last_exit_code);
            s.reason = reason.clone();
            s.since = crate::store::now_rfc3339();
        },
        || ContainerStatus {
            state,
            last_exit_code: code,
            reason: reason.clone(),
            ..ContainerStatus::new(
                &desired.name,
                ContainerKind::Bootstrap,
                desired.tier.as_str(),
                &desired.source,
            )
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing bootstrap command is named by its subcommand; its arguments (values
    /// being set, maybe secrets) stay out of the boot record.
    #[test]
    fn a_command_is_shown_without_its_arguments() {
        let argv = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            shown(&argv(&[
                "apiclient",
                "set",
                "container-registry.credentials.0.password=hunter2"
            ])),
            "apiclient set (+1 arguments)"
        );
        assert_eq!(shown(&argv(&["apiclient", "apply"])), "apiclient apply");
        assert_eq!(
            shown(&argv(&["apiclient", "motd=x"])),
            "apiclient (+1 arguments)"
        );
    }
}
