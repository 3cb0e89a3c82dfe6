//! Running a service's restart commands: argv without a shell, `CHANGED_SETTINGS` in the
//! environment, a timeout, output captured and bounded.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt;

/// How much of a command's stdout and stderr is kept in its outcome.
const OUTPUT_LIMIT: usize = 16 * 1024;

/// What one restart command did.
#[derive(Debug, Clone, Serialize, PartialEq)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
        .env("CHANGED_SETTINGS", keys.join(" "))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            outcome.error = Some(format!("cannot run {program:?}: {e}"));
            return outcome;
        }
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let collect = async {
        let (out, err) = tokio::join!(read_bounded(stdout), read_bounded(stderr));
        let status = child.wait().await;
        (out, err, status)
    };
    match tokio::time::timeout(timeout, collect).await {
        Ok((out, err, status)) => {
            outcome.stdout = out;
            outcome.stderr = err;
            match status {
                Ok(status) => {
                    outcome.exit_code = status.code();
                    outcome.success = status.success();
                }
                Err(e) => outcome.error = Some(format!("waiting for {program:?}: {e}")),
            }
        }
        Err(_) => {
            // Dropping the future drops the child: kill_on_drop sends SIGKILL.
            outcome.timed_out = true;
            outcome.error = Some(format!("timed out after {}s", timeout.as_secs_f32()));
        }
    }
    outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    outcome
}

async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    // Keep reading past the limit so the child never blocks on a full pipe.
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_LIMIT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
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
}
