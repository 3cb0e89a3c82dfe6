//! `apiclient raw`: one request exactly as given, for endpoints without a subcommand.

use clap::Args;
use http::Method;

use super::{CliError, Output};
use crate::client::Client;

/// Sends one request and prints the answer (pretty if it is JSON)
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient raw -u /tx/list
  apiclient raw -u '/settings?keys=settings.motd'
  apiclient raw -m PATCH -u '/settings?tx=demo' -d '{\"motd\":\"hi\"}'
  apiclient raw -m DELETE -u '/tx?tx=demo'")]
pub struct RawArgs {
    /// Request target, `/path?query`, already percent-encoded.
    #[arg(short = 'u', long)]
    pub uri: String,

    /// HTTP method.
    #[arg(short = 'm', long, default_value = "GET", value_parser = parse_method)]
    pub method: Method,

    /// Request body (JSON).
    #[arg(short = 'd', long)]
    pub data: Option<String>,
}

fn parse_method(text: &str) -> Result<Method, String> {
    Method::from_bytes(text.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{text:?} is not an HTTP method"))
}

pub async fn run(client: &Client, args: RawArgs) -> Result<Output, CliError> {
    let body = args.data.map(String::into_bytes);
    let response = client.call(args.method, &args.uri, body).await?;
    Ok(Output::from_body(&response))
}
