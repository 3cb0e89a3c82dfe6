//! `GET /events`: what happened in keeld (commits, applies, container and boot state,
//! updates), from the event bus ([`crate::events`]), as newline-delimited JSON.
//!
//! Why NDJSON and not server-sent events: every line is one complete JSON object that
//! `curl --unix-socket … | jq` and any JSON library read as it comes, with no framing to
//! undo (SSE wraps each event in `data:` lines, and its one advantage, a browser's
//! `EventSource` with `Last-Event-ID`, cannot reach a Unix socket anyway); the cursor a
//! client resumes from is a field of the object, and Kubernetes' own watch streams have
//! the same shape, so node agents already know how to read it.
//!
//! `?since=<cursor>` resumes after that cursor (with `&stream=<id>`, only if it is this
//! keeld's stream); `?follow=true` keeps the answer open for new events until keeld
//! stops; `?kinds=commit,apply` keeps only those kinds (gaps always come through).

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiResult};
use super::input::Query;
use super::AppState;
use crate::events::{Kind, Resume, Subscription};

/// The header naming this keeld's stream, also on an answer with no events in it.
pub const STREAM_HEADER: &str = "x-keel-event-stream";

pub async fn stream(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let query = Query::parse(q.as_deref(), &["since", "stream", "follow", "kinds"])?;
    let since = query.get("since").map(parse_since).transpose()?;
    let stream = query.get("stream").map(parse_stream).transpose()?;
    let from = match (since, stream) {
        (None, None) => Resume::Start,
        (cursor, stream) => Resume::After {
            stream,
            cursor: cursor.unwrap_or(0),
        },
    };
    let follow = match query.get("follow") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "follow must be \"true\" or \"false\", not {other:?}"
            ))
            .with_key("follow"))
        }
    };
    let kinds = query.list("kinds").map(parse_kinds).transpose()?;
    let subscription = state
        .events
        .subscribe(from, follow, kinds)
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let body = Body::from_stream(futures_util::stream::unfold(
        subscription,
        |mut sub: Subscription| async move {
            let chunk = sub.next_lines().await?;
            Some((Ok::<_, std::convert::Infallible>(chunk), sub))
        },
    ));
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        body,
    )
        .into_response();
    if let Ok(id) = HeaderValue::from_str(state.events.stream()) {
        response.headers_mut().insert(STREAM_HEADER, id);
    }
    Ok(response)
}

fn parse_since(text: &str) -> ApiResult<u64> {
    // Digits only: `+1`, ` 1` and `1.0` are refused, not guessed at.
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "since must be an event cursor (a whole number from 0 to {}), not {text:?}",
            u64::MAX
        ))
        .with_key("since"));
    }
    text.parse::<u64>().map_err(|_| {
        ApiError::bad_request(format!(
            "since {text:?} is larger than any cursor ({})",
            u64::MAX
        ))
        .with_key("since")
    })
}

fn parse_stream(text: &str) -> ApiResult<String> {
    if text.is_empty() || text.len() > 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(format!(
            "stream must be the stream id of an event (1 to 64 hex digits), not {text:?}"
        ))
        .with_key("stream"));
    }
    Ok(text.to_ascii_lowercase())
}

fn parse_kinds(names: Vec<String>) -> ApiResult<Vec<Kind>> {
    if names.is_empty() {
        return Err(ApiError::bad_request("kinds must name at least one kind").with_key("kinds"));
    }
    names
        .iter()
        .map(|name| {
            Kind::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                ApiError::bad_request(format!(
                    "kinds: unknown event kind {name:?} (known: {})",
                    known.join(", ")
                ))
                .with_key("kinds")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_digits_only() {
        assert_eq!(parse_since("0").ok(), Some(0));
        assert_eq!(parse_since("18446744073709551615").ok(), Some(u64::MAX));
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1.0",
            "abc",
            "0x10",
            "18446744073709551616",
            "99999999999999999999999",
        ] {
            let err = parse_since(bad).err().map(|e| (e.status, e.key, e.message));
            let (status, key, message) = err.unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(key.as_deref(), Some("since"));
            assert!(message.starts_with("since"), "{message}");
        }
    }

    #[test]
    fn stream_ids_are_hex() {
        assert_eq!(parse_stream("ABCdef01").ok().as_deref(), Some("abcdef01"));
        for bad in ["", "xyz", &"a".repeat(65)] {
            assert!(parse_stream(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_are_named() {
        let kinds = parse_kinds(vec!["commit".into(), "boot-phase".into()]).ok();
        assert_eq!(kinds, Some(vec![Kind::Commit, Kind::BootPhase]));
        let err = parse_kinds(vec!["commits".into()]).err();
        assert_eq!(err.and_then(|e| e.key).as_deref(), Some("kinds"));
        assert!(parse_kinds(vec![]).is_err());
    }
}
