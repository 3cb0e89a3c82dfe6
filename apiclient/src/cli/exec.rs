//! `apiclient exec`: runs a command in a host container through keeld's `/exec`
//! (Bottlerocket's command line and protocol; see keeld's `api/exec.rs`).
//!
//! Owns the terminal (raw mode while a terminal session runs, restored on every way
//! out: the end of the process, an error, a signal, a panic), the signals (SIGWINCH
//! becomes a window-size message; SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2
//! and SIGALRM are forwarded to the process once, and a second one ends apiclient, as
//! the other signals that would end it do at once: see [`Signals`]) and the plumbing of stdin, stdout
//! and stderr. Unlike the other commands it prints as it goes, and it exits with the
//! process's exit status itself (`std::process::exit`), after the terminal is restored
//! and the output written.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use super::{CliError, Output};
use crate::client::Client;
use crate::exec::tungstenite::protocol::frame::coding::CloseCode;
use crate::exec::tungstenite::Message;
use crate::exec::{
    self as wire, ClientMessage, Initialize, ServerMessage, Size, TtyInit, INPUT_CHUNK_BYTES,
    KEEL_PROTOCOL,
};

/// apiclient pings keeld this often.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// keeld pings every 2 s: silence this long means it is gone.
const SERVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a command in a host container, with its stdin, stdout and stderr (or a
/// terminal) connected to apiclient's; apiclient exits with the command's exit status
#[derive(Debug, Args)]
#[command(after_help = "\
The command runs with the container's own user, environment, working directory and
privileges. With a terminal (-t, or by default when stdin and stdout are terminals)
Ctrl-C goes to the command; without one, stdin is streamed until end-of-file and stdout
and stderr stay apart. apiclient exits with the command's exit status (128 + n when
signal n ended it), 1 when the exec could not run, 2 on a usage error, or 141 when
apiclient could no longer write the command's output.

Examples:
  apiclient exec admin bash
  apiclient exec admin cat /etc/os-release > os-release
  echo hello | apiclient exec -T admin sh -c 'cat > /tmp/greeting'")]
pub struct ExecArgs {
    /// Run the command in a terminal.
    #[arg(short = 't', long = "tty", conflicts_with = "no_tty")]
    pub tty: bool,
    /// Never run the command in a terminal.
    #[arg(short = 'T', long = "no-tty")]
    pub no_tty: bool,
    /// Accepted for docker's and kubectl's habit; stdin is always streamed.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// The host container to run the command in (`admin`, `control`).
    pub target: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 1..
    )]
    pub command: Vec<OsString>,
}

pub async fn run(client: &Client, args: ExecArgs) -> Result<Output, CliError> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let tty = match (args.tty, args.no_tty) {
        (true, _) => true,
        (_, true) => false,
        _ => rustix::termios::isatty(stdin.as_fd()) && rustix::termios::isatty(stdout.as_fd()),
    };
    // Handlers first: from here on no signal can end apiclient with the terminal raw.
    let mut signals = Signals::new().map_err(|e| io_error("cannot handle signals", e))?;
    // Waiting for keeld (which may be restarting behind a socket systemd holds): a
    // signal that would have ended apiclient ends it, as 128 + its number.
    let connect = wire::connect(client.socket_path());
    tokio::pin!(connect);
    let socket = loop {
        tokio::select! {
            connected = &mut connect => break connected?,
            signal = signals.recv() => match signal {
                Some(libc::SIGWINCH) => {}
                Some(n) => std::process::exit(128 + n),
                None => break connect.await?,
            },
        }
    };
    let terminal = match tty {
        true => RawMode::enter(),
        false => None,
    };
    let size = tty.then(window_size).flatten();
    let init = Initialize {
        command: args.command,
        target: args.target,
        tty: tty.then_some(TtyInit { size }),
        keel_protocol: Some(KEEL_PROTOCOL),
    };
    let output = OutputThread::start();
    let ended = session(socket, init, tty, &mut signals, &output).await;
    // The output before the end goes out before anything else is printed.
    let output_broken = output.finish();
    drop(terminal);
    match ended {
        Ok(_) if output_broken => std::process::exit(141),
        Ok(code) => {
            let _ = std::io::stderr().flush();
            std::process::exit(code)
        }
        Err(message) => Err(CliError::Invalid(message)),
    }
}

fn io_error(what: &str, e: std::io::Error) -> CliError {
    CliError::Invalid(format!("{what}: {e}"))
}

/// The conversation with keeld, until the process's exit status (or why there is none).
async fn session(
    socket: wire::ExecSocket,
    init: Initialize,
    tty: bool,
    signals: &mut Signals,
    output: &OutputThread,
) -> Result<i32, String> {
    let (sink, mut stream) = socket.split();
    let (outgoing, queue) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(write_frames(sink, queue));
    let send = |message: &ClientMessage| {
        let text = serde_json::to_string(message).unwrap_or_default();
        Message::Text(text.into())
    };
    if outgoing
        .send(send(&ClientMessage::Initialize(init)))
        .await
        .is_err()
    {
        return Err("keeld closed the connection".to_owned());
    }
    let heartbeat = {
        let outgoing = outgoing.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
            loop {
                tick.tick().await;
                if outgoing.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut input = StdinThread::start();
    let mut input_open = true;
    let mut sent = 0u64;
    let mut capacity = wire::Capacity {
        // Nothing is sent before keeld says how much it takes.
        max_messages_outstanding: 0,
        messages_written: 0,
    };
    let mut keel = false;
    let mut forwarded_signal = false;
    let ended = loop {
        let may_send = sent.saturating_sub(capacity.messages_written)
            <= capacity.max_messages_outstanding
            && capacity.max_messages_outstanding > 0;
        tokio::select! {
            message = tokio::time::timeout(SERVER_TIMEOUT, stream.next()) => {
                let message = match message {
                    Err(_) => break Err(format!("keeld did not answer for {SERVER_TIMEOUT:?}")),
                    Ok(None) => break Err("keeld closed the connection without an exit status".to_owned()),
                    Ok(Some(Err(e))) => break Err(format!("the connection to keeld failed: {e}")),
                    Ok(Some(Ok(message))) => message,
                };
                match message {
                    Message::Binary(data) => {
                        let (stream, data) = match (keel, data.first()) {
                            (true, Some(&wire::STDERR)) => (Stream::Stderr, data.slice(1..)),
                            (true, Some(_)) => (Stream::Stdout, data.slice(1..)),
                            (true, None) => continue,
                            (false, _) => (Stream::Stdout, data),
                        };
                        if !output.write(stream, data).await {
                            // stdout is gone (`| head`): end like a process killed by SIGPIPE.
                            break Ok(141);
                        }
                    }
                    Message::Text(text) => match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(ServerMessage::Capacity(c)) => capacity = c,
                        Ok(ServerMessage::Started(s)) => keel = s.keel_protocol >= 1,
                        Ok(ServerMessage::Refused(r)) => {
                            output.note(&format!("apiclient exec: {}", r.message), tty).await;
                        }
                        Err(e) => break Err(format!("keeld sent a message apiclient does not know ({e}): {text}")),
                    },
                    Message::Close(frame) => {
                        break match frame {
                            // An exit status is 0–255 (a process killed by a signal: 128 +
                            // its number); anything else would be cut to its low byte by
                            // exit(3), and 256 would read as success.
                            Some(f) if f.code == CloseCode::Normal => f
                                .reason
                                .parse::<u8>()
                                .map(i32::from)
                                .map_err(|_| format!("keeld closed the session without an exit status (0-255): {:?}", f.reason.as_str())),
                            Some(f) => Err(format!("{} (close code {})", f.reason, u16::from(f.code))),
                            None => Err("keeld closed the session without an exit status".to_owned()),
                        };
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            chunk = input.receiver.recv(), if input_open && may_send => {
                match chunk {
                    Some(Some(data)) => {
                        sent += 1;
                        let _ = outgoing.send(Message::Binary(data)).await;
                    }
                    // End of input (or a read error): the process's stdin closes.
                    Some(None) | None => {
                        input_open = false;
                        let _ = outgoing.send(send(&ClientMessage::ContentComplete)).await;
                    }
                }
            }
            Some(number) = signals.recv() => {
                if number == libc::SIGWINCH {
                    if let Some(size) = tty.then(window_size).flatten() {
                        let _ = outgoing.send(send(&ClientMessage::Winch(size))).await;
                    }
                    continue;
                }
                match (keel && !forwarded_signal, wire::signal_name(number)) {
                    (true, Some(name)) => {
                        forwarded_signal = true;
                        let _ = outgoing.send(send(&ClientMessage::Signal(name.to_owned()))).await;
                    }
                    // A second signal, or a keeld that cannot forward it: apiclient goes,
                    // and keeld kills the process when the connection closes.
                    _ => break Ok(128 + number),
                }
            }
        }
    };
    heartbeat.abort();
    drop(outgoing);
    // A normal end answers keeld's close; otherwise the connection just ends.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    ended
}

/// Sends the queued frames until the queue closes.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<wire::ExecSocket, Message>,
    mut queue: mpsc::Receiver<Message>,
) {
    while let Some(message) = queue.recv().await {
        if sink.send(message).await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Writes the process's output on its own thread, so that a slow stdout never stops
/// apiclient from answering keeld (the heartbeat) while it still holds back the
/// output (a bounded queue).
struct OutputThread {
    queue: Option<mpsc::Sender<(Stream, Bytes)>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl OutputThread {
    fn start() -> OutputThread {
        let (queue, mut receiver) = mpsc::channel::<(Stream, Bytes)>(4);
        let thread = std::thread::spawn(move || {
            let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
            while let Some((stream, data)) = receiver.blocking_recv() {
                let written = match stream {
                    Stream::Stdout => stdout.write_all(&data).and_then(|()| stdout.flush()),
                    Stream::Stderr => stderr.write_all(&data).and_then(|()| stderr.flush()),
                };
                if written.is_err() {
                    return true;
                }
            }
            false
        });
        OutputThread {
            queue: Some(queue),
            thread: Some(thread),
        }
    }

    /// Queues output; false once it can no longer be written.
    async fn write(&self, stream: Stream, data: Bytes) -> bool {
        match &self.queue {
            Some(queue) => queue.send((stream, data)).await.is_ok(),
            None => false,
        }
    }

    /// A message of apiclient's own, after the output before it.
    async fn note(&self, text: &str, raw_terminal: bool) {
        let eol = if raw_terminal { "\r\n" } else { "\n" };
        self.write(Stream::Stderr, Bytes::from(format!("{text}{eol}")))
            .await;
    }

    /// Writes what is queued; answers whether the output broke (a closed pipe).
    fn finish(mut self) -> bool {
        self.queue = None;
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(true))
            .unwrap_or(false)
    }
}

/// Reads stdin on its own thread, in chunks of [`INPUT_CHUNK_BYTES`]; `None` at the end
/// (or a read error). The queue holds one chunk: apiclient reads ahead of keeld's
/// capacity by that much at most.
struct StdinThread {
    receiver: mpsc::Receiver<Option<Bytes>>,
}

impl StdinThread {
    fn start() -> StdinThread {
        let (sender, receiver) = mpsc::channel(1);
        // The thread may stay blocked in read(2) when the session ends; the process
        // exits then anyway.
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = vec![0u8; INPUT_CHUNK_BYTES];
            loop {
                let chunk = match stdin.read(&mut buf) {
                    Ok(0) => None,
                    Ok(n) => Some(Bytes::copy_from_slice(&buf[..n])),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => None,
                };
                let end = chunk.is_none();
                if sender.blocking_send(chunk).is_err() || end {
                    return;
                }
            }
        });
        StdinThread { receiver }
    }
}

/// The signals apiclient handles instead of dying of them: every signal whose default
/// action ends a process and that can be sent to it (not the faults), so that none
/// leaves the terminal raw.
struct Signals {
    winch: Signal,
    /// SIGINT, SIGTERM, SIGHUP, SIGQUIT, then the rarer ones (SIGUSR1, SIGUSR2, SIGALRM
    /// are forwarded as the first four are; SIGVTALRM, SIGPROF, SIGXCPU and SIGXFSZ,
    /// which the protocol cannot name, end apiclient).
    ending: Vec<(i32, Signal)>,
}

impl Signals {
    /// The signals handled, by number.
    const ENDING: [i32; 11] = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGXCPU,
        libc::SIGXFSZ,
    ];

    fn new() -> std::io::Result<Signals> {
        let mut ending = Vec::with_capacity(Self::ENDING.len());
        for number in Self::ENDING {
            ending.push((number, signal(SignalKind::from_raw(number))?));
        }
        Ok(Signals {
            winch: signal(SignalKind::window_change())?,
            ending,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> Option<i32> {
        let ending =
            futures_util::future::select_all(self.ending.iter_mut().map(|(number, signal)| {
                let number = *number;
                Box::pin(async move { signal.recv().await.map(|()| number) })
            }));
        tokio::select! {
            s = self.winch.recv() => s.map(|()| libc::SIGWINCH),
            (s, _, _) = ending => s,
        }
    }
}

/// The terminal in raw mode (no line editing, no echo, Ctrl-C a byte like any other:
/// the remote terminal interprets the keys); the saved settings come back on drop.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    /// Raw mode on stdin's terminal; `None` when stdin is not one (`-t` with a pipe).
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = rustix::termios::tcsetattr(
            stdin.as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// The size of apiclient's terminal (stdout's, else stdin's), when it has a usable one.
fn window_size() -> Option<Size> {
    let from = |fd: std::os::fd::BorrowedFd<'_>| {
        rustix::termios::tcgetwinsize(fd).ok().map(|w| Size {
            rows: w.ws_row,
            cols: w.ws_col,
        })
    };
    let stdout = std::io::stdout();
    let stdin = std::io::stdin();
    from(stdout.as_fd())
        .or_else(|| from(stdin.as_fd()))
        .filter(|s| s.is_usable())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> ExecArgs {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Some(Command::Exec(args)) => args,
            other => panic!("not exec: {other:?}"),
        }
    }

    /// Bottlerocket's command lines: options before the target or between target and
    /// command; everything from the command on belongs to the command.
    #[test]
    fn bottlerocket_s_command_lines_parse() {
        let a = parse(&["apiclient", "exec", "admin", "bash"]);
        assert_eq!(
            (a.target.as_str(), a.tty, a.no_tty),
            ("admin", false, false)
        );
        assert_eq!(a.command, vec![OsString::from("bash")]);
        let a = parse(&[
            "apiclient",
            "exec",
            "-t",
            "admin",
            "ls",
            "-l",
            "-t",
            "--tty",
        ]);
        assert!(a.tty);
        assert_eq!(a.command, ["ls", "-l", "-t", "--tty"].map(OsString::from));
        let a = parse(&["apiclient", "exec", "admin", "--no-tty", "cat", "/file"]);
        assert!(a.no_tty);
        assert_eq!(a.command, ["cat", "/file"].map(OsString::from));
        let a = parse(&[
            "apiclient",
            "exec",
            "-T",
            "-i",
            "control",
            "sh",
            "-c",
            "exit 7",
        ]);
        assert!(a.no_tty && a.interactive);
        assert_eq!(a.command, ["sh", "-c", "exit 7"].map(OsString::from));
    }

    #[test]
    fn a_target_without_a_command_is_a_usage_error() {
        assert!(Cli::try_parse_from(["apiclient", "exec", "admin"]).is_err());
        assert!(Cli::try_parse_from(["apiclient", "exec"]).is_err());
        assert!(Cli::try_parse_from(["apiclient", "exec", "-t", "-T", "admin", "sh"]).is_err());
    }
}
