//! `apiclient apply`: applies user-data documents (TOML or JSON with a `settings` table)
//! from files, `file://` URIs, `http(s)://` URLs or stdin, all in one transaction.

use clap::Args;
use serde_json::Value;

use super::transaction::{change, DryRunArgs, Fill};
use super::{CliError, Output};
use crate::client::Client;
use crate::source::Source;

/// Applies user-data documents (TOML or JSON) in one transaction
///
/// A source is a path, a `file://` URI, an `http://` or `https://` URL, or `-` for
/// stdin (the default). Every source is checked locally first, then PATCHed into one transaction in the order
/// given, which is committed and applied. Prints nothing on success. With --dry-run,
/// prints what would change instead (settings diff, file diffs, summary) and changes
/// nothing.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  printf '[settings]\\nmotd = \"hi\"\\n' > user-data.toml
  apiclient apply user-data.toml
  apiclient apply \"file://$PWD/user-data.toml\"
  apiclient apply < user-data.toml
  echo '{\"settings\": {\"motd\": \"hi\"}}' | apiclient apply -
  apiclient apply --dry-run user-data.toml
  apiclient apply --dry-run --output json user-data.toml | jq '.files[].path'")]
pub struct ApplyArgs {
    /// Paths, `file://` URIs, `http(s)://` URLs, or `-` for stdin (the default).
    #[arg(value_name = "SOURCE")]
    pub sources: Vec<String>,

    #[command(flatten)]
    pub dry_run: DryRunArgs,
}

/// Reads and checks every source; the patches (without `settings` wrapper) in order.
pub async fn read_sources(args: &[String]) -> Result<Vec<Value>, CliError> {
    let default = ["-".to_owned()];
    let args = if args.is_empty() { &default[..] } else { args };
    if args.iter().filter(|arg| *arg == "-").count() > 1 {
        return Err(CliError::Usage(
            "stdin (`-`) can be given only once".to_owned(),
        ));
    }
    let mut patches = Vec::with_capacity(args.len());
    for arg in args {
        let source = Source::parse(arg)?;
        let text = source.read().await?;
        let patch = settings_model::userdata::parse_user_data(source.name(), &text)
            .map_err(|error| in_source(source.name(), error))?;
        patches.push(patch);
    }
    Ok(patches)
}

/// Makes sure the message names the source: syntax errors already do, errors about a
/// key name only the key.
fn in_source(name: &str, error: settings_model::Error) -> CliError {
    if error.to_string().starts_with(&format!("{name}: ")) {
        CliError::Model(error)
    } else {
        CliError::UserData {
            name: name.to_owned(),
            source: error,
        }
    }
}

pub async fn run(client: &Client, args: ApplyArgs) -> Result<Output, CliError> {
    let patches = read_sources(&args.sources).await?;
    let fills: Vec<Fill<'_>> = patches.iter().map(Fill::Settings).collect();
    change(client, "apply", &fills, &args.dry_run).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn read_sources(args: &[String]) -> Result<Vec<Value>, CliError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(super::read_sources(args))
    }

    #[test]
    fn toml_and_json_sources_become_patches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let toml = write(&dir, "a.toml", "[settings]\nmotd = \"from toml\"\n");
        let json = write(&dir, "b.json", r#"{"settings": {"motd": "from json"}}"#);
        let uri = format!("file://{toml}");
        let patches = read_sources(&[uri, json]).unwrap();
        assert_eq!(
            patches,
            [json!({"motd": "from toml"}), json!({"motd": "from json"})]
        );
    }

    #[test]
    fn errors_name_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let syntax = write(&dir, "syntax.toml", "[settings\n");
        let error = read_sources(std::slice::from_ref(&syntax))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(&format!("{syntax}: ")), "{error}");
        assert!(error.contains("line 1"), "{error}");

        let typed = write(&dir, "typed.toml", "[settings]\nmotd = 5\n");
        let error = read_sources(std::slice::from_ref(&typed))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(&format!("{typed}: ")), "{error}");
        assert!(error.contains("settings.motd"), "{error}");
    }

    #[test]
    fn stdin_only_once() {
        let args = ["-".to_owned(), "-".to_owned()];
        assert!(matches!(read_sources(&args), Err(CliError::Usage(_))));
    }
}
