//! Fixtures the crate's unit tests share: a GCKS made of a key tree, its signing key and a
//! sender session; sealed datagrams; and the step that moves a virtual clock to the next
//! deadline.

// Test helpers unwrap: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Instant;

use ed25519_dalek::SigningKey;

use crate::auth::mac::MacKey;
use crate::endpoint::Endpoint;
use crate::gsa::{RekeySa, WrapAlgorithm};
use crate::lkh::{Degree, KeyRng, KeyTree, MemberId, RekeyBatch};
use crate::relay::RelaySession;
use crate::session::layout::{build_message, MessageParams};
use crate::session::seal_into;
use crate::session::sender::{PreparedMessage, SenderConfig, SenderSession};
use crate::wire::{self, BodyRepr, DatagramRepr};

/// Address `198.18.0.<last>:<port>` (the benchmarking range: never a real peer).
pub(crate) fn test_addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, last], port))
}

/// What runs on timers: a session or an endpoint, seen by a virtual clock.
pub(crate) trait Timed {
    /// When it next wants [`Timed::handle_timeout`].
    fn poll_timeout(&self) -> Option<Instant>;
    /// Its timers at `now`.
    fn handle_timeout(&mut self, now: Instant);
}

impl<E: Endpoint> Timed for E {
    fn poll_timeout(&self) -> Option<Instant> {
        Endpoint::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant) {
        Endpoint::handle_timeout(self, now);
    }
}

impl Timed for RelaySession {
    fn poll_timeout(&self) -> Option<Instant> {
        RelaySession::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant) {
        RelaySession::handle_timeout(self, now);
    }
}

/// A GCKS without a network: its key tree, its signing key and its sender session.
pub(crate) struct TestGcks {
    /// The key tree (degree 4, AES-256-GCM wraps, a seeded RNG).
    pub(crate) tree: KeyTree,
    /// The key that signs its messages.
    pub(crate) signing_key: SigningKey,
    /// The sender session its messages are queued at.
    pub(crate) sender: SenderSession,
    /// The group's SPI.
    pub(crate) spi: u32,
}

impl TestGcks {
    /// The GCKS of group `group_id` (SPI `spi`): its signing key all bytes `key_seed`, its tree's
    /// RNG seeded with `rng_seed`, its sender configured by `config`. Returns it with the first
    /// batch, which admits members 1 to `members` and is not queued yet.
    pub(crate) fn new(
        group_id: u32,
        spi: u32,
        (key_seed, rng_seed): (u8, u64),
        members: u64,
        config: SenderConfig,
        now: Instant,
    ) -> (Self, RekeyBatch) {
        let signing_key = SigningKey::from_bytes(&[key_seed; 32]);
        let sa = RekeySa {
            group_id,
            spi,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::new(4).unwrap(),
            gcks_public_key: signing_key.verifying_key(),
            data_sa_lifetime_secs: 3600,
        };
        let mut tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(rng_seed));
        let joins: Vec<MemberId> = (1..=members).map(MemberId).collect();
        let first = tree.apply_batch(&joins, &[]).unwrap();
        let sender = SenderSession::new(config, group_id, spi, now).unwrap();
        let gcks = Self {
            tree,
            signing_key,
            sender,
            spi,
        };
        (gcks, first)
    }

    /// Lays out, signs and queues `batch`'s message at the sender.
    pub(crate) fn queue(&mut self, now: Instant, batch: &RekeyBatch) {
        let params = MessageParams {
            spi: self.spi,
            ..MessageParams::default()
        };
        let built = build_message(
            batch,
            &self.tree.leaves_in_order(),
            &self.signing_key,
            &params,
        )
        .unwrap();
        let prepared = PreparedMessage::new(built, batch.mac_key.clone()).unwrap();
        self.sender.queue_message(now, prepared).unwrap();
    }

    /// The virtual clock's step once nothing is left to send: moves `now` on to the earliest
    /// of the sender's and `peer`'s deadlines (when that is by `end`), hands both their
    /// timeout, and returns true. With no deadline by `end`, moves `now` to `end` and returns
    /// false: the run is over.
    pub(crate) fn wait_for_timers(
        &mut self,
        now: &mut Instant,
        end: Instant,
        peer: &mut impl Timed,
    ) -> bool {
        if !advance_to_deadline(now, end, [self.sender.poll_timeout(), peer.poll_timeout()]) {
            return false;
        }
        self.sender.handle_timeout(*now);
        peer.handle_timeout(*now);
        true
    }

    /// Applies a batch in which `joins` join and `leaves` leave, and queues its message.
    pub(crate) fn rekey(&mut self, now: Instant, joins: &[u64], leaves: &[u64]) {
        let joins: Vec<MemberId> = joins.iter().copied().map(MemberId).collect();
        let leaves: Vec<MemberId> = leaves.iter().copied().map(MemberId).collect();
        let batch = self.tree.apply_batch(&joins, &leaves).unwrap();
        self.queue(now, &batch);
    }
}

/// A datagram of group `group_id` (SPI `spi`) claiming message `seq`, with `body`, sealed
/// under `key`.
pub(crate) fn sealed(
    (group_id, spi): (u32, u32),
    seq: u64,
    body: BodyRepr<'_>,
    key: &MacKey,
) -> Vec<u8> {
    let repr = DatagramRepr {
        group_id,
        spi,
        seq,
        body,
        mac: [0; wire::datagram::MAC_LEN],
    };
    let mut buf = vec![0u8; 2048];
    let len = seal_into(&repr, key, &mut buf).unwrap();
    buf.truncate(len);
    buf
}

/// Moves a virtual clock `now` on to the earliest of `deadlines` (never back) when that is
/// at or before `end`, and returns true: the caller hands its endpoints the timeout. With no
/// deadline by `end`, moves it to `end` and returns false: the run is over.
pub(crate) fn advance_to_deadline(
    now: &mut Instant,
    end: Instant,
    deadlines: impl IntoIterator<Item = Option<Instant>>,
) -> bool {
    match deadlines.into_iter().flatten().min() {
        Some(at) if at <= end => {
            *now = (*now).max(at);
            true
        }
        _ => {
            *now = end;
            false
        }
    }
}
