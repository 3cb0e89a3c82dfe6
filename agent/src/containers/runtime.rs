//! The operations a supervisor (and the boot runner) performs on one container, behind
//! [`Runtime`], so that supervision logic can be tested with paused time and a fake,
//! and [`ContainerdRuntime`], the real thing on containerd.
//!
//! A container's life on containerd: image ready (pulled or imported, unpacked) →
//! persistent directory and `user-data` written → container record created with its
//! OCI spec and a fresh snapshot on the image's top layer → task created (stdio going
//! to `keel-logger`) and started → waited on → task deleted. Stopping is SIGTERM to
//! every process, a grace period, then SIGKILL. Removing deletes the task, the record,
//! the snapshot and the `user-data` file; the persistent directory stays, as on
//! Bottlerocket.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::snapshots::{MountsRequest, PrepareSnapshotRequest};

use super::client::{Call, Containerd, ContainerdError, SNAPSHOTTER};
use super::desired::DesiredContainer;
use super::image::{Images, ReadyImage};
use super::oci::{ImageError, ImageSource};
use super::registry::RegistryConfig;
use super::snapshot::remove_snapshot;
use super::spec::{self, SpecRequest};
use super::status::ContainerKind;

/// Labels keeld puts on its containerd records.
pub const LABEL_MANAGED: &str = "io.keel.managed";
pub const LABEL_KIND: &str = "io.keel.kind";
pub const LABEL_NAME: &str = "io.keel.name";
pub const LABEL_CONFIG: &str = "io.keel.config-hash";
pub const LABEL_DIGEST: &str = "io.keel.image-digest";

/// Why an operation failed: containerd being away is retried quietly; anything else is
/// the container's failure, with a reason for the status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("containerd is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

impl RunError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, RunError::Unavailable(_))
    }
}

impl From<ContainerdError> for RunError {
    fn from(e: ContainerdError) -> Self {
        if e.is_unavailable() {
            RunError::Unavailable(e.to_string())
        } else {
            RunError::Failed(e.to_string())
        }
    }
}

impl From<ImageError> for RunError {
    fn from(e: ImageError) -> Self {
        if e.is_containerd_down() {
            RunError::Unavailable(e.to_string())
        } else {
            RunError::Failed(format!("image: {e}"))
        }
    }
}

/// What containerd already has for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub config_hash: String,
    pub image_digest: String,
    /// `Some` while a task exists; `running` is false once it exited.
    pub task: Option<super::client::TaskState>,
}

/// A container made ready to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub image_digest: String,
    /// Why fetching the image failed, when it came from the local cache instead.
    pub fetch_failed: Option<String>,
}

/// The per-container operations, all idempotent enough to be retried.
pub trait Runtime: Send + Sync + 'static {
    /// What exists for `id`, if anything.
    fn find(&self, id: &str) -> impl Future<Output = Result<Option<Existing>, RunError>> + Send;
    /// Image, files and container record for `desired`, replacing an old record (whose
    /// task must be gone).
    fn prepare(
        &self,
        desired: &DesiredContainer,
        registries: &RegistryConfig,
    ) -> impl Future<Output = Result<Prepared, RunError>> + Send;
    /// Creates and starts the task; answers its pid.
    fn start(&self, id: &str) -> impl Future<Output = Result<u32, RunError>> + Send;
    /// Waits until the task exits; answers its exit code. The task is left to delete.
    fn wait(&self, id: &str) -> impl Future<Output = Result<i32, RunError>> + Send;
    /// SIGTERM, up to `grace`, then SIGKILL; deletes the task. Answers the exit code if
    /// there was a task.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<Option<i32>, RunError>> + Send;
    /// Deletes the exited task (if any).
    fn delete_task(&self, id: &str) -> impl Future<Output = Result<Option<i32>, RunError>> + Send;
    /// Removes the record, its snapshot and the user-data file of `(kind, name)`.
    fn remove(
        &self,
        kind: ContainerKind,
        name: &str,
    ) -> impl Future<Output = Result<(), RunError>> + Send;
}

/// Host paths and binaries every container needs.
#[derive(Debug, Clone)]
pub struct RuntimePaths {
    /// `<dir>/host-containers/<name>` and `<dir>/bootstrap-containers/<name>`.
    pub persistent_dir: PathBuf,
    /// keeld's API socket, bind-mounted at `/run/api.sock`.
    pub api_socket: PathBuf,
    /// The `apiclient` binary, bind-mounted at `/usr/local/bin/apiclient`.
    pub apiclient: PathBuf,
    /// `keel-logger`, which containerd's shim runs to take each task's stdout/stderr.
    pub logger: PathBuf,
    /// Where the logger keeps `<id>/console.log`.
    pub log_dir: PathBuf,
    /// The copies of `/etc/hosts` and `/etc/resolv.conf` containers mount.
    pub host_files: super::host_files::HostFiles,
}

impl RuntimePaths {
    pub fn persistent_dir_of(&self, kind: ContainerKind, name: &str) -> PathBuf {
        let group = match kind {
            ContainerKind::Host => "host-containers",
            ContainerKind::Bootstrap => "bootstrap-containers",
        };
        self.persistent_dir.join(group).join(name)
    }

    pub fn log_dir_of(&self, id: &str) -> PathBuf {
        self.log_dir.join(id)
    }
}

/// [`Runtime`] on containerd.
#[derive(Debug)]
pub struct ContainerdRuntime {
    pub cd: Containerd,
    pub paths: RuntimePaths,
    /// The image pipeline's entry, with its archive cache.
    images: Images,
}

fn exit_code(status: u32) -> i32 {
    i32::try_from(status).unwrap_or(i32::MAX)
}

impl ContainerdRuntime {
    pub fn new(cd: Containerd, paths: RuntimePaths) -> ContainerdRuntime {
        ContainerdRuntime {
            cd,
            paths,
            images: Images::new(),
        }
    }

    /// Gets `source` ready ahead of time (the boot does this for its bootstrap
    /// containers while it renders); a failure is left for the real start to report.
    pub async fn prefetch(&self, source: &str, registries: &RegistryConfig) {
        let parsed = ImageSource::parse(source);
        if let Err(e) = self.ready_image(&parsed, registries).await {
            tracing::debug!(image = %source, error = %e, "prefetch failed; the start will retry");
        }
    }

    /// The image of `source`, ready to run.
    async fn ready_image(
        &self,
        source: &ImageSource,
        registries: &RegistryConfig,
    ) -> Result<ReadyImage, RunError> {
        Ok(self.images.ensure(&self.cd, source, registries).await?)
    }
}

/// Creates the container's persistent directory and writes (or removes) its
/// `user-data` there. The directory belongs to the container: anything it planted at
/// `user-data` other than a regular file (a FIFO, a device) is refused by name and never
/// opened (`files::read_existing`), so the start fails with that reason.
fn write_files(
    paths: &RuntimePaths,
    kind: ContainerKind,
    name: &str,
    user_data: Option<&[u8]>,
) -> Result<PathBuf, RunError> {
    let dir = paths.persistent_dir_of(kind, name);
    let io =
        |what: &str, e: std::io::Error| RunError::Failed(format!("{what} {}: {e}", dir.display()));
    create_private_dir(&dir).map_err(|e| io("cannot create", e))?;
    let user_data_path = dir.join("user-data");
    match user_data {
        Some(bytes) => {
            crate::apply::files::write_bytes_if_changed(&dir, &user_data_path, bytes, 0o600)
                .map_err(|e| io("cannot write user-data in", e))?;
        }
        None => match std::fs::remove_file(&user_data_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("cannot remove user-data in", e));
            }
            _ => {}
        },
    }
    Ok(dir)
}

/// Creates `dir` and its parents; `dir` itself gets mode 0700 (it may hold secrets).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("exists and is not a directory"));
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl Runtime for ContainerdRuntime {
    async fn find(&self, id: &str) -> Result<Option<Existing>, RunError> {
        let Some(record) = self.cd.container(id).await? else {
            return Ok(None);
        };
        let task = self.cd.task(id).await?;
        Ok(Some(Existing {
            config_hash: record.labels.get(LABEL_CONFIG).cloned().unwrap_or_default(),
            image_digest: record.labels.get(LABEL_DIGEST).cloned().unwrap_or_default(),
            task,
        }))
    }

    async fn prepare(
        &self,
        desired: &DesiredContainer,
        registries: &RegistryConfig,
    ) -> Result<Prepared, RunError> {
        let id = desired.id();
        // Settings that cannot become this container fail it before anything changes.
        let config_hash = desired
            .config_hash()
            .map_err(|e| RunError::Failed(e.to_string()))?;
        // The source is parsed here, once, and handed down the image pipeline.
        let source = ImageSource::parse(&desired.source);
        let image = self.ready_image(&source, registries).await?;
        // File I/O (an fsync on /local) runs off the async workers: a slow disk, or
        // whatever a container planted in its own persistent directory, never stalls
        // the API.
        let persistent = {
            let paths = self.paths.clone();
            let (kind, name, user_data) = (
                desired.kind,
                desired.name.clone(),
                desired.user_data.clone(),
            );
            tokio::task::spawn_blocking(move || {
                write_files(&paths, kind, &name, user_data.as_deref())
            })
            .await
            .map_err(|e| {
                RunError::Failed(format!("writing the persistent directory stopped: {e}"))
            })??
        };
        // One cgroup tree per containerd namespace (`keel/host/<name>` on a host, whose
        // namespace is `keel`): two keelds with containers of the same name (the tests
        // run several side by side) never share a cgroup, where runc's kill of one
        // container's cgroup would take the other's processes with it.
        let cgroup_parent = format!(
            "{}/{}",
            self.cd.namespace(),
            match desired.kind {
                ContainerKind::Host => "host",
                ContainerKind::Bootstrap => "bootstrap",
            }
        );
        // Up to date now, not at the next period: a bootstrap container started right
        // after the boot's first apply sees what it rendered.
        if let Err(e) = self.paths.host_files.sync() {
            tracing::warn!(container = %id, error = %e, "cannot update the copies of /etc/hosts and /etc/resolv.conf; the container gets the last ones");
        }
        let (hosts, resolv_conf) = (
            self.paths.host_files.hosts(),
            self.paths.host_files.resolv_conf(),
        );
        let request = SpecRequest {
            name: &desired.name,
            tier: desired.tier,
            image: &image.config,
            command: desired.command.as_deref(),
            environment: &desired.environment,
            extra_capabilities: &desired.capabilities,
            memory_limit_bytes: desired.memory_limit_bytes,
            limit_swap: spec::host_limits_swap(),
            cpu_limit_millicores: desired.cpu_limit_millicores,
            persistent_dir: &persistent,
            api_socket: &self.paths.api_socket,
            apiclient: &self.paths.apiclient,
            hosts: &hosts,
            resolv_conf: &resolv_conf,
            cgroup_parent: &cgroup_parent,
            mount_host_modules: Path::new("/lib/modules").is_dir(),
            host_capabilities: spec::host_capabilities(),
        };
        let spec = spec::build(&request).map_err(|e| RunError::Failed(format!("spec: {e}")))?;

        // A stale record (older settings, or left by a crash) goes first; its task is
        // gone (the caller stopped it).
        self.cd.delete_container(&id).await?;
        remove_snapshot(&self.cd, &id).await;

        // The record first, then its snapshot: the record references the snapshot key,
        // so containerd's garbage collector keeps the snapshot from its creation on,
        // without a lease.
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_KIND.to_owned(), desired.kind.as_str().to_owned()),
            (LABEL_NAME.to_owned(), desired.name.clone()),
            (LABEL_CONFIG.to_owned(), config_hash),
            (LABEL_DIGEST.to_owned(), image.manifest_digest.clone()),
        ]);
        self.cd
            .create_container(&id, &image.name, &spec, &id, labels)
            .await?;
        let prepared = self
            .cd
            .snapshots()
            .prepare(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.to_owned(),
                key: id.clone(),
                parent: image.chain_id.clone(),
                labels: HashMap::new(),
            })
            .await
            .during("prepare snapshot", &id);
        if let Err(e) = prepared {
            let _ = self.cd.delete_container(&id).await;
            // The unpacked image may have been removed behind keeld's back: import
            // it again next time.
            self.images.forget(&source);
            return Err(e.into());
        }
        Ok(Prepared {
            image_digest: image.manifest_digest,
            fetch_failed: image.fetch_failed,
        })
    }

    async fn start(&self, id: &str) -> Result<u32, RunError> {
        // A task left from an earlier start (exited, or created but never started
        // because keeld died in between) would make create fail. One still running
        // (the caller normally stopped it) is killed first.
        match self.cd.delete_task(id).await {
            Err(e) if e.code() == containerd_client::tonic::Code::FailedPrecondition => {
                self.cd.kill_task(id, libc::SIGKILL).await?;
                let _ = tokio::time::timeout(Duration::from_secs(10), self.cd.wait_task(id)).await;
                self.cd.delete_task(id).await?;
            }
            other => {
                other?;
            }
        }
        let mounts = self
            .cd
            .snapshots()
            .mounts(MountsRequest {
                snapshotter: SNAPSHOTTER.to_owned(),
                key: id.to_owned(),
            })
            .await
            .during("get mounts of", id)?
            .mounts;
        let log_dir = self.paths.log_dir_of(id);
        std::fs::create_dir_all(&log_dir).map_err(|e| {
            RunError::Failed(format!(
                "cannot create log directory {}: {e}",
                log_dir.display()
            ))
        })?;
        let stdio = logger_uri(&self.paths.logger, &log_dir);
        self.cd.create_task(id, mounts, &stdio, &stdio).await?;
        match self.cd.start_task(id).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                // Leave nothing half-made behind for the next attempt.
                let _ = self.cd.delete_task(id).await;
                Err(e.into())
            }
        }
    }

    async fn wait(&self, id: &str) -> Result<i32, RunError> {
        Ok(exit_code(self.cd.wait_task(id).await?))
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<Option<i32>, RunError> {
        match self.cd.task(id).await? {
            None => return Ok(None),
            Some(t) if t.running => {
                self.cd.kill_task(id, libc::SIGTERM).await?;
                let waited = tokio::time::timeout(grace, self.cd.wait_task(id)).await;
                if !matches!(waited, Ok(Ok(_))) {
                    tracing::info!(container = %id, grace = ?grace, "did not stop within the grace period; killing");
                    self.cd.kill_task(id, libc::SIGKILL).await?;
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), self.cd.wait_task(id)).await;
                }
            }
            Some(_) => {}
        }
        Ok(self.cd.delete_task(id).await?.map(exit_code))
    }

    async fn delete_task(&self, id: &str) -> Result<Option<i32>, RunError> {
        Ok(self.cd.delete_task(id).await?.map(exit_code))
    }

    async fn remove(&self, kind: ContainerKind, name: &str) -> Result<(), RunError> {
        let id = super::desired::container_id(kind, name);
        // Usually the task is gone already; one still running is killed first.
        match self.cd.delete_task(&id).await {
            Err(e) if e.code() == containerd_client::tonic::Code::FailedPrecondition => {
                self.stop(&id, Duration::from_secs(0)).await?;
            }
            other => {
                other?;
            }
        }
        self.cd.delete_container(&id).await?;
        remove_snapshot(&self.cd, &id).await;
        // Removed durably (its directory fsync'd): it may hold secrets, and a removed
        // container's user-data must not come back on a power cut.
        let user_data = self.paths.persistent_dir_of(kind, name).join("user-data");
        crate::updates::durable::remove(&user_data)
            .map(drop)
            .map_err(|e| RunError::Failed(format!("cannot remove {}: {e}", user_data.display())))
    }
}

/// containerd's "binary" stdio scheme: the shim starts `logger` with the task's stdout
/// and stderr as fds 3 and 4, and the query as arguments (`dir <log dir>`).
pub fn logger_uri(logger: &Path, log_dir: &Path) -> String {
    let encode = |p: &Path| {
        percent_encoding::utf8_percent_encode(
            &p.to_string_lossy(),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string()
        .replace("%2F", "/")
    };
    format!("binary://{}?dir={}", encode(logger), encode(log_dir))
}
