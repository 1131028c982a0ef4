//! Replays every file of `fuzz/corpus/fec_decoder/` through the `fec_decoder` property check,
//! so every input a fuzzer found (saved there as a regression) is checked by `cargo test` on
//! the stable toolchain.

use std::path::Path;

use rekeycast_fec::fuzz_support;

#[test]
fn fec_decoder_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/fec_decoder");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("corpus folder {} missing: {error}", dir.display()));
    let mut replayed = 0usize;
    for entry in entries {
        let path = entry.expect("readable corpus entry").path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| fuzz_support::decoder(&data));
        assert!(outcome.is_ok(), "corpus file {} fails", path.display());
        replayed += 1;
    }
    assert!(
        replayed >= 8,
        "only {replayed} corpus files for fec_decoder"
    );
}
