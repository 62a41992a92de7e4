#!/usr/bin/env bash
# The AsGrad family on the MNIST example network (real Fashion-MNIST): 3 workers plus
# the server, worker 3 made 2x slower, for pure, random, shuffle, shuffle with the
# delay-adaptive step, and SyncSGD on 3 ranks with the same straggler -- in one run.
# Reports samples/s per worker, time to a test-accuracy target (rank 0's model,
# evaluated every --eval-every steps) and the final test accuracy.
#   benchmarks/asgrad_mnist.sh [--epochs 2] [--target 0.75] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=2 TARGET=0.75 OUT="" EVAL=100
while (($#)); do
  case $1 in
    --epochs) EPOCHS=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=build/bin
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# One table row from a --metrics-out file.
row() {
  python3 - "$1" "$2" <<'PY'
import json, sys
name, m = sys.argv[1], json.load(open(sys.argv[2]))
rates = " / ".join(f"{r:.0f}" for r in m["samples_per_second"])
ttt = m["time_to_target_seconds"]
ttt = "not reached" if ttt is None else f"{ttt:.1f} s"
s = m["staleness"]
print(f"| {name} | {rates} | {m['aggregate_samples_per_second']:.0f} | {ttt} | {m['test_accuracy']:.4f} | "
      f"{s['mean']:.2f} / {s['max']} |")
PY
}

table="| algorithm | samples/s per worker | aggregate samples/s | time to ${TARGET} test accuracy | final test accuracy | staleness mean / max |
|---|---|---:|---:|---:|---:|"
run() {
  local name=$1 nproc=$2 straggler=$3; shift 3
  local json="$TMP/$name.json"
  "$BIN/asgd-launch" --nproc "$nproc" --master-port 0 -- "$BIN/asgd-mnist" --epochs "$EPOCHS" --lr 0.05 --momentum 0.5 \
    --straggler "$straggler:2" --target-accuracy "$TARGET" --eval-every "$EVAL" \
    --metrics-out "$json" "$@" >"$TMP/$name.log" 2>&1 || { cat "$TMP/$name.log" >&2; exit 1; }
  table+=$'\n'"$(row "$name" "$json")"
  echo "$name done" >&2
}
run asgd-pure 4 3 --algo asgd-pure
run asgd-random 4 3 --algo asgd-random
run asgd-shuffle 4 3 --algo asgd-shuffle
run "asgd-shuffle, delay-adaptive" 4 3 --algo asgd-shuffle --step-rule delay-adaptive
run sync 3 2 --algo sync
echo "$table"
if [[ -n $OUT ]]; then
  {
    echo "MNIST example network on Fashion-MNIST, $EPOCHS epochs, batch 32, local rule SGD lr 0.05 momentum 0.5"
    echo "(every algorithm: the server's rule for AsGrad, each rank's for sync);"
    echo "server algorithms: 4 ranks (server + 3 workers), worker 3 twice as slow (--straggler 3:2);"
    echo "sync: 3 ranks, rank 2 twice as slow. One run each on $(nproc) cores, $(date -u +%Y-%m-%d)."
    echo "Produced by benchmarks/asgrad_mnist.sh."
    echo
    echo "$table"
  } >"$OUT"
fi
