//! Hostile clients of the resync endpoints: many loopback source addresses, connections from
//! a chosen one, TCP request frames, and the open-file limit a connection flood needs. Shared
//! by the hostile-client tests and the `resync-attacks` benchmark.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use rekeycast::wire::frame::FrameRepr;

/// How long [`connect_from`] waits for the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Raises the soft limit of open files towards `wanted`; returns what it could get.
pub fn raise_nofile(wanted: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let target = wanted.min(hard);
    if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        return target;
    }
    soft
}

/// Attacker source address `n`: 127.(1 + n / 250).0.(1 + n % 250), a loopback address of its
/// own for each `n` below 62,750 (apart from 127.0.0.0/16, where members and servers are).
pub fn attacker(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (n / 250) as u8, 0, 1 + (n % 250) as u8)
}

/// A blocking connection to `to` from `from` (bound before connecting), within
/// [`CONNECT_TIMEOUT`].
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((from, 0)).into())?;
    socket.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
    Ok(socket.into())
}

/// The bytes of a TCP resync frame.
pub fn frame(frame: &FrameRepr<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; frame.buffer_len()];
    let len = frame
        .emit(&mut buf)
        .expect("a frame fits in its buffer_len");
    buf.truncate(len);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacker_addresses_are_distinct_loopback_addresses_outside_127_0() {
        let addresses: std::collections::BTreeSet<Ipv4Addr> = (0..2_000).map(attacker).collect();
        assert_eq!(addresses.len(), 2_000);
        assert!(addresses
            .iter()
            .all(|a| a.is_loopback() && a.octets()[1] != 0));
    }

    #[test]
    fn a_state_request_frame_is_emitted_whole() {
        let bytes = frame(&FrameRepr::StateRequest { group_id: 7 });
        let parsed = FrameRepr::parse(&bytes);
        assert!(
            matches!(parsed, Ok(FrameRepr::StateRequest { group_id: 7 })),
            "{parsed:?}"
        );
    }
}
