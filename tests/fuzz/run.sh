#!/usr/bin/env bash
# Builds the frame-decoder fuzzer with clang's libFuzzer and runs it for a bounded
# time (ctest test fuzz_decode_frame). Exits 77 (ctest: skipped) when clang or its
# fuzzer runtime is missing; scripts/deps.sh installs both.
# usage: run.sh SOURCE_DIR WORK_DIR SECONDS [INCLUDE_DIR...]
set -euo pipefail
src=$1 work=$2 seconds=$3
shift 3
cxx=""
for c in clang++ clang++-14 clang++-15 clang++-16; do
  if command -v "$c" >/dev/null; then cxx=$c; break; fi
done
if [ -z "$cxx" ]; then
  echo "clang++ not found: the fuzzer is skipped (./scripts/deps.sh installs clang)"
  exit 77
fi
includes=(-I"$src")
for d in "$@"; do includes+=(-I"$d"); done
mkdir -p "$work/corpus"
if ! "$cxx" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -DFMT_HEADER_ONLY "${includes[@]}" "$src/tests/fuzz/decode_frame_fuzz.cc" "$src/torch_asgd/comm/wire.cc" \
    "$src/torch_asgd/comm/metadata.cc" "$src/torch_asgd/comm/codec.cc" -o "$work/decode_frame_fuzz" \
    2>"$work/build.log"; then
  if grep -q "libclang_rt.fuzzer\|fsanitize=fuzzer" "$work/build.log"; then
    cat "$work/build.log"
    echo "clang's libFuzzer runtime is missing: skipped (install libclang-rt-14-dev)"
    exit 77
  fi
  cat "$work/build.log"
  exit 1
fi
# A crash, a sanitizer report or a failed invariant ends the run with exit code 1 and
# leaves the input as crash-* in WORK_DIR. (libFuzzer's own default error code is 77,
# which ctest would take for "skipped".)
cd "$work"
exec ./decode_frame_fuzz -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=1024 \
  -error_exitcode=1 -timeout_exitcode=1 corpus
