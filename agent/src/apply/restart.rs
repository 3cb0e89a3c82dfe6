//! Running a service's restart commands: argv without a shell, `CHANGED_SETTINGS` in the
//! environment, a timeout, output captured and bounded.
//!
//! A command runs in a process group of its own. The timeout covers the command's own
//! exit, not its output: a command that leaves a background process behind holding its
//! stdout or stderr (`sleep 30 & echo started`) is done when it exits, and its pipes are
//! read for at most [`DRAIN_GRACE`] more. On timeout the whole process group is killed
//! (the command and everything it started that stayed in the group), and the output
//! gathered so far is kept. At most [`OUTPUT_LIMIT`] bytes of each stream are kept, but
//! the pipes are always read on, so a chatty command never blocks on a full pipe.
//!
//! `CHANGED_SETTINGS` holds the changed keys that affect the service, separated by
//! spaces. The kernel bounds a single environment string (128 KiB), so when the keys
//! joined would exceed [`CHANGED_SETTINGS_LIMIT`], each key is cut to its first N
//! segments, for the largest N at which the distinct, sorted prefixes fit
//! (`settings.kubernetes.node-labels.a` → `settings.kubernetes.node-labels` at N = 3), down
//! to `settings` alone. Every entry then names a subtree in which something changed and
//! every changed key lies in one of them; so a consumer should treat an entry as "this key
//! or anything under it changed" (match a key equal to an entry, or below it, or above it).

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use settings_model::KeyPath;
use tokio::io::AsyncReadExt;

/// How much of a command's stdout and stderr is kept in its outcome.
const OUTPUT_LIMIT: usize = 16 * 1024;

/// How long the pipes are still read after the command exited (or its group was killed
/// on timeout), for output a background process may keep them open for.
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// The longest `CHANGED_SETTINGS` value before the keys are collapsed to subtrees; well
/// under the kernel's 128 KiB bound on one environment string.
pub const CHANGED_SETTINGS_LIMIT: usize = 64 * 1024;

/// What one restart command did.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct CommandOutcome {
    pub service: String,
    pub argv: Vec<String>,
    /// `None` when it did not exit on its own (not started, timed out, killed by a signal).
    pub exit_code: Option<i32>,
    pub success: bool,
    pub timed_out: bool,
    pub duration_ms: u64,
    pub stdout: String,
    pub stderr: String,
    /// Why it could not be run at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The value of `CHANGED_SETTINGS` for `keys`: joined with spaces, or collapsed to
/// subtrees when that would be longer than `limit` (see the module documentation).
pub fn changed_settings(keys: &[String], limit: usize) -> String {
    let joined = keys.join(" ");
    if joined.len() <= limit {
        return joined;
    }
    let paths: Vec<Vec<String>> = keys
        .iter()
        .map(|k| match KeyPath::parse(k) {
            Ok(path) => path.segments().to_vec(),
            // Not a key path (never expected): its text as one segment keeps it whole.
            Err(_) => vec![k.clone()],
        })
        .collect();
    let deepest = paths.iter().map(Vec::len).max().unwrap_or(1);
    let mut value = joined;
    for depth in (1..deepest).rev() {
        let prefixes: BTreeSet<String> = paths
            .iter()
            .map(|segments| {
                let cut = segments[..segments.len().min(depth)].to_vec();
                KeyPath::from_segments(cut).map_or_else(String::new, |p| p.to_string())
            })
            .collect();
        value = prefixes.into_iter().collect::<Vec<_>>().join(" ");
        if value.len() <= limit {
            break;
        }
    }
    value
}

/// Runs `argv` with `CHANGED_SETTINGS` set to the space-separated `keys`.
pub async fn run(
    service: &str,
    argv: &[String],
    keys: &[String],
    timeout: Duration,
) -> CommandOutcome {
    let started = Instant::now();
    let mut outcome = CommandOutcome {
        service: service.to_owned(),
        argv: argv.to_vec(),
        exit_code: None,
        success: false,
        timed_out: false,
        duration_ms: 0,
        stdout: String::new(),
        stderr: String::new(),
        error: None,
    };
    let Some((program, args)) = argv.split_first() else {
        outcome.error = Some("empty command".to_owned());
        return outcome;
    };
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .env(
            "CHANGED_SETTINGS",
            changed_settings(keys, CHANGED_SETTINGS_LIMIT),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            outcome.error = Some(format!("cannot run {program:?}: {e}"));
            return outcome;
        }
    };
    // The child leads its own process group: its pid is the group's id.
    let pgid = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = {
        let reading = async {
            tokio::join!(
                read_bounded(stdout.as_mut(), &mut out),
                read_bounded(stderr.as_mut(), &mut err)
            );
        };
        let mut reading = std::pin::pin!(reading);
        let mut read_all = false;
        let waited = tokio::time::timeout(timeout, async {
            loop {
                tokio::select! {
                    status = child.wait() => break status,
                    () = &mut reading, if !read_all => read_all = true,
                }
            }
        })
        .await;
        let status = match waited {
            Ok(status) => Some(status),
            Err(_) => {
                // The group leader has not been reaped (its wait did not finish), so
                // the id still names its group.
                if let Some(pgid) = pgid.and_then(rustix::process::Pid::from_raw) {
                    let _ =
                        rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
                }
                let _ = child.start_kill();
                let _ = child.wait().await;
                None
            }
        };
        if !read_all {
            let _ = tokio::time::timeout(DRAIN_GRACE, &mut reading).await;
        }
        status
    };
    drop((stdout, stderr));
    outcome.stdout = String::from_utf8_lossy(&out).into_owned();
    outcome.stderr = String::from_utf8_lossy(&err).into_owned();
    match status {
        Some(Ok(status)) => {
            outcome.exit_code = status.code();
            outcome.success = status.success();
        }
        Some(Err(e)) => outcome.error = Some(format!("waiting for {program:?}: {e}")),
        None => {
            outcome.timed_out = true;
            outcome.error = Some(format!("timed out after {}s", timeout.as_secs_f32()));
        }
    }
    outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    outcome
}

/// Reads `pipe` to its end into `kept`, keeping at most [`OUTPUT_LIMIT`] bytes. What was
/// read stays in `kept` when the read is abandoned half-way.
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(pipe: Option<&mut R>, kept: &mut Vec<u8>) {
    let Some(pipe) = pipe else {
        return;
    };
    let mut buf = [0u8; 4096];
    // Keep reading past the limit so the child never blocks on a full pipe.
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_LIMIT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Whether `pid` is gone (or a zombie left for a reaper that may not reap it).
    fn gone(pid: libc::pid_t) -> bool {
        let exists = rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
        if !exists {
            return true;
        }
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    }

    async fn wait_gone(pid: libc::pid_t) -> bool {
        for _ in 0..50 {
            if gone(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn runs_without_a_shell_with_changed_settings() {
        let keys = vec!["settings.motd".to_owned(), "settings.ntp".to_owned()];
        let out = run("s", &argv(&["/usr/bin/env"]), &keys, Duration::from_secs(5)).await;
        assert!(out.success, "{out:?}");
        assert!(out
            .stdout
            .contains("CHANGED_SETTINGS=settings.motd settings.ntp"));
        // A shell metacharacter is just an argument.
        let out = run(
            "s",
            &argv(&["/bin/echo", "a;", "false"]),
            &[],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(out.stdout, "a; false\n");
    }

    #[tokio::test]
    async fn failure_timeout_and_missing_program_are_reported() {
        let out = run("s", &argv(&["/bin/false"]), &[], Duration::from_secs(5)).await;
        assert_eq!((out.success, out.exit_code), (false, Some(1)));
        let out = run(
            "s",
            &argv(&["/bin/sleep", "5"]),
            &[],
            Duration::from_millis(100),
        )
        .await;
        assert!(out.timed_out && !out.success, "{out:?}");
        let out = run("s", &argv(&["/nonexistent"]), &[], Duration::from_secs(5)).await;
        assert!(out.error.unwrap().contains("cannot run"));
    }

    #[tokio::test]
    async fn a_background_child_holding_stdout_does_not_fail_the_command() {
        let started = Instant::now();
        let out = run(
            "s",
            &argv(&["/bin/sh", "-c", "sleep 30 & echo started $!; exit 0"]),
            &[],
            Duration::from_secs(3),
        )
        .await;
        assert!(out.success && !out.timed_out, "{out:?}");
        assert_eq!(out.exit_code, Some(0));
        assert!(out.stdout.starts_with("started "), "{out:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{out:?}");
        // The background child is the command's business: it is left running.
        let pid: libc::pid_t = out.stdout["started ".len()..].trim().parse().unwrap();
        assert!(!gone(pid));
        kill(pid);
    }

    /// SIGKILL to the test's own leftover.
    fn kill(pid: libc::pid_t) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_grandchildren_and_keeps_partial_output() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "sleep 30 & echo $! > {}; echo partial; echo oops >&2; sleep 30",
            pidfile.display()
        );
        let out = run(
            "s",
            &argv(&["/bin/sh", "-c", &script]),
            &[],
            Duration::from_millis(500),
        )
        .await;
        assert!(out.timed_out && !out.success, "{out:?}");
        assert_eq!(out.exit_code, None);
        assert_eq!(out.stdout, "partial\n", "{out:?}");
        assert_eq!(out.stderr, "oops\n", "{out:?}");
        assert!(out.duration_ms < 2000, "{out:?}");
        let pid: libc::pid_t = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let killed = wait_gone(pid).await;
        if !killed {
            kill(pid);
        }
        assert!(killed, "grandchild {pid} survived the timeout");
    }

    #[tokio::test]
    async fn output_is_bounded_and_a_chatty_command_does_not_block() {
        let out = run(
            "s",
            &argv(&["/bin/sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x"]),
            &[],
            Duration::from_secs(5),
        )
        .await;
        assert!(
            out.success,
            "{:?}",
            (out.exit_code, out.timed_out, &out.error)
        );
        assert_eq!(out.stdout.len(), OUTPUT_LIMIT);
    }

    #[test]
    fn changed_settings_collapse_to_the_deepest_subtrees_that_fit() {
        let keys = argv(&[
            "settings.kernel.sysctl.\"vm.a\"",
            "settings.kernel.sysctl.\"vm.b\"",
            "settings.motd",
        ]);
        assert_eq!(
            changed_settings(&keys, 1000),
            "settings.kernel.sysctl.\"vm.a\" settings.kernel.sysctl.\"vm.b\" settings.motd"
        );
        assert_eq!(
            changed_settings(&keys, 40),
            "settings.kernel.sysctl settings.motd"
        );
        assert_eq!(changed_settings(&keys, 30), "settings.kernel settings.motd");
        assert_eq!(changed_settings(&keys, 5), "settings");
    }

    #[tokio::test]
    async fn thousands_of_long_keys_still_run_the_command() {
        let mut keys: Vec<String> = (0..5000)
            .map(|i| {
                format!(
                    "settings.kubernetes.node-labels.\"example.com/a-rather-long-label-name-{i:05}\""
                )
            })
            .collect();
        keys.push("settings.motd".to_owned());
        assert!(keys.join(" ").len() > 128 * 1024);
        let out = run(
            "s",
            &argv(&["/bin/sh", "-c", "printf %s \"$CHANGED_SETTINGS\""]),
            &keys,
            Duration::from_secs(5),
        )
        .await;
        assert!(out.success, "{out:?}");
        assert_eq!(out.stdout, "settings.kubernetes.node-labels settings.motd");
    }
}
