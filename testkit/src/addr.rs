//! Addresses for tests: multicast groups and ports derived from the process id, and loopback
//! sockets.
//!
//! A group is `239.<suite>.<salt>.<pid as u8>` on port `20_000 + (pid % 1_400) * 32 + salt`:
//! `suite` tells test binaries apart, `salt` the tests (or tiers) of one binary, and the pid
//! tells apart concurrent runs of the same binary. Ports stay below 64,800, and within one
//! process every (suite, salt) pair gets its own group and port.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

/// The most salts a suite has: ports `0..SALTS` past the process's base port.
pub const SALTS: u8 = 32;

/// The multicast group and port of test `salt` of suite `suite` in this process.
///
/// # Panics
/// When `salt` is [`SALTS`] or more (ports would overlap another process's).
pub fn multicast_group(suite: u8, salt: u8) -> SocketAddr {
    assert!(salt < SALTS, "salt {salt} must be below {SALTS}");
    let pid = std::process::id();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, suite, salt, pid as u8),
        port(salt),
    ))
}

/// A fixed port of this process (for configuration files that must name one before the
/// process binds it): slot `k` below [`SALTS`], apart from other processes' slots.
pub fn port(k: u8) -> u16 {
    assert!(k < SALTS, "slot {k} must be below {SALTS}");
    let pid = std::process::id();
    20_000 + (pid % 1_400) as u16 * u16::from(SALTS) + u16::from(k)
}

/// 127.0.0.1 port 0: a loopback address for the system to pick a port.
pub fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A UDP socket on loopback that sends to loopback multicast groups (`IP_MULTICAST_IF`
/// 127.0.0.1, loop on), as the engines' loopback configurations listen.
pub fn multicast_sender() -> UdpSocket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    socket.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    socket.set_multicast_loop_v4(true).unwrap();
    socket.bind(&localhost().into()).unwrap();
    socket.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_of_one_process_differ_by_suite_and_salt() {
        let a = multicast_group(78, 1);
        assert_ne!(a, multicast_group(78, 2));
        assert_ne!(a.ip(), multicast_group(79, 1).ip());
        assert!(a.ip().is_multicast());
        assert!(multicast_group(1, SALTS - 1).port() < 64_800);
        assert_eq!(port(3), multicast_group(9, 3).port());
    }

    #[test]
    #[should_panic(expected = "must be below")]
    fn a_salt_past_the_slots_is_refused() {
        let _ = multicast_group(1, SALTS);
    }
}
