//! keeld's own sandbox, installed at start-up before any thread or child exists, and
//! inherited by every child keeld starts (restart commands, bootstrap commands,
//! providers):
//!
//! 1. kernel tunables: when keeld starts with CAP_SYS_ADMIN (outside systemd), it moves
//!    into a mount namespace of its own (a slave of the host's: later host mounts still
//!    show up where the host's mounts are shared, as systemd makes them) and binds [`READ_ONLY_PATHS`] read-only there, before dropping
//!    CAP_SYS_ADMIN. A uid-0 process needs no capability to write `/proc/sys`: writing
//!    `kernel.core_pattern` (or `kernel.modprobe`) makes the kernel run a program of the
//!    writer's choosing as full root. Under systemd keeld never holds CAP_SYS_ADMIN and
//!    the unit's `ProtectKernelTunables=yes` does the same. Either way keeld checks at
//!    the end that [`MUST_BE_READ_ONLY`] cannot be opened for writing, and refuses to
//!    run otherwise;
//! 2. capabilities: the bounding, permitted, effective and inheritable sets shrink to
//!    [`KEPT_CAPABILITIES`]; the ambient set is cleared;
//! 3. `no_new_privs`: no exec can gain privileges (setuid binaries, file capabilities);
//! 4. Landlock signal scoping (Linux 6.12+, Landlock ABI 6): keeld and its children can
//!    signal only processes in their own Landlock domain, i.e. keeld's own tree. Without
//!    it a uid-0 process needs no CAP_KILL to signal every other uid-0 process. Being in
//!    a Landlock domain also refuses ptrace-mode access (`/proc/<pid>/root`, `mem`,
//!    `environ`…) to processes outside it. On older kernels keeld warns and goes on;
//! 5. seccomp filters on all threads. One answers `EPERM` to [`DENIED_SYSCALLS`], calls
//!    keeld never makes, and to [`DENIED_WITH_ARGUMENTS`], calls keeld makes only in a
//!    harmless form (clone without namespace flags, signals to its own processes,
//!    limits and priorities of itself). The other answers `ENOSYS` to `clone3`, whose
//!    flags sit in memory a filter cannot read: libc then falls back to `clone`, whose
//!    flags the first filter checks. Anything else is allowed: keeld's own needs (files,
//!    sockets, processes) are broad, and an allow-list that misses one call in a rare
//!    path fails in production; the deny-list closes the doors an attacker who got code
//!    execution in keeld would use to take the kernel or other processes.
//!
//! `--no-sandbox` skips all of it, for debugging, and says so loudly in the log.

use std::collections::BTreeMap;
use std::ffi::CString;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What keeld keeps, and why. Everything else goes, from every set.
pub const KEPT_CAPABILITIES: [(Capability, &str); 3] = [
    (
        Capability::CAP_CHOWN,
        "give the API socket its group (`--socket-group`), which root is not a member of",
    ),
    (
        Capability::CAP_DAC_OVERRIDE,
        "write rendered files and a container's user-data into directories a container or \
         package may own",
    ),
    (
        Capability::CAP_FOWNER,
        "set modes on those files and directories (a persistent directory goes back to 0700)",
    ),
];

/// Made read-only (recursively) in keeld's own mount namespace when keeld starts with
/// CAP_SYS_ADMIN; what systemd's `ProtectKernelTunables=yes` makes read-only too. keeld
/// writes none of them: sysctls are applied by systemd-sysctl.service, started through
/// `systemctl`, outside keeld's sandbox.
pub const READ_ONLY_PATHS: [&str; 3] = ["/proc/sys", "/proc/sysrq-trigger", "/sys"];

/// Files keeld checks it cannot open for writing once sandboxed, or it refuses to run:
/// each one lets a uid-0 process without capabilities run code as full root, or crash
/// or reboot the machine.
pub const MUST_BE_READ_ONLY: [&str; 3] = [
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/modprobe",
    "/proc/sysrq-trigger",
];

/// System calls keeld never makes, each refused with `EPERM`, with why it is denied.
/// Grouped by what they would give an attacker who took over keeld.
pub const DENIED_SYSCALLS: &[(&str, &str)] = &[
    // Loading code into the kernel, or replacing it.
    ("init_module", "kernel modules"),
    ("finit_module", "kernel modules"),
    ("delete_module", "kernel modules"),
    ("kexec_load", "booting another kernel"),
    ("kexec_file_load", "booting another kernel"),
    ("bpf", "eBPF programs in the kernel"),
    // Reading or steering other processes.
    ("ptrace", "tracing other processes"),
    ("process_vm_readv", "reading other processes' memory"),
    ("process_vm_writev", "writing other processes' memory"),
    ("process_madvise", "advising on other processes' memory"),
    (
        "pidfd_getfd",
        "taking file descriptors from other processes",
    ),
    (
        "pidfd_send_signal",
        "signals through a pidfd, which carries no pid a filter could check (keeld \
         signals with kill)",
    ),
    ("kcmp", "probing other processes' kernel objects"),
    (
        "perf_event_open",
        "performance counters: side channels, kernel attack surface",
    ),
    // The machine itself.
    (
        "reboot",
        "reboots go through the configured reboot command, never the syscall",
    ),
    ("swapon", "swap configuration"),
    ("swapoff", "swap configuration"),
    ("settimeofday", "the clock belongs to chronyd"),
    ("clock_settime", "the clock belongs to chronyd"),
    ("clock_adjtime", "the clock belongs to chronyd"),
    ("adjtimex", "the clock belongs to chronyd"),
    ("acct", "process accounting"),
    ("quotactl", "disk quotas"),
    ("quotactl_fd", "disk quotas"),
    ("syslog", "the kernel log buffer"),
    ("iopl", "raw port I/O"),
    ("ioperm", "raw port I/O"),
    ("vhangup", "terminals"),
    // Hiding, escaping and re-rooting: keeld mounts nothing and makes no namespaces
    // (containers are containerd's).
    ("mount", "mounting file systems"),
    ("umount2", "unmounting file systems"),
    ("pivot_root", "changing the root file system"),
    ("chroot", "changing the root directory"),
    ("unshare", "new namespaces"),
    ("setns", "entering other namespaces"),
    // The new mount API: the same as mount(2), one step at a time.
    ("fsopen", "mounting file systems (new mount API)"),
    ("fsconfig", "mounting file systems (new mount API)"),
    ("fsmount", "mounting file systems (new mount API)"),
    (
        "fspick",
        "reconfiguring mounted file systems (new mount API)",
    ),
    ("move_mount", "attaching mounts (new mount API)"),
    ("open_tree", "copying mount trees (new mount API)"),
    (
        "mount_setattr",
        "changing mount flags, e.g. read-only (new mount API)",
    ),
    (
        "open_by_handle_at",
        "opening files by handle, around path checks",
    ),
    ("name_to_handle_at", "file handles"),
    ("fanotify_init", "watching the whole file system"),
    // Kernel interfaces with a long record of exploits and no use here.
    ("keyctl", "the kernel keyring"),
    ("add_key", "the kernel keyring"),
    ("request_key", "the kernel keyring"),
    (
        "userfaultfd",
        "page-fault handling in user space (an exploit primitive)",
    ),
    (
        "io_uring_setup",
        "io_uring: a second system call interface seccomp does not see, and a long \
         record of exploits",
    ),
    ("io_uring_enter", "io_uring"),
    ("io_uring_register", "io_uring"),
];

/// The namespace flags of clone(2). `CLONE_NEWTIME` is not among them: clone(2) cannot
/// take it (its bit is part of the exit signal there), only unshare and clone3 can.
pub const NAMESPACE_FLAGS: [(&str, libc::c_int); 7] = [
    ("CLONE_NEWNS", libc::CLONE_NEWNS),
    ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP),
    ("CLONE_NEWUTS", libc::CLONE_NEWUTS),
    ("CLONE_NEWIPC", libc::CLONE_NEWIPC),
    ("CLONE_NEWUSER", libc::CLONE_NEWUSER),
    ("CLONE_NEWPID", libc::CLONE_NEWPID),
    ("CLONE_NEWNET", libc::CLONE_NEWNET),
];

/// When a call in [`DENIED_WITH_ARGUMENTS`] is refused: any one condition is enough.
/// Arguments are compared as 32-bit values, as the kernel reads them (`int`, `pid_t`,
/// clone's flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Argument `arg` has any of clone's [`NAMESPACE_FLAGS`] set.
    NamespaceFlags { arg: u8 },
    /// Argument `arg` is `value`.
    Is { arg: u8, value: u32 },
    /// Argument `arg` is anything but `value`.
    IsNot { arg: u8, value: u32 },
}

/// pid -1 as the kernel reads it: kill(-1) signals every process the caller may signal.
const ALL_PROCESSES: u32 = u32::MAX;

/// fcntl commands that set a file's SIGIO owner and its signal (asm-generic/fcntl.h; the
/// same on x86_64 and arm64).
const F_SETOWN: u32 = 8;
const F_SETSIG: u32 = 10;
const F_SETOWN_EX: u32 = 15;

/// ioctl requests that set a file's SIGIO owner, as F_SETOWN does (asm-generic/sockios.h;
/// the same on x86_64 and arm64).
const FIOSETOWN: u32 = 0x8901;
const SIOCSPGRP: u32 = 0x8902;

/// Calls keeld makes, refused with `EPERM` in the forms it does not make: new namespaces,
/// and reaching processes other than itself. A uid-0 process needs no capability to
/// signal, renice, re-limit or re-pin any other uid-0 process; these conditions keep
/// keeld to itself where the target is an argument. (Signals to other pids are kept
/// to keeld's own tree by Landlock, when the kernel has it.)
pub const DENIED_WITH_ARGUMENTS: &[(&str, &[When], &str)] = &[
    (
        "clone",
        &[When::NamespaceFlags { arg: 0 }],
        "new namespaces (a user namespace gives back every capability inside it)",
    ),
    (
        "kill",
        &[
            When::Is { arg: 0, value: 1 },
            When::Is {
                arg: 0,
                value: ALL_PROCESSES,
            },
        ],
        "PID 1 (systemd powers off or reboots on some signals) and every process at once",
    ),
    ("tkill", &[When::Is { arg: 0, value: 1 }], "PID 1"),
    // A file's owner gets SIGIO (or the signal F_SETSIG names) when the file is ready,
    // and the kernel checks only the owner's credentials against the caller's, not
    // CAP_KILL: a uid-0 child could make PID 1 its pipe's owner, with SIGRTMIN+4, and
    // write to it (systemd powers off). keeld makes neither call; Landlock's signal
    // scope covers this only from Linux 6.12.
    (
        "fcntl",
        &[
            When::Is {
                arg: 1,
                value: F_SETOWN,
            },
            When::Is {
                arg: 1,
                value: F_SETOWN_EX,
            },
            When::Is {
                arg: 1,
                value: F_SETSIG,
            },
        ],
        "making any process the signalled owner of a file (SIGIO), PID 1 included",
    ),
    (
        "ioctl",
        &[
            When::Is {
                arg: 1,
                value: FIOSETOWN,
            },
            When::Is {
                arg: 1,
                value: SIOCSPGRP,
            },
        ],
        "the same through ioctl (FIOSETOWN, SIOCSPGRP)",
    ),
    ("tgkill", &[When::Is { arg: 0, value: 1 }], "PID 1"),
    ("rt_sigqueueinfo", &[When::Is { arg: 0, value: 1 }], "PID 1"),
    (
        "rt_tgsigqueueinfo",
        &[When::Is { arg: 0, value: 1 }],
        "PID 1",
    ),
    (
        "prlimit64",
        &[When::IsNot { arg: 0, value: 0 }],
        "other processes' resource limits",
    ),
    (
        "setpriority",
        // PRIO_PROCESS (0) of itself (0) only: PRIO_USER 0 is every uid-0 process.
        &[
            When::IsNot { arg: 0, value: 0 },
            When::IsNot { arg: 1, value: 0 },
        ],
        "other processes' priorities",
    ),
    (
        "ioprio_set",
        // IOPRIO_WHO_PROCESS (1) of itself (0) only.
        &[
            When::IsNot { arg: 0, value: 1 },
            When::IsNot { arg: 1, value: 0 },
        ],
        "other processes' I/O priorities",
    ),
    (
        "sched_setaffinity",
        &[When::IsNot { arg: 0, value: 0 }],
        "other processes' CPUs",
    ),
    (
        "sched_setscheduler",
        &[When::IsNot { arg: 0, value: 0 }],
        "other processes' scheduling",
    ),
    (
        "sched_setparam",
        &[When::IsNot { arg: 0, value: 0 }],
        "other processes' scheduling",
    ),
    (
        "sched_setattr",
        &[When::IsNot { arg: 0, value: 0 }],
        "other processes' scheduling",
    ),
    (
        "migrate_pages",
        &[When::IsNot { arg: 0, value: 0 }],
        "other processes' memory placement",
    ),
    (
        "move_pages",
        &[When::IsNot { arg: 0, value: 0 }],
        "other processes' memory placement",
    ),
];

/// Answered with `ENOSYS` rather than `EPERM`, so that libc falls back to an older call
/// the filter can judge.
pub const UNAVAILABLE_SYSCALLS: &[(&str, &str)] = &[(
    "clone3",
    "its flags are in memory, out of a filter's reach; without it libc uses clone(2), \
     whose namespace flags are refused",
)];

/// Why the sandbox could not be installed; keeld refuses to start unsandboxed unless
/// told `--no-sandbox`.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox must be installed before any other thread exists ({0} threads)")]
    Threads(usize),
    #[error("making kernel tunables read-only: {0}")]
    Tunables(String),
    #[error(
        "{0} can be opened for writing: a uid-0 process could make the kernel run any \
         program as full root. Start keeld with CAP_SYS_ADMIN (it makes {ro} read-only \
         in its own mount namespace, then drops it) or under systemd with \
         ProtectKernelTunables=yes (units/keeld.service)",
        ro = READ_ONLY_PATHS.join(", ")
    )]
    TunablesWritable(String),
    #[error("dropping capabilities: {0}")]
    Capabilities(String),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("Landlock signal scoping: {0}")]
    Landlock(String),
    #[error("building the seccomp filter: {0}")]
    Filter(String),
    #[error("installing the seccomp filter: {0}")]
    Install(String),
}

/// Installs every layer. Call before starting threads or children.
pub fn install() -> Result<(), SandboxError> {
    // unshare(CLONE_NEWNS) and landlock_restrict_self act on the calling thread only.
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(SandboxError::Threads(threads));
    }
    protect_kernel_tunables()?;
    drop_capabilities()?;
    set_no_new_privs()?;
    scope_signals()?;
    install_filters()?;
    check_tunables_read_only()
}

/// Step 1: with CAP_SYS_ADMIN, [`READ_ONLY_PATHS`] read-only in a mount namespace of
/// keeld's own. Without it (under systemd) there is nothing keeld can do itself;
/// [`check_tunables_read_only`] then decides.
fn protect_kernel_tunables() -> Result<(), SandboxError> {
    let has_sys_admin =
        caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false);
    if !has_sys_admin {
        tracing::info!(
            "no CAP_SYS_ADMIN: relying on the service manager to keep kernel tunables \
             read-only (ProtectKernelTunables=yes); checked below"
        );
        return Ok(());
    }
    // SAFETY: unshare(2) takes flags only; keeld is single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        // E.g. a container runtime's filter: the check below decides.
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot make a mount namespace for keeld; kernel tunables left as they are"
        );
        return Ok(());
    }
    // A slave: the host's later mounts still reach keeld, keeld's never reach the host.
    mount(None, "/", libc::MS_REC | libc::MS_SLAVE)?;
    for path in READ_ONLY_PATHS {
        if std::path::Path::new(path).exists() {
            bind_read_only(path)?;
        }
    }
    tracing::info!(
        paths = ?READ_ONLY_PATHS,
        "kernel tunables read-only in keeld's own mount namespace"
    );
    Ok(())
}

fn c_path(path: &str) -> Result<CString, SandboxError> {
    CString::new(path).map_err(|e| SandboxError::Tunables(format!("{path}: {e}")))
}

fn mount(source: Option<&str>, target: &str, flags: libc::c_ulong) -> Result<(), SandboxError> {
    let target_c = c_path(target)?;
    let source_c = source.map(c_path).transpose()?;
    let source_ptr = source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: mount(2) with NUL-terminated paths (or NULL) and no data.
    let rc = unsafe {
        libc::mount(
            source_ptr,
            target_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(SandboxError::Tunables(format!(
            "mount {target} (flags {flags:#x}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Binds `path` onto itself, then makes it and every mount below it read-only.
fn bind_read_only(path: &str) -> Result<(), SandboxError> {
    mount(Some(path), path, libc::MS_BIND | libc::MS_REC)?;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    // struct mount_attr: attr_set, attr_clr, propagation, userns_fd.
    let attr: [u64; 4] = [MOUNT_ATTR_RDONLY, 0, 0, 0];
    let path_c = c_path(path)?;
    // SAFETY: mount_setattr(2) with a NUL-terminated path and a mount_attr of the size
    // passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path_c.as_ptr(),
            AT_RECURSIVE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(SandboxError::Tunables(format!(
            "mount_setattr {path}: {err}"
        )));
    }
    // Linux before 5.12: remount each mount at or below `path`, parents first, keeping
    // the flags each already has (some may be locked).
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SandboxError::Tunables(format!("/proc/self/mountinfo: {e}")))?;
    for mount_point in mounts_at_or_below(&mountinfo, path) {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(&mount_point)?;
        mount(None, &mount_point, flags)?;
    }
    Ok(())
}

/// Mount points in `mountinfo` equal to or below `path`, in mount order (parents
/// first). Octal escapes (`\040` for a space) are decoded.
fn mounts_at_or_below(mountinfo: &str, path: &str) -> Vec<String> {
    let prefix = format!("{}/", path.trim_end_matches('/'));
    let mut out: Vec<String> = Vec::new();
    for line in mountinfo.lines() {
        let Some(field) = line.split(' ').nth(4) else {
            continue;
        };
        let point = unescape_octal(field);
        if (point == path || point.starts_with(&prefix)) && !out.contains(&point) {
            out.push(point);
        }
    }
    out
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], escaped) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The per-mount flags `mount_point` has now, which a read-only remount must repeat.
fn kept_flags(mount_point: &str) -> Result<libc::c_ulong, SandboxError> {
    let path_c = c_path(mount_point)?;
    // SAFETY: statvfs(2) into a zeroed struct, NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path_c.as_ptr(), &mut st) } != 0 {
        return Err(SandboxError::Tunables(format!(
            "statvfs {mount_point}: {}",
            std::io::Error::last_os_error()
        )));
    }
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |flags, (_, ms_flag)| flags | ms_flag))
}

/// The last step: none of [`MUST_BE_READ_ONLY`] opens for writing (opening writes
/// nothing; a sysctl changes on write(2)).
fn check_tunables_read_only() -> Result<(), SandboxError> {
    for path in MUST_BE_READ_ONLY {
        if std::fs::OpenOptions::new().write(true).open(path).is_ok() {
            return Err(SandboxError::TunablesWritable(path.to_owned()));
        }
    }
    Ok(())
}

fn drop_capabilities() -> Result<(), SandboxError> {
    let err = |e: caps::errors::CapsError| SandboxError::Capabilities(e.to_string());
    let keep: CapsHashSet = KEPT_CAPABILITIES.iter().map(|(c, _)| *c).collect();
    // The bounding set first, while CAP_SETPCAP is still effective.
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).map_err(err)? {
            caps::drop(None, CapSet::Bounding, cap).map_err(err)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    let held = caps::read(None, CapSet::Permitted).map_err(err)?;
    let kept: CapsHashSet = held.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err)?;
    Ok(())
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The Landlock ABI version that scopes signals (Linux 6.12).
pub const LANDLOCK_SIGNAL_ABI: i64 = 6;

/// The kernel's Landlock ABI version; 0 when Landlock is missing or disabled.
pub fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: landlock_create_ruleset(2) with NULL and size 0 only answers the version.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    rc.max(0)
}

/// Step 4: a Landlock domain that handles no file or network access, only scopes
/// signals (`LANDLOCK_SCOPE_SIGNAL`). keeld's children are born into it, so keeld
/// still signals them. Not abstract Unix sockets: systemd's and others' may be used.
fn scope_signals() -> Result<(), SandboxError> {
    let abi = landlock_abi();
    if abi < LANDLOCK_SIGNAL_ABI {
        tracing::warn!(
            landlock_abi = abi,
            "no Landlock signal scoping (needs Landlock ABI 6, Linux 6.12): keeld and its \
             children can signal any uid-0 process, and open /proc/<pid>/root of uid-0 \
             processes holding no more capabilities than keeld"
        );
        return Ok(());
    }
    const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;
    // struct landlock_ruleset_attr: handled_access_fs, handled_access_net, scoped.
    let attr: [u64; 3] = [0, 0, LANDLOCK_SCOPE_SIGNAL];
    // SAFETY: landlock_create_ruleset(2) with an attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
            0,
        )
    };
    if fd < 0 {
        return Err(SandboxError::Landlock(format!(
            "landlock_create_ruleset: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: landlock_restrict_self(2) on the ruleset just made; no_new_privs is set.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0) };
    let err = std::io::Error::last_os_error();
    if let Ok(fd) = i32::try_from(fd) {
        // SAFETY: closes the ruleset descriptor this function opened.
        unsafe { libc::close(fd) };
    }
    if rc != 0 {
        return Err(SandboxError::Landlock(format!(
            "landlock_restrict_self: {err}"
        )));
    }
    Ok(())
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Filter(format!("{e:?}")))
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SandboxError::Filter(e.to_string()))
}

/// The seccompiler rules for `when`: a call is refused when any of them matches.
fn rules_for(when: &[When]) -> Result<Vec<SeccompRule>, SandboxError> {
    let mut conditions = Vec::new();
    for w in when {
        match *w {
            When::NamespaceFlags { arg } => {
                for (_, flag) in NAMESPACE_FLAGS {
                    let bit = u64::from(flag.unsigned_abs());
                    conditions.push(condition(arg, SeccompCmpOp::MaskedEq(bit), bit)?);
                }
            }
            When::Is { arg, value } => {
                conditions.push(condition(arg, SeccompCmpOp::Eq, u64::from(value))?);
            }
            When::IsNot { arg, value } => {
                conditions.push(condition(arg, SeccompCmpOp::Ne, u64::from(value))?);
            }
        }
    }
    conditions
        .into_iter()
        .map(|c| SeccompRule::new(vec![c]).map_err(|e| SandboxError::Filter(e.to_string())))
        .collect()
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: libc::c_int,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(u32::try_from(errno).unwrap_or(1)),
        target_arch()?,
    )
    .map_err(|e| SandboxError::Filter(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))
}

/// The `EPERM` filter program for this architecture: [`DENIED_SYSCALLS`] always,
/// [`DENIED_WITH_ARGUMENTS`] in the forms listed.
pub fn filter() -> Result<BpfProgram, SandboxError> {
    let mut rules = BTreeMap::new();
    for (name, _) in DENIED_SYSCALLS {
        // A name this architecture lacks (e.g. iopl on aarch64) is simply not there to
        // call.
        if let Some(nr) = syscall_number(name) {
            rules.insert(nr, Vec::new());
        }
    }
    // keeld as PID 1 (in a PID namespace of its own) signals itself as 1.
    let pid_one = std::process::id() == 1;
    for (name, when, _) in DENIED_WITH_ARGUMENTS {
        let when: Vec<When> = when
            .iter()
            .copied()
            .filter(|w| !(pid_one && *w == When::Is { arg: 0, value: 1 }))
            .collect();
        if let (Some(nr), false) = (syscall_number(name), when.is_empty()) {
            rules.insert(nr, rules_for(&when)?);
        }
    }
    compile(rules, libc::EPERM)
}

/// The `ENOSYS` filter program: [`UNAVAILABLE_SYSCALLS`].
pub fn unavailable_filter() -> Result<BpfProgram, SandboxError> {
    let rules = UNAVAILABLE_SYSCALLS
        .iter()
        .filter_map(|(name, _)| syscall_number(name))
        .map(|nr| (nr, Vec::new()))
        .collect();
    compile(rules, libc::ENOSYS)
}

/// x86_64's x32 ABI runs under the same audit architecture as x86_64, with system call
/// numbers that have bit 30 set (`__X32_SYSCALL_BIT`). [`filter`] is keyed by x86_64
/// numbers and never sees them: on a kernel with x32 on (`CONFIG_X86_X32_ABI` and
/// `syscall.x32=y`; Debian builds it in but off) every call it refuses would pass
/// under its x32 number, in keeld and in every child. keeld is a native x86_64 program
/// and makes none: this program refuses them all with `EPERM`, whatever the kernel.
/// (Other architectures' numbers are [`filter`]'s: it kills a call whose architecture
/// is not the native one.)
#[cfg(target_arch = "x86_64")]
pub fn x32_filter() -> BpfProgram {
    use seccompiler::sock_filter;
    // <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>.
    // BPF_LD (0) | BPF_W (0) | BPF_ABS.
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
    const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    // struct seccomp_data: the call's number at offset 0, its architecture at 4.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        op(BPF_LD_W_ABS, 0, 0, ARCH),
        // Not x86_64 (i386 compat): allow here, [`filter`] kills it.
        op(BPF_JMP_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        op(BPF_LD_W_ABS, 0, 0, NR),
        op(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// Every filter program keeld installs, in order.
pub fn programs() -> Result<Vec<BpfProgram>, SandboxError> {
    #[cfg(target_arch = "x86_64")]
    let native_only = Some(x32_filter());
    #[cfg(not(target_arch = "x86_64"))]
    let native_only = None;
    Ok([filter()?, unavailable_filter()?]
        .into_iter()
        .chain(native_only)
        .collect())
}

fn install_filters() -> Result<(), SandboxError> {
    for program in programs()? {
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| SandboxError::Install(e.to_string()))?;
    }
    Ok(())
}

/// The number of system call `name` on this architecture.
fn syscall_number(name: &str) -> Option<i64> {
    let nr = match name {
        "init_module" => libc::SYS_init_module,
        "finit_module" => libc::SYS_finit_module,
        "delete_module" => libc::SYS_delete_module,
        "kexec_load" => libc::SYS_kexec_load,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "bpf" => libc::SYS_bpf,
        "ptrace" => libc::SYS_ptrace,
        "process_vm_readv" => libc::SYS_process_vm_readv,
        "process_vm_writev" => libc::SYS_process_vm_writev,
        "process_madvise" => libc::SYS_process_madvise,
        "pidfd_getfd" => libc::SYS_pidfd_getfd,
        "pidfd_send_signal" => libc::SYS_pidfd_send_signal,
        "kcmp" => libc::SYS_kcmp,
        "perf_event_open" => libc::SYS_perf_event_open,
        "reboot" => libc::SYS_reboot,
        "swapon" => libc::SYS_swapon,
        "swapoff" => libc::SYS_swapoff,
        "settimeofday" => libc::SYS_settimeofday,
        "clock_settime" => libc::SYS_clock_settime,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "adjtimex" => libc::SYS_adjtimex,
        "acct" => libc::SYS_acct,
        "quotactl" => libc::SYS_quotactl,
        "quotactl_fd" => libc::SYS_quotactl_fd,
        "syslog" => libc::SYS_syslog,
        #[cfg(target_arch = "x86_64")]
        "iopl" => libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        "ioperm" => libc::SYS_ioperm,
        "vhangup" => libc::SYS_vhangup,
        "mount" => libc::SYS_mount,
        "umount2" => libc::SYS_umount2,
        "pivot_root" => libc::SYS_pivot_root,
        "chroot" => libc::SYS_chroot,
        "unshare" => libc::SYS_unshare,
        "setns" => libc::SYS_setns,
        "fsopen" => libc::SYS_fsopen,
        "fsconfig" => libc::SYS_fsconfig,
        "fsmount" => libc::SYS_fsmount,
        "fspick" => libc::SYS_fspick,
        "move_mount" => libc::SYS_move_mount,
        "open_tree" => libc::SYS_open_tree,
        "mount_setattr" => libc::SYS_mount_setattr,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "fanotify_init" => libc::SYS_fanotify_init,
        "keyctl" => libc::SYS_keyctl,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "userfaultfd" => libc::SYS_userfaultfd,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "io_uring_enter" => libc::SYS_io_uring_enter,
        "io_uring_register" => libc::SYS_io_uring_register,
        "clone" => libc::SYS_clone,
        "clone3" => libc::SYS_clone3,
        "kill" => libc::SYS_kill,
        "tkill" => libc::SYS_tkill,
        "fcntl" => libc::SYS_fcntl,
        "ioctl" => libc::SYS_ioctl,
        "tgkill" => libc::SYS_tgkill,
        "rt_sigqueueinfo" => libc::SYS_rt_sigqueueinfo,
        "rt_tgsigqueueinfo" => libc::SYS_rt_tgsigqueueinfo,
        "prlimit64" => libc::SYS_prlimit64,
        "setpriority" => libc::SYS_setpriority,
        "ioprio_set" => libc::SYS_ioprio_set,
        "sched_setaffinity" => libc::SYS_sched_setaffinity,
        "sched_setscheduler" => libc::SYS_sched_setscheduler,
        "sched_setparam" => libc::SYS_sched_setparam,
        "sched_setattr" => libc::SYS_sched_setattr,
        "migrate_pages" => libc::SYS_migrate_pages,
        "move_pages" => libc::SYS_move_pages,
        _ => return None,
    };
    Some(nr)
}

/// The bounding set keeld ends up with, as `/proc/<pid>/status` shows `CapBnd`.
pub fn expected_bounding_mask() -> u64 {
    KEPT_CAPABILITIES
        .iter()
        .fold(0u64, |mask, (cap, _)| mask | cap.bitmask())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// No process has this pid (it is above PID_MAX_LIMIT): the kernel answers ESRCH,
    /// the filter EPERM.
    const NO_PID: u64 = 0x3fff_fff0;

    /// Root is needed to see a call succeed (or fail for a reason other than EPERM)
    /// without the filter. `KEEL_REQUIRE_ALL_TESTS=1` turns a skip into a failure.
    fn need_root(what: &str) -> bool {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var_os("KEEL_REQUIRE_ALL_TESTS").is_none(),
            "cannot run: {what} needs root (KEEL_REQUIRE_ALL_TESTS is set)"
        );
        println!("SKIPPED: {what} needs root");
        false
    }

    /// One raw system call.
    #[derive(Clone)]
    struct Call {
        what: String,
        nr: i64,
        args: [u64; 6],
    }

    fn call(what: &str, name: &str, args: &[u64]) -> Call {
        let mut all = [0u64; 6];
        all[..args.len()].copy_from_slice(args);
        Call {
            what: what.to_owned(),
            nr: syscall_number(name).unwrap_or_else(|| panic!("{name}")),
            args: all,
        }
    }

    /// What a call answered: its return value or its errno.
    type Outcome = Result<i64, i32>;

    /// Runs `calls` in a forked child (so nothing sticks to the test process), under
    /// `programs` when given, and answers each call's outcome. A clone's child exits at
    /// once. Only system calls run between fork and exit.
    fn in_child(programs: &[BpfProgram], calls: &[Call]) -> Vec<Outcome> {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child makes only system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: (child) closes the read end; installs filters from memory
            // prepared before the fork; raw system calls; _exit.
            unsafe {
                libc::close(fds[0]);
                for program in programs {
                    if seccompiler::apply_filter(program).is_err() {
                        libc::_exit(3);
                    }
                }
                for c in calls {
                    let a = c.args;
                    let rc = libc::syscall(c.nr, a[0], a[1], a[2], a[3], a[4], a[5]);
                    let errno = if rc < 0 {
                        i64::from(*libc::__errno_location())
                    } else {
                        0
                    };
                    let is_clone = c.nr == libc::SYS_clone || c.nr == libc::SYS_clone3;
                    if is_clone && rc == 0 {
                        libc::_exit(0);
                    }
                    if is_clone && rc > 0 {
                        libc::waitpid(rc as libc::pid_t, std::ptr::null_mut(), 0);
                    }
                    let record: [i64; 2] = [rc, errno];
                    libc::write(fds[1], record.as_ptr().cast(), 16);
                }
                libc::_exit(0);
            }
        }
        // SAFETY: the parent closes the write end it does not use.
        unsafe { libc::close(fds[1]) };
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: read(2) into a buffer of the size passed.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n as usize]);
        }
        let mut status = 0;
        // SAFETY: closes the read end; waits for the child forked above.
        unsafe {
            libc::close(fds[0]);
            libc::waitpid(pid, &mut status, 0);
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
        bytes
            .chunks_exact(16)
            .map(|r| {
                let rc = i64::from_ne_bytes(r[..8].try_into().unwrap());
                let errno = i64::from_ne_bytes(r[8..].try_into().unwrap());
                if rc < 0 {
                    Err(i32::try_from(errno).unwrap())
                } else {
                    Ok(rc)
                }
            })
            .collect()
    }

    fn programs() -> Vec<BpfProgram> {
        super::programs().unwrap()
    }

    /// A refused call under its x32 number is refused too, by the filter and not by a
    /// kernel that lacks x32 (which answers ENOSYS); native calls still work.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_numbers_are_refused() {
        const X32: i64 = 0x4000_0000;
        let x32 = |what: &str, nr: i64, args: &[u64; 6]| Call {
            what: what.to_owned(),
            nr: nr | X32,
            args: *args,
        };
        let calls = [
            // The x32 ABI's own numbers for these calls are the x86_64 ones.
            x32(
                "x32 unshare(CLONE_NEWUSER)",
                libc::SYS_unshare,
                &[0x1000_0000, 0, 0, 0, 0, 0],
            ),
            x32("x32 getpid", libc::SYS_getpid, &[0; 6]),
            x32("x32 bpf", libc::SYS_bpf, &[u64::MAX; 6]),
        ];
        let filtered = in_child(&programs(), &calls);
        assert_eq!(filtered, vec![Err(libc::EPERM); 3]);
        // Native numbers are [`filter`]'s business: getpid still works.
        let getpid = Call {
            what: "getpid".to_owned(),
            nr: libc::SYS_getpid,
            args: [0; 6],
        };
        let native = in_child(&programs(), &[getpid]);
        assert!(native[0].is_ok(), "{native:?}");
        // Without the x32 program, the kernel (x32 off) or the call itself answers:
        // never the filter's EPERM for getpid.
        let without = in_child(
            &[filter().unwrap(), unavailable_filter().unwrap()],
            &calls[1..2],
        );
        assert_ne!(without, vec![Err(libc::EPERM)], "getpid's x32 number");
    }

    #[test]
    fn every_denied_syscall_is_known_on_this_architecture() {
        let names = DENIED_SYSCALLS
            .iter()
            .map(|(name, why)| (*name, *why))
            .chain(DENIED_WITH_ARGUMENTS.iter().map(|(n, _, why)| (*n, *why)))
            .chain(UNAVAILABLE_SYSCALLS.iter().map(|(n, why)| (*n, *why)));
        for (name, why) in names {
            assert!(!why.is_empty());
            let known = syscall_number(name).is_some();
            let x86_only = matches!(name, "iopl" | "ioperm");
            assert!(
                known || (x86_only && cfg!(not(target_arch = "x86_64"))),
                "{name}"
            );
        }
    }

    #[test]
    fn the_filters_compile() {
        let program = filter().expect("filter");
        assert!(program.len() > DENIED_SYSCALLS.len() + DENIED_WITH_ARGUMENTS.len());
        assert!(!unavailable_filter().expect("clone3 filter").is_empty());
    }

    #[test]
    fn the_expected_bounding_set() {
        // CAP_CHOWN (0), CAP_DAC_OVERRIDE (1), CAP_FOWNER (3).
        assert_eq!(expected_bounding_mask(), 0b1011);
    }

    /// Every call on the deny-list answers EPERM under the filter. Arguments are all
    /// ones, so that each call fails harmlessly even unfiltered (bad pointers, fds,
    /// flags, magic numbers), except vhangup, which takes none and is left out.
    #[test]
    fn every_denied_syscall_answers_eperm() {
        let calls: Vec<Call> = DENIED_SYSCALLS
            .iter()
            .filter(|(name, _)| *name != "vhangup")
            .filter(|(name, _)| syscall_number(name).is_some())
            .map(|(name, _)| call(name, name, &[u64::MAX; 6]))
            .collect();
        let outcomes = in_child(&programs(), &calls);
        assert_eq!(outcomes.len(), calls.len());
        for (c, outcome) in calls.iter().zip(outcomes) {
            assert_eq!(outcome, Err(libc::EPERM), "{}", c.what);
        }
    }

    /// Whether each case is refused by the filter (and not by the kernel), or allowed.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Expect {
        /// The filter answers this errno; without it the kernel answers something
        /// else.
        Refused(i32),
        /// The filter lets it through: it succeeds.
        Allowed,
    }

    fn check(cases: &[(Call, Expect)]) {
        let calls: Vec<Call> = cases.iter().map(|(c, _)| c.clone()).collect();
        let filtered = in_child(&programs(), &calls);
        let unfiltered = in_child(&[], &calls);
        assert_eq!(filtered.len(), calls.len());
        assert_eq!(unfiltered.len(), calls.len());
        let mut wrong = Vec::new();
        for (((c, expect), with), without) in cases.iter().zip(filtered).zip(unfiltered) {
            let right = match expect {
                Expect::Refused(e) => with == Err(*e) && without != Err(*e),
                Expect::Allowed => with.is_ok() && without.is_ok(),
            };
            if !right {
                wrong.push(format!(
                    "{}: expected {expect:?}, filtered {with:?}, unfiltered {without:?}",
                    c.what
                ));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// clone with any namespace flag is refused, plain clone (fork) is not; clone3 is
    /// ENOSYS so libc falls back to clone.
    #[test]
    fn namespaces_are_refused_on_clone_and_clone3() {
        if !need_root("creating namespaces unfiltered") {
            return;
        }
        let sigchld = libc::SIGCHLD as u64;
        let mut cases: Vec<(Call, Expect)> = NAMESPACE_FLAGS
            .iter()
            .map(|(name, flag)| {
                (
                    call(name, "clone", &[u64::from(flag.unsigned_abs()) | sigchld]),
                    Expect::Refused(libc::EPERM),
                )
            })
            .collect();
        cases.push((
            call(
                "CLONE_NEWUSER|CLONE_NEWNS",
                "clone",
                &[(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) as u64 | sigchld],
            ),
            Expect::Refused(libc::EPERM),
        ));
        // (The kernel reads clone's flags from the low 32 bits of the register, as the
        // filter does.)
        cases.push((call("fork", "clone", &[sigchld]), Expect::Allowed));
        // clone3(NULL, 0): EINVAL from the kernel, ENOSYS from the filter.
        cases.push((
            call("clone3", "clone3", &[0, 0]),
            Expect::Refused(libc::ENOSYS),
        ));
        check(&cases);
    }

    /// The new mount API and io_uring, with arguments the kernel rejects for a reason
    /// of its own (or, for fsopen, a file system type that does not exist).
    #[test]
    fn the_new_mount_api_and_io_uring_are_refused() {
        if !need_root("the mount API unfiltered") {
            return;
        }
        let fs_name = CString::new("keel-no-such-fs").unwrap();
        let name = fs_name.as_ptr() as u64;
        let bad_fd = u64::MAX;
        let bad_flags = u64::from(u32::MAX);
        let cases = [
            (call("fsopen", "fsopen", &[name, 0]), libc::EPERM),
            (
                call("fsconfig", "fsconfig", &[bad_fd, 0, 0, 0, 0]),
                libc::EPERM,
            ),
            (call("fsmount", "fsmount", &[bad_fd, 0, 0]), libc::EPERM),
            (
                call("fspick", "fspick", &[bad_fd, 0, bad_flags]),
                libc::EPERM,
            ),
            (
                call(
                    "move_mount",
                    "move_mount",
                    &[bad_fd, 0, bad_fd, 0, bad_flags],
                ),
                libc::EPERM,
            ),
            (
                call("open_tree", "open_tree", &[bad_fd, 0, bad_flags]),
                libc::EPERM,
            ),
            (
                call(
                    "mount_setattr",
                    "mount_setattr",
                    &[bad_fd, 0, bad_flags, 0, 0],
                ),
                libc::EPERM,
            ),
            (
                call("io_uring_setup", "io_uring_setup", &[0, 0]),
                libc::EPERM,
            ),
            (
                call("io_uring_enter", "io_uring_enter", &[bad_fd, 0, 0, 0, 0, 0]),
                libc::EPERM,
            ),
            (
                call("io_uring_register", "io_uring_register", &[bad_fd, 0, 0, 0]),
                libc::EPERM,
            ),
            (
                call("pidfd_getfd", "pidfd_getfd", &[bad_fd, bad_fd, 0]),
                libc::EPERM,
            ),
            (
                call("pidfd_send_signal", "pidfd_send_signal", &[bad_fd, 0, 0, 0]),
                libc::EPERM,
            ),
            (
                call("process_madvise", "process_madvise", &[bad_fd, 0, 0, 0, 0]),
                libc::EPERM,
            ),
            (
                call("quotactl_fd", "quotactl_fd", &[bad_fd, 0, 0, 0]),
                libc::EPERM,
            ),
        ];
        let cases: Vec<(Call, Expect)> = cases
            .into_iter()
            .map(|(c, e)| (c, Expect::Refused(e)))
            .collect();
        check(&cases);
        drop(fs_name);
    }

    /// Signals to PID 1 and to every process are refused, signals to itself and its
    /// own group are not; limits, priorities and scheduling of other processes are
    /// refused, of itself are not.
    #[test]
    fn other_processes_are_out_of_reach_by_argument() {
        if !need_root("signalling PID 1 unfiltered") {
            return;
        }
        // SAFETY: getpid(2) has no preconditions.
        let me = u64::try_from(unsafe { libc::getpid() }).unwrap();
        let minus_one = u64::from(u32::MAX);
        // siginfo with si_code SI_QUEUE (-1), as rt_sigqueueinfo requires from user
        // space.
        let mut siginfo = vec![0u8; 128];
        siginfo[8..12].copy_from_slice(&(-1i32).to_ne_bytes());
        let info = siginfo.as_mut_ptr() as u64;
        let mut buffer = vec![0u8; 256];
        let buf = buffer.as_mut_ptr() as u64;
        // struct sched_attr, size 48 (SCHED_ATTR_SIZE_VER0), SCHED_OTHER, nice 0.
        let mut attr = vec![0u8; 64];
        attr[..4].copy_from_slice(&48u32.to_ne_bytes());
        let sched_attr = attr.as_mut_ptr() as u64;
        let nofile = libc::RLIMIT_NOFILE as u64;
        let be4 = (2u64 << 13) | 4; // IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 4)
        let refused = Expect::Refused(libc::EPERM);
        let cases = vec![
            (call("kill(1, 0)", "kill", &[1, 0]), refused),
            (call("kill(-1, 0)", "kill", &[minus_one, 0]), refused),
            (call("tkill(1, 0)", "tkill", &[1, 0]), refused),
            (call("tgkill(1, 1, 0)", "tgkill", &[1, 1, 0]), refused),
            (
                call("rt_sigqueueinfo(1, 0)", "rt_sigqueueinfo", &[1, 0, info]),
                refused,
            ),
            (
                call(
                    "rt_tgsigqueueinfo(1, 1, 0)",
                    "rt_tgsigqueueinfo",
                    &[1, 1, 0, info],
                ),
                refused,
            ),
            (call("kill(self, 0)", "kill", &[me, 0]), Expect::Allowed),
            (call("kill(own group, 0)", "kill", &[0, 0]), Expect::Allowed),
            (
                call("tgkill(self, self, 0)", "tgkill", &[me, me, 0]),
                Expect::Allowed,
            ),
            (
                call("prlimit64(other)", "prlimit64", &[NO_PID, nofile, 0, buf]),
                refused,
            ),
            (
                call("prlimit64(self)", "prlimit64", &[0, nofile, 0, buf]),
                Expect::Allowed,
            ),
            (
                call(
                    "setpriority(PRIO_PROCESS, other)",
                    "setpriority",
                    &[0, NO_PID, 0],
                ),
                refused,
            ),
            // which 3 is no PRIO_*: EINVAL from the kernel. (PRIO_USER 0 would be every
            // uid-0 process; the same condition refuses it.)
            (
                call("setpriority(which 3, 0)", "setpriority", &[3, 0, 0]),
                refused,
            ),
            (
                call("setpriority(PRIO_PROCESS, self)", "setpriority", &[0, 0, 0]),
                Expect::Allowed,
            ),
            (
                call(
                    "ioprio_set(PROCESS, other)",
                    "ioprio_set",
                    &[1, NO_PID, be4],
                ),
                refused,
            ),
            (
                call("ioprio_set(which 9, 0)", "ioprio_set", &[9, 0, be4]),
                refused,
            ),
            (
                call("ioprio_set(PROCESS, self)", "ioprio_set", &[1, 0, be4]),
                Expect::Allowed,
            ),
            (
                call(
                    "sched_setaffinity(other)",
                    "sched_setaffinity",
                    &[NO_PID, 8, buf],
                ),
                refused,
            ),
            (
                call(
                    "sched_setscheduler(other)",
                    "sched_setscheduler",
                    &[NO_PID, 0, buf],
                ),
                refused,
            ),
            (
                call("sched_setparam(other)", "sched_setparam", &[NO_PID, buf]),
                refused,
            ),
            (
                call(
                    "sched_setattr(other)",
                    "sched_setattr",
                    &[NO_PID, sched_attr, 0],
                ),
                refused,
            ),
            (
                call(
                    "migrate_pages(other)",
                    "migrate_pages",
                    &[NO_PID, 64, buf, buf],
                ),
                refused,
            ),
            (
                call(
                    "move_pages(other)",
                    "move_pages",
                    &[NO_PID, 0, 0, 0, buf, 0],
                ),
                refused,
            ),
        ];
        check(&cases);
        drop((siginfo, buffer, attr));
    }

    #[test]
    fn mount_points_below_a_path() {
        let mountinfo = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 23 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
25 23 0:24 / /sys/kernel/a\\040b rw - tmpfs tmpfs rw
26 27 0:25 / /sysroot rw - tmpfs tmpfs rw
27 22 0:26 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw
28 23 0:22 / /sys rw,relatime - sysfs sysfs rw
";
        assert_eq!(
            mounts_at_or_below(mountinfo, "/sys"),
            ["/sys", "/sys/fs/cgroup", "/sys/kernel/a b"]
        );
        assert_eq!(
            mounts_at_or_below(mountinfo, "/proc/sys"),
            ["/proc/sys/fs/binfmt_misc"]
        );
    }

    /// Writable here (the test runs in the host's namespaces as root): keeld would
    /// refuse to run.
    #[test]
    fn writable_tunables_are_refused() {
        let writable = std::fs::OpenOptions::new()
            .write(true)
            .open(MUST_BE_READ_ONLY[0])
            .is_ok();
        if !writable {
            println!(
                "SKIPPED: {} is read-only here already",
                MUST_BE_READ_ONLY[0]
            );
            return;
        }
        match check_tunables_read_only() {
            Err(SandboxError::TunablesWritable(path)) => {
                assert_eq!(path, MUST_BE_READ_ONLY[0]);
            }
            other => panic!("{other:?}"),
        }
    }

    /// With CAP_SYS_ADMIN, keeld's own mount namespace has the tunables read-only and
    /// the check passes there; the host's stay as they were.
    #[test]
    fn kernel_tunables_are_read_only_in_keelds_namespace_only() {
        if !need_root("mount namespaces") {
            return;
        }
        // SAFETY: the child runs the function under test, which allocates: glibc's
        // malloc is usable after fork. It leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match protect_kernel_tunables().and_then(|()| check_tunables_read_only()) {
                Ok(()) => {
                    let err = std::fs::OpenOptions::new()
                        .write(true)
                        .open(MUST_BE_READ_ONLY[0])
                        .err()
                        .and_then(|e| e.raw_os_error());
                    if err == Some(libc::EROFS) {
                        0
                    } else {
                        2
                    }
                }
                Err(_) => 1,
            };
            // SAFETY: leaves the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: setup or check failed, 2: not EROFS"
        );
        assert!(
            std::fs::OpenOptions::new()
                .write(true)
                .open(MUST_BE_READ_ONLY[0])
                .is_ok(),
            "the host's core_pattern must stay as it was"
        );
    }

    /// Under Landlock signal scoping, a process outside the domain cannot be signalled
    /// nor its /proc/<pid>/root opened; a child born inside it can be signalled.
    #[test]
    fn landlock_keeps_signals_inside_keelds_tree() {
        if landlock_abi() < LANDLOCK_SIGNAL_ABI {
            assert!(
                std::env::var_os("KEEL_REQUIRE_ALL_TESTS").is_none(),
                "cannot run: Landlock ABI {} < 6 (KEEL_REQUIRE_ALL_TESTS is set)",
                landlock_abi()
            );
            println!("SKIPPED: Landlock ABI {} < 6", landlock_abi());
            return;
        }
        let mut outsider = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let outsider_pid = libc::pid_t::try_from(outsider.id()).unwrap();
        let root_link = CString::new(format!("/proc/{outsider_pid}/root")).unwrap();
        // SAFETY: the child makes system calls only (scope_signals allocates nothing
        // but an error message on failure) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: (child) prctl, Landlock, kill, readlink, fork, waitpid, _exit.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if scope_signals().is_err() {
                    libc::_exit(1);
                }
                if libc::kill(outsider_pid, 0) == 0 || *libc::__errno_location() != libc::EPERM {
                    libc::_exit(2);
                }
                let mut buf = [0u8; 64];
                if libc::readlink(root_link.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) >= 0 {
                    libc::_exit(3);
                }
                let inner = libc::fork();
                if inner == 0 {
                    libc::pause();
                    libc::_exit(0);
                }
                let killed = libc::kill(inner, libc::SIGKILL) == 0;
                libc::waitpid(inner, std::ptr::null_mut(), 0);
                libc::_exit(if killed { 0 } else { 4 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let alive = outsider.try_wait().unwrap().is_none();
        let _ = outsider.kill();
        let _ = outsider.wait();
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: no domain, 2: outsider signalled, 3: outsider's root opened, 4: own child \
             not signalled"
        );
        assert!(alive);
    }
}
