#!/usr/bin/env bash
# The benchmark suite: runs every suite through asgd-launch, writes one JSON per run under
# OUT/<suite>/, then benchmarks/report.py draws the PNG plots and regenerates the tables
# between the suite markers of benchmarks/README.md.
#
#   benchmarks/run.sh [--quick] [--suites stragglers,by-label,scaling,staleness,lm]
#                     [--repeats N] [--data DIR] [--out DIR] [--readme FILE]
#                     [--seconds S] [--samples N] [--lm-seconds S] [--lm-size "W D H C"]
#
#   --quick     a smaller grid and shorter budgets: under 10 minutes on 2 cores
#   --repeats   runs per configuration (default: 3, --quick: 1); figures are medians
#   --seconds   the wall-clock budget of the straggler suite's runs (default 40, --quick 8);
#               the scaling and staleness runs get a quarter of it (at least 2 s)
#   --samples   the by-label suite's budget of samples (default 60000, --quick 20000)
#   --lm-seconds  the budget of the lm suite's runs (default 120, --quick 40)
#   --lm-size   the lm suite's transformer: width, depth, heads, context (default "128 4 4 64")
#   --data      MNIST-format IDX files (default: Debian's Fashion-MNIST)
#   --out       where the JSON and the plots go (default benchmarks/results)
#   --readme    the file whose tables are regenerated (default benchmarks/README.md)
#
# Needs build/bin (./scripts/build.sh), /usr/bin/python3 with Debian's python3-torch (the
# DDP baseline) and gnuplot (the plots); scripts/deps.sh installs both.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${TORCH_ASGD_BIN:-$ROOT/build/bin}
PY=/usr/bin/python3  # Debian's: python3-torch lives there, whatever python3 is first on PATH
# Named in the tables' header line, quoted so that it can be pasted (with the lm target).
INVOCATION="${TORCH_ASGD_LM_TARGET:+TORCH_ASGD_LM_TARGET=$TORCH_ASGD_LM_TARGET }benchmarks/run.sh$( (($#)) && printf ' %q' "$@" || true)"
QUICK=0 REPEATS="" SECONDS_BUDGET="" SAMPLES_BUDGET="" SUITES="stragglers,by-label,scaling,staleness"
LM_SECONDS="" LM_SIZE="128 4 4 64" LM_DATA=/usr/share/games/fortunes
DATA=/usr/share/datasets/fashion-mnist
OUT=$HERE/results README=$HERE/README.md
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case $1 in
    --quick) QUICK=1; shift ;;
    --repeats|--data|--out|--readme|--suites|--seconds|--samples|--lm-seconds|--lm-size)
      (($# >= 2)) || { echo "run.sh: $1 needs a value (see --help)" >&2; exit 2; }
      case $1 in
        --repeats) REPEATS=$2 ;; --data) DATA=$2 ;; --out) OUT=$2 ;;
        --readme) README=$2 ;; --suites) SUITES=$2 ;; --seconds) SECONDS_BUDGET=$2 ;; --samples) SAMPLES_BUDGET=$2 ;;
        --lm-seconds) LM_SECONDS=$2 ;; --lm-size) LM_SIZE=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -z $REPEATS ]] && REPEATS=$((QUICK ? 1 : 3))
[[ -z $SECONDS_BUDGET ]] && SECONDS_BUDGET=$((QUICK ? 8 : 40))
[[ -z $SAMPLES_BUDGET ]] && SAMPLES_BUDGET=$((QUICK ? 20000 : 60000))
[[ -z $LM_SECONDS ]] && LM_SECONDS=$((QUICK ? 40 : 120))
[[ $LM_SECONDS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --lm-seconds must be a positive integer, not '$LM_SECONDS'" >&2; exit 2; }
read -r LM_W LM_D LM_H LM_C <<<"$LM_SIZE"
[[ "$LM_W $LM_D $LM_H $LM_C" =~ ^[1-9][0-9]*\ [1-9][0-9]*\ [1-9][0-9]*\ [1-9][0-9]*$ ]] ||
  { echo "run.sh: --lm-size must be four positive integers: width depth heads context, not '$LM_SIZE'" >&2; exit 2; }
LM_MODEL=(--width "$LM_W" --depth "$LM_D" --heads "$LM_H" --context "$LM_C")
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --repeats must be a positive integer, not '$REPEATS'" >&2; exit 2; }
[[ $SECONDS_BUDGET =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --seconds must be a positive integer, not '$SECONDS_BUDGET'" >&2; exit 2; }
[[ $SAMPLES_BUDGET =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --samples must be a positive integer, not '$SAMPLES_BUDGET'" >&2; exit 2; }
SHORT=$((SECONDS_BUDGET / 4 > 2 ? SECONDS_BUDGET / 4 : 2))  # the scaling and staleness runs
IFS=', ' read -ra SUITE_LIST <<<"$SUITES"
((${#SUITE_LIST[@]} > 0)) || { echo "run.sh: --suites names no suite" >&2; exit 2; }
for s in "${SUITE_LIST[@]}"; do
  case $s in stragglers|by-label|scaling|staleness|lm) ;; *)
    echo "run.sh: unknown suite '$s' (stragglers, by-label, scaling, staleness, lm)" >&2; exit 2 ;;
  esac
done
SUITES=$(IFS=,; echo "${SUITE_LIST[*]}")
needed=("$BIN/asgd-launch" "$BIN/asgd-mnist")
[[ ,$SUITES, == *,lm,* ]] && needed+=("$BIN/asgd-lm")
for f in "${needed[@]}"; do
  [[ -x $f ]] || { echo "run.sh: $f is missing: build first (./scripts/build.sh) or set TORCH_ASGD_BIN" >&2; exit 1; }
done
[[ -x $PY ]] && "$PY" -c "import torch.distributed" 2>/dev/null ||
  { echo "run.sh: $PY cannot import torch.distributed (the DDP baseline): run ./scripts/deps.sh (python3-torch)" >&2; exit 1; }
command -v gnuplot >/dev/null || { echo "run.sh: gnuplot is missing (the plots): run ./scripts/deps.sh" >&2; exit 1; }
[[ -d $DATA ]] || { echo "run.sh: --data $DATA is not a directory of MNIST-format files" >&2; exit 1; }
[[ ,$SUITES, != *,lm,* || -e $LM_DATA ]] ||
  { echo "run.sh: the lm suite's text, $LM_DATA, is missing: run ./scripts/deps.sh (fortunes)" >&2; exit 1; }
mkdir -p "$OUT"
LOG=$OUT/logs
mkdir -p "$LOG"
TARGET=0.8
LM_TARGET=${TORCH_ASGD_LM_TARGET:-2.2}  # nats per byte: the lm suite's target loss
NRUNS=0

# run SUITE CONFIG NPROC PROGRAM ARGS...: REPEATS runs of one configuration. PROGRAM is
# asgd-mnist, ddp (the MNIST network), asgd-lm or ddp-lm (the transformer); CONFIG names
# the configuration (the file stem); the JSON gets a "bench" object with the suite, the
# configuration, the repeat and the command.
run() {
  local suite=$1 config=$2 n=$3 program=$4
  shift 4
  mkdir -p "$OUT/$suite"
  local k cmd json
  for ((k = 1; k <= REPEATS; k++)); do
    json=$OUT/$suite/$config.r$k.json
    case $program in
      ddp) cmd=("$PY" "$HERE/ddp.py" --data "$DATA") ;;
      ddp-lm) cmd=("$PY" "$HERE/ddp.py" --task lm --data "$LM_DATA") ;;
      asgd-lm) cmd=("$BIN/asgd-lm" --eval-every 0 --data "$LM_DATA") ;;
      *) cmd=("$BIN/asgd-mnist" --eval-every 0 --data "$DATA") ;;
    esac
    cmd+=(--seed "$k" --metrics-out "$json.part" "$@")
    rm -f "$json" "$json.part"
    if ! "$BIN/asgd-launch" --nproc "$n" --master-port 0 --fail-fast -- "${cmd[@]}" \
        >"$LOG/$suite.$config.r$k.log" 2>&1; then
      echo "run.sh: $suite/$config (repeat $k) failed; its log, $LOG/$suite.$config.r$k.log, ends:" >&2
      tail -5 "$LOG/$suite.$config.r$k.log" >&2
      exit 1
    fi
    if [[ ! -s $json.part ]]; then
      echo "run.sh: $suite/$config (repeat $k) exited 0 but wrote no metrics; see $LOG/$suite.$config.r$k.log" >&2
      exit 1
    fi
    "$PY" - "$json.part" "$json" "$suite" "$config" "$k" "$n" "${cmd[@]}" <<'PY'
import json, sys
part, out, suite, config, k, n, *cmd = sys.argv[1:]
m = json.load(open(part))
m["bench"] = {"suite": suite, "config": config, "repeat": int(k), "nproc": int(n), "command": cmd}
json.dump(m, open(out, "w"), indent=1)
PY
    rm -f "$json.part"
    NRUNS=$((NRUNS + 1))
    echo "$suite/$config r$k: $("$PY" -c 'import json,sys; m=json.load(open(sys.argv[1])); print("%.1f %% (loss %.3f) in %.1f s" % (100 * m["test_accuracy"], m.get("test_loss") or float("nan"), m["train_seconds"]))' "$json")" >&2
  done
}

straggler_args() {  # straggler_args FACTOR RANK
  [[ $1 == 1 ]] || echo "--straggler $2:$1"
}

suite_stragglers() {
  # Every algorithm on the same wall-clock budget, evaluated on a clock; rank 1 (the last
  # rank for AsGrad, whose rank 0 is the server) slowed 2x or 4x, or none.
  local ranks=(2 4) factors=(1 2 4) algos=(dasgd gossip sync asgd-shuffle ddp) opts=(sgd adamw)
  ((QUICK)) && ranks=(2) factors=(1 2) opts=(sgd)
  local n f algo opt slow
  for n in "${ranks[@]}"; do
    for f in "${factors[@]}"; do
      for opt in "${opts[@]}"; do
        # AdamW only beside the 2x straggler (the grid is long enough).
        [[ $opt == adamw && $f != 2 ]] && continue
        for algo in "${algos[@]}"; do
          slow=1
          [[ $algo == asgd-* ]] && slow=$((n - 1))
          [[ $algo == asgd-* && $n -lt 2 ]] && continue
          local prog=asgd-mnist a=(--algo "$algo")
          [[ $algo == ddp ]] && prog=ddp a=()
          # shellcheck disable=SC2046
          run stragglers "n${n}_x${f}_${opt}_${algo}" "$n" "$prog" "${a[@]}" --optimizer "$opt" \
            --partition full --budget-seconds "$SECONDS_BUDGET" --eval-every-seconds $((QUICK ? 2 : 4)) \
            --eval-samples 2000 --target-accuracy $TARGET $(straggler_args "$f" "$slow")
        done
      done
    done
  done
}

suite_by_label() {
  # AsGrad's setting: data split by label, one worker 4x slower, equal work (samples over
  # all ranks): pure, random, shuffle, shuffle with the delay-adaptive step, and the
  # decentralized algorithms beside them.
  local n=4 budget=$SAMPLES_BUDGET
  local common=(--partition by-label --budget-samples "$budget" --straggler 3:4
                --eval-every-seconds $((QUICK ? 2 : 3)) --eval-samples 2000)
  local algo
  for algo in asgd-pure asgd-random asgd-shuffle; do
    run by-label "$algo" $n asgd-mnist --algo "$algo" "${common[@]}"
  done
  run by-label asgd-shuffle-delay-adaptive $n asgd-mnist --algo asgd-shuffle --step-rule delay-adaptive "${common[@]}"
  for algo in dasgd gossip sync; do
    run by-label "$algo" $n asgd-mnist --algo "$algo" "${common[@]}"
  done
}

suite_scaling() {
  # Aggregate samples/s against ranks; local: the same processes, no communication.
  local ranks=(1 2 4 8) seconds=$SHORT n algo
  ((QUICK)) && ranks=(1 2)
  for n in "${ranks[@]}"; do
    for algo in local dasgd gossip sync; do
      run scaling "${algo}_n${n}" "$n" asgd-mnist --algo "$algo" --partition full --budget-seconds "$seconds"
    done
  done
}

suite_staleness() {
  # Measured staleness against broadcast_every and the straggler factor; 4 ranks.
  local every=(1 4 16) factors=(1 2 4) seconds=$SHORT b f
  ((QUICK)) && every=(1 4) factors=(1 4)
  for f in "${factors[@]}"; do
    for b in "${every[@]}"; do
      run staleness "dasgd_b${b}_x${f}" 4 asgd-mnist --algo dasgd --broadcast-every "$b" \
        --partition full --budget-seconds "$seconds" $(straggler_args "$f" 3)
    done
    run staleness "asgd-pure_x${f}" 4 asgd-mnist --algo asgd-pure --partition full \
      --budget-seconds "$seconds" $(straggler_args "$f" 3)
  done
}

suite_lm() {
  # The transformer on real text (Debian's fortunes), every algorithm and DDP on the same
  # wall-clock budget, no straggler or rank 1 (AsGrad: the last worker) 2x slower; the
  # held-out loss on a clock, with the copies evaluated after training (no rank pauses;
  # DDP pauses, its pause excluded from its times). DASGD takes DDP's averaged step.
  local ranks=(2 4) factors=(1 2) algos=(local sync dasgd gossip asgd-shuffle ddp)
  ((QUICK)) && ranks=(2)
  local n f algo slow
  for n in "${ranks[@]}"; do
    for f in "${factors[@]}"; do
      for algo in "${algos[@]}"; do
        slow=1
        [[ $algo == asgd-* ]] && slow=$((n - 1))
        local prog=asgd-lm a=(--algo "$algo" --eval-deferred)
        [[ $algo == ddp ]] && prog=ddp-lm a=()
        [[ $algo == dasgd ]] && a+=(--average)
        # shellcheck disable=SC2046
        run lm "n${n}_x${f}_adamw_${algo}" "$n" "$prog" "${a[@]}" "${LM_MODEL[@]}" --partition full \
          --budget-seconds "$LM_SECONDS" --eval-every-seconds $((LM_SECONDS / 12 > 1 ? LM_SECONDS / 12 : 1)) \
          --target-loss "$LM_TARGET" $(straggler_args "$f" "$slow")
      done
    done
  done
}

start=$(date +%s)
for s in "${SUITE_LIST[@]}"; do
  rm -rf "${OUT:?}/$s"
  "suite_${s//-/_}"
done
echo "run.sh: $NRUNS runs in $(($(date +%s) - start)) s" >&2
"$PY" "$HERE/report.py" --results "$OUT" --readme "$README" --suites "$SUITES" \
  --note "$INVOCATION on $(nproc) cores, $(date -u +%Y-%m-%d), median of $REPEATS run(s) per configuration (min-max in brackets)"
