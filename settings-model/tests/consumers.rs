//! Values that are well-formed but that the program reading the rendered file refuses
//! or never uses: the model refuses them, naming the key, so that an accepted setting
//! is one the host honours. The kubelet (labels in Kubernetes' own namespaces, resources
//! it cannot reserve, a zero eviction threshold), chronyd (a word that is no option of
//! its server directive), containerd (a registry host no image reference can name) and
//! keeld's own image pulls (a pin by a digest other than sha256).
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use settings_model::{validate, validate_patch, Error};

/// The refusal of `patch` (as a patch and as whole settings), which must name `key`.
fn refused(patch: Value, key: &str) -> Error {
    let err = validate_patch(&patch).expect_err(&format!("{patch} must be refused"));
    assert_eq!(err.key(), Some(key), "{patch}: {err}");
    assert_eq!(validate(&patch).expect_err("validate agrees"), err);
    err
}

#[test]
fn node_labels_in_kubernetes_namespaces_are_the_kubelet_s_own_only() {
    for key in [
        "node-role.kubernetes.io/worker",
        "kubernetes.io/role",
        "k8s.io/x",
        "sub.k8s.io/x",
        "topology.kubernetes.io/rack",
    ] {
        let err = refused(
            json!({"kubernetes": {"node-labels": {key: "a"}}}),
            &format!("settings.kubernetes.node-labels.\"{key}\""),
        );
        assert!(err.to_string().contains("kubelet"), "{err}");
    }
    for key in [
        "node.kubernetes.io/pool",
        "x.node.kubernetes.io/y",
        "kubelet.kubernetes.io/z",
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
        "example.com/role",
        "notkubernetes.io/x",
        "role",
    ] {
        validate_patch(&json!({"kubernetes": {"node-labels": {key: "a"}}}))
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
}

#[test]
fn only_resources_the_kubelet_reserves_can_be_reserved() {
    for field in ["kube-reserved", "system-reserved"] {
        refused(
            json!({"kubernetes": {field: {"example.com/gpu": "1"}}}),
            &format!("settings.kubernetes.{field}.\"example.com/gpu\""),
        );
        validate_patch(&json!({"kubernetes": {field: {
            "cpu": "100m", "memory": "1Gi", "ephemeral-storage": "1Gi", "pid": "1000"
        }}}))
        .unwrap();
    }
}

#[test]
fn an_eviction_threshold_of_zero_is_refused_and_0_percent_means_none() {
    for zero in ["0", "0Mi", "0.0Gi", "0e3"] {
        refused(
            json!({"kubernetes": {"eviction-hard": {"memory.available": zero}}}),
            "settings.kubernetes.eviction-hard.\"memory.available\"",
        );
    }
    validate_patch(&json!({"kubernetes": {"eviction-hard": {
        "memory.available": "0%", "nodefs.available": "100Mi"
    }}}))
    .unwrap();
}

#[test]
fn ntp_options_are_chrony_s_server_options() {
    let err = refused(
        json!({"ntp": {"options": ["iburst", "prefered"]}}),
        "settings.ntp.options[1]",
    );
    assert!(err.to_string().contains("\"prefered\""), "{err}");
    refused(
        json!({"ntp": {"options": ["minpoll"]}}),
        "settings.ntp.options[0]",
    );
    for ok in [
        json!(["iburst"]),
        json!(["minpoll 4", "maxpoll 8"]),
        json!(["minpoll", "4", "prefer"]),
        json!(["nts", "xleave", "maxsamples 8"]),
        json!(["IBurst", "Prefer", "maxsources 4"]),
    ] {
        validate_patch(&json!({"ntp": {"options": ok}})).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn registry_hosts_are_spelled_as_image_references_name_them() {
    for bad in [
        "*.example.com",
        "fd00::1",
        "[fd00::1",
        "[10.0.0.1]",
        "reg.example.com:+5000",
        "reg.example.com:",
        "reg.example.com:70000",
    ] {
        refused(
            json!({"container-registry": {"mirrors": [{"registry": bad, "endpoint": ["https://m.example.com"]}]}}),
            "settings.container-registry.mirrors[0].registry",
        );
    }
    for ok in [
        "*",
        "docker.io",
        "reg.example.com:5000",
        "10.0.0.1:5000",
        "[fd00::1]:5000",
        "[fd00::1]",
        "localhost",
    ] {
        validate_patch(&json!({"container-registry": {"mirrors": [{"registry": ok, "endpoint": ["https://m.example.com"]}]}}))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn host_and_bootstrap_images_are_pinned_by_sha256_only() {
    let sha512 = format!("docker.io/library/busybox@sha512:{}", "a".repeat(128));
    refused(
        json!({"host-containers": {"admin": {"source": sha512}}}),
        "settings.host-containers.admin.source",
    );
    refused(
        json!({"bootstrap-containers": {"setup": {"source": sha512}}}),
        "settings.bootstrap-containers.setup.source",
    );
    let sha256 = format!("docker.io/library/busybox@sha256:{}", "a".repeat(64));
    validate_patch(&json!({"host-containers": {"admin": {"source": sha256}}})).unwrap();
}

#[test]
fn the_kubelet_s_certificates_are_certificate_blocks() {
    use base64::Engine as _;
    // Real certificates, in OpenSSL's form (with its trust settings) and the plain one.
    const TRUSTED: &str = include_str!("fixtures/certs/a-trusted.pem");
    const PLAIN: &str = include_str!("fixtures/certs/b.pem");
    let trusted = base64::engine::general_purpose::STANDARD.encode(TRUSTED);
    for field in ["cluster-certificate", "server-certificate"] {
        refused(
            json!({"kubernetes": {field: trusted}}),
            &format!("settings.kubernetes.{field}"),
        );
    }
    // With a CERTIFICATE block beside it, the kubelet skips the other and starts.
    let mixed = base64::engine::general_purpose::STANDARD.encode(format!("{TRUSTED}{PLAIN}"));
    validate_patch(&json!({"kubernetes": {"cluster-certificate": mixed}})).unwrap();
    // Elsewhere (settings.pki) OpenSSL's form is a trust anchor like any other.
    validate_patch(&json!({"pki": {"ca": {"data": trusted, "trusted": true}}})).unwrap();
}

/// The kubelet stops at a soft eviction threshold without a grace period for its signal.
/// The rule spans two keys, so a patch may set one of them alone (the other may be live
/// already); a commit checks each group it changes whole (`validate_groups`). What is
/// stored already (read back by `validate` at a rollback, a migration or a start) is
/// not refused by it: an older keeld accepted it.
#[test]
fn a_soft_eviction_threshold_needs_its_grace_period_in_the_committed_group() {
    let groups = ["kubernetes".to_owned()].into_iter().collect();
    let commit = |settings: &Value| settings_model::validate_groups(settings, &groups);
    let soft = json!({"kubernetes": {"eviction-soft": {
        "memory.available": "500Mi", "nodefs.available": "10%"
    }}});
    validate_patch(&soft).unwrap();
    validate(&soft).unwrap();
    let err = commit(&soft).expect_err("no grace period");
    assert_eq!(
        err.key(),
        Some("settings.kubernetes.eviction-soft-grace-period.\"memory.available\"")
    );
    assert!(err.to_string().contains("grace period"), "{err}");
    let partly = json!({"kubernetes": {
        "eviction-soft": {"memory.available": "500Mi", "nodefs.available": "10%"},
        "eviction-soft-grace-period": {"memory.available": "1m30s"}
    }});
    let err = commit(&partly).expect_err("nodefs has none");
    assert_eq!(
        err.key(),
        Some("settings.kubernetes.eviction-soft-grace-period.\"nodefs.available\"")
    );
    let both = json!({"kubernetes": {
        "eviction-soft": {"memory.available": "500Mi", "nodefs.available": "10%"},
        "eviction-soft-grace-period": {"memory.available": "1m30s", "nodefs.available": "2m"}
    }});
    commit(&both).unwrap();
    // A grace period alone the kubelet ignores.
    commit(&json!({"kubernetes": {"eviction-soft-grace-period": {"memory.available": "1m"}}}))
        .unwrap();
    // A commit that changes another group does not check this one.
    let other: std::collections::BTreeSet<String> = ["motd".to_owned()].into_iter().collect();
    let mut live = soft.clone();
    live["motd"] = json!("hello");
    settings_model::validate_groups(&live, &other).unwrap();
}

/// A commit of `kubernetes` with these settings: rules between keys of the group hold
/// for the whole group (`validate_groups`), not for a patch alone.
fn commit_kubernetes(settings: &Value) -> Result<Value, Error> {
    let groups = ["kubernetes".to_owned()].into_iter().collect();
    settings_model::validate_groups(settings, &groups)
}

/// kubelet-config names the serving certificate and key only as a pair: one alone was
/// written to its file and never used.
#[test]
fn a_serving_certificate_and_its_key_are_committed_together() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let cert = b64(include_str!("fixtures/certs/d.pem"));
    let key =
        b64("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEG\n-----END PRIVATE KEY-----\n");
    let only_cert = json!({"kubernetes": {"server-certificate": cert}});
    let only_key = json!({"kubernetes": {"server-key": key}});
    // A patch may set one of them (the other may be live already)...
    validate_patch(&only_cert).unwrap();
    validate_patch(&only_key).unwrap();
    // ...but a commit names the one missing.
    for (settings, missing) in [
        (&only_cert, "server-key"),
        (&only_key, "server-certificate"),
    ] {
        let err = commit_kubernetes(settings).expect_err(missing);
        assert_eq!(
            err.key(),
            Some(format!("settings.kubernetes.{missing}").as_str())
        );
        assert!(err.to_string().contains("set both, or neither"), "{err}");
        // Stored by an older keeld, it still reads.
        validate(settings).unwrap();
    }
    commit_kubernetes(&json!({"kubernetes": {"server-certificate": cert, "server-key": key}}))
        .unwrap();
}

/// credential-provider-config leaves out a provider without image patterns (the kubelet
/// refuses one): enabled, it would do nothing.
#[test]
fn an_enabled_credential_provider_needs_an_image_pattern() {
    for patterns in [json!(null), json!([])] {
        let mut provider = json!({"enabled": true, "cache-duration": "30m"});
        if !patterns.is_null() {
            provider["image-patterns"] = patterns;
        }
        let settings =
            json!({"kubernetes": {"credential-providers": {"ecr-credential-provider": provider}}});
        validate_patch(&settings).unwrap();
        let err = commit_kubernetes(&settings).expect_err("no pattern");
        assert_eq!(
            err.key(),
            Some("settings.kubernetes.credential-providers.ecr-credential-provider.image-patterns")
        );
    }
    // Disabled, or with a pattern, it is fine.
    commit_kubernetes(&json!({"kubernetes": {"credential-providers": {"a": {"enabled": false}}}}))
        .unwrap();
    commit_kubernetes(&json!({"kubernetes": {"credential-providers": {"a": {
        "enabled": true, "image-patterns": ["*.dkr.ecr.us-east-2.amazonaws.com"]
    }}}}))
    .unwrap();
}

/// Neither containerd nor keeld looks a registry up but by its exact host: a mirror or
/// credentials that name none, a mirror with no endpoint, credentials for "*" would
/// never be used. Refused where values come in; stored by an older keeld, they read.
#[test]
fn registry_entries_that_would_never_be_used_are_refused() {
    let cases = [
        (
            json!({"mirrors": [{"endpoint": ["https://m.example.com"]}]}),
            "settings.container-registry.mirrors[0].registry",
        ),
        (
            json!({"mirrors": [{"registry": "docker.io", "endpoint": ["https://m.example.com"]},
                               {"registry": "quay.io"}]}),
            "settings.container-registry.mirrors[1].endpoint",
        ),
        (
            json!({"mirrors": [{"registry": "quay.io", "endpoint": []}]}),
            "settings.container-registry.mirrors[0].endpoint",
        ),
        (
            json!({"credentials": [{"username": "u", "password": "p"}]}),
            "settings.container-registry.credentials[0].registry",
        ),
        (
            json!({"credentials": [{"registry": "*", "username": "u", "password": "p"}]}),
            "settings.container-registry.credentials[0].registry",
        ),
        (
            json!({"creds": [{"registry": "*", "username": "u", "password": "p"}]}),
            "settings.container-registry.credentials[0].registry",
        ),
        (
            json!({"credentials": [
                {"registry": "docker.io", "username": "u", "password": "p"},
                {"registry": "quay.io", "username": "u", "password": "p"},
                {"registry": "docker.io", "username": "v", "password": "q"}
            ]}),
            "settings.container-registry.credentials[2].registry",
        ),
        (
            // One registry under two names: both would render to one containerd table.
            json!({"credentials": [
                {"registry": "docker.io", "username": "u", "password": "p"},
                {"registry": "registry-1.docker.io", "username": "v", "password": "q"}
            ]}),
            "settings.container-registry.credentials[1].registry",
        ),
    ];
    for (registry, key) in cases {
        let settings = json!({"container-registry": registry});
        let err = validate_patch(&settings).expect_err(key);
        assert_eq!(err.key(), Some(key), "{settings}: {err}");
        validate(&settings).unwrap_or_else(|e| panic!("{settings}: stored, it must read: {e}"));
        let groups = ["container-registry".to_owned()].into_iter().collect();
        settings_model::validate_groups(&settings, &groups)
            .unwrap_or_else(|e| panic!("{settings}: a commit of its group: {e}"));
    }
    let err = validate_patch(&json!({"container-registry": {"credentials": [
        {"registry": "registry-1.docker.io", "username": "u", "password": "p"},
        {"registry": "docker.io", "username": "v", "password": "q"}
    ]}}))
    .expect_err("Docker Hub twice");
    assert!(
        err.to_string().contains("pulled from registry-1.docker.io"),
        "{err}"
    );
    // The table form (only ever input: it is stored as the list) is named as written.
    let table = json!({"container-registry": {
        "mirrors": {"docker.io": ["https://m.example.com"], "quay.io": []}
    }});
    let err = validate_patch(&table).expect_err("no endpoint");
    assert_eq!(
        err.key(),
        Some("settings.container-registry.mirrors.\"quay.io\""),
        "{err}"
    );
    assert!(err.to_string().contains("at least one endpoint"), "{err}");
    // "*" stays a mirror's registry: every registry's mirror.
    validate_patch(&json!({"container-registry": {
        "mirrors": [{"registry": "*", "endpoint": ["https://m.example.com"]}],
        "credentials": [{"registry": "docker.io", "username": "u", "password": "p"}]
    }}))
    .unwrap();
}

/// `creds` is `credentials` under Bottlerocket's older name: one patch gives one of them.
#[test]
fn creds_and_credentials_are_not_both_in_one_patch() {
    let entry = json!([{"registry": "docker.io", "username": "u", "password": "p"}]);
    let err =
        validate_patch(&json!({"container-registry": {"creds": entry, "credentials": entry}}))
            .expect_err("both");
    assert_eq!(err.key(), Some("settings.container-registry.creds"));
    validate_patch(&json!({"container-registry": {"creds": entry}})).unwrap();
    validate_patch(&json!({"container-registry": {"credentials": entry}})).unwrap();
    // Removing the one while setting the other is one list too.
    validate_patch(&json!({"container-registry": {"creds": null, "credentials": entry}})).unwrap();
}

/// Values that could only fail at run time are refused where they come in, naming the
/// key; stored by an older keeld, they still read.
#[test]
fn values_that_could_only_fail_at_run_time_are_refused() {
    let cases = [
        (
            json!({"host-containers": {"admin": {"command": []}}}),
            "settings.host-containers.admin.command",
        ),
        (
            json!({"bootstrap-containers": {"setup": {"command": []}}}),
            "settings.bootstrap-containers.setup.command",
        ),
        (
            json!({"bootstrap-containers": {"setup": {"timeout": "0s"}}}),
            "settings.bootstrap-containers.setup.timeout",
        ),
        (
            json!({"ntp": {"time-servers": ["time.example.com", "ntp://time.example.com:0"]}}),
            "settings.ntp.time-servers[1]",
        ),
        (
            json!({"ntp": {"time-servers": ["ntp://[fd00::1]:00"]}}),
            "settings.ntp.time-servers[0]",
        ),
    ];
    for (settings, key) in cases {
        let err = validate_patch(&settings).expect_err(key);
        assert_eq!(err.key(), Some(key), "{settings}: {err}");
        // Stored by an older keeld, it still reads, and a commit of its group (keeld's
        // own, switching a `once` bootstrap container off, among them) goes through.
        validate(&settings).unwrap_or_else(|e| panic!("{settings}: stored, it must read: {e}"));
        let groups = settings.as_object().unwrap().keys().cloned().collect();
        settings_model::validate_groups(&settings, &groups)
            .unwrap_or_else(|e| panic!("{settings}: a commit of its group: {e}"));
    }
    validate_patch(&json!({
        "host-containers": {"admin": {"command": ["/bin/sh", "-c", "true"]}},
        "bootstrap-containers": {"setup": {"timeout": "1s"}},
        "ntp": {"time-servers": ["ntp://time.example.com:1123", "ntp://[fd00::1]:123"]}
    }))
    .unwrap();
}

/// A commit is refused for what it brings in, not for a rule between keys that the live
/// settings break already (stored by an older keeld, which had no such rule): a boot that
/// stages new OS defaults into `kubernetes` must commit over a serving certificate stored
/// without its key.
#[test]
fn a_commit_is_not_held_back_by_a_whole_group_rule_the_live_settings_break_already() {
    use base64::Engine as _;
    let cert =
        base64::engine::general_purpose::STANDARD.encode(include_str!("fixtures/certs/d.pem"));
    let groups = ["kubernetes".to_owned()].into_iter().collect();
    let live = json!({"kubernetes": {"server-certificate": cert}});
    let with_defaults = json!({"kubernetes": {"server-certificate": cert, "credential-providers": {
        "ecr-credential-provider": {"image-patterns": ["*.dkr.ecr.*.amazonaws.com"]}
    }}});
    settings_model::validate_groups_over(&with_defaults, &live, &groups)
        .expect("the live settings broke it already");
    // Anything the commit brings in is still refused.
    let new_break = json!({"kubernetes": {"server-certificate": cert, "credential-providers": {
        "ecr-credential-provider": {"enabled": true}
    }}});
    let err =
        settings_model::validate_groups_over(&new_break, &live, &groups).expect_err("a new break");
    assert_eq!(
        err.key(),
        Some("settings.kubernetes.credential-providers.ecr-credential-provider.image-patterns")
    );
    // Over live settings that are whole, the same break is refused.
    let err = settings_model::validate_groups_over(&with_defaults, &json!({}), &groups)
        .expect_err("brought in");
    assert_eq!(err.key(), Some("settings.kubernetes.server-key"));
}
