//! The OCI runtime spec of one Keel container, as `oci-spec`'s typed [`Spec`].
//!
//! The base is what containerd 1.6 builds by default (its default Linux spec plus its default
//! unix device rules, checked against containerd 1.6.20): default capabilities, rlimits, the
//! standard mounts, masked and read-only paths, and the device cgroup rules. The privilege tier
//! (DESIGN.md, "Containers") then decides capabilities, seccomp, no_new_privileges, the PID
//! namespace and device access, and adds the mounts Bottlerocket-style images expect. What a
//! tier grants is one value, [`Tier::rules`] ([`TierRules`]); [`build`] asks nothing else
//! about the tier.
//!
//! The spec is built field by field, never from `oci-spec`'s defaults, which are not
//! containerd's: `Spec::default()` sets a hostname ("youki") and empty annotations, its
//! process holds ambient capabilities, and its Linux section has no deny-all device rule
//! but masked paths of its own. Each builder below sets every field that has such a
//! default, and the tests compare the whole spec of each tier with the JSON keeld wrote
//! before the spec was typed (`testdata/spec-*.json`).
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
use std::str::FromStr;

pub use oci_spec::runtime::Spec;
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilities, LinuxCapabilitiesBuilder,
    LinuxCpuBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResources,
    LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, Process,
    ProcessBuilder, RootBuilder, SpecBuilder, UserBuilder,
};
use oci_spec::OciSpecError;

use super::seccomp;

/// The runtime-spec version keeld writes (containerd 1.6's).
pub const OCI_VERSION: &str = "1.0.2";

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

    /// What the tier grants: DESIGN.md's table, one row per field of [`TierRules`].
    pub fn rules(self) -> TierRules {
        match self {
            Tier::Host => TierRules {
                capabilities: TierCapabilities::DefaultPlus(&[]),
                seccomp: Some(&[]),
                no_new_privileges: true,
                private_pid_namespace: true,
                all_devices: false,
                confined_proc_and_sys: true,
                host_root: false,
                persistent_dir: HOST_CONTAINERS_DIR,
            },
            Tier::Superpowered => TierRules {
                capabilities: TierCapabilities::AllOfHost,
                seccomp: None,
                no_new_privileges: false,
                private_pid_namespace: false,
                all_devices: true,
                confined_proc_and_sys: false,
                host_root: true,
                persistent_dir: HOST_CONTAINERS_DIR,
            },
            Tier::Bootstrap => TierRules {
                capabilities: TierCapabilities::DefaultPlus(&BOOTSTRAP_ADDED_CAPABILITIES),
                seccomp: Some(&BOOTSTRAP_EXTRA_SYSCALLS),
                no_new_privileges: true,
                private_pid_namespace: false,
                all_devices: true,
                confined_proc_and_sys: true,
                host_root: false,
                persistent_dir: BOOTSTRAP_CONTAINERS_DIR,
            },
        }
    }
}

/// What a privilege tier grants (DESIGN.md, "Privilege tiers"). Network: the host's for
/// every tier; mounts common to every tier: see [`build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierRules {
    /// The capabilities every container of the tier holds, before its extra ones.
    pub capabilities: TierCapabilities,
    /// `Some(extra)`: containerd's default seccomp profile (whose capability-dependent
    /// rules follow the container's capabilities) plus an allow rule for these syscalls;
    /// `None`: no seccomp filter.
    pub seccomp: Option<&'static [&'static str]>,
    pub no_new_privileges: bool,
    /// A PID namespace of its own; otherwise the host's.
    pub private_pid_namespace: bool,
    /// Every device (an allow-all cgroup rule, the host's `/dev`); otherwise containerd's
    /// default unix devices in a private `/dev`.
    pub all_devices: bool,
    /// containerd's masked and read-only `/proc` paths, and `/sys` and the cgroup file
    /// system read-only; otherwise none masked and both writable.
    pub confined_proc_and_sys: bool,
    /// The host's root file system read-only at [`HOST_ROOTFS_MOUNT`], and the host's
    /// `/lib/modules`.
    pub host_root: bool,
    /// Where the persistent directory appears, as `<persistent_dir>/<name>`.
    pub persistent_dir: &'static str,
}

/// A tier's base capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierCapabilities {
    /// containerd's default 14 ([`DEFAULT_CAPABILITIES`]) plus these, then the
    /// container's extra ones.
    DefaultPlus(&'static [&'static str]),
    /// Every capability the host's init holds (runc refuses one outside the host's
    /// bounding set); extra ones add nothing.
    AllOfHost,
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
    /// Whether the host's cgroups can bound swap ([`host_limits_swap`]): a memory limit
    /// then bounds memory and swap together (the container gets no swap), as
    /// Kubernetes' default does; without it, a container could swap past its limit.
    pub limit_swap: bool,
    /// Becomes a CFS quota over a [`CPU_PERIOD_US`] period; at least 10 (a 1 ms quota).
    pub cpu_limit_millicores: Option<u64>,
    /// Host directory mounted read-write at `/.bottlerocket/host-containers/<name>`
    /// (Host, Superpowered) or `/.bottlerocket/bootstrap-containers/<name>` (Bootstrap).
    pub persistent_dir: &'a Path,
    /// Host path of the API socket, bind-mounted at `/run/api.sock`.
    pub api_socket: &'a Path,
    /// Host path of the `apiclient` binary, bind-mounted read-only at `/usr/local/bin/apiclient`.
    pub apiclient: &'a Path,
    /// Host paths bind-mounted read-only at `/etc/hosts` and `/etc/resolv.conf`: copies
    /// of the host's that keeld updates in place (see `host_files`).
    pub hosts: &'a Path,
    pub resolv_conf: &'a Path,
    /// Parent cgroup, e.g. "keel": `cgroupsPath` is `/<cgroup_parent>/<name>`.
    pub cgroup_parent: &'a str,
    /// Whether the host has `/lib/modules` to bind into a superpowered container (a
    /// host without loadable modules has none, and runc refuses a missing source).
    pub mount_host_modules: bool,
    /// The host's capability bounding set (bit n = capability n), which limits what a
    /// superpowered container gets; `u64::MAX` for all.
    pub host_capabilities: u64,
}

/// Whether a container's swap can be bounded on this host: cgroup v2 (runc writes
/// `memory.swap.max`, and leaves a kernel without swap accounting alone when the value
/// is 0), or cgroup v1 with swap accounting (`memory.memsw.limit_in_bytes`). On v1
/// without it, runc fails a container that asks for a swap limit.
pub fn host_limits_swap() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
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
    /// oci-spec refused a value (its builders validate little; this would be a bug).
    #[error("the OCI runtime spec cannot be built: {0}")]
    Oci(#[from] OciSpecError),
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
pub fn build(req: &SpecRequest<'_>) -> Result<Spec, SpecError> {
    if req.name.is_empty()
        || !req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(SpecError::InvalidName(req.name.to_owned()));
    }
    let rules = req.tier.rules();
    let cgroups_path = format!("/{}/{}", cgroup_parent(req.cgroup_parent)?, req.name);
    let paths = HostPaths {
        persistent_dir: host_path("persistent directory", req.persistent_dir)?,
        api_socket: host_path("API socket", req.api_socket)?,
        apiclient: host_path("apiclient", req.apiclient)?,
        hosts: host_path("hosts file", req.hosts)?,
        resolv_conf: host_path("resolv.conf", req.resolv_conf)?,
    };
    let caps = capabilities(
        rules.capabilities,
        req.extra_capabilities,
        req.host_capabilities,
    )?;

    let seccomp = match rules.seccomp {
        Some(extra) => Some(seccomp::default_profile(&caps, extra)?),
        None => None,
    };
    let (masked, readonly) = if rules.confined_proc_and_sys {
        (Some(strings(&MASKED_PATHS)), Some(strings(&READONLY_PATHS)))
    } else {
        (None, None)
    };
    let mut linux = LinuxBuilder::default()
        .resources(resources(req, &rules)?)
        .cgroups_path(cgroups_path)
        .namespaces(namespaces(&rules)?)
        .build()?;
    // Set whatever the tier says, present or absent: oci-spec's default Linux section
    // masks paths of its own.
    linux
        .set_seccomp(seccomp)
        .set_masked_paths(masked)
        .set_readonly_paths(readonly);

    let mut spec = SpecBuilder::default()
        .version(OCI_VERSION)
        .process(process(req, &rules, &caps)?)
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()?,
        )
        .mounts(mounts(req, &rules, &paths)?)
        .linux(linux)
        .build()?;
    // No hostname: the container keeps the host's (see the module header). No
    // annotations. oci-spec's default spec sets both.
    spec.set_hostname(None).set_annotations(None);
    Ok(spec)
}

/// The host paths a spec mounts, checked.
struct HostPaths<'a> {
    persistent_dir: &'a str,
    api_socket: &'a str,
    apiclient: &'a str,
    hosts: &'a str,
    resolv_conf: &'a str,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The process: the image's (or configured) command, user, working directory and
/// environment, the capabilities, containerd's rlimit, and the tier's no_new_privileges.
fn process(
    req: &SpecRequest<'_>,
    rules: &TierRules,
    caps: &[&'static str],
) -> Result<Process, SpecError> {
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
    Ok(ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(uid).gid(gid).build()?)
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capability_sets(caps)?)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(1024u64)
            .soft(1024u64)
            .build()?])
        .no_new_privileges(rules.no_new_privileges)
        .build()?)
}

/// Bounding, effective and permitted hold `caps`; inheritable none; ambient is absent
/// (oci-spec's default grants ambient capabilities, containerd's does not).
fn capability_sets(caps: &[&str]) -> Result<LinuxCapabilities, SpecError> {
    let set = caps
        .iter()
        .map(|name| to_capability(name))
        .collect::<Result<Capabilities, _>>()?;
    let mut sets = LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .inheritable(Capabilities::new())
        .build()?;
    sets.set_ambient(None);
    Ok(sets)
}

/// A "CAP_…" name of [`ALL_CAPABILITIES`] as oci-spec's [`Capability`].
pub fn to_capability(name: &str) -> Result<Capability, SpecError> {
    name.strip_prefix("CAP_")
        .filter(|_| ALL_CAPABILITIES.contains(&name))
        .and_then(|bare| Capability::from_str(bare).ok())
        .ok_or_else(|| SpecError::UnknownCapability(name.to_owned()))
}

/// PID (for a tier with its own), IPC, UTS and mount namespaces; never network.
fn namespaces(rules: &TierRules) -> Result<Vec<LinuxNamespace>, SpecError> {
    let mut kinds = Vec::new();
    if rules.private_pid_namespace {
        kinds.push(LinuxNamespaceType::Pid);
    }
    kinds.extend([
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ]);
    kinds
        .into_iter()
        .map(|typ| Ok(LinuxNamespaceBuilder::default().typ(typ).build()?))
        .collect()
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

/// The container's capabilities, in order: the tier's, then the extra ones (each once).
/// Every extra name must be one of [`ALL_CAPABILITIES`], whatever the tier.
fn capabilities(
    tier: TierCapabilities,
    extra: &[String],
    host: u64,
) -> Result<Vec<&'static str>, SpecError> {
    let extra = extra
        .iter()
        .map(|name| {
            ALL_CAPABILITIES
                .iter()
                .copied()
                .find(|c| c == name)
                .ok_or_else(|| SpecError::UnknownCapability(name.clone()))
        })
        .collect::<Result<Vec<&'static str>, _>>()?;
    let mut caps: Vec<&'static str> = Vec::new();
    let mut add = |cap: &'static str| {
        if !caps.contains(&cap) {
            caps.push(cap);
        }
    };
    match tier {
        // "All" is what the host can grant: a capability outside the host's bounding
        // set (some hosts drop a few) would make runc refuse to start the container.
        TierCapabilities::AllOfHost => ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| host & (1u64 << bit) != 0)
            .for_each(|(_, c)| add(c)),
        TierCapabilities::DefaultPlus(added) => {
            DEFAULT_CAPABILITIES.iter().for_each(|c| add(c));
            added.iter().for_each(|c| add(c));
            extra.iter().for_each(|c| add(c));
        }
    }
    Ok(caps)
}

/// Device rules, memory and CPU limits.
fn resources(req: &SpecRequest<'_>, rules: &TierRules) -> Result<LinuxResources, SpecError> {
    let rwm = |allow: bool| {
        LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .access("rwm")
    };
    let devices: Vec<LinuxDeviceCgroup> = if rules.all_devices {
        vec![rwm(true).build()?]
    } else {
        let mut devices = vec![rwm(false).build()?];
        for &(major, minor) in &DEFAULT_DEVICES {
            let rule = rwm(true).typ(LinuxDeviceType::C).major(major);
            devices.push(match minor {
                Some(minor) => rule.minor(minor).build()?,
                None => rule.build()?,
            });
        }
        devices
    };
    let mut resources = LinuxResourcesBuilder::default().devices(devices);
    if let Some(limit) = req.memory_limit_bytes {
        if limit <= 0 {
            return Err(SpecError::InvalidMemoryLimit(limit));
        }
        let mut memory = LinuxMemoryBuilder::default().limit(limit);
        if req.limit_swap {
            // OCI's `swap` is memory + swap: equal to the limit, no swap at all.
            memory = memory.swap(limit);
        }
        resources = resources.memory(memory.build()?);
    }
    if let Some(millicores) = req.cpu_limit_millicores {
        let quota = millicores
            .checked_mul(CPU_PERIOD_US / 1000)
            .filter(|&quota| quota >= 1000)
            .and_then(|quota| i64::try_from(quota).ok())
            .ok_or(SpecError::InvalidCpuLimit(millicores))?;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()?,
        );
    }
    Ok(resources.build()?)
}

fn mount(
    destination: &str,
    kind: &str,
    source: &str,
    options: &[&str],
) -> Result<Mount, OciSpecError> {
    MountBuilder::default()
        .destination(destination)
        .typ(kind)
        .source(source)
        .options(strings(options))
        .build()
}

/// containerd's standard mounts (as the tier's devices and `/sys` need them), the
/// host's name resolution files, the persistent directory, the API socket and
/// `apiclient`, and for a tier that sees the host's root, that root and its modules.
/// Parents come before what is mounted inside them.
fn mounts(
    req: &SpecRequest<'_>,
    rules: &TierRules,
    paths: &HostPaths<'_>,
) -> Result<Vec<Mount>, SpecError> {
    let sys_mode = if rules.confined_proc_and_sys {
        "ro"
    } else {
        "rw"
    };
    let mut mounts = vec![mount(
        "/proc",
        "proc",
        "proc",
        &["nosuid", "noexec", "nodev"],
    )?];
    if rules.all_devices {
        mounts.push(mount("/dev", "bind", "/dev", &["rbind", "rslave"])?);
    } else {
        mounts.push(mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?);
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
        )?);
    }
    mounts.push(mount(
        "/dev/shm",
        "tmpfs",
        "shm",
        &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    )?);
    mounts.push(mount(
        "/dev/mqueue",
        "mqueue",
        "mqueue",
        &["nosuid", "noexec", "nodev"],
    )?);
    mounts.push(mount(
        "/sys",
        "sysfs",
        "sysfs",
        &["nosuid", "noexec", "nodev", sys_mode],
    )?);
    mounts.push(mount(
        "/sys/fs/cgroup",
        "cgroup",
        "cgroup",
        &["nosuid", "noexec", "nodev", "relatime", sys_mode],
    )?);
    mounts.push(mount(
        "/run",
        "tmpfs",
        "tmpfs",
        &["nosuid", "strictatime", "mode=755", "size=65536k"],
    )?);
    for (target, source) in [
        (HOST_HOSTS, paths.hosts),
        (HOST_RESOLV_CONF, paths.resolv_conf),
    ] {
        mounts.push(mount(target, "bind", source, &["bind", "ro", "rprivate"])?);
    }

    let persistent_target = format!("{}/{}", rules.persistent_dir, req.name);
    mounts.push(mount(
        &persistent_target,
        "bind",
        paths.persistent_dir,
        &["rbind", "rw", "rprivate"],
    )?);
    mounts.push(mount(
        API_SOCKET_MOUNT,
        "bind",
        paths.api_socket,
        &["bind", "rw", "rprivate"],
    )?);
    mounts.push(mount(
        APICLIENT_MOUNT,
        "bind",
        paths.apiclient,
        &["bind", "ro", "rprivate"],
    )?);

    if rules.host_root {
        // "ro" applies to the top mount only: file systems mounted below the host's / stay
        // writable (runc would need "rro"). No boundary is lost: the container holds every
        // capability and could remount anyway.
        mounts.push(mount(
            HOST_ROOTFS_MOUNT,
            "bind",
            "/",
            &["rbind", "ro", "rslave"],
        )?);
        if req.mount_host_modules {
            mounts.push(mount(
                HOST_MODULES,
                "bind",
                HOST_MODULES,
                &["rbind", "ro", "rslave"],
            )?);
        }
    }
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use oci_spec::runtime::{Linux, LinuxSeccompAction};
    use serde_json::{json, Value};

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

    /// A request's owned parts, so that tests can vary one at a time.
    struct Owned {
        image: ImageConfig,
        command: Option<Vec<String>>,
        environment: Vec<(String, String)>,
        extra: Vec<String>,
        memory: Option<i64>,
        swap: bool,
        cpu: Option<u64>,
        parent: String,
        modules: bool,
        host_caps: u64,
    }

    impl Owned {
        fn new() -> Self {
            Owned {
                image: image(),
                command: None,
                environment: Vec::new(),
                extra: Vec::new(),
                memory: None,
                swap: false,
                cpu: None,
                parent: "keel".into(),
                modules: true,
                host_caps: u64::MAX,
            }
        }

        /// What the golden files' "full" specs were written from.
        fn full() -> Self {
            let mut owned = Owned::new();
            owned
                .image
                .set_user(Some("1000:1001".into()))
                .set_working_dir(Some("/srv".into()));
            owned.command = Some(vec!["/bin/sh".into(), "-c".into(), "x".into()]);
            owned.environment = vec![("MODE".into(), "configured".into())];
            owned.extra = vec!["CAP_SYS_PTRACE".into(), "CAP_NET_ADMIN".into()];
            owned.memory = Some(256 << 20);
            owned.swap = true;
            owned.cpu = Some(1500);
            owned.parent = "keel/host".into();
            owned.modules = false;
            owned.host_caps = (1u64 << 40) - 1;
            owned
        }

        fn request<'a>(&'a self, name: &'a str, tier: Tier) -> SpecRequest<'a> {
            let persistent = match tier {
                Tier::Bootstrap => "/local/bootstrap-containers/",
                _ => "/local/host-containers/",
            };
            SpecRequest {
                name,
                tier,
                image: &self.image,
                command: self.command.as_deref(),
                environment: &self.environment,
                extra_capabilities: &self.extra,
                memory_limit_bytes: self.memory,
                limit_swap: self.swap,
                cpu_limit_millicores: self.cpu,
                persistent_dir: Path::new(persistent),
                api_socket: Path::new("/run/keel/api.sock"),
                apiclient: Path::new("/usr/bin/apiclient"),
                hosts: Path::new("/run/keel/host-etc/hosts"),
                resolv_conf: Path::new("/run/keel/host-etc/resolv.conf"),
                cgroup_parent: &self.parent,
                mount_host_modules: self.modules,
                host_capabilities: self.host_caps,
            }
        }

        fn build(&self, tier: Tier) -> Result<Spec, SpecError> {
            self.build_named("admin", tier)
        }

        fn build_named(&self, name: &str, tier: Tier) -> Result<Spec, SpecError> {
            let persistent = PathBuf::from(match tier {
                Tier::Bootstrap => format!("/local/bootstrap-containers/{name}"),
                _ => format!("/local/host-containers/{name}"),
            });
            build(&SpecRequest {
                persistent_dir: &persistent,
                ..self.request(name, tier)
            })
        }
    }

    const TIERS: [Tier; 3] = [Tier::Host, Tier::Superpowered, Tier::Bootstrap];

    fn spec(tier: Tier) -> Spec {
        Owned::new().build(tier).expect("spec builds")
    }

    fn process(spec: &Spec) -> &Process {
        spec.process().as_ref().expect("a process")
    }

    fn linux(spec: &Spec) -> &Linux {
        spec.linux().as_ref().expect("a linux section")
    }

    fn find_mount<'s>(spec: &'s Spec, destination: &str) -> Option<&'s Mount> {
        spec.mounts()
            .as_ref()
            .expect("mounts")
            .iter()
            .find(|m| m.destination() == Path::new(destination))
    }

    fn source<'s>(spec: &'s Spec, destination: &str) -> &'s str {
        find_mount(spec, destination)
            .and_then(|m| m.source().as_ref())
            .and_then(|s| s.to_str())
            .expect("a mount with a source")
    }

    fn kind<'s>(spec: &'s Spec, destination: &str) -> &'s str {
        find_mount(spec, destination)
            .and_then(|m| m.typ().as_deref())
            .expect("a mount with a type")
    }

    fn mount_options<'s>(spec: &'s Spec, destination: &str) -> Vec<&'s str> {
        find_mount(spec, destination)
            .and_then(|m| m.options().as_ref())
            .expect("a mount with options")
            .iter()
            .map(String::as_str)
            .collect()
    }

    fn is_read_only(options: &[&str]) -> bool {
        options.contains(&"ro") && !options.contains(&"rw")
    }

    fn namespaces(spec: &Spec) -> Vec<LinuxNamespaceType> {
        linux(spec)
            .namespaces()
            .as_ref()
            .expect("namespaces")
            .iter()
            .map(|n| n.typ())
            .collect()
    }

    fn devices(spec: &Spec) -> &[LinuxDeviceCgroup] {
        linux(spec)
            .resources()
            .as_ref()
            .and_then(|r| r.devices().as_deref())
            .expect("device rules")
    }

    fn seccomp_allows(spec: &Spec, name: &str) -> bool {
        linux(spec)
            .seccomp()
            .as_ref()
            .and_then(|s| s.syscalls().as_ref())
            .expect("a seccomp profile")
            .iter()
            .any(|r| {
                r.action() == LinuxSeccompAction::ScmpActAllow
                    && r.args().is_none()
                    && r.names().iter().any(|n| n == name)
            })
    }

    /// Capability names, as the spec's JSON writes them.
    fn names(set: &Option<Capabilities>) -> BTreeSet<String> {
        set.as_ref()
            .expect("a capability set")
            .iter()
            .map(|c| match serde_json::to_value(c) {
                Ok(Value::String(name)) => name,
                other => panic!("{c:?} serializes as {other:?}"),
            })
            .collect()
    }

    fn assert_caps(spec: &Spec, expected: &[&str]) {
        let expected: BTreeSet<String> = expected.iter().map(|c| (*c).to_owned()).collect();
        let sets = process(spec).capabilities().as_ref().expect("capabilities");
        assert_eq!(names(sets.bounding()), expected, "bounding");
        assert_eq!(names(sets.effective()), expected, "effective");
        assert_eq!(names(sets.permitted()), expected, "permitted");
        assert!(names(sets.inheritable()).is_empty(), "inheritable");
        assert!(sets.ambient().is_none(), "ambient");
    }

    fn env(spec: &Spec) -> Vec<&str> {
        process(spec)
            .env()
            .iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    fn args(spec: &Spec) -> Vec<&str> {
        process(spec)
            .args()
            .iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    fn user(spec: &Spec) -> (u32, u32) {
        let user = process(spec).user();
        (user.uid(), user.gid())
    }

    /// The spec as JSON, with each capability list sorted (oci-spec keeps capabilities
    /// in a set, so their order is not meaningful).
    fn normalized(mut spec: Value) -> Value {
        if let Some(sets) = spec
            .pointer_mut("/process/capabilities")
            .and_then(Value::as_object_mut)
        {
            for list in sets.values_mut() {
                if let Some(items) = list.as_array_mut() {
                    items.sort_by_key(|v| v.as_str().map(str::to_owned));
                }
            }
        }
        spec
    }

    fn typed_json(spec: &Spec) -> Value {
        normalized(serde_json::to_value(spec).expect("the spec serializes"))
    }

    #[test]
    fn tier_names() {
        assert_eq!(Tier::Host.as_str(), "host");
        assert_eq!(Tier::Superpowered.as_str(), "superpowered");
        assert_eq!(Tier::Bootstrap.as_str(), "bootstrap");
    }

    /// DESIGN.md's "Privilege tiers" table.
    #[test]
    fn tier_rules_are_the_design_table() {
        let host = Tier::Host.rules();
        assert_eq!(host.capabilities, TierCapabilities::DefaultPlus(&[]));
        assert_eq!(host.seccomp, Some(&[][..]));
        assert!(host.no_new_privileges);
        assert!(host.private_pid_namespace);
        assert!(!host.all_devices);
        assert!(host.confined_proc_and_sys);
        assert!(!host.host_root);
        assert_eq!(host.persistent_dir, "/.bottlerocket/host-containers");

        let superpowered = Tier::Superpowered.rules();
        assert_eq!(superpowered.capabilities, TierCapabilities::AllOfHost);
        assert_eq!(superpowered.seccomp, None);
        assert!(!superpowered.no_new_privileges);
        assert!(!superpowered.private_pid_namespace);
        assert!(superpowered.all_devices);
        assert!(!superpowered.confined_proc_and_sys);
        assert!(superpowered.host_root);
        assert_eq!(
            superpowered.persistent_dir,
            "/.bottlerocket/host-containers"
        );

        let bootstrap = Tier::Bootstrap.rules();
        assert_eq!(
            bootstrap.capabilities,
            TierCapabilities::DefaultPlus(&[
                "CAP_SYS_ADMIN",
                "CAP_NET_ADMIN",
                "CAP_SYS_MODULE",
                "CAP_AUDIT_CONTROL"
            ])
        );
        assert_eq!(bootstrap.seccomp, Some(&["swapon", "swapoff"][..]));
        assert!(bootstrap.no_new_privileges);
        assert!(!bootstrap.private_pid_namespace);
        assert!(bootstrap.all_devices);
        assert!(bootstrap.confined_proc_and_sys);
        assert!(!bootstrap.host_root);
        assert_eq!(
            bootstrap.persistent_dir,
            "/.bottlerocket/bootstrap-containers"
        );
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

    /// Every capability name is one of oci-spec's, and is written back as it was named.
    #[test]
    fn capability_names_are_oci_specs() {
        let mut seen = std::collections::HashSet::new();
        for name in ALL_CAPABILITIES {
            let cap = to_capability(name).expect(name);
            assert_eq!(serde_json::to_value(cap).expect("json"), json!(name));
            assert!(seen.insert(cap), "{name} maps to a capability twice");
        }
        for bad in ["CAP_NOPE", "SYS_ADMIN", "cap_sys_admin", "CAP_", ""] {
            assert!(matches!(
                to_capability(bad),
                Err(SpecError::UnknownCapability(_))
            ));
        }
    }

    #[test]
    fn host_tier() {
        let spec = spec(Tier::Host);
        assert_caps(&spec, &DEFAULT_CAPABILITIES);
        assert_eq!(process(&spec).no_new_privileges(), Some(true));
        assert!(seccomp_allows(&spec, "read"));
        assert!(!seccomp_allows(&spec, "mount"));
        assert!(!seccomp_allows(&spec, "swapon"));
        assert_eq!(
            namespaces(&spec),
            [
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Mount
            ]
        );

        let devices = devices(&spec);
        assert!(!devices[0].allow());
        assert_eq!(devices[0].typ(), None);
        assert_eq!(devices[0].major(), None);
        assert_eq!(devices[0].access().as_deref(), Some("rwm"));
        assert_eq!(devices.len(), 10);
        assert!(devices[1..]
            .iter()
            .all(|d| d.allow() && d.typ() == Some(LinuxDeviceType::C)));
        assert!(devices
            .iter()
            .any(|d| d.major() == Some(1) && d.minor() == Some(3) && d.allow()));
        assert!(devices
            .iter()
            .any(|d| d.major() == Some(136) && d.minor().is_none()));

        assert_eq!(kind(&spec, "/dev"), "tmpfs");
        assert!(mount_options(&spec, "/dev/pts").contains(&"newinstance"));
        assert!(is_read_only(&mount_options(&spec, "/sys")));
        assert!(is_read_only(&mount_options(&spec, "/sys/fs/cgroup")));

        let persistent = "/.bottlerocket/host-containers/admin";
        assert_eq!(source(&spec, persistent), "/local/host-containers/admin");
        assert!(mount_options(&spec, persistent).contains(&"rw"));
        assert_eq!(source(&spec, "/run/api.sock"), "/run/keel/api.sock");
        assert_eq!(
            source(&spec, "/usr/local/bin/apiclient"),
            "/usr/bin/apiclient"
        );
        assert!(is_read_only(&mount_options(
            &spec,
            "/usr/local/bin/apiclient"
        )));
        assert!(find_mount(&spec, HOST_ROOTFS_MOUNT).is_none());
        assert!(find_mount(&spec, "/lib/modules").is_none());
        assert!(find_mount(&spec, "/.bottlerocket/bootstrap-containers/admin").is_none());

        assert_eq!(
            linux(&spec).masked_paths().as_deref(),
            Some(&strings(&MASKED_PATHS)[..])
        );
        assert_eq!(
            linux(&spec).readonly_paths().as_deref(),
            Some(&strings(&READONLY_PATHS)[..])
        );
    }

    #[test]
    fn superpowered_tier() {
        let spec = spec(Tier::Superpowered);
        assert_caps(&spec, ALL_CAPABILITIES);
        assert_eq!(process(&spec).no_new_privileges(), Some(false));
        assert!(linux(&spec).seccomp().is_none());
        assert_eq!(
            namespaces(&spec),
            [
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Mount
            ]
        );
        let devices = devices(&spec);
        assert_eq!(devices.len(), 1);
        assert!(devices[0].allow());
        assert_eq!(devices[0].typ(), None);
        assert_eq!(devices[0].access().as_deref(), Some("rwm"));
        assert_eq!(kind(&spec, "/dev"), "bind");
        assert_eq!(source(&spec, "/dev"), "/dev");
        assert!(find_mount(&spec, "/dev/pts").is_none());
        assert!(mount_options(&spec, "/sys").contains(&"rw"));

        assert_eq!(source(&spec, "/.bottlerocket/rootfs"), "/");
        assert_eq!(
            mount_options(&spec, "/.bottlerocket/rootfs"),
            ["rbind", "ro", "rslave"]
        );
        assert_eq!(source(&spec, "/lib/modules"), "/lib/modules");
        assert!(is_read_only(&mount_options(&spec, "/lib/modules")));
        assert!(find_mount(&spec, "/.bottlerocket/host-containers/admin").is_some());
        assert!(find_mount(&spec, "/run/api.sock").is_some());
        assert!(find_mount(&spec, "/usr/local/bin/apiclient").is_some());

        assert!(linux(&spec).masked_paths().is_none());
        assert!(linux(&spec).readonly_paths().is_none());

        // A host without loadable modules has no /lib/modules to bind.
        let mut owned = Owned::new();
        owned.modules = false;
        let spec = owned.build(Tier::Superpowered).expect("spec");
        assert!(find_mount(&spec, "/lib/modules").is_none());
        assert!(find_mount(&spec, "/.bottlerocket/rootfs").is_some());
        // "All" capabilities are what the host holds.
        owned.host_caps = (1u64 << 40) - 1;
        let spec = owned.build(Tier::Superpowered).expect("spec");
        assert_caps(&spec, &ALL_CAPABILITIES[..40]);
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
        assert_eq!(process(&spec).no_new_privileges(), Some(true));
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
        assert_eq!(
            namespaces(&spec),
            [
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Mount
            ]
        );
        let devices = devices(&spec);
        assert_eq!(devices.len(), 1);
        assert!(devices[0].allow());
        assert_eq!(source(&spec, "/dev"), "/dev");
        assert!(is_read_only(&mount_options(&spec, "/sys")));

        let persistent = "/.bottlerocket/bootstrap-containers/admin";
        assert_eq!(
            source(&spec, persistent),
            "/local/bootstrap-containers/admin"
        );
        assert!(find_mount(&spec, "/.bottlerocket/host-containers/admin").is_none());
        assert!(find_mount(&spec, "/run/api.sock").is_some());
        assert!(find_mount(&spec, "/usr/local/bin/apiclient").is_some());
        assert!(find_mount(&spec, HOST_ROOTFS_MOUNT).is_none());
        assert_eq!(
            linux(&spec).masked_paths().as_deref(),
            Some(&strings(&MASKED_PATHS)[..])
        );
    }

    #[test]
    fn common_to_all_tiers() {
        for tier in TIERS {
            let spec = spec(tier);
            assert_eq!(spec.version(), "1.0.2");
            let root = spec.root().as_ref().expect("root");
            assert_eq!(root.path(), Path::new("rootfs"));
            assert_eq!(root.readonly(), Some(false));
            assert_eq!(process(&spec).terminal(), Some(false));
            assert_eq!(user(&spec), (0, 0));
            assert_eq!(process(&spec).cwd(), Path::new("/"));
            let rlimits = process(&spec).rlimits().as_ref().expect("rlimits");
            assert_eq!(rlimits.len(), 1);
            assert_eq!(rlimits[0].typ(), PosixRlimitType::RlimitNofile);
            assert_eq!((rlimits[0].hard(), rlimits[0].soft()), (1024, 1024));
            assert!(!namespaces(&spec).contains(&LinuxNamespaceType::Network));
            assert_eq!(
                linux(&spec).cgroups_path().as_deref(),
                Some(Path::new("/keel/admin"))
            );
            let resources = linux(&spec).resources().as_ref().expect("resources");
            assert!(resources.memory().is_none());
            assert!(resources.cpu().is_none());

            // Copies keeld keeps up to date in place (a bind mount of the host's own
            // file would keep the inode it was made with).
            for (file, copy) in [
                ("/etc/resolv.conf", "/run/keel/host-etc/resolv.conf"),
                ("/etc/hosts", "/run/keel/host-etc/hosts"),
            ] {
                assert_eq!(source(&spec, file), copy);
                assert!(is_read_only(&mount_options(&spec, file)), "{file}");
            }
            let targets: Vec<&Path> = spec
                .mounts()
                .iter()
                .flatten()
                .map(|m| m.destination().as_path())
                .collect();
            for target in [
                "/proc",
                "/dev",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/run",
            ] {
                assert!(targets.contains(&Path::new(target)), "{tier:?} {target}");
            }
            // Parents come before what is mounted inside them.
            let at = |t: &str| targets.iter().position(|p| *p == Path::new(t));
            assert!(at("/dev") < at("/dev/shm") && at("/run") < at("/run/api.sock"));
            let unique: BTreeSet<&Path> = targets.iter().copied().collect();
            assert_eq!(unique.len(), targets.len(), "duplicate mount destination");
            // Each mount is written with exactly these fields, in this order.
            for m in spec.mounts().iter().flatten() {
                let value = serde_json::to_value(m).expect("json");
                let keys: Vec<&str> = value
                    .as_object()
                    .expect("mount")
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(keys, ["destination", "type", "source", "options"]);
            }
        }
    }

    /// oci-spec's defaults (`Spec::default()` and the builders' fallbacks) are not
    /// containerd's: none of them survives into a Keel spec.
    #[test]
    fn none_of_oci_specs_defaults() {
        for tier in TIERS {
            let spec = spec(tier);
            assert!(spec.hostname().is_none(), "{tier:?}: hostname");
            assert!(spec.domainname().is_none());
            assert!(spec.annotations().is_none());
            assert!(spec.hooks().is_none());
            let process = process(&spec);
            let sets = process.capabilities().as_ref().expect("capabilities");
            assert!(sets.ambient().is_none(), "{tier:?}: ambient capabilities");
            assert!(!env(&spec).iter().any(|e| e.starts_with("TERM=")));
            assert!(process.apparmor_profile().is_none());
            assert!(process.oom_score_adj().is_none());
            let linux = linux(&spec);
            assert!(linux.devices().is_none());
            assert!(linux.sysctl().is_none());
            assert!(linux.uid_mappings().is_none());
            assert!(linux.rootfs_propagation().is_none());
            // A host container's device rules start by denying everything.
            if tier == Tier::Host {
                assert!(!devices(&spec)[0].allow());
            }
        }
    }

    /// The spec of each tier is the one keeld wrote before the spec was typed
    /// (`testdata/spec-<tier>-<plain|full>.json`, written on x86_64, whose seccomp
    /// architectures they list).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_tier_writes_the_recorded_spec() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/containers/testdata");
        for (variant, owned, name) in [
            ("plain", Owned::new(), "admin"),
            ("full", Owned::full(), "full-1"),
        ] {
            for tier in TIERS {
                let file = dir.join(format!("spec-{}-{variant}.json", tier.as_str()));
                let text = std::fs::read_to_string(&file).expect("a recorded spec");
                let recorded: Value = serde_json::from_str(&text).expect("recorded JSON");
                let persistent = PathBuf::from(match tier {
                    Tier::Bootstrap => format!("/local/bootstrap-containers/{name}"),
                    _ => format!("/local/host-containers/{name}"),
                });
                let typed = build(&SpecRequest {
                    persistent_dir: &persistent,
                    ..owned.request(name, tier)
                })
                .expect("spec");
                assert_eq!(
                    typed_json(&typed),
                    normalized(recorded),
                    "{}",
                    file.display()
                );
            }
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
            for tier in TIERS {
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
            env(&spec),
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
        assert_eq!(env(&spec), [DEFAULT_PATH_ENV, "LANG=C", "A=2"]);

        req.environment = vec![("PATH".into(), "/custom".into())];
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(env(&spec), ["LANG=C", "PATH=/custom"]);

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
        assert_eq!(args(&spec), ["/usr/bin/entry", "--serve"]);

        req.command = Some(vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()]);
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(args(&spec), ["/bin/sh", "-c", "sleep 1"]);

        req.command = Some(Vec::new());
        assert!(matches!(
            req.build(Tier::Host),
            Err(SpecError::EmptyCommand)
        ));

        req.command = None;
        req.image.set_entrypoint(None);
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(args(&spec), ["--serve"]);
        req.image.set_cmd(Some(Vec::new()));
        assert!(matches!(req.build(Tier::Host), Err(SpecError::NoCommand)));
        req.image.set_entrypoint(Some(vec!["/init".into()]));
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(args(&spec), ["/init"]);
    }

    #[test]
    fn user_and_working_dir() {
        let mut req = Owned::new();
        for (given, uid, gid) in [("1000:1001", 1000, 1001), ("42", 42, 0), ("0:0", 0, 0)] {
            req.image.set_user(Some(given.into()));
            let spec = req.build(Tier::Host).expect("spec");
            assert_eq!(user(&spec), (uid, gid), "{given}");
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
        assert_eq!(user(&spec), (0, 0));
        req.image.set_user(None);
        req.image.set_working_dir(Some(String::new()));
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(process(&spec).cwd(), Path::new("/"));
        req.image.set_working_dir(Some("/srv/app".into()));
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(process(&spec).cwd(), Path::new("/srv/app"));
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
        let resources = linux(&spec).resources().as_ref().expect("resources");
        let memory = resources.memory().expect("memory");
        assert_eq!(memory.limit(), Some(268_435_456));
        let cpu = resources.cpu().as_ref().expect("cpu");
        assert_eq!((cpu.quota(), cpu.period()), (Some(150_000), Some(100_000)));
        let json = typed_json(&spec);
        assert_eq!(
            json["linux"]["resources"]["memory"],
            json!({ "limit": 268_435_456 }),
            "a host that cannot bound swap gets no swap limit"
        );
        req.swap = true;
        let json = typed_json(&req.build(Tier::Host).expect("spec"));
        assert_eq!(
            json["linux"]["resources"]["memory"],
            json!({ "limit": 268_435_456, "swap": 268_435_456 }),
            "memory + swap = the limit: no swap"
        );
        req.swap = false;
        assert_eq!(
            json["linux"]["resources"]["cpu"],
            json!({ "quota": 150_000, "period": 100_000 })
        );
        req.cpu = Some(10);
        let spec = req.build(Tier::Host).expect("spec");
        let resources = linux(&spec).resources().as_ref().expect("resources");
        assert_eq!(resources.cpu().as_ref().and_then(|c| c.quota()), Some(1000));
        // Device rules stay alongside the limits.
        assert_eq!(devices(&spec).len(), 10);

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
        assert_eq!(
            linux(&spec).cgroups_path().as_deref(),
            Some(Path::new("/keel/control-2"))
        );
        assert!(find_mount(&spec, "/.bottlerocket/host-containers/control-2").is_some());

        req.parent = "/keel/containers/".into();
        let spec = req.build(Tier::Bootstrap).expect("spec");
        assert_eq!(
            linux(&spec).cgroups_path().as_deref(),
            Some(Path::new("/keel/containers/admin"))
        );

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
            persistent_dir: Path::new("local/host-containers/admin"),
            ..owned.request("admin", Tier::Host)
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
        let mut req = Owned::new();
        req.image = parsed.config().clone().expect("config object");
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(args(&spec), ["/entry", "run", "--fast"]);
        assert_eq!(env(&spec), ["PATH=/usr/bin", "A=1"]);
        assert_eq!(process(&spec).cwd(), Path::new("/work"));
        assert_eq!(user(&spec), (1000, 1000));

        // Null and empty fields are absent.
        let sparse: oci_spec::image::ImageConfiguration = serde_json::from_value(json!({
            "architecture": "amd64", "os": "linux",
            "config": { "Entrypoint": null, "Cmd": ["/bin/sh"], "WorkingDir": "", "User": "" },
            "rootfs": { "type": "layers", "diff_ids": [] },
        }))
        .expect("sparse config");
        req.image = sparse.config().clone().expect("config object");
        let spec = req.build(Tier::Host).expect("spec");
        assert_eq!(args(&spec), ["/bin/sh"]);
        assert_eq!(env(&spec), [DEFAULT_PATH_ENV]);
        assert_eq!(process(&spec).cwd(), Path::new("/"));
        assert_eq!(user(&spec), (0, 0));
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
