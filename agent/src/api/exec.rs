//! `GET /exec`: a process in a running host container, over a WebSocket
//! (`apiclient exec`). Owns the upgrade and the session's protocol; starting, steering
//! and removing the process is `containers::exec`'s.
//!
//! The protocol is Bottlerocket's (its apiserver's `/exec` and its apiclient), so either
//! side talks to the other's. Facts, as both implement them:
//!
//! - `GET /exec`, an ordinary HTTP/1.1 WebSocket upgrade (Bottlerocket's client sends
//!   its `Sec-WebSocket-Key` without base64 padding); no query parameters, no
//!   subprotocol. Everything else travels in messages.
//! - Text frames carry JSON control messages (serde's externally tagged enums, see
//!   `settings_model::exec`); binary frames carry process data, unencoded: stdin from
//!   the client, output from the server. Messages are handled in order.
//! - The client's first message is `{"Initialize":{"command":[…],"target":"admin",
//!   "tty":null|{"size":null|{"rows":R,"cols":C}}}}`; the command is a list of
//!   `OsString`, written `{"Unix":[bytes…]}`. The target is the container's name.
//!   Process data before it is a protocol violation (1008); Bottlerocket ignores a
//!   `Winch` before it, and so does keeld.
//! - Without a terminal, Bottlerocket merges stdout and stderr into one stream of binary
//!   frames; with one, the terminal does. The client writes all of them to its stdout.
//! - `"ContentComplete"`: the client's input ended; the process's stdin is closed once
//!   what came before is written. `{"Winch":{"rows":R,"cols":C}}`: the terminal's new
//!   size (ignored without a terminal).
//! - Flow control of the input: the server sends `{"Capacity":{"max_messages_outstanding":
//!   1024,"messages_written":N}}` when the session opens and after every 128 input
//!   messages written to the process; the client reads no more input while it has sent
//!   more than `max_messages_outstanding` beyond `messages_written`. A client that
//!   overruns is closed with 1009. The output needs no such messages: the server reads
//!   the process's output only as fast as the client takes the frames.
//! - Heartbeat: both sides ping every 2 s; a side that heard nothing for 10 s considers
//!   the other gone.
//! - The end: the server closes with code 1000 and the process's exit status as the
//!   reason, in decimal (`"0"`, `"7"`; 128 + n when signal n ended it). The client exits
//!   with it; with any other code it prints the reason and exits 1. Bottlerocket's server
//!   closes with 1007 for JSON it cannot read, 1008 for messages out of order, 1009 for
//!   an overrun and 1011 when the process cannot be started.
//! - A client that goes away (closes, or its socket does) takes its process with it:
//!   the server kills it.
//! - Bottlerocket's client catches SIGINT, SIGTERM and SIGQUIT and exits 128 + n (which
//!   closes the connection); the protocol has no signal message.
//!
//! Keel's additions, only for a client that sends `"keel_protocol":1` in its
//! `Initialize` (Bottlerocket's client fails on a message it does not know, so it never
//! gets one): `{"Started":{"keel_protocol":1,"separate_stderr":B}}` once the process
//! runs; every output frame then starts with a stream byte, 1 for stdout and 2 for
//! stderr, so the two stay apart; `{"Signal":"SIGTERM"}` from the client signals the
//! process; `{"Refused":{"message":…}}` answers a control message that had no effect
//! (an unknown signal, a 0x0 window size), and the session goes on.
//!
//! Keel's close codes besides Bottlerocket's: 4400 a command keeld cannot run (empty,
//! not UTF-8, a NUL byte, or one the runtime cannot start: not found), 4404 no host container of that name (also for a bootstrap
//! container's name), 4409 the host container is not running, 1001 keeld is stopping,
//! 1002 a malformed frame. Before the upgrade, ordinary HTTP errors: 400 for a request
//! that is not a WebSocket upgrade or has query parameters, 403 for a caller outside the
//! API group, 503 when [`MAX_SESSIONS`] execs already run.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use settings_model::exec::{
    self as wire, Capacity, ClientMessage, Refused, ServerMessage, Started, KEEL_PROTOCOL,
    MAX_INPUT_BYTES_OUTSTANDING, MAX_MESSAGES_OUTSTANDING, MAX_MESSAGE_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

use super::error::ApiError;
use super::input::Query;
use crate::containers::exec::{ExecEngine, ExecError, ExecProcess, ExecRequest, WindowSize};

/// Most exec sessions at once; further upgrades are answered 503.
pub const MAX_SESSIONS: usize = 64;
/// The server pings the client this often.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A client not heard from for this long is gone.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The `Initialize` must arrive within this time of the upgrade.
const INITIALIZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest output frame.
const OUTPUT_CHUNK: usize = 32 * 1024;
/// Frames waiting for the client's socket (output and control): with [`OUTPUT_CHUNK`],
/// what a session holds of the process's output, whatever the client's speed.
const OUTGOING_QUEUE: usize = 8;
/// After the process exited, output still arriving is forwarded until both streams end,
/// or nothing came for this long while the client kept up (a child of the process may
/// hold them open).
const AFTER_EXIT_IDLE: Duration = Duration::from_millis(500);
/// How long the close frame and the output before it may take to reach the client.
const FINAL_FLUSH: Duration = Duration::from_secs(30);
/// The longest close reason a WebSocket close frame carries (125 bytes minus the code).
const MAX_REASON: usize = 123;

/// Keel's close codes, after HTTP's: the command cannot run, no such host container,
/// the container does not run.
pub const CLOSE_BAD_REQUEST: u16 = 4400;
pub const CLOSE_NOT_FOUND: u16 = 4404;
pub const CLOSE_CONFLICT: u16 = 4409;

/// The exec sessions of one keeld: the engine, the bound on their number, and the
/// signal that keeld is stopping.
#[derive(Debug)]
pub struct ExecService<E> {
    engine: Arc<E>,
    sessions: Arc<Semaphore>,
    stopping: watch::Sender<bool>,
}

impl<E> Clone for ExecService<E> {
    fn clone(&self) -> Self {
        ExecService {
            engine: self.engine.clone(),
            sessions: self.sessions.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

impl<E: ExecEngine> ExecService<E> {
    pub fn new(engine: E) -> Self {
        ExecService {
            engine: Arc::new(engine),
            sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
            stopping: watch::channel(false).0,
        }
    }

    /// Ends every session (their processes are killed, clients get 1001) and waits up
    /// to `grace` for them to finish. Answers whether they all did.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.stopping.send_replace(true);
        let all = u32::try_from(MAX_SESSIONS).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.sessions.acquire_many(all))
            .await
            .is_ok()
    }
}

/// `GET /exec`: upgrades to a WebSocket and runs one session on it.
pub async fn upgrade<E: ExecEngine>(
    State(service): State<ExecService<E>>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    Query::parse(query.as_deref(), &[])?;
    let ws = ws.map_err(|rejection| {
        ApiError::bad_request(format!(
            "/exec is a WebSocket: {}",
            rejection.body_text().to_lowercase()
        ))
    })?;
    let permit = service.sessions.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_SESSIONS} exec sessions are running already; try again later"),
        )
    })?;
    let stopping = service.stopping.subscribe();
    Ok(ws
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            Session::new(socket, stopping).run(&*service.engine).await;
        }))
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The process exited with this status.
    Exited(u32),
    /// The client closed, its socket went away, or it fell silent.
    ClientGone,
    /// keeld closes the session with this code and reason.
    Close(u16, String),
}

/// One WebSocket session, from the upgrade to the clean-up.
struct Session {
    stream: futures_util::stream::SplitStream<WebSocket>,
    outgoing: mpsc::Sender<Message>,
    writer: tokio::task::JoinHandle<()>,
    stopping: watch::Receiver<bool>,
    keel: bool,
    /// Control messages refused so far: the first few are logged at info, the rest at
    /// debug, so that a client cannot fill the journal with refusals.
    refused: std::sync::atomic::AtomicU32,
}

/// Refused control messages of one session logged at info level.
const REFUSALS_LOGGED: u32 = 4;

/// Most characters of a client's text (a signal name) repeated in a refusal.
const ECHO_MAX: usize = 64;

/// `text` as a refusal repeats it: quoted and escaped, at most [`ECHO_MAX`] characters.
fn echoed(text: &str) -> String {
    if text.chars().count() <= ECHO_MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(ECHO_MAX).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}

impl Session {
    fn new(socket: WebSocket, stopping: watch::Receiver<bool>) -> Session {
        let (sink, stream) = socket.split();
        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        let writer = tokio::spawn(write_frames(sink, queue));
        Session {
            stream,
            outgoing,
            writer,
            stopping,
            keel: false,
            refused: std::sync::atomic::AtomicU32::new(0),
        }
    }

    async fn run<E: ExecEngine>(mut self, engine: &E) {
        self.send_control(&ServerMessage::Capacity(Capacity {
            max_messages_outstanding: MAX_MESSAGES_OUTSTANDING,
            messages_written: 0,
        }))
        .await;
        let request = match self.initialize().await {
            Ok(request) => request,
            Err(End::Close(code, reason)) => return self.close(code, &reason).await,
            Err(_) => return self.finish_writer().await,
        };
        let started = tokio::select! {
            started = engine.start(&request) => Some(started),
            _ = self.stopping.wait_for(|s| *s) => None,
        };
        let (process, io) = match started {
            // A process started meanwhile is not lost: its FIFOs are swept at the next
            // start, and keeld is stopping.
            None => return self.close(close_code::AWAY, "keeld is stopping").await,
            Some(Ok(started)) => started,
            Some(Err(e)) => {
                let code = close_code_of(&e);
                if code == close_code::ERROR {
                    tracing::error!(target_container = ?request.target, error = %e, "exec failed to start");
                } else {
                    tracing::info!(target_container = ?request.target, error = %e, "exec refused");
                }
                return self.close(code, &e.to_string()).await;
            }
        };
        let process = Arc::new(process);
        let guard = RemoveOnDrop(Some(process.clone()));
        if self.keel {
            self.send_control(&ServerMessage::Started(Started {
                keel_protocol: KEEL_PROTOCOL,
                separate_stderr: io.stderr.is_some(),
            }))
            .await;
        }
        let (stdout_tag, stderr_tag) = match self.keel {
            true => (Some(wire::STDOUT), Some(wire::STDERR)),
            false => (None, None),
        };
        let epoch = Instant::now();
        let activity = Arc::new(AtomicU64::new(0));
        let mut pumps = vec![tokio::spawn(pump_output(
            io.stdout,
            stdout_tag,
            self.outgoing.clone(),
            activity.clone(),
            epoch,
        ))];
        if let Some(stderr) = io.stderr {
            pumps.push(tokio::spawn(pump_output(
                stderr,
                stderr_tag,
                self.outgoing.clone(),
                activity.clone(),
                epoch,
            )));
        }
        let input = Input::start(io.stdin, process.clone(), self.outgoing.clone());
        let end = self.steer(&*process, request.tty, input).await;
        tracing::debug!(exec = %process.id(), ?end, "exec session ends");
        match &end {
            End::Exited(status) => {
                // The output the process wrote before it exited goes first. The idle
                // time counts from the exit at the earliest: output written just before
                // it (after a quiet spell) may still be on its way through the shim.
                // And a full queue is a slow client, not a quiet process: the pumps wait
                // to send, and what is still in the pipes was written before the exit.
                let exited_at = epoch.elapsed();
                let _ = tokio::time::timeout(FINAL_FLUSH, async {
                    let mut client_behind_at = Duration::ZERO;
                    loop {
                        if pumps.iter().all(|p| p.is_finished()) {
                            return;
                        }
                        if self.outgoing.capacity() == 0 && !self.outgoing.is_closed() {
                            client_behind_at = epoch.elapsed();
                        }
                        let last = Duration::from_millis(activity.load(Ordering::Relaxed))
                            .max(exited_at)
                            .max(client_behind_at);
                        if epoch.elapsed().saturating_sub(last) > AFTER_EXIT_IDLE {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                tracing::info!(exec = %process.id(), status, "exec process exited");
                self.close(close_code::NORMAL, &status.to_string()).await;
            }
            End::ClientGone => self.finish_writer().await,
            End::Close(code, reason) => self.close(*code, reason).await,
        }
        // The pumps keep draining (into nothing, once the client is gone) while the
        // process is removed: the shim finishes copying its output before it forgets it.
        process.remove(matches!(end, End::Exited(_))).await;
        for pump in pumps {
            pump.abort();
        }
        drop(guard.disarm());
    }

    /// Waits for the `Initialize` message and turns it into a request.
    async fn initialize(&mut self) -> Result<ExecRequest, End> {
        let deadline = tokio::time::Instant::now() + INITIALIZE_TIMEOUT;
        loop {
            let message = tokio::select! {
                m = self.stream.next() => m,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(End::Close(close_code::POLICY, format!("no Initialize message within {INITIALIZE_TIMEOUT:?}")));
                }
                _ = self.stopping.wait_for(|s| *s) => {
                    return Err(End::Close(close_code::AWAY, "keeld is stopping".to_owned()));
                }
            };
            let text = match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(_))) => {
                    return Err(End::Close(
                        close_code::POLICY,
                        "process data sent before Initialize".to_owned(),
                    ))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => return Err(End::ClientGone),
                Some(Err(e)) => return Err(read_error(e)),
            };
            match parse_control(&text)? {
                ClientMessage::Initialize(init) => {
                    self.keel = init.keel_protocol.is_some_and(|v| v >= 1);
                    return request_of(init);
                }
                // Bottlerocket's server ignores this one too: the Initialize has the size.
                ClientMessage::Winch(_) => continue,
                other => {
                    return Err(End::Close(
                        close_code::POLICY,
                        format!("{} sent before Initialize", message_name(&other)),
                    ))
                }
            }
        }
    }

    /// Relays the client's messages to the process until it exits, the client goes
    /// away or keeld stops.
    async fn steer<P: ExecProcess>(&mut self, process: &P, tty: bool, mut input: Input) -> End {
        let wait = process.wait();
        tokio::pin!(wait);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        let mut last_heard = Instant::now();
        loop {
            let message = tokio::select! {
                status = &mut wait => {
                    input.abort();
                    return match status {
                        Ok(status) => End::Exited(status),
                        Err(e) => {
                            tracing::error!(exec = %process.id(), error = %e, "lost track of an exec process");
                            End::Close(close_code::ERROR, format!("lost track of the process: {e}"))
                        }
                    };
                }
                m = self.stream.next() => m,
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > CLIENT_TIMEOUT {
                        tracing::info!(exec = %process.id(), "exec client silent for {CLIENT_TIMEOUT:?}; taking it as gone");
                        return End::ClientGone;
                    }
                    // Skipped while output fills the queue: the client is busy then.
                    let _ = self.outgoing.try_send(Message::Ping(Bytes::new()));
                    continue;
                }
                _ = self.outgoing.closed() => return End::ClientGone,
                _ = self.stopping.wait_for(|s| *s) => {
                    return End::Close(close_code::AWAY, "keeld is stopping".to_owned());
                }
            };
            last_heard = Instant::now();
            let text = match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(data))) => {
                    if let Err(end) = input.push(data) {
                        return end;
                    }
                    continue;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => return End::ClientGone,
                Some(Err(e)) => return read_error(e),
            };
            let control = match parse_control(&text) {
                Ok(control) => control,
                Err(end) => return end,
            };
            match control {
                ClientMessage::Initialize(_) => {
                    return End::Close(close_code::POLICY, "Initialize sent twice".to_owned())
                }
                ClientMessage::ContentComplete => input.complete(),
                ClientMessage::Winch(size) if !tty => {
                    tracing::debug!(exec = %process.id(), ?size, "window size without a terminal; ignored");
                }
                ClientMessage::Winch(size) if !size.is_usable() => {
                    self.refuse(
                        process,
                        format!(
                            "window size {}x{} is not a terminal size; the size is unchanged",
                            size.cols, size.rows
                        ),
                    )
                    .await;
                }
                ClientMessage::Winch(size) => {
                    let size = WindowSize {
                        rows: size.rows,
                        cols: size.cols,
                    };
                    if let Err(e) = process.resize(size).await {
                        self.refuse(process, format!("cannot resize the terminal: {e}"))
                            .await;
                    }
                }
                ClientMessage::Signal(name) => match wire::signal_number(&name) {
                    Some(signal) => {
                        if let Err(e) = process.signal(signal).await {
                            self.refuse(process, format!("cannot send {name}: {e}"))
                                .await;
                        }
                    }
                    None => {
                        let known: Vec<&str> = wire::SIGNALS.iter().map(|(n, _)| *n).collect();
                        self.refuse(
                            process,
                            format!(
                                "unknown signal {}; known: {}",
                                echoed(&name),
                                known.join(", ")
                            ),
                        )
                        .await;
                    }
                },
            }
        }
    }

    /// Tells a Keel client that a control message had no effect (Bottlerocket's client
    /// would fail on the message: it only gets the log line).
    async fn refuse<P: ExecProcess>(&self, process: &P, message: String) {
        let n = self
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < REFUSALS_LOGGED {
            tracing::info!(exec = %process.id(), %message, "exec control message refused");
        } else {
            tracing::debug!(exec = %process.id(), %message, "exec control message refused");
        }
        if !self.keel {
            return;
        }
        // Never waits for room: a client that floods refused messages without reading
        // must not park the session, which has the process's exit, the client's silence
        // and keeld's stop to watch. The refusal is dropped instead; it is only advice.
        match serde_json::to_string(&ServerMessage::Refused(Refused { message })) {
            Ok(text) => {
                if self.outgoing.try_send(Message::Text(text.into())).is_err() {
                    tracing::debug!(exec = %process.id(), "the client is not reading: refusal not sent");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an exec control message"),
        }
    }

    async fn send_control(&self, message: &ServerMessage) {
        match serde_json::to_string(message) {
            Ok(text) => {
                let _ = self.outgoing.send(Message::Text(text.into())).await;
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an exec control message"),
        }
    }

    /// Sends the close frame and waits (bounded) for it and what was queued before it
    /// to leave; the writer ends after a close frame.
    async fn close(self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(truncate(reason, MAX_REASON)),
        };
        let Session {
            outgoing,
            mut writer,
            ..
        } = self;
        let flushed = tokio::time::timeout(FINAL_FLUSH, async {
            if outgoing.send(Message::Close(Some(frame))).await.is_ok() {
                let _ = (&mut writer).await;
            }
        })
        .await;
        if flushed.is_err() {
            writer.abort();
        }
    }

    /// The client is gone: nothing more is sent. (The output pumps still hold the
    /// queue while they drain, so the writer would not end by itself.)
    async fn finish_writer(self) {
        self.writer.abort();
    }
}

/// Sends the queued frames until the queue closes or a close frame went out.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Message>,
) {
    while let Some(message) = queue.recv().await {
        let closing = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || closing {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Reads one output stream into binary frames (with `tag` in front, for Keel's
/// protocol) until it ends. Once the client is gone the output is read and dropped, so
/// that the process and the shim never block on it.
async fn pump_output(
    mut output: Pin<Box<dyn AsyncRead + Send>>,
    tag: Option<u8>,
    outgoing: mpsc::Sender<Message>,
    activity: Arc<AtomicU64>,
    epoch: Instant,
) {
    let start = usize::from(tag.is_some());
    let mut buf = vec![0u8; OUTPUT_CHUNK + start];
    if let Some(tag) = tag {
        buf[0] = tag;
    }
    let mut client_gone = false;
    let mut last_frame: Option<tokio::time::Instant> = None;
    let mut ended = false;
    while !ended {
        let mut n = match read_some(&mut output, &mut buf[start..]).await {
            Some(0) | None => return,
            Some(n) => n,
        };
        // In a stream (the last frame went out less than BURST ago), what follows within
        // GATHER joins this frame: a process writing fast in small pieces then costs a
        // frame per OUTPUT_CHUNK, not one per piece. Output after a pause (a prompt, an
        // echo) goes out at once.
        if !client_gone && last_frame.is_some_and(|at| at.elapsed() < BURST) {
            let until = tokio::time::Instant::now() + GATHER;
            while start + n < buf.len() {
                match tokio::time::timeout_at(until, read_some(&mut output, &mut buf[start + n..]))
                    .await
                {
                    Err(_) => break,
                    Ok(Some(0) | None) => {
                        ended = true;
                        break;
                    }
                    Ok(Some(more)) => n += more,
                }
            }
        }
        let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.store(now, Ordering::Relaxed);
        if client_gone {
            continue;
        }
        let frame = Bytes::copy_from_slice(&buf[..start + n]);
        client_gone = outgoing.send(Message::Binary(frame)).await.is_err();
        last_frame = Some(tokio::time::Instant::now());
    }
}

/// Output within this long of the last frame is part of a stream (see [`pump_output`]).
const BURST: Duration = Duration::from_millis(2);
/// How long a frame of a stream waits for more output to join it (tokio's timers tick
/// by the millisecond, so this is the shortest wait there is).
const GATHER: Duration = Duration::from_millis(1);

/// One read of an output stream: the bytes read (0 at its end), or `None` when it
/// failed (logged).
async fn read_some(output: &mut Pin<Box<dyn AsyncRead + Send>>, buf: &mut [u8]) -> Option<usize> {
    loop {
        match output.read(buf).await {
            Ok(n) => return Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "exec output ended with an error");
                return None;
            }
        }
    }
}

/// The client's input on its way to the process: a bounded queue, written by its own
/// task, which reports progress ([`Capacity`]) to the client.
struct Input {
    queue: Option<mpsc::Sender<Bytes>>,
    /// Bytes queued and not yet written.
    queued_bytes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Input {
    fn start<P: ExecProcess>(
        stdin: Pin<Box<dyn AsyncWrite + Send>>,
        process: Arc<P>,
        outgoing: mpsc::Sender<Message>,
    ) -> Input {
        // One more than the client may have outstanding: the writer holds the message
        // it is writing, which the client counts as outstanding too.
        let capacity = usize::try_from(MAX_MESSAGES_OUTSTANDING).unwrap_or(1024) + 1;
        let (queue, receiver) = mpsc::channel(capacity);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(write_input(
            stdin,
            receiver,
            queued_bytes.clone(),
            process,
            outgoing,
        ));
        Input {
            queue: Some(queue),
            queued_bytes,
            task,
        }
    }

    /// Queues one input message; a client past its capacity ends the session (1009).
    fn push(&mut self, data: Bytes) -> Result<(), End> {
        let Some(queue) = &self.queue else {
            // After ContentComplete: nothing more goes to the process.
            return Ok(());
        };
        let overrun = || {
            End::Close(
                close_code::SIZE,
                "input beyond the capacity keeld announced; obey capacity updates".to_owned(),
            )
        };
        let len = data.len();
        if self.queued_bytes.load(Ordering::Relaxed) + len > MAX_INPUT_BYTES_OUTSTANDING {
            return Err(overrun());
        }
        self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        match queue.try_send(data) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(overrun()),
            // The writer ended: the process's stdin is gone, and so is the input.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// The client's input ended: what is queued is written, then stdin is closed.
    fn complete(&mut self) {
        self.queue = None;
    }

    fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes queued input to the process's stdin, reporting progress every
/// [`wire::CAPACITY_UPDATE_INTERVAL`] messages. When the queue closes
/// (`ContentComplete`), closes stdin. A process that closed its stdin makes the rest of
/// the input go nowhere (its exit status says how it ended, not a failed write).
async fn write_input<P: ExecProcess>(
    mut stdin: Pin<Box<dyn AsyncWrite + Send>>,
    mut queue: mpsc::Receiver<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    process: Arc<P>,
    outgoing: mpsc::Sender<Message>,
) {
    let mut written = 0u64;
    let mut broken = false;
    while let Some(data) = queue.recv().await {
        if !broken {
            if let Err(e) = stdin.write_all(&data).await {
                tracing::debug!(exec = %process.id(), error = %e, "the exec process's stdin is closed; dropping its input");
                broken = true;
            }
        }
        queued_bytes.fetch_sub(data.len(), Ordering::Relaxed);
        written += 1;
        if written.is_multiple_of(wire::CAPACITY_UPDATE_INTERVAL) {
            let update = ServerMessage::Capacity(Capacity {
                max_messages_outstanding: MAX_MESSAGES_OUTSTANDING,
                messages_written: written,
            });
            if let Ok(text) = serde_json::to_string(&update) {
                let _ = outgoing.send(Message::Text(text.into())).await;
            }
        }
    }
    let _ = stdin.shutdown().await;
    drop(stdin);
    if let Err(e) = process.close_stdin().await {
        tracing::debug!(exec = %process.id(), error = %e, "cannot close the exec process's stdin");
    }
}

/// Removes the process if the session is dropped before it did (a panic, or keeld's
/// runtime going down): a detached task kills it and removes its FIFOs.
struct RemoveOnDrop<P: ExecProcess>(Option<Arc<P>>);

impl<P: ExecProcess> RemoveOnDrop<P> {
    fn disarm(mut self) -> Option<Arc<P>> {
        self.0.take()
    }
}

impl<P: ExecProcess> Drop for RemoveOnDrop<P> {
    fn drop(&mut self) {
        if let (Some(process), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move { process.remove(false).await });
        }
    }
}

/// Parses a control message; what cannot be read closes the session (1007).
fn parse_control(text: &str) -> Result<ClientMessage, End> {
    serde_json::from_str(text)
        .map_err(|e| End::Close(close_code::INVALID, format!("invalid control message: {e}")))
}

fn message_name(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Initialize(_) => "Initialize",
        ClientMessage::ContentComplete => "ContentComplete",
        ClientMessage::Winch(_) => "Winch",
        ClientMessage::Signal(_) => "Signal",
    }
}

/// The request an `Initialize` asks for, or why keeld cannot run it (4400).
fn request_of(init: wire::Initialize) -> Result<ExecRequest, End> {
    let bad = |reason: String| End::Close(CLOSE_BAD_REQUEST, reason);
    if init.command.is_empty() {
        return Err(bad("the command is empty".to_owned()));
    }
    let mut args = Vec::with_capacity(init.command.len());
    for (i, arg) in init.command.into_iter().enumerate() {
        let arg = arg
            .into_string()
            .map_err(|_| bad(format!("command argument {i} is not UTF-8")))?;
        if arg.contains('\0') {
            return Err(bad(format!("command argument {i} contains a NUL byte")));
        }
        args.push(arg);
    }
    if args[0].is_empty() {
        return Err(bad("the command is empty".to_owned()));
    }
    let size = init
        .tty
        .as_ref()
        .and_then(|t| t.size)
        .filter(|s| s.is_usable())
        .map(|s| WindowSize {
            rows: s.rows,
            cols: s.cols,
        });
    Ok(ExecRequest {
        target: init.target,
        args,
        tty: init.tty.is_some(),
        size,
    })
}

/// The close code for a process that could not start.
fn close_code_of(e: &ExecError) -> u16 {
    match e {
        ExecError::UnknownTarget(_) | ExecError::BootstrapTarget(_) => CLOSE_NOT_FOUND,
        ExecError::NotRunning { .. } => CLOSE_CONFLICT,
        ExecError::Invalid(_) | ExecError::CannotStart(_) => CLOSE_BAD_REQUEST,
        ExecError::Containerd(_) | ExecError::Io { .. } | ExecError::Spec(_) => close_code::ERROR,
    }
}

/// What a failed read means: an oversized message (1009), a frame that breaks the
/// protocol (1002), or a socket that went away.
fn read_error(e: axum::Error) -> End {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => End::Close(
            close_code::SIZE,
            format!("message of {size} bytes; at most {max_size}"),
        ),
        Some(WsError::Capacity(c)) => End::Close(close_code::SIZE, c.to_string()),
        Some(WsError::Protocol(p)) => End::Close(close_code::PROTOCOL, p.to_string()),
        Some(WsError::Utf8(_)) => {
            End::Close(close_code::INVALID, "text frame is not UTF-8".to_owned())
        }
        _ => End::ClientGone,
    }
}

/// `reason` cut to at most `max` bytes, on a character boundary.
fn truncate(reason: &str, max: usize) -> String {
    if reason.len() <= max {
        return reason.to_owned();
    }
    let mut end = max;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::ffi::OsString;

    fn init(command: Vec<OsString>, tty: Option<wire::TtyInit>) -> wire::Initialize {
        wire::Initialize {
            command,
            target: "admin".into(),
            tty,
            keel_protocol: None,
        }
    }

    fn closed_with(r: Result<ExecRequest, End>) -> (u16, String) {
        match r {
            Err(End::Close(code, reason)) => (code, reason),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn commands_keeld_cannot_run_are_refused_by_name() {
        assert_eq!(
            closed_with(request_of(init(vec![], None))),
            (CLOSE_BAD_REQUEST, "the command is empty".into())
        );
        assert_eq!(
            closed_with(request_of(init(vec!["".into()], None))).0,
            CLOSE_BAD_REQUEST
        );
        assert_eq!(
            closed_with(request_of(init(vec!["a\0b".into()], None))),
            (
                CLOSE_BAD_REQUEST,
                "command argument 0 contains a NUL byte".into()
            )
        );
        use std::os::unix::ffi::OsStringExt;
        let not_utf8 = OsString::from_vec(vec![b'x', 0xff]);
        assert_eq!(
            closed_with(request_of(init(vec!["echo".into(), not_utf8], None))),
            (CLOSE_BAD_REQUEST, "command argument 1 is not UTF-8".into())
        );
    }

    #[test]
    fn an_unsized_terminal_gets_no_size() {
        let tty = |size| Some(wire::TtyInit { size });
        let r = request_of(init(
            vec!["sh".into()],
            tty(Some(wire::Size { rows: 0, cols: 0 })),
        ))
        .unwrap();
        assert!(r.tty);
        assert_eq!(r.size, None);
        let r = request_of(init(
            vec!["sh".into()],
            tty(Some(wire::Size {
                rows: 30,
                cols: 100,
            })),
        ))
        .unwrap();
        assert_eq!(
            r.size,
            Some(WindowSize {
                rows: 30,
                cols: 100
            })
        );
        let r = request_of(init(vec!["sh".into()], None)).unwrap();
        assert!(!r.tty);
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let cut = truncate(&long, MAX_REASON);
        assert!(cut.len() <= MAX_REASON);
        assert!(long.starts_with(&cut));
        assert_eq!(truncate("7", MAX_REASON), "7");
    }

    /// Output after a quiet spell goes out at once; output that comes in small pieces
    /// within [`BURST`] of the last frame waits up to [`GATHER`] for more to join it,
    /// and no longer once the frame is full or the output ended. (Paused time: the
    /// clock moves only when everything waits on a timer, so a frame that came with no
    /// time passed was not held.)
    #[tokio::test(start_paused = true)]
    async fn streamed_output_is_gathered_and_a_lone_write_is_not_held() {
        let (mut process, output) = tokio::io::duplex(4 * OUTPUT_CHUNK);
        let (outgoing, mut frames) = mpsc::channel(OUTGOING_QUEUE);
        let activity = Arc::new(AtomicU64::new(0));
        let pump = tokio::spawn(pump_output(
            Box::pin(output),
            None,
            outgoing,
            activity,
            Instant::now(),
        ));
        let mut next = async || match frames.recv().await {
            Some(Message::Binary(data)) => data,
            other => panic!("not an output frame: {other:?}"),
        };

        let at = tokio::time::Instant::now();
        process.write_all(b"$ ").await.unwrap();
        assert_eq!(next().await, &b"$ "[..]);
        assert_eq!(at.elapsed(), Duration::ZERO, "a first write is not held");

        // A stream: the second piece comes during the first's gathering.
        let at = tokio::time::Instant::now();
        process.write_all(b"a").await.unwrap();
        tokio::time::sleep(GATHER / 4).await;
        process.write_all(b"b").await.unwrap();
        assert_eq!(next().await, &b"ab"[..]);
        assert_eq!(at.elapsed(), GATHER);

        // A pause: at once again.
        tokio::time::sleep(BURST * 2).await;
        let at = tokio::time::Instant::now();
        process.write_all(b"c").await.unwrap();
        assert_eq!(next().await, &b"c"[..]);
        assert_eq!(at.elapsed(), Duration::ZERO);

        // In a stream, a full frame does not wait.
        process.write_all(&vec![b'x'; OUTPUT_CHUNK]).await.unwrap();
        assert_eq!(next().await.len(), OUTPUT_CHUNK);
        assert_eq!(at.elapsed(), Duration::ZERO);

        // Nor does the last piece before the end.
        process.write_all(b"bye").await.unwrap();
        drop(process);
        assert_eq!(next().await, &b"bye"[..]);
        assert_eq!(at.elapsed(), Duration::ZERO);
        pump.await.unwrap();
        assert!(frames.recv().await.is_none());
    }
}

#[cfg(test)]
#[path = "exec_session_tests.rs"]
mod session_tests;
