//! Deep merge of JSON documents, used to combine the answers to several `get` prefixes
//! into the one document printed. Unlike RFC 7396 merge-patch (which lives in
//! `settings-model`), a `null` here is an ordinary value, not a removal.

use serde_json::Value;

/// Merges `other` into `target`: objects merge key by key, recursively; anything else in
/// `other` replaces what `target` held. Keys keep the order in which they first appeared.
pub fn deep_merge(target: &mut Value, other: Value) {
    match (target, other) {
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                match into.get_mut(&key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        into.insert(key, value);
                    }
                }
            }
        }
        (target, other) => *target = other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn disjoint_prefixes_are_combined() {
        let mut all = json!({});
        deep_merge(&mut all, json!({"settings": {"motd": "hi"}}));
        deep_merge(
            &mut all,
            json!({"settings": {"ntp": {"time-servers": ["a"]}}}),
        );
        deep_merge(&mut all, json!({"os": {"arch": "x86_64"}}));
        assert_eq!(
            all,
            json!({
                "settings": {"motd": "hi", "ntp": {"time-servers": ["a"]}},
                "os": {"arch": "x86_64"}
            })
        );
    }

    #[test]
    fn overlapping_answers_merge_deeply_and_keep_first_order() {
        let mut all = json!({"settings": {"b": {"x": 1}, "a": 1}});
        deep_merge(&mut all, json!({"settings": {"b": {"y": 2}, "c": 3}}));
        assert_eq!(
            serde_json::to_string(&all).ok(),
            Some(r#"{"settings":{"b":{"x":1,"y":2},"a":1,"c":3}}"#.to_owned())
        );
    }

    #[test]
    fn empty_answers_change_nothing() {
        let mut all = json!({"settings": {"motd": "hi"}});
        deep_merge(&mut all, json!({}));
        assert_eq!(all, json!({"settings": {"motd": "hi"}}));
    }

    #[test]
    fn non_objects_replace() {
        let mut all = json!({"a": [1, 2], "b": {"c": 1}});
        deep_merge(&mut all, json!({"a": [3], "b": null}));
        assert_eq!(all, json!({"a": [3], "b": null}));
    }
}
