//! A small table of named deadlines: the earliest is found without a scan over connections or
//! sessions, the way quinn-proto's `TimerTable` and smoltcp's `poll_at` do it.

use std::time::Instant;

/// Deadlines indexed by a small key type `K` (an enum of an endpoint's timers, as `usize`
/// through `Into`): set, stop, the earliest, and the expired ones.
#[derive(Debug, Clone)]
pub struct TimerTable<const N: usize> {
    at: [Option<Instant>; N],
}

impl<const N: usize> Default for TimerTable<N> {
    fn default() -> Self {
        Self { at: [None; N] }
    }
}

impl<const N: usize> TimerTable<N> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets timer `timer` to fire at `at` (replacing any earlier setting).
    pub fn set(&mut self, timer: usize, at: Instant) {
        if let Some(slot) = self.at.get_mut(timer) {
            *slot = Some(at);
        }
    }

    /// Sets timer `timer` to `at` unless it is already set to fire earlier.
    pub fn set_earliest(&mut self, timer: usize, at: Instant) {
        if let Some(slot) = self.at.get_mut(timer) {
            *slot = Some(slot.map_or(at, |old| old.min(at)));
        }
    }

    /// Stops timer `timer`.
    pub fn stop(&mut self, timer: usize) {
        if let Some(slot) = self.at.get_mut(timer) {
            *slot = None;
        }
    }

    /// When timer `timer` fires, if set.
    pub fn get(&self, timer: usize) -> Option<Instant> {
        self.at.get(timer).copied().flatten()
    }

    /// Whether timer `timer` is set and due at `now`.
    pub fn is_due(&self, timer: usize, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }

    /// The earliest deadline of any timer.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }

    /// Stops and returns the first timer due at `now`, if any; call until `None` to take each
    /// expired timer once.
    pub fn expire_before(&mut self, now: Instant) -> Option<usize> {
        let timer = self
            .at
            .iter()
            .position(|at| at.is_some_and(|at| at <= now))?;
        self.at[timer] = None;
        Some(timer)
    }
}

#[cfg(test)]
// The test starts its virtual time at the process's present instant.
#[allow(clippy::disallowed_methods)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_earliest_timer_is_the_next_timeout_and_expires_once() {
        // Any instant will do as the origin.
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut table = TimerTable::<3>::new();
        assert_eq!(table.next_timeout(), None);
        table.set(0, t0 + Duration::from_millis(30));
        table.set(2, t0 + Duration::from_millis(10));
        table.set_earliest(0, t0 + Duration::from_millis(50));
        assert_eq!(table.get(0), Some(t0 + Duration::from_millis(30)));
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(table.expire_before(t0 + Duration::from_millis(20)), Some(2));
        assert_eq!(table.expire_before(t0 + Duration::from_millis(20)), None);
        assert!(table.is_due(0, t0 + Duration::from_millis(30)));
        table.stop(0);
        assert_eq!(table.next_timeout(), None);
        // Out-of-range timers are ignored, not a panic.
        table.set(7, t0);
        assert_eq!(table.next_timeout(), None);
    }
}
