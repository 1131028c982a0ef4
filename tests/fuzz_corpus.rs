//! Replays every file of `fuzz/corpus/<target>/` through the property check of its fuzz target,
//! so every input a fuzzer ever found (saved there as a regression) is checked by `cargo test`
//! on the stable toolchain.

use std::path::Path;

use rekeycast::fuzz_support::TARGETS;

#[test]
fn fuzz_corpus_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in TARGETS {
        let dir = root.join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("corpus folder {} missing: {error}", dir.display()));
        let mut replayed = 0usize;
        for entry in entries {
            let path = entry.expect("readable corpus entry").path();
            if !path.is_file() {
                continue;
            }
            let data = std::fs::read(&path).expect("readable corpus file");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "corpus file {} fails target {target}",
                path.display()
            );
            replayed += 1;
        }
        assert!(replayed > 0, "no corpus files for target {target}");
    }
}
