#!/usr/bin/env bash
# The GPU check: one call on a bare GPU machine (Python's torch wheel with CUDA at
# python3, CMake, no package registry), within 8 minutes on 16 cores. It builds what it
# needs against the wheel's LibTorch with torch_asgd's own Gloo, checks that Gloo stays
# private in a process that also holds LibTorch's, runs the GPU test (and fails if it
# skips), trains DASGD on cuda with and without --overlap, and times local, DASGD and
# DASGD with overlap interleaved. Writes results.md and the logs into OUT_DIR.
#
#   ./scripts/gpu-bundle.sh            # first, here (Debian, after scripts/deps.sh)
#   ./scripts/gpu-check.sh OUT_DIR     # then on the GPU machine, .gpu-bundle/ carried along
#
# --cpu: the same path with Debian's LibTorch (TORCH_PREFIX, default /usr) on a machine
# without a GPU: the build, the isolation checks and the trainings run on the CPU, and
# the GPU test must skip. Run it before taking the script to a GPU.
# --rounds N: rounds of the interleaved timing (default 3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CPU_ONLY=0 ROUNDS=3
while [[ ${1:-} == --* ]]; do
  case $1 in
    --cpu) CPU_ONLY=1; shift ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
  esac
done
OUT=$(mkdir -p "${1:-${OUT:-gpu-out}}" && cd "${1:-${OUT:-gpu-out}}" && pwd)
B=$ROOT/.gpu-bundle
BUILD=${GPU_CHECK_BUILD_DIR:-$ROOT/build-gpu}
JOBS=${GPU_CHECK_JOBS:-$(nproc)}
R=$OUT/results.md
[[ -d $B ]] || { echo "gpu-check: $B is missing: run ./scripts/gpu-bundle.sh on a Debian machine and carry .gpu-bundle/" >&2; exit 2; }
say() { echo "$*" | tee -a "$R"; }
failures=0
fail() { say "- **FAILED**: $*"; failures=$((failures + 1)); }
: > "$R"
t_start=$(date +%s)
DEV=cuda; ((CPU_ONLY)) && DEV=cpu

# ---- 1. The environment ---------------------------------------------------------------
if ((CPU_ONLY)); then
  TORCH_PREFIX=${TORCH_PREFIX:-/usr}
  TORCH_LIB=$(ls "$TORCH_PREFIX"/lib/x86_64-linux-gnu/libtorch_cpu.so "$TORCH_PREFIX"/lib/libtorch_cpu.so 2>/dev/null | head -1)
  CMAKE_PREFIX=$TORCH_PREFIX
  say "## GPU check --cpu, $(date -u '+%F %H:%M') UTC"
  say ""
  say "- LibTorch: Debian's ($TORCH_LIB)"
else
  TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))') ||
    { echo "gpu-check: python3 has no torch" >&2; exit 2; }
  CMAKE_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  TORCH_LIB=$TORCH_DIR/lib/libtorch_cpu.so
  say "## GPU check, $(date -u '+%F %H:%M') UTC"
  say ""
  say "- torch $(python3 -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())')"
  say "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  say "- LibTorch: the wheel's ($TORCH_LIB)"
fi
say "- machine: $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/{print $2}') GiB, $(uname -r); $(cmake --version | head -1); $(${CXX:-c++} --version | head -1)"
say "- Gloo inside that LibTorch: $(nm -DC --defined-only "$TORCH_LIB" 2>/dev/null | grep -c ' gloo::') exported gloo:: symbols$( [[ -f ${TORCH_LIB%/*}/libgloo.so.0 || -n $(ldd "$TORCH_LIB" 2>/dev/null | grep -i gloo) ]] && echo ", and it needs $(ldd "$TORCH_LIB" | grep -io 'libgloo[^ ]*' | head -1)")"

# ---- 2. GoogleTest, configure, build what the check needs ------------------------------
GT=$B/prefix
if [[ ! -f $GT/lib/cmake/GTest/GTestConfig.cmake ]]; then
  cmake -S "$B/src/googletest" -B "$B/build-gtest" -DCMAKE_INSTALL_PREFIX="$GT" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON >"$OUT/gtest.log" 2>&1 &&
    cmake --build "$B/build-gtest" -j "$JOBS" --target install >>"$OUT/gtest.log" 2>&1 ||
    { fail "building GoogleTest (gtest.log)"; exit 1; }
fi
GEN=(); command -v ninja >/dev/null && [[ ! -f $BUILD/CMakeCache.txt ]] && GEN=(-G Ninja)
configure=(cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_PREFIX_PATH="$GT;$B/cmake;$CMAKE_PREFIX" -DTORCH_ASGD_GLOO_SOURCE="$B/gloo.tar.xz"
  -DZLIB_ROOT="$B" -DZLIB_USE_STATIC_LIBS=ON -DCMAKE_CXX_FLAGS="-isystem $B/include"
  -DTORCH_ASGD_BUILD_BENCHMARKS=OFF -DTORCH_ASGD_USE_CCACHE=OFF)
say "- configure: \`${configure[*]}\`"
t0=$(date +%s)
"${configure[@]}" >"$OUT/configure.log" 2>&1 || { fail "configure (configure.log)"; tail -20 "$OUT/configure.log"; exit 1; }
grep -E "torch_asgd: |Gloo build" "$OUT/configure.log" | sed 's/^-- /  - /' | tee -a "$R"
TARGETS=(torch_asgd dasgd_test channel_test sync_sgd_test gloo_trap gloo_trap_probe asgd-launch asgd-mnist asgd-cifar)
cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}" >"$OUT/build.log" 2>&1 ||
  { fail "build (build.log)"; grep -m5 -A5 "error" "$OUT/build.log"; exit 1; }
say "- build of ${TARGETS[*]}: $(( $(date +%s) - t0 )) s with $JOBS jobs"
BIN=$BUILD/bin
LIB=$(ls "$BUILD"/lib/libtorch_asgd.so | head -1)

# ---- 3. Gloo stays private -------------------------------------------------------------
say ""
say "### Gloo isolation"
if out=$("$ROOT/tests/isolation/check_symbols.sh" "$LIB" 2>&1); then say "- $out"; else fail "$out"; fi
TRAP=$(ls "$BUILD"/lib/libgloo_trap.so "$BUILD"/tests/libgloo_trap.so 2>/dev/null | head -1)
probe=$( (LD_PRELOAD=$TRAP "$BIN/gloo_trap_probe") 2>&1)
if grep -q 'gloo_trap: gloo::transport::tcp::CreateDevice' <<<"$probe"; then
  say "- the trap (a library whose Gloo entry points abort, preloaded below) aborts when called"
else
  fail "the preloaded trap did not abort the probe's call: the checks below would prove nothing"
fi
for t in "channel_test Channel.TensOfMegabytesArriveIntact:Channel.AdditiveMessagesCoalesceWithoutLoss" \
         "dasgd_test Checkpoint.RanksResumedFromCheckpointsOfDifferentMomentsAgreeAgain:DASGD.MismatchedModelsAreRefusedOnEveryRank" \
         "sync_sgd_test *SyncSGDRanks.*:*CompressedSync.*"; do
  read -r exe filter <<<"$t"
  if LD_PRELOAD=$TRAP "$BIN/$exe" --gtest_filter="$filter" >"$OUT/preloaded-$exe.log" 2>&1; then
    say "- with the trap preloaded, $exe ($filter): $(grep -E '^\[  PASSED' "$OUT/preloaded-$exe.log")"
  else
    fail "with the trap preloaded, $exe ($filter) failed (preloaded-$exe.log): $(grep -m1 'gloo_trap:' "$OUT/preloaded-$exe.log")"
  fi
done

# ---- 4. The GPU test ---------------------------------------------------------------------
say ""
say "### Tests"
export TORCH_ASGD_FASHION_MNIST=$B/fashion-mnist
"$BIN/dasgd_test" --gtest_filter='DASGDOnTheGpu.*' >"$OUT/gpu_test.log" 2>&1
verdict=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/gpu_test.log" | tr '\n' ' ')
if ((CPU_ONLY)); then
  grep -q '^\[  SKIPPED' "$OUT/gpu_test.log" && say "- DASGDOnTheGpu (no GPU here): $verdict" ||
    fail "DASGDOnTheGpu did not skip without a GPU: $verdict"
elif grep -q '^\[  SKIPPED' "$OUT/gpu_test.log" || ! grep -q '^\[  PASSED  \] 1 test' "$OUT/gpu_test.log"; then
  fail "DASGDOnTheGpu did not pass on the GPU: $verdict (gpu_test.log)"
else
  say "- DASGDOnTheGpu: $verdict"
fi

# ---- 5. DASGD on the device, with and without --overlap ---------------------------------
py() { python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print($1)" "$2" 2>/dev/null; }
say ""
say "### DASGD on $DEV, Fashion-MNIST, 2 ranks sharing the device, 20 s budget"
say ""
say "| run | test accuracy | samples/s (aggregate) | overlap asked / active | device |"
say "|---|---:|---:|---|---|"
for v in "dasgd" "dasgd --overlap"; do
  tag=${v// /}
  j=$OUT/mnist-$tag.json
  timeout 120 "$BIN/asgd-launch" --nproc 2 --master-port 0 -- "$BIN/asgd-mnist" \
    --data "$B/fashion-mnist" --algo $v --budget-seconds 20 --batch-size 64 --lr 0.05 --device $DEV \
    --threads 4 --eval-every 0 --warmup-steps 20 --metrics-out "$j" >"$OUT/mnist-$tag.log" 2>&1 ||
    fail "asgd-mnist --algo $v (mnist-$tag.log)"
  row=$(py "round(m['test_accuracy'],4), '|', round(m['aggregate_samples_per_second']), '|', m['overlap']['asked'], '/', m['overlap']['active'], '|', m['device']" "$j")
  say "| $v | ${row:-no metrics (mnist-$tag.log) | | |} |"
  if [[ $v == *overlap* && $CPU_ONLY == 0 && $row != *"True / True"* ]]; then fail "--overlap was not active on the GPU"; fi
done

# ---- 6. Interleaved timing: local, DASGD, DASGD with overlap ----------------------------
say ""
say "### ResNet-20, synthetic CIFAR, 2 ranks on $DEV: ms per step of rank 0, after 20 warm-up steps"
images=12800; ((CPU_ONLY)) && images=1280
declare -A ms
for ((round = 1; round <= ROUNDS; ++round)); do
  for v in "local" "dasgd" "dasgd --overlap"; do
    tag=${v// /}
    j=$OUT/cifar-$tag-$round.json
    timeout 180 "$BIN/asgd-launch" --nproc 2 --master-port 0 -- "$BIN/asgd-cifar" \
      --synthetic $images --algo $v --epochs 1 --batch-size 64 --device $DEV --eval-every 0 \
      --warmup-steps 20 --threads 4 --metrics-out "$j" >"$OUT/cifar-$tag-$round.log" 2>&1 ||
      fail "asgd-cifar --algo $v, round $round (cifar-$tag-$round.log)"
    ms[$tag]+="$(py "round(1000 * 64 / m['samples_per_second'][0], 3)" "$j") "
  done
done
say ""
say "| run | ms per step, each round | median | vs local |"
say "|---|---|---:|---:|"
median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(round(statistics.median(v),3) if v else '')" $1; }
local_med=$(median "${ms[local]}")
for tag in local dasgd dasgd--overlap; do
  med=$(median "${ms[$tag]}")
  ratio=$([[ -n $med && -n $local_med ]] && python3 -c "print(round($med/$local_med,3))")
  say "| ${tag/--/ --} | ${ms[$tag]}| $med | $ratio |"
done
((CPU_ONLY)) || nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv >"$OUT/nvidia-smi.csv" 2>&1
say ""
say "total $(( $(date +%s) - t_start )) s, $failures failure(s)"
((failures == 0))
