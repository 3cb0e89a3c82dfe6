//! `GET /boot`: the boot record (phase, each step's outcome and timing, why it failed).

use axum::extract::State;
use axum::Json;

use super::AppState;
use crate::boot::status::BootRecord;

pub async fn status(State(state): State<AppState>) -> Json<BootRecord> {
    Json(state.boot.borrow().clone())
}
