//! Applies that finish whatever happens to the request that asked for them.
//!
//! The settings are committed before the apply starts; if the apply ran inside the
//! request's future, a client that disconnects (Ctrl-C, a timeout) would cancel it half
//! way, kill a running restart command and leave no record. So the apply runs on its own
//! task and the request only waits for it.

use super::{Applier, ApplyReport};
use crate::store::Store;

impl Applier {
    /// Runs [`Applier::apply`] on its own task and waits for its report.
    pub async fn apply_detached(&self, store: &Store, keys: Vec<String>) -> ApplyReport {
        let applier = self.clone();
        let store = store.clone();
        let task = tokio::spawn(async move { applier.apply(&store, &keys).await });
        match task.await {
            Ok(report) => report,
            // The apply task panicked (a bug); say so rather than pretend it worked.
            Err(e) => ApplyReport::failed(format!("apply task failed: {e}")),
        }
    }
}
