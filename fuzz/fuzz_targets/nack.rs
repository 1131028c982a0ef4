//! Fuzz target: the `nack` parser must return a value or a typed error, and a value must emit
//! back to its input (see `rekeycast_proto::fuzz_support`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rekeycast_proto::fuzz_support::nack(data);
});
