//! `lkh`: batch rekeying of a large key tree. For N = 2^20 members (d = 4): building the tree
//! from scratch, batches with 1% churn (half joins, half leaves) and pure-leave batches of 1,
//! 64 and 1024, each timed next to its floor, and the resident bytes per member. The floor of
//! a batch is as many raw AES-256-GCM key wraps as the batch made encryptions (key setup and
//! sealing 32 bytes with 30 bytes of associated data under a fresh key, which every wrap
//! needs), timed right after the batch on the same core, so both see the same machine. The measured wrap counts stand beside the expected counts of
//! the marking algorithm (Li, Yang, Gouda, Lam 2001).
//!
//! The two key wrap algorithms of the Rekey SA are then measured side by side: AES-256-GCM and
//! the RFC 5649 key wrap with padding (with its context tag), one [`Wrap`] sealed and opened
//! at a time through the library's own code, and a 1% churn batch of a smaller tree built
//! under each (the same members, the same leaves).

use std::hint::black_box;
use std::time::Instant;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use rand::seq::index::sample;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::gsa::{RekeySa, WrapAlgorithm};
use rekeycast::lkh::{Degree, Key, KeyTree, MemberId, RekeyContext, Wrap};
use serde_json::json;

/// Runs the benchmark and prints its table and JSON line.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let log_n = if quick { 14 } else { 20 };
    let n: u64 = 1 << log_n;
    let degree = 4u8;
    let mut rng = ChaCha8Rng::seed_from_u64(0x1CEB00DA);

    let mut floor = Floor::new();
    println!("lkh: N = 2^{log_n} = {n} members, d = {degree}");

    // Build from scratch: one batch of N joins into an empty tree.
    let rss_before = resident_bytes()?;
    let mut tree = KeyTree::new(RekeySa {
        group_id: 1,
        spi: 1,
        wrap_algorithm: WrapAlgorithm::Aes256Gcm,
        degree: Degree::new(degree)?,
        gcks_public_key: SigningKey::from_bytes(&[9; 32]).verifying_key(),
        data_sa_lifetime_secs: 3600,
    })?;
    let all: Vec<MemberId> = (0..n).map(MemberId).collect();
    let start = Instant::now();
    let batch = tree.apply_batch(&all, &[])?;
    let build = start.elapsed();
    let build_encryptions = batch.encryptions();
    drop(batch);
    // The bench's own list of current members (to draw who leaves), kept outside the RSS
    // measurement below.
    let mut members = all;
    let build_floor_ms = floor.time_ns(build_encryptions) / 1e6;
    let floor_ns = build_floor_ms * 1e6 / build_encryptions as f64;
    let rss_after = resident_bytes()?.saturating_sub((members.capacity() * 8) as u64);
    let rss_per_member = rss_after.saturating_sub(rss_before) as f64 / n as f64;
    let heap_per_member = tree.heap_bytes() as f64 / n as f64;
    println!(
        "build: {:.1} ms for {} encryptions (floor {:.1} ms, ratio {:.2})",
        build.as_secs_f64() * 1e3,
        build_encryptions,
        build_floor_ms,
        build.as_secs_f64() * 1e3 / build_floor_ms
    );
    println!(
        "memory: {rss_per_member:.1} resident bytes per member (RSS delta), {heap_per_member:.1} \
         heap bytes per member (array capacities and hash table)"
    );

    let mut next_id = n;
    let mut rows = Vec::new();
    println!(
        "{:<12} {:>6} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "batch",
        "J",
        "L",
        "runs",
        "wraps",
        "formula",
        "p50 ms",
        "p99 ms",
        "max ms",
        "floor ms",
        "ratio"
    );
    // 1% churn, half joins and half leaves: J = L = 5243 for N = 2^20 (as in ALGORITHMS.md).
    let churn = (n as f64 * 0.01 / 2.0).round() as usize;
    let configs: [(&str, usize, usize, usize); 4] = if quick {
        [
            ("churn 1%", churn, churn, 10),
            ("leave 1", 0, 1, 50),
            ("leave 64", 0, 64, 20),
            ("leave 1024", 0, 1024, 5),
        ]
    } else {
        [
            ("churn 1%", churn, churn, 20),
            ("leave 1", 0, 1, 200),
            ("leave 64", 0, 64, 50),
            ("leave 1024", 0, 1024, 20),
        ]
    };
    for (name, joins, leaves, runs) in configs {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut ratios = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3)?;
        let mut wraps_total = 0usize;
        let mut floor_total = 0f64;
        for _ in 0..runs {
            let mut picked = sample(&mut rng, members.len(), leaves).into_vec();
            picked.sort_unstable_by(|a, b| b.cmp(a));
            let leaving: Vec<MemberId> = picked.iter().map(|&i| members[i]).collect();
            for i in picked {
                members.swap_remove(i);
            }
            let joining: Vec<MemberId> = (next_id..next_id + joins as u64).map(MemberId).collect();
            next_id += joins as u64;
            members.extend_from_slice(&joining);
            let start = Instant::now();
            let batch = tree.apply_batch(&joining, &leaving)?;
            let elapsed = start.elapsed();
            let floor_time = floor.time_ns(batch.encryptions());
            histogram.record(elapsed.as_micros().max(1) as u64)?;
            ratios.record((elapsed.as_nanos() as f64 / floor_time * 1000.0) as u64)?;
            wraps_total += batch.wraps.len();
            floor_total += floor_time;
            drop(batch);
            if joins < leaves {
                // Refill (untimed) so that every batch starts from a full tree, as the formula
                // assumes.
                let refill: Vec<MemberId> = (next_id..next_id + (leaves - joins) as u64)
                    .map(MemberId)
                    .collect();
                next_id += refill.len() as u64;
                tree.apply_batch(&refill, &[])?;
                members.extend_from_slice(&refill);
            }
        }
        let wraps_mean = wraps_total as f64 / runs as f64;
        let formula = expected_wraps(n, leaves as u64, u64::from(degree), joins == leaves);
        let floor_ms = floor_total / runs as f64 / 1e6;
        let p50 = histogram.value_at_quantile(0.5) as f64 / 1e3;
        let p90 = histogram.value_at_quantile(0.9) as f64 / 1e3;
        let p99 = histogram.value_at_quantile(0.99) as f64 / 1e3;
        let max = histogram.max() as f64 / 1e3;
        let ratio = ratios.value_at_quantile(0.5) as f64 / 1000.0;
        println!(
            "{name:<12} {joins:>6} {leaves:>6} {runs:>7} {wraps_mean:>9.1} {formula:>9.1} \
             {p50:>9.3} {p99:>9.3} {max:>9.3} {floor_ms:>9.3} {ratio:>7.2}"
        );
        rows.push(json!({
            "batch": name, "joins": joins, "leaves": leaves, "runs": runs,
            "wraps_mean": wraps_mean, "wraps_formula": formula,
            "batch_ms_p50": p50, "batch_ms_p90": p90, "batch_ms_p99": p99, "batch_ms_max": max,
            "floor_ms": floor_ms, "ratio_to_floor": ratio,
        }));
    }
    // The GCKS builds each batch on a fork of the committed tree (a batch is a transaction):
    // the copy's cost, beside the batch it precedes (measured above in this run).
    let mut forks = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..if quick { 5 } else { 20 } {
        let start = Instant::now();
        let fork = tree.fork();
        let elapsed = start.elapsed();
        drop(fork);
        forks.record(elapsed.as_micros().max(1) as u64)?;
    }
    let fork_p50 = forks.value_at_quantile(0.5) as f64 / 1e3;
    let fork_max = forks.max() as f64 / 1e3;
    // The GCKS forks into the previous committed tree, reusing its allocations.
    let mut reuses = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut spare = tree.fork();
    for _ in 0..if quick { 5 } else { 20 } {
        let start = Instant::now();
        tree.fork_into(&mut spare);
        reuses.record(start.elapsed().as_micros().max(1) as u64)?;
    }
    drop(spare);
    let reuse_p50 = reuses.value_at_quantile(0.5) as f64 / 1e3;
    let reuse_max = reuses.max() as f64 / 1e3;
    let churn_p50 = rows[0]["batch_ms_p50"].as_f64().unwrap_or(f64::NAN);
    println!(
        "fork (copy of the tree a batch is built on): p50 {fork_p50:.3} ms, max {fork_max:.3} ms; \
         {:.2} x the churn 1% batch's p50",
        fork_p50 / churn_p50
    );
    println!(
        "fork into the previous tree (reused allocations): p50 {reuse_p50:.3} ms, max \
         {reuse_max:.3} ms; {:.2} x the churn 1% batch's p50",
        reuse_p50 / churn_p50
    );
    println!(
        "(ratio: median over runs of batch time / (encryptions x floor); goal <= 2, and < 1 s)"
    );
    println!(
        "floor: one raw AES-256-GCM key wrap (fresh key) = {floor_ns:.1} ns (during the build)"
    );
    let wraps = compare_wraps(quick)?;
    println!(
        "{}",
        json!({
            "wrap_algorithms": wraps,
            "bench": "lkh",
            "members": n,
            "degree": degree,
            "floor_wrap_ns": floor_ns,
            "build_ms": build.as_secs_f64() * 1e3,
            "build_encryptions": build_encryptions,
            "build_ratio_to_floor": build.as_secs_f64() * 1e3 / build_floor_ms,
            "resident_bytes_per_member": rss_per_member,
            "heap_bytes_per_member": heap_per_member,
            "batches": rows,
            "fork_ms_p50": fork_p50,
            "fork_ms_max": fork_max,
            "fork_ratio_to_churn_batch_p50": fork_p50 / churn_p50,
            "fork_into_ms_p50": reuse_p50,
            "fork_into_ms_max": reuse_max,
            "fork_into_ratio_to_churn_batch_p50": reuse_p50 / churn_p50,
        })
    );
    Ok(())
}

/// Seal and open times of one wrap, and a churn batch, under each wrap algorithm; prints a
/// table and returns its rows.
fn compare_wraps(quick: bool) -> anyhow::Result<serde_json::Value> {
    let samples = if quick { 200 } else { 2000 };
    let per_sample = 100u32;
    let log_n = if quick { 12 } else { 16 };
    let n: u64 = 1 << log_n;
    let churn = (n as f64 * 0.01 / 2.0).round() as u64;
    let runs = if quick { 5 } else { 20 };
    println!(
        "wrap algorithms: one wrap (seal, open; ns, p50 of {samples} samples of {per_sample}), \
         and a 1% churn batch at N = 2^{log_n} ({runs} runs)"
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9}",
        "algorithm", "seal p50", "seal p99", "open p50", "open p99", "batch p50", "vs GCM"
    );
    let mut rows = Vec::new();
    let mut gcm_batch = f64::NAN;
    for (name, algorithm) in [
        ("aes-256-gcm", WrapAlgorithm::Aes256Gcm),
        ("rfc5649-kwp", WrapAlgorithm::Aes256Kwp),
    ] {
        let ctx = RekeyContext {
            algorithm,
            group_id: 1,
            seq: 42,
        };
        let mut seals = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
        let mut opens = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut bytes = [0u8; 32];
        for _ in 0..samples {
            rng.fill_bytes(&mut bytes);
            let key = Key::from_bytes(bytes);
            rng.fill_bytes(&mut bytes);
            let under = Key::from_bytes(bytes);
            let start = Instant::now();
            let mut wrap = None;
            for version in 0..per_sample {
                wrap = Some(black_box(Wrap::seal(&ctx, 1, version, 5, 0, &key, &under)));
            }
            seals.record((start.elapsed().as_nanos() as u64 / u64::from(per_sample)).max(1))?;
            let wrap = wrap.ok_or_else(|| anyhow::anyhow!("no wrap sealed"))?;
            let start = Instant::now();
            for _ in 0..per_sample {
                black_box(wrap.open(&ctx, &under))?;
            }
            opens.record((start.elapsed().as_nanos() as u64 / u64::from(per_sample)).max(1))?;
        }
        // The same churn on a tree under each algorithm: same seed, same members.
        let mut tree = KeyTree::with_rng(
            RekeySa {
                group_id: 1,
                spi: 1,
                wrap_algorithm: algorithm,
                degree: Degree::DEFAULT,
                gcks_public_key: SigningKey::from_bytes(&[9; 32]).verifying_key(),
                data_sa_lifetime_secs: 3600,
            },
            rekeycast::lkh::KeyRng::seeded_for_simulation(3),
        );
        let all: Vec<MemberId> = (0..n).map(MemberId).collect();
        tree.apply_batch(&all, &[])?;
        let mut batches = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut pick = ChaCha8Rng::seed_from_u64(5);
        let mut members = all;
        let mut next_id = n;
        for _ in 0..runs {
            let mut picked = sample(&mut pick, members.len(), churn as usize).into_vec();
            picked.sort_unstable_by(|a, b| b.cmp(a));
            let leaving: Vec<MemberId> = picked.iter().map(|&i| members.swap_remove(i)).collect();
            let joining: Vec<MemberId> = (next_id..next_id + churn).map(MemberId).collect();
            next_id += churn;
            members.extend_from_slice(&joining);
            let start = Instant::now();
            let batch = tree.apply_batch(&joining, &leaving)?;
            batches.record(start.elapsed().as_micros().max(1) as u64)?;
            drop(batch);
        }
        let batch_p50 = batches.value_at_quantile(0.5) as f64 / 1e3;
        if algorithm == WrapAlgorithm::Aes256Gcm {
            gcm_batch = batch_p50;
        }
        let row = json!({
            "algorithm": name,
            "wrap_id": algorithm.id(),
            "seal_ns_p50": seals.value_at_quantile(0.5),
            "seal_ns_p99": seals.value_at_quantile(0.99),
            "open_ns_p50": opens.value_at_quantile(0.5),
            "open_ns_p99": opens.value_at_quantile(0.99),
            "churn_batch_members": n,
            "churn_batch_ms_p50": batch_p50,
            "churn_batch_ratio_to_gcm": batch_p50 / gcm_batch,
        });
        println!(
            "{name:<12} {:>9} {:>9} {:>9} {:>9} {:>11.3} {:>9.2}",
            seals.value_at_quantile(0.5),
            seals.value_at_quantile(0.99),
            opens.value_at_quantile(0.5),
            opens.value_at_quantile(0.99),
            batch_p50,
            batch_p50 / gcm_batch
        );
        rows.push(row);
    }
    Ok(serde_json::Value::Array(rows))
}

/// The floor: raw AES-256-GCM wraps of 32-byte keys, each under another key (key setup
/// included, as every wrap of a batch is under another key), keys from a small pool that stays
/// in cache (so the floor is a lower bound).
struct Floor {
    keys: Vec<[u8; 32]>,
    counter: u64,
}

impl Floor {
    fn new() -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let keys = (0..4096)
            .map(|_| {
                let mut key = [0u8; 32];
                rng.fill_bytes(&mut key);
                key
            })
            .collect();
        Self { keys, counter: 0 }
    }

    /// Nanoseconds `count` raw wraps take.
    fn time_ns(&mut self, count: usize) -> f64 {
        let aad = [0x5Au8; 30];
        let start = Instant::now();
        for i in 0..count {
            let cipher = Aes256Gcm::new((&self.keys[i % self.keys.len()]).into());
            self.counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&self.counter.to_be_bytes());
            let mut buf = self.keys[(i + 1) % self.keys.len()];
            let tag = cipher
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buf)
                .map(|tag| tag[0]);
            let _ = black_box((buf, tag));
        }
        start.elapsed().as_nanos() as f64
    }
}

/// Resident set size of this process, from /proc/self/statm (pages times the page size).
fn resident_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/self/statm"))?
        .parse()?;
    Ok(pages * 4096)
}

/// Expected wraps of the marking algorithm for a full tree (ALGORITHMS.md): `n = d^h`
/// members, `l` random leaves, with `l` joins (`replace`) or none.
fn expected_wraps(n: u64, l: u64, d: u64, replace: bool) -> f64 {
    let p_none = |m: u64| -> f64 {
        if m + l > n {
            return 0.0;
        }
        (0..l)
            .map(|i| (n - m - i) as f64 / (n - i) as f64)
            .product()
    };
    let p_all = |c: u64| -> f64 {
        if c > l {
            return 0.0;
        }
        (0..c).map(|i| (l - i) as f64 / (n - i) as f64).product()
    };
    let mut total = 0.0;
    let mut s = d;
    while s <= n {
        let per_node = if replace {
            1.0 - p_none(s)
        } else {
            1.0 - p_all(s / d) - p_none(s)
        };
        total += (n / s) as f64 * d as f64 * per_node;
        s *= d;
    }
    total
}
