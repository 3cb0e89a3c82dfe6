//! Atomic A/B image updates from a TUF repository, driven through Bottlerocket's update
//! API (`/updates/status`, `/actions/{refresh,prepare,activate,deactivate}-update`).
//!
//! The pipeline, each concern in its file, none importing a later one:
//! - `settings.rs`: what a command takes from `settings.updates` and `settings.network`;
//! - `transport.rs` → `repository.rs`: HTTP fetches with keeld's time limits and proxy,
//!   under `tough`'s verification (signatures, expiry, rollback, target length and hash);
//! - `manifest.rs`: Keel's update target format and the choice of an update (variant,
//!   arch, `max_version`, waves, `version-lock`, never older unless named);
//! - `verity.rs`, `slots.rs`, `loader.rs`, `durable.rs`: the disk: the dm-verity tree, the
//!   two slots' partitions, systemd-boot's entries with boot counting, crash-safe writes;
//! - `protocol.rs` → `writer.rs` (runs in `keel-slot-writer`, the only process that writes
//!   the inactive slot and the ESP) and `writer_client.rs` (keeld's end);
//! - `prepare.rs`: the download streamed into the inactive slot, with progress;
//! - `status.rs` → `machine.rs`: Bottlerocket's status shapes, the durable record, the
//!   state machine, the lock (423), and what happened across restarts and reboots.
//!
//! keeld itself never opens a block device or the ESP: it streams verified bytes to the
//! slot writer, which checks them again where they land (see `writer.rs`).

pub mod durable;
pub mod loader;
pub mod machine;
pub mod manifest;
pub mod prepare;
pub mod protocol;
pub mod repository;
pub mod settings;
pub mod slots;
pub mod status;
pub mod transport;
pub mod verity;
pub mod writer;
pub mod writer_client;

pub use machine::{CommandRefused, Updates, UpdatesConfig};
