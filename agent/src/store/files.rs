//! The store's on-disk form: two JSON files in the state directory.
//!
//! - `generations.json` holds the kept generations, oldest first. It is replaced whole:
//!   write a temp file, fsync it, rename it over the old one, fsync the directory. rename(2)
//!   is atomic, so after a crash at any instant the file is either the old or the new
//!   version, and the directory fsync makes the rename itself durable before we answer.
//! - `pending.json` holds the named pending transactions. It is replaced by temp + rename
//!   too, so a keeld crash (SIGKILL, panic) never tears it, but it is not fsync'd: a
//!   pending transaction is uncommitted work, and paying a second fsync on every PATCH
//!   would halve commit throughput. After a power loss it may be an older version, or
//!   unreadable on file systems without rename ordering; then it is set aside as
//!   `pending.json.corrupt` and the store opens with no pending transactions.
//!
//! `state.lock` (flock) keeps a second keeld away from the same directory.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Caller, Generation, PendingTx, Snapshot, StoreError};

const FORMAT: u32 = 1;
const GENERATIONS: &str = "generations.json";
const PENDING: &str = "pending.json";
const LOCK: &str = "state.lock";

#[derive(Serialize, Deserialize)]
struct GenerationsFile {
    format: u32,
    generations: Vec<Generation>,
}

#[derive(Serialize, Deserialize)]
struct PendingFile {
    format: u32,
    transactions: BTreeMap<String, PendingTx>,
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct StoreFiles {
    dir: PathBuf,
    dir_handle: File,
    /// Held for the life of the process; the flock goes with it.
    _lock: File,
}

impl StoreFiles {
    pub fn new(dir: &Path) -> Result<StoreFiles, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK))
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(StoreError::Io {
                path: dir.join(LOCK),
                source: std::io::Error::other(
                    "another keeld holds this state directory (flock busy)",
                ),
            });
        }
        let dir_handle = File::open(dir).map_err(io)?;
        Ok(StoreFiles {
            dir: dir.to_owned(),
            dir_handle,
            _lock: lock,
        })
    }

    /// Reads the state; a missing `generations.json` means a fresh store holding
    /// generation 0, the empty model.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        self.remove_temp_files();
        let gen_path = self.dir.join(GENERATIONS);
        let history = match fs::read(&gen_path) {
            Ok(bytes) => {
                let file: GenerationsFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: gen_path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.format != FORMAT {
                    return Err(StoreError::Corrupt {
                        path: gen_path,
                        reason: format!("unknown format {}", file.format),
                    });
                }
                if file.generations.is_empty() {
                    return Err(StoreError::Corrupt {
                        path: gen_path,
                        reason: "no generations".to_owned(),
                    });
                }
                file.generations
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![Generation {
                generation: 0,
                time: super::now_rfc3339(),
                tx: "initial".to_owned(),
                tx_id: None,
                caller: Caller::keeld(),
                changed_keys: Vec::new(),
                rollback_of: None,
                settings: Arc::new(Value::Object(Default::default())),
            }],
            Err(source) => {
                return Err(StoreError::Io {
                    path: gen_path,
                    source,
                })
            }
        };

        let mut pending = self.load_pending();
        // A transaction committed just before a crash may still be in pending.json
        // (it is rewritten after generations.json); its id in history says so.
        let committed: HashSet<u64> = history.iter().filter_map(|g| g.tx_id).collect();
        pending.retain(|name, tx| {
            let keep = !committed.contains(&tx.id);
            if !keep {
                tracing::info!(tx = %name, "dropping pending transaction already committed");
            }
            keep
        });
        Ok(Snapshot { history, pending })
    }

    fn load_pending(&self) -> BTreeMap<String, PendingTx> {
        let path = self.dir.join(PENDING);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read pending transactions; starting without them");
                return BTreeMap::new();
            }
        };
        match serde_json::from_slice::<PendingFile>(&bytes) {
            Ok(file) if file.format == FORMAT => file.transactions,
            _ => {
                let aside = self.dir.join(format!("{PENDING}.corrupt"));
                tracing::warn!(path = %path.display(), moved_to = %aside.display(),
                    "pending transactions unreadable (power loss?); set aside, starting without them");
                let _ = fs::rename(&path, &aside);
                BTreeMap::new()
            }
        }
    }

    fn remove_temp_files(&self) {
        for name in [GENERATIONS, PENDING] {
            let _ = fs::remove_file(self.dir.join(format!("{name}.tmp")));
        }
    }

    /// Durably replaces `generations.json` (see the module comment for why this is safe).
    pub fn write_generations(&self, generations: &[Generation]) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&GenerationsFile {
            format: FORMAT,
            generations: generations.to_vec(),
        })
        .map_err(|e| StoreError::Io {
            path: self.dir.join(GENERATIONS),
            source: std::io::Error::other(e),
        })?;
        self.replace(GENERATIONS, &bytes, true)
    }

    /// Atomically (not durably) replaces `pending.json`.
    pub fn write_pending(&self, pending: &BTreeMap<String, PendingTx>) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&PendingFile {
            format: FORMAT,
            transactions: pending.clone(),
        })
        .map_err(|e| StoreError::Io {
            path: self.dir.join(PENDING),
            source: std::io::Error::other(e),
        })?;
        self.replace(PENDING, &bytes, false)
    }

    fn replace(&self, name: &str, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
        let target = self.dir.join(name);
        let temp = self.dir.join(format!("{name}.tmp"));
        let io = |source| StoreError::Io {
            path: target.clone(),
            source,
        };
        let result = (|| {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(bytes)?;
            if durable {
                file.sync_all()?;
            }
            drop(file);
            fs::rename(&temp, &target)?;
            if durable {
                self.dir_handle.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            // Leave the old file in place; a half-written temp file must not linger.
            let _ = fs::remove_file(&temp);
        }
        result.map_err(io)
    }
}
