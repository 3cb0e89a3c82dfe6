//! `/containers` and `/containers/{name}/logs`: what keeld runs, and its output.
//! Read-only; containers are changed through settings.

use axum::extract::rejection::PathRejection;
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

/// `GET /containers/{name}/logs[?tail=<bytes>|since=<cursor>][&kind=host|bootstrap]`:
/// the end of the container's combined stdout and stderr, as text, or (with `since`)
/// what it wrote after that cursor. The answer's `x-keel-log-cursor` header is the
/// cursor to ask with next (`apiclient logs --follow` polls with it); `x-keel-log-gap:
/// true` says output was lost in between (rotated away) and the body is the newest
/// output instead.
pub async fn logs(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    // axum's own refusal (a name that is not UTF-8 once decoded) is plain text: answer
    // it as every other error, naming the part of the path.
    let Path(name) = name.map_err(|e| {
        ApiError::bad_request(format!("the container name in the path: {}", e.body_text()))
            .with_key("name")
    })?;
    let query = Query::parse(q.as_deref(), &["tail", "kind", "since"])?;
    let tail = match query.get("tail") {
        None => 64 * 1024,
        Some(t) => t.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("tail must be a number of bytes, not {t:?}"))
                .with_key("tail")
        })?,
    };
    let since = match query.get("since") {
        None => None,
        Some(_) if query.get("tail").is_some() => {
            return Err(ApiError::bad_request("give tail or since, not both").with_key("since"))
        }
        Some(text) => Some(logs::Cursor::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "since must be a cursor as the x-keel-log-cursor header gave it \
                 (five numbers joined by '-'; opaque to clients), not {text:?}"
            ))
            .with_key("since")
        })?),
    };
    if settings_model::types::Identifier::new(&name).is_err() {
        return Err(
            ApiError::bad_request(format!("{name:?} is not a container name")).with_key("name"),
        );
    }
    let kind = parse_kind(query.get("kind"))?;
    // A name alone means the host container, else the bootstrap container of that name.
    // With `kind`, that container must exist too: a log left by a removed container is
    // not served (a follower learns from the 404 that its container is gone).
    let known = state.containers.board.find(&name);
    let kind = match kind {
        Some(kind) => known.iter().any(|s| s.kind == kind).then_some(kind),
        None => known.iter().map(|s| s.kind).min(),
    }
    .ok_or_else(|| {
        let what = kind.map_or("container", |k| match k {
            ContainerKind::Host => "host container",
            ContainerKind::Bootstrap => "bootstrap container",
        });
        ApiError::new(StatusCode::NOT_FOUND, format!("no {what} named {name:?}")).with_key("name")
    })?;
    let dir = state.containers.log_dir.join(container_id(kind, &name));
    let read = move || match since {
        Some(cursor) => logs::read_since(&dir, cursor, logs::MAX_TAIL),
        None => logs::read_tail_chunk(&dir, tail),
    };
    let chunk = tokio::task::spawn_blocking(read)
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
    let gap = if chunk.gap { "true" } else { "false" };
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::HeaderName::from_static("x-keel-log-cursor"),
                chunk.cursor.to_string(),
            ),
            (
                header::HeaderName::from_static("x-keel-log-gap"),
                gap.to_owned(),
            ),
        ],
        chunk.bytes,
    )
        .into_response())
}
