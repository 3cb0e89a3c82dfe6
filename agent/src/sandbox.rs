//! keeld's own sandbox, installed at start-up before any thread or child exists, and
//! inherited by every child keeld starts (restart commands, bootstrap commands,
//! providers):
//!
//! 1. capabilities: the bounding, permitted, effective and inheritable sets shrink to
//!    [`KEPT_CAPABILITIES`]; the ambient set is cleared;
//! 2. `no_new_privs`: no exec can gain privileges (setuid binaries, file capabilities);
//! 3. a seccomp filter on all threads that answers `EPERM` to [`DENIED_SYSCALLS`],
//!    system calls keeld never makes. Anything else is allowed: keeld's own needs
//!    (files, sockets, processes) are broad, and an allow-list that misses one call in
//!    a rare path fails in production; the deny-list closes the doors an attacker who
//!    got code execution in keeld would use to take the kernel or other processes.
//!
//! `--no-sandbox` skips all of it, for debugging, and says so loudly in the log.

use std::collections::BTreeMap;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

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
];

/// Why the sandbox could not be installed; keeld refuses to start unsandboxed unless
/// told `--no-sandbox`.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("dropping capabilities: {0}")]
    Capabilities(String),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("building the seccomp filter: {0}")]
    Filter(String),
    #[error("installing the seccomp filter: {0}")]
    Install(String),
}

/// Installs all three layers. Call before starting threads or children.
pub fn install() -> Result<(), SandboxError> {
    drop_capabilities()?;
    set_no_new_privs()?;
    install_filter()
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

/// The filter program for this architecture.
pub fn filter() -> Result<BpfProgram, SandboxError> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Filter(format!("{e:?}")))?;
    let mut rules = BTreeMap::new();
    for (name, _) in DENIED_SYSCALLS {
        // A name this architecture lacks (e.g. iopl on aarch64) is simply not there to
        // call.
        if let Some(nr) = syscall_number(name) {
            rules.insert(nr, Vec::new());
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(u32::try_from(libc::EPERM).unwrap_or(1)),
        arch,
    )
    .map_err(|e| SandboxError::Filter(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))
}

fn install_filter() -> Result<(), SandboxError> {
    let program = filter()?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| SandboxError::Install(e.to_string()))
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
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "fanotify_init" => libc::SYS_fanotify_init,
        "keyctl" => libc::SYS_keyctl,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "userfaultfd" => libc::SYS_userfaultfd,
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
    use super::*;

    #[test]
    fn every_denied_syscall_is_known_on_this_architecture() {
        for (name, why) in DENIED_SYSCALLS {
            assert!(!why.is_empty());
            let known = syscall_number(name).is_some();
            let x86_only = matches!(*name, "iopl" | "ioperm");
            assert!(
                known || (x86_only && cfg!(not(target_arch = "x86_64"))),
                "{name}"
            );
        }
    }

    #[test]
    fn the_filter_compiles() {
        let program = filter().expect("filter");
        assert!(program.len() > DENIED_SYSCALLS.len());
    }

    #[test]
    fn the_expected_bounding_set() {
        // CAP_CHOWN (0), CAP_DAC_OVERRIDE (1), CAP_FOWNER (3).
        assert_eq!(expected_bounding_mask(), 0b1011);
    }
}
