//! `/actions/*`: host actions. Today only reboot.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::AppState;

/// How long the reboot command may take to be accepted.
const REBOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the configured reboot command (no shell) and answers 204 once it succeeded.
pub async fn reboot(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<StatusCode> {
    Query::parse(q.as_deref(), &[])?;
    let Some((program, args)) = state.reboot_command.split_first() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no reboot command is configured",
        ));
    };
    tracing::warn!(command = ?state.reboot_command, "reboot requested");
    // On its own task: a client that disconnects must not kill a reboot half way.
    let command = tokio::process::Command::new(program).args(args).output();
    let run = tokio::spawn(tokio::time::timeout(REBOOT_TIMEOUT, command));
    let output = run
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reboot task failed: {e}"),
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "reboot command timed out after {}s",
                    REBOOT_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot run reboot command {program:?}: {e}"),
            )
        })?;
    if !output.status.success() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "reboot command failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}
