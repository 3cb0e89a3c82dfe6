//! User-data sources named on the command line: a path, a `file://` URI, an `http://` or
//! `https://` URL (as Bottlerocket's `apiclient apply` takes) or `-` for standard input.
//! Owns turning such an argument into text and a name that error messages can show;
//! parsing the text is `settings-model`'s job.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

/// Where one user-data document comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `-`: standard input.
    Stdin,
    /// A local file, given as a path or a `file://` URI.
    File {
        /// The argument as typed, shown in error messages.
        arg: String,
        path: PathBuf,
    },
    /// A document fetched with GET from an `http://` or `https://` URL (the proxy from
    /// `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, the system's trusted CAs).
    Url {
        arg: String,
        /// The URL as errors show it: without its user and password.
        shown: String,
    },
}

/// `arg` as messages show it: a URL's user information (`user:password@`) replaced by
/// `<redacted>`, so a password typed into the URL never reaches a terminal or a log.
fn shown(arg: &str) -> String {
    let Some(start) = arg.find("://").map(|i| i + 3) else {
        return arg.to_owned();
    };
    let authority = arg[start..]
        .find(['/', '?', '#'])
        .map_or(&arg[start..], |end| &arg[start..start + end]);
    match authority.rfind('@') {
        Some(at) => format!("{}<redacted>{}", &arg[..start], &arg[start + at..]),
        None => arg.to_owned(),
    }
}

/// The most a document may hold, fetched or read: what one API request body may carry.
pub const MAX_FETCHED_BYTES: usize = 2 << 20;

/// How long a fetch may take in all.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{arg}: only local file:// URIs are supported (host {host:?} given)")]
    RemoteFileUri { arg: String, host: String },

    #[error("{name}: cannot read: {source}")]
    Read {
        name: String,
        source: std::io::Error,
    },

    #[error("{name}: not UTF-8 text")]
    NotUtf8 { name: String },

    #[error(
        "{arg}: {scheme}:// sources are not supported (use a path, file://, http:// or https://)"
    )]
    UnsupportedScheme { arg: String, scheme: String },

    #[error("{name}: cannot fetch: {reason}")]
    Fetch { name: String, reason: String },

    #[error("{name}: the server answered {status}")]
    FetchStatus { name: String, status: u16 },

    #[error("{name}: larger than {limit} bytes")]
    TooLarge { name: String, limit: usize },
}

impl Source {
    /// Interprets a command-line argument: `-`, `file:///abs/path` (percent-decoded,
    /// host empty or `localhost`), or anything else as a path.
    pub fn parse(arg: &str) -> Result<Self, SourceError> {
        if arg == "-" {
            return Ok(Self::Stdin);
        }
        if let Some((scheme, _)) = arg.split_once("://") {
            let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            match scheme.to_ascii_lowercase().as_str() {
                "http" | "https" => {
                    return Ok(Self::Url {
                        arg: arg.to_owned(),
                        shown: shown(arg),
                    })
                }
                "file" => {}
                _ if is_scheme => {
                    return Err(SourceError::UnsupportedScheme {
                        arg: shown(arg),
                        scheme: scheme.to_owned(),
                    })
                }
                _ => {}
            }
        }
        // The scheme in any case, as for http(s) (RFC 3986: schemes are case-insensitive).
        let file_uri = arg
            .get(..7)
            .filter(|prefix| prefix.eq_ignore_ascii_case("file://"))
            .map(|_| &arg[7..]);
        let path = match file_uri {
            Some(rest) => {
                let (host, path) = match rest.find('/') {
                    Some(slash) => rest.split_at(slash),
                    None => (rest, ""),
                };
                if !(host.is_empty() || host == "localhost") || path.is_empty() {
                    return Err(SourceError::RemoteFileUri {
                        arg: arg.to_owned(),
                        host: host.to_owned(),
                    });
                }
                let bytes: Vec<u8> = percent_decode_str(path).collect();
                PathBuf::from(OsString::from_vec(bytes))
            }
            None => PathBuf::from(arg),
        };
        Ok(Self::File {
            arg: arg.to_owned(),
            path,
        })
    }

    /// The name errors use: the argument as typed (a URL without its user and
    /// password), or `stdin`.
    pub fn name(&self) -> &str {
        match self {
            Self::Stdin => "stdin",
            Self::File { arg, .. } => arg,
            Self::Url { shown, .. } => shown,
        }
    }

    /// Reads the whole document of a local source; `stdin` is only consulted for
    /// [`Source::Stdin`]. A URL is not local: see [`Source::read`].
    pub fn read_from(&self, stdin: impl Read) -> Result<String, SourceError> {
        let name = self.name().to_owned();
        // Read to one byte past the limit, never whole: `/dev/zero` or an endless pipe
        // is refused at the limit instead of filling memory (keeld takes no larger
        // request body anyway).
        let read_bounded = |input: &mut dyn Read| -> Result<Vec<u8>, SourceError> {
            let mut bytes = Vec::new();
            input
                .take(MAX_FETCHED_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|source| SourceError::Read {
                    name: name.clone(),
                    source,
                })?;
            if bytes.len() > MAX_FETCHED_BYTES {
                return Err(SourceError::TooLarge {
                    name: name.clone(),
                    limit: MAX_FETCHED_BYTES,
                });
            }
            Ok(bytes)
        };
        let bytes = match self {
            Self::Url { .. } => {
                return Err(SourceError::Fetch {
                    name,
                    reason: "a URL is fetched, not read".to_owned(),
                })
            }
            Self::Stdin => {
                let mut stdin = stdin;
                read_bounded(&mut stdin)?
            }
            Self::File { path, .. } => {
                let mut file = std::fs::File::open(path).map_err(|source| SourceError::Read {
                    name: name.clone(),
                    source,
                })?;
                read_bounded(&mut file)?
            }
        };
        String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8 { name })
    }

    /// Reads the whole document: from the process's standard input for `-`, from the
    /// network for a URL.
    pub async fn read(&self) -> Result<String, SourceError> {
        match self {
            Self::Url { arg, shown } => fetch(arg, shown).await,
            // A CLI's one task: blocking on a file or stdin here holds up nothing else.
            _ => self.read_from(std::io::stdin().lock()),
        }
    }
}

/// GETs `url` and returns its body as text, refusing a non-2xx answer and anything
/// larger than [`MAX_FETCHED_BYTES`]; errors name it as `shown`.
async fn fetch(url: &str, shown: &str) -> Result<String, SourceError> {
    let failed = |error: reqwest::Error| SourceError::Fetch {
        name: shown.to_owned(),
        reason: error_chain(&error),
    };
    let client = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .build()
        .map_err(failed)?;
    let mut response = client.get(url).send().await.map_err(failed)?;
    let status = response.status();
    if !status.is_success() {
        return Err(SourceError::FetchStatus {
            name: shown.to_owned(),
            status: status.as_u16(),
        });
    }
    let too_large = || SourceError::TooLarge {
        name: shown.to_owned(),
        limit: MAX_FETCHED_BYTES,
    };
    if response
        .content_length()
        .is_some_and(|length| length > MAX_FETCHED_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if bytes.len() + chunk.len() > MAX_FETCHED_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8 {
        name: shown.to_owned(),
    })
}

/// An error and its causes, `: `-separated (reqwest's own text says only "error
/// sending request"; the cause says "connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Endless input (`/dev/zero`, `yes | apiclient apply`) is refused at the limit,
    /// naming the source, without reading on.
    #[test]
    fn a_document_past_the_limit_is_refused_unread() {
        let endless = std::io::repeat(b'#');
        let err = Source::Stdin.read_from(endless).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("stdin: larger than {MAX_FETCHED_BYTES} bytes")
        );
        let zero = Source::parse("/dev/zero").unwrap();
        let err = zero.read_from(std::io::empty()).unwrap_err();
        assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");
        let exact = vec![b' '; MAX_FETCHED_BYTES];
        assert_eq!(
            Source::Stdin.read_from(&exact[..]).unwrap().len(),
            MAX_FETCHED_BYTES
        );
    }

    #[test]
    fn dash_is_stdin() {
        let source = Source::parse("-").unwrap();
        assert_eq!(source, Source::Stdin);
        assert_eq!(source.name(), "stdin");
        assert_eq!(
            source
                .read_from(&b"[settings]\nmotd = \"hi\"\n"[..])
                .unwrap(),
            "[settings]\nmotd = \"hi\"\n"
        );
    }

    #[test]
    fn file_uris_become_paths() {
        let source = Source::parse("file:///etc/keel/user%20data.toml").unwrap();
        assert_eq!(
            source,
            Source::File {
                arg: "file:///etc/keel/user%20data.toml".to_owned(),
                path: PathBuf::from("/etc/keel/user data.toml"),
            }
        );
        let source = Source::parse("file://localhost/x.toml").unwrap();
        assert!(
            matches!(source, Source::File { path, .. } if path.as_path() == std::path::Path::new("/x.toml"))
        );
    }

    #[test]
    fn urls_and_unknown_schemes() {
        assert_eq!(
            Source::parse("https://example.com/user-data.toml").unwrap(),
            Source::Url {
                arg: "https://example.com/user-data.toml".to_owned(),
                shown: "https://example.com/user-data.toml".to_owned(),
            }
        );
        assert!(matches!(
            Source::parse("HTTP://example.com/x").unwrap(),
            Source::Url { .. }
        ));
        let error = Source::parse("s3://bucket/user-data.toml").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("s3:// sources are not supported"),
            "{error}"
        );
        // Not a scheme: a path that happens to hold `://`.
        assert!(matches!(
            Source::parse("./odd://name.toml").unwrap(),
            Source::File { .. }
        ));
    }

    #[test]
    fn a_url_s_password_is_never_shown() {
        let source = Source::parse("https://ops:hunter2@example.com/u@d.toml?v=1").unwrap();
        assert_eq!(source.name(), "https://<redacted>@example.com/u@d.toml?v=1");
        let error = source.read_from(std::io::empty()).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        // A password holding '@' is redacted whole.
        let source = Source::parse("http://ops:a@b@example.com/x").unwrap();
        assert_eq!(source.name(), "http://<redacted>@example.com/x");
        let error = Source::parse("ftp://ops:hunter2@example.com/x").unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        assert!(
            error.to_string().contains("ftp://<redacted>@example.com/x"),
            "{error}"
        );
        // Without user information, the URL as typed.
        let source = Source::parse("https://example.com/a@b").unwrap();
        assert_eq!(source.name(), "https://example.com/a@b");
    }

    #[test]
    fn a_file_uri_s_scheme_is_read_in_any_case() {
        let source = Source::parse("FILE:///etc/user-data.toml").unwrap();
        assert!(
            matches!(source, Source::File { path, .. } if path.as_path() == std::path::Path::new("/etc/user-data.toml"))
        );
    }

    #[test]
    fn remote_file_uris_are_refused() {
        let error = Source::parse("file://example.com/x.toml").unwrap_err();
        assert!(error.to_string().contains("example.com"), "{error}");
        assert!(Source::parse("file://").is_err());
    }

    #[test]
    fn reads_a_file_uri_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user data.toml");
        std::fs::write(&path, "[settings]\nmotd = \"from file\"\n").unwrap();
        let uri = format!("file://{}", path.display()).replace(' ', "%20");
        let source = Source::parse(&uri).unwrap();
        assert_eq!(source.name(), uri);
        assert_eq!(
            source.read_from(std::io::empty()).unwrap(),
            "[settings]\nmotd = \"from file\"\n"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let source = Source::parse("/nonexistent/keel/user-data.toml").unwrap();
        let error = source.read_from(std::io::empty()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/keel/user-data.toml: cannot read: "),
            "{error}"
        );
    }

    #[test]
    fn binary_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        let source = Source::parse(path.to_str().unwrap()).unwrap();
        assert!(matches!(
            source.read_from(std::io::empty()),
            Err(SourceError::NotUtf8 { .. })
        ));
    }
}
