//! Pulling an image from a registry into containerd's content store.
//!
//! Every request is keeld's own ([`Session`], on `reqwest` with rustls; `oci-client`
//! gives only the reference grammar and the credential type), so that every body is
//! read within a bound: an error answer to 4 KiB, a token service's answer to 64 KiB,
//! a manifest to 4 MiB, a config to its declared size, a layer streamed into containerd
//! within its deadline, its digest checked as it arrives and again by containerd at
//! commit; the token exchange and each manifest within 2 minutes. keeld
//! adds what a host agent needs around it: mirrors and credentials from
//! `settings.container-registry`, the proxy from `settings.network`, plain HTTP only
//! for loopback registries or mirrors written with `http://`, platform selection from
//! an index, a token asked again during long pulls, and one download of a layer at a
//! time (a pull that wants a layer another is downloading waits and finds it stored).
//!
//! One of the two image sources (with [`super::archive`]): it uses the shared types
//! ([`super::oci`]) and the content store ([`super::content`]), never the pipeline
//! that calls it ([`super::image`]).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use settings_model::model::credential_registry;
use settings_model::proxy::ProxyRules;
use settings_model::Settings;

use super::client::Containerd;
use super::content::{self, write_small, MAX_METADATA_BLOB};
use super::oci::{
    config_gc_labels, host_platform, manifest_gc_labels, parse_digest, parse_document, parse_json,
    select_platform, verify_digest, Descriptor, Document, ImageConfiguration, ImageError,
    MediaType, RegistryError, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST,
};

/// How long a manifest or an image config may take to arrive whole. They are small
/// (keeld refuses a config over 4 MiB); a registry that sends one slowly or without
/// end fails the endpoint, instead of holding the container's start (or the boot)
/// forever: the client's read timeout restarts with every chunk.
const METADATA_DEADLINE: Duration = Duration::from_secs(120);

/// The slowest average rate a layer may arrive at, in bytes per second (512 kbit/s).
/// The client's read timeout restarts with every chunk, so without an overall deadline
/// a registry (or a proxy) that sends a byte a minute would hold the container's start,
/// or the boot, for ever; with it, a layer gets [`METADATA_DEADLINE`] plus its size at
/// this rate (a 100 MB layer: about half an hour), then fails with the reason.
const MIN_LAYER_RATE: u64 = 64 * 1024;

/// How long a layer of `size` bytes may take to arrive whole (see [`MIN_LAYER_RATE`]).
fn layer_deadline(size: u64) -> Duration {
    METADATA_DEADLINE + Duration::from_secs(size / MIN_LAYER_RATE)
}

/// Credentials for one registry host.
#[derive(Clone)]
struct Credential {
    username: String,
    password: String,
}

/// What a pull needs from settings: mirrors, credentials and the proxy.
#[derive(Clone, Default)]
pub struct RegistryConfig {
    /// Registry host (or `*`) → mirror endpoints, in order, as the settings write them
    /// (parsed when used, so that one that does not parse is reported, not skipped).
    mirrors: Vec<(String, Vec<String>)>,
    credentials: HashMap<String, Credential>,
    /// Registry host → why its credentials cannot serve keeld's own pulls (they may
    /// still serve containerd's CRI pulls, which read them from the rendered config).
    /// Such a pull goes anonymously, and a failure says why.
    unusable: HashMap<String, &'static str>,
    proxy: Option<ProxyRules>,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("mirrors", &self.mirrors)
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .field("unusable", &self.unusable)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl RegistryConfig {
    pub fn from_settings(settings: &Settings) -> RegistryConfig {
        let mut config = RegistryConfig {
            proxy: ProxyRules::from_settings(settings),
            ..RegistryConfig::default()
        };
        if let Some(registry) = &settings.container_registry {
            for mirror in registry.mirrors.iter().flat_map(|m| m.iter()) {
                let (Some(host), Some(endpoints)) = (&mirror.registry, &mirror.endpoint) else {
                    continue;
                };
                let urls = endpoints.iter().map(|u| u.as_str().to_owned()).collect();
                config.mirrors.push((host.as_str().to_owned(), urls));
            }
            // Stored by an older keeld, both names of Docker Hub: `docker.io`'s win, as in
            // containerd-config, whatever their order.
            let names_docker_io = registry.credentials.iter().flatten().any(|c| {
                c.registry
                    .as_ref()
                    .is_some_and(|r| r.as_str() == "docker.io")
            });
            for cred in registry.credentials.iter().flatten() {
                let Some(host) = &cred.registry else { continue };
                if names_docker_io && host.as_str() == "registry-1.docker.io" {
                    continue;
                }
                // A registry listed twice (the model refuses that now; an older keeld
                // stored it) keeps its first credentials, as containerd's CRI pulls do
                // (containerd-config renders the first of each registry).
                // Under the name pulls look them up by (`registry-1.docker.io`'s are
                // `docker.io`'s).
                let host_name = credential_registry(host.as_str());
                if config.credentials.contains_key(host_name)
                    || config.unusable.contains_key(host_name)
                {
                    tracing::debug!(registry = %host_name, "settings.container-registry.credentials lists this registry more than once; its first credentials are used");
                    continue;
                }
                let from_auth = cred.auth.as_ref().map(|a| {
                    let (username, password) = a.expose_credentials();
                    Credential {
                        username: username.to_owned(),
                        password: password.to_owned(),
                    }
                });
                let from_pair = match (&cred.username, &cred.password) {
                    (Some(u), Some(p)) => Some(Credential {
                        username: u.as_str().to_owned(),
                        password: p.expose_secret().to_owned(),
                    }),
                    _ => None,
                };
                match from_pair.or(from_auth) {
                    Some(c) => {
                        config.credentials.insert(host_name.to_owned(), c);
                    }
                    None => {
                        let why = if cred.identitytoken.is_some() {
                            "they hold only an identitytoken, which containerd's CRI pulls \
                             use and keeld's own pulls do not"
                        } else if cred.username.is_some() || cred.password.is_some() {
                            "they have a username without a password or a password \
                             without a username"
                        } else {
                            "they have neither username and password nor auth"
                        };
                        config.unusable.insert(host_name.to_owned(), why);
                    }
                }
            }
        }
        config
    }

    fn mirrors_for(&self, registry: &str) -> &[String] {
        let exact = self.mirrors.iter().find(|(h, _)| h == registry);
        let wildcard = self.mirrors.iter().find(|(h, _)| h == "*");
        exact.or(wildcard).map_or(&[], |(_, urls)| urls.as_slice())
    }

    fn auth_for(&self, registry: &str) -> RegistryAuth {
        match self.credentials.get(credential_registry(registry)) {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// One place to fetch from: a mirror or the registry itself.
struct Endpoint {
    reference: Reference,
    /// `host[:port]` as the credentials and the HTTP exception list name it.
    host: String,
    plain_http: bool,
}

/// Whether `host[:port]` is a loopback address, where plain HTTP is allowed.
fn is_loopback(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where to fetch `reference` from: its mirrors in order, then the registry. A mirror
/// endpoint that cannot be used is in the second list, with why.
fn endpoints(reference: &Reference, config: &RegistryConfig) -> (Vec<Endpoint>, Vec<String>) {
    let registry = reference.registry().to_owned();
    let mut out = Vec::new();
    let mut unusable = Vec::new();
    for text in config.mirrors_for(&registry) {
        let url = match url::Url::parse(text) {
            Ok(url) => url,
            Err(e) => {
                unusable.push(format!("mirror {text}: not a URL: {e}"));
                continue;
            }
        };
        let Some(host) = url.host_str() else {
            unusable.push(format!("mirror {text}: the URL has no host"));
            continue;
        };
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        // A path (`https://nexus.example.com/repository/dockerhub`) is kept, and `/v2`
        // goes after it unless it ends so, as containerd does with the same setting:
        // the registry part of the reference, before `/v2/`, carries it.
        let path = url.path().trim_end_matches('/');
        let path = path.strip_suffix("/v2").unwrap_or(path);
        let registry = format!("{host}{path}");
        let reference = match (reference.digest(), reference.tag()) {
            (Some(d), _) => {
                Reference::with_digest(registry, reference.repository().to_owned(), d.to_owned())
            }
            (None, t) => Reference::with_tag(
                registry,
                reference.repository().to_owned(),
                t.unwrap_or("latest").to_owned(),
            ),
        };
        out.push(Endpoint {
            reference,
            plain_http: url.scheme() == "http",
            host,
        });
    }
    out.push(Endpoint {
        reference: reference.clone(),
        plain_http: is_loopback(&registry),
        host: registry,
    });
    (out, unusable)
}

/// Pulls `reference` (trying its mirrors first) into the content store; answers the
/// descriptor of the host platform's manifest.
pub async fn pull(
    cd: &Containerd,
    reference: &str,
    config: &RegistryConfig,
) -> Result<Descriptor, ImageError> {
    let parsed: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
        RegistryError::Reference(reference.to_owned(), e.to_string())
    })?;
    let (endpoints, mut failures) = endpoints(&parsed, config);
    for failure in &failures {
        tracing::warn!(image = %reference, error = %failure, "mirror skipped");
    }
    for endpoint in endpoints {
        let pulled = panic_as_failure(
            &endpoint.reference.whole(),
            pull_from(cd, &endpoint, config),
        )
        .await;
        match pulled {
            Ok(desc) => {
                tracing::info!(image = %reference, endpoint = %endpoint.host, digest = %desc.digest(), "pulled");
                return Ok(desc);
            }
            // containerd itself failing is not a reason to try the next mirror.
            Err(e) if matches!(e, ImageError::Containerd(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(image = %reference, endpoint = %endpoint.host, error = %e, "pull failed");
                failures.push(format!("{}: {e}", endpoint.host));
            }
        }
    }
    Err(RegistryError::AllEndpointsFailed(failures).into())
}

/// Layers being downloaded now, by digest. An entry lives as long as a pull holds or
/// waits for its lock; the dead ones are swept at each new download.
static DOWNLOADING: std::sync::LazyLock<
    std::sync::Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
> = std::sync::LazyLock::new(Default::default);

/// Longest a pull waits for another pull's download of the same layer before it
/// downloads the layer itself, side by side: the other may be crawling through a slow
/// mirror for as long as its layer's deadline (hours for a large layer), while this one
/// has a fast registry.
const DOWNLOAD_WAIT: Duration = Duration::from_secs(30);

/// Waits until no other pull of this keeld downloads the layer `digest` (at most
/// [`DOWNLOAD_WAIT`]: then `None`, and the caller downloads it too), and holds it until
/// the guard is dropped. Locks are taken one layer at a time, never two at once, so no
/// two pulls can wait for each other.
async fn one_download_at_a_time(digest: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
    let lock = {
        // Entries are inserted and swept whole: a poisoned map is still consistent.
        let mut downloading = DOWNLOADING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        downloading.retain(|_, lock| lock.strong_count() > 0);
        match downloading.get(digest).and_then(std::sync::Weak::upgrade) {
            Some(lock) => lock,
            None => {
                let lock = std::sync::Arc::new(tokio::sync::Mutex::new(()));
                downloading.insert(digest.to_owned(), std::sync::Arc::downgrade(&lock));
                lock
            }
        }
    };
    tokio::time::timeout(DOWNLOAD_WAIT, lock.lock_owned())
        .await
        .ok()
}

/// Awaits one endpoint's pull. A panic (a bug on some registry's answer: oci-client's
/// token exchange, which keeld used before its own, panicked on a token that is no valid
/// header value) is then that endpoint's failure, naming `what` (the reference as pulled
/// from there), not the end of the task pulling.
async fn panic_as_failure<T>(
    what: &str,
    pulling: impl std::future::Future<Output = Result<T, ImageError>>,
) -> Result<T, ImageError> {
    std::panic::AssertUnwindSafe(pulling)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".to_owned());
            Err(ImageError::Protocol(format!(
                "{what}: the registry client failed on the registry's answer ({why})"
            )))
        })
}

fn registry_failure(
    endpoint: &Endpoint,
    config: &RegistryConfig,
    e: impl std::fmt::Display,
) -> ImageError {
    let note = config
        .unusable
        .get(credential_registry(&endpoint.host))
        .map(|why| {
            format!(
                " (settings.container-registry.credentials for {} were not used: {why})",
                endpoint.host
            )
        })
        .unwrap_or_default();
    // At most 1000 characters of what the failure says, on one line (it may quote a
    // registry's answer).
    let mut said: String = e
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1001)
        .collect();
    if said.chars().count() > 1000 {
        said = said.chars().take(1000).collect::<String>() + "…";
    }
    ImageError::Protocol(format!("{}: {said}{note}", endpoint.reference.whole()))
}

/// How long keeld uses a registry's bearer token before asking for a new one, within
/// one pull. Registries give tokens of minutes (Docker Hub's last 300 s, and 60 s is
/// the protocol's default when the answer says nothing): a pull of large layers
/// outlives them, and its later requests would go out with a stale token (401).
const TOKEN_REUSE: Duration = Duration::from_secs(45);

/// Most bytes of a token service's answer keeld reads (tokens are a few KiB at most:
/// Docker Hub's are under 2): a larger answer fails the endpoint.
const TOKEN_ANSWER_MAX: usize = 64 * 1024;

/// A registry's `WWW-Authenticate: Bearer realm="…",service="…"` challenge.
#[derive(Debug, PartialEq, Eq)]
struct BearerChallenge {
    realm: String,
    service: Option<String>,
    /// A scope the registry names in its challenge, asked for beside the pull's own.
    scope: Option<String>,
}

impl BearerChallenge {
    /// The challenge in one header value; `None` for another scheme (Basic) or one
    /// without a realm. Parameters are `name=token` or `name="quoted"` (with `\`
    /// escapes), separated by commas (RFC 9110, section 11.2).
    fn parse(header: &str) -> Option<BearerChallenge> {
        let header = header.trim_start();
        let (scheme, mut rest) = header.split_at(header.find(' ').unwrap_or(header.len()));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut params = HashMap::new();
        loop {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                break;
            }
            // An item that is no parameter (`error`, or the next challenge's scheme)
            // ends this challenge's parameters; those read so far stand.
            let Some(eq) = rest.find('=') else {
                break;
            };
            let name = rest[..eq].trim().to_ascii_lowercase();
            rest = rest[eq + 1..].trim_start();
            let value = if let Some(quoted) = rest.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.push(chars.next()?.1),
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                rest = &quoted[end?..];
                value
            } else {
                let end = rest.find(',').unwrap_or(rest.len());
                let value = rest[..end].trim().to_owned();
                rest = &rest[end..];
                value
            };
            params.insert(name, value);
        }
        Some(BearerChallenge {
            realm: params.remove("realm").filter(|r| !r.is_empty())?,
            service: params.remove("service"),
            scope: params.remove("scope").filter(|s| !s.is_empty()),
        })
    }
}

/// The first bearer challenge among `response`'s `WWW-Authenticate` headers.
fn challenge_of(response: &reqwest::Response) -> Option<BearerChallenge> {
    response
        .headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(BearerChallenge::parse)
}

/// How much of a registry's error answer keeld reads, for the message: the rest is not
/// read at all (an answer without end cannot grow keeld's memory).
const ERROR_BODY_MAX: usize = 4096;

/// One endpoint's pull: keeld's own HTTP requests for manifests and blobs, with the
/// media types keeld accepts, the endpoint's credentials, and a bearer token from the
/// registry's token service ([`Session::exchange`]), asked again once older than
/// [`TOKEN_REUSE`]. Errors
/// are read to [`ERROR_BODY_MAX`] bytes, and bodies are read by the caller within its
/// own bounds, never whole.
struct Session<'a> {
    http: reqwest::Client,
    /// For the token service, which may be another host than the endpoint: proxied
    /// as an HTTPS registry is, even for a plain-HTTP endpoint.
    token_http: reqwest::Client,
    endpoint: &'a Endpoint,
    config: &'a RegistryConfig,
    auth: RegistryAuth,
    token: Option<(Option<String>, tokio::time::Instant)>,
    /// [`TOKEN_REUSE`]; shortened by tests.
    token_reuse: Duration,
}

impl<'a> Session<'a> {
    fn new(endpoint: &'a Endpoint, config: &'a RegistryConfig) -> Result<Session<'a>, ImageError> {
        Ok(Session {
            http: http_client(config, !endpoint.plain_http)?,
            token_http: http_client(config, true)?,
            endpoint,
            config,
            auth: config.auth_for(&endpoint.host),
            token: None,
            token_reuse: TOKEN_REUSE,
        })
    }

    fn failure(&self, e: impl std::fmt::Display) -> ImageError {
        registry_failure(self.endpoint, self.config, e)
    }

    /// `https://<registry>/v2/<repository>/<kind>/<name>` (http for a plain-http
    /// mirror).
    fn url(&self, reference: &Reference, kind: &str, name: &str) -> String {
        let scheme = if self.endpoint.plain_http {
            "http"
        } else {
            "https"
        };
        format!(
            "{scheme}://{}/v2/{}/{kind}/{name}",
            reference.resolve_registry(),
            reference.repository()
        )
    }

    /// GETs `url` with the credentials; answers the response of a success, or the
    /// failure with what the registry said (bounded, on one line).
    async fn get(
        &mut self,
        reference: &Reference,
        url: &str,
        accept: Option<String>,
    ) -> Result<reqwest::Response, ImageError> {
        let (mut response, fresh) = self.get_once(reference, url, accept.clone()).await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            // Asked again, once, from the refusal's own challenge when it carries one (a
            // registry whose `/v2/` asks for nothing may still guard a repository), or
            // else from `/v2/`'s when the token was kept from an earlier request (a
            // registry's tokens can expire before the reuse limit). A 401 to the
            // request repeated with the new token is the answer.
            let challenge = challenge_of(&response);
            if let Some(challenge) = challenge {
                drop(response);
                let token = self.bounded(self.token_for(&challenge, reference)).await?;
                self.token = Some((Some(token), tokio::time::Instant::now()));
                (response, _) = self.get_once(reference, url, accept).await?;
            } else if !fresh {
                drop(response);
                self.token = None;
                (response, _) = self.get_once(reference, url, accept).await?;
            }
        }
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let mut body = Vec::new();
        while body.len() < ERROR_BODY_MAX {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let said: String = String::from_utf8_lossy(&body)
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        Err(self.failure(format!("GET {url}: {status}: {said}")))
    }

    /// One GET of `url` with the credentials or the token (asked for when there is none,
    /// or it is older than the reuse limit); any answer, and whether the token (or that
    /// there is none) was just asked for.
    async fn get_once(
        &mut self,
        reference: &Reference,
        url: &str,
        accept: Option<String>,
    ) -> Result<(reqwest::Response, bool), ImageError> {
        let (token, fresh) = match &self.token {
            Some((token, at)) if at.elapsed() < self.token_reuse => (token.clone(), false),
            _ => {
                let token = self.bounded(self.exchange(reference)).await?;
                self.token = Some((token.clone(), tokio::time::Instant::now()));
                (token, true)
            }
        };
        let mut request = self.http.get(url);
        if let Some(accept) = accept {
            request = request.header(reqwest::header::ACCEPT, accept);
        }
        let request = match (&token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(username, password)) => {
                request.basic_auth(username, Some(password))
            }
            (None, _) => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| self.failure(format!("GET {url}: {e}")))?;
        Ok((response, fresh))
    }

    /// A token exchange bounded in time as a manifest is (the token may be asked again
    /// during a layer, whose own deadline can be long); in size by [`Self::token_for`].
    async fn bounded<T>(
        &self,
        exchange: impl std::future::Future<Output = Result<T, ImageError>>,
    ) -> Result<T, ImageError> {
        tokio::time::timeout(METADATA_DEADLINE, exchange)
            .await
            .map_err(|_| {
                self.failure(format!(
                    "the token service did not answer within {}",
                    humantime::format_duration(METADATA_DEADLINE)
                ))
            })?
    }

    /// A bearer token for pulling `reference`, from the token service the registry
    /// names in its challenge to an unauthenticated `GET /v2/`; `None` when the registry
    /// sets no such challenge: the requests then carry the credentials themselves, or
    /// nothing.
    async fn exchange(&self, reference: &Reference) -> Result<Option<String>, ImageError> {
        let scheme = if self.endpoint.plain_http {
            "http"
        } else {
            "https"
        };
        let ping = format!("{scheme}://{}/v2/", reference.resolve_registry());
        let response = self
            .http
            .get(&ping)
            .send()
            .await
            .map_err(|e| self.failure(format!("GET {ping}: {e}")))?;
        let challenge = challenge_of(&response);
        drop(response);
        match challenge {
            Some(challenge) => self.token_for(&challenge, reference).await.map(Some),
            None => Ok(None),
        }
    }

    /// A bearer token for pulling `reference` from the token service `challenge` names
    /// (the registry token protocol: `realm`, `service`, and the scope
    /// `repository:<name>:pull` with the challenge's own), asked with the endpoint's
    /// credentials. The answer is read to [`TOKEN_ANSWER_MAX`] bytes at most.
    async fn token_for(
        &self,
        challenge: &BearerChallenge,
        reference: &Reference,
    ) -> Result<String, ImageError> {
        let mut url = reqwest::Url::parse(&challenge.realm).map_err(|e| {
            self.failure(format!(
                "the registry's token service {:?} is no URL: {e}",
                challenge.realm
            ))
        })?;
        // Plain HTTP only where the registry's own requests go already: to loopback, or
        // to the very host of a mirror written with `http://`; credentials never leave
        // the host in clear text for a realm elsewhere.
        let realm_host = url.host_str().unwrap_or_default();
        let endpoint_name = self
            .endpoint
            .host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(self.endpoint.host.as_str(), |(name, _)| name);
        let same_host = self.endpoint.plain_http
            && realm_host.trim_start_matches('[').trim_end_matches(']')
                == endpoint_name.trim_start_matches('[').trim_end_matches(']');
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(realm_host) || same_host => {}
            other => {
                return Err(self.failure(format!(
                    "the registry's token service {:?} is not HTTPS ({other}): keeld sends \
                     credentials in clear text only on loopback, or to the host of a mirror \
                     written with http://",
                    challenge.realm
                )))
            }
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = &challenge.service {
                query.append_pair("service", service);
            }
            let pull = format!("repository:{}:pull", reference.repository());
            if let Some(scope) = challenge.scope.as_ref().filter(|s| **s != pull) {
                query.append_pair("scope", scope);
            }
            query.append_pair("scope", &pull);
        }
        let mut request = self.token_http.get(url.clone());
        if let RegistryAuth::Basic(username, password) = &self.auth {
            request = request.basic_auth(username, Some(password));
        }
        // The realm without its query: what the user can look up, with nothing asked.
        let realm = format!("{}{}", url.origin().ascii_serialization(), url.path());
        let mut response = request
            .send()
            .await
            .map_err(|e| self.failure(format!("GET {realm}: {e}")))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.failure(format!("GET {realm}: {e}")))?
        {
            if body.len() + chunk.len() > TOKEN_ANSWER_MAX {
                if !status.is_success() {
                    break;
                }
                return Err(self.failure(format!(
                    "GET {realm}: the token service's answer is larger than {TOKEN_ANSWER_MAX} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let said: String = String::from_utf8_lossy(&body)
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            return Err(self.failure(format!(
                "the token service refused the pull ({status}, GET {realm}): {said}"
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            self.failure(format!(
                "GET {realm}: the token service's answer is no token: {e}"
            ))
        })?;
        let given = |t: Option<String>| t.filter(|t| !t.is_empty());
        match given(answer.token).or(given(answer.access_token)) {
            Some(token) => Ok(token),
            None => Err(self.failure(format!(
                "GET {realm}: the token service's answer holds no token"
            ))),
        }
    }

    /// `reference`'s manifest, at most [`MAX_METADATA_BLOB`] bytes of it (a registry
    /// sending one without end would otherwise grow keeld's memory for as long as the
    /// deadline lets it). Answers the body and its sha256 digest, which must match the
    /// registry's `Docker-Content-Digest` when it gives one.
    async fn manifest(&mut self, reference: &Reference) -> Result<(Vec<u8>, String), ImageError> {
        let name = reference
            .digest()
            .or_else(|| reference.tag())
            .unwrap_or("latest")
            .to_owned();
        let url = self.url(reference, "manifests", &name);
        let mut response = self
            .get(reference, &url, Some(accepted().join(", ")))
            .await?;
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let limit = usize::try_from(MAX_METADATA_BLOB).unwrap_or(usize::MAX);
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.failure(format!("GET {url}: {e}")))?
        {
            if body.len() + chunk.len() > limit {
                return Err(self.failure(format!(
                    "GET {url}: the manifest is larger than {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        // The digest is always the body's own; a registry that names another one (for
        // the same algorithm) sent something else than it meant, and nothing of it is
        // used.
        let digest = super::oci::sha256_digest(&body);
        if let Some(said) = header_digest.filter(|d| d.starts_with("sha256:")) {
            if said != digest {
                return Err(ImageError::DigestMismatch {
                    digest: said,
                    actual: digest,
                });
            }
        }
        Ok((body, digest))
    }

    /// The blob `desc` names, as it arrives.
    async fn blob(
        &mut self,
        reference: &Reference,
        desc: &Descriptor,
    ) -> Result<impl futures_util::Stream<Item = Result<bytes::Bytes, ImageError>>, ImageError>
    {
        let url = self.url(reference, "blobs", desc.digest().as_ref());
        let response = self.get(reference, &url, None).await?;
        let owned = self.endpoint.reference.whole();
        Ok(response.bytes_stream().map(move |r| {
            r.map_err(|e| ImageError::Protocol(format!("{owned}: download failed: {e}")))
        }))
    }
}

/// An HTTP client with keeld's time limits and, when `proxied`, the proxy of
/// `settings.network` for HTTPS (as containerd gets it, `HTTPS_PROXY` only: plain HTTP
/// goes direct; Go never proxies a loopback address, and reqwest does unless told).
fn http_client(config: &RegistryConfig, proxied: bool) -> Result<reqwest::Client, ImageError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .no_proxy();
    if let (Some(rules), true) = (&config.proxy, proxied) {
        let no_proxy =
            reqwest::NoProxy::from_string(&format!("{},127.0.0.0/8,::1", rules.no_proxy_joined()));
        let proxy = reqwest::Proxy::https(rules.https_proxy())
            .map_err(|e| ImageError::Protocol(format!("the proxy of settings.network: {e}")))?
            .no_proxy(no_proxy);
        builder = builder.proxy(proxy);
    }
    builder
        .build()
        .map_err(|e| ImageError::Protocol(format!("cannot make an HTTP client: {e}")))
}

/// The manifest media types keeld asks a registry for.
fn accepted() -> [String; 4] {
    [
        MediaType::ImageManifest.to_string(),
        MEDIA_DOCKER_MANIFEST.to_owned(),
        MediaType::ImageIndex.to_string(),
        MEDIA_DOCKER_LIST.to_owned(),
    ]
}

async fn pull_from(
    cd: &Containerd,
    endpoint: &Endpoint,
    config: &RegistryConfig,
) -> Result<Descriptor, ImageError> {
    let mut session = Session::new(endpoint, config)?;
    let reference = &endpoint.reference;
    let (mut bytes, digest) =
        within_deadline(endpoint, "the manifest", session.manifest(reference)).await??;
    if let Some(pinned) = reference.digest() {
        if pinned != digest {
            return Err(RegistryError::PinnedDigest {
                endpoint: endpoint.host.clone(),
                pinned: pinned.to_owned(),
                got: digest,
            }
            .into());
        }
    }
    let mut digest = parse_digest(&digest)?;
    verify_digest(&digest, &bytes)?;
    let mut pointed: Option<MediaType> = None;
    let manifest = match parse_document(None, &bytes)? {
        Document::Manifest(manifest) => *manifest,
        Document::Index(index) => {
            let (os, arch) = host_platform();
            let chosen = select_platform(&index)
                .ok_or_else(|| session.failure(ImageError::NoPlatform { os, arch }))?;
            let by_digest = reference.clone_with_digest(chosen.digest().to_string());
            let (b, d) = within_deadline(
                endpoint,
                "the platform's manifest",
                session.manifest(&by_digest),
            )
            .await??;
            if d != chosen.digest().as_ref() {
                return Err(ImageError::DigestMismatch {
                    digest: chosen.digest().to_string(),
                    actual: d,
                });
            }
            verify_digest(chosen.digest(), &b)?;
            bytes = b;
            digest = chosen.digest().clone();
            pointed = Some(chosen.media_type().clone());
            parse_json("image manifest", &bytes)?
        }
    };
    // The manifest's own media type, else the index's word for it, else OCI's.
    let media_type = manifest
        .media_type()
        .clone()
        .or(pointed)
        .unwrap_or(MediaType::ImageManifest);
    let manifest_desc = Descriptor::new(media_type, bytes.len() as u64, digest);

    for layer in manifest.layers() {
        // Held through the download: a pull that wants the same layer waits for it (for
        // a while), then finds it in the store, instead of downloading it a second time
        // (two containers of one image, or two images on one base, started at once).
        let _downloading = one_download_at_a_time(layer.digest().as_ref()).await;
        if content::has_blob(cd, layer.digest().as_ref()).await? {
            continue;
        }
        let allowed = layer_deadline(layer.size());
        let deadline = tokio::time::Instant::now() + allowed;
        let late = format!(
            "{}: layer {} ({} bytes) did not arrive whole within {} (slower than {} KiB/s on average)",
            endpoint.reference.whole(),
            layer.digest(),
            layer.size(),
            humantime::format_duration(allowed),
            MIN_LAYER_RATE / 1024
        );
        // Checked as it arrives (`verified`: a layer that is not what the manifest says
        // fails this endpoint, and the next one is tried), and again by containerd when
        // the write commits; its size by `write_blob`.
        let data = tokio::time::timeout_at(deadline, session.blob(reference, layer))
            .await
            .map_err(|_| ImageError::Protocol(late.clone()))??;
        let data = until_deadline(verified(data, layer), deadline, late);
        content::write_blob(cd, layer, HashMap::new(), data).await?;
    }
    let config_desc = manifest.config();
    let config_bytes = if content::has_blob(cd, config_desc.digest().as_ref()).await? {
        content::read_blob(cd, config_desc).await?
    } else {
        if config_desc.size() > MAX_METADATA_BLOB {
            return Err(ImageError::TooBig {
                digest: config_desc.digest().to_string(),
                size: config_desc.size(),
            });
        }
        // Held to its declared size: a registry that sends more is cut off there, not
        // kept in memory until the digest check at the end.
        let declared = config_desc.size();
        let fetch = async {
            let mut data = session.blob(reference, config_desc).await?;
            let mut out = Vec::new();
            while let Some(chunk) = data.next().await {
                let chunk = chunk?;
                if out.len() as u64 + chunk.len() as u64 > declared {
                    return Err(session.failure(format!(
                        "the image config is larger than the {declared} bytes the manifest gives"
                    )));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        };
        let bytes = within_deadline(endpoint, "the image config", fetch).await??;
        verify_digest(config_desc.digest(), &bytes)?;
        bytes
    };
    let image_config: ImageConfiguration = parse_json("image config", &config_bytes)?;
    write_small(
        cd,
        config_desc,
        config_gc_labels(&image_config),
        config_bytes,
    )
    .await?;
    write_small(
        cd,
        &manifest_desc,
        manifest_gc_labels(&manifest),
        bytes.to_vec(),
    )
    .await?;
    Ok(manifest_desc)
}

/// `data`, the blob `desc` names, with its sha256 digest checked as the last of its
/// declared bytes arrives: a mismatch is the endpoint's failure
/// ([`ImageError::DigestMismatch`]), not containerd's refusal at commit (which ends the
/// whole pull as if containerd had failed). A digest of another algorithm is left to
/// containerd.
fn verified<S>(
    data: S,
    desc: &Descriptor,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, ImageError>>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, ImageError>>,
{
    use sha2::Digest as _;
    let expected = desc.digest().to_string();
    let size = desc.size();
    let check = expected.starts_with("sha256:");
    let mut hasher = sha2::Sha256::new();
    let mut seen: u64 = 0;
    data.map(move |chunk| {
        let chunk = chunk?;
        if check {
            hasher.update(&chunk);
            seen = seen.saturating_add(chunk.len() as u64);
            if seen == size {
                let actual = format!("sha256:{}", hex::encode(hasher.clone().finalize()));
                if actual != expected {
                    return Err(ImageError::DigestMismatch {
                        digest: expected.clone(),
                        actual,
                    });
                }
            }
        }
        Ok(chunk)
    })
}

/// `fetch` of `what` from `endpoint`, failed after [`METADATA_DEADLINE`].
async fn within_deadline<T>(
    endpoint: &Endpoint,
    what: &str,
    fetch: impl std::future::Future<Output = T>,
) -> Result<T, ImageError> {
    tokio::time::timeout(METADATA_DEADLINE, fetch)
        .await
        .map_err(|_| {
            ImageError::Protocol(format!(
                "{}: {what} did not arrive whole within {}",
                endpoint.reference.whole(),
                humantime::format_duration(METADATA_DEADLINE)
            ))
        })
}

/// `stream`, ended at `deadline` with an error saying `late` (the consumer stops at the
/// first error: the download is given up, and the content write with it).
fn until_deadline<T, S>(
    stream: S,
    deadline: tokio::time::Instant,
    late: String,
) -> impl futures_util::Stream<Item = Result<T, ImageError>>
where
    S: futures_util::Stream<Item = Result<T, ImageError>>,
{
    futures_util::stream::unfold(
        (Box::pin(stream), Some(late)),
        move |(mut stream, late)| async move {
            let why = late?;
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(item)) => Some((item, (stream, Some(why)))),
                Ok(None) => None,
                Err(_) => Some((Err(ImageError::Protocol(why)), (stream, None))),
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer that arrives at a byte a minute is given up at its deadline, with the
    /// reason; one that arrives in time is passed through whole.
    #[tokio::test(start_paused = true)]
    async fn a_layer_slower_than_its_deadline_is_given_up() {
        let deadline = tokio::time::Instant::now() + layer_deadline(10);
        assert_eq!(layer_deadline(10), METADATA_DEADLINE);
        assert_eq!(
            layer_deadline(100 * 1024 * 1024),
            METADATA_DEADLINE + Duration::from_secs(1600)
        );
        let trickle = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_secs(59)).await;
            Some((Ok::<_, ImageError>(vec![n as u8]), n + 1))
        });
        let got: Vec<Result<Vec<u8>, ImageError>> =
            until_deadline(trickle, deadline, "too slow".to_owned())
                .collect()
                .await;
        assert_eq!(
            got.len(),
            3,
            "two bytes by 118 s, then the deadline: {got:?}"
        );
        assert!(matches!(&got[2], Err(ImageError::Protocol(why)) if why == "too slow"));

        let deadline = tokio::time::Instant::now() + layer_deadline(10);
        let quick = futures_util::stream::iter([Ok::<_, ImageError>(vec![1u8]), Ok(vec![2])]);
        let got: Vec<_> = until_deadline(quick, deadline, "too slow".to_owned())
            .collect()
            .await;
        assert!(matches!(got.as_slice(), [Ok(a), Ok(b)] if a == &[1] && b == &[2]));
    }

    #[test]
    fn loopback_hosts() {
        for yes in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:80",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["registry.example.com", "10.0.0.1:5000", "public.ecr.aws"] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    /// Credentials keeld cannot use are not silently dropped: a pull from that registry
    /// goes anonymously, and its failure says which credentials were not used and why.
    #[test]
    fn credentials_keeld_cannot_use_are_named_in_the_pull_error() {
        let settings: Settings = serde_json::from_value(serde_json::json!({
            "container-registry": {
                "credentials": [
                    {"registry": "token.example.com", "identitytoken": "refresh-token"},
                    {"registry": "half.example.com", "username": "u"},
                    {"registry": "full.example.com", "username": "u", "password": "p"}
                ]
            }
        }))
        .expect("settings");
        let config = RegistryConfig::from_settings(&settings);
        assert!(matches!(
            config.auth_for("full.example.com"),
            RegistryAuth::Basic(..)
        ));
        for (host, why) in [
            ("token.example.com", "only an identitytoken"),
            ("half.example.com", "a username without a password"),
        ] {
            assert!(matches!(config.auth_for(host), RegistryAuth::Anonymous));
            let reference: Reference = format!("{host}/app:1").parse().expect("ref");
            let (list, _) = endpoints(&reference, &config);
            let failure = registry_failure(
                &list[0],
                &config,
                "the token service refused the pull (401 Unauthorized)",
            )
            .to_string();
            assert!(
                failure.contains(&format!(
                    "settings.container-registry.credentials for {host} were not used"
                )) && failure.contains(why)
                    && failure.contains("401 Unauthorized"),
                "{failure}"
            );
            // The secret itself is never in the message.
            assert!(!failure.contains("refresh-token"), "{failure}");
        }
    }

    /// containerd-config renders the first credentials of a registry listed twice; keeld's
    /// own pulls use the same ones, so host containers and pods authenticate alike.
    #[test]
    fn a_registry_listed_twice_keeps_its_first_credentials() {
        let settings: Settings = serde_json::from_value(serde_json::json!({
            "container-registry": {
                "credentials": [
                    {"registry": "twice.example.com", "username": "first", "password": "p1"},
                    {"registry": "twice.example.com", "username": "second", "password": "p2"},
                    {"registry": "unusable.example.com", "username": "only"},
                    {"registry": "unusable.example.com", "username": "u", "password": "p"}
                ]
            }
        }))
        .expect("settings");
        let config = RegistryConfig::from_settings(&settings);
        match config.auth_for("twice.example.com") {
            RegistryAuth::Basic(user, password) => {
                assert_eq!((user.as_str(), password.as_str()), ("first", "p1"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            config.auth_for("unusable.example.com"),
            RegistryAuth::Anonymous
        ));
    }

    /// Docker Hub's images are named `docker.io/…` and pulled from
    /// `registry-1.docker.io`: credentials under either name serve both, and when an
    /// older keeld stored both, `docker.io`'s win (as containerd-config renders them).
    #[test]
    fn docker_hub_credentials_serve_both_of_its_names() {
        // The user keeld's pulls authenticate as, for each name and for another registry.
        let users = |credentials: serde_json::Value| {
            let settings: Settings = serde_json::from_value(serde_json::json!({
                "container-registry": {"credentials": credentials}
            }))
            .expect("settings");
            let config = RegistryConfig::from_settings(&settings);
            ["docker.io", "registry-1.docker.io", "quay.io"].map(|name| {
                match config.auth_for(name) {
                    RegistryAuth::Basic(user, _) => Some(user),
                    RegistryAuth::Anonymous => None,
                    other => panic!("{name}: {other:?}"),
                }
            })
        };
        let hub = Some("hub".to_owned());
        let only_endpoint = serde_json::json!([
            {"registry": "registry-1.docker.io", "username": "hub", "password": "p"}
        ]);
        assert_eq!(users(only_endpoint), [hub.clone(), hub.clone(), None]);
        let both = serde_json::json!([
            {"registry": "registry-1.docker.io", "username": "endpoint", "password": "p"},
            {"registry": "docker.io", "username": "hub", "password": "p"}
        ]);
        assert_eq!(users(both), [hub.clone(), hub, None]);
    }

    #[test]
    fn mirrors_come_first_and_http_only_when_written() {
        let settings: Settings = serde_json::from_value(serde_json::json!({
            "container-registry": {
                "mirrors": [
                    {"registry": "docker.io", "endpoint": ["http://10.0.0.5:5000", "https://mirror.example.com"]}
                ],
                "credentials": [
                    {"registry": "mirror.example.com", "username": "u", "password": "p"}
                ]
            }
        }))
        .expect("settings");
        let config = RegistryConfig::from_settings(&settings);
        let reference: Reference = "docker.io/library/busybox:1".parse().expect("ref");
        let (list, unusable) = endpoints(&reference, &config);
        assert!(unusable.is_empty(), "{unusable:?}");
        let hosts: Vec<_> = list
            .iter()
            .map(|e| (e.host.as_str(), e.plain_http))
            .collect();
        assert_eq!(
            hosts,
            [
                ("10.0.0.5:5000", true),
                ("mirror.example.com", false),
                ("docker.io", false)
            ]
        );
        assert_eq!(list[0].reference.repository(), "library/busybox");
        assert_eq!(list[0].reference.tag(), Some("1"));
        assert!(matches!(
            config.auth_for("mirror.example.com"),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            config.auth_for("docker.io"),
            RegistryAuth::Anonymous
        ));
        assert!(!format!("{config:?}").contains("\"p\""));
    }

    /// A layer another pull is downloading waits for it; another layer does not, and a
    /// finished download leaves nothing behind.
    #[tokio::test(start_paused = true)]
    async fn one_layer_is_downloaded_by_one_pull_at_a_time() {
        let first = one_download_at_a_time("sha256:test-one-at-a-time-a").await;
        assert!(first.is_some());
        let waiting = tokio::spawn(async {
            assert!(one_download_at_a_time("sha256:test-one-at-a-time-a")
                .await
                .is_some());
        });
        let other = tokio::time::timeout(
            Duration::from_secs(5),
            one_download_at_a_time("sha256:test-one-at-a-time-b"),
        )
        .await
        .expect("another layer does not wait");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the same layer waits");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends with the download")
            .expect("no panic");
        drop(other);
        // A download that takes longer than the wait: the other pull goes ahead.
        let slow = one_download_at_a_time("sha256:test-one-at-a-time-d").await;
        let started = tokio::time::Instant::now();
        assert!(one_download_at_a_time("sha256:test-one-at-a-time-d")
            .await
            .is_none());
        assert_eq!(started.elapsed(), DOWNLOAD_WAIT);
        drop(slow);
        drop(one_download_at_a_time("sha256:test-one-at-a-time-c").await);
        let downloading = DOWNLOADING.lock().expect("not poisoned");
        assert!(!downloading.contains_key("sha256:test-one-at-a-time-a"));
        assert!(!downloading.contains_key("sha256:test-one-at-a-time-b"));
    }

    /// A registry whose token endpoint answers a token that is no valid header value
    /// (oci-client's token exchange, which keeld used before its own, panicked on it):
    /// the pull fails with a reason naming the image, the task goes on. The
    /// `catch_unwind` around each endpoint (`panic_as_failure`) stays for other panics.
    #[tokio::test]
    async fn a_token_that_is_no_header_value_fails_the_endpoint() {
        let port = fake_registry(|request, port| {
            if request.starts_with("GET /token") {
                Answer::Whole(http_answer("200 OK", "", "{\"token\":\"abc\\u0001\"}"))
            } else {
                bearer_challenge(port)
            }
        })
        .await;
        // The token is no valid header value: the pull fails with the reason, and the
        // task goes on.
        pull_fails_saying(port, &[&format!("127.0.0.1:{port}/app:1")]).await;
    }

    /// A registry that sends a manifest without end: keeld stops reading at the limit,
    /// instead of holding it all in memory.
    #[tokio::test]
    async fn an_endless_manifest_is_cut_off_at_the_limit() {
        let port = fake_registry(|request, _| {
            if request.contains("/manifests/") {
                Answer::Endless(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n",
                )
            } else {
                Answer::Whole(http_answer("200 OK", "", ""))
            }
        })
        .await;
        pull_fails_saying(port, &["the manifest is larger than 4194304 bytes"]).await;
    }

    /// A manifest whose `Docker-Content-Digest` is not its own is refused, tag or not.
    #[tokio::test]
    async fn a_manifest_that_is_not_what_its_digest_header_says_is_refused() {
        let port = fake_registry(|request, _| {
            if request.contains("/manifests/") {
                Answer::Whole(http_answer(
                    "200 OK",
                    &format!("Docker-Content-Digest: sha256:{}\r\n", "0".repeat(64)),
                    "{\"schemaVersion\":2}",
                ))
            } else {
                Answer::Whole(http_answer("200 OK", "", ""))
            }
        })
        .await;
        pull_fails_saying(port, &[&format!("{} ", "0".repeat(64))]).await;
    }

    /// keeld's own manifest request carries the credentials: the user's (Basic) where
    /// the registry asks for them, a token where it sends clients to a token service.
    /// The fake registry answers an authorised manifest request with a body that is no
    /// manifest, so the pull gets past authorisation and fails on parsing.
    #[tokio::test]
    async fn the_manifest_request_carries_the_credentials() {
        let basic = fake_registry(|request, _| {
            // base64("u:p")
            if authorised(request, "Basic dTpw") && request.contains("/manifests/") {
                Answer::Whole(http_answer("200 OK", "", "not a manifest"))
            } else {
                Answer::Whole(http_answer(
                    "401 Unauthorized",
                    "WWW-Authenticate: Basic realm=\"r\"\r\n",
                    "",
                ))
            }
        })
        .await;
        let bearer = fake_registry(|request, port| {
            if request.starts_with("GET /token") {
                Answer::Whole(http_answer("200 OK", "", "{\"token\":\"t0k3n\"}"))
            } else if authorised(request, "Bearer t0k3n") && request.contains("/manifests/") {
                Answer::Whole(http_answer("200 OK", "", "not a manifest"))
            } else {
                bearer_challenge(port)
            }
        })
        .await;
        for port in [basic, bearer] {
            let settings: Settings = serde_json::from_value(serde_json::json!({
                "container-registry": {"credentials": [
                    {"registry": format!("127.0.0.1:{port}"), "username": "u", "password": "p"}
                ]}
            }))
            .expect("settings");
            let failed = failed_pull(port, &RegistryConfig::from_settings(&settings))
                .await
                .to_string();
            assert!(!failed.contains("401"), "port {port}: {failed}");
            assert!(
                failed.contains("JSON") || failed.contains("json"),
                "port {port}: {failed}"
            );
        }
    }

    /// The challenge's realm and service, whatever the spelling of the scheme, the
    /// order of the parameters, commas and escapes inside quotes; another scheme, or no
    /// realm, is no bearer challenge.
    #[test]
    fn bearer_challenges_are_read_as_registries_write_them() {
        let parsed = BearerChallenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(
            parsed,
            Some(BearerChallenge {
                realm: "https://auth.docker.io/token".to_owned(),
                service: Some("registry.docker.io".to_owned()),
                scope: Some("repository:library/busybox:pull".to_owned()),
            })
        );
        let parsed =
            BearerChallenge::parse(r#"bearer service="a,b\"c" , realm=https://r.example/t?x=1"#);
        assert_eq!(
            parsed,
            Some(BearerChallenge {
                realm: "https://r.example/t?x=1".to_owned(),
                service: Some("a,b\"c".to_owned()),
                scope: None,
            })
        );
        // An item that is no parameter ends them; what was read stands.
        assert_eq!(
            BearerChallenge::parse(r#"Bearer realm="https://r.example/t",error"#),
            Some(BearerChallenge {
                realm: "https://r.example/t".to_owned(),
                service: None,
                scope: None,
            })
        );
        for none in [
            r#"Basic realm="registry""#,
            r#"Bearer service="s""#,
            r#"Bearer realm="""#,
            r#"Bearer realm="unterminated"#,
            "Bearer",
            "",
        ] {
            assert_eq!(BearerChallenge::parse(none), None, "{none}");
        }
    }

    static TOKENS_GIVEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn authorised(request: &str, wanted: &str) -> bool {
        request
            .lines()
            .any(|l| l.eq_ignore_ascii_case(&format!("authorization: {wanted}")))
    }

    /// keeld's own token exchange: the challenge's realm and service, the pull scope and
    /// the endpoint's credentials go to the token service; `access_token` is a token as
    /// `token` is; a token is used until it is older than the reuse limit, then asked
    /// again.
    #[tokio::test]
    async fn a_token_is_asked_with_scope_and_credentials_and_again_once_old() {
        let port = fake_registry(|request, port| {
            if request.starts_with("GET /token") {
                let scoped = request
                    .starts_with("GET /token?service=t&scope=repository%3Aapp%3Apull HTTP/1.1");
                if !(scoped && authorised(request, "Basic dTpw")) {
                    return Answer::Whole(http_answer("400 Bad Request", "", "{}"));
                }
                let n = TOKENS_GIVEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Answer::Whole(http_answer(
                    "200 OK",
                    "",
                    // An empty `token` beside the `access_token`: the one given counts.
                    &format!("{{\"token\":\"\",\"access_token\":\"tok{n}\",\"expires_in\":300}}"),
                ))
            } else if request.contains("/manifests/")
                && request.lines().any(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("authorization: bearer tok")
                })
            {
                Answer::Whole(http_answer("200 OK", "", "{}"))
            } else {
                bearer_challenge(port)
            }
        })
        .await;
        let settings: Settings = serde_json::from_value(serde_json::json!({
            "container-registry": {"credentials": [
                {"registry": format!("127.0.0.1:{port}"), "username": "u", "password": "p"}
            ]}
        }))
        .expect("settings");
        let config = RegistryConfig::from_settings(&settings);
        let reference: Reference = format!("127.0.0.1:{port}/app:1").parse().expect("ref");
        let (list, _) = endpoints(&reference, &config);
        let mut session = Session::new(&list[0], &config).expect("session");
        let given = || TOKENS_GIVEN.load(std::sync::atomic::Ordering::SeqCst);
        let before = given();
        for _ in 0..3 {
            session.manifest(&reference).await.expect("manifest");
        }
        assert_eq!(given() - before, 1, "one token for requests close together");
        session.token_reuse = Duration::ZERO;
        session.manifest(&reference).await.expect("manifest");
        assert_eq!(given() - before, 2, "a new token once the last is old");
    }

    static SHORT_LIVED_GIVEN: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);
    static SHORT_LIVED_VALID: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    /// A token that expired before the reuse limit (a 401 to a request that carried a
    /// kept token) is asked again, once; a 401 to a token just given is the answer.
    #[tokio::test]
    async fn a_kept_token_that_expired_is_asked_again_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let port = fake_registry(|request, port| {
            if request.starts_with("GET /token") {
                let n = SHORT_LIVED_GIVEN.fetch_add(1, SeqCst);
                Answer::Whole(http_answer(
                    "200 OK",
                    "",
                    &format!("{{\"token\":\"tok{n}\"}}"),
                ))
            } else if request.contains("/manifests/")
                && authorised(
                    request,
                    &format!("Bearer tok{}", SHORT_LIVED_VALID.load(SeqCst)),
                )
            {
                Answer::Whole(http_answer("200 OK", "", "{}"))
            } else {
                bearer_challenge(port)
            }
        })
        .await;
        let config = RegistryConfig::default();
        let reference: Reference = format!("127.0.0.1:{port}/app:1").parse().expect("ref");
        let (list, _) = endpoints(&reference, &config);
        let mut session = Session::new(&list[0], &config).expect("session");
        session.manifest(&reference).await.expect("with tok0");
        // tok0 expires: the kept token is refused, a new one is asked for.
        SHORT_LIVED_VALID.store(1, SeqCst);
        session.manifest(&reference).await.expect("with tok1");
        assert_eq!(SHORT_LIVED_GIVEN.load(SeqCst), 2);
        // A registry that refuses every token: one new token, then the 401 stands.
        SHORT_LIVED_VALID.store(99, SeqCst);
        let refused = session.manifest(&reference).await.expect_err("refused");
        assert!(refused.to_string().contains("401"), "{refused}");
        assert_eq!(SHORT_LIVED_GIVEN.load(SeqCst), 3, "asked again once only");
    }

    /// A registry whose `/v2/` asks for nothing but whose repository does: the token
    /// comes from the manifest request's own challenge, and the request is repeated with
    /// it.
    #[tokio::test]
    async fn a_challenge_on_the_request_itself_is_answered() {
        let port = fake_registry(|request, port| {
            if request.starts_with("GET /token") {
                let scoped = request.contains("scope=repository%3Aapp%3Apull");
                let token = if scoped { "scoped" } else { "unscoped" };
                Answer::Whole(http_answer(
                    "200 OK",
                    "",
                    &format!("{{\"token\":\"{token}\"}}"),
                ))
            } else if request.starts_with("GET /v2/ ") || authorised(request, "Bearer scoped") {
                // `/v2/` asks for nothing; the manifest wants the scoped token.
                Answer::Whole(http_answer("200 OK", "", "{}"))
            } else {
                bearer_challenge(port)
            }
        })
        .await;
        let config = RegistryConfig::default();
        let reference: Reference = format!("127.0.0.1:{port}/app:1").parse().expect("ref");
        let (list, _) = endpoints(&reference, &config);
        let mut session = Session::new(&list[0], &config).expect("session");
        session
            .manifest(&reference)
            .await
            .expect("with the challenge's token");
        // The token is kept for the next request: no 401 first.
        session
            .manifest(&reference)
            .await
            .expect("with the kept token");
    }

    /// A token service whose answer never ends: keeld stops reading at the limit.
    #[tokio::test]
    async fn a_token_answer_without_end_is_cut_off_at_the_limit() {
        let port = fake_registry(|request, port| {
            if request.starts_with("GET /token") {
                Answer::Endless(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
                )
            } else {
                bearer_challenge(port)
            }
        })
        .await;
        pull_fails_saying(
            port,
            &["the token service's answer is larger than 65536 bytes"],
        )
        .await;
    }

    /// A loopback registry (plain HTTP because it is loopback) that sends clients to a
    /// token service elsewhere over plain HTTP: refused before anything is sent there,
    /// so credentials never cross the network in clear text.
    #[tokio::test]
    async fn a_plain_http_token_service_elsewhere_is_refused() {
        let port = fake_registry(|_, _| {
            Answer::Whole(http_answer(
                "401 Unauthorized",
                "WWW-Authenticate: Bearer realm=\"http://token.example.invalid/token\"\r\n",
                "",
            ))
        })
        .await;
        pull_fails_saying(
            port,
            &["token service \"http://token.example.invalid/token\" is not HTTPS"],
        )
        .await;
    }

    /// A token service that refuses: the pull fails saying so, with the status.
    #[tokio::test]
    async fn a_refusing_token_service_fails_the_pull_with_its_status() {
        let port = fake_registry(|request, port| {
            if request.starts_with("GET /token") {
                Answer::Whole(http_answer(
                    "401 Unauthorized",
                    "",
                    "{\"details\":\"incorrect username or password\"}",
                ))
            } else {
                bearer_challenge(port)
            }
        })
        .await;
        pull_fails_saying(
            port,
            &[
                "the token service refused the pull (401 Unauthorized",
                "incorrect username or password",
            ],
        )
        .await;
    }

    /// What a fake registry sends back to one request.
    enum Answer {
        Whole(String),
        /// This head, then spaces until the client hangs up.
        Endless(&'static str),
    }

    /// A 401 that sends the client to this fake registry's `/token` for a token.
    fn bearer_challenge(port: u16) -> Answer {
        Answer::Whole(http_answer(
            "401 Unauthorized",
            &format!(
                "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"t\"\r\n"
            ),
            "",
        ))
    }

    fn http_answer(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A registry on loopback answering each request (its first 4 KiB, and the port)
    /// with `answer`; answers the port.
    async fn fake_registry(answer: fn(&str, u16) -> Answer) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = vec![0u8; 4096];
                    let n = conn.read(&mut request).await.unwrap_or(0);
                    match answer(&String::from_utf8_lossy(&request[..n]), port) {
                        Answer::Whole(text) => {
                            let _ = conn.write_all(text.as_bytes()).await;
                        }
                        Answer::Endless(head) => {
                            if conn.write_all(head.as_bytes()).await.is_ok() {
                                let chunk = vec![b' '; 64 * 1024];
                                while conn.write_all(&chunk).await.is_ok() {}
                            }
                        }
                    }
                });
            }
        });
        port
    }

    /// Pulls `127.0.0.1:{port}/app:1`, which must fail before keeld needs containerd
    /// (its client connects only when used, to a socket that does not exist).
    async fn failed_pull(port: u16, config: &RegistryConfig) -> ImageError {
        let cd = Containerd::connect(std::path::Path::new("/nonexistent/containerd.sock"), "t")
            .expect("lazy client");
        pull(&cd, &format!("127.0.0.1:{port}/app:1"), config)
            .await
            .expect_err("the pull should fail")
    }

    /// Pulls as [`failed_pull`] does, with no settings; the failure must say each of
    /// `said`.
    async fn pull_fails_saying(port: u16, said: &[&str]) {
        let failed = failed_pull(port, &RegistryConfig::default())
            .await
            .to_string();
        for part in said {
            assert!(failed.contains(part), "{part:?} not in: {failed}");
        }
    }

    /// A panic in one endpoint's pull (the registry client's, on an answer it did not
    /// expect) is that endpoint's failure, named after it with the panic's message; the
    /// task pulling goes on (to the next endpoint). A pull that does not panic passes
    /// through unchanged.
    #[tokio::test]
    async fn a_panicking_pull_is_that_endpoint_s_failure() {
        let formatted = panic_as_failure::<()>("mirror.example/app:1", async {
            panic!("bad header value {}", 7)
        })
        .await
        .expect_err("a panic fails the endpoint");
        assert_eq!(
            formatted.to_string(),
            "mirror.example/app:1: the registry client failed on the registry's answer (bad header value 7)"
        );
        let literal = panic_as_failure::<()>("r/app:1", async { panic!("no token") })
            .await
            .expect_err("a panic fails the endpoint");
        assert!(
            literal.to_string().contains(
                "r/app:1: the registry client failed on the registry's answer (no token)"
            ),
            "{literal}"
        );
        let other = panic_as_failure::<()>("r/app:1", async { std::panic::panic_any(5u8) })
            .await
            .expect_err("a panic fails the endpoint");
        assert!(other.to_string().ends_with("(unknown)"), "{other}");
        let fine = panic_as_failure("r/app:1", async { Ok::<_, ImageError>(3) }).await;
        assert_eq!(fine.expect("no panic"), 3);
    }

    /// A mirror with a path is reached under it, `/v2` after the path (once), as
    /// containerd reaches it from the same setting.
    #[test]
    fn a_mirror_s_path_is_kept() {
        let config = RegistryConfig {
            mirrors: vec![(
                "docker.io".to_owned(),
                vec![
                    "https://nexus.example.com/repository/dockerhub/".to_owned(),
                    "http://[::1]:5000/v2".to_owned(),
                ],
            )],
            ..RegistryConfig::default()
        };
        let reference: Reference = "docker.io/library/busybox:1".parse().expect("ref");
        let (list, unusable) = endpoints(&reference, &config);
        assert!(unusable.is_empty(), "{unusable:?}");
        let registries: Vec<_> = list
            .iter()
            .map(|e| (e.host.as_str(), e.reference.resolve_registry()))
            .collect();
        assert_eq!(
            registries,
            [
                (
                    "nexus.example.com",
                    "nexus.example.com/repository/dockerhub"
                ),
                ("[::1]:5000", "[::1]:5000"),
                ("docker.io", "index.docker.io"),
            ]
        );
        assert!(list[1].plain_http);
    }

    #[test]
    fn an_unusable_mirror_is_reported_not_skipped() {
        let config = RegistryConfig {
            mirrors: vec![(
                "docker.io".to_owned(),
                vec!["not a url".to_owned(), "https://m.example.com".to_owned()],
            )],
            ..RegistryConfig::default()
        };
        let reference: Reference = "docker.io/library/busybox:1".parse().expect("ref");
        let (list, unusable) = endpoints(&reference, &config);
        let hosts: Vec<_> = list.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, ["m.example.com", "docker.io"]);
        assert_eq!(unusable.len(), 1);
        assert!(
            unusable[0].starts_with("mirror not a url: "),
            "{unusable:?}"
        );
    }

    #[test]
    fn auth_credentials_are_the_models_decoding() {
        let settings: Settings = serde_json::from_value(serde_json::json!({
            "container-registry": {"credentials": [
                {"registry": "quay.io", "auth": "dXNlcjpwYXNz"}
            ]}
        }))
        .expect("settings");
        let config = RegistryConfig::from_settings(&settings);
        assert!(matches!(
            config.auth_for("quay.io"),
            RegistryAuth::Basic(u, p) if u == "user" && p == "pass"
        ));
        // Base64 that is not "username:password" is refused by the model, instead of
        // pulling anonymously.
        let not_a_pair = serde_json::json!({"container-registry": {"credentials": [
            {"registry": "quay.io", "auth": "bm9jb2xvbg=="}
        ]}});
        let err = settings_model::validate_patch(&not_a_pair).expect_err("no colon");
        assert!(err.to_string().contains("username:password"), "{err}");
    }

    /// The rendered proxy environment file, every container's environment and keeld's
    /// own pulls use one computation of the proxy rules, so they agree, Kubernetes
    /// entries included.
    #[test]
    fn proxy_file_container_environment_and_pulls_agree() {
        let value = serde_json::json!({
            "network": {"https-proxy": "proxy.example.com:3128",
                        "no-proxy": ["localhost", ".example.internal", "10.0.0.0/8"]},
            "kubernetes": {"api-server": "https://api.example.com:6443",
                           "cluster-domain": "cluster.example"},
            "host-containers": {"admin": {"enabled": true, "source": "x/y:1"}}
        });
        let settings: Settings = serde_json::from_value(value.clone()).expect("settings");

        let templates = crate::apply::render::Templates::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/templates"),
        )
        .expect("templates");
        let file = templates
            .render("proxy-env", &value, &serde_json::json!({}))
            .expect("render");
        let from_file: Vec<(String, String)> = file
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();

        let desired = crate::containers::desired::host_containers(&settings);
        let from_container: Vec<(String, String)> = desired["admin"]
            .environment
            .iter()
            .filter(|(k, _)| {
                k.eq_ignore_ascii_case("https_proxy") || k.eq_ignore_ascii_case("no_proxy")
            })
            .cloned()
            .collect();

        let config = RegistryConfig::from_settings(&settings);
        let rules = config.proxy.as_ref().expect("proxy");
        let from_pulls = vec![
            ("HTTPS_PROXY".to_owned(), rules.https_proxy().to_owned()),
            ("https_proxy".to_owned(), rules.https_proxy().to_owned()),
            ("NO_PROXY".to_owned(), rules.no_proxy_joined()),
            ("no_proxy".to_owned(), rules.no_proxy_joined()),
        ];

        assert_eq!(from_file, from_container);
        assert_eq!(from_container, from_pulls);
        assert_eq!(
            rules.no_proxy_joined(),
            "localhost,127.0.0.1,169.254.169.254,api.example.com,.cluster.example,\
             .example.internal,10.0.0.0/8"
        );
    }
}
