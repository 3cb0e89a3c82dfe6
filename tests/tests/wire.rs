//! Byte-for-byte replays of what Bottlerocket's own tools send (DESIGN.md, "observed on
//! the wire"): methods, paths, query names, `Content-Type: application/json`, bodies.

#![allow(clippy::unwrap_used)]

use keel_e2e::{raw_bytes, Keeld};
use serde_json::json;

/// A request exactly as Bottlerocket's apiclient (hyper over a Unix socket) frames it.
fn br_request(method: &str, target: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\ncontent-type: application/json\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn apiclient_set_keypair_then_commit_and_apply() {
    let keeld = Keeld::start();
    let tx = "apiclient-set-Ab3dE5gH7jK9mN1p";
    let r = raw_bytes(
        &keeld.socket,
        &br_request(
            "PATCH",
            &format!("/settings/keypair?tx={tx}"),
            r#"{"request_payload":["motd=hi","settings.kernel.sysctl.\"vm.max_map_count\"=262144"]}"#,
        ),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    let r = raw_bytes(
        &keeld.socket,
        &br_request("POST", &format!("/tx/commit_and_apply?tx={tx}"), ""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        json!([
            "settings.kernel.sysctl.\"vm.max_map_count\"",
            "settings.motd"
        ])
    );
    let r = raw_bytes(
        &keeld.socket,
        &br_request("GET", "/?prefix=settings.motd", ""),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"settings": {"motd": "hi"}}));
}

#[test]
fn apiclient_set_json_and_apply() {
    let keeld = Keeld::start();
    let r = raw_bytes(
        &keeld.socket,
        &br_request(
            "PATCH",
            "/settings?tx=apiclient-set-0123456789abcdef",
            r#"{"kernel":{"sysctl":{"vm.max_map_count":"262144","user.max_user_namespaces":"16384"}}}"#,
        ),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = raw_bytes(
        &keeld.socket,
        &br_request(
            "POST",
            "/tx/commit_and_apply?tx=apiclient-set-0123456789abcdef",
            "",
        ),
    );
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = raw_bytes(
        &keeld.socket,
        &br_request(
            "PATCH",
            "/settings?tx=apiclient-apply-0123456789abcdef",
            r#"{"motd":"applied"}"#,
        ),
    );
    assert_eq!(r.status, 204);
    let r = raw_bytes(
        &keeld.socket,
        &br_request(
            "POST",
            "/tx/commit_and_apply?tx=apiclient-apply-0123456789abcdef",
            "",
        ),
    );
    assert_eq!(r.json(), json!(["settings.motd"]));
}

#[test]
fn user_data_tool_patches_launch_per_source_then_commits() {
    let keeld = Keeld::start();
    for body in [
        r#"{"motd":"first"}"#,
        r#"{"motd":"second","host-containers":{"admin":{"enabled":true}}}"#,
    ] {
        let r = raw_bytes(
            &keeld.socket,
            &br_request("PATCH", "/settings?tx=bottlerocket-launch", body),
        );
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let r = raw_bytes(
        &keeld.socket,
        &br_request("GET", "/tx?tx=bottlerocket-launch", ""),
    );
    assert_eq!(
        r.json(),
        json!({"motd": "second", "host-containers": {"admin": {"enabled": true}}})
    );
    let r = raw_bytes(&keeld.socket, &br_request("GET", "/tx/list", ""));
    assert_eq!(r.json(), json!(["bottlerocket-launch"]));
    let r = raw_bytes(
        &keeld.socket,
        &br_request("POST", "/tx/commit_and_apply?tx=bottlerocket-launch", ""),
    );
    assert_eq!(
        r.json(),
        json!(["settings.host-containers.admin.enabled", "settings.motd"])
    );
    let r = raw_bytes(
        &keeld.socket,
        &br_request("POST", "/tx/commit_and_apply?tx=bottlerocket-launch", ""),
    );
    assert_eq!(r.status, 422, "a second commit has nothing pending");
}

#[test]
fn transactions_default_discard_and_apply() {
    let keeld = Keeld::start();
    // No tx parameter: the `default` transaction.
    let r = keeld.raw("PATCH", "/settings", Some(br#"{"motd":"d"}"#));
    assert_eq!(r.status, 204);
    assert_eq!(keeld.raw("GET", "/tx", None).json(), json!({"motd": "d"}));
    assert_eq!(keeld.raw("GET", "/tx?tx=other", None).json(), json!({}));
    assert_eq!(
        keeld.raw("DELETE", "/tx", None).json(),
        json!(["settings.motd"])
    );
    assert_eq!(keeld.raw("DELETE", "/tx", None).json(), json!([]));
    assert_eq!(keeld.raw("POST", "/tx/commit", None).status, 422);
    keeld.raw("PATCH", "/settings", Some(br#"{"motd":"c"}"#));
    assert_eq!(
        keeld.raw("POST", "/tx/commit", None).json(),
        json!(["settings.motd"])
    );
    let r = keeld.raw("POST", "/tx/apply?keys=settings.motd", None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = keeld.raw("POST", "/tx/apply", None);
    assert_eq!(r.status, 204, "{}", r.text());
}

#[test]
fn reads_settings_os_and_metadata() {
    let keeld = Keeld::start();
    keeld.apiclient(&["set", "motd=m", "ntp.time-servers=[\"a.example\"]"]);
    assert_eq!(
        keeld.raw("GET", "/settings", None).json(),
        json!({"motd": "m", "ntp": {"time-servers": ["a.example"]}})
    );
    assert_eq!(
        keeld
            .raw("GET", "/settings?keys=settings.motd", None)
            .json(),
        json!({"motd": "m"})
    );
    assert_eq!(
        keeld
            .raw("GET", "/settings?prefix=settings.ntp", None)
            .json(),
        json!({"ntp": {"time-servers": ["a.example"]}})
    );
    assert_eq!(
        keeld.raw("GET", "/?prefix=settings.nothing", None).json(),
        json!({})
    );
    let root = keeld.raw("GET", "/", None).json();
    assert_eq!(root["settings"]["motd"], "m");
    let os = keeld.raw("GET", "/os", None).json();
    for field in [
        "arch",
        "build_id",
        "pretty_name",
        "variant_id",
        "version_id",
    ] {
        assert!(os[field].is_string(), "/os lacks {field}: {os}");
    }
    assert_eq!(
        keeld.raw("GET", "/os?prefix=arch", None).json(),
        json!({"arch": std::env::consts::ARCH})
    );
    assert_eq!(
        keeld
            .raw(
                "GET",
                "/metadata/affected-services?keys=settings.motd,settings.ntp.time-servers",
                None
            )
            .json(),
        json!({"settings.motd": ["motd"], "settings.ntp.time-servers": ["chronyd"]})
    );
    let services = keeld.raw("GET", "/services?names=chronyd", None).json();
    assert_eq!(
        services["chronyd"]["configuration-files"],
        json!(["chrony-conf"])
    );
    let files = keeld
        .raw("GET", "/configuration-files?prefix=chrony", None)
        .json();
    assert_eq!(files["chrony-conf"]["path"], "/etc/chrony.conf");
}

#[test]
fn reboot_runs_the_configured_command() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("rebooted");
    let keeld = Keeld::start_with(keel_e2e::KeeldOptions {
        extra_args: vec![
            "--reboot-command".into(),
            "/usr/bin/touch".into(),
            marker.display().to_string(),
        ],
        ..Default::default()
    });
    let r = keeld.raw("POST", "/actions/reboot", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(marker.exists());
}
