//! How the TUF client fetches from the update repository: HTTP(S) through `reqwest`, with
//! keeld's own time limits and the proxy from `settings.network`.
//!
//! Owns the network rules of repository fetches: a connection must be made within the
//! connect timeout (reqwest's, the only time limit given to the client, so that a
//! time-out it reports is a connect time-out); once connected, the answer and then every
//! next piece of the body must arrive within the read timeout (kept here, around the
//! client), so a repository that stalls, before or in the middle of a target, fails the
//! command instead of hanging it; `https-proxy` (with `no-proxy`)
//! applies to the repository's URLs as to registry pulls (`ProxyRules`, the one
//! computation of the proxy rules); only `http` and `https` URLs are fetched. Must not
//! verify anything: `tough` checks every byte against the signed metadata.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
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
    /// For the metadata and the manifest in all (see `repository::UpdateRepository::
    /// load_with_manifest`).
    pub metadata: Duration,
    /// For all of a prepare's targets, from the first byte asked to the last written
    /// (see `prepare::prepare`).
    pub download: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(30),
            metadata: Duration::from_secs(600),
            download: Duration::from_secs(2 * 3600),
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

/// The reason of a failed request or body read, in the user's words. The client has no
/// time limit but the connect one: a time-out it reports is that one.
fn describe(error: &reqwest::Error, timeouts: &Timeouts) -> FetchError {
    // The innermost cause is the one that says what happened.
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if error.is_timeout() {
        FetchError::ConnectTimeout(timeouts.connect)
    } else if error.is_connect() {
        FetchError::Connect(cause.to_string())
    } else {
        FetchError::Other(cause.to_string())
    }
}

/// A body that fails with [`FetchError::Stalled`] when no piece arrives for `period`.
struct IdleLimited<S> {
    inner: Pin<Box<S>>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    period: Duration,
    timeouts: Timeouts,
    url: String,
    done: bool,
}

impl<S> Stream for IdleLimited<S>
where
    S: Stream<Item = reqwest::Result<Bytes>>,
{
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => {
                let deadline = tokio::time::Instant::now() + self.period;
                self.sleep.as_mut().reset(deadline);
                let timeouts = self.timeouts;
                Poll::Ready(Some(item.map_err(|e| {
                    TransportError::new_with_cause(
                        TransportErrorKind::Other,
                        self.url.as_str(),
                        describe(&e, &timeouts),
                    )
                })))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.done = true;
                    Poll::Ready(Some(Err(TransportError::new_with_cause(
                        TransportErrorKind::Other,
                        self.url.as_str(),
                        FetchError::Stalled(self.period),
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
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
        // Connecting takes at most the connect time-out (the client's own); what remains
        // of this limit is the read time-out for the answer's head.
        let answer = tokio::time::timeout(
            timeouts.connect + timeouts.read,
            self.client.get(url.clone()).send(),
        )
        .await
        .map_err(|_| {
            TransportError::new_with_cause(
                TransportErrorKind::Other,
                url.as_str(),
                FetchError::Stalled(timeouts.read),
            )
        })?;
        let response = answer.map_err(|e| {
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
        let stream = IdleLimited {
            inner: Box::pin(response.bytes_stream()),
            sleep: Box::pin(tokio::time::sleep(timeouts.read)),
            period: timeouts.read,
            timeouts,
            url: url.to_string(),
            done: false,
        };
        Ok(Box::pin(stream))
    }
}
