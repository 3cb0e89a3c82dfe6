//! `apiclient schema`: prints the JSON Schema of user-data documents, for editors and
//! linters. Works offline: it comes from the settings model compiled in.

use clap::Args;

use super::{CliError, Output};

/// Prints the JSON Schema of user-data documents
///
/// A user-data document has a top-level `settings` object.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient schema > keel-user-data.schema.json
  apiclient schema | jq '.properties.settings.properties | keys'")]
pub struct SchemaArgs {}

pub fn run(_args: SchemaArgs) -> Result<Output, CliError> {
    Ok(Output::Json(settings_model::schema::json_schema()))
}
