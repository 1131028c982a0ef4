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
//! | or group: log2 group size k, path length n, n 16-byte hashes, |
//! |           then the group's 64-byte Ed25519 signature          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   zero padding to the symbol size ...                         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The authenticated bytes are the header and payload (everything before the authenticator);
//! the Merkle leaf and the signed message are those bytes, the latter prefixed with
//! [`SIGNATURE_CONTEXT`]. Padding must be zero, so a chunk has exactly one encoding.
//!
//! A signature group ([`ChunkAuth::GroupSignature`]) is a run of `2^k` consecutive chunks
//! (group `g` holds the chunks `g * 2^k ..`, the last group of a message possibly fewer): a
//! small BLAKE3 Merkle tree ([`crate::auth::merkle`]) over their authenticated bytes, whose root
//! the GCKS signs once ([`group_signed_message`]). Each chunk of the group carries `k`, its path
//! in that tree and the group's signature, so a member still checks one signature for its own
//! chunk, and the GCKS signs `2^k` times fewer.

use ed25519_dalek::{Signer, SigningKey};

use super::manifest::{ChunkAuth, SIGNATURE_LEN};
use crate::auth::merkle::{Digest, MerkleTree, HASH_LEN};

/// Length of the chunk header (everything before the payload).
pub const HEADER_LEN: usize = 22;
/// The context every chunk signature covers before the chunk's bytes.
pub const SIGNATURE_CONTEXT: &[u8] = b"rekeycast chunk v1\0";
/// The longest Merkle path a chunk may carry (enough for 2^32 chunks).
pub const MAX_PATH_LEN: usize = 32;
/// The context every group signature covers before the group's fields and root.
pub const GROUP_SIGNATURE_CONTEXT: &[u8] = b"rekeycast chunk group v1\0";
/// The largest `k` of a signature group of `2^k` chunks (a group index and a position in it
/// then still fit the 32-bit chunk index).
pub const MAX_GROUP_LOG2: u8 = 31;
/// The `k` of the signature groups of `2^k` chunks the GCKS builds in
/// [`ChunkAuth::GroupSignature`] mode: groups of 8, chosen from the `auth` benchmark's options
/// table at N = 2^16 and 2^20 (see [`ChunkAuth`]).
pub const DEFAULT_GROUP_LOG2: u8 = 3;

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
    /// The chunk's path in its signature group's Merkle tree, and the GCKS's signature over
    /// that tree's root.
    GroupSignature {
        /// `k`: the group holds `2^k` chunks (the message's last group possibly fewer).
        log2_group: u8,
        /// Sibling hashes from the chunk up to the group's root.
        path: Vec<Digest>,
        /// The GCKS's Ed25519 signature over [`group_signed_message`].
        signature: [u8; SIGNATURE_LEN],
    },
}

impl Authenticator {
    /// Bytes the authenticator takes in a chunk.
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::MerklePath(path) => 1 + path.len() * HASH_LEN,
            Self::Signature(_) => SIGNATURE_LEN,
            Self::GroupSignature { path, .. } => group_authenticator_len(path.len()),
        }
    }
}

/// Bytes a group authenticator with a path of `path_len` hashes takes: `k`, the path length,
/// the path and the signature.
pub const fn group_authenticator_len(path_len: usize) -> usize {
    2 + path_len * HASH_LEN + SIGNATURE_LEN
}

/// Where a chunk sits among the signature groups of a message of `chunk_count` chunks grouped
/// by `2^log2_group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupPosition {
    /// The group's number.
    pub group: u32,
    /// The chunk's position in its group (its leaf in the group's tree).
    pub position: u32,
    /// The number of chunks in the group.
    pub len: u32,
}

impl GroupPosition {
    /// The position of chunk `index`, or `None` when `index` is not below `chunk_count` or
    /// `log2_group` exceeds [`MAX_GROUP_LOG2`].
    pub fn of(index: u32, chunk_count: u32, log2_group: u8) -> Option<Self> {
        if index >= chunk_count || log2_group > MAX_GROUP_LOG2 {
            return None;
        }
        let group = index >> log2_group;
        let start = group << log2_group;
        let full = 1u32 << log2_group;
        Some(Self {
            group,
            position: index - start,
            len: full.min(chunk_count - start),
        })
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
                (Authenticator::MerklePath(read_path(hashes)), end)
            }
            ChunkAuth::Signature => {
                let end = auth_start + SIGNATURE_LEN;
                let signature = bytes.get(auth_start..end).ok_or(ChunkError::Truncated)?;
                let mut array = [0u8; SIGNATURE_LEN];
                array.copy_from_slice(signature);
                (Authenticator::Signature(array), end)
            }
            ChunkAuth::GroupSignature => {
                let fields = bytes
                    .get(auth_start..auth_start + 2)
                    .ok_or(ChunkError::Truncated)?;
                let (log2_group, count) = (fields[0], usize::from(fields[1]));
                if log2_group > MAX_GROUP_LOG2 {
                    return Err(ChunkError::InvalidField("group size"));
                }
                // A group of 2^k chunks has paths of at most k hashes.
                if count > usize::from(log2_group) {
                    return Err(ChunkError::InvalidField("path length"));
                }
                let path_start = auth_start + 2;
                let signature_start = path_start + count * HASH_LEN;
                let end = signature_start + SIGNATURE_LEN;
                let hashes = bytes
                    .get(path_start..signature_start)
                    .ok_or(ChunkError::Truncated)?;
                let signature = bytes
                    .get(signature_start..end)
                    .ok_or(ChunkError::Truncated)?;
                let mut array = [0u8; SIGNATURE_LEN];
                array.copy_from_slice(signature);
                (
                    Authenticator::GroupSignature {
                        log2_group,
                        path: read_path(hashes),
                        signature: array,
                    },
                    end,
                )
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
        Authenticator::GroupSignature {
            log2_group,
            path,
            signature,
        } => {
            if *log2_group > MAX_GROUP_LOG2 {
                return Err(ChunkError::InvalidField("group size"));
            }
            if path.len() > usize::from(*log2_group) {
                return Err(ChunkError::InvalidField("path length"));
            }
            authenticated.push(*log2_group);
            // At most MAX_GROUP_LOG2 hashes, checked above.
            authenticated.push(path.len() as u8);
            for hash in path {
                authenticated.extend_from_slice(hash);
            }
            authenticated.extend_from_slice(signature);
        }
    }
    authenticated.resize(symbol_size, 0);
    Ok(authenticated)
}

/// The message a group signature covers: [`GROUP_SIGNATURE_CONTEXT`], then the sequence
/// number, `k`, the group's number and chunk count (all big-endian), then the root of the
/// group's Merkle tree. Binding `k` and the count fixes how a path is read: a signature cannot
/// be replayed for another grouping, group or message.
pub fn group_signed_message(
    seq: u64,
    log2_group: u8,
    group: u32,
    group_len: u32,
    root: &Digest,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(GROUP_SIGNATURE_CONTEXT.len() + 17 + HASH_LEN);
    message.extend_from_slice(GROUP_SIGNATURE_CONTEXT);
    message.extend_from_slice(&seq.to_be_bytes());
    message.push(log2_group);
    message.extend_from_slice(&group.to_be_bytes());
    message.extend_from_slice(&group_len.to_be_bytes());
    message.extend_from_slice(root);
    message
}

/// Authenticates the chunks `first_index ..` of message `seq` (their authenticated bytes, in
/// index order, `first_index` a multiple of `2^log2_group`) in signature groups of
/// `2^log2_group`, `chunk_count` chunks in the whole message: one signature per group, and each
/// chunk finished with its path and its group's signature and padded to `symbol_size`.
///
/// The chunks given must be whole groups, except that the message's last group may be short;
/// so any run of groups can be authenticated on its own (a worker per run, or a run as soon as
/// its chunks are final) and the bytes are the same as authenticating all at once.
pub fn authenticate_groups(
    authenticated: Vec<Vec<u8>>,
    first_index: u32,
    chunk_count: u32,
    seq: u64,
    log2_group: u8,
    key: &SigningKey,
    symbol_size: usize,
) -> Result<Vec<Vec<u8>>, ChunkError> {
    let mut chunks = Vec::with_capacity(authenticated.len());
    let mut rest = authenticated.into_iter().peekable();
    let mut index = first_index;
    while rest.peek().is_some() {
        let position = GroupPosition::of(index, chunk_count, log2_group)
            .ok_or(ChunkError::InvalidField("chunk index"))?;
        if position.position != 0 {
            return Err(ChunkError::InvalidField("group start"));
        }
        let members: Vec<Vec<u8>> = rest.by_ref().take(position.len as usize).collect();
        if members.len() != position.len as usize {
            return Err(ChunkError::InvalidField("group length"));
        }
        let tree = MerkleTree::build(members.iter().map(Vec::as_slice))
            .map_err(|_| ChunkError::InvalidField("group length"))?;
        let root = tree.root();
        let message = group_signed_message(seq, log2_group, position.group, position.len, &root);
        let signature = key.sign(&message).to_bytes();
        for (leaf, bytes) in members.into_iter().enumerate() {
            let path = tree.proof(leaf).unwrap_or_default();
            chunks.push(finish(
                bytes,
                &Authenticator::GroupSignature {
                    log2_group,
                    path,
                    signature,
                },
                symbol_size,
            )?);
        }
        index = index.saturating_add(position.len);
    }
    Ok(chunks)
}

/// The fewest signature groups a thread of [`authenticate_groups_on_threads`] is given: a
/// group costs about one signature and `2^k` leaf hashes (some 40 us at k = 4), and starting a
/// thread tens of microseconds.
const MIN_GROUPS_PER_THREAD: usize = 4;

/// [`authenticate_groups`] over a whole message (`authenticated` holds all of its chunks), on
/// up to `threads` threads, each over a contiguous run of whole groups. The bytes do not depend
/// on the thread count (Ed25519 signatures are deterministic).
pub fn authenticate_groups_on_threads(
    authenticated: Vec<Vec<u8>>,
    chunk_count: u32,
    seq: u64,
    log2_group: u8,
    key: &SigningKey,
    symbol_size: usize,
    threads: usize,
) -> Result<Vec<Vec<u8>>, ChunkError> {
    if log2_group > MAX_GROUP_LOG2 {
        return Err(ChunkError::InvalidField("group size"));
    }
    let group_len = 1usize << log2_group;
    let groups = authenticated.len().div_ceil(group_len);
    let threads = threads.min(groups.div_ceil(MIN_GROUPS_PER_THREAD)).max(1);
    if threads == 1 {
        return authenticate_groups(
            authenticated,
            0,
            chunk_count,
            seq,
            log2_group,
            key,
            symbol_size,
        );
    }
    let per_thread = groups.div_ceil(threads) * group_len;
    let mut runs = Vec::with_capacity(threads);
    let mut rest = authenticated;
    let mut first = 0u32;
    while !rest.is_empty() {
        let tail = rest.split_off(per_thread.min(rest.len()));
        let len = u32::try_from(rest.len()).map_err(|_| ChunkError::InvalidField("chunk index"))?;
        runs.push((first, rest));
        first = first.saturating_add(len);
        rest = tail;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .into_iter()
            .map(|(first, run)| {
                scope.spawn(move || {
                    authenticate_groups(run, first, chunk_count, seq, log2_group, key, symbol_size)
                })
            })
            .collect();
        let mut chunks = Vec::new();
        for handle in handles {
            match handle.join() {
                Ok(run) => chunks.extend(run?),
                // Signing does not panic; if it ever did, the panic goes on to the caller as
                // it would have single-threaded.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(chunks)
    })
}

fn read_path(hashes: &[u8]) -> Vec<Digest> {
    hashes
        .chunks_exact(HASH_LEN)
        .map(|hash| {
            let mut digest = [0u8; HASH_LEN];
            digest.copy_from_slice(hash);
            digest
        })
        .collect()
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

    #[test]
    fn test_emit_and_parse_group_signature() {
        let authenticated = encode_authenticated(&header(), b"wraps").unwrap();
        let authenticator = Authenticator::GroupSignature {
            log2_group: 4,
            path: vec![[1u8; HASH_LEN], [2u8; HASH_LEN]],
            signature: [9; SIGNATURE_LEN],
        };
        assert_eq!(authenticator.buffer_len(), 2 + 32 + 64);
        let chunk = finish(authenticated.clone(), &authenticator, 140).unwrap();
        // k, then the path length, then the path, then the signature.
        assert_eq!(&chunk[27..30], &[4, 2, 1]);
        assert_eq!(chunk[27 + 2 + 32], 9);
        let parsed = SignedChunk::parse(&chunk, ChunkAuth::GroupSignature).unwrap();
        assert_eq!(parsed.authenticator, authenticator);
        assert_eq!(parsed.authenticated, &authenticated[..]);
        for len in 0..27 + authenticator.buffer_len() {
            assert_eq!(
                SignedChunk::parse(&chunk[..len], ChunkAuth::GroupSignature).err(),
                Some(ChunkError::Truncated),
                "prefix {len}"
            );
        }
        // A path longer than k hashes cannot belong to a group of 2^k chunks.
        let too_long = Authenticator::GroupSignature {
            log2_group: 1,
            path: vec![[1u8; HASH_LEN]; 2],
            signature: [9; SIGNATURE_LEN],
        };
        assert!(finish(authenticated, &too_long, 200).is_err());
    }

    #[test]
    fn group_positions() {
        let at = |index, count, k| GroupPosition::of(index, count, k);
        assert_eq!(
            at(17, 40, 4),
            Some(GroupPosition {
                group: 1,
                position: 1,
                len: 16
            })
        );
        assert_eq!(
            at(33, 40, 4),
            Some(GroupPosition {
                group: 2,
                position: 1,
                len: 8
            })
        );
        assert_eq!(at(40, 40, 4), None);
        assert_eq!(at(0, 1, 32), None);
        assert_eq!(
            at(u32::MAX - 1, u32::MAX, 31),
            Some(GroupPosition {
                group: 1,
                position: (1 << 31) - 2,
                len: (1 << 31) - 1
            })
        );
    }

    #[test]
    fn group_authentication_is_the_same_bytes_in_runs_and_on_threads() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let authenticated: Vec<Vec<u8>> = (0..300u32)
            .map(|index| {
                let header = ChunkHeader {
                    seq: 7,
                    index,
                    first_leaf: index,
                    last_leaf: index,
                };
                encode_authenticated(&header, &index.to_be_bytes()).unwrap()
            })
            .collect();
        let whole = authenticate_groups(authenticated.clone(), 0, 300, 7, 3, &key, 160).unwrap();
        assert_eq!(whole.len(), 300);
        // Runs of whole groups, the last one short.
        let mut runs =
            authenticate_groups(authenticated[..64].to_vec(), 0, 300, 7, 3, &key, 160).unwrap();
        runs.extend(
            authenticate_groups(authenticated[64..].to_vec(), 64, 300, 7, 3, &key, 160).unwrap(),
        );
        assert_eq!(runs, whole);
        for threads in [1, 2, 3, 16] {
            let threaded = authenticate_groups_on_threads(
                authenticated.clone(),
                300,
                7,
                3,
                &key,
                160,
                threads,
            )
            .unwrap();
            assert_eq!(threaded, whole, "{threads} threads");
        }
        // A run that does not start a group, or ends inside one that is not the last, is refused.
        assert_eq!(
            authenticate_groups(authenticated[4..].to_vec(), 4, 300, 7, 3, &key, 160),
            Err(ChunkError::InvalidField("group start"))
        );
        assert_eq!(
            authenticate_groups(authenticated[..12].to_vec(), 0, 300, 7, 3, &key, 160),
            Err(ChunkError::InvalidField("group length"))
        );
    }

    proptest! {
        #[test]
        fn round_trip(seq: u64, index: u32, first in 0u32..1000, span in 0u32..1000,
                      payload in proptest::collection::vec(any::<u8>(), 0..300),
                      path_len in 0usize..20, signature: bool, slack in 0usize..50) {
            let header = ChunkHeader { seq, index, first_leaf: first, last_leaf: first + span };
            let authenticated = encode_authenticated(&header, &payload).unwrap();
            let (auth, authenticator) = match (signature, path_len % 3) {
                (true, 0) => (
                    ChunkAuth::GroupSignature,
                    Authenticator::GroupSignature {
                        log2_group: path_len as u8,
                        path: vec![[3; HASH_LEN]; path_len / 2],
                        signature: [7; 64],
                    },
                ),
                (true, _) => (ChunkAuth::Signature, Authenticator::Signature([7; 64])),
                (false, _) => {
                    (ChunkAuth::MerklePath, Authenticator::MerklePath(vec![[3; HASH_LEN]; path_len]))
                }
            };
            let size = authenticated.len() + authenticator.buffer_len() + slack;
            let chunk = finish(authenticated, &authenticator, size).unwrap();
            let parsed = SignedChunk::parse(&chunk, auth).unwrap();
            prop_assert_eq!(parsed.header, header);
            prop_assert_eq!(parsed.payload, &payload[..]);
            prop_assert_eq!(parsed.authenticator, authenticator);
        }

        #[test]
        fn parse_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200), mode in 0u8..3) {
            let auth = match mode {
                0 => ChunkAuth::MerklePath,
                1 => ChunkAuth::Signature,
                _ => ChunkAuth::GroupSignature,
            };
            let _ = SignedChunk::parse(&bytes, auth);
        }
    }
}
