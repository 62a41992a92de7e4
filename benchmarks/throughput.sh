#!/usr/bin/env bash
# Aggregate training throughput of an example network (--net mnist, or cifar: the CIFAR
# example's ResNet-20) with NPROC ranks, for
# every algorithm, in one run: local (independent processes, no communication: the
# machine's limit), dasgd, gossip, sync (all-reduce). Repetitions are interleaved,
# with the order of the algorithms rotated each time, so drift and order effects hit
# every algorithm alike; the table shows the median aggregate samples/s (min-max)
# and the ratio to local.
#   benchmarks/throughput.sh [--nproc 2] [--repeats 5] [--steps 300] [--optimizer sgd|adam|adamw]
#                            [--configs "local,dasgd,gossip,sync"] [--net mnist|cifar|lm] [--warmup 30]
#                            [--batch-size 64] [--default-malloc] [--out FILE]
# A config is an --algo and more asgd-bench-throughput options, e.g. "dasgd --max-lead 8".
# With --nproc 1, "local" is the inner optimizer alone and the others its wrappers with
# a world of one: the wrappers' own per-step cost.
# glibc's malloc raises its mmap threshold each time a large mmapped block is freed, so
# whether a step's activations come from mmap (page faults every step) or the heap
# depends on what a process happened to free before (a wrapper that flattens the
# parameters frees them once): the same arithmetic per step ran up to 3.7x slower or
# faster than the inner optimizer alone (measured 2026-12-02, README "Benchmarks").
# Fixed thresholds make every configuration allocate alike; --default-malloc measures
# without them.
set -euo pipefail
cd "$(dirname "$0")/.."
FIXED_MALLOC=1
NPROC=2 REPEATS=5 STEPS=300 OUT="" OPTIMIZER=sgd CONFIGS="local,dasgd,gossip,sync" NET=mnist WARMUP=30 BATCH=64
while (($#)); do
  case $1 in
    --nproc) NPROC=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --optimizer) OPTIMIZER=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --net) NET=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --batch-size) BATCH=$2; shift 2 ;;
    --default-malloc) FIXED_MALLOC=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=build/bin
# asgd-launch fixes them too, unless told not to.
LAUNCH_MALLOC=()
if ((FIXED_MALLOC)); then
  export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
else
  unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_
  LAUNCH_MALLOC=(--default-malloc)
fi
IFS=, read -r -a ALGOS <<<"$CONFIGS"
declare -A RUNS
for ((r = 0; r < REPEATS; r++)); do
  for ((k = 0; k < ${#ALGOS[@]}; k++)); do
    algo=${ALGOS[$(((k + r) % ${#ALGOS[@]}))]}
    # shellcheck disable=SC2086  # a config is words on purpose
    total=$("$BIN/asgd-launch" --nproc "$NPROC" --master-port 0 "${LAUNCH_MALLOC[@]}" -- "$BIN/asgd-bench-throughput" \
              --net "$NET" --optimizer "$OPTIMIZER" --warmup "$WARMUP" --steps "$STEPS" --batch-size "$BATCH" --algo $algo |
            sed -n 's/.*samples_per_second=\([0-9.]*\).*/\1/p' | awk '{s += $1} END {printf "%.4f", s}')
    RUNS[$algo]="${RUNS[$algo]:-} $total"
    echo "repeat $r $algo: $total samples/s" >&2
  done
done
# Whole samples/s, or three decimals below 100 (the transformer's few samples/s).
median() {
  tr ' ' '\n' | grep -v '^$' | sort -g | awk '
    function f(x) { return x < 100 ? sprintf("%.3f", x) : sprintf("%.0f", x) }
    {v[NR] = $1} END {printf "%s %s %s", f(v[int((NR + 1) / 2)]), f(v[1]), f(v[NR])}'
}
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
    case $NET in
      cifar) name="CIFAR example network (ResNet-20)" ;;
      lm) name="asgd-lm's transformer (10.9 M parameters, 128-byte samples)" ;;
      flat) name="a flat model (one parameter vector, a fixed-noise gradient, no compute; size: see the configurations)" ;;
      *) name="MNIST example network" ;;
    esac
    echo "$name, local rule $OPTIMIZER, $NPROC ranks on $(nproc) cores, batch $BATCH, $STEPS timed steps per rank after $WARMUP,"
    if ((FIXED_MALLOC)); then echo "fixed glibc malloc thresholds (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_),"; else echo "glibc malloc's default (dynamic) thresholds,"; fi
    echo "$REPEATS interleaved repeats, $(date -u +%Y-%m-%d). Produced by benchmarks/throughput.sh."
    echo
    echo "$table"
  } >"$OUT"
fi
