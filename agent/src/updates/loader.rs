//! systemd-boot loader entries for the two slots, with boot counting: which entry the
//! boot loader will pick, writing the entry that makes a staged slot the next boot, and
//! removing it again.
//!
//! Owns the ESP layout the image follows: each slot's kernel and initrd at
//! `<esp>/keel/<slot>/vmlinuz` and `<esp>/keel/<slot>/initrd.img`, its entry at
//! `<esp>/loader/entries/keel-<slot>[+LEFT[-DONE]].conf`. The boot loader renames a
//! counted entry at each try (`+3` → `+2-1` …); `systemd-bless-boot.service` drops the
//! counter once the boot reaches `boot-complete.target` (the image orders it after Keel's
//! `configured`); an entry with no tries left is "bad" and sorted after every other, so the
//! previous slot boots again: that is the rollback.
//!
//! Why every write order is safe against a power cut (see also `durable.rs`):
//! - preparing a slot first removes its entry ([`EspLayout::invalidate`]), durably, before
//!   a byte of its partitions changes: from then on no entry names a slot being written,
//!   and the running slot's entry is the only boot choice;
//! - the kernel and initrd are replaced whole before any entry names them;
//! - activation writes one new file (`keel-<slot>+<tries>.conf`, the highest `version` of
//!   all Keel entries, so systemd-boot sorts it first); until its rename is durable the
//!   boot loader sees no such entry and boots the running slot; after, it boots the new
//!   slot with `tries` attempts, then falls back;
//! - deactivation removes that file: the running slot is again the only choice.
//!
//! Must not touch anything under the ESP but `keel/<slot>/` and `loader/entries/keel-*`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::durable;
use super::slots::{Part, Slot};

/// The `sort-key` of Keel's entries: systemd-boot sorts entries with a sort key by it,
/// then by `version`, newest first.
pub const SORT_KEY: &str = "keel";
/// The boot files of a slot on the ESP.
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
/// Longest loader entry read (they are a few hundred bytes).
const MAX_ENTRY_BYTES: u64 = 64 * 1024;

/// Why the ESP could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("ESP {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("slot {slot} has no {file} on the ESP ({path}): prepare the update first")]
    MissingBootFile {
        slot: Slot,
        file: &'static str,
        path: PathBuf,
    },
    #[error(
        "the running slot {slot} booted from a loader entry that is not marked good yet \
         ({file}): the boot has not completed, so the other slot is still its fallback and \
         may not be overwritten; try again once the host is configured"
    )]
    RunningNotBlessed { slot: Slot, file: String },
}

/// A Keel loader entry found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// The file name, with its boot counter.
    pub file: String,
    pub slot: Slot,
    /// Tries left (`+LEFT`); `None` for an entry without a counter (blessed or never
    /// counted).
    pub tries_left: Option<u32>,
    /// Tries done (`-DONE`).
    pub tries_done: Option<u32>,
    /// The entry's `version` (its order among Keel's entries).
    pub sort_version: Option<u64>,
    /// The Keel version the slot holds (`# keel-os-version` line), when written by keeld.
    pub os_version: Option<String>,
    /// `keel.roothash=` of its options.
    pub root_hash: Option<String>,
}

impl EntryInfo {
    /// Whether systemd-boot considers it bad (no tries left): sorted last, chosen only
    /// when nothing else is left.
    pub fn is_bad(&self) -> bool {
        self.tries_left == Some(0)
    }

    /// Whether it still counts tries (not yet blessed).
    pub fn is_counting(&self) -> bool {
        self.tries_left.is_some()
    }
}

/// Splits `keel-b+2-1.conf` into the slot and the counter; `None` for other files.
pub fn parse_entry_name(file: &str) -> Option<(Slot, Option<u32>, Option<u32>)> {
    let stem = file.strip_suffix(".conf")?;
    let (id, counter) = match stem.split_once('+') {
        Some((id, counter)) => (id, Some(counter)),
        None => (stem, None),
    };
    let slot = Slot::parse(id.strip_prefix("keel-")?)?;
    let (left, done) = match counter {
        None => (None, None),
        Some(counter) => {
            let (left, done) = match counter.split_once('-') {
                Some((left, done)) => (left, Some(done.parse().ok()?)),
                None => (counter, None),
            };
            (Some(left.parse().ok()?), done)
        }
    };
    Some((slot, left, done))
}

/// What to write into a new entry.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    pub slot: Slot,
    pub os_version: &'a str,
    pub root_hash: &'a str,
    pub sort_version: u64,
    /// Kernel options beyond Keel's own (console flags…), carried over from the running
    /// slot's entry.
    pub extra_options: &'a str,
}

/// The options line of a slot: Keel's keys, then `extra`.
pub fn options_line(slot: Slot, root_hash: &str, extra: &str) -> String {
    let mut line = format!(
        "keel.slot={slot} keel.roothash={root_hash} keel.root=PARTLABEL={} \
         keel.verity=PARTLABEL={}",
        Part::Root.label(slot),
        Part::Hash.label(slot)
    );
    if !extra.trim().is_empty() {
        line.push(' ');
        line.push_str(extra.trim());
    }
    line
}

/// The text of a loader entry.
pub fn render_entry(entry: &NewEntry<'_>) -> String {
    let slot = entry.slot;
    format!(
        "# Written by keeld (updates): slot {slot}, Keel {version}.\n\
         # keel-os-version {version}\n\
         title Keel {version} (slot {slot})\n\
         sort-key {SORT_KEY}\n\
         version {sort}\n\
         linux /keel/{slot}/{KERNEL}\n\
         initrd /keel/{slot}/{INITRD}\n\
         options {options}\n",
        version = entry.os_version,
        sort = entry.sort_version,
        options = options_line(slot, entry.root_hash, entry.extra_options),
    )
}

/// The options of an entry's text other than Keel's own keys.
pub fn extra_options(entry_text: &str) -> String {
    entry_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("options"))
        .flat_map(str::split_ascii_whitespace)
        .filter(|w| !w.starts_with("keel."))
        .collect::<Vec<_>>()
        .join(" ")
}

fn entry_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let l = l.trim();
        let rest = l.strip_prefix(key)?;
        rest.starts_with(char::is_whitespace).then(|| rest.trim())
    })
}

/// The ESP as the updates see it.
#[derive(Debug, Clone)]
pub struct EspLayout {
    pub esp: PathBuf,
}

impl EspLayout {
    pub fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader/entries")
    }

    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.esp.join("keel").join(slot.as_str())
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
        move |source| LoaderError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Keel's entries, in file-name order.
    pub fn entries(&self) -> Result<Vec<(EntryInfo, String)>, LoaderError> {
        let dir = self.entries_dir();
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&dir)(e)),
        };
        let mut found = Vec::new();
        for item in listing {
            let item = item.map_err(Self::io(&dir))?;
            let file = item.file_name().to_string_lossy().into_owned();
            let Some((slot, tries_left, tries_done)) = parse_entry_name(&file) else {
                continue;
            };
            let path = item.path();
            let bytes = durable::read_bounded(&path, MAX_ENTRY_BYTES).map_err(Self::io(&path))?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let root_hash = entry_field(&text, "options")
                .and_then(|o| super::slots::cmdline_value(o, "keel.roothash").map(str::to_owned));
            let info = EntryInfo {
                file,
                slot,
                tries_left,
                tries_done,
                sort_version: entry_field(&text, "version").and_then(|v| v.parse().ok()),
                os_version: entry_field(&text, "# keel-os-version").map(str::to_owned),
                root_hash,
            };
            found.push((info, text));
        }
        found.sort_by(|a, b| a.0.file.cmp(&b.0.file));
        Ok(found)
    }

    /// Removes every entry of `slot` (durably): from now on no entry names it. Answers
    /// the files removed.
    pub fn invalidate(&self, slot: Slot) -> Result<Vec<String>, LoaderError> {
        let mut removed = Vec::new();
        for (entry, _) in self.entries()? {
            if entry.slot == slot {
                let path = self.entries_dir().join(&entry.file);
                durable::remove(&path).map_err(Self::io(&path))?;
                removed.push(entry.file);
            }
        }
        Ok(removed)
    }

    /// Refuses when the running slot booted from an entry still counting tries: the boot
    /// has not been blessed, so the other slot's entry is its fallback.
    pub fn check_running_blessed(&self, running: Slot) -> Result<(), LoaderError> {
        match self
            .entries()?
            .into_iter()
            .find(|(e, _)| e.slot == running && e.is_counting())
        {
            Some((entry, _)) => Err(LoaderError::RunningNotBlessed {
                slot: running,
                file: entry.file,
            }),
            None => Ok(()),
        }
    }

    /// Writes the entry that makes `entry.slot` the next boot with `tries` attempts.
    /// Requires the slot's kernel and initrd on the ESP; replaces any older entry of the
    /// slot (the new one first: at no point is there no entry where one was).
    pub fn activate(&self, mut entry: NewEntry<'_>, tries: u32) -> Result<String, LoaderError> {
        for file in [KERNEL, INITRD] {
            let path = self.slot_dir(entry.slot).join(file);
            if !path.is_file() {
                return Err(LoaderError::MissingBootFile {
                    slot: entry.slot,
                    file,
                    path,
                });
            }
        }
        let existing = self.entries()?;
        let highest = existing
            .iter()
            .filter_map(|(e, _)| e.sort_version)
            .max()
            .unwrap_or(0);
        entry.sort_version = entry.sort_version.max(highest + 1);
        let file = format!("keel-{}+{tries}.conf", entry.slot);
        let dir = self.entries_dir();
        std::fs::create_dir_all(&dir).map_err(Self::io(&dir))?;
        let path = dir.join(&file);
        durable::replace(&path, render_entry(&entry).as_bytes()).map_err(Self::io(&path))?;
        for (old, _) in existing {
            if old.slot == entry.slot && old.file != file {
                let path = dir.join(&old.file);
                durable::remove(&path).map_err(Self::io(&path))?;
            }
        }
        Ok(file)
    }

    /// The options of the running slot's entry beyond Keel's own keys (console flags the
    /// image set), or of the kernel command line when no entry names the running slot.
    pub fn carried_options(&self, running: Slot, cmdline: &str) -> Result<String, LoaderError> {
        if let Some((_, text)) = self.entries()?.into_iter().find(|(e, _)| e.slot == running) {
            return Ok(extra_options(&text));
        }
        // systemd-boot adds initrd= for the EFI stub; BOOT_IMAGE comes from other loaders.
        Ok(cmdline
            .split_ascii_whitespace()
            .filter(|w| {
                !w.starts_with("keel.")
                    && !w.starts_with("initrd=")
                    && !w.starts_with("BOOT_IMAGE=")
            })
            .collect::<Vec<_>>()
            .join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp() -> (tempfile::TempDir, EspLayout) {
        let dir = tempfile::tempdir().expect("tempdir");
        let esp = EspLayout {
            esp: dir.path().to_owned(),
        };
        std::fs::create_dir_all(esp.entries_dir()).expect("mkdir");
        (dir, esp)
    }

    fn boot_files(esp: &EspLayout, slot: Slot) {
        std::fs::create_dir_all(esp.slot_dir(slot)).expect("mkdir");
        for f in [KERNEL, INITRD] {
            std::fs::write(esp.slot_dir(slot).join(f), b"x").expect("write");
        }
    }

    #[test]
    fn entry_names_carry_the_boot_counter() {
        assert_eq!(parse_entry_name("keel-a.conf"), Some((Slot::A, None, None)));
        assert_eq!(
            parse_entry_name("keel-b+3.conf"),
            Some((Slot::B, Some(3), None))
        );
        assert_eq!(
            parse_entry_name("keel-b+0-3.conf"),
            Some((Slot::B, Some(0), Some(3)))
        );
        for other in [
            "debian.conf",
            "keel-c.conf",
            "keel-b+x.conf",
            "keel-b.conf.tmp",
        ] {
            assert_eq!(parse_entry_name(other), None, "{other}");
        }
    }

    #[test]
    fn activation_writes_a_counted_entry_sorted_first_with_the_carried_options() {
        let (_dir, esp) = esp();
        std::fs::write(
            esp.entries_dir().join("keel-a.conf"),
            "title Keel 1.0.0\nsort-key keel\nversion 1\nlinux /keel/a/vmlinuz\n\
             initrd /keel/a/initrd.img\noptions keel.slot=a keel.roothash=aa \
             keel.root=PARTLABEL=keel-root-a keel.verity=PARTLABEL=keel-verity-a console=ttyS0\n",
        )
        .expect("write");
        boot_files(&esp, Slot::B);
        let extra = esp.carried_options(Slot::A, "").expect("options");
        assert_eq!(extra, "console=ttyS0");
        let file = esp
            .activate(
                NewEntry {
                    slot: Slot::B,
                    os_version: "1.1.0",
                    root_hash: "bb",
                    sort_version: 0,
                    extra_options: &extra,
                },
                3,
            )
            .expect("activate");
        assert_eq!(file, "keel-b+3.conf");
        let text = std::fs::read_to_string(esp.entries_dir().join(&file)).expect("read");
        assert!(text.contains("\nversion 2\n"), "{text}");
        assert!(text.contains("\nsort-key keel\n"), "{text}");
        assert!(
            text.contains("linux /keel/b/vmlinuz\ninitrd /keel/b/initrd.img\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "options keel.slot=b keel.roothash=bb keel.root=PARTLABEL=keel-root-b \
                 keel.verity=PARTLABEL=keel-verity-b console=ttyS0\n"
            ),
            "{text}"
        );
        let entries = esp.entries().expect("entries");
        let b = &entries
            .iter()
            .find(|(e, _)| e.slot == Slot::B)
            .expect("b")
            .0;
        assert_eq!(b.tries_left, Some(3));
        assert_eq!(b.os_version.as_deref(), Some("1.1.0"));
        assert_eq!(b.root_hash.as_deref(), Some("bb"));
        // Deactivation (invalidate) removes it, and only it.
        assert_eq!(esp.invalidate(Slot::B).expect("invalidate"), vec![file]);
        assert_eq!(esp.entries().expect("entries").len(), 1);
    }

    #[test]
    fn activation_needs_the_slots_kernel_and_initrd() {
        let (_dir, esp) = esp();
        let entry = NewEntry {
            slot: Slot::B,
            os_version: "1.1.0",
            root_hash: "bb",
            sort_version: 0,
            extra_options: "",
        };
        assert!(matches!(
            esp.activate(entry, 3),
            Err(LoaderError::MissingBootFile { file: KERNEL, .. })
        ));
        assert!(esp.entries().expect("entries").is_empty());
    }

    #[test]
    fn a_running_slot_still_counting_tries_blocks_writing_the_other() {
        let (_dir, esp) = esp();
        std::fs::write(esp.entries_dir().join("keel-b+2-1.conf"), "version 2\n").expect("w");
        assert!(matches!(
            esp.check_running_blessed(Slot::B),
            Err(LoaderError::RunningNotBlessed { slot: Slot::B, .. })
        ));
        std::fs::rename(
            esp.entries_dir().join("keel-b+2-1.conf"),
            esp.entries_dir().join("keel-b.conf"),
        )
        .expect("bless");
        esp.check_running_blessed(Slot::B).expect("blessed");
    }

    #[test]
    fn options_come_from_the_command_line_without_an_entry() {
        let (_dir, esp) = esp();
        let extra = esp
            .carried_options(
                Slot::A,
                "initrd=\\keel\\a\\initrd.img keel.slot=a console=ttyS0,115200 quiet",
            )
            .expect("options");
        assert_eq!(extra, "console=ttyS0,115200 quiet");
    }
}
