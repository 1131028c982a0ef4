//! User-oriented layout of a rekey message: the wraps of a batch packed into chunks that each
//! fit one FEC symbol, so that every member needs exactly one chunk (Zhang, Lam, Lee, Yang's
//! user-oriented key assignment; ALGORITHMS.md "UKA").
//!
//! Leaves are walked left to right; a chunk collects the wraps each next leaf needs (its path
//! to the root, skipping wraps the chunk already holds) until the next leaf's wraps no longer
//! fit. Wraps near the root therefore repeat in every chunk: [`Layout::duplication`] reports
//! that cost. A chunk names its leaf range by order keys ([`Degree::order_key`]), which do not
//! change when a leaf is split, so a member finds its chunk by its own leaf's order key.
//!
//! Chunk payload layout (inside the chunk container of [`super::chunk`]):
//!
//! ```text
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |        wrap count n           |  n wraps, 64 bytes each ...   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   the wrapped Data SA (60 bytes) ...                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use std::collections::HashSet;

use super::chunk::{self, ChunkHeader};
use super::manifest::{ChunkAuth, SIGNATURE_LEN};
use crate::auth::merkle::HASH_LEN;
use crate::auth::message::Chunk;
use crate::auth::Verified;
use crate::gsa::{WrappedDataSa, WRAPPED_DATA_SA_LEN};
use crate::lkh::{Degree, NodeId, RekeyBatch, Wrap, WrapError, WRAP_LEN};

/// Bytes of the wrap count that starts a payload.
const COUNT_LEN: usize = 2;

/// The fewest chunks a signing thread is given. Starting a thread costs tens of microseconds
/// and a signature about 15, so a thread with fewer chunks would slow a small message down
/// (measured: 19 chunks signed on 2 threads took longer than on 1).
const MIN_CHUNKS_PER_THREAD: usize = 32;

/// What can go wrong while laying out a message or reading a chunk's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// One leaf's wraps alone do not fit a chunk of this symbol size.
    #[error("a leaf needs {needed} bytes of wraps, a chunk holds {available}")]
    SymbolTooSmall {
        /// Bytes the leaf's wraps need.
        needed: usize,
        /// Bytes a chunk has for wraps.
        available: usize,
    },
    /// The batch has no leaves to serve.
    #[error("no leaves to serve")]
    NoLeaves,
    /// More chunks than a 32-bit index can name.
    #[error("too many chunks")]
    TooManyChunks,
    /// A payload's length does not match its wrap count.
    #[error("malformed chunk payload")]
    MalformedPayload,
    /// A wrap or the Data SA in a payload does not parse.
    #[error("malformed wrap: {0}")]
    Wrap(WrapError),
}

/// A laid-out message: each chunk's header and payload, before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The chunks in leaf order.
    pub chunks: Vec<(ChunkHeader, Vec<u8>)>,
    /// Bytes of the distinct wraps of the batch.
    pub distinct_wrap_bytes: usize,
    /// Bytes of wraps in all chunks together (with the repetitions).
    pub chunk_wrap_bytes: usize,
}

impl Layout {
    /// The duplication cost of the layout: wrap bytes in chunks over distinct wrap bytes.
    pub fn duplication(&self) -> f64 {
        if self.distinct_wrap_bytes == 0 {
            1.0
        } else {
            self.chunk_wrap_bytes as f64 / self.distinct_wrap_bytes as f64
        }
    }
}

/// Bytes a chunk spends on its authenticator when the message has at most `max_chunks` chunks.
pub fn authenticator_len(auth: ChunkAuth, max_chunks: usize) -> usize {
    match auth {
        ChunkAuth::Signature => SIGNATURE_LEN,
        ChunkAuth::GroupSignature => {
            chunk::group_authenticator_len(usize::from(chunk::DEFAULT_GROUP_LOG2))
        }
        ChunkAuth::MerklePath => {
            // The longest path of a tree with max_chunks leaves: ceil(log2(max_chunks)).
            let depth = max_chunks.max(1).next_power_of_two().trailing_zeros() as usize;
            1 + depth * HASH_LEN
        }
    }
}

/// Lays out `batch` for the members at `leaves` (left to right, as
/// [`crate::lkh::KeyTree::leaves_in_order`] gives them) into chunks of `symbol_size` bytes
/// whose authenticator is `auth`.
///
/// With Merkle paths the room in a chunk depends on the chunk count: the layout is made with
/// room for a path of an estimated count and made again, with a longer path, if the result
/// has more chunks than the estimate allowed for.
pub fn lay_out(
    batch: &RekeyBatch,
    leaves: &[NodeId],
    symbol_size: usize,
    auth: ChunkAuth,
) -> Result<Layout, LayoutError> {
    if leaves.is_empty() {
        return Err(LayoutError::NoLeaves);
    }
    // A first guess at the chunk count, from the wraps alone (duplication only adds chunks),
    // so that large messages are usually laid out once.
    let room_without_path =
        symbol_size.saturating_sub(chunk::HEADER_LEN + COUNT_LEN + WRAPPED_DATA_SA_LEN + 1);
    let mut allowed_chunks = (batch.wraps.len() * WRAP_LEN)
        .div_ceil(room_without_path.max(1))
        .next_power_of_two();
    loop {
        let fixed = chunk::HEADER_LEN
            + COUNT_LEN
            + WRAPPED_DATA_SA_LEN
            + authenticator_len(auth, allowed_chunks);
        let available = symbol_size.saturating_sub(fixed);
        let layout = fill(batch, leaves, available)?;
        if layout.chunks.len() <= allowed_chunks || auth != ChunkAuth::MerklePath {
            return Ok(layout);
        }
        allowed_chunks = layout.chunks.len().next_power_of_two();
    }
}

fn fill(batch: &RekeyBatch, leaves: &[NodeId], available: usize) -> Result<Layout, LayoutError> {
    let degree: Degree = batch.degree;
    let seq = batch.context.seq;
    let data_sa = batch.wrapped_data_sa.to_bytes();
    let mut chunks = Vec::new();
    let mut current: Vec<&Wrap> = Vec::new();
    let mut in_current: HashSet<NodeId> = HashSet::new();
    let mut first_key = 0u32;
    let mut last_key = 0u32;
    let mut chunk_wrap_bytes = 0usize;

    let mut close = |wraps: &mut Vec<&Wrap>, first: u32, last: u32| -> Result<(), LayoutError> {
        let index = u32::try_from(chunks.len()).map_err(|_| LayoutError::TooManyChunks)?;
        let mut payload = Vec::with_capacity(COUNT_LEN + wraps.len() * WRAP_LEN + data_sa.len());
        // The wrap count fits u16: a chunk holds fewer than 65,536 bytes of wraps.
        payload.extend_from_slice(&(wraps.len() as u16).to_be_bytes());
        for wrap in wraps.iter() {
            payload.extend_from_slice(&wrap.to_bytes());
        }
        payload.extend_from_slice(&data_sa);
        chunk_wrap_bytes += wraps.len() * WRAP_LEN;
        chunks.push((
            ChunkHeader {
                seq,
                index,
                first_leaf: first,
                last_leaf: last,
            },
            payload,
        ));
        wraps.clear();
        Ok(())
    };

    for &leaf in leaves {
        let key = degree.order_key(leaf);
        let needed: Vec<&Wrap> = batch.wraps_for_leaf(leaf).collect();
        let alone = needed.len() * WRAP_LEN;
        if alone > available || needed.len() > usize::from(u16::MAX) {
            return Err(LayoutError::SymbolTooSmall {
                needed: alone,
                available,
            });
        }
        let new: Vec<&Wrap> = needed
            .iter()
            .copied()
            .filter(|wrap| !in_current.contains(&wrap.child))
            .collect();
        if !current.is_empty() && (current.len() + new.len()) * WRAP_LEN > available {
            close(&mut current, first_key, last_key)?;
            in_current.clear();
            current.extend(needed.iter().copied());
            in_current.extend(needed.iter().map(|wrap| wrap.child));
            first_key = key;
        } else {
            if current.is_empty() && in_current.is_empty() {
                first_key = key;
            }
            in_current.extend(new.iter().map(|wrap| wrap.child));
            current.extend(new);
        }
        last_key = key;
    }
    close(&mut current, first_key, last_key)?;
    Ok(Layout {
        chunks,
        distinct_wrap_bytes: batch.wraps.len() * WRAP_LEN,
        chunk_wrap_bytes,
    })
}

/// The wraps and Data SA a verified chunk carries ([`crate::lkh::MemberKeys::apply`] reads
/// them).
pub fn read_payload(chunk: &Verified<Chunk>) -> Result<(Vec<Wrap>, WrappedDataSa), LayoutError> {
    let payload = &chunk.payload;
    let count_bytes = payload
        .get(..COUNT_LEN)
        .ok_or(LayoutError::MalformedPayload)?;
    let count = usize::from(u16::from_be_bytes([count_bytes[0], count_bytes[1]]));
    let wraps_end = COUNT_LEN + count * WRAP_LEN;
    if payload.len() != wraps_end + WRAPPED_DATA_SA_LEN {
        return Err(LayoutError::MalformedPayload);
    }
    let wraps = payload[COUNT_LEN..wraps_end]
        .chunks_exact(WRAP_LEN)
        .map(Wrap::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(LayoutError::Wrap)?;
    let data_sa = WrappedDataSa::parse(&payload[wraps_end..]).map_err(LayoutError::Wrap)?;
    Ok((wraps, data_sa))
}

/// How the GCKS builds a message. [`MessageParams::default`] gives the defaults named on each
/// field; set at least `spi`, `epoch` and `timestamp_us` from the Rekey SA and the clock.
///
/// It deserializes from a configuration file's table (serde) with the fields an operator
/// chooses (`symbol_size`, `chunk_auth` as `"signature"` or `"merkle_path"`,
/// `max_block_symbols`, `signing_threads`); `spi`, `epoch` and `timestamp_us` are the GCKS's to
/// set and are neither read nor written. A key that is not a field is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessageParams {
    /// The SPI of the Rekey SA (RFC 4046 6.2). Default 1.
    #[serde(skip)]
    pub spi: u32,
    /// The FEC symbol size in bytes: every chunk is padded to it, and a symbol datagram adds
    /// 47 bytes of header, symbol fields and MAC to it. Default 1,200 (a 1,247-byte datagram,
    /// within [`crate::wire::DEFAULT_DATAGRAM_SIZE`]); a path that must stay within
    /// [`crate::wire::IPV6_SAFE_DATAGRAM_SIZE`] needs 1,185 or less.
    pub symbol_size: u16,
    /// How chunks authenticate themselves. Default [`ChunkAuth::GroupSignature`] (see
    /// [`ChunkAuth`] for the measurements behind it).
    pub chunk_auth: ChunkAuth,
    /// The largest FEC source block, in symbols (B). Default
    /// [`rekeycast_fec::DEFAULT_MAX_BLOCK_SYMBOLS`].
    pub max_block_symbols: u32,
    /// The epoch of the Rekey SA: raised when the sequence restarts. Default 0.
    #[serde(skip)]
    pub epoch: u32,
    /// When the message is built, microseconds since the Unix epoch. Default 0.
    #[serde(skip)]
    pub timestamp_us: u64,
    /// Threads that sign chunks in [`ChunkAuth::Signature`] mode (one Ed25519 signature per
    /// chunk, thousands for a large group) and [`ChunkAuth::GroupSignature`] mode (one per
    /// group), and that seal the initial transmission's datagrams. 0, the default, means
    /// [`std::thread::available_parallelism`] (1 if that is unknown). A small message uses
    /// fewer threads (each signs at least 32 chunks). The message is the same bytes whatever
    /// the count.
    pub signing_threads: usize,
}

impl Default for MessageParams {
    fn default() -> Self {
        Self {
            spi: 1,
            symbol_size: 1200,
            chunk_auth: ChunkAuth::default(),
            max_block_symbols: rekeycast_fec::DEFAULT_MAX_BLOCK_SYMBOLS,
            epoch: 0,
            timestamp_us: 0,
            signing_threads: 0,
        }
    }
}

impl MessageParams {
    /// The number of signing threads `signing_threads` stands for: itself, or the available
    /// parallelism when it is 0.
    pub fn resolved_signing_threads(&self) -> usize {
        match self.signing_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            threads => threads,
        }
    }
}

/// A message ready to send: the signed manifest, the authenticated chunks (the FEC source
/// symbols, in order) and the FEC parameters the manifest carries.
#[derive(Debug, Clone)]
pub struct BuiltMessage {
    /// The signed manifest's bytes.
    pub manifest: Vec<u8>,
    /// The chunks, each exactly `symbol_size` bytes.
    pub chunks: Vec<Vec<u8>>,
    /// The FEC object transmission information of the chunk object.
    pub fec_info: rekeycast_fec::ObjectInfo,
    /// The layout's figures (duplication cost).
    pub layout: Layout,
}

/// What can go wrong while building a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The layout failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A chunk could not be encoded.
    #[error(transparent)]
    Chunk(#[from] chunk::ChunkError),
    /// The manifest could not be encoded.
    #[error(transparent)]
    Manifest(#[from] super::manifest::ManifestError),
    /// The FEC parameters are out of range.
    #[error(transparent)]
    Fec(#[from] rekeycast_fec::Error),
}

/// Lays out, authenticates and signs the message of `batch` for the members at `leaves`.
///
/// In [`ChunkAuth::Signature`] mode the chunks are signed on
/// [`MessageParams::signing_threads`] threads, each over a contiguous slice of the chunks; the
/// result does not depend on the thread count (Ed25519 signatures are deterministic).
pub fn build_message(
    batch: &RekeyBatch,
    leaves: &[NodeId],
    signing_key: &ed25519_dalek::SigningKey,
    params: &MessageParams,
) -> Result<BuiltMessage, BuildError> {
    let symbol_size = usize::from(params.symbol_size);
    let layout = lay_out(batch, leaves, symbol_size, params.chunk_auth)?;
    let chunk_count = u32::try_from(layout.chunks.len()).map_err(|_| LayoutError::TooManyChunks)?;
    let fec_info =
        rekeycast_fec::ObjectInfo::new(chunk_count, params.symbol_size, params.max_block_symbols)?;
    let block_first_keys = block_first_keys(&layout, &fec_info)?;
    let authenticated = layout
        .chunks
        .iter()
        .map(|(header, payload)| chunk::encode_authenticated(header, payload))
        .collect::<Result<Vec<_>, _>>()?;
    let (chunks, chunk_root) = match params.chunk_auth {
        ChunkAuth::MerklePath => {
            let tree =
                crate::auth::merkle::MerkleTree::build(authenticated.iter().map(Vec::as_slice))
                    .map_err(|_| LayoutError::NoLeaves)?;
            let chunks = authenticated
                .into_iter()
                .enumerate()
                .map(|(index, bytes)| {
                    let path = tree.proof(index).unwrap_or_default();
                    chunk::finish(bytes, &chunk::Authenticator::MerklePath(path), symbol_size)
                })
                .collect::<Result<Vec<_>, _>>()?;
            (chunks, tree.root())
        }
        ChunkAuth::Signature => {
            let threads = params
                .resolved_signing_threads()
                .min(authenticated.len().div_ceil(MIN_CHUNKS_PER_THREAD));
            let chunks = sign_chunks(authenticated, signing_key, symbol_size, threads)?;
            (chunks, [0; HASH_LEN])
        }
        ChunkAuth::GroupSignature => {
            let chunks = chunk::authenticate_groups_on_threads(
                authenticated,
                chunk_count,
                batch.context.seq,
                chunk::DEFAULT_GROUP_LOG2,
                signing_key,
                symbol_size,
                params.resolved_signing_threads(),
            )?;
            (chunks, [0; HASH_LEN])
        }
    };
    let manifest = super::manifest::Manifest {
        wrap_algorithm: batch.context.algorithm.id(),
        chunk_auth: params.chunk_auth,
        group_id: batch.context.group_id,
        spi: params.spi,
        seq: batch.context.seq,
        epoch: params.epoch,
        group_size: u32::try_from(batch.group_size).unwrap_or(u32::MAX),
        chunk_count,
        timestamp_us: params.timestamp_us,
        chunk_root,
        fec_info: fec_info.to_bytes().to_vec(),
        block_first_keys,
    };
    Ok(BuiltMessage {
        manifest: manifest.sign(signing_key)?,
        chunks,
        fec_info,
        layout,
    })
}

/// For each FEC source block of the chunk object, in SBN order, the first leaf order key of its
/// first chunk (what [`super::manifest::Manifest::block_first_keys`] carries).
fn block_first_keys(
    layout: &Layout,
    fec_info: &rekeycast_fec::ObjectInfo,
) -> Result<Vec<u32>, BuildError> {
    let partition = fec_info.partition();
    (0..fec_info.source_blocks())
        .map(|sbn| {
            let start = partition.block_start(sbn)?;
            // The partition covers exactly the layout's chunks (the object info was made from
            // their count), so every block starts at a chunk; a miss is reported, not a panic.
            let (header, _) = usize::try_from(start)
                .ok()
                .and_then(|start| layout.chunks.get(start))
                .ok_or(LayoutError::TooManyChunks)?;
            Ok(header.first_leaf)
        })
        .collect()
}

/// Signs each chunk and pads it to the symbol size, on `threads` threads (at least one, at
/// most one per chunk) that each take a contiguous slice of the chunks, in order.
fn sign_chunks(
    authenticated: Vec<Vec<u8>>,
    signing_key: &ed25519_dalek::SigningKey,
    symbol_size: usize,
    threads: usize,
) -> Result<Vec<Vec<u8>>, chunk::ChunkError> {
    let sign_one = |bytes: Vec<u8>| {
        let signature = chunk::sign(signing_key, &bytes);
        chunk::finish(
            bytes,
            &chunk::Authenticator::Signature(signature),
            symbol_size,
        )
    };
    let threads = threads.clamp(1, authenticated.len().max(1));
    if threads == 1 {
        return authenticated.into_iter().map(sign_one).collect();
    }
    let per_thread = authenticated.len().div_ceil(threads);
    let mut slices = Vec::with_capacity(threads);
    let mut rest = authenticated;
    while !rest.is_empty() {
        let tail = rest.split_off(per_thread.min(rest.len()));
        slices.push(rest);
        rest = tail;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = slices
            .into_iter()
            .map(|slice| {
                scope.spawn(move || {
                    slice
                        .into_iter()
                        .map(sign_one)
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut chunks = Vec::new();
        for handle in handles {
            match handle.join() {
                Ok(signed) => chunks.extend(signed?),
                // Signing does not panic; if it ever did, the panic goes on to the caller as
                // it would have single-threaded.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(chunks)
    })
}

/// The chunk among `chunks` (chunk headers in index order) that serves the leaf with order
/// key `order_key`: a binary search over the leaf ranges.
pub fn find_chunk(headers: &[ChunkHeader], order_key: u32) -> Option<usize> {
    let index = headers.partition_point(|header| header.last_leaf < order_key);
    headers
        .get(index)
        .filter(|header| header.serves(order_key))
        .map(|_| index)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::auth::message::MessageVerifier;
    use crate::gsa::{RekeySa, WrapAlgorithm};
    use crate::lkh::{KeyRng, KeyTree, MemberId, MemberKeys};
    use crate::session::chunk::SignedChunk;
    use crate::session::manifest::SignedManifest;

    const SPI: u32 = 9;

    fn gcks() -> SigningKey {
        SigningKey::from_bytes(&[21; 32])
    }

    fn tree() -> KeyTree {
        let sa = RekeySa {
            group_id: 0x0A0B_0C0D,
            spi: SPI,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::new(4).unwrap(),
            gcks_public_key: gcks().verifying_key(),
            data_sa_lifetime_secs: 3600,
        };
        KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(5))
    }

    fn params(chunk_auth: ChunkAuth) -> MessageParams {
        MessageParams {
            spi: SPI,
            symbol_size: 1424,
            chunk_auth,
            max_block_symbols: 64,
            epoch: 0,
            timestamp_us: 0,
            signing_threads: 1,
        }
    }

    /// Every member finds its chunk by its leaf's order key, verifies the manifest and the
    /// chunk, and applies it; all end with the tree's group key and Data SA.
    fn deliver(
        tree: &KeyTree,
        batch: &RekeyBatch,
        members: &mut HashMap<MemberId, MemberKeys>,
        chunk_auth: ChunkAuth,
    ) -> usize {
        let message =
            build_message(batch, &tree.leaves_in_order(), &gcks(), &params(chunk_auth)).unwrap();
        let headers: Vec<ChunkHeader> = message
            .chunks
            .iter()
            .map(|bytes| SignedChunk::parse(bytes, chunk_auth).unwrap().header)
            .collect();
        let degree = tree.degree();
        let mut verifier = MessageVerifier::new(gcks().verifying_key(), 0x0A0B_0C0D, SPI, 0);
        let seq = batch.context.seq;
        for keys in members.values_mut() {
            let index = find_chunk(&headers, degree.order_key(keys.leaf())).expect("a chunk");
            let manifest = verifier
                .verify_manifest(seq, &message.manifest)
                .unwrap()
                .clone();
            let chunk = verifier
                .verify_chunk(&manifest, &message.chunks[index])
                .unwrap();
            let rekeyed = keys.apply(&chunk).unwrap();
            assert_eq!(rekeyed.group_key, tree.group_key().1);
            assert_eq!(&rekeyed.data_sa, tree.data_sa().unwrap());
        }
        assert_eq!(verifier.counters().signature_checks, {
            match chunk_auth {
                ChunkAuth::MerklePath => 1,
                ChunkAuth::Signature | ChunkAuth::GroupSignature => 1 + members.len() as u64,
            }
        });
        message.chunks.len()
    }

    #[test]
    fn members_of_a_10000_member_tree_find_and_apply_their_chunk_for_every_batch_shape() {
        let mut tree = tree();
        let initial: Vec<MemberId> = (0..10_000).map(MemberId).collect();
        let batch = tree.apply_batch(&initial, &[]).unwrap();
        let mut members: HashMap<MemberId, MemberKeys> = initial
            .iter()
            .map(|&m| (m, MemberKeys::from_bundle(&tree.join(m).unwrap())))
            .collect();
        deliver(&tree, &batch, &mut members, ChunkAuth::MerklePath);

        let mut next_id = 10_000u64;
        // (joins, leaves): only leaves, only joins, both, neither.
        for (round, (joins, leaves)) in [(0usize, 50usize), (50, 0), (100, 100), (0, 0), (300, 7)]
            .into_iter()
            .enumerate()
        {
            let joining: Vec<MemberId> = (next_id..next_id + joins as u64).map(MemberId).collect();
            next_id += joins as u64;
            let mut current: Vec<MemberId> = members.keys().copied().collect();
            current.sort_unstable();
            let leaving: Vec<MemberId> = current.iter().step_by(97).take(leaves).copied().collect();
            let batch = tree.apply_batch(&joining, &leaving).unwrap();
            for member in &leaving {
                members.remove(member);
            }
            for &member in &joining {
                members.insert(member, MemberKeys::from_bundle(&tree.join(member).unwrap()));
            }
            let auth = match round % 3 {
                0 => ChunkAuth::MerklePath,
                1 => ChunkAuth::Signature,
                _ => ChunkAuth::GroupSignature,
            };
            let chunks = deliver(&tree, &batch, &mut members, auth);
            assert!(chunks >= 1);
        }
        assert_eq!(members.len(), 10_000 - 50 + 50 + 100 - 100 + 300 - 7);
    }

    #[test]
    fn layout_reports_duplication_and_packs_leaves() {
        let mut tree = tree();
        let initial: Vec<MemberId> = (0..4096).map(MemberId).collect();
        tree.apply_batch(&initial, &[]).unwrap();
        let leaving: Vec<MemberId> = (0..4096).step_by(64).map(MemberId).collect();
        let batch = tree.apply_batch(&[], &leaving).unwrap();
        let layout = lay_out(&batch, &tree.leaves_in_order(), 1424, ChunkAuth::MerklePath).unwrap();
        // Every distinct wrap is in some chunk, and near-root wraps repeat.
        assert!(layout.chunk_wrap_bytes >= layout.distinct_wrap_bytes);
        assert!(layout.duplication() > 1.0);
        // Leaf ranges are disjoint and ascending.
        for pair in layout.chunks.windows(2) {
            assert!(pair[0].0.last_leaf < pair[1].0.first_leaf);
            assert_eq!(pair[0].0.index + 1, pair[1].0.index);
        }
        // A chunk holds what fits: no payload exceeds its room.
        let room = 1424 - chunk::HEADER_LEN - authenticator_len(ChunkAuth::MerklePath, 64);
        assert!(layout
            .chunks
            .iter()
            .all(|(_, payload)| payload.len() <= room));
    }

    #[test]
    fn a_symbol_too_small_for_one_path_is_an_error() {
        let mut tree = tree();
        let initial: Vec<MemberId> = (0..1000).map(MemberId).collect();
        let batch = tree.apply_batch(&initial, &[]).unwrap();
        assert!(matches!(
            lay_out(&batch, &tree.leaves_in_order(), 200, ChunkAuth::Signature),
            Err(LayoutError::SymbolTooSmall { .. })
        ));
        assert_eq!(
            lay_out(&batch, &[], 1424, ChunkAuth::Signature).err(),
            Some(LayoutError::NoLeaves)
        );
    }

    /// The manifest's block first keys send every member to the block that holds its chunk.
    #[test]
    fn block_of_every_members_leaf_is_the_block_of_its_chunk() {
        let mut tree = tree();
        let initial: Vec<MemberId> = (0..10_000).map(MemberId).collect();
        let first = tree.apply_batch(&initial, &[]).unwrap();
        let leaving: Vec<MemberId> = (0..10_000).step_by(53).map(MemberId).collect();
        let joining: Vec<MemberId> = (10_000..10_150).map(MemberId).collect();
        let first_leaves = tree.leaves_in_order();
        let second = tree.apply_batch(&joining, &leaving).unwrap();
        let second_leaves = tree.leaves_in_order();
        let degree = tree.degree();
        for (batch, leaves) in [(&first, &first_leaves), (&second, &second_leaves)] {
            for (auth, max_block_symbols) in [
                (ChunkAuth::Signature, 7),
                (ChunkAuth::MerklePath, 16),
                // One block.
                (ChunkAuth::Signature, 50_000),
            ] {
                let params = MessageParams {
                    max_block_symbols,
                    ..params(auth)
                };
                let message = build_message(batch, leaves, &gcks(), &params).unwrap();
                let manifest = SignedManifest::parse(&message.manifest).unwrap().manifest;
                let blocks = message.fec_info.source_blocks();
                assert_eq!(manifest.block_first_keys.len(), usize::from(blocks));
                if max_block_symbols < 20 {
                    assert!(blocks >= 10, "{blocks} blocks");
                }
                let headers: Vec<ChunkHeader> = message
                    .chunks
                    .iter()
                    .map(|bytes| SignedChunk::parse(bytes, auth).unwrap().header)
                    .collect();
                let partition = message.fec_info.partition();
                for &leaf in leaves.iter() {
                    let key = degree.order_key(leaf);
                    let index = find_chunk(&headers, key).unwrap();
                    let sbn = partition.locate(index as u32).unwrap().sbn;
                    assert_eq!(manifest.block_of(key), Some(sbn), "order key {key}");
                }
            }
        }
    }

    /// Signing on several threads gives the same bytes as signing on one.
    #[test]
    fn signing_threads_do_not_change_the_message() {
        let mut tree = tree();
        let initial: Vec<MemberId> = (0..10_000).map(MemberId).collect();
        let batch = tree.apply_batch(&initial, &[]).unwrap();
        let leaves = tree.leaves_in_order();
        let build = |signing_threads| {
            let params = MessageParams {
                signing_threads,
                ..params(ChunkAuth::Signature)
            };
            build_message(&batch, &leaves, &gcks(), &params).unwrap()
        };
        let single = build(1);
        let chunks = single.chunks.len();
        assert!(chunks > 3 * MIN_CHUNKS_PER_THREAD, "{chunks} chunks");
        // 0 is the available parallelism; more threads than the minimum share allows is capped.
        for threads in [0, 2, 3, 7, chunks + 5] {
            let parallel = build(threads);
            assert_eq!(parallel.manifest, single.manifest, "{threads} threads");
            assert_eq!(parallel.chunks, single.chunks, "{threads} threads");
        }

        // Below the minimum share: the signing itself on up to one thread per chunk.
        let layout = lay_out(&batch, &leaves, 1424, ChunkAuth::Signature).unwrap();
        let authenticated: Vec<Vec<u8>> = layout.chunks[..9]
            .iter()
            .map(|(header, payload)| chunk::encode_authenticated(header, payload).unwrap())
            .collect();
        let one = sign_chunks(authenticated.clone(), &gcks(), 1424, 1).unwrap();
        assert_eq!(one, single.chunks[..9]);
        for threads in [0, 2, 4, 5, 8, 9, 10, 100] {
            let parallel = sign_chunks(authenticated.clone(), &gcks(), 1424, threads).unwrap();
            assert_eq!(parallel, one, "{threads} threads");
        }
        assert!(sign_chunks(Vec::new(), &gcks(), 1424, 3)
            .unwrap()
            .is_empty());
        // An error in any thread's slice is the result.
        let mut too_long = authenticated;
        too_long[6] = vec![0; 1424];
        assert!(matches!(
            sign_chunks(too_long, &gcks(), 1424, 3),
            Err(chunk::ChunkError::TooLarge { .. })
        ));
    }

    #[test]
    fn default_params() {
        let params = MessageParams::default();
        assert_eq!(params.chunk_auth, ChunkAuth::GroupSignature);
        assert_eq!(params.spi, 1);
        assert_eq!(params.symbol_size, 1200);
        assert_eq!(
            params.max_block_symbols,
            rekeycast_fec::DEFAULT_MAX_BLOCK_SYMBOLS
        );
        assert_eq!((params.epoch, params.timestamp_us), (0, 0));
        assert_eq!(params.signing_threads, 0);
        assert!(params.resolved_signing_threads() >= 1);
        let three = MessageParams {
            signing_threads: 3,
            ..params
        };
        assert_eq!(three.resolved_signing_threads(), 3);
        // The datagram sizes the field's documentation names.
        let overhead = crate::wire::datagram::OVERHEAD + crate::wire::symbol::FIXED_LEN;
        assert_eq!(overhead, 47);
        assert!(usize::from(params.symbol_size) + overhead <= crate::wire::DEFAULT_DATAGRAM_SIZE);
        assert_eq!(crate::wire::IPV6_SAFE_DATAGRAM_SIZE - overhead, 1185);
    }

    #[test]
    fn find_chunk_searches_leaf_ranges() {
        let header = |index, first_leaf, last_leaf| ChunkHeader {
            seq: 1,
            index,
            first_leaf,
            last_leaf,
        };
        let headers = [header(0, 0, 10), header(1, 12, 20), header(2, 21, 40)];
        assert_eq!(find_chunk(&headers, 0), Some(0));
        assert_eq!(find_chunk(&headers, 10), Some(0));
        assert_eq!(find_chunk(&headers, 11), None);
        assert_eq!(find_chunk(&headers, 21), Some(2));
        assert_eq!(find_chunk(&headers, 41), None);
    }
}
