//! The vocabulary every stage of the image pipeline shares, and nothing else: the OCI
//! image-spec types (`oci-spec`'s descriptor, index, manifest, config and media types),
//! the Docker media types keeld also accepts, where a container's image comes from
//! ([`ImageSource`]) and what identifies an archive file ([`ArchiveStamp`]), digests,
//! platform selection, chain IDs, the garbage-collection labels, and [`ImageError`].
//!
//! This is the bottom of the pipeline: it imports nothing from it (only the containerd
//! connection's error and snapshotter name). See [`super::image`] for the order.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

pub use oci_spec::image::{
    Arch, Config as ImageConfig, Descriptor, Digest, DigestAlgorithm, ImageConfiguration,
    ImageIndex, ImageManifest, MediaType, Os, Platform, ANNOTATION_REF_NAME,
};

use super::client::{ContainerdError, SNAPSHOTTER};

/// A Docker manifest list: an index by another name.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// A Docker image manifest (schema 2): an OCI manifest by another name.
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
    #[error("{digest:?} is not a digest keeld can verify: {why}")]
    InvalidDigest { digest: String, why: String },
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

/// Why a pull failed, per endpoint tried. Never holds a credential.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0:?} is not a valid image reference: {1}")]
    Reference(String, String),
    #[error("{}", .0.join("; "))]
    AllEndpointsFailed(Vec<String>),
    #[error("{endpoint}: the manifest is {got}, but the reference pins {pinned}")]
    PinnedDigest {
        endpoint: String,
        pinned: String,
        got: String,
    },
}

// ---------------------------------------------------------------------------------
// Where an image comes from

/// Where an image comes from: a container's `source` setting, parsed once per start
/// and handed down the pipeline. Its `Display` is the setting as written, which is
/// also the name of the containerd image record.
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

    /// The archive's path, for an archive source.
    pub fn archive_path(&self) -> Option<&str> {
        match self {
            ImageSource::Archive { path, .. } => Some(path),
            ImageSource::Registry(_) => None,
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Registry(reference) => f.write_str(reference),
            ImageSource::Archive { path, tag } => {
                f.write_str(settings_model::types::OCI_ARCHIVE_PREFIX)?;
                f.write_str(path)?;
                match tag {
                    Some(tag) => write!(f, ":{tag}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// What identifies an archive file's content without reading it: device, inode, size
/// and modification time. Its `Display` is the label keeld puts on the image record it
/// imported from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl ArchiveStamp {
    /// The stamp of the file at `path`; `None` when it cannot be read (the import then
    /// reports why).
    pub fn of(path: &str) -> Option<ArchiveStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(ArchiveStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        })
    }
}

impl fmt::Display for ArchiveStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}.{:09}",
            self.dev, self.ino, self.len, self.mtime, self.mtime_nsec
        )
    }
}

// ---------------------------------------------------------------------------------
// Documents, digests, platforms

/// A manifest document as fetched: an index (or Docker manifest list) or an image
/// manifest.
#[derive(Debug)]
pub enum Document {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

/// Whether a media type names an index (OCI index or Docker manifest list).
pub fn is_index_type(media_type: &MediaType) -> bool {
    matches!(media_type, MediaType::ImageIndex)
        || matches!(media_type, MediaType::Other(m) if m == MEDIA_DOCKER_LIST)
}

/// Reads a manifest document. Whether it is an index is decided by `media_type` (the
/// descriptor that pointed at it) when that names an index, else by the document's own
/// `mediaType`, else by its shape (a `manifests` array).
pub fn parse_document(
    media_type: Option<&MediaType>,
    bytes: &[u8],
) -> Result<Document, ImageError> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default, rename = "mediaType")]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde::de::IgnoredAny>,
    }
    let peek: Peek = parse_json("manifest", bytes)?;
    let index = match (media_type, &peek.media_type) {
        (Some(m), _) if is_index_type(m) => true,
        (_, Some(own)) => is_index_type(&MediaType::from(own.as_str())),
        (_, None) => peek.manifests.is_some(),
    };
    if index {
        parse_json("image index", bytes).map(|i| Document::Index(Box::new(i)))
    } else {
        parse_json("image manifest", bytes).map(|m| Document::Manifest(Box::new(m)))
    }
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

/// Parses a digest that came from outside (containerd, a registry); only SHA-256 is
/// accepted, since that is what keeld can verify.
pub fn parse_digest(text: &str) -> Result<Digest, ImageError> {
    let digest = Digest::try_from(text).map_err(|e| ImageError::InvalidDigest {
        digest: text.to_owned(),
        why: e.to_string(),
    })?;
    if *digest.algorithm() != DigestAlgorithm::Sha256 {
        return Err(ImageError::InvalidDigest {
            digest: text.to_owned(),
            why: "only sha256 is supported".to_owned(),
        });
    }
    Ok(digest)
}

/// Checks bytes read into memory against their descriptor's digest.
pub fn verify_digest(expected: &Digest, bytes: &[u8]) -> Result<(), ImageError> {
    if *expected.algorithm() != DigestAlgorithm::Sha256 {
        return Err(ImageError::MediaType(format!(
            "digest algorithm of {expected}"
        )));
    }
    let actual = sha256_digest(bytes);
    if actual != expected.as_ref() {
        return Err(ImageError::DigestMismatch {
            digest: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// The descriptor as containerd's API writes it.
pub fn to_proto(desc: &Descriptor) -> containerd_client::types::Descriptor {
    containerd_client::types::Descriptor {
        media_type: desc.media_type().to_string(),
        digest: desc.digest().to_string(),
        size: i64::try_from(desc.size()).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

/// A descriptor containerd gave back (an image record's target).
pub fn from_proto(desc: containerd_client::types::Descriptor) -> Result<Descriptor, ImageError> {
    Ok(Descriptor::new(
        MediaType::from(desc.media_type.as_str()),
        u64::try_from(desc.size).unwrap_or(0),
        parse_digest(&desc.digest)?,
    ))
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
pub fn select_platform(index: &ImageIndex) -> Option<&Descriptor> {
    let (os, arch) = host_platform();
    let (os, arch) = (Os::from(os), Arch::from(arch));
    index.manifests().iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == os && *p.architecture() == arch)
    })
}

// ---------------------------------------------------------------------------------
// Layers and garbage collection

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

/// The labels that make a manifest blob keep its config and layers alive.
pub fn manifest_gc_labels(manifest: &ImageManifest) -> HashMap<String, String> {
    let mut labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        manifest.config().digest().to_string(),
    )]);
    for (i, layer) in manifest.layers().iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest().to_string(),
        );
    }
    labels
}

/// The label that makes a config blob keep the image's unpacked snapshot alive.
pub fn config_gc_labels(config: &ImageConfiguration) -> HashMap<String, String> {
    chain_ids(config.rootfs().diff_ids())
        .last()
        .map(|top| {
            HashMap::from([(
                format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                top.clone(),
            )])
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(bytes: &[u8]) -> Digest {
        parse_digest(&sha256_digest(bytes)).expect("a sha256 digest")
    }

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
    fn sources_parse_and_print_as_written() {
        let cases = [
            (
                "oci-archive:/local/a.tar:v1",
                ImageSource::Archive {
                    path: "/local/a.tar".into(),
                    tag: Some("v1".into()),
                },
            ),
            (
                "oci-archive:/local/a.tar",
                ImageSource::Archive {
                    path: "/local/a.tar".into(),
                    tag: None,
                },
            ),
            (
                "localhost:5000/a:b",
                ImageSource::Registry("localhost:5000/a:b".into()),
            ),
        ];
        for (text, parsed) in cases {
            assert_eq!(ImageSource::parse(text), parsed);
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(
            ImageSource::parse("oci-archive:/a.tar").archive_path(),
            Some("/a.tar")
        );
        assert_eq!(ImageSource::parse("a/b:c").archive_path(), None);
    }

    #[test]
    fn archive_stamps_follow_the_file() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let path = file.path().to_str().expect("utf-8 path");
        std::fs::write(path, b"one").expect("write");
        let first = ArchiveStamp::of(path).expect("stamp");
        assert_eq!(ArchiveStamp::of(path), Some(first));
        std::fs::write(path, b"three").expect("write");
        assert_ne!(ArchiveStamp::of(path), Some(first));
        let label = first.to_string();
        assert_eq!(label.split(':').count(), 4, "{label}");
        assert!(ArchiveStamp::of("/nonexistent/archive.tar").is_none());
    }

    #[test]
    fn digests_are_checked() {
        let d = digest_of(b"x");
        assert!(verify_digest(&d, b"x").is_ok());
        assert!(matches!(
            verify_digest(&d, b"y"),
            Err(ImageError::DigestMismatch { .. })
        ));
        let sha512 = Digest::try_from(format!("sha512:{}", "a".repeat(128))).expect("sha512");
        assert!(verify_digest(&sha512, b"x").is_err());
        for bad in ["md5:abc", "sha256:abc", "sha256:../../etc", "", "sha256"] {
            assert!(
                matches!(parse_digest(bad), Err(ImageError::InvalidDigest { .. })),
                "{bad:?}"
            );
        }
        assert!(parse_digest(&format!("sha512:{}", "a".repeat(128))).is_err());
    }

    #[test]
    fn descriptors_round_trip_through_containerd() {
        let desc = Descriptor::new(MediaType::ImageManifest, 12, digest_of(b"m"));
        let proto = to_proto(&desc);
        assert_eq!(
            proto.media_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(proto.size, 12);
        assert_eq!(from_proto(proto).expect("back"), desc);
        let bad = containerd_client::types::Descriptor {
            digest: "sha256:nothex".into(),
            ..Default::default()
        };
        assert!(from_proto(bad).is_err());
    }

    fn index_json(os: &str, arch: &str) -> serde_json::Value {
        let (host_os, host_arch) = host_platform();
        serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": sha256_digest(b"a"), "size": 1,
                 "platform": {"os": os, "architecture": arch}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": sha256_digest(b"b"), "size": 1,
                 "platform": {"os": host_os, "architecture": host_arch}}
            ]
        })
    }

    #[test]
    fn platform_selection() {
        let (_, arch) = host_platform();
        let body = serde_json::to_vec(&index_json("windows", arch)).expect("json");
        let Document::Index(index) = parse_document(None, &body).expect("index") else {
            panic!("not read as an index");
        };
        assert_eq!(
            select_platform(&index).map(|d| d.digest().to_string()),
            Some(sha256_digest(b"b"))
        );
        let body = serde_json::json!({"schemaVersion": 2, "manifests": []});
        let index: ImageIndex = serde_json::from_value(body).expect("index");
        assert!(select_platform(&index).is_none());
    }

    #[test]
    fn documents_are_told_apart() {
        let (_, arch) = host_platform();
        let index = serde_json::to_vec(&index_json("linux", arch)).expect("json");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": sha256_digest(b"c"), "size": 1},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": sha256_digest(b"l"), "size": 1}]
        }))
        .expect("json");
        // By shape, by the pointing descriptor, by the document's own media type.
        assert!(matches!(
            parse_document(None, &index),
            Ok(Document::Index(_))
        ));
        assert!(matches!(
            parse_document(Some(&MediaType::ImageIndex), &index),
            Ok(Document::Index(_))
        ));
        let Ok(Document::Manifest(m)) = parse_document(Some(&MediaType::ImageManifest), &manifest)
        else {
            panic!("not read as a manifest");
        };
        assert_eq!(m.layers().len(), 1);
        let labels = manifest_gc_labels(&m);
        assert_eq!(labels.len(), 2);
        assert_eq!(
            labels["containerd.io/gc.ref.content.l.0"],
            sha256_digest(b"l")
        );
        let list = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_DOCKER_LIST, "manifests": []
        }))
        .expect("json");
        assert!(matches!(
            parse_document(None, &list),
            Ok(Document::Index(_))
        ));
        // A descriptor that is not an index type does not override the document.
        assert!(matches!(
            parse_document(Some(&MediaType::ImageManifest), &list),
            Ok(Document::Index(_))
        ));
        assert!(matches!(
            parse_document(None, b"{\"manifests\": 3"),
            Err(ImageError::Json { .. })
        ));
    }

    #[test]
    fn config_labels_name_the_top_snapshot() {
        let (a, b) = (sha256_digest(b"a"), sha256_digest(b"b"));
        let config: ImageConfiguration = serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [a, b]}
        }))
        .expect("config");
        let labels = config_gc_labels(&config);
        let top = chain_ids(&[a, b]).pop().expect("top");
        assert_eq!(
            labels,
            HashMap::from([(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top)])
        );
        let empty: ImageConfiguration = serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .expect("config");
        assert!(config_gc_labels(&empty).is_empty());
    }
}
