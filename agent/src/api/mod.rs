//! The local API: HTTP/1.1 on a Unix socket, wire-compatible with Bottlerocket's
//! apiserver for the endpoints it shares (see DESIGN.md, "The local API").
//!
//! Owns routing, request parsing and answers. One file per resource; handlers parse and
//! answer, and call a small set of operations on the store and the applier — no handler
//! writes files itself.

pub mod actions;
pub mod boot;
pub mod containers;
pub mod error;
pub mod events;
pub mod exec;
pub mod history;
pub mod input;
pub mod metadata;
pub mod peer;
mod repoll;
pub mod root;
pub mod server;
pub mod settings;
pub mod tx;
pub mod updates;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, patch, post};
use axum::Router;

use crate::apply::Applier;
use crate::containers::exec::ContainerdExec;
use crate::os::OsInfo;
use crate::store::Store;
use error::ApiError;
pub use peer::{AccessPolicy, Peer};

/// Everything a handler may touch. axum hands each request its own copy of the state:
/// one shared pointer, not one reference count per service.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        AppState(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

/// What [`AppState`] holds.
#[derive(Debug)]
pub struct Services {
    pub store: Store,
    pub applier: Applier,
    pub os: Arc<OsInfo>,
    /// argv of the reboot command for `POST /actions/reboot`.
    pub reboot_command: Arc<Vec<String>>,
    pub containers: containers::ContainersView,
    pub boot: tokio::sync::watch::Receiver<crate::boot::status::BootRecord>,
    pub events: crate::events::EventBus,
    pub exec: exec::ExecService<ContainerdExec>,
    pub updates: crate::updates::Updates,
}

impl axum::extract::FromRef<AppState> for exec::ExecService<ContainerdExec> {
    fn from_ref(state: &AppState) -> Self {
        state.exec.clone()
    }
}

/// The whole API, with the access check layered over every route.
pub fn router(state: AppState, policy: AccessPolicy) -> Router {
    Router::new()
        .route("/", get(root::get_root))
        .route("/os", get(root::get_os))
        .route(
            "/settings",
            get(settings::get_settings).patch(settings::patch_settings),
        )
        .route("/settings/keypair", patch(settings::patch_keypair))
        .route("/tx", get(tx::get_tx).delete(tx::delete_tx))
        .route("/tx/list", get(tx::list))
        .route("/tx/commit", post(tx::commit))
        .route("/tx/apply", post(tx::apply))
        .route("/tx/commit_and_apply", post(tx::commit_and_apply))
        .route("/tx/dry-run", post(tx::dry_run))
        .route("/apply/log", get(history::apply_log))
        .route(
            "/metadata/affected-services",
            get(metadata::affected_services),
        )
        .route("/services", get(metadata::services))
        .route("/configuration-files", get(metadata::configuration_files))
        .route("/actions/reboot", post(actions::reboot))
        .route("/updates/status", get(updates::status))
        .route("/actions/refresh-updates", post(updates::refresh))
        .route("/actions/prepare-update", post(updates::prepare))
        .route("/actions/activate-update", post(updates::activate))
        .route("/actions/deactivate-update", post(updates::deactivate))
        .route("/history", get(history::list))
        .route("/history/rollback", post(history::rollback))
        .route("/boot", get(boot::status))
        .route("/containers", get(containers::list))
        .route("/containers/{name}/logs", get(containers::logs))
        .route("/exec", get(exec::upgrade::<ContainerdExec>))
        .route("/events", get(events::stream))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            policy,
            peer::require_access,
        ))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such resource: {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
