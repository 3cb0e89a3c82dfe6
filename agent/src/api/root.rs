//! `GET /` (the whole model, or what matches `prefix`) and `GET /os`.

use axum::extract::{RawQuery, State};
use axum::Json;
use serde_json::{json, Value};
use settings_model::patch::filter_prefix;

use super::error::ApiResult;
use super::input::Query;
use super::AppState;

pub async fn get_root(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = Query::parse(q.as_deref(), &["prefix"])?;
    let snapshot = state.store.snapshot();
    let root = json!({ "settings": snapshot.live_settings(), "os": &*state.os });
    Ok(Json(match query.get("prefix") {
        Some(prefix) => filter_prefix(&root, prefix),
        None => root,
    }))
}

pub async fn get_os(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = Query::parse(q.as_deref(), &["prefix"])?;
    let os = serde_json::to_value(&*state.os).unwrap_or_default();
    Ok(Json(match query.get("prefix") {
        // Accept both `arch` and `os.arch`.
        Some(prefix) => {
            let prefix = prefix.strip_prefix("os.").unwrap_or(prefix);
            let filtered = filter_prefix(&json!({ "os": os }), &format!("os.{prefix}"));
            filtered.get("os").cloned().unwrap_or_else(|| json!({}))
        }
        None => os,
    }))
}
