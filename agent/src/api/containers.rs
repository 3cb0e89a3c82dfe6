//! `/containers` and `/containers/{name}/logs`: what keeld runs, and its output.
//! Read-only; containers are changed through settings.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::AppState;
use crate::containers::desired::container_id;
use crate::containers::logs;
use crate::containers::status::{ContainerKind, ContainerStatus};

/// Where container state lives, for the API.
#[derive(Debug, Clone)]
pub struct ContainersView {
    pub board: crate::containers::status::StatusBoard,
    /// `<runtime dir>/logs`.
    pub log_dir: std::path::PathBuf,
}

/// `GET /containers[?kind=host|bootstrap]`: every container's status.
pub async fn list(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<ContainerStatus>>> {
    let query = Query::parse(q.as_deref(), &["kind"])?;
    let kind = parse_kind(query.get("kind"))?;
    let all = state.containers.board.list();
    Ok(Json(
        all.into_iter()
            .filter(|s| kind.is_none_or(|k| s.kind == k))
            .collect(),
    ))
}

fn parse_kind(kind: Option<&str>) -> ApiResult<Option<ContainerKind>> {
    match kind {
        None => Ok(None),
        Some("host") => Ok(Some(ContainerKind::Host)),
        Some("bootstrap") => Ok(Some(ContainerKind::Bootstrap)),
        Some(other) => Err(ApiError::bad_request(format!(
            "kind must be \"host\" or \"bootstrap\", not {other:?}"
        ))
        .with_key("kind")),
    }
}

/// `GET /containers/{name}/logs[?tail=<bytes>][&kind=host|bootstrap]`: the end of the
/// container's combined stdout and stderr, as text.
pub async fn logs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let query = Query::parse(q.as_deref(), &["tail", "kind"])?;
    let tail = match query.get("tail") {
        None => 64 * 1024,
        Some(t) => t.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("tail must be a number of bytes, not {t:?}"))
                .with_key("tail")
        })?,
    };
    if settings_model::types::Identifier::new(&name).is_err() {
        return Err(
            ApiError::bad_request(format!("{name:?} is not a container name")).with_key("name"),
        );
    }
    let kind = parse_kind(query.get("kind"))?;
    // A name alone means the host container, else the bootstrap container of that name.
    let known = state.containers.board.find(&name);
    let kind = kind
        .or_else(|| known.iter().map(|s| s.kind).min())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no container named {name:?}"),
            )
            .with_key("name")
        })?;
    let dir = state.containers.log_dir.join(container_id(kind, &name));
    let bytes = tokio::task::spawn_blocking(move || logs::read_tail(&dir, tail))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading logs: {e}"),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading logs: {e}"),
            )
        })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}
