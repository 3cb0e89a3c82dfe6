//! `/tx/*`: inspect, discard, commit and apply pending transactions.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::Value;

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::{AppState, Peer};

pub async fn get_tx(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<Value>> {
    let query = Query::parse(q.as_deref(), &["tx"])?;
    let tx = query.tx()?;
    let snapshot = state.store.snapshot();
    Ok(Json(
        snapshot
            .pending
            .get(&tx)
            .map(|p| p.view())
            .unwrap_or_else(|| Value::Object(Default::default())),
    ))
}

pub async fn delete_tx(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    let query = Query::parse(q.as_deref(), &["tx"])?;
    let tx = query.tx()?;
    Ok(Json(state.store.discard(&tx).await?))
}

pub async fn list(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<Vec<String>>> {
    Query::parse(q.as_deref(), &[])?;
    Ok(Json(state.store.snapshot().pending.keys().cloned().collect()))
}

pub async fn commit(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    let query = Query::parse(q.as_deref(), &["tx"])?;
    let tx = query.tx()?;
    let changed = state
        .store
        .commit(&tx, peer.caller())
        .await
        .map_err(ApiError::from_commit)?;
    tracing::info!(tx = %tx, uid = peer.uid, changed = changed.len(), "committed");
    Ok(Json(changed))
}

pub async fn apply(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<StatusCode> {
    let query = Query::parse(q.as_deref(), &["keys"])?;
    let keys = match query.list("keys") {
        Some(keys) => {
            for key in &keys {
                settings_model::KeyPath::parse(key)?;
            }
            keys
        }
        None => settings_model::patch::flatten(state.store.snapshot().live_settings())
            .into_keys()
            .collect(),
    };
    state.applier.apply(&keys).await;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn commit_and_apply(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    let query = Query::parse(q.as_deref(), &["tx"])?;
    let tx = query.tx()?;
    let changed = state
        .store
        .commit(&tx, peer.caller())
        .await
        .map_err(ApiError::from_commit)?;
    tracing::info!(tx = %tx, uid = peer.uid, changed = changed.len(), "committed");
    if !changed.is_empty() {
        state.applier.apply(&changed).await;
    }
    Ok(Json(changed))
}

