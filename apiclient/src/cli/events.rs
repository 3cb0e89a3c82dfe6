//! `apiclient events`: what happened on the host (commits, applies, container and boot
//! state, updates), from `GET /events` (Keel's addition).
//!
//! Unlike the other commands it prints as it reads, to the writer it is given: with
//! `--follow` the stream has no end. A follower that loses keeld (a restart) connects
//! again and resumes after the last cursor it printed; keeld then says, with a `gap`
//! event, that it is a new stream.

use std::io::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::Value;

use super::output::{self, Format};
use super::{CliError, Output};
use crate::client::Client;

/// The kinds of event `--kind` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventKind {
    Commit,
    Apply,
    Container,
    BootPhase,
    Update,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Commit => "commit",
            EventKind::Apply => "apply",
            EventKind::Container => "container",
            EventKind::BootPhase => "boot-phase",
            EventKind::Update => "update",
        }
    }
}

/// Shows what happened on the host: settings commits, applies, container state changes,
/// boot phases and update states, each with its cursor
///
/// keeld keeps the latest events in memory (`keeld --event-buffer`); cursors count from 1
/// at each keeld start, under a new stream id. A `gap` line says that events were lost
/// (the client asked for, or read, too late) or that keeld restarted since the cursor
/// given.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient events
  apiclient events --follow
  apiclient events --since 42 --kind commit,apply
  apiclient events --follow -o json | jq -c 'select(.kind == \"container\")'")]
pub struct EventsArgs {
    /// Only events after this cursor (the first column, or the `cursor` field of -o json).
    #[arg(long)]
    pub since: Option<u64>,
    /// The stream the --since cursor comes from (the `stream` field of -o json): if keeld
    /// has restarted since, a gap says so.
    #[arg(long, requires = "since")]
    pub stream: Option<String>,
    /// Keep printing new events until interrupted (reconnecting when keeld restarts).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events of these kinds (comma-separated or repeated); gaps are always shown.
    #[arg(long = "kind", value_enum, value_delimiter = ',')]
    pub kinds: Vec<EventKind>,
    /// One line per event for people (table), each event as keeld's JSON on one line
    /// (json), or each as a YAML document (yaml).
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Format,
}

/// How long a follower waits before connecting again to a keeld that went away.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Where the stream was last: what to resume from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Position {
    stream: Option<String>,
    cursor: Option<u64>,
}

impl Position {
    fn uri(&self, args: &EventsArgs) -> String {
        let mut query = Vec::new();
        if let Some(cursor) = self.cursor {
            query.push(format!("since={cursor}"));
        }
        if let Some(stream) = &self.stream {
            query.push(format!(
                "stream={}",
                percent_encoding::utf8_percent_encode(stream, percent_encoding::NON_ALPHANUMERIC)
            ));
        }
        if args.follow {
            query.push("follow=true".to_owned());
        }
        if !args.kinds.is_empty() {
            let kinds: Vec<&str> = args.kinds.iter().map(|k| k.as_str()).collect();
            query.push(format!("kinds={}", kinds.join(",")));
        }
        if query.is_empty() {
            "/events".to_owned()
        } else {
            format!("/events?{}", query.join("&"))
        }
    }

    /// Moves past `event`.
    fn advance(&mut self, event: &Value) {
        if let Some(cursor) = event.get("cursor").and_then(Value::as_u64) {
            self.cursor = Some(cursor);
        }
        if let Some(stream) = event.get("stream").and_then(Value::as_str) {
            self.stream = Some(stream.to_owned());
        }
    }
}

pub async fn run(
    client: &Client,
    args: EventsArgs,
    out: &mut dyn Write,
) -> Result<Output, CliError> {
    let mut position = Position {
        stream: args.stream.clone(),
        cursor: args.since,
    };
    let mut printer = Printer {
        format: args.output,
        printed: 0,
        out,
    };
    let mut reconnecting = false;
    let mut connected = false;
    loop {
        let uri = position.uri(&args);
        let ended = match client.stream(&uri).await {
            Ok(mut stream) => {
                connected = true;
                if reconnecting {
                    crate::note!("apiclient: connected to keeld again; resuming");
                    reconnecting = false;
                }
                read(&mut stream, &mut position, &mut printer).await
            }
            Err(e) => Err(e.into()),
        };
        match ended {
            // The printer's reader went away (`| head`): nothing more to do.
            Err(Stop::Closed) => return Ok(Output::Nothing),
            // The output cannot be written, or keeld sent what is not an event: neither
            // goes away by reading the stream again.
            Err(Stop::Fatal(e)) => return Err(e),
            Ok(()) if !args.follow => break,
            Err(Stop::Failed(e)) if !args.follow => return Err(e),
            // A refusal (bad --stream, too many followers) will not go away by retrying.
            Err(Stop::Failed(CliError::Client(e))) if !e.is_connection() => {
                return Err(CliError::Client(e))
            }
            // Never connected: say why rather than wait for a keeld that may not exist.
            Err(Stop::Failed(e)) if !connected => return Err(e),
            _ => {
                if !reconnecting {
                    crate::note!("apiclient: lost keeld's event stream; reconnecting");
                    reconnecting = true;
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
    if printer.printed == 0 && printer.format == Format::Table {
        match printer.write(b"no events\n").and_then(|()| printer.flush()) {
            Ok(()) | Err(Stop::Closed) => {}
            Err(Stop::Fatal(e) | Stop::Failed(e)) => return Err(e),
        }
    }
    Ok(Output::Nothing)
}

/// Why reading stopped.
#[derive(Debug)]
enum Stop {
    /// The output is gone (a closed pipe).
    Closed,
    /// Reading again would fail the same way (the output cannot be written, an event
    /// line is not JSON): never retried, even when following.
    Fatal(CliError),
    /// The stream failed (keeld went away, a refusal): retried when following and the
    /// error is the connection's.
    Failed(CliError),
}

/// apiclient's own failures (an event it cannot print): never retried.
impl From<CliError> for Stop {
    fn from(e: CliError) -> Self {
        Stop::Fatal(e)
    }
}

impl From<crate::error::ClientError> for Stop {
    fn from(e: crate::error::ClientError) -> Self {
        Stop::Failed(e.into())
    }
}

/// Reads the stream to its end, printing each event as it arrives.
async fn read(
    stream: &mut crate::client::Streaming,
    position: &mut Position,
    printer: &mut Printer<'_>,
) -> Result<(), Stop> {
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.chunk().await? {
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + end];
            start += end + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: Value = serde_json::from_slice(line).map_err(|e| {
                Stop::Fatal(CliError::Invalid(format!(
                    "keeld sent an event that is not JSON ({e}): {}",
                    String::from_utf8_lossy(line)
                )))
            })?;
            position.advance(&event);
            printer.event(line, &event)?;
        }
        pending.drain(..start);
        printer.flush()?;
    }
    // keeld ends every event with a newline: a stream that stops inside one was cut
    // (keeld stopped). The event is not printed; following, it is read again.
    if !pending.iter().all(u8::is_ascii_whitespace) {
        return Err(Stop::Failed(CliError::Invalid(
            "keeld's event stream ended in the middle of an event".to_owned(),
        )));
    }
    Ok(())
}

struct Printer<'a> {
    format: Format,
    printed: usize,
    out: &'a mut dyn Write,
}

impl Printer<'_> {
    fn event(&mut self, line: &[u8], event: &Value) -> Result<(), Stop> {
        match self.format {
            Format::Json => {
                self.write(line)?;
                self.write(b"\n")?;
            }
            Format::Yaml => {
                let document = output::yaml(event)?;
                self.write(b"---\n")?;
                self.write(document.as_bytes())?;
            }
            Format::Table => {
                if self.printed == 0 {
                    self.write(
                        format!("{:>6}  {:<24}  {:<10}  WHAT\n", "CURSOR", "TIME", "KIND")
                            .as_bytes(),
                    )?;
                }
                self.write(format!("{}\n", row(event)).as_bytes())?;
            }
        }
        self.printed += 1;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.out.write_all(bytes).map_err(io_stop)
    }

    fn flush(&mut self) -> Result<(), Stop> {
        self.out.flush().map_err(io_stop)
    }
}

fn io_stop(e: std::io::Error) -> Stop {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Stop::Closed
    } else {
        Stop::Fatal(CliError::Invalid(format!("cannot write the events: {e}")))
    }
}

/// One event as a line for people: cursor, time, kind, what happened.
pub fn row(event: &Value) -> String {
    let text = |key: &str| output::cell(event, key);
    let kind = text("kind");
    let what = match kind.as_str() {
        "commit" => commit(event, &text),
        "apply" => apply(event, &text),
        "container" => {
            let mut what = format!(
                "{} {}: {} -> {}",
                text("container-kind"),
                text("name"),
                text("from"),
                text("to")
            );
            if let Some(code) = event.get("last-exit-code").and_then(Value::as_i64) {
                what.push_str(&format!(" (last exit code {code})"));
            }
            if let Some(reason) = event.get("reason").and_then(Value::as_str) {
                what.push_str(&format!(": {reason}"));
            }
            what
        }
        "boot-phase" => {
            let mut what = match event.get("from").and_then(Value::as_str) {
                Some(from) => format!("{from} -> {}", text("to")),
                None => format!("boot is in {}", text("to")),
            };
            if let Some(reason) = event.get("reason").and_then(Value::as_str) {
                what.push_str(&format!(": {reason}"));
            }
            what
        }
        "update" => match event.get("previous-state").and_then(Value::as_str) {
            Some(previous) => format!("{previous} -> {}", text("state")),
            None => format!("now {}", text("state")),
        },
        "gap" => match event.get("reason").and_then(Value::as_str) {
            Some("new-stream") => format!(
                "keeld restarted since the cursor given (new stream {}): what happened in \
                 between is unknown; what follows is all it kept",
                text("stream")
            ),
            _ => format!(
                "{} events lost (cursors {} to {}): read too late, keeld keeps only the latest",
                text("lost"),
                text("first-lost"),
                text("last-lost")
            ),
        },
        // A kind this apiclient does not know yet: the event as it came.
        _ => event.to_string(),
    };
    format!(
        "{:>6}  {:<24}  {:<10}  {what}",
        text("cursor"),
        text("time"),
        kind
    )
}

fn commit(event: &Value, text: &dyn Fn(&str) -> String) -> String {
    let caller = event.get("caller");
    let field = |key: &str| {
        caller
            .and_then(|c| c.get(key))
            .map_or("?".to_owned(), |v| match v {
                Value::String(s) if s.is_empty() => "?".to_owned(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
    };
    let what = match event.get("rollback-of").and_then(Value::as_u64) {
        Some(target) => format!("generation {} (rollback to {target})", text("generation")),
        None => format!("generation {}", text("generation")),
    };
    let keys: Vec<&str> = event
        .get("changed-keys")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "{what} by {} (uid {}, pid {}, tx {}): {}",
        field("comm"),
        field("uid"),
        field("pid"),
        text("tx"),
        some(&keys, 4)
    )
}

fn apply(event: &Value, text: &dyn Fn(&str) -> String) -> String {
    let list = |key: &str| {
        event
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let files = list("files");
    let commands = list("commands");
    let count = |result: &str| {
        files
            .iter()
            .filter(|f| f.get("result").and_then(Value::as_str) == Some(result))
            .count()
    };
    let services = list("services");
    let services: Vec<&str> = services.iter().filter_map(Value::as_str).collect();
    let ok = event.get("success").and_then(Value::as_bool) == Some(true);
    let mut what = format!(
        "#{} of generation {} {}: {} written, {} unchanged, {} removed, {} commands; services {}",
        text("id"),
        text("generation"),
        if ok { "ok" } else { "FAILED" },
        count("written"),
        count("unchanged"),
        count("removed"),
        commands.len(),
        some(&services, 6)
    );
    let failures = files
        .iter()
        .filter(|f| f.get("result").and_then(Value::as_str) == Some("failed"))
        .map(|f| {
            format!(
                "file {}: {}",
                f.get("name").and_then(Value::as_str).unwrap_or("?"),
                f.get("error").and_then(Value::as_str).unwrap_or("failed")
            )
        })
        .chain(
            commands
                .iter()
                .filter(|c| c.get("success").and_then(Value::as_bool) != Some(true))
                .map(|c| {
                    let why = match (
                        c.get("error").and_then(Value::as_str),
                        c.get("exit-code").and_then(Value::as_i64),
                    ) {
                        (Some(error), _) => error.to_owned(),
                        (None, Some(code)) => format!("exit code {code}"),
                        (None, None) => "did not exit".to_owned(),
                    };
                    format!(
                        "service {}: {why}",
                        c.get("service").and_then(Value::as_str).unwrap_or("?")
                    )
                }),
        );
    for failure in failures {
        what.push_str("; ");
        what.push_str(&failure);
    }
    if event.get("reboot-required").and_then(Value::as_bool) == Some(true) {
        what.push_str("; reboot required");
    }
    what
}

/// The first `most` of `items`, and how many more there are.
fn some(items: &[&str], most: usize) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    let shown = items[..items.len().min(most)].join(", ");
    match items.len().saturating_sub(most) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_kind_reads_as_one_line() {
        let commit = json!({"cursor": 3, "time": "2026-01-01T00:00:00.000Z", "kind": "commit",
            "generation": 5, "tx": "apiclient-set-x", "changed-keys": ["settings.motd"],
            "caller": {"uid": 0, "gid": 0, "pid": 42, "comm": "apiclient"}});
        assert_eq!(
            row(&commit),
            "     3  2026-01-01T00:00:00.000Z  commit      generation 5 by apiclient (uid 0, pid 42, tx apiclient-set-x): settings.motd"
        );
        let apply = json!({"cursor": 4, "kind": "apply", "id": 2, "generation": 5, "success": false,
            "services": ["motd"], "files": [{"name": "motd", "result": "failed", "error": "boom"}],
            "commands": [{"service": "motd", "success": false, "exit-code": 3}]});
        let line = row(&apply);
        assert!(line.contains("#2 of generation 5 FAILED: 0 written, 0 unchanged, 0 removed, 1 commands; services motd; file motd: boom; service motd: exit code 3"), "{line}");
        let container = json!({"cursor": 5, "kind": "container", "name": "admin",
            "container-kind": "host", "from": "running", "to": "exited", "last-exit-code": 1});
        assert!(row(&container).ends_with("host admin: running -> exited (last exit code 1)"));
        let boot = json!({"cursor": 1, "kind": "boot-phase", "from": null, "to": "configured"});
        assert!(row(&boot).ends_with("boot is in configured"));
        let gap = json!({"cursor": 9, "kind": "gap", "reason": "fell-behind", "first-lost": 2,
            "last-lost": 9, "lost": 8});
        assert!(
            row(&gap).contains("8 events lost (cursors 2 to 9)"),
            "{}",
            row(&gap)
        );
        let unknown = json!({"cursor": 1, "kind": "future", "x": 1});
        assert!(row(&unknown).contains("\"x\":1"));
    }

    #[test]
    fn resuming_names_the_last_cursor_and_stream() {
        let args = EventsArgs {
            since: None,
            stream: None,
            follow: true,
            kinds: vec![EventKind::Commit, EventKind::BootPhase],
            output: Format::Json,
        };
        let mut position = Position::default();
        assert_eq!(
            position.uri(&args),
            "/events?follow=true&kinds=commit,boot-phase"
        );
        position.advance(&json!({"cursor": 7, "stream": "ab12"}));
        assert_eq!(
            position.uri(&args),
            "/events?since=7&stream=ab12&follow=true&kinds=commit,boot-phase"
        );
    }

    #[test]
    fn lists_are_cut_short() {
        assert_eq!(some(&["a", "b", "c"], 2), "a, b and 1 more");
        assert_eq!(some(&[], 2), "-");
    }
}
