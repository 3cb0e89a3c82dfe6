//! keel-slot-writer: the one process that writes the inactive slot's partitions and the
//! ESP, for keeld's update commands. One session on stdin/stdout: started by systemd per
//! connection (`keel-slot-writer.socket`, `Accept=yes`) or by keeld itself
//! (`--update-writer-command`). See `keel_agent::updates::writer` for what it checks.

use std::path::PathBuf;

use clap::Parser;
use keel_agent::updates::loader::EspLayout;
use keel_agent::updates::slots::SlotLayout;
use keel_agent::updates::writer::{serve, WriterConfig};

/// Writes the inactive A/B slot and its boot files for keeld; never the running slot.
#[derive(Debug, Parser)]
#[command(name = "keel-slot-writer", version, about, long_about = None)]
struct Args {
    /// Directory of partition labels holding keel-root-{a,b} and keel-verity-{a,b}.
    #[arg(long, default_value = "/dev/disk/keel-boot")]
    partitions: PathBuf,
    /// The EFI system partition's mount point.
    #[arg(long, default_value = "/efi")]
    esp: PathBuf,
    /// The kernel command line (its keel.slot= names the running slot).
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// This boot's id.
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id")]
    boot_id: PathBuf,
    /// How long a request that writes a slot waits for another session's writes and
    /// checks to end before it is refused (under keeld's 60 s wait for an answer).
    #[arg(long, default_value = "45s", value_parser = humantime::parse_duration)]
    session_wait: std::time::Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // As keeld: KEELD_LOG unset is info; set but not a filter is info, and said.
    let (filter, bad_filter) = match std::env::var("KEELD_LOG") {
        Err(_) => (tracing_subscriber::EnvFilter::new("info"), None),
        Ok(text) => match tracing_subscriber::EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(e) => (
                tracing_subscriber::EnvFilter::new("info"),
                Some((text, e.to_string())),
            ),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    if let Some((text, error)) = bad_filter {
        tracing::error!(KEELD_LOG = %text, %error, "KEELD_LOG is not a log filter; logging at info instead");
    }
    let config = WriterConfig {
        slots: SlotLayout {
            cmdline: args.cmdline,
            ..SlotLayout::host(args.partitions)
        },
        esp: EspLayout { esp: args.esp },
        boot_id: args.boot_id,
        session_wait: args.session_wait,
    };
    let swept = keel_agent::updates::durable::sweep_temps(&config.esp.entries_dir());
    if swept > 0 {
        tracing::info!(
            files = swept,
            "removed temporary loader entries a crash left"
        );
    }
    for slot in [
        keel_agent::updates::slots::Slot::A,
        keel_agent::updates::slots::Slot::B,
    ] {
        keel_agent::updates::durable::sweep_temps(&config.esp.slot_dir(slot));
    }
    let mut input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock());
    let mut output = std::io::stdout().lock();
    match serve(&config, &mut input, &mut output) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "session failed");
            std::process::ExitCode::FAILURE
        }
    }
}
