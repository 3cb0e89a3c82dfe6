//! A TUF repository built by the test: an Ed25519 key generated per repository (one key
//! for the four roles), `root.json` signed with it, and each publication signed with
//! `tough`'s editor, with consistent snapshots as Bottlerocket's repositories have them.
//! Also the update artifacts Keel's manifest names (root image, dm-verity hash tree made
//! by `veritysetup format`, kernel, initrd) and the manifest itself.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::Command;

use tough::editor::signed::{PathExists, SignedRole};
use tough::editor::RepositoryEditor;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root};
use tough::sign::Sign;

/// A repository on disk: `metadata/` and `targets/`, served as they are.
pub struct TufRepo {
    pub dir: PathBuf,
    key: PathBuf,
    /// The root.json keeld trusts (`--update-root`).
    pub root_json: PathBuf,
    /// The newest root, which publications are signed under (`root_json` until a
    /// rotation), and the keys beyond `key` its roles name.
    current_root: PathBuf,
    rotated_keys: Vec<PathBuf>,
    version: u64,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn keys(path: &Path) -> Vec<Box<dyn KeySource>> {
    vec![Box::new(LocalKeySource {
        path: path.to_owned(),
    })]
}

/// A time `days` from now (negative: in the past).
pub fn days_from_now(days: i64) -> jiff::Timestamp {
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24 * days))
        .unwrap()
}

/// The repository key (`key.pk8`, Ed25519, one for the four roles) and the `root.json`
/// it signs, in `keys_dir`, made there when absent. Answers the `root.json` to trust.
pub fn ensure_keys(keys_dir: &Path) -> PathBuf {
    let (key, root_json) = (keys_dir.join("key.pk8"), keys_dir.join("root.json"));
    if key.is_file() && root_json.is_file() {
        return root_json;
    }
    std::fs::create_dir_all(keys_dir).unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    std::fs::write(&key, pkcs8.as_ref()).unwrap();
    let pair = tough::sign::parse_keypair(pkcs8.as_ref()).unwrap();
    let tuf_key = pair.tuf_key();
    let key_id = tuf_key.key_id().unwrap();
    let role_keys = || RoleKeys {
        keyids: vec![key_id.clone()],
        threshold: NonZeroU64::new(1).unwrap(),
        _extra: HashMap::new(),
    };
    let root = Root {
        spec_version: "1.0.0".to_owned(),
        consistent_snapshot: true,
        version: NonZeroU64::new(1).unwrap(),
        expires: days_from_now(365),
        keys: HashMap::from([(key_id.clone(), tuf_key)]),
        roles: HashMap::from([
            (RoleType::Root, role_keys()),
            (RoleType::Snapshot, role_keys()),
            (RoleType::Targets, role_keys()),
            (RoleType::Timestamp, role_keys()),
        ]),
        _extra: HashMap::new(),
    };
    let signed = runtime().block_on(async {
        SignedRole::new(root.clone(), &KeyHolder::Root(root), &keys(&key), &rng)
            .await
            .unwrap()
    });
    // Written last: a key without its root is made again.
    std::fs::write(&root_json, signed.buffer()).unwrap();
    root_json
}

impl TufRepo {
    /// A new, empty repository under `dir` with a fresh key.
    pub fn create(dir: &Path) -> TufRepo {
        TufRepo::create_with_keys(dir, dir)
    }

    /// A new, empty repository under `dir` signed with the key in `keys_dir` (see
    /// [`ensure_keys`]): images built with that `root.json` trust every repository made
    /// this way, so the VM tests' cached images stay valid across runs.
    pub fn create_with_keys(dir: &Path, keys_dir: &Path) -> TufRepo {
        std::fs::create_dir_all(dir.join("metadata")).unwrap();
        std::fs::create_dir_all(dir.join("targets")).unwrap();
        std::fs::create_dir_all(dir.join("staging")).unwrap();
        let root_json = ensure_keys(keys_dir);
        // Consistent snapshots: the root of version 1 is served as 1.root.json.
        std::fs::copy(&root_json, dir.join("metadata/1.root.json")).unwrap();
        TufRepo {
            dir: dir.to_owned(),
            key: keys_dir.join("key.pk8"),
            current_root: root_json.clone(),
            root_json,
            rotated_keys: Vec::new(),
            version: 0,
        }
    }

    /// Publishes root version N+1 (`N+1.root.json`) whose timestamp role has a new key of
    /// its own, signed by the root key (which both roots name); later publications are
    /// signed under it.
    pub fn rotate_timestamp_key(&mut self) {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let n = self.rotated_keys.len() + 1;
        let key_path = self.dir.join(format!("timestamp-key-{n}.pk8"));
        std::fs::write(&key_path, pkcs8.as_ref()).unwrap();
        let tuf_key = tough::sign::parse_keypair(pkcs8.as_ref())
            .unwrap()
            .tuf_key();
        let key_id = tuf_key.key_id().unwrap();
        let current: tough::schema::Signed<Root> =
            serde_json::from_slice(&std::fs::read(&self.current_root).unwrap()).unwrap();
        let mut root = current.signed;
        root.version = NonZeroU64::new(root.version.get() + 1).unwrap();
        root.expires = days_from_now(365);
        root.keys.insert(key_id.clone(), tuf_key);
        root.roles.insert(
            RoleType::Timestamp,
            RoleKeys {
                keyids: vec![key_id],
                threshold: NonZeroU64::new(1).unwrap(),
                _extra: HashMap::new(),
            },
        );
        let signing_key = self.key.clone();
        let signed = runtime().block_on(async {
            SignedRole::new(
                root.clone(),
                &KeyHolder::Root(root.clone()),
                &keys(&signing_key),
                &rng,
            )
            .await
            .unwrap()
        });
        let path = self
            .metadata_dir()
            .join(format!("{}.root.json", root.version.get()));
        std::fs::write(&path, signed.buffer()).unwrap();
        self.current_root = path;
        self.rotated_keys.push(key_path);
    }

    /// The metadata version of the last publication.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    pub fn targets_dir(&self) -> PathBuf {
        self.dir.join("targets")
    }

    /// Signs and publishes a new version listing exactly `files` (name → content path),
    /// each metadata expiring at `expires`.
    pub fn publish(&mut self, files: &[(&str, &Path)], expires: jiff::Timestamp) {
        self.version += 1;
        let version = NonZeroU64::new(self.version).unwrap();
        let staging = self.dir.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).unwrap();
        for (name, path) in files {
            // Hard links keep big images from being copied.
            let target = staging.join(name);
            if std::fs::hard_link(path, &target).is_err() {
                std::fs::copy(path, &target).unwrap();
            }
        }
        let mut signing: Vec<Box<dyn KeySource>> = keys(&self.key);
        for rotated in &self.rotated_keys {
            signing.extend(keys(rotated));
        }
        let root = self.current_root.clone();
        let metadata = self.metadata_dir();
        let targets = self.targets_dir();
        runtime().block_on(async move {
            let mut editor = RepositoryEditor::new(&root).await.unwrap();
            editor
                .snapshot_version(version)
                .snapshot_expires(expires)
                .timestamp_version(version)
                .timestamp_expires(expires)
                .targets_version(version)
                .unwrap()
                .targets_expires(expires)
                .unwrap();
            let mut paths = Vec::new();
            for entry in std::fs::read_dir(&staging).unwrap() {
                paths.push(entry.unwrap().path());
            }
            editor.add_target_paths(paths).await.unwrap();
            let signed = editor.sign(&signing).await.unwrap();
            // Targets first, then the metadata that names them: a client that refreshes
            // in between sees the previous publication whole, never a target missing.
            signed
                .copy_targets(&staging, &targets, PathExists::Replace)
                .await
                .unwrap();
            signed.write(&metadata).await.unwrap();
        });
    }

    /// The served file of target `name` (consistent snapshots prefix its sha256).
    pub fn target_file(&self, name: &str) -> PathBuf {
        std::fs::read_dir(self.targets_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .ends_with(&format!(".{name}"))
            })
            .unwrap_or_else(|| panic!("no served target {name}"))
    }
}

/// The files of one update, as the image build produces them.
pub struct UpdateArtifacts {
    pub version: String,
    pub root: PathBuf,
    pub hash: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root_hash: String,
}

impl UpdateArtifacts {
    /// Target names, Keel's convention: `<variant>-<arch>-<version>-<part>`.
    pub fn names(&self, variant: &str) -> [(String, &Path); 4] {
        let arch = std::env::consts::ARCH;
        let base = format!("{variant}-{arch}-{}", self.version);
        [
            (format!("{base}-root.erofs"), self.root.as_path()),
            (format!("{base}-root.verity"), self.hash.as_path()),
            (format!("{base}-vmlinuz"), self.kernel.as_path()),
            (format!("{base}-initrd.img"), self.initrd.as_path()),
        ]
    }

    /// The manifest entry of this update.
    pub fn manifest_entry(&self, variant: &str, waves: serde_json::Value) -> serde_json::Value {
        let names = self.names(variant);
        serde_json::json!({
            "variant": variant,
            "arch": std::env::consts::ARCH,
            "version": self.version,
            "max_version": self.version,
            "waves": waves,
            "images": {
                "root": names[0].0,
                "hash": names[1].0,
                "kernel": names[2].0,
                "initrd": names[3].0,
            },
            "root_hash": self.root_hash,
        })
    }
}

/// Builds the artifacts of `version` in `dir`: an erofs root (`mkfs.erofs`) of a tree
/// holding the version and `filler_bytes` of incompressible data, its dm-verity tree
/// (`veritysetup format`), a kernel and an initrd.
pub fn build_update(dir: &Path, version: &str, filler_bytes: usize) -> UpdateArtifacts {
    let out = dir.join(format!("update-{version}"));
    let tree = out.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(
        tree.join("etc/keel-release"),
        format!("VERSION_ID={version}\n"),
    )
    .unwrap();
    let mut filler = vec![0u8; filler_bytes];
    rand::Rng::fill(&mut rand::thread_rng(), &mut filler[..]);
    std::fs::write(tree.join("filler"), &filler).unwrap();
    let root = out.join("root.erofs");
    let status = Command::new(tool("mkfs.erofs"))
        .arg("--quiet")
        .arg(&root)
        .arg(&tree)
        .status()
        .unwrap();
    assert!(status.success(), "mkfs.erofs failed");
    let hash = out.join("root.verity");
    let output = Command::new(tool("veritysetup"))
        .arg("format")
        .arg(&root)
        .arg(&hash)
        .output()
        .unwrap();
    assert!(output.status.success(), "veritysetup format: {output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let root_hash = text
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .expect("veritysetup prints the root hash")
        .trim()
        .to_owned();
    let kernel = out.join("vmlinuz");
    std::fs::write(&kernel, format!("kernel of {version}\n").repeat(1000)).unwrap();
    let initrd = out.join("initrd.img");
    std::fs::write(&initrd, format!("initrd of {version}\n").repeat(3000)).unwrap();
    UpdateArtifacts {
        version: version.to_owned(),
        root,
        hash,
        kernel,
        initrd,
        root_hash,
    }
}

/// `name` from the usual places; a missing tool fails the test (packaging/dev/deps.sh
/// installs them).
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} is missing: run packaging/dev/deps.sh (cryptsetup-bin, erofs-utils)");
}
