//! Keel's API client: the library behind the `apiclient` command, also used by the
//! end-to-end tests.
//!
//! Owns: talking HTTP/1.1 to keeld over its Unix socket ([`Client`]), the error texts users
//! see ([`ClientError`]), query-string encoding ([`uri`]), transaction names, the
//! patch → commit → discard-on-failure sequence, dry runs and the apply-status headers
//! ([`transaction`]), reading user-data sources ([`source`]), the WebSocket of `/exec`
//! ([`exec`]) and the command-line interface ([`cli`]). Must not interpret settings itself beyond what `settings-model`
//! offers: the server is the judge of what is valid.

pub mod cli;
pub mod client;
pub mod error;
pub mod exec;
pub mod merge;
pub mod source;
pub mod transaction;
pub mod uri;

pub use client::{Client, Response};
pub use error::ClientError;
pub use transaction::Transaction;

/// Where keeld listens unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/api.sock";
