//! Bounded UDP test traffic for the switch's netns tests: `udp-blast` sends numbered datagrams
//! whose bytes the receiving end can check, `udp-count` receives them and reports how many
//! arrived, how many distinct, and how many intact or with exactly one bit flipped.
//!
//! A datagram's payload is its sequence number (8 bytes, big-endian), its complement (8
//! bytes), then the byte pattern `(i * 31 + 7) mod 256` for payload offset `i`. Any single bit
//! flip shows: in the pattern directly, in the header as a sequence number that is not the
//! complement of the second field.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// The smallest datagram `udp-blast` sends: the two header fields.
pub const HEADER: usize = 16;

/// The most distinct sequence numbers `udp-count` remembers (later ones are still counted,
/// only not told apart), so memory stays bounded whatever arrives.
pub const MAX_TRACKED: usize = 1 << 20;

/// What `udp-blast` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blast {
    /// Where to: a unicast address or a multicast group, and a port.
    pub to: SocketAddrV4,
    /// The address of the interface to send from (also the multicast interface).
    pub interface: Ipv4Addr,
    /// How many datagrams.
    pub count: u64,
    /// The first sequence number.
    pub first_sequence: u64,
    /// Each datagram's size in bytes, at least [`HEADER`].
    pub size: usize,
    /// The pause between two datagrams (zero: as fast as the socket takes them).
    pub interval: Duration,
}

/// What `udp-blast` reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlastReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams the socket refused (for example a full send buffer).
    pub send_errors: u64,
    /// How long sending took, in seconds.
    pub seconds: f64,
}

/// What `udp-count` listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// The UDP port to bind.
    pub port: u16,
    /// The address of the interface to join the group on.
    pub interface: Ipv4Addr,
    /// The group to join, if any.
    pub group: Option<Ipv4Addr>,
    /// Stop after this many datagrams.
    pub expect: u64,
    /// Stop when nothing arrived for this long after the first datagram.
    pub idle: Duration,
    /// Stop after this long in any case.
    pub timeout: Duration,
}

/// What `udp-count` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountReport {
    /// Datagrams received.
    pub received: u64,
    /// Distinct sequence numbers among the datagrams with an intact header and at most one
    /// bit flipped.
    pub distinct: u64,
    /// Datagrams exactly as sent.
    pub intact: u64,
    /// Datagrams with exactly one bit flipped.
    pub one_bit_flipped: u64,
    /// Datagrams with more bits flipped, or of the wrong size.
    pub other: u64,
    /// Datagrams that arrived after one with a larger sequence number.
    pub out_of_order: u64,
    /// Sequence numbers missing between the smallest and the largest received (losses before
    /// the first or after the last arrival are not seen).
    pub missing: u64,
    /// Runs of consecutive missing sequence numbers among them: `missing / missing_runs` is
    /// the mean loss burst length.
    pub missing_runs: u64,
    /// The smallest sequence number received, if any.
    pub min_sequence: Option<u64>,
    /// The largest sequence number received, if any.
    pub max_sequence: Option<u64>,
}

/// The payload of datagram `sequence`, `size` bytes (at least [`HEADER`]).
pub fn payload(sequence: u64, size: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size.max(HEADER));
    bytes.extend_from_slice(&sequence.to_be_bytes());
    bytes.extend_from_slice(&(!sequence).to_be_bytes());
    bytes.extend((HEADER..size).map(pattern));
    bytes
}

fn pattern(offset: usize) -> u8 {
    // The modulo makes the truncation exact.
    ((offset * 31 + 7) % 256) as u8
}

/// How many bits of `bytes` differ from a datagram as sent, and its sequence number when the
/// header is intact (with a bit flipped in the header, either field may be the wrong one), or
/// `None` when it is shorter than the header.
pub fn flipped_bits(bytes: &[u8]) -> Option<(u32, Option<u64>)> {
    let first: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let second: [u8; 8] = bytes.get(8..HEADER)?.try_into().ok()?;
    let sequence = u64::from_be_bytes(first);
    let header_bits = (sequence ^ !u64::from_be_bytes(second)).count_ones();
    let body_bits: u32 = bytes[HEADER..]
        .iter()
        .enumerate()
        .map(|(i, &byte)| (byte ^ pattern(HEADER + i)).count_ones())
        .sum();
    Some((
        header_bits + body_bits,
        (header_bits == 0).then_some(sequence),
    ))
}

/// Sends the datagrams of `blast` (broadcast addresses allowed).
pub fn blast(blast: &Blast) -> std::io::Result<BlastReport> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_broadcast(true)?;
    socket.bind(&SocketAddrV4::new(blast.interface, 0).into())?;
    if blast.to.ip().is_multicast() {
        socket.set_multicast_if_v4(&blast.interface)?;
        socket.set_multicast_ttl_v4(1)?;
        socket.set_multicast_loop_v4(false)?;
    }
    let socket: UdpSocket = socket.into();
    let started = Instant::now();
    let mut report = BlastReport {
        sent: 0,
        send_errors: 0,
        seconds: 0.0,
    };
    let size = blast.size.max(HEADER);
    for i in 0..blast.count {
        let bytes = payload(blast.first_sequence.wrapping_add(i), size);
        match socket.send_to(&bytes, blast.to) {
            Ok(_) => report.sent += 1,
            Err(_) => report.send_errors += 1,
        }
        if !blast.interval.is_zero() {
            // Paced against the start, so sleeping late does not slow the whole blast.
            let due = blast
                .interval
                .saturating_mul(u32::try_from(i + 1).unwrap_or(u32::MAX));
            let left = due.saturating_sub(started.elapsed());
            if !left.is_zero() {
                std::thread::sleep(left);
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Opens the receiving socket of `count`: bound to its port on any address, joined to its
/// group when one is given.
pub fn count_socket(count: &Count) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    // As large as the system allows, so bursts are not lost in the receiver itself.
    let _ = socket.set_recv_buffer_size(8 << 20);
    // Bound to any address, so unicast, broadcast and the group's datagrams all arrive.
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, count.port).into())?;
    if let Some(group) = count.group {
        socket.join_multicast_v4(&group, &count.interface)?;
    }
    Ok(socket.into())
}

/// Receives on `socket` until `count.expect` datagrams arrived, nothing arrived for
/// `count.idle` after the first, or `count.timeout` passed.
pub fn count(socket: &UdpSocket, count: &Count) -> std::io::Result<CountReport> {
    let started = Instant::now();
    let mut report = CountReport::default();
    let mut seen = HashSet::new();
    let mut last = None::<Instant>;
    let mut buffer = vec![0u8; 65_536];
    while report.received < count.expect {
        let mut deadline = started + count.timeout;
        if let Some(last) = last {
            deadline = deadline.min(last + count.idle);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left))?;
        let length = match socket.recv_from(&mut buffer) {
            Ok((length, _)) => length,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(error) => return Err(error),
        };
        last = Some(Instant::now());
        report.received += 1;
        match flipped_bits(&buffer[..length]) {
            Some((flipped @ (0 | 1), sequence)) => {
                if flipped == 0 {
                    report.intact += 1;
                } else {
                    report.one_bit_flipped += 1;
                }
                if let Some(sequence) = sequence {
                    if seen.len() < MAX_TRACKED && seen.insert(sequence) {
                        report.distinct += 1;
                    }
                    if report.max_sequence.is_some_and(|max| sequence < max) {
                        report.out_of_order += 1;
                    }
                    report.min_sequence =
                        Some(report.min_sequence.map_or(sequence, |m| m.min(sequence)));
                    report.max_sequence =
                        Some(report.max_sequence.map_or(sequence, |m| m.max(sequence)));
                }
            }
            Some(_) | None => report.other += 1,
        }
    }
    let mut sequences: Vec<u64> = seen.into_iter().collect();
    sequences.sort_unstable();
    for pair in sequences.windows(2) {
        let gap = pair[1] - pair[0] - 1;
        if gap > 0 {
            report.missing += gap;
            report.missing_runs += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_single_bit_flip_is_recognized_with_its_sequence() {
        let sent = payload(0x0102_0304_0506_0708, 64);
        let sequence = 0x0102_0304_0506_0708;
        assert_eq!(flipped_bits(&sent), Some((0, Some(sequence))));
        for bit in 0..sent.len() * 8 {
            let mut bytes = sent.clone();
            bytes[bit / 8] ^= 0x80 >> (bit % 8);
            let expected = (bit >= HEADER * 8).then_some(sequence);
            assert_eq!(flipped_bits(&bytes), Some((1, expected)), "bit {bit}");
        }
        let mut two = sent.clone();
        two[20] ^= 0x11;
        assert_eq!(flipped_bits(&two).map(|(flipped, _)| flipped), Some(2));
        assert_eq!(flipped_bits(&sent[..15]), None);
    }
}
