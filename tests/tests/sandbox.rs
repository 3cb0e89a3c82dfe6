//! keeld's own sandbox, seen from outside: `/proc/<pid>/status` shows the seccomp
//! filter, no_new_privs and the reduced capability sets, and a child keeld starts (a
//! restart command) inherits them: a system call on the deny-list fails there with
//! EPERM, and succeeds from the same command under `--no-sandbox`.

use std::path::Path;

use keel_e2e::{repo_root, Keeld, KeeldOptions};

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// services.toml whose motd service runs a probe: `unshare -U true` (a user namespace
/// needs no capability, so only the seccomp filter can refuse it), recording its exit
/// code and error, plus the child's own status lines.
fn probe_services(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("probe.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nunshare -U true 2> {d}/unshare.err\necho $? > {d}/unshare.rc\ngrep -E '^(Seccomp|NoNewPrivs|CapBnd|CapEff):' /proc/self/status > {d}/child.status\n",
            d = dir.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let text =
        std::fs::read_to_string(repo_root().join("packaging/services.toml")).expect("services");
    let text = text.replacen(
        "[services.motd]\nconfiguration-files = [\"motd\"]\n",
        &format!(
            "[services.motd]\nconfiguration-files = [\"motd\"]\nrestart-commands = [[\"{}\"]]\n",
            script.display()
        ),
        1,
    );
    assert!(text.contains("probe.sh"), "the motd service was rewritten");
    let path = dir.join("services.toml");
    std::fs::write(&path, text).expect("services.toml");
    path
}

fn run_probe(no_sandbox: bool) -> (Keeld, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let services = probe_services(dir.path());
    let keeld = Keeld::start_with(KeeldOptions {
        services: Some(services),
        extra_args: if no_sandbox {
            vec!["--no-sandbox".into()]
        } else {
            Vec::new()
        },
        // The other services' restart commands are real here (systemctl) and this
        // machine has no systemd: the boot's full render fails, which is not the point.
        wait_for_boot: false,
        ..KeeldOptions::default()
    });
    keeld.wait_boot(std::time::Duration::from_secs(30));
    let out = keeld.apiclient(&["set", "motd=probe"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (keeld, dir)
}

#[test]
fn keeld_runs_sandboxed_and_its_children_inherit_it() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the sandbox drops capabilities root holds"
    );
    let (keeld, dir) = run_probe(false);
    let pid = keeld.pid();
    assert_eq!(status_field(pid, "Seccomp"), "2", "filter mode");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER.
    assert_eq!(status_field(pid, "CapBnd"), "000000000000000b");
    assert_eq!(status_field(pid, "CapEff"), "000000000000000b");
    assert_eq!(status_field(pid, "CapInh"), "0000000000000000");
    assert_eq!(status_field(pid, "CapAmb"), "0000000000000000");

    let child = std::fs::read_to_string(dir.path().join("child.status")).expect("child status");
    assert!(child.contains("Seccomp:\t2"), "{child}");
    assert!(child.contains("NoNewPrivs:\t1"), "{child}");
    assert!(child.contains("CapBnd:\t000000000000000b"), "{child}");
    let rc = std::fs::read_to_string(dir.path().join("unshare.rc")).expect("rc");
    let err = std::fs::read_to_string(dir.path().join("unshare.err")).expect("err");
    assert_ne!(rc.trim(), "0", "unshare must be refused: {err}");
    assert!(
        err.contains("Operation not permitted"),
        "EPERM from the filter: {err}"
    );
    assert!(keeld.log().contains("sandbox installed"));
}

#[test]
fn no_sandbox_is_loud_and_lets_the_same_call_through() {
    let (keeld, dir) = run_probe(true);
    let pid = keeld.pid();
    assert_eq!(status_field(pid, "Seccomp"), "0");
    assert_eq!(status_field(pid, "NoNewPrivs"), "0");
    let rc = std::fs::read_to_string(dir.path().join("unshare.rc")).expect("rc");
    assert_eq!(rc.trim(), "0", "without the filter the same unshare works");
    assert!(
        keeld.log().contains("WITHOUT its sandbox"),
        "{}",
        keeld.log()
    );
}
