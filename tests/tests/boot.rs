//! The boot end to end: user-data from local files and a loopback IMDSv2 server, OS
//! defaults, bootstrap commands and containers (real containerd), `once` → `off`,
//! `always` again on the next boot, essential and non-essential failures, time-outs,
//! keeld killed mid-boot, invalid user-data.
//!
//! Needs root, containerd, runc and busybox-static (CI installs them).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_e2e::containerd::Containerd;
use keel_e2e::image::ImageBuilder;
use keel_e2e::{Keeld, KeeldOptions};
use serde_json::{json, Value};

fn require_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "these tests run containers and need root"
    );
}

struct Node {
    keeld: Keeld,
    containerd: Containerd,
    work: tempfile::TempDir,
}

impl Node {
    /// keeld on a private containerd, reading user-data from `user_data` (TOML).
    fn boot(user_data: &str, extra: &[&str]) -> Node {
        Self::boot_with_defaults(user_data, None, extra)
    }

    /// Like [`Node::boot`], with OS defaults.
    fn boot_with_defaults(user_data: &str, os_defaults: Option<&str>, extra: &[&str]) -> Node {
        let containerd = Containerd::start();
        let work = tempfile::tempdir().expect("tempdir");
        std::fs::write(work.path().join("user-data.toml"), user_data).expect("user-data");
        if let Some(defaults) = os_defaults {
            std::fs::write(work.path().join("os-defaults.toml"), defaults).expect("os defaults");
        }
        let mut args: Vec<String> = vec![
            "--user-data-file".into(),
            work.path().join("user-data.toml").display().to_string(),
            "--user-data-defaults".into(),
            work.path()
                .join("absent-defaults.toml")
                .display()
                .to_string(),
            "--user-data-overrides".into(),
            work.path().join("overrides.toml").display().to_string(),
            "--os-defaults".into(),
            work.path().join("os-defaults.toml").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let keeld = Keeld::start_with(KeeldOptions {
            containerd: Some((
                containerd.socket().to_path_buf(),
                containerd.namespace().to_owned(),
            )),
            extra_args: args,
            wait_for_boot: false,
            ..KeeldOptions::default()
        });
        Node {
            keeld,
            containerd,
            work,
        }
    }

    fn wait_boot(&self) -> Value {
        self.keeld.wait_boot(Duration::from_secs(90))
    }

    fn bootstrap_dir(&self, name: &str) -> PathBuf {
        self.keeld
            .persistent_dir()
            .join("bootstrap-containers")
            .join(name)
    }

    fn settings(&self) -> Value {
        self.keeld.raw("GET", "/settings", None).json()
    }

    fn step<'a>(record: &'a Value, name: &str) -> &'a Value {
        record["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["name"] == name))
            .unwrap_or(&Value::Null)
    }
}

/// A busybox archive running `sh -c <script>`.
fn image(dir: &Path, name: &str, script: &str) -> String {
    let path = dir.join(format!("{name}.tar"));
    ImageBuilder::busybox()
        .cmd(&["/bin/sh", "-c", script])
        .write_oci_archive(&path, "v1");
    format!("oci-archive:{}", path.display())
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

const PROBE: &str = r#"
p=/.bottlerocket/bootstrap-containers/setup
{
  echo "caps=$(grep '^CapEff:' /proc/self/status | cut -f2)"
  echo "seccomp=$(grep '^Seccomp:' /proc/self/status | cut -f2)"
  echo "nnp=$(grep '^NoNewPrivs:' /proc/self/status | cut -f2)"
  echo "user_data=$(cat $p/user-data)"
} > $p/report
echo ran >> $p/runs
"#;

/// The happy path across two boots: defaults and user-data staged and committed, a
/// bootstrap command and a `once` essential bootstrap container (bootstrap tier, seen
/// from inside) run and are switched off in committed transactions, an `always` one
/// runs at every boot, host containers start once configured; the second boot runs no
/// provider and no `once` item again.
#[test]
fn first_boot_then_second_boot() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = image(dir.path(), "setup", PROBE);
    let every = image(
        dir.path(),
        "every",
        "echo boot >> /.bottlerocket/bootstrap-containers/every/runs",
    );
    let admin = image(dir.path(), "admin", "while :; do sleep 1; done");
    let user_data = format!(
        r#"
[settings]
motd = "from user-data"

[settings.bootstrap-commands.10-greeting]
commands = [["apiclient", "set", "kernel.sysctl.\"net.core.somaxconn\"=1024"]]
mode = "once"
essential = true

[settings.bootstrap-containers.setup]
source = "{setup}"
mode = "once"
essential = true
user-data = "c2V0dXAtZGF0YQ=="

[settings.bootstrap-containers.every]
source = "{every}"
mode = "always"

[settings.host-containers.admin]
enabled = true
source = "{admin}"
"#
    );
    let mut node = Node::boot_with_defaults(
        &user_data,
        Some(
            "[settings]\nmotd = \"os default\"\n[settings.ntp]\ntime-servers = [\"ntp.example\"]\n",
        ),
        &[],
    );

    let record = node.wait_boot();
    assert_eq!(
        record["phase"],
        "configured",
        "{record:#}\n{}",
        node.keeld.log()
    );
    assert_eq!(record["first-boot"], true);
    for step in [
        "os-defaults",
        "user-data:file",
        "commit",
        "render",
        "bootstrap-command:10-greeting",
        "bootstrap-container:setup",
        "bootstrap-container:every",
    ] {
        assert_eq!(
            Node::step(&record, step)["outcome"],
            "succeeded",
            "{step}: {record:#}"
        );
    }
    assert_eq!(
        Node::step(&record, "user-data:defaults")["outcome"],
        "skipped"
    );

    let settings = node.settings();
    assert_eq!(
        settings["motd"], "from user-data",
        "user-data overrides OS defaults"
    );
    assert_eq!(
        settings["ntp"]["time-servers"],
        json!(["ntp.example"]),
        "OS default kept"
    );
    assert_eq!(
        settings["kernel"]["sysctl"]["net.core.somaxconn"], "1024",
        "bootstrap command ran"
    );
    assert_eq!(settings["bootstrap-commands"]["10-greeting"]["mode"], "off");
    assert_eq!(settings["bootstrap-containers"]["setup"]["mode"], "off");
    assert_eq!(settings["bootstrap-containers"]["every"]["mode"], "always");
    let history = node.keeld.raw("GET", "/history", None).json();
    let txs: Vec<String> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["tx"].as_str().map(str::to_owned))
        .collect();
    for tx in [
        "launch",
        "boot-bootstrap-containers-setup",
        "boot-bootstrap-commands-10-greeting",
    ] {
        assert!(txs.iter().any(|t| t == tx), "{tx} in history: {txs:?}");
    }

    // Bootstrap tier, from inside: default 14 + SYS_ADMIN, NET_ADMIN, SYS_MODULE,
    // AUDIT_CONTROL; seccomp filter; no_new_privs.
    let report =
        std::fs::read_to_string(node.bootstrap_dir("setup").join("report")).expect("report");
    assert!(report.contains("caps=00000000e82535fb"), "{report}");
    assert!(
        report.contains("seccomp=2") && report.contains("nnp=1"),
        "{report}"
    );
    assert!(report.contains("user_data=setup-data"), "{report}");
    assert_eq!(lines(&node.bootstrap_dir("setup").join("runs")), 1);
    assert_eq!(lines(&node.bootstrap_dir("every").join("runs")), 1);

    // Host containers start only now.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = node.keeld.raw("GET", "/containers", None).json();
        let admin = list
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "admin").cloned());
        if admin.as_ref().is_some_and(|a| a["state"] == "running") {
            break;
        }
        assert!(Instant::now() < deadline, "admin never ran: {list:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let list = node
        .keeld
        .raw("GET", "/containers?kind=bootstrap", None)
        .json();
    assert!(
        list.as_array().is_some_and(|l| l
            .iter()
            .any(|c| c["name"] == "setup" && c["state"] == "succeeded")),
        "{list:#}"
    );

    // Second boot: new user-data must not be read again; `always` runs again, the
    // switched-off `once` items do not.
    std::fs::write(
        node.work.path().join("user-data.toml"),
        "[settings]\nmotd = \"second boot\"\n",
    )
    .expect("user-data");
    node.keeld.reboot();
    let record = node.wait_boot();
    assert_eq!(record["phase"], "configured", "{record:#}");
    assert_eq!(record["first-boot"], false);
    assert!(
        Node::step(&record, "user-data:file").is_null(),
        "{record:#}"
    );
    assert_eq!(
        Node::step(&record, "bootstrap-container:setup")["outcome"],
        "skipped"
    );
    assert_eq!(node.settings()["motd"], "from user-data");
    assert_eq!(lines(&node.bootstrap_dir("setup").join("runs")), 1);
    assert_eq!(lines(&node.bootstrap_dir("every").join("runs")), 2);

    // A plain keeld restart in the same boot re-runs nothing.
    node.keeld.kill();
    node.keeld.spawn();
    let again = node.wait_boot();
    assert_eq!(again["boot-id"], record["boot-id"]);
    assert_eq!(lines(&node.bootstrap_dir("every").join("runs")), 2);
    drop(node.containerd);
}

/// A non-essential failure is recorded and the boot goes on; an essential failure
/// halts the boot with the reason, host containers never start, the API stays up and
/// `apiclient boot wait` exits 1 with the reason. A failed `once` stays `once`.
#[test]
fn essential_failure_halts_the_boot() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let fails = image(dir.path(), "fails", "echo failing; exit 3");
    let admin = image(dir.path(), "admin", "while :; do sleep 1; done");
    let user_data = format!(
        r#"
[settings.bootstrap-containers.a-optional]
source = "{fails}"
mode = "once"
[settings.bootstrap-containers.b-essential]
source = "{fails}"
mode = "once"
essential = true
[settings.bootstrap-containers.c-never]
source = "{fails}"
mode = "always"
[settings.host-containers.admin]
enabled = true
source = "{admin}"
"#
    );
    let node = Node::boot(&user_data, &[]);
    let record = node.wait_boot();
    assert_eq!(record["phase"], "failed", "{record:#}");
    let reason = record["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("b-essential") && reason.contains("exited 3"),
        "{reason}"
    );
    assert_eq!(
        Node::step(&record, "bootstrap-container:a-optional")["outcome"],
        "failed"
    );
    assert!(
        Node::step(&record, "bootstrap-container:c-never").is_null(),
        "boot halted before c"
    );
    let settings = node.settings();
    assert_eq!(
        settings["bootstrap-containers"]["a-optional"]["mode"],
        "once"
    );
    assert_eq!(
        settings["bootstrap-containers"]["b-essential"]["mode"],
        "once"
    );

    let wait = node.keeld.apiclient(&["boot", "wait", "--timeout", "10s"]);
    assert_eq!(wait.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wait.stderr);
    assert!(
        stderr.contains("boot failed") && stderr.contains("b-essential"),
        "{stderr}"
    );
    // The host-container reconciler has seen the failure and stopped for this boot:
    // once it says so, nothing can start the admin container any more.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let hosts = loop {
        let hosts = node.keeld.raw("GET", "/containers?kind=host", None).json();
        if hosts[0]["state"] == "not-started" {
            break hosts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the admin container is not reported as not started: {hosts:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts:#}");
    assert_eq!(hosts[0]["name"], "admin");
    assert!(
        hosts[0].get("pid").is_none(),
        "no host container after a failed boot: {hosts:#}"
    );
    assert!(
        hosts[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("boot failed"),
        "{hosts:#}"
    );
    let status = node.keeld.apiclient(&["boot", "status"]);
    assert_eq!(status.status.code(), Some(0));
}

/// A bootstrap container past its timeout is killed and, being essential, fails the
/// boot; a bootstrap command that is not apiclient never gets past validation.
#[test]
fn a_timed_out_bootstrap_container_is_killed() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let hangs = image(dir.path(), "hangs", "sleep 1000");
    let user_data = format!(
        r#"
[settings.bootstrap-containers.hangs]
source = "{hangs}"
mode = "always"
essential = true
timeout = "1s"
"#
    );
    let started = Instant::now();
    let node = Node::boot(&user_data, &[]);
    let record = node.wait_boot();
    assert_eq!(record["phase"], "failed", "{record:#}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("timed out after 1s")),
        "{record:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let tasks = node.containerd.ctr_ok(&["tasks", "ls"]);
    assert!(
        !tasks.contains("bootstrap-hangs"),
        "killed and removed: {tasks}"
    );
}

/// keeld SIGKILLed while a bootstrap container runs: the restarted keeld waits for that
/// same container instead of starting it again, then finishes the boot.
#[test]
fn keeld_killed_mid_boot_resumes_without_running_anything_twice() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let slow = image(
        dir.path(),
        "slow",
        "echo start >> /.bottlerocket/bootstrap-containers/slow/runs; sleep 3; echo end >> /.bottlerocket/bootstrap-containers/slow/runs",
    );
    let user_data = format!(
        r#"
[settings.bootstrap-containers.slow]
source = "{slow}"
mode = "once"
essential = true
"#
    );
    let mut node = Node::boot(&user_data, &[]);
    let runs = node.bootstrap_dir("slow").join("runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines(&runs) == 0 {
        assert!(
            Instant::now() < deadline,
            "never started: {}",
            node.keeld.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    node.keeld.kill();
    node.keeld.spawn();
    let record = node.wait_boot();
    assert_eq!(
        record["phase"],
        "configured",
        "{record:#}\n{}",
        node.keeld.log()
    );
    let text = std::fs::read_to_string(&runs).expect("runs");
    assert_eq!(text, "start\nend\n", "ran exactly once, to its end");
    assert_eq!(
        node.settings()["bootstrap-containers"]["slow"]["mode"],
        "off"
    );
}

/// User-data that is not TOML fails the boot naming the source and the line; settings
/// that are invalid name the source and the key. Nothing from the user-data is
/// committed, but the OS defaults are, and the host container they enable runs, so an
/// operator can get in; no bootstrap container runs and the boot stays `failed`.
#[test]
fn invalid_user_data_fails_the_boot_with_source_line_and_key() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let control = image(dir.path(), "control", "while :; do sleep 1; done");
    let runs = image(
        dir.path(),
        "runs",
        "echo ran >> /.bottlerocket/bootstrap-containers/never/runs",
    );
    let defaults = format!(
        "[settings]\nmotd = \"from the OS defaults\"\n[settings.host-containers.control]\nenabled = true\nsource = \"{control}\"\n"
    );
    let node = Node::boot_with_defaults(
        &format!(
            "[settings]\nmotd = \"fine\"\n[settings.bootstrap-containers.never]\nsource = \"{runs}\"\nmode = \"once\"\n[settings.ntp]\ntime-servers = [1, }}\n"
        ),
        Some(&defaults),
        &[],
    );
    let record = node.wait_boot();
    assert_eq!(record["phase"], "failed", "{record:#}");
    assert_eq!(record["defaults-only"], true, "{record:#}");
    let reason = record["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("user-data.toml") && reason.contains("line 7"),
        "{reason}"
    );
    let settings = node.settings();
    assert_eq!(settings["motd"], "from the OS defaults", "{settings:#}");
    assert!(
        settings.get("bootstrap-containers").is_none(),
        "{settings:#}"
    );
    let motd =
        std::fs::read_to_string(node.keeld.render_root().join("etc/motd")).unwrap_or_default();
    assert!(
        motd.contains("from the OS defaults"),
        "rendered from the defaults: {motd:?}"
    );
    // The control container from the defaults comes up.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = node.keeld.raw("GET", "/containers?kind=host", None).json();
        if hosts[0]["name"] == "control" && hosts[0]["state"] == "running" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "control not running after a refused user-data: {hosts:#}\n{}",
            node.keeld.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!node.bootstrap_dir("never").join("runs").exists());
    // `apiclient boot status` says what to fix.
    let status = node.keeld.apiclient(&["boot", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("user-data.toml") && text.contains("line 7"),
        "{text}"
    );

    let node = Node::boot("[settings.host-containers.admin]\nenabled = \"yes\"\n", &[]);
    let record = node.wait_boot();
    assert_eq!(record["phase"], "failed");
    let reason = record["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("user-data.toml")
            && reason.contains("settings.host-containers.admin.enabled"),
        "{reason}"
    );
}

/// A loopback IMDSv2 server for the provider: token first, gzip user-data.
struct Imds {
    addr: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Imds {
    fn start(user_data: Vec<u8>) -> Imds {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut buf = vec![0u8; 8192];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let first = head.lines().next().unwrap_or_default().to_owned();
                seen.lock().expect("lock").push(first.clone());
                let lower = head.to_ascii_lowercase();
                let (status, body): (&str, Vec<u8>) = if first.starts_with("PUT /latest/api/token")
                    && lower.contains("x-aws-ec2-metadata-token-ttl-seconds:")
                {
                    ("200 OK", b"token-1".to_vec())
                } else if first.starts_with("GET /latest/user-data") {
                    if lower.contains("x-aws-ec2-metadata-token: token-1") {
                        ("200 OK", user_data.clone())
                    } else {
                        ("401 Unauthorized", Vec::new())
                    }
                } else {
                    ("400 Bad Request", Vec::new())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            }
        });
        Imds { addr, requests }
    }
}

/// The IMDS provider in a real boot: gzip-compressed user-data fetched with a token.
#[test]
fn user_data_from_imds() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"[settings]\nmotd = \"from imds\"\n")
        .expect("gzip");
    let imds = Imds::start(gz.finish().expect("gzip"));
    let endpoint = format!("http://{}", imds.addr);
    let node = Node::boot(
        "",
        &[
            "--user-data-providers",
            "imds,file",
            "--imds-endpoint",
            &endpoint,
            "--imds-timeout",
            "20s",
        ],
    );
    let record = node.wait_boot();
    assert_eq!(record["phase"], "configured", "{record:#}");
    assert_eq!(
        Node::step(&record, "user-data:imds")["outcome"],
        "succeeded"
    );
    assert_eq!(node.settings()["motd"], "from imds");
    let requests = imds.requests.lock().expect("lock").clone();
    assert!(
        requests[0].starts_with("PUT /latest/api/token"),
        "{requests:?}"
    );
}
