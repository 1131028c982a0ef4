//! The sans-IO endpoints over the C ABI: `rkc_gcks_endpoint` (the key server side of a group)
//! and `rkc_member_endpoint` (one member).
//!
//! The product owns the sockets and the clock. After creating an endpoint, and after every
//! `*_handle_*` call or command, it drains `*_poll_event` and `*_poll_transmit` (sending each
//! datagram by the socket its port names) until they return `RKC_DONE`, then reads
//! `*_timeout` and calls `*_handle_timeout` when that time comes. Times are microseconds of
//! one monotonic clock (`CLOCK_MONOTONIC`), the same for every call on a handle.
//!
//! Events first: a GCKS's joiners must get their bundles (`RKC_GCKS_JOINED`) and join the
//! group before the message that admits them goes out. The admission delay runs from the
//! time of the call that built the batch, so a product slower than the delay (a batch built
//! inline under valgrind took longer than 50 ms) would otherwise send that message first.
//!
//! The work an endpoint hands out (building and signing a batch) runs inline, inside the call
//! that caused it; nothing is persisted (a product that needs a durable GCKS embeds the
//! engine, `rkc_gcks`, with a state directory, from Rust); a member endpoint has no resync
//! endpoint of its own: it reports `RKC_MEMBER_OUT_OF_SYNC` and the product re-registers it
//! or resyncs it by other means.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast_proto::endpoint::gcks::{
    GcksCommand, GcksEndpoint, GcksEndpointConfig, GcksEvent, ResyncAnswer, WallClock,
};
use rekeycast_proto::endpoint::member::{MemberEndpoint, MemberEndpointConfig};
use rekeycast_proto::endpoint::{
    Destination, Endpoint, FetchFailure, Fetched, Job, Port, StoreError, StoreErrorKind,
};
use rekeycast_proto::gsa::WrapAlgorithm;
use rekeycast_proto::lkh::{Degree, KeyRng, MemberId, RegistrationBundle};
use rekeycast_proto::session::ReceiverEvent;
use zeroize::Zeroizing;

use crate::keys::KeyStore;
use crate::{
    boundary, check_out, handle_mut, handle_ref, in_ref, in_slice, issue, out_slice, retire,
    rkc_addr, rkc_result, write_out, Clock, Kind, RKC_DATAGRAM_SIZE, RKC_KEY_LEN,
};

/// The socket a datagram arrived on or leaves by.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rkc_port {
    /// The GCKS's socket: it sends to the group (and to single members) and receives the
    /// members' NACKs and probe replies.
    RKC_PORT_SERVE = 0,
    /// A member's socket bound to the multicast group: receive only.
    RKC_PORT_LISTEN = 1,
    /// A member's unicast socket towards the GCKS: its NACKs leave by it, unicast repair
    /// arrives on it.
    RKC_PORT_FEEDBACK = 2,
}

impl rkc_port {
    fn from_raw(port: u32) -> Result<Port, rkc_result> {
        match port {
            0 => Ok(Port::Serve),
            1 => Ok(Port::Listen),
            2 => Ok(Port::Feedback),
            _ => Err(rkc_result::RKC_INVALID_ARGUMENT),
        }
    }

    fn from_port(port: Port) -> Self {
        match port {
            Port::Serve => Self::RKC_PORT_SERVE,
            Port::Listen => Self::RKC_PORT_LISTEN,
            Port::Feedback => Self::RKC_PORT_FEEDBACK,
        }
    }
}

/// A datagram to send: the first `len` bytes of the buffer given to `*_poll_transmit`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rkc_transmit {
    /// Its length in bytes.
    pub len: usize,
    /// The socket it leaves by.
    pub port: rkc_port,
    /// 1: it goes to the multicast group the product serves (`to` is unset); 0: to `to`.
    pub to_group: u8,
    /// Where it goes when `to_group` is 0.
    pub to: rkc_addr,
}

/// The settings of a GCKS (both `rkc_gcks_endpoint_new` and `rkc_gcks_start`); start from
/// `rkc_gcks_config_default`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rkc_gcks_config {
    /// The group id, in every datagram's header.
    pub group_id: u32,
    /// The SPI of the Rekey SA.
    pub spi: u32,
    /// Time between rekeys while membership changes are pending, milliseconds (at least 1).
    pub batch_interval_ms: u32,
    /// Time between handing a batch's joiners their bundles and sending its message,
    /// milliseconds: the joiners join the multicast group meanwhile.
    pub admission_delay_ms: u32,
    /// Lifetime of each Data SA (traffic key), seconds (at least 1).
    pub data_sa_lifetime_secs: u32,
    /// Seed of the key tree's randomness, for tests and demos only; 0: the operating
    /// system's RNG, as a deployment must use.
    pub key_seed: u64,
}

/// Writes the default GCKS settings to `config_out`: group 1, SPI 1, batches every second,
/// an admission delay of 100 ms, Data SAs of an hour, the operating system's RNG.
///
/// # Safety
///
/// `config_out` is `NULL` or points to writable memory for an `rkc_gcks_config`.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_config_default(config_out: *mut rkc_gcks_config) -> rkc_result {
    boundary(|| {
        check_out(config_out)?;
        let config = rkc_gcks_config {
            group_id: 1,
            spi: 1,
            batch_interval_ms: 1000,
            admission_delay_ms: 100,
            data_sa_lifetime_secs: 3600,
            key_seed: 0,
        };
        // SAFETY: checked above; the caller's contract.
        unsafe { write_out(config_out, config) };
        Ok(rkc_result::RKC_OK)
    })
}

impl rkc_gcks_config {
    pub(crate) fn check(&self) -> Result<(), rkc_result> {
        if self.batch_interval_ms == 0 || self.data_sa_lifetime_secs == 0 {
            return Err(rkc_result::RKC_INVALID_CONFIG);
        }
        Ok(())
    }

    pub(crate) fn key_rng(&self) -> Result<KeyRng, rkc_result> {
        match self.key_seed {
            0 => KeyRng::from_os().map_err(|_| rkc_result::RKC_IO),
            seed => Ok(KeyRng::seeded_for_simulation(seed)),
        }
    }
}

/// The settings of a member (both `rkc_member_endpoint_new` and `rkc_member_start`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rkc_member_config {
    /// The multicast group of the rekey traffic.
    pub group: rkc_addr,
    /// The GCKS's unicast address, where NACKs and probe replies go.
    pub feedback: rkc_addr,
    /// Seed of the member's random delays; 0: drawn from the operating system.
    pub seed: u64,
    /// How long before a traffic key expires the member reports it as expiring, seconds.
    pub expiry_warning_secs: u32,
}

impl rkc_member_config {
    pub(crate) fn rng(&self) -> ChaCha8Rng {
        match self.seed {
            0 => ChaCha8Rng::from_entropy(),
            seed => ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

/// What happened at a GCKS.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rkc_gcks_event_kind {
    /// `member` was admitted: its registration bundle waits for `*_take_bundle`.
    RKC_GCKS_JOINED = 0,
    /// The join of `member` was refused or cancelled (`error` says how).
    RKC_GCKS_JOIN_REFUSED = 1,
    /// `member` was removed (or its pending join cancelled).
    RKC_GCKS_LEFT = 2,
    /// The leave of `member` was refused (`error` says how).
    RKC_GCKS_LEAVE_REFUSED = 3,
    /// A batch was committed as message `seq`; the group has `members` members.
    RKC_GCKS_REKEYED = 4,
    /// The initial transmission of message `seq` is on the wire.
    RKC_GCKS_SENT = 5,
    /// The batch that would have been message `seq` failed; it is retried.
    RKC_GCKS_BATCH_FAILED = 6,
    /// The GCKS cannot go on and has stopped.
    RKC_GCKS_POISONED = 7,
}

/// One GCKS event; the fields a kind does not name are 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rkc_gcks_event {
    /// What happened.
    pub kind: rkc_gcks_event_kind,
    /// The member a join or leave concerns.
    pub member: u64,
    /// The message a rekey concerns.
    pub seq: u64,
    /// The group's size after a rekey.
    pub members: u64,
    /// Why a join or leave was refused.
    pub error: rkc_result,
}

impl rkc_gcks_event {
    fn new(kind: rkc_gcks_event_kind) -> Self {
        Self {
            kind,
            member: 0,
            seq: 0,
            members: 0,
            error: rkc_result::RKC_OK,
        }
    }
}

/// Turns an endpoint event into its C form, keeping a join's bundle in `bundles`;
/// `member_of` names the member of an answer's ticket. Events C does not see give `None`.
pub(crate) fn gcks_event<T>(
    event: GcksEvent<T>,
    member_of: impl Fn(T) -> u64,
    bundles: &mut HashMap<u64, Zeroizing<Vec<u8>>>,
) -> Option<rkc_gcks_event> {
    use rkc_gcks_event_kind::*;
    let event = match event {
        GcksEvent::JoinAnswered { ticket, result, .. } => {
            let member = member_of(ticket);
            let encoded = match result {
                Ok(bundle) => bundle.encode().map_err(|_| rkc_result::RKC_INVALID_BUNDLE),
                Err(_) => Err(rkc_result::RKC_REFUSED),
            };
            match encoded {
                Ok(bytes) => {
                    bundles.insert(member, bytes);
                    rkc_gcks_event {
                        member,
                        ..rkc_gcks_event::new(RKC_GCKS_JOINED)
                    }
                }
                Err(error) => rkc_gcks_event {
                    member,
                    error,
                    ..rkc_gcks_event::new(RKC_GCKS_JOIN_REFUSED)
                },
            }
        }
        GcksEvent::LeaveAnswered { ticket, result, .. } => {
            let member = member_of(ticket);
            match result {
                Ok(_) => rkc_gcks_event {
                    member,
                    ..rkc_gcks_event::new(RKC_GCKS_LEFT)
                },
                Err(_) => rkc_gcks_event {
                    member,
                    error: rkc_result::RKC_REFUSED,
                    ..rkc_gcks_event::new(RKC_GCKS_LEAVE_REFUSED)
                },
            }
        }
        GcksEvent::Rekeyed { seq, members, .. } => rkc_gcks_event {
            seq,
            members: u64::try_from(members).unwrap_or(u64::MAX),
            ..rkc_gcks_event::new(RKC_GCKS_REKEYED)
        },
        GcksEvent::Sent { seq } => rkc_gcks_event {
            seq,
            ..rkc_gcks_event::new(RKC_GCKS_SENT)
        },
        GcksEvent::BatchFailed { seq, .. } => rkc_gcks_event {
            seq,
            ..rkc_gcks_event::new(RKC_GCKS_BATCH_FAILED)
        },
        GcksEvent::Poisoned { .. } => rkc_gcks_event {
            error: rkc_result::RKC_POISONED,
            ..rkc_gcks_event::new(RKC_GCKS_POISONED)
        },
        _ => return None,
    };
    Some(event)
}

/// Copies the bundle of `member` out of `bundles` into `out` and forgets (zeroizes) it.
pub(crate) fn take_bundle(
    bundles: &mut HashMap<u64, Zeroizing<Vec<u8>>>,
    member: u64,
    out: &mut [u8],
) -> Result<usize, rkc_result> {
    let bundle = bundles.get(&member).ok_or(rkc_result::RKC_NOT_FOUND)?;
    let len = bundle.len();
    out.get_mut(..len)
        .ok_or(rkc_result::RKC_BUFFER_TOO_SHORT)?
        .copy_from_slice(bundle);
    bundles.remove(&member);
    Ok(len)
}

/// The key server side of one group, sans-IO. Opaque; made by `rkc_gcks_endpoint_new`, freed
/// by `rkc_gcks_endpoint_free`.
pub struct rkc_gcks_endpoint {
    endpoint: GcksEndpoint<u64>,
    clock: Clock,
    events: VecDeque<rkc_gcks_event>,
    bundles: HashMap<u64, Zeroizing<Vec<u8>>>,
    stopped: bool,
}

impl rkc_gcks_endpoint {
    /// Runs what the endpoint handed out and collects its events.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(job) = self.endpoint.poll_job() {
                let output = job.run();
                self.endpoint.handle_job_result(now, output);
                progressed = true;
            }
            while let Some((id, _)) = self.endpoint.poll_store() {
                // Not configured durable: no operation is issued; one that were would fail
                // honestly rather than be acknowledged unwritten.
                let refused = StoreError {
                    kind: StoreErrorKind::Io,
                    detail: "the C ABI's GCKS endpoint has no storage".into(),
                };
                self.endpoint.handle_stored(now, id, Err(refused));
                progressed = true;
            }
            while let Some(event) = self.endpoint.poll_event() {
                if let Some(event) = gcks_event(event, |member| member, &mut self.bundles) {
                    self.events.push_back(event);
                }
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }

    fn command(
        &mut self,
        now_us: u64,
        command: GcksCommand<u64>,
    ) -> Result<rkc_result, rkc_result> {
        if self.stopped || self.endpoint.is_stopped() {
            return Err(rkc_result::RKC_STOPPED);
        }
        let now = self.clock.at(now_us);
        self.endpoint.handle_command(now, command);
        self.pump(now);
        Ok(rkc_result::RKC_OK)
    }
}

/// Creates a GCKS endpoint with `config`, signing with the 32-byte Ed25519 key `signing_key`
/// (see `rkc_signing_key_generate`), started at `now_us`; writes it to `*endpoint_out`.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`signing_key` for `signing_key_len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_new(
    config: *const rkc_gcks_config,
    signing_key: *const u8,
    signing_key_len: usize,
    now_us: u64,
    endpoint_out: *mut *mut rkc_gcks_endpoint,
) -> rkc_result {
    boundary(|| {
        // SAFETY: the caller's contract on each pointer.
        let config = unsafe { in_ref(config) }?;
        // SAFETY: as above.
        let key = unsafe { in_slice(signing_key, signing_key_len) }?;
        check_out(endpoint_out)?;
        config.check()?;
        let key: &[u8; RKC_KEY_LEN] = key
            .try_into()
            .map_err(|_| rkc_result::RKC_INVALID_ARGUMENT)?;
        let signing_key = ed25519_dalek::SigningKey::from_bytes(key);
        let clock = Clock::new(now_us);
        let now = clock.origin;
        let endpoint_config = endpoint_config(config);
        let wall = WallClock {
            unix_micros: unix_micros(),
            at: now,
        };
        let endpoint = GcksEndpoint::new(
            endpoint_config,
            signing_key,
            config.key_rng()?,
            rand::thread_rng().gen(),
            wall,
            now,
        )
        .map_err(|_| rkc_result::RKC_INVALID_CONFIG)?;
        let mut handle = rkc_gcks_endpoint {
            endpoint,
            clock,
            events: VecDeque::new(),
            bundles: HashMap::new(),
            stopped: false,
        };
        handle.pump(now);
        // SAFETY: checked above.
        unsafe { write_out(endpoint_out, issue(handle, Kind::GcksEndpoint)) };
        Ok(rkc_result::RKC_OK)
    })
}

fn endpoint_config(config: &rkc_gcks_config) -> GcksEndpointConfig {
    use rekeycast_proto::endpoint::gcks::membership::Schedule;
    GcksEndpointConfig {
        group_id: config.group_id,
        spi: config.spi,
        degree: Degree::DEFAULT,
        wrap_algorithm: WrapAlgorithm::Aes256Gcm,
        data_sa_lifetime_secs: config.data_sa_lifetime_secs,
        lifetimes: Default::default(),
        sender: Default::default(),
        message: Default::default(),
        schedule: Schedule::new(
            Duration::from_millis(u64::from(config.batch_interval_ms)),
            10_000,
        ),
        admission_delay: Duration::from_millis(u64::from(config.admission_delay_ms)),
        durable: false,
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Frees the endpoint at `*endpoint` and sets `*endpoint` to `NULL`. Does nothing if
/// `endpoint` or `*endpoint` is `NULL` or the handle was freed already. Bundles not taken
/// are zeroized.
///
/// # Safety
///
/// `endpoint` is `NULL` or points to a readable and writable pointer.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_free(endpoint: *mut *mut rkc_gcks_endpoint) {
    let _ = boundary(|| {
        // SAFETY: the caller's contract.
        drop(unsafe { retire(endpoint, Kind::GcksEndpoint) });
        Ok(rkc_result::RKC_OK)
    });
}

/// Admits `member` in the next batch: `RKC_GCKS_JOINED` follows once the batch is built.
///
/// # Safety
///
/// `endpoint` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_join(
    endpoint: *mut rkc_gcks_endpoint,
    member: u64,
    now_us: u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        handle.command(
            now_us,
            GcksCommand::Join {
                member: MemberId(member),
                relay: false,
                ticket: member,
            },
        )
    })
}

/// Removes `member` in the next batch (or cancels its pending join): `RKC_GCKS_LEFT` or
/// `RKC_GCKS_LEAVE_REFUSED` follows.
///
/// # Safety
///
/// `endpoint` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_leave(
    endpoint: *mut rkc_gcks_endpoint,
    member: u64,
    now_us: u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        handle.command(
            now_us,
            GcksCommand::Leave {
                member: MemberId(member),
                ticket: member,
            },
        )
    })
}

/// Applies the pending changes now (or refreshes the group key if there are none).
///
/// # Safety
///
/// `endpoint` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_rekey_now(
    endpoint: *mut rkc_gcks_endpoint,
    now_us: u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        handle.command(now_us, GcksCommand::RekeyNow)
    })
}

/// Stops the endpoint: waiting joins are refused, and every later command returns
/// `RKC_STOPPED`. What it has queued can still be polled. Free it with
/// `rkc_gcks_endpoint_free`.
///
/// # Safety
///
/// `endpoint` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_stop(
    endpoint: *mut rkc_gcks_endpoint,
    now_us: u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        let result = handle.command(now_us, GcksCommand::Stop);
        handle.stopped = true;
        result
    })
}

/// A datagram of `len` bytes arrived on the GCKS's socket from `from` (a member's NACK or
/// probe reply).
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`bytes` for `len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_handle_datagram(
    endpoint: *mut rkc_gcks_endpoint,
    now_us: u64,
    from: *const rkc_addr,
    bytes: *const u8,
    len: usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        // SAFETY: the caller's contract.
        let from = unsafe { in_ref(from) }?.to_socket_addr()?;
        // SAFETY: the caller's contract.
        let bytes = unsafe { in_slice(bytes, len) }?;
        let now = handle.clock.at(now_us);
        handle
            .endpoint
            .handle_datagram(now, Port::Serve, from, bytes);
        handle.pump(now);
        Ok(rkc_result::RKC_OK)
    })
}

/// The time written by `rkc_gcks_endpoint_timeout` came: let the endpoint act on it.
///
/// # Safety
///
/// `endpoint` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_handle_timeout(
    endpoint: *mut rkc_gcks_endpoint,
    now_us: u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        let now = handle.clock.at(now_us);
        handle.endpoint.handle_timeout(now);
        handle.pump(now);
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes to `*deadline_us_out` when `rkc_gcks_endpoint_handle_timeout` must next be called;
/// `RKC_DONE` (nothing written) if no deadline is set.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_timeout(
    endpoint: *const rkc_gcks_endpoint,
    deadline_us_out: *mut u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(endpoint, Kind::GcksEndpoint) }?;
        check_out(deadline_us_out)?;
        let Some(deadline) = handle.endpoint.poll_timeout() else {
            return Ok(rkc_result::RKC_DONE);
        };
        // SAFETY: checked above.
        unsafe { write_out(deadline_us_out, handle.clock.micros(deadline)) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the next datagram to send into `buf` (`len` >= `RKC_DATAGRAM_SIZE`) and where it goes
/// to `*transmit_out`; `RKC_DONE` when there is none.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`buf` for `len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_poll_transmit(
    endpoint: *mut rkc_gcks_endpoint,
    now_us: u64,
    buf: *mut u8,
    len: usize,
    transmit_out: *mut rkc_transmit,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        // SAFETY: the caller's contract.
        let buf = unsafe { out_slice(buf, len) }?;
        check_out(transmit_out)?;
        if buf.len() < RKC_DATAGRAM_SIZE {
            return Err(rkc_result::RKC_BUFFER_TOO_SHORT);
        }
        let now = handle.clock.at(now_us);
        let transmit = handle.endpoint.poll_transmit(now, buf);
        handle.pump(now);
        let Some(transmit) = transmit else {
            return Ok(rkc_result::RKC_DONE);
        };
        // SAFETY: checked above.
        unsafe { write_out(transmit_out, c_transmit(transmit)) };
        Ok(rkc_result::RKC_OK)
    })
}

fn c_transmit(transmit: rekeycast_proto::endpoint::Transmit) -> rkc_transmit {
    let (to_group, to) = match transmit.destination {
        Destination::Group => (
            1,
            rkc_addr {
                family: 0,
                port: 0,
                ip: [0; 16],
            },
        ),
        Destination::Unicast(addr) => (0, rkc_addr::from_socket_addr(addr)),
    };
    rkc_transmit {
        len: transmit.len,
        port: rkc_port::from_port(transmit.port),
        to_group,
        to,
    }
}

/// Writes the next event to `*event_out`; `RKC_DONE` when there is none.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_poll_event(
    endpoint: *mut rkc_gcks_endpoint,
    event_out: *mut rkc_gcks_event,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        check_out(event_out)?;
        let Some(event) = handle.events.pop_front() else {
            return Ok(rkc_result::RKC_DONE);
        };
        // SAFETY: checked above.
        unsafe { write_out(event_out, event) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the length of `member`'s waiting registration bundle to `*len_out`
/// (`RKC_NOT_FOUND`: none waits).
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_bundle_len(
    endpoint: *const rkc_gcks_endpoint,
    member: u64,
    len_out: *mut usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(endpoint, Kind::GcksEndpoint) }?;
        check_out(len_out)?;
        let len = handle
            .bundles
            .get(&member)
            .ok_or(rkc_result::RKC_NOT_FOUND)?
            .len();
        // SAFETY: checked above.
        unsafe { write_out(len_out, len) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Copies `member`'s registration bundle (its secret keys: hand it to the member over an
/// authenticated, confidential channel) into `buf` and its length to `*written_out`, then
/// zeroizes the library's copy. On `RKC_BUFFER_TOO_SHORT` the bundle stays.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`buf` for `len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_take_bundle(
    endpoint: *mut rkc_gcks_endpoint,
    member: u64,
    buf: *mut u8,
    len: usize,
    written_out: *mut usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::GcksEndpoint) }?;
        // SAFETY: the caller's contract.
        let buf = unsafe { out_slice(buf, len) }?;
        check_out(written_out)?;
        let written = take_bundle(&mut handle.bundles, member, buf)?;
        // SAFETY: checked above.
        unsafe { write_out(written_out, written) };
        Ok(rkc_result::RKC_OK)
    })
}

/// What happened at a member.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rkc_member_event_kind {
    /// Message `seq` installed the traffic key of Data SA `spi`, valid `secs` seconds: copy it
    /// with `*_traffic_key`.
    RKC_MEMBER_KEY_INSTALLED = 0,
    /// The traffic key of Data SA `spi` expires in `secs` seconds.
    RKC_MEMBER_KEY_EXPIRING = 1,
    /// The member cannot complete message `seq` over multicast: it needs a resync from `seq`
    /// on (or a new registration).
    RKC_MEMBER_OUT_OF_SYNC = 2,
    /// Traffic claimed message `seq`, later than the member can check, or nothing was heard
    /// for long: the product should check the group's state.
    RKC_MEMBER_STATE_CHECK_NEEDED = 3,
    /// The member must register again (its keys cannot open its messages, or what it lacks
    /// left the history).
    RKC_MEMBER_MUST_REREGISTER = 4,
}

/// One member event; the fields a kind does not name are 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rkc_member_event {
    /// What happened.
    pub kind: rkc_member_event_kind,
    /// The message it concerns.
    pub seq: u64,
    /// The Data SA it concerns.
    pub spi: u32,
    /// The key's lifetime (installed) or time left (expiring), seconds.
    pub secs: u32,
}

impl rkc_member_event {
    fn new(kind: rkc_member_event_kind) -> Self {
        Self {
            kind,
            seq: 0,
            spi: 0,
            secs: 0,
        }
    }
}

/// Turns a receiver event into its C form, installing a new traffic key in `keys`.
pub(crate) fn member_event(
    event: ReceiverEvent,
    now: Instant,
    keys: &mut KeyStore,
) -> Option<rkc_member_event> {
    use rkc_member_event_kind::*;
    Some(match event {
        ReceiverEvent::NewDataSa { seq, data_sa } => {
            keys.install(now, &data_sa);
            rkc_member_event {
                seq,
                spi: data_sa.spi,
                secs: data_sa.lifetime_secs,
                ..rkc_member_event::new(RKC_MEMBER_KEY_INSTALLED)
            }
        }
        ReceiverEvent::OutOfSync { from_seq } => rkc_member_event {
            seq: from_seq,
            ..rkc_member_event::new(RKC_MEMBER_OUT_OF_SYNC)
        },
        ReceiverEvent::StateCheckNeeded { claimed_seq } => rkc_member_event {
            seq: claimed_seq,
            ..rkc_member_event::new(RKC_MEMBER_STATE_CHECK_NEEDED)
        },
        ReceiverEvent::MustReregister => rkc_member_event::new(RKC_MEMBER_MUST_REREGISTER),
        _ => return None,
    })
}

/// One member's rekey receiver, sans-IO. Opaque; made by `rkc_member_endpoint_new`, freed by
/// `rkc_member_endpoint_free`.
pub struct rkc_member_endpoint {
    endpoint: MemberEndpoint,
    clock: Clock,
    keys: KeyStore,
    events: VecDeque<rkc_member_event>,
    stopped: bool,
}

impl rkc_member_endpoint {
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(fetch) = self.endpoint.poll_fetch() {
                // No resync endpoint is configured, so none is asked for; one that were
                // could not be performed here.
                let failed = Fetched::Failed {
                    reason: FetchFailure::Refused,
                };
                self.endpoint.handle_fetched(now, fetch.id, failed);
                progressed = true;
            }
            while let Some((id, _)) = self.endpoint.poll_store() {
                let refused = StoreError {
                    kind: StoreErrorKind::Io,
                    detail: "the C ABI's member endpoint has no storage".into(),
                };
                self.endpoint.handle_stored(now, id, Err(refused));
                progressed = true;
            }
            while let Some(event) = self.endpoint.poll_event() {
                if let Some(event) = member_event(event, now, &mut self.keys) {
                    self.events.push_back(event);
                }
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        while let Some(expiring) = self.keys.poll_expiring(now) {
            self.events.push_back(rkc_member_event {
                spi: expiring.spi,
                secs: expiring.seconds_left,
                ..rkc_member_event::new(rkc_member_event_kind::RKC_MEMBER_KEY_EXPIRING)
            });
        }
    }
}

/// Creates the endpoint of the member that registered with the `bundle_len` bytes of
/// `bundle` (from `*_take_bundle`), with `config`, started at `now_us`; writes it to
/// `*endpoint_out`.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`bundle` for `bundle_len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_new(
    bundle: *const u8,
    bundle_len: usize,
    config: *const rkc_member_config,
    now_us: u64,
    endpoint_out: *mut *mut rkc_member_endpoint,
) -> rkc_result {
    boundary(|| {
        // SAFETY: the caller's contract on each pointer.
        let bundle = unsafe { in_slice(bundle, bundle_len) }?;
        // SAFETY: as above.
        let config = unsafe { in_ref(config) }?;
        check_out(endpoint_out)?;
        let bundle =
            RegistrationBundle::decode(bundle).map_err(|_| rkc_result::RKC_INVALID_BUNDLE)?;
        let group = config.group.to_socket_addr()?;
        let feedback = config.feedback.to_socket_addr()?;
        let clock = Clock::new(now_us);
        let now = clock.origin;
        let endpoint = MemberEndpoint::new(
            &bundle,
            MemberEndpointConfig::new(group, feedback),
            config.rng(),
            now,
        )
        .map_err(|_| rkc_result::RKC_INVALID_BUNDLE)?;
        let mut handle = rkc_member_endpoint {
            endpoint,
            clock,
            keys: KeyStore::new(Duration::from_secs(u64::from(config.expiry_warning_secs))),
            events: VecDeque::new(),
            stopped: false,
        };
        handle.pump(now);
        // SAFETY: checked above.
        unsafe { write_out(endpoint_out, issue(handle, Kind::MemberEndpoint)) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Frees the endpoint at `*endpoint` (its keys are zeroized) and sets `*endpoint` to `NULL`.
/// Does nothing if `endpoint` or `*endpoint` is `NULL` or the handle was freed already.
///
/// # Safety
///
/// `endpoint` is `NULL` or points to a readable and writable pointer.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_free(endpoint: *mut *mut rkc_member_endpoint) {
    let _ = boundary(|| {
        // SAFETY: the caller's contract.
        drop(unsafe { retire(endpoint, Kind::MemberEndpoint) });
        Ok(rkc_result::RKC_OK)
    });
}

/// A datagram of `len` bytes arrived from `from` on the member's socket `port`
/// (`RKC_PORT_LISTEN`: the group's; `RKC_PORT_FEEDBACK`: its unicast socket).
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`bytes` for `len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_handle_datagram(
    endpoint: *mut rkc_member_endpoint,
    now_us: u64,
    port: u32,
    from: *const rkc_addr,
    bytes: *const u8,
    len: usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::MemberEndpoint) }?;
        // SAFETY: the caller's contract.
        let from = unsafe { in_ref(from) }?.to_socket_addr()?;
        // SAFETY: the caller's contract.
        let bytes = unsafe { in_slice(bytes, len) }?;
        let port = rkc_port::from_raw(port)?;
        if handle.stopped {
            return Err(rkc_result::RKC_STOPPED);
        }
        let now = handle.clock.at(now_us);
        handle.endpoint.handle_datagram(now, port, from, bytes);
        handle.pump(now);
        Ok(rkc_result::RKC_OK)
    })
}

/// The time written by `rkc_member_endpoint_timeout` came: let the endpoint act on it.
///
/// # Safety
///
/// `endpoint` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_handle_timeout(
    endpoint: *mut rkc_member_endpoint,
    now_us: u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::MemberEndpoint) }?;
        if handle.stopped {
            return Err(rkc_result::RKC_STOPPED);
        }
        let now = handle.clock.at(now_us);
        handle.endpoint.handle_timeout(now);
        handle.pump(now);
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes to `*deadline_us_out` when `rkc_member_endpoint_handle_timeout` must next be called
/// (the endpoint's next deadline, or a key's expiry warning); `RKC_DONE` if none is set.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_timeout(
    endpoint: *const rkc_member_endpoint,
    deadline_us_out: *mut u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(endpoint, Kind::MemberEndpoint) }?;
        check_out(deadline_us_out)?;
        if handle.stopped {
            return Ok(rkc_result::RKC_DONE);
        }
        let deadline = match (handle.endpoint.poll_timeout(), handle.keys.deadline()) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Ok(rkc_result::RKC_DONE),
        };
        // SAFETY: checked above.
        unsafe { write_out(deadline_us_out, handle.clock.micros(deadline)) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the next datagram to send into `buf` (`len` >= `RKC_DATAGRAM_SIZE`) and where it goes
/// to `*transmit_out` (always a unicast address, by `RKC_PORT_FEEDBACK`); `RKC_DONE` when there
/// is none.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`buf` for `len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_poll_transmit(
    endpoint: *mut rkc_member_endpoint,
    now_us: u64,
    buf: *mut u8,
    len: usize,
    transmit_out: *mut rkc_transmit,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::MemberEndpoint) }?;
        // SAFETY: the caller's contract.
        let buf = unsafe { out_slice(buf, len) }?;
        check_out(transmit_out)?;
        if buf.len() < RKC_DATAGRAM_SIZE {
            return Err(rkc_result::RKC_BUFFER_TOO_SHORT);
        }
        let now = handle.clock.at(now_us);
        let Some(transmit) = handle.endpoint.poll_transmit(now, buf) else {
            return Ok(rkc_result::RKC_DONE);
        };
        // SAFETY: checked above.
        unsafe { write_out(transmit_out, c_transmit(transmit)) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the next event to `*event_out`; `RKC_DONE` when there is none.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_poll_event(
    endpoint: *mut rkc_member_endpoint,
    event_out: *mut rkc_member_event,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::MemberEndpoint) }?;
        check_out(event_out)?;
        let Some(event) = handle.events.pop_front() else {
            return Ok(rkc_result::RKC_DONE);
        };
        // SAFETY: checked above.
        unsafe { write_out(event_out, event) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Copies the traffic key (TEK) of Data SA `spi` (the one in force or the one before it) into
/// `key_out` (`key_out_len` >= `RKC_KEY_LEN`); `RKC_NOT_FOUND` if the member holds no such key.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`key_out` for `key_out_len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_traffic_key(
    endpoint: *const rkc_member_endpoint,
    spi: u32,
    key_out: *mut u8,
    key_out_len: usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(endpoint, Kind::MemberEndpoint) }?;
        // SAFETY: the caller's contract.
        let out = unsafe { out_slice(key_out, key_out_len) }?;
        handle.keys.copy_key(spi, out)?;
        Ok(rkc_result::RKC_OK)
    })
}

/// Stops the member: it handles no more datagrams or timeouts (`RKC_STOPPED`) and sends
/// nothing more. Its keys stay readable until it is freed.
///
/// # Safety
///
/// `endpoint` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_stop(
    endpoint: *mut rkc_member_endpoint,
    now_us: u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::MemberEndpoint) }?;
        if handle.stopped {
            return Err(rkc_result::RKC_STOPPED);
        }
        let now = handle.clock.at(now_us);
        handle
            .endpoint
            .handle_command(now, rekeycast_proto::endpoint::member::MemberCommand::Stop);
        handle.pump(now);
        handle.stopped = true;
        Ok(rkc_result::RKC_OK)
    })
}

/// Copies a resync answer's manifest and chunk into the caller's buffers, both or neither.
pub(crate) fn copy_resync_answer(
    answer: ResyncAnswer,
    manifest_out: &mut [u8],
    chunk_out: &mut [u8],
) -> Result<(usize, usize), rkc_result> {
    let (manifest, chunk) = match answer {
        ResyncAnswer::Item { manifest, chunk } => (manifest, chunk),
        ResyncAnswer::BeyondHistory => return Err(rkc_result::RKC_BEYOND_HISTORY),
        _ => return Err(rkc_result::RKC_NOT_FOUND),
    };
    if manifest_out.len() < manifest.len() || chunk_out.len() < chunk.len() {
        return Err(rkc_result::RKC_BUFFER_TOO_SHORT);
    }
    manifest_out[..manifest.len()].copy_from_slice(&manifest);
    chunk_out[..chunk.len()].copy_from_slice(&chunk);
    Ok((manifest.len(), chunk.len()))
}

/// Copies what a member whose leaf has order key `order_key` (`*_order_key`) needs of message
/// `seq` to resync: its signed manifest into `manifest_out` and the member's chunk into
/// `chunk_out` (each at most `RKC_DATAGRAM_SIZE` bytes), their lengths to `*manifest_written` and
/// `*chunk_written`. `RKC_BEYOND_HISTORY`: the message left the history, the member must
/// register again; `RKC_NOT_FOUND`: not sent yet, or no chunk serves that leaf.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (each buffer for its length).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_endpoint_resync_item(
    endpoint: *const rkc_gcks_endpoint,
    seq: u64,
    order_key: u32,
    manifest_out: *mut u8,
    manifest_len: usize,
    chunk_out: *mut u8,
    chunk_len: usize,
    manifest_written: *mut usize,
    chunk_written: *mut usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(endpoint, Kind::GcksEndpoint) }?;
        // SAFETY: the caller's contract.
        let manifest_out = unsafe { out_slice(manifest_out, manifest_len) }?;
        // SAFETY: the caller's contract.
        let chunk_out = unsafe { out_slice(chunk_out, chunk_len) }?;
        check_out(manifest_written)?;
        check_out(chunk_written)?;
        let answer = handle.endpoint.resync_item(seq, order_key);
        let (manifest, chunk) = copy_resync_answer(answer, manifest_out, chunk_out)?;
        // SAFETY: checked above.
        unsafe {
            write_out(manifest_written, manifest);
            write_out(chunk_written, chunk);
        }
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the order key of the member's leaf (what it asks a resync endpoint for its chunk
/// with) to `*order_key_out`.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_order_key(
    endpoint: *const rkc_member_endpoint,
    order_key_out: *mut u32,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(endpoint, Kind::MemberEndpoint) }?;
        check_out(order_key_out)?;
        // SAFETY: checked above.
        unsafe { write_out(order_key_out, handle.endpoint.session().order_key()) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the next message the member needs (where a resync starts) to `*seq_out`.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_next_seq(
    endpoint: *const rkc_member_endpoint,
    seq_out: *mut u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(endpoint, Kind::MemberEndpoint) }?;
        check_out(seq_out)?;
        let next = handle
            .endpoint
            .session()
            .keys()
            .last_seq()
            .saturating_add(1);
        // SAFETY: checked above.
        unsafe { write_out(seq_out, next) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Applies one resync item the product fetched (from `rkc_gcks_endpoint_resync_item` or
/// `rkc_gcks_resync_item`, over its own channel): the signed manifest and the member's chunk
/// of the next message it needs, verified as if they had come by multicast. Writes the
/// message applied to `*applied_seq_out`; `RKC_REFUSED` if the item is not that message's or
/// fails verification. Its events (`RKC_MEMBER_KEY_INSTALLED`) follow as usual.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (each buffer for its length).
#[no_mangle]
pub unsafe extern "C" fn rkc_member_endpoint_resync(
    endpoint: *mut rkc_member_endpoint,
    now_us: u64,
    manifest: *const u8,
    manifest_len: usize,
    chunk: *const u8,
    chunk_len: usize,
    applied_seq_out: *mut u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(endpoint, Kind::MemberEndpoint) }?;
        // SAFETY: the caller's contract.
        let manifest = unsafe { in_slice(manifest, manifest_len) }?;
        // SAFETY: the caller's contract.
        let chunk = unsafe { in_slice(chunk, chunk_len) }?;
        check_out(applied_seq_out)?;
        if handle.stopped {
            return Err(rkc_result::RKC_STOPPED);
        }
        let now = handle.clock.at(now_us);
        let items = [(manifest.to_vec(), chunk.to_vec())];
        let applied = handle.endpoint.apply_resync(now, &items);
        handle.pump(now);
        let seq = applied.map_err(|_| rkc_result::RKC_REFUSED)?;
        // SAFETY: checked above.
        unsafe { write_out(applied_seq_out, seq) };
        Ok(rkc_result::RKC_OK)
    })
}
