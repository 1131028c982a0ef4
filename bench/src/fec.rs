//! `fec`: what the RaptorQ wrapper costs, next to raw `raptorq` calls in the same run.
//!
//! 1. Block encode (intermediate symbols from a cached plan plus ceil(K/10) repair symbols) and
//!    block decode (ceil(K/10) source symbols lost, as many repair symbols in their place) for
//!    K in {10, 64, 256, 1024}, T = 1,200 B: [`ObjectEncoder`] / [`BlockDecoder`] against
//!    `SourceBlockEncoder::with_encoding_plan` / `SourceBlockDecoder::decode`, alternating
//!    iteration by iteration; the ratio is ours over raw at p50.
//! 2. One more repair symbol on demand from a built (cached) block: [`ObjectEncoder`]'s path
//!    against `SourceBlockEncoder::repair_packets(_, 1)`.
//! 3. Decode failure probability with K + h symbols, h in {0, 1, 2}, K in {10, 50, 200}: each
//!    trial loses a uniformly random number (1..=K) of source symbols at random positions and
//!    receives consecutive repair symbols from a random ESI in their place, then one and two
//!    more. Decodability depends on the ESIs only, so a small T is used to keep trials cheap.
//! 4. A whole object of 4,096 chunks split with B in {64, 256, 1024}: time to build every
//!    block's encoder (what the GCKS spends before it can answer the first NACK of every block).

use std::hint::black_box;
use std::time::Instant;

use hdrhistogram::Histogram;
use raptorq::{
    EncodingPacket, ObjectTransmissionInformation, PayloadId, SourceBlockDecoder,
    SourceBlockEncoder, SourceBlockEncodingPlan,
};
use rekeycast_fec::{BlockDecoder, EncodingPlans, Limits, ObjectEncoder, ObjectInfo, Progress};
use serde_json::{json, Value};

const SYMBOL_SIZE: u16 = 1200;

/// Runs the benchmark and prints its tables and JSON line.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let throughput = throughput(quick)?;
    let on_demand = on_demand(quick)?;
    let failure = failure_probability(quick)?;
    let object = object_blocks(quick)?;
    println!(
        "{}",
        json!({
            "bench": "fec",
            "quick": quick,
            "symbol_size": SYMBOL_SIZE,
            "throughput": throughput,
            "repair_on_demand": on_demand,
            "decode_failure": failure,
            "object_4096": object,
        })
    );
    Ok(())
}

/// A small deterministic generator (SplitMix64), so runs reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new(3)?)
}

fn raw_config(block_len: u32, symbol_size: u16) -> ObjectTransmissionInformation {
    ObjectTransmissionInformation::new(
        u64::from(block_len) * u64::from(symbol_size),
        symbol_size,
        1,
        1,
        1,
    )
}

/// The received symbols of one block: K - lost source symbols and `lost` repair symbols, with
/// the repair start moved until the set decodes from exactly K (so both sides do one solve).
fn received_set(
    k: u32,
    data: &[u8],
    encoder: &ObjectEncoder,
    rng: &mut Rng,
) -> anyhow::Result<Vec<(u32, Vec<u8>)>> {
    let t = usize::from(SYMBOL_SIZE);
    let lost_count = k.div_ceil(10);
    let mut lost = Vec::new();
    while lost.len() < lost_count as usize {
        let esi = rng.below(u64::from(k)) as u32;
        if !lost.contains(&esi) {
            lost.push(esi);
        }
    }
    for start in (k..k + 1000 * lost_count).step_by(lost_count as usize) {
        let mut set: Vec<(u32, Vec<u8>)> = (0..k)
            .filter(|esi| !lost.contains(esi))
            .map(|esi| (esi, data[esi as usize * t..(esi as usize + 1) * t].to_vec()))
            .collect();
        for (i, symbol) in encoder.repair_symbols(0, start, lost_count)?.enumerate() {
            set.push((start + i as u32, symbol));
        }
        let mut probe = BlockDecoder::new(0, k, SYMBOL_SIZE, &Limits::default())?;
        let mut last = Progress::Duplicate;
        for (esi, symbol) in &set {
            last = probe.push(*esi, symbol)?;
        }
        if last == Progress::Decoded {
            anyhow::ensure!(probe.block() == Some(data), "decoded block differs");
            return Ok(set);
        }
    }
    anyhow::bail!("no decodable set of {k} symbols found")
}

fn throughput(quick: bool) -> anyhow::Result<Vec<Value>> {
    println!("fec: block encode/decode, T = {SYMBOL_SIZE} B, ours next to raw raptorq, p50 (p99)");
    println!(
        "{:>5} {:>6} | {:>11} {:>11} {:>8} {:>7} | {:>11} {:>11} {:>8} {:>7}",
        "K",
        "iters",
        "enc ours us",
        "enc raw us",
        "MB/s",
        "ratio",
        "dec ours us",
        "dec raw us",
        "MB/s",
        "ratio"
    );
    let mut rows = Vec::new();
    let limits = Limits {
        max_block_symbols: 1024,
        ..Limits::default()
    };
    for (k, iterations) in [(10u32, 4000u32), (64, 1500), (256, 400), (1024, 100)] {
        let iterations = if quick {
            (iterations / 10).max(10)
        } else {
            iterations
        };
        let mut rng = Rng(u64::from(k));
        let t = usize::from(SYMBOL_SIZE);
        let mut data = rng.bytes(k as usize * t);
        let info = ObjectInfo::new(k, SYMBOL_SIZE, k)?;
        let plans = EncodingPlans::new(4);
        plans.prepare(k)?;
        let plan = SourceBlockEncodingPlan::generate(u16::try_from(k)?);
        let config = raw_config(k, SYMBOL_SIZE);
        let repair = k.div_ceil(10);

        let reference = ObjectEncoder::with_plans(info, data.clone(), plans.clone())?;
        let received = received_set(k, &data, &reference, &mut rng)?;
        // Both sides must produce the same repair symbols: the comparison is like for like.
        let raw = SourceBlockEncoder::with_encoding_plan(0, &config, &data, &plan);
        let ours: Vec<Vec<u8>> = reference.repair_symbols(0, k, repair)?.collect();
        let theirs: Vec<Vec<u8>> = raw
            .repair_packets(0, repair)
            .into_iter()
            .map(|p| p.split().1)
            .collect();
        anyhow::ensure!(ours == theirs, "repair symbols differ from raw raptorq");
        drop(reference);

        let (mut enc_ours, mut enc_raw) = (histogram()?, histogram()?);
        let (mut dec_ours, mut dec_raw) = (histogram()?, histogram()?);
        for i in 0..iterations {
            // Alternate which side goes first, so neither always runs on a cache the other
            // warmed or cooled.
            let order = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for ours_first in order {
                if ours_first {
                    let start = Instant::now();
                    let encoder = ObjectEncoder::with_plans(info, data, plans.clone())?;
                    let symbols: Vec<Vec<u8>> = encoder.repair_symbols(0, k, repair)?.collect();
                    black_box(&symbols);
                    data = encoder.into_data();
                    enc_ours.record(start.elapsed().as_nanos() as u64)?;
                } else {
                    let start = Instant::now();
                    let encoder = SourceBlockEncoder::with_encoding_plan(0, &config, &data, &plan);
                    black_box(encoder.repair_packets(0, repair));
                    enc_raw.record(start.elapsed().as_nanos() as u64)?;
                }
            }
            for ours_first in order {
                if ours_first {
                    let start = Instant::now();
                    let mut decoder = BlockDecoder::new(0, k, SYMBOL_SIZE, &limits)?;
                    let mut progress = Progress::Duplicate;
                    for (esi, symbol) in &received {
                        progress = decoder.push(*esi, symbol)?;
                    }
                    let block = decoder.into_block();
                    dec_ours.record(start.elapsed().as_nanos() as u64)?;
                    anyhow::ensure!(
                        progress == Progress::Decoded && block.is_some(),
                        "ours failed"
                    );
                } else {
                    let start = Instant::now();
                    let mut decoder = SourceBlockDecoder::new(0, &config, u64::from(k) * t as u64);
                    let block = decoder.decode(received.iter().map(|(esi, symbol)| {
                        EncodingPacket::new(PayloadId::new(0, *esi), symbol.clone())
                    }));
                    dec_raw.record(start.elapsed().as_nanos() as u64)?;
                    anyhow::ensure!(block.is_some(), "raw raptorq failed");
                }
            }
        }
        let bytes = f64::from(k) * f64::from(SYMBOL_SIZE);
        let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
        let mbps = |h: &Histogram<u64>| bytes / us(h, 0.5);
        let enc_ratio = us(&enc_ours, 0.5) / us(&enc_raw, 0.5);
        let dec_ratio = us(&dec_ours, 0.5) / us(&dec_raw, 0.5);
        println!(
            "{:>5} {:>6} | {:>11} {:>11} {:>8.0} {:>7.3} | {:>11} {:>11} {:>8.0} {:>7.3}",
            k,
            iterations,
            format!("{:.1} ({:.0})", us(&enc_ours, 0.5), us(&enc_ours, 0.99)),
            format!("{:.1} ({:.0})", us(&enc_raw, 0.5), us(&enc_raw, 0.99)),
            mbps(&enc_ours),
            enc_ratio,
            format!("{:.1} ({:.0})", us(&dec_ours, 0.5), us(&dec_ours, 0.99)),
            format!("{:.1} ({:.0})", us(&dec_raw, 0.5), us(&dec_raw, 0.99)),
            mbps(&dec_ours),
            dec_ratio,
        );
        let dist = |h: &Histogram<u64>| {
            json!({
                "p50_us": us(h, 0.5), "p90_us": us(h, 0.9), "p99_us": us(h, 0.99),
                "max_us": h.max() as f64 / 1e3,
            })
        };
        rows.push(json!({
            "k": k, "iterations": iterations, "repair_symbols": repair,
            "lost_source_symbols": k.div_ceil(10),
            "encode_ours": dist(&enc_ours), "encode_raw": dist(&enc_raw),
            "encode_ours_mb_per_s": mbps(&enc_ours), "encode_raw_mb_per_s": mbps(&enc_raw),
            "encode_ratio": enc_ratio,
            "decode_ours": dist(&dec_ours), "decode_raw": dist(&dec_raw),
            "decode_ours_mb_per_s": mbps(&dec_ours), "decode_raw_mb_per_s": mbps(&dec_raw),
            "decode_ratio": dec_ratio,
        }));
    }
    println!("  (MB/s: K * T over the p50 time of ours; ratio: ours p50 / raw p50)");
    Ok(rows)
}

fn on_demand(quick: bool) -> anyhow::Result<Vec<Value>> {
    const BATCH: u32 = 16;
    let batches: u32 = if quick { 300 } else { 3000 };
    println!();
    println!(
        "fec: one more repair symbol from a cached block, ns per symbol over batches of {BATCH}"
    );
    println!(
        "{:>5} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>7}",
        "K", "ours p50", "p90", "p99", "max", "raw p50", "p90", "p99", "max", "ratio"
    );
    let mut rows = Vec::new();
    for k in [10u32, 64, 256, 1024] {
        let mut rng = Rng(1000 + u64::from(k));
        let data = rng.bytes(k as usize * usize::from(SYMBOL_SIZE));
        let info = ObjectInfo::new(k, SYMBOL_SIZE, k)?;
        let encoder = ObjectEncoder::new(info, data.clone())?;
        encoder.block(0)?;
        let plan = SourceBlockEncodingPlan::generate(u16::try_from(k)?);
        let raw =
            SourceBlockEncoder::with_encoding_plan(0, &raw_config(k, SYMBOL_SIZE), &data, &plan);
        let (mut ours, mut theirs) = (histogram()?, histogram()?);
        let mut esi = k;
        for batch in 0..batches {
            // Alternate which side goes first, as in the throughput table.
            for ours_turn in [batch % 2 == 0, batch % 2 != 0] {
                let start = Instant::now();
                if ours_turn {
                    for i in 0..BATCH {
                        black_box(encoder.repair_symbols(0, esi + i, 1)?.next());
                    }
                    ours.record(start.elapsed().as_nanos() as u64 / u64::from(BATCH))?;
                } else {
                    for i in 0..BATCH {
                        black_box(raw.repair_packets(esi + i - k, 1));
                    }
                    theirs.record(start.elapsed().as_nanos() as u64 / u64::from(BATCH))?;
                }
            }
            esi += BATCH;
        }
        let ratio = ours.value_at_quantile(0.5) as f64 / theirs.value_at_quantile(0.5) as f64;
        let q = |h: &Histogram<u64>| {
            [
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.max(),
            ]
        };
        let (o, r) = (q(&ours), q(&theirs));
        println!(
            "{:>5} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>7.3}",
            k, o[0], o[1], o[2], o[3], r[0], r[1], r[2], r[3], ratio
        );
        rows.push(json!({
            "k": k, "samples": batches, "batch": BATCH,
            "ours_ns": {"p50": o[0], "p90": o[1], "p99": o[2], "max": o[3]},
            "raw_ns": {"p50": r[0], "p90": r[1], "p99": r[2], "max": r[3]},
            "ratio": ratio,
        }));
    }
    println!("  (goal: under 5 us for K <= 256)");
    Ok(rows)
}

fn failure_probability(quick: bool) -> anyhow::Result<Vec<Value>> {
    const T: u16 = 8;
    println!();
    println!(
        "fec: decode failure with K + h symbols (random losses replaced by repair){}",
        if quick {
            " -- QUICK: reduced trial counts"
        } else {
            ""
        }
    );
    println!(
        "{:>5} {:>8} | {:>16} {:>16} {:>16} | {:>9}",
        "K", "trials", "h=0 fail (rate)", "h=1 fail (rate)", "h=2 fail (rate)", "max extra"
    );
    let mut rows = Vec::new();
    for (k, full_trials) in [(10u32, 1_000_000u32), (50, 200_000), (200, 50_000)] {
        let trials = if quick { 2_000 } else { full_trials };
        let mut rng = Rng(0xFEC0 + u64::from(k));
        let data = rng.bytes(k as usize * usize::from(T));
        let info = ObjectInfo::new(k, T, k)?;
        let encoder = ObjectEncoder::new(info, data.clone())?;
        let block = encoder.block(0)?;
        let mut failures = [0u64; 3];
        let mut max_extra = 0u32;
        let start = Instant::now();
        let mut source_order: Vec<u32> = (0..k).collect();
        for _ in 0..trials {
            let lost = 1 + rng.below(u64::from(k)) as u32;
            // A partial Fisher-Yates shuffle picks which source symbols are lost.
            for i in 0..lost as usize {
                let j = i + rng.below(u64::from(k) - i as u64) as usize;
                source_order.swap(i, j);
            }
            let mut decoder = BlockDecoder::new(0, k, T, &Limits::default())?;
            for &esi in &source_order[lost as usize..] {
                let _ = decoder.push(esi, encoder.source_symbol(0, esi)?)?;
            }
            let first = k + rng.below(1 << 20) as u32;
            let mut pushed = 0u32;
            let mut esi = first;
            // lost repair symbols bring the count to K; then h = 1, 2, ... more.
            while !decoder.is_decoded() {
                let _ = decoder.push(esi, &block.repair_symbol(esi)?)?;
                esi += 1;
                pushed += 1;
                anyhow::ensure!(pushed <= lost + 20, "no decode with K + 20 symbols");
            }
            anyhow::ensure!(decoder.block() == Some(&data[..]), "decoded wrong bytes");
            let extra = pushed - lost;
            max_extra = max_extra.max(extra);
            for (h, failed) in failures.iter_mut().enumerate() {
                if extra > h as u32 {
                    *failed += 1;
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = |f: u64| f as f64 / f64::from(trials);
        let cell = |f: u64| format!("{f} ({:.1e})", rate(f));
        println!(
            "{:>5} {:>8} | {:>16} {:>16} {:>16} | {:>9}",
            k,
            trials,
            cell(failures[0]),
            cell(failures[1]),
            cell(failures[2]),
            max_extra
        );
        rows.push(json!({
            "k": k, "trials": trials, "quick": quick,
            "failures_h0": failures[0], "failures_h1": failures[1], "failures_h2": failures[2],
            "rate_h0": rate(failures[0]), "rate_h1": rate(failures[1]),
            "rate_h2": rate(failures[2]),
            "rule_of_three_bound": 3.0 / f64::from(trials),
            "max_extra_needed": max_extra, "seconds": secs,
        }));
    }
    println!("  (RFC 6330 figures: about 1e-2, 1e-4, 1e-6; a count of 0 bounds the rate below");
    println!("   3/trials at 95% confidence)");
    Ok(rows)
}

fn object_blocks(quick: bool) -> anyhow::Result<Vec<Value>> {
    let k_total = 4096u32;
    let runs = if quick { 2 } else { 5 };
    println!();
    println!("fec: object of {k_total} chunks, T = {SYMBOL_SIZE} B: build every block's encoder");
    println!(
        "{:>5} {:>7} {:>12} {:>14} {:>16}",
        "B", "blocks", "total ms p50", "us per symbol", "member download"
    );
    let mut rows = Vec::new();
    let mut rng = Rng(4096);
    let data = rng.bytes(k_total as usize * usize::from(SYMBOL_SIZE));
    for b in [64u32, 256, 1024] {
        let info = ObjectInfo::new(k_total, SYMBOL_SIZE, b)?;
        let plans = EncodingPlans::new(4);
        let partition = info.partition();
        for sbn in 0..partition.block_count() {
            plans.prepare(partition.block_len(sbn as u8)?)?;
        }
        let mut times = histogram()?;
        let mut buffer = data.clone();
        for _ in 0..runs {
            let start = Instant::now();
            let encoder = ObjectEncoder::with_plans(info, buffer, plans.clone())?;
            for sbn in 0..partition.block_count() {
                encoder.block(sbn as u8)?;
            }
            times.record(start.elapsed().as_nanos() as u64)?;
            buffer = encoder.into_data();
        }
        let ms = times.value_at_quantile(0.5) as f64 / 1e6;
        println!(
            "{:>5} {:>7} {:>12.2} {:>14.2} {:>16}",
            b,
            partition.block_count(),
            ms,
            ms * 1e3 / f64::from(k_total),
            format!("{} symbols", partition.max_block_len())
        );
        rows.push(json!({
            "max_block": b, "blocks": partition.block_count(), "runs": runs,
            "build_all_ms_p50": ms, "max_block_len": partition.max_block_len(),
        }));
    }
    println!("  (member download: what a member whose chunk is lost must receive to decode)");
    Ok(rows)
}
