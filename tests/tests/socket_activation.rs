//! systemd integration. Readiness: keeld sends `READY=1` to `NOTIFY_SOCKET` once the
//! API answers (`Type=notify`). Socket activation: keeld uses the socket systemd passes (as `keeld.socket` does)
//! instead of binding its own, so the socket's inode, which host containers have
//! bind-mounted, outlives keeld; and a clean stop leaves systemd's socket in place.

use std::os::unix::fs::MetadataExt;

use keel_e2e::{Keeld, KeeldOptions};

#[test]
fn keeld_serves_the_socket_it_is_given_and_leaves_it_in_place() {
    let mut keeld = Keeld::start_with(KeeldOptions {
        socket_activation: true,
        ..KeeldOptions::default()
    });
    let inode = std::fs::metadata(&keeld.socket).expect("socket").ino();
    let out = keeld.apiclient(&["set", "motd=activated"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        keeld.log().contains("using the socket systemd passed"),
        "{}",
        keeld.log()
    );
    let meta = std::fs::metadata(&keeld.socket).expect("socket");
    assert_eq!(
        meta.ino(),
        inode,
        "keeld did not replace the socket it was given"
    );
    assert_eq!(
        meta.mode() & 0o777,
        0o660,
        "mode corrected to --socket-mode"
    );
    let status = keeld.stop();
    assert!(status.success());
    assert!(
        keeld.socket.exists(),
        "a passed socket is systemd's: it stays"
    );
}

#[test]
fn readiness_is_notified_once_the_socket_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind");
    listener
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let keeld = Keeld::start_with(KeeldOptions {
        env: vec![("NOTIFY_SOCKET".into(), notify.display().to_string())],
        ..KeeldOptions::default()
    });
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert_eq!(keeld.raw("GET", "/settings", None).status, 200);
}
