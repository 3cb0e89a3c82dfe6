//! The kinds of event and what each carries: the JSON shapes `GET /events` serves
//! (README.md, "Events", documents each field). Types only; the modules that publish
//! build them (store writer: commit; applier: apply; status board: container; boot
//! tracker: boot-phase; the updates API: update).

use serde::{Deserialize, Serialize};

use crate::boot::status::BootPhase;
use crate::containers::status::{ContainerKind, RunState};
use crate::store::Caller;

/// Most keys an event lists (a commit's changed keys, an apply's keys): an event stays
/// small whatever the commit (the ring holds thousands), and the rest are counted; the
/// whole list is in `GET /history` (by generation) or `GET /apply/log` (by id).
pub const MAX_KEYS: usize = 64;

/// The first [`MAX_KEYS`] of `keys`, and how many more there are.
fn first_keys(keys: &[String]) -> (Vec<String>, usize) {
    let shown = keys.iter().take(MAX_KEYS).cloned().collect();
    (shown, keys.len().saturating_sub(MAX_KEYS))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The kind of an event, as the `kind` field and the `kinds=` filter name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Commit,
    Apply,
    Container,
    BootPhase,
    Update,
    /// Not an event: events a subscriber will not see (see [`super::Gap`]).
    Gap,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Commit,
        Kind::Apply,
        Kind::Container,
        Kind::BootPhase,
        Kind::Update,
        Kind::Gap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Commit => "commit",
            Kind::Apply => "apply",
            Kind::Container => "container",
            Kind::BootPhase => "boot-phase",
            Kind::Update => "update",
            Kind::Gap => "gap",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// What happened; serialized with its `kind` beside the envelope's fields.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventBody {
    Commit(CommitEvent),
    Apply(ApplyEvent),
    Container(ContainerEvent),
    BootPhase(BootPhaseEvent),
    Update(UpdateEvent),
}

impl EventBody {
    pub fn kind(&self) -> Kind {
        match self {
            EventBody::Commit(_) => Kind::Commit,
            EventBody::Apply(_) => Kind::Apply,
            EventBody::Container(_) => Kind::Container,
            EventBody::BootPhase(_) => Kind::BootPhase,
            EventBody::Update(_) => Kind::Update,
        }
    }
}

/// A new generation of the settings is durable: a commit, or a rollback.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CommitEvent {
    pub generation: u64,
    /// The transaction committed (`rollback-to-<N>` for a rollback).
    pub tx: String,
    /// The keys whose values changed, sorted; at most [`MAX_KEYS`].
    pub changed_keys: Vec<String>,
    /// How many more changed (not listed); absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub changed_keys_omitted: usize,
    /// Who asked (the API caller's `SO_PEERCRED`; keeld itself for the boot's commits).
    pub caller: Caller,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
}

impl CommitEvent {
    /// The event of `generation` (its settings are not carried: only what changed).
    pub fn of(generation: &crate::store::Generation) -> CommitEvent {
        let (changed_keys, changed_keys_omitted) = first_keys(&generation.changed_keys);
        CommitEvent {
            generation: generation.generation,
            tx: generation.tx.clone(),
            changed_keys,
            changed_keys_omitted,
            caller: generation.caller.clone(),
            rollback_of: generation.rollback_of,
        }
    }
}

/// An apply finished (whatever its outcome); the whole report, with the restart
/// commands' output, is in `GET /apply/log` under `id`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ApplyEvent {
    pub id: u64,
    /// The live generation the apply rendered.
    pub generation: u64,
    /// The keys it applied (`settings` for everything); at most [`MAX_KEYS`].
    pub keys: Vec<String>,
    /// How many more it applied (not listed); absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub keys_omitted: usize,
    /// The services it affected.
    pub services: Vec<String>,
    pub files: Vec<ApplyFile>,
    pub commands: Vec<ApplyCommand>,
    pub success: bool,
    pub reboot_required: bool,
    pub duration_ms: u64,
}

/// One configuration file of an apply.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ApplyFile {
    pub name: String,
    pub path: String,
    pub result: crate::apply::FileResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One restart command of an apply.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ApplyCommand {
    pub service: String,
    pub argv: Vec<String>,
    pub success: bool,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ApplyEvent {
    /// The event of `report`, an apply of generation `generation`.
    pub fn of(report: &crate::apply::ApplyReport, generation: u64) -> ApplyEvent {
        let (keys, keys_omitted) = first_keys(&report.keys);
        ApplyEvent {
            id: report.id,
            generation,
            keys,
            keys_omitted,
            services: report.services.keys().cloned().collect(),
            files: report
                .files
                .iter()
                .map(|f| ApplyFile {
                    name: f.name.clone(),
                    path: f.path.clone(),
                    result: f.result,
                    error: f.error.clone(),
                })
                .collect(),
            commands: report
                .commands
                .iter()
                .map(|c| ApplyCommand {
                    service: c.service.clone(),
                    argv: c.argv.clone(),
                    success: c.success,
                    exit_code: c.exit_code,
                    timed_out: c.timed_out,
                    error: c.error.clone(),
                })
                .collect(),
            success: report.success,
            reboot_required: report.reboot_required,
            duration_ms: report.duration_ms,
        }
    }
}

/// A host or bootstrap container changed state (as `GET /containers` shows it).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ContainerEvent {
    pub name: String,
    pub container_kind: ContainerKind,
    /// `null` when keeld starts tracking the container.
    pub from: Option<RunState>,
    /// `null` when keeld stops tracking it (disabled and removed).
    pub to: Option<RunState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i32>,
    pub restarts: u32,
}

/// The boot moved to another phase.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BootPhaseEvent {
    pub boot_id: String,
    /// `null` for the phase this keeld found the boot in when it started.
    pub from: Option<BootPhase>,
    pub to: BootPhase,
    /// Why the boot failed (`to` is `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// New `settings.boot` parameters whose trial boot (the boot before) did not reach
    /// `configured`: this boot came back without them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_parameters: Option<String>,
}

/// The update state changed (published by the updates API).
///
/// `state` is text because the update state machine belongs to the updates module; it
/// uses that module's names (Bottlerocket's are `Idle`, `Available`, `Staged`, `Ready`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct UpdateEvent {
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<String>,
    /// Whatever else says what happened (versions, the command that ran, its outcome);
    /// `null` when there is nothing more.
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl UpdateEvent {
    /// `EventBus::publish(EventBody::Update(UpdateEvent::new("staged", Some("available"),
    /// json!({"version": "1.2.0"}))))`.
    pub fn new(
        state: impl Into<String>,
        previous_state: Option<&str>,
        detail: serde_json::Value,
    ) -> Self {
        UpdateEvent {
            state: state.into(),
            previous_state: previous_state.map(str::to_owned),
            detail,
        }
    }
}
