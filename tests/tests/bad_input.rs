//! Every malformed request gets the right 4xx with a JSON error body, and leaves the live
//! settings and the pending transactions byte-identical.

#![allow(clippy::unwrap_used)]

use keel_e2e::Keeld;

struct Case {
    name: &'static str,
    method: &'static str,
    target: String,
    body: Option<Vec<u8>>,
    status: u16,
    /// When set, the error's `key` field must be exactly this.
    key: Option<&'static str>,
}

fn case(
    name: &'static str,
    method: &'static str,
    target: &str,
    body: Option<&str>,
    status: u16,
) -> Case {
    Case {
        name,
        method,
        target: target.to_owned(),
        body: body.map(|b| b.as_bytes().to_vec()),
        status,
        key: None,
    }
}

fn patch(name: &'static str, body: &str, key: &'static str) -> Case {
    Case {
        key: Some(key),
        ..case(name, "PATCH", "/settings?tx=bad", Some(body), 400)
    }
}

fn pairs(name: &'static str, pairs: &str, status: u16) -> Case {
    let body = format!("{{\"request_payload\": {pairs}}}");
    Case {
        body: Some(body.into_bytes()),
        ..case(name, "PATCH", "/settings/keypair?tx=bad", None, status)
    }
}

fn cases() -> Vec<Case> {
    let deep = format!("{}{}", "{\"a\":".repeat(300), "}".repeat(300));
    let mut big = b"{\"motd\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 3 * 1024 * 1024));
    big.extend_from_slice(b"\"}");
    let mut bad_utf8 = b"{\"".to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(b"\": 1}");
    vec![
        // Not JSON, or not an object.
        case(
            "truncated json",
            "PATCH",
            "/settings?tx=bad",
            Some("{"),
            400,
        ),
        case("array body", "PATCH", "/settings?tx=bad", Some("[]"), 400),
        case(
            "string body",
            "PATCH",
            "/settings?tx=bad",
            Some("\"motd\""),
            400,
        ),
        case("empty body", "PATCH", "/settings?tx=bad", Some(""), 400),
        case(
            "trailing garbage",
            "PATCH",
            "/settings?tx=bad",
            Some("{\"motd\":\"a\"} x"),
            400,
        ),
        case(
            "nesting too deep",
            "PATCH",
            "/settings?tx=bad",
            Some(&deep),
            400,
        ),
        Case {
            body: Some(bad_utf8),
            ..case(
                "invalid utf-8 in a key",
                "PATCH",
                "/settings?tx=bad",
                None,
                400,
            )
        },
        // Wrong types and unknown keys.
        patch("motd not a string", r#"{"motd": 42}"#, "settings.motd"),
        patch("motd a list", r#"{"motd": ["a"]}"#, "settings.motd"),
        patch(
            "bool as string",
            r#"{"host-containers": {"admin": {"enabled": "yes"}}}"#,
            "settings.host-containers.admin.enabled",
        ),
        patch("unknown group", r#"{"bogus": 1}"#, "settings.bogus"),
        patch(
            "unknown nested key",
            r#"{"host-containers": {"admin": {"bogus": true}}}"#,
            "settings.host-containers.admin.bogus",
        ),
        patch(
            "unknown key removed with null",
            r#"{"bogus": null}"#,
            "settings.bogus",
        ),
        patch(
            "settings wrapper in a PATCH",
            r#"{"settings": {"motd": "x"}}"#,
            "settings.settings",
        ),
        // Grammar of values.
        patch(
            "identifier with a space",
            r#"{"host-containers": {"bad name": {"enabled": true}}}"#,
            "settings.host-containers.\"bad name\"",
        ),
        patch(
            "uppercase image",
            r#"{"host-containers": {"admin": {"source": "MY-CONTAINER-URI"}}}"#,
            "settings.host-containers.admin.source",
        ),
        patch(
            "placeholder image",
            r#"{"bootstrap-containers": {"b": {"source": "<SOURCE>"}}}"#,
            "settings.bootstrap-containers.b.source",
        ),
        patch(
            "bootstrap mode",
            r#"{"bootstrap-containers": {"b": {"mode": "sometimes"}}}"#,
            "settings.bootstrap-containers.b.mode",
        ),
        patch(
            "superpowered bootstrap",
            r#"{"bootstrap-containers": {"b": {"superpowered": true}}}"#,
            "settings.bootstrap-containers.b.superpowered",
        ),
        patch(
            "user-data not base64",
            r#"{"host-containers": {"admin": {"user-data": "not base64!"}}}"#,
            "settings.host-containers.admin.user-data",
        ),
        patch(
            "name server not an IP",
            r#"{"dns": {"name-servers": ["dns.example"]}}"#,
            "settings.dns.name-servers[0]",
        ),
        patch(
            "negative max-pods",
            r#"{"kubernetes": {"max-pods": -1}}"#,
            "settings.kubernetes.max-pods",
        ),
        patch(
            "max-pods as string",
            r#"{"kubernetes": {"max-pods": "110"}}"#,
            "settings.kubernetes.max-pods",
        ),
        patch(
            "taint effect",
            r#"{"kubernetes": {"node-taints": {"dedicated": ["x:Sometimes"]}}}"#,
            "settings.kubernetes.node-taints.dedicated[0]",
        ),
        patch(
            "sysctl key with a space",
            r#"{"kernel": {"sysctl": {"vm x": "1"}}}"#,
            "settings.kernel.sysctl.\"vm x\"",
        ),
        patch(
            "hostname",
            r#"{"network": {"hostname": "-bad-"}}"#,
            "settings.network.hostname",
        ),
        patch(
            "mirror endpoint",
            r#"{"container-registry": {"mirrors": [{"registry": "*", "endpoint": ["https://<mirror>"]}]}}"#,
            "settings.container-registry.mirrors[0].endpoint[0]",
        ),
        patch(
            "credential auth",
            r#"{"container-registry": {"credentials": [{"registry": "x.io", "auth": "%%%"}]}}"#,
            "settings.container-registry.credentials[0].auth",
        ),
        patch(
            "pki data",
            r#"{"pki": {"b": {"data": "W3N..."}}}"#,
            "settings.pki.b.data",
        ),
        patch(
            "downloads as string",
            r#"{"container-runtime": {"max-concurrent-downloads": "4"}}"#,
            "settings.container-runtime.max-concurrent-downloads",
        ),
        patch(
            "cache duration",
            r#"{"kubernetes": {"credential-providers": {"ecr": {"cache-duration": "forever"}}}}"#,
            "settings.kubernetes.credential-providers.ecr.cache-duration",
        ),
        patch(
            "bootstrap command not apiclient",
            r#"{"bootstrap-commands": {"c": {"commands": [["sh", "-c", "x"]]}}}"#,
            "settings.bootstrap-commands.c.commands[0]",
        ),
        // key=value pairs.
        pairs("keypair not a list", r#""motd=x""#, 400),
        pairs("keypair without =", r#"["motd"]"#, 400),
        pairs("keypair unknown key", r#"["nope.key=1"]"#, 400),
        pairs(
            "keypair unterminated quote",
            r#"["kernel.sysctl.\"vm.x=1"]"#,
            400,
        ),
        pairs("keypair integer", r#"["kubernetes.max-pods=abc"]"#, 400),
        pairs(
            "keypair bool",
            r#"["host-containers.admin.enabled=maybe"]"#,
            400,
        ),
        pairs("keypair empty key", r#"["=x"]"#, 400),
        pairs("keypair empty list", "[]", 400),
        case(
            "keypair missing payload",
            "PATCH",
            "/settings/keypair?tx=bad",
            Some("{}"),
            400,
        ),
        case(
            "keypair extra field",
            "PATCH",
            "/settings/keypair?tx=bad",
            Some(r#"{"request_payload": ["motd=x"], "x": 1}"#),
            400,
        ),
        // Query strings.
        case(
            "empty tx",
            "PATCH",
            "/settings?tx=",
            Some(r#"{"motd":"x"}"#),
            400,
        ),
        case(
            "tx with a space",
            "PATCH",
            "/settings?tx=a%20b",
            Some(r#"{"motd":"x"}"#),
            400,
        ),
        case(
            "tx not utf-8",
            "PATCH",
            "/settings?tx=%FF",
            Some(r#"{"motd":"x"}"#),
            400,
        ),
        case(
            "tx too long",
            "PATCH",
            &format!("/settings?tx={}", "t".repeat(129)),
            Some(r#"{"motd":"x"}"#),
            400,
        ),
        case(
            "tx given twice",
            "PATCH",
            "/settings?tx=a&tx=b",
            Some(r#"{"motd":"x"}"#),
            400,
        ),
        case(
            "unknown query parameter",
            "PATCH",
            "/settings?bogus=1",
            Some(r#"{"motd":"x"}"#),
            400,
        ),
        case("prefix not utf-8", "GET", "/?prefix=%FF%FE", None, 400),
        case(
            "keys with an unterminated quote",
            "GET",
            "/settings?keys=settings.%22vm",
            None,
            400,
        ),
        case(
            "keys with an empty segment",
            "GET",
            "/settings?keys=settings..motd",
            None,
            400,
        ),
        case(
            "affected-services without keys",
            "GET",
            "/metadata/affected-services",
            None,
            400,
        ),
        Case {
            key: Some("keys"),
            ..case(
                "affected-services with an empty keys",
                "GET",
                "/metadata/affected-services?keys=",
                None,
                400,
            )
        },
        Case {
            key: Some("keys"),
            ..case(
                "apply with an empty keys",
                "POST",
                "/tx/apply?keys=",
                None,
                400,
            )
        },
        Case {
            key: Some("keys"),
            ..case(
                "settings with an empty keys",
                "GET",
                "/settings?keys=",
                None,
                400,
            )
        },
        Case {
            key: Some("prefix"),
            ..case(
                "settings with both keys and prefix",
                "GET",
                "/settings?keys=motd&prefix=kernel",
                None,
                400,
            )
        },
        Case {
            key: Some("settings.motdd"),
            ..case(
                "apply of a key the model does not have",
                "POST",
                "/tx/apply?keys=settings.motd,settings.motdd",
                None,
                400,
            )
        },
        Case {
            key: Some("settings.nope"),
            ..case(
                "affected-services of a key the model does not have",
                "GET",
                "/metadata/affected-services?keys=nope",
                None,
                400,
            )
        },
        case("boot with a parameter", "GET", "/boot?since=1", None, 400),
        Case {
            key: Some("name"),
            ..case(
                "logs of a container name that is not UTF-8",
                "GET",
                "/containers/%FF/logs",
                None,
                400,
            )
        },
        Case {
            key: Some("request_payload"),
            ..case(
                "keypair body of the wrong shape",
                "PATCH",
                "/settings/keypair?tx=bad",
                Some(r#"{"request_payload": "motd=x"}"#),
                400,
            )
        },
        case(
            "rollback generation not a number",
            "POST",
            "/history/rollback?generation=abc",
            None,
            400,
        ),
        case(
            "rollback without generation",
            "POST",
            "/history/rollback",
            None,
            400,
        ),
        case(
            "rollback to an unknown generation",
            "POST",
            "/history/rollback?generation=999",
            None,
            404,
        ),
        case(
            "history limit negative",
            "GET",
            "/history?limit=-1",
            None,
            400,
        ),
        // Containers and boot (read-only, but their queries are input too).
        Case {
            key: Some("kind"),
            ..case(
                "containers kind unknown",
                "GET",
                "/containers?kind=pets",
                None,
                400,
            )
        },
        Case {
            key: Some("tail"),
            ..case(
                "logs tail not a number",
                "GET",
                "/containers/admin/logs?tail=lots",
                None,
                400,
            )
        },
        Case {
            key: Some("name"),
            ..case(
                "logs of a bad name",
                "GET",
                "/containers/..%2Fetc/logs",
                None,
                400,
            )
        },
        Case {
            key: Some("name"),
            ..case(
                "logs of an unknown container",
                "GET",
                "/containers/nobody/logs",
                None,
                404,
            )
        },
        Case {
            key: Some("name"),
            ..case(
                "logs of an unknown container of a kind",
                "GET",
                "/containers/nobody/logs?kind=host",
                None,
                404,
            )
        },
        case("POST to the read-only /boot", "POST", "/boot", None, 405),
        // Nothing to commit.
        case(
            "commit of nothing",
            "POST",
            "/tx/commit?tx=empty-one",
            None,
            422,
        ),
        case(
            "commit_and_apply of nothing",
            "POST",
            "/tx/commit_and_apply?tx=empty-one",
            None,
            422,
        ),
        // Unknown paths, wrong methods, too large.
        case("unknown path", "GET", "/nope", None, 404),
        case("unknown sub-path", "GET", "/settings/nope", None, 404),
        case(
            "PUT settings",
            "PUT",
            "/settings",
            Some(r#"{"motd":"x"}"#),
            405,
        ),
        case("DELETE settings", "DELETE", "/settings", None, 405),
        case("GET commit", "GET", "/tx/commit", None, 405),
        case("POST os", "POST", "/os", None, 405),
        Case {
            body: Some(big),
            ..case("body over 2 MiB", "PATCH", "/settings?tx=bad", None, 413)
        },
    ]
}

#[test]
fn malformed_requests_get_4xx_and_change_nothing() {
    let keeld = Keeld::start();
    // Some live state to protect.
    let out = keeld.apiclient(&["set", "motd=before", "kernel.sysctl.\"vm.x\"=1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = keeld.live_bytes();
    let pending = keeld.raw("GET", "/tx/list", None).body;
    let history = keeld.raw("GET", "/history", None).body;

    let cases = cases();
    assert!(cases.len() >= 50, "the table must hold at least 50 cases");
    let mut failures = Vec::new();
    for c in &cases {
        let r = keeld.raw(c.method, &c.target, c.body.as_deref());
        let body: Option<serde_json::Value> = serde_json::from_slice(&r.body).ok();
        let error = body
            .as_ref()
            .and_then(|b| b.get("error"))
            .and_then(|e| e.as_str());
        let key = body
            .as_ref()
            .and_then(|b| b.get("key"))
            .and_then(|e| e.as_str());
        if r.status != c.status {
            failures.push(format!(
                "{}: status {} (want {}): {}",
                c.name,
                r.status,
                c.status,
                r.text()
            ));
        } else if error.is_none_or(str::is_empty) {
            failures.push(format!("{}: no JSON error body: {}", c.name, r.text()));
        } else if c.key.is_some() && key != c.key {
            failures.push(format!(
                "{}: key {key:?} (want {:?}): {}",
                c.name,
                c.key,
                r.text()
            ));
        } else if r.header("content-type") != Some("application/json") {
            failures.push(format!(
                "{}: content-type {:?}",
                c.name,
                r.header("content-type")
            ));
        }
        if keeld.live_bytes() != live {
            failures.push(format!("{}: live settings changed", c.name));
        }
        if keeld.raw("GET", "/tx/list", None).body != pending {
            failures.push(format!("{}: pending transactions changed", c.name));
        }
    }
    assert_eq!(
        keeld.raw("GET", "/history", None).body,
        history,
        "history changed"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A refusal leaves a trace in keeld's log at info: method, path, caller and key, and
/// not the refused value.
#[test]
fn a_refusal_is_logged_with_method_path_caller_and_key() {
    let keeld = Keeld::start();
    let r = keeld.raw(
        "PATCH",
        "/settings?tx=x",
        Some(br#"{"motd": 42, "ntp": {"time-servers": ["ntp://a.example\nallow all"]}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_owned();
    let line = keeld
        .log()
        .lines()
        .find(|l| l.contains("request refused"))
        .unwrap_or_else(|| panic!("no refusal in the log:\n{}", keeld.log()))
        .to_owned();
    for part in [
        "status=400",
        "method=PATCH",
        "path=\"/settings\"",
        "uid=0",
        &format!("key=\"{key}\""),
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
    assert!(!line.contains("allow all"), "{line}");
}
