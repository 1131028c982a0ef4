//! Decoding from every mix of source and repair symbols, in any order, with duplicates; and
//! relays producing the GCKS's repair symbols byte for byte.
//!
//! RaptorQ decodes a block of K from K received symbols with probability about 0.99, from K + 1
//! about 0.9999, and whether a given set decodes depends only on K and the set of ESIs (never
//! on the data or the order), so these tests are deterministic. Where a set of K + r symbols
//! does not decode, the test checks the decoder says it needs more and that at most a few
//! fresh repair symbols complete it, and it counts such sets so the rate stays plausible.

// The helpers below are test code too (clippy.toml allows unwrap only inside #[test] fns).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use rekeycast_fec::{
    BlockDecoder, BlockEncoder, EncodingPlans, Limits, ObjectDecoder, ObjectEncoder, ObjectInfo,
    Progress, MAX_ESI,
};

fn object_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The encoding symbol `esi` of a block: the source symbol itself below K, else a repair one.
fn symbol(encoder: &BlockEncoder, source: &[u8], esi: u32) -> Vec<u8> {
    let t = usize::from(encoder.symbol_size());
    if esi < encoder.block_len() {
        source[esi as usize * t..(esi as usize + 1) * t].to_vec()
    } else {
        encoder.repair_symbol(esi).unwrap()
    }
}

/// Feeds `esis` (reversed, each source ESI twice) then fresh repair symbols until the block
/// decodes; returns how many fresh ones it took. Checks every progress report on the way.
fn decode_with(encoder: &BlockEncoder, source: &[u8], esis: &[u32]) -> u32 {
    let k = encoder.block_len();
    let mut decoder = BlockDecoder::new(0, k, encoder.symbol_size(), &Limits::default()).unwrap();
    let mut decoded_reports = 0;
    for &esi in esis.iter().rev() {
        let data = symbol(encoder, source, esi);
        let held_before = decoder.symbols_held();
        match decoder.push(esi, &data).unwrap() {
            Progress::Decoded => decoded_reports += 1,
            Progress::Pending { needed } => {
                assert_eq!(decoder.symbols_held(), held_before + 1);
                assert_eq!(needed, k.saturating_sub(held_before + 1).max(1));
            }
            Progress::AlreadyDecoded => assert!(decoder.is_decoded()),
            Progress::Duplicate => panic!("ESI {esi} reported as a duplicate the first time"),
        }
        if esi < k {
            // A source symbol is usable at once, decoded block or not.
            assert_eq!(decoder.source_symbol(esi), Some(&data[..]));
            let again = decoder.push(esi, &data).unwrap();
            assert!(matches!(
                again,
                Progress::Duplicate | Progress::AlreadyDecoded
            ));
        }
    }
    let mut fresh = 0;
    let mut esi = 1_000_000;
    while !decoder.is_decoded() {
        assert!(decoder.needed() >= 1);
        let data = symbol(encoder, source, esi);
        if decoder.push(esi, &data).unwrap() == Progress::Decoded {
            decoded_reports += 1;
        }
        esi += 1;
        fresh += 1;
        assert!(
            fresh <= 4,
            "not decoded after {fresh} fresh repair symbols: {esis:?}"
        );
    }
    assert_eq!(decoded_reports, 1, "Decoded must be reported exactly once");
    assert_eq!(decoder.needed(), 0);
    assert_eq!(decoder.block(), Some(source));
    fresh
}

/// Every subset of `n` items with at most `max_lost` left out, as the kept items.
fn subsets_losing_at_most(n: u32, max_lost: u32) -> Vec<Vec<u32>> {
    (0u32..1 << n)
        .filter(|lost| lost.count_ones() <= max_lost)
        .map(|lost| (0..n).filter(|i| lost & (1 << i) == 0).collect())
        .collect()
}

#[test]
fn every_erasure_pattern_up_to_the_repair_count_decodes() {
    let mut patterns = 0u32;
    let mut needed_more = 0u32;
    let mut with_repair = 0u32;
    for (k, repair) in [
        (1, 2),
        (2, 2),
        (3, 3),
        (4, 3),
        (5, 3),
        (6, 3),
        (8, 4),
        (10, 4),
    ] {
        let t = 12u16;
        let source = object_bytes(k as usize * usize::from(t), u64::from(k));
        let encoder = BlockEncoder::new(0, t, &source).unwrap();
        for kept in subsets_losing_at_most(k + repair, repair) {
            if kept.iter().any(|&esi| esi >= k) {
                with_repair += 1;
            }
            if decode_with(&encoder, &source, &kept) > 0 {
                needed_more += 1;
                // Only sets of exactly K (no overhead) may fail; K + 1 or more never did here.
                assert_eq!(kept.len() as u32, k, "K + overhead failed: {kept:?}");
            }
            patterns += 1;
        }
    }
    // sum over the cases of sum_{i <= r} C(K + r, i)
    assert_eq!(patterns, 7 + 11 + 42 + 64 + 93 + 130 + 794 + 1471);
    assert!(with_repair > patterns / 2);
    // About 1% of the sets of exactly K fail; allow a generous 3% of all patterns.
    assert!(
        needed_more * 33 <= patterns,
        "{needed_more} of {patterns} needed more"
    );
}

#[test]
fn repair_only_decodes() {
    for k in [1u32, 7, 64] {
        let source = object_bytes(k as usize * 32, 77);
        let encoder = BlockEncoder::new(0, 32, &source).unwrap();
        let esis: Vec<u32> = (k..2 * k + 2).collect();
        assert_eq!(decode_with(&encoder, &source, &esis), 0);
        let high: Vec<u32> = (MAX_ESI - k - 1..=MAX_ESI).collect();
        assert_eq!(decode_with(&encoder, &source, &high), 0);
    }
}

#[test]
fn relay_repair_symbols_equal_the_gcks_symbols() {
    let info = ObjectInfo::new(700, 100, 256).unwrap(); // 3 blocks: 234, 233, 233
    let data = object_bytes(700 * 100, 5);
    let gcks = ObjectEncoder::new(info, data.clone()).unwrap();

    // The relay receives every block with 10% of its source symbols lost and repair for them.
    let mut relay_in = ObjectDecoder::new(info, Limits::default()).unwrap();
    let partition = *relay_in.partition();
    for sbn in 0..3u8 {
        let len = partition.block_len(sbn).unwrap();
        let lost = len / 10;
        for esi in lost..len {
            let _ = relay_in
                .push(sbn, esi, gcks.source_symbol(sbn, esi).unwrap())
                .unwrap();
        }
        let mut esi = len;
        while !relay_in.is_block_decoded(sbn) {
            let repair = gcks.block(sbn).unwrap().repair_symbol(esi).unwrap();
            let _ = relay_in.push(sbn, esi, &repair).unwrap();
            esi += 1;
            assert!(esi <= len + lost + 4);
        }
    }
    let decoded = relay_in.object().unwrap();
    assert_eq!(decoded, data);

    // The relay's own encoders: a whole object with its own plan cache, and one block alone.
    let relay = ObjectEncoder::with_plans(info, decoded, EncodingPlans::new(2)).unwrap();
    let block1 = relay_in.take_block(1).unwrap();
    let relay_block1 = BlockEncoder::new(1, 100, &block1).unwrap();
    for sbn in 0..3u8 {
        let len = partition.block_len(sbn).unwrap();
        for (first, count) in [(len, 200), (len + 1_000, 5), (MAX_ESI - 9, 10)] {
            let ours: Vec<_> = gcks.repair_symbols(sbn, first, count).unwrap().collect();
            let theirs: Vec<_> = relay.repair_symbols(sbn, first, count).unwrap().collect();
            assert_eq!(ours.len(), count as usize);
            assert_eq!(ours, theirs, "block {sbn} ESIs {first}..+{count}");
            if sbn == 1 {
                let alone: Vec<_> = relay_block1.repair_symbols(first, count).unwrap().collect();
                assert_eq!(ours, alone);
            }
        }
    }
    // Different blocks and different ESIs give different symbols (the test is not vacuous).
    assert_ne!(
        gcks.block(0).unwrap().repair_symbol(300).unwrap(),
        gcks.block(0).unwrap().repair_symbol(301).unwrap()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Larger objects: random loss per block, replaced by as many repair symbols plus 3, all
    /// shuffled with duplicates. With K + 3 symbols a block fails about once in 10^8, far below
    /// anything 48 cases could hit, so every block must decode from what was sent.
    #[test]
    fn shuffled_mixes_with_duplicates_decode(
        k in 11u32..400,
        max_block in 10u32..300,
        loss_per_mille in 0u32..500,
        seed in any::<u64>(),
        order in any::<u64>(),
    ) {
        let t = 16u16;
        let info = ObjectInfo::new(k, t, max_block).unwrap();
        let data = object_bytes(k as usize * 16, seed);
        let encoder = ObjectEncoder::new(info, data.clone()).unwrap();
        let partition = *encoder.partition();
        let mut sent: Vec<(u8, u32, bool)> = Vec::new();
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut losses = 0;
        for sbn in 0..partition.block_count() as u8 {
            let len = partition.block_len(sbn).unwrap();
            let mut lost = 0;
            for esi in 0..len {
                if next() % 1000 < u64::from(loss_per_mille) {
                    lost += 1;
                } else {
                    sent.push((sbn, esi, false));
                }
            }
            losses += lost;
            let first = len + (next() % 1000) as u32;
            for esi in first..first + lost + 3 {
                sent.push((sbn, esi, false));
            }
        }
        // Duplicates of every seventh symbol, then a shuffle seeded by `order`.
        let duplicates: Vec<_> = sent.iter().step_by(7).map(|&(s, e, _)| (s, e, true)).collect();
        sent.extend(duplicates);
        let mut shuffle = order | 1;
        for i in (1..sent.len()).rev() {
            shuffle ^= shuffle << 13;
            shuffle ^= shuffle >> 7;
            shuffle ^= shuffle << 17;
            sent.swap(i, (shuffle % (i as u64 + 1)) as usize);
        }
        let mut decoder = ObjectDecoder::new(info, Limits::default()).unwrap();
        let mut decoded_blocks = 0;
        for &(sbn, esi, _) in &sent {
            let len = partition.block_len(sbn).unwrap();
            let symbol = if esi < len {
                encoder.source_symbol(sbn, esi).unwrap().to_vec()
            } else {
                encoder.block(sbn).unwrap().repair_symbol(esi).unwrap()
            };
            match decoder.push(sbn, esi, &symbol).unwrap() {
                Progress::Decoded => decoded_blocks += 1,
                Progress::Pending { needed } => prop_assert!(needed >= 1),
                Progress::Duplicate | Progress::AlreadyDecoded => {}
            }
            if esi < len {
                prop_assert_eq!(decoder.source_symbol(sbn, esi), Some(&symbol[..]));
            }
        }
        prop_assert_eq!(decoded_blocks, partition.block_count());
        prop_assert!(decoder.is_complete());
        prop_assert_eq!(decoder.object(), Some(data));
        prop_assert!(losses <= k);
    }
}
