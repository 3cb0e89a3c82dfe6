//! `apiclient history`: lists committed settings generations (Keel's addition).

use clap::Args;
use serde_json::Value;

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

/// Keeps the `limit` newest records (highest `generation`), in the order the server sent
/// them; records without a numeric `generation` count by position, newest last.
pub fn newest(records: Vec<Value>, limit: usize) -> Vec<Value> {
    if records.len() <= limit {
        return records;
    }
    let generation = |record: &Value| record.get("generation").and_then(Value::as_u64);
    if records.iter().all(|r| generation(r).is_some()) {
        let mut numbers: Vec<u64> = records.iter().filter_map(generation).collect();
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        let cutoff = numbers.get(limit.saturating_sub(1)).copied();
        let keep = |record: &Value| limit > 0 && generation(record) >= cutoff;
        records.into_iter().filter(|r| keep(r)).collect()
    } else {
        let skip = records.len() - limit;
        records.into_iter().skip(skip).collect()
    }
}

pub async fn run(client: &Client, args: HistoryArgs) -> Result<Output, CliError> {
    let answer = client.get_json("/history").await?;
    let answer = match (answer, args.limit) {
        (Value::Array(records), Some(limit)) => Value::Array(newest(records, limit)),
        (answer, _) => answer,
    };
    Ok(Output::Json(answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn limit_keeps_the_newest_generations_in_server_order() {
        let records = vec![
            json!({"generation": 3}),
            json!({"generation": 2}),
            json!({"generation": 1}),
        ];
        assert_eq!(
            newest(records.clone(), 2),
            [json!({"generation": 3}), json!({"generation": 2})]
        );
        let ascending: Vec<Value> = records.into_iter().rev().collect();
        assert_eq!(newest(ascending.clone(), 1), [json!({"generation": 3})]);
        assert_eq!(newest(ascending.clone(), 0), Vec::<Value>::new());
        assert_eq!(newest(ascending.clone(), 9), ascending);
    }

    #[test]
    fn records_without_numbers_count_from_the_end() {
        let records = vec![json!("a"), json!("b"), json!("c")];
        assert_eq!(newest(records, 2), [json!("b"), json!("c")]);
    }
}
