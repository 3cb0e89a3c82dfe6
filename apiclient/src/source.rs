//! User-data sources named on the command line: a path, a `file://` URI or `-` for
//! standard input. Owns turning such an argument into text and a name that error
//! messages can show; parsing the text is `settings-model`'s job.

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
}

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
}

impl Source {
    /// Interprets a command-line argument: `-`, `file:///abs/path` (percent-decoded,
    /// host empty or `localhost`), or anything else as a path.
    pub fn parse(arg: &str) -> Result<Self, SourceError> {
        if arg == "-" {
            return Ok(Self::Stdin);
        }
        let path = match arg.strip_prefix("file://") {
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

    /// The name errors use: the argument as typed, or `stdin`.
    pub fn name(&self) -> &str {
        match self {
            Self::Stdin => "stdin",
            Self::File { arg, .. } => arg,
        }
    }

    /// Reads the whole document; `stdin` is only consulted for [`Source::Stdin`].
    pub fn read_from(&self, stdin: impl Read) -> Result<String, SourceError> {
        let name = self.name().to_owned();
        let bytes = match self {
            Self::Stdin => {
                let mut bytes = Vec::new();
                let mut stdin = stdin;
                stdin
                    .read_to_end(&mut bytes)
                    .map_err(|source| SourceError::Read {
                        name: name.clone(),
                        source,
                    })?;
                bytes
            }
            Self::File { path, .. } => std::fs::read(path).map_err(|source| SourceError::Read {
                name: name.clone(),
                source,
            })?,
        };
        String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8 { name })
    }

    /// Reads the whole document, from the process's standard input for `-`.
    pub fn read(&self) -> Result<String, SourceError> {
        self.read_from(std::io::stdin().lock())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
