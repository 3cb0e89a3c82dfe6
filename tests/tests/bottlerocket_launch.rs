//! Bottlerocket's own first-boot tools against keeld, byte for byte as they frame their
//! requests: `early-boot-config` sends one `PATCH /settings?tx=bottlerocket-launch` per
//! user-data source (local defaults, the instance's user-data, local overrides), each
//! body the source's `settings` table as JSON; `settings-committer` commits the
//! transaction (a 422 means nothing was pending, so it runs twice here); then every
//! setting is applied (`POST /tx/apply`). The user-data uses the groups Bottlerocket's
//! aws-k8s variants have beyond Keel's first model: the files they drive are rendered,
//! and the apply log names the settings stored with no effect on this host.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use keel_e2e::{raw_bytes, Keeld, RawResponse};
use serde_json::{json, Value};

/// A request exactly as Bottlerocket's apiclient (hyper over a Unix socket) frames it.
fn br_request(method: &str, target: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\ncontent-type: application/json\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn send(keeld: &Keeld, method: &str, target: &str, body: &str) -> RawResponse {
    raw_bytes(&keeld.socket, &br_request(method, target, body))
}

/// The `settings` table of a TOML user-data document as the JSON body
/// `early-boot-config` sends.
fn settings_json(user_data: &str) -> String {
    let doc: toml::Table = toml::from_str(user_data).unwrap();
    serde_json::to_string(&doc["settings"]).unwrap()
}

/// The local defaults: what a Bottlerocket aws-k8s image stages before user-data.
const DEFAULTS: &str = r#"
[settings.updates]
metadata-base-url = "https://updates.bottlerocket.aws/2020-07-07/aws-k8s-1.31/x86_64/"
targets-base-url = "https://updates.bottlerocket.aws/targets/"
seed = 1234
version-lock = "latest"
ignore-waves = false

[settings.metrics]
metrics-url = "https://metrics.bottlerocket.aws/v1/metrics"
send-metrics = true
service-checks = ["apiserver", "chronyd", "containerd", "host-containerd", "kubelet"]

[settings.oci-hooks]
log4j-hotpatch-enabled = false

[settings.oci-defaults.capabilities]
audit-write = true
chown = true
dac-override = true
fowner = true
fsetid = true
kill = true
mknod = true
net-bind-service = true
net-raw = true
setfcap = true
setgid = true
setpcap = true
setuid = true
sys-chroot = true

[settings.oci-defaults.resource-limits.max-open-files]
hard-limit = 1048576
soft-limit = 65536

[settings.kubernetes]
cluster-domain = "cluster.local"
static-pods-enabled = true
"#;

const POD_B64: &str = "YXBpVmVyc2lvbjogdjEKa2luZDogUG9kCm1ldGFkYXRhOgogIG5hbWU6IHdlYgogIG5hbWVzcGFjZToga3ViZS1zeXN0ZW0Kc3BlYzoKICBjb250YWluZXJzOgogICAgLSBuYW1lOiB3ZWIKICAgICAgaW1hZ2U6IHB1YmxpYy5lY3IuYXdzL25naW54L25naW54OjEuMjcK";
// Base64 of real certificates (settings-model/tests/fixtures/certs/d.pem and c.pem):
// every CERTIFICATE block is parsed as X.509.
const CERT_B64: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJnekNDQVNtZ0F3SUJBZ0lVWUFDeStMSWZTNVUrQVl0Ym9sblgyZkdmYnNVd0NnWUlLb1pJemowRUF3SXcKRmpFVU1CSUdBMVVFQXd3TGEyVmxiQ0IwWlhOMElHUXdJQmNOTWpZeE1qQTFNVEl3TWpRMldoZ1BNakV5TmpFeApNVEV4TWpBeU5EWmFNQll4RkRBU0JnTlZCQU1NQzJ0bFpXd2dkR1Z6ZENCa01Ga3dFd1lIS29aSXpqMENBUVlJCktvWkl6ajBEQVFjRFFnQUVBNXNXbjd2UEhyQ2lVdFlGT0lpME1NVCszQ0xxeVEyeG0zdlV4RytmS1FIZWxWMFUKQ2JaNk8veU9KUENRSE5KQkx5Q0dYelozZlErWFROT29iQlArZTZOVE1GRXdIUVlEVlIwT0JCWUVGRHEzSlhIbgozNUNJSThEY3pQSTFhb3dNc2lSVk1COEdBMVVkSXdRWU1CYUFGRHEzSlhIbjM1Q0lJOERjelBJMWFvd01zaVJWCk1BOEdBMVVkRXdFQi93UUZNQU1CQWY4d0NnWUlLb1pJemowRUF3SURTQUF3UlFJZ2ZBM2ZvZk5hZUFvQm5jdHkKRVBqa0VabUx3cnV4b3hoa0JNUmdQcHVtZHdFQ0lRRFVERXdOZ1ZVeVM1aC8wRmxjQmowRzJ5eGZCZVRrNk5xSQpDeFk3L0hjUVRBPT0KLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=";
const KEY_B64: &str = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JR0hBZ0VBTUJNR0J5cUdTTTQ5QWdFRwotLS0tLUVORCBQUklWQVRFIEtFWS0tLS0tCg==";
const CA_B64: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJnekNDQVNtZ0F3SUJBZ0lVQTA4RGhLOUpjaDdIUE9BclltbHRwZnJVang0d0NnWUlLb1pJemowRUF3SXcKRmpFVU1CSUdBMVVFQXd3TGEyVmxiQ0IwWlhOMElHTXdJQmNOTWpZeE1qQTFNVEl3TWpRMldoZ1BNakV5TmpFeApNVEV4TWpBeU5EWmFNQll4RkRBU0JnTlZCQU1NQzJ0bFpXd2dkR1Z6ZENCak1Ga3dFd1lIS29aSXpqMENBUVlJCktvWkl6ajBEQVFjRFFnQUV5ZFhhNTNuNnpoSFV6TFAva01uWDdnaFlWUU5xdUhoTTdVR2oybFRKamhtUXU4UDgKZnBkUHgxM1FMdkZSNy9oSGZZNDR0L2xaS3Y1VXdzd2M4UnA0MnFOVE1GRXdIUVlEVlIwT0JCWUVGSDFYak9sVwppdWdaM0tlanlLL1hTNW1hSnhVNE1COEdBMVVkSXdRWU1CYUFGSDFYak9sV2l1Z1ozS2VqeUsvWFM1bWFKeFU0Ck1BOEdBMVVkRXdFQi93UUZNQU1CQWY4d0NnWUlLb1pJemowRUF3SURTQUF3UlFJaEFKejU0Qmt4c2JRbFRiUC8KbmVUcEVVZHhEUFdhTG1JekFucC9iUWNBdngrUEFpQXh1ZkRGQ3Z4WVJuTU5EV0RMR0k4L0dDdVZ5RHd2T0RLSAp4OGFIS2NNU3JRPT0KLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=";

/// The instance's user-data, as a Bottlerocket aws-k8s user would write it.
fn user_data() -> String {
    format!(
        r#"
[settings.kubernetes]
api-server = "https://ABCDEF.gr7.us-west-2.eks.amazonaws.com"
cluster-name = "prod"
cluster-certificate = "{CA_B64}"
pod-pids-limit = 4096
cpu-cfs-quota-enforced = false
log-level = 2
seccomp-default = true
server-certificate = "{CERT_B64}"
server-key = "{KEY_B64}"
hostname-override-source = "instance-id"
image-gc-high-threshold-percent = "85"

[settings.kubernetes.node-taints]
dedicated = "gpu:NoSchedule"

[settings.kubernetes.static-pods.web]
enabled = true
manifest = "{POD_B64}"

[settings.kubernetes.static-pods.retired]
enabled = false
manifest = "{POD_B64}"

[settings.network]
hostname = "ip-10-0-0-7.us-west-2.compute.internal"
hosts = [["10.0.0.5", ["db", "db.internal"]], ["10.0.0.6", ["cache"]]]

[settings.ntp]
time-servers = ["169.254.169.123"]
options = ["minpoll", "4"]

[settings.kernel.modules.sctp]
allowed = false

[settings.cloudformation]
should-signal = true
stack-name = "nodes"
logical-resource-id = "NodeGroup"

[settings.autoscaling]
should-wait = true

[settings.updates]
ignore-waves = true
"#
    )
}

/// The local overrides, applied last.
const OVERRIDES: &str = r#"
[settings]
motd = "Bottlerocket user-data on Keel"

[settings.network]
hosts = [["10.0.0.5", ["db", "db.internal"]], ["10.0.0.6", ["cache"]], ["10.0.0.5", ["primary"]]]

[settings.metrics]
send-metrics = false
"#;

fn read(keeld: &Keeld, path: &str) -> String {
    std::fs::read_to_string(keeld.render_root().join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}\nlog:\n{}", keeld.log()))
}

#[test]
fn early_boot_config_then_settings_committer_then_apply() {
    let keeld = Keeld::start();
    let tx = "/settings?tx=bottlerocket-launch";
    for (source, text) in [
        ("defaults", DEFAULTS.to_owned()),
        ("user-data", user_data()),
        ("overrides", OVERRIDES.to_owned()),
    ] {
        let r = send(&keeld, "PATCH", tx, &settings_json(&text));
        assert_eq!(r.status, 204, "{source}: {}", r.text());
        assert!(r.body.is_empty(), "{source}");
    }

    // settings-committer, twice: the second finds nothing pending (422), which it treats
    // as nothing to do.
    let r = send(&keeld, "POST", "/tx/commit?tx=bottlerocket-launch", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let changed: Vec<String> = serde_json::from_value(r.json()).unwrap();
    for key in [
        "settings.updates.seed",
        "settings.updates.ignore-waves",
        "settings.metrics.send-metrics",
        "settings.oci-defaults.capabilities.chown",
        "settings.oci-defaults.resource-limits.max-open-files.hard-limit",
        "settings.network.hosts",
        "settings.kubernetes.static-pods.web.manifest",
        "settings.kubernetes.pod-pids-limit",
        "settings.kubernetes.server-key",
        "settings.motd",
    ] {
        assert!(
            changed.contains(&key.to_owned()),
            "{key} not in {changed:?}"
        );
    }
    let r = send(&keeld, "POST", "/tx/commit?tx=bottlerocket-launch", "");
    assert_eq!(r.status, 422, "{}", r.text());

    // Every setting is stored as Bottlerocket stores it: the later source wins, the one
    // taint becomes a list.
    let settings = send(&keeld, "GET", "/settings", "").json();
    assert_eq!(settings["metrics"]["send-metrics"], false);
    assert_eq!(settings["updates"]["seed"], 1234);
    assert_eq!(settings["updates"]["ignore-waves"], true);
    assert_eq!(
        settings["kubernetes"]["node-taints"]["dedicated"],
        json!(["gpu:NoSchedule"])
    );
    assert_eq!(
        settings["network"]["hosts"][2],
        json!(["10.0.0.5", ["primary"]])
    );

    // Apply everything.
    let r = send(&keeld, "POST", "/tx/apply", "");
    assert_eq!(r.status, 204, "{}\nlog:\n{}", r.text(), keeld.log());

    // /etc/hosts: one line per address, the host's own name on loopback.
    let hosts = read(&keeld, "etc/hosts");
    let line = |addr: &str| -> Vec<String> {
        hosts
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(addr))
            .flat_map(|l| l.split_whitespace().skip(1).map(str::to_owned))
            .collect()
    };
    assert_eq!(
        line("10.0.0.5"),
        ["db", "db.internal", "primary"],
        "{hosts}"
    );
    assert_eq!(line("10.0.0.6"), ["cache"], "{hosts}");
    assert!(line("127.0.0.1").contains(&"ip-10-0-0-7.us-west-2.compute.internal".to_owned()));

    // containerd: pods start from the base spec of settings.oci-defaults.
    let containerd = read(&keeld, "etc/containerd/config.toml");
    let containerd: toml::Table = toml::from_str(&containerd).unwrap();
    assert_eq!(
        containerd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["runc"]
            ["base_runtime_spec"]
            .as_str(),
        Some("/etc/containerd/cri-base.json")
    );
    let spec: Value = serde_json::from_str(&read(&keeld, "etc/containerd/cri-base.json")).unwrap();
    let caps = spec["process"]["capabilities"]["bounding"]
        .as_array()
        .unwrap();
    assert_eq!(caps.len(), 14);
    assert!(caps.contains(&json!("CAP_NET_BIND_SERVICE")));
    assert_eq!(
        spec["process"]["rlimits"],
        json!([{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 65536}])
    );

    // The kubelet: its configuration, its serving certificate and key, static pods.
    let kubelet = read(&keeld, "etc/kubernetes/kubelet/config");
    for line in [
        "podPidsLimit: 4096",
        "cpuCFSQuota: false",
        "seccompDefault: true",
        "imageGCHighThresholdPercent: 85",
        "staticPodPath: \"/etc/kubernetes/static-pods\"",
        "tlsCertFile: \"/etc/kubernetes/pki/kubelet-server.crt\"",
        "tlsPrivateKeyFile: \"/etc/kubernetes/pki/private/kubelet-server.key\"",
        "  verbosity: 2",
    ] {
        assert!(
            kubelet.lines().any(|l| l == line),
            "{line:?} not in:\n{kubelet}"
        );
    }
    let key_path = keeld
        .render_root()
        .join("etc/kubernetes/pki/private/kubelet-server.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the serving key is 0600");
    let key = std::fs::read_to_string(&key_path).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key}");
    assert!(read(&keeld, "etc/kubernetes/pki/kubelet-server.crt")
        .starts_with("-----BEGIN CERTIFICATE-----\n"));
    let pod = read(&keeld, "etc/kubernetes/static-pods/web.yaml");
    assert!(
        pod.contains("kind: Pod") && pod.contains("  name: web"),
        "{pod}"
    );
    assert!(
        !keeld
            .render_root()
            .join("etc/kubernetes/static-pods/retired.yaml")
            .exists(),
        "a disabled static pod has no manifest"
    );
    let env = read(&keeld, "etc/kubernetes/kubelet/env");
    assert!(
        env.contains("NODE_TAINTS=dedicated=gpu:NoSchedule"),
        "{env}"
    );

    // chrony and the kernel modules.
    let chrony = read(&keeld, "etc/chrony.conf");
    assert!(
        chrony
            .lines()
            .any(|l| l == "server 169.254.169.123 iburst minpoll 4"),
        "{chrony}"
    );
    assert!(read(&keeld, "etc/modprobe.d/keel-modules.conf")
        .lines()
        .any(|l| l == "install sctp /bin/true"));

    // The apply log: what was stored with no effect on this host.
    let log = keeld.apiclient_json(&["apply-log", "--limit", "1"]);
    let apply = &log["applies"][0];
    assert_eq!(apply["keys"], json!(["settings"]));
    assert_eq!(apply["success"], true, "{apply:#}");
    let no_effect: Vec<String> = serde_json::from_value(apply["no-effect"].clone()).unwrap();
    // keeld's update commands read settings.updates: they have an effect.
    for key in [
        "settings.updates.metadata-base-url",
        "settings.updates.targets-base-url",
        "settings.updates.seed",
        "settings.updates.version-lock",
        "settings.updates.ignore-waves",
    ] {
        assert!(
            !no_effect.contains(&key.to_owned()),
            "{key} in {no_effect:?}"
        );
    }
    for key in [
        "settings.metrics.metrics-url",
        "settings.metrics.send-metrics",
        "settings.metrics.service-checks",
        "settings.oci-hooks.log4j-hotpatch-enabled",
        "settings.cloudformation.should-signal",
        "settings.cloudformation.stack-name",
        "settings.cloudformation.logical-resource-id",
        "settings.autoscaling.should-wait",
        "settings.kubernetes.hostname-override-source",
    ] {
        assert!(
            no_effect.contains(&key.to_owned()),
            "{key} not in {no_effect:?}"
        );
    }
    let acted_on: Vec<&String> = no_effect
        .iter()
        .filter(|k| {
            k.starts_with("settings.kubernetes.pod-pids-limit")
                || k.starts_with("settings.oci-defaults")
                || k.starts_with("settings.network")
                || k.starts_with("settings.motd")
        })
        .collect();
    assert!(
        acted_on.is_empty(),
        "these have an effect but are listed as having none: {acted_on:?}"
    );
}

#[test]
fn a_bad_value_from_user_data_is_refused_naming_its_key_and_changes_nothing() {
    let keeld = Keeld::start();
    let before = send(&keeld, "GET", "/settings", "").json();
    for (body, key) in [
        (r#"{"updates":{"seed":"many"}}"#, "settings.updates.seed"),
        (
            r#"{"oci-defaults":{"capabilities":{"CAP_SYS_ADMIN":true}}}"#,
            "settings.oci-defaults.capabilities.CAP_SYS_ADMIN",
        ),
        (
            r#"{"network":{"hosts":[["10.0.0.0/24",["a"]]]}}"#,
            "settings.network.hosts[0][0]",
        ),
        (
            r#"{"kubernetes":{"static-pods":{"web":{"manifest":"not base64!"}}}}"#,
            "settings.kubernetes.static-pods.web.manifest",
        ),
        (r#"{"ecs":{"loglevel":"loud"}}"#, "settings.ecs.loglevel"),
        (r#"{"metrics":{"url":"x"}}"#, "settings.metrics.url"),
    ] {
        let r = send(&keeld, "PATCH", "/settings?tx=bottlerocket-launch", body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["key"], key, "{body}: {}", r.text());
    }
    let r = send(&keeld, "POST", "/tx/commit?tx=bottlerocket-launch", "");
    assert_eq!(r.status, 422, "nothing was staged: {}", r.text());
    assert_eq!(send(&keeld, "GET", "/settings", "").json(), before);
}

/// keeld's own boot takes the same three sources as its user-data providers and reaches
/// `configured` with every effect rendered; with one bad value in the user-data, the
/// boot fails naming the key, only the OS defaults are committed, and the host
/// container the defaults enable (the control container) is let start.
#[test]
fn keelds_own_boot_takes_the_same_user_data_and_survives_one_bad_value() {
    for bad in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut text = user_data();
        if bad {
            text = text.replace("pod-pids-limit = 4096", "pod-pids-limit = \"lots\"");
        }
        let files = [
            ("defaults.toml", DEFAULTS.to_owned()),
            ("user-data.toml", text),
            ("overrides.toml", OVERRIDES.to_owned()),
        ];
        for (name, content) in &files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let arg = |name: &str| dir.path().join(name).display().to_string();
        let keeld = Keeld::start_with(keel_e2e::KeeldOptions {
            wait_for_boot: false,
            extra_args: vec![
                "--os-defaults".to_owned(),
                keel_e2e::repo_root()
                    .join("packaging/defaults.toml")
                    .display()
                    .to_string(),
                "--user-data-providers".to_owned(),
                "defaults,file,overrides".to_owned(),
                "--user-data-defaults".to_owned(),
                arg("defaults.toml"),
                "--user-data-file".to_owned(),
                arg("user-data.toml"),
                "--user-data-overrides".to_owned(),
                arg("overrides.toml"),
            ],
            ..keel_e2e::KeeldOptions::default()
        });
        let record = keeld.wait_boot(std::time::Duration::from_secs(60));
        let settings = send(&keeld, "GET", "/settings", "").json();
        if !bad {
            assert_eq!(record["phase"], "configured", "{record:#}\n{}", keeld.log());
            assert_eq!(settings["motd"], "Bottlerocket user-data on Keel");
            assert!(read(&keeld, "etc/hosts").contains("db.internal"));
            assert!(read(&keeld, "etc/kubernetes/static-pods/web.yaml").contains("nginx"));
            assert!(read(&keeld, "etc/kubernetes/kubelet/config").contains("4096"));
            continue;
        }
        assert_eq!(record["phase"], "failed", "{record:#}");
        assert_eq!(record["defaults-only"], true, "{record:#}");
        let reason = record["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("user-data.toml")
                && reason.contains("settings.kubernetes.pod-pids-limit"),
            "{reason}"
        );
        // Only the OS defaults: none of the three sources' values.
        assert_eq!(settings["motd"], "Welcome to Keel!", "{settings:#}");
        assert!(settings.get("updates").is_none(), "{settings:#}");
        assert!(read(&keeld, "etc/motd").contains("Welcome to Keel!"));
        // The control container the defaults enable is being started (this harness has
        // no containerd, so it cannot get further), not held back by the failed boot.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let hosts = send(&keeld, "GET", "/containers?kind=host", "").json();
            let control = hosts
                .as_array()
                .and_then(|a| a.iter().find(|c| c["name"] == "control"))
                .cloned()
                .unwrap_or(Value::Null);
            let state = control["state"].as_str().unwrap_or_default().to_owned();
            if !state.is_empty() && state != "waiting-for-boot" {
                assert_ne!(state, "not-started", "{hosts:#}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "control never left waiting-for-boot: {hosts:#}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
