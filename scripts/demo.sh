#!/usr/bin/env bash
# Quick start, command 1: installs what is missing, builds, and runs the demo.
# Until the MNIST example lands, the demo is the smallest end-to-end exchange:
# 4 ranks exchange additive updates with no barrier and end with equal replicas.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
./scripts/build.sh --target asgd-launch asgd-exchange-demo
exec build/bin/asgd-launch --nproc "${NPROC:-4}" --master-port 0 -- build/bin/asgd-exchange-demo "$@"
