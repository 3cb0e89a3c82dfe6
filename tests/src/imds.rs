//! An instance metadata service that behaves as EC2's IMDSv2 does, for the VM tests and
//! `packaging/image/run.sh`: tokens are required (a `PUT /latest/api/token` with
//! `X-aws-ec2-metadata-token-ttl-seconds` of 1–21600 gives one; a read without a valid,
//! unexpired token is 401), a `PUT` carrying `X-Forwarded-For` is refused (EC2 refuses
//! tokens through a proxy), `GET /latest/user-data` is 404 when there is none, and the
//! meta-data items and identity document a launched instance has are served.
//!
//! The guest reaches it at 169.254.169.254 through qemu's `guestfwd`, which runs
//! `keel-imds relay 127.0.0.1:<port>` for each connection (see [`relay`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;

/// What the metadata service serves.
#[derive(Debug, Clone, Default)]
pub struct Instance {
    /// `/latest/user-data`; `None` answers 404 as EC2 does for an instance without any.
    pub user_data: Option<Vec<u8>>,
    /// Extra `/latest/meta-data/…` and `/latest/dynamic/…` paths and bodies.
    pub extra: HashMap<String, String>,
}

impl Instance {
    /// An instance with `user_data` and the usual meta-data of an m5.large in us-west-2.
    pub fn with_user_data(user_data: Option<Vec<u8>>) -> Instance {
        let mut extra = HashMap::new();
        for (path, body) in [
            ("/latest/meta-data/instance-id", "i-0123456789abcdef0"),
            ("/latest/meta-data/instance-type", "m5.large"),
            ("/latest/meta-data/local-ipv4", "10.0.2.15"),
            (
                "/latest/meta-data/local-hostname",
                "ip-10-0-2-15.us-west-2.compute.internal",
            ),
            ("/latest/meta-data/mac", "52:54:00:12:34:56"),
            (
                "/latest/meta-data/network/interfaces/macs/52:54:00:12:34:56/vpc-ipv4-cidr-blocks",
                "10.0.0.0/16",
            ),
            (
                "/latest/meta-data/placement/availability-zone",
                "us-west-2a",
            ),
            (
                "/latest/dynamic/instance-identity/document",
                r#"{"accountId":"123456789012","architecture":"x86_64","availabilityZone":"us-west-2a","imageId":"ami-0123456789abcdef0","instanceId":"i-0123456789abcdef0","instanceType":"m5.large","privateIp":"10.0.2.15","region":"us-west-2"}"#,
            ),
        ] {
            extra.insert(path.to_owned(), body.to_owned());
        }
        Instance { user_data, extra }
    }
}

/// One request the service answered: method, path, status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// A running metadata service on 127.0.0.1; stops when dropped.
pub struct Imds {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

struct State {
    instance: Instance,
    tokens: Mutex<HashMap<String, Instant>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Imds {
    /// Serves `instance` on an ephemeral loopback port.
    pub fn start(instance: Instance) -> std::io::Result<Imds> {
        Self::start_on("127.0.0.1:0", instance)
    }

    /// Serves `instance` on `listen`.
    pub fn start_on(listen: &str, instance: Instance) -> std::io::Result<Imds> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State {
            instance,
            tokens: Mutex::new(HashMap::new()),
            seen: seen.clone(),
        });
        let stopping = stop.clone();
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        std::thread::spawn(move || {
                            let _ = serve_connection(stream, &state);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Imds { addr, seen, stop })
    }

    /// Every request answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many times the user-data was served (status 200).
    pub fn user_data_reads(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path == "/latest/user-data" && s.status == 200)
            .count()
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_connection(stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some((method, path, headers)) = read_head(&mut reader)? else {
            return Ok(());
        };
        // A body (none expected) is read and ignored so keep-alive stays in step.
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if length > MAX_HEAD {
            return Ok(());
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let (status, reply) = answer(state, &method, &path, &headers);
        if let Ok(mut seen) = state.seen.lock() {
            seen.push(Seen {
                method: method.clone(),
                path: path.clone(),
                status,
            });
        }
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Error",
        };
        write!(
            writer,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nServer: EC2ws\r\n\r\n",
            reply.len()
        )?;
        writer.write_all(&reply)?;
        writer.flush()?;
    }
}

type Head = (String, String, HashMap<String, String>);

fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut headers = HashMap::new();
    let mut total = line.len();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        total += header.len();
        if total > MAX_HEAD {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    Ok(Some((method, path, headers)))
}

fn answer(
    state: &State,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
) -> (u16, Vec<u8>) {
    if path == "/latest/api/token" {
        if method != "PUT" {
            return (405, Vec::new());
        }
        if headers.contains_key("x-forwarded-for") {
            return (403, Vec::new());
        }
        let ttl: Option<u64> = headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| v.parse().ok())
            .filter(|t| (1..=21_600).contains(t));
        let Some(ttl) = ttl else {
            return (400, Vec::new());
        };
        let token: String = (0..4)
            .map(|_| format!("{:016x}", rand::random::<u64>()))
            .collect();
        if let Ok(mut tokens) = state.tokens.lock() {
            tokens.insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        }
        return (200, token.into_bytes());
    }
    if method != "GET" {
        return (405, Vec::new());
    }
    let valid = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|t| {
            state
                .tokens
                .lock()
                .ok()
                .and_then(|tokens| tokens.get(t).copied())
        })
        .is_some_and(|expiry| Instant::now() < expiry);
    if !valid {
        return (401, Vec::new());
    }
    if path == "/latest/user-data" {
        return match &state.instance.user_data {
            Some(data) => (200, data.clone()),
            None => (404, Vec::new()),
        };
    }
    match state.instance.extra.get(path) {
        Some(body) => (200, body.clone().into_bytes()),
        None => (404, Vec::new()),
    }
}

/// Copies between stdin/stdout and a TCP connection to `target` until both sides end:
/// what qemu's `guestfwd=…-cmd:` runs for each guest connection.
pub fn relay(target: &str) -> std::io::Result<()> {
    let upstream = TcpStream::connect(target)?;
    let mut to_upstream = upstream.try_clone()?;
    let mut from_upstream = upstream;
    let copy_in = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_upstream);
        let _ = to_upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from_upstream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(copy_in);
    Ok(())
}
