//! Apply: make the host follow committed settings.
//!
//! Owns the services metadata, rendering configuration files into the render root, and
//! running restart commands, plus the record of what each apply did. The store decides
//! *what* the settings are; this module only reads them. Three entry points:
//! [`Applier::check`] (commit-time test render, refusing a candidate that cannot render),
//! [`Applier::plan`] (dry run: settings and file diffs, nothing written) and
//! [`Applier::apply`] (render affected files, run restart commands, record the outcome).

pub mod files;
pub mod filters;
pub mod render;
pub mod restart;
pub mod services;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

pub use restart::CommandOutcome;
pub use services::{ServicesError, ServicesMeta};

use crate::store::{CheckError, CommitCheck, Store};
use render::{RenderError, Templates};

/// Applies kept in memory for `GET /apply/log`.
const LOG_SIZE: usize = 64;

/// What happened to one configuration file in an apply.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct FileOutcome {
    pub name: String,
    pub path: String,
    /// `written`, `unchanged` or `failed`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What one apply did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ApplyReport {
    pub id: u64,
    pub time: String,
    pub keys: Vec<String>,
    /// Affected services and the keys that affect each.
    pub services: BTreeMap<String, Vec<String>>,
    pub files: Vec<FileOutcome>,
    pub commands: Vec<CommandOutcome>,
    pub success: bool,
    /// A file of a service marked `reboot-required` changed: the change takes effect
    /// at the next boot.
    pub reboot_required: bool,
    pub duration_ms: u64,
}

/// A file that a transaction would change, for a dry run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileDiff {
    pub name: String,
    pub path: String,
    pub diff: String,
}

/// The knobs of an [`Applier`].
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    pub render_root: PathBuf,
    pub restart_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Applier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    meta: ServicesMeta,
    templates: Templates,
    config: ApplyConfig,
    os: Value,
    log: Mutex<VecDeque<ApplyReport>>,
    next_id: AtomicU64,
    reboot_required: AtomicBool,
    /// One apply at a time: each renders from the live settings of the moment it runs,
    /// so the last apply to finish leaves the files matching the newest generation.
    serial: tokio::sync::Mutex<()>,
}

impl Applier {
    pub fn new(meta: ServicesMeta, templates: Templates, config: ApplyConfig, os: Value) -> Self {
        Applier {
            inner: Arc::new(Inner {
                meta,
                templates,
                config,
                os,
                log: Mutex::new(VecDeque::new()),
                next_id: AtomicU64::new(1),
                reboot_required: AtomicBool::new(false),
                serial: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn meta(&self) -> &ServicesMeta {
        &self.inner.meta
    }

    /// Affected services, each with the keys that affect it.
    pub fn affected(&self, keys: &[String]) -> BTreeMap<String, Vec<String>> {
        let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for key in keys {
            for service in self.inner.meta.affected_by(key) {
                services.entry(service).or_default().push(key.clone());
            }
        }
        services
    }

    /// The configuration files of `services`, by name.
    fn files_of<'a>(&self, services: impl Iterator<Item = &'a String>) -> BTreeSet<String> {
        services
            .filter_map(|s| self.inner.meta.services.get(s))
            .flat_map(|s| s.configuration_files.iter().cloned())
            .collect()
    }

    fn render(&self, file: &str, settings: &Value) -> Result<String, RenderError> {
        let template = self
            .inner
            .meta
            .configuration_files
            .get(file)
            .map_or(file, |f| f.template_path.as_str());
        self.inner
            .templates
            .render(template, settings, &self.inner.os)
    }

    /// Renders every file the keys affect against `candidate`, writing nothing.
    pub fn check(&self, candidate: &Value, keys: &[String]) -> Result<(), RenderError> {
        let services = self.affected(keys);
        for file in self.files_of(services.keys()) {
            self.render(&file, candidate)?;
        }
        Ok(())
    }

    /// A dry run: the unified diff of every file that committing `candidate` would
    /// change under the render root.
    pub fn plan(&self, candidate: &Value, keys: &[String]) -> Result<Vec<FileDiff>, RenderError> {
        let services = self.affected(keys);
        let mut diffs = Vec::new();
        for name in self.files_of(services.keys()) {
            let Some(meta) = self.inner.meta.configuration_files.get(&name) else {
                continue;
            };
            let new = self.render(&name, candidate)?;
            let target = files::target_path(&self.inner.config.render_root, &meta.path);
            let old = target
                .as_ref()
                .and_then(|t| std::fs::read_to_string(t).ok())
                .unwrap_or_default();
            if old != new {
                let diff = similar::TextDiff::from_lines(&old, &new)
                    .unified_diff()
                    .context_radius(3)
                    .header(&format!("a{}", meta.path), &format!("b{}", meta.path))
                    .to_string();
                diffs.push(FileDiff {
                    name,
                    path: meta.path.clone(),
                    diff,
                });
            }
        }
        Ok(diffs)
    }

    /// Renders the files of the services that `keys` affect from the live settings,
    /// runs those services' restart commands, records and returns the outcome.
    pub async fn apply(&self, store: &Store, keys: &[String]) -> ApplyReport {
        let _serial = self.inner.serial.lock().await;
        let started = std::time::Instant::now();
        let snapshot = store.snapshot();
        let settings = snapshot.live_settings();
        let services = self.affected(keys);
        let mut report = ApplyReport {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            time: crate::store::now_rfc3339(),
            keys: keys.to_vec(),
            services: services.clone(),
            files: Vec::new(),
            commands: Vec::new(),
            success: true,
            reboot_required: false,
            duration_ms: 0,
        };
        let mut changed_services = BTreeSet::new();
        for service in services.keys() {
            let Some(def) = self.inner.meta.services.get(service) else {
                continue;
            };
            for name in &def.configuration_files {
                if report.files.iter().any(|f| &f.name == name) {
                    continue;
                }
                let outcome = self.write_file(name, settings);
                if outcome.result == "written" {
                    changed_services.insert(service.clone());
                    report.reboot_required |= def.reboot_required;
                }
                report.success &= outcome.result != "failed";
                report.files.push(outcome);
            }
        }
        for (service, service_keys) in &services {
            let Some(def) = self.inner.meta.services.get(service) else {
                continue;
            };
            for argv in &def.restart_commands {
                let outcome = restart::run(
                    service,
                    argv,
                    service_keys,
                    self.inner.config.restart_timeout,
                )
                .await;
                if !outcome.success {
                    tracing::warn!(service = %service, argv = ?argv, exit_code = ?outcome.exit_code,
                        timed_out = outcome.timed_out, error = ?outcome.error, "restart command failed");
                }
                report.success &= outcome.success;
                report.commands.push(outcome);
            }
        }
        if report.reboot_required {
            self.inner.reboot_required.store(true, Ordering::Relaxed);
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(id = report.id, keys = report.keys.len(), services = ?report.services.keys().collect::<Vec<_>>(),
            written = report.files.iter().filter(|f| f.result == "written").count(),
            commands = report.commands.len(), success = report.success, "applied");
        if let Ok(mut log) = self.inner.log.lock() {
            if log.len() == LOG_SIZE {
                log.pop_front();
            }
            log.push_back(report.clone());
        }
        report
    }

    fn write_file(&self, name: &str, settings: &Value) -> FileOutcome {
        let Some(meta) = self.inner.meta.configuration_files.get(name) else {
            return FileOutcome {
                name: name.to_owned(),
                path: String::new(),
                result: "failed",
                error: Some("not in services.toml".to_owned()),
            };
        };
        let fail = |error: String| FileOutcome {
            name: name.to_owned(),
            path: meta.path.clone(),
            result: "failed",
            error: Some(error),
        };
        let content = match self.render(name, settings) {
            Ok(content) => content,
            Err(e) => return fail(e.to_string()),
        };
        let Some(target) = files::target_path(&self.inner.config.render_root, &meta.path) else {
            return fail("path leaves the render root".to_owned());
        };
        match files::write_if_changed(&target, &content, meta.mode_bits()) {
            Ok(written) => FileOutcome {
                name: name.to_owned(),
                path: meta.path.clone(),
                result: if written { "written" } else { "unchanged" },
                error: None,
            },
            Err(e) => fail(format!("{}: {e}", target.display())),
        }
    }

    /// The last `limit` applies, newest first, and whether a reboot is pending.
    pub fn log(&self, limit: usize) -> Value {
        let applies: Vec<ApplyReport> = self
            .inner
            .log
            .lock()
            .map(|log| log.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default();
        json!({
            "reboot-required": self.inner.reboot_required.load(Ordering::Relaxed),
            "applies": applies,
        })
    }
}

impl CommitCheck for Applier {
    fn check(&self, candidate: &Value, changed: &[String]) -> Result<(), CheckError> {
        Applier::check(self, candidate, changed).map_err(|e| CheckError {
            key: e.key(),
            message: e.to_string(),
        })
    }
}
