//! The update manifest (`manifest.json`, a signed target of the repository) and the choice
//! of an update from it.
//!
//! Owns Keel's update target format: Bottlerocket's manifest shape (`updates`, each with
//! `variant`, `arch`, `version`, `max_version`, `waves` and `images`), where Keel's
//! `images` name four targets instead of Bottlerocket's boot/root/hash partition images,
//! and each update carries the dm-verity root hash of its root image:
//!
//! ```json
//! {"updates": [{
//!    "variant": "keel-dev", "arch": "x86_64",
//!    "version": "1.1.0", "max_version": "1.1.0",
//!    "waves": {"0": "2030-01-01T00:00:00Z", "1024": "2030-01-02T00:00:00Z"},
//!    "images": {"root": "keel-dev-x86_64-1.1.0-root.erofs",
//!               "hash": "keel-dev-x86_64-1.1.0-root.verity",
//!               "kernel": "keel-dev-x86_64-1.1.0-vmlinuz",
//!               "initrd": "keel-dev-x86_64-1.1.0-initrd.img"},
//!    "root_hash": "<64 hex: veritysetup format's root hash of root over hash>"}],
//!  "migrations": {}}
//! ```
//!
//! The choice follows Bottlerocket's updater: updates of this variant and architecture
//! whose version is at most their `max_version` and whose wave has started for this
//! host's seed (unless `ignore-waves`), newest first; `version-lock = "latest"` takes the
//! newest one newer than the running version, a version names exactly that one. Unlike
//! Bottlerocket, an update older than the running version is chosen only when
//! `version-lock` names it (the operator's explicit allowance): a repository that lowers
//! `max_version` does not roll hosts back by itself. Must not fetch or write anything.

use std::collections::BTreeMap;

use semver::Version;
use serde::{Deserialize, Serialize};

/// Bottlerocket's seed range: waves are bounds in `0..=MAX_SEED`.
pub const MAX_SEED: u32 = 2048;

/// The targets of one update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Images {
    /// The root file system image (erofs), written to `keel-root-<slot>`.
    pub root: String,
    /// Its dm-verity hash tree (`veritysetup format` output), written to
    /// `keel-verity-<slot>`.
    pub hash: String,
    /// The kernel, written to `<esp>/keel/<slot>/vmlinuz`.
    pub kernel: String,
    /// The initrd, written to `<esp>/keel/<slot>/initrd.img`.
    pub initrd: String,
}

/// One update of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub variant: String,
    pub arch: String,
    pub version: Version,
    pub max_version: Version,
    /// Seed bound → the time that wave starts (RFC 3339).
    #[serde(default)]
    pub waves: BTreeMap<String, String>,
    pub images: Images,
    /// The dm-verity root hash of `images.root` over `images.hash`.
    pub root_hash: String,
}

/// The manifest. Bottlerocket's `migrations` are accepted and ignored: Keel's settings
/// migrations ship in the image (see `store/migrate.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub updates: Vec<Update>,
    #[serde(default, skip_serializing)]
    pub migrations: serde_json::Value,
}

/// Why the manifest cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest.json: {0}")]
pub struct ManifestError(pub String);

/// One wave: from which seed bound it starts at which time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wave {
    bound: u32,
    start: jiff::Timestamp,
}

impl Update {
    fn waves(&self) -> Result<Vec<Wave>, ManifestError> {
        let mut waves = self
            .waves
            .iter()
            .map(|(bound, start)| {
                let bound: u32 = bound.parse().map_err(|_| {
                    ManifestError(format!(
                        "update {}: wave bound {bound:?} is not a number",
                        self.version
                    ))
                })?;
                let start: jiff::Timestamp = start.parse().map_err(|e| {
                    ManifestError(format!(
                        "update {}: wave {bound} start {start:?} is not an RFC 3339 time: {e}",
                        self.version
                    ))
                })?;
                Ok(Wave { bound, start })
            })
            .collect::<Result<Vec<_>, _>>()?;
        waves.sort_by_key(|w| w.bound);
        Ok(waves)
    }

    /// When this update reaches a host with `seed`: `None` when it has (no waves, or its
    /// wave has started), else the start of its wave. Bottlerocket's rule: the host's wave
    /// starts at the time of the highest bound below its seed; a seed at or below the
    /// first bound is in the first wave, which has started.
    pub fn wave_start(
        &self,
        seed: u32,
        now: jiff::Timestamp,
    ) -> Result<Option<jiff::Timestamp>, ManifestError> {
        let waves = self.waves()?;
        let start = waves
            .iter()
            .filter(|w| w.bound < seed)
            .map(|w| w.start)
            .next_back();
        Ok(start.filter(|start| *start > now))
    }

    fn check(&self) -> Result<(), ManifestError> {
        if self.root_hash.len() != 64 || !self.root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ManifestError(format!(
                "update {}: root_hash {:?} is not 64 hex digits",
                self.version, self.root_hash
            )));
        }
        self.waves().map(|_| ())
    }
}

impl Manifest {
    /// Parses and checks the manifest's text.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError(e.to_string()))?;
        for update in &manifest.updates {
            update.check()?;
        }
        Ok(manifest)
    }
}

/// `settings.updates.version-lock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionLock {
    Latest,
    Exactly(Version),
}

impl VersionLock {
    /// From the setting's text (`latest`, `1.2.3`, `v1.2.3`); absent means `latest`.
    pub fn parse(text: Option<&str>) -> Result<VersionLock, String> {
        match text {
            None | Some("latest") => Ok(VersionLock::Latest),
            Some(text) => Version::parse(text.strip_prefix('v').unwrap_or(text))
                .map(VersionLock::Exactly)
                .map_err(|e| format!("settings.updates.version-lock {text:?}: {e}")),
        }
    }
}

/// What the host asks of the manifest.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    pub variant: &'a str,
    pub arch: &'a str,
    pub running: &'a Version,
    pub lock: &'a VersionLock,
    pub seed: u32,
    pub ignore_waves: bool,
    pub now: jiff::Timestamp,
}

/// The outcome of a choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Versions of the updates applicable to this host, newest first (Bottlerocket's
    /// `available_updates`).
    pub available: Vec<Version>,
    pub chosen: Option<Update>,
    /// Why this update, or why none, in the user's words.
    pub reason: String,
}

/// Chooses the update for `wanted` (see the module header).
pub fn choose(manifest: &Manifest, wanted: &Wanted<'_>) -> Result<Choice, ManifestError> {
    let mine: Vec<&Update> = manifest
        .updates
        .iter()
        .filter(|u| u.variant == wanted.variant && u.arch == wanted.arch)
        .collect();
    if mine.is_empty() {
        let mut others: Vec<String> = manifest
            .updates
            .iter()
            .map(|u| format!("{}/{} {}", u.variant, u.arch, u.version))
            .collect();
        others.sort();
        others.dedup();
        let listed = if others.is_empty() {
            "none".to_owned()
        } else {
            others.join(", ")
        };
        return Ok(Choice {
            available: Vec::new(),
            chosen: None,
            reason: format!(
                "the repository lists no update for variant {} on {} (it lists: {listed})",
                wanted.variant, wanted.arch
            ),
        });
    }
    let mut waiting: Vec<(Version, jiff::Timestamp)> = Vec::new();
    let mut applicable: Vec<&Update> = Vec::new();
    for update in mine {
        if update.version > update.max_version {
            continue;
        }
        match update.wave_start(wanted.seed, wanted.now)? {
            Some(start) if !wanted.ignore_waves => waiting.push((update.version.clone(), start)),
            _ => applicable.push(update),
        }
    }
    applicable.sort_by(|a, b| b.version.cmp(&a.version));
    let available = applicable.iter().map(|u| u.version.clone()).collect();
    let waiting_note = || {
        waiting
            .iter()
            .map(|(v, start)| {
                format!(
                    "{v} reaches this host's wave (seed {}) at {start}; \
                     settings.updates.ignore-waves=true installs it now",
                    wanted.seed
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (chosen, reason) = match wanted.lock {
        VersionLock::Latest => match applicable.iter().find(|u| u.version > *wanted.running) {
            Some(update) => (
                Some((*update).clone()),
                format!("{} is the newest update for this host", update.version),
            ),
            None => {
                let mut reason = format!("no update newer than the running {}", wanted.running);
                if let Some(newest) = applicable.first() {
                    reason.push_str(&format!(
                        " (the newest released to this host is {}; an older version is \
                         installed only when settings.updates.version-lock names it)",
                        newest.version
                    ));
                }
                if !waiting.is_empty() {
                    reason.push_str(&format!("; {}", waiting_note()));
                }
                (None, reason)
            }
        },
        VersionLock::Exactly(version) if version == wanted.running => (
            None,
            format!("settings.updates.version-lock is {version}, the running version"),
        ),
        VersionLock::Exactly(version) => match applicable.iter().find(|u| u.version == *version) {
            Some(update) if update.version < *wanted.running => (
                Some((*update).clone()),
                format!(
                    "{version} is older than the running {}: chosen because \
                     settings.updates.version-lock names it",
                    wanted.running
                ),
            ),
            Some(update) => (
                Some((*update).clone()),
                format!("{version} is the version settings.updates.version-lock names"),
            ),
            None => {
                let mut reason = format!(
                    "settings.updates.version-lock names {version}, which the repository does \
                     not release to this host"
                );
                if !waiting.is_empty() {
                    reason.push_str(&format!("; {}", waiting_note()));
                }
                (None, reason)
            }
        },
    };
    Ok(Choice {
        available,
        chosen,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(version: &str, max: &str, waves: &[(&str, &str)]) -> Update {
        Update {
            variant: "keel-dev".into(),
            arch: "x86_64".into(),
            version: Version::parse(version).expect("version"),
            max_version: Version::parse(max).expect("version"),
            waves: waves
                .iter()
                .map(|(b, t)| ((*b).to_owned(), (*t).to_owned()))
                .collect(),
            images: Images {
                root: format!("root-{version}"),
                hash: format!("hash-{version}"),
                kernel: format!("kernel-{version}"),
                initrd: format!("initrd-{version}"),
            },
            root_hash: "ab".repeat(32),
        }
    }

    fn wanted<'a>(running: &'a Version, lock: &'a VersionLock, seed: u32) -> Wanted<'a> {
        Wanted {
            variant: "keel-dev",
            arch: "x86_64",
            running,
            lock,
            seed,
            ignore_waves: false,
            now: "2030-01-01T12:00:00Z".parse().expect("time"),
        }
    }

    fn manifest(updates: Vec<Update>) -> Manifest {
        Manifest {
            updates,
            migrations: serde_json::Value::Null,
        }
    }

    #[test]
    fn latest_takes_the_newest_newer_update_of_this_variant_and_arch() {
        let mut other = update("9.0.0", "9.0.0", &[]);
        other.variant = "keel-other".into();
        let m = manifest(vec![
            update("1.0.0", "1.2.0", &[]),
            update("1.2.0", "1.2.0", &[]),
            update("1.1.0", "1.2.0", &[]),
            other,
        ]);
        let running = Version::new(1, 0, 0);
        let choice = choose(&m, &wanted(&running, &VersionLock::Latest, 100)).expect("choice");
        assert_eq!(
            choice.chosen.expect("chosen").version,
            Version::new(1, 2, 0)
        );
        assert_eq!(
            choice.available,
            vec![
                Version::new(1, 2, 0),
                Version::new(1, 1, 0),
                Version::new(1, 0, 0)
            ]
        );
    }

    #[test]
    fn an_older_version_is_chosen_only_when_version_lock_names_it() {
        let m = manifest(vec![update("1.0.0", "1.0.0", &[])]);
        let running = Version::new(1, 1, 0);
        let choice = choose(&m, &wanted(&running, &VersionLock::Latest, 1)).expect("choice");
        assert_eq!(choice.chosen, None);
        assert_eq!(
            choice.reason,
            "no update newer than the running 1.1.0 (the newest released to this host is \
             1.0.0; an older version is installed only when settings.updates.version-lock \
             names it)"
        );
        let lock = VersionLock::Exactly(Version::new(1, 0, 0));
        let choice = choose(&m, &wanted(&running, &lock, 1)).expect("choice");
        assert_eq!(
            choice.chosen.expect("chosen").version,
            Version::new(1, 0, 0)
        );
        assert!(
            choice.reason.contains("older than the running"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn waves_hold_an_update_back_until_the_hosts_wave_starts() {
        let waves = [
            ("0", "2030-01-01T00:00:00Z"),
            ("512", "2030-01-02T00:00:00Z"),
            ("1024", "2030-01-03T00:00:00Z"),
        ];
        let m = manifest(vec![update("1.1.0", "1.1.0", &waves)]);
        let running = Version::new(1, 0, 0);
        // Seed 0 and the seeds of the first bound's wave: started (their wave is the first).
        for seed in [0, 1, 512] {
            let choice = choose(&m, &wanted(&running, &VersionLock::Latest, seed)).expect("c");
            assert!(choice.chosen.is_some(), "seed {seed}: {}", choice.reason);
        }
        // Above 512: the wave starting 2030-01-02, not yet at 2030-01-01T12:00.
        let choice = choose(&m, &wanted(&running, &VersionLock::Latest, 600)).expect("choice");
        assert_eq!(choice.chosen, None);
        assert_eq!(
            choice.reason,
            "no update newer than the running 1.0.0; 1.1.0 reaches this host's wave (seed \
             600) at 2030-01-02T00:00:00Z; settings.updates.ignore-waves=true installs it now"
        );
        let mut ignoring = wanted(&running, &VersionLock::Latest, 2000);
        ignoring.ignore_waves = true;
        assert!(choose(&m, &ignoring).expect("choice").chosen.is_some());
    }

    #[test]
    fn a_variant_or_arch_the_repository_lacks_is_named() {
        let mut arm = update("1.1.0", "1.1.0", &[]);
        arm.arch = "aarch64".into();
        let m = manifest(vec![arm]);
        let running = Version::new(1, 0, 0);
        let choice = choose(&m, &wanted(&running, &VersionLock::Latest, 1)).expect("choice");
        assert_eq!(
            choice.reason,
            "the repository lists no update for variant keel-dev on x86_64 (it lists: \
             keel-dev/aarch64 1.1.0)"
        );
    }

    #[test]
    fn an_update_above_its_max_version_is_withdrawn() {
        let m = manifest(vec![update("1.2.0", "1.1.0", &[])]);
        let running = Version::new(1, 0, 0);
        let choice = choose(&m, &wanted(&running, &VersionLock::Latest, 1)).expect("choice");
        assert_eq!(choice.chosen, None);
        assert!(choice.available.is_empty());
    }

    #[test]
    fn malformed_manifests_are_refused_naming_the_update() {
        let bad = br#"{"updates":[{"variant":"v","arch":"x86_64","version":"1.0.0",
            "max_version":"1.0.0","waves":{"x":"2030-01-01T00:00:00Z"},
            "images":{"root":"r","hash":"h","kernel":"k","initrd":"i"},
            "root_hash":"00000000000000000000000000000000000000000000000000000000000000aa"}]}"#;
        assert_eq!(
            Manifest::parse(bad).expect_err("bad").to_string(),
            "manifest.json: update 1.0.0: wave bound \"x\" is not a number"
        );
        assert!(Manifest::parse(b"{\"updates\":[{}]}").is_err());
        assert_eq!(
            VersionLock::parse(Some("v1.2.3")),
            Ok(VersionLock::Exactly(Version::new(1, 2, 3)))
        );
    }
}
