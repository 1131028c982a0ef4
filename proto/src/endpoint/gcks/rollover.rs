//! Signing-key rollover: the GCKS replaces its Ed25519 signing key (RFC 4046 section 3,
//! requirements 9 and 11: updating the Rekey SA, recovering from a compromised key).
//!
//! # Planned rollover
//!
//! [`GcksEndpoint::roll_signing_key`] with [`RolloverMode::Planned`] announces the next key in
//! the manifests of the next `announcements` messages, signed with the current key
//! ([`crate::session::manifest::KeyRollover`]); the message after them, `from_seq`, and every
//! later one are signed with the next key. The endpoint asks for a rekey (a refresh, if no
//! membership change waits) after each announcing message, so the rollover does not wait for
//! churn. The old key signs nothing from `from_seq` on: the announcing messages are its
//! deactivation delay, during which a member that lost one announcement hears another. A
//! member that missed them all fetches them from the history by resync (they are signed with
//! the key it trusts) before it needs the new key; beyond the history it re-registers.
//!
//! # Compromised-key rollover
//!
//! With [`RolloverMode::Compromised`] the old key may be in an attacker's hands, so nothing it
//! signs can vouch for the new one: no announcement is made, and the next message is signed
//! with the new key. A member sees a manifest naming a key it was never told of; it takes that
//! as an out-of-sync signal (multicast can be forged by an insider), fetches the message it
//! needs next from a resync endpoint, finds it signed with the unknown key after every
//! earlier message was applied, and is told to re-register
//! (`session::ReregisterReason::UnknownSigningKey`): the registration protocol, authenticated
//! by other means, hands it a bundle naming the new key. No member ever trusts the new key
//! from the network alone. The same holds for a member that missed every announcement of a
//! planned rollover and whose resync cannot serve them.
//!
//! # Restart safety
//!
//! The announcement is part of each announcing message's signed manifest, which is stored
//! (with the tree) before the message is sent; the tree stored with the first message under
//! the new key names the new key. So the stored state says, by itself, whether a rollover
//! was announced ([`GcksEndpoint::announced_rollover`]) and which key signs next
//! ([`RekeySa::gcks_public_key`] of the stored tree). The driver writes the next key's file
//! before it calls [`GcksEndpoint::roll_signing_key`] and replaces the current key's file with
//! it only after [`GcksEvent::SigningKeyRolled`] (the first message under it is stored); after
//! a crash it matches its key files to the stored state (the engine's `keyfile` module) and
//! resumes an announced rollover with [`GcksEndpoint::resume_rollover`].
//!
//! [`RekeySa::gcks_public_key`]: crate::gsa::RekeySa::gcks_public_key

use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::SigningKey;

use super::{GcksEndpoint, GcksEvent, Op};
use crate::session::manifest::{KeyId, KeyRollover, SignedManifest};

/// How the GCKS replaces its signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloverMode {
    /// The next key is announced, under the current one, in the next `announcements`
    /// messages (at least 1); the message after them is the first under the next key.
    Planned {
        /// How many messages carry the announcement.
        announcements: u32,
    },
    /// The current key may be compromised: no announcement; the next message is signed with
    /// the next key, and every member re-registers to learn it.
    Compromised,
}

impl RolloverMode {
    /// The planned rollover's default: three announcing messages.
    pub const DEFAULT_PLANNED: RolloverMode = RolloverMode::Planned { announcements: 3 };
}

/// Why a rollover could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RolloverError {
    /// A rollover is under way: its first message under the next key is `from_seq`.
    #[error("a signing-key rollover is under way (the next key signs from message {from_seq})")]
    InProgress {
        /// The first message under the next key.
        from_seq: u64,
    },
    /// The next key is the current key.
    #[error("the next signing key is the current one")]
    SameKey,
    /// A planned rollover needs at least one announcing message.
    #[error("a planned rollover needs at least one announcing message")]
    NoAnnouncement,
    /// The endpoint is stopped or poisoned: it builds no more messages.
    #[error("the GCKS is stopped")]
    Stopped,
    /// [`GcksEndpoint::resume_rollover`]: the latest stored message announces no rollover, or
    /// announces another key than the one given.
    #[error("the stored messages announce no rollover to this key")]
    NotAnnounced,
}

/// A rollover under way.
#[derive(Debug, Clone)]
pub(super) struct Rollover {
    pub(super) next: Arc<SigningKey>,
    /// The first sequence number signed with `next`.
    pub(super) from_seq: u64,
}

impl<T: Clone> GcksEndpoint<T> {
    /// Starts replacing the signing key with `next` (see the [module docs](self)); returns
    /// the first sequence number `next` signs. The driver must have stored `next` durably
    /// first. Like a command, it may produce jobs, stores and events: drain the `poll_*`
    /// methods after it.
    pub fn roll_signing_key(
        &mut self,
        now: Instant,
        next: SigningKey,
        mode: RolloverMode,
    ) -> Result<u64, RolloverError> {
        if let Some(rollover) = &self.rollover {
            return Err(RolloverError::InProgress {
                from_seq: rollover.from_seq,
            });
        }
        if self.stopped || self.membership.poisoned().is_some() {
            return Err(RolloverError::Stopped);
        }
        if next.verifying_key() == self.signing_key.verifying_key() {
            return Err(RolloverError::SameKey);
        }
        // A batch out already has its sequence number and its key: the first message the
        // rollover can change is the one after it.
        let first = self.tree.seq() + 1 + u64::from(self.membership.is_building());
        let from_seq = match mode {
            RolloverMode::Planned { announcements: 0 } => {
                return Err(RolloverError::NoAnnouncement)
            }
            RolloverMode::Planned { announcements } => first + u64::from(announcements),
            RolloverMode::Compromised => first,
        };
        self.rollover = Some(Rollover {
            next: Arc::new(next),
            from_seq,
        });
        self.process(now, Op::Rekey);
        self.after_input(now);
        Ok(from_seq)
    }

    /// After a restart: resumes the rollover to `next` that the latest stored message
    /// announces ([`Self::announced_rollover`]); returns its first sequence number under
    /// `next`.
    pub fn resume_rollover(
        &mut self,
        now: Instant,
        next: SigningKey,
    ) -> Result<u64, RolloverError> {
        let announced = self
            .announced_rollover()
            .filter(|rollover| rollover.next_key == next.verifying_key())
            .ok_or(RolloverError::NotAnnounced)?;
        self.rollover = Some(Rollover {
            next: Arc::new(next),
            from_seq: announced.from_seq,
        });
        self.process(now, Op::Rekey);
        self.after_input(now);
        Ok(announced.from_seq)
    }

    /// The rollover the latest message announces and that has not taken effect (its first
    /// message under the next key is later), if any: what a restarted GCKS must resume.
    pub fn announced_rollover(&self) -> Option<KeyRollover> {
        let (seq, bytes) = self.session.latest_manifest()?;
        let manifest = SignedManifest::parse(bytes).ok()?.manifest;
        manifest
            .key_rollover
            .filter(|rollover| rollover.from_seq > seq)
    }

    /// The first sequence number under the next key, while a rollover is under way.
    pub fn rollover_from_seq(&self) -> Option<u64> {
        self.rollover.as_ref().map(|rollover| rollover.from_seq)
    }

    /// The id of the key that signs the GCKS's messages now.
    pub fn signing_key_id(&self) -> KeyId {
        KeyId::of(&self.signing_key.verifying_key())
    }

    /// The key and announcement for the batch of message `seq`.
    pub(super) fn rollover_for_batch(&self, seq: u64) -> (Arc<SigningKey>, Option<KeyRollover>) {
        match &self.rollover {
            Some(rollover) if seq >= rollover.from_seq => (Arc::clone(&rollover.next), None),
            Some(rollover) => (
                Arc::clone(&self.signing_key),
                Some(KeyRollover {
                    next_key: rollover.next.verifying_key(),
                    from_seq: rollover.from_seq,
                }),
            ),
            None => (Arc::clone(&self.signing_key), None),
        }
    }

    /// After a batch committed: the rollover ends with its first message under the next key
    /// ([`GcksEvent::SigningKeyRolled`]); until then, each announcing message asks for the
    /// next.
    pub(super) fn rollover_committed(&mut self, now: Instant) {
        let Some(rollover) = &self.rollover else {
            return;
        };
        let seq = self.tree.seq();
        if seq >= rollover.from_seq {
            self.signing_key = Arc::clone(&rollover.next);
            // The new key's soft and hard lifetimes count from now.
            self.lifetimes.signing_key_replaced(now);
            let from_seq = rollover.from_seq;
            self.rollover = None;
            self.events.push_back(GcksEvent::SigningKeyRolled {
                from_seq,
                key_id: self.signing_key_id(),
            });
        } else {
            self.membership.request_rekey(now);
        }
    }
}
