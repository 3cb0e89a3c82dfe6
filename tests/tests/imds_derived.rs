//! Settings derived from the instance metadata at first boot, end to end: the real
//! keeld with the `imds` provider against a loopback IMDSv2 server that behaves as
//! EC2's does (a token first; every read refused without it; text bodies; 404 for
//! anything it does not have). Needs no containerd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_e2e::{Keeld, KeeldOptions};
use serde_json::{json, Value};

const IDENTITY: &str = "/latest/dynamic/instance-identity/document";
const MAC: &str = "0e:49:61:0f:c3:11";

/// The four lines of an EKS node's user-data: the cluster, nothing else.
const KUBERNETES_USER_DATA: &str = r#"[settings.kubernetes]
cluster-name = "keel-e2e"
api-server = "https://0123456789ABCDEF0123456789ABCDEF.gr7.us-west-2.eks.amazonaws.com"
cluster-certificate = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJnakNDQVNtZ0F3SUJBZ0lVS0NuUFdjQ0sxR3ZGYm0wcmVIZmZtbEJ2c2N3d0NnWUlLb1pJemowRUF3SXcKRmpFVU1CSUdBMVVFQXd3TGEyVmxiQ0IwWlhOMElHRXdJQmNOTWpZeE1qQTFNVEl3TWpRMldoZ1BNakV5TmpFeApNVEV4TWpBeU5EWmFNQll4RkRBU0JnTlZCQU1NQzJ0bFpXd2dkR1Z6ZENCaE1Ga3dFd1lIS29aSXpqMENBUVlJCktvWkl6ajBEQVFjRFFnQUVtZEZvRGE4NHVkKzF5MzRlbFpSL0UyWlpkcFVsOWdZcDhLNFUvRjBVNE94MEU1UjUKSGY5eGJacXN2NWt2czZNWWt5V1V2anJxb2MvcGR6d3FHeFhNZ0tOVE1GRXdIUVlEVlIwT0JCWUVGT0xocFpCRAo0aFBVOW9VWGtEU0lKaEhhNVBCWk1COEdBMVVkSXdRWU1CYUFGT0xocFpCRDRoUFU5b1VYa0RTSUpoSGE1UEJaCk1BOEdBMVVkRXdFQi93UUZNQU1CQWY4d0NnWUlLb1pJemowRUF3SURSd0F3UkFJZ0N4ZGp2K0FrY2U4Q1FYai8KYXhuTkFHQ0l6bDE3TVNRQmZCU2Z4dHJzMVNVQ0lIcC8yZjNxajlITFB4aXAxZnF6bThRUjZTQ2RjcHhxL3hiYQpTMHJ5blhkMgotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg=="
"#;

/// What one request was, and whether it carried a token the server issued.
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    authorized: bool,
}

/// A loopback IMDSv2 server. Each connection is served on its own thread, so a slow
/// path does not hold the others.
struct Imds {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone, Default)]
struct Served {
    /// Path → body (200, text/plain); any other path answers 404.
    paths: HashMap<String, String>,
    /// Paths that answer only after this long.
    slow: Vec<(String, Duration)>,
}

impl Served {
    /// An m5.large in us-west-2b whose VPC is 10.0.0.0/16, with `user_data`.
    fn ec2(user_data: &str) -> Served {
        let identity = json!({
            "accountId": "123456789012",
            "architecture": "x86_64",
            "availabilityZone": "us-west-2b",
            "imageId": "ami-0abcdef1234567890",
            "instanceId": "i-0a1b2c3d4e5f60718",
            "instanceType": "m5.large",
            "pendingTime": "2024-05-01T12:00:00Z",
            "privateIp": "10.0.1.23",
            "region": "us-west-2",
            "version": "2017-09-30"
        });
        let mut paths = HashMap::new();
        for (path, body) in [
            ("/latest/user-data", user_data.to_owned()),
            (IDENTITY, serde_json::to_string_pretty(&identity).unwrap()),
            ("/latest/meta-data/local-ipv4", "10.0.1.23".to_owned()),
            (
                "/latest/meta-data/local-hostname",
                "ip-10-0-1-23.us-west-2.compute.internal".to_owned(),
            ),
            ("/latest/meta-data/mac", MAC.to_owned()),
            ("/latest/meta-data/instance-type", "m5.large".to_owned()),
            (
                &format!("/latest/meta-data/network/interfaces/macs/{MAC}/vpc-ipv4-cidr-blocks"),
                "10.0.0.0/16".to_owned(),
            ),
        ] {
            paths.insert(path.to_owned(), body);
        }
        Served {
            paths,
            slow: Vec::new(),
        }
    }

    fn with(mut self, path: &str, body: &str) -> Served {
        self.paths.insert(path.to_owned(), body.to_owned());
        self
    }

    fn without(mut self, path: &str) -> Served {
        self.paths.remove(path);
        self
    }
}

impl Imds {
    fn start(served: Served) -> Imds {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tokens = Arc::new(Mutex::new(Vec::<String>::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (served, tokens, record) = (served.clone(), tokens.clone(), record.clone());
                std::thread::spawn(move || answer(stream, &served, &tokens, &record));
            }
        });
        Imds { endpoint, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(
    mut stream: TcpStream,
    served: &Served,
    tokens: &Mutex<Vec<String>>,
    record: &Mutex<Vec<Seen>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method == "PUT" && path == "/latest/api/token" {
        match headers.get("x-aws-ec2-metadata-token-ttl-seconds") {
            Some(ttl) if ttl.parse::<u32>().is_ok_and(|t| (1..=21600).contains(&t)) => {
                let mut issued = tokens.lock().unwrap();
                let token = format!("AQAEAkeel-e2e-{}==", issued.len() + 1);
                issued.push(token.clone());
                ("200 OK", token)
            }
            _ => ("400 Bad Request", String::new()),
        }
    } else if method == "GET" {
        let authorized = headers
            .get("x-aws-ec2-metadata-token")
            .is_some_and(|t| tokens.lock().unwrap().contains(t));
        record.lock().unwrap().push(Seen {
            line: line.clone(),
            authorized,
        });
        if !authorized {
            ("401 Unauthorized", String::new())
        } else {
            if let Some((_, delay)) = served.slow.iter().find(|(p, _)| p == path) {
                std::thread::sleep(*delay);
            }
            match served.paths.get(path) {
                Some(body) => ("200 OK", body.clone()),
                None => ("404 Not Found", String::new()),
            }
        }
    } else {
        ("405 Method Not Allowed", String::new())
    };
    if method == "PUT" {
        record.lock().unwrap().push(Seen {
            line,
            authorized: true,
        });
    }
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// keeld booting from IMDS (`providers`, e.g. `imds` or `imds,file`) at `imds`, with a
/// local user-data file holding `file_user_data`.
fn boot(imds: &Imds, providers: &str, file_user_data: &str, imds_timeout: &str) -> Keeld {
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("user-data.toml");
    std::fs::write(&file, file_user_data).expect("user-data");
    let path = |name: &str| work.path().join(name).display().to_string();
    let keeld = Keeld::start_with(KeeldOptions {
        extra_args: vec![
            "--user-data-providers".into(),
            providers.into(),
            "--imds-endpoint".into(),
            imds.endpoint.clone(),
            "--imds-timeout".into(),
            imds_timeout.into(),
            "--user-data-file".into(),
            file.display().to_string(),
            "--user-data-defaults".into(),
            path("absent-defaults.toml"),
            "--user-data-overrides".into(),
            path("absent-overrides.toml"),
            "--os-defaults".into(),
            path("absent-os-defaults.toml"),
        ],
        wait_for_boot: false,
        ..KeeldOptions::default()
    });
    // The files were read at boot; the directory may go.
    let record = keeld.wait_boot(Duration::from_secs(60));
    assert_eq!(
        record["phase"],
        "configured",
        "{record:#}\nlog:\n{}",
        keeld.log()
    );
    drop(work);
    keeld
}

fn step<'a>(record: &'a Value, name: &str) -> &'a Value {
    record["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {record:#}"))
}

fn derived_steps(record: &Value) -> Vec<String> {
    record["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .filter(|n| n.starts_with("derived:"))
        .map(str::to_owned)
        .collect()
}

fn detail(record: &Value, name: &str) -> String {
    step(record, name)["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// An EKS node with four lines of user-data, plus one setting it chose itself: the rest
/// comes from the metadata, each as its own step naming its source, and the chosen
/// setting stays.
#[test]
fn an_eks_node_gets_its_settings_from_the_metadata() {
    let user_data = format!("{KUBERNETES_USER_DATA}max-pods = 58\n");
    let imds = Imds::start(Served::ec2(&user_data));
    let keeld = boot(&imds, "imds", "", "30s");
    let settings = keeld.raw("GET", "/settings", None).json();
    assert_eq!(settings["aws"]["region"], "us-west-2", "{settings:#}");
    let k8s = &settings["kubernetes"];
    assert_eq!(k8s["node-ip"], "10.0.1.23", "{k8s:#}");
    assert_eq!(k8s["provider-id"], "aws:///us-west-2b/i-0a1b2c3d4e5f60718");
    assert_eq!(
        k8s["hostname-override"],
        "ip-10-0-1-23.us-west-2.compute.internal"
    );
    // The VPC is in 10.0.0.0/8: EKS's service range is then 172.20.0.0/16.
    assert_eq!(k8s["cluster-dns-ip"], "172.20.0.10");
    // The user-data said 58; the m5.large's 29 does not override it.
    assert_eq!(k8s["max-pods"], 58);
    assert_eq!(k8s["cluster-name"], "keel-e2e");

    let record = keeld.raw("GET", "/boot", None).json();
    assert_eq!(
        derived_steps(&record),
        [
            "derived:aws.region",
            "derived:kubernetes.cluster-dns-ip",
            "derived:kubernetes.node-ip",
            "derived:kubernetes.max-pods",
            "derived:kubernetes.provider-id",
            "derived:kubernetes.hostname-override",
        ]
    );
    for (name, source) in [
        ("derived:aws.region", IDENTITY),
        ("derived:kubernetes.node-ip", "/latest/meta-data/local-ipv4"),
        ("derived:kubernetes.provider-id", IDENTITY),
        (
            "derived:kubernetes.hostname-override",
            "/latest/meta-data/local-hostname",
        ),
        (
            "derived:kubernetes.cluster-dns-ip",
            "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/vpc-ipv4-cidr-blocks",
        ),
    ] {
        assert_eq!(step(&record, name)["outcome"], "succeeded", "{record:#}");
        assert!(detail(&record, name).contains(source), "{name}: {record:#}");
    }
    let max_pods = step(&record, "derived:kubernetes.max-pods");
    assert_eq!(max_pods["outcome"], "skipped", "{record:#}");
    assert!(
        detail(&record, "derived:kubernetes.max-pods").contains("already set by user-data"),
        "{record:#}"
    );
    // Derived before the commit: one generation holds user-data and derived values.
    let history = keeld.raw("GET", "/history?limit=5", None).json();
    let launch: Vec<&Value> = history
        .as_array()
        .expect("history")
        .iter()
        .filter(|g| g["tx"] == "launch")
        .collect();
    assert_eq!(launch.len(), 1, "{history:#}");
    let changed = launch[0]["changed-keys"].to_string();
    for key in [
        "settings.aws.region",
        "settings.kubernetes.node-ip",
        "settings.kubernetes.cluster-name",
    ] {
        assert!(changed.contains(key), "{key} not in {changed}");
    }

    // As on EC2: a token first, and every read carried it.
    let seen = imds.seen();
    assert!(
        seen[0].line.starts_with("PUT /latest/api/token"),
        "{seen:?}"
    );
    assert!(seen.iter().all(|s| s.authorized), "{seen:?}");
    let identity_reads = seen
        .iter()
        .filter(|s| s.line.starts_with(&format!("GET {IDENTITY} ")))
        .count();
    assert_eq!(identity_reads, 1, "{seen:?}");
}

/// Metadata that is missing, malformed or too slow: each affected setting is skipped
/// with why, nothing is made up, and the boot is configured.
#[test]
fn bad_metadata_skips_settings_and_the_boot_goes_on() {
    let mut served = Served::ec2(KUBERNETES_USER_DATA)
        .with(IDENTITY, "{\"region\": \"us-west-2\", \"instanceType\": ")
        .with("/latest/meta-data/local-ipv4", "not-an-ip")
        .without("/latest/meta-data/mac");
    // Slower than the whole --imds-timeout budget.
    served.slow.push((
        "/latest/meta-data/local-hostname".to_owned(),
        Duration::from_secs(30),
    ));
    let imds = Imds::start(served);
    let started = Instant::now();
    let keeld = boot(&imds, "imds", "", "3s");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let record = keeld.raw("GET", "/boot", None).json();
    assert_eq!(derived_steps(&record).len(), 6, "{record:#}");
    for (name, why) in [
        (
            "derived:aws.region",
            "identity document is malformed: not JSON",
        ),
        (
            "derived:kubernetes.max-pods",
            "identity document is malformed",
        ),
        (
            "derived:kubernetes.provider-id",
            "identity document is malformed",
        ),
        ("derived:kubernetes.node-ip", "local-ipv4 is malformed"),
        (
            "derived:kubernetes.cluster-dns-ip",
            "mac is not in the instance metadata (404)",
        ),
        (
            "derived:kubernetes.hostname-override",
            "local-hostname could not be read",
        ),
    ] {
        assert_eq!(step(&record, name)["outcome"], "skipped", "{record:#}");
        let detail = detail(&record, name);
        assert!(detail.contains(why), "{name}: {detail}");
        assert!(
            detail.contains("/latest/"),
            "{name} names no source: {detail}"
        );
    }
    assert!(
        detail(&record, "derived:kubernetes.node-ip").contains("not-an-ip"),
        "{record:#}"
    );
    let settings = keeld.raw("GET", "/settings", None).json();
    assert_eq!(settings.get("aws"), None, "{settings:#}");
    let k8s = settings["kubernetes"].as_object().expect("kubernetes");
    for key in [
        "node-ip",
        "provider-id",
        "hostname-override",
        "cluster-dns-ip",
        "max-pods",
    ] {
        assert!(!k8s.contains_key(key), "{key} was made up: {settings:#}");
    }
    assert_eq!(k8s["cluster-name"], "keel-e2e");
}

/// Not a Kubernetes node: only `aws.region` is derived. An instance type keeld has no
/// ENI limits for: max-pods is skipped, not guessed. Without the `imds` provider
/// nothing is derived at all.
#[test]
fn what_is_derived_depends_on_the_node() {
    let imds = Imds::start(Served::ec2("[settings]\nmotd = \"plain host\"\n"));
    let keeld = boot(&imds, "imds", "", "30s");
    let settings = keeld.raw("GET", "/settings", None).json();
    assert_eq!(settings["aws"]["region"], "us-west-2", "{settings:#}");
    assert_eq!(settings.get("kubernetes"), None, "{settings:#}");
    let record = keeld.raw("GET", "/boot", None).json();
    assert_eq!(step(&record, "derived:aws.region")["outcome"], "succeeded");
    assert_eq!(
        step(&record, "derived:kubernetes.node-ip")["outcome"],
        "skipped"
    );
    assert!(
        detail(&record, "derived:kubernetes.node-ip").contains("not a Kubernetes node"),
        "{record:#}"
    );
    drop(keeld);

    let identity = json!({
        "availabilityZone": "us-west-2b",
        "instanceId": "i-0a1b2c3d4e5f60718",
        "instanceType": "x9z.8xlarge",
        "region": "us-west-2"
    });
    let imds = Imds::start(Served::ec2(KUBERNETES_USER_DATA).with(IDENTITY, &identity.to_string()));
    let keeld = boot(&imds, "imds", "", "30s");
    let record = keeld.raw("GET", "/boot", None).json();
    let max_pods = detail(&record, "derived:kubernetes.max-pods");
    assert_eq!(
        step(&record, "derived:kubernetes.max-pods")["outcome"],
        "skipped"
    );
    assert!(
        max_pods.contains("\"x9z.8xlarge\" is not in keeld's ENI limits table"),
        "{max_pods}"
    );
    let settings = keeld.raw("GET", "/settings", None).json();
    assert_eq!(settings["kubernetes"].get("max-pods"), None, "{settings:#}");
    assert_eq!(settings["kubernetes"]["node-ip"], "10.0.1.23");
    drop(keeld);

    // The same user-data from a local file, no imds provider: no derived step, and the
    // metadata service is never asked.
    let imds = Imds::start(Served::ec2(""));
    let keeld = boot(&imds, "file", KUBERNETES_USER_DATA, "30s");
    let record = keeld.raw("GET", "/boot", None).json();
    assert!(derived_steps(&record).is_empty(), "{record:#}");
    let settings = keeld.raw("GET", "/settings", None).json();
    assert_eq!(settings["kubernetes"].get("node-ip"), None, "{settings:#}");
    assert!(imds.seen().is_empty());
}
