//! The GCKS's event loop: one thread with a mio `Poll` over the rekey socket and a waker,
//! driving a [`SenderSession`], with batches built on a [`WorkerPool`].
//!
//! The loop: wait for the socket, a command or the next deadline -> receive until it would
//! block and hand each datagram to the session -> run due timers -> start a batch if one is due
//! and the key tree is home -> send what the session has, until it has nothing or the socket
//! would block -> deliver events. The key tree travels to a worker for each batch and comes
//! back with the built message; joins and leaves that arrive meanwhile wait for the next one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token, Waker};

use super::resync_server::Endpoints;
use super::socket::MulticastSocket;
use super::workers::{JobPanicked, WorkerPool};
use crate::gcks::{
    Command, EngineError, GcksConfig, GcksEvent, GcksStats, JoinError, LagSummary, ResyncAnswer,
};
use crate::gsa::RekeySa;
use crate::lkh::{KeyRng, KeyTree, LkhError, MemberId, RegistrationBundle};
use crate::resync::store::{RestoredState, StateStore, StoredMessage};
use crate::session::layout::{build_message, MessageParams};
use crate::session::sender::{PreparedMessage, ResyncLookup, SenderEvent};
use crate::session::{Destination, SenderSession};

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
const RESYNC_TCP: Token = Token(2);
const RESYNC_HTTP: Token = Token(3);
/// Resync connections get tokens from here up.
const FIRST_CONNECTION: usize = 16;

pub(crate) struct Started {
    pub(crate) commands: Sender<Command>,
    pub(crate) waker: Arc<Waker>,
    pub(crate) events: Receiver<GcksEvent>,
    pub(crate) thread: JoinHandle<Result<(), EngineError>>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) resync_addrs: (Option<SocketAddr>, Option<SocketAddr>),
}

/// What a batch job hands back: the tree (always), and the message and bundles.
struct BatchDone {
    tree: KeyTree,
    joins: Vec<(MemberId, Sender<Result<RegistrationBundle, JoinError>>)>,
    leaves: Vec<MemberId>,
    outcome: Result<(PreparedMessage, Vec<Result<RegistrationBundle, LkhError>>), BatchError>,
    build_time: Duration,
}

/// A batch job's result as the worker pool delivers it.
type BatchResult = Result<BatchDone, JobPanicked>;

#[derive(Debug)]
struct BatchError {
    reason: String,
    /// The tree advanced without a message.
    fatal: bool,
}

/// Sets up the socket and spawns the loop's thread.
pub(crate) fn spawn(config: GcksConfig, signing_key: SigningKey) -> Result<Started, EngineError> {
    config.sender.validate()?;
    let (socket, _report) = MulticastSocket::sender(&config.multicast, config.bind)?;
    let local_addr = socket.local_addr()?;
    let mut socket = socket;
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let endpoints = Endpoints::bind(
        poll.registry(),
        config.resync_tcp,
        config.resync_http,
        (RESYNC_TCP, RESYNC_HTTP, FIRST_CONNECTION),
        config.resync_limits.clone(),
    )?;
    let resync_addrs = endpoints.local_addrs();
    let (commands, command_rx) = crossbeam_channel::unbounded();
    let (event_tx, events) = crossbeam_channel::unbounded();
    let sa = RekeySa {
        group_id: config.group_id,
        spi: config.spi,
        wrap_algorithm: config.wrap_algorithm,
        degree: config.degree,
        gcks_public_key: signing_key.verifying_key(),
        data_sa_lifetime_secs: config.data_sa_lifetime_secs,
    };
    let rng = match config.key_seed {
        Some(seed) => KeyRng::seeded_for_simulation(seed),
        None => KeyRng::from_os()
            .map_err(|e| EngineError::Io(std::io::Error::other(format!("key tree RNG: {e}"))))?,
    };
    let now = Instant::now();
    let mut session = SenderSession::new(config.sender.clone(), config.group_id, config.spi, now)?;
    let (store, tree) = match &config.state_dir {
        None => (None, KeyTree::with_rng(sa, rng)),
        Some(dir) => {
            let (store, restored) = StateStore::open(dir, config.sender.history, rng)?;
            let tree = match restored {
                None => {
                    let fresh_rng = match config.key_seed {
                        Some(seed) => KeyRng::seeded_for_simulation(seed),
                        None => KeyRng::from_os().map_err(|e| {
                            EngineError::Io(std::io::Error::other(format!("key tree RNG: {e}")))
                        })?,
                    };
                    KeyTree::with_rng(sa, fresh_rng)
                }
                Some(restored) => {
                    restore(&mut session, &restored, &sa, now)?;
                    restored.tree
                }
            };
            (Some(Arc::new(store)), tree)
        }
    };
    let threads = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let workers = WorkerPool::new(threads, "rekeycast-gcks-worker")?;
    let loop_waker = Arc::clone(&waker);
    let thread = std::thread::Builder::new()
        .name("rekeycast-gcks".into())
        .spawn(move || {
            let mut state = LoopState {
                group: config.multicast.group,
                config,
                signing_key: Arc::new(signing_key),
                poll,
                socket,
                endpoints,
                metrics_text: String::new(),
                metrics_at: now,
                waker: loop_waker,
                commands: command_rx,
                events: event_tx,
                session,
                group_key_version: tree.group_key().0,
                tree: Some(tree),
                store,
                workers,
                batch_results: crossbeam_channel::unbounded(),
                joins: Vec::new(),
                leaves: Vec::new(),
                rekey_requested: false,
                last_batch: now,
                backlog: std::collections::VecDeque::new(),
                lag: Histogram::new(3).ok(),
                datagrams_sent: 0,
                send_blocked: 0,
                held: std::collections::VecDeque::new(),
                relays: std::collections::HashSet::new(),
                pending_relays: std::collections::HashSet::new(),
                batch_relays: std::collections::HashSet::new(),
            };
            state.run()
        })?;
    Ok(Started {
        commands,
        waker,
        events,
        thread,
        local_addr,
        resync_addrs,
    })
}

struct LoopState {
    config: GcksConfig,
    group: SocketAddr,
    signing_key: Arc<SigningKey>,
    poll: Poll,
    socket: MulticastSocket,
    endpoints: Endpoints,
    /// The `/metrics` text, renewed at most once a second, and when it is due.
    metrics_text: String,
    metrics_at: Instant,
    waker: Arc<Waker>,
    commands: Receiver<Command>,
    events: Sender<GcksEvent>,
    session: SenderSession,
    /// The key tree, `None` while a worker builds a batch with it.
    tree: Option<KeyTree>,
    /// The state directory, shared with the batch jobs that commit to it.
    store: Option<Arc<StateStore>>,
    workers: WorkerPool,
    batch_results: (Sender<BatchResult>, Receiver<BatchResult>),
    joins: Vec<(MemberId, Sender<Result<RegistrationBundle, JoinError>>)>,
    leaves: Vec<MemberId>,
    rekey_requested: bool,
    last_batch: Instant,
    /// Datagrams the socket would not take yet, in order.
    backlog: std::collections::VecDeque<(Vec<u8>, SocketAddr)>,
    lag: Option<Histogram<u64>>,
    datagrams_sent: u64,
    send_blocked: u64,
    group_key_version: u32,
    /// Messages whose joiners have their bundles, waiting out the admission delay.
    held: std::collections::VecDeque<(Instant, PreparedMessage)>,
    /// Members registered as relays, and relay joins not yet in a batch, and those of the
    /// batch being built.
    relays: std::collections::HashSet<MemberId>,
    pending_relays: std::collections::HashSet<MemberId>,
    batch_relays: std::collections::HashSet<MemberId>,
}

impl LoopState {
    fn run(&mut self) -> Result<(), EngineError> {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 65_536];
        let slot = self.config.sender.datagram_size;
        let mut batch = vec![0u8; BATCH_DATAGRAMS * slot];
        loop {
            let deadline = self.deadline();
            let timeout = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            if let (Some(at), Some(lag)) = (deadline, self.lag.as_mut()) {
                if now >= at {
                    let _ = lag.record(micros(now - at));
                }
            }
            for event in events.iter() {
                if event.token() == SOCKET && event.is_readable() {
                    self.receive(now, &mut buf);
                } else if self.endpoints.owns(event.token()) {
                    self.refresh_metrics(now);
                    let text = &self.metrics_text;
                    self.endpoints.handle_event(
                        self.poll.registry(),
                        now,
                        event,
                        &self.session,
                        &|| text.clone(),
                    );
                }
            }
            if self.endpoints.poll_timeout().is_some_and(|at| at <= now) {
                let text = &self.metrics_text;
                self.endpoints
                    .handle_timeouts(self.poll.registry(), now, &self.session, &|| text.clone());
            }
            if self.handle_commands(now) {
                return Ok(());
            }
            self.handle_batch_results(now);
            let now = Instant::now();
            self.release_held(now);
            if self.session.poll_timeout().is_some_and(|at| at <= now) {
                self.session.handle_timeout(now);
            }
            self.maybe_start_batch(now);
            self.transmit(now, &mut batch, slot);
            while let Some(event) = self.session.poll_event() {
                if let SenderEvent::InitialTransmissionDone { seq } = event {
                    let _ = self.events.send(GcksEvent::Sent { seq });
                }
            }
        }
    }

    /// The next time the loop must wake by itself.
    fn deadline(&self) -> Option<Instant> {
        let mut deadline = self.session.poll_timeout();
        if let Some(at) = self.endpoints.poll_timeout() {
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        if self.tree.is_some() && self.batch_pending() {
            let at = self.last_batch + self.config.batch_interval;
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        if let Some((at, _)) = self.held.front() {
            deadline = Some(deadline.map_or(*at, |d| d.min(*at)));
        }
        if !self.backlog.is_empty() {
            // Waiting for the socket to drain; wake now and then in case no event comes.
            let at = Instant::now() + Duration::from_millis(1);
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        deadline
    }

    fn batch_pending(&self) -> bool {
        self.rekey_requested || !self.joins.is_empty() || !self.leaves.is_empty()
    }

    fn receive(&mut self, now: Instant, buf: &mut [u8]) {
        // Bounded: at most this many datagrams per wake-up, so commands and timers still run
        // under a flood.
        for _ in 0..4_096 {
            match self.socket.recv_from(buf) {
                Ok((len, from)) => self.session.handle_datagram(now, from, &buf[..len]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // ICMP errors of earlier sends and the like: the datagram is gone, go on.
                Err(_) => return,
            }
        }
    }

    /// Renews the `/metrics` text at most once a second (it is built from every counter).
    fn refresh_metrics(&mut self, now: Instant) {
        if now >= self.metrics_at {
            self.metrics_text = self.stats().prometheus_text();
            self.metrics_at = now + Duration::from_secs(1);
        }
    }

    /// Returns true on shutdown.
    fn handle_commands(&mut self, now: Instant) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Join(member, reply) => self.joins.push((member, reply)),
                Command::JoinRelay(member, reply) => {
                    self.pending_relays.insert(member);
                    self.joins.push((member, reply));
                }
                Command::Leave(member) => self.leaves.push(member),
                Command::RekeyNow => self.rekey_requested = true,
                Command::Stats(reply) => {
                    let _ = reply.send(self.stats());
                }
                Command::Resync {
                    seq,
                    order_key,
                    reply,
                } => {
                    let answer = match self.session.resync_item(seq, order_key) {
                        Ok(item) => ResyncAnswer::Item {
                            manifest: item.manifest.to_vec(),
                            chunk: item.chunk.to_vec(),
                        },
                        Err(ResyncLookup::BeyondHistory { .. }) => ResyncAnswer::BeyondHistory,
                        Err(ResyncLookup::NotSent) => ResyncAnswer::NotSent,
                        Err(_) => ResyncAnswer::NoChunk,
                    };
                    let _ = reply.send(answer);
                }
                Command::LatestManifest(reply) => {
                    let _ = reply.send(self.session.latest_manifest().map(|(_, m)| m.to_vec()));
                }
                Command::Shutdown => return true,
            }
        }
        let _ = now;
        false
    }

    fn stats(&self) -> GcksStats {
        let lag = LagSummary::from_histogram(self.lag.as_ref());
        GcksStats {
            sender: *self.session.counters(),
            repair_orders: self.session.repair_stats().orders,
            members: self.tree.as_ref().map_or(0, KeyTree::member_count),
            seq: self.session.latest_seq().unwrap_or(0),
            group_key_version: self.group_key_version,
            pending: self.joins.len() + self.leaves.len(),
            loop_lag_us: lag,
            datagrams_sent: self.datagrams_sent,
            send_blocked: self.send_blocked,
            resync: self.endpoints.counters(),
            relays: self.relays.len(),
        }
    }

    fn maybe_start_batch(&mut self, now: Instant) {
        if self.tree.is_none() || !self.batch_pending() {
            return;
        }
        let due = self.rekey_requested
            || now >= self.last_batch + self.config.batch_interval
            || self.joins.len() + self.leaves.len() >= self.config.max_batch;
        if !due {
            return;
        }
        let Some(mut tree) = self.tree.take() else {
            return;
        };
        self.rekey_requested = false;
        self.last_batch = now;
        let joins = std::mem::take(&mut self.joins);
        let leaves = std::mem::take(&mut self.leaves);
        self.batch_relays = joins
            .iter()
            .filter_map(|(member, _)| self.pending_relays.take(member))
            .collect();
        let key = Arc::clone(&self.signing_key);
        let store = self.store.clone();
        let params = MessageParams {
            spi: self.config.spi,
            timestamp_us: unix_micros(),
            ..self.config.message
        };
        let job = move || {
            let started = Instant::now();
            // One bad request must not fail the whole batch: a leave of a non-member is
            // dropped, a join of a current member (or a repeated one) is refused alone.
            let mut leaves = leaves;
            leaves.sort_unstable();
            leaves.dedup();
            leaves.retain(|member| tree.leaf_of(*member).is_some());
            let (joins, refused) = screen(&tree, joins, &leaves);
            for (member, reply) in refused {
                let _ = reply.send(Err(JoinError::Lkh(LkhError::AlreadyMember(member))));
            }
            let members: Vec<MemberId> = joins.iter().map(|(m, _)| *m).collect();
            let outcome = build_batch(
                &mut tree,
                &members,
                &leaves,
                &key,
                &params,
                store.as_deref(),
            );
            BatchDone {
                tree,
                joins,
                leaves,
                outcome,
                build_time: started.elapsed(),
            }
        };
        if self
            .workers
            .spawn(job, self.batch_results.0.clone(), Arc::clone(&self.waker))
            .is_err()
        {
            let _ = self.events.send(GcksEvent::BatchFailed {
                reason: "worker pool is shut down".into(),
                fatal: true,
            });
        }
    }

    fn handle_batch_results(&mut self, now: Instant) {
        while let Ok(result) = self.batch_results.1.try_recv() {
            let done = match result {
                Ok(done) => done,
                Err(panicked) => {
                    // The tree went down with the job: nothing more can be sent.
                    let _ = self.events.send(GcksEvent::BatchFailed {
                        reason: panicked.to_string(),
                        fatal: true,
                    });
                    continue;
                }
            };
            let members = done.tree.member_count();
            self.tree = Some(done.tree);
            let batch_relays = std::mem::take(&mut self.batch_relays);
            match done.outcome {
                Ok((message, bundles)) => {
                    let seq = message.seq();
                    let chunks = message.chunk_count();
                    for member in &done.leaves {
                        self.relays.remove(member);
                    }
                    for ((member, reply), bundle) in done.joins.iter().zip(bundles) {
                        if bundle.is_ok() && batch_relays.contains(member) {
                            self.relays.insert(*member);
                        }
                        let _ = reply.send(bundle.map_err(JoinError::Lkh));
                    }
                    self.group_key_version = self
                        .tree
                        .as_ref()
                        .map_or(self.group_key_version, |tree| tree.group_key().0);
                    let delay = if done.joins.is_empty() {
                        Duration::ZERO
                    } else {
                        self.config.admission_delay
                    };
                    self.held.push_back((now + delay, message));
                    let _ = self.events.send(GcksEvent::Rekeyed {
                        seq,
                        joined: done.joins.len(),
                        left: done.leaves.len(),
                        members,
                        chunks,
                        build_time: done.build_time,
                    });
                }
                Err(error) => {
                    for (_, reply) in &done.joins {
                        let _ = reply.send(Err(JoinError::BatchFailed(error.reason.clone())));
                    }
                    let _ = self.events.send(GcksEvent::BatchFailed {
                        reason: error.reason,
                        fatal: error.fatal,
                    });
                }
            }
        }
    }

    /// Queues the held messages whose admission delay is over, in order.
    fn release_held(&mut self, now: Instant) {
        while self.held.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, message)) = self.held.pop_front() else {
                return;
            };
            let seq = message.seq();
            match self.session.queue_message(now, message) {
                Ok(()) => {
                    let _ = self.events.send(GcksEvent::Queued { seq });
                }
                Err(e) => {
                    let _ = self.events.send(GcksEvent::BatchFailed {
                        reason: e.to_string(),
                        fatal: true,
                    });
                }
            }
        }
    }

    /// Sends what the session has: multicast datagrams in batches of up to
    /// [`BATCH_DATAGRAMS`], which the socket hands to the kernel with one UDP GSO `sendmsg`
    /// where it can (a message's symbols are all the same size), everything else one by one.
    fn transmit(&mut self, now: Instant, batch: &mut [u8], slot: usize) {
        if !self.drain_backlog() {
            return;
        }
        // Bounded per wake-up so that a fast session cannot starve receiving.
        for _ in 0..256 {
            let mut lens: Vec<usize> = Vec::with_capacity(BATCH_DATAGRAMS);
            let mut leftover = None;
            while lens.len() < BATCH_DATAGRAMS {
                let offset = lens.len() * slot;
                let room = &mut batch[offset..offset + slot];
                let Some(transmit) = self.session.poll_transmit(now, room) else {
                    break;
                };
                match transmit.destination {
                    Destination::Group => lens.push(transmit.len),
                    Destination::Unicast(addr) => {
                        leftover = Some((room[..transmit.len].to_vec(), addr));
                        break;
                    }
                }
            }
            let done = lens.is_empty() && leftover.is_none();
            let segments: Vec<&[u8]> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| &batch[i * slot..i * slot + len])
                .collect();
            let sent = self.send_segments(self.group, &segments);
            for segment in &segments[sent..] {
                self.backlog.push_back((segment.to_vec(), self.group));
            }
            if let Some(datagram) = leftover {
                self.backlog.push_back(datagram);
            }
            if done || !self.drain_backlog() {
                return;
            }
        }
    }

    /// Sends the backlog in order; false if the socket would still block.
    fn drain_backlog(&mut self) -> bool {
        while let Some((datagram, dest)) = self.backlog.pop_front() {
            if self.send_segments(dest, &[&datagram]) == 0 {
                self.backlog.push_front((datagram, dest));
                return false;
            }
        }
        true
    }

    /// Sends `segments` to `dest`; returns how many went (the rest would block).
    fn send_segments(&mut self, dest: SocketAddr, segments: &[&[u8]]) -> usize {
        let mut sent = 0;
        while sent < segments.len() {
            match self.socket.send_batch(dest, &segments[sent..]) {
                Ok(count) => {
                    sent += count;
                    self.datagrams_sent += count as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.send_blocked += 1;
                    return sent;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A send error (no route, a refused unicast) loses this datagram only; NACK
                // repair and resync cover it as they cover any loss.
                Err(_) => sent += 1,
            }
        }
        sent
    }
}

/// Datagrams gathered for one batched send (each in a slot of the configured datagram size).
const BATCH_DATAGRAMS: usize = 64;

/// A join and where its registration bundle goes.
type JoinReply = (MemberId, Sender<Result<RegistrationBundle, JoinError>>);

/// A batch's joins split into those the tree can take and those it would refuse: a member
/// already in the group (and not leaving in this batch, `leaves` sorted), or one asked for
/// twice.
fn screen(
    tree: &KeyTree,
    joins: Vec<JoinReply>,
    leaves: &[MemberId],
) -> (Vec<JoinReply>, Vec<JoinReply>) {
    let mut seen = std::collections::HashSet::with_capacity(joins.len());
    joins.into_iter().partition(|(member, _)| {
        seen.insert(*member)
            && (tree.leaf_of(*member).is_none() || leaves.binary_search(member).is_ok())
    })
}

fn build_batch(
    tree: &mut KeyTree,
    joins: &[MemberId],
    leaves: &[MemberId],
    key: &SigningKey,
    params: &MessageParams,
    store: Option<&StateStore>,
) -> Result<(PreparedMessage, Vec<Result<RegistrationBundle, LkhError>>), BatchError> {
    let batch = tree.apply_batch(joins, leaves).map_err(|e| BatchError {
        reason: e.to_string(),
        fatal: false,
    })?;
    let fatal = |reason: String| BatchError {
        reason,
        fatal: true,
    };
    let bundles = joins.iter().map(|member| tree.join(*member)).collect();
    let built = build_message(&batch, &tree.leaves_in_order(), key, params)
        .map_err(|e| fatal(e.to_string()))?;
    let prepared =
        PreparedMessage::new(built, batch.mac_key.clone()).map_err(|e| fatal(e.to_string()))?;
    prepared
        .build_repair_encoders()
        .map_err(|e| fatal(e.to_string()))?;
    // Durable before it is sent (DESIGN.md, persistence): a GCKS that dies after this resumes
    // at this message and sends it; one that dies before it never sent it.
    if let Some(store) = store {
        store
            .commit(tree, &StoredMessage::from_prepared(&prepared))
            .map_err(|e| fatal(format!("state not written, message not sent: {e}")))?;
    }
    Ok((prepared, bundles))
}

/// Puts the restored history into the session: every message but the last back in the
/// history window, the last queued to be sent again (the GCKS may have died before sending it;
/// members that have it drop it unchecked).
fn restore(
    session: &mut SenderSession,
    restored: &RestoredState,
    sa: &RekeySa,
    now: Instant,
) -> Result<(), EngineError> {
    let tree_sa = restored.tree.rekey_sa();
    if tree_sa.group_id != sa.group_id
        || tree_sa.spi != sa.spi
        || tree_sa.gcks_public_key != sa.gcks_public_key
    {
        return Err(EngineError::Restore(
            "the state directory belongs to another group, SA or signing key".into(),
        ));
    }
    let count = restored.messages.len();
    for (index, stored) in restored.messages.iter().enumerate() {
        let message = stored
            .to_prepared()
            .map_err(|e| EngineError::Restore(format!("message {}: {e}", stored.seq)))?;
        let outcome = if index + 1 == count {
            session.queue_message(now, message)
        } else {
            session.restore_message(now, message)
        };
        outcome.map_err(|e| EngineError::Restore(format!("message {}: {e}", stored.seq)))?;
    }
    Ok(())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, micros)
}
