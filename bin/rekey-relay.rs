//! The `rekey-relay` binary: carries a group's rekeys into another network segment and repairs
//! locally (RFC 4046 5.5, Figure 3).
//!
//! Only the command line exists so far: it says that the relay is not built yet and exits with
//! status 2.

use std::path::PathBuf;

use clap::Parser;

/// rekey-relay: hierarchical rekey distribution with authenticated local repair.
#[derive(Debug, Parser)]
#[command(name = "rekey-relay", version, about, long_about = None)]
struct Cli {
    /// The relay's TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let _cli = Cli::parse();
    eprintln!(
        "rekey-relay {}: the relay is not built yet: it needs the relay session (issue 11) on \
         the engine of issue 9.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
