//! dm-verity hash trees (the format `veritysetup format` writes, hash type 1): the
//! superblock of a hash device, and the tree recomputed from a root image as it streams
//! past, so the slot writer can check, before anything is marked bootable, that the data
//! it wrote and the hash tree it wrote agree with the root hash the signed manifest names.
//!
//! Owns: parsing the superblock, hashing data blocks (`sha256(salt || block)`), building
//! the levels above them, and the layout of the hash area on the device (the superblock
//! in the first hash block, then the levels from the top one down to level 0). Must not
//! do I/O: the writer feeds it bytes and compares what it returns.
//!
//! Memory: the digests of the data blocks are kept until the end (32 bytes per data
//! block, 1/128 of the image with 4 KiB blocks: 4 MiB for a 512 MiB root), because the
//! upper levels need all of them; the data itself is never held.

use sha2::{Digest, Sha256};

/// Bytes of the on-disk superblock (`struct verity_sb`).
pub const SUPERBLOCK_BYTES: usize = 512;
const SIGNATURE: &[u8; 8] = b"verity\0\0";
const DIGEST_BYTES: usize = 32;
/// The longest salt the format can hold.
const MAX_SALT: usize = 256;

/// Why a hash device or a root image does not fit the tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerityError {
    #[error("the hash image has no dm-verity superblock (expected the signature \"verity\")")]
    NoSuperblock,
    #[error("unsupported dm-verity superblock: {0}")]
    Unsupported(String),
    #[error(
        "the root image is {bytes} bytes, but its hash tree describes {blocks} blocks of \
         {block_size} bytes"
    )]
    SizeMismatch {
        bytes: u64,
        blocks: u64,
        block_size: u32,
    },
}

/// What the superblock of a hash device says about the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

impl Superblock {
    /// Parses the first [`SUPERBLOCK_BYTES`] of a hash device.
    pub fn parse(bytes: &[u8]) -> Result<Superblock, VerityError> {
        if bytes.len() < SUPERBLOCK_BYTES || &bytes[..8] != SIGNATURE {
            return Err(VerityError::NoSuperblock);
        }
        let version = le_u32(bytes, 8);
        let hash_type = le_u32(bytes, 12);
        if version != 1 {
            return Err(VerityError::Unsupported(format!(
                "superblock version {version}"
            )));
        }
        if hash_type != 1 {
            return Err(VerityError::Unsupported(format!(
                "hash type {hash_type} (only type 1, the default of veritysetup, is supported)"
            )));
        }
        let algorithm = &bytes[32..64];
        let end = algorithm.iter().position(|b| *b == 0).unwrap_or(32);
        let algorithm = String::from_utf8_lossy(&algorithm[..end]).into_owned();
        if algorithm != "sha256" {
            return Err(VerityError::Unsupported(format!(
                "hash algorithm {algorithm:?} (only sha256 is supported)"
            )));
        }
        let data_block_size = le_u32(bytes, 64);
        let hash_block_size = le_u32(bytes, 68);
        for (what, size) in [("data", data_block_size), ("hash", hash_block_size)] {
            if !size.is_power_of_two() || !(512..=65536).contains(&size) {
                return Err(VerityError::Unsupported(format!(
                    "{what} block size {size}"
                )));
            }
        }
        let mut blocks = [0u8; 8];
        blocks.copy_from_slice(&bytes[72..80]);
        let data_blocks = u64::from_le_bytes(blocks);
        let salt_size = usize::from(u16::from_le_bytes([bytes[80], bytes[81]]));
        if salt_size > MAX_SALT {
            return Err(VerityError::Unsupported(format!(
                "salt of {salt_size} bytes"
            )));
        }
        Ok(Superblock {
            data_block_size,
            hash_block_size,
            data_blocks,
            salt: bytes[88..88 + salt_size].to_vec(),
        })
    }

    /// Bytes of root data the tree covers.
    pub fn data_bytes(&self) -> u64 {
        self.data_blocks
            .saturating_mul(u64::from(self.data_block_size))
    }

    /// Where the hash area starts on the hash device: the superblock takes the first
    /// hash block.
    pub fn hash_area_offset(&self) -> u64 {
        u64::from(self.hash_block_size)
    }
}

/// The tree of one root image: its root hash and the hash area as the device holds it
/// (after the superblock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub root_hash: [u8; DIGEST_BYTES],
    pub hash_area: Vec<u8>,
}

impl Tree {
    /// The root hash as lowercase hex, as `veritysetup` prints it.
    pub fn root_hash_hex(&self) -> String {
        hex::encode(self.root_hash)
    }
}

/// Recomputes the tree from the root image as it streams past, in chunks of any size.
#[derive(Debug)]
pub struct TreeBuilder {
    superblock: Superblock,
    /// The salted hasher state, cloned for each block.
    salted: Sha256,
    /// The start of a data block split across chunks.
    partial: Vec<u8>,
    level0: Vec<[u8; DIGEST_BYTES]>,
    bytes: u64,
}

impl TreeBuilder {
    pub fn new(superblock: Superblock) -> TreeBuilder {
        let mut salted = Sha256::new();
        salted.update(&superblock.salt);
        let capacity = usize::try_from(superblock.data_blocks.min(1 << 24)).unwrap_or(0);
        TreeBuilder {
            partial: Vec::with_capacity(superblock.data_block_size as usize),
            level0: Vec::with_capacity(capacity),
            superblock,
            salted,
            bytes: 0,
        }
    }

    fn block_size(&self) -> usize {
        self.superblock.data_block_size as usize
    }

    fn hash(&self, block: &[u8]) -> [u8; DIGEST_BYTES] {
        let mut hasher = self.salted.clone();
        hasher.update(block);
        hasher.finalize().into()
    }

    /// Takes the next bytes of the root image.
    pub fn update(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        let size = self.block_size();
        if !self.partial.is_empty() {
            let take = (size - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == size {
                let digest = self.hash(&self.partial);
                self.level0.push(digest);
                self.partial.clear();
            }
        }
        let mut blocks = data.chunks_exact(size);
        for block in &mut blocks {
            let digest = self.hash(block);
            self.level0.push(digest);
        }
        self.partial.extend_from_slice(blocks.remainder());
    }

    /// Builds the levels above the data blocks; refuses an image whose size is not the
    /// one the superblock describes.
    pub fn finish(self) -> Result<Tree, VerityError> {
        let mismatch = || VerityError::SizeMismatch {
            bytes: self.bytes,
            blocks: self.superblock.data_blocks,
            block_size: self.superblock.data_block_size,
        };
        if !self.partial.is_empty()
            || self.level0.len() as u64 != self.superblock.data_blocks
            || self.level0.is_empty()
        {
            return Err(mismatch());
        }
        let hash_block = self.superblock.hash_block_size as usize;
        let per_block = hash_block / DIGEST_BYTES;
        // Levels bottom-up; each is the hash blocks packing the digests below it.
        let mut levels: Vec<Vec<u8>> = Vec::new();
        let mut digests = self.level0;
        while digests.len() > 1 {
            let blocks = digests.len().div_ceil(per_block);
            let mut level = vec![0u8; blocks * hash_block];
            for (i, digest) in digests.iter().enumerate() {
                level[i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES].copy_from_slice(digest);
            }
            digests = level
                .chunks_exact(hash_block)
                .map(|block| {
                    let mut hasher = self.salted.clone();
                    hasher.update(block);
                    hasher.finalize().into()
                })
                .collect();
            levels.push(level);
        }
        // On the device the top level comes first.
        let hash_area = levels.into_iter().rev().flatten().collect();
        Ok(Tree {
            root_hash: digests[0],
            hash_area,
        })
    }
}

/// A hash image (superblock + tree) for `data`, as `veritysetup format --salt=<salt>`
/// with 4 KiB blocks writes it, and its root hash: for tests that need a consistent pair
/// without the tool.
#[cfg(test)]
pub(crate) fn format_for_tests(data: &[u8], salt: &[u8]) -> (Vec<u8>, String) {
    let blocks = (data.len() / 4096) as u64;
    let mut sb = vec![0u8; 4096];
    sb[..8].copy_from_slice(SIGNATURE);
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&1u32.to_le_bytes());
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&4096u32.to_le_bytes());
    sb[68..72].copy_from_slice(&4096u32.to_le_bytes());
    sb[72..80].copy_from_slice(&blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    let mut builder = TreeBuilder::new(Superblock::parse(&sb).expect("superblock"));
    builder.update(data);
    let tree = builder.finish().expect("tree");
    sb.extend_from_slice(&tree.hash_area);
    (sb, tree.root_hash_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vectors' data: a 64-bit LCG, 4 bytes of its high half per step (the same
    /// generator produced the files `veritysetup format` hashed for the constants below).
    fn data(blocks: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(blocks * 4096);
        let mut x: u64 = 0x1234_5678;
        while out.len() < blocks * 4096 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            out.extend_from_slice(&((x >> 32) as u32).to_le_bytes());
        }
        out
    }

    fn superblock(blocks: u64) -> Superblock {
        Superblock {
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: blocks,
            salt: hex::decode("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
                .expect("hex"),
        }
    }

    /// Root hashes and hash-device digests from `veritysetup format
    /// --salt=0011…eeff --uuid=00000000-0000-0000-0000-000000000001` (cryptsetup 2.6) of
    /// [`data`] with 1, 300 and 128·128+5 blocks: no level, two levels, three levels.
    const VECTORS: [(usize, &str, &str); 3] = [
        (
            1,
            "6469149376e08eff23fb3180217a73e5833d35180fba5628a1027a3afc6599b3",
            "21cb3bb90e026829eef4e787c526979fe86fb779eb52012b256dedb9417e4cae",
        ),
        (
            300,
            "af4218e1ec2060b45eebef8d4fc3535d2d371debaea86c75c963930d625955af",
            "e00592b2f517b64707e12effa27fa206afe51b31bbbc990c631ad34b071d1e68",
        ),
        (
            16389,
            "53b777159e39f6a19c9b375c78be061b84ccf80bec0cccdf71ad9538e2e29bbe",
            "902e3baeec10b7a063f21f4934210435ea383da050052c9ac0f4a9d3d2a12369",
        ),
    ];

    /// The superblock `veritysetup` wrote for the vectors, rebuilt field by field.
    fn superblock_bytes(blocks: u64) -> Vec<u8> {
        let mut sb = vec![0u8; 4096];
        sb[..8].copy_from_slice(SIGNATURE);
        sb[8..12].copy_from_slice(&1u32.to_le_bytes());
        sb[12..16].copy_from_slice(&1u32.to_le_bytes());
        sb[31] = 1; // uuid 00000000-0000-0000-0000-000000000001
        sb[32..38].copy_from_slice(b"sha256");
        sb[64..68].copy_from_slice(&4096u32.to_le_bytes());
        sb[68..72].copy_from_slice(&4096u32.to_le_bytes());
        sb[72..80].copy_from_slice(&blocks.to_le_bytes());
        sb[80..82].copy_from_slice(&32u16.to_le_bytes());
        sb[88..120].copy_from_slice(&superblock(blocks).salt);
        sb
    }

    #[test]
    fn trees_match_veritysetup_for_zero_two_and_three_levels() {
        for (blocks, root, device) in VECTORS {
            let sb = Superblock::parse(&superblock_bytes(blocks as u64)).expect("superblock");
            assert_eq!(sb, superblock(blocks as u64));
            let mut builder = TreeBuilder::new(sb);
            // Odd chunk sizes: blocks split across chunks must hash the same.
            for chunk in data(blocks).chunks(4096 * 3 + 17) {
                builder.update(chunk);
            }
            let tree = builder.finish().expect("tree");
            assert_eq!(tree.root_hash_hex(), root, "{blocks} blocks");
            let mut whole = superblock_bytes(blocks as u64);
            whole.extend_from_slice(&tree.hash_area);
            assert_eq!(
                hex::encode(Sha256::digest(&whole)),
                device,
                "{blocks} blocks"
            );
        }
    }

    #[test]
    fn a_root_image_of_another_size_than_the_superblock_says_is_refused() {
        for bytes in [4096 * 299, 4096 * 301, 4096 * 300 - 1] {
            let mut builder = TreeBuilder::new(superblock(300));
            builder.update(&vec![0u8; bytes]);
            assert!(
                matches!(builder.finish(), Err(VerityError::SizeMismatch { .. })),
                "{bytes}"
            );
        }
    }

    #[test]
    fn superblocks_the_writer_cannot_check_are_refused_with_the_reason() {
        assert_eq!(
            Superblock::parse(&[0u8; 512]),
            Err(VerityError::NoSuperblock)
        );
        let mut sb = superblock_bytes(1);
        sb[32..38].copy_from_slice(b"sha512");
        assert!(matches!(
            Superblock::parse(&sb),
            Err(VerityError::Unsupported(reason)) if reason.contains("sha512")
        ));
        let mut sb = superblock_bytes(1);
        sb[12] = 0;
        assert!(matches!(
            Superblock::parse(&sb),
            Err(VerityError::Unsupported(reason)) if reason.contains("hash type 0")
        ));
        let mut sb = superblock_bytes(1);
        sb[64..68].copy_from_slice(&1000u32.to_le_bytes());
        assert!(Superblock::parse(&sb).is_err());
    }
}
