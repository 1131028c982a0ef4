//! The threaded engines over the C ABI: `rkc_gcks` (a GCKS with its own sockets, loop and
//! workers) and `rkc_member` (a member with its own sockets and loop, reporting through
//! callbacks).
//!
//! A member's callbacks run on a thread of the library, one at a time, never after
//! `rkc_member_stop` (or `rkc_member_free`) has returned; `userdata` is handed back as given,
//! so what it points to must be safe to use from that thread.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rekeycast::engine::gcks::Gcks;
use rekeycast::engine::member::{Member, MemberConfig};
use rekeycast::gcks::GcksConfig;
use rekeycast::lkh::{MemberId, RegistrationBundle};
use rekeycast::session::ReceiverEvent;
use rekeycast::GcksError;
use zeroize::Zeroizing;

use crate::endpoint::{
    copy_resync_answer, gcks_event, member_event, rkc_gcks_config, rkc_gcks_event,
    rkc_member_config, rkc_member_event_kind, take_bundle,
};
use crate::keys::KeyStore;
use crate::{
    boundary, check_out, handle_mut, handle_ref, in_ref, in_slice, issue, out_slice, retire,
    rkc_addr, rkc_result, write_out, Kind, RKC_KEY_LEN,
};

/// A GCKS engine. Opaque; made by `rkc_gcks_start`, freed by `rkc_gcks_free`.
pub struct rkc_gcks {
    /// `None` once stopped.
    gcks: Option<Gcks>,
    local_addr: rkc_addr,
    bundles: HashMap<u64, Zeroizing<Vec<u8>>>,
}

impl rkc_gcks {
    fn running(&self) -> Result<&Gcks, rkc_result> {
        self.gcks.as_ref().ok_or(rkc_result::RKC_STOPPED)
    }
}

fn gcks_error(error: &GcksError) -> rkc_result {
    match error {
        GcksError::Poisoned(_) => rkc_result::RKC_POISONED,
        GcksError::Leave(_) => rkc_result::RKC_REFUSED,
        GcksError::Setup(_) => rkc_result::RKC_INVALID_CONFIG,
        _ => rkc_result::RKC_IO,
    }
}

/// Starts a GCKS engine with `config` on the multicast group `group`, signing with the
/// 32-byte Ed25519 key `signing_key`; writes it to `*gcks_out`. With `loopback` non-zero it
/// sends on the loopback interface with multicast loopback on and takes feedback on
/// 127.0.0.1 (tests and demos on one host); otherwise on the system's default interface.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`signing_key` for `signing_key_len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_start(
    config: *const rkc_gcks_config,
    group: *const rkc_addr,
    loopback: u8,
    signing_key: *const u8,
    signing_key_len: usize,
    gcks_out: *mut *mut rkc_gcks,
) -> rkc_result {
    boundary(|| {
        // SAFETY: the caller's contract on each pointer.
        let config = unsafe { in_ref(config) }?;
        // SAFETY: as above.
        let group = unsafe { in_ref(group) }?.to_socket_addr()?;
        // SAFETY: as above.
        let key = unsafe { in_slice(signing_key, signing_key_len) }?;
        check_out(gcks_out)?;
        config.check()?;
        let key: &[u8; RKC_KEY_LEN] = key
            .try_into()
            .map_err(|_| rkc_result::RKC_INVALID_ARGUMENT)?;
        let mut engine_config = if loopback != 0 {
            GcksConfig::loopback(group)
        } else {
            GcksConfig::new(rekeycast::io::socket::MulticastConfig::new(group))
        };
        engine_config.group_id = config.group_id;
        engine_config.spi = config.spi;
        engine_config.batch_interval = Duration::from_millis(u64::from(config.batch_interval_ms));
        engine_config.admission_delay = Duration::from_millis(u64::from(config.admission_delay_ms));
        engine_config.data_sa_lifetime_secs = config.data_sa_lifetime_secs;
        engine_config.key_seed = (config.key_seed != 0).then_some(config.key_seed);
        engine_config
            .validate()
            .map_err(|_| rkc_result::RKC_INVALID_CONFIG)?;
        let gcks = Gcks::start(engine_config, ed25519_dalek::SigningKey::from_bytes(key))
            .map_err(|e| gcks_error(&e))?;
        let handle = rkc_gcks {
            local_addr: rkc_addr::from_socket_addr(gcks.local_addr()),
            gcks: Some(gcks),
            bundles: HashMap::new(),
        };
        // SAFETY: checked above.
        unsafe { write_out(gcks_out, issue(handle, Kind::Gcks)) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the GCKS's unicast address (where members send feedback: their
/// `rkc_member_config.feedback`) to `*addr_out`.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_local_addr(
    gcks: *const rkc_gcks,
    addr_out: *mut rkc_addr,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(gcks, Kind::Gcks) }?;
        check_out(addr_out)?;
        // SAFETY: checked above.
        unsafe { write_out(addr_out, handle.local_addr) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Admits `member` in the next batch and waits up to `timeout_ms` for the batch to be built:
/// then its registration bundle waits for `rkc_gcks_take_bundle`. `RKC_REFUSED`: the GCKS
/// refused the join (already a member or joining, cancelled, stopped); `RKC_TIMEOUT`: no
/// answer in time (the join stands; its bundle is not kept).
///
/// # Safety
///
/// `gcks` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_join(
    gcks: *mut rkc_gcks,
    member: u64,
    timeout_ms: u32,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(gcks, Kind::Gcks) }?;
        let answer = handle
            .running()?
            .join(MemberId(member))
            .map_err(|e| gcks_error(&e))?;
        let bundle = match answer.recv_timeout(Duration::from_millis(u64::from(timeout_ms))) {
            Ok(Ok(bundle)) => bundle,
            Ok(Err(_)) => return Err(rkc_result::RKC_REFUSED),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                return Err(rkc_result::RKC_TIMEOUT)
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(rkc_result::RKC_IO)
            }
        };
        let encoded = bundle
            .encode()
            .map_err(|_| rkc_result::RKC_INVALID_BUNDLE)?;
        handle.bundles.insert(member, encoded);
        Ok(rkc_result::RKC_OK)
    })
}

/// Copies `member`'s registration bundle into `buf` and its length to `*written_out`, then
/// zeroizes the library's copy. On `RKC_BUFFER_TOO_SHORT` the bundle stays.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`buf` for `len` bytes).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_take_bundle(
    gcks: *mut rkc_gcks,
    member: u64,
    buf: *mut u8,
    len: usize,
    written_out: *mut usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(gcks, Kind::Gcks) }?;
        // SAFETY: the caller's contract.
        let buf = unsafe { out_slice(buf, len) }?;
        check_out(written_out)?;
        let written = take_bundle(&mut handle.bundles, member, buf)?;
        // SAFETY: checked above.
        unsafe { write_out(written_out, written) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Removes `member` in the next batch (or cancels its pending join); returns once the leave
/// is accepted. `RKC_REFUSED`: not a member.
///
/// # Safety
///
/// `gcks` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_leave(gcks: *mut rkc_gcks, member: u64) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(gcks, Kind::Gcks) }?;
        handle
            .running()?
            .leave(MemberId(member))
            .map_err(|e| gcks_error(&e))?;
        Ok(rkc_result::RKC_OK)
    })
}

/// Applies the pending changes now (or refreshes the group key if there are none).
///
/// # Safety
///
/// `gcks` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_rekey_now(gcks: *mut rkc_gcks) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(gcks, Kind::Gcks) }?;
        handle.running()?.rekey_now().map_err(|e| gcks_error(&e))?;
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the GCKS's next event to `*event_out`; `RKC_DONE` when none waits. Joins and leaves
/// are answered by their calls, not here.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_poll_event(
    gcks: *mut rkc_gcks,
    event_out: *mut rkc_gcks_event,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(gcks, Kind::Gcks) }?;
        check_out(event_out)?;
        let gcks = handle.gcks.as_ref().ok_or(rkc_result::RKC_STOPPED)?;
        loop {
            let Ok(event) = gcks.events().try_recv() else {
                return Ok(rkc_result::RKC_DONE);
            };
            let mut no_bundles = HashMap::new();
            if let Some(event) = gcks_event(event, |ticket| match ticket {}, &mut no_bundles) {
                // SAFETY: checked above.
                unsafe { write_out(event_out, event) };
                return Ok(rkc_result::RKC_OK);
            }
        }
    })
}

/// Stops the engine: waiting joins are refused, what is queued goes out, its threads are
/// joined. Every later call but `rkc_gcks_take_bundle`, `rkc_gcks_local_addr` and
/// `rkc_gcks_free` returns `RKC_STOPPED`.
///
/// # Safety
///
/// `gcks` is `NULL` or a pointer this library issued.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_stop(gcks: *mut rkc_gcks) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(gcks, Kind::Gcks) }?;
        let gcks = handle.gcks.take().ok_or(rkc_result::RKC_STOPPED)?;
        gcks.shutdown().map_err(|e| gcks_error(&e))?;
        Ok(rkc_result::RKC_OK)
    })
}

/// Frees the GCKS at `*gcks` (stopping it first if it runs) and sets `*gcks` to `NULL`. Does
/// nothing if `gcks` or `*gcks` is `NULL` or the handle was freed already.
///
/// # Safety
///
/// `gcks` is `NULL` or points to a readable and writable pointer.
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_free(gcks: *mut *mut rkc_gcks) {
    let _ = boundary(|| {
        // SAFETY: the caller's contract.
        if let Some(mut handle) = unsafe { retire(gcks, Kind::Gcks) } {
            if let Some(gcks) = handle.gcks.take() {
                let _ = gcks.shutdown();
            }
        }
        Ok(rkc_result::RKC_OK)
    });
}

/// A member's callbacks; each may be `NULL` (not called). They run on a library thread.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rkc_member_callbacks {
    /// Message `seq` installed the traffic key of Data SA `spi`, valid `lifetime_secs`
    /// seconds: copy it with `rkc_member_traffic_key` (from this callback too).
    pub key_installed:
        Option<unsafe extern "C" fn(userdata: *mut c_void, seq: u64, spi: u32, lifetime_secs: u32)>,
    /// The traffic key of Data SA `spi` expires in `seconds_left` seconds
    /// (`rkc_member_config.expiry_warning_secs` before its end).
    pub key_expiring:
        Option<unsafe extern "C" fn(userdata: *mut c_void, spi: u32, seconds_left: u32)>,
    /// The member fell out of sync from message `from_seq` on (or must register again:
    /// `from_seq` is then 0): it needs a resync or a new registration.
    pub out_of_sync: Option<unsafe extern "C" fn(userdata: *mut c_void, from_seq: u64)>,
    /// Handed to every callback as given.
    pub userdata: *mut c_void,
}

/// The callbacks, moved to the dispatch thread.
struct Callbacks(rkc_member_callbacks);

// SAFETY: the C caller is told (module docs, header) that its callbacks and `userdata` are
// used from a library thread; the library only passes `userdata` back.
unsafe impl Send for Callbacks {}

/// A member engine. Opaque; made by `rkc_member_start`, freed by `rkc_member_free`.
pub struct rkc_member {
    /// `None` once stopped.
    running: Option<Running>,
    keys: Arc<Mutex<KeyStore>>,
    order_key: u32,
}

struct Running {
    member: Member,
    stop: Arc<AtomicBool>,
    dispatch: JoinHandle<()>,
}

impl Running {
    fn stop(self) -> Result<(), rkc_result> {
        let result = self.member.shutdown().map_err(|_| rkc_result::RKC_IO);
        self.stop.store(true, Ordering::Release);
        // The dispatch thread catches its own panics; a join error cannot carry one.
        let _ = self.dispatch.join();
        result
    }
}

/// The longest the dispatch thread sleeps before looking at its stop flag.
const DISPATCH_TICK: Duration = Duration::from_millis(50);

fn dispatch(
    events: Receiver<ReceiverEvent>,
    keys: Arc<Mutex<KeyStore>>,
    callbacks: Callbacks,
    stop: Arc<AtomicBool>,
) {
    let callbacks = callbacks.0;
    let userdata = callbacks.userdata;
    let lock = |keys: &Mutex<KeyStore>| {
        // The store is consistent between calls: a panic inside one left nothing half-done
        // that a reader could see as a key.
        keys.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deadline()
    };
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let wait = lock(&keys).map_or(DISPATCH_TICK, |deadline| {
            deadline.saturating_duration_since(now).min(DISPATCH_TICK)
        });
        let received = events.recv_timeout(wait);
        let now = Instant::now();
        let event = match received {
            Ok(event) => {
                let mut store = keys.lock().unwrap_or_else(PoisonError::into_inner);
                member_event(event, now, &mut store)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Some(event) = event {
            match event.kind {
                rkc_member_event_kind::RKC_MEMBER_KEY_INSTALLED => {
                    if let Some(callback) = callbacks.key_installed {
                        // SAFETY: a function pointer the caller supplied for this purpose.
                        unsafe { callback(userdata, event.seq, event.spi, event.secs) };
                    }
                }
                rkc_member_event_kind::RKC_MEMBER_OUT_OF_SYNC
                | rkc_member_event_kind::RKC_MEMBER_MUST_REREGISTER => {
                    if let Some(callback) = callbacks.out_of_sync {
                        // SAFETY: as above.
                        unsafe { callback(userdata, event.seq) };
                    }
                }
                _ => {}
            }
        }
        loop {
            let expiring = keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .poll_expiring(Instant::now());
            let Some(expiring) = expiring else { break };
            if let Some(callback) = callbacks.key_expiring {
                // SAFETY: as above.
                unsafe { callback(userdata, expiring.spi, expiring.seconds_left) };
            }
        }
    }
}

/// Starts a member engine that registered with the `bundle_len` bytes of `bundle`, with
/// `config` and `callbacks` (copied; `NULL` entries are not called); writes it to
/// `*member_out`. With `loopback` non-zero it listens on the loopback interface and sends
/// from 127.0.0.1; otherwise on the system's default interface.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (`bundle` for `bundle_len` bytes); the
/// callbacks may be called from a library thread with `callbacks->userdata` until
/// `rkc_member_stop` or `rkc_member_free` returns.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_start(
    bundle: *const u8,
    bundle_len: usize,
    config: *const rkc_member_config,
    loopback: u8,
    callbacks: *const rkc_member_callbacks,
    member_out: *mut *mut rkc_member,
) -> rkc_result {
    boundary(|| {
        // SAFETY: the caller's contract on each pointer.
        let bundle = unsafe { in_slice(bundle, bundle_len) }?;
        // SAFETY: as above.
        let config = unsafe { in_ref(config) }?;
        // SAFETY: as above.
        let callbacks = *unsafe { in_ref(callbacks) }?;
        check_out(member_out)?;
        let bundle =
            RegistrationBundle::decode(bundle).map_err(|_| rkc_result::RKC_INVALID_BUNDLE)?;
        if bundle.leaf > bundle.rekey_sa.degree.max_node() {
            return Err(rkc_result::RKC_INVALID_BUNDLE);
        }
        let order_key = bundle.rekey_sa.degree.order_key(bundle.leaf);
        let group = config.group.to_socket_addr()?;
        let feedback = config.feedback.to_socket_addr()?;
        let mut engine_config = if loopback != 0 {
            MemberConfig::loopback(group, feedback)
        } else {
            MemberConfig::new(group, feedback)
        };
        engine_config.seed = (config.seed != 0).then_some(config.seed);
        engine_config
            .validate()
            .map_err(|_| rkc_result::RKC_INVALID_CONFIG)?;
        let member = Member::start(&bundle, engine_config).map_err(|error| match error {
            rekeycast::MemberError::Config(_) | rekeycast::MemberError::GroupMismatch { .. } => {
                rkc_result::RKC_INVALID_BUNDLE
            }
            _ => rkc_result::RKC_IO,
        })?;
        let keys = Arc::new(Mutex::new(KeyStore::new(Duration::from_secs(u64::from(
            config.expiry_warning_secs,
        )))));
        let stop = Arc::new(AtomicBool::new(false));
        let dispatch = {
            let events = member.events().clone();
            let keys = Arc::clone(&keys);
            let stop = Arc::clone(&stop);
            let callbacks = Callbacks(callbacks);
            std::thread::Builder::new()
                .name("rekeycast-ffi-callbacks".into())
                .spawn(move || dispatch(events, keys, callbacks, stop))
        };
        let dispatch = match dispatch {
            Ok(dispatch) => dispatch,
            Err(_) => {
                let _ = member.shutdown();
                return Err(rkc_result::RKC_IO);
            }
        };
        let handle = rkc_member {
            running: Some(Running {
                member,
                stop,
                dispatch,
            }),
            keys,
            order_key,
        };
        // SAFETY: checked above.
        unsafe { write_out(member_out, issue(handle, Kind::Member)) };
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
pub unsafe extern "C" fn rkc_member_traffic_key(
    member: *const rkc_member,
    spi: u32,
    key_out: *mut u8,
    key_out_len: usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(member, Kind::Member) }?;
        // SAFETY: the caller's contract.
        let out = unsafe { out_slice(key_out, key_out_len) }?;
        handle
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .copy_key(spi, out)?;
        Ok(rkc_result::RKC_OK)
    })
}

/// Stops the member: its loop and callback thread end (no callback runs after this returns).
/// A second stop returns `RKC_STOPPED`. Its keys stay readable until it is freed.
///
/// # Safety
///
/// `member` is `NULL` or a pointer this library issued; not called from one of its callbacks.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_stop(member: *mut rkc_member) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(member, Kind::Member) }?;
        let running = handle.running.take().ok_or(rkc_result::RKC_STOPPED)?;
        running.stop()?;
        Ok(rkc_result::RKC_OK)
    })
}

/// Frees the member at `*member` (stopping it first if it runs; its keys are zeroized) and
/// sets `*member` to `NULL`. Does nothing if `member` or `*member` is `NULL` or the handle was
/// freed already.
///
/// # Safety
///
/// `member` is `NULL` or points to a readable and writable pointer; not called from one of
/// the member's callbacks.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_free(member: *mut *mut rkc_member) {
    let _ = boundary(|| {
        // SAFETY: the caller's contract.
        if let Some(mut handle) = unsafe { retire(member, Kind::Member) } {
            if let Some(running) = handle.running.take() {
                let _ = running.stop();
            }
        }
        Ok(rkc_result::RKC_OK)
    });
}

/// Copies what the member whose leaf has order key `order_key` (`rkc_member_order_key`) needs
/// of message `seq` to resync, as `rkc_gcks_endpoint_resync_item` does.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (each buffer for its length).
#[no_mangle]
pub unsafe extern "C" fn rkc_gcks_resync_item(
    gcks: *const rkc_gcks,
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
        let handle = unsafe { handle_ref(gcks, Kind::Gcks) }?;
        // SAFETY: the caller's contract.
        let manifest_out = unsafe { out_slice(manifest_out, manifest_len) }?;
        // SAFETY: the caller's contract.
        let chunk_out = unsafe { out_slice(chunk_out, chunk_len) }?;
        check_out(manifest_written)?;
        check_out(chunk_written)?;
        let answer = handle
            .running()?
            .resync_item(seq, order_key)
            .map_err(|e| gcks_error(&e))?;
        let (manifest, chunk) = copy_resync_answer(answer, manifest_out, chunk_out)?;
        // SAFETY: checked above.
        unsafe {
            write_out(manifest_written, manifest);
            write_out(chunk_written, chunk);
        }
        Ok(rkc_result::RKC_OK)
    })
}

/// Writes the order key of the member's leaf (what it asks for its chunk with) to
/// `*order_key_out`.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type.
#[no_mangle]
pub unsafe extern "C" fn rkc_member_order_key(
    member: *const rkc_member,
    order_key_out: *mut u32,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_ref(member, Kind::Member) }?;
        check_out(order_key_out)?;
        // SAFETY: checked above.
        unsafe { write_out(order_key_out, handle.order_key) };
        Ok(rkc_result::RKC_OK)
    })
}

/// Applies one resync item the product fetched after an `out_of_sync` callback (the signed
/// manifest and the member's chunk of the next message it needs), verified as if it had come
/// by multicast; writes the message applied to `*applied_seq_out`. `RKC_REFUSED`: not that
/// message's item, or it fails verification.
///
/// # Safety
///
/// Every pointer is `NULL` or valid for its type (each buffer for its length).
#[no_mangle]
pub unsafe extern "C" fn rkc_member_resync(
    member: *mut rkc_member,
    manifest: *const u8,
    manifest_len: usize,
    chunk: *const u8,
    chunk_len: usize,
    applied_seq_out: *mut u64,
) -> rkc_result {
    boundary(|| {
        // SAFETY: checked against the registry of live handles.
        let handle = unsafe { handle_mut(member, Kind::Member) }?;
        // SAFETY: the caller's contract.
        let manifest = unsafe { in_slice(manifest, manifest_len) }?;
        // SAFETY: the caller's contract.
        let chunk = unsafe { in_slice(chunk, chunk_len) }?;
        check_out(applied_seq_out)?;
        let running = handle.running.as_ref().ok_or(rkc_result::RKC_STOPPED)?;
        let applied = running
            .member
            .resync(vec![(manifest.to_vec(), chunk.to_vec())])
            .map_err(|_| rkc_result::RKC_IO)?
            .map_err(|_| rkc_result::RKC_REFUSED)?;
        // SAFETY: checked above.
        unsafe { write_out(applied_seq_out, applied) };
        Ok(rkc_result::RKC_OK)
    })
}
