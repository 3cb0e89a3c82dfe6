//! Bottlerocket's own `apiclient` command lines, copied from its documentation, replayed
//! unchanged against a real keeld: each line runs through `sh -c` exactly as written in
//! the document it comes from (Keel's apiclient first on `PATH`, the socket given by
//! `APICLIENT_SOCKET` instead of Bottlerocket's default path), and each checks its effect
//! on the node, not only the exit status.
//!
//! Sources, cited per line by their letter:
//! - [R] bottlerocket-os/bottlerocket `README.md` (commit 91632ff5).
//! - [A] bottlerocket-os/bottlerocket-core-kit v3.1.1 `sources/api/apiclient/README.md`.
//! - [U] bottlerocket-core-kit v3.1.1 `sources/updater/README.md`.
//! - [H] bottlerocket-core-kit v3.1.1 `sources/api/apiclient/src/main.rs`, its usage text.
//! - [Q] bottlerocket-project-website `content/en/os/1.57.x/install/quickstart/aws/host-containers`
//!   (the control container's greeting).
//! - [G] bottlerocket-project-website `content/en/os/1.57.x/login/regaining-access`.
//! - [L] bottlerocket-project-website `content/en/os/1.57.x/update/locking-to-a-specific-release`
//!   (an SSM document's shell line; `{{ TargetVersion }}` filled in).
//! - [M] bottlerocket-project-website `content/en/os/1.57.x/update/methods/in-place`.
//! - [B] bottlerocket-project-website `content/en/os/1.57.x/concepts/bootstrap-commands`.
//! - [O] bottlerocket-os/bottlerocket-update-operator `agent/src/apiclient.rs`: the
//!   command lines its agent runs (`apiclient raw -u <uri> [-m POST]`).
//!
//! `exec` ([R] `apiclient exec admin bash`) and `update` ([M]) run against a real
//! container and a real update repository in their own tests (exec.rs, updates.rs);
//! here their command lines are only checked to parse.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use keel_e2e::{bin_dir, Keeld, KeeldOptions};
use serde_json::{json, Value};

/// The node the lines run against, and what the checks look at.
struct Node {
    keeld: Keeld,
    _work: tempfile::TempDir,
    /// The shell's working directory: user-data files for `apply`.
    cwd: PathBuf,
    /// One line per reboot the reboot command was asked for.
    reboots: PathBuf,
    /// `127.0.0.1:<port>` of a web server answering every GET with `http.toml`.
    http_addr: String,
}

impl Node {
    fn settings(&self) -> Value {
        self.keeld.raw("GET", "/settings", None).json()
    }

    fn reboot_count(&self) -> usize {
        std::fs::read_to_string(&self.reboots)
            .unwrap_or_default()
            .lines()
            .count()
    }
}

/// One documented command line and what it must do.
struct Line {
    source: &'static str,
    line: &'static str,
    check: fn(&Node, &Output, &Context),
}

/// What the node looked like just before the line ran.
struct Context {
    reboots_before: usize,
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn succeeded_quietly(out: &Output) {
    assert!(out.status.success(), "exit {:?}", out.status.code());
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lines() -> Vec<Line> {
    vec![
        Line {
            source: "Q",
            line: "apiclient --help",
            check: |_, out, _| {
                assert!(out.status.success());
                assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: apiclient"));
            },
        },
        Line {
            source: "Q",
            line: "apiclient -u /settings",
            check: |node, out, _| {
                assert!(out.status.success());
                assert_eq!(stdout_json(out), node.settings());
            },
        },
        Line {
            source: "R",
            line: "apiclient set host-containers.admin.enabled=true",
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["host-containers"]["admin"]["enabled"], true);
            },
        },
        Line {
            source: "A",
            line: "apiclient get settings.host-containers.admin",
            check: |_, out, _| {
                assert!(out.status.success());
                let got = stdout_json(out);
                assert_eq!(got["settings"]["host-containers"]["admin"]["enabled"], true);
                assert_eq!(got["settings"].as_object().unwrap().len(), 1, "{got}");
            },
        },
        Line {
            source: "G",
            line: "apiclient set host-containers.control.enabled=true",
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["host-containers"]["control"]["enabled"], true);
            },
        },
        Line {
            source: "A",
            line: "apiclient set kernel.lockdown=integrity motd=\"hi there\"",
            check: |node, out, _| {
                succeeded_quietly(out);
                let settings = node.settings();
                assert_eq!(settings["kernel"]["lockdown"], "integrity");
                assert_eq!(settings["motd"], "hi there");
            },
        },
        Line {
            source: "A",
            line: "apiclient get settings.motd settings.kernel.lockdown",
            check: |_, out, _| {
                assert!(out.status.success());
                assert_eq!(
                    stdout_json(out),
                    json!({"settings": {"motd": "hi there", "kernel": {"lockdown": "integrity"}}})
                );
            },
        },
        Line {
            source: "A",
            line: "apiclient set 'kubernetes.node-labels.\"my.label\"=hello'",
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["kubernetes"]["node-labels"]["my.label"], "hello");
            },
        },
        Line {
            source: "A",
            line: r#"apiclient set --json '{"kernel": {"sysctl": {"vm.max_map_count": "262144", "user.max_user_namespaces": "16384"}}}'"#,
            check: |node, out, _| {
                succeeded_quietly(out);
                let sysctl = &node.settings()["kernel"]["sysctl"];
                assert_eq!(sysctl["vm.max_map_count"], "262144");
                assert_eq!(sysctl["user.max_user_namespaces"], "16384");
            },
        },
        Line {
            source: "A",
            line: r#"apiclient set --json '{"motd": "42"}'"#,
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["motd"], "42");
            },
        },
        Line {
            source: "R",
            line: "apiclient set motd=\"hi there\" kubernetes.node-labels.environment=test",
            check: |node, out, _| {
                succeeded_quietly(out);
                let settings = node.settings();
                assert_eq!(settings["motd"], "hi there");
                assert_eq!(settings["kubernetes"]["node-labels"]["environment"], "test");
            },
        },
        Line {
            source: "Q",
            line: "apiclient get settings.motd",
            check: |_, out, _| {
                assert!(out.status.success());
                assert_eq!(stdout_json(out), json!({"settings": {"motd": "hi there"}}));
            },
        },
        Line {
            source: "R",
            line: "apiclient get settings",
            check: |node, out, _| {
                assert!(out.status.success());
                assert_eq!(stdout_json(out), json!({"settings": node.settings()}));
            },
        },
        Line {
            source: "L",
            line: "apiclient set updates.version-lock=\"v1.20.0\" updates.ignore-waves=true",
            check: |node, out, _| {
                succeeded_quietly(out);
                let updates = &node.settings()["updates"];
                assert_eq!(updates["version-lock"], "v1.20.0");
                assert_eq!(updates["ignore-waves"], true);
            },
        },
        Line {
            source: "L",
            line: "apiclient set updates.version-lock=\"latest\" updates.ignore-waves=false",
            check: |node, out, _| {
                succeeded_quietly(out);
                let updates = &node.settings()["updates"];
                assert_eq!(updates["version-lock"], "latest");
                assert_eq!(updates["ignore-waves"], false);
            },
        },
        Line {
            source: "A",
            line: "apiclient raw -u /settings",
            check: |node, out, _| {
                assert!(out.status.success());
                assert_eq!(stdout_json(out), node.settings());
            },
        },
        Line {
            source: "A",
            line: r#"apiclient raw -m PATCH -u /settings -d '{"motd": "my own value!"}'"#,
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["motd"], "hi there", "staged, not committed");
            },
        },
        Line {
            source: "A",
            line: "apiclient raw -u /tx",
            check: |_, out, _| {
                assert!(out.status.success());
                let pending = stdout_json(out);
                let motd = pending.get("settings").unwrap_or(&pending)["motd"].clone();
                assert_eq!(motd, "my own value!", "{pending}");
            },
        },
        Line {
            source: "A",
            line: "apiclient raw -m POST -u /tx/commit_and_apply",
            check: |node, out, _| {
                assert!(out.status.success());
                assert_eq!(stdout_json(out), json!(["settings.motd"]));
                assert_eq!(node.settings()["motd"], "my own value!");
            },
        },
        Line {
            source: "U",
            line: "apiclient raw -u /actions/reboot -m POST",
            check: |node, out, before| {
                succeeded_quietly(out);
                assert_eq!(node.reboot_count(), before.reboots_before + 1);
            },
        },
        Line {
            source: "R",
            line: "apiclient reboot",
            check: |node, out, before| {
                succeeded_quietly(out);
                assert_eq!(node.reboot_count(), before.reboots_before + 1);
            },
        },
        Line {
            source: "O",
            line: "apiclient raw -u /os",
            check: |_, out, _| {
                assert!(out.status.success());
                let os = stdout_json(out);
                for field in ["arch", "build_id", "pretty_name", "variant_id", "version_id"] {
                    assert!(os[field].is_string(), "{field} in {os}");
                }
            },
        },
        Line {
            source: "U",
            line: "apiclient get /updates/status",
            check: |_, out, _| {
                assert!(out.status.success());
                let status = stdout_json(out);
                assert!(status["update_state"].is_string(), "{status}");
                assert!(status["available_updates"].is_array(), "{status}");
            },
        },
        Line {
            source: "O",
            line: "apiclient raw -u /updates/status",
            check: |_, out, _| {
                assert!(out.status.success());
                let status = stdout_json(out);
                assert!(status.get("most_recent_command").is_some(), "{status}");
            },
        },
        Line {
            source: "H",
            line: "apiclient apply \"file://$PWD/user-data.toml\"",
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["motd"], "from a file:// URI");
            },
        },
        Line {
            source: "H",
            line: "apiclient apply < stdin.toml",
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["motd"], "from stdin");
            },
        },
        Line {
            source: "H",
            line: "cat stdin-json.json | apiclient apply -",
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_eq!(node.settings()["motd"], "from JSON on stdin");
            },
        },
        Line {
            source: "H",
            line: "apiclient apply \"http://$HTTP_ADDR/user-data.toml\" \"file://$PWD/user-data.toml\"",
            check: |node, out, _| {
                succeeded_quietly(out);
                let settings = node.settings();
                assert_eq!(settings["motd"], "from a file:// URI", "applied in order");
                assert_eq!(settings["ntp"]["time-servers"], json!(["time.example.com"]));
            },
        },
        Line {
            source: "H",
            line: "apiclient get /settings",
            check: |node, out, _| {
                assert!(out.status.success());
                assert_eq!(stdout_json(out), node.settings());
            },
        },
        Line {
            source: "H",
            line: "apiclient -v raw -u /os",
            check: |_, out, _| {
                assert!(out.status.success());
                assert_eq!(String::from_utf8_lossy(&out.stderr), "200 OK\n");
                assert!(stdout_json(out)["version_id"].is_string());
            },
        },
        Line {
            source: "H",
            line: "apiclient --log-level debug -X GET --uri /os",
            check: |_, out, _| {
                assert!(out.status.success());
                assert_eq!(String::from_utf8_lossy(&out.stderr), "200 OK\n");
            },
        },
        Line {
            source: "H",
            line: "apiclient --socket-path \"$APICLIENT_SOCKET\" raw --method PATCH --uri '/settings?tx=FOO' --data '{\"motd\": \"from FOO\"}'",
            check: |node, out, _| {
                succeeded_quietly(out);
                assert_ne!(node.settings()["motd"], "from FOO");
            },
        },
        Line {
            source: "A",
            line: "apiclient raw -m POST -u '/tx/commit_and_apply?tx=FOO' -s \"$APICLIENT_SOCKET\"",
            check: |node, out, _| {
                assert!(out.status.success());
                assert_eq!(node.settings()["motd"], "from FOO");
            },
        },
        Line {
            source: "B",
            line: "apiclient report cis -l 2",
            check: |node, out, _| {
                assert_eq!(out.status.code(), Some(1));
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(stderr.contains("not available on Keel"), "{stderr}");
                assert_eq!(node.settings()["motd"], "from FOO");
            },
        },
        Line {
            source: "B",
            line: "apiclient ephemeral-storage bind --dirs /var/lib/containerd /var/lib/kubelet /var/log/pods",
            check: |_, out, _| {
                assert_eq!(out.status.code(), Some(1));
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(stderr.contains("not available on Keel"), "{stderr}");
            },
        },
    ]
}

/// Serves `body` to every GET, on a loopback port, until the test ends.
fn serve(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

fn start_node() -> Node {
    let work_dir = tempfile::tempdir().unwrap();
    let work = work_dir.path().to_owned();
    let reboots = work.join("reboots");
    let reboot = work.join("reboot.sh");
    std::fs::write(
        &reboot,
        format!("#!/bin/sh\necho reboot >> '{}'\n", reboots.display()),
    )
    .unwrap();
    std::fs::set_permissions(&reboot, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cwd = work.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(
        cwd.join("user-data.toml"),
        "[settings]\nmotd = \"from a file:// URI\"\n",
    )
    .unwrap();
    std::fs::write(
        cwd.join("stdin.toml"),
        "[settings]\nmotd = \"from stdin\"\n",
    )
    .unwrap();
    std::fs::write(
        cwd.join("stdin-json.json"),
        r#"{"settings": {"motd": "from JSON on stdin"}}"#,
    )
    .unwrap();
    let http_addr = serve(
        "[settings]\nmotd = \"from http\"\n[settings.ntp]\ntime-servers = [\"time.example.com\"]\n",
    );
    let keeld = Keeld::start_with(KeeldOptions {
        extra_args: vec!["--reboot-command".into(), reboot.display().to_string()],
        ..Default::default()
    });
    Node {
        keeld,
        _work: work_dir,
        cwd,
        reboots,
        http_addr,
    }
}

fn run_line(node: &Node, line: &str) -> Output {
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(&node.cwd)
        .env("PATH", path)
        .env("APICLIENT_SOCKET", &node.keeld.socket)
        .env("HTTP_ADDR", &node.http_addr)
        .env("PWD", &node.cwd)
        // The loopback web server must be reached directly.
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("NO_COLOR")
        .output()
        .unwrap()
}

#[test]
fn bottlerocket_command_lines_run_unchanged() {
    keel_e2e::bin("apiclient");
    let node = start_node();
    for Line {
        source,
        line,
        check,
    } in lines()
    {
        let context = Context {
            reboots_before: node.reboot_count(),
        };
        let out = run_line(&node, line);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(&node, &out, &context)
        }));
        if result.is_err() {
            panic!(
                "[{source}] `{line}` did not do what it does on Bottlerocket\n\
                 exit: {:?}\nstdout: {}\nstderr: {}\nkeeld log:\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                node.keeld.log()
            );
        }
    }
}

/// The parser accepts Bottlerocket's forms without a keeld: raw as the default
/// subcommand, global flags after the subcommand, `-X`, a URI argument to `get`.
#[test]
fn usage_errors_are_exit_2_and_name_the_problem() {
    let node_less = |args: &[&str]| {
        Command::new(keel_e2e::bin("apiclient"))
            .args(args)
            .env("APICLIENT_SOCKET", "/nonexistent/api.sock")
            .output()
            .unwrap()
    };
    for (args, needle) in [
        (&["-m", "POST"][..], "--uri"),
        (&[][..], "--uri"),
        (&["-u", "/os", "get"][..], "raw request"),
        (&["get", "/a", "/b"][..], "one URI"),
        (&["get", "/settings", "settings.motd"][..], "not both"),
        (
            &["-u", "/a", "raw", "-u", "/b"][..],
            "both before and after",
        ),
        (&["set"][..], "KEY=VALUE"),
    ] {
        let out = node_less(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // Parsed fine, then refused by the missing socket: exit 1, not a usage error.
    for args in [
        &["-u", "/os"][..],
        &["get", "settings", "-v"][..],
        &["-m", "POST", "-u", "/tx/commit", "raw"][..],
        &["raw", "-X", "PATCH", "-u", "/settings", "-d", "{}"][..],
        &["get", "/updates/status"][..],
        // [R], [A]: exec, whose own tests run it against a real container.
        &["exec", "admin", "bash"][..],
        &["exec", "admin", "cat", "/file"][..],
        &["exec", "-t", "admin", "bash"][..],
        &["exec", "--no-tty", "admin", "ls", "-s", "-v"][..],
        // [R], [M]: update, whose own tests run it against a real update repository.
        &["update", "check"][..],
        &["update", "apply"][..],
        &["update", "apply", "--check", "--reboot"][..],
        &["update", "apply", "-c", "-r"][..],
        &["update", "cancel"][..],
    ] {
        let out = node_less(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot connect"), "{args:?}: {stderr}");
    }
}
