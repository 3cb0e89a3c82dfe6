//! keeld, Keel's host agent, as a library: `main.rs` parses flags and calls [`run`].
//!
//! Modules, one per concern: [`api`] (routes, one file per resource), [`store`]
//! (datastore, transactions, generations), [`apply`] (services metadata, render and
//! restart), [`events`] (the event bus behind `GET /events`), [`config`] (flags), [`os`]
//! (what `/os` reports), [`updates`] (A/B image updates from a TUF repository,
//! Bottlerocket's update API), [`log_budget`] (routine log lines under load).

pub mod api;
pub mod apply;
pub mod boot;
pub mod config;
pub mod containers;
pub mod events;
pub mod log_budget;
pub mod os;
pub mod reboot;
pub mod sandbox;
pub mod store;
pub mod updates;

use std::sync::Arc;

pub use config::Config;

/// Why keeld could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("datastore: {0}")]
    Store(#[from] store::StoreError),
    #[error("services metadata: {0}")]
    Services(#[from] apply::ServicesError),
    #[error("templates: {0}")]
    Templates(#[from] apply::render::RenderError),
    #[error("API socket: {0}")]
    Socket(#[from] api::server::SocketError),
    #[error("containerd: {0}")]
    Containerd(#[from] containers::client::ConnectError),
    #[error("os-release: {0}")]
    OsRelease(#[from] os::OsReleaseError),
    #[error("API group {0:?} does not exist (looked up in /etc/group)")]
    UnknownGroup(String),
}

/// Opens the store, binds the socket (or takes the one systemd passed, `activation`)
/// and serves until SIGTERM or SIGINT.
pub async fn run(config: Config, activation: api::server::Activation) -> Result<(), AgentError> {
    let meta = apply::ServicesMeta::load(&config.services)?;
    let templates = apply::render::Templates::load(&config.templates)?;
    let os = match &config.os_release {
        Some(path) => os::OsInfo::from_os_release(path)?,
        None => os::OsInfo::current(&config.variant),
    };
    // One bus for every publisher; its stream id is this start's (see `events`).
    let events = events::EventBus::new(usize::try_from(config.event_buffer).unwrap_or(usize::MAX));
    let applier = apply::Applier::new(
        meta,
        templates,
        apply::ApplyConfig {
            render_root: config.render_root.clone(),
            restart_timeout: config.restart_timeout.into(),
            journal_dir: Some(config.runtime_dir.clone()),
            events: events.clone(),
            boot_loader: config.boot_loader(),
        },
        serde_json::to_value(&os).unwrap_or_default(),
    );
    // Temporary files of whole-file replacements (the settings-format record, staged
    // boot parameters, the update record) a crash of an earlier keeld left; each names
    // its writer's process, so a live one's would be kept.
    for dir in [config.state_dir.clone(), config.state_dir.join("updates")] {
        let swept = updates::durable::sweep_temps(&dir);
        if swept > 0 {
            tracing::info!(dir = %dir.display(), files = swept, "removed temporary files a crash left");
        }
    }
    let store = store::Store::open_with_check(
        &config.state_dir,
        usize::try_from(config.history).unwrap_or(usize::MAX),
        Some(Arc::new(applier.clone())),
        events.clone(),
    )?;
    // Before anything reads the settings: carry them to this image's format (up after
    // an update, down after a rollback).
    match store::migrate::load_image_migrations(&config.migrations) {
        Ok(migrations) => {
            match store::migrate::at_start(&store, &config.state_dir, &migrations).await {
                Ok(Some(done)) => tracing::info!(
                    from_low = done.from_low,
                    from_high = done.from_high,
                    to = done.to,
                    changed = ?done.changed,
                    "settings migrated"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "settings migration failed; the settings stay as they were")
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the image's settings migrations; none run")
        }
    }
    if let Err(e) = settings_model::validate(store.snapshot().live_settings()) {
        tracing::error!(error = %e, "the live settings do not pass this keeld's model (a settings migration missing from the image?)");
    }
    // The apply journal of an earlier keeld in this boot: its log, and an apply it did
    // not finish (read before serving, so /apply/log never starts empty).
    let journal = applier.load_journal();
    let swept = applier.sweep_temps();
    if swept > 0 {
        tracing::info!(
            files = swept,
            "removed temp files left by an interrupted apply"
        );
    }
    let gid = config.api_gid()?;
    let board = containers::status::StatusBoard::new(events.clone());
    let log_dir = config.runtime_dir.join("logs");
    let cd = containers::client::Containerd::connect(
        &config.containerd_socket,
        &config.containerd_namespace,
    )?;
    let exec_engine =
        containers::exec::ContainerdExec::new(cd.clone(), board.clone(), &config.runtime_dir);
    {
        // Exec processes a keeld that died left behind: killed, removed. Listed now,
        // before the API serves, so that none of this keeld's sessions is among them.
        let leftovers = containers::exec::leftovers(exec_engine.dir());
        if !leftovers.is_empty() {
            tracing::info!(
                found = leftovers.len(),
                "removing exec processes of an earlier keeld"
            );
            let (cd, dir) = (cd.clone(), exec_engine.dir().to_owned());
            tokio::spawn(
                async move { containers::exec::sweep_leftovers(&cd, &dir, leftovers).await },
            );
        }
    }
    let exec = api::exec::ExecService::new(exec_engine);
    // Containers mount copies of /etc/hosts and /etc/resolv.conf (as rendered under the
    // render root) that follow the originals in place (a bind mount of the original
    // would keep its first inode); made before any container starts.
    let host_files = containers::host_files::HostFiles::new(
        config.runtime_dir.join("host-etc"),
        &config.render_root,
    );
    if let Err(e) = host_files.sync() {
        tracing::error!(error = %e, "cannot copy /etc/hosts and /etc/resolv.conf for containers; retried every 2 s; until then containers cannot start");
    }
    tokio::spawn(host_files.clone().follow());
    let runtime = Arc::new(containers::runtime::ContainerdRuntime::new(
        cd,
        containers::runtime::RuntimePaths {
            persistent_dir: config.persistent_dir.clone(),
            api_socket: config.socket.clone(),
            apiclient: config
                .apiclient
                .clone()
                .unwrap_or_else(|| config::sibling_binary("apiclient")),
            logger: config
                .container_logger
                .clone()
                .unwrap_or_else(|| config::sibling_binary("keel-logger")),
            log_dir: log_dir.clone(),
            host_files: host_files.clone(),
        },
    ));
    let supervision = containers::supervisor::SupervisorConfig {
        grace: config.stop_grace.into(),
        backoff_initial: config.restart_backoff.into(),
        backoff_max: config.restart_backoff_max.into(),
        ..Default::default()
    };
    let (boot_publish, boot_view) =
        tokio::sync::watch::channel(boot::status::BootRecord::new(false));
    let (configured_tx, configured_rx) = tokio::sync::watch::channel(boot::BootGate::Pending);
    let apiclient = runtime.paths.apiclient.clone();
    let stop_applier = applier.clone();
    let os = Arc::new(os);
    let updates =
        updates::Updates::open(config.updates(), store.clone(), os.clone(), events.clone());
    tokio::spawn({
        let updates = updates.clone();
        async move { updates.reconcile().await }
    });
    let state = api::AppState::new(api::Services {
        store: store.clone(),
        applier: applier.clone(),
        boot: boot_view,
        updates,
        os,
        reboot_command: Arc::new(config.reboot_command.clone()),
        containers: api::containers::ContainersView {
            board: board.clone(),
            log_dir,
        },
        exec: exec.clone(),
        events: events.clone(),
    });
    let policy = api::AccessPolicy {
        api_gid: gid,
        own_uid: rustix::process::geteuid().as_raw(),
    };
    let (listener, activated) = match api::server::inherited(&config.socket, activation)? {
        Some(listener) => {
            tracing::info!(socket = %config.socket.display(), "using the socket systemd passed");
            if let Err(e) = api::server::correct_socket(&config.socket, config.socket_mode, gid) {
                tracing::warn!(error = %e, "cannot check the inherited socket's mode and group");
            }
            (listener, true)
        }
        None => (
            api::server::bind(&config.socket, config.socket_mode, gid)?,
            false,
        ),
    };
    tokio::spawn(api::server::guard_socket(
        config.socket.clone(),
        config.socket_mode,
        gid,
    ));
    tracing::info!(socket = %config.socket.display(), state_dir = %config.state_dir.display(), "keeld serving");
    // The socket answers from here on: tell systemd (a no-op without NOTIFY_SOCKET).
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
    let boot = boot::Boot {
        config: boot::BootConfig {
            state_dir: config.state_dir.clone(),
            runtime_dir: config.runtime_dir.clone(),
            os_defaults: config.os_defaults.clone(),
            providers: config.providers(),
            user_data_every_boot: config.user_data_every_boot,
            apiclient,
            socket: config.socket.clone(),
            reboot_command: config.reboot_command.clone(),
            clock: boot::BootClock::kernel(),
        },
        store: store.clone(),
        applier,
        runtime: runtime.clone(),
        board: board.clone(),
        publish: boot_publish,
        events: events.clone(),
        configured: configured_tx,
    };
    let (recovery_applier, recovery_store) = (boot.applier.clone(), store.clone());
    tokio::spawn(async move {
        // A commit acknowledged by a keeld that died before its apply finished: bring
        // the render root in line with the live settings before the boot goes on.
        recovery_applier.recover(&recovery_store, journal).await;
        boot.run().await
    });
    // A boot on trial after an update is good once it is configured.
    tokio::spawn({
        let updates = state.updates.clone();
        let mut configured = configured_rx.clone();
        async move {
            if configured
                .wait_for(|gate| *gate == boot::BootGate::Configured)
                .await
                .is_ok()
            {
                updates.boot_configured().await;
            }
        }
    });
    tokio::spawn(containers::run_host_containers(
        store,
        runtime,
        board,
        supervision,
        configured_rx,
    ));
    // Stopping ends the event streams that follow (after what is buffered), so that
    // they do not hold the drain up until the grace runs out.
    // One grace for the whole stop, from the signal: the drain, the exec sessions and the
    // applies share it, so that keeld exits within it (below systemd's stop timeout)
    // instead of waiting for each in turn.
    let shutdown_grace: std::time::Duration = config.shutdown_grace.into();
    let stop_began = std::sync::Arc::new(std::sync::OnceLock::new());
    let began = stop_began.clone();
    // Event streams, and the wake-ups of their followers, on a thread of their own.
    let streams = api::server::StreamThread::start();
    if let Some(streams) = &streams {
        events.wake_followers_on(streams.handle().clone());
    }
    let stopping = async move {
        shutdown_signal().await;
        let _ = began.set(tokio::time::Instant::now());
        events.close();
    };
    let drained = api::server::serve(
        listener,
        api::router(state, policy),
        stopping,
        shutdown_grace,
        streams.as_ref(),
    )
    .await;
    tracing::info!(drained, "keeld stopping");
    let deadline = stop_began
        .get()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now)
        + shutdown_grace;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    // Exec sessions outlive their HTTP connection (an upgrade): end them, killing their
    // processes, so that none is left running without its client (the kill itself is
    // not held to the grace's remainder: a second at least).
    if !exec
        .stop(left().max(std::time::Duration::from_secs(1)))
        .await
    {
        tracing::warn!("exec sessions still running after the shutdown grace");
    }
    // Applies run on tasks of their own (a request that hung up does not cancel them):
    // let the one running, and those queued, finish before the runtime is dropped.
    if tokio::time::timeout_at(deadline, stop_applier.idle())
        .await
        .is_err()
    {
        tracing::warn!("an apply is still running after the shutdown grace; the next keeld start finishes it (apply journal)");
    }
    // A clean stop leaves no socket for clients to find dead; after a crash the next
    // start replaces it. A socket systemd passed is systemd's: it stays, and clients
    // wait in its backlog for the next keeld.
    if !activated {
        let _ = std::fs::remove_file(&config.socket);
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers keeld still stops on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
