//! The userspace impairment switch: a learning Ethernet switch with IGMP snooping between
//! interfaces of one namespace, impairing each port's traffic per direction as configured.
//!
//! Run it inside the switch's namespace as `rekeycast-netns switch --config FILE.toml`
//! ([`SwitchConfig`]). Each port opens a promiscuous `AF_PACKET` channel (pnet) on its
//! interface, the switch's end of a veth pair whose other end is in a host's namespace. A frame
//! received on port A goes through A's ingress impairments, is forwarded (learned unicast,
//! flooded broadcast and unknown unicast, IPv4 multicast to the ports that joined its group),
//! then through each destination's egress impairments. ARP and IGMP bypass the impairments
//! ([`forwarding::FrameClass::Control`] says why). Delayed frames wait in one scheduler, a heap
//! by due time bounded by [`SwitchConfig::queue_capacity`], owned by the thread that owns every
//! sender.
//!
//! # The process's protocol
//!
//! It prints `ready` on standard output once every port is open. Standard input takes one
//! command per line, and each command but `quit` gets one line in reply:
//!
//! - `outage PORT DURATION_MS`: blackholes both directions of port `PORT` (its name) from now
//!   for that long; replies `ok outage PORT FROM_MS TO_MS` (milliseconds since the start).
//! - `counters`: replies one line of JSON, a [`Counters`].
//! - `quit`: exits.
//!
//! Anything else replies `error: ...`. The switch exits cleanly, writing its counters one last
//! time, on `quit`, on the end of standard input (so keep it open: pipe it, do not leave it
//! `/dev/null`), and on SIGTERM or SIGINT. With `counters_path` set, it writes the counters
//! there every 500 ms too.
//!
//! # Its own transmissions
//!
//! An `AF_PACKET` socket sees the frames transmitted on its interface, but the kernel skips the
//! socket that sent them (`skb_loop_sk` in `dev_queue_xmit_nit`), and each port sends and
//! receives through one socket. pnet does not expose `PACKET_IGNORE_OUTGOING` or the packet
//! type, so as a second line of defence that holds within `forbid(unsafe_code)` the switch
//! remembers the fingerprint of every frame it sent on a port for a second and drops a
//! received frame that matches one (counted as `own_transmissions_dropped`): forwarding one
//! back would loop it between ports for ever.
//!
//! Frames that the switch namespace's own kernel sends out of the switch's interfaces (IPv6
//! router solicitations, MLD reports) are seen the same way; their source is one of the
//! switch's interface addresses, so they are dropped too (`switch_namespace_frames`). Turning
//! IPv6 off in the switch's namespace avoids them altogether.
//!
//! # Checksums
//!
//! veth hosts send UDP and TCP frames whose checksum is unfinished (transmit checksum offload,
//! on by default: the field holds only the pseudo-header's sum); relayed as they are, the
//! receiving kernel would drop them (`InCsumErrors`). The switch therefore completes the
//! checksum of every UDP and TCP over IPv4 frame it receives before anything else happens to
//! it ([`complete_checksum`]), so no host needs its offload turned off (no `ethtool`), and
//! counts those it had to complete (`udp_checksum_invalid`, `tcp_checksum_invalid`). The
//! switch does not segment: hosts send one segment per GSO packet (`gso_max_segs 1` on their
//! veth, [`crate::topology`]). A real link has no such frames:
//! the corruption impairment is applied after this, and recomputes the checksum itself so that
//! the receiving application sees the flipped bit. IPv6 is off in every namespace of the
//! harness, so only IPv4 frames are completed.

pub mod forwarding;
pub mod igmp;
pub mod process;
pub mod traffic;

use std::collections::{BTreeMap, BinaryHeap};
use std::io::{BufRead, Write};
use std::os::fd::{IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use pnet::datalink::{self, Channel, DataLinkReceiver, DataLinkSender};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use crate::impair::{
    corrupt_udp_payload, ConfigError, Delivery, Direction, DropReason, Fate, Impairer, SwitchConfig,
};
use forwarding::{classify, Forwarder, FrameClass, Snooped, TooManyPorts};

/// How often the counters are written to `counters_path`.
pub const COUNTERS_INTERVAL: Duration = Duration::from_millis(500);

/// The most received frames waiting between the receiving threads and the forwarding thread;
/// beyond it, frames are dropped and counted as `receive_overflow`.
pub const RECEIVE_QUEUE: usize = 8192;

/// The most bytes of frames waiting in the delay queue at once, whatever
/// [`SwitchConfig::queue_capacity`] says; frames beyond it are dropped as `dropped_queue_full`.
pub const MAX_QUEUED_BYTES: usize = 128 << 20;

/// The receive buffer asked for on each port's packet socket, in bytes.
pub const RECEIVE_BUFFER: usize = 4 << 20;

/// How long a receiving thread blocks before it checks whether the switch is stopping.
const RECEIVE_TIMEOUT: Duration = Duration::from_millis(100);

/// Consecutive receive errors after which a port is declared failed.
const MAX_CONSECUTIVE_RECEIVE_ERRORS: u32 = 200;

/// The counters of one direction of one port.
///
/// For ingress, `frames` counts the frames received from the host and `forwarded` the copies
/// that passed the ingress impairments into forwarding; for egress, `frames` counts the frames
/// forwarding offered to this port and `forwarded` those transmitted to the host. Control
/// frames (ARP, IGMP) are in `frames` and `forwarded` and also counted in `control`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionCounters {
    /// Frames that entered this direction.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Of them, control frames (ARP, IGMP), which are not impaired.
    pub control: u64,
    /// Dropped by the loss model.
    pub dropped_loss: u64,
    /// Dropped by an outage (configured or commanded).
    pub dropped_outage: u64,
    /// Dropped by the rate limit.
    pub dropped_rate: u64,
    /// Dropped because the delay queue was full.
    pub dropped_queue_full: u64,
    /// Delivered later than they arrived (delay, jitter or reordering).
    pub delayed: u64,
    /// Duplicated (each counts once; both copies are in `forwarded`).
    pub duplicated: u64,
    /// Delivered with a bit of their UDP payload flipped.
    pub corrupted: u64,
    /// Held back to be reordered.
    pub reordered: u64,
    /// Passed on (ingress: into forwarding; egress: transmitted to the host).
    pub forwarded: u64,
    /// The bytes passed on.
    pub forwarded_bytes: u64,
}

/// The counters of one port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Frames from the host into the switch.
    pub ingress: DirectionCounters,
    /// Frames from the switch to the host.
    pub egress: DirectionCounters,
    /// Received frames recognized as the switch's own transmissions and dropped.
    pub own_transmissions_dropped: u64,
    /// Frames the switch namespace's own kernel sent out of this port's interface (IPv6
    /// router solicitations and the like), dropped: they come from no host.
    pub switch_namespace_frames: u64,
    /// Received frames dropped because the forwarding thread was behind.
    pub receive_overflow: u64,
    /// Errors receiving from the interface.
    pub receive_errors: u64,
    /// Errors transmitting to the interface (the frame is lost).
    pub transmit_errors: u64,
    /// Frames from this port that no port wanted (multicast nobody joined, unicast to a host
    /// on this same port, runt frames).
    pub no_destination: u64,
    /// Received UDP over IPv4 frames whose UDP checksum did not verify, which the switch
    /// completed before forwarding them ([`complete_checksum`]): frames of a host with
    /// transmit checksum offload on (the veth default).
    pub udp_checksum_invalid: u64,
    /// Received TCP over IPv4 frames whose checksum did not verify, completed likewise.
    pub tcp_checksum_invalid: u64,
    /// Received IGMP frames (reports, leaves, queries), malformed ones included.
    pub igmp_frames: u64,
    /// Received IGMP frames that did not parse (forwarded, nothing learned).
    pub igmp_malformed: u64,
    /// Joins ignored because the group table was full.
    pub igmp_joins_ignored: u64,
}

/// Everything the switch counts, as written to `counters_path` and replied to `counters`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Milliseconds since the switch started.
    pub uptime_ms: u64,
    /// Frames waiting in the delay queue.
    pub queued: usize,
    /// Per port, by name.
    pub ports: BTreeMap<String, PortCounters>,
}

/// Why the switch could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// More ports than the switch supports.
    #[error(transparent)]
    TooManyPorts(#[from] TooManyPorts),
    /// A port's interface does not exist in this namespace.
    #[error("port {port}: no interface {ifname} in this namespace (there are: {available})")]
    NoInterface {
        /// The port's name.
        port: String,
        /// The missing interface.
        ifname: String,
        /// The interfaces there are.
        available: String,
    },
    /// A port's `AF_PACKET` channel could not be opened.
    #[error("port {port}: could not open an AF_PACKET channel on {ifname}: {source}")]
    Open {
        /// The port's name.
        port: String,
        /// Its interface.
        ifname: String,
        /// Why.
        source: std::io::Error,
    },
    /// pnet gave a channel other than Ethernet.
    #[error("port {port}: {ifname} did not give an Ethernet channel")]
    NotEthernet {
        /// The port's name.
        port: String,
        /// Its interface.
        ifname: String,
    },
    /// A port kept failing to receive.
    #[error("port {port}: receiving keeps failing: {source}")]
    PortFailed {
        /// The port's name.
        port: String,
        /// The last error.
        source: std::io::Error,
    },
    /// Every receiving thread stopped without saying why.
    #[error("every port stopped receiving")]
    ReceiversStopped,
    /// The signal handler could not be installed.
    #[error("could not handle SIGTERM/SIGINT: {0}")]
    Signal(#[from] ctrlc::Error),
    /// A thread could not be started.
    #[error("could not start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A command of the switch's standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchCommand {
    /// Blackhole both directions of the named port from now for the duration.
    Outage {
        /// The port's name.
        port: String,
        /// How long.
        duration: Duration,
    },
    /// Print the counters as one JSON line.
    Counters,
    /// Exit.
    Quit,
}

/// Parses one line of the switch's standard input (surrounding whitespace ignored). `None` for
/// an empty line; an error message for anything not a command.
pub fn parse_command(line: &str) -> Option<Result<SwitchCommand, String>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let parsed = match words.as_slice() {
        [] => return None,
        ["counters"] => Ok(SwitchCommand::Counters),
        ["quit"] => Ok(SwitchCommand::Quit),
        ["outage", port, milliseconds] => match milliseconds.parse::<u64>() {
            Ok(milliseconds) => Ok(SwitchCommand::Outage {
                port: (*port).to_owned(),
                duration: Duration::from_millis(milliseconds),
            }),
            Err(error) => Err(format!("outage duration {milliseconds:?}: {error}")),
        },
        ["outage", ..] => Err("usage: outage PORT DURATION_MS".to_owned()),
        [other, ..] => Err(format!(
            "unknown command {other:?} (commands: outage PORT DURATION_MS, counters, quit)"
        )),
    };
    Some(parsed)
}

/// Runs the switch until `quit`, the end of standard input, SIGTERM or SIGINT.
pub fn run(config: SwitchConfig) -> Result<(), SwitchError> {
    config.validate()?;
    let mut forwarder = Forwarder::new(config.ports.len())?;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (frame_sender, frames) = crossbeam_channel::bounded(RECEIVE_QUEUE);
    let (control_sender, controls) = crossbeam_channel::bounded(64);

    let interfaces = datalink::interfaces();
    let mut ports = Vec::with_capacity(config.ports.len());
    let mut local_addresses = Vec::new();
    let mut receivers = Vec::with_capacity(config.ports.len());
    for (index, port) in config.ports.iter().enumerate() {
        let interface = interfaces
            .iter()
            .find(|interface| interface.name == port.ifname)
            .ok_or_else(|| SwitchError::NoInterface {
                port: port.name.clone(),
                ifname: port.ifname.clone(),
                available: interfaces
                    .iter()
                    .map(|interface| interface.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if let Some(mac) = interface.mac {
            local_addresses.push(mac.octets());
        }
        let socket = packet_socket().map_err(|source| SwitchError::Open {
            port: port.name.clone(),
            ifname: port.ifname.clone(),
            source,
        })?;
        let channel_config = datalink::Config {
            socket_fd: Some(socket),
            read_buffer_size: 65_536,
            write_buffer_size: 65_536,
            read_timeout: Some(RECEIVE_TIMEOUT),
            write_timeout: Some(Duration::from_millis(100)),
            promiscuous: true,
            ..datalink::Config::default()
        };
        let (transmitter, receiver) = match datalink::channel(interface, channel_config) {
            Ok(Channel::Ethernet(transmitter, receiver)) => (transmitter, receiver),
            Ok(_) => {
                return Err(SwitchError::NotEthernet {
                    port: port.name.clone(),
                    ifname: port.ifname.clone(),
                })
            }
            Err(source) => {
                return Err(SwitchError::Open {
                    port: port.name.clone(),
                    ifname: port.ifname.clone(),
                    source,
                })
            }
        };
        let shared = Arc::new(ReceiveCounters::default());
        ports.push(Port {
            name: port.name.clone(),
            transmitter,
            ingress: Impairer::new(&port.ingress, config.seed, index, Direction::Ingress)?,
            egress: Impairer::new(&port.egress, config.seed, index, Direction::Egress)?,
            counters: PortCounters::default(),
            receive: Arc::clone(&shared),
        });
        receivers.push((index, port.name.clone(), receiver, shared));
    }

    // Stops and joins the receiving threads however this function returns.
    let mut threads = ReceivingThreads {
        stop: Arc::clone(&stop),
        handles: Vec::new(),
    };
    for (index, name, receiver, shared) in receivers {
        let sender = frame_sender.clone();
        let failures = control_sender.clone();
        let stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("rx-{name}"))
            .spawn(move || receive_loop(index, receiver, &sender, &failures, &shared, &stop))
            .map_err(|source| SwitchError::Thread {
                what: format!("receiving thread of port {name}"),
                source,
            })?;
        threads.handles.push(thread);
    }
    drop(frame_sender);
    start_stdin_thread(control_sender.clone())?;
    let signals = control_sender.clone();
    ctrlc::set_handler(move || {
        let _ = signals.try_send(Control::Signal);
    })?;
    drop(control_sender);

    forwarder.set_local_addresses(local_addresses);
    let mut switch = Switch {
        start,
        ports,
        forwarder,
        queue: BinaryHeap::new(),
        queue_capacity: config.queue_capacity,
        queued_bytes: 0,
        sequence: 0,
        counters_path: config.counters_path.clone(),
        counters_write_failed: false,
    };
    reply("ready");
    let result = switch.run_loop(&frames, &controls);
    drop(threads);
    switch.write_counters();
    result
}

/// The receiving threads, told to stop and joined when dropped (each notices within
/// [`RECEIVE_TIMEOUT`]).
struct ReceivingThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for ReceivingThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// What the forwarding thread hears besides frames.
#[derive(Debug)]
enum Control {
    /// A line of standard input.
    Line(String),
    /// Standard input ended.
    StdinClosed,
    /// SIGTERM or SIGINT.
    Signal,
    /// A port's receiving thread gave up.
    PortFailed {
        /// The port's index.
        port: usize,
        /// The last error.
        source: std::io::Error,
    },
}

/// A received frame, with when it arrived.
#[derive(Debug)]
struct Received {
    port: usize,
    at: Instant,
    frame: Vec<u8>,
}

/// Counters that the receiving thread of a port updates.
#[derive(Debug, Default)]
struct ReceiveCounters {
    overflow: AtomicU64,
    errors: AtomicU64,
}

/// One port as the forwarding thread holds it.
struct Port {
    name: String,
    transmitter: Box<dyn DataLinkSender>,
    ingress: Impairer,
    egress: Impairer,
    counters: PortCounters,
    receive: Arc<ReceiveCounters>,
}

/// What a queued frame does when it comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// It passed the ingress impairments of `in_port`: forward it.
    Forward { in_port: usize },
    /// It passed the egress impairments of `out_port`: transmit it.
    Transmit { out_port: usize },
}

/// A frame in the delay queue. Ordered so the [`BinaryHeap`] (a max-heap) yields the earliest
/// due first, ties in the order they were queued.
#[derive(Debug)]
struct Scheduled {
    due: Duration,
    sequence: u64,
    step: Step,
    frame: Vec<u8>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.sequence) == (other.due, other.sequence)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.sequence).cmp(&(self.due, self.sequence))
    }
}

/// The forwarding thread's state: it owns every sender, the impairment engines, the
/// forwarding tables and the delay queue.
struct Switch {
    start: Instant,
    ports: Vec<Port>,
    forwarder: Forwarder,
    queue: BinaryHeap<Scheduled>,
    queue_capacity: usize,
    queued_bytes: usize,
    sequence: u64,
    counters_path: Option<PathBuf>,
    counters_write_failed: bool,
}

impl Switch {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn run_loop(
        &mut self,
        frames: &Receiver<Received>,
        controls: &Receiver<Control>,
    ) -> Result<(), SwitchError> {
        let mut next_counters = COUNTERS_INTERVAL;
        loop {
            let now = self.now();
            let mut wake = next_counters;
            if let Some(first) = self.queue.peek() {
                wake = wake.min(first.due);
            }
            let timeout = wake.saturating_sub(now);
            crossbeam_channel::select! {
                recv(frames) -> received => {
                    let Ok(received) = received else {
                        // Every receiving thread ended, which they only do after reporting a
                        // failure; wait for that report rather than spin on the closed channel.
                        return match controls.recv_timeout(Duration::from_secs(1)) {
                            Ok(Control::PortFailed { port, source }) => Err(self.failed(port, source)),
                            _ => Err(SwitchError::ReceiversStopped),
                        };
                    };
                    self.handle_received(received);
                    // Drain a batch before looking at the clock again.
                    for received in frames.try_iter().take(256) {
                        self.handle_received(received);
                    }
                }
                recv(controls) -> control => match control {
                    Ok(Control::Line(line)) => {
                        if self.handle_line(&line) {
                            return Ok(());
                        }
                    }
                    Ok(Control::StdinClosed | Control::Signal) | Err(_) => return Ok(()),
                    Ok(Control::PortFailed { port, source }) => {
                        return Err(self.failed(port, source));
                    }
                },
                default(timeout) => {}
            }
            self.run_due();
            if self.now() >= next_counters {
                self.write_counters();
                next_counters = self.now() + COUNTERS_INTERVAL;
            }
        }
    }

    fn failed(&self, port: usize, source: std::io::Error) -> SwitchError {
        SwitchError::PortFailed {
            port: self
                .ports
                .get(port)
                .map_or_else(|| format!("#{port}"), |port| port.name.clone()),
            source,
        }
    }

    /// Handles one line of standard input; returns whether to quit.
    fn handle_line(&mut self, line: &str) -> bool {
        match parse_command(line) {
            None => false,
            Some(Ok(SwitchCommand::Quit)) => true,
            Some(Ok(SwitchCommand::Counters)) => {
                match serde_json::to_string(&self.counters()) {
                    Ok(json) => reply(&json),
                    Err(error) => reply(&format!("error: counters: {error}")),
                }
                false
            }
            Some(Ok(SwitchCommand::Outage { port, duration })) => {
                let now = self.now();
                match self
                    .ports
                    .iter_mut()
                    .find(|candidate| candidate.name == port)
                {
                    Some(found) => {
                        found.ingress.add_outage(now, now + duration);
                        found.egress.add_outage(now, now + duration);
                        reply(&format!(
                            "ok outage {port} {} {}",
                            now.as_millis(),
                            (now + duration).as_millis()
                        ));
                    }
                    None => reply(&format!("error: no port {port:?}")),
                }
                false
            }
            Some(Err(message)) => {
                reply(&format!("error: {message}"));
                false
            }
        }
    }

    fn handle_received(&mut self, received: Received) {
        let Received {
            port,
            at,
            mut frame,
        } = received;
        let at = at.saturating_duration_since(self.start);
        let now = self.now();
        let Some(entry) = self.ports.get_mut(port) else {
            return;
        };
        if self.forwarder.is_own_transmission(port, &frame, at) {
            entry.counters.own_transmissions_dropped += 1;
            return;
        }
        if self.forwarder.is_from_switch_namespace(&frame) {
            entry.counters.switch_namespace_frames += 1;
            return;
        }
        let counters = &mut entry.counters;
        counters.ingress.frames += 1;
        counters.ingress.bytes += frame.len() as u64;
        match complete_checksum(&mut frame) {
            Some(Transport::Udp) => counters.udp_checksum_invalid += 1,
            Some(Transport::Tcp) => counters.tcp_checksum_invalid += 1,
            None => {}
        }
        self.forwarder.learn(port, &frame);
        if classify(&frame) == FrameClass::Control {
            counters.ingress.control += 1;
            match self.forwarder.snoop(port, &frame) {
                Snooped::Malformed(_) => {
                    counters.igmp_frames += 1;
                    counters.igmp_malformed += 1;
                }
                Snooped::Applied { ignored, .. } => {
                    counters.igmp_frames += 1;
                    counters.igmp_joins_ignored += ignored as u64;
                }
                Snooped::NotIgmp => {}
            }
            self.forward(port, frame, true);
            return;
        }
        let fate = entry.ingress.fate(at, frame.len());
        let Some((copies, frame)) = apply_fate(fate, frame, &mut entry.counters.ingress, now)
        else {
            return;
        };
        for (due, frame) in copies.into_iter().zip(frame) {
            if due <= now {
                self.forward(port, frame, false);
            } else {
                self.schedule(due, Step::Forward { in_port: port }, frame);
            }
        }
    }

    /// Forwards a frame that came in on `in_port` (and passed its ingress impairments) to
    /// every destination, through their egress impairments; `control` frames skip them.
    fn forward(&mut self, in_port: usize, frame: Vec<u8>, control: bool) {
        let destinations = self.forwarder.destinations(in_port, &frame);
        if let Some(port) = self.ports.get_mut(in_port) {
            port.counters.ingress.forwarded += 1;
            port.counters.ingress.forwarded_bytes += frame.len() as u64;
            if destinations.is_empty() {
                port.counters.no_destination += 1;
            }
        }
        if destinations.is_empty() {
            return;
        }
        let now = self.now();
        for out_port in destinations.iter() {
            let Some(port) = self.ports.get_mut(out_port) else {
                continue;
            };
            port.counters.egress.frames += 1;
            port.counters.egress.bytes += frame.len() as u64;
            if control {
                port.counters.egress.control += 1;
                self.transmit(out_port, &frame);
                continue;
            }
            let fate = port.egress.fate(now, frame.len());
            let Some((copies, frames)) =
                apply_fate(fate, frame.clone(), &mut port.counters.egress, now)
            else {
                continue;
            };
            for (due, copy) in copies.into_iter().zip(frames) {
                if due <= now {
                    self.transmit(out_port, &copy);
                } else {
                    self.schedule(due, Step::Transmit { out_port }, copy);
                }
            }
        }
    }

    fn transmit(&mut self, out_port: usize, frame: &[u8]) {
        let now = self.now();
        self.forwarder.record_transmission(out_port, frame, now);
        let Some(port) = self.ports.get_mut(out_port) else {
            return;
        };
        match port.transmitter.send_to(frame, None) {
            Some(Ok(())) => {
                port.counters.egress.forwarded += 1;
                port.counters.egress.forwarded_bytes += frame.len() as u64;
            }
            Some(Err(_)) | None => port.counters.transmit_errors += 1,
        }
    }

    fn schedule(&mut self, due: Duration, step: Step, frame: Vec<u8>) {
        if self.queue.len() >= self.queue_capacity
            || self.queued_bytes + frame.len() > MAX_QUEUED_BYTES
        {
            let counters = match step {
                Step::Forward { in_port } => self
                    .ports
                    .get_mut(in_port)
                    .map(|port| &mut port.counters.ingress),
                Step::Transmit { out_port } => self
                    .ports
                    .get_mut(out_port)
                    .map(|port| &mut port.counters.egress),
            };
            if let Some(counters) = counters {
                counters.dropped_queue_full += 1;
            }
            return;
        }
        self.sequence += 1;
        self.queued_bytes += frame.len();
        self.queue.push(Scheduled {
            due,
            sequence: self.sequence,
            step,
            frame,
        });
    }

    /// Runs every queued step that is due.
    fn run_due(&mut self) {
        let now = self.now();
        while self.queue.peek().is_some_and(|first| first.due <= now) {
            let Some(scheduled) = self.queue.pop() else {
                break;
            };
            self.queued_bytes = self.queued_bytes.saturating_sub(scheduled.frame.len());
            match scheduled.step {
                Step::Forward { in_port } => self.forward(in_port, scheduled.frame, false),
                Step::Transmit { out_port } => self.transmit(out_port, &scheduled.frame),
            }
        }
    }

    fn counters(&self) -> Counters {
        let ports = self
            .ports
            .iter()
            .map(|port| {
                let mut counters = port.counters.clone();
                counters.receive_overflow = port.receive.overflow.load(Ordering::Relaxed);
                counters.receive_errors = port.receive.errors.load(Ordering::Relaxed);
                (port.name.clone(), counters)
            })
            .collect();
        Counters {
            uptime_ms: u64::try_from(self.now().as_millis()).unwrap_or(u64::MAX),
            queued: self.queue.len(),
            ports,
        }
    }

    /// Writes the counters to `counters_path` (through a temporary file and a rename, so a
    /// reader never sees half a file); a failure is reported once on standard error.
    fn write_counters(&mut self) {
        let Some(path) = self.counters_path.clone() else {
            return;
        };
        if let Err(error) = write_json(&path, &self.counters()) {
            if !self.counters_write_failed {
                eprintln!(
                    "rekeycast-netns switch: cannot write counters to {}: {error}",
                    path.display()
                );
                self.counters_write_failed = true;
            }
        }
    }
}

/// Applies a fate to a frame: counts its drop, corruption, reordering, duplication and delay,
/// corrupts it when chosen, and returns the due times with a frame for each (one, or two when
/// duplicated), or `None` when dropped. What passes is counted as `forwarded` where it is
/// forwarded (ingress) or transmitted (egress), after any wait in the delay queue.
fn apply_fate(
    fate: Fate,
    mut frame: Vec<u8>,
    counters: &mut DirectionCounters,
    now: Duration,
) -> Option<(Vec<Duration>, Vec<Vec<u8>>)> {
    let delivery: Delivery = match fate {
        Fate::Dropped(reason) => {
            match reason {
                DropReason::Loss => counters.dropped_loss += 1,
                DropReason::Outage => counters.dropped_outage += 1,
                DropReason::Rate => counters.dropped_rate += 1,
            }
            return None;
        }
        Fate::Delivered(delivery) => delivery,
    };
    if let Some(selector) = delivery.corrupt {
        if corrupt_udp_payload(&mut frame, selector).is_ok() {
            counters.corrupted += 1;
        }
    }
    if delivery.reordered {
        counters.reordered += 1;
    }
    let mut dues = vec![delivery.at];
    let mut frames = Vec::with_capacity(2);
    if let Some(duplicate_at) = delivery.duplicate_at {
        counters.duplicated += 1;
        dues.push(duplicate_at);
        frames.push(frame.clone());
    }
    counters.delayed += dues.iter().filter(|&&due| due > now).count() as u64;
    frames.insert(0, frame);
    Some((dues, frames))
}

/// The transport of a frame whose checksum [`complete_checksum`] completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// Completes the checksum of `frame` when it is UDP or TCP over IPv4 (Ethernet, unfragmented)
/// and its checksum does not verify: a frame from a host whose transmit checksum offload left
/// the checksum unfinished (the field holds the pseudo-header's sum only). Returns the
/// transport when it changed the frame. A zero UDP checksum means "none" over IPv4 (RFC 768)
/// and is accepted by the receiving kernel as it is, so it is left alone (an unfinished sum
/// that happens to be zero is delivered likewise). Any bytes are accepted: other frames, and
/// frames whose lengths do not hold together, are left untouched.
pub fn complete_checksum(frame: &mut [u8]) -> Option<Transport> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(frame[14] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let fragment = u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0;
    let start = 14 + header_len;
    let end = 14 + total_len;
    if fragment || header_len < 20 || total_len < header_len || end > frame.len() {
        return None;
    }
    let (transport, protocol, segment_end, field) = match frame[23] {
        17 => {
            if end - start < 8 {
                return None;
            }
            let udp_len = usize::from(u16::from_be_bytes([frame[start + 4], frame[start + 5]]));
            if udp_len < 8 || start + udp_len > end {
                return None;
            }
            (Transport::Udp, 17, start + udp_len, start + 6)
        }
        6 => {
            if end - start < 20 {
                return None;
            }
            (Transport::Tcp, 6, end, start + 16)
        }
        _ => return None,
    };
    let sent = u16::from_be_bytes([frame[field], frame[field + 1]]);
    if transport == Transport::Udp && sent == 0 {
        return None;
    }
    let addresses = &frame[26..34];
    if pseudo_header_sum(addresses, protocol, &frame[start..segment_end]) == 0xffff {
        // It verifies (with 0x0000 and 0xffff the same in one's complement).
        return None;
    }
    let mut segment = frame[start..segment_end].to_vec();
    let at = field - start;
    segment[at] = 0;
    segment[at + 1] = 0;
    let checksum = match !pseudo_header_sum(addresses, protocol, &segment) {
        // Zero would mean "no checksum" to a UDP receiver.
        0 => 0xffff,
        checksum => checksum,
    };
    frame[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    Some(transport)
}

/// The folded 16-bit one's complement sum of the IPv4 pseudo-header (`addresses`, source then
/// destination, `protocol`, the segment's length) and `segment` (odd lengths padded with a
/// zero byte): 0xffff when a segment with its checksum in place verifies.
fn pseudo_header_sum(addresses: &[u8], protocol: u8, segment: &[u8]) -> u16 {
    let length = u64::try_from(segment.len()).unwrap_or(u64::MAX >> 32);
    let mut sum: u64 = u64::from(protocol) + length;
    for pair in addresses.chunks(2).chain(segment.chunks(2)) {
        let high = u64::from(pair[0]) << 8;
        sum += high | pair.get(1).map_or(0, |&low| u64::from(low));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // Folded into 16 bits by the loop above.
    sum as u16
}

fn receive_loop(
    port: usize,
    mut receiver: Box<dyn DataLinkReceiver>,
    frames: &Sender<Received>,
    failures: &Sender<Control>,
    counters: &ReceiveCounters,
    stop: &AtomicBool,
) {
    let mut consecutive_errors = 0;
    while !stop.load(Ordering::Relaxed) {
        match receiver.next() {
            Ok(frame) => {
                consecutive_errors = 0;
                let received = Received {
                    port,
                    at: Instant::now(),
                    frame: frame.to_vec(),
                };
                match frames.try_send(received) {
                    Ok(()) => {}
                    Err(crossbeam_channel::TrySendError::Full(_)) => {
                        counters.overflow.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                consecutive_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_RECEIVE_ERRORS {
                    let _ = failures.send(Control::PortFailed {
                        port,
                        source: error,
                    });
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Reads standard input line by line into the control channel. The thread is not joined: a
/// blocked read of standard input cannot be interrupted, and it ends with the process.
fn start_stdin_thread(controls: Sender<Control>) -> Result<(), SwitchError> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else {
                    break;
                };
                if controls.send(Control::Line(line)).is_err() {
                    return;
                }
            }
            let _ = controls.send(Control::StdinClosed);
        })
        .map(drop)
        .map_err(|source| SwitchError::Thread {
            what: "standard input".into(),
            source,
        })
}

/// An `AF_PACKET` raw socket for all protocols with a receive buffer of
/// [`RECEIVE_BUFFER`] (as far as `net.core.rmem_max` allows), handed to pnet, which binds it
/// to the port's interface and owns it from then on. pnet's own sockets keep the default
/// buffer (about 200 kB, a few hundred small frames), which a burst overflows while the
/// receiving thread waits for a core.
fn packet_socket() -> std::io::Result<RawFd> {
    /// `ETH_P_ALL` in network byte order, as `socket(2)` takes it for packet sockets.
    const ALL_PROTOCOLS: u16 = 0x0003_u16.to_be();
    let socket = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ALL_PROTOCOLS))),
    )?;
    // Best effort: a smaller buffer only means earlier drops under bursts.
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER);
    Ok(socket.into_raw_fd())
}

/// Prints one line on standard output and flushes it; a closed standard output is ignored
/// (the switch keeps forwarding and still writes `counters_path`).
fn reply(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn write_json(path: &Path, counters: &Counters) -> std::io::Result<()> {
    let json = serde_json::to_vec(counters).map_err(std::io::Error::other)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, json)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + UDP frame from 198.18.0.1:40000 to 239.1.2.3:46000 with `payload`
    /// and UDP checksum field `checksum`.
    fn udp_frame(payload: &[u8], checksum: u16) -> Vec<u8> {
        let udp_len = 8 + payload.len();
        let total_len = 20 + udp_len;
        let mut frame = vec![0x01, 0x00, 0x5e, 0x01, 0x02, 0x03];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
        frame.extend_from_slice(&[0x45, 0, (total_len >> 8) as u8, total_len as u8]);
        frame.extend_from_slice(&[0, 1, 0x40, 0, 1, 17, 0, 0]);
        frame.extend_from_slice(&[198, 18, 0, 1, 239, 1, 2, 3]);
        frame.extend_from_slice(&40_000u16.to_be_bytes());
        frame.extend_from_slice(&46_000u16.to_be_bytes());
        frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
        frame.extend_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// What transmit checksum offload leaves in the field: the folded one's complement sum
    /// of the pseudo-header alone (Linux's `~csum_tcpudp_magic(.., 0)`), for the payload to be
    /// added by the "hardware", which a veth never does.
    fn partial_checksum(frame: &[u8]) -> u16 {
        let udp_len = u16::from_be_bytes([frame[38], frame[39]]);
        let words = [
            u16::from_be_bytes([frame[26], frame[27]]),
            u16::from_be_bytes([frame[28], frame[29]]),
            u16::from_be_bytes([frame[30], frame[31]]),
            u16::from_be_bytes([frame[32], frame[33]]),
            17,
            udp_len,
        ];
        let mut sum: u32 = words.iter().map(|&w| u32::from(w)).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// The UDP checksum as pnet computes it from the frame, independently of
    /// [`complete_checksum`].
    fn pnet_checksum(frame: &[u8]) -> u16 {
        use pnet::packet::ipv4::Ipv4Packet;
        use pnet::packet::udp::{ipv4_checksum, UdpPacket};
        use pnet::packet::Packet;
        let ip = Ipv4Packet::new(&frame[14..]).expect("IPv4");
        let udp = UdpPacket::new(ip.payload()).expect("UDP");
        ipv4_checksum(&udp, &ip.get_source(), &ip.get_destination())
    }

    #[test]
    fn unfinished_udp_and_tcp_checksums_are_completed_and_a_zero_udp_one_left_alone() {
        for payload in [&b"rekeycast"[..], b"odd", &[0xff; 1200][..], b""] {
            let mut frame = udp_frame(payload, 0);
            let partial = partial_checksum(&frame);
            frame[40..42].copy_from_slice(&partial.to_be_bytes());
            let before = frame.clone();
            assert_eq!(
                complete_checksum(&mut frame),
                Some(Transport::Udp),
                "{payload:?}"
            );
            let completed = u16::from_be_bytes([frame[40], frame[41]]);
            assert_ne!(completed, partial);
            assert_eq!(completed, pnet_checksum(&frame), "{payload:?}");
            // Only the checksum changed, and a complete checksum is left as it is.
            assert_eq!(frame[..40], before[..40]);
            assert_eq!(frame[42..], before[42..]);
            let done = frame.clone();
            assert_eq!(complete_checksum(&mut frame), None);
            assert_eq!(frame, done);
            // "No checksum" (zero) is valid over IPv4 and passes unchanged.
            let mut none = udp_frame(payload, 0);
            let copy = none.clone();
            assert_eq!(complete_checksum(&mut none), None);
            assert_eq!(none, copy);
        }
        // TCP (a 20-byte header, then the payload), unfinished the same way.
        for payload in [&b"resync request"[..], b"odd", &[0u8; 1400][..], b""] {
            let mut frame = udp_frame(&[0; 12], 0);
            frame.truncate(34);
            frame.extend_from_slice(&7402u16.to_be_bytes());
            frame.extend_from_slice(&40_001u16.to_be_bytes());
            frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x01, 0x00]);
            frame.extend_from_slice(&[0, 0, 0, 0]);
            frame.extend_from_slice(payload);
            let total_len = (20 + 20 + payload.len()) as u16;
            frame[16..18].copy_from_slice(&total_len.to_be_bytes());
            frame[23] = 6;
            let tcp_len = (20 + payload.len()) as u32;
            let mut sum = [0x0612u32, 0x0001, 0xef01, 0x0203, 6, tcp_len]
                .iter()
                .sum::<u32>()
                - 0x0612
                + 0xc612;
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            frame[50..52].copy_from_slice(&(sum as u16).to_be_bytes());
            assert_eq!(
                complete_checksum(&mut frame),
                Some(Transport::Tcp),
                "{payload:?}"
            );
            let expected = {
                use pnet::packet::ipv4::Ipv4Packet;
                use pnet::packet::tcp::{ipv4_checksum, TcpPacket};
                use pnet::packet::Packet;
                let ip = Ipv4Packet::new(&frame[14..]).expect("IPv4");
                let tcp = TcpPacket::new(ip.payload()).expect("TCP");
                ipv4_checksum(&tcp, &ip.get_source(), &ip.get_destination())
            };
            assert_eq!(u16::from_be_bytes([frame[50], frame[51]]), expected);
            assert_eq!(complete_checksum(&mut frame), None);
        }
        // Fragments, other protocols and frames whose lengths lie are not touched.
        let mut fragment = udp_frame(b"fragment", 0x1234);
        fragment[20] = 0x20;
        let mut tcp = udp_frame(b"tcp", 0x1234);
        tcp[23] = 6;
        let mut long = udp_frame(b"long", 0x1234);
        long[38] = 0xff;
        let mut short = udp_frame(b"short", 0x1234);
        short.truncate(40);
        for mut frame in [fragment, tcp, long, short] {
            let copy = frame.clone();
            assert_eq!(complete_checksum(&mut frame), None);
            assert_eq!(frame, copy);
        }
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse_command("  "), None);
        assert_eq!(parse_command("counters"), Some(Ok(SwitchCommand::Counters)));
        assert_eq!(parse_command(" quit \n"), Some(Ok(SwitchCommand::Quit)));
        assert_eq!(
            parse_command("outage h2 1500"),
            Some(Ok(SwitchCommand::Outage {
                port: "h2".into(),
                duration: Duration::from_millis(1500)
            }))
        );
        for bad in [
            "outage h2",
            "outage h2 -5",
            "outage h2 1 2",
            "reboot",
            "counters now",
        ] {
            assert!(matches!(parse_command(bad), Some(Err(_))), "{bad}");
        }
    }

    #[test]
    fn the_delay_queue_yields_the_earliest_first_in_queueing_order() {
        let mut heap = BinaryHeap::new();
        for (sequence, due) in [(1, 30), (2, 10), (3, 20), (4, 10)] {
            heap.push(Scheduled {
                due: Duration::from_millis(due),
                sequence,
                step: Step::Transmit { out_port: 0 },
                frame: Vec::new(),
            });
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|s| s.sequence)).collect();
        assert_eq!(order, vec![2, 4, 3, 1]);
    }

    #[test]
    fn apply_fate_counts_and_duplicates() {
        let mut counters = DirectionCounters::default();
        let now = Duration::from_millis(5);
        assert!(apply_fate(Fate::Dropped(DropReason::Rate), vec![1], &mut counters, now).is_none());
        let delivery = Delivery {
            at: now,
            duplicate_at: Some(now + Duration::from_millis(3)),
            corrupt: None,
            reordered: true,
        };
        let (dues, frames) = apply_fate(Fate::Delivered(delivery), vec![7; 60], &mut counters, now)
            .expect("delivered");
        assert_eq!(dues, vec![now, now + Duration::from_millis(3)]);
        assert_eq!(frames, vec![vec![7; 60], vec![7; 60]]);
        assert_eq!(
            counters,
            DirectionCounters {
                dropped_rate: 1,
                delayed: 1,
                duplicated: 1,
                reordered: 1,
                ..DirectionCounters::default()
            }
        );
    }

    #[test]
    fn any_frame_goes_through_the_sans_io_steps_without_panicking() {
        let mut forwarder = Forwarder::new(3).expect("3 ports");
        let mut state: u64 = 0x9e37_79b9;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // Random bytes behind plausible Ethernet/IPv4/UDP or IGMP prefixes, and plain noise.
        for round in 0..30_000u32 {
            let len = (next() % 120) as usize;
            let mut frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len > 24 && round % 3 != 0 {
                frame[12] = 0x08;
                frame[13] = 0x00;
                frame[14] = 0x45 + (next() % 3) as u8;
                frame[23] = [2, 17, 6][(next() % 3) as usize];
                if round % 2 == 0 {
                    frame[0..3].copy_from_slice(&[0x01, 0x00, 0x5e]);
                }
            }
            let port = (next() % 4) as usize;
            let now = Duration::from_micros(u64::from(round));
            let _ = forwarder.is_own_transmission(port, &frame, now);
            forwarder.learn(port, &frame);
            let _ = classify(&frame);
            let _ = forwarder.snoop(port, &frame);
            let _ = forwarder.destinations(port, &frame);
            let _ = complete_checksum(&mut frame);
            forwarder.record_transmission(port, &frame, now);
            let _ = corrupt_udp_payload(&mut frame, next());
        }
    }

    #[test]
    fn counters_serialize_by_port_name() {
        let mut counters = Counters::default();
        counters.ports.insert("h1".into(), PortCounters::default());
        let json = serde_json::to_value(&counters).expect("serializes");
        assert_eq!(json["ports"]["h1"]["ingress"]["dropped_loss"], 0);
        let back: Counters = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, counters);
    }
}
