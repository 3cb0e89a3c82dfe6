//! A host's update hardware without a VM: the four slot partitions as files (named by
//! partition label, as under `/dev/disk/by-partlabel`), an ESP directory with slot a's
//! loader entry, a kernel command line and a boot id; keeld's flags to use them through
//! the real `keel-slot-writer`; and systemd-boot's choice and boot counting, simulated by
//! the rules of its documentation, for reboots.

use std::path::{Path, PathBuf};

use crate::bin;

/// The host's disks, under one directory.
pub struct SlotHost {
    pub dir: PathBuf,
    boots: u32,
    /// The entry the last [`SlotHost::reboot`] booted, under its name after the boot
    /// loader moved its counter.
    booted: Option<String>,
}

/// A loader entry as systemd-boot sorts it.
#[derive(Debug, Clone)]
struct Entry {
    file: String,
    slot: String,
    left: Option<u32>,
    done: u32,
    sort_key: Option<String>,
    version: u64,
}

fn parse_entry(dir: &Path, file: &str) -> Option<Entry> {
    let stem = file.strip_suffix(".conf")?;
    let (_id, counter) = match stem.split_once('+') {
        Some((id, c)) => (id, Some(c)),
        None => (stem, None),
    };
    let (left, done) = match counter {
        None => (None, 0),
        Some(c) => match c.split_once('-') {
            Some((l, d)) => (Some(l.parse().ok()?), d.parse().ok()?),
            None => (Some(c.parse().ok()?), 0),
        },
    };
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
    };
    let slot = field("options")?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("keel.slot=").map(str::to_owned))?;
    Some(Entry {
        file: file.to_owned(),
        slot,
        left,
        done,
        sort_key: field("sort-key "),
        version: field("version ").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

impl SlotHost {
    /// Partitions of `root_size` and `hash_size` bytes for both slots (sparse files),
    /// slot a running with version `a_version`'s entry on the ESP.
    pub fn create(dir: &Path, root_size: u64, hash_size: u64) -> SlotHost {
        let parts = dir.join("by-partlabel");
        std::fs::create_dir_all(&parts).unwrap();
        for slot in ["a", "b"] {
            for (label, size) in [("root", root_size), ("verity", hash_size)] {
                let file =
                    std::fs::File::create(parts.join(format!("keel-{label}-{slot}"))).unwrap();
                file.set_len(size).unwrap();
            }
        }
        // Slot a's content stands for the running image: recognisable bytes to prove it
        // is never written.
        std::fs::write(parts.join("keel-root-a"), vec![0xa5u8; 1 << 20]).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(parts.join("keel-root-a"))
            .unwrap()
            .set_len(root_size)
            .unwrap();
        let esp = dir.join("esp");
        std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
        std::fs::create_dir_all(esp.join("keel/a")).unwrap();
        std::fs::write(esp.join("keel/a/vmlinuz"), b"kernel of slot a").unwrap();
        std::fs::write(esp.join("keel/a/initrd.img"), b"initrd of slot a").unwrap();
        std::fs::write(
            esp.join("loader/entries/keel-a.conf"),
            format!(
                "title Keel (slot a)\nsort-key keel\nversion 1\nlinux /keel/a/vmlinuz\n\
                 initrd /keel/a/initrd.img\noptions keel.slot=a keel.roothash={} \
                 keel.root=PARTLABEL=keel-root-a keel.verity=PARTLABEL=keel-verity-a \
                 console=ttyS0\n",
                "a".repeat(64)
            ),
        )
        .unwrap();
        let host = SlotHost {
            dir: dir.to_owned(),
            boots: 1,
            booted: None,
        };
        host.set_running("a");
        host
    }

    pub fn partition(&self, label: &str) -> PathBuf {
        self.dir.join("by-partlabel").join(label)
    }

    pub fn esp(&self) -> PathBuf {
        self.dir.join("esp")
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.esp().join("loader/entries")
    }

    /// The loader entry file names, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.entries_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The kernel command line and boot id of a boot of `slot`.
    fn set_running(&self, slot: &str) {
        std::fs::write(
            self.dir.join("cmdline"),
            format!("initrd=\\keel\\{slot}\\initrd.img keel.slot={slot} console=ttyS0\n"),
        )
        .unwrap();
        std::fs::write(self.dir.join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
    }

    /// The slot writer command for keeld's `--update-writer-command`.
    pub fn writer_command(&self) -> String {
        format!(
            "{} --partitions {} --esp {} --cmdline {} --boot-id {}",
            bin("keel-slot-writer").display(),
            self.dir.join("by-partlabel").display(),
            self.esp().display(),
            self.dir.join("cmdline").display(),
            self.dir.join("boot_id").display()
        )
    }

    /// keeld's flags for updates: the trusted root, the slot writer, the running version
    /// (an os-release file of the image, as `--os-release` reads it), short repository
    /// time limits.
    pub fn keeld_args(&self, root_json: &Path, version: &str) -> Vec<String> {
        let os_release = self.dir.join(format!("os-release-{version}"));
        std::fs::write(
            &os_release,
            format!(
                "NAME=Keel\nVERSION_ID={version}\nVARIANT_ID=keel-dev\nBUILD_ID=test\n\
                 PRETTY_NAME=\"Keel {version}\"\n"
            ),
        )
        .unwrap();
        vec![
            "--update-root".into(),
            root_json.display().to_string(),
            "--update-writer-command".into(),
            self.writer_command(),
            "--os-release".into(),
            os_release.display().to_string(),
            "--update-connect-timeout".into(),
            "2s".into(),
            "--update-read-timeout".into(),
            "2s".into(),
            "--update-metadata-timeout".into(),
            "5s".into(),
        ]
    }

    /// A reboot through systemd-boot: the entries sorted as it sorts them (entries
    /// with no tries left last; then by sort key, then version, newest first), the
    /// first one chosen, its counter moved (`+LEFT-DONE` → `+(LEFT-1)-(DONE+1)`). The
    /// running slot becomes the chosen one, with a new boot id. Answers the slot.
    pub fn reboot(&mut self) -> String {
        let dir = self.entries_dir();
        let mut entries: Vec<Entry> = self
            .entries()
            .iter()
            .filter_map(|f| parse_entry(&dir, f))
            .collect();
        entries.sort_by(|a, b| {
            let bad = |e: &Entry| e.left == Some(0);
            bad(a)
                .cmp(&bad(b))
                .then(b.sort_key.is_some().cmp(&a.sort_key.is_some()))
                .then(a.sort_key.cmp(&b.sort_key))
                .then(b.version.cmp(&a.version))
                .then(b.file.cmp(&a.file))
        });
        let chosen = entries.first().expect("no loader entry to boot").clone();
        let text = std::fs::read_to_string(dir.join(&chosen.file)).unwrap();
        self.booted = Some(chosen.file.clone());
        if let Some(left) = chosen.left.filter(|l| *l > 0) {
            let id = chosen.file.split('+').next().unwrap();
            let renamed = format!("{id}+{}-{}.conf", left - 1, chosen.done + 1);
            std::fs::rename(dir.join(&chosen.file), dir.join(&renamed)).unwrap();
            self.booted = Some(renamed);
        }
        self.boots += 1;
        // The kernel's command line: `initrd=` for the EFI stub, then the entry's
        // `options` lines joined, as systemd-boot makes it.
        let mut cmdline = vec![format!("initrd=\\keel\\{}\\initrd.img", chosen.slot)];
        for line in text.lines() {
            if let Some(options) = line.trim().strip_prefix("options ") {
                cmdline.extend(options.split_whitespace().map(str::to_owned));
            }
        }
        std::fs::write(self.dir.join("cmdline"), cmdline.join(" ") + "\n").unwrap();
        std::fs::write(self.dir.join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
        chosen.slot
    }

    /// The kernel command line of the running boot.
    pub fn cmdline(&self) -> String {
        std::fs::read_to_string(self.dir.join("cmdline")).unwrap()
    }

    /// systemd-bless-boot after `boot-complete.target`: the entry this boot came from
    /// loses its counter (the running slot's, before any reboot through
    /// [`SlotHost::reboot`]).
    pub fn bless(&self) {
        if let Some(booted) = &self.booted {
            if let Some((id, _)) = booted.split_once('+') {
                let (from, to) = (
                    self.entries_dir().join(booted),
                    self.entries_dir().join(format!("{id}.conf")),
                );
                if from.exists() {
                    std::fs::rename(from, to).unwrap();
                }
            }
            return;
        }
        let cmdline = std::fs::read_to_string(self.dir.join("cmdline")).unwrap();
        let slot = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("keel.slot="))
            .unwrap()
            .to_owned();
        for file in self.entries() {
            if file.starts_with(&format!("keel-{slot}+")) {
                std::fs::rename(
                    self.entries_dir().join(&file),
                    self.entries_dir().join(format!("keel-{slot}.conf")),
                )
                .unwrap();
            }
        }
    }
}
