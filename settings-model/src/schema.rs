//! The JSON Schema of user-data, and what JSON types each key accepts.
//!
//! Owns: generating the schema from the model's types (so it can never drift from them)
//! and answering "which JSON types may this key hold?" for `key=value` typing and for
//! checking `null` removals. The schema is built once and cached.

use std::sync::OnceLock;

use schemars::gen::SchemaSettings;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{KeyPath, Settings};

/// A user-data document: only the `settings` table.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Keel user-data")]
struct UserData {
    settings: Option<Settings>,
}

/// The JSON types a key accepts (`null` is never listed: it always means "remove").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds {
    pub string: bool,
    pub boolean: bool,
    pub integer: bool,
    pub number: bool,
    pub array: bool,
    pub object: bool,
}

impl Kinds {
    fn add_type(&mut self, name: &str) {
        match name {
            "string" => self.string = true,
            "boolean" => self.boolean = true,
            "integer" => self.integer = true,
            "number" => self.number = true,
            "array" => self.array = true,
            "object" => self.object = true,
            _ => {}
        }
    }
}

fn build_schema() -> Value {
    let generator = SchemaSettings::draft07()
        .with(|s| s.option_add_null_type = false)
        .into_generator();
    let root = generator.into_root_schema_for::<UserData>();
    serde_json::to_value(root).unwrap_or(Value::Null)
}

fn cached() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(build_schema)
}

/// The JSON Schema (draft-07) of a user-data document with its top-level `settings`.
pub fn json_schema() -> Value {
    cached().clone()
}

/// Follows a `$ref` (to `#/definitions/...`) if `node` is one.
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    let mut node = node;
    // References never chain deeply; the bound only guards against a cycle.
    for _ in 0..8 {
        let Some(reference) = node.get("$ref").and_then(Value::as_str) else {
            return node;
        };
        let Some(name) = reference.strip_prefix("#/definitions/") else {
            return node;
        };
        match root.get("definitions").and_then(|d| d.get(name)) {
            Some(target) => node = target,
            None => return node,
        }
    }
    node
}

/// The schema node itself and its `allOf`/`anyOf`/`oneOf` alternatives, resolved.
fn alternatives<'a>(root: &'a Value, node: &'a Value, out: &mut Vec<&'a Value>) {
    let node = resolve(root, node);
    out.push(node);
    for combinator in ["allOf", "anyOf", "oneOf"] {
        if let Some(list) = node.get(combinator).and_then(Value::as_array) {
            for sub in list {
                alternatives(root, sub, out);
            }
        }
    }
}

fn kinds_of(root: &Value, node: &Value) -> Kinds {
    let mut nodes = Vec::new();
    alternatives(root, node, &mut nodes);
    let mut kinds = Kinds::default();
    for n in nodes {
        match n.get("type") {
            Some(Value::String(t)) => kinds.add_type(t),
            Some(Value::Array(types)) => types
                .iter()
                .filter_map(Value::as_str)
                .for_each(|t| kinds.add_type(t)),
            _ => {}
        }
        if n.get("enum").is_some() {
            kinds.string = true;
        }
    }
    kinds
}

fn child<'a>(root: &'a Value, node: &'a Value, segment: &str) -> Option<&'a Value> {
    let mut nodes = Vec::new();
    alternatives(root, node, &mut nodes);
    nodes.iter().find_map(|n| {
        n.get("properties")
            .and_then(|p| p.get(segment))
            .or_else(|| n.get("additionalProperties").filter(|a| a.is_object()))
    })
}

/// The JSON types accepted at `path` (which should start with `settings`), or `None`
/// when the model has no such key.
pub fn kind_at(path: &KeyPath) -> Option<Kinds> {
    let root = cached();
    let mut node = root;
    for segment in path.segments() {
        node = child(root, node, segment)?;
    }
    Some(kinds_of(root, node))
}
