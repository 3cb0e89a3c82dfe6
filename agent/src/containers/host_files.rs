//! The host's `/etc/hosts` and `/etc/resolv.conf` as host and bootstrap containers see
//! them: the files under keeld's render root, which keeld renders from
//! `settings.network` and `settings.dns` (on Keel OS the render root is `/`, so they are
//! the host's own).
//!
//! A container gets each as a read-only bind mount of one file. keeld (and the OS's
//! own network tools) replace these files by rename, and a bind mount of a file keeps
//! the inode it was made with: a running container would go on reading the old name
//! servers until it is recreated. So containers mount copies kept in keeld's runtime
//! directory, whose inodes never change: [`HostFiles::sync`] rewrites a copy in place
//! when its source differs, and [`HostFiles::follow`] does so every [`FOLLOW_PERIOD`]
//! (a change made by an apply reaches running containers within it).
//!
//! The rewrite writes the new bytes over the old from offset 0, then cuts the file to
//! their length: a reader in that instant may see the old file's tail after the new
//! content (never an empty file); resolvers re-read `resolv.conf` when its mtime changes,
//! which the cut updates last.
//!
//! A comparison reads both files only when either changed since the last one found them
//! equal: each period first compares the files' [`Stamp`]s (a `stat` each) with the ones
//! seen then, so a large `/etc/hosts` is not read twice every period.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How often the sources are compared with the copies.
pub const FOLLOW_PERIOD: Duration = Duration::from_secs(2);

/// The largest source copied. These files are usually a few hundred bytes, but
/// `settings.network.hosts` may render up to about the settings' own limit (4 MiB of
/// JSON: 256 addresses of 64 names each); a larger source is an error, never a copy cut
/// short in the middle of a line.
const MAX_BYTES: u64 = 8 << 20;

/// The copies in one directory, each with its source on the host.
#[derive(Debug, Clone)]
pub struct HostFiles {
    dir: PathBuf,
    hosts_source: PathBuf,
    resolv_source: PathBuf,
    /// Per file (hosts, resolv.conf): the source's and the copy's stamps when they were
    /// last found equal (shared by the clones `follow` hands to its blocking task).
    seen: Arc<Mutex<[Option<Stamps>; 2]>>,
    /// How many times a source's bytes were compared with its copy's.
    compared: Arc<std::sync::atomic::AtomicUsize>,
}

/// A source's and its copy's [`Stamp`]s.
type Stamps = (Stamp, Stamp);

/// What `stat` says of a file that changes when its content can have: which file it is
/// (a rename puts another there), its size, and its modification and change times. The
/// change time cannot be set back from user space (`touch -d` sets the modification time
/// only). A missing file has the stamp `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How old a file's last change must be, when a comparison begins, for its stamp to be
/// trusted. File times come from a clock that ticks every few milliseconds (every second
/// on some file systems): two writes of the same size within one tick leave the same
/// stamp, so a file changed this recently is read again next time (the rule git uses for
/// its index, with a margin for one-second times).
const STAMP_SETTLED: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Option<Stamp>> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(Stamp {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether its last change is at least [`STAMP_SETTLED`] older than `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let (secs, nanos) = self.ctime;
        let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
            return false;
        };
        let changed = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        now.duration_since(changed)
            .is_ok_and(|age| age >= STAMP_SETTLED)
    }
}

impl HostFiles {
    /// Copies in `dir` of `etc/hosts` and `etc/resolv.conf` under `render_root`.
    pub fn new(dir: PathBuf, render_root: &Path) -> HostFiles {
        HostFiles::with_sources(
            dir,
            render_root.join("etc/hosts"),
            render_root.join("etc/resolv.conf"),
        )
    }

    /// Copies of other sources (tests).
    pub fn with_sources(dir: PathBuf, hosts_source: PathBuf, resolv_source: PathBuf) -> Self {
        HostFiles {
            dir,
            hosts_source,
            resolv_source,
            seen: Arc::default(),
            compared: Arc::default(),
        }
    }

    /// What containers mount at `/etc/hosts`.
    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// What containers mount at `/etc/resolv.conf`.
    pub fn resolv_conf(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }

    /// Brings each copy up to its source, in place; answers how many changed. A missing
    /// source is an empty file (a container still starts, and resolves nothing).
    pub fn sync(&self) -> std::io::Result<usize> {
        std::fs::create_dir_all(&self.dir)?;
        let mut changed = 0;
        let mut failed = None;
        // Each file on its own: one that cannot be copied does not hold the other back.
        for (i, (source, copy)) in [
            (&self.hosts_source, self.hosts()),
            (&self.resolv_source, self.resolv_conf()),
        ]
        .into_iter()
        .enumerate()
        {
            match self.sync_if_changed(i, source, &copy) {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// Keeps the copies up to date for as long as keeld runs. A failure is logged once
    /// per kind, and retried at the next period.
    pub async fn follow(self) {
        let mut last_error: Option<String> = None;
        loop {
            tokio::time::sleep(FOLLOW_PERIOD).await;
            let this = self.clone();
            let synced = tokio::task::spawn_blocking(move || this.sync())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match synced {
                Ok(0) => last_error = None,
                Ok(n) => {
                    last_error = None;
                    tracing::info!(
                        files = n,
                        "the host's hosts or resolv.conf changed; containers see it"
                    );
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_deref() != Some(&text) {
                        tracing::warn!(dir = %self.dir.display(), error = %text, "cannot update the containers' copies of /etc/hosts and /etc/resolv.conf");
                    }
                    last_error = Some(text);
                }
            }
        }
    }
}

impl HostFiles {
    /// [`sync_one`] unless the source and the copy have the stamps they had when they
    /// were last found equal (or made so); answers whether the copy was rewritten.
    fn sync_if_changed(&self, i: usize, source: &Path, copy: &Path) -> std::io::Result<bool> {
        let stamps = || -> std::io::Result<Option<Stamps>> {
            // A missing source reads as empty, so its stamp is that of no file at all:
            // one that appears changes it.
            let source = Stamp::of(source)?.unwrap_or(Stamp {
                dev: 0,
                ino: 0,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            });
            Ok(Stamp::of(copy)?.map(|copy| (source, copy)))
        };
        // Taken before the first `stat`: a write after it lands in a later tick than any
        // change this old, so it changes the stamp.
        let began = SystemTime::now();
        let before = stamps()?;
        // The lock only guards the small array: two syncs at once (a container's start
        // beside the follower) each compare and write in place, which is idempotent.
        let seen = |this: &Self| {
            this.seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[i]
        };
        if before.is_some() && before == seen(self) {
            return Ok(false);
        }
        self.compared
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rewritten = sync_one(source, copy)?;
        // Trusted only when neither file changed during the comparison (a rewritten copy
        // did) and both last changes are settled: otherwise the next period compares the
        // bytes again.
        let after = stamps()?;
        let trusted =
            after.filter(|(s, c)| Some((*s, *c)) == before && s.settled(began) && c.settled(began));
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[i] = trusted;
        Ok(rewritten)
    }
}

/// Rewrites `copy` in place with `source`'s bytes when they differ; answers whether it
/// did.
fn sync_one(source: &Path, copy: &Path) -> std::io::Result<bool> {
    let wanted = match std::fs::File::open(source) {
        Ok(file) => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_BYTES + 1), &mut bytes)?;
            if bytes.len() as u64 > MAX_BYTES {
                return Err(std::io::Error::other(format!(
                    "{} is larger than {MAX_BYTES} bytes: not copied",
                    source.display()
                )));
            }
            bytes
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(copy)?;
    let mut current = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(&file, MAX_BYTES + 1), &mut current)?;
    if current == wanted {
        return Ok(false);
    }
    file.write_all_at(&wanted, 0)?;
    file.set_len(wanted.len() as u64)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, HostFiles) {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = HostFiles::with_sources(
            dir.path().join("copies"),
            dir.path().join("hosts"),
            dir.path().join("resolv.conf"),
        );
        (dir, files)
    }

    /// A source replaced by rename (as keeld's apply replaces it) reaches the copy,
    /// whose inode (what a container's bind mount holds) stays the same.
    #[test]
    fn a_replaced_source_is_copied_in_place() {
        let (dir, files) = files();
        std::fs::write(
            dir.path().join("resolv.conf"),
            "nameserver 10.0.0.2\nsearch a.example b.example\n",
        )
        .expect("write");
        // resolv.conf copied; no hosts source: its copy is made empty, no change.
        assert_eq!(files.sync().expect("sync"), 1);
        let inode = std::fs::metadata(files.resolv_conf()).expect("stat").ino();
        let next = dir.path().join("resolv.conf.new");
        std::fs::write(&next, "nameserver 10.0.0.3\n").expect("write");
        std::fs::rename(&next, dir.path().join("resolv.conf")).expect("rename");
        assert_eq!(files.sync().expect("sync"), 1);
        assert_eq!(
            std::fs::read_to_string(files.resolv_conf()).expect("read"),
            "nameserver 10.0.0.3\n"
        );
        assert_eq!(
            std::fs::metadata(files.resolv_conf()).expect("stat").ino(),
            inode
        );
        // Nothing changed: nothing written.
        assert_eq!(files.sync().expect("sync"), 0);
    }

    /// A hosts file as large as the settings allow is copied whole; one past the limit
    /// is an error that leaves the copy as it was (never cut in the middle of a line),
    /// and does not hold back resolv.conf.
    #[test]
    fn a_large_source_is_copied_whole_and_one_too_large_not_at_all() {
        let (dir, files) = files();
        let line = format!("10.0.0.1 {}\n", "h".repeat(250));
        let large = line.repeat((5 << 20) / line.len());
        std::fs::write(dir.path().join("hosts"), &large).expect("write");
        files.sync().expect("sync");
        assert_eq!(std::fs::read_to_string(files.hosts()).expect("read"), large);
        let too_large = line.repeat((9 << 20) / line.len());
        std::fs::write(dir.path().join("hosts"), &too_large).expect("write");
        std::fs::write(dir.path().join("resolv.conf"), "nameserver 10.0.0.9\n").expect("write");
        let err = files.sync().expect_err("too large");
        assert!(err.to_string().contains("larger than"), "{err}");
        assert_eq!(std::fs::read_to_string(files.hosts()).expect("read"), large);
        assert_eq!(
            std::fs::read_to_string(files.resolv_conf()).expect("read"),
            "nameserver 10.0.0.9\n"
        );
    }

    /// Once both files' last changes are a second old and the bytes were found equal,
    /// a period costs two `stat`s per file and reads nothing, until a file changes,
    /// in place or by rename.
    #[test]
    fn unchanged_files_are_not_read_again() {
        let (dir, files) = files();
        let compared = || files.compared.load(std::sync::atomic::Ordering::Relaxed);
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "10.0.0.1 a\n").expect("write");
        assert_eq!(files.sync().expect("sync"), 1);
        // The copy was just written: not trusted yet, compared again.
        let before = compared();
        assert_eq!(files.sync().expect("sync"), 0);
        assert_eq!(compared(), before + 2);
        std::thread::sleep(STAMP_SETTLED + Duration::from_millis(100));
        assert_eq!(files.sync().expect("sync"), 0);
        let settled = compared();
        for _ in 0..3 {
            assert_eq!(files.sync().expect("sync"), 0);
        }
        assert_eq!(compared(), settled, "nothing read while nothing changed");
        // Changed in place, same size: the change time moved.
        std::fs::write(&hosts, "10.0.0.2 a\n").expect("write");
        assert_eq!(files.sync().expect("sync"), 1);
        assert_eq!(
            std::fs::read_to_string(files.hosts()).expect("read"),
            "10.0.0.2 a\n"
        );
        // Replaced by rename: another file.
        std::thread::sleep(STAMP_SETTLED + Duration::from_millis(100));
        files.sync().expect("sync");
        let next = dir.path().join("hosts.new");
        std::fs::write(&next, "10.0.0.3 a\n").expect("write");
        std::fs::rename(&next, &hosts).expect("rename");
        assert_eq!(files.sync().expect("sync"), 1);
        assert_eq!(
            std::fs::read_to_string(files.hosts()).expect("read"),
            "10.0.0.3 a\n"
        );
    }

    /// No /etc/hosts on the host: the copy is an empty file, so a container mounting
    /// it still starts; once the source appears it is copied.
    #[test]
    fn a_missing_source_is_an_empty_copy_until_it_appears() {
        let (dir, files) = files();
        files.sync().expect("sync");
        assert_eq!(std::fs::read(files.hosts()).expect("read"), b"");
        std::fs::write(dir.path().join("hosts"), "127.0.0.1 localhost\n").expect("write");
        assert_eq!(files.sync().expect("sync"), 1);
        assert_eq!(
            std::fs::read_to_string(files.hosts()).expect("read"),
            "127.0.0.1 localhost\n"
        );
    }
}
