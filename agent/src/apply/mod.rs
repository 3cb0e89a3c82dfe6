//! Apply: make the host follow committed settings.
//!
//! Owns the services metadata and, per apply, the record of what was done. Rendering
//! templates into the render root and running restart commands are not implemented yet
//! (tracked in the apply issue): today an apply resolves which services the changed keys
//! affect, logs them and records the outcome, so the API contract (`/tx/apply`,
//! `commit_and_apply` answering after apply) is already the final one.

pub mod services;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub use services::{ServicesError, ServicesMeta};

/// What one apply did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ApplyReport {
    pub time: String,
    pub keys: Vec<String>,
    pub affected_services: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct Applier {
    meta: Arc<ServicesMeta>,
    last: Arc<Mutex<Option<ApplyReport>>>,
}

impl Applier {
    pub fn new(meta: Arc<ServicesMeta>) -> Self {
        Applier {
            meta,
            last: Arc::default(),
        }
    }

    pub fn meta(&self) -> &ServicesMeta {
        &self.meta
    }

    /// Applies the given changed keys.
    pub async fn apply(&self, keys: &[String]) -> ApplyReport {
        let affected_services = keys
            .iter()
            .flat_map(|k| self.meta.affected_by(k))
            .collect();
        let report = ApplyReport {
            time: crate::store::now_rfc3339(),
            keys: keys.to_vec(),
            affected_services,
        };
        tracing::info!(keys = ?report.keys, services = ?report.affected_services, "applied settings");
        if let Ok(mut last) = self.last.lock() {
            *last = Some(report.clone());
        }
        report
    }

    pub fn last_report(&self) -> Option<ApplyReport> {
        self.last.lock().ok().and_then(|l| l.clone())
    }
}
