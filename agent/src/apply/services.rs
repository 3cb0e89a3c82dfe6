//! `services.toml`: which services exist, their configuration files and restart commands,
//! and which settings affect which services.
//!
//! Owns parsing and querying that metadata; must not render or run anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// A service: the files it reads and how to make it pick up changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Service {
    #[serde(default)]
    pub configuration_files: Vec<String>,
    /// Each command is an argv, run without a shell.
    #[serde(default)]
    pub restart_commands: Vec<Vec<String>>,
    /// Its files take effect only at the next boot (kernel parameters): a change is
    /// reported as "reboot required".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reboot_required: bool,
}

/// A configuration file rendered from a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigurationFile {
    /// Where the file goes, relative to the render root.
    pub path: String,
    /// Template file name inside the templates directory.
    pub template_path: String,
    /// Octal mode, e.g. "0644".
    #[serde(default = "default_mode")]
    pub mode: String,
}

impl ConfigurationFile {
    /// The mode as permission bits; `check` made sure it parses.
    pub fn mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.mode, 8).unwrap_or(0o644)
    }
}

fn default_mode() -> String {
    "0644".to_owned()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServicesMeta {
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    #[serde(default)]
    pub configuration_files: BTreeMap<String, ConfigurationFile>,
    /// Settings key prefix (`settings.ntp`) → services it affects.
    #[serde(default)]
    pub affected_services: BTreeMap<String, Vec<String>>,
}

impl ServicesMeta {
    pub fn load(path: &Path) -> Result<Self, ServicesError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServicesError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ServicesError> {
        let meta: ServicesMeta = toml::from_str(text).map_err(|e| ServicesError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        meta.check().map_err(|message| ServicesError::Parse {
            path: path.to_owned(),
            message,
        })?;
        Ok(meta)
    }

    /// Cross-references must resolve: a typo here would silently skip a restart.
    fn check(&self) -> Result<(), String> {
        for (name, service) in &self.services {
            for file in &service.configuration_files {
                if !self.configuration_files.contains_key(file) {
                    return Err(format!(
                        "service {name:?} names unknown configuration file {file:?}"
                    ));
                }
            }
            if let Some(i) = service.restart_commands.iter().position(Vec::is_empty) {
                return Err(format!("service {name:?}: restart-commands[{i}] is empty"));
            }
        }
        for (prefix, services) in &self.affected_services {
            for service in services {
                if !self.services.contains_key(service) {
                    return Err(format!(
                        "affected-services {prefix:?} names unknown service {service:?}"
                    ));
                }
            }
        }
        for (name, file) in &self.configuration_files {
            if super::files::target_path(std::path::Path::new("/"), &file.path).is_none() {
                return Err(format!(
                    "configuration file {name:?}: path {:?} must stay under the render root",
                    file.path
                ));
            }
            if u32::from_str_radix(&file.mode, 8).map_or(true, |m| m > 0o7777) {
                return Err(format!(
                    "configuration file {name:?}: mode {:?} is not octal",
                    file.mode
                ));
            }
        }
        Ok(())
    }

    /// Services affected by one settings key: those listed for any prefix of it, on
    /// segment boundaries (`settings.ntp` covers `settings.ntp.time-servers`, not
    /// `settings.ntpx`).
    pub fn affected_by(&self, key: &str) -> BTreeSet<String> {
        self.affected_services
            .iter()
            .filter(|(prefix, _)| {
                key == prefix.as_str()
                    || key
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
                    || prefix
                        .strip_prefix(key)
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            .flat_map(|(_, services)| services.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SAMPLE: &str = r#"
[services.chronyd]
configuration-files = ["chrony-conf"]
restart-commands = [["/bin/systemctl", "try-restart", "chronyd"]]

[configuration-files.chrony-conf]
path = "etc/chrony.conf"
template-path = "chrony-conf"

[affected-services]
"settings.ntp" = ["chronyd"]
"#;

    #[test]
    fn affected_by_prefix_on_segment_boundary() {
        let meta = ServicesMeta::parse(Path::new("x"), SAMPLE).unwrap();
        assert!(meta
            .affected_by("settings.ntp.time-servers")
            .contains("chronyd"));
        assert!(meta.affected_by("settings.ntp").contains("chronyd"));
        assert!(meta.affected_by("settings").contains("chronyd"));
        assert!(meta.affected_by("settings.ntpx").is_empty());
    }

    #[test]
    fn dangling_references_are_refused() {
        let bad = SAMPLE.replace("[\"chronyd\"]\n", "[\"nope\"]\n");
        let err = ServicesMeta::parse(Path::new("x"), &bad).unwrap_err();
        assert!(
            err.to_string().contains("unknown service \"nope\""),
            "{err}"
        );
    }
}
