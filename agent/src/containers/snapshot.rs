//! containerd's snapshotter: unpacking one layer into a committed snapshot, asking
//! whether a snapshot exists, removing one. Second in the image pipeline, beside
//! [`super::content`]: it uses only the shared types ([`super::oci`]) and the connection.
//!
//! An unpacked layer is the snapshot named by its chain ID; a container's root file
//! system is an active snapshot on top of its image's top layer (see [`super::runtime`]).

use std::collections::HashMap;

use containerd_client::services::v1::{
    snapshots::{
        CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    },
    ApplyRequest,
};

use super::client::{Call, Containerd, ContainerdError, Held, SNAPSHOTTER};
use super::oci::{to_proto, Descriptor, ImageError};

/// Whether snapshot `key` exists; within a lease, it is added to it first.
pub async fn snapshot_exists(cd: &Containerd, key: &str) -> Result<bool, ContainerdError> {
    // Held first, looked for second, as a blob (`content::has_blob`): a snapshot another
    // pull committed under its lease stays when that pull fails.
    cd.hold(Held::Snapshot(key)).await?;
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
pub async fn apply_layer(
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
    let layer_digest = layer.digest().to_string();
    let applied = cd
        .diff()
        .apply(ApplyRequest {
            diff: Some(to_proto(layer)),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        })
        .await
        .during("apply layer", &layer_digest);
    let result = match applied {
        Ok(r) => {
            let actual = r.applied.map(|d| d.digest).unwrap_or_default();
            if actual != diff_id {
                Err(ImageError::DiffId {
                    digest: layer_digest,
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
        // Another unpack of the same layer won the race; ours is redundant, theirs is
        // held by this pull's lease too.
        Err(e) if e.is_already_exists() => {
            remove_snapshot(cd, &key).await;
            Ok(cd.hold(Held::Snapshot(chain_id)).await?)
        }
        Err(e) => {
            remove_snapshot(cd, &key).await;
            Err(e.into())
        }
    }
}

/// Removes snapshot `key`, logging (not failing) when that is impossible.
pub async fn remove_snapshot(cd: &Containerd, key: &str) {
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
