//! The GCKS's event loop: one thread with a mio `Poll` over the rekey socket and a waker,
//! driving a [`SenderSession`], with batches built on a [`WorkerPool`].
//!
//! The loop: wait for the socket, a command or the next deadline -> receive until it would
//! block and hand each datagram to the session -> run due timers -> start a batch if one is due
//! -> send what the session has, until it has nothing or the socket would block -> deliver
//! events. Joins, leaves and batch scheduling are decided by the sans-IO
//! [`Membership`](crate::gcks::membership::Membership) table; leaves are journaled
//! ([`LeaveJournal`]) before they are acknowledged.
//!
//! A batch is a transaction: the worker builds it on a fork of the committed key tree, lays out,
//! signs and encodes the message and writes it with the tree to the state directory; only then
//! does the loop take the fork as its tree, release the batch's leaves in the journal and hand
//! the joiners their bundles. A failure leaves tree, sequence and state directory untouched and
//! the same batch is retried after a backoff; a panic on the worker poisons the engine.

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
use crate::gcks::membership::{BatchOrder, Membership, Schedule};
use crate::gcks::{
    BatchFailure, Command, EngineError, GcksConfig, GcksEvent, GcksStats, JoinError, LagSummary,
    LeaveError, PoisonReason, ResyncAnswer,
};
use crate::gsa::RekeySa;
use crate::lkh::{KeyRng, KeyTree, LkhError, MemberId, RegistrationBundle, SnapshotError};
use crate::resync::journal::LeaveJournal;
use crate::resync::store::{RestoredState, StateStore, StoreError, StoredMessage};
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

/// Where a join's bundle (or its error) goes.
type JoinTicket = Sender<Result<RegistrationBundle, JoinError>>;

/// The bundles of a batch's joiners, by member.
type Bundles = Vec<(MemberId, Result<RegistrationBundle, LkhError>)>;

/// A built and stored batch: the advanced fork of the tree, the message and the bundles.
struct BatchDone {
    tree: KeyTree,
    message: PreparedMessage,
    bundles: Bundles,
    build_time: Duration,
}

/// A batch job's result as the worker pool delivers it.
type BatchResult = Result<Result<BatchDone, BatchError>, JobPanicked>;

/// Why a batch failed; nothing of it was committed.
#[derive(Debug)]
struct BatchError {
    reason: BatchFailure,
    detail: String,
}

/// Faults injected in the batch path (tests): called on the worker with the batch's sequence
/// number just before its state is written; a failure it returns fails the batch there, and
/// a panic in it is a panicked job.
#[derive(Clone, Default)]
pub(crate) struct BatchHooks {
    pub(crate) before_commit: Option<Arc<dyn Fn(u64) -> Option<BatchFailure> + Send + Sync>>,
}

/// Sets up the socket and spawns the loop's thread.
pub(crate) fn spawn(
    config: GcksConfig,
    signing_key: SigningKey,
    hooks: BatchHooks,
    poisoned: Arc<std::sync::OnceLock<PoisonReason>>,
) -> Result<Started, EngineError> {
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
    let (store, tree, journal) = match &config.state_dir {
        None => (None, KeyTree::with_rng(sa, rng), None),
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
            let journal = LeaveJournal::open(dir, tree.seq())?;
            (Some(Arc::new(store)), tree, Some(journal))
        }
    };
    let mut membership =
        Membership::new(Schedule::new(config.batch_interval, config.max_batch), now);
    let journal = journal.map(|(journal, replay)| {
        // Leaves acknowledged before a crash and not applied by a durable batch: the first
        // batch applies them (one whose batch committed before the crash is applied already).
        // A batch committed and never released handed out no bundle: its joiners leave too.
        let mut leaving: Vec<MemberId> = replay
            .leaves
            .into_iter()
            .filter(|member| tree.leaf_of(*member).is_some())
            .collect();
        if replay.unreleased_batch {
            leaving.extend(tree.admitted_by_latest_batch());
        }
        leaving.sort_unstable();
        leaving.dedup();
        membership.restore_leaves(leaving);
        journal
    });
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
                tree: Arc::new(tree),
                spare: None,
                store,
                journal,
                batch_mark: 0,
                membership,
                hooks,
                poisoned,
                workers,
                batch_results: crossbeam_channel::unbounded(),
                backlog: std::collections::VecDeque::new(),
                lag: Histogram::new(3).ok(),
                datagrams_sent: 0,
                send_blocked: 0,
                held: std::collections::VecDeque::new(),
                relays: std::collections::HashSet::new(),
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
    /// The committed key tree; a batch job builds on a fork of it.
    tree: Arc<KeyTree>,
    /// The tree committed before it, whose allocations the next fork reuses
    /// ([`KeyTree::fork_into`]: about a third of a fresh copy's time at 2^20 members, for a
    /// second tree's memory).
    spare: Option<KeyTree>,
    /// The state directory, shared with the batch jobs that commit to it.
    store: Option<Arc<StateStore>>,
    /// The leave journal of the state directory.
    journal: Option<LeaveJournal>,
    /// The journal's mark when the batch out was first taken: its leaves are those below it.
    batch_mark: u64,
    /// The pending-membership table and batch schedule.
    membership: Membership<JoinTicket>,
    hooks: BatchHooks,
    /// Set once when the engine is poisoned; the handle reads it.
    poisoned: Arc<std::sync::OnceLock<PoisonReason>>,
    workers: WorkerPool,
    batch_results: (Sender<BatchResult>, Receiver<BatchResult>),
    /// Datagrams the socket would not take yet, in order.
    backlog: std::collections::VecDeque<(Vec<u8>, SocketAddr)>,
    lag: Option<Histogram<u64>>,
    datagrams_sent: u64,
    send_blocked: u64,
    group_key_version: u32,
    /// Messages whose joiners have their bundles, waiting out the admission delay.
    held: std::collections::VecDeque<(Instant, PreparedMessage)>,
    /// Members registered as relays.
    relays: std::collections::HashSet<MemberId>,
}

impl LoopState {
    fn run(&mut self) -> Result<(), EngineError> {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 65_536];
        let slot = self.config.sender.datagram_size;
        let mut batch = vec![0u8; BATCH_DATAGRAMS * slot];
        loop {
            if let Some(reason) = self.membership.poisoned() {
                self.refuse_queued_commands(reason);
                return Err(EngineError::Poisoned(reason));
            }
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
        if let Some(at) = self.membership.poll_timeout() {
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
                Command::Join(member, reply) => self.join(member, false, reply),
                Command::JoinRelay(member, reply) => self.join(member, true, reply),
                Command::Leave(member, reply) => {
                    let in_tree = self.tree.leaf_of(member).is_some();
                    let journal = &mut self.journal;
                    let answer = self.membership.leave(member, in_tree, |member| {
                        // Durable before it is acknowledged (see `Gcks::leave`).
                        match journal {
                            Some(journal) => journal.record_leave(member).map(|()| true),
                            None => Ok(false),
                        }
                    });
                    let answer = answer.map(|left| {
                        if let Some(ticket) = left.cancelled {
                            let _ = ticket.send(Err(JoinError::Cancelled));
                        }
                        left.outcome
                    });
                    let _ = reply.send(answer);
                }
                Command::RekeyNow => self.membership.request_rekey(now),
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
        false
    }

    fn join(&mut self, member: MemberId, relay: bool, reply: JoinTicket) {
        let in_tree = self.tree.leaf_of(member).is_some();
        if let Err((reply, error)) = self.membership.join(member, relay, reply, in_tree) {
            let _ = reply.send(Err(error));
        }
    }

    /// Answers the commands still queued when the engine stops poisoned.
    fn refuse_queued_commands(&mut self, reason: PoisonReason) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Join(_, reply) | Command::JoinRelay(_, reply) => {
                    let _ = reply.send(Err(JoinError::Poisoned(reason)));
                }
                Command::Leave(_, reply) => {
                    let _ = reply.send(Err(LeaveError::Poisoned(reason)));
                }
                _ => {}
            }
        }
    }

    /// The engine cannot go on: fails every waiting join, says why, and stops the loop (after
    /// this loop turn).
    fn poison(&mut self, reason: PoisonReason) {
        if self.membership.poisoned().is_some() {
            return;
        }
        let _ = self.poisoned.set(reason);
        for ticket in self.membership.poison(reason) {
            let _ = ticket.send(Err(JoinError::Poisoned(reason)));
        }
        let _ = self.events.send(GcksEvent::Poisoned { reason });
    }

    fn stats(&self) -> GcksStats {
        let lag = LagSummary::from_histogram(self.lag.as_ref());
        GcksStats {
            sender: *self.session.counters(),
            repair_orders: self.session.repair_stats().orders,
            members: self.tree.member_count(),
            seq: self.session.latest_seq().unwrap_or(0),
            group_key_version: self.group_key_version,
            pending: self.membership.pending_changes(),
            loop_lag_us: lag,
            datagrams_sent: self.datagrams_sent,
            send_blocked: self.send_blocked,
            resync: self.endpoints.counters(),
            relays: self.relays.len(),
        }
    }

    fn maybe_start_batch(&mut self, now: Instant) {
        let Some(order) = self.membership.poll_batch(now) else {
            return;
        };
        if order.attempt == 1 {
            self.batch_mark = self.journal.as_ref().map_or(0, LeaveJournal::mark);
        }
        let committed = Arc::clone(&self.tree);
        let spare = self.spare.take();
        let key = Arc::clone(&self.signing_key);
        let store = self.store.clone();
        let hooks = self.hooks.clone();
        let params = MessageParams {
            spi: self.config.spi,
            timestamp_us: unix_micros(),
            ..self.config.message
        };
        let job = move || {
            let started = Instant::now();
            // The batch is built on a fork: the committed tree stays as it is until the loop
            // takes the fork, after the message is built and stored.
            let mut tree = match spare {
                Some(mut spare) => {
                    committed.fork_into(&mut spare);
                    spare
                }
                None => committed.fork(),
            };
            // The loop's tree is unique again: once this batch commits, the tree it replaces
            // becomes the next batch's spare.
            drop(committed);
            let BatchOrder { joins, leaves, .. } = order;
            build_batch(
                &mut tree,
                &joins,
                &leaves,
                &key,
                &params,
                store.as_deref(),
                &hooks,
            )
            .map(|(message, bundles)| BatchDone {
                tree,
                message,
                bundles,
                build_time: started.elapsed(),
            })
        };
        if self
            .workers
            .spawn(job, self.batch_results.0.clone(), Arc::clone(&self.waker))
            .is_err()
        {
            self.poison(PoisonReason::WorkersGone);
        }
    }

    fn handle_batch_results(&mut self, now: Instant) {
        while let Ok(result) = self.batch_results.1.try_recv() {
            match result {
                // The job's state is unknown: the committed tree is intact, but what panicked
                // may panic again on every retry.
                Err(_panicked) => self.poison(PoisonReason::WorkerPanicked),
                Ok(Err(error)) => {
                    let attempt = self.membership.attempts();
                    let retry_in = self.membership.batch_failed(now);
                    let _ = self.events.send(GcksEvent::BatchFailed {
                        seq: self.tree.seq() + 1,
                        attempt,
                        reason: error.reason,
                        detail: error.detail,
                        retry_in,
                    });
                }
                Ok(Ok(done)) => self.commit(now, done),
            }
        }
    }

    /// Takes a built and stored batch: its tree becomes the committed one, its leaves are
    /// released in the journal, its joiners get their bundles, its message waits out the
    /// admission delay.
    fn commit(&mut self, now: Instant, done: BatchDone) {
        let members = done.tree.member_count();
        let replaced = std::mem::replace(&mut self.tree, Arc::new(done.tree));
        self.spare = Arc::try_unwrap(replaced).ok();
        self.group_key_version = self.tree.group_key().0;
        let Some(committed) = self.membership.batch_committed() else {
            return;
        };
        // The batch is durable: it is released in the journal before any bundle of it is handed
        // out. A crash in between replays its leaves and removes its joiners, who got no
        // bundle (a member re-admitted in this batch: its last acknowledged command is the
        // leave).
        let changed = !committed.joins.is_empty() || !committed.leaves.is_empty();
        if let Some(journal) = self.journal.as_mut().filter(|_| changed) {
            if let Err(error) = journal.release(self.tree.seq(), self.batch_mark) {
                self.poison(PoisonReason::Journal(error));
                return;
            }
        }
        for member in &committed.leaves {
            self.relays.remove(member);
        }
        let mut bundles: std::collections::HashMap<MemberId, Result<RegistrationBundle, LkhError>> =
            done.bundles.into_iter().collect();
        let joined = committed.joins.len();
        for joiner in committed.joins {
            let bundle = bundles
                .remove(&joiner.member)
                .unwrap_or(Err(LkhError::NotJustJoined(joiner.member)));
            if bundle.is_ok() && joiner.relay {
                self.relays.insert(joiner.member);
            }
            let _ = joiner.ticket.send(bundle.map_err(JoinError::Lkh));
        }
        let seq = done.message.seq();
        let chunks = done.message.chunk_count();
        let delay = if joined == 0 {
            Duration::ZERO
        } else {
            self.config.admission_delay
        };
        self.held.push_back((now + delay, done.message));
        let _ = self.events.send(GcksEvent::Rekeyed {
            seq,
            joined,
            left: committed.leaves.len(),
            members,
            chunks,
            build_time: done.build_time,
        });
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
                // Committed, yet the session refuses it: members would wait for it forever.
                Err(_) => self.poison(PoisonReason::QueueRefused),
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

/// Applies the batch to `tree` (a fork), builds, signs and encodes its message and stores it
/// with the tree; any error leaves the committed state as it was (the fork is dropped, and a
/// message file written without its tree is discarded or overwritten, see
/// [`crate::resync::store`]).
fn build_batch(
    tree: &mut KeyTree,
    joins: &[MemberId],
    leaves: &[MemberId],
    key: &SigningKey,
    params: &MessageParams,
    store: Option<&StateStore>,
    hooks: &BatchHooks,
) -> Result<(PreparedMessage, Bundles), BatchError> {
    let batch = tree.apply_batch(joins, leaves).map_err(|e| BatchError {
        reason: BatchFailure::Tree(e),
        detail: e.to_string(),
    })?;
    let bundles = joins
        .iter()
        .map(|member| (*member, tree.join(*member)))
        .collect();
    let built =
        build_message(&batch, &tree.leaves_in_order(), key, params).map_err(|e| BatchError {
            reason: BatchFailure::Build,
            detail: e.to_string(),
        })?;
    let encode = |e: crate::session::sender::QueueError| BatchError {
        reason: BatchFailure::Encode,
        detail: e.to_string(),
    };
    let prepared = PreparedMessage::new(built, batch.mac_key.clone()).map_err(encode)?;
    prepared.build_repair_encoders().map_err(encode)?;
    if let Some(fault) = hooks
        .before_commit
        .as_ref()
        .and_then(|hook| hook(tree.seq()))
    {
        return Err(BatchError {
            reason: fault,
            detail: "injected fault".into(),
        });
    }
    // Durable before it is sent (DESIGN.md, persistence): a GCKS that dies after this resumes
    // at this message and sends it; one that dies before it never sent it.
    if let Some(store) = store {
        store
            .commit(tree, &StoredMessage::from_prepared(&prepared))
            .map_err(|e| BatchError {
                reason: store_failure(&e),
                detail: format!(
                    "state not written, nothing committed: {}",
                    crate::report::Chain(&e)
                ),
            })?;
    }
    Ok((prepared, bundles))
}

/// The typed reason of a failed state write.
fn store_failure(error: &StoreError) -> BatchFailure {
    match error {
        StoreError::Io { source, .. } => BatchFailure::StateWrite(source.kind()),
        StoreError::Tree {
            source: SnapshotError::Io(source),
            ..
        } => BatchFailure::StateWrite(source.kind()),
        _ => BatchFailure::State,
    }
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
        let message = stored.to_prepared().map_err(|e| {
            EngineError::Restore(format!(
                "message {}: {}",
                stored.seq,
                crate::report::Chain(&e)
            ))
        })?;
        let outcome = if index + 1 == count {
            session.queue_message(now, message)
        } else {
            session.restore_message(now, message)
        };
        outcome.map_err(|e| {
            EngineError::Restore(format!(
                "message {}: {}",
                stored.seq,
                crate::report::Chain(&e)
            ))
        })?;
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::gcks::{Gcks, LeaveError};

    fn config(salt: u8) -> GcksConfig {
        let pid = std::process::id();
        let group = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(239, 83, salt, pid as u8),
            24_000 + (pid % 10_000) as u16 + u16::from(salt),
        ));
        let mut config = GcksConfig::loopback(group);
        config.batch_interval = Duration::from_secs(3600);
        config.admission_delay = Duration::ZERO;
        config
    }

    fn next_event(gcks: &Gcks, wanted: impl Fn(&GcksEvent) -> bool) -> GcksEvent {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(event) = gcks.events().recv_timeout(Duration::from_millis(100)) {
                if wanted(&event) {
                    return event;
                }
            }
        }
        panic!("no such event within 30 s");
    }

    #[test]
    fn a_failed_batch_is_retried_by_itself_with_the_same_sequence_number() {
        let failures = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&failures);
        let hooks = BatchHooks {
            before_commit: Some(Arc::new(move |seq| {
                (seq == 2 && counted.fetch_add(1, Ordering::SeqCst) < 2)
                    .then_some(BatchFailure::StateWrite(std::io::ErrorKind::StorageFull))
            })),
        };
        let gcks =
            Gcks::start_with_hooks(config(1), SigningKey::from_bytes(&[8; 32]), hooks).unwrap();
        let first = gcks.join(MemberId(1)).unwrap();
        gcks.rekey_now().unwrap();
        first
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        let second = gcks.join(MemberId(2)).unwrap();
        gcks.rekey_now().unwrap();
        let mut seen = Vec::new();
        let rekeyed = loop {
            match next_event(&gcks, |e| {
                matches!(
                    e,
                    GcksEvent::BatchFailed { .. } | GcksEvent::Rekeyed { seq: 2.., .. }
                )
            }) {
                GcksEvent::BatchFailed {
                    seq,
                    attempt,
                    reason,
                    retry_in,
                    ..
                } => {
                    assert_eq!(
                        reason,
                        BatchFailure::StateWrite(std::io::ErrorKind::StorageFull)
                    );
                    // Nothing committed meanwhile.
                    let stats = gcks.stats().unwrap();
                    assert_eq!((stats.members, stats.pending), (1, 1));
                    seen.push((seq, attempt, retry_in.map(|d| d.as_millis())));
                }
                event => break event,
            }
        };
        assert_eq!(seen, vec![(2, 1, Some(100)), (2, 2, Some(200))]);
        assert!(
            matches!(
                rekeyed,
                GcksEvent::Rekeyed {
                    seq: 2,
                    joined: 1,
                    members: 2,
                    ..
                }
            ),
            "{rekeyed:?}"
        );
        let bundle = second
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        assert_eq!(bundle.first_seq, 2);
        gcks.shutdown().unwrap();
    }

    #[test]
    fn a_panicked_batch_poisons_the_engine() {
        let hooks = BatchHooks {
            before_commit: Some(Arc::new(|seq| {
                assert!(seq != 2, "injected panic in the batch of message 2");
                None
            })),
        };
        let gcks =
            Gcks::start_with_hooks(config(2), SigningKey::from_bytes(&[8; 32]), hooks).unwrap();
        let first = gcks.join(MemberId(1)).unwrap();
        gcks.rekey_now().unwrap();
        first
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        let second = gcks.join(MemberId(2)).unwrap();
        gcks.rekey_now().unwrap();
        let poisoned = next_event(&gcks, |e| matches!(e, GcksEvent::Poisoned { .. }));
        assert_eq!(
            poisoned,
            GcksEvent::Poisoned {
                reason: PoisonReason::WorkerPanicked
            }
        );
        let answer = second.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            matches!(
                answer,
                Err(JoinError::Poisoned(PoisonReason::WorkerPanicked))
            ),
            "the pending join fails with the reason: {answer:?}"
        );
        assert!(matches!(
            gcks.join(MemberId(3)),
            Err(EngineError::Poisoned(PoisonReason::WorkerPanicked))
        ));
        assert!(matches!(
            gcks.leave(MemberId(1)),
            Err(LeaveError::Poisoned(PoisonReason::WorkerPanicked))
        ));
        assert_eq!(gcks.poisoned(), Some(PoisonReason::WorkerPanicked));
        assert!(matches!(
            gcks.shutdown(),
            Err(EngineError::Poisoned(PoisonReason::WorkerPanicked))
        ));
    }
}
