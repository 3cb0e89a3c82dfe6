//! Collections with a maximum number of entries.
//!
//! Owns: [`Limited`], a list or map that refuses more than `N` entries when it is
//! deserialized (the error names the limit; the caller's path tracking names the key),
//! and says so in the JSON Schema (`maxItems`, `maxProperties`). Which collection gets
//! which limit, and why, is written where the model uses it.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use schemars::gen::SchemaGenerator;
use schemars::schema::Schema;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A collection that knows its number of entries and what to call them.
pub trait Entries {
    /// How many entries it holds.
    fn entries(&self) -> usize;
}

impl<T> Entries for Vec<T> {
    fn entries(&self) -> usize {
        self.len()
    }
}

impl<K, V> Entries for BTreeMap<K, V> {
    fn entries(&self) -> usize {
        self.len()
    }
}

/// A list or map of at most `N` entries. Serializes, compares and reads (through
/// `Deref`) exactly like the collection it wraps.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Limited<T, const N: usize>(T);

impl<T: Entries, const N: usize> Limited<T, N> {
    /// The most entries this collection accepts.
    pub const MAX: usize = N;

    /// `value`, or why it has too many entries.
    pub fn new(value: T) -> Result<Self, String> {
        let entries = value.entries();
        if entries > N {
            return Err(format!(
                "{entries} entries are more than the limit of {N} for this setting"
            ));
        }
        Ok(Self(value))
    }

    /// The collection.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for Limited<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T, const N: usize> Deref for Limited<T, N> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'a, T, const N: usize> IntoIterator for &'a Limited<T, N>
where
    &'a T: IntoIterator,
{
    type Item = <&'a T as IntoIterator>::Item;
    type IntoIter = <&'a T as IntoIterator>::IntoIter;
    fn into_iter(self) -> Self::IntoIter {
        (&self.0).into_iter()
    }
}

impl<T: Serialize, const N: usize> Serialize for Limited<T, N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de> + Entries, const N: usize> Deserialize<'de> for Limited<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(T::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl<T: JsonSchema, const N: usize> JsonSchema for Limited<T, N> {
    fn schema_name() -> String {
        format!("Limited{N}_{}", T::schema_name())
    }

    fn is_referenceable() -> bool {
        false
    }

    fn json_schema(gen: &mut SchemaGenerator) -> Schema {
        let Schema::Object(mut schema) = T::json_schema(gen) else {
            return T::json_schema(gen);
        };
        let limit = u32::try_from(N).unwrap_or(u32::MAX);
        if schema.array.is_some() {
            schema.array().max_items = Some(limit);
        } else {
            schema.object().max_properties = Some(limit);
        }
        Schema::Object(schema)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refuses_more_than_n_entries_and_names_the_limit() {
        let ok: Limited<Vec<u8>, 2> = serde_json::from_str("[1, 2]").unwrap();
        assert_eq!(*ok, [1, 2]);
        let err = serde_json::from_str::<Limited<Vec<u8>, 2>>("[1, 2, 3]").unwrap_err();
        assert!(err.to_string().contains("limit of 2"), "{err}");
        let err = serde_json::from_str::<Limited<BTreeMap<String, u8>, 1>>(r#"{"a":1,"b":2}"#)
            .unwrap_err();
        assert!(err.to_string().contains("2 entries"), "{err}");
    }

    #[test]
    fn serializes_as_the_collection_and_schema_has_the_limit() {
        let v: Limited<Vec<u8>, 3> = Limited::new(vec![1]).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "[1]");
        let schema = serde_json::to_value(schemars::schema_for!(Limited<Vec<u8>, 3>)).unwrap();
        assert_eq!(schema["maxItems"], 3);
        let schema =
            serde_json::to_value(schemars::schema_for!(Limited<BTreeMap<String, u8>, 4>)).unwrap();
        assert_eq!(schema["maxProperties"], 4);
    }
}
