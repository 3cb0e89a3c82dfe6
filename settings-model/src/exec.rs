//! The messages of `/exec` (`apiclient exec`), shared by keeld and apiclient: the JSON
//! control messages that travel in WebSocket text frames, and the protocol's limits.
//!
//! The shapes are Bottlerocket's wire format (serde's externally tagged enums:
//! `{"Initialize":{…}}`, `"ContentComplete"`, `{"Winch":{"rows":…,"cols":…}}`,
//! `{"Capacity":{…}}`; a command is a list of `OsString`, which serde writes on Unix as
//! `{"Unix":[bytes…]}`), so Bottlerocket's `apiclient exec` talks to keeld and Keel's to
//! Bottlerocket's apiserver. Keel's additions are negotiated: a client that sends
//! `keel_protocol` in its `Initialize` gets [`ServerMessage::Started`] back, may send
//! [`ClientMessage::Signal`], may receive [`ServerMessage::Refused`], and receives every
//! process output frame with a leading stream byte ([`STDOUT`] or [`STDERR`]) so that
//! stdout and stderr stay apart. A client that does not ask sees exactly Bottlerocket's
//! protocol (stdout and stderr merged into untagged binary frames).
//!
//! No I/O here; keeld's `api/exec.rs` describes the whole exchange.

use std::ffi::OsString;

use serde::{Deserialize, Serialize};

/// The version of Keel's additions this crate speaks.
pub const KEEL_PROTOCOL: u32 = 1;

/// Largest WebSocket message (text or binary) keeld accepts; a larger one closes the
/// connection with 1009. Bottlerocket's client sends at most 4 KiB at a time.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// How many input messages a client may have sent beyond those keeld reported written
/// (Bottlerocket's figure, sent in every [`Capacity`]).
pub const MAX_MESSAGES_OUTSTANDING: u64 = 1024;

/// keeld reports its progress after every this many input messages written.
pub const CAPACITY_UPDATE_INTERVAL: u64 = 128;

/// What a client should put in one input message: with [`MAX_MESSAGES_OUTSTANDING`] of
/// them in flight, at most 8 MiB wait in keeld for the process to read them.
pub const INPUT_CHUNK_BYTES: usize = 8 * 1024;

/// Input bytes keeld holds for one process at most: one more than
/// [`MAX_MESSAGES_OUTSTANDING`] messages of [`INPUT_CHUNK_BYTES`], plus one largest
/// message of slack. A client past it ignored the capacity updates, and is closed with
/// 1009.
pub const MAX_INPUT_BYTES_OUTSTANDING: usize =
    (MAX_MESSAGES_OUTSTANDING as usize + 1) * INPUT_CHUNK_BYTES + MAX_MESSAGE_BYTES;

/// Stream byte in front of a stdout frame (Keel's protocol only).
pub const STDOUT: u8 = 1;
/// Stream byte in front of a stderr frame (Keel's protocol only).
pub const STDERR: u8 = 2;

/// A message from the client, in a text frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// The first message: what to run, where, and whether in a terminal.
    Initialize(Initialize),
    /// The client's input ended: the process's stdin is closed once what was sent
    /// before is written.
    ContentComplete,
    /// The client's terminal changed size.
    Winch(Size),
    /// Keel: send this signal (a name such as `"SIGTERM"`) to the process.
    Signal(String),
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Initialize {
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// The host container's name (`admin`).
    pub target: String,
    /// A terminal (pseudo-terminal) for the process, or none (`null`).
    pub tty: Option<TtyInit>,
    /// Keel: the version of Keel's additions the client speaks. Absent: Bottlerocket's
    /// protocol alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keel_protocol: Option<u32>,
}

/// The terminal's initial state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtyInit {
    pub size: Option<Size>,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    pub rows: u16,
    pub cols: u16,
}

impl Size {
    /// A size a terminal can have (a 0x0 "size" is what an unsized console reports).
    pub fn is_usable(self) -> bool {
        self.rows > 0 && self.cols > 0
    }
}

/// A message from keeld, in a text frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// How far keeld got writing the client's input to the process.
    Capacity(Capacity),
    /// Keel: the process runs; what follows is Keel's protocol.
    Started(Started),
    /// Keel: a control message was refused (the session goes on).
    Refused(Refused),
}

/// Flow control of the input: the client may have at most
/// `max_messages_outstanding` input messages sent beyond `messages_written`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub max_messages_outstanding: u64,
    pub messages_written: u64,
}

/// Keel: the answer to an `Initialize` that carried `keel_protocol`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The version keeld speaks (at most the client's).
    pub keel_protocol: u32,
    /// Whether output frames carry a stream byte ([`STDOUT`], [`STDERR`]).
    pub separate_stderr: bool,
}

/// Keel: why a control message had no effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub message: String,
}

/// The signals a client may name, with their numbers on Linux (the generic numbering of
/// x86-64, arm64 and the other architectures Keel runs on).
pub const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGABRT", 6),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGPIPE", 13),
    ("SIGALRM", 14),
    ("SIGTERM", 15),
    ("SIGCONT", 18),
    ("SIGSTOP", 19),
    ("SIGTSTP", 20),
    ("SIGWINCH", 28),
];

/// The number of a signal name from [`SIGNALS`].
pub fn signal_number(name: &str) -> Option<i32> {
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The name of a signal number from [`SIGNALS`].
pub fn signal_name(number: i32) -> Option<&'static str> {
    SIGNALS.iter().find(|(_, s)| *s == number).map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    /// The exact JSON Bottlerocket's client sends and expects.
    #[test]
    fn messages_have_bottlerocket_s_shapes() {
        let init = ClientMessage::Initialize(Initialize {
            command: vec!["ls".into(), "-l".into()],
            target: "admin".into(),
            tty: Some(TtyInit {
                size: Some(Size { rows: 24, cols: 80 }),
            }),
            keel_protocol: None,
        });
        assert_eq!(
            serde_json::to_value(&init).unwrap(),
            json!({"Initialize": {
                "command": [{"Unix": [108, 115]}, {"Unix": [45, 108]}],
                "target": "admin",
                "tty": {"size": {"rows": 24, "cols": 80}}
            }})
        );
        assert_eq!(
            serde_json::to_string(&ClientMessage::ContentComplete).unwrap(),
            r#""ContentComplete""#
        );
        assert_eq!(
            serde_json::to_value(ClientMessage::Winch(Size { rows: 1, cols: 2 })).unwrap(),
            json!({"Winch": {"rows": 1, "cols": 2}})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::Capacity(Capacity {
                max_messages_outstanding: 1024,
                messages_written: 128
            }))
            .unwrap(),
            json!({"Capacity": {"max_messages_outstanding": 1024, "messages_written": 128}})
        );
        // Bottlerocket's client sends `tty: null` without a terminal.
        let parsed: ClientMessage = serde_json::from_value(
            json!({"Initialize": {"command": [{"Unix": [116, 114, 117, 101]}], "target": "a", "tty": null}}),
        )
        .unwrap();
        let ClientMessage::Initialize(init) = parsed else {
            panic!("not an Initialize");
        };
        assert_eq!(init.command, vec![OsString::from("true")]);
        assert_eq!(init.tty, None);
        assert_eq!(init.keel_protocol, None);
    }

    #[test]
    fn unknown_fields_and_messages_are_refused() {
        assert!(serde_json::from_value::<ClientMessage>(
            json!({"Initialize": {"command": [], "target": "a", "tty": null, "x": 1}})
        )
        .is_err());
        assert!(serde_json::from_value::<ClientMessage>(json!({"Resize": {}})).is_err());
        assert!(serde_json::from_value::<ClientMessage>(
            json!({"Winch": {"rows": 70000, "cols": 1}})
        )
        .is_err());
    }

    #[test]
    fn signal_names_round_trip() {
        for (name, number) in SIGNALS {
            assert_eq!(signal_number(name), Some(*number));
            assert_eq!(signal_name(*number), Some(*name));
        }
        assert_eq!(signal_number("SIGFOO"), None);
        assert_eq!(signal_number("TERM"), None);
    }
}
