//! Key lifetimes at the GCKS (RFC 4046 section 3, requirement 3: keys have lifetimes and are
//! refreshed periodically): the soft and hard lifetimes of the Data SA (the TEK) and of the
//! Rekey SA's group key, the takeover delays every new Data SA carries, and the clock that
//! says when the GCKS must refresh with no membership change.
//!
//! # A refresh is an empty batch
//!
//! When the latest Data SA reaches its soft lifetime (or the group key reaches its own) and no
//! membership change has rekeyed the group since, the GCKS rekeys with an empty batch. In this
//! key tree an empty batch is already the light refresh: by the marking algorithm only the root
//! gets a new key (the group key, wrapped under each of its `d` children's keys) and a new
//! Data SA is wrapped under it, so the message is `d` wraps and one Data SA record, one chunk
//! that every member needs, one signature. Interior KEKs are not renewed: they only ever wrap
//! other keys, inside messages whose content the group key and the TEK protect, and every
//! membership change renews the ones on its paths. A separate, lighter message type (a bare
//! new TEK under the current group key) would save the `d` wraps but would need its own
//! signature, MAC chain, sequence numbers, resync history and member code path; the empty
//! batch reuses all of them (a member that misses a refresh resyncs it like any rekey), which
//! is why the refresh is an ordinary rekey.
//!
//! This module holds no endpoint state beyond its clock: the endpoint asks it when the next
//! refresh is due and tells it when a batch committed.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::gsa::{DataSaTiming, DataSaTimingError};

/// A soft and a hard lifetime, seconds. Past the soft one the key is replaced; past the hard
/// one it must not be used. In a configuration file, a table with both fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftHard {
    /// Seconds after issue at which the key is replaced.
    pub soft_secs: u32,
    /// Seconds after issue past which the key must not be used.
    pub hard_secs: u32,
}

/// The lifetimes and takeover delays of a GCKS's keys. The Data SA's hard lifetime is the
/// configuration's `data_sa_lifetime_secs` (it travels in every Data SA).
///
/// In a configuration file, a table whose fields may each be left out (the default: no
/// refresh on time, no limit, zero delays); `group_key` and `signing_key` are [`SoftHard`]
/// tables and `timing` a [`DataSaTiming`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifetimeConfig {
    /// The Data SA's soft lifetime, seconds: the GCKS refreshes when the latest Data SA is this
    /// old. `None`: Data SAs are replaced only by rekeys for membership changes or commands.
    pub data_sa_soft_secs: Option<u32>,
    /// The Rekey SA's group key lifetimes. `None`: not limited.
    pub group_key: Option<SoftHard>,
    /// The lifetimes of the GCKS's signing key, from the endpoint's start (a signing-key
    /// rollover replaces it): [`LifetimeClock`] reports when they pass. `None`: not limited.
    pub signing_key: Option<SoftHard>,
    /// The takeover delays every new Data SA carries.
    pub timing: DataSaTiming,
}

impl LifetimeError {
    /// The configuration field at fault (relative to the [`LifetimeConfig`] table, or the
    /// GCKS's `data_sa_lifetime_secs`) and the rule it breaks, for a configuration error.
    pub fn field_and_rule(&self) -> (&'static str, &'static str) {
        let key_field = |key: &LifetimeKey, soft: &'static str, hard: &'static str| match key {
            LifetimeKey::DataSa => ("data_sa_soft_secs", soft),
            LifetimeKey::GroupKey => ("group_key", hard),
            LifetimeKey::SigningKey => ("signing_key", hard),
        };
        match self {
            Self::Zero { key, .. } => key_field(key, "must be at least 1", "must be at least 1"),
            Self::SoftNotBelowHard { key, .. } => key_field(
                key,
                "must be shorter than data_sa_lifetime_secs",
                "soft_secs must be shorter than hard_secs",
            ),
            Self::Timing(_) => (
                "timing.deactivation_delay_secs",
                "must be at least timing.activation_delay_secs",
            ),
            Self::ActivationAfterRefresh { .. } => (
                "timing.activation_delay_secs",
                "must be shorter than data_sa_soft_secs",
            ),
            Self::DeactivationPastLifetime { .. } => (
                "timing.deactivation_delay_secs",
                "must be shorter than data_sa_lifetime_secs",
            ),
        }
    }
}

/// Which key a lifetime belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LifetimeKey {
    /// The Data SA (TEK).
    DataSa,
    /// The Rekey SA's group key.
    GroupKey,
    /// The GCKS's signing key.
    SigningKey,
}

/// Why a [`LifetimeConfig`] cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LifetimeError {
    /// A lifetime of zero seconds.
    #[error("the {key:?} {which} lifetime is zero")]
    Zero {
        /// Whose lifetime.
        key: LifetimeKey,
        /// "soft" or "hard".
        which: &'static str,
    },
    /// A soft lifetime not shorter than its hard one.
    #[error("the {key:?} soft lifetime {soft_secs} s is not shorter than its hard lifetime {hard_secs} s")]
    SoftNotBelowHard {
        /// Whose lifetime.
        key: LifetimeKey,
        /// The soft lifetime.
        soft_secs: u32,
        /// The hard lifetime.
        hard_secs: u32,
    },
    /// The takeover delays are inconsistent.
    #[error(transparent)]
    Timing(#[from] DataSaTimingError),
    /// A new Data SA would activate after the refresh that replaces it.
    #[error(
        "the activation delay {activation_delay_secs} s is not shorter than the Data SA soft \
         lifetime {soft_secs} s: a Data SA would be replaced before it is used"
    )]
    ActivationAfterRefresh {
        /// The activation delay.
        activation_delay_secs: u32,
        /// The soft lifetime.
        soft_secs: u32,
    },
    /// The previous Data SA would be kept past its hard lifetime.
    #[error(
        "the deactivation delay {deactivation_delay_secs} s is not shorter than the Data SA \
         lifetime {lifetime_secs} s"
    )]
    DeactivationPastLifetime {
        /// The deactivation delay.
        deactivation_delay_secs: u32,
        /// The hard lifetime.
        lifetime_secs: u32,
    },
}

impl LifetimeConfig {
    /// Checks the lifetimes against each other and against the Data SA's hard lifetime
    /// `data_sa_lifetime_secs`.
    pub fn validate(&self, data_sa_lifetime_secs: u32) -> Result<(), LifetimeError> {
        if data_sa_lifetime_secs == 0 {
            return Err(LifetimeError::Zero {
                key: LifetimeKey::DataSa,
                which: "hard",
            });
        }
        if let Some(soft_secs) = self.data_sa_soft_secs {
            check_pair(
                LifetimeKey::DataSa,
                SoftHard {
                    soft_secs,
                    hard_secs: data_sa_lifetime_secs,
                },
            )?;
            if self.timing.activation_delay_secs >= soft_secs {
                return Err(LifetimeError::ActivationAfterRefresh {
                    activation_delay_secs: self.timing.activation_delay_secs,
                    soft_secs,
                });
            }
        }
        if let Some(pair) = self.group_key {
            check_pair(LifetimeKey::GroupKey, pair)?;
        }
        if let Some(pair) = self.signing_key {
            check_pair(LifetimeKey::SigningKey, pair)?;
        }
        self.timing.validate()?;
        if self.timing.deactivation_delay_secs >= data_sa_lifetime_secs {
            return Err(LifetimeError::DeactivationPastLifetime {
                deactivation_delay_secs: self.timing.deactivation_delay_secs,
                lifetime_secs: data_sa_lifetime_secs,
            });
        }
        Ok(())
    }

    /// Time after a committed rekey at which the next refresh is due: the shorter of the Data
    /// SA's and the group key's soft lifetimes, or `None` if neither is set.
    pub fn refresh_interval(&self) -> Option<Duration> {
        let data = self.data_sa_soft_secs;
        let group = self.group_key.map(|pair| pair.soft_secs);
        let secs = match (data, group) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        Some(Duration::from_secs(u64::from(secs)))
    }
}

fn check_pair(key: LifetimeKey, pair: SoftHard) -> Result<(), LifetimeError> {
    if pair.soft_secs == 0 {
        return Err(LifetimeError::Zero { key, which: "soft" });
    }
    if pair.hard_secs == 0 {
        return Err(LifetimeError::Zero { key, which: "hard" });
    }
    if pair.soft_secs >= pair.hard_secs {
        return Err(LifetimeError::SoftNotBelowHard {
            key,
            soft_secs: pair.soft_secs,
            hard_secs: pair.hard_secs,
        });
    }
    Ok(())
}

/// A lifetime that passed, as the GCKS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifetimePassed {
    /// Whose lifetime.
    pub key: LifetimeKey,
    /// Whether it is the hard lifetime (the key must not be used any more) or the soft one.
    pub hard: bool,
}

/// The GCKS's lifetime clock: when the latest rekey committed, when the signing key started,
/// and which lifetimes it already reported.
#[derive(Debug, Clone)]
pub struct LifetimeClock {
    config: LifetimeConfig,
    data_sa_lifetime: Duration,
    /// When the latest rekey committed (`None` before the first: no key to refresh).
    last_rekey: Option<Instant>,
    /// When the signing key came into use.
    signing_since: Instant,
    /// Reported since the latest rekey: the refresh asked, the hard lifetimes passed.
    refresh_asked: bool,
    data_hard_reported: bool,
    group_hard_reported: bool,
    signing_soft_reported: bool,
    signing_hard_reported: bool,
}

impl LifetimeClock {
    /// A clock for `config` started at `now`; `rekeyed` says whether the tree already has a
    /// Data SA (a restored GCKS), whose age is then counted from `now`.
    pub fn new(
        config: LifetimeConfig,
        data_sa_lifetime_secs: u32,
        now: Instant,
        rekeyed: bool,
    ) -> Self {
        Self {
            config,
            data_sa_lifetime: Duration::from_secs(u64::from(data_sa_lifetime_secs)),
            last_rekey: rekeyed.then_some(now),
            signing_since: now,
            refresh_asked: false,
            data_hard_reported: false,
            group_hard_reported: false,
            signing_soft_reported: false,
            signing_hard_reported: false,
        }
    }

    /// A rekey committed at `now`: its Data SA and group key are new.
    pub fn rekeyed(&mut self, now: Instant) {
        self.last_rekey = Some(now);
        self.refresh_asked = false;
        self.data_hard_reported = false;
        self.group_hard_reported = false;
    }

    /// The signing key was replaced at `now`.
    pub fn signing_key_replaced(&mut self, now: Instant) {
        self.signing_since = now;
        self.signing_soft_reported = false;
        self.signing_hard_reported = false;
    }

    /// The next instant at which [`Self::poll`] has something to say.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines = Vec::with_capacity(5);
        if let Some(last) = self.last_rekey {
            if !self.refresh_asked {
                deadlines.extend(self.config.refresh_interval().map(|i| last + i));
            }
            if !self.data_hard_reported && self.config.data_sa_soft_secs.is_some() {
                deadlines.push(last + self.data_sa_lifetime);
            }
            if let Some(pair) = self.config.group_key.filter(|_| !self.group_hard_reported) {
                deadlines.push(last + secs(pair.hard_secs));
            }
        }
        if let Some(pair) = self.config.signing_key {
            if !self.signing_soft_reported {
                deadlines.push(self.signing_since + secs(pair.soft_secs));
            } else if !self.signing_hard_reported {
                deadlines.push(self.signing_since + secs(pair.hard_secs));
            }
        }
        deadlines.into_iter().min()
    }

    /// Whether a refresh is due at `now` (once per rekey), and the lifetimes that passed.
    pub fn poll(&mut self, now: Instant) -> (bool, Vec<LifetimePassed>) {
        let mut passed = Vec::new();
        let mut refresh = false;
        if let Some(last) = self.last_rekey {
            if !self.refresh_asked
                && self
                    .config
                    .refresh_interval()
                    .is_some_and(|i| now >= last + i)
            {
                self.refresh_asked = true;
                refresh = true;
            }
            if !self.data_hard_reported
                && self.config.data_sa_soft_secs.is_some()
                && now >= last + self.data_sa_lifetime
            {
                self.data_hard_reported = true;
                passed.push(LifetimePassed {
                    key: LifetimeKey::DataSa,
                    hard: true,
                });
            }
            if let Some(pair) = self.config.group_key {
                if !self.group_hard_reported && now >= last + secs(pair.hard_secs) {
                    self.group_hard_reported = true;
                    passed.push(LifetimePassed {
                        key: LifetimeKey::GroupKey,
                        hard: true,
                    });
                }
            }
        }
        if let Some(pair) = self.config.signing_key {
            if !self.signing_soft_reported && now >= self.signing_since + secs(pair.soft_secs) {
                self.signing_soft_reported = true;
                passed.push(LifetimePassed {
                    key: LifetimeKey::SigningKey,
                    hard: false,
                });
            }
            if !self.signing_hard_reported && now >= self.signing_since + secs(pair.hard_secs) {
                self.signing_hard_reported = true;
                passed.push(LifetimePassed {
                    key: LifetimeKey::SigningKey,
                    hard: true,
                });
            }
        }
        (refresh, passed)
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

    fn config() -> LifetimeConfig {
        LifetimeConfig {
            data_sa_soft_secs: Some(60),
            group_key: Some(SoftHard {
                soft_secs: 300,
                hard_secs: 600,
            }),
            signing_key: None,
            timing: DataSaTiming {
                activation_delay_secs: 2,
                deactivation_delay_secs: 5,
            },
        }
    }

    #[test]
    fn bad_values_are_typed_errors() {
        assert_eq!(config().validate(100), Ok(()));
        assert_eq!(
            config().validate(0),
            Err(LifetimeError::Zero {
                key: LifetimeKey::DataSa,
                which: "hard"
            })
        );
        assert!(matches!(
            config().validate(60),
            Err(LifetimeError::SoftNotBelowHard {
                key: LifetimeKey::DataSa,
                ..
            })
        ));
        let zero_soft = LifetimeConfig {
            data_sa_soft_secs: Some(0),
            ..config()
        };
        assert!(matches!(
            zero_soft.validate(100),
            Err(LifetimeError::Zero { which: "soft", .. })
        ));
        let group = LifetimeConfig {
            group_key: Some(SoftHard {
                soft_secs: 600,
                hard_secs: 600,
            }),
            ..config()
        };
        assert!(matches!(
            group.validate(100),
            Err(LifetimeError::SoftNotBelowHard {
                key: LifetimeKey::GroupKey,
                ..
            })
        ));
        let late_activation = LifetimeConfig {
            timing: DataSaTiming {
                activation_delay_secs: 60,
                deactivation_delay_secs: 70,
            },
            ..config()
        };
        assert!(matches!(
            late_activation.validate(100),
            Err(LifetimeError::ActivationAfterRefresh { .. })
        ));
        let early_drop = LifetimeConfig {
            timing: DataSaTiming {
                activation_delay_secs: 5,
                deactivation_delay_secs: 2,
            },
            ..config()
        };
        assert!(matches!(
            early_drop.validate(100),
            Err(LifetimeError::Timing(_))
        ));
        let long_keep = LifetimeConfig {
            timing: DataSaTiming {
                activation_delay_secs: 5,
                deactivation_delay_secs: 100,
            },
            ..config()
        };
        assert!(matches!(
            long_keep.validate(100),
            Err(LifetimeError::DeactivationPastLifetime { .. })
        ));
        assert_eq!(LifetimeConfig::default().validate(1), Ok(()));
        assert_eq!(LifetimeConfig::default().refresh_interval(), None);
    }

    #[test]
    fn refresh_is_due_once_per_rekey_at_the_shorter_soft_lifetime() {
        let start = origin();
        let mut clock = LifetimeClock::new(config(), 100, start, false);
        assert_eq!(clock.next_deadline(), None);
        clock.rekeyed(start);
        assert_eq!(clock.next_deadline(), Some(start + secs(60)));
        assert_eq!(clock.poll(start + secs(59)), (false, vec![]));
        assert_eq!(clock.poll(start + secs(60)), (true, vec![]));
        assert_eq!(clock.poll(start + secs(61)), (false, vec![]));
        // No rekey came (the refresh failed): the hard lifetime is reported once.
        assert_eq!(clock.next_deadline(), Some(start + secs(100)));
        let (refresh, passed) = clock.poll(start + secs(100));
        assert!(!refresh);
        assert_eq!(
            passed,
            vec![LifetimePassed {
                key: LifetimeKey::DataSa,
                hard: true
            }]
        );
        clock.rekeyed(start + secs(101));
        assert_eq!(clock.next_deadline(), Some(start + secs(161)));
    }
}
