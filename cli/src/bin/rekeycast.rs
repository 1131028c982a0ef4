//! The `rekeycast` command line: `demo`, `sim`, `server`, `member` and `admin`.
//!
//! - `demo` runs a GCKS and many members in this process on loopback multicast, under loss
//!   simulated at receive, and prints (and optionally writes) what happened.
//! - `sim` runs the in-process simulator (virtual time, no sockets) at scale.
//! - `server` runs one GCKS from a configuration file, with an admin interface on a Unix
//!   socket; `admin` is that interface's client; `member` runs one member from a registration
//!   bundle written by `admin join`.
//!
//! Each subcommand lives in its own module of the `rekeycast_cli` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rekeycast_cli as cli;

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
    Demo(cli::demo::DemoArgs),
    /// Run a GCKS (group key server) from a configuration file.
    Server(cli::server::ServerArgs),
    /// Run one group member from a configuration file and a registration bundle.
    Member(cli::member::MemberArgs),
    /// Talk to a running server's admin socket (join, leave, rekey now, status).
    Admin(cli::admin::AdminArgs),
    /// Run the in-process simulator (virtual time, no sockets) at scale.
    Sim(cli::sim::SimArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Demo(args) => cli::demo::run(args),
        Command::Server(args) => cli::server::run(args),
        Command::Member(args) => cli::member::run(args),
        Command::Admin(args) => cli::admin::run(args),
        Command::Sim(args) => cli::sim::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rekeycast: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
