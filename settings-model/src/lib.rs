//! Keel's typed settings model.
//!
//! Owns: the settings types and their validated newtypes, dotted key paths, RFC 7396
//! merge-patch, the flattening used for key listings and diffs, typed `key=value`
//! conversion, user-data parsing, the JSON Schema and the vocabulary of settings
//! migrations between image versions. Must not do I/O: everything here is
//! a pure function of its inputs, so the agent, the CLI and the tests share one truth.
//!
//! Values travel as `serde_json::Value` *without* the `settings` wrapper
//! (`{"motd":"hi"}`); key paths, errors and listings carry the `settings.` prefix.

pub mod error;
pub mod exec;
pub mod key;
pub mod keypair;
pub mod limits;
pub mod migration;
pub mod model;
pub mod patch;
pub mod proxy;
pub mod schema;
pub mod types;
pub mod userdata;

pub use error::Error;
pub use key::KeyPath;
pub use model::Settings;

/// Validates a complete settings value and returns its canonical JSON form.
pub fn validate(settings: &serde_json::Value) -> Result<serde_json::Value, Error> {
    model::validate(settings)
}

/// Validates the named top-level groups of `candidate` for a commit over `live`; see
/// [`model::validate_groups_over`].
pub fn validate_groups_over(
    candidate: &serde_json::Value,
    live: &serde_json::Value,
    groups: &std::collections::BTreeSet<String>,
) -> Result<serde_json::Value, Error> {
    model::validate_groups_over(candidate, live, groups)
}

/// Validates the named top-level groups of `candidate`; see [`model::validate_groups`].
pub fn validate_groups(
    candidate: &serde_json::Value,
    groups: &std::collections::BTreeSet<String>,
) -> Result<serde_json::Value, Error> {
    model::validate_groups(candidate, groups)
}

/// Validates a merge-patch: every key must exist in the model, every non-null value must
/// have the right type and grammar; `null` marks a removal.
pub fn validate_patch(patch: &serde_json::Value) -> Result<(), Error> {
    model::validate_patch(patch)
}
