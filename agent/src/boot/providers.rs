//! User-data providers, run in order on first boot; each one's `[settings]` table is
//! patched into the `launch` transaction, so a later source overrides an earlier one.
//!
//! - `defaults`: a local user-data defaults file (`/local/user-data-defaults.toml`);
//! - `imds`: EC2 instance metadata, IMDSv2 ([`super::imds`]);
//! - `qemu`: a file passed to a qemu guest with `-fw_cfg name=opt/keel/user-data,file=…`,
//!   read from the kernel's fw_cfg sysfs interface (for a local host with no metadata
//!   service; `packaging/image/run.sh` uses it);
//! - `file`: the local user-data file (`/local/user-data.toml`);
//! - `overrides`: a local overrides file (`/local/user-data-overrides.toml`).
//!
//! A source with nothing to give (a missing file, IMDS answering 404) is skipped. A
//! source whose text is not valid TOML or whose settings are invalid fails the boot;
//! the message names the source, then the line or the key.
//!
//! With `imds` among them, settings the user-data leaves unset are then derived from
//! the instance metadata ([`super::derived`]).

use std::path::PathBuf;

use super::imds::{self, ImdsConfig};

/// The most user-data keeld reads from one source.
const MAX_USER_DATA: u64 = 16 << 20;

/// One source of user-data.
#[derive(Debug, Clone)]
pub enum Provider {
    Defaults(PathBuf),
    Imds(ImdsConfig),
    /// The fw_cfg file's `raw` contents in sysfs.
    Qemu(PathBuf),
    File(PathBuf),
    Overrides(PathBuf),
}

/// What `--user-data-providers` accepts.
pub const PROVIDER_NAMES: [&str; 5] = ["defaults", "imds", "qemu", "file", "overrides"];

/// Where the kernel's qemu_fw_cfg driver shows the `opt/keel/user-data` fw_cfg file.
pub const QEMU_FW_CFG_USER_DATA: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/keel/user-data/raw";

impl Provider {
    /// The name in the boot record and in error messages.
    pub fn source_name(&self) -> String {
        match self {
            Provider::Defaults(p) => format!("defaults file {}", p.display()),
            Provider::Imds(c) => format!("EC2 IMDS {}", c.endpoint),
            Provider::Qemu(p) => format!("qemu fw_cfg opt/keel/user-data ({})", p.display()),
            Provider::File(p) => format!("user-data file {}", p.display()),
            Provider::Overrides(p) => format!("overrides file {}", p.display()),
        }
    }

    /// The metadata service of the `imds` provider.
    pub fn imds_config(&self) -> Option<&ImdsConfig> {
        match self {
            Provider::Imds(config) => Some(config),
            _ => None,
        }
    }

    /// The boot step's name.
    pub fn step_name(&self) -> &'static str {
        match self {
            Provider::Defaults(_) => "user-data:defaults",
            Provider::Imds(_) => "user-data:imds",
            Provider::Qemu(_) => "user-data:qemu",
            Provider::File(_) => "user-data:file",
            Provider::Overrides(_) => "user-data:overrides",
        }
    }

    /// The source's user-data text, or `None` when it has none.
    pub async fn fetch(&self) -> Result<Option<String>, String> {
        let bytes = match self {
            Provider::Defaults(p)
            | Provider::Qemu(p)
            | Provider::File(p)
            // gzip'd or not, as from the metadata service (and as Bottlerocket reads
            // the same files).
            | Provider::Overrides(p) => read_local(p.clone())
                .await?
                .map(imds::decode_user_data)
                .transpose()
                .map_err(|e| e.to_string())?,
            Provider::Imds(config) => imds::fetch_user_data(config)
                .await
                .map_err(|e| e.to_string())?,
        };
        bytes
            .map(|b| {
                String::from_utf8(b).map_err(|e| {
                    format!(
                        "user-data is not UTF-8 text (byte {})",
                        e.utf8_error().valid_up_to()
                    )
                })
            })
            .transpose()
    }
}

async fn read_local(path: PathBuf) -> Result<Option<Vec<u8>>, String> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking open, then only a regular file is read: a FIFO planted at a
        // user-data path would otherwise hold the boot forever.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read: {e}")),
        };
        match file.metadata() {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => return Err("not a regular file".to_owned()),
            Err(e) => return Err(format!("cannot read: {e}")),
        }
        let mut bytes = Vec::new();
        file.take(MAX_USER_DATA + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read: {e}"))?;
        if bytes.len() as u64 > MAX_USER_DATA {
            return Err(format!("larger than {MAX_USER_DATA} bytes"));
        }
        Ok(Some(bytes))
    })
    .await
    .map_err(|e| format!("reading failed: {e}"))?
}

/// Parses `--user-data-providers` (e.g. `defaults,imds,file,overrides`).
pub fn parse_order(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !PROVIDER_NAMES.contains(&name) {
            return Err(format!(
                "unknown user-data provider {name:?}; expected some of {}",
                PROVIDER_NAMES.join(", ")
            ));
        }
        if out.iter().any(|n| n == name) {
            return Err(format!("user-data provider {name:?} is listed twice"));
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

/// Fills `defaults` into `target` where `existing` has no value: the OS defaults never
/// overwrite a setting that is already set.
pub fn missing_only(
    defaults: &serde_json::Value,
    existing: &serde_json::Value,
) -> serde_json::Value {
    use serde_json::Value;
    match (defaults, existing) {
        (Value::Object(d), Value::Object(e)) => {
            let mut out = serde_json::Map::new();
            for (key, value) in d {
                match e.get(key) {
                    None | Some(Value::Null) => {
                        out.insert(key.clone(), value.clone());
                    }
                    Some(current) => {
                        let rest = missing_only(value, current);
                        if rest.as_object().is_some_and(|o| !o.is_empty()) {
                            out.insert(key.clone(), rest);
                        }
                    }
                }
            }
            Value::Object(out)
        }
        // Set already (a leaf, or a different shape): nothing to add.
        _ => Value::Object(serde_json::Map::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A local user-data file may be gzip'd, as EC2 user-data may (Bottlerocket reads
    /// the same files that way).
    #[tokio::test]
    async fn a_gzip_local_file_is_decompressed() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("user-data-overrides.toml");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(b"[settings]\nmotd = \"zipped\"\n")
            .expect("gzip");
        std::fs::write(&path, encoder.finish().expect("gzip")).expect("write");
        let text = Provider::Overrides(path).fetch().await.expect("fetch");
        assert_eq!(text.as_deref(), Some("[settings]\nmotd = \"zipped\"\n"));
    }

    #[test]
    fn defaults_never_overwrite() {
        let defaults = json!({"motd": "d", "ntp": {"time-servers": ["a"]}, "host-containers": {"admin": {"enabled": false, "source": "x"}}});
        let existing = json!({"motd": "mine", "host-containers": {"admin": {"enabled": true}}});
        assert_eq!(
            missing_only(&defaults, &existing),
            json!({"ntp": {"time-servers": ["a"]}, "host-containers": {"admin": {"source": "x"}}})
        );
    }

    #[test]
    fn provider_order() {
        assert_eq!(parse_order("imds, file").expect("ok"), ["imds", "file"]);
        assert!(parse_order("imds,imds").is_err());
        assert!(parse_order("cloud-init")
            .expect_err("unknown")
            .contains("cloud-init"));
        assert!(parse_order("").expect("empty").is_empty());
    }

    #[tokio::test]
    async fn local_files() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("user-data.toml");
        let p = Provider::File(path.clone());
        assert_eq!(p.fetch().await, Ok(None));
        std::fs::write(&path, "[settings]\nmotd = \"x\"\n").expect("write");
        assert_eq!(
            p.fetch().await,
            Ok(Some("[settings]\nmotd = \"x\"\n".to_owned()))
        );
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        assert!(p.fetch().await.expect_err("binary").contains("UTF-8"));
    }
}
