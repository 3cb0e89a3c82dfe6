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
    /// Its files are the kernel's and init's command-line parameters: after an apply
    /// that changes them, keeld hands both rendered lines to the boot loader's entries
    /// (through `keel-slot-writer`), where the next boot reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_parameters: Option<BootParameterFiles>,
    /// Its settings are stored and validated but nothing on this host reads them (a
    /// Bottlerocket component Keel does not have): it has no files and no commands, and
    /// an apply lists its keys as "stored, no effect on this host".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_effect: bool,
}

/// The two configuration files of a `boot-parameters` service, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootParameterFiles {
    /// One line of kernel parameters.
    pub kernel: String,
    /// One line of init parameters (placed after `--`).
    pub init: String,
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
    /// Render one file per item of this settings list or map (`settings.x.y`); `path`
    /// then holds `{item}`, replaced by each item's name: as a whole directory segment
    /// (`/etc/containerd/certs.d/{item}/hosts.toml`), or as the file name before a fixed
    /// suffix (`/etc/kubernetes/static-pods/{item}.yaml`) for a reader that takes every
    /// file of one directory. An item whose file renders empty has no file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// For a list: the member of each item that names it. A map's items are named by
    /// their keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_name: Option<String>,
}

/// The placeholder in a multi-file `path`.
pub const ITEM: &str = "{item}";

/// The path segment the item `*` maps to (containerd's name for "any registry").
pub const DEFAULT_SEGMENT: &str = "_default";

/// One item of a multi-file's `for-each` list or map.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The item's name: the list member named by `item-name`, or the map key.
    pub name: String,
    /// The item's value (a list element or a map value).
    pub value: serde_json::Value,
    /// The path segment the name maps to, or why it cannot be one.
    pub segment: Result<String, String>,
}

impl ConfigurationFile {
    /// The mode as permission bits; `check` made sure it parses.
    pub fn mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.mode, 8).unwrap_or(0o644)
    }

    /// Whether this file is rendered once per item of a settings list or map.
    pub fn is_multi(&self) -> bool {
        self.for_each.is_some()
    }

    /// The concrete path of the item whose segment is `segment`.
    pub fn item_path(&self, segment: &str) -> String {
        self.path.replacen(ITEM, segment, 1)
    }

    /// Whether `{item}` names the file itself (`{item}.yaml`) rather than a directory.
    pub fn item_is_file(&self) -> bool {
        self.path
            .rsplit('/')
            .next()
            .is_some_and(|last| last.starts_with(ITEM))
    }

    /// The path around `{item}`: the directory before it (`/etc/containerd/certs.d`)
    /// and the rest after it (`hosts.toml`, or the file name's suffix `.yaml`), both
    /// without the separating slashes.
    pub fn pattern_parts(&self) -> Option<(&str, &str)> {
        let (before, after) = self.path.split_once(ITEM)?;
        Some((before.trim_end_matches('/'), after.trim_start_matches('/')))
    }

    /// The items of `for-each` in `settings` (the settings object without its wrapper),
    /// in order. A missing or null value has no items; a list element without its
    /// `item-name` member is skipped (it names nothing, as in registries.toml). When two
    /// items map to the same segment the first one wins. Fails when the value is neither
    /// a list nor a map, or a list's items cannot be named.
    pub fn items(&self, settings: &serde_json::Value) -> Result<Vec<Item>, String> {
        let Some(key) = &self.for_each else {
            return Ok(Vec::new());
        };
        let path = settings_model::KeyPath::parse(key).map_err(|e| e.to_string())?;
        let mut value = settings;
        for segment in path.segments().iter().skip(1) {
            match value.get(segment) {
                Some(inner) => value = inner,
                None => return Ok(Vec::new()),
            }
        }
        let mut items: Vec<Item> = Vec::new();
        let mut push = |name: String, value: &serde_json::Value| {
            let segment = item_segment(&name);
            if let Ok(s) = &segment {
                if items.iter().any(|i| i.segment.as_ref() == Ok(s)) {
                    tracing::warn!(for_each = %key, item = %name,
                        "a later item with the same name is ignored: the first one wins");
                    return;
                }
            }
            items.push(Item {
                name,
                value: value.clone(),
                segment,
            });
        };
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::Array(list) => {
                let Some(field) = &self.item_name else {
                    return Err(format!(
                        "{key} is a list: item-name must say which member names each item"
                    ));
                };
                for (i, element) in list.iter().enumerate() {
                    match element.get(field) {
                        None | Some(serde_json::Value::Null) => {}
                        Some(serde_json::Value::String(name)) => push(name.clone(), element),
                        Some(_) => {
                            return Err(format!("{key}[{i}].{field} is not a string"));
                        }
                    }
                }
            }
            serde_json::Value::Object(map) => {
                if let Some(field) = &self.item_name {
                    return Err(format!(
                        "{key} is a map: its keys name the items, item-name {field:?} \
                         applies to lists only"
                    ));
                }
                for (name, value) in map {
                    push(name.clone(), value);
                }
            }
            _ => return Err(format!("{key} is neither a list nor a map")),
        }
        Ok(items)
    }
}

/// The path segment for an item name: `*` is `_default` (as containerd names it); any
/// other name must be a host[:port] (letters, digits, `.`, `-`, `:`, `[`, `]`, and an
/// optional leading `*.`), so it can never be empty, `.`, `..`, hidden, or contain `/`
/// or NUL: the path cannot leave its directory.
pub fn item_segment(name: &str) -> Result<String, String> {
    if name == "*" {
        return Ok(DEFAULT_SEGMENT.to_owned());
    }
    let refuse = |why: &str| Err(format!("item name {name:?} {why}"));
    if name.is_empty() {
        return refuse("is empty");
    }
    if name.len() > 255 {
        return refuse("is longer than 255 bytes");
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if let Some(bad) = rest
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')))
    {
        return refuse(&format!(
            "is not a host[:port]: {bad:?} cannot be part of a path segment"
        ));
    }
    if rest.is_empty() || rest.starts_with('.') || rest.contains("..") {
        return refuse("is not a host[:port]");
    }
    Ok(name.to_owned())
}

/// The item name a path segment stands for: the inverse of [`item_segment`].
pub fn segment_item(segment: &str) -> String {
    if segment == DEFAULT_SEGMENT {
        "*".to_owned()
    } else {
        segment.to_owned()
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
            if let Some(files) = &service.boot_parameters {
                for file in [&files.kernel, &files.init] {
                    let plain = self
                        .configuration_files
                        .get(file)
                        .is_some_and(|f| !f.is_multi());
                    if !service.configuration_files.contains(file) || !plain {
                        return Err(format!(
                            "service {name:?}: boot-parameters names {file:?}, which is not \
                             one of its own single configuration files"
                        ));
                    }
                }
            }
            if let Some(i) = service.restart_commands.iter().position(Vec::is_empty) {
                return Err(format!("service {name:?}: restart-commands[{i}] is empty"));
            }
            let acts = !service.configuration_files.is_empty()
                || !service.restart_commands.is_empty()
                || service.boot_parameters.is_some()
                || service.reboot_required;
            if service.no_effect && acts {
                return Err(format!(
                    "service {name:?} is no-effect but has files, commands or reboot-required"
                ));
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
            check_multi(file).map_err(|e| format!("configuration file {name:?}: {e}"))?;
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

    /// Whether `key` (a leaf key) is stored with no effect on this host: the most specific
    /// `affected-services` prefix covering it lists only `no-effect` services. A key no
    /// prefix covers is not "no effect": something other than services (containers, the
    /// boot) may read it.
    pub fn has_no_effect(&self, key: &str) -> bool {
        let covering = self.affected_services.iter().filter(|(prefix, _)| {
            key == prefix.as_str()
                || key
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        });
        let Some((_, services)) = covering.max_by_key(|(prefix, _)| prefix.len()) else {
            return false;
        };
        !services.is_empty()
            && services
                .iter()
                .all(|s| self.services.get(s).is_some_and(|s| s.no_effect))
    }
}

/// `{item}` appears exactly once, as a whole segment that is not the file name, iff
/// `for-each` (a settings key) is set; `item-name` only with `for-each`.
fn check_multi(file: &ConfigurationFile) -> Result<(), String> {
    let count = file.path.matches(ITEM).count();
    let Some(key) = &file.for_each else {
        if file.item_name.is_some() {
            return Err("item-name is only meaningful with for-each".to_owned());
        }
        if count > 0 {
            return Err(format!(
                "path {:?} holds {ITEM} but for-each is not set",
                file.path
            ));
        }
        return Ok(());
    };
    match settings_model::KeyPath::parse(key) {
        Ok(path) if path.starts_with_settings() && path.segments().len() > 1 => {}
        _ => return Err(format!("for-each {key:?} is not a settings key")),
    }
    if file.item_name.as_deref() == Some("") {
        return Err("item-name is empty".to_owned());
    }
    if count != 1 {
        return Err(format!(
            "path {:?} must hold {ITEM} exactly once with for-each",
            file.path
        ));
    }
    let segments: Vec<&str> = file.path.split('/').collect();
    // The file form: `{item}` then a fixed suffix (`.yaml`) as the file name, which tells
    // this file's stale copies apart from whatever else shares the directory.
    if let Some(suffix) = segments.last().and_then(|last| last.strip_prefix(ITEM)) {
        if !suffix.starts_with('.') || suffix.len() < 2 {
            return Err(format!(
                "path {:?}: a file name {ITEM}<suffix> needs a suffix such as .yaml",
                file.path
            ));
        }
        return Ok(());
    }
    let Some(at) = segments.iter().position(|s| *s == ITEM) else {
        return Err(format!(
            "path {:?}: {ITEM} must be a whole path segment",
            file.path
        ));
    };
    // A fixed file name below the item's directory is what tells this file's stale
    // copies apart from whatever else shares the directory.
    if at + 1 == segments.len() || segments[at + 1..].iter().all(|s| s.is_empty()) {
        return Err(format!(
            "path {:?}: {ITEM} must name a directory, not the file itself",
            file.path
        ));
    }
    Ok(())
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
    fn no_effect_services_mark_their_keys_and_cannot_act() {
        let text = format!(
            "{SAMPLE}\"settings.metrics\" = [\"metrics\"]\n\"settings.ntp.extra\" = [\"metrics\"]\n\n[services.metrics]\nno-effect = true\n"
        );
        let meta = ServicesMeta::parse(Path::new("x"), &text).unwrap();
        assert!(meta.has_no_effect("settings.metrics.send-metrics"));
        assert!(meta.has_no_effect("settings.metrics"));
        assert!(meta.has_no_effect("settings.ntp.extra[0]"));
        assert!(!meta.has_no_effect("settings.ntp.time-servers"));
        assert!(!meta.has_no_effect("settings.metricsx"));
        assert!(!meta.has_no_effect("settings.motd"), "no prefix covers it");
        let json = serde_json::to_value(&meta.services["metrics"]).unwrap();
        assert_eq!(json["no-effect"], true);
        assert!(serde_json::to_value(&meta.services["chronyd"])
            .unwrap()
            .get("no-effect")
            .is_none());

        let acting = format!("{text}configuration-files = [\"chrony-conf\"]\n");
        let err = ServicesMeta::parse(Path::new("x"), &acting).unwrap_err();
        assert!(
            err.to_string().contains("is no-effect but has files"),
            "{err}"
        );
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

    const MULTI: &str = r#"
[services.registry]
configuration-files = ["hosts"]

[configuration-files.hosts]
path = "/etc/containerd/certs.d/{item}/hosts.toml"
template-path = "hosts"
for-each = "settings.container-registry.mirrors"
item-name = "registry"
"#;

    fn multi_error(path: &str, for_each: Option<&str>, item_name: Option<&str>) -> String {
        let mut text =
            format!("[configuration-files.hosts]\npath = {path:?}\ntemplate-path = \"hosts\"\n");
        if let Some(key) = for_each {
            text.push_str(&format!("for-each = {key:?}\n"));
        }
        if let Some(field) = item_name {
            text.push_str(&format!("item-name = {field:?}\n"));
        }
        match ServicesMeta::parse(Path::new("x"), &text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_item_may_name_the_file_before_a_suffix() {
        let text = MULTI.replace(
            "/etc/containerd/certs.d/{item}/hosts.toml",
            "/etc/kubernetes/static-pods/{item}.yaml",
        );
        let meta = ServicesMeta::parse(Path::new("x"), &text).unwrap();
        let file = &meta.configuration_files["hosts"];
        assert!(file.item_is_file());
        assert_eq!(
            file.pattern_parts(),
            Some(("/etc/kubernetes/static-pods", ".yaml"))
        );
        assert_eq!(
            file.item_path("web"),
            "/etc/kubernetes/static-pods/web.yaml"
        );
        let dirs = ServicesMeta::parse(Path::new("x"), MULTI).unwrap();
        assert!(!dirs.configuration_files["hosts"].item_is_file());
    }

    #[test]
    fn multi_files_parse_and_serialize_their_fields() {
        let meta = ServicesMeta::parse(Path::new("x"), MULTI).unwrap();
        let file = &meta.configuration_files["hosts"];
        assert!(file.is_multi());
        assert_eq!(
            file.pattern_parts(),
            Some(("/etc/containerd/certs.d", "hosts.toml"))
        );
        assert_eq!(
            file.item_path("_default"),
            "/etc/containerd/certs.d/_default/hosts.toml"
        );
        let json = serde_json::to_value(file).unwrap();
        assert_eq!(json["for-each"], "settings.container-registry.mirrors");
        assert_eq!(json["item-name"], "registry");
        let single = serde_json::to_value(
            &ServicesMeta::parse(Path::new("x"), SAMPLE)
                .unwrap()
                .configuration_files["chrony-conf"],
        )
        .unwrap();
        assert!(single.get("for-each").is_none(), "{single}");
    }

    #[test]
    fn multi_file_check_rules() {
        let each = Some("settings.container-registry.mirrors");
        let ok = "/etc/certs.d/{item}/hosts.toml";
        assert_eq!(multi_error(ok, each, Some("registry")), "");
        assert_eq!(multi_error(ok, each, None), "", "a map needs no item-name");
        assert_eq!(multi_error("/{item}/x", each, None), "");
        assert_eq!(multi_error("/etc/pods/{item}.yaml", each, None), "");
        for (path, for_each, item_name, expected) in [
            (ok, None, None, "holds {item} but for-each is not set"),
            (
                "/etc/x",
                None,
                Some("registry"),
                "item-name is only meaningful",
            ),
            (ok, None, Some("registry"), "item-name is only meaningful"),
            ("/etc/x", each, None, "exactly once"),
            ("/etc/{item}/{item}/x", each, None, "exactly once"),
            ("/etc/{item}.d/x", each, None, "whole path segment"),
            ("/etc/x-{item}/x", each, None, "whole path segment"),
            ("/etc/certs.d/{item}", each, None, "needs a suffix"),
            ("/etc/pods/{item}yaml", each, None, "needs a suffix"),
            ("/etc/pods/{item}.", each, None, "needs a suffix"),
            ("/etc/pods/x-{item}.yaml", each, None, "whole path segment"),
            ("/etc/{item}/{item}.yaml", each, None, "exactly once"),
            ("/etc/certs.d/{item}/", each, None, "must name a directory"),
            (
                ok,
                Some("container-registry.mirrors"),
                None,
                "not a settings key",
            ),
            (ok, Some("settings"), None, "not a settings key"),
            (ok, Some("settings..x"), None, "not a settings key"),
            (ok, each, Some(""), "item-name is empty"),
            (
                "/etc/../{item}/x",
                each,
                None,
                "must stay under the render root",
            ),
        ] {
            let err = multi_error(path, for_each, item_name);
            assert!(
                err.contains(expected),
                "{path} {for_each:?} {item_name:?}: {err:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn item_names_map_to_safe_segments() {
        assert_eq!(item_segment("*").unwrap(), "_default");
        for name in [
            "docker.io",
            "registry.example.com:5000",
            "[::1]:5000",
            "10.0.0.1",
            "*.example.com",
        ] {
            assert_eq!(item_segment(name).unwrap(), name);
            assert_eq!(segment_item(&item_segment(name).unwrap()), name);
        }
        assert_eq!(segment_item("_default"), "*");
        let long = "a".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/",
            "../etc",
            "a\0b",
            ".hidden",
            "a..b",
            "_default",
            "*.",
            "**",
            "*x",
            "a b",
            "a\\b",
            "x\n",
            long.as_str(),
        ] {
            assert!(item_segment(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn items_of_a_list_and_a_map() {
        let meta = ServicesMeta::parse(Path::new("x"), MULTI).unwrap();
        let file = &meta.configuration_files["hosts"];
        let settings = serde_json::json!({"container-registry": {"mirrors": [
            {"registry": "*", "endpoint": ["https://a.example"]},
            {"endpoint": ["https://unnamed.example"]},
            {"registry": "docker.io", "endpoint": ["https://b.example"]},
            {"registry": "docker.io", "endpoint": ["https://duplicate.example"]},
            {"registry": "bad/name"}
        ]}});
        let items = file.items(&settings).unwrap();
        let summary: Vec<(&str, Result<&str, ()>)> = items
            .iter()
            .map(|i| (i.name.as_str(), i.segment.as_deref().map_err(|_| ())))
            .collect();
        assert_eq!(
            summary,
            [
                ("*", Ok("_default")),
                ("docker.io", Ok("docker.io")),
                ("bad/name", Err(()))
            ]
        );
        assert_eq!(items[1].value["endpoint"][0], "https://b.example");
        assert!(file.items(&serde_json::json!({})).unwrap().is_empty());
        assert!(file
            .items(&serde_json::json!({"container-registry": {"mirrors": 3}}))
            .is_err());
        assert!(file
            .items(&serde_json::json!({"container-registry": {"mirrors": [{"registry": 1}]}}))
            .is_err());

        let mut map_file = file.clone();
        map_file.for_each = Some("settings.pki".to_owned());
        let pki = serde_json::json!({"pki": {"b.example": {"x": 1}, "a.example": {"x": 2}}});
        assert!(map_file.items(&pki).is_err(), "item-name on a map");
        map_file.item_name = None;
        let mut names: Vec<String> = map_file
            .items(&pki)
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.sort();
        assert_eq!(names, ["a.example", "b.example"]);
        assert!(map_file.items(&serde_json::json!({})).unwrap().is_empty());
    }
}
