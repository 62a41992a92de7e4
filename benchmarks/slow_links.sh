#!/usr/bin/env bash
# Slow links: every rank on an emulated host of its own (scripts/emulate-hosts.sh:
# network namespaces, each host's link limited by tbf), DASGD under each codec beside
# gossip and sync, on the real Fashion-MNIST (the MNIST example network) with a
# wall-clock budget, and the CIFAR example's ResNet-20 on synthetic data for a larger
# payload. Per run: bytes each host put on its link per step (the kernel's count on the
# host's interface, everything included: headers, acknowledgements, the store),
# aggregate samples/s, time to the target accuracy and the final accuracy. Writes one
# JSON per run and a Markdown table, and a gnuplot PNG of accuracy over time per codec.
#
#   benchmarks/slow_links.sh [--hosts "4 8"] [--rates "100mbit 1gbit"] [--seconds 60]
#                            [--codecs "none bf16 int8 topk"] [--cifar-seconds 40]
#                            [--algos "dasgd gossip sync"] (also: asgd-shuffle)
#                            [--repeats 1] [--eval-seconds 2] [--eval-deferred]
#                            [--out DIR] [--quick]
#
# DASGD and sync run under every codec (sync reduce-scatters encoded shares), gossip
# under every codec but topk (its models are not sparse); asgd-shuffle (rank 0 the
# server, the others workers whose gradients travel encoded, the models not) when asked. --algos picks which run; results
# already in --out are kept, so a later run of one algorithm adds its rows to the table.
# --eval-seconds: how often rank 0 evaluates, the resolution of the time to the target.
# Rank 0's clock stops while it evaluates and the other ranks of an asynchronous
# algorithm train on, which favours them over sync by up to rank 0's share of time spent
# evaluating; --eval-deferred (the examples' option) copies the model instead and
# evaluates the copies after training, so that no rank pauses. --cifar-seconds 0 skips
# ResNet-20. --quick: 2 and 4 hosts, 100mbit, 15 s: a check of the script, not figures
# (it sets --hosts, --rates, --seconds and --cifar-seconds: give those after it).
# Needs root (network namespaces), build/bin, gnuplot; exits 77 when namespaces are not
# allowed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${TORCH_ASGD_BIN:-$ROOT/build/bin}
HOSTS="4 8" RATES="100mbit 1gbit" SECS=60 CODECS="none bf16 int8 topk" CIFAR_SECS=40 REPEATS=1 EVAL_SECS=2 DEFERRED=()
ALGOS="dasgd gossip sync"
OUT=$HERE/results/slow_links
while (($#)); do
  case $1 in
    --hosts) HOSTS=$2; shift 2 ;;
    --rates) RATES=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --codecs) CODECS=$2; shift 2 ;;
    --algos) ALGOS=$2; shift 2 ;;
    --cifar-seconds) CIFAR_SECS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --eval-seconds) EVAL_SECS=$2; shift 2 ;;
    --eval-deferred) DEFERRED=(--eval-deferred); shift ;;
    --out) OUT=$2; shift 2 ;;
    --quick) HOSTS="2 4" RATES="100mbit" SECS=15 CIFAR_SECS=10; shift ;;
    *) echo "slow_links.sh: unknown option $1 (see the top of the script)" >&2; exit 2 ;;
  esac
done
for f in asgd-mnist asgd-cifar; do
  [[ -x $BIN/$f ]] || { echo "slow_links.sh: $BIN/$f is missing: ./scripts/build.sh first" >&2; exit 1; }
done
command -v gnuplot >/dev/null || { echo "slow_links.sh: gnuplot is missing: ./scripts/deps.sh" >&2; exit 1; }
mkdir -p "$OUT"
EMU=$ROOT/scripts/emulate-hosts.sh
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296  # README, "Benchmarks"

# run NAME HOSTS RATE PROGRAM ARGS...: one job; its metrics JSON and link byte counts.
run() {
  local name=$1 hosts=$2 rate=$3 program=$4
  shift 4
  local k
  for ((k = 1; k <= REPEATS; k++)); do
    local json="$OUT/$name.r$k.json" stats="$OUT/$name.r$k.links"
    local rc=0
    "$EMU" --hosts "$hosts" --rate "$rate" --stats "$stats" -- "$BIN/$program" --metrics-out "$json" "$@" \
      >"$OUT/$name.r$k.log" 2>&1 || rc=$?
    if ((rc == 77)); then
      tail -1 "$OUT/$name.r$k.log" >&2
      exit 77
    fi
    ((rc == 0)) || { echo "slow_links.sh: $name failed (exit $rc): see $OUT/$name.r$k.log" >&2; tail -5 "$OUT/$name.r$k.log" >&2; exit 1; }
    echo "$name r$k done" >&2
  done
}

for hosts in $HOSTS; do
  for rate in $RATES; do
    common=(--budget-seconds "$SECS" --eval-every 0 --eval-every-seconds "$EVAL_SECS" --eval-samples 2000 --target-accuracy 0.8 ${DEFERRED[@]+"${DEFERRED[@]}"})
    for algo in $ALGOS; do
      for codec in $CODECS; do
        if [[ $algo == gossip ]]; then
          [[ $codec == topk* ]] && continue
          run "mnist_n${hosts}_${rate}_gossip_${codec}" "$hosts" "$rate" asgd-mnist --algo gossip --lr 0.12 \
            --compress "$codec" "${common[@]}"
        else
          run "mnist_n${hosts}_${rate}_${algo}_${codec}" "$hosts" "$rate" asgd-mnist --algo "$algo" --compress "$codec" "${common[@]}"
        fi
      done
    done
  done
done
# The larger payload (ResNet-20, 1.1 MB of parameters): throughput and bytes only; the
# synthetic images carry no accuracy worth reporting.
for rate in $RATES; do
  awk -v s="$CIFAR_SECS" 'BEGIN { exit !(s + 0 == 0) }' && break
  hosts=4
  for algo in $ALGOS; do
    [[ $algo == gossip ]] && continue
    for codec in $CODECS; do
      run "cifar_n${hosts}_${rate}_${algo}_${codec}" "$hosts" "$rate" asgd-cifar --synthetic 2048 --algo "$algo" \
        --compress "$codec" --budget-seconds "$CIFAR_SECS" --eval-every 0
    done
  done
done

/usr/bin/python3 "$HERE/slow_links_report.py" "$OUT" "$SECS" "$CIFAR_SECS" "$EVAL_SECS"
