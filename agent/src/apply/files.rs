//! Writing rendered files under the render root.
//!
//! A file is written only when its content differs (an unchanged file keeps its inode and
//! mtime, so nothing watching it wakes up). A write is atomic: a temp file in the same
//! directory gets the content and mode, then is renamed over the target, so a reader (or
//! a crash) sees the old or the new file, never a half-written one. There is no fsync:
//! the render root is a tmpfs and every file in it is derived from the durable settings
//! and rendered again at boot, so durability would buy nothing.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Where a configuration file's `path` lands under `root`; `None` if the path would
/// leave the render root (`..`) or is empty.
pub fn target_path(root: &Path, path: &str) -> Option<PathBuf> {
    let relative = Path::new(path.trim_start_matches('/'));
    let clean = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    (clean && relative.components().next().is_some()).then(|| root.join(relative))
}

/// Whether `target` would change if given `content`.
pub fn differs(target: &Path, content: &str) -> bool {
    fs::read(target).map_or(true, |current| current != content.as_bytes())
}

/// Writes `content` to `target` atomically with `mode`, creating parent directories.
/// Returns `false` (and touches nothing) when the file already holds exactly this
/// content and mode.
pub fn write_if_changed(target: &Path, content: &str, mode: u32) -> std::io::Result<bool> {
    if let Ok(meta) = fs::metadata(target) {
        if meta.permissions().mode() & 0o7777 == mode && !differs(target, content) {
            return Ok(false);
        }
    }
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other("target has no parent directory"))?;
    fs::create_dir_all(dir)?;
    let name = target
        .file_name()
        .ok_or_else(|| std::io::Error::other("target has no file name"))?;
    let temp = dir.join(format!(".{}.keel-tmp", name.to_string_lossy()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&temp)?;
        // The umask may have narrowed the mode given at creation.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(content.as_bytes())?;
        drop(file);
        fs::rename(&temp, target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn target_stays_under_the_root() {
        let root = Path::new("/r");
        assert_eq!(
            target_path(root, "/etc/motd"),
            Some(PathBuf::from("/r/etc/motd"))
        );
        assert_eq!(
            target_path(root, "etc/motd"),
            Some(PathBuf::from("/r/etc/motd"))
        );
        assert_eq!(target_path(root, "/etc/../../x"), None);
        assert_eq!(target_path(root, "/"), None);
    }

    #[test]
    fn unchanged_content_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("etc/motd");
        assert!(write_if_changed(&target, "hello\n", 0o644).unwrap());
        let before = fs::metadata(&target).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!write_if_changed(&target, "hello\n", 0o644).unwrap());
        let after = fs::metadata(&target).unwrap();
        assert_eq!(
            (before.ino(), before.mtime_nsec()),
            (after.ino(), after.mtime_nsec())
        );
        assert!(
            write_if_changed(&target, "hello\n", 0o600).unwrap(),
            "a mode change rewrites"
        );
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&target).unwrap(), "hello\n");
    }
}
