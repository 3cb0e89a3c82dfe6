//! The proxy rules: which proxy outbound HTTPS goes through, and which destinations go
//! direct.
//!
//! Owns: the one computation of the effective `https-proxy` URL and `no-proxy` list from
//! the settings. The rendered proxy environment file (containerd, kubelet), the
//! environment of every host and bootstrap container and keeld's own registry pulls all
//! use it, so they cannot disagree.
//!
//! Rules: without `settings.network.https-proxy` there is no proxy. A proxy written
//! without a scheme means `http://`. The no-proxy list is loopback and the instance
//! metadata address, then on a Kubernetes node the API server's host and the cluster
//! domain (as `.<domain>`, every name under it), then `settings.network.no-proxy`, each
//! entry once, first place kept.

use std::fmt;

use crate::model::{Kubernetes, Network};
use crate::types::redact_userinfo;
use crate::Settings;

/// Destinations that never go through the proxy: loopback and the instance metadata
/// service.
pub const ALWAYS_DIRECT: [&str; 3] = ["localhost", "127.0.0.1", "169.254.169.254"];

/// The effective proxy settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyRules {
    https_proxy: String,
    no_proxy: Vec<String>,
}

impl fmt::Debug for ProxyRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyRules")
            .field("https_proxy", &redact_userinfo(&self.https_proxy))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// A proxy address as a URL: `http://` is added when it has no scheme.
pub fn proxy_url(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// The host of the Kubernetes API server URL as a no-proxy entry (IPv6 without
/// brackets, no port).
fn api_server_host(kubernetes: &Kubernetes) -> Option<String> {
    let server = kubernetes.api_server.as_ref()?;
    // The model checked that it parses and has a host.
    let url = url::Url::parse(server.as_str()).ok()?;
    Some(match url.host()? {
        url::Host::Domain(name) => name.to_owned(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    })
}

impl ProxyRules {
    /// The rules of `settings`; `None` when no proxy is set.
    pub fn from_settings(settings: &Settings) -> Option<ProxyRules> {
        ProxyRules::from_parts(settings.network.as_ref(), settings.kubernetes.as_ref())
    }

    /// The rules from the two groups they depend on.
    pub fn from_parts(
        network: Option<&Network>,
        kubernetes: Option<&Kubernetes>,
    ) -> Option<ProxyRules> {
        let network = network?;
        let https_proxy = proxy_url(network.https_proxy.as_ref()?.as_str());
        let mut no_proxy: Vec<String> = Vec::new();
        let mut add = |entry: String| {
            if !no_proxy.contains(&entry) {
                no_proxy.push(entry);
            }
        };
        ALWAYS_DIRECT.iter().for_each(|e| add((*e).to_owned()));
        if let Some(kubernetes) = kubernetes {
            if let Some(host) = api_server_host(kubernetes) {
                add(host);
            }
            if let Some(domain) = &kubernetes.cluster_domain {
                add(format!(".{}", domain.as_str()));
            }
        }
        for entry in network.no_proxy.iter().flatten() {
            add(entry.as_str().to_owned());
        }
        Some(ProxyRules {
            https_proxy,
            no_proxy,
        })
    }

    /// The proxy URL (it may carry `user:password`: do not log it).
    pub fn https_proxy(&self) -> &str {
        &self.https_proxy
    }

    /// The destinations that go direct, in order.
    pub fn no_proxy(&self) -> &[String] {
        &self.no_proxy
    }

    /// The no-proxy list as `NO_PROXY` writes it: comma-separated.
    pub fn no_proxy_joined(&self) -> String {
        self.no_proxy.join(",")
    }

    /// `HTTPS_PROXY`, `https_proxy`, `NO_PROXY` and `no_proxy`, in that order.
    pub fn environment(&self) -> Vec<(String, String)> {
        let no_proxy = self.no_proxy_joined();
        vec![
            ("HTTPS_PROXY".to_owned(), self.https_proxy.clone()),
            ("https_proxy".to_owned(), self.https_proxy.clone()),
            ("NO_PROXY".to_owned(), no_proxy.clone()),
            ("no_proxy".to_owned(), no_proxy),
        ]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings(v: serde_json::Value) -> Settings {
        crate::model::parse(&v).unwrap()
    }

    #[test]
    fn no_proxy_without_a_proxy() {
        assert_eq!(
            ProxyRules::from_settings(&settings(serde_json::json!({}))),
            None
        );
        let only_no_proxy = settings(serde_json::json!({"network": {"no-proxy": ["a.example"]}}));
        assert_eq!(ProxyRules::from_settings(&only_no_proxy), None);
    }

    #[test]
    fn kubernetes_api_server_and_cluster_domain_go_direct() {
        let rules = ProxyRules::from_settings(&settings(serde_json::json!({
            "network": {"https-proxy": "proxy.example.com:3128",
                        "no-proxy": ["localhost", ".example.internal", "api.example.com"]},
            "kubernetes": {"api-server": "https://api.example.com:6443",
                           "cluster-domain": "cluster.local"}
        })))
        .unwrap();
        assert_eq!(rules.https_proxy(), "http://proxy.example.com:3128");
        assert_eq!(
            rules.no_proxy(),
            [
                "localhost",
                "127.0.0.1",
                "169.254.169.254",
                "api.example.com",
                ".cluster.local",
                ".example.internal"
            ]
        );
        assert_eq!(
            rules.environment()[2],
            ("NO_PROXY".to_owned(), rules.no_proxy_joined())
        );
    }

    #[test]
    fn ipv6_api_server_without_brackets_and_scheme_kept() {
        let rules = ProxyRules::from_settings(&settings(serde_json::json!({
            "network": {"https-proxy": "https://u:secret@proxy:443"},
            "kubernetes": {"api-server": "https://[fd00::1]:6443"}
        })))
        .unwrap();
        assert_eq!(rules.https_proxy(), "https://u:secret@proxy:443");
        assert_eq!(rules.no_proxy()[3], "fd00::1");
        assert!(!format!("{rules:?}").contains("secret"));
    }
}
