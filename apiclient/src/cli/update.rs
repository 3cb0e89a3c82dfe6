//! `apiclient update check | apply [--check] [--reboot] | cancel`: Bottlerocket's update
//! commands, made synchronous as Bottlerocket's apiclient makes them: note the timestamp
//! of the last command, send the action, then poll `/updates/status` (waiting out 423
//! while the command runs) until a command of that type with a new timestamp shows, and
//! require it to have succeeded.
//!
//! Owns the waiting and what the user sees meanwhile. Progress of a download goes to
//! stderr (the only thing a command here writes itself; stdout stays the JSON status): a
//! bar redrawn in place on a terminal, a plain line every 10% (and at the end) otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use http::Method;
use serde_json::Value;

use super::{CliError, Output};
use crate::client::Client;

#[derive(Debug, Args)]
pub struct UpdateArgs {
    #[command(subcommand)]
    pub command: UpdateCommand,
}

#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    /// Refreshes the list of updates and prints the update status
    #[command(after_help = "\
Examples:
  apiclient update check
  apiclient update check | jq -r '.chosen_update.version // \"none\"'")]
    Check,
    /// Downloads the chosen update into the inactive slot and makes it the next boot
    #[command(after_help = "\
Examples:
  apiclient update apply --check
  apiclient update apply --check --reboot")]
    Apply(ApplyArgs),
    /// Deactivates an applied update: the running slot boots next again
    Cancel,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Run `update check` first, and stop if there is nothing to apply.
    #[arg(short = 'c', long)]
    pub check: bool,
    /// Reboot into the update once it is applied.
    #[arg(short = 'r', long)]
    pub reboot: bool,
}

pub async fn run(client: &Client, args: UpdateArgs) -> Result<Output, CliError> {
    // An update command that ran and failed reads as Bottlerocket's apiclient has it; an
    // API refusal keeps its `Status <code> when …` line.
    let context = |what: &'static str| {
        move |e: CliError| match e {
            CliError::Invalid(reason) => CliError::Invalid(format!("Failed to {what}: {reason}")),
            other => other,
        }
    };
    match args.command {
        UpdateCommand::Check => check(client)
            .await
            .map(Output::Json)
            .map_err(context("check for updates")),
        UpdateCommand::Apply(apply_args) => apply(client, apply_args)
            .await
            .map_err(context("apply update")),
        UpdateCommand::Cancel => wait_for(
            client,
            "deactivate-update",
            "deactivate",
            CANCEL,
            &mut Quiet,
        )
        .await
        .map(Output::Json)
        .map_err(context("cancel update")),
    }
}

/// How long each command is waited for.
const REFRESH: Duration = Duration::from_secs(120);
const PREPARE: Duration = Duration::from_secs(3600);
const ACTIVATE: Duration = Duration::from_secs(120);
const CANCEL: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(250);

async fn check(client: &Client) -> Result<Value, CliError> {
    wait_for(client, "refresh-updates", "refresh", REFRESH, &mut Quiet).await
}

async fn apply(client: &Client, args: ApplyArgs) -> Result<Output, CliError> {
    if args.check {
        let status = check(client).await?;
        match status["update_state"].as_str() {
            Some("Idle") => {
                let reason = status["chosen_update_reason"].as_str().unwrap_or("");
                note(&format!("No update to apply. {reason}"));
                return Ok(Output::Json(status));
            }
            Some("Ready") => {
                note("An update is already applied: reboot for it to take effect, or `apiclient update cancel`.");
                return Ok(Output::Json(status));
            }
            _ => {}
        }
    }
    let status = current(client).await?;
    let version = status["chosen_update"]["version"]
        .as_str()
        .unwrap_or("the chosen update")
        .to_owned();
    let slot = status["active_partition"]["slot"]
        .as_str()
        .map(|s| if s == "a" { "b" } else { "a" })
        .unwrap_or("the inactive slot");
    note(&format!(
        "Downloading and writing {version} to slot {slot}..."
    ));
    let mut bar = ProgressView::new(std::io::stderr().is_terminal());
    wait_for(client, "prepare-update", "prepare", PREPARE, &mut bar)
        .await
        // A prepare that ran and failed gets the way out; an API refusal (409, 404) keeps
        // its `Status <code> when …` line, as every command's.
        .map_err(|e| match e {
            CliError::Invalid(reason) => CliError::Invalid(format!(
                "{reason}. `apiclient update check` shows the state; a Ready update can be \
                 cancelled with `apiclient update cancel`"
            )),
            other => other,
        })?;
    bar.finish();
    note(&format!(
        "{version} is written to slot {slot} and verified."
    ));
    note("Marking the update for the next boot...");
    let status = wait_for(client, "activate-update", "activate", ACTIVATE, &mut Quiet).await?;
    if args.reboot {
        note("Rebooting...");
        client.call(Method::POST, "/actions/reboot", None).await?;
    } else {
        note("The update will take effect at the next reboot.");
    }
    Ok(Output::Json(status))
}

fn note(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{text}");
}

/// The status, whether a command runs (423: under `update_status`) or not.
async fn current(client: &Client) -> Result<Value, CliError> {
    let response = client.request(Method::GET, "/updates/status", None).await?;
    match response.status {
        200 => status_body(&response),
        423 => Ok(status_body(&response)?["update_status"].clone()),
        code => Err(CliError::Client(crate::error::ClientError::Status {
            code,
            method: "GET".to_owned(),
            uri: "/updates/status".to_owned(),
            body: response.text().trim_end().to_owned(),
        })),
    }
}

/// The JSON object of a `GET /updates/status` answer (200, or 423 while a command
/// runs). Anything else is an error: read as `null`, it would leave a command waiting
/// out its whole timeout for a status it can never see.
fn status_body(response: &crate::client::Response) -> Result<Value, CliError> {
    let error = |found: String| {
        CliError::Client(crate::error::ClientError::Shape {
            method: "GET".to_owned(),
            uri: "/updates/status".to_owned(),
            expected: "a JSON object",
            found,
        })
    };
    match response.json() {
        Ok(Some(body)) if body.is_object() => Ok(body),
        Ok(Some(other)) => Err(error(other.to_string().chars().take(80).collect())),
        Ok(None) => Err(error("empty".to_owned())),
        Err(e) => Err(error(format!("no JSON ({e})"))),
    }
}

/// What to show while waiting.
trait Watch {
    fn update(&mut self, status: &Value);
}

struct Quiet;

impl Watch for Quiet {
    fn update(&mut self, _status: &Value) {}
}

/// Download progress: a bar on a terminal, lines otherwise.
struct ProgressView {
    terminal: bool,
    last_tenth: Option<u64>,
    drawn: bool,
    started: Instant,
    /// The download's size, once seen.
    total: Option<u64>,
}

impl ProgressView {
    fn new(terminal: bool) -> Self {
        ProgressView {
            terminal,
            last_tenth: None,
            drawn: false,
            started: Instant::now(),
            total: None,
        }
    }

    /// The download is complete (the command succeeded): the line at 100%.
    fn finish(&mut self) {
        let Some(total) = self.total else {
            return;
        };
        let line = progress_line(total, total, self.started.elapsed(), 30);
        if self.terminal {
            note(&format!("\r{line}"));
        } else if self.last_tenth != Some(10) {
            note(&line);
        }
    }
}

/// `done`/`total` as a line: `[#####     ]  50%  64.0/128.0 MiB  21.3 MiB/s`.
pub fn progress_line(done: u64, total: u64, elapsed: Duration, width: usize) -> String {
    let fraction = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = ((fraction * width as f64).round() as usize).min(width);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let rate = if elapsed.as_secs_f64() > 0.0 {
        mib(done) / elapsed.as_secs_f64()
    } else {
        0.0
    };
    format!(
        "[{}{}] {:>3}%  {:.1}/{:.1} MiB  {:.1} MiB/s",
        "#".repeat(filled),
        " ".repeat(width - filled),
        (fraction * 100.0).floor() as u64,
        mib(done),
        mib(total),
        rate
    )
}

impl Watch for ProgressView {
    fn update(&mut self, status: &Value) {
        let progress = &status["running_command"]["progress"];
        let (Some(done), Some(total)) = (
            progress["bytes_done"].as_u64(),
            progress["bytes_total"].as_u64(),
        ) else {
            return;
        };
        self.total = Some(total);
        let line = progress_line(done, total, self.started.elapsed(), 30);
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(stderr, "\r{line}");
            let _ = stderr.flush();
            self.drawn = true;
        } else {
            // keeld's figures, whatever they are: no overflow, a tenth in 0..=10.
            let tenth = (u128::from(done) * 10)
                .checked_div(u128::from(total))
                .map_or(10, |t| u64::try_from(t.min(10)).unwrap_or(10));
            if self.last_tenth != Some(tenth) {
                self.last_tenth = Some(tenth);
                let _ = writeln!(stderr, "{line}");
            }
        }
    }
}

/// Sends `action` and waits until a `cmd_type` command newer than the one before shows
/// in the status; answers the status, or the command's failure.
async fn wait_for(
    client: &Client,
    action: &str,
    cmd_type: &str,
    timeout: Duration,
    watch: &mut dyn Watch,
) -> Result<Value, CliError> {
    let before = current(client).await?["most_recent_command"]["timestamp"].clone();
    let uri = format!("/actions/{action}");
    client.call(Method::POST, &uri, None).await?;
    let deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep(POLL).await;
        let response = client.request(Method::GET, "/updates/status", None).await?;
        let status = match response.status {
            423 => {
                watch.update(&status_body(&response)?["update_status"]);
                None
            }
            200 => Some(status_body(&response)?),
            code => {
                return Err(CliError::Client(crate::error::ClientError::Status {
                    code,
                    method: "GET".to_owned(),
                    uri: "/updates/status".to_owned(),
                    body: response.text().trim_end().to_owned(),
                }))
            }
        };
        if let Some(status) = status {
            let command = &status["most_recent_command"];
            if command["cmd_type"] == cmd_type && command["timestamp"] != before {
                if command["cmd_status"] == "Success" {
                    return Ok(status);
                }
                return Err(CliError::Invalid(format!(
                    "{cmd_type} attempt failed with status '{}' ({}): {}",
                    command["cmd_status"].as_str().unwrap_or("?"),
                    command["exit_status"],
                    command["stderr"].as_str().unwrap_or("")
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(CliError::Invalid(format!(
                "timed out after {} waiting for {action} to finish; `apiclient update check` \
                 shows where it is",
                humantime::format_duration(timeout)
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_shows_share_bytes_and_rate() {
        assert_eq!(
            progress_line(64 << 20, 128 << 20, Duration::from_secs(2), 10),
            "[#####     ]  50%  64.0/128.0 MiB  32.0 MiB/s"
        );
        assert_eq!(
            progress_line(0, 0, Duration::ZERO, 4),
            "[####] 100%  0.0/0.0 MiB  0.0 MiB/s"
        );
    }
}
