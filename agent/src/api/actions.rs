//! `/actions/*`: host actions. Today only reboot.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::AppState;
use crate::reboot::RebootError;

/// Runs the configured reboot command (no shell) and answers 204 once it succeeded.
pub async fn reboot(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<StatusCode> {
    Query::parse(q.as_deref(), &[])?;
    crate::reboot::reboot(&state.reboot_command)
        .await
        .map_err(|e| {
            let status = match e {
                RebootError::NotConfigured => StatusCode::CONFLICT,
                RebootError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
                RebootError::TimedOut(_)
                | RebootError::Spawn { .. }
                | RebootError::Failed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            };
            ApiError::new(status, e.to_string())
        })?;
    Ok(StatusCode::NO_CONTENT)
}
