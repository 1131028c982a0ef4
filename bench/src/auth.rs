//! `auth`: what forged traffic costs a member. Bad-MAC datagrams rejected by the real verifier
//! stage ([`DatagramVerifier::check`]) per second on one core, next to raw BLAKE3 keyed hashing
//! of the same bytes in the same run (the floor: the MAC must hash every byte once).

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
    println!(
        "{}",
        serde_json::json!({"bench": "auth", "bad_mac_rejection": rows})
    );
    Ok(())
}
