//! UDP multicast sockets: group membership, interface, TTL, loopback, port sharing, buffer
//! sizes, and batched sends with UDP GSO where the kernel has it.
//!
//! This module owns socket creation and socket options, done with socket2 (and nix for the one
//! option socket2 lacks, `UDP_SEGMENT`). It owns no thread and no loop: a
//! [`MulticastSocket`] is nonblocking, registers with a mio `Poll` directly (it implements
//! [`mio::event::Source`]) or converts into a [`mio::net::UdpSocket`], and is driven by the
//! event loop. It must not parse datagrams or know about sessions.
//!
//! Two kinds of socket:
//!
//! - [`MulticastSocket::receiver`]: joined to the group, bound to the group's port (on Linux,
//!   to the group address itself), receiving the group's datagrams. It is not for sending (its
//!   local address is the group, not a unicast source): a member sends its NACKs from a sender
//!   socket.
//! - [`MulticastSocket::sender`]: bound to a unicast address, sending to the group (and to
//!   unicast peers) through the configured interface; it also receives unicast replies, such
//!   as NACKs, on its bound address.
//!
//! Every failure is a [`SocketError`] naming the operation and the address or option that
//! failed.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Default hop limit of multicast datagrams: 1, so they stay on the local link unless the
/// operator raises it.
pub const DEFAULT_TTL: u32 = 1;

/// Default receive buffer asked for, in bytes (4 MiB): room for a burst of a few thousand
/// datagrams of about 1,200 bytes while the event loop is busy.
pub const DEFAULT_RECV_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Default send buffer asked for, in bytes (1 MiB).
pub const DEFAULT_SEND_BUFFER_BYTES: usize = 1024 * 1024;

/// Largest number of datagrams one `UDP_SEGMENT` send may carry (the kernel's
/// `UDP_MAX_SEGMENTS`, 64 on every kernel with GSO; later kernels raised it).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Largest total payload, in bytes, of one `UDP_SEGMENT` send: the whole burst travels as one
/// UDP datagram up to the point of segmentation, so it must fit the 64 KiB IP length (65,535
/// minus 20 bytes of IPv4 header and 8 of UDP header; IPv6 allows a little more, and uses the
/// same bound).
pub const MAX_GSO_BYTES: usize = 65_507;

/// The local interface a socket sends multicast through and joins groups on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Interface {
    /// Let the kernel choose, by its routing table (`INADDR_ANY` / interface index 0).
    #[default]
    Default,
    /// The IPv4 interface that has this address (`127.0.0.1` for loopback).
    V4(Ipv4Addr),
    /// The IPv6 interface with this index (as `ip link` shows it; `lo` is usually 1).
    V6(u32),
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interface::Default => f.write_str("the default interface"),
            Interface::V4(address) => write!(f, "{address}"),
            Interface::V6(index) => write!(f, "interface index {index}"),
        }
    }
}

/// How to open a multicast socket. Build with [`MulticastConfig::new`], then set fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MulticastConfig {
    /// The multicast group and UDP port: an IPv4 (224.0.0.0/4) or IPv6 (ff00::/8) multicast
    /// address. Anything else is rejected with [`SocketError::NotMulticast`]. No default.
    pub group: SocketAddr,
    /// The interface to join the group on and send through. Must be of the group's address
    /// family unless [`Interface::Default`]. Default: [`Interface::Default`].
    pub interface: Interface,
    /// For a source-specific join (`IP_ADD_SOURCE_MEMBERSHIP`): the only sender whose datagrams
    /// the receiver accepts. IPv4 only; an IPv6 source gives
    /// [`SocketError::SourceSpecificUnsupported`]. Ignored by senders. Default: `None`
    /// (any-source join).
    pub source: Option<IpAddr>,
    /// IPv4 TTL or IPv6 hop limit of multicast datagrams sent, in router hops. Default:
    /// [`DEFAULT_TTL`] (1, the local link).
    pub ttl: u32,
    /// Whether multicast sent by this host is delivered to this host's own members too
    /// (`IP_MULTICAST_LOOP` / `IPV6_MULTICAST_LOOP`, set on senders). Default: `false`; `true`
    /// for loopback tests and the demo, where every member is on this host.
    pub loopback: bool,
    /// `SO_REUSEADDR` on receivers. Default: `true`.
    pub reuse_address: bool,
    /// `SO_REUSEPORT` on receivers, so that several members on one host can bind the same
    /// group and port (every one of them receives every multicast datagram). Default: `true`.
    pub reuse_port: bool,
    /// Receive buffer to ask for, in bytes (`SO_RCVBUF`); 0 keeps the kernel's default. The
    /// kernel caps it at `net.core.rmem_max`; [`SocketReport`] says what was granted. Default:
    /// [`DEFAULT_RECV_BUFFER_BYTES`] (4 MiB).
    pub recv_buffer_bytes: usize,
    /// Send buffer to ask for, in bytes (`SO_SNDBUF`); 0 keeps the kernel's default. Capped at
    /// `net.core.wmem_max`. Default: [`DEFAULT_SEND_BUFFER_BYTES`] (1 MiB).
    pub send_buffer_bytes: usize,
    /// Whether [`MulticastSocket::send_batch`] may use UDP GSO (`UDP_SEGMENT`) where the kernel
    /// supports it. `false` forces one `sendto` per datagram. Default: `true`.
    pub use_gso: bool,
}

impl MulticastConfig {
    /// A configuration for `group` with every other field at its default.
    pub fn new(group: SocketAddr) -> Self {
        Self {
            group,
            interface: Interface::Default,
            source: None,
            ttl: DEFAULT_TTL,
            loopback: false,
            reuse_address: true,
            reuse_port: true,
            recv_buffer_bytes: DEFAULT_RECV_BUFFER_BYTES,
            send_buffer_bytes: DEFAULT_SEND_BUFFER_BYTES,
            use_gso: true,
        }
    }

    /// A configuration for `group` (IPv4) on the loopback interface with loopback delivery on:
    /// every member on this host. For tests and the demo.
    pub fn loopback_v4(group: SocketAddr) -> Self {
        Self {
            interface: Interface::V4(Ipv4Addr::LOCALHOST),
            loopback: true,
            ..Self::new(group)
        }
    }

    /// What a sender needs of `validate`: it ignores the source.
    fn validate_group_and_interface(&self) -> Result<(), SocketError> {
        if !self.group.ip().is_multicast() {
            return Err(SocketError::NotMulticast { group: self.group });
        }
        let interface_matches = matches!(
            (self.group, self.interface),
            (_, Interface::Default)
                | (SocketAddr::V4(_), Interface::V4(_))
                | (SocketAddr::V6(_), Interface::V6(_))
        );
        if !interface_matches {
            return Err(SocketError::InterfaceFamily {
                group: self.group,
                interface: self.interface,
            });
        }
        Ok(())
    }

    /// Checks the group is multicast and the interface and source are of its family.
    pub fn validate(&self) -> Result<(), SocketError> {
        self.validate_group_and_interface()?;
        match (self.group, self.source) {
            (_, None) | (SocketAddr::V4(_), Some(IpAddr::V4(_))) => Ok(()),
            (SocketAddr::V6(_), Some(source_address)) => {
                Err(SocketError::SourceSpecificUnsupported {
                    group: self.group,
                    source_address,
                })
            }
            (SocketAddr::V4(_), Some(source_address)) => Err(SocketError::SourceFamily {
                group: self.group,
                source_address,
            }),
        }
    }
}

/// What the kernel granted a new socket, against what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketReport {
    /// The socket's local address after binding.
    pub local_addr: SocketAddr,
    /// The receive buffer (`SO_RCVBUF`).
    pub recv_buffer: BufferReport,
    /// The send buffer (`SO_SNDBUF`).
    pub send_buffer: BufferReport,
    /// Whether [`MulticastSocket::send_batch`] will use UDP GSO: the kernel supports
    /// `UDP_SEGMENT` and [`MulticastConfig::use_gso`] is on.
    pub gso: bool,
}

impl SocketReport {
    /// Whether either buffer was granted less than asked.
    pub fn has_shortfall(&self) -> bool {
        self.recv_buffer.is_short() || self.send_buffer.is_short()
    }
}

impl fmt::Display for SocketReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: receive buffer {}, send buffer {}, GSO {}",
            self.local_addr,
            self.recv_buffer,
            self.send_buffer,
            if self.gso { "on" } else { "off" }
        )?;
        if self.recv_buffer.is_short() {
            f.write_str(" (receive buffer capped by net.core.rmem_max)")?;
        }
        if self.send_buffer.is_short() {
            f.write_str(" (send buffer capped by net.core.wmem_max)")?;
        }
        Ok(())
    }
}

/// One socket buffer: the size asked for and the size the kernel granted, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BufferReport {
    /// Bytes asked for; 0 when the kernel's default was kept.
    pub asked: usize,
    /// Bytes granted, comparable with `asked`. Linux stores (and `getsockopt` returns) twice
    /// the size granted, the other half being room for its own bookkeeping; this is the
    /// value read back, halved on Linux.
    pub granted: usize,
    /// The value `getsockopt` returned, as the kernel stores it.
    pub kernel_value: usize,
}

impl BufferReport {
    /// Whether the kernel granted less than asked (on Linux: `asked` exceeds
    /// `net.core.rmem_max` or `net.core.wmem_max`).
    pub fn is_short(&self) -> bool {
        self.granted < self.asked
    }
}

impl fmt::Display for BufferReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.asked == 0 {
            write!(f, "{} B (kernel default)", self.granted)
        } else {
            write!(f, "{} B of {} B asked", self.granted, self.asked)
        }
    }
}

/// An error opening or configuring a multicast socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// The configured group is not a multicast address.
    #[error("group {group} is not a multicast address")]
    NotMulticast {
        /// The address configured as the group.
        group: SocketAddr,
    },
    /// The interface is of the other address family than the group.
    #[error("interface {interface} is not of the address family of group {group}")]
    InterfaceFamily {
        /// The group.
        group: SocketAddr,
        /// The interface configured.
        interface: Interface,
    },
    /// The source of a source-specific join is of the other address family than the group.
    #[error("source {source_address} is not of the address family of group {group}")]
    SourceFamily {
        /// The group.
        group: SocketAddr,
        /// The source configured.
        source_address: IpAddr,
    },
    /// Source-specific joins are not supported for this group: IPv6 source-specific
    /// membership (`MCAST_JOIN_SOURCE_GROUP`) is not offered by socket2, and this crate
    /// forbids `unsafe` code.
    #[error("source-specific join of {group} from {source_address}: not supported for IPv6")]
    SourceSpecificUnsupported {
        /// The group.
        group: SocketAddr,
        /// The source configured.
        source_address: IpAddr,
    },
    /// A sender's bind address is of the other address family than the group.
    #[error("bind address {bind} is not of the address family of group {group}")]
    BindFamily {
        /// The group.
        group: SocketAddr,
        /// The bind address given.
        bind: SocketAddr,
    },
    /// A system call failed.
    #[error("{operation} {target}")]
    Io {
        /// What was being done.
        operation: SocketOperation,
        /// What it was done to: an address, or a group on an interface.
        target: String,
        /// The error the kernel returned.
        source: io::Error,
    },
}

/// The operation a [`SocketError::Io`] failed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketOperation {
    /// Creating the socket.
    Create,
    /// Setting the named socket option.
    SetOption(&'static str),
    /// Reading the named socket option back.
    ReadOption(&'static str),
    /// Binding the local address.
    Bind,
    /// Joining the group.
    Join,
}

impl fmt::Display for SocketOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketOperation::Create => f.write_str("create socket for"),
            SocketOperation::SetOption(option) => write!(f, "set {option} on socket for"),
            SocketOperation::ReadOption(option) => write!(f, "read {option} of socket for"),
            SocketOperation::Bind => f.write_str("bind"),
            SocketOperation::Join => f.write_str("join"),
        }
    }
}

/// A nonblocking UDP socket set up for multicast: see [`MulticastSocket::receiver`] and
/// [`MulticastSocket::sender`].
#[derive(Debug)]
pub struct MulticastSocket {
    socket: mio::net::UdpSocket,
    group: SocketAddr,
    /// Cleared for good when a GSO send fails in a way that says the route cannot do it.
    gso: AtomicBool,
}

impl MulticastSocket {
    /// Opens a nonblocking socket that receives `config.group`'s datagrams on
    /// `config.interface`.
    ///
    /// Sets `SO_REUSEADDR` and `SO_REUSEPORT` as configured, the buffer sizes, binds the group's
    /// port and joins the group (`IP_ADD_MEMBERSHIP`, `IP_ADD_SOURCE_MEMBERSHIP` when
    /// `config.source` is set, or `IPV6_JOIN_GROUP`).
    ///
    /// On Linux the socket is bound to the group address itself rather than to the wildcard
    /// address. Linux delivers a multicast datagram to every socket bound to its port whose
    /// host has joined the group, whichever socket joined it (`IP_MULTICAST_ALL` is on by
    /// default): a wildcard-bound receiver of group A would also get group B's datagrams on the
    /// same port as soon as any process on the host joined B. Binding to the group filters them
    /// out (and `IP_MULTICAST_ALL` is also turned off, where the kernel has it). Elsewhere the
    /// socket is bound to the wildcard address.
    pub fn receiver(
        config: &MulticastConfig,
    ) -> Result<(MulticastSocket, SocketReport), SocketError> {
        config.validate()?;
        let group = config.group;
        let socket = create(group)?;
        let on = |operation, source| io_error(operation, format!("{group}"), source);
        if config.reuse_address {
            socket
                .set_reuse_address(true)
                .map_err(|e| on(SocketOperation::SetOption("SO_REUSEADDR"), e))?;
        }
        #[cfg(unix)]
        if config.reuse_port {
            socket
                .set_reuse_port(true)
                .map_err(|e| on(SocketOperation::SetOption("SO_REUSEPORT"), e))?;
        }
        let (recv_buffer, send_buffer) = set_buffers(&socket, config, group)?;
        let bind_addr = receiver_bind_address(group);
        socket
            .bind(&SockAddr::from(bind_addr))
            .map_err(|e| io_error(SocketOperation::Bind, format!("{bind_addr}"), e))?;
        join(&socket, config)?;
        #[cfg(target_os = "linux")]
        {
            // Belt and braces beside the bind to the group address (see above); kernels before
            // 4.20 lack the IPv6 option, and the bind alone suffices, so a failure is ignored.
            let _ = match group {
                SocketAddr::V4(_) => socket.set_multicast_all_v4(false),
                SocketAddr::V6(_) => socket.set_multicast_all_v6(false),
            };
        }
        let multicast = Self::finish(socket, config)?;
        let report = multicast.report(recv_buffer, send_buffer)?;
        Ok((multicast, report))
    }

    /// Opens a nonblocking socket bound to `bind` that sends to `config.group` through
    /// `config.interface` (`IP_MULTICAST_IF` / `IPV6_MULTICAST_IF`), with `config.ttl` and
    /// `config.loopback`, and the configured buffer sizes.
    ///
    /// `bind` is a unicast address of the group's family, such as `0.0.0.0:0` or a fixed port
    /// that members send their NACKs to: the socket also receives unicast datagrams there. It
    /// sets neither `SO_REUSEADDR` nor `SO_REUSEPORT`, so no other socket can share its port
    /// and take its replies. `config.source` is ignored.
    pub fn sender(
        config: &MulticastConfig,
        bind: SocketAddr,
    ) -> Result<(MulticastSocket, SocketReport), SocketError> {
        config.validate_group_and_interface()?;
        let group = config.group;
        if bind.is_ipv4() != group.is_ipv4() {
            return Err(SocketError::BindFamily { group, bind });
        }
        let socket = create(group)?;
        let on = |operation, source| io_error(operation, format!("{group}"), source);
        let (recv_buffer, send_buffer) = set_buffers(&socket, config, group)?;
        match (group, config.interface) {
            (SocketAddr::V4(_), Interface::V4(address)) => socket
                .set_multicast_if_v4(&address)
                .map_err(|e| on(SocketOperation::SetOption("IP_MULTICAST_IF"), e))?,
            (SocketAddr::V6(_), Interface::V6(index)) => socket
                .set_multicast_if_v6(index)
                .map_err(|e| on(SocketOperation::SetOption("IPV6_MULTICAST_IF"), e))?,
            // Default (the mismatched pairs were refused by validate): the kernel routes.
            _ => {}
        }
        match group {
            SocketAddr::V4(_) => {
                socket
                    .set_multicast_ttl_v4(config.ttl)
                    .map_err(|e| on(SocketOperation::SetOption("IP_MULTICAST_TTL"), e))?;
                socket
                    .set_multicast_loop_v4(config.loopback)
                    .map_err(|e| on(SocketOperation::SetOption("IP_MULTICAST_LOOP"), e))?;
            }
            SocketAddr::V6(_) => {
                socket
                    .set_multicast_hops_v6(config.ttl)
                    .map_err(|e| on(SocketOperation::SetOption("IPV6_MULTICAST_HOPS"), e))?;
                socket
                    .set_multicast_loop_v6(config.loopback)
                    .map_err(|e| on(SocketOperation::SetOption("IPV6_MULTICAST_LOOP"), e))?;
            }
        }
        socket
            .bind(&SockAddr::from(bind))
            .map_err(|e| io_error(SocketOperation::Bind, format!("{bind}"), e))?;
        let multicast = Self::finish(socket, config)?;
        let report = multicast.report(recv_buffer, send_buffer)?;
        Ok((multicast, report))
    }

    /// The group this socket was opened for.
    pub fn group(&self) -> SocketAddr {
        self.group
    }

    /// The socket's local address: the group and port for a receiver on Linux, the bound
    /// address (with the port the kernel chose, if 0 was asked) for a sender.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends one datagram to `dest` (the group, or a unicast peer). Never blocks: a full send
    /// buffer gives [`io::ErrorKind::WouldBlock`].
    pub fn send_to(&self, buf: &[u8], dest: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(buf, dest)
    }

    /// Receives one datagram into `buf`, returning its length and sender. Never blocks: with
    /// nothing queued it gives [`io::ErrorKind::WouldBlock`]. A datagram longer than `buf` is
    /// truncated.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf)
    }

    /// Whether [`send_batch`](Self::send_batch) currently uses UDP GSO.
    pub fn gso_enabled(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Sends each of `segments` to `dest` as its own datagram, in order, and returns how many
    /// of the leading segments were handed to the kernel.
    ///
    /// With GSO on (see [`gso_enabled`](Self::gso_enabled)), runs of equal-size segments,
    /// optionally ending with one shorter segment, go down in one `sendmsg` with `UDP_SEGMENT`
    /// (at most [`MAX_GSO_SEGMENTS`] datagrams and [`MAX_GSO_BYTES`] bytes each): the kernel
    /// splits them into separate datagrams, so receivers see exactly what one `sendto` per
    /// segment would give them, at a fraction of the system calls. Otherwise, and for
    /// segments that break the run, one `sendto` per datagram. If the route turns out unable
    /// to do GSO (`EIO`), the socket falls back to plain sends for good.
    ///
    /// Never blocks. When the send buffer fills (or another error occurs) after some segments
    /// were sent, returns `Ok` with that count: call again with the rest, which reports the
    /// error. When nothing could be sent, returns the error
    /// ([`io::ErrorKind::WouldBlock`] for a full buffer).
    pub fn send_batch(&self, dest: SocketAddr, segments: &[&[u8]]) -> io::Result<usize> {
        let mut sent = 0;
        while sent < segments.len() {
            let rest = &segments[sent..];
            let run = if self.gso_enabled() {
                gso_run_length(rest)
            } else {
                1
            };
            let result = if run >= 2 {
                match gso::send(&self.socket, dest, &rest[..run]) {
                    Err(error) if gso::route_cannot_segment(&error) => {
                        self.gso.store(false, Ordering::Relaxed);
                        self.send_each(dest, &rest[..run])
                    }
                    // For example segments longer than the route's MTU, which plain sends
                    // fragment: send this run plainly, and try GSO again for the next.
                    Err(error) if error.raw_os_error() == Some(gso::EINVAL) => {
                        self.send_each(dest, &rest[..run])
                    }
                    other => other.map(|()| run),
                }
            } else {
                self.socket.send_to(rest[0], dest).map(|_| 1)
            };
            match result {
                Ok(count) => sent += count,
                Err(_) if sent > 0 => return Ok(sent),
                Err(error) => return Err(error),
            }
        }
        Ok(sent)
    }

    /// One `sendto` per segment; stops at the first error, reporting it only if nothing was
    /// sent.
    fn send_each(&self, dest: SocketAddr, segments: &[&[u8]]) -> io::Result<usize> {
        for (sent, segment) in segments.iter().enumerate() {
            if let Err(error) = self.socket.send_to(segment, dest) {
                return if sent > 0 { Ok(sent) } else { Err(error) };
            }
        }
        Ok(segments.len())
    }

    /// The underlying mio socket, for an event loop that wants it alone; the GSO state is
    /// lost (send one datagram at a time, or keep the [`MulticastSocket`], which registers with
    /// mio itself).
    pub fn into_mio(self) -> mio::net::UdpSocket {
        self.socket
    }

    fn finish(socket: Socket, config: &MulticastConfig) -> Result<MulticastSocket, SocketError> {
        let group = config.group;
        socket.set_nonblocking(true).map_err(|e| {
            io_error(
                SocketOperation::SetOption("O_NONBLOCK"),
                format!("{group}"),
                e,
            )
        })?;
        let std_socket: std::net::UdpSocket = socket.into();
        Ok(MulticastSocket {
            socket: mio::net::UdpSocket::from_std(std_socket),
            group,
            gso: AtomicBool::new(config.use_gso && gso_supported()),
        })
    }

    fn report(
        &self,
        recv_buffer: BufferReport,
        send_buffer: BufferReport,
    ) -> Result<SocketReport, SocketError> {
        let local_addr = self.socket.local_addr().map_err(|e| {
            io_error(
                SocketOperation::ReadOption("local address"),
                format!("{}", self.group),
                e,
            )
        })?;
        Ok(SocketReport {
            local_addr,
            recv_buffer,
            send_buffer,
            gso: self.gso_enabled(),
        })
    }
}

impl mio::event::Source for MulticastSocket {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        self.socket.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        self.socket.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        self.socket.deregister(registry)
    }
}

/// Whether this kernel supports UDP GSO (`UDP_SEGMENT`, Linux 4.18 and later). Probed once
/// per process, by setting the option on a throwaway socket.
pub fn gso_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(gso::probe)
}

/// How many of the leading `segments` one GSO send can carry: equal sizes, then at most one
/// shorter, within the segment and byte limits.
fn gso_run_length(segments: &[&[u8]]) -> usize {
    let Some(first) = segments.first() else {
        return 0;
    };
    let size = first.len();
    if size == 0 || size > MAX_GSO_BYTES {
        return 1;
    }
    let mut count = 1;
    let mut total = size;
    for segment in &segments[1..] {
        if count == MAX_GSO_SEGMENTS || total + segment.len() > MAX_GSO_BYTES {
            break;
        }
        if segment.len() == size {
            count += 1;
            total += size;
        } else {
            if !segment.is_empty() && segment.len() < size {
                count += 1;
            }
            break;
        }
    }
    count
}

fn create(group: SocketAddr) -> Result<Socket, SocketError> {
    let socket = Socket::new(Domain::for_address(group), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| io_error(SocketOperation::Create, format!("{group}"), e))?;
    if group.is_ipv6() {
        socket.set_only_v6(true).map_err(|e| {
            io_error(
                SocketOperation::SetOption("IPV6_V6ONLY"),
                format!("{group}"),
                e,
            )
        })?;
    }
    Ok(socket)
}

fn set_buffers(
    socket: &Socket,
    config: &MulticastConfig,
    group: SocketAddr,
) -> Result<(BufferReport, BufferReport), SocketError> {
    let target = || format!("{group}");
    if config.recv_buffer_bytes > 0 {
        socket
            .set_recv_buffer_size(config.recv_buffer_bytes)
            .map_err(|e| io_error(SocketOperation::SetOption("SO_RCVBUF"), target(), e))?;
    }
    if config.send_buffer_bytes > 0 {
        socket
            .set_send_buffer_size(config.send_buffer_bytes)
            .map_err(|e| io_error(SocketOperation::SetOption("SO_SNDBUF"), target(), e))?;
    }
    let recv_value = socket
        .recv_buffer_size()
        .map_err(|e| io_error(SocketOperation::ReadOption("SO_RCVBUF"), target(), e))?;
    let send_value = socket
        .send_buffer_size()
        .map_err(|e| io_error(SocketOperation::ReadOption("SO_SNDBUF"), target(), e))?;
    Ok((
        buffer_report(config.recv_buffer_bytes, recv_value),
        buffer_report(config.send_buffer_bytes, send_value),
    ))
}

fn buffer_report(asked: usize, kernel_value: usize) -> BufferReport {
    // Linux doubles what it grants when storing it (socket(7), SO_RCVBUF).
    let granted = if cfg!(target_os = "linux") {
        kernel_value / 2
    } else {
        kernel_value
    };
    BufferReport {
        asked,
        granted,
        kernel_value,
    }
}

fn receiver_bind_address(group: SocketAddr) -> SocketAddr {
    if cfg!(target_os = "linux") {
        group
    } else {
        match group {
            SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), group.port()),
            SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), group.port()),
        }
    }
}

fn join(socket: &Socket, config: &MulticastConfig) -> Result<(), SocketError> {
    let group = config.group;
    let target = format!("{} on {}", group.ip(), config.interface);
    let result = match (group.ip(), config.interface, config.source) {
        (IpAddr::V4(group_ip), interface, source) => {
            let interface_ip = match interface {
                Interface::V4(address) => address,
                _ => Ipv4Addr::UNSPECIFIED,
            };
            match source {
                Some(IpAddr::V4(source_ip)) => {
                    socket.join_ssm_v4(&source_ip, &group_ip, &interface_ip)
                }
                _ => socket.join_multicast_v4(&group_ip, &interface_ip),
            }
        }
        (IpAddr::V6(group_ip), interface, _) => {
            let index = match interface {
                Interface::V6(index) => index,
                _ => 0,
            };
            socket.join_multicast_v6(&group_ip, index)
        }
    };
    let target = match config.source {
        Some(source) => format!("{target} from source {source}"),
        None => target,
    };
    result.map_err(|e| io_error(SocketOperation::Join, target, e))
}

fn io_error(operation: SocketOperation, target: String, source: io::Error) -> SocketError {
    SocketError::Io {
        operation,
        target,
        source,
    }
}

/// `UDP_SEGMENT` through nix, which wraps the system calls socket2 does not.
#[cfg(target_os = "linux")]
mod gso {
    use std::io;
    use std::io::IoSlice;
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{self, sockopt, ControlMessage, MsgFlags, SockaddrStorage};

    pub(super) const EINVAL: i32 = nix::libc::EINVAL;

    pub(super) fn probe() -> bool {
        let Ok(socket) = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        ) else {
            return false;
        };
        socket::setsockopt(&socket, sockopt::UdpGsoSegment, &1200).is_ok()
    }

    /// One `sendmsg` of `segments` (the caller checked the run: equal sizes, the last possibly
    /// shorter, within the limits) with the segment size in a `UDP_SEGMENT` control message.
    pub(super) fn send(
        socket: &mio::net::UdpSocket,
        dest: SocketAddr,
        segments: &[&[u8]],
    ) -> io::Result<()> {
        let size = segments.first().map_or(0, |s| s.len());
        let size = u16::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let slices: Vec<IoSlice<'_>> = segments.iter().map(|s| IoSlice::new(s)).collect();
        let address = SockaddrStorage::from(dest);
        socket::sendmsg(
            socket.as_raw_fd(),
            &slices,
            &[ControlMessage::UdpGsoSegments(&size)],
            MsgFlags::empty(),
            Some(&address),
        )
        .map(|_| ())
        .map_err(io::Error::from)
    }

    /// Whether a failed GSO send says this socket's route can never segment (the device
    /// lacks checksum offload, or the path goes through IPsec).
    pub(super) fn route_cannot_segment(error: &io::Error) -> bool {
        error.raw_os_error() == Some(nix::libc::EIO)
    }
}

/// No UDP GSO off Linux: every batch is sent one datagram at a time.
#[cfg(not(target_os = "linux"))]
mod gso {
    use std::io;
    use std::net::SocketAddr;

    pub(super) const EINVAL: i32 = 22;

    pub(super) fn probe() -> bool {
        false
    }

    pub(super) fn send(
        _socket: &mio::net::UdpSocket,
        _dest: SocketAddr,
        _segments: &[&[u8]],
    ) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub(super) fn route_cannot_segment(_error: &io::Error) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;
    use std::time::{Duration, Instant};

    use super::*;

    /// How long a test waits for datagrams it expects before giving up. Only bounds the loop:
    /// no assertion depends on how long anything took.
    const DEADLINE: Duration = Duration::from_secs(5);

    /// A port of its own for each test (`slot` < 16), away from those of other test processes
    /// and below the ephemeral range.
    fn port(slot: u16) -> u16 {
        let base = 20_000 + (std::process::id() % 790) as u16 * 16;
        base + slot
    }

    /// An IPv4 group in 239.0.0.0/8 of its own for each test (`slot`) and process.
    fn group_v4(slot: u8, port: u16) -> SocketAddr {
        let pid = std::process::id();
        let address = Ipv4Addr::new(239, 83, slot, (pid % 250) as u8 + 1);
        SocketAddr::V4(SocketAddrV4::new(address, port))
    }

    fn loopback_sender(config: &MulticastConfig) -> MulticastSocket {
        let bind = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0);
        let (sender, _) = MulticastSocket::sender(config, bind).expect("open sender");
        sender
    }

    /// Receives until `count` datagrams came or the deadline passed.
    fn receive(socket: &MulticastSocket, count: usize) -> Vec<Vec<u8>> {
        receive_until(socket, |received| received.len() >= count)
    }

    /// Receives until `done` says so or the deadline passed.
    fn receive_until(socket: &MulticastSocket, done: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + DEADLINE;
        let mut received = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while !done(&received) && Instant::now() < deadline {
            match socket.recv_from(&mut buf) {
                Ok((len, _from)) => received.push(buf[..len].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        received
    }

    /// Segments of the sizes given, each filled with its index so reordering or merging shows.
    fn segments(sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| vec![i as u8; size])
            .collect()
    }

    fn send_and_check_batch(config: &MulticastConfig, sizes: &[usize]) -> bool {
        let (receiver, _) = MulticastSocket::receiver(config).expect("open receiver");
        let sender = loopback_sender(config);
        let payloads = segments(sizes);
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let mut sent = 0;
        let deadline = Instant::now() + DEADLINE;
        while sent < slices.len() && Instant::now() < deadline {
            match sender.send_batch(config.group, &slices[sent..]) {
                Ok(count) => sent += count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("send_batch: {e}"),
            }
        }
        assert_eq!(sent, slices.len());
        let received = receive(&receiver, payloads.len());
        assert_eq!(
            received, payloads,
            "each segment arrives as its own datagram, in order"
        );
        sender.gso_enabled()
    }

    #[test]
    fn sender_reaches_two_receivers_on_same_group_port() {
        let config = MulticastConfig::loopback_v4(group_v4(1, port(1)));
        let (first, first_report) = MulticastSocket::receiver(&config).expect("first receiver");
        let (second, _) = MulticastSocket::receiver(&config).expect("second receiver (reuse)");
        assert_eq!(
            first_report.local_addr, config.group,
            "bound to the group itself"
        );
        let sender = loopback_sender(&config);
        for i in 0..3u8 {
            sender.send_to(&[i; 100], config.group).expect("send");
        }
        let expected: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100]).collect();
        assert_eq!(receive(&first, 3), expected);
        assert_eq!(receive(&second, 3), expected);
    }

    #[test]
    fn receiver_of_other_group_on_same_port_gets_nothing() {
        let shared_port = port(2);
        let config_a = MulticastConfig::loopback_v4(group_v4(2, shared_port));
        let config_b = MulticastConfig::loopback_v4(group_v4(3, shared_port));
        // A receiver of A on the port, so this host is a member of A and A's traffic is
        // looped back and delivered to the port's sockets.
        let (receiver_a, _) = MulticastSocket::receiver(&config_a).expect("receiver of A");
        let (receiver_b, _) = MulticastSocket::receiver(&config_b).expect("receiver of B");
        let sender = loopback_sender(&config_a);
        sender.send_to(b"for A", config_a.group).expect("send to A");
        // The marker to B follows A's datagram on the same path: once B has the marker, A's
        // datagram would have been queued before it, had B been given it.
        sender
            .send_to(b"marker for B", config_b.group)
            .expect("send to B");
        assert_eq!(receive(&receiver_a, 1), vec![b"for A".to_vec()]);
        let received_b = receive_until(&receiver_b, |r| r.iter().any(|d| d == b"marker for B"));
        assert_eq!(received_b, vec![b"marker for B".to_vec()]);
    }

    #[test]
    fn send_batch_with_gso_delivers_separate_datagrams() {
        let config = MulticastConfig::loopback_v4(group_v4(4, port(4)));
        // 60 full segments exceed the bytes of one GSO send, so this takes two, the second
        // ending with the short one; then a lone odd size, then a run of small ones.
        let mut sizes = vec![1247; 60];
        sizes.push(300);
        sizes.push(1300);
        sizes.extend([40; 5]);
        let used_gso = send_and_check_batch(&config, &sizes);
        if gso_supported() {
            assert!(used_gso, "GSO stays on for loopback");
        } else {
            eprintln!("SKIPPED: GSO path: this kernel lacks UDP_SEGMENT; fallback tested");
        }
    }

    #[test]
    fn send_batch_fallback_delivers_separate_datagrams() {
        let mut config = MulticastConfig::loopback_v4(group_v4(5, port(5)));
        config.use_gso = false;
        let mut sizes = vec![1247; 20];
        sizes.push(17);
        let used_gso = send_and_check_batch(&config, &sizes);
        assert!(!used_gso);
    }

    #[test]
    fn gso_run_length_follows_the_kernel_rules() {
        let sizes = |sizes: &[usize]| segments(sizes);
        let run = |payloads: &[Vec<u8>]| {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            gso_run_length(&slices)
        };
        assert_eq!(run(&sizes(&[])), 0);
        assert_eq!(run(&sizes(&[100])), 1);
        assert_eq!(run(&sizes(&[100, 100, 100])), 3);
        assert_eq!(
            run(&sizes(&[100, 100, 50, 100])),
            3,
            "a shorter segment ends the run"
        );
        assert_eq!(
            run(&sizes(&[100, 100, 150])),
            2,
            "a longer one is not in it"
        );
        assert_eq!(run(&sizes(&[100, 0])), 1, "nor an empty one");
        assert_eq!(run(&sizes(&[0, 0])), 1);
        assert_eq!(run(&sizes(&[10; 100])), MAX_GSO_SEGMENTS);
        assert_eq!(run(&sizes(&[1247; 60])), MAX_GSO_BYTES / 1247);
    }

    #[test]
    fn non_multicast_group_rejected() {
        for group in ["127.0.0.1:5000", "10.1.2.3:5000", "[::1]:5000"] {
            let group: SocketAddr = group.parse().expect("address");
            let config = MulticastConfig::new(group);
            let error = MulticastSocket::receiver(&config).expect_err("receiver refused");
            assert!(matches!(error, SocketError::NotMulticast { group: g } if g == group));
            let bind = SocketAddr::new(group.ip(), 0);
            let error = MulticastSocket::sender(&config, bind).expect_err("sender refused");
            assert!(matches!(error, SocketError::NotMulticast { .. }));
            assert_eq!(
                error.to_string(),
                format!("group {group} is not a multicast address")
            );
        }
    }

    #[test]
    fn mismatched_families_rejected() {
        let group = group_v4(6, port(6));
        let mut config = MulticastConfig::new(group);
        config.interface = Interface::V6(1);
        assert!(matches!(
            config.validate(),
            Err(SocketError::InterfaceFamily { .. })
        ));
        let mut config = MulticastConfig::new(group);
        config.source = Some(Ipv6Addr::LOCALHOST.into());
        assert!(matches!(
            config.validate(),
            Err(SocketError::SourceFamily { .. })
        ));
        let config = MulticastConfig::new(group);
        let bind = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0);
        let error = MulticastSocket::sender(&config, bind).expect_err("bind family");
        assert!(matches!(error, SocketError::BindFamily { .. }));
        let mut config = MulticastConfig::new("[ff15::1]:5000".parse().expect("group"));
        config.source = Some("2001:db8::1".parse().expect("source"));
        assert!(matches!(
            config.validate(),
            Err(SocketError::SourceSpecificUnsupported { .. })
        ));
        let bind = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0);
        assert!(
            MulticastSocket::sender(&config, bind).is_ok(),
            "senders ignore the source"
        );
    }

    #[test]
    fn join_failure_names_group_and_interface() {
        let mut config = MulticastConfig::loopback_v4(group_v4(7, port(7)));
        // TEST-NET-1: no interface of this host has it.
        config.interface = Interface::V4(Ipv4Addr::new(192, 0, 2, 1));
        let error = MulticastSocket::receiver(&config).expect_err("join refused");
        let message = crate::report::Chain(&error).to_string();
        let expected = format!("join {} on 192.0.2.1: ", config.group.ip());
        assert!(message.starts_with(&expected), "{message}");
        assert!(matches!(
            error,
            SocketError::Io {
                operation: SocketOperation::Join,
                ..
            }
        ));
    }

    #[test]
    fn report_shows_granted_buffer_sizes() {
        let mut config = MulticastConfig::loopback_v4(group_v4(8, port(8)));
        config.recv_buffer_bytes = 256 * 1024;
        config.send_buffer_bytes = 128 * 1024;
        let (_receiver, report) = MulticastSocket::receiver(&config).expect("receiver");
        assert_eq!(report.recv_buffer.asked, 256 * 1024);
        assert!(report.recv_buffer.granted > 0);
        assert!(report.send_buffer.granted > 0);
        if cfg!(target_os = "linux") {
            assert_eq!(
                report.recv_buffer.kernel_value,
                2 * report.recv_buffer.granted
            );
        }
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok());
        if let Some(max) = max {
            if max >= 256 * 1024 {
                assert_eq!(report.recv_buffer.granted, 256 * 1024);
                assert!(!report.recv_buffer.is_short());
            }
            // Ask for more than the cap: the kernel grants the cap and the report says so.
            config.recv_buffer_bytes = max.saturating_mul(2);
            let (_receiver, report) = MulticastSocket::receiver(&config).expect("receiver");
            assert_eq!(report.recv_buffer.granted, max);
            assert!(report.recv_buffer.is_short() && report.has_shortfall());
            assert!(report.to_string().contains("net.core.rmem_max"), "{report}");
        } else {
            eprintln!("SKIPPED: shortfall check: no /proc/sys/net/core/rmem_max");
        }
    }

    #[test]
    fn source_specific_join_filters_other_sources() {
        let mut config = MulticastConfig::loopback_v4(group_v4(9, port(9)));
        config.source = Some(Ipv4Addr::LOCALHOST.into());
        let (receiver, _) = MulticastSocket::receiver(&config).expect("SSM receiver");
        let other_source = SocketAddr::new(Ipv4Addr::new(127, 0, 0, 2).into(), 0);
        let (other, _) = MulticastSocket::sender(&config, other_source).expect("other sender");
        let sender = loopback_sender(&config);
        other
            .send_to(b"from 127.0.0.2", config.group)
            .expect("send");
        sender
            .send_to(b"from 127.0.0.1", config.group)
            .expect("send");
        let received = receive_until(&receiver, |r| r.iter().any(|d| d == b"from 127.0.0.1"));
        assert_eq!(received, vec![b"from 127.0.0.1".to_vec()]);
    }

    #[test]
    fn sender_receives_unicast_replies() {
        let config = MulticastConfig::loopback_v4(group_v4(10, port(10)));
        let sender = loopback_sender(&config);
        let peer = loopback_sender(&config);
        let address = sender.local_addr().expect("local address");
        peer.send_to(b"NACK", address).expect("send");
        assert_eq!(receive(&sender, 1), vec![b"NACK".to_vec()]);
    }

    #[test]
    fn registers_with_mio_and_converts() {
        let config = MulticastConfig::loopback_v4(group_v4(11, port(11)));
        let (mut receiver, _) = MulticastSocket::receiver(&config).expect("receiver");
        let mut poll = mio::Poll::new().expect("poll");
        poll.registry()
            .register(&mut receiver, mio::Token(7), mio::Interest::READABLE)
            .expect("register");
        let sender = loopback_sender(&config);
        sender.send_to(b"wake", config.group).expect("send");
        let mut events = mio::Events::with_capacity(4);
        let deadline = Instant::now() + DEADLINE;
        let mut woken = false;
        while !woken && Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .expect("poll");
            woken = events
                .iter()
                .any(|e| e.token() == mio::Token(7) && e.is_readable());
        }
        assert!(woken);
        poll.registry()
            .deregister(&mut receiver)
            .expect("deregister");
        let plain = receiver.into_mio();
        let mut buf = [0u8; 16];
        assert_eq!(plain.recv_from(&mut buf).expect("receive").0, 4);
    }

    #[test]
    fn ipv6_site_local_group_on_loopback() {
        let group: SocketAddr =
            format!("[ff15::83:{:x}]:{}", std::process::id() % 0xffff, port(12))
                .parse()
                .expect("group");
        let mut config = MulticastConfig::new(group);
        config.interface = Interface::V6(1);
        config.loopback = true;
        let receiver = match MulticastSocket::receiver(&config) {
            Ok((receiver, _)) => receiver,
            Err(e) => {
                eprintln!("SKIPPED: IPv6 multicast on lo: receiver: {e}");
                return;
            }
        };
        let bind = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0);
        let sender = match MulticastSocket::sender(&config, bind) {
            Ok((sender, _)) => sender,
            Err(e) => {
                eprintln!("SKIPPED: IPv6 multicast on lo: sender: {e}");
                return;
            }
        };
        if let Err(e) = sender.send_to(b"probe", group) {
            eprintln!("SKIPPED: IPv6 multicast on lo: send: {e}");
            return;
        }
        let received = receive(&receiver, 1);
        if received.is_empty() {
            eprintln!("SKIPPED: IPv6 multicast on lo: nothing arrived (lo lacks IPv6 multicast)");
            return;
        }
        assert_eq!(received, vec![b"probe".to_vec()]);
        let payloads = segments(&[1200, 1200, 1200, 500]);
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        assert_eq!(sender.send_batch(group, &slices).expect("send_batch"), 4);
        assert_eq!(receive(&receiver, 4), payloads);
    }

    /// One quick measurement, not a test: `cargo test --release -p rekeycast --lib
    /// io::socket::tests::measure_send_batch_rate -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_send_batch_rate() {
        let config = MulticastConfig::loopback_v4(group_v4(13, port(13)));
        let (_receiver, _) = MulticastSocket::receiver(&config).expect("receiver");
        let sender = loopback_sender(&config);
        let payloads = segments(&[1247; MAX_GSO_BYTES / 1247]);
        let payloads: Vec<Vec<u8>> = payloads.into_iter().map(|p| p.to_vec()).collect();
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let total = 200_000;
        let rate = |send: &dyn Fn() -> usize| {
            let start = Instant::now();
            let mut sent = 0;
            while sent < total {
                sent += send();
            }
            sent as f64 / start.elapsed().as_secs_f64()
        };
        let plain = rate(&|| {
            let mut sent = 0;
            for slice in &slices {
                if sender.send_to(slice, config.group).is_ok() {
                    sent += 1;
                }
            }
            sent
        });
        let batched = rate(&|| sender.send_batch(config.group, &slices).unwrap_or(0));
        eprintln!(
            "1,247-byte datagrams to a loopback group, one receiver: send_to loop {plain:.0}/s, \
             send_batch {batched:.0}/s (GSO {}), ratio {:.2}",
            sender.gso_enabled(),
            batched / plain
        );
    }
}
