//! Bottlerocket's update API: `GET /updates/status` and `POST /actions/refresh-updates`,
//! `/actions/prepare-update`, `/actions/activate-update`, `/actions/deactivate-update`.
//!
//! Each action is checked against the state at once (409 not allowed in this state, 404
//! nothing chosen or staged, 423 another update command running) and then runs in the
//! background: 204 means started; `most_recent_command` in the status tells how it ended,
//! `running_command` shows it (with download progress) meanwhile. As with Bottlerocket,
//! `GET /updates/status` answers 423 while a command runs (Bottlerocket's update operator
//! and `apiclient update` wait on that), and also while keeld, just started, reads the
//! slots to learn what happened while it was down; Keel's 423 body carries the status
//! too, under `update_status`, so the progress of a download can be watched. Parses and answers
//! only; `updates::machine` does the work.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::AppState;
use crate::updates::status::{CommandType, UpdateStatus};
use crate::updates::CommandRefused;

pub async fn status(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    Query::parse(q.as_deref(), &[])?;
    let status: UpdateStatus = state.updates.status();
    let held = match &status.running_command {
        Some(running) => Some(format!(
            "Update lock held: {} is running",
            running.cmd_type.action()
        )),
        None if state.updates.reconciling() => {
            Some("Update lock held: keeld is reading the slots after its start".to_owned())
        }
        None => None,
    };
    Ok(match held {
        None => Json(status).into_response(),
        Some(error) => (
            StatusCode::LOCKED,
            Json(json!({"error": error, "update_status": status})),
        )
            .into_response(),
    })
}

async fn start(state: &AppState, q: Option<&str>, command: CommandType) -> ApiResult<StatusCode> {
    Query::parse(q, &[])?;
    state.updates.start(command).await.map_err(|refused| {
        let status = match &refused {
            CommandRefused::Locked(_) => StatusCode::LOCKED,
            CommandRefused::Disallowed { .. } => StatusCode::CONFLICT,
            CommandRefused::UpdateDoesNotExist | CommandRefused::NoStagedImage => {
                StatusCode::NOT_FOUND
            }
            CommandRefused::Persist(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, refused.to_string())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn refresh(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    start(&state, q.as_deref(), CommandType::Refresh).await
}

pub async fn prepare(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    start(&state, q.as_deref(), CommandType::Prepare).await
}

pub async fn activate(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    start(&state, q.as_deref(), CommandType::Activate).await
}

pub async fn deactivate(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    start(&state, q.as_deref(), CommandType::Deactivate).await
}
