//! A relay's repair for the blocks of the message it is still receiving.
//!
//! A relay forwards each block's source symbols the moment it holds them (cut-through), but
//! its downstream side takes the message only once every block is whole. [`EarlyRepair`]
//! keeps the source symbols of each block of the message in progress as they are forwarded;
//! once a block is whole, a downstream NACK for it is answered at once with repair symbols
//! the relay encodes itself (a RaptorQ encoder of that one block), rather than held until the
//! whole message is.
//!
//! Those symbols carry ESIs from [`FIRST_ESI`] up: the downstream side numbers its own
//! repair from the block's source symbols up, one ESI per symbol it sends, so it never comes
//! near them, and a member's decoder takes any ESI up to the 24-bit maximum. RaptorQ repair
//! symbols are a pure function of the block, so these are the symbols the GCKS would send
//! with those ESIs.

use std::collections::VecDeque;

use rekeycast_fec::{BlockEncoder, ObjectInfo, MAX_ESI};

use crate::auth::mac::MacKey;
use crate::session::manifest::SignedManifest;
use crate::session::receiver::Forward;
use crate::wire::ObjectKind;

/// The first ESI of a relay's early repair symbols, far above what the downstream sender's
/// own repair (counting up from the block's length) reaches.
pub const FIRST_ESI: u32 = 1 << 23;

/// Repair symbols queued for sending at most (the rest of a NACK waits for the adoption).
const MAX_QUEUED: usize = 65_536;

/// One block of the message in progress.
#[derive(Debug)]
struct Block {
    /// Its source symbols, by ESI.
    symbols: Vec<Option<Vec<u8>>>,
    /// How many of them the relay holds.
    held: u32,
    /// Source symbols of this block taken for forwarding (received or reconstructed).
    forwarded: u32,
    /// Built when the first NACK for the whole block comes.
    encoder: Option<BlockEncoder>,
    /// The next early repair ESI of this block.
    next_esi: u32,
    /// Early repair symbols of this block queued and not yet sent.
    queued: u32,
}

impl Block {
    fn is_whole(&self) -> bool {
        self.held as usize == self.symbols.len()
    }
}

/// The source symbols of the message in progress, and the early repair queued for it. See
/// the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct EarlyRepair {
    seq: Option<u64>,
    mac_key: Option<MacKey>,
    symbol_size: u16,
    blocks: Vec<Block>,
    /// (SBN, ESI) of the repair symbols to send, in order.
    queue: VecDeque<(u8, u32)>,
    /// Early repair symbols sent.
    pub(crate) sent: u64,
    /// Downstream NACKs answered (in whole or in part) by early repair.
    pub(crate) answered: u64,
}

impl EarlyRepair {
    /// Takes a verified piece the relay forwards: the manifest starts the message's blocks,
    /// a source symbol fills its slot. Returns the block's SBN when that symbol made it whole.
    pub(crate) fn take(&mut self, forward: &Forward) -> Option<u8> {
        match forward.object {
            ObjectKind::Manifest => {
                self.start(forward);
                None
            }
            ObjectKind::Chunks => {
                if self.seq != Some(forward.seq) {
                    return None;
                }
                let size = usize::from(self.symbol_size);
                let block = self.blocks.get_mut(usize::from(forward.sbn))?;
                let slot = block.symbols.get_mut(forward.esi as usize)?;
                block.forwarded += 1;
                if slot.is_some() {
                    return None;
                }
                let mut data = forward.data.clone();
                data.resize(size, 0);
                *slot = Some(data);
                block.held += 1;
                block.is_whole().then_some(forward.sbn)
            }
        }
    }

    /// A verified manifest: the blocks of its message, empty.
    fn start(&mut self, forward: &Forward) {
        if self.seq == Some(forward.seq) {
            return;
        }
        *self = Self {
            sent: self.sent,
            answered: self.answered,
            ..Self::default()
        };
        let Ok(signed) = SignedManifest::parse(&forward.data) else {
            return;
        };
        let Ok(info) = ObjectInfo::parse(&signed.manifest.fec_info) else {
            return;
        };
        let partition = info.partition();
        let mut blocks = Vec::new();
        for sbn in 0..partition.block_count() {
            let Some(len) = u8::try_from(sbn)
                .ok()
                .and_then(|sbn| partition.block_len(sbn).ok())
            else {
                return;
            };
            blocks.push(Block {
                symbols: vec![None; len as usize],
                held: 0,
                forwarded: 0,
                encoder: None,
                next_esi: FIRST_ESI,
                queued: 0,
            });
        }
        self.seq = Some(forward.seq);
        self.mac_key = Some(forward.mac_key.clone());
        self.symbol_size = info.symbol_size();
        self.blocks = blocks;
    }

    /// Source symbols of block `sbn` of message `seq` taken for forwarding so far.
    pub(crate) fn forwarded(&self, seq: u64, sbn: u8) -> u32 {
        match self.block(seq, sbn) {
            Some(block) => block.forwarded,
            None => 0,
        }
    }

    /// Whether the relay holds block `sbn` of message `seq` whole.
    pub(crate) fn is_whole(&self, seq: u64, sbn: u8) -> bool {
        self.block(seq, sbn).is_some_and(Block::is_whole)
    }

    fn block(&self, seq: u64, sbn: u8) -> Option<&Block> {
        (self.seq == Some(seq))
            .then(|| self.blocks.get(usize::from(sbn)))
            .flatten()
    }

    /// A downstream member needs `need` more symbols of whole block `sbn` of message `seq`:
    /// queues fresh repair symbols until that many are waiting to be sent (those queued for
    /// an earlier NACK count). Returns how many were queued; 0 if the block is not whole.
    pub(crate) fn request(&mut self, seq: u64, sbn: u8, need: u32) -> u32 {
        if self.seq != Some(seq) || need == 0 {
            return 0;
        }
        let size = self.symbol_size;
        let room = MAX_QUEUED.saturating_sub(self.queue.len());
        let Some(block) = self.blocks.get_mut(usize::from(sbn)) else {
            return 0;
        };
        if !block.is_whole() {
            return 0;
        }
        if block.encoder.is_none() {
            let source: Vec<u8> = block.symbols.iter().flatten().flatten().copied().collect();
            block.encoder = BlockEncoder::new(sbn, size, &source).ok();
            if block.encoder.is_none() {
                return 0;
            }
        }
        let add = need
            .saturating_sub(block.queued)
            .min(MAX_ESI.saturating_sub(block.next_esi).saturating_add(1))
            .min(u32::try_from(room).unwrap_or(u32::MAX));
        for _ in 0..add {
            self.queue.push_back((sbn, block.next_esi));
            block.next_esi += 1;
        }
        block.queued += add;
        if add > 0 {
            self.answered += 1;
        }
        add
    }

    /// Whether repair symbols wait to be sent.
    pub(crate) fn is_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The next queued repair symbol, sealed into `buf` as a datagram of `(group, spi)`.
    pub(crate) fn next(&mut self, (group_id, spi): (u32, u32), buf: &mut [u8]) -> Option<usize> {
        while let Some((sbn, esi)) = self.queue.pop_front() {
            let seq = self.seq?;
            let key = self.mac_key.clone()?;
            let block = self.blocks.get_mut(usize::from(sbn))?;
            block.queued = block.queued.saturating_sub(1);
            let Some(symbol) = block
                .encoder
                .as_ref()
                .and_then(|encoder| encoder.repair_symbol(esi).ok())
            else {
                continue;
            };
            let repr = crate::wire::DatagramRepr {
                group_id,
                spi,
                seq,
                body: crate::wire::BodyRepr::Symbol(crate::wire::SymbolRepr {
                    object: ObjectKind::Chunks,
                    sbn,
                    esi,
                    data: &symbol,
                }),
                mac: [0; crate::wire::datagram::MAC_LEN],
            };
            if let Some(len) = crate::session::seal_into(&repr, &key, buf) {
                self.sent += 1;
                return Some(len);
            }
        }
        None
    }
}
