//! The chunk container: one FEC source symbol of a rekey message, serving a range of leaves.
//!
//! A chunk carries everything a contiguous range of leaves needs from one message (their
//! wrapped path keys and the new Data SA; the payload's own layout belongs to the message
//! layout), and authenticates itself, so a member checks its own chunk and nothing else: by a
//! Merkle path to the root the signed manifest carries, or by its own Ed25519 signature. Chunks
//! are numbered in leaf order, so a member whose chunk was lost can tell from its neighbours
//! which index (and so which FEC block) holds it.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                   sequence number (64 bits)                   |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                          chunk index                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     first leaf served                         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     last leaf served                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      payload length P         |  payload (P bytes) ...        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | Merkle: path length n, then n 16-byte hashes                  |
//! | or signature: 64-byte Ed25519 signature                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   zero padding to the symbol size ...                         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The authenticated bytes are the header and payload (everything before the authenticator);
//! the Merkle leaf and the signed message are those bytes, the latter prefixed with
//! [`SIGNATURE_CONTEXT`]. Padding must be zero, so a chunk has exactly one encoding.

use ed25519_dalek::{Signer, SigningKey};

use super::manifest::{ChunkAuth, SIGNATURE_LEN};
use crate::auth::merkle::{Digest, HASH_LEN};

/// Length of the chunk header (everything before the payload).
pub const HEADER_LEN: usize = 22;
/// The context every chunk signature covers before the chunk's bytes.
pub const SIGNATURE_CONTEXT: &[u8] = b"rekeycast chunk v1\0";
/// The longest Merkle path a chunk may carry (enough for 2^32 chunks).
pub const MAX_PATH_LEN: usize = 32;

/// What can be wrong with a chunk's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The bytes end early.
    #[error("chunk truncated")]
    Truncated,
    /// A field holds a value its format forbids.
    #[error("invalid chunk field {0}")]
    InvalidField(&'static str),
    /// Padding after the authenticator is not zero.
    #[error("chunk padding is not zero")]
    NonZeroPadding,
    /// The chunk does not fit the symbol size.
    #[error("chunk of {needed} bytes does not fit a {symbol_size}-byte symbol")]
    TooLarge {
        /// Bytes the chunk needs.
        needed: usize,
        /// The symbol size.
        symbol_size: usize,
    },
}

/// How a chunk proves it belongs to its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticator {
    /// The path from the chunk to the Merkle root in the manifest.
    MerklePath(Vec<Digest>),
    /// The GCKS's Ed25519 signature over the chunk.
    Signature([u8; SIGNATURE_LEN]),
}

impl Authenticator {
    /// Bytes the authenticator takes in a chunk.
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::MerklePath(path) => 1 + path.len() * HASH_LEN,
            Self::Signature(_) => SIGNATURE_LEN,
        }
    }
}

/// The header fields of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkHeader {
    /// The message's sequence number.
    pub seq: u64,
    /// The chunk's index in the message (its FEC source symbol number across blocks).
    pub index: u32,
    /// The first leaf the chunk serves.
    pub first_leaf: u32,
    /// The last leaf the chunk serves (inclusive).
    pub last_leaf: u32,
}

impl ChunkHeader {
    /// Whether the chunk serves `leaf`.
    pub fn serves(&self, leaf: u32) -> bool {
        (self.first_leaf..=self.last_leaf).contains(&leaf)
    }
}

/// A chunk as received, parsed but not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedChunk<'a> {
    /// The header.
    pub header: ChunkHeader,
    /// The payload (wrapped keys; its layout belongs to the message layout).
    pub payload: &'a [u8],
    /// The authenticated bytes: header and payload.
    pub authenticated: &'a [u8],
    /// The authenticator.
    pub authenticator: Authenticator,
}

impl<'a> SignedChunk<'a> {
    /// Parses a chunk (a whole source symbol, padding included) whose message authenticates
    /// chunks by `auth`.
    pub fn parse(bytes: &'a [u8], auth: ChunkAuth) -> Result<Self, ChunkError> {
        let header_bytes = bytes.get(..HEADER_LEN).ok_or(ChunkError::Truncated)?;
        let u32_at = |at: usize| {
            u32::from_be_bytes([
                header_bytes[at],
                header_bytes[at + 1],
                header_bytes[at + 2],
                header_bytes[at + 3],
            ])
        };
        let header = ChunkHeader {
            seq: (u64::from(u32_at(0)) << 32) | u64::from(u32_at(4)),
            index: u32_at(8),
            first_leaf: u32_at(12),
            last_leaf: u32_at(16),
        };
        if header.last_leaf < header.first_leaf {
            return Err(ChunkError::InvalidField("leaf range"));
        }
        let payload_len = usize::from(u16::from_be_bytes([header_bytes[20], header_bytes[21]]));
        let auth_start = HEADER_LEN + payload_len;
        let payload = bytes
            .get(HEADER_LEN..auth_start)
            .ok_or(ChunkError::Truncated)?;
        let (authenticator, end) = match auth {
            ChunkAuth::MerklePath => {
                let count = usize::from(*bytes.get(auth_start).ok_or(ChunkError::Truncated)?);
                if count > MAX_PATH_LEN {
                    return Err(ChunkError::InvalidField("path length"));
                }
                let end = auth_start + 1 + count * HASH_LEN;
                let hashes = bytes
                    .get(auth_start + 1..end)
                    .ok_or(ChunkError::Truncated)?;
                let path = hashes
                    .chunks_exact(HASH_LEN)
                    .map(|hash| {
                        let mut digest = [0u8; HASH_LEN];
                        digest.copy_from_slice(hash);
                        digest
                    })
                    .collect();
                (Authenticator::MerklePath(path), end)
            }
            ChunkAuth::Signature => {
                let end = auth_start + SIGNATURE_LEN;
                let signature = bytes.get(auth_start..end).ok_or(ChunkError::Truncated)?;
                let mut array = [0u8; SIGNATURE_LEN];
                array.copy_from_slice(signature);
                (Authenticator::Signature(array), end)
            }
        };
        if bytes[end..].iter().any(|&b| b != 0) {
            return Err(ChunkError::NonZeroPadding);
        }
        Ok(Self {
            header,
            payload,
            authenticated: &bytes[..auth_start],
            authenticator,
        })
    }
}

/// Writes the authenticated part of a chunk (header and payload) into a new buffer.
pub fn encode_authenticated(header: &ChunkHeader, payload: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let payload_len =
        u16::try_from(payload.len()).map_err(|_| ChunkError::InvalidField("payload length"))?;
    if header.last_leaf < header.first_leaf {
        return Err(ChunkError::InvalidField("leaf range"));
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + SIGNATURE_LEN);
    bytes.extend_from_slice(&header.seq.to_be_bytes());
    bytes.extend_from_slice(&header.index.to_be_bytes());
    bytes.extend_from_slice(&header.first_leaf.to_be_bytes());
    bytes.extend_from_slice(&header.last_leaf.to_be_bytes());
    bytes.extend_from_slice(&payload_len.to_be_bytes());
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

/// Appends `authenticator` to the authenticated bytes of a chunk and pads it with zeros to
/// `symbol_size`.
pub fn finish(
    mut authenticated: Vec<u8>,
    authenticator: &Authenticator,
    symbol_size: usize,
) -> Result<Vec<u8>, ChunkError> {
    let needed = authenticated.len() + authenticator.buffer_len();
    if needed > symbol_size {
        return Err(ChunkError::TooLarge {
            needed,
            symbol_size,
        });
    }
    match authenticator {
        Authenticator::MerklePath(path) => {
            let count =
                u8::try_from(path.len()).map_err(|_| ChunkError::InvalidField("path length"))?;
            if path.len() > MAX_PATH_LEN {
                return Err(ChunkError::InvalidField("path length"));
            }
            authenticated.push(count);
            for hash in path {
                authenticated.extend_from_slice(hash);
            }
        }
        Authenticator::Signature(signature) => authenticated.extend_from_slice(signature),
    }
    authenticated.resize(symbol_size, 0);
    Ok(authenticated)
}

/// Signs the authenticated bytes of a chunk.
pub fn sign(key: &SigningKey, authenticated: &[u8]) -> [u8; SIGNATURE_LEN] {
    key.sign(&signed_message(authenticated)).to_bytes()
}

/// The message a chunk signature covers: the context, then the authenticated bytes.
pub(crate) fn signed_message(authenticated: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + authenticated.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(authenticated);
    message
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header() -> ChunkHeader {
        ChunkHeader {
            seq: 7,
            index: 3,
            first_leaf: 100,
            last_leaf: 119,
        }
    }

    #[test]
    fn test_emit_and_parse_merkle() {
        let authenticated = encode_authenticated(&header(), b"wraps").unwrap();
        assert_eq!(
            &authenticated[..HEADER_LEN],
            &[0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 100, 0, 0, 0, 119, 0, 5]
        );
        let path = vec![[1u8; HASH_LEN], [2u8; HASH_LEN]];
        let chunk = finish(
            authenticated.clone(),
            &Authenticator::MerklePath(path.clone()),
            128,
        )
        .unwrap();
        assert_eq!(chunk.len(), 128);
        assert_eq!(chunk[27], 2);
        let parsed = SignedChunk::parse(&chunk, ChunkAuth::MerklePath).unwrap();
        assert_eq!(parsed.header, header());
        assert_eq!(parsed.payload, b"wraps");
        assert_eq!(parsed.authenticated, &authenticated[..]);
        assert_eq!(parsed.authenticator, Authenticator::MerklePath(path));
        assert!(parsed.header.serves(119) && !parsed.header.serves(120));
    }

    #[test]
    fn test_emit_and_parse_signature() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let authenticated = encode_authenticated(&header(), b"wraps").unwrap();
        let signature = sign(&key, &authenticated);
        let chunk = finish(authenticated, &Authenticator::Signature(signature), 100).unwrap();
        let parsed = SignedChunk::parse(&chunk, ChunkAuth::Signature).unwrap();
        assert_eq!(parsed.authenticator, Authenticator::Signature(signature));
    }

    #[test]
    fn truncation_and_padding_are_checked() {
        let authenticated = encode_authenticated(&header(), b"wraps").unwrap();
        let exact_len = authenticated.len() + 1 + HASH_LEN;
        let chunk = finish(
            authenticated,
            &Authenticator::MerklePath(vec![[9; HASH_LEN]]),
            exact_len,
        )
        .unwrap();
        for len in 0..chunk.len() {
            assert!(
                SignedChunk::parse(&chunk[..len], ChunkAuth::MerklePath).is_err(),
                "prefix {len}"
            );
        }
        let mut padded = chunk.clone();
        padded.push(1);
        assert_eq!(
            SignedChunk::parse(&padded, ChunkAuth::MerklePath),
            Err(ChunkError::NonZeroPadding)
        );
    }

    #[test]
    fn rejects_what_does_not_fit_or_is_inconsistent() {
        let authenticated = encode_authenticated(&header(), &[0; 50]).unwrap();
        assert_eq!(
            finish(authenticated, &Authenticator::Signature([0; 64]), 100),
            Err(ChunkError::TooLarge {
                needed: 136,
                symbol_size: 100
            })
        );
        let mut backwards = header();
        backwards.last_leaf = 99;
        assert!(encode_authenticated(&backwards, b"").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(seq: u64, index: u32, first in 0u32..1000, span in 0u32..1000,
                      payload in proptest::collection::vec(any::<u8>(), 0..300),
                      path_len in 0usize..20, signature: bool, slack in 0usize..50) {
            let header = ChunkHeader { seq, index, first_leaf: first, last_leaf: first + span };
            let authenticated = encode_authenticated(&header, &payload).unwrap();
            let (auth, authenticator) = if signature {
                (ChunkAuth::Signature, Authenticator::Signature([7; 64]))
            } else {
                (ChunkAuth::MerklePath, Authenticator::MerklePath(vec![[3; HASH_LEN]; path_len]))
            };
            let size = authenticated.len() + authenticator.buffer_len() + slack;
            let chunk = finish(authenticated, &authenticator, size).unwrap();
            let parsed = SignedChunk::parse(&chunk, auth).unwrap();
            prop_assert_eq!(parsed.header, header);
            prop_assert_eq!(parsed.payload, &payload[..]);
            prop_assert_eq!(parsed.authenticator, authenticator);
        }

        #[test]
        fn parse_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200), signature: bool) {
            let auth = if signature { ChunkAuth::Signature } else { ChunkAuth::MerklePath };
            let _ = SignedChunk::parse(&bytes, auth);
        }
    }
}
