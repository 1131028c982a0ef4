//! `rekeycast-netns`: the network-namespace harness's command line.
//!
//! `probe-recv` and `probe-send` are the two ends of the one-datagram multicast probe that the
//! harness runs inside namespaces. `run SCENARIO.toml` (scenarios with an impairment switch and
//! the real binaries) is not built yet (issue 12) and says so.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rekeycast_netns_tests::{impair, probe, switch};

/// The rekeycast network-namespace harness.
#[derive(Debug, Parser)]
#[command(name = "rekeycast-netns", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join GROUP on the interface with address IFACE, print "ready", then wait for one datagram
    /// and print it as "received HEX".
    ProbeRecv {
        #[arg(long)]
        group: Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        iface: Ipv4Addr,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Send PAYLOAD to GROUP:PORT out of the interface with address IFACE.
    ProbeSend {
        #[arg(long)]
        group: Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        iface: Ipv4Addr,
        #[arg(long)]
        payload: String,
    },
    /// Run the userspace impairment switch inside the switch's namespace: forward frames
    /// between the configured interfaces with their impairments, print "ready" once every port
    /// is open, and take commands on standard input (`outage PORT MS`, `counters`, `quit`).
    Switch {
        /// The switch's TOML configuration (see `rekeycast_netns_tests::impair::SwitchConfig`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a scenario file (not built yet: issue 12).
    Run {
        /// The scenario's TOML file.
        scenario: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::ProbeRecv {
            group,
            port,
            iface,
            timeout_ms,
        } => {
            let socket = probe::receiver(group, port, iface).context("opening receiver")?;
            println!("ready");
            let bytes = probe::receive_one(&socket, Duration::from_millis(timeout_ms))
                .context("waiting for the probe datagram")?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            println!("received {hex}");
            Ok(())
        }
        Command::ProbeSend {
            group,
            port,
            iface,
            payload,
        } => probe::send(group, port, iface, payload.as_bytes()).context("sending the probe"),
        Command::Switch { config } => {
            let config =
                impair::SwitchConfig::load(&config).context("loading the switch config")?;
            switch::run(config).context("running the impairment switch")
        }
        Command::Run { scenario } => anyhow::bail!(
            "running scenarios ({}) is not built yet: it needs the impairment switch and the \
             real binaries (issue 12)",
            scenario.display()
        ),
    }
}
