//! Settings derived from the EC2 instance metadata at first boot, where the user-data
//! leaves them unset: what Bottlerocket's AWS variants fill in for themselves.
//!
//! | setting | from |
//! |---|---|
//! | `aws.region` | the identity document's `region` |
//! | `kubernetes.cluster-dns-ip` | the first IPv4 CIDR block of the VPC of the primary interface (`mac`): `172.20.0.10` if it is in 10.0.0.0/8, else `10.100.0.10` (the EKS default service ranges, chosen not to overlap the VPC) |
//! | `kubernetes.node-ip` | meta-data `local-ipv4` |
//! | `kubernetes.max-pods` | the identity document's `instanceType` in `eni-limits.txt`: ENIs × (IPv4 addresses per ENI − 1) + 2 |
//! | `kubernetes.provider-id` | `aws:///<availabilityZone>/<instanceId>` from the identity document |
//! | `kubernetes.hostname-override` | meta-data `local-hostname` |
//!
//! Which hosts: only those with the `imds` user-data provider (the EC2 set-up); the
//! reads go through the same IMDSv2 client ([`MetadataClient`]: one session token, one
//! deadline of `--imds-timeout` for all of them, counted from the first read).
//! The `kubernetes.*` ones only on a Kubernetes node: one whose settings (committed,
//! plus what the OS defaults and user-data staged) set `kubernetes.api-server` or
//! `kubernetes.cluster-name`.
//!
//! Each is its own boot step, `derived:<key>`, after the user-data providers and before
//! `launch` is committed; the detail names the metadata it was read from. A value is
//! patched into `launch` only where neither the staged user-data (nor the OS defaults)
//! nor the committed settings hold one, so a derivation never overrides them. Anything
//! else skips the step with the reason (metadata missing, malformed, or not answered
//! within the deadline; an instance type not in the table; not a Kubernetes node):
//! nothing is guessed, and the boot goes on.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use serde_json::{json, Value};
use settings_model::types::{AwsRegion, Hostname, SingleLineString};

use super::imds::{ImdsConfig, MetadataClient, MAX_METADATA};
use super::providers::Provider;
use super::status::{BootTracker, StepOutcome};
use super::{Boot, Halt, LAUNCH_TX};

/// The instance identity document (JSON).
pub const IDENTITY_PATH: &str = "/latest/dynamic/instance-identity/document";
/// The primary private IPv4 address (text).
pub const LOCAL_IPV4_PATH: &str = "/latest/meta-data/local-ipv4";
/// The private DNS name (text).
pub const LOCAL_HOSTNAME_PATH: &str = "/latest/meta-data/local-hostname";
/// The primary network interface's MAC address (text).
pub const MAC_PATH: &str = "/latest/meta-data/mac";

/// The VPC's IPv4 CIDR blocks as seen from the interface `mac` (one a line).
pub fn cidr_blocks_path(mac: &str) -> String {
    format!("/latest/meta-data/network/interfaces/macs/{mac}/vpc-ipv4-cidr-blocks")
}

/// `<instance-type> <ENIs> <IPv4 per ENI>` a line; see the file's header.
const ENI_LIMITS: &str = include_str!("eni-limits.txt");

/// The boot steps' name prefix.
pub const STEP_PREFIX: &str = "derived:";

/// One derived setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    AwsRegion,
    ClusterDnsIp,
    NodeIp,
    MaxPods,
    ProviderId,
    HostnameOverride,
}

impl Derived {
    /// In the order they run: `cluster-dns-ip` before `node-ip`, which depends on
    /// whether the cluster is IPv4.
    pub const ALL: [Derived; 6] = [
        Derived::AwsRegion,
        Derived::ClusterDnsIp,
        Derived::NodeIp,
        Derived::MaxPods,
        Derived::ProviderId,
        Derived::HostnameOverride,
    ];

    /// The setting's key, without `settings.`.
    pub fn key(self) -> &'static str {
        match self {
            Derived::AwsRegion => "aws.region",
            Derived::ClusterDnsIp => "kubernetes.cluster-dns-ip",
            Derived::NodeIp => "kubernetes.node-ip",
            Derived::MaxPods => "kubernetes.max-pods",
            Derived::ProviderId => "kubernetes.provider-id",
            Derived::HostnameOverride => "kubernetes.hostname-override",
        }
    }

    /// The boot step's name: `derived:<key>`.
    pub fn step_name(self) -> String {
        format!("{STEP_PREFIX}{}", self.key())
    }

    /// Where the value comes from, as the step's detail names it.
    pub fn source(self) -> &'static str {
        match self {
            Derived::AwsRegion => "/latest/dynamic/instance-identity/document (region)",
            Derived::ClusterDnsIp => {
                "/latest/meta-data/mac, /latest/meta-data/network/interfaces/macs/<mac>/vpc-ipv4-cidr-blocks"
            }
            Derived::NodeIp => LOCAL_IPV4_PATH,
            Derived::MaxPods => "/latest/dynamic/instance-identity/document (instanceType)",
            Derived::ProviderId => {
                "/latest/dynamic/instance-identity/document (availabilityZone, instanceId)"
            }
            Derived::HostnameOverride => LOCAL_HOSTNAME_PATH,
        }
    }

    fn kubernetes_only(self) -> bool {
        !matches!(self, Derived::AwsRegion)
    }

    /// The settings path: group, then key.
    fn path(self) -> (&'static str, &'static str) {
        self.key().split_once('.').unwrap_or((self.key(), ""))
    }

    /// A merge-patch setting this key to `value`.
    pub fn patch(self, value: Value) -> Value {
        let (group, key) = self.path();
        json!({ group: { key: value } })
    }

    fn lookup(self, settings: &Value) -> Option<&Value> {
        let (group, key) = self.path();
        settings.get(group)?.get(key).filter(|v| !v.is_null())
    }
}

/// Why a setting was not derived: the step's detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("already set by user-data (or the OS defaults)")]
    SetByUserData,
    #[error("already set in the committed settings")]
    AlreadyCommitted,
    #[error("not a Kubernetes node (neither settings.kubernetes.api-server nor settings.kubernetes.cluster-name is set)")]
    NotKubernetes,
    #[error("{what} is not in the instance metadata (404)")]
    Missing { what: &'static str },
    #[error("{what} is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} could not be read: {reason}")]
    Unavailable { what: &'static str, reason: String },
    #[error("instance type {0:?} is not in keeld's ENI limits table; max-pods is not guessed")]
    UnknownInstanceType(String),
    #[error("settings.kubernetes.cluster-dns-ip is IPv6; only an IPv4 node-ip is derived")]
    Ipv6Cluster,
    #[error("the derived value was refused: {0}")]
    Refused(String),
}

/// A derived value, and how it was reached (for the step's detail).
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    pub value: Value,
    /// The rule applied, when there is more to it than reading the value.
    pub why: Option<String>,
    /// The paths read, when they are more precise than [`Derived::source`].
    pub source: Option<String>,
}

impl Got {
    fn new(value: Value) -> Got {
        Got {
            value,
            why: None,
            source: None,
        }
    }

    /// The step's detail: `<value> from <source>[; <why>]`.
    pub fn detail(&self, which: Derived) -> String {
        let value = match &self.value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let source = self.source.as_deref().unwrap_or(which.source());
        match &self.why {
            Some(why) => format!("{value} from {source}; {why}"),
            None => format!("{value} from {source}"),
        }
    }
}

/// Whether `which` is to be derived at all, given what the OS defaults and user-data
/// staged in `launch` (`staged`: its patches applied to nothing) and the committed
/// settings (`live`).
pub fn precheck(which: Derived, staged: &Value, live: &Value) -> Result<(), Skip> {
    if which.lookup(staged).is_some() {
        return Err(Skip::SetByUserData);
    }
    if which.lookup(live).is_some() {
        return Err(Skip::AlreadyCommitted);
    }
    if which.kubernetes_only() && !is_kubernetes_node(staged, live) {
        return Err(Skip::NotKubernetes);
    }
    Ok(())
}

/// A Kubernetes node: `kubernetes.api-server` or `kubernetes.cluster-name` is set, in
/// `launch` or committed.
pub fn is_kubernetes_node(staged: &Value, live: &Value) -> bool {
    ["api-server", "cluster-name"].iter().any(|key| {
        [staged, live].iter().any(|s| {
            s.get("kubernetes")
                .and_then(|k| k.get(key))
                .is_some_and(|v| !v.is_null())
        })
    })
}

/// The metadata the derivations read, each item read at most once.
pub struct Metadata {
    client: Result<MetadataClient, Skip>,
    identity: Option<Result<Value, Skip>>,
}

const IDENTITY: &str = "the instance identity document";

impl Metadata {
    /// Reads nothing yet; the deadline starts now.
    pub fn new(config: &ImdsConfig) -> Metadata {
        Metadata {
            client: MetadataClient::new(config).map_err(|e| Skip::Unavailable {
                what: "the instance metadata",
                reason: e.to_string(),
            }),
            identity: None,
        }
    }

    /// A text item, without the whitespace around it.
    async fn text(&mut self, path: &str, what: &'static str) -> Result<String, Skip> {
        let client = self.client.as_mut().map_err(|e| e.clone())?;
        match client.get(path, MAX_METADATA).await {
            Ok(Some(bytes)) => String::from_utf8(bytes)
                .map(|s| s.trim_matches(|c: char| c.is_ascii_whitespace()).to_owned())
                .map_err(|_| Skip::Malformed {
                    what,
                    reason: "not UTF-8 text".to_owned(),
                }),
            Ok(None) => Err(Skip::Missing { what }),
            Err(e) => Err(Skip::Unavailable {
                what,
                reason: e.to_string(),
            }),
        }
    }

    /// The identity document, read once.
    async fn identity(&mut self) -> Result<Value, Skip> {
        if let Some(known) = &self.identity {
            return known.clone();
        }
        let read = match self.text(IDENTITY_PATH, IDENTITY).await {
            Ok(text) => match serde_json::from_str::<Value>(&text) {
                Ok(doc @ Value::Object(_)) => Ok(doc),
                Ok(_) => Err(Skip::Malformed {
                    what: IDENTITY,
                    reason: "not a JSON object".to_owned(),
                }),
                Err(e) => Err(Skip::Malformed {
                    what: IDENTITY,
                    reason: format!("not JSON ({e})"),
                }),
            },
            Err(skip) => Err(skip),
        };
        self.identity = Some(read.clone());
        read
    }

    /// Derives `which` from the metadata; `settings` (committed + staged) tells an
    /// IPv6 cluster, for `node-ip`.
    pub async fn derive(&mut self, which: Derived, settings: &Value) -> Result<Got, Skip> {
        match which {
            Derived::AwsRegion => region(&self.identity().await?),
            Derived::ProviderId => provider_id(&self.identity().await?),
            Derived::MaxPods => max_pods(&self.identity().await?),
            Derived::NodeIp => {
                let dns = Derived::ClusterDnsIp.lookup(settings);
                let first = dns.and_then(|v| v.as_str().or_else(|| v.get(0)?.as_str()));
                if first
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .is_some_and(|ip| ip.is_ipv6())
                {
                    return Err(Skip::Ipv6Cluster);
                }
                node_ip(&self.text(LOCAL_IPV4_PATH, "local-ipv4").await?)
            }
            Derived::HostnameOverride => {
                hostname(&self.text(LOCAL_HOSTNAME_PATH, "local-hostname").await?)
            }
            Derived::ClusterDnsIp => {
                let mac = mac(&self.text(MAC_PATH, "mac").await?)?;
                let path = cidr_blocks_path(&mac);
                let blocks = self.text(&path, "vpc-ipv4-cidr-blocks").await?;
                let mut got = cluster_dns_ip(&blocks)?;
                got.source = Some(format!("{MAC_PATH}, {path}"));
                Ok(got)
            }
        }
    }
}

/// A string field of the identity document.
fn field<'a>(doc: &'a Value, name: &str) -> Result<&'a str, Skip> {
    match doc.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Skip::Malformed {
            what: IDENTITY,
            reason: format!("{name:?} is not a string"),
        }),
        None => Err(Skip::Malformed {
            what: IDENTITY,
            reason: format!("it has no {name:?}"),
        }),
    }
}

/// `aws.region` from the identity document.
pub fn region(doc: &Value) -> Result<Got, Skip> {
    let region = field(doc, "region")?;
    let region = AwsRegion::new(region).map_err(|reason| Skip::Malformed {
        what: IDENTITY,
        reason: format!("region: {reason}"),
    })?;
    Ok(Got::new(Value::String(region.as_str().to_owned())))
}

/// `kubernetes.provider-id`: `aws:///<availabilityZone>/<instanceId>`.
pub fn provider_id(doc: &Value) -> Result<Got, Skip> {
    let zone = field(doc, "availabilityZone")?;
    let id = field(doc, "instanceId")?;
    // Zone names: lowercase letters, digits and dashes (us-west-2a, us-west-2-lax-1a).
    let zone_ok = (1..=64).contains(&zone.len())
        && zone.starts_with(|c: char| c.is_ascii_lowercase())
        && zone
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !zone_ok {
        return Err(Skip::Malformed {
            what: IDENTITY,
            reason: format!("availabilityZone {zone:?} is not a zone name"),
        });
    }
    // Instance ids: `i-` and 8 or 17 lowercase hex digits.
    let id_ok = id.strip_prefix("i-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !id_ok {
        return Err(Skip::Malformed {
            what: IDENTITY,
            reason: format!("instanceId {id:?} is not an instance id"),
        });
    }
    let value =
        SingleLineString::new(format!("aws:///{zone}/{id}")).map_err(|reason| Skip::Malformed {
            what: IDENTITY,
            reason,
        })?;
    Ok(Got::new(Value::String(value.as_str().to_owned())))
}

/// The ENIs and IPv4 addresses per ENI of `instance_type`, from the table.
pub fn eni_limits(instance_type: &str) -> Option<(u32, u32)> {
    ENI_LIMITS
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            if fields.next()? != instance_type {
                return None;
            }
            let enis = fields.next()?.parse().ok()?;
            let ips = fields.next()?.parse().ok()?;
            Some((enis, ips))
        })
}

/// ENIs × (IPv4 addresses per ENI − 1) + 2: one address of each ENI is its own, the
/// rest go to pods, and two host-network pods (kube-proxy, the CNI) need none.
pub fn max_pods_for(enis: u32, ipv4_per_eni: u32) -> Option<u32> {
    enis.checked_mul(ipv4_per_eni.checked_sub(1)?)?
        .checked_add(2)
}

/// `kubernetes.max-pods` from the identity document's instance type.
pub fn max_pods(doc: &Value) -> Result<Got, Skip> {
    let instance_type = field(doc, "instanceType")?;
    let plausible = (1..=64).contains(&instance_type.len())
        && instance_type.contains('.')
        && instance_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !plausible {
        return Err(Skip::Malformed {
            what: IDENTITY,
            reason: format!("instanceType {instance_type:?} is not an instance type"),
        });
    }
    let Some((enis, ips)) = eni_limits(instance_type) else {
        return Err(Skip::UnknownInstanceType(instance_type.to_owned()));
    };
    let Some(pods) = max_pods_for(enis, ips) else {
        return Err(Skip::UnknownInstanceType(instance_type.to_owned()));
    };
    Ok(Got {
        why: Some(format!(
            "{instance_type}: {enis} ENIs × ({ips} IPv4 addresses per ENI − 1) + 2"
        )),
        ..Got::new(Value::from(pods))
    })
}

/// `kubernetes.node-ip` from `local-ipv4`: one unicast IPv4 address.
pub fn node_ip(text: &str) -> Result<Got, Skip> {
    let malformed = |reason: String| Skip::Malformed {
        what: "local-ipv4",
        reason,
    };
    let ip: Ipv4Addr = text
        .parse()
        .map_err(|_| malformed(format!("{:?} is not an IPv4 address", shorten(text))))?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(malformed(format!("{ip} is not a unicast address")));
    }
    Ok(Got::new(Value::String(ip.to_string())))
}

/// `kubernetes.hostname-override` from `local-hostname`: one RFC 1123 host name.
pub fn hostname(text: &str) -> Result<Got, Skip> {
    let name = Hostname::new(text).map_err(|reason| Skip::Malformed {
        what: "local-hostname",
        reason,
    })?;
    Ok(Got::new(Value::String(name.as_str().to_owned())))
}

/// The primary interface's MAC address (six pairs of hex digits, colon-separated), as
/// it goes into the next path.
pub fn mac(text: &str) -> Result<String, Skip> {
    let parts: Vec<&str> = text.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(text.to_owned())
    } else {
        Err(Skip::Malformed {
            what: "mac",
            reason: format!("{:?} is not a MAC address", shorten(text)),
        })
    }
}

/// `kubernetes.cluster-dns-ip` from the VPC's IPv4 CIDR blocks (one a line; the first
/// counts): EKS puts the service range at 172.20.0.0/16 when the VPC is in 10.0.0.0/8
/// and at 10.100.0.0/16 otherwise, and the DNS service at `.10` of it.
pub fn cluster_dns_ip(blocks: &str) -> Result<Got, Skip> {
    let malformed = |reason: String| Skip::Malformed {
        what: "vpc-ipv4-cidr-blocks",
        reason,
    };
    let Some(first) = blocks.lines().map(str::trim).find(|l| !l.is_empty()) else {
        return Err(malformed("empty".to_owned()));
    };
    let parsed = first.split_once('/').and_then(|(addr, len)| {
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
        Some((addr, len))
    });
    let Some((addr, len)) = parsed else {
        return Err(malformed(format!(
            "{:?} is not an IPv4 CIDR block",
            shorten(first)
        )));
    };
    let in_ten = addr.octets()[0] == 10 && len >= 8;
    let dns = if in_ten { "172.20.0.10" } else { "10.100.0.10" };
    let why = if in_ten { "is" } else { "is not" };
    Ok(Got {
        why: Some(format!(
            "the VPC's first IPv4 CIDR block {addr}/{len} {why} in 10.0.0.0/8"
        )),
        ..Got::new(Value::String(dns.to_owned()))
    })
}

/// At most 64 characters of outside text, for a message.
fn shorten(text: &str) -> String {
    let mut out: String = text.chars().take(64).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

impl Boot {
    /// The `derived:<key>` steps (see the module doc); nothing on a host without the
    /// `imds` provider. Never fails the boot: a setting that cannot be derived is
    /// skipped with the reason.
    pub(super) async fn derive_from_metadata(&self, t: &mut BootTracker) -> Result<(), Halt> {
        let Some(config) = self.config.providers.iter().find_map(Provider::imds_config) else {
            return Ok(());
        };
        // Made at the first read: a resumed boot whose steps are all done reads nothing.
        let mut metadata: Option<Metadata> = None;
        for which in Derived::ALL {
            let step = which.step_name();
            if Self::done(t, &step) {
                continue;
            }
            t.begin(&step, false)?;
            let started = Instant::now();
            let (staged, live, settings) = self.staged_and_live();
            let derived = match precheck(which, &staged, &live) {
                Err(skip) => Err(skip),
                Ok(()) => {
                    let md = metadata.get_or_insert_with(|| Metadata::new(config));
                    md.derive(which, &settings).await
                }
            };
            let patched = match derived {
                Ok(got) => self
                    .patch_launch(&step, which.patch(got.value.clone()))
                    .await
                    .map(|()| got)
                    .map_err(|Halt(reason)| Skip::Refused(reason)),
                Err(skip) => Err(skip),
            };
            let (outcome, detail) = match patched {
                Ok(got) => (StepOutcome::Succeeded, got.detail(which)),
                Err(skip) => {
                    tracing::info!(key = which.key(), reason = %skip, "setting not derived from the instance metadata");
                    (
                        StepOutcome::Skipped,
                        format!("not derived from {}: {skip}", which.source()),
                    )
                }
            };
            t.end(&step, outcome, Some(detail), started.elapsed())?;
        }
        Ok(())
    }

    /// What `launch` holds (its patches applied to nothing), the committed settings,
    /// and what committing `launch` would make of them.
    fn staged_and_live(&self) -> (Value, Value, Value) {
        let snapshot = self.store.snapshot();
        let mut staged = Value::Object(serde_json::Map::new());
        let mut settings = snapshot.live_settings().clone();
        if let Some(launch) = snapshot.pending.get(LAUNCH_TX) {
            launch.apply_to(&mut staged);
            launch.apply_to(&mut settings);
        }
        (staged, snapshot.live_settings().clone(), settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::imds::tests::{Behaviour, TestImds};
    use std::time::Duration;

    fn doc() -> Value {
        json!({
            "accountId": "123456789012",
            "architecture": "x86_64",
            "availabilityZone": "us-west-2b",
            "imageId": "ami-0abcdef1234567890",
            "instanceId": "i-0a1b2c3d4e5f60718",
            "instanceType": "m5.large",
            "privateIp": "10.0.1.23",
            "region": "us-west-2",
            "version": "2017-09-30"
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut d = doc();
        d[field] = value;
        d
    }

    fn malformed(r: Result<Got, Skip>) -> String {
        match r {
            Err(Skip::Malformed { reason, .. }) => reason,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn the_eni_limits_table_is_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        let mut last = String::new();
        for line in ENI_LIMITS.lines().filter(|l| !l.starts_with('#')) {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 3, "{line:?}");
            let enis: u32 = fields[1].parse().expect(line);
            let ips: u32 = fields[2].parse().expect(line);
            assert!(
                (1..=64).contains(&enis) && (2..=64).contains(&ips),
                "{line}"
            );
            assert!(seen.insert(fields[0].to_owned()), "{line} twice");
            assert!(*fields[0] > *last.as_str(), "{line} out of order");
            last = fields[0].to_owned();
            assert!(
                max_pods(&with("instanceType", json!(fields[0]))).is_ok(),
                "{line}"
            );
        }
        assert!(seen.len() > 500, "{}", seen.len());
    }

    #[test]
    fn max_pods_formula() {
        assert_eq!(max_pods_for(3, 10), Some(29));
        assert_eq!(max_pods_for(2, 2), Some(4));
        assert_eq!(max_pods_for(15, 50), Some(737));
        assert_eq!(max_pods_for(1, 0), None);
        assert_eq!(max_pods_for(u32::MAX, 3), None);
    }

    #[test]
    fn max_pods_matches_the_published_eks_values() {
        // EKS's published max-pods (eni-max-pods) for these types.
        for (instance_type, pods) in [
            ("t3.micro", 4),
            ("t3.medium", 17),
            ("t3.large", 35),
            ("t4g.small", 11),
            ("m5.large", 29),
            ("m5.xlarge", 58),
            ("m5.4xlarge", 234),
            ("m5.24xlarge", 737),
            ("c5.18xlarge", 737),
            ("m6i.large", 29),
            ("m7g.medium", 8),
            ("r6i.2xlarge", 58),
            ("p4d.24xlarge", 737),
        ] {
            let got = max_pods(&with("instanceType", json!(instance_type))).expect(instance_type);
            assert_eq!(got.value, json!(pods), "{instance_type}");
        }
    }

    #[test]
    fn an_unknown_instance_type_is_skipped_not_guessed() {
        for unknown in ["m5.huge", "zz9.large", "mac1.metal"] {
            assert_eq!(
                max_pods(&with("instanceType", json!(unknown))),
                Err(Skip::UnknownInstanceType(unknown.to_owned()))
            );
        }
        assert!(malformed(max_pods(&with("instanceType", json!("M5 LARGE")))).contains("M5 LARGE"));
        assert!(malformed(max_pods(&with("instanceType", json!(29)))).contains("not a string"));
        let mut no_type = doc();
        no_type
            .as_object_mut()
            .expect("object")
            .remove("instanceType");
        assert!(malformed(max_pods(&no_type)).contains("instanceType"));
    }

    #[test]
    fn region_from_the_identity_document() {
        assert_eq!(region(&doc()).expect("region").value, json!("us-west-2"));
        assert!(malformed(region(&with("region", json!("Oregon")))).contains("region"));
        assert!(malformed(region(&with("region", Value::Null))).contains("region"));
    }

    #[test]
    fn provider_id_from_zone_and_instance() {
        assert_eq!(
            provider_id(&doc()).expect("id").value,
            json!("aws:///us-west-2b/i-0a1b2c3d4e5f60718")
        );
        let local_zone = with("availabilityZone", json!("us-west-2-lax-1a"));
        assert_eq!(
            provider_id(&with("instanceId", json!("i-0123abcd")))
                .expect("short id")
                .value,
            json!("aws:///us-west-2b/i-0123abcd")
        );
        assert!(provider_id(&local_zone).is_ok());
        for (field, bad) in [
            ("availabilityZone", "us-west-2b/../x"),
            ("availabilityZone", ""),
            ("instanceId", "i-XYZ"),
            ("instanceId", "0a1b2c3d4e5f60718"),
            ("instanceId", "i-0a1b2c3d4e5f6071\n"),
        ] {
            assert!(
                malformed(provider_id(&with(field, json!(bad)))).contains(field),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn node_ip_is_one_unicast_ipv4_address() {
        assert_eq!(node_ip("10.0.1.23").expect("ip").value, json!("10.0.1.23"));
        for bad in [
            "",
            "not-an-ip",
            "10.0.1",
            "10.0.1.23 10.0.1.24",
            "fd00::1",
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "010.0.1.23",
        ] {
            assert!(node_ip(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostname_override_is_one_host_name() {
        assert_eq!(
            hostname("ip-10-0-1-23.us-west-2.compute.internal")
                .expect("name")
                .value,
            json!("ip-10-0-1-23.us-west-2.compute.internal")
        );
        for bad in ["", "two names", "-bad.example", "a..b"] {
            assert!(hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cluster_dns_ip_follows_the_vpc_range() {
        let dns = |blocks: &str| cluster_dns_ip(blocks).map(|d| d.value);
        assert_eq!(dns("10.0.0.0/16"), Ok(json!("172.20.0.10")));
        assert_eq!(dns("10.128.0.0/9\n"), Ok(json!("172.20.0.10")));
        assert_eq!(dns("172.31.0.0/16"), Ok(json!("10.100.0.10")));
        assert_eq!(dns("192.168.0.0/16"), Ok(json!("10.100.0.10")));
        assert_eq!(dns("100.64.0.0/16"), Ok(json!("10.100.0.10")));
        // The first block counts.
        assert_eq!(dns("172.31.0.0/16\n10.1.0.0/16"), Ok(json!("10.100.0.10")));
        assert_eq!(dns("10.1.0.0/16\n172.31.0.0/16"), Ok(json!("172.20.0.10")));
        for bad in ["", "\n", "10.0.0/16", "10.0.0.0", "10.0.0.0/33", "banana"] {
            assert!(
                matches!(cluster_dns_ip(bad), Err(Skip::Malformed { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(mac("0e:49:61:0f:c3:11").as_deref(), Ok("0e:49:61:0f:c3:11"));
        for bad in [
            "",
            "0e:49:61:0f:c3",
            "0e:49:61:0f:c3:1g",
            "0e:49:61:0f:c3:11/../x",
        ] {
            assert!(mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn details_name_the_value_its_source_and_the_rule() {
        let region = region(&doc()).expect("region");
        assert_eq!(
            region.detail(Derived::AwsRegion),
            "us-west-2 from /latest/dynamic/instance-identity/document (region)"
        );
        let pods = max_pods(&doc()).expect("max-pods");
        assert_eq!(
            pods.detail(Derived::MaxPods),
            "29 from /latest/dynamic/instance-identity/document (instanceType); \
             m5.large: 3 ENIs × (10 IPv4 addresses per ENI − 1) + 2"
        );
        let dns = cluster_dns_ip("172.31.0.0/16").expect("dns");
        assert!(dns
            .detail(Derived::ClusterDnsIp)
            .ends_with("; the VPC's first IPv4 CIDR block 172.31.0.0/16 is not in 10.0.0.0/8"));
    }

    #[test]
    fn only_unset_keys_and_kubernetes_nodes() {
        let none = json!({});
        let k8s = json!({"kubernetes": {"cluster-name": "c"}});
        let api = json!({"kubernetes": {"api-server": "https://k.example"}});
        assert_eq!(precheck(Derived::AwsRegion, &none, &none), Ok(()));
        assert_eq!(
            precheck(Derived::NodeIp, &none, &none),
            Err(Skip::NotKubernetes)
        );
        // A kubernetes group without api-server or cluster-name is not enough.
        let other = json!({"kubernetes": {"max-pods": 10}});
        assert_eq!(
            precheck(Derived::NodeIp, &other, &none),
            Err(Skip::NotKubernetes)
        );
        assert_eq!(precheck(Derived::NodeIp, &k8s, &none), Ok(()));
        assert_eq!(precheck(Derived::NodeIp, &none, &api), Ok(()));
        let set = json!({"aws": {"region": "eu-west-1"}, "kubernetes": {"cluster-name": "c", "max-pods": 10}});
        assert_eq!(
            precheck(Derived::AwsRegion, &set, &none),
            Err(Skip::SetByUserData)
        );
        assert_eq!(
            precheck(Derived::MaxPods, &set, &none),
            Err(Skip::SetByUserData)
        );
        assert_eq!(
            precheck(Derived::AwsRegion, &none, &set),
            Err(Skip::AlreadyCommitted)
        );
        assert_eq!(
            Derived::MaxPods.patch(json!(29)),
            json!({"kubernetes": {"max-pods": 29}})
        );
        assert_eq!(
            Derived::ClusterDnsIp.step_name(),
            "derived:kubernetes.cluster-dns-ip"
        );
    }

    const MAC: &str = "0e:49:61:0f:c3:11";

    fn ec2(identity: &str, extra: &[(&str, &str)]) -> Behaviour {
        let blocks = cidr_blocks_path(MAC);
        let mut paths: Vec<(String, String)> = vec![
            (IDENTITY_PATH.to_owned(), identity.to_owned()),
            (LOCAL_IPV4_PATH.to_owned(), "10.0.1.23".to_owned()),
            (
                LOCAL_HOSTNAME_PATH.to_owned(),
                "ip-10-0-1-23.us-west-2.compute.internal".to_owned(),
            ),
            (MAC_PATH.to_owned(), MAC.to_owned()),
            (blocks, "10.0.0.0/16\n".to_owned()),
        ];
        for (p, b) in extra {
            paths.retain(|(q, _)| q != p);
            paths.push(((*p).to_owned(), (*b).to_owned()));
        }
        Behaviour {
            paths: paths
                .into_iter()
                .map(|(p, b)| (p, b.into_bytes()))
                .collect(),
            ..Behaviour::default()
        }
    }

    async fn derive_all(md: &mut Metadata) -> Vec<Result<Value, Skip>> {
        let mut out = Vec::new();
        for which in Derived::ALL {
            out.push(md.derive(which, &json!({})).await.map(|d| d.value));
        }
        out
    }

    #[tokio::test]
    async fn everything_from_one_session() {
        let imds = TestImds::start(ec2(&doc().to_string(), &[])).await;
        let config = imds.config(Duration::from_secs(2), Duration::from_millis(500));
        let mut md = Metadata::new(&config);
        assert_eq!(
            derive_all(&mut md).await,
            vec![
                Ok(json!("us-west-2")),
                Ok(json!("172.20.0.10")),
                Ok(json!("10.0.1.23")),
                Ok(json!(29)),
                Ok(json!("aws:///us-west-2b/i-0a1b2c3d4e5f60718")),
                Ok(json!("ip-10-0-1-23.us-west-2.compute.internal")),
            ]
        );
        imds.seen(|s| {
            assert_eq!(s.puts, 1, "one token");
            assert_eq!(s.unauthorized, 0);
            let identity = s.paths.iter().filter(|p| *p == IDENTITY_PATH).count();
            assert_eq!(
                identity, 1,
                "the identity document is read once: {:?}",
                s.paths
            );
        });
    }

    #[tokio::test]
    async fn missing_and_malformed_metadata_are_skipped() {
        let imds = TestImds::start(ec2(
            "{\"region\": \"us-west-2\", oops",
            &[
                (LOCAL_IPV4_PATH, "not-an-ip"),
                (MAC_PATH, "0e:49:61:0f:c3:11"),
            ],
        ))
        .await;
        let config = imds.config(Duration::from_secs(2), Duration::from_millis(500));
        let mut md = Metadata::new(&config);
        let got = derive_all(&mut md).await;
        let reason = |i: usize| match &got[i] {
            Err(skip) => skip.to_string(),
            Ok(v) => panic!("{i}: derived {v}"),
        };
        assert!(
            reason(0).contains("identity document is malformed: not JSON"),
            "{}",
            reason(0)
        );
        assert!(
            reason(2).contains("local-ipv4 is malformed") && reason(2).contains("not-an-ip"),
            "{}",
            reason(2)
        );
        assert!(
            reason(3).contains("identity document is malformed"),
            "{}",
            reason(3)
        );
        assert!(
            reason(4).contains("identity document is malformed"),
            "{}",
            reason(4)
        );
        // What is well formed is still derived.
        assert_eq!(got[1], Ok(json!("172.20.0.10")));
        assert!(got[5].is_ok());

        let imds = TestImds::start(Behaviour::default()).await;
        let mut md =
            Metadata::new(&imds.config(Duration::from_secs(2), Duration::from_millis(500)));
        let got = derive_all(&mut md).await;
        assert_eq!(got[0], Err(Skip::Missing { what: IDENTITY }));
        assert_eq!(got[1], Err(Skip::Missing { what: "mac" }));
        assert_eq!(got[2], Err(Skip::Missing { what: "local-ipv4" }));
        assert_eq!(
            got[5],
            Err(Skip::Missing {
                what: "local-hostname"
            })
        );
    }

    #[tokio::test]
    async fn an_ipv6_cluster_gets_no_ipv4_node_ip() {
        let imds = TestImds::start(ec2(&doc().to_string(), &[])).await;
        let mut md =
            Metadata::new(&imds.config(Duration::from_secs(2), Duration::from_millis(500)));
        let v6 = json!({"kubernetes": {"cluster-dns-ip": "fd00:10:100::a"}});
        assert_eq!(
            md.derive(Derived::NodeIp, &v6).await,
            Err(Skip::Ipv6Cluster)
        );
        let v6_list = json!({"kubernetes": {"cluster-dns-ip": ["fd00:10:100::a"]}});
        assert_eq!(
            md.derive(Derived::NodeIp, &v6_list).await,
            Err(Skip::Ipv6Cluster)
        );
        let v4 = json!({"kubernetes": {"cluster-dns-ip": "10.100.0.10"}});
        assert!(md.derive(Derived::NodeIp, &v4).await.is_ok());
    }

    // Paused time: the bounds are on tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn slow_metadata_is_skipped_within_the_deadline() {
        let imds = TestImds::start(Behaviour {
            slow_paths: vec![IDENTITY_PATH.to_owned()],
            slow_delay: Duration::from_secs(60),
            ..ec2(&doc().to_string(), &[])
        })
        .await;
        let deadline = Duration::from_secs(3);
        let mut md = Metadata::new(&imds.config(deadline, Duration::from_millis(500)));
        let started = tokio::time::Instant::now();
        let got = derive_all(&mut md).await;
        assert!(
            started.elapsed() < deadline + Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        match &got[0] {
            Err(Skip::Unavailable { what, reason }) => {
                assert_eq!(*what, IDENTITY);
                assert!(reason.contains("gave up"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // The deadline is shared: what comes after is not read.
        assert!(
            got.iter()
                .all(|g| matches!(g, Err(Skip::Unavailable { .. }))),
            "{got:?}"
        );
    }
}
