//! Property tests of the NACK invariants: bounded repair, suppression, and convergence.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rekeycast_nack::loss::Loss;
use rekeycast_nack::sim::{self, ProactiveMode, SimConfig};
use rekeycast_nack::{
    AggregatorConfig, BlockKey, FeedbackMode, IncomingNack, NackScheduler, ObjectId,
    RepairAggregator, SchedulerConfig,
};

fn block(seq: u64, sbn: u8) -> BlockKey {
    BlockKey {
        seq,
        object: ObjectId::Chunks,
        sbn,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the NACKs (any blocks, rounds, needs, times, duplicates), the sender sends at
    /// most the cap per block per round, makes at most one order per block and round, and
    /// never repeats an ESI or sends one below the block's first repair ESI.
    #[test]
    fn sender_never_exceeds_the_cap_per_block_per_round(
        cap in 1u16..40,
        hold_off_ms in 0u64..300,
        nacks in prop::collection::vec((0u64..400, 0u8..3, 0u8..6, 0u16..200), 1..120),
    ) {
        let t0 = Instant::now();
        let mut aggregator = RepairAggregator::new(AggregatorConfig {
            hold_off: Duration::from_millis(hold_off_ms),
            max_repair_per_round: cap,
            repair_rate: 5_000.0,
            bucket_depth: 8,
            advertise: true,
        })
        .unwrap();
        for sbn in 0..3 {
            aggregator.register_block(block(1, sbn), 100);
        }
        let mut sent: BTreeMap<(u8, u8), u32> = BTreeMap::new();
        let mut esis: BTreeSet<(u8, u32)> = BTreeSet::new();
        let mut orders: BTreeSet<(u8, u8)> = BTreeSet::new();
        let mut now = t0;
        let mut step = |aggregator: &mut RepairAggregator, now: Instant| {
            aggregator.handle_timeout(now);
            while let Some(order) = aggregator.poll_order() {
                prop_assert!(orders.insert((order.block.sbn, order.round)), "two orders");
                prop_assert!(order.count <= cap);
            }
            while let Some(ad) = aggregator.poll_advertisement() {
                prop_assert!(ad.count <= cap);
            }
            while let Some(symbol) = aggregator.poll_repair(now) {
                let count = sent.entry((symbol.block.sbn, symbol.round)).or_insert(0);
                *count += 1;
                prop_assert!(*count <= u32::from(cap));
                prop_assert!(symbol.esi >= 100);
                prop_assert!(esis.insert((symbol.block.sbn, symbol.esi)), "ESI resent");
            }
            Ok(())
        };
        for (delay_ms, sbn, round, need) in nacks {
            now += Duration::from_millis(delay_ms);
            step(&mut aggregator, now)?;
            let _ = aggregator.handle_nack(now, &IncomingNack { block: block(1, sbn), round, need });
            step(&mut aggregator, now)?;
        }
        // Drain everything.
        while let Some(at) = aggregator.poll_timeout() {
            now = now.max(at);
            step(&mut aggregator, now)?;
            if aggregator.queued() == 0 && aggregator.poll_timeout().is_none() {
                break;
            }
        }
        prop_assert_eq!(aggregator.queued(), 0);
    }

    /// A receiver that hears (before its timer fires) a NACK or advertisement for the same
    /// block and round asking for at least its own need never sends its NACK; one that hears
    /// only smaller needs does send it (within the backoff window and the one GRTT a receiver
    /// needing more than it heard waits for a raised count).
    #[test]
    fn smaller_need_than_heard_is_suppressed(
        seed in any::<u64>(),
        group_size in 1u32..20_000,
        need in 1u16..100,
        extra in 0u16..100,
        heard_at_fraction in 0.0f64..1.0,
        advertisement in any::<bool>(),
        mode in prop_oneof![Just(FeedbackMode::Unicast), Just(FeedbackMode::Multicast)],
    ) {
        let t0 = Instant::now();
        let grtt = Duration::from_millis(40);
        let config = SchedulerConfig {
            group_size,
            grtt,
            feedback: mode,
            seed,
            ..SchedulerConfig::default()
        };
        let run = |heard_need: u16, window: u32| {
            let mut s = NackScheduler::new(config.clone()).unwrap();
            let key = block(3, 0);
            s.handle_expected_complete(t0, key, 0, need);
            let fire = s.poll_timeout().unwrap();
            // Hear it strictly before the timer fires (or at t0 when it fires at once).
            let heard = t0 + (fire - t0).mul_f64(heard_at_fraction);
            if heard < fire || heard == t0 {
                if advertisement {
                    s.handle_repair_advertisement(heard, key, 1, heard_need);
                } else {
                    s.handle_nack_heard(heard, key, 1, heard_need);
                }
            }
            let mut nacks = Vec::new();
            let end = t0 + grtt * window;
            while let Some(at) = s.poll_timeout().filter(|&at| at <= end) {
                s.handle_timeout(at);
                nacks.extend(std::iter::from_fn(|| s.poll_nack()));
            }
            (nacks, fire)
        };
        // The round's backoff window (4 GRTTs); a receiver needing more than it heard waits
        // one GRTT more for a raised count before it sends.
        let (suppressed, fire) = run(need.saturating_add(extra), 4);
        let heard = t0 + (fire - t0).mul_f64(heard_at_fraction);
        if heard < fire || heard == t0 {
            prop_assert!(suppressed.is_empty(), "NACK sent despite a larger need heard");
        }
        if need > 1 {
            let (sent, _) = run(need - 1 - extra.min(need - 2), 5);
            prop_assert_eq!(sent.len(), 1);
            prop_assert_eq!(sent[0].need, need);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any loss pattern whose per-round loss stays below the repair cap, on data and on
    /// feedback, independent or bursty, in either feedback mode, in the first L attempts
    /// (then lossless), converges: every receiver decodes every block within R = L + 1 NACK
    /// rounds, none goes out of sync (no receiver starves), and the model never stalls.
    #[test]
    fn any_loss_below_the_cap_converges_within_r_rounds(
        seed in any::<u64>(),
        receivers in 1u32..40,
        source_symbols in 1u16..24,
        proactive in 0u16..4,
        cap in 1u16..32,
        loss in 0.0f64..0.8,
        feedback_loss in 0.0f64..0.8,
        bursty in any::<bool>(),
        lossy_attempts in 1u8..4,
        multicast in any::<bool>(),
        backoff_factor in 1u8..9,
    ) {
        let data_loss = if bursty {
            Loss::GilbertElliott { p_gb: loss * 0.2, p_bg: 0.3, loss_good: 0.0, loss_bad: 1.0 }
        } else {
            Loss::Bernoulli { p: loss }
        };
        let config = SimConfig {
            receivers,
            messages: 2,
            blocks_per_message: 2,
            source_symbols,
            proactive: ProactiveMode::Fixed(proactive),
            data_loss,
            feedback_loss: Loss::Bernoulli { p: feedback_loss },
            feedback: if multicast { FeedbackMode::Multicast } else { FeedbackMode::Unicast },
            backoff_factor,
            hold_off_grtt: f64::from(backoff_factor) + 1.0,
            repair_wait_grtt: f64::from(backoff_factor) + 3.0,
            max_rounds: lossy_attempts + 1,
            repair_cap: cap,
            lossy_attempts: Some(lossy_attempts),
            max_losses_per_attempt: Some(cap),
            seed,
            ..SimConfig::default()
        };
        let report = sim::run(&config).unwrap();
        prop_assert_eq!(report.out_of_sync, 0);
        prop_assert_eq!(report.stalled, 0);
        prop_assert_eq!(report.blocks.len(), 4);
        prop_assert!(report.blocks.iter().all(|b| b.completion.is_some()));
        prop_assert!(report.max_receiver_rounds <= lossy_attempts + 1);
    }
}
