//! `apiclient history`: lists committed settings generations (Keel's addition).

use clap::Args;
use serde_json::Value;

use super::output::{self, cell, list_cell, Table};
use super::{CliError, Output};
use crate::client::Client;

/// Prints the settings history, newest generation first
///
/// Each generation has its number, time, transaction, caller (uid, gid, pid and
/// command name) and changed keys.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient history
  apiclient history --limit 5 -o table
  apiclient history | jq '.[].generation'")]
pub struct HistoryArgs {
    /// Show only the N newest generations.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    #[command(flatten)]
    pub output: output::JsonByDefault,
}

/// `/history`, with `?limit=N` (the server keeps the N newest) if given.
pub fn history_uri(limit: Option<usize>) -> String {
    match limit {
        Some(limit) => format!("/history?limit={limit}"),
        None => "/history".to_owned(),
    }
}

pub async fn run(client: &Client, args: HistoryArgs) -> Result<Output, CliError> {
    let answer = client.get_json(&history_uri(args.limit)).await?;
    output::render(args.output.output, answer, table)
}

/// One row per generation; a rollback names the generation it restored below its row.
pub fn table(answer: &Value) -> Result<String, CliError> {
    let generations = answer
        .as_array()
        .ok_or_else(|| CliError::Invalid("GET /history did not answer a list".into()))?;
    if generations.is_empty() {
        return Ok("no generations\n".into());
    }
    let mut table = Table::new(&["GEN", "TIME", "TX", "CALLER", "CHANGED"]);
    for generation in generations {
        let caller = generation.get("caller").map_or("-".to_owned(), |caller| {
            let comm = caller.get("comm").and_then(Value::as_str).unwrap_or("");
            format!(
                "uid {} pid {}{}",
                cell(caller, "uid"),
                cell(caller, "pid"),
                if comm.is_empty() {
                    String::new()
                } else {
                    format!(" ({comm})")
                }
            )
        });
        let notes = generation
            .get("rollback-of")
            .filter(|of| !of.is_null())
            .map(|of| format!("rollback to generation {of}"))
            .into_iter()
            .collect();
        table.row(
            vec![
                cell(generation, "generation"),
                cell(generation, "time"),
                cell(generation, "tx"),
                caller,
                list_cell(generation.get("changed-keys"), 3),
            ],
            notes,
        );
    }
    Ok(table.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_limit_is_the_server_s_to_apply() {
        assert_eq!(history_uri(None), "/history");
        assert_eq!(history_uri(Some(5)), "/history?limit=5");
    }

    #[test]
    fn the_table_names_caller_and_keys() {
        let answer = json!([
            {"generation": 3, "time": "2026-01-01T00:00:02Z", "tx": "rollback",
             "caller": {"uid": 0, "gid": 0, "pid": 9, "comm": "apiclient"},
             "changed-keys": ["settings.motd"], "rollback-of": 1},
            {"generation": 2, "time": "2026-01-01T00:00:01Z", "tx": "apiclient-set-x",
             "caller": {"uid": 1000, "gid": 1000, "pid": 8, "comm": ""},
             "changed-keys": ["settings.a", "settings.b", "settings.c", "settings.d"]}
        ]);
        let text = table(&answer).expect("table");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("GEN  TIME"), "{text}");
        assert!(lines[1].contains("uid 0 pid 9 (apiclient)"), "{text}");
        assert_eq!(lines[2], "  rollback to generation 1");
        assert!(
            lines[3].contains("uid 1000 pid 8 ") || lines[3].contains("uid 1000 pid 8  "),
            "{text}"
        );
        assert!(
            lines[3].ends_with("settings.a, settings.b, settings.c, +1 more"),
            "{text}"
        );
        assert_eq!(table(&json!([])).expect("empty"), "no generations\n");
        assert!(table(&json!({})).is_err());
    }
}
