//! The resync policy: when a member (or a relay's upstream side) fetches the messages it lacks
//! or checks the group's state, from which resync endpoint, and what it does with each answer.
//! The member and relay endpoints both run this one policy.
//!
//! - **Which endpoints, in which order.** Relay endpoints first, then the GCKS's: a relay is
//!   the nearer and more numerous server, and the GCKS's load must not grow with the group.
//!   One [`FetchRequest`] runs at a time, to one endpoint, with one deadline for the whole
//!   fetch and a byte cap.
//! - **Verified as it streams.** Each item of a fetch is verified and applied the moment it
//!   arrives ([`ResyncTarget::apply_item`], [`ResyncTarget::apply_state`]), exactly as if it had
//!   come by multicast: the endpoint is trusted with nothing. The first item that fails
//!   verification, more items than [`ResyncConfig::max_fetch_items`], or a failed fetch drops
//!   that endpoint (its fetch is cancelled) and the next one is asked from the next message the
//!   target still lacks. An endpoint that does not hold that message ([`Fetched::NotHeld`], or
//!   an empty answer) passes the turn to the next endpoint the same way.
//! - **Rounds.** When every endpoint was tried and one of them failed, another round starts
//!   after an exponential backoff with jitter, up to [`ResyncConfig::rounds`] rounds. When every
//!   endpoint answered and none holds more, there is nothing to retry.
//! - **Beyond the history.** The GCKS saying the messages left its history window makes the
//!   target register again ([`ResyncTarget::beyond_history`]). A relay saying so is not
//!   believed while a GCKS endpoint is configured (only the GCKS knows the group's history; a
//!   relay is an insider that could otherwise force members to re-register): the GCKS is asked.
//! - **Spreading.** A resync or state check starts after a random delay, uniform over a window
//!   that grows with the group size (`group size / capacity`, at most
//!   [`ResyncConfig::max_spread`]), so a group that lost the same message does not reach its
//!   endpoints in one instant (out-of-sync implosion).
//! - **State checks back off.** A state check raised by traffic "ahead" of the target that it
//!   cannot verify is forgeable. Consecutive such checks are spaced by an exponential backoff
//!   with jitter whose cap grows with the group size (at least `group size / capacity`), so a
//!   flood of forged datagrams costs each member a bounded number of checks and the endpoints
//!   a bounded load, whatever the group size. A check that finds the target really behind
//!   resets the backoff. Checks raised by a silence are not backed off (they come once per
//!   silence timeout) but are spread.
//! - **One request at a time.** A resync or state check asked for while one runs is kept
//!   (an out-of-sync request supersedes a state check) and started when it ends, from where the
//!   target stands then.
//!
//! The policy owns no clock and no entropy source: the time is an argument and the randomness
//! comes from the seeded generator it is given, so runs reproduce.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{FetchFailure, FetchId, FetchRequest, FetchWhat, Fetched, ResyncEndpoint};
use crate::relay::RelaySession;
use crate::session::receiver::{ResyncError, StateVerdict};
use crate::session::ConfigError;
use crate::session::{ReceiverEvent, ReceiverSession};

/// What the policy resyncs: a member's receiver session, or a relay's upstream side.
pub trait ResyncTarget {
    /// The group asked about.
    fn group_id(&self) -> u32;
    /// The next message the target lacks.
    fn next_seq(&self) -> u64;
    /// The order key of the target's leaf (what it asks for its chunk with).
    fn order_key(&self) -> u32;
    /// Whether the target must register again (then nothing is fetched).
    fn must_reregister(&self) -> bool;
    /// One resync item (a signed manifest and the target's chunk of it), verified and applied.
    fn apply_item(
        &mut self,
        now: Instant,
        manifest: &[u8],
        chunk: &[u8],
    ) -> Result<u64, ResyncError>;
    /// A state answer (the endpoint's latest signed manifest), verified.
    fn apply_state(&mut self, now: Instant, manifest: &[u8]) -> Result<StateVerdict, ResyncError>;
    /// The messages the target lacks left the group's history: it must register again.
    fn beyond_history(&mut self, now: Instant);
}

impl ResyncTarget for ReceiverSession {
    fn group_id(&self) -> u32 {
        self.keys().rekey_sa().group_id
    }
    fn next_seq(&self) -> u64 {
        ReceiverSession::next_seq(self)
    }
    fn order_key(&self) -> u32 {
        ReceiverSession::order_key(self)
    }
    fn must_reregister(&self) -> bool {
        ReceiverSession::must_reregister(self)
    }
    fn apply_item(
        &mut self,
        now: Instant,
        manifest: &[u8],
        chunk: &[u8],
    ) -> Result<u64, ResyncError> {
        self.handle_resync(now, manifest, chunk)
    }
    fn apply_state(&mut self, now: Instant, manifest: &[u8]) -> Result<StateVerdict, ResyncError> {
        self.handle_state_answer(now, manifest)
    }
    fn beyond_history(&mut self, now: Instant) {
        self.handle_beyond_history(now);
    }
}

impl ResyncTarget for RelaySession {
    fn group_id(&self) -> u32 {
        self.keys().rekey_sa().group_id
    }
    fn next_seq(&self) -> u64 {
        RelaySession::next_seq(self)
    }
    fn order_key(&self) -> u32 {
        RelaySession::order_key(self)
    }
    fn must_reregister(&self) -> bool {
        RelaySession::must_reregister(self)
    }
    fn apply_item(
        &mut self,
        now: Instant,
        manifest: &[u8],
        chunk: &[u8],
    ) -> Result<u64, ResyncError> {
        self.handle_resync(now, manifest, chunk)
    }
    fn apply_state(&mut self, now: Instant, manifest: &[u8]) -> Result<StateVerdict, ResyncError> {
        self.handle_state_answer(now, manifest)
    }
    fn beyond_history(&mut self, now: Instant) {
        self.handle_beyond_history(now);
    }
}

/// The policy's settings. [`ResyncConfig::default`] holds production values with no endpoint.
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default), durations are whole milliseconds in fields named `*_ms`, endpoints are written
/// `"tcp://ADDR:PORT"` or `"http://ADDR:PORT"` (see [`ResyncEndpoint`]'s `FromStr`), and a key
/// that is not a field is an error. Check what was read with [`ResyncConfig::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResyncConfig {
    /// Relay resync endpoints, tried first, in this order. A relay's "beyond the history"
    /// answer is not believed while a GCKS endpoint is configured: the GCKS is asked.
    #[serde(with = "endpoint_list")]
    pub relays: Vec<ResyncEndpoint>,
    /// The GCKS's resync endpoints, tried after every relay, in this order.
    #[serde(with = "endpoint_list")]
    pub gcks: Vec<ResyncEndpoint>,
    /// The deadline of one whole fetch (connect, request, every item). Default 10 s.
    #[serde(rename = "fetch_timeout_ms", with = "rekeycast_nack::duration_ms")]
    pub fetch_timeout: Duration,
    /// The most bytes one fetch reads. Default 16 MiB.
    pub max_fetch_bytes: usize,
    /// The most items one fetch may deliver (the history window bounds an honest answer);
    /// beyond, the endpoint is dropped. Default 1,024.
    pub max_fetch_items: u32,
    /// Rounds over the endpoint list before a resync or state check gives up. Default 5.
    pub rounds: u32,
    /// The backoff before the second round; it doubles each round. Default 200 ms.
    #[serde(rename = "backoff_initial_ms", with = "rekeycast_nack::duration_ms")]
    pub backoff_initial: Duration,
    /// The longest backoff between rounds. Default 10 s.
    #[serde(rename = "backoff_max_ms", with = "rekeycast_nack::duration_ms")]
    pub backoff_max: Duration,
    /// The group size the spreading assumes until told better
    /// ([`ResyncPolicy::set_group_size`]). Default 1.
    pub group_size: u32,
    /// Resyncs and state checks per second the endpoints can serve for the whole group: the
    /// spreading window is `group size / capacity`. Default 1,000.
    pub capacity: f64,
    /// The longest spreading window. Default 10 s.
    #[serde(rename = "max_spread_ms", with = "rekeycast_nack::duration_ms")]
    pub max_spread: Duration,
    /// The shortest spacing between two state checks raised by unverifiable traffic; it
    /// doubles with each check that finds nothing new. Default 2 s.
    #[serde(
        rename = "state_check_backoff_initial_ms",
        with = "rekeycast_nack::duration_ms"
    )]
    pub state_check_backoff_initial: Duration,
    /// The cap of that spacing, raised to `group size / capacity` for large groups. Default
    /// 60 s.
    #[serde(
        rename = "state_check_backoff_max_ms",
        with = "rekeycast_nack::duration_ms"
    )]
    pub state_check_backoff_max: Duration,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            relays: Vec::new(),
            gcks: Vec::new(),
            fetch_timeout: Duration::from_secs(10),
            max_fetch_bytes: 16 << 20,
            max_fetch_items: 1_024,
            rounds: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            group_size: 1,
            capacity: 1_000.0,
            max_spread: Duration::from_secs(10),
            state_check_backoff_initial: Duration::from_secs(2),
            state_check_backoff_max: Duration::from_secs(60),
        }
    }
}

impl ResyncConfig {
    /// Checks the ranges of every field: a non-zero fetch deadline, byte and item caps and
    /// rounds, backoffs with the initial one not above the cap, a group size of at least 1 and
    /// a positive, finite capacity.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
        if self.fetch_timeout.is_zero() {
            return invalid("fetch_timeout", "must not be 0");
        }
        if self.max_fetch_bytes == 0 {
            return invalid("max_fetch_bytes", "must be at least 1");
        }
        if self.max_fetch_items == 0 {
            return invalid("max_fetch_items", "must be at least 1");
        }
        if self.rounds == 0 {
            return invalid("rounds", "must be at least 1");
        }
        if self.backoff_initial > self.backoff_max {
            return invalid("backoff_initial", "must not exceed backoff_max");
        }
        if self.group_size == 0 {
            return invalid("group_size", "must be at least 1");
        }
        if !(self.capacity.is_finite() && self.capacity > 0.0) {
            return invalid("capacity", "must be positive and finite");
        }
        if self.state_check_backoff_initial.is_zero() {
            return invalid("state_check_backoff_initial", "must not be 0");
        }
        if self.state_check_backoff_initial > self.state_check_backoff_max {
            return invalid(
                "state_check_backoff_initial",
                "must not exceed state_check_backoff_max",
            );
        }
        Ok(())
    }
}

/// Serde's form of a list of resync endpoints: their text forms (`"tcp://ADDR:PORT"`).
mod endpoint_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::ResyncEndpoint;

    pub(super) fn serialize<S: Serializer>(
        endpoints: &[ResyncEndpoint],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let texts: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        texts.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<ResyncEndpoint>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A resync endpoint's text that is not `"tcp://ADDR:PORT"` or `"http://ADDR:PORT"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resync endpoint {text:?}: not \"tcp://ADDR:PORT\" or \"http://ADDR:PORT\" (an IP address and a port)")]
pub struct EndpointParseError {
    /// The text.
    pub text: String,
}

impl std::str::FromStr for ResyncEndpoint {
    type Err = EndpointParseError;

    /// Parses `"tcp://ADDR:PORT"` or `"http://ADDR:PORT"` (a trailing `/` allowed; IPv6
    /// addresses in brackets). Host names are not resolved here: this crate does no I/O.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || EndpointParseError {
            text: text.to_string(),
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
        let protocol = match scheme {
            "tcp" => super::ResyncProtocol::Tcp,
            "http" => super::ResyncProtocol::Http,
            _ => return Err(bad()),
        };
        let addr: std::net::SocketAddr = rest.trim_end_matches('/').parse().map_err(|_| bad())?;
        if addr.port() == 0 {
            return Err(bad());
        }
        Ok(Self { protocol, addr })
    }
}

impl std::fmt::Display for ResyncEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.protocol {
            super::ResyncProtocol::Tcp => "tcp",
            super::ResyncProtocol::Http => "http",
        };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// Whether an endpoint is a relay's or the GCKS's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointRole {
    /// A relay's endpoint.
    Relay,
    /// The GCKS's endpoint.
    Gcks,
}

/// What a resync or state check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncKind {
    /// Fetching the messages the target lacks.
    Items,
    /// Asking for the group's latest signed manifest.
    State,
}

/// What the policy tells its endpoint, for logs and figures.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResyncEvent {
    /// A resync or state check started (its first fetch went out).
    Started {
        /// What for.
        kind: ResyncKind,
    },
    /// An endpoint failed or was dropped; the next one is asked.
    EndpointFailed {
        /// The endpoint.
        endpoint: ResyncEndpoint,
        /// Why.
        reason: FetchFailure,
    },
    /// An endpoint served an item or state answer that failed verification: it is dropped.
    ItemRejected {
        /// The endpoint.
        endpoint: ResyncEndpoint,
        /// What the target said of the item.
        error: ResyncError,
    },
    /// A resync or state check ended: every endpoint answered, or one served through to its
    /// latest message, or the target must register again.
    Finished {
        /// What for.
        kind: ResyncKind,
        /// Items applied over all its fetches.
        applied: u64,
    },
    /// A resync or state check gave up after its last round.
    GaveUp {
        /// What for.
        kind: ResyncKind,
        /// Items applied over all its fetches.
        applied: u64,
    },
}

/// The policy's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncCounters {
    /// Resyncs (of items) started.
    pub resyncs_started: u64,
    /// Resyncs that gave up after their last round.
    pub resyncs_failed: u64,
    /// State checks started.
    pub state_checks_started: u64,
    /// State checks that gave up after their last round.
    pub state_checks_failed: u64,
    /// Requests absorbed by one already waiting or running (the same kind, or a state check
    /// behind a resync).
    pub requests_coalesced: u64,
    /// Fetches sent out.
    pub fetches: u64,
    /// Fetches that failed, were cancelled or passed the turn after a bad item.
    pub fetch_failures: u64,
    /// Items applied.
    pub items_applied: u64,
    /// Items and state answers that failed verification.
    pub items_rejected: u64,
}

/// Events kept for [`ResyncPolicy::poll_event`] at most (older ones are dropped).
const MAX_EVENTS: usize = 64;

/// How long past a fetch's deadline the policy waits for the driver's terminal answer before it
/// takes the fetch as failed itself.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// The resync policy of one member or relay. See the [module docs](self).
///
/// Feed it the target's events ([`Self::handle_event`]), what fetches deliver
/// ([`Self::handle_fetched`]) and timeouts ([`Self::handle_timeout`]); drain
/// [`Self::poll_fetch`], [`Self::poll_cancel`] and [`Self::poll_event`]; call again at
/// [`Self::poll_timeout`].
#[derive(Debug)]
pub struct ResyncPolicy {
    config: ResyncConfig,
    rng: ChaCha8Rng,
    group_size: u32,
    task: Option<Task>,
    /// A request made while a task runs.
    deferred: Option<Request>,
    next_fetch_id: u64,
    fetches: VecDeque<FetchRequest>,
    cancels: VecDeque<FetchId>,
    events: VecDeque<ResyncEvent>,
    counters: ResyncCounters,
    /// The spacing before the next state check raised by unverifiable traffic may go out.
    check_backoff: Duration,
    /// The earliest such a check may go out.
    next_check_allowed: Option<Instant>,
    /// When the last such check went out.
    last_ahead_check: Option<Instant>,
}

/// A resync or state check asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    kind: ResyncKind,
    /// A state check raised by traffic ahead of the target (forgeable, so backed off).
    ahead: bool,
}

/// The resync or state check in progress.
#[derive(Debug)]
struct Task {
    request: Request,
    /// The round, from 0.
    round: u32,
    /// The endpoint asked (or to ask), in the policy's order.
    index: usize,
    stage: Stage,
    /// An endpoint failed or misbehaved this round: worth another round.
    round_failed: bool,
    /// Whether the first fetch went out.
    started: bool,
    /// Items applied over the task.
    applied: u64,
    /// The endpoints were replaced while a fetch ran: the next turn goes to the first of the
    /// new order, not to the one after the running fetch's index.
    reordered: bool,
}

#[derive(Debug)]
enum Stage {
    /// The next fetch goes out at `until`.
    Waiting { until: Instant },
    /// A fetch runs.
    Fetching(Fetch),
}

#[derive(Debug)]
struct Fetch {
    id: FetchId,
    endpoint: ResyncEndpoint,
    role: EndpointRole,
    deadline: Instant,
    /// Items this fetch delivered.
    items: u32,
    /// Of those, items applied.
    served: u32,
}

/// What to do after an item of a fetch.
#[derive(Debug)]
enum Action {
    /// Wait for the next item.
    Continue,
    /// The task is done.
    Finish,
    /// The target must register again: drop the fetch and end the task.
    Abandon,
    /// The endpoint holds nothing more: the next one.
    Pass,
    /// The endpoint misbehaved: cancel its fetch, the next one.
    Drop(FetchFailure),
    /// The fetch failed: the next one.
    Failed(FetchFailure),
    /// An item failed verification: cancel, the next one.
    Reject(ResyncError),
}

/// How a fetch ended, for [`ResyncPolicy::next_endpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The endpoint answered but holds nothing more the target needs.
    Passed,
    /// The endpoint failed or misbehaved.
    Failed,
}

impl ResyncPolicy {
    /// A policy with `config`, drawing its random delays from `rng`.
    pub fn new(config: ResyncConfig, rng: ChaCha8Rng) -> Self {
        Self {
            group_size: config.group_size.max(1),
            check_backoff: config.state_check_backoff_initial,
            config,
            rng,
            task: None,
            deferred: None,
            next_fetch_id: 0,
            fetches: VecDeque::new(),
            cancels: VecDeque::new(),
            events: VecDeque::new(),
            counters: ResyncCounters::default(),
            next_check_allowed: None,
            last_ahead_check: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &ResyncConfig {
        &self.config
    }

    /// Replaces the endpoints (relays first, then the GCKS's), as a member's failover does
    /// when it moves: a fetch running goes on; a task waiting for its next fetch starts again
    /// from the first endpoint of the new order.
    pub fn set_endpoints(&mut self, relays: Vec<ResyncEndpoint>, gcks: Vec<ResyncEndpoint>) {
        self.config.relays = relays;
        self.config.gcks = gcks;
        if let Some(task) = &mut self.task {
            match task.stage {
                Stage::Waiting { .. } => task.index = 0,
                Stage::Fetching(_) => task.reordered = true,
            }
        }
    }

    /// The figures.
    pub fn counters(&self) -> &ResyncCounters {
        &self.counters
    }

    /// Whether any endpoint is configured (without one, nothing is ever fetched).
    pub fn has_endpoints(&self) -> bool {
        self.endpoint_count() > 0
    }

    /// Whether a resync or state check is waiting or running.
    pub fn is_busy(&self) -> bool {
        self.task.is_some()
    }

    /// The group size the spreading and the state-check backoff assume.
    pub fn group_size(&self) -> u32 {
        self.group_size
    }

    /// Tells the policy the group's size (an estimate will do).
    pub fn set_group_size(&mut self, size: u32) {
        self.group_size = size.max(1);
    }

    /// The window a resync or state check's start is spread over:
    /// `min(group size / capacity, max_spread)`.
    pub fn spread_window(&self) -> Duration {
        let seconds = f64::from(self.group_size) / self.config.capacity.max(f64::MIN_POSITIVE);
        let max = self.config.max_spread.as_secs_f64();
        Duration::from_secs_f64(seconds.min(max).max(0.0))
    }

    /// The cap of the spacing between state checks raised by unverifiable traffic:
    /// `max(state_check_backoff_max, group size / capacity)`.
    pub fn state_check_backoff_cap(&self) -> Duration {
        let seconds = f64::from(self.group_size) / self.config.capacity.max(f64::MIN_POSITIVE);
        // Bounded, so the conversion cannot panic on a tiny capacity.
        let scaled = Duration::from_secs_f64(seconds.clamp(0.0, 1e9));
        self.config.state_check_backoff_max.max(scaled)
    }

    /// The target raised `event`: an out-of-sync event starts (or queues) a resync, a state
    /// check request a state check; other events change nothing.
    pub fn handle_event(
        &mut self,
        now: Instant,
        event: &ReceiverEvent,
        target: &impl ResyncTarget,
    ) {
        let request = match event {
            ReceiverEvent::OutOfSync { .. } => Request {
                kind: ResyncKind::Items,
                ahead: false,
            },
            ReceiverEvent::StateCheckNeeded { claimed_seq } => Request {
                kind: ResyncKind::State,
                // A silence raises a check with the target's own next sequence number.
                ahead: *claimed_seq > target.next_seq(),
            },
            _ => return,
        };
        self.request(now, request, target);
    }

    /// Starts a resync of the messages the target lacks (after the spreading delay), or keeps
    /// the request for when the one running ends.
    pub fn request_resync(&mut self, now: Instant, target: &impl ResyncTarget) {
        let request = Request {
            kind: ResyncKind::Items,
            ahead: false,
        };
        self.request(now, request, target);
    }

    fn request(&mut self, now: Instant, request: Request, target: &impl ResyncTarget) {
        if !self.has_endpoints() || target.must_reregister() {
            return;
        }
        let Some(task) = &self.task else {
            self.begin(now, request);
            return;
        };
        match request.kind {
            // An out-of-sync request supersedes a deferred state check.
            ResyncKind::Items => {
                if self.deferred.is_some_and(|d| d.kind == ResyncKind::Items) {
                    self.counters.requests_coalesced += 1;
                }
                self.deferred = Some(request);
            }
            // A state check behind a running one, or behind any deferred request, adds
            // nothing: the answer will be as fresh.
            ResyncKind::State => {
                if task.request.kind == ResyncKind::State || self.deferred.is_some() {
                    self.counters.requests_coalesced += 1;
                } else {
                    self.deferred = Some(request);
                }
            }
        }
    }

    /// Creates the task for `request`; its first fetch goes out after the spreading delay
    /// (and, for a check raised by unverifiable traffic, not before the backoff allows).
    fn begin(&mut self, now: Instant, request: Request) {
        let mut at = now + self.spread_delay();
        if request.ahead {
            // A long quiet since the last such check: the flood (if any) is over.
            let quiet = self.state_check_backoff_cap() * 2;
            if self
                .last_ahead_check
                .is_some_and(|last| now.saturating_duration_since(last) >= quiet)
            {
                self.check_backoff = self.config.state_check_backoff_initial;
                self.next_check_allowed = None;
            }
            if let Some(allowed) = self.next_check_allowed {
                at = at.max(allowed);
            }
        }
        self.task = Some(Task {
            request,
            round: 0,
            index: 0,
            stage: Stage::Waiting { until: at },
            round_failed: false,
            started: false,
            applied: 0,
            reordered: false,
        });
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.task.as_ref()?.stage {
            Stage::Waiting { until } => Some(*until),
            Stage::Fetching(fetch) => Some(fetch.deadline + DEADLINE_GRACE),
        }
    }

    /// Time passed: a waiting fetch goes out; a fetch the driver never ended past its deadline
    /// is taken as failed.
    pub fn handle_timeout(&mut self, now: Instant, target: &mut impl ResyncTarget) {
        let Some(task) = &self.task else {
            return;
        };
        match &task.stage {
            Stage::Waiting { until } if *until <= now => self.launch(now, target),
            Stage::Fetching(fetch) if fetch.deadline + DEADLINE_GRACE <= now => {
                let id = fetch.id;
                self.cancels.push_back(id);
                self.endpoint_failed(now, FetchFailure::Deadline, target);
            }
            _ => {}
        }
    }

    /// Sends the task's next fetch, to the endpoint its index names.
    fn launch(&mut self, now: Instant, target: &mut impl ResyncTarget) {
        if target.must_reregister() {
            self.finish(now, target);
            return;
        }
        let Some(task) = self.task.as_ref() else {
            return;
        };
        let Some((endpoint, role)) = self.endpoint(task.index) else {
            // No endpoint at that index (none configured): nothing to do.
            self.task = None;
            return;
        };
        let request = task.request;
        let first = !task.started;
        let what = match request.kind {
            ResyncKind::Items => FetchWhat::Items {
                from_seq: target.next_seq(),
                leaf: target.order_key(),
            },
            ResyncKind::State => FetchWhat::State,
        };
        let id = FetchId(self.next_fetch_id);
        self.next_fetch_id += 1;
        let deadline = now + self.config.fetch_timeout;
        self.fetches.push_back(FetchRequest {
            id,
            group_id: target.group_id(),
            endpoint,
            what,
            deadline,
            max_bytes: self.config.max_fetch_bytes,
        });
        self.counters.fetches += 1;
        if first {
            match request.kind {
                ResyncKind::Items => self.counters.resyncs_started += 1,
                ResyncKind::State => self.counters.state_checks_started += 1,
            }
            self.push_event(ResyncEvent::Started { kind: request.kind });
            if request.ahead {
                // The next check raised by unverifiable traffic waits for the backoff.
                let spacing = self.jittered(self.check_backoff);
                self.next_check_allowed = Some(now + spacing);
                self.last_ahead_check = Some(now);
                self.check_backoff = (self.check_backoff * 2).min(self.state_check_backoff_cap());
            }
        }
        if let Some(task) = self.task.as_mut() {
            task.started = true;
            task.stage = Stage::Fetching(Fetch {
                id,
                endpoint,
                role,
                deadline,
                items: 0,
                served: 0,
            });
        }
    }

    /// What fetch `id` delivered: verified and applied at once; the endpoint is dropped at the
    /// first failure and the next one asked.
    pub fn handle_fetched(
        &mut self,
        now: Instant,
        id: FetchId,
        item: Fetched,
        target: &mut impl ResyncTarget,
    ) {
        let Some(task) = self.task.as_mut() else {
            return;
        };
        let kind = task.request.kind;
        let Stage::Fetching(fetch) = &mut task.stage else {
            return;
        };
        if fetch.id != id {
            // A fetch already dropped or finished.
            return;
        }
        let endpoint = fetch.endpoint;
        let role = fetch.role;
        let gcks_known = !self.config.gcks.is_empty();
        let action = match item {
            Fetched::Item { manifest, chunk } => {
                fetch.items = fetch.items.saturating_add(1);
                if kind != ResyncKind::Items {
                    Action::Drop(FetchFailure::Malformed)
                } else if fetch.items > self.config.max_fetch_items {
                    Action::Drop(FetchFailure::TooLarge)
                } else {
                    match target.apply_item(now, &manifest, &chunk) {
                        Ok(_) => {
                            fetch.served += 1;
                            task.applied += 1;
                            self.counters.items_applied += 1;
                            Action::Continue
                        }
                        // A message the target got meanwhile by multicast: harmless.
                        Err(ResyncError::WrongMessage { expected, got }) if got < expected => {
                            Action::Continue
                        }
                        Err(ResyncError::Reregistering) => Action::Abandon,
                        Err(error) => Action::Reject(error),
                    }
                }
            }
            Fetched::State(manifest) => {
                if kind != ResyncKind::State {
                    Action::Drop(FetchFailure::Malformed)
                } else {
                    match target.apply_state(now, &manifest) {
                        Ok(verdict) => {
                            if matches!(verdict, StateVerdict::Behind { .. }) {
                                // The claim was true: the next one is not taken for a forgery.
                                self.check_backoff = self.config.state_check_backoff_initial;
                                self.next_check_allowed = None;
                            }
                            Action::Finish
                        }
                        Err(ResyncError::Reregistering) => Action::Abandon,
                        Err(error) => Action::Reject(error),
                    }
                }
            }
            // Served through to the endpoint's latest message.
            Fetched::End if kind == ResyncKind::Items && fetch.served > 0 => Action::Finish,
            // Nothing newer there (a relay behind, or one that has sent nothing), or not the
            // next message the target lacks: the next endpoint may hold it.
            Fetched::End | Fetched::NotHeld => Action::Pass,
            // Only the GCKS knows the group's history: a relay saying so is not believed while
            // the GCKS can be asked.
            Fetched::BeyondHistory if role == EndpointRole::Relay && gcks_known => Action::Pass,
            Fetched::BeyondHistory => {
                target.beyond_history(now);
                Action::Finish
            }
            Fetched::Failed { reason } => Action::Failed(reason),
        };
        match action {
            Action::Continue => {}
            Action::Finish => self.finish(now, target),
            Action::Abandon => {
                self.cancels.push_back(id);
                self.finish(now, target);
            }
            Action::Pass => self.next_endpoint(now, Turn::Passed, target),
            Action::Drop(reason) => {
                self.cancels.push_back(id);
                self.endpoint_failed(now, reason, target);
            }
            Action::Failed(reason) => self.endpoint_failed(now, reason, target),
            Action::Reject(error) => {
                self.counters.items_rejected += 1;
                self.push_event(ResyncEvent::ItemRejected { endpoint, error });
                self.cancels.push_back(id);
                self.counters.fetch_failures += 1;
                self.next_endpoint(now, Turn::Failed, target);
            }
        }
    }

    fn endpoint_failed(
        &mut self,
        now: Instant,
        reason: FetchFailure,
        target: &mut impl ResyncTarget,
    ) {
        if let Some(Stage::Fetching(fetch)) = self.task.as_ref().map(|t| &t.stage) {
            let endpoint = fetch.endpoint;
            self.push_event(ResyncEvent::EndpointFailed { endpoint, reason });
        }
        self.counters.fetch_failures += 1;
        self.next_endpoint(now, Turn::Failed, target);
    }

    /// The current endpoint's turn is over: the next one is asked from the next message the
    /// target lacks; after the last, another round (after a backoff) if one failed, else the
    /// task ends.
    fn next_endpoint(&mut self, now: Instant, turn: Turn, target: &mut impl ResyncTarget) {
        let count = self.endpoint_count();
        let rounds = self.config.rounds.max(1);
        let Some(task) = self.task.as_mut() else {
            return;
        };
        task.round_failed |= turn == Turn::Failed;
        task.index = if std::mem::take(&mut task.reordered) {
            0
        } else {
            task.index + 1
        };
        if task.index < count {
            self.launch(now, target);
            return;
        }
        if !task.round_failed {
            // Every endpoint answered and none holds more: nothing to retry.
            self.finish(now, target);
            return;
        }
        if task.round + 1 >= rounds {
            let (kind, applied) = (task.request.kind, task.applied);
            match kind {
                ResyncKind::Items => self.counters.resyncs_failed += 1,
                ResyncKind::State => self.counters.state_checks_failed += 1,
            }
            self.push_event(ResyncEvent::GaveUp { kind, applied });
            self.task = None;
            self.start_deferred(now, target);
            return;
        }
        task.round += 1;
        task.index = 0;
        task.round_failed = false;
        let round = task.round;
        let backoff = self.round_backoff(round);
        if let Some(task) = self.task.as_mut() {
            task.stage = Stage::Waiting {
                until: now + backoff,
            };
        }
    }

    /// The task ended (not given up).
    fn finish(&mut self, now: Instant, target: &mut impl ResyncTarget) {
        if let Some(task) = self.task.take() {
            self.push_event(ResyncEvent::Finished {
                kind: task.request.kind,
                applied: task.applied,
            });
        }
        self.start_deferred(now, target);
    }

    /// Starts the request kept while the task ran, from where the target stands now.
    fn start_deferred(&mut self, now: Instant, target: &impl ResyncTarget) {
        if let Some(request) = self.deferred.take() {
            self.request(now, request, target);
        }
    }

    /// The next fetch to perform.
    pub fn poll_fetch(&mut self) -> Option<FetchRequest> {
        self.fetches.pop_front()
    }

    /// The next fetch to abandon (its endpoint was dropped): what it still delivers is ignored.
    pub fn poll_cancel(&mut self) -> Option<FetchId> {
        self.cancels.pop_front()
    }

    /// The next event, for logs and figures.
    pub fn poll_event(&mut self) -> Option<ResyncEvent> {
        self.events.pop_front()
    }

    fn push_event(&mut self, event: ResyncEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn endpoint_count(&self) -> usize {
        self.config.relays.len() + self.config.gcks.len()
    }

    /// The endpoint at `index` of the policy's order: relays, then the GCKS's.
    fn endpoint(&self, index: usize) -> Option<(ResyncEndpoint, EndpointRole)> {
        let relays = self.config.relays.len();
        if index < relays {
            self.config
                .relays
                .get(index)
                .map(|e| (*e, EndpointRole::Relay))
        } else {
            self.config
                .gcks
                .get(index - relays)
                .map(|e| (*e, EndpointRole::Gcks))
        }
    }

    /// A uniform draw over the spreading window.
    fn spread_delay(&mut self) -> Duration {
        let window = self.spread_window();
        super::spread(Duration::ZERO, window, self.rng.gen::<f64>())
    }

    /// The backoff before round `round` (from 1): `backoff_initial * 2^(round - 1)`, capped,
    /// jittered.
    fn round_backoff(&mut self, round: u32) -> Duration {
        let doublings = round.saturating_sub(1).min(30);
        let base = self
            .config
            .backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.config.backoff_max);
        self.jittered(base)
    }

    /// `base` jittered uniformly over `[base / 2, base)`.
    fn jittered(&mut self, base: Duration) -> Duration {
        super::spread(base / 2, base / 2, self.rng.gen::<f64>())
    }
}

#[cfg(test)]
mod tests;
