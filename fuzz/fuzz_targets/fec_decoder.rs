//! Fuzz target: object transmission information parsing and the FEC decoder fed arbitrary or
//! genuine symbols must never panic and must decode exactly what was encoded (see
//! `rekeycast_fec::fuzz_support::decoder`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rekeycast_fec::fuzz_support::decoder(data);
});
