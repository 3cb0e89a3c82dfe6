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
    #[error("reboot command timed out after {}s", TIMEOUT.as_secs())]
    TimedOut,
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
    let output = tokio::spawn(tokio::time::timeout(TIMEOUT, command))
        .await
        .map_err(|e| RebootError::Task(e.to_string()))?
        .map_err(|_| RebootError::TimedOut)?
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
