#!/usr/bin/env bash
# Accuracy tables on the real Fashion-MNIST (MNIST example network, 4 ranks), one run
# per row, median-free: each row is one run (say so where you quote it).
#   benchmarks/accuracy.sh lead   [--out FILE]  by-label shards, 1 epoch, no straggler and
#                                               rank 3 4x slower: sync, dasgd, dasgd with
#                                               the bounded lead (wait, damp), gossip
#   benchmarks/accuracy.sh rules  [--out FILE]  iid, 1 and 2 epochs: dasgd, gossip, sync,
#                                               asgd-shuffle with adam and adamw
#   benchmarks/accuracy.sh gossip [--out FILE]  iid, 1 epoch, no straggler and rank 3 4x
#                                               slower: dasgd, sync, gossip at lr 0.03 and
#                                               at lr x ranks; 3 runs per row, the median
# Extra options after the suite go to every asgd-mnist run (e.g. --max-lead 4).
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${1:?usage: benchmarks/accuracy.sh lead|rules|gossip [--out FILE] [asgd-mnist options]}
shift
OUT=""
EXTRA=()
while (($#)); do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
BIN=${TORCH_ASGD_BIN:-build/bin}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
row() {  # row LABEL JSON -> a table row
  python3 - "$1" "$2" <<'PY'
import json, sys
label, m = sys.argv[1], json.load(open(sys.argv[2]))
s = m["staleness"]
rates = m["samples_per_second"]
print(f"| {label} | {100 * m['test_accuracy']:.1f} | {100 * m['worst_class_accuracy']:.1f} | "
      f"{m['wall_seconds']:.1f} | {m['aggregate_samples_per_second']:.0f} | {max(rates):.0f} | "
      f"{s['mean']:.1f} / {s['max']} |")
PY
}
header="| configuration | test accuracy % | worst class % | wall s | aggregate samples/s | fastest rank samples/s | staleness (lag) mean / max |
|---|---:|---:|---:|---:|---:|---:|"
table=$header
per_row="One run per row"
launch() {  # launch JSON NPROC ARGS...: one asgd-mnist job, its metrics in JSON
  local json=$1 n=$2; shift 2
  "$BIN/asgd-launch" --nproc "$n" --master-port 0 -- "$BIN/asgd-mnist" --eval-every 0 \
    --metrics-out "$json" "$@" "${EXTRA[@]}" >"$TMP/run.log" 2>&1 || { tail -5 "$TMP/run.log" >&2; exit 1; }
}
run() {  # run LABEL NPROC ARGS...
  local label=$1 n=$2; shift 2
  local json="$TMP/run.json"
  launch "$json" "$n" "$@"
  table+=$'\n'"$(row "$label" "$json")"
  echo "$label done" >&2
}
median_row() {  # median_row LABEL JSON... -> a row of medians (min-max) over the runs
  python3 - "$@" <<'PY'
import json, statistics, sys
label, runs = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
def cell(values, fmt):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
print(f"| {label} | {cell([100 * m['test_accuracy'] for m in runs], '{:.1f}')} | "
      f"{cell([m['aggregate_samples_per_second'] for m in runs], '{:.0f}')} | "
      f"{cell([m['wall_seconds'] for m in runs], '{:.1f}')} | "
      f"{cell([m['staleness']['mean'] for m in runs], '{:.1f}')} |")
PY
}
run_repeated() {  # run_repeated LABEL REPEATS NPROC ARGS...
  local label=$1 repeats=$2 n=$3; shift 3
  local jsons=()
  for ((k = 1; k <= repeats; k++)); do
    local json="$TMP/run$k.json"
    launch "$json" "$n" "$@"
    jsons+=("$json")
  done
  table+=$'\n'"$(median_row "$label" "${jsons[@]}")"
  echo "$label done" >&2
}
lead_row() {  # lead_row LABEL JSON... -> medians (min-max) with the worst class and staleness max
  python3 - "$@" <<'PY'
import json, statistics, sys
label, runs = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
med = statistics.median
acc = [100 * m['test_accuracy'] for m in runs]
print(f"| {label} | {med(acc):.1f} ({min(acc):.1f}-{max(acc):.1f}) | "
      f"{med([100 * m['worst_class_accuracy'] for m in runs]):.1f} | "
      f"{med([m['wall_seconds'] for m in runs]):.1f} | "
      f"{med([m['aggregate_samples_per_second'] for m in runs]):.0f} | "
      f"{med([m['staleness']['mean'] for m in runs]):.1f} / {med([m['staleness']['max'] for m in runs]):.0f} |")
PY
}
run_lead() {  # run_lead LABEL ARGS...: three runs of 4 ranks, one row of medians
  local label=$1; shift
  local jsons=()
  for k in 1 2 3; do
    launch "$TMP/lead$k.json" 4 "$@"
    jsons+=("$TMP/lead$k.json")
  done
  table+=$'\n'"$(lead_row "$label" "${jsons[@]}")"
  echo "$label done" >&2
}
case $SUITE in
  gossip)
    what="4 ranks, iid shards, 1 epoch, SGD (momentum 0.7), batch 32; gossip's lr 0.12 is the default 0.03 times the 4 ranks"
    header="| configuration | test accuracy % (rank 0), median (min-max) | aggregate samples/s | wall s | staleness (gossip: lag) mean |
|---|---:|---:|---:|---:|"
    table=$header
    per_row="Three runs per row"
    for straggler in none 3:4; do
      s=(); [[ $straggler != none ]] && s=(--straggler "$straggler")
      common=(--epochs 1 --batch-size 32 "${s[@]}")
      run_repeated "dasgd, lr 0.03, straggler $straggler" 3 4 --algo dasgd --lr 0.03 "${common[@]}"
      run_repeated "sync, lr 0.03, straggler $straggler" 3 4 --algo sync --lr 0.03 "${common[@]}"
      run_repeated "gossip, lr 0.03, straggler $straggler" 3 4 --algo gossip --lr 0.03 "${common[@]}"
      run_repeated "gossip, lr 0.12, straggler $straggler" 3 4 --algo gossip --lr 0.12 "${common[@]}"
    done
    ;;
  lead)
    what="4 ranks (asgd-shuffle: server + 3 workers), --partition by-label, 1 epoch, the examples' defaults (SGD lr 0.03, momentum 0.7; the AsGrad server: momentum 0), batch 32; the lead counted as applied (a peer's view of this rank) or progress (this rank's updates beyond the slowest peer's own)"
    header="| configuration | test accuracy %, median (min-max) | worst class %, median | wall s | aggregate samples/s | staleness (gossip: lag) mean / max |
|---|---:|---:|---:|---:|---:|"
    table=$header
    per_row="Three runs per row"
    for straggler in none 3:4; do
      s=(); [[ $straggler != none ]] && s=(--straggler "$straggler")
      common=(--partition by-label --epochs 1 --batch-size 32 "${s[@]}")
      run_lead "sync, straggler $straggler" --algo sync "${common[@]}"
      run_lead "dasgd, straggler $straggler" --algo dasgd "${common[@]}"
      # The earlier recommendation (applied, wait), and the progress measure both ways.
      run_lead "dasgd max-lead 4 wait applied, straggler $straggler" --algo dasgd --max-lead 4 \
        --lead-policy wait --lead-measure applied "${common[@]}"
      for policy in wait damp; do
        run_lead "dasgd max-lead 4 $policy progress, straggler $straggler" --algo dasgd --max-lead 4 \
          --lead-policy $policy --lead-measure progress "${common[@]}"
      done
      run_lead "gossip, straggler $straggler" --algo gossip "${common[@]}"
      run_lead "asgd-shuffle, straggler $straggler" --algo asgd-shuffle "${common[@]}"
    done
    ;;
  rules)
    what="4 ranks (asgd-shuffle: server + 3 workers), iid shards, batch 32, adam and adamw at the examples' defaults (lr 1e-3; adamw weight decay 0.01)"
    for epochs in 1 2; do
      for opt in adam adamw; do
        for algo in dasgd gossip sync asgd-shuffle; do
          run "$algo, $opt, $epochs epoch(s)" 4 --algo $algo --optimizer $opt --epochs $epochs --batch-size 32
        done
      done
    done
    ;;
  *) echo "unknown suite $SUITE (lead, rules, gossip)" >&2; exit 2 ;;
esac
echo "$table"
if [[ -n $OUT ]]; then
  {
    echo "Fashion-MNIST (60000 train, 10000 test), MNIST example network, $what."
    echo "$per_row on $(nproc) cores, $(date -u +%Y-%m-%d). Produced by benchmarks/accuracy.sh $SUITE${EXTRA[*]:+ ${EXTRA[*]}}."
    echo
    echo "$table"
  } >"$OUT"
fi
