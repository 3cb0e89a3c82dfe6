//! keeld's command-line flags.

use std::path::PathBuf;

use clap::Parser;

use crate::AgentError;

/// keeld: owns this host's settings and serves the local API on a Unix socket.
#[derive(Debug, Clone, Parser)]
#[command(name = "keeld", version, about, long_about = None)]
pub struct Config {
    /// Path of the API socket.
    #[arg(long, default_value = "/run/api.sock", env = "KEELD_SOCKET")]
    pub socket: PathBuf,
    /// Group (name or numeric id) allowed to use the API besides root.
    #[arg(long, default_value = "api")]
    pub socket_group: String,
    /// Mode of the API socket, in octal.
    #[arg(long, default_value = "660", value_parser = parse_octal)]
    pub socket_mode: u32,
    /// State directory: generations and pending transactions.
    #[arg(long, default_value = "/var/lib/keel", env = "KEELD_STATE_DIR")]
    pub state_dir: PathBuf,
    /// How many generations to keep for history and rollback (a commit appends its own
    /// generation; all kept ones are rewritten only when the log is compacted).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub history: u64,
    /// services.toml: services, their configuration files and affected settings.
    #[arg(long, default_value = "/usr/share/keel/services.toml")]
    pub services: PathBuf,
    /// Directory of the configuration-file templates.
    #[arg(long, default_value = "/usr/share/keel/templates")]
    pub templates: PathBuf,
    /// Root under which configuration files are rendered (a tmpfs on a real host).
    #[arg(long, default_value = "/")]
    pub render_root: PathBuf,
    /// How long one restart command may run before it is killed (e.g. 30s, 2m).
    #[arg(long, default_value = "30s")]
    pub restart_timeout: humantime::Duration,
    /// Reboot command (argv, no shell) run by `POST /actions/reboot`.
    #[arg(long, num_args = 1.., default_values = ["systemctl", "reboot"])]
    pub reboot_command: Vec<String>,
    /// Variant reported by `GET /os` when there is no --os-release.
    #[arg(long, default_value = "keel-dev")]
    pub variant: String,
    /// The image's os-release file, whose VERSION_ID, VARIANT_ID, BUILD_ID and
    /// PRETTY_NAME `GET /os` reports (a Keel OS image sets it to /usr/lib/os-release);
    /// without it, keeld's own version and --variant.
    #[arg(long, env = "KEELD_OS_RELEASE")]
    pub os_release: Option<PathBuf>,
    /// The image's settings migrations (packaging/migrations.toml); absent: none
    /// (settings format 1).
    #[arg(long, default_value = "/usr/share/keel/migrations.toml")]
    pub migrations: PathBuf,
    /// The update repository's trusted root.json, shipped in the image.
    #[arg(long, default_value = "/usr/share/keel/updates/root.json")]
    pub update_root: PathBuf,
    /// The socket of keel-slot-writer, the helper that writes the inactive slot and the
    /// ESP (keel-slot-writer.socket).
    #[arg(long, default_value = "/run/keel-slot-writer/writer.sock")]
    pub update_writer_socket: PathBuf,
    /// Instead of the socket: the slot writer command keeld starts for each update
    /// command, arguments separated by spaces (e.g. "/usr/bin/keel-slot-writer --esp /efi").
    #[arg(long)]
    pub update_writer_command: Option<String>,
    /// Boot attempts a newly activated slot gets before the boot loader falls back.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub update_tries: u32,
    /// Time to connect to the update repository.
    #[arg(long, default_value = "10s")]
    pub update_connect_timeout: humantime::Duration,
    /// Time the update repository may go without sending anything (its answer, or the
    /// next piece of a download) before the command fails.
    #[arg(long, default_value = "30s")]
    pub update_read_timeout: humantime::Duration,
    /// Time the repository's metadata and manifest may take in all, at a refresh and at
    /// the start of a prepare (they are megabytes at most: a repository sending them a
    /// byte at a time, within the read timeout, fails the command instead of holding the
    /// update lock for days).
    #[arg(long, default_value = "10m")]
    pub update_metadata_timeout: humantime::Duration,
    /// Time a prepare's downloads may take in all (the images of an update, hundreds of
    /// megabytes: two hours is 1 Mbit/s for 900 MB). A repository trickling them within
    /// the read timeout fails the prepare instead of holding the update lock for days.
    #[arg(long, default_value = "2h")]
    pub update_download_timeout: humantime::Duration,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// containerd's socket (keeld connects on first use and reconnects after restarts).
    #[arg(long, default_value = "/run/host-containerd/containerd.sock")]
    pub containerd_socket: PathBuf,
    /// containerd namespace for keeld's containers, images and snapshots.
    #[arg(long, default_value = "keel")]
    pub containerd_namespace: String,
    /// Runtime directory (a tmpfs): container logs.
    #[arg(long, default_value = "/run/keel")]
    pub runtime_dir: PathBuf,
    /// Persistent directory: `host-containers/<name>` and `bootstrap-containers/<name>`.
    #[arg(long, default_value = "/local")]
    pub persistent_dir: PathBuf,
    /// The apiclient binary mounted into containers [default: beside keeld].
    #[arg(long)]
    pub apiclient: Option<PathBuf>,
    /// The keel-logger binary containerd's shim runs for container output [default:
    /// beside keeld].
    #[arg(long)]
    pub container_logger: Option<PathBuf>,
    /// Between SIGTERM and SIGKILL when a host container is stopped.
    #[arg(long, default_value = "10s")]
    pub stop_grace: humantime::Duration,
    /// How long a stopping keeld waits, from SIGTERM, for the requests in flight, exec
    /// sessions and the applies running or queued (one limit for all) before it exits
    /// anyway; an apply cut short is finished at the next start (apply journal). Keep it
    /// below the service manager's stop timeout (systemd's default: 90s).
    #[arg(long, default_value = "45s")]
    pub shutdown_grace: humantime::Duration,
    /// First delay before an exited host container starts again; it doubles each time.
    #[arg(long, default_value = "1s")]
    pub restart_backoff: humantime::Duration,
    /// The longest delay between restarts of an exited host container.
    #[arg(long, default_value = "5m")]
    pub restart_backoff_max: humantime::Duration,
    /// The OS defaults staged into `launch` at first boot (absent: none).
    #[arg(long, default_value = "/usr/share/keel/defaults.toml")]
    pub os_defaults: PathBuf,
    /// User-data providers in the order they run at first boot, comma-separated, from
    /// defaults, imds, qemu, file, overrides (EC2 hosts add imds; a qemu guest given
    /// user-data with `-fw_cfg name=opt/keel/user-data,file=…` adds qemu).
    #[arg(
        long,
        default_value = "defaults,file,overrides",
        env = "KEELD_USER_DATA_PROVIDERS",
        value_parser = parse_providers
    )]
    pub user_data_providers: String,
    /// The `defaults` provider's file.
    #[arg(long, default_value = "/local/user-data-defaults.toml")]
    pub user_data_defaults: PathBuf,
    /// The `file` provider's file.
    #[arg(long, default_value = "/local/user-data.toml")]
    pub user_data_file: PathBuf,
    /// The `overrides` provider's file.
    #[arg(long, default_value = "/local/user-data-overrides.toml")]
    pub user_data_overrides: PathBuf,
    /// The instance metadata service (`imds` provider), http only.
    #[arg(long, default_value = "http://169.254.169.254")]
    pub imds_endpoint: String,
    /// How long the `imds` provider keeps retrying before the boot fails; then the
    /// budget of the metadata reads for derived settings (skipped, not failed, past it).
    #[arg(long, default_value = "5m")]
    pub imds_timeout: humantime::Duration,
    /// Run the user-data providers at every boot, not only the first.
    #[arg(long)]
    pub user_data_every_boot: bool,
    /// Debugging only: do not drop capabilities, set no_new_privs or install the
    /// seccomp filter.
    #[arg(long)]
    pub no_sandbox: bool,
    /// How many events `GET /events` keeps for clients to read or resume from (`?since=`);
    /// a client that falls further behind is told how many it lost.
    #[arg(long, default_value_t = crate::events::DEFAULT_CAPACITY as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub event_buffer: u64,
    /// Recovery, by hand, once: if a damaged, cut-short or missing generation slot
    /// stops keeld from starting, continue from the newest intact state (an empty store if
    /// none is left) and record that as a generation named `accept-state-loss`; what the
    /// damaged file held, and every pending transaction, is lost. No effect on an intact
    /// store. Keep a copy of the state directory first.
    #[arg(long)]
    pub accept_state_loss: bool,
}

fn parse_providers(text: &str) -> Result<String, String> {
    crate::boot::providers::parse_order(text).map(|_| text.to_owned())
}

/// A binary installed beside keeld (`apiclient`, `keel-logger`).
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from("/usr/bin").join(name))
}

fn parse_octal(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal mode like 660"))
}

impl Config {
    /// The user-data providers, in order.
    pub fn providers(&self) -> Vec<crate::boot::providers::Provider> {
        use crate::boot::providers::Provider;
        let names =
            crate::boot::providers::parse_order(&self.user_data_providers).unwrap_or_default();
        names
            .iter()
            .filter_map(|name| match name.as_str() {
                "defaults" => Some(Provider::Defaults(self.user_data_defaults.clone())),
                "qemu" => Some(Provider::Qemu(PathBuf::from(
                    crate::boot::providers::QEMU_FW_CFG_USER_DATA,
                ))),
                "imds" => Some(Provider::Imds(crate::boot::imds::ImdsConfig {
                    endpoint: self.imds_endpoint.clone(),
                    deadline: self.imds_timeout.into(),
                    ..Default::default()
                })),
                "file" => Some(Provider::File(self.user_data_file.clone())),
                "overrides" => Some(Provider::Overrides(self.user_data_overrides.clone())),
                _ => None,
            })
            .collect()
    }

    /// How keeld reaches keel-slot-writer (updates, and the boot parameters in the loader
    /// entries).
    pub fn update_writer(&self) -> crate::updates::writer_client::WriterEndpoint {
        use crate::updates::writer_client::WriterEndpoint;
        match &self.update_writer_command {
            Some(command) => WriterEndpoint::Command(
                command
                    .split_ascii_whitespace()
                    .map(str::to_owned)
                    .collect(),
            ),
            None => WriterEndpoint::Socket(self.update_writer_socket.clone()),
        }
    }

    /// Where `settings.boot`'s parameters go: the slot writer, when Keel's loader entries
    /// booted this host (`keel.slot=` on the kernel command line) or a writer command is
    /// given (tests); `None` on other hosts, where setting them fails the apply.
    pub fn boot_loader(&self) -> Option<crate::apply::BootLoader> {
        let keel_boot = std::fs::read_to_string("/proc/cmdline")
            .map(|line| {
                line.split_ascii_whitespace()
                    .any(|w| w.starts_with("keel.slot="))
            })
            .unwrap_or(false);
        (keel_boot || self.update_writer_command.is_some()).then(|| crate::apply::BootLoader {
            writer: self.update_writer(),
            staged: self.state_dir.join("boot-parameters"),
            failed: self.state_dir.join("boot-parameters.failed"),
        })
    }

    /// How keeld updates this host.
    pub fn updates(&self) -> crate::updates::UpdatesConfig {
        let writer = self.update_writer();
        crate::updates::UpdatesConfig {
            repository: crate::updates::repository::RepositoryConfig {
                root: self.update_root.clone(),
                datastore: self.state_dir.join("updates/tuf"),
                timeouts: crate::updates::transport::Timeouts {
                    connect: self.update_connect_timeout.into(),
                    read: self.update_read_timeout.into(),
                    metadata: self.update_metadata_timeout.into(),
                    download: self.update_download_timeout.into(),
                },
            },
            writer: Some(writer),
            record: self.state_dir.join("updates/status.json"),
            tries: self.update_tries,
        }
    }

    /// The API group's id: numeric as given, or looked up by name in /etc/group.
    pub fn api_gid(&self) -> Result<Option<u32>, AgentError> {
        if let Ok(gid) = self.socket_group.parse::<u32>() {
            return Ok(Some(gid));
        }
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        groups
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let gid = fields.nth(1)?.parse::<u32>().ok()?;
                Some((name, gid))
            })
            .find(|(name, _)| *name == self.socket_group)
            .map(|(_, gid)| Some(gid))
            .ok_or_else(|| AgentError::UnknownGroup(self.socket_group.clone()))
    }
}
