//! What apiclient does differently on a terminal, proved on a real pseudo-terminal
//! (`script` from util-linux): `boot wait` shows the boot's progress on stderr only
//! when stderr is a terminal, dry-run diffs are coloured only on a terminal and never
//! with `NO_COLOR` set, and a `boot wait` that times out exits 124.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use std::time::Duration;

use keel_e2e::containerd::output_within;
use keel_e2e::{bin, Keeld};

/// Runs apiclient with `args` on a pseudo-terminal (stdin, stdout and stderr all on
/// it); what it printed, both streams together, is the output's stdout.
fn on_terminal(keeld: &Keeld, args: &str, env: &[(&str, &str)]) -> Output {
    let command = format!(
        "'{}' --socket-path '{}' {args}",
        bin("apiclient").display(),
        keeld.socket.display()
    );
    let mut script = Command::new("script");
    script
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("TERM", "xterm")
        .env_remove("NO_COLOR");
    for (name, value) in env {
        script.env(name, value);
    }
    script.output().unwrap()
}

fn piped(keeld: &Keeld, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin("apiclient"));
    command
        .arg("--socket-path")
        .arg(&keeld.socket)
        .args(args)
        .env("TERM", "xterm")
        .env_remove("NO_COLOR");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn boot_wait_shows_progress_only_on_a_terminal() {
    let keeld = Keeld::start();
    let out = on_terminal(&keeld, "boot wait --timeout 30s", &[]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("] phase: configured"), "{shown}");
    assert!(shown.contains("]   commit: succeeded"), "{shown}");
    assert!(shown.trim_end().ends_with("configured"), "{shown}");

    let out = piped(&keeld, &["boot", "wait", "--timeout", "30s"], &[]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "configured\n");
    assert_eq!(text(&out.stderr), "", "no progress into a pipe");
}

#[test]
fn boot_wait_times_out_with_exit_124() {
    let out = Command::new(bin("apiclient"))
        .args(["--socket-path", "/nonexistent/keel/api.sock"])
        .args(["boot", "wait", "--timeout", "300ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    assert_eq!(
        text(&out.stderr),
        "timed out waiting for the boot; phase: unknown (keeld not answering: cannot connect \
         to /nonexistent/keel/api.sock: No such file or directory (os error 2))\n"
    );

    // A socket path that cannot work (a file where a directory should be) is no keeld
    // still starting: said at once, not waited out.
    let out = Command::new(bin("apiclient"))
        .args(["--socket-path", "/etc/passwd/api.sock"])
        .args(["boot", "wait", "--timeout", "20s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot connect to /etc/passwd/api.sock: Not a directory"),
        "{}",
        text(&out.stderr)
    );

    // A socket that accepts and never answers (systemd holding keeld's socket while
    // keeld hangs): the limit still holds.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let started = std::time::Instant::now();
    let mut wait = Command::new(bin("apiclient"));
    wait.arg("--socket-path")
        .arg(&socket)
        .args(["boot", "wait", "--timeout", "500ms"]);
    let out =
        output_within(wait, Duration::from_secs(20)).expect("boot wait ignored its --timeout");
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(20));

    // exec waiting there for keeld's answer: Ctrl-C (or SIGTERM) ends it, 128 + n.
    for (signal, code) in [
        (rustix::process::Signal::INT, 130),
        (rustix::process::Signal::TERM, 143),
    ] {
        let mut exec = Command::new(bin("apiclient"))
            .arg("--socket-path")
            .arg(&socket)
            .args(["exec", "-T", "admin", "true"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let pid = rustix::process::Pid::from_raw(exec.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = exec.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = exec.kill();
                panic!("exec ignored signal {signal:?} while connecting");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(code));
    }

    // A limit too large for the clock is no limit, not a crash.
    let mut wait = Command::new(bin("apiclient"));
    wait.args(["--socket-path", "/nonexistent/keel/api.sock"])
        .args(["boot", "wait", "--timeout", "18446744073709551615s"]);
    let out = output_within(wait, Duration::from_secs(2));
    assert!(
        out.as_ref().is_err_and(|e| e.starts_with("did not finish")),
        "it waits: {out:?}"
    );
}

/// Output that cannot be written (a full disk) is a failure, not a silent success; a
/// closed pipe is not.
#[test]
fn an_output_that_cannot_be_written_fails() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(bin("apiclient"))
        .args(["completions", "bash"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("cannot write the output: "),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn dry_run_diffs_are_coloured_on_a_terminal_unless_no_color() {
    let keeld = Keeld::start();
    let dry_run = "set --dry-run motd=coloured";
    let green_addition = "\u{1b}[32m+coloured\u{1b}[0m";

    let out = on_terminal(&keeld, dry_run, &[]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains(green_addition), "{shown:?}");
    assert!(shown.contains("\u{1b}[1m=== file motd"), "{shown:?}");

    for env in [
        &[("NO_COLOR", "1")][..],
        &[("NO_COLOR", "0")][..],
        &[("TERM", "dumb")][..],
    ] {
        let out = on_terminal(&keeld, dry_run, env);
        let shown = text(&out.stdout);
        assert!(out.status.success(), "{shown}");
        assert!(shown.contains("+coloured"), "{shown}");
        assert!(!shown.contains('\u{1b}'), "{env:?}: {shown:?}");
    }
    // An empty NO_COLOR is no NO_COLOR.
    let out = on_terminal(&keeld, dry_run, &[("NO_COLOR", "")]);
    assert!(text(&out.stdout).contains(green_addition));

    let out = piped(&keeld, &["set", "--dry-run", "motd=coloured"], &[]);
    assert!(!text(&out.stdout).contains('\u{1b}'), "none into a pipe");
    let out = piped(
        &keeld,
        &["--color", "always", "set", "--dry-run", "motd=coloured"],
        &[("NO_COLOR", "1")],
    );
    assert!(
        text(&out.stdout).contains(green_addition),
        "--color always wins"
    );
    let out = on_terminal(&keeld, &format!("--color never {dry_run}"), &[]);
    assert!(!text(&out.stdout).contains('\u{1b}'));
    // Nothing was committed by any of it.
    assert_ne!(
        keeld.raw("GET", "/settings", None).json()["motd"],
        "coloured"
    );
}
