#!/usr/bin/env bash
# Configures (once) and builds torch_asgd into ./build with every executable in build/bin.
# Extra arguments are passed to `cmake --build` (for example `--target asgd-launch`).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${TORCH_ASGD_BUILD_DIR:-build}
JOBS=${TORCH_ASGD_JOBS:-$(nproc)}
# torch_asgd's private Gloo (cmake/Gloo.cmake) is built from source: the tarball beside
# the checkout when there is one (no network needed), else TORCH_ASGD_GLOO_SOURCE, else
# CMake clones it from GitHub.
GLOO_TARBALL=../shared/third_party/gloo-3135b0b.tar.xz
GLOO_SOURCE=${TORCH_ASGD_GLOO_SOURCE:-}
if [[ -z $GLOO_SOURCE && -f $GLOO_TARBALL ]]; then GLOO_SOURCE=$(realpath "$GLOO_TARBALL"); fi
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} \
    ${GLOO_SOURCE:+-DTORCH_ASGD_GLOO_SOURCE="$GLOO_SOURCE"}
fi
cmake --build "$BUILD_DIR" -j "$JOBS" "$@"
