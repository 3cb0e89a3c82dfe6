//! `/tx/*`: inspect, discard, commit and apply pending transactions.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::Value;

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::{AppState, Peer};
use crate::log_budget::LogBudget;

/// The "committed" lines (see `log_budget`).
static COMMITS: LogBudget = LogBudget::new("commits");

pub async fn get_tx(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
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

pub async fn list(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    Query::parse(q.as_deref(), &[])?;
    Ok(Json(
        state.store.snapshot().pending.keys().cloned().collect(),
    ))
}

pub async fn commit(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(commit_tx(&state, &peer, q.as_deref())?.await?))
}

/// The commit of the transaction named by the query, as a future that owns what it
/// needs (so that it can run on a task of its own); answers the changed keys.
fn commit_tx(
    state: &AppState,
    peer: &Peer,
    query: Option<&str>,
) -> ApiResult<impl std::future::Future<Output = ApiResult<Vec<String>>> + Send + 'static> {
    let tx = Query::parse(query, &["tx"])?.tx()?;
    let store = state.store.clone();
    let caller = peer.caller();
    let uid = peer.uid;
    Ok(async move {
        let changed = store
            .commit(&tx, caller)
            .await
            .map_err(ApiError::from_commit)?;
        if COMMITS.admit() {
            tracing::info!(tx = %tx, uid, changed = changed.len(), "committed");
        }
        Ok(changed)
    })
}

pub async fn apply(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<StatusCode> {
    let query = Query::parse(q.as_deref(), &["keys"])?;
    let keys = match query.known_setting_keys("keys")? {
        Some(keys) => keys.into_iter().map(|(_, canonical)| canonical).collect(),
        // Everything: `settings` is a prefix of every key, so every service is affected,
        // whether or not any of its settings is set.
        None => vec!["settings".to_owned()],
    };
    let report = state.applier.apply_detached(&state.store, keys).await;
    if report.success {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(apply_failed(&report))
    }
}

/// An apply that did not fully succeed. The settings are committed either way; the
/// answer says what failed so that the caller is not left believing all is well.
pub(super) fn apply_failed(report: &crate::apply::ApplyReport) -> ApiError {
    let files = report
        .files
        .iter()
        .filter_map(|f| f.error.as_ref().map(|e| format!("file {}: {e}", f.name)));
    let commands = report.commands.iter().filter(|c| !c.success).map(|c| {
        format!(
            "service {} command {:?}: {}",
            c.service,
            c.argv,
            c.error.clone().unwrap_or_else(|| format!(
                "exit code {}",
                c.exit_code.map_or("none".to_owned(), |c| c.to_string())
            ))
        )
    });
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!(
            "apply {} failed (see GET /apply/log): {}",
            report.id,
            files.chain(commands).collect::<Vec<_>>().join("; ")
        ),
    )
}

pub async fn commit_and_apply(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let commit = commit_tx(&state, &peer, q.as_deref())?;
    // Commit and apply run on a task of their own: a client that hangs up cannot leave
    // the commit without its apply (see `apply::detached`).
    let (changed, report) = state.applier.after_commit(&state.store, commit).await?;
    let Some(report) = report else {
        return Ok(Json(changed).into_response());
    };
    // Bottlerocket's body (the changed keys) stays as it is, for its clients; the header
    // tells Keel's apiclient whether apply succeeded.
    let status = if report.success { "ok" } else { "failed" };
    let mut response = Json(changed).into_response();
    response
        .headers_mut()
        .insert(APPLY_STATUS_HEADER, HeaderValue::from_static(status));
    if let Ok(id) = HeaderValue::from_str(&report.id.to_string()) {
        response.headers_mut().insert(APPLY_ID_HEADER, id);
    }
    Ok(response)
}

/// `ok` or `failed`: the outcome of the apply that followed a commit.
pub const APPLY_STATUS_HEADER: &str = "x-keel-apply-status";
/// The id of that apply in `GET /apply/log`.
pub const APPLY_ID_HEADER: &str = "x-keel-apply-id";

/// `POST /tx/dry-run`: what committing `tx` would change (settings and rendered files),
/// without committing or writing anything.
pub async fn dry_run(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<crate::apply::dry_run::DryRun>> {
    let query = Query::parse(q.as_deref(), &["tx"])?;
    let tx = query.tx()?;
    let snapshot = state.store.snapshot();
    let applier = state.applier.clone();
    // Rendering and reading the render root: off the async workers.
    let result = tokio::task::spawn_blocking(move || applier.dry_run(&snapshot, &tx))
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("dry run stopped: {e}"),
            key: None,
        })?;
    match result {
        Ok(dry_run) => Ok(Json(dry_run)),
        Err(crate::apply::dry_run::DryRunError::Store(crate::store::StoreError::Invalid(e))) => {
            Err(ApiError::invalid(StatusCode::UNPROCESSABLE_ENTITY, &e))
        }
        Err(crate::apply::dry_run::DryRunError::Store(e)) => Err(e.into()),
        Err(crate::apply::dry_run::DryRunError::Render(e)) => Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: e.to_string(),
            key: e.key(),
        }),
    }
}
