//! `/metadata/affected-services`, `/services`, `/configuration-files`: the services
//! metadata from `services.toml`, in Bottlerocket's shapes.

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};
use axum::Json;
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::AppState;

pub async fn affected_services(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<BTreeMap<String, Vec<String>>>> {
    let query = Query::parse(q.as_deref(), &["keys"])?;
    let keys = query.known_setting_keys("keys")?.ok_or_else(|| {
        ApiError::bad_request("query parameter \"keys\" is required").with_key("keys")
    })?;
    let mut answer = BTreeMap::new();
    for (given, canonical) in keys {
        let services = state
            .applier
            .meta()
            .affected_by(&canonical)
            .into_iter()
            .collect();
        answer.insert(given, services);
    }
    Ok(Json(answer))
}

pub async fn services(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<BTreeMap<String, impl Serialize>>> {
    let query = Query::parse(q.as_deref(), &["names", "prefix"])?;
    Ok(Json(select(&state.applier.meta().services, &query)))
}

pub async fn configuration_files(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<BTreeMap<String, impl Serialize>>> {
    let query = Query::parse(q.as_deref(), &["names", "prefix"])?;
    Ok(Json(select(
        &state.applier.meta().configuration_files,
        &query,
    )))
}

fn select<T: Clone>(all: &BTreeMap<String, T>, query: &Query) -> BTreeMap<String, T> {
    let names = query.list("names");
    let prefix = query.get("prefix");
    all.iter()
        .filter(|(name, _)| names.as_ref().is_none_or(|n| n.contains(name)))
        .filter(|(name, _)| prefix.is_none_or(|p| name.starts_with(p)))
        .map(|(name, v)| (name.clone(), v.clone()))
        .collect()
}
