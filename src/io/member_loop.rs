//! A member's event loop: one thread with a mio `Poll` over the group socket, the unicast
//! feedback socket and a waker, driving a [`ReceiverSession`].
//!
//! The loop: wait for a socket, a command or the next deadline -> receive until it would block
//! and hand each datagram to the session (after the simulated loss, when configured) -> run due
//! timers -> send the session's NACKs and probe replies -> deliver its events. Signature checks
//! (two per message at most) run inline: they cost tens of microseconds per message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::socket::MulticastSocket;
use crate::gcks::{EngineError, LagSummary};
use crate::lkh::RegistrationBundle;
use crate::member::{MemberCommand, MemberConfig, MemberStats};
use crate::session::receiver::ResyncError;
use crate::session::{Destination, ReceiverEvent, ReceiverSession};
use crate::sim::LossModel;

const GROUP: Token = Token(0);
const UNICAST: Token = Token(1);
const WAKER: Token = Token(2);

pub(crate) struct Started {
    pub(crate) commands: Sender<MemberCommand>,
    pub(crate) waker: Arc<Waker>,
    pub(crate) events: Receiver<ReceiverEvent>,
    pub(crate) thread: JoinHandle<Result<(), EngineError>>,
    pub(crate) local_addr: SocketAddr,
}

/// Joins the group, sets up the sockets and spawns the loop's thread.
pub(crate) fn spawn(
    bundle: &RegistrationBundle,
    config: MemberConfig,
) -> Result<Started, EngineError> {
    let session = ReceiverSession::new(bundle, config.receiver.clone())?;
    let (group_socket, _) = MulticastSocket::receiver(&config.multicast)?;
    let (unicast_socket, _) = MulticastSocket::sender(&config.multicast, config.bind)?;
    let local_addr = unicast_socket.local_addr()?;
    let mut group_socket = group_socket.into_mio();
    let mut unicast_socket = unicast_socket.into_mio();
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut group_socket, GROUP, Interest::READABLE)?;
    poll.registry()
        .register(&mut unicast_socket, UNICAST, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (commands, command_rx) = crossbeam_channel::unbounded();
    let (event_tx, events) = crossbeam_channel::unbounded();
    let loss = match config.simulated_loss {
        Some((loss, seed)) => Some((
            LossModel::new(loss).map_err(|e| {
                EngineError::Io(std::io::Error::other(format!("simulated loss: {e}")))
            })?,
            ChaCha8Rng::seed_from_u64(seed),
        )),
        None => None,
    };
    let thread = std::thread::Builder::new()
        .name("rekeycast-member".into())
        .spawn(move || {
            let mut state = LoopState {
                group: config.multicast.group,
                poll,
                group_socket,
                unicast_socket,
                commands: command_rx,
                events: event_tx,
                session,
                loss,
                simulated_drops: 0,
                datagrams_received: 0,
                lag: Histogram::new(3).ok(),
            };
            state.run()
        })?;
    Ok(Started {
        commands,
        waker,
        events,
        thread,
        local_addr,
    })
}

struct LoopState {
    group: SocketAddr,
    poll: Poll,
    group_socket: mio::net::UdpSocket,
    unicast_socket: mio::net::UdpSocket,
    commands: Receiver<MemberCommand>,
    events: Sender<ReceiverEvent>,
    session: ReceiverSession,
    loss: Option<(LossModel, ChaCha8Rng)>,
    simulated_drops: u64,
    datagrams_received: u64,
    lag: Option<Histogram<u64>>,
}

impl LoopState {
    fn run(&mut self) -> Result<(), EngineError> {
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; 65_536];
        loop {
            let deadline = self.session.poll_timeout();
            let timeout = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            if let (Some(at), Some(lag)) = (deadline, self.lag.as_mut()) {
                if now >= at {
                    let micros = u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX);
                    let _ = lag.record(micros);
                }
            }
            for event in events.iter() {
                match event.token() {
                    GROUP => self.receive(now, &mut buf, true),
                    UNICAST => self.receive(now, &mut buf, false),
                    _ => {}
                }
            }
            if self.handle_commands(now) {
                return Ok(());
            }
            let now = Instant::now();
            if self.session.poll_timeout().is_some_and(|at| at <= now) {
                self.session.handle_timeout(now);
            }
            self.transmit(now, &mut buf);
            while let Some(event) = self.session.poll_event() {
                if self.events.send(event).is_err() {
                    // The product dropped its handle's receiver: nobody listens any more.
                    return Ok(());
                }
            }
        }
    }

    fn receive(&mut self, now: Instant, buf: &mut [u8], group: bool) {
        for _ in 0..4_096 {
            let socket = if group {
                &self.group_socket
            } else {
                &self.unicast_socket
            };
            match socket.recv_from(buf) {
                Ok((len, from)) => {
                    self.datagrams_received += 1;
                    if group {
                        if let Some((model, rng)) = self.loss.as_mut() {
                            if model.lose(rng) {
                                self.simulated_drops += 1;
                                continue;
                            }
                        }
                    }
                    self.session.handle_datagram(now, from, &buf[..len]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Returns true on shutdown.
    fn handle_commands(&mut self, now: Instant) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                MemberCommand::Stats(reply) => {
                    let _ = reply.send(self.stats());
                }
                MemberCommand::Resync(items, reply) => {
                    let mut outcome = Err(ResyncError::MalformedManifest);
                    for (manifest, chunk) in &items {
                        outcome = self.session.handle_resync(now, manifest, chunk);
                        if outcome.is_err() {
                            break;
                        }
                    }
                    let _ = reply.send(outcome);
                }
                MemberCommand::StateAnswer(manifest, reply) => {
                    let _ = reply.send(self.session.handle_state_answer(now, &manifest));
                }
                MemberCommand::BeyondHistory => self.session.handle_beyond_history(now),
                MemberCommand::Shutdown => return true,
            }
        }
        false
    }

    fn stats(&self) -> MemberStats {
        MemberStats {
            receiver: *self.session.counters(),
            datagrams: *self.session.datagram_counters(),
            messages: *self.session.message_counters(),
            next_seq: self.session.next_seq(),
            order_key: self.session.order_key(),
            group_key_version: self.session.group_key().map(|k| k.version),
            simulated_drops: self.simulated_drops,
            datagrams_received: self.datagrams_received,
            loop_lag_us: LagSummary::from_histogram(self.lag.as_ref()),
        }
    }

    fn transmit(&mut self, now: Instant, buf: &mut [u8]) {
        // A member sends a few NACKs and probe replies at most; a datagram the socket will not
        // take is dropped like a lost one (the NACK timers ask again).
        for _ in 0..1_024 {
            let Some(transmit) = self.session.poll_transmit(now, buf) else {
                return;
            };
            let dest = match transmit.destination {
                Destination::Group => self.group,
                Destination::Unicast(addr) => addr,
            };
            let _ = self.unicast_socket.send_to(&buf[..transmit.len], dest);
        }
    }
}
