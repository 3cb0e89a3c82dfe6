//! `apiclient logs`: a container's output (Keel's addition), once or followed.
//!
//! Following polls `GET /containers/{name}/logs?since=<cursor>` rather than holding a
//! stream open: it costs keeld nothing between polls, and it carries on across a keeld
//! restart (the container and its log outlive keeld). Output lost to log rotation
//! between two polls is announced on stderr, never skipped silently.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use http::Method;

use super::containers::Kind;
use super::{CliError, Output};
use crate::client::{Client, Response};
use crate::uri::with_query;

/// How often `--follow` asks for new output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

/// Prints the end of a container's output (stdout and stderr together)
///
/// With --follow, keeps printing what the container writes until interrupted (Ctrl-C),
/// across container restarts and keeld restarts; exits 1 if the container is removed.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient logs admin
  apiclient logs --kind bootstrap --tail 4096 setup
  apiclient logs -f admin")]
pub struct LogsArgs {
    /// The container's name.
    pub name: String,
    /// How many bytes from the end (at most 2 MiB).
    #[arg(long, default_value_t = 65536)]
    pub tail: u64,
    /// Host or bootstrap container, when both have this name (default: host).
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// Keep printing new output as the container writes it.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// `/containers/<name>/logs` with the given query (`kind` added when given).
fn logs_uri(args: &LogsArgs, query: (&str, &str)) -> String {
    let name =
        percent_encoding::utf8_percent_encode(&args.name, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let path = format!("/containers/{name}/logs");
    match args.kind {
        Some(kind) => with_query(&path, &[query, ("kind", kind.as_str())]),
        None => with_query(&path, &[query]),
    }
}

pub async fn run(client: &Client, args: LogsArgs) -> Result<Output, CliError> {
    let tail = args.tail.to_string();
    let response = client
        .call(Method::GET, &logs_uri(&args, ("tail", &tail)), None)
        .await?;
    if !args.follow {
        return Ok(Output::Bytes(response.body.to_vec()));
    }
    let mut stdout = std::io::stdout().lock();
    let mut cursor = cursor_of(&response)?;
    if let Some(ended) = written(write(&mut stdout, &response)) {
        return ended;
    }
    drop(stdout);
    let mut keeld_gone = false;
    loop {
        tokio::time::sleep(FOLLOW_INTERVAL).await;
        let uri = logs_uri(&args, ("since", &cursor));
        let response = match client.call(Method::GET, &uri, None).await {
            Ok(response) => response,
            // keeld restarting: the container (and its log) carry on; so do we.
            Err(error) if error.is_connection() => {
                if !keeld_gone {
                    crate::note!("apiclient: keeld is not answering; still following");
                    keeld_gone = true;
                }
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        keeld_gone = false;
        if response.header("x-keel-log-gap") == Some("true") {
            crate::note!(
                "apiclient: some output of {} was lost (rotated away between two reads)",
                args.name
            );
        }
        cursor = cursor_of(&response)?;
        let mut stdout = std::io::stdout().lock();
        if let Some(ended) = written(write(&mut stdout, &response)) {
            return ended;
        }
    }
}

fn cursor_of(response: &Response) -> Result<String, CliError> {
    response
        .header("x-keel-log-cursor")
        .map(str::to_owned)
        .ok_or_else(|| {
            CliError::Invalid("keeld's answer has no x-keel-log-cursor header to follow".into())
        })
}

/// Whether following ends after a write: a closed pipe (`logs -f admin | head`) ends it
/// quietly, any other failure (a full disk) as an error, as for every other command.
fn written(result: std::io::Result<()>) -> Option<Result<Output, CliError>> {
    match result {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Some(Ok(Output::Nothing)),
        Err(e) => Some(Err(CliError::Invalid(format!(
            "cannot write the output: {e}"
        )))),
    }
}

fn write(out: &mut impl Write, response: &Response) -> std::io::Result<()> {
    if response.body.is_empty() {
        return Ok(());
    }
    out.write_all(&response.body)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_pipe_ends_following_quietly() {
        use std::io::{Error, ErrorKind};
        assert!(written(Ok(())).is_none());
        assert!(matches!(
            written(Err(Error::from(ErrorKind::BrokenPipe))),
            Some(Ok(Output::Nothing))
        ));
        let full = written(Err(Error::from_raw_os_error(28)));
        assert!(
            matches!(&full, Some(Err(CliError::Invalid(m))) if m.starts_with("cannot write the output")),
            "{full:?}"
        );
    }

    #[test]
    fn uris_encode_the_name_and_carry_the_kind() {
        let mut args = LogsArgs {
            name: "admin".into(),
            tail: 10,
            kind: None,
            follow: false,
        };
        assert_eq!(
            logs_uri(&args, ("tail", "10")),
            "/containers/admin/logs?tail=10"
        );
        args.kind = Some(Kind::Bootstrap);
        args.name = "a b".into();
        assert_eq!(
            logs_uri(&args, ("since", "5-3")),
            "/containers/a%20b/logs?since=5-3&kind=bootstrap"
        );
    }
}
