//! Property checks for fuzzing and corpus replay; nothing in the engine calls these.
//!
//! [`decoder`] is the body of the `fec_decoder` fuzz target in `fuzz/` and of the test that
//! replays `fuzz/corpus/fec_decoder/`. It asserts what this crate promises for any input: the
//! object transmission information parses to a value or a typed error and a value emits back to
//! its bytes; a decoder fed arbitrary (SBN, ESI, bytes) records returns a value or an expected
//! typed error, never panics, keeps its invariants, and when fed genuine symbols decodes exactly
//! the encoded object. A violated promise panics, which is how a fuzzer or a test reports it.
//!
//! Input layout: bytes 0..7 are an [`ObjectInfo`]; byte 7 picks the mode (even: arbitrary
//! records, odd: genuine symbols); the rest are records.
//!
//! - Arbitrary record: SBN (1 byte), ESI (3 bytes, big-endian), length byte L, then the symbol:
//!   exactly T bytes when L is 255, else L bytes (so most lengths are wrong on purpose).
//! - Genuine record: SBN (1 byte), ESI (3 bytes); the symbol is the real encoding symbol of a
//!   deterministic object, with the ESI reduced modulo K_b + 32 so that source and repair
//!   symbols mix.

use std::sync::OnceLock;

use crate::{
    EncodingPlans, Error, Limits, ObjectDecoder, ObjectEncoder, ObjectInfo, Progress, MAX_ESI,
};

/// Limits for arbitrary records: small, so each run is fast and the limits are reached.
pub const ARBITRARY_LIMITS: Limits = Limits {
    max_source_symbols: 1024,
    max_block_symbols: 64,
    max_symbol_size: 64,
    max_extra_symbols_per_block: 8,
    max_blocks_in_flight: 4,
};

/// Limits for genuine symbols: enough extra room that a block always completes.
pub const GENUINE_LIMITS: Limits = Limits {
    max_source_symbols: 256,
    max_block_symbols: 64,
    max_symbol_size: 64,
    max_extra_symbols_per_block: 64,
    max_blocks_in_flight: 255,
};

/// Fresh repair symbols a genuine-mode block may need past its count before it must decode.
/// RaptorQ fails with K + h symbols with probability about 10^-(2(h+1)): never at this margin.
const COMPLETION_MARGIN: u32 = 12;

/// The `fec_decoder` property check.
pub fn decoder(data: &[u8]) {
    // Parsing is total for every length, not just 7 bytes.
    if let Ok(info) = ObjectInfo::parse(data) {
        assert_eq!(
            info.to_bytes()[..],
            data[..],
            "object info does not re-emit"
        );
    }
    let Some(info_bytes) = data.get(..ObjectInfo::LEN) else {
        return;
    };
    let Ok(info) = ObjectInfo::parse(info_bytes) else {
        return;
    };
    assert_eq!(
        &info.to_bytes()[..],
        info_bytes,
        "object info does not re-emit"
    );
    let Some((&mode, records)) = data[ObjectInfo::LEN..].split_first() else {
        return;
    };
    if mode % 2 == 0 {
        arbitrary_records(info, records);
    } else {
        genuine_symbols(info, records);
    }
}

fn arbitrary_records(info: ObjectInfo, mut records: &[u8]) {
    let mut decoder = match ObjectDecoder::new(info, ARBITRARY_LIMITS) {
        Ok(decoder) => decoder,
        Err(error) => {
            assert!(
                matches!(
                    error,
                    Error::ObjectTooLarge { .. }
                        | Error::BlockTooLarge { .. }
                        | Error::SymbolTooLarge { .. }
                ),
                "unexpected error from ObjectDecoder::new: {error:?}"
            );
            return;
        }
    };
    let t = usize::from(info.symbol_size());
    let blocks = decoder.partition().block_count();
    let mut taken = 0u32;
    while let [sbn, e0, e1, e2, len, rest @ ..] = records {
        let esi = u32::from_be_bytes([0, *e0, *e1, *e2]);
        let len = if *len == 255 { t } else { usize::from(*len) };
        let Some(symbol) = rest.get(..len) else {
            return;
        };
        records = &rest[len..];
        let before = decoder.needed(*sbn).ok();
        match decoder.push(*sbn, esi, symbol) {
            Ok(Progress::Decoded) => {
                let block = decoder.block(*sbn).expect("a decoded block is readable");
                let block_len = decoder.partition().block_len(*sbn).expect("a valid block");
                assert_eq!(block.len(), block_len as usize * t);
                for e in 0..block_len {
                    assert!(decoder.source_symbol(*sbn, e).is_some());
                }
                assert_eq!(decoder.needed(*sbn), Ok(0));
                // Take every other decoded block, so both states see later symbols.
                if *sbn % 2 == 0 {
                    assert!(decoder.take_block(*sbn).is_some());
                    taken += 1;
                }
            }
            Ok(Progress::Pending { needed }) => {
                assert!(needed >= 1);
                assert_eq!(decoder.needed(*sbn), Ok(needed));
                if esi < decoder.partition().block_len(*sbn).expect("a valid block") {
                    assert_eq!(decoder.source_symbol(*sbn, esi), Some(symbol));
                }
            }
            Ok(Progress::Duplicate | Progress::AlreadyDecoded) => {
                assert_eq!(
                    decoder.needed(*sbn).ok(),
                    before,
                    "an ignored symbol changed"
                );
            }
            Err(error) => {
                assert!(
                    matches!(
                        error,
                        Error::SbnOutOfRange { .. }
                            | Error::SymbolLength { .. }
                            | Error::EsiOutOfRange { .. }
                            | Error::TooManySymbols { .. }
                            | Error::TooManyBlocksInFlight { .. }
                    ),
                    "unexpected error from push: {error:?}"
                );
                assert_eq!(
                    decoder.needed(*sbn).ok(),
                    before,
                    "a rejected symbol changed"
                );
                if matches!(error, Error::SbnOutOfRange { .. }) {
                    assert!(u32::from(*sbn) >= blocks);
                }
            }
        }
        assert!(decoder.blocks_in_flight() <= ARBITRARY_LIMITS.max_blocks_in_flight);
    }
    if taken == 0 && decoder.is_complete() {
        let object = decoder.object().expect("a complete object is readable");
        assert_eq!(object.len() as u64, info.transfer_length());
    }
}

fn genuine_symbols(info: ObjectInfo, mut records: &[u8]) {
    if ObjectDecoder::new(info, GENUINE_LIMITS).is_err() {
        return;
    }
    let t = usize::from(info.symbol_size());
    let len = info.source_symbols() as usize * t;
    let object: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    // Every block length genuine mode allows (1 to 64) keeps its plan: a run costs encoding,
    // not plan generation.
    static PLANS: OnceLock<EncodingPlans> = OnceLock::new();
    let plans = PLANS.get_or_init(|| EncodingPlans::new(64)).clone();
    let encoder = ObjectEncoder::with_plans(info, object.clone(), plans).expect("valid object");
    let mut decoder = ObjectDecoder::new(info, GENUINE_LIMITS).expect("checked above");
    let blocks = decoder.partition().block_count();
    while let [sbn, e0, e1, e2, rest @ ..] = records {
        records = rest;
        let sbn = (u32::from(*sbn) % blocks) as u8;
        let block_len = decoder.partition().block_len(sbn).expect("a valid block");
        let esi = u32::from_be_bytes([0, *e0, *e1, *e2]) % (block_len + 32);
        let symbol = genuine(&encoder, sbn, esi);
        match decoder.push(sbn, esi, &symbol) {
            Ok(_) => {}
            Err(Error::TooManySymbols { .. }) => {}
            Err(error) => panic!("a genuine symbol was rejected: {error:?}"),
        }
        if esi < block_len {
            assert_eq!(decoder.source_symbol(sbn, esi), Some(&symbol[..]));
        }
    }
    // Every block completes with fresh repair symbols, and decodes to the encoded bytes.
    for sbn in 0..blocks {
        let sbn = sbn as u8;
        let block_len = decoder.partition().block_len(sbn).expect("a valid block");
        let first = MAX_ESI - 4 * (GENUINE_LIMITS.max_block_symbols + COMPLETION_MARGIN);
        let budget = decoder.needed(sbn).expect("a valid block") + COMPLETION_MARGIN;
        for esi in first..first + budget {
            if decoder.is_block_decoded(sbn) {
                break;
            }
            let symbol = genuine(&encoder, sbn, esi);
            if let Err(error) = decoder.push(sbn, esi, &symbol) {
                // The records filled the block's room without decoding it: the chance of that
                // is below 10^-20 per block, so treat it as the finding it would be.
                panic!("block {sbn} of {block_len} did not complete: {error:?}");
            }
        }
        assert_eq!(
            decoder.block(sbn),
            Some(encoder.block_source(sbn).expect("a valid block")),
            "block {sbn} of {block_len} decoded to other bytes"
        );
    }
    assert_eq!(decoder.object(), Some(object));
}

fn genuine(encoder: &ObjectEncoder, sbn: u8, esi: u32) -> Vec<u8> {
    let block = encoder.block(sbn).expect("a valid block");
    if esi < block.block_len() {
        encoder
            .source_symbol(sbn, esi)
            .expect("a source symbol")
            .to_vec()
    } else {
        block.repair_symbol(esi).expect("a repair ESI")
    }
}
