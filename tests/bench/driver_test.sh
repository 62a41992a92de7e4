#!/usr/bin/env bash
# ctest benchmark_driver_quick: benchmarks/run.sh --quick on tiny generated data with
# seconds-long budgets, every suite. Checks that each run's JSON, each suite's table in
# the README and each suite's PNG are produced and well formed (not that a speed or an
# accuracy is reached).
#   tests/bench/driver_test.sh SOURCE_DIR BIN_DIR
set -euo pipefail
SRC=${1:?source dir} BIN=${2:?bin dir}
# Without the DDP baseline's PyTorch or gnuplot the driver cannot run: skip (ctest 77).
if ! /usr/bin/python3 -c "import torch.distributed" 2>/dev/null || ! command -v gnuplot >/dev/null; then
  echo "skipped: needs /usr/bin/python3 with python3-torch and gnuplot (./scripts/deps.sh)"
  exit 77
fi
T=$(mktemp -d)
# Kept when the test fails: the runs' logs are in $T/results/logs.
trap 'rc=$?; if ((rc == 0)); then rm -rf "$T"; else echo "driver_test.sh: kept $T" >&2; fi' EXIT
/usr/bin/python3 "$SRC/benchmarks/tiny_data.py" "$T/data" 2000 500
# A README with one suite's old block (to be replaced) and text around it (to be kept).
printf '# Benchmarks\n\nbefore\n\n<!-- bench:scaling -->\nOLD TABLE\n<!-- /bench:scaling -->\n\nafter\n' >"$T/README.md"
TORCH_ASGD_BIN=$BIN "$SRC/benchmarks/run.sh" --quick --seconds 3 --samples 4000 \
  --data "$T/data" --out "$T/results" --readme "$T/README.md"
/usr/bin/python3 "$SRC/tests/bench/check_results.py" "$T/results" "$T/README.md"
