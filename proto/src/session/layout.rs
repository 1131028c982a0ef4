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

use super::chunk::{self, ChunkHeader};
use super::manifest::{ChunkAuth, SIGNATURE_LEN};
use crate::auth::merkle::HASH_LEN;
use crate::auth::message::Chunk;
use crate::auth::Verified;
use crate::gsa::{WrappedDataSa, WRAPPED_DATA_SA_LEN, WRAPPED_DATA_SA_V1_LEN};
use crate::lkh::{Degree, NodeId, RekeyBatch, Wrap, WrapError, ROOT, WRAP_LEN};

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
/// The time grows with the batch's wraps (times the tree's depth), not with the members: only
/// rekeyed nodes are walked, and the leaves of an unchanged subtree join a chunk in one step.
///
/// With Merkle paths the room in a chunk depends on the chunk count: the chunks are planned
/// (which wraps and leaves each holds, no bytes yet) with room for a path of an estimated
/// count and planned again, with a longer path, if the plan has more chunks than the estimate
/// allowed for; the payloads are written once, for the last plan.
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
    let rekeyed = Rekeyed::of(batch);
    loop {
        let fixed = chunk::HEADER_LEN
            + COUNT_LEN
            + WRAPPED_DATA_SA_LEN
            + authenticator_len(auth, allowed_chunks);
        let available = symbol_size.saturating_sub(fixed);
        let plan = Planner::plan(batch, &rekeyed, leaves, available)?;
        if plan.chunks.len() <= allowed_chunks || auth != ChunkAuth::MerklePath {
            return materialize(batch, &plan);
        }
        allowed_chunks = plan.chunks.len().next_power_of_two();
    }
}

/// No chunk: the stamp of a wrap that is in no chunk yet.
const NO_CHUNK: usize = usize::MAX;

/// The chunks of a layout before their payloads are written: the wraps each holds (indices
/// into the batch's wraps, in payload order) and the order keys of its first and last leaf.
#[derive(Debug, Default)]
struct Plan {
    /// The wrap indices of every chunk, chunk after chunk.
    wraps: Vec<u32>,
    /// The chunks in leaf order.
    chunks: Vec<PlannedChunk>,
}

/// One chunk of a [`Plan`].
#[derive(Debug, Clone, Copy)]
struct PlannedChunk {
    /// Where its wraps start in [`Plan::wraps`] (they end where the next chunk's start).
    start: usize,
    /// The order key of its first leaf.
    first_key: u32,
    /// The order key of its last leaf.
    last_key: u32,
}

/// The rekeyed (marked) nodes of a batch: the distinct parents of its wraps, ascending, and
/// where each one's wraps start. Wraps sorted by child are sorted by parent, so one pass finds
/// them.
struct Rekeyed {
    nodes: Vec<NodeId>,
    /// `starts[i]..starts[i + 1]` are the wraps of `nodes[i]`; one more entry than `nodes`.
    starts: Vec<usize>,
}

impl Rekeyed {
    fn of(batch: &RekeyBatch) -> Self {
        let degree = batch.degree;
        let mut nodes = Vec::new();
        let mut starts = Vec::new();
        for (index, wrap) in batch.wraps.iter().enumerate() {
            let parent = degree.parent(wrap.child);
            if parent.is_some() && parent != nodes.last().copied() {
                if let Some(parent) = parent {
                    nodes.push(parent);
                    starts.push(index);
                }
            }
        }
        starts.push(batch.wraps.len());
        Self { nodes, starts }
    }
}

/// [`Degree::order_key`] by table: each level's first node id and its nodes' order-key
/// stride, so a key is a short search and a multiplication (the planner takes a few keys per
/// wrap).
struct OrderKeys {
    /// `starts[k]`: the first id of level `k`, for every level and one past the deepest.
    starts: Vec<u64>,
    /// `strides[k]`: `d^(max_depth - k)`, the order keys one node of level `k` spans.
    strides: Vec<u64>,
}

impl OrderKeys {
    fn new(degree: Degree) -> Self {
        let max_depth = degree.max_depth();
        let d = u64::from(degree.get());
        let starts = (0..=max_depth + 1)
            .map(|depth| degree.level_start(depth))
            .collect();
        let strides = (0..=max_depth)
            .map(|depth| d.pow(max_depth - depth))
            .collect();
        Self { starts, strides }
    }

    /// The order key of `node` and the number of order keys its subtree spans.
    fn key_and_span(&self, node: NodeId) -> (u32, u64) {
        let node = u64::from(node);
        // starts[0] is 0, so the level exists; a node past the deepest level has none.
        let depth = self.starts.partition_point(|&start| start <= node) - 1;
        match (self.starts.get(depth), self.strides.get(depth)) {
            // rank * stride < d^max_depth < 2^32 (see Degree::order_key).
            (Some(start), Some(&stride)) => (((node - start) * stride) as u32, stride),
            _ => (u32::MAX, 1),
        }
    }

    fn key(&self, node: NodeId) -> u32 {
        self.key_and_span(node).0
    }
}

/// Lays the leaves out into a [`Plan`] by a walk over the rekeyed nodes only.
///
/// A leaf needs the wraps under the nodes of its path, and only children of rekeyed nodes
/// have a wrap. So the walk goes down from the root through rekeyed nodes, child by child in
/// left-to-right order; a child that was not rekeyed (an unchanged subtree or a leaf) covers a
/// run of consecutive leaves that all need the same wraps (the one under that child and those
/// on the path above it), and the run joins the current chunk in one step: its first leaf adds
/// what the chunk lacks, the others add nothing. Which path wraps the current chunk holds is a
/// chunk stamp kept beside each path entry. The leaves of a subtree are found in `leaves` by a
/// galloping search over order keys. The cost grows with the wraps (times the depth), not with
/// the members; the chunks are those of the leaf-by-leaf fill the module describes.
///
/// `leaves` must be the tree's leaves left to right and `batch` made by
/// [`crate::lkh::KeyTree::apply_batch`] (every rekeyed node but the root has a wrap under it).
struct Planner<'a> {
    batch: &'a RekeyBatch,
    rekeyed: &'a Rekeyed,
    leaves: &'a [NodeId],
    degree: Degree,
    keys: OrderKeys,
    /// Bytes a chunk has for wraps.
    available: usize,
    /// The next leaf to place, an index into `leaves`.
    next_leaf: usize,
    /// The wraps on the path from the node being visited up to the root (the wrap under the
    /// depth-1 node first), each with the chunk that last took it.
    path: Vec<(u32, usize)>,
    plan: Plan,
    /// Where the current chunk's wraps start in the plan's wraps.
    current_start: usize,
    first_key: u32,
    last_key: u32,
}

impl<'a> Planner<'a> {
    fn plan(
        batch: &'a RekeyBatch,
        rekeyed: &'a Rekeyed,
        leaves: &'a [NodeId],
        available: usize,
    ) -> Result<Plan, LayoutError> {
        let mut planner = Planner {
            batch,
            rekeyed,
            leaves,
            degree: batch.degree,
            keys: OrderKeys::new(batch.degree),
            available,
            next_leaf: 0,
            path: Vec::new(),
            plan: Plan {
                wraps: Vec::with_capacity(batch.wraps.len() * 2),
                chunks: Vec::new(),
            },
            current_start: 0,
            first_key: 0,
            last_key: 0,
        };
        if rekeyed.nodes.first() == Some(&ROOT) {
            planner.visit(0, u32::MAX)?;
        }
        // Leaves no rekeyed node covers (none in a batch of the tree) need no wrap.
        planner.place_run(leaves.len(), None)?;
        planner.close();
        Ok(planner.plan)
    }

    /// Places the leaves under the rekeyed node `rekeyed.nodes[group]`, whose leaves' order
    /// keys end at `last`.
    fn visit(&mut self, group: usize, last: u32) -> Result<(), LayoutError> {
        let rekeyed = self.rekeyed;
        let node = rekeyed.nodes[group];
        // Its rekeyed children are consecutive in `rekeyed.nodes` (ascending ids have
        // ascending parents).
        let mut next_group = rekeyed
            .nodes
            .partition_point(|&n| self.degree.parent(n) < Some(node));
        for wrap in rekeyed.starts[group]..rekeyed.starts[group + 1] {
            let child = self.batch.wraps[wrap].child;
            let (first_key, last_key) = self.key_range(child);
            if first_key > 0 {
                let end = self.leaves_through(first_key - 1);
                self.place_run(end, None)?;
            }
            while rekeyed
                .nodes
                .get(next_group)
                .is_some_and(|&n| n < child && self.degree.parent(n) == Some(node))
            {
                next_group += 1;
            }
            // The wrap index fits u32: a batch has fewer wraps than the tree has nodes.
            let wrap = wrap as u32;
            if rekeyed.nodes.get(next_group) == Some(&child) {
                self.path.push((wrap, NO_CHUNK));
                self.visit(next_group, last_key)?;
                self.path.pop();
                next_group += 1;
            } else {
                let end = self.leaves_through(last_key);
                self.place_run(end, Some(wrap))?;
            }
        }
        let end = self.leaves_through(last);
        self.place_run(end, None)
    }

    /// The order keys of the leftmost and rightmost deepest-level descendants of `node`.
    fn key_range(&self, node: NodeId) -> (u32, u32) {
        let (first, span) = self.keys.key_and_span(node);
        let last = (u64::from(first) + span - 1).min(u64::from(u32::MAX)) as u32;
        (first, last)
    }

    /// The index one past the last leaf, from the next one on, whose order key is at most
    /// `last`: a galloping search, in time logarithmic in the leaves it passes.
    fn leaves_through(&self, last: u32) -> usize {
        let keys = &self.keys;
        let rest = &self.leaves[self.next_leaf.min(self.leaves.len())..];
        let within = |leaf: &NodeId| keys.key(*leaf) <= last;
        if !rest.first().is_some_and(within) {
            return self.next_leaf;
        }
        let mut bound = 1;
        while bound < rest.len() && within(&rest[bound]) {
            bound *= 2;
        }
        let low = bound / 2 + 1;
        let high = bound.min(rest.len());
        self.next_leaf + low + rest[low..high].partition_point(within)
    }

    /// Places the leaves from the next one up to `end` (exclusive), which all need the same
    /// wraps: `own` (the wrap under the child whose subtree they are), then the path's, bottom
    /// up. Exactly what placing them one by one does: the first may close the current chunk,
    /// the others find all they need in the chunk.
    fn place_run(&mut self, end: usize, own: Option<u32>) -> Result<(), LayoutError> {
        let first = self.next_leaf;
        if first >= end {
            return Ok(());
        }
        self.next_leaf = end;
        let first_key = self.keys.key(self.leaves[first]);
        let last_key = self.keys.key(self.leaves[end - 1]);
        let needed = usize::from(own.is_some()) + self.path.len();
        let alone = needed * WRAP_LEN;
        if alone > self.available || needed > usize::from(u16::MAX) {
            return Err(LayoutError::SymbolTooSmall {
                needed: alone,
                available: self.available,
            });
        }
        let chunk = self.plan.chunks.len();
        let current_len = self.plan.wraps.len() - self.current_start;
        let new = usize::from(own.is_some())
            + self
                .path
                .iter()
                .filter(|(_, stamp)| *stamp != chunk)
                .count();
        if current_len > 0 && (current_len + new) * WRAP_LEN > self.available {
            self.close();
            let chunk = self.plan.chunks.len();
            self.plan.wraps.extend(own);
            for (wrap, stamp) in self.path.iter_mut().rev() {
                self.plan.wraps.push(*wrap);
                *stamp = chunk;
            }
            self.first_key = first_key;
        } else {
            if current_len == 0 {
                // Each leaf of a run that needs nothing names itself first while the chunk is
                // still empty, so the last one stays.
                self.first_key = if needed == 0 { last_key } else { first_key };
            }
            self.plan.wraps.extend(own);
            for (wrap, stamp) in self.path.iter_mut().rev() {
                if *stamp != chunk {
                    self.plan.wraps.push(*wrap);
                    *stamp = chunk;
                }
            }
        }
        self.last_key = last_key;
        Ok(())
    }

    /// Ends the current chunk.
    fn close(&mut self) {
        self.plan.chunks.push(PlannedChunk {
            start: self.current_start,
            first_key: self.first_key,
            last_key: self.last_key,
        });
        self.current_start = self.plan.wraps.len();
    }
}

/// Writes the chunks of `plan`: each payload is the wrap count, the wraps and the Data SA.
fn materialize(batch: &RekeyBatch, plan: &Plan) -> Result<Layout, LayoutError> {
    let seq = batch.context.seq;
    let data_sa = batch.wrapped_data_sa.to_bytes();
    let mut chunks = Vec::with_capacity(plan.chunks.len());
    for (position, planned) in plan.chunks.iter().enumerate() {
        let index = u32::try_from(position).map_err(|_| LayoutError::TooManyChunks)?;
        let end = plan
            .chunks
            .get(position + 1)
            .map_or(plan.wraps.len(), |next| next.start);
        let wraps = &plan.wraps[planned.start..end];
        let mut payload = vec![0u8; COUNT_LEN + wraps.len() * WRAP_LEN + data_sa.len()];
        // The wrap count fits u16: a chunk holds fewer than 65,536 bytes of wraps.
        payload[..COUNT_LEN].copy_from_slice(&(wraps.len() as u16).to_be_bytes());
        let (wrap_bytes, data_sa_bytes) = payload[COUNT_LEN..].split_at_mut(wraps.len() * WRAP_LEN);
        for (&wrap, out) in wraps.iter().zip(wrap_bytes.chunks_exact_mut(WRAP_LEN)) {
            if let (Some(wrap), Ok(out)) = (batch.wraps.get(wrap as usize), out.try_into()) {
                wrap.emit(out);
            }
        }
        data_sa_bytes.copy_from_slice(&data_sa);
        chunks.push((
            ChunkHeader {
                seq,
                index,
                first_leaf: planned.first_key,
                last_leaf: planned.last_key,
            },
            payload,
        ));
    }
    Ok(Layout {
        chunks,
        distinct_wrap_bytes: batch.wraps.len() * WRAP_LEN,
        chunk_wrap_bytes: plan.wraps.len() * WRAP_LEN,
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
    // A Data SA record of the current format, or of the first (a message an older GCKS
    // stored): the record's parser tells them apart by length.
    let record_len = payload.len().checked_sub(wraps_end);
    if record_len != Some(WRAPPED_DATA_SA_LEN) && record_len != Some(WRAPPED_DATA_SA_V1_LEN) {
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
    /// The largest FEC source block, in symbols (B). 0, the default, picks it from the chunk
    /// count ([`MessageParams::block_symbols_for`]): [`rekeycast_fec::DEFAULT_MAX_BLOCK_SYMBOLS`],
    /// or the smallest B that fits the message in [`rekeycast_fec::MAX_SOURCE_BLOCKS`] blocks
    /// when that is larger (the first message of 2^20 members is 131,072 chunks of 1,200 bytes:
    /// B = 515).
    /// Members decode blocks of up to 4 times the default by default
    /// ([`rekeycast_fec::Limits`]): messages up to 261,120 chunks. A value set by hand (1 to
    /// [`rekeycast_fec::MAX_BLOCK_SYMBOLS`]) is used as it is, and a message with more chunks
    /// than 255 such blocks hold fails with [`BuildError::BlockSizeTooSmall`].
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
    /// The announcement of the GCKS's next signing key to put in the manifest, while a
    /// signing-key rollover is under way. Default none. A message with more than
    /// [`super::manifest::MAX_BLOCKS_WITH_ROLLOVER`] FEC blocks leaves it out (the manifest
    /// would not fit one datagram); the other messages of the rollover's delay carry it.
    #[serde(skip)]
    pub key_rollover: Option<super::manifest::KeyRollover>,
}

impl Default for MessageParams {
    fn default() -> Self {
        Self {
            spi: 1,
            symbol_size: 1200,
            chunk_auth: ChunkAuth::default(),
            max_block_symbols: 0,
            epoch: 0,
            timestamp_us: 0,
            signing_threads: 0,
            key_rollover: None,
        }
    }
}

impl MessageParams {
    /// The largest FEC source block of a message of `chunks` chunks: `max_block_symbols`
    /// itself when it is set, else [`rekeycast_fec::DEFAULT_MAX_BLOCK_SYMBOLS`] or, when more
    /// than 255 blocks of that size would be needed, the smallest size that needs 255 or fewer
    /// (at most [`rekeycast_fec::MAX_BLOCK_SYMBOLS`]).
    pub fn block_symbols_for(&self, chunks: u32) -> u32 {
        match self.max_block_symbols {
            0 => chunks.div_ceil(rekeycast_fec::MAX_SOURCE_BLOCKS).clamp(
                rekeycast_fec::DEFAULT_MAX_BLOCK_SYMBOLS,
                rekeycast_fec::MAX_BLOCK_SYMBOLS,
            ),
            set => set,
        }
    }

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
    /// `max_block_symbols` was set too small for the message: more than
    /// [`rekeycast_fec::MAX_SOURCE_BLOCKS`] blocks would be needed.
    #[error(
        "{chunks} chunks need FEC blocks of at least {needed} symbols, but max_block_symbols \
         is {max_block_symbols} (0 picks the size from the chunk count)"
    )]
    BlockSizeTooSmall {
        /// The message's chunks.
        chunks: u32,
        /// The block size set.
        max_block_symbols: u32,
        /// The smallest block size that fits the message.
        needed: u32,
    },
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
    let block_symbols = params.block_symbols_for(chunk_count);
    let needed = chunk_count.div_ceil(rekeycast_fec::MAX_SOURCE_BLOCKS);
    if (1..needed).contains(&block_symbols) {
        return Err(BuildError::BlockSizeTooSmall {
            chunks: chunk_count,
            max_block_symbols: block_symbols,
            needed,
        });
    }
    let fec_info = rekeycast_fec::ObjectInfo::new(chunk_count, params.symbol_size, block_symbols)?;
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
    let key_rollover = params
        .key_rollover
        .filter(|_| block_first_keys.len() <= super::manifest::MAX_BLOCKS_WITH_ROLLOVER);
    let manifest = super::manifest::Manifest {
        version: super::manifest::VERSION,
        wrap_algorithm: batch.context.algorithm.id(),
        chunk_auth: params.chunk_auth,
        gkm_algorithm: super::manifest::GkmAlgorithm::Lkh,
        degree: batch.degree.get(),
        signing_key_id: super::manifest::KeyId::of(&signing_key.verifying_key()),
        key_rollover,
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
    use std::collections::{HashMap, HashSet};

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::auth::message::MessageVerifier;
    use crate::gsa::{RekeySa, WrapAlgorithm};
    use crate::lkh::{KeyRng, KeyTree, MemberId, MemberKeys};
    use crate::session::chunk::SignedChunk;
    use crate::session::manifest::SignedManifest;

    const SPI: u32 = 9;

    /// The leaf-by-leaf layout the planner replaced, kept as the oracle it must equal byte for
    /// byte: for each leaf its whole root path, the wraps filtered through a hash set.
    fn oracle_lay_out(
        batch: &RekeyBatch,
        leaves: &[NodeId],
        symbol_size: usize,
        auth: ChunkAuth,
    ) -> Result<Layout, LayoutError> {
        if leaves.is_empty() {
            return Err(LayoutError::NoLeaves);
        }
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
            let layout = oracle_fill(batch, leaves, available)?;
            if layout.chunks.len() <= allowed_chunks || auth != ChunkAuth::MerklePath {
                return Ok(layout);
            }
            allowed_chunks = layout.chunks.len().next_power_of_two();
        }
    }

    fn oracle_fill(
        batch: &RekeyBatch,
        leaves: &[NodeId],
        available: usize,
    ) -> Result<Layout, LayoutError> {
        let degree: Degree = batch.degree;
        let seq = batch.context.seq;
        let data_sa = batch.wrapped_data_sa.to_bytes();
        let mut chunks = Vec::new();
        let mut current: Vec<&Wrap> = Vec::new();
        let mut in_current: HashSet<NodeId> = HashSet::new();
        let mut first_key = 0u32;
        let mut last_key = 0u32;
        let mut chunk_wrap_bytes = 0usize;

        let mut close =
            |wraps: &mut Vec<&Wrap>, first: u32, last: u32| -> Result<(), LayoutError> {
                let index = u32::try_from(chunks.len()).map_err(|_| LayoutError::TooManyChunks)?;
                let mut payload =
                    Vec::with_capacity(COUNT_LEN + wraps.len() * WRAP_LEN + data_sa.len());
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
            key_rollover: None,
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

    /// The planner's layout against the oracle's, for both authentications and several symbol
    /// sizes (down to one where deep paths do not fit, so the error must match too).
    fn assert_same_as_oracle(batch: &RekeyBatch, leaves: &[NodeId], what: &str) {
        for symbol_size in [1200usize, 1424, 700, 500] {
            for auth in [ChunkAuth::Signature, ChunkAuth::MerklePath] {
                let planned = lay_out(batch, leaves, symbol_size, auth);
                let oracle = oracle_lay_out(batch, leaves, symbol_size, auth);
                assert!(
                    planned == oracle,
                    "{what}: symbol size {symbol_size}, {auth:?}: {} chunks, oracle {}",
                    planned.as_ref().map_or(0, |l| l.chunks.len()),
                    oracle.as_ref().map_or(0, |l| l.chunks.len()),
                );
            }
        }
    }

    /// A tree of degree `degree` with `members` members, then batches of every shape, each
    /// laid out by the planner and by the oracle: the first batch (joins only, from an empty
    /// tree), 1% churn (J = L), leaves only, a leave of every member of a run of leaves (whole
    /// subtrees pruned), joins beyond the free slots (leaves split), an empty batch, and
    /// mixed batches with J > L and J < L.
    fn layouts_equal_the_oracle(degree: u8, members: u64, seed: u64) {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;

        let sa = RekeySa {
            degree: Degree::new(degree).unwrap(),
            ..tree().sa
        };
        let mut tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(seed));
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let mut next_id = 0u64;
        let mut fresh = |count: u64| -> Vec<MemberId> {
            let ids = (next_id..next_id + count).map(MemberId).collect();
            next_id += count;
            ids
        };
        let current = |tree: &KeyTree| -> Vec<MemberId> {
            tree.leaves_in_order()
                .iter()
                .map(|&leaf| tree.members[leaf as usize])
                .collect()
        };
        let batch = tree.apply_batch(&fresh(members), &[]).unwrap();
        assert_same_as_oracle(&batch, &tree.leaves_in_order(), "first batch");

        let churn = (members / 100).max(1);
        let shapes: [(&str, u64, u64); 7] = [
            ("1% churn", churn, churn),
            ("leaves only", 0, churn * 3),
            ("a run of leaves", 0, 0),
            ("joins with splits", 0, members / 20 + churn * 5),
            ("empty", 0, 0),
            ("more joins than leaves", churn * 2, churn),
            ("more leaves than joins", churn, churn * 2),
        ];
        for (what, leaves, joins) in shapes {
            let mut leaving = current(&tree);
            if what == "a run of leaves" {
                // A contiguous stretch of leaves: their parents and grandparents are pruned.
                let start = leaving.len() / 3;
                let end = start + (leaving.len() / 16).max(2);
                leaving = leaving[start..end].to_vec();
            } else {
                leaving.shuffle(&mut rng);
                leaving.truncate(leaves as usize);
            }
            let batch = tree.apply_batch(&fresh(joins), &leaving).unwrap();
            assert_same_as_oracle(&batch, &tree.leaves_in_order(), what);
        }
    }

    #[test]
    fn layout_equals_the_oracle_at_2_10_to_2_16_members() {
        for log_n in [10u32, 12, 14, 16] {
            layouts_equal_the_oracle(4, 1 << log_n, u64::from(log_n));
        }
    }

    #[test]
    fn layout_equals_the_oracle_for_every_degree() {
        for degree in [2u8, 3, 5, 8, 16] {
            layouts_equal_the_oracle(degree, 3000, u64::from(degree));
        }
        // Groups too small for a full level.
        for members in [1u64, 2, 3, 5, 17] {
            layouts_equal_the_oracle(4, members, members);
        }
    }

    /// The same at 2^20 members: slow in a debug build, so run it in release:
    /// `cargo test --release -p rekeycast-proto --lib layout_equals -- --ignored`.
    #[test]
    #[ignore]
    fn layout_equals_the_oracle_at_2_20_members() {
        layouts_equal_the_oracle(4, 1 << 20, 20);
    }

    /// Leaves given out of the tree's order, or nodes that are not its leaves, lay out without a
    /// panic (the chunks are then whatever they are).
    #[test]
    fn leaves_not_of_the_tree_do_not_panic() {
        let mut tree = tree();
        let batch = tree
            .apply_batch(&(0..500).map(MemberId).collect::<Vec<_>>(), &[])
            .unwrap();
        let mut leaves = tree.leaves_in_order();
        leaves.reverse();
        for leaves in [
            leaves,
            vec![0, 0, 3, 70_000, 7],
            vec![tree.degree().max_node()],
        ] {
            for auth in [ChunkAuth::Signature, ChunkAuth::MerklePath] {
                let _ = lay_out(&batch, &leaves, 1200, auth);
            }
        }
    }

    #[test]
    fn order_keys_by_table_are_the_degrees() {
        for d in Degree::MIN..=Degree::MAX {
            let degree = Degree::new(d).unwrap();
            let keys = OrderKeys::new(degree);
            let max = degree.max_node();
            for node in (0..5000).chain(max - 5000..=max) {
                let (key, span) = keys.key_and_span(node);
                assert_eq!(key, degree.order_key(node), "d = {d}, node {node}");
                let below = degree.max_depth() - degree.depth(node);
                assert_eq!(span, u64::from(d).pow(below));
            }
            assert_eq!(keys.key(max + 1), u32::MAX);
        }
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

    /// The block size follows the chunk count unless set; a size set too small is a typed
    /// error naming the size needed.
    #[test]
    fn block_size_is_picked_from_the_chunk_count() {
        let auto = MessageParams::default();
        let default = rekeycast_fec::DEFAULT_MAX_BLOCK_SYMBOLS;
        assert_eq!(auto.block_symbols_for(1), default);
        assert_eq!(auto.block_symbols_for(255 * default), default);
        assert_eq!(auto.block_symbols_for(255 * default + 1), default + 1);
        // 175,000 chunks: 255 blocks of at most 687.
        assert_eq!(auto.block_symbols_for(175_000), 687);
        assert_eq!(
            auto.block_symbols_for(u32::MAX),
            rekeycast_fec::MAX_BLOCK_SYMBOLS
        );
        // Whatever the count, the FEC parameters accept the size picked (a fixed 256 fails
        // past 65,280 chunks).
        for chunks in [1, 255, 65_280, 65_281, 175_000, 1 << 22, 255 * 56_403] {
            let block_symbols = auto.block_symbols_for(chunks);
            assert!(
                rekeycast_fec::ObjectInfo::new(chunks, 1200, block_symbols).is_ok(),
                "{chunks} chunks, blocks of {block_symbols}"
            );
        }
        let set = MessageParams {
            max_block_symbols: 7,
            ..auto
        };
        assert_eq!(set.block_symbols_for(1_000_000), 7);

        // 10,000 members in their first batch: a few hundred chunks of 1,424 bytes.
        let mut tree = tree();
        let batch = tree
            .apply_batch(&(0..10_000).map(MemberId).collect::<Vec<_>>(), &[])
            .unwrap();
        let leaves = tree.leaves_in_order();
        let build = |max_block_symbols| {
            let params = MessageParams {
                max_block_symbols,
                ..params(ChunkAuth::Signature)
            };
            build_message(&batch, &leaves, &gcks(), &params)
        };
        let chunks = build(0).unwrap().chunks.len() as u32;
        assert!(chunks > 255, "{chunks} chunks");
        assert_eq!(
            u32::from(build(0).unwrap().fec_info.source_blocks()),
            chunks.div_ceil(default)
        );
        // One symbol a block is too small for more than 255 chunks.
        let needed = chunks.div_ceil(255);
        match build(1) {
            Err(BuildError::BlockSizeTooSmall {
                chunks: c,
                max_block_symbols: 1,
                needed: n,
            }) => assert_eq!((c, n), (chunks, needed)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            u32::from(build(needed).unwrap().fec_info.source_blocks()),
            chunks.div_ceil(needed)
        );
        assert!(matches!(
            build(rekeycast_fec::MAX_BLOCK_SYMBOLS + 1),
            Err(BuildError::Fec(_))
        ));
    }

    #[test]
    fn default_params() {
        let params = MessageParams::default();
        assert_eq!(params.chunk_auth, ChunkAuth::GroupSignature);
        assert_eq!(params.spi, 1);
        assert_eq!(params.symbol_size, 1200);
        assert_eq!(params.max_block_symbols, 0);
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
