#!/usr/bin/env bash
# The CUDA path end to end (bf16, KV over UCX, replication, a kill and resume, bench.serve) in
# under 5 minutes on a GPU machine; `--allow-cpu` runs the same checks on a CPU. What it checks,
# the options and the exit codes: scripts/gpu_check.py (or `scripts/gpu_check.sh --help`).
#
#   scripts/gpu_check.sh [--allow-cpu] [--model smollm2|PATH] [--dtype bfloat16] [--kv-transport ucx|tcp] [--out DIR]
#
# This wrapper only picks the Python (.venv/bin/python if there is one, else python3) and passes
# the arguments through. It installs nothing: the script checks its imports and says what is missing.
#
# On a lent device machine (the session's `run` tool), which has no network, no .venv and no
# bundled model: `scripts/gpu_bundle.sh` here packs what it lacks (wheels, redis-server, SmolLM2's
# tokenizer and config) into .whl/ and .carry/, then `scripts/gpu_device_run.sh` there (carry
# [".whl", ".carry"]) runs this check on a random model of SmolLM2's architecture, over UCX, and
# bench.swap after it. It passed on an H200 on 2026-12-04 (docs/BENCHMARKS.md, "The CUDA path").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="python3"
if [ -x "$here/.venv/bin/python" ]; then
  python="$here/.venv/bin/python"
fi
exec "$python" "$here/scripts/gpu_check.py" "$@"
