//! How the TUF client fetches from the update repository: HTTP(S) through `reqwest`, with
//! keeld's own time limits and the proxy from `settings.network`.
//!
//! Owns the network rules of repository fetches: a connection must be made within the
//! connect timeout; once connected, the answer and then every next piece of the body must
//! arrive within the read timeout, so a repository that stalls, before or in the middle
//! of a target, fails the command instead of hanging it; `https-proxy` (with `no-proxy`)
//! applies to the repository's URLs as to registry pulls (`ProxyRules`, the one
//! computation of the proxy rules); only `http` and `https` URLs are fetched. Must not
//! verify anything: `tough` checks every byte against the signed metadata.

use std::time::Duration;

use futures_util::TryStreamExt;
use settings_model::proxy::ProxyRules;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// The time limits of repository fetches.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// To open the connection (TCP and TLS).
    pub connect: Duration,
    /// For the answer, and then between two pieces of the body.
    pub read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(30),
        }
    }
}

/// Why one fetch failed, in the words the user sees (the URL is added by `tough`).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("could not connect within {}", humantime::format_duration(*.0))]
    ConnectTimeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error(
        "the repository stalled: nothing received for {}",
        humantime::format_duration(*.0)
    )]
    Stalled(Duration),
    #[error("the server answered HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Other(String),
}

/// The reason of a failed request or body read, in the user's words.
fn describe(error: &reqwest::Error, timeouts: &Timeouts) -> FetchError {
    // The innermost cause is the one that says what happened.
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if error.is_connect() {
        if error.is_timeout() {
            FetchError::ConnectTimeout(timeouts.connect)
        } else {
            FetchError::Connect(cause.to_string())
        }
    } else if error.is_timeout() {
        FetchError::Stalled(timeouts.read)
    } else {
        FetchError::Other(cause.to_string())
    }
}

/// `tough`'s transport for the update repository.
#[derive(Debug, Clone)]
pub struct RepositoryTransport {
    client: reqwest::Client,
    timeouts: Timeouts,
}

impl RepositoryTransport {
    /// A transport with `timeouts`, through the proxy of `proxy` (none: direct).
    pub fn new(timeouts: Timeouts, proxy: Option<&ProxyRules>) -> Result<Self, FetchError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read)
            .user_agent(concat!("keeld/", env!("CARGO_PKG_VERSION")))
            // Environment variables are not keeld's configuration: settings.network is.
            .no_proxy();
        if let Some(rules) = proxy {
            let no_proxy = reqwest::NoProxy::from_string(&rules.no_proxy_joined());
            let proxy = reqwest::Proxy::all(rules.https_proxy())
                .map_err(|e| FetchError::Other(format!("settings.network.https-proxy: {e}")))?
                .no_proxy(no_proxy);
            builder = builder.proxy(proxy);
        }
        let client = builder
            .build()
            .map_err(|e| FetchError::Other(format!("cannot set up the HTTP client: {e}")))?;
        Ok(RepositoryTransport { client, timeouts })
    }
}

#[tough::async_trait]
impl Transport for RepositoryTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                url,
            ));
        }
        let timeouts = self.timeouts;
        let response = self.client.get(url.clone()).send().await.map_err(|e| {
            TransportError::new_with_cause(
                TransportErrorKind::Other,
                url.as_str(),
                describe(&e, &timeouts),
            )
        })?;
        let status = response.status();
        if !status.is_success() {
            // S3 answers 403 for a key that does not exist; TUF probes for the next
            // root.json that way, so both mean "not there".
            let kind = if status == reqwest::StatusCode::NOT_FOUND
                || status == reqwest::StatusCode::FORBIDDEN
            {
                TransportErrorKind::FileNotFound
            } else {
                TransportErrorKind::Other
            };
            return Err(TransportError::new_with_cause(
                kind,
                url.as_str(),
                FetchError::Status(status.as_u16()),
            ));
        }
        tracing::debug!(url = %url, "fetching");
        let source = url.to_string();
        let stream = response.bytes_stream().map_err(move |e| {
            TransportError::new_with_cause(
                TransportErrorKind::Other,
                source.as_str(),
                describe(&e, &timeouts),
            )
        });
        Ok(Box::pin(stream))
    }
}
