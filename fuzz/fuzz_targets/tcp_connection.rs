//! Fuzz target: the TCP resync endpoint must never panic, and whatever bytes arrive, in
//! whatever pieces, its output must be whole response frames (see `rekeycast_proto::fuzz_support`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rekeycast_proto::fuzz_support::tcp_connection(data);
});
