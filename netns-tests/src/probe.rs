//! A one-datagram multicast probe: the sending and receiving ends that the first netns test
//! runs inside two namespaces, through socket2 multicast sockets.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Opens a UDP socket bound to `port` that joined `group` on the interface with address
/// `interface`.
pub fn receiver(group: Ipv4Addr, port: u16, interface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    socket.join_multicast_v4(&group, &interface)?;
    Ok(socket.into())
}

/// Waits up to `timeout` for one datagram and returns its bytes.
pub fn receive_one(socket: &UdpSocket, timeout: Duration) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((len, _)) => return Ok(buf[..len].to_vec()),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Sends `payload` to `group:port` out of the interface with address `interface`, TTL 1.
pub fn send(
    group: Ipv4Addr,
    port: u16,
    interface: Ipv4Addr,
    payload: &[u8],
) -> std::io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_multicast_if_v4(&interface)?;
    socket.set_multicast_ttl_v4(1)?;
    socket.set_multicast_loop_v4(false)?;
    let socket: UdpSocket = socket.into();
    let sent = socket.send_to(payload, SocketAddrV4::new(group, port))?;
    if sent != payload.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            payload.len()
        )));
    }
    Ok(())
}
