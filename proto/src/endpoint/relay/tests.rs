//! The relay endpoint against a real GCKS sender session over a virtual network: what it stores
//! and when, what it holds back until stored, how it resyncs its own keys, how it stops.

// Test helpers unwrap: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::*;
use crate::endpoint::{FetchWhat, ResyncEndpoint, ResyncProtocol, StoreErrorKind};
use crate::lkh::MemberId;
use crate::resync::Lookup;
use crate::session::{ReceiverEvent, SenderConfig, SenderSession};
use crate::test_support::{test_addr, TestGcks};

const GROUP: u32 = 0x5E1A_0002;
const SPI: u32 = 3;

fn addr(last: u8) -> SocketAddr {
    test_addr(last, 7000)
}

/// The GCKS's address (its feedback and resync endpoint).
fn gcks_addr() -> SocketAddr {
    addr(1)
}

/// A GCKS (tree, signing key, sender session) and a relay endpoint registered with it, over a
/// virtual network whose time moves only as [`Net::run`] advances it.
struct Net {
    gcks: TestGcks,
    relay: RelayEndpoint,
    now: Instant,
    /// GCKS datagrams of this message never reach the relay.
    lose_seq: Option<u64>,
    /// Whether store operations are acknowledged (`Ok`) as they come.
    ack_stores: bool,
    /// Whether fetches are answered from the GCKS's history.
    serve_fetches: bool,
    /// Store operations handed out, in order (acknowledged or not).
    stores: Vec<(StoreId, RelayStoreOp)>,
    events: Vec<RelayEvent>,
    /// The port and destination of every datagram the relay sent.
    transmits: Vec<(Port, Destination)>,
    fetches: Vec<FetchRequest>,
}

/// The GCKS with `members` members and the relay, the first message (admitting them all)
/// queued but not yet sent.
fn net(members: u64, persistent: bool) -> Net {
    // Any instant will do as the origin: the time goes on only as the test advances it.
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let sender_config = SenderConfig {
        heartbeat_min: Duration::from_millis(20),
        ..SenderConfig::default()
    };
    let (gcks, batch) = TestGcks::new(GROUP, SPI, (11, 5), members + 1, sender_config, now);
    let bundle = gcks.tree.join(MemberId(1)).unwrap();
    let mut config = RelayEndpointConfig::new(gcks_addr());
    config.persistent = persistent;
    config.session.downstream.heartbeat_min = Duration::from_millis(20);
    config.resync.gcks = vec![ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: gcks_addr(),
    }];
    let relay = RelayEndpoint::new(&bundle, config, now).unwrap();
    let mut net = Net {
        gcks,
        relay,
        now,
        lose_seq: None,
        ack_stores: true,
        serve_fetches: true,
        stores: Vec::new(),
        events: Vec::new(),
        transmits: Vec::new(),
        fetches: Vec::new(),
    };
    net.gcks.queue(now, &batch);
    net
}

impl Net {
    /// Queues the next message at the GCKS: member `id` joins.
    fn join(&mut self, id: u64) {
        self.gcks.rekey(self.now, &[id], &[]);
    }

    /// Runs the GCKS and the relay for `duration` of virtual time.
    fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        let mut buf = vec![0u8; 65_536];
        for _ in 0..1_000_000 {
            let mut busy = false;
            while let Some(transmit) = self.gcks.sender.poll_transmit(self.now, &mut buf) {
                busy = true;
                let bytes = &buf[..transmit.len];
                let seq = crate::wire::Packet::new_checked(bytes).unwrap().seq();
                if self.lose_seq != Some(seq) {
                    let now = self.now;
                    self.relay
                        .handle_datagram(now, Port::Listen, gcks_addr(), bytes);
                }
            }
            while let Some(transmit) = self.relay.poll_transmit(self.now, &mut buf) {
                busy = true;
                self.transmits.push((transmit.port, transmit.destination));
                if transmit.port == Port::Feedback {
                    self.gcks
                        .sender
                        .handle_datagram(self.now, addr(2), &buf[..transmit.len]);
                }
            }
            busy |= self.drain();
            if busy {
                continue;
            }
            if !self
                .gcks
                .wait_for_timers(&mut self.now, end, &mut self.relay)
            {
                return;
            }
        }
        panic!("the virtual network never went quiet");
    }

    /// Takes the relay's store operations, fetches and events; true if there was any.
    fn drain(&mut self) -> bool {
        let mut busy = false;
        while let Some((id, op)) = self.relay.poll_store() {
            busy = true;
            self.stores.push((id, op));
            if self.ack_stores {
                self.relay.handle_stored(self.now, id, Ok(()));
            }
        }
        while let Some(fetch) = self.relay.poll_fetch() {
            busy = true;
            self.fetches.push(fetch);
            if self.serve_fetches {
                for item in answer(&self.gcks.sender, fetch.what) {
                    self.relay.handle_fetched(self.now, fetch.id, item);
                }
            }
        }
        while self.relay.poll_cancel_fetch().is_some() {
            busy = true;
        }
        while let Some(event) = self.relay.poll_event() {
            busy = true;
            self.events.push(event);
        }
        busy
    }

    /// The sequence numbers of the messages stored, in order.
    fn stored_messages(&self) -> Vec<u64> {
        self.stores
            .iter()
            .filter_map(|(_, op)| match op {
                RelayStoreOp::Message(message) => Some(message.seq),
                RelayStoreOp::Keys(_) => None,
            })
            .collect()
    }

    /// The last message of each key save, in order.
    fn saved_keys(&self) -> Vec<u64> {
        self.stores
            .iter()
            .filter_map(|(_, op)| match op {
                RelayStoreOp::Keys(keys) => Some(keys.last_seq()),
                RelayStoreOp::Message(_) => None,
            })
            .collect()
    }
}

/// What the GCKS's resync endpoint answers for `what`, item by item.
fn answer(gcks: &SenderSession, what: FetchWhat) -> Vec<Fetched> {
    match what {
        FetchWhat::State => match gcks.latest_manifest() {
            Some((_, manifest)) => vec![Fetched::State(manifest.to_vec())],
            None => vec![Fetched::End],
        },
        FetchWhat::Items { from_seq, leaf } => {
            let latest = gcks.latest_seq().unwrap_or(0);
            let mut items = Vec::new();
            for seq in from_seq..=latest {
                match gcks.resync_item(seq, leaf) {
                    Ok(item) => items.push(Fetched::Item {
                        manifest: item.manifest.to_vec(),
                        chunk: item.chunk.to_vec(),
                    }),
                    Err(_) => {
                        items.push(Fetched::NotHeld);
                        return items;
                    }
                }
            }
            items.push(Fetched::End);
            items
        }
    }
}

fn forwarded(events: &[RelayEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            RelayEvent::Forwarded { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

#[test]
fn a_forwarded_message_is_stored_before_the_keys_and_its_events_wait_for_both() {
    let mut net = net(6, true);
    net.ack_stores = false;
    net.run(Duration::from_millis(500));
    assert_eq!(net.relay.session().next_seq(), 2, "message 1 applied");
    // The message first, then the keys that applied it.
    let kinds: Vec<_> = net
        .stores
        .iter()
        .map(|(_, op)| match op {
            RelayStoreOp::Message(m) => ("message", m.seq),
            RelayStoreOp::Keys(k) => ("keys", k.last_seq()),
        })
        .collect();
    assert_eq!(kinds, vec![("message", 1), ("keys", 1)]);
    // The stored message is the one the relay serves.
    let RelayStoreOp::Message(stored) = &net.stores[0].1 else {
        unreachable!()
    };
    assert_eq!(
        stored,
        &StoredMessage::from_prepared(net.relay.session().message(1).unwrap())
    );
    // Forwarded all the same (it went downstream at once) ...
    assert!(net.transmits.contains(&(Port::Serve, Destination::Group)));
    assert_eq!(net.relay.stats().relay.forwarded, 1);
    // ... but the owner hears of it only once both are durable.
    assert!(net.events.is_empty(), "{:?}", net.events);
    let (message_id, keys_id) = (net.stores[0].0, net.stores[1].0);
    net.relay.handle_stored(net.now, message_id, Ok(()));
    assert_eq!(net.relay.poll_event(), None, "the keys are not saved yet");
    net.relay.handle_stored(net.now, keys_id, Ok(()));
    net.drain();
    assert_eq!(forwarded(&net.events), vec![1]);
    assert!(net.events.iter().any(|e| matches!(
        e,
        RelayEvent::Upstream(ReceiverEvent::GroupKeyUpdated { seq: 1, .. })
    )));
    // Served from its history.
    let source = net.relay.resync_source().unwrap();
    assert_eq!(source.latest().map(|(seq, _)| seq), Some(1));
    assert!(matches!(source.chunk(1, 0), Lookup::Found(_)));
    // The next message: its own store operations, nothing saved twice.
    net.ack_stores = true;
    net.join(100);
    net.run(Duration::from_millis(500));
    assert_eq!(net.stored_messages(), vec![1, 2]);
    assert_eq!(net.saved_keys(), vec![1, 2]);
    assert_eq!(forwarded(&net.events), vec![1, 2]);
}

#[test]
fn failed_store_operations_are_counted_and_the_keys_saved_again_at_shutdown() {
    let mut net = net(4, true);
    net.ack_stores = false;
    net.run(Duration::from_millis(500));
    let failure = || StoreError {
        kind: StoreErrorKind::NoSpace,
        detail: "disk full".into(),
    };
    let ids: Vec<StoreId> = net.stores.iter().map(|(id, _)| *id).collect();
    for id in ids {
        net.relay.handle_stored(net.now, id, Err(failure()));
    }
    let stats = net.relay.stats();
    assert_eq!((stats.store_failures, stats.key_save_failures), (1, 1));
    // The relay goes on: the events are released and the message is served from memory.
    net.drain();
    assert_eq!(forwarded(&net.events), vec![1]);
    assert!(net.relay.resync_source().unwrap().latest().is_some());
    // An acknowledgement nobody waits for changes nothing.
    net.relay
        .handle_stored(net.now, StoreId(999), Err(failure()));
    assert_eq!(net.relay.stats().store_failures, 1);
    // Shutdown tries the keys again and stops only once they are durable.
    net.stores.clear();
    net.relay.handle_command(net.now, RelayCommand::Shutdown);
    assert!(!net.relay.is_stopped());
    net.drain();
    assert_eq!(net.saved_keys(), vec![1]);
    assert_eq!(
        net.relay.poll_timeout(),
        None,
        "no timer while shutting down"
    );
    let mut buf = vec![0u8; 65_536];
    net.relay
        .handle_datagram(net.now, Port::Serve, addr(9), &[0u8; 64]);
    assert_eq!(net.relay.poll_transmit(net.now, &mut buf), None);
    net.relay.handle_stored(net.now, net.stores[0].0, Ok(()));
    assert!(net.relay.is_stopped());
}

#[test]
fn a_shutdown_with_saved_keys_stops_at_once_and_abort_stores_nothing() {
    let mut net = net(4, true);
    net.run(Duration::from_millis(500));
    let stored = net.stores.len();
    net.relay.handle_command(net.now, RelayCommand::Shutdown);
    assert!(net.relay.is_stopped(), "the keys were saved already");
    net.drain();
    assert_eq!(net.stores.len(), stored);

    // Abort with a message just forwarded and not yet stored: nothing more is handed out.
    let mut net = self::net(4, true);
    net.ack_stores = false;
    // Deliver message 1 without draining the relay's store operations.
    let mut buf = vec![0u8; 65_536];
    for _ in 0..10_000 {
        let Some(transmit) = net.gcks.sender.poll_transmit(net.now, &mut buf) else {
            break;
        };
        net.relay
            .handle_datagram(net.now, Port::Listen, gcks_addr(), &buf[..transmit.len]);
    }
    assert_eq!(net.relay.session().next_seq(), 2);
    net.relay.handle_command(net.now, RelayCommand::Abort);
    assert!(net.relay.is_stopped());
    assert!(net.relay.poll_store().is_none());
    assert!(net.relay.poll_event().is_none());
    assert!(net.relay.poll_transmit(net.now, &mut buf).is_none());
    assert_eq!(net.relay.poll_timeout(), None);
}

#[test]
fn without_persistence_nothing_is_stored_and_events_come_at_once() {
    let mut net = net(4, false);
    net.run(Duration::from_millis(500));
    assert!(net.stores.is_empty());
    assert_eq!(forwarded(&net.events), vec![1]);
    net.relay.handle_command(net.now, RelayCommand::Shutdown);
    assert!(net.relay.is_stopped());
}

#[test]
fn a_missed_message_is_resynced_by_the_policy_applied_not_forwarded_and_the_keys_saved() {
    let mut net = net(4, true);
    net.run(Duration::from_millis(500));
    assert_eq!(net.relay.session().next_seq(), 2);
    // Message 2 never reaches the relay; message 3 does, and it cannot check it.
    net.lose_seq = Some(2);
    net.join(100);
    net.run(Duration::from_millis(300));
    net.lose_seq = None;
    net.join(101);
    net.run(Duration::from_secs(20));
    assert!(
        net.relay.session().next_seq() > 3,
        "the relay caught up: {:?}",
        net.relay.stats()
    );
    // Its own keys went through the policy: a state check, then the items.
    assert!(net
        .fetches
        .iter()
        .any(|f| f.what == FetchWhat::State && f.endpoint.addr == gcks_addr()));
    assert!(net
        .fetches
        .iter()
        .any(|f| matches!(f.what, FetchWhat::Items { from_seq: 2, .. })));
    let stats = net.relay.stats();
    assert!(stats.resync.items_applied >= 1, "{stats:?}");
    assert!(net
        .events
        .iter()
        .any(|e| matches!(e, RelayEvent::NotForwarded { seq: 2 })));
    assert!(net
        .events
        .iter()
        .any(|e| matches!(e, RelayEvent::Resync(_))));
    // Message 2 is not stored (the relay does not hold it), its keys are saved.
    assert!(!net.stored_messages().contains(&2));
    assert!(net.saved_keys().last().copied() >= Some(2));
    assert!(matches!(
        net.relay.resync_source().unwrap().chunk(2, 0),
        Lookup::NotFound
    ));
}

#[test]
fn nacks_go_upstream_by_the_feedback_port_and_repair_downstream_by_the_serve_port() {
    let mut net = net(40, false);
    // Every other GCKS datagram of message 1 is lost on the way to the relay.
    let mut buf = vec![0u8; 65_536];
    let mut n = 0u32;
    for _ in 0..100_000 {
        let Some(transmit) = net.gcks.sender.poll_transmit(net.now, &mut buf) else {
            match net.gcks.sender.poll_timeout() {
                Some(at) if at <= net.now + Duration::from_millis(50) => {
                    net.now = net.now.max(at);
                    net.gcks.sender.handle_timeout(net.now);
                    continue;
                }
                _ => break,
            }
        };
        n += 1;
        if n % 2 == 0 {
            net.relay
                .handle_datagram(net.now, Port::Listen, gcks_addr(), &buf[..transmit.len]);
        }
    }
    net.run(Duration::from_secs(5));
    assert_eq!(net.relay.session().next_seq(), 2, "{:?}", net.relay.stats());
    assert!(net.relay.stats().upstream.nacks_sent > 0);
    assert!(net
        .transmits
        .contains(&(Port::Feedback, Destination::Unicast(gcks_addr()))));
    assert!(net.transmits.iter().all(|(port, _)| *port != Port::Listen));
}

/// The relay of [`net`] re-registered with its resync endpoints `relays` (an upstream relay's)
/// and `gcks`, made to miss message 2, then run for 20 s while the upstream relay answers
/// every fetch "beyond the history" and the GCKS answers from its history: the relay's figures
/// and the endpoints its fetches went to.
fn upstream_relay_beyond_history(
    relays: Vec<ResyncEndpoint>,
    gcks: Vec<ResyncEndpoint>,
) -> (RelayEndpointStats, Vec<SocketAddr>) {
    let mut net = net(4, false);
    // The batch of `net` is still the tree's latest: member 1's bundle again.
    let bundle = net.gcks.tree.join(MemberId(1)).unwrap();
    let mut config = RelayEndpointConfig::new(gcks_addr());
    config.session.downstream.heartbeat_min = Duration::from_millis(20);
    config.resync.relays = relays;
    config.resync.gcks = gcks;
    net.relay = RelayEndpoint::new(&bundle, config, net.now).unwrap();
    net.serve_fetches = false;
    net.run(Duration::from_millis(500));
    assert_eq!(net.relay.session().next_seq(), 2);
    net.lose_seq = Some(2);
    net.join(100);
    net.run(Duration::from_millis(300));
    net.lose_seq = None;
    net.join(101);
    let mut answered = 0;
    for _ in 0..200 {
        net.run(Duration::from_millis(100));
        let fetches: Vec<FetchRequest> = net.fetches[answered..].to_vec();
        answered = net.fetches.len();
        for fetch in fetches {
            let items = if fetch.endpoint.addr == gcks_addr() {
                answer(&net.gcks.sender, fetch.what)
            } else {
                vec![Fetched::BeyondHistory]
            };
            for item in items {
                let now = net.now;
                net.relay.handle_fetched(now, fetch.id, item);
            }
        }
    }
    let endpoints = net
        .fetches
        .iter()
        .map(|fetch| fetch.endpoint.addr)
        .collect();
    (net.relay.stats(), endpoints)
}

#[test]
fn beyond_the_history_from_an_upstream_relay_sends_the_relay_to_the_gcks() {
    let upstream = ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: addr(9),
    };
    let gcks = ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: gcks_addr(),
    };
    let (stats, endpoints) = upstream_relay_beyond_history(vec![upstream], vec![gcks]);
    assert!(!stats.must_reregister, "{stats:?}");
    assert!(
        stats.next_seq > 3,
        "the relay caught up from the GCKS: {stats:?}"
    );
    assert!(endpoints.contains(&addr(9)), "{endpoints:?}");
    let first_upstream = endpoints.iter().position(|a| *a == addr(9)).unwrap();
    assert!(
        endpoints[first_upstream..].contains(&gcks_addr()),
        "after the relay's answer the GCKS was asked: {endpoints:?}"
    );

    // The same endpoint listed as the GCKS's (how every upstream endpoint was wired before
    // the configuration kept them apart) is believed: the relay gives up and must register
    // again.
    let (stats, _) = upstream_relay_beyond_history(Vec::new(), vec![upstream, gcks]);
    assert!(stats.must_reregister, "{stats:?}");
}
