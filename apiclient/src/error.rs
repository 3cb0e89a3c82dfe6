//! The client library's error type. Owns the texts users see when talking to the API
//! fails, in particular the Bottlerocket-compatible `Status <code> when <METHOD>ing <uri>:
//! <body>` line that scripts may match on.

use std::path::PathBuf;

/// Everything that can go wrong while talking to keeld.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket does not exist, or refuses us.
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },

    /// Reading or writing the connection failed after it was opened.
    #[error("I/O error talking to the API: {0}")]
    Io(#[from] std::io::Error),

    /// The HTTP exchange failed (malformed answer, connection closed early, …).
    #[error("HTTP error talking to the API: {0}")]
    Http(#[from] hyper::Error),

    /// The request could not even be built, e.g. a URI that is not `/path?query`.
    #[error("invalid request URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },

    /// The server answered with a non-2xx status. The text matches Bottlerocket's
    /// `apiclient`, e.g. `Status 404 when GETing /nope: {"error":"..."}`.
    #[error("Status {code} when {method}ing {uri}: {body}")]
    Status {
        code: u16,
        method: String,
        uri: String,
        body: String,
    },

    /// A 2xx answer whose body should have been JSON but was not.
    #[error("the answer to {method} {uri} is not JSON: {source}")]
    NotJson {
        method: String,
        uri: String,
        source: serde_json::Error,
    },

    /// A 2xx JSON answer of another shape than the request's (an array, `null` or an
    /// empty body where an object belongs): never read as "nothing".
    #[error("the answer to {method} {uri} is not {expected}: {found}")]
    Shape {
        method: String,
        uri: String,
        expected: &'static str,
        found: String,
    },
}

impl ClientError {
    /// keeld is not there (yet): no socket, or the connection was refused or dropped:
    /// worth waiting out. Not a socket path that cannot work (a file where a directory
    /// should be, a path too long) nor a socket this user may not open: those stay.
    pub fn is_connection(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            ClientError::Connect { source, .. } => matches!(
                source.kind(),
                ErrorKind::NotFound
                    | ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::Interrupted
                    | ErrorKind::TimedOut
                    | ErrorKind::WouldBlock
            ),
            ClientError::Io(_) | ClientError::Http(_) => true,
            _ => false,
        }
    }
}
