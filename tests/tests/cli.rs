//! The real apiclient binary against the real keeld: set, get, apply, unset, history,
//! rollback, exit codes and error texts.

#![allow(clippy::unwrap_used)]

use keel_e2e::Keeld;
use serde_json::json;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn set_get_unset_typed_by_the_model() {
    let keeld = Keeld::start();
    let out = keeld.apiclient(&[
        "set",
        "motd=42",
        "kernel.sysctl.\"vm.max_map_count\"=262144",
        "settings.host-containers.admin.enabled=true",
        "kubernetes.max-pods=110",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = keeld.apiclient_json(&[
        "get",
        "settings.motd",
        "settings.kernel",
        "settings.host-containers",
        "settings.kubernetes",
    ]);
    assert_eq!(
        got,
        json!({"settings": {
            "motd": "42",
            "kernel": {"sysctl": {"vm.max_map_count": "262144"}},
            "host-containers": {"admin": {"enabled": true}},
            "kubernetes": {"max-pods": 110}
        }})
    );
    // Removal, which Bottlerocket cannot do.
    let out = keeld.apiclient(&["unset", "kernel.sysctl.\"vm.max_map_count\"", "motd"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = keeld.apiclient_json(&["get", "settings"]);
    assert_eq!(got["settings"].get("motd"), None);
    assert_eq!(got["settings"]["kubernetes"]["max-pods"], 110);
}

#[test]
fn set_json_and_apply_sources_in_one_transaction() {
    let keeld = Keeld::start();
    let out = keeld.apiclient(&[
        "set",
        "-j",
        r#"{"ntp": {"time-servers": ["time.example.com"]}}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let toml_path = keeld.dir.path().join("a.toml");
    std::fs::write(
        &toml_path,
        "[settings]\nmotd = \"from toml\"\n[settings.dns]\nname-servers = [\"10.0.0.2\"]\n",
    )
    .unwrap();
    let json_path = keeld.dir.path().join("b.json");
    std::fs::write(
        &json_path,
        r#"{"settings": {"network": {"hostname": "node-1"}}}"#,
    )
    .unwrap();
    let file_uri = format!("file://{}", json_path.display());
    let out = keeld.apiclient_with_stdin(
        &["apply", toml_path.to_str().unwrap(), &file_uri, "-"],
        Some("[settings.kernel.sysctl]\n\"net.core.somaxconn\" = \"1024\"\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = keeld.apiclient_json(&["get", "settings"])["settings"].clone();
    assert_eq!(s["motd"], "from toml");
    assert_eq!(s["dns"]["name-servers"], json!(["10.0.0.2"]));
    assert_eq!(s["network"]["hostname"], "node-1");
    assert_eq!(s["kernel"]["sysctl"]["net.core.somaxconn"], "1024");
    assert_eq!(s["ntp"]["time-servers"], json!(["time.example.com"]));
    // All three sources were one transaction: one generation.
    let history = keeld.apiclient_json(&["history"]);
    let apply_gens = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["tx"].as_str().unwrap().starts_with("apiclient-apply-"))
        .count();
    assert_eq!(apply_gens, 1, "{history:#}");
}

#[test]
fn bad_apply_source_changes_nothing_and_names_the_line() {
    let keeld = Keeld::start();
    keeld.apiclient(&["set", "motd=kept"]);
    let before = keeld.live_bytes();
    let path = keeld.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[settings]\nmotd = \"x\"\n[settings]\nmotd = \"y\"\n",
    )
    .unwrap();
    let out = keeld.apiclient(&["apply", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 3"), "{}", stderr(&out));
    let path = keeld.dir.path().join("bad-key.toml");
    std::fs::write(
        &path,
        "[settings.host-containers.admin]\nsource = \"MY-CONTAINER-URI\"\n",
    )
    .unwrap();
    let out = keeld.apiclient(&["apply", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("settings.host-containers.admin.source"),
        "{}",
        stderr(&out)
    );
    assert_eq!(keeld.live_bytes(), before);
    assert_eq!(
        keeld.raw("GET", "/tx/list", None).json(),
        json!([]),
        "failed transactions are discarded"
    );
}

#[test]
fn history_records_the_caller_and_rollback_restores() {
    let keeld = Keeld::start();
    keeld.apiclient(&["set", "motd=one"]);
    keeld.apiclient(&["set", "motd=two"]);
    let history = keeld.apiclient_json(&["history"]);
    let newest = &history[0];
    assert_eq!(newest["generation"], 2);
    assert_eq!(newest["changed-keys"], json!(["settings.motd"]));
    assert_eq!(newest["caller"]["uid"], 0);
    assert_eq!(newest["caller"]["comm"], "apiclient");
    assert!(newest["tx"].as_str().unwrap().starts_with("apiclient-set-"));
    let changed = keeld.apiclient_json(&["rollback", "1"]);
    assert_eq!(changed, json!(["settings.motd"]));
    assert_eq!(
        keeld.apiclient_json(&["get", "settings.motd"]),
        json!({"settings": {"motd": "one"}})
    );
    let history = keeld.apiclient_json(&["history", "--limit", "1"]);
    assert_eq!(history[0]["generation"], 3);
    assert_eq!(history[0]["rollback-of"], 1);
}

#[test]
fn exit_codes_and_error_text() {
    let keeld = Keeld::start();
    let out = keeld.apiclient(&["raw", "-u", "/nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("Status 404 when GETing /nope: "),
        "{}",
        stderr(&out)
    );
    let out = keeld.apiclient(&["set", "kubernetes.max-pods=abc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Status 400 when PATCHing"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("settings.kubernetes.max-pods"),
        "{}",
        stderr(&out)
    );
    let out = keeld.apiclient(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
    let out = keeld.apiclient(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let out = keeld.apiclient(&["rollback", "not-a-number"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keeld_restart_keeps_settings_and_pending_transactions() {
    let mut keeld = Keeld::start();
    keeld.apiclient(&["set", "motd=durable"]);
    let r = keeld.raw(
        "PATCH",
        "/settings?tx=later",
        Some(br#"{"ntp": {"time-servers": ["a.example"]}}"#),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(keeld.stop().success(), "clean exit on SIGTERM");
    keeld.spawn();
    assert_eq!(
        keeld.apiclient_json(&["get", "settings.motd"]),
        json!({"settings": {"motd": "durable"}})
    );
    assert_eq!(keeld.raw("GET", "/tx/list", None).json(), json!(["later"]));
    let r = keeld.raw("POST", "/tx/commit?tx=later", None);
    assert_eq!(r.json(), json!(["settings.ntp.time-servers"]));
}

#[test]
fn schema_describes_the_model() {
    let keeld = Keeld::start();
    let schema = keeld.apiclient_json(&["schema"]);
    let text = schema.to_string();
    for group in [
        "motd",
        "host-containers",
        "bootstrap-containers",
        "kubernetes",
        "container-registry",
        "pki",
    ] {
        assert!(text.contains(group), "schema lacks {group}");
    }
}

#[test]
fn a_clean_stop_removes_the_socket() {
    let mut keeld = Keeld::start();
    assert!(keeld.socket.exists());
    assert!(keeld.stop().success());
    assert!(!keeld.socket.exists(), "the socket is removed on SIGTERM");
}

/// Every command that prints records takes `-o json|table|yaml`: the YAML reads back as
/// the JSON, and the table is text for people (not JSON), against a real keeld.
#[test]
fn record_commands_print_json_table_and_yaml() {
    let keeld = Keeld::start();
    let out = keeld.apiclient(&["set", "motd=records"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for command in [
        &["history", "--limit", "2"][..],
        &["apply-log", "--limit", "1"][..],
        &["boot", "status"][..],
        &["containers"][..],
        &["set", "--dry-run", "motd=other"][..],
        &["unset", "--dry-run", "motd"][..],
    ] {
        let with = |format: &str| {
            let mut args = command.to_vec();
            args.extend(["-o", format]);
            let out = keeld.apiclient(&args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
            String::from_utf8(out.stdout).unwrap()
        };
        let mut json: serde_json::Value = serde_json::from_str(&with("json")).unwrap();
        let mut yaml: serde_json::Value = serde_norway::from_str(&with("yaml")).unwrap();
        // A dry run's transaction has a fresh name each time.
        for value in [&mut json, &mut yaml] {
            if let Some(record) = value.as_object_mut() {
                record.remove("tx");
            }
        }
        assert_eq!(yaml, json, "{command:?}");
        let table = with("table");
        assert!(
            serde_json::from_str::<serde_json::Value>(&table).is_err() && !table.is_empty(),
            "{command:?}: {table}"
        );
    }
    // The tables say what the records say.
    let history = String::from_utf8(keeld.apiclient(&["history", "-o", "table"]).stdout).unwrap();
    assert!(history.starts_with("GEN "), "{history}");
    assert!(history.contains("settings.motd"), "{history}");
    let boot =
        String::from_utf8(keeld.apiclient(&["boot", "status", "-o", "table"]).stdout).unwrap();
    assert!(boot.starts_with("phase: configured"), "{boot}");
    let dry = String::from_utf8(
        keeld
            .apiclient(&["set", "--dry-run", "motd=other", "-o", "table"])
            .stdout,
    )
    .unwrap();
    assert!(
        dry.contains("~ settings.motd: \"records\" → \"other\""),
        "{dry}"
    );
    // A rollback's changed keys, as YAML and as a table.
    let generation = |n: usize| {
        let history = keeld.apiclient(&["history"]);
        let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
        history[n]["generation"].as_u64().unwrap().to_string()
    };
    let before = generation(1);
    let out = keeld.apiclient(&["rollback", &before, "-o", "yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let changed: serde_json::Value = serde_norway::from_slice(&out.stdout).unwrap();
    assert_eq!(changed, serde_json::json!(["settings.motd"]));
    let out = keeld.apiclient(&["rollback", &generation(1), "-o", "table"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "CHANGED\nsettings.motd\n"
    );
}

/// Command lines that are wrong in ways clap cannot see exit 2 (usage), as clap's own
/// errors do, before anything reaches keeld.
#[test]
fn command_line_mistakes_are_usage_errors() {
    for (args, says) in [
        (
            &["apply", "-", "-"][..],
            "stdin (`-`) can be given only once",
        ),
        (&["unset", "settings"][..], "name a key below `settings`"),
        (
            &["set", "-j", r#"{"settings":1}"#][..],
            "`settings` must be a JSON object",
        ),
        (
            &["set", "-j", r#"{"settings":{"motd":"a"},"motd":"b"}"#][..],
            "is given both inside and beside",
        ),
    ] {
        let out = std::process::Command::new(keel_e2e::bin("apiclient"))
            .args(["--socket-path", "/nonexistent/keel/api.sock"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("apiclient");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}
