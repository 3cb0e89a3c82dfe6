//! Dry runs: what committing a pending transaction would change (settings, services and
//! file diffs), computed from one snapshot, with nothing written.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{Applier, FileDiff};
use crate::store::{Snapshot, StoreError};

/// The answer of `POST /tx/dry-run`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DryRun {
    pub tx: String,
    pub changed_keys: Vec<String>,
    /// Per changed key, its `old` and `new` value (absent where there is none).
    pub settings: Map<String, Value>,
    pub services: BTreeMap<String, Vec<String>>,
    pub files: Vec<FileDiff>,
    /// Changed keys this host stores but does not act on (no component of Keel's
    /// reads them): "stored, no effect on this host".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub no_effect: Vec<String>,
}

/// Why a dry run has no answer.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    /// No such transaction, or the candidate is invalid.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The candidate cannot be rendered.
    #[error(transparent)]
    Render(#[from] super::render::RenderError),
}

impl Applier {
    /// What committing `tx` on top of `snapshot` would change. Renders and reads the
    /// render root: call it off the async workers.
    pub fn dry_run(&self, snapshot: &Snapshot, tx: &str) -> Result<DryRun, DryRunError> {
        let pending = snapshot
            .pending
            .get(tx)
            .ok_or_else(|| StoreError::NothingPending(tx.to_owned()))?;
        let live = snapshot.live_settings();
        let candidate = crate::store::candidate_of(live, pending)?;
        let changed = settings_model::patch::changed_keys(live, &candidate);
        let old = settings_model::patch::flatten(live);
        let new = settings_model::patch::flatten(&candidate);
        let settings = changed
            .iter()
            .map(|k| {
                let mut entry = Map::new();
                if let Some(v) = old.get(k) {
                    entry.insert("old".to_owned(), v.clone());
                }
                if let Some(v) = new.get(k) {
                    entry.insert("new".to_owned(), v.clone());
                }
                (k.clone(), Value::Object(entry))
            })
            .collect();
        let files = self.plan(&candidate, &changed)?;
        let no_effect = self.no_effect_keys(&candidate, &changed);
        Ok(DryRun {
            no_effect,
            tx: tx.to_owned(),
            services: self.affected(&changed),
            changed_keys: changed,
            settings,
            files,
        })
    }
}
