//! Relay failover: which of the contacts a member's registration listed it receives its rekeys
//! from, when it gives up on one, and where it goes next.
//!
//! A member's [`RelayDirectory`] (from its registration bundle, or its configuration) lists
//! relays in order, the first being the one the GCKS assigned it, and the GCKS's own contact as
//! the last resort. [`Failover`] keeps the member on one contact (its *attachment*: the
//! multicast group it listens to, where its NACKs go, whose resync endpoints it asks first) and
//! moves it to the next one when the current one goes silent:
//!
//! - **A NACK unanswered.** A member that sent a NACK (it is missing a block of a message it
//!   knows of) and then hears nothing at all for [`FailoverConfig::nack_silence`] takes its
//!   contact to be dead: a live relay answers a NACK at once (a repair advertisement, then
//!   repair), and sends heartbeats while a message is in flight. This is the fast path, and
//!   the one a relay killed mid-message takes.
//! - **A silence.** Nothing verified heard for [`FailoverConfig::idle_silence`] (set it above
//!   the relays' longest heartbeat interval, [`crate::session::SenderConfig::heartbeat_max`]),
//!   or the receiver's own silence timeout, moves the member too: a live relay heartbeats
//!   between messages, so a member of a relay that died between messages moves before the
//!   next message is due rather than after missing it.
//! - **Unreachable.** A fetch to the current relay's resync endpoint that fails to connect
//!   (the relay's process is gone) moves the member at once, before its resync policy turns
//!   to the GCKS.
//! - **Ordered.** The GCKS moves members between relays (after a relay died or joined) with a
//!   signed [`RelayDirective`](super::directive::RelayDirective) the member verifies with the
//!   GCKS's key from its Rekey SA; see [`Failover::move_to`].
//!
//! Moves are spaced: after a move the member stays at least a backoff on its new contact before
//! the next unordered move, the backoff doubling with each consecutive move that heard nothing
//! ([`FailoverConfig::backoff_initial`] up to [`FailoverConfig::backoff_max`]) with a random
//! jitter, so members of a dead relay neither poll it forever at a fixed interval nor stampede
//! the next one in step. Anything verified heard resets the backoff. The relays the member left
//! are dropped from the front of its resync order until it comes round to them again.
//!
//! It owns no clock and no entropy source: time is an argument and the jitter comes from the
//! seeded generator it is given.

use std::time::{Duration, Instant};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::directive::RelayRef;
use super::ResyncEndpoint;
use crate::lkh::{RelayContact, RelayDirectory};
use crate::session::ConfigError;

/// The failover settings. [`FailoverConfig::default`] holds production values.
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default) and durations are whole milliseconds in fields named `*_ms`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// How long a member that sent a NACK waits, hearing nothing at all, before it moves to its
    /// next contact. Default 1 s.
    #[serde(rename = "nack_silence_ms", with = "rekeycast_nack::duration_ms")]
    pub nack_silence: Duration,
    /// The least time on a contact after a move before the next unordered one; it doubles with
    /// each consecutive move that heard nothing. Default 500 ms.
    #[serde(rename = "backoff_initial_ms", with = "rekeycast_nack::duration_ms")]
    pub backoff_initial: Duration,
    /// How long a member hears nothing verified before it moves on: above the relays' longest
    /// heartbeat interval. Default 75 s (two and a half times the default 30 s).
    #[serde(rename = "idle_silence_ms", with = "rekeycast_nack::duration_ms")]
    pub idle_silence: Duration,
    /// The cap of that backoff. Default 60 s.
    #[serde(rename = "backoff_max_ms", with = "rekeycast_nack::duration_ms")]
    pub backoff_max: Duration,
    /// The jitter of the backoff, a fraction: each backoff is drawn uniformly from
    /// `[1 - jitter, 1 + jitter]` times its nominal value. Default 0.25.
    pub jitter: f64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            nack_silence: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(500),
            idle_silence: Duration::from_secs(75),
            backoff_max: Duration::from_secs(60),
            jitter: 0.25,
        }
    }
}

impl FailoverConfig {
    /// Checks the ranges: a non-zero NACK silence and initial backoff not above its cap, and a
    /// jitter in `[0, 1)`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
        if self.nack_silence.is_zero() {
            return invalid("nack_silence", "must not be 0");
        }
        if self.idle_silence.is_zero() {
            return invalid("idle_silence", "must not be 0");
        }
        if self.backoff_initial > self.backoff_max {
            return invalid("backoff_initial", "must not exceed backoff_max");
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return invalid("jitter", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// Why a member moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MoveReason {
    /// A NACK went unanswered for [`FailoverConfig::nack_silence`].
    NackUnanswered,
    /// Nothing heard for [`FailoverConfig::idle_silence`], or the receiver's silence timeout
    /// passed.
    Silence,
    /// A connection to the current relay's resync endpoint failed.
    Unreachable,
    /// The GCKS ordered it.
    Ordered,
}

/// Where a member now receives its rekeys: the driver listens to `contact.group` (and leaves
/// the previous group); NACKs already go to `contact.feedback`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The contact.
    pub contact: RelayContact,
    /// Its index among the directory's relays; `None`: the GCKS.
    pub relay: Option<usize>,
    /// Why the member moved there (`None`: its first attachment).
    pub reason: Option<MoveReason>,
}

/// What failover counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailoverCounters {
    /// Moves after an unanswered NACK.
    pub nack_moves: u64,
    /// Moves after a silence.
    pub silence_moves: u64,
    /// Moves the GCKS ordered.
    pub ordered_moves: u64,
    /// Moves after the current relay's resync endpoint could not be reached.
    pub unreachable_moves: u64,
    /// Silences and unanswered NACKs that did not move the member (its backoff held, or it has
    /// a single contact).
    pub moves_held: u64,
}

/// One member's failover state. See the [module docs](self).
#[derive(Debug)]
pub struct Failover {
    config: FailoverConfig,
    directory: RelayDirectory,
    /// The index of the current contact: a relay's, or `relays.len()` for the GCKS.
    current: usize,
    /// When the member first sent a NACK after it last heard anything.
    nack_since: Option<Instant>,
    /// When the member last heard anything verified (or moved).
    heard_at: Instant,
    /// The earliest the next unordered move may happen.
    hold_until: Option<Instant>,
    /// Consecutive moves without hearing anything in between.
    consecutive: u32,
    /// The attachment the driver has not taken yet.
    pending: Option<Attachment>,
    rng: ChaCha8Rng,
    counters: FailoverCounters,
}

impl Failover {
    /// Failover over `directory`, attached to its first contact from `now` (a first
    /// [`Attachment`] is pending). `None` when the directory is empty.
    pub fn new(
        directory: RelayDirectory,
        config: FailoverConfig,
        rng: ChaCha8Rng,
        now: Instant,
    ) -> Option<Self> {
        if directory.is_empty() {
            return None;
        }
        let mut failover = Self {
            config,
            directory,
            current: 0,
            nack_since: None,
            heard_at: now,
            hold_until: None,
            consecutive: 0,
            pending: None,
            rng,
            counters: FailoverCounters::default(),
        };
        failover.pending = Some(failover.attachment(None));
        Some(failover)
    }

    /// The directory.
    pub fn directory(&self) -> &RelayDirectory {
        &self.directory
    }

    /// The current contact.
    pub fn contact(&self) -> &RelayContact {
        self.contact_at(self.current)
    }

    /// The current relay's index in the directory; `None`: the GCKS.
    pub fn relay(&self) -> Option<usize> {
        (self.current < self.directory.relays.len()).then_some(self.current)
    }

    /// The current contact as a directive names it: the relay's number, or the GCKS.
    pub fn current_ref(&self) -> RelayRef {
        match self.directory.relays.get(self.current) {
            Some(contact) => RelayRef::Relay(contact.id),
            None => RelayRef::Gcks,
        }
    }

    /// The figures.
    pub fn counters(&self) -> &FailoverCounters {
        &self.counters
    }

    /// The attachment the driver must take (listen to its group), once.
    pub fn poll_attachment(&mut self) -> Option<Attachment> {
        self.pending.take()
    }

    /// The resync order for the current attachment: `(relays, gcks)`. The current relay
    /// first, then the relays after it in the directory (the ones before it were left for
    /// silence); the GCKS's endpoints last.
    pub fn resync_order(&self) -> (Vec<ResyncEndpoint>, Vec<ResyncEndpoint>) {
        let relays = self
            .directory
            .relays
            .iter()
            .skip(self.current)
            .flat_map(|c| c.resync.iter().copied())
            .collect();
        let gcks = self
            .directory
            .gcks
            .iter()
            .flat_map(|c| c.resync.iter().copied())
            .collect();
        (relays, gcks)
    }

    /// A datagram was verified (its MAC checked): the contact is alive.
    pub fn heard(&mut self, now: Instant) {
        self.heard_at = self.heard_at.max(now);
        self.nack_since = None;
        self.consecutive = 0;
    }

    /// The member sent a NACK.
    pub fn nack_sent(&mut self, now: Instant) {
        self.nack_since.get_or_insert(now);
    }

    /// The receiver's silence timeout passed: moves on unless the backoff holds. Returns the
    /// move made.
    pub fn silence(&mut self, now: Instant) -> Option<MoveReason> {
        self.move_on(now, MoveReason::Silence)
    }

    /// A connection to `endpoint` failed: if it is the current relay's, moves on unless the
    /// backoff holds. Returns the move made.
    pub fn unreachable(&mut self, now: Instant, endpoint: &ResyncEndpoint) -> Option<MoveReason> {
        let current = self.directory.relays.get(self.current)?;
        if !current.resync.contains(endpoint) {
            return None;
        }
        self.move_on(now, MoveReason::Unreachable)
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.count() < 2 {
            return None;
        }
        let idle = self.heard_at + self.config.idle_silence;
        let due = self
            .nack_since
            .map_or(idle, |since| idle.min(since + self.config.nack_silence));
        Some(self.hold_until.map_or(due, |hold| hold.max(due)))
    }

    /// Time passed: a NACK unanswered, or a silence, long enough moves the member on.
    /// Returns the move made.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<MoveReason> {
        let at = self.poll_timeout()?;
        if at > now {
            return None;
        }
        let unanswered = self
            .nack_since
            .is_some_and(|since| since + self.config.nack_silence <= now);
        let reason = if unanswered {
            MoveReason::NackUnanswered
        } else {
            MoveReason::Silence
        };
        self.move_on(now, reason)
    }

    /// The GCKS ordered the member to `to`. Returns whether the directory holds it (a move to
    /// the current contact changes nothing and is not counted).
    pub fn move_to(&mut self, now: Instant, to: RelayRef) -> bool {
        let index = match to {
            RelayRef::Relay(id) => match self.directory.relays.iter().position(|c| c.id == id) {
                Some(index) => index,
                None => return false,
            },
            RelayRef::Gcks if self.directory.gcks.is_some() => self.directory.relays.len(),
            RelayRef::Gcks => return false,
        };
        if index != self.current {
            self.counters.ordered_moves += 1;
            self.current = index;
            self.nack_since = None;
            self.heard_at = now;
            self.consecutive = 0;
            self.hold_until = Some(now + self.backoff());
            self.pending = Some(self.attachment(Some(MoveReason::Ordered)));
        }
        true
    }

    fn move_on(&mut self, now: Instant, reason: MoveReason) -> Option<MoveReason> {
        let count = self.count();
        if count < 2 || self.hold_until.is_some_and(|hold| hold > now) {
            self.counters.moves_held += 1;
            // The NACK clock starts again: the next NACK is judged afresh.
            self.nack_since = None;
            return None;
        }
        self.current = (self.current + 1) % count;
        self.nack_since = None;
        // The new contact gets a whole silence before it is judged.
        self.heard_at = now;
        self.consecutive = self.consecutive.saturating_add(1);
        self.hold_until = Some(now + self.backoff());
        match reason {
            MoveReason::NackUnanswered => self.counters.nack_moves += 1,
            MoveReason::Silence => self.counters.silence_moves += 1,
            MoveReason::Ordered => self.counters.ordered_moves += 1,
            MoveReason::Unreachable => self.counters.unreachable_moves += 1,
        }
        self.pending = Some(self.attachment(Some(reason)));
        Some(reason)
    }

    /// `backoff_initial * 2^(consecutive - 1)`, capped, jittered.
    fn backoff(&mut self) -> Duration {
        let doublings = self.consecutive.saturating_sub(1).min(30);
        let nominal = self
            .config
            .backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.config.backoff_max);
        let jitter = self.config.jitter.clamp(0.0, 0.99);
        let factor = 1.0 - jitter + 2.0 * jitter * self.rng.gen::<f64>();
        nominal.mul_f64(factor)
    }

    fn count(&self) -> usize {
        self.directory.relays.len() + usize::from(self.directory.gcks.is_some())
    }

    fn contact_at(&self, index: usize) -> &RelayContact {
        match self.directory.relays.get(index) {
            Some(contact) => contact,
            // `current` is always below `count()`, and the GCKS's contact is the last: with no
            // relay at `index` it exists (`new` refuses an empty directory).
            None => self
                .directory
                .gcks
                .as_ref()
                .unwrap_or(&self.directory.relays[0]),
        }
    }

    fn attachment(&self, reason: Option<MoveReason>) -> Attachment {
        Attachment {
            contact: self.contact_at(self.current).clone(),
            relay: self.relay(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rand::SeedableRng;

    use super::*;

    /// Any instant will do as the origin: time goes on only as the test advances it.
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    fn contact(n: u8) -> RelayContact {
        RelayContact {
            id: u16::from(n) * 10,
            group: SocketAddr::from(([239, 0, 0, n], 5000)),
            feedback: SocketAddr::from(([10, 0, 0, n], 5001)),
            resync: vec![ResyncEndpoint {
                protocol: super::super::ResyncProtocol::Tcp,
                addr: SocketAddr::from(([10, 0, 0, n], 7000)),
            }],
        }
    }

    fn failover(relays: u8) -> Failover {
        let directory = RelayDirectory {
            relays: (1..=relays).map(contact).collect(),
            gcks: Some(contact(100)),
        };
        Failover::new(
            directory,
            FailoverConfig::default(),
            ChaCha8Rng::seed_from_u64(1),
            origin(),
        )
        .expect("a directory")
    }

    #[test]
    fn an_unanswered_nack_moves_to_the_next_relay_and_the_backoff_spaces_moves() {
        let start = origin();
        let mut f = failover(2);
        assert_eq!(f.poll_attachment().map(|a| a.relay), Some(Some(0)));
        f.nack_sent(start);
        assert_eq!(f.poll_timeout(), Some(start + Duration::from_secs(1)));
        assert_eq!(f.handle_timeout(start + Duration::from_millis(999)), None);
        // Heard something: the relay is alive.
        f.heard(start + Duration::from_millis(500));
        // Only the silence deadline is left.
        assert_eq!(
            f.poll_timeout(),
            Some(start + Duration::from_millis(500) + Duration::from_secs(75))
        );
        f.nack_sent(start + Duration::from_millis(600));
        let moved = start + Duration::from_millis(1600);
        assert_eq!(f.handle_timeout(moved), Some(MoveReason::NackUnanswered));
        let attachment = f.poll_attachment().expect("attachment");
        assert_eq!(attachment.relay, Some(1));
        assert_eq!(attachment.contact, contact(2));
        // The relay left is no longer asked for resync first.
        assert_eq!(f.resync_order().0, contact(2).resync);
        // The next one, silent too: not before the backoff (500 ms +- 25%) has passed.
        f.nack_sent(moved);
        let next = f.poll_timeout().expect("deadline");
        assert!(next >= moved + Duration::from_secs(1));
        assert_eq!(f.handle_timeout(next), Some(MoveReason::NackUnanswered));
        assert_eq!(f.relay(), None, "the GCKS, the last resort");
        assert_eq!(f.contact(), &contact(100));
        assert_eq!(f.counters().nack_moves, 2);
    }

    #[test]
    fn consecutive_silent_moves_back_off_exponentially_with_jitter_to_the_cap() {
        let mut f = failover(3);
        let mut now = origin();
        let mut holds = Vec::new();
        for _ in 0..12 {
            // A silence is not held off by anything but the backoff.
            now += Duration::from_secs(1000);
            assert_eq!(f.silence(now), Some(MoveReason::Silence));
            let hold = f.hold_until.expect("held") - now;
            holds.push(hold);
            // A second silence within the hold does not move.
            assert_eq!(f.silence(now + hold / 2), None);
        }
        assert!(holds[0] >= Duration::from_millis(375) && holds[0] <= Duration::from_millis(625));
        assert!(holds[3] >= Duration::from_secs(3) && holds[3] <= Duration::from_secs(5));
        assert!(holds[11] <= Duration::from_secs(75) && holds[11] >= Duration::from_secs(45));
        // Jittered: not all equal at the cap.
        assert_ne!(holds[10], holds[11]);
        // It went round the contacts in order: 3 relays and the GCKS, three times.
        assert_eq!(f.relay(), Some(0));
        assert_eq!(f.counters().moves_held, 12);
        // Hearing anything resets the backoff.
        f.heard(now);
        now += Duration::from_secs(1000);
        f.silence(now);
        assert!(f.hold_until.expect("held") - now <= Duration::from_millis(625));
    }

    #[test]
    fn an_ordered_move_goes_where_it_is_told_and_a_lone_contact_never_moves() {
        let now = origin();
        let mut f = failover(3);
        f.poll_attachment();
        assert!(f.move_to(now, RelayRef::Relay(30)));
        assert_eq!(
            f.poll_attachment().map(|a| (a.relay, a.reason)),
            Some((Some(2), Some(MoveReason::Ordered)))
        );
        assert_eq!(f.current_ref(), RelayRef::Relay(30));
        assert!(!f.move_to(now, RelayRef::Relay(3)), "no relay 3");
        assert!(f.move_to(now, RelayRef::Relay(30)));
        assert_eq!(f.poll_attachment(), None, "already there");
        assert!(f.move_to(now, RelayRef::Gcks));
        assert_eq!(f.relay(), None);
        let lone = RelayDirectory {
            relays: vec![contact(1)],
            gcks: None,
        };
        let mut f = Failover::new(
            lone,
            FailoverConfig::default(),
            ChaCha8Rng::seed_from_u64(2),
            now,
        )
        .expect("a directory");
        assert_eq!(f.silence(now), None);
        assert_eq!(f.counters().moves_held, 1);
        assert!(Failover::new(
            RelayDirectory::default(),
            FailoverConfig::default(),
            ChaCha8Rng::seed_from_u64(2),
            now,
        )
        .is_none());
    }
}
