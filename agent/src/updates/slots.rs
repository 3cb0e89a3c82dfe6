//! The two root slots: their names, the partitions of each (by GPT partition label), which
//! one is running, and opening a partition of the *inactive* one for writing.
//!
//! Owns the disk contract with the image (packaging/image): partitions labelled
//! `keel-root-a`, `keel-verity-a`, `keel-root-b`, `keel-verity-b`, found under a
//! directory of partition labels (`/dev/disk/by-partlabel` on a host; a directory of
//! regular files in tests), and the running slot given by `keel.slot=` on the kernel
//! command line. Sizes always come from the device (or file) itself.
//!
//! Must not write anything but the partitions of the slot it is asked for, and refuses
//! the running slot (see [`SlotLayout::open_partition`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn parse(text: &str) -> Option<Slot> {
        match text {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two partitions of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// The root file system image (erofs).
    Root,
    /// Its dm-verity hash tree (with the superblock `veritysetup format` writes).
    Hash,
}

impl Part {
    /// The GPT partition label of this part of `slot`.
    pub fn label(self, slot: Slot) -> String {
        match self {
            Part::Root => format!("keel-root-{slot}"),
            Part::Hash => format!("keel-verity-{slot}"),
        }
    }
}

/// Why the slots cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot read the kernel command line {path}: {source}")]
    Cmdline {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel command line ({path}) has no valid keel.slot=a|b: this host was not booted \
         from a Keel A/B image"
    )]
    NoSlot { path: PathBuf },
    #[error("cannot read this boot's id {path}: {source}")]
    BootId {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("slot {0} is the running slot: the running slot is never written")]
    Running(Slot),
    #[error("partition {label} ({path}): {source}")]
    Partition {
        label: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the slots are and which one runs.
#[derive(Debug, Clone)]
pub struct SlotLayout {
    /// Directory of partition labels (`/dev/disk/by-partlabel`).
    pub partitions: PathBuf,
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
}

/// The value of `key=` on a kernel command line (the last one wins, as for the kernel).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

impl SlotLayout {
    /// The kernel command line of this boot.
    pub fn read_cmdline(&self) -> Result<String, SlotError> {
        std::fs::read_to_string(&self.cmdline).map_err(|source| SlotError::Cmdline {
            path: self.cmdline.clone(),
            source,
        })
    }

    /// The running slot, from `keel.slot=` on the kernel command line.
    pub fn active(&self) -> Result<Slot, SlotError> {
        let text = self.read_cmdline()?;
        cmdline_value(&text, "keel.slot")
            .and_then(Slot::parse)
            .ok_or_else(|| SlotError::NoSlot {
                path: self.cmdline.clone(),
            })
    }

    /// The path of `part` of `slot`.
    pub fn path(&self, slot: Slot, part: Part) -> PathBuf {
        self.partitions.join(part.label(slot))
    }

    /// The size of `part` of `slot`, from the device (or file) itself.
    pub fn size(&self, slot: Slot, part: Part) -> Result<u64, SlotError> {
        let path = self.path(slot, part);
        let error = |source| SlotError::Partition {
            label: part.label(slot),
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(error)?;
        file.seek(SeekFrom::End(0)).map_err(error)
    }

    /// Opens `part` of `slot` for writing, refusing the running slot. A block device is
    /// opened with `O_EXCL`: the kernel then refuses it (EBUSY) while anything holds it,
    /// which the running slot's partitions always are (dm-verity claims both), a second
    /// guard beside the command-line check.
    pub fn open_partition(&self, slot: Slot, part: Part) -> Result<(File, u64), SlotError> {
        if self.active()? == slot {
            return Err(SlotError::Running(slot));
        }
        let path = self.path(slot, part);
        let error = |source| SlotError::Partition {
            label: part.label(slot),
            path: path.clone(),
            source,
        };
        let block = std::fs::metadata(&path)
            .map_err(error)?
            .file_type()
            .is_block_device();
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if block {
            options.custom_flags(libc::O_EXCL);
        }
        let mut file = options.open(&path).map_err(error)?;
        let size = file.seek(SeekFrom::End(0)).map_err(error)?;
        file.seek(SeekFrom::Start(0)).map_err(error)?;
        Ok((file, size))
    }
}

/// This boot's identity (`/proc/sys/kernel/random/boot_id`), to tell a keeld restart from
/// a reboot. Without it every start would look like the boot of an activation, so an
/// unreadable or empty one is an error.
pub fn boot_id(path: &Path) -> Result<String, SlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| SlotError::BootId {
        path: path.to_owned(),
        source,
    })?;
    let id = text.trim();
    if id.is_empty() {
        return Err(SlotError::BootId {
            path: path.to_owned(),
            source: std::io::Error::other("it is empty"),
        });
    }
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(cmdline: &str) -> (tempfile::TempDir, SlotLayout) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cmdline"), cmdline).expect("write");
        for label in [
            "keel-root-a",
            "keel-root-b",
            "keel-verity-a",
            "keel-verity-b",
        ] {
            std::fs::write(dir.path().join(label), vec![0u8; 8192]).expect("write");
        }
        let layout = SlotLayout {
            partitions: dir.path().to_owned(),
            cmdline: dir.path().join("cmdline"),
        };
        (dir, layout)
    }

    #[test]
    fn a_boot_id_that_is_missing_or_empty_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("boot_id");
        assert!(boot_id(&path).is_err());
        std::fs::write(&path, "\n").expect("write");
        let error = boot_id(&path).expect_err("empty").to_string();
        assert!(error.ends_with("it is empty"), "{error}");
        std::fs::write(&path, "6d1c0a0e-aaaa\n").expect("write");
        assert_eq!(boot_id(&path).expect("id"), "6d1c0a0e-aaaa");
    }

    #[test]
    fn the_running_slot_comes_from_the_command_line() {
        let (_dir, layout) = layout("console=ttyS0 keel.slot=b keel.roothash=ab quiet\n");
        assert_eq!(layout.active().expect("slot"), Slot::B);
        assert_eq!(
            cmdline_value("a=1 keel.slot=a keel.slot=b", "keel.slot"),
            Some("b")
        );
        assert_eq!(cmdline_value("keel.slotx=a", "keel.slot"), None);
    }

    #[test]
    fn a_command_line_without_a_slot_is_refused() {
        for line in ["console=ttyS0", "keel.slot=c", "keel.slot="] {
            let (_dir, layout) = layout(line);
            assert!(
                matches!(layout.active(), Err(SlotError::NoSlot { .. })),
                "{line}"
            );
        }
    }

    #[test]
    fn the_running_slot_is_never_opened_for_writing() {
        let (_dir, layout) = layout("keel.slot=a");
        for part in [Part::Root, Part::Hash] {
            assert!(matches!(
                layout.open_partition(Slot::A, part),
                Err(SlotError::Running(Slot::A))
            ));
            let (_file, size) = layout.open_partition(Slot::B, part).expect("inactive");
            assert_eq!(size, 8192);
        }
        assert_eq!(layout.size(Slot::A, Part::Root).expect("size"), 8192);
    }
}
