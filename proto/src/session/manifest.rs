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
//! # Identity (RFC 4046 5.8)
//!
//! Every message names, under its signature, the group key management algorithm and its
//! parameter (LKH and the tree's degree), the key wrap algorithm, and the Rekey SA's identity:
//! group id, SPI and the id of the GCKS signing key that signed it ([`KeyId`]). A member
//! compares them with what it registered for (its bundle's Rekey SA) and refuses a message
//! that names anything else (`auth::message::MessageReject::IdentityMismatch`); an id this
//! implementation does not know is a typed parse error ([`ManifestError::UnknownAlgorithm`]).
//!
//! # Signing-key rollover
//!
//! A manifest may announce the GCKS's next signing key ([`KeyRollover`]): its public key and
//! the first sequence number signed with it. The announcement is covered by the signature of
//! the current key, so a member learns the new key only from the key it already trusts
//! (RFC 4046 section 3, requirement 9: updating the Rekey SA).
//!
//! # Format, version 2
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  version = 2  |  sig alg = 1  |   wrap alg    | chunk auth    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | GKM alg = 1   | tree degree   |     flags     | reserved = 0  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |              signing key id (of the key that signs)           |
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
//! | if flags bit 0: the next signing key (32-byte Ed25519 public  |
//! | key), then the first sequence number it signs (64 bits)       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |        Ed25519 signature (64 bytes) over all of the above      |
//! |             prefixed with the context "rekeycast manifest v1"  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Version 1, which GCKSs before version 2 wrote (and whose messages may still sit in a resync
//! history), has no second and third words and no announcement: it starts with the version,
//! signature, wrap and chunk authentication bytes and goes on with the group id. It is still
//! parsed ([`Manifest::version`] says which format a manifest came in, and it re-encodes in
//! that format); it names no degree and no signing key ([`Manifest::degree`] 0,
//! [`Manifest::signing_key_id`] [`KeyId::UNSTATED`]).
//!
//! The signed bytes are parsed by [`SignedManifest::parse`] (total: any bytes give a value or
//! a [`ManifestError`]); only `auth` turns a `SignedManifest` into a verified [`Manifest`].

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::auth::merkle::{Digest, HASH_LEN};
use crate::gsa::WrapAlgorithm;

/// The manifest format version written.
pub const VERSION: u8 = 2;
/// The first manifest format version, still parsed (no identity words, no rollover).
pub const VERSION_1: u8 = 1;
/// The signature algorithm id of Ed25519 (RFC 8032).
pub const SIGNATURE_ED25519: u8 = 1;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The largest FEC object transmission information the manifest carries.
pub const MAX_FEC_INFO_LEN: usize = 32;
/// The most FEC source blocks whose first keys the manifest carries: the SBN is 8 bits
/// ([`rekeycast_fec::MAX_SOURCE_BLOCKS`]).
pub const MAX_BLOCKS: usize = rekeycast_fec::MAX_SOURCE_BLOCKS as usize;
/// The most FEC source blocks a manifest that announces a key rollover carries, so that the
/// largest such manifest still fits one IPv6-safe datagram (the announcement takes the room of
/// ten blocks). A GCKS leaves the announcement out of a larger message (it repeats it in the
/// others of the rollover's delay).
pub const MAX_BLOCKS_WITH_ROLLOVER: usize = MAX_BLOCKS - 10;
/// Bytes of one block's first leaf order key.
const BLOCK_KEY_LEN: usize = 4;
/// Bytes of a key rollover announcement: the public key and the first sequence number.
pub const ROLLOVER_LEN: usize = 32 + 8;
/// The context every manifest signature covers before the manifest's bytes, so a manifest
/// signature can never be taken for a signature over anything else the GCKS signs.
pub const SIGNATURE_CONTEXT: &[u8] = b"rekeycast manifest v1\0";
/// The context of the signing key id derivation (BLAKE3 `derive_key`).
pub const KEY_ID_CONTEXT: &str = "rekeycast 2026 GCKS signing key id";

/// The flag bit that says an announcement of the next signing key follows the block keys.
const FLAG_ROLLOVER: u8 = 1;

const FIXED_LEN_V1: usize = 57;
const FIXED_LEN_V2: usize = 65;

/// The group key management algorithm of a Rekey SA (RFC 4046 5.8: the GKM algorithm is part
/// of what a message names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum GkmAlgorithm {
    /// Logical Key Hierarchy (RFC 2627; batch rekeying by the marking algorithm). Id 1.
    #[default]
    Lkh,
}

impl GkmAlgorithm {
    /// The algorithm's id on the wire.
    pub const fn id(self) -> u8 {
        match self {
            Self::Lkh => 1,
        }
    }

    /// The algorithm with id `id`, or [`ManifestError::UnknownAlgorithm`].
    pub const fn from_id(id: u8) -> Result<Self, ManifestError> {
        match id {
            1 => Ok(Self::Lkh),
            other => Err(ManifestError::UnknownAlgorithm(
                "group key management",
                other,
            )),
        }
    }
}

/// The id of a GCKS signing key: the first 4 bytes of a BLAKE3 key derivation
/// ([`KEY_ID_CONTEXT`]) from its Ed25519 public key. It only selects which known key a member
/// verifies a manifest under; the signature decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 4]);

impl KeyId {
    /// The id a version 1 manifest carries: it names no key.
    pub const UNSTATED: KeyId = KeyId([0; 4]);

    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = blake3::derive_key(KEY_ID_CONTEXT, key.as_bytes());
        Self([digest[0], digest[1], digest[2], digest[3]])
    }
}

impl core::fmt::Display for KeyId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// The announcement of the GCKS's next signing key, carried in manifests signed by the current
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyRollover {
    /// The next key's Ed25519 public key.
    pub next_key: VerifyingKey,
    /// The first sequence number signed with the next key: messages from it on are signed
    /// only with the next key, messages before it only with the current one.
    pub from_seq: u64,
}

impl KeyRollover {
    /// The id of the next key.
    pub fn next_key_id(&self) -> KeyId {
        KeyId::of(&self.next_key)
    }
}

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
    /// The format version the manifest is encoded in: [`VERSION`] for every manifest a GCKS
    /// builds, [`VERSION_1`] for one parsed from an older GCKS's bytes.
    pub version: u8,
    /// The key-wrapping algorithm id of the Rekey SA (RFC 4046 6.2.1): a
    /// [`WrapAlgorithm::id`] (the parser and the encoder refuse any other).
    pub wrap_algorithm: u8,
    /// How the chunks authenticate themselves.
    pub chunk_auth: ChunkAuth,
    /// The group key management algorithm.
    pub gkm_algorithm: GkmAlgorithm,
    /// The degree of the key tree (2 to 16); 0 in a version 1 manifest, which names none.
    pub degree: u8,
    /// The id of the GCKS key that signs this manifest; [`KeyId::UNSTATED`] in version 1.
    pub signing_key_id: KeyId,
    /// The announcement of the GCKS's next signing key, if a rollover is under way.
    pub key_rollover: Option<KeyRollover>,
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
        let fixed = if self.version == VERSION_1 {
            FIXED_LEN_V1
        } else {
            FIXED_LEN_V2
        };
        let rollover = if self.key_rollover.is_some() {
            ROLLOVER_LEN
        } else {
            0
        };
        fixed
            + self.fec_info.len()
            + 1
            + self.block_first_keys.len() * BLOCK_KEY_LEN
            + rollover
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

    /// Encodes the manifest and signs it with the GCKS's key. A version 2 manifest's
    /// [`Manifest::signing_key_id`] must be the id of `key`.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, ManifestError> {
        if self.version != VERSION_1 && self.signing_key_id != KeyId::of(&key.verifying_key()) {
            return Err(ManifestError::InvalidField("signing key id"));
        }
        let mut bytes = self.signed_bytes()?;
        let signature = key.sign(&signed_message(&bytes));
        bytes.extend_from_slice(&signature.to_bytes());
        Ok(bytes)
    }

    /// The bytes the signature covers (after [`SIGNATURE_CONTEXT`]): the manifest without
    /// its signature, in its [`Manifest::version`]'s format.
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
        WrapAlgorithm::from_id(self.wrap_algorithm)
            .map_err(|unknown| ManifestError::UnknownAlgorithm("key wrap", unknown.0))?;
        check_block_keys(&self.block_first_keys)?;
        let mut bytes = Vec::with_capacity(self.buffer_len());
        bytes.extend_from_slice(&[
            self.version,
            SIGNATURE_ED25519,
            self.wrap_algorithm,
            self.chunk_auth as u8,
        ]);
        match self.version {
            VERSION_1 => {
                if self.degree != 0
                    || self.signing_key_id != KeyId::UNSTATED
                    || self.key_rollover.is_some()
                {
                    return Err(ManifestError::InvalidField("version 1 identity"));
                }
            }
            VERSION => {
                check_degree(self.degree)?;
                if let Some(rollover) = &self.key_rollover {
                    check_rollover(rollover, self.seq, self.block_first_keys.len())?;
                }
                let flags = if self.key_rollover.is_some() {
                    FLAG_ROLLOVER
                } else {
                    0
                };
                bytes.extend_from_slice(&[self.gkm_algorithm.id(), self.degree, flags, 0]);
                bytes.extend_from_slice(&self.signing_key_id.0);
            }
            other => return Err(ManifestError::UnsupportedVersion(other)),
        }
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
        if let Some(rollover) = &self.key_rollover {
            bytes.extend_from_slice(rollover.next_key.as_bytes());
            bytes.extend_from_slice(&rollover.from_seq.to_be_bytes());
        }
        Ok(bytes)
    }
}

impl<'a> SignedManifest<'a> {
    /// Parses a signed manifest (version 2, or version 1) without checking its signature.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ManifestError> {
        let version = *bytes.first().ok_or(ManifestError::Truncated)?;
        // Version 1 lacks the identity words (bytes 4 to 11 of version 2); everything after
        // them is the same, at an offset.
        let (fixed_len, shift) = match version {
            VERSION_1 => (FIXED_LEN_V1, 0),
            VERSION => (FIXED_LEN_V2, FIXED_LEN_V2 - FIXED_LEN_V1),
            other => return Err(ManifestError::UnsupportedVersion(other)),
        };
        let fixed = bytes.get(..fixed_len).ok_or(ManifestError::Truncated)?;
        if fixed[1] != SIGNATURE_ED25519 {
            return Err(ManifestError::UnknownAlgorithm("signature", fixed[1]));
        }
        let wrap_algorithm = WrapAlgorithm::from_id(fixed[2])
            .map_err(|unknown| ManifestError::UnknownAlgorithm("key wrap", unknown.0))?
            .id();
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
        let (gkm_algorithm, degree, has_rollover, signing_key_id) = if version == VERSION {
            let gkm = GkmAlgorithm::from_id(fixed[4])?;
            check_degree(fixed[5])?;
            if fixed[6] & !FLAG_ROLLOVER != 0 {
                return Err(ManifestError::InvalidField("flags"));
            }
            if fixed[7] != 0 {
                return Err(ManifestError::InvalidField("reserved"));
            }
            let key_id = KeyId([fixed[8], fixed[9], fixed[10], fixed[11]]);
            (gkm, fixed[5], fixed[6] & FLAG_ROLLOVER != 0, key_id)
        } else {
            (GkmAlgorithm::Lkh, 0, false, KeyId::UNSTATED)
        };
        let fec_len = usize::from(fixed[fixed_len - 1]);
        if fec_len == 0 || fec_len > MAX_FEC_INFO_LEN {
            return Err(ManifestError::InvalidField("fec info length"));
        }
        let fec_end = fixed_len + fec_len;
        let block_count = usize::from(*bytes.get(fec_end).ok_or(ManifestError::Truncated)?);
        let keys_start = fec_end + 1;
        let keys_end = keys_start + block_count * BLOCK_KEY_LEN;
        let signed_len = keys_end + if has_rollover { ROLLOVER_LEN } else { 0 };
        let total = signed_len + SIGNATURE_LEN;
        if bytes.len() < total {
            return Err(ManifestError::Truncated);
        }
        if bytes.len() > total {
            return Err(ManifestError::TrailingBytes(bytes.len() - total));
        }
        let u32_at = |at: usize| {
            let at = at + shift;
            u32::from_be_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let u64_at = |at: usize| (u64::from(u32_at(at)) << 32) | u64::from(u32_at(at + 4));
        let chunk_count = u32_at(28);
        if chunk_count == 0 {
            return Err(ManifestError::InvalidField("chunk count"));
        }
        let seq = u64_at(12);
        let mut chunk_root = [0u8; HASH_LEN];
        chunk_root.copy_from_slice(&fixed[40 + shift..56 + shift]);
        // Exactly `total` bytes, checked above, so every slice below is in range.
        let block_first_keys: Vec<u32> = bytes[keys_start..keys_end]
            .chunks_exact(BLOCK_KEY_LEN)
            .map(|key| u32::from_be_bytes([key[0], key[1], key[2], key[3]]))
            .collect();
        check_block_keys(&block_first_keys)?;
        let key_rollover = if has_rollover {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes[keys_end..keys_end + 32]);
            let next_key = VerifyingKey::from_bytes(&key)
                .map_err(|_| ManifestError::InvalidField("next signing key"))?;
            let mut from = [0u8; 8];
            from.copy_from_slice(&bytes[keys_end + 32..signed_len]);
            let rollover = KeyRollover {
                next_key,
                from_seq: u64::from_be_bytes(from),
            };
            check_rollover(&rollover, seq, block_first_keys.len())?;
            Some(rollover)
        } else {
            None
        };
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&bytes[signed_len..]);
        Ok(Self {
            manifest: Manifest {
                version,
                wrap_algorithm,
                chunk_auth,
                gkm_algorithm,
                degree,
                signing_key_id,
                key_rollover,
                group_id: u32_at(4),
                spi: u32_at(8),
                seq,
                epoch: u32_at(20),
                group_size: u32_at(24),
                chunk_count,
                timestamp_us: u64_at(32),
                chunk_root,
                fec_info: bytes[fixed_len..fec_end].to_vec(),
                block_first_keys,
            },
            signed: &bytes[..signed_len],
            signature,
        })
    }
}

/// A version 2 manifest names a degree the key tree allows.
fn check_degree(degree: u8) -> Result<(), ManifestError> {
    crate::lkh::topology::Degree::new(degree)
        .map(|_| ())
        .map_err(|_| ManifestError::InvalidField("tree degree"))
}

/// An announcement takes effect after the message that carries it, in a manifest small enough
/// to stay one datagram.
fn check_rollover(
    rollover: &KeyRollover,
    seq: u64,
    block_count: usize,
) -> Result<(), ManifestError> {
    if rollover.from_seq <= seq {
        return Err(ManifestError::InvalidField("rollover sequence"));
    }
    if block_count > MAX_BLOCKS_WITH_ROLLOVER {
        return Err(ManifestError::InvalidField("block count with rollover"));
    }
    Ok(())
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
            version: VERSION,
            wrap_algorithm: 1,
            chunk_auth: ChunkAuth::MerklePath,
            gkm_algorithm: GkmAlgorithm::Lkh,
            degree: 4,
            signing_key_id: KeyId::of(&key().verifying_key()),
            key_rollover: None,
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

    /// The id of [`key`]'s public key.
    const KEY_ID: [u8; 4] = [0x71, 0x73, 0xf9, 0x60];

    /// The signed bytes of [`manifest`], field by field.
    const SIGNED: [u8; 94] = [
        2, 1, 1, 1, // version, signature, wrap and chunk authentication algorithms
        1, 4, 0, 0, // LKH, degree 4, no flags, reserved
        KEY_ID[0], KEY_ID[1], KEY_ID[2], KEY_ID[3], // signing key id
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
        assert_eq!(bytes.len(), 65 + 12 + 1 + SIGNATURE_LEN);
        assert_eq!(bytes[65 + 12], 0);
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
            65 + MAX_FEC_INFO_LEN + 1 + 4 * 255 + SIGNATURE_LEN
        );
        let room = crate::wire::IPV6_SAFE_DATAGRAM_SIZE
            - crate::wire::datagram::OVERHEAD
            - crate::wire::symbol::FIXED_LEN;
        assert!(bytes.len() <= room, "{} > {room}", bytes.len());
        assert_eq!(SignedManifest::parse(&bytes).unwrap().manifest, largest);
        // With a rollover announcement, the most blocks it allows.
        largest.block_first_keys.truncate(MAX_BLOCKS_WITH_ROLLOVER);
        largest.key_rollover = Some(rollover(largest.seq + 1));
        let bytes = largest.sign(&key()).unwrap();
        assert_eq!(bytes.len(), largest.buffer_len());
        assert!(bytes.len() <= room, "{} > {room}", bytes.len());
        assert_eq!(SignedManifest::parse(&bytes).unwrap().manifest, largest);
        largest.block_first_keys.push(u32::MAX);
        assert_eq!(
            largest.sign(&key()),
            Err(ManifestError::InvalidField("block count with rollover"))
        );
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
        let keys = 65 + 12 + 1;
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
        bad[0] = 3;
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::UnsupportedVersion(3))
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
        bad[64] = 0;
        assert!(SignedManifest::parse(&bad).is_err());
        let mut bad = bytes.clone();
        bad[36..40].fill(0);
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::InvalidField("chunk count"))
        );
        let mut empty_info = manifest();
        empty_info.fec_info.clear();
        assert!(empty_info.sign(&key()).is_err());
    }

    fn rollover(from_seq: u64) -> KeyRollover {
        KeyRollover {
            next_key: SigningKey::from_bytes(&[43; 32]).verifying_key(),
            from_seq,
        }
    }

    /// The signed bytes of [`manifest`] in the version 1 format an older GCKS wrote.
    const SIGNED_V1: [u8; 86] = [
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

    /// A version 1 manifest (an older GCKS's history) still parses, names no degree and no
    /// signing key, and re-encodes to the same bytes.
    #[test]
    fn parses_version_1() {
        let mut bytes = SIGNED_V1.to_vec();
        bytes.extend_from_slice(&[0xEE; SIGNATURE_LEN]);
        let parsed = SignedManifest::parse(&bytes).unwrap();
        let expected = Manifest {
            version: VERSION_1,
            degree: 0,
            signing_key_id: KeyId::UNSTATED,
            ..manifest()
        };
        assert_eq!(parsed.manifest, expected);
        assert_eq!(parsed.signed, &SIGNED_V1[..]);
        assert_eq!(expected.signed_bytes().unwrap(), SIGNED_V1);
        assert_eq!(expected.buffer_len(), bytes.len());
        // Version 1 has no room for the identity words: a version 1 manifest stating them
        // does not encode.
        let stated = Manifest {
            degree: 4,
            ..expected.clone()
        };
        assert_eq!(
            stated.signed_bytes(),
            Err(ManifestError::InvalidField("version 1 identity"))
        );
        for len in 0..bytes.len() {
            assert!(
                SignedManifest::parse(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
    }

    #[test]
    fn rollover_round_trip_and_layout() {
        let mut m = manifest();
        m.key_rollover = Some(rollover(305));
        let bytes = m.sign(&key()).unwrap();
        assert_eq!(bytes[6], FLAG_ROLLOVER);
        let keys_end = SIGNED.len();
        assert_eq!(
            &bytes[keys_end..keys_end + 32],
            SigningKey::from_bytes(&[43; 32]).verifying_key().as_bytes()
        );
        assert_eq!(&bytes[keys_end + 32..keys_end + 40], &305u64.to_be_bytes());
        assert_eq!(bytes.len(), m.buffer_len());
        let parsed = SignedManifest::parse(&bytes).unwrap();
        assert_eq!(parsed.manifest, m);
        assert_eq!(
            parsed.manifest.key_rollover.unwrap().next_key_id(),
            KeyId::of(&SigningKey::from_bytes(&[43; 32]).verifying_key())
        );
        for len in 0..bytes.len() {
            assert!(
                SignedManifest::parse(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
        // The announcement must take effect after the message that carries it.
        m.key_rollover = Some(rollover(300));
        assert_eq!(
            m.sign(&key()),
            Err(ManifestError::InvalidField("rollover sequence"))
        );
        let mut bad = bytes.clone();
        bad[keys_end + 32..keys_end + 40].copy_from_slice(&300u64.to_be_bytes());
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::InvalidField("rollover sequence"))
        );
        // The flag without the announcement's bytes is a truncation.
        let mut flagged = manifest().sign(&key()).unwrap();
        flagged[6] = FLAG_ROLLOVER;
        assert_eq!(
            SignedManifest::parse(&flagged),
            Err(ManifestError::Truncated)
        );
    }

    /// Unknown algorithm ids are typed errors, naming the field and the id.
    #[test]
    fn unknown_algorithm_ids_are_typed_errors() {
        let bytes = manifest().sign(&key()).unwrap();
        let mut bad = bytes.clone();
        bad[2] = 0x7F;
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::UnknownAlgorithm("key wrap", 0x7F))
        );
        let mut bad = bytes.clone();
        bad[4] = 2;
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::UnknownAlgorithm("group key management", 2))
        );
        let mut bad = bytes.clone();
        bad[3] = 9;
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::UnknownAlgorithm("chunk authentication", 9))
        );
        let mut v1 = SIGNED_V1.to_vec();
        v1.extend_from_slice(&[0; SIGNATURE_LEN]);
        v1[2] = 0;
        assert_eq!(
            SignedManifest::parse(&v1),
            Err(ManifestError::UnknownAlgorithm("key wrap", 0))
        );
        let unknown_wrap = Manifest {
            wrap_algorithm: 0x7F,
            ..manifest()
        };
        assert_eq!(
            unknown_wrap.sign(&key()),
            Err(ManifestError::UnknownAlgorithm("key wrap", 0x7F))
        );
        assert_eq!(GkmAlgorithm::from_id(1), Ok(GkmAlgorithm::Lkh));
        assert_eq!(GkmAlgorithm::Lkh.id(), 1);
    }

    #[test]
    fn rejects_bad_identity_words() {
        let bytes = manifest().sign(&key()).unwrap();
        for degree in [0, 1, 17, 255] {
            let mut bad = bytes.clone();
            bad[5] = degree;
            assert_eq!(
                SignedManifest::parse(&bad),
                Err(ManifestError::InvalidField("tree degree")),
                "degree {degree}"
            );
        }
        let mut bad = bytes.clone();
        bad[6] = 2;
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::InvalidField("flags"))
        );
        let mut bad = bytes.clone();
        bad[7] = 1;
        assert_eq!(
            SignedManifest::parse(&bad),
            Err(ManifestError::InvalidField("reserved"))
        );
        // A manifest must name the key that signs it.
        let other = SigningKey::from_bytes(&[44; 32]);
        assert_eq!(
            manifest().sign(&other),
            Err(ManifestError::InvalidField("signing key id"))
        );
        let mut low = manifest();
        low.degree = 1;
        assert_eq!(
            low.sign(&key()),
            Err(ManifestError::InvalidField("tree degree"))
        );
    }

    proptest! {
        #[test]
        fn round_trip(seq: u64, epoch: u32, group_size: u32, chunk_count in 1u32.., spi: u32,
                      timestamp_us: u64, root: [u8; 16], signature_chunks: bool,
                      fec_info in proptest::collection::vec(any::<u8>(), 1..=MAX_FEC_INFO_LEN),
                      mut block_first_keys in proptest::collection::vec(any::<u32>(), 0..=MAX_BLOCKS)) {
            block_first_keys.sort_unstable();
            let manifest = Manifest {
                version: VERSION,
                wrap_algorithm: 1,
                chunk_auth: if signature_chunks { ChunkAuth::Signature } else { ChunkAuth::MerklePath },
                gkm_algorithm: GkmAlgorithm::Lkh,
                degree: 2 + (epoch % 15) as u8,
                signing_key_id: KeyId::of(&key().verifying_key()),
                key_rollover: None,
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
