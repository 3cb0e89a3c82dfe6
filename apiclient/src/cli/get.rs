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
/// `settings.host-containers` and `settings.hostname`. An argument starting with `/` is
/// a URI to GET instead (as with Bottlerocket's apiclient: `apiclient get
/// /updates/status`); it cannot be mixed with prefixes.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient get
  apiclient get settings.motd
  apiclient get settings.host-containers os
  apiclient get /settings
  apiclient get -u /os
  apiclient get settings.motd | jq -r .settings.motd")]
pub struct GetArgs {
    /// Key prefixes, e.g. `settings.motd` or `os` (one request each, results merged),
    /// or one URI starting with `/`.
    #[arg(value_name = "PREFIX|URI")]
    pub prefixes: Vec<String>,

    /// GET this URI instead, e.g. `/settings` or `/os`.
    #[arg(short = 'u', long, conflicts_with = "prefixes")]
    pub uri: Option<String>,
}

/// The requests `get` sends for these arguments, in order.
pub fn request_uris(args: &GetArgs) -> Result<Vec<String>, CliError> {
    let (uris, prefixes): (Vec<&String>, Vec<&String>) =
        args.prefixes.iter().partition(|arg| arg.starts_with('/'));
    let uri = match (args.uri.as_ref(), uris.as_slice()) {
        (Some(uri), []) => Some(uri),
        (None, []) => None,
        (None, [uri]) => Some(*uri),
        _ => {
            return Err(CliError::Usage(
                "get takes one URI at most (a `/…` argument or --uri)".to_owned(),
            ))
        }
    };
    Ok(match (uri, prefixes.as_slice()) {
        (Some(uri), []) => vec![uri.clone()],
        (Some(_), _) => {
            return Err(CliError::Usage(
                "get takes prefixes or a URI, not both".to_owned(),
            ))
        }
        (None, []) => vec!["/".to_owned()],
        (None, prefixes) => prefixes
            .iter()
            .map(|prefix| with_query("/", &[("prefix", prefix)]))
            .collect(),
    })
}

pub async fn run(client: &Client, args: GetArgs) -> Result<Output, CliError> {
    let mut merged: Option<Value> = None;
    for uri in request_uris(&args)? {
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
        assert_eq!(request_uris(&args(&[], None)).ok(), Some(vec!["/".into()]));
    }

    #[test]
    fn one_request_per_prefix_encoded() {
        assert_eq!(
            request_uris(&args(
                &["settings.motd", "settings.kernel.sysctl.\"vm.x\""],
                None
            ))
            .ok(),
            Some(vec![
                "/?prefix=settings.motd".into(),
                "/?prefix=settings.kernel.sysctl.%22vm.x%22".into()
            ])
        );
    }

    #[test]
    fn a_uri_is_used_as_given() {
        assert_eq!(
            request_uris(&args(&[], Some("/os"))).ok(),
            Some(vec!["/os".into()])
        );
        // Bottlerocket's form: the URI as an argument.
        assert_eq!(
            request_uris(&args(&["/updates/status"], None)).ok(),
            Some(vec!["/updates/status".into()])
        );
    }

    #[test]
    fn uris_and_prefixes_do_not_mix() {
        for bad in [
            args(&["/a", "/b"], None),
            args(&["/a"], Some("/b")),
            args(&["/a", "settings"], None),
        ] {
            assert!(matches!(request_uris(&bad), Err(CliError::Usage(_))));
        }
    }
}
