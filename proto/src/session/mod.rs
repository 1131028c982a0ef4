//! Rekey messages and the protocol sessions that carry them.
//!
//! This module owns the layout of a rekey message (its signed manifest and its chunks) and the
//! sans-IO sender and receiver sessions that deliver it. It owns no socket, clock or thread:
//! every input takes the time as an argument and every output is polled (quinn-proto style).
//!
//! - [`manifest`]: the signed manifest of a rekey message.
//! - [`chunk`]: the chunk container (header, payload, Merkle path or signature, padding).
//! - [`layout`]: user-oriented key assignment: a batch's wraps packed into chunks, one chunk
//!   per member, and the GCKS's whole message build (layout, authentication, signing).
//! - [`sender`]: [`SenderSession`], the GCKS side of one group: manifest, source symbols,
//!   proactive and NACK-driven repair, heartbeats, history for repair and resync.
//! - [`chunk_repair`]: which unicast chunk requests a sender answers (per-source rate limits).
//! - [`feedback`]: replay protection of the NACKs and probe replies a sender takes.
//! - [`unicast`]: multi-unicast members: delivery, acknowledgement, retransmission.
//! - [`receiver`]: [`ReceiverSession`], one member: the verifier pipeline, FEC decoding of its
//!   own block, NACK scheduling, key events.

pub mod chunk;
pub mod chunk_repair;
pub mod feedback;
pub mod layout;
pub mod manifest;
pub mod receiver;
pub mod sender;
pub mod stored;
pub mod unicast;

pub use receiver::{
    DropFilter, ReceiverConfig, ReceiverCounters, ReceiverEvent, ReceiverSession, ReregisterReason,
};
pub use sender::{PreparedMessage, SenderConfig, SenderCounters, SenderSession};
pub use stored::StoredMessage;

use std::net::SocketAddr;

/// Where a datagram a session wants sent goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// To the group's multicast address (every member but the sender).
    Group,
    /// To one address (a NACK or probe reply to the sender or relay).
    Unicast(SocketAddr),
}

/// A datagram a session wants sent: the first `len` bytes of the buffer handed to its
/// `poll_transmit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// Where it goes.
    pub destination: Destination,
    /// Its length in bytes.
    pub len: usize,
}

/// A configuration value a session cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field is out of its valid range.
    #[error("invalid configuration: {field} {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The NACK configuration is invalid.
    #[error(transparent)]
    Nack(#[from] rekeycast_nack::ConfigError),
}

/// Emits `repr` into `buf`, seals it with `key` and returns its length, or `None` if `buf` is
/// too small (the caller counts that). This is how every session seals what it sends; test
/// kits and forgers seal with it too.
pub fn seal_into(
    repr: &crate::wire::DatagramRepr<'_>,
    key: &crate::auth::mac::MacKey,
    buf: &mut [u8],
) -> Option<usize> {
    let len = repr.emit(buf).ok()?;
    let mut packet = crate::wire::Packet::new_checked(&mut buf[..len]).ok()?;
    key.seal(&mut packet);
    Some(len)
}

/// Whole microseconds of `duration`, saturating.
pub fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
