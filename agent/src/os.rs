//! What `GET /os` reports about this host: the build of Keel it runs.
//!
//! On a Keel OS image the facts come from the image's os-release file (`--os-release`,
//! `/usr/lib/os-release` there), written by `packaging/image/build.sh`: `VERSION_ID`,
//! `VARIANT_ID`, `BUILD_ID` and `PRETTY_NAME`. Without one (keeld run on another
//! distribution, the tests), keeld reports its own version and `--variant`.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Bottlerocket's `/os` shape (snake_case fields).
#[derive(Debug, Clone, Serialize)]
pub struct OsInfo {
    pub arch: String,
    pub build_id: String,
    pub pretty_name: String,
    pub variant_id: String,
    pub version_id: String,
}

/// An os-release file keeld was told to report and cannot.
#[derive(Debug, thiserror::Error)]
pub enum OsReleaseError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {why}")]
    Syntax {
        path: PathBuf,
        line: usize,
        why: &'static str,
    },
    #[error("{path} has no {key}")]
    Missing { path: PathBuf, key: &'static str },
}

impl OsInfo {
    /// keeld's own build: its crate version, `KEEL_BUILD_ID` at build time, `variant_id`.
    pub fn current(variant_id: &str) -> Self {
        let version = env!("CARGO_PKG_VERSION");
        OsInfo {
            arch: std::env::consts::ARCH.to_owned(),
            build_id: option_env!("KEEL_BUILD_ID").unwrap_or("dev").to_owned(),
            pretty_name: format!("Keel {version}"),
            variant_id: variant_id.to_owned(),
            version_id: version.to_owned(),
        }
    }

    /// The image's os-release file (os-release(5) syntax). Every field `GET /os`
    /// reports must be there: a host image that does not say what it is is a build bug,
    /// reported at start-up rather than hidden behind keeld's own version.
    pub fn from_os_release(path: &Path) -> Result<Self, OsReleaseError> {
        let text = std::fs::read_to_string(path).map_err(|source| OsReleaseError::Read {
            path: path.to_owned(),
            source,
        })?;
        let fields = parse_os_release(&text).map_err(|(line, why)| OsReleaseError::Syntax {
            path: path.to_owned(),
            line,
            why,
        })?;
        let get = |key: &'static str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .ok_or(OsReleaseError::Missing {
                    path: path.to_owned(),
                    key,
                })
        };
        Ok(OsInfo {
            arch: std::env::consts::ARCH.to_owned(),
            build_id: get("BUILD_ID")?,
            pretty_name: get("PRETTY_NAME")?,
            variant_id: get("VARIANT_ID")?,
            version_id: get("VERSION_ID")?,
        })
    }
}

/// `KEY=value` lines; values may be double- or single-quoted, with `\` escapes inside
/// double quotes; `#` lines and blank lines are skipped.
fn parse_os_release(text: &str) -> Result<Vec<(String, String)>, (usize, &'static str)> {
    let mut fields = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((i + 1, "expected KEY=value"));
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err((i + 1, "a key is letters, digits and _"));
        }
        let value = unquote(value).ok_or((i + 1, "unterminated quote"))?;
        fields.push((key.to_owned(), value));
    }
    Ok(fields)
}

fn unquote(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(q @ (b'"' | b'\'')) => {
            if bytes.len() < 2 || bytes[bytes.len() - 1] != *q {
                return None;
            }
            let inner = &value[1..value.len() - 1];
            if *q == b'\'' {
                return Some(inner.to_owned());
            }
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    out.push(chars.next()?);
                } else {
                    out.push(c);
                }
            }
            Some(out)
        }
        _ => Some(value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_image_os_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("os-release");
        std::fs::write(
            &path,
            "# Keel OS\nNAME=\"Keel OS\"\nID=keel\nVERSION_ID=0.3.0\nVARIANT_ID='keel-qemu'\n\
             BUILD_ID=\"5f3a\\\"9\"\nPRETTY_NAME=\"Keel OS 0.3.0 (keel-qemu)\"\n\n",
        )
        .expect("write");
        let os = OsInfo::from_os_release(&path).expect("parse");
        assert_eq!(os.version_id, "0.3.0");
        assert_eq!(os.variant_id, "keel-qemu");
        assert_eq!(os.build_id, "5f3a\"9");
        assert_eq!(os.pretty_name, "Keel OS 0.3.0 (keel-qemu)");
    }

    #[test]
    fn a_bad_or_incomplete_file_is_an_error_naming_the_line_or_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("os-release");
        std::fs::write(&path, "VERSION_ID=1\nno equals sign\n").expect("write");
        let err = OsInfo::from_os_release(&path).expect_err("bad line");
        assert!(err.to_string().contains("line 2"), "{err}");
        std::fs::write(&path, "VERSION_ID=\"1\nVARIANT_ID=x\n").expect("write");
        let err = OsInfo::from_os_release(&path).expect_err("quote");
        assert!(err.to_string().contains("line 1"), "{err}");
        std::fs::write(&path, "VERSION_ID=1\nVARIANT_ID=x\nPRETTY_NAME=y\n").expect("write");
        let err = OsInfo::from_os_release(&path).expect_err("missing");
        assert!(err.to_string().contains("BUILD_ID"), "{err}");
        let err = OsInfo::from_os_release(&dir.path().join("nope")).expect_err("missing file");
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
