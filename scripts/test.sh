#!/usr/bin/env bash
# Quick start, command 2: installs what is missing, builds, and runs every test through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
./scripts/build.sh
cd "${TORCH_ASGD_BUILD_DIR:-build}"
ctest --output-on-failure --timeout 600 -j "${TORCH_ASGD_TEST_JOBS:-2}" "$@"
