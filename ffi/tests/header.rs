//! The committed header, include/rekeycast.h, is what cbindgen generates from the crate now:
//! a change to the ABI that forgot the header fails here (and in CI). With
//! `REKEYCAST_FFI_BLESS=1` the test writes the header instead.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|error| panic!("cbindgen.toml: {error}"));
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .unwrap_or_else(|error| panic!("cbindgen: {error}"));
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let path = crate_dir.join("include").join("rekeycast.h");
    if std::env::var_os("REKEYCAST_FFI_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap_or_else(|error| panic!("{path:?}: {error}"));
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_else(|error| panic!("{path:?}: {error}"));
    assert!(
        committed == generated,
        "{} differs from what cbindgen generates from ffi/src: regenerate it with \
         REKEYCAST_FFI_BLESS=1 cargo test -p rekeycast-ffi --test header, and commit it",
        path.display()
    );
}
