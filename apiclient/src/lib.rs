//! Keel's API client: the library behind the `apiclient` command, also used by the
//! end-to-end tests.
//!
//! Owns: talking HTTP/1.1 to keeld over its Unix socket ([`Client`]), the error texts users
//! see ([`ClientError`]), query-string encoding ([`uri`]), transaction names, the
//! patch → commit → discard-on-failure sequence, dry runs and the apply-status headers
//! ([`transaction`]), reading user-data sources ([`source`]), the WebSocket of `/exec`
//! ([`exec`]) and the command-line interface ([`cli`]). Must not interpret settings itself beyond what `settings-model`
//! offers: the server is the judge of what is valid.

/// `eprintln!` that never panics: a message that cannot reach stderr (closed, a full
/// disk) is dropped, and the exit status still tells what happened. (`eprintln!` panics
/// on a failed write, which would turn exit status 1 into 101.)
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
