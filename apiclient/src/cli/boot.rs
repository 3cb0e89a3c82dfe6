//! `apiclient boot status` and `apiclient boot wait`: where the host's boot is (Keel's
//! addition). `boot wait` is the gate units order after: exit 0 once configured, 1 with
//! the reason once failed, [`super::EXIT_TIMED_OUT`] on time-out; on a terminal it
//! shows the boot's progress on stderr as it goes.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::Value;

use super::output::{self, cell, millis_cell, Table};
use super::{CliError, Output};
use crate::client::Client;

/// Shows the host's boot, or waits for it to be configured
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
  apiclient boot status -o table
  apiclient boot status | jq '.steps[] | select(.outcome == \"failed\")'")]
    Status(StatusArgs),
    /// Waits until the boot is configured (exit 0) or failed (exit 1, with the reason)
    ///
    /// Exit status: 0 configured, 1 failed or rebooting for `reboot-to-reconcile` (the
    /// reason on stderr), 124 timed out (the
    /// phase reached on stderr, and why keeld did not answer), 2 usage error. keeld not
    /// answering (yet: no socket, a refused connection) is waited out; a socket this user
    /// may not open, or a path that cannot be one, fails at once (exit 1). On a terminal, each phase and step is shown on stderr as the boot reaches
    /// it.
    #[command(after_help = "\
Examples:
  apiclient boot wait
  apiclient boot wait --timeout 10m")]
    Wait(WaitArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub output: output::JsonByDefault,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Give up after this long (e.g. 90s, 10m); exit 124.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

pub async fn run(client: &Client, args: BootArgs) -> Result<Output, CliError> {
    match args.command {
        BootCommand::Status(status) => {
            output::render(status.output.output, client.get_json("/boot").await?, table)
        }
        BootCommand::Wait(wait) => wait_for(client, wait.timeout).await,
    }
}

/// The boot record for people: a summary line, then one row per step, a failed step's
/// detail (or any step's) on its own line below it.
pub fn table(record: &Value) -> Result<String, CliError> {
    if !record.is_object() {
        return Err(CliError::Invalid(
            "GET /boot did not answer a boot record".into(),
        ));
    }
    let mut text = format!(
        "phase: {}   first boot: {}   took: {}\n",
        cell(record, "phase"),
        match record.get("first-boot").and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        },
        millis_cell(record.get("duration-ms")),
    );
    if let Some(reason) = record.get("reason").and_then(Value::as_str) {
        text.push_str(&format!("reason: {reason}\n"));
    }
    let show = |p: &str| {
        if p.is_empty() {
            "none".to_owned()
        } else {
            p.to_owned()
        }
    };
    if let Some(booted) = record.get("booted-parameters").and_then(Value::as_str) {
        text.push_str(&format!("boot parameters: {}\n", show(booted)));
    }
    if let Some(failed) = record.get("failed-parameters").and_then(Value::as_str) {
        text.push_str(&format!(
            "boot parameters not kept: {} (the boot that tried them did not reach \
             configured; set settings.boot again to try others)\n",
            show(failed)
        ));
    }
    let steps = record
        .get("steps")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    if steps.is_empty() {
        return Ok(text);
    }
    let mut table = Table::new(&["STEP", "OUTCOME", "ESSENTIAL", "DURATION", "STARTED"]);
    for step in steps {
        let detail = step.get("detail").and_then(Value::as_str);
        table.row(
            vec![
                cell(step, "name"),
                cell(step, "outcome"),
                match step.get("essential").and_then(Value::as_bool) {
                    Some(true) => "yes".to_owned(),
                    _ => "no".to_owned(),
                },
                millis_cell(step.get("duration-ms")),
                cell(step, "started"),
            ],
            detail.map(|d| format!("detail: {d}")).into_iter().collect(),
        );
    }
    text.push('\n');
    text.push_str(&table.render());
    Ok(text)
}

async fn wait_for(client: &Client, timeout: Option<Duration>) -> Result<Output, CliError> {
    // A limit past what the clock can hold is no limit.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut last_phase = String::new();
    let mut progress = std::io::stderr()
        .is_terminal()
        .then(|| Progress::new(Instant::now()));
    loop {
        // keeld may be (re)starting: a refused connection is waited out, not fatal. A
        // request is bounded by the deadline too: behind a socket that systemd holds
        // (socket activation) the connection succeeds while nobody answers.
        let polled = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), client.get_json("/boot")).await,
            None => Ok(client.get_json("/boot").await),
        };
        // Why keeld did not answer this poll, for the timeout's message.
        let unanswered = match polled {
            Err(_elapsed) => Some("no answer".to_owned()),
            Ok(Ok(record)) => {
                if let Some(progress) = progress.as_mut() {
                    for line in progress.lines(&record, Instant::now()) {
                        crate::note!("{line}");
                    }
                }
                let phase = record
                    .get("phase")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                match phase.as_str() {
                    "configured" => return Ok(Output::Text("configured".into())),
                    "failed" | "rebooting" => {
                        let reason = record
                            .get("reason")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason recorded");
                        let what = if phase == "failed" {
                            "boot failed"
                        } else {
                            "the host is rebooting instead of reaching configured"
                        };
                        return Err(CliError::Invalid(format!("{what}: {reason}")));
                    }
                    _ => last_phase = phase,
                }
                None
            }
            Ok(Err(e)) if e.is_connection() => Some(e.to_string()),
            Ok(Err(e)) => return Err(e.into()),
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let phase = match (last_phase.as_str(), &unanswered) {
                ("", Some(why)) => format!("unknown (keeld not answering: {why})"),
                ("", None) => "unknown".to_owned(),
                (phase, Some(why)) => format!("{phase} (then keeld stopped answering: {why})"),
                (phase, None) => phase.to_owned(),
            };
            return Err(CliError::TimedOut(format!(
                "timed out waiting for the boot; phase: {phase}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `boot wait` has already shown: the phase, and each step's outcome. Each poll
/// yields the lines for what changed since, stamped with the time since the wait began.
#[derive(Debug)]
pub struct Progress {
    began: Instant,
    phase: Option<String>,
    steps: BTreeMap<String, String>,
}

impl Progress {
    pub fn new(began: Instant) -> Self {
        Self {
            began,
            phase: None,
            steps: BTreeMap::new(),
        }
    }

    /// The lines to show for `record`, polled at `now`: `[  1.2s] phase: apply` when the
    /// phase changed, `[  1.3s]   commit: succeeded (12ms)` when a step started or ended.
    pub fn lines(&mut self, record: &Value, now: Instant) -> Vec<String> {
        let stamp = format!("[{:>5.1}s]", now.duration_since(self.began).as_secs_f64());
        let mut lines = Vec::new();
        let steps = record
            .get("steps")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for step in steps {
            let (Some(name), Some(outcome)) = (
                step.get("name").and_then(Value::as_str),
                step.get("outcome").and_then(Value::as_str),
            ) else {
                continue;
            };
            if self.steps.get(name).map(String::as_str) == Some(outcome) {
                continue;
            }
            self.steps.insert(name.to_owned(), outcome.to_owned());
            let mut line = format!("{stamp}   {name}: {outcome}");
            if outcome != "running" {
                if let Some(ms) = step.get("duration-ms").filter(|v| v.is_u64()) {
                    line.push_str(&format!(" ({})", millis_cell(Some(ms))));
                }
            }
            if outcome == "failed" {
                if let Some(detail) = step.get("detail").and_then(Value::as_str) {
                    line.push_str(&format!(": {detail}"));
                }
            }
            lines.push(line);
        }
        if let Some(phase) = record.get("phase").and_then(Value::as_str) {
            if self.phase.as_deref() != Some(phase) {
                self.phase = Some(phase.to_owned());
                lines.push(format!("{stamp} phase: {phase}"));
            }
        }
        lines
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_shows_each_change_once() {
        let began = Instant::now();
        let mut progress = Progress::new(began);
        let at = |ms| began + Duration::from_millis(ms);
        let record = json!({"phase": "user-data", "steps": [
            {"name": "defaults", "outcome": "succeeded", "duration-ms": 3},
            {"name": "user-data:file", "outcome": "running"}
        ]});
        assert_eq!(
            progress.lines(&record, at(100)),
            [
                "[  0.1s]   defaults: succeeded (3ms)",
                "[  0.1s]   user-data:file: running",
                "[  0.1s] phase: user-data",
            ]
        );
        assert!(progress.lines(&record, at(200)).is_empty(), "nothing new");
        let record = json!({"phase": "failed", "steps": [
            {"name": "defaults", "outcome": "succeeded", "duration-ms": 3},
            {"name": "user-data:file", "outcome": "failed", "duration-ms": 1500,
             "detail": "line 3: bad key"}
        ]});
        assert_eq!(
            progress.lines(&record, at(1700)),
            [
                "[  1.7s]   user-data:file: failed (1.5s): line 3: bad key",
                "[  1.7s] phase: failed",
            ]
        );
    }

    #[test]
    fn the_table_sums_up_then_lists_steps() {
        let record = json!({
            "phase": "failed", "first-boot": true, "duration-ms": 2500,
            "reason": "bootstrap container setup failed",
            "steps": [
                {"name": "commit", "outcome": "succeeded", "essential": true,
                 "started": "2026-01-01T00:00:00Z", "duration-ms": 12},
                {"name": "bootstrap-container:setup", "outcome": "failed", "essential": true,
                 "started": "2026-01-01T00:00:01Z", "duration-ms": 2000, "detail": "exit code 3"}
            ]
        });
        let text = table(&record).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "phase: failed   first boot: yes   took: 2.5s");
        assert_eq!(lines[1], "reason: bootstrap container setup failed");
        assert!(lines[3].starts_with("STEP"), "{text}");
        assert!(
            lines[5].contains("failed") && lines[5].contains("2.0s"),
            "{text}"
        );
        assert_eq!(lines[6], "  detail: exit code 3");
        assert!(table(&json!([])).is_err());
    }

    #[test]
    fn the_table_names_boot_parameters_that_were_not_kept() {
        let record = json!({
            "phase": "configured", "first-boot": false, "duration-ms": 900,
            "booted-parameters": "", "failed-parameters": "rdinit=/nonexistent", "steps": []
        });
        let text = table(&record).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "boot parameters: none");
        assert!(
            lines[2].starts_with("boot parameters not kept: rdinit=/nonexistent (the boot"),
            "{text}"
        );
    }
}
