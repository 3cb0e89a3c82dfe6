//! Grammars of the settings that Bottlerocket's aws-k8s, aws-ecs and aws-dev variants
//! accept beyond Keel's first model: update and metrics endpoints, OCI defaults for
//! Kubernetes pods, `/etc/hosts` entries, chrony options, static pods, the kubelet's
//! serving key, CPU sets and ECS agent values.
//!
//! Same rules as the rest of [`crate::types`]: every string keeps the text as given, has a
//! length limit and refuses control characters and noncharacters unless its grammar names
//! them; every list has a maximum number of entries.

use super::*;

// ---------------------------------------------------------------------------------------
// Endpoints and versions

fn check_loose_url(s: &str) -> Result<(), String> {
    let what = "URL";
    check_len(s, what, URL_MAX)?;
    check_chars(s, what, &[])?;
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(invalid(s, what, "it must be non-empty, without spaces"));
    }
    // Like Bottlerocket: a URL, or one without a scheme ("example.com/path"), which means
    // http://.
    if url::Url::parse(s).is_ok() || url::Url::parse(&format!("http://{s}")).is_ok() {
        return Ok(());
    }
    Err(invalid(
        s,
        what,
        "expected a URL such as https://example.com/path, or host[:port][/path]",
    ))
}

validated_string! {
    /// A URL as Bottlerocket's update and metrics endpoints take it: any URL, or one
    /// without a scheme (`example.com/path`, meaning `http://`), at most 2048 bytes,
    /// without spaces or control characters.
    LooseUrl, check = check_loose_url,
    description = "A URL, or host[:port][/path] without a scheme",
    format = None, pattern = Some(concat!("^[^\\s", forbidden_class!(), "]+$"))
}

/// Whether `s` is a semantic version `MAJOR.MINOR.PATCH[-pre][+build]` (semver 2.0.0).
fn is_semver(s: &str) -> bool {
    let (rest, build) = match s.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let numeric = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'))
    };
    let ident =
        |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3 || !parts.iter().all(|p| numeric(p)) {
        return false;
    }
    let pre_ok = pre.is_none_or(|p| {
        p.split('.')
            .all(|id| ident(id) && (!id.bytes().all(|b| b.is_ascii_digit()) || numeric(id)))
    });
    let build_ok = build.is_none_or(|b| b.split('.').all(ident));
    pre_ok && build_ok
}

/// The longest version accepted.
pub const VERSION_MAX: usize = 128;

fn check_friendly_version(s: &str) -> Result<(), String> {
    let what = "version";
    check_len(s, what, VERSION_MAX)?;
    if s == "latest" || is_semver(s.strip_prefix('v').unwrap_or(s)) {
        return Ok(());
    }
    Err(invalid(
        s,
        what,
        "expected \"latest\" or a semantic version such as 1.19.2 or v1.19.2",
    ))
}

validated_string! {
    /// `latest`, or a semantic version with an optional `v` (`1.19.2`, `v1.20.0-rc.1`).
    FriendlyVersion, check = check_friendly_version,
    description = "\"latest\", or a semantic version such as 1.19.2 or v1.19.2",
    format = None, pattern = Some("^(latest|v?[0-9]+\\.[0-9]+\\.[0-9]+([-+][0-9A-Za-z.+-]+)?)$")
}

// ---------------------------------------------------------------------------------------
// OCI defaults

/// The capability names `settings.oci-defaults.capabilities` takes: Linux capabilities,
/// lowercase with `-`, without `cap-`.
pub const OCI_CAPABILITIES: &[&str] = &[
    "audit-control",
    "audit-read",
    "audit-write",
    "block-suspend",
    "bpf",
    "checkpoint-restore",
    "chown",
    "dac-override",
    "dac-read-search",
    "fowner",
    "fsetid",
    "ipc-lock",
    "ipc-owner",
    "kill",
    "lease",
    "linux-immutable",
    "mac-admin",
    "mac-override",
    "mknod",
    "net-admin",
    "net-bind-service",
    "net-broadcast",
    "net-raw",
    "perfmon",
    "setgid",
    "setfcap",
    "setpcap",
    "setuid",
    "sys-admin",
    "sys-boot",
    "sys-chroot",
    "sys-module",
    "sys-nice",
    "sys-pacct",
    "sys-ptrace",
    "sys-rawio",
    "sys-resource",
    "sys-time",
    "sys-tty-config",
    "syslog",
    "wake-alarm",
];

fn check_oci_capability(s: &str) -> Result<(), String> {
    if OCI_CAPABILITIES.contains(&s) {
        return Ok(());
    }
    let shown: String = s.chars().take(64).collect();
    Err(format!(
        "{shown:?} is not a capability name (expected a lowercase name such as net-admin or sys-ptrace)"
    ))
}

validated_string! {
    /// A Linux capability as `settings.oci-defaults.capabilities` names it: lowercase,
    /// words joined by `-`, no `cap-` prefix (`net-admin`, `sys-ptrace`).
    OciCapabilityName, check = check_oci_capability,
    description = "A capability name such as net-admin or sys-ptrace",
    format = None, pattern = Some("^[a-z]+(-[a-z]+)*$")
}

impl OciCapabilityName {
    /// The name as the OCI runtime spec writes it: `net-admin` → `CAP_NET_ADMIN`.
    pub fn linux_name(&self) -> String {
        format!("CAP_{}", self.0.to_ascii_uppercase().replace('-', "_"))
    }
}

/// The resource limit names `settings.oci-defaults.resource-limits` takes, with the
/// `RLIMIT_*` each stands for.
pub const RLIMITS: &[(&str, &str)] = &[
    ("max-address-space", "RLIMIT_AS"),
    ("max-core-file-size", "RLIMIT_CORE"),
    ("max-cpu-time", "RLIMIT_CPU"),
    ("max-data-size", "RLIMIT_DATA"),
    ("max-file-locks", "RLIMIT_LOCKS"),
    ("max-file-size", "RLIMIT_FSIZE"),
    ("max-locked-memory", "RLIMIT_MEMLOCK"),
    ("max-msgqueue-size", "RLIMIT_MSGQUEUE"),
    ("max-nice-priority", "RLIMIT_NICE"),
    ("max-open-files", "RLIMIT_NOFILE"),
    ("max-pending-signals", "RLIMIT_SIGPENDING"),
    ("max-processes", "RLIMIT_NPROC"),
    ("max-realtime-priority", "RLIMIT_RTPRIO"),
    ("max-realtime-timeout", "RLIMIT_RTTIME"),
    ("max-resident-set", "RLIMIT_RSS"),
    ("max-stack-size", "RLIMIT_STACK"),
];

fn check_rlimit_name(s: &str) -> Result<(), String> {
    if RLIMITS.iter().any(|(name, _)| *name == s) {
        return Ok(());
    }
    let shown: String = s.chars().take(64).collect();
    Err(format!(
        "{shown:?} is not a resource limit name (expected one of {})",
        RLIMITS
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

validated_string! {
    /// A resource limit as `settings.oci-defaults.resource-limits` names it
    /// (`max-open-files`, `max-processes`, ...).
    RlimitName, check = check_rlimit_name,
    description = "A resource limit name such as max-open-files",
    format = None, pattern = Some("^max-[a-z]+(-[a-z]+)*$")
}

impl RlimitName {
    /// The `RLIMIT_*` name the OCI runtime spec uses.
    pub fn linux_name(&self) -> &'static str {
        RLIMITS
            .iter()
            .find(|(name, _)| *name == self.0)
            .map_or("", |(_, linux)| linux)
    }
}

/// One bound of a resource limit: an integer from -1 to `i64::MAX`, `"unlimited"`, or the
/// decimal text of such an integer (what `apiclient set` sends); -1 and `"unlimited"`
/// mean no limit. Kept in the form given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RlimitValue {
    Number(i64),
    Text(String),
}

impl RlimitValue {
    const WHY: &'static str =
        "expected an integer from -1 to 9223372036854775807, or \"unlimited\"";

    /// The limit as the OCI runtime spec writes it: no limit is `u64::MAX`.
    pub fn value(&self) -> u64 {
        let number = match self {
            RlimitValue::Number(n) => *n,
            RlimitValue::Text(t) if t == "unlimited" => -1,
            RlimitValue::Text(t) => t.parse().unwrap_or(-1),
        };
        u64::try_from(number).unwrap_or(u64::MAX)
    }

    fn from_number(n: i64) -> Result<Self, String> {
        if n < -1 {
            return Err(format!("{n} is not a resource limit ({})", Self::WHY));
        }
        Ok(RlimitValue::Number(n))
    }

    fn from_text(s: &str) -> Result<Self, String> {
        let number_ok = s.len() <= 20
            && (s == "-1" || (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())))
            && s.parse::<i64>().is_ok();
        if s == "unlimited" || number_ok {
            return Ok(RlimitValue::Text(s.to_owned()));
        }
        let shown: String = s.chars().take(64).collect();
        Err(format!("{shown:?} is not a resource limit ({})", Self::WHY))
    }
}

impl Serialize for RlimitValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RlimitValue::Number(n) => serializer.serialize_i64(*n),
            RlimitValue::Text(t) => serializer.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for RlimitValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RlimitValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer from -1 to 9223372036854775807, or \"unlimited\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RlimitValue, E> {
                RlimitValue::from_number(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RlimitValue, E> {
                let n = i64::try_from(v).map_err(|_| {
                    E::custom(format!(
                        "{v} is not a resource limit ({})",
                        RlimitValue::WHY
                    ))
                })?;
                RlimitValue::from_number(n).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RlimitValue, E> {
                RlimitValue::from_text(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for RlimitValue {
    fn schema_name() -> String {
        "RlimitValue".to_owned()
    }
    fn is_referenceable() -> bool {
        false
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let number = SchemaObject {
            instance_type: Some(InstanceType::Integer.into()),
            number: Some(Box::new(schemars::schema::NumberValidation {
                minimum: Some(-1.0),
                ..Default::default()
            })),
            ..SchemaObject::default()
        };
        any_of(
            "A resource limit: an integer from -1 (no limit), or \"unlimited\"",
            vec![
                number.into(),
                string_schema(
                    "\"unlimited\" or the decimal text of a limit",
                    None,
                    Some("^(unlimited|-1|[0-9]{1,19})$"),
                ),
            ],
        )
    }
}

/// A schema that is any of `alternatives`.
fn any_of(description: &str, alternatives: Vec<Schema>) -> Schema {
    SchemaObject {
        subschemas: Some(Box::new(schemars::schema::SubschemaValidation {
            any_of: Some(alternatives),
            ..Default::default()
        })),
        metadata: Some(Box::new(Metadata {
            description: Some(description.to_owned()),
            ..Metadata::default()
        })),
        ..SchemaObject::default()
    }
    .into()
}

// ---------------------------------------------------------------------------------------
// Kubernetes

/// A percentage from 0 to 100, as an integer or its decimal text (`85` or `"85"`), kept
/// in the form given (the kubelet's image garbage collection thresholds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntegerPercent {
    Number(i64),
    Text(String),
}

impl IntegerPercent {
    /// The percentage (the value was checked when it was built).
    pub fn value(&self) -> i64 {
        match self {
            IntegerPercent::Number(n) => *n,
            IntegerPercent::Text(t) => t.parse().unwrap_or_default(),
        }
    }

    fn check(n: i64, shown: &str) -> Result<(), String> {
        if (0..=100).contains(&n) {
            Ok(())
        } else {
            Err(format!(
                "{shown} is not a percentage (it must be from 0 to 100)"
            ))
        }
    }
}

impl Serialize for IntegerPercent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            IntegerPercent::Number(n) => serializer.serialize_i64(*n),
            IntegerPercent::Text(t) => serializer.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for IntegerPercent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IntegerPercent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer from 0 to 100")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntegerPercent, E> {
                IntegerPercent::check(v, &v.to_string()).map_err(E::custom)?;
                Ok(IntegerPercent::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntegerPercent, E> {
                let n = i64::try_from(v).unwrap_or(i64::MAX);
                IntegerPercent::check(n, &v.to_string()).map_err(E::custom)?;
                Ok(IntegerPercent::Number(n))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntegerPercent, E> {
                let shown: String = v.chars().take(64).collect();
                let digits = !v.is_empty() && v.len() <= 3 && v.bytes().all(|b| b.is_ascii_digit());
                let n = if digits { v.parse().ok() } else { None };
                match n {
                    Some(n) => IntegerPercent::check(n, &format!("{shown:?}"))
                        .map(|()| IntegerPercent::Text(v.to_owned()))
                        .map_err(E::custom),
                    None => Err(E::custom(format!(
                        "{shown:?} is not a percentage (expected an integer from 0 to 100)"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for IntegerPercent {
    fn schema_name() -> String {
        "IntegerPercent".to_owned()
    }
    fn is_referenceable() -> bool {
        false
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let number = SchemaObject {
            instance_type: Some(InstanceType::Integer.into()),
            number: Some(Box::new(schemars::schema::NumberValidation {
                minimum: Some(0.0),
                maximum: Some(100.0),
                ..Default::default()
            })),
            ..SchemaObject::default()
        };
        any_of(
            "A percentage from 0 to 100",
            vec![
                number.into(),
                string_schema("A percentage from 0 to 100", None, Some("^[0-9]{1,3}$")),
            ],
        )
    }
}

/// The longest CPU set accepted.
pub const CPU_SET_MAX: usize = 1024;

fn check_cpu_set(s: &str) -> Result<(), String> {
    let what = "CPU list";
    check_len(s, what, CPU_SET_MAX)?;
    let number = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    let item_ok = |item: &str| match item.split_once('-') {
        Some((low, high)) => {
            number(low) && number(high) && low.parse::<u32>().ok() <= high.parse::<u32>().ok()
        }
        None => number(item),
    };
    if s.split(',').all(item_ok) {
        return Ok(());
    }
    Err(invalid(
        s,
        what,
        "expected CPU numbers and ranges separated by commas, such as 0,1 or 0-3,8-11",
    ))
}

validated_string! {
    /// A Linux CPU list: CPU numbers and low-high ranges separated by commas (`0-1`,
    /// `0,2,4-7`), at most 1024 bytes.
    CpuSet, check = check_cpu_set,
    description = "CPU numbers and ranges separated by commas, such as 0-1 or 0,2,4-7",
    format = None, pattern = Some("^[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*$")
}

/// The longest static pod manifest accepted, in base64 characters.
pub const STATIC_POD_MANIFEST_MAX: usize = 256 * 1024;

fn check_static_pod_manifest(s: &str) -> Result<(), String> {
    let what = "static pod manifest";
    check_len(s, what, STATIC_POD_MANIFEST_MAX)?;
    check_base64(s)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("not base64 ({e})"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "the base64 is not a {what}: the decoded data is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        return Err(format!(
            "the base64 is not a {what}: the decoded text is empty"
        ));
    }
    if let Some((offset, c)) = first_forbidden(&text, &['\n', '\r', '\t']) {
        return Err(format!(
            "the base64 is not a {what}: the decoded text holds a control character or noncharacter: U+{:04X} at byte {offset}",
            u32::from(c)
        ));
    }
    Ok(())
}

validated_string! {
    /// Base64 (standard alphabet, with padding) of a static pod manifest: UTF-8 text (the
    /// kubelet reads YAML or JSON) without control characters other than newline, return
    /// and tab. At most 256 KiB of base64.
    StaticPodManifest, check = check_static_pod_manifest,
    description = "Base64 of a static pod manifest (YAML or JSON)",
    format = None, pattern = Some("^[A-Za-z0-9+/]*={0,2}$")
}

impl StaticPodManifest {
    /// The decoded manifest (the value was checked when it was built).
    pub fn decode(&self) -> String {
        base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_default()
    }
}

/// The longest private key accepted, in base64 characters.
pub const PRIVATE_KEY_MAX: usize = 64 * 1024;

/// The PEM labels a private key may have.
const PRIVATE_KEY_LABELS: &[&str] = &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"];

fn check_private_key(s: &str) -> Result<(), String> {
    if s.len() > PRIVATE_KEY_MAX {
        return Err(format!(
            "a private key is at most {PRIVATE_KEY_MAX} bytes of base64; this one has {}",
            s.len()
        ));
    }
    let bytes = base64_problem(s)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "the decoded data is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    match pem_problem(&text, PRIVATE_KEY_LABELS, false) {
        Some(why) => Err(format!("the base64 is not a PEM private key: {why}")),
        None => Ok(()),
    }
}

secret_string! {
    /// Base64 (standard alphabet, with padding) of a PEM private key (`PRIVATE KEY`,
    /// `RSA PRIVATE KEY` or `EC PRIVATE KEY`), at most 64 KiB of base64.
    PemPrivateKey, parsed = (), check = check_private_key, what = "private key",
    description = "Base64 of a PEM private key",
    pattern = Some("^[A-Za-z0-9+/]*={0,2}$")
}

impl PemPrivateKey {
    /// The decoded PEM text. Never log or format it.
    pub fn expose_decoded(&self) -> String {
        base64::engine::general_purpose::STANDARD
            .decode(&self.text)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------
// Node taints: one taint or a list

/// The taints of one key: one `value:Effect` string or a list of at most [`TaintList::MAX`]
/// (one per effect: Kubernetes refuses two taints with the same key and effect). Stored
/// as a list, as Bottlerocket stores it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaintList(Vec<Taint>);

impl TaintList {
    /// The most taints one key holds.
    pub const MAX: usize = 3;
}

impl std::ops::Deref for TaintList {
    type Target = Vec<Taint>;
    fn deref(&self) -> &Vec<Taint> {
        &self.0
    }
}

impl Serialize for TaintList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TaintList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TaintList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a taint value:Effect or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TaintList, E> {
                Taint::new(v).map(|t| TaintList(vec![t])).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TaintList, A::Error> {
                let mut taints = Vec::new();
                while let Some(taint) = seq.next_element::<Taint>()? {
                    if taints.len() == TaintList::MAX {
                        return Err(serde::de::Error::custom(format!(
                            "more than the limit of {} taints for this key",
                            TaintList::MAX
                        )));
                    }
                    taints.push(taint);
                }
                Ok(TaintList(taints))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for TaintList {
    fn schema_name() -> String {
        "TaintList".to_owned()
    }
    fn is_referenceable() -> bool {
        false
    }
    fn json_schema(gen: &mut SchemaGenerator) -> Schema {
        let one = Taint::json_schema(gen);
        let mut many = <Vec<Taint>>::json_schema(gen);
        if let Schema::Object(list) = &mut many {
            list.array().max_items = u32::try_from(TaintList::MAX).ok();
        }
        any_of("A taint value:Effect, or a list of them", vec![one, many])
    }
}

// ---------------------------------------------------------------------------------------
// /etc/hosts

/// The most host names one `/etc/hosts` entry holds.
pub const HOST_ALIASES_MAX: usize = 64;

/// One entry of `settings.network.hosts`: an IP address and its host names, written as
/// the pair `["10.0.0.5", ["db", "db.example.internal"]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsEntry {
    pub address: IpAddress,
    pub names: Vec<Hostname>,
}

impl Serialize for HostsEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut pair = serializer.serialize_tuple(2)?;
        pair.serialize_element(&self.address)?;
        pair.serialize_element(&self.names)?;
        pair.end()
    }
}

/// The host names of one entry, at most [`HOST_ALIASES_MAX`].
struct HostNames(Vec<Hostname>);

impl<'de> Deserialize<'de> for HostNames {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HostNames;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of host names")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<HostNames, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<Hostname>()? {
                    if names.len() == HOST_ALIASES_MAX {
                        return Err(serde::de::Error::custom(format!(
                            "more than the limit of {HOST_ALIASES_MAX} host names for one address"
                        )));
                    }
                    names.push(name);
                }
                Ok(HostNames(names))
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

impl<'de> Deserialize<'de> for HostsEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HostsEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an [address, [host names]] pair")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<HostsEntry, A::Error> {
                use serde::de::Error as _;
                let pair = "an [address, [host names]] pair";
                let address = seq.next_element::<IpAddress>()?.ok_or_else(|| {
                    A::Error::custom(format!("expected {pair}, not an empty list"))
                })?;
                let names = seq.next_element::<HostNames>()?.ok_or_else(|| {
                    A::Error::custom(format!("expected {pair}: the host names are missing"))
                })?;
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::custom(format!(
                        "expected {pair}, not a longer list"
                    )));
                }
                Ok(HostsEntry {
                    address,
                    names: names.0,
                })
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

impl JsonSchema for HostsEntry {
    fn schema_name() -> String {
        "HostsEntry".to_owned()
    }
    fn is_referenceable() -> bool {
        false
    }
    fn json_schema(gen: &mut SchemaGenerator) -> Schema {
        let address = IpAddress::json_schema(gen);
        let mut names = <Vec<Hostname>>::json_schema(gen);
        if let Schema::Object(list) = &mut names {
            list.array().max_items = u32::try_from(HOST_ALIASES_MAX).ok();
        }
        SchemaObject {
            instance_type: Some(InstanceType::Array.into()),
            array: Some(Box::new(schemars::schema::ArrayValidation {
                items: Some(schemars::schema::SingleOrVec::Vec(vec![address, names])),
                min_items: Some(2),
                max_items: Some(2),
                ..Default::default()
            })),
            metadata: Some(Box::new(Metadata {
                description: Some("An [IP address, [host names]] pair".to_owned()),
                ..Metadata::default()
            })),
            ..SchemaObject::default()
        }
        .into()
    }
}

// ---------------------------------------------------------------------------------------
// chrony

/// The longest chrony option accepted.
pub const NTP_OPTION_MAX: usize = 128;

fn check_ntp_option(s: &str) -> Result<(), String> {
    let what = "time server option";
    check_len(s, what, NTP_OPTION_MAX)?;
    let words_ok = !s.is_empty()
        && s.split(' ')
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_graphic() && b != b'#'));
    if words_ok {
        return Ok(());
    }
    Err(invalid(
        s,
        what,
        "expected words of printable ASCII separated by single spaces, such as iburst or \"minpoll 4\" (no '#', tabs or control characters)",
    ))
}

validated_string! {
    /// Words added to every `server` line of chrony.conf (`iburst`, `minpoll`, `4`,
    /// `"maxpoll 8"`): printable ASCII without `#`, words separated by single spaces, at
    /// most 128 bytes.
    NtpOption, check = check_ntp_option,
    description = "Words for chrony's server lines, such as iburst or \"minpoll 4\"",
    format = None, pattern = Some("^[!-\"$-~]+( [!-\"$-~]+)*$")
}

// ---------------------------------------------------------------------------------------
// ECS

fn check_ecs_attribute_key(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if ok {
        return Ok(());
    }
    Err(invalid(
        s,
        "ECS attribute name",
        "1 to 128 letters, digits, '.', '_', '/' or '-'",
    ))
}

validated_string! {
    /// An ECS container instance attribute name: 1 to 128 ASCII letters, digits, `.`,
    /// `_`, `/` and `-`.
    EcsAttributeKey, check = check_ecs_attribute_key,
    description = "An ECS attribute name: 1 to 128 letters, digits, '.', '_', '/' or '-'",
    format = None, pattern = Some("^[A-Za-z0-9._/-]{1,128}$")
}

fn check_ecs_attribute_value(s: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b".@:_/\\- ".contains(&b);
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(allowed)
        && !s.starts_with(' ')
        && !s.ends_with(' ');
    if ok {
        return Ok(());
    }
    Err(invalid(
        s,
        "ECS attribute value",
        "1 to 128 letters, digits, spaces and '.', '@', ':', '_', '/', '\\', '-', not starting or ending with a space",
    ))
}

validated_string! {
    /// An ECS container instance attribute value: 1 to 128 ASCII letters, digits, spaces,
    /// `.`, `@`, `:`, `_`, `/`, `\` and `-`, not starting or ending with a space.
    EcsAttributeValue, check = check_ecs_attribute_value,
    description = "An ECS attribute value",
    format = None, pattern = Some("^[A-Za-z0-9.@:_/\\\\-]([A-Za-z0-9.@:_/\\\\ -]{0,126}[A-Za-z0-9.@:_/\\\\-])?$")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn versions() {
        for ok in [
            "latest",
            "1.0.0",
            "v1.0.0",
            "1.0.1-alpha",
            "v1.0.2-alpha+1.0",
            "1.1.0-rc.1.1",
        ] {
            assert!(FriendlyVersion::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "hi",
            "1.0",
            "1",
            "v",
            "v1",
            "vv1.1.0",
            "1.0.3-beta.1.01",
            "01.0.0",
            "1.0.0-",
            "1.0.0+",
        ] {
            assert!(FriendlyVersion::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loose_urls() {
        for ok in [
            "https://updates.example.com/2020-07-07/",
            "example.com/path",
            "localhost:8080",
            "10.0.0.1",
        ] {
            assert!(LooseUrl::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "how are you", "http://a\nb", "a b"] {
            assert!(LooseUrl::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cpu_sets() {
        for ok in ["1", "0,1,2,3", "1-4", "1,6-9", "1-3,6-9,10-15"] {
            assert!(CpuSet::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "100.0", "1..5", "ten", "1-", "-3", "9,-10", "1,2,", "4-1", "1-23-4",
        ] {
            assert!(CpuSet::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn capability_and_rlimit_names_map_to_linux() {
        assert_eq!(
            OciCapabilityName::new("sys-pacct").unwrap().linux_name(),
            "CAP_SYS_PACCT"
        );
        assert!(OciCapabilityName::new("CAP_SYS_ADMIN").is_err());
        assert_eq!(
            RlimitName::new("max-open-files").unwrap().linux_name(),
            "RLIMIT_NOFILE"
        );
        assert!(RlimitName::new("nofile").is_err());
    }

    #[test]
    fn rlimit_values() {
        let v = |j: serde_json::Value| serde_json::from_value::<RlimitValue>(j);
        assert_eq!(v(serde_json::json!(-1)).unwrap().value(), u64::MAX);
        assert_eq!(v(serde_json::json!("unlimited")).unwrap().value(), u64::MAX);
        assert_eq!(v(serde_json::json!(65536)).unwrap().value(), 65536);
        assert_eq!(v(serde_json::json!("1048576")).unwrap().value(), 1_048_576);
        assert_eq!(
            v(serde_json::json!(i64::MAX)).unwrap().value(),
            i64::MAX as u64
        );
        for bad in [
            serde_json::json!(-2),
            serde_json::json!("abc"),
            serde_json::json!(u64::MAX),
            serde_json::json!(1.5),
            serde_json::json!(true),
        ] {
            assert!(v(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_value(v(serde_json::json!("unlimited")).unwrap()).unwrap(),
            serde_json::json!("unlimited")
        );
    }

    #[test]
    fn ntp_options() {
        for ok in ["iburst", "minpoll 4", "maxpoll", "8", "key=1"] {
            assert!(NtpOption::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", " x", "x ", "a  b", "a\tb", "#x", "x\ny"] {
            assert!(NtpOption::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ecs_attributes() {
        assert!(EcsAttributeKey::new("have.period/slash").is_ok());
        assert!(EcsAttributeKey::new("no spaces").is_err());
        assert!(EcsAttributeValue::new("with spaces in between").is_ok());
        assert!(EcsAttributeValue::new("\\ \\").is_ok());
        for bad in ["", " lead", "trail ", "$", "%"] {
            assert!(EcsAttributeValue::new(bad).is_err(), "{bad:?}");
        }
    }
}
