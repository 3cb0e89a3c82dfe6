//! `apiclient boot status` and `apiclient boot wait`: where the host's boot is (Keel's
//! addition). `boot wait` is the gate units order after: exit 0 once configured, 1 with
//! the reason once failed (or on time-out).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::Value;

use super::{CliError, Output};
use crate::client::Client;

#[derive(Debug, Args)]
pub struct BootArgs {
    #[command(subcommand)]
    pub command: BootCommand,
}

#[derive(Debug, Subcommand)]
pub enum BootCommand {
    /// Prints the boot record: phase, each step's outcome and timing, failure reason
    #[command(after_help = "\
Examples:
  apiclient boot status
  apiclient boot status | jq '.steps[] | select(.outcome == \"failed\")'")]
    Status,
    /// Waits until the boot is configured (exit 0) or failed (exit 1, with the reason)
    #[command(after_help = "\
Examples:
  apiclient boot wait
  apiclient boot wait --timeout 10m")]
    Wait(WaitArgs),
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Give up after this long (e.g. 90s, 10m); exit 1.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

pub async fn run(client: &Client, args: BootArgs) -> Result<Output, CliError> {
    match args.command {
        BootCommand::Status => Ok(Output::Json(client.get_json("/boot").await?)),
        BootCommand::Wait(wait) => wait_for(client, wait.timeout).await,
    }
}

async fn wait_for(client: &Client, timeout: Option<Duration>) -> Result<Output, CliError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut last_phase = String::new();
    loop {
        // keeld may be (re)starting: a refused connection is waited out, not fatal.
        match client.get_json("/boot").await {
            Ok(record) => {
                let phase = record
                    .get("phase")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                match phase.as_str() {
                    "configured" => return Ok(Output::Text("configured".into())),
                    "failed" => {
                        let reason = record
                            .get("reason")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason recorded");
                        return Err(CliError::Invalid(format!("boot failed: {reason}")));
                    }
                    _ => last_phase = phase,
                }
            }
            Err(e) if e.is_connection() => {}
            Err(e) => return Err(e.into()),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let phase = if last_phase.is_empty() {
                "unknown (keeld not answering)"
            } else {
                &last_phase
            };
            return Err(CliError::Invalid(format!(
                "timed out waiting for the boot; phase: {phase}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
