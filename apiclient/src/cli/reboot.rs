//! `apiclient reboot`: asks keeld to reboot the host (`POST /actions/reboot`), as
//! Bottlerocket's `apiclient reboot` does.

use clap::Args;
use http::Method;

use super::{CliError, Output};
use crate::client::Client;

/// Reboots the host (keeld runs its configured reboot command)
///
/// Prints nothing; exits 0 once keeld has accepted the request.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  apiclient reboot")]
pub struct RebootArgs {}

pub async fn run(client: &Client, _args: RebootArgs) -> Result<Output, CliError> {
    client.call(Method::POST, "/actions/reboot", None).await?;
    Ok(Output::Nothing)
}
