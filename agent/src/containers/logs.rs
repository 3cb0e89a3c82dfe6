//! Reading a container's output back: the tail of what `keel-logger` kept in
//! `<runtime dir>/logs/<id>/console.log` (and the rotated `console.log.1`), and what
//! was written after a [`Cursor`], for `apiclient logs --follow`.
//!
//! Must not write: the files are `keel-logger`'s, which rotates `console.log` to
//! `console.log.1` (a rename, so the file travels with the name) when it reaches 1 MiB,
//! and only ever appends. A cursor therefore names a file by what cannot change while
//! it exists ([`FileId`]), not by its name, and survives one rotation; after two, the
//! bytes between are gone and the reader is told so.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::UNIX_EPOCH;

/// The most `GET /containers/{name}/logs` answers in one response.
pub const MAX_TAIL: u64 = 2 << 20;

/// How many bytes from a file's start go into its [`FileId`].
const HEAD: u64 = 64;

/// One log file, told apart from any other that may later take its inode number
/// (ext4 reuses a freed inode at once; tmpfs, the usual runtime directory, does not):
/// its inode, its birth time where the filesystem records one, and a checksum of its
/// first bytes, which an append-only file never changes. All zero: no file (the reader
/// started before the container wrote anything). Two files pass for one only if ext4
/// gave a freed inode number to a file born in the same clock tick (a few
/// milliseconds) that starts with the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileId {
    pub inode: u64,
    /// Nanoseconds since the epoch; 0 where the filesystem has no birth time.
    pub birth: u64,
    /// How many bytes the checksum covers: up to 64, fewer for a file that held fewer
    /// when the cursor was made.
    pub head_len: u64,
    pub head_crc: u32,
}

impl FileId {
    fn is_none(&self) -> bool {
        *self == FileId::default()
    }

    /// The identity of an open log file `len` bytes long.
    fn of(file: &mut File, metadata: &std::fs::Metadata) -> std::io::Result<FileId> {
        let birth = metadata
            .created()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let head = read_range(file, 0, HEAD.min(metadata.len()))?;
        Ok(FileId {
            inode: metadata.ino(),
            birth,
            head_len: head.len() as u64,
            head_crc: crc32fast::hash(&head),
        })
    }

    /// Whether the open file is the one this identity was taken from.
    fn matches(&self, file: &mut File, metadata: &std::fs::Metadata) -> std::io::Result<bool> {
        if self.is_none() || metadata.ino() != self.inode || metadata.len() < self.head_len {
            return Ok(false);
        }
        let now = FileId::of(file, metadata)?;
        if now.birth != self.birth {
            return Ok(false);
        }
        let head = read_range(file, 0, self.head_len)?;
        Ok(crc32fast::hash(&head) == self.head_crc)
    }
}

/// Where a reader is in a container's output: a log file and the offset of the next
/// byte to read in it. Written `<inode>-<birth>-<head_len>-<head_crc>-<offset>`, as in
/// the `x-keel-log-cursor` header; clients treat it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub file: FileId,
    pub offset: u64,
}

impl Cursor {
    /// Parses the written form: five decimal numbers separated by `-`.
    pub fn parse(text: &str) -> Option<Cursor> {
        let mut numbers = text.split('-').map(|s| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().ok())
                .flatten()
        });
        let mut next = || numbers.next().flatten();
        let cursor = Cursor {
            file: FileId {
                inode: next()?,
                birth: next()?,
                head_len: next().filter(|len| *len <= HEAD)?,
                head_crc: u32::try_from(next()?).ok()?,
            },
            offset: next()?,
        };
        if numbers.next().is_some() {
            return None;
        }
        Some(cursor)
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let FileId {
            inode,
            birth,
            head_len,
            head_crc,
        } = self.file;
        write!(f, "{inode}-{birth}-{head_len}-{head_crc}-{}", self.offset)
    }
}

/// Output read from the logs, and where the next read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub bytes: Vec<u8>,
    pub cursor: Cursor,
    /// Output written after the given cursor was lost (rotated away twice): `bytes` is
    /// the newest output instead.
    pub gap: bool,
}

/// The last `tail` bytes of the container's output (older file first), or an empty
/// vector when it has written nothing yet.
pub fn read_tail(log_dir: &Path, tail: u64) -> std::io::Result<Vec<u8>> {
    Ok(read_tail_chunk(log_dir, tail)?.bytes)
}

/// [`read_tail`], with the cursor just after the last byte returned.
pub fn read_tail_chunk(log_dir: &Path, tail: u64) -> std::io::Result<Chunk> {
    let tail = tail.min(MAX_TAIL);
    let Some((mut current, metadata)) = open(&log_dir.join("console.log"))? else {
        return Ok(Chunk {
            bytes: Vec::new(),
            cursor: Cursor::default(),
            gap: false,
        });
    };
    let file = FileId::of(&mut current, &metadata)?;
    let start = metadata.len().saturating_sub(tail);
    let mut bytes = read_range(&mut current, start, tail)?;
    let cursor = Cursor {
        file,
        offset: start + bytes.len() as u64,
    };
    let missing = tail.saturating_sub(bytes.len() as u64);
    if missing > 0 {
        if let Some((mut older, older_metadata)) = open(&log_dir.join("console.log.1"))? {
            let from = older_metadata.len().saturating_sub(missing);
            let mut head = read_range(&mut older, from, missing)?;
            head.append(&mut bytes);
            bytes = head;
        }
    }
    Ok(Chunk {
        bytes,
        cursor,
        gap: false,
    })
}

/// What was written after `cursor`, at most `max` bytes (the oldest first; call again
/// with the returned cursor for the rest).
pub fn read_since(log_dir: &Path, cursor: Cursor, max: u64) -> std::io::Result<Chunk> {
    let max = max.min(MAX_TAIL);
    let Some((mut current, metadata)) = open(&log_dir.join("console.log"))? else {
        // Nothing written yet, or the log was removed with its container: start over
        // from whatever file appears next.
        return Ok(Chunk {
            bytes: Vec::new(),
            cursor: Cursor::default(),
            gap: false,
        });
    };
    let before_any_output = cursor.file.is_none();
    if !before_any_output
        && cursor.offset <= metadata.len()
        && cursor.file.matches(&mut current, &metadata)?
    {
        let bytes = read_range(&mut current, cursor.offset, max)?;
        return Ok(Chunk {
            cursor: Cursor {
                file: cursor.file,
                offset: cursor.offset + bytes.len() as u64,
            },
            bytes,
            gap: false,
        });
    }
    let mut older = open(&log_dir.join("console.log.1"))?;
    // The cursor's file was rotated once since (it is `console.log.1` now), or the
    // reader started before the log existed: read the older file on from the cursor
    // (from its start), then the current one from its start.
    let older_is_cursors = match older.as_mut() {
        Some((file, older_metadata)) if !before_any_output => {
            cursor.offset <= older_metadata.len() && cursor.file.matches(file, older_metadata)?
        }
        _ => false,
    };
    let start_in_older = match older.as_mut() {
        Some((file, older_metadata)) if before_any_output => {
            Some((0, FileId::of(file, older_metadata)?, older_metadata.len()))
        }
        Some((_, older_metadata)) if older_is_cursors => {
            Some((cursor.offset, cursor.file, older_metadata.len()))
        }
        None if before_any_output => None,
        // Rotated away twice: what came between is gone. Give the newest output, and
        // say so.
        _ => {
            let chunk = read_tail_chunk(log_dir, max)?;
            return Ok(Chunk { gap: true, ..chunk });
        }
    };
    let mut bytes = Vec::new();
    if let (Some((start, file_id, len)), Some((file, _))) = (start_in_older, older.as_mut()) {
        bytes = read_range(file, start, max)?;
        let end = start + bytes.len() as u64;
        if end < len {
            // The answer is full before the older file is done: go on there next time.
            return Ok(Chunk {
                bytes,
                cursor: Cursor {
                    file: file_id,
                    offset: end,
                },
                gap: false,
            });
        }
    }
    let current_id = FileId::of(&mut current, &metadata)?;
    let room = max - bytes.len() as u64;
    let mut newer = read_range(&mut current, 0, room)?;
    let offset = newer.len() as u64;
    bytes.append(&mut newer);
    Ok(Chunk {
        bytes,
        cursor: Cursor {
            file: current_id,
            offset,
        },
        gap: false,
    })
}

/// The file and its metadata (from the descriptor: what it names cannot change under
/// us, whatever the logger renames meanwhile), or `None` if there is none.
fn open(path: &Path) -> std::io::Result<Option<(File, std::fs::Metadata)>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let metadata = file.metadata()?;
    Ok(Some((file, metadata)))
}

/// Up to `n` bytes from `start`.
fn read_range(file: &mut File, start: u64, n: u64) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(start))?;
    let mut out = Vec::new();
    file.take(n).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Appends as keel-logger does: one file, rotated by rename.
    struct Writer<'a> {
        dir: &'a Path,
    }

    impl Writer<'_> {
        fn write(&self, bytes: &[u8]) {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("console.log"))
                .expect("open");
            file.write_all(bytes).expect("write");
        }

        fn rotate(&self) {
            std::fs::rename(self.dir.join("console.log"), self.dir.join("console.log.1"))
                .expect("rotate");
        }
    }

    #[test]
    fn tail_spans_the_rotated_file() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("console.log.1"), b"old-1\nold-2\n").expect("write");
        std::fs::write(dir.path().join("console.log"), b"new\n").expect("write");
        assert_eq!(read_tail(dir.path(), 4).expect("tail"), b"new\n");
        assert_eq!(read_tail(dir.path(), 10).expect("tail"), b"old-2\nnew\n");
        assert_eq!(
            read_tail(dir.path(), 1000).expect("tail"),
            b"old-1\nold-2\nnew\n"
        );
        let empty = tempfile::tempdir().expect("dir");
        assert!(read_tail(empty.path(), 10).expect("tail").is_empty());
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let cursor = Cursor {
            file: FileId {
                inode: 42,
                birth: 1_700_000_000_123_456_789,
                head_len: 64,
                head_crc: u32::MAX,
            },
            offset: 7,
        };
        assert_eq!(Cursor::parse(&cursor.to_string()), Some(cursor));
        assert_eq!(Cursor::parse("0-0-0-0-0"), Some(Cursor::default()));
        for bad in [
            "",
            "1-2-3-4",
            "1-2-3-4-5-6",
            "1-2-65-4-5",
            "1-2-3-4294967296-5",
            "1-2-3-4-+5",
            "a-2-3-4-5",
            "99999999999999999999-0-0-0-0",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn following_reads_every_byte_once_across_a_rotation() {
        let dir = tempfile::tempdir().expect("dir");
        let log = Writer { dir: dir.path() };
        // Before any output.
        let first = read_tail_chunk(dir.path(), 100).expect("tail");
        assert!(first.bytes.is_empty());
        log.write(b"one\n");
        let chunk = read_since(dir.path(), first.cursor, MAX_TAIL).expect("since");
        assert_eq!((chunk.bytes.as_slice(), chunk.gap), (&b"one\n"[..], false));
        let chunk = read_since(dir.path(), chunk.cursor, MAX_TAIL).expect("since");
        assert!(chunk.bytes.is_empty(), "nothing new");
        log.write(b"two\n");
        log.rotate();
        log.write(b"three\n");
        let chunk = read_since(dir.path(), chunk.cursor, MAX_TAIL).expect("since");
        assert_eq!(chunk.bytes, b"two\nthree\n");
        assert!(!chunk.gap);
        log.write(b"four\n");
        let chunk = read_since(dir.path(), chunk.cursor, MAX_TAIL).expect("since");
        assert_eq!(chunk.bytes, b"four\n");
    }

    #[test]
    fn a_small_limit_resumes_inside_the_older_file() {
        let dir = tempfile::tempdir().expect("dir");
        let log = Writer { dir: dir.path() };
        log.write(b"a");
        let start = read_tail_chunk(dir.path(), 0).expect("tail");
        log.write(b"bcdef");
        log.rotate();
        log.write(b"gh");
        let mut cursor = start.cursor;
        let mut seen = Vec::new();
        for _ in 0..5 {
            let chunk = read_since(dir.path(), cursor, 2).expect("since");
            assert!(chunk.bytes.len() <= 2 && !chunk.gap);
            seen.extend_from_slice(&chunk.bytes);
            cursor = chunk.cursor;
        }
        assert_eq!(seen, b"bcdefgh");
    }

    #[test]
    fn two_rotations_are_a_gap_never_silent() {
        let dir = tempfile::tempdir().expect("dir");
        let log = Writer { dir: dir.path() };
        log.write(b"first\n");
        let start = read_tail_chunk(dir.path(), 100).expect("tail");
        log.rotate();
        log.write(b"lost\n");
        log.rotate();
        log.write(b"newest\n");
        let chunk = read_since(dir.path(), start.cursor, MAX_TAIL).expect("since");
        assert!(chunk.gap);
        assert_eq!(chunk.bytes, b"lost\nnewest\n", "the newest output instead");
        let next = read_since(dir.path(), chunk.cursor, MAX_TAIL).expect("since");
        assert!(!next.gap && next.bytes.is_empty());
    }

    #[test]
    fn a_removed_log_starts_over() {
        let dir = tempfile::tempdir().expect("dir");
        let log = Writer { dir: dir.path() };
        log.write(b"x\n");
        let start = read_tail_chunk(dir.path(), 100).expect("tail");
        std::fs::remove_file(dir.path().join("console.log")).expect("rm");
        let chunk = read_since(dir.path(), start.cursor, MAX_TAIL).expect("since");
        assert_eq!(chunk.cursor, Cursor::default());
        log.write(b"again\n");
        let chunk = read_since(dir.path(), chunk.cursor, MAX_TAIL).expect("since");
        assert_eq!(chunk.bytes, b"again\n");
    }
}
