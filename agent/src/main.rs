//! keeld: parses flags, sets up logging, and runs the agent.

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let config = keel_agent::Config::parse();
    // KEELD_LOG unset: info. Set but not a filter: said below, once logging is up, and
    // info (a typo in a debugging aid does not keep the host's agent from starting).
    let (filter, bad_filter) = match std::env::var("KEELD_LOG") {
        Err(_) => (EnvFilter::new("info"), None),
        Ok(text) => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new("info"), Some((text, e.to_string()))),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    if let Some((text, error)) = bad_filter {
        tracing::error!(KEELD_LOG = %text, %error, "KEELD_LOG is not a log filter; logging at info instead");
    }
    // The sandbox goes on before any thread or child exists, so all inherit it.
    if config.no_sandbox {
        tracing::warn!("--no-sandbox: keeld runs WITHOUT its sandbox (all capabilities, no seccomp filter, no no_new_privs); for debugging only");
    } else {
        match keel_agent::sandbox::install() {
            Ok(()) => tracing::info!(
                kept_capabilities = ?keel_agent::sandbox::KEPT_CAPABILITIES.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>(),
                denied_syscalls = keel_agent::sandbox::DENIED_SYSCALLS.len(),
                "sandbox installed"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot install keeld's sandbox; refusing to run without it (--no-sandbox to debug)");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    if config.accept_state_loss {
        match keel_agent::store::Store::recover(&config.state_dir) {
            Ok(Some(recovered)) => tracing::error!(
                reason = %recovered.reason,
                continued_from = recovered.continued_from,
                generation = recovered.generation,
                discarded_pending = ?recovered.discarded_pending,
                "--accept-state-loss: the damaged state is gone; remove the flag now"
            ),
            Ok(None) => tracing::warn!(
                "--accept-state-loss: the store is intact, nothing was changed; remove the flag"
            ),
            Err(e) => {
                tracing::error!(error = %e, "--accept-state-loss: cannot recover the store");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    // Before any thread exists: taking the descriptors unsets environment variables.
    let activation = keel_agent::api::server::Activation::take();
    // A commit's leader blocks its worker on disk I/O for one batch (store::writer), so
    // there are at least two workers: the other keeps serving reads. More workers than
    // cores cost more than they give: an idle worker woken for each request is a context
    // switch (with four on two cores, futex wake-ups were a sixth of keeld's CPU per
    // commit).
    let workers = std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .clamp(2, 4);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keel_agent::run(config, activation)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "keeld failed");
            std::process::ExitCode::FAILURE
        }
    }
}
