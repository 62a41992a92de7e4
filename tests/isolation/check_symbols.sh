#!/usr/bin/env bash
# libtorch_asgd.so neither exports nor imports a Gloo symbol, and needs no Gloo library:
# its Gloo is private (cmake/Gloo.cmake). usage: check_symbols.sh LIBRARY
set -euo pipefail
lib=$1
defined=$(nm -DC --defined-only "$lib" | grep -c 'gloo::' || true)
undefined=$(nm -DC --undefined-only "$lib" | grep -c 'gloo::' || true)
needed=$(readelf -d "$lib" | grep NEEDED | grep -ci gloo || true)
echo "$lib: $defined defined and $undefined undefined dynamic symbols naming gloo::, $needed Gloo libraries needed"
if (( defined + undefined + needed > 0 )); then
  nm -DC "$lib" | grep 'gloo::' | head -20
  readelf -d "$lib" | grep NEEDED | grep -i gloo || true
  echo "FAILED: torch_asgd's Gloo is not private: another Gloo in the process could take its calls, or it theirs"
  exit 1
fi
