//! Fixtures over the running engines: admitting members through a GCKS, and waiting (with a
//! deadline) until a message is sent by the GCKS or applied by members.

use std::time::Duration;

use rekeycast::gcks::{Gcks, GcksEvent};
use rekeycast::lkh::{MemberId, RegistrationBundle};
use rekeycast::member::Member;

use crate::wait;

/// Admits `ids` in one batch (the next message) and returns their bundles in order, once the
/// batch is built; its message goes out after the GCKS's admission delay
/// ([`wait_sent`] waits for that). `relay(id)` tells which ids join as relays.
///
/// # Panics
/// When a join is refused or its bundle does not come within [`wait::PATIENCE`].
pub fn admit_with(
    gcks: &Gcks,
    ids: &[u64],
    relay: impl Fn(u64) -> bool,
) -> Vec<RegistrationBundle> {
    let replies: Vec<_> = ids
        .iter()
        .map(|&id| {
            if relay(id) {
                gcks.join_relay(MemberId(id)).unwrap()
            } else {
                gcks.join(MemberId(id)).unwrap()
            }
        })
        .collect();
    gcks.rekey_now().unwrap();
    replies
        .into_iter()
        .zip(ids)
        .map(|(reply, id)| match reply.recv_timeout(wait::PATIENCE) {
            Ok(Ok(bundle)) => bundle,
            Ok(Err(error)) => panic!("join of member {id} refused: {error}"),
            Err(error) => panic!("no bundle for member {id}: {error}"),
        })
        .collect()
}

/// [`admit_with`] where every id joins as a member.
pub fn admit(gcks: &Gcks, ids: &[u64]) -> Vec<RegistrationBundle> {
    admit_with(gcks, ids, |_| false)
}

/// Waits until the GCKS reports message `seq` (or a later one) sent: its initial transmission
/// is on the wire. Consumes the GCKS's events up to it.
///
/// # Panics
/// When that does not happen within [`wait::PATIENCE`].
pub fn wait_sent(gcks: &Gcks, seq: u64) {
    wait::event(
        gcks.events(),
        wait::PATIENCE,
        &format!("message {seq} sent"),
        |event| matches!(event, GcksEvent::Sent { seq: sent } if *sent >= seq).then_some(()),
    );
}

/// Rekeys once (a refresh of the group key), waits until it is sent and returns its sequence
/// number.
pub fn rekey(gcks: &Gcks) -> u64 {
    let seq = gcks.stats().unwrap().seq + 1;
    gcks.rekey_now().unwrap();
    wait_sent(gcks, seq);
    seq
}

/// Waits until every member applied message `seq`, at most `limit`; returns how long it took.
///
/// # Panics
/// At the deadline, listing the members still behind (id, next sequence number).
pub fn wait_applied(members: &[(u64, Member)], seq: u64, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    wait::until(
        limit,
        &format!("every member applied message {seq}"),
        || {
            members
                .iter()
                .all(|(_, m)| m.stats().unwrap().next_seq > seq)
                .then_some(())
        },
        || {
            let behind: Vec<(u64, u64)> = members
                .iter()
                .map(|(id, m)| (*id, m.stats().unwrap().next_seq))
                .filter(|(_, next)| *next <= seq)
                .collect();
            format!("members (id, next seq) still behind: {behind:?}")
        },
    );
    started.elapsed()
}
