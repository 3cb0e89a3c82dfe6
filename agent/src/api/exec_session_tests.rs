//! The exec session (`api/exec.rs`) against a fake [`ExecEngine`]: keeld's `/exec`
//! served on a Unix socket, a WebSocket client that speaks the protocol frame by frame,
//! and every call the session makes on the process recorded. No root, no containerd;
//! `tests/tests/exec.rs` runs the same protocol end to end against containerd and runc.
//!
//! Real time throughout: the session measures its idle time and its client's silence
//! with `std::time::Instant`, which paused tokio time does not move. The tests wait for
//! recorded events (a call on the process, a frame, the session letting go of the
//! process), each bounded by [`WAIT`]; the few sleeps are the scenario (a quiet spell,
//! a slow client), and one bounded wait is the assertion itself (a writer that must
//! stall).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::routing::get;
use axum::Router;
use settings_model::exec::{Initialize, Size, TtyInit};
use tokio::io::{duplex, DuplexStream};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

use super::*;
use crate::containers::exec::ExecIo;

/// Each pipe's buffer, like a FIFO's.
const PIPE: usize = 64 * 1024;
/// How long a test waits for what the session should do at once.
const WAIT: Duration = Duration::from_secs(2);

// ---- The fake engine ----

/// What the session asked of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Resize(WindowSize),
    Signal(i32),
    CloseStdin,
    Remove { exited: bool },
}

/// [`ExecEngine`] for the tests. Refuses as containerd's engine does: the target
/// `missing` (no such host container), `stopped` (not running), `broken` (an unusable
/// spec), and the command `no-such-command`. Anything else starts a [`FakeProcess`] and
/// hands the other ends of its stdio to the test, as [`Controls`].
struct FakeEngine {
    requests: Arc<Mutex<Vec<ExecRequest>>>,
    started: mpsc::UnboundedSender<Controls>,
    /// The buffer of each process's stdin; 1 is a process that does not read it.
    stdin_buffer: usize,
    /// The buffer of each process's stdout: how much output it can have written that
    /// keeld did not read yet.
    stdout_buffer: usize,
}

impl ExecEngine for FakeEngine {
    type Process = FakeProcess;

    async fn start(&self, request: &ExecRequest) -> Result<(FakeProcess, ExecIo), ExecError> {
        let number = {
            let mut requests = self.requests.lock().unwrap();
            requests.push(request.clone());
            requests.len()
        };
        let target = request.target.clone();
        match target.as_str() {
            "missing" => return Err(ExecError::UnknownTarget(target)),
            "stopped" => {
                return Err(ExecError::NotRunning {
                    name: target,
                    state: "exited".into(),
                })
            }
            "broken" => return Err(ExecError::Spec("it has no process".into())),
            _ => {}
        }
        if request.args[0] == "no-such-command" {
            return Err(ExecError::CannotStart(
                "\"no-such-command\": executable file not found in $PATH".into(),
            ));
        }
        let (stdin, test_stdin) = duplex(self.stdin_buffer);
        let (test_stdout, stdout) = duplex(self.stdout_buffer);
        // A terminal has one output stream, as with containerd.
        let (test_stderr, stderr) = match request.tty {
            true => (None, None),
            false => {
                let (test_end, end) = duplex(PIPE);
                (Some(test_end), Some(end))
            }
        };
        let (calls, calls_received) = mpsc::unbounded_channel();
        let (exit, exit_received) = watch::channel(None);
        let process = FakeProcess {
            id: format!("fake-{number}"),
            calls,
            exit: exit_received,
        };
        let io = ExecIo {
            stdin: Box::pin(stdin),
            stdout: Box::pin(stdout),
            stderr: stderr.map(|s| Box::pin(s) as Pin<Box<dyn AsyncRead + Send>>),
        };
        self.started
            .send(Controls {
                stdin: test_stdin,
                stdout: test_stdout,
                stderr: test_stderr,
                exit,
                calls: calls_received,
            })
            .expect("the test holds the receiver");
        Ok((process, io))
    }
}

/// A process that runs until the test makes it exit, and records the calls on it.
struct FakeProcess {
    id: String,
    calls: mpsc::UnboundedSender<Call>,
    exit: watch::Receiver<Option<u32>>,
}

impl FakeProcess {
    fn record(&self, call: Call) {
        // The test may have let go of the process already.
        let _ = self.calls.send(call);
    }
}

impl ExecProcess for FakeProcess {
    fn id(&self) -> &str {
        &self.id
    }

    async fn resize(&self, size: WindowSize) -> Result<(), ExecError> {
        self.record(Call::Resize(size));
        Ok(())
    }

    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.record(Call::Signal(signal));
        Ok(())
    }

    async fn close_stdin(&self) -> Result<(), ExecError> {
        self.record(Call::CloseStdin);
        Ok(())
    }

    async fn wait(&self) -> Result<u32, ExecError> {
        let mut exit = self.exit.clone();
        let status = exit.wait_for(Option::is_some).await.map(|s| *s);
        match status {
            Ok(Some(status)) => Ok(status),
            // The test dropped its controls without an exit: the process runs on.
            _ => std::future::pending().await,
        }
    }

    async fn remove(&self, exited: bool) {
        self.record(Call::Remove { exited });
    }
}

/// The test's side of one fake process.
struct Controls {
    /// What the session wrote to the process's stdin.
    stdin: DuplexStream,
    /// The process's stdout: what the test writes here, the session reads.
    stdout: DuplexStream,
    /// The process's stderr; `None` with a terminal.
    stderr: Option<DuplexStream>,
    exit: watch::Sender<Option<u32>>,
    calls: mpsc::UnboundedReceiver<Call>,
}

impl Controls {
    fn exit(&self, status: u32) {
        self.exit.send_replace(Some(status));
    }

    /// The process's output streams end.
    async fn end_output(&mut self) {
        self.stdout.shutdown().await.unwrap();
        if let Some(stderr) = &mut self.stderr {
            stderr.shutdown().await.unwrap();
        }
    }

    fn stderr(&mut self) -> &mut DuplexStream {
        self.stderr
            .as_mut()
            .expect("a process without a terminal has stderr")
    }

    /// The next call the session makes on the process.
    async fn next_call(&mut self) -> Call {
        timeout(WAIT, self.calls.recv())
            .await
            .expect("the session calls the process in time")
            .expect("the session holds the process")
    }

    /// The calls from now until the session let go of the process: the session is over.
    async fn calls_until_released(&mut self) -> Vec<Call> {
        let mut calls = Vec::new();
        timeout(WAIT, async {
            while let Some(call) = self.calls.recv().await {
                calls.push(call);
            }
        })
        .await
        .expect("the session lets go of the process in time");
        calls
    }
}

// ---- keeld's side: the route on a socket ----

/// `GET /exec` on a Unix socket in a temporary directory, over a [`FakeEngine`].
struct Harness {
    service: ExecService<FakeEngine>,
    requests: Arc<Mutex<Vec<ExecRequest>>>,
    started: mpsc::UnboundedReceiver<Controls>,
    socket: PathBuf,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn start() -> Harness {
        Harness::with_buffers(PIPE, PIPE)
    }

    /// With these buffers for each process's stdin and stdout.
    fn with_buffers(stdin_buffer: usize, stdout_buffer: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (started_sender, started) = mpsc::unbounded_channel();
        let service = ExecService::new(FakeEngine {
            requests: requests.clone(),
            started: started_sender,
            stdin_buffer,
            stdout_buffer,
        });
        // Only the route: the access layer in front of it has tests of its own.
        let app = Router::new()
            .route("/exec", get(upgrade::<FakeEngine>))
            .with_state(service.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Harness {
            service,
            requests,
            started,
            socket,
            server,
            _dir: dir,
        }
    }

    async fn connect(&self) -> Client {
        self.try_connect().await.expect("the upgrade succeeds")
    }

    async fn try_connect(&self) -> Result<Client, tungstenite::Error> {
        Client::connect(&self.socket).await
    }

    /// The process the engine started next.
    /// Connects, sends `init` and waits for the process it starts.
    async fn session(&mut self, init: &ClientMessage) -> (Client, Controls) {
        let mut client = self.connect().await;
        client.control(init).await;
        (client, self.next_process().await)
    }

    async fn next_process(&mut self) -> Controls {
        timeout(WAIT, self.started.recv())
            .await
            .expect("a process starts in time")
            .expect("the engine is alive")
    }

    /// The requests that reached the engine, in order.
    fn requests(&self) -> Vec<ExecRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// No process was started that the test has not taken. (Called once the session's
    /// close frame arrived: the session starts its process before it closes.)
    fn assert_no_process(&mut self) {
        assert!(
            matches!(self.started.try_recv(), Err(TryRecvError::Empty)),
            "a process was started"
        );
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---- The client's side ----

/// What the client received.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    Control(ServerMessage),
    Data(Vec<u8>),
    Closed(u16, String),
}

use Received::{Closed, Control, Data};

/// A client of `/exec` that sends frames one by one.
struct Client {
    ws: WebSocketStream<UnixStream>,
}

impl Client {
    async fn connect(socket: &Path) -> Result<Client, tungstenite::Error> {
        let stream = UnixStream::connect(socket).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async("ws://localhost/exec", stream).await?;
        Ok(Client { ws })
    }

    async fn send(&mut self, message: WsMessage) {
        self.ws.send(message).await.expect("send");
    }

    async fn control(&mut self, message: &ClientMessage) {
        let text = serde_json::to_string(message).unwrap();
        self.send(WsMessage::Text(text.into())).await;
    }

    async fn data(&mut self, data: &[u8]) {
        self.send(WsMessage::Binary(Bytes::copy_from_slice(data)))
            .await;
    }

    /// The next frame from keeld (pings skipped).
    async fn next(&mut self) -> Received {
        loop {
            let message = timeout(WAIT, self.ws.next())
                .await
                .expect("keeld sends in time")
                .expect("a close frame before the connection ends")
                .expect("a frame");
            return match message {
                WsMessage::Text(text) => {
                    Control(serde_json::from_str(&text).expect("a server message"))
                }
                WsMessage::Binary(data) => Data(data.to_vec()),
                WsMessage::Close(Some(frame)) => {
                    Closed(frame.code.into(), frame.reason.to_string())
                }
                WsMessage::Close(None) => panic!("a close frame without a code"),
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
            };
        }
    }

    /// Everything up to the close frame: the control messages, the output, the close.
    async fn until_close(&mut self) -> (Vec<ServerMessage>, Vec<u8>, (u16, String)) {
        let (mut controls, mut data) = (Vec::new(), Vec::new());
        loop {
            match self.next().await {
                Control(message) => controls.push(message),
                Data(bytes) => data.extend(bytes),
                Closed(code, reason) => return (controls, data, (code, reason)),
            }
        }
    }
}

fn initialize(command: &[&str], target: &str, tty: Option<TtyInit>, keel: bool) -> ClientMessage {
    ClientMessage::Initialize(Initialize {
        command: command.iter().map(Into::into).collect(),
        target: target.into(),
        tty,
        keel_protocol: keel.then_some(KEEL_PROTOCOL),
    })
}

fn capacity(messages_written: u64) -> Received {
    Control(ServerMessage::Capacity(Capacity {
        max_messages_outstanding: MAX_MESSAGES_OUTSTANDING,
        messages_written,
    }))
}

fn started(separate_stderr: bool) -> Received {
    Control(ServerMessage::Started(Started {
        keel_protocol: KEEL_PROTOCOL,
        separate_stderr,
    }))
}

fn refused(message: &str) -> Received {
    Control(ServerMessage::Refused(Refused {
        message: message.into(),
    }))
}

fn closed(code: u16, reason: &str) -> (u16, String) {
    (code, reason.into())
}

// ---- The tests ----

/// The exit status is the close reason (code 1000), after the output the process
/// wrote, even when the session hears of the exit before it read that output; output
/// that stays open (a child of the process holds it) keeps the session only for the
/// idle time.
#[tokio::test]
async fn the_exit_status_is_the_close_reason_after_the_output() {
    let mut keeld = Harness::start();
    let mut client = keeld.connect().await;
    client
        .control(&initialize(
            &["sh", "-c", "echo out; exit 7"],
            "admin",
            None,
            false,
        ))
        .await;
    let mut process = keeld.next_process().await;
    assert_eq!(
        keeld.requests(),
        [ExecRequest {
            target: "admin".into(),
            args: vec!["sh".into(), "-c".into(), "echo out; exit 7".into()],
            tty: false,
            size: None,
        }]
    );
    // The exit is reported before the output got through (containerd's exit event can
    // overtake what is still in the FIFO): the session hears of the exit first.
    process.exit(7);
    process.stdout.write_all(b"out\n").await.unwrap();
    let (controls, output, close) = client.until_close().await;
    assert_eq!(
        controls,
        [ServerMessage::Capacity(Capacity {
            max_messages_outstanding: MAX_MESSAGES_OUTSTANDING,
            messages_written: 0,
        })]
    );
    assert_eq!(output, b"out\n");
    assert_eq!(close, closed(1000, "7"));
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: true }]
    );
}

/// Output written after the exit, within the idle time, arrives before the close however
/// long the process was quiet before it. Regression: the idle time counted from the last
/// output, so a process quiet for over 0.5 s that then wrote and exited lost that output.
#[tokio::test]
async fn output_written_just_after_the_exit_arrives_after_a_quiet_spell() {
    let mut keeld = Harness::start();
    let (mut client, mut process) = keeld
        .session(&initialize(&["sh"], "admin", None, false))
        .await;
    assert_eq!(client.next().await, capacity(0));
    process.stdout.write_all(b"early\n").await.unwrap();
    assert_eq!(client.next().await, Data(b"early\n".to_vec()));
    // The scenario, not a synchronisation: a quiet spell longer than the idle time,
    // the exit, and the last output still on its way (through the shim, in keeld).
    tokio::time::sleep(AFTER_EXIT_IDLE + Duration::from_millis(100)).await;
    process.exit(3);
    tokio::time::sleep(AFTER_EXIT_IDLE / 2).await;
    process.stdout.write_all(b"late\n").await.unwrap();
    process.end_output().await;
    assert_eq!(client.next().await, Data(b"late\n".to_vec()));
    assert_eq!(client.next().await, Closed(1000, "3".into()));
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: true }]
    );
}

/// Binary frames reach stdin in order; `ContentComplete` closes stdin once they are
/// written, and input after it goes nowhere.
#[tokio::test]
async fn input_reaches_stdin_in_order_then_content_complete_closes_it() {
    let mut keeld = Harness::start();
    let (mut client, mut process) = keeld
        .session(&initialize(&["cat"], "admin", None, false))
        .await;
    for chunk in ["one ", "two ", "three"] {
        client.data(chunk.as_bytes()).await;
    }
    client.control(&ClientMessage::ContentComplete).await;
    client.data(b" after").await;
    assert_eq!(process.next_call().await, Call::CloseStdin);
    // When close_stdin came, the input was all in the pipe and the pipe was closed.
    let mut input = Vec::new();
    timeout(WAIT, process.stdin.read_to_end(&mut input))
        .await
        .expect("stdin ended")
        .unwrap();
    assert_eq!(input, b"one two three");
    process.exit(0);
    process.end_output().await;
    let (_, output, close) = client.until_close().await;
    assert_eq!(output, b"");
    assert_eq!(close, closed(1000, "0"));
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: true }]
    );
}

/// A client that asks for Keel's protocol gets `Started` before any output, and each
/// output frame tagged with its stream; with a terminal, one stream.
#[tokio::test]
async fn keel_clients_get_started_then_output_tagged_by_stream() {
    let mut keeld = Harness::start();

    let (mut client, mut process) = keeld
        .session(&initialize(&["sh"], "admin", None, true))
        .await;
    // Output written at once still comes after Started.
    process.stdout.write_all(b"out").await.unwrap();
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, started(true));
    assert_eq!(client.next().await, Data(b"\x01out".to_vec()));
    process.stderr().write_all(b"err").await.unwrap();
    assert_eq!(client.next().await, Data(b"\x02err".to_vec()));
    process.exit(0);
    process.end_output().await;
    assert_eq!(client.next().await, Closed(1000, "0".into()));

    let mut client = keeld.connect().await;
    let tty = TtyInit {
        size: Some(Size { rows: 24, cols: 80 }),
    };
    client
        .control(&initialize(&["sh"], "admin", Some(tty), true))
        .await;
    let mut process = keeld.next_process().await;
    let request = keeld.requests().pop().unwrap();
    assert!(request.tty);
    assert_eq!(request.size, Some(WindowSize { rows: 24, cols: 80 }));
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, started(false));
    process.stdout.write_all(b"$ ").await.unwrap();
    assert_eq!(client.next().await, Data(b"\x01$ ".to_vec()));
    process.exit(0);
    process.end_output().await;
    assert_eq!(client.next().await, Closed(1000, "0".into()));
}

/// Bottlerocket's client (no `keel_protocol`) gets Bottlerocket's protocol: output
/// untagged, only `Capacity` messages.
#[tokio::test]
async fn bottlerocket_clients_get_untagged_output_and_no_keel_messages() {
    let mut keeld = Harness::start();
    let (mut client, mut process) = keeld
        .session(&initialize(&["sh"], "admin", None, false))
        .await;
    process.stdout.write_all(b"out").await.unwrap();
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, Data(b"out".to_vec()));
    process.stderr().write_all(b"err").await.unwrap();
    assert_eq!(client.next().await, Data(b"err".to_vec()));
    process.exit(0);
    process.end_output().await;
    assert_eq!(client.next().await, Closed(1000, "0".into()));
}

/// Signals and window sizes reach the process; an unknown signal and a 0x0 size are
/// refused and the session goes on. A Winch before the Initialize is ignored.
#[tokio::test]
async fn signals_and_window_sizes_reach_the_process_or_are_refused() {
    let mut keeld = Harness::start();
    let mut client = keeld.connect().await;
    client
        .control(&ClientMessage::Winch(Size { rows: 1, cols: 1 }))
        .await;
    let tty = TtyInit {
        size: Some(Size { rows: 24, cols: 80 }),
    };
    client
        .control(&initialize(&["sh"], "admin", Some(tty), true))
        .await;
    let mut process = keeld.next_process().await;
    assert_eq!(
        keeld.requests()[0].size,
        Some(WindowSize { rows: 24, cols: 80 })
    );
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, started(false));

    client
        .control(&ClientMessage::Signal("SIGTERM".into()))
        .await;
    assert_eq!(process.next_call().await, Call::Signal(15));

    client
        .control(&ClientMessage::Signal("SIGFOO".into()))
        .await;
    let known: Vec<&str> = wire::SIGNALS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        client.next().await,
        refused(&format!(
            "unknown signal \"SIGFOO\"; known: {}",
            known.join(", ")
        ))
    );

    client
        .control(&ClientMessage::Winch(Size { rows: 0, cols: 0 }))
        .await;
    assert_eq!(
        client.next().await,
        refused("window size 0x0 is not a terminal size; the size is unchanged")
    );

    client
        .control(&ClientMessage::Winch(Size {
            rows: 50,
            cols: 120,
        }))
        .await;
    assert_eq!(
        process.next_call().await,
        Call::Resize(WindowSize {
            rows: 50,
            cols: 120
        })
    );

    client
        .control(&ClientMessage::Signal("SIGINT".into()))
        .await;
    assert_eq!(process.next_call().await, Call::Signal(2));

    process.exit(130);
    process.end_output().await;
    assert_eq!(client.next().await, Closed(1000, "130".into()));
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: true }]
    );
}

/// Without a terminal a Winch is ignored, and Bottlerocket's client is never sent a
/// `Refused` (it would fail on it).
#[tokio::test]
async fn without_keel_s_protocol_or_a_terminal_control_messages_are_quiet() {
    let mut keeld = Harness::start();
    let (mut client, mut process) = keeld
        .session(&initialize(&["sh"], "admin", None, false))
        .await;
    client
        .control(&ClientMessage::Winch(Size {
            rows: 50,
            cols: 120,
        }))
        .await;
    client
        .control(&ClientMessage::Signal("SIGFOO".into()))
        .await;
    client
        .control(&ClientMessage::Signal("SIGHUP".into()))
        .await;
    // Messages are handled in order: the first call is the last message's.
    assert_eq!(process.next_call().await, Call::Signal(1));
    process.exit(0);
    process.end_output().await;
    let (controls, output, close) = client.until_close().await;
    assert_eq!(
        controls,
        [ServerMessage::Capacity(Capacity {
            max_messages_outstanding: MAX_MESSAGES_OUTSTANDING,
            messages_written: 0,
        })]
    );
    assert_eq!(output, b"");
    assert_eq!(close, closed(1000, "0"));
}

/// Each kind of bad input closes with its own code and reason, and none leaves a
/// process: what is refused before the engine never reaches it, what the engine refuses
/// starts nothing, and a protocol violation after the start removes the process.
#[tokio::test]
async fn bad_input_is_closed_with_its_own_code_and_leaves_no_process() {
    let mut keeld = Harness::start();
    let text = |s: &str| WsMessage::Text(s.into());
    let init = |command: &[&str], target: &str| {
        text(&serde_json::to_string(&initialize(command, target, None, false)).unwrap())
    };
    let oversized = WsMessage::Binary(Bytes::from(vec![0u8; MAX_MESSAGE_BYTES + 1]));
    let before_the_engine = [
        (
            WsMessage::Binary(Bytes::from_static(b"x")),
            closed(1008, "process data sent before Initialize"),
        ),
        (
            text("\"ContentComplete\""),
            closed(1008, "ContentComplete sent before Initialize"),
        ),
        (
            text(r#"{"Signal":"SIGTERM"}"#),
            closed(1008, "Signal sent before Initialize"),
        ),
        (
            text("not json"),
            closed(
                1007,
                "invalid control message: expected value at line 1 column 1",
            ),
        ),
        (
            text(r#"{"Initialize":{"command":[],"target":"admin","tty":null,"shell":true}}"#),
            // A long reason is cut to fit the close frame.
            closed(
                1007,
                &truncate(
                    "invalid control message: unknown field `shell`, expected one of \
                     `command`, `target`, `tty`, `keel_protocol` at line 1 column 57",
                    MAX_REASON,
                ),
            ),
        ),
        (init(&[], "admin"), closed(4400, "the command is empty")),
        (
            init(&["", "x"], "admin"),
            closed(4400, "the command is empty"),
        ),
        (
            oversized,
            closed(
                1009,
                &format!(
                    "message of {} bytes; at most {MAX_MESSAGE_BYTES}",
                    MAX_MESSAGE_BYTES + 1
                ),
            ),
        ),
    ];
    for (message, expected) in before_the_engine {
        let mut client = keeld.connect().await;
        // keeld may close before an oversized message is all written.
        let _ = client.ws.send(message).await;
        let (_, output, close) = client.until_close().await;
        assert_eq!(close, expected);
        assert_eq!(output, b"");
    }
    assert_eq!(keeld.requests(), []);

    let refused_by_the_engine = [
        (
            init(&["sh"], "missing"),
            closed(4404, "no host container named \"missing\""),
        ),
        (
            init(&["sh"], "stopped"),
            closed(4409, "host container \"stopped\" is not running (exited)"),
        ),
        (
            init(&["no-such-command"], "admin"),
            closed(
                4400,
                "cannot start the command: \"no-such-command\": executable file not found in $PATH",
            ),
        ),
        (
            init(&["sh"], "broken"),
            closed(
                1011,
                "the container's OCI spec cannot be used: it has no process",
            ),
        ),
    ];
    for (message, expected) in refused_by_the_engine {
        let mut client = keeld.connect().await;
        client.send(message).await;
        let (_, _, close) = client.until_close().await;
        assert_eq!(close, expected);
    }
    let targets: Vec<String> = keeld.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["missing", "stopped", "admin", "broken"]);
    keeld.assert_no_process();

    let mut client = keeld.connect().await;
    client.send(init(&["sh"], "admin")).await;
    let mut process = keeld.next_process().await;
    client.send(init(&["sh"], "admin")).await;
    let (_, _, close) = client.until_close().await;
    assert_eq!(close, closed(1008, "Initialize sent twice"));
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: false }]
    );

    let mut client = keeld.connect().await;
    client.send(init(&["sh"], "admin")).await;
    let mut process = keeld.next_process().await;
    client.send(text("{")).await;
    let (_, _, close) = client.until_close().await;
    assert_eq!(
        close,
        closed(
            1007,
            "invalid control message: EOF while parsing an object at line 1 column 1"
        )
    );
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: false }]
    );
    keeld.assert_no_process();
}

/// A client whose socket goes away mid-stream (no close frame), or that closes, takes
/// its process with it: the process is removed as not exited, i.e. killed.
#[tokio::test]
async fn a_client_that_goes_away_takes_its_process_with_it() {
    let mut keeld = Harness::start();

    let (mut client, mut process) = keeld
        .session(&initialize(&["sh"], "admin", None, true))
        .await;
    process.stdout.write_all(b"tick").await.unwrap();
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, started(true));
    assert_eq!(client.next().await, Data(b"\x01tick".to_vec()));
    drop(client);
    process.stdout.write_all(b"tock").await.unwrap();
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: false }]
    );

    let (mut client, mut process) = keeld
        .session(&initialize(&["sh"], "admin", None, true))
        .await;
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, started(true));
    client.ws.close(None).await.unwrap();
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: false }]
    );
}

/// `Capacity` when the session opens and after every 128 input messages written.
#[tokio::test]
async fn capacity_is_reported_at_the_start_and_every_128_messages_written() {
    let mut keeld = Harness::start();
    let (mut client, mut process) = keeld
        .session(&initialize(&["cat"], "admin", None, false))
        .await;
    assert_eq!(client.next().await, capacity(0));
    let messages = 2 * wire::CAPACITY_UPDATE_INTERVAL + 5;
    for i in 0..messages {
        client.data(format!("{i:04}").as_bytes()).await;
    }
    assert_eq!(client.next().await, capacity(128));
    assert_eq!(client.next().await, capacity(256));
    client.control(&ClientMessage::ContentComplete).await;
    assert_eq!(process.next_call().await, Call::CloseStdin);
    let mut input = Vec::new();
    timeout(WAIT, process.stdin.read_to_end(&mut input))
        .await
        .expect("stdin ended")
        .unwrap();
    let sent: String = (0..messages).map(|i| format!("{i:04}")).collect();
    assert_eq!(String::from_utf8(input).unwrap(), sent);
    process.exit(0);
    process.end_output().await;
    let (controls, _, close) = client.until_close().await;
    // No update for the 5 messages past the last multiple of 128.
    assert_eq!(controls, []);
    assert_eq!(close, closed(1000, "0"));
}

/// A client may have `max_messages_outstanding` input messages beyond those written;
/// one that sends past that, to a process that reads nothing, is closed with 1009 and
/// its process removed.
#[tokio::test]
async fn a_client_that_overruns_its_capacity_is_closed_with_1009() {
    let mut keeld = Harness::with_buffers(1, PIPE);
    let (mut client, mut process) = keeld
        .session(&initialize(&["sleep", "100"], "admin", None, true))
        .await;
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, started(true));
    for _ in 0..MAX_MESSAGES_OUTSTANDING {
        client.data(b"xx").await;
    }
    // Handled after all of them: the session took them without complaint.
    client
        .control(&ClientMessage::Signal("SIGUSR1".into()))
        .await;
    assert_eq!(process.next_call().await, Call::Signal(10));
    for _ in 0..16 {
        // keeld may have closed already.
        let _ = client
            .ws
            .send(WsMessage::Binary(Bytes::from_static(b"xx")))
            .await;
    }
    let (controls, _, close) = client.until_close().await;
    assert_eq!(controls, [], "nothing was written: no capacity update");
    assert_eq!(
        close,
        closed(
            1009,
            "input beyond the capacity keeld announced; obey capacity updates"
        )
    );
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: false }]
    );
}

/// A client that reads nothing holds back a process that writes a lot: keeld reads the
/// output only as fast as the client takes it, so what it accepted stays bounded; once
/// the client reads, everything arrives, in order.
#[tokio::test]
async fn a_client_that_does_not_read_holds_back_the_process_s_output() {
    const FLOOD: usize = 16 << 20;
    const BOUND: usize = 4 << 20;
    let mut keeld = Harness::start();
    let (mut client, mut process) = keeld
        .session(&initialize(&["yes"], "admin", None, false))
        .await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let pattern: Vec<u8> = (0..FLOOD).map(|i| (i % 251) as u8).collect();
    let pattern = Arc::new(pattern);
    let mut stdout = std::mem::replace(&mut process.stdout, duplex(1).0);
    let mut writer = tokio::spawn({
        let (accepted, pattern) = (accepted.clone(), pattern.clone());
        async move {
            let mut at = 0;
            while at < FLOOD {
                let n = stdout
                    .write(&pattern[at..FLOOD.min(at + PIPE)])
                    .await
                    .unwrap();
                at += n;
                accepted.store(at, Ordering::Relaxed);
            }
            stdout.shutdown().await.unwrap();
        }
    });
    // The point is that the writer stalls: without a bound, keeld would take the 16 MiB
    // well within this time.
    let finished = timeout(Duration::from_millis(500), &mut writer)
        .await
        .is_ok();
    let held = accepted.load(Ordering::Relaxed);
    assert!(
        !finished && held < BOUND,
        "keeld accepted {held} bytes of output its client did not read (finished: {finished})"
    );

    let mut received = 0;
    assert_eq!(client.next().await, capacity(0));
    while received < FLOOD {
        match client.next().await {
            Data(data) => {
                assert!(
                    data[..] == pattern[received..received + data.len()],
                    "output at byte {received} is not what was written"
                );
                received += data.len();
            }
            other => panic!("{other:?} after {received} bytes of output"),
        }
    }
    timeout(WAIT, writer)
        .await
        .expect("the writer finished")
        .unwrap();
    process.exit(0);
    process.stderr = None;
    assert_eq!(client.next().await, Closed(1000, "0".into()));
}

/// A process that wrote more than its client has read yet, and exited: all of its
/// output reaches the client before the close, however slowly the client reads.
/// Regression: the session took a client slower than the idle time for a quiet process,
/// closed, and lost what was still in the pipe (`apiclient exec … | less`).
#[tokio::test]
async fn a_slow_client_gets_all_the_output_of_a_process_that_exited() {
    // A pipe that holds much more than keeld's queue, as the shim's buffers and the
    // FIFO together may.
    const BUFFERED: usize = 1 << 20;
    let mut keeld = Harness::with_buffers(PIPE, BUFFERED);
    let (mut client, mut process) = keeld
        .session(&initialize(&["cat", "big"], "admin", None, false))
        .await;
    // The client reads nothing yet, so keeld's queue fills and the rest stays in the
    // pipe; the process wrote it all, and exits.
    let output: Vec<u8> = (0..BUFFERED).map(|i| (i % 251) as u8).collect();
    process.stdout.write_all(&output).await.unwrap();
    process.exit(0);
    process.end_output().await;
    // The scenario: a client slower than the idle time (a pager that waits for its user).
    tokio::time::sleep(AFTER_EXIT_IDLE + Duration::from_millis(300)).await;
    let (_, received, close) = client.until_close().await;
    assert_eq!(
        received.len(),
        output.len(),
        "all the output, then the close"
    );
    assert!(received == output, "the output, in order");
    assert_eq!(close, closed(1000, "0"));
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: true }]
    );
}

/// `ExecService::stop` ends every session with 1001, running or still waiting for its
/// Initialize, and removes the running process; it answers that they all finished.
#[tokio::test]
async fn stopping_ends_sessions_with_1001_and_removes_their_processes() {
    let mut keeld = Harness::start();
    let mut waiting = keeld.connect().await;
    let (mut client, mut process) = keeld
        .session(&initialize(&["sh"], "admin", None, true))
        .await;
    assert_eq!(client.next().await, capacity(0));
    assert_eq!(client.next().await, started(true));
    assert!(keeld.service.stop(WAIT).await, "the sessions finished");
    assert_eq!(
        client.until_close().await.2,
        closed(1001, "keeld is stopping")
    );
    assert_eq!(
        waiting.until_close().await.2,
        closed(1001, "keeld is stopping")
    );
    assert_eq!(
        process.calls_until_released().await,
        [Call::Remove { exited: false }]
    );
}

/// With [`MAX_SESSIONS`] sessions open, an upgrade is refused with 503; a session that
/// ends frees its place.
#[tokio::test]
async fn upgrades_beyond_max_sessions_are_refused_with_503() {
    let keeld = Harness::start();
    let mut clients = Vec::new();
    for _ in 0..MAX_SESSIONS {
        clients.push(keeld.connect().await);
    }
    match keeld.try_connect().await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(
                body,
                serde_json::json!({
                    "error": "64 exec sessions are running already; try again later"
                })
            );
        }
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("a session beyond {MAX_SESSIONS} was accepted"),
    }
    // One session ends (its target does not exist); once its socket closed, its place
    // is free. (keeld releases the place in the same step as it closes the socket.)
    let mut ending = clients.pop().unwrap();
    ending
        .control(&initialize(&["sh"], "missing", None, false))
        .await;
    assert_eq!(ending.until_close().await.2 .0, CLOSE_NOT_FOUND);
    while let Some(Ok(_)) = timeout(WAIT, ending.ws.next())
        .await
        .expect("the socket closes")
    {}
    keeld.connect().await;
}

/// A refusal repeats at most [`ECHO_MAX`] characters of what the client sent, escaped:
/// a client cannot write 60 KiB, or a forged line, into keeld's log per message.
#[test]
fn a_refusal_repeats_a_bounded_escaped_part_of_the_client_s_text() {
    assert_eq!(super::echoed("SIGFOO"), "\"SIGFOO\"");
    assert_eq!(super::echoed("a\nb"), "\"a\\nb\"");
    let long = "A".repeat(60_000);
    let shown = super::echoed(&long);
    assert!(
        shown.len() < 100 && shown.ends_with("… (60000 bytes)"),
        "{shown}"
    );
}
