//! What apiclient does differently on a terminal, proved on a real pseudo-terminal
//! (`script` from util-linux): `boot wait` shows the boot's progress on stderr only
//! when stderr is a terminal, dry-run diffs are coloured only on a terminal and never
//! with `NO_COLOR` set, and a `boot wait` that times out exits 124.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

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
        "timed out waiting for the boot; phase: unknown (keeld not answering)\n"
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
