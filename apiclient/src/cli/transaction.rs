//! The sequences `set`, `apply` and `unset` share. Normally: fill a fresh transaction,
//! commit and apply it, and discard it (best effort) if any step fails, so that a refused
//! change never lingers as a pending transaction; then report an apply that failed after
//! the commit. With `--dry-run`: fill it, ask keeld what committing it would change, and
//! discard it whatever happened.

use clap::Args;
use http::Method;
use serde_json::Value;

use super::output::{self, Format};
use super::{color, report};
use super::{CliError, Output};
use crate::client::Client;
use crate::error::ClientError;
use crate::transaction::{ApplyId, ApplyStatus, Commit, Transaction};
use crate::uri::with_query;

/// One step that fills the transaction (a PATCH).
pub enum Fill<'a> {
    Settings(&'a serde_json::Value),
    Keypairs(&'a [String]),
}

/// The flags `set`, `apply` and `unset` share.
#[derive(Debug, Clone, Default, Args)]
pub struct DryRunArgs {
    /// Show what would change (settings, then file diffs, then a summary) and change
    /// nothing: the transaction is discarded afterwards.
    #[arg(long)]
    pub dry_run: bool,

    /// How to print the --dry-run report: `table` (the default: settings and file
    /// diffs, coloured on a terminal), `json` or `yaml` (keeld's answer to
    /// `POST /tx/dry-run`). Not `--json`: for `set`, that flag gives the settings.
    #[arg(
        short = 'o',
        long,
        value_name = "FORMAT",
        value_enum,
        requires = "dry_run"
    )]
    pub output: Option<Format>,
}

/// Fills a new `apiclient-<kind>-…` transaction with `fills`, then commits and applies it
/// or, with `--dry-run`, reports what that would change. Prints nothing on success
/// unless dry-running.
pub async fn change(
    client: &Client,
    kind: &str,
    fills: &[Fill<'_>],
    args: &DryRunArgs,
) -> Result<Output, CliError> {
    if args.dry_run {
        let answer = fill_and_dry_run(client, kind, fills).await?;
        return output::render(args.output.unwrap_or(Format::Table), answer, |answer| {
            Ok(report::dry_run_report(answer, color::stdout_palette()))
        });
    }
    let commit = fill_and_commit(client, kind, fills).await?;
    check_apply(client, &commit).await?;
    Ok(Output::Nothing)
}

/// Runs `fills` in order in a new `apiclient-<kind>-…` transaction, then commits and
/// applies it; returns the changed keys and the apply's outcome. On failure the
/// transaction is discarded and the first error is returned. An apply that fails after
/// the commit is not an error here: see [`check_apply`].
pub async fn fill_and_commit(
    client: &Client,
    kind: &str,
    fills: &[Fill<'_>],
) -> Result<Commit, ClientError> {
    let tx = Transaction::new(client, kind);
    match fill_then_commit(&tx, fills).await {
        Ok(commit) => Ok(commit),
        Err(error) => {
            // Best effort: the original error is what the user needs to see.
            let _ = tx.discard().await;
            Err(error)
        }
    }
}

async fn fill(tx: &Transaction<'_>, fills: &[Fill<'_>]) -> Result<(), ClientError> {
    for fill in fills {
        match fill {
            Fill::Settings(patch) => tx.patch_settings(patch).await?,
            Fill::Keypairs(pairs) => tx.patch_keypairs(pairs).await?,
        }
    }
    Ok(())
}

async fn fill_then_commit(tx: &Transaction<'_>, fills: &[Fill<'_>]) -> Result<Commit, ClientError> {
    fill(tx, fills).await?;
    tx.commit_and_apply_checked().await
}

/// Runs `fills` in a new `apiclient-<kind>-…` transaction, asks keeld what committing it
/// would change (`POST /tx/dry-run`) and always discards it. Returns keeld's answer; the
/// first error otherwise (a failed discard counts: the transaction would linger).
pub async fn fill_and_dry_run(
    client: &Client,
    kind: &str,
    fills: &[Fill<'_>],
) -> Result<Value, ClientError> {
    let tx = Transaction::new(client, kind);
    let answer = match fill(&tx, fills).await {
        Ok(()) => tx.dry_run().await,
        Err(error) => Err(error),
    };
    let discarded = tx.discard().await;
    let answer = answer?;
    discarded?;
    Ok(answer)
}

/// Turns an apply that failed after its commit into [`CliError::ApplyFailed`], with the
/// failed files and commands from `GET /apply/log`.
pub async fn check_apply(client: &Client, commit: &Commit) -> Result<(), CliError> {
    let Some(apply) = commit.failed_apply() else {
        return Ok(());
    };
    let record = find_apply(client, apply).await;
    let record = record.as_ref().map_err(String::as_str);
    Err(CliError::ApplyFailed(report::apply_failure_text(
        apply.id.given(),
        record,
    )))
}

/// The apply's record in the log: the newest one if it has the right id (the usual
/// case), else searched for in the whole log (another apply came in between).
async fn find_apply(client: &Client, apply: ApplyStatus) -> Result<Value, String> {
    if apply.id == ApplyId::Unreadable {
        return Err(
            "keeld's x-keel-apply-id header could not be read: see `apiclient apply-log`"
                .to_owned(),
        );
    }
    let newest = fetch_applies(client, Some(1)).await?;
    let matches = |record: &Value| match apply.id.given() {
        Some(id) => record.get("id").and_then(Value::as_u64) == Some(id),
        None => true,
    };
    if let Some(record) = newest.into_iter().find(matches) {
        return Ok(record);
    }
    let all = fetch_applies(client, None).await?;
    all.into_iter()
        .find(matches)
        .ok_or_else(|| match apply.id.given() {
            Some(id) => format!("apply {id} is no longer in the apply log"),
            None => "the apply log is empty".to_owned(),
        })
}

async fn fetch_applies(client: &Client, limit: Option<usize>) -> Result<Vec<Value>, String> {
    let uri = apply_log_uri(limit);
    let log = client.get_json(&uri).await.map_err(|e| e.to_string())?;
    match log.get("applies") {
        Some(Value::Array(applies)) => Ok(applies.clone()),
        _ => Err(format!("the answer to GET {uri} has no `applies` list")),
    }
}

/// `/apply/log`, with `?limit=N` if given.
pub fn apply_log_uri(limit: Option<usize>) -> String {
    match limit {
        Some(limit) => with_query("/apply/log", &[("limit", &limit.to_string())]),
        None => "/apply/log".to_owned(),
    }
}

/// Reads a commit answer that is not a transaction's (`POST /history/rollback`) the same
/// way: body, then apply headers.
pub async fn post_commit(client: &Client, uri: &str) -> Result<Commit, ClientError> {
    let response = client.call(Method::POST, uri, None).await?;
    Commit::from_response(&Method::POST, uri, &response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_log_uris() {
        assert_eq!(apply_log_uri(None), "/apply/log");
        assert_eq!(apply_log_uri(Some(1)), "/apply/log?limit=1");
    }
}
