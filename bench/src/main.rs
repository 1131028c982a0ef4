//! rekeycast-bench: one binary, one subcommand per area.
//!
//! `cargo run --release -p rekeycast-bench -- <area> [--quick]`. Each area prints a readable
//! table and ends with one line of JSON holding the same figures. Ratios compare two things
//! measured side by side in the same run; latencies are hdrhistogram percentiles.

use clap::{Parser, Subcommand};

/// rekeycast benchmarks.
#[derive(Debug, Parser)]
#[command(name = "rekeycast-bench", about)]
struct Cli {
    #[command(subcommand)]
    area: Area,
    /// Reduced sizes that run in under a minute.
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Debug, Subcommand)]
enum Area {
    /// Wire format parsing and emitting throughput.
    Wire,
    /// Verifier pipeline: bad-MAC rejection rate next to raw BLAKE3.
    Auth,
    /// LKH batch rekeying at 2^20 members: time per batch next to its AES-GCM floor, memory.
    Lkh,
    /// RaptorQ wrapper: encode/decode and on-demand repair next to raw raptorq; decode failure.
    Fec,
    /// NACK suppression and repair aggregation in the seeded simulator, G up to 10,000.
    Nack,
    /// Whole rekey scenarios (GCKS and members) in the simulator, up to 100,000 members.
    Sim(sim::Args),
    /// The mio engine on loopback: send rate next to a bare socket, time to key, loop lag.
    Engine(engine::Args),
    /// The resync endpoints on loopback: HTTP requests/s next to nginx, resync of 100 messages.
    Resync,
    /// A member's resync latency, RSS and loop lag while hostile clients attack the endpoints.
    ResyncAttacks,
    /// GCKS repair per rekey for members behind relays vs all on the GCKS (simulated).
    Relay(relay::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.area {
        Area::Wire => wire::run(cli.quick),
        Area::Auth => auth::run(cli.quick),
        Area::Lkh => lkh::run(cli.quick),
        Area::Fec => fec::run(cli.quick),
        Area::Nack => nack::run(cli.quick),
        Area::Sim(args) => sim::run(cli.quick, &args),
        Area::Engine(args) => engine::run(cli.quick, &args),
        Area::Resync => resync::run(cli.quick),
        Area::Relay(args) => relay::run(cli.quick, &args),
        Area::ResyncAttacks => attacks::run(cli.quick),
    }
}

mod attacks;
mod auth;
mod engine;
mod fec;
mod lkh;
mod machine;
mod nack;
mod relay;
mod resync;
mod sim;
mod unicast;
mod wire;
