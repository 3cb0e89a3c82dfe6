//! `key=value` pairs as `apiclient set` sends them.
//!
//! Owns: splitting a pair, and typing the value by the model (never by guessing from the
//! text): `motd=42` is the string "42", `kubernetes.max-pods=110` the integer 110. The
//! resulting one-key patch is validated, so a pair that cannot be stored is refused here.

use serde_json::{Map, Value};

use crate::patch::compose_patch;
use crate::schema::{kind_at, Kinds};
use crate::{Error, KeyPath};

/// Splits at the first `=` outside a double-quoted key segment.
fn split_pair(s: &str) -> Option<(&str, &str)> {
    let mut in_quotes = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '=' if !in_quotes => return Some((&s[..i], &s[i + 1..])),
            _ => {}
        }
    }
    None
}

/// Converts `text` into a value of one of `kinds`.
fn convert(key: &str, text: &str, kinds: Kinds) -> Result<Value, Error> {
    let bad = |reason: &str| Error::BadValue {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    let as_json = || {
        serde_json::from_str::<Value>(text)
            .map_err(|e| bad(&format!("expected JSON for this key: {e}")))
    };
    if kinds.array && text.trim_start().starts_with('[') {
        return as_json();
    }
    if kinds.string {
        return Ok(Value::String(text.to_owned()));
    }
    if kinds.boolean {
        return match text {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(bad("expected true or false")),
        };
    }
    if kinds.integer {
        return text
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| bad("expected an integer"));
    }
    if kinds.number {
        return text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| bad("expected a number"));
    }
    if kinds.array || kinds.object {
        return as_json();
    }
    Err(bad("this key cannot be set from text"))
}

/// Parses `key=value`, typing the value by the model; the key's `settings.` prefix is
/// optional. The one-key patch it makes is validated.
pub fn parse_pair(s: &str) -> Result<(KeyPath, Value), Error> {
    let (key_text, value_text) = split_pair(s).ok_or_else(|| Error::BadKey {
        // Up to the first `=` only: what follows may be a value (a secret) behind an
        // unbalanced quote.
        key: s.split('=').next().unwrap_or_default().to_owned(),
        reason: "expected key=value (a key's quotes must be balanced)".to_owned(),
    })?;
    let key = KeyPath::parse_setting(key_text)?;
    let key_string = key.to_string();
    let kinds = kind_at(&key).ok_or_else(|| Error::BadKey {
        key: key_string.clone(),
        reason: "unknown key".to_owned(),
    })?;
    let value = convert(&key_string, value_text, kinds)?;
    crate::validate_patch(&key.to_patch(value.clone()))?;
    Ok((key, value))
}

/// Merges several `key=value` pairs into one patch (no `settings` wrapper); later pairs
/// win over earlier ones, and a `null` inside a value (`kernel.sysctl={"a":null}`)
/// stays a removal. Each pair is validated, then the patch they make together (two
/// pairs may be refused together alone: `creds` and `credentials`).
pub fn pairs_to_patch(pairs: &[String]) -> Result<Value, Error> {
    let mut patch = Value::Object(Map::new());
    for pair in pairs {
        let (key, value) = parse_pair(pair)?;
        compose_patch(&mut patch, &key.to_patch(value));
    }
    crate::validate_patch(&patch)?;
    Ok(patch)
}
