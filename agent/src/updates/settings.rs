//! What an update command takes from the live settings: `settings.updates.*` (Bottlerocket's
//! names) and the proxy of `settings.network`, read once when the command starts.
//!
//! Owns the defaults and what a missing or unusable value means: no repository URL is a
//! refusal naming the key; `version-lock` defaults to `latest`, `ignore-waves` to false,
//! `seed` to this host's own (chosen once, kept in the update record).

use settings_model::proxy::ProxyRules;
use settings_model::Settings;
use url::Url;

use super::manifest::VersionLock;
use super::repository::{base_url, RepositoryError};

/// The update settings of one command.
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    pub metadata: Url,
    pub targets: Url,
    pub lock: VersionLock,
    pub ignore_waves: bool,
    /// `settings.updates.seed`, if set.
    pub seed: Option<u32>,
    pub proxy: Option<ProxyRules>,
}

impl UpdateSettings {
    /// From the live settings (`GET /settings` form, no `settings` wrapper).
    pub fn from_live(live: &serde_json::Value) -> Result<UpdateSettings, RepositoryError> {
        // The live settings passed the model when committed.
        let settings: Settings = serde_json::from_value(live.clone()).map_err(|e| {
            RepositoryError::Settings(format!("the live settings cannot be read: {e}"))
        })?;
        let updates = settings.updates.clone().unwrap_or_default();
        let metadata = updates.metadata_base_url.as_ref().ok_or_else(|| {
            RepositoryError::Settings(
                "settings.updates.metadata-base-url is not set: this host has no update \
                 repository"
                    .to_owned(),
            )
        })?;
        let targets = updates.targets_base_url.as_ref().ok_or_else(|| {
            RepositoryError::Settings(
                "settings.updates.targets-base-url is not set: this host has no update \
                 repository"
                    .to_owned(),
            )
        })?;
        Ok(UpdateSettings {
            metadata: base_url("settings.updates.metadata-base-url", metadata.as_str())?,
            targets: base_url("settings.updates.targets-base-url", targets.as_str())?,
            lock: VersionLock::parse(updates.version_lock.as_ref().map(|v| v.as_str()))
                .map_err(RepositoryError::Settings)?,
            ignore_waves: updates.ignore_waves.unwrap_or(false),
            seed: updates.seed,
            proxy: ProxyRules::from_settings(&settings),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_settings_of_a_command_with_bottlerocket_defaults() {
        let live = json!({"updates": {
            "metadata-base-url": "updates.example.com/metadata",
            "targets-base-url": "https://updates.example.com/targets/"
        }});
        let s = UpdateSettings::from_live(&live).expect("settings");
        assert_eq!(s.metadata.as_str(), "http://updates.example.com/metadata/");
        assert_eq!(s.targets.as_str(), "https://updates.example.com/targets/");
        assert_eq!(s.lock, VersionLock::Latest);
        assert!(!s.ignore_waves);
        assert_eq!(s.seed, None);
        assert!(s.proxy.is_none());

        let live = json!({
            "updates": {"metadata-base-url": "https://u/m", "targets-base-url": "https://u/t",
                        "version-lock": "v1.2.3", "ignore-waves": true, "seed": 77},
            "network": {"https-proxy": "proxy:3128", "no-proxy": ["internal.example"]}
        });
        let s = UpdateSettings::from_live(&live).expect("settings");
        assert_eq!(s.lock, VersionLock::Exactly(semver::Version::new(1, 2, 3)));
        assert!(s.ignore_waves);
        assert_eq!(s.seed, Some(77));
        let proxy = s.proxy.expect("proxy");
        assert_eq!(proxy.https_proxy(), "http://proxy:3128");
        assert!(proxy.no_proxy().contains(&"internal.example".to_owned()));
    }

    #[test]
    fn a_host_without_a_repository_is_told_which_key_is_missing() {
        let err = UpdateSettings::from_live(&json!({})).expect_err("no repository");
        assert_eq!(
            err.to_string(),
            "settings.updates.metadata-base-url is not set: this host has no update repository"
        );
    }
}
