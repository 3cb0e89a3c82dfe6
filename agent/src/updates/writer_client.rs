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

use super::loader::BootParameters;
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
        match self.call(&Request::Inspect).await? {
            Answer::Inspection { inspection, .. } => Ok(inspection),
            Answer::Failed { error, .. } => Err(WriterError::Refused(error)),
            Answer::Written { .. } => Err(WriterError::Gone("unexpected answer".to_owned())),
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
    pub async fn write<S>(
        &mut self,
        request: &Request,
        size: u64,
        source: S,
        mut progress: impl FnMut(u64),
    ) -> Result<Written, WriterError>
    where
        S: Stream<Item = Result<Bytes, RepositoryError>> + Send,
    {
        self.send_line(request).await?;
        let mut source = std::pin::pin!(source);
        let mut sent = 0u64;
        while let Some(chunk) = source.next().await {
            let chunk = chunk.map_err(WriterError::Source)?;
            if sent + chunk.len() as u64 > size {
                return Err(WriterError::Source(RepositoryError::Other(format!(
                    "the target is longer than its announced {size} bytes"
                ))));
            }
            if let Err(e) = self.writer.write_all(&chunk).await {
                // The writer stopped reading: its answer says why.
                return Err(match self.read_answer(Duration::from_secs(5)).await {
                    Ok(Answer::Failed { error, .. }) => WriterError::Refused(error),
                    _ => WriterError::Gone(e.to_string()),
                });
            }
            sent += chunk.len() as u64;
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

/// One session that writes `settings.boot`'s parameters into the loader entries (see
/// `loader.rs`); answers the entries rewritten.
pub async fn set_boot_parameters(
    endpoint: &WriterEndpoint,
    parameters: BootParameters,
) -> Result<Vec<String>, WriterError> {
    let mut session = WriterSession::open(endpoint).await?;
    let written = session
        .simple(&Request::SetBootParameters { parameters })
        .await;
    session.close().await;
    Ok(written?.entries)
}

fn written(answer: Answer) -> Result<Written, WriterError> {
    match answer {
        Answer::Written { written, .. } => Ok(written),
        Answer::Failed { error, .. } => Err(WriterError::Refused(error)),
        Answer::Inspection { .. } => Err(WriterError::Gone("unexpected answer".to_owned())),
    }
}
