//! Small OCI images built in-process from Debian's busybox-static, with no external tool.
//!
//! An image has exactly one layer. The layer tar is deterministic (mtime 0, uid/gid 0,
//! entries sorted so that every directory comes before its contents), so the same builder
//! always yields the same digests.
//!
//! ```no_run
//! use keel_e2e::image::ImageBuilder;
//! let dir = tempfile::tempdir().expect("tempdir");
//! let info = ImageBuilder::busybox()
//!     .file("/etc/motd", b"hi\n".to_vec(), 0o644)
//!     .cmd(&["/bin/sh", "-c", "cat /etc/motd"])
//!     .write_oci_archive(&dir.path().join("image.tar"), "v1");
//! println!("{}", info.manifest_digest);
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation an OCI layout's index.json uses to name a manifest (the "tag").
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BUSYBOX: &str = "/bin/busybox";

/// Digests (`sha256:<hex>`) of what [`ImageBuilder::write_oci_layout`] or
/// [`ImageBuilder::write_oci_archive`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub manifest_digest: String,
    pub config_digest: String,
    /// Digests of the layer blobs as stored (compressed when `.gzip(true)`).
    pub layer_digests: Vec<String>,
}

#[derive(Clone, Debug)]
enum Entry {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// Builds a one-layer OCI image. Paths in the image are absolute (`/bin/sh`); missing
/// parent directories are added with mode 0755.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    /// Keyed by the path without its leading `/`. Byte-wise order puts every directory
    /// before its contents, since a path sorts before every path it is a prefix of.
    entries: BTreeMap<String, Entry>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    gzip: bool,
    /// Written into the config in place of the layer's real diff ID.
    claimed_diff_id: Option<String>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::empty()
    }
}

impl ImageBuilder {
    /// An image with no files at all.
    pub fn empty() -> ImageBuilder {
        ImageBuilder {
            entries: BTreeMap::new(),
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            gzip: true,
            claimed_diff_id: None,
        }
    }

    /// `/bin/busybox` from the host (Debian's busybox-static) with a symlink in `/bin` for
    /// every applet it has, a root-only `/etc/passwd` and `/etc/group`, and `/tmp`.
    pub fn busybox() -> ImageBuilder {
        let data = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
            panic!(
                "cannot read {BUSYBOX} ({e}): install it with `apt-get install -y busybox-static`"
            )
        });
        let out = Command::new(BUSYBOX)
            .arg("--list")
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{BUSYBOX} --list`: {e}"));
        assert!(
            out.status.success(),
            "`{BUSYBOX} --list` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let applets = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            applets.lines().any(|l| l.trim() == "sh"),
            "{BUSYBOX} has no `sh` applet (is it busybox-static?): {applets}"
        );
        let mut builder = ImageBuilder::empty()
            .dir("/bin", 0o755)
            .file("/bin/busybox", data, 0o755)
            .dir("/tmp", 0o1777)
            .dir("/root", 0o700)
            .file(
                "/etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
                0o644,
            )
            .file("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
        for applet in applets.lines().map(str::trim) {
            if applet.is_empty() || applet == "busybox" || applet.contains('/') {
                continue;
            }
            builder = builder.symlink(&format!("/bin/{applet}"), "busybox");
        }
        builder
    }

    /// Adds (or replaces) a regular file.
    pub fn file(mut self, path_in_image: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> Self {
        let key = self.add_parents(path_in_image);
        self.entries.insert(
            key,
            Entry::File {
                data: bytes.into(),
                mode,
            },
        );
        self
    }

    /// Adds (or replaces) a directory.
    pub fn dir(mut self, path_in_image: &str, mode: u32) -> Self {
        let key = self.add_parents(path_in_image);
        self.entries.insert(key, Entry::Dir { mode });
        self
    }

    /// Adds (or replaces) a symbolic link to `target` (taken verbatim).
    pub fn symlink(mut self, path_in_image: &str, target: &str) -> Self {
        let key = self.add_parents(path_in_image);
        self.entries.insert(
            key,
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
        self
    }

    /// Copies a host binary to `path_in_image`, plus every shared library `ldd` lists for it
    /// and the dynamic loader, each at the same path as on the host (as a regular file with
    /// the host file's contents, symlinks followed), so that it runs inside the image.
    /// A static binary is copied alone.
    pub fn host_binary_with_libs(mut self, host_path: &Path, path_in_image: &str) -> Self {
        let data = std::fs::read(host_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", host_path.display()));
        self = self.file(path_in_image, data, host_mode(host_path));
        for lib in shared_libraries(host_path) {
            let data = std::fs::read(&lib)
                .unwrap_or_else(|e| panic!("cannot read library {lib} (from ldd): {e}"));
            let mode = host_mode(Path::new(&lib));
            self = self.file(&lib, data, mode);
        }
        self
    }

    pub fn entrypoint(mut self, argv: &[&str]) -> Self {
        self.entrypoint = Some(argv.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    pub fn cmd(mut self, argv: &[&str]) -> Self {
        self.cmd = Some(argv.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// `KEY=value` entries for the image config. A default `PATH` is added unless one of
    /// them sets `PATH`.
    pub fn env(mut self, vars: &[&str]) -> Self {
        self.env = vars.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Whether the layer blob is gzip-compressed (default) or a plain tar.
    pub fn gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// An image whose config claims `diff_id` for its layer instead of the real one: it
    /// is fetched whole (every blob matches its digest) and fails only at its unpack.
    pub fn claim_diff_id(mut self, diff_id: &str) -> Self {
        self.claimed_diff_id = Some(diff_id.to_owned());
        self
    }

    /// Writes an OCI image layout into `dir` (created if missing): `oci-layout`,
    /// `index.json` (one manifest, annotated `org.opencontainers.image.ref.name` = `tag`)
    /// and `blobs/sha256/<hex>` for the layer, config and manifest. An existing layout in
    /// `dir` is replaced.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) -> ImageInfo {
        let (files, info) = self.layout_files(tag);
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .unwrap_or_else(|e| panic!("cannot create {}/blobs/sha256: {e}", dir.display()));
        for (path, data) in files {
            let path = dir.join(path);
            std::fs::write(&path, data)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        info
    }

    /// Writes the same layout as [`Self::write_oci_layout`] as one tar file: what
    /// `oci-archive:<path>` means to skopeo and buildah, and what `ctr images import` takes.
    pub fn write_oci_archive(&self, path: &Path, tag: &str) -> ImageInfo {
        let (files, info) = self.layout_files(tag);
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        append_dir(&mut tar, "blobs/", 0o755);
        append_dir(&mut tar, "blobs/sha256/", 0o755);
        for (name, data) in &files {
            append_file(&mut tar, name, data, 0o644);
        }
        let bytes = tar.into_inner().expect("finish the archive tar");
        std::fs::write(path, bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        info
    }

    /// The uncompressed layer tar.
    pub fn layer_tar(&self) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir { mode } => append_dir(&mut tar, &format!("{path}/"), *mode),
                Entry::File { data, mode } => append_file(&mut tar, path, data, *mode),
                Entry::Symlink { target } => {
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    header.set_mode(0o777);
                    set_owner_and_time(&mut header);
                    tar.append_link(&mut header, path, target)
                        .unwrap_or_else(|e| panic!("cannot add symlink {path} to the layer: {e}"));
                }
            }
        }
        tar.into_inner().expect("finish the layer tar")
    }

    /// The files of the layout (relative paths) and the digests.
    fn layout_files(&self, tag: &str) -> (Vec<(String, Vec<u8>)>, ImageInfo) {
        assert!(!tag.is_empty(), "an image tag must not be empty");
        let layer_tar = self.layer_tar();
        let diff_id = self
            .claimed_diff_id
            .clone()
            .unwrap_or_else(|| sha256_digest(&layer_tar));
        let (layer_blob, layer_media_type) = if self.gzip {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder
                .write_all(&layer_tar)
                .expect("gzip the layer in memory");
            (
                encoder.finish().expect("finish gzip of the layer"),
                MEDIA_TYPE_LAYER_GZIP,
            )
        } else {
            (layer_tar, MEDIA_TYPE_LAYER)
        };
        let layer_digest = sha256_digest(&layer_blob);

        let mut env = self.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_owned());
        }
        let mut config = serde_json::Map::new();
        config.insert("Env".to_owned(), json!(env));
        if let Some(entrypoint) = &self.entrypoint {
            config.insert("Entrypoint".to_owned(), json!(entrypoint));
        }
        if let Some(cmd) = &self.cmd {
            config.insert("Cmd".to_owned(), json!(cmd));
        }
        config.insert("WorkingDir".to_owned(), json!("/"));
        let image_config = json!({
            "architecture": host_architecture(),
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "keel-e2e ImageBuilder"}],
        });
        let config_blob = serde_json::to_vec(&image_config).expect("serialize image config");
        let config_digest = sha256_digest(&config_blob);

        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG,
                "digest": config_digest,
                "size": config_blob.len(),
            },
            "layers": [{
                "mediaType": layer_media_type,
                "digest": layer_digest,
                "size": layer_blob.len(),
            }],
        });
        let manifest_blob = serde_json::to_vec(&manifest).expect("serialize manifest");
        let manifest_digest = sha256_digest(&manifest_blob);

        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [{
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_blob.len(),
                "annotations": {ANNOTATION_REF_NAME: tag},
                "platform": {"architecture": host_architecture(), "os": "linux"},
            }],
        });
        let index_blob = serde_json::to_vec(&index).expect("serialize index");

        let info = ImageInfo {
            manifest_digest: manifest_digest.clone(),
            config_digest: config_digest.clone(),
            layer_digests: vec![layer_digest.clone()],
        };
        let mut files = vec![
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_owned(), index_blob),
        ];
        for (digest, blob) in [
            (layer_digest, layer_blob),
            (config_digest, config_blob),
            (manifest_digest, manifest_blob),
        ] {
            files.push((blob_path(&digest), blob));
        }
        (files, info)
    }

    /// Registers the missing parent directories of `path_in_image`; returns its key.
    fn add_parents(&mut self, path_in_image: &str) -> String {
        let key = path_in_image.trim_matches('/').to_owned();
        assert!(
            !key.is_empty()
                && !key
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".."),
            "bad path in image: {path_in_image:?}"
        );
        let mut parent = String::new();
        let components: Vec<&str> = key.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => panic!("{path_in_image}: /{parent} is already a file or symlink"),
            }
        }
        key
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The OCI architecture name of this host (`amd64` or `arm64`).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture name known for {other}"),
    }
}

/// Copies the OCI archive `src` to `dst` with one byte of every layer blob changed, so the
/// blob's contents no longer match the digest it is stored (and referenced) under. The tar
/// structure, every name and every size stay as they were.
pub fn corrupt_archive(src: &Path, dst: &Path) {
    let bytes = std::fs::read(src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    let mut entries: Vec<(tar::Header, String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(bytes.as_slice());
    for entry in archive
        .entries()
        .unwrap_or_else(|e| panic!("{} is not a tar: {e}", src.display()))
    {
        let mut entry = entry.unwrap_or_else(|e| panic!("bad entry in {}: {e}", src.display()));
        let name = entry
            .path()
            .expect("entry path")
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let header = entry.header().clone();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .unwrap_or_else(|e| panic!("cannot read {name} in {}: {e}", src.display()));
        entries.push((header, name, data));
    }
    let file = |wanted: &str| -> &[u8] {
        entries
            .iter()
            .find(|(_, name, _)| name == wanted)
            .map(|(_, _, data)| data.as_slice())
            .unwrap_or_else(|| panic!("{} has no {wanted}", src.display()))
    };
    let index: serde_json::Value =
        serde_json::from_slice(file("index.json")).expect("index.json is JSON");
    let mut layer_blobs = Vec::new();
    for descriptor in index["manifests"].as_array().expect("index.json manifests") {
        let digest = descriptor["digest"].as_str().expect("manifest digest");
        let manifest: serde_json::Value =
            serde_json::from_slice(file(&blob_path(digest))).expect("manifest is JSON");
        for layer in manifest["layers"].as_array().expect("manifest layers") {
            layer_blobs.push(blob_path(layer["digest"].as_str().expect("layer digest")));
        }
    }
    assert!(!layer_blobs.is_empty(), "{} has no layers", src.display());
    let mut out = tar::Builder::new(Vec::new());
    for (mut header, name, mut data) in entries {
        if layer_blobs.contains(&name) {
            assert!(!data.is_empty(), "layer blob {name} is empty");
            let middle = data.len() / 2;
            data[middle] ^= 0xff;
        }
        out.append_data(&mut header, &name, data.as_slice())
            .unwrap_or_else(|e| panic!("cannot copy {name}: {e}"));
    }
    let bytes = out.into_inner().expect("finish the corrupted archive");
    std::fs::write(dst, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", dst.display()));
}

fn blob_path(digest: &str) -> String {
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    format!("blobs/sha256/{hex}")
}

fn host_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Absolute paths of the shared libraries and loader `ldd` lists for `binary` (none for a
/// static binary).
fn shared_libraries(binary: &Path) -> Vec<String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd (apt-get install libc-bin): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // `ldd` exits 1 with "not a dynamic executable" for static binaries.
        assert!(
            stdout.contains("not a dynamic executable")
                || stderr.contains("not a dynamic executable"),
            "ldd {} failed: {stdout}{stderr}",
            binary.display()
        );
        return Vec::new();
    }
    let mut libs = Vec::new();
    for line in stdout.lines().map(str::trim) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
        // "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)",
        // "statically linked".
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split_whitespace().next().unwrap_or_default();
        if path == "not" {
            panic!("ldd {}: a library is missing: {line}", binary.display());
        }
        if path.starts_with('/') && !libs.iter().any(|l| l == path) {
            libs.push(path.to_owned());
        }
    }
    libs
}

fn set_owner_and_time(header: &mut tar::Header) {
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    // Empty user and group names: numeric ownership only.
    let _ = header.set_username("");
    let _ = header.set_groupname("");
}

fn append_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    header.set_mode(mode);
    set_owner_and_time(&mut header);
    tar.append_data(&mut header, path, std::io::empty())
        .unwrap_or_else(|e| panic!("cannot add directory {path}: {e}"));
}

fn append_file(tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    set_owner_and_time(&mut header);
    tar.append_data(&mut header, path, data)
        .unwrap_or_else(|e| panic!("cannot add file {path}: {e}"));
}
