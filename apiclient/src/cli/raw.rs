//! `apiclient raw`, also what `apiclient` does when no subcommand is given (as
//! Bottlerocket's does: `apiclient -u /settings`): one request exactly as given, for
//! endpoints without a subcommand.

use clap::Args;
use http::Method;

use super::{CliError, Output};
use crate::client::Client;

/// Sends one request and prints the answer (pretty if it is JSON)
///
/// `raw` is the default subcommand: `apiclient -u /settings` is `apiclient raw -u
/// /settings`. With -v, the answer's status line is printed on stderr.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient raw -u /tx/list
  apiclient -u /settings
  apiclient raw -u '/settings?keys=settings.motd'
  apiclient raw -m PATCH -u '/settings?tx=demo' -d '{\"motd\":\"hi\"}'
  apiclient raw -X POST -u '/tx/commit_and_apply?tx=demo'
  apiclient raw -m DELETE -u '/tx?tx=demo'")]
pub struct RawArgs {
    #[command(flatten)]
    pub request: RequestArgs,
}

/// The request's flags; `apiclient` itself takes them too, for the default `raw`.
#[derive(Debug, Clone, Default, Args)]
pub struct RequestArgs {
    /// Request target, `/path?query`, already percent-encoded (required).
    #[arg(short = 'u', long)]
    pub uri: Option<String>,

    /// HTTP method [default: GET].
    #[arg(short = 'm', visible_short_alias = 'X', long, value_parser = parse_method)]
    pub method: Option<Method>,

    /// Request body (JSON).
    #[arg(short = 'd', long)]
    pub data: Option<String>,
}

impl RequestArgs {
    /// Whether any of the flags was given.
    pub fn is_given(&self) -> bool {
        self.uri.is_some() || self.method.is_some() || self.data.is_some()
    }

    /// Fills what `self` lacks from `other` (`apiclient -u /x raw` gives the flags before
    /// the subcommand's name, which Bottlerocket's apiclient accepts); a flag given in
    /// both places is a usage error.
    pub fn merged(self, other: RequestArgs) -> Result<RequestArgs, CliError> {
        fn one<T>(flag: &str, a: Option<T>, b: Option<T>) -> Result<Option<T>, CliError> {
            match (a, b) {
                (Some(_), Some(_)) => Err(CliError::Usage(format!(
                    "{flag} is given both before and after `raw`"
                ))),
                (a, b) => Ok(a.or(b)),
            }
        }
        Ok(RequestArgs {
            uri: one("--uri", self.uri, other.uri)?,
            method: one("--method", self.method, other.method)?,
            data: one("--data", self.data, other.data)?,
        })
    }
}

fn parse_method(text: &str) -> Result<Method, String> {
    Method::from_bytes(text.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{text:?} is not an HTTP method"))
}

/// Sends the request; with `verbose`, prints the status line (`200 OK`) on stderr as
/// Bottlerocket's `apiclient -v` does.
pub async fn run(client: &Client, args: RequestArgs, verbose: bool) -> Result<Output, CliError> {
    let Some(uri) = args.uri else {
        return Err(CliError::Usage(
            "a request needs --uri (-u), e.g. `apiclient -u /settings`".to_owned(),
        ));
    };
    let method = args.method.unwrap_or(Method::GET);
    let body = args.data.map(String::into_bytes);
    let response = client.call(method, &uri, body).await?;
    if verbose {
        match http::StatusCode::from_u16(response.status) {
            Ok(status) => crate::note!("{status}"),
            Err(_) => crate::note!("{}", response.status),
        }
    }
    Ok(Output::from_body(&response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(uri: Option<&str>, method: Option<Method>) -> RequestArgs {
        RequestArgs {
            uri: uri.map(str::to_owned),
            method,
            data: None,
        }
    }

    #[test]
    fn flags_before_and_after_raw_merge() {
        let merged = args(None, Some(Method::POST))
            .merged(args(Some("/x"), None))
            .ok();
        assert_eq!(merged.as_ref().and_then(|a| a.uri.as_deref()), Some("/x"));
        assert_eq!(merged.and_then(|a| a.method), Some(Method::POST));
        assert!(matches!(
            args(Some("/a"), None).merged(args(Some("/b"), None)),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn methods_are_case_insensitive() {
        assert_eq!(parse_method("post").ok(), Some(Method::POST));
        assert!(parse_method("NOT A METHOD").is_err());
    }
}
