//! Named transactions: the random names `apiclient` gives them and the requests that
//! fill, dry-run, commit or discard one. Owns the wire shape of those requests (paths,
//! `tx` query, `request_payload` body, the `x-keel-apply-*` answer headers); deciding
//! what goes into a transaction is the caller's job.

use http::Method;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};

use crate::client::{Client, Response};
use crate::error::ClientError;
use crate::uri::with_query;

/// How many random characters follow the `apiclient-<kind>-` prefix, as in Bottlerocket.
pub const RANDOM_SUFFIX_LEN: usize = 16;

/// A fresh transaction name, `apiclient-<kind>-<16 random ASCII letters and digits>`, so
/// that concurrent clients never share a pending transaction by accident.
pub fn random_name(kind: &str) -> String {
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(RANDOM_SUFFIX_LEN)
        .map(char::from)
        .collect();
    format!("apiclient-{kind}-{suffix}")
}

/// The header keeld adds to a commit-and-apply answer when an apply ran: `ok` or
/// `failed`. Absent when nothing changed (so nothing was applied).
pub const APPLY_STATUS_HEADER: &str = "x-keel-apply-status";

/// The header naming that apply's `id` in `GET /apply/log`.
pub const APPLY_ID_HEADER: &str = "x-keel-apply-id";

/// The outcome of the apply that followed a commit, as the answer's headers tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStatus {
    /// Whether every file was written and every restart command succeeded.
    pub ok: bool,
    /// The apply's id in `GET /apply/log`.
    pub id: ApplyId,
}

/// The `x-keel-apply-id` header of a commit's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyId {
    Given(u64),
    /// The server sent none.
    NotSent,
    /// The server sent one that is no number: no apply in the log can be known as it.
    Unreadable,
}

impl ApplyId {
    pub fn given(self) -> Option<u64> {
        match self {
            ApplyId::Given(id) => Some(id),
            ApplyId::NotSent | ApplyId::Unreadable => None,
        }
    }
}

impl ApplyStatus {
    /// Reads the `x-keel-apply-*` headers; `None` if no apply ran. Any status other than
    /// `ok`, an unreadable one included, counts as a failure, so that an unknown outcome
    /// is never reported as success.
    pub fn from_response(response: &Response) -> Option<Self> {
        let status = response.headers.get(APPLY_STATUS_HEADER)?;
        let ok = status
            .to_str()
            .is_ok_and(|status| status.trim().eq_ignore_ascii_case("ok"));
        let id = match response.headers.get(APPLY_ID_HEADER) {
            None => ApplyId::NotSent,
            Some(id) => id
                .to_str()
                .ok()
                .and_then(|id| id.trim().parse().ok())
                .map_or(ApplyId::Unreadable, ApplyId::Given),
        };
        Some(Self { ok, id })
    }
}

/// What a commit-and-apply answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// The JSON array of changed keys (the body, as Bottlerocket sends it).
    pub changed: Value,
    /// The apply that followed; `None` when nothing changed.
    pub apply: Option<ApplyStatus>,
}

impl Commit {
    /// Reads a 2xx commit answer: its JSON body and its apply headers.
    pub fn from_response(
        method: &Method,
        uri: &str,
        response: &Response,
    ) -> Result<Self, ClientError> {
        let changed = match response.json() {
            Ok(value) => value.unwrap_or(Value::Null),
            Err(source) => {
                return Err(ClientError::NotJson {
                    method: method.as_str().to_owned(),
                    uri: uri.to_owned(),
                    source,
                })
            }
        };
        Ok(Self {
            changed,
            apply: ApplyStatus::from_response(response),
        })
    }

    /// The failed apply, if there was one.
    pub fn failed_apply(&self) -> Option<ApplyStatus> {
        self.apply.filter(|apply| !apply.ok)
    }
}

/// One pending transaction on the server, addressed by name.
#[derive(Debug, Clone)]
pub struct Transaction<'a> {
    client: &'a Client,
    name: String,
}

impl<'a> Transaction<'a> {
    /// A transaction with a fresh random name (see [`random_name`]).
    pub fn new(client: &'a Client, kind: &str) -> Self {
        Self::named(client, random_name(kind))
    }

    /// The transaction called `name` (e.g. `default` or `bottlerocket-launch`).
    pub fn named(client: &'a Client, name: impl Into<String>) -> Self {
        Self {
            client,
            name: name.into(),
        }
    }

    /// The transaction's name, as sent in `?tx=`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `PATCH /settings?tx=…` with a settings merge-patch (without the `settings`
    /// wrapper).
    pub async fn patch_settings(&self, patch: &Value) -> Result<(), ClientError> {
        let uri = self.uri("/settings");
        self.client
            .call(Method::PATCH, &uri, Some(patch.to_string().into_bytes()))
            .await
            .map(drop)
    }

    /// `PATCH /settings/keypair?tx=…` with `{"request_payload":[…]}`; the server types
    /// each `key=value` by the model.
    pub async fn patch_keypairs(&self, pairs: &[String]) -> Result<(), ClientError> {
        let uri = self.uri("/settings/keypair");
        let body = json!({ "request_payload": pairs });
        self.client
            .call(Method::PATCH, &uri, Some(body.to_string().into_bytes()))
            .await
            .map(drop)
    }

    /// `GET /tx?tx=…`: the settings pending in this transaction.
    pub async fn pending(&self) -> Result<Value, ClientError> {
        self.client.get_json(&self.uri("/tx")).await
    }

    /// `POST /tx/commit_and_apply?tx=…`: the JSON array of changed keys.
    pub async fn commit_and_apply(&self) -> Result<Value, ClientError> {
        let uri = self.uri("/tx/commit_and_apply");
        self.client.call_json(Method::POST, &uri, None).await
    }

    /// `POST /tx/commit_and_apply?tx=…`, keeping the answer's apply headers: whether the
    /// apply that followed the commit succeeded.
    pub async fn commit_and_apply_checked(&self) -> Result<Commit, ClientError> {
        let uri = self.uri("/tx/commit_and_apply");
        let response = self.client.call(Method::POST, &uri, None).await?;
        Commit::from_response(&Method::POST, &uri, &response)
    }

    /// `POST /tx/dry-run?tx=…`: what committing this transaction would change (settings,
    /// affected services, file diffs), without committing or writing anything. The
    /// transaction stays pending.
    pub async fn dry_run(&self) -> Result<Value, ClientError> {
        let uri = self.uri("/tx/dry-run");
        let answer = self.client.call_json(Method::POST, &uri, None).await?;
        // An answer the report cannot read must not print "Nothing would change.".
        if !answer.is_object() {
            let found: String = answer.to_string().chars().take(80).collect();
            return Err(ClientError::Shape {
                method: "POST".to_owned(),
                uri,
                expected: "a JSON object",
                found: if found == "null" {
                    "empty or null".to_owned()
                } else {
                    found
                },
            });
        }
        Ok(answer)
    }

    /// `DELETE /tx?tx=…`: the JSON array of the keys it held.
    pub async fn discard(&self) -> Result<Value, ClientError> {
        let uri = self.uri("/tx");
        self.client.call_json(Method::DELETE, &uri, None).await
    }

    fn uri(&self, path: &str) -> String {
        with_query(path, &[("tx", &self.name)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_well_formed(name: &str, prefix: &str) {
        let suffix = name.strip_prefix(prefix);
        assert!(suffix.is_some(), "{name} lacks {prefix}");
        let suffix = suffix.unwrap_or_default();
        assert_eq!(suffix.len(), RANDOM_SUFFIX_LEN, "{name}");
        assert!(suffix.chars().all(|c| c.is_ascii_alphanumeric()), "{name}");
    }

    #[test]
    fn names_are_prefix_and_sixteen_alphanumerics() {
        for kind in ["set", "apply", "unset"] {
            assert_well_formed(&random_name(kind), &format!("apiclient-{kind}-"));
        }
    }

    #[test]
    fn names_differ_between_calls() {
        let names: std::collections::BTreeSet<String> =
            (0..50).map(|_| random_name("set")).collect();
        assert_eq!(names.len(), 50);
    }

    fn response(headers: &[(&'static str, &'static str)]) -> Response {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, http::HeaderValue::from_static(value));
        }
        Response {
            status: 200,
            headers: map,
            body: bytes::Bytes::from_static(b"[\"settings.motd\"]"),
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn apply_headers_are_read() {
        let commit = |headers| {
            Commit::from_response(&Method::POST, "/x", &response(headers))
                .map_err(|e| e.to_string())
        };
        let none = commit(&[]);
        assert_eq!(
            none,
            Ok(Commit {
                changed: json!(["settings.motd"]),
                apply: None
            })
        );
        let ok = commit(&[(APPLY_STATUS_HEADER, "ok"), (APPLY_ID_HEADER, "4")]);
        assert_eq!(
            ok.map(|c| c.apply),
            Ok(Some(ApplyStatus {
                ok: true,
                id: ApplyId::Given(4)
            }))
        );
        let failed = commit(&[(APPLY_STATUS_HEADER, "failed"), (APPLY_ID_HEADER, "5")]);
        assert_eq!(
            failed.map(|c| c.failed_apply()),
            Ok(Some(ApplyStatus {
                ok: false,
                id: ApplyId::Given(5)
            }))
        );
        let odd = commit(&[(APPLY_STATUS_HEADER, "partial")]);
        assert_eq!(
            odd.map(|c| c.failed_apply()),
            Ok(Some(ApplyStatus {
                ok: false,
                id: ApplyId::NotSent
            }))
        );
        // Headers that cannot be read: a failure, and no apply to look up.
        let mut unreadable = response(&[]);
        for (name, value) in [
            (APPLY_STATUS_HEADER, &b"f\xe4iled"[..]),
            (APPLY_ID_HEADER, b"abc"),
        ] {
            unreadable
                .headers
                .insert(name, http::HeaderValue::from_bytes(value).unwrap());
        }
        assert_eq!(
            ApplyStatus::from_response(&unreadable),
            Some(ApplyStatus {
                ok: false,
                id: ApplyId::Unreadable
            })
        );
        let mut ok_unreadable = response(&[]);
        ok_unreadable.headers.insert(
            APPLY_STATUS_HEADER,
            http::HeaderValue::from_bytes(b"\xffok").unwrap(),
        );
        assert_eq!(
            ApplyStatus::from_response(&ok_unreadable).map(|a| a.ok),
            Some(false)
        );
    }

    #[test]
    fn transaction_uris_encode_the_name() {
        let client = Client::new("/unused");
        let tx = Transaction::named(&client, "a b");
        assert_eq!(
            tx.uri("/tx/commit_and_apply"),
            "/tx/commit_and_apply?tx=a%20b"
        );
        let tx = Transaction::new(&client, "apply");
        assert_well_formed(tx.name(), "apiclient-apply-");
    }
}
