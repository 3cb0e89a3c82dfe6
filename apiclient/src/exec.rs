//! The client end of `/exec`: the WebSocket upgrade over keeld's Unix socket, and the
//! message types (`settings_model::exec`). Used by `apiclient exec` (`cli/exec.rs`,
//! which adds the terminal, signals and stdio) and by the end-to-end tests, which
//! speak the protocol frame by frame.

use std::path::Path;

use tokio::net::UnixStream;
pub use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

pub use settings_model::exec::*;

use crate::error::ClientError;

/// A WebSocket to keeld's `/exec`.
pub type ExecSocket = WebSocketStream<UnixStream>;

/// Connects to `socket` and upgrades `GET /exec` to a WebSocket. A refusal before the
/// upgrade (403, 503, or a keeld without exec) reads like every other refusal:
/// `Status <code> when GETing /exec: <body>`.
pub async fn connect(socket: &Path) -> Result<ExecSocket, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    // The host is a formality on a Unix socket; keeld's other requests say localhost too.
    let request =
        "ws://localhost/exec"
            .into_client_request()
            .map_err(|e| ClientError::InvalidUri {
                uri: "/exec".to_owned(),
                reason: e.to_string(),
            })?;
    // Output frames are at most 32 KiB (plus a stream byte); a larger one is not keeld's.
    let config = WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(ClientError::Status {
            code: response.status().as_u16(),
            method: "GET".to_owned(),
            uri: "/exec".to_owned(),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        }),
        Err(tungstenite::Error::Io(e)) => Err(ClientError::Io(e)),
        Err(e) => Err(ClientError::Io(std::io::Error::other(format!(
            "the WebSocket upgrade of /exec failed: {e}"
        )))),
    }
}
