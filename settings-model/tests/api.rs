//! Key paths, merge-patch, flattening, `key=value` typing, patch validation and the schema.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde_json::json;
use settings_model::keypair::{pairs_to_patch, parse_pair};
use settings_model::patch::{
    changed_keys, filter_prefix, flatten, merge_patch, select_keys, unflatten,
};
use settings_model::schema::{json_schema, kind_at};
use settings_model::{validate_patch, Error, KeyPath};

// ----------------------------------------------------------------------- key paths

#[test]
fn key_path_parses_quoted_segments() {
    let key = KeyPath::parse(r#"settings.kernel.sysctl."vm.max_map_count""#).unwrap();
    assert_eq!(
        key.segments(),
        ["settings", "kernel", "sysctl", "vm.max_map_count"]
    );
    assert_eq!(
        key.to_string(),
        r#"settings.kernel.sysctl."vm.max_map_count""#
    );
    assert!(key.starts_with_settings());
}

#[test]
fn key_path_quotes_only_where_needed() {
    let key = KeyPath::parse(r#""settings"."motd""#).unwrap();
    assert_eq!(key.to_string(), "settings.motd");
    let key = KeyPath::parse(r#"settings.kubernetes.node-labels."node.example.com/role""#).unwrap();
    assert_eq!(
        key.to_string(),
        r#"settings.kubernetes.node-labels."node.example.com/role""#
    );
}

#[test]
fn key_path_rejects_bad_quoting_and_empty_segments() {
    for bad in [
        "",
        "settings..motd",
        "settings.motd.",
        ".motd",
        r#"settings."unterminated"#,
        r#"settings.mo"td"#,
        r#"settings."a"b"#,
        r#"settings."""#,
        "settings.mo\ntd",
    ] {
        let err = KeyPath::parse(bad).unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{bad:?}: {err}");
        assert!(
            err.to_string().contains("malformed key path"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn parse_setting_adds_the_prefix() {
    assert_eq!(
        KeyPath::parse_setting("motd").unwrap().to_string(),
        "settings.motd"
    );
    assert_eq!(
        KeyPath::parse_setting("settings.motd").unwrap().to_string(),
        "settings.motd"
    );
    let key = KeyPath::parse_setting(r#"kernel.sysctl."vm.x""#).unwrap();
    assert_eq!(key.segments()[0], "settings");
    assert_eq!(
        key.to_patch(json!("1")),
        json!({"kernel": {"sysctl": {"vm.x": "1"}}})
    );
}

// ----------------------------------------------------------------------- merge-patch

#[test]
fn merge_patch_null_removes_and_objects_merge() {
    let mut target = json!({"motd": "hi", "kernel": {"sysctl": {"a": "1", "b": "2"}}});
    merge_patch(
        &mut target,
        &json!({"motd": null, "kernel": {"sysctl": {"a": null, "c": "3"}}, "ntp": {"time-servers": ["x"]}}),
    );
    assert_eq!(
        target,
        json!({"kernel": {"sysctl": {"b": "2", "c": "3"}}, "ntp": {"time-servers": ["x"]}})
    );
}

#[test]
fn merge_patch_replaces_arrays_and_scalars() {
    let mut target = json!({"dns": {"name-servers": ["1.1.1.1", "8.8.8.8"]}, "motd": {"x": 1}});
    merge_patch(
        &mut target,
        &json!({"dns": {"name-servers": ["9.9.9.9"]}, "motd": "m"}),
    );
    assert_eq!(
        target,
        json!({"dns": {"name-servers": ["9.9.9.9"]}, "motd": "m"})
    );
    let mut scalar = json!("old");
    merge_patch(&mut scalar, &json!({"a": null, "b": 1}));
    assert_eq!(scalar, json!({"b": 1}));
}

// ----------------------------------------------------------------------- flattening

#[test]
fn flatten_and_unflatten_round_trip() {
    let settings = json!({
        "motd": "hi",
        "kernel": {"sysctl": {"vm.x": "1"}},
        "dns": {"name-servers": ["1.1.1.1"]},
        "host-containers": {}
    });
    let flat = flatten(&settings);
    let keys: Vec<&str> = flat.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "settings.dns.name-servers",
            "settings.host-containers",
            r#"settings.kernel.sysctl."vm.x""#,
            "settings.motd",
        ]
    );
    assert_eq!(flat["settings.host-containers"], json!({}));
    assert_eq!(unflatten(&flat), settings);
}

#[test]
fn unflatten_accepts_keys_without_prefix() {
    let mut flat = BTreeMap::new();
    flat.insert("motd".to_owned(), json!("x"));
    flat.insert("settings.ntp.time-servers".to_owned(), json!([]));
    assert_eq!(
        unflatten(&flat),
        json!({"motd": "x", "ntp": {"time-servers": []}})
    );
}

#[test]
fn changed_keys_lists_added_removed_and_changed_leaves() {
    let old = json!({"motd": "a", "kernel": {"sysctl": {"x": "1", "y": "2"}}, "aws": {"region": "us-west-2"}});
    let new = json!({"motd": "b", "kernel": {"sysctl": {"x": "1", "z": "3"}}, "aws": {"region": "us-west-2"}});
    assert_eq!(
        changed_keys(&old, &new),
        [
            "settings.kernel.sysctl.y",
            "settings.kernel.sysctl.z",
            "settings.motd"
        ]
    );
    assert!(changed_keys(&old, &old).is_empty());
}

#[test]
fn filter_prefix_keeps_matching_leaves_by_string_prefix() {
    let root = json!({
        "settings": {"motd": "hi", "host-containers": {"admin": {"enabled": true}, "control": {"enabled": false}}},
        "os": {"arch": "x86_64"}
    });
    assert_eq!(
        filter_prefix(&root, "settings.host-containers.adm"),
        json!({"settings": {"host-containers": {"admin": {"enabled": true}}}})
    );
    assert_eq!(
        filter_prefix(&root, "os"),
        json!({"os": {"arch": "x86_64"}})
    );
    assert_eq!(filter_prefix(&root, "settings.nothing"), json!({}));
    assert_eq!(filter_prefix(&root, ""), root);
}

#[test]
fn select_keys_keeps_subtrees() {
    let settings =
        json!({"motd": "hi", "kernel": {"sysctl": {"vm.x": "1", "y": "2"}, "lockdown": "none"}});
    let keys = [
        KeyPath::parse_setting("motd").unwrap(),
        KeyPath::parse_setting(r#"kernel.sysctl."vm.x""#).unwrap(),
        KeyPath::parse_setting("ntp").unwrap(),
    ];
    assert_eq!(
        select_keys(&settings, &keys),
        json!({"motd": "hi", "kernel": {"sysctl": {"vm.x": "1"}}})
    );
}

// ----------------------------------------------------------------------- key=value

#[test]
fn keypair_types_values_by_the_model() {
    let (key, value) = parse_pair("motd=42").unwrap();
    assert_eq!(
        (key.to_string().as_str(), value),
        ("settings.motd", json!("42"))
    );
    let (_, value) = parse_pair("settings.host-containers.admin.enabled=true").unwrap();
    assert_eq!(value, json!(true));
    let (key, value) = parse_pair(r#"kernel.sysctl."vm.x"=1"#).unwrap();
    assert_eq!(key.segments().last().unwrap(), "vm.x");
    assert_eq!(value, json!("1"));
    assert_eq!(parse_pair("kubernetes.max-pods=110").unwrap().1, json!(110));
    assert_eq!(parse_pair("motd=a=b").unwrap().1, json!("a=b"));
}

#[test]
fn keypair_string_or_array_fields() {
    assert_eq!(
        parse_pair("kubernetes.cluster-dns-ip=10.0.0.1").unwrap().1,
        json!("10.0.0.1")
    );
    assert_eq!(
        parse_pair(r#"kubernetes.cluster-dns-ip=["10.0.0.1","10.0.0.2"]"#)
            .unwrap()
            .1,
        json!(["10.0.0.1", "10.0.0.2"])
    );
    assert_eq!(
        parse_pair(r#"ntp.time-servers=["pool.ntp.org"]"#)
            .unwrap()
            .1,
        json!(["pool.ntp.org"])
    );
}

#[test]
fn keypair_errors_name_the_key() {
    let err = parse_pair("kubernetes.max-pods=abc").unwrap_err();
    assert!(matches!(err, Error::BadValue { .. }), "{err}");
    assert_eq!(err.key(), Some("settings.kubernetes.max-pods"));
    let err = parse_pair("host-containers.admin.enabled=yes").unwrap_err();
    assert_eq!(err.key(), Some("settings.host-containers.admin.enabled"));
    let err = parse_pair("bogus.key=1").unwrap_err();
    assert!(matches!(err, Error::BadKey { .. }), "{err}");
    assert_eq!(err.key(), Some("settings.bogus.key"));
    let err = parse_pair("host-containers.admin.source=NOT VALID").unwrap_err();
    assert_eq!(err.key(), Some("settings.host-containers.admin.source"));
    assert!(parse_pair("motd").is_err());
}

#[test]
fn pairs_merge_into_one_patch() {
    let patch = pairs_to_patch(&[
        "motd=hi".to_owned(),
        "settings.host-containers.admin.enabled=true".to_owned(),
        "host-containers.admin.superpowered=false".to_owned(),
    ])
    .unwrap();
    assert_eq!(
        patch,
        json!({"motd": "hi", "host-containers": {"admin": {"enabled": true, "superpowered": false}}})
    );
}

/// Each pair may be valid alone and the patch they make together not: `creds` and
/// `credentials` are one list under two names.
#[test]
fn pairs_are_validated_together_too() {
    let entry = r#"[{"registry":"docker.io","username":"u","password":"p"}]"#;
    let err = pairs_to_patch(&[
        format!("container-registry.creds={entry}"),
        format!("container-registry.credentials={entry}"),
    ])
    .expect_err("both names");
    assert_eq!(err.key(), Some("settings.container-registry.creds"));
}

/// A `null` inside a pair's value is a removal, as it is in a JSON patch, whether one
/// pair or several make the patch; a later pair wins over an earlier one.
#[test]
fn pairs_keep_their_removals() {
    let one = pairs_to_patch(&[r#"kernel.sysctl={"vm.swappiness":null}"#.to_owned()]).unwrap();
    assert_eq!(one, json!({"kernel": {"sysctl": {"vm.swappiness": null}}}));
    let two = pairs_to_patch(&[
        r#"kernel.sysctl={"vm.swappiness":null,"vm.a":"1"}"#.to_owned(),
        r#"kernel.sysctl."vm.swappiness"=10"#.to_owned(),
        r#"kubernetes.node-labels={"gone":null}"#.to_owned(),
    ])
    .unwrap();
    assert_eq!(
        two,
        json!({
            "kernel": {"sysctl": {"vm.swappiness": "10", "vm.a": "1"}},
            "kubernetes": {"node-labels": {"gone": null}}
        })
    );
    let mut stored = json!({"kernel": {"sysctl": {"vm.swappiness": "60", "vm.b": "2"}}});
    merge_patch(&mut stored, &one);
    assert_eq!(stored, json!({"kernel": {"sysctl": {"vm.b": "2"}}}));
}

// ----------------------------------------------------------------------- validate_patch

#[test]
fn validate_patch_rejects_unknown_keys_even_as_removals() {
    let err = validate_patch(&json!({"bogus": null})).unwrap_err();
    assert!(matches!(err, Error::BadKey { .. }), "{err}");
    assert_eq!(err.key(), Some("settings.bogus"));
    let err = validate_patch(&json!({"kubernetes": {"max-pod": null}})).unwrap_err();
    assert_eq!(err.key(), Some("settings.kubernetes.max-pod"));
    let err = validate_patch(&json!({"bogus": 1})).unwrap_err();
    assert_eq!(err.key(), Some("settings.bogus"));
}

#[test]
fn validate_patch_accepts_removals_of_known_keys() {
    validate_patch(&json!({
        "motd": null,
        "host-containers": {"admin": null, "control": {"source": null, "enabled": true}},
        "kernel": {"sysctl": {"vm.x": null}}
    }))
    .unwrap();
}

#[test]
fn validate_reports_paths_inside_arrays() {
    let err = settings_model::validate(&json!({
        "container-registry": {"mirrors": [{"registry": "docker.io", "endpoint": ["https://ok.example.com", "nope"]}]}
    }))
    .unwrap_err();
    assert_eq!(
        err.key(),
        Some("settings.container-registry.mirrors[0].endpoint[1]")
    );
}

#[test]
fn validate_keeps_strings_as_given() {
    let input =
        json!({"network": {"https-proxy": "1.2.3.4:8080"}, "dns": {"name-servers": ["::0001"]}});
    assert_eq!(settings_model::validate(&input).unwrap(), input);
}

// ----------------------------------------------------------------------- schema

#[test]
fn schema_contains_every_group() {
    let schema = json_schema();
    let text = schema.to_string();
    for group in [
        "motd",
        "host-containers",
        "bootstrap-containers",
        "bootstrap-commands",
        "kubernetes",
        "ntp",
        "network",
        "dns",
        "container-registry",
        "container-runtime",
        "kernel",
        "boot",
        "pki",
        "aws",
    ] {
        let key = KeyPath::parse_setting(group).unwrap();
        assert!(kind_at(&key).is_some(), "{group} missing");
        assert!(
            text.contains(&format!("\"{group}\"")),
            "{group} not in schema"
        );
    }
    assert!(schema["properties"]["settings"].is_object());
}

#[test]
fn kind_at_describes_types() {
    let kinds = |k: &str| kind_at(&KeyPath::parse_setting(k).unwrap()).unwrap();
    assert!(kinds("motd").string);
    assert!(kinds("host-containers.anything.enabled").boolean);
    assert!(kinds("kubernetes.max-pods").integer);
    let dns_ip = kinds("kubernetes.cluster-dns-ip");
    assert!(dns_ip.string && dns_ip.array);
    assert!(kinds("kubernetes.memory-manager-policy").string);
    assert!(kinds("host-containers").object);
    assert!(kind_at(&KeyPath::parse_setting("nope").unwrap()).is_none());
    assert!(kind_at(&KeyPath::parse_setting("motd.deeper").unwrap()).is_none());
}

/// Validation stores some accepted forms under another name or shape (`creds` as
/// `credentials`, a table of mirrors as a list): the keys a patch names are then not where
/// the change is, and the changed keys must still find it.
#[test]
fn changed_keys_touched_finds_what_validation_stored_elsewhere() {
    use settings_model::patch::{changed_keys, changed_keys_touched, merge_patch};
    let old = settings_model::validate(&json!({"motd": "a"})).unwrap();
    let patches = [
        json!({"container-registry": {"creds": [
            {"registry": "docker.io", "username": "u", "password": "p"}]}}),
        json!({"container-registry": {"mirrors": {"docker.io": ["https://m.example.com"]}}}),
        json!({"container-registry": {"mirrors": {"docker.io": ["https://m.example.com"]}},
               "motd": "b"}),
    ];
    for patch in &patches {
        let mut merged = old.clone();
        merge_patch(&mut merged, patch);
        let new = settings_model::validate(&merged).unwrap();
        let changed = changed_keys(&old, &new);
        assert!(
            changed
                .iter()
                .any(|k| k.starts_with("settings.container-registry.")),
            "{patch}: {changed:?}"
        );
        assert_eq!(
            changed_keys_touched(&old, &new, &[patch]),
            changed,
            "{patch}"
        );
    }
}

#[test]
fn changed_keys_touched_agrees_with_changed_keys() {
    use settings_model::patch::{changed_keys, changed_keys_touched, merge_patch};
    let old = json!({"motd": "a", "kernel": {"sysctl": {"a.b": "1", "c.d": "2"}},
        "ntp": {"time-servers": ["x"]}, "host-containers": {"admin": {"enabled": true}}});
    let patches = [
        json!({"motd": "b"}),
        json!({"kernel": {"sysctl": {"a.b": null, "e.f": "3"}}}),
        json!({"kernel": {"sysctl": null}}),
        json!({"ntp": {"time-servers": ["x"]}}),
        json!({"host-containers": {"admin": null, "control": {"enabled": false}}}),
        json!({"dns": {"name-servers": ["10.0.0.1"]}, "motd": null}),
        json!({"kernel": {}}),
    ];
    for patch in &patches {
        let mut new = old.clone();
        merge_patch(&mut new, patch);
        assert_eq!(
            changed_keys_touched(&old, &new, &[patch]),
            changed_keys(&old, &new),
            "{patch}"
        );
    }
    // Several patches in turn.
    let mut new = old.clone();
    merge_patch(&mut new, &patches[1]);
    merge_patch(&mut new, &patches[4]);
    assert_eq!(
        changed_keys_touched(&old, &new, &[&patches[1], &patches[4]]),
        changed_keys(&old, &new)
    );
}

#[test]
fn the_pod_sandbox_image_must_be_in_a_registry() {
    let err = settings_model::validate(&json!({
        "kubernetes": {"pod-infra-container-image": "oci-archive:/local/pause.tar"}
    }))
    .unwrap_err();
    assert_eq!(
        err.key(),
        Some("settings.kubernetes.pod-infra-container-image")
    );
    settings_model::validate(&json!({
        "kubernetes": {"pod-infra-container-image": "registry.k8s.io/pause:3.9"}
    }))
    .unwrap();
}

#[test]
fn a_soft_limit_above_its_hard_limit_is_refused() {
    for (hard, soft) in [(json!(1024), json!("unlimited")), (json!("10"), json!(11))] {
        let err = settings_model::validate(&json!({
            "oci-defaults": {"resource-limits": {"max-open-files": {"hard-limit": hard, "soft-limit": soft}}}
        }))
        .unwrap_err();
        assert_eq!(
            err.key(),
            Some("settings.oci-defaults.resource-limits.max-open-files.soft-limit"),
            "{err}"
        );
    }
    for (hard, soft) in [
        (json!("unlimited"), json!(1024)),
        (json!(-1), json!(-1)),
        (json!(8), json!(8)),
    ] {
        settings_model::validate(&json!({
            "oci-defaults": {"resource-limits": {"max-open-files": {"hard-limit": hard, "soft-limit": soft}}}
        }))
        .unwrap();
    }
}

#[test]
fn an_argument_with_a_nul_is_refused_with_its_place() {
    for (settings, key) in [
        (
            json!({"host-containers": {"a": {"command": ["sh", "-c", "x\u{0}y"]}}}),
            "settings.host-containers.a.command[2]",
        ),
        (
            json!({"bootstrap-commands": {"b": {"commands": [["apiclient", "set", "motd=\u{0}"]]}}}),
            "settings.bootstrap-commands.b.commands[0][2]",
        ),
    ] {
        let err = settings_model::validate(&settings).unwrap_err();
        assert_eq!(err.key(), Some(key), "{err}");
    }
    // Newlines and tabs stay allowed: `sh -c` scripts have them.
    settings_model::validate(
        &json!({"host-containers": {"a": {"command": ["sh", "-c", "a\n\tb"]}}}),
    )
    .unwrap();
}
