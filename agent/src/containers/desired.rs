//! The containers the settings ask for, in the form the supervisors work with.
//!
//! Everything that ends up in a container's spec, user-data or image is in
//! [`DesiredContainer`]; its [`config_hash`](DesiredContainer::config_hash) is stored on
//! the containerd record, so a keeld restart can tell a running container that still
//! matches its settings (re-attach) from one that must be recreated. Registry mirrors
//! and credentials only change where images are fetched from, so they are not part of
//! it and changing them restarts nothing.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Serialize;
use settings_model::proxy::ProxyRules;
use settings_model::types::{Capability, CpuQuantity, EnvName, EnvValue, MemoryQuantity};
use settings_model::Settings;
use sha2::{Digest as _, Sha256};

use super::spec::Tier;
use super::status::ContainerKind;

/// One container as the settings describe it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesiredContainer {
    pub name: String,
    #[serde(skip)]
    pub kind: ContainerKind,
    #[serde(skip)]
    pub tier: Tier,
    pub tier_name: &'static str,
    pub source: String,
    /// Decoded; written to `<persistent dir>/user-data` with mode 0600.
    #[serde(skip)]
    pub user_data: Option<Vec<u8>>,
    pub user_data_digest: Option<String>,
    pub command: Option<Vec<String>>,
    /// The container's own `environment` settings, then the proxy variables.
    pub environment: Vec<(String, String)>,
    pub capabilities: Vec<String>,
    pub memory_limit_bytes: Option<i64>,
    pub cpu_limit_millicores: Option<u64>,
    /// Why the settings of this container could not be turned into a container; such a
    /// container is never created, and the reason is its status.
    #[serde(skip)]
    pub problem: Option<String>,
}

/// Why a desired container cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("{0}")]
    Settings(String),
    #[error("cannot compute the configuration hash: {0}")]
    Hash(#[from] serde_json::Error),
}

impl DesiredContainer {
    /// A digest of everything that shapes the running container; an error when the
    /// container cannot be made from its settings ([`DesiredContainer::problem`]).
    pub fn config_hash(&self) -> Result<String, DesiredError> {
        if let Some(problem) = &self.problem {
            return Err(DesiredError::Settings(problem.clone()));
        }
        let json = serde_json::to_vec(self)?;
        Ok(hex::encode(&Sha256::digest(&json)[..16]))
    }

    /// The containerd container ID: kind and name, so a host and a bootstrap container
    /// may share a name.
    pub fn id(&self) -> String {
        container_id(self.kind, &self.name)
    }
}

pub fn container_id(kind: ContainerKind, name: &str) -> String {
    format!("{}-{name}", kind.as_str())
}

/// The proxy variables every container gets when `settings.network.https-proxy` is set:
/// [`ProxyRules`], the same rules as the rendered proxy environment file and keeld's own
/// registry pulls.
pub fn proxy_environment(settings: &Settings) -> Vec<(String, String)> {
    ProxyRules::from_settings(settings).map_or_else(Vec::new, |rules| rules.environment())
}

/// The host containers that should run: the enabled ones. One without a source is
/// listed too, with that as its [`DesiredContainer::problem`]: it is never created, and
/// its status says why (the bootstrap containers' `fail_sourceless` does the same).
pub fn host_containers(settings: &Settings) -> BTreeMap<String, DesiredContainer> {
    let proxy = proxy_environment(settings);
    let mut out = BTreeMap::new();
    for (name, hc) in settings.host_containers.iter().flatten() {
        if hc.enabled != Some(true) {
            continue;
        }
        let source = hc.source.as_ref().map_or("", |s| s.as_str());
        let tier = if hc.superpowered == Some(true) {
            Tier::Superpowered
        } else {
            Tier::Host
        };
        let mut container = build(
            name.as_str(),
            ContainerKind::Host,
            tier,
            source,
            Parts {
                user_data: hc.user_data.as_ref().map(|b| b.as_str()),
                command: hc.command.as_ref(),
                environment: hc.environment.as_ref(),
                capabilities: hc.capabilities.as_ref(),
                memory_limit: hc.memory_limit.as_ref(),
                cpu_limit: hc.cpu_limit.as_ref(),
            },
            &proxy,
        );
        if hc.source.is_none() {
            container.problem = Some(format!(
                "settings.host-containers.{}.source is not set: there is no image to run",
                settings_model::key::format_segment(name.as_str())
            ));
        }
        out.insert(name.as_str().to_owned(), container);
    }
    out
}

/// Every bootstrap container with a source, whatever its mode, by name (the order they
/// run in).
pub fn bootstrap_containers(settings: &Settings) -> BTreeMap<String, DesiredContainer> {
    let proxy = proxy_environment(settings);
    let mut out = BTreeMap::new();
    for (name, bc) in settings.bootstrap_containers.iter().flatten() {
        let Some(source) = &bc.source else { continue };
        out.insert(
            name.as_str().to_owned(),
            build(
                name.as_str(),
                ContainerKind::Bootstrap,
                Tier::Bootstrap,
                source.as_str(),
                Parts {
                    user_data: bc.user_data.as_ref().map(|b| b.as_str()),
                    command: bc.command.as_ref(),
                    environment: bc.environment.as_ref(),
                    capabilities: bc.capabilities.as_ref(),
                    memory_limit: bc.memory_limit.as_ref(),
                    cpu_limit: bc.cpu_limit.as_ref(),
                },
                &proxy,
            ),
        );
    }
    out
}

struct Parts<'a> {
    user_data: Option<&'a str>,
    command: Option<&'a Vec<String>>,
    environment: Option<&'a BTreeMap<EnvName, EnvValue>>,
    capabilities: Option<&'a Vec<Capability>>,
    memory_limit: Option<&'a MemoryQuantity>,
    cpu_limit: Option<&'a CpuQuantity>,
}

fn build(
    name: &str,
    kind: ContainerKind,
    tier: Tier,
    source: &str,
    parts: Parts<'_>,
    proxy: &[(String, String)],
) -> DesiredContainer {
    // The model validated the base64 already; should it still fail to decode, the
    // container is not created and says why (never an empty user-data file).
    let (user_data, problem) = match parts
        .user_data
        .map(|b64| base64::engine::general_purpose::STANDARD.decode(b64))
        .transpose()
    {
        Ok(user_data) => (user_data, None),
        Err(e) => (None, Some(format!("user-data is not base64: {e}"))),
    };
    let user_data_digest = user_data.as_ref().map(|d| hex::encode(Sha256::digest(d)));
    let mut environment: Vec<(String, String)> = parts
        .environment
        .iter()
        .flat_map(|m| m.iter())
        .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
        .collect();
    // The container's own value wins over Keel's in either spelling: tools read
    // `no_proxy` before `NO_PROXY`, so setting one must also drop Keel's other one.
    let own = environment.len();
    for (k, v) in proxy {
        if !environment[..own]
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case(k))
        {
            environment.push((k.clone(), v.clone()));
        }
    }
    DesiredContainer {
        name: name.to_owned(),
        kind,
        tier,
        tier_name: tier.as_str(),
        source: source.to_owned(),
        user_data,
        user_data_digest,
        command: parts.command.cloned(),
        environment,
        capabilities: parts
            .capabilities
            .iter()
            .flat_map(|c| c.iter())
            .map(|c| c.with_cap_prefix())
            .collect(),
        memory_limit_bytes: parts.memory_limit.map(MemoryQuantity::bytes),
        cpu_limit_millicores: parts.cpu_limit.map(CpuQuantity::millicores),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(v: serde_json::Value) -> Settings {
        serde_json::from_value(v).expect("settings")
    }

    #[test]
    fn limits_are_the_models_conversions_and_shape_the_hash() {
        let with = |memory: &str, cpu: &str| {
            settings(serde_json::json!({"host-containers": {"a": {
                "enabled": true, "source": "x/y:1", "memory-limit": memory, "cpu-limit": cpu
            }}}))
        };
        let a = &host_containers(&with("512Mi", "500m"))["a"];
        assert_eq!(a.memory_limit_bytes, Some(512 << 20));
        assert_eq!(a.cpu_limit_millicores, Some(500));
        let b = &host_containers(&with("1e9", "1.5"))["a"];
        assert_eq!(b.memory_limit_bytes, Some(1_000_000_000));
        assert_eq!(b.cpu_limit_millicores, Some(1500));
        let other_memory = &host_containers(&with("256Mi", "500m"))["a"];
        assert_ne!(
            a.config_hash().expect("hash"),
            other_memory.config_hash().expect("hash")
        );
    }

    #[test]
    fn limits_the_model_refuses_never_reach_a_container() {
        // These used to be accepted and then silently dropped (no limit at all).
        for (key, value) in [
            ("memory-limit", "100m"),
            ("memory-limit", "5n"),
            ("memory-limit", "5u"),
            ("memory-limit", "0"),
            ("cpu-limit", "2Gi"),
            ("cpu-limit", "0"),
        ] {
            let patch = serde_json::json!({"host-containers": {"a": {key: value}}});
            let err = settings_model::validate_patch(&patch).expect_err(value);
            assert_eq!(
                err.key(),
                Some(format!("settings.host-containers.a.{key}").as_str())
            );
        }
    }

    #[test]
    fn undecodable_user_data_is_a_problem_not_an_empty_file() {
        let desired = build(
            "a",
            ContainerKind::Host,
            Tier::Host,
            "x/y:1",
            Parts {
                user_data: Some("%%%"),
                command: None,
                environment: None,
                capabilities: None,
                memory_limit: None,
                cpu_limit: None,
            },
            &[],
        );
        assert_eq!(desired.user_data, None);
        let err = desired
            .config_hash()
            .expect_err("no hash for a broken container");
        assert!(err.to_string().contains("user-data"), "{err}");
    }

    #[test]
    fn enabled_host_containers_only() {
        let s = settings(serde_json::json!({
            "host-containers": {
                "admin": {"enabled": true, "superpowered": true, "source": "oci-archive:/a.tar",
                          "user-data": "aGVsbG8=", "environment": {"A": "1"}, "capabilities": ["NET_ADMIN"]},
                "control": {"enabled": false, "source": "x/y"},
                "nosource": {"enabled": true}
            },
            "network": {"https-proxy": "proxy:3128", "no-proxy": ["example.com"]}
        }));
        let desired = host_containers(&s);
        assert_eq!(desired.keys().collect::<Vec<_>>(), ["admin", "nosource"]);
        // Enabled without an image: listed, never created, and its status says why.
        let nosource = &desired["nosource"];
        assert_eq!(
            nosource.problem.as_deref(),
            Some("settings.host-containers.nosource.source is not set: there is no image to run")
        );
        assert!(nosource.config_hash().is_err());
        let admin = &desired["admin"];
        assert_eq!(admin.problem, None);
        assert_eq!(admin.tier, Tier::Superpowered);
        assert_eq!(admin.user_data.as_deref(), Some(&b"hello"[..]));
        assert_eq!(admin.capabilities, ["CAP_NET_ADMIN"]);
        assert_eq!(admin.environment[0], ("A".into(), "1".into()));
        assert!(admin.environment.contains(&(
            "NO_PROXY".into(),
            "localhost,127.0.0.1,169.254.169.254,example.com".into()
        )));
        assert_eq!(admin.id(), "host-admin");
    }

    #[test]
    fn a_containers_own_proxy_variable_replaces_keels_in_both_spellings() {
        let s = settings(serde_json::json!({
            "host-containers": {"a": {"enabled": true, "source": "x/y:1",
                                      "environment": {"NO_PROXY": "mine.example.com"}}},
            "network": {"https-proxy": "proxy:3128", "no-proxy": ["example.com"]}
        }));
        let env = &host_containers(&s)["a"].environment;
        let no_proxy: Vec<&(String, String)> = env
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("no_proxy"))
            .collect();
        assert_eq!(
            no_proxy,
            [&("NO_PROXY".to_owned(), "mine.example.com".to_owned())]
        );
        // The proxy itself still comes from the settings, in both spellings.
        assert!(env.iter().any(|(k, _)| k == "HTTPS_PROXY"));
        assert!(env.iter().any(|(k, _)| k == "https_proxy"));
    }

    #[test]
    fn hash_follows_what_shapes_the_container() {
        let base =
            serde_json::json!({"host-containers": {"a": {"enabled": true, "source": "x/y:1"}}});
        let mut changed = base.clone();
        changed["host-containers"]["a"]["user-data"] = "eA==".into();
        let with_registry = serde_json::json!({
            "host-containers": {"a": {"enabled": true, "source": "x/y:1"}},
            "container-registry": {"mirrors": [{"registry": "docker.io", "endpoint": ["https://m.example.com"]}]}
        });
        let h = |v: &serde_json::Value| {
            host_containers(&settings(v.clone()))["a"]
                .config_hash()
                .expect("hash")
        };
        assert_ne!(h(&base), h(&changed));
        assert_eq!(h(&base), h(&with_registry));
    }
}
