//! Two slot files, `generations.0` and `generations.1`, holding the committed state.
//!
//! # Writing
//!
//! Each write goes to the slot that does *not* hold the newest state, as one `pwrite` of a
//! whole record followed by `fdatasync`. The slots are preallocated and only grow rarely,
//! so an ordinary write changes neither the file size nor the block map and `fdatasync`
//! has one thing to flush: the data. That is one synchronous write per commit, where temp
//! file + fsync + rename + fsync of the directory costs four. When a slot must grow, the
//! new size is made durable (`set_len` + `fsync`) *before* the record is written, so a
//! record never reaches past the durable end of its file: a record cut short is damage,
//! never a crash in the middle of a growth.
//!
//! # The record
//!
//! A record is a run of 512-byte sectors, and every sector ends with a 12-byte tag: the
//! record's sequence number and a CRC-32 of the sector's data, that sequence number and
//! the sector's index. Sector 0 is the header (magic, sequence number, the live generation
//! the record holds, payload length, and a CRC-32 of those fields and the whole payload);
//! sectors 1.. carry the payload, 500 bytes each. Every byte, the header's included, is
//! under a checksum. CRC-32 (`crc32fast`, hardware-accelerated) is the right strength
//! here: what it must catch is accidental (flipped bits, stale or zeroed sectors, torn
//! writes), and a 32-bit CRC over 512 bytes catches every burst up to 32 bits and all but
//! 2^-32 of the rest. Against someone who can write to the state directory no unkeyed
//! hash helps; they could rewrite every file anyway.
//!
//! Sequence numbers are never reused: after `open`, the next write takes one more than the
//! highest number found in either slot, readable or not. Reusing one would let sectors
//! left over from a torn write pass as part of a later record with the same number.
//!
//! # A torn write, or damage
//!
//! A write is acknowledged only after its `fdatasync`, and writes alternate between the
//! slots, so at any instant at most one slot is being written: the one *not* holding the
//! newest acknowledged record, with a sequence number higher than any on disk. A crash
//! can therefore tear only that slot, and only a write that was never acknowledged. A
//! SIGKILL stops a `pwrite` between pages; a power loss persists some sectors and not
//! others. Either way the torn slot holds *whole* sectors, each passing its own checksum,
//! some from the new record and the rest from an older one (or zeros, never written). We
//! rely, as most databases do (PostgreSQL keeps `pg_control` within 512 bytes for this
//! reason), on a 512-byte sector being written entirely or not at all.
//!
//! Damage (a flipped bit, a bad block, a truncated, emptied or deleted file) looks
//! different: a sector that fails its own checksum, a header that does, or a record
//! cut short. So each slot is classified as valid, empty, torn (all sectors pass, but
//! they come from different writes) or damaged, and [`decide`] takes the newest valid
//! record when the other slot is older, or torn by a write with a *higher* sequence
//! number (the one unacknowledged write). In every other case the other slot may have
//! held a newer, acknowledged record, and `open` refuses to start, naming the file,
//! unless keeld runs with `--accept-state-loss`; then it continues from the newest intact
//! state, and the store records that as a generation of its own.
//!
//! What no format of this kind can tell apart: a disk that acknowledges a flush and then
//! loses the write (firmware bugs) leaves exactly what a tear leaves.
//!
//! # A write that fails
//!
//! A write whose `pwrite` or `fdatasync` fails is refused, yet some or all of it may be on
//! the disk, whole and valid: read after a restart, it would be the newest state, and
//! would hide the log records acknowledged since (they name the snapshot before it). So
//! its slot's first sector is overwritten, durably, with a sector of its own (`KEELREFU`,
//! the write's sequence number, under the sector's checksum), read as "a write that was
//! never acknowledged", like a tear. If even that fails, the next write goes to the same
//! slot, never to the log, and the error says that a restart before it may bring the
//! refused write back.
//!
//! A new store writes its first state into *both* slots, then creates the marker
//! `generations.held` (durably); from then on a slot that is empty or missing is damage,
//! and a directory whose slots are both gone is refused, never taken for a new store.
//!
//! Format 1 slots (`KEELGEN1`: header of magic, sequence number, length and a CRC-32 of
//! the payload only) are still read, to migrate: the first open writes the state into
//! both slots in the current format. A format-1 record that fails its checksum cannot be
//! told from damage, and is treated as damage.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::StoreError;

pub(super) const NAMES: [&str; 2] = ["generations.0", "generations.1"];
/// Exists once both slots have been written: the directory holds committed state.
pub(super) const MARKER: &str = "generations.held";
const MAGIC: &[u8; 8] = b"KEELGEN2";
/// The header of a slot whose write failed: "the write with this sequence number was
/// refused" (see [`Slots::write`]).
const REFUSED: &[u8; 8] = b"KEELREFU";
const MAGIC_V1: &[u8; 8] = b"KEELGEN1";
const HEADER_V1: u64 = 32;
const SECTOR: usize = 512;
/// Sequence number (8 bytes) and CRC-32 (4 bytes), at the end of every sector.
const TAG: usize = 12;
/// Payload bytes per sector.
const DATA: usize = SECTOR - TAG;
/// Slots start at this size and grow in multiples of it.
const CHUNK: u64 = 64 * 1024;

/// What the header of a record says, when its checksum holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub seq: u64,
    /// The live generation of the record (format 1 records do not say).
    pub generation: Option<u64>,
}

/// What a slot holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    /// The file does not exist.
    Missing,
    /// No record: all zeros, or shorter than one sector.
    Empty {
        len: u64,
    },
    Valid {
        header: Header,
        payload: Vec<u8>,
    },
    /// Every sector passes its checksum, but not all come from the same write: a write
    /// torn by a crash. `seq` is the highest sequence number among its sectors.
    Torn {
        seq: u64,
    },
    /// The write with sequence number `seq` failed and was refused; keeld marked the
    /// slot so (a sector of its own, under its checksum), since some of the write may
    /// have landed anyway.
    Refused {
        seq: u64,
    },
    /// A checksum fails, or the record is cut short. `header` when the header itself
    /// is intact.
    Damaged {
        header: Option<Header>,
        reason: String,
    },
}

impl SlotState {
    fn describe(&self) -> String {
        match self {
            SlotState::Missing => "is missing".to_owned(),
            SlotState::Empty { len } => format!("holds no record ({len} bytes, all zero)"),
            SlotState::Valid { header, .. } => {
                format!("holds a valid record, sequence {}", header.seq)
            }
            SlotState::Torn { seq } => {
                format!("holds a torn write (sectors from different writes, newest sequence {seq})")
            }
            SlotState::Damaged { reason, .. } => reason.clone(),
            SlotState::Refused { seq } => {
                format!("holds a write (sequence {seq}) that failed and was refused")
            }
        }
    }

    fn blank(&self) -> bool {
        matches!(self, SlotState::Missing | SlotState::Empty { .. })
    }

    /// The highest sequence number the slot is known to hold.
    fn seq(&self) -> Option<u64> {
        match self {
            SlotState::Valid { header, .. } => Some(header.seq),
            SlotState::Torn { seq } | SlotState::Refused { seq } => Some(*seq),
            SlotState::Damaged {
                header: Some(h), ..
            } => Some(h.seq),
            _ => None,
        }
    }
}

/// What [`decide`] makes of the two slots.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// No record anywhere, and no marker: a new store (or one from before the slots).
    New { note: Option<String> },
    /// The newest acknowledged state is in `slot`. `note`: something to warn about that
    /// lost nothing acknowledged.
    Use { slot: usize, note: Option<String> },
    /// The other slot may have held a newer acknowledged state: refuse, unless the
    /// operator accepts the loss; then `fallback` is the newest intact state (`None`:
    /// none is left, start empty).
    Refuse {
        reason: String,
        fallback: Option<usize>,
    },
}

/// Decides which slot holds the newest acknowledged state; `held`: the marker exists, so
/// both slots have been written. See the module comment for why each case is safe.
pub(super) fn decide(states: &[SlotState; 2], held: bool) -> Verdict {
    let valid = |i: usize| match &states[i] {
        SlotState::Valid { header, .. } => Some(header.seq),
        _ => None,
    };
    match (valid(0), valid(1)) {
        (Some(a), Some(b)) if a == b => Verdict::Refuse {
            reason: format!(
                "{} and {} both hold sequence number {a}: one of them is not what keeld wrote",
                NAMES[0], NAMES[1]
            ),
            fallback: Some(0),
        },
        // Both intact: the older is the previous state, as expected.
        (Some(a), Some(b)) => Verdict::Use {
            slot: usize::from(b > a),
            note: None,
        },
        (Some(_), None) | (None, Some(_)) => {
            let good = usize::from(valid(0).is_none());
            let seq = valid(good).unwrap_or_default();
            let other = 1 - good;
            let (good_name, other_name) = (NAMES[good], NAMES[other]);
            match &states[other] {
                // The one write that can be in progress: to the other slot, with a
                // higher sequence number. It was never acknowledged.
                SlotState::Torn { seq: torn } if *torn > seq => Verdict::Use {
                    slot: good,
                    note: Some(format!(
                        "{other_name} holds a write (sequence {torn}) torn by a crash before it \
                         was acknowledged; using the newest acknowledged state, sequence {seq} \
                         in {good_name}"
                    )),
                },
                // A write that failed: refused, never acknowledged.
                SlotState::Refused { seq: refused } if *refused > seq => Verdict::Use {
                    slot: good,
                    note: None,
                },
                // Unreadable, but older than the intact slot: the newest state is whole.
                SlotState::Torn { seq: older }
                | SlotState::Refused { seq: older }
                | SlotState::Damaged {
                    header: Some(Header { seq: older, .. }),
                    ..
                } if *older < seq => Verdict::Use {
                    slot: good,
                    note: Some(format!(
                        "{other_name} (the previous state, sequence {older}) {}; the newest \
                         state, sequence {seq} in {good_name}, is intact and the next commit \
                         overwrites {other_name}",
                        states[other].describe()
                    )),
                },
                // No marker: no record in the current format has been acknowledged yet
                // (the marker follows the two writes that create or migrate a store), so
                // a damaged current-format record newer than the intact one is one of
                // those writes, cut by a crash. (Only format 1 records, which cannot tell
                // a tear from damage, are worth refusing over here.)
                SlotState::Damaged {
                    header:
                        Some(Header {
                            seq: newer,
                            generation: Some(_),
                        }),
                    ..
                } if !held && *newer > seq => Verdict::Use {
                    slot: good,
                    note: Some(format!(
                        "{other_name} holds a write (sequence {newer}) of a store being created \
                         or migrated, cut by a crash; using {good_name}"
                    )),
                },
                // A store's very first write went to slot 0 and the second never happened
                // (format 1: one commit ever; or the creation of a store was interrupted).
                other_state if other_state.blank() && !held && seq == 1 => Verdict::Use {
                    slot: good,
                    note: None,
                },
                other_state => Verdict::Refuse {
                    reason: format!(
                        "{other_name} {}, while {good_name} holds sequence {seq}: \
                         {other_name} may have held a newer, acknowledged state",
                        other_state.describe()
                    ),
                    fallback: Some(good),
                },
            }
        }
        (None, None) => match states {
            [a, b] if a.blank() && b.blank() => {
                if held {
                    Verdict::Refuse {
                        reason: format!(
                            "{} and {} are both empty or missing, but {MARKER} says this \
                             directory has held committed state",
                            NAMES[0], NAMES[1]
                        ),
                        fallback: None,
                    }
                } else {
                    Verdict::New { note: None }
                }
            }
            // A new store's first write, torn: nothing was ever acknowledged.
            [SlotState::Torn { .. } | SlotState::Refused { .. }, b]
            | [b, SlotState::Torn { .. } | SlotState::Refused { .. }]
                if b.blank() && !held =>
            {
                Verdict::New {
                    note: Some(
                        "the first write of a new store was torn by a crash, or failed; \
                         starting it again"
                            .to_owned(),
                    ),
                }
            }
            [a, b] => Verdict::Refuse {
                reason: format!(
                    "no slot holds a readable state: {} {}; {} {}",
                    NAMES[0],
                    a.describe(),
                    NAMES[1],
                    b.describe()
                ),
                fallback: None,
            },
        },
    }
}

/// A loss the operator accepted with `--accept-state-loss`.
#[derive(Debug, Clone)]
pub struct Loss {
    /// What was wrong, naming the file(s).
    pub reason: String,
    /// The highest generation a lost record is known to have reached.
    pub lost_generation: Option<u64>,
    /// How many lost writes may have carried generations beyond what is known.
    pub unknown_writes: u64,
}

/// What [`Slots::open`] found.
#[derive(Debug)]
pub(super) struct Opened {
    /// The newest acknowledged state; `None`: a new store (or one from before the slots).
    pub payload: Option<Vec<u8>>,
    /// The state must be written into both slots, then the marker, before it is served:
    /// a new or migrated store, or a recovery.
    pub must_initialise: bool,
    /// Set only when the loss was accepted.
    pub loss: Option<Loss>,
    /// The sequence number of the state in `payload` (0: none).
    pub seq: u64,
}

#[derive(Debug)]
pub struct Slots {
    dir: PathBuf,
    dir_handle: File,
    files: [Option<File>; 2],
    sizes: [u64; 2],
    /// The slot the next write goes to: never the one holding the newest state.
    next: usize,
    /// The highest sequence number on disk (readable or not): the next write takes the
    /// one after.
    seq: u64,
    paths: [PathBuf; 2],
    /// The marker exists.
    held: bool,
    /// A write failed and could not be marked refused (see [`Slots::write`]).
    unmarked: bool,
    /// Test hook: fail the next write as a full disk would.
    #[cfg(test)]
    pub fail_next_write: bool,
    /// Test hook: the next write lands only its first this many sectors, then fails, as
    /// if keeld were killed in the middle of it.
    #[cfg(test)]
    pub tear_next_write: Option<usize>,
    /// Test hook: the next write lands whole, then its `fdatasync` fails.
    #[cfg(test)]
    pub fail_next_sync: bool,
}

impl Slots {
    /// Opens both slots in `dir` and finds the newest acknowledged state (see [`decide`]).
    /// A slot that may have held a newer acknowledged state than the one intact is
    /// [`StoreError::Damaged`], unless `accept_loss`.
    pub(super) fn open(dir: &Path, accept_loss: bool) -> Result<(Slots, Opened), StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let dir_handle = File::open(dir).map_err(io_err(dir))?;
        let held = match std::fs::symlink_metadata(dir.join(MARKER)) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&dir.join(MARKER))(e)),
        };
        let paths = [dir.join(NAMES[0]), dir.join(NAMES[1])];
        let mut files = [None, None];
        let mut sizes = [0u64; 2];
        let mut states = [SlotState::Missing, SlotState::Missing];
        for i in 0..2 {
            let path = &paths[i];
            match OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => {
                    sizes[i] = file.metadata().map_err(io_err(path))?.len();
                    states[i] = read_slot(&file, sizes[i]).map_err(io_err(path))?;
                    files[i] = Some(file);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path)(e)),
            }
        }
        // Never reuse a sequence number; a slot whose header is unreadable may hold one
        // past every number we can read (at most one: writes alternate).
        let unknown = states
            .iter()
            .any(|s| matches!(s, SlotState::Damaged { header: None, .. }));
        let seq = states.iter().filter_map(SlotState::seq).max().unwrap_or(0) + u64::from(unknown);

        let verdict = decide(&states, held);
        let (chosen, must_initialise, loss) = match verdict {
            Verdict::Use { slot, note } => {
                if let Some(note) = note {
                    tracing::warn!("{note}");
                }
                (Some(slot), !held, None)
            }
            Verdict::New { note } => {
                if let Some(note) = note {
                    tracing::warn!("{note}");
                }
                (None, true, None)
            }
            Verdict::Refuse { reason, fallback } => {
                if !accept_loss {
                    return Err(StoreError::Damaged {
                        path: match fallback {
                            Some(good) => paths[1 - good].clone(),
                            None => dir.to_owned(),
                        },
                        reason,
                    });
                }
                let lost = (0..2).filter(|i| Some(*i) != fallback);
                let lost_generation = lost
                    .clone()
                    .filter_map(|i| match &states[i] {
                        SlotState::Valid { header, .. }
                        | SlotState::Damaged {
                            header: Some(header),
                            ..
                        } => header.generation,
                        _ => None,
                    })
                    .max();
                let unknown = lost.clone().any(|i| match &states[i] {
                    SlotState::Valid { header, .. }
                    | SlotState::Damaged {
                        header: Some(header),
                        ..
                    } => header.generation.is_none(),
                    // Never acknowledged: it carried nothing that was lost.
                    SlotState::Refused { .. } => false,
                    _ => true,
                });
                // A slot whose number is unknown was at most one write newer than the
                // other (writes alternate).
                let unknown_writes = u64::from(unknown);
                (
                    fallback,
                    true,
                    Some(Loss {
                        reason,
                        lost_generation,
                        unknown_writes,
                    }),
                )
            }
        };
        let chosen_seq = chosen.and_then(|i| states[i].seq()).unwrap_or(0);
        let payload =
            chosen.and_then(
                |i| match std::mem::replace(&mut states[i], SlotState::Missing) {
                    SlotState::Valid { payload, .. } => Some(payload),
                    _ => None,
                },
            );
        Ok((
            Slots {
                dir: dir.to_owned(),
                dir_handle,
                files,
                sizes,
                next: chosen.map_or(0, |i| 1 - i),
                seq,
                paths,
                held,
                unmarked: false,
                #[cfg(test)]
                fail_next_write: false,
                #[cfg(test)]
                tear_next_write: None,
                #[cfg(test)]
                fail_next_sync: false,
            },
            Opened {
                payload,
                must_initialise,
                loss,
                seq: chosen_seq,
            },
        ))
    }

    /// Takes the next sequence number, for a write here or in the log: numbers are
    /// shared and never reused, even by a write that then fails.
    pub fn take_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The number of the last write (after a successful [`Slots::write`], its own).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Numbers at least up to `seq` are in use elsewhere (the log).
    pub fn observe_seq(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// Durably writes `payload` (whose live generation is `generation`) as the newest
    /// state. Atomic: it goes to the slot not holding the newest state, which a crash
    /// can only tear (see the module comment); durable: it returns after `fdatasync`.
    pub fn write(&mut self, payload: &[u8], generation: u64) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_write) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let seq = self.take_seq();
        let record = encode(seq, generation, payload);
        let slot = self.next;
        self.prepare(slot)?;
        let current = self.sizes[slot];
        let file = self.files[slot]
            .as_ref()
            .ok_or_else(|| io::Error::other("slot file not open"))?;
        let needed = record.len() as u64;
        if needed > current {
            // Grow first, durably: the record must never reach past the durable end of
            // the file, or a crash could leave it cut short (which reads as damage).
            let size = needed.div_ceil(CHUNK) * CHUNK * 2;
            file.set_len(size)?;
            file.sync_all()?;
            self.sizes[slot] = size;
        }
        #[cfg(test)]
        if let Some(sectors) = self.tear_next_write.take() {
            file.write_all_at(&record[..(sectors * SECTOR).min(record.len())], 0)?;
            return Err(io::Error::other("torn by a simulated crash"));
        }
        let written = file.write_all_at(&record, 0).and_then(|()| {
            #[cfg(test)]
            if std::mem::take(&mut self.fail_next_sync) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            file.sync_data()
        });
        if let Err(e) = written {
            // The write is refused, but some or all of it may be on the disk (a failed
            // `fdatasync` says nothing of what landed), and it would read as the newest
            // state after a restart: over acknowledged commits made since, whose log
            // names the previous snapshot. Marking the slot refused, durably, rules that
            // out; the slot is written next again. If even that fails, the next write
            // must go to this slot (not to the log), and the error says a restart before
            // it may bring this write back.
            let marked = file
                .write_all_at(&refused_sector(seq), 0)
                .and_then(|()| file.sync_data());
            return Err(match marked {
                Ok(()) => e,
                Err(mark) => {
                    self.unmarked = true;
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{e}; the write may still be on the disk (marking it refused \
                             failed too: {mark}), so after a restart before the next commit \
                             this one may be there"
                        ),
                    )
                }
            });
        }
        self.next = 1 - slot;
        self.unmarked = false;
        Ok(())
    }

    /// A failed write could not be marked refused: the next write must overwrite it
    /// (go to the slots, not the log).
    pub fn must_write_next(&self) -> bool {
        self.unmarked
    }

    /// Writes the state into both slots, then the marker: from then on an empty or
    /// missing slot is damage. Each write is an ordinary [`Slots::write`], the first to
    /// the slot not holding the state being carried over, so a crash at any point leaves
    /// that state whole in one slot (and no marker until both are written).
    pub fn initialise(&mut self, payload: &[u8], generation: u64) -> io::Result<()> {
        self.write(payload, generation)?;
        self.write(payload, generation)?;
        self.mark_held()
    }

    /// The slot's file, created (preallocated, durably, with its directory entry) if it
    /// is missing or too short to have held a record.
    fn prepare(&mut self, slot: usize) -> io::Result<()> {
        if self.files[slot].is_none() || self.sizes[slot] < CHUNK {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&self.paths[slot])?;
            let size = file.metadata()?.len().max(CHUNK);
            file.set_len(size)?;
            file.sync_all()?;
            self.dir_handle.sync_all()?;
            self.sizes[slot] = size;
            self.files[slot] = Some(file);
        }
        Ok(())
    }

    /// Creates the marker durably: written and fsync'd under a temporary name, renamed,
    /// and the directory fsync'd, so it exists whole or not at all.
    fn mark_held(&mut self) -> io::Result<()> {
        if self.held {
            return Ok(());
        }
        let temp = self.dir.join(format!("{MARKER}.tmp"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(
            b"This directory holds Keel's committed settings (generations.0, generations.1).\n\
              keeld refuses to start if both are gone; see --accept-state-loss.\n",
        )?;
        file.sync_all()?;
        std::fs::rename(&temp, self.dir.join(MARKER))?;
        self.dir_handle.sync_all()?;
        self.held = true;
        Ok(())
    }

    /// Path of the slot the next write goes to (for error messages).
    pub fn next_path(&self) -> &Path {
        &self.paths[self.next]
    }
}

fn sector_crc(data: &[u8], seq: u64, index: u64) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(data);
    hasher.update(&seq.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    hasher.finalize()
}

/// The record's own checksum: header fields and the whole payload.
fn record_crc(fields: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(fields);
    hasher.update(payload);
    hasher.finalize()
}

fn encode(seq: u64, generation: u64, payload: &[u8]) -> Vec<u8> {
    let sectors = 1 + payload.len().div_ceil(DATA);
    let mut record = vec![0u8; sectors * SECTOR];
    let header = &mut record[..DATA];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    header[16..24].copy_from_slice(&generation.to_le_bytes());
    header[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = record_crc(&header[..32], payload);
    header[32..36].copy_from_slice(&crc.to_le_bytes());
    for (i, chunk) in payload.chunks(DATA).enumerate() {
        let at = (i + 1) * SECTOR;
        record[at..at + chunk.len()].copy_from_slice(chunk);
    }
    for (index, sector) in record.chunks_mut(SECTOR).enumerate() {
        let crc = sector_crc(&sector[..DATA], seq, index as u64);
        sector[DATA..DATA + 8].copy_from_slice(&seq.to_le_bytes());
        sector[DATA + 8..].copy_from_slice(&crc.to_le_bytes());
    }
    record
}

/// The sector that marks a slot's write `seq` as refused: [`REFUSED`], `seq`, zeros, and
/// the tag of sector 0 of record `seq`, so that it passes its checksum (damage cannot
/// forge it).
fn refused_sector(seq: u64) -> [u8; SECTOR] {
    let mut sector = [0u8; SECTOR];
    sector[..8].copy_from_slice(REFUSED);
    sector[8..16].copy_from_slice(&seq.to_le_bytes());
    sector[DATA..DATA + 8].copy_from_slice(&seq.to_le_bytes());
    let crc = sector_crc(&sector[..DATA], seq, 0);
    sector[DATA + 8..DATA + 12].copy_from_slice(&crc.to_le_bytes());
    sector
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

/// Reads and classifies the record in a slot file of `size` bytes.
fn read_slot(file: &File, size: u64) -> io::Result<SlotState> {
    if size < SECTOR as u64 {
        return Ok(SlotState::Empty { len: size });
    }
    let mut first = [0u8; SECTOR];
    file.read_exact_at(&mut first, 0)?;
    if first.iter().all(|b| *b == 0) {
        return Ok(SlotState::Empty { len: size });
    }
    if &first[..8] == MAGIC_V1 {
        return read_v1(file, size, &first);
    }
    let tag_seq = u64_at(&first, DATA);
    if sector_crc(&first[..DATA], tag_seq, 0) != u32_at(&first, DATA + 8) {
        return Ok(SlotState::Damaged {
            header: None,
            reason: "has a header (its first 512 bytes) that fails its checksum".to_owned(),
        });
    }
    if &first[..8] == REFUSED && u64_at(&first, 8) == tag_seq {
        // A later write to this slot may have been torn before its header landed: its
        // sectors carry a higher number, which must not be used again.
        return Ok(SlotState::Refused {
            seq: tag_seq.max(newest_sector(file, size)?),
        });
    }
    if &first[..8] != MAGIC || u64_at(&first, 8) != tag_seq {
        return Ok(SlotState::Damaged {
            header: None,
            reason: "does not start with a Keel generation record".to_owned(),
        });
    }
    let header = Header {
        seq: tag_seq,
        generation: Some(u64_at(&first, 16)),
    };
    let len = u64_at(&first, 24);
    let sectors = len.div_ceil(DATA as u64);
    let end = sectors
        .checked_add(1)
        .and_then(|n| n.checked_mul(SECTOR as u64));
    let body_len = sectors
        .checked_mul(SECTOR as u64)
        .and_then(|n| usize::try_from(n).ok());
    let (Some(end), Some(body_len)) = (end, body_len) else {
        return Ok(SlotState::Damaged {
            header: Some(header),
            reason: format!("has a record claiming an impossible length ({len} bytes)"),
        });
    };
    if end > size {
        return Ok(SlotState::Damaged {
            header: Some(header),
            reason: format!(
                "is cut short: its record (sequence {}) needs {end} bytes, the file has {size}",
                header.seq
            ),
        });
    }
    let mut body = vec![0u8; body_len];
    file.read_exact_at(&mut body, SECTOR as u64)?;
    let mut newest = header.seq;
    let mut torn = false;
    for (i, sector) in body.chunks(SECTOR).enumerate() {
        let index = i as u64 + 1;
        if sector.iter().all(|b| *b == 0) {
            // Never written: this write did not reach it.
            torn = true;
            continue;
        }
        let seq = u64_at(sector, DATA);
        if sector_crc(&sector[..DATA], seq, index) != u32_at(sector, DATA + 8) {
            return Ok(SlotState::Damaged {
                header: Some(header),
                reason: format!(
                    "has a damaged record (sequence {}): the sector at byte {} fails its checksum",
                    header.seq,
                    index * SECTOR as u64
                ),
            });
        }
        if seq != header.seq {
            // Whole, but from another write.
            torn = true;
            newest = newest.max(seq);
        }
    }
    if torn {
        return Ok(SlotState::Torn { seq: newest });
    }
    let mut payload = Vec::with_capacity(body_len);
    for sector in body.chunks(SECTOR) {
        payload.extend_from_slice(&sector[..DATA]);
    }
    payload.truncate(len as usize);
    if record_crc(&first[..32], &payload) != u32_at(&first, 32) {
        return Ok(SlotState::Damaged {
            header: Some(header),
            reason: format!(
                "has a record (sequence {}) whose checksum does not match",
                header.seq
            ),
        });
    }
    Ok(SlotState::Valid { header, payload })
}

/// The highest sequence number of any sector of the slot file (after its header) that
/// passes its checksum; 0 if none.
fn newest_sector(file: &File, size: u64) -> io::Result<u64> {
    let mut newest = 0;
    let mut chunk = vec![0u8; 64 * SECTOR];
    let mut at = SECTOR as u64;
    while at < size {
        let len = usize::try_from((size - at).min(chunk.len() as u64)).map_err(io::Error::other)?;
        let len = len - len % SECTOR;
        if len == 0 {
            break;
        }
        file.read_exact_at(&mut chunk[..len], at)?;
        for (i, sector) in chunk[..len].chunks(SECTOR).enumerate() {
            let index = (at / SECTOR as u64) + i as u64;
            let seq = u64_at(sector, DATA);
            if sector.iter().any(|b| *b != 0)
                && sector_crc(&sector[..DATA], seq, index) == u32_at(sector, DATA + 8)
            {
                newest = newest.max(seq);
            }
        }
        at += len as u64;
    }
    Ok(newest)
}

/// A format 1 record: a 32-byte header (magic, sequence number, length, CRC-32 of the
/// payload) and the payload.
fn read_v1(file: &File, size: u64, first: &[u8]) -> io::Result<SlotState> {
    let header = Header {
        seq: u64_at(first, 8),
        generation: None,
    };
    let len = u64_at(first, 16);
    if len > size.saturating_sub(HEADER_V1) {
        return Ok(SlotState::Damaged {
            header: Some(header),
            reason: format!(
                "is cut short: its format 1 record (sequence {}) needs {} bytes, the file has {size}",
                header.seq,
                len.saturating_add(HEADER_V1)
            ),
        });
    }
    let mut payload = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut payload, HEADER_V1)?;
    if crc32fast::hash(&payload) != u32_at(first, 24) {
        return Ok(SlotState::Damaged {
            header: Some(header),
            reason: format!(
                "has a format 1 record (sequence {}) that fails its checksum (format 1 cannot \
                 tell a torn write from damage)",
                header.seq
            ),
        });
    }
    Ok(SlotState::Valid { header, payload })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn open(dir: &Path) -> (Slots, Opened) {
        Slots::open(dir, false).unwrap()
    }

    fn state(dir: &Path, slot: usize) -> SlotState {
        let file = File::open(dir.join(NAMES[slot])).unwrap();
        read_slot(&file, file.metadata().unwrap().len()).unwrap()
    }

    fn valid(seq: u64) -> SlotState {
        SlotState::Valid {
            header: Header {
                seq,
                generation: Some(seq),
            },
            payload: Vec::new(),
        }
    }

    fn damaged(seq: Option<u64>) -> SlotState {
        SlotState::Damaged {
            header: seq.map(|seq| Header {
                seq,
                generation: Some(seq),
            }),
            reason: "fails its checksum".to_owned(),
        }
    }

    #[test]
    fn a_refused_write_is_told_apart_from_damage() {
        let mut bytes = refused_sector(9).to_vec();
        bytes.extend_from_slice(&[0u8; 512]);
        assert_eq!(classify(&bytes), SlotState::Refused { seq: 9 });
        // Never acknowledged: the intact slot is the state, whichever is newer.
        assert!(matches!(
            decide(&[valid(8), SlotState::Refused { seq: 9 }], true),
            Verdict::Use { slot: 0, .. }
        ));
        assert!(matches!(
            decide(&[SlotState::Refused { seq: 7 }, valid(8)], true),
            Verdict::Use { slot: 1, .. }
        ));
        // A later write to the slot (sequence 12), torn before its header landed: the
        // slot still reads as refused, with the higher number, so it is not used again.
        let later = encode(12, 11, &vec![b'l'; 3 * DATA]);
        let mut torn = refused_sector(9).to_vec();
        torn.extend_from_slice(&later[SECTOR..]);
        assert_eq!(classify(&torn), SlotState::Refused { seq: 12 });
        // A flipped bit is damage, not a refusal.
        bytes[20] ^= 1;
        assert!(matches!(classify(&bytes), SlotState::Damaged { .. }));
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip_and_every_write_takes_a_new_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let (mut slots, opened) = open(dir.path());
        assert!(opened.payload.is_none() && opened.must_initialise);
        slots.initialise(b"zero", 0).unwrap();
        slots.write(b"one", 1).unwrap();
        let payload = vec![7u8; 3 * DATA + 11];
        slots.write(&payload, 2).unwrap();
        drop(slots);
        let (slots, opened) = open(dir.path());
        assert_eq!(opened.payload.as_deref(), Some(&payload[..]));
        assert!(!opened.must_initialise);
        assert_eq!(slots.seq, 4);
        assert!(dir.path().join(MARKER).exists());
    }

    #[test]
    fn a_slot_grows_when_the_state_does() {
        let dir = tempfile::tempdir().unwrap();
        let (mut slots, _) = open(dir.path());
        slots.initialise(b"", 0).unwrap();
        let big = vec![b'x'; 200 * 1024];
        slots.write(&big, 1).unwrap();
        slots.write(b"small", 2).unwrap();
        slots.write(&big, 3).unwrap();
        let (_, opened) = open(dir.path());
        assert_eq!(opened.payload.unwrap().len(), big.len());
    }

    /// Builds the slot a crash leaves: `new` written over `old` for the sectors in
    /// `landed` only (SIGKILL: a prefix; power loss: any subset).
    fn tear(old: &[u8], new: &[u8], landed: impl Fn(usize) -> bool) -> Vec<u8> {
        let mut slot = vec![0u8; CHUNK as usize];
        slot[..old.len()].copy_from_slice(old);
        for (i, sector) in new.chunks(SECTOR).enumerate() {
            if landed(i) {
                slot[i * SECTOR..i * SECTOR + sector.len()].copy_from_slice(sector);
            }
        }
        slot
    }

    fn classify(bytes: &[u8]) -> SlotState {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        read_slot(&file, bytes.len() as u64).unwrap()
    }

    #[test]
    fn a_torn_write_is_told_from_damage() {
        let old = encode(5, 4, &vec![b'o'; 6 * DATA]);
        let new = encode(7, 6, &vec![b'n'; 9 * DATA]);
        // SIGKILL: the first pages landed, the rest is the old record (or zeros).
        assert_eq!(
            classify(&tear(&old, &new, |i| i < 3)),
            SlotState::Torn { seq: 7 }
        );
        assert_eq!(
            classify(&tear(&[], &new, |i| i < 3)),
            SlotState::Torn { seq: 7 }
        );
        // Power loss: the header did not land, later sectors did.
        assert_eq!(
            classify(&tear(&old, &new, |i| i == 4)),
            SlotState::Torn { seq: 7 }
        );
        // Everything landed: the new record.
        assert!(matches!(
            classify(&tear(&old, &new, |_| true)),
            SlotState::Valid {
                header: Header {
                    seq: 7,
                    generation: Some(6)
                },
                ..
            }
        ));
        // One flipped bit anywhere is damage, never a tear.
        for at in [3, 9, 20, 600, 2000, new.len() - 1] {
            let mut flipped = tear(&old, &new, |_| true);
            flipped[at] ^= 0x10;
            assert!(
                matches!(classify(&flipped), SlotState::Damaged { .. }),
                "byte {at}: {:?}",
                classify(&flipped)
            );
        }
        // Cut short: damage, with the header still readable.
        assert!(matches!(
            classify(&new[..4 * SECTOR]),
            SlotState::Damaged {
                header: Some(Header { seq: 7, .. }),
                ..
            }
        ));
        assert_eq!(classify(&[]), SlotState::Empty { len: 0 });
    }

    #[test]
    fn the_newest_valid_state_is_used_only_when_nothing_newer_can_be_lost() {
        use Verdict::*;
        let refuse = |v: Verdict| matches!(v, Refuse { .. });
        // Both intact: the newer.
        assert_eq!(
            decide(&[valid(3), valid(4)], true),
            Use {
                slot: 1,
                note: None
            }
        );
        // A torn write with a higher number: the unacknowledged write.
        assert!(matches!(
            decide(&[valid(4), SlotState::Torn { seq: 5 }], true),
            Use { slot: 0, .. }
        ));
        assert!(matches!(
            decide(&[SlotState::Torn { seq: 9 }, valid(4)], true),
            Use { slot: 1, .. }
        ));
        // The older slot unreadable: the newest is intact.
        assert!(matches!(
            decide(&[valid(4), damaged(Some(3))], true),
            Use { slot: 0, .. }
        ));
        assert!(matches!(
            decide(&[valid(4), SlotState::Torn { seq: 3 }], true),
            Use { slot: 0, .. }
        ));
        // Anything that may have been newer: refused, naming the intact fallback.
        for other in [
            damaged(Some(5)),
            damaged(None),
            SlotState::Missing,
            SlotState::Empty { len: 0 },
            SlotState::Torn { seq: 4 },
        ] {
            let v = decide(&[valid(4), other], true);
            assert!(
                matches!(
                    v,
                    Refuse {
                        fallback: Some(0),
                        ..
                    }
                ),
                "{v:?}"
            );
        }
        assert!(refuse(decide(&[valid(4), valid(4)], true)));
        // Both gone, marker present: refused, never a new store.
        assert!(matches!(
            decide(&[SlotState::Missing, SlotState::Empty { len: 0 }], true),
            Refuse { fallback: None, .. }
        ));
        assert!(refuse(decide(&[damaged(None), damaged(Some(2))], true)));
        assert!(refuse(decide(
            &[SlotState::Torn { seq: 2 }, SlotState::Missing],
            true
        )));
        // No marker: a new store, or one whose creation a crash cut.
        assert_eq!(
            decide(&[SlotState::Missing, SlotState::Missing], false),
            New { note: None }
        );
        assert!(matches!(
            decide(
                &[SlotState::Torn { seq: 1 }, SlotState::Empty { len: 0 }],
                false
            ),
            New { .. }
        ));
        assert_eq!(
            decide(&[valid(1), SlotState::Empty { len: 0 }], false),
            Use {
                slot: 0,
                note: None
            }
        );
        assert!(matches!(
            decide(&[valid(6), damaged(Some(7))], false),
            Use { slot: 0, .. }
        ));
        // ... but a format 1 store of several commits missing a slot is refused.
        assert!(refuse(decide(&[valid(6), SlotState::Missing], false)));
        let v1_damaged = SlotState::Damaged {
            header: Some(Header {
                seq: 7,
                generation: None,
            }),
            reason: "format 1".to_owned(),
        };
        assert!(refuse(decide(&[valid(6), v1_damaged], false)));
    }

    #[test]
    fn format_1_slots_are_read_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        for (slot, seq, payload) in [(0usize, 3u64, &b"three"[..]), (1, 2, b"two")] {
            let mut bytes = vec![0u8; CHUNK as usize];
            bytes[..8].copy_from_slice(MAGIC_V1);
            bytes[8..16].copy_from_slice(&seq.to_le_bytes());
            bytes[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            bytes[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
            bytes[32..32 + payload.len()].copy_from_slice(payload);
            std::fs::write(dir.path().join(NAMES[slot]), bytes).unwrap();
        }
        let (mut slots, opened) = open(dir.path());
        assert_eq!(opened.payload.as_deref(), Some(&b"three"[..]));
        assert!(opened.must_initialise);
        slots.initialise(b"three", 9).unwrap();
        for slot in 0..2 {
            assert!(matches!(
                state(dir.path(), slot),
                SlotState::Valid {
                    header: Header {
                        generation: Some(9),
                        ..
                    },
                    ..
                }
            ));
        }
        let (_, opened) = open(dir.path());
        assert_eq!(opened.payload.as_deref(), Some(&b"three"[..]));
        assert!(!opened.must_initialise);
    }
}
