//! `apiclient containers`: what keeld runs (Keel's addition).

use clap::{Args, ValueEnum};
use serde_json::Value;

use super::output::{self, cell, Format, Table};
use super::{CliError, Output};
use crate::client::Client;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Host,
    Bootstrap,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Bootstrap => "bootstrap",
        }
    }
}

/// Shows every host and bootstrap container: kind, tier, state, pid, restarts, last
/// exit code, image digest, since when, and why it failed
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient containers
  apiclient containers -o yaml
  apiclient containers --kind host --output json | jq '.[] | select(.state != \"running\")'")]
pub struct ContainersArgs {
    /// Only host or only bootstrap containers.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// `table` (the default), or keeld's answer as `json` or `yaml`.
    #[arg(
        long,
        short = 'o',
        value_name = "FORMAT",
        value_enum,
        default_value = "table"
    )]
    pub output: Format,
}

pub async fn run(client: &Client, args: ContainersArgs) -> Result<Output, CliError> {
    let uri = match args.kind {
        Some(kind) => format!("/containers?kind={}", kind.as_str()),
        None => "/containers".to_owned(),
    };
    let answer = client.get_json(&uri).await?;
    output::render(args.output, answer, table)
}

/// One row per container; a failure's reason on its own indented line below.
pub fn table(answer: &Value) -> Result<String, CliError> {
    let rows = answer
        .as_array()
        .ok_or_else(|| CliError::Invalid("GET /containers did not answer a list".into()))?;
    if rows.is_empty() {
        return Ok("no containers\n".into());
    }
    let mut table = Table::new(&[
        "NAME", "KIND", "TIER", "STATE", "PID", "RESTARTS", "EXIT", "SINCE", "DIGEST",
    ]);
    for row in rows {
        let digest = cell(row, "image-digest");
        let short = digest
            .strip_prefix("sha256:")
            // The server's text: never slice it by bytes (a multi-byte character would
            // panic); characters are what is shown.
            .map_or(digest.clone(), |hex| {
                format!("sha256:{}", hex.chars().take(12).collect::<String>())
            });
        let reason = row.get("reason").and_then(Value::as_str);
        table.row(
            vec![
                cell(row, "name"),
                cell(row, "kind"),
                cell(row, "tier"),
                cell(row, "state"),
                cell(row, "pid"),
                cell(row, "restarts"),
                cell(row, "last-exit-code"),
                cell(row, "since"),
                short,
            ],
            reason.map(|r| format!("reason: {r}")).into_iter().collect(),
        );
    }
    Ok(table.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_up_and_shows_reasons() {
        let answer = serde_json::json!([
            {"name": "admin", "kind": "host", "tier": "superpowered", "state": "running", "pid": 42,
             "restarts": 0, "since": "2026-01-01T00:00:00Z", "image-digest": format!("sha256:{}", "a".repeat(64))},
            {"name": "control", "kind": "host", "tier": "host", "state": "failed", "restarts": 2,
             "since": "2026-01-01T00:00:01Z", "reason": "image: pull failed"}
        ]);
        let text = table(&answer).expect("table");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME     KIND  TIER"), "{text}");
        assert!(
            lines[1].contains("running") && lines[1].contains("sha256:aaaaaaaaaaaa"),
            "{text}"
        );
        assert!(!lines[1].contains(&"a".repeat(13)), "{text}");
        assert_eq!(lines[3], "  reason: image: pull failed");
        assert_eq!(
            table(&serde_json::json!([])).expect("empty"),
            "no containers\n"
        );
        assert!(table(&serde_json::json!({})).is_err());
    }

    #[test]
    fn a_multi_byte_digest_from_the_server_does_not_panic() {
        let answer = serde_json::json!([
            {"name": "x", "kind": "host", "state": "running", "image-digest": "sha256:ééééééééééééé"}
        ]);
        let text = table(&answer).expect("table");
        assert!(text.contains("sha256:éééééééééééé\n"), "{text}");
    }
}
