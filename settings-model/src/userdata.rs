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

/// The deepest nesting a user-data document may have (tables and arrays, `settings`
/// counted): no setting is nested half as deep. TOML parsers allow far more (a dotted key
/// of 79 parts inside each of 80 nested inline tables is 6,000 levels), and every step
/// after parsing walks the document recursively: a document past this is refused before
/// any of them, so that it cannot exhaust keeld's stack.
pub const MAX_DEPTH: usize = 64;

/// The dotted path of the first value in the TOML `text` nested deeper than
/// [`MAX_DEPTH`], found on the parser's own tree (`toml_edit`, which parses without
/// recursing per level of a dotted key) before `toml` deserializes it, recursively, into
/// a table. Iterative: the check itself must not recurse. `None` also when `text` does
/// not parse: `toml` reports that, with its line.
fn too_deep(text: &str) -> Option<String> {
    use toml_edit::{Item, Value as V};
    enum Node<'a> {
        Item(&'a Item),
        Value(&'a V),
    }
    let document = text.parse::<toml_edit::ImDocument<String>>().ok()?;
    let join = |path: &str, key: &str| {
        if path.is_empty() {
            format_segment(key)
        } else {
            format!("{path}.{}", format_segment(key))
        }
    };
    let mut stack: Vec<(Node<'_>, usize, String)> = document
        .iter()
        .map(|(k, item)| (Node::Item(item), 1, format_segment(k)))
        .collect();
    while let Some((node, depth, path)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Some(path);
        }
        let next = depth + 1;
        match node {
            Node::Item(Item::Table(table)) => stack.extend(
                table
                    .iter()
                    .map(|(k, item)| (Node::Item(item), next, join(&path, k))),
            ),
            Node::Item(Item::ArrayOfTables(tables)) => {
                for (i, table) in tables.iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    stack.extend(
                        table
                            .iter()
                            .map(|(k, item)| (Node::Item(item), next + 1, join(&at, k))),
                    );
                }
            }
            Node::Item(Item::Value(value)) | Node::Value(value) => match value {
                V::InlineTable(table) => stack.extend(
                    table
                        .iter()
                        .map(|(k, value)| (Node::Value(value), next, join(&path, k))),
                ),
                V::Array(items) => stack.extend(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, value)| (Node::Value(value), next, format!("{path}[{i}]"))),
                ),
                _ => {}
            },
            Node::Item(Item::None) => {}
        }
    }
    None
}

/// A JSON document read only to refuse a key given twice in one object: serde_json
/// keeps the last and says nothing (TOML refuses it, with its line). The error, made
/// here, gets serde_json's line and column.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the key {key:?} is given twice in one object"
                )));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(NoDuplicateKeys)
    }
}

/// [`too_deep`] for a JSON document (serde_json stops at 128 levels; this is stricter).
fn json_too_deep(value: &Value) -> Option<String> {
    let mut stack: Vec<(&Value, usize, String)> = vec![(value, 0, String::new())];
    while let Some((value, depth, path)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Some(path);
        }
        let join = |segment: String| {
            if path.is_empty() {
                segment
            } else {
                format!("{path}.{segment}")
            }
        };
        match value {
            Value::Object(map) => stack.extend(
                map.iter()
                    .map(|(k, v)| (v, depth + 1, join(format_segment(k)))),
            ),
            Value::Array(items) => stack.extend(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v, depth + 1, format!("{path}[{i}]"))),
            ),
            _ => {}
        }
    }
    None
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
        let json_error = |e: serde_json::Error| Error::Json {
            source_name: source_name.to_owned(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        };
        serde_json::from_str::<NoDuplicateKeys>(text).map_err(json_error)?;
        let value: Value = serde_json::from_str(text).map_err(json_error)?;
        if let Some(path) = json_too_deep(&value) {
            return Err(Error::Invalid {
                key: path,
                reason: format!("{source_name}: nested deeper than {MAX_DEPTH} levels"),
            });
        }
        return Ok(value);
    }
    if let Some(path) = too_deep(text) {
        return Err(Error::Invalid {
            key: path,
            reason: format!("{source_name}: nested deeper than {MAX_DEPTH} levels"),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod depth_tests {
    use super::*;

    /// `[settings]` and a value nested `levels` deep under `motd`, the TOML way that
    /// goes deepest: dotted keys inside nested inline tables.
    fn deep_toml(inline: usize, dotted: usize) -> String {
        let key = vec!["a"; dotted].join(".");
        let mut value = "1".to_owned();
        for _ in 0..inline {
            value = format!("{{ {key} = {value} }}");
        }
        format!("[settings]\nmotd = {value}\n")
    }

    #[test]
    fn a_document_nested_past_the_limit_is_refused_naming_where() {
        // About 940 levels in under 2 KB: the recursive steps after parsing used to
        // overflow a 2 MiB stack (keeld's worker threads) on it.
        let text = deep_toml(12, 78);
        assert!(text.len() < 2048);
        // And as deep as the parser goes (its own limits: 80 nested inline tables, 79
        // parts in a dotted key), on a stack of keeld's worker threads' size.
        let deepest = deep_toml(79, 78);
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || parse_user_data("user-data", &text))
            .unwrap();
        let error = handle.join().unwrap().unwrap_err();
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || parse_user_data("user-data", &deepest))
            .unwrap();
        let deepest = handle.join().unwrap().unwrap_err().to_string();
        assert!(
            deepest.contains("nested deeper than 64 levels"),
            "{deepest}"
        );
        let message = error.to_string();
        assert!(
            message.contains("nested deeper than 64 levels"),
            "{message}"
        );
        assert!(message.starts_with("settings.motd.a.a"), "{message}");
        // JSON too.
        let json = format!("{{\"settings\": {}1{}}}", "[".repeat(100), "]".repeat(100));
        let message = parse_user_data("user-data", &json).unwrap_err().to_string();
        assert!(
            message.contains("nested deeper than 64 levels"),
            "{message}"
        );
    }

    #[test]
    fn a_json_key_given_twice_is_refused_with_its_line() {
        let text = "{\"settings\": {\"motd\": \"a\"},\n \"settings\": {\"hostname\": \"h\"}}";
        let message = parse_user_data("user-data", text).unwrap_err().to_string();
        assert!(
            message.contains("\"settings\" is given twice") && message.contains("line 2"),
            "{message}"
        );
        let nested = "{\"settings\": {\"motd\": \"a\", \"motd\": \"b\"}}";
        assert!(parse_user_data("user-data", nested).is_err());
        // The same key in two objects is fine.
        let fine = "{\"settings\": {\"motd\": \"a\", \"ntp\": {\"motd\": 1}}}";
        let error = parse_user_data("user-data", fine).map_err(|e| e.to_string());
        assert!(
            error.as_ref().err().is_none_or(|e| !e.contains("twice")),
            "{error:?}"
        );
    }

    #[test]
    fn nesting_within_the_limit_is_parsed_as_before() {
        let text = deep_toml(1, 10);
        let error = parse_user_data("user-data", &text).unwrap_err().to_string();
        // Refused by the model (motd is a string), not by depth.
        assert!(!error.contains("nested deeper"), "{error}");
        assert!(too_deep(&text).is_none());
    }
}
