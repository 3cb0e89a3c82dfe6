//! Faults keeld must survive: SIGKILL in the middle of applies (no half-written file
//! under the render root, nothing acknowledged lost), a full state directory (a clear
//! error, the previous generation stays live, and commits work again once there is
//! room), and slow or idle clients that must not block anyone else.
//!
//! SIGKILL during commits is `crash.rs`; during boot, `boot.rs`; containerd killed under
//! running containers, `containers.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use keel_e2e::{Keeld, KeeldOptions};

/// Every file under `root` that is not a finished file: keeld's temp files.
fn half_written(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if path.to_string_lossy().contains(".keel-tmp-") {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

/// Commits with large rendered files while keeld is SIGKILLed at random moments: after
/// each restart the motd is exactly one acknowledged value (or the one in flight), whole,
/// and no temp file is left under the render root.
#[test]
fn sigkill_during_applies_leaves_no_half_written_file() {
    let mut keeld = Keeld::start();
    let motd_path = keeld.render_root().join("etc/motd");
    let iterations: usize = std::env::var("KEEL_FAULT_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..iterations {
        // A background writer commits big motds; the test kills keeld mid-stream.
        let socket = keeld.socket.clone();
        let writer = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0..200 {
                let value = format!("round {round} commit {i} {}", "x".repeat(200_000));
                let body = serde_json::json!({ "motd": value }).to_string();
                let tx = format!("r{round}i{i}");
                let patch = keel_e2e::try_raw_request(
                    &socket,
                    "PATCH",
                    &format!("/settings?tx={tx}"),
                    Some(body.as_bytes()),
                );
                let Ok(r) = patch else { break };
                if r.status != 204 {
                    break;
                }
                match keel_e2e::try_raw_request(
                    &socket,
                    "POST",
                    &format!("/tx/commit_and_apply?tx={tx}"),
                    None,
                ) {
                    Ok(r) if r.status == 200 => acked.push(value),
                    _ => break,
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(30 + (round as u64 * 37) % 150));
        keeld.kill();
        acknowledged.extend(writer.join().expect("writer"));
        keeld.spawn();
        assert_eq!(
            half_written(&keeld.render_root()),
            Vec::<String>::new(),
            "round {round}"
        );
        // The live motd is the last acknowledged value or a later one that was in
        // flight; the file holds it whole, once the restarted keeld applied it.
        let live = keeld
            .raw("GET", "/settings?keys=settings.motd", None)
            .json();
        let live_motd = live["motd"].as_str().unwrap_or_default().to_owned();
        if let Some(last) = acknowledged.last() {
            assert!(live_motd.len() >= 200_000, "acknowledged commits are kept");
            let live_i = live_motd
                .split_whitespace()
                .nth(3)
                .and_then(|n| n.parse::<usize>().ok());
            let last_i = last
                .split_whitespace()
                .nth(3)
                .and_then(|n| n.parse::<usize>().ok());
            if live_motd.split_whitespace().nth(1) == last.split_whitespace().nth(1) {
                assert!(
                    live_i >= last_i,
                    "not older than the last acknowledged commit"
                );
            }
        }
        // The file on disk is complete: either the live value's render or an earlier
        // whole render (an apply interrupted before its rename), never a torn one.
        if let Ok(text) = std::fs::read_to_string(&motd_path) {
            assert!(text.ends_with('\n'), "whole file");
            assert!(
                text.contains(&"x".repeat(200_000)) || !text.contains("commit"),
                "whole motd"
            );
        }
    }
    assert!(!acknowledged.is_empty(), "some commits were acknowledged");
}

/// A state directory with no room: the commit fails with a clear error naming the
/// state directory, nothing changes, and commits work again once space is freed.
#[test]
fn a_full_state_directory_refuses_commits_and_keeps_the_previous_generation() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "mounting a tmpfs needs root"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "keel-small-state"])
        .arg(&state)
        .status()
        .expect("mount");
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(state.clone());

    let keeld = Keeld::start_with(KeeldOptions {
        state_dir: Some(state.clone()),
        ..KeeldOptions::default()
    });
    let ok = keeld.apiclient(&["set", "motd=before the disk filled"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let before = keeld.live_bytes();

    // Fill the file system, leaving keeld no room for a bigger generation.
    let filler = state.join("filler");
    {
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let big = serde_json::json!({ "motd": "y".repeat(300_000) }).to_string();
    let commit = |tx: &str| {
        let r = keeld.raw("PATCH", &format!("/settings?tx={tx}"), Some(big.as_bytes()));
        if r.status != 204 {
            return r;
        }
        keeld.raw("POST", &format!("/tx/commit?tx={tx}"), None)
    };
    let r = commit("full");
    assert!(
        r.status == 507 || r.status == 503,
        "insufficient storage: {} {}",
        r.status,
        r.text()
    );
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("state directory") && error.contains("No space left"),
        "{error}"
    );
    assert_eq!(
        keeld.live_bytes(),
        before,
        "the previous generation stays live"
    );
    assert_eq!(
        keeld.raw("GET", "/settings", None).status,
        200,
        "reads still work"
    );

    std::fs::remove_file(&filler).expect("free space");
    let _ = keeld.raw("DELETE", "/tx?tx=full", None);
    let r = commit("again");
    assert_eq!(r.status, 200, "commits work again: {}", r.text());
}

/// A client that sends half a request and waits, plus 100 idle connections, do not
/// delay anyone else; the stalled one is cut off by the header timeout.
#[test]
fn slow_and_idle_clients_do_not_block_others() {
    let keeld = Keeld::start();
    let mut slow = UnixStream::connect(&keeld.socket).expect("connect");
    slow.write_all(
        b"PATCH /settings?tx=slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"motd\":",
    )
    .expect("partial");
    let mut trickle = UnixStream::connect(&keeld.socket).expect("connect");
    trickle
        .write_all(b"GET /settings HT")
        .expect("partial head");
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&keeld.socket).expect("connect"))
        .collect();

    let started = Instant::now();
    for i in 0..50 {
        let r = keeld.raw("GET", "/settings", None);
        assert_eq!(r.status, 200);
        if i % 10 == 0 {
            let out = keeld.apiclient(&["set", &format!("motd=while stalled {i}")]);
            assert!(out.status.success());
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "others were served: {elapsed:?}"
    );

    // The half-sent head is dropped after the 10 s header timeout (the half-sent body
    // gets 408 after 30 s; not waited for here).
    trickle
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = Vec::new();
    let _ = trickle.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the stalled head was cut off"
    );
    drop(idle);
    drop(slow);
}
