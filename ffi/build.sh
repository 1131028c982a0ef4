#!/usr/bin/env bash
# Builds the C ABI: the shared and static libraries, the header and a pkg-config file, laid
# out under one prefix (default TARGET_DIR/rekeycast-ffi), ready for `pkg-config --cflags --libs rekeycast`:
#
#   ffi/build.sh [--debug] [PREFIX]
#   PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc app.c $(pkg-config --cflags --libs rekeycast)
#
# Release by default; --debug builds the dev profile (faster to build, as CI does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
if [ "${1:-}" = "--debug" ]; then
  profile=debug
  shift
fi
target_dir="${CARGO_TARGET_DIR:-target}"
prefix="$(realpath -m "${1:-$target_dir/rekeycast-ffi}")"

if [ "$profile" = release ]; then
  cargo build --release -p rekeycast-ffi
else
  cargo build -p rekeycast-ffi
fi

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
cp "$target_dir/$profile/librekeycast_ffi.so" "$target_dir/$profile/librekeycast_ffi.a" "$prefix/lib/"
cp ffi/include/rekeycast.h "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" ffi/rekeycast.pc.in \
  >"$prefix/lib/pkgconfig/rekeycast.pc"
echo "ffi: $profile build in $prefix (lib/librekeycast_ffi.{so,a}, include/rekeycast.h, lib/pkgconfig/rekeycast.pc)"
