//! `prepare-update`: the chosen update streamed from the repository into the inactive
//! slot through the slot writer, with progress.
//!
//! Owns the order of the writes, and why a failure or a crash at any point leaves the
//! running slot the boot choice: the inactive slot's loader entry is removed first
//! (durably; the writer refuses if the running slot is still on trial, when that entry is
//! its fallback), then the hash tree (the root image's check needs its superblock), the
//! root image (verified against the tree and the manifest's root hash as it is written),
//! then the kernel and initrd (each replaced whole). Nothing here writes a loader entry:
//! activation does, later. Memory is bounded: each target streams through in the chunks
//! the HTTP client yields, never whole.

use std::sync::Arc;

use super::manifest::{choose, Update, Wanted};
use super::protocol::{BootFile, Request};
use super::repository::{RepositoryConfig, TargetInfo, UpdateRepository};
use super::settings::UpdateSettings;
use super::slots::{Part, Slot};
use super::status::{Progress, StagedSlot, UpdateImage};
use super::writer_client::{WriterEndpoint, WriterError, WriterSession};

/// Why a prepare failed; `touched` when the inactive slot was already invalidated (its
/// old content is gone).
#[derive(Debug)]
pub struct PrepareFailure {
    pub message: String,
    pub touched: bool,
}

fn fail(message: impl std::fmt::Display, touched: bool) -> PrepareFailure {
    PrepareFailure {
        message: message.to_string(),
        touched,
    }
}

/// What a prepare needs.
pub struct PrepareInput<'a> {
    pub repository: &'a RepositoryConfig,
    pub writer: &'a WriterEndpoint,
    pub settings: UpdateSettings,
    pub wanted: Wanted<'a>,
    /// The update the last refresh chose.
    pub chosen: &'a UpdateImage,
    /// Called as bytes go to the writer.
    pub progress: Arc<dyn Fn(Progress) + Send + Sync>,
}

/// The four targets of an update in write order, with where each goes.
fn plan(repo: &UpdateRepository, update: &Update) -> Result<Vec<(Target, TargetInfo)>, String> {
    [
        (Target::Hash, &update.images.hash),
        (Target::Root, &update.images.root),
        (Target::Kernel, &update.images.kernel),
        (Target::Initrd, &update.images.initrd),
    ]
    .into_iter()
    .map(|(what, name)| {
        repo.target(name)
            .map(|info| (what, info))
            .map_err(|e| e.to_string())
    })
    .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Hash,
    Root,
    Kernel,
    Initrd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Hash => "hash",
            Target::Root => "root",
            Target::Kernel => "kernel",
            Target::Initrd => "initrd",
        }
    }

    fn request(self, slot: Slot, info: &TargetInfo, root_hash: &str) -> Request {
        let sha256 = info.sha256.clone();
        let size = info.length;
        match self {
            Target::Hash => Request::WritePartition {
                slot,
                part: Part::Hash,
                size,
                sha256,
                root_hash: None,
            },
            Target::Root => Request::WritePartition {
                slot,
                part: Part::Root,
                size,
                sha256,
                root_hash: Some(root_hash.to_owned()),
            },
            Target::Kernel => Request::WriteBootFile {
                slot,
                file: BootFile::Kernel,
                size,
                sha256,
            },
            Target::Initrd => Request::WriteBootFile {
                slot,
                file: BootFile::Initrd,
                size,
                sha256,
            },
        }
    }
}

/// Runs a prepare; answers what the inactive slot now holds.
pub async fn prepare(input: PrepareInput<'_>) -> Result<StagedSlot, PrepareFailure> {
    let settings = &input.settings;
    let (repo, manifest) = UpdateRepository::load_with_manifest(
        input.repository,
        settings.metadata.clone(),
        settings.targets.clone(),
        settings.proxy.as_ref(),
    )
    .await
    .map_err(|e| fail(e, false))?;
    // The repository may have changed since the refresh: the choice must still be the one
    // the status shows.
    let choice = choose(&manifest, &input.wanted).map_err(|e| fail(e, false))?;
    let update = match choice.chosen {
        Some(update) if update.version == input.chosen.version => update,
        Some(update) => {
            return Err(fail(
                format!(
                    "the repository now offers {} instead of the chosen {}: run \
                     refresh-updates again",
                    update.version, input.chosen.version
                ),
                false,
            ))
        }
        None => {
            return Err(fail(
                format!(
                    "the chosen update {} is no longer offered to this host: {}",
                    input.chosen.version, choice.reason
                ),
                false,
            ))
        }
    };
    let plan = plan(&repo, &update).map_err(|e| fail(e, false))?;
    let total: u64 = plan.iter().map(|(_, info)| info.length).sum();
    let mut session = WriterSession::open(input.writer)
        .await
        .map_err(|e| fail(e, false))?;
    let inspection = session.inspect().await.map_err(|e| fail(e, false))?;
    let slot = inspection.active.other();
    for (what, info) in &plan {
        let room = match what {
            Target::Root => inspection.root_size,
            Target::Hash => inspection.hash_size,
            Target::Kernel | Target::Initrd => u64::MAX,
        };
        if info.length > room {
            return Err(fail(
                format!(
                    "the {} image of {} ({} bytes) does not fit the inactive slot's partition \
                     ({room} bytes)",
                    what.name(),
                    update.version,
                    info.length
                ),
                false,
            ));
        }
    }
    tracing::info!(slot = %slot, version = %update.version, bytes = total, "preparing the inactive slot");
    // From here on the inactive slot's old content is given up.
    session
        .simple(&Request::Invalidate { slot })
        .await
        .map_err(|e| fail(e, false))?;
    let limit = input.repository.timeouts.download;
    let download = async {
        let mut done_before = 0u64;
        for (what, info) in &plan {
            let stream = repo.stream(&info.name).await.map_err(|e| fail(e, true))?;
            let progress = input.progress.clone();
            let target = what.name().to_owned();
            progress(Progress {
                bytes_done: done_before,
                bytes_total: total,
                target: target.clone(),
            });
            let request = what.request(slot, info, &update.root_hash);
            session
                .write(&request, info.length, stream, |sent| {
                    progress(Progress {
                        bytes_done: done_before + sent,
                        bytes_total: total,
                        target: target.clone(),
                    })
                })
                .await
                .map_err(|e| match e {
                    WriterError::Source(source) => fail(source, true),
                    other => fail(other, true),
                })?;
            done_before += info.length;
        }
        Ok(())
    };
    tokio::time::timeout(limit, download).await.map_err(|_| {
        fail(
            format!(
                "the update's images did not arrive within {} (--update-download-timeout)",
                humantime::format_duration(limit)
            ),
            true,
        )
    })??;
    session.close().await;
    tracing::info!(slot = %slot, version = %update.version, "update written and verified");
    Ok(StagedSlot {
        slot,
        image: UpdateImage {
            arch: update.arch.clone(),
            version: update.version.clone(),
            variant: update.variant.clone(),
        },
        root_hash: update.root_hash.to_ascii_lowercase(),
        activated_in_boot: None,
        activated_from: None,
    })
}
