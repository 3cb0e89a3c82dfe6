//! Dotted key paths such as `settings.kernel.sysctl."vm.max_map_count"`.
//!
//! Owns: parsing (with double-quoted segments that may contain dots), formatting back
//! with quoting only where needed, and building the nested patch a key addresses. Knows
//! nothing about which keys exist: that is the schema's business.

use std::fmt;

use serde_json::{Map, Value};

use crate::Error;

/// A parsed key path; always non-empty. Segments are stored unquoted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyPath {
    segments: Vec<String>,
}

impl KeyPath {
    /// Parses a dotted key path exactly as written (no implied `settings.` prefix).
    pub fn parse(s: &str) -> Result<KeyPath, Error> {
        let bad = |reason: &str| Error::BadKey {
            key: s.to_owned(),
            reason: format!("malformed key path: {reason}"),
        };
        if s.is_empty() {
            return Err(bad("empty key"));
        }
        let mut segments = Vec::new();
        let mut chars = s.chars().peekable();
        loop {
            let mut segment = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '"' {
                        closed = true;
                        break;
                    }
                    if c.is_control() {
                        return Err(bad("control character in key"));
                    }
                    segment.push(c);
                }
                if !closed {
                    return Err(bad("unterminated quote"));
                }
                if segment.is_empty() {
                    return Err(bad("empty segment"));
                }
                match chars.next() {
                    None => {
                        segments.push(segment);
                        break;
                    }
                    Some('.') => segments.push(segment),
                    Some(_) => return Err(bad("a quoted segment must be followed by '.'")),
                }
            } else {
                let mut ended = true;
                for c in chars.by_ref() {
                    match c {
                        '.' => {
                            ended = false;
                            break;
                        }
                        '"' => return Err(bad("quote in the middle of a segment")),
                        c if c.is_control() => return Err(bad("control character in key")),
                        c => segment.push(c),
                    }
                }
                if segment.is_empty() {
                    return Err(bad("empty segment"));
                }
                segments.push(segment);
                if ended {
                    break;
                }
            }
            if chars.peek().is_none() {
                return Err(bad("empty segment"));
            }
        }
        Ok(KeyPath { segments })
    }

    /// Parses a settings key; the `settings.` prefix is optional (`motd` means
    /// `settings.motd`) and the result always starts with `settings`.
    pub fn parse_setting(s: &str) -> Result<KeyPath, Error> {
        let mut path = KeyPath::parse(s)?;
        if !path.starts_with_settings() {
            path.segments.insert(0, "settings".to_owned());
        }
        Ok(path)
    }

    /// Builds a key path from already-unquoted segments.
    pub fn from_segments(segments: Vec<String>) -> Option<KeyPath> {
        if segments.is_empty() || segments.iter().any(String::is_empty) {
            return None;
        }
        Some(KeyPath { segments })
    }

    /// The unquoted segments.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// Whether the first segment is `settings`.
    pub fn starts_with_settings(&self) -> bool {
        self.segments.first().map(String::as_str) == Some("settings")
    }

    /// The nested JSON object (without the leading `settings` segment) with `leaf` at this
    /// path. `settings` alone yields `leaf` itself.
    pub fn to_patch(&self, leaf: Value) -> Value {
        let rest = if self.starts_with_settings() {
            &self.segments[1..]
        } else {
            &self.segments[..]
        };
        rest.iter().rev().fold(leaf, |inner, segment| {
            let mut map = Map::new();
            map.insert(segment.clone(), inner);
            Value::Object(map)
        })
    }
}

/// Formats one segment, quoting it when it contains anything but `[A-Za-z0-9_/-]`.
pub fn format_segment(segment: &str) -> String {
    let plain = !segment.is_empty()
        && segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/'));
    if plain {
        segment.to_owned()
    } else {
        format!("\"{segment}\"")
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(&format_segment(segment))?;
        }
        Ok(())
    }
}

impl std::str::FromStr for KeyPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyPath::parse(s)
    }
}
