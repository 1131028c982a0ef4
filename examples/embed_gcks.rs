//! A small product embedding the GCKS: the smallest complete use of [`rekeycast::Gcks`] and
//! [`rekeycast::Member`] in one process. Both are thin handles over rekeycast's one driver,
//! running the sans-IO `GcksEndpoint` and `MemberEndpoint` of `rekeycast-proto`.
//!
//! It starts a GCKS on a loopback multicast group, admits 20 members in one batch (the
//! product's registration step is a function call here: `Gcks::apply` takes the batch's joins
//! and leaves and returns a ticket whose answers carry each joiner's registration bundle, which
//! a real product carries over its own authenticated, confidential channel), starts a `Member`
//! from each bundle, then rekeys 3 times, each time with one member leaving and one joining. It prints every member's key events (sequence numbers, versions
//! and SPIs, never key bytes) and shuts everything down cleanly.
//!
//! Run it with `cargo run --example embed_gcks`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Change, ChangeAnswer, ResyncAnswer};
use rekeycast::lkh::MemberId;
use rekeycast::session::ReceiverEvent;
use rekeycast::{Gcks, GcksConfig, GcksEvent, Member, MemberConfig};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    // A group and port of this process, so that two runs on one host do not meet.
    let pid = std::process::id();
    let group = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 79, (pid >> 8) as u8, pid as u8),
        40_000 + (pid % 10_000) as u16,
    ));
    // A real product loads its key from its state directory (`rekeycast::keyfile`).
    let signing_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut config = GcksConfig::loopback(group);
    // Rekey only when told to (a product may as well let the batch interval decide).
    config.batch_interval = Duration::from_secs(3600);
    let gcks = Gcks::start(config, signing_key)?;
    println!("GCKS on {group}, feedback at {}", gcks.local_addr());

    let mut members: BTreeMap<u64, Member> = BTreeMap::new();
    let joining: Vec<u64> = (1..=20).collect();
    rekey(&gcks, &mut members, &joining, &[], group)?;
    for (leaving, joining) in [(5, 21), (12, 22), (21, 23)] {
        rekey(&gcks, &mut members, &[joining], &[leaving], group)?;
    }

    let stats = gcks.stats()?;
    println!(
        "done: {} members, message {}, group key version {}; {} NACKs, {} repair symbols",
        stats.members,
        stats.seq,
        stats.group_key_version,
        stats.sender.nacks_received,
        stats.sender.repair_symbols_sent
    );
    for (_, member) in members {
        member.shutdown()?;
    }
    gcks.shutdown()?;
    Ok(())
}

/// One batch: `leaving` leave, `joining` join (each gets a `Member` from its bundle), then the
/// rekey message goes out and every member's key events are printed until all have it.
fn rekey(
    gcks: &Gcks,
    members: &mut BTreeMap<u64, Member>,
    joining: &[u64],
    leaving: &[u64],
    group: SocketAddr,
) -> Result<(), Error> {
    // One batch: every change in one call, answered change by change through the ticket.
    let changes: Vec<Change> = leaving
        .iter()
        .map(|id| Change::Leave(MemberId(*id)))
        .chain(joining.iter().map(|id| Change::Join(MemberId(*id))))
        .collect();
    let ticket = gcks.apply(changes)?;
    gcks.rekey_now()?;
    for id in leaving {
        if let Some(member) = members.remove(id) {
            member.shutdown()?;
        }
    }
    // A leave is answered once it is recorded (with a state directory: durably); a join once
    // the batch is built, a little before its message is sent, so that the member can join
    // the multicast group first.
    let answers = ticket
        .wait(Duration::from_secs(30))
        .ok_or("the batch's answers did not come in 30 s")?;
    let ids = leaving.iter().chain(joining);
    for (id, answer) in ids.zip(answers) {
        match answer {
            ChangeAnswer::Leave(outcome) => println!("member {id} left: {:?}", outcome?),
            ChangeAnswer::Join(bundle) => {
                let bundle = bundle?;
                let config = MemberConfig::loopback(group, gcks.local_addr());
                members.insert(*id, Member::start(&bundle, config)?);
                println!(
                    "member {id} joined: its keys arrive in message {}",
                    bundle.first_seq
                );
            }
        }
    }
    let seq = loop {
        match gcks.events().recv_timeout(Duration::from_secs(30))? {
            GcksEvent::Rekeyed {
                seq,
                joined,
                left,
                members,
                chunks,
                ..
            } => {
                println!(
                    "message {seq}: {joined} joined, {left} left, {members} members, {chunks} \
                     chunks"
                );
                break seq;
            }
            // A failed batch is retried by the GCKS with the same changes: report and wait.
            GcksEvent::BatchFailed {
                seq,
                reason,
                retry_in,
                ..
            } => println!("message {seq} failed ({reason}); retry in {retry_in:?}"),
            GcksEvent::Poisoned { reason } => return Err(reason.into()),
            _ => {}
        }
    };
    wait_for_key(gcks, members, seq)
}

/// Prints the members' key events until every one has message `seq`'s group key.
fn wait_for_key(gcks: &Gcks, members: &BTreeMap<u64, Member>, seq: u64) -> Result<(), Error> {
    let mut have = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while have.len() < members.len() {
        if Instant::now() > deadline {
            return Err(
                format!("{} members lack message {seq}", members.len() - have.len()).into(),
            );
        }
        let mut idle = true;
        for (id, member) in members {
            while let Ok(event) = member.events().try_recv() {
                idle = false;
                match event {
                    ReceiverEvent::GroupKeyUpdated { seq: got, version } => {
                        println!("  member {id}: message {got}: group key version {version}");
                        if got >= seq {
                            have.insert(*id);
                        }
                    }
                    ReceiverEvent::NewDataSa { seq: got, data_sa } => println!(
                        "  member {id}: message {got}: new Data SA, SPI {:#010x}",
                        data_sa.spi
                    ),
                    ReceiverEvent::OutOfSync { from_seq } => {
                        println!("  member {id}: out of sync from message {from_seq}: resyncing");
                        resync(gcks, member)?;
                    }
                    ReceiverEvent::StateCheckNeeded { .. } => {
                        if let Some(manifest) = gcks.latest_manifest()? {
                            let _ = member.state_answer(manifest)?;
                        }
                    }
                    ReceiverEvent::MustReregister => {
                        return Err(format!("member {id} must re-register").into());
                    }
                    _ => {}
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

/// What a resync endpoint does, in process: hands the member every message it lacks from the
/// GCKS's history.
fn resync(gcks: &Gcks, member: &Member) -> Result<(), Error> {
    loop {
        let stats = member.stats()?;
        match gcks.resync_item(stats.next_seq, stats.order_key)? {
            ResyncAnswer::Item { manifest, chunk } => {
                if member.resync(vec![(manifest, chunk)])?.is_err() {
                    return Ok(());
                }
            }
            ResyncAnswer::BeyondHistory => {
                member.beyond_history()?;
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
}
