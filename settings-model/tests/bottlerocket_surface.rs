//! The settings Bottlerocket's aws-k8s, aws-ecs and aws-dev variants accept beyond Keel's
//! first model: a user-data that sets every one of them is accepted and stored as given,
//! the forms Bottlerocket also accepts are stored as Bottlerocket stores them, and bad
//! input for each (wrong type, wrong grammar, out of range, unknown sub-key) is refused
//! naming the full key.
#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use serde_json::{json, Value};
use settings_model::keypair::parse_pair;
use settings_model::userdata::parse_user_data;
use settings_model::{validate, validate_patch};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A real certificate: every CERTIFICATE block is parsed as X.509.
const CERT: &str = include_str!("fixtures/certs/a.pem");
const KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEG\n-----END PRIVATE KEY-----\n";
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: web\n    image: nginx\n";

/// A Bottlerocket aws-k8s user-data using every group and key this file is about.
fn user_data() -> String {
    format!(
        r#"
[settings.updates]
metadata-base-url = "https://updates.bottlerocket.aws/2020-07-07/aws-k8s-1.31/x86_64/"
targets-base-url = "https://updates.bottlerocket.aws/targets/"
seed = 1234
version-lock = "v1.26.2"
ignore-waves = false

[settings.metrics]
metrics-url = "https://metrics.bottlerocket.aws/v1/metrics"
send-metrics = true
service-checks = ["apiserver", "chronyd", "containerd", "host-containerd", "kubelet"]

[settings.network]
hostname = "node-1.example.internal"
hosts = [["10.0.0.5", ["db", "db.example.internal"]], ["127.0.0.1", ["local-alias"]]]

[settings.ntp]
time-servers = ["169.254.169.123"]
options = ["minpoll", "4", "maxpoll 8"]

[settings.oci-defaults.capabilities]
chown = true
sys-admin = false
net-raw = true

[settings.oci-defaults.resource-limits.max-open-files]
hard-limit = 1048576
soft-limit = 65536

[settings.oci-defaults.resource-limits.max-processes]
hard-limit = "unlimited"
soft-limit = -1

[settings.oci-hooks]
log4j-hotpatch-enabled = false

[settings.cloudformation]
should-signal = true
stack-name = "my-stack"
logical-resource-id = "MyNodeGroup"

[settings.autoscaling]
should-wait = true

[settings.ecs]
cluster = "arn:aws:ecs:us-west-2:123456789012:cluster/default"
allow-privileged-containers = false
logging-drivers = ["json-file", "awslogs", "none"]
loglevel = "info"
enable-spot-instance-draining = true
image-pull-behavior = "prefer-cached"
container-stop-timeout = "30s"
task-cleanup-wait = "3h"
metadata-service-rps = 40
metadata-service-burst = 60
reserved-memory = 32
image-cleanup-wait = "1h30m"
image-cleanup-delete-per-cycle = 5
image-cleanup-enabled = true
image-cleanup-age = "1h"
backend-host = "https://ecs.us-west-2.amazonaws.com"
awsvpc-block-imds = true
enable-container-metadata = true

[settings.ecs.instance-attributes]
"attribute.name" = "attribute value"

[settings.kernel.modules.sctp]
allowed = false

[settings.kernel.modules.br_netfilter]
allowed = true
autoload = true

[settings.kubernetes]
api-server = "https://api.example.com"
cluster-name = "prod"
cpu-cfs-quota-enforced = false
cpu-manager-policy = "static"
cpu-manager-policy-options = ["full-pcpus-only"]
pod-pids-limit = 4096
log-level = 4
server-certificate = "{cert}"
server-key = "{key}"
seccomp-default = true
reserved-cpus = "0-1"
static-pods-enabled = true
container-log-max-workers = 2
container-log-monitor-interval = "10s"
image-gc-high-threshold-percent = 85
image-gc-low-threshold-percent = "80"
image-minimum-gc-age = "2m"
image-maximum-gc-age = "168h"
device-ownership-from-security-context = true
single-process-oom-kill = false
max-parallel-image-pulls = 5
hostname-override-source = "instance-id"

[settings.kubernetes.static-pods.web]
enabled = true
manifest = "{pod}"
"#,
        cert = b64(CERT),
        key = b64(KEY),
        pod = b64(POD),
    )
}

#[test]
fn a_bottlerocket_user_data_with_every_new_group_is_stored_as_given() {
    let patch = parse_user_data("user-data", &user_data()).unwrap();
    let stored = validate(&patch).unwrap();
    assert_eq!(stored, patch, "stored exactly as given");
    assert_eq!(stored["kubernetes"]["image-gc-low-threshold-percent"], "80");
    assert_eq!(
        stored["oci-defaults"]["resource-limits"]["max-processes"]["hard-limit"],
        "unlimited"
    );
    assert_eq!(
        stored["network"]["hosts"][0],
        json!(["10.0.0.5", ["db", "db.example.internal"]])
    );
    // Every group is in the schema, so editors see it too.
    let schema = settings_model::schema::json_schema();
    let groups = &schema["definitions"]["Settings"]["properties"];
    for group in [
        "updates",
        "metrics",
        "oci-defaults",
        "oci-hooks",
        "cloudformation",
        "autoscaling",
        "ecs",
    ] {
        assert!(groups.get(group).is_some(), "{group} is not in the schema");
    }
}

#[test]
fn forms_bottlerocket_also_accepts_are_stored_as_bottlerocket_stores_them() {
    let stored = validate(&json!({
        "kubernetes": {
            "node-taints": {"dedicated": "experimental:NoSchedule", "special": ["a:NoExecute"]},
            "cpu-manager-policy": "Static",
            "memory-manager-policy": "static"
        },
        "container-registry": {
            "mirrors": {"docker.io": ["https://mirror.example.com"]},
            "creds": [{"registry": "docker.io", "username": "u", "password": "p"}]
        }
    }))
    .unwrap();
    assert_eq!(
        stored["kubernetes"]["node-taints"],
        json!({"dedicated": ["experimental:NoSchedule"], "special": ["a:NoExecute"]})
    );
    assert_eq!(stored["kubernetes"]["cpu-manager-policy"], "static");
    assert_eq!(stored["kubernetes"]["memory-manager-policy"], "Static");
    assert_eq!(
        stored["container-registry"]["mirrors"],
        json!([{"registry": "docker.io", "endpoint": ["https://mirror.example.com"]}])
    );
    assert_eq!(
        stored["container-registry"]["credentials"][0]["username"],
        "u"
    );
    assert!(stored["container-registry"].get("creds").is_none());
    // The schema takes every spelling the model takes.
    let schema = settings_model::schema::json_schema();
    for (name, spelling) in [
        ("CpuManagerPolicy", "Static"),
        ("MemoryManagerPolicy", "static"),
    ] {
        let values = schema["definitions"][name]["enum"].as_array().unwrap();
        assert!(values.contains(&json!(spelling)), "{name}: {values:?}");
    }
    // A `creds` merged over stored `credentials` replaces them.
    let stored = validate(&json!({"container-registry": {
        "credentials": [{"registry": "old.example.com", "username": "old"}],
        "creds": [{"registry": "new.example.com", "username": "new"}]
    }}))
    .unwrap();
    assert_eq!(
        stored["container-registry"]["credentials"],
        json!([{"registry": "new.example.com", "username": "new"}])
    );
}

/// Refuses `patch` (as a PATCH and as a whole model), naming `key`.
#[track_caller]
fn refused(patch: Value, key: &str) -> String {
    let err = validate_patch(&patch).unwrap_err();
    assert_eq!(err.key(), Some(key), "{patch}: {err}");
    let err = validate(&patch).unwrap_err();
    assert_eq!(err.key(), Some(key), "{patch}: {err}");
    err.to_string()
}

#[test]
fn bad_input_for_every_new_key_is_refused_naming_the_full_key() {
    let cases: Vec<(Value, &str)> = vec![
        // updates
        (
            json!({"updates": {"metadata-base-url": 5}}),
            "settings.updates.metadata-base-url",
        ),
        (
            json!({"updates": {"metadata-base-url": "how are you"}}),
            "settings.updates.metadata-base-url",
        ),
        (
            json!({"updates": {"targets-base-url": "http://a\nb"}}),
            "settings.updates.targets-base-url",
        ),
        (json!({"updates": {"seed": -1}}), "settings.updates.seed"),
        (
            json!({"updates": {"seed": 4294967296u64}}),
            "settings.updates.seed",
        ),
        (json!({"updates": {"seed": "12"}}), "settings.updates.seed"),
        (
            json!({"updates": {"version-lock": "1.0"}}),
            "settings.updates.version-lock",
        ),
        (
            json!({"updates": {"version-lock": "newest"}}),
            "settings.updates.version-lock",
        ),
        (
            json!({"updates": {"ignore-waves": "yes"}}),
            "settings.updates.ignore-waves",
        ),
        (json!({"updates": {"wave": 1}}), "settings.updates.wave"),
        // metrics
        (
            json!({"metrics": {"metrics-url": ""}}),
            "settings.metrics.metrics-url",
        ),
        (
            json!({"metrics": {"send-metrics": 1}}),
            "settings.metrics.send-metrics",
        ),
        (
            json!({"metrics": {"service-checks": "kubelet"}}),
            "settings.metrics.service-checks",
        ),
        (
            json!({"metrics": {"service-checks": ["a\nb"]}}),
            "settings.metrics.service-checks[0]",
        ),
        (
            json!({"metrics": {"service-checks": vec!["x"; 65]}}),
            "settings.metrics.service-checks",
        ),
        (json!({"metrics": {"url": "x"}}), "settings.metrics.url"),
        // oci-defaults
        (
            json!({"oci-defaults": {"capabilities": {"CAP_SYS_ADMIN": true}}}),
            "settings.oci-defaults.capabilities.CAP_SYS_ADMIN",
        ),
        (
            json!({"oci-defaults": {"capabilities": {"sys-admin": "yes"}}}),
            "settings.oci-defaults.capabilities.sys-admin",
        ),
        (
            json!({"oci-defaults": {"capabilities": ["chown"]}}),
            "settings.oci-defaults.capabilities",
        ),
        (
            json!({"oci-defaults": {"resource-limits": {"nofile": {"hard-limit": 1}}}}),
            "settings.oci-defaults.resource-limits.nofile",
        ),
        (
            json!({"oci-defaults": {"resource-limits": {"max-open-files": {"hard-limit": -2}}}}),
            "settings.oci-defaults.resource-limits.max-open-files.hard-limit",
        ),
        (
            json!({"oci-defaults": {"resource-limits": {"max-open-files": {"soft-limit": "abc"}}}}),
            "settings.oci-defaults.resource-limits.max-open-files.soft-limit",
        ),
        (
            json!({"oci-defaults": {"resource-limits": {"max-open-files": {"soft-limit": 9223372036854775808u64}}}}),
            "settings.oci-defaults.resource-limits.max-open-files.soft-limit",
        ),
        (
            json!({"oci-defaults": {"resource-limits": {"max-open-files": {"soft-limit": 1.5}}}}),
            "settings.oci-defaults.resource-limits.max-open-files.soft-limit",
        ),
        (
            json!({"oci-defaults": {"resource-limits": {"max-open-files": {"limit": 1}}}}),
            "settings.oci-defaults.resource-limits.max-open-files.limit",
        ),
        (
            json!({"oci-defaults": {"seccomp": true}}),
            "settings.oci-defaults.seccomp",
        ),
        // oci-hooks, cloudformation, autoscaling
        (
            json!({"oci-hooks": {"log4j-hotpatch-enabled": "false"}}),
            "settings.oci-hooks.log4j-hotpatch-enabled",
        ),
        (
            json!({"oci-hooks": {"other": true}}),
            "settings.oci-hooks.other",
        ),
        (
            json!({"cloudformation": {"should-signal": "true"}}),
            "settings.cloudformation.should-signal",
        ),
        (
            json!({"cloudformation": {"stack-name": "a\nb"}}),
            "settings.cloudformation.stack-name",
        ),
        (
            json!({"cloudformation": {"logical-resource-id": 7}}),
            "settings.cloudformation.logical-resource-id",
        ),
        (
            json!({"cloudformation": {"region": "x"}}),
            "settings.cloudformation.region",
        ),
        (
            json!({"autoscaling": {"should-wait": 1}}),
            "settings.autoscaling.should-wait",
        ),
        (
            json!({"autoscaling": {"hook": "x"}}),
            "settings.autoscaling.hook",
        ),
        // ecs
        (json!({"ecs": {"cluster": ["a"]}}), "settings.ecs.cluster"),
        (
            json!({"ecs": {"instance-attributes": {"no spaces": "v"}}}),
            "settings.ecs.instance-attributes.\"no spaces\"",
        ),
        (
            json!({"ecs": {"instance-attributes": {"k": " lead"}}}),
            "settings.ecs.instance-attributes.k",
        ),
        (
            json!({"ecs": {"loglevel": "warning"}}),
            "settings.ecs.loglevel",
        ),
        (
            json!({"ecs": {"image-pull-behavior": "never"}}),
            "settings.ecs.image-pull-behavior",
        ),
        (
            json!({"ecs": {"container-stop-timeout": "ten seconds"}}),
            "settings.ecs.container-stop-timeout",
        ),
        (
            json!({"ecs": {"reserved-memory": 70000}}),
            "settings.ecs.reserved-memory",
        ),
        (
            json!({"ecs": {"metadata-service-rps": "40"}}),
            "settings.ecs.metadata-service-rps",
        ),
        (
            json!({"ecs": {"logging-drivers": vec!["x"; 17]}}),
            "settings.ecs.logging-drivers",
        ),
        (json!({"ecs": {"agent": true}}), "settings.ecs.agent"),
        // network.hosts
        (
            json!({"network": {"hosts": "10.0.0.1 a"}}),
            "settings.network.hosts",
        ),
        (
            json!({"network": {"hosts": [["10.0.0.0/24", ["a"]]]}}),
            "settings.network.hosts[0][0]",
        ),
        (
            json!({"network": {"hosts": [["10.0.0.1", ["not_a_valid_hostname!"]]]}}),
            "settings.network.hosts[0][1][0]",
        ),
        (
            json!({"network": {"hosts": [["10.0.0.1"]]}}),
            "settings.network.hosts[0]",
        ),
        (
            json!({"network": {"hosts": [["10.0.0.1", ["a"], "x"]]}}),
            "settings.network.hosts[0]",
        ),
        (
            json!({"network": {"hosts": [["10.0.0.1", "a"]]}}),
            "settings.network.hosts[0][1]",
        ),
        // ntp.options
        (
            json!({"ntp": {"options": "iburst"}}),
            "settings.ntp.options",
        ),
        (
            json!({"ntp": {"options": ["iburst\nserver evil"]}}),
            "settings.ntp.options[0]",
        ),
        (
            json!({"ntp": {"options": ["#x"]}}),
            "settings.ntp.options[0]",
        ),
        // kernel.modules
        (
            json!({"kernel": {"modules": {"sctp": {"autoload": "yes"}}}}),
            "settings.kernel.modules.sctp.autoload",
        ),
        (
            json!({"kernel": {"modules": {"../x": {"allowed": false}}}}),
            "settings.kernel.modules.\"../x\"",
        ),
        // kubernetes
        (
            json!({"kubernetes": {"static-pods": {"bad_name": {"enabled": true}}}}),
            "settings.kubernetes.static-pods.bad_name",
        ),
        (
            json!({"kubernetes": {"static-pods": {"web": {"manifest": "not base64!"}}}}),
            "settings.kubernetes.static-pods.web.manifest",
        ),
        (
            json!({"kubernetes": {"static-pods": {"web": {"manifest": b64("a\u{1b}b")}}}}),
            "settings.kubernetes.static-pods.web.manifest",
        ),
        (
            json!({"kubernetes": {"static-pods": {"web": {"enabled": "true"}}}}),
            "settings.kubernetes.static-pods.web.enabled",
        ),
        (
            json!({"kubernetes": {"static-pods": {"web": {"path": "/x"}}}}),
            "settings.kubernetes.static-pods.web.path",
        ),
        (
            json!({"kubernetes": {"static-pods-enabled": 1}}),
            "settings.kubernetes.static-pods-enabled",
        ),
        (
            json!({"kubernetes": {"cpu-cfs-quota-enforced": "false"}}),
            "settings.kubernetes.cpu-cfs-quota-enforced",
        ),
        (
            json!({"kubernetes": {"cpu-manager-policy-options": ["fullPCPUsOnly"]}}),
            "settings.kubernetes.cpu-manager-policy-options[0]",
        ),
        (
            json!({"kubernetes": {"cpu-manager-policy-options": "full-pcpus-only"}}),
            "settings.kubernetes.cpu-manager-policy-options",
        ),
        (
            json!({"kubernetes": {"cpu-manager-policy": "dynamic"}}),
            "settings.kubernetes.cpu-manager-policy",
        ),
        (
            json!({"kubernetes": {"pod-pids-limit": "4096"}}),
            "settings.kubernetes.pod-pids-limit",
        ),
        (
            json!({"kubernetes": {"pod-pids-limit": 9223372036854775808u64}}),
            "settings.kubernetes.pod-pids-limit",
        ),
        (
            json!({"kubernetes": {"log-level": 256}}),
            "settings.kubernetes.log-level",
        ),
        (
            json!({"kubernetes": {"log-level": -1}}),
            "settings.kubernetes.log-level",
        ),
        (
            json!({"kubernetes": {"server-certificate": b64("not a certificate")}}),
            "settings.kubernetes.server-certificate",
        ),
        (
            json!({"kubernetes": {"server-key": b64(CERT)}}),
            "settings.kubernetes.server-key",
        ),
        (
            json!({"kubernetes": {"server-key": "%%%"}}),
            "settings.kubernetes.server-key",
        ),
        (
            json!({"kubernetes": {"seccomp-default": "true"}}),
            "settings.kubernetes.seccomp-default",
        ),
        (
            json!({"kubernetes": {"reserved-cpus": "0..3"}}),
            "settings.kubernetes.reserved-cpus",
        ),
        (
            json!({"kubernetes": {"container-log-max-workers": 2147483648u64}}),
            "settings.kubernetes.container-log-max-workers",
        ),
        (
            json!({"kubernetes": {"container-log-monitor-interval": "10 seconds"}}),
            "settings.kubernetes.container-log-monitor-interval",
        ),
        (
            json!({"kubernetes": {"image-gc-high-threshold-percent": 101}}),
            "settings.kubernetes.image-gc-high-threshold-percent",
        ),
        (
            json!({"kubernetes": {"image-gc-low-threshold-percent": "-1"}}),
            "settings.kubernetes.image-gc-low-threshold-percent",
        ),
        (
            json!({"kubernetes": {"image-gc-low-threshold-percent": 1.5}}),
            "settings.kubernetes.image-gc-low-threshold-percent",
        ),
        (
            json!({"kubernetes": {"image-minimum-gc-age": 5}}),
            "settings.kubernetes.image-minimum-gc-age",
        ),
        (
            json!({"kubernetes": {"image-maximum-gc-age": "1w"}}),
            "settings.kubernetes.image-maximum-gc-age",
        ),
        (
            json!({"kubernetes": {"device-ownership-from-security-context": "yes"}}),
            "settings.kubernetes.device-ownership-from-security-context",
        ),
        (
            json!({"kubernetes": {"single-process-oom-kill": 0}}),
            "settings.kubernetes.single-process-oom-kill",
        ),
        (
            json!({"kubernetes": {"max-parallel-image-pulls": "5"}}),
            "settings.kubernetes.max-parallel-image-pulls",
        ),
        (
            json!({"kubernetes": {"hostname-override-source": "hostname"}}),
            "settings.kubernetes.hostname-override-source",
        ),
        (
            json!({"kubernetes": {"node-taints": {"k": ":Bad"}}}),
            "settings.kubernetes.node-taints.k",
        ),
        (
            json!({"kubernetes": {"node-taints": {"k": 1}}}),
            "settings.kubernetes.node-taints.k",
        ),
        // container-registry, in the forms Bottlerocket also accepts
        (
            json!({"container-registry": {"mirrors": {"docker.io": ["https://<mirror>"]}}}),
            "settings.container-registry.mirrors.\"docker.io\"[0]",
        ),
        (
            json!({"container-registry": {"mirrors": {"bad host!": ["https://m.example.com"]}}}),
            "settings.container-registry.mirrors.\"bad host!\"",
        ),
        (
            json!({"container-registry": {"creds": [{"registry": "x", "auth": "%%"}]}}),
            "settings.container-registry.creds[0].auth",
        ),
    ];
    for (patch, key) in cases {
        refused(patch, key);
    }
}

#[test]
fn unknown_groups_are_still_refused_and_removals_of_new_keys_are_known() {
    refused(json!({"updatez": {"seed": 1}}), "settings.updatez");
    for key in [
        "updates",
        "metrics",
        "oci-defaults",
        "oci-hooks",
        "cloudformation",
        "autoscaling",
        "ecs",
    ] {
        validate_patch(&json!({ key: null })).unwrap();
    }
    validate_patch(&json!({"kubernetes": {"static-pods": {"web": null}, "pod-pids-limit": null}}))
        .unwrap();
    validate_patch(&json!({"network": {"hosts": null}})).unwrap();
}

#[test]
fn key_value_pairs_are_typed_by_the_new_keys() {
    let (_, v) =
        parse_pair("oci-defaults.resource-limits.max-open-files.hard-limit=unlimited").unwrap();
    assert_eq!(v, json!("unlimited"));
    let (_, v) =
        parse_pair("oci-defaults.resource-limits.max-open-files.soft-limit=65536").unwrap();
    // The model takes the limit's decimal text as well as a number.
    assert_eq!(v, json!("65536"));
    let (_, v) = parse_pair("updates.seed=42").unwrap();
    assert_eq!(v, json!(42));
    let (_, v) = parse_pair("kubernetes.pod-pids-limit=-1").unwrap();
    assert_eq!(v, json!(-1));
    let (_, v) = parse_pair("oci-defaults.capabilities.sys-admin=true").unwrap();
    assert_eq!(v, json!(true));
    let (_, v) = parse_pair("kubernetes.image-gc-high-threshold-percent=85").unwrap();
    assert_eq!(v, json!("85"));
    let err = parse_pair("updates.seed=many").unwrap_err();
    assert_eq!(err.key(), Some("settings.updates.seed"));
    let err = parse_pair("oci-defaults.capabilities.cap-chown=true").unwrap_err();
    assert_eq!(
        err.key(),
        Some("settings.oci-defaults.capabilities.cap-chown"),
        "{err}"
    );
}

#[test]
fn the_server_key_is_a_secret() {
    let err = refused(
        json!({"kubernetes": {"server-key": b64("-----BEGIN PRIVATE KEY-----\nsecret-material\n")}}),
        "settings.kubernetes.server-key",
    );
    assert!(!err.contains("secret-material"), "{err}");
    assert!(err.contains("redacted"), "{err}");
    let settings =
        settings_model::model::parse(&json!({"kubernetes": {"server-key": b64(KEY)}})).unwrap();
    let debug = format!("{settings:?}");
    assert!(!debug.contains(&b64(KEY)), "{debug}");
}

/// TOML's `nan` and `inf` have no JSON form: refused with the key, not turned into a
/// `null` that would remove the setting.
#[test]
fn nan_and_inf_in_user_data_are_refused_by_key() {
    for (text, key) in [
        ("[settings]\nmotd = nan\n", "settings.motd"),
        (
            "[settings.kubernetes]\nmax-pods = inf\n",
            "settings.kubernetes.max-pods",
        ),
        (
            "[settings.ntp]\ntime-servers = [\"a\", -inf]\n",
            "settings.ntp.time-servers[1]",
        ),
    ] {
        let err = settings_model::userdata::parse_user_data("user-data", text).unwrap_err();
        assert_eq!(err.key(), Some(key), "{err}");
        assert!(
            err.to_string().contains("not a value a setting can hold"),
            "{err}"
        );
    }
}
