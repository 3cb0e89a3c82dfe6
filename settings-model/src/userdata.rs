//! User-data documents: TOML (or JSON) with a `[settings]` table.
//!
//! Owns: parsing the text, reporting syntax errors with source, line and column, refusing
//! top-level keys other than `settings`, and turning the table into a validated JSON
//! merge-patch. Reading the document from disk or IMDS is the agent's job.

use serde_json::{Map, Value};

use crate::key::format_segment;
use crate::Error;

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Converts TOML to JSON; datetimes become their TOML text. `key` is the dotted path of
/// `value`, for the one refusal: a float JSON cannot hold (`nan`, `inf`), which would
/// otherwise become `null`, and so remove the setting.
fn toml_to_json(value: toml::Value, key: &str, source_name: &str) -> Result<Value, Error> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => match serde_json::Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None => {
                return Err(Error::Invalid {
                    key: key.to_owned(),
                    reason: format!(
                        "{source_name}: {f} is not a value a setting can hold (nan and inf \
                         are not numbers here)"
                    ),
                })
            }
        },
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| toml_to_json(v, &format!("{key}[{i}]"), source_name))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(k, v)| {
                    let path = if key.is_empty() {
                        format_segment(&k)
                    } else {
                        format!("{key}.{}", format_segment(&k))
                    };
                    Ok((k, toml_to_json(v, &path, source_name)?))
                })
                .collect::<Result<Map<String, Value>, Error>>()?,
        ),
    })
}

fn parse_document(source_name: &str, text: &str) -> Result<Value, Error> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| Error::Json {
            source_name: source_name.to_owned(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        });
    }
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e
            .span()
            .map_or((0, 0), |span| line_column(text, span.start));
        Error::Toml {
            source_name: source_name.to_owned(),
            line,
            column,
            message: e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": "),
        }
    })?;
    toml_to_json(toml::Value::Table(table), "", source_name)
}

/// Parses user-data and returns its `settings` table as a validated merge-patch (no
/// wrapper; `{}` when the document has no settings).
pub fn parse_user_data(source_name: &str, text: &str) -> Result<Value, Error> {
    let document = parse_document(source_name, text)?;
    let Value::Object(mut top) = document else {
        return Err(Error::Invalid {
            key: source_name.to_owned(),
            reason: "user-data must be a table with a `settings` member".to_owned(),
        });
    };
    if let Some(other) = top.keys().find(|k| k.as_str() != "settings") {
        return Err(Error::BadKey {
            key: format_segment(other),
            reason: format!("{source_name}: unknown top-level key (only `settings` is allowed)"),
        });
    }
    let settings = top
        .remove("settings")
        .unwrap_or_else(|| Value::Object(Map::new()));
    crate::validate_patch(&settings)?;
    Ok(settings)
}
