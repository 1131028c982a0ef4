//! The sans-IO endpoints through the C ABI, in virtual time and without a network: a member
//! that heard none of the GCKS's datagrams catches up by resync items the product carries
//! from `rkc_gcks_endpoint_resync_item` to `rkc_member_endpoint_resync`, in order, and
//! installs the same traffic key as a member that did hear them.

use std::ptr;

use rekeycast_ffi::endpoint::*;
use rekeycast_ffi::{
    rkc_addr, rkc_result, rkc_signing_key_generate, RKC_ADDR_V4, RKC_DATAGRAM_SIZE, RKC_KEY_LEN,
    RKC_MAX_BUNDLE_LEN,
};

const START_US: u64 = 5_000_000;

fn addr(ip: [u8; 4], port: u16) -> rkc_addr {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&ip);
    rkc_addr {
        family: RKC_ADDR_V4,
        port,
        ip: bytes,
    }
}

/// A GCKS endpoint in virtual time.
struct Gcks {
    endpoint: *mut rkc_gcks_endpoint,
    now_us: u64,
    /// The group's datagrams, in the order sent.
    sent: Vec<Vec<u8>>,
}

impl Gcks {
    fn new() -> Self {
        let mut key = [0u8; RKC_KEY_LEN];
        let mut config = std::mem::MaybeUninit::<rkc_gcks_config>::uninit();
        let mut endpoint = ptr::null_mut();
        // SAFETY: valid buffers and out-pointers of the right types.
        unsafe {
            assert_eq!(
                rkc_signing_key_generate(key.as_mut_ptr(), key.len()),
                rkc_result::RKC_OK
            );
            assert_eq!(
                rkc_gcks_config_default(config.as_mut_ptr()),
                rkc_result::RKC_OK
            );
            let mut config = config.assume_init();
            config.key_seed = 11;
            config.admission_delay_ms = 10;
            let result =
                rkc_gcks_endpoint_new(&config, key.as_ptr(), key.len(), START_US, &mut endpoint);
            assert_eq!(result, rkc_result::RKC_OK);
        }
        Self {
            endpoint,
            now_us: START_US,
            sent: Vec::new(),
        }
    }

    /// Drains datagrams and events, then steps to the next deadline, until `done` holds of an
    /// event (or 60 virtual seconds pass).
    fn run_until(&mut self, mut done: impl FnMut(&rkc_gcks_event) -> bool) {
        let end = self.now_us + 60_000_000;
        while self.now_us < end {
            let mut buf = vec![0u8; RKC_DATAGRAM_SIZE];
            let mut transmit = std::mem::MaybeUninit::<rkc_transmit>::uninit();
            let mut event = std::mem::MaybeUninit::<rkc_gcks_event>::uninit();
            // SAFETY: a live handle, buffers of their stated lengths, valid out-pointers.
            unsafe {
                while rkc_gcks_endpoint_poll_event(self.endpoint, event.as_mut_ptr())
                    == rkc_result::RKC_OK
                {
                    if done(&event.assume_init()) {
                        return;
                    }
                }
                while rkc_gcks_endpoint_poll_transmit(
                    self.endpoint,
                    self.now_us,
                    buf.as_mut_ptr(),
                    buf.len(),
                    transmit.as_mut_ptr(),
                ) == rkc_result::RKC_OK
                {
                    let transmit = transmit.assume_init();
                    if transmit.to_group == 1 {
                        self.sent.push(buf[..transmit.len].to_vec());
                    }
                }
                let mut deadline = 0u64;
                if rkc_gcks_endpoint_timeout(self.endpoint, &mut deadline) == rkc_result::RKC_OK {
                    self.now_us = self.now_us.max(deadline);
                } else {
                    self.now_us += 1_000;
                }
                let result = rkc_gcks_endpoint_handle_timeout(self.endpoint, self.now_us);
                assert_eq!(result, rkc_result::RKC_OK);
            }
        }
        panic!("no such event within 60 virtual seconds");
    }
}

impl Drop for Gcks {
    fn drop(&mut self) {
        // SAFETY: the handle this test owns.
        unsafe { rkc_gcks_endpoint_free(&mut self.endpoint) };
    }
}

/// A member endpoint made from `bundle`.
fn member(bundle: &[u8], now_us: u64) -> *mut rkc_member_endpoint {
    let config = rkc_member_config {
        group: addr([239, 255, 42, 10], 7400),
        feedback: addr([127, 0, 0, 1], 7401),
        seed: 5,
        expiry_warning_secs: 60,
    };
    let mut endpoint = ptr::null_mut();
    // SAFETY: valid buffers and out-pointers.
    let result = unsafe {
        rkc_member_endpoint_new(
            bundle.as_ptr(),
            bundle.len(),
            &config,
            now_us,
            &mut endpoint,
        )
    };
    assert_eq!(result, rkc_result::RKC_OK);
    endpoint
}

fn take_bundle(gcks: &Gcks, member: u64) -> Vec<u8> {
    let mut bundle = vec![0u8; RKC_MAX_BUNDLE_LEN];
    let mut len = 0usize;
    // SAFETY: a live handle, a buffer of its stated length.
    let result = unsafe {
        rkc_gcks_endpoint_take_bundle(
            gcks.endpoint,
            member,
            bundle.as_mut_ptr(),
            bundle.len(),
            &mut len,
        )
    };
    assert_eq!(result, rkc_result::RKC_OK);
    bundle.truncate(len);
    bundle
}

/// The SPIs of the keys the member reported installed.
fn installed(member: *mut rkc_member_endpoint) -> Vec<u32> {
    let mut spis = Vec::new();
    let mut event = std::mem::MaybeUninit::<rkc_member_event>::uninit();
    // SAFETY: a live handle, a valid out-pointer.
    unsafe {
        while rkc_member_endpoint_poll_event(member, event.as_mut_ptr()) == rkc_result::RKC_OK {
            let event = event.assume_init();
            if event.kind == rkc_member_event_kind::RKC_MEMBER_KEY_INSTALLED {
                spis.push(event.spi);
            }
        }
    }
    spis
}

fn traffic_key(
    member: *mut rkc_member_endpoint,
    spi: u32,
) -> Result<[u8; RKC_KEY_LEN], rkc_result> {
    let mut key = [0u8; RKC_KEY_LEN];
    // SAFETY: a live handle, a buffer of its stated length.
    match unsafe { rkc_member_endpoint_traffic_key(member, spi, key.as_mut_ptr(), key.len()) } {
        rkc_result::RKC_OK => Ok(key),
        error => Err(error),
    }
}

#[test]
fn a_member_that_heard_nothing_catches_up_by_resync_items() {
    let mut gcks = Gcks::new();
    // SAFETY: a live handle.
    unsafe {
        assert_eq!(
            rkc_gcks_endpoint_join(gcks.endpoint, 1, gcks.now_us),
            rkc_result::RKC_OK
        );
        assert_eq!(
            rkc_gcks_endpoint_join(gcks.endpoint, 2, gcks.now_us),
            rkc_result::RKC_OK
        );
        assert_eq!(
            rkc_gcks_endpoint_rekey_now(gcks.endpoint, gcks.now_us),
            rkc_result::RKC_OK
        );
    }
    gcks.run_until(|e| e.kind == rkc_gcks_event_kind::RKC_GCKS_SENT && e.seq == 1);
    let heard = member(&take_bundle(&gcks, 1), gcks.now_us);
    let deaf = member(&take_bundle(&gcks, 2), gcks.now_us);
    // SAFETY: a live handle.
    unsafe {
        assert_eq!(
            rkc_gcks_endpoint_rekey_now(gcks.endpoint, gcks.now_us),
            rkc_result::RKC_OK
        )
    };
    gcks.run_until(|e| e.kind == rkc_gcks_event_kind::RKC_GCKS_SENT && e.seq == 2);

    // Member 1 hears every datagram of the group.
    let from = addr([127, 0, 0, 1], 7401);
    for datagram in &gcks.sent {
        // SAFETY: live handle, buffers of their stated lengths.
        let result = unsafe {
            rkc_member_endpoint_handle_datagram(
                heard,
                gcks.now_us,
                rkc_port::RKC_PORT_LISTEN as u32,
                &from,
                datagram.as_ptr(),
                datagram.len(),
            )
        };
        assert_eq!(result, rkc_result::RKC_OK);
    }
    let heard_spis = installed(heard);
    assert_eq!(
        heard_spis.len(),
        2,
        "member 1 installed both messages' keys"
    );

    // Member 2 heard nothing: it resyncs from its next message on.
    let (mut order_key, mut next) = (0u32, 0u64);
    // SAFETY: live handle, valid out-pointers.
    unsafe {
        assert_eq!(
            rkc_member_endpoint_order_key(deaf, &mut order_key),
            rkc_result::RKC_OK
        );
        assert_eq!(
            rkc_member_endpoint_next_seq(deaf, &mut next),
            rkc_result::RKC_OK
        );
    }
    assert_eq!(next, 1);
    let item = |seq: u64| {
        let mut manifest = vec![0u8; RKC_DATAGRAM_SIZE];
        let mut chunk = vec![0u8; RKC_DATAGRAM_SIZE];
        let (mut manifest_len, mut chunk_len) = (0usize, 0usize);
        // SAFETY: live handle, buffers of their stated lengths, valid out-pointers.
        let result = unsafe {
            rkc_gcks_endpoint_resync_item(
                gcks.endpoint,
                seq,
                order_key,
                manifest.as_mut_ptr(),
                manifest.len(),
                chunk.as_mut_ptr(),
                chunk.len(),
                &mut manifest_len,
                &mut chunk_len,
            )
        };
        assert_eq!(result, rkc_result::RKC_OK, "item {seq}");
        manifest.truncate(manifest_len);
        chunk.truncate(chunk_len);
        (manifest, chunk)
    };
    let resync = |(manifest, chunk): &(Vec<u8>, Vec<u8>)| {
        let mut applied = u64::MAX;
        // SAFETY: live handle, buffers of their stated lengths, a valid out-pointer.
        let result = unsafe {
            rkc_member_endpoint_resync(
                deaf,
                START_US,
                manifest.as_ptr(),
                manifest.len(),
                chunk.as_ptr(),
                chunk.len(),
                &mut applied,
            )
        };
        (result, applied)
    };
    let (first, second) = (item(1), item(2));
    assert_eq!(
        resync(&second),
        (rkc_result::RKC_REFUSED, u64::MAX),
        "out of order: refused, nothing written"
    );
    assert_eq!(resync(&first), (rkc_result::RKC_OK, 1));
    assert_eq!(resync(&second), (rkc_result::RKC_OK, 2));
    assert_eq!(installed(deaf), heard_spis);
    let spi = heard_spis[1];
    assert_eq!(traffic_key(deaf, spi), traffic_key(heard, spi));
    assert!(traffic_key(deaf, spi).is_ok());

    // Nothing later was sent: the next message is not found; a short buffer is refused.
    let mut small = [0u8; 8];
    let mut big = vec![0u8; RKC_DATAGRAM_SIZE];
    let (mut a, mut b) = (0usize, 0usize);
    // SAFETY: live handle, buffers of their stated lengths, valid out-pointers.
    unsafe {
        let result = rkc_gcks_endpoint_resync_item(
            gcks.endpoint,
            3,
            order_key,
            big.as_mut_ptr(),
            big.len(),
            small.as_mut_ptr(),
            small.len(),
            &mut a,
            &mut b,
        );
        assert_eq!(result, rkc_result::RKC_NOT_FOUND);
        let result = rkc_gcks_endpoint_resync_item(
            gcks.endpoint,
            2,
            order_key,
            big.as_mut_ptr(),
            big.len(),
            small.as_mut_ptr(),
            small.len(),
            &mut a,
            &mut b,
        );
        assert_eq!(result, rkc_result::RKC_BUFFER_TOO_SHORT);
        assert_eq!((a, b), (0, 0), "nothing written on failure");
        let mut heard = heard;
        let mut deaf = deaf;
        rkc_member_endpoint_free(&mut heard);
        rkc_member_endpoint_free(&mut deaf);
    }
}
