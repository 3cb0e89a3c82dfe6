//! Secrets in settings (registry passwords, identity tokens, registry auth, bootstrap
//! tokens) never leave keeld except through the settings API and the 0600 files that
//! need them: not in its log, not in `GET /boot`, `/history` or `/apply/log`, and not in
//! any file it writes that someone other than root could read. Checked with valid
//! secrets committed through the API, and with malformed ones in user-data (whose
//! refusal becomes the boot's failure reason).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use keel_e2e::{Keeld, KeeldOptions};

/// Every file under `dir` that a user other than the owner could read, with its text.
fn readable_by_others(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && meta.mode() & 0o044 != 0 {
                let text =
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
                out.push((path.display().to_string(), text));
            }
        }
    }
    out
}

fn assert_nowhere(keeld: &Keeld, secrets: &[&str]) {
    let mut places: Vec<(String, String)> = vec![
        ("keeld's log".to_owned(), keeld.log()),
        (
            "GET /boot".to_owned(),
            keeld.raw("GET", "/boot", None).text(),
        ),
        (
            "GET /history".to_owned(),
            keeld.raw("GET", "/history", None).text(),
        ),
        (
            "GET /apply/log".to_owned(),
            keeld.raw("GET", "/apply/log", None).text(),
        ),
    ];
    for dir in [
        keeld.state_dir.clone(),
        keeld.runtime_dir(),
        keeld.render_root(),
        keeld.persistent_dir(),
    ] {
        places.extend(readable_by_others(&dir));
    }
    for (place, text) in &places {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{secret:?} found in {place}:\n{}",
                text.lines()
                    .filter(|l| l.contains(secret))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

#[test]
fn committed_secrets_stay_in_the_settings_and_0600_files() {
    let keeld = Keeld::start();
    let auth = "dXNlcjpodW50ZXIyLUFVVEgtU0VDUkVU"; // user:hunter2-AUTH-SECRET
    let patch = serde_json::json!({
        "container-registry": {"credentials": [
            {"registry": "registry.example.com", "username": "u",
             "password": "hunter2-PASSWORD-SECRET"},
            {"registry": "other.example.com", "identitytoken": "hunter2-IDTOKEN-SECRET"},
            {"registry": "third.example.com", "auth": auth}
        ]},
        "kubernetes": {"bootstrap-token": "abcdef.hunter2secret000"}
    });
    let r = keeld.raw(
        "PATCH",
        "/settings?tx=s",
        Some(patch.to_string().as_bytes()),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = keeld.raw("POST", "/tx/commit_and_apply?tx=s", None);
    assert_eq!(r.status, 200, "{}", r.text());
    // The settings API itself serves them (callers are root or the API group).
    assert!(keeld
        .raw("GET", "/settings", None)
        .text()
        .contains("hunter2-PASSWORD-SECRET"));
    assert_nowhere(
        &keeld,
        &[
            "hunter2-PASSWORD-SECRET",
            "hunter2-IDTOKEN-SECRET",
            auth,
            "hunter2-AUTH-SECRET",
            "hunter2secret000",
        ],
    );
}

#[test]
fn malformed_secrets_in_user_data_are_refused_without_being_echoed() {
    for (field, value, secret) in [
        (
            "[[settings.container-registry.credentials]]\nregistry = \"r.example.com\"\nauth",
            "hunter2-TOPSECRET!!!",
            "hunter2-TOPSECRET",
        ),
        (
            "[settings.kubernetes]\nbootstrap-token",
            "hunter2.TOPSECRET-not-a-token",
            "TOPSECRET",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let user_data = dir.path().join("user-data.toml");
        std::fs::write(&user_data, format!("{field} = \"{value}\"\n")).unwrap();
        let keeld = Keeld::start_with(KeeldOptions {
            wait_for_boot: false,
            extra_args: vec![
                "--user-data-providers".to_owned(),
                "file".to_owned(),
                "--user-data-file".to_owned(),
                user_data.display().to_string(),
            ],
            ..KeeldOptions::default()
        });
        let record = keeld.wait_boot(std::time::Duration::from_secs(30));
        assert_eq!(record["phase"], "failed", "{record:#}");
        let reason = record["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("redacted"), "{reason}");
        assert_nowhere(&keeld, &[secret]);
    }
}
