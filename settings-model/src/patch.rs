//! Merge-patch and flat key listings over `serde_json::Value`.
//!
//! Owns: RFC 7396 merge-patch, flattening a settings tree into dotted `settings.` keys and
//! back, the list of keys that differ between two trees, and prefix / key selection as
//! the API's `prefix=` and `keys=` queries need them. Knows nothing about the model's
//! types: these work on any JSON.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::key::format_segment;
use crate::KeyPath;

/// Applies `patch` to `target` as RFC 7396 says: objects merge recursively, `null`
/// removes a member, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                let entry = target_map.entry(key.clone()).or_insert(Value::Null);
                merge_patch(entry, value);
            }
        }
    }
}

/// Folds merge patch `next` into merge patch `acc`, so that applying `acc` then does
/// what applying both in turn would: members of `next` replace those of `acc`, objects
/// fold recursively, and a `null` (a removal) is kept, not applied. (One case has no
/// single-patch form: a member removed by `acc` and set to an object by `next` becomes
/// that object, merged into the stored value rather than replacing it.)
pub fn compose_patch(acc: &mut Value, next: &Value) {
    let (Value::Object(acc_map), Value::Object(next_map)) = (&mut *acc, next) else {
        *acc = next.clone();
        return;
    };
    for (key, value) in next_map {
        match acc_map.get_mut(key) {
            Some(existing) if existing.is_object() && value.is_object() => {
                compose_patch(existing, value)
            }
            _ => {
                acc_map.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Flattens `value` into dotted keys under `prefix` (empty: no prefix). Leaves are
/// non-objects (arrays included) and empty objects.
fn flatten_into(value: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    format_segment(k)
                } else {
                    format!("{prefix}.{}", format_segment(k))
                };
                flatten_into(v, &key, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

/// Flattens settings (no wrapper) into `settings.`-prefixed dotted keys.
pub fn flatten(settings: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    flatten_into(settings, "settings", &mut out);
    out
}

/// Splits a flat key into segments; a key that does not parse is one raw segment.
fn segments_of(key: &str) -> Vec<String> {
    KeyPath::parse(key).map_or_else(|_| vec![key.to_owned()], |p| p.segments().to_vec())
}

/// Places `leaf` at `segments` inside `root`, creating objects on the way.
fn insert_at(root: &mut Value, segments: &[String], leaf: Value) {
    let Some((first, rest)) = segments.split_first() else {
        *root = leaf;
        return;
    };
    if !root.is_object() {
        *root = Value::Object(Map::new());
    }
    if let Value::Object(map) = root {
        let child = map.entry(first.clone()).or_insert(Value::Null);
        insert_at(child, rest, leaf);
    }
}

/// Rebuilds a tree from flat keys (all segments kept).
fn unflatten_all(map: &BTreeMap<String, Value>) -> Value {
    let mut root = Value::Object(Map::new());
    for (key, value) in map {
        insert_at(&mut root, &segments_of(key), value.clone());
    }
    root
}

/// The inverse of [`flatten`]: rebuilds settings (no wrapper) from `settings.` keys. A key
/// without the `settings.` prefix is placed as written; one that does not parse as a key
/// path becomes a single member named by the whole key.
pub fn unflatten(map: &BTreeMap<String, Value>) -> Value {
    let mut root = Value::Object(Map::new());
    for (key, value) in map {
        let segments = segments_of(key);
        let rest = match segments.split_first() {
            Some((first, rest)) if first == "settings" => rest,
            _ => &segments[..],
        };
        insert_at(&mut root, rest, value.clone());
    }
    root
}

/// The sorted `settings.` leaf keys that were added, removed or changed from `old` to `new`.
///
/// Empty tables are not keys: `{}` appearing or disappearing (the empty model, a table
/// emptied by removals) changes no setting.
pub fn changed_keys(old: &Value, new: &Value) -> Vec<String> {
    let is_empty_table = |v: &Value| v.as_object().is_some_and(|m| m.is_empty());
    let mut old_flat = flatten(old);
    let mut new_flat = flatten(new);
    old_flat.retain(|_, v| !is_empty_table(v));
    new_flat.retain(|_, v| !is_empty_table(v));
    let mut keys: Vec<String> = old_flat
        .iter()
        .filter(|(k, v)| new_flat.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(
            new_flat
                .keys()
                .filter(|k| !old_flat.contains_key(*k))
                .cloned(),
        )
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Like [`changed_keys`], but looks only under the keys the merge-`patches` name: what a
/// patch does not name cannot have changed. `new` must be `old` with the patches applied
/// (and possibly re-serialized). Costs in proportion to the patches, not to the model.
pub fn changed_keys_touched(old: &Value, new: &Value, patches: &[&Value]) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for patch in patches {
        touched(Some(old), Some(new), patch, "settings", &mut out);
    }
    out.into_iter().collect()
}

fn touched(
    old: Option<&Value>,
    new: Option<&Value>,
    patch: &Value,
    prefix: &str,
    out: &mut std::collections::BTreeSet<String>,
) {
    let is_table = |v: Option<&Value>| v.is_none_or(Value::is_object);
    match patch {
        Value::Object(members) if !members.is_empty() && is_table(old) && is_table(new) => {
            // A member the patch sets that is not in the result was stored in another
            // shape or under another name (validation canonicalizes: `creds` becomes
            // `credentials`, a table of mirrors a list): compare this whole level.
            let moved = members
                .iter()
                .any(|(k, member)| !member.is_null() && new.and_then(|n| n.get(k)).is_none());
            if moved {
                return differing(old, new, prefix, out);
            }
            for (k, member) in members {
                let key = format!("{prefix}.{}", format_segment(k));
                touched(
                    old.and_then(|o| o.get(k)),
                    new.and_then(|n| n.get(k)),
                    member,
                    &key,
                    out,
                );
            }
        }
        _ => differing(old, new, prefix, out),
    }
}

/// The keys under `prefix` whose leaves differ between `old` and `new`.
fn differing(
    old: Option<&Value>,
    new: Option<&Value>,
    prefix: &str,
    out: &mut std::collections::BTreeSet<String>,
) {
    let is_empty_table = |v: &Value| v.as_object().is_some_and(|m| m.is_empty());
    let mut before = BTreeMap::new();
    let mut after = BTreeMap::new();
    if let Some(o) = old {
        flatten_into(o, prefix, &mut before);
    }
    if let Some(n) = new {
        flatten_into(n, prefix, &mut after);
    }
    before.retain(|_, v| !is_empty_table(v));
    after.retain(|_, v| !is_empty_table(v));
    for (k, v) in &before {
        if after.get(k) != Some(v) {
            out.insert(k.clone());
        }
    }
    for k in after.keys() {
        if !before.contains_key(k) {
            out.insert(k.clone());
        }
    }
}

/// Keeps only the leaves of `root` (`{"settings":…,"os":…}`) whose dotted key starts with
/// the string `prefix`; `{}` when nothing matches.
pub fn filter_prefix(root: &Value, prefix: &str) -> Value {
    let mut flat = BTreeMap::new();
    flatten_into(root, "", &mut flat);
    flat.retain(|key, _| !key.is_empty() && key.starts_with(prefix));
    if flat.is_empty() {
        return Value::Object(Map::new());
    }
    unflatten_all(&flat)
}

/// Keeps the subtrees of `settings` (no wrapper) at `keys` (each starting with
/// `settings`); keys that name nothing are ignored.
pub fn select_keys(settings: &Value, keys: &[KeyPath]) -> Value {
    let mut out = Value::Object(Map::new());
    for key in keys {
        let segments = key.segments();
        let rest = if key.starts_with_settings() {
            &segments[1..]
        } else {
            segments
        };
        let mut node = Some(settings);
        for segment in rest {
            node = node.and_then(|n| n.get(segment));
        }
        if let Some(found) = node {
            let mut piece = Value::Object(Map::new());
            insert_at(&mut piece, rest, found.clone());
            merge_values(&mut out, piece);
        }
    }
    out
}

/// Deep-merges `add` into `into` without null semantics.
fn merge_values(into: &mut Value, add: Value) {
    match (into, add) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge_values(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, add) => *slot = add,
    }
}
