//! A restart command for `tests/tests/sandbox.rs`: run by keeld, it tries each known way
//! out of keeld's sandbox and records, per attempt, whether it got through.
//!
//! `keel-escape-probe <attack|control> <out-dir> <victim-pid>`
//!
//! It does nothing until `<out-dir>/armed` exists (keeld's boot runs it once too).
//!
//! - `<victim-pid>` is a uid-0 process the test started, outside keeld's process tree,
//!   holding no capabilities (so plain capability checks do not protect it).
//! - `attack` writes a pipe helper (`<out-dir>/core-helper`) into `core_pattern` when it
//!   can, then crashes a process so the kernel would run the helper as full root. The
//!   test saves and restores `core_pattern` around it.
//! - `control` (for `--no-sandbox`) only opens `core_pattern` for writing, and changes
//!   nothing on the machine: it proves every attempt can succeed, so the sandboxed run's
//!   failures are the sandbox's doing.
//!
//! Attempts that could change the host run in a child in a new user and mount namespace
//! of their own (the mounts) or are no-ops (limits and priorities set to their current
//! values, signal 0), except the final `kill(victim, SIGKILL)`.
//!
//! Results go to `<out-dir>/escapes.json`: `{"<attempt>": {"ok": bool, "errno": n,
//! "detail": "..."}}`, plus `<out-dir>/probe.status` (the probe's own status lines).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";
const FSOPEN_CLOEXEC: libc::c_ulong = 1;
const FSCONFIG_SET_STRING: libc::c_ulong = 1;
const FSCONFIG_CMD_CREATE: libc::c_ulong = 6;
const FSMOUNT_CLOEXEC: libc::c_ulong = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_ulong = 4;
const OPEN_TREE_CLONE: libc::c_ulong = 1;
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL")
}

/// One attempt's outcome.
fn outcome(ok: bool, errno: i32, detail: impl Into<String>) -> Value {
    json!({ "ok": ok, "errno": errno, "detail": detail.into() })
}

/// A raw system call's result: `Ok(return value)` or `Err(errno)`.
fn sys(rc: libc::c_long) -> Result<libc::c_long, i32> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

fn close(fd: libc::c_long) {
    if let Ok(fd) = i32::try_from(fd) {
        // SAFETY: closes a descriptor this program opened and no longer uses.
        unsafe { libc::close(fd) };
    }
}

/// fsopen("tmpfs") → fsconfig(CREATE) → fsmount: a detached tmpfs mount, as a file
/// descriptor. The error names the step that failed.
fn new_tmpfs_mount() -> Result<libc::c_long, (i32, &'static str)> {
    let tmpfs = cstr("tmpfs");
    // SAFETY: fsopen(2) with a NUL-terminated name.
    let fs = sys(unsafe { libc::syscall(libc::SYS_fsopen, tmpfs.as_ptr(), FSOPEN_CLOEXEC) })
        .map_err(|e| (e, "fsopen"))?;
    let key = cstr("size");
    let value = cstr("1m");
    // SAFETY: fsconfig(2) on the context just opened, NUL-terminated key and value.
    let set = sys(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    });
    let created = set.and_then(|_| {
        // SAFETY: fsconfig(2) create command, no pointers.
        sys(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs,
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
                0,
            )
        })
    });
    if let Err(e) = created {
        close(fs);
        return Err((e, "fsconfig"));
    }
    // SAFETY: fsmount(2) of the created context, no pointers.
    let mount = sys(unsafe { libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, 0) });
    close(fs);
    mount.map_err(|e| (e, "fsmount"))
}

/// In a child made with `clone(CLONE_NEWUSER | CLONE_NEWNS)`: the whole new-mount-API
/// chain, ending with `move_mount` of a tmpfs onto `target` (in the child's own mount
/// namespace, so the host never sees it). Exit 0 when `target` is then a tmpfs.
fn mount_tmpfs_in_child(target: &Path) -> i32 {
    let mount = match new_tmpfs_mount() {
        Ok(fd) => fd,
        Err((_, "fsopen")) => return 11,
        Err((_, "fsconfig")) => return 12,
        Err(_) => return 13,
    };
    let empty = cstr("");
    let target_c = cpath(target);
    // SAFETY: move_mount(2) of the mount fd onto a NUL-terminated path.
    let moved = sys(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount,
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    });
    if moved.is_err() {
        return 14;
    }
    // SAFETY: statfs(2) into a zeroed struct on the stack.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the path is NUL-terminated.
    if unsafe { libc::statfs(target_c.as_ptr(), &mut st) } != 0 {
        return 15;
    }
    if st.f_type == TMPFS_MAGIC {
        0
    } else {
        16
    }
}

/// Waits for `pid` and answers its exit code (or 128 + signal).
fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid(2) on this program's own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

fn child_step(code: i32) -> String {
    match code {
        0 => "tmpfs mounted".to_owned(),
        11 => "fsopen refused".to_owned(),
        12 => "fsconfig refused".to_owned(),
        13 => "fsmount refused".to_owned(),
        14 => "move_mount refused".to_owned(),
        15 => "statfs failed".to_owned(),
        16 => "not a tmpfs".to_owned(),
        other => format!("child exited {other}"),
    }
}

/// `clone(CLONE_NEWUSER | CLONE_NEWNS)`, and in the child the new mount API onto
/// `target`. Two results: the clone, and the mount inside it.
fn clone_namespaces_and_mount(target: &Path) -> (Value, Value) {
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::SIGCHLD;
    // SAFETY: clone(2) without CLONE_VM and without a stack behaves like fork(2); this
    // program is single-threaded, and the child only makes system calls and exits.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
    if rc == 0 {
        let code = mount_tmpfs_in_child(target);
        // SAFETY: leaves the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    match sys(rc) {
        Err(e) => (
            outcome(false, e, "clone(CLONE_NEWUSER|CLONE_NEWNS) refused"),
            outcome(false, 0, "no new user namespace to mount in"),
        ),
        Ok(pid) => {
            let code = wait_child(pid_t(pid));
            (
                outcome(true, 0, "clone(CLONE_NEWUSER|CLONE_NEWNS) made a child"),
                outcome(code == 0, 0, child_step(code)),
            )
        }
    }
}

fn pid_t(v: libc::c_long) -> libc::pid_t {
    libc::pid_t::try_from(v).unwrap_or(-1)
}

/// `clone3` with `CLONE_NEWUSER | CLONE_NEWNS` (its flags sit in memory, where a
/// seccomp filter cannot look).
fn clone3_namespaces() -> Value {
    // struct clone_args, CLONE_ARGS_SIZE_VER0: flags, pidfd, child_tid, parent_tid,
    // exit_signal, stack, stack_size, tls.
    let mut args = [0u64; 8];
    args[0] = (libc::CLONE_NEWUSER | libc::CLONE_NEWNS) as u64;
    args[4] = libc::SIGCHLD as u64;
    // SAFETY: clone3(2) with a valid clone_args of the size passed, no CLONE_VM: the
    // child returns 0 and exits at once.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args.as_mut_ptr(),
            std::mem::size_of_val(&args),
        )
    };
    if rc == 0 {
        // SAFETY: the child leaves at once.
        unsafe { libc::_exit(0) };
    }
    match sys(rc) {
        Ok(pid) => {
            wait_child(pid_t(pid));
            outcome(true, 0, "clone3 made a child in new namespaces")
        }
        Err(e) => outcome(false, e, "clone3 refused"),
    }
}

/// unshare(CLONE_NEWUSER) under its x32 number (x86_64 only): a filter keyed by x86_64
/// numbers would let it through on a kernel with x32 on. Where x32 is off, the kernel
/// itself answers ENOSYS.
fn x32_unshare() -> Value {
    if !cfg!(target_arch = "x86_64") {
        return outcome(false, libc::ENOSYS, "no x32 ABI on this architecture");
    }
    const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;
    unshare_newuser_as(libc::SYS_unshare | X32_SYSCALL_BIT, "x32 unshare")
}

/// `unshare(CLONE_NEWUSER)`, in a forked child so the probe itself stays where it is.
fn unshare_user_namespace() -> Value {
    unshare_newuser_as(libc::SYS_unshare, "unshare")
}

/// `unshare(CLONE_NEWUSER)` made as system call number `nr`, in a forked child.
fn unshare_newuser_as(nr: libc::c_long, what: &str) -> Value {
    // SAFETY: plain fork-like clone, as above.
    let rc = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
    if rc == 0 {
        // SAFETY: unshare(2) takes flags only; a raw call by number.
        let rc = unsafe { libc::syscall(nr, libc::c_long::from(libc::CLONE_NEWUSER)) };
        let code = if rc == 0 { 0 } else { errno() };
        // SAFETY: leaves the child.
        unsafe { libc::_exit(code) };
    }
    match sys(rc) {
        Ok(pid) => match wait_child(pid_t(pid)) {
            0 => outcome(true, 0, format!("{what}(CLONE_NEWUSER) worked")),
            e => outcome(false, e, format!("{what} refused")),
        },
        Err(e) => outcome(false, e, "could not fork"),
    }
}

/// The new mount API in the probe's own namespaces: a detached tmpfs mount (never
/// attached anywhere).
fn mount_api_here() -> Value {
    match new_tmpfs_mount() {
        Ok(fd) => {
            close(fd);
            outcome(true, 0, "fsopen/fsconfig/fsmount made a tmpfs mount")
        }
        Err((e, step)) => outcome(false, e, format!("{step} refused")),
    }
}

/// `open_tree(OPEN_TREE_CLONE)` of `/`: a detached copy of the mount tree.
fn open_tree_clone() -> Value {
    let root = cstr("/");
    // SAFETY: open_tree(2) with a NUL-terminated path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            root.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_ulong,
        )
    };
    match sys(rc) {
        Ok(fd) => {
            close(fd);
            outcome(true, 0, "open_tree cloned /")
        }
        Err(e) => outcome(false, e, "open_tree refused"),
    }
}

fn io_uring_setup() -> Value {
    // struct io_uring_params is 120 bytes; all zero asks for defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) with a zeroed params struct of the right size.
    let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    match sys(rc) {
        Ok(fd) => {
            close(fd);
            outcome(true, 0, "io_uring_setup made a ring")
        }
        Err(e) => outcome(false, e, "io_uring_setup refused"),
    }
}

/// Opens `path` for writing; in `attack` mode writes `pattern` through it.
fn write_core_pattern(path: &str, pattern: Option<&str>) -> Value {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Err(e) => outcome(
            false,
            e.raw_os_error().unwrap_or(0),
            format!("open {path} for writing: {e}"),
        ),
        Ok(mut file) => match pattern {
            None => outcome(true, 0, format!("{path} opened for writing")),
            Some(p) => match file.write_all(p.as_bytes()) {
                Ok(()) => outcome(true, 0, format!("wrote {p:?} to {path}")),
                Err(e) => outcome(
                    false,
                    e.raw_os_error().unwrap_or(0),
                    format!("write {path}: {e}"),
                ),
            },
        },
    }
}

/// Crashes a child (SIGABRT) so the kernel runs the core_pattern helper, and waits for
/// the helper's mark.
fn crash_and_wait_for_helper(dir: &Path) -> Value {
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => return outcome(false, 0, format!("current_exe: {e}")),
    };
    let crashed = std::process::Command::new(me)
        .arg("crash")
        .current_dir(dir)
        .status();
    let mark = dir.join("core-helper.ran");
    for _ in 0..50 {
        if let Ok(text) = std::fs::read_to_string(&mark) {
            return outcome(true, 0, format!("the helper ran: {}", text.trim()));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    outcome(
        false,
        0,
        format!("crashed ({crashed:?}); the helper did not run"),
    )
}

fn signal_result(rc: libc::c_long, what: &str) -> Value {
    match sys(rc) {
        Ok(_) => outcome(true, 0, format!("{what} delivered")),
        Err(e) => outcome(false, e, format!("{what} refused")),
    }
}

/// Makes PID 1 the SIGIO owner of a socket (`fcntl` F_SETOWN, then `ioctl` FIOSETOWN,
/// which sockets take): the first step of signalling it through the socket. Nothing is
/// written and O_ASYNC is not set, so no signal is sent even when a call gets through.
fn sigio_owner_pid_1() -> Value {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair(2) into a two-element array.
    let paired = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    if let Err(e) = sys(libc::c_long::from(paired)) {
        return outcome(false, e, "socketpair failed");
    }
    // SAFETY: fcntl(2) F_SETOWN on our own socket.
    let by_fcntl = sys(libc::c_long::from(unsafe {
        libc::fcntl(fds[0], libc::F_SETOWN, 1)
    }));
    let one: libc::c_int = 1;
    // SAFETY: ioctl(2) FIOSETOWN on our own socket, reading one int.
    let by_ioctl = sys(libc::c_long::from(unsafe {
        libc::ioctl(fds[1], 0x8901, &one)
    }));
    for fd in fds {
        close(libc::c_long::from(fd));
    }
    // Refused only when both are refused alike; through only when both got through.
    match (by_fcntl, by_ioctl) {
        (Ok(_), Ok(_)) => outcome(true, 0, "PID 1 made a socket's SIGIO owner (fcntl and ioctl)"),
        (Err(a), Err(b)) if a == b => outcome(false, a, "making PID 1 a SIGIO owner refused"),
        (fcntl, ioctl) => outcome(
            false,
            0,
            format!("fcntl F_SETOWN: {fcntl:?}, ioctl FIOSETOWN: {ioctl:?} (one got through, or they failed differently)"),
        ),
    }
}

fn pidfd_signal(victim: libc::pid_t) -> Value {
    // SAFETY: pidfd_open(2) takes a pid and flags.
    let fd = match sys(unsafe { libc::syscall(libc::SYS_pidfd_open, victim, 0) }) {
        Ok(fd) => fd,
        Err(e) => return outcome(false, e, "pidfd_open refused"),
    };
    // SAFETY: pidfd_send_signal(2), signal 0 (permission check only), no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            0,
            std::ptr::null::<u8>(),
            0,
        )
    };
    close(fd);
    signal_result(rc, "pidfd_send_signal(victim, 0)")
}

/// Sets the victim's open-file limit to what it is (a no-op when allowed).
fn prlimit_victim(victim: libc::pid_t) -> Value {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64(2) reading into a valid struct.
    let got = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            victim,
            libc::RLIMIT_NOFILE,
            std::ptr::null::<libc::rlimit64>(),
            &mut old as *mut libc::rlimit64,
        )
    };
    if let Err(e) = sys(got) {
        return outcome(false, e, "prlimit64(victim) read refused");
    }
    // SAFETY: prlimit64(2) writing the same values back.
    let set = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            victim,
            libc::RLIMIT_NOFILE,
            &old as *const libc::rlimit64,
            std::ptr::null_mut::<libc::rlimit64>(),
        )
    };
    match sys(set) {
        Ok(_) => outcome(true, 0, "prlimit64 set the victim's limit"),
        Err(e) => outcome(false, e, "prlimit64(victim) refused"),
    }
}

/// Sets the victim's nice value to 0, what the test started it with.
fn setpriority_victim(victim: libc::pid_t) -> Value {
    // SAFETY: setpriority(2) takes integers only.
    let rc = unsafe { libc::syscall(libc::SYS_setpriority, libc::PRIO_PROCESS, victim, 0) };
    match sys(rc) {
        Ok(_) => outcome(true, 0, "setpriority reached the victim"),
        Err(e) => outcome(false, e, "setpriority(victim) refused"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("crash") {
        // No core file on disk whatever happens; a pipe helper still runs.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit(2) from a valid struct, then abort(3).
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::abort();
        }
    }
    let (Some(mode), Some(dir), Some(victim)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: keel-escape-probe <attack|control> <out-dir> <victim-pid>");
        std::process::exit(2);
    };
    let attack = mode == "attack";
    let dir = PathBuf::from(dir);
    // keeld's boot runs every restart command once; the test arms the probe after it.
    if !dir.join("armed").exists() {
        return;
    }
    let victim: libc::pid_t = victim.parse().expect("victim pid");
    let mut results = Map::new();

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let lines: Vec<&str> = status
        .lines()
        .filter(|l| {
            ["Seccomp:", "NoNewPrivs:", "CapBnd:", "CapEff:", "CapPrm:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    let _ = std::fs::write(dir.join("probe.status"), lines.join("\n") + "\n");

    // 1. core_pattern, directly and through a foreign process's root.
    let helper = dir.join("core-helper");
    let pattern = format!("|{} %p", helper.display());
    let pattern = attack.then_some(pattern.as_str());
    let direct = write_core_pattern(CORE_PATTERN, pattern);
    let via_root = format!("/proc/{victim}/root{CORE_PATTERN}");
    let detour = write_core_pattern(&via_root, pattern);
    let written = attack && (direct["ok"] == true || detour["ok"] == true);
    results.insert("core_pattern".into(), direct);
    results.insert("core_pattern_via_proc_pid_root".into(), detour);
    if written {
        results.insert("core_helper_ran".into(), crash_and_wait_for_helper(&dir));
    }

    // 2. Namespaces: clone with CLONE_NEW* flags, clone3, unshare.
    let target = dir.join("mnt");
    let _ = std::fs::create_dir_all(&target);
    let (cloned, mounted) = clone_namespaces_and_mount(&target);
    results.insert("clone_newuser_newns".into(), cloned);
    results.insert("mount_api_in_new_namespaces".into(), mounted);
    results.insert("clone3_newuser_newns".into(), clone3_namespaces());
    results.insert("unshare_newuser".into(), unshare_user_namespace());
    results.insert("x32_unshare_newuser".into(), x32_unshare());

    // 3. The new mount API where the probe is.
    results.insert("mount_api".into(), mount_api_here());
    results.insert("open_tree_clone".into(), open_tree_clone());

    // 4. io_uring.
    results.insert("io_uring_setup".into(), io_uring_setup());

    // 5. Other processes: PID 1, and the unrelated victim (killed last).
    // SAFETY: kill(2) with signal 0 only checks permission.
    let rc = libc::c_long::from(unsafe { libc::kill(1, 0) });
    results.insert("kill_pid_1".into(), signal_result(rc, "kill(1, 0)"));
    results.insert("sigio_owner_pid_1".into(), sigio_owner_pid_1());
    results.insert("pidfd_send_signal_victim".into(), pidfd_signal(victim));
    results.insert("prlimit_victim".into(), prlimit_victim(victim));
    results.insert("setpriority_victim".into(), setpriority_victim(victim));
    // SAFETY: kill(2) of the test's victim.
    let rc = libc::c_long::from(unsafe { libc::kill(victim, libc::SIGKILL) });
    results.insert(
        "kill_victim".into(),
        signal_result(rc, "kill(victim, SIGKILL)"),
    );

    let text = serde_json::to_string_pretty(&Value::Object(results)).expect("json");
    std::fs::write(dir.join("escapes.json"), text).expect("escapes.json");
}
