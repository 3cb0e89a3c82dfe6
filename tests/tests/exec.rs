//! `apiclient exec` end to end: the real keeld (sandboxed, on a read-only root) and the
//! real apiclient against a private containerd + runc, in host containers built from
//! busybox-static; the protocol spoken frame by frame where the CLI would not send what
//! is tested (Bottlerocket's client, bad input).
//!
//! Needs root, containerd, runc and busybox-static (CI installs them; a missing tool
//! fails the test).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiclient::exec::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use apiclient::exec::tungstenite::Message;
use apiclient::exec::{ClientMessage, Initialize, ServerMessage, Size, TtyInit};
use futures_util::{SinkExt, StreamExt};
use keel_e2e::containerd::Containerd;
use keel_e2e::image::ImageBuilder;
use keel_e2e::{bin, Keeld, KeeldOptions};
use serde_json::json;

fn require_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "these tests run containers and need root"
    );
}

/// keeld (sandboxed, read-only root) booted from user-data with host containers `c`
/// (busybox, sleeping; `GREETING` in its environment), `su` (the same, superpowered)
/// and `broken` (an image that does not exist), and a bootstrap container `setup`.
struct Node {
    keeld: Keeld,
    containerd: Containerd,
    _work: tempfile::TempDir,
    /// Dropped last: the next test starts once this one's containers are gone.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// One node at a time: the tests count processes and measure exec latency, which a
/// second node's containers would disturb. (Containers of the same name under two
/// keelds no longer share a cgroup: each containerd namespace has its own tree.)
static SERIAL: Mutex<()> = Mutex::new(());

impl Node {
    fn boot() -> Node {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let containerd = Containerd::start();
        let work = tempfile::tempdir().expect("tempdir");
        let archive = work.path().join("sleeper.tar");
        ImageBuilder::busybox()
            .cmd(&["/bin/sh", "-c", "exec sleep 100000"])
            .write_oci_archive(&archive, "v1");
        let setup = work.path().join("setup.tar");
        ImageBuilder::busybox()
            .cmd(&["/bin/true"])
            .write_oci_archive(&setup, "v1");
        let user_data = format!(
            r#"
[settings.host-containers.c]
enabled = true
source = "oci-archive:{archive}"
environment = {{ GREETING = "hello from c" }}

[settings.host-containers.su]
enabled = true
superpowered = true
source = "oci-archive:{archive}"

[settings.host-containers.broken]
enabled = true
source = "oci-archive:{missing}"

[settings.bootstrap-containers.setup]
source = "oci-archive:{setup}"
mode = "once"
"#,
            archive = archive.display(),
            setup = setup.display(),
            missing = work.path().join("missing.tar").display(),
        );
        let user_data_file = work.path().join("user-data.toml");
        std::fs::write(&user_data_file, user_data).expect("user-data");
        let keeld = Keeld::start_with(KeeldOptions {
            containerd: Some((
                containerd.socket().to_path_buf(),
                containerd.namespace().to_owned(),
            )),
            read_only_root: true,
            extra_args: vec![
                "--user-data-file".into(),
                user_data_file.display().to_string(),
                "--user-data-defaults".into(),
                work.path().join("absent.toml").display().to_string(),
                "--user-data-overrides".into(),
                work.path().join("absent.toml").display().to_string(),
                "--os-defaults".into(),
                work.path().join("absent.toml").display().to_string(),
                "--restart-backoff".into(),
                "1m".into(),
            ],
            ..KeeldOptions::default()
        });
        let node = Node {
            keeld,
            containerd,
            _work: work,
            _serial: serial,
        };
        node.wait_running("c");
        node.wait_running("su");
        node
    }

    fn wait_running(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = self.keeld.raw("GET", "/containers?kind=host", None);
            let all = r.json();
            let running = all.as_array().is_some_and(|all| {
                all.iter()
                    .any(|s| s["name"] == name && s["state"] == "running")
            });
            if running {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not running: {all:#}\nkeeld log:\n{}",
                self.keeld.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec"];
        all.extend_from_slice(args);
        self.keeld.apiclient(&all)
    }

    fn exec_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self.exec_command(args);
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("apiclient");
        feeder.join().expect("feeder");
        out
    }

    /// `apiclient exec <args>` with piped stdin, stdout and stderr.
    fn exec_command(&self, args: &[&str]) -> Child {
        Command::new(bin("apiclient"))
            .arg("--socket-path")
            .arg(&self.keeld.socket)
            .arg("exec")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("apiclient")
    }

    /// The processes of host container `name`'s task, as `ctr task ps` lists them.
    fn task_processes(&self, name: &str) -> Vec<String> {
        self.containerd
            .ctr_ok(&["task", "ps", &format!("host-{name}")])
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// What is left of exec sessions in keeld's runtime directory.
    fn exec_leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.keeld.runtime_dir().join("exec"))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Waits until `c` runs its own process alone and no FIFO is left.
    fn assert_no_exec_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (processes, fifos) = (self.task_processes("c"), self.exec_leftovers());
            if processes.len() == 1 && fifos.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "exec processes left: {processes:?}, FIFOs left: {fifos:?}\nkeeld log:\n{}",
                self.keeld.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn rss_kib(&self) -> u64 {
        self.keeld.rss_kib()
    }

    fn assert_keeld_answers(&self) {
        let r = self.keeld.raw("GET", "/os", None);
        assert_eq!(
            r.status,
            200,
            "keeld no longer answers: {}\n{}",
            r.text(),
            self.keeld.log()
        );
    }
}

fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn status_line(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// Exit codes, stdout apart from stderr, stdin streamed, the container's privileges
/// and environment, many execs at once, and clear refusals; nothing left behind.
#[test]
fn exec_runs_commands_as_the_container_and_refuses_clearly() {
    let node = Node::boot();

    let out = node.exec(&["c", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));

    let out = node.exec(&["c", "sh", "-c", "echo out; echo err >&2; echo out2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\nout2\n");
    assert_eq!(text(&out.stderr), "err\n");

    // stdin streamed until end-of-file; a megabyte goes through the capacity protocol.
    let out = node.exec_with_stdin(&["c", "cat"], b"hello\nworld\n");
    assert_eq!(text(&out.stdout), "hello\nworld\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let out = node.exec_with_stdin(&["c", "md5sum"], &big);
    let expected = {
        let mut md5 = Command::new("md5sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("md5sum");
        md5.stdin
            .take()
            .expect("stdin")
            .write_all(&big)
            .expect("write");
        text(&md5.wait_with_output().expect("md5sum").stdout)
    };
    assert_eq!(
        text(&out.stdout).split_whitespace().next(),
        expected.split_whitespace().next(),
        "{}",
        text(&out.stderr)
    );
    // A process that stops reading its stdin early ends with its own status.
    let out = node.exec_with_stdin(&["c", "head", "-c", "3"], &big);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 3);

    // The container's environment, user and working directory.
    let out = node.exec(&["c", "sh", "-c", "echo \"$GREETING\"; id -u; pwd"]);
    assert_eq!(
        text(&out.stdout),
        "hello from c\n0\n/\n",
        "{}",
        text(&out.stderr)
    );

    // Never more than the container: the same capabilities, seccomp and
    // no_new_privs as the container's own process (pid 1 in its PID namespace).
    let fields = [
        "CapEff",
        "CapPrm",
        "CapBnd",
        "CapInh",
        "NoNewPrivs",
        "Seccomp",
    ];
    let out = node.exec(&["c", "cat", "/proc/self/status", "/proc/1/status"]);
    let both = text(&out.stdout);
    let (own, init) = both.split_at(both.rfind("Name:").expect("two status files"));
    for field in fields {
        assert_eq!(
            status_line(own, field),
            status_line(init, field),
            "{field} of the exec process differs from the container's"
        );
    }
    assert_eq!(status_line(own, "CapEff"), "00000000a80425fb");
    assert_eq!(status_line(own, "NoNewPrivs"), "1");
    assert_eq!(status_line(own, "Seccomp"), "2");
    // A superpowered container's exec has what that container has, not less.
    let out = node.exec(&["su", "grep", "CapEff", "/proc/self/status"]);
    let host = std::fs::read_to_string("/proc/1/status").expect("status");
    assert_eq!(
        text(&out.stdout).split_whitespace().nth(1),
        Some(status_line(&host, "CapBnd").as_str())
    );

    // Eight at once, each with its own output and status.
    let handles: Vec<_> = (1..=8)
        .map(|i| {
            let socket = node.keeld.socket.clone();
            std::thread::spawn(move || {
                let out = Command::new(bin("apiclient"))
                    .arg("--socket-path")
                    .arg(&socket)
                    .args([
                        "exec",
                        "c",
                        "sh",
                        "-c",
                        &format!("echo exec-{i}; sleep 0.5; echo done-{i} >&2; exit {i}"),
                    ])
                    .stdin(Stdio::null())
                    .output()
                    .expect("apiclient");
                (i, out)
            })
        })
        .collect();
    for handle in handles {
        let (i, out) = handle.join().expect("thread");
        assert_eq!(out.status.code(), Some(i), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("exec-{i}\n"));
        assert_eq!(text(&out.stderr), format!("done-{i}\n"));
    }

    // Refusals: exit status 1 and a reason naming the container.
    for (target, reason) in [
        ("nope", "no host container named \"nope\" (close code 4404)"),
        (
            "setup",
            "\"setup\" is a bootstrap container; exec runs only in host containers (close code 4404)",
        ),
        ("broken", "host container \"broken\" is not running ("),
        ("Not_A_Name!", "no host container named \"Not_A_Name!\""),
    ] {
        let out = node.exec(&[target, "true"]);
        assert_eq!(out.status.code(), Some(1), "{target}");
        assert!(
            text(&out.stderr).contains(reason),
            "{target}: {}",
            text(&out.stderr)
        );
    }
    let out = node.exec(&["c", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot start the command") && stderr.contains("/no/such/program"),
        "{stderr}"
    );
    // A socket that is not keeld's: the usual connection error.
    let out = Command::new(bin("apiclient"))
        .args(["--socket-path", "/nonexistent.sock", "exec", "c", "true"])
        .output()
        .expect("apiclient");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent.sock"));

    node.assert_no_exec_left();
    node.assert_keeld_answers();
}

/// A pseudo-terminal for apiclient: the test holds the master, apiclient gets the
/// slave as stdin, stdout, stderr and controlling terminal (so a resize of the master
/// sends it SIGWINCH, as a terminal emulator's does).
struct Pty {
    master: OwnedFd,
    slave_path: PathBuf,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Pty {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave_path = PathBuf::from(name.to_string_lossy().into_owned());
        set_size(&master, rows, cols);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let reader = master.try_clone().expect("dup");
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(reader);
            let mut buf = [0u8; 4096];
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    return;
                }
                sink.lock().expect("screen").extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master,
            slave_path,
            screen,
        }
    }

    fn open_slave(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&self.slave_path)
            .expect("open the pty's slave")
    }

    /// `apiclient exec <args>` on the slave, in a session of its own.
    fn spawn(&self, socket: &Path, args: &[&str]) -> Child {
        let slave = self.open_slave();
        let mut command = Command::new(bin("apiclient"));
        command
            .arg("--socket-path")
            .arg(socket)
            .arg("exec")
            .args(args)
            .stdin(slave.try_clone().expect("dup"))
            .stdout(slave.try_clone().expect("dup"))
            .stderr(slave);
        // SAFETY: setsid and the TIOCSCTTY ioctl are async-signal-safe system calls on
        // the child's own descriptors; nothing is allocated between fork and exec.
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::io::stdin())?;
                Ok(())
            });
        }
        command.spawn().expect("apiclient on a pty")
    }

    fn type_text(&self, text: &str) {
        rustix::io::write(&self.master, text.as_bytes()).expect("type");
    }

    fn screen(&self) -> String {
        text(&self.screen.lock().expect("screen"))
    }

    /// Waits until the screen shows `needle`; answers the screen.
    fn wait_for(&self, needle: &str) -> String {
        let mut screen = String::new();
        wait_until(
            &format!("{needle:?} on the terminal"),
            Duration::from_secs(20),
            || {
                screen = self.screen();
                screen.contains(needle)
            },
        );
        screen
    }
}

fn set_size(fd: impl AsFd, rows: u16, cols: u16) {
    rustix::termios::tcsetwinsize(
        fd,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .expect("set the window size");
}

fn modes(fd: impl AsFd) -> String {
    let t = rustix::termios::tcgetattr(fd).expect("tcgetattr");
    format!(
        "{:?} {:?} {:?}",
        t.local_modes, t.input_modes, t.output_modes
    )
}

/// A running container's `/etc/resolv.conf` and `/etc/hosts` are what keeld renders from
/// `settings.dns` and `settings.network`, and follow a change without the container
/// being recreated (its pid 1 keeps its start time).
#[test]
fn dns_and_hosts_settings_reach_a_running_container() {
    let node = Node::boot();
    let started = |node: &Node| {
        let out = node.exec(&["c", "cat", "/proc/1/stat"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        // Field 22, after the command name in parentheses: the start time.
        let stat = text(&out.stdout);
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        after
            .split_whitespace()
            .nth(19)
            .expect("starttime")
            .to_owned()
    };
    let first_start = started(&node);
    let patch = json!({
        "dns": {"name-servers": ["10.9.8.7"], "search-list": ["corp.example"]},
        "network": {"hosts": [["10.1.2.3", ["db.corp.example"]]]}
    });
    let r = node.keeld.raw(
        "PATCH",
        "/settings?tx=dns",
        Some(patch.to_string().as_bytes()),
    );
    assert_eq!(r.status, 204, "PATCH: {}", r.text());
    let r = node.keeld.raw("POST", "/tx/commit_and_apply?tx=dns", None);
    assert_eq!(r.status, 200, "commit: {}", r.text());
    let read = |file: &str| text(&node.exec(&["c", "cat", file]).stdout);
    wait_until("the new resolv.conf in c", Duration::from_secs(10), || {
        let resolv = read("/etc/resolv.conf");
        resolv.contains("nameserver 10.9.8.7") && resolv.contains("search corp.example")
    });
    wait_until("the new hosts in c", Duration::from_secs(10), || {
        read("/etc/hosts")
            .lines()
            .any(|l| l.split_whitespace().eq(["10.1.2.3", "db.corp.example"]))
    });
    assert_eq!(started(&node), first_start, "c was recreated");
    // Still read-only from inside.
    let out = node.exec(&["c", "sh", "-c", "echo x >> /etc/resolv.conf"]);
    assert_ne!(out.status.code(), Some(0), "resolv.conf is writable in c");
}

/// A terminal session: a pty inside (`tty`), the initial size and a resize seen by
/// `stty size`, Ctrl-C to the process and not to apiclient, the exit status, and the
/// user's terminal back in its own mode afterwards, after a normal end and after
/// signals.
#[test]
fn exec_in_a_terminal() {
    let node = Node::boot();
    let pty = Pty::open(30, 100);
    let slave = pty.open_slave();
    let before = modes(&slave);
    let mut child = pty.spawn(&node.keeld.socket, &["c", "sh"]);

    pty.type_text("tty; stty size; echo $((40+2))-ready\n");
    let screen = pty.wait_for("42-ready");
    assert!(screen.contains("/dev/pts/"), "{screen}");
    assert!(screen.contains("30 100"), "initial size: {screen}");
    assert_ne!(modes(&slave), before, "raw mode while the session runs");

    // The terminal grows; apiclient hears SIGWINCH and tells keeld.
    set_size(&pty.master, 50, 132);
    let mut n = 0;
    wait_until("the resize inside", Duration::from_secs(20), || {
        n += 1;
        pty.type_text(&format!("stty size; echo $(({n}+1000))-size\n"));
        let marker = format!("{}-size", n + 1000);
        let screen = pty.wait_for(&marker);
        let before_marker = &screen[..screen.rfind(&marker).unwrap_or(0)];
        before_marker.trim_end().ends_with("50 132") || before_marker.contains("50 132\r\n")
    });

    // Ctrl-C interrupts the command inside; apiclient and the shell go on.
    pty.type_text("sleep 1000\n");
    std::thread::sleep(Duration::from_millis(500));
    pty.type_text("\x03");
    pty.type_text("echo $((2+5))-after-ctrl-c\n");
    pty.wait_for("7-after-ctrl-c");
    assert!(child.try_wait().expect("wait").is_none(), "apiclient died");

    pty.type_text("exit 3\n");
    let status = child.wait().expect("apiclient");
    assert_eq!(status.code(), Some(3), "{}", pty.screen());
    assert_eq!(modes(&slave), before, "terminal restored after the end");

    // A signal apiclient cannot forward twice: the second ends it with 128 + n, and
    // the terminal is restored all the same.
    let mut child = pty.spawn(&node.keeld.socket, &["-t", "c", "sh"]);
    pty.type_text("echo $((3+3))-second\n");
    pty.wait_for("6-second");
    for _ in 0..2 {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .expect("kill");
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = child.wait().expect("apiclient");
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
    assert_eq!(modes(&slave), before, "terminal restored after signals");

    // Rarer signals whose default would end apiclient with the terminal raw: SIGUSR1
    // (forwarded; the shell inside dies of it, or a second one ends apiclient) and
    // SIGXCPU (no name in the protocol: apiclient ends at once). Either way 128 + n,
    // and the terminal restored.
    for (signal, number) in [
        (rustix::process::Signal::USR1, 10),
        (rustix::process::Signal::XCPU, 24),
    ] {
        let mut child = pty.spawn(&node.keeld.socket, &["-t", "c", "sh"]);
        pty.type_text(&format!("echo $(({number}+100))-rare\n"));
        pty.wait_for(&format!("{}-rare", number + 100));
        for _ in 0..2 {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            // It may have ended between the check and the kill: that is fine.
            let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&child), signal);
            std::thread::sleep(Duration::from_millis(300));
        }
        let status = child.wait().expect("apiclient");
        assert_eq!(status.code(), Some(128 + number), "{signal:?}: {status:?}");
        assert_eq!(modes(&slave), before, "terminal restored after {signal:?}");
    }
    node.assert_no_exec_left();
}

/// A client killed mid-stream takes its process with it (ctr shows the container's
/// own process alone), and a client that floods a slow reader keeps keeld small.
#[test]
fn a_vanished_client_leaves_nothing_and_a_flood_stays_bounded() {
    let node = Node::boot();

    let mut child = node.exec_command(&["c", "sh", "-c", "echo started; exec sleep 1000"]);
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).expect("output");
    assert_eq!(&first, b"started\n");
    assert!(node.task_processes("c").len() >= 2, "the exec runs");
    child.kill().expect("kill apiclient");
    let _ = child.wait();
    node.assert_no_exec_left();

    // A flood (cat /dev/zero) read slowly: keeld's memory stays put while megabytes
    // wait in the process.
    let baseline = node.rss_kib();
    let mut child = node.exec_command(&["c", "cat", "/dev/zero"]);
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 64 * 1024];
    let mut peak = baseline;
    let mut read = 0usize;
    for _ in 0..60 {
        stdout.read_exact(&mut buf).expect("flood");
        read += buf.len();
        peak = peak.max(node.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(read >= 60 * 64 * 1024);
    assert!(
        peak < baseline + 32 * 1024,
        "keeld grew from {baseline} KiB to {peak} KiB under a flood to a slow reader"
    );
    // Then the reader goes away mid-flood.
    child.kill().expect("kill");
    let _ = child.wait();
    node.assert_no_exec_left();
    node.assert_keeld_answers();
}

/// A WebSocket to keeld's `/exec`, speaking the protocol by hand.
async fn connect(node: &Node) -> apiclient::exec::ExecSocket {
    apiclient::exec::connect(&node.keeld.socket)
        .await
        .expect("upgrade")
}

fn init(target: &str, command: &[&str], tty: Option<Size>, keel: bool) -> Message {
    let message = ClientMessage::Initialize(Initialize {
        command: command.iter().map(Into::into).collect(),
        target: target.to_owned(),
        tty: tty.map(|size| TtyInit { size: Some(size) }),
        keel_protocol: keel.then_some(1),
    });
    Message::Text(serde_json::to_string(&message).expect("json").into())
}

fn control(message: &ClientMessage) -> Message {
    Message::Text(serde_json::to_string(message).expect("json").into())
}

/// Reads until the close frame; answers (text messages, binary data, close frame).
async fn until_close(
    socket: &mut apiclient::exec::ExecSocket,
) -> (Vec<ServerMessage>, Vec<u8>, Option<CloseFrame>) {
    let mut texts = Vec::new();
    let mut data = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("keeld answers within 30 s");
        match next {
            Some(Ok(Message::Text(t))) => {
                texts.push(serde_json::from_str(&t).expect("a server message"))
            }
            Some(Ok(Message::Binary(b))) => data.extend_from_slice(&b),
            Some(Ok(Message::Close(frame))) => return (texts, data, frame),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (texts, data, None),
        }
    }
}

/// The next control message other than a capacity update.
async fn next_control(socket: &mut apiclient::exec::ExecSocket) -> ServerMessage {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(t))) => {
                let m: ServerMessage = serde_json::from_str(&t).expect("json");
                if !matches!(m, ServerMessage::Capacity(_)) {
                    return m;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("session ended: {other:?}"),
        }
    }
}

fn code_and_reason(frame: Option<CloseFrame>) -> (u16, String) {
    let frame = frame.expect("a close frame");
    (u16::from(frame.code), frame.reason.to_string())
}

/// Bottlerocket's client on the wire: an unpadded key, no Keel fields. It gets
/// Bottlerocket's protocol: a capacity message first, untagged output with stdout and
/// stderr merged, and the exit status as the reason of a normal close.
#[test]
fn bottlerocket_s_client_gets_bottlerocket_s_protocol() {
    let node = Node::boot();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut stream = tokio::net::UnixStream::connect(&node.keeld.socket)
            .await
            .expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(
                b"GET /exec HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
                  Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: AAECAwQFBgcICQoLDA0ODw\r\n\r\n",
            )
            .await
            .expect("handshake");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.expect("101");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", text(&head));
        let mut socket =
            tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
        // Bottlerocket's Initialize, exactly: the command as OsStrings, `tty: null`.
        socket
            .send(Message::Text(
                r#"{"Initialize":{"command":[{"Unix":[115,104]},{"Unix":[45,99]},{"Unix":[101,99,104,111,32,111,117,116,59,32,101,99,104,111,32,101,114,114,32,62,38,50]}],"target":"c","tty":null}}"#.into(),
            ))
            .await
            .expect("send");
        let (texts, data, frame) = until_close(&mut socket).await;
        assert!(
            matches!(texts.first(), Some(ServerMessage::Capacity(c)) if c.max_messages_outstanding == 1024 && c.messages_written == 0),
            "{texts:?}"
        );
        assert!(
            texts.iter().all(|t| matches!(t, ServerMessage::Capacity(_))),
            "only Bottlerocket's messages: {texts:?}"
        );
        let mut lines: Vec<&str> = std::str::from_utf8(&data).expect("utf8").lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["err", "out"], "merged, untagged");
        let frame = frame.expect("close");
        assert_eq!(frame.code, CloseCode::Normal);
        assert_eq!(frame.reason.as_str(), "0");
    });
    node.assert_no_exec_left();
}

/// Input that is short and ended at once: the whole message (Initialize, data,
/// ContentComplete) arrives before the shim has opened its end of the stdin FIFO. Each
/// process still reads all of its input and then end-of-file. Four clients at a time
/// keep the two cores busy, which widens the window between Start and the shim's open.
#[test]
fn input_ended_at_once_reaches_the_process_every_time() {
    let node = Node::boot();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let node = &node;
        let one = |i: usize| async move {
            let mut socket = connect(node).await;
            let line = format!("line {i}\n");
            socket
                .send(init("c", &["cat"], None, false))
                .await
                .expect("send");
            socket
                .send(Message::Binary(line.clone().into_bytes().into()))
                .await
                .expect("send");
            socket
                .send(control(&ClientMessage::ContentComplete))
                .await
                .expect("send");
            let (_, data, frame) = until_close(&mut socket).await;
            (i, line, data, frame)
        };
        for round in 0..40 {
            let results = futures_util::future::join_all((0..4).map(|k| one(round * 4 + k))).await;
            for (i, line, data, frame) in results {
                let (code, reason) = code_and_reason(frame);
                assert_eq!((code, reason.as_str()), (1000, "0"), "exec {i}");
                assert_eq!(text(&data), line, "exec {i}");
            }
        }
    });
    node.assert_no_exec_left();
}

/// Malformed frames, bad messages, an unknown target, an empty command, an oversized
/// message, a 0x0 resize and a signal that does not exist: each refused with its own
/// reason, keeld unharmed, no process left.
#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let node = Node::boot();
    let r = node.keeld.raw("GET", "/exec", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("WebSocket"), "{}", r.text());
    let r = node.keeld.raw("GET", "/exec?target=c", None);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = node.keeld.raw("POST", "/exec", None);
    assert_eq!(r.status, 405, "{}", r.text());

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let refused = |message: Message| async {
            let mut socket = connect(&node).await;
            // keeld may close before an oversized message is all written.
            let _ = socket.send(message).await;
            code_and_reason(until_close(&mut socket).await.2)
        };
        assert_eq!(
            refused(init("nope", &["true"], None, true)).await,
            (4404, "no host container named \"nope\"".to_owned())
        );
        assert_eq!(
            refused(init("c", &[], None, true)).await,
            (4400, "the command is empty".to_owned())
        );
        let (code, reason) = refused(Message::Text("{not json".into())).await;
        assert_eq!(code, 1007, "{reason}");
        assert!(reason.starts_with("invalid control message"), "{reason}");
        let (code, reason) = refused(Message::Text(r#"{"Resize":{"rows":1}}"#.into())).await;
        assert_eq!(code, 1007, "{reason}");
        assert_eq!(
            refused(Message::Binary(b"data".to_vec().into())).await,
            (1008, "process data sent before Initialize".to_owned())
        );
        assert_eq!(
            refused(control(&ClientMessage::ContentComplete)).await,
            (1008, "ContentComplete sent before Initialize".to_owned())
        );
        let (code, reason) =
            refused(Message::Binary(vec![0u8; 100 * 1024].into())).await;
        assert_eq!(code, 1009, "{reason}");

        // A session that goes on after refused control messages.
        let mut socket = connect(&node).await;
        socket
            .send(init("c", &["sh"], Some(Size { rows: 24, cols: 80 }), true))
            .await
            .expect("send");
        assert!(matches!(next_control(&mut socket).await, ServerMessage::Started(s) if s.keel_protocol == 1 && !s.separate_stderr));
        socket
            .send(control(&ClientMessage::Winch(Size { rows: 0, cols: 0 })))
            .await
            .expect("send");
        let m = next_control(&mut socket).await;
        assert!(
            matches!(&m, ServerMessage::Refused(r) if r.message.contains("0x0")),
            "{m:?}"
        );
        socket
            .send(control(&ClientMessage::Signal("SIGFOO".into())))
            .await
            .expect("send");
        let m = next_control(&mut socket).await;
        assert!(
            matches!(&m, ServerMessage::Refused(r) if r.message.starts_with("unknown signal \"SIGFOO\"")),
            "{m:?}"
        );
        socket
            .send(control(&ClientMessage::Signal("SIGKILL".into())))
            .await
            .expect("send");
        let (_, _, frame) = until_close(&mut socket).await;
        assert_eq!(code_and_reason(frame), (1000, "137".to_owned()));

        // Malformed frames on a live session: a reserved bit, an unmasked client frame.
        for bad in [&[0xF2u8, 0x80, 0, 0, 0, 0][..], &[0x82, 0x03, 1, 2, 3][..]] {
            let mut socket = connect(&node).await;
            socket
                .send(init("c", &["sleep", "1000"], None, true))
                .await
                .expect("send");
            let mut raw = socket.into_inner();
            use tokio::io::AsyncWriteExt;
            raw.write_all(bad).await.expect("write");
            let mut rest = Vec::new();
            use tokio::io::AsyncReadExt;
            let _ = tokio::time::timeout(Duration::from_secs(30), raw.read_to_end(&mut rest))
                .await
                .expect("keeld closes");
            // The close frame (1002) is somewhere in what came back.
            assert!(
                rest.windows(4).any(|w| w[0] == 0x88 && w[2..4] == 1002u16.to_be_bytes()),
                "no 1002 close frame in {rest:?}"
            );
        }
    });
    node.assert_no_exec_left();
    node.assert_keeld_answers();
}

/// keeld stopping (SIGTERM) ends every session, killing its process, and tells the
/// client; a keeld that dies (SIGKILL) leaves its exec processes running, and the next
/// keeld kills and removes them.
#[test]
fn execs_end_with_keeld_and_a_crashed_keeld_s_are_swept() {
    let mut node = Node::boot();

    // SIGKILL: the process outlives keeld (the shim holds it); the next start sweeps it.
    let mut child = node.exec_command(&["c", "sh", "-c", "echo started; exec sleep 1000"]);
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).expect("output");
    node.keeld.kill();
    let out = child.wait_with_output().expect("apiclient");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        node.task_processes("c").len() >= 2,
        "the exec outlives keeld"
    );
    assert_eq!(node.exec_leftovers().len(), 1);
    node.keeld.spawn();
    node.assert_no_exec_left();

    // SIGTERM: the session ends with 1001 and the process is killed before keeld exits.
    node.wait_running("c");
    let mut child = node.exec_command(&["c", "sh", "-c", "echo started; exec sleep 1000"]);
    let mut stdout = child.stdout.take().expect("stdout");
    stdout.read_exact(&mut first).expect("output");
    let status = node.keeld.stop();
    assert!(status.success(), "keeld stopped with {status}");
    let out = child.wait_with_output().expect("apiclient");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("keeld is stopping (close code 1001)"),
        "{}",
        text(&out.stderr)
    );
    node.assert_no_exec_left();
}

/// containerd down when a session ends, or when keeld starts and finds a crashed
/// keeld's session: the process cannot be removed yet, so its FIFOs stay (they are how
/// it is found again) and keeld retries until containerd answers, then removes both.
#[test]
fn an_exec_containerd_could_not_remove_goes_once_containerd_answers() {
    let mut node = Node::boot();
    let long_wait = Duration::from_secs(60);

    // The client goes away while containerd is down.
    let mut child = node.exec_command(&["c", "sh", "-c", "echo started; exec sleep 1000"]);
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).expect("output");
    node.containerd.kill();
    child.kill().expect("kill apiclient");
    let _ = child.wait();
    wait_until("the failed removal logged", long_wait, || {
        node.keeld
            .log()
            .contains("cannot delete an exec process; retrying in the background")
    });
    assert_eq!(
        node.exec_leftovers().len(),
        1,
        "the FIFOs stay while the process may live"
    );
    node.containerd.restart();
    wait_until("the exec removed", long_wait, || {
        node.task_processes("c").len() == 1 && node.exec_leftovers().is_empty()
    });

    // keeld crashes with a session open and starts again while containerd is down.
    let mut child = node.exec_command(&["c", "sh", "-c", "echo started; exec sleep 1000"]);
    let mut stdout = child.stdout.take().expect("stdout");
    stdout.read_exact(&mut first).expect("output");
    node.keeld.kill();
    let _ = child.wait();
    node.containerd.kill();
    node.keeld.spawn();
    wait_until("the failed sweep logged", long_wait, || {
        node.keeld
            .log()
            .contains("cannot remove an exec process left by an earlier keeld yet")
    });
    assert_eq!(node.exec_leftovers().len(), 1);
    node.containerd.restart();
    wait_until("the crashed keeld's exec removed", long_wait, || {
        node.task_processes("c").len() == 1 && node.exec_leftovers().is_empty()
    });
    node.assert_keeld_answers();
}
