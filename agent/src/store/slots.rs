//! Two slot files, `generations.0` and `generations.1`, holding the committed state.
//!
//! Each write goes to the slot that does *not* hold the newest durable state, as one
//! `pwrite` of a header (magic, sequence number, length, CRC-32 of the payload) and the
//! payload, followed by `fdatasync`. The slots are preallocated and only grow rarely, so
//! the file size and block map do not change on an ordinary write and `fdatasync` has
//! one thing to flush: the data. That is one synchronous write per commit, where
//! temp file + fsync + rename + fsync of the directory costs four.
//!
//! Why it is atomic: a crash (or power loss) during a write can tear only the slot being
//! written; its CRC then fails and `open` takes the other slot, which holds the newest
//! state that was acknowledged (a write is acknowledged only after its `fdatasync`).
//! Why it is durable: the answer waits for `fdatasync`; when a slot must grow, the write
//! uses a full `fsync`, since its size changed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const NAMES: [&str; 2] = ["generations.0", "generations.1"];
const MAGIC: &[u8; 8] = b"KEELGEN1";
const HEADER: usize = 32;
/// Slots start at this size and grow in multiples of it.
const CHUNK: u64 = 64 * 1024;

/// What a slot holds.
enum SlotState {
    /// Never written (all zero).
    Empty,
    Valid {
        seq: u64,
        payload: Vec<u8>,
    },
    /// Written, but the header or the CRC does not match: a torn write.
    Torn,
}

#[derive(Debug)]
pub struct Slots {
    files: [File; 2],
    sizes: [u64; 2],
    /// The slot the next write goes to: never the one holding the newest state.
    next: usize,
    /// Sequence number of the newest state.
    seq: u64,
    paths: [PathBuf; 2],
    /// Test hook: fail the next write as a full disk would.
    #[cfg(test)]
    pub fail_next_write: bool,
}

impl Slots {
    /// Opens (creating if needed) both slots in `dir`, and returns the newest valid
    /// payload, if any. `Err(InvalidData)` if slots were written but none is valid.
    pub fn open(dir: &Path, dir_handle: &File) -> io::Result<(Slots, Option<Vec<u8>>)> {
        let mut created = false;
        let mut files = Vec::with_capacity(2);
        let mut sizes = [0u64; 2];
        let mut states = Vec::with_capacity(2);
        for (i, name) in NAMES.iter().enumerate() {
            let path = dir.join(name);
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&path)?;
            let mut size = file.metadata()?.len();
            if size < CHUNK {
                // New (or cut short): give it its room now, durably, so that later
                // writes change no metadata.
                file.set_len(CHUNK)?;
                file.sync_all()?;
                size = CHUNK;
                created = true;
            }
            sizes[i] = size;
            states.push(read_slot(&file, size)?);
            files.push(file);
        }
        if created {
            dir_handle.sync_all()?;
        }
        let mut newest: Option<(usize, u64, Vec<u8>)> = None;
        let mut torn = 0;
        for (i, state) in states.into_iter().enumerate() {
            match state {
                SlotState::Valid { seq, payload } => {
                    if newest.as_ref().is_none_or(|(_, s, _)| seq > *s) {
                        newest = Some((i, seq, payload));
                    }
                }
                SlotState::Torn => torn += 1,
                SlotState::Empty => {}
            }
        }
        if newest.is_none() && torn > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no generation slot holds a valid state (both torn or damaged)",
            ));
        }
        if torn > 0 {
            tracing::warn!(
                "a generation slot was torn (crash during a write); using the other one"
            );
        }
        let [f0, f1]: [File; 2] = files
            .try_into()
            .map_err(|_| io::Error::other("slot files"))?;
        let (next, seq, payload) = match newest {
            Some((i, seq, payload)) => (1 - i, seq, Some(payload)),
            None => (0, 0, None),
        };
        Ok((
            Slots {
                files: [f0, f1],
                sizes,
                next,
                seq,
                paths: [dir.join(NAMES[0]), dir.join(NAMES[1])],
                #[cfg(test)]
                fail_next_write: false,
            },
            payload,
        ))
    }

    /// Durably writes `payload` as the newest state (see the module comment).
    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_write) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let seq = self.seq + 1;
        let mut buf = Vec::with_capacity(HEADER + payload.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        buf.extend_from_slice(&crc32(payload).to_le_bytes());
        buf.extend_from_slice(&[0u8; 4]);
        buf.extend_from_slice(payload);
        let slot = self.next;
        let file = &self.files[slot];
        let needed = buf.len() as u64;
        if needed > self.sizes[slot] {
            let size = needed.div_ceil(CHUNK) * CHUNK * 2;
            file.set_len(size)?;
            file.write_all_at(&buf, 0)?;
            // The size changed: flush metadata too.
            file.sync_all()?;
            self.sizes[slot] = size;
        } else {
            file.write_all_at(&buf, 0)?;
            file.sync_data()?;
        }
        self.seq = seq;
        self.next = 1 - slot;
        Ok(())
    }

    /// Path of the slot the next write goes to (for error messages).
    pub fn next_path(&self) -> &Path {
        &self.paths[self.next]
    }
}

fn read_slot(file: &File, size: u64) -> io::Result<SlotState> {
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, 0)?;
    if header.iter().all(|b| *b == 0) {
        return Ok(SlotState::Empty);
    }
    let field = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    if &header[..8] != MAGIC {
        return Ok(SlotState::Torn);
    }
    let seq = field(8);
    let len = field(16);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&header[24..28]);
    if len > size.saturating_sub(HEADER as u64) {
        return Ok(SlotState::Torn);
    }
    let mut payload = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut payload, HEADER as u64)?;
    if crc32(&payload) != u32::from_le_bytes(crc) {
        return Ok(SlotState::Torn);
    }
    Ok(SlotState::Valid { seq, payload })
}

/// CRC-32 (IEEE 802.3), hardware-accelerated where the CPU allows.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn open(dir: &Path) -> (Slots, Option<Vec<u8>>) {
        Slots::open(dir, &File::open(dir).unwrap()).unwrap()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn newest_write_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut slots, first) = open(dir.path());
        assert!(first.is_none());
        slots.write(b"one").unwrap();
        slots.write(b"two").unwrap();
        slots.write(b"three").unwrap();
        drop(slots);
        let (_, newest) = open(dir.path());
        assert_eq!(newest.as_deref(), Some(&b"three"[..]));
        // Tear the newest slot ("three" went to slot 0: writes alternate 0, 1, 0).
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(NAMES[0]))
            .unwrap();
        f.write_all_at(b"garbage", HEADER as u64).unwrap();
        let (mut slots, newest) = open(dir.path());
        assert_eq!(
            newest.as_deref(),
            Some(&b"two"[..]),
            "the previous state survives"
        );
        // The next write must not overwrite the good slot.
        slots.write(b"four").unwrap();
        let (_, newest) = open(dir.path());
        assert_eq!(newest.as_deref(), Some(&b"four"[..]));
    }

    #[test]
    fn a_slot_grows_when_the_state_does() {
        let dir = tempfile::tempdir().unwrap();
        let (mut slots, _) = open(dir.path());
        let big = vec![b'x'; 200 * 1024];
        slots.write(&big).unwrap();
        slots.write(b"small").unwrap();
        slots.write(&big).unwrap();
        let (_, newest) = open(dir.path());
        assert_eq!(newest.unwrap().len(), big.len());
    }

    #[test]
    fn both_slots_damaged_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let (mut slots, _) = open(dir.path());
        slots.write(b"a").unwrap();
        slots.write(b"b").unwrap();
        for name in NAMES {
            let f = OpenOptions::new()
                .write(true)
                .open(dir.path().join(name))
                .unwrap();
            f.write_all_at(b"xx", HEADER as u64).unwrap();
        }
        let err = Slots::open(dir.path(), &File::open(dir.path()).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
