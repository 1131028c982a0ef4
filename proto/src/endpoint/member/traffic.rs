//! A member's traffic keys over time: which Data SAs are installed for receiving, which one
//! the product sends under, when the next one takes over and when the previous one goes, and
//! when the newest one reaches its soft and hard lifetimes without a replacement.
//!
//! Each new Data SA carries its takeover delays ([`DataSaTiming`](crate::gsa::DataSaTiming), the ATD and DTD of RFC
//! 9838), counted from the moment the member applied the message that brought it. The
//! sequence a product follows is the order of the events:
//!
//! 1. [`ReceiverEvent::NewDataSa`]: install the new TEK for receiving (the previous one stays).
//! 2. [`ReceiverEvent::DataSaActivated`], at receipt + activation delay: send under it.
//! 3. [`ReceiverEvent::DataSaRetired`] for the previous SA, at receipt + deactivation delay:
//!    stop accepting traffic under it and drop it.
//!
//! A member's first Data SA (after registration or a restart) activates at once: there is
//! nothing else to send under. An SA superseded before it activated (two rekeys within one
//! activation delay) is never activated and retires with the SA it was to replace.
//!
//! Lifetimes (RFC 4046 section 3, requirement 3) run from receipt too: at the soft lifetime
//! ([`KeyLifeConfig::soft_lifetime_percent`] of the SA's lifetime) with no newer SA the member
//! raises [`ReceiverEvent::DataSaSoftLifetime`] (and the endpoint checks the group's state, as
//! after a silence, with a [`ReceiverEvent::StateCheckNeeded`]: a missed refresh shows up
//! there); at the hard lifetime [`ReceiverEvent::DataSaExpired`].
//!
//! It owns no clock: time is an argument, and [`TrafficKeys::poll_timeout`] says when it next
//! has something to do.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::gsa::DataSa;
use crate::session::ReceiverEvent;

/// How a member treats its keys' lifetimes and a re-registration. In a configuration file, a
/// table whose fields may each be left out ([`KeyLifeConfig::default`]); the window is whole
/// milliseconds in `reregister_window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyLifeConfig {
    /// The soft lifetime of a Data SA, in percent of its lifetime (1 to 99): past it with no
    /// newer SA, the member raises [`ReceiverEvent::DataSaSoftLifetime`] and checks state.
    pub soft_lifetime_percent: u8,
    /// The window a re-registration is spread over: after
    /// [`ReceiverEvent::MustReregister`], [`ReceiverEvent::ReregisterNow`] comes after a
    /// delay drawn uniformly from `[0, window)`, so that a mass exclusion is not a flood of
    /// registrations. Zero: at once.
    #[serde(rename = "reregister_window_ms", with = "rekeycast_nack::duration_ms")]
    pub reregister_window: Duration,
}

impl Default for KeyLifeConfig {
    /// A soft lifetime at 90 % and a 30 s re-registration window.
    fn default() -> Self {
        Self {
            soft_lifetime_percent: 90,
            reregister_window: Duration::from_secs(30),
        }
    }
}

impl KeyLifeConfig {
    /// Checks the soft lifetime's percentage.
    pub fn validate(&self) -> Result<(), crate::session::ConfigError> {
        if !(1..=99).contains(&self.soft_lifetime_percent) {
            return Err(crate::session::ConfigError::Invalid {
                field: "soft_lifetime_percent",
                reason: "must be between 1 and 99",
            });
        }
        Ok(())
    }
}

/// What a Data SA's SPI seen in the group's traffic says about the member's keys
/// ([`TrafficKeys::classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpiSeen {
    /// One of the SAs installed for receiving.
    Installed,
    /// A later SA than the member's newest (the one its newest announced as next, or one
    /// after it): the member missed a rekey. Unauthenticated: it only justifies a
    /// rate-limited state check.
    Later,
    /// An older SA, or no SA yet to compare with: nothing to learn.
    Unknown,
}

/// The longest run of SPIs after the newest SA's that still counts as later (SPIs are
/// compared in serial-number arithmetic: they increase by one per rekey and wrap).
pub const LATER_SPI_WINDOW: u32 = 1 << 30;

/// A member's traffic keys. See the [module docs](self).
#[derive(Debug)]
pub struct TrafficKeys {
    config: KeyLifeConfig,
    /// The SA the product sends under.
    sending: Option<DataSa>,
    /// The newest SA, installed for receiving, and when it activates.
    pending: Option<(DataSa, Instant)>,
    /// SAs still accepted for receiving, and when each goes.
    retiring: Vec<(DataSa, Instant)>,
    /// The newest SA's lifetimes: its SPI, soft and hard deadlines, and which were reported.
    newest: Option<Lifetime>,
    events: VecDeque<ReceiverEvent>,
}

#[derive(Debug, Clone, Copy)]
struct Lifetime {
    spi: u32,
    soft_at: Instant,
    hard_at: Instant,
    soft_done: bool,
    hard_done: bool,
}

impl TrafficKeys {
    /// No keys yet.
    pub fn new(config: KeyLifeConfig) -> Self {
        Self {
            config,
            sending: None,
            pending: None,
            retiring: Vec::new(),
            newest: None,
            events: VecDeque::new(),
        }
    }

    /// The SA to send under, once there is one.
    pub fn sending(&self) -> Option<&DataSa> {
        self.sending.as_ref()
    }

    /// Every SA installed for receiving: the one sent under, the newest not active yet, and
    /// those retiring.
    pub fn receiving(&self) -> impl Iterator<Item = &DataSa> {
        self.sending
            .iter()
            .chain(self.pending.iter().map(|(sa, _)| sa))
            .chain(self.retiring.iter().map(|(sa, _)| sa))
    }

    /// Whether the SA named `spi` is installed for receiving.
    pub fn accepts(&self, spi: u32) -> bool {
        self.receiving().any(|sa| sa.spi == spi)
    }

    /// What the SPI `spi`, seen in the group's traffic (or named by a datagram), says: one of
    /// the SAs installed, a later one (the announced next SPI, or within
    /// [`LATER_SPI_WINDOW`] after the newest SA's), or nothing.
    pub fn classify(&self, spi: u32) -> SpiSeen {
        if self.accepts(spi) {
            return SpiSeen::Installed;
        }
        let newest = self
            .pending
            .as_ref()
            .map(|(sa, _)| sa)
            .or(self.sending.as_ref());
        let Some(newest) = newest else {
            return SpiSeen::Unknown;
        };
        let ahead = spi.wrapping_sub(newest.spi);
        if (newest.next_spi != 0 && spi == newest.next_spi)
            || (ahead != 0 && ahead < LATER_SPI_WINDOW)
        {
            SpiSeen::Later
        } else {
            SpiSeen::Unknown
        }
    }

    /// The newest SA, installed for receiving and not active yet, and when it activates.
    pub fn pending(&self) -> Option<(&DataSa, Instant)> {
        self.pending.as_ref().map(|(sa, at)| (sa, *at))
    }

    /// A new Data SA arrived at `now` (the member applied its message): it is installed for
    /// receiving, and activates and retires the previous one on its delays.
    pub fn install(&mut self, now: Instant, sa: DataSa) {
        let lifetime = secs(sa.lifetime_secs);
        let soft = lifetime * u32::from(self.config.soft_lifetime_percent) / 100;
        self.newest = Some(Lifetime {
            spi: sa.spi,
            soft_at: now + soft,
            hard_at: now + lifetime,
            soft_done: false,
            hard_done: false,
        });
        if self.sending.is_none() {
            self.events
                .push_back(ReceiverEvent::DataSaActivated { spi: sa.spi });
            self.sending = Some(sa);
            return;
        }
        let drop_at = now + secs(sa.timing.deactivation_delay_secs);
        // An SA superseded before it activated goes with the one it was to replace.
        if let Some((superseded, _)) = self.pending.take() {
            self.retiring.push((superseded, drop_at));
        }
        let activate_at = now + secs(sa.timing.activation_delay_secs);
        self.pending = Some((sa, activate_at));
        self.handle_timeout(now);
    }

    /// Activates, retires and reports what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.pending.as_ref().is_some_and(|(_, at)| *at <= now) {
            if let Some((sa, at)) = self.pending.take() {
                // The previous SA goes at receipt + deactivation delay.
                let drop_at = at - secs(sa.timing.activation_delay_secs)
                    + secs(sa.timing.deactivation_delay_secs);
                if let Some(previous) = self.sending.take() {
                    self.retiring.push((previous, drop_at));
                }
                self.events
                    .push_back(ReceiverEvent::DataSaActivated { spi: sa.spi });
                self.sending = Some(sa);
            }
        }
        let mut index = 0;
        while index < self.retiring.len() {
            if self.retiring[index].1 <= now {
                let (sa, _) = self.retiring.remove(index);
                self.events
                    .push_back(ReceiverEvent::DataSaRetired { spi: sa.spi });
            } else {
                index += 1;
            }
        }
        if let Some(newest) = &mut self.newest {
            if !newest.soft_done && newest.soft_at <= now {
                newest.soft_done = true;
                self.events
                    .push_back(ReceiverEvent::DataSaSoftLifetime { spi: newest.spi });
            }
            if !newest.hard_done && newest.hard_at <= now {
                newest.hard_done = true;
                self.events
                    .push_back(ReceiverEvent::DataSaExpired { spi: newest.spi });
            }
        }
    }

    /// When [`Self::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let lifetime = self.newest.and_then(|n| {
            if !n.soft_done {
                Some(n.soft_at)
            } else if !n.hard_done {
                Some(n.hard_at)
            } else {
                None
            }
        });
        self.pending
            .iter()
            .map(|(_, at)| *at)
            .chain(self.retiring.iter().map(|(_, at)| *at))
            .chain(lifetime)
            .min()
    }

    /// The next event for the product.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }
}

fn secs(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any instant will do as the origin: time goes on only as the test advances it.
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }
    use crate::gsa::DataSaTiming;
    use crate::lkh::Key;

    fn sa(spi: u32, atd: u32, dtd: u32) -> DataSa {
        DataSa {
            spi,
            lifetime_secs: 100,
            timing: DataSaTiming {
                activation_delay_secs: atd,
                deactivation_delay_secs: dtd,
            },
            next_spi: spi + 1,
            tek: Key::from_bytes([spi as u8; 32]),
        }
    }

    fn drain(keys: &mut TrafficKeys) -> Vec<ReceiverEvent> {
        std::iter::from_fn(|| keys.poll_event()).collect()
    }

    #[test]
    fn install_activate_retire_in_order() {
        let start = origin();
        let mut keys = TrafficKeys::new(KeyLifeConfig::default());
        keys.install(start, sa(1, 2, 5));
        assert_eq!(
            drain(&mut keys),
            vec![ReceiverEvent::DataSaActivated { spi: 1 }]
        );
        keys.install(start + secs(10), sa(2, 2, 5));
        assert!(drain(&mut keys).is_empty());
        assert_eq!(keys.sending().map(|s| s.spi), Some(1));
        assert!(keys.accepts(1) && keys.accepts(2));
        assert_eq!(keys.poll_timeout(), Some(start + secs(12)));
        keys.handle_timeout(start + secs(12));
        assert_eq!(
            drain(&mut keys),
            vec![ReceiverEvent::DataSaActivated { spi: 2 }]
        );
        assert_eq!(keys.sending().map(|s| s.spi), Some(2));
        assert!(keys.accepts(1));
        assert_eq!(keys.poll_timeout(), Some(start + secs(15)));
        keys.handle_timeout(start + secs(15));
        assert_eq!(
            drain(&mut keys),
            vec![ReceiverEvent::DataSaRetired { spi: 1 }]
        );
        assert!(!keys.accepts(1));
        // 90 % of 100 s after SA 2 arrived, nothing newer: soft, then hard lifetime.
        assert_eq!(keys.poll_timeout(), Some(start + secs(100)));
        keys.handle_timeout(start + secs(100));
        assert_eq!(
            drain(&mut keys),
            vec![ReceiverEvent::DataSaSoftLifetime { spi: 2 }]
        );
        keys.handle_timeout(start + secs(110));
        assert_eq!(
            drain(&mut keys),
            vec![ReceiverEvent::DataSaExpired { spi: 2 }]
        );
        assert_eq!(keys.poll_timeout(), None);
    }

    #[test]
    fn zero_delays_replace_at_once_and_superseded_sas_never_activate() {
        let start = origin();
        let mut keys = TrafficKeys::new(KeyLifeConfig::default());
        keys.install(start, sa(1, 0, 0));
        keys.install(start, sa(2, 0, 0));
        assert_eq!(
            drain(&mut keys),
            vec![
                ReceiverEvent::DataSaActivated { spi: 1 },
                ReceiverEvent::DataSaActivated { spi: 2 },
                ReceiverEvent::DataSaRetired { spi: 1 },
            ]
        );
        keys.install(start + secs(1), sa(3, 5, 8));
        keys.install(start + secs(2), sa(4, 5, 8));
        assert!(drain(&mut keys).is_empty());
        keys.handle_timeout(start + secs(7));
        assert_eq!(
            drain(&mut keys),
            vec![ReceiverEvent::DataSaActivated { spi: 4 }]
        );
        keys.handle_timeout(start + secs(10));
        assert_eq!(
            drain(&mut keys),
            vec![
                ReceiverEvent::DataSaRetired { spi: 3 },
                ReceiverEvent::DataSaRetired { spi: 2 },
            ]
        );
    }

    #[test]
    fn soft_lifetime_percent_is_checked() {
        for bad in [0, 100, 200] {
            let config = KeyLifeConfig {
                soft_lifetime_percent: bad,
                ..KeyLifeConfig::default()
            };
            assert!(config.validate().is_err(), "{bad}");
        }
        assert!(KeyLifeConfig::default().validate().is_ok());
    }
}
