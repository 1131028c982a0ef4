//! The attacker's flood (`rekeycast-netns flood`): forged datagrams sent to the group as fast
//! as one socket can send them, bounded in count and in time.
//!
//! A fraction of the datagrams are random bytes; the others are well-formed symbol datagrams of
//! the group (the right magic, version, group id and SPI, sequence numbers spread over the
//! messages the run will send, a valid symbol header) with a random MAC trailer, so a member
//! gets as far as the MAC check with them and no further. Seeded, so a run can be repeated.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::wire::{BodyRepr, DatagramRepr, ObjectKind, SymbolRepr};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// What to send.
#[derive(Debug, Clone, PartialEq)]
pub struct FloodPlan {
    /// The group (or any address) to flood.
    pub to: SocketAddrV4,
    /// The address of the interface to send from.
    pub interface: Ipv4Addr,
    /// The group id of the well-formed datagrams.
    pub group_id: u32,
    /// Their SPI.
    pub spi: u32,
    /// Their sequence numbers are drawn from `seq_from..=seq_to`.
    pub seq_from: u64,
    /// The last sequence number drawn.
    pub seq_to: u64,
    /// The most datagrams sent.
    pub max_datagrams: u64,
    /// The longest the flood runs.
    pub max_duration: Duration,
    /// The fraction of random-byte datagrams.
    pub random_fraction: f64,
    /// The size of each datagram, in bytes (at least 64).
    pub size: usize,
    /// The seed of every random choice.
    pub seed: u64,
}

/// What the flood did, printed as one line of JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FloodReport {
    /// Datagrams the socket took.
    pub sent: u64,
    /// Of those, well-formed datagrams with a forged MAC.
    pub forged_mac: u64,
    /// Of those, random bytes.
    pub random: u64,
    /// Sends the socket refused (a full queue: `ENOBUFS`, `EAGAIN`), retried with the next.
    pub send_errors: u64,
    /// How long it ran, in milliseconds.
    pub elapsed_ms: u64,
    /// `sent` per second.
    pub rate_per_second: f64,
}

/// Why the flood could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FloodError {
    /// The socket could not be set up.
    #[error("flood socket: {0}")]
    Socket(#[from] std::io::Error),
    /// The plan is impossible.
    #[error("flood plan: {0}")]
    Plan(String),
    /// A forged datagram could not be written (a size below what a header needs).
    #[error("building a forged datagram: {0}")]
    Wire(#[from] rekeycast::wire::Error),
}

/// Sends the flood and reports what it sent.
pub fn flood(plan: &FloodPlan) -> Result<FloodReport, FloodError> {
    if plan.size < 64 || plan.size > 65_507 {
        return Err(FloodError::Plan(format!(
            "size {} is not within 64 to 65507",
            plan.size
        )));
    }
    if plan.seq_to < plan.seq_from {
        return Err(FloodError::Plan("seq_to is below seq_from".into()));
    }
    if !(0.0..=1.0).contains(&plan.random_fraction) {
        return Err(FloodError::Plan(format!(
            "random_fraction {} is not within 0 to 1",
            plan.random_fraction
        )));
    }
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_multicast_if_v4(&plan.interface)?;
    socket.set_multicast_ttl_v4(1)?;
    socket.set_multicast_loop_v4(false)?;
    socket.set_send_buffer_size(4 << 20)?;
    socket.bind(&SocketAddrV4::new(plan.interface, 0).into())?;
    let socket: UdpSocket = socket.into();
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    let mut report = FloodReport::default();
    let mut datagram = vec![0u8; plan.size];
    let mut data =
        vec![
            0u8;
            plan.size - rekeycast::wire::datagram::OVERHEAD - rekeycast::wire::symbol::FIXED_LEN
        ];
    let started = Instant::now();
    let deadline = started + plan.max_duration;
    let mut attempts = 0u64;
    // Bounded by max_datagrams attempts (sent or refused) and by the deadline.
    while attempts < plan.max_datagrams {
        if attempts % 256 == 0 && Instant::now() >= deadline {
            break;
        }
        attempts += 1;
        let random = rng.gen_bool(plan.random_fraction);
        if random {
            rng.fill(&mut datagram[..]);
        } else {
            rng.fill(&mut data[..]);
            let forged = DatagramRepr {
                group_id: plan.group_id,
                spi: plan.spi,
                seq: rng.gen_range(plan.seq_from..=plan.seq_to),
                body: BodyRepr::Symbol(SymbolRepr {
                    object: if rng.gen_bool(0.1) {
                        ObjectKind::Manifest
                    } else {
                        ObjectKind::Chunks
                    },
                    sbn: rng.gen_range(0..4),
                    esi: rng.gen_range(0..64),
                    data: &data,
                }),
                mac: rng.gen(),
            };
            let len = forged.emit(&mut datagram)?;
            debug_assert_eq!(len, plan.size);
        }
        match socket.send_to(&datagram, plan.to) {
            Ok(_) => {
                report.sent += 1;
                if random {
                    report.random += 1;
                } else {
                    report.forged_mac += 1;
                }
            }
            Err(_) => report.send_errors += 1,
        }
    }
    let elapsed = started.elapsed();
    report.elapsed_ms = elapsed.as_millis() as u64;
    report.rate_per_second = report.sent as f64 / elapsed.as_secs_f64().max(1e-9);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn plan(to: SocketAddrV4) -> FloodPlan {
        FloodPlan {
            to,
            interface: Ipv4Addr::LOCALHOST,
            group_id: 1,
            spi: 1,
            seq_from: 3,
            seq_to: 5,
            max_datagrams: 200,
            max_duration: Duration::from_secs(5),
            random_fraction: 0.25,
            size: 300,
            seed: 4,
        }
    }

    #[test]
    fn forged_datagrams_are_well_formed_and_bounded_by_count() {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
        receiver
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let SocketAddr::V4(to) = receiver.local_addr().expect("address") else {
            panic!("not IPv4");
        };
        let report = flood(&plan(to)).expect("flood");
        assert_eq!(report.sent + report.send_errors, 200);
        assert_eq!(report.sent, report.random + report.forged_mac);
        assert!(report.random > 20 && report.forged_mac > 100, "{report:?}");
        let mut buf = [0u8; 2048];
        let mut well_formed = 0;
        let mut received = 0;
        while let Ok((len, _)) = receiver.recv_from(&mut buf) {
            received += 1;
            assert_eq!(len, 300);
            if let Ok(parsed) = DatagramRepr::parse(&buf[..len]) {
                assert_eq!(parsed.group_id, 1);
                assert!((3..=5).contains(&parsed.seq));
                well_formed += 1;
            }
        }
        assert!(received > 150, "received {received}");
        assert!(well_formed >= received / 2, "{well_formed} of {received}");
    }

    #[test]
    fn the_deadline_bounds_the_flood() {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let SocketAddr::V4(to) = receiver.local_addr().expect("address") else {
            panic!("not IPv4");
        };
        let mut plan = plan(to);
        plan.max_datagrams = u64::MAX;
        plan.max_duration = Duration::from_millis(100);
        let started = Instant::now();
        let report = flood(&plan).expect("flood");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(report.sent > 0);
    }

    #[test]
    fn impossible_plans_are_refused() {
        let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9);
        let mut small = plan(to);
        small.size = 10;
        assert!(matches!(flood(&small), Err(FloodError::Plan(_))));
        let mut backwards = plan(to);
        backwards.seq_to = 1;
        assert!(matches!(flood(&backwards), Err(FloodError::Plan(_))));
    }
}
