//! `apiclient unset`: removes settings (so that their defaults, if any, apply again) by
//! sending a merge-patch with `null` at each key.

use clap::Args;
use serde_json::Value;
use settings_model::KeyPath;

use super::transaction::{change, DryRunArgs, Fill};
use super::{CliError, Output};
use crate::client::Client;

/// Removes settings, then commits and applies
///
/// Prints nothing on success. With --dry-run, prints what would change instead and
/// changes nothing.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient unset motd
  apiclient unset settings.host-containers.admin 'kernel.sysctl.\"vm.max_map_count\"'
  apiclient unset --dry-run motd")]
pub struct UnsetArgs {
    /// Keys to remove; the `settings.` prefix is optional.
    #[arg(value_name = "KEY", required = true)]
    pub keys: Vec<String>,

    #[command(flatten)]
    pub dry_run: DryRunArgs,
}

/// The merge-patch removing every key (without `settings` wrapper).
pub fn removal_patch(keys: &[String]) -> Result<Value, CliError> {
    let mut patch = Value::Object(serde_json::Map::new());
    for key in keys {
        // A key that is no key is the command line's mistake (exit 2), as a pair
        // without `=` is for `set`.
        let path = KeyPath::parse_setting(key).map_err(|e| CliError::Usage(e.to_string()))?;
        if path.segments().len() < 2 {
            return Err(CliError::Usage(format!(
                "{key}: name a key below `settings`"
            )));
        }
        merge_removal(&mut patch, path.to_patch(Value::Null));
    }
    Ok(patch)
}

/// Like a deep merge, except that a removal already recorded higher up wins over one
/// deeper down: unsetting `a` and `a.b` removes `a`.
fn merge_removal(target: &mut Value, removal: Value) {
    match (target, removal) {
        (Value::Null, _) => {}
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                match into.get_mut(&key) {
                    Some(existing) => merge_removal(existing, value),
                    None => {
                        into.insert(key, value);
                    }
                }
            }
        }
        (target, removal) => *target = removal,
    }
}

pub async fn run(client: &Client, args: UnsetArgs) -> Result<Output, CliError> {
    let patch = removal_patch(&args.keys)?;
    change(client, "unset", &[Fill::Settings(&patch)], &args.dry_run).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_become_nulls_in_one_patch() {
        let keys = [
            "motd".to_owned(),
            "settings.kernel.sysctl.\"vm.max_map_count\"".to_owned(),
            "kernel.sysctl.\"vm.swappiness\"".to_owned(),
        ];
        let patch = removal_patch(&keys).ok();
        assert_eq!(
            patch,
            Some(json!({
                "motd": null,
                "kernel": {"sysctl": {"vm.max_map_count": null, "vm.swappiness": null}}
            }))
        );
    }

    #[test]
    fn the_settings_root_and_malformed_keys_are_refused() {
        assert!(removal_patch(&["settings".to_owned()]).is_err());
        assert!(removal_patch(&["a.\"b".to_owned()]).is_err());
    }

    #[test]
    fn broader_removals_win_whatever_the_order() {
        let mut patch = json!({});
        merge_removal(&mut patch, json!({"a": {"b": null}}));
        merge_removal(&mut patch, json!({"a": null}));
        merge_removal(&mut patch, json!({"a": {"c": null}}));
        merge_removal(&mut patch, json!({"d": null}));
        assert_eq!(patch, json!({"a": null, "d": null}));
    }
}
