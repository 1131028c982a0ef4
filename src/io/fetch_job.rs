//! The relay loop's resync and state-check thread: a [`FetchJob`] tries each upstream
//! endpoint in order, rounds apart by an exponential backoff, and posts the outcome to its
//! loop. Members resync through the sans-IO resync policy
//! ([`rekeycast_proto::endpoint::resync_policy`]) and the driver's fetches instead; this
//! module goes with the relay's hand-written loop.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use mio::Waker;

use super::resync_client::{fetch_items_from, fetch_state_from, Endpoint, Fetched};
use crate::session::ReceiverEvent;

/// What a [`FetchJob`] asks the endpoints for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fetch {
    /// The manifest and own chunk of every message from `from_seq` on.
    Items {
        /// The first message wanted.
        from_seq: u64,
        /// The order key of the asker's leaf.
        leaf: u32,
    },
    /// The latest signed manifest (a state check).
    State,
}

/// What a [`FetchJob`] found, posted to its loop.
#[derive(Debug)]
pub(crate) enum FetchOutcome {
    /// Resync items, in order, gathered from one or more endpoints.
    Fetched(crate::io::resync_client::Fetched),
    /// An endpoint's state answer.
    State(Vec<u8>),
    /// Every endpoint failed on every round.
    Failed,
}

/// A resync or state check against the endpoints, run on its own thread: waits its delay,
/// then tries each endpoint in order, rounds apart by an exponential backoff, and posts the
/// outcome to its loop (a member's or a relay's) as the command `wrap` makes of it.
///
/// A resync goes on at the next endpoint when one cannot serve the next message the asker
/// needs: it served nothing (it has not got that message: a relay behind, or its history
/// starts later) or stopped at a message it does not hold (a relay's gap: a message it got
/// by resync only). The items already fetched are kept and the next endpoint is asked from
/// the message after them, so a member behind a relay with a gap gets what the relay holds
/// from the relay and the rest from the GCKS. Only an answer that served through to the
/// endpoint's latest message, or said the messages left the group's history (which only the
/// GCKS says), ends the resync early.
pub(crate) struct FetchJob<C> {
    pub(crate) request: Fetch,
    pub(crate) delay: Duration,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) group_id: u32,
    /// The asker's own address, where it is a specific one: resync connections come from it.
    pub(crate) local: Option<std::net::IpAddr>,
    pub(crate) timeout: Duration,
    pub(crate) attempts: u32,
    pub(crate) commands: Sender<C>,
    pub(crate) wrap: fn(FetchOutcome) -> C,
    pub(crate) waker: Arc<Waker>,
}

impl<C: Send + 'static> FetchJob<C> {
    /// Runs the job on a thread of its own named `name`.
    pub(crate) fn spawn(self, name: &str) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || self.run())
    }

    fn run(self) {
        std::thread::sleep(self.delay);
        let outcome = match self.request {
            Fetch::Items { from_seq, leaf } => self.items(from_seq, leaf),
            Fetch::State => self.state(),
        };
        if self.commands.send((self.wrap)(outcome)).is_ok() {
            let _ = self.waker.wake();
        }
    }

    fn state(&self) -> FetchOutcome {
        let mut backoff = Duration::from_millis(200);
        for _ in 0..self.attempts {
            let mut failed = false;
            for &endpoint in &self.endpoints {
                // No manifest yet (an endpoint that has sent nothing) or a failure: the next
                // endpoint may know more.
                match fetch_state_from(self.local, endpoint, self.group_id, self.timeout) {
                    Ok(Some(manifest)) => return FetchOutcome::State(manifest),
                    Ok(None) => {}
                    Err(_) => failed = true,
                }
            }
            if !failed {
                // Every endpoint answered and none has sent anything yet.
                return FetchOutcome::Failed;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        FetchOutcome::Failed
    }

    fn items(&self, from_seq: u64, leaf: u32) -> FetchOutcome {
        let mut backoff = Duration::from_millis(200);
        let mut gathered = Fetched::default();
        for _ in 0..self.attempts {
            // Whether an endpoint failed outright this round (worth another round), as opposed
            // to answering that it does not hold what is needed.
            let mut failed = false;
            let mut answered = false;
            for &endpoint in &self.endpoints {
                let next = from_seq.saturating_add(gathered.items.len() as u64);
                match fetch_items_from(
                    self.local,
                    endpoint,
                    self.group_id,
                    next,
                    leaf,
                    self.timeout,
                ) {
                    Ok(fetched) => {
                        answered = true;
                        let served = !fetched.items.is_empty();
                        gathered.items.extend(fetched.items);
                        if fetched.beyond_history {
                            gathered.beyond_history = true;
                            return FetchOutcome::Fetched(gathered);
                        }
                        if served && !fetched.not_held {
                            return FetchOutcome::Fetched(gathered);
                        }
                    }
                    Err(_) => failed = true,
                }
            }
            if answered && !failed {
                // Every endpoint answered and none holds more: nothing to retry.
                return FetchOutcome::Fetched(gathered);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        if gathered.items.is_empty() {
            FetchOutcome::Failed
        } else {
            FetchOutcome::Fetched(gathered)
        }
    }
}

/// Remembers a resync or state check asked for while a fetch runs (an out-of-sync request
/// supersedes a state check), instead of dropping it: a dropped request left a member behind
/// until its next silence.
pub(crate) fn defer(deferred: &mut Option<ReceiverEvent>, event: &ReceiverEvent) {
    match event {
        ReceiverEvent::OutOfSync { .. } => *deferred = Some(event.clone()),
        ReceiverEvent::StateCheckNeeded { .. } if deferred.is_none() => {
            *deferred = Some(event.clone());
        }
        _ => {}
    }
}

/// The deferred request to start once no fetch runs: a resync from where the session stands
/// now (`next_seq`), or the state check.
pub(crate) fn take_deferred(
    deferred: &mut Option<ReceiverEvent>,
    fetching: bool,
    next_seq: u64,
) -> Option<ReceiverEvent> {
    if fetching {
        return None;
    }
    match deferred.take()? {
        ReceiverEvent::OutOfSync { .. } => Some(ReceiverEvent::OutOfSync { from_seq: next_seq }),
        other => Some(other),
    }
}

#[cfg(test)]
mod deferred_tests {
    use super::*;

    #[test]
    fn a_request_made_while_fetching_is_kept_and_started_afterwards() {
        let mut deferred = None;
        defer(
            &mut deferred,
            &ReceiverEvent::StateCheckNeeded { claimed_seq: 9 },
        );
        // An out-of-sync request supersedes the state check; a later state check does not
        // replace it.
        defer(&mut deferred, &ReceiverEvent::OutOfSync { from_seq: 4 });
        defer(
            &mut deferred,
            &ReceiverEvent::StateCheckNeeded { claimed_seq: 10 },
        );
        assert_eq!(
            take_deferred(&mut deferred, true, 6),
            None,
            "still fetching"
        );
        // Started from where the session stands once the fetch ended.
        assert_eq!(
            take_deferred(&mut deferred, false, 6),
            Some(ReceiverEvent::OutOfSync { from_seq: 6 })
        );
        assert_eq!(take_deferred(&mut deferred, false, 6), None, "once");
        defer(
            &mut deferred,
            &ReceiverEvent::GroupKeyUpdated { seq: 1, version: 1 },
        );
        assert_eq!(deferred, None, "only fetch requests are kept");
    }
}
