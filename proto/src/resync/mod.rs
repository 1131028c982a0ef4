//! The sans-IO resync endpoints: one connection core ([`connection`]) that owns buffers,
//! deadlines, caps, counters and refusals, with a codec per protocol ([`http`], [`tcp`]), and
//! their limits ([`limits`]), serving from a [`ResyncSource`] (a GCKS's or a relay's history of signed
//! messages). Resync data is only ever what is already
//! signed and encrypted, so the endpoints authenticate nobody; they bound what a client can
//! cost instead (DESIGN.md, security rules: resync endpoints).
//!
//! This module owns no sockets and no clock: the engine's listeners read and write the bytes,
//! pass the time in, and serve from a [`ResyncSource`].

pub mod connection;
pub mod http;
pub mod limits;
pub mod tcp;

pub use limits::Refusal;

/// What a resync endpoint serves from: the GCKS's (or a relay's) history of signed messages.
pub trait ResyncSource {
    /// The group served.
    fn group_id(&self) -> u32;
    /// The latest message: (seq, signed manifest), if any was sent.
    fn latest(&self) -> Option<(u64, &[u8])>;
    /// The oldest sequence number still held, if any.
    fn oldest(&self) -> Option<u64>;
    /// The signed manifest of `seq`.
    fn manifest(&self, seq: u64) -> Lookup<&[u8]>;
    /// The chunk of `seq` that serves the leaf with order key `leaf` (the order key of a
    /// member's leaf is stable across splits: [`crate::lkh::Degree::order_key`]).
    fn chunk(&self, seq: u64, leaf: u32) -> Lookup<&[u8]>;
}

/// The outcome of a history lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<T> {
    /// The item.
    Found(T),
    /// The sequence number is older than the history window: the member must re-register.
    BeyondHistory {
        /// The oldest sequence number still held.
        oldest: u64,
    },
    /// The sequence number has not been sent yet.
    NotYetSent {
        /// The latest sequence number sent.
        latest: u64,
    },
    /// The message is held but has no such item (e.g. no chunk serves that leaf).
    NotFound,
}

impl<T> Lookup<T> {
    /// Maps the found item, keeping the other outcomes.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Lookup<U> {
        match self {
            Self::Found(item) => Lookup::Found(f(item)),
            Self::BeyondHistory { oldest } => Lookup::BeyondHistory { oldest },
            Self::NotYetSent { latest } => Lookup::NotYetSent { latest },
            Self::NotFound => Lookup::NotFound,
        }
    }
}

/// A [`ResyncSource`] over a vector of messages, for the tests of the endpoints.
#[cfg(test)]
pub(crate) mod test_source {
    use super::{Lookup, ResyncSource};

    /// One held message: its manifest and one chunk per leaf order key `0..chunks.len()`.
    pub(crate) struct Message {
        pub seq: u64,
        pub manifest: Vec<u8>,
        pub chunks: Vec<Vec<u8>>,
    }

    /// Messages `first..first + count` of group `group_id`, each with `leaves` chunks.
    pub(crate) struct VecSource {
        pub group_id: u32,
        pub messages: Vec<Message>,
    }

    impl VecSource {
        pub(crate) fn new(group_id: u32, first: u64, count: u64, leaves: u32) -> Self {
            let messages = (first..first + count)
                .map(|seq| Message {
                    seq,
                    manifest: format!("manifest-{seq}").into_bytes(),
                    chunks: (0..leaves)
                        .map(|leaf| format!("chunk-{seq}-{leaf}").into_bytes())
                        .collect(),
                })
                .collect();
            Self { group_id, messages }
        }

        fn find(&self, seq: u64) -> Lookup<&Message> {
            match (self.messages.first(), self.messages.last()) {
                (Some(first), Some(last)) => {
                    if seq < first.seq {
                        Lookup::BeyondHistory { oldest: first.seq }
                    } else if seq > last.seq {
                        Lookup::NotYetSent { latest: last.seq }
                    } else {
                        self.messages
                            .iter()
                            .find(|m| m.seq == seq)
                            .map_or(Lookup::NotFound, Lookup::Found)
                    }
                }
                _ => Lookup::NotYetSent { latest: 0 },
            }
        }
    }

    impl ResyncSource for VecSource {
        fn group_id(&self) -> u32 {
            self.group_id
        }
        fn latest(&self) -> Option<(u64, &[u8])> {
            self.messages.last().map(|m| (m.seq, m.manifest.as_slice()))
        }
        fn oldest(&self) -> Option<u64> {
            self.messages.first().map(|m| m.seq)
        }
        fn manifest(&self, seq: u64) -> Lookup<&[u8]> {
            self.find(seq).map(|m| m.manifest.as_slice())
        }
        fn chunk(&self, seq: u64, leaf: u32) -> Lookup<&[u8]> {
            match self.find(seq) {
                Lookup::Found(m) => m
                    .chunks
                    .get(leaf as usize)
                    .map_or(Lookup::NotFound, |c| Lookup::Found(c.as_slice())),
                other => other.map(|m| m.manifest.as_slice()),
            }
        }
    }
}
