//! Encoding: source symbols as they are, repair symbols for any ESI on demand.
//!
//! This module owns the per-block RaptorQ encoders and their cache. A block's intermediate
//! symbols (RFC 6330 section 5.3.3) are computed once, the first time a repair symbol of that
//! block is asked for, and kept; every later repair symbol costs one LT encoding (section
//! 5.3.5.3), which is what the NACK path needs when it asks for fresh ESIs again and again.
//! Repair symbols are a pure function of the block's bytes and the ESI, so a relay that holds a
//! block produces the same bytes as the GCKS for the same ESI.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use raptorq::{ObjectTransmissionInformation, SourceBlockEncoder, SourceBlockEncodingPlan};

use crate::info::{check_esi, BlockPartition, ObjectInfo};
use crate::{Error, Result, MAX_BLOCK_SYMBOLS, MAX_ESI};

/// A cache of RaptorQ encoding plans, one per block length K.
///
/// A plan records the elimination steps that turn a block of K source symbols into its
/// intermediate symbols; they depend on K alone, so building a block's encoder from a cached
/// plan skips the matrix solve. An object has at most two block lengths (KL and KS), so a small
/// cache serves a whole stream of rekey messages. Clones share the same cache.
#[derive(Debug, Clone)]
pub struct EncodingPlans {
    inner: Arc<Mutex<PlanMap>>,
}

#[derive(Debug, Default)]
struct PlanMap {
    capacity: usize,
    plans: HashMap<u32, Arc<SourceBlockEncodingPlan>>,
    insertion_order: VecDeque<u32>,
}

impl EncodingPlans {
    /// Plans kept by [`EncodingPlans::default`] and [`EncodingPlans::global`].
    pub const DEFAULT_CAPACITY: usize = 16;

    /// An empty cache holding at most `capacity` plans (at least one), the oldest evicted first.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(PlanMap {
                capacity: capacity.max(1),
                ..PlanMap::default()
            })),
        }
    }

    /// The process-wide cache that [`ObjectEncoder::new`] and [`BlockEncoder::new`] use.
    pub fn global() -> &'static EncodingPlans {
        static GLOBAL: OnceLock<EncodingPlans> = OnceLock::new();
        GLOBAL.get_or_init(EncodingPlans::default)
    }

    /// Plans held now.
    pub fn len(&self) -> usize {
        self.lock().plans.len()
    }

    /// Whether the cache holds no plan.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds the plan for blocks of `block_len` symbols now, so that the first encoder of that
    /// length does not pay for it. `block_len` must be 1 to [`MAX_BLOCK_SYMBOLS`].
    pub fn prepare(&self, block_len: u32) -> Result<()> {
        let len = checked_block_len(block_len)?;
        self.plan(len);
        Ok(())
    }

    /// The plan for `block_len` (already checked to be 1 to K'max), built on a miss.
    fn plan(&self, block_len: u16) -> Arc<SourceBlockEncodingPlan> {
        if let Some(plan) = self.lock().plans.get(&u32::from(block_len)) {
            return Arc::clone(plan);
        }
        // Built outside the lock: a plan for a large block takes milliseconds, and another
        // thread may want a plan of another length meanwhile. Two threads may build the same
        // plan; the second insert is dropped.
        let plan = Arc::new(SourceBlockEncodingPlan::generate(block_len));
        let mut map = self.lock();
        if let Some(existing) = map.plans.get(&u32::from(block_len)) {
            return Arc::clone(existing);
        }
        if map.plans.len() >= map.capacity {
            if let Some(oldest) = map.insertion_order.pop_front() {
                map.plans.remove(&oldest);
            }
        }
        map.insertion_order.push_back(u32::from(block_len));
        map.plans.insert(u32::from(block_len), Arc::clone(&plan));
        plan
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PlanMap> {
        // A panic while the lock was held cannot leave the map inconsistent (every mutation is a
        // single insert or remove), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for EncodingPlans {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

/// The RaptorQ encoder of one source block, with its intermediate symbols computed: every
/// repair symbol from here on is one LT encoding.
#[derive(Debug, Clone)]
pub struct BlockEncoder {
    sbn: u8,
    block_len: u32,
    symbol_size: u16,
    inner: SourceBlockEncoder,
}

impl BlockEncoder {
    /// The encoder of block `sbn` whose source symbols are `source` (K_b symbols of
    /// `symbol_size` bytes, back to back), using the process-wide plan cache. This is what a
    /// relay that holds a decoded block calls to answer NACKs itself.
    pub fn new(sbn: u8, symbol_size: u16, source: &[u8]) -> Result<Self> {
        Self::with_plans(sbn, symbol_size, source, EncodingPlans::global())
    }

    /// As [`BlockEncoder::new`], with plans from `plans`.
    pub fn with_plans(
        sbn: u8,
        symbol_size: u16,
        source: &[u8],
        plans: &EncodingPlans,
    ) -> Result<Self> {
        if symbol_size == 0 {
            return Err(Error::InvalidParameter("symbol size"));
        }
        let t = usize::from(symbol_size);
        if source.is_empty() || source.len() % t != 0 {
            return Err(Error::SourceLength {
                expected: (source.len().div_ceil(t).max(1) * t) as u64,
                actual: source.len() as u64,
            });
        }
        let block_len = u32::try_from(source.len() / t).unwrap_or(u32::MAX);
        let len = checked_block_len(block_len)?;
        Ok(Self::build(sbn, symbol_size, len, source, plans))
    }

    /// Builds from checked values: 1 <= `block_len` <= K'max, `symbol_size` >= 1 and
    /// `source.len()` == `block_len` * `symbol_size`. These are exactly the conditions
    /// `raptorq` asserts, so it cannot panic here.
    fn build(
        sbn: u8,
        symbol_size: u16,
        block_len: u16,
        source: &[u8],
        plans: &EncodingPlans,
    ) -> Self {
        let plan = plans.plan(block_len);
        // raptorq reads only T, the sub-block count (1) and the alignment (1) from this; the
        // transfer length is the block's, which is at most K'max symbols as its checks require.
        let config = ObjectTransmissionInformation::new(source.len() as u64, symbol_size, 1, 1, 1);
        let inner = SourceBlockEncoder::with_encoding_plan(sbn, &config, source, &plan);
        Self {
            sbn,
            block_len: u32::from(block_len),
            symbol_size,
            inner,
        }
    }

    /// The source block number.
    pub fn sbn(&self) -> u8 {
        self.sbn
    }

    /// K_b: source symbols of the block. Repair ESIs start here.
    pub fn block_len(&self) -> u32 {
        self.block_len
    }

    /// T: the symbol size.
    pub fn symbol_size(&self) -> u16 {
        self.symbol_size
    }

    /// The `count` repair symbols with ESIs `first_esi`, `first_esi + 1`, ...; `first_esi` must
    /// be at least [`Self::block_len`] and the last ESI at most [`MAX_ESI`]. Each symbol is
    /// computed as the iterator reaches it, so a large count allocates nothing up front.
    pub fn repair_symbols(&self, first_esi: u32, count: u32) -> Result<RepairSymbols<'_>> {
        if first_esi < self.block_len {
            return Err(Error::NotRepairEsi {
                esi: first_esi,
                block_len: self.block_len,
            });
        }
        check_esi(first_esi)?;
        let end = u64::from(first_esi) + u64::from(count);
        if end > u64::from(MAX_ESI) + 1 {
            return Err(Error::EsiOutOfRange { esi: end - 1 });
        }
        Ok(RepairSymbols {
            encoder: self,
            next_repair_id: first_esi - self.block_len,
            remaining: count,
        })
    }

    /// One repair symbol, ESI `esi` (at least [`Self::block_len`], at most [`MAX_ESI`]).
    pub fn repair_symbol(&self, esi: u32) -> Result<Vec<u8>> {
        let mut symbols = self.repair_symbols(esi, 1)?;
        // repair_symbols(_, 1) succeeded, so the iterator yields exactly one symbol.
        Ok(symbols.next().unwrap_or_default())
    }
}

/// Repair symbols of one block, computed one by one (see [`BlockEncoder::repair_symbols`]).
#[derive(Debug, Clone)]
pub struct RepairSymbols<'a> {
    encoder: &'a BlockEncoder,
    next_repair_id: u32,
    remaining: u32,
}

impl Iterator for RepairSymbols<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.remaining == 0 {
            return None;
        }
        // The range was checked when the iterator was made: K_b + next_repair_id <= MAX_ESI,
        // which is raptorq's PayloadId assertion.
        let packet = self
            .encoder
            .inner
            .repair_packets(self.next_repair_id, 1)
            .pop()?;
        self.next_repair_id += 1;
        self.remaining -= 1;
        Some(packet.split().1)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for RepairSymbols<'_> {}

/// The encoder of a whole object: its source symbols, and each block's [`BlockEncoder`], built
/// the first time a repair symbol of that block is asked for and kept for the object's
/// lifetime. It is `Sync`: NACK handlers on several threads can share one behind an `Arc`.
#[derive(Debug)]
pub struct ObjectEncoder {
    info: ObjectInfo,
    partition: BlockPartition,
    data: Vec<u8>,
    blocks: Vec<OnceLock<BlockEncoder>>,
    plans: EncodingPlans,
}

impl ObjectEncoder {
    /// An encoder over `data`, the object's K source symbols of T bytes back to back (exactly
    /// K * T bytes), using the process-wide plan cache.
    pub fn new(info: ObjectInfo, data: Vec<u8>) -> Result<Self> {
        Self::with_plans(info, data, EncodingPlans::global().clone())
    }

    /// As [`ObjectEncoder::new`], with plans from `plans`.
    pub fn with_plans(info: ObjectInfo, data: Vec<u8>, plans: EncodingPlans) -> Result<Self> {
        if data.len() as u64 != info.transfer_length() {
            return Err(Error::SourceLength {
                expected: info.transfer_length(),
                actual: data.len() as u64,
            });
        }
        let partition = info.partition();
        let blocks = (0..partition.block_count())
            .map(|_| OnceLock::new())
            .collect();
        Ok(Self {
            info,
            partition,
            data,
            blocks,
            plans,
        })
    }

    /// An encoder over `chunks`, each at most T bytes, padded with zeros to T. There must be
    /// exactly K of them.
    pub fn from_chunks<'c>(
        info: ObjectInfo,
        chunks: impl IntoIterator<Item = &'c [u8]>,
    ) -> Result<Self> {
        let t = usize::from(info.symbol_size());
        let k = info.source_symbols() as usize;
        let mut data = Vec::with_capacity(k * t);
        for (count, chunk) in chunks.into_iter().enumerate() {
            if count == k {
                return Err(Error::IndexOutOfRange {
                    index: info.source_symbols(),
                    symbols: info.source_symbols(),
                });
            }
            if chunk.len() > t {
                return Err(Error::SymbolLength {
                    expected: info.symbol_size(),
                    actual: chunk.len(),
                });
            }
            data.extend_from_slice(chunk);
            data.resize((count + 1) * t, 0);
        }
        Self::new(info, data)
    }

    /// The object transmission information.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    /// The partition of the object into blocks.
    pub fn partition(&self) -> &BlockPartition {
        &self.partition
    }

    /// Source symbol `esi` of block `sbn` (ESI below the block's length): the chunk itself.
    pub fn source_symbol(&self, sbn: u8, esi: u32) -> Result<&[u8]> {
        let index = self.partition.index_of(crate::SymbolId { sbn, esi })?;
        Ok(self.symbol_at(index))
    }

    /// The source symbols of block `sbn`, back to back.
    pub fn block_source(&self, sbn: u8) -> Result<&[u8]> {
        let start = self.partition.block_start(sbn)? as usize;
        let len = self.partition.block_len(sbn)? as usize;
        let t = usize::from(self.info.symbol_size());
        Ok(&self.data[start * t..(start + len) * t])
    }

    /// The encoder of block `sbn`, built now if this is the first time it is asked for (this
    /// is the costly step: do it on a worker thread ahead of the first NACK if latency matters).
    pub fn block(&self, sbn: u8) -> Result<&BlockEncoder> {
        // The NACK path: a built block costs one lookup.
        if let Some(built) = self.blocks.get(usize::from(sbn)).and_then(OnceLock::get) {
            return Ok(built);
        }
        let source = self.block_source(sbn)?;
        let len = self.partition.block_len(sbn)?;
        let slot = &self.blocks[usize::from(sbn)];
        Ok(slot.get_or_init(|| {
            // ObjectInfo guarantees 1 <= len <= K'max and T >= 1; `source` holds len * T
            // bytes, checked in `with_plans`.
            let len = u16::try_from(len).unwrap_or(u16::MAX);
            BlockEncoder::build(sbn, self.info.symbol_size(), len, source, &self.plans)
        }))
    }

    /// Whether block `sbn`'s encoder has been built.
    pub fn is_block_built(&self, sbn: u8) -> bool {
        self.blocks
            .get(usize::from(sbn))
            .is_some_and(|slot| slot.get().is_some())
    }

    /// Repair symbols `first_esi .. first_esi + count` of block `sbn` (see
    /// [`BlockEncoder::repair_symbols`]), building the block's encoder first if needed.
    pub fn repair_symbols(&self, sbn: u8, first_esi: u32, count: u32) -> Result<RepairSymbols<'_>> {
        self.block(sbn)?.repair_symbols(first_esi, count)
    }

    /// The object's bytes: all K source symbols back to back.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The object's bytes back, dropping the block encoders (to reuse the buffer).
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    fn symbol_at(&self, index: u32) -> &[u8] {
        let t = usize::from(self.info.symbol_size());
        let start = index as usize * t;
        &self.data[start..start + t]
    }
}

/// A block length as raptorq's u16, checked to be 1 to K'max.
fn checked_block_len(block_len: u32) -> Result<u16> {
    if block_len == 0 || block_len > MAX_BLOCK_SYMBOLS {
        return Err(Error::BlockTooLarge {
            symbols: block_len,
            limit: MAX_BLOCK_SYMBOLS,
        });
    }
    u16::try_from(block_len).map_err(|_| Error::BlockTooLarge {
        symbols: block_len,
        limit: MAX_BLOCK_SYMBOLS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn block_encoder_rejects_bad_input() {
        assert_eq!(
            BlockEncoder::new(0, 0, &[1]).err(),
            Some(Error::InvalidParameter("symbol size"))
        );
        assert_eq!(
            BlockEncoder::new(0, 4, &[]).err(),
            Some(Error::SourceLength {
                expected: 4,
                actual: 0
            })
        );
        assert_eq!(
            BlockEncoder::new(0, 4, &[0; 9]).err(),
            Some(Error::SourceLength {
                expected: 12,
                actual: 9
            })
        );
        assert_eq!(
            BlockEncoder::new(0, 1, &vec![0; 56_404]).err(),
            Some(Error::BlockTooLarge {
                symbols: 56_404,
                limit: MAX_BLOCK_SYMBOLS
            })
        );
    }

    #[test]
    fn repair_ranges_are_checked() {
        let encoder = BlockEncoder::new(3, 8, &data(5 * 8, 1)).unwrap();
        assert_eq!(encoder.block_len(), 5);
        assert_eq!(
            encoder.repair_symbols(4, 1).err(),
            Some(Error::NotRepairEsi {
                esi: 4,
                block_len: 5
            })
        );
        assert_eq!(
            encoder.repair_symbols(MAX_ESI + 1, 0).err(),
            Some(Error::EsiOutOfRange {
                esi: u64::from(MAX_ESI) + 1
            })
        );
        assert_eq!(
            encoder.repair_symbols(MAX_ESI, 2).err(),
            Some(Error::EsiOutOfRange {
                esi: u64::from(MAX_ESI) + 1
            })
        );
        assert_eq!(
            encoder.repair_symbols(5, u32::MAX).err(),
            Some(Error::EsiOutOfRange {
                esi: 5 + u64::from(u32::MAX) - 1
            })
        );
        // The very last ESI works, and an empty range anywhere valid is empty.
        assert_eq!(encoder.repair_symbol(MAX_ESI).unwrap().len(), 8);
        assert_eq!(encoder.repair_symbols(MAX_ESI, 1).unwrap().count(), 1);
        assert_eq!(encoder.repair_symbols(9, 0).unwrap().count(), 0);
        let batch: Vec<_> = encoder.repair_symbols(5, 4).unwrap().collect();
        assert_eq!(batch.len(), 4);
        for (i, symbol) in batch.iter().enumerate() {
            assert_eq!(symbol, &encoder.repair_symbol(5 + i as u32).unwrap());
        }
    }

    #[test]
    fn object_encoder_serves_source_symbols_and_builds_blocks_lazily() {
        let info = ObjectInfo::new(10, 4, 4).unwrap(); // blocks of 4, 3, 3
        let bytes = data(40, 7);
        let encoder = ObjectEncoder::new(info, bytes.clone()).unwrap();
        assert_eq!(encoder.source_symbol(1, 0).unwrap(), &bytes[16..20]);
        assert_eq!(encoder.source_symbol(2, 2).unwrap(), &bytes[36..40]);
        assert_eq!(
            encoder.source_symbol(1, 3).err(),
            Some(Error::EsiOutOfRange { esi: 3 })
        );
        assert_eq!(
            encoder.source_symbol(3, 0).err(),
            Some(Error::SbnOutOfRange { sbn: 3, blocks: 3 })
        );
        assert!(!encoder.is_block_built(1));
        let repair: Vec<_> = encoder.repair_symbols(1, 3, 2).unwrap().collect();
        assert!(encoder.is_block_built(1));
        assert!(!encoder.is_block_built(0));
        let standalone = BlockEncoder::new(1, 4, &bytes[16..28]).unwrap();
        assert_eq!(
            repair,
            standalone.repair_symbols(3, 2).unwrap().collect::<Vec<_>>()
        );
        assert_eq!(
            ObjectEncoder::new(info, vec![0; 39]).err(),
            Some(Error::SourceLength {
                expected: 40,
                actual: 39
            })
        );
    }

    #[test]
    fn from_chunks_pads_and_counts() {
        let info = ObjectInfo::new(3, 4, 256).unwrap();
        let chunks: [&[u8]; 3] = [&[1, 2], &[3, 4, 5, 6], &[]];
        let encoder = ObjectEncoder::from_chunks(info, chunks).unwrap();
        assert_eq!(encoder.data(), &[1, 2, 0, 0, 3, 4, 5, 6, 0, 0, 0, 0]);
        let too_long: [&[u8]; 1] = [&[0; 5]];
        assert_eq!(
            ObjectEncoder::from_chunks(info, too_long).err(),
            Some(Error::SymbolLength {
                expected: 4,
                actual: 5
            })
        );
        let too_few: [&[u8]; 2] = [&[1], &[2]];
        assert!(ObjectEncoder::from_chunks(info, too_few).is_err());
        let too_many: [&[u8]; 4] = [&[1], &[2], &[3], &[4]];
        assert_eq!(
            ObjectEncoder::from_chunks(info, too_many).err(),
            Some(Error::IndexOutOfRange {
                index: 3,
                symbols: 3
            })
        );
    }

    #[test]
    fn plan_cache_is_bounded() {
        let plans = EncodingPlans::new(2);
        assert!(plans.is_empty());
        for k in [3, 4, 5] {
            plans.prepare(k).unwrap();
        }
        assert_eq!(plans.len(), 2);
        assert!(plans.prepare(0).is_err());
        assert!(plans.prepare(MAX_BLOCK_SYMBOLS + 1).is_err());
    }

    /// A regression pin: if a `raptorq` upgrade changed the repair symbols for the same block and
    /// ESI, relays and a GCKS built with different versions would stop interoperating. The
    /// expected bytes were produced by raptorq 2.0.1 through this wrapper.
    #[test]
    fn repair_symbols_are_stable_across_builds() {
        let encoder = BlockEncoder::new(0, 4, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).unwrap();
        let symbols: Vec<_> = encoder.repair_symbols(3, 2).unwrap().collect();
        assert_eq!(symbols, PINNED_REPAIR);
        // And the pinned bytes are real encoding symbols of that block: source symbol 0 plus
        // the two of them decode it.
        let mut decoder = crate::BlockDecoder::new(0, 3, 4, &crate::Limits::default()).unwrap();
        let _ = decoder.push(0, &[1, 2, 3, 4]).unwrap();
        let _ = decoder.push(3, &PINNED_REPAIR[0]).unwrap();
        let mut progress = decoder.push(4, &PINNED_REPAIR[1]).unwrap();
        for esi in 5..8 {
            if progress == crate::Progress::Decoded {
                break;
            }
            progress = decoder
                .push(esi, &encoder.repair_symbol(esi).unwrap())
                .unwrap();
        }
        assert_eq!(progress, crate::Progress::Decoded);
        assert_eq!(
            decoder.block().unwrap(),
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
    }

    const PINNED_REPAIR: [[u8; 4]; 2] = [[159, 63, 95, 9], [191, 253, 195, 254]];
}
