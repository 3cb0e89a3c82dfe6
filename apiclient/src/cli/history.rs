//! `apiclient history`: lists committed settings generations (Keel's addition).

use clap::Args;

use super::{CliError, Output};
use crate::client::Client;

/// Prints the settings history, a JSON array of generation records
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient history
  apiclient history --limit 5
  apiclient history | jq '.[].generation'")]
pub struct HistoryArgs {
    /// Show only the N newest generations.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// `/history`, with `?limit=N` (the server keeps the N newest) if given.
pub fn history_uri(limit: Option<usize>) -> String {
    match limit {
        Some(limit) => format!("/history?limit={limit}"),
        None => "/history".to_owned(),
    }
}

pub async fn run(client: &Client, args: HistoryArgs) -> Result<Output, CliError> {
    Ok(Output::Json(
        client.get_json(&history_uri(args.limit)).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_the_server_s_to_apply() {
        assert_eq!(history_uri(None), "/history");
        assert_eq!(history_uri(Some(5)), "/history?limit=5");
    }
}
