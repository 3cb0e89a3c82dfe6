//! `apiclient set`: changes settings from `key=value` pairs (typed by the server) or
//! from a JSON merge-patch, in one transaction that is committed and applied.

use clap::Args;
use serde_json::{Map, Value};

use super::transaction::{change, DryRunArgs, Fill};
use super::{CliError, Output};
use crate::client::Client;

/// Changes settings, then commits and applies them
///
/// Prints nothing on success. With --dry-run, prints what would change instead (settings
/// diff, file diffs, summary) and changes nothing.
///
/// `key=value` pairs are typed by the settings model on the server: `motd=42` sets the
/// string "42". The `settings.` prefix is optional. Quote key segments that contain dots.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient set motd=\"hello from keel\"
  apiclient set settings.ntp.time-servers='[\"169.254.169.123\"]'
  apiclient set 'kernel.sysctl.\"vm.max_map_count\"=262144'
  apiclient set -j '{\"settings\": {\"motd\": \"hi\"}}'
  apiclient set --dry-run motd=\"hello\"
  apiclient set --dry-run --output json ntp.time-servers='[\"10.0.0.1\"]'")]
pub struct SetArgs {
    /// `key=value` pairs, sent exactly as typed.
    #[arg(
        value_name = "KEY=VALUE",
        required_unless_present = "json",
        conflicts_with = "json",
        value_parser = parse_pair
    )]
    pub pairs: Vec<String>,

    /// A JSON object of settings, with or without a top-level `settings` wrapper.
    /// Parsed by `run`, not by clap: clap's error for a value it refuses repeats the
    /// whole value, and this one may hold secrets (a key, a password).
    #[arg(short = 'j', long, value_name = "JSON")]
    pub json: Option<String>,

    #[command(flatten)]
    pub dry_run: DryRunArgs,
}

fn parse_pair(text: &str) -> Result<String, String> {
    if text.contains('=') {
        Ok(text.to_owned())
    } else {
        Err("expected KEY=VALUE".to_owned())
    }
}

/// The `--json` object; an error says where the JSON is wrong (line and column), never
/// what it holds.
fn parse_json_object(text: &str) -> Result<Map<String, Value>, CliError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(CliError::Usage("--json: expected a JSON object".to_owned())),
        Err(error) => Err(CliError::Usage(format!("--json: invalid JSON: {error}"))),
    }
}

/// The merge-patch to send for `--json`: the object itself, with what a top-level
/// `settings` wrapper holds lifted beside its other keys (as Bottlerocket's apiclient
/// does). A key both inside and beside the wrapper is ambiguous and refused.
pub fn json_patch(mut object: Map<String, Value>) -> Result<Value, CliError> {
    match object.remove("settings") {
        None => Ok(Value::Object(object)),
        Some(Value::Object(inner)) => {
            for (key, value) in inner {
                if object.contains_key(&key) {
                    return Err(CliError::Usage(format!(
                        "--json: `{key}` is given both inside and beside the `settings` object"
                    )));
                }
                object.insert(key, value);
            }
            Ok(Value::Object(object))
        }
        Some(_) => Err(CliError::Usage(
            "--json: `settings` must be a JSON object".to_owned(),
        )),
    }
}

pub async fn run(client: &Client, args: SetArgs) -> Result<Output, CliError> {
    match args.json {
        Some(text) => {
            let patch = json_patch(parse_json_object(&text)?)?;
            change(client, "set", &[Fill::Settings(&patch)], &args.dry_run).await
        }
        None => change(client, "set", &[Fill::Keypairs(&args.pairs)], &args.dry_run).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn settings_wrapper_is_removed() {
        let patch = json_patch(object(json!({"settings": {"motd": "hi"}}))).unwrap();
        assert_eq!(patch, json!({"motd": "hi"}));
        let patch = json_patch(object(json!({"motd": "hi"}))).unwrap();
        assert_eq!(patch, json!({"motd": "hi"}));
    }

    #[test]
    fn a_wrapper_beside_other_keys_is_lifted_unless_ambiguous() {
        let patch = json_patch(object(json!({"settings": {"motd": "hi"}, "ntp": {}}))).unwrap();
        assert_eq!(patch, json!({"ntp": {}, "motd": "hi"}));
        assert!(json_patch(object(json!({"settings": {"motd": "a"}, "motd": "b"}))).is_err());
        assert!(json_patch(object(json!({"settings": 1}))).is_err());
    }

    #[test]
    fn arguments_are_checked() {
        assert!(parse_pair("motd").is_err());
        assert_eq!(parse_pair("motd=a=b").unwrap(), "motd=a=b");
        assert!(parse_json_object("[1]").is_err());
        assert!(parse_json_object("{").is_err());
    }

    #[test]
    fn bad_json_is_a_usage_error_that_does_not_repeat_the_json() {
        let secret = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0t";
        let text = format!(r#"{{"kubernetes": {{"server-key": "{secret}"}}"#);
        let error = parse_json_object(&text).unwrap_err();
        assert_eq!(error.exit_code(), 2, "{error}");
        let message = error.to_string();
        assert!(message.contains("--json: invalid JSON: "), "{message}");
        assert!(!message.contains(secret), "{message}");
    }
}
