#!/usr/bin/env bash
# Aggregate training throughput of the MNIST example network with NPROC ranks, for
# every algorithm, in one run: local (independent processes, no communication: the
# machine's limit), dasgd, gossip, sync (all-reduce). Repetitions are interleaved,
# with the order of the algorithms rotated each time, so drift and order effects hit
# every algorithm alike; the table shows the median aggregate samples/s (min-max)
# and the ratio to local.
#   benchmarks/throughput.sh [--nproc 2] [--repeats 5] [--steps 300] [--optimizer sgd|adam|adamw]
#                            [--configs "local,dasgd,gossip,sync"] [--out FILE]
# A config is an --algo and more asgd-bench-throughput options, e.g. "dasgd --max-lead 8".
# With --nproc 1, "local" is the inner optimizer alone and the others its wrappers with
# a world of one: the wrappers' own per-step cost.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=2 REPEATS=5 STEPS=300 OUT="" OPTIMIZER=sgd CONFIGS="local,dasgd,gossip,sync"
while (($#)); do
  case $1 in
    --nproc) NPROC=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --optimizer) OPTIMIZER=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=build/bin
IFS=, read -r -a ALGOS <<<"$CONFIGS"
declare -A RUNS
for ((r = 0; r < REPEATS; r++)); do
  for ((k = 0; k < ${#ALGOS[@]}; k++)); do
    algo=${ALGOS[$(((k + r) % ${#ALGOS[@]}))]}
    # shellcheck disable=SC2086  # a config is words on purpose
    total=$("$BIN/asgd-launch" --nproc "$NPROC" --master-port 0 -- "$BIN/asgd-bench-throughput" \
              --optimizer "$OPTIMIZER" --steps "$STEPS" --algo $algo |
            sed -n 's/.*samples_per_second=\([0-9.]*\).*/\1/p' | awk '{s += $1} END {printf "%.1f", s}')
    RUNS[$algo]="${RUNS[$algo]:-} $total"
    echo "repeat $r $algo: $total samples/s" >&2
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {printf "%.0f %.0f %.0f", v[int((NR + 1) / 2)], v[1], v[NR]}'; }
read -r local_med _ _ <<<"$(echo "${RUNS[${ALGOS[0]}]}" | median)"
table="| configuration | aggregate samples/s, median (min-max) | vs ${ALGOS[0]} |
|---|---:|---:|"
for algo in "${ALGOS[@]}"; do
  read -r med lo hi <<<"$(echo "${RUNS[$algo]}" | median)"
  table+=$'\n'"| $algo | $med ($lo-$hi) | $(awk -v a="$med" -v b="$local_med" 'BEGIN {printf "%.2f", a / b}') |"
done
echo "$table"
if [[ -n $OUT ]]; then
  {
    echo "MNIST example network, local rule $OPTIMIZER, $NPROC ranks on $(nproc) cores, batch 64, $STEPS timed steps per rank,"
    echo "$REPEATS interleaved repeats, $(date -u +%Y-%m-%d). Produced by benchmarks/throughput.sh."
    echo
    echo "$table"
  } >"$OUT"
fi
