//! The one error type of the settings model.
//!
//! Owns: the messages users see when a setting, a key path, a `key=value` pair or a
//! user-data document is wrong. Every variant about a key carries the full dotted key path
//! with the `settings.` prefix, so the agent can answer `{"error": ..., "key": ...}`.

/// Why a settings document, key or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value has the wrong type or grammar.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },

    /// A TOML document is not well-formed.
    #[error("{source_name}: TOML syntax error at line {line}, column {column}: {message}")]
    Toml {
        source_name: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// A JSON document is not well-formed.
    #[error("{source_name}: JSON syntax error at line {line}, column {column}: {message}")]
    Json {
        source_name: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// A key path is malformed or names no setting.
    #[error("{key}: {reason}")]
    BadKey { key: String, reason: String },

    /// The text on the right of `key=value` cannot become a value of the key's type.
    /// The text is not repeated: it may be a secret (a password, an environment map).
    #[error("{key}: cannot set the value given: {reason}")]
    BadValue { key: String, reason: String },
}

impl Error {
    /// The full dotted key path (with the `settings.` prefix) the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::Invalid { key, .. }
            | Error::BadKey { key, .. }
            | Error::BadValue { key, .. } => Some(key),
            Error::Toml { .. } | Error::Json { .. } => None,
        }
    }

    /// The reason alone, without the key path or source name.
    pub fn reason(&self) -> &str {
        match self {
            Error::Invalid { reason, .. }
            | Error::BadKey { reason, .. }
            | Error::BadValue { reason, .. } => reason,
            Error::Toml { message, .. } | Error::Json { message, .. } => message,
        }
    }
}
