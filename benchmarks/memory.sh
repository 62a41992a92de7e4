#!/usr/bin/env bash
# Peak memory and threads of one DASGD rank as the number of peers grows (issue: a
# rank's memory must not grow as peers x model). One fp32 parameter of MB megabytes,
# 50 steps; the median over ranks of each run's peak RSS (VmHWM), beside the 1-rank
# baseline. With --stall K, ranks 1..K are stopped (SIGSTOP) for the middle of the run,
# so what the others hold for a stalled peer shows. Writes a Markdown table.
#   benchmarks/memory.sh [--mb 64] [--ranks "1 2 4 8"] [--out benchmarks/results/memory.md]
set -euo pipefail
cd "$(dirname "$0")/.."
MB=64 RANKS="1 2 4 8" OUT=benchmarks/results/memory.md
while (($#)); do
  case $1 in
    --mb) MB=$2; shift 2 ;;
    --ranks) RANKS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
BIN=build/bin
run() {  # run NPROC STALLED -> "peak_median peak_max threads"
  local n=$1 stall=$2 log
  log=$(mktemp)
  "$BIN/asgd-launch" --nproc "$n" --master-port 0 -- "$BIN/asgd-bench-memory" --mb "$MB" --steps 50 >"$log" 2>&1 &
  local launcher=$!
  if ((stall > 0)); then
    sleep 3
    for ((k = 1; k <= stall; k++)); do
      pid=$(pgrep -f -P "$launcher" asgd-bench-memory | sort -n | sed -n "$((k + 1))p")
      kill -STOP "$pid"
    done
    sleep 3
    for p in $(pgrep -P "$launcher"); do kill -CONT "$p" 2>/dev/null || true; done
  fi
  wait "$launcher"
  grep -q INCOMPLETE "$log" && { cat "$log" >&2; echo "a run did not apply every update" >&2; exit 1; }
  # Ranks that were not stopped: what they held while the others stalled.
  sed -n 's/.*memory rank=\([0-9]*\) .*peak_rss_mb=\([0-9.]*\) threads=\([0-9]*\).*/\1 \2 \3/p' "$log" |
    awk -v s="$stall" '$1 == 0 || $1 > s {print $2, $3}' | sort -n |
    awk '{v[NR] = $1; t = $2} END {printf "%.0f %.0f %d", v[int((NR + 1) / 2)], v[NR], t}'
  rm -f "$log"
}
base=$(run 1 0)
base_peak=${base%% *}
{
  echo "| ranks | stalled peers | peak RSS MB (median, max over ranks) | above 1 rank | in models ($MB MB) | threads per rank |"
  echo "|---:|---:|---:|---:|---:|---:|"
  echo "| 1 | 0 | ${base% *} | 0 | 0 | ${base##* } |"
  for n in $RANKS; do
    [ "$n" = 1 ] && continue
    for stall in 0 $(if [ "$n" -ge 4 ]; then echo 1 2; fi); do
      r=$(run "$n" "$stall")
      read -r med max thr <<<"$r"
      echo "| $n | $stall | $med, $max | $((max - base_peak)) | $(awk -v d=$((max - base_peak)) -v m="$MB" 'BEGIN {printf "%.1f", d / m}') | $thr |"
    done
  done
} | tee "$OUT"
