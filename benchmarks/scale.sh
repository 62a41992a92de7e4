#!/usr/bin/env bash
# Many ranks on one machine, by emulation (issue 34, item 4): each rank's step is a fixed
# sleep (the compute) plus the real optimizer on a --flat-mb MB model (one parameter
# vector, a fixed-noise gradient), so 32 processes fit on two cores and what is measured
# is the optimizer and the network, not the arithmetic. For each algorithm and rank
# count: aggregate steps/s against the ideal n / step time, peak RSS and threads per
# rank, messages and payload bytes per second, rendezvous and finish() times.
#   benchmarks/scale.sh [--ranks "4 8 16 32"] [--algos "dasgd gossip sync"] [--flat-mb 1]
#                       [--sleep-ms 200] [--steps 40] [--emulate RATE] [--out FILE]
# --emulate RATE runs each rank on an emulated host (scripts/emulate-hosts.sh, root) whose
# link is limited to RATE (tc's notation: 1gbit) instead of asgd-launch on loopback.
# The table goes to stdout (and FILE, with a plot FILE.png); each run's lines to FILE_runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS="4 8 16 32" ALGOS="dasgd gossip sync" FLAT_MB=1 SLEEP_MS=200 STEPS=40 OUT="" EMULATE=""
while (($#)); do
  case $1 in
    --ranks) RANKS=$2; shift 2 ;;
    --algos) ALGOS=$2; shift 2 ;;
    --flat-mb) FLAT_MB=$2; shift 2 ;;
    --sleep-ms) SLEEP_MS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --emulate) EMULATE=$2; shift 2 ;;
    *) echo "scale.sh: unknown option $1 (see the usage at the top)" >&2; exit 2 ;;
  esac
done
BIN=build/bin
RUNS=${OUT:+${OUT%.md}_runs}
RUNS=${RUNS:-$(mktemp -d)}
mkdir -p "$RUNS"
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
where="loopback (asgd-launch)"
[ -n "$EMULATE" ] && where="one emulated host per rank, links of $EMULATE (scripts/emulate-hosts.sh)"
table="Step: ${SLEEP_MS} ms of sleep + the optimizer on a ${FLAT_MB} MB model; ${STEPS} timed steps per rank (5 warm-up);
$(nproc) cores, $where, $(date -u +%Y-%m-%d). Produced by benchmarks/scale.sh.

| algo | ranks | steps/s (aggregate) | ideal | ratio | msgs/s | payload MB/s | peak RSS MB per rank (max) | threads per rank (max) | rendezvous s (max) | finish s (max) | job wall s |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for algo in $ALGOS; do
  for n in $RANKS; do
    log="$RUNS/${algo}_${n}.log"
    t0=$(date +%s.%N)
    if [ -n "$EMULATE" ]; then
      launch=(scripts/emulate-hosts.sh --hosts "$n" --rate "$EMULATE" --)
    else
      launch=("$BIN/asgd-launch" --nproc "$n" --master-port 0 --)
    fi
    "${launch[@]}" "$BIN/asgd-bench-throughput" --algo "$algo" \
      --net flat --flat-mb "$FLAT_MB" --sleep-ms "$SLEEP_MS" --steps "$STEPS" --warmup 5 --batch-size 1 \
      >"$log" 2>&1 || { echo "scale.sh: $algo at $n ranks failed; see $log" >&2; tail -5 "$log" >&2; continue; }
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
    row=$(awk -v n="$n" -v sleep="$SLEEP_MS" -v mb="$FLAT_MB" -v algo="$algo" -v wall="$wall" '
      /^\[[0-9]+\]: throughput / {
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        steps += v["steps_per_second"]; secs = v["seconds"] > secs ? v["seconds"] : secs
        msgs += v["messages_sent"] / v["seconds"]
        if (v["peak_rss_mb"] > rss) rss = v["peak_rss_mb"]
        if (v["threads"] > thr) thr = v["threads"]
        if (v["rendezvous_seconds"] > rdv) rdv = v["rendezvous_seconds"]
        if (v["finish_seconds"] > fin) fin = v["finish_seconds"]
        ranks++
      }
      END {
        if (ranks != n) { printf "MISSING %d of %d ranks", n - ranks, n; exit }
        ideal = n * 1000 / sleep
        # sync: one all-reduce of the model per step (counted as one message per rank).
        if (algo == "sync") msgs = steps
        printf "| %s | %d | %.1f | %.1f | %.2f | %.0f | %.0f | %.0f | %d | %.2f | %.2f | %.0f |",
               algo, n, steps, ideal, steps / ideal, msgs, msgs * mb, rss, thr, rdv, fin, wall
      }' "$log")
    echo "$row" >&2
    table+=$'\n'"$row"
  done
done
echo "$table"
if [ -n "$OUT" ]; then
  echo "$table" >"$OUT"
  # The plot: each algorithm's share of the ideal against the ranks.
  if command -v gnuplot >/dev/null; then
    data=$(mktemp)
    for algo in $ALGOS; do
      echo "\"$algo\""
      echo "$table" | awk -F'|' -v a="$algo" '$2 ~ " " a " " {print $3, $6}'
      printf '\n\n'
    done >"$data"
    gnuplot -e "set terminal pngcairo size 720,420; set output '${OUT%.md}.png';
      set title 'Aggregate steps/s / ideal (n / step time)'; set xlabel 'ranks'; set ylabel 'share of ideal';
      set logscale x 2; set yrange [0:1.05]; set key bottom left; set grid;
      plot for [i=0:*] '$data' index i using 1:2 with linespoints title columnheader(1)" 2>/dev/null ||
      echo "scale.sh: gnuplot failed; no plot" >&2
    rm -f "$data"
  fi
fi
