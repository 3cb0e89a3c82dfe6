//! `/history` and `/history/rollback`: Keel's additions. The kept generations with who
//! changed what, and rollback to one of them as a new generation.

use axum::extract::{RawQuery, State};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::{AppState, Peer};

/// Newest first; `settings=true` includes each generation's whole settings.
pub async fn list(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<Value>> {
    let query = Query::parse(q.as_deref(), &["limit", "settings"])?;
    let limit = limit(&query)?;
    let with_settings = match query.get("settings") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(
                ApiError::bad_request(format!("settings {other:?} is not true or false"))
                    .with_key("settings"),
            )
        }
    };
    let snapshot = state.store.snapshot();
    let records = snapshot
        .history
        .iter()
        .rev()
        .take(limit)
        .map(|g| {
            let mut record = json!({
                "generation": g.generation,
                "time": g.time,
                "tx": g.tx,
                "caller": g.caller,
                "changed-keys": g.changed_keys,
            });
            if let Some(of) = g.rollback_of {
                record["rollback-of"] = json!(of);
            }
            if with_settings {
                record["settings"] = Value::clone(&g.settings);
            }
            record
        })
        .collect();
    Ok(Json(Value::Array(records)))
}

/// The `limit` parameter: how many records, all when absent.
fn limit(query: &Query) -> ApiResult<usize> {
    match query.get("limit") {
        Some(text) => text.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("limit {text:?} is not a non-negative integer"))
                .with_key("limit")
        }),
        None => Ok(usize::MAX),
    }
}

/// `GET /apply/log`: the recent applies, newest first, and whether a reboot is pending.
pub async fn apply_log(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = Query::parse(q.as_deref(), &["limit"])?;
    let limit = limit(&query)?;
    Ok(Json(state.applier.log(limit)))
}

pub async fn rollback(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    let query = Query::parse(q.as_deref(), &["generation"])?;
    let text = query.required("generation")?;
    let generation = text.parse::<u64>().map_err(|_| {
        ApiError::bad_request(format!("generation {text:?} is not a non-negative integer"))
            .with_key("generation")
    })?;
    let store = state.store.clone();
    let caller = peer.caller();
    let uid = peer.uid;
    let rollback = async move {
        let changed = store.rollback(generation, caller).await?;
        tracing::info!(generation, uid, changed = changed.len(), "rolled back");
        Ok::<_, ApiError>(changed)
    };
    // As for a commit: the rollback and its apply are one task (see `apply::detached`).
    let (changed, report) = state.applier.after_commit(&state.store, rollback).await?;
    if let Some(report) = report.filter(|r| !r.success) {
        return Err(super::tx::apply_failed(&report));
    }
    Ok(Json(changed))
}
