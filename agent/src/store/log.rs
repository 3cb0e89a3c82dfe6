//! `generations.log`: what was committed since the snapshot in the slots, appended.
//!
//! A commit appends one record holding only what it changed (its new generations, their
//! transaction ids, the first generation still kept, and the pending-transaction
//! record), so its cost follows the size of one generation, not of the whole kept
//! history. When the log has grown past twice the size of the snapshot (at least
//! [`MIN_LOG`]; `files` decides), the next write compacts instead: the whole state goes
//! into a slot, as before the log existed, and the log starts again from its beginning.
//! Each byte of history is so written about one and a half times: the cost of a commit
//! does not grow with the length of the history.
//!
//! # The record
//!
//! Sector by sector, like a slot record (see `slots`), but the 16-byte tag at the end of
//! each 512-byte sector also holds the sector's index within its record: sequence number
//! (8 bytes), index (4), CRC-32 of the data, sequence number and index (4). Sector 0 is the
//! header: magic, sequence number, `base` (the sequence number of the snapshot the log
//! extends), `prev` (the sequence number of the record before, or `base`), live
//! generation, payload length and a CRC-32 of those fields and the whole payload.
//! Sequence numbers come from the same counter as the slots' and are never reused, so a
//! sector names the one write it came from.
//!
//! # Appending
//!
//! A record is written at the end of the log with one `pwrite`, then `fdatasync`. The
//! file's size runs ahead of its records by whole chunks, each growth made durable
//! (`set_len` + `fsync`) before a record uses it, so a record never reaches past the
//! durable end of the file (`set_len` leaves the new chunk sparse: its blocks are
//! allocated as records land, and each record's `fdatasync` makes that allocation
//! durable with it). After a compaction the log is written from its start again: its
//! old records name an older `base`, so they are never taken for part of the new log.
//!
//! A record whose `pwrite` or `fdatasync` fails is refused, yet may have landed: its
//! header sector is then zeroed, durably, so that a restart reads the log as ending
//! before it; if even that fails, the error says the commit may be there after a
//! restart.
//!
//! # Reading, and what a crash leaves
//!
//! `open` walks the chain from the start: each record must name the snapshot as `base`
//! and the record before it as `prev`, and every sector must pass its checksum and carry
//! the record's number and its own index. The walk stops at the first position holding
//! anything else: zeros, a sector of an older record, or the append that was in
//! progress when keeld died, torn (whole sectors, some from this write, some older, as
//! for a slot). The one write that can be in progress is the append at the end, and it
//! was never acknowledged, so a torn tail is cut.
//!
//! Anything else is damage, and `open` refuses (as for a slot, unless the loss is
//! accepted): a sector at the stopping position or in the torn record that fails its
//! checksum, a record cut short, a file shorter than the snapshot recorded or missing,
//! or any sector anywhere in the file numbered after the last record read that is not
//! part of an append starting at the stopping position (records beyond a hole).
//!
//! What the format cannot tell: the newest records zeroed (whole, or just the newest
//! one's header sector), or the log cut at a chunk boundary past the size the snapshot
//! recorded, read like the end of the log: a tail lost that way is lost silently (an
//! append-only log with one flush per commit has nowhere else to record its end), while a
//! hole anywhere before the tail is caught. A lost write the disk acknowledged reads like
//! a tear.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub(super) const NAME: &str = "generations.log";
const MAGIC: &[u8; 8] = b"KEELLOG1";
const SECTOR: usize = 512;
/// Sequence number (8), index (4), CRC-32 (4).
const TAG: usize = 16;
const DATA: usize = SECTOR - TAG;
/// Header fields covered by the record's CRC: magic, seq, base, prev, generation, length.
const FIELDS: usize = 48;
/// The log grows in multiples of this.
const CHUNK: u64 = 256 * 1024;
/// The log may grow to this much before a compaction even if the snapshot is smaller.
pub(super) const MIN_LOG: u64 = 1024 * 1024;

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub seq: u64,
    pub generation: u64,
    pub payload: Vec<u8>,
}

/// What reading the log found.
#[derive(Debug)]
pub(super) struct Scan {
    /// The chain of records after the snapshot, oldest first.
    pub records: Vec<Record>,
    /// Where the next record goes.
    pub end: u64,
    /// The highest sequence number in any sector of the file.
    pub max_seq: u64,
    /// A torn append at the end was cut (its number).
    pub torn: Option<u64>,
    /// Damage: why, and the highest generation it is known to have lost.
    pub damage: Option<(String, Option<u64>)>,
}

#[derive(Debug)]
pub(super) struct Log {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    base: u64,
    /// Where the next record goes.
    end: u64,
    /// The last record's number (`base` when none).
    last: u64,
    /// Test hooks, as for the slots.
    #[cfg(test)]
    pub fail_next_write: bool,
    /// The record is written whole, then `fdatasync` fails (EIO).
    #[cfg(test)]
    pub fail_next_sync: bool,
    #[cfg(test)]
    pub tear_next_write: Option<usize>,
}

struct Tag {
    seq: u64,
    index: u32,
    valid: bool,
    zero: bool,
}

fn sector_crc(data: &[u8], seq: u64, index: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(data);
    hasher.update(&seq.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    hasher.finalize()
}

fn tag_of(sector: &[u8]) -> Tag {
    let zero = sector.iter().all(|b| *b == 0);
    let seq = u64_at(sector, DATA);
    let index = u32_at(sector, DATA + 8);
    let crc = u32_at(sector, DATA + 12);
    Tag {
        seq,
        index,
        valid: !zero && sector_crc(&sector[..DATA], seq, index) == crc,
        zero,
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(field)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(field)
}

fn record_crc(fields: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(fields);
    hasher.update(payload);
    hasher.finalize()
}

pub(super) fn encode(seq: u64, base: u64, prev: u64, generation: u64, payload: &[u8]) -> Vec<u8> {
    let sectors = 1 + payload.len().div_ceil(DATA);
    let mut record = vec![0u8; sectors * SECTOR];
    let header = &mut record[..DATA];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    header[16..24].copy_from_slice(&base.to_le_bytes());
    header[24..32].copy_from_slice(&prev.to_le_bytes());
    header[32..40].copy_from_slice(&generation.to_le_bytes());
    header[40..48].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = record_crc(&header[..FIELDS], payload);
    header[FIELDS..FIELDS + 4].copy_from_slice(&crc.to_le_bytes());
    for (i, chunk) in payload.chunks(DATA).enumerate() {
        let at = (i + 1) * SECTOR;
        record[at..at + chunk.len()].copy_from_slice(chunk);
    }
    for (index, sector) in record.chunks_mut(SECTOR).enumerate() {
        // A record has far fewer than 2^32 sectors (the settings are bounded).
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let crc = sector_crc(&sector[..DATA], seq, index);
        sector[DATA..DATA + 8].copy_from_slice(&seq.to_le_bytes());
        sector[DATA + 8..DATA + 12].copy_from_slice(&index.to_le_bytes());
        sector[DATA + 12..].copy_from_slice(&crc.to_le_bytes());
    }
    record
}

/// Bytes a record with a payload of `len` bytes takes in the log.
pub(super) fn record_len(len: usize) -> u64 {
    ((1 + len.div_ceil(DATA)) * SECTOR) as u64
}

/// Reads the log in `bytes` (the whole file) as extending the snapshot numbered `base`.
pub(super) fn scan(bytes: &[u8], base: u64) -> Scan {
    let sectors: Vec<&[u8]> = bytes.chunks_exact(SECTOR).collect();
    let tags: Vec<Tag> = sectors.iter().map(|s| tag_of(s)).collect();
    let max_seq = tags
        .iter()
        .filter(|t| t.valid)
        .map(|t| t.seq)
        .max()
        .unwrap_or(0);
    let mut records = Vec::new();
    let mut last = base;
    let mut at = 0usize;
    let mut torn = None;
    let mut damage = None;
    let offset = |sector: usize| sector as u64 * SECTOR as u64;
    while at < sectors.len() {
        let tag = &tags[at];
        if tag.zero {
            break;
        }
        if !tag.valid {
            damage = Some((
                format!(
                    "the sector at byte {} (where the next record would start) fails its checksum",
                    offset(at)
                ),
                None,
            ));
            break;
        }
        let header = sectors[at];
        if tag.index != 0
            || &header[..8] != MAGIC
            || u64_at(header, 8) != tag.seq
            || u64_at(header, 16) != base
            || u64_at(header, 24) != last
        {
            // A sector of an older record: the end of this log.
            break;
        }
        let (seq, generation, len) = (tag.seq, u64_at(header, 32), u64_at(header, 40));
        let count = usize::try_from(len.div_ceil(DATA as u64)).unwrap_or(usize::MAX);
        if count >= sectors.len() - at {
            damage = Some((
                format!(
                    "the record at byte {} (generation {generation}) is cut short",
                    offset(at)
                ),
                Some(generation),
            ));
            break;
        }
        let mut whole = true;
        for j in 1..=count {
            let t = &tags[at + j];
            if !t.zero && !t.valid {
                damage = Some((
                    format!(
                        "the record at byte {} (generation {generation}) has a sector that \
                         fails its checksum, at byte {}",
                        offset(at),
                        offset(at + j)
                    ),
                    Some(generation),
                ));
                break;
            }
            whole &= t.valid && t.seq == seq && t.index as usize == j;
        }
        if damage.is_some() {
            break;
        }
        if !whole {
            // The append in progress, torn: never acknowledged.
            torn = Some(seq);
            break;
        }
        let mut payload = Vec::with_capacity(count * DATA);
        for sector in &sectors[at + 1..=at + count] {
            payload.extend_from_slice(&sector[..DATA]);
        }
        payload.truncate(usize::try_from(len).unwrap_or(usize::MAX));
        if record_crc(&header[..FIELDS], &payload) != u32_at(header, FIELDS) {
            damage = Some((
                format!(
                    "the record at byte {} (generation {generation}) fails its checksum",
                    offset(at)
                ),
                Some(generation),
            ));
            break;
        }
        records.push(Record {
            seq,
            generation,
            payload,
        });
        last = seq;
        at += 1 + count;
    }
    if damage.is_none() {
        // Everything numbered after the last record read must belong to appends that
        // started where the walk stopped (a torn tail, or several failed tries of it).
        let beyond: BTreeMap<usize, &Tag> = tags
            .iter()
            .enumerate()
            .filter(|(_, t)| t.valid && t.seq > last)
            .collect();
        if let Some((i, t)) = beyond.iter().find(|(i, t)| **i != at + t.index as usize) {
            damage = Some((
                format!(
                    "the sector at byte {} belongs to a record (sequence {}) that the log \
                     no longer reaches: records before it are missing",
                    offset(*i),
                    t.seq
                ),
                None,
            ));
        }
    }
    Scan {
        records,
        end: offset(at),
        max_seq,
        torn,
        damage,
    }
}

impl Log {
    /// Opens the log of `dir` as extending the snapshot numbered `base`, which recorded
    /// the log's size as `recorded_size`. `Ok(None)`-like outcomes are in [`Scan`]; a
    /// missing or shortened file is damage, reported in it too.
    pub(super) fn open(dir: &Path, base: u64, recorded_size: u64) -> io::Result<(Log, Scan)> {
        let path = dir.join(NAME);
        let (file, bytes) = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => {
                let size = file.metadata()?.len();
                let mut bytes = vec![0u8; usize::try_from(size).map_err(io::Error::other)?];
                file.read_exact_at(&mut bytes, 0)?;
                (Some(file), bytes)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, Vec::new()),
            Err(e) => return Err(e),
        };
        let size = bytes.len() as u64;
        let mut scan = scan(&bytes, base);
        if file.is_none() {
            scan.damage = Some((
                "is missing, though the snapshot says commits may have been appended to it"
                    .to_owned(),
                None,
            ));
        } else if size < recorded_size || !size.is_multiple_of(SECTOR as u64) {
            scan.damage = Some((
                format!("is cut short: {size} bytes, where the snapshot recorded {recorded_size}"),
                None,
            ));
        }
        let last = scan.records.last().map_or(base, |r| r.seq);
        Ok((
            Log {
                path,
                file,
                size,
                base,
                end: scan.end,
                last,
                #[cfg(test)]
                fail_next_write: false,
                #[cfg(test)]
                fail_next_sync: false,
                #[cfg(test)]
                tear_next_write: None,
            },
            scan,
        ))
    }

    /// A log not read (a store without one yet, or one being rebuilt): created at the
    /// next [`Log::prepare`].
    pub(super) fn unread(dir: &Path) -> Log {
        Log {
            path: dir.join(NAME),
            file: None,
            size: 0,
            base: 0,
            end: 0,
            last: 0,
            #[cfg(test)]
            fail_next_write: false,
            #[cfg(test)]
            fail_next_sync: false,
            #[cfg(test)]
            tear_next_write: None,
        }
    }

    /// Makes sure the file exists, preallocated to whole chunks, durably (with its
    /// directory entry): done before a snapshot that says the log is in use. Answers its
    /// size, which the snapshot records. A file left at a size `open` refuses (cut in the
    /// middle of a sector, when a damaged log was accepted as lost) is grown to whole
    /// chunks here, so the snapshot never records a size its own reader would refuse.
    pub(super) fn prepare(&mut self, dir_handle: &File) -> io::Result<u64> {
        let created = self.file.is_none();
        if created {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        let aligned = self.size.max(CHUNK).div_ceil(CHUNK) * CHUNK;
        if created || aligned != self.size {
            let Some(file) = &self.file else {
                return Err(io::Error::other("the generation log is not open"));
            };
            file.set_len(aligned)?;
            file.sync_all()?;
            if created {
                dir_handle.sync_all()?;
            }
            self.size = aligned;
        }
        Ok(self.size)
    }

    /// Starts the log again after a snapshot numbered `base` is durable. Nothing is
    /// written: the old records name an older base.
    pub(super) fn restart(&mut self, base: u64) {
        self.base = base;
        self.end = 0;
        self.last = base;
    }

    /// Bytes of records since the snapshot.
    pub(super) fn len(&self) -> u64 {
        self.end
    }

    /// Whether the log can take records: it was read or prepared.
    pub(super) fn ready(&self) -> bool {
        self.file.is_some() && self.base != 0
    }

    /// Durably appends a record numbered `seq` (see the module comment for why this is
    /// atomic and durable: a crash can only tear this one unacknowledged record at the
    /// end, and the answer waits for `fdatasync`).
    pub(super) fn append(&mut self, seq: u64, generation: u64, payload: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_write) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let record = encode(seq, self.base, self.last, generation, payload);
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("the log is not open"))?;
        let needed = self.end + record.len() as u64;
        if needed > self.size {
            // Grow first, durably, so a record never reaches past the durable end.
            let size = needed.div_ceil(CHUNK) * CHUNK;
            file.set_len(size)?;
            file.sync_all()?;
            self.size = size;
        }
        #[cfg(test)]
        if let Some(sectors) = self.tear_next_write.take() {
            file.write_all_at(&record[..(sectors * SECTOR).min(record.len())], self.end)?;
            return Err(io::Error::other("torn by a simulated crash"));
        }
        let written = file.write_all_at(&record, self.end).and_then(|()| {
            #[cfg(test)]
            if std::mem::take(&mut self.fail_next_sync) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            file.sync_data()
        });
        if let Err(e) = written {
            // The commit is refused, but some or all of the record may be on the disk
            // (a failed `fdatasync` says nothing of what landed): a restart before the
            // next append overwrites it would read it as committed. Zeroing its header
            // sector, durably, ends the log before it. If even that fails, say that
            // the outcome is unknown.
            let erased = file
                .write_all_at(&[0u8; SECTOR], self.end)
                .and_then(|()| file.sync_data());
            return Err(match erased {
                Ok(()) => e,
                Err(erase) => io::Error::new(
                    e.kind(),
                    format!(
                        "{e}; the record may still be on the disk (erasing it failed too: \
                         {erase}), so after a restart this commit may be there"
                    ),
                ),
            });
        }
        self.end = needed;
        self.last = seq;
        Ok(())
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A log image of `records` (seq, payload) extending `base`, in a file of `size`.
    fn image(base: u64, records: &[(u64, &[u8])], size: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; size];
        let mut at = 0;
        let mut prev = base;
        for (seq, payload) in records {
            let record = encode(*seq, base, prev, *seq * 10, payload);
            bytes[at..at + record.len()].copy_from_slice(&record);
            at += record.len();
            prev = *seq;
        }
        bytes
    }

    fn seqs(scan: &Scan) -> Vec<u64> {
        scan.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn the_chain_is_read_to_its_end() {
        let big = vec![b'x'; 3 * DATA];
        let bytes = image(5, &[(6, b"a"), (7, &big), (9, b"c")], 8192);
        let scan = scan(&bytes, 5);
        assert_eq!(seqs(&scan), vec![6, 7, 9]);
        assert_eq!(scan.records[1].payload, big);
        assert_eq!(scan.records[1].generation, 70);
        assert!(scan.damage.is_none() && scan.torn.is_none());
        assert_eq!(scan.end, (2 + 4 + 2) * SECTOR as u64);
        // A newer snapshot (a compaction since): records of the older log, ignored.
        let scan = super::scan(&bytes, 20);
        assert!(scan.records.is_empty() && scan.damage.is_none());
        assert_eq!(scan.max_seq, 9);
        // An older snapshot than the records name, with them numbered after it: records
        // the chain does not reach.
        assert!(super::scan(&bytes, 4).damage.is_some());
    }

    #[test]
    fn records_of_an_older_log_past_the_end_are_ignored() {
        // The old log (base 5) had three records; the new one (base 20) overwrote the
        // start with one shorter record.
        let big = vec![b'x'; 3 * DATA];
        let mut bytes = image(5, &[(6, &big), (7, &big), (9, b"c")], 8192);
        let new = encode(21, 20, 20, 210, b"n");
        bytes[..new.len()].copy_from_slice(&new);
        let scan = scan(&bytes, 20);
        assert_eq!(seqs(&scan), vec![21]);
        assert!(scan.damage.is_none(), "{:?}", scan.damage);
    }

    #[test]
    fn a_torn_append_at_the_end_is_cut() {
        let big = vec![b'x'; 5 * DATA];
        let whole = image(5, &[(6, b"a"), (7, &big)], 8192);
        let first = encode(6, 5, 5, 60, b"a").len();
        for landed in [vec![0usize, 1, 2], vec![3, 4], vec![1, 5]] {
            // Only some sectors of record 7 landed (over zeros, or over an older log).
            for under in [vec![0u8; 8192], image(1, &[(2, &[b'o'; 4000][..])], 8192)] {
                let mut bytes = under.clone();
                bytes[..first].copy_from_slice(&whole[..first]);
                for s in &landed {
                    let at = first + s * SECTOR;
                    bytes[at..at + SECTOR].copy_from_slice(&whole[at..at + SECTOR]);
                }
                let scan = scan(&bytes, 5);
                assert_eq!(seqs(&scan), vec![6], "landed {landed:?}");
                assert!(
                    scan.damage.is_none(),
                    "landed {landed:?}: {:?}",
                    scan.damage
                );
                assert_eq!(scan.end, first as u64);
            }
        }
    }

    #[test]
    fn damage_anywhere_in_the_log_is_told_from_a_tear() {
        let big = vec![b'x'; 5 * DATA];
        let bytes = image(5, &[(6, b"a"), (7, &big), (8, b"c")], 8192);
        for at in [3, 100, SECTOR + 3, 3 * SECTOR + 7, 8 * SECTOR + 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x04;
            let scan = scan(&flipped, 5);
            assert!(scan.damage.is_some(), "byte {at}: {:?}", seqs(&scan));
        }
        // A record in the middle zeroed: the ones after it are unreachable.
        let mut holed = bytes.clone();
        holed[SECTOR * 2..SECTOR * 8].fill(0);
        let scan = scan(&holed, 5);
        assert!(scan.damage.is_some(), "{:?}", seqs(&scan));
    }
}
