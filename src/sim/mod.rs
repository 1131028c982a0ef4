//! A deterministic, seeded, discrete-event network simulator for sans-IO endpoints.
//!
//! This module owns the simulated network that scenario tests and benchmarks run rekeycast's
//! sans-IO cores over, in the manner of quinn-proto's `tests/util.rs` and s2n-quic's network
//! model: a star topology (every node has an uplink to an impairment switch and a downlink from
//! it), per-link loss models ([`Loss`]: independent or Gilbert-Elliott, the workspace's one model
//! from [`rekeycast_nack::loss`]), fixed delay, jitter, explicit reordering, duplication,
//! single-bit corruption and outages ([`LinkConfig`]), virtual time and counters
//! ([`NetworkStats`], [`NodeStats`]). It drives anything that implements [`Node`];
//! [`Destination`] and [`Transmit`] are the plain types a node's `poll_transmit` returns.
//! [`endpoint::EndpointNode`] makes any sans-IO endpoint of `rekeycast-proto` (the GCKS,
//! member and relay endpoints the engine's driver runs) such a node, doing in virtual time
//! what the driver does with sockets, workers, files and resync connections; the rekey
//! scenarios of [`rekey`] run on it.
//!
//! What it must not do: depend on the session, auth or key-tree types (it is generic over
//! [`Node`] so that those layers can be tested with it, not the other way round); read the
//! clock other than once, at construction (all time is virtual: the start instant plus a
//! duration); use any randomness that is not derived from the network's one seed; open sockets
//! or spawn threads; scan all nodes per event (it must scale to a million nodes); panic on
//! anything a node or a configuration can do.
//!
//! Determinism: a [`Network`] built with the same seed, the same nodes (added in the same order
//! with the same link configurations) and driven by the same calls produces the same
//! deliveries in the same order, bit for bit. Each link draws from its own
//! [`rand_chacha::ChaCha8Rng`] derived from (seed, node index, direction), so adding a node does
//! not change the draws of the links of the others.

pub mod endpoint;
mod link;
mod network;
pub mod rekey;

#[cfg(test)]
mod lifetime_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::Instant;

pub use link::{LinkConfig, MAX_LINK_DELAY};
// The workspace's one loss model (also the NACK simulator's and the netns switch's).
pub use network::{
    Network, NetworkConfig, NetworkStats, NodeId, NodeStats, MAX_NODES, MAX_TIMER_REFIRES,
    NODE_PORT,
};
pub use rekeycast_nack::loss::{Loss, LossError, LossModel};

// The sessions' own types: a session is a `Node` with no conversion.
pub use crate::session::{Destination, Transmit};

/// A sans-IO endpoint the simulator drives.
///
/// The simulator calls the input methods (`handle_datagram`, `handle_timeout`) with the
/// virtual time, then drains `poll_transmit` until it returns `None`, then reads
/// `poll_timeout` once more. The same order a real driver uses.
pub trait Node {
    /// A datagram arrived at `now` from `from` (the sender's address).
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]);
    /// The deadline last returned by [`Node::poll_timeout`] passed; `now` is at or after it.
    fn handle_timeout(&mut self, now: Instant);
    /// The next datagram to send, written at the start of `buf`, or `None` when there is none.
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit>;
    /// When [`Node::handle_timeout`] should next be called, if at all.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Which tagged datagrams the node would drop unread (see [`Interest`]); read after every
    /// interaction, as [`Node::poll_timeout`]. A network that filters deliveries
    /// ([`Network::filter_deliveries`]) does not deliver those. The default takes everything.
    fn interest(&self) -> Interest {
        Interest::All
    }
}

/// What a network that filters deliveries knows of a datagram, from its classifier
/// ([`Classifier`]): a datagram of a numbered message in a stream, of one block of it or of
/// none (a datagram every receiver of the message takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    /// The stream (for rekeycast: the group id and the SPI).
    pub stream: u64,
    /// The message's sequence number in the stream.
    pub seq: u64,
    /// The block of the message it belongs to; `None`: every receiver of the message takes it.
    pub block: Option<u8>,
}

/// Classifies a datagram's bytes for delivery filtering: `None` for a datagram every node
/// takes.
pub type Classifier = fn(&[u8]) -> Option<Tag>;

/// Which tagged datagrams a node takes; untagged ones it always takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Interest {
    /// Every datagram.
    #[default]
    All,
    /// Of stream `stream`: nothing of a message before `seq`; of message `seq`, the datagrams
    /// of block `block` and those of no block (when `block` is `None`, all of it); every
    /// later message. Every datagram of other streams.
    From {
        /// The stream it filters.
        stream: u64,
        /// The first message it takes.
        seq: u64,
        /// The one block of message `seq` it takes, if it knows which.
        block: Option<u8>,
    },
}

impl Interest {
    /// Whether a node with this interest takes a datagram tagged `tag`.
    pub fn takes(&self, tag: &Tag) -> bool {
        match *self {
            Self::All => true,
            Self::From { stream, seq, block } => {
                if tag.stream != stream || tag.seq > seq {
                    true
                } else if tag.seq < seq {
                    false
                } else {
                    match (block, tag.block) {
                        (Some(own), Some(other)) => own == other,
                        _ => true,
                    }
                }
            }
        }
    }
}

/// Everything that can be wrong with a simulator configuration or call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A configuration field holds a value outside its range (named in the message).
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// What its value must satisfy.
        reason: &'static str,
    },
    /// No node was ever added with this id.
    #[error("no node with id {0}")]
    UnknownNode(NodeId),
    /// Every node address (198.18.0.0/15, then 100.64.0.0/10) is taken: at most
    /// [`MAX_NODES`] nodes.
    #[error("address space exhausted: at most {MAX_NODES} nodes")]
    TooManyNodes,
}

impl From<LossError> for SimError {
    fn from(_: LossError) -> Self {
        Self::InvalidConfig {
            field: "loss",
            reason: "probabilities must be finite and in [0, 1]",
        }
    }
}
