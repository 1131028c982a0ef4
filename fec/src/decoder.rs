//! Decoding: symbols in any order, source symbols usable at once, bounded state.
//!
//! This module owns the receiver's per-block state. A source symbol is stored in place and can
//! be read back the moment it arrives (a member whose own chunk arrived is done with the
//! message, RFC 4046 5.4's common case under light loss); repair symbols are kept until the
//! block has as many distinct symbols as source symbols, and then `raptorq` solves the block.
//! Every symbol is checked (block, ESI, length) before it reaches `raptorq`, and every piece
//! of state is bounded by [`Limits`].

use std::collections::HashSet;

use raptorq::{EncodingPacket, ObjectTransmissionInformation, PayloadId, SourceBlockDecoder};

use crate::info::{check_esi, BlockPartition, ObjectInfo};
use crate::{Error, Result, DEFAULT_MAX_BLOCK_SYMBOLS, MAX_BLOCK_SYMBOLS};

/// Bounds on what a receiver accepts and keeps. An object or symbol beyond one is rejected
/// with a typed [`Error`] before anything is allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most source symbols an object may have ([`Error::ObjectTooLarge`]).
    pub max_source_symbols: u32,
    /// Most source symbols a block may have ([`Error::BlockTooLarge`]); at most K'max.
    pub max_block_symbols: u32,
    /// Largest symbol size T ([`Error::SymbolTooLarge`]).
    pub max_symbol_size: u16,
    /// Symbols a block keeps beyond its source-symbol count while it does not decode
    /// ([`Error::TooManySymbols`]): the memory bound of a block is (K_b + this) * T bytes, and
    /// it also bounds the decoding attempts a block can cost (one per symbol past K_b).
    pub max_extra_symbols_per_block: u32,
    /// Blocks of one object being decoded at once ([`Error::TooManyBlocksInFlight`]): started
    /// (a symbol arrived) and not yet decoded.
    pub max_blocks_in_flight: u32,
}

impl Limits {
    /// Checks an object's parameters against the limits.
    pub fn check(&self, info: &ObjectInfo) -> Result<()> {
        if info.source_symbols() > self.max_source_symbols {
            return Err(Error::ObjectTooLarge {
                symbols: info.source_symbols(),
                limit: self.max_source_symbols,
            });
        }
        self.check_block(info.partition().max_block_len(), info.symbol_size())
    }

    fn check_block(&self, block_len: u32, symbol_size: u16) -> Result<()> {
        let limit = self.max_block_symbols.min(MAX_BLOCK_SYMBOLS);
        if block_len > limit || block_len == 0 {
            return Err(Error::BlockTooLarge {
                symbols: block_len,
                limit,
            });
        }
        if symbol_size > self.max_symbol_size {
            return Err(Error::SymbolTooLarge {
                size: symbol_size,
                limit: self.max_symbol_size,
            });
        }
        if symbol_size == 0 {
            return Err(Error::InvalidParameter("symbol size"));
        }
        Ok(())
    }
}

impl Default for Limits {
    /// 65,536 source symbols (a 2^20-member rekey needs a few thousand chunks), blocks of up to
    /// 4 times the default B, symbols up to 1,472 bytes (the UDP payload of a 1,500-byte MTU),
    /// 32 extra symbols per block (RaptorQ fails to decode with K + 2 symbols about once in a
    /// million: 32 extra leaves room only for corrupt or forged symbols) and 64 blocks in flight.
    fn default() -> Self {
        Self {
            max_source_symbols: 1 << 16,
            max_block_symbols: 4 * DEFAULT_MAX_BLOCK_SYMBOLS,
            max_symbol_size: 1472,
            max_extra_symbols_per_block: 32,
            max_blocks_in_flight: 64,
        }
    }
}

/// What pushing one symbol did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Progress {
    /// Kept; the block is not decoded and needs at least `needed` more distinct symbols.
    Pending {
        /// Distinct symbols still needed at least (1 once K_b are held but did not decode).
        needed: u32,
    },
    /// This symbol completed the block: every source symbol is now available.
    Decoded,
    /// The block already held a symbol with this ESI; nothing changed.
    Duplicate,
    /// The block was already decoded (or taken); the symbol was not needed.
    AlreadyDecoded,
}

/// The decoder of one source block.
///
/// Source symbols are kept as they arrive and readable at once through
/// [`Self::source_symbol`]. Repair symbols are kept aside; when the block holds K_b distinct
/// symbols, a `raptorq` decoder is made and fed everything, and from then on each new symbol
/// goes straight to it and triggers one more attempt until the block decodes.
#[derive(Debug)]
pub struct BlockDecoder {
    sbn: u8,
    block_len: u32,
    symbol_size: u16,
    max_kept: u32,
    /// Received source symbols by ESI, until the block decodes. Kept one allocation per symbol
    /// (not one block-sized buffer) so that a block costs memory in proportion to what arrived.
    source: Vec<Option<Vec<u8>>>,
    /// Which source ESIs were received (not reconstructed); outlives `source`.
    received: Vec<bool>,
    received_source: u32,
    /// Repair ESIs held (in `pending_repair` or inside `solver`).
    repair_esis: HashSet<u32>,
    /// Repair symbols not yet handed to `solver`.
    pending_repair: Vec<EncodingPacket>,
    solver: Option<SourceBlockDecoder>,
    /// The block's bytes (K_b * T) once decoded.
    decoded: Option<Vec<u8>>,
}

impl BlockDecoder {
    /// The decoder of block `sbn` with `block_len` source symbols of `symbol_size` bytes,
    /// checked against `limits` before anything is allocated.
    pub fn new(sbn: u8, block_len: u32, symbol_size: u16, limits: &Limits) -> Result<Self> {
        limits.check_block(block_len, symbol_size)?;
        Ok(Self {
            sbn,
            block_len,
            symbol_size,
            max_kept: block_len.saturating_add(limits.max_extra_symbols_per_block),
            source: vec![None; block_len as usize],
            received: vec![false; block_len as usize],
            received_source: 0,
            repair_esis: HashSet::new(),
            pending_repair: Vec::new(),
            solver: None,
            decoded: None,
        })
    }

    /// The source block number.
    pub fn sbn(&self) -> u8 {
        self.sbn
    }

    /// K_b: source symbols of the block.
    pub fn block_len(&self) -> u32 {
        self.block_len
    }

    /// Distinct symbols held (source and repair).
    pub fn symbols_held(&self) -> u32 {
        self.received_source + self.repair_esis.len() as u32
    }

    /// Whether every source symbol is available.
    pub fn is_decoded(&self) -> bool {
        self.decoded.is_some()
    }

    /// Distinct symbols still needed at least: 0 once decoded, K_b less the symbols held before
    /// that, and 1 when K_b or more are held and did not decode (RaptorQ fails with K_b symbols
    /// about once in a hundred; one more symbol makes failure about a hundred times rarer).
    pub fn needed(&self) -> u32 {
        if self.is_decoded() {
            0
        } else {
            self.block_len.saturating_sub(self.symbols_held()).max(1)
        }
    }

    /// Takes symbol `esi` (T bytes). Duplicates and symbols of a decoded block are ignored;
    /// a wrong length, an ESI past 24 bits or a block already keeping its limit of symbols is
    /// an error, and the symbol is not kept.
    pub fn push(&mut self, esi: u32, symbol: &[u8]) -> Result<Progress> {
        check_symbol(self.symbol_size, esi, symbol)?;
        if self.is_decoded() {
            return Ok(Progress::AlreadyDecoded);
        }
        // check_symbol bounded esi to 24 bits, so PayloadId::new cannot panic below.
        let for_solver = if esi < self.block_len {
            let slot = esi as usize;
            if self.received[slot] {
                return Ok(Progress::Duplicate);
            }
            self.source[slot] = Some(symbol.to_vec());
            self.received[slot] = true;
            self.received_source += 1;
            if self.received_source == self.block_len {
                // Every source symbol arrived: nothing to solve, whatever repair is held.
                let block = self.source.iter().flatten().flatten().copied().collect();
                self.finish(block);
                return Ok(Progress::Decoded);
            }
            self.solver
                .is_some()
                .then(|| EncodingPacket::new(PayloadId::new(self.sbn, esi), symbol.to_vec()))
        } else {
            if self.repair_esis.contains(&esi) {
                return Ok(Progress::Duplicate);
            }
            if self.symbols_held() >= self.max_kept {
                return Err(Error::TooManySymbols {
                    sbn: self.sbn,
                    limit: self.max_kept,
                });
            }
            self.repair_esis.insert(esi);
            let packet = EncodingPacket::new(PayloadId::new(self.sbn, esi), symbol.to_vec());
            if self.solver.is_some() {
                Some(packet)
            } else {
                self.pending_repair.push(packet);
                None
            }
        };
        Ok(self.attempt(for_solver))
    }

    /// Source symbol `esi` if it was received or the block is decoded: a member reads its own
    /// chunk here the moment it arrives.
    pub fn source_symbol(&self, esi: u32) -> Option<&[u8]> {
        let slot = usize::try_from(esi).ok()?;
        match &self.decoded {
            Some(block) => {
                let t = usize::from(self.symbol_size);
                block.get(slot.checked_mul(t)?..slot.checked_add(1)?.checked_mul(t)?)
            }
            None => self.source.get(slot)?.as_deref(),
        }
    }

    /// The decoded block (K_b * T bytes), or `None` before it decodes.
    pub fn block(&self) -> Option<&[u8]> {
        self.decoded.as_deref()
    }

    /// The decoded block, consuming the decoder; `None` if it is not decoded.
    pub fn into_block(self) -> Option<Vec<u8>> {
        self.decoded
    }

    /// Forgets every repair symbol and every source symbol reconstructed from them, keeping the
    /// source symbols that were received. For a block whose decoded content failed
    /// authentication: a forged repair symbol (an insider's) poisons a decode, while each chunk
    /// authenticates itself. Repair ESIs seen before may be accepted again afterwards.
    pub fn discard_repair_symbols(&mut self) {
        self.repair_esis.clear();
        self.pending_repair.clear();
        self.solver = None;
        if self.received_source == self.block_len {
            return;
        }
        if let Some(block) = self.decoded.take() {
            // A decoded block holds every received source symbol as it arrived.
            let t = usize::from(self.symbol_size);
            for (slot, symbol) in block.chunks_exact(t).enumerate() {
                if self.received[slot] {
                    self.source[slot] = Some(symbol.to_vec());
                }
            }
        }
    }

    /// Tries to complete the block once K_b distinct symbols are held. With a solver already
    /// made, `new_symbol` (the symbol just pushed) is handed to it; otherwise the solver is made
    /// and fed every symbol held.
    fn attempt(&mut self, new_symbol: Option<EncodingPacket>) -> Progress {
        if self.symbols_held() < self.block_len {
            return Progress::Pending {
                needed: self.needed(),
            };
        }
        let block_bytes = u64::from(self.block_len) * u64::from(self.symbol_size);
        let result = if let Some(solver) = self.solver.as_mut() {
            solver.decode(new_symbol)
        } else {
            let mut packets = Vec::with_capacity(self.symbols_held() as usize);
            for (esi, symbol) in self.source.iter().enumerate() {
                if let Some(symbol) = symbol {
                    // esi < block_len <= K'max: a valid 24-bit ESI.
                    packets.push(EncodingPacket::new(
                        PayloadId::new(self.sbn, esi as u32),
                        symbol.clone(),
                    ));
                }
            }
            packets.append(&mut self.pending_repair);
            // raptorq reads only T, the sub-block count (1) and the alignment (1) from this;
            // the block's length in bytes is block_len * T with block_len <= K'max, as its
            // assertions require.
            let config = ObjectTransmissionInformation::new(block_bytes, self.symbol_size, 1, 1, 1);
            let mut solver = SourceBlockDecoder::new(self.sbn, &config, block_bytes);
            let result = solver.decode(packets);
            self.solver = Some(solver);
            result
        };
        match result {
            // raptorq returns exactly block_len * T bytes (one sub-block, no padding); anything
            // else would be a raptorq bug, and counts as a failed attempt.
            Some(block) if block.len() as u64 == block_bytes => {
                self.finish(block);
                Progress::Decoded
            }
            _ => Progress::Pending {
                needed: self.needed(),
            },
        }
    }

    fn finish(&mut self, block: Vec<u8>) {
        self.decoded = Some(block);
        self.solver = None;
        self.pending_repair = Vec::new();
        // The decoded block holds the received symbols too; `received` remembers which.
        self.source.iter_mut().for_each(|slot| *slot = None);
    }
}

/// The decoder of a whole object: one [`BlockDecoder`] per block, made when the block's first
/// symbol arrives, within [`Limits`].
#[derive(Debug)]
pub struct ObjectDecoder {
    info: ObjectInfo,
    partition: BlockPartition,
    limits: Limits,
    blocks: Vec<Slot>,
    in_flight: u32,
}

#[derive(Debug)]
enum Slot {
    Idle,
    Active(Box<BlockDecoder>),
    Taken,
}

impl ObjectDecoder {
    /// A decoder for the object `info` describes, checked against `limits`.
    pub fn new(info: ObjectInfo, limits: Limits) -> Result<Self> {
        limits.check(&info)?;
        let partition = info.partition();
        let blocks = (0..partition.block_count()).map(|_| Slot::Idle).collect();
        Ok(Self {
            info,
            partition,
            limits,
            blocks,
            in_flight: 0,
        })
    }

    /// The object transmission information.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    /// The partition of the object into blocks.
    pub fn partition(&self) -> &BlockPartition {
        &self.partition
    }

    /// Takes symbol `esi` of block `sbn`. The block, ESI and length are checked before any
    /// state is made for the block; see [`BlockDecoder::push`].
    pub fn push(&mut self, sbn: u8, esi: u32, symbol: &[u8]) -> Result<Progress> {
        let block_len = self.partition.block_len(sbn)?;
        check_symbol(self.info.symbol_size(), esi, symbol)?;
        let slot = &mut self.blocks[usize::from(sbn)];
        match slot {
            Slot::Taken => return Ok(Progress::AlreadyDecoded),
            Slot::Active(block) if block.is_decoded() => return Ok(Progress::AlreadyDecoded),
            Slot::Active(_) => {}
            Slot::Idle => {
                if self.in_flight >= self.limits.max_blocks_in_flight {
                    return Err(Error::TooManyBlocksInFlight {
                        limit: self.limits.max_blocks_in_flight,
                    });
                }
                let block =
                    BlockDecoder::new(sbn, block_len, self.info.symbol_size(), &self.limits)?;
                *slot = Slot::Active(Box::new(block));
                self.in_flight += 1;
            }
        }
        let Slot::Active(block) = slot else {
            // The match above returned or made the slot active.
            return Ok(Progress::AlreadyDecoded);
        };
        let progress = block.push(esi, symbol)?;
        if progress == Progress::Decoded {
            self.in_flight -= 1;
        }
        Ok(progress)
    }

    /// Distinct symbols block `sbn` still needs at least (see [`BlockDecoder::needed`]).
    pub fn needed(&self, sbn: u8) -> Result<u32> {
        let len = self.partition.block_len(sbn)?;
        Ok(match &self.blocks[usize::from(sbn)] {
            Slot::Idle => len,
            Slot::Active(block) => block.needed(),
            Slot::Taken => 0,
        })
    }

    /// Source symbol `esi` of block `sbn`, if it arrived or its block decoded (and was not
    /// taken).
    pub fn source_symbol(&self, sbn: u8, esi: u32) -> Option<&[u8]> {
        match self.blocks.get(usize::from(sbn))? {
            Slot::Active(block) => block.source_symbol(esi),
            Slot::Idle | Slot::Taken => None,
        }
    }

    /// Source symbol `index` of the object (a member's chunk), if available.
    pub fn source_symbol_at(&self, index: u32) -> Option<&[u8]> {
        let id = self.partition.locate(index).ok()?;
        self.source_symbol(id.sbn, id.esi)
    }

    /// Whether block `sbn` is decoded (or was taken).
    pub fn is_block_decoded(&self, sbn: u8) -> bool {
        match self.blocks.get(usize::from(sbn)) {
            Some(Slot::Active(block)) => block.is_decoded(),
            Some(Slot::Taken) => true,
            Some(Slot::Idle) | None => false,
        }
    }

    /// Whether every block is decoded (or taken).
    pub fn is_complete(&self) -> bool {
        (0..self.blocks.len()).all(|b| u8::try_from(b).is_ok_and(|b| self.is_block_decoded(b)))
    }

    /// Blocks started and not decoded.
    pub fn blocks_in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The decoded block `sbn` (K_b * T bytes), if decoded and not taken.
    pub fn block(&self, sbn: u8) -> Option<&[u8]> {
        match self.blocks.get(usize::from(sbn))? {
            Slot::Active(block) => block.block(),
            Slot::Idle | Slot::Taken => None,
        }
    }

    /// Takes the decoded block `sbn` out, freeing its memory; later symbols of that block are
    /// ignored ([`Progress::AlreadyDecoded`]). `None` if it is not decoded (or already taken).
    pub fn take_block(&mut self, sbn: u8) -> Option<Vec<u8>> {
        let slot = self.blocks.get_mut(usize::from(sbn))?;
        if !matches!(slot, Slot::Active(block) if block.is_decoded()) {
            return None;
        }
        match std::mem::replace(slot, Slot::Taken) {
            Slot::Active(block) => block.into_block(),
            Slot::Idle | Slot::Taken => None,
        }
    }

    /// The whole object (K * T bytes) once every block is decoded and none was taken.
    pub fn object(&self) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(self.info.transfer_length()).ok()?);
        for slot in &self.blocks {
            match slot {
                Slot::Active(block) => out.extend_from_slice(block.block()?),
                Slot::Idle | Slot::Taken => return None,
            }
        }
        Some(out)
    }

    /// See [`BlockDecoder::discard_repair_symbols`]; the block may be in flight again after it.
    pub fn discard_repair_symbols(&mut self, sbn: u8) -> Result<()> {
        self.partition.block_len(sbn)?;
        if let Slot::Active(block) = &mut self.blocks[usize::from(sbn)] {
            let was_decoded = block.is_decoded();
            block.discard_repair_symbols();
            if was_decoded && !block.is_decoded() {
                self.in_flight += 1;
            }
        }
        Ok(())
    }
}

/// Checks a symbol's ESI and length: what `raptorq` would otherwise assert.
fn check_symbol(symbol_size: u16, esi: u32, symbol: &[u8]) -> Result<()> {
    check_esi(esi)?;
    if symbol.len() != usize::from(symbol_size) {
        return Err(Error::SymbolLength {
            expected: symbol_size,
            actual: symbol.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockEncoder, ObjectEncoder, MAX_ESI};

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn invalid_symbols_are_rejected_before_any_state() {
        let info = ObjectInfo::new(10, 8, 5).unwrap();
        let mut decoder = ObjectDecoder::new(info, Limits::default()).unwrap();
        assert_eq!(
            decoder.push(2, 0, &[0; 8]),
            Err(Error::SbnOutOfRange { sbn: 2, blocks: 2 })
        );
        assert_eq!(
            decoder.push(0, 0, &[0; 7]),
            Err(Error::SymbolLength {
                expected: 8,
                actual: 7
            })
        );
        assert_eq!(
            decoder.push(0, 0, &[0; 9]),
            Err(Error::SymbolLength {
                expected: 8,
                actual: 9
            })
        );
        assert_eq!(
            decoder.push(0, 0, &[]),
            Err(Error::SymbolLength {
                expected: 8,
                actual: 0
            })
        );
        assert_eq!(
            decoder.push(0, MAX_ESI + 1, &[0; 8]),
            Err(Error::EsiOutOfRange {
                esi: u64::from(MAX_ESI) + 1
            })
        );
        assert_eq!(
            decoder.push(0, u32::MAX, &[0; 8]),
            Err(Error::EsiOutOfRange {
                esi: u64::from(u32::MAX)
            })
        );
        assert_eq!(decoder.blocks_in_flight(), 0);
        assert_eq!(decoder.needed(0), Ok(5));
        assert_eq!(
            decoder.needed(9),
            Err(Error::SbnOutOfRange { sbn: 9, blocks: 2 })
        );
        // The largest ESI is a valid repair symbol.
        assert_eq!(
            decoder.push(0, MAX_ESI, &[0; 8]),
            Ok(Progress::Pending { needed: 4 })
        );
    }

    #[test]
    fn limits_are_checked_up_front() {
        let limits = Limits {
            max_source_symbols: 100,
            max_block_symbols: 10,
            max_symbol_size: 64,
            max_extra_symbols_per_block: 4,
            max_blocks_in_flight: 2,
        };
        let check = |k, t, b| ObjectDecoder::new(ObjectInfo::new(k, t, b).unwrap(), limits).err();
        assert_eq!(check(100, 64, 10), None);
        assert_eq!(
            check(101, 64, 10),
            Some(Error::ObjectTooLarge {
                symbols: 101,
                limit: 100
            })
        );
        assert_eq!(
            check(100, 64, 50),
            Some(Error::BlockTooLarge {
                symbols: 50,
                limit: 10
            })
        );
        assert_eq!(
            check(100, 65, 10),
            Some(Error::SymbolTooLarge {
                size: 65,
                limit: 64
            })
        );
        assert_eq!(
            BlockDecoder::new(0, 11, 8, &limits).err(),
            Some(Error::BlockTooLarge {
                symbols: 11,
                limit: 10
            })
        );
        assert_eq!(
            BlockDecoder::new(0, 0, 8, &limits).err(),
            Some(Error::BlockTooLarge {
                symbols: 0,
                limit: 10
            })
        );
        assert_eq!(
            BlockDecoder::new(0, 4, 0, &limits).err(),
            Some(Error::InvalidParameter("symbol size"))
        );
        // A limit above K'max is clamped to it.
        let loose = Limits {
            max_block_symbols: u32::MAX,
            ..limits
        };
        assert_eq!(
            BlockDecoder::new(0, MAX_BLOCK_SYMBOLS + 1, 1, &loose).err(),
            Some(Error::BlockTooLarge {
                symbols: MAX_BLOCK_SYMBOLS + 1,
                limit: MAX_BLOCK_SYMBOLS
            })
        );
    }

    #[test]
    fn source_symbols_are_usable_on_arrival_and_duplicates_ignored() {
        let info = ObjectInfo::new(6, 4, 6).unwrap();
        let data = bytes(24, 3);
        let mut decoder = ObjectDecoder::new(info, Limits::default()).unwrap();
        assert_eq!(decoder.source_symbol_at(4), None);
        assert_eq!(
            decoder.push(0, 4, &data[16..20]),
            Ok(Progress::Pending { needed: 5 })
        );
        assert_eq!(decoder.source_symbol_at(4), Some(&data[16..20]));
        assert_eq!(decoder.source_symbol(0, 3), None);
        assert_eq!(decoder.block(0), None);
        assert_eq!(decoder.push(0, 4, &data[16..20]), Ok(Progress::Duplicate));
        assert_eq!(decoder.needed(0), Ok(5));
        // Every source symbol: decoded with no repair and no solve.
        for esi in [5, 0, 3, 1] {
            let i = esi as usize;
            assert!(matches!(
                decoder.push(0, esi, &data[i * 4..i * 4 + 4]),
                Ok(Progress::Pending { .. })
            ));
        }
        assert_eq!(decoder.push(0, 2, &data[8..12]), Ok(Progress::Decoded));
        assert_eq!(decoder.block(0), Some(&data[..]));
        assert_eq!(decoder.blocks_in_flight(), 0);
        assert!(decoder.is_complete());
        assert_eq!(decoder.push(0, 7, &[0; 4]), Ok(Progress::AlreadyDecoded));
        assert_eq!(decoder.object(), Some(data.clone()));
        assert_eq!(decoder.take_block(0), Some(data));
        assert_eq!(decoder.take_block(0), None);
        assert_eq!(decoder.object(), None);
        assert_eq!(decoder.push(0, 1, &[0; 4]), Ok(Progress::AlreadyDecoded));
        assert!(decoder.is_block_decoded(0));
        assert_eq!(decoder.needed(0), Ok(0));
    }

    /// Finds, deterministically, a set of K repair ESIs that does not decode a block of K (about
    /// one window in 200 fails), which the next two tests need.
    fn failing_window(k: u32, encoder: &BlockEncoder) -> u32 {
        for start in (k..k + 20_000).step_by(k as usize) {
            let mut decoder = BlockDecoder::new(0, k, 4, &Limits::default()).unwrap();
            let mut last = Progress::Duplicate;
            for esi in start..start + k {
                last = decoder
                    .push(esi, &encoder.repair_symbol(esi).unwrap())
                    .unwrap();
            }
            if last == (Progress::Pending { needed: 1 }) {
                return start;
            }
        }
        panic!("no failing window of {k} repair ESIs found");
    }

    #[test]
    fn a_failed_attempt_needs_one_more_and_the_symbol_cap_holds() {
        let k = 10;
        let source = bytes(40, 9);
        let encoder = BlockEncoder::new(0, 4, &source).unwrap();
        let start = failing_window(k, &encoder);
        let limits = Limits {
            max_extra_symbols_per_block: 1,
            ..Limits::default()
        };
        let mut decoder = BlockDecoder::new(0, k, 4, &limits).unwrap();
        for esi in start..start + k {
            let _ = decoder
                .push(esi, &encoder.repair_symbol(esi).unwrap())
                .unwrap();
        }
        assert!(!decoder.is_decoded());
        assert_eq!(decoder.needed(), 1);
        assert_eq!(decoder.symbols_held(), k);
        // One extra symbol is allowed. It decodes the block with probability about 0.99; when
        // it does not, the next repair symbol is refused.
        let progress = decoder
            .push(start + k, &encoder.repair_symbol(start + k).unwrap())
            .unwrap();
        if progress != Progress::Decoded {
            assert_eq!(
                decoder.push(
                    start + k + 1,
                    &encoder.repair_symbol(start + k + 1).unwrap()
                ),
                Err(Error::TooManySymbols {
                    sbn: 0,
                    limit: k + 1
                })
            );
            // A source symbol still fits: it takes no new memory.
            let _ = decoder.push(0, &source[..4]).unwrap();
        } else {
            assert_eq!(decoder.block(), Some(&source[..]));
        }
        // With no extra room at all, the symbol after a failed attempt is refused.
        let strict = Limits {
            max_extra_symbols_per_block: 0,
            ..Limits::default()
        };
        let mut decoder = BlockDecoder::new(0, k, 4, &strict).unwrap();
        for esi in start..start + k {
            let _ = decoder
                .push(esi, &encoder.repair_symbol(esi).unwrap())
                .unwrap();
        }
        assert_eq!(
            decoder.push(start + k, &encoder.repair_symbol(start + k).unwrap()),
            Err(Error::TooManySymbols { sbn: 0, limit: k })
        );
        assert_eq!(decoder.push(start, &[0; 4]), Ok(Progress::Duplicate));
    }

    #[test]
    fn more_symbols_complete_a_failed_block() {
        let k = 10;
        let source = bytes(40, 1);
        let encoder = BlockEncoder::new(0, 4, &source).unwrap();
        let start = failing_window(k, &encoder);
        let mut decoder = BlockDecoder::new(0, k, 4, &Limits::default()).unwrap();
        for esi in start..start + k {
            let _ = decoder
                .push(esi, &encoder.repair_symbol(esi).unwrap())
                .unwrap();
        }
        assert_eq!(decoder.needed(), 1);
        let mut extra = 0;
        let mut esi = start + k;
        while !decoder.is_decoded() {
            let _ = decoder
                .push(esi, &encoder.repair_symbol(esi).unwrap())
                .unwrap();
            esi += 1;
            extra += 1;
            assert!(extra <= 4, "still not decoded after {extra} more symbols");
        }
        assert_eq!(decoder.block(), Some(&source[..]));
    }

    #[test]
    fn blocks_in_flight_are_bounded() {
        let info = ObjectInfo::new(9, 4, 3).unwrap();
        let data = bytes(36, 5);
        let encoder = ObjectEncoder::new(info, data).unwrap();
        let limits = Limits {
            max_blocks_in_flight: 2,
            ..Limits::default()
        };
        let mut decoder = ObjectDecoder::new(info, limits).unwrap();
        let _ = decoder
            .push(0, 0, encoder.source_symbol(0, 0).unwrap())
            .unwrap();
        let _ = decoder
            .push(1, 0, encoder.source_symbol(1, 0).unwrap())
            .unwrap();
        assert_eq!(decoder.blocks_in_flight(), 2);
        assert_eq!(
            decoder.push(2, 0, encoder.source_symbol(2, 0).unwrap()),
            Err(Error::TooManyBlocksInFlight { limit: 2 })
        );
        assert_eq!(decoder.needed(2), Ok(3));
        for esi in 1..3 {
            let _ = decoder
                .push(0, esi, encoder.source_symbol(0, esi).unwrap())
                .unwrap();
        }
        assert_eq!(decoder.blocks_in_flight(), 1);
        assert!(decoder
            .push(2, 0, encoder.source_symbol(2, 0).unwrap())
            .is_ok());
    }

    #[test]
    fn discarding_repair_keeps_received_source_symbols() {
        let info = ObjectInfo::new(4, 4, 4).unwrap();
        let data = bytes(16, 2);
        let encoder = ObjectEncoder::new(info, data.clone()).unwrap();
        let mut decoder = ObjectDecoder::new(info, Limits::default()).unwrap();
        let _ = decoder.push(0, 0, &data[..4]).unwrap();
        let _ = decoder.push(0, 1, &data[4..8]).unwrap();
        // Forged repair symbols (an insider's): the block "decodes" to wrong bytes.
        let mut esi = 4;
        while !decoder.is_block_decoded(0) {
            let _ = decoder.push(0, esi, &[0xEE; 4]).unwrap();
            esi += 1;
        }
        assert_ne!(decoder.block(0), Some(&data[..]));
        decoder.discard_repair_symbols(0).unwrap();
        assert!(!decoder.is_block_decoded(0));
        assert_eq!(decoder.blocks_in_flight(), 1);
        assert_eq!(decoder.source_symbol(0, 1), Some(&data[4..8]));
        assert_eq!(decoder.source_symbol(0, 2), None);
        assert_eq!(decoder.needed(0), Ok(2));
        // Genuine repair symbols, even with ESIs the forged ones used, now decode it.
        let mut esi = 4;
        while !decoder.is_block_decoded(0) {
            let symbol = encoder.block(0).unwrap().repair_symbol(esi).unwrap();
            let _ = decoder.push(0, esi, &symbol).unwrap();
            esi += 1;
        }
        assert_eq!(decoder.block(0), Some(&data[..]));
        assert_eq!(decoder.blocks_in_flight(), 0);
        assert_eq!(
            decoder.discard_repair_symbols(7),
            Err(Error::SbnOutOfRange { sbn: 7, blocks: 1 })
        );
    }
}
