#!/usr/bin/env bash
# The GPU check (issue 17), for a bare GPU machine: Python's torch wheel (with CUDA) at
# python3, nvcc, CMake, no package registry. Builds torch_asgd, its tests and examples
# against the wheel's LibTorch, runs the test suite (the GPU tests run, not skip), then
# the GPU measurements, and writes results.md and logs into OUT_DIR.
#
#   ./scripts/gpu-bundle.sh            # first, on a Debian machine with scripts/deps.sh done
#   ./scripts/gpu-check.sh OUT_DIR     # then on the GPU machine, .gpu-bundle/ carried along
#
# --cpu: the same configure path (bundle, given LibTorch prefix, given Gloo headers) with
# whatever LibTorch TORCH_PREFIX names (default: Debian's), GPU steps skipped: how the
# CPU half of this script is checked on a machine without a GPU.
#
# --quick: for a short lease: ctest runs the channel, codec, wire and optimizer suites
# (not the slow process tests), and the trainings are 20 s budgets of local, sync and
# dasgd (not a full epoch of every algorithm). --stages LIST (default
# build,test,mnist,cifar) runs only those parts; a build directory left by an earlier
# call is reused.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CPU_ONLY=0 QUICK=0 STAGES=build,test,mnist,cifar
while [[ ${1:-} == --* ]]; do
  case $1 in
    --cpu) CPU_ONLY=1; shift ;;
    --quick) QUICK=1; shift ;;
    --stages) STAGES=$2; shift 2 ;;
    *) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
  esac
done
stage() { [[ ,$STAGES, == *,$1,* ]]; }
OUT=$(mkdir -p "${1:-${OUT:-gpu-out}}" && cd "${1:-${OUT:-gpu-out}}" && pwd)
B=$ROOT/.gpu-bundle
BUILD=${GPU_CHECK_BUILD_DIR:-$ROOT/build-gpu}
JOBS=${GPU_CHECK_JOBS:-$(nproc)}
R=$OUT/results.md
[[ -d $B ]] || { echo "gpu-check: $B is missing: run ./scripts/gpu-bundle.sh on a Debian machine and carry .gpu-bundle/" >&2; exit 2; }
say() { echo "$*" | tee -a "$R"; }
: > "$R"
say "(stages $STAGES$( ((QUICK)) && echo ', quick'))"
t_start=$(date +%s)

# ---- 1. Which LibTorch, and how Gloo is provided ------------------------------------
if [[ $CPU_ONLY == 1 ]]; then
  TORCH_PREFIX=${TORCH_PREFIX:-/usr}
  TORCH_LIB=$(ls "$TORCH_PREFIX"/lib/x86_64-linux-gnu/libtorch_cpu.so "$TORCH_PREFIX"/lib/libtorch_cpu.so 2>/dev/null | head -1)
  TORCH_INCLUDE=$TORCH_PREFIX/include
  CMAKE_PREFIX=$TORCH_PREFIX
else
  TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))') || { echo "gpu-check: python3 has no torch" >&2; exit 2; }
  CMAKE_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  TORCH_LIB=$TORCH_DIR/lib/libtorch_cpu.so
  TORCH_INCLUDE=$TORCH_DIR/include
  say "## GPU check, $(date -u +%F)"
  say ""
  say "- torch $(python3 -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())')"
  say "- GPU: $(nvidia-smi -L 2>/dev/null | head -1)"
  say "- nvcc: $(nvcc --version 2>/dev/null | tail -1)"
fi
gloo_defined=$(nm -DC --defined-only "$TORCH_LIB" 2>/dev/null | grep -c ' gloo::' || true)
if [[ -n ${GLOO_INCLUDE:-} ]]; then
  gloo_headers="given: $GLOO_INCLUDE"
elif [[ $CPU_ONLY == 0 && -f $TORCH_INCLUDE/gloo/context.h ]]; then
  GLOO_INCLUDE=$TORCH_INCLUDE; gloo_headers="the LibTorch's own ($TORCH_INCLUDE/gloo)"
else
  GLOO_INCLUDE=$B/gloo-include; gloo_headers="none in the LibTorch: Debian's libgloo-dev headers from the bundle (Gloo 0.5.0, git 2022-05-18)"
fi
if (( gloo_defined > 0 )); then
  GLOO_FROM_TORCH=ON
  gloo_way="Gloo's code is the LibTorch's ($gloo_defined gloo:: symbols defined in $(basename "$TORCH_LIB")): libtorch_asgd links no Gloo of its own (TORCH_ASGD_GLOO_FROM_TORCH=ON), so one Gloo serves every call"
else
  GLOO_FROM_TORCH=OFF
  gloo_way="$(basename "$TORCH_LIB") defines no Gloo symbols: libtorch_asgd links the system libgloo"
fi
say "- LibTorch: $TORCH_LIB"
say "- Gloo headers: $gloo_headers"
say "- Gloo code: $gloo_way"
if [[ $GLOO_INCLUDE == "$B/gloo-include" && $GLOO_FROM_TORCH == ON ]]; then
  say "- WARNING: headers of one Gloo version compiled against another's code: a layout difference would crash; the channel tests below are the check"
fi

# ---- 2. GoogleTest from source, then configure and build ----------------------------
GT=$B/prefix
if [[ ! -f $GT/lib/cmake/GTest/GTestConfig.cmake ]]; then
  cmake -S "$B/src/googletest" -B "$B/build-gtest" -DCMAKE_INSTALL_PREFIX="$GT" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON >"$OUT/gtest.log" 2>&1 &&
    cmake --build "$B/build-gtest" -j "$JOBS" --target install >>"$OUT/gtest.log" 2>&1 ||
    { say "- FAILED: building GoogleTest (gtest.log)"; exit 1; }
fi
if stage build; then
t0=$(date +%s)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$GT;$B/cmake;$CMAKE_PREFIX" \
  -DGloo_INCLUDE_DIR="$GLOO_INCLUDE" -DTORCH_ASGD_GLOO_FROM_TORCH=$GLOO_FROM_TORCH \
  -DZLIB_ROOT="$B" -DZLIB_USE_STATIC_LIBS=ON -DCMAKE_CXX_FLAGS="-isystem $B/include" \
  -DTORCH_ASGD_BUILD_BENCHMARKS=OFF -DTORCH_ASGD_USE_CCACHE=OFF >"$OUT/configure.log" 2>&1 ||
  { say "- FAILED: configure (configure.log)"; tail -20 "$OUT/configure.log"; exit 1; }
cmake --build "$BUILD" -j "$JOBS" >"$OUT/build.log" 2>&1 ||
  { say "- FAILED: build (build.log)"; grep -m5 -A5 "error" "$OUT/build.log"; exit 1; }
say "- configure + build: $(( $(date +%s) - t0 )) s with $JOBS jobs"
lib=$(ls "$BUILD"/lib/libtorch_asgd.so* | head -1)
say "- libtorch_asgd: $(nm -DC --defined-only "$lib" | grep -c ' gloo::') gloo:: symbols defined, NEEDED: $(readelf -d "$lib" | grep NEEDED | grep -o '\[.*\]' | tr '\n' ' ')"
fi

# ---- 3. The test suite (GPU tests run here, skip without a device) ------------------
export TORCH_ASGD_FASHION_MNIST=$B/fashion-mnist
if stage test; then
t0=$(date +%s)
subset=()
((QUICK)) && subset=(-R '^(Channel|Codec|Wire|Metadata|Fingerprint|LockStep|ScriptedSchedule|DASGD|Measures|BoundedLead|Gossip|SyncSGD|Rules|LocalRule|exchange_demo)')
(cd "$BUILD" && ctest -j "${GPU_CHECK_TEST_JOBS:-8}" --timeout 600 --output-on-failure "${subset[@]}") >"$OUT/ctest.log" 2>&1
say "- ctest${subset:+ (quick subset)}: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1) in $(( $(date +%s) - t0 )) s"
grep -E '\*\*\*Failed|Not Run|Timeout' "$OUT/ctest.log" | sed 's/^/  - /' | tee -a "$R"
"$BUILD/bin/dasgd_test" --gtest_filter='DASGDOnTheGpu.*' >"$OUT/gpu_test.log" 2>&1
say "- DASGDOnTheGpu: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/gpu_test.log" | tr '\n' ' ')"
fi
[[ $CPU_ONLY == 1 ]] && { say "- (--cpu: GPU measurements skipped) total $(( $(date +%s) - t_start )) s"; exit 0; }

# ---- 4. Every optimizer on Fashion-MNIST, 2 ranks sharing the GPU, cuda vs cpu ------
if stage mnist; then
say ""
algos="local sync dasgd gossip asgd-shuffle"
length=(--epochs 1)
((QUICK)) && { algos="local sync dasgd"; length=(--budget-seconds 20); }
say "| algo | device | accuracy | samples/s | wall s |"
say "|---|---|---:|---:|---:|"
for algo in $algos; do
  for dev in cuda cpu; do
    n=2; [[ $algo == asgd-* ]] && n=3
    j=$OUT/mnist-$algo-$dev.json
    timeout 300 "$BUILD/bin/asgd-launch" --nproc $n --master-port 0 -- "$BUILD/bin/asgd-mnist" \
      --data "$B/fashion-mnist" --algo $algo "${length[@]}" --batch-size 32 --lr 0.05 --device $dev \
      --threads 4 --eval-every 0 --metrics-out "$j" >"$OUT/mnist-$algo-$dev.log" 2>&1
    say "| $algo | $dev | $(python3 -c "import json;m=json.load(open('$j'));print(round(m['test_accuracy'],4),'|',round(m['aggregate_samples_per_second']),'|',round(m['wall_seconds'],1))" 2>/dev/null || echo "failed (mnist-$algo-$dev.log) | | ")"
  done
done

fi

# ---- 5. ResNet-20 on synthetic CIFAR: per-step time, overlap vs sync vs local -------
if stage cifar; then
images=4000 epochs=2
((QUICK)) && { images=2000; epochs=1; }
say ""
say "| resnet-20, 2 ranks on one GPU | per-step ms (rank 0) | vs local |"
say "|---|---:|---:|"
local_ms=""
for v in "local" "sync" "dasgd" "dasgd --overlap"; do
  tag=${v// /}
  j=$OUT/cifar-$tag.json
  timeout 300 "$BUILD/bin/asgd-launch" --nproc 2 --master-port 0 -- "$BUILD/bin/asgd-cifar" \
    --synthetic $images --algo $v --epochs $epochs --batch-size 64 --device cuda --eval-every 0 \
    --metrics-out "$j" >"$OUT/cifar-$tag.log" 2>&1
  ms=$(python3 -c "import json;m=json.load(open('$j'));print(round(1000*64/m['samples_per_second'][0],2))" 2>/dev/null || echo "")
  [[ $v == local ]] && local_ms=$ms
  ratio=$([[ -n $ms && -n $local_ms ]] && python3 -c "print(round($ms/$local_ms,3))" || echo "")
  say "| $v | ${ms:-failed (cifar-$tag.log)} | $ratio |"
done
fi
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv >"$OUT/nvidia-smi.csv" 2>&1
say ""
say "total $(( $(date +%s) - t_start )) s"
