//! EC2 instance metadata (IMDSv2) client: the instance's user-data, and the metadata the
//! boot derives settings from ([`super::derived`]).
//!
//! The session-token protocol: `PUT /latest/api/token` with the
//! `X-aws-ec2-metadata-token-ttl-seconds` header answers a token, and every read (e.g.
//! `GET /latest/user-data`, `GET /latest/meta-data/local-ipv4`) carries that token in
//! `X-aws-ec2-metadata-token` (404 when the instance has no such item, 401 when the
//! token is no longer valid). A [`MetadataClient`] fetches one token and reuses it for
//! all its reads, until it is rejected or half its lifetime has passed.
//!
//! Early in boot the metadata service may not be reachable yet, so connection errors,
//! timeouts, 5xx and 429 are retried with jittered exponential back-off until the
//! client's overall deadline; every request also has its own timeout, so a server that
//! stops answering cannot hang the boot. Each request uses a fresh HTTP/1.1 connection.
//!
//! Neither the token nor any answer's body ever appears in errors or logs.

use std::borrow::Cow;
use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Where the session token is requested.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// Where the user-data is read.
pub const USER_DATA_PATH: &str = "/latest/user-data";
/// The largest user-data accepted, both as transferred and after decompression.
pub const MAX_USER_DATA: usize = 16 * 1024 * 1024;
/// The largest answer accepted from a metadata path other than the user-data (the
/// identity document and the meta-data items are a few hundred bytes).
pub const MAX_METADATA: usize = 64 * 1024;

const TOKEN_REQUEST: &str = "PUT /latest/api/token";
const USER_DATA_REQUEST: &str = "GET /latest/user-data";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// IMDS tokens are a few dozen bytes; anything much larger is not a token.
const MAX_TOKEN: usize = 4096;
/// The longest token lifetime IMDS accepts (6 hours).
const MAX_TTL_SECS: u64 = 21_600;
/// The longest metadata path a [`MetadataClient`] asks for.
const MAX_PATH: usize = 256;
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A request as errors and logs name it: method and path (`GET /latest/user-data`).
pub type RequestName = Cow<'static, str>;

/// How to reach the metadata service and how long to keep trying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsConfig {
    /// `http://host[:port]`, without a path (port 80 when absent).
    pub endpoint: String,
    /// Overall time budget of a [`MetadataClient`] (of [`fetch_user_data`]), retries
    /// included.
    pub deadline: Duration,
    /// Time budget of each request, from connecting to the end of the body.
    pub request_timeout: Duration,
    /// Lifetime asked for the session token (clamped to 1 s ..= 6 h).
    pub token_ttl: Duration,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://169.254.169.254".to_owned(),
            deadline: Duration::from_secs(5 * 60),
            request_timeout: Duration::from_secs(5),
            token_ttl: Duration::from_secs(MAX_TTL_SECS),
        }
    }
}

/// Why a metadata read (the user-data, or another path) failed.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS endpoint {endpoint:?} is invalid: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("metadata path {path:?} is not one keeld asks for: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{request}: cannot connect to {addr}: {source}")]
    Connect {
        request: RequestName,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{request}: HTTP exchange failed: {source}")]
    Http {
        request: RequestName,
        #[source]
        source: hyper::Error,
    },
    #[error("{request}: no complete answer within {timeout:?}")]
    Timeout {
        request: RequestName,
        timeout: Duration,
    },
    #[error("{request}: the server answered {status}")]
    Status {
        request: RequestName,
        status: StatusCode,
    },
    #[error("{request}: the response body exceeds {limit} bytes")]
    BodyTooLarge { request: RequestName, limit: usize },
    #[error("PUT /latest/api/token: the answer is not a usable token (empty or not a valid header value)")]
    InvalidToken,
    #[error("the user-data is gzip-compressed but does not decompress: {source}")]
    Decompress {
        #[source]
        source: std::io::Error,
    },
    #[error("the decompressed user-data exceeds {limit} bytes")]
    DecompressedTooLarge { limit: usize },
    #[error("gave up on the instance metadata service after {attempts} attempts (deadline {deadline:?}); last error: {last}")]
    DeadlineExceeded {
        attempts: u32,
        deadline: Duration,
        last: Box<ImdsError>,
    },
}

impl ImdsError {
    /// Whether trying again may succeed: connection trouble, timeouts, 5xx, 429, and
    /// 401 (the token expired or was revoked; a new one is fetched).
    fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Http { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::UNAUTHORIZED
            }
            _ => false,
        }
    }

    fn is_unauthorized(&self) -> bool {
        matches!(self, Self::Status { status, .. } if *status == StatusCode::UNAUTHORIZED)
    }
}

/// Fetches the instance's user-data over IMDSv2.
///
/// `Ok(None)`: the instance has no user-data (404). `Ok(Some(bytes))`: the user-data,
/// gunzipped when it was gzip-compressed (magic `1f 8b`), at most [`MAX_USER_DATA`]
/// bytes after decompression.
pub async fn fetch_user_data(config: &ImdsConfig) -> Result<Option<Vec<u8>>, ImdsError> {
    let mut client = MetadataClient::new(config)?;
    match client.get(USER_DATA_PATH, MAX_USER_DATA).await? {
        Some(raw) => {
            let user_data = decode_user_data(raw)?;
            tracing::info!(bytes = user_data.len(), "fetched user-data from IMDS");
            Ok(Some(user_data))
        }
        None => {
            tracing::info!("the instance has no user-data (IMDS answered 404)");
            Ok(None)
        }
    }
}

/// An IMDSv2 session: one deadline for all its reads (set by [`ImdsConfig::deadline`]
/// when the client is made), one session token reused across them.
pub struct MetadataClient {
    target: Target,
    config: ImdsConfig,
    deadline: Instant,
    ttl_secs: u64,
    token: Option<Token>,
}

impl MetadataClient {
    /// A client whose deadline starts now.
    pub fn new(config: &ImdsConfig) -> Result<Self, ImdsError> {
        let target = Target::parse(&config.endpoint)?;
        let start = Instant::now();
        let deadline = start
            .checked_add(config.deadline)
            // A deadline too far to represent is as good as none.
            .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600));
        Ok(Self {
            target,
            config: config.clone(),
            deadline,
            ttl_secs: config.token_ttl.as_secs().clamp(1, MAX_TTL_SECS),
            token: None,
        })
    }

    /// The endpoint, as configured.
    pub fn endpoint(&self) -> &str {
        &self.config.endpoint
    }

    /// `GET path` with the session token (fetched first when there is none): the body
    /// (at most `limit` bytes), or `None` when the service answers 404. Retried as the
    /// module says until the client's deadline; once that has passed, a read fails
    /// right away with [`ImdsError::DeadlineExceeded`].
    ///
    /// `path` must start with `/latest/` and hold only letters, digits and `/._:-`.
    pub async fn get(&mut self, path: &str, limit: usize) -> Result<Option<Vec<u8>>, ImdsError> {
        let (uri, request) = metadata_request(path)?;
        let mut backoff = Backoff::new();
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            let error = match self.attempt(&uri, &request, limit, attempt).await {
                Ok(answer) => {
                    tracing::debug!(attempt, %request, found = answer.is_some(), "IMDS read done");
                    return Ok(answer);
                }
                Err(Failure::Final(error)) => {
                    tracing::warn!(attempt, %error, "IMDS request failed; not retrying");
                    return Err(error);
                }
                Err(Failure::RetryNow(error)) => {
                    if Instant::now() >= self.deadline {
                        return Err(give_up(attempt, self.config.deadline, error));
                    }
                    tracing::info!(attempt, %error, "IMDS rejected the session token; fetching a new one");
                    continue;
                }
                Err(Failure::Retry(error)) => error,
            };
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(give_up(attempt, self.config.deadline, error));
            }
            let delay = backoff.next_delay().min(remaining);
            tracing::warn!(
                attempt,
                %error,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "IMDS request failed; retrying"
            );
            tokio::time::sleep(delay).await;
            if Instant::now() >= self.deadline {
                return Err(give_up(attempt, self.config.deadline, error));
            }
        }
    }

    /// The time budget of the next request: the per-request timeout, or what is left
    /// of the deadline if that is shorter.
    fn request_timeout(&self) -> Duration {
        self.config
            .request_timeout
            .min(self.deadline.saturating_duration_since(Instant::now()))
    }

    async fn attempt(
        &mut self,
        uri: &Uri,
        request: &RequestName,
        limit: usize,
        attempt: u32,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let reuse_for = Duration::from_secs(self.ttl_secs) / 2;
        let reusable = self
            .token
            .as_ref()
            .filter(|token| token.obtained.elapsed() < reuse_for)
            .map(|token| token.value.clone());
        let (token, fresh) = match reusable {
            Some(token) => (token, false),
            None => {
                self.token = None;
                let token =
                    fetch_token(&self.target, self.ttl_secs, self.request_timeout(), attempt)
                        .await?;
                let value = token.value.clone();
                self.token = Some(token);
                (value, true)
            }
        };
        let read = fetch_path(
            &self.target,
            &token,
            uri,
            request,
            limit,
            self.request_timeout(),
            attempt,
        )
        .await;
        match read {
            Ok(answer) => Ok(answer),
            Err(error) if error.is_unauthorized() => {
                self.token = None;
                if fresh {
                    // A token just issued was refused: something is off, back off.
                    Err(Failure::Retry(error))
                } else {
                    Err(Failure::RetryNow(error))
                }
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// The request URI of a metadata path and the name errors give it; only paths under
/// `/latest/` made of letters, digits and `/._:-`, without `..` or empty segments (a
/// path may carry a value read from the metadata, such as a MAC address).
fn metadata_request(path: &str) -> Result<(Uri, RequestName), ImdsError> {
    let invalid = |reason| ImdsError::InvalidPath {
        path: path.chars().take(MAX_PATH).collect(),
        reason,
    };
    if path.len() > MAX_PATH {
        return Err(invalid("too long"));
    }
    let Some(rest) = path.strip_prefix("/latest/") else {
        return Err(invalid("not under /latest/"));
    };
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b':' | b'-'))
    {
        return Err(invalid("only letters, digits and /._:- are allowed"));
    }
    if rest
        .split('/')
        .enumerate()
        .any(|(i, s)| s == ".." || s == "." || (s.is_empty() && i + 1 != rest.split('/').count()))
    {
        return Err(invalid("no empty, . or .. segments"));
    }
    let uri = Uri::try_from(path).map_err(|_| invalid("not a valid request target"))?;
    let name = if path == USER_DATA_PATH {
        Cow::Borrowed(USER_DATA_REQUEST)
    } else {
        Cow::Owned(format!("GET {path}"))
    };
    Ok((uri, name))
}

fn give_up(attempts: u32, deadline: Duration, last: ImdsError) -> ImdsError {
    tracing::warn!(attempts, error = %last, "IMDS deadline passed; giving up");
    ImdsError::DeadlineExceeded {
        attempts,
        deadline,
        last: Box::new(last),
    }
}

/// Gunzips gzip-compressed user-data (several concatenated members are allowed), at
/// most [`MAX_USER_DATA`] bytes of output; anything else passes through unchanged.
/// Public for the `imds_response` fuzz target.
pub fn decode_user_data(raw: Vec<u8>) -> Result<Vec<u8>, ImdsError> {
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    // Member after member (`cat a.gz b.gz` is gzip too); what follows the last one may
    // be padding (NULs, whitespace: a trailing newline added by a tool), which is
    // ignored, as Bottlerocket's reader (one member, then stop) ignores it.
    let mut rest: &[u8] = &raw;
    while rest.starts_with(&GZIP_MAGIC) {
        // One byte past the limit tells "exactly at the limit" from "over it".
        let room = (MAX_USER_DATA + 1).saturating_sub(out.len());
        let mut member = flate2::bufread::GzDecoder::new(rest);
        (&mut member)
            .take(u64::try_from(room).unwrap_or(u64::MAX))
            .read_to_end(&mut out)
            .map_err(|source| ImdsError::Decompress { source })?;
        if out.len() > MAX_USER_DATA {
            return Err(ImdsError::DecompressedTooLarge {
                limit: MAX_USER_DATA,
            });
        }
        rest = member.into_inner();
    }
    if let Some(at) = rest
        .iter()
        .position(|b| *b != 0 && !b.is_ascii_whitespace())
    {
        let offset = raw.len() - rest.len() + at;
        return Err(ImdsError::Decompress {
            source: std::io::Error::other(format!(
                "bytes after the gzip data, at offset {offset}, are neither gzip nor padding"
            )),
        });
    }
    Ok(out)
}

/// How one failed attempt goes on.
enum Failure {
    /// Back off, then try again (within the deadline).
    Retry(ImdsError),
    /// A reused token was rejected: fetch a new one right away.
    RetryNow(ImdsError),
    /// Trying again would not help.
    Final(ImdsError),
}

impl From<ImdsError> for Failure {
    fn from(error: ImdsError) -> Self {
        if error.is_retryable() {
            Self::Retry(error)
        } else {
            Self::Final(error)
        }
    }
}

struct Token {
    /// Marked sensitive, so `Debug` of the header value hides it.
    value: HeaderValue,
    obtained: Instant,
}

async fn fetch_token(
    target: &Target,
    ttl_secs: u64,
    timeout: Duration,
    attempt: u32,
) -> Result<Token, ImdsError> {
    let mut request = new_request(target, Method::PUT, Uri::from_static(TOKEN_PATH));
    request.headers_mut().insert(
        HeaderName::from_static(TTL_HEADER),
        HeaderValue::from(ttl_secs),
    );
    let (status, body) = exchange(
        target,
        request,
        &Cow::Borrowed(TOKEN_REQUEST),
        MAX_TOKEN,
        timeout,
        attempt,
    )
    .await?;
    if status != StatusCode::OK {
        return Err(ImdsError::Status {
            request: Cow::Borrowed(TOKEN_REQUEST),
            status,
        });
    }
    let token = body.trim_ascii();
    if token.is_empty() {
        return Err(ImdsError::InvalidToken);
    }
    let mut value = HeaderValue::from_bytes(token).map_err(|_| ImdsError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(Token {
        value,
        obtained: Instant::now(),
    })
}

/// The body at `uri` as served, or `None` on 404.
async fn fetch_path(
    target: &Target,
    token: &HeaderValue,
    uri: &Uri,
    what: &RequestName,
    limit: usize,
    timeout: Duration,
    attempt: u32,
) -> Result<Option<Vec<u8>>, ImdsError> {
    let mut request = new_request(target, Method::GET, uri.clone());
    request
        .headers_mut()
        .insert(HeaderName::from_static(TOKEN_HEADER), token.clone());
    let (status, body) = exchange(target, request, what, limit, timeout, attempt).await?;
    match status {
        StatusCode::OK => Ok(Some(body)),
        StatusCode::NOT_FOUND => Ok(None),
        status => Err(ImdsError::Status {
            request: what.clone(),
            status,
        }),
    }
}

fn new_request(target: &Target, method: Method, uri: Uri) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(HOST, target.host_header.clone());
    headers.insert(USER_AGENT, HeaderValue::from_static("keeld"));
    // One connection per request: say so, and the server closes it after answering.
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    request
}

/// One request on a fresh connection, bounded by `timeout` from connecting to the end
/// of the body. The body is read (at most `limit` bytes) only on 200.
async fn exchange(
    target: &Target,
    request: Request<Empty<Bytes>>,
    what: &RequestName,
    limit: usize,
    timeout: Duration,
    attempt: u32,
) -> Result<(StatusCode, Vec<u8>), ImdsError> {
    tracing::debug!(attempt, request = %what, "IMDS request");
    let answer = tokio::time::timeout(timeout, exchange_unbounded(target, request, what, limit))
        .await
        .unwrap_or_else(|_| {
            Err(ImdsError::Timeout {
                request: what.clone(),
                timeout,
            })
        });
    if let Ok((status, body)) = &answer {
        tracing::debug!(
            attempt,
            request = %what,
            status = status.as_u16(),
            body_bytes = body.len(),
            "IMDS answered"
        );
    }
    answer
}

async fn exchange_unbounded(
    target: &Target,
    request: Request<Empty<Bytes>>,
    what: &RequestName,
    limit: usize,
) -> Result<(StatusCode, Vec<u8>), ImdsError> {
    let http_error = |source| ImdsError::Http {
        request: what.clone(),
        source,
    };
    let stream = TcpStream::connect(target.addr.as_str())
        .await
        .map_err(|source| ImdsError::Connect {
            request: what.clone(),
            addr: target.addr.clone(),
            source,
        })?;
    // Best effort: only latency depends on it.
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(http_error)?;
    let answer = async move {
        let response = sender.send_request(request).await.map_err(http_error)?;
        let status = response.status();
        if status != StatusCode::OK {
            return Ok((status, Vec::new()));
        }
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(http_error)?;
            if let Ok(chunk) = frame.into_data() {
                if data.len().saturating_add(chunk.len()) > limit {
                    return Err(ImdsError::BodyTooLarge {
                        request: what.clone(),
                        limit,
                    });
                }
                data.extend_from_slice(&chunk);
            }
        }
        Ok((status, data))
    };
    // The connection is driven here rather than in a spawned task, so that a timeout
    // drops it (and its socket) together with the request.
    let mut connection = std::pin::pin!(connection);
    let mut answer = std::pin::pin!(answer);
    tokio::select! {
        biased;
        result = &mut answer => result,
        // The connection ended (closed or failed): the answer future now completes
        // with whatever was received or with the connection's error.
        _ = &mut connection => answer.await,
    }
}

/// A parsed `http://host[:port]` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `host:port` to connect to (IPv6 hosts in brackets).
    addr: String,
    /// The `Host` header: the endpoint's authority as written.
    host_header: HeaderValue,
}

impl Target {
    fn parse(endpoint: &str) -> Result<Self, ImdsError> {
        let invalid = |reason| ImdsError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let rest = match endpoint.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(invalid("only the http scheme is supported")),
            None => return Err(invalid("expected http://host[:port]")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(invalid("the host is missing"));
        }
        if authority.contains(|c: char| {
            matches!(c, '/' | '?' | '#' | '@') || c.is_whitespace() || c.is_control()
        }) {
            return Err(invalid(
                "expected only host[:port], without path, query or user info",
            ));
        }
        let (host, port) = if authority.starts_with('[') {
            let close = authority
                .find(']')
                .ok_or_else(|| invalid("unclosed '[' in IPv6 host"))?;
            let (host, after) = authority.split_at(close + 1);
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(invalid("unexpected text after the IPv6 host")),
                },
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(invalid("the host is missing"));
        }
        if !host.starts_with('[') && host.contains(':') {
            return Err(invalid("IPv6 hosts must be in brackets"));
        }
        let port = match port {
            None => 80,
            Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => port
                .parse::<u16>()
                .map_err(|_| invalid("the port is out of range"))?,
            Some(_) => return Err(invalid("the port is not a number")),
        };
        let host_header =
            HeaderValue::from_str(authority).map_err(|_| invalid("not a valid Host header"))?;
        Ok(Self {
            addr: format!("{host}:{port}"),
            host_header,
        })
    }
}

/// Exponential back-off with jitter: each delay is drawn from the upper half of the
/// current step, and the step doubles from [`BACKOFF_INITIAL`] up to [`BACKOFF_MAX`].
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            step: BACKOFF_INITIAL,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(BACKOFF_MAX);
        rand::thread_rng().gen_range(step / 2..=step)
    }
}

/// The loopback IMDSv2 server the tests here and in [`super::derived`] use.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use std::collections::{HashMap, VecDeque};
    use std::convert::Infallible;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use http::Response;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use tokio::net::TcpListener;

    /// What the test IMDS does; the protocol rules (TTL header required on PUT, a
    /// valid token required on every GET) always apply.
    #[derive(Clone, Default)]
    pub(crate) struct Behaviour {
        /// Served on GET; `None` answers 404.
        pub(crate) user_data: Option<Vec<u8>>,
        /// Other paths served on GET (`/latest/meta-data/local-ipv4` → body); any
        /// other path answers 404.
        pub(crate) paths: HashMap<String, Vec<u8>>,
        /// Paths whose every answer waits `slow_delay`.
        pub(crate) slow_paths: Vec<String>,
        /// Each token is accepted for this many GETs, then answers 401.
        pub(crate) token_uses: Option<u32>,
        /// Answers for the first PUTs (that carry a TTL), before issuing tokens.
        pub(crate) put_statuses: VecDeque<StatusCode>,
        /// Answers for the first authorized GETs, before serving the user-data.
        pub(crate) get_statuses: VecDeque<StatusCode>,
        /// Then answer every authorized GET with this status.
        pub(crate) get_always: Option<StatusCode>,
        /// The first this-many authorized GETs wait `slow_delay` before answering.
        pub(crate) slow_gets: u32,
        pub(crate) slow_delay: Duration,
    }

    #[derive(Default, Debug)]
    pub(crate) struct Seen {
        pub(crate) puts: u32,
        puts_without_ttl: u32,
        pub(crate) gets: u32,
        pub(crate) unauthorized: u32,
        /// Paths of the authorized GETs, in order.
        pub(crate) paths: Vec<String>,
        ttls: Vec<String>,
        hosts: Vec<String>,
    }

    struct State {
        behaviour: Behaviour,
        seen: Seen,
        /// Issued token → how many GETs used it.
        tokens: HashMap<String, u32>,
        issued: u32,
    }

    pub(crate) struct TestImds {
        pub(crate) endpoint: String,
        state: Arc<Mutex<State>>,
    }

    impl TestImds {
        pub(crate) async fn start(behaviour: Behaviour) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let state = Arc::new(Mutex::new(State {
                behaviour,
                seen: Seen::default(),
                tokens: HashMap::new(),
                issued: 0,
            }));
            let shared = state.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            answer(shared.clone(), request)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Self {
                endpoint: format!("http://{addr}"),
                state,
            }
        }

        pub(crate) fn config(&self, deadline: Duration, request_timeout: Duration) -> ImdsConfig {
            ImdsConfig {
                endpoint: self.endpoint.clone(),
                deadline,
                request_timeout,
                ..ImdsConfig::default()
            }
        }

        pub(crate) fn seen<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
            read(&self.state.lock().expect("state lock").seen)
        }
    }

    async fn answer(
        state: Arc<Mutex<State>>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let (status, body, delay) = decide(&state, &request);
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        Ok(response)
    }

    fn decide(
        state: &Mutex<State>,
        request: &Request<Incoming>,
    ) -> (StatusCode, Bytes, Option<Duration>) {
        let mut guard = state.lock().expect("state lock");
        let st = &mut *guard;
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if let Some(host) = header("host") {
            st.seen.hosts.push(host);
        }
        let nothing = Bytes::new();
        match (request.method(), request.uri().path()) {
            (&Method::PUT, TOKEN_PATH) => {
                st.seen.puts += 1;
                let ttl = header("X-aws-ec2-metadata-token-ttl-seconds");
                let valid_ttl = ttl
                    .as_deref()
                    .and_then(|t| t.parse::<u64>().ok())
                    .is_some_and(|t| (1..=MAX_TTL_SECS).contains(&t));
                let (Some(ttl), true) = (ttl, valid_ttl) else {
                    st.seen.puts_without_ttl += 1;
                    return (StatusCode::BAD_REQUEST, nothing, None);
                };
                st.seen.ttls.push(ttl);
                if let Some(status) = st.behaviour.put_statuses.pop_front() {
                    return (status, nothing, None);
                }
                st.issued += 1;
                let token = format!("AQAEAtest-token-{}==", st.issued);
                st.tokens.insert(token.clone(), 0);
                (StatusCode::OK, Bytes::from(token), None)
            }
            (&Method::GET, path) => {
                st.seen.gets += 1;
                let uses = header("X-aws-ec2-metadata-token").and_then(|t| st.tokens.get_mut(&t));
                let Some(uses) = uses else {
                    st.seen.unauthorized += 1;
                    return (StatusCode::UNAUTHORIZED, nothing, None);
                };
                if st.behaviour.token_uses.is_some_and(|max| *uses >= max) {
                    st.seen.unauthorized += 1;
                    return (StatusCode::UNAUTHORIZED, nothing, None);
                }
                *uses += 1;
                st.seen.paths.push(path.to_owned());
                let delay = if st.behaviour.slow_gets > 0 {
                    st.behaviour.slow_gets -= 1;
                    Some(st.behaviour.slow_delay)
                } else if st.behaviour.slow_paths.iter().any(|p| p == path) {
                    Some(st.behaviour.slow_delay)
                } else {
                    None
                };
                if let Some(status) = st.behaviour.get_statuses.pop_front() {
                    return (status, nothing, delay);
                }
                if let Some(status) = st.behaviour.get_always {
                    return (status, nothing, delay);
                }
                let body = if path == USER_DATA_PATH {
                    st.behaviour.user_data.as_ref()
                } else {
                    st.behaviour.paths.get(path)
                };
                match body {
                    Some(data) => (StatusCode::OK, Bytes::from(data.clone()), delay),
                    None => (StatusCode::NOT_FOUND, nothing, delay),
                }
            }
            _ => (StatusCode::NOT_FOUND, nothing, None),
        }
    }

    fn serving(user_data: &[u8]) -> Behaviour {
        Behaviour {
            user_data: Some(user_data.to_vec()),
            ..Behaviour::default()
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).expect("gzip write");
        encoder.finish().expect("gzip finish")
    }

    const SHORT: Duration = Duration::from_secs(2);
    const REQUEST: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn test_server_enforces_the_protocol() {
        // Proves the other tests' servers would notice a client that skips the TTL
        // header or the token.
        let imds = TestImds::start(serving(b"data")).await;
        let target = Target::parse(&imds.endpoint).expect("endpoint");
        let put = new_request(&target, Method::PUT, Uri::from_static(TOKEN_PATH));
        let name = Cow::Borrowed(TOKEN_REQUEST);
        let (status, _) = exchange(&target, put, &name, MAX_TOKEN, REQUEST, 0)
            .await
            .expect("PUT");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let get = new_request(&target, Method::GET, Uri::from_static(USER_DATA_PATH));
        let name = Cow::Borrowed(USER_DATA_REQUEST);
        let (status, _) = exchange(&target, get, &name, MAX_TOKEN, REQUEST, 0)
            .await
            .expect("GET");
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(imds.seen(|s| (s.puts_without_ttl, s.unauthorized)), (1, 1));
    }

    #[tokio::test]
    async fn fetches_user_data_with_a_session_token() {
        let imds = TestImds::start(serving(b"[settings]\nmotd = \"hi\"\n")).await;
        let got = fetch_user_data(&imds.config(SHORT, REQUEST)).await;
        assert_eq!(
            got.expect("user-data").as_deref(),
            Some(&b"[settings]\nmotd = \"hi\"\n"[..])
        );
        imds.seen(|s| {
            assert_eq!((s.puts, s.puts_without_ttl), (1, 0));
            assert_eq!((s.gets, s.unauthorized), (1, 0));
            assert_eq!(s.ttls, ["21600"]);
            let authority = imds.endpoint.trim_start_matches("http://");
            assert!(s.hosts.iter().all(|h| h == authority), "{:?}", s.hosts);
        });
    }

    #[tokio::test]
    async fn sends_the_configured_token_ttl() {
        let imds = TestImds::start(serving(b"x")).await;
        let config = ImdsConfig {
            token_ttl: Duration::from_secs(60),
            ..imds.config(SHORT, REQUEST)
        };
        fetch_user_data(&config).await.expect("user-data");
        assert_eq!(imds.seen(|s| s.ttls.clone()), ["60"]);
    }

    #[tokio::test]
    async fn no_user_data_is_none() {
        let imds = TestImds::start(Behaviour::default()).await;
        let got = fetch_user_data(&imds.config(SHORT, REQUEST)).await;
        assert_eq!(got.expect("fetch"), None);
        assert_eq!(imds.seen(|s| s.gets), 1);
    }

    #[tokio::test]
    async fn expired_token_is_replaced() {
        // The first GET uses token 1 and fails with 500; the retry reuses token 1,
        // which has expired by then (401), so the client fetches token 2 at once.
        let imds = TestImds::start(Behaviour {
            token_uses: Some(1),
            get_statuses: VecDeque::from([StatusCode::INTERNAL_SERVER_ERROR]),
            ..serving(b"after re-token")
        })
        .await;
        let got = fetch_user_data(&imds.config(SHORT, REQUEST)).await;
        assert_eq!(
            got.expect("user-data").as_deref(),
            Some(&b"after re-token"[..])
        );
        assert_eq!(imds.seen(|s| (s.puts, s.gets, s.unauthorized)), (2, 3, 1));
    }

    #[tokio::test]
    async fn gzip_user_data_is_decompressed() {
        let plain = b"#!/bin/sh\necho compressed\n".repeat(100);
        let imds = TestImds::start(serving(&gzip(&plain))).await;
        let got = fetch_user_data(&imds.config(SHORT, REQUEST)).await;
        assert_eq!(got.expect("user-data"), Some(plain));
    }

    /// Several members are read in turn; padding after the last (a newline a tool
    /// added, NULs) is ignored, as Bottlerocket ignores it; anything else is refused.
    #[test]
    fn gzip_members_and_padding() {
        let mut two = gzip(b"[settings]\n");
        two.extend(gzip(b"motd = \"hi\"\n"));
        assert_eq!(
            decode_user_data(two.clone()).expect("two members"),
            b"[settings]\nmotd = \"hi\"\n"
        );
        let mut padded = two.clone();
        padded.extend(b"\n\0\0 ");
        assert_eq!(
            decode_user_data(padded).expect("padding"),
            b"[settings]\nmotd = \"hi\"\n"
        );
        let mut garbage = two;
        garbage.extend(b"\nmotd = 1");
        let err = decode_user_data(garbage).expect_err("garbage after the data");
        assert!(
            err.to_string().contains("neither gzip nor padding"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn gzip_bomb_is_refused() {
        let bomb = gzip(&vec![0u8; MAX_USER_DATA + 1]);
        let imds = TestImds::start(serving(&bomb)).await;
        let err = fetch_user_data(&imds.config(SHORT, SHORT))
            .await
            .expect_err("too large");
        assert!(
            matches!(err, ImdsError::DecompressedTooLarge { .. }),
            "{err}"
        );
        assert_eq!(imds.seen(|s| s.gets), 1);
    }

    #[tokio::test]
    async fn oversized_body_is_refused() {
        let imds = TestImds::start(serving(&vec![b'a'; MAX_USER_DATA + 1])).await;
        let err = fetch_user_data(&imds.config(SHORT, SHORT))
            .await
            .expect_err("too large");
        assert!(matches!(err, ImdsError::BodyTooLarge { .. }), "{err}");
        assert_eq!(imds.seen(|s| s.gets), 1);
    }

    // Paused time: the bounds below are on tokio's clock, which advances only when
    // every task waits, so a busy machine cannot make them flaky.
    #[tokio::test(start_paused = true)]
    async fn slow_answer_times_out_and_is_retried() {
        let imds = TestImds::start(Behaviour {
            slow_gets: 1,
            slow_delay: Duration::from_secs(5),
            ..serving(b"eventually")
        })
        .await;
        let started = Instant::now();
        let got = fetch_user_data(&imds.config(SHORT, Duration::from_millis(200))).await;
        assert_eq!(got.expect("user-data").as_deref(), Some(&b"eventually"[..]));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(imds.seen(|s| s.gets), 2);
    }

    #[tokio::test]
    async fn server_errors_and_throttling_are_retried() {
        let imds = TestImds::start(Behaviour {
            put_statuses: VecDeque::from([StatusCode::TOO_MANY_REQUESTS]),
            get_statuses: VecDeque::from([
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::TOO_MANY_REQUESTS,
            ]),
            ..serving(b"ok")
        })
        .await;
        let got = fetch_user_data(&imds.config(Duration::from_secs(3), REQUEST)).await;
        assert_eq!(got.expect("user-data").as_deref(), Some(&b"ok"[..]));
        assert_eq!(imds.seen(|s| (s.puts, s.gets)), (2, 4));
    }

    // Paused time: the bounds below are on tokio's clock, which advances only when
    // every task waits, so a busy machine cannot make them flaky.
    #[tokio::test(start_paused = true)]
    async fn persistent_server_errors_fail_at_the_deadline() {
        let imds = TestImds::start(Behaviour {
            get_always: Some(StatusCode::INTERNAL_SERVER_ERROR),
            ..serving(b"never")
        })
        .await;
        let deadline = Duration::from_secs(1);
        let started = Instant::now();
        let err = fetch_user_data(&imds.config(deadline, REQUEST))
            .await
            .expect_err("always 500");
        let elapsed = started.elapsed();
        assert!(elapsed >= deadline, "{elapsed:?}");
        assert!(
            elapsed < deadline + Duration::from_millis(500),
            "{elapsed:?}"
        );
        let ImdsError::DeadlineExceeded { attempts, last, .. } = &err else {
            panic!("{err}");
        };
        assert!(*attempts >= 3, "{attempts}");
        assert!(
            matches!(**last, ImdsError::Status { status, .. } if status == StatusCode::INTERNAL_SERVER_ERROR),
            "{err}"
        );
        assert!(err.to_string().contains("500"), "{err}");
        assert!(!err.to_string().contains("test-token"), "{err}");
    }

    // Paused time: the bounds below are on tokio's clock, which advances only when
    // every task waits, so a busy machine cannot make them flaky.
    #[tokio::test(start_paused = true)]
    async fn forbidden_token_request_is_final() {
        // Only the first PUT is refused: a client that retried would succeed.
        let imds = TestImds::start(Behaviour {
            put_statuses: VecDeque::from([StatusCode::FORBIDDEN]),
            ..serving(b"unused")
        })
        .await;
        let started = Instant::now();
        let err = fetch_user_data(&imds.config(Duration::from_secs(3), REQUEST))
            .await
            .expect_err("403");
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(
            matches!(&err, ImdsError::Status { request, status } if request == TOKEN_REQUEST && *status == StatusCode::FORBIDDEN),
            "{err}"
        );
        assert!(err.to_string().contains("/latest/api/token"), "{err}");
        assert_eq!(imds.seen(|s| (s.puts, s.gets)), (1, 0));
    }

    // Paused time: the bounds below are on tokio's clock, which advances only when
    // every task waits, so a busy machine cannot make them flaky.
    #[tokio::test(start_paused = true)]
    async fn unreachable_endpoint_fails_at_the_deadline() {
        // A socket bound but not listening: connections are refused, and the port
        // stays ours for the whole test (no bind-then-drop race with other tests).
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let config = ImdsConfig {
            endpoint: format!("http://{addr}"),
            deadline: Duration::from_millis(600),
            request_timeout: REQUEST,
            ..ImdsConfig::default()
        };
        let started = Instant::now();
        let err = fetch_user_data(&config).await.expect_err("unreachable");
        assert!(started.elapsed() < Duration::from_millis(1100));
        let ImdsError::DeadlineExceeded { last, .. } = &err else {
            panic!("{err}");
        };
        assert!(matches!(**last, ImdsError::Connect { .. }), "{err}");
    }

    #[test]
    fn endpoints_parse() {
        let parse = |e: &str| Target::parse(e).map(|t| t.addr);
        assert_eq!(
            parse("http://169.254.169.254").expect("ok"),
            "169.254.169.254:80"
        );
        assert_eq!(
            parse("HTTP://localhost:8080/").expect("ok"),
            "localhost:8080"
        );
        assert_eq!(
            parse("http://[fd00:ec2::254]").expect("ok"),
            "[fd00:ec2::254]:80"
        );
        assert_eq!(parse("http://[::1]:1338").expect("ok"), "[::1]:1338");
        for bad in [
            "169.254.169.254",
            "https://169.254.169.254",
            "http://",
            "http://host/latest",
            "http://user@host",
            "http://host:",
            "http://host:99999",
            "http://host:x",
            "http://fd00::1",
            "http://[::1",
            "http://[::1]x",
        ] {
            assert!(
                matches!(Target::parse(bad), Err(ImdsError::InvalidEndpoint { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first));
        for _ in 0..20 {
            assert!(backoff.next_delay() <= BACKOFF_MAX);
        }
        assert!(backoff.next_delay() >= BACKOFF_MAX / 2);
    }

    fn serving_paths(paths: &[(&str, &str)]) -> Behaviour {
        Behaviour {
            paths: paths
                .iter()
                .map(|(p, b)| ((*p).to_owned(), b.as_bytes().to_vec()))
                .collect(),
            ..Behaviour::default()
        }
    }

    #[tokio::test]
    async fn one_token_serves_several_reads() {
        let imds = TestImds::start(serving_paths(&[
            ("/latest/meta-data/local-ipv4", "10.0.1.23"),
            ("/latest/meta-data/mac", "0e:49:61:0f:c3:11"),
        ]))
        .await;
        let mut client = MetadataClient::new(&imds.config(SHORT, REQUEST)).expect("client");
        let ip = client
            .get("/latest/meta-data/local-ipv4", MAX_METADATA)
            .await;
        assert_eq!(ip.expect("read").as_deref(), Some(&b"10.0.1.23"[..]));
        let mac = client.get("/latest/meta-data/mac", MAX_METADATA).await;
        assert_eq!(
            mac.expect("read").as_deref(),
            Some(&b"0e:49:61:0f:c3:11"[..])
        );
        let missing = client.get("/latest/meta-data/nope", MAX_METADATA).await;
        assert_eq!(missing.expect("404 is an answer"), None);
        imds.seen(|s| {
            assert_eq!((s.puts, s.gets, s.unauthorized), (1, 3, 0));
            assert_eq!(
                s.paths,
                [
                    "/latest/meta-data/local-ipv4",
                    "/latest/meta-data/mac",
                    "/latest/meta-data/nope"
                ]
            );
        });
    }

    #[tokio::test]
    async fn only_plain_metadata_paths_are_requested() {
        let imds = TestImds::start(Behaviour::default()).await;
        let mut client = MetadataClient::new(&imds.config(SHORT, REQUEST)).expect("client");
        let long = format!("/latest/meta-data/{}", "a".repeat(MAX_PATH));
        for bad in [
            "/etc/passwd",
            "latest/meta-data/mac",
            "/latest/../api/token",
            "/latest/meta-data/./mac",
            "/latest/meta-data//mac",
            "/latest/meta-data/mac?x=1",
            "/latest/meta-data/a b",
            "/latest/meta-data/a\r\nX-Injected: 1",
            long.as_str(),
        ] {
            let err = client.get(bad, MAX_METADATA).await.expect_err(bad);
            assert!(matches!(err, ImdsError::InvalidPath { .. }), "{bad}: {err}");
        }
        assert_eq!(imds.seen(|s| (s.puts, s.gets)), (0, 0));
        // A trailing slash (a listing) is a plain path.
        let listing = client.get("/latest/meta-data/network/interfaces/macs/", MAX_METADATA);
        assert_eq!(listing.await.expect("404"), None);
    }

    #[tokio::test]
    async fn metadata_answers_are_bounded() {
        let big = "1".repeat(MAX_METADATA + 1);
        let imds = TestImds::start(serving_paths(&[("/latest/meta-data/big", &big)])).await;
        let mut client = MetadataClient::new(&imds.config(SHORT, REQUEST)).expect("client");
        let err = client
            .get("/latest/meta-data/big", MAX_METADATA)
            .await
            .expect_err("too large");
        assert!(matches!(err, ImdsError::BodyTooLarge { .. }), "{err}");
        assert!(
            err.to_string().contains("GET /latest/meta-data/big"),
            "{err}"
        );
    }

    // Paused time: the bounds below are on tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn reads_after_the_deadline_fail_at_once() {
        let imds = TestImds::start(Behaviour {
            slow_paths: vec!["/latest/meta-data/slow".to_owned()],
            slow_delay: Duration::from_secs(30),
            ..serving_paths(&[
                ("/latest/meta-data/slow", "late"),
                ("/latest/meta-data/fast", "now"),
            ])
        })
        .await;
        let deadline = Duration::from_secs(1);
        let mut client = MetadataClient::new(&imds.config(deadline, REQUEST)).expect("client");
        let started = Instant::now();
        let err = client
            .get("/latest/meta-data/slow", MAX_METADATA)
            .await
            .expect_err("slow");
        let ImdsError::DeadlineExceeded { last, .. } = &err else {
            panic!("{err}");
        };
        assert!(matches!(**last, ImdsError::Timeout { .. }), "{err}");
        assert!(started.elapsed() >= deadline, "{:?}", started.elapsed());
        assert!(
            started.elapsed() < deadline + REQUEST,
            "{:?}",
            started.elapsed()
        );
        // The budget is the client's, not the read's: the next read gives up at once.
        let again = Instant::now();
        let err = client
            .get("/latest/meta-data/fast", MAX_METADATA)
            .await
            .expect_err("past the deadline");
        assert!(matches!(err, ImdsError::DeadlineExceeded { .. }), "{err}");
        assert!(
            again.elapsed() < Duration::from_millis(50),
            "{:?}",
            again.elapsed()
        );
    }

    #[test]
    fn fetch_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let config = ImdsConfig::default();
        assert_send(&fetch_user_data(&config));
    }
}
