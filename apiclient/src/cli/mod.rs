//! The `apiclient` command line: flag parsing (clap) and dispatch to one module per
//! subcommand. Owns the exit-code contract: commands return an [`Output`] to print or a
//! [`CliError`] to show on stderr; `main.rs` only prints and exits. Nothing here prints.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::client::Client;
use crate::error::ClientError;
use crate::source::SourceError;

pub mod apply;
pub mod apply_log;
pub mod boot;
pub mod containers;
pub mod get;
pub mod history;
pub mod raw;
pub mod report;
pub mod rollback;
pub mod schema;
pub mod set;
pub mod transaction;
pub mod unset;

const EXAMPLES: &str = "\
Examples:
  apiclient get settings.motd
  apiclient set motd=\"hello from keel\"
  apiclient apply user-data.toml
  apiclient set --dry-run motd=\"hello\"
  apiclient apply-log --limit 1
  apiclient boot wait --timeout 10m
  apiclient containers
  apiclient logs admin
  apiclient -s /tmp/keel/api.sock get os";

/// Talks to keeld, Keel's host agent, through its local API.
///
/// Exit status: 0 on success, 1 when the API or the system refuses (the reason is on
/// stderr) or when settings were committed but applying them failed, 2 on a usage error.
///
/// `set`, `apply` and `unset` take --dry-run to show what would change without changing
/// anything, and --output json to print that report as keeld's JSON.
#[derive(Debug, Parser)]
#[command(name = "apiclient", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The API's Unix socket.
    #[arg(
        short = 's',
        long,
        env = "APICLIENT_SOCKET",
        default_value = crate::DEFAULT_SOCKET_PATH,
        global = true
    )]
    pub socket_path: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; each has its own module.
#[derive(Debug, Subcommand)]
pub enum Command {
    Raw(raw::RawArgs),
    Get(get::GetArgs),
    Set(set::SetArgs),
    Apply(apply::ApplyArgs),
    Unset(unset::UnsetArgs),
    History(history::HistoryArgs),
    ApplyLog(apply_log::ApplyLogArgs),
    Rollback(rollback::RollbackArgs),
    Schema(schema::SchemaArgs),
    Boot(boot::BootArgs),
    Containers(containers::ContainersArgs),
    Logs(containers::LogsArgs),
}

/// What a successful command prints on stdout.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Nothing at all (e.g. after `set`, or a 204).
    Nothing,
    /// A JSON document, printed pretty with two-space indentation, keys in the order the
    /// server sent them.
    Json(Value),
    /// Text that is not JSON, printed as it came.
    Text(String),
}

impl Output {
    /// The text to write on stdout, newline-terminated; empty for [`Output::Nothing`].
    pub fn render(&self) -> String {
        let mut text = match self {
            Self::Nothing => return String::new(),
            // Serializing a `Value` cannot fail: its keys are strings.
            Self::Json(value) => serde_json::to_string_pretty(value).unwrap_or_default(),
            Self::Text(text) => text.clone(),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text
    }

    /// A response body as output: nothing if empty, JSON if it parses, text otherwise.
    pub fn from_body(response: &crate::Response) -> Self {
        match response.json() {
            Ok(None) => Self::Nothing,
            Ok(Some(value)) => Self::Json(value),
            Err(_) => Self::Text(response.text()),
        }
    }
}

/// Why a command failed; the `Display` text is what the user sees on stderr.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),

    #[error(transparent)]
    Model(#[from] settings_model::Error),

    #[error(transparent)]
    Source(#[from] SourceError),

    /// A user-data document is well-formed but wrong; the message names the source.
    #[error("{name}: {source}")]
    UserData {
        name: String,
        source: settings_model::Error,
    },

    /// Settings were committed, but applying them failed; the text names the apply and
    /// lists what failed, one line each.
    #[error("{0}")]
    ApplyFailed(String),

    /// A request or answer had a shape the command cannot use.
    #[error("{0}")]
    Invalid(String),
}

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli) -> Result<Output, CliError> {
    let client = Client::new(cli.socket_path);
    match cli.command {
        Command::Raw(args) => raw::run(&client, args).await,
        Command::Get(args) => get::run(&client, args).await,
        Command::Set(args) => set::run(&client, args).await,
        Command::Apply(args) => apply::run(&client, args).await,
        Command::Unset(args) => unset::run(&client, args).await,
        Command::History(args) => history::run(&client, args).await,
        Command::ApplyLog(args) => apply_log::run(&client, args).await,
        Command::Rollback(args) => rollback::run(&client, args).await,
        Command::Schema(args) => schema::run(args),
        Command::Boot(args) => boot::run(&client, args).await,
        Command::Containers(args) => containers::run(&client, args).await,
        Command::Logs(args) => containers::logs(&client, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn json_output_is_pretty_with_two_spaces_and_server_order() {
        let value: Value =
            serde_json::from_str(r#"{"settings":{"z":1,"a":[true]}}"#).unwrap_or_default();
        assert_eq!(
            Output::Json(value).render(),
            "{\n  \"settings\": {\n    \"z\": 1,\n    \"a\": [\n      true\n    ]\n  }\n}\n"
        );
        assert_eq!(Output::Nothing.render(), "");
        assert_eq!(Output::Text("plain".into()).render(), "plain\n");
    }
}
