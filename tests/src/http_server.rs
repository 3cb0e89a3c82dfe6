//! A small HTTP/1.1 file server for the tests' update repositories, with the faults the
//! tests need (a body that stops, a throttled body, an answer that never comes), a
//! forwarding proxy that records what went through it, and a port that never accepts a
//! connection. Blocking threads, one per connection; every thread ends with the test
//! process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server does with a request whose path ends with `suffix`.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Send the head and the first `bytes` of the body, then nothing (the connection
    /// stays open).
    StallAfter { suffix: String, bytes: usize },
    /// Send the body in `chunk`-byte pieces, `pause` apart.
    Throttle {
        suffix: String,
        chunk: usize,
        pause: Duration,
    },
    /// Read the request and never answer.
    NoAnswer { suffix: String },
}

impl Fault {
    fn suffix(&self) -> &str {
        match self {
            Fault::StallAfter { suffix, .. }
            | Fault::Throttle { suffix, .. }
            | Fault::NoAnswer { suffix } => suffix,
        }
    }
}

#[derive(Default)]
struct Shared {
    faults: Vec<Fault>,
    requests: Vec<String>,
}

/// Serves `root` on `addr`; `GET /x` reads `root/x`.
pub struct FileServer {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
}

impl FileServer {
    /// Binds `ip` on a free port.
    pub fn start(ip: &str, root: PathBuf) -> FileServer {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let root = root.clone();
                let state = state.clone();
                std::thread::spawn(move || serve(stream, &root, &state));
            }
        });
        FileServer { addr, shared }
    }

    /// `http://<addr>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    pub fn set_faults(&self, faults: Vec<Fault>) {
        self.shared.lock().unwrap().faults = faults;
    }

    /// The paths requested so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().unwrap().requests.clone()
    }
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    Some(first)
}

fn serve(stream: TcpStream, root: &std::path::Path, state: &Mutex<Shared>) {
    // The head and the body go in two writes: without this, Nagle's algorithm holds a
    // small body back until the client's delayed ACK of the head (40 ms), which no
    // real repository server does.
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    while let Some(first) = read_head(&mut reader) {
        let mut parts = first.split_whitespace();
        let (Some(_method), Some(target)) = (parts.next(), parts.next()) else {
            return;
        };
        let path = target.split('?').next().unwrap_or("").to_owned();
        let fault = {
            let mut shared = state.lock().unwrap();
            shared.requests.push(path.clone());
            shared
                .faults
                .iter()
                .find(|f| path.ends_with(f.suffix()))
                .cloned()
        };
        if let Some(Fault::NoAnswer { .. }) = fault {
            std::thread::sleep(Duration::from_secs(3600));
            return;
        }
        let path = root.join(path.trim_start_matches('/'));
        let file = std::fs::File::open(&path).ok();
        let length = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len());
        let (Some(mut file), Some(length)) = (file, length) else {
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
            );
            continue;
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        match fault {
            Some(Fault::StallAfter { bytes, .. }) => {
                let _ = std::io::copy(&mut (&mut file).take(bytes as u64), &mut stream);
                let _ = stream.flush();
                std::thread::sleep(Duration::from_secs(3600));
                return;
            }
            Some(Fault::Throttle { chunk, pause, .. }) => {
                let mut piece = vec![0u8; chunk.max(1)];
                loop {
                    let n = match file.read(&mut piece) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(_) => return,
                    };
                    if stream.write_all(&piece[..n]).is_err() {
                        return;
                    }
                    std::thread::sleep(pause);
                }
            }
            // Straight from the page cache to the socket (std uses sendfile here), as a
            // static file server does.
            _ => {
                if std::io::copy(&mut file, &mut stream).is_err() {
                    return;
                }
            }
        }
    }
}

/// A forwarding HTTP proxy (absolute-form requests, as clients send plain `http://` URLs
/// to a proxy) that records each request line.
pub struct Proxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || forward(client, &log));
            }
        });
        Proxy { addr, seen }
    }

    /// The request lines seen (`GET http://host:port/path HTTP/1.1`).
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn forward(client: TcpStream, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut client = client;
    loop {
        let mut first = String::new();
        if reader.read_line(&mut first).unwrap_or(0) == 0 {
            return;
        }
        let mut head_lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head_lines.push(line);
        }
        log.lock().unwrap().push(first.trim_end().to_owned());
        let mut parts = first.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return;
        };
        let Ok(url) = url::Url::parse(target) else {
            let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            return;
        };
        let host = url.host_str().unwrap_or_default().to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let Ok(mut upstream) = TcpStream::connect((host.as_str(), port)) else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
            return;
        };
        let mut request = format!(
            "{method} {} HTTP/1.1\r\n",
            &url[url::Position::BeforePath..]
        );
        for line in head_lines {
            if !line.to_ascii_lowercase().starts_with("proxy-") {
                request.push_str(&line);
            }
        }
        request.push_str("\r\n");
        if upstream.write_all(request.as_bytes()).is_err() {
            return;
        }
        // Relay the answer: head, then Content-Length bytes.
        let mut up = BufReader::new(upstream);
        let mut length = 0usize;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if up.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        if client.write_all(head.as_bytes()).is_err() {
            return;
        }
        let mut body = vec![0u8; length];
        if up.read_exact(&mut body).is_err() || client.write_all(&body).is_err() {
            return;
        }
    }
}

/// A port whose accept queue is full: the kernel drops further connection attempts, so
/// a client's connect hangs until its own timeout. Keep it alive while it is used.
pub struct BlackHole {
    pub addr: SocketAddr,
    _fd: std::os::fd::OwnedFd,
    _filler: Vec<TcpStream>,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: plain socket calls on a descriptor this function owns; `addr` is a
        // properly initialized sockaddr_in of the size passed.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let owned = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len),
                0
            );
            assert_eq!(libc::listen(fd, 0), 0);
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut bound_len = len;
            assert_eq!(
                libc::getsockname(
                    fd,
                    (&mut bound as *mut libc::sockaddr_in).cast(),
                    &mut bound_len
                ),
                0
            );
            let port = u16::from_be(bound.sin_port);
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            // A backlog of 0 holds one connection: fill it (and one more for good
            // measure, with a short timeout since it may hang).
            let mut filler = Vec::new();
            for _ in 0..2 {
                if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                    filler.push(s);
                }
            }
            BlackHole {
                addr,
                _fd: owned,
                _filler: filler,
            }
        }
    }
}
