//! `rekeycast-netns`: the network-namespace harness's command line.
//!
//! `probe-recv` and `probe-send` are the two ends of the one-datagram multicast probe that the
//! harness runs inside namespaces. `run SCENARIO.toml` runs a scenario (namespaces, the impairment
//! switch, the real binaries, faults) and prints its table; `flood` is its attacker.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rekeycast_netns_tests::runner::{self, flood, RunOptions};
use rekeycast_netns_tests::scenario::Scenario;
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
    /// Run a scenario file: build its namespaces and switch, run the real `rekeycast server`,
    /// `rekey-relay` and `rekeycast member` processes in them, trigger its rekeys, inject its
    /// faults, print a progress line per rekey and a final table; exit 1 when an expectation
    /// fails.
    Run {
        /// The scenario's TOML file (see `netns-tests/scenarios/`).
        scenario: PathBuf,
        /// The `rekeycast` binary [default: beside this one].
        #[arg(long)]
        rekeycast: Option<PathBuf>,
        /// The `rekey-relay` binary [default: beside this one].
        #[arg(long)]
        relay: Option<PathBuf>,
        /// The work directory (configurations, state, logs) [default: a fresh one in the
        /// temporary directory, removed when the scenario passes].
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Keep the work directory when the scenario passes.
        #[arg(long)]
        keep: bool,
    },
    /// Send forged datagrams to TO from the interface with address IFACE as fast as the socket
    /// takes them, at most MAX_DATAGRAMS and MAX_MS, then print a JSON report (the attacker of
    /// the flood scenarios).
    Flood {
        #[arg(long)]
        to: SocketAddrV4,
        #[arg(long)]
        iface: Ipv4Addr,
        #[arg(long, default_value_t = 1)]
        group_id: u32,
        #[arg(long, default_value_t = 1)]
        spi: u32,
        #[arg(long, default_value_t = 1)]
        seq_from: u64,
        #[arg(long, default_value_t = 16)]
        seq_to: u64,
        #[arg(long)]
        max_datagrams: u64,
        #[arg(long)]
        max_ms: u64,
        #[arg(long, default_value_t = 0.2)]
        random_fraction: f64,
        #[arg(long, default_value_t = 1247)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
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
        Command::Run {
            scenario,
            rekeycast,
            relay,
            work_dir,
            keep,
        } => {
            let loaded = Scenario::load(&scenario).context("loading the scenario")?;
            // Ctrl-C or SIGTERM stops the run at its next wait, so its guards remove every
            // process and namespace before the exit.
            ctrlc::set_handler(runner::interrupt).context("installing the Ctrl-C handler")?;
            let harness = std::env::current_exe().context("finding this binary")?;
            let mut options = RunOptions::beside(&harness);
            if let Some(path) = rekeycast {
                options.rekeycast = path;
            }
            if let Some(path) = relay {
                options.relay = path;
            }
            options.work_dir = work_dir;
            options.keep = keep;
            let report = runner::run(&loaded, &options)
                .with_context(|| format!("running scenario {}", scenario.display()))?;
            if report.passed() {
                Ok(())
            } else {
                eprintln!(
                    "scenario {} failed ({} expectations); work directory kept: {}",
                    report.name,
                    report.failures.len(),
                    report.work_dir.display()
                );
                std::process::exit(1);
            }
        }
        Command::Flood {
            to,
            iface,
            group_id,
            spi,
            seq_from,
            seq_to,
            max_datagrams,
            max_ms,
            random_fraction,
            size,
            seed,
        } => {
            let report = flood::flood(&flood::FloodPlan {
                to,
                interface: iface,
                group_id,
                spi,
                seq_from,
                seq_to,
                max_datagrams,
                max_duration: Duration::from_millis(max_ms),
                random_fraction,
                size,
                seed,
            })
            .with_context(|| format!("flooding {to}"))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}
