//! Moving blobs in and out of containerd's content store, and the lease that protects
//! them while an image is being assembled. Second in the image pipeline: it uses only
//! the shared types ([`super::oci`]) and the connection.
//!
//! containerd 1.6 has no server-side pull or import: the client writes each blob with
//! the content service's `Write` stream, and containerd checks the size and digest at
//! commit. Nothing here trusts a blob's bytes before containerd has verified them.

use std::collections::HashMap;

use bytes::Bytes;
use containerd_client::services::v1::{
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, InfoRequest,
    ReadContentRequest, WriteAction, WriteContentRequest,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::client::{Call, Containerd, ContainerdError, Held};
use super::oci::{verify_digest, Descriptor, ImageError};

/// How big a manifest, index or config may be when keeld reads it into memory.
pub const MAX_METADATA_BLOB: u64 = 4 << 20;
/// The chunk size for content writes (containerd's gRPC limit is 16 MiB).
const WRITE_CHUNK: usize = 1 << 20;

/// Whether the content store already holds `digest`. Within a lease, the blob is added
/// to it first (see [`Containerd::hold`]): when it is found, it is protected from then
/// on, though another pull's lease made it.
pub async fn has_blob(cd: &Containerd, digest: &str) -> Result<bool, ContainerdError> {
    cd.hold(Held::Content(digest)).await?;
    match cd
        .content()
        .info(InfoRequest {
            digest: digest.to_owned(),
        })
        .await
        .during("stat blob", digest)
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads a small blob (a manifest, index or config) back from the content store.
pub async fn read_blob(cd: &Containerd, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let digest = desc.digest().to_string();
    if desc.size() > MAX_METADATA_BLOB {
        return Err(ImageError::TooBig {
            digest,
            size: desc.size(),
        });
    }
    let mut stream = cd
        .content()
        .read(ReadContentRequest {
            digest: digest.clone(),
            offset: 0,
            size: 0,
        })
        .await
        .during("read blob", &digest)?;
    let mut out = Vec::with_capacity(usize::try_from(desc.size()).unwrap_or(0));
    while let Some(part) = stream.message().await.map_err(|status| ContainerdError {
        op: "read blob",
        subject: digest.clone(),
        status,
    })? {
        out.extend_from_slice(&part.data);
        if out.len() as u64 > MAX_METADATA_BLOB {
            return Err(ImageError::TooBig {
                digest,
                size: out.len() as u64,
            });
        }
    }
    verify_digest(desc.digest(), &out)?;
    Ok(out)
}

/// Writes a blob already in memory (and verified) unless the store has it.
pub async fn write_small(
    cd: &Containerd,
    desc: &Descriptor,
    labels: HashMap<String, String>,
    bytes: Vec<u8>,
) -> Result<(), ImageError> {
    if has_blob(cd, desc.digest().as_ref()).await? {
        return Ok(());
    }
    let stream = futures_util::stream::once(async move { Ok(Bytes::from(bytes)) });
    write_blob(cd, desc, labels, stream).await
}

/// Writes one blob from `data` into the content store; containerd verifies the total
/// size and the digest before it commits, so a truncated download or a corrupted
/// archive never becomes content. `labels` are set at commit (the garbage-collection
/// references that keep an image's parts alive).
pub async fn write_blob<S>(
    cd: &Containerd,
    desc: &Descriptor,
    labels: HashMap<String, String>,
    data: S,
) -> Result<(), ImageError>
where
    S: Stream<Item = Result<Bytes, ImageError>> + Send,
{
    let digest = desc.digest().to_string();
    let size_u64 = desc.size();
    let fail = |status| ContainerdError {
        op: "write blob",
        subject: digest.clone(),
        status,
    };
    // A unique ingest ref: a half-finished write from an earlier, interrupted attempt
    // must not be resumed at the wrong offset.
    // The digest's encoded part is validated by its type ([A-Za-z0-9=_-]).
    let ingest_ref = format!(
        "keel-{}-{:016x}",
        desc.digest().digest(),
        rand::random::<u64>()
    );
    let size = i64::try_from(size_u64).map_err(|_| ImageError::TooBig {
        digest: digest.clone(),
        size: size_u64,
    })?;
    let (tx, rx) = mpsc::channel::<WriteContentRequest>(2);
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    // The first message opens the writer; containerd answers each message in turn, and
    // the exchange is kept in lockstep so that a refused write stops the upload at once.
    let first = WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: ingest_ref.clone(),
        total: size,
        expected: digest.clone(),
        ..Default::default()
    };
    let closed = || ImageError::Protocol(format!("content write of {digest} closed early"));
    tx.send(first).await.map_err(|_| closed())?;
    let mut content = cd.content();
    let already = |status: &containerd_client::tonic::Status| {
        status.code() == containerd_client::tonic::Code::AlreadyExists
    };
    let mut replies = match content.write(requests).await {
        Ok(replies) => replies.into_inner(),
        // Another writer (a pull of the same layer for another container) committed
        // the blob since it was looked for: the content is there, held by its lease.
        Err(status) if already(&status) => return hold(cd, &digest).await,
        Err(status) => return Err(fail(status).into()),
    };
    match replies.message().await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(closed()),
        Err(status) if already(&status) => return hold(cd, &digest).await,
        Err(status) => return Err(fail(status).into()),
    }

    let mut offset: i64 = 0;
    let mut data = std::pin::pin!(data);
    while let Some(chunk) = data.next().await {
        let chunk = chunk?;
        for piece in chunk.chunks(WRITE_CHUNK) {
            let len = i64::try_from(piece.len()).unwrap_or(i64::MAX);
            if offset.saturating_add(len) > size {
                return Err(ImageError::SizeMismatch {
                    digest: digest.clone(),
                    expected: size_u64,
                });
            }
            let message = WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: ingest_ref.clone(),
                total: size,
                expected: digest.clone(),
                offset,
                data: piece.to_vec(),
                ..Default::default()
            };
            tx.send(message).await.map_err(|_| closed())?;
            replies.message().await.map_err(fail)?.ok_or_else(closed)?;
            offset += len;
        }
    }
    if offset != size {
        return Err(ImageError::SizeMismatch {
            digest: digest.clone(),
            expected: size_u64,
        });
    }
    let commit = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: ingest_ref,
        total: size,
        expected: digest.clone(),
        offset,
        labels,
        ..Default::default()
    };
    tx.send(commit).await.map_err(|_| closed())?;
    match replies.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(closed()),
        // Another writer committed the same blob first: the content is there.
        Err(status) if already(&status) => hold(cd, &digest).await,
        Err(status) => Err(fail(status).into()),
    }
}

/// A blob another writer committed, added to this pull's lease (see [`has_blob`]).
async fn hold(cd: &Containerd, digest: &str) -> Result<(), ImageError> {
    Ok(cd.hold(Held::Content(digest)).await?)
}

/// A containerd lease: content and snapshots made under it survive garbage collection
/// until the image (or container) that references them exists. Deleted on `release`;
/// if keeld dies first, the expiry label lets containerd collect it.
#[derive(Debug)]
pub struct Lease {
    pub id: String,
}

impl Lease {
    pub async fn create(cd: &Containerd) -> Result<Lease, ContainerdError> {
        let id = format!("keel-{:016x}", rand::random::<u64>());
        // A day, as containerd's own client: a pull and unpack of a large image over a
        // slow link must finish before its layers lose their protection.
        let expire = std::time::SystemTime::now() + std::time::Duration::from_secs(24 * 3600);
        let labels = HashMap::from([(
            "containerd.io/gc.expire".to_owned(),
            humantime::format_rfc3339_seconds(expire).to_string(),
        )]);
        cd.leases()
            .create(CreateLeaseRequest {
                id: id.clone(),
                labels,
            })
            .await
            .during("create lease", &id)?;
        Ok(Lease { id })
    }

    pub async fn release(self, cd: &Containerd) {
        let deleted = cd
            .leases()
            .delete(DeleteLeaseRequest {
                id: self.id.clone(),
                sync: false,
            })
            .await
            .during("delete lease", &self.id);
        if let Err(e) = deleted {
            tracing::warn!(lease = %self.id, error = %e, "could not delete lease; containerd collects it when it expires, a day after it was made");
        }
    }
}
