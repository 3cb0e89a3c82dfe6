//! Multi-files: a configuration file rendered once per item of a settings list
//! (containerd's `certs.d/<registry>/hosts.toml` per registry mirror). Each item's file
//! appears under the render root, an unchanged one is left alone, the file and directory
//! of an item that is gone are removed, dry runs show the removal, and stale-file
//! cleanup never follows a symbolic link out of the render root.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use keel_e2e::Keeld;
use serde_json::{json, Value};

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const TWO_MIRRORS: &str = r#"{"container-registry": {"mirrors": [
    {"registry": "*", "endpoint": ["https://all.example.com"]},
    {"registry": "docker.io", "endpoint": ["https://mirror.example.com", "https://mirror2.example.com"]}
]}}"#;

const ONE_MIRROR: &str = r#"{"container-registry": {"mirrors": [
    {"registry": "docker.io", "endpoint": ["https://mirror.example.com", "https://mirror2.example.com"]}
]}}"#;

fn certs_d(keeld: &Keeld) -> PathBuf {
    keeld.render_root().join("etc/containerd/certs.d")
}

fn hosts_toml(keeld: &Keeld, dir: &str) -> toml::Table {
    let path = certs_d(keeld).join(dir).join("hosts.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; log:\n{}", path.display(), keeld.log()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("not TOML ({e}):\n{text}"))
}

fn host_names(doc: &toml::Table) -> Vec<String> {
    doc["host"].as_table().unwrap().keys().cloned().collect()
}

/// The files of the newest apply, by name.
fn last_apply_files(keeld: &Keeld) -> Vec<Value> {
    let log = keeld.apiclient_json(&["apply-log", "--limit", "1"]);
    log["applies"][0]["files"].as_array().unwrap().clone()
}

fn file<'a>(files: &'a [Value], name: &str) -> &'a Value {
    files
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {files:#?}"))
}

#[test]
fn one_hosts_toml_per_mirror_and_removed_mirrors_are_cleaned_up() {
    let keeld = Keeld::start();
    ok(&keeld.apiclient(&["set", "-j", TWO_MIRRORS]));

    let default = hosts_toml(&keeld, "_default");
    assert!(default.get("server").is_none(), "{default:?}");
    assert_eq!(host_names(&default), ["https://all.example.com"]);
    assert_eq!(
        default["host"]["https://all.example.com"]["capabilities"],
        toml::Value::Array(vec!["pull".into(), "resolve".into()])
    );
    let docker = hosts_toml(&keeld, "docker.io");
    assert_eq!(
        docker["server"].as_str(),
        Some("https://registry-1.docker.io")
    );
    let mut hosts = host_names(&docker);
    hosts.sort();
    assert_eq!(
        hosts,
        ["https://mirror.example.com", "https://mirror2.example.com"]
    );
    let files = last_apply_files(&keeld);
    assert_eq!(file(&files, "containerd-hosts[*]")["result"], "written");
    assert_eq!(
        file(&files, "containerd-hosts[*]")["path"],
        "/etc/containerd/certs.d/_default/hosts.toml"
    );
    assert_eq!(
        file(&files, "containerd-hosts[docker.io]")["result"],
        "written"
    );
    assert!(
        keeld.restarts().is_empty(),
        "containerd re-reads certs.d by itself: {:?}",
        keeld.restarts()
    );

    let docker_path = certs_d(&keeld).join("docker.io/hosts.toml");
    let before = std::fs::metadata(&docker_path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));

    // Down to one mirror: "*" is gone, with its directory; docker.io is untouched.
    ok(&keeld.apiclient(&["set", "-j", ONE_MIRROR]));
    assert!(
        !certs_d(&keeld).join("_default").exists(),
        "{:?}",
        std::fs::read_dir(certs_d(&keeld))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    let after = std::fs::metadata(&docker_path).unwrap();
    assert_eq!(
        (before.ino(), before.mtime(), before.mtime_nsec()),
        (after.ino(), after.mtime(), after.mtime_nsec())
    );
    let files = last_apply_files(&keeld);
    let removed = file(&files, "containerd-hosts[*]");
    assert_eq!(removed["result"], "removed");
    assert_eq!(
        removed["path"],
        "/etc/containerd/certs.d/_default/hosts.toml"
    );
    assert_eq!(
        file(&files, "containerd-hosts[docker.io]")["result"],
        "unchanged"
    );
    let log = keeld.apiclient_json(&["apply-log", "--limit", "1"]);
    assert_eq!(log["applies"][0]["success"], true);

    // No mirrors at all: the last file and the now-empty directory go too.
    ok(&keeld.apiclient(&["set", "-j", r#"{"container-registry": {"mirrors": []}}"#]));
    assert!(!certs_d(&keeld).join("docker.io").exists());
    assert_eq!(
        file(&last_apply_files(&keeld), "containerd-hosts[docker.io]")["result"],
        "removed"
    );
}

#[test]
fn dry_run_shows_a_removed_mirror_as_deleted() {
    let keeld = Keeld::start();
    ok(&keeld.apiclient(&["set", "-j", TWO_MIRRORS]));
    let out = keeld.apiclient(&["set", "--dry-run", "-j", ONE_MIRROR]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("--- a/etc/containerd/certs.d/_default/hosts.toml")
            && stdout.contains("+++ /dev/null")
            && stdout.contains("-[host.\"https://all.example.com\"]"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("docker.io/hosts.toml"),
        "unchanged files are not in the plan: {stdout}"
    );
    assert!(
        certs_d(&keeld).join("_default/hosts.toml").is_file(),
        "a dry run removes nothing"
    );

    // A new mirror shows up as an added file.
    let out = keeld.apiclient(&[
        "set",
        "--dry-run",
        "-j",
        r#"{"container-registry": {"mirrors": [{"registry": "quay.io", "endpoint": ["https://q.example.com"]}]}}"#,
    ]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("+++ b/etc/containerd/certs.d/quay.io/hosts.toml")
            && stdout.contains("+server = \"https://quay.io\""),
        "{stdout}"
    );
    assert!(!certs_d(&keeld).join("quay.io").exists());
}

#[test]
fn stale_cleanup_stays_inside_the_render_root() {
    let keeld = Keeld::start();
    ok(&keeld.apiclient(&["set", "-j", TWO_MIRRORS]));
    // A directory outside the render root, reachable through a symbolic link that looks
    // like a registry directory, and a file that is not this pattern's.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("hosts.toml"), "keep me\n").unwrap();
    std::os::unix::fs::symlink(outside.path(), certs_d(&keeld).join("evil.example")).unwrap();
    std::fs::write(certs_d(&keeld).join("docker.io/ca.crt"), "pem\n").unwrap();

    ok(&keeld.apiclient(&["set", "-j", r#"{"container-registry": {"mirrors": []}}"#]));
    assert_eq!(
        std::fs::read_to_string(outside.path().join("hosts.toml")).unwrap(),
        "keep me\n"
    );
    assert!(certs_d(&keeld).join("evil.example").is_symlink());
    // docker.io's hosts.toml is removed, but its directory holds another file and stays.
    assert!(!certs_d(&keeld).join("docker.io/hosts.toml").exists());
    assert!(certs_d(&keeld).join("docker.io/ca.crt").is_file());
    assert!(!certs_d(&keeld).join("_default").exists());
    let files = last_apply_files(&keeld);
    assert!(
        files
            .iter()
            .all(|f| f["name"] != "containerd-hosts[evil.example]"),
        "{files:#?}"
    );
}

#[test]
fn configuration_files_answer_includes_for_each() {
    let keeld = Keeld::start();
    let files = keeld
        .raw("GET", "/configuration-files?names=containerd-hosts", None)
        .json();
    assert_eq!(
        files,
        json!({"containerd-hosts": {
            "path": "/etc/containerd/certs.d/{item}/hosts.toml",
            "template-path": "containerd-hosts",
            "mode": "0644",
            "for-each": "settings.container-registry.mirrors",
            "item-name": "registry"
        }})
    );
}
