//! `rekeycast-netns`: the network-namespace harness's command line.
//!
//! `probe-recv` and `probe-send` are the two ends of the one-datagram multicast probe that the
//! harness runs inside namespaces. `run SCENARIO.toml` (scenarios with an impairment switch and
//! the real binaries) is not built yet (issue 12) and says so.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rekeycast_netns_tests::switch::{self, traffic};
use rekeycast_netns_tests::{impair, probe};

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
    /// Send COUNT numbered, checkable UDP datagrams to TO (unicast or a multicast group) from
    /// the interface with address IFACE, then print a JSON report (switch tests).
    UdpBlast {
        #[arg(long)]
        to: SocketAddrV4,
        #[arg(long)]
        iface: Ipv4Addr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        first_seq: u64,
        #[arg(long, default_value_t = 200)]
        size: usize,
        #[arg(long, default_value_t = 500)]
        interval_us: u64,
    },
    /// Receive udp-blast datagrams on PORT (any address; joining GROUP on IFACE when given),
    /// print "ready", then a JSON report once EXPECT arrived, IDLE_MS passed without
    /// one after the first, or TIMEOUT_MS passed (switch tests).
    UdpCount {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        iface: Ipv4Addr,
        #[arg(long)]
        group: Option<Ipv4Addr>,
        #[arg(long, default_value_t = u64::MAX)]
        expect: u64,
        #[arg(long, default_value_t = 1000)]
        idle_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
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
        Command::UdpBlast {
            to,
            iface,
            count,
            first_seq,
            size,
            interval_us,
        } => {
            let report = traffic::blast(&traffic::Blast {
                to,
                interface: iface,
                count,
                first_sequence: first_seq,
                size,
                interval: Duration::from_micros(interval_us),
            })
            .with_context(|| format!("sending to {to}"))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::UdpCount {
            port,
            iface,
            group,
            expect,
            idle_ms,
            timeout_ms,
        } => {
            let count = traffic::Count {
                port,
                interface: iface,
                group,
                expect,
                idle: Duration::from_millis(idle_ms),
                timeout: Duration::from_millis(timeout_ms),
            };
            let socket = traffic::count_socket(&count).context("opening the counting socket")?;
            println!("ready");
            let report = traffic::count(&socket, &count).context("counting datagrams")?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Run { scenario } => anyhow::bail!(
            "running scenarios ({}) is not built yet: it needs the impairment switch and the \
             real binaries (issue 12)",
            scenario.display()
        ),
    }
}
