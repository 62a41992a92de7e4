#!/usr/bin/env bash
# Quick start, command 1: installs what is missing, builds, and runs the short example
# (examples/mnist/train.cc): 4 ranks of DASGD train LibTorch's MNIST example network on
# the real Fashion-MNIST (Debian's dataset-fashion-mnist, unpacked into
# build/fashion-mnist) for one epoch, then every rank prints its test accuracy and its
# statistics. Extra arguments go to the example (the data directory, the epochs).
# The benchmark harness with every algorithm and option is asgd-mnist (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
./scripts/build.sh --target asgd-launch asgd-example-mnist
DATA=build/fashion-mnist
if [[ ! -f $DATA/t10k-labels-idx1-ubyte ]]; then
  mkdir -p "$DATA"
  for f in /usr/share/datasets/fashion-mnist/*.gz; do gunzip -c "$f" > "$DATA/$(basename "${f%.gz}")"; done
fi
if (($# == 0)); then set -- "$DATA"; fi
exec build/bin/asgd-launch --nproc "${NPROC:-4}" --master-port 0 -- build/bin/asgd-example-mnist "$@"
