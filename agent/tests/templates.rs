//! The shipped templates (`packaging/templates/`) and `packaging/services.toml`: every
//! template renders from empty settings, each file rendered from full settings parses
//! back with a real parser for its format, the Bottlerocket documentation examples
//! render, and undefined values fail naming template, line and key.
#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use keel_agent::apply::render::{RenderError, Templates};
use keel_agent::apply::ServicesMeta;
use serde_json::{json, Value};

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn templates() -> Templates {
    Templates::load(&packaging().join("templates")).unwrap()
}

fn os() -> Value {
    json!({
        "arch": "x86_64",
        "build_id": "dev",
        "pretty_name": "Keel 0.1.0",
        "variant_id": "keel-k8s",
        "version_id": "0.1.0"
    })
}

// Real certificates: settings-model parses every CERTIFICATE block as X.509.
const CA_PEM: &str = include_str!("../../settings-model/tests/fixtures/certs/a.pem");
const OTHER_PEM: &str = include_str!("../../settings-model/tests/fixtures/certs/b.pem");
const DISTRUSTED_PEM: &str = include_str!("../../settings-model/tests/fixtures/certs/c.pem");

/// The base64 body of a one-block PEM text, line breaks included.
fn pem_body(pem: &str) -> &str {
    let after = pem.split_once("-----\n").map_or("", |(_, rest)| rest);
    after.split("\n-----END").next().unwrap_or_default()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Realistic settings touching every rendered file.
fn full_settings() -> Value {
    let settings = json!({
        "motd": "Welcome to node-7 \"prod\"",
        "ntp": {"time-servers": ["169.254.169.123", "ntp://time.example.com:123", "2.pool.ntp.org"]},
        "network": {
            "hostname": "node-7.example.internal",
            "https-proxy": "proxy.example.com:3128",
            "no-proxy": ["localhost", ".example.internal", "10.0.0.0/8"]
        },
        "dns": {
            "name-servers": ["10.0.0.2", "10.0.0.3", "1.1.1.1", "8.8.8.8"],
            "search-list": ["example.internal", "corp.example.com"]
        },
        "container-registry": {
            "mirrors": [
                {"registry": "docker.io", "endpoint": ["https://mirror.example.com", "https://mirror2.example.com"]},
                {"registry": "*", "endpoint": ["https://all.example.com"]}
            ],
            "credentials": [
                {"registry": "registry.example.com:5000", "username": "robot", "password": "p\"a$s\\w'd"},
                {"registry": "docker.io", "auth": b64("user:token")}
            ]
        },
        "container-runtime": {
            "max-container-log-line-size": 16384,
            "max-concurrent-downloads": 4,
            "enable-unprivileged-icmp": true,
            "enable-unprivileged-ports": false
        },
        "kernel": {"sysctl": {"net.ipv4.ip_forward": "1", "vm.max_map_count": "262144", "kernel/pid_max": "4194304"}},
        "kubernetes": {
            "api-server": "https://api.example.com:6443",
            "cluster-name": "prod",
            "cluster-certificate": b64(CA_PEM),
            "cluster-dns-ip": ["10.96.0.10", "10.96.0.11"],
            "cluster-domain": "cluster.example",
            "node-labels": {"label1": "foo", "example.com/role": "worker"},
            "node-taints": {"dedicated": ["experimental:PreferNoSchedule", "experimental:NoExecute"], "special": [":NoSchedule"]},
            "max-pods": 110,
            "eviction-hard": {"memory.available": "15%", "nodefs.available": "10%"},
            "eviction-soft": {"memory.available": "12%"},
            "eviction-soft-grace-period": {"memory.available": "30s"},
            "eviction-max-pod-grace-period": 40,
            "kube-reserved": {"cpu": "100m", "memory": "512Mi", "ephemeral-storage": "1Gi"},
            "system-reserved": {"cpu": "50m", "memory": "256Mi"},
            "memory-manager-policy": "Static",
            "memory-manager-reserved-memory": {
                "0": {"enabled": true, "memory": "674Mi", "hugepages-1Gi": "1Gi"},
                "1": {"enabled": true, "hugepages-2Mi": "2148Mi"},
                "2": {"enabled": false, "memory": "1Gi"}
            },
            "cpu-manager-policy": "static",
            "topology-manager-policy": "single-numa-node",
            "allowed-unsafe-sysctls": ["net.core.somaxconn", "kernel.msg*"],
            "credential-providers": {
                "ecr-credential-provider": {
                    "enabled": true,
                    "cache-duration": "30m",
                    "image-patterns": ["*.dkr.ecr.us-east-2.amazonaws.com", "*.dkr.ecr.us-west-2.amazonaws.com"],
                    "environment": {"KEY": "abc123xyz", "GOMAXPROCS": "2"}
                },
                "disabled-provider": {"enabled": false, "image-patterns": ["x.example.com"]}
            },
            "authentication-mode": "aws",
            "pod-infra-container-image": "registry.example.com/pause:3.9",
            "node-ip": "10.0.1.7",
            "provider-id": "aws:///us-west-2a/i-0123456789abcdef0",
            "server-tls-bootstrap": true,
            "kube-api-qps": 10,
            "container-log-max-size": "10Mi",
            "shutdown-grace-period": "30s"
        },
        "aws": {"region": "us-west-2"},
        "boot": {
            "reboot-to-reconcile": true,
            "kernel-parameters": {"console": ["tty0", "ttyS1,115200n8"], "crashkernel": ["2G-:256M"], "nosmt": []},
            "init-parameters": {"log_level": ["debug"], "splash": []}
        },
        "pki": {
            "z-last": {"data": b64(OTHER_PEM), "trusted": true},
            "a-first": {"data": b64(CA_PEM), "trusted": true},
            "distrusted": {"data": b64(DISTRUSTED_PEM), "trusted": false}
        }
    });
    // The test settings must be valid settings.
    settings_model::validate(&settings).unwrap()
}

fn render(name: &str, settings: &Value) -> String {
    templates()
        .render(name, settings, &os())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Renders `name` for one item of a multi-file, as the apply pipeline does.
fn render_item(name: &str, settings: &Value, item: &Value, item_name: &str) -> String {
    let context = Templates::context_with_item(settings, &os(), item, item_name);
    templates()
        .render_in(name, &context)
        .unwrap_or_else(|e| panic!("{name}[{item_name}]: {e}"))
}

/// Non-empty lines that are not comments.
fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// `KEY=value` lines of an environment file, unquoting `'...'` and `\x` as sh does.
fn env_file(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in lines(text) {
        let (key, raw) = line.split_once('=').unwrap();
        let mut value = String::new();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            match c {
                '\'' => {
                    for q in chars.by_ref() {
                        if q == '\'' {
                            break;
                        }
                        value.push(q);
                    }
                }
                '\\' => value.extend(chars.next()),
                c => value.push(c),
            }
        }
        out.insert(key.to_owned(), value);
    }
    out
}

fn yaml(text: &str) -> serde_norway::Value {
    serde_norway::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

fn toml_doc(text: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_else(|e| panic!("not TOML ({e}):\n{text}"))
}

#[test]
fn every_template_renders_from_empty_settings() {
    let t = templates();
    assert!(t.names().len() >= 17, "{:?}", t.names());
    for name in t.names() {
        t.render(&name, &json!({}), &json!({}))
            .unwrap_or_else(|e| panic!("{name} from empty settings: {e}"));
    }
}

#[test]
fn empty_settings_give_sensible_files() {
    let empty = json!({});
    assert_eq!(render("motd", &empty), "Welcome to Keel 0.1.0!\n");
    assert_eq!(render("proxy-env", &empty), "");
    assert_eq!(render("hostname", &empty), "");
    assert!(lines(&render("resolv-conf", &empty)).is_empty());
    assert_eq!(
        lines(&render("chrony-conf", &empty)),
        [
            "driftfile /var/lib/chrony/drift",
            "makestep 1.0 3",
            "rtcsync"
        ]
    );
    assert_eq!(render("boot-kernel-parameters", &empty).trim(), "");
    assert_eq!(render("kubernetes-ca", &empty), "");
    let env = env_file(&render("kubelet-env", &empty));
    assert_eq!(env["NODE_LABELS"], "");
    assert_eq!(env["NODE_TAINTS"], "");
    // The structured formats stay valid documents.
    toml_doc(&render("registries", &empty));
    let containerd = toml_doc(&render("containerd-config", &empty));
    assert_eq!(containerd["version"].as_integer(), Some(2));
    let kubelet = yaml(&render("kubelet-config", &empty));
    assert_eq!(kubelet["clusterDomain"].as_str(), Some("cluster.local"));
    assert_eq!(
        kubelet["authentication"]["webhook"]["enabled"].as_bool(),
        Some(true)
    );
    let providers = yaml(&render("credential-provider-config", &empty));
    assert!(providers["providers"].as_sequence().unwrap().is_empty());
    assert!(yaml(&render("kubeconfig", &empty)).is_null());
}

#[test]
fn motd_and_hostname() {
    let s = full_settings();
    assert_eq!(render("motd", &s), "Welcome to node-7 \"prod\"\n");
    assert_eq!(render("hostname", &s), "node-7.example.internal\n");
    let hosts = render("hosts", &s);
    let by_addr: BTreeMap<&str, Vec<&str>> = lines(&hosts)
        .into_iter()
        .map(|l| {
            let mut words = l.split_whitespace();
            (words.next().unwrap(), words.collect())
        })
        .collect();
    for addr in ["127.0.0.1", "::1"] {
        let names = &by_addr[addr];
        assert!(names.contains(&"localhost"), "{hosts}");
        assert!(names.contains(&"node-7.example.internal"), "{hosts}");
        assert!(names.contains(&"node-7"), "{hosts}");
    }
}

#[test]
fn a_host_name_longer_than_the_kernel_holds_is_shortened_to_its_first_label() {
    // 64 bytes is the kernel's limit (HOST_NAME_MAX): taken whole.
    let at_limit = format!("{}.{}", "a".repeat(31), "b".repeat(32));
    assert_eq!(at_limit.len(), 64);
    let s = valid(json!({"network": {"hostname": at_limit}}));
    assert_eq!(render("hostname", &s), format!("{at_limit}\n"));

    let long = format!("node-7.{}.example.internal", "c".repeat(60));
    assert!(long.len() > 64);
    let s = valid(json!({"network": {"hostname": long}}));
    assert_eq!(render("hostname", &s), "node-7\n");
    // The whole name still resolves to this host.
    let hosts = hosts_lines(&render("hosts", &s));
    for (addr, names) in &hosts[..2] {
        assert!(names.contains(&long), "{addr}: {names:?}");
        assert!(names.contains(&"node-7".to_owned()), "{addr}: {names:?}");
    }
}

#[test]
fn chrony_has_one_server_per_time_server() {
    let text = render("chrony-conf", &full_settings());
    let servers: Vec<Vec<&str>> = lines(&text)
        .into_iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w[0] == "server")
        .collect();
    assert_eq!(
        servers,
        [
            vec!["server", "169.254.169.123", "iburst"],
            vec!["server", "time.example.com", "port", "123", "iburst"],
            vec!["server", "2.pool.ntp.org", "iburst"]
        ]
    );
    assert!(lines(&text).contains(&"rtcsync"));
}

/// chrony.conf's `server` lines, rendered from `settings`.
fn chrony_servers(settings: &Value) -> Vec<String> {
    lines(&render("chrony-conf", settings))
        .into_iter()
        .filter(|l| l.starts_with("server "))
        .map(str::to_owned)
        .collect()
}

/// A URL's port is chrony's `port` option: the server is asked there, not on 123.
#[test]
fn chrony_asks_a_time_server_on_the_port_its_url_names() {
    let s = valid(json!({"ntp": {"time-servers": [
        "ntp://time.example.com:1123", "ntp://[fd00::1]:4123/x", "ntp://plain.example.com"
    ]}}));
    let servers = chrony_servers(&s);
    assert_eq!(
        servers,
        [
            "server time.example.com port 1123 iburst",
            "server fd00::1 port 4123 iburst",
            "server plain.example.com iburst"
        ]
    );
}

#[test]
fn resolv_conf_has_three_nameservers_and_search() {
    let text = render("resolv-conf", &full_settings());
    let l = lines(&text);
    assert_eq!(
        l,
        [
            "search example.internal corp.example.com",
            "nameserver 10.0.0.2",
            "nameserver 10.0.0.3",
            "nameserver 1.1.1.1"
        ]
    );
    // The fourth is named, not silently dropped.
    assert!(
        text.contains("# not used, libc reads the first three name servers: 8.8.8.8\n"),
        "{text}"
    );
}

#[test]
fn proxy_env_adds_scheme_and_dedupes_no_proxy() {
    let env = env_file(&render("proxy-env", &full_settings()));
    assert_eq!(env["HTTPS_PROXY"], "http://proxy.example.com:3128");
    assert_eq!(env["https_proxy"], "http://proxy.example.com:3128");
    let no_proxy: Vec<&str> = env["NO_PROXY"].split(',').collect();
    assert_eq!(
        no_proxy,
        [
            "localhost",
            "127.0.0.1",
            "169.254.169.254",
            "api.example.com",
            ".cluster.example",
            ".example.internal",
            "10.0.0.0/8"
        ]
    );
    assert_eq!(env["no_proxy"], env["NO_PROXY"]);
}

#[test]
fn registries_toml_has_mirrors_and_credentials() {
    let doc = toml_doc(&render("registries", &full_settings()));
    let mirrors = doc["mirrors"].as_array().unwrap();
    assert_eq!(mirrors.len(), 2);
    assert_eq!(mirrors[0]["registry"].as_str(), Some("docker.io"));
    assert_eq!(
        mirrors[0]["endpoints"].as_array().unwrap()[1].as_str(),
        Some("https://mirror2.example.com")
    );
    assert_eq!(mirrors[1]["registry"].as_str(), Some("*"));
    let creds = doc["credentials"].as_array().unwrap();
    assert_eq!(
        creds[0]["registry"].as_str(),
        Some("registry.example.com:5000")
    );
    assert_eq!(creds[0]["username"].as_str(), Some("robot"));
    assert_eq!(creds[0]["password"].as_str(), Some("p\"a$s\\w'd"));
    assert_eq!(creds[1]["auth"].as_str(), Some(b64("user:token").as_str()));
    assert!(creds[1].get("password").is_none());
}

/// The `[host."<endpoint>"]` tables of a hosts.toml, in file order, each checked to
/// carry exactly pull and resolve capabilities.
fn hosts_of(text: &str) -> Vec<String> {
    let doc = toml_doc(text);
    let Some(hosts) = doc.get("host") else {
        return Vec::new();
    };
    let hosts = hosts.as_table().unwrap();
    for (endpoint, host) in hosts {
        let caps: Vec<&str> = host["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(caps, ["pull", "resolve"], "{endpoint}:\n{text}");
        assert_eq!(host.as_table().unwrap().len(), 1, "{endpoint}:\n{text}");
    }
    let mut ordered: Vec<String> = hosts.keys().cloned().collect();
    ordered.sort_by_key(|e| text.find(&format!("[host.\"{e}\"]")).unwrap());
    ordered
}

#[test]
fn containerd_hosts_per_mirror() {
    let s = full_settings();
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    let file = &meta.configuration_files["containerd-hosts"];
    let items = file.items(&s).unwrap();
    let names: Vec<(&str, &str)> = items
        .iter()
        .map(|i| (i.name.as_str(), i.segment.as_deref().unwrap()))
        .collect();
    assert_eq!(names, [("docker.io", "docker.io"), ("*", "_default")]);
    assert_eq!(
        file.item_path("_default"),
        "/etc/containerd/certs.d/_default/hosts.toml"
    );

    let docker = render_item("containerd-hosts", &s, &items[0].value, &items[0].name);
    let doc = toml_doc(&docker);
    assert_eq!(
        doc["server"].as_str(),
        Some("https://registry-1.docker.io"),
        "{docker}"
    );
    assert_eq!(
        hosts_of(&docker),
        ["https://mirror.example.com", "https://mirror2.example.com"],
        "endpoints keep the settings' order: containerd tries them in file order"
    );

    let all = render_item("containerd-hosts", &s, &items[1].value, &items[1].name);
    let doc = toml_doc(&all);
    assert!(doc.get("server").is_none(), "no server for \"*\":\n{all}");
    assert_eq!(hosts_of(&all), ["https://all.example.com"]);

    // Any other registry is its own server; a port is kept.
    let other =
        json!({"registry": "registry.example.com:5000", "endpoint": ["http://10.0.0.9:5000"]});
    let text = render_item("containerd-hosts", &s, &other, "registry.example.com:5000");
    assert_eq!(
        toml_doc(&text)["server"].as_str(),
        Some("https://registry.example.com:5000")
    );
    assert_eq!(hosts_of(&text), ["http://10.0.0.9:5000"]);

    // An endpoint written twice is one table (twice is not TOML); case counts.
    let twice = json!({"registry": "quay.io", "endpoint": [
        "https://m.example.com", "https://M.example.com", "https://m.example.com"]});
    let text = render_item("containerd-hosts", &s, &twice, "quay.io");
    assert_eq!(
        hosts_of(&text),
        ["https://m.example.com", "https://M.example.com"],
        "{text}"
    );

    // A mirror without endpoints still parses, with the server only.
    let bare = render_item(
        "containerd-hosts",
        &s,
        &json!({"registry": "quay.io"}),
        "quay.io",
    );
    let doc = toml_doc(&bare);
    assert_eq!(doc["server"].as_str(), Some("https://quay.io"));
    assert!(doc.get("host").is_none());
}

#[test]
fn containerd_config_is_toml_with_cri_options() {
    let doc = toml_doc(&render("containerd-config", &full_settings()));
    assert_eq!(doc["version"].as_integer(), Some(2));
    let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
    assert_eq!(cri["max_container_log_line_size"].as_integer(), Some(16384));
    assert_eq!(cri["max_concurrent_downloads"].as_integer(), Some(4));
    assert_eq!(cri["enable_unprivileged_icmp"].as_bool(), Some(true));
    assert_eq!(cri["enable_unprivileged_ports"].as_bool(), Some(false));
    assert_eq!(
        cri["sandbox_image"].as_str(),
        Some("registry.example.com/pause:3.9")
    );
    assert_eq!(
        cri["registry"]["config_path"].as_str(),
        Some("/etc/containerd/certs.d")
    );
    // Unset options are left to containerd's defaults.
    let empty = toml_doc(&render("containerd-config", &json!({})));
    assert!(empty["plugins"]["io.containerd.grpc.v1.cri"]
        .get("max_concurrent_downloads")
        .is_none());
}

/// CRI pulls (Kubernetes pods) use settings.container-registry.credentials too: as
/// containerd 1.6 reads them, per host it pulls from (docker.io's is
/// registry-1.docker.io); a host listed twice keeps its first credentials.
#[test]
fn containerd_config_carries_registry_credentials_for_cri_pulls() {
    let settings = json!({"container-registry": {"credentials": [
        {"registry": "docker.io", "username": "u", "password": "p\"w'd"},
        {"registry": "registry.example.com:5000", "auth": "dTpw"},
        {"registry": "registry-1.docker.io", "username": "second", "password": "x"},
        {"registry": "ecr.example.com", "identitytoken": "tok"}
    ]}});
    let text = render("containerd-config", &settings);
    let doc = toml_doc(&text);
    let configs = doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["configs"]
        .as_table()
        .unwrap_or_else(|| panic!("no registry.configs:\n{text}"));
    let auth = |host: &str| configs[host]["auth"].as_table().unwrap().clone();
    let docker = auth("registry-1.docker.io");
    assert_eq!(docker["username"].as_str(), Some("u"));
    assert_eq!(docker["password"].as_str(), Some("p\"w'd"));
    assert_eq!(
        auth("registry.example.com:5000")["auth"].as_str(),
        Some("dTpw")
    );
    assert_eq!(
        auth("ecr.example.com")["identitytoken"].as_str(),
        Some("tok")
    );
    assert_eq!(configs.len(), 3, "{text}");
    // Without credentials there is no configs table at all.
    let none = toml_doc(&render("containerd-config", &json!({})));
    assert!(none["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
        .get("configs")
        .is_none());
}

#[test]
fn sysctl_conf_has_key_value_lines() {
    let text = render("sysctl-conf", &full_settings());
    let pairs: BTreeMap<&str, &str> = lines(&text)
        .into_iter()
        .map(|l| {
            let (k, v) = l.split_once(" = ").unwrap();
            (k, v)
        })
        .collect();
    assert_eq!(pairs.len(), 3);
    assert_eq!(pairs["net.ipv4.ip_forward"], "1");
    assert_eq!(pairs["vm.max_map_count"], "262144");
    assert_eq!(pairs["kernel/pid_max"], "4194304");
}

#[test]
fn kubelet_config_is_a_kubelet_configuration() {
    let doc = yaml(&render("kubelet-config", &full_settings()));
    assert_eq!(
        doc["apiVersion"].as_str(),
        Some("kubelet.config.k8s.io/v1beta1")
    );
    assert_eq!(doc["kind"].as_str(), Some("KubeletConfiguration"));
    let dns: Vec<&str> = doc["clusterDNS"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(dns, ["10.96.0.10", "10.96.0.11"]);
    assert_eq!(doc["clusterDomain"].as_str(), Some("cluster.example"));
    assert_eq!(doc["maxPods"].as_u64(), Some(110));
    assert_eq!(
        doc["evictionHard"]["memory.available"].as_str(),
        Some("15%")
    );
    assert_eq!(
        doc["evictionHard"]["nodefs.available"].as_str(),
        Some("10%")
    );
    assert_eq!(
        doc["evictionSoft"]["memory.available"].as_str(),
        Some("12%")
    );
    assert_eq!(
        doc["evictionSoftGracePeriod"]["memory.available"].as_str(),
        Some("30s")
    );
    assert_eq!(doc["evictionMaxPodGracePeriod"].as_i64(), Some(40));
    assert_eq!(
        doc["kubeReserved"]["ephemeral-storage"].as_str(),
        Some("1Gi")
    );
    assert_eq!(doc["systemReserved"]["memory"].as_str(), Some("256Mi"));
    assert_eq!(doc["memoryManagerPolicy"].as_str(), Some("Static"));
    let reserved = doc["reservedMemory"].as_sequence().unwrap();
    assert_eq!(reserved.len(), 2, "disabled NUMA node 2 is left out");
    assert_eq!(reserved[0]["numaNode"].as_u64(), Some(0));
    assert_eq!(reserved[0]["limits"]["memory"].as_str(), Some("674Mi"));
    assert_eq!(reserved[0]["limits"]["hugepages-1Gi"].as_str(), Some("1Gi"));
    assert_eq!(reserved[1]["numaNode"].as_u64(), Some(1));
    assert_eq!(
        reserved[1]["limits"]["hugepages-2Mi"].as_str(),
        Some("2148Mi")
    );
    assert!(reserved[1]["limits"].get("memory").is_none());
    assert_eq!(doc["allowedUnsafeSysctls"][1].as_str(), Some("kernel.msg*"));
    assert_eq!(doc["cpuManagerPolicy"].as_str(), Some("static"));
    assert_eq!(
        doc["topologyManagerPolicy"].as_str(),
        Some("single-numa-node")
    );
    assert_eq!(doc["kubeAPIQPS"].as_i64(), Some(10));
    assert_eq!(doc["containerLogMaxSize"].as_str(), Some("10Mi"));
    assert_eq!(doc["shutdownGracePeriod"].as_str(), Some("30s"));
    assert_eq!(
        doc["providerID"].as_str(),
        Some("aws:///us-west-2a/i-0123456789abcdef0")
    );
    assert_eq!(doc["serverTLSBootstrap"].as_bool(), Some(true));
    assert_eq!(
        doc["authentication"]["webhook"]["enabled"].as_bool(),
        Some(true)
    );
    assert_eq!(
        doc["authentication"]["anonymous"]["enabled"].as_bool(),
        Some(false)
    );
    assert_eq!(
        doc["authentication"]["x509"]["clientCAFile"].as_str(),
        Some("/etc/kubernetes/pki/ca.crt")
    );
    assert_eq!(doc["authorization"]["mode"].as_str(), Some("Webhook"));
}

#[test]
fn kubelet_config_single_dns_ip_and_standalone_mode() {
    let settings = settings_model::validate(&json!({
        "kubernetes": {"cluster-dns-ip": "10.96.0.10", "standalone-mode": true}
    }))
    .unwrap();
    let doc = yaml(&render("kubelet-config", &settings));
    assert_eq!(doc["clusterDNS"][0].as_str(), Some("10.96.0.10"));
    assert_eq!(doc["clusterDNS"].as_sequence().unwrap().len(), 1);
    assert_eq!(
        doc["authentication"]["webhook"]["enabled"].as_bool(),
        Some(false)
    );
    assert_eq!(
        doc["authentication"]["anonymous"]["enabled"].as_bool(),
        Some(false)
    );
    assert_eq!(doc["authorization"]["mode"].as_str(), Some("AlwaysAllow"));
    assert_eq!(doc["registerNode"].as_bool(), Some(false));
    let env = env_file(&render("kubelet-env", &settings));
    assert_eq!(env["KUBELET_MODE"], "standalone");
}

/// `settings` validated (the tests render only what the model accepts).
fn valid(settings: Value) -> Value {
    settings_model::validate(&settings).unwrap_or_else(|e| panic!("{e}"))
}

/// `/etc/hosts` as a resolver reads it: address → names, lines in order.
fn hosts_lines(text: &str) -> Vec<(String, Vec<String>)> {
    lines(text)
        .into_iter()
        .map(|l| {
            let mut words = l.split_whitespace().map(str::to_owned);
            (words.next().unwrap(), words.collect())
        })
        .collect()
}

#[test]
fn hosts_has_the_network_hosts_entries_merged_by_address() {
    let s = valid(json!({"network": {
        "hostname": "node-1.example.internal",
        "hosts": [
            ["10.0.0.5", ["db", "db.example.internal"]],
            ["127.0.0.1", ["local-alias"]],
            ["fd00::5", ["db6"]],
            ["10.0.0.5", ["database"]],
            ["::1", ["local6"]]
        ]
    }}));
    let hosts = hosts_lines(&render("hosts", &s));
    let names = |addr: &str| -> Vec<String> {
        hosts
            .iter()
            .filter(|(a, _)| a == addr)
            .flat_map(|(_, n)| n.clone())
            .collect()
    };
    assert_eq!(
        hosts.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        ["127.0.0.1", "::1", "10.0.0.5", "fd00::5"],
        "one line per address, in first-seen order"
    );
    assert_eq!(names("10.0.0.5"), ["db", "db.example.internal", "database"]);
    assert_eq!(names("fd00::5"), ["db6"]);
    for (addr, alias) in [("127.0.0.1", "local-alias"), ("::1", "local6")] {
        let n = names(addr);
        assert!(n.contains(&"localhost".to_owned()), "{n:?}");
        assert!(n.contains(&"node-1.example.internal".to_owned()), "{n:?}");
        assert!(n.contains(&"node-1".to_owned()), "{n:?}");
        assert_eq!(n.last().map(String::as_str), Some(alias), "{n:?}");
    }
    assert!(!names("127.0.0.1").contains(&"local6".to_owned()));

    // A host name the entries give an address is not also put on loopback.
    let s = valid(json!({"network": {
        "hostname": "node-1.example.internal",
        "hosts": [["10.0.0.9", ["node-1.example.internal"]]]
    }}));
    let text = render("hosts", &s);
    let hosts = hosts_lines(&text);
    assert_eq!(
        hosts[0].1,
        [
            "localhost",
            "localhost.localdomain",
            "localhost4",
            "localhost4.localdomain4"
        ],
        "{text}"
    );
    assert_eq!(
        hosts[2],
        (
            "10.0.0.9".to_owned(),
            vec!["node-1.example.internal".to_owned()]
        )
    );
}

#[test]
fn chrony_adds_the_options_to_every_server() {
    let s = valid(json!({"ntp": {
        "time-servers": ["169.254.169.123", "ntp://time.example.com"],
        "options": ["minpoll 4", "maxpoll", "8", "prefer"]
    }}));
    let servers = chrony_servers(&s);
    assert_eq!(
        servers,
        [
            "server 169.254.169.123 iburst minpoll 4 maxpoll 8 prefer",
            "server time.example.com iburst minpoll 4 maxpoll 8 prefer"
        ]
    );
}

#[test]
fn kernel_modules_are_refused_or_loaded_at_boot() {
    let s = valid(json!({"kernel": {"modules": {
        "sctp": {"allowed": false},
        "br_netfilter": {"allowed": true, "autoload": true},
        "udf": {"allowed": true},
        "dccp": {"allowed": false, "autoload": true},
        "nbd": {"autoload": true}
    }}}));
    assert_eq!(
        lines(&render("modprobe-conf", &s)),
        ["install dccp /bin/true", "install sctp /bin/true"]
    );
    assert_eq!(lines(&render("modules-load-conf", &s)), ["br_netfilter"]);
    assert!(lines(&render("modprobe-conf", &json!({}))).is_empty());
    assert!(lines(&render("modules-load-conf", &json!({}))).is_empty());
}

/// The base runtime spec, parsed.
fn cri_base(settings: &Value) -> Value {
    let text = render("containerd-cri-base", settings);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

const CONTAINERD_DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

#[test]
fn oci_defaults_become_the_base_runtime_spec_of_pods() {
    // Unset: containerd's own defaults.
    let spec = cri_base(&json!({}));
    for set in ["bounding", "effective", "permitted"] {
        assert_eq!(
            spec["process"]["capabilities"][set],
            json!(CONTAINERD_DEFAULT_CAPS),
            "{set}"
        );
    }
    assert_eq!(
        spec["process"]["rlimits"],
        json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}])
    );
    assert_eq!(spec["root"]["path"], "rootfs");
    assert_eq!(spec["linux"]["namespaces"].as_array().unwrap().len(), 5);

    let spec = cri_base(&valid(json!({"oci-defaults": {
        "capabilities": {"chown": true, "sys-admin": true, "net-raw": false, "dac-read-search": true},
        "resource-limits": {
            "max-open-files": {"hard-limit": 1048576, "soft-limit": 65536},
            "max-processes": {"hard-limit": "unlimited", "soft-limit": -1},
            "max-locked-memory": {"soft-limit": "04096"},
            "max-core-file-size": {"hard-limit": 0},
            "max-stack-size": {}
        }
    }})));
    for set in ["bounding", "effective", "permitted"] {
        assert_eq!(
            spec["process"]["capabilities"][set],
            json!(["CAP_CHOWN", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN"]),
            "{set}: exactly the capabilities set to true"
        );
    }
    let rlimits: BTreeMap<String, (u64, u64)> = spec["process"]["rlimits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["type"].as_str().unwrap().to_owned(),
                (r["hard"].as_u64().unwrap(), r["soft"].as_u64().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        rlimits,
        BTreeMap::from([
            ("RLIMIT_CORE".to_owned(), (0, 0)),
            ("RLIMIT_MEMLOCK".to_owned(), (4096, 4096)),
            ("RLIMIT_NOFILE".to_owned(), (1_048_576, 65536)),
            ("RLIMIT_NPROC".to_owned(), (u64::MAX, u64::MAX)),
        ])
    );
    // No capability at all is a valid spec too.
    let spec = cri_base(&valid(
        json!({"oci-defaults": {"capabilities": {"chown": false}, "resource-limits": {}}}),
    ));
    assert_eq!(spec["process"]["capabilities"]["bounding"], json!([]));
    assert_eq!(spec["process"]["rlimits"], json!([]));
}

#[test]
fn containerd_uses_the_base_spec_and_the_device_ownership_option() {
    let s = valid(json!({"kubernetes": {"device-ownership-from-security-context": true}}));
    let doc = toml_doc(&render("containerd-config", &s));
    let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
    assert_eq!(
        cri["device_ownership_from_security_context"].as_bool(),
        Some(true)
    );
    assert_eq!(
        cri["containerd"]["runtimes"]["runc"]["base_runtime_spec"].as_str(),
        Some("/etc/containerd/cri-base.json")
    );
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    assert_eq!(
        meta.configuration_files["containerd-cri-base"].path,
        "/etc/containerd/cri-base.json"
    );
    for key in [
        "settings.oci-defaults.capabilities.chown",
        "settings.kubernetes.device-ownership-from-security-context",
    ] {
        assert!(meta.affected_by(key).contains("containerd"), "{key}");
    }
}

#[test]
fn kubelet_config_has_the_bottlerocket_kubernetes_settings() {
    let s = valid(json!({"kubernetes": {
        "cpu-cfs-quota-enforced": false,
        "cpu-manager-policy": "static",
        "cpu-manager-policy-options": ["full-pcpus-only", "distribute-cpus-across-numa"],
        "pod-pids-limit": 4096,
        "log-level": 4,
        "seccomp-default": true,
        "reserved-cpus": "0-1",
        "container-log-max-workers": 3,
        "container-log-monitor-interval": "15s",
        "image-gc-high-threshold-percent": "85",
        "image-gc-low-threshold-percent": 75,
        "image-minimum-gc-age": "2m",
        "image-maximum-gc-age": "168h",
        "single-process-oom-kill": true,
        "max-parallel-image-pulls": 5,
        "server-tls-bootstrap": true
    }}));
    let doc = yaml(&render("kubelet-config", &s));
    assert_eq!(doc["cpuCFSQuota"].as_bool(), Some(false));
    assert_eq!(doc["cpuManagerPolicy"].as_str(), Some("static"));
    let options = doc["cpuManagerPolicyOptions"].as_mapping().unwrap();
    assert_eq!(options.len(), 2);
    assert_eq!(
        doc["cpuManagerPolicyOptions"]["full-pcpus-only"].as_str(),
        Some("true")
    );
    assert_eq!(
        doc["cpuManagerPolicyOptions"]["distribute-cpus-across-numa"].as_str(),
        Some("true")
    );
    assert_eq!(doc["podPidsLimit"].as_i64(), Some(4096));
    assert_eq!(doc["logging"]["verbosity"].as_u64(), Some(4));
    assert_eq!(doc["seccompDefault"].as_bool(), Some(true));
    assert_eq!(doc["reservedSystemCPUs"].as_str(), Some("0-1"));
    assert_eq!(doc["containerLogMaxWorkers"].as_i64(), Some(3));
    assert_eq!(doc["containerLogMonitorInterval"].as_str(), Some("15s"));
    assert_eq!(
        doc["imageGCHighThresholdPercent"].as_i64(),
        Some(85),
        "the text form is a number"
    );
    assert_eq!(doc["imageGCLowThresholdPercent"].as_i64(), Some(75));
    // Leading zeros (which YAML 1.1 reads as octal) are not written.
    let zeros = valid(json!({"kubernetes": {"image-gc-high-threshold-percent": "010"}}));
    let text = render("kubelet-config", &zeros);
    assert!(
        text.contains("\nimageGCHighThresholdPercent: 10\n"),
        "{text}"
    );
    assert_eq!(doc["imageMinimumGCAge"].as_str(), Some("2m"));
    assert_eq!(doc["imageMaximumGCAge"].as_str(), Some("168h"));
    assert_eq!(doc["singleProcessOOMKill"].as_bool(), Some(true));
    assert_eq!(doc["maxParallelImagePulls"].as_i64(), Some(5));
    assert_eq!(doc["serializeImagePulls"].as_bool(), Some(false));
    assert_eq!(
        doc["staticPodPath"].as_str(),
        Some("/etc/kubernetes/static-pods")
    );
    assert_eq!(doc["serverTLSBootstrap"].as_bool(), Some(true));
    assert!(doc.get("tlsCertFile").is_none());

    // Static pods off; one pull at a time needs no change to serial pulls.
    let s =
        valid(json!({"kubernetes": {"static-pods-enabled": false, "max-parallel-image-pulls": 1}}));
    let doc = yaml(&render("kubelet-config", &s));
    assert!(doc.get("staticPodPath").is_none());
    assert!(doc.get("serializeImagePulls").is_none());
    // Unset: the kubelet's own defaults.
    let doc = yaml(&render("kubelet-config", &json!({})));
    for field in [
        "podPidsLimit",
        "cpuCFSQuota",
        "logging",
        "seccompDefault",
        "tlsCertFile",
    ] {
        assert!(doc.get(field).is_none(), "{field}");
    }
    assert_eq!(
        doc["staticPodPath"].as_str(),
        Some("/etc/kubernetes/static-pods")
    );
}

/// The blocks of a PEM file: (label, decoded DER), checked as RFC 7468 text.
fn pem_blocks(text: &str) -> Vec<(String, Vec<u8>)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        match (
            &mut open,
            line.strip_prefix("-----BEGIN "),
            line.strip_prefix("-----END "),
        ) {
            (None, Some(rest), _) => {
                let label = rest.strip_suffix("-----").expect("a BEGIN line");
                open = Some((label.to_owned(), String::new()));
            }
            (Some((label, body)), _, Some(rest)) => {
                assert_eq!(rest.strip_suffix("-----"), Some(label.as_str()), "{text}");
                let der = base64::engine::general_purpose::STANDARD
                    .decode(body.as_bytes())
                    .unwrap_or_else(|e| panic!("not base64 ({e}):\n{text}"));
                blocks.push((label.clone(), der));
                open = None;
            }
            (Some((_, body)), None, None) => body.push_str(line.trim()),
            (None, None, _) => assert!(line.trim().is_empty(), "text outside a block: {line:?}"),
            _ => panic!("unexpected line {line:?} in\n{text}"),
        }
    }
    assert!(open.is_none(), "an unterminated block:\n{text}");
    blocks
}

#[test]
fn the_kubelet_serves_with_the_configured_certificate_and_key() {
    let serving = include_str!("../../settings-model/tests/fixtures/certs/d.pem");
    let cert = format!(
        "{serving}{}",
        include_str!("../../settings-model/tests/fixtures/certs/e.pem")
    );
    let cert = cert.as_str();
    let key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIGtleS1tYXRlcmlhbA==\n-----END EC PRIVATE KEY-----\n";
    let s = valid(json!({"kubernetes": {
        "server-certificate": b64(cert),
        "server-key": b64(key),
        "server-tls-bootstrap": true
    }}));
    let doc = yaml(&render("kubelet-config", &s));
    assert_eq!(
        doc["tlsCertFile"].as_str(),
        Some("/etc/kubernetes/pki/kubelet-server.crt")
    );
    assert_eq!(
        doc["tlsPrivateKeyFile"].as_str(),
        Some("/etc/kubernetes/pki/private/kubelet-server.key")
    );
    assert!(
        doc.get("serverTLSBootstrap").is_none(),
        "a given certificate replaces bootstrapping"
    );

    let crt = render("kubelet-server-crt", &s);
    let blocks = pem_blocks(&crt);
    assert_eq!(blocks.len(), 2);
    assert!(blocks.iter().all(|(label, _)| label == "CERTIFICATE"));
    assert_eq!(blocks[0].1, pem_blocks(serving)[0].1);
    let key_text = render("kubelet-server-key", &s);
    let blocks = pem_blocks(&key_text);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].0, "EC PRIVATE KEY");
    assert!(blocks[0].1.ends_with(b"key-material"));

    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    let key_file = &meta.configuration_files["kubelet-server-key"];
    assert_eq!(
        key_file.path,
        "/etc/kubernetes/pki/private/kubelet-server.key"
    );
    assert_eq!(key_file.mode, "0600");
    assert_eq!(
        meta.configuration_files["kubelet-server-crt"].path,
        "/etc/kubernetes/pki/kubelet-server.crt"
    );
    // One of the two alone is not used; unset, both files are empty.
    let s = valid(json!({"kubernetes": {"server-certificate": b64(cert)}}));
    assert!(yaml(&render("kubelet-config", &s))
        .get("tlsCertFile")
        .is_none());
    assert_eq!(render("kubelet-server-key", &json!({})), "");
    assert_eq!(render("kubelet-server-crt", &json!({})), "");
}

#[test]
fn static_pods_are_one_manifest_file_each_in_the_kubelets_directory() {
    let web = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n    - name: web\n      image: nginx:1.27\n";
    let s = valid(json!({"kubernetes": {"static-pods": {
        "web": {"enabled": true, "manifest": b64(web)},
        "off": {"enabled": false, "manifest": b64(web)},
        "no-manifest": {"enabled": true}
    }}}));
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    let file = &meta.configuration_files["static-pods"];
    assert!(file.item_is_file());
    assert_eq!(file.mode, "0644");
    let kubelet = yaml(&render("kubelet-config", &s));
    let (dir, suffix) = file.pattern_parts().unwrap();
    assert_eq!(
        kubelet["staticPodPath"].as_str(),
        Some(dir),
        "the kubelet reads that directory"
    );
    assert_eq!(suffix, ".yaml");
    let mut rendered = BTreeMap::new();
    for item in file.items(&s).unwrap() {
        let text = render_item("static-pod", &s, &item.value, &item.name);
        rendered.insert(file.item_path(&item.segment.unwrap()), text);
    }
    let pod = yaml(&rendered["/etc/kubernetes/static-pods/web.yaml"]);
    assert_eq!(pod["kind"].as_str(), Some("Pod"));
    assert_eq!(pod["metadata"]["name"].as_str(), Some("web"));
    assert_eq!(
        pod["spec"]["containers"][0]["image"].as_str(),
        Some("nginx:1.27")
    );
    // A disabled pod, or one without a manifest, renders nothing: the apply writes no
    // file for it (and removes the one it had).
    assert_eq!(rendered["/etc/kubernetes/static-pods/off.yaml"].trim(), "");
    assert_eq!(
        rendered["/etc/kubernetes/static-pods/no-manifest.yaml"].trim(),
        ""
    );
    assert!(meta
        .affected_by("settings.kubernetes.static-pods.web.manifest")
        .contains("kubelet"));
    assert!(meta.services["kubelet"]
        .configuration_files
        .contains(&"static-pods".to_owned()));
}

#[test]
fn kubelet_env_has_labels_and_taints() {
    let env = env_file(&render("kubelet-env", &full_settings()));
    assert_eq!(env["NODE_LABELS"], "example.com/role=worker,label1=foo");
    assert_eq!(
        env["NODE_TAINTS"],
        "dedicated=experimental:PreferNoSchedule,dedicated=experimental:NoExecute,special:NoSchedule"
    );
    assert_eq!(env["NODE_IP"], "10.0.1.7");
    assert_eq!(env["KUBELET_MODE"], "cluster");
}

#[test]
fn kubernetes_ca_is_the_decoded_certificate() {
    let text = render("kubernetes-ca", &full_settings());
    assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"), "{text}");
    assert!(
        text.trim_end().ends_with("-----END CERTIFICATE-----"),
        "{text}"
    );
    assert_eq!(text, CA_PEM);
}

#[test]
fn kubeconfig_points_at_the_api_server() {
    let doc = yaml(&render("kubeconfig", &full_settings()));
    assert_eq!(doc["kind"].as_str(), Some("Config"));
    let cluster = &doc["clusters"][0];
    assert_eq!(cluster["name"].as_str(), Some("prod"));
    assert_eq!(
        cluster["cluster"]["server"].as_str(),
        Some("https://api.example.com:6443")
    );
    assert_eq!(
        cluster["cluster"]["certificate-authority"].as_str(),
        Some("/etc/kubernetes/pki/ca.crt")
    );
    let exec = &doc["users"][0]["user"]["exec"];
    let args: Vec<&str> = exec["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["token", "-i", "prod", "--region", "us-west-2"]);
    assert_eq!(
        doc["contexts"][0]["context"]["cluster"].as_str(),
        Some("prod")
    );
    assert_eq!(doc["current-context"].as_str(), Some("kubelet"));

    // tls mode uses the rotated client certificate.
    let mut s = full_settings();
    s["kubernetes"]["authentication-mode"] = json!("tls");
    let doc = yaml(&render("kubeconfig", &s));
    assert_eq!(
        doc["users"][0]["user"]["client-certificate"].as_str(),
        Some("/var/lib/kubelet/pki/kubelet-client-current.pem")
    );
}

#[test]
fn credential_provider_config_lists_enabled_providers() {
    let doc = yaml(&render("credential-provider-config", &full_settings()));
    assert_eq!(doc["apiVersion"].as_str(), Some("kubelet.config.k8s.io/v1"));
    assert_eq!(doc["kind"].as_str(), Some("CredentialProviderConfig"));
    let providers = doc["providers"].as_sequence().unwrap();
    assert_eq!(providers.len(), 1);
    let p = &providers[0];
    assert_eq!(p["name"].as_str(), Some("ecr-credential-provider"));
    assert_eq!(
        p["apiVersion"].as_str(),
        Some("credentialprovider.kubelet.k8s.io/v1")
    );
    assert_eq!(p["defaultCacheDuration"].as_str(), Some("30m"));
    assert_eq!(
        p["matchImages"][1].as_str(),
        Some("*.dkr.ecr.us-west-2.amazonaws.com")
    );
    let env: BTreeMap<&str, &str> = p["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(
        env,
        BTreeMap::from([("GOMAXPROCS", "2"), ("KEY", "abc123xyz")])
    );
}

#[test]
fn ca_bundle_has_trusted_bundles_in_name_order() {
    let text = render("ca-bundle", &full_settings());
    let blocks: Vec<&str> = text
        .split("-----BEGIN CERTIFICATE-----\n")
        .skip(1)
        .map(|b| b.split("\n-----END CERTIFICATE-----").next().unwrap())
        .collect();
    assert_eq!(blocks, [pem_body(CA_PEM), pem_body(OTHER_PEM)]);
    assert!(!text.contains(pem_body(DISTRUSTED_PEM)));
}

/// Bottlerocket's certdog distrusts a bundle whose `trusted` is not set; so does Keel:
/// a bundle given without the flag is never trusted by accident.
#[test]
fn a_bundle_without_trusted_is_distrusted() {
    let s = valid(json!({"pki": {"unflagged": {"data": b64(OTHER_PEM)}}}));
    let distrusted = render("ca-distrust", &s);
    assert!(
        distrusted.contains("# settings.pki.unflagged\n")
            && distrusted.contains(pem_body(OTHER_PEM)),
        "{distrusted}"
    );
    let trusted = render("ca-bundle", &s);
    assert!(!trusted.contains(pem_body(OTHER_PEM)), "{trusted}");
}

#[test]
fn distrusted_bundles_go_to_the_blocklist_only() {
    let text = render("ca-distrust", &full_settings());
    let trusted = render("ca-bundle", &full_settings());
    assert!(text.contains("-----BEGIN CERTIFICATE-----"), "{text}");
    for block in text.split("-----BEGIN CERTIFICATE-----\n").skip(1) {
        let body = block.split("\n-----END CERTIFICATE-----").next().unwrap();
        assert!(
            !trusted.contains(body),
            "{body} is both trusted and distrusted"
        );
    }
    assert!(render("ca-distrust", &serde_json::json!({}))
        .trim()
        .is_empty());
}

#[test]
fn boot_parameters_are_one_line_each() {
    let s = full_settings();
    let kernel = render("boot-kernel-parameters", &s);
    assert_eq!(kernel.lines().count(), 1, "{kernel:?}");
    let words: Vec<&str> = kernel.split_whitespace().collect();
    assert_eq!(
        words,
        [
            "console=tty0,ttyS1,115200n8",
            "crashkernel=2G-:256M",
            "nosmt"
        ]
    );
    assert_eq!(
        render("boot-init-parameters", &s),
        "log_level=debug splash\n"
    );
}

#[test]
fn undefined_values_name_template_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kubelet-config"),
        "# header\napiVersion: v1\nclusterDNS: {{ settings.kubernetes[\"cluster-dns-ip\"] }}\n",
    )
    .unwrap();
    let t = Templates::load(dir.path()).unwrap();
    let err = t.render("kubelet-config", &json!({}), &os()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "template \"kubelet-config\" line 3: undefined value settings.kubernetes.cluster-dns-ip"
    );
    assert_eq!(
        err.key().as_deref(),
        Some("settings.kubernetes.cluster-dns-ip")
    );
    assert!(matches!(err, RenderError::Undefined { .. }));
}

#[test]
fn syntax_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good"), "ok\n").unwrap();
    std::fs::write(dir.path().join("broken"), "a\nb\n{% if x %}\n").unwrap();
    let err = Templates::load(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("template \"broken\" line "), "{text}");
    assert!(text.contains("syntax error"), "{text}");
}

#[test]
fn services_toml_loads_and_names_existing_templates() {
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    let t = templates();
    for (name, file) in &meta.configuration_files {
        assert!(
            packaging()
                .join("templates")
                .join(&file.template_path)
                .is_file(),
            "{name}: template {} missing",
            file.template_path
        );
        assert!(t.contains(&file.template_path));
        assert!(file.path.starts_with('/'), "{name}: {}", file.path);
    }
    let hosts = &meta.configuration_files["containerd-hosts"];
    assert_eq!(
        hosts.for_each.as_deref(),
        Some("settings.container-registry.mirrors")
    );
    assert_eq!(hosts.item_name.as_deref(), Some("registry"));
    // containerd re-reads certs.d by itself: the owning service restarts nothing.
    let owners: Vec<&String> = meta
        .services
        .iter()
        .filter(|(_, s)| {
            s.configuration_files
                .iter()
                .any(|f| f == "containerd-hosts")
        })
        .map(|(name, s)| {
            assert!(s.restart_commands.is_empty(), "{name}");
            name
        })
        .collect();
    assert_eq!(owners, ["container-registry"]);
    assert!(meta
        .affected_by("settings.container-registry.mirrors")
        .contains("container-registry"));
    // Every template is used by some configuration file.
    for template in t.names() {
        assert!(
            meta.configuration_files
                .values()
                .any(|f| f.template_path == template),
            "template {template} is not in services.toml"
        );
    }
    for secret in [
        "registries",
        "proxy-env",
        "kubeconfig",
        "credential-provider-config",
    ] {
        assert_eq!(meta.configuration_files[secret].mode, "0600", "{secret}");
    }
    let proxy = meta.affected_by("settings.network.https-proxy");
    for service in ["proxy", "containerd", "kubelet"] {
        assert!(proxy.contains(service), "{proxy:?}");
    }
    assert!(meta
        .affected_by("settings.ntp.time-servers")
        .contains("chronyd"));
    assert!(meta
        .affected_by("settings.kernel.sysctl.vm.x")
        .contains("sysctl"));
}

#[test]
fn groups_without_a_component_on_this_host_are_marked_no_effect() {
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    for key in [
        "settings.metrics.send-metrics",
        "settings.metrics.service-checks[0]",
        "settings.cloudformation.should-signal",
        "settings.autoscaling.should-wait",
        "settings.oci-hooks.log4j-hotpatch-enabled",
        "settings.ecs.cluster",
        "settings.ecs.instance-attributes.x",
        "settings.kernel.lockdown",
        "settings.kubernetes.hostname-override-source",
        "settings.kubernetes.bootstrap-token",
        "settings.aws.config",
        "settings.aws.credentials",
        "settings.aws.profile",
    ] {
        assert!(meta.has_no_effect(key), "{key} is not marked no-effect");
    }
    for key in [
        "settings.motd",
        "settings.kubernetes.max-pods",
        "settings.kubernetes.static-pods.web.manifest",
        "settings.oci-defaults.capabilities.chown",
        "settings.network.hosts",
        "settings.kernel.sysctl.x",
        "settings.kernel.modules.sctp.allowed",
        "settings.host-containers.admin.enabled",
        "settings.aws.region",
        "settings.boot.kernel-parameters.console",
        // Read by the boot (reboot-to-reconcile).
        "settings.boot.reboot-to-reconcile",
        "settings.kubernetes.api-server",
        // Read by keeld's update commands.
        "settings.updates.seed",
        "settings.updates.version-lock",
        "settings.updates.metadata-base-url",
    ] {
        assert!(!meta.has_no_effect(key), "{key} is marked no-effect");
    }
    for (name, service) in &meta.services {
        if service.no_effect {
            assert!(
                service.configuration_files.is_empty() && service.restart_commands.is_empty(),
                "{name}"
            );
        }
    }
}

#[test]
fn bottlerocket_documentation_examples_render() {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/user-data/bottlerocket-docs"
    ));
    let Ok(expected) = std::fs::read_to_string(dir.join("EXPECTED.tsv")) else {
        skip(&format!("{} is missing", dir.display()));
        return;
    };
    let t = templates();
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    let hosts = &meta.configuration_files["containerd-hosts"];
    let mut rendered = 0;
    for line in expected.lines().skip(1) {
        let mut fields = line.split('\t');
        let (Some(file), Some("accept")) = (fields.next(), fields.next()) else {
            continue;
        };
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let patch = settings_model::userdata::parse_user_data(file, &text)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let settings = settings_model::validate(&patch).unwrap_or_else(|e| panic!("{file}: {e}"));
        for item in hosts
            .items(&settings)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
        {
            let context = Templates::context_with_item(&settings, &os(), &item.value, &item.name);
            let out = t
                .render_in("containerd-hosts", &context)
                .unwrap_or_else(|e| panic!("{file} / containerd-hosts[{}]: {e}", item.name));
            toml::from_str::<toml::Table>(&out)
                .unwrap_or_else(|e| panic!("{file} / containerd-hosts: not TOML ({e}):\n{out}"));
            item.segment
                .unwrap_or_else(|e| panic!("{file} / containerd-hosts: {e}"));
        }
        for name in t.names() {
            let out = t
                .render(&name, &settings, &os())
                .unwrap_or_else(|e| panic!("{file} / {name}: {e}"));
            match name.as_str() {
                "registries" | "containerd-config" | "containerd-hosts" => {
                    toml::from_str::<toml::Table>(&out)
                        .unwrap_or_else(|e| panic!("{file} / {name}: not TOML ({e}):\n{out}"));
                }
                "kubelet-config" | "kubeconfig" | "credential-provider-config" => {
                    serde_norway::from_str::<serde_norway::Value>(&out)
                        .unwrap_or_else(|e| panic!("{file} / {name}: not YAML ({e}):\n{out}"));
                }
                "containerd-cri-base" => {
                    serde_json::from_str::<Value>(&out)
                        .unwrap_or_else(|e| panic!("{file} / {name}: not JSON ({e}):\n{out}"));
                }
                _ => {}
            }
        }
        rendered += 1;
    }
    assert!(rendered > 0, "no accepted example found in EXPECTED.tsv");
    println!("rendered every template for {rendered} accepted examples");
}

/// A proof that cannot run here. The README's test command (and so CI) sets
/// `KEEL_REQUIRE_ALL_TESTS=1`, where a skip would hide a missing proof: it fails there.
fn skip(reason: &str) {
    assert!(
        std::env::var_os("KEEL_REQUIRE_ALL_TESTS").is_none(),
        "cannot run: {reason} (KEEL_REQUIRE_ALL_TESTS is set, so this is a failure, not a skip)"
    );
    println!("SKIPPED: {reason}");
}

// ---------------------------------------------------------------------------------------
// Hostile values: every string that reaches a template, with every character a format
// treats specially, either refused by the model naming the key, or rendered into files
// whose parsed content is the baseline's with only that value changed.

/// Characters and sequences that mean something to one of the formats rendered, to a
/// terminal, or to the template language.
const HOSTILE: &[&str] = &[
    "\n",
    "\r",
    "\t",
    "\0",
    "\"",
    "'",
    "\\",
    "}}",
    "{%",
    "{#",
    ": ",
    "#",
    "&",
    "*",
    "!",
    "[",
    "]",
    ",",
    "=",
    " ",
    "$(x)",
    "`x`",
    "\u{fffe}",
    "\u{ffff}",
    "\u{85}",
    "\u{2028}",
    "\u{feff}",
    "\u{1b}[31m",
    "\u{1b}]0;x\u{7}",
    "\u{9b}31m",
    "x\nallow all\ncmdallow all\nserver evil.example.net",
    // The url crate drops tab, LF and CR: a URL with these parses, with a valid host.
    "\nallow\tall\ncmdallow\tall\nserver\tevil.example.net",
    "x\n[evil]\nkey = 1",
    "x\nevil: 1",
    "x\"\nevil = \"1",
];

const PEM_A: &str = include_str!("../../settings-model/tests/fixtures/certs/a.pem");
const PEM_B: &str = include_str!("../../settings-model/tests/fixtures/certs/b.pem");
const PEM_C: &str = include_str!("../../settings-model/tests/fixtures/certs/c.pem");
const PEM_D: &str = include_str!("../../settings-model/tests/fixtures/certs/d.pem");
const STATIC_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static-web-pod\n  namespace: kube-system\nspec:\n  containers:\n    - name: static-web-container\n      image: static-image.example.com/web:1\n";
const STATIC_POD_OFF: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static-off-pod\n";
const PEM_E: &str = include_str!("../../settings-model/tests/fixtures/certs/e.pem");
const KEY_A: &str = "-----BEGIN PRIVATE KEY-----\nMIIBa2V5LXRlc3Q=\n-----END PRIVATE KEY-----\n";

/// Settings with every string that reaches a template, each value distinct and no value
/// a part of another, so that a changed value can be found in the rendered files.
fn every_field_settings() -> Value {
    json!({
        "motd": "motd-text line one\nline two",
        "ntp": {
            "time-servers": ["169.254.169.123", "ntp://ntp-a.example.com:123", "ntp-b.example.org", "ntp://ntp-c.example.net"],
            "options": ["xleave", "prefer"]
        },
        "network": {
            "hostname": "node-seven.example.internal",
            "https-proxy": "proxy-host.example.com:3128",
            "no-proxy": ["skip-a.example.net", "192.0.2.0/24"],
            "hosts": [["10.0.5.9", ["hosts-alias-one", "hosts-alias-two.example"]], ["fd00:ab::99", ["hosts-alias-six"]]]
        },
        "oci-defaults": {
            "capabilities": {"chown": true, "net-raw": true, "sys-admin": false},
            "resource-limits": {
                "max-open-files": {"hard-limit": 1048576, "soft-limit": "65535"},
                "max-processes": {"hard-limit": "unlimited"}
            }
        },
        "dns": {
            "name-servers": ["10.11.0.2", "fd00:ab::53"],
            "search-list": ["search-a.example", "search-b.example"]
        },
        "container-registry": {
            "mirrors": [
                {"registry": "docker.io", "endpoint": ["https://mirror-one.example.com", "https://mirror-two.example.com/v2"]},
                {"registry": "*", "endpoint": ["https://mirror-all.example.com"]}
            ],
            "credentials": [
                {"registry": "creds-a.example.com:5000", "username": "robot-user", "password": "robot-password"},
                {"registry": "creds-b.example.com", "auth": b64("authuser:authpass"), "identitytoken": "identity-token-value"}
            ]
        },
        "kernel": {
            "sysctl": {"net.core.somaxconn": "sysctl-value-one", "vm.max_map_count": "262144"},
            "modules": {"mod-alpha": {"allowed": false}, "mod_beta": {"allowed": true, "autoload": true}}
        },
        "kubernetes": {
            "static-pods": {
                "static-web": {"enabled": true, "manifest": b64(STATIC_POD)},
                "static-off": {"enabled": false, "manifest": b64(STATIC_POD_OFF)}
            },
            "server-certificate": b64(PEM_E),
            "server-key": b64(KEY_A),
            "reserved-cpus": "2-3,6",
            "cpu-manager-policy-options": ["full-pcpus-only", "align-by-socket"],
            "container-log-monitor-interval": "11s",
            "image-minimum-gc-age": "3m",
            "image-maximum-gc-age": "99h",
            "image-gc-high-threshold-percent": "86",
            "image-gc-low-threshold-percent": "79",
            "api-server": "https://api-server.example.com:6443",
            "cluster-name": "cluster-name-prod",
            "cluster-certificate": b64(PEM_D),
            "cluster-dns-ip": ["10.96.0.10", "10.96.0.11"],
            "cluster-domain": "cluster-domain.example",
            "node-labels": {"label-one": "label-value-one", "example.com/role": "label-value-two"},
            "node-taints": {"dedicated": ["taint-value:PreferNoSchedule", ":NoExecute"]},
            "eviction-hard": {"memory.available": "15%"},
            "eviction-soft": {"nodefs.available": "12%"},
            "eviction-soft-grace-period": {"nodefs.available": "45s"},
            "kube-reserved": {"cpu": "150m", "memory": "512Mi"},
            "system-reserved": {"ephemeral-storage": "3Gi"},
            "memory-manager-policy": "Static",
            "memory-manager-reserved-memory": {"0": {"enabled": true, "memory": "674Mi", "hugepages-1Gi": "1Gi", "hugepages-2Mi": "2148Mi"}},
            "cpu-manager-policy": "static",
            "cpu-manager-reconcile-period": "7s",
            "topology-manager-policy": "single-numa-node",
            "topology-manager-scope": "pod",
            "allowed-unsafe-sysctls": ["unsafe-one.*", "kernel.msg*"],
            "credential-providers": {
                "ecr-credential-provider": {
                    "enabled": true,
                    "cache-duration": "30m",
                    "image-patterns": ["*.dkr.ecr.us-east-2.amazonaws.com", "pattern-two.example.com"],
                    "environment": {"KEY_ONE": "env-value-one", "KEY_TWO": "env-value-two"}
                }
            },
            "authentication-mode": "aws",
            "pod-infra-container-image": "registry.example.com/pause:3.9",
            "node-ip": "10.0.1.7",
            "hostname-override": "override-host.example.com",
            "provider-id": "aws:///us-west-2a/i-0123456789abcdef0",
            "cloud-provider": "external-cloud",
            "container-log-max-size": "10Mi",
            "shutdown-grace-period": "2m",
            "shutdown-grace-period-for-critical-pods": "20s"
        },
        "aws": {"region": "us-west-2"},
        "boot": {
            "kernel-parameters": {"console": ["tty0", "ttyS1,115200n8"], "nosmt": []},
            "init-parameters": {"systemd.log_level": ["notice"]}
        },
        "pki": {
            "trusted-ca": {"data": b64(PEM_A), "trusted": true},
            "more-cas": {"data": b64(PEM_B), "trusted": true},
            "bad-ca": {"data": b64(PEM_C), "trusted": false}
        }
    })
}

/// String settings that no template reads (they go to containers, the boot, or keeld's
/// own use), as key patterns: `*` for a map key, `[]` for a list item.
const NOT_RENDERED: &[&str] = &[
    "host-containers",
    "bootstrap-containers",
    "bootstrap-commands",
    "kernel.lockdown",
    "kubernetes.bootstrap-token",
    "aws.config",
    "aws.credentials",
    "aws.profile",
    // Stored in other forms: `creds` as `credentials`, the table form of the mirrors and
    // a key's one taint as lists.
    "container-registry.creds",
    "container-registry.mirrors.*",
    "kubernetes.node-taints.*",
    // Stored, with no effect on a Keel host (services.toml marks them `no-effect`).
    "updates",
    "metrics",
    "oci-hooks",
    "cloudformation",
    "autoscaling",
    "ecs",
    "kubernetes.hostname-override-source",
];

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// One string of the settings: a value, or the key of a map entry.
#[derive(Clone, Debug)]
struct Field {
    path: Vec<Seg>,
    is_key: bool,
}

impl Field {
    /// The settings key an error about this field names.
    fn key(&self, renamed: Option<&str>) -> String {
        let mut key = String::from("settings");
        let last = self.path.len() - 1;
        for (i, seg) in self.path.iter().enumerate() {
            match seg {
                Seg::Index(n) => key.push_str(&format!("[{n}]")),
                Seg::Key(k) => {
                    let k = if i == last { renamed.unwrap_or(k) } else { k };
                    key.push('.');
                    key.push_str(&settings_model::key::format_segment(k));
                }
            }
        }
        key
    }

    /// `settings.a.*.b[]`-style pattern (map keys as `*`, list items as `[]`).
    fn pattern(&self, maps: &[Vec<Seg>]) -> String {
        let mut out = Vec::new();
        for (i, seg) in self.path.iter().enumerate() {
            match seg {
                Seg::Index(_) => out.push("[]".to_owned()),
                Seg::Key(k) if maps.contains(&self.path[..i].to_vec()) => out.push("*".to_owned()),
                Seg::Key(k) => out.push(k.clone()),
            }
        }
        let text = out.join(".").replace(".[]", "[]");
        if self.is_key {
            format!("{text} (key)")
        } else {
            text
        }
    }
}

fn at<'a>(value: &'a Value, path: &[Seg]) -> &'a Value {
    path.iter().fold(value, |v, seg| match seg {
        Seg::Key(k) => &v[k.as_str()],
        Seg::Index(i) => &v[*i],
    })
}

fn at_mut<'a>(value: &'a mut Value, path: &[Seg]) -> &'a mut Value {
    path.iter().fold(value, |v, seg| match seg {
        Seg::Key(k) => &mut v[k.as_str()],
        Seg::Index(i) => &mut v[*i],
    })
}

/// `node`, its `$ref`s followed.
fn resolve<'a>(root: &'a Value, mut node: &'a Value) -> &'a Value {
    while let Some(r) = node.get("$ref").and_then(Value::as_str) {
        node = &root["definitions"][r.trim_start_matches("#/definitions/")];
    }
    node
}

/// The JSON Schema node of `path`, `$ref`s followed; for a list of alternatives
/// (`anyOf`), the first that has what the path needs.
fn schema_at<'a>(root: &'a Value, node: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let node = resolve(root, node);
    let Some((seg, rest)) = path.split_first() else {
        return Some(node);
    };
    let mut options = vec![node];
    for combinator in ["anyOf", "allOf"] {
        if let Some(list) = node.get(combinator).and_then(Value::as_array) {
            options.extend(list.iter().map(|n| resolve(root, n)));
        }
    }
    options.into_iter().find_map(|n| {
        let next = match seg {
            Seg::Key(k) => n
                .get("properties")
                .and_then(|p| p.get(k))
                .or_else(|| n.get("additionalProperties").filter(|a| a.is_object()))?,
            Seg::Index(i) => match n.get("items")? {
                Value::Array(positions) => positions.get(*i)?,
                items => items,
            },
        };
        schema_at(root, next, rest)
    })
}

/// Every string value and every map key in `value`; `maps` collects the paths of maps
/// (objects whose keys are data, not field names).
fn fields(
    root: &Value,
    value: &Value,
    path: &mut Vec<Seg>,
    maps: &mut Vec<Vec<Seg>>,
    out: &mut Vec<Field>,
) {
    match value {
        Value::String(_) => out.push(Field {
            path: path.clone(),
            is_key: false,
        }),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                fields(root, item, path, maps, out);
                path.pop();
            }
        }
        Value::Object(members) => {
            let schema = schema_at(root, &root["properties"]["settings"], path)
                .unwrap_or_else(|| panic!("no schema for {path:?}"));
            let is_map = schema.get("properties").is_none()
                && schema
                    .get("additionalProperties")
                    .is_some_and(Value::is_object);
            if is_map {
                maps.push(path.clone());
            }
            for (k, v) in members {
                path.push(Seg::Key(k.clone()));
                if is_map {
                    out.push(Field {
                        path: path.clone(),
                        is_key: true,
                    });
                }
                fields(root, v, path, maps, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Every string setting the schema has, as patterns (see [`Field::pattern`]).
fn schema_strings(root: &Value, node: &Value, prefix: &str, out: &mut Vec<String>) {
    let node = resolve(root, node);
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_owned()
        } else {
            format!("{p}.{s}")
        }
    };
    let types: Vec<&str> = match node.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.contains(&"string") || node.get("enum").is_some() {
        out.push(prefix.to_owned());
    }
    for combinator in ["anyOf", "allOf"] {
        if let Some(list) = node.get(combinator).and_then(Value::as_array) {
            for alternative in list {
                schema_strings(root, alternative, prefix, out);
            }
        }
    }
    match node.get("items") {
        // A tuple (`network.hosts` entries): each position has its own schema.
        Some(Value::Array(positions)) => {
            for position in positions {
                schema_strings(root, position, &format!("{prefix}[]"), out);
            }
        }
        Some(items) => schema_strings(root, items, &format!("{prefix}[]"), out),
        None => {}
    }
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in properties {
            schema_strings(root, v, &join(prefix, k), out);
        }
    } else if let Some(values) = node.get("additionalProperties").filter(|a| a.is_object()) {
        out.push(format!("{} (key)", join(prefix, "*")));
        schema_strings(root, values, &join(prefix, "*"), out);
    }
}

/// What a rendered file says, as sorted `(where, what)` pairs read with a parser for
/// its format. Panics when the file is not in its format.
fn parsed(name: &str, text: &str) -> Vec<(String, String)> {
    fn walk_toml(v: &toml::Value, path: String, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk_toml(v, format!("{path}\0{k}"), out);
                }
            }
            toml::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk_toml(v, format!("{path}\0[{i}]"), out);
                }
            }
            toml::Value::String(s) => out.push((path, format!("s:{s}"))),
            other => out.push((path, format!("v:{other}"))),
        }
    }
    fn walk_yaml(v: &serde_norway::Value, path: String, out: &mut Vec<(String, String)>) {
        use serde_norway::Value as Y;
        match v {
            Y::Mapping(m) => {
                for (k, v) in m {
                    let k = match k {
                        Y::String(s) => s.clone(),
                        other => panic!("a YAML key that is not a string: {other:?}"),
                    };
                    walk_yaml(v, format!("{path}\0{k}"), out);
                }
            }
            Y::Sequence(s) => {
                for (i, v) in s.iter().enumerate() {
                    walk_yaml(v, format!("{path}\0[{i}]"), out);
                }
            }
            Y::String(s) => out.push((path, format!("s:{s}"))),
            Y::Tagged(t) => panic!("a YAML tag: {t:?}"),
            other => out.push((path, format!("v:{other:?}"))),
        }
    }
    fn walk_json(v: &Value, path: String, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    walk_json(v, format!("{path}\0{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk_json(v, format!("{path}\0[{i}]"), out);
                }
            }
            Value::String(s) => out.push((path, format!("s:{s}"))),
            other => out.push((path, format!("v:{other}"))),
        }
    }
    /// A value of a `KEY=value` line as systemd's EnvironmentFile= reads it.
    fn env_value(raw: &str) -> String {
        keel_agent::apply::filters::environment_file_value(raw)
    }
    let mut out = Vec::new();
    match name {
        "registries" | "containerd-config" | "containerd-hosts" => {
            walk_toml(&toml::Value::Table(toml_doc(text)), String::new(), &mut out);
        }
        "kubelet-config" | "kubeconfig" | "credential-provider-config" | "static-pod" => {
            walk_yaml(&yaml(text), String::new(), &mut out);
        }
        "kubelet-env" | "proxy-env" => {
            for line in lines(text) {
                let (key, raw) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{name}: {line:?} is not KEY=value"));
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{name}: {line:?}"
                );
                // Lists are comma-separated: compare their items, in any order.
                let value = env_value(raw);
                if ["NODE_LABELS", "NODE_TAINTS", "NO_PROXY", "no_proxy"].contains(&key) {
                    for item in value.split(',') {
                        out.push((key.to_owned(), item.to_owned()));
                    }
                } else {
                    out.push((key.to_owned(), value));
                }
            }
        }
        "hosts" | "resolv-conf" | "modprobe-conf" | "modules-load-conf" => {
            for line in lines(text) {
                let mut words = line.split_whitespace();
                let directive = words.next().unwrap_or_default().to_owned();
                out.push((directive, words.collect::<Vec<_>>().join("\0")));
            }
        }
        "chrony-conf" => {
            // chrony splits a line into words at spaces: a value's own spaces (an option
            // such as "minpoll 4") separate words, as they do in the settings.
            for line in lines(text) {
                let mut words = line.split_whitespace();
                let directive = words.next().unwrap_or_default().to_owned();
                out.push((directive, words.collect::<Vec<_>>().join(" ")));
            }
        }
        "containerd-cri-base" => {
            let doc: Value = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}):\n{text}"));
            walk_json(&doc, String::new(), &mut out);
        }
        "sysctl-conf" => {
            // systemd-sysctl: `key = value`, both trimmed; `#` and `;` start comments.
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with(['#', ';']) {
                    continue;
                }
                let (key, value) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{name}: {line:?} is not key = value"));
                out.push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
        "boot-kernel-parameters" | "boot-init-parameters" => {
            // The kernel splits its command line at spaces (its ctype's, which include
            // 0xA0) and takes `"` as quoting, which the values never hold.
            assert!(text.lines().count() <= 1, "{name}: {text:?}");
            assert!(!text.contains('"'), "{name}: {text:?}");
            for word in text.split(|c: char| c.is_ascii_whitespace() || c == '\u{a0}') {
                if word.is_empty() {
                    continue;
                }
                let (key, value) = word.split_once('=').unwrap_or((word, ""));
                out.push((key.to_owned(), value.to_owned()));
            }
        }
        "ca-bundle" | "ca-distrust" | "kubernetes-ca" | "kubelet-server-crt"
        | "kubelet-server-key" | "motd" | "hostname" => {
            out.push((String::new(), text.to_owned()));
        }
        other => panic!("no parser for template {other}: add one"),
    }
    out.sort();
    out
}

/// Every file rendered from `settings`, by file (for-each files once per item, named
/// `template[item]`), with its template name and text.
fn render_every_file(
    t: &Templates,
    meta: &ServicesMeta,
    settings: &Value,
) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for file in meta.configuration_files.values() {
        let name = file.template_path.clone();
        if file.for_each.is_some() {
            for item in file.items(settings).unwrap() {
                let context =
                    Templates::context_with_item(settings, &os(), &item.value, &item.name);
                let text = t
                    .render_in(&name, &context)
                    .unwrap_or_else(|e| panic!("{name}[{}]: {e}", item.name));
                out.insert(format!("{name}[{}]", item.name), (name.clone(), text));
            }
        } else {
            let text = t
                .render(&name, settings, &os())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            out.insert(name.clone(), (name, text));
        }
    }
    out
}

/// Characters no rendered file holds as they are: controls other than newline (tab in
/// the files that write values as given or quoted, return in PEM bundles) and
/// noncharacters.
fn assert_no_raw_controls(file: &str, template: &str, text: &str) {
    let allowed: &[char] = match template {
        // A tab is a value's own: systemd and sh keep it (quoted in the env files).
        "motd" | "sysctl-conf" | "kubelet-env" | "proxy-env" => &['\n', '\t'],
        // A manifest is the user's YAML as given.
        "static-pod" => &['\n', '\r', '\t'],
        "ca-bundle" | "ca-distrust" | "kubernetes-ca" | "kubelet-server-crt"
        | "kubelet-server-key" => &['\n', '\r', '\t'],
        _ => &['\n'],
    };
    if let Some(c) = text
        .chars()
        .find(|c| settings_model::types::is_forbidden_char(*c) && !allowed.contains(c))
    {
        panic!("{file} holds U+{:04X} as it is:\n{text:?}", u32::from(c));
    }
}

/// The decoded text of a base64 PEM value, trimmed as the templates write it.
fn decoded(value: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    Some(String::from_utf8(bytes).ok()?.trim().to_owned())
}

#[test]
fn every_hostile_value_in_every_field_is_refused_or_stays_a_value() {
    let schema = settings_model::schema::json_schema();
    let t = templates();
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    // The base settings, and the same with the one-address form of cluster-dns-ip.
    let mut one_dns = every_field_settings();
    one_dns["kubernetes"]["cluster-dns-ip"] = json!("10.96.0.12");
    let bases = [every_field_settings(), one_dns];

    // Every string setting a template can read is in the base settings.
    let mut covered = Vec::new();
    for base in &bases {
        let (mut all, mut maps) = (Vec::new(), Vec::new());
        fields(&schema, base, &mut Vec::new(), &mut maps, &mut all);
        covered.extend(all.iter().map(|f| f.pattern(&maps)));
    }
    let mut in_schema = Vec::new();
    schema_strings(
        &schema,
        &schema["properties"]["settings"],
        "",
        &mut in_schema,
    );
    for pattern in &in_schema {
        let skipped = NOT_RENDERED.iter().any(|p| pattern.starts_with(p));
        assert!(
            skipped || covered.contains(pattern),
            "{pattern} is not in every_field_settings() (nor in NOT_RENDERED)"
        );
    }

    let (mut refused, mut accepted, mut count) = (0, 0, 0);
    for base in &bases {
        let base = settings_model::validate(base).unwrap();
        let (mut all, mut maps) = (Vec::new(), Vec::new());
        fields(&schema, &base, &mut Vec::new(), &mut maps, &mut all);
        count += all.len();
        let (r, a) = hostile_values_in_fields(&t, &meta, &base, &all);
        refused += r;
        accepted += a;
    }
    println!("{count} fields: {refused} values refused, {accepted} rendered as values");
    assert!(accepted > 0 && refused > 0);
}

/// Puts every hostile value into each of `all` in turn: alone, after the base value,
/// and, in a PEM bundle, inside and after the PEM text. A refusal must name the field's
/// key; an accepted value must render into files that parse to the baseline's content
/// with only that value changed. Returns how many values were refused and accepted.
fn hostile_values_in_fields(
    t: &Templates,
    meta: &ServicesMeta,
    base: &Value,
    all: &[Field],
) -> (usize, usize) {
    let baseline = render_every_file(t, meta, base);
    let parsed_baseline: BTreeMap<&String, Vec<(String, String)>> = baseline
        .iter()
        .map(|(file, (template, text))| {
            assert_no_raw_controls(file, template, text);
            (file, parsed(template, text))
        })
        .collect();

    let (mut refused, mut accepted) = (0, 0);
    for field in all {
        let old = match (field.is_key, field.path.last()) {
            (true, Some(Seg::Key(k))) => k.clone(),
            _ => at(base, &field.path).as_str().unwrap().to_owned(),
        };
        let pem = decoded(&old).filter(|d| d.starts_with("-----BEGIN"));
        for hostile in HOSTILE {
            let mut candidates = vec![hostile.to_string(), format!("{old}{hostile}")];
            if let Some(text) = &pem {
                candidates.push(b64(&format!("{text}\n{hostile}\n")));
                candidates.push(b64(&text.replacen('\n', &format!("{hostile}\n"), 1)));
            }
            for new in candidates {
                let mut settings = base.clone();
                match (field.is_key, field.path.split_last()) {
                    (true, Some((Seg::Key(k), parent))) => {
                        let map = at_mut(&mut settings, parent).as_object_mut().unwrap();
                        let v = map.remove(k).unwrap();
                        map.insert(new.clone(), v);
                    }
                    _ => *at_mut(&mut settings, &field.path) = Value::String(new.clone()),
                }
                let settings = match settings_model::validate(&settings) {
                    Err(err) => {
                        let expected = field.key(field.is_key.then_some(new.as_str()));
                        assert_eq!(
                            err.key(),
                            Some(expected.as_str()),
                            "{new:?} in {}: the refusal names another key: {err}",
                            field.key(None)
                        );
                        refused += 1;
                        continue;
                    }
                    Ok(settings) => settings,
                };
                accepted += 1;
                let mut swaps = vec![(old.clone(), new.clone())];
                if let (Some(from), Some(to)) = (&pem, decoded(&new)) {
                    swaps.push((from.clone(), to));
                }
                let swap = |s: &str| {
                    swaps
                        .iter()
                        .fold(s.to_owned(), |s, (from, to)| s.replace(from.as_str(), to))
                };
                let rendered = render_every_file(t, meta, &settings);
                // A file per item is named by the item (a mirror's registry): follow it.
                let by_name: BTreeMap<String, &String> =
                    baseline.keys().map(|file| (swap(file), file)).collect();
                if by_name.len() < baseline.len() {
                    // Two items now have one name (a second "*" mirror): the first wins,
                    // by design; nothing to compare file by file.
                    assert!(rendered.len() < baseline.len(), "{new:?}: {rendered:?}");
                    continue;
                }
                assert_eq!(
                    rendered.keys().collect::<Vec<_>>(),
                    by_name.keys().collect::<Vec<_>>(),
                    "{new:?} in {}: other files",
                    field.key(None)
                );
                for (file, (template, text)) in &rendered {
                    assert_no_raw_controls(file, template, text);
                    let mut expected: Vec<(String, String)> = parsed_baseline[by_name[file]]
                        .iter()
                        .map(|(k, v)| (swap(k), swap(v)))
                        // systemd-sysctl trims a value: spaces around it are not its own.
                        .map(|(k, v)| match template.as_str() {
                            "sysctl-conf" => (k, v.trim().to_owned()),
                            _ => (k, v),
                        })
                        .collect();
                    expected.sort();
                    let got = parsed(template, text);
                    assert_eq!(
                        got,
                        expected,
                        "{new:?} in {} changes {file} beyond that value:\n{text}",
                        field.key(None)
                    );
                }
            }
        }
    }
    (refused, accepted)
}

#[test]
fn no_template_builds_a_list_by_concatenation() {
    // `{% set xs = xs + [x] %}` in a loop copies the list once per item: quadratic.
    for entry in std::fs::read_dir(packaging().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let Some(rest) = line.split("{% set ").nth(1) else {
                continue;
            };
            let Some((target, value)) = rest.split_once('=') else {
                continue;
            };
            let target = target.trim();
            let appends = value.trim_start().starts_with(&format!("{target} +"))
                || value.contains(&format!("{target} + ["));
            assert!(
                !appends,
                "{}: {line:?} appends to a list in place",
                path.display()
            );
        }
    }
}
