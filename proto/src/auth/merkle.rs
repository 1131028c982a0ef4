//! A binary Merkle tree over the chunks of a rekey message, with BLAKE3 as the hash.
//!
//! One way for a chunk to authenticate itself (DESIGN.md, "Manifest and chunk
//! authentication") is a path to a root that the signed manifest carries: a member then checks
//! one signature (the manifest's) and `ceil(log2(chunks))` hashes for its own chunk, however
//! large the group. This module builds the tree, gives each chunk its path, and verifies a
//! path. It hashes with the `blake3` crate; nothing here is a primitive of its own.
//!
//! The same tree serves a signature group of chunks (see [`crate::session::chunk`]): there the
//! GCKS signs a small tree's root and each chunk's path leads to it ([`root_from_path`]).
//!
//! Construction: leaf `i` is `H(0x00 || i as u32 BE || chunk)`, an inner node is
//! `H(0x01 || left || right)`, where `H` is BLAKE3 truncated to [`HASH_LEN`] bytes. The domain
//! bytes keep a leaf from passing as an inner node, and the index binds a chunk to its
//! position. A level with an odd number of nodes promotes its last node unchanged to the next
//! level, so a path's length depends on the index and the leaf count, and [`verify`] requires
//! exactly that length.
//!
//! Why 16-byte hashes: the GCKS, which builds the tree, is trusted, so collisions it could
//! search for do not matter; a forger needs a second preimage of a node on the signed path,
//! about 2^128 work (2^115 against all of the nodes of a 2^13-chunk tree at once). Half-length
//! hashes halve the bytes each chunk spends on its path.

/// Bytes of each hash in the tree.
pub const HASH_LEN: usize = 16;

/// A node of the tree.
pub type Digest = [u8; HASH_LEN];

/// The largest number of leaves a tree may have (the chunk index is 32 bits on the wire).
pub const MAX_LEAVES: usize = u32::MAX as usize;

const LEAF_DOMAIN: u8 = 0x00;
const NODE_DOMAIN: u8 = 0x01;

/// What can be wrong with the leaves handed to [`MerkleTree::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// A tree needs at least one leaf.
    #[error("a Merkle tree needs at least one leaf")]
    Empty,
    /// More leaves than a 32-bit index can name.
    #[error("{0} leaves, more than a 32-bit index can name")]
    TooManyLeaves(usize),
}

/// A Merkle tree, every level kept so that any leaf's path can be read off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    /// `levels[0]` are the leaf hashes, the last level is the root alone.
    levels: Vec<Vec<Digest>>,
}

impl MerkleTree {
    /// Builds the tree over `leaves`, in order.
    pub fn build<'a, I>(leaves: I) -> Result<Self, MerkleError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut level = Vec::new();
        for (index, leaf) in leaves.into_iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| MerkleError::TooManyLeaves(index))?;
            level.push(leaf_hash(index, leaf));
        }
        if level.is_empty() {
            return Err(MerkleError::Empty);
        }
        let mut levels = vec![level];
        while let Some(top) = levels.last().filter(|top| top.len() > 1) {
            let next = top
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    // An odd last node is promoted unchanged (`chunks(2)` never yields an
                    // empty slice).
                    single => single.first().copied().unwrap_or_default(),
                })
                .collect();
            levels.push(next);
        }
        Ok(Self { levels })
    }

    /// The root, which the manifest signs.
    pub fn root(&self) -> Digest {
        // Invariant: `build` leaves at least one level whose last entry is the root.
        self.levels
            .last()
            .and_then(|top| top.first())
            .copied()
            .unwrap_or([0; HASH_LEN])
    }

    /// The number of leaves.
    pub fn leaf_count(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    /// The path of leaf `index`: sibling hashes from the leaf level up. `None` when there is no
    /// such leaf.
    pub fn proof(&self, index: usize) -> Option<Vec<Digest>> {
        if index >= self.leaf_count() {
            return None;
        }
        let mut path = Vec::with_capacity(self.levels.len());
        let mut position = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = position ^ 1;
            if let Some(hash) = level.get(sibling) {
                path.push(*hash);
            }
            position /= 2;
        }
        Some(path)
    }
}

/// The number of hashes in the path of leaf `index` of a tree with `leaf_count` leaves, or
/// `None` when `index` is out of range.
pub fn proof_len(leaf_count: usize, index: usize) -> Option<usize> {
    if index >= leaf_count {
        return None;
    }
    let (mut len, mut width, mut position) = (0, leaf_count, index);
    while width > 1 {
        if (position ^ 1) < width {
            len += 1;
        }
        position /= 2;
        width = width.div_ceil(2);
    }
    Some(len)
}

/// Checks that `leaf` is leaf `index` of the tree with `leaf_count` leaves and root `root`,
/// given its path. A path of the wrong length is rejected.
pub fn verify(
    root: &Digest,
    leaf_count: usize,
    index: usize,
    leaf: &[u8],
    path: &[Digest],
) -> bool {
    root_from_path(leaf_count, index, leaf, path)
        .is_some_and(|computed| constant_time_eq::constant_time_eq(&computed, root))
}

/// The root that `leaf` at `index` of a tree with `leaf_count` leaves leads to along `path`,
/// or `None` when the path's length is not the one that leaf's path has (or `index` is out of
/// range). A signature over the root then stands for every leaf whose path leads to it.
pub fn root_from_path(
    leaf_count: usize,
    index: usize,
    leaf: &[u8],
    path: &[Digest],
) -> Option<Digest> {
    let index32 = u32::try_from(index).ok()?;
    if proof_len(leaf_count, index) != Some(path.len()) {
        return None;
    }
    let mut hash = leaf_hash(index32, leaf);
    let (mut width, mut position) = (leaf_count, index);
    let mut siblings = path.iter();
    while width > 1 {
        if (position ^ 1) < width {
            let sibling = siblings.next()?;
            hash = if position % 2 == 0 {
                node_hash(&hash, sibling)
            } else {
                node_hash(sibling, &hash)
            };
        }
        position /= 2;
        width = width.div_ceil(2);
    }
    Some(hash)
}

fn leaf_hash(index: u32, leaf: &[u8]) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[LEAF_DOMAIN]);
    hasher.update(&index.to_be_bytes());
    hasher.update(leaf);
    truncate(hasher.finalize())
}

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[NODE_DOMAIN]);
    hasher.update(left);
    hasher.update(right);
    truncate(hasher.finalize())
}

fn truncate(hash: blake3::Hash) -> Digest {
    let mut digest = [0u8; HASH_LEN];
    digest.copy_from_slice(&hash.as_bytes()[..HASH_LEN]);
    digest
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn leaves(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("chunk {i}").into_bytes())
            .collect()
    }

    fn tree(leaves: &[Vec<u8>]) -> MerkleTree {
        MerkleTree::build(leaves.iter().map(Vec::as_slice)).unwrap()
    }

    #[test]
    fn every_leaf_verifies_for_every_size_up_to_70() {
        for count in 1..=70 {
            let leaves = leaves(count);
            let tree = tree(&leaves);
            let root = tree.root();
            for (index, leaf) in leaves.iter().enumerate() {
                let path = tree.proof(index).unwrap();
                assert_eq!(Some(path.len()), proof_len(count, index));
                assert!(
                    verify(&root, count, index, leaf, &path),
                    "{count} leaves, leaf {index}"
                );
            }
            assert_eq!(tree.proof(count), None);
        }
    }

    #[test]
    fn path_length_is_logarithmic() {
        assert_eq!(proof_len(1, 0), Some(0));
        assert_eq!(proof_len(2, 1), Some(1));
        assert_eq!(proof_len(4096, 17), Some(12));
        assert_eq!(proof_len(5, 4), Some(1));
        assert_eq!(proof_len(5, 0), Some(3));
        assert_eq!(proof_len(5, 5), None);
    }

    #[test]
    fn a_single_leaf_is_its_own_root() {
        let tree = MerkleTree::build([&b"only"[..]]).unwrap();
        assert_eq!(tree.root(), leaf_hash(0, b"only"));
        assert!(verify(&tree.root(), 1, 0, b"only", &[]));
    }

    #[test]
    fn empty_is_an_error() {
        assert_eq!(
            MerkleTree::build(std::iter::empty::<&[u8]>()),
            Err(MerkleError::Empty)
        );
    }

    #[test]
    fn tampering_is_detected() {
        let leaves = leaves(13);
        let tree = tree(&leaves);
        let root = tree.root();
        let path = tree.proof(6).unwrap();
        // The chunk changed.
        assert!(!verify(&root, 13, 6, b"chunk 6!", &path));
        // Another leaf's bytes at this index, or this leaf at another index.
        assert!(!verify(&root, 13, 6, &leaves[7], &path));
        assert!(!verify(&root, 13, 7, &leaves[6], &path));
        // A leaf count that gives the path another shape. (A count with the same shape computes
        // the same hashes: the count is not hashed, the manifest signs it beside the root.)
        assert!(!verify(&root, 7, 6, &leaves[6], &path));
        // A path hash flipped, a path too short or too long.
        let mut flipped = path.clone();
        flipped[1][0] ^= 1;
        assert!(!verify(&root, 13, 6, &leaves[6], &flipped));
        assert!(!verify(&root, 13, 6, &leaves[6], &path[..path.len() - 1]));
        let mut longer = path.clone();
        longer.push([0; HASH_LEN]);
        assert!(!verify(&root, 13, 6, &leaves[6], &longer));
        // A wrong root.
        let mut bad_root = root;
        bad_root[15] ^= 0x80;
        assert!(!verify(&bad_root, 13, 6, &leaves[6], &path));
    }

    #[test]
    fn a_leaf_cannot_pass_as_an_inner_node() {
        // The two-leaf tree's root is H(0x01 || l0 || l1); a "leaf" made of l0 || l1 at index 0
        // of a one-leaf tree hashes with the leaf domain instead, so it cannot match.
        let leaves = leaves(2);
        let tree = tree(&leaves);
        let mut concatenated = leaf_hash(0, &leaves[0]).to_vec();
        concatenated.extend_from_slice(&leaf_hash(1, &leaves[1]));
        assert!(!verify(&tree.root(), 1, 0, &concatenated, &[]));
    }

    proptest! {
        #[test]
        fn random_trees_verify_and_reject_flips(
            data in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..200),
            pick: proptest::sample::Index,
            flip: proptest::sample::Index,
        ) {
            let tree = MerkleTree::build(data.iter().map(Vec::as_slice)).unwrap();
            let index = pick.index(data.len());
            let path = tree.proof(index).unwrap();
            prop_assert!(verify(&tree.root(), data.len(), index, &data[index], &path));
            let mut tampered = data[index].clone();
            if tampered.is_empty() {
                tampered.push(0);
            } else {
                let at = flip.index(tampered.len());
                tampered[at] ^= 1;
            }
            prop_assert!(!verify(&tree.root(), data.len(), index, &tampered, &path));
        }
    }
}
