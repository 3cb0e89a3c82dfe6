//! `apiclient rollback`: makes an earlier settings generation current again (Keel's
//! addition) and applies what changed.

use clap::Args;

use super::transaction::{check_apply, post_commit};
use super::{CliError, Output};
use crate::client::Client;
use crate::uri::with_query;

/// Rolls settings back to an earlier generation and applies
///
/// Prints the JSON array of changed keys. If applying them fails, says what failed on
/// stderr and exits 1 (the rollback itself stays committed).
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient history --limit 2
  apiclient rollback 3")]
pub struct RollbackArgs {
    /// The generation number, as listed by `apiclient history`.
    pub generation: u64,
}

pub async fn run(client: &Client, args: RollbackArgs) -> Result<Output, CliError> {
    let generation = args.generation.to_string();
    let uri = with_query("/history/rollback", &[("generation", &generation)]);
    let commit = post_commit(client, &uri).await?;
    check_apply(client, &commit).await?;
    Ok(Output::Json(commit.changed))
}
