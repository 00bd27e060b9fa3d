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
# On a lent device machine (the session's `run` tool): `run` copies the working tree (tracked and
# untracked-not-ignored files, at most 64 MiB) and nothing else. The machine has NO network, no
# .venv (git-ignored; 1.7 GB anyway) and no ~/.cache/dejavu. Its python3 (3.12, torch with CUDA,
# transformers, httpx, numpy, safetensors, prometheus-client) lacked, by the package list of
# /work/.library/device/KINDS.md, fastapi, starlette, uvicorn, pydantic (+ pydantic-core,
# annotated-types, typing-inspection), redis (the client) and ucxx; expect no redis-server binary
# either. A first run with nothing carried costs seconds: it exits 2 naming each missing import
# and the error it gave. So, here first:
#   1. the model: the bundled SmolLM2 cannot travel (94 MB GGUF, 270 MB in bf16), so write a tiny
#      random Llama with its tokenizer (~16 MB) into an ignored folder and carry it:
#        scripts/gpu_check.sh --save-tiny-model gpu_check_model
#   2. the missing packages as cp312 wheels in .whl/ (see /work/.library/device/README.md, which
#      gives the `pip download --platform ...` line), and redis-server with the libraries it needs
#      beyond libc (`ldd $(which redis-server)`) in .carry/bin and .carry/lib (both folders ignored
#      through .git/info/exclude: `echo /.whl/ >>.git/info/exclude; echo /.carry/ >>.git/info/exclude`).
#      ucxx needs librmm, libucx and libucxx (well over 64 MiB): without it use --kv-transport tcp.
# Then, with carry ["gpu_check_model", ".whl", ".carry"] and timeout_s 420:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site PATH=$PWD/.carry/bin:$PATH LD_LIBRARY_PATH=$PWD/.carry/lib PYTHONUNBUFFERED=1 &&
#   scripts/gpu_check.sh --model gpu_check_model --out $OUT
# $OUT/summary.json, serve.json and serve.log come back. Exit 0: every check passed; 1: one
# failed; 2: it cannot run there (the message says what is missing); 130: interrupted.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="python3"
if [ -x "$here/.venv/bin/python" ]; then
  python="$here/.venv/bin/python"
fi
exec "$python" "$here/scripts/gpu_check.py" "$@"
