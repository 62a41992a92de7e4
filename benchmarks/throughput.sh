#!/usr/bin/env bash
# Aggregate training throughput of the MNIST example network with NPROC ranks, for
# every algorithm, in one run: local (independent processes, no communication: the
# machine's limit), dasgd, gossip, sync (all-reduce). Repetitions are interleaved,
# with the order of the algorithms rotated each time, so drift and order effects hit
# every algorithm alike; the table shows the median aggregate samples/s (min-max)
# and the ratio to local.
#   benchmarks/throughput.sh [--nproc 2] [--repeats 5] [--steps 300] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=2 REPEATS=5 STEPS=300 OUT=""
while (($#)); do
  case $1 in
    --nproc) NPROC=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=build/bin
ALGOS=(local dasgd gossip sync)
declare -A RUNS
for ((r = 0; r < REPEATS; r++)); do
  for ((k = 0; k < ${#ALGOS[@]}; k++)); do
    algo=${ALGOS[$(((k + r) % ${#ALGOS[@]}))]}
    total=$("$BIN/asgd-launch" --nproc "$NPROC" --master-port 0 -- "$BIN/asgd-bench-throughput" \
              --algo "$algo" --steps "$STEPS" |
            sed -n 's/.*samples_per_second=\([0-9.]*\).*/\1/p' | awk '{s += $1} END {printf "%.1f", s}')
    RUNS[$algo]="${RUNS[$algo]:-} $total"
    echo "repeat $r $algo: $total samples/s" >&2
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {printf "%.0f %.0f %.0f", v[int((NR + 1) / 2)], v[1], v[NR]}'; }
read -r local_med _ _ <<<"$(echo "${RUNS[local]}" | median)"
table="| algorithm | aggregate samples/s, median (min-max) | vs local |
|---|---:|---:|"
for algo in "${ALGOS[@]}"; do
  read -r med lo hi <<<"$(echo "${RUNS[$algo]}" | median)"
  table+=$'\n'"| $algo | $med ($lo-$hi) | $(awk -v a="$med" -v b="$local_med" 'BEGIN {printf "%.2f", a / b}') |"
done
echo "$table"
if [[ -n $OUT ]]; then
  {
    echo "MNIST example network, $NPROC ranks on $(nproc) cores, batch 64, $STEPS timed steps per rank,"
    echo "$REPEATS interleaved repeats, $(date -u +%Y-%m-%d). Produced by benchmarks/throughput.sh."
    echo
    echo "$table"
  } >"$OUT"
fi
