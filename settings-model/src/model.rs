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
    DnsDomain, Duration, EnvName, EvictionSignal, Hostname, Identifier, ImageRef, IpAddress,
    IpOrIps, KernelModuleName, LabelKey, LabelValue, MemoryQuantity, Motd, NoProxyEntry, NumaNode,
    PemBundle, ProxyAddress, Quantity, RegistryAuth, RegistryHost, SecretBase64, SecretString,
    SingleLineString, SysctlKey, Taint, Threshold, TimeServer, Url,
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

/// The taints of one key: at most 3, one per effect (Kubernetes refuses two taints with
/// the same key and effect).
pub type KeyTaints = Limited<Vec<Taint>, 3>;

/// `settings.kubernetes.node-taints`: at most 64 keys (192 taints), which keeps the one
/// kubelet argument they go into under Linux's 128 KiB.
pub type NodeTaints = Limited<BTreeMap<LabelKey, KeyTaints>, 64>;

/// `kube-reserved` and `system-reserved`: at most 16 resources (the kubelet knows cpu,
/// memory, ephemeral-storage and pid).
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
pub type ProviderEnvironment = Limited<BTreeMap<EnvName, SingleLineString>, 32>;

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

/// `settings.container-registry.mirrors`: at most 32 mirrors.
pub type RegistryMirrors = Limited<Vec<RegistryMirror>, 32>;

/// `settings.container-registry.credentials`: at most 32 credentials.
pub type RegistryCredentials = Limited<Vec<RegistryCredential>, 32>;

/// `settings.kernel.sysctl`: at most 256 keys.
pub type Sysctls = Limited<BTreeMap<SysctlKey, SingleLineString>, 256>;

/// The values of one kernel or init parameter: at most 16.
pub type BootParameterValues = Limited<Vec<BootParamValue>, 16>;

/// `settings.boot.kernel-parameters` and `init-parameters`: at most 64 parameters each
/// (the kernel's own command line holds 2 KiB on x86-64 and arm64).
pub type BootParameters = Limited<BTreeMap<BootParamKey, BootParameterValues>, 64>;

/// `settings.pki`: at most 16 bundles (the OS's own CAs stay trusted; settings add to
/// them).
pub type PkiBundles = Limited<BTreeMap<Identifier, PkiBundle>, 16>;

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
    pub environment: Option<BTreeMap<EnvName, SingleLineString>>,
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
    pub environment: Option<BTreeMap<EnvName, SingleLineString>>,
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

/// The kubelet memory manager policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MemoryManagerPolicy {
    None,
    Static,
}

/// The kubelet CPU manager policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CpuManagerPolicy {
    None,
    Static,
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
    pub pod_infra_container_image: Option<ImageRef>,
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
    pub image_gc_high_threshold_percent: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_gc_low_threshold_percent: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_period: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_period_for_critical_pods: Option<Duration>,
}

/// Time synchronization.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Ntp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_servers: Option<TimeServers>,
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

/// Registry mirrors and credentials.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContainerRegistry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<RegistryMirrors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
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
    pub modules: Option<BTreeMap<KernelModuleName, KernelModule>>,
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
    Ok(())
}

/// Deserializes `value` into the typed model, naming the failing key on error.
pub fn parse(value: &Value) -> Result<Settings, Error> {
    let settings: Settings = serde_path_to_error::deserialize(value).map_err(path_error)?;
    check_rules(&settings)?;
    Ok(settings)
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
    let subset: serde_json::Map<String, Value> = groups
        .iter()
        .filter_map(|g| Some((g.clone(), candidate.get(g)?.clone())))
        .collect();
    validate(&Value::Object(subset))
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
    parse(&stripped).map(|_| ())
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
