//! The manifest of a rekey message: what a member must know before it can use a chunk.
//!
//! The manifest is small and signed once by the GCKS (RFC 4046 5.2: source authentication of
//! rekey messages). It fits one datagram whatever the group's size: it names the message
//! (group, SPI, epoch, sequence number), the algorithms, the exact group size (the input of
//! every member's NACK backoff), the FEC parameters of the chunk object (opaque here, parsed by
//! `rekeycast-fec`), the chunk count, the root that chunks authenticate against, and the first
//! leaf order key of each FEC source block. The last tells a member, from signed data, which
//! single block holds its chunk ([`Manifest::block_of`]): it can drop the symbols of every other
//! block before their MAC check and hold only its own block's symbols for decoding.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  version = 1  |  sig alg = 1  |  wrap alg = 1 | chunk auth    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           group id                            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     SPI of the Rekey SA                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                   sequence number (64 bits)                   |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                             epoch                             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                          group size                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                          chunk count                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |            timestamp, microseconds since 1970 (64 bits)       |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                chunk root (16 bytes, Merkle root)             |
//! +                    (zero for per-chunk signatures)            +
//! |                              ...                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | FEC info len n|  FEC object transmission information (n bytes)|
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | block count z |  z first leaf order keys, 4 bytes each, one per |
//! +-+-+-+-+-+-+-+-+  FEC source block in SBN order, non-decreasing  |
//! |                              ...                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |        Ed25519 signature (64 bytes) over all of the above      |
//! |             prefixed with the context "rekeycast manifest v1"  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The signed bytes are parsed by [`SignedManifest::parse`] (total: any bytes give a value or
//! a [`ManifestError`]); only `auth` turns a `SignedManifest` into a verified [`Manifest`].

use ed25519_dalek::{Signer, SigningKey};

use crate::auth::merkle::{Digest, HASH_LEN};

/// The manifest format version.
pub const VERSION: u8 = 1;
/// The signature algorithm id of Ed25519 (RFC 8032).
pub const SIGNATURE_ED25519: u8 = 1;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The largest FEC object transmission information the manifest carries.
pub const MAX_FEC_INFO_LEN: usize = 32;
/// The most FEC source blocks whose first keys the manifest carries: the SBN is 8 bits
/// ([`rekeycast_fec::MAX_SOURCE_BLOCKS`]).
pub const MAX_BLOCKS: usize = rekeycast_fec::MAX_SOURCE_BLOCKS as usize;
/// Bytes of one block's first leaf order key.
const BLOCK_KEY_LEN: usize = 4;
/// The context every manifest signature covers before the manifest's bytes, so a manifest
/// signature can never be taken for a signature over anything else the GCKS signs.
pub const SIGNATURE_CONTEXT: &[u8] = b"rekeycast manifest v1\0";

const FIXED_LEN: usize = 57;

/// How the chunks of a message authenticate themselves.
///
/// The default is [`ChunkAuth::GroupSignature`] with groups of 8 chunks
/// ([`super::chunk::DEFAULT_GROUP_LOG2`] = 3), chosen from the `auth` benchmark's options
/// table (one message at N = 2^20 members and 1% churn, 1,425-byte symbols in 1,472-byte
/// datagrams, every option laid out with the room its authenticator leaves):
///
/// - Bytes on the wire: groups of 4 or 8 send the same 6,397 chunks (9.12 MB) as one signature
///   per chunk: their 98 or 114 authenticator bytes still fit the slack the layout leaves in a
///   chunk. Groups of 16 to 64 (130 to 162 bytes) need 7,092 chunks (10.11 MB, +11%), and one
///   Merkle tree over the message (a 13-hash path) 7,885 (11.24 MB, +23%).
/// - GCKS signatures: 801 with groups of 8 against 6,398 per chunk; authenticating the laid
///   out chunks took 96 ms against 508 ms on one thread in the same run (a loaded machine:
///   about 15 us a signature on a quiet one), the whole-message tree 35 ms.
/// - Member: the manifest's signature and the group's, as with one signature per chunk (at
///   most 2 checks per message); both verified in about 92 us in that run, the Merkle path
///   (one check) in about 49 us.
///
/// So groups of 8 cost the member and the wire what per-chunk signatures cost, and the GCKS
/// an eighth of the signatures. [`ChunkAuth::Signature`] and [`ChunkAuth::MerklePath`] stay
/// available.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ChunkAuth {
    /// Each chunk carries its path to the Merkle root in the manifest.
    MerklePath = 1,
    /// Each chunk carries its own Ed25519 signature.
    Signature = 2,
    /// Chunks are signed in groups of `2^k` consecutive chunks: each carries its path in a
    /// small Merkle tree over its group and the group's one signature over that tree's root
    /// (see [`super::chunk`]).
    #[default]
    GroupSignature = 3,
}

/// What can be wrong with a manifest's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The bytes end early.
    #[error("manifest truncated")]
    Truncated,
    /// Bytes follow the signature.
    #[error("{0} trailing bytes after the manifest")]
    TrailingBytes(usize),
    /// A version this implementation does not speak.
    #[error("unsupported manifest version {0}")]
    UnsupportedVersion(u8),
    /// An algorithm id this implementation does not know (which field, which id).
    #[error("unknown {0} algorithm {1}")]
    UnknownAlgorithm(&'static str, u8),
    /// A field holds a value its format forbids.
    #[error("invalid manifest field {0}")]
    InvalidField(&'static str),
    /// The first key of block `sbn` is below the first key of the block before it: blocks
    /// hold chunks in leaf order, so their first keys never decrease.
    #[error("block {sbn} starts at order key {key}, below the block before it")]
    UnorderedBlockKeys {
        /// The block whose first key is out of order.
        sbn: u8,
        /// Its first key.
        key: u32,
    },
}

/// The contents of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Manifest {
    /// The key-wrapping algorithm id of the Rekey SA (RFC 4046 6.2.1).
    pub wrap_algorithm: u8,
    /// How the chunks authenticate themselves.
    pub chunk_auth: ChunkAuth,
    /// The group id.
    pub group_id: u32,
    /// The SPI of the Rekey SA.
    pub spi: u32,
    /// The message's sequence number.
    pub seq: u64,
    /// The epoch: raised when the sequence restarts (a new Rekey SA); members never go back.
    pub epoch: u32,
    /// The exact group size after this message.
    pub group_size: u32,
    /// The number of chunks (FEC source symbols of the chunk object).
    pub chunk_count: u32,
    /// When the GCKS built the message, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// The Merkle root of the chunks ([`ChunkAuth::MerklePath`]), else all zero.
    pub chunk_root: Digest,
    /// The FEC object transmission information of the chunk object (1 to
    /// [`MAX_FEC_INFO_LEN`] bytes, parsed by `rekeycast-fec`).
    pub fec_info: Vec<u8>,
    /// For each FEC source block of the chunk object, in SBN order, the leaf order key
    /// ([`super::chunk::ChunkHeader::first_leaf`]) of the first chunk in that block: at most
    /// [`MAX_BLOCKS`] keys, non-decreasing. [`Manifest::block_of`] reads it.
    pub block_first_keys: Vec<u32>,
}

/// A manifest as received: its contents, the exact bytes the signature covers, and the
/// signature, not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest<'a> {
    /// The parsed contents (untrusted until `auth` verifies the signature).
    pub manifest: Manifest,
    /// The signed bytes (everything before the signature).
    pub signed: &'a [u8],
    /// The signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl Manifest {
    /// Bytes the signed manifest takes.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN
            + self.fec_info.len()
            + 1
            + self.block_first_keys.len() * BLOCK_KEY_LEN
            + SIGNATURE_LEN
    }

    /// The SBN of the source block that holds the chunk serving the leaf with order key
    /// `order_key`: the last block whose first key is at most `order_key`. `None` when the
    /// manifest names no blocks or `order_key` comes before the first block.
    ///
    /// Only the first keys are known, so a key past the last chunk's range still maps to the
    /// last block; the chunk's own header says whether it serves the key.
    pub fn block_of(&self, order_key: u32) -> Option<u8> {
        let after = self
            .block_first_keys
            .partition_point(|&first| first <= order_key);
        // At most MAX_BLOCKS (255) keys, checked by the parser and the encoder, so the index
        // fits u8; a longer vector built by hand answers None rather than a wrapped SBN.
        after.checked_sub(1).and_then(|sbn| u8::try_from(sbn).ok())
    }

    /// Encodes the manifest and signs it with the GCKS's key.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, ManifestError> {
        let mut bytes = self.signed_bytes()?;
        let signature = key.sign(&signed_message(&bytes));
        bytes.extend_from_slice(&signature.to_bytes());
        Ok(bytes)
    }

    /// The bytes the signature covers (after [`SIGNATURE_CONTEXT`]): the manifest without
    /// its signature.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, ManifestError> {
        if self.fec_info.is_empty() || self.fec_info.len() > MAX_FEC_INFO_LEN {
            return Err(ManifestError::InvalidField("fec info length"));
        }
        if self.chunk_count == 0 {
            return Err(ManifestError::InvalidField("chunk count"));
        }
        if self.block_first_keys.len() > MAX_BLOCKS {
            return Err(ManifestError::InvalidField("block count"));
        }
        check_block_keys(&self.block_first_keys)?;
        let mut bytes = Vec::with_capacity(self.buffer_len());
        bytes.extend_from_slice(&[
            VERSION,
            SIGNATURE_ED25519,
            self.wrap_algorithm,
            self.chunk_auth as u8,
        ]);
        bytes.extend_from_slice(&self.group_id.to_be_bytes());
        bytes.extend_from_slice(&self.spi.to_be_bytes());
        bytes.extend_from_slice(&self.seq.to_be_bytes());
        bytes.extend_from_slice(&self.epoch.to_be_bytes());
        bytes.extend_from_slice(&self.group_size.to_be_bytes());
        bytes.extend_from_slice(&self.chunk_count.to_be_bytes());
        bytes.extend_from_slice(&self.timestamp_us.to_be_bytes());
        bytes.extend_from_slice(&self.chunk_root);
        // At most MAX_FEC_INFO_LEN, checked above.
        bytes.push(self.fec_info.len() as u8);
        bytes.extend_from_slice(&self.fec_info);
        // At most MAX_BLOCKS (255), checked above.
        bytes.push(self.block_first_keys.len() as u8);
        for key in &self.block_first_keys {
            bytes.extend_from_slice(&key.to_be_bytes());
        }
        Ok(bytes)
    }
}

impl<'a> SignedManifest<'a> {
    /// Parses a signed manifest without checking its signature.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ManifestError> {
        let fixed = bytes.get(..FIXED_LEN).ok_or(ManifestError::Truncated)?;
        if fixed[0] != VERSION {
            return Err(ManifestError::UnsupportedVersion(fixed[0]));
        }
        if fixed[1] != SIGNATURE_ED25519 {
            return Err(ManifestError::UnknownAlgorithm("signature", fixed[1]));
        }
        let chunk_auth = match fixed[3] {
            1 => ChunkAuth::MerklePath,
            2 => ChunkAuth::Signature,
            3 => ChunkAuth::GroupSignature,
            other => {
                return Err(ManifestError::UnknownAlgorithm(
                    "chunk authentication",
                    other,
                ))
            }
        };
        let fec_len = usize::from(fixed[56]);
        if fec_len == 0 || fec_len > MAX_FEC_INFO_LEN {
            return Err(ManifestError::InvalidField("fec info length"));
        }
        let fec_end = FIXED_LEN + fec_len;
        let block_count = usize::from(*bytes.get(fec_end).ok_or(ManifestError::Truncated)?);
        let keys_start = fec_end + 1;
        let signed_len = keys_start + block_count * BLOCK_KEY_LEN;
        let total = signed_len + SIGNATURE_LEN;
        if bytes.len() < total {
            return Err(ManifestError::Truncated);
        }
        if bytes.len() > total {
            return Err(ManifestError::TrailingBytes(bytes.len() - total));
        }
        let u32_at = |at: usize| {
            u32::from_be_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let u64_at = |at: usize| (u64::from(u32_at(at)) << 32) | u64::from(u32_at(at + 4));
        let chunk_count = u32_at(28);
        if chunk_count == 0 {
            return Err(ManifestError::InvalidField("chunk count"));
        }
        let mut chunk_root = [0u8; HASH_LEN];
        chunk_root.copy_from_slice(&fixed[40..56]);
        // Exactly `total` bytes, checked above, so every slice below is in range.
        let block_first_keys: Vec<u32> = bytes[keys_start..signed_len]
            .chunks_exact(BLOCK_KEY_LEN)
            .map(|key| u32::from_be_bytes([key[0], key[1], key[2], key[3]]))
            .collect();
        check_block_keys(&block_first_keys)?;
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&bytes[signed_len..]);
        Ok(Self {
            manifest: Manifest {
                wrap_algorithm: fixed[2],
                chunk_auth,
                group_id: u32_at(4),
                spi: u32_at(8),
                seq: u64_at(12),
                epoch: u32_at(20),
                group_size: u32_at(24),
                chunk_count,
                timestamp_us: u64_at(32),
                chunk_root,
                fec_info: bytes[FIXED_LEN..fec_end].to_vec(),
                block_first_keys,
            },
            signed: &bytes[..signed_len],
            signature,
        })
    }
}

/// Blocks hold chunks in leaf order, so their first keys never decrease.
fn check_block_keys(keys: &[u32]) -> Result<(), ManifestError> {
    match keys.windows(2).position(|pair| pair[1] < pair[0]) {
        None => Ok(()),
        Some(before) => Err(ManifestError::UnorderedBlockKeys {
            // At most MAX_BLOCKS keys (checked by both callers), so the SBN fits u8.
            sbn: u8::try_from(before + 1).unwrap_or(u8::MAX),
            key: keys[before + 1],
        }),
    }
}

/// The message an Ed25519 manifest signature covers: the context, then the signed bytes.
pub(crate) fn signed_message(signed: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + signed.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(signed);
    message
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            wrap_algorithm: 1,
            chunk_auth: ChunkAuth::MerklePath,
            group_id: 0x0A0B_0C0D,
            spi: 2,
            seq: 300,
            epoch: 1,
            group_size: 1 << 20,
            chunk_count: 4000,
            timestamp_us: 1_790_000_000_000_000,
            chunk_root: [0x5A; HASH_LEN],
            fec_info: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            block_first_keys: vec![0, 0x0102_0304, 0x0102_0304, 0xFFFF_FFFF],
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42; 32])
    }

    /// The signed bytes of [`manifest`], field by field.
    const SIGNED: [u8; 86] = [
        1, 1, 1, 1, // version, signature, wrap and chunk authentication algorithms
        0x0A, 0x0B, 0x0C, 0x0D, // group id
        0, 0, 0, 2, // SPI
        0, 0, 0, 0, 0, 0, 0x01, 0x2C, // sequence 300
        0, 0, 0, 1, // epoch
        0, 0x10, 0, 0, // group size 2^20
        0, 0, 0x0F, 0xA0, // chunk count 4000
        0x00, 0x06, 0x5B, 0xFE, 0xDA, 0x25, 0xE0, 0x00, // timestamp
        0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, // chunk root
        0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, //
        12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, // FEC info
        4,  // block count
        0, 0, 0, 0, // block 0
        1, 2, 3, 4, // block 1
        1, 2, 3, 4, // block 2
        0xFF, 0xFF, 0xFF, 0xFF, // block 3
    ];

    #[test]
    fn test_emit() {
        assert_eq!(manifest().signed_bytes().unwrap(), SIGNED);
        let bytes = manifest().sign(&key()).unwrap();
        assert_eq!(bytes.len(), SIGNED.len() + SIGNATURE_LEN);
        assert_eq!(manifest().buffer_len(), bytes.len());
        assert_eq!(&bytes[..SIGNED.len()], &SIGNED[..]);
    }

    #[test]
    fn test_parse() {
        let mut bytes = SIGNED.to_vec();
        bytes.extend_from_slice(&[0xEE; SIGNATURE_LEN]);
        let parsed = SignedManifest::parse(&bytes).unwrap();
        assert_eq!(parsed.manifest, manifest());
        assert_eq!(parsed.signed, &SIGNED[..]);
        assert_eq!(parsed.signature, [0xEE; SIGNATURE_LEN]);
    }

    #[test]
    fn test_emit_and_parse() {
        let bytes = manifest().sign(&key()).unwrap();
        let parsed = SignedManifest::parse(&bytes).unwrap();
        assert_eq!(parsed.manifest, manifest());
        assert_eq!(parsed.signed, &bytes[..SIGNED.len()]);
        assert_eq!(&parsed.signature[..], &bytes[SIGNED.len()..]);

        let mut no_blocks = manifest();
        no_blocks.block_first_keys.clear();
        let bytes = no_blocks.sign(&key()).unwrap();
        assert_eq!(bytes.len(), 57 + 12 + 1 + SIGNATURE_LEN);
        assert_eq!(bytes[57 + 12], 0);
        assert_eq!(SignedManifest::parse(&bytes).unwrap().manifest, no_blocks);
    }

    /// The largest manifest (the longest FEC information, the most blocks) fits the data of
    /// one symbol in an IPv6-safe datagram, so the manifest is always one datagram.
    #[test]
    fn fits_one_ipv6_safe_datagram() {
        let mut largest = manifest();
        largest.fec_info = vec![0; MAX_FEC_INFO_LEN];
        largest.block_first_keys = (0..MAX_BLOCKS as u32).map(|sbn| sbn * 4096).collect();
        let bytes = largest.sign(&key()).unwrap();
        assert_eq!(bytes.len(), largest.buffer_len());
        assert_eq!(
            bytes.len(),
            57 + MAX_FEC_INFO_LEN + 1 + 4 * 255 + SIGNATURE_LEN
        );
        let room = crate::wire::IPV6_SAFE_DATAGRAM_SIZE
            - crate::wire::datagram::OVERHEAD
            - crate::wire::symbol::FIXED_LEN;
        assert!(bytes.len() <= room, "{} > {room}", bytes.len());
        assert_eq!(SignedManifest::parse(&bytes).unwrap().manifest, largest);
    }

    #[test]
    fn block_keys_must_not_decrease() {
        let mut unordered = manifest();
        unordered.block_first_keys = vec![5, 9, 8, 10];
        assert_eq!(
            unordered.sign(&key()),
            Err(ManifestError::UnorderedBlockKeys { sbn: 2, key: 8 })
        );
        // The same keys on the wire: the parser rejects them too.
        let mut bytes = manifest().sign(&key()).unwrap();
        let keys = 57 + 12 + 1;
        bytes[keys..keys + 16].copy_from_slice(&[0, 0, 0, 5, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0, 10]);
        assert_eq!(
            SignedManifest::parse(&bytes),
            Err(ManifestError::UnorderedBlockKeys { sbn: 2, key: 8 })
        );
        let mut too_many = manifest();
        too_many.block_first_keys = vec![0; MAX_BLOCKS + 1];
        assert_eq!(
            too_many.sign(&key()),
            Err(ManifestError::InvalidField("block count"))
        );
        let mut equal = manifest();
        equal.block_first_keys = vec![7; MAX_BLOCKS];
        assert!(equal.sign(&key()).is_ok());
    }

    #[test]
    fn block_of_picks_the_last_block_starting_at_or_before_the_key() {
        let mut m = manifest();
        m.block_first_keys = vec![10, 20, 20, 35];
        assert_eq!(m.block_of(0), None);
        assert_eq!(m.block_of(9), None);
        assert_eq!(m.block_of(10), Some(0));
        assert_eq!(m.block_of(19), Some(0));
        // Two blocks starting at the same key: the later one.
        assert_eq!(m.block_of(20), Some(2));
        assert_eq!(m.block_of(34), Some(2));
        assert_eq!(m.block_of(35), Some(3));
        assert_eq!(m.block_of(u32::MAX), Some(3));
        m.block_first_keys = vec![0];
        assert_eq!(m.block_of(0), Some(0));
        assert_eq!(m.block_of(u32::MAX), Some(0));
        m.block_first_keys.clear();
        assert_eq!(m.block_of(0), None);
        m.block_first_keys = (0..MAX_BLOCKS as u32).collect();
        assert_eq!(m.block_of(254), Some(254));
        assert_eq!(m.block_of(u32::MAX), Some(254));
    }

    /// The seeds of the `manifest` fuzz target are manifests of the current format.
    #[test]
    // The seeds are files of the workspace's fuzz corpus.
    #[allow(clippy::disallowed_methods)]
    fn fuzz_seeds_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/manifest");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let parsed = SignedManifest::parse(&bytes);
            assert!(parsed.is_ok(), "{}: {parsed:?}", path.display());
            seeds += 1;
        }
        assert!(seeds >= 2);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        let bytes = manifest().sign(&key()).unwrap();
        for len in 0..bytes.len() {
            assert!(
                SignedManifest::parse(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
        let mut no_blocks = manifest();
        no_blocks.block_first_keys.clear();
        let short = no_blocks.sign(&key()).unwrap();
        for len in 0..short.len() {
            assert!(
                SignedManifest::parse(&short[..len]).is_err(),
                "prefix {len}"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            SignedManifest::parse(&trailing),
            Err(ManifestError::TrailingBytes(1))
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let bytes = manifest().sign(&key()).unwrap();
        let mut bad = bytes.clone();
        bad[0] = 2;
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::UnsupportedVersion(2))
        );
        let mut bad = bytes.clone();
        bad[1] = 9;
        assert!(matches!(
            SignedManifest::parse(&bad),
            Err(ManifestError::UnknownAlgorithm("signature", 9))
        ));
        let mut bad = bytes.clone();
        bad[3] = 4;
        assert!(SignedManifest::parse(&bad).is_err());
        let mut bad = bytes.clone();
        bad[56] = 0;
        assert!(SignedManifest::parse(&bad).is_err());
        let mut bad = bytes.clone();
        bad[28..32].fill(0);
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::InvalidField("chunk count"))
        );
        let mut empty_info = manifest();
        empty_info.fec_info.clear();
        assert!(empty_info.sign(&key()).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(seq: u64, epoch: u32, group_size: u32, chunk_count in 1u32.., spi: u32,
                      timestamp_us: u64, root: [u8; 16], signature_chunks: bool,
                      fec_info in proptest::collection::vec(any::<u8>(), 1..=MAX_FEC_INFO_LEN),
                      mut block_first_keys in proptest::collection::vec(any::<u32>(), 0..=MAX_BLOCKS)) {
            block_first_keys.sort_unstable();
            let manifest = Manifest {
                wrap_algorithm: 1,
                chunk_auth: if signature_chunks { ChunkAuth::Signature } else { ChunkAuth::MerklePath },
                group_id: 3, spi, seq, epoch, group_size, chunk_count, timestamp_us,
                chunk_root: root, fec_info, block_first_keys,
            };
            let bytes = manifest.sign(&key()).unwrap();
            let parsed = SignedManifest::parse(&bytes).unwrap();
            prop_assert_eq!(parsed.manifest, manifest);
        }

        #[test]
        fn parse_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = SignedManifest::parse(&bytes);
        }
    }
}
