//! Shared helpers for the end-to-end tests: start the real `keeld` binary on a temporary
//! socket and state directory, drive it with the real `apiclient` binary or raw HTTP.
//!
//! Every process a test starts is stopped by PID when its handle drops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod containerd;
pub mod http_server;
pub mod image;
pub mod imds;
pub mod registry;
pub mod tuf;
pub mod updates;
pub mod vm;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test>-<hash> → target/debug
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.to_owned()
}

/// CPU time (user + system, all threads) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    cpu_time_of(&pid.to_string())
}

/// CPU time (user + system) of `/proc/<what>`: a process id, or `thread-self`.
pub fn cpu_time_of(what: &str) -> Duration {
    let (user, system) = cpu_times_of(what);
    user + system
}

/// User and system CPU time of process `pid`, apart.
pub fn cpu_times(pid: u32) -> (Duration, Duration) {
    cpu_times_of(&pid.to_string())
}

/// User and system CPU time of `/proc/<what>`, apart.
pub fn cpu_times_of(what: &str) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{what}/stat")).expect("/proc/<pid>/stat");
    // After the command name (which may hold spaces): utime is the 12th field, stime the
    // 13th, in clock ticks.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
    let field = |i: usize| {
        let ticks: u64 = fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .expect("utime and stime in /proc/<pid>/stat");
        Duration::from_secs_f64(ticks as f64 / ticks_per_second)
    };
    (field(11), field(12))
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// The repository's root (for `packaging/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// packaging/services.toml written into `dir` with each restart command's argv run as
/// `wrapper SERVICE ARGV...`, so that no test touches the host's services: a recorder,
/// or `/bin/true`. Answers the file's path.
pub fn services_wrapped(dir: &Path, wrapper: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("packaging/services.toml")).unwrap();
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    if let Some(toml::Value::Table(services)) = doc.get_mut("services") {
        for (name, service) in services.iter_mut() {
            let Some(toml::Value::Array(commands)) = service.get_mut("restart-commands") else {
                continue;
            };
            for command in commands.iter_mut() {
                let toml::Value::Array(argv) = command else {
                    continue;
                };
                let mut wrapped = vec![
                    toml::Value::String(wrapper.display().to_string()),
                    toml::Value::String(name.clone()),
                ];
                wrapped.append(argv);
                *argv = wrapped;
            }
        }
    }
    let path = dir.join("services.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

/// Options for starting keeld.
#[derive(Clone, Debug)]
pub struct KeeldOptions {
    pub history: u32,
    pub socket_mode: &'static str,
    pub socket_group: String,
    pub extra_args: Vec<String>,
    /// services.toml to use; default: packaging/services.toml with every restart command
    /// replaced by a recorder (see [`Keeld::restarts`]).
    pub services: Option<PathBuf>,
    /// Templates directory; default: packaging/templates.
    pub templates: Option<PathBuf>,
    /// containerd socket and namespace; default: a socket nobody listens on, so keeld
    /// never touches a containerd the test did not start.
    pub containerd: Option<(PathBuf, String)>,
    /// Wait for the boot to be configured before the test goes on (and forget the
    /// restart commands the boot ran). Boot tests turn it off.
    pub wait_for_boot: bool,
    /// Run keeld with a read-only root (see [`Keeld::read_only_root_command`]); the
    /// socket then lives in the runtime directory.
    pub read_only_root: bool,
    /// The state directory (e.g. a small tmpfs the test mounted); default: under the
    /// test's temporary directory.
    pub state_dir: Option<PathBuf>,
    /// Start keeld through `systemd-socket-activate`, with the API socket passed in.
    pub socket_activation: bool,
    /// Extra environment for keeld (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// Render root and runtime directory on a tmpfs (under `/dev/shm`), as on a Keel
    /// host, where both are tmpfs; default: under the test's temporary directory, on
    /// whatever file system that is. The apply benchmark uses it, so that an apply costs
    /// what it costs on a host (a rendered file's fsync is free on tmpfs).
    pub tmpfs_render: bool,
}

impl Default for KeeldOptions {
    fn default() -> Self {
        KeeldOptions {
            history: 10,
            socket_mode: "660",
            socket_group: "0".to_owned(),
            extra_args: Vec::new(),
            services: None,
            templates: None,
            containerd: None,
            wait_for_boot: true,
            read_only_root: false,
            state_dir: None,
            socket_activation: false,
            env: Vec::new(),
            tmpfs_render: false,
        }
    }
}

/// A running keeld with its own temporary socket and state directory.
pub struct Keeld {
    pub dir: tempfile::TempDir,
    /// With [`KeeldOptions::tmpfs_render`]: the tmpfs directory holding the render root
    /// and the runtime directory.
    shm: Option<tempfile::TempDir>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub options: KeeldOptions,
    child: Option<Child>,
}

impl Keeld {
    pub fn start() -> Keeld {
        Self::start_with(KeeldOptions::default())
    }

    pub fn start_with(options: KeeldOptions) -> Keeld {
        let dir = tempfile::tempdir().unwrap();
        let socket = if options.read_only_root {
            dir.path().join("run/api.sock")
        } else {
            dir.path().join("api.sock")
        };
        let state_dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let shm = options.tmpfs_render.then(|| {
            tempfile::tempdir_in("/dev/shm").expect("a temporary directory on /dev/shm (tmpfs)")
        });
        let mut keeld = Keeld {
            dir,
            shm,
            socket,
            state_dir,
            options,
            child: None,
        };
        keeld.spawn();
        keeld
    }

    /// keeld's runtime directory (container logs under `logs/`).
    pub fn runtime_dir(&self) -> PathBuf {
        self.shm.as_ref().unwrap_or(&self.dir).path().join("run")
    }

    /// Whether the apply journal (`apply-journal.jsonl` in the runtime directory) ends
    /// with an apply that started and has not finished.
    pub fn apply_in_flight(&self) -> bool {
        let text = std::fs::read_to_string(self.runtime_dir().join("apply-journal.jsonl"))
            .unwrap_or_default();
        text.lines()
            .rev()
            .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .is_some_and(|record| record.get("started").is_some())
    }

    /// The persistent directory (`host-containers/<name>`, `bootstrap-containers/<name>`).
    pub fn persistent_dir(&self) -> PathBuf {
        self.dir.path().join("local")
    }

    /// The render root (a plain directory standing in for the host's tmpfs).
    pub fn render_root(&self) -> PathBuf {
        self.shm.as_ref().unwrap_or(&self.dir).path().join("root")
    }

    /// Lines written by the restart-command recorder, one per command run:
    /// `<service> <original argv...> | <CHANGED_SETTINGS>`.
    pub fn restarts(&self) -> Vec<String> {
        std::fs::read_to_string(self.record_dir().join("restarts.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// packaging/services.toml with each restart command `argv` replaced by
    /// `record-restart <service> argv...`, so tests see what would be restarted without
    /// touching the host's services.
    fn recording_services(&self) -> PathBuf {
        let recorder = self.dir.path().join("record-restart");
        std::fs::write(
            &recorder,
            "#!/bin/sh\ndir=\"$(dirname \"$0\")\"\nif [ -e \"$dir/slow-$1\" ]; then s=$(cat \"$dir/slow-$1\"); sleep \"${s:-1}\"; fi\necho \"$* | $CHANGED_SETTINGS\" >> \"${KEEL_RECORD_DIR:-$dir}/restarts.log\"\n[ -e \"$dir/fail-$1\" ] && exit 3\nexit 0\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &recorder,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        services_wrapped(self.dir.path(), &recorder)
    }

    /// Makes the recorder take a second for `service`'s restart commands.
    pub fn slow_restarts_of(&self, service: &str) {
        std::fs::write(self.dir.path().join(format!("slow-{service}")), "").unwrap();
    }

    /// Makes the recorder take `seconds` for `service`'s restart commands.
    pub fn slow_restarts_of_for(&self, service: &str, seconds: u32) {
        std::fs::write(
            self.dir.path().join(format!("slow-{service}")),
            seconds.to_string(),
        )
        .unwrap();
    }

    /// Makes the recorder fail (exit 3) for `service`'s restart commands.
    pub fn fail_restarts_of(&self, service: &str) {
        std::fs::write(self.dir.path().join(format!("fail-{service}")), "").unwrap();
    }

    /// Starts (again) the keeld process on the same socket and state directory.
    pub fn spawn(&mut self) {
        let services = match &self.options.services {
            Some(path) => path.clone(),
            None => self.recording_services(),
        };
        assert!(self.child.is_none(), "keeld already running");
        let (containerd_socket, containerd_namespace) = match &self.options.containerd {
            Some((socket, ns)) => (socket.clone(), ns.clone()),
            None => (
                self.dir.path().join("no-containerd.sock"),
                "keel-none".to_owned(),
            ),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("keeld.log"))
            .unwrap();
        let mut command = if self.options.read_only_root {
            self.read_only_root_command()
        } else if self.options.socket_activation {
            // Binds the socket, then execs keeld with it as fd 3 (LISTEN_FDS), as
            // systemd does with keeld.socket.
            let mut c = Command::new("systemd-socket-activate");
            c.arg("-l").arg(&self.socket).arg(bin("keeld"));
            c
        } else {
            Command::new(bin("keeld"))
        };
        let child = command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--socket-group", &self.options.socket_group])
            .args(["--socket-mode", self.options.socket_mode])
            .args(["--history", &self.options.history.to_string()])
            .arg("--services")
            .arg(&services)
            .arg("--templates")
            .arg(
                self.options
                    .templates
                    .clone()
                    .unwrap_or_else(|| repo_root().join("packaging/templates")),
            )
            .arg("--render-root")
            .arg(self.render_root())
            .args(["--restart-timeout", "10s"])
            .arg("--containerd-socket")
            .arg(containerd_socket)
            .args(["--containerd-namespace", &containerd_namespace])
            .arg("--runtime-dir")
            .arg(self.runtime_dir())
            .arg("--persistent-dir")
            .arg(self.persistent_dir())
            .args(&self.options.extra_args)
            .env(
                "KEELD_LOG",
                std::env::var("KEELD_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
        if self.options.wait_for_boot {
            let record = self.wait_boot(Duration::from_secs(60));
            assert_eq!(
                record["phase"],
                "configured",
                "boot failed: {record:#}\nlog:\n{}",
                self.log()
            );
            // The boot renders every file and runs every restart command once; tests
            // look at what their own changes restart.
            let _ = std::fs::remove_file(self.record_dir().join("restarts.log"));
        }
    }

    /// Where the restart recorder writes: the runtime directory when the root is
    /// read-only (the only place besides keeld's own directories that stays writable).
    fn record_dir(&self) -> PathBuf {
        if self.options.read_only_root {
            self.runtime_dir()
        } else {
            self.dir.path().to_owned()
        }
    }

    /// `unshare -m` running keeld in a private mount namespace whose `/` (and every
    /// other writable mount but /proc, /sys and /dev) is read-only; only the state,
    /// runtime and persistent directories (bind-mounted onto themselves) and the render
    /// root (a fresh tmpfs) stay writable.
    fn read_only_root_command(&self) -> Command {
        const SETUP: &str = r#"
set -e
for d in "$KEEL_STATE" "$KEEL_RUN" "$KEEL_LOCAL"; do
  mkdir -p "$d"; mount --bind "$d" "$d"
done
mkdir -p "$KEEL_RENDER"
mount -t tmpfs -o mode=0755 keel-render "$KEEL_RENDER"
mount -o remount,bind,ro /
for m in /tmp /var/tmp /run /var/run /dev/shm; do
  if mountpoint -q "$m"; then mount -o remount,bind,ro "$m"; fi
done
exec "$@"
"#;
        let mut command = Command::new("unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                SETUP,
                "sh",
            ])
            .arg(bin("keeld"))
            .env("KEEL_STATE", &self.state_dir)
            .env("KEEL_RUN", self.runtime_dir())
            .env("KEEL_LOCAL", self.persistent_dir())
            .env("KEEL_RENDER", self.render_root())
            .env("KEEL_RECORD_DIR", self.runtime_dir());
        command
    }

    /// Simulates a reboot: keeld is killed, the runtime directory (a tmpfs on a real
    /// host) is emptied, and keeld starts again on the same state.
    pub fn reboot(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.runtime_dir());
        self.spawn();
    }

    /// Waits until the boot is configured or failed; answers the boot record.
    pub fn wait_boot(&self, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let record = self.raw("GET", "/boot", None).json();
            if record["phase"] == "configured" || record["phase"] == "failed" {
                return record;
            }
            assert!(
                Instant::now() < deadline,
                "boot not finished after {timeout:?}: {record:#}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keeld exited early ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keeld did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("keeld running").id()
    }

    /// keeld's resident memory (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keeld.log")).unwrap_or_default()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The socket file stays behind, as after a real crash; keeld must cope.
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("keeld running");
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// Runs the apiclient binary against this keeld.
    pub fn apiclient(&self, args: &[&str]) -> Output {
        self.apiclient_with_stdin(args, None)
    }

    pub fn apiclient_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(bin("apiclient"))
            .arg("--socket-path")
            .arg(&self.socket)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs apiclient and returns stdout parsed as JSON; panics on failure.
    pub fn apiclient_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.apiclient(args);
        assert!(
            out.status.success(),
            "apiclient {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "apiclient {args:?}: output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// One raw HTTP/1.1 request; see [`raw_request`].
    pub fn raw(&self, method: &str, target: &str, body: Option<&[u8]>) -> RawResponse {
        raw_request(&self.socket, method, target, body)
    }

    /// The live settings as `GET /settings` returns them, as bytes.
    pub fn live_bytes(&self) -> Vec<u8> {
        let r = self.raw("GET", "/settings", None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.body
    }
}

impl Drop for Keeld {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends exactly one request as Bottlerocket's apiclient does (`Content-Type:
/// application/json`, `Connection: close`) and reads the whole answer.
pub fn raw_request(socket: &Path, method: &str, target: &str, body: Option<&[u8]>) -> RawResponse {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n"
    );
    let body = body.unwrap_or_default();
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw_bytes(socket, &bytes)
}

/// Like [`raw_request`], but a connection or framing failure is an `Err` (for tests that
/// kill keeld under a client's feet).
pub fn try_raw_request(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> std::io::Result<RawResponse> {
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(&request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(std::io::Error::other("connection closed before an answer"));
    }
    Ok(parse_response(&raw))
}

/// Sends `request` verbatim and parses the answer (Content-Length or close-delimited).
pub fn raw_bytes(socket: &Path, request: &[u8]) -> RawResponse {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer (413) before it has read the whole body and close; a failed
    // write is then expected, the answer is still there to read.
    let _ = stream.write_all(request);
    // Read the head, then exactly Content-Length bytes (the connection may stay open, as
    // it does for clients that do not send `Connection: close`), or to EOF otherwise.
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            // 204 has no body by definition.
            if head.starts_with("http/1.1 204") {
                break;
            }
            if let Some(length) = length {
                if raw.len() >= split + 4 + length {
                    break;
                }
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> RawResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}
