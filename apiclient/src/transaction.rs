//! Named transactions: the random names `apiclient` gives them and the requests that
//! fill, commit or discard one. Owns the wire shape of those requests (paths, `tx` query,
//! `request_payload` body); deciding what goes into a transaction is the caller's job.

use http::Method;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};

use crate::client::Client;
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
