#!/usr/bin/env bash
# Issue #12, item 4: the simulator's predictions against what bench.load measures, on this machine.
#
#   scripts/validate_planner.sh [OUT_DIR]        (default docs/bench; ~25 minutes on 2 cores)
#
# 1. `dejavu profile` measures this machine and the bundled model (about a minute);
# 2. `dejavu bench load` measures the two layouts it knows, colocated and disaggregated (1 prompt +
#    1 token service, CPU placement auto: turns on a small host), at two open-loop rates and the
#    16-concurrent closed loop;
# 3. `dejavu simulate --against` replays the very requests bench.load recorded (arrival times and
#    output lengths) through the same layouts, from the profile, and prints predicted beside
#    measured: median normalized latency, TTFT, TPOT and tokens/s per rate, and the closed loop's
#    tokens/s, TTFT and TPOT (error = predicted / measured - 1; the issue's target: within 20 %).
#
# Run it alone on the machine: both measurements are disturbed by anything else running.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/bench}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
lscpu | grep -E "Model name|^CPU\(s\)" || true
"$py" -m dejavu profile --out "$out/profile.json"
"$py" -m dejavu bench load --targets colocated,disaggregated --rates 0.2,0.4 --requests 16 --repeats 2 \
    --out "$out/load-validate.json"
"$py" -m dejavu simulate --profile "$out/profile.json" --against "$out/load-validate.json" | tee "$out/validate.txt"
"$py" -m dejavu simulate --profile "$out/profile.json" --against "$out/load-validate.json" --json > "$out/validate.json"
