//! Waiting with a deadline: for a condition to hold, or for an event on a channel. Never a
//! fixed sleep: a wait ends as soon as what it waits for happens, and fails (panics, naming
//! it) when the deadline passes first.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

/// How often a condition is polled: short, so a wait ends soon after the condition holds.
pub const POLL: Duration = Duration::from_millis(10);

/// The default patience of the engine helpers: generous, since a loaded machine is slow, and
/// never spent when things work.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `ready` until it returns `Some`, at most `limit`; the value, or `None` at the deadline.
pub fn poll_until<T>(limit: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = ready() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

/// Polls `ready` until it returns `Some`, at most `limit`, and returns the value.
///
/// # Panics
/// At the deadline, with `what` (what was waited for) and the last `describe()` (the state
/// that was seen).
pub fn until<T>(
    limit: Duration,
    what: &str,
    ready: impl FnMut() -> Option<T>,
    describe: impl FnOnce() -> String,
) -> T {
    match poll_until(limit, ready) {
        Some(value) => value,
        None => panic!("{what}: not within {limit:?}; {}", describe()),
    }
}

/// Receives from `events` until `matches` returns `Some`, at most `limit`, and returns the
/// value. Events that do not match are dropped.
///
/// # Panics
/// At the deadline, or when the channel disconnects, naming `what`.
pub fn event<E, T>(
    events: &Receiver<E>,
    limit: Duration,
    what: &str,
    mut matches: impl FnMut(&E) -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) => {
                if let Some(value) = matches(&event) {
                    return value;
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("{what}: not within {limit:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("{what}: the event channel closed first")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_ends_the_wait_at_once() {
        let started = Instant::now();
        assert_eq!(poll_until(Duration::from_secs(10), || Some(7)), Some(7));
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut calls = 0;
        let value = until(
            Duration::from_secs(10),
            "third call",
            || {
                calls += 1;
                (calls == 3).then_some(calls)
            },
            String::new,
        );
        assert_eq!(value, 3);
    }

    #[test]
    fn a_condition_that_never_holds_gives_up_at_the_deadline() {
        let started = Instant::now();
        assert_eq!(poll_until(Duration::from_millis(50), || None::<()>), None);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50) && took < Duration::from_secs(5));
    }

    #[test]
    #[should_panic(expected = "the answer: not within")]
    fn until_names_what_did_not_happen() {
        until(
            Duration::from_millis(20),
            "the answer",
            || None::<()>,
            || "state".into(),
        );
    }

    #[test]
    fn event_skips_what_does_not_match() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        let got = event(&rx, Duration::from_secs(1), "3", |&i| (i >= 3).then_some(i));
        assert_eq!(got, 3);
        assert_eq!(rx.try_recv(), Ok(4));
    }

    #[test]
    #[should_panic(expected = "closed first")]
    fn event_fails_when_the_channel_closes() {
        let (tx, rx) = crossbeam_channel::unbounded::<u8>();
        drop(tx);
        event(&rx, Duration::from_secs(5), "anything", |_| Some(()));
    }
}
