//! rekeycast-ffi: the C ABI of rekeycast, for GCKS products written in C or C++.
//!
//! Two ways in, as in the Rust API:
//!
//! - the sans-IO endpoints ([`endpoint`]): `rkc_gcks_endpoint` and `rkc_member_endpoint`. The
//!   product owns the sockets and the clock: it feeds datagrams and timeouts in
//!   (`*_handle_datagram`, `*_handle_timeout`) and polls datagrams to send, the next deadline
//!   and events out (`*_poll_transmit`, `*_timeout`, `*_poll_event`), in the manner of
//!   quiche's C API. Time is a count of microseconds of the product's monotonic clock.
//! - the threaded engines ([`engine`]): `rkc_gcks` and `rkc_member` run their own sockets and
//!   threads; a member reports key installs, expiring keys and loss of sync through callbacks
//!   that take a `void *userdata`.
//!
//! The conventions are rustls-ffi's:
//!
//! - every handle is opaque, created by a `*_new` or `*_start` function and freed by its
//!   `*_free`, which takes the address of the caller's pointer and sets it to `NULL`; a
//!   registry of live handles makes any call with a freed (or never issued) handle return
//!   [`rkc_result::RKC_INVALID_HANDLE`] instead of touching freed memory;
//! - every fallible function returns an [`rkc_result`]; [`rkc_result_name`] names it;
//! - calls that do not change a handle take it `const`; inputs come first and outputs last;
//!   every buffer is followed by its length; outputs are written only on success;
//! - every pointer is checked (`NULL` gives [`rkc_result::RKC_NULL_POINTER`]);
//! - a panic never unwinds into C: it is caught at the boundary and returned as
//!   [`rkc_result::RKC_PANIC`];
//! - key material reaches C only through calls that copy it into the caller's buffer
//!   (`rkc_member_endpoint_traffic_key`, `rkc_*_take_bundle`); every copy the library keeps
//!   is zeroized when dropped;
//! - after `*_stop`, calls that would change the handle return [`rkc_result::RKC_STOPPED`];
//! - a handle is used by one thread at a time (the caller serializes its calls, as with
//!   rustls-ffi's connections); handles may be moved between threads.
//!
//! The header `include/rekeycast.h` is generated from this crate by cbindgen
//! (`tests/header.rs` checks that the committed copy is current).
#![allow(non_camel_case_types)]
#![allow(clippy::upper_case_acronyms)]

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

pub mod endpoint;
pub mod engine;
mod keys;

/// The size of buffer `*_poll_transmit` needs at least: the largest datagram an endpoint
/// sends with this library's configuration.
pub const RKC_DATAGRAM_SIZE: usize = 1472;
const _: () = assert!(RKC_DATAGRAM_SIZE == rekeycast_proto::wire::DEFAULT_DATAGRAM_SIZE);

/// The length of a traffic key (TEK) and of an Ed25519 signing key, in bytes.
pub const RKC_KEY_LEN: usize = 32;

/// The length of an encoded registration bundle, in bytes, at most.
pub const RKC_MAX_BUNDLE_LEN: usize = 65536;
const _: () = assert!(RKC_MAX_BUNDLE_LEN == rekeycast_proto::lkh::bundle::MAX_ENCODED_LEN);

/// An IPv4 address in [`rkc_addr::family`].
pub const RKC_ADDR_V4: u8 = 4;

/// An IPv6 address in [`rkc_addr::family`].
pub const RKC_ADDR_V6: u8 = 6;

/// What a call did: [`rkc_result::RKC_OK`] on success; anything else says why nothing (no
/// output) was written.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rkc_result {
    /// Success.
    RKC_OK = 0,
    /// Nothing more to poll (no datagram, event or deadline): not an error.
    RKC_DONE = 1,
    /// A pointer argument was `NULL`.
    RKC_NULL_POINTER = 2,
    /// The handle was freed, or was never issued by this library.
    RKC_INVALID_HANDLE = 3,
    /// The output buffer is shorter than what it must hold.
    RKC_BUFFER_TOO_SHORT = 4,
    /// An argument is out of its range (an address family, a port, a key length).
    RKC_INVALID_ARGUMENT = 5,
    /// The configuration was refused.
    RKC_INVALID_CONFIG = 6,
    /// The bytes are not a registration bundle (or not one this configuration can use).
    RKC_INVALID_BUNDLE = 7,
    /// The handle was stopped: it takes no more commands.
    RKC_STOPPED = 8,
    /// No such member, bundle or key.
    RKC_NOT_FOUND = 9,
    /// The GCKS refused the join or leave (already a member, unknown member, cancelled).
    RKC_REFUSED = 10,
    /// The answer did not come in time.
    RKC_TIMEOUT = 11,
    /// A socket or thread could not be set up, or the engine's loop is gone.
    RKC_IO = 12,
    /// The GCKS cannot go on (a worker panicked, its storage failed) and has stopped.
    RKC_POISONED = 13,
    /// The library panicked; the handle may be unusable and should be freed.
    RKC_PANIC = 14,
    /// The message asked for left the GCKS's history: the member must register again.
    RKC_BEYOND_HISTORY = 15,
}

/// The name of a result code (`"RKC_OK"`, ...) as a static NUL-terminated string, or
/// `"RKC_UNKNOWN"` for a value that is no [`rkc_result`]. It takes an `int` so that any value
/// may be passed.
#[no_mangle]
pub extern "C" fn rkc_result_name(result: c_int) -> *const c_char {
    let name: &'static [u8] = match result {
        0 => b"RKC_OK\0",
        1 => b"RKC_DONE\0",
        2 => b"RKC_NULL_POINTER\0",
        3 => b"RKC_INVALID_HANDLE\0",
        4 => b"RKC_BUFFER_TOO_SHORT\0",
        5 => b"RKC_INVALID_ARGUMENT\0",
        6 => b"RKC_INVALID_CONFIG\0",
        7 => b"RKC_INVALID_BUNDLE\0",
        8 => b"RKC_STOPPED\0",
        9 => b"RKC_NOT_FOUND\0",
        10 => b"RKC_REFUSED\0",
        11 => b"RKC_TIMEOUT\0",
        12 => b"RKC_IO\0",
        13 => b"RKC_POISONED\0",
        14 => b"RKC_PANIC\0",
        15 => b"RKC_BEYOND_HISTORY\0",
        _ => b"RKC_UNKNOWN\0",
    };
    name.as_ptr().cast()
}

/// A socket address: `family` is [`RKC_ADDR_V4`] (the first 4 bytes of `ip` are the address)
/// or [`RKC_ADDR_V6`]; `port` is in host byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct rkc_addr {
    /// [`RKC_ADDR_V4`] or [`RKC_ADDR_V6`].
    pub family: u8,
    /// The port, host byte order.
    pub port: u16,
    /// The address bytes, network order (IPv4: the first 4).
    pub ip: [u8; 16],
}

impl rkc_addr {
    fn to_socket_addr(self) -> Result<SocketAddr, rkc_result> {
        let ip = match self.family {
            RKC_ADDR_V4 => IpAddr::V4(Ipv4Addr::new(
                self.ip[0], self.ip[1], self.ip[2], self.ip[3],
            )),
            RKC_ADDR_V6 => IpAddr::V6(Ipv6Addr::from(self.ip)),
            _ => return Err(rkc_result::RKC_INVALID_ARGUMENT),
        };
        Ok(SocketAddr::new(ip, self.port))
    }

    fn from_socket_addr(addr: SocketAddr) -> Self {
        let mut ip = [0u8; 16];
        let family = match addr.ip() {
            IpAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.octets());
                RKC_ADDR_V4
            }
            IpAddr::V6(v6) => {
                ip = v6.octets();
                RKC_ADDR_V6
            }
        };
        Self {
            family,
            port: addr.port(),
            ip,
        }
    }
}

/// Fills `key_out` (`key_out_len` >= [`RKC_KEY_LEN`]) with a fresh Ed25519 signing key from the
/// operating system's RNG: what `rkc_gcks_endpoint_new` and `rkc_gcks_start` sign with. The
/// caller keeps it secret and wipes it when done.
///
/// # Safety
///
/// `key_out` is `NULL` or points to `key_out_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn rkc_signing_key_generate(
    key_out: *mut u8,
    key_out_len: usize,
) -> rkc_result {
    boundary(|| {
        // SAFETY: the caller's contract on `key_out`.
        let out = unsafe { out_slice(key_out, key_out_len) }?;
        if out.len() < RKC_KEY_LEN {
            return Err(rkc_result::RKC_BUFFER_TOO_SHORT);
        }
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        out[..RKC_KEY_LEN].copy_from_slice(key.as_bytes());
        Ok(rkc_result::RKC_OK)
    })
}

/// Runs `body` with panics caught: a panic becomes [`rkc_result::RKC_PANIC`].
fn boundary(body: impl FnOnce() -> Result<rkc_result, rkc_result>) -> rkc_result {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(result) | Err(result)) => result,
        Err(_) => rkc_result::RKC_PANIC,
    }
}

/// The kinds of handle the registry tells apart, so a handle of one kind passed as another
/// is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    GcksEndpoint,
    MemberEndpoint,
    Gcks,
    Member,
}

/// The handles issued and not yet freed, by address and kind.
static LIVE: Mutex<BTreeSet<(usize, Kind)>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<(usize, Kind)>> {
    // The set holds plain integers: a panic while it was locked left it consistent.
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Boxes `value`, registers it as a live handle of `kind` and returns its pointer.
fn issue<T>(value: T, kind: Kind) -> *mut T {
    let pointer = Box::into_raw(Box::new(value));
    live().insert((pointer as usize, kind));
    pointer
}

/// Checks that `pointer` is a live handle of `kind`.
fn check_live<T>(pointer: *const T, kind: Kind) -> Result<(), rkc_result> {
    if pointer.is_null() {
        return Err(rkc_result::RKC_NULL_POINTER);
    }
    if live().contains(&(pointer as usize, kind)) {
        Ok(())
    } else {
        Err(rkc_result::RKC_INVALID_HANDLE)
    }
}

/// The handle `pointer` as a shared reference, once checked.
///
/// # Safety
///
/// A live handle of `kind` is a `Box<T>` this library issued and has not freed.
unsafe fn handle_ref<'a, T>(pointer: *const T, kind: Kind) -> Result<&'a T, rkc_result> {
    check_live(pointer, kind)?;
    // SAFETY: live handles point to boxed values this library owns (see above).
    Ok(unsafe { &*pointer })
}

/// The handle `pointer` as an exclusive reference, once checked.
///
/// # Safety
///
/// As [`handle_ref`]; the caller does not use the handle from another thread meanwhile.
unsafe fn handle_mut<'a, T>(pointer: *mut T, kind: Kind) -> Result<&'a mut T, rkc_result> {
    check_live(pointer, kind)?;
    // SAFETY: live handles point to boxed values this library owns (see above).
    Ok(unsafe { &mut *pointer })
}

/// Takes the handle at `*slot` out of the registry and sets `*slot` to `NULL`: the box to
/// drop, or `None` if `slot` or `*slot` is `NULL` or the handle is not live (already freed).
///
/// # Safety
///
/// `slot` is `NULL` or points to a readable and writable pointer.
unsafe fn retire<T>(slot: *mut *mut T, kind: Kind) -> Option<Box<T>> {
    if slot.is_null() {
        return None;
    }
    // SAFETY: the caller's contract on `slot`.
    let pointer = unsafe { *slot };
    // SAFETY: as above.
    unsafe { *slot = std::ptr::null_mut() };
    if pointer.is_null() || !live().remove(&(pointer as usize, kind)) {
        return None;
    }
    // SAFETY: it was live, so it is a box this library issued, now removed from the registry.
    Some(unsafe { Box::from_raw(pointer) })
}

/// A readable input buffer.
///
/// # Safety
///
/// `pointer` is `NULL` or points to `len` readable bytes.
unsafe fn in_slice<'a>(pointer: *const u8, len: usize) -> Result<&'a [u8], rkc_result> {
    if pointer.is_null() {
        return Err(rkc_result::RKC_NULL_POINTER);
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(pointer, len) })
}

/// A writable output buffer.
///
/// # Safety
///
/// `pointer` is `NULL` or points to `len` writable bytes.
unsafe fn out_slice<'a>(pointer: *mut u8, len: usize) -> Result<&'a mut [u8], rkc_result> {
    if pointer.is_null() {
        return Err(rkc_result::RKC_NULL_POINTER);
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(pointer, len) })
}

/// A readable input value.
///
/// # Safety
///
/// `pointer` is `NULL` or points to a valid `T`.
unsafe fn in_ref<'a, T>(pointer: *const T) -> Result<&'a T, rkc_result> {
    // SAFETY: the caller's contract.
    unsafe { pointer.as_ref() }.ok_or(rkc_result::RKC_NULL_POINTER)
}

/// Checks that an output pointer is not `NULL` (before any work, so that nothing is lost).
fn check_out<T>(pointer: *mut T) -> Result<(), rkc_result> {
    if pointer.is_null() {
        Err(rkc_result::RKC_NULL_POINTER)
    } else {
        Ok(())
    }
}

/// Writes an output value, once everything succeeded.
///
/// # Safety
///
/// `pointer` was checked with [`check_out`] and points to writable memory for a `T`.
unsafe fn write_out<T>(pointer: *mut T, value: T) {
    // SAFETY: the caller's contract; `write` does not drop the old (possibly uninitialized)
    // value.
    unsafe { pointer.write(value) }
}

/// The product's monotonic clock, in microseconds, mapped onto [`Instant`]s: the instant a
/// handle was made is the microsecond count it was made with, and time never goes back.
#[derive(Debug, Clone, Copy)]
struct Clock {
    origin: Instant,
    origin_us: u64,
    latest: Instant,
}

/// The furthest a time may lie past a handle's creation (a bound, so that instants do not
/// overflow): a century.
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Clock {
    fn new(now_us: u64) -> Self {
        let origin = Instant::now();
        Self {
            origin,
            origin_us: now_us,
            latest: origin,
        }
    }

    /// The instant of `now_us`, no earlier than any instant given before.
    fn at(&mut self, now_us: u64) -> Instant {
        let span = Duration::from_micros(now_us.saturating_sub(self.origin_us)).min(MAX_SPAN);
        let instant = self.origin + span;
        if instant > self.latest {
            self.latest = instant;
        }
        self.latest
    }

    /// The microsecond count of `instant`.
    fn micros(&self, instant: Instant) -> u64 {
        let span = instant.saturating_duration_since(self.origin).as_micros();
        self.origin_us
            .saturating_add(u64::try_from(span).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_names_cover_every_code_and_unknown_values() {
        let name = |code: c_int| {
            // SAFETY: rkc_result_name returns static NUL-terminated strings.
            unsafe { std::ffi::CStr::from_ptr(rkc_result_name(code)) }
                .to_str()
                .map(str::to_owned)
        };
        assert_eq!(name(0).as_deref(), Ok("RKC_OK"));
        assert_eq!(
            name(rkc_result::RKC_PANIC as c_int).as_deref(),
            Ok("RKC_PANIC")
        );
        assert_eq!(name(-1).as_deref(), Ok("RKC_UNKNOWN"));
        for code in 0..=15 {
            assert_ne!(name(code).as_deref(), Ok("RKC_UNKNOWN"), "code {code}");
        }
    }

    #[test]
    fn clock_maps_microseconds_and_never_goes_back() {
        let mut clock = Clock::new(1_000_000);
        let start = clock.at(1_000_000);
        let later = clock.at(1_500_000);
        assert_eq!(later - start, Duration::from_millis(500));
        assert_eq!(clock.micros(later), 1_500_000);
        assert_eq!(clock.at(1_200_000), later, "time does not go back");
        assert_eq!(clock.at(0), later);
    }

    #[test]
    fn addresses_round_trip_and_bad_families_are_refused() {
        let v4: SocketAddr = "239.1.2.3:7400".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(rkc_addr::from_socket_addr(v4).to_socket_addr(), Ok(v4));
        let v6: SocketAddr = "[ff15::1]:9".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(rkc_addr::from_socket_addr(v6).to_socket_addr(), Ok(v6));
        let bad = rkc_addr {
            family: 5,
            port: 1,
            ip: [0; 16],
        };
        assert_eq!(bad.to_socket_addr(), Err(rkc_result::RKC_INVALID_ARGUMENT));
    }

    #[test]
    fn panics_are_caught_at_the_boundary() {
        let result = boundary(|| panic!("inside the library"));
        assert_eq!(result, rkc_result::RKC_PANIC);
    }
}
