//! Strict readers for what a request carries: query strings, bodies, names.
//!
//! Owns the bounds on input size and the grammar of transaction names. Every refusal
//! names the parameter it is about. Handlers never parse raw input themselves.

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde_json::Value;

use super::error::{ApiError, ApiResult};

/// Largest request body accepted (DESIGN.md: 413 above 2 MiB).
pub const MAX_BODY: usize = 2 * 1024 * 1024;
/// Largest query string accepted.
const MAX_QUERY: usize = 64 * 1024;

/// A decoded query string; knows which parameters the endpoint takes.
#[derive(Debug, Default)]
pub struct Query {
    params: BTreeMap<String, String>,
}

impl Query {
    /// Parses `raw`, refusing parameters outside `allowed`, duplicates, bad
    /// percent-encoding and invalid UTF-8.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> ApiResult<Query> {
        let mut params = BTreeMap::new();
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            return Ok(Query { params });
        };
        if raw.len() > MAX_QUERY {
            return Err(ApiError::new(
                StatusCode::URI_TOO_LONG,
                format!("query string is longer than {MAX_QUERY} bytes"),
            ));
        }
        for part in raw.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            let name = decode(name, "parameter name")?;
            let value = decode(value, &name)?;
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {name:?}; this endpoint takes {}",
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
            if params.insert(name.clone(), value).is_some() {
                return Err(ApiError::bad_request(format!(
                    "query parameter {name:?} given more than once"
                )));
            }
        }
        Ok(Query { params })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> ApiResult<&str> {
        self.get(name)
            .ok_or_else(|| ApiError::bad_request(format!("query parameter {name:?} is required")))
    }

    /// The transaction named by `tx`, `default` when absent (as Bottlerocket does).
    pub fn tx(&self) -> ApiResult<String> {
        let name = self.get("tx").unwrap_or("default");
        validate_tx_name(name)?;
        Ok(name.to_owned())
    }

    /// A comma-separated list (`keys=a,b`), splitting only outside double quotes so that
    /// quoted key segments may hold commas.
    pub fn list(&self, name: &str) -> Option<Vec<String>> {
        self.get(name).map(split_list)
    }

    /// `name` as a list of settings keys: each as given, and canonical (`motd` means
    /// `settings.motd`, as everywhere else in the API). `None` when absent; a list that
    /// is present but empty, or a key that does not parse, is a 400 naming it.
    pub fn setting_keys(&self, name: &str) -> ApiResult<Option<Vec<(String, String)>>> {
        self.keys_checked(name, false)
    }

    /// [`Query::setting_keys`], each also a key of the model: for a request that acts on
    /// the keys (apply them, say what they affect), where a key the model does not have
    /// (a typo) would otherwise match nothing and answer success.
    pub fn known_setting_keys(&self, name: &str) -> ApiResult<Option<Vec<(String, String)>>> {
        self.keys_checked(name, true)
    }

    fn keys_checked(&self, name: &str, known: bool) -> ApiResult<Option<Vec<(String, String)>>> {
        let Some(keys) = self.list(name) else {
            return Ok(None);
        };
        if keys.is_empty() {
            return Err(ApiError::bad_request(format!("query {name}: no key given")).with_key(name));
        }
        keys.into_iter()
            .map(|key| {
                let path = settings_model::KeyPath::parse_setting(&key)?;
                if known && settings_model::schema::kind_at(&path).is_none() {
                    return Err(ApiError::bad_request(format!(
                        "query {name}: {path} is not a setting Keel knows"
                    ))
                    .with_key(path.to_string()));
                }
                Ok((key, path.to_string()))
            })
            .collect::<ApiResult<Vec<_>>>()
            .map(Some)
    }
}

fn decode(text: &str, what: &str) -> ApiResult<String> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::bad_request(format!("query {what}: not valid UTF-8 once decoded")))
}

fn split_list(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    items.push(current);
    items.retain(|s| !s.is_empty());
    items
}

/// Transaction names: 1 to 128 of `A-Z a-z 0-9 - _ .`, as used by Bottlerocket's tools
/// (`bottlerocket-launch`, `apiclient-set-<rand>`).
pub fn validate_tx_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "transaction name {name:?} is invalid (1-128 of A-Z a-z 0-9 - _ .)"
        ))
        .with_key("tx"))
    }
}

/// How long a client may take to send a whole request body: a slow or stalled sender
/// must not hold its connection (and a file descriptor) forever.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the whole body, refusing more than [`MAX_BODY`] bytes with 413, and a body
/// not complete within [`BODY_TIMEOUT`] with 408.
pub async fn read_body(body: Body) -> ApiResult<Bytes> {
    let collect = http_body_util::Limited::new(body, MAX_BODY).collect();
    let Ok(collected) = tokio::time::timeout(BODY_TIMEOUT, collect).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {}s",
                BODY_TIMEOUT.as_secs()
            ),
        ));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read request body: {e}"
        ))),
    }
}

/// Parses a body as a JSON object.
pub fn json_object(bytes: &[u8]) -> ApiResult<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn query_decodes_and_refuses_unknown() {
        let q = Query::parse(Some("prefix=settings.%22a.b%22&tx=x"), &["prefix", "tx"]).unwrap();
        assert_eq!(q.get("prefix"), Some("settings.\"a.b\""));
        assert!(Query::parse(Some("nope=1"), &["tx"]).is_err());
        assert!(Query::parse(Some("tx=a&tx=b"), &["tx"]).is_err());
        assert!(Query::parse(Some("tx=%FF"), &["tx"]).is_err());
    }

    #[test]
    fn list_splits_outside_quotes() {
        assert_eq!(
            split_list("settings.motd,settings.kernel.sysctl.\"a,b\""),
            vec!["settings.motd", "settings.kernel.sysctl.\"a,b\""]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_with_408() {
        let stalled =
            Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        let err = read_body(stalled).await.unwrap_err();
        assert_eq!(err.status, StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn an_oversized_body_is_413() {
        let big = Body::from(vec![b'x'; MAX_BODY + 1]);
        assert_eq!(
            read_body(big).await.unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn tx_names() {
        assert!(validate_tx_name("apiclient-set-abcDEF0123456789").is_ok());
        assert!(validate_tx_name("").is_err());
        assert!(validate_tx_name("a b").is_err());
        assert!(validate_tx_name(&"x".repeat(129)).is_err());
    }
}
