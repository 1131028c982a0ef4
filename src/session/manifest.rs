//! The manifest of a rekey message: what a member must know before it can use a chunk.
//!
//! The manifest is small and signed once by the GCKS (RFC 4046 5.2: source authentication of
//! rekey messages). It fits one datagram whatever the group's size: it names the message
//! (group, SPI, epoch, sequence number), the algorithms, the exact group size (the input of
//! every member's NACK backoff), the FEC parameters of the chunk object (opaque here, parsed by
//! `rekeycast-fec`), the chunk count and the root that chunks authenticate against.
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
/// The context every manifest signature covers before the manifest's bytes, so a manifest
/// signature can never be taken for a signature over anything else the GCKS signs.
pub const SIGNATURE_CONTEXT: &[u8] = b"rekeycast manifest v1\0";

const FIXED_LEN: usize = 57;

/// How the chunks of a message authenticate themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ChunkAuth {
    /// Each chunk carries its path to the Merkle root in the manifest.
    MerklePath = 1,
    /// Each chunk carries its own Ed25519 signature.
    Signature = 2,
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
        FIXED_LEN + self.fec_info.len() + SIGNATURE_LEN
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
        let signed_len = FIXED_LEN + fec_len;
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
                fec_info: bytes[FIXED_LEN..signed_len].to_vec(),
            },
            signed: &bytes[..signed_len],
            signature,
        })
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
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42; 32])
    }

    #[test]
    fn test_emit_and_parse() {
        let bytes = manifest().sign(&key()).unwrap();
        assert_eq!(bytes.len(), 57 + 12 + 64);
        assert_eq!(&bytes[..8], &[1, 1, 1, 1, 0x0A, 0x0B, 0x0C, 0x0D]);
        assert_eq!(&bytes[12..20], &300u64.to_be_bytes());
        assert_eq!(bytes[56], 12);
        let parsed = SignedManifest::parse(&bytes).unwrap();
        assert_eq!(parsed.manifest, manifest());
        assert_eq!(parsed.signed, &bytes[..69]);
        assert_eq!(&parsed.signature[..], &bytes[69..]);
    }

    #[test]
    fn fits_one_ipv6_safe_datagram() {
        let mut largest = manifest();
        largest.fec_info = vec![0; MAX_FEC_INFO_LEN];
        assert!(largest.buffer_len() + 45 + 7 <= crate::wire::IPV6_SAFE_DATAGRAM_SIZE);
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
        bad[3] = 3;
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
                      fec_info in proptest::collection::vec(any::<u8>(), 1..=MAX_FEC_INFO_LEN)) {
            let manifest = Manifest {
                wrap_algorithm: 1,
                chunk_auth: if signature_chunks { ChunkAuth::Signature } else { ChunkAuth::MerklePath },
                group_id: 3, spi, seq, epoch, group_size, chunk_count, timestamp_us,
                chunk_root: root, fec_info,
            };
            let bytes = manifest.sign(&key()).unwrap();
            let parsed = SignedManifest::parse(&bytes).unwrap();
            prop_assert_eq!(parsed.manifest, manifest);
        }

        #[test]
        fn parse_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = SignedManifest::parse(&bytes);
        }
    }
}
