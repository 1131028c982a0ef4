//! A scenario's network: one namespace per host and a switch namespace, each host linked to
//! the switch by a veth pair.
//!
//! Host ends are addressed from 198.18.0.0/15 (all hosts in one /15, so one link-layer
//! segment) and carry a route for 239.0.0.0/8; a topology built with IPv6 (kernel bridge only)
//! also gives them unique-local addresses from `fd00:198:18::/64` and a route for `ff15::/16`. Their transmit checksum offload stays on (the
//! veth default): the userspace switch completes the UDP and TCP checksums it relays itself
//! (the veth pitfall of `PLATFORM.md`; see [`crate::switch`]), so no `ethtool` is needed, and
//! they send one segment per GSO packet (`gso_max_segs 1`), so no frame exceeds the MTU. The
//! switch
//! ends are the ports of either the userspace impairment switch
//! (`rekeycast-netns switch`, run as a child process inside the switch namespace, commanded over
//! its standard input) or a kernel bridge (no impairments).
//!
//! Names come from [`crate::name_prefix`] plus a one-letter tag, so runs in parallel (and the
//! tests of one process) never collide, and [`crate::clean_leftovers`] recognizes what a
//! crashed run left. Everything is removed by `Drop`: the switch process first, then the host
//! namespaces (with their veth ends, which takes the pairs), then the switch namespace. This
//! module must not start the processes of the scenario: [`crate::runner`] does.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::impair::{Impairment, PortConfig, SwitchConfig};
use crate::switch::Counters;
use crate::{name_prefix, run, ChildGuard, Error, Namespace};

/// What went wrong building or commanding a topology.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// An `ip` or `sysctl` command failed.
    #[error("building the topology: {0}")]
    Command(#[from] Error),
    /// The tag is not one lowercase ASCII letter.
    #[error("topology tag {0:?} must be one lowercase ASCII letter")]
    BadTag(String),
    /// Two hosts have the same name.
    #[error("two hosts are called {0:?}")]
    DuplicateHost(String),
    /// More hosts than addresses or interface names allow.
    #[error("{0} hosts: at most 999")]
    TooManyHosts(usize),
    /// The switch's configuration could not be written.
    #[error("writing the switch configuration {path}: {source}")]
    SwitchConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The switch configuration is invalid.
    #[error("switch configuration: {0}")]
    InvalidSwitchConfig(#[from] crate::impair::ConfigError),
    /// The switch process could not be started.
    #[error("starting the switch ({binary}): {source}")]
    SwitchSpawn {
        /// The harness binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The switch did not answer as its protocol says.
    #[error("the switch {0}")]
    SwitchProtocol(String),
    /// A switch command on a topology that has a kernel bridge.
    #[error("{0} needs the impairment switch; this topology has a kernel bridge")]
    NoSwitch(&'static str),
    /// No host by that name.
    #[error("no host {0:?} in this topology")]
    NoHost(String),
    /// IPv6 was asked for with the impairment switch, which forwards IPv4 only.
    #[error("IPv6 needs a kernel bridge: the impairment switch forwards IPv4 only")]
    Ipv6NeedsBridge,
}

/// A host to create: its name (also its switch port's name) and its port's impairments.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPlan {
    /// The host's name, such as `gcks` or `m7`.
    pub name: String,
    /// Frames from the host into the switch.
    pub ingress: Impairment,
    /// Frames from the switch to the host.
    pub egress: Impairment,
}

/// What the switch namespace runs.
#[derive(Debug, Clone, PartialEq)]
pub enum FabricPlan {
    /// The userspace impairment switch, with this seed, started from the harness binary
    /// `binary` (`rekeycast-netns`).
    Switch {
        /// The `rekeycast-netns` binary.
        binary: PathBuf,
        /// The seed of the switch's impairments.
        seed: u64,
    },
    /// A kernel bridge; impairments of the host plans are ignored.
    Bridge,
}

/// One host: its namespace and its address.
#[derive(Debug)]
pub struct Host {
    /// The host's name.
    pub name: String,
    /// Its namespace.
    pub namespace: Namespace,
    /// Its address (on its veth, /15).
    pub address: Ipv4Addr,
    /// Its veth end's interface name.
    pub interface: String,
    /// Its IPv6 unique-local address (on its veth, /64), in a topology built with IPv6
    /// ([`Topology::build_with_ipv6`]); `None` otherwise.
    pub address6: Option<Ipv6Addr>,
    /// Its veth end's interface index inside its namespace (what `IPV6_MULTICAST_IF` and
    /// `IPV6_JOIN_GROUP` take).
    pub index: u32,
}

impl Host {
    /// The address the scenario's processes use: the IPv6 one when the host has one, the
    /// IPv4 one otherwise.
    pub fn ip(&self) -> IpAddr {
        self.address6.map_or(IpAddr::V4(self.address), IpAddr::V6)
    }

    /// The multicast interface of [`Host::ip`]'s family: the veth's index for IPv6, its
    /// address for IPv4.
    pub fn multicast_interface(&self) -> rekeycast::io::socket::Interface {
        match self.address6 {
            Some(_) => rekeycast::io::socket::Interface::V6(self.index),
            None => rekeycast::io::socket::Interface::V4(self.address),
        }
    }
}

/// A built topology; dropping it removes everything it made.
#[derive(Debug)]
pub struct Topology {
    // Fields drop in this order: the switch process, the hosts, then the switch namespace.
    switch: Option<SwitchProcess>,
    hosts: Vec<Host>,
    switch_namespace: Namespace,
    files: Vec<PathBuf>,
}

/// The prefix length of every host address.
pub const PREFIX_LEN: u8 = 15;

/// The prefix length of every host's IPv6 address.
pub const PREFIX6_LEN: u8 = 64;

/// The IPv6 unique-local address of host number `index` (from 0): `fd00:198:18::1` onward.
pub fn host_address6(index: usize) -> Ipv6Addr {
    let number = index as u32 + 1;
    Ipv6Addr::new(
        0xfd00,
        0x198,
        0x18,
        0,
        0,
        0,
        (number >> 16) as u16,
        number as u16,
    )
}

/// The address of host number `index` (from 0): 198.18.0.1 onward, skipping .0 and .255.
pub fn host_address(index: usize) -> Ipv4Addr {
    let index = index as u32;
    let third = index / 250;
    let fourth = index % 250 + 1;
    Ipv4Addr::new(
        198,
        18 + (third / 256) as u8,
        (third % 256) as u8,
        fourth as u8,
    )
}

impl Topology {
    /// Builds the namespaces and links of `hosts` and starts the fabric. `tag` is one
    /// lowercase letter that keeps this topology's names apart from others of this process;
    /// `work_dir` receives the switch's configuration and counters.
    pub fn build(
        tag: &str,
        hosts: &[HostPlan],
        fabric: &FabricPlan,
        work_dir: &Path,
    ) -> Result<Self, TopologyError> {
        Self::build_inner(tag, hosts, fabric, work_dir, false)
    }

    /// [`Topology::build`] with IPv6 on every host besides IPv4: IPv6 enabled in the host
    /// namespaces, a unique-local address from `fd00:198:18::/64` on each veth (added with
    /// `nodad`, usable at once) and a route for `ff15::/16`. The userspace switch forwards
    /// IPv4 only, so IPv6 needs [`FabricPlan::Bridge`] (its multicast snooping off: IPv6
    /// multicast is flooded to every port); anything else is refused with
    /// [`TopologyError::Ipv6NeedsBridge`] before anything is made.
    pub fn build_with_ipv6(
        tag: &str,
        hosts: &[HostPlan],
        fabric: &FabricPlan,
        work_dir: &Path,
    ) -> Result<Self, TopologyError> {
        if *fabric != FabricPlan::Bridge {
            return Err(TopologyError::Ipv6NeedsBridge);
        }
        Self::build_inner(tag, hosts, fabric, work_dir, true)
    }

    fn build_inner(
        tag: &str,
        hosts: &[HostPlan],
        fabric: &FabricPlan,
        work_dir: &Path,
        ipv6: bool,
    ) -> Result<Self, TopologyError> {
        if tag.len() != 1 || !tag.chars().all(|c| c.is_ascii_lowercase()) {
            return Err(TopologyError::BadTag(tag.into()));
        }
        if hosts.len() > 999 {
            return Err(TopologyError::TooManyHosts(hosts.len()));
        }
        for (index, host) in hosts.iter().enumerate() {
            if hosts[..index].iter().any(|other| other.name == host.name) {
                return Err(TopologyError::DuplicateHost(host.name.clone()));
            }
        }
        let base = format!("{}{tag}", name_prefix());
        let switch_namespace = Namespace::create(&format!("{base}sw"))?;
        let mut topology = Self {
            switch: None,
            hosts: Vec::with_capacity(hosts.len()),
            switch_namespace,
            files: Vec::new(),
        };
        quiet_ipv6(&topology.switch_namespace);
        let bridge = format!("{base}br");
        if *fabric == FabricPlan::Bridge {
            topology
                .switch_namespace
                .ip(&["link", "add", &bridge, "type", "bridge"])?;
            if ipv6 {
                // Flood multicast to every port: no MLD snooping state to wait for (the
                // switch namespace has no IPv6, so it would never query).
                topology.switch_namespace.ip(&[
                    "link",
                    "set",
                    &bridge,
                    "type",
                    "bridge",
                    "mcast_snooping",
                    "0",
                ])?;
            }
            topology
                .switch_namespace
                .ip(&["link", "set", &bridge, "up"])?;
        }
        let mut ports = Vec::with_capacity(hosts.len());
        for (index, plan) in hosts.iter().enumerate() {
            let namespace = Namespace::create(&format!("{base}h{index}"))?;
            if ipv6 {
                enable_ipv6(&namespace)?;
            } else {
                quiet_ipv6(&namespace);
            }
            let host_if = format!("{base}{index}h");
            let switch_if = format!("{base}{index}s");
            for name in [&host_if, &switch_if] {
                if name.len() > 15 {
                    return Err(Error::NameTooLong(name.clone()).into());
                }
            }
            // One segment per GSO packet: a host's TCP stack then sends no segment larger
            // than the link's MTU (the userspace switch relays frames as they are and does not
            // segment), which `ethtool -K .. tx off` used to ensure as a side effect.
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &host_if,
                    "netns",
                    namespace.name(),
                    "gso_max_segs",
                    "1",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &switch_if,
                    "netns",
                    topology.switch_namespace.name(),
                ],
            )?;
            let address = host_address(index);
            namespace.ip(&[
                "addr",
                "add",
                &format!("{address}/{PREFIX_LEN}"),
                "dev",
                &host_if,
            ])?;
            namespace.ip(&["link", "set", &host_if, "up"])?;
            namespace.ip(&["route", "add", "239.0.0.0/8", "dev", &host_if])?;
            let address6 = if ipv6 {
                let address6 = host_address6(index);
                namespace.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{address6}/{PREFIX6_LEN}"),
                    "dev",
                    &host_if,
                    "nodad",
                ])?;
                namespace.ip(&["-6", "route", "add", "ff15::/16", "dev", &host_if])?;
                Some(address6)
            } else {
                None
            };
            let index = interface_index(&namespace, &host_if)?;
            if *fabric == FabricPlan::Bridge {
                topology
                    .switch_namespace
                    .ip(&["link", "set", &switch_if, "master", &bridge])?;
            }
            topology
                .switch_namespace
                .ip(&["link", "set", &switch_if, "up"])?;
            ports.push(PortConfig {
                name: plan.name.clone(),
                ifname: switch_if,
                ingress: plan.ingress.clone(),
                egress: plan.egress.clone(),
            });
            topology.hosts.push(Host {
                name: plan.name.clone(),
                namespace,
                address,
                interface: host_if,
                address6,
                index,
            });
        }
        if let FabricPlan::Switch { binary, seed } = fabric {
            let config_path = work_dir.join("switch.toml");
            let counters_path = work_dir.join("switch-counters.json");
            let config = SwitchConfig {
                seed: *seed,
                counters_path: Some(counters_path.clone()),
                queue_capacity: SwitchConfig::DEFAULT_QUEUE_CAPACITY,
                ports,
            };
            config.validate()?;
            std::fs::write(&config_path, config.to_toml()?).map_err(|source| {
                TopologyError::SwitchConfig {
                    path: config_path.clone(),
                    source,
                }
            })?;
            topology.files.push(config_path.clone());
            topology.files.push(counters_path);
            topology.switch = Some(SwitchProcess::start(
                &topology.switch_namespace,
                binary,
                &config_path,
                &work_dir.join("switch.log"),
            )?);
        }
        Ok(topology)
    }

    /// The hosts, in the order of the plan.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<&Host, TopologyError> {
        self.hosts
            .iter()
            .find(|host| host.name == name)
            .ok_or_else(|| TopologyError::NoHost(name.into()))
    }

    /// The switch namespace.
    pub fn switch_namespace(&self) -> &Namespace {
        &self.switch_namespace
    }

    /// Whether the fabric is the impairment switch.
    pub fn has_switch(&self) -> bool {
        self.switch.is_some()
    }

    /// Blackholes both directions of host `port`'s switch port for `duration`.
    pub fn outage(&mut self, port: &str, duration: Duration) -> Result<(), TopologyError> {
        let switch = self
            .switch
            .as_mut()
            .ok_or(TopologyError::NoSwitch("an outage"))?;
        let reply = switch.command(&format!("outage {port} {}", duration.as_millis()))?;
        if reply.starts_with("ok outage") {
            Ok(())
        } else {
            Err(TopologyError::SwitchProtocol(format!(
                "refused `outage {port}`: {reply}"
            )))
        }
    }

    /// The switch's counters now, or `None` with a kernel bridge.
    pub fn counters(&mut self) -> Result<Option<Counters>, TopologyError> {
        let Some(switch) = self.switch.as_mut() else {
            return Ok(None);
        };
        let reply = switch.command("counters")?;
        serde_json::from_str(&reply).map(Some).map_err(|error| {
            TopologyError::SwitchProtocol(format!("answered `counters` with {reply:?}: {error}"))
        })
    }
}

/// Kills the processes still running inside namespaces left by harness processes that no
/// longer run (a run killed before its guards could act), so that [`crate::clean_leftovers`]
/// does not leave them running in a namespace nobody can name any more. Namespaces of live
/// processes are left alone.
pub fn kill_leftover_processes() -> Result<(), TopologyError> {
    let listing = run("ip", &["netns", "list"])?;
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(crate::PREFIX) else {
            continue;
        };
        let owner: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if owner.is_empty() || is_running(&owner) {
            continue;
        }
        if let Ok(pids) = run("ip", &["netns", "pids", name]) {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if pid.chars().all(|c| c.is_ascii_digit()) {
                    let _ = run("kill", &["-9", pid]);
                }
            }
        }
        // A zombie owner (killed, not yet reaped) still has a /proc entry, which
        // clean_leftovers takes for a live process: delete its namespaces here.
        let _ = run("ip", &["netns", "del", name]);
    }
    Ok(())
}

/// Whether process `pid` exists and is not a zombie.
fn is_running(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(switch) = self.switch.take() {
            switch.stop();
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Turns IPv6 off in a namespace: its router solicitations and MLD reports would only be
/// stray frames through the switch. Best effort: a kernel without IPv6 has nothing to turn off.
fn quiet_ipv6(namespace: &Namespace) {
    let _ = run(
        "ip",
        &[
            "netns",
            "exec",
            namespace.name(),
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    );
}

/// Turns IPv6 on in a namespace (a namespace starts with the system's defaults, and the
/// harness's other namespaces turn it off), without router solicitations.
fn enable_ipv6(namespace: &Namespace) -> Result<(), TopologyError> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            namespace.name(),
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.default.router_solicitations=0",
        ],
    )?;
    Ok(())
}

/// The interface index of `interface` inside `namespace`, from `ip -o link show`'s first
/// field (`5: name@if6: ...`).
fn interface_index(namespace: &Namespace, interface: &str) -> Result<u32, TopologyError> {
    let output = namespace.ip(&["-o", "link", "show", "dev", interface])?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .ok_or_else(|| {
            TopologyError::Command(Error::Failed {
                command: format!("ip -n {} -o link show dev {interface}", namespace.name()),
                status: output.status,
                stderr: format!("no interface index in {text:?}"),
            })
        })
}

/// The impairment switch process and its command channel.
#[derive(Debug)]
struct SwitchProcess {
    // Dropped after `stdin` is closed by `stop`, or killed by the guard.
    child: ChildGuard,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// How long the switch has to answer a command (and to get ready).
const SWITCH_REPLY_TIMEOUT: Duration = Duration::from_secs(15);

impl SwitchProcess {
    fn start(
        namespace: &Namespace,
        binary: &Path,
        config: &Path,
        log: &Path,
    ) -> Result<Self, TopologyError> {
        let spawn_error = |source| TopologyError::SwitchSpawn {
            binary: binary.to_owned(),
            source,
        };
        let log = std::fs::File::create(log).map_err(spawn_error)?;
        let mut child = namespace
            .command(binary)
            .args(["switch", "--config"])
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(spawn_error)?;
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => (stdin, stdout),
            _ => {
                let _guard = ChildGuard(child);
                return Err(TopologyError::SwitchProtocol(
                    "has no piped standard input or output".into(),
                ));
            }
        };
        let child = ChildGuard(child);
        let (sender, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("switch-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(spawn_error)?;
        let switch = Self {
            child,
            stdin,
            lines,
        };
        let first = switch.next_line("getting ready")?;
        if first != "ready" {
            return Err(TopologyError::SwitchProtocol(format!(
                "printed {first:?} instead of \"ready\""
            )));
        }
        Ok(switch)
    }

    fn next_line(&self, waiting_for: &str) -> Result<String, TopologyError> {
        self.lines.recv_timeout(SWITCH_REPLY_TIMEOUT).map_err(|_| {
            TopologyError::SwitchProtocol(format!(
                "did not answer within {} s ({waiting_for}); see switch.log in the work \
                     directory",
                SWITCH_REPLY_TIMEOUT.as_secs()
            ))
        })
    }

    fn command(&mut self, line: &str) -> Result<String, TopologyError> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|error| {
                TopologyError::SwitchProtocol(format!("took no command ({line}): {error}"))
            })?;
        self.next_line(line)
    }

    /// Asks the switch to quit and gives it a moment to write its counters; the guard kills
    /// it if it is still running.
    fn stop(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        for _ in 0..40 {
            match self.child.0.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_running_and_a_missing_one_is_not() {
        assert!(is_running(&std::process::id().to_string()));
        assert!(!is_running("999999999"));
    }

    #[test]
    fn host_addresses_are_distinct_and_in_198_18_slash_15() {
        let addresses: Vec<Ipv4Addr> = (0..999).map(host_address).collect();
        assert_eq!(addresses[0], Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(addresses[249], Ipv4Addr::new(198, 18, 0, 250));
        assert_eq!(addresses[250], Ipv4Addr::new(198, 18, 1, 1));
        for (index, address) in addresses.iter().enumerate() {
            let [a, b, _, d] = address.octets();
            assert_eq!(a, 198);
            assert!(b == 18 || b == 19);
            assert!(d != 0 && d != 255, "{address}");
            assert!(!addresses[..index].contains(address));
        }
    }

    #[test]
    fn ipv6_host_addresses_are_distinct_unique_local() {
        let addresses: Vec<Ipv6Addr> = (0..999).map(host_address6).collect();
        assert_eq!(addresses[0], "fd00:198:18::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            addresses[998],
            "fd00:198:18::3e7".parse::<Ipv6Addr>().unwrap()
        );
        for (index, address) in addresses.iter().enumerate() {
            assert_eq!(address.segments()[0], 0xfd00, "{address}");
            assert!(!addresses[..index].contains(address));
        }
    }

    #[test]
    fn ipv6_with_the_switch_is_refused_before_anything_is_made() {
        let plan = HostPlan {
            name: "a".into(),
            ingress: Impairment::default(),
            egress: Impairment::default(),
        };
        let fabric = FabricPlan::Switch {
            binary: PathBuf::from("/nonexistent"),
            seed: 1,
        };
        assert!(matches!(
            Topology::build_with_ipv6("q", &[plan], &fabric, &std::env::temp_dir()),
            Err(TopologyError::Ipv6NeedsBridge)
        ));
    }

    #[test]
    fn bad_tags_and_duplicate_hosts_are_refused_before_anything_is_made() {
        let dir = std::env::temp_dir();
        let plan = |name: &str| HostPlan {
            name: name.into(),
            ingress: Impairment::default(),
            egress: Impairment::default(),
        };
        for tag in ["", "ab", "1", "A"] {
            assert!(matches!(
                Topology::build(tag, &[plan("a")], &FabricPlan::Bridge, &dir),
                Err(TopologyError::BadTag(_))
            ));
        }
        assert!(matches!(
            Topology::build("q", &[plan("a"), plan("a")], &FabricPlan::Bridge, &dir),
            Err(TopologyError::DuplicateHost(name)) if name == "a"
        ));
    }
}
