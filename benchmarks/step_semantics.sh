#!/usr/bin/env bash
# The step's meaning (issue 32): 2 ranks on Fashion-MNIST, rank 1 2x slower, equal work
# (120,000 samples over both ranks), DDP's hyperparameters (SGD lr 0.05, momentum 0.9,
# batch 64 per rank): PyTorch DDP, sync, DASGD (every rank's step added at full weight)
# and DASGD --average (each rank's step scaled by 1/2: DDP's averaged step), REPEATS
# runs each, interleaved. Writes one metrics JSON per run and a table (results.md) into
# OUT_DIR.
#   benchmarks/step_semantics.sh [OUT_DIR] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/step_semantics}
REPEATS=${2:-2}
BIN=${TORCH_ASGD_BUILD_DIR:-build}/bin
mkdir -p "$OUT"
common=(--budget-samples 120000 --straggler 1:2 --lr 0.05 --momentum 0.9 --batch-size 64
        --target-accuracy 0.8 --eval-every-seconds 0.5)
for rep in $(seq 1 "$REPEATS"); do
  for run in ddp sync dasgd dasgd-average; do
    json=$OUT/$run-$rep.json
    case $run in
      ddp) cmd=(/usr/bin/python3 benchmarks/ddp.py "${common[@]}") ;;
      sync) cmd=("$BIN/asgd-mnist" --algo sync --eval-deferred --eval-every 0 "${common[@]}") ;;
      dasgd) cmd=("$BIN/asgd-mnist" --algo dasgd --eval-deferred --eval-every 0 "${common[@]}") ;;
      dasgd-average) cmd=("$BIN/asgd-mnist" --algo dasgd --average --eval-deferred --eval-every 0 "${common[@]}") ;;
    esac
    echo "== $run, run $rep"
    "$BIN/asgd-launch" --nproc 2 --master-port 0 -- "${cmd[@]}" --metrics-out "$json" > "$OUT/$run-$rep.log" 2>&1
  done
done
python3 - "$OUT" "$REPEATS" <<'PY'
import json, sys, statistics
out, reps = sys.argv[1], int(sys.argv[2])
rows = ["| run | time to 80 % (s), each run | final accuracy, each run | train s |", "|---|---|---|---:|"]
ddp = []
for run in ["ddp", "sync", "dasgd", "dasgd-average"]:
    t, acc, tr = [], [], []
    for r in range(1, reps + 1):
        m = json.load(open(f"{out}/{run}-{r}.json"))
        t.append(m.get("time_to_target_seconds"))
        acc.append(m["test_accuracy"])
        tr.append(m["train_seconds"])
    fmt = lambda v: "missed" if v is None else f"{v:.1f}"
    rows.append(f"| {run} | {', '.join(fmt(v) for v in t)} | {', '.join(f'{a:.3f}' for a in acc)} | {statistics.median(tr):.1f} |")
open(f"{out}/results.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
