//! `/settings`: read live settings, and patch a pending transaction (JSON merge-patch or
//! Bottlerocket's `key=value` pairs).

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use settings_model::patch::{filter_prefix, select_keys};
use settings_model::KeyPath;

use super::error::{ApiError, ApiResult};
use super::input::{json_object, read_body, Query};
use super::AppState;

/// Most `key=value` pairs in one keypair request.
const MAX_PAIRS: usize = 4096;

pub async fn get_settings(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    let query = Query::parse(q.as_deref(), &["keys", "prefix"])?;
    if query.get("keys").is_some() && query.get("prefix").is_some() {
        return Err(ApiError::bad_request(
            "give keys or prefix, not both: they select differently",
        )
        .with_key("prefix"));
    }
    let snapshot = state.store.snapshot();
    let live = snapshot.live_settings();
    // Keys the model does not have select nothing, as on Bottlerocket (a script written
    // for another variant still reads what exists).
    if let Some(keys) = query.setting_keys("keys")? {
        // Each key once: a subtree is copied once per key asked for.
        let keys = keys
            .into_iter()
            .map(|(_, canonical)| canonical)
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .map(|k| KeyPath::parse_setting(k))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Json(select_keys(live, &keys)));
    }
    if let Some(prefix) = query.get("prefix") {
        let prefix = if prefix.starts_with("settings") {
            prefix.to_owned()
        } else {
            format!("settings.{prefix}")
        };
        let filtered = filter_prefix(&json!({ "settings": live }), &prefix);
        return Ok(Json(
            filtered
                .get("settings")
                .cloned()
                .unwrap_or_else(|| json!({})),
        ));
    }
    Ok(Json(live.clone()))
}

pub async fn patch_settings(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult<StatusCode> {
    let tx = Query::parse(q.as_deref(), &["tx"])?.tx()?;
    let patch = json_object(&read_body(body).await?)?;
    patch_tx(&state, &tx, patch).await
}

async fn patch_tx(state: &AppState, tx: &str, patch: Value) -> ApiResult<StatusCode> {
    state.store.patch(tx, patch).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeypairBody {
    request_payload: Vec<String>,
}

pub async fn patch_keypair(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult<StatusCode> {
    let tx = Query::parse(q.as_deref(), &["tx"])?.tx()?;
    let body = json_object(&read_body(body).await?)?;
    let pairs: KeypairBody = serde_json::from_value(body).map_err(|e| {
        ApiError::bad_request(format!(
            "keypair body must be {{\"request_payload\": [\"key=value\", ...]}}: {e}"
        ))
        .with_key("request_payload")
    })?;
    if pairs.request_payload.is_empty() {
        return Err(ApiError::bad_request("request_payload is empty").with_key("request_payload"));
    }
    if pairs.request_payload.len() > MAX_PAIRS {
        return Err(ApiError::bad_request(format!(
            "request_payload holds more than {MAX_PAIRS} pairs"
        ))
        .with_key("request_payload"));
    }
    let patch = settings_model::keypair::pairs_to_patch(&pairs.request_payload)?;
    patch_tx(&state, &tx, patch).await
}
