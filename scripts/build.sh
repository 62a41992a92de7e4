#!/usr/bin/env bash
# Configures (once) and builds torch_asgd into ./build with every executable in build/bin.
# Extra arguments are passed to `cmake --build` (for example `--target asgd-launch`).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${TORCH_ASGD_BUILD_DIR:-build}
JOBS=${TORCH_ASGD_JOBS:-$(nproc)}
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release}
fi
cmake --build "$BUILD_DIR" -j "$JOBS" "$@"
