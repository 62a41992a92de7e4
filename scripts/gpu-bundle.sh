#!/usr/bin/env bash
# Run here (Debian, after scripts/deps.sh): gathers into .gpu-bundle/ what a bare GPU
# machine (Python's torch wheel, nvcc, CMake, no package registry) lacks to build and test
# torch_asgd with scripts/gpu-check.sh: header-only dependencies and small CMake configs
# for them, GoogleTest's sources, zlib, Gloo's pinned source (torch_asgd builds its own,
# as everywhere) and the Fashion-MNIST files. .gpu-bundle/ is ignored by git: carry it.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.gpu-bundle
GLOO=${TORCH_ASGD_GLOO_SOURCE:-../shared/third_party/gloo-3135b0b.tar.xz}
[[ -f $GLOO ]] || { echo "gpu-bundle: no Gloo tarball at $GLOO: set TORCH_ASGD_GLOO_SOURCE to pytorch/gloo 3135b0b's tarball" >&2; exit 2; }
rm -rf "$B"
mkdir -p "$B/include" "$B/lib" "$B/src" "$B/cmake" "$B/fashion-mnist"
cp -r /usr/include/fmt /usr/include/nlohmann /usr/include/CLI "$B/include/"
cp /usr/include/xxhash.h /usr/include/zlib.h /usr/include/zconf.h "$B/include/"
cp /usr/lib/x86_64-linux-gnu/libz.a "$B/lib/"
cp -r /usr/src/googletest "$B/src/"
cp /usr/share/datasets/fashion-mnist/*.gz "$B/fashion-mnist/"
cp "$GLOO" "$B/gloo.tar.xz"
# Config files find_package() takes from CMAKE_PREFIX_PATH: header-only targets.
cat > "$B/cmake/fmtConfig.cmake" <<'CM'
add_library(fmt::fmt INTERFACE IMPORTED)
set_target_properties(fmt::fmt PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_LIST_DIR}/../include"
  INTERFACE_COMPILE_DEFINITIONS FMT_HEADER_ONLY=1)
CM
cat > "$B/cmake/CLI11Config.cmake" <<'CM'
add_library(CLI11::CLI11 INTERFACE IMPORTED)
set_target_properties(CLI11::CLI11 PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_LIST_DIR}/../include")
CM
cat > "$B/cmake/nlohmann_jsonConfig.cmake" <<'CM'
add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
set_target_properties(nlohmann_json::nlohmann_json PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_LIST_DIR}/../include")
CM
du -sh "$B"
