//! `apiclient apply`: applies user-data documents (TOML or JSON with a `settings` table)
//! from files, `file://` URIs or stdin, all in one transaction.

use clap::Args;
use serde_json::Value;

use super::transaction::{fill_and_commit, Fill};
use super::{CliError, Output};
use crate::client::Client;
use crate::source::Source;

/// Applies user-data documents (TOML or JSON) in one transaction
///
/// Every source is checked locally first, then PATCHed into one transaction in the order
/// given, which is committed and applied. Prints nothing on success.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  printf '[settings]\\nmotd = \"hi\"\\n' > user-data.toml
  apiclient apply user-data.toml
  apiclient apply \"file://$PWD/user-data.toml\"
  apiclient apply < user-data.toml
  echo '{\"settings\": {\"motd\": \"hi\"}}' | apiclient apply -")]
pub struct ApplyArgs {
    /// Paths, `file://` URIs, or `-` for stdin (the default).
    #[arg(value_name = "SOURCE")]
    pub sources: Vec<String>,
}

/// Reads and checks every source; the patches (without `settings` wrapper) in order.
pub fn read_sources(args: &[String]) -> Result<Vec<Value>, CliError> {
    let default = ["-".to_owned()];
    let args = if args.is_empty() { &default[..] } else { args };
    if args.iter().filter(|arg| *arg == "-").count() > 1 {
        return Err(CliError::Invalid(
            "stdin (`-`) can be given only once".to_owned(),
        ));
    }
    args.iter()
        .map(|arg| {
            let source = Source::parse(arg)?;
            let text = source.read()?;
            Ok(settings_model::userdata::parse_user_data(
                source.name(),
                &text,
            )?)
        })
        .collect()
}

pub async fn run(client: &Client, args: ApplyArgs) -> Result<Output, CliError> {
    let patches = read_sources(&args.sources)?;
    let fills: Vec<Fill<'_>> = patches.iter().map(Fill::Settings).collect();
    fill_and_commit(client, "apply", &fills).await?;
    Ok(Output::Nothing)
}
