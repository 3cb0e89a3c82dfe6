//! `pending.log`: the pending transactions, appended.
//!
//! A batch that changes pending transactions appends one line per transaction it
//! changed, all in one `pwrite`: `put` (the transaction's whole state: name, id and
//! patches) or `gone` (its id: discarded, or committed without a new generation). A
//! PATCH so costs one write of its own transaction, whatever else is pending, and no
//! file is created or unlinked (an inode per PATCH was a quarter of keeld's CPU per
//! commit). Reading takes, per id, the last line that passes its check; a `gone` ends
//! the id.
//!
//! A line is `<crc32 of the JSON, 8 hex digits> <JSON>\n`; JSON strings escape newlines,
//! so a line is one record. Appends go at the end of the last good write (`pwrite` at a
//! remembered offset, not `O_APPEND`). A write that fails may still have landed some of
//! its lines whole (a short write, then ENOSPC): they belong to a batch that was refused,
//! so the file is cut back to the last good write at once, and no append goes out
//! before that cut has succeeded.
//!
//! Nothing here is fsync'd, deliberately: a pending transaction is uncommitted work, and
//! a flush per PATCH would halve commit throughput. A keeld crash (SIGKILL, panic) loses
//! nothing (every finished `pwrite` is in the page cache; the one in progress, torn,
//! fails its check). After a power loss, pending transactions may be older, or gone;
//! committed generations do not depend on this file.
//!
//! Transactions committed into a generation get no line: the committed state records
//! which ids were still pending and the next id to be given, and the store's `load`
//! drops the others (see `files`). When the log has grown past twice what it holds live
//! (at least [`COMPACT_MIN`]), the live transactions are written to
//! `pending.log.tmp`, which is renamed over the log (ext4 starts writeback of a file
//! renamed over another, so the replacement rarely lands empty even after a power
//! loss); each byte appended is so rewritten at most about once, and the file stays
//! within twice the pending transactions' size (at most 128 of 4 MiB each). `load`
//! always writes the log afresh, which also cuts a torn tail before anything is
//! appended after it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::PendingTx;

pub(super) const NAME: &str = "pending.log";
pub(super) const TMP: &str = "pending.log.tmp";
/// The log may grow to this before a compaction, however little is live.
pub(super) const COMPACT_MIN: u64 = 64 * 1024;
/// `<8 hex digits> `.
const PREFIX: usize = 9;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Record {
    Put { name: String, tx: PendingTx },
    Gone { id: u64 },
}

/// [`Record`], borrowed, for writing.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Change<'a> {
    Put { name: &'a str, tx: &'a PendingTx },
    Gone { id: u64 },
}

/// What a read of the log found.
#[derive(Debug, Default)]
pub(super) struct Read {
    /// Per id, its name and last state.
    pub transactions: BTreeMap<u64, (String, PendingTx)>,
    /// Every id a good line names, pending or gone: the log speaks for these ids over
    /// the files of the previous forms.
    pub seen: std::collections::BTreeSet<u64>,
    /// Lines that failed their check (a torn tail, or what a power loss left).
    pub unreadable: usize,
}

/// A transaction the log holds, and the bytes of its last line.
#[derive(Debug)]
struct Live {
    name: String,
    bytes: u64,
}

#[derive(Debug)]
pub(super) struct PendingLog {
    dir: PathBuf,
    /// Opened by the first [`PendingLog::rewrite`].
    file: Option<File>,
    /// The end of the last good write: the next append goes here.
    len: u64,
    live: BTreeMap<u64, Live>,
    live_bytes: u64,
    /// The line buffer, kept between appends.
    buffer: Vec<u8>,
    /// A failed write may have left lines beyond `len`: cut them before the next append.
    cut_pending: bool,
}

impl PendingLog {
    pub(super) fn new(dir: &Path) -> PendingLog {
        PendingLog {
            dir: dir.to_owned(),
            file: None,
            len: 0,
            live: BTreeMap::new(),
            live_bytes: 0,
            buffer: Vec::new(),
            cut_pending: false,
        }
    }

    pub(super) fn path(&self) -> PathBuf {
        self.dir.join(NAME)
    }

    /// Reads the log in `dir`; a missing one holds nothing.
    pub(super) fn read(dir: &Path) -> io::Result<Read> {
        let bytes = match fs::read(dir.join(NAME)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::default()),
            Err(e) => return Err(e),
        };
        Ok(parse(&bytes))
    }

    /// Replaces the log with one holding exactly `pending` (see the module comment).
    pub(super) fn rewrite(&mut self, pending: &BTreeMap<String, PendingTx>) -> io::Result<()> {
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let mut live = BTreeMap::new();
        let mut live_bytes = 0;
        for (name, tx) in pending {
            let bytes = encode(&mut buffer, &Change::Put { name, tx })?;
            live.insert(
                tx.id,
                Live {
                    name: name.clone(),
                    bytes,
                },
            );
            live_bytes += bytes;
        }
        let tmp = self.dir.join(TMP);
        let written = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(&buffer)?;
                fs::rename(&tmp, self.dir.join(NAME))?;
                Ok(file)
            });
        let len = buffer.len() as u64;
        self.buffer = buffer;
        match written {
            Ok(file) => {
                // The handle names the renamed file: appends go to the new log.
                self.file = Some(file);
                self.len = len;
                self.live = live;
                self.live_bytes = live_bytes;
                self.cut_pending = false;
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Appends `changes` in one write. On an error nothing counts as written, and what
    /// of it landed is cut off (see the module comment).
    pub(super) fn append(&mut self, changes: &[Change<'_>]) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Err(io::Error::other("the pending log was not opened"));
        };
        if self.cut_pending {
            file.set_len(self.len)?;
            self.cut_pending = false;
        }
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let mut sizes = Vec::with_capacity(changes.len());
        let mut result = Ok(());
        for change in changes {
            match encode(&mut buffer, change) {
                Ok(bytes) => sizes.push(bytes),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = file.write_all_at(&buffer, self.len);
            if result.is_err() {
                self.cut_pending = file.set_len(self.len).is_err();
            }
        }
        if result.is_ok() {
            self.len += buffer.len() as u64;
            for (change, bytes) in changes.iter().zip(sizes) {
                match change {
                    Change::Put { name, tx } => {
                        let old = self.live.insert(
                            tx.id,
                            Live {
                                name: (*name).to_owned(),
                                bytes,
                            },
                        );
                        self.live_bytes += bytes;
                        self.live_bytes -= old.map_or(0, |l| l.bytes);
                    }
                    Change::Gone { id } => self.forget(*id),
                }
            }
        }
        self.buffer = buffer;
        result
    }

    /// Stops counting `id` as live without writing anything (committed: `load` drops it).
    pub(super) fn forget(&mut self, id: u64) {
        if let Some(old) = self.live.remove(&id) {
            self.live_bytes -= old.bytes;
        }
    }

    /// The ids the log holds under `name`.
    pub(super) fn ids_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u64> + 'a {
        self.live
            .iter()
            .filter(move |(_, live)| live.name == name)
            .map(|(id, _)| *id)
    }

    /// The names of the transactions the log holds.
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.live.values().map(|live| live.name.as_str())
    }

    /// Whether the log has grown enough past what it holds to be rewritten.
    pub(super) fn compaction_due(&self) -> bool {
        self.len > COMPACT_MIN.max(self.live_bytes.saturating_mul(2))
    }

    /// Bytes written since the last rewrite, and after it.
    #[cfg(test)]
    pub(super) fn len(&self) -> u64 {
        self.len
    }
}

/// Appends `change` as one line to `buffer`; returns the line's length.
fn encode(buffer: &mut Vec<u8>, change: &Change<'_>) -> io::Result<u64> {
    let start = buffer.len();
    buffer.extend_from_slice(b"00000000 ");
    serde_json::to_writer(&mut *buffer, change).map_err(io::Error::other)?;
    let crc = crc32fast::hash(&buffer[start + PREFIX..]);
    buffer[start..start + PREFIX - 1].copy_from_slice(format!("{crc:08x}").as_bytes());
    buffer.push(b'\n');
    Ok((buffer.len() - start) as u64)
}

/// Reads every line; see the module comment.
fn parse(bytes: &[u8]) -> Read {
    let mut read = Read::default();
    for line in bytes.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match decode(line) {
            Some(Record::Put { name, tx }) => {
                read.seen.insert(tx.id);
                read.transactions.insert(tx.id, (name, tx));
            }
            Some(Record::Gone { id }) => {
                read.seen.insert(id);
                read.transactions.remove(&id);
            }
            None => read.unreadable += 1,
        }
    }
    read
}

fn decode(line: &[u8]) -> Option<Record> {
    let (head, json) = (line.get(..PREFIX)?, line.get(PREFIX..)?);
    if head[PREFIX - 1] != b' ' {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(&head[..PREFIX - 1]).ok()?, 16).ok()?;
    if crc32fast::hash(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn tx(id: u64, motd: &str) -> PendingTx {
        PendingTx {
            id,
            patches: vec![Arc::new(json!({ "motd": motd }))],
            bytes: 10,
        }
    }

    /// Appends one `put` of transaction `id` under `name`, holding `motd`.
    fn put(log: &mut PendingLog, name: &str, id: u64, motd: &str) -> io::Result<()> {
        log.append(&[Change::Put {
            name,
            tx: &tx(id, motd),
        }])
    }

    /// The names of the transactions a read found, by id.
    fn names(read: &Read) -> Vec<&str> {
        read.transactions
            .values()
            .map(|(n, _)| n.as_str())
            .collect()
    }

    #[test]
    fn the_last_good_line_of_each_id_wins_and_gone_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PendingLog::new(dir.path());
        log.rewrite(&BTreeMap::new()).unwrap();
        let (a1, a2, b) = (tx(1, "a1"), tx(1, "a2"), tx(2, "b"));
        log.append(&[
            Change::Put { name: "a", tx: &a1 },
            Change::Put { name: "b", tx: &b },
        ])
        .unwrap();
        log.append(&[Change::Put { name: "a", tx: &a2 }]).unwrap();
        log.append(&[Change::Gone { id: 2 }]).unwrap();
        let read = PendingLog::read(dir.path()).unwrap();
        assert_eq!(read.unreadable, 0);
        assert_eq!(read.transactions.len(), 1);
        assert_eq!(read.transactions[&1], ("a".to_owned(), a2));
        assert_eq!(log.names().collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn a_torn_or_corrupted_line_is_skipped_and_the_previous_state_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PendingLog::new(dir.path());
        log.rewrite(&BTreeMap::new()).unwrap();
        put(&mut log, "a", 1, "old").unwrap();
        put(&mut log, "a", 1, "new").unwrap();
        let path = dir.path().join(NAME);
        let whole = fs::read(&path).unwrap();
        // One byte of the newest line's JSON flipped: its check fails.
        let mut flipped = whole.clone();
        let at = flipped.len() - 5;
        flipped[at] ^= 0x20;
        fs::write(&path, &flipped).unwrap();
        let read = PendingLog::read(dir.path()).unwrap();
        assert_eq!(read.unreadable, 1);
        assert_eq!(read.transactions[&1].1, tx(1, "old"));
        // The newest line cut short, and zeros after it (what a power loss can leave).
        let mut torn = whole[..whole.len() - 7].to_vec();
        torn.extend_from_slice(&[0; 300]);
        fs::write(&path, &torn).unwrap();
        let read = PendingLog::read(dir.path()).unwrap();
        assert_eq!(read.unreadable, 1);
        assert_eq!(read.transactions[&1].1, tx(1, "old"));
    }

    #[test]
    fn an_append_after_a_short_write_overwrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PendingLog::new(dir.path());
        log.rewrite(&BTreeMap::new()).unwrap();
        put(&mut log, "a", 1, "a").unwrap();
        // What a write cut short left beyond the last good one.
        let file = OpenOptions::new().write(true).open(log.path()).unwrap();
        let torn = format!("0123abcd {{\"put\":{{\"name\":\"{}", "x".repeat(300));
        file.write_all_at(torn.as_bytes(), log.len()).unwrap();
        put(&mut log, "b", 2, "b").unwrap();
        let read = PendingLog::read(dir.path()).unwrap();
        assert_eq!(names(&read), vec!["a", "b"]);
        assert_eq!(read.unreadable, 1, "the rest of the short write");
    }

    #[test]
    fn lines_of_a_failed_write_that_landed_are_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PendingLog::new(dir.path());
        log.rewrite(&BTreeMap::new()).unwrap();
        put(&mut log, "a", 1, "a").unwrap();
        let good = log.len();
        // The file is read-only to the writer from now on: the next write fails.
        let path = log.path();
        log.file = Some(File::open(&path).unwrap());
        assert!(log
            .append(&[Change::Put {
                name: "b",
                tx: &tx(2, "b"),
            }])
            .is_err());
        assert_eq!(log.len(), good);
        // The cut could not be made either (read-only handle): the next append tries
        // it first and fails rather than writing after what may have landed.
        assert!(log.cut_pending);
        // Lines of the refused write that landed whole, as after a short write.
        let refused = {
            let mut buffer = Vec::new();
            encode(
                &mut buffer,
                &Change::Put {
                    name: "b",
                    tx: &tx(2, "b"),
                },
            )
            .unwrap();
            buffer
        };
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&refused, good)
            .unwrap();
        log.file = Some(OpenOptions::new().write(true).open(&path).unwrap());
        put(&mut log, "c", 3, "c").unwrap();
        let read = PendingLog::read(dir.path()).unwrap();
        assert_eq!(names(&read), vec!["a", "c"], "the refused b is not revived");
        assert_eq!(read.unreadable, 0);
    }

    #[test]
    fn compaction_is_due_only_once_the_log_outgrows_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PendingLog::new(dir.path());
        let mut pending = BTreeMap::new();
        pending.insert("a".to_owned(), tx(1, "a"));
        log.rewrite(&pending).unwrap();
        let mut rounds = 0;
        while !log.compaction_due() {
            let next = tx(1, &format!("a{rounds}"));
            log.append(&[Change::Put {
                name: "a",
                tx: &next,
            }])
            .unwrap();
            pending.insert("a".to_owned(), next);
            rounds += 1;
        }
        assert!(log.len() > COMPACT_MIN && rounds > 100, "{rounds} appends");
        log.rewrite(&pending).unwrap();
        assert!(!log.compaction_due());
        assert!(log.len() < 100, "{}", log.len());
        let read = PendingLog::read(dir.path()).unwrap();
        assert_eq!(read.transactions[&1].1, pending["a"]);
        assert!(!dir.path().join(TMP).exists());
        // Appends after a rewrite go to the new file.
        log.append(&[Change::Gone { id: 1 }]).unwrap();
        assert!(PendingLog::read(dir.path())
            .unwrap()
            .transactions
            .is_empty());
    }
}
