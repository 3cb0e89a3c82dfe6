//! `apiclient apply-log`: shows what recent applies did (Keel's addition): files written,
//! restart commands run and their output, whether a reboot is required.

use clap::Args;

use super::transaction::apply_log_uri;
use super::{CliError, Output};
use crate::client::Client;

/// Prints the apply log, newest apply first, as JSON
///
/// The answer has `reboot-required` and an `applies` list; each apply names the keys and
/// services involved, each file's result and each restart command's exit code, output
/// and duration.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient apply-log
  apiclient apply-log --limit 1
  apiclient apply-log | jq '.applies[] | select(.success | not) | .id'")]
pub struct ApplyLogArgs {
    /// Show only the N newest applies.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

pub async fn run(client: &Client, args: ApplyLogArgs) -> Result<Output, CliError> {
    let answer = client.get_json(&apply_log_uri(args.limit)).await?;
    Ok(Output::Json(answer))
}
