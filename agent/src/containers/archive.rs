//! Importing a local OCI archive (`oci-archive:/path[:tag]`): a tar of an OCI image
//! layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`), as skopeo and buildah
//! write it.
//!
//! The tar is scanned once for where each blob's bytes sit; then the index, manifest
//! and config are read from those offsets and checked against their digests, and the
//! layers are streamed into containerd, which checks theirs. Nothing is extracted to
//! disk, so a hostile archive's paths cannot escape anywhere.
//!
//! One of the two image sources (with [`super::registry`]): it uses the shared types
//! ([`super::oci`]) and the content store ([`super::content`]), never the pipeline
//! that calls it ([`super::image`]).

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::Path;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::client::Containerd;
use super::content::{self, write_small, MAX_METADATA_BLOB};
use super::oci::{
    config_gc_labels, host_platform, manifest_gc_labels, parse_document, parse_json,
    select_platform, verify_digest, Descriptor, Document, ImageConfiguration, ImageError,
    ImageIndex, ANNOTATION_REF_NAME,
};

/// More entries than any image layout needs; bounds the scan of a hostile archive.
const MAX_ENTRIES: usize = 100_000;

/// Where one blob's bytes sit inside the tar.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

/// The archive's table of contents.
struct Toc {
    index: Option<Span>,
    blobs: HashMap<String, Span>,
}

/// Imports the archive's image into the content store; answers the manifest descriptor.
pub async fn import(
    cd: &Containerd,
    path: &str,
    tag: Option<&str>,
) -> Result<Descriptor, ImageError> {
    let err = |why: String| ImageError::Archive {
        path: path.to_owned(),
        why,
    };
    let owned = path.to_owned();
    let toc = tokio::task::spawn_blocking(move || scan(Path::new(&owned)))
        .await
        .map_err(|e| err(format!("scan failed: {e}")))??;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| ImageError::Io {
            path: path.to_owned(),
            source,
        })?;
    let index_span = toc
        .index
        .ok_or_else(|| err("no index.json: not an OCI archive".into()))?;
    let index_bytes = read_span(&mut file, path, index_span).await?;
    let index: ImageIndex = parse_json(&format!("{path}: index.json"), &index_bytes)?;
    let mut chosen = choose(&index, tag).map_err(err)?.clone();
    // A layout may point at an index (multi-platform image): follow it one level.
    let mut manifest_bytes = read_blob(&mut file, path, &toc, &chosen).await?;
    let manifest = match parse_document(Some(chosen.media_type()), &manifest_bytes)? {
        Document::Manifest(manifest) => *manifest,
        Document::Index(nested) => {
            let (os, arch) = host_platform();
            chosen = select_platform(&nested)
                .ok_or_else(|| err(ImageError::NoPlatform { os, arch }.to_string()))?
                .clone();
            manifest_bytes = read_blob(&mut file, path, &toc, &chosen).await?;
            parse_json("image manifest", &manifest_bytes)?
        }
    };
    // The image record points at the manifest alone (no annotations, no platform).
    let chosen = Descriptor::new(
        chosen.media_type().clone(),
        chosen.size(),
        chosen.digest().clone(),
    );
    let config_bytes = read_blob(&mut file, path, &toc, manifest.config()).await?;
    let config: ImageConfiguration = parse_json("image config", &config_bytes)?;

    // Children before parents: a blob that references others is committed (with its
    // GC labels) only once they exist.
    for layer in manifest.layers() {
        let digest = layer.digest().to_string();
        if content::has_blob(cd, &digest).await? {
            continue;
        }
        let span = *toc
            .blobs
            .get(&digest)
            .ok_or_else(|| err(format!("layer {digest} is missing")))?;
        if span.size != layer.size() {
            return Err(ImageError::SizeMismatch {
                digest,
                expected: layer.size(),
            });
        }
        file.seek(SeekFrom::Start(span.offset))
            .await
            .map_err(|source| ImageError::Io {
                path: path.to_owned(),
                source,
            })?;
        let reader = (&mut file).take(span.size);
        let owned_path = path.to_owned();
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20).map(move |r| {
            r.map_err(|source| ImageError::Io {
                path: owned_path.clone(),
                source,
            })
        });
        content::write_blob(cd, layer, HashMap::new(), stream).await?;
    }
    write_small(
        cd,
        manifest.config(),
        config_gc_labels(&config),
        config_bytes,
    )
    .await?;
    write_small(cd, &chosen, manifest_gc_labels(&manifest), manifest_bytes).await?;
    Ok(chosen)
}

/// The manifest the layout's index names by `tag`, or its only one.
fn choose<'a>(index: &'a ImageIndex, tag: Option<&str>) -> Result<&'a Descriptor, String> {
    match tag {
        Some(tag) => index
            .manifests()
            .iter()
            .find(|m| {
                m.annotations()
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_REF_NAME))
                    .is_some_and(|t| t == tag)
            })
            .ok_or_else(|| format!("no image tagged {tag:?} in index.json")),
        None => match index.manifests().as_slice() {
            [only] => Ok(only),
            [] => Err("index.json lists no image".into()),
            _ => Err(format!(
                "index.json lists {} images; name one with oci-archive:/path:<tag>",
                index.manifests().len()
            )),
        },
    }
}

async fn read_blob(
    file: &mut tokio::fs::File,
    path: &str,
    toc: &Toc,
    desc: &Descriptor,
) -> Result<Vec<u8>, ImageError> {
    let digest = desc.digest().to_string();
    let span = *toc.blobs.get(&digest).ok_or_else(|| ImageError::Archive {
        path: path.to_owned(),
        why: format!("blob {digest} is missing"),
    })?;
    if span.size != desc.size() {
        return Err(ImageError::SizeMismatch {
            digest,
            expected: desc.size(),
        });
    }
    let bytes = read_span(file, path, span).await?;
    verify_digest(desc.digest(), &bytes)?;
    Ok(bytes)
}

async fn read_span(
    file: &mut tokio::fs::File,
    path: &str,
    span: Span,
) -> Result<Vec<u8>, ImageError> {
    if span.size > MAX_METADATA_BLOB {
        return Err(ImageError::Archive {
            path: path.to_owned(),
            why: format!("a metadata file of {} bytes is too big", span.size),
        });
    }
    let io = |source| ImageError::Io {
        path: path.to_owned(),
        source,
    };
    file.seek(SeekFrom::Start(span.offset)).await.map_err(io)?;
    let mut out = vec![0; usize::try_from(span.size).unwrap_or(0)];
    file.read_exact(&mut out).await.map_err(io)?;
    Ok(out)
}

/// One pass over the tar headers, recording where `index.json` and each
/// `blobs/sha256/<hex>` start.
fn scan(path: &Path) -> Result<Toc, ImageError> {
    let shown = path.display().to_string();
    let bad = |why: String| ImageError::Archive {
        path: shown.clone(),
        why,
    };
    let file = std::fs::File::open(path).map_err(|source| ImageError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut toc = Toc {
        index: None,
        blobs: HashMap::new(),
    };
    // The tar crate's errors quote the header's bytes (of a file that may be no tar at
    // all, and no business of the status API's): only their kind is said.
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar file ({})", e.kind())))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let entry = entry.map_err(|e| {
            bad(format!(
                "not a tar file, or a damaged one: a header does not parse ({})",
                e.kind()
            ))
        })?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| bad(format!("bad entry name ({})", e.kind())))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let span = Span {
            offset: entry.raw_file_position(),
            size: entry.size(),
        };
        if name == "index.json" {
            toc.index = Some(span);
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                toc.blobs.insert(format!("sha256:{hex}"), span);
            }
        }
    }
    Ok(toc)
}

#[cfg(test)]
mod tests {
    use super::super::oci::{sha256_digest, MediaType};
    use super::*;

    /// A file that is no tar (`oci-archive:/etc/shadow`): refused without a byte of it
    /// in the message, which reaches the status API and the log.
    #[test]
    fn a_file_that_is_no_tar_is_refused_without_quoting_it() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let text = "root:$6$SECRETHASHSECRETHASH:19000:0:99999:7:::\n".repeat(40);
        std::fs::write(file.path(), &text).expect("write");
        let refused = scan(file.path()).map(|_| ()).expect_err("no tar");
        let said = refused.to_string();
        assert!(
            !said.contains("SECRET") && !said.contains("root:"),
            "{said}"
        );
        assert!(said.contains("not a tar file"), "{said}");
    }

    fn tar_with(files: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let out = tempfile::NamedTempFile::new().expect("temp");
        let mut builder = tar::Builder::new(out.reopen().expect("reopen"));
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, *data)
                .expect("append");
        }
        builder.finish().expect("finish");
        out
    }

    #[test]
    fn scan_finds_index_and_blobs_at_their_offsets() {
        let blob = b"hello";
        let hex = super::super::oci::sha256_digest(blob);
        let name = format!("blobs/sha256/{}", hex.trim_start_matches("sha256:"));
        let archive = tar_with(&[
            ("oci-layout", b"{}"),
            (&name, blob),
            ("index.json", b"{\"manifests\":[]}"),
            ("blobs/sha256/not-hex", b"x"),
        ]);
        let toc = scan(archive.path()).expect("scan");
        let span = toc.blobs[&hex];
        let bytes = std::fs::read(archive.path()).expect("read");
        let start = usize::try_from(span.offset).expect("offset");
        assert_eq!(&bytes[start..start + 5], blob);
        assert!(toc.index.is_some());
        assert_eq!(toc.blobs.len(), 1);
    }

    #[test]
    fn not_a_tar_is_refused() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(file.path(), vec![0x5a; 2048]).expect("write");
        assert!(matches!(scan(file.path()), Err(ImageError::Archive { .. })));
    }

    #[test]
    fn choosing_by_tag() {
        let (aa, bb) = (sha256_digest(b"a"), sha256_digest(b"b"));
        let index: ImageIndex = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": MediaType::ImageManifest, "digest": aa, "size": 1,
                 "annotations": {ANNOTATION_REF_NAME: "v1"}},
                {"mediaType": MediaType::ImageManifest, "digest": bb, "size": 1,
                 "annotations": {ANNOTATION_REF_NAME: "v2"}}
            ]
        }))
        .expect("index");
        assert_eq!(
            choose(&index, Some("v2")).map(|d| d.digest().to_string()),
            Ok(bb)
        );
        assert!(choose(&index, Some("v3")).is_err());
        assert!(choose(&index, None)
            .expect_err("ambiguous")
            .contains("lists 2 images"));
    }
}
