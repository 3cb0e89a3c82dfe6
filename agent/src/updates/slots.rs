//! The two root slots: their names, the partitions of each (by GPT partition label), which
//! one is running, and opening a partition of the *inactive* one for writing.
//!
//! Owns the disk contract with the image (packaging/image): partitions labelled
//! `keel-root-a`, `keel-verity-a`, `keel-root-b`, `keel-verity-b`, found under a
//! directory of partition labels (on Keel OS `/dev/disk/keel-boot`, which the
//! initramfs's udev rule fills with the boot disk's partitions only; a directory of
//! regular files in tests), and the running slot given by `keel.slot=` on the kernel
//! command line. Sizes always come from the device (or file) itself.
//!
//! A label alone names a partition on *some* disk: attach a second Keel disk (an old root
//! volume, to recover its data) and udev points `/dev/disk/by-partlabel/keel-root-b`
//! at whichever disk it saw last. So, whatever directory the writer is given, where a
//! label is a block device it must name the
//! partition with that label on the disk the running root is on (found through `/sys`:
//! the device of `/`, the partitions under dm-verity, their disk), and the ESP must be
//! on that disk too; otherwise nothing is written (see [`SlotLayout::device`] and
//! [`SlotLayout::check_on_running_disk`]). The writer's unit allows only the devices the
//! links named when it started, so refusing is all it could do anyway.
//!
//! Must not write anything but the partitions of the slot it is asked for, and refuses
//! the running slot (see [`SlotLayout::open_partition`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
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
    #[error("cannot tell which disk the running root is on: {0}")]
    RunningDisk(String),
    #[error(
        "{what} ({path}) is not on disk {disk}, which holds the running root: another disk \
         carries Keel's partition labels; detach it to update this host"
    )]
    OtherDisk {
        what: String,
        path: PathBuf,
        disk: String,
    },
    #[error(
        "disk {disk}, which holds the running root, has {count} partitions labelled {label} \
         (expected one)"
    )]
    OnRunningDisk {
        label: String,
        disk: String,
        count: usize,
    },
}

/// Where the slots are and which one runs.
#[derive(Debug, Clone)]
pub struct SlotLayout {
    /// Directory of partition labels (`/dev/disk/keel-boot` on Keel OS).
    pub partitions: PathBuf,
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// Where sysfs is mounted (`/sys`): which disk the running root is on, and its
    /// partitions' labels.
    pub sys: PathBuf,
}

impl SlotLayout {
    /// The host's layout: labels in `partitions`, `/proc/cmdline`, `/sys`.
    pub fn host(partitions: PathBuf) -> SlotLayout {
        SlotLayout {
            partitions,
            cmdline: "/proc/cmdline".into(),
            sys: "/sys".into(),
        }
    }
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

    /// What to open for `part` of `slot`: the label's entry, once checked, where it is a
    /// block device, to be the partition with that label on the disk the running root
    /// is on (see the module doc). Regular files (tests) are taken as they are.
    pub fn device(&self, slot: Slot, part: Part) -> Result<PathBuf, SlotError> {
        let label = part.label(slot);
        let path = self.partitions.join(&label);
        let block = std::fs::metadata(&path)
            .map_err(|source| SlotError::Partition {
                label: label.clone(),
                path: path.clone(),
                source,
            })?
            .file_type()
            .is_block_device();
        if !block {
            return Ok(path);
        }
        let disk = self.running_disk()?;
        let device = Path::new("/dev").join(partition_on(&disk, &label)?);
        let named = std::fs::canonicalize(&path).map_err(|source| SlotError::Partition {
            label: label.clone(),
            path: path.clone(),
            source,
        })?;
        if named != device {
            return Err(SlotError::OtherDisk {
                what: format!("partition label {label}"),
                path: named,
                disk: disk_name(&disk),
            });
        }
        Ok(device)
    }

    /// The sysfs directory of the disk the running root is on.
    fn running_disk(&self) -> Result<PathBuf, SlotError> {
        let root = std::fs::metadata("/")
            .map_err(|e| SlotError::RunningDisk(format!("stat /: {e}")))?
            .dev();
        running_disk(&self.sys, (libc::major(root), libc::minor(root)))
    }

    /// Refuses `path` (the ESP's mount point) unless its file system is on a partition
    /// of the disk the running root is on. Only on a host whose slots are block devices
    /// (tests keep both in directories).
    pub fn check_on_running_disk(&self, what: &str, path: &Path) -> Result<(), SlotError> {
        let slot_is_block = std::fs::metadata(self.partitions.join(Part::Root.label(Slot::A)))
            .is_ok_and(|m| m.file_type().is_block_device());
        if !slot_is_block {
            return Ok(());
        }
        let disk = self.running_disk()?;
        // Through `path/.`: stat of a mount point itself would not trigger an automount
        // there, and would answer the autofs placeholder's device.
        let dev = std::fs::metadata(path.join("."))
            .map_err(|e| SlotError::RunningDisk(format!("stat {}: {e}", path.display())))?
            .dev();
        let on = disk_of_partition(&self.sys, (libc::major(dev), libc::minor(dev)));
        if on.as_deref() == Some(disk.as_path()) {
            Ok(())
        } else {
            Err(SlotError::OtherDisk {
                what: what.to_owned(),
                path: path.to_owned(),
                disk: disk_name(&disk),
            })
        }
    }

    /// The size of `part` of `slot`, from the device (or file) itself.
    pub fn size(&self, slot: Slot, part: Part) -> Result<u64, SlotError> {
        let path = self.device(slot, part)?;
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
        let path = self.device(slot, part)?;
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

/// The sysfs directory of the disk that device `major:minor` (the running root's) is
/// on: a partition's parent, or, for a device-mapper device such as dm-verity's, the
/// one disk all its underlying devices (`slaves/`) are partitions of.
fn running_disk(sys: &Path, (major, minor): (u32, u32)) -> Result<PathBuf, SlotError> {
    let error = |what: String| SlotError::RunningDisk(what);
    let node = sys.join(format!("dev/block/{major}:{minor}"));
    let device =
        std::fs::canonicalize(&node).map_err(|e| error(format!("{}: {e}", node.display())))?;
    let disk_or_error = |partition: &Path| {
        disk_of(partition)
            .ok_or_else(|| error(format!("{} is not a partition", partition.display())))
    };
    let slaves = device.join("slaves");
    if !slaves.is_dir() {
        return disk_or_error(&device);
    }
    let mut disk: Option<PathBuf> = None;
    let entries =
        std::fs::read_dir(&slaves).map_err(|e| error(format!("{}: {e}", slaves.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| error(format!("{}: {e}", slaves.display())))?;
        let under = std::fs::canonicalize(entry.path())
            .map_err(|e| error(format!("{}: {e}", entry.path().display())))?;
        let this = disk_or_error(&under)?;
        match &disk {
            Some(d) if *d != this => {
                return Err(error(format!(
                    "{} spans disks {} and {}",
                    device.display(),
                    d.display(),
                    this.display()
                )))
            }
            _ => disk = Some(this),
        }
    }
    disk.ok_or_else(|| error(format!("{} has no underlying device", device.display())))
}

/// The sysfs directory of the disk that partition `major:minor` is on; `None` when it
/// is no partition (or unknown).
fn disk_of_partition(sys: &Path, (major, minor): (u32, u32)) -> Option<PathBuf> {
    disk_of(&std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))).ok()?)
}

/// The disk directory a partition's sysfs directory (canonical) sits in; `None` when it
/// is no partition.
fn disk_of(partition: &Path) -> Option<PathBuf> {
    if !partition.join("partition").exists() {
        return None;
    }
    partition.parent().map(Path::to_owned)
}

/// `vda` of `/sys/devices/…/block/vda`.
fn disk_name(disk: &Path) -> String {
    disk.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The device name (`vda5`) of the one partition of `disk` (a sysfs disk directory)
/// labelled `label`, from each partition's `uevent` (`PARTNAME=`, `DEVNAME=`).
fn partition_on(disk: &Path, label: &str) -> Result<String, SlotError> {
    let name = disk_name(disk);
    let entries = std::fs::read_dir(disk)
        .map_err(|e| SlotError::RunningDisk(format!("{}: {e}", disk.display())))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("partition").exists() {
            continue;
        }
        let Ok(uevent) = std::fs::read_to_string(dir.join("uevent")) else {
            continue;
        };
        let field = |key: &str| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        if field("PARTNAME").as_deref() == Some(label) {
            if let Some(devname) = field("DEVNAME") {
                found.push(devname);
            }
        }
    }
    match <[String; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(found) => Err(SlotError::OnRunningDisk {
            label: label.to_owned(),
            disk: name,
            count: found.len(),
        }),
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
            sys: dir.path().join("sys"),
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

    /// A sysfs tree: disk vda (partitions 1 and 3-6: efi, root-a, verity-a, root-b,
    /// verity-b) with dm-0 (253:0) over vda3 and vda4, and a second disk vdb that also
    /// has a keel-efi (vdb1) and a keel-root-b (vdb5). vda1 is 254:1, vda3 254:3, vdb1
    /// 254:17.
    fn sysfs() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().to_owned();
        let part = |disk: &str, name: &str, label: &str| {
            let p = sys.join(format!("devices/pci0/{disk}/block/{disk}/{name}"));
            std::fs::create_dir_all(&p).expect("mkdir");
            std::fs::write(p.join("partition"), "1\n").expect("partition");
            std::fs::write(
                p.join("uevent"),
                format!("MAJOR=254\nMINOR=0\nDEVNAME={name}\nDEVTYPE=partition\nPARTN=1\nPARTNAME={label}\n"),
            )
            .expect("uevent");
            p
        };
        let vda1 = part("vda", "vda1", "keel-efi");
        let vdb1 = part("vdb", "vdb1", "keel-efi");
        let vda3 = part("vda", "vda3", "keel-root-a");
        let vda4 = part("vda", "vda4", "keel-verity-a");
        part("vda", "vda5", "keel-root-b");
        part("vda", "vda6", "keel-verity-b");
        part("vdb", "vdb5", "keel-root-b");
        let dm = sys.join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(dm.join("slaves")).expect("mkdir");
        std::os::unix::fs::symlink(&vda3, dm.join("slaves/vda3")).expect("link");
        std::os::unix::fs::symlink(&vda4, dm.join("slaves/vda4")).expect("link");
        std::fs::create_dir_all(sys.join("dev/block")).expect("mkdir");
        std::os::unix::fs::symlink(&dm, sys.join("dev/block/253:0")).expect("link");
        std::os::unix::fs::symlink(&vda3, sys.join("dev/block/254:3")).expect("link");
        std::os::unix::fs::symlink(&vda1, sys.join("dev/block/254:1")).expect("link");
        std::os::unix::fs::symlink(&vdb1, sys.join("dev/block/254:17")).expect("link");
        (dir, sys)
    }

    #[test]
    fn a_label_is_looked_up_on_the_running_root_s_disk_only() {
        let (_dir, sys) = sysfs();
        let vda = std::fs::canonicalize(sys.join("devices/pci0/vda/block/vda")).expect("vda");
        // Under dm-verity, and directly on a partition.
        assert_eq!(running_disk(&sys, (253, 0)).expect("disk"), vda);
        assert_eq!(running_disk(&sys, (254, 3)).expect("disk"), vda);
        // vdb5 is labelled keel-root-b too: never chosen.
        assert_eq!(partition_on(&vda, "keel-root-b").expect("b"), "vda5");
        assert_eq!(partition_on(&vda, "keel-verity-b").expect("b"), "vda6");
        // The ESP's file system: on vda1 it is the running disk's, on vdb1 not; dm-0 is
        // no partition.
        let vdb = std::fs::canonicalize(sys.join("devices/pci0/vdb/block/vdb")).expect("vdb");
        assert_eq!(disk_of_partition(&sys, (254, 1)), Some(vda));
        assert_eq!(disk_of_partition(&sys, (254, 17)), Some(vdb));
        assert_eq!(disk_of_partition(&sys, (253, 0)), None);
        assert_eq!(disk_of_partition(&sys, (8, 1)), None);
    }

    #[test]
    fn a_running_disk_that_cannot_be_told_or_an_ambiguous_label_is_refused() {
        let (_dir, sys) = sysfs();
        let vda = std::fs::canonicalize(sys.join("devices/pci0/vda/block/vda")).expect("vda");
        // No such device.
        assert!(matches!(
            running_disk(&sys, (8, 0)),
            Err(SlotError::RunningDisk(_))
        ));
        // dm-0 over partitions of two disks.
        let vdb5 = sys.join("devices/pci0/vdb/block/vdb/vdb5");
        std::os::unix::fs::symlink(&vdb5, sys.join("devices/virtual/block/dm-0/slaves/vdb5"))
            .expect("link");
        let error = running_disk(&sys, (253, 0))
            .expect_err("two disks")
            .to_string();
        assert!(error.contains("spans disks"), "{error}");
        // A whole disk is no partition.
        std::os::unix::fs::symlink(&vda, sys.join("dev/block/254:0")).expect("link");
        let error = running_disk(&sys, (254, 0))
            .expect_err("a disk")
            .to_string();
        assert!(error.contains("is not a partition"), "{error}");
        // Two partitions with one label on the running disk, or none.
        let vda7 = vda.join("vda7");
        std::fs::create_dir_all(&vda7).expect("mkdir");
        std::fs::write(vda7.join("partition"), "7\n").expect("partition");
        std::fs::write(vda7.join("uevent"), "DEVNAME=vda7\nPARTNAME=keel-root-b\n")
            .expect("uevent");
        assert!(matches!(
            partition_on(&vda, "keel-root-b"),
            Err(SlotError::OnRunningDisk { count: 2, .. })
        ));
        let error = partition_on(&vda, "keel-root-c")
            .expect_err("none")
            .to_string();
        assert_eq!(
            error,
            "disk vda, which holds the running root, has 0 partitions labelled keel-root-c \
             (expected one)"
        );
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
