#!/usr/bin/env bash
# Quick start, command 1: installs what is missing, builds, and runs the demo:
# 4 ranks of DASGD train LibTorch's MNIST example network on the real Fashion-MNIST
# (Debian's dataset-fashion-mnist) for one epoch, with a progress bar, then print
# test accuracy, wall time, samples/s and measured staleness.
# Extra arguments go to asgd-mnist (e.g. --algo asgd-shuffle --straggler 3:2).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
./scripts/build.sh --target asgd-launch asgd-mnist
exec build/bin/asgd-launch --nproc "${NPROC:-4}" --master-port 0 -- \
  build/bin/asgd-mnist --algo dasgd --epochs 1 "$@"
