//! The sequence `set`, `apply` and `unset` share: fill a fresh transaction, commit and
//! apply it, and discard it (best effort) if any step fails, so that a refused change
//! never lingers as a pending transaction.

use crate::client::Client;
use crate::error::ClientError;
use crate::transaction::Transaction;

/// One step that fills the transaction (a PATCH).
pub enum Fill<'a> {
    Settings(&'a serde_json::Value),
    Keypairs(&'a [String]),
}

/// Runs `fills` in order in a new `apiclient-<kind>-…` transaction, then commits and
/// applies it; returns the JSON array of changed keys. On failure the transaction is
/// discarded and the first error is returned.
pub async fn fill_and_commit(
    client: &Client,
    kind: &str,
    fills: &[Fill<'_>],
) -> Result<serde_json::Value, ClientError> {
    let tx = Transaction::new(client, kind);
    match fill_then_commit(&tx, fills).await {
        Ok(changed) => Ok(changed),
        Err(error) => {
            // Best effort: the original error is what the user needs to see.
            let _ = tx.discard().await;
            Err(error)
        }
    }
}

async fn fill_then_commit(
    tx: &Transaction<'_>,
    fills: &[Fill<'_>],
) -> Result<serde_json::Value, ClientError> {
    for fill in fills {
        match fill {
            Fill::Settings(patch) => tx.patch_settings(patch).await?,
            Fill::Keypairs(pairs) => tx.patch_keypairs(pairs).await?,
        }
    }
    tx.commit_and_apply().await
}
