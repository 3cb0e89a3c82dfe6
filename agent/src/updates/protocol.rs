//! The requests keeld sends to `keel-slot-writer`, the small privileged helper that alone
//! may write the inactive slot's partitions and the ESP, and its answers.
//!
//! Owns the wire format, shared by both ends: one request per line (JSON), followed, for
//! the two writes, by exactly `size` raw bytes; one answer per line (JSON), `{"ok":true,
//! …}` or `{"ok":false,"error":"…"}`. A session is one connection (socket activation,
//! `Accept=yes`) or one spawned process (tests, `--update-writer-command`); requests run
//! in order. Must not decide anything: `writer.rs` checks, `machine.rs` decides.

use serde::{Deserialize, Serialize};

use super::loader::{BootParameters, EntryInfo, Settled};
use super::slots::{Part, Slot};

/// Longest request line either end accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// A boot file of a slot on the ESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootFile {
    Kernel,
    Initrd,
}

impl BootFile {
    pub fn file_name(self) -> &'static str {
        match self {
            BootFile::Kernel => super::loader::KERNEL,
            BootFile::Initrd => super::loader::INITRD,
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Which slot runs, this boot's id, the inactive slot's partition sizes, the entries.
    Inspect,
    /// `Inspect`, once no other session holds the slots: what a slot change that may
    /// still be running (one whose answer its caller gave up waiting for) leaves, not
    /// what was there before it. Waits like a request that touches a slot.
    InspectSettled,
    /// Removes `slot`'s loader entries, durably, before any of its bytes change.
    Invalidate { slot: Slot },
    /// `size` bytes follow: written from the start of `part` of `slot`, then `fdatasync`.
    /// The writer refuses a hash part unless what it wrote hashes to `sha256`; a root
    /// unless the dm-verity tree it recomputes (the hash part must be written first)
    /// matches the hash part and `root_hash`, which authenticates every block.
    WritePartition {
        slot: Slot,
        part: Part,
        size: u64,
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root_hash: Option<String>,
    },
    /// `size` bytes follow: `<esp>/keel/<slot>/<file>`, replaced atomically.
    WriteBootFile {
        slot: Slot,
        file: BootFile,
        size: u64,
        sha256: String,
    },
    /// Writes `slot`'s loader entry with `tries` boot attempts, sorted first.
    Activate {
        slot: Slot,
        os_version: String,
        root_hash: String,
        tries: u32,
    },
    /// Removes `slot`'s loader entries (same as `Invalidate`, named for what it means).
    Deactivate { slot: Slot },
    /// Hands `settings.boot`'s parameters to the next boot as a trial of the running
    /// slot (`EspLayout::stage_parameters`): kept once a boot with them reaches
    /// `configured`. Answers `Parameters`.
    SetBootParameters { parameters: BootParameters },
    /// At a boot's start: keeps a trial that reached `configured`, removes one that
    /// failed, and answers where the trial stands (`Parameters`).
    SettleBootParameters,
}

/// What `Inspect` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    pub active: Slot,
    pub boot_id: String,
    /// Sizes of the inactive slot's partitions, in bytes.
    pub root_size: u64,
    pub hash_size: u64,
    /// The slots' entries; parameter trials are not among them (see `Settled`).
    pub entries: Vec<EntryInfo>,
    /// What is missing of each slot's boot files (kernel, initrd) on the ESP, in the
    /// user's words; a slot not named has both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_boot_files: Vec<(Slot, String)>,
}

/// What a partition write answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub bytes: u64,
    /// The sha256 of what was written; not computed for a root image, whose dm-verity
    /// tree is checked instead (see `writer.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_hash: Option<String>,
    /// The loader entry written (`Activate`) or removed (`Invalidate`, `Deactivate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<String>,
}

/// One answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    Inspection { ok: bool, inspection: Inspection },
    Written { ok: bool, written: Written },
    Parameters { ok: bool, parameters: Settled },
    Failed { ok: bool, error: String },
}

impl Answer {
    pub fn failed(error: impl std::fmt::Display) -> Answer {
        Answer::Failed {
            ok: false,
            error: error.to_string(),
        }
    }
}
