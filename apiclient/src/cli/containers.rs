//! `apiclient containers` and `apiclient logs`: what keeld runs (Keel's addition).

use clap::{Args, ValueEnum};
use serde_json::Value;

use super::{CliError, Output};
use crate::client::Client;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Host,
    Bootstrap,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Bootstrap => "bootstrap",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Shows every host and bootstrap container: kind, tier, state, pid, restarts, last
/// exit code, image digest, since when, and why it failed
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient containers
  apiclient containers --kind host --output json | jq '.[] | select(.state != \"running\")'")]
pub struct ContainersArgs {
    /// Only host or only bootstrap containers.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// A table for people, or keeld's JSON.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Format,
}

pub async fn run(client: &Client, args: ContainersArgs) -> Result<Output, CliError> {
    let uri = match args.kind {
        Some(kind) => format!("/containers?kind={}", kind.as_str()),
        None => "/containers".to_owned(),
    };
    let answer = client.get_json(&uri).await?;
    match args.output {
        Format::Json => Ok(Output::Json(answer)),
        Format::Table => Ok(Output::Text(table(&answer)?)),
    }
}

/// One row per container; a failure's reason on its own indented line below.
pub fn table(answer: &Value) -> Result<String, CliError> {
    let rows = answer
        .as_array()
        .ok_or_else(|| CliError::Invalid("GET /containers did not answer a list".into()))?;
    if rows.is_empty() {
        return Ok("no containers\n".into());
    }
    let field = |row: &Value, key: &str| -> String {
        match row.get(key) {
            None | Some(Value::Null) => "-".into(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    };
    let header = [
        "NAME", "KIND", "TIER", "STATE", "PID", "RESTARTS", "EXIT", "SINCE", "DIGEST",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    let mut reasons = Vec::new();
    for row in rows {
        let digest = field(row, "image-digest");
        let short = digest
            .strip_prefix("sha256:")
            // The server's text: never slice it by bytes (a multi-byte character would
            // panic); characters are what is shown.
            .map_or(digest.clone(), |hex| {
                format!("sha256:{}", hex.chars().take(12).collect::<String>())
            });
        cells.push(vec![
            field(row, "name"),
            field(row, "kind"),
            field(row, "tier"),
            field(row, "state"),
            field(row, "pid"),
            field(row, "restarts"),
            field(row, "last-exit-code"),
            field(row, "since"),
            short,
        ]);
        reasons.push(row.get("reason").and_then(Value::as_str).map(str::to_owned));
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, row) in cells.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if let Some(Some(reason)) = n.checked_sub(1).and_then(|i| reasons.get(i)) {
            out.push_str(&format!("  reason: {reason}\n"));
        }
    }
    Ok(out)
}

/// Prints the end of a container's output (stdout and stderr together)
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient logs admin
  apiclient logs --kind bootstrap --tail 4096 setup")]
pub struct LogsArgs {
    /// The container's name.
    pub name: String,
    /// How many bytes from the end (at most 2 MiB).
    #[arg(long, default_value_t = 65536)]
    pub tail: u64,
    /// Host or bootstrap container, when both have this name (default: host).
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
}

pub async fn logs(client: &Client, args: LogsArgs) -> Result<Output, CliError> {
    let name: String =
        percent_encoding::utf8_percent_encode(&args.name, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let mut uri = format!("/containers/{name}/logs?tail={}", args.tail);
    if let Some(kind) = args.kind {
        uri.push_str(&format!("&kind={}", kind.as_str()));
    }
    let response = client.call(http::Method::GET, &uri, None).await?;
    Ok(Output::Text(response.text()))
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
