//! The slot writer's side of a session (`keel-slot-writer`): reads requests (see
//! `protocol.rs`), writes the inactive slot's partitions and boot files, checks what it
//! wrote, and answers. Synchronous, one session per process; the slots are written by
//! one session at a time ([`EspLayout::lock_slots`]): keeld runs one update command at a
//! time, but may give up on a session that is still checking what it wrote (and then
//! asks, with a settled inspect, for what that session left, once it has ended), and
//! stages boot parameters beside a running prepare.
//!
//! Owns the checks made where the bytes land, whatever keeld asked: the running slot is
//! refused (command line, and `O_EXCL` on block devices); a write larger than its
//! partition is refused before a byte is written; the sha256 of what was written must be
//! the target's (hash partition, boot files); the dm-verity tree recomputed from the root
//! image must equal the hash partition's and give the manifest's root hash (which
//! authenticates every block of the root, so the root needs no sha256 pass of its own); loader entries change only as
//! `loader.rs` says. Memory stays bounded: the payload passes through in 1 MiB chunks,
//! with at most [`IN_FLIGHT`] chunks queued to the hashing threads.

use std::collections::VecDeque;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::loader::{BootParameters, EspLayout, LoaderError, NewEntry};
use super::protocol::{Answer, BootFile, Inspection, Request, Written, MAX_LINE};
use super::slots::{boot_id, Part, Slot, SlotLayout};
use super::verity::{Superblock, TreeBuilder, SUPERBLOCK_BYTES};

/// Payload chunk size.
const CHUNK: usize = 1024 * 1024;
/// Chunks queued to each hashing thread at most.
const IN_FLIGHT: usize = 4;
/// Most boot attempts an entry may be given.
const MAX_TRIES: u32 = 16;

/// Space on the ESP a boot file may not take: the loader entries' (a few hundred bytes
/// each, written through temporary files) and then some.
const ESP_RESERVE: u64 = 1 << 20;

/// What the writer may touch.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub slots: SlotLayout,
    pub esp: EspLayout,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: PathBuf,
    /// How long a request that touches a slot waits for another session's hold on the
    /// slots to end (see [`EspLayout::lock_slots`]).
    pub session_wait: Duration,
}

/// A refusal, with the message keeld shows to the user. `desync` when the payload of the
/// request was not read whole, so the session cannot go on.
#[derive(Debug)]
struct Refusal {
    message: String,
    desync: bool,
}

fn refuse(message: impl std::fmt::Display) -> Refusal {
    Refusal {
        message: message.to_string(),
        desync: false,
    }
}

fn refuse_desync(message: impl std::fmt::Display) -> Refusal {
    Refusal {
        message: message.to_string(),
        desync: true,
    }
}

/// Serves one session until its input ends. Answers every request; a request whose
/// payload could not be read whole ends the session after its answer.
pub fn serve(
    config: &WriterConfig,
    input: &mut impl BufRead,
    output: &mut impl Write,
) -> std::io::Result<()> {
    // This session's hold on the slots, once a request needs it
    // (see `EspLayout::lock_slots`).
    let mut slots_lock = None;
    loop {
        let mut line = Vec::new();
        let read = input
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            answer(output, &Answer::failed("request line too long"))?;
            return Ok(());
        }
        let request: Request = match serde_json::from_slice(&line) {
            Ok(request) => request,
            Err(e) => {
                // Whether a payload follows is unknown: the session cannot go on.
                answer(output, &Answer::failed(format!("malformed request: {e}")))?;
                return Ok(());
            }
        };
        let result = hold_slots(config, &request, &mut slots_lock)
            .and_then(|()| handle(config, &request, input));
        match result {
            Ok(reply) => answer(output, &reply)?,
            Err(refusal) => {
                tracing::warn!(request = ?request, error = %refusal.message, "refused");
                answer(output, &Answer::failed(&refusal.message))?;
                if refusal.desync {
                    return Ok(());
                }
            }
        }
    }
}

fn answer(output: &mut impl Write, answer: &Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(answer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    output.write_all(&line)?;
    output.flush()
}

fn written(written: Written) -> Answer {
    Answer::Written { ok: true, written }
}

/// Takes the session's hold on the slots for a request that touches one (before its
/// payload, if any, is read: a refusal then ends the session).
fn hold_slots(
    config: &WriterConfig,
    request: &Request,
    lock: &mut Option<std::fs::File>,
) -> Result<(), Refusal> {
    let touches_a_slot = match request {
        Request::Invalidate { .. }
        | Request::WritePartition { .. }
        | Request::WriteBootFile { .. }
        | Request::Activate { .. }
        | Request::Deactivate { .. }
        | Request::InspectSettled => true,
        Request::Inspect | Request::SetBootParameters { .. } | Request::SettleBootParameters => {
            false
        }
    };
    if touches_a_slot && lock.is_none() {
        *lock = Some(
            config
                .esp
                .lock_slots(config.session_wait)
                .map_err(refuse_desync)?,
        );
    }
    Ok(())
}

fn handle(
    config: &WriterConfig,
    request: &Request,
    input: &mut impl BufRead,
) -> Result<Answer, Refusal> {
    // Before anything is read or written: the ESP this writer would touch is the
    // running disk's (a payload may follow, so a refusal ends the session).
    config
        .slots
        .check_on_running_disk("the ESP", &config.esp.esp)
        .map_err(|e| refuse_desync(e.to_string()))?;
    match request {
        Request::Inspect | Request::InspectSettled => {
            inspect(config).map(|inspection| Answer::Inspection {
                ok: true,
                inspection,
            })
        }
        Request::Invalidate { slot } => {
            let active = inactive_only(config, *slot)?;
            config.esp.check_running_blessed(active).map_err(refuse)?;
            let entries = config.esp.invalidate(*slot).map_err(refuse)?;
            tracing::info!(slot = %slot, removed = ?entries, "slot invalidated");
            Ok(written(Written {
                bytes: 0,
                sha256: None,
                root_hash: None,
                entries,
            }))
        }
        Request::WritePartition {
            slot,
            part,
            size,
            sha256,
            root_hash,
        } => write_partition(
            config,
            *slot,
            *part,
            *size,
            sha256,
            root_hash.as_deref(),
            input,
        )
        .map(written),
        Request::WriteBootFile {
            slot,
            file,
            size,
            sha256,
        } => write_boot_file(config, *slot, *file, *size, sha256, input).map(written),
        Request::Activate {
            slot,
            os_version,
            root_hash,
            tries,
        } => {
            // While the running slot is on trial, the other slot's entry is its way
            // back: not replaced by a counting one either.
            let active = inactive_only(config, *slot)?;
            config.esp.check_running_blessed(active).map_err(refuse)?;
            if !(1..=MAX_TRIES).contains(tries) {
                return Err(refuse(format!(
                    "tries must be 1 to {MAX_TRIES}, not {tries}"
                )));
            }
            if root_hash.len() != 64 || !root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(refuse(format!("{root_hash:?} is not a sha256 root hash")));
            }
            if os_version.is_empty()
                || os_version.len() > 128
                || !os_version
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-+_".contains(&b))
            {
                return Err(refuse(format!("{os_version:?} is not a version")));
            }
            let cmdline = config.slots.read_cmdline().map_err(refuse)?;
            let file = config
                .esp
                .activate(
                    NewEntry {
                        slot: *slot,
                        os_version,
                        root_hash: &root_hash.to_ascii_lowercase(),
                        sort_version: 0,
                        extra_options: "",
                        parameters: &BootParameters::default(),
                    },
                    Some((active, &cmdline)),
                    *tries,
                )
                .map_err(refuse)?;
            tracing::info!(slot = %slot, entry = %file, "slot activated for the next boot");
            Ok(written(Written {
                bytes: 0,
                sha256: None,
                root_hash: Some(root_hash.clone()),
                entries: vec![file],
            }))
        }
        Request::Deactivate { slot } => {
            // While the running slot is on trial, the other slot's entry is its way
            // back: it stays.
            let active = inactive_only(config, *slot)?;
            config.esp.check_running_blessed(active).map_err(refuse)?;
            let entries = config.esp.invalidate(*slot).map_err(refuse)?;
            tracing::info!(slot = %slot, removed = ?entries, "slot deactivated");
            Ok(written(Written {
                bytes: 0,
                sha256: None,
                root_hash: None,
                entries,
            }))
        }
        Request::SetBootParameters { parameters } => {
            parameters.check().map_err(refuse)?;
            let active = config.slots.active().map_err(refuse)?;
            let cmdline = config.slots.read_cmdline().map_err(refuse)?;
            let settled = config
                .esp
                .stage_parameters(parameters, active, &cmdline)
                .map_err(refuse)?;
            tracing::info!(trial = ?settled.trial, entries = ?settled.entries, "boot parameters staged for the next boot");
            Ok(Answer::Parameters {
                ok: true,
                parameters: settled,
            })
        }
        Request::SettleBootParameters => {
            let active = config.slots.active().map_err(refuse)?;
            let cmdline = config.slots.read_cmdline().map_err(refuse)?;
            let settled = config
                .esp
                .settle_parameters(active, &cmdline)
                .map_err(refuse)?;
            tracing::info!(trial = ?settled.trial, entries = ?settled.entries, "boot parameters settled");
            Ok(Answer::Parameters {
                ok: true,
                parameters: settled,
            })
        }
    }
}

/// The running slot, after checking `slot` is not it.
fn inactive_only(config: &WriterConfig, slot: Slot) -> Result<Slot, Refusal> {
    let active = config.slots.active().map_err(refuse)?;
    if active == slot {
        return Err(refuse(super::slots::SlotError::Running(slot)));
    }
    Ok(active)
}

/// Whether `slot` may be written now: not the running slot, the running slot blessed
/// (until then the other slot is its fallback), and no loader entry naming `slot` (an
/// `Invalidate` comes first, so no boot can pick a slot while it is half written).
/// keeld asks in that order; checked here again whatever it asked.
fn writable(config: &WriterConfig, slot: Slot) -> Result<(), Refusal> {
    let active = inactive_only(config, slot)?;
    config.esp.check_running_blessed(active).map_err(refuse)?;
    let naming: Vec<String> = config
        .esp
        .entries()
        .map_err(refuse)?
        .into_iter()
        .filter(|(entry, _)| entry.slot == slot)
        .map(|(entry, _)| entry.file)
        .collect();
    if !naming.is_empty() {
        return Err(refuse(format!(
            "slot {slot} is still named by loader entry {}: invalidate it before writing it",
            naming.join(", ")
        )));
    }
    Ok(())
}

fn inspect(config: &WriterConfig) -> Result<Inspection, Refusal> {
    let active = config.slots.active().map_err(refuse)?;
    let inactive = active.other();
    Ok(Inspection {
        active,
        boot_id: boot_id(&config.boot_id).map_err(refuse)?,
        root_size: config.slots.size(inactive, Part::Root).map_err(refuse)?,
        hash_size: config.slots.size(inactive, Part::Hash).map_err(refuse)?,
        entries: config
            .esp
            .entries()
            .map_err(refuse)?
            .into_iter()
            .map(|(e, _)| e)
            .filter(|e| !e.trial)
            .collect(),
        missing_boot_files: [Slot::A, Slot::B]
            .into_iter()
            .filter_map(|slot| match config.esp.boot_files_present(slot) {
                Ok(()) => None,
                Err(LoaderError::MissingBootFile { file, path, .. }) => Some((
                    slot,
                    format!("its {file} is not on the ESP ({})", path.display()),
                )),
                Err(other) => Some((slot, other.to_string())),
            })
            .collect(),
    })
}

fn check_hex(what: &str, hex_text: &str) -> Result<(), Refusal> {
    if hex_text.len() == 64 && hex_text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(refuse_desync(format!(
            "{what} {hex_text:?} is not a sha256 digest"
        )))
    }
}

/// Reads the superblock of `slot`'s hash partition.
fn read_superblock(config: &WriterConfig, slot: Slot) -> Result<Superblock, Refusal> {
    let path = config
        .slots
        .device(slot, Part::Hash)
        .map_err(|e| refuse_desync(e.to_string()))?;
    let mut bytes = vec![0u8; SUPERBLOCK_BYTES];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| refuse_desync(format!("cannot read {}: {e}", path.display())))?;
    Superblock::parse(&bytes).map_err(|e| {
        refuse_desync(format!(
            "{} ({}): {e}; the hash image is written before the root image",
            Part::Hash.label(slot),
            path.display()
        ))
    })
}

/// Bytes written between two starts of writeback.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// Starts writing `len` bytes at `offset` of `file` back to the device without waiting,
/// so that the disk works while the payload still streams in and the `fdatasync` at the
/// end finds little left to do. Only a hint: the `fdatasync` is what makes the data
/// durable, and a failure here is left for it to report.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a file descriptor `file` keeps open for the call; it
    // reads and writes no memory of this process.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

/// A thread hashing the chunks it is sent.
struct Hashing<T> {
    sender: mpsc::SyncSender<Arc<Vec<u8>>>,
    handle: std::thread::JoinHandle<T>,
}

impl<T: Send + 'static> Hashing<T> {
    fn start<S: Send + 'static>(
        mut state: S,
        mut feed: impl FnMut(&mut S, &[u8]) + Send + 'static,
        finish: impl FnOnce(S) -> T + Send + 'static,
    ) -> Hashing<T> {
        let (sender, receiver) = mpsc::sync_channel::<Arc<Vec<u8>>>(IN_FLIGHT);
        let handle = std::thread::spawn(move || {
            for chunk in receiver {
                feed(&mut state, &chunk);
            }
            finish(state)
        });
        Hashing { sender, handle }
    }

    fn send(&self, chunk: Arc<Vec<u8>>) {
        // A hashing thread only stops when its sender is dropped.
        let _ = self.sender.send(chunk);
    }

    fn finish(self) -> Result<T, Refusal> {
        drop(self.sender);
        self.handle
            .join()
            .map_err(|_| refuse("a hashing thread panicked"))
    }
}

/// Copies exactly `size` payload bytes into `sink`, feeding each chunk to `hashers`.
/// Chunk buffers go round: one comes back once every hashing thread is done with it, so
/// a payload costs a few buffers, not one fresh (zeroed, faulted-in) buffer per chunk.
fn copy_payload(
    input: &mut impl BufRead,
    size: u64,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    mut hashers: impl FnMut(Arc<Vec<u8>>),
) -> Result<(), Refusal> {
    let mut sent: VecDeque<Arc<Vec<u8>>> = VecDeque::new();
    let mut done = 0u64;
    while done < size {
        let want = usize::try_from((size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut chunk = reusable(&mut sent);
        chunk.resize(want, 0);
        input.read_exact(&mut chunk).map_err(|e| {
            refuse_desync(format!(
                "the data stopped after {done} of {size} bytes ({e}); nothing was marked \
                 bootable"
            ))
        })?;
        sink(&chunk).map_err(|e| refuse_desync(format!("write failed after {done} bytes: {e}")))?;
        done += want as u64;
        let chunk = Arc::new(chunk);
        sent.push_back(chunk.clone());
        if sent.len() > 2 * IN_FLIGHT + 2 {
            sent.pop_front();
        }
        hashers(chunk);
    }
    Ok(())
}

/// The oldest chunk sent if no hashing thread holds it any more, else a new buffer.
fn reusable(sent: &mut VecDeque<Arc<Vec<u8>>>) -> Vec<u8> {
    if let Some(oldest) = sent.pop_front() {
        match Arc::try_unwrap(oldest) {
            Ok(buffer) => return buffer,
            Err(held) => sent.push_front(held),
        }
    }
    Vec::with_capacity(CHUNK)
}

fn write_partition(
    config: &WriterConfig,
    slot: Slot,
    part: Part,
    size: u64,
    sha256: &str,
    root_hash: Option<&str>,
    input: &mut impl BufRead,
) -> Result<Written, Refusal> {
    check_hex("sha256", sha256)?;
    if let Err(e) = writable(config, slot) {
        return Err(refuse_desync(e.message));
    }
    let label = part.label(slot);
    let (mut file, capacity) = config
        .slots
        .open_partition(slot, part)
        .map_err(refuse_desync)?;
    if size > capacity {
        return Err(refuse_desync(format!(
            "the {} image ({size} bytes) does not fit partition {label} ({capacity} bytes)",
            match part {
                Part::Root => "root",
                Part::Hash => "hash",
            }
        )));
    }
    let superblock = match part {
        Part::Hash => None,
        Part::Root => {
            let expected =
                root_hash.ok_or_else(|| refuse_desync("a root write needs the root hash"))?;
            check_hex("root hash", expected)?;
            let sb = read_superblock(config, slot)?;
            if sb.data_bytes() != size {
                return Err(refuse_desync(format!(
                    "the root image is {size} bytes, but the hash tree on {} describes {} \
                     bytes ({} blocks of {})",
                    Part::Hash.label(slot),
                    sb.data_bytes(),
                    sb.data_blocks,
                    sb.data_block_size
                )));
            }
            Some(sb)
        }
    };
    // The root is checked by its dm-verity tree alone: recomputed from these bytes and
    // compared with the manifest's root hash (signed, through the TUF targets), it
    // authenticates every block, so a whole-image sha256 of the same bytes would be a
    // third pass over them (keeld's TUF check is the first) for nothing. The hash
    // partition, which no tree covers, is checked by its sha256.
    let sha = superblock.is_none().then(|| {
        Hashing::start(
            Sha256::new(),
            |h, c| h.update(c),
            |h| hex::encode(h.finalize()),
        )
    });
    let tree = superblock.clone().map(|sb| {
        Hashing::start(
            TreeBuilder::new(sb),
            |t, c| t.update(c),
            TreeBuilder::finish,
        )
    });
    let mut flushed = 0u64;
    let mut written = 0u64;
    copy_payload(
        input,
        size,
        |chunk| {
            file.write_all(chunk)?;
            written += chunk.len() as u64;
            if written - flushed >= WRITEBACK_WINDOW {
                start_writeback(&file, flushed, written - flushed);
                flushed = written;
            }
            Ok(())
        },
        |chunk| {
            if let Some(tree) = &tree {
                tree.send(chunk.clone());
            }
            if let Some(sha) = &sha {
                sha.send(chunk);
            }
        },
    )?;
    // The data is on the device before the answer says it was written.
    file.sync_data()
        .map_err(|e| refuse(format!("fdatasync of {label}: {e}")))?;
    drop(file);
    let digest = match sha {
        Some(sha) => Some(sha.finish()?),
        None => None,
    };
    if let Some(digest) = digest
        .as_deref()
        .filter(|d| *d != sha256.to_ascii_lowercase())
    {
        return Err(refuse(format!(
            "the {size} bytes written to {label} have sha256 {digest}, but the target's is \
             {sha256}: refused"
        )));
    }
    let mut computed_root = None;
    if let (Some(tree), Some(sb)) = (tree, superblock) {
        let tree = tree.finish()?.map_err(refuse)?;
        let expected = root_hash.unwrap_or_default().to_ascii_lowercase();
        if tree.root_hash_hex() != expected {
            return Err(refuse(format!(
                "the dm-verity root hash of the image written to {label} is {}, but the \
                 manifest's is {expected}: refused",
                tree.root_hash_hex()
            )));
        }
        compare_hash_area(config, slot, &sb, &tree.hash_area)?;
        computed_root = Some(tree.root_hash_hex());
    }
    tracing::info!(slot = %slot, partition = %label, bytes = size, "partition written and verified");
    Ok(Written {
        bytes: size,
        sha256: digest,
        root_hash: computed_root,
        entries: Vec::new(),
    })
}

/// Checks the hash partition holds the tree recomputed from the root image, so that
/// dm-verity will accept every block at boot.
fn compare_hash_area(
    config: &WriterConfig,
    slot: Slot,
    sb: &Superblock,
    area: &[u8],
) -> Result<(), Refusal> {
    let path = config.slots.device(slot, Part::Hash).map_err(refuse)?;
    let label = Part::Hash.label(slot);
    let mut file = std::fs::File::open(&path).map_err(|e| refuse(format!("{label}: {e}")))?;
    file.seek(SeekFrom::Start(sb.hash_area_offset()))
        .map_err(|e| refuse(format!("{label}: {e}")))?;
    let mut offset = 0usize;
    let mut buf = vec![0u8; CHUNK];
    while offset < area.len() {
        let want = (area.len() - offset).min(CHUNK);
        file.read_exact(&mut buf[..want]).map_err(|e| {
            refuse(format!(
                "{label} is shorter than the hash tree of the root image ({e})"
            ))
        })?;
        if buf[..want] != area[offset..offset + want] {
            return Err(refuse(format!(
                "the hash tree on {label} does not match the root image written beside it \
                 (they differ within bytes {}..{} of the hash area): refused",
                offset,
                offset + want
            )));
        }
        offset += want;
    }
    Ok(())
}

fn write_boot_file(
    config: &WriterConfig,
    slot: Slot,
    which: BootFile,
    size: u64,
    sha256: &str,
    input: &mut impl BufRead,
) -> Result<Written, Refusal> {
    check_hex("sha256", sha256)?;
    if let Err(e) = writable(config, slot) {
        return Err(refuse_desync(e.message));
    }
    let dir = config.esp.slot_dir(slot);
    std::fs::create_dir_all(&dir)
        .map_err(|e| refuse_desync(format!("ESP {}: {e}", dir.display())))?;
    // The temporary file sits beside the old one until the rename: it must fit in what
    // is free, with room left for the loader entries (a full ESP fails every entry
    // write, the running slot's included).
    let free = rustix::fs::statvfs(&dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|e| refuse_desync(format!("ESP {}: {e}", dir.display())))?;
    if size.saturating_add(ESP_RESERVE) > free {
        return Err(refuse_desync(format!(
            "the {} is {size} bytes and the ESP has {free} free ({ESP_RESERVE} are kept for the \
             loader entries): refused",
            which.file_name()
        )));
    }
    let target = dir.join(which.file_name());
    // `None` until the payload was read: if the temporary file cannot even be made, the
    // payload is still in the stream, and the session cannot go on.
    let mut outcome: Option<Result<String, Refusal>> = None;
    let replaced = super::durable::replace_with(&target, |file| {
        let sha = Hashing::start(
            Sha256::new(),
            |h, c| h.update(c),
            |h| hex::encode(h.finalize()),
        );
        let copied = copy_payload(
            input,
            size,
            |chunk| file.write_all(chunk),
            |chunk| sha.send(chunk),
        );
        let digest = sha.finish();
        match (copied, digest) {
            (Err(e), _) | (Ok(()), Err(e)) => {
                let message = e.message.clone();
                outcome = Some(Err(e));
                Err(std::io::Error::other(message))
            }
            (Ok(()), Ok(digest)) if digest != sha256.to_ascii_lowercase() => {
                let message = format!(
                    "the {size} bytes of {} have sha256 {digest}, but the target's is {sha256}: \
                     refused",
                    which.file_name()
                );
                outcome = Some(Err(refuse(&message)));
                // Not renamed into place: the old file stays.
                Err(std::io::Error::other(message))
            }
            (Ok(()), Ok(digest)) => {
                outcome = Some(Ok(digest));
                Ok(())
            }
        }
    });
    match (replaced, outcome) {
        (Ok(()), Some(Ok(digest))) => {
            tracing::info!(slot = %slot, file = %target.display(), bytes = size, "boot file written");
            Ok(Written {
                bytes: size,
                sha256: Some(digest),
                root_hash: None,
                entries: Vec::new(),
            })
        }
        (_, Some(Err(refusal))) => Err(refusal),
        (Err(e), Some(Ok(_))) => Err(refuse(format!("ESP {}: {e}", target.display()))),
        (Err(e), None) => Err(refuse_desync(format!("ESP {}: {e}", target.display()))),
        (Ok(()), None) => Err(refuse_desync(format!(
            "ESP {}: the file was replaced without its payload",
            target.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updates::loader::BootParameters;
    use crate::updates::verity::format_for_tests;

    struct Fixture {
        dir: tempfile::TempDir,
        config: WriterConfig,
    }

    /// Slots of 64 KiB (root) and 16 KiB (hash) as files, slot `a` running, an ESP with
    /// slot a's entry.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts = dir.path().join("by-partlabel");
        std::fs::create_dir_all(&parts).expect("mkdir");
        for slot in ["a", "b"] {
            std::fs::write(parts.join(format!("keel-root-{slot}")), vec![0xeeu8; 65536])
                .expect("w");
            std::fs::write(
                parts.join(format!("keel-verity-{slot}")),
                vec![0xeeu8; 16384],
            )
            .expect("w");
        }
        std::fs::write(dir.path().join("cmdline"), "keel.slot=a console=ttyS0").expect("w");
        std::fs::write(dir.path().join("boot_id"), "boot-1\n").expect("w");
        let esp = dir.path().join("esp");
        std::fs::create_dir_all(esp.join("loader/entries")).expect("mkdir");
        std::fs::write(
            esp.join("loader/entries/keel-a.conf"),
            "title Keel 1.0.0\nsort-key keel\nversion 1\nlinux /keel/a/vmlinuz\ninitrd /keel/a/initrd.img\noptions keel.slot=a keel.roothash=00 console=ttyS0\n",
        )
        .expect("w");
        let config = WriterConfig {
            slots: SlotLayout {
                partitions: parts,
                cmdline: dir.path().join("cmdline"),
                sys: dir.path().join("sys"),
            },
            esp: EspLayout { esp },
            boot_id: dir.path().join("boot_id"),
            session_wait: Duration::from_secs(5),
        };
        Fixture { dir, config }
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Runs one session of `requests` (each with its payload) and answers the answers.
    fn session(config: &WriterConfig, requests: &[(Request, &[u8])]) -> Vec<Answer> {
        let mut input = Vec::new();
        for (request, payload) in requests {
            input.extend_from_slice(&serde_json::to_vec(request).expect("json"));
            input.push(b'\n');
            input.extend_from_slice(payload);
        }
        let mut output = Vec::new();
        serve(config, &mut std::io::Cursor::new(input), &mut output).expect("serve");
        output
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("answer"))
            .collect()
    }

    fn error(answer: &Answer) -> &str {
        match answer {
            Answer::Failed { error, .. } => error,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn root_image() -> (Vec<u8>, Vec<u8>, String) {
        let data: Vec<u8> = (0..8 * 4096).map(|i| (i % 251) as u8).collect();
        let (hash, root) = format_for_tests(&data, &[7u8; 32]);
        (data, hash, root)
    }

    fn write(slot: Slot, part: Part, payload: &[u8], root_hash: Option<&str>) -> Request {
        Request::WritePartition {
            slot,
            part,
            size: payload.len() as u64,
            sha256: sha(payload),
            root_hash: root_hash.map(str::to_owned),
        }
    }

    fn esp_at(path: &std::path::Path) -> EspLayout {
        EspLayout {
            esp: path.to_owned(),
        }
    }

    #[test]
    fn one_session_at_a_time_holds_the_slots() {
        let esp = tempfile::tempdir().expect("tempdir");
        let first = esp_at(esp.path()).lock_slots(Duration::ZERO).expect("ok");
        let busy = esp_at(esp.path())
            .lock_slots(Duration::from_millis(200))
            .expect_err("refused");
        assert!(busy.contains("another slot writer session"), "{busy}");
        // A session waiting for the hold gets it once the one before ends, not earlier.
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ending = {
            let ended = ended.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                ended.store(true, std::sync::atomic::Ordering::SeqCst);
                drop(first);
            })
        };
        let _second = esp_at(esp.path())
            .lock_slots(Duration::from_secs(30))
            .expect("ok");
        assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
        ending.join().expect("thread");
        let missing = esp_at(&esp.path().join("none"))
            .lock_slots(Duration::ZERO)
            .expect_err("refused");
        assert!(missing.starts_with("cannot open the ESP"), "{missing}");
    }

    /// While another session holds the slots: inspecting and staging boot parameters
    /// are served at once; invalidating a slot waits, is refused with why, and ends the
    /// session.
    #[test]
    fn only_requests_that_touch_a_slot_wait_for_another_session() {
        let mut f = fixture();
        f.config.session_wait = Duration::from_millis(200);
        let _other = f.config.esp.lock_slots(Duration::ZERO).expect("held");
        let parameters = BootParameters {
            kernel: "quiet".to_owned(),
            init: String::new(),
        };
        let began = std::time::Instant::now();
        let answers = session(
            &f.config,
            &[
                (Request::Inspect, &[]),
                (Request::SetBootParameters { parameters }, &[]),
                (Request::Invalidate { slot: Slot::B }, &[]),
                (Request::Inspect, &[]),
            ],
        );
        assert!(
            matches!(answers[0], Answer::Inspection { .. }),
            "{answers:?}"
        );
        assert!(
            matches!(answers[1], Answer::Parameters { .. }),
            "{answers:?}"
        );
        assert!(began.elapsed() >= Duration::from_millis(200));
        assert!(error(&answers[2]).contains("another slot writer session"));
        assert_eq!(answers.len(), 3, "the refusal ends the session");
        // Deactivating waits too: it must not remove an entry that the other session's
        // activate writes next.
        let answers = session(&f.config, &[(Request::Deactivate { slot: Slot::B }, &[])]);
        assert!(error(&answers[0]).contains("another slot writer session"));
        // So does a settled inspect: it is asked for what the other session leaves.
        let answers = session(&f.config, &[(Request::InspectSettled, &[])]);
        assert!(error(&answers[0]).contains("another slot writer session"));
    }

    /// A settled inspect is answered once the session holding the slots ends, with what
    /// that session wrote: keeld asks it when it gave up waiting for an activate, and an
    /// answer read before that activate landed would say the entry is not there.
    #[test]
    fn a_settled_inspect_reads_the_entries_once_the_session_holding_the_slots_ends() {
        let mut f = fixture();
        f.config.session_wait = Duration::from_secs(20);
        let other = f.config.esp.lock_slots(Duration::ZERO).expect("held");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let config = f.config.clone();
        let reader = std::thread::spawn(move || {
            let answers = session(&config, &[(Request::InspectSettled, &[])]);
            done_tx.send(()).expect("send");
            answers
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "answered while another session holds the slots"
        );
        // What the other session writes before it ends is in the answer.
        std::fs::write(
            f.config.esp.entries_dir().join("keel-b+3.conf"),
            "title Keel 1.1.0\nsort-key keel\nversion 2\nlinux /keel/b/vmlinuz\ninitrd /keel/b/initrd.img\noptions keel.slot=b keel.roothash=00 console=ttyS0\n",
        )
        .expect("entry");
        drop(other);
        let answers = reader.join().expect("reader");
        match &answers[0] {
            Answer::Inspection { inspection, .. } => assert!(
                inspection.entries.iter().any(|e| e.file == "keel-b+3.conf"),
                "{inspection:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_whole_update_lands_in_the_inactive_slot_and_its_entry_boots_next() {
        let f = fixture();
        let (data, hash, root) = root_image();
        let kernel = b"kernel-bytes".to_vec();
        let answers = session(
            &f.config,
            &[
                (Request::Inspect, &[]),
                (Request::Invalidate { slot: Slot::B }, &[]),
                (write(Slot::B, Part::Hash, &hash, None), &hash),
                (write(Slot::B, Part::Root, &data, Some(&root)), &data),
                (
                    Request::WriteBootFile {
                        slot: Slot::B,
                        file: BootFile::Kernel,
                        size: kernel.len() as u64,
                        sha256: sha(&kernel),
                    },
                    &kernel,
                ),
                (
                    Request::WriteBootFile {
                        slot: Slot::B,
                        file: BootFile::Initrd,
                        size: 3,
                        sha256: sha(b"ird"),
                    },
                    b"ird",
                ),
                (
                    Request::Activate {
                        slot: Slot::B,
                        os_version: "1.1.0".into(),
                        root_hash: root.clone(),
                        tries: 3,
                    },
                    &[],
                ),
            ],
        );
        assert_eq!(answers.len(), 7, "{answers:?}");
        match &answers[0] {
            Answer::Inspection { inspection, .. } => {
                assert_eq!(inspection.active, Slot::A);
                assert_eq!(inspection.boot_id, "boot-1");
                assert_eq!((inspection.root_size, inspection.hash_size), (65536, 16384));
                let missing: Vec<_> = inspection.missing_boot_files.iter().collect();
                assert_eq!(missing.len(), 2, "{missing:?}");
                let (slot, text) = &missing[1];
                assert_eq!(*slot, Slot::B);
                assert!(
                    text.starts_with("its vmlinuz is not on the ESP ("),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        match &answers[3] {
            Answer::Written { written, .. } => {
                assert_eq!(written.root_hash.as_deref(), Some(root.as_str()));
                assert_eq!(written.bytes, data.len() as u64);
            }
            other => panic!("{other:?}"),
        }
        let parts = &f.config.slots.partitions;
        let b_root = std::fs::read(parts.join("keel-root-b")).expect("read");
        assert_eq!(&b_root[..data.len()], &data[..]);
        // The running slot is untouched.
        assert!(std::fs::read(parts.join("keel-root-a"))
            .expect("read")
            .iter()
            .all(|b| *b == 0xee));
        assert!(std::fs::read(parts.join("keel-verity-a"))
            .expect("read")
            .iter()
            .all(|b| *b == 0xee));
        let esp = &f.config.esp;
        assert_eq!(
            std::fs::read(esp.slot_dir(Slot::B).join("vmlinuz")).expect("read"),
            kernel
        );
        let entry =
            std::fs::read_to_string(esp.entries_dir().join("keel-b+3.conf")).expect("entry");
        assert!(entry.contains(&format!("keel.roothash={root}")), "{entry}");
        assert!(entry.contains("console=ttyS0"), "{entry}");
        // Deactivation removes it.
        let answers = session(&f.config, &[(Request::Deactivate { slot: Slot::B }, &[])]);
        assert!(matches!(answers[0], Answer::Written { .. }), "{answers:?}");
        assert!(!esp.entries_dir().join("keel-b+3.conf").exists());
        // Slot b's boot files are all there now; removing one is seen.
        let inspect =
            |config: &WriterConfig| match session(config, &[(Request::Inspect, &[])]).remove(0) {
                Answer::Inspection { inspection, .. } => inspection.missing_boot_files,
                other => panic!("{other:?}"),
            };
        assert!(
            inspect(&f.config).iter().all(|(slot, _)| *slot != Slot::B),
            "slot b is complete"
        );
        std::fs::remove_file(esp.slot_dir(Slot::B).join("initrd.img")).expect("rm");
        let missing = inspect(&f.config);
        let (_, text) = missing
            .iter()
            .find(|(slot, _)| *slot == Slot::B)
            .expect("slot b misses its initrd");
        assert!(
            text.starts_with("its initrd.img is not on the ESP"),
            "{text}"
        );
        drop(f.dir);
    }

    /// New boot parameters go into a trial entry of the running slot, the kept entry
    /// untouched; bad ones change nothing; a slot change waits for the trial; a trial
    /// that `systemd-bless-boot` blessed is kept in every entry at the next settling, one
    /// that used up its try without this boot running it is removed and reported, one
    /// this boot runs stays; parameters the kept entry holds take a trial back.
    #[test]
    fn boot_parameters_are_tried_before_they_are_kept() {
        use super::super::loader::{command_line, ParameterTrial, Settled};
        let f = fixture();
        let esp = &f.config.esp;
        let entries = esp.entries_dir();
        let kept_text = std::fs::read_to_string(entries.join("keel-a.conf")).expect("read");
        let set = |kernel: &str, init: &str| Request::SetBootParameters {
            parameters: BootParameters {
                kernel: kernel.to_owned(),
                init: init.to_owned(),
            },
        };
        let settled = |answer: &Answer| match answer {
            Answer::Parameters { parameters, .. } => parameters.clone(),
            other => panic!("{other:?}"),
        };
        let settle = |cmdline: &str| {
            std::fs::write(f.dir.path().join("cmdline"), cmdline).expect("cmdline");
            settled(&session(&f.config, &[(Request::SettleBootParameters, &[])])[0])
        };
        let answers = session(
            &f.config,
            &[
                (set("console=tty0,ttyS1 nosmt", "splash"), &[]),
                (set("keel.roothash=00", ""), &[]),
                (set("nosmt", "a\"b"), &[]),
                (Request::Invalidate { slot: Slot::B }, &[]),
            ],
        );
        assert_eq!(
            settled(&answers[0]),
            Settled {
                kept: String::new(),
                trial: ParameterTrial::Pending {
                    entry: "keel-a-trial+1.conf".to_owned(),
                    parameters: "console=tty0,ttyS1 nosmt -- splash".to_owned(),
                },
                entries: vec!["keel-a-trial+1.conf".to_owned()],
            }
        );
        assert!(error(&answers[1]).contains("Keel's own"), "{answers:?}");
        assert!(
            error(&answers[2]).contains("not a parameter"),
            "{answers:?}"
        );
        // Preparing the other slot goes on (the trial's fallback is slot a's own kept
        // entry); its activation waits for the trial.
        assert!(matches!(answers[3], Answer::Written { .. }), "{answers:?}");
        std::fs::create_dir_all(esp.slot_dir(Slot::B)).expect("mkdir");
        for file in ["vmlinuz", "initrd.img"] {
            std::fs::write(esp.slot_dir(Slot::B).join(file), b"x").expect("boot file");
        }
        let activate = Request::Activate {
            slot: Slot::B,
            os_version: "1.1.0".to_owned(),
            root_hash: "b".repeat(64),
            tries: 3,
        };
        let answers = session(&f.config, &[(activate.clone(), &[])]);
        assert!(
            error(&answers[0]).contains("await their trial (keel-a-trial+1.conf)"),
            "{answers:?}"
        );
        assert_eq!(
            std::fs::read_to_string(entries.join("keel-a.conf")).expect("read"),
            kept_text,
            "the kept entry is untouched"
        );
        let trial = std::fs::read_to_string(entries.join("keel-a-trial+1.conf")).expect("read");
        assert_eq!(
            command_line(&trial),
            "initrd=\\keel\\a\\initrd.img keel.slot=a keel.roothash=00 console=ttyS0 keel.parameters-trial=2 \
             console=tty0,ttyS1 nosmt -- splash"
        );
        assert!(trial.contains("\nversion 2\n"), "sorted first: {trial}");
        // What systemd-boot does to the trial when it boots it.
        let tried = || {
            std::fs::rename(
                entries.join("keel-a-trial+1.conf"),
                entries.join("keel-a-trial+0-1.conf"),
            )
            .expect("tried")
        };
        // Not booted yet: it stays.
        let pending = settle("keel.slot=a console=ttyS0");
        assert!(
            matches!(pending.trial, ParameterTrial::Pending { .. }),
            "{pending:?}"
        );

        // The boot loader tried it (`+0-1`) and this boot runs it: it stays.
        tried();
        // Another trial's mark is not this one's.
        let other = settle("keel.slot=a console=ttyS0 keel.parameters-trial=7 nosmt");
        assert!(
            matches!(other.trial, ParameterTrial::Failed { .. }),
            "{other:?}"
        );
        std::fs::write(entries.join("keel-a-trial+0-1.conf"), &trial).expect("put back");
        let running = settle("keel.slot=a console=ttyS0 keel.parameters-trial=2 nosmt");
        assert!(
            matches!(running.trial, ParameterTrial::Running { ref entry, .. } if entry == "keel-a-trial+0-1.conf"),
            "{running:?}"
        );
        // Blessed: kept in the slot's entry at the next settling, the trial removed.
        // While this boot runs the trial, the same parameters are in place, and others
        // wait for its verdict.
        let trial_boot = "keel.slot=a console=ttyS0 keel.parameters-trial=2 nosmt";
        std::fs::write(f.dir.path().join("cmdline"), trial_boot).expect("cmdline");
        let answers = session(
            &f.config,
            &[
                (set("console=tty0,ttyS1 nosmt", "splash"), &[]),
                (set("quiet", ""), &[]),
            ],
        );
        assert!(
            matches!(settled(&answers[0]).trial, ParameterTrial::Running { .. }),
            "{answers:?}"
        );
        assert!(
            matches!(&settled(&answers[1]).trial, ParameterTrial::Deferred { reason } if reason.contains("this boot tries other new boot parameters (keel-a-trial+0-1.conf)")),
            "{answers:?}"
        );
        std::fs::rename(
            entries.join("keel-a-trial+0-1.conf"),
            entries.join("keel-a-trial.conf"),
        )
        .expect("blessed");
        let kept = settle(trial_boot);
        assert_eq!(
            kept.trial,
            ParameterTrial::Kept {
                parameters: "console=tty0,ttyS1 nosmt -- splash".to_owned()
            }
        );
        assert_eq!(kept.kept, "console=tty0,ttyS1 nosmt -- splash");
        let listing = |dir: &std::path::Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(listing(&entries), ["keel-a.conf"]);
        assert_eq!(
            command_line(&std::fs::read_to_string(entries.join("keel-a.conf")).expect("read")),
            "initrd=\\keel\\a\\initrd.img keel.slot=a keel.roothash=00 console=ttyS0 console=tty0,ttyS1 nosmt -- splash"
        );

        // A trial whose boot failed: the boot loader came back to the kept entry, whose
        // command line has no mark. Reported once and removed; the kept entry unchanged.
        let answers = session(&f.config, &[(set("rdinit=/nonexistent", ""), &[])]);
        assert!(
            matches!(settled(&answers[0]).trial, ParameterTrial::Pending { .. }),
            "{answers:?}"
        );
        tried();
        let failed = settle("keel.slot=a console=ttyS0 console=tty0,ttyS1 nosmt -- splash");
        assert_eq!(
            failed,
            Settled {
                kept: "console=tty0,ttyS1 nosmt -- splash".to_owned(),
                trial: ParameterTrial::Failed {
                    entry: "keel-a-trial+0-1.conf".to_owned(),
                    parameters: "rdinit=/nonexistent".to_owned(),
                },
                entries: vec!["keel-a-trial+0-1.conf".to_owned()],
            }
        );
        assert_eq!(listing(&entries), ["keel-a.conf"]);
        assert_eq!(settle("keel.slot=a").trial, ParameterTrial::None);

        // A change taken back before its boot removes the trial.
        session(&f.config, &[(set("quiet", ""), &[])]);
        assert_eq!(listing(&entries), ["keel-a-trial+1.conf", "keel-a.conf"]);
        let back = settled(
            &session(
                &f.config,
                &[(set("console=tty0,ttyS1 nosmt", "splash"), &[])],
            )[0],
        );
        assert_eq!(back.trial, ParameterTrial::None);
        assert_eq!(back.entries, ["keel-a-trial+1.conf"]);
        assert_eq!(listing(&entries), ["keel-a.conf"]);

        // With no trial, the activation carries the kept parameters; new ones wait for
        // the update's boot.
        let answers = session(&f.config, &[(activate, &[])]);
        assert!(matches!(answers[0], Answer::Written { .. }), "{answers:?}");
        let update = std::fs::read_to_string(entries.join("keel-b+3.conf")).expect("read");
        assert!(
            command_line(&update).ends_with("console=ttyS0 console=tty0,ttyS1 nosmt -- splash"),
            "{update}"
        );
        let answers = session(&f.config, &[(set("quiet", ""), &[])]);
        assert!(
            matches!(&settled(&answers[0]).trial, ParameterTrial::Deferred { reason } if reason.contains("an update is activated for the next boot (keel-b+3.conf)")),
            "{answers:?}"
        );
    }

    /// While the running slot's own entry still counts tries (an update's first boot),
    /// new parameters are deferred, not refused (an apply at boot that fails fails the
    /// boot): their trial would be sorted before it. A counting copy of the blessed entry
    /// is no such entry, and is removed.
    #[test]
    fn no_parameter_trial_while_the_running_slot_is_on_trial() {
        use super::super::loader::ParameterTrial;
        let f = fixture();
        let entries = f.config.esp.entries_dir();
        std::fs::rename(entries.join("keel-a.conf"), entries.join("keel-a+2-1.conf"))
            .expect("counting");
        let quiet = Request::SetBootParameters {
            parameters: BootParameters {
                kernel: "quiet".to_owned(),
                init: String::new(),
            },
        };
        let answers = session(&f.config, &[(quiet.clone(), &[])]);
        match &answers[0] {
            Answer::Parameters { parameters, .. } => assert!(
                matches!(&parameters.trial, ParameterTrial::Deferred { reason } if reason.contains("not marked good yet (keel-a+2-1.conf)")),
                "{parameters:?}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read_dir(&entries).expect("ls").count(),
            1,
            "nothing written"
        );
        // Blessed, with a counting copy of it left by a race with systemd-bless-boot.
        std::fs::copy(entries.join("keel-a+2-1.conf"), entries.join("keel-a.conf")).expect("bless");
        let answers = session(&f.config, &[(quiet.clone(), &[])]);
        match &answers[0] {
            Answer::Parameters { parameters, .. } => {
                assert!(
                    matches!(parameters.trial, ParameterTrial::Pending { .. }),
                    "{parameters:?}"
                );
                assert!(parameters.entries.contains(&"keel-a+2-1.conf".to_owned()));
            }
            other => panic!("{other:?}"),
        }
        assert!(!entries.join("keel-a+2-1.conf").exists());
    }

    /// A trial blessed and folded in this boot, then new parameters in the same boot: the
    /// new trial takes a version above this boot's mark (the entries' versions did not
    /// move), so it is not taken for the trial this boot runs. A trial booted without
    /// being counted (the boot loader could not rename it) is kept at once: nothing
    /// would ever bless or end it.
    #[test]
    fn a_new_trial_never_takes_the_version_this_boot_runs() {
        use super::super::loader::{command_line, ParameterTrial};
        let f = fixture();
        let entries = f.config.esp.entries_dir();
        let set = |kernel: &str| Request::SetBootParameters {
            parameters: BootParameters {
                kernel: kernel.to_owned(),
                init: String::new(),
            },
        };
        let trial = |answer: &Answer| match answer {
            Answer::Parameters { parameters, .. } => parameters.trial.clone(),
            other => panic!("{other:?}"),
        };
        let version = |file: &str| -> u64 {
            let text = std::fs::read_to_string(entries.join(file)).expect("read");
            text.lines()
                .find_map(|l| l.strip_prefix("version "))
                .expect("a version")
                .parse()
                .expect("a number")
        };
        let cmdline = f.dir.path().join("cmdline");
        assert!(matches!(
            trial(&session(&f.config, &[(set("quiet"), &[])])[0]),
            ParameterTrial::Pending { .. }
        ));
        let first = version("keel-a-trial+1.conf");
        // Booted (counted), and blessed; new parameters in the same boot.
        std::fs::rename(
            entries.join("keel-a-trial+1.conf"),
            entries.join("keel-a-trial.conf"),
        )
        .expect("blessed");
        std::fs::write(
            &cmdline,
            format!("keel.slot=a console=ttyS0 keel.parameters-trial={first} quiet"),
        )
        .expect("w");
        let answers = session(&f.config, &[(set("quiet nosmt"), &[])]);
        assert!(
            matches!(trial(&answers[0]), ParameterTrial::Pending { .. }),
            "{answers:?}"
        );
        let second = version("keel-a-trial+1.conf");
        assert!(second > first, "{first} then {second}");
        let answers = session(&f.config, &[(Request::SettleBootParameters, &[])]);
        assert!(
            matches!(trial(&answers[0]), ParameterTrial::Pending { .. }),
            "not the trial this boot runs: {answers:?}"
        );
        let answers = session(&f.config, &[(set("quiet noht"), &[])]);
        assert!(
            matches!(trial(&answers[0]), ParameterTrial::Pending { .. }),
            "a newer change replaces the pending trial: {answers:?}"
        );

        // Booted with its try still there: not counted. Kept at the boot's settling.
        let third = version("keel-a-trial+1.conf");
        std::fs::write(
            &cmdline,
            format!("keel.slot=a console=ttyS0 keel.parameters-trial={third} quiet noht"),
        )
        .expect("w");
        let answers = session(&f.config, &[(Request::SettleBootParameters, &[])]);
        assert!(
            matches!(trial(&answers[0]), ParameterTrial::Kept { .. }),
            "{answers:?}"
        );
        assert!(!entries.join("keel-a-trial+1.conf").exists());
        let kept = std::fs::read_to_string(entries.join("keel-a.conf")).expect("read");
        assert!(
            command_line(&kept).ends_with("console=ttyS0 quiet noht"),
            "{kept}"
        );
    }

    /// A blessed trial whose slot entry a power cut emptied (vfat, in the instant after
    /// a rename): the empty entry is not rewritten in place; the slot's entry is written
    /// again from the trial (without its mark, with the kept title), and only then is
    /// the trial removed.
    #[test]
    fn a_slot_entry_emptied_by_a_power_cut_is_written_again_from_its_blessed_trial() {
        use super::super::loader::{command_line, ParameterTrial};
        let f = fixture();
        let entries = f.config.esp.entries_dir();
        let kept_before = std::fs::read_to_string(entries.join("keel-a.conf")).expect("read");
        let set = |kernel: &str| Request::SetBootParameters {
            parameters: BootParameters {
                kernel: kernel.to_owned(),
                init: String::new(),
            },
        };
        assert!(matches!(
            session(&f.config, &[(set("quiet"), &[])])[0],
            Answer::Parameters { .. }
        ));
        std::fs::rename(
            entries.join("keel-a-trial+1.conf"),
            entries.join("keel-a-trial.conf"),
        )
        .expect("blessed");
        std::fs::write(entries.join("keel-a.conf"), "").expect("emptied");
        let answers = session(&f.config, &[(Request::SettleBootParameters, &[])]);
        match &answers[0] {
            Answer::Parameters { parameters, .. } => {
                assert!(
                    matches!(parameters.trial, ParameterTrial::Kept { .. }),
                    "{parameters:?}"
                );
                assert_eq!(parameters.kept, "quiet");
            }
            other => panic!("{other:?}"),
        }
        assert!(!entries.join("keel-a-trial.conf").exists());
        let kept = std::fs::read_to_string(entries.join("keel-a.conf")).expect("read");
        assert_eq!(
            command_line(&kept),
            format!("{} quiet", command_line(&kept_before)),
            "{kept}"
        );
        assert!(kept.contains("title Keel 1.0.0\n"), "{kept}");
        assert!(!kept.contains("keel.parameters-trial"), "{kept}");
        // Parameters go on as before.
        let answers = session(&f.config, &[(set("nosmt"), &[])]);
        assert!(
            matches!(&answers[0], Answer::Parameters { parameters, .. } if matches!(parameters.trial, ParameterTrial::Pending { .. })),
            "{answers:?}"
        );
    }

    /// A blessed trial that a power cut emptied after systemd-bless-boot's rename: its
    /// parameters cannot be read, so it is removed and nothing is written; the kept
    /// entry keeps the parameters it had (they must not read as "none").
    #[test]
    fn a_blessed_trial_emptied_by_a_power_cut_changes_no_entry() {
        use super::super::loader::ParameterTrial;
        let f = fixture();
        let entries = f.config.esp.entries_dir();
        let set = |kernel: &str| Request::SetBootParameters {
            parameters: BootParameters {
                kernel: kernel.to_owned(),
                init: String::new(),
            },
        };
        // Kept first: "quiet" in keel-a.conf.
        assert!(matches!(
            session(&f.config, &[(set("quiet"), &[])])[0],
            Answer::Parameters { .. }
        ));
        std::fs::rename(
            entries.join("keel-a-trial+1.conf"),
            entries.join("keel-a-trial.conf"),
        )
        .expect("blessed");
        session(&f.config, &[(Request::SettleBootParameters, &[])]);
        let kept = std::fs::read_to_string(entries.join("keel-a.conf")).expect("read");
        assert!(kept.contains("options quiet\n"), "{kept}");
        // Then "nosmt" on trial, blessed, and emptied.
        assert!(matches!(
            session(&f.config, &[(set("nosmt"), &[])])[0],
            Answer::Parameters { .. }
        ));
        std::fs::rename(
            entries.join("keel-a-trial+1.conf"),
            entries.join("keel-a-trial.conf"),
        )
        .expect("blessed");
        std::fs::write(entries.join("keel-a-trial.conf"), "").expect("emptied");
        let answers = session(&f.config, &[(Request::SettleBootParameters, &[])]);
        match &answers[0] {
            Answer::Parameters { parameters, .. } => {
                assert_eq!(parameters.trial, ParameterTrial::None, "{parameters:?}");
                assert_eq!(parameters.kept, "quiet");
            }
            other => panic!("{other:?}"),
        }
        assert!(!entries.join("keel-a-trial.conf").exists());
        assert_eq!(
            std::fs::read_to_string(entries.join("keel-a.conf")).expect("read"),
            kept,
            "the kept entry is unchanged"
        );
    }

    /// A trial the boot loader has tried (`+0-1`): while this boot runs it, activation
    /// waits for its verdict, saying so; when this boot came back without it (it failed,
    /// and keeld could not settle it), activation removes it and goes on, and the slot's
    /// new entry carries the kept parameters.
    #[test]
    fn activation_waits_for_a_trial_this_boot_runs_and_clears_one_that_failed() {
        use super::super::loader::command_line;
        let f = fixture();
        let entries = f.config.esp.entries_dir();
        let quiet = Request::SetBootParameters {
            parameters: BootParameters {
                kernel: "quiet".to_owned(),
                init: String::new(),
            },
        };
        assert!(matches!(
            session(&f.config, &[(quiet, &[])])[0],
            Answer::Parameters { .. }
        ));
        std::fs::rename(
            entries.join("keel-a-trial+1.conf"),
            entries.join("keel-a-trial+0-1.conf"),
        )
        .expect("tried");
        let trial = std::fs::read_to_string(entries.join("keel-a-trial+0-1.conf")).expect("read");
        let mark = command_line(&trial)
            .split_ascii_whitespace()
            .find(|w| w.starts_with("keel.parameters-trial="))
            .expect("the trial's mark")
            .to_owned();
        std::fs::create_dir_all(f.config.esp.slot_dir(Slot::B)).expect("mkdir");
        for file in ["vmlinuz", "initrd.img"] {
            std::fs::write(f.config.esp.slot_dir(Slot::B).join(file), b"x").expect("boot file");
        }
        let activate = Request::Activate {
            slot: Slot::B,
            os_version: "1.1.0".to_owned(),
            root_hash: "b".repeat(64),
            tries: 3,
        };
        let cmdline = f.dir.path().join("cmdline");
        std::fs::write(&cmdline, format!("keel.slot=a console=ttyS0 {mark} quiet")).expect("w");
        let answers = session(&f.config, &[(activate.clone(), &[])]);
        assert!(
            error(&answers[0]).contains(
                "this boot tries new boot parameters from settings.boot (keel-a-trial+0-1.conf)"
            ),
            "{answers:?}"
        );
        assert!(!entries.join("keel-b+3.conf").exists());

        std::fs::write(&cmdline, "keel.slot=a console=ttyS0").expect("w");
        let answers = session(&f.config, &[(activate, &[])]);
        assert!(matches!(answers[0], Answer::Written { .. }), "{answers:?}");
        assert!(!entries.join("keel-a-trial+0-1.conf").exists());
        let b = std::fs::read_to_string(entries.join("keel-b+3.conf")).expect("activated");
        assert!(
            !command_line(&b)
                .split_ascii_whitespace()
                .any(|w| w == "quiet"),
            "the failed parameters are not carried: {b}"
        );
    }

    #[test]
    fn a_root_image_of_many_chunks_is_written_and_verified_whole() {
        // 20 chunks: more than the buffers in flight (so they are reused) and more than
        // one writeback window; every block different, so a buffer reused too early or a
        // chunk out of order changes the root hash.
        let blocks = 20 * CHUNK / 4096;
        let mut x: u64 = 1;
        let data: Vec<u8> = (0..blocks * 4096 / 8)
            .flat_map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                x.to_le_bytes()
            })
            .collect();
        let (hash, root) = format_for_tests(&data, &[7u8; 32]);
        let f = fixture();
        let parts = &f.config.slots.partitions;
        std::fs::write(parts.join("keel-root-b"), vec![0u8; data.len()]).expect("w");
        std::fs::write(parts.join("keel-verity-b"), vec![0u8; hash.len()]).expect("w");
        let answers = session(
            &f.config,
            &[
                (write(Slot::B, Part::Hash, &hash, None), &hash),
                (write(Slot::B, Part::Root, &data, Some(&root)), &data),
            ],
        );
        match &answers[1] {
            Answer::Written { written, .. } => {
                assert_eq!(written.root_hash.as_deref(), Some(root.as_str()));
            }
            other => panic!("{other:?}"),
        }
        assert!(std::fs::read(parts.join("keel-root-b")).expect("read") == data);
    }

    #[test]
    fn the_running_slot_is_refused_for_every_write() {
        let f = fixture();
        let (data, hash, root) = root_image();
        for (request, payload) in [
            (write(Slot::A, Part::Hash, &hash, None), &hash[..]),
            (write(Slot::A, Part::Root, &data, Some(&root)), &data[..]),
        ] {
            let answers = session(&f.config, &[(request, payload)]);
            assert_eq!(
                error(&answers[0]),
                "slot a is the running slot: the running slot is never written"
            );
        }
        for request in [
            Request::Invalidate { slot: Slot::A },
            Request::Deactivate { slot: Slot::A },
            Request::Activate {
                slot: Slot::A,
                os_version: "1.1.0".into(),
                root_hash: root.clone(),
                tries: 3,
            },
        ] {
            let answers = session(&f.config, &[(request, &[])]);
            assert!(error(&answers[0]).contains("running slot"), "{answers:?}");
        }
        let parts = &f.config.slots.partitions;
        assert!(std::fs::read(parts.join("keel-root-a"))
            .expect("read")
            .iter()
            .all(|b| *b == 0xee));
        assert!(f.config.esp.entries_dir().join("keel-a.conf").exists());
    }

    #[test]
    fn bytes_that_do_not_match_the_target_or_the_root_hash_are_refused() {
        let f = fixture();
        let (data, hash, root) = root_image();
        // The announced sha256 is another one.
        let mut request = write(Slot::B, Part::Hash, &hash, None);
        if let Request::WritePartition { sha256, .. } = &mut request {
            *sha256 = sha(b"something else");
        }
        let answers = session(&f.config, &[(request, &hash)]);
        assert!(
            error(&answers[0]).starts_with(&format!(
                "the {} bytes written to keel-verity-b have sha256 {}, but the target's is",
                hash.len(),
                sha(&hash)
            )),
            "{answers:?}"
        );
        // A root image whose tree gives another root hash than the manifest's.
        let wrong_root = "11".repeat(32);
        let answers = session(
            &f.config,
            &[
                (write(Slot::B, Part::Hash, &hash, None), &hash),
                (write(Slot::B, Part::Root, &data, Some(&wrong_root)), &data),
            ],
        );
        assert_eq!(
            error(&answers[1]),
            format!(
                "the dm-verity root hash of the image written to keel-root-b is {root}, but \
                 the manifest's is {wrong_root}: refused"
            )
        );
        // A root image another than the one the hash tree was made from.
        let mut other = data.clone();
        other[5000] ^= 1;
        let (_, other_root) = format_for_tests(&other, &[7u8; 32]);
        let answers = session(
            &f.config,
            &[(
                write(Slot::B, Part::Root, &other, Some(&other_root)),
                &other,
            )],
        );
        assert!(
            error(&answers[0])
                .starts_with("the hash tree on keel-verity-b does not match the root image"),
            "{answers:?}"
        );
    }

    #[test]
    fn an_image_larger_than_its_partition_is_refused_before_a_byte_is_written() {
        let f = fixture();
        let big = vec![1u8; 65536 + 4096];
        let answers = session(&f.config, &[(write(Slot::B, Part::Hash, &big, None), &big)]);
        assert_eq!(
            error(&answers[0]),
            "the hash image (69632 bytes) does not fit partition keel-verity-b (16384 bytes)"
        );
        let parts = &f.config.slots.partitions;
        assert!(std::fs::read(parts.join("keel-verity-b"))
            .expect("read")
            .iter()
            .all(|b| *b == 0xee));
    }

    #[test]
    fn a_payload_cut_short_is_refused_and_ends_the_session() {
        let f = fixture();
        let kernel = vec![3u8; 10_000];
        let request = Request::WriteBootFile {
            slot: Slot::B,
            file: BootFile::Kernel,
            size: kernel.len() as u64,
            sha256: sha(&kernel),
        };
        let answers = session(&f.config, &[(request, &kernel[..4000])]);
        assert_eq!(answers.len(), 1);
        assert!(
            error(&answers[0]).starts_with("the data stopped after 0 of 10000 bytes"),
            "{answers:?}"
        );
        // Nothing was renamed into place.
        assert!(!f.config.esp.slot_dir(Slot::B).join("vmlinuz").exists());
    }

    /// The temporary file cannot be made: the real error is the answer, and the unread
    /// payload ends the session (it must not be read as the next request).
    #[test]
    fn a_boot_file_that_cannot_be_created_answers_why_and_ends_the_session() {
        let f = fixture();
        let target = f.config.esp.slot_dir(Slot::B).join("vmlinuz");
        std::fs::create_dir_all(crate::updates::durable::temp_path(&target)).expect("mkdir");
        let kernel = b"{\"inspect\":null}\n".to_vec();
        let request = Request::WriteBootFile {
            slot: Slot::B,
            file: BootFile::Kernel,
            size: kernel.len() as u64,
            sha256: sha(&kernel),
        };
        let answers = session(&f.config, &[(request, &kernel), (Request::Inspect, &[])]);
        assert_eq!(answers.len(), 1, "the session ended: {answers:?}");
        let text = error(&answers[0]);
        assert!(
            text.starts_with("ESP ") && text.contains("vmlinuz") && text.contains("directory"),
            "{text}"
        );
        assert!(!target.exists());
    }

    /// A boot file larger than what the ESP has free is refused before a byte is
    /// written (a full ESP would fail every loader entry write), and the session ends.
    #[test]
    fn a_boot_file_larger_than_the_free_esp_is_refused_unwritten() {
        let f = fixture();
        let request = Request::WriteBootFile {
            slot: Slot::B,
            file: BootFile::Initrd,
            size: 1 << 60,
            sha256: sha(b""),
        };
        let answers = session(&f.config, &[(request, b"x"), (Request::Inspect, &[])]);
        assert_eq!(answers.len(), 1, "the session ended: {answers:?}");
        let text = error(&answers[0]);
        assert!(text.contains("free") && text.contains("initrd"), "{text}");
        let dir = f.config.esp.slot_dir(Slot::B);
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 0);
    }

    #[test]
    fn a_running_slot_on_trial_keeps_its_fallback() {
        let f = fixture();
        std::fs::rename(
            f.config.esp.entries_dir().join("keel-a.conf"),
            f.config.esp.entries_dir().join("keel-a+2-1.conf"),
        )
        .expect("rename");
        std::fs::write(
            f.config.esp.entries_dir().join("keel-b.conf"),
            "version 1\n",
        )
        .expect("w");
        // Slot b's boot files are there: an activation would otherwise replace its
        // blessed entry with a counting one.
        let slot_dir = f.config.esp.slot_dir(Slot::B);
        std::fs::create_dir_all(&slot_dir).expect("mkdir");
        for file in [
            crate::updates::loader::KERNEL,
            crate::updates::loader::INITRD,
        ] {
            std::fs::write(slot_dir.join(file), b"boot file").expect("w");
        }
        // Neither invalidated, nor written over, nor deactivated, nor activated anew:
        // whatever keeld asks.
        let (_, hash, _) = root_image();
        let activate = Request::Activate {
            slot: Slot::B,
            os_version: "1.1.0".to_owned(),
            root_hash: "00".repeat(32),
            tries: 1,
        };
        for (request, payload) in [
            (Request::Invalidate { slot: Slot::B }, &[][..]),
            (write(Slot::B, Part::Hash, &hash, None), &hash[..]),
            (Request::Deactivate { slot: Slot::B }, &[][..]),
            (activate, &[][..]),
        ] {
            let answers = session(&f.config, &[(request, payload)]);
            assert!(
                error(&answers[0]).contains("is not marked good yet"),
                "{answers:?}"
            );
        }
        assert!(f.config.esp.entries_dir().join("keel-b.conf").exists());
    }

    /// A slot a loader entry still names is not written: a boot could pick it half
    /// written. (keeld invalidates first; the writer checks again.)
    #[test]
    fn a_slot_still_named_by_an_entry_is_not_written() {
        let f = fixture();
        std::fs::write(
            f.config.esp.entries_dir().join("keel-b+3.conf"),
            "version 1\n",
        )
        .expect("w");
        let (_, hash, _) = root_image();
        let kernel = b"kernel-bytes".to_vec();
        for (request, payload) in [
            (write(Slot::B, Part::Hash, &hash, None), &hash[..]),
            (
                Request::WriteBootFile {
                    slot: Slot::B,
                    file: BootFile::Kernel,
                    size: kernel.len() as u64,
                    sha256: sha(&kernel),
                },
                &kernel[..],
            ),
        ] {
            let answers = session(&f.config, &[(request, payload)]);
            let text = error(&answers[0]);
            assert!(
                text.contains("still named by loader entry keel-b+3.conf"),
                "{text}"
            );
        }
        assert!(!f.config.esp.slot_dir(Slot::B).join("vmlinuz").exists());
    }
}
