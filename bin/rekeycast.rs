//! The `rekeycast` command line: demo, server, member, admin and sim.
//!
//! Only the command structure exists so far; each subcommand says which piece of work will
//! build it and exits with status 2, so nothing here pretends to work.

use clap::{Parser, Subcommand};

/// rekeycast: reliable multicast rekeying (LKH over UDP multicast with RaptorQ FEC and NACKs).
#[derive(Debug, Parser)]
#[command(name = "rekeycast", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a GCKS and many members on loopback multicast in one process, under simulated loss.
    Demo,
    /// Run a GCKS (group key server) from a configuration file.
    Server,
    /// Run one group member from a registration bundle.
    Member,
    /// Talk to a running server's admin socket (join, leave, rekey now, status).
    Admin,
    /// Run the in-process simulator at scale.
    Sim,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Self::Demo => "demo",
            Self::Server => "server",
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Sim => "sim",
        }
    }

    /// What remains to be built before the subcommand runs.
    fn missing(&self) -> &'static str {
        match self {
            Self::Demo | Self::Server | Self::Member | Self::Admin => {
                "needs the mio engine and embedding API (issue 9), on the sessions of issue 8"
            }
            Self::Sim => "needs the sans-IO sessions and the simulator (issue 8)",
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "rekeycast {}: `{}` is not built yet: it {}.\n\
         What exists today: the library's wire formats, key tree, FEC, NACK and message layers \
         (`cargo doc --open -p rekeycast`), their tests (`cargo test --workspace`) and benchmarks \
         (`cargo run --release -p rekeycast-bench -- --help`).",
        env!("CARGO_PKG_VERSION"),
        cli.command.name(),
        cli.command.missing()
    );
    std::process::ExitCode::from(2)
}
