//! The OCI runtime spec (runtime-spec 1.0.2 field names) for one Keel container.
//!
//! The base is what containerd 1.6 builds by default (its default Linux spec plus its default
//! unix device rules, checked against containerd 1.6.20): default capabilities, rlimits, the
//! standard mounts, masked and read-only paths, and the device cgroup rules. The privilege tier
//! (DESIGN.md, "Containers") then decides capabilities, seccomp, no_new_privileges, the PID
//! namespace and device access, and adds the mounts Bottlerocket-style images expect.
//!
//! Namespaces: every tier shares the host's network namespace (no "network" entry) and keeps
//! private mount, IPC and UTS namespaces, as Bottlerocket's host containers do. The spec sets
//! no `hostname`, so runc leaves the new UTS namespace as a copy of the host's: the container
//! sees the host's hostname but cannot change it. Host containers get a private PID namespace;
//! superpowered and bootstrap containers share the host's.
//!
//! Devices: host containers get containerd's default unix devices (a deny-all cgroup rule,
//! then allow rules for the standard character devices; runc creates the nodes in a tmpfs
//! `/dev`). Superpowered and bootstrap containers get every device: an allow-all cgroup rule and
//! the host's `/dev` bind-mounted (rslave, so hot-plugged disks appear). With the host's `/dev`
//! the host's `/dev/pts` comes along and no private devpts instance is mounted over it: the
//! host's `/dev/ptmx` allocates terminals in the host's devpts instance, so a private instance
//! would hide every terminal the container opens.
//!
//! `/etc/resolv.conf` and `/etc/hosts` are bind-mounted read-only from the host so that name
//! resolution works with the host network.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::seccomp;

/// A container's privilege tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// A host container.
    Host,
    /// A superpowered host container.
    Superpowered,
    /// A bootstrap container.
    Bootstrap,
}

impl Tier {
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::Host => "host",
            Tier::Superpowered => "superpowered",
            Tier::Bootstrap => "bootstrap",
        }
    }
}

/// The image's run configuration (the `config` object of the OCI image config): `Env`,
/// `Entrypoint`, `Cmd`, `WorkingDir` and `User` are what the spec uses; an empty string
/// counts as absent.
pub use oci_spec::image::Config as ImageConfig;

/// Everything [`build`] needs to know about one container.
#[derive(Debug)]
pub struct SpecRequest<'a> {
    /// Container name, already validated `[A-Za-z0-9-]` (checked again: it becomes part of paths).
    pub name: &'a str,
    pub tier: Tier,
    pub image: &'a ImageConfig,
    /// Replaces the image's entrypoint and cmd when `Some`.
    pub command: Option<&'a [String]>,
    /// Appended after the image's environment; a name the image also sets replaces its value.
    pub environment: &'a [(String, String)],
    /// "CAP_…" names added for Host and Bootstrap (Superpowered already has all); every name
    /// is checked against [`ALL_CAPABILITIES`] whatever the tier.
    pub extra_capabilities: &'a [String],
    pub memory_limit_bytes: Option<i64>,
    /// Becomes a CFS quota over a [`CPU_PERIOD_US`] period; at least 10 (a 1 ms quota).
    pub cpu_limit_millicores: Option<u64>,
    /// Host directory mounted read-write at `/.bottlerocket/host-containers/<name>`
    /// (Host, Superpowered) or `/.bottlerocket/bootstrap-containers/<name>` (Bootstrap).
    pub persistent_dir: &'a Path,
    /// Host path of the API socket, bind-mounted at `/run/api.sock`.
    pub api_socket: &'a Path,
    /// Host path of the `apiclient` binary, bind-mounted read-only at `/usr/local/bin/apiclient`.
    pub apiclient: &'a Path,
    /// Parent cgroup, e.g. "keel": `cgroupsPath` is `/<cgroup_parent>/<name>`.
    pub cgroup_parent: &'a str,
    /// Whether the host has `/lib/modules` to bind into a superpowered container (a
    /// host without loadable modules has none, and runc refuses a missing source).
    pub mount_host_modules: bool,
    /// The host's capability bounding set (bit n = capability n), which limits what a
    /// superpowered container gets; `u64::MAX` for all.
    pub host_capabilities: u64,
}

/// The capability bounding set of the host's init process, which nothing on the host can
/// exceed; all capabilities when it cannot be read.
pub fn host_capabilities() -> u64 {
    std::fs::read_to_string("/proc/1/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container name {0:?} is not made of [A-Za-z0-9-]")]
    InvalidName(String),
    #[error("cgroup parent {0:?} is not a cgroup path such as \"keel\" or \"keel/containers\"")]
    InvalidCgroupParent(String),
    #[error("{what} {path:?} is not an absolute UTF-8 path")]
    InvalidHostPath { what: &'static str, path: PathBuf },
    #[error("no command: the image has neither Entrypoint nor Cmd and no command is configured")]
    NoCommand,
    #[error("the configured command is empty")]
    EmptyCommand,
    #[error("unknown capability {0:?}: expected a name such as CAP_NET_ADMIN")]
    UnknownCapability(String),
    #[error(
        "image user {0:?} is not numeric \"uid[:gid]\": user and group names are not supported \
         (resolving them would need the image's /etc/passwd and /etc/group)"
    )]
    NonNumericUser(String),
    #[error("image working directory {0:?} is not an absolute path")]
    RelativeWorkingDir(String),
    #[error(
        "environment variable {0:?}: the name must be non-empty and contain no '=' or NUL, \
         the value no NUL"
    )]
    InvalidEnvironment(String),
    #[error("memory limit of {0} bytes is not positive")]
    InvalidMemoryLimit(i64),
    #[error(
        "CPU limit of {0} millicores is out of range (the minimum is 10: a 1 ms quota per 100 ms)"
    )]
    InvalidCpuLimit(u64),
}

/// containerd's default capabilities.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every Linux capability, numbers 0 to 40 (CAP_CHECKPOINT_RESTORE), in number order.
pub const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Capabilities bootstrap containers hold on top of [`DEFAULT_CAPABILITIES`].
pub const BOOTSTRAP_ADDED_CAPABILITIES: [&str; 4] = [
    "CAP_SYS_ADMIN",
    "CAP_NET_ADMIN",
    "CAP_SYS_MODULE",
    "CAP_AUDIT_CONTROL",
];

/// Syscalls bootstrap containers may make on top of the default seccomp profile.
pub const BOOTSTRAP_EXTRA_SYSCALLS: [&str; 2] = ["swapon", "swapoff"];

/// `PATH` given to containers whose image sets none (containerd's default).
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CFS period for CPU limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// In-container directory holding host and superpowered containers' persistent directory.
pub const HOST_CONTAINERS_DIR: &str = "/.bottlerocket/host-containers";
/// In-container directory holding bootstrap containers' persistent directory.
pub const BOOTSTRAP_CONTAINERS_DIR: &str = "/.bottlerocket/bootstrap-containers";
/// Where superpowered containers see the host's root filesystem.
pub const HOST_ROOTFS_MOUNT: &str = "/.bottlerocket/rootfs";
/// In-container path of the API socket.
pub const API_SOCKET_MOUNT: &str = "/run/api.sock";
/// In-container path of the `apiclient` binary.
pub const APICLIENT_MOUNT: &str = "/usr/local/bin/apiclient";

/// Host files bind-mounted read-only at the same path in every container, and the host's
/// module tree (superpowered only; it must exist on the host).
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
const HOST_HOSTS: &str = "/etc/hosts";
const HOST_MODULES: &str = "/lib/modules";

/// containerd's default masked paths (host and bootstrap containers).
const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// containerd's default read-only paths (host and bootstrap containers).
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// containerd's default unix devices, as (major, minor) of character devices allowed "rwm"
/// after the deny-all rule; a `None` minor means any minor.
const DEFAULT_DEVICES: [(i64, Option<i64>); 9] = [
    (1, Some(3)), // /dev/null
    (1, Some(8)), // /dev/random
    (1, Some(7)), // /dev/full
    (5, Some(0)), // /dev/tty
    (1, Some(5)), // /dev/zero
    (1, Some(9)), // /dev/urandom
    (5, Some(1)), // /dev/console
    (136, None),  // /dev/pts/*
    (5, Some(2)), // /dev/ptmx
];

/// Builds the spec for one container. Pure: reads no files.
pub fn build(req: &SpecRequest<'_>) -> Result<Value, SpecError> {
    if req.name.is_empty()
        || !req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(SpecError::InvalidName(req.name.to_owned()));
    }
    let cgroups_path = format!("/{}/{}", cgroup_parent(req.cgroup_parent)?, req.name);
    let persistent_dir = host_path("persistent directory", req.persistent_dir)?;
    let api_socket = host_path("API socket", req.api_socket)?;
    let apiclient = host_path("apiclient", req.apiclient)?;

    let args = process_args(req)?;
    let (uid, gid) = parse_user(req.image.user().as_deref())?;
    let cwd = match req.image.working_dir().as_deref().filter(|d| !d.is_empty()) {
        Some(dir) if !dir.starts_with('/') => {
            return Err(SpecError::RelativeWorkingDir(dir.to_owned()))
        }
        Some(dir) => dir.to_owned(),
        None => "/".to_owned(),
    };
    let image_env = req.image.env().as_deref().unwrap_or_default();
    let env = environment(image_env, req.environment)?;
    let caps = capabilities(req.tier, req.extra_capabilities, req.host_capabilities)?;
    let resources = resources(req)?;

    let mut namespaces = Vec::new();
    if req.tier == Tier::Host {
        namespaces.push(json!({ "type": "pid" }));
    }
    for kind in ["ipc", "uts", "mount"] {
        namespaces.push(json!({ "type": kind }));
    }

    let mut linux = Map::new();
    linux.insert("resources".into(), resources);
    linux.insert("cgroupsPath".into(), json!(cgroups_path));
    linux.insert("namespaces".into(), Value::Array(namespaces));
    match req.tier {
        Tier::Host => {
            linux.insert("seccomp".into(), seccomp::default_profile(&caps, &[]));
        }
        Tier::Bootstrap => {
            let profile = seccomp::default_profile(&caps, &BOOTSTRAP_EXTRA_SYSCALLS);
            linux.insert("seccomp".into(), profile);
        }
        Tier::Superpowered => {}
    }
    if req.tier != Tier::Superpowered {
        linux.insert("maskedPaths".into(), json!(MASKED_PATHS));
        linux.insert("readonlyPaths".into(), json!(READONLY_PATHS));
    }

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": uid, "gid": gid },
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "inheritable": [],
                "permitted": caps,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": req.tier != Tier::Superpowered,
        },
        "root": { "path": "rootfs", "readonly": false },
        "mounts": mounts(req, persistent_dir, api_socket, apiclient),
        "linux": linux,
    }))
}

/// The parent cgroup without leading or trailing slashes; its components must be plain names.
fn cgroup_parent(parent: &str) -> Result<&str, SpecError> {
    let trimmed = parent.trim_matches('/');
    let valid = !trimmed.is_empty()
        && trimmed
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains('\0'));
    if valid {
        Ok(trimmed)
    } else {
        Err(SpecError::InvalidCgroupParent(parent.to_owned()))
    }
}

fn host_path<'p>(what: &'static str, path: &'p Path) -> Result<&'p str, SpecError> {
    match path.to_str() {
        Some(s) if path.is_absolute() => Ok(s),
        _ => Err(SpecError::InvalidHostPath {
            what,
            path: path.to_owned(),
        }),
    }
}

fn process_args(req: &SpecRequest<'_>) -> Result<Vec<String>, SpecError> {
    match req.command {
        Some([]) => Err(SpecError::EmptyCommand),
        Some(command) => Ok(command.to_vec()),
        None => {
            let image = req.image;
            let args: Vec<String> = image
                .entrypoint()
                .iter()
                .flatten()
                .chain(image.cmd().iter().flatten())
                .cloned()
                .collect();
            if args.is_empty() {
                Err(SpecError::NoCommand)
            } else {
                Ok(args)
            }
        }
    }
}

/// `User` of the image config: numeric "uid" or "uid:gid"; absent means root. A lone uid runs
/// with gid 0 (what containerd does when the image has no passwd entry for it).
fn parse_user(user: Option<&str>) -> Result<(u32, u32), SpecError> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Ok((0, 0));
    };
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let parsed = match user.split_once(':') {
        Some((uid, gid)) => number(uid).zip(number(gid)),
        None => number(user).map(|uid| (uid, 0)),
    };
    parsed.ok_or_else(|| SpecError::NonNumericUser(user.to_owned()))
}

fn env_name(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(name, _)| name)
}

/// The image's environment, then the configured variables (each replacing the image's, or an
/// earlier configured, variable of the same name), with a default `PATH` when none is set.
fn environment(
    image_env: &[String],
    configured: &[(String, String)],
) -> Result<Vec<String>, SpecError> {
    let mut env: Vec<String> = image_env.to_vec();
    for (name, value) in configured {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(SpecError::InvalidEnvironment(name.clone()));
        }
        env.retain(|entry| env_name(entry) != name);
        env.push(format!("{name}={value}"));
    }
    if !env.iter().any(|entry| env_name(entry) == "PATH") {
        env.insert(0, DEFAULT_PATH_ENV.to_owned());
    }
    Ok(env)
}

fn capabilities(tier: Tier, extra: &[String], host: u64) -> Result<Vec<String>, SpecError> {
    if let Some(unknown) = extra
        .iter()
        .find(|c| !ALL_CAPABILITIES.contains(&c.as_str()))
    {
        return Err(SpecError::UnknownCapability(unknown.clone()));
    }
    let mut caps: Vec<String> = Vec::new();
    let mut add = |cap: &str| {
        if !caps.iter().any(|c| c == cap) {
            caps.push(cap.to_owned());
        }
    };
    match tier {
        // "All" is what the host can grant: a capability outside the host's bounding
        // set (some hosts drop a few) would make runc refuse to start the container.
        Tier::Superpowered => ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| host & (1u64 << bit) != 0)
            .for_each(|(_, c)| add(c)),
        Tier::Host => {
            DEFAULT_CAPABILITIES.iter().for_each(|c| add(c));
            extra.iter().for_each(|c| add(c));
        }
        Tier::Bootstrap => {
            DEFAULT_CAPABILITIES.iter().for_each(|c| add(c));
            BOOTSTRAP_ADDED_CAPABILITIES.iter().for_each(|c| add(c));
            extra.iter().for_each(|c| add(c));
        }
    }
    Ok(caps)
}

fn resources(req: &SpecRequest<'_>) -> Result<Value, SpecError> {
    let mut resources = Map::new();
    let devices: Vec<Value> = if req.tier == Tier::Host {
        std::iter::once(json!({ "allow": false, "access": "rwm" }))
            .chain(DEFAULT_DEVICES.iter().map(|&(major, minor)| {
                let mut rule = json!({ "allow": true, "type": "c", "major": major });
                if let Some(minor) = minor {
                    rule["minor"] = json!(minor);
                }
                rule["access"] = json!("rwm");
                rule
            }))
            .collect()
    } else {
        vec![json!({ "allow": true, "access": "rwm" })]
    };
    resources.insert("devices".into(), Value::Array(devices));
    if let Some(limit) = req.memory_limit_bytes {
        if limit <= 0 {
            return Err(SpecError::InvalidMemoryLimit(limit));
        }
        resources.insert("memory".into(), json!({ "limit": limit }));
    }
    if let Some(millicores) = req.cpu_limit_millicores {
        let quota = millicores
            .checked_mul(CPU_PERIOD_US / 1000)
            .filter(|&quota| quota >= 1000)
            .and_then(|quota| i64::try_from(quota).ok())
            .ok_or(SpecError::InvalidCpuLimit(millicores))?;
        resources.insert(
            "cpu".into(),
            json!({ "quota": quota, "period": CPU_PERIOD_US }),
        );
    }
    Ok(Value::Object(resources))
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({
        "destination": destination,
        "type": kind,
        "source": source,
        "options": options,
    })
}

fn mounts(
    req: &SpecRequest<'_>,
    persistent_dir: &str,
    api_socket: &str,
    apiclient: &str,
) -> Vec<Value> {
    let all_devices = req.tier != Tier::Host;
    let sys_mode = if req.tier == Tier::Superpowered {
        "rw"
    } else {
        "ro"
    };
    let mut mounts = vec![mount(
        "/proc",
        "proc",
        "proc",
        &["nosuid", "noexec", "nodev"],
    )];
    if all_devices {
        mounts.push(mount("/dev", "bind", "/dev", &["rbind", "rslave"]));
    } else {
        mounts.push(mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ));
        mounts.push(mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ));
    }
    mounts.push(mount(
        "/dev/shm",
        "tmpfs",
        "shm",
        &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    ));
    mounts.push(mount(
        "/dev/mqueue",
        "mqueue",
        "mqueue",
        &["nosuid", "noexec", "nodev"],
    ));
    mounts.push(mount(
        "/sys",
        "sysfs",
        "sysfs",
        &["nosuid", "noexec", "nodev", sys_mode],
    ));
    mounts.push(mount(
        "/sys/fs/cgroup",
        "cgroup",
        "cgroup",
        &["nosuid", "noexec", "nodev", "relatime", sys_mode],
    ));
    mounts.push(mount(
        "/run",
        "tmpfs",
        "tmpfs",
        &["nosuid", "strictatime", "mode=755", "size=65536k"],
    ));
    for file in [HOST_HOSTS, HOST_RESOLV_CONF] {
        mounts.push(mount(file, "bind", file, &["bind", "ro", "rprivate"]));
    }

    let persistent_root = match req.tier {
        Tier::Host | Tier::Superpowered => HOST_CONTAINERS_DIR,
        Tier::Bootstrap => BOOTSTRAP_CONTAINERS_DIR,
    };
    let persistent_target = format!("{persistent_root}/{}", req.name);
    mounts.push(mount(
        &persistent_target,
        "bind",
        persistent_dir,
        &["rbind", "rw", "rprivate"],
    ));
    mounts.push(mount(
        API_SOCKET_MOUNT,
        "bind",
        api_socket,
        &["bind", "rw", "rprivate"],
    ));
    mounts.push(mount(
        APICLIENT_MOUNT,
        "bind",
        apiclient,
        &["bind", "ro", "rprivate"],
    ));

    if req.tier == Tier::Superpowered {
        // "ro" applies to the top mount only: file systems mounted below the host's / stay
        // writable (runc would need "rro"). No boundary is lost: the container holds every
        // capability and could remount anyway.
        mounts.push(mount(
            HOST_ROOTFS_MOUNT,
            "bind",
            "/",
            &["rbind", "ro", "rslave"],
        ));
        if req.mount_host_modules {
            mounts.push(mount(
                HOST_MODULES,
                "bind",
                HOST_MODULES,
                &["rbind", "ro", "rslave"],
            ));
        }
    }
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        let mut config = ImageConfig::default();
        config
            .set_env(Some(vec![
                "PATH=/opt/bin:/usr/bin".into(),
                "LANG=C.UTF-8".into(),
                "MODE=image".into(),
            ]))
            .set_entrypoint(Some(vec!["/usr/bin/entry".into()]))
            .set_cmd(Some(vec!["--serve".into()]));
        config
    }

    struct Owned {
        image: ImageConfig,
        command: Option<Vec<String>>,
        environment: Vec<(String, String)>,
        extra: Vec<String>,
        memory: Option<i64>,
        cpu: Option<u64>,
        parent: String,
    }

    impl Owned {
        fn new() -> Self {
            Owned {
                image: image(),
                command: None,
                environment: Vec::new(),
                extra: Vec::new(),
                memory: None,
                cpu: None,
                parent: "keel".into(),
            }
        }

        fn build(&self, tier: Tier) -> Result<Value, SpecError> {
            self.build_named("admin", tier)
        }

        fn build_named(&self, name: &str, tier: Tier) -> Result<Value, SpecError> {
            let persistent = match tier {
                Tier::Bootstrap => "/local/bootstrap-containers/admin",
                _ => "/local/host-containers/admin",
            };
            build(&SpecRequest {
                name,
                tier,
                image: &self.image,
                command: self.command.as_deref(),
                environment: &self.environment,
                extra_capabilities: &self.extra,
                memory_limit_bytes: self.memory,
                cpu_limit_millicores: self.cpu,
                persistent_dir: Path::new(persistent),
                api_socket: Path::new("/run/keel/api.sock"),
                apiclient: Path::new("/usr/bin/apiclient"),
                cgroup_parent: &self.parent,
                mount_host_modules: true,
                host_capabilities: u64::MAX,
            })
        }
    }

    fn spec(tier: Tier) -> Value {
        Owned::new().build(tier).expect("spec builds")
    }

    fn strings(value: &Value) -> Vec<&str> {
        value
            .as_array()
            .expect("an array")
            .iter()
            .map(|v| v.as_str().expect("a string"))
            .collect()
    }

    fn find_mount<'v>(spec: &'v Value, destination: &str) -> Option<&'v Value> {
        spec["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == destination)
    }

    fn mount_options<'v>(spec: &'v Value, destination: &str) -> Vec<&'v str> {
        strings(&find_mount(spec, destination).expect("mount exists")["options"])
    }

    fn namespaces(spec: &Value) -> Vec<&str> {
        spec["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .map(|n| n["type"].as_str().expect("type"))
            .collect()
    }

    fn seccomp_allows(spec: &Value, name: &str) -> bool {
        spec["linux"]["seccomp"]["syscalls"]
            .as_array()
            .expect("syscalls")
            .iter()
            .any(|r| {
                r["action"] == "SCMP_ACT_ALLOW"
                    && r.get("args").is_none()
                    && strings(&r["names"]).contains(&name)
            })
    }

    fn caps_of(spec: &Value, set: &str) -> Vec<String> {
        strings(&spec["process"]["capabilities"][set])
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    fn assert_caps(spec: &Value, expected: &[&str]) {
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(caps_of(spec, set), expected, "{set}");
        }
        assert_eq!(spec["process"]["capabilities"]["inheritable"], json!([]));
        assert!(spec["process"]["capabilities"].get("ambient").is_none());
    }

    fn is_read_only(options: &[&str]) -> bool {
        options.contains(&"ro") && !options.contains(&"rw")
    }

    #[test]
    fn tier_names() {
        assert_eq!(Tier::Host.as_str(), "host");
        assert_eq!(Tier::Superpowered.as_str(), "superpowered");
        assert_eq!(Tier::Bootstrap.as_str(), "bootstrap");
    }

    #[test]
    fn capability_lists() {
        assert_eq!(ALL_CAPABILITIES.len(), 41);
        assert_eq!(ALL_CAPABILITIES[21], "CAP_SYS_ADMIN");
        assert_eq!(ALL_CAPABILITIES[40], "CAP_CHECKPOINT_RESTORE");
        for cap in DEFAULT_CAPABILITIES
            .iter()
            .chain(&BOOTSTRAP_ADDED_CAPABILITIES)
        {
            assert!(ALL_CAPABILITIES.contains(cap), "{cap}");
        }
        let mut sorted = ALL_CAPABILITIES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALL_CAPABILITIES.len());
    }

    #[test]
    fn host_tier() {
        let spec = spec(Tier::Host);
        assert_caps(&spec, &DEFAULT_CAPABILITIES);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert!(seccomp_allows(&spec, "read"));
        assert!(!seccomp_allows(&spec, "mount"));
        assert!(!seccomp_allows(&spec, "swapon"));
        assert_eq!(namespaces(&spec), ["pid", "ipc", "uts", "mount"]);

        let devices = spec["linux"]["resources"]["devices"]
            .as_array()
            .expect("devices");
        assert_eq!(devices[0], json!({ "allow": false, "access": "rwm" }));
        assert_eq!(devices.len(), 10);
        assert!(devices[1..]
            .iter()
            .all(|d| d["allow"] == true && d["type"] == "c"));
        assert!(devices
            .iter()
            .any(|d| d["major"] == 1 && d["minor"] == 3 && d["allow"] == true));
        assert!(devices
            .iter()
            .any(|d| d["major"] == 136 && d.get("minor").is_none()));

        let dev = find_mount(&spec, "/dev").expect("/dev");
        assert_eq!(dev["type"], "tmpfs");
        assert!(mount_options(&spec, "/dev/pts").contains(&"newinstance"));
        assert!(is_read_only(&mount_options(&spec, "/sys")));
        assert!(is_read_only(&mount_options(&spec, "/sys/fs/cgroup")));

        let persistent = find_mount(&spec, "/.bottlerocket/host-containers/admin").expect("dir");
        assert_eq!(persistent["source"], "/local/host-containers/admin");
        assert!(mount_options(&spec, "/.bottlerocket/host-containers/admin").contains(&"rw"));
        assert_eq!(
            find_mount(&spec, "/run/api.sock").expect("sock")["source"],
            "/run/keel/api.sock"
        );
        assert_eq!(
            find_mount(&spec, "/usr/local/bin/apiclient").expect("apiclient")["source"],
            "/usr/bin/apiclient"
        );
        assert!(is_read_only(&mount_options(
            &spec,
            "/usr/local/bin/apiclient"
        )));
        assert!(find_mount(&spec, HOST_ROOTFS_MOUNT).is_none());
        assert!(find_mount(&spec, "/lib/modules").is_none());
        assert!(find_mount(&spec, "/.bottlerocket/bootstrap-containers/admin").is_none());

        assert_eq!(strings(&spec["linux"]["maskedPaths"]), MASKED_PATHS);
        assert_eq!(strings(&spec["linux"]["readonlyPaths"]), READONLY_PATHS);
    }

    #[test]
    fn superpowered_tier() {
        let spec = spec(Tier::Superpowered);
        assert_caps(&spec, ALL_CAPABILITIES);
        assert_eq!(spec["process"]["noNewPrivileges"], false);
        assert!(spec["linux"].get("seccomp").is_none());
        assert_eq!(namespaces(&spec), ["ipc", "uts", "mount"]);
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([{ "allow": true, "access": "rwm" }])
        );
        let dev = find_mount(&spec, "/dev").expect("/dev");
        assert_eq!(dev["type"], "bind");
        assert_eq!(dev["source"], "/dev");
        assert!(find_mount(&spec, "/dev/pts").is_none());
        assert!(mount_options(&spec, "/sys").contains(&"rw"));

        let rootfs = find_mount(&spec, "/.bottlerocket/rootfs").expect("rootfs");
        assert_eq!(rootfs["source"], "/");
        assert_eq!(
            mount_options(&spec, "/.bottlerocket/rootfs"),
            ["rbind", "ro", "rslave"]
        );
        assert_eq!(
            find_mount(&spec, "/lib/modules").expect("modules")["source"],
            "/lib/modules"
        );
        assert!(is_read_only(&mount_options(&spec, "/lib/modules")));
        assert!(find_mount(&spec, "/.bottlerocket/host-containers/admin").is_some());
        assert!(find_mount(&spec, "/run/api.sock").is_some());
        assert!(find_mount(&spec, "/usr/local/bin/apiclient").is_some());

        assert!(spec["linux"].get("maskedPaths").is_none());
        assert!(spec["linux"].get("readonlyPaths").is_none());
    }

    #[test]
    fn bootstrap_tier() {
        let spec = spec(Tier::Bootstrap);
        let expected: Vec<&str> = DEFAULT_CAPABILITIES
            .iter()
            .chain(&BOOTSTRAP_ADDED_CAPABILITIES)
            .copied()
            .collect();
        assert_caps(&spec, &expected);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        for name in [
            "mount",
            "unshare",
            "init_module",
            "finit_module",
            "swapon",
            "swapoff",
        ] {
            assert!(seccomp_allows(&spec, name), "{name}");
        }
        assert!(!seccomp_allows(&spec, "reboot"));
        assert_eq!(namespaces(&spec), ["ipc", "uts", "mount"]);
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([{ "allow": true, "access": "rwm" }])
        );
        assert_eq!(find_mount(&spec, "/dev").expect("/dev")["source"], "/dev");
        assert!(is_read_only(&mount_options(&spec, "/sys")));

        let persistent =
            find_mount(&spec, "/.bottlerocket/bootstrap-containers/admin").expect("dir");
        assert_eq!(persistent["source"], "/local/bootstrap-containers/admin");
        assert!(find_mount(&spec, "/.bottlerocket/host-containers/admin").is_none());
        assert!(find_mount(&spec, "/run/api.sock").is_some());
        assert!(find_mount(&spec, "/usr/local/bin/apiclient").is_some());
        assert!(find_mount(&spec, HOST_ROOTFS_MOUNT).is_none());
        assert_eq!(strings(&spec["linux"]["maskedPaths"]), MASKED_PATHS);
    }

    #[test]
    fn common_to_all_tiers() {
        for tier in [Tier::Host, Tier::Superpowered, Tier::Bootstrap] {
            let spec = spec(tier);
            assert_eq!(spec["ociVersion"], "1.0.2");
            assert_eq!(spec["root"], json!({ "path": "rootfs", "readonly": false }));
            assert!(spec.get("hostname").is_none());
            assert_eq!(spec["process"]["terminal"], false);
            assert_eq!(spec["process"]["user"], json!({ "uid": 0, "gid": 0 }));
            assert_eq!(spec["process"]["cwd"], "/");
            assert_eq!(
                spec["process"]["rlimits"],
                json!([{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }])
            );
            assert!(!namespaces(&spec).contains(&"network"));
            assert_eq!(spec["linux"]["cgroupsPath"], "/keel/admin");
            assert!(spec["linux"]["resources"].get("memory").is_none());
            assert!(spec["linux"]["resources"].get("cpu").is_none());

            for file in ["/etc/resolv.conf", "/etc/hosts"] {
                let m = find_mount(&spec, file).expect("bind mount");
                assert_eq!(m["source"], file);
                assert!(is_read_only(&mount_options(&spec, file)), "{file}");
            }
            for target in [
                "/proc",
                "/dev",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/run",
            ] {
                assert!(find_mount(&spec, target).is_some(), "{tier:?} {target}");
            }
            let mounts = spec["mounts"].as_array().expect("mounts");
            let mut targets: Vec<&str> = mounts
                .iter()
                .map(|m| m["destination"].as_str().expect("dest"))
                .collect();
            // Parents come before what is mounted inside them.
            let dev = targets.iter().position(|t| *t == "/dev").expect("/dev");
            let shm = targets
                .iter()
                .position(|t| *t == "/dev/shm")
                .expect("/dev/shm");
            let run = targets.iter().position(|t| *t == "/run").expect("/run");
            let sock = targets
                .iter()
                .position(|t| *t == "/run/api.sock")
                .expect("sock");
            assert!(dev < shm && run < sock);
            for m in mounts {
                let keys: Vec<&str> = m
                    .as_object()
                    .expect("mount")
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(keys, ["destination", "type", "source", "options"]);
            }
            targets.sort_unstable();
            let count = targets.len();
            targets.dedup();
            assert_eq!(targets.len(), count, "duplicate mount destination");
        }
    }

    #[test]
    fn extra_capabilities() {
        let mut req = Owned::new();
        req.extra = vec![
            "CAP_SYS_PTRACE".into(),
            "CAP_CHOWN".into(),
            "CAP_SYS_ADMIN".into(),
        ];
        let host = req.build(Tier::Host).expect("host");
        let mut expected: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
        expected.extend(["CAP_SYS_PTRACE", "CAP_SYS_ADMIN"]);
        assert_caps(&host, &expected);
        // The seccomp profile follows the capabilities.
        assert!(seccomp_allows(&host, "process_vm_readv"));
        assert!(seccomp_allows(&host, "mount"));

        let boot = req.build(Tier::Bootstrap).expect("bootstrap");
        let mut expected: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
        expected.extend(BOOTSTRAP_ADDED_CAPABILITIES);
        expected.push("CAP_SYS_PTRACE");
        assert_caps(&boot, &expected);

        let superpowered = req.build(Tier::Superpowered).expect("superpowered");
        assert_caps(&superpowered, ALL_CAPABILITIES);
    }

    #[test]
    fn unknown_capability_is_refused() {
        for bad in ["CAP_NOPE", "net_admin", "NET_ADMIN", ""] {
            let mut req = Owned::new();
            req.extra = vec!["CAP_NET_ADMIN".into(), bad.into()];
            for tier in [Tier::Host, Tier::Superpowered, Tier::Bootstrap] {
                match req.build(tier) {
                    Err(SpecError::UnknownCapability(name)) => assert_eq!(name, bad),
                    other => panic!("{bad:?}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn environment_override_and_default_path() {
        let mut req = Owned::new();
        req.environment = vec![
            ("MODE".into(), "configured".into()),
            ("EXTRA".into(), "a=b".into()),
        ];
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(
            strings(&spec["process"]["env"]),
            [
                "PATH=/opt/bin:/usr/bin",
                "LANG=C.UTF-8",
                "MODE=configured",
                "EXTRA=a=b"
            ]
        );

        req.image.set_env(Some(vec!["LANG=C".into()]));
        req.environment = vec![("A".into(), "1".into()), ("A".into(), "2".into())];
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(
            strings(&spec["process"]["env"]),
            [DEFAULT_PATH_ENV, "LANG=C", "A=2"]
        );

        req.environment = vec![("PATH".into(), "/custom".into())];
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(strings(&spec["process"]["env"]), ["LANG=C", "PATH=/custom"]);

        for bad in ["", "A=B", "NUL\0"] {
            req.environment = vec![(bad.into(), "x".into())];
            assert!(matches!(
                req.build(Tier::Host),
                Err(SpecError::InvalidEnvironment(_))
            ));
        }
        req.environment = vec![("OK".into(), "x\0y".into())];
        assert!(matches!(
            req.build(Tier::Host),
            Err(SpecError::InvalidEnvironment(_))
        ));
    }

    #[test]
    fn command_selection() {
        let mut req = Owned::new();
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(
            strings(&spec["process"]["args"]),
            ["/usr/bin/entry", "--serve"]
        );

        req.command = Some(vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()]);
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(
            strings(&spec["process"]["args"]),
            ["/bin/sh", "-c", "sleep 1"]
        );

        req.command = Some(Vec::new());
        assert!(matches!(
            req.build(Tier::Host),
            Err(SpecError::EmptyCommand)
        ));

        req.command = None;
        req.image.set_entrypoint(None);
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(strings(&spec["process"]["args"]), ["--serve"]);
        req.image.set_cmd(Some(Vec::new()));
        assert!(matches!(req.build(Tier::Host), Err(SpecError::NoCommand)));
        req.image.set_entrypoint(Some(vec!["/init".into()]));
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(strings(&spec["process"]["args"]), ["/init"]);
    }

    #[test]
    fn user_and_working_dir() {
        let mut req = Owned::new();
        for (user, uid, gid) in [("1000:1001", 1000, 1001), ("42", 42, 0), ("0:0", 0, 0)] {
            req.image.set_user(Some(user.into()));
            let spec = req.build(Tier::Host).expect("spec");
            assert_eq!(
                spec["process"]["user"],
                json!({ "uid": uid, "gid": gid }),
                "{user}"
            );
        }
        for bad in [
            "nobody",
            "1000:staff",
            "root:0",
            "1000:",
            ":1000",
            "-1",
            "+5",
            "99999999999",
        ] {
            req.image.set_user(Some(bad.into()));
            match req.build(Tier::Host) {
                Err(SpecError::NonNumericUser(user)) => assert_eq!(user, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
        req.image.set_user(Some(String::new()));
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(spec["process"]["user"], json!({ "uid": 0, "gid": 0 }));
        req.image.set_user(None);
        req.image.set_working_dir(Some(String::new()));
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(spec["process"]["cwd"], "/");
        req.image.set_working_dir(Some("/srv/app".into()));
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(spec["process"]["cwd"], "/srv/app");
        req.image.set_working_dir(Some("app".into()));
        assert!(matches!(
            req.build(Tier::Host),
            Err(SpecError::RelativeWorkingDir(_))
        ));
    }

    #[test]
    fn resource_limits() {
        let mut req = Owned::new();
        req.memory = Some(256 * 1024 * 1024);
        req.cpu = Some(1500);
        let spec = req.build(Tier::Superpowered).expect("spec");
        let resources = &spec["linux"]["resources"];
        assert_eq!(resources["memory"], json!({ "limit": 268_435_456 }));
        assert_eq!(
            resources["cpu"],
            json!({ "quota": 150_000, "period": 100_000 })
        );
        req.cpu = Some(10);
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 1000);
        // Device rules stay alongside the limits.
        assert!(spec["linux"]["resources"]["devices"].is_array());

        for bad in [0, 9, u64::MAX] {
            req.cpu = Some(bad);
            assert!(
                matches!(req.build(Tier::Host), Err(SpecError::InvalidCpuLimit(v)) if v == bad)
            );
        }
        req.cpu = None;
        for bad in [0, -1] {
            req.memory = Some(bad);
            assert!(
                matches!(req.build(Tier::Host), Err(SpecError::InvalidMemoryLimit(v)) if v == bad)
            );
        }
    }

    #[test]
    fn cgroups_path_and_names() {
        let mut req = Owned::new();
        let spec = req.build_named("control-2", Tier::Host).expect("spec");
        assert_eq!(spec["linux"]["cgroupsPath"], "/keel/control-2");
        assert!(find_mount(&spec, "/.bottlerocket/host-containers/control-2").is_some());

        req.parent = "/keel/containers/".into();
        let spec = req.build(Tier::Bootstrap).expect("spec");
        assert_eq!(spec["linux"]["cgroupsPath"], "/keel/containers/admin");

        for bad in ["", "/", "keel/../etc", "keel//x", "./keel"] {
            req.parent = bad.into();
            assert!(
                matches!(
                    req.build(Tier::Host),
                    Err(SpecError::InvalidCgroupParent(_))
                ),
                "{bad:?}"
            );
        }
        req.parent = "keel".into();
        for bad in ["", "../etc", "a/b", "a_b"] {
            assert!(
                matches!(
                    req.build_named(bad, Tier::Host),
                    Err(SpecError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn host_paths_must_be_absolute() {
        let owned = Owned::new();
        let err = build(&SpecRequest {
            name: "admin",
            tier: Tier::Host,
            image: &owned.image,
            command: None,
            environment: &[],
            extra_capabilities: &[],
            memory_limit_bytes: None,
            cpu_limit_millicores: None,
            persistent_dir: Path::new("local/host-containers/admin"),
            api_socket: Path::new("/run/api.sock"),
            apiclient: Path::new("/usr/bin/apiclient"),
            cgroup_parent: "keel",
            mount_host_modules: true,
            host_capabilities: u64::MAX,
        });
        match err {
            Err(SpecError::InvalidHostPath { what, path }) => {
                assert_eq!(what, "persistent directory");
                assert_eq!(path, Path::new("local/host-containers/admin"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn image_config_from_the_image() {
        let document = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin", "A=1"],
                "Entrypoint": ["/entry"],
                "Cmd": ["run", "--fast"],
                "WorkingDir": "/work",
                "User": "1000:1000",
                "Labels": { "x": "y" },
            },
            "rootfs": { "type": "layers", "diff_ids": [] },
        });
        let parsed: oci_spec::image::ImageConfiguration =
            serde_json::from_value(document).expect("config");
        let config = parsed.config().clone().expect("config object");
        let mut req = Owned::new();
        req.image = config;
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(
            strings(&spec["process"]["args"]),
            ["/entry", "run", "--fast"]
        );
        assert_eq!(strings(&spec["process"]["env"]), ["PATH=/usr/bin", "A=1"]);
        assert_eq!(spec["process"]["cwd"], "/work");
        assert_eq!(spec["process"]["user"], json!({ "uid": 1000, "gid": 1000 }));

        // Null and empty fields are absent.
        let sparse: oci_spec::image::ImageConfiguration = serde_json::from_value(json!({
            "architecture": "amd64", "os": "linux",
            "config": { "Entrypoint": null, "Cmd": ["/bin/sh"], "WorkingDir": "", "User": "" },
            "rootfs": { "type": "layers", "diff_ids": [] },
        }))
        .expect("sparse config");
        req.image = sparse.config().clone().expect("config object");
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(strings(&spec["process"]["args"]), ["/bin/sh"]);
        assert_eq!(strings(&spec["process"]["env"]), [DEFAULT_PATH_ENV]);
        assert_eq!(spec["process"]["cwd"], "/");
        assert_eq!(spec["process"]["user"], json!({ "uid": 0, "gid": 0 }));
    }

    #[test]
    fn error_messages_explain() {
        let message = SpecError::NonNumericUser("nobody".into()).to_string();
        assert!(message.contains("nobody") && message.contains("not numeric"));
        assert!(SpecError::NoCommand
            .to_string()
            .contains("neither Entrypoint nor Cmd"));
        assert!(SpecError::UnknownCapability("CAP_X".into())
            .to_string()
            .contains("CAP_X"));
    }
}
