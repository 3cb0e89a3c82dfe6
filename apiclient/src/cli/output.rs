//! `-o/--output json|table|yaml`: the one output flag of every command that prints
//! records (history, apply-log, boot status, containers, dry runs, events, rollback, the
//! update status). Owns the
//! [`Format`] type commands declare their flag with, and turning keeld's JSON into each
//! format; the table layouts themselves belong to the command that prints them (they
//! use [`Table`]). Must not decide a command's default: each command says its own in
//! its help, because scripts already rely on them (JSON for history, a table for
//! containers).

use clap::ValueEnum;
use serde_json::Value;

use super::{CliError, Output};

/// How a command prints its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// keeld's JSON, pretty-printed (for `jq`).
    Json,
    /// For people: aligned columns (a dry run: the settings and file diffs).
    #[value(alias = "text")]
    Table,
    /// keeld's answer as YAML.
    Yaml,
}

/// `-o/--output` for the commands whose default is keeld's JSON (flattened into their
/// arguments with `#[command(flatten)]`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct JsonByDefault {
    /// `json` (the default: keeld's answer), `table` or `yaml`.
    #[arg(
        short = 'o',
        long,
        value_name = "FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub output: Format,
}

/// Prints `value` in `format`; `table` lays it out for people.
pub fn render(
    format: Format,
    value: Value,
    table: impl FnOnce(&Value) -> Result<String, CliError>,
) -> Result<Output, CliError> {
    match format {
        Format::Json => Ok(Output::Json(value)),
        Format::Yaml => Ok(Output::Text(yaml(&value)?)),
        Format::Table => Ok(Output::Text(table(&value)?)),
    }
}

/// One YAML document for `value`, keys in the server's order, newline-terminated.
///
/// serde_norway (the maintained fork of serde_yaml, already Keel's YAML parser in
/// tests) quotes every string YAML would read back as something else (`"yes"`,
/// `"1.0"`, `"null"`, `"~"`), so the document reads back as the same JSON.
pub fn yaml(value: &Value) -> Result<String, CliError> {
    serde_norway::to_string(value)
        .map_err(|error| CliError::Invalid(format!("cannot write the answer as YAML: {error}")))
}

/// An aligned text table: a header row, then one row per record, columns two spaces
/// apart, trailing blanks trimmed. A record may carry note lines (a failure's reason),
/// printed indented under its row.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<(Vec<String>, Vec<String>)>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print as empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>, notes: Vec<String>) {
        self.rows.push((cells, notes));
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let cell = |row: &[String], i: usize| row.get(i).map_or("", String::as_str).to_owned();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                std::iter::once(&self.header)
                    .chain(self.rows.iter().map(|(cells, _)| cells))
                    .map(|row| cell(row, i).chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |row: &[String]| -> String {
            let padded: Vec<String> = (0..columns)
                .map(|i| {
                    let width = widths[i];
                    format!("{:<width$}", cell(row, i))
                })
                .collect();
            let mut text = padded.join("  ").trim_end().to_owned();
            text.push('\n');
            text
        };
        let mut out = line(&self.header);
        for (cells, notes) in &self.rows {
            out.push_str(&line(cells));
            for note in notes {
                out.push_str("  ");
                out.push_str(note);
                out.push('\n');
            }
        }
        out
    }
}

/// A record's field as a table cell: strings as they are, `-` when absent or null,
/// anything else as compact JSON.
pub fn cell(record: &Value, key: &str) -> String {
    match record.get(key) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// A list of strings (or of anything) as one cell: `a, b, c`, or `-` when empty. At
/// most `max` items are named; the rest are counted (`a, b, +3 more`).
pub fn list_cell(value: Option<&Value>, max: usize) -> String {
    let items: Vec<String> = value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        return "-".to_owned();
    }
    let shown = items.len().min(max);
    let mut text = items[..shown].join(", ");
    if items.len() > shown {
        text.push_str(&format!(", +{} more", items.len() - shown));
    }
    text
}

/// A duration in milliseconds for people: `850ms`, `12.3s`, `4m05s`.
pub fn millis_cell(value: Option<&Value>) -> String {
    let Some(ms) = value.and_then(Value::as_u64) else {
        return "-".to_owned();
    };
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{}.{}s", ms / 1000, (ms % 1000) / 100),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_reads_back_as_the_same_json() {
        let value = json!({
            "z": "yes", "a": ["1.0", "null", "~", "", "multi\nline", 1, 2.5, true, null],
            "nested": {"key with: colon": {"k": "v"}}, "empty": {}, "none": []
        });
        let text = yaml(&value).unwrap();
        assert!(text.starts_with("z: "), "server order kept: {text}");
        let back: Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(back, value, "{text}");
    }

    #[test]
    fn tables_align_and_carry_notes() {
        let mut table = Table::new(&["NAME", "STATE"]);
        table.row(vec!["admin".into(), "running".into()], vec![]);
        table.row(vec!["x".into(), "failed".into()], vec!["reason: no".into()]);
        table.row(vec!["é".into()], vec![]);
        assert_eq!(
            table.render(),
            "NAME   STATE\nadmin  running\nx      failed\n  reason: no\né\n"
        );
    }

    #[test]
    fn cells() {
        let record = json!({"s": "text", "n": 3, "null": null, "list": ["a", "b", "c"]});
        assert_eq!(cell(&record, "s"), "text");
        assert_eq!(cell(&record, "n"), "3");
        assert_eq!(cell(&record, "null"), "-");
        assert_eq!(cell(&record, "missing"), "-");
        assert_eq!(list_cell(record.get("list"), 5), "a, b, c");
        assert_eq!(list_cell(record.get("list"), 2), "a, b, +1 more");
        assert_eq!(list_cell(record.get("missing"), 2), "-");
        assert_eq!(millis_cell(Some(&json!(850))), "850ms");
        assert_eq!(millis_cell(Some(&json!(12_345))), "12.3s");
        assert_eq!(millis_cell(Some(&json!(245_000))), "4m05s");
        assert_eq!(millis_cell(None), "-");
    }

    #[test]
    fn render_picks_the_format() {
        let value = json!([{"a": 1}]);
        assert_eq!(
            render(Format::Json, value.clone(), |_| Ok(String::new())).unwrap(),
            Output::Json(value.clone())
        );
        assert_eq!(
            render(Format::Table, value.clone(), |_| Ok("t\n".into())).unwrap(),
            Output::Text("t\n".into())
        );
        assert_eq!(
            render(Format::Yaml, value, |_| Ok(String::new())).unwrap(),
            Output::Text("- a: 1\n".into())
        );
    }
}
