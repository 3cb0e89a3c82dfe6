//! Apply: make the host follow committed settings.
//!
//! Owns the services metadata, rendering configuration files into the render root, and
//! running restart commands, plus the record of what each apply did. The store decides
//! *what* the settings are; this module only reads them. Three entry points:
//! [`Applier::check`] (commit-time test render, refusing a candidate that cannot render),
//! [`Applier::plan`] (dry run: settings and file diffs, nothing written) and
//! [`Applier::apply`] (render affected files, run restart commands, record the outcome).
//!
//! A configuration file with `for-each` is a multi-file: one concrete file per item of a
//! settings list or map (`{item}` in its path, as a directory or as the file name before a
//! suffix), and an apply removes the files (and emptied directories) of items that are
//! gone, or whose file renders empty (a disabled static pod); each concrete file is
//! reported as `name[item]`.

mod detached;
pub mod dry_run;
pub mod files;
pub mod filters;
pub mod journal;
pub mod render;
pub mod restart;
pub mod services;

pub use detached::ApplyTaskFailed;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use restart::CommandOutcome;
use services::ConfigurationFile;
pub use services::{ServicesError, ServicesMeta};

use crate::store::{CheckError, CommitCheck, Store};
use crate::updates::loader::BootParameters;
use render::{RenderError, Templates};

/// Applies kept for `GET /apply/log` (in memory and in the journal).
const LOG_SIZE: usize = 64;
/// The "applied" lines of successful applies (see `log_budget`).
static APPLIES: crate::log_budget::LogBudget = crate::log_budget::LogBudget::new("applies");

/// What happened to one configuration file in an apply.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FileResult {
    Written,
    Unchanged,
    /// A multi-file's item that is gone.
    Removed,
    Failed,
}

impl FileResult {
    /// Whether the file on disk changed.
    pub fn changed(self) -> bool {
        matches!(self, FileResult::Written | FileResult::Removed)
    }
}

/// What happened to one configuration file in an apply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct FileOutcome {
    /// The configuration file's name; `name[item]` for one item of a multi-file.
    pub name: String,
    pub path: String,
    pub result: FileResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What one apply did.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The settings of this apply that are stored with no effect on this host (their
    /// services are marked `no-effect`: a Bottlerocket component Keel does not have).
    #[serde(default)]
    pub no_effect: Vec<String>,
    pub duration_ms: u64,
}

impl FileOutcome {
    pub fn failed(name: impl Into<String>, path: impl Into<String>, error: String) -> Self {
        FileOutcome {
            name: name.into(),
            path: path.into(),
            result: FileResult::Failed,
            error: Some(error),
        }
    }
}

impl ApplyReport {
    /// A report for an apply that could not run at all.
    pub fn failed(reason: String) -> Self {
        ApplyReport {
            id: 0,
            time: crate::store::now_rfc3339(),
            keys: Vec::new(),
            services: BTreeMap::new(),
            files: vec![FileOutcome {
                name: "(apply)".to_owned(),
                path: String::new(),
                result: FileResult::Failed,
                error: Some(reason),
            }],
            commands: Vec::new(),
            success: false,
            reboot_required: false,
            no_effect: Vec::new(),
            duration_ms: 0,
        }
    }
}

/// A file that a transaction would change, for a dry run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileDiff {
    pub name: String,
    pub path: String,
    pub diff: String,
    /// Why an apply would fail to write this file (a symbolic link under the render
    /// root); `diff` then holds that explanation instead of a diff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The knobs of an [`Applier`].
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    pub render_root: PathBuf,
    pub restart_timeout: Duration,
    /// Where the apply journal lives (the apply log, and the apply in progress), so that
    /// both survive a keeld restart within one boot: keeld's runtime directory. `None`
    /// keeps them in memory only (tests).
    pub journal_dir: Option<PathBuf>,
    /// Hears of every apply once it finished.
    pub events: crate::events::EventBus,
    /// Where a `boot-parameters` service's lines go to reach the next boot. `None`: this
    /// host has no boot loader entries Keel manages, and an apply that sets parameters
    /// says so and fails.
    pub boot_loader: Option<BootLoader>,
}

/// The boot loader entries of a Keel host, as the apply reaches them.
#[derive(Debug, Clone)]
pub struct BootLoader {
    /// The slot writer, which alone writes the entries.
    pub writer: crate::updates::writer_client::WriterEndpoint,
    /// The parameters the entries were last given (one `options` line; none = the
    /// image's entries, which hold none), in the state directory: an apply whose lines
    /// are these asks nothing of the writer, so a boot does not depend on it.
    pub staged: PathBuf,
    /// Parameters whose trial boot did not reach `configured` (one `options` line), in
    /// the state directory; removed when other parameters are handed over. While it
    /// matches [`BootLoader::staged`], `settings.boot` still asks for parameters that
    /// failed: every boot's record says so, and `reboot-to-reconcile` does not reboot for
    /// them.
    pub failed: PathBuf,
}

impl BootLoader {
    /// The parameters last staged; a record that cannot be read counts as unknown.
    fn last_staged(&self) -> Option<String> {
        match crate::updates::durable::read_bounded(&self.staged, 64 * 1024) {
            Ok(bytes) => String::from_utf8(bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(String::new()),
            Err(_) => None,
        }
    }

    /// The parameters that failed their trial, while they are still the ones staged.
    fn still_failed(&self) -> Option<String> {
        let failed = crate::updates::durable::read_bounded(&self.failed, 64 * 1024).ok()?;
        let failed = String::from_utf8(failed).ok()?;
        (self.last_staged().as_deref() == Some(failed.as_str())).then_some(failed)
    }
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
    /// The last hand-over of boot parameters was deferred (see
    /// `EspLayout::stage_parameters`): the boot hands them over again once it is blessed.
    boot_parameters_deferred: AtomicBool,
    /// One apply at a time: each renders from the live settings of the moment it runs,
    /// so the last apply to finish leaves the files matching the newest generation.
    /// Taken at [`Applier::load_journal`] when the journal says an earlier keeld ran in
    /// this boot, and held until the recovery's own apply is journaled (see `journal`).
    serial: Arc<tokio::sync::Mutex<()>>,
    /// Applies requested on behalf of API requests (see `detached`).
    queue: Mutex<detached::Waiting>,
    /// The apply journal, open for appending (see `journal`).
    journal: Mutex<journal::JournalFile>,
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
                boot_parameters_deferred: AtomicBool::new(false),
                serial: Arc::new(tokio::sync::Mutex::new(())),
                queue: Mutex::default(),
                journal: Mutex::default(),
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

    /// The settings among `keys` that are stored with no effect on this host: each key,
    /// or for a key naming a table (`settings`, `settings.metrics`) each setting of
    /// `settings` under it, whose services are all `no-effect`
    /// ([`ServicesMeta::has_no_effect`]). A removed key is listed as itself.
    pub fn no_effect_keys(&self, settings: &Value, keys: &[String]) -> Vec<String> {
        let meta = &self.inner.meta;
        if !meta.services.values().any(|s| s.no_effect) {
            return Vec::new();
        }
        let flat = settings_model::patch::flatten(settings);
        let mut out = BTreeSet::new();
        for key in keys {
            let past = format!("{key}[");
            let mut found = false;
            for (leaf, value) in flat.range(key.clone()..) {
                let under = leaf == key
                    || leaf
                        .strip_prefix(key.as_str())
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['));
                if !under {
                    // Sorted: `key.x` and `key[0]` sort after `key`, but so may `key-x`,
                    // which is not under it; stop only past every `key` + separator.
                    if leaf.as_str() > past.as_str() {
                        break;
                    }
                    continue;
                }
                found = true;
                let empty_table = value.as_object().is_some_and(|m| m.is_empty());
                if !empty_table && meta.has_no_effect(leaf) {
                    out.insert(leaf.clone());
                }
            }
            if !found && meta.has_no_effect(key) {
                out.insert(key.clone());
            }
        }
        out.into_iter().collect()
    }

    /// The configuration files of `services`, by name.
    fn files_of<'a>(&self, services: impl Iterator<Item = &'a String>) -> BTreeSet<String> {
        services
            .filter_map(|s| self.inner.meta.services.get(s))
            .flat_map(|s| s.configuration_files.iter().cloned())
            .collect()
    }

    fn template_of<'a>(&'a self, file: &'a str) -> &'a str {
        self.inner
            .meta
            .configuration_files
            .get(file)
            .map_or(file, |f| f.template_path.as_str())
    }

    /// The render context for `settings`.
    fn context(&self, settings: &Value) -> minijinja::Value {
        Templates::context(settings, &self.inner.os)
    }

    /// Every concrete file of the configuration file `name` rendered in `context`
    /// (made from `settings`): one for a plain file, one per item for a multi-file.
    /// Fails on the first file that cannot render or the first item that cannot be named.
    fn render_all(
        &self,
        name: &str,
        settings: &Value,
        context: &minijinja::Value,
    ) -> Result<Vec<Rendered>, RenderError> {
        let template = self.template_of(name);
        let file = self.inner.meta.configuration_files.get(name);
        let Some(meta) = file.filter(|m| m.is_multi()) else {
            return Ok(vec![Rendered {
                name: name.to_owned(),
                path: file.map(|m| m.path.clone()).unwrap_or_default(),
                content: self.inner.templates.render_in(template, context)?,
            }]);
        };
        let items_error = |reason: String| RenderError::Items {
            file: name.to_owned(),
            key: meta.for_each.clone().unwrap_or_default(),
            reason,
        };
        let mut out = Vec::new();
        for item in meta.items(settings).map_err(items_error)? {
            let segment = item.segment.map_err(items_error)?;
            let context = Templates::item_context(context, &item.value, &item.name);
            let content = self.inner.templates.render_in(template, &context)?;
            // An item whose file renders empty has no file.
            if has_no_file(&content) {
                continue;
            }
            out.push(Rendered {
                name: item_label(name, &item.name),
                path: meta.item_path(&segment),
                content,
            });
        }
        Ok(out)
    }

    /// Renders every file the keys affect against `candidate`, writing nothing.
    pub fn check(&self, candidate: &Arc<Value>, keys: &[String]) -> Result<(), RenderError> {
        let services = self.affected(keys);
        let context = Templates::context_shared(Arc::clone(candidate), &self.inner.os);
        for file in self.files_of(services.keys()) {
            self.render_all(&file, candidate, &context)?;
        }
        Ok(())
    }

    /// A dry run: the unified diff of every file that committing `candidate` would
    /// change under the render root (a multi-file's item that would be removed shows
    /// as entirely deleted).
    ///
    /// The current file is never read through a symbolic link (that could show a file
    /// from outside the render root): a file whose target or directory under the render
    /// root is a symbolic link is listed with `error` set, and an explanation in place
    /// of the diff, since an apply would refuse to write it. The rest of the plan is
    /// still shown.
    pub fn plan(&self, candidate: &Value, keys: &[String]) -> Result<Vec<FileDiff>, RenderError> {
        let services = self.affected(keys);
        let context = self.context(candidate);
        let root = &self.inner.config.render_root;
        let mut diffs = Vec::new();
        for name in self.files_of(services.keys()) {
            let Some(meta) = self.inner.meta.configuration_files.get(&name) else {
                continue;
            };
            let rendered = self.render_all(&name, candidate, &context)?;
            for file in &rendered {
                let target = files::target_path(root, &file.path);
                if let Some(Err(e)) = target.as_ref().map(|t| files::check_no_symlinks(root, t)) {
                    diffs.push(FileDiff {
                        name: file.name.clone(),
                        path: file.path.clone(),
                        diff: format!("! not diffed, an apply would fail: {e}\n"),
                        error: Some(e.to_string()),
                    });
                    continue;
                }
                let old = match target.as_deref().map(current_text) {
                    Some(Err(e)) => {
                        diffs.push(FileDiff {
                            name: file.name.clone(),
                            path: file.path.clone(),
                            diff: format!("! not diffed, an apply would fail: {e}\n"),
                            error: Some(e),
                        });
                        continue;
                    }
                    Some(Ok(old)) => old,
                    None => String::new(),
                };
                if old != file.content {
                    diffs.push(FileDiff {
                        name: file.name.clone(),
                        path: file.path.clone(),
                        diff: unified_diff(&old, &file.content, &file.path, false),
                        error: None,
                    });
                }
            }
            if meta.is_multi() {
                let keep: BTreeSet<String> = rendered.iter().map(|r| r.path.clone()).collect();
                for stale in stale_items(root, &name, meta, &keep) {
                    let old = current_text(&stale.target).unwrap_or_else(|e| format!("! {e}\n"));
                    diffs.push(FileDiff {
                        name: stale.name,
                        diff: unified_diff(&old, "", &stale.path, true),
                        path: stale.path,
                        error: None,
                    });
                }
            }
        }
        Ok(diffs)
    }

    /// Renders the files of the services that `keys` affect from the live settings,
    /// runs those services' restart commands, records and returns the outcome.
    pub async fn apply(&self, store: &Store, keys: &[String]) -> ApplyReport {
        self.apply_services(store, keys.to_vec(), self.affected(keys))
            .await
    }

    /// The apply of `services` (each with the keys that affect it), on behalf of `keys`.
    ///
    /// Journaled: before anything is written, a `started` record goes into the journal;
    /// a `finished` record with the report follows once it is done. A keeld killed in
    /// between finds the `started` record alone at its next start and
    /// [`Applier::recover`] finishes the job.
    async fn apply_services(
        &self,
        store: &Store,
        keys: Vec<String>,
        services: BTreeMap<String, Vec<String>>,
    ) -> ApplyReport {
        let turn = self.inner.serial.clone().lock_owned().await;
        self.apply_services_in_turn(turn, store, keys, services)
            .await
    }

    /// [`Self::apply_services`] once it is this apply's turn (`_turn` held throughout).
    async fn apply_services_in_turn(
        &self,
        _turn: tokio::sync::OwnedMutexGuard<()>,
        store: &Store,
        keys: Vec<String>,
        services: BTreeMap<String, Vec<String>>,
    ) -> ApplyReport {
        let started = std::time::Instant::now();
        let snapshot = store.snapshot();
        let generation = snapshot.live().generation;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.journal(&journal::InFlight {
            id,
            generation,
            keys: keys.clone(),
            services: services.clone(),
        });
        let no_effect = self.no_effect_keys(snapshot.live_settings(), &keys);
        let mut report = ApplyReport {
            id,
            time: crate::store::now_rfc3339(),
            keys,
            services,
            files: Vec::new(),
            commands: Vec::new(),
            success: true,
            reboot_required: false,
            no_effect,
            duration_ms: 0,
        };
        // Rendering and writing are file I/O and CPU: off the async workers.
        let this = self.clone();
        let services = report.services.clone();
        let written = tokio::task::spawn_blocking(move || {
            // One context for both, over the snapshot's settings (shared, not copied).
            let context =
                Templates::context_shared(snapshot.live().settings.clone(), &this.inner.os);
            let settings = snapshot.live_settings();
            let (files, reboot_required) = this.write_services(settings, &context, &services);
            let boot = this.boot_parameters(&context, &services);
            (files, reboot_required, boot)
        })
        .await;
        let mut boot = Vec::new();
        match written {
            Ok((files, reboot_required, parameters)) => {
                report.files = files;
                report.reboot_required = reboot_required;
                boot = parameters;
            }
            Err(e) => report.files.push(FileOutcome::failed(
                "(apply)",
                "",
                format!("writing files stopped: {e}"),
            )),
        }
        report.success = report.files.iter().all(|f| f.result != FileResult::Failed);
        for (service, service_keys) in &report.services {
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
        for (service, parameters) in boot {
            let (outcome, deferred) = self.stage_boot_parameters(&service, parameters).await;
            self.inner
                .boot_parameters_deferred
                .store(deferred, Ordering::Relaxed);
            report.success &= outcome.success;
            // Handed over: the next boot differs. Not handed over: no boot will read them,
            // so a reboot would not bring them into effect.
            // Ored: another service's changed files may need the reboot too.
            report.reboot_required |= outcome.success;
            report.commands.push(outcome);
        }
        if report.reboot_required {
            self.inner.reboot_required.store(true, Ordering::Relaxed);
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // A failed apply is always logged; a successful one within the budget.
        if !report.success || APPLIES.admit() {
            tracing::info!(id = report.id, keys = report.keys.len(), services = ?report.services.keys().collect::<Vec<_>>(),
                written = report.files.iter().filter(|f| f.result == FileResult::Written).count(),
                removed = report.files.iter().filter(|f| f.result == FileResult::Removed).count(),
                commands = report.commands.len(), success = report.success, "applied");
        }
        if let Ok(mut log) = self.inner.log.lock() {
            if log.len() == LOG_SIZE {
                log.pop_front();
            }
            log.push_back(report.clone());
        }
        self.journal_done(&report);
        self.inner
            .config
            .events
            .publish(crate::events::EventBody::Apply(
                crate::events::ApplyEvent::of(&report, generation),
            ));
        report
    }

    /// Writes the files of `services` rendered from `settings` (`context` is their render
    /// context); answers the outcomes and whether a file of a `reboot-required` service
    /// changed.
    fn write_services(
        &self,
        settings: &Value,
        context: &minijinja::Value,
        services: &BTreeMap<String, Vec<String>>,
    ) -> (Vec<FileOutcome>, bool) {
        let mut files = Vec::new();
        let mut reboot_required = false;
        let mut done = BTreeSet::new();
        for service in services.keys() {
            let Some(def) = self.inner.meta.services.get(service) else {
                continue;
            };
            for name in &def.configuration_files {
                if !done.insert(name.as_str()) {
                    continue;
                }
                let outcomes = match self.inner.meta.configuration_files.get(name) {
                    Some(meta) if meta.is_multi() => {
                        self.write_items(name, meta, settings, context)
                    }
                    _ => vec![self.write_file(name, context)],
                };
                for outcome in outcomes {
                    // A boot-parameters service's reboot is decided by whether its
                    // lines reach the loader entries (see `apply`), not by its files.
                    reboot_required |= def.reboot_required
                        && def.boot_parameters.is_none()
                        && outcome.result.changed();
                    files.push(outcome);
                }
            }
        }
        (files, reboot_required)
    }

    /// For each `boot-parameters` service among `services`: its two lines rendered in
    /// `context`, unless they are what the loader entries already hold (or, on a host
    /// without entries Keel manages, unless there are none). Compared with the record, not
    /// with the rendered files: a hand-off that failed is tried again by the next apply
    /// of the same values.
    fn boot_parameters(
        &self,
        context: &minijinja::Value,
        services: &BTreeMap<String, Vec<String>>,
    ) -> Vec<(String, Result<BootParameters, String>)> {
        let mut out = Vec::new();
        for service in services.keys() {
            let Some(names) = self
                .inner
                .meta
                .services
                .get(service)
                .and_then(|s| s.boot_parameters.as_ref())
            else {
                continue;
            };
            let line = |name: &str| {
                self.inner
                    .templates
                    .render_in(self.template_of(name), context)
                    .map(|text| text.trim().to_owned())
                    .map_err(|e| e.to_string())
            };
            let parameters = line(&names.kernel).and_then(|kernel| {
                Ok(BootParameters {
                    kernel,
                    init: line(&names.init)?,
                })
            });
            if let Ok(p) = &parameters {
                let in_place = match &self.inner.config.boot_loader {
                    // No entries that could hold any: only "none" is in effect.
                    None => p.options().is_empty(),
                    Some(loader) => loader.last_staged().as_deref() == Some(&p.options()),
                };
                if in_place {
                    // Nothing left to hand over: a deferral of other parameters (set
                    // back since) is over too.
                    self.inner
                        .boot_parameters_deferred
                        .store(false, Ordering::Relaxed);
                    continue;
                }
            }
            out.push((service.clone(), parameters));
        }
        out
    }

    /// Hands a service's boot parameters to the boot loader's entries; the outcome is
    /// reported beside the restart commands.
    /// Answers whether the hand-over was deferred.
    async fn stage_boot_parameters(
        &self,
        service: &str,
        parameters: Result<BootParameters, String>,
    ) -> (CommandOutcome, bool) {
        let started = std::time::Instant::now();
        let result = match (parameters, &self.inner.config.boot_loader) {
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err("this host has no boot loader entries Keel manages: the \
                 parameters are rendered but no boot will use them"
                .to_owned()),
            (Ok(parameters), Some(loader)) => {
                let options = parameters.options();
                let set =
                    crate::updates::writer_client::set_boot_parameters(&loader.writer, parameters)
                        .await
                        .map_err(|e| e.to_string());
                // Recorded once the entries hold them (durably: written, fsync'd, renamed,
                // directory fsync'd). A crash before leaves the old record, and the next
                // apply asks the writer again, which finds the entries already done.
                let record = options.into_bytes();
                match set {
                    // Not handed over: no record, so a later apply (the next boot's)
                    // hands them over again.
                    Ok(settled)
                        if matches!(
                            settled.trial,
                            crate::updates::loader::ParameterTrial::Deferred { .. }
                        ) =>
                    {
                        Ok(settled)
                    }
                    Ok(entries) => {
                        let path = loader.staged.clone();
                        let failed = loader.failed.clone();
                        // The record first, then the failure it supersedes: a crash
                        // between leaves a failure that no longer matches the record.
                        tokio::task::spawn_blocking(move || {
                            crate::updates::durable::replace(&path, &record)?;
                            crate::updates::durable::remove(&failed).map(|_| ())
                        })
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r)
                        .map(|()| entries)
                        .map_err(|e| {
                            format!(
                                "the entries hold them, but {} cannot record it: {e}",
                                loader.staged.display()
                            )
                        })
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let argv = vec![
            "keel-slot-writer".to_owned(),
            "set-boot-parameters".to_owned(),
        ];
        let deferred = matches!(
            &result,
            Ok(settled) if matches!(settled.trial, crate::updates::loader::ParameterTrial::Deferred { .. })
        );
        let outcome = match result {
            Ok(settled) => {
                tracing::info!(service, trial = ?settled.trial, entries = ?settled.entries, "boot parameters staged for the next boot");
                use crate::updates::loader::ParameterTrial;
                let stdout = match &settled.trial {
                    ParameterTrial::Deferred { reason } => format!("deferred: {reason}\n"),
                    ParameterTrial::Running { entry, .. } => format!(
                        "this boot tries these parameters (loader entry {entry}): they are kept \
                         once it reaches configured\n"
                    ),
                    ParameterTrial::Pending { entry, .. } => format!(
                        "the next boot tries these parameters (loader entry {entry}): they are \
                         kept once a boot with them reaches configured; a boot that does not \
                         comes back with the current ones\n"
                    ),
                    _ if settled.entries.is_empty() => {
                        "the loader entries already hold these parameters\n".to_owned()
                    }
                    _ => format!(
                        "the kept loader entries hold these parameters; trial entries \
                         removed: {}\n",
                        settled.entries.join(", ")
                    ),
                };
                CommandOutcome {
                    service: service.to_owned(),
                    argv,
                    exit_code: Some(0),
                    success: true,
                    timed_out: false,
                    duration_ms,
                    stdout,
                    stderr: String::new(),
                    error: None,
                }
            }
            Err(e) => {
                let error = format!("settings.boot cannot reach the next boot: {e}");
                tracing::warn!(service, error = %error, "boot parameters not staged");
                CommandOutcome {
                    service: service.to_owned(),
                    argv,
                    exit_code: None,
                    success: false,
                    timed_out: false,
                    duration_ms,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: Some(error),
                }
            }
        };
        (outcome, deferred)
    }

    fn write_file(&self, name: &str, context: &minijinja::Value) -> FileOutcome {
        let Some(meta) = self.inner.meta.configuration_files.get(name) else {
            return FileOutcome {
                name: name.to_owned(),
                path: String::new(),
                result: FileResult::Failed,
                error: Some("not in services.toml".to_owned()),
            };
        };
        let content = self.inner.templates.render_in(&meta.template_path, context);
        self.write_one(
            name.to_owned(),
            meta.path.clone(),
            meta.mode_bits(),
            content,
        )
    }

    /// Writes `content` to the concrete `path` under the render root, unless it is
    /// already there.
    fn write_one(
        &self,
        name: String,
        path: String,
        mode: u32,
        content: Result<String, RenderError>,
    ) -> FileOutcome {
        let fail = |name: String, path: String, error: String| FileOutcome {
            name,
            path,
            result: FileResult::Failed,
            error: Some(error),
        };
        let content = match content {
            Ok(content) => content,
            Err(e) => return fail(name, path, e.to_string()),
        };
        let root = &self.inner.config.render_root;
        let Some(target) = files::target_path(root, &path) else {
            return fail(name, path, "path leaves the render root".to_owned());
        };
        match files::write_if_changed(root, &target, &content, mode) {
            Ok(written) => FileOutcome {
                name,
                path,
                result: if written {
                    FileResult::Written
                } else {
                    FileResult::Unchanged
                },
                error: None,
            },
            Err(e) => fail(name, path, format!("{}: {e}", target.display())),
        }
    }

    /// A multi-file: writes each item's file and removes the files of items that are
    /// gone. An item that fails to render keeps its previous file; when the items cannot
    /// be listed at all, nothing is removed.
    fn write_items(
        &self,
        name: &str,
        meta: &ConfigurationFile,
        settings: &Value,
        context: &minijinja::Value,
    ) -> Vec<FileOutcome> {
        let items = match meta.items(settings) {
            Ok(items) => items,
            Err(error) => {
                return vec![FileOutcome {
                    name: name.to_owned(),
                    path: meta.path.clone(),
                    result: FileResult::Failed,
                    error: Some(error),
                }]
            }
        };
        let mut outcomes = Vec::new();
        let mut keep = BTreeSet::new();
        for item in items {
            let label = item_label(name, &item.name);
            let segment = match item.segment {
                Ok(segment) => segment,
                Err(error) => {
                    outcomes.push(FileOutcome {
                        name: label,
                        path: meta.path.clone(),
                        result: FileResult::Failed,
                        error: Some(error),
                    });
                    continue;
                }
            };
            let path = meta.item_path(&segment);
            let context = Templates::item_context(context, &item.value, &item.name);
            let content = self
                .inner
                .templates
                .render_in(&meta.template_path, &context);
            // An item whose file renders empty has no file: a file it had is stale.
            if content.as_deref().is_ok_and(has_no_file) {
                continue;
            }
            keep.insert(path.clone());
            outcomes.push(self.write_one(label, path, meta.mode_bits(), content));
        }
        for stale in stale_items(&self.inner.config.render_root, name, meta, &keep) {
            let result = std::fs::remove_file(&stale.target);
            if result.is_ok() {
                remove_empty_dirs(&stale.target, &stale.item_dir);
            }
            outcomes.push(FileOutcome {
                name: stale.name,
                path: stale.path,
                result: if result.is_ok() {
                    FileResult::Removed
                } else {
                    FileResult::Failed
                },
                error: result
                    .err()
                    .map(|e| format!("{}: {e}", stale.target.display())),
            });
        }
        outcomes
    }

    /// Removes temp files a killed keeld left beside the configuration files (a
    /// keeld restart within one boot does not render again, so nothing else would).
    pub fn sweep_temps(&self) -> usize {
        let root = &self.inner.config.render_root;
        let mut removed = 0;
        for meta in self.inner.meta.configuration_files.values() {
            // For a multi-file path, the directory holding the items and each item's.
            let (fixed, multi) = match meta.path.split_once(services::ITEM) {
                Some((before, _)) => (before.trim_end_matches('/'), true),
                None => (meta.path.rsplit_once('/').map_or("", |(d, _)| d), false),
            };
            let Some(dir) =
                files::target_path(root, fixed).or_else(|| fixed.is_empty().then(|| root.clone()))
            else {
                continue;
            };
            removed += files::sweep_temps(&dir, None);
            if multi {
                for item in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if item.file_type().is_ok_and(|t| t.is_dir()) {
                        removed += files::sweep_temps(&item.path(), None);
                    }
                }
            }
        }
        removed
    }

    /// Renders every file at boot. The files staged for the boot loader become the
    /// baseline rather than a pending change: they are what the next boot uses, and
    /// keeld never reboots on its own, so the boot's render does not set
    /// `reboot-required` (later changes do).
    pub async fn apply_at_boot(&self, store: &Store) -> ApplyReport {
        let report = self.apply(store, &["settings".to_owned()]).await;
        self.inner.reboot_required.store(false, Ordering::Relaxed);
        report
    }

    /// Whether the last hand-over of boot parameters was deferred.
    pub fn boot_parameters_deferred(&self) -> bool {
        self.inner.boot_parameters_deferred.load(Ordering::Relaxed)
    }

    /// `settings.boot`'s parameters Keel's loader entries were last given (`""` for none);
    /// `None` on a host without them, or when the record cannot be read.
    pub async fn staged_boot_parameters(&self) -> Option<String> {
        let loader = self.inner.config.boot_loader.clone()?;
        tokio::task::spawn_blocking(move || loader.last_staged())
            .await
            .ok()
            .flatten()
    }

    /// Whether a record of staged parameters exists (a missing one reads as "none
    /// staged", which is a guess on a host whose state directory was reset).
    pub fn boot_parameters_recorded(&self) -> bool {
        self.inner
            .config
            .boot_loader
            .as_ref()
            .is_some_and(|loader| loader.staged.exists())
    }

    /// Records that `parameters` failed their trial (durably: the report outlives this
    /// boot, see [`BootLoader::failed`]), and that they are the ones staged: a trial
    /// exists only for staged parameters, but the staged record may still name older
    /// ones when keeld went down between the writer's answer and the record of it. The
    /// staged record first: with it alone (a crash between), the next boot finds them in
    /// no entry and takes them as failed again; with the failure alone, they would not
    /// count as failed, and the next apply would hand them over for a second bad boot.
    pub async fn record_failed_boot_parameters(&self, parameters: String) -> Result<(), String> {
        let Some(loader) = self.inner.config.boot_loader.clone() else {
            return Ok(());
        };
        let (staged, failed) = (loader.staged.clone(), loader.failed.clone());
        tokio::task::spawn_blocking(move || {
            crate::updates::durable::replace(&staged, parameters.as_bytes())
                .map_err(|e| format!("{}: {e}", staged.display()))?;
            crate::updates::durable::replace(&failed, parameters.as_bytes())
                .map_err(|e| format!("{}: {e}", failed.display()))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    }

    /// The staged parameters, when they are ones that failed their trial.
    pub async fn failed_boot_parameters(&self) -> Option<String> {
        let loader = self.inner.config.boot_loader.clone()?;
        tokio::task::spawn_blocking(move || loader.still_failed())
            .await
            .ok()
            .flatten()
    }

    /// At a boot's first start: settles the trial of new boot parameters with the slot
    /// writer (see `EspLayout::settle_parameters`); `None` on a host without loader
    /// entries Keel manages.
    pub async fn settle_boot_parameters(
        &self,
    ) -> Option<Result<crate::updates::loader::Settled, String>> {
        let loader = self.inner.config.boot_loader.clone()?;
        Some(
            crate::updates::writer_client::settle_boot_parameters(&loader.writer)
                .await
                .map_err(|e| e.to_string()),
        )
    }

    /// Waits until no apply runs or waits to run. The turn on the serial lock alone is
    /// not enough: the queue's task takes its next turn only once the running apply
    /// returned, after a waiter here may already have had its turn, so the queue is
    /// asked too (polled every 10 ms: it runs when keeld stops, and once per boot
    /// before `reboot-to-reconcile` compares the boot parameters).
    pub async fn idle(&self) {
        loop {
            drop(self.inner.serial.lock().await);
            if !self.queue_running() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
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

/// One concrete file rendered in memory.
struct Rendered {
    /// `name`, or `name[item]` for an item of a multi-file.
    name: String,
    /// The concrete path, relative to the render root.
    path: String,
    content: String,
}

/// The text of the file an apply would replace, for a dry run: empty when there is
/// none, never read through anything but a regular file (see
/// [`files::read_existing`]); non-UTF-8 bytes shown lossily.
fn current_text(target: &Path) -> Result<String, String> {
    /// A dry run shows at most this much of a current file.
    const LIMIT: usize = 16 << 20;
    match files::read_existing(target, LIMIT) {
        Ok(files::Existing::Missing) => Ok(String::new()),
        Ok(files::Existing::File { content, .. }) => {
            Ok(String::from_utf8_lossy(&content).into_owned())
        }
        Ok(files::Existing::Other(kind)) => Err(format!(
            "{} is {kind}, not a regular file: refusing to replace it",
            target.display()
        )),
        Err(e) => Err(format!("{}: {e}", target.display())),
    }
}

/// Whether a multi-file item's rendered `content` means "no file" (it is empty).
fn has_no_file(content: &str) -> bool {
    content.trim().is_empty()
}

/// The report name of one item of a multi-file: `containerd-hosts[docker.io]`.
fn item_label(file: &str, item: &str) -> String {
    format!("{file}[{item}]")
}

fn unified_diff(old: &str, new: &str, path: &str, removed: bool) -> String {
    let to = if removed {
        "/dev/null".to_owned()
    } else {
        format!("b{path}")
    };
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a{path}"), &to)
        .to_string()
}

/// A file under the render root left by an item that no longer exists.
struct Stale {
    name: String,
    path: String,
    target: PathBuf,
    /// The item's directory (`<root>/etc/containerd/certs.d/<item>`): removed with the
    /// file when nothing else is left in it.
    item_dir: PathBuf,
}

/// The files under `root` matching the multi-file's path pattern (only the `{item}`
/// segment is a wildcard) whose concrete path is not in `keep`. Only real directories
/// whose names an item could map to are considered (never a symbolic link, a hidden
/// entry or a name `item_segment` would refuse), and only regular files, below a
/// directory with no symbolic link between it and the render root: nothing found here
/// can lie outside the render root.
fn stale_items(
    root: &Path,
    name: &str,
    meta: &ConfigurationFile,
    keep: &BTreeSet<String>,
) -> Vec<Stale> {
    let Some((before, after)) = meta.pattern_parts() else {
        return Vec::new();
    };
    let dir = if before.trim_start_matches('/').is_empty() {
        Some(root.to_owned())
    } else {
        files::target_path(root, before)
    };
    let Some(dir) = dir else {
        return Vec::new();
    };
    if dir != root && files::check_no_symlinks(root, &dir).is_err() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut stale = Vec::new();
    if meta.item_is_file() {
        // `{item}<suffix>` files directly in the directory.
        for entry in entries.flatten() {
            let Ok(file_name) = entry.file_name().into_string() else {
                continue;
            };
            let Some(segment) = file_name.strip_suffix(after) else {
                continue;
            };
            let item = services::segment_item(segment);
            if services::item_segment(&item).as_deref() != Ok(segment) {
                continue;
            }
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = meta.item_path(segment);
            if keep.contains(&path) {
                continue;
            }
            // No directory of its own to remove: the item's "directory" is the file.
            stale.push(Stale {
                name: item_label(name, &item),
                path,
                target: entry.path(),
                item_dir: entry.path(),
            });
        }
        stale.sort_by(|a, b| a.path.cmp(&b.path));
        return stale;
    }
    for entry in entries.flatten() {
        let Ok(segment) = entry.file_name().into_string() else {
            continue;
        };
        let item = services::segment_item(&segment);
        if services::item_segment(&item).as_deref() != Ok(segment.as_str()) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = meta.item_path(&segment);
        if keep.contains(&path) {
            continue;
        }
        let item_dir = entry.path();
        let target = item_dir.join(after);
        if !std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_file()) {
            continue;
        }
        stale.push(Stale {
            name: item_label(name, &item),
            path,
            target,
            item_dir,
        });
    }
    stale.sort_by(|a, b| a.path.cmp(&b.path));
    stale
}

/// Removes the now-empty directories from `file`'s parent up to and including `top`.
fn remove_empty_dirs(file: &Path, top: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if !d.starts_with(top) || std::fs::remove_dir(d).is_err() {
            break;
        }
        if d == top {
            break;
        }
        dir = d.parent();
    }
}

impl CommitCheck for Applier {
    fn check(&self, candidate: &Arc<Value>, changed: &[String]) -> Result<(), CheckError> {
        Applier::check(self, candidate, changed).map_err(|e| CheckError {
            key: e.key(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SERVICES: &str = r#"
[services.sysctl]
configuration-files = ["per-key"]

[configuration-files.per-key]
path = "/etc/per-key/{item}/value"
template-path = "per-key"
for-each = "settings.kernel.sysctl"

[affected-services]
"settings.kernel.sysctl" = ["sysctl"]
"#;

    fn applier(root: &Path) -> Applier {
        let meta = ServicesMeta::parse(Path::new("x"), SERVICES).unwrap();
        let templates = Templates::from_sources([(
            "per-key".to_owned(),
            "{{ item_name }}={{ item }}\n".to_owned(),
        )])
        .unwrap();
        let config = ApplyConfig {
            render_root: root.to_owned(),
            restart_timeout: Duration::from_secs(1),
            journal_dir: None,
            events: Default::default(),
            boot_loader: None,
        };
        Applier::new(meta, templates, config, json!({}))
    }

    fn keys() -> Vec<String> {
        vec!["settings.kernel.sysctl".to_owned()]
    }

    /// An applier whose multi-file names each item's file `{item}.conf`, and renders
    /// nothing for an item whose value is "off".
    fn file_item_applier(root: &Path) -> Applier {
        let text = SERVICES.replace("/etc/per-key/{item}/value", "/etc/per-key/{item}.conf");
        let meta = ServicesMeta::parse(Path::new("x"), &text).unwrap();
        let templates = Templates::from_sources([(
            "per-key".to_owned(),
            "{% if item != \"off\" %}{{ item_name }}={{ item }}\n{% endif %}".to_owned(),
        )])
        .unwrap();
        let config = ApplyConfig {
            render_root: root.to_owned(),
            restart_timeout: Duration::from_secs(1),
            journal_dir: None,
            events: Default::default(),
            boot_loader: None,
        };
        Applier::new(meta, templates, config, json!({}))
    }

    #[test]
    fn items_named_by_file_are_written_and_removed_and_empty_renders_have_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_item_applier(dir.path());
        let meta = a.meta().configuration_files["per-key"].clone();
        let results = |outcomes: Vec<FileOutcome>| -> Vec<(String, String, String)> {
            outcomes
                .into_iter()
                .map(|o| (o.name, o.path, format!("{:?}", o.result).to_lowercase()))
                .collect()
        };
        let settings = json!({"kernel": {"sysctl": {"vm.a": "1", "vm.b": "2", "vm.c": "off"}}});
        let context = a.context(&settings);
        assert_eq!(
            results(a.write_items("per-key", &meta, &settings, &context)),
            [
                (
                    "per-key[vm.a]".to_owned(),
                    "/etc/per-key/vm.a.conf".to_owned(),
                    "written".to_owned()
                ),
                (
                    "per-key[vm.b]".to_owned(),
                    "/etc/per-key/vm.b.conf".to_owned(),
                    "written".to_owned()
                ),
            ],
            "vm.c renders empty: no file"
        );
        let files = dir.path().join("etc/per-key");
        assert_eq!(
            std::fs::read_to_string(files.join("vm.a.conf")).unwrap(),
            "vm.a=1\n"
        );
        assert!(!files.join("vm.c.conf").exists());
        // What is not one of ours stays: other suffixes, hidden files, directories.
        for other in ["notes.txt", ".vm.x.conf", "vm.a.conf.bak"] {
            std::fs::write(files.join(other), "x").unwrap();
        }
        std::fs::create_dir(files.join("vm.d.conf")).unwrap();

        // vm.a turned off, vm.b gone: both files removed; a dry run shows them deleted.
        let settings = json!({"kernel": {"sysctl": {"vm.a": "off", "vm.c": "3"}}});
        let plan = a.plan(&settings, &keys()).unwrap();
        let summary: Vec<(&str, bool)> = plan
            .iter()
            .map(|d| (d.name.as_str(), d.diff.contains("+++ /dev/null")))
            .collect();
        assert_eq!(
            summary,
            [
                ("per-key[vm.c]", false),
                ("per-key[vm.a]", true),
                ("per-key[vm.b]", true)
            ]
        );
        let context = a.context(&settings);
        assert_eq!(
            results(a.write_items("per-key", &meta, &settings, &context)),
            [
                (
                    "per-key[vm.c]".to_owned(),
                    "/etc/per-key/vm.c.conf".to_owned(),
                    "written".to_owned()
                ),
                (
                    "per-key[vm.a]".to_owned(),
                    "/etc/per-key/vm.a.conf".to_owned(),
                    "removed".to_owned()
                ),
                (
                    "per-key[vm.b]".to_owned(),
                    "/etc/per-key/vm.b.conf".to_owned(),
                    "removed".to_owned()
                ),
            ]
        );
        let mut left: Vec<String> = std::fs::read_dir(&files)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".vm.x.conf",
                "notes.txt",
                "vm.a.conf.bak",
                "vm.c.conf",
                "vm.d.conf"
            ]
        );
    }

    #[test]
    fn no_effect_keys_are_the_settings_under_the_keys_that_nothing_reads() {
        let text = format!(
            "{SERVICES}\"settings.metrics\" = [\"metrics\"]\n\"settings.metrics-other\" = [\"sysctl\"]\n\n[services.metrics]\nno-effect = true\n"
        );
        let meta = ServicesMeta::parse(Path::new("x"), &text).unwrap();
        let templates = Templates::from_sources([(
            "per-key".to_owned(),
            "{{ item_name }}={{ item }}\n".to_owned(),
        )])
        .unwrap();
        let config = ApplyConfig {
            render_root: PathBuf::from("/nonexistent"),
            restart_timeout: Duration::from_secs(1),
            journal_dir: None,
            events: Default::default(),
            boot_loader: None,
        };
        let a = Applier::new(meta, templates, config, json!({}));
        let live = json!({
            "metrics": {"send-metrics": true, "service-checks": ["a", "b"], "empty": {}},
            "metrics-other": {"x": 1},
            "kernel": {"sysctl": {"vm.x": "1"}}
        });
        let keys = |k: &[&str]| k.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
        // Everything: each stored setting nothing reads.
        assert_eq!(
            a.no_effect_keys(&live, &keys(&["settings"])),
            [
                "settings.metrics.send-metrics",
                "settings.metrics.service-checks"
            ]
        );
        assert_eq!(
            a.no_effect_keys(&live, &keys(&["settings.metrics"])),
            [
                "settings.metrics.send-metrics",
                "settings.metrics.service-checks"
            ]
        );
        // A changed leaf, a removed one, and keys something does read.
        assert_eq!(
            a.no_effect_keys(
                &live,
                &keys(&[
                    "settings.metrics.send-metrics",
                    "settings.metrics.metrics-url",
                    "settings.kernel.sysctl.\"vm.x\"",
                    "settings.metrics-other.x"
                ])
            ),
            [
                "settings.metrics.metrics-url",
                "settings.metrics.send-metrics"
            ]
        );
    }

    #[test]
    fn check_refuses_an_item_name_that_is_no_path_segment() {
        let dir = tempfile::tempdir().unwrap();
        let a = applier(dir.path());
        a.check(
            &Arc::new(json!({"kernel": {"sysctl": {"vm.x": "1"}}})),
            &keys(),
        )
        .unwrap();
        let err = a
            .check(
                &Arc::new(json!({"kernel": {"sysctl": {"kernel/pid_max": "1"}}})),
                &keys(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("\"kernel/pid_max\""), "{err}");
        assert_eq!(err.key().as_deref(), Some("settings.kernel.sysctl"));
        let err = a
            .check(
                &Arc::new(json!({"kernel": {"sysctl": {"..": "1"}}})),
                &keys(),
            )
            .unwrap_err();
        assert!(matches!(err, RenderError::Items { .. }), "{err}");
    }

    #[test]
    fn plan_diffs_new_items_and_shows_stale_ones_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let a = applier(dir.path());
        let old = dir.path().join("etc/per-key/vm.old/value");
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, "vm.old=0\n").unwrap();
        std::fs::write(dir.path().join("etc/per-key/unrelated"), "x\n").unwrap();
        let same = dir.path().join("etc/per-key/vm.same/value");
        std::fs::create_dir_all(same.parent().unwrap()).unwrap();
        std::fs::write(&same, "vm.same=2\n").unwrap();

        let plan = a
            .plan(
                &json!({"kernel": {"sysctl": {"vm.new": "1", "vm.same": "2"}}}),
                &keys(),
            )
            .unwrap();
        let summary: Vec<(&str, &str)> = plan
            .iter()
            .map(|d| (d.name.as_str(), d.path.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("per-key[vm.new]", "/etc/per-key/vm.new/value"),
                ("per-key[vm.old]", "/etc/per-key/vm.old/value"),
            ]
        );
        assert!(plan[0].diff.contains("+vm.new=1"), "{}", plan[0].diff);
        assert!(plan[1].diff.contains("+++ /dev/null"), "{}", plan[1].diff);
        assert!(plan[1].diff.contains("-vm.old=0"), "{}", plan[1].diff);
        assert!(old.exists(), "a plan writes nothing");
    }

    #[test]
    fn stale_items_and_empty_directories_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let a = applier(dir.path());
        let meta = a.meta().configuration_files["per-key"].clone();
        let settings = json!({"kernel": {"sysctl": {"vm.a": "1", "vm.b": "2"}}});
        let context = a.context(&settings);
        let results = |outcomes: Vec<FileOutcome>| -> Vec<(String, String)> {
            outcomes
                .into_iter()
                .map(|o| (o.name, format!("{:?}", o.result).to_lowercase()))
                .collect()
        };
        assert_eq!(
            results(a.write_items("per-key", &meta, &settings, &context)),
            [
                ("per-key[vm.a]".to_owned(), "written".to_owned()),
                ("per-key[vm.b]".to_owned(), "written".to_owned())
            ]
        );
        let settings = json!({"kernel": {"sysctl": {"vm.b": "2"}}});
        let context = a.context(&settings);
        assert_eq!(
            results(a.write_items("per-key", &meta, &settings, &context)),
            [
                ("per-key[vm.b]".to_owned(), "unchanged".to_owned()),
                ("per-key[vm.a]".to_owned(), "removed".to_owned())
            ]
        );
        assert!(!dir.path().join("etc/per-key/vm.a").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/per-key/vm.b/value")).unwrap(),
            "vm.b=2\n"
        );
        // Items that cannot be listed remove nothing.
        let settings = json!({"kernel": {"sysctl": 3}});
        let context = a.context(&settings);
        assert_eq!(
            results(a.write_items("per-key", &meta, &settings, &context)),
            [("per-key".to_owned(), "failed".to_owned())]
        );
        assert!(dir.path().join("etc/per-key/vm.b/value").exists());
    }
    #[test]
    fn symbolic_links_under_the_render_root_are_neither_read_nor_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("vm.x")).unwrap();
        std::fs::write(outside.join("vm.x/value"), "secret\n").unwrap();
        std::fs::create_dir_all(root.join("etc/per-key")).unwrap();
        std::os::unix::fs::symlink(outside.join("vm.x"), root.join("etc/per-key/vm.x")).unwrap();
        let a = applier(&root);
        let settings = json!({"kernel": {"sysctl": {"vm.x": "1", "vm.y": "2"}}});

        // A dry run shows no foreign content and says why the file would fail.
        let plan = a.plan(&settings, &keys()).unwrap();
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(plan[0].name, "per-key[vm.x]");
        let error = plan[0].error.as_deref().unwrap();
        assert!(error.contains("symbolic link"), "{error}");
        assert!(!plan[0].diff.contains("secret"), "{}", plan[0].diff);
        assert!(plan[0].diff.contains("symbolic link"), "{}", plan[0].diff);
        assert_eq!(plan[1].error, None);

        // An apply refuses that file and writes the others.
        let meta = a.meta().configuration_files["per-key"].clone();
        let context = a.context(&settings);
        let outcomes = a.write_items("per-key", &meta, &settings, &context);
        assert_eq!(outcomes[0].result, FileResult::Failed, "{outcomes:?}");
        assert!(
            outcomes[0]
                .error
                .as_deref()
                .unwrap()
                .contains("symbolic link"),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1].result, FileResult::Written, "{outcomes:?}");
        assert_eq!(
            std::fs::read_to_string(outside.join("vm.x/value")).unwrap(),
            "secret\n"
        );

        // Stale items are not looked for through a symlinked directory.
        std::fs::remove_dir_all(root.join("etc/per-key")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/per-key")).unwrap();
        let settings = json!({"kernel": {"sysctl": {}}});
        let context = a.context(&settings);
        assert!(a.plan(&settings, &keys()).unwrap().is_empty());
        assert!(a
            .write_items("per-key", &meta, &settings, &context)
            .is_empty());
        assert!(outside.join("vm.x/value").exists());
    }
}
