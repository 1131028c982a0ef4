#!/usr/bin/env bash
# Builds the C ABI (ffi/build.sh --debug), then builds and runs, from C: the loopback example
# against the shared and the static library, and the contract tests plain, under
# AddressSanitizer (with LeakSanitizer and UBSan), and under valgrind; valgrind runs the
# example too. Any failure, sanitizer report, valgrind error or leak fails the script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

target_dir="${CARGO_TARGET_DIR:-target}"
prefix="$(realpath -m "$target_dir/rekeycast-ffi")"
out="$prefix/c"
bash ffi/build.sh --debug "$prefix"
mkdir -p "$out"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cflags="$(pkg-config --cflags rekeycast)"
libs="$(pkg-config --libs rekeycast) -Wl,-rpath,$prefix/lib"
warn=(-Wall -Wextra -Werror)

echo "ffi: compiling the example (shared and static) and the contract tests (plain and ASan)"
# shellcheck disable=SC2086
gcc -std=c99 "${warn[@]}" -g -o "$out/loopback" ffi/examples/loopback.c $cflags $libs
# shellcheck disable=SC2086
gcc -std=c99 "${warn[@]}" -O1 -o "$out/loopback-static" ffi/examples/loopback.c $cflags \
  "$prefix/lib/librekeycast_ffi.a" -lpthread -ldl -lm
# shellcheck disable=SC2086
gcc -std=c11 "${warn[@]}" -g -o "$out/contracts" ffi/tests/c/contracts.c $cflags $libs
asan=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
# shellcheck disable=SC2086
gcc -std=c11 "${warn[@]}" -g "${asan[@]}" -o "$out/contracts-asan" ffi/tests/c/contracts.c \
  $cflags $libs
# shellcheck disable=SC2086
gcc -std=c99 "${warn[@]}" -g "${asan[@]}" -o "$out/loopback-asan" ffi/examples/loopback.c \
  $cflags $libs

echo "ffi: the example (shared library)"
timeout 60 "$out/loopback"
echo "ffi: the example (static library)"
timeout 60 "$out/loopback-static"
echo "ffi: contract tests"
timeout 120 "$out/contracts"
echo "ffi: AddressSanitizer (with LeakSanitizer): contract tests and example"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
timeout 300 "$out/contracts-asan"
timeout 120 "$out/loopback-asan" >/dev/null
echo "ffi: AddressSanitizer: no report"
vg=(valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect,possible
  --errors-for-leak-kinds=definite,indirect,possible --suppressions=ffi/tests/c/valgrind.supp)
echo "ffi: valgrind: contract tests"
timeout 600 "${vg[@]}" "$out/contracts" 2>"$out/valgrind-contracts.log" || {
  cat "$out/valgrind-contracts.log"
  exit 1
}
grep -E "ERROR SUMMARY|definitely lost|indirectly lost|possibly lost|suppressed:" \
  "$out/valgrind-contracts.log"
echo "ffi: valgrind: example"
timeout 600 "${vg[@]}" "$out/loopback" >/dev/null 2>"$out/valgrind-loopback.log" || {
  cat "$out/valgrind-loopback.log"
  exit 1
}
grep -E "ERROR SUMMARY|definitely lost|indirectly lost|possibly lost|suppressed:" \
  "$out/valgrind-loopback.log"
echo "ffi: the README's C example"
awk '/^## C products/{f=1} f&&/^```c/{p=1;next} p&&/^```/{exit} p' README.md >"$out/readme.c"
# shellcheck disable=SC2086
gcc -std=c99 -Wall -Werror -o "$out/readme" "$out/readme.c" $cflags $libs
timeout 60 "$out/readme"
