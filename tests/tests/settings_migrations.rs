//! Settings across image versions: the real keeld started as version N (no migration
//! step, settings format 1), then as N+1 (its `--migrations` has the step 1 → 2), then as
//! N again after a rollback, on the same state directory. One keeld binary plays both
//! versions, so the step renames between two keys its model has
//! (`settings.metrics.send-metrics` → `settings.updates.ignore-waves`, both booleans) and
//! adds a default (`settings.ntp.time-servers`), standing in for what a real N+1 would
//! rename or add.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keel_e2e::{Keeld, KeeldOptions};
use serde_json::{json, Value};

const STEP_1_TO_2: &str = r#"
[[step]]
from = 1
to = 2
up = [
  { op = "rename", from = "settings.metrics.send-metrics", to = "settings.updates.ignore-waves" },
  { op = "set-default", key = "settings.ntp.time-servers", value = ["169.254.169.123"] },
]
down = [
  { op = "rename", from = "settings.updates.ignore-waves", to = "settings.metrics.send-metrics" },
  { op = "remove", key = "settings.ntp.time-servers" },
]
"#;

fn settings(keeld: &Keeld) -> Value {
    keeld.raw("GET", "/settings", None).json()
}

fn newest_tx(keeld: &Keeld) -> (u64, String) {
    let history = keeld.raw("GET", "/history?limit=1", None).json();
    let newest = &history.as_array().expect("history")[0];
    (
        newest["generation"].as_u64().unwrap(),
        newest["tx"].as_str().unwrap().to_owned(),
    )
}

fn restart_as(keeld: &mut Keeld, migrations: &std::path::Path) {
    keeld.kill();
    keeld.options.extra_args = vec!["--migrations".into(), migrations.display().to_string()];
    keeld.reboot();
}

#[test]
fn an_update_migrates_settings_up_and_a_rollback_reads_them_back_down() {
    let dir = tempfile::tempdir().unwrap();
    let n = dir.path().join("n.toml");
    std::fs::write(&n, "# version N: no step\n").unwrap();
    let n1 = dir.path().join("n1.toml");
    std::fs::write(&n1, STEP_1_TO_2).unwrap();

    let mut keeld = Keeld::start_with(KeeldOptions {
        extra_args: vec!["--migrations".into(), n.display().to_string()],
        ..KeeldOptions::default()
    });
    let out = keeld.apiclient(&["set", "metrics.send-metrics=true", "motd=kept"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The update: N+1 carries the settings up at start.
    restart_as(&mut keeld, &n1);
    let live = settings(&keeld);
    assert_eq!(live["updates"]["ignore-waves"], true, "{live:#}");
    assert_eq!(live["metrics"], Value::Null, "{live:#}");
    assert_eq!(live["ntp"]["time-servers"], json!(["169.254.169.123"]));
    assert_eq!(live["motd"], "kept");
    let (migrated_up, tx) = newest_tx(&keeld);
    assert_eq!(tx, "migrate-settings-1-to-2");
    // A history rollback past the migration would bring back format-1 settings: refused.
    let r = keeld.raw(
        "POST",
        &format!("/history/rollback?generation={}", migrated_up - 1),
        None,
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("predates the settings migration"),
        "{}",
        r.text()
    );
    // N+1 changes the setting under its new name.
    let out = keeld.apiclient(&["set", "updates.ignore-waves=false"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The rollback: N starts again, without the step in its image; it finds it recorded.
    restart_as(&mut keeld, &n);
    let live = settings(&keeld);
    assert_eq!(live["metrics"]["send-metrics"], false, "{live:#}");
    assert_eq!(live["updates"], Value::Null, "{live:#}");
    assert_eq!(live["ntp"], Value::Null, "{live:#}");
    assert_eq!(live["motd"], "kept");
    assert_eq!(newest_tx(&keeld).1, "migrate-settings-2-to-1");
    // The boot went through on the migrated settings.
    assert_eq!(
        keeld.raw("GET", "/boot", None).json()["phase"],
        "configured"
    );

    // And forward again: N+1 picks up what N changed meanwhile.
    let out = keeld.apiclient(&["set", "metrics.send-metrics=true"]);
    assert!(out.status.success());
    restart_as(&mut keeld, &n1);
    assert_eq!(settings(&keeld)["updates"]["ignore-waves"], true);
}

#[test]
fn a_broken_migrations_file_leaves_the_settings_alone_and_keeld_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[step]]\nfrom = 2\nto = 3\n").unwrap();
    let keeld = Keeld::start_with(KeeldOptions {
        extra_args: vec!["--migrations".into(), bad.display().to_string()],
        ..KeeldOptions::default()
    });
    let out = keeld.apiclient(&["set", "motd=still here"]);
    assert!(out.status.success());
    assert_eq!(settings(&keeld)["motd"], "still here");
    assert!(
        keeld
            .log()
            .contains("cannot read the image's settings migrations"),
        "{}",
        keeld.log()
    );
}
