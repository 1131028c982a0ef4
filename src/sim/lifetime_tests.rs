//! Simulator scenarios of key lifetimes, run on the GCKS and member endpoints the engine runs:
//! a refresh with no membership change, a member whose keys reach their soft lifetime with no
//! refresh, the takeover of pre-positioned traffic keys with no moment at which a sender's key
//! is missing at a receiver, and the spread of re-registrations after a mass exclusion.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast_proto::endpoint::gcks::lifetime::{LifetimeConfig, SoftHard};
use rekeycast_proto::endpoint::gcks::membership::Schedule;
use rekeycast_proto::endpoint::gcks::{
    Change, GcksCommand, GcksEndpoint, GcksEndpointConfig, GcksEvent, WallClock,
};
use rekeycast_proto::endpoint::member::traffic::KeyLifeConfig;
use rekeycast_proto::endpoint::member::{MemberCommand, MemberEndpoint, MemberEndpointConfig};
use rekeycast_proto::endpoint::resync_policy::ResyncConfig;
use rekeycast_proto::endpoint::{Endpoint, FetchRequest, Port, ResyncEndpoint, ResyncProtocol};

use super::endpoint::{answer_fetch, EndpointNode, NoStorage, PortMap};
use super::{LinkConfig, Loss, Network, NetworkConfig, Node, NodeId, Transmit};
use crate::gsa::{DataSaTiming, WrapAlgorithm};
use crate::lkh::{Degree, KeyRng, MemberId, RegistrationBundle};
use crate::session::layout::MessageParams;
use crate::session::{ReceiverConfig, ReceiverEvent, SenderConfig};

const GROUP_ID: u32 = 0x11FE_7153;

type Gcks = EndpointNode<GcksEndpoint<u64>>;
type Member = EndpointNode<MemberEndpoint>;

enum LifeNode {
    Gcks(Box<Gcks>),
    Member(Box<Member>),
}

impl Node for LifeNode {
    fn handle_datagram(&mut self, now: Instant, from: std::net::SocketAddr, bytes: &[u8]) {
        match self {
            Self::Gcks(node) => node.handle_datagram(now, from, bytes),
            Self::Member(node) => node.handle_datagram(now, from, bytes),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Self::Gcks(node) => node.handle_timeout(now),
            Self::Member(node) => node.handle_timeout(now),
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        match self {
            Self::Gcks(node) => node.poll_transmit(now, buf),
            Self::Member(node) => node.poll_transmit(now, buf),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Gcks(node) => node.poll_timeout(),
            Self::Member(node) => node.poll_timeout(),
        }
    }
}

/// What the hooks saw.
#[derive(Default)]
struct Seen {
    bundles: Vec<RegistrationBundle>,
    refreshing: u64,
    gcks_rekeyed: Vec<u64>,
    /// (member index, time, event), without the key-carrying ones.
    member_events: Vec<(usize, Instant, ReceiverEvent)>,
    fetches: Vec<(NodeId, Instant, FetchRequest)>,
}

struct Setup {
    seed: u64,
    members: usize,
    data_sa_lifetime_secs: u32,
    lifetimes: LifetimeConfig,
    key_life: KeyLifeConfig,
    member_link: LinkConfig,
}

struct Harness {
    net: Network<LifeNode>,
    gcks: NodeId,
    members: Vec<NodeId>,
    seen: Rc<RefCell<Seen>>,
}

impl Harness {
    /// A GCKS and `setup.members` members admitted by its first message, which they receive
    /// over the simulated multicast.
    fn new(setup: &Setup) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(setup.seed);
        let signing_key = SigningKey::from_bytes(&rng.gen());
        let mut sender = SenderConfig::default();
        sender.grtt.initial = Duration::from_millis(50);
        let config = GcksEndpointConfig {
            group_id: GROUP_ID,
            spi: 9,
            degree: Degree::new(4).unwrap(),
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            data_sa_lifetime_secs: setup.data_sa_lifetime_secs,
            lifetimes: setup.lifetimes,
            sender,
            message: MessageParams::default(),
            schedule: Schedule::new(Duration::from_secs(10 * 365 * 24 * 3600), usize::MAX),
            // The members are added when their bundles come: the message waits for them.
            admission_delay: Duration::from_millis(50),
            durable: false,
        };
        let mut net = Network::with_config(NetworkConfig::new(rng.gen())).unwrap();
        let start = net.start();
        let clock = WallClock {
            unix_micros: 0,
            at: start,
        };
        let endpoint = GcksEndpoint::new(
            config,
            signing_key,
            KeyRng::seeded_for_simulation(rng.gen()),
            rng.gen(),
            clock,
            start,
        )
        .unwrap();
        let seen = Rc::new(RefCell::new(Seen::default()));
        let events = Rc::clone(&seen);
        let on_event = Box::new(move |_now: Instant, event: GcksEvent<u64>| {
            let mut seen = events.borrow_mut();
            match event {
                GcksEvent::JoinAnswered { result, .. } => seen.bundles.extend(result.ok()),
                GcksEvent::Refreshing => seen.refreshing += 1,
                GcksEvent::Rekeyed { seq, .. } => seen.gcks_rekeyed.push(seq),
                _ => {}
            }
        });
        let gcks_link = LinkConfig::lossy(Loss::None, Duration::from_millis(1));
        let gcks_node = EndpointNode::new(
            endpoint,
            Box::new(NoStorage),
            PortMap::on(Port::Serve),
            on_event,
            Box::new(|_, _| {}),
        );
        let gcks = net
            .add_node(
                LifeNode::Gcks(Box::new(gcks_node)),
                gcks_link.clone(),
                gcks_link,
            )
            .unwrap();
        let mut harness = Self {
            net,
            gcks,
            members: Vec::new(),
            seen,
        };
        let changes = (0..setup.members)
            .map(|i| Change::Join(MemberId(i as u64 + 1)))
            .collect();
        harness.gcks_command(GcksCommand::Changes { changes, ticket: 0 });
        harness.gcks_command(GcksCommand::RekeyNow);
        // A big batch's answers go out a slice per turn.
        while harness.seen.borrow().bundles.len() < setup.members {
            let at = harness
                .net
                .next_event_time()
                .expect("the GCKS answers every join");
            harness.net.run_until(at);
        }
        let bundles = std::mem::take(&mut harness.seen.borrow_mut().bundles);
        assert_eq!(bundles.len(), setup.members);
        for bundle in &bundles {
            harness.add_member(bundle, setup, &mut rng);
        }
        harness
    }

    fn gcks_command(&mut self, command: GcksCommand<u64>) {
        self.net.with_node(self.gcks, |node, now| {
            if let LifeNode::Gcks(gcks) = node {
                gcks.command(now, command);
            }
        });
        self.net.touch(self.gcks).unwrap();
    }

    fn add_member(&mut self, bundle: &RegistrationBundle, setup: &Setup, rng: &mut ChaCha8Rng) {
        let now = self.net.now();
        let index = self.members.len();
        let gcks_addr = self.net.addr(self.gcks);
        let mut receiver = ReceiverConfig::new(gcks_addr);
        receiver.scheduler.grtt = Duration::from_millis(50);
        receiver.scheduler.group_size = setup.members as u32;
        receiver.scheduler.seed = rng.gen();
        let group = std::net::SocketAddr::from(([239, 0, 0, 0], super::NODE_PORT));
        let config = MemberEndpointConfig {
            resync: ResyncConfig {
                gcks: vec![ResyncEndpoint {
                    protocol: ResyncProtocol::Tcp,
                    addr: gcks_addr,
                }],
                group_size: setup.members as u32,
                ..ResyncConfig::default()
            },
            receiver,
            key_life: setup.key_life,
            ..MemberEndpointConfig::new(group, gcks_addr)
        };
        let endpoint =
            MemberEndpoint::new(bundle, config, ChaCha8Rng::seed_from_u64(rng.gen()), now).unwrap();
        let events = Rc::clone(&self.seen);
        let on_event = Box::new(move |now: Instant, event: ReceiverEvent| {
            if !matches!(event, ReceiverEvent::NewDataSa { .. }) {
                events.borrow_mut().member_events.push((index, now, event));
            }
        });
        let fetches = Rc::clone(&self.seen);
        let id = NodeId::from_index(self.net.id_count()).unwrap();
        let on_fetch = Box::new(move |now: Instant, request: FetchRequest| {
            fetches.borrow_mut().fetches.push((id, now, request));
        });
        let ports = PortMap {
            default: Port::Listen,
            upstream: None,
            group: Some(group),
        };
        let node = EndpointNode::new(endpoint, Box::new(NoStorage), ports, on_event, on_fetch);
        let added = self
            .net
            .add_node(
                LifeNode::Member(Box::new(node)),
                setup.member_link.clone(),
                setup.member_link.clone(),
            )
            .unwrap();
        assert_eq!(added, id);
        self.net.touch(id).unwrap();
        self.members.push(id);
    }

    fn member(&self, index: usize) -> &MemberEndpoint {
        match self.net.node(self.members[index]) {
            Some(LifeNode::Member(node)) => node.endpoint(),
            _ => unreachable!("members are member nodes"),
        }
    }

    fn gcks(&self) -> &GcksEndpoint<u64> {
        match self.net.node(self.gcks) {
            Some(LifeNode::Gcks(node)) => node.endpoint(),
            _ => unreachable!("the GCKS is a GCKS node"),
        }
    }

    /// Answers the fetches asked so far from the GCKS's history, 40 ms after they were asked.
    fn serve(&mut self) {
        let fetches = std::mem::take(&mut self.seen.borrow_mut().fetches);
        for (asker, at, request) in fetches {
            let answer = {
                let source = match self.net.node(self.gcks) {
                    Some(LifeNode::Gcks(node)) => node.endpoint().resync_source(),
                    _ => None,
                };
                answer_fetch(source, &request)
            };
            let arrival = (at + Duration::from_millis(40)).max(self.net.now());
            if let Some(LifeNode::Member(node)) = self.net.node_mut(asker) {
                for item in answer {
                    node.deliver_fetched(arrival, request.id, item, false);
                }
            }
            self.net.touch(asker).unwrap();
        }
    }

    /// Runs to `end`, one network event at a time, answering fetches between events and
    /// calling `check` after every event (so at every instant at which some state changed).
    fn run_checking(&mut self, end: Instant, mut check: impl FnMut(&Self)) {
        loop {
            let next = self.net.next_event_time().filter(|at| *at <= end);
            let Some(at) = next else {
                self.net.run_until(end);
                check(self);
                return;
            };
            self.net.run_until(at);
            self.serve();
            check(self);
        }
    }

    fn latest_seq(&self) -> u64 {
        self.gcks().stats().seq
    }
}

fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

#[test]
fn refresh_with_no_churn_renews_every_members_keys_before_their_soft_lifetime() {
    let setup = Setup {
        seed: 23,
        members: 40,
        data_sa_lifetime_secs: 120,
        lifetimes: LifetimeConfig {
            data_sa_soft_secs: Some(60),
            group_key: Some(SoftHard {
                soft_secs: 90,
                hard_secs: 300,
            }),
            signing_key: None,
            timing: DataSaTiming::default(),
        },
        key_life: KeyLifeConfig::default(),
        member_link: LinkConfig::lossy(Loss::Bernoulli { p: 0.02 }, Duration::from_millis(10)),
    };
    let mut sim = Harness::new(&setup);
    let start = sim.net.now();
    let end = start + secs(400);
    sim.run_checking(end, |_| {});
    let seen = sim.seen.borrow();
    // No membership change and no command after the first message: every later message is
    // a refresh, one per Data SA soft lifetime (60 s).
    assert_eq!(seen.refreshing, 6, "refreshes at 60, 120, ... 360 s");
    assert_eq!(sim.gcks().stats().refreshes, 6);
    assert_eq!(seen.gcks_rekeyed, (1..=7).collect::<Vec<u64>>());
    assert_eq!(sim.latest_seq(), 7);
    for index in 0..setup.members {
        let member = sim.member(index);
        assert_eq!(member.session().next_seq(), 8, "member {index}");
        let sending = member.traffic_keys().sending().map(|sa| sa.spi);
        assert_eq!(sending, Some(7), "member {index} sends under the latest SA");
    }
    // Keys never reached their soft lifetime (108 s) at any member.
    let soft = seen
        .member_events
        .iter()
        .filter(|(_, _, e)| {
            matches!(
                e,
                ReceiverEvent::DataSaSoftLifetime { .. } | ReceiverEvent::DataSaExpired { .. }
            )
        })
        .count();
    assert_eq!(soft, 0);
}

#[test]
fn keys_past_their_soft_lifetime_with_no_refresh_make_members_check_state() {
    // The GCKS does not refresh (no soft lifetime configured): the members notice.
    let setup = Setup {
        seed: 5,
        members: 10,
        data_sa_lifetime_secs: 100,
        lifetimes: LifetimeConfig::default(),
        key_life: KeyLifeConfig::default(),
        member_link: LinkConfig::lossy(Loss::None, Duration::from_millis(10)),
    };
    let mut sim = Harness::new(&setup);
    let start = sim.net.now();
    sim.run_checking(start + secs(120), |_| {});
    let seen = sim.seen.borrow();
    for index in 0..setup.members {
        let events: Vec<_> = seen
            .member_events
            .iter()
            .filter(|(i, _, _)| *i == index)
            .map(|(_, at, e)| (at.saturating_duration_since(start), e.clone()))
            .collect();
        let soft = events
            .iter()
            .position(|(_, e)| matches!(e, ReceiverEvent::DataSaSoftLifetime { spi: 1 }))
            .unwrap_or_else(|| panic!("member {index}: {events:?}"));
        assert!(events[soft].0 >= secs(90) && events[soft].0 < secs(91));
        assert!(matches!(
            events.get(soft + 1),
            Some((_, ReceiverEvent::StateCheckNeeded { claimed_seq: 2 }))
        ));
        assert!(events.iter().any(
            |(at, e)| matches!(e, ReceiverEvent::DataSaExpired { spi: 1 }) && *at >= secs(100)
        ));
        assert!(sim.member(index).policy().counters().state_checks_started >= 1);
    }
}

/// Runs rekeys every 20 s with the given takeover delays over lossy links and counts, at every
/// simulated instant at which something changed, the (sender, receiver) pairs where the SA the
/// sender sends under is not installed at the receiver.
fn takeover_gaps(timing: DataSaTiming) -> (u64, u64) {
    let setup = Setup {
        seed: 99,
        members: 30,
        data_sa_lifetime_secs: 3600,
        lifetimes: LifetimeConfig {
            timing,
            ..LifetimeConfig::default()
        },
        key_life: KeyLifeConfig::default(),
        member_link: LinkConfig {
            jitter: Duration::from_millis(5),
            ..LinkConfig::lossy(Loss::Bernoulli { p: 0.05 }, Duration::from_millis(20))
        },
    };
    let mut sim = Harness::new(&setup);
    let start = sim.net.now();
    let mut gaps = 0u64;
    let mut checks = 0u64;
    let mut check = |sim: &Harness| {
        checks += 1;
        let mut sending: Vec<u32> = (0..sim.members.len())
            .filter_map(|i| sim.member(i).traffic_keys().sending().map(|sa| sa.spi))
            .collect();
        sending.sort_unstable();
        sending.dedup();
        for index in 0..sim.members.len() {
            let keys = sim.member(index).traffic_keys();
            gaps += sending.iter().filter(|spi| !keys.accepts(**spi)).count() as u64;
        }
    };
    // Wait for every member to hold the first SA, then rekey five times.
    sim.run_checking(start + secs(5), |_| {});
    for round in 1..=5u64 {
        sim.gcks_command(GcksCommand::RekeyNow);
        sim.run_checking(start + secs(5 + 20 * round), &mut check);
    }
    for index in 0..setup.members {
        let member = sim.member(index);
        assert_eq!(
            member.session().next_seq(),
            7,
            "member {index} got every rekey"
        );
        assert_eq!(member.traffic_keys().sending().map(|sa| sa.spi), Some(6));
    }
    (gaps, checks)
}

#[test]
fn pre_positioned_teks_leave_no_moment_without_the_senders_key_at_a_receiver() {
    let (gaps, checks) = takeover_gaps(DataSaTiming {
        activation_delay_secs: 2,
        deactivation_delay_secs: 4,
    });
    eprintln!("takeover with ATD 2 s, DTD 4 s: {gaps} gaps at {checks} instants checked");
    assert!(checks > 1000, "checked at {checks} instants");
    assert_eq!(gaps, 0);
}

#[test]
fn switching_at_once_leaves_moments_without_the_senders_key() {
    // The control: with no activation delay, a member that has the new SA sends under it
    // before the others have installed it.
    let (gaps, checks) = takeover_gaps(DataSaTiming::default());
    eprintln!("takeover at once: {gaps} (sender, receiver) gaps at {checks} instants checked");
    assert!(gaps > 0);
}

/// 10,000 members told to re-register at the same instant: when each raises
/// [`ReceiverEvent::ReregisterNow`], relative to that instant.
fn reregistration_times(window: Duration) -> Vec<Duration> {
    let setup = Setup {
        seed: 7,
        members: 10_000,
        data_sa_lifetime_secs: 3600,
        lifetimes: LifetimeConfig::default(),
        key_life: KeyLifeConfig {
            reregister_window: window,
            ..KeyLifeConfig::default()
        },
        member_link: LinkConfig::lossy(Loss::None, Duration::from_millis(10)),
    };
    let mut sim = Harness::new(&setup);
    let start = sim.net.now();
    sim.run_checking(start + secs(2), |_| {});
    // The mass exclusion: every member hears from its resync endpoint that what it lacks left
    // the history (the GCKS lost its state, or excluded them all), at the same instant.
    let excluded_at = sim.net.now();
    for index in 0..setup.members {
        let id = sim.members[index];
        sim.net.with_node(id, |node, now| {
            if let LifeNode::Member(member) = node {
                member.command(now, MemberCommand::BeyondHistory);
            }
        });
        sim.net.touch(id).unwrap();
    }
    sim.run_checking(excluded_at + window + secs(1), |_| {});
    let seen = sim.seen.borrow();
    let mut times: Vec<Duration> = seen
        .member_events
        .iter()
        .filter(|(_, _, e)| matches!(e, ReceiverEvent::ReregisterNow))
        .map(|(_, at, _)| at.saturating_duration_since(excluded_at))
        .collect();
    let must = seen
        .member_events
        .iter()
        .filter(|(_, at, e)| matches!(e, ReceiverEvent::MustReregister) && *at == excluded_at)
        .count();
    assert_eq!(must, setup.members, "every member was told at once");
    times.sort_unstable();
    times
}

#[test]
fn ten_thousand_reregistrations_after_a_mass_exclusion_spread_over_the_window() {
    let window = secs(30);
    let times = reregistration_times(window);
    assert_eq!(times.len(), 10_000, "each member re-registers once");
    assert!(times.iter().all(|t| *t < window));
    // Per one-second interval: a flat spread is 333 a second.
    let mut per_second = [0u32; 30];
    for t in &times {
        per_second[t.as_secs() as usize] += 1;
    }
    let max = *per_second.iter().max().unwrap();
    let min = *per_second.iter().min().unwrap();
    eprintln!("re-registrations per second over a 30 s window: min {min}, max {max}");
    assert!(max <= 420, "max {max} per second (flat: 333)");
    assert!(min >= 250, "min {min} per second (flat: 333)");
}

#[test]
fn without_a_window_the_mass_exclusion_is_a_flood() {
    let times = reregistration_times(Duration::ZERO);
    assert_eq!(times.len(), 10_000);
    assert!(times.iter().all(|t| t.is_zero()));
}
