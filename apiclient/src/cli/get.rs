//! `apiclient get`: reads settings and OS facts, by prefix or by URI, and prints them as
//! one JSON document.

use clap::Args;
use serde_json::Value;

use super::{CliError, Output};
use crate::client::Client;
use crate::merge::deep_merge;
use crate::uri::with_query;

/// Prints the whole model, or what matches the given prefixes, as JSON
///
/// A prefix is matched as a string against dotted keys, so `settings.host` matches both
/// `settings.host-containers` and `settings.hostname`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient get
  apiclient get settings.motd
  apiclient get settings.host-containers os
  apiclient get -u /settings
  apiclient get settings.motd | jq -r .settings.motd")]
pub struct GetArgs {
    /// Key prefixes, e.g. `settings.motd` or `os`; one request each, results merged.
    #[arg(conflicts_with = "uri")]
    pub prefixes: Vec<String>,

    /// GET this URI instead, e.g. `/settings` or `/os`.
    #[arg(short = 'u', long)]
    pub uri: Option<String>,
}

/// The requests `get` sends for these arguments, in order.
pub fn request_uris(args: &GetArgs) -> Vec<String> {
    match (&args.uri, args.prefixes.as_slice()) {
        (Some(uri), _) => vec![uri.clone()],
        (None, []) => vec!["/".to_owned()],
        (None, prefixes) => prefixes
            .iter()
            .map(|prefix| with_query("/", &[("prefix", prefix)]))
            .collect(),
    }
}

pub async fn run(client: &Client, args: GetArgs) -> Result<Output, CliError> {
    let mut merged: Option<Value> = None;
    for uri in request_uris(&args) {
        let answer = client.get_json(&uri).await?;
        match merged.as_mut() {
            Some(all) => deep_merge(all, answer),
            None => merged = Some(answer),
        }
    }
    Ok(merged.map_or(Output::Nothing, Output::Json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(prefixes: &[&str], uri: Option<&str>) -> GetArgs {
        GetArgs {
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            uri: uri.map(str::to_owned),
        }
    }

    #[test]
    fn no_arguments_get_everything() {
        assert_eq!(request_uris(&args(&[], None)), ["/"]);
    }

    #[test]
    fn one_request_per_prefix_encoded() {
        assert_eq!(
            request_uris(&args(
                &["settings.motd", "settings.kernel.sysctl.\"vm.x\""],
                None
            )),
            [
                "/?prefix=settings.motd",
                "/?prefix=settings.kernel.sysctl.%22vm.x%22"
            ]
        );
    }

    #[test]
    fn a_uri_is_used_as_given() {
        assert_eq!(request_uris(&args(&[], Some("/os"))), ["/os"]);
    }
}
