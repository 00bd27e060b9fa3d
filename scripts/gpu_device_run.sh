#!/usr/bin/env bash
# One run on a lent CUDA machine (issue #9 item 7, issue #11's Figure 10), after scripts/gpu_bundle.sh
# here and with carry [".whl", ".carry"]:
#
#   set -o pipefail; bash scripts/gpu_device_run.sh 2>&1 | tee $OUT/run.log
#
# It installs the carried wheels into /tmp/site, writes a random model of SmolLM2's architecture,
# then, each step in the time left, most telling first:
# 1. tests/unit/test_graphs.py: decode steps replayed from CUDA graphs against eager steps and HF;
# 2. `bench.step --cuda-graphs`: the decode step eager against replayed, bf16 and float32;
# 3. scripts/gpu_check.sh over UCX (over TCP where ucxx does not import), with --compare-eager;
# 4. `bench.swap` (SWAP=1 only).
# Results land in $OUT: graphs-test.log, step.json, ucx/ (or tcp/) summary.json, serve.json,
# serve-eager.json and their logs; swap.json.
#
# Environment: BUDGET seconds in all (default 420; on the H200 on 2026-12-04 the install and the
# model took 30 s, the check 202 s, bench.swap 145 s); SKIP_STEP=1 skips step 2 (STEP_ARGS: its batches, dtypes,
# repeats), SKIP_CHECK=1 step 3; TESTS: pytest's -k for step 1; LOCAL=1
# ALLOW_CPU=1 TINY=1 tries the whole thing here, on a CPU, with the 2-layer model.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
budget=${BUDGET:-420}; end=$((SECONDS + budget)); out=${OUT:-/tmp/gpu_device_run}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
log() { echo "[gpu_device_run $(date +%T) +${SECONDS}s] $*"; }
left() { local s=$((end - SECONDS - 5)); echo $((s > 1 ? s : 1)); }  # seconds for the next step, at least 1
if [ -z "${LOCAL:-}" ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site PATH=$PWD/.carry/bin:$PATH
fi
log "installed"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>&1 | tail -2
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
$py -c "import ucxx; print('ucxx', ucxx.__version__)" 2>&1 | tail -1
model=/tmp/dejavu-model; rm -rf $model; mkdir -p $model; cp .carry/model/* $model/; xz -d $model/tokenizer.json.xz
like=(--like .carry/like/config.json); [ -n "${TINY:-}" ] && like=()
$py scripts/gpu_check.py --save-tiny-model $model "${like[@]}" || exit 4
log "model written"; extra=${ALLOW_CPU:+--allow-cpu}
rc=0
timeout -k 10 "$(left)" $py -m pytest -q -p no:cacheprovider -o addopts="" ${TESTS:+-k "$TESTS"} tests/unit/test_graphs.py 2>&1 | tee "$out/graphs-test.log"
tests=${PIPESTATUS[0]}; log "test_graphs: exit $tests"
if [ -z "${SKIP_STEP:-}" ] && $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  timeout -k 10 -s INT "$(( $(left) < 150 ? $(left) : 150 ))" $py -m bench.step --model $model --cuda-graphs \
    ${STEP_ARGS:---dtypes bfloat16 float32 --batches 1 8 16 32 --repeats 3 --steps 10} --out "$out/step.json"
  step=$?; log "bench.step: exit $step"; [ $step = 0 ] || tests=1
fi
if [ -z "${SKIP_CHECK:-}" ]; then
  timeout -k 30 -s INT "$(left)" scripts/gpu_check.sh $extra --model $model --kv-transport ucx --compare-eager --out "$out/ucx"
  rc=$?; log "gpu_check ucx: exit $rc"
  if [ $rc = 2 ] && [ $((end - SECONDS)) -gt 120 ]; then  # 2: it cannot run (ucxx, say): the same over TCP
    timeout -k 30 -s INT "$(left)" scripts/gpu_check.sh $extra --model $model --kv-transport tcp --compare-eager --out "$out/tcp"
    rc=$?; log "gpu_check tcp: exit $rc"
  fi
fi
rest=$((end - SECONDS - 5))
if [ -z "${SWAP:-}" ]; then
  log "bench.swap not run (SWAP=1 runs it)"
elif [ $rest -gt 60 ]; then
  log "bench.swap with ${rest} s left"
  timeout -k 30 -s INT $rest $py -m bench.swap --model $model --dtype bfloat16 --repeats 1 --kv-transport tcp \
    --out "$out/swap.json"
  log "bench.swap: exit $?"
else
  log "bench.swap not run: ${rest} s left"
fi
[ "$tests" = 0 ] || [ "$rc" != 0 ] || rc=1
exit $rc
