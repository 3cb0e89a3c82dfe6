//! The update repository: TUF metadata verified by `tough` from the image's trusted
//! `root.json`, the manifest, and the signed length and sha256 of each target, whose bytes
//! `tough` checks as they stream.
//!
//! Owns the trust decisions and how their failures read: metadata must be signed by the
//! roles' keys, not expired, and not older than what this host has seen (`tough` keeps
//! the versions it trusted in the datastore under the state directory, so an old but
//! validly signed repository cannot be replayed after a reboot); a target must have the
//! signed length and hash. Must not write slots.
//!
//! `tough` writes its datastore with plain `write`s (no `fsync`, no rename): a power cut
//! during a load can leave `timestamp.json` torn, and `tough` reads a file it cannot parse
//! as no file, so the rollback check would be off for the next load. So `tough` works in
//! a scratch copy ([`Scratch`]), and what it wrote is copied back into the datastore
//! file by file with [`super::durable::replace`] once its load has returned: each file is
//! the old one or the new one, whole.
//!
//! The trust anchor of a load is the newest root this host has trusted
//! ([`TRUSTED_ROOT`], written by keeld after each load, durably), not the image's: `tough`
//! starts its root chain from the anchor it is given, so starting each load from the
//! image's root would (a) take a rotation of the timestamp or snapshot keys since that root
//! as new at every load, and with it delete the saved timestamp and snapshot (TUF's
//! recovery from a fast-forward attack), which turns the rollback check off for good, and
//! (b) let a mirror that refuses `N+1.root.json` hold the host at the image's root, whose
//! keys may have been revoked since. The image's root is the anchor only when it is newer
//! (an image shipped with a later root) or nothing has been trusted yet.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tough::{Repository, RepositoryLoader, TargetName};
use url::Url;

use super::manifest::{Manifest, ManifestError};
use super::transport::{FetchError, RepositoryTransport, Timeouts};
use settings_model::proxy::ProxyRules;

/// The manifest's target name, as Bottlerocket's.
pub const MANIFEST: &str = "manifest.json";
/// Largest manifest read.
const MAX_MANIFEST: u64 = 16 * 1024 * 1024;
/// The newest root this host trusted, in the datastore (a name `tough` does not use).
pub const TRUSTED_ROOT: &str = "keel-trusted-root.json";
/// Largest root read back (tough's own limit for a root is 1 MiB).
const MAX_ROOT: u64 = 1024 * 1024;
/// Largest datastore file copied (tough's own largest limit, for targets, is 10 MiB).
const MAX_KEPT: u64 = 16 * 1024 * 1024;
/// Names of the scratch directories `tough` works in, inside the datastore.
const SCRATCH_PREFIX: &str = ".load-";

/// Where the repository is and how to reach it.
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// The trusted root.json the image ships.
    pub root: PathBuf,
    /// Where `tough` keeps the metadata it trusted (rollback and freeze protection).
    pub datastore: PathBuf,
    pub timeouts: Timeouts,
}

/// Why the repository could not be used, as the user reads it.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("cannot read the trusted root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Settings(String),
    #[error("{what} is not a URL: {url:?}")]
    Url { what: &'static str, url: String },
    #[error("the repository's {role} metadata has expired: refusing stale metadata")]
    Expired { role: String },
    #[error("the repository's {role} metadata is not validly signed: {reason}")]
    BadSignature { role: String, reason: String },
    #[error(
        "the repository offers {role} metadata version {offered}, older than version {seen} \
         this host already trusted: refusing a rollback"
    )]
    Rollback {
        role: String,
        offered: u64,
        seen: u64,
    },
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("target {name}: {reason}")]
    Target { name: String, reason: String },
    #[error("target {0} is not in the repository's signed targets")]
    MissingTarget(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Other(String),
}

/// Maps `tough`'s error to what the user is told. `target` names the target being read,
/// if any. A transport error may carry the real reason inside: the fetch's own
/// ([`FetchError`]) or, for a target, `tough`'s check of the bytes (hash, length).
fn explain(error: &tough::error::Error, target: Option<&str>) -> RepositoryError {
    use tough::error::Error as E;
    let target_error = |reason: String| match target {
        Some(name) => RepositoryError::Target {
            name: name.to_owned(),
            reason,
        },
        None => RepositoryError::Other(reason),
    };
    match error {
        E::ExpiredMetadata { role, .. } => RepositoryError::Expired {
            role: role.to_string(),
        },
        E::VerifyMetadata { role, source, .. } => RepositoryError::BadSignature {
            role: role.to_string(),
            reason: source.to_string(),
        },
        E::VerifyRoleMetadata { role, source, .. } => RepositoryError::BadSignature {
            role: role.clone(),
            reason: source.to_string(),
        },
        E::VerifyTrustedMetadata { source, .. } => RepositoryError::BadSignature {
            role: "root".to_owned(),
            reason: source.to_string(),
        },
        E::OlderMetadata {
            role,
            current_version,
            new_version,
            ..
        } => RepositoryError::Rollback {
            role: role.to_string(),
            offered: *new_version,
            seen: *current_version,
        },
        E::Transport { url, source, .. } => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> =
                std::error::Error::source(source);
            while let Some(e) = cause {
                if let Some(fetch) = e.downcast_ref::<FetchError>() {
                    return match target {
                        Some(name) => RepositoryError::Target {
                            name: name.to_owned(),
                            reason: fetch.to_string(),
                        },
                        None => RepositoryError::Fetch {
                            url: url.to_string(),
                            reason: fetch.to_string(),
                        },
                    };
                }
                if let Some(inner) = e.downcast_ref::<tough::error::Error>() {
                    return explain(inner, target);
                }
                cause = e.source();
            }
            RepositoryError::Fetch {
                url: url.to_string(),
                reason: source.to_string(),
            }
        }
        E::HashMismatch {
            calculated,
            expected,
            ..
        } => target_error(format!(
            "its sha256 is {calculated}, but the signed metadata says {expected}: refused"
        )),
        E::MaxSizeExceeded {
            max_size,
            specifier,
            ..
        } => match target {
            Some(_) => target_error(format!(
                "it is longer than its signed length of {max_size} bytes: refused"
            )),
            None => RepositoryError::Other(format!(
                "a metadata file is larger than {max_size} bytes ({specifier}): refused"
            )),
        },
        other => target_error(other.to_string()),
    }
}

/// A target's signed length and sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    pub name: String,
    pub length: u64,
    pub sha256: String,
}

/// A loaded, verified repository.
#[derive(Debug)]
pub struct UpdateRepository {
    repo: Repository,
    /// `tough`'s datastore for this repository (it checks the clock there again before
    /// each target); removed with it.
    _scratch: Scratch,
}

/// The directory `tough` is given as its datastore for one load: a copy of the durable
/// datastore's files, made before the load, removed when dropped. Nothing in it is
/// durable; [`keep`] makes what `tough` wrote there durable.
#[derive(Debug)]
struct Scratch {
    path: PathBuf,
    /// The datastore's files as they were copied in.
    before: BTreeMap<OsString, Vec<u8>>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `tough`'s files in `dir`: its regular files, but not keeld's own (the trusted root,
/// temporary files and scratch directories start with `.` or are [`TRUSTED_ROOT`]).
fn tough_files(dir: &Path) -> std::io::Result<BTreeMap<OsString, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with('.') || text == TRUSTED_ROOT || !entry.file_type()?.is_file() {
            continue;
        }
        let bytes = super::durable::read_bounded(&entry.path(), MAX_KEPT)?;
        files.insert(name, bytes);
    }
    Ok(files)
}

/// Makes the scratch datastore for a load from the durable one at `durable`. Scratch
/// directories left by earlier loads (a crash, or a removal that failed) are removed
/// first: loads run one at a time (the update machine runs one command at a time, and
/// a load's `keep` is never cut short by its time limit), so none of them is in use. So are the
/// temporary files of a [`keep`] a crash cut short.
fn stage(durable: &Path) -> std::io::Result<Scratch> {
    super::durable::sweep_temps(durable);
    for entry in std::fs::read_dir(durable)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(SCRATCH_PREFIX)
            && entry.file_type()?.is_dir()
        {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    let path = durable.join(format!("{SCRATCH_PREFIX}{:016x}", rand::random::<u64>()));
    std::fs::create_dir(&path)?;
    let scratch = Scratch {
        path,
        before: tough_files(durable)?,
    };
    for (name, bytes) in &scratch.before {
        std::fs::write(scratch.path.join(name), bytes)?;
    }
    Ok(scratch)
}

/// Makes durable in `durable` what `tough` wrote in `scratch` during a load that has
/// returned (every write it began has ended): each changed file replaced whole (temporary
/// file, `fsync`, rename, `fsync` of the directory), each file it removed removed. A
/// power cut in between leaves some files old and some new, each whole; each is only a
/// lower bound the next load checks against, so any mix of them is safe. One mix with
/// the trusted root, kept after these (`load`), is weaker: a cut after a load that
/// rotated keys and before the new root is kept leaves the new timestamp and snapshot
/// beside the old root; the next load replays the rotation from it, for which tough
/// drops the stored timestamp and snapshot, so that one load has no rollback floor
/// (signatures and expiry still hold). The window is the root's one `fsync`.
fn keep(scratch: &Scratch, durable: &Path) -> std::io::Result<()> {
    let after = tough_files(&scratch.path)?;
    for (name, bytes) in &after {
        if scratch.before.get(name) == Some(bytes) {
            continue;
        }
        // tough writes each file whole, as one JSON document, but not atomically: one it
        // was writing when its load was cut short by the time limit may be part written
        // still. The datastore keeps its old one.
        if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
            tracing::warn!(file = %name.to_string_lossy(), "not keeping a TUF datastore file that is not whole JSON");
            continue;
        }
        super::durable::replace(&durable.join(name), bytes)?;
    }
    for name in scratch.before.keys() {
        if !after.contains_key(name) {
            super::durable::remove(&durable.join(name))?;
        }
    }
    Ok(())
}

/// A URL from the settings, with the trailing `/` TUF's relative names need and
/// `http://` for Bottlerocket's scheme-less form.
pub fn base_url(what: &'static str, text: &str) -> Result<Url, RepositoryError> {
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let with_slash = if with_scheme.ends_with('/') {
        with_scheme
    } else {
        format!("{with_scheme}/")
    };
    Url::parse(&with_slash).map_err(|_| RepositoryError::Url {
        what,
        url: text.to_owned(),
    })
}

/// The `signed.version` of a root's JSON, if it has one.
fn version_of(root: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(root).ok()?;
    value.get("signed")?.get("version")?.as_u64()
}

/// The anchor of a load: the root kept at `trusted` when it is readable and at least as
/// new as the image's `shipped` one; the image's otherwise (a kept root that cannot be
/// read is said, and the image's used: the chain from it is checked all the same).
async fn newest_root(shipped: Vec<u8>, trusted: &std::path::Path) -> Vec<u8> {
    let path = trusted.to_owned();
    let kept = tokio::task::spawn_blocking(move || super::durable::read_bounded(&path, MAX_ROOT))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    let kept = match kept {
        Ok(kept) => kept,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return shipped,
        Err(e) => {
            tracing::warn!(path = %trusted.display(), error = %e, "cannot read the root this host trusted; starting from the image's");
            return shipped;
        }
    };
    match (version_of(&kept), version_of(&shipped)) {
        (Some(kept_version), Some(shipped_version)) if kept_version >= shipped_version => kept,
        (Some(_), _) => shipped,
        (None, _) => {
            tracing::warn!(path = %trusted.display(), "the root this host trusted is not a TUF root; starting from the image's");
            shipped
        }
    }
}

/// The error of a load or manifest past `--update-metadata-timeout`.
fn late(config: &RepositoryConfig) -> RepositoryError {
    RepositoryError::Other(format!(
        "the repository's metadata and manifest did not arrive within {} \
         (--update-metadata-timeout)",
        humantime::format_duration(config.timeouts.metadata)
    ))
}

impl UpdateRepository {
    /// [`Self::load`], then [`Self::manifest`], within the metadata time limit: each
    /// fetch has its own connect and read limits, but a repository that trickles its
    /// metadata a byte at a time would meet those and hold the command (and the update
    /// lock) for days.
    pub async fn load_with_manifest(
        config: &RepositoryConfig,
        metadata: Url,
        targets: Url,
        proxy: Option<&ProxyRules>,
    ) -> Result<(UpdateRepository, Manifest), RepositoryError> {
        let deadline = tokio::time::Instant::now() + config.timeouts.metadata;
        let repo = Self::load(config, metadata, targets, proxy, deadline).await?;
        let manifest = tokio::time::timeout_at(deadline, repo.manifest())
            .await
            .map_err(|_| late(config))??;
        Ok((repo, manifest))
    }

    /// Fetches and verifies the metadata from `metadata` (targets from `targets`); the
    /// fetching is given up at `deadline`, and what `tough` trusted until then is kept
    /// all the same (the time limit applies to `tough`'s load, not to [`keep`]).
    async fn load(
        config: &RepositoryConfig,
        metadata: Url,
        targets: Url,
        proxy: Option<&ProxyRules>,
        deadline: tokio::time::Instant,
    ) -> Result<UpdateRepository, RepositoryError> {
        let root = tokio::fs::read(&config.root)
            .await
            .map_err(|source| RepositoryError::Root {
                path: config.root.clone(),
                source,
            })?;
        tokio::fs::create_dir_all(&config.datastore)
            .await
            .map_err(|e| {
                RepositoryError::Other(format!(
                    "cannot create the TUF datastore {}: {e}",
                    config.datastore.display()
                ))
            })?;
        let transport = RepositoryTransport::new(config.timeouts, proxy)
            .map_err(|e| RepositoryError::Settings(e.to_string()))?;
        let trusted_path = config.datastore.join(TRUSTED_ROOT);
        let anchor = newest_root(root, &trusted_path).await;
        let datastore = config.datastore.clone();
        let scratch = tokio::task::spawn_blocking(move || stage(&datastore))
            .await
            .map_err(|e| RepositoryError::Other(e.to_string()))?
            .map_err(|e| {
                RepositoryError::Other(format!(
                    "cannot copy the TUF datastore {}: {e}",
                    config.datastore.display()
                ))
            })?;
        let loader = RepositoryLoader::new(&anchor, metadata, targets)
            .transport(transport)
            .datastore(scratch.path.clone());
        let loaded = match tokio::time::timeout_at(deadline, loader.load()).await {
            Ok(loaded) => loaded.map_err(|e| explain(&e, None)),
            Err(_) => Err(late(config)),
        };
        // What tough trusted is kept whether its load succeeded, failed or ran out of
        // time, as it would have kept it in its own datastore (a timestamp it verified
        // before the snapshot failed is trusted from then on). `keep` copies only whole
        // documents: a write tough began before the time ran out may still be going on.
        let datastore = config.datastore.clone();
        let kept =
            tokio::task::spawn_blocking(move || keep(&scratch, &datastore).map(|()| scratch))
                .await
                .map_err(|e| RepositoryError::Other(e.to_string()))
                .and_then(|kept| {
                    kept.map_err(|e| {
                        RepositoryError::Other(format!(
                            "cannot keep what was trusted in the TUF datastore {}: {e}",
                            config.datastore.display()
                        ))
                    })
                });
        let (repo, scratch) = match (loaded, kept) {
            (Ok(repo), Ok(scratch)) => (repo, scratch),
            (Ok(_), Err(e)) => return Err(e),
            (Err(e), kept) => {
                if let Err(keeping) = kept {
                    tracing::error!(error = %keeping, "after a failed load of the update repository");
                }
                return Err(e);
            }
        };
        // The root the chain ended at is the next load's anchor. Written whole or not at
        // all (temporary file, fsync, rename, fsync of the directory): a power cut leaves
        // the previous anchor, never a torn one.
        let trusted = serde_json::to_vec(repo.root()).map_err(|e| {
            RepositoryError::Other(format!("cannot serialize the trusted root: {e}"))
        })?;
        if anchor != trusted {
            let path = trusted_path.clone();
            tokio::task::spawn_blocking(move || super::durable::replace(&path, &trusted))
                .await
                .map_err(|e| RepositoryError::Other(e.to_string()))?
                .map_err(|e| {
                    RepositoryError::Other(format!(
                        "cannot keep the trusted root in {}: {e}",
                        trusted_path.display()
                    ))
                })?;
        }
        Ok(UpdateRepository {
            repo,
            _scratch: scratch,
        })
    }

    /// The signed length and sha256 of target `name`.
    pub fn target(&self, name: &str) -> Result<TargetInfo, RepositoryError> {
        let target_name =
            TargetName::new(name).map_err(|_| RepositoryError::MissingTarget(name.to_owned()))?;
        let target = self
            .repo
            .targets()
            .signed
            .find_target(&target_name, false)
            .map_err(|_| RepositoryError::MissingTarget(name.to_owned()))?;
        Ok(TargetInfo {
            name: name.to_owned(),
            length: target.length,
            sha256: hex::encode(&target.hashes.sha256),
        })
    }

    /// The bytes of target `name`, checked by `tough` as they come: the stream ends in an
    /// error (after its last bytes) when the length or hash is not the signed one, so
    /// nothing read may be used before the stream ended without one.
    pub async fn stream(
        &self,
        name: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, RepositoryError>> + Send + use<>, RepositoryError>
    {
        let target_name =
            TargetName::new(name).map_err(|_| RepositoryError::MissingTarget(name.to_owned()))?;
        let stream = self
            .repo
            .read_target(&target_name)
            .await
            .map_err(|e| explain(&e, Some(name)))?
            .ok_or_else(|| RepositoryError::MissingTarget(name.to_owned()))?;
        let owned = name.to_owned();
        Ok(stream.map(move |item| item.map_err(|e| explain(&e, Some(&owned)))))
    }

    /// The manifest, read whole (it is small) and checked.
    pub async fn manifest(&self) -> Result<Manifest, RepositoryError> {
        let info = self.target(MANIFEST)?;
        if info.length > MAX_MANIFEST {
            return Err(RepositoryError::Target {
                name: MANIFEST.to_owned(),
                reason: format!("{} bytes, over the limit of {MAX_MANIFEST}", info.length),
            });
        }
        let mut stream = Box::pin(self.stream(MANIFEST).await?);
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        Ok(Manifest::parse(&bytes)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn root(version: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"signed": {"version": version}, "signatures": []}))
            .unwrap()
    }

    /// The kept root anchors a load when it is at least as new as the image's; the
    /// image's when it is newer, or when nothing readable was kept.
    #[tokio::test]
    async fn the_anchor_is_the_newest_root_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join(TRUSTED_ROOT);
        assert_eq!(newest_root(root(1), &kept).await, root(1), "nothing kept");
        std::fs::write(&kept, root(3)).unwrap();
        assert_eq!(newest_root(root(1), &kept).await, root(3));
        assert_eq!(newest_root(root(3), &kept).await, root(3));
        assert_eq!(
            newest_root(root(4), &kept).await,
            root(4),
            "a newer image root"
        );
        std::fs::write(&kept, b"{\"signed\": {\"vers").unwrap();
        assert_eq!(newest_root(root(1), &kept).await, root(1), "torn");
    }

    /// tough works in a copy of its files; what it changed, added and removed there is
    /// what the datastore holds after `keep`, keeld's own files untouched, and a scratch
    /// directory an earlier load left is gone.
    #[test]
    fn what_tough_wrote_in_its_scratch_copy_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let durable = dir.path();
        let doc = |role: &str, version: u64| format!(r#"{{"{role}": {version}}}"#).into_bytes();
        let write = |name: &str, bytes: &[u8]| std::fs::write(durable.join(name), bytes).unwrap();
        write("timestamp.json", &doc("timestamp", 1));
        write("snapshot.json", &doc("snapshot", 1));
        write("targets.json", &doc("targets", 1));
        write("root.json", &doc("root", 1));
        write(TRUSTED_ROOT, b"anchor");
        write(".keel-timestamp.json.tmp", b"a crash's");
        let left = durable.join(".load-0123456789abcdef");
        std::fs::create_dir(&left).unwrap();
        std::fs::write(left.join("timestamp.json"), b"torn").unwrap();

        let scratch = stage(durable).unwrap();
        assert!(
            !left.exists(),
            "an earlier load's scratch directory is removed"
        );
        assert!(!durable.join(".keel-timestamp.json.tmp").exists());
        let copied: Vec<_> = std::fs::read_dir(&scratch.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            copied,
            [
                "root.json",
                "snapshot.json",
                "targets.json",
                "timestamp.json"
            ]
        );
        // As tough does on a key rotation: the snapshot removed, a new timestamp, and
        // the clock it checks; and a targets file it was still writing when its load
        // was cut short.
        let scratch_write = |name: &str, bytes: &[u8]| {
            std::fs::write(scratch.path.join(name), bytes).unwrap();
        };
        scratch_write("timestamp.json", &doc("timestamp", 2));
        std::fs::remove_file(scratch.path.join("snapshot.json")).unwrap();
        scratch_write("latest_known_time.json", b"\"2026-12-04T19:00:00Z\"");
        scratch_write("targets.json", b"{\"targets\": ");
        keep(&scratch, durable).unwrap();

        let read = |name: &str| std::fs::read(durable.join(name)).ok();
        assert_eq!(read("timestamp.json"), Some(doc("timestamp", 2)));
        assert_eq!(read("snapshot.json"), None);
        assert_eq!(
            read("latest_known_time.json").as_deref(),
            Some(&b"\"2026-12-04T19:00:00Z\""[..])
        );
        assert_eq!(read("targets.json"), Some(doc("targets", 1)), "not torn");
        assert_eq!(read("root.json"), Some(doc("root", 1)));
        assert_eq!(read(TRUSTED_ROOT).as_deref(), Some(&b"anchor"[..]));
        let path = scratch.path.clone();
        drop(scratch);
        assert!(!path.exists(), "the scratch directory goes with its load");
    }
}
