//! `GET /boot`: the boot record (phase, each step's outcome and timing, why it failed).

use axum::extract::{RawQuery, State};
use axum::Json;

use super::error::ApiResult;
use super::input::Query;
use super::AppState;
use crate::boot::status::BootRecord;

pub async fn status(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<BootRecord>> {
    // No parameters: one that is given is a mistake worth saying, as on every endpoint.
    Query::parse(q.as_deref(), &[])?;
    Ok(Json(state.boot.borrow().clone()))
}
