//! Getting a container's image ready in containerd: the last stage of the image
//! pipeline, the only one that knows both sources.
//!
//! The pipeline, each module importing only those before it (never one after):
//!
//! 1. [`super::oci`]: the shared types (descriptor, index, manifest, config, media
//!    types from `oci-spec`; [`ImageSource`], [`ArchiveStamp`], digests, [`ImageError`]).
//! 2. [`super::content`] (blobs, leases) and [`super::snapshot`] (unpacked layers):
//!    containerd's two stores.
//! 3. [`super::archive`] and [`super::registry`]: the two sources; each writes the
//!    platform's manifest, its config and its layers into the content store (verified
//!    by digest) and answers the manifest's descriptor.
//! 4. here: [`Images::ensure`] points an image record at that manifest and applies each
//!    layer on top of the one before into a committed snapshot named by its chain ID.
//!
//! Whatever is already there is skipped, so a second start is cheap, and a host whose
//! registry is unreachable starts from the cached image. An archive that has not
//! changed since it was imported (same [`ArchiveStamp`]) is not read again: that is
//! the archive cache, one per runtime, remembered in memory and on the image record (so
//! that it outlives a keeld restart).

use std::collections::HashMap;
use std::sync::Mutex;

use containerd_client::services::v1::{CreateImageRequest, Image, UpdateImageRequest};

use super::client::{Call, Containerd};
use super::content::{self, Lease};
use super::oci::{
    chain_ids, from_proto, parse_json, to_proto, ArchiveStamp, Descriptor, ImageConfig,
    ImageConfiguration, ImageError, ImageManifest, ImageSource,
};
use super::registry::RegistryConfig;
use super::snapshot::{apply_layer, snapshot_exists};
use super::{archive, registry};

/// The label on an archive's image record: the [`ArchiveStamp`] of the file it was
/// imported from.
pub const LABEL_ARCHIVE_STAMP: &str = "io.keel.archive-stamp";

/// An image ready to run: unpacked, with its config read.
#[derive(Debug, Clone)]
pub struct ReadyImage {
    /// The containerd image record's name (the `source` setting as written).
    pub name: String,
    pub manifest_digest: String,
    /// The top layer's chain ID: the snapshot a container's root filesystem starts from.
    pub chain_id: String,
    /// The image's run configuration (`Entrypoint`, `Cmd`, `Env`, ...); empty when the
    /// image has none.
    pub config: ImageConfig,
    /// Why fetching failed, when this came from the cache instead.
    pub fetch_failed: Option<String>,
}

/// Makes images ready, and remembers the archives it imported: a start from an
/// archive whose [`ArchiveStamp`] is unchanged costs one `stat` (no containerd call);
/// after a keeld restart, the stamp on the image record answers instead (a few
/// containerd calls, no archive read). Registry sources are fetched on every start: a
/// tag may move.
#[derive(Debug, Default)]
pub struct Images {
    archives: Mutex<HashMap<String, (ArchiveStamp, ReadyImage)>>,
}

impl Images {
    pub fn new() -> Images {
        Images::default()
    }

    fn archives(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ArchiveStamp, ReadyImage)>> {
        // Entries are replaced whole, so a poisoned lock still holds consistent data.
        self.archives.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches (if needed) and unpacks the image `source`, then answers what a
    /// container needs to run it. A registry image is fetched on every call, so a
    /// moved tag is followed; when the registry cannot be reached and containerd
    /// already holds the image, the cached copy is used and the fetch error only
    /// logged.
    pub async fn ensure(
        &self,
        cd: &Containerd,
        source: &ImageSource,
        registries: &RegistryConfig,
    ) -> Result<ReadyImage, ImageError> {
        let name = source.to_string();
        let stamp = source.archive_path().and_then(ArchiveStamp::of);
        if let Some(stamp) = stamp {
            if let Some((known, ready)) = self.archives().get(&name) {
                if *known == stamp {
                    return Ok(ready.clone());
                }
            }
            if let Some(ready) = recorded_archive(cd, &name, stamp).await? {
                self.archives().insert(name, (stamp, ready.clone()));
                return Ok(ready);
            }
        }
        let lease = Lease::create(cd).await?;
        let result = match cd.with_lease(&lease.id) {
            Ok(leased) => ensure_leased(&leased, source, &name, stamp, registries).await,
            Err(e) => Err(e.into()),
        };
        lease.release(cd).await;
        if let (Some(stamp), Ok(ready)) = (stamp, &result) {
            if ready.fetch_failed.is_none() {
                self.archives().insert(name, (stamp, ready.clone()));
            }
        }
        result
    }

    /// Forgets what is known of `source`: its unpacked image may have been removed
    /// behind keeld's back, so the next start imports it again.
    pub fn forget(&self, source: &ImageSource) {
        self.archives().remove(&source.to_string());
    }
}

async fn ensure_leased(
    cd: &Containerd,
    source: &ImageSource,
    name: &str,
    stamp: Option<ArchiveStamp>,
    registries: &RegistryConfig,
) -> Result<ReadyImage, ImageError> {
    let fetched = match source {
        ImageSource::Archive { path, tag } => archive::import(cd, path, tag.as_deref()).await,
        ImageSource::Registry(reference) => registry::pull(cd, reference, registries).await,
    };
    let (manifest, fetch_failed) = match fetched {
        Ok(manifest) => (manifest, None),
        Err(e) if e.is_containerd_down() => return Err(e),
        Err(e) => match cd.image(name).await? {
            Some(Image {
                target: Some(target),
                ..
            }) => {
                tracing::warn!(image = %name, error = %e, "fetching the image failed; using the cached copy");
                (from_proto(target)?, Some(e.to_string()))
            }
            _ => return Err(e),
        },
    };
    // Unpacked before it is recorded: an image whose layers do not apply must not
    // replace the record of the one that ran, which is the cached copy a later failed
    // fetch falls back to. Until the record exists, the lease keeps what was fetched and
    // unpacked from the garbage collector.
    let mut ready = unpack(cd, name, &manifest).await?;
    if fetch_failed.is_none() {
        record_image(cd, name, &manifest, stamp).await?;
    }
    ready.fetch_failed = fetch_failed;
    Ok(ready)
}

/// An archive whose image record says it was imported from this very file (same
/// stamp), and whose top snapshot exists: ready without reading the archive. `None`
/// sends the caller down the full path.
async fn recorded_archive(
    cd: &Containerd,
    name: &str,
    stamp: ArchiveStamp,
) -> Result<Option<ReadyImage>, ImageError> {
    let Some(image) = cd.image(name).await? else {
        return Ok(None);
    };
    if image.labels.get(LABEL_ARCHIVE_STAMP) != Some(&stamp.to_string()) {
        return Ok(None);
    }
    let Some(target) = image.target else {
        return Ok(None);
    };
    let Ok(manifest_desc) = from_proto(target) else {
        return Ok(None);
    };
    let Ok((_, config)) = read_image(cd, &manifest_desc).await else {
        return Ok(None);
    };
    let Some(top) = chain_ids(config.rootfs().diff_ids()).pop() else {
        return Ok(None);
    };
    if !snapshot_exists(cd, &top).await? {
        return Ok(None);
    }
    Ok(Some(ready_image(name, &manifest_desc, top, config)))
}

/// The manifest and config of the image whose manifest is `manifest_desc`, read back
/// from the content store.
async fn read_image(
    cd: &Containerd,
    manifest_desc: &Descriptor,
) -> Result<(ImageManifest, ImageConfiguration), ImageError> {
    let manifest_bytes = content::read_blob(cd, manifest_desc).await?;
    let manifest: ImageManifest = parse_json("image manifest", &manifest_bytes)?;
    let config_bytes = content::read_blob(cd, manifest.config()).await?;
    let config: ImageConfiguration = parse_json("image config", &config_bytes)?;
    Ok((manifest, config))
}

fn ready_image(
    name: &str,
    manifest_desc: &Descriptor,
    chain_id: String,
    config: ImageConfiguration,
) -> ReadyImage {
    ReadyImage {
        name: name.to_owned(),
        manifest_digest: manifest_desc.digest().to_string(),
        chain_id,
        config: config.config().clone().unwrap_or_default(),
        fetch_failed: None,
    }
}

/// Points image record `name` at `manifest`, creating or updating it; an archive's
/// record carries the file's stamp.
async fn record_image(
    cd: &Containerd,
    name: &str,
    manifest: &Descriptor,
    stamp: Option<ArchiveStamp>,
) -> Result<(), ImageError> {
    let image = Image {
        name: name.to_owned(),
        target: Some(to_proto(manifest)),
        labels: stamp
            .map(|s| HashMap::from([(LABEL_ARCHIVE_STAMP.to_owned(), s.to_string())]))
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

/// Reads the manifest and config back from the content store and applies every layer
/// not yet unpacked, bottom up.
async fn unpack(
    cd: &Containerd,
    name: &str,
    manifest_desc: &Descriptor,
) -> Result<ReadyImage, ImageError> {
    let (manifest, config) = read_image(cd, manifest_desc).await?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::LayerCount {
            diff_ids: diff_ids.len(),
            layers: manifest.layers().len(),
        });
    }
    let chain = chain_ids(diff_ids);
    let mut parent = String::new();
    for ((layer, diff_id), chain_id) in manifest.layers().iter().zip(diff_ids).zip(&chain) {
        if !snapshot_exists(cd, chain_id).await? {
            apply_layer(cd, layer, diff_id, chain_id, &parent).await?;
        }
        parent.clone_from(chain_id);
    }
    Ok(ready_image(name, manifest_desc, parent, config))
}
