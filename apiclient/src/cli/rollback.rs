//! `apiclient rollback`: makes an earlier settings generation current again (Keel's
//! addition) and applies what changed.

use clap::Args;
use serde_json::Value;

use super::output::{self, Table};
use super::transaction::{check_apply, post_commit};
use super::{CliError, Output};
use crate::client::Client;
use crate::uri::with_query;

/// Rolls settings back to an earlier generation and applies
///
/// Prints the changed keys (a JSON array by default). If applying them fails, says what failed on
/// stderr and exits 1 (the rollback itself stays committed).
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient history --limit 2
  apiclient rollback 3
  apiclient rollback 3 -o table")]
pub struct RollbackArgs {
    /// The generation number, as listed by `apiclient history`.
    pub generation: u64,

    #[command(flatten)]
    pub output: output::JsonByDefault,
}

pub async fn run(client: &Client, args: RollbackArgs) -> Result<Output, CliError> {
    let generation = args.generation.to_string();
    let uri = with_query("/history/rollback", &[("generation", &generation)]);
    let commit = post_commit(client, &uri).await?;
    check_apply(client, &commit).await?;
    output::render(args.output.output, commit.changed, table)
}

/// One changed key per row.
pub fn table(changed: &Value) -> Result<String, CliError> {
    let keys = changed
        .as_array()
        .ok_or_else(|| CliError::Invalid("the rollback did not answer a list of keys".into()))?;
    if keys.is_empty() {
        return Ok("nothing changed\n".into());
    }
    let mut table = Table::new(&["CHANGED"]);
    for key in keys {
        let key = match key {
            Value::String(key) => key.clone(),
            other => other.to_string(),
        };
        table.row(vec![key], vec![]);
    }
    Ok(table.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_changed_keys_are_one_per_row() {
        let changed = serde_json::json!(["settings.motd", "settings.ntp.time-servers"]);
        assert_eq!(
            table(&changed).ok().as_deref(),
            Some("CHANGED\nsettings.motd\nsettings.ntp.time-servers\n")
        );
        assert_eq!(
            table(&serde_json::json!([])).ok().as_deref(),
            Some("nothing changed\n")
        );
        assert!(table(&serde_json::json!({})).is_err());
    }
}
