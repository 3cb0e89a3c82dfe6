//! The typed settings model and its validation entry points.
//!
//! Owns: one struct per settings group (Bottlerocket-compatible kebab-case names, every
//! field optional so any subset is a valid patch, unknown keys rejected), `validate`
//! (typed deserialization that names the failing key) and `validate_patch` (the same,
//! plus checking that every `null` removal names a real key).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::key::format_segment;
use crate::limits::Limited;
use crate::types::{
    AwsRegion, Base64, BootParamKey, BootParamValue, BootstrapToken, Capability, CpuQuantity,
    CpuSet, DnsDomain, Duration, EcsAttributeKey, EcsAttributeValue, EnvName, EnvValue,
    EvictionSignal, FriendlyVersion, Hostname, HostsEntry, Identifier, ImageRef, IntegerPercent,
    IpAddress, IpOrIps, KernelModuleName, LabelKey, LabelValue, LooseUrl, MemoryQuantity, Motd,
    NoProxyEntry, NtpOption, NumaNode, OciCapabilityName, PemBundle, PemPrivateKey, ProxyAddress,
    Quantity, RegistryAuth, RegistryHost, RegistryImageRef, RlimitName, RlimitValue, SecretBase64,
    SecretString, SingleLineString, StaticPodManifest, SysctlKey, TaintList, Threshold, TimeServer,
    Url,
};
use crate::{Error, KeyPath};

// ---------------------------------------------------------------------------------------
// Bounded collections
//
// Every list and map that reaches a rendered file has a maximum number of entries, so
// that no accepted model makes a file, a command line or a render unreasonably large.
// Each limit is far above real use; its reason is on its type.

/// `settings.kubernetes.node-labels`: at most 256 labels. At the longest a label is 381
/// bytes (a 253-byte prefix, `/`, a 63-byte name, `=`, a 63-byte value), and all of them
/// go into one kubelet argument, which Linux caps at 128 KiB.
pub type NodeLabels = Limited<BTreeMap<LabelKey, LabelValue>, 256>;

/// The taints of one key: one `value:Effect` or a list of at most 3, one per effect
/// (Kubernetes refuses two taints with the same key and effect).
pub type KeyTaints = TaintList;

/// `settings.kubernetes.node-taints`: at most 64 keys (192 taints), which keeps the one
/// kubelet argument they go into under Linux's 128 KiB.
pub type NodeTaints = Limited<BTreeMap<LabelKey, KeyTaints>, 64>;

/// `kube-reserved` and `system-reserved`: at most 16 entries, though the kubelet
/// reserves only cpu, memory, ephemeral-storage and pid (any other name is refused,
/// naming it: see `check_kubelet_rules`).
pub type ReservedResources = Limited<BTreeMap<LabelKey, Quantity>, 16>;

/// `memory-manager-reserved-memory`: at most 64 NUMA nodes.
pub type ReservedMemoryByNode = Limited<BTreeMap<NumaNode, ReservedMemory>, 64>;

/// `allowed-unsafe-sysctls`: at most 64 patterns.
pub type UnsafeSysctls = Limited<Vec<SingleLineString>, 64>;

/// `credential-providers`: at most 8 plugins (a node needs one per registry vendor).
pub type CredentialProviders = Limited<BTreeMap<Identifier, CredentialProvider>, 8>;

/// The `image-patterns` of one credential provider: at most 32.
pub type ImagePatterns = Limited<Vec<SingleLineString>, 32>;

/// The `environment` of one credential provider: at most 32 variables.
pub type ProviderEnvironment = Limited<BTreeMap<EnvName, EnvValue>, 32>;

/// `settings.ntp.time-servers`: at most 32 servers.
pub type TimeServers = Limited<Vec<TimeServer>, 32>;

/// `settings.network.no-proxy`: at most 256 entries.
pub type NoProxyList = Limited<Vec<NoProxyEntry>, 256>;

/// `settings.dns.name-servers`: at most 16 (resolv.conf uses the first 3).
pub type NameServers = Limited<Vec<IpAddress>, 16>;

/// `settings.dns.search-list`: at most 32 domains.
pub type SearchList = Limited<Vec<DnsDomain>, 32>;

/// The `endpoint` list of one registry mirror: at most 8 URLs.
pub type MirrorEndpoints = Limited<Vec<Url>, 8>;

/// `settings.container-registry.credentials`: at most 32 credentials.
pub type RegistryCredentials = Limited<Vec<RegistryCredential>, 32>;

/// `settings.kernel.sysctl`: at most 256 keys.
pub type Sysctls = Limited<BTreeMap<SysctlKey, SingleLineString>, 256>;

/// The values of one kernel or init parameter: at most 16.
pub type BootParameterValues = Limited<Vec<BootParamValue>, 16>;

/// `settings.boot.kernel-parameters` and `init-parameters`: at most 64 parameters each
/// (the kernel's own command line holds 2 KiB on x86-64 and arm64).
pub type BootParameters = Limited<BTreeMap<BootParamKey, BootParameterValues>, 64>;

/// `settings.network.hosts`: at most 256 `/etc/hosts` entries.
pub type EtcHosts = Limited<Vec<HostsEntry>, 256>;

/// `settings.ntp.options`: at most 32 options.
pub type NtpOptions = Limited<Vec<NtpOption>, 32>;

/// `settings.kernel.modules`: at most 256 modules.
pub type KernelModules = Limited<BTreeMap<KernelModuleName, KernelModule>, 256>;

/// `settings.kubernetes.static-pods`: at most 32 pods, one manifest file each.
pub type StaticPods = Limited<BTreeMap<Identifier, StaticPod>, 32>;

/// `settings.kubernetes.cpu-manager-policy-options`: at most 8 (the kubelet knows 6).
pub type CpuManagerPolicyOptions = Limited<Vec<CpuManagerPolicyOption>, 8>;

/// `settings.oci-defaults.capabilities`: at most 64 entries (Linux has 41 capabilities).
pub type OciCapabilities = Limited<BTreeMap<OciCapabilityName, bool>, 64>;

/// `settings.oci-defaults.resource-limits`: at most 16 entries, one per limit.
pub type OciResourceLimits = Limited<BTreeMap<RlimitName, ResourceLimit>, 16>;

/// `settings.metrics.service-checks`: at most 64 services.
pub type ServiceChecks = Limited<Vec<SingleLineString>, 64>;

/// `settings.ecs.logging-drivers`: at most 16 drivers.
pub type LoggingDrivers = Limited<Vec<SingleLineString>, 16>;

/// `settings.ecs.instance-attributes`: at most 64 attributes.
pub type EcsAttributes = Limited<BTreeMap<EcsAttributeKey, EcsAttributeValue>, 64>;

/// `settings.pki`: at most 16 bundles (the OS's own CAs stay trusted; settings add to
/// them).
pub type PkiBundles = Limited<BTreeMap<Identifier, PkiBundle>, 16>;

/// The longest id containerd accepts for a container (its `identifiers` rule).
pub const CONTAINERD_ID_MAX: usize = 76;

/// Every setting Keel knows, under `settings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Message of the day shown at login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub motd: Option<Motd>,
    /// Long-running containers started by the host, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_containers: Option<BTreeMap<Identifier, HostContainer>>,
    /// Containers run to completion during boot, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_containers: Option<BTreeMap<Identifier, BootstrapContainer>>,
    /// `apiclient` invocations run during boot, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_commands: Option<BTreeMap<Identifier, BootstrapCommand>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Kubernetes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ntp: Option<Ntp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_registry: Option<ContainerRegistry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<ContainerRuntime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Kernel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    /// Certificate bundles, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pki: Option<PkiBundles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws: Option<Aws>,
    /// The update repository and the choice of version, as Bottlerocket names them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updates: Option<Updates>,
    /// Bottlerocket's metrics reporting (stored; no effect on a Keel host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The base OCI spec of Kubernetes pods: capabilities and resource limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oci_defaults: Option<OciDefaults>,
    /// Bottlerocket's OCI hooks (stored; no effect on a Keel host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oci_hooks: Option<OciHooks>,
    /// CloudFormation signalling (stored; no effect on a Keel host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloudformation: Option<CloudFormation>,
    /// Auto Scaling lifecycle hooks (stored; no effect on a Keel host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// The ECS agent (aws-ecs variants; stored, no effect on a Keel host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecs: Option<Ecs>,
}

/// When a bootstrap container or command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapMode {
    /// Never.
    Off,
    /// At the next boot only; then the mode becomes `off`.
    Once,
    /// At every boot.
    Always,
}

/// A long-running host container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HostContainer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<ImageRef>,
    /// Runs with full host privileges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub superpowered: Option<bool>,
    /// Opaque data given to the container at `/.bottlerocket/host-containers/<name>/user-data`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Base64>,
    /// Keel: overrides the image's command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Keel: extra environment variables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<BTreeMap<EnvName, EnvValue>>,
    /// Keel: capabilities added for a non-superpowered container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<Capability>>,
    /// Keel: memory limit, e.g. `512Mi`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<MemoryQuantity>,
    /// Keel: CPU limit, e.g. `500m` or `2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<CpuQuantity>,
}

/// A container run to completion during boot. It can never be superpowered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootstrapContainer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<ImageRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<BootstrapMode>,
    /// A failure halts the boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub essential: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Base64>,
    /// Keel: how long the container may run, e.g. `5m`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<BTreeMap<EnvName, EnvValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<Capability>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<MemoryQuantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<CpuQuantity>,
}

/// A list of `apiclient` invocations run during boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootstrapCommand {
    /// Each entry is one argv; `argv[0]` must be `apiclient`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<BootstrapMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub essential: Option<bool>,
}

/// How the kubelet authenticates to the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthenticationMode {
    Aws,
    Tls,
}

/// A JSON Schema string enum of `values` (every spelling the model accepts).
fn string_enum(description: &str, values: &[&str]) -> schemars::schema::Schema {
    schemars::schema::SchemaObject {
        instance_type: Some(schemars::schema::InstanceType::String.into()),
        enum_values: Some(values.iter().map(|v| Value::from(*v)).collect()),
        metadata: Some(Box::new(schemars::schema::Metadata {
            description: Some(description.to_owned()),
            ..Default::default()
        })),
        ..Default::default()
    }
    .into()
}

/// The kubelet memory manager policy (`None` or `Static`; lowercase accepted too, as the
/// kubelet and Bottlerocket do, and stored capitalized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryManagerPolicy {
    #[serde(alias = "none")]
    None,
    #[serde(alias = "static")]
    Static,
}

impl JsonSchema for MemoryManagerPolicy {
    fn schema_name() -> String {
        "MemoryManagerPolicy".to_owned()
    }
    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        string_enum(
            "The kubelet memory manager policy",
            &["None", "Static", "none", "static"],
        )
    }
}

/// The kubelet CPU manager policy (`none` or `static`; capitalized accepted too, and
/// stored lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuManagerPolicy {
    #[serde(alias = "None")]
    None,
    #[serde(alias = "Static")]
    Static,
}

impl JsonSchema for CpuManagerPolicy {
    fn schema_name() -> String {
        "CpuManagerPolicy".to_owned()
    }
    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        string_enum(
            "The kubelet CPU manager policy",
            &["none", "static", "None", "Static"],
        )
    }
}

/// An option of the kubelet's static CPU manager policy (`cpuManagerPolicyOptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CpuManagerPolicyOption {
    FullPcpusOnly,
    DistributeCpusAcrossNuma,
    AlignBySocket,
    DistributeCpusAcrossCores,
    StrictCpuReservation,
    PreferAlignCpusByUncorecache,
}

/// Where the node name comes from when `hostname-override` is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostnameOverrideSource {
    PrivateDnsName,
    InstanceId,
}

/// A static pod: the kubelet runs it from a manifest file, without an API server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StaticPod {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Base64 of the pod's manifest (YAML or JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<StaticPodManifest>,
}

/// The kubelet topology manager policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TopologyManagerPolicy {
    None,
    Restricted,
    BestEffort,
    SingleNumaNode,
}

/// The kubelet topology manager scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TopologyManagerScope {
    Container,
    Pod,
}

/// Memory reserved on one NUMA node for the static memory manager.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReservedMemory {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    #[serde(rename = "hugepages-1Gi", skip_serializing_if = "Option::is_none")]
    pub hugepages_1gi: Option<Quantity>,
    #[serde(rename = "hugepages-2Mi", skip_serializing_if = "Option::is_none")]
    pub hugepages_2mi: Option<Quantity>,
}

/// A kubelet image credential provider plugin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CredentialProvider {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_duration: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_patterns: Option<ImagePatterns>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<ProviderEnvironment>,
}

/// Kubernetes node (kubelet) settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Kubernetes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_server: Option<Url>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<SingleLineString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_certificate: Option<PemBundle>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_dns_ip: Option<IpOrIps>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<DnsDomain>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_labels: Option<NodeLabels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_taints: Option<NodeTaints>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pods: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standalone_mode: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_hard: Option<BTreeMap<EvictionSignal, Threshold>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_soft: Option<BTreeMap<EvictionSignal, Threshold>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_soft_grace_period: Option<BTreeMap<EvictionSignal, Duration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_max_pod_grace_period: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_reserved: Option<ReservedResources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_reserved: Option<ReservedResources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_manager_policy: Option<MemoryManagerPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_manager_reserved_memory: Option<ReservedMemoryByNode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_manager_policy: Option<CpuManagerPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_manager_reconcile_period: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology_manager_policy: Option<TopologyManagerPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology_manager_scope: Option<TopologyManagerScope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_unsafe_sysctls: Option<UnsafeSysctls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_providers: Option<CredentialProviders>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<BootstrapToken>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication_mode: Option<AuthenticationMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_infra_container_image: Option<RegistryImageRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<IpAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname_override: Option<Hostname>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<SingleLineString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_provider: Option<SingleLineString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls_bootstrap: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_api_qps: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_api_burst: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_qps: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_burst: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_qps: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_burst: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_max_size: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_max_files: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_gc_high_threshold_percent: Option<IntegerPercent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_gc_low_threshold_percent: Option<IntegerPercent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_period: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_period_for_critical_pods: Option<Duration>,
    /// Static pods, by name: one manifest file each.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_pods: Option<StaticPods>,
    /// `false` turns the kubelet's static pod directory off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_pods_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_cfs_quota_enforced: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_manager_policy_options: Option<CpuManagerPolicyOptions>,
    /// `-1` means no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_pids_limit: Option<i64>,
    /// The kubelet's log verbosity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<u8>,
    /// Base64 of the kubelet's serving certificate (PEM); used with `server-key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<PemBundle>,
    /// Base64 of the kubelet's serving key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_key: Option<PemPrivateKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seccomp_default: Option<bool>,
    /// CPUs reserved for the system and Kubernetes daemons (`reservedSystemCPUs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_cpus: Option<CpuSet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_max_workers: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_log_monitor_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_minimum_gc_age: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_maximum_gc_age: Option<Duration>,
    /// containerd's CRI option of the same name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_ownership_from_security_context: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub single_process_oom_kill: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_parallel_image_pulls: Option<i32>,
    /// Where Bottlerocket takes the node name from when `hostname-override` is unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname_override_source: Option<HostnameOverrideSource>,
}

/// Time synchronization.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Ntp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_servers: Option<TimeServers>,
    /// Words added to every server line (`iburst`, `minpoll 4`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<NtpOptions>,
}

/// Host network identity and proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Network {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Hostname>,
    /// `[http[s]://]host[:port]`; without a scheme it means `http://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<ProxyAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<NoProxyList>,
    /// Static `/etc/hosts` entries: `[address, [host names]]` pairs, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<EtcHosts>,
}

/// Resolver configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Dns {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_servers: Option<NameServers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_list: Option<SearchList>,
}

/// A registry mirror.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegistryMirror {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryHost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<MirrorEndpoints>,
}

/// Credentials for one registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegistryCredential {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryHost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<SingleLineString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretString>,
    /// Base64 of `username:password`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<RegistryAuth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identitytoken: Option<SecretString>,
}

/// `settings.container-registry.mirrors`: at most 32 mirrors, as a list of tables or (as
/// Bottlerocket also accepts) one table from registry to endpoints; stored as the list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegistryMirrors(Vec<RegistryMirror>);

impl RegistryMirrors {
    /// The most mirrors accepted.
    pub const MAX: usize = 32;

    fn push(&mut self, mirror: RegistryMirror) -> Result<(), String> {
        if self.0.len() == Self::MAX {
            return Err(format!(
                "more than the limit of {} mirrors for this setting",
                Self::MAX
            ));
        }
        self.0.push(mirror);
        Ok(())
    }
}

impl std::ops::Deref for RegistryMirrors {
    type Target = Vec<RegistryMirror>;
    fn deref(&self) -> &Vec<RegistryMirror> {
        &self.0
    }
}

impl Serialize for RegistryMirrors {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RegistryMirrors {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RegistryMirrors;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of mirrors, or a table from registry to endpoints")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RegistryMirrors, A::Error> {
                let mut mirrors = RegistryMirrors::default();
                while let Some(mirror) = seq.next_element::<RegistryMirror>()? {
                    mirrors.push(mirror).map_err(serde::de::Error::custom)?;
                }
                Ok(mirrors)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RegistryMirrors, A::Error> {
                /// A table entry's endpoints: refused here when there are none, so the
                /// error names the registry as the user wrote it (`mirrors."quay.io"`),
                /// not a position in the list it is stored as.
                struct Endpoints(MirrorEndpoints);
                impl<'de> Deserialize<'de> for Endpoints {
                    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                        let endpoints = MirrorEndpoints::deserialize(d)?;
                        if endpoints.is_empty() {
                            return Err(serde::de::Error::custom(
                                "a mirror needs at least one endpoint",
                            ));
                        }
                        Ok(Endpoints(endpoints))
                    }
                }
                let mut mirrors = RegistryMirrors::default();
                while let Some((registry, Endpoints(endpoint))) =
                    map.next_entry::<RegistryHost, Endpoints>()?
                {
                    mirrors
                        .push(RegistryMirror {
                            registry: Some(registry),
                            endpoint: Some(endpoint),
                        })
                        .map_err(serde::de::Error::custom)?;
                }
                Ok(mirrors)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for RegistryMirrors {
    fn schema_name() -> String {
        "RegistryMirrors".to_owned()
    }
    fn is_referenceable() -> bool {
        false
    }
    fn json_schema(gen: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        use schemars::schema::{Schema, SchemaObject, SubschemaValidation};
        let limit = u32::try_from(Self::MAX).ok();
        let mut list = <Vec<RegistryMirror>>::json_schema(gen);
        if let Schema::Object(list) = &mut list {
            list.array().max_items = limit;
        }
        let mut table = <BTreeMap<RegistryHost, MirrorEndpoints>>::json_schema(gen);
        if let Schema::Object(table) = &mut table {
            table.object().max_properties = limit;
        }
        SchemaObject {
            subschemas: Some(Box::new(SubschemaValidation {
                any_of: Some(vec![list, table]),
                ..Default::default()
            })),
            ..SchemaObject::default()
        }
        .into()
    }
}

/// Registry mirrors and credentials.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContainerRegistry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<RegistryMirrors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
    /// Bottlerocket's older name for `credentials`: stored as `credentials`.
    #[serde(default, skip_serializing)]
    pub creds: Option<RegistryCredentials>,
}

/// containerd settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContainerRuntime {
    /// `-1` means unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_container_log_line_size: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_downloads: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_unprivileged_icmp: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_unprivileged_ports: Option<bool>,
}

/// The kernel lockdown mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Lockdown {
    None,
    Integrity,
    Confidentiality,
}

/// Whether a kernel module may be loaded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KernelModule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
    /// Load it at boot (when allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoload: Option<bool>,
}

/// Kernel settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Kernel {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sysctl: Option<Sysctls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lockdown: Option<Lockdown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules: Option<KernelModules>,
}

/// Boot command-line settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Boot {
    /// Reboot when the boot settings change so that they take effect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot_to_reconcile: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_parameters: Option<BootParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_parameters: Option<BootParameters>,
}

/// A certificate bundle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PkiBundle {
    /// Base64 of the PEM certificate(s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PemBundle>,
    /// Trusted (added to the store) or distrusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted: Option<bool>,
}

/// AWS settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Aws {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<AwsRegion>,
    /// Base64 of an AWS config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<Base64>,
    /// Base64 of an AWS credentials file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretBase64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<SingleLineString>,
}

/// Bottlerocket's update settings, which keeld's update commands read (the TUF
/// repository's URLs, the version lock, waves and the seed; `agent/src/updates`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Updates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_base_url: Option<LooseUrl>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets_base_url: Option<LooseUrl>,
    /// The host's place in the update waves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    /// `latest` or the version to update to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_lock: Option<FriendlyVersion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_waves: Option<bool>,
}

/// Bottlerocket's anonymous metrics reporting (stored; no effect on a Keel host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Metrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_url: Option<LooseUrl>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_metrics: Option<bool>,
    /// The services whose health is reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_checks: Option<ServiceChecks>,
}

/// The two bounds of one resource limit. One alone applies to both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResourceLimit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<RlimitValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<RlimitValue>,
}

/// The base OCI spec of Kubernetes pods (containerd's CRI `base_runtime_spec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OciDefaults {
    /// Capability name → whether pods get it by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<OciCapabilities>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_limits: Option<OciResourceLimits>,
}

/// Bottlerocket's OCI hooks (stored; no effect on a Keel host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OciHooks {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log4j_hotpatch_enabled: Option<bool>,
}

/// CloudFormation signalling at boot (stored; no effect on a Keel host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CloudFormation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub should_signal: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack_name: Option<SingleLineString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logical_resource_id: Option<SingleLineString>,
}

/// Auto Scaling lifecycle hooks (stored; no effect on a Keel host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Autoscaling {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub should_wait: Option<bool>,
}

/// The ECS agent's log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EcsLogLevel {
    Debug,
    Info,
    Warn,
    Error,
    Crit,
}

/// When the ECS agent pulls images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EcsImagePullBehavior {
    Default,
    Always,
    Once,
    PreferCached,
}

/// The ECS agent of Bottlerocket's aws-ecs variants (stored; no effect on a Keel host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Ecs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<SingleLineString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_attributes: Option<EcsAttributes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_privileged_containers: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging_drivers: Option<LoggingDrivers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loglevel: Option<EcsLogLevel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_spot_instance_draining: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_behavior: Option<EcsImagePullBehavior>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_stop_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_cleanup_wait: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_service_rps: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_service_burst: Option<i64>,
    /// MiB of memory the agent keeps from tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_memory: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_cleanup_wait: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_cleanup_delete_per_cycle: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_cleanup_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_cleanup_age: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_host: Option<SingleLineString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awsvpc_block_imds: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_container_metadata: Option<bool>,
}

/// Formats a serde_path_to_error path as a `settings.`-prefixed key.
fn key_of(path: &serde_path_to_error::Path) -> String {
    let mut key = String::from("settings");
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key: k } => {
                key.push('.');
                key.push_str(&format_segment(k));
            }
            serde_path_to_error::Segment::Enum { variant } => {
                key.push('.');
                key.push_str(&format_segment(variant));
            }
            serde_path_to_error::Segment::Unknown => key.push_str(".?"),
        }
    }
    key
}

/// Turns a deserialization failure into an error naming the key.
fn path_error(err: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let key = key_of(err.path());
    let message = err.inner().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let hint = tail.trim_start_matches(',').trim();
            let reason = if hint.is_empty() {
                "unknown key".to_owned()
            } else {
                format!("unknown key ({hint})")
            };
            // serde_path_to_error usually has the unknown key in the path already.
            let named = matches!(
                err.path().iter().next_back(),
                Some(serde_path_to_error::Segment::Map { key: last }) if last == field
            );
            let key = if named {
                key
            } else {
                format!("{key}.{}", format_segment(field))
            };
            return Error::BadKey { key, reason };
        }
    }
    Error::Invalid {
        key,
        reason: message,
    }
}

/// Rules a type cannot express: argv[0] of bootstrap commands.
fn check_rules(settings: &Settings) -> Result<(), Error> {
    for (name, command) in settings.bootstrap_commands.iter().flatten() {
        for (i, argv) in command.commands.iter().flatten().enumerate() {
            let key = format!(
                "settings.bootstrap-commands.{}.commands[{i}]",
                format_segment(name.as_str())
            );
            match argv.first().map(String::as_str) {
                None => {
                    return Err(Error::Invalid {
                        key,
                        reason: "a command cannot be empty".to_owned(),
                    })
                }
                Some("apiclient") => {}
                Some(other) => {
                    return Err(Error::Invalid {
                        key,
                        reason: format!(
                            "{other:?} is not allowed: bootstrap commands must start with \"apiclient\""
                        ),
                    })
                }
            }
        }
    }
    // A container's containerd id is its kind and name (`host-admin`, `bootstrap-setup`),
    // and containerd refuses ids over 76 characters when the container is created: a
    // longer name is refused here, naming it, not by every start.
    let names = settings
        .host_containers
        .iter()
        .flatten()
        .map(|(name, _)| ("host-containers", "host-", name))
        .chain(
            settings
                .bootstrap_containers
                .iter()
                .flatten()
                .map(|(name, _)| ("bootstrap-containers", "bootstrap-", name)),
        );
    for (group, prefix, name) in names {
        if prefix.len() + name.as_str().len() > CONTAINERD_ID_MAX {
            return Err(Error::Invalid {
                key: format!("settings.{group}.{}", format_segment(name.as_str())),
                reason: format!(
                    "the name is {} characters; a {} name can have at most {} (its containerd \
                     id, \"{prefix}<name>\", at most {CONTAINERD_ID_MAX})",
                    name.as_str().len(),
                    group.trim_end_matches("-containers"),
                    CONTAINERD_ID_MAX - prefix.len()
                ),
            });
        }
    }
    // An argument cannot hold a NUL (execve ends it there): refused here, not when the
    // container or command fails to start.
    for (group, name, command) in container_commands(settings) {
        if let Some(i) = command.iter().flatten().position(|a| a.contains('\0')) {
            return Err(Error::Invalid {
                key: format!(
                    "settings.{group}.{}.command[{i}]",
                    format_segment(name.as_str())
                ),
                reason: "an argument cannot contain a NUL character".to_owned(),
            });
        }
    }
    for (name, command) in settings.bootstrap_commands.iter().flatten() {
        for (i, argv) in command.commands.iter().flatten().enumerate() {
            if let Some(j) = argv.iter().position(|a| a.contains('\0')) {
                return Err(Error::Invalid {
                    key: format!(
                        "settings.bootstrap-commands.{}.commands[{i}][{j}]",
                        format_segment(name.as_str())
                    ),
                    reason: "an argument cannot contain a NUL character".to_owned(),
                });
            }
        }
    }
    // keeld pulls host and bootstrap container images itself and verifies sha256
    // digests only (containerd's CRI, which pulls the other images, takes sha512 too).
    let sources = settings
        .host_containers
        .iter()
        .flatten()
        .map(|(name, c)| ("host-containers", name, &c.source))
        .chain(
            settings
                .bootstrap_containers
                .iter()
                .flatten()
                .map(|(name, c)| ("bootstrap-containers", name, &c.source)),
        );
    for (group, name, source) in sources {
        if source
            .as_ref()
            .is_some_and(|s| s.as_str().contains("@sha512:"))
        {
            return Err(Error::Invalid {
                key: format!("settings.{group}.{}.source", format_segment(name.as_str())),
                reason: "keeld pins images by sha256 digests only (@sha256:…)".to_owned(),
            });
        }
    }
    check_kubelet_rules(settings)?;
    check_ntp_options(settings)?;
    // runc refuses a soft limit above its hard limit (setrlimit: EINVAL), so every pod
    // would fail to start.
    let limits = settings
        .oci_defaults
        .as_ref()
        .and_then(|o| o.resource_limits.as_ref());
    for (name, limit) in limits.into_iter().flat_map(|l| l.iter()) {
        if let (Some(hard), Some(soft)) = (&limit.hard_limit, &limit.soft_limit) {
            if soft.value() > hard.value() {
                return Err(Error::Invalid {
                    key: format!(
                        "settings.oci-defaults.resource-limits.{}.soft-limit",
                        format_segment(name.as_str())
                    ),
                    reason: "the soft limit is above the hard limit (runc refuses it, and every pod would fail to start)".to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Every host and bootstrap container's `command`: its group, its name, the command.
fn container_commands(
    settings: &Settings,
) -> impl Iterator<Item = (&'static str, &Identifier, &Option<Vec<String>>)> {
    let host = settings.host_containers.iter().flatten();
    let bootstrap = settings.bootstrap_containers.iter().flatten();
    host.map(|(name, c)| ("host-containers", name, &c.command))
        .chain(bootstrap.map(|(name, c)| ("bootstrap-containers", name, &c.command)))
}

/// Rules for values coming in that an older keeld did not check, applied to each patch
/// ([`validate_patch`]: every value enters through one, user-data included). Each holds
/// for a patch alone (a scalar, or a list a patch replaces whole). Neither [`validate`]
/// nor a commit ([`validate_groups`]) applies them: both also read what is stored (a
/// rollback, a migration, the check at start; a commit checks its groups whole, and
/// keeld commits groups itself, such as a `once` bootstrap container switched off), and
/// settings an older keeld accepted must not block those.
fn check_incoming(settings: &Settings) -> Result<(), Error> {
    check_certificates(settings)?;
    check_registry_entries(settings)?;
    check_runs(settings)
}

/// Values that can only fail at run time: a command of no words (the container can never
/// start; unset, the image's own runs), a bootstrap timeout of zero (the container would
/// be killed as it starts), a time server URL naming port 0 (no server answers there).
fn check_runs(settings: &Settings) -> Result<(), Error> {
    for (group, name, command) in container_commands(settings) {
        if command.as_ref().is_some_and(Vec::is_empty) {
            return Err(Error::Invalid {
                key: format!("settings.{group}.{}.command", format_segment(name.as_str())),
                reason: "a command of no words runs nothing and the container could never \
                         start: leave it unset for the image's own"
                    .to_owned(),
            });
        }
    }
    for (name, container) in settings.bootstrap_containers.iter().flatten() {
        let zero = container
            .timeout
            .as_ref()
            .is_some_and(|t| t.to_std().is_ok_and(|d| d.is_zero()));
        if zero {
            return Err(Error::Invalid {
                key: format!(
                    "settings.bootstrap-containers.{}.timeout",
                    format_segment(name.as_str())
                ),
                reason: "a timeout of zero would stop the container as it starts: give how \
                         long it may run (\"10m\")"
                    .to_owned(),
            });
        }
    }
    let servers = settings
        .ntp
        .iter()
        .flat_map(|n| n.time_servers.iter().flatten());
    for (i, server) in servers.enumerate() {
        // As a number: `:00` is port 0 too.
        let port = crate::types::url_port(server.as_str()).and_then(|p| p.parse::<u16>().ok());
        if port == Some(0) {
            return Err(Error::Invalid {
                key: format!("settings.ntp.time-servers[{i}]"),
                reason: "port 0 is no port an NTP server answers on".to_owned(),
            });
        }
    }
    Ok(())
}

/// Mirrors and credentials that would never be used: neither containerd nor keeld's own
/// pulls look a registry up but by its exact host, so a mirror or credentials without
/// one, a mirror without an endpoint, or credentials for `*` do nothing. (A list is
/// replaced whole by a patch, so each entry holds for the patch alone.)
fn check_registry_entries(settings: &Settings) -> Result<(), Error> {
    let Some(registry) = settings.container_registry.as_ref() else {
        return Ok(());
    };
    let invalid = |key: String, reason: &str| Error::Invalid {
        key: format!("settings.container-registry.{key}"),
        reason: reason.to_owned(),
    };
    for (i, mirror) in registry.mirrors.iter().flat_map(|m| m.iter()).enumerate() {
        if mirror.registry.is_none() {
            return Err(invalid(
                format!("mirrors[{i}].registry"),
                "a mirror needs the registry it stands in for (a host, or \"*\" for every \
                 registry)",
            ));
        }
        if mirror.endpoint.as_ref().is_none_or(|e| e.is_empty()) {
            return Err(invalid(
                format!("mirrors[{i}].endpoint"),
                "a mirror needs at least one endpoint",
            ));
        }
    }
    // `parse` has moved `creds` into `credentials` already.
    let credentials: Vec<&RegistryCredential> =
        registry.credentials.iter().flat_map(|c| c.iter()).collect();
    for (i, credential) in credentials.iter().enumerate() {
        let host = credential.registry.as_ref().map(|r| r.as_str());
        // containerd's configuration holds one table per registry (a second would not be
        // TOML), and a second entry would be a guess at which one is meant. `docker.io`
        // and `registry-1.docker.io` are one registry: containerd pulls `docker.io`'s
        // images from the latter, and both render to its table.
        let same = |other: &&RegistryCredential| {
            let other = other.registry.as_ref().map(|r| r.as_str());
            host.is_some() && other.map(credential_registry) == host.map(credential_registry)
        };
        if let Some(first) = credentials[..i].iter().position(same) {
            let alias = if credentials[first].registry.as_ref().map(|r| r.as_str()) == host {
                ""
            } else {
                " (docker.io's images are pulled from registry-1.docker.io)"
            };
            return Err(invalid(
                format!("credentials[{i}].registry"),
                &format!(
                    "credentials[{first}] is for the same registry{alias}: one entry per \
                     registry"
                ),
            ));
        }
        match host {
            None => {
                return Err(invalid(
                    format!("credentials[{i}].registry"),
                    "credentials need the registry host they are for",
                ))
            }
            Some("*") => {
                return Err(invalid(
                    format!("credentials[{i}].registry"),
                    "credentials are looked up by a registry's exact host (by containerd and \
                     by keeld): credentials for \"*\" would never be used",
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The registry credentials for `host` are looked up under: Docker Hub's pull endpoint,
/// `registry-1.docker.io`, is `docker.io`, where image references name it. Keeld's own
/// pulls look credentials up by this name, and containerd-config renders both names to
/// the endpoint's table, so an entry under either name serves every pull from Docker Hub.
pub fn credential_registry(host: &str) -> &str {
    if host == "registry-1.docker.io" {
        "docker.io"
    } else {
        host
    }
}

/// Every certificate of every PEM bundle is an X.509 certificate as far as rustls reads
/// a trust anchor ([`PemBundle::x509_problem`]). A malformed one fails its consumer,
/// silently or loudly: `update-ca-trust` (p11-kit) drops the block, so the anchor is not
/// trusted and nothing says so; OpenSSL refuses the whole CA file it is in; the kubelet's
/// certificate loading (client-go's `ParseCertsPEM`) fails on it, and the kubelet with it.
fn check_certificates(settings: &Settings) -> Result<(), Error> {
    let pki = settings
        .pki
        .iter()
        .flat_map(|p| p.iter())
        .map(|(name, bundle)| {
            (
                format!("settings.pki.{}.data", format_segment(name.as_str())),
                &bundle.data,
            )
        });
    let k8s = settings.kubernetes.iter().flat_map(|k| {
        [
            ("cluster-certificate", &k.cluster_certificate),
            ("server-certificate", &k.server_certificate),
        ]
        .map(|(field, bundle)| (format!("settings.kubernetes.{field}"), bundle))
    });
    for (key, bundle) in pki.chain(k8s) {
        if let Some(reason) = bundle.as_ref().and_then(PemBundle::x509_problem) {
            return Err(Error::Invalid { key, reason });
        }
    }
    Ok(())
}

/// The `kubernetes.io` / `k8s.io` labels the kubelet may set on its own node
/// (`IsKubeletLabel` in Kubernetes' `kubelet/apis`): these names, and any label in the
/// `kubelet.kubernetes.io` and `node.kubernetes.io` namespaces or their subdomains.
const KUBELET_LABELS: [&str; 11] = [
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
];

/// Whether `namespace` is `domain` or a subdomain of it.
fn in_namespace(namespace: &str, domain: &str) -> bool {
    namespace == domain
        || namespace
            .strip_suffix(domain)
            .is_some_and(|sub| sub.ends_with('.'))
}

/// What the kubelet refuses at its start, though each value is well-formed: it would
/// exit at every restart and the node would never join.
fn check_kubelet_rules(settings: &Settings) -> Result<(), Error> {
    let Some(k8s) = settings.kubernetes.as_ref() else {
        return Ok(());
    };
    // The kubelet refuses `--node-labels` in the kubernetes.io and k8s.io namespaces
    // except its own ("unknown 'kubernetes.io' or 'k8s.io' labels specified").
    for (key, _) in k8s.node_labels.iter().flat_map(|l| l.iter()) {
        let key = key.as_str();
        let namespace = key.split_once('/').map_or("", |(ns, _)| ns);
        let kubernetes =
            in_namespace(namespace, "kubernetes.io") || in_namespace(namespace, "k8s.io");
        let kubelet_s = KUBELET_LABELS.contains(&key)
            || in_namespace(namespace, "kubelet.kubernetes.io")
            || in_namespace(namespace, "node.kubernetes.io");
        if kubernetes && !kubelet_s {
            return Err(Error::Invalid {
                key: format!("settings.kubernetes.node-labels.{}", format_segment(key)),
                reason: "the kubelet may not set labels in the kubernetes.io and k8s.io \
                         namespaces except its own (node.kubernetes.io/*, \
                         kubelet.kubernetes.io/*, kubernetes.io/hostname, …): it would refuse \
                         to start; set such a label through the Kubernetes API instead"
                    .to_owned(),
            });
        }
    }
    // The kubelet (Go's PEM reading) takes only CERTIFICATE blocks for its client CA and
    // serving certificate; OpenSSL's TRUSTED CERTIFICATE form is skipped there, and a
    // file of nothing else stops it ("does not contain any valid … certificates").
    let certificates = [
        ("cluster-certificate", &k8s.cluster_certificate),
        ("server-certificate", &k8s.server_certificate),
    ];
    for (field, bundle) in certificates {
        if bundle
            .as_ref()
            .is_some_and(|b| !b.decode().contains("-----BEGIN CERTIFICATE-----"))
        {
            return Err(Error::Invalid {
                key: format!("settings.kubernetes.{field}"),
                reason: "it holds no CERTIFICATE block: the kubelet skips TRUSTED \
                         CERTIFICATE blocks (OpenSSL's form) and would refuse to start; \
                         convert them with `openssl x509`"
                    .to_owned(),
            });
        }
    }
    // The kubelet reserves only these ("cannot reserve … resource" otherwise).
    let reserved = [
        ("kube-reserved", &k8s.kube_reserved),
        ("system-reserved", &k8s.system_reserved),
    ];
    for (field, resources) in reserved {
        for (name, _) in resources.iter().flat_map(|r| r.iter()) {
            if !["cpu", "memory", "ephemeral-storage", "pid"].contains(&name.as_str()) {
                return Err(Error::Invalid {
                    key: format!(
                        "settings.kubernetes.{field}.{}",
                        format_segment(name.as_str())
                    ),
                    reason: "the kubelet reserves only cpu, memory, ephemeral-storage and pid"
                        .to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Rules between two keys of one group, which hold only for the whole group: a patch may
/// set one key now and rely on the other being set already. Each one the settings break,
/// in order. Checked where new values come in, by a commit, on each group it changes
/// whole ([`validate_groups_over`]: only what the commit brings in); not by [`validate`],
/// which also reads back what is stored (a rollback, a migration, the check at start),
/// so that settings an older keeld accepted do not block those.
fn whole_rule_errors(settings: &Settings) -> Vec<Error> {
    let mut errors = Vec::new();
    let Some(k8s) = settings.kubernetes.as_ref() else {
        return errors;
    };
    // The kubelet refuses a soft eviction threshold without a grace period for its
    // signal ("grace period must be specified for the soft eviction threshold"); a grace
    // period without a threshold it ignores.
    for signal in k8s.eviction_soft.iter().flat_map(|s| s.keys()) {
        let has_grace = k8s
            .eviction_soft_grace_period
            .as_ref()
            .is_some_and(|g| g.contains_key(signal));
        if !has_grace {
            errors.push(Error::Invalid {
                key: format!(
                    "settings.kubernetes.eviction-soft-grace-period.{}",
                    format_segment(signal.as_str())
                ),
                reason: format!(
                    "settings.kubernetes.eviction-soft sets a threshold for {signal:?} but \
                     no grace period is given for it: the kubelet would refuse to start; \
                     set both in one transaction",
                    signal = signal.as_str()
                ),
            });
        }
    }
    // kubelet-config names a serving certificate and key only as a pair: one alone is
    // written to its file and never used (the kubelet serves with a self-signed one).
    let pair = |given: &str, missing: &str| Error::Invalid {
        key: format!("settings.kubernetes.{missing}"),
        reason: format!(
            "settings.kubernetes.{given} is set without {missing}: the kubelet serves with \
             its own certificate unless both are given; set both, or neither"
        ),
    };
    match (&k8s.server_certificate, &k8s.server_key) {
        (Some(_), None) => errors.push(pair("server-certificate", "server-key")),
        (None, Some(_)) => errors.push(pair("server-key", "server-certificate")),
        _ => {}
    }
    // The kubelet refuses a provider without `matchImages`, so credential-provider-config
    // leaves such a provider out: enabled, it would do nothing.
    for (name, provider) in k8s.credential_providers.iter().flat_map(|p| p.iter()) {
        let patterns = provider.image_patterns.as_ref().map_or(0, |p| p.len());
        if provider.enabled == Some(true) && patterns == 0 {
            errors.push(Error::Invalid {
                key: format!(
                    "settings.kubernetes.credential-providers.{}.image-patterns",
                    format_segment(name.as_str())
                ),
                reason: "an enabled credential provider needs at least one image pattern: \
                         the kubelet refuses a provider that matches no image"
                    .to_owned(),
            });
        }
    }
    errors
}

/// chrony's `server` options (chrony 4.3, Debian 12's; matched without regard to case,
/// as chrony does): those that take a value, and those that stand alone. chronyd
/// refuses to start on a server line with any other word, so time would not be kept at
/// all.
const CHRONY_OPTIONS_WITH_VALUE: [&str; 22] = [
    "minpoll",
    "maxsources",
    "maxpoll",
    "key",
    "certset",
    "maxdelay",
    "maxdelayratio",
    "maxdelaydevratio",
    "maxdelayquant",
    "mindelay",
    "asymmetry",
    "offset",
    "minsamples",
    "maxsamples",
    "filter",
    "polltarget",
    "port",
    "ntsport",
    "presend",
    "minstratum",
    "version",
    "extfield",
];
const CHRONY_FLAGS: [&str; 11] = [
    "iburst",
    "burst",
    "nts",
    "offline",
    "auto_offline",
    "prefer",
    "noselect",
    "trust",
    "require",
    "xleave",
    "copy",
];

/// `settings.ntp.options`: words of chrony's server line, read together in order (one
/// item may be `"minpoll 4"`, or two items `"minpoll"`, `"4"`).
fn check_ntp_options(settings: &Settings) -> Result<(), Error> {
    let Some(options) = settings.ntp.as_ref().and_then(|n| n.options.as_ref()) else {
        return Ok(());
    };
    let words = options
        .iter()
        .enumerate()
        .flat_map(|(i, option)| option.as_str().split(' ').map(move |w| (i, w)));
    let mut wants_value: Option<&str> = None;
    let mut last = 0;
    for (i, word) in words {
        last = i;
        if wants_value.take().is_some() {
            continue;
        }
        let lower = word.to_ascii_lowercase();
        if CHRONY_OPTIONS_WITH_VALUE.contains(&lower.as_str()) {
            wants_value = Some(word);
        } else if !CHRONY_FLAGS.contains(&lower.as_str()) {
            return Err(Error::Invalid {
                key: format!("settings.ntp.options[{i}]"),
                reason: format!(
                    "{word:?} is not an option of chrony's server directive (chronyd would \
                     refuse to start); known: {}, and {} with a value",
                    CHRONY_FLAGS.join(", "),
                    CHRONY_OPTIONS_WITH_VALUE.join(", ")
                ),
            });
        }
    }
    if let Some(option) = wants_value {
        return Err(Error::Invalid {
            key: format!("settings.ntp.options[{last}]"),
            reason: format!("chrony's {option:?} needs a value after it"),
        });
    }
    Ok(())
}

/// Deserializes `value` into the typed model, naming the failing key on error.
pub fn parse(value: &Value) -> Result<Settings, Error> {
    let mut settings: Settings = serde_path_to_error::deserialize(value).map_err(path_error)?;
    check_rules(&settings)?;
    normalize(&mut settings);
    Ok(settings)
}

/// Stores what Bottlerocket accepts under an older name under the current one:
/// `container-registry.creds` becomes `credentials` (a `creds` in a patch is newer than
/// the stored `credentials` it is merged with, so it wins).
fn normalize(settings: &mut Settings) {
    if let Some(registry) = settings.container_registry.as_mut() {
        if let Some(creds) = registry.creds.take() {
            registry.credentials = Some(creds);
        }
    }
}

/// Validates a complete settings value (no `settings` wrapper) and returns its canonical
/// JSON: absent fields omitted, map keys sorted, strings exactly as given.
pub fn validate(value: &Value) -> Result<Value, Error> {
    let settings = parse(value)?;
    serde_json::to_value(&settings).map_err(|e| Error::Invalid {
        key: "settings".to_owned(),
        reason: format!("cannot serialize settings: {e}"),
    })
}

/// Validates only the top-level groups named in `groups` of `candidate` and returns
/// their canonical JSON (groups absent from `candidate` are absent from the answer).
///
/// No rule of the model spans two groups, so when the other groups of `candidate` are
/// already valid (they come from a valid model), this is validating the whole model, at
/// a cost in proportion to what changed. Keep it so: a rule that spans groups must be
/// checked here too.
pub fn validate_groups(
    candidate: &Value,
    groups: &std::collections::BTreeSet<String>,
) -> Result<Value, Error> {
    // Empty live settings break no rule, so every break is the candidate's own.
    validate_groups_over(candidate, &Value::Object(serde_json::Map::new()), groups)
}

/// [`validate_groups`] for a commit over the live settings `live`: a rule between keys of
/// a group that `live` already breaks the same way does not refuse it, so that only what
/// the transaction brings in is refused. Settings an older keeld accepted (a serving
/// certificate without its key) must not block a commit that touches their group for
/// something else, keeld's own among them (the OS defaults a boot stages).
pub fn validate_groups_over(
    candidate: &Value,
    live: &Value,
    groups: &std::collections::BTreeSet<String>,
) -> Result<Value, Error> {
    let subset_of = |settings: &Value| -> Value {
        Value::Object(
            groups
                .iter()
                .filter_map(|g| Some((g.clone(), settings.get(g)?.clone())))
                .collect(),
        )
    };
    let subset = subset_of(candidate);
    let broken = whole_rule_errors(&parse(&subset)?);
    if !broken.is_empty() {
        // What the live groups break already; live settings that do not parse any more
        // (a model change) break nothing here.
        let already = parse(&subset_of(live))
            .map(|settings| whole_rule_errors(&settings))
            .unwrap_or_default();
        if let Some(new) = broken.into_iter().find(|e| !already.contains(e)) {
            return Err(new);
        }
    }
    validate(&subset)
}

/// Renames what a patch (no `settings` wrapper) gives under a key's older name to the
/// current one, as it is stored: `container-registry.creds` becomes `credentials`. Done
/// as the patch enters a transaction, so that its order among the transaction's patches
/// decides, as for any other key (merged as `creds`, a list given earlier would win over
/// a `credentials` given later, and a removal of `creds` would not remove it).
pub fn normalize_patch(patch: &mut Value) {
    let Some(registry) = patch
        .get_mut("container-registry")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let Some(creds) = registry.remove("creds") else {
        return;
    };
    // A list under the older name is the list; its removal removes the list, unless the
    // same patch gives the list under the current name (`validate_patch` refuses both
    // given as lists).
    if !creds.is_null() || !registry.contains_key("credentials") {
        registry.insert("credentials".to_owned(), creds);
    }
}

/// Validates a merge-patch (no `settings` wrapper): `null` members are removals and
/// must name a key the model knows; everything else must validate.
pub fn validate_patch(patch: &Value) -> Result<(), Error> {
    if !patch.is_object() {
        return Err(Error::Invalid {
            key: "settings".to_owned(),
            reason: "a settings patch must be a JSON object".to_owned(),
        });
    }
    let mut removals = Vec::new();
    let stripped = strip_nulls(patch, &mut vec!["settings".to_owned()], &mut removals);
    // `creds` is `credentials` under Bottlerocket's older name: one list, given once.
    if let Some(registry) = stripped.get("container-registry") {
        if registry.get("creds").is_some() && registry.get("credentials").is_some() {
            return Err(Error::Invalid {
                key: "settings.container-registry.creds".to_owned(),
                reason: "creds is credentials under its older name: set one of the two, \
                         not both in one patch"
                    .to_owned(),
            });
        }
    }
    for removal in removals {
        let known = KeyPath::from_segments(removal.clone())
            .and_then(|path| crate::schema::kind_at(&path))
            .is_some();
        if !known {
            let key = KeyPath::from_segments(removal.clone())
                .map_or_else(|| removal.join("."), |p| p.to_string());
            return Err(Error::BadKey {
                key,
                reason: "unknown key".to_owned(),
            });
        }
    }
    check_incoming(&parse(&stripped)?)
}

/// What of `settings` (complete, or a patch without its `null`s) only the rules for
/// incoming values refuse: `Ok` when [`validate`] refuses it too, or accepts it whole.
/// For checks that `validate` and [`validate_patch`] agree on everything else.
pub fn incoming_problem(settings: &Value) -> Result<(), Error> {
    match parse(settings) {
        Ok(settings) => check_incoming(&settings),
        Err(_) => Ok(()),
    }
}

/// Copies `value` without its `null` object members, recording their paths.
fn strip_nulls(value: &Value, path: &mut Vec<String>, removals: &mut Vec<Vec<String>>) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                path.push(k.clone());
                if v.is_null() {
                    removals.push(path.clone());
                } else {
                    out.insert(k.clone(), strip_nulls(v, path, removals));
                }
                path.pop();
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}
