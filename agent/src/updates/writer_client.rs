//! keeld's side of a slot-writer session: reaches `keel-slot-writer` (its socket, or a
//! process keeld spawns), sends requests, streams payloads, reads answers.
//!
//! Owns the transport of the protocol (`protocol.rs`) and how its failures read. Must
//! not decide what to write: `prepare.rs` and `machine.rs` do.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::loader::{BootParameters, Settled};
use super::protocol::{Answer, Inspection, Request, Written, MAX_LINE};
use super::repository::RepositoryError;

/// How keeld reaches the slot writer.
#[derive(Debug, Clone)]
pub enum WriterEndpoint {
    /// A socket of `keel-slot-writer.socket` (`Accept=yes`: one helper per connection).
    Socket(PathBuf),
    /// A command keeld starts per session, speaking on its stdin and stdout (tests, and
    /// hosts without the socket unit).
    Command(Vec<String>),
}

impl std::fmt::Display for WriterEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriterEndpoint::Socket(path) => write!(f, "socket {}", path.display()),
            WriterEndpoint::Command(argv) => write!(f, "command {}", argv.join(" ")),
        }
    }
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("cannot reach the slot writer ({endpoint}): {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("the slot writer refused: {0}")]
    Refused(String),
    #[error("the slot writer went away: {0}")]
    Gone(String),
    /// The bytes to write could not be had; the writer got less than announced and wrote
    /// nothing bootable.
    #[error(transparent)]
    Source(RepositoryError),
}

type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// One session.
pub struct WriterSession {
    reader: Reader,
    writer: Writer,
    /// The spawned helper; killed if the session is dropped half way.
    child: Option<tokio::process::Child>,
}

impl std::fmt::Debug for WriterSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterSession").finish_non_exhaustive()
    }
}

/// How long an answer without a payload may take (removing or writing one small file).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// After a payload: the writer syncs the partition and checks the hash tree.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(600);

impl WriterSession {
    pub async fn open(endpoint: &WriterEndpoint) -> Result<WriterSession, WriterError> {
        let connect = |reason: String| WriterError::Connect {
            endpoint: endpoint.to_string(),
            reason,
        };
        match endpoint {
            WriterEndpoint::Socket(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| connect(e.to_string()))?;
                // A larger send buffer: fewer wake-ups of either side per payload (the
                // kernel caps it at net.core.wmem_max; the default still works, slower).
                if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&stream, PIECE) {
                    tracing::debug!(error = %e, "cannot enlarge the socket to the slot writer");
                }
                let (read, write) = stream.into_split();
                Ok(WriterSession {
                    reader: BufReader::new(Box::new(read)),
                    writer: Box::new(write),
                    child: None,
                })
            }
            WriterEndpoint::Command(argv) => {
                let (program, args) = argv
                    .split_first()
                    .ok_or_else(|| connect("empty command".to_owned()))?;
                let mut child = tokio::process::Command::new(program)
                    .args(args)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| connect(e.to_string()))?;
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err(connect("no pipes to the writer".to_owned()));
                };
                // A larger pipe: fewer wake-ups of either side per payload. The default
                // (64 KiB) still works, only slower.
                if let Err(e) = rustix::pipe::fcntl_setpipe_size(&stdin, PIECE) {
                    tracing::debug!(error = %e, "cannot enlarge the pipe to the slot writer");
                }
                Ok(WriterSession {
                    reader: BufReader::new(Box::new(stdout)),
                    writer: Box::new(stdin),
                    child: Some(child),
                })
            }
        }
    }

    async fn send_line(&mut self, request: &Request) -> Result<(), WriterError> {
        let mut line = serde_json::to_vec(request).map_err(|e| WriterError::Gone(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| WriterError::Gone(e.to_string()))?;
        self.writer
            .flush()
            .await
            .map_err(|e| WriterError::Gone(e.to_string()))
    }

    async fn read_answer(&mut self, timeout: Duration) -> Result<Answer, WriterError> {
        let mut line = Vec::new();
        let read = tokio::time::timeout(timeout, async {
            let mut limited = (&mut self.reader).take(MAX_LINE as u64 + 1);
            limited.read_until(b'\n', &mut line).await
        })
        .await
        .map_err(|_| {
            WriterError::Gone(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(|e| WriterError::Gone(e.to_string()))?;
        if read == 0 {
            return Err(WriterError::Gone("it closed the session".to_owned()));
        }
        serde_json::from_slice(&line).map_err(|e| WriterError::Gone(format!("bad answer: {e}")))
    }

    async fn call(&mut self, request: &Request) -> Result<Answer, WriterError> {
        self.send_line(request).await?;
        self.read_answer(ANSWER_TIMEOUT).await
    }

    pub async fn inspect(&mut self) -> Result<Inspection, WriterError> {
        self.inspect_with(&Request::Inspect).await
    }

    /// `request`: [`Request::Inspect`], or [`Request::InspectSettled`] (the entries once
    /// no other session holds the slots).
    pub async fn inspect_with(&mut self, request: &Request) -> Result<Inspection, WriterError> {
        match self.call(request).await? {
            Answer::Inspection { inspection, .. } => Ok(inspection),
            Answer::Failed { error, .. } => Err(WriterError::Refused(error)),
            Answer::Written { .. } | Answer::Parameters { .. } => {
                Err(WriterError::Gone("unexpected answer".to_owned()))
            }
        }
    }

    /// A request without payload that answers `Written`.
    pub async fn simple(&mut self, request: &Request) -> Result<Written, WriterError> {
        written(self.call(request).await?)
    }

    /// Sends `request` (a write of `size` bytes) and the bytes of `source`, calling
    /// `progress` with the bytes sent so far. Fails with [`WriterError::Source`] when the
    /// source fails or yields another length than announced: the writer then gets less
    /// than it was told and refuses, and the session is over.
    ///
    /// The source is read ahead by its own task (the download and `tough`'s sha256 run
    /// there), so receiving and hashing the next bytes overlaps handing these to the
    /// writer; at most [`READ_AHEAD`] pieces of [`PIECE`] bytes wait between the two.
    pub async fn write<S>(
        &mut self,
        request: &Request,
        size: u64,
        source: S,
        mut progress: impl FnMut(u64),
    ) -> Result<Written, WriterError>
    where
        S: Stream<Item = Result<Bytes, RepositoryError>> + Send + 'static,
    {
        self.send_line(request).await?;
        let (pieces, mut received) = tokio::sync::mpsc::channel(READ_AHEAD);
        // Dropped on every way out: a write that fails stops the download at once.
        let _reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(read_ahead(
            source, size, pieces,
        )));
        let mut sent = 0u64;
        while let Some(piece) = received.recv().await {
            let mut piece = piece.map_err(WriterError::Source)?;
            let len = piece.len();
            if let Err(e) = write_piece(&mut self.writer, &mut piece).await {
                // The writer stopped reading: its answer says why.
                return Err(match self.read_answer(Duration::from_secs(5)).await {
                    Ok(Answer::Failed { error, .. }) => WriterError::Refused(error),
                    _ => WriterError::Gone(e.to_string()),
                });
            }
            sent += len as u64;
            progress(sent);
        }
        if sent != size {
            return Err(WriterError::Source(RepositoryError::Other(format!(
                "the target ended after {sent} of its {size} bytes"
            ))));
        }
        self.writer
            .flush()
            .await
            .map_err(|e| WriterError::Gone(e.to_string()))?;
        written(self.read_answer(VERIFY_TIMEOUT).await?)
    }

    /// Ends the session: the writer sees the end of its input and exits.
    pub async fn close(mut self) {
        let _ = self.writer.shutdown().await;
        drop(self.writer);
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
}

/// One session that hands `settings.boot`'s parameters to the next boot as a trial (see
/// `loader.rs`); answers where the trial stands.
pub async fn set_boot_parameters(
    endpoint: &WriterEndpoint,
    parameters: BootParameters,
) -> Result<Settled, WriterError> {
    parameters_session(endpoint, &Request::SetBootParameters { parameters }).await
}

/// One session that settles the parameter trial at a boot's start: a trial that reached
/// `configured` is kept, one that failed is removed and reported.
pub async fn settle_boot_parameters(endpoint: &WriterEndpoint) -> Result<Settled, WriterError> {
    parameters_session(endpoint, &Request::SettleBootParameters).await
}

async fn parameters_session(
    endpoint: &WriterEndpoint,
    request: &Request,
) -> Result<Settled, WriterError> {
    let mut session = WriterSession::open(endpoint).await?;
    let answer = session.call(request).await;
    session.close().await;
    match answer? {
        Answer::Parameters { parameters, .. } => Ok(parameters),
        Answer::Failed { error, .. } => Err(WriterError::Refused(error)),
        Answer::Inspection { .. } | Answer::Written { .. } => {
            Err(WriterError::Gone("unexpected answer".to_owned()))
        }
    }
}

/// Bytes handed to the writer per piece, at least: the download yields pieces of a few
/// KiB to a few hundred, and each write to the writer's socket or pipe wakes it.
const PIECE: usize = 1 << 20;
/// Pieces read ahead of the writer, at most.
const READ_AHEAD: usize = 8;
/// Downloaded chunks shorter than this are copied together; longer ones are handed on as
/// they are (one `writev` takes them all), so most bytes are not copied in keeld at all.
const SMALL: usize = 32 * 1024;
/// Slices per `writev`: well under the kernel's `IOV_MAX` (1024).
const SLICES: usize = 64;

/// At least [`PIECE`] bytes of the download, in the chunks it came in (short ones joined).
#[derive(Debug, Default)]
struct Piece {
    parts: std::collections::VecDeque<Bytes>,
    /// Short chunks being joined; its spare capacity is reused from piece to piece.
    small: bytes::BytesMut,
    len: usize,
}

impl Piece {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        if chunk.len() >= SMALL {
            self.seal_small();
            self.parts.push_back(chunk);
        } else {
            if self.small.capacity() - self.small.len() < chunk.len() {
                self.seal_small();
                self.small.reserve(PIECE);
            }
            self.small.extend_from_slice(&chunk);
        }
    }

    fn seal_small(&mut self) {
        if !self.small.is_empty() {
            self.parts.push_back(self.small.split().freeze());
        }
    }

    /// The bytes gathered so far, as a piece of their own; `self` starts again empty
    /// (keeping the spare capacity of its buffer for short chunks).
    fn take(&mut self) -> Piece {
        self.seal_small();
        Piece {
            parts: std::mem::take(&mut self.parts),
            small: bytes::BytesMut::new(),
            len: std::mem::take(&mut self.len),
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Writes all of `piece` with vectored writes, consuming it.
async fn write_piece<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    piece: &mut Piece,
) -> std::io::Result<()> {
    use bytes::Buf;
    while !piece.parts.is_empty() {
        let slices: Vec<std::io::IoSlice<'_>> = piece
            .parts
            .iter()
            .take(SLICES)
            .map(|part| std::io::IoSlice::new(part))
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(front) = piece.parts.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                piece.parts.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

/// Reads `source` into pieces of at least [`PIECE`] bytes for `pieces`; a failure of the
/// source, or more bytes than `size`, is the last item. Ends early when the receiver is
/// gone.
async fn read_ahead<S>(
    source: S,
    size: u64,
    pieces: tokio::sync::mpsc::Sender<Result<Piece, RepositoryError>>,
) where
    S: Stream<Item = Result<Bytes, RepositoryError>> + Send,
{
    let mut source = std::pin::pin!(source);
    let mut piece = Piece::default();
    let mut read = 0u64;
    while let Some(chunk) = source.next().await {
        let chunk = match chunk {
            Ok(chunk) if read + chunk.len() as u64 <= size => chunk,
            Ok(_) => {
                let _ = pieces
                    .send(Err(RepositoryError::Other(format!(
                        "the target is longer than its announced {size} bytes"
                    ))))
                    .await;
                return;
            }
            Err(e) => {
                let _ = pieces.send(Err(e)).await;
                return;
            }
        };
        read += chunk.len() as u64;
        piece.push(chunk);
        if piece.len() >= PIECE && pieces.send(Ok(piece.take())).await.is_err() {
            return;
        }
    }
    if !piece.is_empty() {
        let _ = pieces.send(Ok(piece.take())).await;
    }
}

fn written(answer: Answer) -> Result<Written, WriterError> {
    match answer {
        Answer::Written { written, .. } => Ok(written),
        Answer::Failed { error, .. } => Err(WriterError::Refused(error)),
        Answer::Inspection { .. } | Answer::Parameters { .. } => {
            Err(WriterError::Gone("unexpected answer".to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updates::protocol::{Answer, Written};
    use crate::updates::slots::{Part, Slot};
    use futures_util::stream;

    type Source = Vec<Result<Bytes, RepositoryError>>;

    fn chunks(count: usize, len: usize) -> Source {
        (0..count)
            .map(|i| Ok(Bytes::from(vec![(i % 251) as u8; len])))
            .collect()
    }

    fn request(size: u64) -> Request {
        Request::WritePartition {
            slot: Slot::B,
            part: Part::Hash,
            size,
            sha256: "00".repeat(32),
            root_hash: None,
        }
    }

    /// A slot writer on a socket that takes one write and answers what it received.
    async fn fake_writer(
        dir: &std::path::Path,
    ) -> (WriterEndpoint, tokio::task::JoinHandle<Vec<u8>>) {
        let path = dir.join("writer.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut line = Vec::new();
            read.read_until(b'\n', &mut line).await.expect("line");
            let Ok(Request::WritePartition { size, .. }) = serde_json::from_slice(&line) else {
                panic!("not a write: {}", String::from_utf8_lossy(&line));
            };
            let mut payload = Vec::new();
            let _ = (&mut read).take(size).read_to_end(&mut payload).await;
            let answer = Answer::Written {
                ok: true,
                written: Written {
                    bytes: payload.len() as u64,
                    sha256: None,
                    root_hash: None,
                    entries: Vec::new(),
                },
            };
            let mut reply = serde_json::to_vec(&answer).expect("json");
            reply.push(b'\n');
            let _ = write.write_all(&reply).await;
            payload
        });
        (WriterEndpoint::Socket(path), task)
    }

    #[tokio::test]
    async fn small_pieces_of_the_download_reach_the_writer_whole_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (endpoint, writer) = fake_writer(dir.path()).await;
        let source = chunks(3000, 1000);
        let expected: Vec<u8> = source
            .iter()
            .flat_map(|c| c.as_ref().expect("chunk").to_vec())
            .collect();
        let mut session = WriterSession::open(&endpoint).await.expect("open");
        let mut seen = Vec::new();
        let written = session
            .write(&request(3_000_000), 3_000_000, stream::iter(source), |n| {
                seen.push(n)
            })
            .await
            .expect("write");
        assert_eq!(written.bytes, 3_000_000);
        assert_eq!(writer.await.expect("writer"), expected);
        // Progress rises to the whole size, a piece of at least PIECE bytes at a time.
        assert_eq!(seen.last(), Some(&3_000_000));
        assert!(seen
            .windows(2)
            .all(|w| w[1] - w[0] >= PIECE as u64 || w[1] == 3_000_000));
        assert!(seen[0] >= PIECE as u64);
    }

    #[tokio::test]
    async fn chunks_long_and_short_reach_the_writer_whole_and_in_order() {
        // Long chunks go on as they are, short ones are joined, and a writev the socket
        // takes only in part goes on where it stopped.
        let lens = [1000, 50_000, 7, 300_000, SMALL - 1, SMALL, 3 * PIECE, 1];
        let source: Source = (0..40)
            .map(|i| {
                let len = lens[i % lens.len()];
                Ok(Bytes::from(
                    (0..len)
                        .map(|j| ((i * 31 + j) % 253) as u8)
                        .collect::<Vec<u8>>(),
                ))
            })
            .collect();
        let expected: Vec<u8> = source
            .iter()
            .flat_map(|c| c.as_ref().expect("chunk").to_vec())
            .collect();
        let size = expected.len() as u64;
        let dir = tempfile::tempdir().expect("tempdir");
        let (endpoint, writer) = fake_writer(dir.path()).await;
        let mut session = WriterSession::open(&endpoint).await.expect("open");
        let written = session
            .write(&request(size), size, stream::iter(source), |_| {})
            .await
            .expect("write");
        assert_eq!(written.bytes, size);
        assert!(writer.await.expect("writer") == expected, "bytes differ");
    }

    #[tokio::test]
    async fn a_source_longer_or_shorter_than_announced_or_failing_fails_the_write() {
        let cases: Vec<(u64, Source, &str)> = vec![
            (
                2_500_000,
                chunks(3000, 1000),
                "longer than its announced 2500000 bytes",
            ),
            (
                3_500_000,
                chunks(3000, 1000),
                "ended after 3000000 of its 3500000 bytes",
            ),
            (
                3_000_000,
                chunks(1500, 1000)
                    .into_iter()
                    .chain([Err(RepositoryError::Other("the repository stalled".into()))])
                    .collect(),
                "the repository stalled",
            ),
        ];
        for (size, source, expected) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let (endpoint, _writer) = fake_writer(dir.path()).await;
            let mut session = WriterSession::open(&endpoint).await.expect("open");
            let error = session
                .write(&request(size), size, stream::iter(source), |_| {})
                .await
                .expect_err("must fail");
            assert!(
                matches!(&error, WriterError::Source(e) if e.to_string().contains(expected)),
                "{expected}: {error}"
            );
        }
    }
}
