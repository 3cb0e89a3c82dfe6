//! A private containerd (Debian's containerd 1.6 with runc) for one test: its own root,
//! state, socket and namespace in a temporary directory, never the host's.
//!
//! Two containerds on one host share runc's state directory `/run/containerd/runc/<ns>`,
//! the shim socket directory `/run/containerd/s` (names hashed from the socket path, so
//! they do not collide) and `/run/containerd/fifo`; each instance therefore uses a
//! namespace of its own, `keel-test-<pid>-<n>`, and cleans up only what carries it.
//!
//! The config disables CRI and every snapshotter but `overlayfs` and `native`. When the
//! overlayfs snapshotter cannot load (e.g. the temporary directory is itself on overlayfs),
//! [`Containerd::snapshotter`] is `native` and [`Containerd::ctr`] uses it.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one `ctr` command (an image pull or a container run included).
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// runc's default state root; the shim uses `<root>/<namespace>`.
const RUNC_ROOT: &str = "/run/containerd/runc";

static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// Plugins not needed by the tests: CRI (slow, wants CNI), the other snapshotters, `opt`
/// (writes to /opt/containerd), tracing.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
];

/// A running private containerd. Dropping it kills and deletes every task and container of
/// its namespace, stops containerd, kills any shim left and unmounts whatever is still
/// mounted under its directory.
pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
    namespace: String,
    snapshotter: &'static str,
    child: Option<Child>,
}

impl Containerd {
    pub fn start() -> Containerd {
        for tool in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
            assert!(
                find_in_path(tool).is_some(),
                "{tool} is not installed: `apt-get install -y containerd runc` (the tests need \
                 containerd 1.6, runc and ctr)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("keel-ctrd-")
            .tempdir()
            .expect("create a temporary directory for containerd");
        let socket = dir.path().join("containerd.sock");
        // sun_path holds 108 bytes, and containerd adds ".ttrpc" for its second socket.
        assert!(
            socket.as_os_str().len() + ".ttrpc".len() < 108,
            "socket path {} is too long for a unix socket: set TMPDIR to a shorter directory",
            socket.display()
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), &socket)).expect("write config.toml");
        let namespace = format!(
            "keel-test-{}-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::SeqCst)
        );
        let mut containerd = Containerd {
            dir,
            socket,
            config,
            namespace,
            snapshotter: "overlayfs",
            child: None,
        };
        containerd.spawn();
        containerd.snapshotter = containerd.pick_snapshotter();
        containerd
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The namespace the tests should use (unique to this instance).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The snapshotter to use: `overlayfs`, or `native` where overlayfs does not work.
    pub fn snapshotter(&self) -> &'static str {
        self.snapshotter
    }

    /// The temporary directory holding root, state, config, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("containerd is not running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILLs containerd only; its shims and their tasks keep running, as after a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts containerd again on the same root, state and socket: after [`Self::kill`], or
    /// (stopping it first with SIGTERM, as a service manager would) while it runs.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn();
    }

    /// Runs `ctr --address <socket> --namespace <ns> <args>` (with this instance's
    /// snapshotter), bounded to two minutes.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .env("CONTAINERD_SNAPSHOTTER", self.snapshotter)
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_ADDRESS");
        let what = format!("ctr {}", args.join(" "));
        match output_within(command, CTR_TIMEOUT) {
            Ok(output) => output,
            Err(e) => panic!("{what}: {e}\ncontainerd log:\n{}", self.log()),
        }
    }

    /// Like [`Self::ctr`], panicking (with containerd's log) unless it succeeds; returns
    /// stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// containerd's log (all its runs, appended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// PIDs of the runc shims serving this instance (found by namespace and socket).
    pub fn shim_pids(&self) -> Vec<u32> {
        let needles = [
            format!("-namespace\0{}\0", self.namespace).into_bytes(),
            self.dir.path().as_os_str().as_encoded_bytes().to_vec(),
        ];
        let mut pids = Vec::new();
        for (pid, process) in processes() {
            if pid == std::process::id() || !is_shim(&process.cmdline) {
                continue;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if needles
                .iter()
                .any(|n| contains(&process.cmdline, n) || contains(&environ, n))
            {
                pids.push(pid);
            }
        }
        pids
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        // A socket left by a killed containerd must not pass for a live one.
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .map_err(|e| format!("cannot open containerd.log: {e}"))?;
        let log_too = log
            .try_clone()
            .map_err(|e| format!("cannot clone the log file: {e}"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log_too)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start containerd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            let child = self.child.as_mut().expect("containerd child");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "containerd exited early ({status}); log:\n{}",
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "containerd did not accept connections on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.socket.display(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `overlayfs` when its plugin loaded, else `native` (e.g. when the temporary directory
    /// is on overlayfs, where an overlay mount is refused).
    fn pick_snapshotter(&self) -> &'static str {
        let plugins = self.ctr_ok(&["plugins", "ls"]);
        let overlay_ok = plugins.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.first() == Some(&"io.containerd.snapshotter.v1")
                && fields.get(1) == Some(&"overlayfs")
                && fields.last() == Some(&"ok")
        });
        if overlay_ok {
            "overlayfs"
        } else {
            eprintln!(
                "keel-e2e: containerd's overlayfs snapshotter did not load under {}; using native",
                self.dir.path().display()
            );
            "native"
        }
    }

    /// Best-effort teardown through containerd itself: kill and delete every task,
    /// delete every container and image of the namespace.
    fn delete_everything(&self) {
        let quiet = |args: &[&str]| -> Option<String> {
            let mut command = Command::new("ctr");
            command
                .arg("--address")
                .arg(&self.socket)
                .arg("--namespace")
                .arg(&self.namespace)
                .args(args)
                .env("CONTAINERD_SNAPSHOTTER", self.snapshotter);
            output_within(command, Duration::from_secs(20))
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let ids = |args: &[&str]| -> Vec<String> {
            quiet(args)
                .unwrap_or_default()
                .lines()
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty())
                .collect()
        };
        // `tasks ls -q` prints task IDs (= container IDs).
        let tasks = ids(&["tasks", "ls", "-q"]);
        for task in &tasks {
            let _ = quiet(&["tasks", "kill", "--all", "--signal", "SIGKILL", task]);
        }
        for task in &tasks {
            let deadline = Instant::now() + Duration::from_secs(5);
            while quiet(&["tasks", "delete", task]).is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = quiet(&["tasks", "delete", "--force", task]);
        }
        let containers = ids(&["containers", "ls", "-q"]);
        if !containers.is_empty() {
            let mut args = vec!["containers", "delete"];
            args.extend(containers.iter().map(String::as_str));
            let _ = quiet(&args);
        }
        let images = ids(&["images", "ls", "-q"]);
        if !images.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(images.iter().map(String::as_str));
            let _ = quiet(&args);
        }
    }

    /// SIGTERM, up to five seconds, then SIGKILL.
    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILLs every leftover shim of this instance and every process below it.
    fn kill_shims(&self) {
        let shims = self.shim_pids();
        if shims.is_empty() {
            return;
        }
        let table = processes();
        let mut doomed: BTreeSet<u32> = shims.iter().copied().collect();
        // Descendants (the container processes), found through parent PIDs.
        loop {
            let before = doomed.len();
            for (pid, process) in &table {
                if doomed.contains(&process.ppid) {
                    doomed.insert(*pid);
                }
            }
            if doomed.len() == before {
                break;
            }
        }
        for pid in &doomed {
            signal(*pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.shim_pids().is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes this namespace's runc state and the (empty) cgroups `ctr` made for it.
    fn remove_namespace_leftovers(&self) {
        let _ = std::fs::remove_dir_all(Path::new(RUNC_ROOT).join(&self.namespace));
        let mut cgroup_dirs = vec![Path::new("/sys/fs/cgroup").join(&self.namespace)];
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for controller in controllers.flatten() {
                cgroup_dirs.push(controller.path().join(&self.namespace));
            }
        }
        for dir in cgroup_dirs {
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    if child.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }

    /// Lazily unmounts everything mounted under the temporary directory, deepest first.
    fn unmount_all(&self) {
        let root = self.dir.path();
        let mut mounts: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in mounts {
            let Ok(c_path) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2(2) with a valid NUL-terminated path; failure is harmless.
            unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_none() && !self.shim_pids().is_empty() {
            // Killed by the test: bring it back so tasks are torn down properly.
            let _ = self.try_spawn();
        }
        if self.child.is_some() {
            self.delete_everything();
        }
        self.terminate();
        self.kill_shims();
        self.remove_namespace_leftovers();
        self.unmount_all();
    }
}

fn config_toml(dir: &Path, socket: &Path) -> String {
    let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let disabled: Vec<String> = DISABLED_PLUGINS
        .iter()
        .map(|p| toml::Value::String((*p).to_owned()).to_string())
        .collect();
    format!(
        "version = 2\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [{disabled}]\n\
         \n\
         [grpc]\n\
         address = {socket}\n\
         \n\
         [ttrpc]\n\
         address = {ttrpc}\n\
         \n\
         [debug]\n\
         level = \"info\"\n",
        root = quote(&dir.join("root")),
        state = quote(&dir.join("state")),
        disabled = disabled.join(", "),
        socket = quote(socket),
        ttrpc = quote(&dir.join("containerd.sock.ttrpc")),
    )
}

struct Process {
    ppid: u32,
    cmdline: Vec<u8>,
}

/// Every process on the host: PID → parent PID and raw command line.
fn processes() -> HashMap<u32, Process> {
    let mut table = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        table.insert(pid, Process { ppid, cmdline });
    }
    table
}

fn is_shim(cmdline: &[u8]) -> bool {
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    name.starts_with(b"containerd-shim")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Mount points of this process's mount namespace, unescaped.
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = &bytes[i + 1..i + 4];
            if octal.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = octal
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::ffi::OsString::from_vec(out)
}

fn signal(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) on a PID this harness found to be its own child or shim.
    unsafe { libc::kill(pid, signal) };
}

pub(crate) fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Runs `command` (stdin closed, output captured); kills it and errs after `timeout`.
pub fn output_within(mut command: Command, timeout: Duration) -> Result<Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                // The readers end once every holder of the pipes is gone; don't wait on
                // grandchildren that may still hold them.
                return Err(format!("did not finish within {timeout:?}"));
            }
            Err(e) => return Err(format!("wait failed: {e}")),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}
