//! Apply: committed settings render into the render root, only affected services are
//! restarted (with CHANGED_SETTINGS), unchanged files are not rewritten, failures are
//! visible, a candidate that cannot render is refused, and dry runs change nothing.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;

use keel_e2e::updates::SlotHost;
use keel_e2e::{repo_root, Keeld, KeeldOptions};
use serde_json::json;
use std::time::Duration;

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn commit_renders_affected_files_and_restarts_only_affected_services() {
    let keeld = Keeld::start();
    ok(&keeld.apiclient(&["set", "motd=hello from keel"]));
    let motd = std::fs::read_to_string(keeld.render_root().join("etc/motd")).unwrap();
    assert!(motd.contains("hello from keel"), "{motd:?}");
    assert!(
        keeld.restarts().is_empty(),
        "motd has no restart command: {:?}",
        keeld.restarts()
    );

    ok(&keeld.apiclient(&["set", "ntp.time-servers=[\"time.example.com\"]"]));
    let chrony = std::fs::read_to_string(keeld.render_root().join("etc/chrony.conf")).unwrap();
    assert!(
        chrony
            .lines()
            .any(|l| l.starts_with("server time.example.com")),
        "{chrony}"
    );
    let restarts = keeld.restarts();
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert!(restarts[0].starts_with("chronyd "), "{restarts:?}");
    assert!(
        restarts[0].ends_with("| settings.ntp.time-servers"),
        "{restarts:?}"
    );

    ok(&keeld.apiclient(&["set", "kernel.sysctl.\"vm.max_map_count\"=262144"]));
    let restarts = keeld.restarts();
    assert_eq!(restarts.len(), 2, "{restarts:?}");
    assert!(
        restarts[1].contains("sysctl")
            && restarts[1].ends_with("| settings.kernel.sysctl.\"vm.max_map_count\""),
        "{restarts:?}"
    );
    assert!(
        !restarts[1].starts_with("chronyd"),
        "chronyd is not affected by sysctl"
    );
}

#[test]
fn unchanged_files_are_not_rewritten() {
    let keeld = Keeld::start();
    ok(&keeld.apiclient(&["set", "motd=steady"]));
    let path = keeld.render_root().join("etc/motd");
    let before = std::fs::metadata(&path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Re-apply everything: motd renders to the same content and is left alone.
    let r = keeld.raw("POST", "/tx/apply", None);
    assert_eq!(r.status, 204, "{}", r.text());
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (before.ino(), before.mtime(), before.mtime_nsec()),
        (after.ino(), after.mtime(), after.mtime_nsec())
    );
    let log = keeld.apiclient_json(&["apply-log", "--limit", "1"]);
    let files = log["applies"][0]["files"].as_array().unwrap();
    let motd = files.iter().find(|f| f["name"] == "motd").unwrap();
    assert_eq!(motd["result"], "unchanged");

    // A key without its `settings.` prefix means the same as everywhere in the API.
    let r = keeld.raw("POST", "/tx/apply?keys=motd", None);
    assert_eq!(r.status, 204, "{}", r.text());
    let log = keeld.apiclient_json(&["apply-log", "--limit", "1"]);
    let files = log["applies"][0]["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["name"] == "motd"), "{log:#}");
    let affected = keeld.raw("GET", "/metadata/affected-services?keys=motd", None);
    assert_eq!(
        affected.json(),
        keeld
            .raw(
                "GET",
                "/metadata/affected-services?keys=settings.motd",
                None
            )
            .json()["settings.motd"]
            .as_array()
            .map(|services| json!({ "motd": services }))
            .unwrap()
    );
}

#[test]
fn a_failing_restart_command_is_visible() {
    let keeld = Keeld::start();
    keeld.fail_restarts_of("chronyd");
    let out = keeld.apiclient(&["set", "ntp.time-servers=[\"a.example\"]"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("settings committed, but applying them failed"),
        "{stderr}"
    );
    assert!(stderr.contains("chronyd"), "{stderr}");
    // The setting is committed, and the failure is in the apply log.
    assert_eq!(
        keeld.apiclient_json(&["get", "settings.ntp"])["settings"]["ntp"]["time-servers"],
        json!(["a.example"])
    );
    let log = keeld.raw("GET", "/apply/log?limit=1", None).json();
    let apply = &log["applies"][0];
    assert_eq!(apply["success"], false);
    assert_eq!(apply["commands"][0]["service"], "chronyd");
    assert_eq!(apply["commands"][0]["exit-code"], 3);
}

#[test]
fn a_candidate_that_cannot_render_is_refused() {
    let templates = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo_root().join("packaging/templates")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), templates.path().join(entry.file_name())).unwrap();
    }
    // A template that needs a value the model may leave undefined.
    std::fs::write(
        templates.path().join("motd"),
        "{{ settings.motd }}\n{{ settings.network.hostname }}\n",
    )
    .unwrap();
    let keeld = Keeld::start_with(KeeldOptions {
        templates: Some(templates.path().to_owned()),
        // The boot's full render fails on this template (and says so); the commit
        // check is what this test is about.
        wait_for_boot: false,
        ..Default::default()
    });
    let boot = keeld.wait_boot(std::time::Duration::from_secs(30));
    assert_eq!(boot["phase"], "failed");
    assert!(
        boot["reason"].as_str().is_some_and(|r| r.contains("motd")),
        "{boot:#}"
    );
    let before = keeld.live_bytes();
    let out = keeld.apiclient(&["set", "motd=x"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Status 422"), "{stderr}");
    assert!(
        stderr.contains("template \\\"motd\\\" line 2"),
        "names the template and line: {stderr}"
    );
    assert!(
        stderr.contains("settings.network.hostname"),
        "names the key: {stderr}"
    );
    assert_eq!(keeld.live_bytes(), before, "nothing committed");
    assert!(
        !keeld.render_root().join("etc/motd").exists(),
        "nothing written"
    );
}

#[test]
fn dry_run_shows_diffs_and_changes_nothing() {
    let keeld = Keeld::start();
    ok(&keeld.apiclient(&["set", "motd=old text"]));
    let before = keeld.live_bytes();
    let out = keeld.apiclient(&["set", "--dry-run", "motd=new text"]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("~ settings.motd: \"old text\" → \"new text\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("-old text") && stdout.contains("+new text"),
        "unified diff: {stdout}"
    );
    assert_eq!(keeld.live_bytes(), before);
    assert_eq!(keeld.raw("GET", "/tx/list", None).json(), json!([]));
    let motd = std::fs::read_to_string(keeld.render_root().join("etc/motd")).unwrap();
    assert!(motd.contains("old text"));
}

/// A script that records each reboot asked of it as a line of the answered file.
fn reboot_recorder(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let reboots = dir.join("reboots");
    let recorder = dir.join("reboot");
    std::fs::write(
        &recorder,
        format!("#!/bin/sh\necho reboot >> {}\n", reboots.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &recorder,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    (recorder, reboots)
}

/// keeld with `host`'s slot writer and more flags, each a path.
fn keeld_on(host: &SlotHost, flags: &[(&str, &std::path::Path)], wait_for_boot: bool) -> Keeld {
    let mut extra_args = vec!["--update-writer-command".to_owned(), host.writer_command()];
    for (flag, path) in flags {
        extra_args.push((*flag).to_owned());
        extra_args.push(path.display().to_string());
    }
    Keeld::start_with(KeeldOptions {
        extra_args,
        wait_for_boot,
        ..KeeldOptions::default()
    })
}

/// settings.boot reaches the boot loader's entries through the real keel-slot-writer
/// (slots and ESP as files, systemd-boot simulated): new parameters go into a trial entry
/// of the running slot, which the next boot's command line carries, kernel's before `--`,
/// init's after; once that boot is blessed the next keeld start keeps them in the slot's
/// entry. Parameters whose boot never reaches configured are not kept: the boot loader
/// comes back to the kept entry, the boot record names them, and an apply does not hand
/// them over again. A host without a reachable slot writer says that the parameters cannot
/// take effect.
#[test]
fn boot_parameters_reach_the_next_boots_command_line_or_the_apply_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = SlotHost::create(&dir.path().join("host"), 1 << 20, 1 << 16);
    let mut keeld = keeld_on(&host, &[], true);
    assert_eq!(
        keeld.raw("GET", "/apply/log", None).json()["reboot-required"],
        false
    );
    ok(&keeld.apiclient(&[
        "set",
        "-j",
        r#"{"boot": {"kernel-parameters": {"console": ["tty0", "ttyS1,115200n8"], "nosmt": []},
            "init-parameters": {"systemd.log_level": ["debug"]}}}"#,
    ]));
    let staged =
        std::fs::read_to_string(keeld.render_root().join("etc/keel/boot/kernel-parameters"))
            .unwrap();
    assert!(staged.contains("console=tty0,ttyS1,115200n8"), "{staged:?}");
    let log = keeld.raw("GET", "/apply/log", None).json();
    assert_eq!(log["reboot-required"], true, "{log}");
    let apply = &log["applies"][0];
    assert_eq!(apply["reboot-required"], true, "{apply}");
    assert_eq!(apply["success"], true, "{apply}");
    assert_eq!(
        apply["commands"][0]["argv"],
        json!(["keel-slot-writer", "set-boot-parameters"]),
        "{apply}"
    );
    assert!(
        apply["commands"][0]["stdout"]
            .as_str()
            .unwrap()
            .contains("the next boot tries these parameters (loader entry keel-a-trial+1.conf)"),
        "{apply}"
    );
    assert_eq!(host.entries(), ["keel-a-trial+1.conf", "keel-a.conf"]);
    // The trial entry keeps the image's options and Keel's keys.
    assert_eq!(host.reboot(), "a");
    let cmdline = host.cmdline();
    assert!(
        cmdline.trim().ends_with(
            "console=ttyS0 keel.parameters-trial=2 console=tty0,ttyS1,115200n8 nosmt -- \
             systemd.log_level=debug"
        ) && cmdline.contains("keel.slot=a keel.roothash="),
        "{cmdline}"
    );
    let tried = "console=tty0,ttyS1,115200n8 nosmt -- systemd.log_level=debug";
    keeld.reboot();
    let boot = keeld.wait_boot(Duration::from_secs(30));
    assert_eq!(boot["booted-parameters"], tried, "{boot:#}");
    assert_eq!(host.entries(), ["keel-a-trial+0-1.conf", "keel-a.conf"]);
    // Blessed (the boot reached configured): the next start keeps them, in the slot's
    // own entry, and the trial is gone; the boot after has them without a trial.
    host.bless();
    assert_eq!(host.reboot(), "a");
    keeld.reboot();
    let boot = keeld.wait_boot(Duration::from_secs(30));
    assert_eq!(boot["booted-parameters"], tried, "{boot:#}");
    assert_eq!(host.entries(), ["keel-a.conf"]);
    assert_eq!(host.reboot(), "a");
    assert!(
        host.cmdline()
            .trim()
            .ends_with(&format!("console=ttyS0 {tried}")),
        "{}",
        host.cmdline()
    );

    // A parameter that stops the boot: its trial boot never reaches configured, so the
    // boot loader's next choice is the kept entry. Reported, not kept, not tried again.
    keeld.reboot();
    keeld.wait_boot(Duration::from_secs(30));
    ok(&keeld.apiclient(&["set", "boot.kernel-parameters.rdinit=[\"/nonexistent\"]"]));
    assert_eq!(host.entries(), ["keel-a-trial+1.conf", "keel-a.conf"]);
    assert_eq!(host.reboot(), "a");
    assert!(host.cmdline().contains("rdinit=/nonexistent"));
    assert_eq!(host.reboot(), "a");
    assert!(!host.cmdline().contains("rdinit"), "{}", host.cmdline());
    keeld.reboot();
    let boot = keeld.wait_boot(Duration::from_secs(30));
    assert_eq!(boot["phase"], "configured", "{boot:#}");
    assert_eq!(boot["booted-parameters"], tried, "{boot:#}");
    assert_eq!(
        boot["failed-parameters"],
        "console=tty0,ttyS1,115200n8 nosmt rdinit=/nonexistent -- systemd.log_level=debug",
        "{boot:#}"
    );
    assert_eq!(host.entries(), ["keel-a.conf"]);
    let again = keeld.raw("POST", "/tx/apply", None);
    assert!(again.status < 300, "{}", again.text());
    assert_eq!(host.entries(), ["keel-a.conf"], "not handed over again");
    // Every boot says so while settings.boot asks for them.
    assert_eq!(host.reboot(), "a");
    keeld.reboot();
    let boot = keeld.wait_boot(Duration::from_secs(30));
    assert_eq!(
        boot["failed-parameters"],
        "console=tty0,ttyS1,115200n8 nosmt rdinit=/nonexistent -- systemd.log_level=debug",
        "{boot:#}"
    );
    assert_eq!(host.entries(), ["keel-a.conf"]);

    // Removing them all: the image's line, tried first like any change.
    ok(&keeld.apiclient(&[
        "set",
        "-j",
        r#"{"boot": {"kernel-parameters": null, "init-parameters": null}}"#,
    ]));
    assert_eq!(host.reboot(), "a");
    let cmdline = host.cmdline();
    assert!(
        cmdline
            .trim()
            .ends_with("console=ttyS0 keel.parameters-trial=2")
            && !cmdline.contains("--"),
        "{cmdline}"
    );
    drop(keeld);

    // A slot writer that cannot be reached, and a host whose boot loader entries are
    // not Keel's (no keel.slot= on this machine's command line): the apply fails, naming
    // why, and no reboot is said to help.
    for (args, why) in [
        (
            vec![
                "--update-writer-command".into(),
                "/nonexistent/keel-slot-writer".into(),
            ],
            "cannot reach the slot writer",
        ),
        (Vec::new(), "no boot loader entries Keel manages"),
    ] {
        let keeld = Keeld::start_with(KeeldOptions {
            extra_args: args,
            ..KeeldOptions::default()
        });
        let out = keeld.apiclient(&["set", "boot.kernel-parameters.nosmt=[]"]);
        assert!(!out.status.success());
        let log = keeld.raw("GET", "/apply/log", None).json();
        let apply = &log["applies"][0];
        let error = apply["commands"][0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("settings.boot cannot reach the next boot") && error.contains(why),
            "{log}"
        );
        assert_eq!(log["reboot-required"], false, "{log}");
        // Applied again (the rendered file unchanged): tried again, failed again,
        // never taken for done.
        let again = keeld.raw("POST", "/tx/apply", None);
        assert_eq!(again.status, 500, "{}", again.text());
        assert!(again.text().contains(why), "{}", again.text());
        let log = keeld.raw("GET", "/apply/log", None).json();
        assert_eq!(log["applies"][0]["success"], false, "{log}");
        let boot = log["applies"][0]["commands"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["service"] == "boot").cloned())
            .unwrap_or_default();
        assert!(
            boot["error"].as_str().is_some_and(|e| e.contains(why)),
            "{log}"
        );
    }
}

/// `settings.boot.reboot-to-reconcile`: user-data that sets boot parameters makes the
/// first boot reboot once (before host containers), so that they are in effect when the
/// host is configured; the boot after, whose kernel got them, is configured without
/// rebooting; without the flag nothing reboots; parameters whose trial boot failed are
/// not rebooted for again.
#[test]
fn reboot_to_reconcile_reboots_once_for_parameters_the_kernel_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = SlotHost::create(&dir.path().join("host"), 1 << 20, 1 << 16);
    let (recorder, reboots) = reboot_recorder(dir.path());
    let user_data = dir.path().join("user-data.toml");
    std::fs::write(
        &user_data,
        "[settings.boot]\nreboot-to-reconcile = true\n\n\
         [settings.boot.kernel-parameters]\nnosmt = []\n",
    )
    .unwrap();
    let mut keeld = keeld_on(
        &host,
        &[
            ("--reboot-command", &recorder),
            ("--user-data-file", &user_data),
        ],
        false,
    );
    let phase_of = |keeld: &Keeld| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let record = keeld.raw("GET", "/boot", None).json();
            if ["configured", "failed", "rebooting"]
                .contains(&record["phase"].as_str().unwrap_or(""))
            {
                return record;
            }
            assert!(std::time::Instant::now() < deadline, "{record:#}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let first = phase_of(&keeld);
    assert_eq!(first["phase"], "rebooting", "{first:#}");
    let reason = first["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the kernel got none, the next boot gets \"nosmt\""),
        "{first:#}"
    );
    assert_eq!(std::fs::read_to_string(&reboots).unwrap(), "reboot\n");

    // The reboot: systemd-boot reads the entry, keeld starts on the same state.
    assert_eq!(host.reboot(), "a");
    assert!(
        host.cmdline().trim().ends_with(" nosmt"),
        "{}",
        host.cmdline()
    );
    keeld.reboot();
    let second = phase_of(&keeld);
    assert_eq!(second["phase"], "configured", "{second:#}");
    assert_eq!(second["booted-parameters"], "nosmt", "{second:#}");
    assert_eq!(std::fs::read_to_string(&reboots).unwrap(), "reboot\n");

    drop(keeld);

    // Without the flag, the same first boot is configured and waits for a reboot
    // someone asks for.
    std::fs::write(
        &user_data,
        "[settings.boot.kernel-parameters]\nnosmt = []\n",
    )
    .unwrap();
    let host = SlotHost::create(&dir.path().join("host2"), 1 << 20, 1 << 16);
    let keeld = keeld_on(
        &host,
        &[
            ("--reboot-command", &recorder),
            ("--user-data-file", &user_data),
        ],
        false,
    );
    let record = phase_of(&keeld);
    assert_eq!(record["phase"], "configured", "{record:#}");
    assert_eq!(record["booted-parameters"], "", "{record:#}");
    assert_eq!(std::fs::read_to_string(&reboots).unwrap(), "reboot\n");
    assert!(
        host.cmdline().trim().ends_with("console=ttyS0"),
        "{}",
        host.cmdline()
    );
    let entry = std::fs::read_to_string(host.entries_dir().join("keel-a.conf")).unwrap();
    assert!(
        !entry.contains("nosmt"),
        "the kept entry is untouched: {entry}"
    );
    let trial = std::fs::read_to_string(host.entries_dir().join("keel-a-trial+1.conf")).unwrap();
    assert!(trial.trim_end().ends_with("options nosmt"), "{trial}");
    drop(keeld);

    // With the flag, parameters whose trial boot fails: the boot after, back on the kept
    // entry, is configured without rebooting for them again (that would never end).
    std::fs::write(
        &user_data,
        "[settings.boot]\nreboot-to-reconcile = true\n\n\
         [settings.boot.kernel-parameters]\nnosmt = []\n",
    )
    .unwrap();
    std::fs::write(&reboots, "").unwrap();
    let mut host = SlotHost::create(&dir.path().join("host3"), 1 << 20, 1 << 16);
    let mut keeld = keeld_on(
        &host,
        &[
            ("--reboot-command", &recorder),
            ("--user-data-file", &user_data),
        ],
        false,
    );
    assert_eq!(phase_of(&keeld)["phase"], "rebooting");
    // The trial boot (never blessed), then the boot loader's fall-back.
    assert_eq!(host.reboot(), "a");
    assert!(host.cmdline().trim().ends_with(" nosmt"));
    assert_eq!(host.reboot(), "a");
    assert!(!host.cmdline().contains("nosmt"), "{}", host.cmdline());
    keeld.reboot();
    let back = phase_of(&keeld);
    assert_eq!(back["phase"], "configured", "{back:#}");
    assert_eq!(back["booted-parameters"], "", "{back:#}");
    assert_eq!(back["failed-parameters"], "nosmt", "{back:#}");
    assert_eq!(std::fs::read_to_string(&reboots).unwrap(), "reboot\n");
    assert_eq!(host.entries(), ["keel-a.conf"]);
    // Nor at any boot after, while settings.boot asks for them.
    assert_eq!(host.reboot(), "a");
    keeld.reboot();
    let later = phase_of(&keeld);
    assert_eq!(later["phase"], "configured", "{later:#}");
    assert_eq!(later["failed-parameters"], "nosmt", "{later:#}");
    assert_eq!(std::fs::read_to_string(&reboots).unwrap(), "reboot\n");
}

/// New boot parameters that reach keeld while its own boot is on trial (an update's
/// first boot: the running slot's entry still counts) are deferred, not refused (the
/// boot is configured); once systemd-bless-boot blesses the boot, keeld hands them over
/// as a trial, and says a reboot is required.
#[test]
fn boot_parameters_deferred_by_a_trial_boot_are_handed_over_once_it_is_blessed() {
    let dir = tempfile::tempdir().unwrap();
    let host = SlotHost::create(&dir.path().join("host"), 1 << 20, 1 << 16);
    std::fs::rename(
        host.entries_dir().join("keel-a.conf"),
        host.entries_dir().join("keel-a+2-1.conf"),
    )
    .unwrap();
    let user_data = dir.path().join("user-data.toml");
    std::fs::write(
        &user_data,
        "[settings.boot.kernel-parameters]\nnosmt = []\n",
    )
    .unwrap();
    let keeld = keeld_on(&host, &[("--user-data-file", &user_data)], true);
    let boot = keeld.wait_boot(Duration::from_secs(30));
    assert_eq!(boot["phase"], "configured", "{boot:#}");
    let log = keeld.raw("GET", "/apply/log", None).json();
    assert!(
        log.to_string()
            .contains("deferred: the running slot a booted from a loader entry that is not marked good yet (keel-a+2-1.conf)"),
        "{log:#}"
    );
    assert_eq!(host.entries(), ["keel-a+2-1.conf"]);
    host.bless();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while host.entries() != ["keel-a-trial+1.conf", "keel-a.conf"] {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}\n{}",
            host.entries(),
            keeld.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while keeld.raw("GET", "/apply/log", None).json()["reboot-required"] != true {
        assert!(std::time::Instant::now() < deadline, "{}", keeld.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A trial's verdict lost (the failed trial removed, its record never written: a crash
/// or power cut between the two): the staged parameters are in no entry and no trial
/// holds them, so the next boot takes them as failed, and reboot-to-reconcile does not
/// reboot for them.
#[test]
fn staged_boot_parameters_in_no_entry_are_taken_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = SlotHost::create(&dir.path().join("host"), 1 << 20, 1 << 16);
    let (recorder, reboots) = reboot_recorder(dir.path());
    let mut keeld = keeld_on(&host, &[("--reboot-command", &recorder)], true);
    ok(&keeld.apiclient(&[
        "set",
        "-j",
        r#"{"boot": {"reboot-to-reconcile": true, "kernel-parameters": {"nosmt": []}}}"#,
    ]));
    assert_eq!(host.entries(), ["keel-a-trial+1.conf", "keel-a.conf"]);
    assert_eq!(host.reboot(), "a");
    assert_eq!(host.reboot(), "a");
    std::fs::remove_file(host.entries_dir().join("keel-a-trial+0-1.conf")).unwrap();
    keeld.reboot();
    let boot = keeld.wait_boot(Duration::from_secs(30));
    assert_eq!(boot["phase"], "configured", "{boot:#}");
    assert_eq!(boot["booted-parameters"], "", "{boot:#}");
    assert_eq!(boot["failed-parameters"], "nosmt", "{boot:#}");
    assert!(!reboots.exists(), "no reboot for parameters that failed");
}

/// The writer wrote a trial, and keeld's record of the hand-over was lost (keeld or the
/// power went down between the two): the staged record still names the older parameters.
/// The trial fails; the next boot records the failed ones as staged too, so its apply
/// does not hand them over again for a second bad boot.
#[test]
fn a_failed_trial_whose_hand_over_was_not_recorded_is_not_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = SlotHost::create(&dir.path().join("host"), 1 << 20, 1 << 16);
    let mut keeld = keeld_on(&host, &[], true);
    ok(&keeld.apiclient(&["set", "boot.kernel-parameters.rdinit=[\"/nonexistent\"]"]));
    assert_eq!(host.entries(), ["keel-a-trial+1.conf", "keel-a.conf"]);
    let staged = keeld.state_dir.join("boot-parameters");
    assert_eq!(
        std::fs::read_to_string(&staged).unwrap(),
        "rdinit=/nonexistent"
    );
    std::fs::remove_file(&staged).unwrap();
    assert_eq!(host.reboot(), "a");
    assert_eq!(host.reboot(), "a");
    assert!(!host.cmdline().contains("rdinit"), "{}", host.cmdline());
    keeld.reboot();
    let boot = keeld.wait_boot(Duration::from_secs(30));
    assert_eq!(boot["phase"], "configured", "{boot:#}");
    assert_eq!(boot["booted-parameters"], "", "{boot:#}");
    assert_eq!(boot["failed-parameters"], "rdinit=/nonexistent", "{boot:#}");
    assert_eq!(host.entries(), ["keel-a.conf"], "not handed over again");
    let again = keeld.raw("POST", "/tx/apply", None);
    assert!(again.status < 300, "{}", again.text());
    assert_eq!(host.entries(), ["keel-a.conf"], "not handed over again");
}

#[test]
fn an_apply_finishes_even_if_the_client_goes_away() {
    use std::io::Write;
    let keeld = Keeld::start();
    keeld.slow_restarts_of("chronyd");
    let r = keeld.raw(
        "PATCH",
        "/settings?tx=gone",
        Some(br#"{"ntp": {"time-servers": ["a.example"]}}"#),
    );
    assert_eq!(r.status, 204);
    // Send the commit, then hang up before the (slow) apply answers.
    let mut stream = std::os::unix::net::UnixStream::connect(&keeld.socket).unwrap();
    stream
        .write_all(
            b"POST /tx/commit_and_apply?tx=gone HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = keeld.raw("GET", "/apply/log", None).json();
        // The newest apply that is this commit's (the boot's own render came first).
        if log["applies"][0]["keys"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "settings.ntp.time-servers"))
        {
            assert_eq!(log["applies"][0]["success"], true, "{log:#}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the apply never finished: {log:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        keeld.restarts().iter().any(|l| l.starts_with("chronyd ")),
        "{:?}",
        keeld.restarts()
    );
}

#[test]
fn apply_without_keys_renders_every_file() {
    let keeld = Keeld::start();
    ok(&keeld.apiclient(&["set", "motd=only this"]));
    // The boot rendered everything; remove one file to see the apply put it back.
    std::fs::remove_file(keeld.render_root().join("etc/chrony.conf")).unwrap();
    let r = keeld.raw("POST", "/tx/apply", None);
    assert_eq!(r.status, 204, "{}", r.text());
    for file in [
        "etc/motd",
        "etc/chrony.conf",
        "etc/containerd/config.toml",
        "etc/kubernetes/kubelet/config",
    ] {
        assert!(
            keeld.render_root().join(file).exists(),
            "{file} not rendered"
        );
    }
}

/// A key this host stores but does not act on is said to be so, in the dry run and in
/// the apply log.
#[test]
fn settings_without_effect_on_this_host_are_named_in_dry_runs_and_applies() {
    let keeld = Keeld::start();
    let r = keeld.raw(
        "PATCH",
        "/settings?tx=u",
        Some(br#"{"metrics": {"send-metrics": true}, "motd": "m"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let dry = keeld.raw("POST", "/tx/dry-run?tx=u", None).json();
    assert_eq!(
        dry["no-effect"],
        json!(["settings.metrics.send-metrics"]),
        "{dry:#}"
    );
    let out = keeld.apiclient(&["raw", "-m", "POST", "-u", "/tx/commit_and_apply?tx=u"]);
    ok(&out);
    let log = keeld.raw("GET", "/apply/log?limit=1", None).json();
    assert_eq!(
        log["applies"][0]["no-effect"],
        json!(["settings.metrics.send-metrics"]),
        "{log:#}"
    );
}
