//! Getting a container's image into containerd: from a registry (pulled by keeld) or a
//! local OCI archive, then unpacked into the snapshotter.
//!
//! Both sources end the same way: the platform's manifest, its config and its layers
//! are blobs in the content store (verified by digest), an image record points at the
//! manifest, and each layer is applied on top of the one before into a committed
//! snapshot named by its chain ID. [`ensure_image`] skips whatever is already there, so
//! a second start is cheap and a host whose registry is unreachable starts from the
//! cached image.

use std::collections::HashMap;

use containerd_client::services::v1::{
    snapshots::{
        CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    },
    ApplyRequest, CreateImageRequest, Image, UpdateImageRequest,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::client::{Call, Containerd, ContainerdError, SNAPSHOTTER};
use super::content::{self, Lease};
use super::registry::{RegistryConfig, RegistryError};
use super::spec::ImageConfig;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Why an image could not be made ready. The message is what `apiclient containers`
/// shows as the container's failure reason.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("archive {path}: {why}")]
    Archive { path: String, why: String },
    #[error("blob {digest} does not match its digest (got {actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("blob {digest} is {size} bytes, more than keeld reads for image metadata")]
    TooBig { digest: String, size: u64 },
    #[error("blob {digest} is not {expected} bytes long")]
    SizeMismatch { digest: String, expected: u64 },
    #[error("{what} is not valid JSON: {why}")]
    Json { what: String, why: String },
    #[error("no manifest for {os}/{arch} in the image index")]
    NoPlatform {
        os: &'static str,
        arch: &'static str,
    },
    #[error("unsupported media type {0}")]
    MediaType(String),
    #[error("the image config lists {diff_ids} layer digests for {layers} layers")]
    LayerCount { diff_ids: usize, layers: usize },
    #[error("layer {digest} unpacked to {actual}, but the config says {expected}")]
    DiffId {
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// containerd was unreachable: not the image's fault.
    pub fn is_containerd_down(&self) -> bool {
        matches!(self, ImageError::Containerd(e) if e.is_unavailable())
    }
}

/// An OCI content descriptor (the subset keeld reads and writes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

impl Descriptor {
    pub(crate) fn to_proto(&self) -> containerd_client::types::Descriptor {
        containerd_client::types::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: i64::try_from(self.size).unwrap_or(i64::MAX),
            annotations: HashMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index (or Docker manifest list).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The host's platform in OCI terms.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// Picks the host's manifest from an index; `None` when the index has none.
pub fn select_platform(index: &Index) -> Option<&Descriptor> {
    let (os, arch) = host_platform();
    index.manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == os && p.architecture == arch)
    })
}

/// Whether a manifest document is an index rather than an image manifest: by its media
/// type, or by shape when the field is absent.
pub fn is_index(media_type: &str, body: &serde_json::Value) -> bool {
    media_type == MEDIA_OCI_INDEX
        || media_type == MEDIA_DOCKER_LIST
        || (media_type.is_empty() && body.get("manifests").is_some())
}

pub fn parse_json<T: serde::de::DeserializeOwned>(
    what: &str,
    bytes: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Json {
        what: what.to_owned(),
        why: e.to_string(),
    })
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks bytes read into memory against their descriptor's digest.
pub fn verify_digest(expected: &str, bytes: &[u8]) -> Result<(), ImageError> {
    let actual = sha256_digest(bytes);
    if expected.starts_with("sha256:") && actual != expected {
        return Err(ImageError::DigestMismatch {
            digest: expected.to_owned(),
            actual,
        });
    }
    if !expected.starts_with("sha256:") {
        return Err(ImageError::MediaType(format!(
            "digest algorithm of {expected}"
        )));
    }
    Ok(())
}

/// The chain IDs of a stack of layers (the OCI image spec's definition): the first is
/// the first diff ID; each next is `sha256(previous + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => sha256_digest(format!("{parent} {diff_id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Where an image comes from, parsed from a container's `source` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference such as `public.ecr.aws/org/admin:v1`.
    Registry(String),
    /// A local OCI archive, `oci-archive:/path[:tag]`.
    Archive { path: String, tag: Option<String> },
}

impl ImageSource {
    pub fn parse(source: &str) -> ImageSource {
        match source.strip_prefix(settings_model::types::OCI_ARCHIVE_PREFIX) {
            Some(rest) => match rest.split_once(':') {
                Some((path, tag)) => ImageSource::Archive {
                    path: path.to_owned(),
                    tag: Some(tag.to_owned()),
                },
                None => ImageSource::Archive {
                    path: rest.to_owned(),
                    tag: None,
                },
            },
            None => ImageSource::Registry(source.to_owned()),
        }
    }
}

/// An image ready to run: unpacked, with its config read.
#[derive(Debug, Clone)]
pub struct ReadyImage {
    /// The containerd image record's name (the `source` setting).
    pub name: String,
    pub manifest_digest: String,
    /// The top layer's chain ID: the snapshot a container's root filesystem starts from.
    pub chain_id: String,
    pub config: ImageConfig,
    /// Whether this came from the cache after fetching failed.
    pub from_cache: bool,
}

/// Fetches (if needed) and unpacks the image `source`, then answers what a container
/// needs to run it. A registry image is fetched on every call, so a moved tag is
/// followed; when the registry cannot be reached and containerd already holds the
/// image, the cached copy is used and the fetch error only logged.
pub async fn ensure_image(
    cd: &Containerd,
    source: &str,
    registries: &RegistryConfig,
) -> Result<ReadyImage, ImageError> {
    if let Some(ready) = unchanged_archive(cd, source).await? {
        return Ok(ready);
    }
    let lease = Lease::create(cd).await?;
    let result = match cd.with_lease(&lease.id) {
        Ok(leased) => ensure_leased(&leased, source, registries).await,
        Err(e) => Err(e.into()),
    };
    lease.release(cd).await;
    result
}

async fn ensure_leased(
    cd: &Containerd,
    source: &str,
    registries: &RegistryConfig,
) -> Result<ReadyImage, ImageError> {
    let fetched = match ImageSource::parse(source) {
        ImageSource::Archive { path, tag } => {
            super::archive::import(cd, &path, tag.as_deref()).await
        }
        ImageSource::Registry(reference) => super::registry::pull(cd, &reference, registries).await,
    };
    let (manifest, from_cache) = match fetched {
        Ok(manifest) => (manifest, false),
        Err(e) if e.is_containerd_down() => return Err(e),
        Err(e) => match cd.image(source).await? {
            Some(Image {
                target: Some(target),
                ..
            }) => {
                tracing::warn!(image = %source, error = %e, "fetching the image failed; using the cached copy");
                let desc = Descriptor {
                    media_type: target.media_type,
                    digest: target.digest,
                    size: u64::try_from(target.size).unwrap_or(0),
                    platform: None,
                    annotations: HashMap::new(),
                };
                (desc, true)
            }
            _ => return Err(e),
        },
    };
    if !from_cache {
        let stamp = match ImageSource::parse(source) {
            ImageSource::Archive { path, .. } => archive_stamp(&path),
            ImageSource::Registry(_) => None,
        };
        record_image(cd, source, &manifest, stamp).await?;
    }
    let mut ready = unpack(cd, source, &manifest).await?;
    ready.from_cache = from_cache;
    Ok(ready)
}

/// The label on an archive's image record: which file (device, inode, size, mtime) it
/// was imported from.
pub const LABEL_ARCHIVE_STAMP: &str = "io.keel.archive-stamp";

/// What identifies an archive file's content without reading it.
pub fn archive_stamp(path: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{:09}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// An archive source whose image record says it was imported from this very file, and
/// whose top snapshot exists: ready without reading the archive (three or four
/// containerd calls instead of a dozen). `None` sends the caller down the full path.
async fn unchanged_archive(
    cd: &Containerd,
    source: &str,
) -> Result<Option<ReadyImage>, ImageError> {
    let ImageSource::Archive { path, .. } = ImageSource::parse(source) else {
        return Ok(None);
    };
    let Some(stamp) = archive_stamp(&path) else {
        return Ok(None);
    };
    let Some(image) = cd.image(source).await? else {
        return Ok(None);
    };
    if image.labels.get(LABEL_ARCHIVE_STAMP) != Some(&stamp) {
        return Ok(None);
    }
    let Some(target) = image.target else {
        return Ok(None);
    };
    let manifest_desc = Descriptor {
        media_type: target.media_type,
        digest: target.digest,
        size: u64::try_from(target.size).unwrap_or(0),
        platform: None,
        annotations: HashMap::new(),
    };
    let Ok(manifest_bytes) = content::read_blob(cd, &manifest_desc).await else {
        return Ok(None);
    };
    let manifest: Manifest = parse_json("image manifest", &manifest_bytes)?;
    let Ok(config_bytes) = content::read_blob(cd, &manifest.config).await else {
        return Ok(None);
    };
    let chain = chain_ids(&diff_ids(&config_bytes)?);
    let Some(top) = chain.last() else {
        return Ok(None);
    };
    if !snapshot_exists(cd, top).await? {
        return Ok(None);
    }
    let config_json: serde_json::Value = parse_json("image config", &config_bytes)?;
    Ok(Some(ReadyImage {
        name: source.to_owned(),
        manifest_digest: manifest_desc.digest,
        chain_id: top.clone(),
        config: ImageConfig::from_json(
            config_json
                .get("config")
                .unwrap_or(&serde_json::Value::Null),
        ),
        from_cache: false,
    }))
}

/// Points image record `name` at `manifest`, creating or updating it; an archive's
/// record carries the file's stamp.
async fn record_image(
    cd: &Containerd,
    name: &str,
    manifest: &Descriptor,
    stamp: Option<String>,
) -> Result<(), ImageError> {
    let image = Image {
        name: name.to_owned(),
        target: Some(manifest.to_proto()),
        labels: stamp
            .map(|s| HashMap::from([(LABEL_ARCHIVE_STAMP.to_owned(), s)]))
            .unwrap_or_default(),
        ..Default::default()
    };
    match cd
        .images()
        .create(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        })
        .await
        .during("create image", name)
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_already_exists() => {
            cd.images()
                .update(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".to_owned(), "labels".to_owned()],
                    }),
                    source_date_epoch: None,
                })
                .await
                .during("update image", name)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The labels that make a manifest blob keep its config and layers alive.
pub fn manifest_gc_labels(manifest: &Manifest) -> HashMap<String, String> {
    let mut labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        manifest.config.digest.clone(),
    )]);
    for (i, layer) in manifest.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest.clone(),
        );
    }
    labels
}

/// The label that makes a config blob keep the image's unpacked snapshot alive.
pub fn config_gc_labels(config: &[u8]) -> Result<HashMap<String, String>, ImageError> {
    let diff_ids = diff_ids(config)?;
    Ok(chain_ids(&diff_ids)
        .last()
        .map(|top| {
            HashMap::from([(
                format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                top.clone(),
            )])
        })
        .unwrap_or_default())
}

fn diff_ids(config: &[u8]) -> Result<Vec<String>, ImageError> {
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    let parsed: Config = parse_json("image config", config)?;
    Ok(parsed.rootfs.diff_ids)
}

/// Reads the manifest and config back from the content store and applies every layer
/// not yet unpacked, bottom up.
async fn unpack(
    cd: &Containerd,
    name: &str,
    manifest_desc: &Descriptor,
) -> Result<ReadyImage, ImageError> {
    let manifest_bytes = content::read_blob(cd, manifest_desc).await?;
    let manifest: Manifest = parse_json("image manifest", &manifest_bytes)?;
    let config_bytes = content::read_blob(cd, &manifest.config).await?;
    let diff_ids = diff_ids(&config_bytes)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::LayerCount {
            diff_ids: diff_ids.len(),
            layers: manifest.layers.len(),
        });
    }
    let chain = chain_ids(&diff_ids);
    for (i, layer) in manifest.layers.iter().enumerate() {
        let chain_id = &chain[i];
        if snapshot_exists(cd, chain_id).await? {
            continue;
        }
        let parent = if i == 0 {
            String::new()
        } else {
            chain[i - 1].clone()
        };
        apply_layer(cd, layer, &diff_ids[i], chain_id, &parent).await?;
    }
    let config_json: serde_json::Value = parse_json("image config", &config_bytes)?;
    let config = ImageConfig::from_json(
        config_json
            .get("config")
            .unwrap_or(&serde_json::Value::Null),
    );
    let chain_id = chain.last().cloned().unwrap_or_default();
    Ok(ReadyImage {
        name: name.to_owned(),
        manifest_digest: manifest_desc.digest.clone(),
        chain_id,
        config,
        from_cache: false,
    })
}

pub(crate) async fn snapshot_exists(cd: &Containerd, key: &str) -> Result<bool, ContainerdError> {
    match cd
        .snapshots()
        .stat(StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        })
        .await
        .during("stat snapshot", key)
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unpacks one layer: prepare an active snapshot on `parent`, let containerd's differ
/// apply the (possibly compressed) layer into it, check the result against the
/// config's diff ID, and commit it as `chain_id`.
async fn apply_layer(
    cd: &Containerd,
    layer: &Descriptor,
    diff_id: &str,
    chain_id: &str,
    parent: &str,
) -> Result<(), ImageError> {
    let key = format!("keel-extract-{:016x} {chain_id}", rand::random::<u64>());
    let mounts = cd
        .snapshots()
        .prepare(PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.clone(),
            parent: parent.to_owned(),
            labels: HashMap::new(),
        })
        .await
        .during("prepare snapshot", &key)?
        .mounts;
    let applied = cd
        .diff()
        .apply(ApplyRequest {
            diff: Some(layer.to_proto()),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        })
        .await
        .during("apply layer", &layer.digest);
    let result = match applied {
        Ok(r) => {
            let actual = r.applied.map(|d| d.digest).unwrap_or_default();
            if actual != diff_id {
                Err(ImageError::DiffId {
                    digest: layer.digest.clone(),
                    expected: diff_id.to_owned(),
                    actual,
                })
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        remove_snapshot(cd, &key).await;
        return Err(e);
    }
    let committed = cd
        .snapshots()
        .commit(CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            name: chain_id.to_owned(),
            key: key.clone(),
            labels: HashMap::new(),
        })
        .await
        .during("commit snapshot", chain_id);
    match committed {
        Ok(_) => Ok(()),
        // Another unpack of the same layer won the race; ours is redundant.
        Err(e) if e.is_already_exists() => {
            remove_snapshot(cd, &key).await;
            Ok(())
        }
        Err(e) => {
            remove_snapshot(cd, &key).await;
            Err(e.into())
        }
    }
}

/// Removes snapshot `key`, logging (not failing) when that is impossible.
pub(crate) async fn remove_snapshot(cd: &Containerd, key: &str) {
    let removed = cd
        .snapshots()
        .remove(RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        })
        .await
        .during("remove snapshot", key);
    match removed {
        Err(e) if !e.is_not_found() => {
            tracing::warn!(snapshot = %key, error = %e, "could not remove snapshot");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = sha256_digest(b"a");
        let b = sha256_digest(b"b");
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], sha256_digest(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            ImageSource::parse("oci-archive:/local/a.tar:v1"),
            ImageSource::Archive {
                path: "/local/a.tar".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageSource::parse("oci-archive:/local/a.tar"),
            ImageSource::Archive {
                path: "/local/a.tar".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageSource::parse("localhost:5000/a:b"),
            ImageSource::Registry("localhost:5000/a:b".into())
        );
    }

    #[test]
    fn digests_are_checked() {
        let d = sha256_digest(b"x");
        assert!(verify_digest(&d, b"x").is_ok());
        assert!(matches!(
            verify_digest(&d, b"y"),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(verify_digest("md5:abc", b"x").is_err());
    }

    #[test]
    fn platform_selection() {
        let (os, arch) = host_platform();
        let body = serde_json::json!({
            "manifests": [
                {"digest": "sha256:aa", "size": 1, "platform": {"os": "windows", "architecture": arch}},
                {"digest": "sha256:bb", "size": 1, "platform": {"os": os, "architecture": arch}}
            ]
        });
        let index: Index = serde_json::from_value(body.clone()).expect("index");
        assert!(is_index("", &body));
        assert_eq!(
            select_platform(&index).map(|d| d.digest.as_str()),
            Some("sha256:bb")
        );
    }
}
