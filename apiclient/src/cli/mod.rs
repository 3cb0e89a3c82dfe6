//! The `apiclient` command line: flag parsing (clap) and dispatch to one module per
//! subcommand. Owns the exit-code contract: commands return an [`Output`] to print or a
//! [`CliError`] to show on stderr, whose [`CliError::exit_code`] is the exit status;
//! `main.rs` only prints and exits. Commands print nothing themselves, except what
//! streams while they run (`logs --follow`, `events`, `boot wait`'s progress on a
//! terminal, `raw -v`'s status line).
//!
//! Bottlerocket's command lines parse unchanged: `raw` is the default subcommand
//! (`apiclient -u /settings`), `-s/--socket-path`, `-v/--verbose` and `--log-level` are
//! accepted anywhere, and its `report`/`ephemeral-storage` get a clear refusal.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::client::Client;
use crate::error::ClientError;
use crate::source::SourceError;

pub mod apply;
pub mod apply_log;
pub mod boot;
pub mod bottlerocket_only;
pub mod color;
pub mod completions;
pub mod containers;
pub mod events;
pub mod exec;
pub mod get;
pub mod history;
pub mod logs;
pub mod output;
pub mod raw;
pub mod reboot;
pub mod report;
pub mod rollback;
pub mod schema;
pub mod set;
pub mod transaction;
pub mod unset;
pub mod update;

/// The exit status of a command that waited and gave up (`boot wait --timeout`), as
/// `timeout(1)` has it.
pub const EXIT_TIMED_OUT: u8 = 124;

const EXAMPLES: &str = "\
Examples:
  apiclient get settings.motd
  apiclient set motd=\"hello from keel\"
  apiclient apply user-data.toml
  apiclient set --dry-run motd=\"hello\"
  apiclient -u /settings
  apiclient apply-log --limit 1
  apiclient boot wait --timeout 10m
  apiclient containers
  apiclient logs -f admin
  apiclient -s /tmp/keel/api.sock get os";

/// Talks to keeld, Keel's host agent, through its local API.
///
/// Exit status: 0 on success, 1 when the API or the system refuses (the reason is on
/// stderr) or when settings were committed but applying them failed, 2 on a usage
/// error (a command line wrong in a way found before anything was sent, too), 124 when
/// `boot wait` timed out; `exec` exits with the command's own status.
///
/// With no subcommand, apiclient sends the request given by -u/-m/-d (as `raw` does, and
/// as Bottlerocket's apiclient does). `set`, `apply` and `unset` take --dry-run to show
/// what would change without changing anything. Commands that print records take
/// -o/--output json|table|yaml.
#[derive(Debug, Parser)]
#[command(name = "apiclient", version, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(
        flatten,
        next_help_heading = "Raw request (when no subcommand is given)"
    )]
    pub request: raw::RequestArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options every subcommand takes, before or after its name.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// The API's Unix socket.
    #[arg(
        short = 's',
        long,
        env = "APICLIENT_SOCKET",
        default_value = crate::DEFAULT_SOCKET_PATH,
        global = true
    )]
    pub socket_path: PathBuf,

    /// More detail on stderr: `raw` prints the answer's status line (as Bottlerocket's).
    #[arg(short = 'v', long, global = true)]
    pub verbose: bool,

    /// Bottlerocket's logging flag: `debug` and `trace` are -v, the others change
    /// nothing.
    #[arg(
        long,
        value_name = "LEVEL",
        value_enum,
        ignore_case = true,
        global = true
    )]
    pub log_level: Option<LogLevel>,

    /// When to colour output (dry-run diffs): `auto` (a terminal, and `NO_COLOR` unset
    /// or empty), `always` or `never`.
    #[arg(
        long,
        value_name = "WHEN",
        value_enum,
        default_value = "auto",
        global = true
    )]
    pub color: color::ColorChoice,
}

impl GlobalArgs {
    pub fn is_verbose(&self) -> bool {
        self.verbose || matches!(self.log_level, Some(LogLevel::Debug | LogLevel::Trace))
    }
}

/// Bottlerocket's `--log-level` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The subcommands; each has its own module.
#[derive(Debug, Subcommand)]
pub enum Command {
    Raw(raw::RawArgs),
    Get(get::GetArgs),
    Set(set::SetArgs),
    Apply(apply::ApplyArgs),
    Unset(unset::UnsetArgs),
    Reboot(reboot::RebootArgs),
    History(history::HistoryArgs),
    ApplyLog(apply_log::ApplyLogArgs),
    Rollback(rollback::RollbackArgs),
    Schema(schema::SchemaArgs),
    Boot(boot::BootArgs),
    Containers(containers::ContainersArgs),
    Logs(logs::LogsArgs),
    Completions(completions::CompletionsArgs),
    #[command(hide = true)]
    Man(completions::ManArgs),
    #[command(hide = true)]
    Report(bottlerocket_only::AnyArgs),
    #[command(hide = true)]
    EphemeralStorage(bottlerocket_only::AnyArgs),
    Exec(exec::ExecArgs),
    /// Checks for, applies and cancels image updates (Bottlerocket's update API)
    Update(update::UpdateArgs),
    Events(events::EventsArgs),
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
    /// Bytes printed exactly as they came, with no newline added (a container's log:
    /// its output need not be UTF-8, and a `--tail` may start mid-character).
    Bytes(Vec<u8>),
}

impl Output {
    /// The text to write on stdout, newline-terminated; empty for [`Output::Nothing`].
    pub fn render(&self) -> String {
        let mut text = match self {
            Self::Nothing => return String::new(),
            Self::Bytes(bytes) => return String::from_utf8_lossy(bytes).into_owned(),
            // Serializing a `Value` cannot fail: its keys are strings.
            Self::Json(value) => serde_json::to_string_pretty(value).unwrap_or_default(),
            Self::Text(text) => text.clone(),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text
    }

    /// Writes what [`Self::render`] shows, [`Output::Bytes`] byte for byte.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        match self {
            Self::Bytes(bytes) => out.write_all(bytes)?,
            other => out.write_all(other.render().as_bytes())?,
        }
        out.flush()
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

    /// The command line is wrong in a way clap cannot see (exit 2, like clap's own).
    #[error("error: {0}\n\nFor more information, try '--help'.")]
    Usage(String),

    /// A wait gave up (exit [`EXIT_TIMED_OUT`]).
    #[error("{0}")]
    TimedOut(String),

    /// A Bottlerocket command Keel does not have.
    #[error("{0}")]
    Unsupported(String),
}

impl CliError {
    /// The process's exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            // The command line is wrong, nothing was sent: a URI that is no `/path` (`-u
            // settings`), a source of a scheme apply does not take (`s3://…`).
            CliError::Usage(_)
            | CliError::Client(ClientError::InvalidUri { .. })
            | CliError::Source(
                SourceError::UnsupportedScheme { .. } | SourceError::RemoteFileUri { .. },
            ) => 2,
            CliError::TimedOut(_) => EXIT_TIMED_OUT,
            _ => 1,
        }
    }
}

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli) -> Result<Output, CliError> {
    color::set_choice(cli.global.color);
    let verbose = cli.global.is_verbose();
    let client = Client::new(cli.global.socket_path);
    if cli.request.is_given() && !matches!(cli.command, None | Some(Command::Raw(_))) {
        return Err(CliError::Usage(
            "-u/--uri, -m/--method and -d/--data make a raw request: \
             give them without a subcommand, or after `raw`"
                .to_owned(),
        ));
    }
    let Some(command) = cli.command else {
        return raw::run(&client, cli.request, verbose).await;
    };
    match command {
        Command::Raw(args) => raw::run(&client, cli.request.merged(args.request)?, verbose).await,
        Command::Get(args) => get::run(&client, args).await,
        Command::Set(args) => set::run(&client, args).await,
        Command::Apply(args) => apply::run(&client, args).await,
        Command::Unset(args) => unset::run(&client, args).await,
        Command::Reboot(args) => reboot::run(&client, args).await,
        Command::History(args) => history::run(&client, args).await,
        Command::ApplyLog(args) => apply_log::run(&client, args).await,
        Command::Rollback(args) => rollback::run(&client, args).await,
        Command::Schema(args) => schema::run(args),
        Command::Boot(args) => boot::run(&client, args).await,
        Command::Containers(args) => containers::run(&client, args).await,
        Command::Logs(args) => logs::run(&client, args).await,
        Command::Completions(args) => Ok(completions::completions(args)),
        Command::Man(args) => completions::man(args),
        Command::Report(args) => Err(bottlerocket_only::report(args)),
        Command::EphemeralStorage(args) => Err(bottlerocket_only::ephemeral_storage(args)),
        Command::Exec(args) => exec::run(&client, args).await,
        Command::Update(args) => update::run(&client, args).await,
        Command::Events(args) => events::run(&client, args, &mut std::io::stdout()).await,
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
        let mut written = Vec::new();
        Output::Bytes(b"\xff\xfeno newline".to_vec())
            .write_to(&mut written)
            .expect("write");
        assert_eq!(written, b"\xff\xfeno newline");
    }
}
