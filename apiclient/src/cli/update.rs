//! `apiclient update check | apply [--check] [--reboot] | cancel`: Bottlerocket's update
//! commands, made synchronous as Bottlerocket's apiclient makes them: note the timestamp
//! of the last command, send the action, then poll `/updates/status` (waiting out 423
//! while the command runs) until a command of that type with a new timestamp shows, and
//! require it to have succeeded.
//!
//! Owns the waiting and what the user sees meanwhile. Progress of a download goes to
//! stderr (the only thing a command here writes itself; stdout stays the status, in the
//! `-o` format): a bar redrawn in place on a terminal, a plain line every 10% (and at the
//! end) otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use http::Method;
use serde_json::Value;

use super::output::{self, cell, list_cell, Format, Table};
use super::{CliError, Output};
use crate::client::Client;

#[derive(Debug, Args)]
pub struct UpdateArgs {
    #[command(subcommand)]
    pub command: UpdateCommand,

    /// How the update status is printed: `json` (the default: keeld's answer, as
    /// Bottlerocket's apiclient prints it), `table` or `yaml`.
    #[arg(
        short = 'o',
        long,
        value_name = "FORMAT",
        value_enum,
        default_value = "json",
        global = true
    )]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    /// Refreshes the list of updates and prints the update status
    #[command(after_help = "\
Examples:
  apiclient update check
  apiclient update check -o table
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
    let status = match args.command {
        UpdateCommand::Check => check(client).await.map_err(context("check for updates")),
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
        .map_err(context("cancel update")),
    }?;
    output::render(args.output, status, table)
}

/// The update status for people: one row, with the offered versions, why the choice
/// was made and a failed command's reason below it.
pub fn table(status: &Value) -> Result<String, CliError> {
    if !status.is_object() {
        return Err(CliError::Invalid(
            "GET /updates/status did not answer an object".into(),
        ));
    }
    let image = |partition: &Value| {
        let image = &partition["image"];
        match (image["version"].as_str(), partition["slot"].as_str()) {
            (Some(version), Some(slot)) => format!("{version} (slot {slot})"),
            (Some(version), None) => version.to_owned(),
            _ => "-".to_owned(),
        }
    };
    let running = &status["active_partition"];
    let staged = &status["staging_partition"];
    let next = if running["next_to_boot"] == true {
        image(running)
    } else if staged["next_to_boot"] == true {
        image(staged)
    } else {
        "-".to_owned()
    };
    let last = &status["most_recent_command"];
    let command = if last.is_object() {
        format!("{} {}", cell(last, "cmd_type"), cell(last, "cmd_status"))
    } else {
        "-".to_owned()
    };
    let mut notes = vec![format!(
        "available: {}",
        list_cell(status.get("available_updates"), 8)
    )];
    if let Some(reason) = status["chosen_update_reason"].as_str() {
        notes.push(format!("why: {reason}"));
    }
    match last["stderr"].as_str() {
        Some(stderr) if !stderr.is_empty() => notes.push(format!("error: {stderr}")),
        _ => {}
    }
    let mut table = Table::new(&["STATE", "RUNNING", "CHOSEN", "STAGED", "NEXT BOOT", "LAST"]);
    table.row(
        vec![
            cell(status, "update_state"),
            image(running),
            status["chosen_update"]["version"]
                .as_str()
                .unwrap_or("-")
                .to_owned(),
            if staged.is_object() {
                image(staged)
            } else {
                "-".to_owned()
            },
            next,
            command,
        ],
        notes,
    );
    Ok(table.render())
}

/// How long each command is waited for. keeld bounds each command itself (a refresh by
/// `--update-metadata-timeout`, 10 min; a prepare by that, then
/// `--update-download-timeout`, 2 h): the waits for a refresh and a prepare outlast
/// those defaults. A keeld given longer limits may outlast them; the timeout's message
/// then says that `apiclient update check` shows where the command is.
const REFRESH: Duration = Duration::from_secs(12 * 60);
const PREPARE: Duration = Duration::from_secs(2 * 3600 + 15 * 60);
const ACTIVATE: Duration = Duration::from_secs(120);
const CANCEL: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(250);

async fn check(client: &Client) -> Result<Value, CliError> {
    wait_for(client, "refresh-updates", "refresh", REFRESH, &mut Quiet).await
}

async fn apply(client: &Client, args: ApplyArgs) -> Result<Value, CliError> {
    if args.check {
        let status = check(client).await?;
        match status["update_state"].as_str() {
            Some("Idle") => {
                let reason = status["chosen_update_reason"].as_str().unwrap_or("");
                note(&format!("No update to apply. {reason}"));
                return Ok(status);
            }
            Some("Ready") => {
                note("An update is already applied: reboot for it to take effect, or `apiclient update cancel`.");
                return Ok(status);
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
    Ok(status)
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
    fn the_status_table_shows_the_state_the_slots_and_why() {
        let status = serde_json::json!({
            "update_state": "Ready",
            "available_updates": ["1.1.0", "1.0.0"],
            "chosen_update": {"arch": "x86_64", "version": "1.1.0", "variant": "keel-qemu"},
            "active_partition": {
                "image": {"arch": "x86_64", "version": "1.0.0", "variant": "keel-qemu"},
                "next_to_boot": false,
                "slot": "a"
            },
            "staging_partition": {
                "image": {"arch": "x86_64", "version": "1.1.0", "variant": "keel-qemu"},
                "next_to_boot": true,
                "slot": "b"
            },
            "most_recent_command": {
                "cmd_type": "activate",
                "cmd_status": "Success",
                "timestamp": "2026-12-04T18:33:19.628944900Z",
                "exit_status": 0,
                "stderr": ""
            },
            "chosen_update_reason": "1.1.0 is the newest released to this host"
        });
        assert_eq!(
            table(&status).expect("a table"),
            "STATE  RUNNING         CHOSEN  STAGED          NEXT BOOT       LAST\n\
             Ready  1.0.0 (slot a)  1.1.0   1.1.0 (slot b)  1.1.0 (slot b)  activate Success\n\
             \x20 available: 1.1.0, 1.0.0\n\
             \x20 why: 1.1.0 is the newest released to this host\n"
        );
        // A failed command's reason, and nothing staged.
        let failed = serde_json::json!({
            "update_state": "Available",
            "available_updates": [],
            "chosen_update": null,
            "active_partition": {"image": {"version": "1.0.0"}, "next_to_boot": true, "slot": "a"},
            "staging_partition": null,
            "most_recent_command": {
                "cmd_type": "prepare", "cmd_status": "Failed", "stderr": "the repository stalled"
            }
        });
        let text = table(&failed).expect("a table");
        assert!(
            text.contains(
                "Available  1.0.0 (slot a)  -       -       1.0.0 (slot a)  prepare Failed"
            ),
            "{text}"
        );
        assert!(text.contains("  available: -\n"), "{text}");
        assert!(text.contains("  error: the repository stalled\n"), "{text}");
        assert!(table(&serde_json::json!([])).is_err());
    }

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
