#!/usr/bin/env bash
# Installs the Debian 12 packages torch_asgd needs to build, test and run its demo.
# Idempotent: installs only what is missing; uses sudo only when not root.
# This is the one list of system dependencies; demo.sh and test.sh call it.
set -euo pipefail

PACKAGES=(
  build-essential cmake ccache pkg-config zlib1g-dev
  libtorch-dev          # LibTorch 1.13 (CPU), with c10d built against the system Gloo
  libfmt-dev
  libxxhash-dev         # XXH3: header and payload checksums of the wire format
  libcli11-dev          # the examples' command lines
  nlohmann-json3-dev    # the examples' metrics JSON
  libgtest-dev libgmock-dev
  libbenchmark-dev
  clang libclang-rt-14-dev  # libFuzzer, for the message decoder's fuzz test
  dataset-fashion-mnist # the real Fashion-MNIST in IDX format, for the examples and the demo
  fortunes              # ~2.6 MB of real English text (/usr/share/games/fortunes): asgd-lm's data
  python3-torch         # PyTorch 1.13 (/usr/bin/python3): the DDP baseline of benchmarks/run.sh
  gnuplot-nox           # the benchmark plots (PNG)
  iproute2              # ip and tc: emulated hosts in network namespaces (scripts/emulate-hosts.sh)
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "deps.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi

echo "deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
