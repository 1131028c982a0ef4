//! `auth`: what forged traffic costs a member. Bad-MAC datagrams rejected by the real verifier
//! stage ([`DatagramVerifier::check`]) per second on one core, next to raw BLAKE3 keyed hashing
//! of the same bytes in the same run (the floor: the MAC must hash every byte once). Then the
//! cost of one rekey message under each chunk authentication, and the GCKS's build time with
//! chunks signed on one thread and on two, side by side.

use std::hint::black_box;
use std::time::Instant;

use rekeycast::auth::datagram::DatagramVerifier;
use rekeycast::auth::mac::MacKey;
use rekeycast::wire::{BodyRepr, DatagramRepr, ObjectKind, Packet, SymbolRepr};

/// Runs the benchmark and prints its table and JSON line.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let count: usize = if quick { 200_000 } else { 2_000_000 };
    let rounds = 5;
    println!("auth: bad-MAC rejection, {count} datagrams per measurement, best of {rounds}");
    println!(
        "{:>6} {:>14} {:>14} {:>8}",
        "bytes", "verifier dg/s", "raw blake3/s", "ratio"
    );
    let mut rows = Vec::new();
    for symbol_len in [64usize, 512, 1400] {
        let key = MacKey::from_bytes([1; 32]);
        let forged_key = MacKey::from_bytes([2; 32]);
        let mut verifier = DatagramVerifier::new(1, 1);
        verifier.add_key(5, key.clone());
        // Distinct datagrams so that nothing is cached between iterations: each has another
        // ESI and is sealed with a key the verifier does not hold.
        let data = vec![0xA5u8; symbol_len];
        let datagrams: Vec<Vec<u8>> = (0..1024u32)
            .map(|esi| {
                let repr = DatagramRepr {
                    group_id: 1,
                    spi: 1,
                    seq: 5,
                    body: BodyRepr::Symbol(SymbolRepr {
                        object: ObjectKind::Chunks,
                        sbn: 0,
                        esi,
                        data: &data,
                    }),
                    mac: [0; 16],
                };
                let mut buf = vec![0u8; repr.buffer_len()];
                repr.emit(&mut buf).map(|_| ())?;
                forged_key.seal(&mut Packet::new_checked(&mut buf[..])?);
                Ok(buf)
            })
            .collect::<anyhow::Result<_>>()?;
        let mut best_verifier = 0f64;
        let mut best_raw = 0f64;
        for _ in 0..rounds {
            let start = Instant::now();
            let mut rejected = 0usize;
            for i in 0..count {
                if verifier
                    .check(black_box(&datagrams[i % datagrams.len()]))
                    .is_err()
                {
                    rejected += 1;
                }
            }
            let rate = count as f64 / start.elapsed().as_secs_f64();
            anyhow::ensure!(rejected == count, "a forged datagram was accepted");
            best_verifier = best_verifier.max(rate);

            let start = Instant::now();
            for i in 0..count {
                let bytes = &datagrams[i % datagrams.len()];
                black_box(blake3::keyed_hash(
                    key.as_bytes(),
                    &bytes[..bytes.len() - 16],
                ));
            }
            best_raw = best_raw.max(count as f64 / start.elapsed().as_secs_f64());
        }
        let ratio = best_verifier / best_raw;
        println!(
            "{:>6} {:>14.0} {:>14.0} {:>8.3}",
            datagrams[0].len(),
            best_verifier,
            best_raw,
            ratio
        );
        rows.push(serde_json::json!({
            "datagram_bytes": datagrams[0].len(),
            "verifier_rejects_per_s": best_verifier,
            "raw_blake3_per_s": best_raw,
            "ratio": ratio,
        }));
    }
    let (messages, signing_threads, steps, first_messages) = message_costs(quick)?;
    let chunk_auth_options = chunk_auth_options(quick)?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "auth", "bad_mac_rejection": rows, "messages": messages,
            "signing_threads": signing_threads, "steps": steps,
            "first_messages": first_messages, "chunk_auth_options": chunk_auth_options,
        })
    );
    Ok(())
}

/// The JSON rows of [`message_costs`]' tables: messages, signing threads, steps, first
/// messages.
type MessageTables = (
    Vec<serde_json::Value>,
    Vec<serde_json::Value>,
    Vec<serde_json::Value>,
    Vec<serde_json::Value>,
);

/// For N members at 1% churn (half joins, half leaves), both chunk authentications: the
/// message's bytes and datagrams, the layout's duplication, the GCKS's time to lay out,
/// authenticate and sign it (signing on every available core), and a member's time to verify
/// the manifest and its chunk and apply it. Then, in signature mode, the GCKS's build time
/// with one signing thread and with two, measured alternately in the same run, and their ratio.
/// Returns the rows of both tables.
fn message_costs(quick: bool) -> anyhow::Result<MessageTables> {
    use rekeycast::gsa::{RekeySa, WrapAlgorithm};
    use rekeycast::lkh::{Degree, KeyRng, KeyTree, MemberId, MemberKeys};
    use rekeycast::session::layout::{build_message, MessageParams};
    use rekeycast::session::manifest::ChunkAuth;
    use rekeycast::wire::{datagram::OVERHEAD, symbol::FIXED_LEN, DEFAULT_DATAGRAM_SIZE};

    let sizes: &[u32] = if quick { &[12] } else { &[16, 20] };
    let symbol_size = u16::try_from(DEFAULT_DATAGRAM_SIZE - OVERHEAD - FIXED_LEN)?;
    let signing_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let build_rounds = if quick { 3 } else { 5 };
    println!();
    println!(
        "auth: one rekey message at 1% churn (J = L), symbol size {symbol_size} B, \
         build signs on {cores} threads"
    );
    println!(
        "{:>5} {:>9} {:>7} {:>9} {:>9} {:>6} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "log N",
        "auth",
        "wraps",
        "chunks",
        "MB",
        "dup",
        "manifest",
        "build ms",
        "member us",
        "msgs/s",
        "sig checks"
    );
    let mut out = Vec::new();
    let mut thread_rows = Vec::new();
    let mut steps = Vec::new();
    let mut first_batches = Vec::new();
    for &log_n in sizes {
        let n = 1u64 << log_n;
        let sa = RekeySa {
            group_id: 1,
            spi: 1,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::new(4)?,
            gcks_public_key: signing_key.verifying_key(),
            data_sa_lifetime_secs: 3600,
        };
        let mut tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(log_n.into()));
        let all: Vec<MemberId> = (0..n).map(MemberId).collect();
        let first = tree.apply_batch(&all, &[])?;
        // The group's first message, with the default parameters: the block size follows the
        // chunk count (a fixed 256 failed past 65,280 chunks).
        let start = Instant::now();
        let first_message = build_message(
            &first,
            &tree.leaves_in_order(),
            &signing_key,
            &MessageParams {
                symbol_size,
                ..MessageParams::default()
            },
        )?;
        let first_ms = start.elapsed().as_secs_f64() * 1e3;
        let info = first_message.fec_info;
        first_batches.push(serde_json::json!({
            "log_n": log_n, "chunks": info.source_symbols(), "blocks": info.source_blocks(),
            "max_block_symbols": info.partition().max_block_len(), "build_ms": first_ms,
        }));
        println!(
            "  first message of 2^{log_n} members, default parameters: {} chunks in {} blocks \
             of up to {} symbols, built in {first_ms:.0} ms",
            info.source_symbols(),
            info.source_blocks(),
            info.partition().max_block_len()
        );
        drop((first, first_message));
        let churn = (n / 200).max(1);
        let leaving: Vec<MemberId> = (0..churn).map(|i| MemberId(i * (n / churn))).collect();
        let joining: Vec<MemberId> = (n..n + churn).map(MemberId).collect();
        // One member that stays, and its keys before the batch (a snapshot of the tree's path
        // is not public, so it joins in the previous batch and is carried forward).
        let watcher = MemberId(u64::MAX);
        let batch0 = tree.apply_batch(&[watcher], &[])?;
        let mut watcher_keys = MemberKeys::from_bundle(&tree.join(watcher)?);
        let leaves0 = tree.leaves_in_order();
        let params0 = MessageParams {
            spi: 1,
            symbol_size,
            chunk_auth: ChunkAuth::MerklePath,
            max_block_symbols: 64,
            epoch: 0,
            timestamp_us: 0,
            signing_threads: 0,
        };
        let message0 = build_message(&batch0, &leaves0, &signing_key, &params0)?;
        let index0 = own_chunk_index(&watcher_keys, &tree, &message0, ChunkAuth::MerklePath)?;
        verify_and_apply(&mut watcher_keys, &message0, index0, &signing_key)?;

        let (wraps, chunks, measured) = message_steps(
            &tree,
            &joining,
            &leaving,
            &signing_key,
            &params0,
            build_rounds,
        )?;
        steps.push((log_n, wraps, chunks, measured));
        let batch = tree.apply_batch(&joining, &leaving)?;
        let leaves = tree.leaves_in_order();
        for auth in [ChunkAuth::MerklePath, ChunkAuth::Signature] {
            let params = MessageParams {
                chunk_auth: auth,
                ..params0
            };
            let start = Instant::now();
            let message = build_message(&batch, &leaves, &signing_key, &params)?;
            let build_ms = start.elapsed().as_secs_f64() * 1e3;
            let bytes: usize =
                message.chunks.iter().map(Vec::len).sum::<usize>() + message.manifest.len();
            let datagrams = message.chunks.len() + 1;
            // The member: verify the manifest and its own chunk, apply it (on a copy, so both
            // authentications start from the same keys); best of several runs.
            let index = own_chunk_index(&watcher_keys, &tree, &message, auth)?;
            let mut best_us = f64::MAX;
            let mut checks = 0;
            for _ in 0..20 {
                let mut keys = watcher_keys.clone();
                let start = Instant::now();
                checks = verify_and_apply(&mut keys, &message, index, &signing_key)?;
                best_us = best_us.min(start.elapsed().as_secs_f64() * 1e6);
            }
            let label = match auth {
                ChunkAuth::MerklePath => "merkle",
                ChunkAuth::Signature => "signature",
                ChunkAuth::GroupSignature => "group",
            };
            println!(
                "{:>5} {:>9} {:>7} {:>9} {:>9.2} {:>6.2} {:>10} {:>12.1} {:>12.1} {:>10.0} {:>10}",
                log_n,
                label,
                batch.wraps.len(),
                message.chunks.len(),
                bytes as f64 / 1e6,
                message.layout.duplication(),
                "1 dg",
                build_ms,
                best_us,
                1e6 / best_us,
                checks
            );
            out.push(serde_json::json!({
                "log_n": log_n, "chunk_auth": label, "wraps": batch.wraps.len(),
                "chunks": message.chunks.len(), "message_bytes": bytes, "datagrams": datagrams,
                "manifest_datagrams": 1, "duplication": message.layout.duplication(),
                "gcks_build_ms": build_ms, "member_verify_apply_us": best_us,
                "member_signature_checks": checks,
                "member_verified_messages_per_s": 1e6 / best_us,
            }));
            if auth == ChunkAuth::Signature {
                let [layout, sign, one, two] =
                    signing_thread_costs(&batch, &leaves, &signing_key, &params, build_rounds)?;
                thread_rows.push((log_n, message.chunks.len(), layout, sign, one, two));
            }
        }
    }
    println!();
    println!(
        "auth: GCKS build in signature mode, 1 vs 2 signing threads ({cores} cores), \
         best of {build_rounds}"
    );
    println!(
        "  layout: lay_out alone; sign: every chunk signed on one thread, nothing else; \
         bound: the ratio if the signing halved"
    );
    // Other work on the machine takes cores from the second thread: the load says how much.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok());
    if let Some(load) = load {
        println!("  load average (1 min) at the end: {load:.2}");
    }
    println!(
        "{:>5} {:>9} {:>10} {:>9} {:>12} {:>12} {:>8} {:>8}",
        "log N", "chunks", "layout ms", "sign ms", "1 thread ms", "2 threads ms", "ratio", "bound"
    );
    let mut thread_json = Vec::new();
    for &(log_n, chunks, layout, sign, one, two) in &thread_rows {
        let bound = one / (one - sign / 2.0);
        println!(
            "{:>5} {:>9} {:>10.1} {:>9.1} {:>12.1} {:>12.1} {:>8.2} {:>8.2}",
            log_n,
            chunks,
            layout,
            sign,
            one,
            two,
            one / two,
            bound
        );
        thread_json.push(serde_json::json!({
            "log_n": log_n, "chunks": chunks, "cores": cores, "rounds": build_rounds,
            "layout_ms": layout, "sign_ms_1_thread": sign,
            "gcks_build_ms_1_thread": one, "gcks_build_ms_2_threads": two,
            "ratio_1_to_2_threads": one / two, "ratio_bound_2_threads": bound,
            "load_average_1min": load,
        }));
    }
    let steps_json = print_steps(&steps, cores);
    Ok((out, thread_json, steps_json, first_batches))
}

/// The best times in milliseconds of laying out the message of `batch` alone (the part of the
/// build that is not spread over threads), of signing its chunks alone on one thread (the part
/// that is), and of building it with 1 and with 2 signing threads, all measured alternately so
/// that all see the same machine; checks that the two messages are the same bytes.
fn signing_thread_costs(
    batch: &rekeycast::lkh::RekeyBatch,
    leaves: &[rekeycast::lkh::NodeId],
    signing_key: &ed25519_dalek::SigningKey,
    params: &rekeycast::session::layout::MessageParams,
    rounds: usize,
) -> anyhow::Result<[f64; 4]> {
    use rekeycast::session::chunk::{encode_authenticated, sign};
    use rekeycast::session::layout::{build_message, lay_out, MessageParams};

    let mut best = [f64::MAX; 4];
    let mut messages: [Option<rekeycast::session::layout::BuiltMessage>; 2] = [None, None];
    for _ in 0..rounds {
        let start = Instant::now();
        let layout = lay_out(
            batch,
            leaves,
            usize::from(params.symbol_size),
            params.chunk_auth,
        )?;
        best[0] = best[0].min(start.elapsed().as_secs_f64() * 1e3);
        let authenticated = layout
            .chunks
            .iter()
            .map(|(header, payload)| encode_authenticated(header, payload))
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        for bytes in &authenticated {
            black_box(sign(signing_key, bytes));
        }
        best[1] = best[1].min(start.elapsed().as_secs_f64() * 1e3);
        for (slot, threads) in [1usize, 2].into_iter().enumerate() {
            let params = MessageParams {
                signing_threads: threads,
                ..*params
            };
            let start = Instant::now();
            let message = build_message(batch, leaves, signing_key, &params)?;
            best[slot + 2] = best[slot + 2].min(start.elapsed().as_secs_f64() * 1e3);
            messages[slot] = Some(message);
        }
    }
    if let [Some(one), Some(two)] = &messages {
        anyhow::ensure!(
            one.manifest == two.manifest && one.chunks == two.chunks,
            "signing threads changed the message"
        );
    }
    Ok(best)
}

/// The index of the member's chunk, from the chunk headers (read unverified, as a member
/// reads them off arriving symbols to find its own).
fn own_chunk_index(
    keys: &rekeycast::lkh::MemberKeys,
    tree: &rekeycast::lkh::KeyTree,
    message: &rekeycast::session::layout::BuiltMessage,
    auth: rekeycast::session::manifest::ChunkAuth,
) -> anyhow::Result<usize> {
    use rekeycast::session::chunk::SignedChunk;
    use rekeycast::session::layout::find_chunk;

    let order_key = tree.degree().order_key(keys.leaf());
    let headers: Vec<_> = message
        .chunks
        .iter()
        .map(|bytes| SignedChunk::parse(bytes, auth).map(|c| c.header))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    find_chunk(&headers, order_key).ok_or_else(|| anyhow::anyhow!("no chunk serves the member"))
}

/// Verifies the manifest and the member's chunk and applies it; returns the number of
/// signature checks made.
fn verify_and_apply(
    keys: &mut rekeycast::lkh::MemberKeys,
    message: &rekeycast::session::layout::BuiltMessage,
    index: usize,
    signing_key: &ed25519_dalek::SigningKey,
) -> anyhow::Result<u64> {
    use rekeycast::auth::message::MessageVerifier;
    use rekeycast::session::manifest::SignedManifest;

    let seq = SignedManifest::parse(&message.manifest)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .manifest
        .seq;
    let mut verifier = MessageVerifier::new(signing_key.verifying_key(), 1, 1, 0);
    let manifest = verifier
        .verify_manifest(seq, &message.manifest)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .clone();
    let chunk = verifier
        .verify_chunk(&manifest, &message.chunks[index])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    keys.apply(&chunk).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(verifier.counters().signature_checks)
}

/// The time of each step of one rekey message at 1% churn, and their floors, measured in one
/// run (best of `rounds` each).
#[derive(Debug, Clone, Copy, Default)]
struct Steps {
    /// `apply_batch` with its wraps on one thread.
    apply_one_thread: f64,
    /// `apply_batch` with its wraps on every core (what the GCKS runs).
    apply: f64,
    /// The tree's leaves in order (`leaves_in_order`).
    leaf_order: f64,
    /// `lay_out` in signature mode.
    layout: f64,
    /// `lay_out` in Merkle mode.
    layout_merkle: f64,
    /// `build_message` in signature mode (layout, chunk authentication, manifest).
    build: f64,
    /// The FEC encoders of every block (`PreparedMessage::new` and `build_repair_encoders`).
    fec: f64,
    /// Floor: every wrap of the batch sealed with AES-256-GCM on one thread, nothing else.
    wraps_floor: f64,
    /// Floor: the Ed25519 signatures the default chunk authentication needs (one per group of
    /// chunks), each over a short message, on one thread, nothing else.
    sign_floor: f64,
    /// Floor: every block's RaptorQ encoder (intermediate symbols) built by `raptorq` with its
    /// plan ready, on one thread.
    raptorq_floor: f64,
}

/// Measures [`Steps`] for the batch `joining`/`leaving` applied to a fork of `base`.
fn message_steps(
    base: &rekeycast::lkh::KeyTree,
    joining: &[rekeycast::lkh::MemberId],
    leaving: &[rekeycast::lkh::MemberId],
    signing_key: &ed25519_dalek::SigningKey,
    params: &rekeycast::session::layout::MessageParams,
    rounds: usize,
) -> anyhow::Result<(usize, usize, Steps)> {
    use ed25519_dalek::Signer;
    use rekeycast::lkh::Wrap;
    use rekeycast::session::chunk::DEFAULT_GROUP_LOG2;
    use rekeycast::session::layout::{build_message, lay_out};
    use rekeycast::session::manifest::ChunkAuth;
    use rekeycast::session::sender::PreparedMessage;

    let ms = |start: Instant| start.elapsed().as_secs_f64() * 1e3;
    let mut best = Steps {
        apply_one_thread: f64::MAX,
        apply: f64::MAX,
        leaf_order: f64::MAX,
        layout: f64::MAX,
        layout_merkle: f64::MAX,
        build: f64::MAX,
        fec: f64::MAX,
        wraps_floor: f64::MAX,
        sign_floor: f64::MAX,
        raptorq_floor: f64::MAX,
    };
    let symbol_size = usize::from(params.symbol_size);
    let mut counts = (0, 0);
    // The steps of the default chunk authentication: group signatures of 2^k chunks.
    let auth = ChunkAuth::default();
    let params = rekeycast::session::layout::MessageParams {
        chunk_auth: auth,
        signing_threads: 0,
        ..*params
    };
    for _ in 0..rounds {
        let mut one = base.fork();
        one.set_wrap_threads(1);
        let start = Instant::now();
        let single = one.apply_batch(joining, leaving)?;
        best.apply_one_thread = best.apply_one_thread.min(ms(start));
        drop(one);

        let mut tree = base.fork();
        tree.set_wrap_threads(0);
        let start = Instant::now();
        let batch = tree.apply_batch(joining, leaving)?;
        best.apply = best.apply.min(ms(start));
        anyhow::ensure!(
            single.wraps == batch.wraps,
            "wrap threads changed the wraps"
        );
        drop(single);

        let start = Instant::now();
        let leaves = tree.leaves_in_order();
        best.leaf_order = best.leaf_order.min(ms(start));

        let start = Instant::now();
        let layout = lay_out(&batch, &leaves, symbol_size, auth)?;
        best.layout = best.layout.min(ms(start));
        let start = Instant::now();
        black_box(lay_out(
            &batch,
            &leaves,
            symbol_size,
            ChunkAuth::MerklePath,
        )?);
        best.layout_merkle = best.layout_merkle.min(ms(start));

        let start = Instant::now();
        let built = build_message(&batch, &leaves, signing_key, &params)?;
        best.build = best.build.min(ms(start));

        // Floors, on the same data.
        let (key, under) = (
            rekeycast::lkh::Key::from_bytes([1; 32]),
            rekeycast::lkh::Key::from_bytes([2; 32]),
        );
        let start = Instant::now();
        for wrap in &batch.wraps {
            black_box(Wrap::seal(
                &batch.context,
                wrap.node,
                wrap.version,
                wrap.child,
                wrap.child_version,
                &key,
                &under,
            ));
        }
        best.wraps_floor = best.wraps_floor.min(ms(start));
        // The signatures the scheme needs, each over a short message (a group's root and
        // its context), without the hashing that leads to it.
        let signatures = match auth {
            ChunkAuth::GroupSignature => layout.chunks.len().div_ceil(1 << DEFAULT_GROUP_LOG2),
            ChunkAuth::Signature => layout.chunks.len(),
            ChunkAuth::MerklePath => 1,
        };
        let mut signed = [0u8; 96];
        let start = Instant::now();
        for index in 0..signatures {
            signed[..8].copy_from_slice(&(index as u64).to_le_bytes());
            black_box(signing_key.sign(&signed));
        }
        best.sign_floor = best.sign_floor.min(ms(start));
        let info = built.fec_info;
        let partition = info.partition();
        let blocks: Vec<(u8, Vec<u8>)> = (0..info.source_blocks())
            .map(|sbn| {
                let start = partition.block_start(sbn)? as usize;
                let len = partition.block_len(sbn)? as usize;
                Ok((sbn, built.chunks[start..start + len].concat()))
            })
            .collect::<anyhow::Result<_>>()?;
        let plans: Vec<_> = blocks
            .iter()
            .map(|(_, data)| {
                raptorq::SourceBlockEncodingPlan::generate((data.len() / symbol_size) as u16)
            })
            .collect();
        let start = Instant::now();
        for ((sbn, data), plan) in blocks.iter().zip(&plans) {
            let config = raptorq::ObjectTransmissionInformation::new(
                data.len() as u64,
                params.symbol_size,
                1,
                1,
                1,
            );
            black_box(raptorq::SourceBlockEncoder::with_encoding_plan(
                *sbn, &config, data, plan,
            ));
        }
        best.raptorq_floor = best.raptorq_floor.min(ms(start));

        let start = Instant::now();
        let prepared = PreparedMessage::new(built, batch.mac_key.clone())?;
        prepared.build_repair_encoders()?;
        best.fec = best.fec.min(ms(start));
        counts = (batch.wraps.len(), layout.chunks.len());
    }
    Ok((counts.0, counts.1, best))
}

/// Prints the steps table and returns its JSON rows.
fn print_steps(rows: &[(u32, usize, usize, Steps)], cores: usize) -> Vec<serde_json::Value> {
    let group_log2 = rekeycast::session::chunk::DEFAULT_GROUP_LOG2;
    println!();
    println!(
        "auth: the steps of one message at 1% churn (default chunk authentication: group \
         signatures of 2^{group_log2} chunks; {cores} cores), best of several runs, ms"
    );
    println!(
        "  tree: apply_batch without its wraps (with wraps on 1 thread, minus the wraps \
         floor); wraps: apply_batch on {cores} threads minus tree;"
    );
    println!(
        "  chunk auth: build_message minus layout; FEC: every block's encoder; floors on \
         {cores} cores: each floor / {cores}"
    );
    println!(
        "{:>5} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} | {:>8} {:>8} \
         {:>8} {:>9} {:>6}",
        "log N",
        "wraps",
        "chunks",
        "tree",
        "wraps",
        "leaves",
        "layout",
        "merkle",
        "chunkauth",
        "FEC",
        "whole",
        "aes-gcm",
        "ed25519",
        "raptorq",
        "floors/c",
        "ratio"
    );
    let mut json = Vec::new();
    for &(log_n, wraps, chunks, s) in rows {
        let tree = (s.apply_one_thread - s.wraps_floor).max(0.0);
        let wrap_step = s.apply - tree;
        let chunk_auth = s.build - s.layout;
        let whole = s.apply + s.leaf_order + s.build + s.fec;
        let floors = (s.wraps_floor + s.sign_floor + s.raptorq_floor) / cores as f64;
        println!(
            "{:>5} {:>7} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>8.2} {:>8.2} {:>9.1} {:>8.1} {:>9.1} | \
             {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>6.2}",
            log_n,
            wraps,
            chunks,
            tree,
            wrap_step,
            s.leaf_order,
            s.layout,
            s.layout_merkle,
            chunk_auth,
            s.fec,
            whole,
            s.wraps_floor,
            s.sign_floor,
            s.raptorq_floor,
            floors,
            whole / floors
        );
        json.push(serde_json::json!({
            "log_n": log_n, "wraps": wraps, "chunks": chunks, "cores": cores,
            "tree_ms": tree, "wraps_ms": wrap_step, "apply_batch_ms": s.apply,
            "apply_batch_1_thread_ms": s.apply_one_thread, "leaf_order_ms": s.leaf_order,
            "layout_ms": s.layout, "layout_merkle_ms": s.layout_merkle,
            "chunk_auth_ms": chunk_auth, "build_message_ms": s.build, "fec_encoders_ms": s.fec,
            "whole_message_ms": whole, "floor_aes_gcm_wraps_ms": s.wraps_floor,
            "floor_ed25519_signatures_ms": s.sign_floor, "floor_raptorq_ms": s.raptorq_floor,
            "floors_on_cores_ms": floors, "ratio_to_floors": whole / floors,
        }));
    }
    json
}

/// The chunk authentication options side by side, for N members at 1% churn: one signature per
/// chunk, one per signature group of `2^k` chunks (each chunk carrying its path in the group's
/// tree and the group's signature) for several `k`, and one Merkle tree over the whole message
/// under the manifest's signature. For each: the chunks and bytes on the wire (the layout made
/// with the room that option's authenticator leaves), the GCKS's time to authenticate the laid
/// out chunks on one thread and on every core, and a member's time to verify the manifest and
/// one chunk (best of 50), with its signature checks. Then the whole build (`build_message`) in
/// the three modes the GCKS offers, measured alternately.
fn chunk_auth_options(quick: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    use rekeycast::auth::merkle::MerkleTree;
    use rekeycast::auth::message::MessageVerifier;
    use rekeycast::gsa::{RekeySa, WrapAlgorithm};
    use rekeycast::lkh::{Degree, KeyRng, KeyTree, MemberId};
    use rekeycast::session::chunk::{
        authenticate_groups_on_threads, encode_authenticated, finish, group_authenticator_len,
        sign, Authenticator, DEFAULT_GROUP_LOG2,
    };
    use rekeycast::session::layout::{build_message, lay_out, MessageParams};
    use rekeycast::session::manifest::{ChunkAuth, Manifest, SIGNATURE_LEN};
    use rekeycast::wire::{datagram::OVERHEAD, symbol::FIXED_LEN, DEFAULT_DATAGRAM_SIZE};

    let sizes: &[u32] = if quick { &[12] } else { &[16, 20] };
    let symbol_size = u16::try_from(DEFAULT_DATAGRAM_SIZE - OVERHEAD - FIXED_LEN)?;
    let symbol = usize::from(symbol_size);
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let rounds = if quick { 2 } else { 3 };
    println!();
    println!(
        "auth: chunk authentication options at 1% churn, symbol size {symbol_size} B; \
         auth ms = authenticating the laid-out chunks (1 thread / {cores}), best of {rounds}"
    );
    println!(
        "{:>5} {:>10} {:>8} {:>8} {:>7} {:>11} {:>11} {:>10} {:>7}",
        "log N",
        "option",
        "chunks",
        "MB",
        "sigs",
        "auth ms 1t",
        "auth ms Nt",
        "member us",
        "checks"
    );
    let mut out = Vec::new();
    for &log_n in sizes {
        let n = 1u64 << log_n;
        let sa = RekeySa {
            group_id: 1,
            spi: 1,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::new(4)?,
            gcks_public_key: key.verifying_key(),
            data_sa_lifetime_secs: 3600,
        };
        let mut tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(log_n.into()));
        let all: Vec<MemberId> = (0..n).map(MemberId).collect();
        tree.apply_batch(&all, &[])?;
        let churn = (n / 200).max(1);
        let leaving: Vec<MemberId> = (0..churn).map(|i| MemberId(i * (n / churn))).collect();
        let joining: Vec<MemberId> = (n..n + churn).map(MemberId).collect();
        let batch = tree.apply_batch(&joining, &leaving)?;
        let leaves = tree.leaves_in_order();
        let seq = batch.context.seq;

        // (label, k): None for one signature per chunk, Some(k) for groups of 2^k, and the
        // whole-message Merkle tree as k = 255.
        let mut options: Vec<(String, Option<u8>)> = vec![("signature".into(), None)];
        for k in [2u8, 3, 4, 5, 6] {
            options.push((format!("group k={k}"), Some(k)));
        }
        options.push(("merkle".into(), Some(u8::MAX)));
        for (label, k) in options {
            // The room the option's authenticator leaves, as a layout in signature mode of a
            // symbol shortened by the difference.
            let (auth, auth_len) = match k {
                None => (ChunkAuth::Signature, SIGNATURE_LEN),
                Some(u8::MAX) => (ChunkAuth::MerklePath, 0),
                Some(k) => (
                    ChunkAuth::GroupSignature,
                    group_authenticator_len(usize::from(k)),
                ),
            };
            let layout = if auth == ChunkAuth::MerklePath {
                lay_out(&batch, &leaves, symbol, ChunkAuth::MerklePath)?
            } else {
                let shortened = symbol - (auth_len - SIGNATURE_LEN);
                lay_out(&batch, &leaves, shortened, ChunkAuth::Signature)?
            };
            let count = u32::try_from(layout.chunks.len())?;
            let authenticated = layout
                .chunks
                .iter()
                .map(|(header, payload)| encode_authenticated(header, payload))
                .collect::<Result<Vec<_>, _>>()?;
            let authenticate = |threads: usize| -> anyhow::Result<(Vec<Vec<u8>>, [u8; 16])> {
                let input = authenticated.clone();
                Ok(match (auth, k) {
                    (ChunkAuth::GroupSignature, Some(k)) => (
                        authenticate_groups_on_threads(
                            input, count, seq, k, &key, symbol, threads,
                        )?,
                        [0; 16],
                    ),
                    (ChunkAuth::MerklePath, _) => {
                        let tree = MerkleTree::build(input.iter().map(Vec::as_slice))?;
                        let chunks = input
                            .into_iter()
                            .enumerate()
                            .map(|(index, bytes)| {
                                let path = tree.proof(index).unwrap_or_default();
                                finish(bytes, &Authenticator::MerklePath(path), symbol)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        (chunks, tree.root())
                    }
                    _ => {
                        let per = input.len().div_ceil(threads.max(1)).max(1);
                        let sign_run = |run: Vec<Vec<u8>>| {
                            run.into_iter()
                                .map(|bytes| {
                                    let signature = sign(&key, &bytes);
                                    finish(bytes, &Authenticator::Signature(signature), symbol)
                                })
                                .collect::<Result<Vec<_>, _>>()
                        };
                        let runs: Vec<Vec<Vec<u8>>> =
                            input.chunks(per).map(<[Vec<u8>]>::to_vec).collect();
                        let chunks = std::thread::scope(|scope| {
                            let handles: Vec<_> = runs
                                .into_iter()
                                .map(|run| scope.spawn(move || sign_run(run)))
                                .collect();
                            let mut all = Vec::new();
                            for handle in handles {
                                match handle.join() {
                                    Ok(run) => all.extend(run?),
                                    Err(panic) => std::panic::resume_unwind(panic),
                                }
                            }
                            Ok::<_, rekeycast::session::chunk::ChunkError>(all)
                        })?;
                        (chunks, [0; 16])
                    }
                })
            };
            let mut best = [f64::MAX; 2];
            let mut built = None;
            for _ in 0..rounds {
                for (slot, threads) in [1, cores].into_iter().enumerate() {
                    let start = Instant::now();
                    let result = authenticate(threads)?;
                    best[slot] = best[slot].min(start.elapsed().as_secs_f64() * 1e3);
                    built = Some(result);
                }
            }
            let (chunks, root) = built.ok_or_else(|| anyhow::anyhow!("no rounds"))?;
            let fec_info = rekeycast_fec::ObjectInfo::new(count, symbol_size, 64)?;
            let partition = fec_info.partition();
            let block_first_keys = (0..fec_info.source_blocks())
                .map(|sbn| {
                    let start = usize::try_from(partition.block_start(sbn)?)?;
                    Ok(layout.chunks[start].0.first_leaf)
                })
                .collect::<anyhow::Result<Vec<u32>>>()?;
            let manifest = Manifest {
                wrap_algorithm: batch.context.algorithm.id(),
                chunk_auth: auth,
                group_id: 1,
                spi: 1,
                seq,
                epoch: 0,
                group_size: u32::try_from(batch.group_size)?,
                chunk_count: count,
                timestamp_us: 0,
                chunk_root: root,
                fec_info: fec_info.to_bytes().to_vec(),
                block_first_keys,
            }
            .sign(&key)?;
            let bytes: usize = chunks.iter().map(Vec::len).sum::<usize>() + manifest.len();
            let signatures = match k {
                None => chunks.len(),
                Some(u8::MAX) => 0,
                Some(k) => chunks.len().div_ceil(1 << k),
            } + 1;
            let probe = chunks.len() / 2 + 1;
            let mut member_us = f64::MAX;
            let mut checks = 0;
            for _ in 0..50 {
                let mut verifier = MessageVerifier::new(key.verifying_key(), 1, 1, 0);
                let start = Instant::now();
                let verified = verifier
                    .verify_manifest(seq, &manifest)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .clone();
                let chunk = verifier
                    .verify_chunk(&verified, &chunks[probe.min(chunks.len() - 1)])
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                member_us = member_us.min(start.elapsed().as_secs_f64() * 1e6);
                black_box(chunk);
                checks = verifier.counters().signature_checks;
            }
            println!(
                "{:>5} {:>10} {:>8} {:>8.2} {:>7} {:>11.1} {:>11.1} {:>10.1} {:>7}",
                log_n,
                label,
                chunks.len(),
                bytes as f64 / 1e6,
                signatures,
                best[0],
                best[1],
                member_us,
                checks
            );
            out.push(serde_json::json!({
                "log_n": log_n, "option": label, "chunks": chunks.len(), "message_bytes": bytes,
                "signatures": signatures, "authenticate_ms_1_thread": best[0],
                "authenticate_ms_all_threads": best[1], "threads": cores,
                "member_verify_us": member_us, "member_signature_checks": checks,
            }));
        }
        // The whole build in the GCKS's three modes (the group mode at its default k).
        let mut whole = [f64::MAX; 3];
        let modes = [
            ChunkAuth::Signature,
            ChunkAuth::GroupSignature,
            ChunkAuth::MerklePath,
        ];
        for _ in 0..rounds {
            for (slot, mode) in modes.into_iter().enumerate() {
                let params = MessageParams {
                    chunk_auth: mode,
                    max_block_symbols: 64,
                    ..MessageParams::default()
                };
                let start = Instant::now();
                black_box(build_message(&batch, &leaves, &key, &params)?);
                whole[slot] = whole[slot].min(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        println!(
            "{log_n:>5} whole build_message ms on {cores} threads: signature {:.1}, group k={} {:.1}, \
             merkle {:.1}",
            whole[0], DEFAULT_GROUP_LOG2, whole[1], whole[2]
        );
        // The steps after the message is built, on the worker that built it: the FEC object
        // (a copy of the chunks) and the initial transmission sealed, every block's encoder
        // built on the way, on every core.
        let message = build_message(
            &batch,
            &leaves,
            &key,
            &MessageParams {
                max_block_symbols: 64,
                ..MessageParams::default()
            },
        )?;
        let mut steps = [f64::MAX; 2];
        for _ in 0..rounds {
            let start = Instant::now();
            let mut prepared = rekeycast::session::sender::PreparedMessage::new(
                message.clone(),
                batch.mac_key.clone(),
            )?;
            steps[0] = steps[0].min(start.elapsed().as_secs_f64() * 1e3);
            let start = Instant::now();
            prepared.seal_initial(None, cores)?;
            steps[1] = steps[1].min(start.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{log_n:>5} after the build, group k={}: FEC object {:.1} ms, initial transmission \
             sealed with every block's encoder {:.1} ms ({} datagrams, {cores} threads)",
            DEFAULT_GROUP_LOG2,
            steps[0],
            steps[1],
            message.chunks.len() + 1
        );
        out.push(serde_json::json!({
            "log_n": log_n, "prepare_ms": steps[0], "seal_initial_ms": steps[1],
        }));
        out.push(serde_json::json!({
            "log_n": log_n, "build_message_ms_signature": whole[0],
            "build_message_ms_group": whole[1], "build_message_ms_merkle": whole[2],
            "group_log2": DEFAULT_GROUP_LOG2,
        }));
    }
    Ok(out)
}
