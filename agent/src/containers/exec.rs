//! Exec: a process started in a running host container through containerd's task Exec,
//! behind [`ExecEngine`] / [`ExecProcess`] so that the API's session logic can run
//! against a fake in unit tests; [`ContainerdExec`] is the real thing.
//!
//! Owns: finding the target (a *running host* container; a bootstrap container, an
//! unknown name or a stopped container is refused with a typed error), the exec
//! process's spec, the stdio FIFOs, and removing the process and its FIFOs on every
//! path. Must not speak the WebSocket protocol (that is `api/exec.rs`).
//!
//! What the process gets: the target container's own OCI process spec (user, groups,
//! environment, working directory, capabilities, `no_new_privileges`, rlimits, AppArmor
//! and SELinux labels) with only `args` replaced, `terminal` and `consoleSize` set, and
//! `TERM=xterm` added to the environment with a terminal when the container has no
//! `TERM`. runc runs it in the container's namespaces and cgroup under the container's
//! seccomp filter. Exec therefore never grants more than the container has.
//!
//! containerd takes an exec's stdio as paths the shim opens: FIFOs created here, under
//! `<runtime dir>/exec/<container id>.<exec id>/` (directory 0700, FIFOs 0600). keeld
//! opens stdout and stderr read-only and non-blocking before the exec exists, and reads
//! them only once the process started (the shim holds their write ends from then until
//! the output is drained: until then a read would see end-of-file). stdin it opens only
//! after Start, write-only and non-blocking, retrying while the open fails with `ENXIO`
//! (no reader yet): the shim opens its reader lazily, in a goroutine that may run after
//! Start answered. Holding stdin read-write from before the exec (which never waits)
//! lost input: keeld could write, close and call CloseIO before that reader existed,
//! and with no one holding the FIFO open the kernel dropped the data and the shim's
//! reader waited for ever for a writer (the process never saw end-of-file). The shim
//! also holds a write end of stdin of its own, so the process sees end-of-file on stdin
//! only after keeld closed its end *and* called CloseIO. A directory left by a keeld
//! that died is found at the next start by [`sweep_leftovers`], which kills that
//! process and removes it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, KillRequest, ResizePtyRequest,
    StartRequest, WaitRequest,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::client::{Call, Containerd, ContainerdError};
use super::desired::container_id;
use super::status::{ContainerKind, RunState, StatusBoard};

/// The type URL containerd's shim expects on an exec's process spec.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// How long a process whose client went away has to exit after SIGTERM before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long the shim may take, after Start, to open its reading end of the stdin FIFO.
const STDIN_READER_WAIT: Duration = Duration::from_secs(10);

/// Bound on each containerd call of the clean-up (wait after SIGKILL, delete).
const CLEANUP_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts to remove an exec process containerd could not remove (it is
/// down, or the shim is stuck): doubles from the first to the last.
const RETIRE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(8));

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// A host container's name.
    pub target: String,
    /// The command and its arguments; never empty.
    pub args: Vec<String>,
    /// Run it in a terminal (a pseudo-terminal the shim creates).
    pub tty: bool,
    /// The terminal's initial size, when the client knows it.
    pub size: Option<WindowSize>,
}

/// A terminal's size in characters; both non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// Why an exec could not start or be steered.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("no host container named {0:?}")]
    UnknownTarget(String),
    #[error("{0:?} is a bootstrap container; exec runs only in host containers")]
    BootstrapTarget(String),
    #[error("host container {name:?} is not running ({state})")]
    NotRunning { name: String, state: String },
    #[error("{0}")]
    Invalid(String),
    /// The runtime could not start the command (not found, not executable).
    #[error("cannot start the command: {0}")]
    CannotStart(String),
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the container's OCI spec cannot be used: {0}")]
    Spec(String),
}

/// An exec's stdio, keeld's ends.
pub struct ExecIo {
    /// Written to the process's stdin.
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    /// The process's stdout (with a terminal: everything the terminal shows).
    pub stdout: Pin<Box<dyn AsyncRead + Send>>,
    /// The process's stderr; `None` with a terminal.
    pub stderr: Option<Pin<Box<dyn AsyncRead + Send>>>,
}

impl std::fmt::Debug for ExecIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo")
            .field("stderr", &self.stderr.is_some())
            .finish_non_exhaustive()
    }
}

/// Starts exec processes.
pub trait ExecEngine: Send + Sync + 'static {
    type Process: ExecProcess;
    /// Starts `request`'s command in its target; answers the process and its stdio.
    fn start(
        &self,
        request: &ExecRequest,
    ) -> impl Future<Output = Result<(Self::Process, ExecIo), ExecError>> + Send;
}

/// One started exec process.
pub trait ExecProcess: Send + Sync + 'static {
    /// containerd's exec id, for logs.
    fn id(&self) -> &str;
    fn resize(&self, size: WindowSize) -> impl Future<Output = Result<(), ExecError>> + Send;
    fn signal(&self, signal: i32) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// Called once keeld closed its end of stdin: the process sees end-of-file after
    /// what was written.
    fn close_stdin(&self) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// Waits for the process to exit; answers its exit status (128 + n when signal n
    /// ended it).
    fn wait(&self) -> impl Future<Output = Result<u32, ExecError>> + Send;
    /// Kills the process unless it `exited` (SIGTERM, [`KILL_GRACE`], SIGKILL), removes
    /// it from containerd and its FIFOs from disk. Never fails: what it cannot do (e.g.
    /// containerd is down) is logged and retried in the background until containerd has
    /// forgotten the process; only then do its FIFOs go, so a keeld that stops meanwhile
    /// leaves them for [`sweep_leftovers`] at its next start. The caller keeps
    /// reading stdout and stderr meanwhile (the shim drains them before it forgets the
    /// process).
    fn remove(&self, exited: bool) -> impl Future<Output = ()> + Send;
}

/// [`ExecEngine`] on containerd.
#[derive(Debug, Clone)]
pub struct ContainerdExec {
    cd: Containerd,
    board: StatusBoard,
    /// `<runtime dir>/exec`.
    dir: PathBuf,
}

impl ContainerdExec {
    pub fn new(cd: Containerd, board: StatusBoard, runtime_dir: &Path) -> Self {
        ContainerdExec {
            cd,
            board,
            dir: runtime_dir.join("exec"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The containerd id of the running host container `name`, or why there is none.
    async fn running_target(&self, name: &str) -> Result<String, ExecError> {
        if settings_model::types::Identifier::new(name).is_err() {
            return Err(ExecError::UnknownTarget(name.to_owned()));
        }
        let Some(status) = self.board.get(ContainerKind::Host, name) else {
            return Err(match self.board.get(ContainerKind::Bootstrap, name) {
                Some(_) => ExecError::BootstrapTarget(name.to_owned()),
                None => ExecError::UnknownTarget(name.to_owned()),
            });
        };
        let not_running = |state: String| ExecError::NotRunning {
            name: name.to_owned(),
            state,
        };
        if status.state != RunState::Running {
            let state = serde_json::to_value(status.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(not_running(match status.reason {
                Some(reason) => format!("{state}: {reason}"),
                None => state,
            }));
        }
        let id = container_id(ContainerKind::Host, name);
        match self.cd.task(&id).await? {
            Some(task) if task.running && !task.created_only => Ok(id),
            _ => Err(not_running("its task is not running".to_owned())),
        }
    }

    /// The exec's process spec: the container's own, with `request`'s command.
    async fn process_spec(
        &self,
        id: &str,
        request: &ExecRequest,
    ) -> Result<prost_types::Any, ExecError> {
        let record = self
            .cd
            .container(id)
            .await?
            .ok_or_else(|| ExecError::NotRunning {
                name: request.target.clone(),
                state: "its container record is gone".to_owned(),
            })?;
        let spec = record
            .spec
            .ok_or_else(|| ExecError::Spec("the record has none".to_owned()))?;
        let spec: oci_spec::runtime::Spec =
            serde_json::from_slice(&spec.value).map_err(|e| ExecError::Spec(e.to_string()))?;
        let process = exec_process(&spec, request)?;
        let value = serde_json::to_vec(&process).map_err(|e| ExecError::Spec(e.to_string()))?;
        Ok(prost_types::Any {
            type_url: PROCESS_TYPE_URL.to_owned(),
            value,
        })
    }
}

/// The container's process with `request`'s command and terminal; everything that
/// bounds what the process may do is kept as it is.
pub fn exec_process(
    spec: &oci_spec::runtime::Spec,
    request: &ExecRequest,
) -> Result<oci_spec::runtime::Process, ExecError> {
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| ExecError::Spec("it has no process".to_owned()))?;
    process.set_args(Some(request.args.clone()));
    process.set_command_line(None);
    process.set_terminal(Some(request.tty));
    process.set_console_size(None);
    if request.tty {
        if let Some(size) = request.size {
            let console = oci_spec::runtime::BoxBuilder::default()
                .height(u64::from(size.rows))
                .width(u64::from(size.cols))
                .build()
                .map_err(|e| ExecError::Spec(e.to_string()))?;
            process.set_console_size(Some(console));
        }
        {
            let env = process.env().clone().unwrap_or_default();
            if !env.iter().any(|v| v.starts_with("TERM=")) {
                let mut env = env;
                env.push("TERM=xterm".to_owned());
                process.set_env(Some(env));
            }
        }
    }
    Ok(process)
}

/// The part of runc's message that says why the command did not start (`exec:
/// "/x": stat /x: no such file or directory`), or the whole message.
fn runtime_reason(message: &str) -> String {
    match message.rfind("exec: ") {
        Some(at) => message[at..].trim_end().to_owned(),
        None => message.trim_end().to_owned(),
    }
}

/// A fresh exec id: `keel-exec-` and 16 hex digits.
fn new_exec_id() -> String {
    format!("keel-exec-{:016x}", rand::random::<u64>())
}

impl ExecEngine for ContainerdExec {
    type Process = ContainerdExecProcess;

    async fn start(
        &self,
        request: &ExecRequest,
    ) -> Result<(ContainerdExecProcess, ExecIo), ExecError> {
        if request.args.is_empty() || request.args[0].is_empty() {
            return Err(ExecError::Invalid("the command is empty".to_owned()));
        }
        let container = self.running_target(&request.target).await?;
        let spec = self.process_spec(&container, request).await?;
        let exec_id = new_exec_id();
        let fifo_dir = self.dir.join(format!("{container}.{exec_id}"));
        let process = ContainerdExecProcess {
            cd: self.cd.clone(),
            container,
            exec_id,
            fifo_dir,
        };
        let tty = request.tty;
        // From here on, every failure removes what was made.
        match process.create(spec, tty).await {
            Ok(io) => {
                if let (true, Some(size)) = (tty, request.size) {
                    // runc applies consoleSize; a resize now also covers runtimes that
                    // do not.
                    if let Err(e) = process.resize(size).await {
                        tracing::debug!(exec = %process.exec_id, error = %e, "initial terminal size not set");
                    }
                }
                Ok((process, io))
            }
            Err(e) => {
                process.remove_created().await;
                Err(e)
            }
        }
    }
}

/// An exec process on containerd.
#[derive(Debug, Clone)]
pub struct ContainerdExecProcess {
    cd: Containerd,
    container: String,
    exec_id: String,
    fifo_dir: PathBuf,
}

impl ContainerdExecProcess {
    /// FIFOs, keeld's ends, the exec and its start.
    async fn create(&self, spec: prost_types::Any, tty: bool) -> Result<ExecIo, ExecError> {
        let dir = self.fifo_dir.clone();
        tokio::task::spawn_blocking(move || make_fifos(&dir, tty))
            .await
            .map_err(|e| ExecError::Io {
                what: "creating FIFOs in",
                path: self.fifo_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
        let path = |name: &str| self.fifo_dir.join(name);
        let io_err = |what, name: &str| {
            let path = path(name);
            move |source| ExecError::Io { what, path, source }
        };
        // Non-blocking opens of FIFOs on the runtime directory's tmpfs: nothing here
        // waits for another process.
        let stdout = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(path("stdout"))
            .map_err(io_err("opening", "stdout"))?;
        let stderr = match tty {
            true => None,
            false => Some(
                tokio::net::unix::pipe::OpenOptions::new()
                    .open_receiver(path("stderr"))
                    .map_err(io_err("opening", "stderr"))?,
            ),
        };
        let text = |name: &str| path(name).display().to_string();
        self.cd
            .tasks()
            .exec(ExecProcessRequest {
                container_id: self.container.clone(),
                stdin: text("stdin"),
                stdout: text("stdout"),
                stderr: if tty { String::new() } else { text("stderr") },
                terminal: tty,
                spec: Some(spec),
                exec_id: self.exec_id.clone(),
            })
            .await
            .during("exec in", &self.container)?;
        let started = self
            .cd
            .tasks()
            .start(StartRequest {
                container_id: self.container.clone(),
                exec_id: self.exec_id.clone(),
            })
            .await
            .during("start exec in", &self.container);
        if let Err(e) = started {
            if e.is_unavailable() {
                return Err(e.into());
            }
            return Err(ExecError::CannotStart(runtime_reason(e.status.message())));
        }
        let stdin = match open_stdin(&path("stdin")).await {
            Ok(stdin) => stdin,
            Err(e) => {
                // The process runs: it ends here, so that the caller's delete succeeds.
                if let Err(e) = self.kill(libc::SIGKILL).await {
                    tracing::debug!(exec = %self.exec_id, error = %e, "cannot kill an exec process");
                }
                let _ = tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.wait()).await;
                return Err(io_err("opening", "stdin")(e));
            }
        };
        tracing::info!(container = %self.container, exec = %self.exec_id, tty, "exec started");
        Ok(ExecIo {
            stdin: Box::pin(stdin),
            stdout: Box::pin(stdout),
            stderr: stderr.map(|r| Box::pin(r) as Pin<Box<dyn AsyncRead + Send>>),
        })
    }

    /// What a failed start leaves: the process record (if the exec was created) and
    /// the FIFOs. A delete that fails (containerd went away mid-start, or the process
    /// started after all and its answer was lost) keeps the FIFO directory, which is what
    /// finds the process again, and hands the process to [`Self::retire`], as
    /// [`ExecProcess::remove`] does: nothing is left running unknown to keeld.
    async fn remove_created(&self) {
        match self.delete_process().await {
            Ok(()) => self.remove_fifos().await,
            Err(e) => {
                tracing::warn!(exec = %self.exec_id, error = %e, "cannot delete an exec process that failed to start; retrying in the background");
                tokio::spawn(self.clone().retire());
            }
        }
    }

    async fn delete_process(&self) -> Result<(), ContainerdError> {
        match self
            .cd
            .tasks()
            .delete_process(DeleteProcessRequest {
                container_id: self.container.clone(),
                exec_id: self.exec_id.clone(),
            })
            .await
            .during("delete exec process in", &self.container)
        {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    async fn kill(&self, signal: i32) -> Result<(), ContainerdError> {
        match self
            .cd
            .tasks()
            .kill(KillRequest {
                container_id: self.container.clone(),
                exec_id: self.exec_id.clone(),
                signal: u32::try_from(signal).unwrap_or(9),
                all: false,
            })
            .await
            .during("signal exec process in", &self.container)
        {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    async fn remove_fifos(&self) {
        let dir = self.fifo_dir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => {
                tracing::warn!(dir = %self.fifo_dir.display(), result = ?other, "cannot remove an exec's FIFOs")
            }
        }
    }
}

impl ExecProcess for ContainerdExecProcess {
    fn id(&self) -> &str {
        &self.exec_id
    }

    async fn resize(&self, size: WindowSize) -> Result<(), ExecError> {
        self.cd
            .tasks()
            .resize_pty(ResizePtyRequest {
                container_id: self.container.clone(),
                exec_id: self.exec_id.clone(),
                width: u32::from(size.cols),
                height: u32::from(size.rows),
            })
            .await
            .during("resize the terminal of exec in", &self.container)?;
        Ok(())
    }

    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        Ok(self.kill(signal).await?)
    }

    async fn close_stdin(&self) -> Result<(), ExecError> {
        self.cd
            .tasks()
            .close_io(CloseIoRequest {
                container_id: self.container.clone(),
                exec_id: self.exec_id.clone(),
                stdin: true,
            })
            .await
            .during("close stdin of exec in", &self.container)?;
        Ok(())
    }

    async fn wait(&self) -> Result<u32, ExecError> {
        Ok(self
            .cd
            .tasks()
            .wait(WaitRequest {
                container_id: self.container.clone(),
                exec_id: self.exec_id.clone(),
            })
            .await
            .during("wait for exec in", &self.container)?
            .exit_status)
    }

    async fn remove(&self, exited: bool) {
        tracing::debug!(exec = %self.exec_id, exited, "removing an exec process");
        if !exited {
            let log = |e: ContainerdError| tracing::warn!(exec = %self.exec_id, error = %e, "cannot kill an exec process");
            if let Err(e) = self.kill(libc::SIGTERM).await {
                log(e);
            }
            let waited = tokio::time::timeout(KILL_GRACE, self.wait()).await;
            if !matches!(waited, Ok(Ok(_))) {
                if let Err(e) = self.kill(libc::SIGKILL).await {
                    log(e);
                }
                let _ = tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.wait()).await;
            }
            tracing::info!(container = %self.container, exec = %self.exec_id, "exec process killed: its client went away");
        }
        match tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.delete_process()).await {
            Ok(Ok(())) => self.remove_fifos().await,
            failed => {
                match failed {
                    Ok(Err(e)) => {
                        tracing::warn!(exec = %self.exec_id, error = %e, "cannot delete an exec process; retrying in the background")
                    }
                    _ => {
                        tracing::warn!(exec = %self.exec_id, "deleting an exec process takes too long (a child of it may hold its output open); retrying in the background")
                    }
                }
                // The FIFO directory stays until containerd forgot the process: it is
                // what finds the process again, here or at keeld's next start.
                tokio::spawn(self.clone().retire());
            }
        }
    }
}

impl ContainerdExecProcess {
    /// SIGKILL, a bounded wait, and the delete, with the output FIFOs drained meanwhile
    /// (nobody reads them any more: full, they would keep the shim from finishing).
    /// Answers whether containerd has forgotten the process.
    async fn kill_and_delete(&self) -> bool {
        if let Err(e) = self.kill(libc::SIGKILL).await {
            tracing::debug!(exec = %self.exec_id, error = %e, "cannot kill an exec process");
        }
        let _ = tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.wait()).await;
        let drain = drain_fifos(self.fifo_dir.clone());
        let deleted = tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.delete_process()).await;
        drain.abort();
        matches!(deleted, Ok(Ok(())))
    }

    /// Kills and deletes the process until containerd answers that it is gone, then
    /// removes its FIFOs. Runs until then or until keeld stops (the directory is then
    /// left for [`sweep_leftovers`]).
    async fn retire(self) {
        let mut pause = RETIRE_BACKOFF.0;
        loop {
            tokio::time::sleep(pause).await;
            if self.kill_and_delete().await {
                self.remove_fifos().await;
                tracing::info!(container = %self.container, exec = %self.exec_id, "exec process removed after containerd answered again");
                return;
            }
            pause = (pause * 2).min(RETIRE_BACKOFF.1);
        }
    }
}

/// Opens keeld's end of a started exec's stdin FIFO: write-only and non-blocking, which
/// succeeds only once the shim's reader is there (open or waiting in open), so input
/// written and closed at once is never dropped (see the module header). The shim opens
/// its reader right after Start; [`STDIN_READER_WAIT`] bounds a shim that never does.
async fn open_stdin(path: &Path) -> std::io::Result<tokio::net::unix::pipe::Sender> {
    let deadline = tokio::time::Instant::now() + STDIN_READER_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        match tokio::net::unix::pipe::OpenOptions::new().open_sender(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the shim did not open its end within {} s",
                            STDIN_READER_WAIT.as_secs()
                        ),
                    ));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            opened => return opened,
        }
    }
}

/// Creates `dir` (0700, and `exec/` above it) with the FIFOs `stdin`, `stdout` and,
/// without a terminal, `stderr` (0600).
fn make_fifos(dir: &Path, tty: bool) -> Result<(), ExecError> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| ExecError::Io { what, path, source }
    };
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io("creating", parent))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io("creating", dir))?;
    let names: &[&str] = if tty {
        &["stdin", "stdout"]
    } else {
        &["stdin", "stdout", "stderr"]
    };
    for name in names {
        let path = dir.join(name);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(|e| ExecError::Io {
            what: "creating the FIFO",
            path: path.clone(),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// The exec sessions a keeld that stopped without cleaning up (a crash, SIGKILL) left
/// in `dir` (`<runtime dir>/exec`), one `<container id>.<exec id>` directory each.
/// Read before the API serves, so that no session of this keeld is among them.
pub fn leftovers(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.contains('.'))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the exec sessions of an earlier keeld");
            Vec::new()
        }
    }
}

/// Removes the exec processes named by [`leftovers`]: each one still known to
/// containerd is killed and deleted, and its FIFOs removed. One that containerd cannot
/// remove now (it is down) is retried in the background, its FIFOs kept until then.
pub async fn sweep_leftovers(cd: &Containerd, dir: &Path, leftovers: Vec<String>) {
    for name in leftovers {
        let Some((container, exec_id)) = name.split_once('.') else {
            continue;
        };
        let process = ContainerdExecProcess {
            cd: cd.clone(),
            container: container.to_owned(),
            exec_id: exec_id.to_owned(),
            fifo_dir: dir.join(&name),
        };
        // Nobody reads its output any more: SIGKILL, not the grace of a live session.
        if process.kill_and_delete().await {
            process.remove_fifos().await;
            tracing::info!(container = %container, exec = %exec_id, "removed an exec process left by an earlier keeld");
        } else {
            tracing::warn!(container = %container, exec = %exec_id, "cannot remove an exec process left by an earlier keeld yet; retrying in the background");
            tokio::spawn(process.retire());
        }
    }
}

/// Reads and discards the output FIFOs in `dir` until they end.
fn drain_fifos(dir: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut readers = Vec::new();
        for name in ["stdout", "stderr"] {
            if let Ok(r) = tokio::net::unix::pipe::OpenOptions::new().open_receiver(dir.join(name))
            {
                readers.push(tokio::spawn(async move {
                    let mut r = r;
                    let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
                }));
            }
        }
        for r in readers {
            let _ = r.await;
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
                "args": ["/bin/sh", "-c", "sleep 1000"],
                "env": ["PATH=/usr/bin:/bin", "NAME=admin"],
                "cwd": "/home/admin",
                "capabilities": {
                    "bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"],
                    "permitted": ["CAP_CHOWN"], "inheritable": []
                },
                "noNewPrivileges": true,
                "apparmorProfile": "keel-default",
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
            },
            "root": {"path": "rootfs"}
        }))
        .unwrap()
    }

    /// Only the command, the terminal and (with one, when absent) TERM change: user,
    /// capabilities, no_new_privileges, AppArmor and limits stay the container's.
    #[test]
    fn the_exec_process_is_the_container_s_own_with_another_command() {
        let spec = spec();
        let request = ExecRequest {
            target: "admin".into(),
            args: vec!["id".into(), "-u".into()],
            tty: false,
            size: None,
        };
        let process = exec_process(&spec, &request).unwrap();
        let mut expected = spec.process().clone().unwrap();
        expected.set_args(Some(vec!["id".into(), "-u".into()]));
        expected.set_terminal(Some(false));
        assert_eq!(process, expected);

        let request = ExecRequest {
            tty: true,
            size: Some(WindowSize {
                rows: 40,
                cols: 120,
            }),
            ..request
        };
        let process = exec_process(&spec, &request).unwrap();
        assert_eq!(process.terminal(), Some(true));
        let size = process.console_size().unwrap();
        assert_eq!((size.height(), size.width()), (40, 120));
        assert_eq!(
            process.env().as_ref().unwrap(),
            &vec![
                "PATH=/usr/bin:/bin".to_owned(),
                "NAME=admin".to_owned(),
                "TERM=xterm".to_owned()
            ]
        );
        let v = serde_json::to_value(&process).unwrap();
        let base = serde_json::to_value(spec.process().as_ref().unwrap()).unwrap();
        for field in [
            "user",
            "cwd",
            "capabilities",
            "noNewPrivileges",
            "apparmorProfile",
            "rlimits",
        ] {
            assert_eq!(v[field], base[field], "{field}");
        }
    }

    #[test]
    fn a_spec_without_a_process_is_refused() {
        let mut spec = spec();
        spec.set_process(None);
        let request = ExecRequest {
            target: "admin".into(),
            args: vec!["true".into()],
            tty: false,
            size: None,
        };
        assert!(matches!(
            exec_process(&spec, &request),
            Err(ExecError::Spec(_))
        ));
    }

    #[test]
    fn runc_s_reason_is_kept_short() {
        assert_eq!(
            runtime_reason("OCI runtime exec failed: exec failed: unable to start container process: exec: \"/x\": stat /x: no such file or directory: unknown"),
            "exec: \"/x\": stat /x: no such file or directory: unknown"
        );
        assert_eq!(runtime_reason("something else\n"), "something else");
    }

    #[test]
    fn fifos_are_private() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("exec/host-a.keel-exec-1");
        make_fifos(&dir, false).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(dir.parent().unwrap()), 0o700);
        for name in ["stdin", "stdout", "stderr"] {
            let meta = std::fs::metadata(dir.join(name)).unwrap();
            assert!(meta.file_type().is_fifo());
            assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        }
        let tty = tmp.path().join("exec/host-a.keel-exec-2");
        make_fifos(&tty, true).unwrap();
        assert!(!tty.join("stderr").exists());
    }
}
