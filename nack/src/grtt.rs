//! The sender's group round-trip time estimate.
//!
//! The sender stamps heartbeats with a probe time ([`GrttEstimator::probe_timestamp_us`]);
//! receivers echo it with how long they held it, in NACKs or in rare, randomly suppressed
//! probe replies; each echo gives `rtt = now - timestamp - hold`. The GRTT is a decaying
//! maximum of these samples: it rises to a larger sample and, for every probe interval
//! without a larger one, falls halfway towards the largest sample of that interval (RFC 5740
//! 5.5.2's GRTT collection, simplified as in ALGORITHMS.md). It stays within the configured
//! bounds. Intervals without any sample leave it unchanged: silence is not evidence that the
//! group got closer.
//!
//! A rise is bounded: within one probe interval the estimate goes at most to twice its value
//! at the interval's start. Any receiver holding the group's MAC key can forge an echo with
//! any age, so a single sample must not be able to move the GRTT (and with it every
//! receiver's NACK backoff and the sender's repair hold-off) to the upper bound at once; a
//! true rise in round-trip time is followed within a few intervals (from 100 ms to 10 s in
//! seven). The caller is expected to drop replayed and stale echoes before they get here.
//!
//! While the estimate is uncertain (after start, and after it rose) the decay runs on short
//! intervals, four GRTTs (at most the probe interval), for
//! [`GrttConfig::converging_intervals`] intervals that brought samples: an initial estimate
//! far above the group's round trip comes down within a few round trips rather than one
//! halving per probe interval, and [`GrttEstimator::probe_interval`] tells the sender to ask
//! for probe replies that often meanwhile. Rises keep their bound per configured probe
//! interval, so an insider gains nothing from the short intervals: a forged small sample can
//! pull the estimate no lower than the largest honest sample of the interval, as before.

use std::time::{Duration, Instant};

use crate::{duration_us, ConfigError, ProbeEcho};

/// Configuration of a [`GrttEstimator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrttConfig {
    /// The estimate before any sample.
    #[serde(rename = "initial_ms", with = "crate::duration_ms")]
    pub initial: Duration,
    /// The lower bound.
    #[serde(rename = "min_ms", with = "crate::duration_ms")]
    pub min: Duration,
    /// The upper bound.
    #[serde(rename = "max_ms", with = "crate::duration_ms")]
    pub max: Duration,
    /// The probe interval: the estimate decays at most once per interval (once converged)
    /// and rises at most twofold per interval.
    #[serde(rename = "probe_interval_ms", with = "crate::duration_ms")]
    pub probe_interval: Duration,
    /// After start and after each rise, this many short intervals (four GRTTs) with samples
    /// decay the estimate before it goes back to one decay per probe interval (0: never
    /// short).
    pub converging_intervals: u8,
}

impl Default for GrttConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            min: Duration::from_millis(1),
            max: Duration::from_secs(10),
            probe_interval: Duration::from_secs(1),
            converging_intervals: 4,
        }
    }
}

impl GrttConfig {
    /// Checks that the bounds are ordered, the initial estimate lies within them and is not
    /// zero, and the interval is not zero.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| ConfigError::Invalid { field, reason };
        if self.min > self.max {
            return Err(invalid("min", "must not exceed max"));
        }
        if self.initial.is_zero() {
            return Err(invalid("initial", "must not be 0"));
        }
        if self.initial < self.min || self.initial > self.max {
            return Err(invalid("initial", "must lie within min..=max"));
        }
        if self.probe_interval.is_zero() {
            return Err(invalid("probe_interval", "must not be zero"));
        }
        Ok(())
    }
}

/// The sender's GRTT estimator.
///
/// Call order: [`probe_timestamp_us`](Self::probe_timestamp_us) when building a heartbeat;
/// [`handle_echo`](Self::handle_echo) for every echo in a NACK or probe reply;
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout); read
/// [`grtt`](Self::grtt) to advertise.
#[derive(Debug, Clone)]
pub struct GrttEstimator {
    config: GrttConfig,
    epoch: Instant,
    grtt: Duration,
    interval_start: Instant,
    /// The estimate at the start of the current interval: rises go at most to twice it.
    interval_base: Duration,
    interval_max: Option<Duration>,
    raised_in_interval: bool,
    /// Short intervals with samples still to run before the estimate counts as converged.
    converging: u8,
    /// When the current rise window (one configured probe interval) started.
    rise_window_start: Instant,
}

impl GrttEstimator {
    /// An estimator whose probe clock starts at `now`.
    pub fn new(config: GrttConfig, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let grtt = config.initial.clamp(config.min, config.max);
        Ok(Self {
            grtt,
            config,
            epoch: now,
            interval_start: now,
            interval_base: grtt,
            interval_max: None,
            raised_in_interval: false,
            converging: config.converging_intervals,
            rise_window_start: now,
        })
    }

    /// The current decay interval: four GRTTs (within the configured minimum and the probe
    /// interval) while the estimate is converging, else the probe interval. A sender asks for
    /// probe replies this often.
    pub fn probe_interval(&self) -> Duration {
        if self.converging > 0 {
            (self.grtt * 4).clamp(
                self.config.min.min(self.config.probe_interval),
                self.config.probe_interval,
            )
        } else {
            self.config.probe_interval
        }
    }

    /// The current estimate.
    pub fn grtt(&self) -> Duration {
        self.grtt
    }

    /// The probe timestamp to put in a heartbeat sent at `now`: microseconds since the
    /// estimator's epoch.
    pub fn probe_timestamp_us(&self, now: Instant) -> u64 {
        duration_us(now.saturating_duration_since(self.epoch))
    }

    /// The largest estimate a sample can raise the GRTT to before the current probe interval
    /// ends: twice the estimate at the interval's start, within the configured bounds.
    pub fn rise_limit(&self) -> Duration {
        self.interval_base
            .saturating_mul(2)
            .clamp(self.config.min, self.config.max)
    }

    /// An echo arrived at `now`. Returns the round-trip sample, or `None` when the echo is
    /// impossible (from the future, or a hold longer than the time since the probe). A sample
    /// above the estimate raises it, to at most [`Self::rise_limit`].
    pub fn handle_echo(&mut self, now: Instant, echo: ProbeEcho) -> Option<Duration> {
        self.handle_timeout(now);
        let now_us = self.probe_timestamp_us(now);
        let rtt_us = now_us
            .checked_sub(echo.timestamp_us)?
            .checked_sub(u64::from(echo.hold_us))?;
        let sample = Duration::from_micros(rtt_us);
        self.interval_max = Some(self.interval_max.map_or(sample, |max| max.max(sample)));
        if sample > self.grtt {
            let limit = self.rise_limit().max(self.grtt);
            let raised = sample.min(limit).clamp(self.config.min, self.config.max);
            if raised > self.grtt {
                self.converging = self.config.converging_intervals;
            }
            self.grtt = raised;
            self.raised_in_interval = true;
        }
        Some(sample)
    }

    /// Ends the probe intervals that are over, letting the estimate decay.
    pub fn handle_timeout(&mut self, now: Instant) {
        while now >= self.interval_start + self.probe_interval() {
            let interval = self.probe_interval();
            self.interval_start += interval;
            if let Some(max) = self.interval_max.take() {
                if !self.raised_in_interval && max < self.grtt {
                    self.grtt =
                        (max + (self.grtt - max) / 2).clamp(self.config.min, self.config.max);
                }
                self.converging = self.converging.saturating_sub(1);
            }
            self.raised_in_interval = false;
            let interval = self.probe_interval();
            if self.interval_max.is_none() && now >= self.interval_start + interval {
                // Skip the empty intervals at once: they change nothing.
                let behind = now.saturating_duration_since(self.interval_start);
                let intervals = behind.as_nanos() / interval.as_nanos();
                let skip = u32::try_from(intervals).unwrap_or(u32::MAX);
                self.interval_start += interval.saturating_mul(skip);
            }
        }
        // Rises are bounded per configured probe interval, whatever the decay intervals.
        while now >= self.rise_window_start + self.config.probe_interval {
            let behind = now.saturating_duration_since(self.rise_window_start);
            let windows = behind.as_nanos() / self.config.probe_interval.as_nanos();
            let skip = u32::try_from(windows).unwrap_or(u32::MAX);
            self.rise_window_start += self.config.probe_interval.saturating_mul(skip);
            self.interval_base = self.grtt;
        }
    }

    /// The end of the current decay interval (or rise window, if sooner).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(
            (self.interval_start + self.probe_interval())
                .min(self.rise_window_start + self.config.probe_interval),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GrttConfig {
        GrttConfig {
            initial: Duration::from_millis(10),
            min: Duration::from_millis(5),
            max: Duration::from_millis(500),
            probe_interval: Duration::from_millis(100),
            // These tests are about the converged estimator's intervals.
            converging_intervals: 0,
        }
    }

    #[test]
    fn converges_within_a_few_round_trips_after_start() {
        let t0 = Instant::now();
        let config = GrttConfig {
            initial: Duration::from_millis(50),
            min: Duration::from_millis(1),
            max: Duration::from_secs(10),
            probe_interval: Duration::from_secs(1),
            converging_intervals: 4,
        };
        let mut e = GrttEstimator::new(config, t0).unwrap();
        assert_eq!(e.probe_interval(), Duration::from_millis(200));
        // The true round trip is 24 ms: one echo per short interval.
        let mut now = t0;
        while now < t0 + Duration::from_millis(800) {
            let probe = echo(&e, now, 0);
            e.handle_echo(now + Duration::from_millis(24), probe);
            now = e.poll_timeout().unwrap();
            e.handle_timeout(now);
        }
        // Four short intervals: 50 -> 37 -> 30.5 -> 27.25 -> 25.6 ms, within 800 ms, where
        // one halving per second would still be at 37 ms.
        assert!(e.grtt() <= Duration::from_millis(26), "{:?}", e.grtt());
        assert!(e.grtt() >= Duration::from_millis(24));
        assert_eq!(e.probe_interval(), Duration::from_secs(1), "converged");
        // A rise makes it uncertain again; the rise stays within twice per probe interval.
        let probe = echo(&e, now, 0);
        e.handle_echo(now + Duration::from_millis(500), probe);
        assert!(e.grtt() <= Duration::from_millis(52));
        assert!(e.probe_interval() < Duration::from_secs(1));
    }

    fn echo(estimator: &GrttEstimator, sent: Instant, hold_ms: u32) -> ProbeEcho {
        ProbeEcho {
            timestamp_us: estimator.probe_timestamp_us(sent),
            hold_us: hold_ms * 1000,
        }
    }

    #[test]
    fn rises_at_most_twofold_per_interval_and_halves_the_excess() {
        let t0 = Instant::now();
        let mut e = GrttEstimator::new(config(), t0).unwrap();
        let probe = echo(&e, t0, 20);
        // 90 ms after the probe with 20 ms hold: 70 ms, but the estimate (10 ms) at most
        // doubles within the interval.
        let sample = e.handle_echo(t0 + Duration::from_millis(90), probe);
        assert_eq!(sample, Some(Duration::from_millis(70)));
        assert_eq!(e.grtt(), Duration::from_millis(20));
        // Later intervals double it again until it reaches the samples.
        for (interval, expected) in [(1u64, 40), (2, 70)] {
            let sent = t0 + Duration::from_millis(100 * interval);
            let probe = echo(&e, sent, 0);
            e.handle_echo(sent + Duration::from_millis(70), probe);
            assert_eq!(
                e.grtt(),
                Duration::from_millis(expected),
                "interval {interval}"
            );
        }
        e.handle_timeout(t0 + Duration::from_millis(300));
        let probe = echo(&e, t0 + Duration::from_millis(300), 0);
        e.handle_echo(t0 + Duration::from_millis(380), probe);
        assert_eq!(e.grtt(), Duration::from_millis(80));
        // Next interval: only 40 ms samples; the excess (40 ms) halves at the interval's end.
        let sent = t0 + Duration::from_millis(420);
        let probe = echo(&e, sent, 0);
        e.handle_echo(sent + Duration::from_millis(40), probe);
        e.handle_timeout(t0 + Duration::from_millis(500));
        assert_eq!(e.grtt(), Duration::from_millis(60));
    }

    #[test]
    fn bounds_and_impossible_echoes() {
        let t0 = Instant::now();
        let mut e = GrttEstimator::new(config(), t0).unwrap();
        let now = t0 + Duration::from_secs(5);
        let huge = ProbeEcho {
            timestamp_us: 0,
            hold_us: 0,
        };
        e.handle_echo(now, huge);
        assert_eq!(
            e.grtt(),
            Duration::from_millis(20),
            "one sample at most doubles it"
        );
        for i in 1..10u64 {
            e.handle_echo(now + Duration::from_millis(100 * i), huge);
        }
        assert_eq!(e.grtt(), Duration::from_millis(500));
        let future = ProbeEcho {
            timestamp_us: e.probe_timestamp_us(now) + 1,
            hold_us: 0,
        };
        assert_eq!(e.handle_echo(now, future), None);
        let long_hold = ProbeEcho {
            timestamp_us: e.probe_timestamp_us(now),
            hold_us: 1,
        };
        assert_eq!(e.handle_echo(now, long_hold), None);
        // Tiny samples decay towards them but never below the minimum.
        for i in 1..40u64 {
            let sent = now + Duration::from_millis(100 * i);
            let probe = echo(&e, sent, 0);
            e.handle_echo(sent + Duration::from_millis(1), probe);
        }
        e.handle_timeout(now + Duration::from_secs(10));
        assert_eq!(e.grtt(), Duration::from_millis(5));
    }

    /// An insider's single forged echo of any age (here an hour) moves the estimate by at
    /// most a factor of two, whatever the configured maximum.
    #[test]
    fn one_forged_echo_moves_the_estimate_at_most_twofold() {
        let t0 = Instant::now();
        let config = GrttConfig {
            max: Duration::from_secs(10),
            ..config()
        };
        let mut e = GrttEstimator::new(config, t0).unwrap();
        let now = t0 + Duration::from_secs(3600);
        e.handle_timeout(now);
        let before = e.grtt();
        let forged = ProbeEcho {
            timestamp_us: 0,
            hold_us: 0,
        };
        assert_eq!(e.handle_echo(now, forged), Some(Duration::from_secs(3600)));
        assert_eq!(e.grtt(), before * 2);
        assert_eq!(e.rise_limit(), before * 2);
    }

    #[test]
    fn silence_keeps_the_estimate() {
        let t0 = Instant::now();
        let mut e = GrttEstimator::new(config(), t0).unwrap();
        let probe = echo(&e, t0, 0);
        e.handle_echo(t0 + Duration::from_millis(90), probe);
        // A 90 ms sample doubles the 10 ms estimate; silence changes nothing after that.
        e.handle_timeout(t0 + Duration::from_secs(3600));
        assert_eq!(e.grtt(), Duration::from_millis(20));
        assert!(e.poll_timeout().unwrap() > t0 + Duration::from_secs(3600));
    }
}
