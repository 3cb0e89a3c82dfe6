//! The HTTP/1.1 client for keeld's Unix socket. Owns the connection and the wire details
//! every request shares (`Host: localhost`, `Content-Type: application/json`); knows
//! nothing about which endpoints exist.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::error::ClientError;

/// A client for one API socket. Each request opens a fresh connection, so a `Client` is
/// cheap, holds no state and may be shared freely.
#[derive(Debug, Clone)]
pub struct Client {
    socket_path: PathBuf,
}

/// A 2xx answer whose body is read as it arrives (`GET /events?follow=true`).
#[derive(Debug)]
pub struct Streaming {
    pub headers: HeaderMap,
    body: hyper::body::Incoming,
}

impl Streaming {
    /// The next piece of the body as the server sent it; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        while let Some(frame) = self.body.frame().await {
            if let Ok(data) = frame?.into_data() {
                return Ok(Some(data));
            }
            // A trailers frame: not data, read on.
        }
        Ok(None)
    }
}

/// An answer from the API, whatever its status.
#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    /// The response headers, e.g. `x-keel-apply-status` after a commit.
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The value of header `name` (case-insensitive), if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text; invalid UTF-8 is replaced rather than refused, because this is
    /// for showing to people.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; `None` for an empty body (a 204).
    pub fn json(&self) -> Result<Option<Value>, serde_json::Error> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&self.body).map(Some)
    }
}

impl Client {
    /// A client for the API listening on `socket_path`. Nothing is opened yet.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
        }
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Sends one request and returns the answer whatever its status. `uri` is the
    /// origin-form target, `/path?query`, already percent-encoded (see [`crate::uri`]).
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let answer = self.send(method, uri, body).await?;
        let status = answer.status().as_u16();
        let (parts, body) = answer.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response {
            status,
            headers: parts.headers,
            body,
        })
    }

    /// `GET uri`, requiring a 2xx answer whose body is then read piece by piece as the
    /// server sends it (a stream that may stay open).
    pub async fn stream(&self, uri: &str) -> Result<Streaming, ClientError> {
        let answer = self.send(Method::GET, uri, None).await?;
        let (parts, body) = answer.into_parts();
        if parts.status.is_success() {
            return Ok(Streaming {
                headers: parts.headers,
                body,
            });
        }
        let body = body.collect().await?.to_bytes();
        Err(ClientError::Status {
            code: parts.status.as_u16(),
            method: Method::GET.as_str().to_owned(),
            uri: uri.to_owned(),
            body: String::from_utf8_lossy(&body).trim_end().to_owned(),
        })
    }

    /// Sends one request on a new connection; answers the head, with the body unread.
    async fn send(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let request = build_request(method, uri, body)?;
        let stream = UnixStream::connect(&self.socket_path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket_path.clone(),
                source,
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection future drives the socket; it ends once `sender` is dropped and
        // the exchange is over. Its own error, if any, also surfaces through `sender`.
        tokio::spawn(connection);
        Ok(sender.send_request(request).await?)
    }

    /// Like [`Client::request`], but a non-2xx answer becomes [`ClientError::Status`].
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let response = self.request(method.clone(), uri, body).await?;
        if response.is_success() {
            Ok(response)
        } else {
            Err(ClientError::Status {
                code: response.status,
                method: method.as_str().to_owned(),
                uri: uri.to_owned(),
                body: response.text().trim_end().to_owned(),
            })
        }
    }

    /// Sends `body` serialized as JSON (if any), requires a 2xx answer and parses it as
    /// JSON; `Value::Null` for an empty answer.
    pub async fn call_json(
        &self,
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let bytes = body.map(|value| value.to_string().into_bytes());
        let response = self.call(method.clone(), uri, bytes).await?;
        match response.json() {
            Ok(value) => Ok(value.unwrap_or(Value::Null)),
            Err(source) => Err(ClientError::NotJson {
                method: method.as_str().to_owned(),
                uri: uri.to_owned(),
                source,
            }),
        }
    }

    /// `GET uri`, requiring a 2xx JSON answer.
    pub async fn get_json(&self, uri: &str) -> Result<Value, ClientError> {
        self.call_json(Method::GET, uri, None).await
    }
}

fn build_request(
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<http::Request<Full<Bytes>>, ClientError> {
    let invalid = |reason: String| ClientError::InvalidUri {
        uri: uri.to_owned(),
        reason,
    };
    if !uri.starts_with('/') {
        return Err(invalid("it must start with '/'".to_owned()));
    }
    let target: http::Uri = uri
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
    http::Request::builder()
        .method(method)
        .uri(target)
        .header(HOST, "localhost")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, method: Method, uri: &str, body: &str) -> String {
        ClientError::Status {
            code,
            method: method.as_str().to_owned(),
            uri: uri.to_owned(),
            body: body.to_owned(),
        }
        .to_string()
    }

    #[test]
    fn status_errors_read_like_bottlerocket() {
        assert_eq!(
            status(404, Method::GET, "/nope", r#"{"error":"no such resource"}"#),
            r#"Status 404 when GETing /nope: {"error":"no such resource"}"#
        );
        assert_eq!(
            status(400, Method::PATCH, "/settings?tx=t", "bad"),
            "Status 400 when PATCHing /settings?tx=t: bad"
        );
        assert_eq!(
            status(422, Method::POST, "/tx/commit", "x"),
            "Status 422 when POSTing /tx/commit: x"
        );
        assert_eq!(
            status(409, Method::DELETE, "/tx?tx=a", "y"),
            "Status 409 when DELETEing /tx?tx=a: y"
        );
    }

    #[test]
    fn requests_carry_host_and_json_content_type() {
        let request = build_request(Method::PATCH, "/settings?tx=a", Some(b"{}".to_vec()));
        let request = request.expect("valid request");
        assert_eq!(request.headers()[HOST], "localhost");
        assert_eq!(request.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(request.uri().path(), "/settings");
        assert_eq!(request.uri().query(), Some("tx=a"));
    }

    #[test]
    fn uris_must_be_origin_form() {
        for bad in ["settings", "http://x/settings", "/a b"] {
            let error = build_request(Method::GET, bad, None).err();
            assert!(
                matches!(error, Some(ClientError::InvalidUri { .. })),
                "{bad}: {error:?}"
            );
        }
    }

    #[test]
    fn empty_bodies_are_not_json() {
        let response = Response {
            status: 204,
            ..Response::default()
        };
        assert!(matches!(response.json(), Ok(None)));
        let response = Response {
            status: 200,
            body: Bytes::from_static(b"[\"settings.motd\"]\n"),
            ..Response::default()
        };
        assert_eq!(
            response.json().ok().flatten(),
            Some(serde_json::json!(["settings.motd"]))
        );
    }

    #[test]
    fn headers_are_looked_up_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert("x-keel-apply-status", http::HeaderValue::from_static("ok"));
        let response = Response {
            status: 200,
            headers,
            ..Response::default()
        };
        assert_eq!(response.header("X-Keel-Apply-Status"), Some("ok"));
        assert_eq!(response.header("x-keel-apply-id"), None);
    }

    #[tokio::test]
    async fn a_missing_socket_names_the_path() {
        let client = Client::new("/nonexistent/keel-test/api.sock");
        let error = client.request(Method::GET, "/", None).await.err();
        let text = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.starts_with("cannot connect to /nonexistent/keel-test/api.sock: "),
            "{text}"
        );
    }
}
