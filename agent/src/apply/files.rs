//! Writing rendered files under the render root.
//!
//! A file is written only when its content differs (an unchanged file keeps its inode and
//! mtime, so nothing watching it wakes up). A write is atomic: a temp file in the same
//! directory gets the content and mode, then is renamed over the target, so a reader (or
//! a crash) sees the old or the new file, never a half-written one. The temp file is
//! fsync'd before the rename (free on the tmpfs render root; on disk, for a container's
//! `user-data`, it keeps a crash from leaving an empty file under the final name). The
//! directory is not fsync'd: everything written here is derived from the durable
//! settings and written again at the next start, so a lost rename only repeats work.
//!
//! Nothing is written through a symbolic link: a write is refused when any existing
//! component between the render root and the target (each directory, and the target
//! itself) is one, so a write cannot land outside the render root; missing directories
//! are created one at a time, each checked again after its creation. The temp file has
//! a random name and is created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`), so
//! nothing planted at a temp name is ever opened, truncated or followed.

use std::fs;
use std::io::{self, Write};
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

/// Whether `target` would change if given `content`. A target that is not a regular
/// file (or cannot be read safely) differs.
pub fn differs(target: &Path, content: &str) -> bool {
    !matches!(read_existing(target, content.len()), Ok(Existing::File { content: ref current, .. }) if current == content.as_bytes())
}

/// What is at a path keeld is about to replace.
#[derive(Debug, PartialEq)]
pub enum Existing {
    Missing,
    /// A regular file: its mode bits and, when it is no larger than the limit asked
    /// for, its content (`None` when it is larger: it differs from anything that size).
    File {
        mode: u32,
        content: Vec<u8>,
    },
    /// Anything else (a FIFO, a socket, a device node, a directory): never opened for
    /// reading, and never replaced.
    Other(&'static str),
}

fn kind_name(file_type: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Reads what is at `target` without ever blocking on it or following a link: the
/// entry is looked at with `lstat` first, and only a regular file is opened, with
/// `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, then checked again through the descriptor
/// (`fstat`), so a FIFO or device swapped in between is never read: opening a FIFO
/// non-blocking returns at once, and the `fstat` refuses it. A file longer than
/// `limit` bytes is not read beyond `limit + 1` bytes (it cannot equal content of
/// `limit` bytes), so a huge planted file costs nothing.
///
/// A host container owns its persistent directory and could plant a FIFO at its
/// `user-data`; a blocking `read` there used to freeze an async worker forever.
pub fn read_existing(target: &Path, limit: usize) -> io::Result<Existing> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let before = match fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Missing),
        Err(e) => return Err(e),
    };
    if !before.file_type().is_file() {
        return Ok(Existing::Other(kind_name(before.file_type())));
    }
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(target)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Missing),
        // ELOOP: it became a symbolic link since the lstat.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Existing::Other("a symbolic link"))
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(Existing::Other(kind_name(meta.file_type())));
    }
    let mode = meta.mode() & 0o7777;
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut content = Vec::with_capacity(limit.min(1 << 20));
    file.take(cap).read_to_end(&mut content)?;
    Ok(Existing::File { mode, content })
}

/// The components of `target` below `root`: only plain names (`target_path` makes
/// sure of that), at least one.
fn below_root<'a>(root: &Path, target: &'a Path) -> io::Result<&'a Path> {
    let relative = target.strip_prefix(root).map_err(|_| {
        io::Error::other(format!(
            "{} is not under the render root {}",
            target.display(),
            root.display()
        ))
    })?;
    let clean = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !clean || relative.components().next().is_none() {
        return Err(io::Error::other(format!(
            "{} is not a file path under the render root",
            target.display()
        )));
    }
    Ok(relative)
}

fn symlink_error(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{} is a symbolic link: refusing to write through it",
        path.display()
    ))
}

/// Refuses when any existing component between `root` (not included) and `target`
/// (included) is a symbolic link. Components that do not exist yet are fine.
pub fn check_no_symlinks(root: &Path, target: &Path) -> io::Result<()> {
    let mut current = root.to_path_buf();
    for component in below_root(root, target)?.components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(symlink_error(&current)),
            Ok(_) => {}
            // Nothing below a missing component exists either.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `root` if missing, then the directories between `root` and `dir` one at a
/// time, refusing a symbolic link among them (one that appears while creating included).
fn create_dirs(root: &Path, dir: &Path) -> io::Result<()> {
    let Ok(relative) = dir.strip_prefix(root) else {
        return Err(io::Error::other(format!(
            "{} is not under the render root {}",
            dir.display(),
            root.display()
        )));
    };
    // The render root itself is trusted (it may be, or lie under, a symbolic link).
    fs::create_dir_all(root)?;
    let mut current = root.to_path_buf();
    for component in relative.components() {
        current.push(component);
        let meta = match fs::symlink_metadata(&current) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match fs::create_dir(&current) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                fs::symlink_metadata(&current)?
            }
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            return Err(symlink_error(&current));
        }
        if !meta.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                current.display()
            )));
        }
    }
    Ok(())
}

/// Creates a temp file with a random name next to `target`, exclusively and without
/// following a symbolic link.
/// The marker in a temp file's name: `.<name>.keel-tmp-<random>`.
const TEMP_MARKER: &str = ".keel-tmp-";

/// Removes temp files left in `dir` by a keeld that died mid-write (`only` = for that
/// target name alone). Applies are serialized and each target has one writer, so a temp
/// file that exists before a write starts is a leftover, never a write in progress.
/// Answers how many were removed.
pub fn sweep_temps(dir: &Path, only: Option<&str>) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix('.') else {
            continue;
        };
        let Some((target, _)) = rest.rsplit_once(TEMP_MARKER) else {
            continue;
        };
        if only.is_some_and(|o| o != target) {
            continue;
        }
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, fs::File)> {
    let mut attempts = 0;
    loop {
        let temp = dir.join(format!(
            ".{name}{TEMP_MARKER}{:016x}",
            rand::random::<u64>()
        ));
        let opened = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(mode)
            .open(&temp);
        match opened {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 3 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Writes `content` to `target` (a path under `root`, as from [`target_path`])
/// atomically with `mode`, creating parent directories. Returns `false` (and touches
/// nothing) when the file already holds exactly this content and mode. Refuses, writing
/// nothing, when a component between `root` and `target` is a symbolic link.
pub fn write_if_changed(root: &Path, target: &Path, content: &str, mode: u32) -> io::Result<bool> {
    write_bytes_if_changed(root, target, content.as_bytes(), mode)
}

/// [`write_if_changed`] for content that need not be text (a container's user-data).
pub fn write_bytes_if_changed(
    root: &Path,
    target: &Path,
    content: &[u8],
    mode: u32,
) -> io::Result<bool> {
    check_no_symlinks(root, target)?;
    match read_existing(target, content.len())? {
        Existing::File {
            mode: current_mode,
            content: current,
        } if current_mode == mode && current == content => return Ok(false),
        Existing::File { .. } | Existing::Missing => {}
        Existing::Other(kind) => {
            return Err(io::Error::other(format!(
                "{} is {kind}, not a regular file: refusing to replace it",
                target.display()
            )))
        }
    }
    let dir = target
        .parent()
        .ok_or_else(|| io::Error::other("target has no parent directory"))?;
    create_dirs(root, dir)?;
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::other("target has no file name"))?;
    sweep_temps(dir, Some(&name.to_string_lossy()));
    let (temp, mut file) = create_temp(dir, &name.to_string_lossy(), mode)?;
    let result = (|| {
        // The umask may have narrowed the mode given at creation.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(content)?;
        file.sync_all()?;
        drop(file);
        // The target may have become a symbolic link meanwhile; rename replaces the link
        // itself rather than following it, but refuse all the same.
        check_no_symlinks(root, target)?;
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
    use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};

    use super::*;

    #[test]
    fn leftover_temp_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join(".motd.keel-tmp-00000000000000aa"), "half").unwrap();
        fs::write(d.join(".hosts.keel-tmp-00000000000000bb"), "half").unwrap();
        fs::write(d.join(".hidden"), "mine").unwrap();
        fs::write(d.join("motd"), "whole").unwrap();
        assert_eq!(sweep_temps(d, Some("motd")), 1);
        assert!(d.join(".hosts.keel-tmp-00000000000000bb").exists());
        assert_eq!(sweep_temps(d, None), 1);
        assert!(d.join(".hidden").exists() && d.join("motd").exists());
        write_if_changed(d, &d.join("motd"), "new", 0o644).unwrap();
        assert_eq!(fs::read_to_string(d.join("motd")).unwrap(), "new");
    }

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
        let root = dir.path();
        let target = root.join("etc/motd");
        assert!(write_if_changed(root, &target, "hello\n", 0o644).unwrap());
        assert!(
            write_if_changed(
                &root.join("new-root"),
                &root.join("new-root/a/b"),
                "x",
                0o644
            )
            .unwrap(),
            "a missing render root is created"
        );
        let before = fs::metadata(&target).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!write_if_changed(root, &target, "hello\n", 0o644).unwrap());
        let after = fs::metadata(&target).unwrap();
        assert_eq!(
            (before.ino(), before.mtime_nsec()),
            (after.ino(), after.mtime_nsec())
        );
        assert!(
            write_if_changed(root, &target, "hello\n", 0o600).unwrap(),
            "a mode change rewrites"
        );
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&target).unwrap(), "hello\n");
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(root.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["motd"]);
    }

    #[test]
    fn a_symlink_planted_at_the_old_temp_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        symlink(&victim, root.join("etc/.motd.keel-tmp")).unwrap();
        let target = root.join("etc/motd");
        assert!(write_if_changed(&root, &target, "hello\n", 0o644).unwrap());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(fs::read_to_string(&target).unwrap(), "hello\n");
        assert!(!fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn temp_names_are_random_and_never_reuse_an_existing_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = create_temp(dir.path(), "motd", 0o600).unwrap();
        let (b, _) = create_temp(dir.path(), "motd", 0o600).unwrap();
        assert_ne!(a, b);
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".motd.keel-tmp-"));
    }

    #[test]
    fn a_symlinked_directory_under_the_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(outside.join("sub")).unwrap();
        // The symlinked directory exists and so does the path below it.
        symlink(&outside, root.join("etc")).unwrap();
        let err = write_if_changed(&root, &root.join("etc/motd"), "x\n", 0o644).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(err.to_string().contains("root/etc"), "{err}");
        // Directories that would be created below it are not created outside.
        let err =
            write_if_changed(&root, &root.join("etc/new/dir/motd"), "x\n", 0o644).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            1,
            "nothing written outside the render root"
        );
        assert!(!outside.join("motd").exists());
        assert!(!outside.join("new").exists());
    }

    #[test]
    fn a_symlinked_target_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        symlink(&victim, root.join("etc/motd")).unwrap();
        let err = write_if_changed(&root, &root.join("etc/motd"), "x\n", 0o644).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(fs::symlink_metadata(root.join("etc/motd"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Even with the link's content already matching, it is reported, not "unchanged".
        assert!(write_if_changed(&root, &root.join("etc/motd"), "precious\n", 0o644).is_err());
    }

    #[test]
    fn a_fifo_at_the_target_is_never_opened_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        let fifo = root.join("etc/motd");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Run on another thread: a blocking open or read would hang the test, not fail it.
        let (tx, rx) = std::sync::mpsc::channel();
        let (r, f) = (root.to_owned(), fifo.clone());
        std::thread::spawn(move || {
            let written = write_if_changed(&r, &f, "hi\n", 0o644).map_err(|e| e.to_string());
            let differs = differs(&f, "hi\n");
            let _ = tx.send((written, differs));
        });
        let (written, differs) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a FIFO at the target blocked the write");
        let err = written.unwrap_err();
        assert!(err.contains("a FIFO") && err.contains("etc/motd"), "{err}");
        assert!(differs);
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(read_existing(&fifo, 10).unwrap(), Existing::Other("a FIFO"));
    }

    #[test]
    fn a_large_existing_file_is_read_only_as_far_as_needed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big");
        fs::write(&f, vec![b'x'; 1 << 20]).unwrap();
        match read_existing(&f, 3).unwrap() {
            Existing::File { content, .. } => assert_eq!(content.len(), 4),
            other => panic!("{other:?}"),
        }
        assert!(write_if_changed(dir.path(), &f, "xxx", 0o644).unwrap());
        assert_eq!(fs::read_to_string(&f).unwrap(), "xxx");
    }

    #[test]
    fn the_render_root_itself_may_be_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir_all(&real).unwrap();
        let root = dir.path().join("root");
        symlink(&real, &root).unwrap();
        assert!(write_if_changed(&root, &root.join("etc/motd"), "x\n", 0o644).unwrap());
        assert_eq!(fs::read_to_string(real.join("etc/motd")).unwrap(), "x\n");
        assert!(check_no_symlinks(&root, Path::new("/elsewhere/motd")).is_err());
    }
}
