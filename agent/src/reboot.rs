//! Rebooting the host: the configured command (`--reboot-command`, `systemctl reboot` by
//! default), run without a shell, for `POST /actions/reboot` and for the boot's
//! `reboot-to-reconcile`.
//!
//! Owns only running the command and how its failures read; whoever asks decides when.

use std::time::Duration;

/// How long the reboot command may take to be accepted.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Why the host could not be told to reboot.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    #[error("no reboot command is configured")]
    NotConfigured,
    #[error("reboot command timed out after {}s", .0.as_secs())]
    TimedOut(Duration),
    #[error("cannot run reboot command {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reboot command failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("reboot task failed: {0}")]
    Task(String),
}

/// Runs `argv` and answers once it succeeded. On a task of its own: a caller that goes
/// away (a client hanging up) cannot cut a reboot half way.
pub async fn reboot(argv: &[String]) -> Result<(), RebootError> {
    run_within(argv, TIMEOUT).await
}

async fn run_within(argv: &[String], timeout: Duration) -> Result<(), RebootError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(RebootError::NotConfigured);
    };
    tracing::warn!(command = ?argv, "reboot requested");
    // A command that outlives its timeout is killed: answered "timed out", it must not
    // reboot the host later, nor run twice beside a retry.
    let command = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::spawn(tokio::time::timeout(timeout, command))
        .await
        .map_err(|e| RebootError::Task(e.to_string()))?
        .map_err(|_| RebootError::TimedOut(timeout))?
        .map_err(|source| RebootError::Spawn {
            program: program.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(RebootError::Failed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[tokio::test]
    async fn each_failure_says_what_went_wrong() {
        assert!(matches!(reboot(&[]).await, Err(RebootError::NotConfigured)));
        let missing = reboot(&argv(&["/nonexistent/reboot"])).await.unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/reboot"),
            "{missing}"
        );
        let failed = reboot(&argv(&["/bin/sh", "-c", "echo refused >&2; exit 3"]))
            .await
            .unwrap_err();
        assert_eq!(
            failed.to_string(),
            "reboot command failed (exit status: 3): refused"
        );
        reboot(&argv(&["/bin/true"])).await.unwrap();
    }

    /// Answered "timed out", the command must not reboot the host later: it is killed.
    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let late = dir.path().join("rebooted");
        let script = format!(
            "echo $$ > {}; sleep 3; touch {}",
            pid_file.display(),
            late.display()
        );
        let started = std::time::Instant::now();
        let err = run_within(
            &argv(&["/bin/sh", "-c", &script]),
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RebootError::TimedOut(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SIGKILL is sent as the command is dropped; the process is gone or a zombie
        // (reaped by tokio in the background) within moments, and never gets to its end.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let running = state
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'));
            if !running {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running: {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!late.exists(), "the timed-out command ran to its end");
    }
}
