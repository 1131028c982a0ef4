//! The GCKS side of one group's rekey transport, sans-IO: [`SenderSession`].
//!
//! The session owns the rekey messages in flight and in the history window, and decides what
//! goes on the wire and when: each message's manifest (sent first and repeated), its chunks'
//! source symbols, proactive repair per block ([`rekeycast_nack::ProactiveRepair`]), paced by
//! a token bucket; heartbeats carrying the latest sequence number, the GRTT probe, the group
//! size and the repair entries, at an interval that starts short after each message and
//! doubles up to a maximum (so a late member learns fast that it missed something, without
//! steady chatter); NACKs, MAC-checked, answered at once with fresh symbols sized from the
//! distribution of needs, between a floor that covers the typical NACKing member and a
//! ceiling that leaves only a small residual of the block's members to unicast
//! ([`rekeycast_nack::RepairAggregator`], [`rekeycast_nack::ProactiveRepair::repair_bounds`]),
//! announced at once by a repair advertisement (RFC 4046 5.2 and 5.4; DESIGN.md steps 4 and 7);
//! chunk requests answered by unicast, one datagram with the member's own chunk each, within
//! a per-source rate ([`super::chunk_repair`]). The loss estimate behind proactive repair and
//! the repair bounds learns from each chunk block's first round: the first NACK of a block is
//! recorded the moment it arrives (and the message's bounds recomputed before it is
//! answered), a block that drew none once its round is surely over. The repair policy and its
//! model are described in [`rekeycast_nack`]. Control traffic is sized to the message: a small message sends
//! fewer manifest copies (as many as the loss estimate needs, at most
//! [`SenderConfig::manifest_repeats`]); the first heartbeat after the one ending a message
//! comes one NACK window later. Feedback that passes
//! the MAC goes through replay protection ([`super::feedback::FeedbackGuard`]) before it
//! reaches the aggregator or the GRTT estimator.
//!
//! Each session is one sender instance: a random 32-bit id drawn when it is created, carried
//! in every heartbeat, so members keep a replay window per instance and take a restarted
//! sender (GCKS or relay) for what it is rather than for a replay of the old one.
//!
//! It builds no message (that is [`super::layout::build_message`], CPU work for a worker
//! thread, as is [`PreparedMessage::new`], which sets up the FEC encoder), holds no socket,
//! clock or thread, and does not persist anything (the GCKS persists before queueing).
//!
//! # Call order (as quinn-proto's `Connection`)
//!
//! 1. Commands: [`SenderSession::queue_message`] for every new message, in sequence order.
//! 2. Inputs: [`SenderSession::handle_datagram`] for every datagram that arrives on the
//!    sender's sockets (NACKs, probe replies; anything else is counted and dropped);
//!    [`SenderSession::handle_timeout`] when the deadline of
//!    [`SenderSession::poll_timeout`] passes.
//! 3. Outputs, after any command or input: [`SenderSession::poll_transmit`] until it returns
//!    `None`, [`SenderSession::poll_event`] until `None`, then re-read
//!    [`SenderSession::poll_timeout`].
//!
//! The resync endpoints read the history through
//! [`SenderSession::resync_item`], [`SenderSession::latest_manifest`] and
//! [`SenderSession::oldest_seq`]: everything they serve is already signed.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rekeycast_fec::ObjectEncoder;
use rekeycast_nack::{
    AggregatorConfig, BlockKey, BlockNackStats, GrttConfig, GrttEstimator, IncomingNack, ObjectId,
    ProactiveConfig, ProactiveRepair, ProbeEcho, RepairAggregator,
};

use super::chunk::ChunkHeader;
use super::chunk_repair::{ChunkRepairLimiter, Refusal};
use super::feedback::{FeedbackGuard, Verdict};
use super::layout::{find_chunk, BuiltMessage};
use super::manifest::SignedManifest;
use super::{micros, seal_into, ConfigError, Destination, Transmit};
use crate::auth::mac::MacKey;
use crate::wire::{
    self, BodyRepr, ChunkRepairRepr, DatagramRepr, HeartbeatRepr, ObjectKind, Packet, RepairEntry,
    SymbolRepr,
};

/// Configuration of a [`SenderSession`].
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default), durations are whole milliseconds in fields named `*_ms`, the nested configurations
/// are tables (`grtt`, `aggregator`, `proactive`), and a key that is not a field is an error.
/// Check what was read with [`SenderConfig::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SenderConfig {
    /// The largest datagram the session emits (UDP payload bytes); every message's symbols
    /// must fit it.
    pub datagram_size: usize,
    /// Initial transmissions (manifests, source and proactive repair symbols): datagrams per
    /// second.
    pub send_rate: f64,
    /// Depth of the initial transmissions' token bucket: the largest burst, in datagrams.
    pub burst: u32,
    /// The most copies of each manifest sent in a message's initial transmission (first, then
    /// spread evenly, the last one after every symbol). A small message sends only as many as
    /// the loss estimate calls for, at least one.
    pub manifest_repeats: u8,
    /// Messages kept for resync (the history window H).
    pub history: usize,
    /// The newest messages that still get multicast repair; older ones in the history are
    /// served by resync only.
    pub repair_window: usize,
    /// The first heartbeat interval after a message (raised to two GRTTs if shorter).
    #[serde(rename = "heartbeat_min_ms", with = "rekeycast_nack::duration_ms")]
    pub heartbeat_min: Duration,
    /// The longest heartbeat interval: intervals double after each message up to it.
    #[serde(rename = "heartbeat_max_ms", with = "rekeycast_nack::duration_ms")]
    pub heartbeat_max: Duration,
    /// The NACK backoff factor K advertised to receivers (window `K * GRTT`), within
    /// `1..=16` (receivers take no more from a heartbeat).
    pub backoff_factor: u8,
    /// The GRTT estimator's configuration.
    pub grtt: GrttConfig,
    /// The repair aggregator's configuration (its hold-off follows `K * GRTT`).
    pub aggregator: AggregatorConfig,
    /// The proactive repair helper's configuration.
    pub proactive: ProactiveConfig,
    /// Unicast chunk repairs answered per second to one source address (its token bucket's
    /// rate; see [`ChunkRepairLimiter`]).
    pub chunk_repair_rate: f64,
    /// The depth of each source's chunk repair token bucket: the most chunk requests of one
    /// source answered back to back.
    pub chunk_repair_burst: u32,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            datagram_size: wire::DEFAULT_DATAGRAM_SIZE,
            send_rate: 20_000.0,
            burst: 32,
            manifest_repeats: 3,
            history: 64,
            repair_window: 8,
            heartbeat_min: Duration::from_millis(50),
            heartbeat_max: Duration::from_secs(30),
            backoff_factor: 4,
            grtt: GrttConfig::default(),
            aggregator: AggregatorConfig::default(),
            proactive: ProactiveConfig::default(),
            chunk_repair_rate: 10.0,
            chunk_repair_burst: 4,
        }
    }
}

impl SenderConfig {
    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
        if !(wire::MIN_DATAGRAM_SIZE..=wire::MAX_DATAGRAM_SIZE).contains(&self.datagram_size) {
            return invalid("datagram_size", "must be within 256..=65507");
        }
        if !(self.send_rate.is_finite() && self.send_rate > 0.0) {
            return invalid("send_rate", "must be positive and finite");
        }
        if self.burst == 0 {
            return invalid("burst", "must be at least 1");
        }
        if self.manifest_repeats == 0 {
            return invalid("manifest_repeats", "must be at least 1");
        }
        if self.history == 0 {
            return invalid("history", "must be at least 1");
        }
        if self.repair_window == 0 {
            return invalid("repair_window", "must be at least 1");
        }
        if self.repair_window > self.history {
            // Repair is for messages the history still holds.
            return invalid("repair_window", "must not exceed history");
        }
        if self.heartbeat_min.is_zero() {
            return invalid("heartbeat_min", "must not be 0");
        }
        if self.heartbeat_max.is_zero() {
            return invalid("heartbeat_max", "must not be 0");
        }
        if self.heartbeat_max < self.heartbeat_min {
            return invalid("heartbeat_min", "must not exceed heartbeat_max");
        }
        if self.backoff_factor == 0 {
            return invalid("backoff_factor", "must be at least 1");
        }
        if self.backoff_factor > crate::auth::heartbeat::MAX_BACKOFF_FACTOR {
            // Members take at most this from a heartbeat (an insider could claim more).
            return invalid(
                "backoff_factor",
                "must be at most 16 (members take no more from a heartbeat)",
            );
        }
        if !(self.chunk_repair_rate.is_finite() && self.chunk_repair_rate > 0.0) {
            return invalid("chunk_repair_rate", "must be positive and finite");
        }
        if self.chunk_repair_burst == 0 {
            return invalid("chunk_repair_burst", "must be at least 1");
        }
        self.grtt.validate()?;
        self.aggregator.validate()?;
        self.proactive.validate()?;
        Ok(())
    }
}

/// A built message made ready to send: its FEC encoder set up and its chunk headers indexed
/// for resync lookups. Making one costs a copy of the chunks; do it off the event loop.
#[derive(Debug)]
pub struct PreparedMessage {
    seq: u64,
    group_id: u32,
    spi: u32,
    group_size: u32,
    mac_key: MacKey,
    manifest: Vec<u8>,
    headers: Vec<ChunkHeader>,
    /// Shared with a [`BlockSealer`] that seals the later blocks of a pipelined message.
    encoder: Arc<ObjectEncoder>,
    /// The initial transmission's datagrams, sealed off the event loop
    /// ([`PreparedMessage::seal_initial`]); dropped once that transmission is over.
    sealed: Option<SealedInitial>,
}

/// The datagrams of a message's initial transmission, sealed in advance: the loop only copies
/// them out.
#[derive(Debug)]
struct SealedInitial {
    /// The manifest's datagram.
    manifest: Vec<u8>,
    /// Per block (by SBN), its datagrams; `None` for a block still being sealed.
    blocks: Vec<Option<SealedBlock>>,
    /// The length of a symbol datagram (all are the same).
    stride: usize,
    /// Whether blocks are still being sealed ([`PreparedMessage::seal_head`]): the initial
    /// transmission waits for them instead of sealing them itself.
    pending: bool,
}

/// Why a built message cannot be prepared or queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The manifest does not parse (not a message of [`super::layout::build_message`]).
    #[error("malformed manifest")]
    Manifest(#[from] super::manifest::ManifestError),
    /// The chunks do not fit the FEC parameters.
    #[error(transparent)]
    Fec(#[from] rekeycast_fec::Error),
    /// The message is of another group or Rekey SA than the session.
    #[error("message of group {group_id} SPI {spi} queued on another session")]
    WrongGroup {
        /// The message's group.
        group_id: u32,
        /// The message's SPI.
        spi: u32,
    },
    /// The sequence number does not follow the last one queued.
    #[error("sequence number {seq} does not follow {last}")]
    OutOfOrder {
        /// The message's sequence number.
        seq: u64,
        /// The last one queued.
        last: u64,
    },
    /// A stored chunk does not parse.
    #[error("a stored chunk does not parse")]
    CorruptChunk,
    /// A symbol datagram would exceed the configured datagram size.
    #[error("symbols of {symbol_size} bytes do not fit datagrams of {datagram_size} bytes")]
    TooLarge {
        /// The message's symbol size.
        symbol_size: u16,
        /// The session's datagram size.
        datagram_size: usize,
    },
}

impl PreparedMessage {
    /// Prepares `built`, whose datagrams are MAC'd under `mac_key` (the batch's MAC key, see
    /// [`crate::lkh::RekeyBatch::mac_key`]).
    pub fn new(built: BuiltMessage, mac_key: MacKey) -> Result<Self, QueueError> {
        let signed = SignedManifest::parse(&built.manifest)?;
        let manifest = signed.manifest;
        let encoder = Arc::new(ObjectEncoder::from_chunks(
            built.fec_info,
            built.chunks.iter().map(Vec::as_slice),
        )?);
        let headers = built.layout.chunks.iter().map(|(h, _)| *h).collect();
        Ok(Self {
            seq: manifest.seq,
            group_id: manifest.group_id,
            spi: manifest.spi,
            group_size: manifest.group_size,
            mac_key,
            manifest: built.manifest,
            headers,
            encoder,
            sealed: None,
        })
    }

    /// A message from its stored parts (see [`crate::session::StoredMessage`]): its MAC key, its
    /// signed manifest and its source symbols concatenated. The manifest's FEC parameters
    /// rebuild the encoder; each chunk's header rebuilds the resync index.
    pub fn from_parts(
        mac_key: MacKey,
        manifest: Vec<u8>,
        symbols: Vec<u8>,
    ) -> Result<Self, QueueError> {
        let parsed = SignedManifest::parse(&manifest)?.manifest;
        let info = rekeycast_fec::ObjectInfo::parse(&parsed.fec_info)?;
        let encoder = Arc::new(ObjectEncoder::new(info, symbols)?);
        let symbol_size = usize::from(info.symbol_size());
        let headers = encoder
            .data()
            .chunks(symbol_size)
            .map(|chunk| {
                super::chunk::SignedChunk::parse(chunk, parsed.chunk_auth)
                    .map(|signed| signed.header)
                    .map_err(|_| QueueError::CorruptChunk)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            seq: parsed.seq,
            group_id: parsed.group_id,
            spi: parsed.spi,
            group_size: parsed.group_size,
            mac_key,
            manifest,
            headers,
            encoder,
            sealed: None,
        })
    }

    /// The parts [`Self::from_parts`] takes back: sequence number, MAC key bytes, signed
    /// manifest and source symbols.
    pub fn parts(&self) -> (u64, [u8; 32], &[u8], &[u8]) {
        (
            self.seq,
            *self.mac_key.as_bytes(),
            &self.manifest,
            self.encoder.data(),
        )
    }

    /// Builds every block's RaptorQ encoder now, so that the sender's event loop does not
    /// build them when it sends the first repair symbol of each block (measured: about half of
    /// the loop's time per datagram while sending a large message). Call it where the message
    /// is prepared, on a worker thread.
    pub fn build_repair_encoders(&self) -> Result<(), QueueError> {
        let blocks = self.encoder.partition().block_count();
        for sbn in 0..blocks {
            // block_count() <= 255 (the SBN is 8 bits), so the cast is exact.
            self.encoder.block(sbn as u8)?;
        }
        Ok(())
    }

    /// Seals the datagrams of the initial transmission now, on up to `threads` threads (one
    /// block's encoder and datagrams per task, blocks dealt round-robin), so that the sender's
    /// event loop only copies them: the manifest's datagram, every source symbol's, and for
    /// each block the proactive repair symbols `proactive` asks for at this moment (the sender
    /// makes and seals any more it wants when it queues the message). Builds every block's
    /// repair encoder on the way, as [`Self::build_repair_encoders`] does. Call it where the
    /// message is prepared, on a worker thread.
    pub fn seal_initial(
        &mut self,
        proactive: Option<&ProactiveRepair>,
        threads: usize,
    ) -> Result<(), QueueError> {
        let blocks = self.encoder.partition().block_count();
        let sealer = self.seal_head(proactive, threads, blocks)?;
        debug_assert!(sealer.is_none());
        Ok(())
    }

    /// As [`Self::seal_initial`] for the manifest and the first `head_blocks` blocks only; the
    /// sender sends them and then waits for the others, which the returned [`BlockSealer`]
    /// seals (on a worker, while the first ones are on the wire) and
    /// [`SenderSession::add_sealed`] hands over. `None` when `head_blocks` covers every block:
    /// the message is then as after [`Self::seal_initial`]. The datagrams are the same either
    /// way.
    pub fn seal_head(
        &mut self,
        proactive: Option<&ProactiveRepair>,
        threads: usize,
        head_blocks: u32,
    ) -> Result<Option<BlockSealer>, QueueError> {
        let info = *self.encoder.info();
        let partition = info.partition();
        let block_count = partition.block_count();
        let stride =
            wire::datagram::OVERHEAD + wire::symbol::FIXED_LEN + usize::from(info.symbol_size());
        let mut manifest =
            vec![0u8; wire::datagram::OVERHEAD + wire::symbol::FIXED_LEN + self.manifest.len()];
        let sealer = BlockSealer {
            encoder: Arc::clone(&self.encoder),
            group_id: self.group_id,
            spi: self.spi,
            seq: self.seq,
            key: self.mac_key.clone(),
            proactive: (0..block_count)
                .map(|sbn| {
                    // block_count() <= 255 (the SBN is 8 bits), so the cast is exact.
                    let k = partition.block_len(sbn as u8)?;
                    Ok(proactive.map_or(0, |p| {
                        p.proactive_symbols(u16::try_from(k).unwrap_or(u16::MAX))
                    }))
                })
                .collect::<Result<Vec<u16>, QueueError>>()?,
            stride,
            threads,
            next: 0,
        };
        // Every buffer is exactly one datagram's length, so sealing cannot run out of room;
        // were it ever to, the message is refused as unsendable rather than sent short.
        sealer
            .sealer()
            .seal(ObjectKind::Manifest, 0, 0, &self.manifest, &mut manifest)
            .ok_or(QueueError::CorruptChunk)?;
        let mut sealer = sealer;
        let head = sealer.seal_next(head_blocks.max(1))?;
        let mut blocks: Vec<Option<SealedBlock>> = head.blocks.into_iter().map(Some).collect();
        blocks.resize_with(block_count as usize, || None);
        let pending = !head.last;
        self.sealed = Some(SealedInitial {
            manifest,
            blocks,
            stride,
            pending,
        });
        Ok(pending.then_some(sealer))
    }

    /// Takes the sealed datagrams of blocks that [`Self::seal_head`] left to a
    /// [`BlockSealer`]. Blocks of another message, or whose transmission is over, are ignored.
    pub fn add_sealed(&mut self, sealed: SealedBlocks) {
        if sealed.seq != self.seq {
            return;
        }
        let Some(initial) = self.sealed.as_mut() else {
            return;
        };
        let first = usize::from(sealed.first);
        for (slot, block) in initial.blocks.iter_mut().skip(first).zip(sealed.blocks) {
            *slot = Some(block);
        }
        if sealed.last {
            initial.pending = false;
        }
    }

    /// Whether blocks of it are still being sealed by a [`BlockSealer`] ([`Self::seal_head`]).
    pub fn is_sealing(&self) -> bool {
        self.sealed.as_ref().is_some_and(|sealed| sealed.pending)
    }

    /// Whether the initial transmission's step `step` waits for blocks still being sealed
    /// ([`Self::seal_head`]).
    fn waits_for(&self, step: Step) -> bool {
        let Some(sealed) = self.sealed.as_ref().filter(|sealed| sealed.pending) else {
            return false;
        };
        match step {
            Step::Manifest => false,
            Step::Source { sbn, .. } | Step::Proactive { sbn, .. } => sealed
                .blocks
                .get(usize::from(sbn))
                .is_some_and(Option::is_none),
        }
    }

    /// Whether the initial transmission's datagrams are sealed in advance.
    pub fn is_sealed(&self) -> bool {
        self.sealed.is_some()
    }

    /// The sealed datagram of an initial transmission step, if it was sealed in advance.
    fn sealed_step(&self, step: Step) -> Option<&[u8]> {
        let sealed = self.sealed.as_ref()?;
        match step {
            Step::Manifest => Some(&sealed.manifest),
            Step::Source { sbn, esi } => {
                let block = sealed.blocks.get(usize::from(sbn))?.as_ref()?;
                let at = esi as usize * sealed.stride;
                block.source.get(at..at + sealed.stride)
            }
            Step::Proactive { sbn, esi } => {
                let k = self.encoder.partition().block_len(sbn).ok()?;
                let block = sealed.blocks.get(usize::from(sbn))?.as_ref()?;
                let at = (esi.checked_sub(k)? as usize) * sealed.stride;
                block.proactive.get(at..at + sealed.stride)
            }
        }
    }

    /// The message's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The number of chunks (source symbols) of the message.
    pub fn chunk_count(&self) -> usize {
        self.headers.len()
    }
}

/// One block's initial datagrams, sealed in advance.
#[derive(Debug)]
struct SealedBlock {
    /// Its source symbols' datagrams, `stride` bytes each, by ESI.
    source: Vec<u8>,
    /// Its first proactive repair symbols' datagrams (ESIs `k ..`), `stride` each.
    proactive: Vec<u8>,
}

/// The sealed datagrams of consecutive blocks of a message, from a [`BlockSealer`], for
/// [`SenderSession::add_sealed`].
#[derive(Debug)]
pub struct SealedBlocks {
    seq: u64,
    first: u8,
    blocks: Vec<SealedBlock>,
    last: bool,
}

impl SealedBlocks {
    /// The message's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether these are the message's last blocks.
    pub fn is_last(&self) -> bool {
        self.last
    }
}

/// Seals a message's blocks in order, a few at a time, off the event loop: what
/// [`PreparedMessage::seal_head`] leaves for later. It shares the message's encoder.
#[derive(Debug)]
pub struct BlockSealer {
    encoder: Arc<ObjectEncoder>,
    group_id: u32,
    spi: u32,
    seq: u64,
    key: MacKey,
    /// Per block, how many proactive repair symbols to seal.
    proactive: Vec<u16>,
    stride: usize,
    threads: usize,
    /// The first block not sealed yet.
    next: u32,
}

impl BlockSealer {
    fn sealer(&self) -> Sealer<'_> {
        Sealer {
            group_id: self.group_id,
            spi: self.spi,
            seq: self.seq,
            key: &self.key,
        }
    }

    /// Whether every block is sealed.
    pub fn is_done(&self) -> bool {
        self.next as usize >= self.proactive.len()
    }

    /// Seals the next `count` blocks (fewer at the end; at least one) on up to the
    /// sealer's threads, each block's repair encoder built on the way.
    pub fn seal_next(&mut self, count: u32) -> Result<SealedBlocks, QueueError> {
        let total = self.proactive.len() as u32;
        let first = self.next.min(total);
        let end = first.saturating_add(count.max(1)).min(total);
        self.next = end;
        let partition = self.encoder.partition();
        let stride = self.stride;
        let sealer = self.sealer();
        let encoder = &self.encoder;
        let run = |sbn: u8| -> Result<SealedBlock, QueueError> {
            let k = partition.block_len(sbn)?;
            let h = self.proactive.get(usize::from(sbn)).copied().unwrap_or(0);
            let mut source = vec![0u8; k as usize * stride];
            for (esi, slot) in (0..k).zip(source.chunks_exact_mut(stride)) {
                let data = encoder.source_symbol(sbn, esi)?;
                sealer
                    .seal(ObjectKind::Chunks, sbn, esi, data, slot)
                    .ok_or(QueueError::CorruptChunk)?;
            }
            let block = encoder.block(sbn)?;
            let mut proactive = vec![0u8; usize::from(h) * stride];
            if h > 0 {
                let symbols = block.repair_symbols(k, u32::from(h))?;
                for (symbol, (esi, slot)) in
                    symbols.zip((k..).zip(proactive.chunks_exact_mut(stride)))
                {
                    sealer
                        .seal(ObjectKind::Chunks, sbn, esi, &symbol, slot)
                        .ok_or(QueueError::CorruptChunk)?;
                }
            }
            Ok(SealedBlock { source, proactive })
        };
        // block_count() <= 255 (the SBN is 8 bits), so the casts are exact.
        let sbns: Vec<u8> = (first..end).map(|sbn| sbn as u8).collect();
        let threads = self.threads.clamp(1, sbns.len().max(1));
        let blocks = if threads == 1 {
            sbns.into_iter().map(run).collect::<Result<Vec<_>, _>>()?
        } else {
            // Blocks dealt round-robin, so that each thread gets a share of every size.
            let mut shares: Vec<Vec<(usize, u8)>> = (0..threads).map(|_| Vec::new()).collect();
            for (i, sbn) in sbns.iter().enumerate() {
                shares[i % threads].push((i, *sbn));
            }
            let mut results: Vec<Option<SealedBlock>> = sbns.iter().map(|_| None).collect();
            std::thread::scope(|scope| {
                let handles: Vec<_> = shares
                    .into_iter()
                    .map(|share| {
                        let run = &run;
                        scope.spawn(move || {
                            share
                                .into_iter()
                                .map(|(i, sbn)| run(sbn).map(|block| (i, block)))
                                .collect::<Result<Vec<_>, _>>()
                        })
                    })
                    .collect();
                for handle in handles {
                    match handle.join() {
                        Ok(done) => {
                            for (i, block) in done? {
                                results[i] = Some(block);
                            }
                        }
                        // Sealing does not panic; if it ever did, the panic goes on to the
                        // caller as it would have on one thread.
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
                Ok::<_, QueueError>(())
            })?;
            results
                .into_iter()
                .map(|block| block.ok_or(QueueError::CorruptChunk))
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(SealedBlocks {
            seq: self.seq,
            first: first as u8,
            blocks,
            last: end >= total,
        })
    }
}

/// Seals symbol datagrams of one message (its group, SPI, sequence number and MAC key).
#[derive(Clone, Copy)]
struct Sealer<'a> {
    group_id: u32,
    spi: u32,
    seq: u64,
    key: &'a MacKey,
}

impl Sealer<'_> {
    fn seal(
        &self,
        object: ObjectKind,
        sbn: u8,
        esi: u32,
        data: &[u8],
        buf: &mut [u8],
    ) -> Option<usize> {
        let repr = DatagramRepr {
            group_id: self.group_id,
            spi: self.spi,
            seq: self.seq,
            body: BodyRepr::Symbol(SymbolRepr {
                object,
                sbn,
                esi,
                data,
            }),
            mac: [0; wire::datagram::MAC_LEN],
        };
        seal_into(&repr, self.key, buf)
    }
}

/// What the session reports to its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SenderEvent {
    /// The initial transmission of message `seq` (every source and proactive repair symbol
    /// and every manifest repeat) is on the wire.
    InitialTransmissionDone {
        /// The message.
        seq: u64,
    },
    /// Message `seq` left the history window: resync can no longer serve it.
    Retired {
        /// The message.
        seq: u64,
    },
}

/// Counts of what the session sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderCounters {
    /// Manifest datagrams sent (initial repeats and repair).
    pub manifests_sent: u64,
    /// Source symbols sent.
    pub source_symbols_sent: u64,
    /// Proactive repair symbols sent.
    pub proactive_symbols_sent: u64,
    /// Repair symbols sent in answer to NACKs.
    pub repair_symbols_sent: u64,
    /// Heartbeats sent (periodic).
    pub heartbeats_sent: u64,
    /// Immediate repair advertisements sent.
    pub advertisements_sent: u64,
    /// Bytes of every datagram sent.
    pub bytes_sent: u64,
    /// Bytes of the source symbols sent (the message's own size, once per message).
    pub source_bytes_sent: u64,
    /// NACKs that passed the MAC check.
    pub nacks_received: u64,
    /// Probe replies that passed the MAC check.
    pub probe_replies_received: u64,
    /// Authentic NACKs and probe replies dropped as replays: the same bytes were taken before.
    pub replayed_feedback: u64,
    /// Authentic NACKs and probe replies dropped because they echo a probe this sender did not
    /// send, or sent too long ago to remember.
    pub stale_feedback: u64,
    /// Repair orders made (at most one per block and round).
    pub repair_orders: u64,
    /// Datagrams dropped: malformed, another group, unknown sequence number or bad MAC.
    pub rejected: u64,
    /// Authentic datagrams of a kind a sender does not take (symbols, heartbeats).
    pub ignored: u64,
    /// Transmits skipped because the driver's buffer was smaller than the datagram.
    pub buffer_too_small: u64,
    /// FEC errors while making a repair symbol (none expected).
    pub fec_errors: u64,
}

/// Counts of unicast chunk repair ([`super::chunk_repair`]): requests taken, answered and
/// refused, and what the answers cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkRepairCounters {
    /// Chunk requests that passed the MAC check and replay protection.
    pub requests_received: u64,
    /// Chunk repair datagrams sent (one member's chunk each, by unicast).
    pub repairs_sent: u64,
    /// Bytes of those datagrams (also counted in [`SenderCounters::bytes_sent`]).
    pub bytes_sent: u64,
    /// Requests refused by the source's token bucket (or because every bucket was in use).
    pub rate_limited: u64,
    /// Requests for a chunk already sent to that member less than a round trip ago.
    pub answered_recently: u64,
    /// Requests for a message outside the repair window, or for a leaf no chunk serves.
    pub no_chunk: u64,
}

/// A unicast chunk repair the session owes a member.
#[derive(Debug, Clone, Copy)]
struct UnicastRepair {
    to: SocketAddr,
    seq: u64,
    sbn: u8,
    esi: u32,
    receiver_id: u32,
}

/// Unicast chunk repairs queued at most; a request beyond is refused as rate-limited.
const MAX_UNICAST_QUEUE: usize = 4096;

/// One step of a message's initial transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Manifest,
    Source { sbn: u8, esi: u32 },
    Proactive { sbn: u8, esi: u32 },
}

#[derive(Debug)]
struct Outgoing {
    message: PreparedMessage,
    /// Proactive repair symbols per block, fixed when the message is queued.
    proactive: Vec<u16>,
    plan: Vec<Step>,
    next_step: usize,
    finished_at: Option<Instant>,
    /// Per block: whether its first-round statistics were recorded.
    recorded: Vec<bool>,
    /// Per block: the need of the first first-round NACK heard (0: none yet).
    first_round_need: Vec<u16>,
}

/// The GCKS side of one group's rekey transport. See the [module docs](self) for the call
/// order.
#[derive(Debug)]
pub struct SenderSession {
    config: SenderConfig,
    group_id: u32,
    spi: u32,
    /// The history window, ascending by sequence number.
    messages: VecDeque<Outgoing>,
    /// Sequence numbers inside the history window whose message this session does not hold
    /// (lost from a restarted GCKS's state directory): resync answers "not held" for them.
    not_held: BTreeSet<u64>,
    /// Sequence numbers whose initial transmission is not finished, in order.
    initial: VecDeque<u64>,
    tokens: f64,
    refilled_at: Instant,
    grtt: GrttEstimator,
    aggregator: RepairAggregator,
    proactive: ProactiveRepair,
    heartbeat_at: Option<Instant>,
    heartbeat_interval: Duration,
    probe_request_at: Instant,
    last_probe_us: Option<u64>,
    recent_orders: VecDeque<RepairEntry>,
    group_size: u32,
    /// The group size heartbeats advertise instead of the manifests' (a relay's segment).
    advertised_group_size: Option<u32>,
    /// This sender instance's id, carried in its heartbeats.
    instance: u32,
    feedback: FeedbackGuard,
    events: VecDeque<SenderEvent>,
    counters: SenderCounters,
    chunk_repair: ChunkRepairLimiter,
    unicast: VecDeque<UnicastRepair>,
    chunk_counters: ChunkRepairCounters,
    /// NACKs received per block and round of the messages still repairable.
    nack_counts: std::collections::BTreeMap<(u64, ObjectId, u8, u8), u32>,
    /// How many block-rounds drew `i` NACKs, `i` capped at [`NACK_HISTOGRAM_LEN`] - 1, for
    /// the messages that left the repair window.
    nack_histogram: Vec<u64>,
}

/// Buckets of [`SenderSession::nacks_per_lost_block`]: the last one holds every block-round
/// that drew at least this many NACKs less one.
pub const NACK_HISTOGRAM_LEN: usize = 256;

/// Repair entries a heartbeat repeats (the newest orders).
const HEARTBEAT_ENTRIES: usize = 8;

impl SenderSession {
    /// A session for the group and Rekey SA `(group_id, spi)` with no message yet; fails on an
    /// invalid configuration. Its instance id is drawn at random (see the
    /// [module docs](self)).
    pub fn new(
        config: SenderConfig,
        group_id: u32,
        spi: u32,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        Self::with_instance(config, group_id, spi, rand::random(), now)
    }

    /// [`Self::new`] with the instance id given: the caller draws it (from the operating
    /// system's RNG in a deployment, from a seed in a simulation), so the session draws
    /// nothing itself.
    pub fn with_instance(
        config: SenderConfig,
        group_id: u32,
        spi: u32,
        instance: u32,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let grtt = GrttEstimator::new(config.grtt, now)?;
        let mut aggregator = RepairAggregator::new(config.aggregator.clone())?;
        tune_aggregator(&mut aggregator, grtt.grtt(), config.backoff_factor);
        let proactive = ProactiveRepair::new(config.proactive)?;
        let chunk_repair =
            ChunkRepairLimiter::new(config.chunk_repair_rate, config.chunk_repair_burst);
        Ok(Self {
            tokens: f64::from(config.burst),
            refilled_at: now,
            heartbeat_interval: config.heartbeat_min,
            probe_request_at: now,
            config,
            group_id,
            spi,
            messages: VecDeque::new(),
            not_held: BTreeSet::new(),
            initial: VecDeque::new(),
            grtt,
            aggregator,
            proactive,
            heartbeat_at: None,
            last_probe_us: None,
            recent_orders: VecDeque::new(),
            group_size: 0,
            advertised_group_size: None,
            instance,
            feedback: FeedbackGuard::new(),
            events: VecDeque::new(),
            counters: SenderCounters::default(),
            chunk_repair,
            unicast: VecDeque::new(),
            chunk_counters: ChunkRepairCounters::default(),
            nack_counts: std::collections::BTreeMap::new(),
            nack_histogram: vec![0; NACK_HISTOGRAM_LEN],
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SenderConfig {
        &self.config
    }

    /// The counters so far.
    pub fn counters(&self) -> &SenderCounters {
        &self.counters
    }

    /// How many block-rounds (a block of a message that somebody NACKed, in one repair round)
    /// drew each number of NACKs: element `i` counts those that drew `i` (the last element,
    /// [`NACK_HISTOGRAM_LEN`] - 1 or more). Element 0 is always 0.
    pub fn nacks_per_lost_block(&self) -> Vec<u64> {
        let mut histogram = self.nack_histogram.clone();
        for &count in self.nack_counts.values() {
            histogram[(count as usize).min(NACK_HISTOGRAM_LEN - 1)] += 1;
        }
        histogram
    }

    /// The unicast chunk repair counters so far.
    pub fn chunk_repair_counters(&self) -> &ChunkRepairCounters {
        &self.chunk_counters
    }

    /// The repair aggregator's counters.
    pub fn repair_stats(&self) -> rekeycast_nack::AggregatorStats {
        self.aggregator.stats()
    }

    /// This sender instance's id, carried in its heartbeats.
    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// The proactive repair estimator as it stands: how many repair symbols a block of `k`
    /// would get if a message were queued now (see [`PreparedMessage::seal_initial`]).
    pub fn proactive_repair(&self) -> &ProactiveRepair {
        &self.proactive
    }

    /// The current GRTT estimate.
    pub fn grtt(&self) -> Duration {
        self.grtt.grtt()
    }

    /// The proactive repair helper's current loss estimate.
    pub fn loss_estimate(&self) -> f64 {
        self.proactive.loss_estimate()
    }

    /// Makes heartbeats advertise `size` as the group size (the receivers' NACK backoff
    /// scales with it) instead of the size each message's manifest states: for a relay, whose
    /// segment holds only part of the group. `None` goes back to the manifests' size.
    pub fn set_advertised_group_size(&mut self, size: Option<u32>) {
        self.advertised_group_size = size.map(|s| s.max(1));
    }

    /// Message `seq` if the history window holds it: what a relay stores after forwarding it
    /// ([`PreparedMessage::parts`]).
    pub fn message(&self, seq: u64) -> Option<&PreparedMessage> {
        self.find(seq).map(|outgoing| &outgoing.message)
    }

    /// The sequence number of the newest message queued.
    pub fn latest_seq(&self) -> Option<u64> {
        self.messages.back().map(|m| m.message.seq)
    }

    /// The oldest sequence number the history still holds.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.messages.front().map(|m| m.message.seq)
    }

    /// The newest message's signed manifest, with its sequence number: what a resync
    /// endpoint's state answer carries.
    pub fn latest_manifest(&self) -> Option<(u64, &[u8])> {
        self.messages
            .back()
            .map(|m| (m.message.seq, m.message.manifest.as_slice()))
    }

    /// The signed manifest of message `seq` and the chunk that serves the leaf with order key
    /// `order_key` (see [`crate::lkh::Degree::order_key`]): what a member fetches on resync.
    pub fn resync_item(&self, seq: u64, order_key: u32) -> Result<ResyncItem<'_>, ResyncLookup> {
        let outgoing = self
            .find(seq)
            .ok_or_else(|| match self.missing::<()>(seq) {
                crate::resync::Lookup::BeyondHistory { oldest } => {
                    ResyncLookup::BeyondHistory { oldest }
                }
                crate::resync::Lookup::NotFound => ResyncLookup::NotHeld,
                _ => ResyncLookup::NotSent,
            })?;
        let message = &outgoing.message;
        let index = find_chunk(&message.headers, order_key).ok_or(ResyncLookup::NoChunk)?;
        let index = u32::try_from(index).map_err(|_| ResyncLookup::NoChunk)?;
        let id = message
            .encoder
            .partition()
            .locate(index)
            .map_err(|_| ResyncLookup::NoChunk)?;
        let chunk = message
            .encoder
            .source_symbol(id.sbn, id.esi)
            .map_err(|_| ResyncLookup::NoChunk)?;
        Ok(ResyncItem {
            seq,
            manifest: &message.manifest,
            chunk,
        })
    }

    /// Queues a prepared message. Its sequence number must follow the last one queued; its
    /// initial transmission starts when the ones before it are finished (their repair goes on
    /// in parallel). Messages beyond the history window are retired.
    pub fn queue_message(
        &mut self,
        now: Instant,
        message: PreparedMessage,
    ) -> Result<(), QueueError> {
        self.enqueue(now, message, None)
    }

    /// Queues a message some of whose source symbols were already multicast into this
    /// session's group by someone else: `sent[sbn][esi]` marks them (a relay forwards each
    /// verified source symbol the moment it arrives, cut-through, and adopts the message once
    /// it holds it whole). The initial transmission sends only the other source symbols, the
    /// proactive repair and one manifest at the end; repair, heartbeats and resync are those
    /// of any queued message.
    pub fn adopt_message(
        &mut self,
        now: Instant,
        message: PreparedMessage,
        sent: &[Vec<bool>],
    ) -> Result<(), QueueError> {
        self.enqueue(now, message, Some(sent))
    }

    fn enqueue(
        &mut self,
        now: Instant,
        message: PreparedMessage,
        sent: Option<&[Vec<bool>]>,
    ) -> Result<(), QueueError> {
        self.check_queueable(&message)?;
        let info = *message.encoder.info();
        let symbol_size = info.symbol_size();
        let symbol_datagram =
            wire::datagram::OVERHEAD + wire::symbol::FIXED_LEN + usize::from(symbol_size);
        let manifest_datagram =
            wire::datagram::OVERHEAD + wire::symbol::FIXED_LEN + message.manifest.len();
        if symbol_datagram.max(manifest_datagram) > self.config.datagram_size {
            return Err(QueueError::TooLarge {
                symbol_size,
                datagram_size: self.config.datagram_size,
            });
        }
        let partition = info.partition();
        let blocks = partition.block_count();
        let group_size = self.advertised_group_size.unwrap_or(message.group_size);
        let chunk_count = message.headers.len();
        let mut proactive = Vec::new();
        let mut symbol_steps = Vec::new();
        for sbn in 0..blocks {
            // block_count() <= 255 (the SBN is 8 bits), so the cast is exact.
            let sbn = sbn as u8;
            let k = partition.block_len(sbn)?;
            let h = self
                .proactive
                .proactive_symbols(u16::try_from(k).unwrap_or(u16::MAX));
            proactive.push(h);
            let already_sent = |esi: u32| {
                sent.and_then(|sent| sent.get(usize::from(sbn)))
                    .and_then(|block| block.get(esi as usize))
                    .copied()
                    .unwrap_or(false)
            };
            symbol_steps.extend(
                (0..k)
                    .filter(|&esi| !already_sent(esi))
                    .map(|esi| Step::Source { sbn, esi }),
            );
            symbol_steps.extend((k..k + u32::from(h)).map(|esi| Step::Proactive { sbn, esi }));
            let key = BlockKey {
                seq: message.seq,
                object: ObjectId::Chunks,
                sbn,
            };
            self.aggregator.register_block(key, k + u32::from(h));
            let receivers = block_receivers(group_size, k, chunk_count);
            let (floor, ceiling) = self.proactive.repair_bounds(
                u16::try_from(k).unwrap_or(u16::MAX),
                h,
                receivers,
                UNICAST_RESIDUAL,
                self.config.aggregator.max_repair_per_round,
            );
            self.aggregator.set_block_bounds(key, floor, ceiling);
        }
        self.aggregator.register_block(
            BlockKey {
                seq: message.seq,
                object: ObjectId::Manifest,
                sbn: 0,
            },
            1,
        );
        let plan = if sent.is_some() {
            // The manifest went out first, forwarded: one more after the symbols, for those
            // that lost it.
            let mut plan = symbol_steps;
            plan.push(Step::Manifest);
            plan
        } else {
            let copies = manifest_copies(
                self.config.manifest_repeats,
                symbol_steps.len(),
                self.proactive.loss_estimate(),
            );
            interleave_manifests(symbol_steps, copies)
        };
        self.group_size = message.group_size;
        self.initial.push_back(message.seq);
        self.messages.push_back(Outgoing {
            recorded: vec![false; proactive.len()],
            first_round_need: vec![0; proactive.len()],
            proactive,
            plan,
            next_step: 0,
            finished_at: None,
            message,
        });
        self.retire(now);
        Ok(())
    }

    /// Puts a message that was sent before a restart back into the history window, without
    /// sending it again: resync serves it, multicast repair does not; heartbeats resume. Messages must come in
    /// sequence order, before any [`Self::queue_message`] of a later one.
    pub fn restore_message(
        &mut self,
        now: Instant,
        message: PreparedMessage,
    ) -> Result<(), QueueError> {
        self.check_queueable(&message)?;
        self.group_size = message.group_size;
        self.messages.push_back(Outgoing {
            proactive: Vec::new(),
            plan: Vec::new(),
            next_step: 0,
            finished_at: Some(now),
            recorded: Vec::new(),
            first_round_need: Vec::new(),
            message,
        });
        // Heartbeats go on after a restart: members behind a quiet sender would otherwise
        // hear nothing until the next message and ask for state after their silence timeout.
        if self.heartbeat_at.is_none() {
            self.heartbeat_at = Some(now);
        }
        self.retire(now);
        Ok(())
    }

    /// Records that message `seq`, sent before a restart, is inside the history window but
    /// lost (its stored copy is missing or corrupt): resync answers "not held" for it
    /// ([`crate::resync::Lookup::NotFound`], [`ResyncLookup::NotHeld`]) instead of "not sent
    /// yet", so a member asks its next endpoint. It comes in sequence order with
    /// [`Self::restore_message`], before any [`Self::queue_message`] of a later message, and
    /// leaves the window as a message would.
    pub fn restore_not_held(&mut self, seq: u64) -> Result<(), QueueError> {
        let last = self.latest_seq().max(self.not_held.last().copied());
        if let Some(last) = last.filter(|&last| seq <= last) {
            return Err(QueueError::OutOfOrder { seq, last });
        }
        self.not_held.insert(seq);
        Ok(())
    }

    /// The sequence numbers inside the history window whose message is not held
    /// ([`Self::restore_not_held`]), ascending.
    pub fn not_held(&self) -> impl Iterator<Item = u64> + '_ {
        self.not_held.iter().copied()
    }

    fn check_queueable(&self, message: &PreparedMessage) -> Result<(), QueueError> {
        if message.group_id != self.group_id || message.spi != self.spi {
            return Err(QueueError::WrongGroup {
                group_id: message.group_id,
                spi: message.spi,
            });
        }
        if let Some(last) = self.latest_seq().max(self.not_held.last().copied()) {
            if message.seq <= last {
                return Err(QueueError::OutOfOrder {
                    seq: message.seq,
                    last,
                });
            }
        }
        Ok(())
    }

    /// A datagram arrived from `from`. NACKs and probe replies are MAC-checked under the key
    /// of their sequence number, dropped if replayed or stale, and handed to the aggregator
    /// and the GRTT estimator; everything else is counted and dropped.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let _ = from;
        let Some(repr) = self.authenticate(bytes) else {
            self.counters.rejected += 1;
            return;
        };
        let verdict = match &repr.body {
            BodyRepr::Nack(nack) | BodyRepr::ChunkRequest(nack) => Some(self.feedback.check(
                bytes,
                nack.receiver_id,
                nack.echo.map(|echo| echo.timestamp_us),
            )),
            BodyRepr::ProbeReply(reply) => Some(self.feedback.check(
                bytes,
                reply.receiver_id,
                Some(reply.echo.timestamp_us),
            )),
            BodyRepr::Symbol(_)
            | BodyRepr::Heartbeat(_)
            | BodyRepr::ChunkRepair(_)
            | BodyRepr::Delivery(_)
            | BodyRepr::Ack(_) => None,
        };
        let sample = match verdict {
            Some(Verdict::Replayed) => {
                self.counters.replayed_feedback += 1;
                return;
            }
            Some(Verdict::Stale) => {
                self.counters.stale_feedback += 1;
                return;
            }
            Some(Verdict::Fresh { sample }) => sample,
            None => false,
        };
        match repr.body {
            BodyRepr::Nack(nack) => {
                self.counters.nacks_received += 1;
                let Some(object) = ObjectId::from_u8(nack.object as u8) else {
                    return;
                };
                let incoming = IncomingNack {
                    block: BlockKey {
                        seq: repr.seq,
                        object,
                        sbn: nack.sbn,
                    },
                    round: nack.round,
                    need: nack.need,
                };
                if object == ObjectId::Chunks && nack.round == 1 {
                    self.first_nack_of_block(repr.seq, nack.sbn, nack.need);
                }
                let _ = self.aggregator.handle_nack(now, &incoming);
                if self.in_repair_window(repr.seq) {
                    *self
                        .nack_counts
                        .entry((repr.seq, object, nack.sbn, nack.round.max(1)))
                        .or_insert(0) += 1;
                }
                if let Some(echo) = nack.echo.filter(|_| sample) {
                    self.handle_echo(now, echo.timestamp_us, echo.hold_us);
                }
            }
            BodyRepr::ProbeReply(reply) => {
                self.counters.probe_replies_received += 1;
                if sample {
                    self.handle_echo(now, reply.echo.timestamp_us, reply.echo.hold_us);
                }
            }
            BodyRepr::ChunkRequest(request) => {
                self.chunk_counters.requests_received += 1;
                if let Some(echo) = request.echo.filter(|_| sample) {
                    self.handle_echo(now, echo.timestamp_us, echo.hold_us);
                }
                self.handle_chunk_request(now, from, repr.seq, request.receiver_id);
            }
            BodyRepr::Symbol(_)
            | BodyRepr::Heartbeat(_)
            | BodyRepr::ChunkRepair(_)
            | BodyRepr::Delivery(_)
            | BodyRepr::Ack(_) => self.counters.ignored += 1,
        }
    }

    /// A MAC-checked, fresh chunk request from `from`: the chunk of message `seq` that serves
    /// the leaf with order key `order_key` goes back to `from` by unicast, within the
    /// source's rate and at most once per member, message and round trip.
    fn handle_chunk_request(&mut self, now: Instant, from: SocketAddr, seq: u64, order_key: u32) {
        if !self.in_repair_window(seq) {
            self.chunk_counters.no_chunk += 1;
            return;
        }
        let Some(outgoing) = self.find(seq) else {
            self.chunk_counters.no_chunk += 1;
            return;
        };
        let located = find_chunk(&outgoing.message.headers, order_key)
            .and_then(|index| u32::try_from(index).ok())
            .and_then(|index| outgoing.message.encoder.partition().locate(index).ok());
        let Some(id) = located else {
            self.chunk_counters.no_chunk += 1;
            return;
        };
        if self.unicast.len() >= MAX_UNICAST_QUEUE {
            self.chunk_counters.rate_limited += 1;
            return;
        }
        match self
            .chunk_repair
            .admit(now, from, seq, order_key, self.grtt.grtt())
        {
            Ok(()) => self.unicast.push_back(UnicastRepair {
                to: from,
                seq,
                sbn: id.sbn,
                esi: id.esi,
                receiver_id: order_key,
            }),
            Err(Refusal::AnsweredRecently) => self.chunk_counters.answered_recently += 1,
            Err(Refusal::RateLimited | Refusal::TooManySources) => {
                self.chunk_counters.rate_limited += 1
            }
        }
    }

    /// Whether message `seq` is among the newest [`SenderConfig::repair_window`] messages.
    fn in_repair_window(&self, seq: u64) -> bool {
        self.latest_seq()
            .is_some_and(|latest| seq <= latest && latest - seq < self.config.repair_window as u64)
    }

    /// Writes the next queued unicast chunk repair into `buf`.
    fn unicast_repair(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        while let Some(repair) = self.unicast.pop_front() {
            let Some(outgoing) = self.find(repair.seq) else {
                continue;
            };
            let key = outgoing.message.mac_key.clone();
            let Ok(chunk) = outgoing
                .message
                .encoder
                .source_symbol(repair.sbn, repair.esi)
            else {
                self.counters.fec_errors += 1;
                continue;
            };
            let chunk = chunk.to_vec();
            let repr = DatagramRepr {
                group_id: self.group_id,
                spi: self.spi,
                seq: repair.seq,
                body: BodyRepr::ChunkRepair(ChunkRepairRepr {
                    sbn: repair.sbn,
                    esi: repair.esi,
                    receiver_id: repair.receiver_id,
                    chunk: &chunk,
                }),
                mac: [0; wire::datagram::MAC_LEN],
            };
            let Some(len) = self.seal(&repr, &key, buf) else {
                continue;
            };
            self.counters.bytes_sent += len as u64;
            self.chunk_counters.repairs_sent += 1;
            self.chunk_counters.bytes_sent += len as u64;
            return Some(Transmit {
                destination: Destination::Unicast(repair.to),
                len,
            });
        }
        None
    }

    /// Time passed: GRTT intervals end, aggregation windows close, statistics are recorded.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.grtt.handle_timeout(now);
        tune_aggregator(
            &mut self.aggregator,
            self.grtt.grtt(),
            self.config.backoff_factor,
        );
        self.aggregator.handle_timeout(now);
        self.drain_orders();
        self.record_quiet_blocks(now);
    }

    /// Takes one token from the initial transmissions' bucket for a datagram sent into this
    /// session's group on its behalf (a relay's cut-through forwards), so that the group sees
    /// one pacing: true if a whole token was there, false (nothing taken) to wait until
    /// [`Self::send_token_at`].
    pub fn take_send_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// When the initial transmissions' bucket next holds a whole token (in the past if it
    /// holds one now).
    pub fn send_token_at(&self) -> Instant {
        self.next_token_at()
    }

    /// The next datagram to send, written into `buf` (which must hold
    /// [`SenderConfig::datagram_size`] bytes).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.drain_orders();
        while let Some(advertisement) = self.aggregator.poll_advertisement() {
            let entry = RepairEntry {
                seq: advertisement.block.seq,
                object: object_kind(advertisement.block.object),
                sbn: advertisement.block.sbn,
                round: advertisement.round,
                count: advertisement.count,
            };
            if let Some(len) = self.heartbeat(now, entry.seq, true, vec![entry], buf) {
                self.counters.advertisements_sent += 1;
                return Some(self.sent(len));
            }
        }
        if let Some(transmit) = self.unicast_repair(buf) {
            return Some(transmit);
        }
        if self.initial.is_empty() && self.heartbeat_at.is_some_and(|at| at <= now) {
            if let Some(seq) = self.latest_seq() {
                let entries = self.recent_orders.iter().copied().collect();
                self.heartbeat_at = Some(now + self.heartbeat_interval);
                self.heartbeat_interval =
                    (self.heartbeat_interval * 2).min(self.config.heartbeat_max);
                if let Some(len) = self.heartbeat(now, seq, false, entries, buf) {
                    self.counters.heartbeats_sent += 1;
                    return Some(self.sent(len));
                }
            }
        }
        while let Some(repair) = self.aggregator.poll_repair(now) {
            if let Some(len) = self.repair_symbol(repair.block, repair.esi, buf) {
                return Some(self.sent(len));
            }
        }
        self.initial_step(now, buf)
    }

    /// The next deadline, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut deadline = self.aggregator.poll_timeout();
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
        };
        consider(self.grtt.poll_timeout());
        if self.initial.is_empty() {
            consider(self.heartbeat_at);
        } else if !self.initial_waits() {
            consider(Some(self.next_token_at()));
        }
        consider(
            self.messages
                .iter()
                .filter(|m| m.recorded.iter().any(|r| !r))
                .filter_map(|m| m.finished_at.map(|at| at + self.stats_delay()))
                .min(),
        );
        deadline
    }

    /// The next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    fn find(&self, seq: u64) -> Option<&Outgoing> {
        self.messages.get(self.index_of(seq)?)
    }

    fn authenticate<'a>(&self, bytes: &'a [u8]) -> Option<DatagramRepr<'a>> {
        let packet = Packet::new_checked(bytes).ok()?;
        if packet.group_id() != self.group_id || packet.spi() != self.spi {
            return None;
        }
        let outgoing = self.find(packet.seq())?;
        if !outgoing.message.mac_key.check(&packet) {
            return None;
        }
        DatagramRepr::parse(bytes).ok()
    }

    fn handle_echo(&mut self, now: Instant, timestamp_us: u64, hold_us: u32) {
        let echo = ProbeEcho {
            timestamp_us,
            hold_us,
        };
        if self.grtt.handle_echo(now, echo).is_some() {
            tune_aggregator(
                &mut self.aggregator,
                self.grtt.grtt(),
                self.config.backoff_factor,
            );
        }
    }

    fn sent(&mut self, len: usize) -> Transmit {
        self.counters.bytes_sent += len as u64;
        Transmit {
            destination: Destination::Group,
            len,
        }
    }

    /// Writes a heartbeat (or advertisement) sealed under the key of `seq` into `buf`.
    fn heartbeat(
        &mut self,
        now: Instant,
        seq: u64,
        advertisement: bool,
        entries: Vec<RepairEntry>,
        buf: &mut [u8],
    ) -> Option<usize> {
        // Receivers drop a heartbeat whose probe timestamp is not newer than the last one.
        let probe_us = self
            .grtt
            .probe_timestamp_us(now)
            .max(self.last_probe_us.map_or(0, |last| last + 1));
        let probe_reply_requested = !advertisement && now >= self.probe_request_at;
        if probe_reply_requested {
            self.probe_request_at = now + self.grtt.probe_interval();
        }
        let oldest_seq = self.oldest_seq()?;
        let key = self.find(seq)?.message.mac_key.clone();
        let repr = DatagramRepr {
            group_id: self.group_id,
            spi: self.spi,
            seq,
            body: BodyRepr::Heartbeat(HeartbeatRepr {
                advertisement,
                probe_reply_requested,
                instance: self.instance,
                probe_timestamp_us: probe_us,
                grtt_us: u32::try_from(micros(self.grtt.grtt())).unwrap_or(u32::MAX),
                group_size: self.advertised_group_size.unwrap_or(self.group_size),
                oldest_seq,
                backoff_factor: self.config.backoff_factor,
                entries,
            }),
            mac: [0; wire::datagram::MAC_LEN],
        };
        let len = self.seal(&repr, &key, buf)?;
        self.last_probe_us = Some(probe_us);
        self.feedback.probe_sent(probe_us);
        Some(len)
    }

    fn seal(&mut self, repr: &DatagramRepr<'_>, key: &MacKey, buf: &mut [u8]) -> Option<usize> {
        let len = seal_into(repr, key, buf);
        if len.is_none() {
            self.counters.buffer_too_small += 1;
        }
        len
    }

    fn repair_symbol(&mut self, block: BlockKey, esi: u32, buf: &mut [u8]) -> Option<usize> {
        let outgoing = self.find(block.seq)?;
        let message = &outgoing.message;
        let key = message.mac_key.clone();
        let seq = message.seq;
        let len = match block.object {
            ObjectId::Manifest => {
                let manifest = message.manifest.clone();
                let len = self.symbol(seq, ObjectKind::Manifest, 0, 0, &manifest, &key, buf)?;
                self.counters.manifests_sent += 1;
                len
            }
            ObjectId::Chunks => {
                let symbol = match message.encoder.repair_symbols(block.sbn, esi, 1) {
                    Ok(mut symbols) => symbols.next(),
                    Err(_) => None,
                };
                let Some(symbol) = symbol else {
                    self.counters.fec_errors += 1;
                    return None;
                };
                let len =
                    self.symbol(seq, ObjectKind::Chunks, block.sbn, esi, &symbol, &key, buf)?;
                self.counters.repair_symbols_sent += 1;
                len
            }
        };
        Some(len)
    }

    #[allow(clippy::too_many_arguments)]
    fn symbol(
        &mut self,
        seq: u64,
        object: ObjectKind,
        sbn: u8,
        esi: u32,
        data: &[u8],
        key: &MacKey,
        buf: &mut [u8],
    ) -> Option<usize> {
        let repr = DatagramRepr {
            group_id: self.group_id,
            spi: self.spi,
            seq,
            body: BodyRepr::Symbol(SymbolRepr {
                object,
                sbn,
                esi,
                data,
            }),
            mac: [0; wire::datagram::MAC_LEN],
        };
        self.seal(&repr, key, buf)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.config.send_rate).min(f64::from(self.config.burst));
        if now > self.refilled_at {
            self.refilled_at = now;
        }
    }

    fn next_token_at(&self) -> Instant {
        if self.tokens >= 1.0 {
            self.refilled_at
        } else {
            // Rounded up by a nanosecond so that a driver waking at the deadline finds a
            // whole token (the same care as the aggregator's bucket).
            self.refilled_at
                + Duration::from_secs_f64((1.0 - self.tokens) / self.config.send_rate)
                + Duration::from_nanos(1)
        }
    }

    /// Whether the initial transmission waits for blocks still being sealed (its next step's).
    fn initial_waits(&self) -> bool {
        let Some(outgoing) = self
            .initial
            .front()
            .and_then(|&seq| self.index_of(seq))
            .and_then(|index| self.messages.get(index))
        else {
            return false;
        };
        outgoing
            .plan
            .get(outgoing.next_step)
            .is_some_and(|&step| outgoing.message.waits_for(step))
    }

    /// Hands over the sealed datagrams of blocks of a queued message whose initial
    /// transmission waits for them ([`PreparedMessage::seal_head`]); returns whether the
    /// message is held here. The driver then polls [`Self::poll_transmit`] again.
    pub fn add_sealed(&mut self, sealed: SealedBlocks) -> bool {
        let Some(index) = self.index_of(sealed.seq) else {
            return false;
        };
        match self.messages.get_mut(index) {
            Some(outgoing) => {
                outgoing.message.add_sealed(sealed);
                true
            }
            None => false,
        }
    }

    fn initial_step(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.refill(now);
        while let Some(&seq) = self.initial.front() {
            if self.tokens < 1.0 {
                return None;
            }
            let Some(index) = self.index_of(seq) else {
                self.initial.pop_front();
                continue;
            };
            let outgoing = &mut self.messages[index];
            let Some(&step) = outgoing.plan.get(outgoing.next_step) else {
                outgoing.finished_at = Some(now);
                // Repair and resync make their datagrams afresh: the sealed copies go.
                outgoing.message.sealed = None;
                self.initial.pop_front();
                self.events
                    .push_back(SenderEvent::InitialTransmissionDone { seq });
                // The heartbeat right after a message tells members its initial transmission
                // is over; later ones fall off.
                self.heartbeat_at = Some(now);
                // The next one a NACK window later, when a member that lost the whole message
                // has had time to ask; then they fall off, doubling (a member that lost a
                // whole message in an outage hears one soon after it ends).
                let window = self.grtt.grtt() * u32::from(self.config.backoff_factor);
                self.heartbeat_interval = self
                    .config
                    .heartbeat_min
                    .max(window)
                    .min(self.config.heartbeat_max);
                continue;
            };
            if outgoing.message.waits_for(step) {
                // Its block is still being sealed on a worker: the datagrams come in order,
                // so the rest waits ([`Self::add_sealed`]).
                return None;
            }
            outgoing.next_step += 1;
            self.tokens -= 1.0;
            if let Some(sealed) = outgoing.message.sealed_step(step) {
                // Sealed on a worker when the message was built: the loop only copies.
                let Some(room) = buf.get_mut(..sealed.len()) else {
                    self.counters.buffer_too_small += 1;
                    continue;
                };
                room.copy_from_slice(sealed);
                let len = sealed.len();
                match step {
                    Step::Manifest => self.counters.manifests_sent += 1,
                    Step::Source { .. } => {
                        self.counters.source_symbols_sent += 1;
                        self.counters.source_bytes_sent += len as u64;
                    }
                    Step::Proactive { .. } => self.counters.proactive_symbols_sent += 1,
                }
                return Some(self.sent(len));
            }
            let key = outgoing.message.mac_key.clone();
            let written = match step {
                Step::Manifest => {
                    let manifest = outgoing.message.manifest.clone();
                    let len = self.symbol(seq, ObjectKind::Manifest, 0, 0, &manifest, &key, buf);
                    self.counters.manifests_sent += u64::from(len.is_some());
                    len
                }
                Step::Source { sbn, esi } => {
                    let data = match outgoing.message.encoder.source_symbol(sbn, esi) {
                        Ok(data) => data.to_vec(),
                        Err(_) => {
                            self.counters.fec_errors += 1;
                            continue;
                        }
                    };
                    let len = self.symbol(seq, ObjectKind::Chunks, sbn, esi, &data, &key, buf);
                    if let Some(len) = len {
                        self.counters.source_symbols_sent += 1;
                        self.counters.source_bytes_sent += len as u64;
                    }
                    len
                }
                Step::Proactive { sbn, esi } => {
                    let symbol = match outgoing.message.encoder.repair_symbols(sbn, esi, 1) {
                        Ok(mut symbols) => symbols.next(),
                        Err(_) => None,
                    };
                    let Some(symbol) = symbol else {
                        self.counters.fec_errors += 1;
                        continue;
                    };
                    let len = self.symbol(seq, ObjectKind::Chunks, sbn, esi, &symbol, &key, buf);
                    self.counters.proactive_symbols_sent += u64::from(len.is_some());
                    len
                }
            };
            if let Some(len) = written {
                return Some(self.sent(len));
            }
        }
        None
    }

    fn index_of(&self, seq: u64) -> Option<usize> {
        let first = self.messages.front()?.message.seq;
        let offset = usize::try_from(seq.checked_sub(first)?).ok()?;
        // The GCKS's history is contiguous: the message is at its offset. A relay's may have
        // gaps (messages it got by resync only, never queued), so search when the offset
        // misses; the history is in ascending order.
        if self
            .messages
            .get(offset)
            .is_some_and(|m| m.message.seq == seq)
        {
            return Some(offset);
        }
        self.messages
            .binary_search_by_key(&seq, |m| m.message.seq)
            .ok()
    }

    /// Moves new repair orders into the heartbeat's entries and the proactive statistics.
    fn drain_orders(&mut self) {
        while let Some(order) = self.aggregator.poll_order() {
            if !order.top_up {
                self.counters.repair_orders += 1;
            }
            self.recent_orders.push_back(RepairEntry {
                seq: order.block.seq,
                object: object_kind(order.block.object),
                sbn: order.block.sbn,
                round: order.round,
                count: order.count,
            });
            while self.recent_orders.len() > HEARTBEAT_ENTRIES {
                self.recent_orders.pop_front();
            }
        }
    }

    /// A round-1 NACK for chunk block `sbn` of message `seq`. The first one of a block is
    /// recorded at once (its need is a fair draw of a NACKing member's need; later ones passed
    /// suppression by needing more), and the message's blocks get repair bounds from the
    /// estimate it updated, before the NACK is answered: the first message of a group, sent
    /// with the assumed loss rate, is repaired for the loss rate its first NACKs show.
    fn first_nack_of_block(&mut self, seq: u64, sbn: u8, need: u16) {
        let Some(index) = self.index_of(seq) else {
            return;
        };
        let group_size = self
            .advertised_group_size
            .unwrap_or(self.messages[index].message.group_size);
        let outgoing = &mut self.messages[index];
        let block = usize::from(sbn);
        let (Some(first), Some(recorded)) = (
            outgoing.first_round_need.get_mut(block),
            outgoing.recorded.get(block),
        ) else {
            return;
        };
        if *first != 0 || *recorded || need == 0 {
            return;
        }
        *first = need;
        outgoing.recorded[block] = true;
        let chunks = outgoing.message.headers.len();
        let k = block_len(&outgoing.message, sbn);
        self.proactive.record(&BlockNackStats {
            source_symbols: k,
            proactive_symbols: outgoing.proactive[block],
            group_size: block_receivers(group_size, u32::from(k), chunks),
            first_need: need,
            needing_receivers: None,
        });
        let outgoing = &self.messages[index];
        for (sbn, &h) in outgoing.proactive.iter().enumerate() {
            // sbn < block count <= 255.
            let sbn = sbn as u8;
            let k = block_len(&outgoing.message, sbn);
            let (floor, ceiling) = self.proactive.repair_bounds(
                k,
                h,
                block_receivers(group_size, u32::from(k), chunks),
                UNICAST_RESIDUAL,
                self.config.aggregator.max_repair_per_round,
            );
            let key = BlockKey {
                seq,
                object: ObjectId::Chunks,
                sbn,
            };
            self.aggregator.set_block_bounds(key, floor, ceiling);
        }
    }

    /// Once a block's first repair round is surely over, whether it drew a NACK and the need
    /// of the one that opened the round tell the proactive helper about the loss rate.
    fn record_quiet_blocks(&mut self, now: Instant) {
        let delay = self.stats_delay();
        let advertised = self.advertised_group_size;
        let mut observations = Vec::new();
        for outgoing in self.messages.iter_mut() {
            if !outgoing.finished_at.is_some_and(|at| at + delay <= now) {
                continue;
            }
            let group_size = advertised.unwrap_or(outgoing.message.group_size);
            let chunks = outgoing.message.headers.len();
            for sbn in 0..outgoing.recorded.len() {
                if !outgoing.recorded[sbn] {
                    outgoing.recorded[sbn] = true;
                    // sbn < block count <= 255.
                    let k = block_len(&outgoing.message, sbn as u8);
                    observations.push(BlockNackStats {
                        source_symbols: k,
                        proactive_symbols: outgoing.proactive[sbn],
                        group_size: block_receivers(group_size, u32::from(k), chunks),
                        first_need: outgoing.first_round_need.get(sbn).copied().unwrap_or(0),
                        needing_receivers: None,
                    });
                }
            }
        }
        for stats in observations {
            self.proactive.record(&stats);
        }
    }

    /// How long after a message's initial transmission its first repair round is surely
    /// closed: the receivers' backoff window, the aggregation hold-off and two GRTTs.
    fn stats_delay(&self) -> Duration {
        self.grtt.grtt() * (2 * u32::from(self.config.backoff_factor) + 2)
    }

    fn retire(&mut self, now: Instant) {
        let _ = now;
        while self.messages.len() > self.config.history {
            if let Some(old) = self.messages.pop_front() {
                self.events.push_back(SenderEvent::Retired {
                    seq: old.message.seq,
                });
            }
        }
        // A message not held leaves the window when one held there would.
        if let Some(latest) = self.latest_seq() {
            let history = self.config.history as u64;
            self.not_held
                .retain(|&seq| seq.saturating_add(history) > latest);
        }
        if self.messages.len() > self.config.repair_window {
            let first_repairable = self.messages[self.messages.len() - self.config.repair_window]
                .message
                .seq;
            self.aggregator.retire_before(first_repairable);
            let kept = self
                .nack_counts
                .split_off(&(first_repairable, ObjectId::Manifest, 0, 0));
            for count in std::mem::replace(&mut self.nack_counts, kept).into_values() {
                self.nack_histogram[(count as usize).min(NACK_HISTOGRAM_LEN - 1)] += 1;
            }
            self.recent_orders
                .retain(|entry| entry.seq >= first_repairable);
        }
    }
}

impl crate::resync::ResyncSource for SenderSession {
    fn group_id(&self) -> u32 {
        self.group_id
    }

    fn latest(&self) -> Option<(u64, &[u8])> {
        self.latest_manifest()
    }

    fn oldest(&self) -> Option<u64> {
        self.window_start()
    }

    fn manifest(&self, seq: u64) -> crate::resync::Lookup<&[u8]> {
        match self.find(seq) {
            Some(outgoing) => crate::resync::Lookup::Found(&outgoing.message.manifest),
            None => self.missing(seq),
        }
    }

    fn chunk(&self, seq: u64, leaf: u32) -> crate::resync::Lookup<&[u8]> {
        match self.resync_item(seq, leaf) {
            Ok(item) => crate::resync::Lookup::Found(item.chunk),
            Err(ResyncLookup::NoChunk) => crate::resync::Lookup::NotFound,
            Err(_) => self.missing(seq),
        }
    }
}

impl SenderSession {
    /// The first sequence number of the history window: the oldest message held, or an
    /// older one in the window that is not held ([`Self::restore_not_held`]).
    fn window_start(&self) -> Option<u64> {
        match (self.not_held.first().copied(), self.oldest_seq()) {
            (Some(lost), Some(held)) => Some(lost.min(held)),
            (lost, held) => lost.or(held),
        }
    }

    /// Why message `seq` is not in the history: older than the window, not sent yet, or a
    /// hole inside the window ([`crate::resync::Lookup::NotFound`]: a message lost from a
    /// restarted GCKS's state directory, or one a relay never queued).
    fn missing<T>(&self, seq: u64) -> crate::resync::Lookup<T> {
        match (self.window_start(), self.latest_seq()) {
            (Some(oldest), _) if seq < oldest => crate::resync::Lookup::BeyondHistory { oldest },
            (Some(_), Some(latest)) if seq <= latest => crate::resync::Lookup::NotFound,
            (_, latest) => crate::resync::Lookup::NotYetSent {
                latest: latest.unwrap_or(0),
            },
        }
    }
}

/// What a resync endpoint serves for one missed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncItem<'a> {
    /// The message's sequence number.
    pub seq: u64,
    /// Its signed manifest.
    pub manifest: &'a [u8],
    /// The chunk that serves the asking member (a whole source symbol).
    pub chunk: &'a [u8],
}

/// Why [`SenderSession::resync_item`] has nothing to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResyncLookup {
    /// The message left the history window: the member must re-register.
    #[error("message is older than the history window (oldest {oldest})")]
    BeyondHistory {
        /// The oldest message still held.
        oldest: u64,
    },
    /// No message with that sequence number was queued yet.
    #[error("message not sent yet")]
    NotSent,
    /// No chunk of the message serves that order key.
    #[error("no chunk serves that leaf")]
    NoChunk,
    /// The message is inside the history window but not held (lost from a restarted GCKS's
    /// state directory): another endpoint may hold it.
    #[error("message inside the history window not held")]
    NotHeld,
}

fn object_kind(object: ObjectId) -> ObjectKind {
    match object {
        ObjectId::Manifest => ObjectKind::Manifest,
        ObjectId::Chunks => ObjectKind::Chunks,
    }
}

/// Repair rounds are answered at once (a zero hold-off: the first NACK of a round orders its
/// repair), and NACKs of the round that arrive within the receivers' backoff window, `K *
/// GRTT`, join that order (a top-up when they need more) instead of opening another round.
fn tune_aggregator(aggregator: &mut RepairAggregator, grtt: Duration, backoff_factor: u8) {
    aggregator.set_hold_off(Duration::ZERO);
    aggregator.set_top_up_window(grtt * u32::from(backoff_factor).max(1));
}

/// The share of a block's members the multicast repair rounds may leave to unicast chunk
/// repair (each of those costs one datagram to one member).
const UNICAST_RESIDUAL: f64 = 0.001;

/// The probability of missing every copy of the manifest that the number of copies is sized
/// for: below it, a member needs a manifest repair round.
const MANIFEST_MISS_TARGET: f64 = 0.005;

/// Messages of at least this many symbols per configured manifest copy send every configured
/// copy: there they cost next to nothing.
const SYMBOLS_PER_FULL_MANIFEST: usize = 32;

/// How many copies of the manifest a message of `symbols` source and proactive symbols sends,
/// at loss estimate `loss`: the fewest for which a member misses them all with probability at
/// most [`MANIFEST_MISS_TARGET`], at least 1 and at most `configured`.
fn manifest_copies(configured: u8, symbols: usize, loss: f64) -> u8 {
    if symbols >= SYMBOLS_PER_FULL_MANIFEST * usize::from(configured) {
        return configured;
    }
    let mut copies = 1u8;
    while copies < configured && loss.powi(i32::from(copies)) > MANIFEST_MISS_TARGET {
        copies += 1;
    }
    copies
}

/// The members a block of `k` of a message's `chunks` chunks serves, of `group_size` (each
/// chunk serves a contiguous range of leaves; at least 1).
fn block_receivers(group_size: u32, k: u32, chunks: usize) -> u32 {
    let chunks = u64::try_from(chunks.max(1)).unwrap_or(u64::MAX);
    let share = (u64::from(group_size) * u64::from(k)).div_ceil(chunks);
    u32::try_from(share).unwrap_or(u32::MAX).max(1)
}

fn block_len(message: &PreparedMessage, sbn: u8) -> u16 {
    let len = message.encoder.partition().block_len(sbn).unwrap_or(0);
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// The initial transmission plan: the manifest first, `repeats - 1` more copies spread evenly
/// through the symbols, the last one after every symbol.
fn interleave_manifests(symbols: Vec<Step>, repeats: u8) -> Vec<Step> {
    let repeats = usize::from(repeats.max(1));
    let mut plan = Vec::with_capacity(symbols.len() + repeats);
    plan.push(Step::Manifest);
    if repeats == 1 {
        plan.extend(symbols);
        return plan;
    }
    let gaps = repeats - 1;
    let total = symbols.len();
    let mut placed = 1;
    for (i, step) in symbols.into_iter().enumerate() {
        plan.push(step);
        // After symbol i, place the copies due by then (the last one after the last symbol).
        while placed < repeats && (i + 1) * gaps >= placed * total {
            plan.push(Step::Manifest);
            placed += 1;
        }
    }
    while placed < repeats {
        plan.push(Step::Manifest);
        placed += 1;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every datagram of the initial transmission, in order.
    fn initial_transmission(message: PreparedMessage, config: &SenderConfig) -> Vec<Vec<u8>> {
        #[allow(clippy::disallowed_methods)] // the start of virtual time
        let now = Instant::now();
        let mut session = SenderSession::new(config.clone(), 7, 3, now).unwrap();
        session.queue_message(now, message).unwrap();
        let mut buf = vec![0u8; config.datagram_size];
        let mut datagrams = Vec::new();
        while let Some(transmit) = session.poll_transmit(now, &mut buf) {
            datagrams.push(buf[..transmit.len].to_vec());
        }
        assert!(
            session.poll_event() == Some(SenderEvent::InitialTransmissionDone { seq: 1 }),
            "the initial transmission ended"
        );
        assert!(
            session.messages[0].message.sealed.is_none(),
            "sealed copies dropped"
        );
        datagrams
    }

    #[test]
    fn datagrams_sealed_in_advance_are_the_ones_the_loop_would_seal() {
        let config = SenderConfig {
            send_rate: 1e9,
            burst: 1_000_000,
            proactive: ProactiveConfig {
                min_rho: 0.25,
                ..ProactiveConfig::default()
            },
            ..SenderConfig::default()
        };
        #[allow(clippy::disallowed_methods)] // the start of virtual time
        let start = Instant::now();
        let (gcks, batch) =
            crate::test_support::TestGcks::new(7, 3, (1, 2), 3000, config.clone(), start);
        let params = super::super::layout::MessageParams {
            spi: 3,
            max_block_symbols: 5,
            ..Default::default()
        };
        let leaves = gcks.tree.leaves_in_order();
        let built =
            super::super::layout::build_message(&batch, &leaves, &gcks.signing_key, &params)
                .unwrap();
        let prepare = || PreparedMessage::new(built.clone(), batch.mac_key.clone()).unwrap();
        let reference = initial_transmission(prepare(), &config);
        assert!(reference.len() > 20, "{} datagrams", reference.len());
        let proactive = ProactiveRepair::new(config.proactive).unwrap();
        // All sealed in advance, on one and on three threads; then the proactive repair left
        // to the loop (none sealed), which seals it as before.
        for (threads, proactive) in [(1, Some(&proactive)), (3, Some(&proactive)), (2, None)] {
            let mut sealed = prepare();
            sealed.seal_initial(proactive, threads).unwrap();
            assert!(sealed.is_sealed());
            assert_eq!(
                initial_transmission(sealed, &config),
                reference,
                "{threads} threads"
            );
        }
    }

    #[test]
    fn backoff_factor_is_within_what_members_take() {
        for (factor, valid) in [(0, false), (1, true), (16, true), (17, false)] {
            let config = SenderConfig {
                backoff_factor: factor,
                ..SenderConfig::default()
            };
            assert_eq!(config.validate().is_ok(), valid, "factor {factor}");
        }
    }

    #[test]
    fn manifests_are_first_spread_and_last() {
        let symbols: Vec<Step> = (0..9).map(|esi| Step::Source { sbn: 0, esi }).collect();
        let plan = interleave_manifests(symbols, 3);
        let positions: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == Step::Manifest)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(plan.len(), 12);
        assert_eq!(positions.first(), Some(&0));
        assert_eq!(positions.last(), Some(&11));
        assert_eq!(positions.len(), 3);
        assert!(positions[1] > 3 && positions[1] < 8, "{positions:?}");
        assert_eq!(interleave_manifests(vec![], 3), vec![Step::Manifest; 3]);
        assert_eq!(interleave_manifests(vec![], 1), vec![Step::Manifest]);
    }
}
