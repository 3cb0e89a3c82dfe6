//! Whole-file replacement that survives a power cut at any instant: the update status in
//! the state directory, and the kernel, initrd and loader entries on the ESP.
//!
//! Owns the one sequence used for all of them: write a temporary file beside the target
//! (a name the boot loader ignores: it starts with `.` and does not end in `.conf`),
//! `fsync` it, `rename` it over the target, `fsync` it again under its new name, `fsync`
//! the directory. A crash before the rename leaves the old file (and a temporary file,
//! removed by [`sweep_temps`]); after the directory's `fsync`, the new one. In between,
//! on a journalled file system (the state directory), the directory holds one name or
//! the other, never a file with part of the new content: the data was durable before the
//! name pointed at it. On vfat (the ESP) that holds only once the second `fsync` is
//! done, as below.
//!
//! The second `fsync` is for vfat: its rename writes the new directory entry empty and
//! fills in the file's first cluster and size only when the file's inode is written
//! back, so after an `fsync` of the directory alone a power cut left the name with no
//! content (found by the VM test `activation_power_cut_boots_one_whole_slot`: a
//! prepared slot's `initrd.img` gone after a cut seconds after it was written).
//!
//! On the ESP (vfat) the kernel gives weaker guarantees than on ext4 (no journal: a cut
//! during the rename can leave the directory entry half updated, which `fsck.vfat`
//! repairs to one of the two names). A cut in the instant between the rename and the
//! second `fsync` can leave the name with no content, or with clusters the old file
//! freed. The loader code never relies on more than "the old name or the new one", and
//! treats an entry that names no kernel, initrd or root hash as no entry: see
//! `loader.rs` for why either is a safe boot choice.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Prefix and suffix of temporary files; [`sweep_temps`] removes what a crash left.
const TEMP_PREFIX: &str = ".keel-";
const TEMP_SUFFIX: &str = ".tmp";

/// The temporary name beside `target`: it names this process, so that two writers
/// (two slot-writer sessions, one staging boot parameters while another streams a
/// prepare) never share one, and [`sweep_temps`] leaves a live writer's alone.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(
        "{TEMP_PREFIX}{name}.{}{TEMP_SUFFIX}",
        std::process::id()
    ))
}

/// Whether the temporary file `name` may belong to a live writer: it names a process
/// that exists (a pid reused since only keeps the file until a later sweep).
fn writer_alive(name: &str) -> bool {
    let Some(pid) = name
        .strip_suffix(TEMP_SUFFIX)
        .and_then(|n| n.rsplit_once('.'))
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
    else {
        return false;
    };
    Path::new("/proc").join(pid.to_string()).exists()
}

/// `fsync` of a directory, so that a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `target` with `bytes` (see the module header).
pub fn replace(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_with(target, |file| file.write_all(bytes))
}

/// Replaces `target` with what `fill` writes into the temporary file.
pub fn replace_with(
    target: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no parent", target.display())))?;
    let temp = temp_path(target);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        fill(&mut file)?;
        // The content is durable before any name points at it.
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, target)?;
        // On vfat the renamed file's directory entry is written with no data (cluster 0,
        // size 0) and filled in only when the file's inode is written back: an `fsync`
        // of the directory alone makes the name durable without its content. The
        // file's own `fsync` writes that entry (on ext4 it has nothing left to do).
        File::open(target)?.sync_all()?;
        // The rename is durable before the caller goes on (and, for the boot files,
        // before a loader entry can name them).
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Removes `target` durably; a missing file is not an error.
pub fn remove(target: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(target) {
        Ok(()) => {
            if let Some(dir) = target.parent() {
                sync_dir(dir)?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the temporary files a crash left in `dir` (those of writers no longer
/// running); answers how many.
pub fn sweep_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) && !writer_alive(&name)
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Reads at most `limit` bytes of `path` (a state file keeld wrote; bounded so a
/// planted huge file cannot exhaust memory).
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "{} is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_leaves_the_new_content_and_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("keel-b.conf");
        replace(&target, b"one").expect("replace");
        replace(&target, b"two").expect("replace");
        assert_eq!(std::fs::read(&target).expect("read"), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn a_failed_fill_leaves_the_old_file_and_sweeps_its_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("vmlinuz");
        replace(&target, b"old").expect("replace");
        let err = replace_with(&target, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("stream broke"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&target).expect("read"), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn temp_names_are_ignored_by_the_boot_loader_and_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let temp = temp_path(&dir.path().join("keel-a+3.conf"));
        let name = temp
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with('.') && !name.ends_with(".conf"), "{name}");
        std::fs::write(dir.path().join("keep.conf"), b"x").expect("write");
        // This process's temporary file is a live writer's: kept.
        std::fs::write(&temp, b"being written").expect("write");
        assert_eq!(sweep_temps(dir.path()), 0);
        // A writer that is gone (a process that ran and was reaped), and a name from a
        // release before names carried the writer: swept.
        let mut gone = std::process::Command::new("true").spawn().expect("true");
        let pid = gone.id();
        gone.wait().expect("wait");
        let dead = dir.path().join(format!(".keel-keel-a+3.conf.{pid}.tmp"));
        std::fs::write(&dead, b"crash").expect("write");
        std::fs::write(dir.path().join(".keel-vmlinuz.tmp"), b"crash").expect("write");
        assert_eq!(sweep_temps(dir.path()), 2);
        assert!(temp.exists() && !dead.exists());
        assert!(dir.path().join("keep.conf").exists());
    }
}
