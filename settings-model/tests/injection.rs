//! What the model refuses so that no value can add to the files it is rendered into:
//! control characters and noncharacters in every validated string, the chrony.conf
//! injection through `ntp.time-servers`, escape sequences in `motd`, `--` as a kernel
//! parameter, PEM bundles that are not PEM, and collections past their limit. Every
//! refusal names the key.
#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use serde_json::{json, Value};
use settings_model::model::{
    BootParameterValues, CredentialProviders, ImagePatterns, MirrorEndpoints, NoProxyList,
    NodeLabels, NodeTaints, PkiBundles, Sysctls, TimeServers,
};
use settings_model::types::{
    is_forbidden_char, Base64, BootParamKey, BootParamValue, Capability, DnsDomain, Duration,
    EnvName, EvictionSignal, Hostname, Identifier, ImageRef, IpAddress, KernelModuleName, LabelKey,
    LabelValue, Motd, NoProxyEntry, NumaNode, PemBundle, ProxyAddress, RegistryHost,
    SingleLineString, SysctlKey, Taint, Threshold, TimeServer, Url,
};
use settings_model::{validate, validate_patch, Error};

/// Control characters and noncharacters from every class the model refuses.
const FORBIDDEN: &[char] = &[
    '\0',
    '\u{1}',
    '\u{7}',
    '\u{8}',
    '\t',
    '\n',
    '\u{b}',
    '\u{c}',
    '\r',
    '\u{1b}',
    '\u{1f}',
    '\u{7f}',
    '\u{80}',
    '\u{85}',
    '\u{9b}',
    '\u{9d}',
    '\u{9f}',
    '\u{fdd0}',
    '\u{fdef}',
    '\u{fffe}',
    '\u{ffff}',
    '\u{1fffe}',
    '\u{10ffff}',
];

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A real certificate: every CERTIFICATE block is parsed as X.509.
const PEM: &str = include_str!("fixtures/certs/a.pem");

/// The refusal of `patch`, which must name `key`.
fn refused(patch: Value, key: &str) -> Error {
    let err = validate_patch(&patch).expect_err(&format!("{patch} must be refused"));
    assert_eq!(err.key(), Some(key), "{patch}: {err}");
    let again = validate(&patch).expect_err("validate agrees with validate_patch");
    assert_eq!(again, err);
    err
}

#[test]
fn the_chrony_injection_is_refused_naming_the_key() {
    let hostile = "ntp://pool.example.com\nallow\tall\ncmdallow\tall\nserver\tevil.example.net";
    let err = refused(
        json!({"ntp": {"time-servers": ["time.example.com", hostile]}}),
        "settings.ntp.time-servers[1]",
    );
    assert!(err.reason().contains("control characters"), "{err}");
    assert!(err.reason().contains("U+000A"), "{err}");
    // The same with only tabs, only returns, and every other forbidden character.
    for c in FORBIDDEN {
        for server in [
            format!("ntp://pool.example.com{c}allow"),
            format!("pool.example.com{c}"),
            format!("{c}10.0.0.1"),
        ] {
            assert!(TimeServer::new(&server).is_err(), "{server:?}");
        }
    }
}

#[test]
fn time_server_urls_have_a_host_chrony_can_take() {
    for ok in [
        "ntp://time.example.org",
        "ntp://time.example.org:123",
        "ntp://time.example.org/path?q#f",
        "ntp://[fd00::1]:123",
        "ntp://10.0.0.1",
        "fd00::1",
        "time.example.org",
    ] {
        assert!(TimeServer::new(ok).is_ok(), "{ok}");
    }
    for bad in [
        "ntp://user@evil.example.net",
        "ntp://evil.example.net\\@time.example.org",
        "ntp://time.example.org:99999",
        "ntp://time.example.org:12a",
        "ntp://",
        "ntp://[fd00::1",
        "ntp://a b",
        "ntp://time.example.org/\"x\"",
        "ntp://tíme.example.org",
        "1ntp://time.example.org",
        &format!("ntp://{}", "a.".repeat(300)),
    ] {
        let err = TimeServer::new(bad).unwrap_err();
        assert!(err.contains("time server"), "{bad}: {err}");
    }
    let schema = settings_model::schema::json_schema();
    let item = &schema["definitions"]["Ntp"]["properties"]["time-servers"]["items"];
    let pattern = item["pattern"].as_str().unwrap_or_default();
    assert!(pattern.starts_with("^[-A-Za-z0-9"), "{item}");
}

/// A valid sample of every validated string type, and its constructor.
type Check = fn(&str) -> Result<(), String>;

fn samples() -> Vec<(&'static str, String, Check)> {
    fn ok<T, E>(r: Result<T, E>) -> Result<(), E> {
        r.map(drop)
    }
    vec![
        ("Identifier", "admin".into(), |s| ok(Identifier::new(s))),
        ("EnvName", "HOME".into(), |s| ok(EnvName::new(s))),
        ("KernelModuleName", "sctp".into(), |s| {
            ok(KernelModuleName::new(s))
        }),
        ("BootParamKey", "console".into(), |s| {
            ok(BootParamKey::new(s))
        }),
        ("BootParamValue", "ttyS0".into(), |s| {
            ok(BootParamValue::new(s))
        }),
        ("NumaNode", "1".into(), |s| ok(NumaNode::new(s))),
        ("EvictionSignal", "memory.available".into(), |s| {
            ok(EvictionSignal::new(s))
        }),
        ("SingleLineString", "a line".into(), |s| {
            ok(SingleLineString::new(s))
        }),
        ("Motd", "Hello\nworld".into(), |s| ok(Motd::new(s))),
        ("Base64", "aGk=".into(), |s| ok(Base64::new(s))),
        ("PemBundle", b64(PEM), |s| ok(PemBundle::new(s))),
        ("Hostname", "node-1.example.com".into(), |s| {
            ok(Hostname::new(s))
        }),
        ("DnsDomain", "example.com".into(), |s| ok(DnsDomain::new(s))),
        ("IpAddress", "10.0.0.1".into(), |s| ok(IpAddress::new(s))),
        ("Url", "https://mirror.example.com/v2".into(), |s| {
            ok(Url::new(s))
        }),
        ("ProxyAddress", "proxy.example.com:3128".into(), |s| {
            ok(ProxyAddress::new(s))
        }),
        ("NoProxyEntry", ".example.com".into(), |s| {
            ok(NoProxyEntry::new(s))
        }),
        ("TimeServer", "ntp://time.example.com".into(), |s| {
            ok(TimeServer::new(s))
        }),
        ("RegistryHost", "registry.example.com:5000".into(), |s| {
            ok(RegistryHost::new(s))
        }),
        ("ImageRef", "registry.example.com/a/b:1".into(), |s| {
            ok(ImageRef::new(s))
        }),
        ("ImageRef archive", "oci-archive:/local/a.tar".into(), |s| {
            ok(ImageRef::new(s))
        }),
        ("LabelKey", "example.com/role".into(), |s| {
            ok(LabelKey::new(s))
        }),
        ("LabelValue", "worker".into(), |s| ok(LabelValue::new(s))),
        ("Taint", "gpu:NoSchedule".into(), |s| ok(Taint::new(s))),
        ("Threshold", "15%".into(), |s| ok(Threshold::new(s))),
        ("Duration", "1h30m".into(), |s| ok(Duration::new(s))),
        ("SysctlKey", "net.core.somaxconn".into(), |s| {
            ok(SysctlKey::new(s))
        }),
        ("Capability", "NET_ADMIN".into(), |s| ok(Capability::new(s))),
    ]
}

#[test]
fn every_validated_string_refuses_control_characters_and_noncharacters() {
    for (name, sample, check) in samples() {
        check(&sample).unwrap_or_else(|e| panic!("{name}: the sample {sample:?} is valid: {e}"));
        // Where the grammar truly allows them: tabs in a line of text, newlines and tabs
        // in a message of the day.
        let allowed: &[char] = match name {
            "SingleLineString" => &['\t'],
            "Motd" => &['\t', '\n'],
            _ => &[],
        };
        let middle = sample.len() / 2;
        for &c in FORBIDDEN.iter().filter(|c| !allowed.contains(c)) {
            for at in [0, middle, sample.len()] {
                if !sample.is_char_boundary(at) {
                    continue;
                }
                let value = format!("{}{c}{}", &sample[..at], &sample[at..]);
                assert!(check(&value).is_err(), "{name} accepts {value:?}");
            }
        }
        for &c in allowed {
            let value = format!("{sample}{c}{sample}");
            assert!(check(&value).is_ok(), "{name} refuses {value:?}");
        }
    }
}

#[test]
fn forbidden_chars_are_controls_and_noncharacters() {
    for c in FORBIDDEN {
        assert!(is_forbidden_char(*c), "{c:?}");
    }
    for c in [
        'a',
        ' ',
        'é',
        '\u{a0}',
        '\u{fdcf}',
        '\u{fdf0}',
        '\u{fffd}',
        '\u{1f600}',
    ] {
        assert!(!is_forbidden_char(c), "{c:?}");
    }
}

#[test]
fn motd_refuses_terminal_escape_sequences() {
    for hostile in [
        "\u{1b}[31mred\u{1b}[0m",
        "\u{1b}]0;owned\u{7}",
        "\u{1b}]8;;http://evil/\u{1b}\\link\u{1b}]8;;\u{1b}\\",
        "\u{9b}31m",
        "\u{9d}0;x\u{9c}",
        "over\rwrite",
        "bell\u{7}",
        "nul\0",
        "\u{fffe}",
    ] {
        let err = refused(json!({"motd": hostile}), "settings.motd");
        assert!(err.reason().contains("control characters"), "{err}");
    }
    for ok in [
        "Welcome to Keel.\nAuthorized use only.\n",
        "\tindented",
        "é ✓ 日本",
        "",
    ] {
        validate_patch(&json!({ "motd": ok })).unwrap();
    }
    let err = refused(
        json!({"motd": "m".repeat(1024 * 1024 + 1)}),
        "settings.motd",
    );
    assert!(err.reason().contains("at most 1048576 bytes"), "{err}");
}

#[test]
fn text_settings_refuse_escapes_naming_the_key() {
    let cases = [
        (
            json!({"kubernetes": {"cluster-name": "a\u{1b}[2Jb"}}),
            "settings.kubernetes.cluster-name",
        ),
        (
            json!({"kernel": {"sysctl": {"vm.x": "1\u{fffe}"}}}),
            "settings.kernel.sysctl.\"vm.x\"",
        ),
        (
            json!({"kubernetes": {"allowed-unsafe-sysctls": ["net.*", "a\u{85}b"]}}),
            "settings.kubernetes.allowed-unsafe-sysctls[1]",
        ),
        (
            json!({"kubernetes": {"credential-providers": {"ecr": {"image-patterns": ["x\ry"]}}}}),
            "settings.kubernetes.credential-providers.ecr.image-patterns[0]",
        ),
        (
            json!({"network": {"no-proxy": ["a\u{ffff}"]}}),
            "settings.network.no-proxy[0]",
        ),
        (
            json!({"container-registry": {"mirrors": [{"endpoint": ["https://m.example.com/\u{9d}"]}]}}),
            "settings.container-registry.mirrors[0].endpoint[0]",
        ),
        (
            json!({"kubernetes": {"api-server": "https://api.example.com/a\\b"}}),
            "settings.kubernetes.api-server",
        ),
    ];
    for (patch, key) in cases {
        refused(patch, key);
    }
}

#[test]
fn a_kernel_parameter_named_dash_dash_is_refused() {
    for key in ["--", "-", "-x", "---"] {
        let err = refused(
            json!({"boot": {"kernel-parameters": {key: []}}}),
            &format!("settings.boot.kernel-parameters.{key}"),
        );
        assert!(err.reason().contains("cannot start with '-'"), "{err}");
        refused(
            json!({"boot": {"init-parameters": {key: ["x"]}}}),
            &format!("settings.boot.init-parameters.{key}"),
        );
    }
    validate_patch(&json!({"boot": {"kernel-parameters": {"a--b": [], "_x": ["1"]}}})).unwrap();
}

#[test]
fn keels_own_parameters_are_not_settings() {
    for key in ["keel.slot", "keel.roothash", "keel.", "initrd"] {
        for group in ["kernel-parameters", "init-parameters"] {
            // A dotted name is quoted in the key path.
            let shown = if key.contains('.') {
                format!("{key:?}")
            } else {
                key.to_owned()
            };
            let err = refused(
                json!({"boot": {group: {key: ["x"]}}}),
                &format!("settings.boot.{group}.{shown}"),
            );
            assert!(
                err.reason().contains("Keel's and the boot loader's own"),
                "{err}"
            );
        }
    }
    validate_patch(&json!({"boot": {"kernel-parameters": {"keelx": [], "initrd_x": ["1"]}}}))
        .unwrap();
}

#[test]
fn kernel_parameter_values_are_printable_ascii() {
    // U+00E0 is C3 A0 in UTF-8, and the kernel's ctype calls 0xA0 a space.
    // systemd unquotes /proc/cmdline: an unpaired ' or a \ would join later words.
    for bad in [
        "\u{e0}", "a\u{a0}b", "x y", "\"q\"", "a\tb", "\u{2028}", "a'b", "a\\", "'",
    ] {
        refused(
            json!({"boot": {"kernel-parameters": {"console": [bad]}}}),
            "settings.boot.kernel-parameters.console[0]",
        );
    }
    validate_patch(&json!({"boot": {"kernel-parameters": {"console": ["ttyS1,115200n8", "a=b"]}}}))
        .unwrap();
}

#[test]
fn pki_bundles_must_be_pem_at_patch_time() {
    let key = "settings.pki.my-ca.data";
    let with = |data: String| json!({"pki": {"my-ca": {"data": data, "trusted": true}}});
    validate_patch(&with(b64(PEM))).unwrap();
    // CRLF line ends, explanatory text and several blocks are PEM too.
    let crlf = PEM.replace('\n', "\r\n");
    let text = format!(
        "subject=CN=x\n{PEM}\n# another\n{}",
        PEM.replace("CERTIFICATE", "TRUSTED CERTIFICATE")
    );
    validate_patch(&with(b64(&crlf))).unwrap();
    validate_patch(&with(b64(&text))).unwrap();
    // Each block is parsed as X.509: an old v1 certificate (no extensions) is one, and
    // so is OpenSSL's trusted form (the certificate, then its trust settings).
    validate_patch(&with(b64(include_str!("fixtures/certs/v1.pem")))).unwrap();
    validate_patch(&with(b64(include_str!("fixtures/certs/a-trusted.pem")))).unwrap();

    let cases: Vec<(String, &str)> = vec![
        ("//4=".to_owned(), "not UTF-8"),
        (b64("just text\n"), "no -----BEGIN CERTIFICATE----- block"),
        (b64("-----BEGIN CERTIFICATE-----\n"), "has no END line"),
        (
            b64("-----BEGIN CERTIFICATE-----\nMIIB\n-----END PRIVATE KEY-----\n"),
            "does not end the CERTIFICATE block",
        ),
        (
            b64("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"),
            "does not begin a CERTIFICATE",
        ),
        (
            b64("-----BEGIN CERTIFICATE-----\nMIIB!\n-----END CERTIFICATE-----\n"),
            "not base64",
        ),
        (
            b64("-----BEGIN CERTIFICATE-----\nMIIBx\n-----END CERTIFICATE-----\n"),
            "does not hold base64 data",
        ),
        (
            b64("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"),
            "does not hold base64 data",
        ),
        (
            b64(&format!("\u{1b}]0;x\u{7}\n{PEM}")),
            "control character or noncharacter: U+001B",
        ),
        (b64(&format!("{PEM}\u{fffe}")), "U+FFFE"),
        (
            b64(&format!("{PEM}a\rb\n")),
            "a return is only allowed before a newline",
        ),
        (
            b64("-----END CERTIFICATE-----\n"),
            "outside a BEGIN/END block",
        ),
        ("W3N...".to_owned(), "not base64"),
    ];
    for (data, why) in cases {
        let err = refused(with(data.clone()), key);
        assert!(err.reason().contains(why), "{data}: {err}");
    }
    // PEM, but no certificate: refused where values come in (a patch), read
    // back where they are stored (`validate`: a rollback, a migration, the start).
    let der = |pem: &str| {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("the fixture is base64")
    };
    let block = |label: &str, der: &[u8]| {
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
    };
    let certificate = der(PEM);
    let trusted = der(include_str!("fixtures/certs/a-trusted.pem"));
    let x509_cases: Vec<(String, &str)> = vec![
        // The start of a certificate, cut short.
        (
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUKeel\n-----END CERTIFICATE-----\n"
                .to_owned(),
            "the CERTIFICATE block of line 1 is not an X.509 certificate: malformed DER",
        ),
        // A good certificate, then a bad one.
        (
            format!("# first\n{PEM}-----BEGIN CERTIFICATE-----\nBADA\n-----END CERTIFICATE-----\n"),
            "the CERTIFICATE block of line 13 is not an X.509 certificate",
        ),
        // A certificate with bytes after it.
        (
            block("CERTIFICATE", &[&certificate[..], &[0x05, 0x00]].concat()),
            "the CERTIFICATE block of line 1 is not an X.509 certificate: malformed DER",
        ),
        (
            "-----BEGIN TRUSTED CERTIFICATE-----\nMIIB\n-----END TRUSTED CERTIFICATE-----\n"
                .to_owned(),
            "its DER length runs past its end",
        ),
        // OpenSSL's form with something else than trust settings after the certificate.
        (
            block(
                "TRUSTED CERTIFICATE",
                &[&certificate[..], &[0x04, 0x03, b'a', b'b', b'c']].concat(),
            ),
            "what follows the certificate is not one DER SEQUENCE of trust settings",
        ),
        (
            block(
                "TRUSTED CERTIFICATE",
                &[&trusted[..], &[0x30, 0x00]].concat(),
            ),
            "what follows the certificate is not one DER SEQUENCE of trust settings",
        ),
        // Long-form lengths of 0 or more than 4 bytes.
        (
            block("TRUSTED CERTIFICATE", &[0x30, 0x80, 0x00, 0x00]),
            "its DER length",
        ),
        (
            block("TRUSTED CERTIFICATE", &[0x30, 0x85, 1, 0, 0, 0, 0]),
            "its DER length",
        ),
    ];
    for (text, why) in x509_cases {
        let data = b64(&text);
        let err = validate_patch(&with(data.clone())).expect_err(&text);
        assert_eq!(err.key(), Some(key), "{text}: {err}");
        assert!(err.reason().contains(why), "{text}: {err}");
        validate(&with(data)).unwrap_or_else(|e| panic!("{text}: stored, it must read: {e}"));
    }
    // The cluster CA is a PEM bundle too.
    refused(
        json!({"kubernetes": {"cluster-certificate": b64("cert")}}),
        "settings.kubernetes.cluster-certificate",
    );
    let not_x509 =
        b64("-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUKeel\n-----END CERTIFICATE-----\n");
    for field in ["cluster-certificate", "server-certificate"] {
        let err = validate_patch(&json!({"kubernetes": {field: not_x509}})).expect_err(field);
        assert_eq!(
            err.key(),
            Some(format!("settings.kubernetes.{field}").as_str())
        );
        assert!(err.reason().contains("not an X.509 certificate"), "{err}");
    }
}

/// Keel before the X.509 check took any base64 in a CERTIFICATE block. Settings stored
/// then must still read: every consumer (host containers, the boot, updates) reads the
/// live settings through the typed model, and keeld commits groups itself. So the check
/// is a rule of patches, where every value comes in, not of the type nor of a commit.
#[test]
fn certificates_stored_before_the_x509_check_still_read_and_commit_but_do_not_come_in() {
    let bad = b64("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    let stored = json!({"pki": {"old": {"data": bad, "trusted": true}}, "motd": "hello"});
    serde_json::from_value::<settings_model::Settings>(stored.clone()).expect("still reads");
    // Nor does a rollback to it, a migration of it, or the check at start.
    validate(&stored).expect("validate reads what is stored");
    // A commit that changes its group (another bundle added) checks the group whole,
    // and is not held back by it.
    let groups = ["pki".to_owned()].into_iter().collect();
    settings_model::validate_groups(&stored, &groups).expect("a commit of pki");
    // It cannot come in again.
    let err = validate_patch(&json!({"pki": {"new": {"data": bad, "trusted": true}}}))
        .expect_err("refused as it comes in");
    assert_eq!(err.key(), Some("settings.pki.new.data"));
    assert!(
        err.to_string().contains("not an X.509 certificate"),
        "{err}"
    );
}

/// `n` distinct valid label keys.
fn label_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("example.com/l{i}")).collect()
}

#[test]
fn collections_refuse_entries_past_their_limit_naming_the_key_and_limit() {
    let labels = |n: usize| {
        let map: serde_json::Map<String, Value> =
            label_keys(n).into_iter().map(|k| (k, json!("v"))).collect();
        json!({"kubernetes": {"node-labels": map}})
    };
    validate_patch(&labels(NodeLabels::MAX)).unwrap();
    let err = refused(
        labels(NodeLabels::MAX + 1),
        "settings.kubernetes.node-labels",
    );
    assert!(
        err.reason()
            .contains(&format!("limit of {}", NodeLabels::MAX)),
        "{err}"
    );

    let taints = |keys: usize, per_key: usize| {
        let effects = ["NoSchedule", "PreferNoSchedule", "NoExecute", "NoSchedule"];
        let list: Vec<String> = effects[..per_key]
            .iter()
            .map(|e| format!("v:{e}"))
            .collect();
        let map: serde_json::Map<String, Value> = label_keys(keys)
            .into_iter()
            .map(|k| (k, json!(list)))
            .collect();
        json!({"kubernetes": {"node-taints": map}})
    };
    validate_patch(&taints(NodeTaints::MAX, 3)).unwrap();
    refused(
        taints(NodeTaints::MAX + 1, 1),
        "settings.kubernetes.node-taints",
    );
    let err = refused(
        taints(1, 4),
        "settings.kubernetes.node-taints.\"example.com/l0\"",
    );
    assert!(err.reason().contains("limit of 3"), "{err}");

    let providers = |n: usize| {
        let map: serde_json::Map<String, Value> = (0..n)
            .map(|i| (format!("p{i}"), json!({"enabled": true})))
            .collect();
        json!({"kubernetes": {"credential-providers": map}})
    };
    validate_patch(&providers(CredentialProviders::MAX)).unwrap();
    refused(
        providers(CredentialProviders::MAX + 1),
        "settings.kubernetes.credential-providers",
    );

    let servers: Vec<String> = (0..=TimeServers::MAX)
        .map(|i| format!("10.0.0.{i}"))
        .collect();
    validate_patch(&json!({"ntp": {"time-servers": servers[..TimeServers::MAX]}})).unwrap();
    refused(
        json!({"ntp": {"time-servers": servers}}),
        "settings.ntp.time-servers",
    );

    let sysctls: serde_json::Map<String, Value> = (0..=Sysctls::MAX)
        .map(|i| (format!("vm.k{i}"), json!("1")))
        .collect();
    refused(
        json!({"kernel": {"sysctl": sysctls}}),
        "settings.kernel.sysctl",
    );

    let pki: serde_json::Map<String, Value> = (0..=PkiBundles::MAX)
        .map(|i| (format!("ca{i}"), json!({"data": b64(PEM)})))
        .collect();
    refused(json!({ "pki": pki }), "settings.pki");

    let dns: Vec<String> = (0..17).map(|i| format!("10.96.0.{i}")).collect();
    refused(
        json!({"kubernetes": {"cluster-dns-ip": dns}}),
        "settings.kubernetes.cluster-dns-ip",
    );

    let nested = [
        (
            json!({"boot": {"kernel-parameters": {"x": vec!["1"; BootParameterValues::MAX + 1]}}}),
            "settings.boot.kernel-parameters.x",
        ),
        (
            json!({"container-registry": {"mirrors": [{"endpoint": vec!["https://m.example.com"; MirrorEndpoints::MAX + 1]}]}}),
            "settings.container-registry.mirrors[0].endpoint",
        ),
        (
            json!({"kubernetes": {"credential-providers": {"p": {"image-patterns": vec!["x"; ImagePatterns::MAX + 1]}}}}),
            "settings.kubernetes.credential-providers.p.image-patterns",
        ),
        (
            json!({"network": {"no-proxy": vec![".example.com"; NoProxyList::MAX + 1]}}),
            "settings.network.no-proxy",
        ),
    ];
    for (patch, key) in nested {
        refused(patch, key);
    }
}

#[test]
fn strings_past_their_length_are_refused_without_being_repeated() {
    let long = "a".repeat(5000);
    let err = refused(
        json!({"kubernetes": {"cluster-name": long}}),
        "settings.kubernetes.cluster-name",
    );
    assert!(err.reason().contains("at most 4096 bytes"), "{err}");
    assert!(!err.reason().contains(&"a".repeat(100)), "{err}");
}

#[test]
fn the_schema_states_the_limits() {
    let schema = settings_model::schema::json_schema();
    let kubernetes = &schema["definitions"]["Kubernetes"]["properties"];
    assert_eq!(kubernetes["node-labels"]["maxProperties"], NodeLabels::MAX);
    // One taint, or a list of at most 3.
    assert_eq!(
        kubernetes["node-taints"]["additionalProperties"]["anyOf"][1]["maxItems"],
        3
    );
    let motd = schema.to_string();
    assert!(
        motd.contains("\\\\u001B") || motd.contains("\\\\u000B-\\\\u001F"),
        "{motd}"
    );
}
