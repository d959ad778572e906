#!/usr/bin/env bash
# llama-cpp-python's OpenAI server, a peer in benchmarks/peers.py, built from source into
# .venv with AMX off (its AMX kernels crash decoding on Intel AMX hosts) and AVX-512 only
# where this CPU has it (AVX-512 code dies with SIGILL on AVX2-only hosts).
#
#   scripts/llama_cpp.sh install     g++ via apt-get when no C++ compiler is on PATH, then pip
set -euo pipefail

die() { echo "llama_cpp.sh: $*" >&2; exit 1; }
# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACKAGE="llama-cpp-python[server]==0.3.36"

cmd_install() {
  command -v c++ >/dev/null 2>&1 || apt_install "a C++ compiler" g++ g++
  local avx512=OFF
  grep -q -m1 avx512f /proc/cpuinfo 2>/dev/null && avx512=ON
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=$avx512 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$ROOT/.venv/bin/python" -m pip install -q "$PACKAGE"
}

case "${1:-}" in
  install) cmd_install ;;
  *) die "usage: scripts/llama_cpp.sh install" ;;
esac
