//! What `GET /os` reports about this build of Keel.

use serde::Serialize;

/// Bottlerocket's `/os` shape (snake_case fields).
#[derive(Debug, Clone, Serialize)]
pub struct OsInfo {
    pub arch: String,
    pub build_id: String,
    pub pretty_name: String,
    pub variant_id: String,
    pub version_id: String,
}

impl OsInfo {
    pub fn current(variant_id: &str) -> Self {
        let version = env!("CARGO_PKG_VERSION");
        OsInfo {
            arch: std::env::consts::ARCH.to_owned(),
            build_id: option_env!("KEEL_BUILD_ID").unwrap_or("dev").to_owned(),
            pretty_name: format!("Keel {version}"),
            variant_id: variant_id.to_owned(),
            version_id: version.to_owned(),
        }
    }
}
