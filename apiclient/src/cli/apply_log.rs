//! `apiclient apply-log`: shows what recent applies did (Keel's addition): files written,
//! restart commands run and their output, whether a reboot is required.

use clap::Args;
use serde_json::Value;

use super::output::{self, cell, list_cell, millis_cell, Table};
use super::report::{failure_lines, no_effect_lines};
use super::transaction::apply_log_uri;
use super::{CliError, Output};
use crate::client::Client;

/// Prints the apply log, newest apply first
///
/// The answer has `reboot-required` and an `applies` list; each apply names the keys and
/// services involved, each file's result and each restart command's exit code, output
/// and duration.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient apply-log
  apiclient apply-log --limit 1
  apiclient apply-log -o table
  apiclient apply-log | jq '.applies[] | select(.success | not) | .id'")]
pub struct ApplyLogArgs {
    /// Show only the N newest applies.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    #[command(flatten)]
    pub output: output::JsonByDefault,
}

pub async fn run(client: &Client, args: ApplyLogArgs) -> Result<Output, CliError> {
    let answer = client.get_json(&apply_log_uri(args.limit)).await?;
    output::render(args.output.output, answer, table)
}

/// Whether a reboot is required, then one row per apply; below a failed apply's row,
/// what failed, and the settings it stored with no effect on this host.
pub fn table(answer: &Value) -> Result<String, CliError> {
    let applies = answer
        .get("applies")
        .and_then(Value::as_array)
        .ok_or_else(|| CliError::Invalid("GET /apply/log has no `applies` list".into()))?;
    let reboot = match answer.get("reboot-required").and_then(Value::as_bool) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    let mut text = format!("reboot required: {reboot}\n");
    if applies.is_empty() {
        text.push_str("no applies\n");
        return Ok(text);
    }
    let mut table = Table::new(&[
        "ID", "TIME", "RESULT", "DURATION", "FILES", "COMMANDS", "SERVICES",
    ]);
    for apply in applies {
        let count = |name: &str| {
            apply
                .get(name)
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
                .to_string()
        };
        let services = apply.get("services").map(|services| match services {
            Value::Object(map) => Value::Array(map.keys().cloned().map(Value::String).collect()),
            other => other.clone(),
        });
        let result = match apply.get("success").and_then(Value::as_bool) {
            Some(true) => "ok",
            Some(false) => "failed",
            None => "-",
        };
        let mut notes = failure_lines(apply);
        notes.extend(no_effect_lines(apply));
        table.row(
            vec![
                cell(apply, "id"),
                cell(apply, "time"),
                result.to_owned(),
                millis_cell(apply.get("duration-ms")),
                count("files"),
                count("commands"),
                list_cell(services.as_ref(), 4),
            ],
            notes,
        );
    }
    text.push_str(&table.render());
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn failures_and_no_effect_keys_show_under_their_apply() {
        let answer = json!({"reboot-required": false, "applies": [
            {"id": 2, "time": "t2", "success": false, "duration-ms": 40,
             "keys": ["settings.ntp.time-servers"], "services": {"chronyd": ["settings.ntp"]},
             "files": [{"name": "chrony.conf", "path": "/etc/chrony.conf", "result": "written"}],
             "commands": [{"service": "chronyd", "argv": ["systemctl", "restart", "chronyd"],
                           "exit-code": 1, "success": false, "stderr": "no unit\n"}],
             "no-effect": ["settings.updates.seed"]},
            {"id": 1, "time": "t1", "success": true, "duration-ms": 3, "services": {},
             "files": [], "commands": []}
        ]});
        let text = table(&answer).expect("table");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "reboot required: no");
        assert!(lines[1].starts_with("ID  TIME"), "{text}");
        assert!(
            lines[2].contains("failed") && lines[2].ends_with("chronyd"),
            "{text}"
        );
        assert_eq!(
            lines[3],
            "  service chronyd: systemctl restart chronyd: exit code 1: no unit"
        );
        assert_eq!(
            lines[4],
            "  = settings.updates.seed: stored, no effect on this host"
        );
        assert!(
            lines[5].starts_with("1 ") && lines[5].contains(" ok "),
            "{text}"
        );
        assert!(table(&json!([])).is_err());
    }
}
