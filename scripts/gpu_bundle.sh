#!/usr/bin/env bash
# Packs what a bare CUDA machine lacks for scripts/gpu_check.sh, so that it can travel with the
# working tree (a lent device machine: no network, no .venv, no bundled model; 64 MiB in all).
#
#   scripts/gpu_bundle.sh        # here, once: writes .whl/ (~57 MB) and .carry/ (~4 MB), both git-ignored
#
# then, on the device machine, with carry [".whl", ".carry"] (about 7 minutes of device time):
#   set -o pipefail; bash scripts/gpu_device_run.sh 2>&1 | tee $OUT/run.log
#
# What goes in (measured on 2026-12-04 against an H200 image with Python 3.12, torch 2.11+cu130 and
# transformers 5.17, which lacked the rest):
# - .whl/: cp312 wheels of fastapi (and opentelemetry-api, which fastapi >= 0.16x imports), starlette,
#   uvicorn, pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions),
#   annotated-doc, anyio, redis (the client), zlib-ng, and ucxx-cu12 with libucxx, libucx, librmm and
#   rapids-logger (rmm's Python package is not needed to import ucxx), and pytest (with pluggy,
#   iniconfig, packaging, pygments) for tests/unit/test_graphs.py. The versions are this
#   checkout's .venv's, so the device runs what CI tests.
# - .carry/bin/redis-server: this machine's redis-server with the libraries the image lacks
#   (libjemalloc, liblzf, libatomic) on its own library path.
# - .carry/model: SmolLM2's tokenizer files (tokenizer.json xz-compressed) and .carry/like its
#   config.json: the device writes a random model of SmolLM2's architecture (135M parameters) there,
#   since the bundled weights (94 MB GGUF) do not fit beside the wheels.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "gpu_bundle: run scripts/install.sh first (the wheels' versions are .venv's)" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "gpu_bundle: no redis-server here (apt-get install redis-server)" >&2; exit 2; }
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.carry/; do
  grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done
rm -rf .whl .carry && mkdir -p .whl .carry/bin .carry/lib .carry/model .carry/like

packages="fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing-extensions
  annotated-doc anyio redis zlib-ng opentelemetry-api ucxx-cu12 libucxx-cu12 libucx-cu12 librmm-cu12 rapids-logger
  pytest pluggy iniconfig packaging pygments"
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_34; do
  platforms+=(--platform "${tag}_x86_64")
done
for name in $packages; do
  version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  echo "gpu_bundle: $name==$version"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "$name==$version" 2> >(grep -v "^WARNING: Location" >&2)
done

redis=$(readlink -f "$(command -v redis-server)")
cp "$redis" .carry/bin/redis-server.bin
for lib in libjemalloc.so.2 liblzf.so.1 libatomic.so.1; do
  found=$(ldd "$redis" | awk -v l="$lib" '$1 == l && $3 ~ /^\// {print $3}')
  [ -n "$found" ] && cp -L "$found" .carry/lib/
done
cat >.carry/bin/redis-server <<'EOF'
#!/bin/sh
# redis-server with the libraries the device image may lack, on its own library path (not Python's)
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
EOF
chmod +x .carry/bin/redis-server

bundled=$("$py" -c "from common.model import resolve_model_path; print(resolve_model_path('smollm2'))")
cp "$bundled"/tokenizer.json "$bundled"/tokenizer_config.json .carry/model/
[ -f "$bundled/chat_template.jinja" ] && cp "$bundled/chat_template.jinja" .carry/model/
xz -9 .carry/model/tokenizer.json
cp "$bundled/config.json" .carry/like/

tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb | tail -1 | cut -f1)  # what travels
total=$(( $(du -sb .whl | cut -f1) + $(du -sb .carry | cut -f1) + tree ))
echo "gpu_bundle: .whl $(du -sh .whl | cut -f1), .carry $(du -sh .carry | cut -f1); with the tree $((total >> 20)) MiB of 64"
[ "$total" -le $((64 << 20)) ] || { echo "gpu_bundle: over the 64 MiB a device call carries" >&2; exit 1; }
