//! Fuzz target: the HTTP resync endpoint must never panic, and whatever bytes arrive, in
//! whatever pieces, its output must be whole HTTP/1.1 responses (see `rekeycast_proto::fuzz_support`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rekeycast_proto::fuzz_support::http_request(data);
});
