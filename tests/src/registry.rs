//! Local image registries on 127.0.0.1: [`Registry`] runs Debian's `docker-registry` (the
//! distribution registry v2) with storage in a temporary directory; [`FailingRegistry`]
//! answers every request with 500, or an error without end, or (as a mirror) another
//! registry's answers with every blob corrupted.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::containerd::{find_in_path, output_within};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `docker-registry serve` on 127.0.0.1, plain HTTP, no auth, deletes enabled.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Registry {
    pub fn start() -> Registry {
        assert!(
            find_in_path("docker-registry").is_some(),
            "docker-registry is not installed: `apt-get install -y docker-registry`"
        );
        let dir = tempfile::Builder::new()
            .prefix("keel-registry-")
            .tempdir()
            .expect("create a temporary directory for the registry");
        std::fs::create_dir(dir.path().join("storage")).expect("create registry storage");
        let mut registry = Registry {
            dir,
            port: 0,
            child: None,
        };
        // A free port may be taken between probing and the registry binding it: retry.
        let mut errors = Vec::new();
        for _ in 0..5 {
            registry.port = free_port();
            match registry.try_spawn() {
                Ok(()) => return registry,
                Err(e) => errors.push(e),
            }
        }
        panic!("docker-registry did not start:\n{}", errors.join("\n---\n"));
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The storage root directory (kept across [`Self::stop`] / [`Self::start_again`]).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("registry is not running").id()
    }

    /// SIGKILLs the registry; its storage stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port and storage.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "registry is still running; stop() it first"
        );
        // The old listener is gone with the killed process; the port may briefly linger
        // for another binder, so retry for a while.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.try_spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The registry's log (all its runs, appended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes the image tagged `tag` in the OCI layout `layout_dir` to
    /// `<addr>/<repo>:<tag>` with skopeo (plain HTTP), byte for byte: the manifest, config
    /// and layer digests in the registry are those of the layout.
    pub fn push_layout(&self, layout_dir: &Path, tag: &str, repo: &str) {
        assert!(
            find_in_path("skopeo").is_some(),
            "skopeo is not installed: `apt-get install -y skopeo`"
        );
        let source = format!("oci:{}:{tag}", layout_dir.display());
        let dest = format!("docker://{}/{repo}:{tag}", self.addr());
        let mut command = Command::new("skopeo");
        // --insecure-policy: no need for /etc/containers/policy.json (it may be missing).
        // --preserve-digests: skopeo would otherwise gzip an uncompressed layer on its way
        // to a registry, changing the layer and manifest digests.
        command.args([
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &source,
            &dest,
        ]);
        let out = output_within(command, PUSH_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "skopeo copy {source} {dest}: {e}\nregistry log:\n{}",
                self.log()
            )
        });
        assert!(
            out.status.success(),
            "skopeo copy {source} {dest} failed ({}):\n{}{}\nregistry log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let config = self.dir.path().join("config.yml");
        std::fs::write(&config, self.config_yml())
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .map_err(|e| format!("cannot open registry.log: {e}"))?;
        let log_too = log
            .try_clone()
            .map_err(|e| format!("cannot clone the log file: {e}"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_too)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start docker-registry: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if http_status(&self.addr(), "/v2/") == Some(200) {
                return Ok(());
            }
            let child = self.child.as_mut().expect("registry child");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "docker-registry on {} exited early ({status}); log:\n{}",
                    self.addr(),
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "docker-registry did not answer GET /v2/ on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.addr(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn config_yml(&self) -> String {
        // JSON strings are valid YAML scalars, and quote paths safely.
        let root = serde_json::Value::String(self.storage().display().to_string());
        format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: keel-e2e-not-a-secret\n",
            port = self.port
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP server on 127.0.0.1 that answers every request with `500 Internal Server Error`
/// (and closes the connection), counting the requests.
pub struct FailingRegistry {
    addr: String,
    requests: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How [`FailingRegistry`] answers.
#[derive(Clone)]
enum Failing {
    /// Every request: 500 with a short body.
    Always,
    /// A manifest naming one large layer; the layer's GET: 500 and a body without end.
    EndlessBlobError,
    /// What the registry at this address answers, with one byte of every blob changed.
    Corrupting(String),
}

impl FailingRegistry {
    /// Answers every request 500.
    pub fn start() -> FailingRegistry {
        Self::start_with(Failing::Always)
    }

    /// Answers a manifest with one layer of 1 TB, and that layer's GET with a 500 whose
    /// body never ends (the error text is read as it comes: a client that reads it
    /// whole grows without bound).
    pub fn endless_blob_error() -> FailingRegistry {
        Self::start_with(Failing::EndlessBlobError)
    }

    /// A mirror of the registry at `upstream` (`127.0.0.1:PORT`) that answers what it
    /// answers, except that one byte of every blob is changed.
    pub fn corrupting(upstream: &str) -> FailingRegistry {
        Self::start_with(Failing::Corrupting(upstream.to_owned()))
    }

    fn start_with(mode: Failing) -> FailingRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local address of the listener")
            .to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = Arc::clone(&requests);
            let stopping = Arc::clone(&stopping);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let requests = Arc::clone(&requests);
                    let mode = mode.clone();
                    std::thread::spawn(move || {
                        let mut stream = stream;
                        // None: the drop's wake-up connection, or a client that gave up.
                        let Some(head) = read_head(&mut stream) else {
                            return;
                        };
                        requests.fetch_add(1, Ordering::SeqCst);
                        match mode {
                            Failing::Always => answer_500(stream),
                            Failing::EndlessBlobError => answer_endless(stream, &head),
                            Failing::Corrupting(upstream) => {
                                answer_corrupted(stream, &head, &upstream)
                            }
                        }
                    });
                }
            })
        };
        FailingRegistry {
            addr,
            requests,
            stopping,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FailingRegistry {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request's head (a registry client's GETs have no body), read within 5 s; None
/// when the client sent nothing.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") && raw.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    (!raw.is_empty()).then(|| String::from_utf8_lossy(&raw).into_owned())
}

/// Answers a manifest with a 1 TB layer to a manifest GET, and 500 with a body that goes
/// on until the client hangs up to anything else.
fn answer_endless(mut stream: TcpStream, head: &str) {
    let mut buf = [0u8; 4096];
    if head.contains("/manifests/") {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}","size":1000000000000}}]}}"#,
            "c".repeat(64),
            "a".repeat(64)
        );
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let _ = stream.read(&mut buf);
        return;
    }
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let head = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let text = "error ".repeat(10_000);
    let chunk = format!("{:x}\r\n{text}\r\n", text.len());
    while stream.write_all(chunk.as_bytes()).is_ok() {}
}

/// Forwards one request (its head: the registry's GETs have no body) to `upstream`
/// with `Connection: close`, and sends its answer back with one byte in the middle of a
/// blob's body changed.
fn answer_corrupted(mut stream: TcpStream, head: &str, upstream: &str) {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut forward = format!("{request_line}\r\nHost: {upstream}\r\nConnection: close\r\n");
    for line in lines.take_while(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name != "host" && name != "connection" {
            forward.push_str(line);
            forward.push_str("\r\n");
        }
    }
    forward.push_str("\r\n");
    let Ok(mut up) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = up.set_read_timeout(Some(Duration::from_secs(30)));
    if up.write_all(forward.as_bytes()).is_err() {
        return;
    }
    let mut answer = Vec::new();
    let _ = up.read_to_end(&mut answer);
    if request_line.contains("/blobs/") {
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = at + 4;
            if answer.len() > body {
                let middle = body + (answer.len() - body) / 2;
                answer[middle] ^= 0x01;
            }
        }
    }
    let _ = stream.write_all(&answer);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Answers 500 and closes.
fn answer_500(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    let body = br#"{"errors":[{"code":"UNKNOWN","message":"keel-e2e: failing registry"}]}"#;
    let head = format!(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
    // Let the client read the answer before the socket is closed under a pending body.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.read(&mut buf);
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port on 127.0.0.1")
        .port()
}

/// Status of `GET <path>` on `addr`, or None when nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
}
