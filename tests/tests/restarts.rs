//! keeld stopped or killed around applies: a commit acknowledged before a crash reaches
//! the render root at the next start (apply journal), the apply log survives a restart,
//! SIGTERM finishes the request and the apply in flight (or, past `--shutdown-grace`,
//! leaves it to the next start), a FIFO planted at a rendered
//! path never freezes the API, and a KEELD_LOG that is no filter is reported and does
//! not keep keeld from starting.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use keel_e2e::{Keeld, KeeldOptions};

/// Polls `check` every 10 ms until it holds, failing after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets and commits an NTP server (chronyd's restart follows) on a thread of its own;
/// answers once the apply has started (its journal says so).
fn start_ntp_apply(
    keeld: &Keeld,
) -> std::thread::JoinHandle<std::io::Result<keel_e2e::RawResponse>> {
    let socket = keeld.socket.clone();
    let client = std::thread::spawn(move || {
        keel_e2e::try_raw_request(
            &socket,
            "PATCH",
            "/settings?tx=t",
            Some(br#"{"ntp":{"time-servers":["time.example.com"]}}"#),
        )
        .and_then(|_| keel_e2e::try_raw_request(&socket, "POST", "/tx/commit_and_apply?tx=t", None))
    });
    wait_until("the apply to start", Duration::from_secs(10), || {
        keeld.apply_in_flight()
    });
    client
}

fn motd(keeld: &Keeld) -> String {
    std::fs::read_to_string(keeld.render_root().join("etc/motd")).unwrap_or_default()
}

#[test]
fn a_commit_acknowledged_before_a_crash_is_applied_at_the_next_start() {
    let mut keeld = Keeld::start();
    // A slow apply (chronyd's restart takes a second) holds the apply queue...
    keeld.slow_restarts_of("chronyd");
    let socket = keeld.socket.clone();
    let slow = std::thread::spawn(move || {
        keel_e2e::try_raw_request(
            &socket,
            "PATCH",
            "/settings?tx=ntp",
            Some(br#"{"ntp":{"time-servers":["time.example.com"]}}"#),
        )
        .and_then(|_| {
            keel_e2e::try_raw_request(&socket, "POST", "/tx/commit_and_apply?tx=ntp", None)
        })
    });
    wait_until("the slow apply to start", Duration::from_secs(10), || {
        keeld.apply_in_flight()
    });
    // ...while a motd commit is acknowledged, its apply queued behind.
    assert_eq!(
        keeld
            .raw(
                "PATCH",
                "/settings?tx=m",
                Some(br#"{"motd":"after the crash"}"#)
            )
            .status,
        204
    );
    let commit = keeld.raw("POST", "/tx/commit?tx=m", None);
    assert_eq!(commit.status, 200, "{}", commit.text());
    let socket = keeld.socket.clone();
    let queued = std::thread::spawn(move || {
        keel_e2e::try_raw_request(&socket, "POST", "/tx/apply?keys=settings.motd", None)
    });
    std::thread::sleep(Duration::from_millis(100));
    let applies_before = keeld.raw("GET", "/apply/log", None).json()["applies"]
        .as_array()
        .unwrap()
        .len();
    assert!(applies_before >= 1, "the boot's apply is in the log");
    keeld.kill();
    let _ = slow.join();
    let _ = queued.join();
    assert!(
        !motd(&keeld).contains("after the crash"),
        "killed before the motd apply"
    );

    keeld.spawn();
    wait_until(
        "the render root to catch up",
        Duration::from_secs(20),
        || motd(&keeld).contains("after the crash"),
    );
    let log = keeld.raw("GET", "/apply/log", None).json();
    let applies = log["applies"].as_array().unwrap();
    assert!(
        applies.len() > applies_before,
        "the log of the earlier keeld survives and the recovery apply is added: {log:#}"
    );
    // The interrupted apply's restart command ran again (the harness forgets the
    // recorder's lines from before the boot was configured: the log tells).
    let recovery = &applies[0];
    let commands = recovery["commands"].as_array().unwrap();
    assert!(
        commands
            .iter()
            .any(|c| c["service"] == "chronyd" && c["success"] == true),
        "{recovery:#}"
    );
    assert!(recovery["services"].get("motd").is_some(), "{recovery:#}");
    assert!(
        !keeld.apply_in_flight(),
        "the apply cut short is dealt with"
    );
    let ids: Vec<u64> = applies.iter().map(|a| a["id"].as_u64().unwrap()).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ids.len(),
        "apply ids are never reused: {ids:?}"
    );
}

#[test]
fn a_restart_with_nothing_to_catch_up_applies_nothing() {
    let mut keeld = Keeld::start();
    let out = keeld.apiclient(&["set", "motd=steady"]);
    assert!(out.status.success());
    let before = keeld.raw("GET", "/apply/log", None).json()["applies"]
        .as_array()
        .unwrap()
        .len();
    keeld.kill();
    keeld.spawn();
    let after = keeld.raw("GET", "/apply/log", None).json()["applies"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "{}", keeld.log());
    assert!(keeld.restarts().is_empty(), "{:?}", keeld.restarts());
}

#[test]
fn sigterm_finishes_the_commit_in_flight() {
    let mut keeld = Keeld::start();
    keeld.slow_restarts_of("chronyd");
    let client = start_ntp_apply(&keeld);
    let status = keeld.stop();
    assert!(status.success(), "keeld exited {status}: {}", keeld.log());
    let answer = client
        .join()
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("x-keel-apply-status"), Some("ok"));
    assert!(
        keeld.restarts().iter().any(|l| l.starts_with("chronyd")),
        "the apply ran to the end: {:?}",
        keeld.restarts()
    );
    assert!(!keeld.apply_in_flight(), "and was journaled as finished");
}

/// An apply that outlasts the shutdown grace does not hold keeld's stop: keeld exits at
/// the limit, cleanly, saying so, and its next start finishes the apply (apply journal).
#[test]
fn a_stop_past_its_grace_leaves_the_apply_to_the_next_start() {
    let mut keeld = Keeld::start_with(KeeldOptions {
        extra_args: vec!["--shutdown-grace".into(), "500ms".into()],
        ..KeeldOptions::default()
    });
    keeld.slow_restarts_of_for("chronyd", 30);
    let client = start_ntp_apply(&keeld);
    let stopping = Instant::now();
    let status = keeld.stop();
    let took = stopping.elapsed();
    assert!(status.success(), "keeld exited {status}: {}", keeld.log());
    // The grace, and at most the second an exec stop may take besides: far from the
    // restart command's 30 s.
    assert!(
        took < Duration::from_secs(10),
        "keeld took {took:?} to stop"
    );
    assert!(
        keeld
            .log()
            .contains("an apply is still running after the shutdown grace"),
        "{}",
        keeld.log()
    );
    assert!(
        keeld.apply_in_flight(),
        "the journal holds the apply cut short"
    );
    // The request in flight got no answer, or an error: never a success.
    if let Ok(answer) = client.join().unwrap() {
        assert_ne!(answer.status, 200, "{}", answer.text());
    }
    assert!(
        !keeld.restarts().iter().any(|l| l.starts_with("chronyd")),
        "the restart command was cut short: {:?}",
        keeld.restarts()
    );

    keeld.slow_restarts_of_for("chronyd", 0);
    keeld.spawn();
    wait_until(
        "the journal to say it is done",
        Duration::from_secs(20),
        || !keeld.apply_in_flight(),
    );
    // The recovery ran chronyd's restart (the harness forgets the recorder's lines from
    // before the boot was configured: the log tells).
    let log = keeld.raw("GET", "/apply/log", None).json();
    let recovered = log["applies"].as_array().unwrap().iter().any(|apply| {
        apply["commands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["service"] == "chronyd" && c["success"] == true)
    });
    assert!(recovered, "{log:#}");
}

#[test]
fn a_fifo_at_a_rendered_path_fails_the_apply_by_name_and_never_blocks_the_api() {
    let keeld = Keeld::start();
    let target = keeld.render_root().join("etc/motd");
    let _ = std::fs::remove_file(&target);
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);

    let socket = keeld.socket.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let dry =
            keel_e2e::try_raw_request(&socket, "PATCH", "/settings?tx=f", Some(br#"{"motd":"x"}"#))
                .and_then(|_| keel_e2e::try_raw_request(&socket, "POST", "/tx/dry-run?tx=f", None));
        let apply = keel_e2e::try_raw_request(&socket, "POST", "/tx/commit_and_apply?tx=f", None);
        let _ = tx.send((dry, apply));
    });
    let (dry, apply) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a FIFO at /etc/motd blocked the API");
    let dry = dry.unwrap().json();
    let file = &dry["files"][0];
    assert!(
        file["error"].as_str().unwrap().contains("a FIFO"),
        "{dry:#}"
    );
    let apply = apply.unwrap();
    assert_eq!(apply.status, 200);
    assert_eq!(apply.header("x-keel-apply-status"), Some("failed"));
    let log = keeld.raw("GET", "/apply/log?limit=1", None).json();
    let failed = &log["applies"][0]["files"][0];
    assert_eq!(failed["result"], "failed", "{log:#}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("etc/motd") && error.contains("a FIFO"),
        "{error}"
    );
    // The API answers throughout.
    assert_eq!(keeld.raw("GET", "/settings", None).status, 200);
}

/// KEELD_LOG that is not a log filter: keeld says so, as an error naming the variable,
/// and runs at info (a typo in a debugging aid does not keep the agent from starting).
#[test]
fn a_keeld_log_that_is_no_filter_is_reported_and_keeld_runs_at_info() {
    let keeld = Keeld::start_with(KeeldOptions {
        env: vec![("KEELD_LOG".into(), "keel_agent=loud".into())],
        ..KeeldOptions::default()
    });
    let log = keeld.log();
    let line = log
        .lines()
        .find(|l| l.contains("KEELD_LOG is not a log filter"))
        .unwrap_or_else(|| panic!("no error about KEELD_LOG:\n{log}"));
    assert!(
        line.contains("ERROR") && line.contains("keel_agent=loud"),
        "{line}"
    );
    // At info: the start's info lines are there, and the API answers.
    assert!(log.contains("INFO"), "{log}");
    assert_eq!(keeld.raw("GET", "/settings", None).status, 200);
}
