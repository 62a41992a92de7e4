#!/usr/bin/env bash
# Quick start, command 2: installs what is missing, builds, and runs every test through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
./scripts/build.sh
cd "${TORCH_ASGD_BUILD_DIR:-build}"
status=0
ctest --output-on-failure --timeout 600 -j "${TORCH_ASGD_TEST_JOBS:-2}" "$@" || status=$?
if [ "$status" -ne 0 ]; then
  # A long log is often read from its end: repeat what the failed tests printed there.
  echo "=== output of the failed tests (from Testing/Temporary/LastTest.log) ==="
  if [ -f Testing/Temporary/LastTestsFailed.log ]; then
    while IFS=: read -r _ name; do
      awk -v t="$name" '
        index($0, " Testing: " t) && substr($0, length($0) - length(t) + 1) == t {on = 1}
        on {print}
        on && index($0, "\"" t "\" end time:") == 1 {exit}
      ' Testing/Temporary/LastTest.log | tail -n 80
    done < Testing/Temporary/LastTestsFailed.log
  fi
fi
exit "$status"
