//! Two pulls that share a layer, against a real containerd: the second finds the blob and
//! the unpacked snapshot that the first made under its own lease, and skips them. When
//! the first then fails and releases its lease, containerd's garbage collector must not
//! take them while the second still counts on them: the second pull's lease holds them
//! too (`Containerd::hold`). Before, it did not, and the second pull's image could end
//! up naming a layer that was gone.
//!
//! Needs root and containerd 1.6 (CI installs it); a missing tool fails the test.

use keel_agent::containers::client::Containerd as Client;
use keel_agent::containers::content::{self, Lease};
use keel_agent::containers::oci::{parse_digest, Descriptor, MediaType};
use keel_agent::containers::snapshot::{apply_layer, snapshot_exists};
use keel_e2e::containerd::Containerd;
use keel_e2e::image::{sha256_digest, ImageBuilder};

fn require_root() {
    let euid = rustix::process::geteuid().as_raw();
    assert_eq!(euid, 0, "these tests run containerd and need root");
}

/// Runs containerd's garbage collection now: the removal of a lease with `--sync`
/// collects everything nothing references any more before it answers.
fn collect_garbage(containerd: &Containerd) {
    containerd.ctr_ok(&["leases", "create", "--id", "keel-test-gc"]);
    containerd.ctr_ok(&["leases", "rm", "--sync", "keel-test-gc"]);
}

fn has_content(containerd: &Containerd, digest: &str) -> bool {
    containerd
        .ctr_ok(&["content", "ls", "-q"])
        .lines()
        .any(|l| l.trim() == digest)
}

fn has_snapshot(containerd: &Containerd, key: &str) -> bool {
    containerd
        .ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(key))
}

#[test]
fn what_a_pull_finds_made_by_another_pull_is_held_by_its_own_lease() {
    require_root();
    let containerd = Containerd::start();
    assert_eq!(
        containerd.snapshotter(),
        "overlayfs",
        "keeld unpacks into overlayfs; this machine's containerd could not load it"
    );
    let layer = ImageBuilder::empty()
        .file("/shared", "a layer two images share", 0o644)
        .gzip(false)
        .layer_tar();
    let digest = sha256_digest(&layer);
    // One uncompressed layer at the bottom: its diff ID and its chain ID are its digest.
    let chain_id = digest.clone();
    let desc = Descriptor::new(
        MediaType::ImageLayer,
        layer.len() as u64,
        parse_digest(&digest).expect("a sha256 digest"),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The connection's channel is made on this runtime.
    let _entered = runtime.enter();
    let client = Client::connect(containerd.socket(), containerd.namespace()).expect("connect");

    let (first, second) = runtime.block_on(async {
        // The first pull writes the layer and unpacks it, under its lease.
        let first = Lease::create(&client).await.expect("lease");
        let pulling = client.with_lease(&first.id).expect("leased");
        content::write_small(&pulling, &desc, Default::default(), layer.clone())
            .await
            .expect("write the layer");
        apply_layer(&pulling, &desc, &digest, &chain_id, "")
            .await
            .expect("unpack the layer");
        // The second pull finds both, and skips them.
        let second = Lease::create(&client).await.expect("lease");
        let pulling = client.with_lease(&second.id).expect("leased");
        assert!(content::has_blob(&pulling, &digest).await.expect("stat"));
        assert!(snapshot_exists(&pulling, &chain_id).await.expect("stat"));
        (first, second)
    });

    // The first pull fails: its lease goes. What it made stays, for the second.
    runtime.block_on(first.release(&client));
    collect_garbage(&containerd);
    assert!(
        has_content(&containerd, &digest),
        "the blob the second pull found was collected"
    );
    assert!(
        has_snapshot(&containerd, &chain_id),
        "the snapshot the second pull found was collected"
    );

    // And the collector does collect: once the second lease goes too, nothing holds
    // them (so the checks above could fail).
    runtime.block_on(second.release(&client));
    collect_garbage(&containerd);
    assert!(
        !has_content(&containerd, &digest),
        "the blob outlived every lease"
    );
    assert!(
        !has_snapshot(&containerd, &chain_id),
        "the snapshot outlived every lease"
    );
}
