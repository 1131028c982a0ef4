//! `wire`: parse and emit throughput of the datagram formats, next to a plain copy of the same
//! bytes (the floor any parser that looks at every byte must pay).

use std::hint::black_box;
use std::time::Instant;

use rekeycast::wire::{BodyRepr, DatagramRepr, ObjectKind, SymbolRepr, DEFAULT_DATAGRAM_SIZE};

/// Runs the benchmark and prints its table and JSON line.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let iterations: u32 = if quick { 200_000 } else { 2_000_000 };
    let data = vec![
        0x5Au8;
        DEFAULT_DATAGRAM_SIZE
            - rekeycast::wire::datagram::OVERHEAD
            - rekeycast::wire::symbol::FIXED_LEN
    ];
    let repr = DatagramRepr {
        group_id: 1,
        spi: 2,
        seq: 3,
        body: BodyRepr::Symbol(SymbolRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            esi: 7,
            data: &data,
        }),
        mac: [0; 16],
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut buf)?;

    let start = Instant::now();
    for _ in 0..iterations {
        let parsed = DatagramRepr::parse(black_box(&buf))?;
        black_box(&parsed);
    }
    let parse_ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);

    let mut out = vec![0u8; buf.len()];
    let start = Instant::now();
    for _ in 0..iterations {
        repr.emit(black_box(&mut out))?;
        black_box(&out);
    }
    let emit_ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);

    let start = Instant::now();
    for _ in 0..iterations {
        out.copy_from_slice(black_box(&buf));
        black_box(&out);
    }
    let copy_ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);

    println!(
        "wire: {}-byte symbol datagram, {iterations} iterations",
        buf.len()
    );
    println!("{:<28} {:>10}", "operation", "ns/datagram");
    println!("{:<28} {:>10.1}", "parse (DatagramRepr)", parse_ns);
    println!("{:<28} {:>10.1}", "emit (DatagramRepr)", emit_ns);
    println!("{:<28} {:>10.1}", "memcpy of the same bytes", copy_ns);
    println!(
        "{}",
        serde_json::json!({
            "bench": "wire",
            "datagram_bytes": buf.len(),
            "parse_ns": parse_ns,
            "emit_ns": emit_ns,
            "copy_ns": copy_ns,
            "emit_to_copy_ratio": emit_ns / copy_ns,
        })
    );
    Ok(())
}
