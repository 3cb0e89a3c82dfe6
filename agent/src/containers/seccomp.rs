//! containerd 1.6's default seccomp profile, rendered as an OCI `linux.seccomp` object.
//!
//! Where the facts come from: the syscall names, the `personality` and `clone` argument rules,
//! the per-architecture additions and the capability-conditional additions are those of
//! containerd 1.6's `contrib/seccomp/seccomp_default.go`, checked against the profile that
//! containerd 1.6.20 (Debian 12's package) emits for `ctr containers create --seccomp`.
//! Only x86_64 and aarch64 hosts are described; on any other architecture the profile has no
//! `architectures` entry (native syscalls only) and no architecture-specific additions.
//!
//! One departure: `io_uring_setup`, `io_uring_enter` and `io_uring_register` are not
//! allowed, as in containerd 2.0's and Docker 25's default profiles. io_uring performs
//! reads, writes, opens and connects that this filter never sees, and has been a steady
//! source of kernel privilege escalations; an admin or control container has no use for it.
//!
//! Like containerd 1.6, the profile sets no `defaultErrnoRet`: runc answers a refused syscall
//! with EPERM by default, which is the same effect without a runtime-spec 1.1 field.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use oci_spec::OciSpecError;

/// errno returned for `clone3` when CAP_SYS_ADMIN is absent, so that the C library falls back
/// to `clone` (whose namespace flags the profile can inspect). Same value on x86_64 and aarch64.
const ENOSYS: u32 = 38;

/// `clone` flags that create namespaces: CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS |
/// CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET. Without CAP_SYS_ADMIN, `clone`
/// is allowed only when none of them is set.
const CLONE_NAMESPACE_FLAGS: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// Syscalls allowed without conditions, on every architecture.
pub const ALLOWED_SYSCALLS: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed values of `personality(2)`'s only argument: PER_LINUX, PER_LINUX32, UNAME26,
/// UNAME26 | PER_LINUX32, and 0xffffffff (query the current persona).
const ALLOWED_PERSONAS: [u64; 5] = [0x0, 0x0008, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// containerd adds `ptrace` when the kernel is 4.8 or newer (from 4.8 on, seccomp is re-checked
/// after a tracer changes a syscall, so `ptrace` cannot bypass the filter). Keel only supports
/// such kernels, so the rule is unconditional here.
const PTRACE_SINCE_LINUX_4_8: &[&str] = &["ptrace"];

/// Additions for x86_64 hosts (containerd's `amd64` case).
const X86_64_SYSCALLS: &[&str] = &["arch_prctl", "modify_ldt"];

/// Additions for aarch64 hosts (containerd's `arm`/`arm64` case; the 32-bit names matter for
/// AArch32 binaries, which the profile's SCMP_ARCH_ARM entry admits).
const AARCH64_SYSCALLS: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];

/// Syscalls allowed only when a capability is in the container's bounding set. One rule per
/// capability present, in the order the capabilities appear in the bounding set.
/// CAP_SYS_RESOURCE has no entry: containerd 1.6 adds nothing for it.
const CAPABILITY_SYSCALLS: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    ("CAP_SYS_NICE", &["get_mempolicy", "mbind", "set_mempolicy"]),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// Seccomp architectures of the host: the native one plus the compat ABIs the kernel accepts.
fn architectures() -> &'static [Arch] {
    if cfg!(target_arch = "x86_64") {
        &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        &[Arch::ScmpArchArm, Arch::ScmpArchAarch64]
    } else {
        &[]
    }
}

fn architecture_syscalls() -> &'static [&'static str] {
    if cfg!(target_arch = "x86_64") {
        X86_64_SYSCALLS
    } else if cfg!(target_arch = "aarch64") {
        AARCH64_SYSCALLS
    } else {
        &[]
    }
}

/// An unconditional allow rule.
fn allow(names: &[&str]) -> Result<LinuxSyscall, OciSpecError> {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActAllow)
        .build()
}

/// A condition on argument `index`.
fn arg(
    index: usize,
    value: u64,
    value_two: Option<u64>,
    op: LinuxSeccompOperator,
) -> Result<LinuxSeccompArg, OciSpecError> {
    let builder = LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .op(op);
    match value_two {
        Some(two) => builder.value_two(two).build(),
        None => builder.build(),
    }
}

/// The default profile for a container whose capability bounding set is `bounding_caps`
/// ("CAP_…" names, in order), plus one more allow rule for `extra_syscalls` when it is
/// not empty (Keel's bootstrap tier passes `swapon` and `swapoff`).
pub fn default_profile(
    bounding_caps: &[&str],
    extra_syscalls: &[&str],
) -> Result<LinuxSeccomp, OciSpecError> {
    let mut rules = vec![allow(ALLOWED_SYSCALLS)?];
    for persona in ALLOWED_PERSONAS {
        rules.push(
            LinuxSyscallBuilder::default()
                .names(vec!["personality".to_owned()])
                .action(LinuxSeccompAction::ScmpActAllow)
                .args(vec![arg(
                    0,
                    persona,
                    None,
                    LinuxSeccompOperator::ScmpCmpEq,
                )?])
                .build()?,
        );
    }
    rules.push(allow(PTRACE_SINCE_LINUX_4_8)?);
    let arch_names = architecture_syscalls();
    if !arch_names.is_empty() {
        rules.push(allow(arch_names)?);
    }

    let mut seen: Vec<&str> = Vec::new();
    for cap in bounding_caps {
        if seen.contains(cap) {
            continue;
        }
        seen.push(cap);
        if let Some((_, names)) = CAPABILITY_SYSCALLS.iter().find(|(c, _)| c == cap) {
            rules.push(allow(names)?);
        }
    }

    if !seen.contains(&"CAP_SYS_ADMIN") {
        // Plain fork/thread creation stays possible; new namespaces do not.
        rules.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone".to_owned()])
                .action(LinuxSeccompAction::ScmpActAllow)
                .args(vec![arg(
                    0,
                    CLONE_NAMESPACE_FLAGS,
                    Some(0),
                    LinuxSeccompOperator::ScmpCmpMaskedEq,
                )?])
                .build()?,
        );
        // clone3 passes its flags in memory, which seccomp cannot inspect: make it look
        // unimplemented so callers fall back to clone.
        rules.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone3".to_owned()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(ENOSYS)
                .build()?,
        );
    }

    if !extra_syscalls.is_empty() {
        rules.push(allow(extra_syscalls)?);
    }

    // Deliberately no `defaultErrnoRet`, as containerd 1.6 (see the module header).
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .architectures(architectures().to_vec())
        .syscalls(rules)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const ALLOW: &str = "SCMP_ACT_ALLOW";
    const ERRNO: &str = "SCMP_ACT_ERRNO";

    /// The typed profile as the OCI spec's JSON writes it.
    fn profile(caps: &[&str], extra: &[&str]) -> Value {
        let typed = default_profile(caps, extra).expect("the profile builds");
        serde_json::to_value(typed).expect("the profile serializes")
    }

    use crate::containers::spec::DEFAULT_CAPABILITIES as DEFAULT_14;

    fn rules(profile: &Value) -> &Vec<Value> {
        profile["syscalls"]
            .as_array()
            .expect("syscalls is an array")
    }

    fn names(rule: &Value) -> Vec<&str> {
        rule["names"]
            .as_array()
            .expect("names is an array")
            .iter()
            .map(|n| n.as_str().expect("names are strings"))
            .collect()
    }

    /// Whether a rule allows `name` whatever its arguments.
    fn allowed_unconditionally(profile: &Value, name: &str) -> bool {
        rules(profile)
            .iter()
            .any(|r| r["action"] == ALLOW && r.get("args").is_none() && names(r).contains(&name))
    }

    fn mentioned(profile: &Value, name: &str) -> bool {
        rules(profile).iter().any(|r| names(r).contains(&name))
    }

    #[test]
    fn allow_list_names_are_unique_and_well_formed() {
        let mut sorted: Vec<&str> = ALLOWED_SYSCALLS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            ALLOWED_SYSCALLS.len(),
            "duplicate syscall name"
        );
        // containerd 1.6's 349 without the three io_uring calls.
        assert_eq!(ALLOWED_SYSCALLS.len(), 346);
        for name in ALLOWED_SYSCALLS {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "odd syscall name {name:?}"
            );
        }
        for (cap, names) in CAPABILITY_SYSCALLS {
            for name in *names {
                assert!(
                    !ALLOWED_SYSCALLS.contains(name),
                    "{name} of {cap} is already allowed"
                );
            }
        }
        let mut cap_names: Vec<&str> = CAPABILITY_SYSCALLS.iter().map(|(c, _)| *c).collect();
        cap_names.sort_unstable();
        cap_names.dedup();
        assert_eq!(cap_names.len(), CAPABILITY_SYSCALLS.len());
    }

    #[test]
    fn dangerous_syscalls_are_not_allowed_by_default() {
        let profile = profile(&DEFAULT_14, &[]);
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "init_module",
            "finit_module",
            "reboot",
            "kexec_load",
            "bpf",
            "swapon",
            "swapoff",
            "open_by_handle_at",
            "acct",
            "iopl",
            "settimeofday",
            "keyctl",
            "add_key",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ] {
            assert!(
                !allowed_unconditionally(&profile, name),
                "{name} is allowed"
            );
        }
        // Default capabilities include CAP_SYS_CHROOT.
        assert!(allowed_unconditionally(&profile, "chroot"));
        assert!(allowed_unconditionally(&profile, "ptrace"));
        assert!(allowed_unconditionally(&profile, "read"));
    }

    #[test]
    fn sys_admin_controls_mount_and_clone() {
        let without = profile(&DEFAULT_14, &[]);
        assert!(!mentioned(&without, "mount"));
        let clone: Vec<&Value> = rules(&without)
            .iter()
            .filter(|r| names(r).contains(&"clone"))
            .collect();
        assert_eq!(clone.len(), 1);
        assert_eq!(clone[0]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone[0]["args"][0]["value"], 0x7E02_0000_u64);
        assert_eq!(clone[0]["args"][0]["valueTwo"], 0);
        let clone3 = rules(&without)
            .iter()
            .find(|r| names(r) == ["clone3"])
            .expect("clone3 rule");
        assert_eq!(clone3["action"], ERRNO);
        assert_eq!(clone3["errnoRet"], 38);

        let mut with = DEFAULT_14.to_vec();
        with.push("CAP_SYS_ADMIN");
        let with = profile(&with, &[]);
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "clone",
            "clone3",
            "sethostname",
        ] {
            assert!(allowed_unconditionally(&with, name), "{name} not allowed");
        }
        assert!(!rules(&with).iter().any(|r| r["action"] == ERRNO));
    }

    #[test]
    fn capability_additions() {
        let cases: [(&str, &[&str]); 10] = [
            (
                "CAP_SYS_MODULE",
                &["init_module", "finit_module", "delete_module"],
            ),
            ("CAP_SYS_BOOT", &["reboot"]),
            ("CAP_SYS_PTRACE", &["process_vm_readv", "kcmp"]),
            ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
            ("CAP_SYS_TIME", &["settimeofday", "clock_settime"]),
            ("CAP_SYS_PACCT", &["acct"]),
            ("CAP_SYS_NICE", &["mbind", "set_mempolicy"]),
            ("CAP_SYSLOG", &["syslog"]),
            ("CAP_BPF", &["bpf"]),
            ("CAP_PERFMON", &["perf_event_open"]),
        ];
        for (cap, syscalls) in cases {
            let without = profile(&DEFAULT_14, &[]);
            let with = profile(&[cap], &[]);
            for name in syscalls {
                assert!(
                    !allowed_unconditionally(&without, name),
                    "{name} without {cap}"
                );
                assert!(allowed_unconditionally(&with, name), "{name} with {cap}");
            }
        }
        // A repeated capability adds its rule once.
        let twice = profile(&["CAP_SYS_BOOT", "CAP_SYS_BOOT"], &[]);
        assert_eq!(
            rules(&twice)
                .iter()
                .filter(|r| names(r) == ["reboot"])
                .count(),
            1
        );
    }

    #[test]
    fn extra_syscalls_only_when_requested() {
        let plain = profile(&DEFAULT_14, &[]);
        assert!(!mentioned(&plain, "swapon"));
        assert!(!mentioned(&plain, "swapoff"));
        let boot = profile(&DEFAULT_14, &["swapon", "swapoff"]);
        let last = rules(&boot).last().expect("a rule");
        assert_eq!(names(last), ["swapon", "swapoff"]);
        assert_eq!(last["action"], ALLOW);
        assert_eq!(rules(&boot).len(), rules(&plain).len() + 1);
    }

    #[test]
    fn personality_rules() {
        let profile = profile(&[], &[]);
        let values: Vec<u64> = rules(&profile)
            .iter()
            .filter(|r| names(r) == ["personality"])
            .map(|r| {
                assert_eq!(r["args"][0]["index"], 0);
                assert_eq!(r["args"][0]["op"], "SCMP_CMP_EQ");
                r["args"][0]["value"].as_u64().expect("value is a number")
            })
            .collect();
        assert_eq!(values, [0, 8, 0x20000, 0x20008, 0xffff_ffff]);
        assert!(!allowed_unconditionally(&profile, "personality"));
    }

    #[test]
    fn json_shape_uses_oci_field_names() {
        let profile = profile(&DEFAULT_14, &["swapon"]);
        let top: Vec<&str> = profile
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(top, ["defaultAction", "architectures", "syscalls"]);
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        let arches = profile["architectures"].as_array().expect("array");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(arches[0], "SCMP_ARCH_X86_64");
            assert!(allowed_unconditionally(&profile, "arch_prctl"));
        } else if cfg!(target_arch = "aarch64") {
            assert_eq!(arches[1], "SCMP_ARCH_AARCH64");
            assert!(allowed_unconditionally(&profile, "set_tls"));
        }
        for rule in rules(&profile) {
            for key in rule.as_object().expect("rule is an object").keys() {
                assert!(
                    ["names", "action", "args", "errnoRet"].contains(&key.as_str()),
                    "unexpected rule field {key}"
                );
            }
            assert!(!names(rule).is_empty());
            assert!(rule["action"] == ALLOW || rule["action"] == ERRNO);
            if let Some(args) = rule.get("args") {
                for arg in args.as_array().expect("args is an array") {
                    for key in arg.as_object().expect("arg is an object").keys() {
                        assert!(["index", "value", "valueTwo", "op"].contains(&key.as_str()));
                    }
                }
            }
        }
    }
}
