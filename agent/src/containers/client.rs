//! The containerd connection: one lazily connected gRPC channel over containerd's Unix
//! socket, and typed calls for the handful of services keeld uses.
//!
//! Every request carries the `containerd-namespace` metadata (containerd refuses
//! requests without it) and, inside an image import, the `containerd-lease` metadata
//! that keeps half-written content from being garbage-collected.
//!
//! The channel connects on first use and reconnects by itself after containerd
//! restarts; a call made while containerd is down fails with `Unavailable`, which the
//! supervisor treats as "retry later", not as the container's failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::{
    container::Runtime, containers_client::ContainersClient, content_client::ContentClient,
    diff_client::DiffClient, images_client::ImagesClient, leases_client::LeasesClient,
    snapshots::snapshots_client::SnapshotsClient, tasks_client::TasksClient, AddResourceRequest,
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, GetContainerRequest, GetImageRequest, Image, KillRequest,
    ListContainersRequest, ListTasksRequest, Resource, StartRequest, WaitRequest,
};
use containerd_client::tonic::{
    self,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Channel, Endpoint},
    Code, Request, Status,
};
use containerd_client::types::Mount;

/// The snapshotter keeld unpacks images into and takes root filesystems from.
pub const SNAPSHOTTER: &str = "overlayfs";
/// The shim every keeld container runs under.
pub const RUNTIME: &str = "io.containerd.runc.v2";
/// The type URL containerd expects on a container's OCI spec.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// A failed containerd call: which operation, on what, and containerd's status.
#[derive(Debug, thiserror::Error)]
#[error("containerd {op} {subject}: {}", status.message())]
pub struct ContainerdError {
    pub op: &'static str,
    pub subject: String,
    pub status: Status,
}

impl ContainerdError {
    pub fn code(&self) -> Code {
        self.status.code()
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Code::NotFound
    }

    pub fn is_already_exists(&self) -> bool {
        self.code() == Code::AlreadyExists
    }

    /// containerd is down or restarting: worth retrying, not the container's fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::Cancelled)
            || (self.code() == Code::Unknown && self.status.message().contains("transport"))
    }
}

/// Shorthand for wrapping a tonic result.
pub(crate) trait Call<T> {
    fn during(self, op: &'static str, subject: impl Into<String>) -> Result<T, ContainerdError>;
}

impl<T> Call<T> for Result<tonic::Response<T>, Status> {
    fn during(self, op: &'static str, subject: impl Into<String>) -> Result<T, ContainerdError> {
        self.map(tonic::Response::into_inner)
            .map_err(|status| ContainerdError {
                op,
                subject: subject.into(),
                status,
            })
    }
}

/// What [`Containerd::hold`] adds to a lease: a blob by digest, or a snapshot of keeld's
/// snapshotter by key.
#[derive(Debug, Clone, Copy)]
pub enum Held<'a> {
    Content(&'a str),
    Snapshot(&'a str),
}

/// Adds the namespace (and lease, when there is one) to every request.
#[derive(Clone)]
pub struct Metadata {
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Interceptor for Metadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let md = request.metadata_mut();
        md.insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            md.insert("containerd-lease", lease.clone());
        }
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, Metadata>;

/// A handle on containerd; cheap to clone (the channel is shared).
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    metadata: Metadata,
    socket: PathBuf,
    namespace: String,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// What `Containerd::connect` refuses.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("containerd namespace {0:?} is not valid (letters, digits, '.', '_', '-')")]
    Namespace(String),
}

impl Containerd {
    /// A handle that connects on first use and reconnects after containerd restarts.
    pub fn connect(socket: &Path, namespace: &str) -> Result<Containerd, ConnectError> {
        let valid = !namespace.is_empty()
            && namespace.len() <= 76
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        let ns_value: AsciiMetadataValue = match (valid, MetadataValue::try_from(namespace)) {
            (true, Ok(v)) => v,
            _ => return Err(ConnectError::Namespace(namespace.to_owned())),
        };
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://containerd.sock")
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        Ok(Containerd {
            channel,
            metadata: Metadata {
                namespace: ns_value,
                lease: None,
            },
            socket: socket.to_path_buf(),
            namespace: namespace.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The same connection, with every request made inside lease `id`. An id that
    /// cannot be sent as gRPC metadata is an error: without the lease, containerd's
    /// garbage collector could remove content while it is being written.
    pub fn with_lease(&self, id: &str) -> Result<Containerd, ContainerdError> {
        let lease = MetadataValue::try_from(id).map_err(|_| ContainerdError {
            op: "use lease",
            subject: id.to_owned(),
            status: Status::invalid_argument("the lease id is not printable ASCII"),
        })?;
        let mut other = self.clone();
        other.metadata.lease = Some(lease);
        Ok(other)
    }

    /// Adds `resource`, found already in containerd, to this handle's lease. What made
    /// it (another pull, under its own lease) may fail and release that lease, and the
    /// garbage collector would then take the blob or snapshot this pull skipped because
    /// it was there. Nothing to do without a lease.
    pub async fn hold(&self, resource: Held<'_>) -> Result<(), ContainerdError> {
        let Some(lease) = self.metadata.lease.as_ref().and_then(|l| l.to_str().ok()) else {
            return Ok(());
        };
        let (id, kind) = match resource {
            Held::Content(digest) => (digest, "content".to_owned()),
            Held::Snapshot(key) => (key, format!("snapshots/{SNAPSHOTTER}")),
        };
        self.leases()
            .add_resource(AddResourceRequest {
                id: lease.to_owned(),
                resource: Some(Resource {
                    id: id.to_owned(),
                    r#type: kind,
                }),
            })
            .await
            .during("hold in lease", id)?;
        Ok(())
    }

    pub(crate) fn containers(&self) -> ContainersClient<Svc> {
        ContainersClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    pub(crate) fn tasks(&self) -> TasksClient<Svc> {
        TasksClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    pub(crate) fn content(&self) -> ContentClient<Svc> {
        ContentClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(64 << 20)
    }

    pub(crate) fn images(&self) -> ImagesClient<Svc> {
        ImagesClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    pub(crate) fn snapshots(&self) -> SnapshotsClient<Svc> {
        SnapshotsClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    pub(crate) fn diff(&self) -> DiffClient<Svc> {
        DiffClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    pub(crate) fn leases(&self) -> LeasesClient<Svc> {
        LeasesClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The image record `name`, or `None` when containerd has none.
    pub async fn image(&self, name: &str) -> Result<Option<Image>, ContainerdError> {
        let got = self
            .images()
            .get(GetImageRequest {
                name: name.to_owned(),
            })
            .await
            .during("get image", name);
        match got {
            Ok(r) => Ok(r.image),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The container record `id`, or `None`.
    pub async fn container(&self, id: &str) -> Result<Option<Container>, ContainerdError> {
        let got = self
            .containers()
            .get(GetContainerRequest { id: id.to_owned() })
            .await
            .during("get container", id);
        match got {
            Ok(r) => Ok(r.container),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every container record in the namespace carrying `label=value`.
    pub async fn containers_labelled(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<Container>, ContainerdError> {
        let filter = format!("labels.\"{label}\"=={value}");
        Ok(self
            .containers()
            .list(ListContainersRequest {
                filters: vec![filter],
            })
            .await
            .during("list containers", label)?
            .containers)
    }

    /// Creates a container record running `spec` (the OCI runtime spec, sent as its
    /// JSON) on snapshot `snapshot_key`.
    pub async fn create_container(
        &self,
        id: &str,
        image: &str,
        spec: &oci_spec::runtime::Spec,
        snapshot_key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        // Never an empty spec: containerd would store a container that cannot run.
        let spec = serde_json::to_vec(spec).map_err(|e| ContainerdError {
            op: "encode the OCI spec of",
            subject: id.to_owned(),
            status: Status::invalid_argument(e.to_string()),
        })?;
        let container = Container {
            id: id.to_owned(),
            labels,
            image: image.to_owned(),
            runtime: Some(Runtime {
                name: RUNTIME.to_owned(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.to_owned(),
                value: spec,
            }),
            snapshotter: SNAPSHOTTER.to_owned(),
            snapshot_key: snapshot_key.to_owned(),
            ..Default::default()
        };
        self.containers()
            .create(CreateContainerRequest {
                container: Some(container),
            })
            .await
            .during("create container", id)
            .map(drop)
    }

    /// Deletes container record `id`; absent is fine.
    pub async fn delete_container(&self, id: &str) -> Result<(), ContainerdError> {
        match self
            .containers()
            .delete(DeleteContainerRequest { id: id.to_owned() })
            .await
            .during("delete container", id)
        {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Creates the task of container `id` with `rootfs` and the given stdio URIs; answers
    /// its pid.
    pub async fn create_task(
        &self,
        id: &str,
        rootfs: Vec<Mount>,
        stdout: &str,
        stderr: &str,
    ) -> Result<u32, ContainerdError> {
        Ok(self
            .tasks()
            .create(CreateTaskRequest {
                container_id: id.to_owned(),
                rootfs,
                stdout: stdout.to_owned(),
                stderr: stderr.to_owned(),
                ..Default::default()
            })
            .await
            .during("create task", id)?
            .pid)
    }

    pub async fn start_task(&self, id: &str) -> Result<u32, ContainerdError> {
        Ok(self
            .tasks()
            .start(StartRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            })
            .await
            .during("start task", id)?
            .pid)
    }

    /// Waits for task `id` to exit; answers its exit status.
    pub async fn wait_task(&self, id: &str) -> Result<u32, ContainerdError> {
        Ok(self
            .tasks()
            .wait(WaitRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            })
            .await
            .during("wait for task", id)?
            .exit_status)
    }

    /// Sends `signal` to every process of task `id`; a task that is gone is fine.
    pub async fn kill_task(&self, id: &str, signal: i32) -> Result<(), ContainerdError> {
        match self
            .tasks()
            .kill(KillRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal: u32::try_from(signal).unwrap_or(9),
                all: true,
            })
            .await
            .during("kill task", id)
        {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes task `id` (it must have exited); absent is fine. Answers the exit status
    /// when there was a task.
    pub async fn delete_task(&self, id: &str) -> Result<Option<u32>, ContainerdError> {
        match self
            .tasks()
            .delete(DeleteTaskRequest {
                container_id: id.to_owned(),
            })
            .await
            .during("delete task", id)
        {
            Ok(r) => Ok(Some(r.exit_status)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The task of container `id`: `(pid, running)`, or `None` when it has no task.
    pub async fn task(&self, id: &str) -> Result<Option<TaskState>, ContainerdError> {
        use containerd_client::types::v1::Status;
        let listed = self
            .tasks()
            .list(ListTasksRequest {
                filter: String::new(),
            })
            .await
            .during("list tasks", id)?;
        Ok(listed
            .tasks
            .into_iter()
            .find(|t| t.container_id == id || (t.id == id && t.container_id.is_empty()))
            .map(|t| TaskState {
                pid: t.pid,
                // Created, running or paused: not exited. Stopped: its exit status is
                // final. Unknown (its shim does not answer): neither, said apart.
                running: [
                    Status::Created,
                    Status::Running,
                    Status::Paused,
                    Status::Pausing,
                ]
                .iter()
                .any(|s| t.status == *s as i32),
                unknown: t.status == Status::Unknown as i32,
                created_only: t.status == containerd_client::types::v1::Status::Created as i32,
                exit_status: t.exit_status,
            }))
    }
}

/// What containerd knows of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskState {
    pub pid: u32,
    /// Not yet exited: created, running or paused.
    pub running: bool,
    /// containerd cannot say (its shim does not answer): not running, and its exit
    /// status means nothing.
    pub unknown: bool,
    /// Created but never started (keeld died between create and start).
    pub created_only: bool,
    pub exit_status: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lease_id_that_cannot_be_sent_is_an_error_not_a_missing_lease() {
        let cd = Containerd::connect(Path::new("/nonexistent/containerd.sock"), "keel-test")
            .expect("connecting is lazy");
        assert!(cd.with_lease("keel-0123456789abcdef").is_ok());
        let err = cd
            .with_lease("keel\nlease")
            .expect_err("a newline is not metadata");
        assert!(!err.is_unavailable(), "{err}");
    }
}
