//! Worst-case render benchmark: every template in `packaging/templates/`, rendered from
//! the largest settings the model accepts (every bounded list and map at its limit,
//! every bounded string at its longest), the way apply renders them (one context, each
//! `for-each` file once per item). Prints the time per template and the total.
//!
//! `cargo bench -p keel-e2e --bench render_max`. The goal is a total under 50 ms.
//! `KEEL_BENCH_RUNS` sets the number of timed runs (default 20).
//!
//! Strings without a length limit of their own (secrets, quantities) are given 4 KiB.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_agent::apply::render::Templates;
use keel_agent::apply::ServicesMeta;
use keel_e2e::repo_root;
use serde_json::{json, Map, Value};
use settings_model::model::{
    BootParameterValues, BootParameters, CredentialProviders, ImagePatterns, KeyTaints,
    MirrorEndpoints, NameServers, NoProxyList, NodeLabels, NodeTaints, PkiBundles,
    ProviderEnvironment, RegistryCredentials, RegistryMirrors, ReservedMemoryByNode, SearchList,
    Sysctls, TimeServers, UnsafeSysctls,
};
use settings_model::types::{
    IpOrIps, BOOT_PARAM_KEY_MAX, BOOT_PARAM_VALUE_MAX, ENV_NAME_MAX, MOTD_MAX, NO_PROXY_ENTRY_MAX,
    PEM_BUNDLE_MAX, SINGLE_LINE_MAX, TIME_SERVER_MAX, URL_MAX,
};

/// Length given to strings the model does not bound itself.
const UNBOUNDED: usize = 4096;

/// `prefix` and `i`, padded with `fill` to exactly `len` bytes.
fn padded(prefix: &str, i: usize, fill: char, len: usize) -> String {
    let mut s = format!("{prefix}{i}x");
    while s.len() < len {
        s.push(fill);
    }
    s.truncate(len);
    s
}

/// A host name of exactly `len` bytes (labels of 63), unique by `i`.
fn host(i: usize, len: usize) -> String {
    let mut s = format!("h{i}");
    while s.len() < len {
        let label_left = 63 - (s.len() - s.rfind('.').map_or(0, |d| d + 1));
        if label_left == 0 || (s.len() + 1 == len) {
            s.push(if s.len() + 1 == len { 'z' } else { '.' });
            continue;
        }
        s.push('a');
    }
    // Neither end nor a label may end in '.'.
    while s.ends_with('.') {
        s.pop();
    }
    s
}

/// The longest label key: a 253-byte DNS prefix, `/`, a 63-byte name.
fn label_key(i: usize) -> String {
    format!("{}/{}", host(i, 253), padded("n", i, 'k', 63))
}

/// A text line of `len` bytes with characters each format quotes.
fn line(i: usize, len: usize) -> String {
    padded(
        &format!("v{i} \"q\" \\ 'x' : # & * ! [ ] {{ }} "),
        i,
        'w',
        len,
    )
}

/// A PEM bundle whose base64 is at most `max` bytes: one real certificate, repeated
/// (settings-model parses every CERTIFICATE block as X.509).
fn pem_bundle(max: usize) -> String {
    let text_max = max / 4 * 3;
    let block = include_str!("../../settings-model/tests/fixtures/certs/a.pem");
    let text = block.repeat(text_max / block.len());
    base64(text.as_bytes())
}

/// Standard base64 with padding (the e2e crate has no base64 dependency of its own).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let word = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                out.push(char::from(ALPHABET[(word >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn object(pairs: impl IntoIterator<Item = (String, Value)>) -> Value {
    Value::Object(pairs.into_iter().collect::<Map<_, _>>())
}

/// The largest settings the model accepts.
fn largest() -> Value {
    let url = |i: usize| padded(&format!("https://{}/", host(i, 253)), i, 'p', URL_MAX);
    let labels =
        object((0..NodeLabels::MAX).map(|i| (label_key(i), json!(padded("v", i, 'l', 63)))));
    let taints = object((0..NodeTaints::MAX).map(|i| {
        let value = padded("t", i, 'v', 63);
        let effects = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
        (
            label_key(i),
            json!(effects[..KeyTaints::MAX]
                .iter()
                .map(|e| format!("{value}:{e}"))
                .collect::<Vec<_>>()),
        )
    }));
    // Every resource the kubelet reserves (the model refuses any other name).
    let reserved = object(
        ["cpu", "memory", "ephemeral-storage", "pid"]
            .into_iter()
            .map(|name| (name.to_owned(), json!("1024Mi"))),
    );
    let numa = object((0..ReservedMemoryByNode::MAX).map(|i| {
        (
            i.to_string(),
            json!({"enabled": true, "memory": "1Gi", "hugepages-1Gi": "2Gi", "hugepages-2Mi": "64Mi"}),
        )
    }));
    let providers = object((0..CredentialProviders::MAX).map(|i| {
        (
            padded("p", i, 'c', 76),
            json!({
                "enabled": true,
                "cache-duration": "12h30m",
                "image-patterns": (0..ImagePatterns::MAX).map(|j| line(j, SINGLE_LINE_MAX)).collect::<Vec<_>>(),
                "environment": object((0..ProviderEnvironment::MAX)
                    .map(|j| (padded("E", j, 'N', ENV_NAME_MAX), json!(line(j, SINGLE_LINE_MAX))))),
            }),
        )
    }));
    let boot_params = || {
        object((0..BootParameters::MAX).map(|i| {
            (
                padded("k", i, 'p', BOOT_PARAM_KEY_MAX),
                json!((0..BootParameterValues::MAX)
                    .map(|j| padded("v", j, 'b', BOOT_PARAM_VALUE_MAX))
                    .collect::<Vec<_>>()),
            )
        }))
    };
    let sysctl = object((0..Sysctls::MAX).map(|i| {
        let key = padded("net.k", i, 'y', 256);
        (key, json!(line(i, SINGLE_LINE_MAX)))
    }));
    let pem = pem_bundle(PEM_BUNDLE_MAX);
    let pki = object((0..PkiBundles::MAX).map(|i| {
        (
            padded("ca", i, 'a', 76),
            json!({"data": pem, "trusted": i % 2 == 0}),
        )
    }));
    let mirrors: Vec<Value> = (0..RegistryMirrors::MAX)
        .map(|i| {
            json!({
                "registry": format!("{}:5000", host(i, 253)),
                "endpoint": (0..MirrorEndpoints::MAX).map(|j| url(i * 100 + j)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let auth = base64(format!("user:{}", "p".repeat(UNBOUNDED)).as_bytes());
    let credentials: Vec<Value> = (0..RegistryCredentials::MAX)
        .map(|i| {
            json!({
                "registry": host(i, 253),
                "username": line(i, SINGLE_LINE_MAX),
                "password": line(i, UNBOUNDED),
                "auth": auth,
                "identitytoken": line(i, UNBOUNDED),
            })
        })
        .collect();
    let settings = json!({
        "motd": padded("Welcome\n\t", 0, 'm', MOTD_MAX),
        "ntp": {"time-servers": (0..TimeServers::MAX)
            .map(|i| padded(&format!("ntp://{}:123/", host(i, 253)), i, 't', TIME_SERVER_MAX))
            .collect::<Vec<_>>()},
        "network": {
            "hostname": host(0, 253),
            "https-proxy": format!("http://{}:3128", host(0, 200)),
            "no-proxy": (0..NoProxyList::MAX).map(|i| host(i, NO_PROXY_ENTRY_MAX)).collect::<Vec<_>>(),
        },
        "dns": {
            "name-servers": (0..NameServers::MAX).map(|i| format!("fd00:1111:2222:3333:4444:5555:6666:{i:04x}")).collect::<Vec<_>>(),
            "search-list": (0..SearchList::MAX).map(|i| host(i, 253)).collect::<Vec<_>>(),
        },
        "container-registry": {"mirrors": mirrors, "credentials": credentials},
        "container-runtime": {"max-container-log-line-size": 16384, "max-concurrent-downloads": 8,
                              "enable-unprivileged-icmp": true, "enable-unprivileged-ports": true},
        "kernel": {"sysctl": sysctl, "lockdown": "integrity"},
        "boot": {"reboot-to-reconcile": true, "kernel-parameters": boot_params(), "init-parameters": boot_params()},
        "pki": pki,
        "aws": {"region": "us-west-2", "profile": line(0, SINGLE_LINE_MAX)},
        "kubernetes": {
            "api-server": url(0),
            "cluster-name": line(0, SINGLE_LINE_MAX),
            "cluster-certificate": pem,
            "cluster-dns-ip": (0..IpOrIps::MAX).map(|i| format!("fd00::{i:x}")).collect::<Vec<_>>(),
            "cluster-domain": host(0, 253),
            "node-labels": labels,
            "node-taints": taints,
            "max-pods": 250,
            "eviction-hard": {"memory.available": "15%", "nodefs.available": "10%", "imagefs.available": "15%",
                              "nodefs.inodesFree": "5%", "pid.available": "10%"},
            "eviction-soft": {"memory.available": "20%"},
            "eviction-soft-grace-period": {"memory.available": "1m30s"},
            "eviction-max-pod-grace-period": 60,
            "kube-reserved": reserved,
            "system-reserved": reserved,
            "memory-manager-policy": "Static",
            "memory-manager-reserved-memory": numa,
            "cpu-manager-policy": "static",
            "cpu-manager-reconcile-period": "10s",
            "topology-manager-policy": "single-numa-node",
            "topology-manager-scope": "pod",
            "allowed-unsafe-sysctls": (0..UnsafeSysctls::MAX).map(|i| line(i, SINGLE_LINE_MAX)).collect::<Vec<_>>(),
            "credential-providers": providers,
            "authentication-mode": "aws",
            "pod-infra-container-image": format!("{}/pause:3.9", host(0, 200)),
            "node-ip": "fd00::7",
            "hostname-override": host(1, 253),
            "provider-id": line(1, SINGLE_LINE_MAX),
            "cloud-provider": line(2, SINGLE_LINE_MAX),
            "server-tls-bootstrap": true,
            "kube-api-qps": 50, "kube-api-burst": 100, "registry-qps": 10, "registry-burst": 20,
            "event-qps": 50, "event-burst": 100, "container-log-max-size": "100Mi",
            "container-log-max-files": 10, "image-gc-high-threshold-percent": 85,
            "image-gc-low-threshold-percent": 80, "shutdown-grace-period": "2m",
            "shutdown-grace-period-for-critical-pods": "30s"
        }
    });
    settings_model::validate(&settings)
        .unwrap_or_else(|e| panic!("the largest model must be accepted: {e}"))
}

/// Renders every configuration file once; returns the time and bytes per template.
fn render_all(
    templates: &Templates,
    meta: &ServicesMeta,
    settings: &Value,
    os: &Value,
) -> BTreeMap<String, (Duration, usize)> {
    let context = Templates::context(settings, os);
    let mut out = BTreeMap::new();
    for file in meta.configuration_files.values() {
        let started = Instant::now();
        let mut bytes = 0;
        if file.for_each.is_some() {
            for item in file.items(settings).unwrap() {
                let context = Templates::item_context(&context, &item.value, &item.name);
                bytes += templates
                    .render_in(&file.template_path, &context)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.template_path))
                    .len();
            }
        } else {
            bytes += templates
                .render_in(&file.template_path, &context)
                .unwrap_or_else(|e| panic!("{}: {e}", file.template_path))
                .len();
        }
        let entry = out
            .entry(file.template_path.clone())
            .or_insert((Duration::ZERO, 0));
        entry.0 += started.elapsed();
        entry.1 += bytes;
    }
    out
}

fn main() {
    let runs: usize = std::env::var("KEEL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let templates = Templates::load(&repo_root().join("packaging/templates")).unwrap();
    let meta = ServicesMeta::load(&repo_root().join("packaging/services.toml")).unwrap();
    let os = json!({"arch": "x86_64", "build_id": "bench", "pretty_name": "Keel", "variant_id": "bench", "version_id": "0"});

    let started = Instant::now();
    let settings = largest();
    let validate = started.elapsed();
    let input = settings.to_string().len();
    let rendered: Vec<String> = meta
        .configuration_files
        .values()
        .map(|f| f.template_path.clone())
        .collect();
    for name in templates.names() {
        assert!(rendered.contains(&name), "template {name} is not rendered");
    }

    let mut totals = Vec::new();
    let mut per_template: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    render_all(&templates, &meta, &settings, &os); // warm-up
    for _ in 0..runs {
        let started = Instant::now();
        let one = render_all(&templates, &meta, &settings, &os);
        totals.push(started.elapsed());
        for (name, (time, size)) in one {
            per_template.entry(name.clone()).or_default().push(time);
            bytes.insert(name, size);
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default().as_secs_f64() * 1000.0;

    println!();
    println!(
        "render every template from the largest accepted model ({} B of settings JSON, validated in {:.1} ms), {runs} runs",
        input,
        validate.as_secs_f64() * 1000.0
    );
    println!();
    println!("{:<30} {:>12} {:>10}", "template", "bytes", "p50 ms");
    println!("{}", "-".repeat(54));
    for (name, times) in per_template {
        println!("{:<30} {:>12} {:>10.3}", name, bytes[&name], median(times));
    }
    println!("{}", "-".repeat(54));
    let total_bytes: usize = bytes.values().sum();
    let worst = max(&totals);
    println!(
        "{:<30} {:>12} {:>10.3}   (max {:.3} ms; goal < 50 ms)",
        "all files",
        total_bytes,
        median(totals),
        worst
    );
    println!(
        "BENCH_JSON {}",
        json!({"render_max_ms": {"max": worst, "runs": runs, "bytes": total_bytes, "input_bytes": input}})
    );
}
