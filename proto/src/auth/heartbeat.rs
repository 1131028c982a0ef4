//! Which authentic heartbeats a member (or relay) acts on, and how far it trusts their values.
//!
//! A heartbeat passes the datagram MAC with the group's key, which every current member (and a
//! member removed a moment ago) holds, and it stays valid while its key is held. So the MAC
//! alone lets an outsider replay old heartbeats and an insider forge any. What a heartbeat
//! drives matters: its probe timestamp is what members echo, its repair entries suppress NACKs,
//! its GRTT, group size and backoff factor set every member's NACK backoff, and its arrival
//! keeps the silence timer quiet.
//!
//! [`HeartbeatGuard`] keeps, per sender instance (the random id a sender draws at each start,
//! carried in every heartbeat), a replay window: the highest probe timestamp taken, and the
//! instance's clock as first seen (the probe timestamp counts microseconds of the instance's
//! own clock). A heartbeat of a known instance is taken if its timestamp is above the highest
//! one and not more than [`CLOCK_SLACK`] (plus a drift allowance) ahead of where the
//! instance's clock should be by now; a datagram beyond that is an insider's attempt to push
//! the window past the genuine sender's, and leaves the window untouched. A new instance (a
//! restarted GCKS or relay) is taken only alongside current traffic: its heartbeat must name a
//! message at least as new as the newest the member verified, so an old heartbeat of a
//! forgotten instance does not come back. At most [`MAX_INSTANCES`] instances are kept; the one
//! heard least recently makes room. An instance whose heartbeats are rejected
//! [`MAX_REJECTED_IN_A_ROW`] times in a row is forgotten, so a window poisoned before the
//! genuine sender was heard (an insider who won the race to a new instance's first heartbeat)
//! heals: the next heartbeat of that instance starts it afresh.
//!
//! The values taken from a heartbeat are bounded ([`HeartbeatGuard::check`] returns them
//! bounded): the GRTT within [`MIN_GRTT`]..=[`MAX_GRTT`] and, after the first heartbeat, within
//! half to twice its value of [`GRTT_WINDOW`] ago; the backoff factor at most
//! [`MAX_BACKOFF_FACTOR`]; the group size at most the largest verified manifest's. An insider
//! can still forge heartbeats within these bounds; what it cannot do is silence the sender or
//! stretch members' NACK backoff without limit.
//!
//! The guard is sans-IO: it owns no clock (time is an argument) and checks no MAC (the
//! [`super::datagram::DatagramVerifier`] runs first).

use std::time::{Duration, Instant};

use crate::wire::HeartbeatRepr;

/// How many sender instances a guard keeps a window for.
pub const MAX_INSTANCES: usize = 4;
/// How far a probe timestamp may run ahead of the instance's clock as first seen (network
/// delay of the first heartbeat and jitter).
pub const CLOCK_SLACK: Duration = Duration::from_secs(1);
/// Clock drift allowed between sender and member, in parts per million of the time since an
/// instance was first seen.
pub const DRIFT_PPM: u64 = 1_000;
/// Rejections in a row after which an instance's window is dropped.
pub const MAX_REJECTED_IN_A_ROW: u32 = 4;
/// The smallest GRTT a heartbeat can set.
pub const MIN_GRTT: Duration = Duration::from_millis(1);
/// The largest GRTT a heartbeat can set.
pub const MAX_GRTT: Duration = Duration::from_secs(10);
/// The advertised GRTT moves by at most a factor of two (up or down) per window.
pub const GRTT_WINDOW: Duration = Duration::from_secs(1);
/// The largest NACK backoff factor K a heartbeat can set.
pub const MAX_BACKOFF_FACTOR: u8 = 16;

/// Why a heartbeat was not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeartbeatReject {
    /// Its probe timestamp is not above the highest one taken from its instance.
    #[error("replayed heartbeat")]
    Replayed,
    /// Its probe timestamp is ahead of where its instance's clock can be.
    #[error("heartbeat ahead of its sender's clock")]
    AheadOfClock,
    /// A new instance naming a message older than the newest verified one.
    #[error("heartbeat of a new sender instance with old traffic")]
    StaleInstance,
}

/// Counts of heartbeats taken and rejected, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatCounters {
    /// Heartbeats acted on.
    pub accepted: u64,
    /// Sender instances started (the first heartbeat of each taken).
    pub instances_started: u64,
    /// Instances forgotten to make room, or after rejections in a row.
    pub instances_dropped: u64,
    /// [`HeartbeatReject::Replayed`].
    pub replayed: u64,
    /// [`HeartbeatReject::AheadOfClock`].
    pub ahead_of_clock: u64,
    /// [`HeartbeatReject::StaleInstance`].
    pub stale_instance: u64,
    /// Heartbeats whose GRTT, backoff factor or group size were bounded.
    pub values_bounded: u64,
}

impl HeartbeatCounters {
    /// Every rejection, whatever the reason.
    pub fn rejected(&self) -> u64 {
        self.replayed + self.ahead_of_clock + self.stale_instance
    }
}

/// The values of an accepted heartbeat, bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatValues {
    /// The GRTT to use.
    pub grtt: Duration,
    /// The group size to use, at least 1.
    pub group_size: u32,
    /// The NACK backoff factor to use, within `1..=MAX_BACKOFF_FACTOR`.
    pub backoff_factor: u8,
}

/// A member's replay windows for heartbeats, one per sender instance, and the bounds on what
/// a heartbeat sets. See the [module docs](self).
#[derive(Debug, Default)]
pub struct HeartbeatGuard {
    instances: Vec<Instance>,
    /// The GRTT taken last, with the window it may move within.
    grtt: Option<GrttBound>,
    /// The largest group size of a verified manifest.
    verified_group_size: Option<u32>,
    counters: HeartbeatCounters,
}

#[derive(Debug, Clone, Copy)]
struct Instance {
    id: u32,
    /// When the instance was first heard, and its probe timestamp then.
    anchor_at: Instant,
    anchor_us: u64,
    /// The highest probe timestamp taken.
    high_water_us: u64,
    last_accepted: Instant,
    rejected_in_a_row: u32,
}

#[derive(Debug, Clone, Copy)]
struct GrttBound {
    current: Duration,
    window_start: Instant,
    window_base: Duration,
}

impl HeartbeatGuard {
    /// A guard that knows no sender instance yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters so far.
    pub fn counters(&self) -> &HeartbeatCounters {
        &self.counters
    }

    /// A manifest stating a group of `size` members was verified: heartbeats cannot claim a
    /// larger group than the largest such.
    pub fn note_verified_group_size(&mut self, size: u32) {
        let size = size.max(1);
        self.verified_group_size = Some(self.verified_group_size.map_or(size, |s| s.max(size)));
    }

    /// Checks the authentic heartbeat of message `seq` arriving at `now`. `newest_verified` is
    /// the newest message the member verified (a new sender instance must name at least it).
    /// On acceptance, returns the heartbeat's values bounded.
    pub fn check(
        &mut self,
        now: Instant,
        seq: u64,
        heartbeat: &HeartbeatRepr,
        newest_verified: u64,
    ) -> Result<HeartbeatValues, HeartbeatReject> {
        let outcome = self.check_window(now, seq, heartbeat, newest_verified);
        match outcome {
            Ok(()) => {
                self.counters.accepted += 1;
                Ok(self.values(now, heartbeat))
            }
            Err(reject) => {
                let counter = match reject {
                    HeartbeatReject::Replayed => &mut self.counters.replayed,
                    HeartbeatReject::AheadOfClock => &mut self.counters.ahead_of_clock,
                    HeartbeatReject::StaleInstance => &mut self.counters.stale_instance,
                };
                *counter += 1;
                Err(reject)
            }
        }
    }

    fn check_window(
        &mut self,
        now: Instant,
        seq: u64,
        heartbeat: &HeartbeatRepr,
        newest_verified: u64,
    ) -> Result<(), HeartbeatReject> {
        let timestamp = heartbeat.probe_timestamp_us;
        let Some(index) = self
            .instances
            .iter()
            .position(|i| i.id == heartbeat.instance)
        else {
            if seq < newest_verified {
                return Err(HeartbeatReject::StaleInstance);
            }
            if self.instances.len() >= MAX_INSTANCES {
                self.drop_least_recent();
            }
            self.instances.push(Instance {
                id: heartbeat.instance,
                anchor_at: now,
                anchor_us: timestamp,
                high_water_us: timestamp,
                last_accepted: now,
                rejected_in_a_row: 0,
            });
            self.counters.instances_started += 1;
            return Ok(());
        };
        let instance = &mut self.instances[index];
        let outcome = if timestamp > instance.latest_possible_us(now) {
            Err(HeartbeatReject::AheadOfClock)
        } else if timestamp <= instance.high_water_us {
            Err(HeartbeatReject::Replayed)
        } else {
            Ok(())
        };
        match outcome {
            Ok(()) => {
                instance.high_water_us = timestamp;
                instance.last_accepted = now;
                instance.rejected_in_a_row = 0;
            }
            Err(_) => {
                instance.rejected_in_a_row += 1;
                if instance.rejected_in_a_row >= MAX_REJECTED_IN_A_ROW {
                    self.instances.swap_remove(index);
                    self.counters.instances_dropped += 1;
                }
            }
        }
        outcome
    }

    fn drop_least_recent(&mut self) {
        if let Some(index) = self
            .instances
            .iter()
            .enumerate()
            .min_by_key(|(_, i)| i.last_accepted)
            .map(|(index, _)| index)
        {
            self.instances.swap_remove(index);
            self.counters.instances_dropped += 1;
        }
    }

    /// The heartbeat's values within bounds; moves the GRTT window.
    fn values(&mut self, now: Instant, heartbeat: &HeartbeatRepr) -> HeartbeatValues {
        let advertised = Duration::from_micros(u64::from(heartbeat.grtt_us));
        let clamped = advertised.clamp(MIN_GRTT, MAX_GRTT);
        let grtt = match self.grtt.as_mut() {
            None => {
                self.grtt = Some(GrttBound {
                    current: clamped,
                    window_start: now,
                    window_base: clamped,
                });
                clamped
            }
            Some(bound) => {
                if now.saturating_duration_since(bound.window_start) >= GRTT_WINDOW {
                    bound.window_start = now;
                    bound.window_base = bound.current;
                }
                let low = (bound.window_base / 2).max(MIN_GRTT);
                let high = bound.window_base.saturating_mul(2).min(MAX_GRTT);
                bound.current = clamped.clamp(low, high);
                bound.current
            }
        };
        let backoff_factor = heartbeat.backoff_factor.clamp(1, MAX_BACKOFF_FACTOR);
        let group_size = match self.verified_group_size {
            Some(verified) => heartbeat.group_size.min(verified),
            None => heartbeat.group_size,
        }
        .max(1);
        if grtt != advertised
            || backoff_factor != heartbeat.backoff_factor
            || group_size != heartbeat.group_size
        {
            self.counters.values_bounded += 1;
        }
        HeartbeatValues {
            grtt,
            group_size,
            backoff_factor,
        }
    }
}

impl Instance {
    /// The largest probe timestamp the instance can have sent by `now`: its clock as first
    /// seen, run on by the time since, plus slack for delay, jitter and drift.
    fn latest_possible_us(&self, now: Instant) -> u64 {
        let elapsed = micros(now.saturating_duration_since(self.anchor_at));
        let drift = elapsed / 1_000_000 * DRIFT_PPM;
        self.anchor_us
            .saturating_add(elapsed)
            .saturating_add(drift)
            .saturating_add(micros(CLOCK_SLACK))
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(instance: u32, timestamp_us: u64) -> HeartbeatRepr {
        HeartbeatRepr {
            advertisement: false,
            probe_reply_requested: false,
            instance,
            probe_timestamp_us: timestamp_us,
            grtt_us: 20_000,
            group_size: 100,
            oldest_seq: 1,
            backoff_factor: 4,
            entries: Vec::new(),
        }
    }

    const SECOND: u64 = 1_000_000;

    #[test]
    fn replays_within_an_instance_are_rejected() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        assert!(guard.check(t0, 5, &heartbeat(1, 100), 5).is_ok());
        let t1 = t0 + Duration::from_secs(1);
        assert!(guard.check(t1, 5, &heartbeat(1, 100 + SECOND), 5).is_ok());
        assert_eq!(
            guard.check(t1, 5, &heartbeat(1, 100 + SECOND), 5),
            Err(HeartbeatReject::Replayed)
        );
        assert_eq!(
            guard.check(t1, 5, &heartbeat(1, 100), 5),
            Err(HeartbeatReject::Replayed)
        );
        assert_eq!(guard.counters().replayed, 2);
        assert_eq!(guard.counters().accepted, 2);
    }

    /// A sender restarted after an hour starts its probe clock at zero again, as a new
    /// instance: its first heartbeat is taken at once.
    #[test]
    fn a_restarted_sender_is_a_new_instance_taken_at_once() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        let hour = Duration::from_secs(3600);
        assert!(guard.check(t0, 5, &heartbeat(1, 0), 5).is_ok());
        assert!(guard
            .check(t0 + hour, 9, &heartbeat(1, 3600 * SECOND), 9)
            .is_ok());
        assert!(guard.check(t0 + hour, 9, &heartbeat(2, 0), 9).is_ok());
        assert_eq!(guard.counters().instances_started, 2);
    }

    /// An insider resends the genuine instance's heartbeat with the largest timestamp: it is
    /// rejected, and the genuine heartbeats go on being taken.
    #[test]
    fn a_timestamp_ahead_of_the_instance_clock_is_rejected() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        assert!(guard.check(t0, 5, &heartbeat(1, 50 * SECOND), 5).is_ok());
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            guard.check(t1, 5, &heartbeat(1, u64::MAX), 5),
            Err(HeartbeatReject::AheadOfClock)
        );
        // 10 s later, up to 1 s (and the drift allowance) ahead is fine; 2 s is not.
        assert_eq!(
            guard.check(t1, 5, &heartbeat(1, 62 * SECOND), 5),
            Err(HeartbeatReject::AheadOfClock)
        );
        assert!(guard
            .check(t1, 5, &heartbeat(1, 61 * SECOND - 1), 5)
            .is_ok());
        assert!(guard
            .check(
                t1 + Duration::from_secs(1),
                5,
                &heartbeat(1, 61 * SECOND),
                5
            )
            .is_ok());
    }

    #[test]
    fn a_new_instance_must_name_current_traffic() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        assert_eq!(
            guard.check(t0, 4, &heartbeat(1, 0), 5),
            Err(HeartbeatReject::StaleInstance)
        );
        assert!(guard.check(t0, 5, &heartbeat(1, 0), 5).is_ok());
        // A known instance may name an older message (its heartbeat of the message before).
        assert!(guard.check(t0, 4, &heartbeat(1, 10), 5).is_ok());
    }

    /// Fake instances (an insider inventing ids) evict each other and the genuine one, but
    /// the genuine sender's next heartbeat starts its instance again: it is never silenced.
    #[test]
    fn instances_are_bounded_and_the_genuine_one_comes_back() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        assert!(guard.check(t0, 5, &heartbeat(1, 0), 5).is_ok());
        for fake in 100..110 {
            assert!(guard
                .check(t0, 5, &heartbeat(fake, u64::MAX / 2), 5)
                .is_ok());
        }
        assert_eq!(guard.instances.len(), MAX_INSTANCES);
        assert!(guard.instances.iter().all(|i| i.id != 1));
        let t1 = t0 + Duration::from_secs(1);
        assert!(guard.check(t1, 5, &heartbeat(1, SECOND), 5).is_ok());
    }

    /// An insider who got its forged heartbeat in first for a new instance's id poisons that
    /// window; after a few rejections in a row the window is dropped and the genuine sender's
    /// next heartbeat starts it afresh.
    #[test]
    fn a_poisoned_window_heals() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        assert!(guard.check(t0, 5, &heartbeat(1, u64::MAX - 1), 5).is_ok());
        let mut accepted_at = None;
        for i in 1..=10u64 {
            let now = t0 + Duration::from_secs(i);
            if guard.check(now, 5, &heartbeat(1, i * SECOND), 5).is_ok() {
                accepted_at = Some(i);
                break;
            }
        }
        assert_eq!(accepted_at, Some(u64::from(MAX_REJECTED_IN_A_ROW) + 1));
    }

    #[test]
    fn values_are_bounded() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        guard.note_verified_group_size(50);
        let mut forged = heartbeat(1, 0);
        forged.grtt_us = u32::MAX;
        forged.backoff_factor = u8::MAX;
        forged.group_size = u32::MAX;
        // The first heartbeat sets the GRTT, within its absolute bounds.
        let values = guard.check(t0, 5, &forged, 5).unwrap();
        assert_eq!(
            values,
            HeartbeatValues {
                grtt: MAX_GRTT,
                group_size: 50,
                backoff_factor: MAX_BACKOFF_FACTOR,
            }
        );
        assert_eq!(guard.counters().values_bounded, 1);
    }

    /// After the first heartbeat the GRTT moves at most twofold per window, up or down,
    /// whatever the heartbeats claim and however many arrive.
    #[test]
    fn the_grtt_moves_at_most_twofold_per_window() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut guard = HeartbeatGuard::new();
        let mut genuine = heartbeat(1, 0);
        genuine.grtt_us = 10_000;
        assert_eq!(
            guard.check(t0, 5, &genuine, 5).unwrap().grtt.as_millis(),
            10
        );
        let mut forged = heartbeat(2, 0);
        forged.grtt_us = u32::MAX;
        let mut grtts = Vec::new();
        for step in 0..4u64 {
            let now = t0 + Duration::from_millis(400 * step + 1);
            forged.probe_timestamp_us = 400_000 * step + 1;
            grtts.push(guard.check(now, 5, &forged, 5).unwrap().grtt.as_millis());
        }
        // Windows start at 0 ms and 1201 ms: 10 -> 20 in the first, 20 -> 40 in the second.
        assert_eq!(grtts, vec![20, 20, 20, 40]);
        forged.grtt_us = 0;
        forged.probe_timestamp_us = 3_000_000;
        let low = guard
            .check(t0 + Duration::from_secs(3), 5, &forged, 5)
            .unwrap();
        assert_eq!(low.grtt.as_millis(), 20);
    }
}
