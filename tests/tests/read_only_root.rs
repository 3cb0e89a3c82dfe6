//! The whole boot with keeld on a read-only root: a private mount namespace (`unshare
//! -m`) whose `/` and every other writable mount is read-only, except the state,
//! runtime and persistent directories and a tmpfs render root. User-data, the launch
//! commit, every rendered file, a bootstrap container, a host container, a later
//! commit and its apply must all work; a write anywhere else would fail with EROFS,
//! which the test looks for in keeld's log.
//!
//! Needs root, util-linux (unshare, nsenter), containerd, runc and busybox-static.

use std::process::Command;
use std::time::{Duration, Instant};

use keel_e2e::containerd::Containerd;
use keel_e2e::image::ImageBuilder;
use keel_e2e::{Keeld, KeeldOptions};

fn in_keeld_namespace(keeld: &Keeld, argv: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--mount=/proc/{}/ns/mnt", keeld.pid()))
        .arg("--")
        .args(argv)
        .output()
        .expect("nsenter")
}

#[test]
fn a_full_boot_on_a_read_only_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "needs root for mount namespaces"
    );
    let containerd = Containerd::start();
    let work = tempfile::tempdir().expect("tempdir");
    let setup = work.path().join("setup.tar");
    ImageBuilder::busybox()
        .cmd(&[
            "/bin/sh",
            "-c",
            "date > /.bottlerocket/bootstrap-containers/setup/ran",
        ])
        .write_oci_archive(&setup, "v1");
    let admin = work.path().join("admin.tar");
    ImageBuilder::busybox()
        .cmd(&["/bin/sh", "-c", "while :; do sleep 1; done"])
        .write_oci_archive(&admin, "v1");
    let user_data = work.path().join("user-data.toml");
    std::fs::write(
        &user_data,
        format!(
            r#"
[settings]
motd = "read-only root"
[settings.network]
hostname = "keel-ro"
[settings.bootstrap-containers.setup]
source = "oci-archive:{}"
mode = "once"
essential = true
[settings.host-containers.admin]
enabled = true
source = "oci-archive:{}"
user-data = "YWRtaW4="
"#,
            setup.display(),
            admin.display()
        ),
    )
    .expect("user-data");
    let keeld = Keeld::start_with(KeeldOptions {
        containerd: Some((
            containerd.socket().to_path_buf(),
            containerd.namespace().to_owned(),
        )),
        read_only_root: true,
        wait_for_boot: false,
        extra_args: vec![
            "--user-data-file".into(),
            user_data.display().to_string(),
            "--os-defaults".into(),
            keel_e2e::repo_root()
                .join("packaging/defaults.toml")
                .display()
                .to_string(),
        ],
        ..KeeldOptions::default()
    });

    // The namespace really is read-only outside keeld's directories.
    let probe = in_keeld_namespace(
        &keeld,
        &[
            "sh",
            "-c",
            "touch /var/keel-ro-probe || touch /tmp/keel-ro-probe",
        ],
    );
    assert!(
        !probe.status.success(),
        "the root must be read-only in keeld's namespace"
    );
    let _ = std::fs::remove_file("/var/keel-ro-probe");
    let _ = std::fs::remove_file("/tmp/keel-ro-probe");

    let record = keeld.wait_boot(Duration::from_secs(120));
    assert_eq!(
        record["phase"],
        "configured",
        "{record:#}\nlog:\n{}",
        keeld.log()
    );
    assert!(
        keeld
            .persistent_dir()
            .join("bootstrap-containers/setup/ran")
            .exists(),
        "the bootstrap container wrote into its persistent directory"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = keeld.raw("GET", "/containers?kind=host", None).json();
        if list.as_array().is_some_and(|l| {
            l.iter()
                .any(|c| c["name"] == "admin" && c["state"] == "running")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "admin not running: {list:#}\n{}",
            keeld.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Rendered files live on the tmpfs, visible only inside keeld's namespace.
    let render = keeld.render_root();
    let motd = in_keeld_namespace(
        &keeld,
        &["cat", &render.join("etc/motd").display().to_string()],
    );
    assert!(String::from_utf8_lossy(&motd.stdout).contains("read-only root"));
    let out = keeld.apiclient(&["set", "motd=changed on a read-only root"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let motd = in_keeld_namespace(
        &keeld,
        &["cat", &render.join("etc/motd").display().to_string()],
    );
    assert!(String::from_utf8_lossy(&motd.stdout).contains("changed on a read-only root"));
    assert!(
        !render.join("etc/motd").exists(),
        "the render root outside the namespace is untouched (it was a tmpfs inside)"
    );

    let log = keeld.log();
    for symptom in ["Read-only file system", "os error 30"] {
        assert!(
            !log.contains(symptom),
            "keeld tried to write outside its directories:\n{log}"
        );
    }
}
