"""SGLang's own load client against us: `python -m sglang.benchmark.serving` (bench_serving;
installed by bench/peers.sh sglang) on SGLang's native API, POST /generate (its default backend,
`sglang`), and on our OpenAI completions (its `vllm` backend, the same client posting to
/v1/completions), so a user who benchmarks with SGLang's client sees what we serve, and what the
native API adds.

Step by step:
1. One cluster as `dejavu up` runs it (a prompt service and a token service, no cache store, CPU
   placement auto; --colocated: one colocated token service), the gateway on a free port.
2. The client (.peers/sglang/bin/sglang-bench in the checkout) with its `random-ids`
   dataset (no download; a seed of its own each run, so no run finds another's prompts in the
   prefix cache): --prompts prompts of --input-len token ids, --output-len tokens out each
   (ignore_eos, greedy), --concurrency at once; with --tokenize-prompt the native backend posts
   the ids (`input_ids`, as RL frameworks do) instead of their text.
3. One short run of each backend unrecorded (2 prompts, 8 tokens out), then --repeats runs of
   each, taking turns; medians [min-max] of the client's output throughput, median TTFT and median
   TPOT, and /generate's over /v1/completions'.
Progress goes to stderr, the figures to stdout; --out FILE.json writes them as JSON (no
plot). A default run took ~6 min on the 2-vCPU VM of docs/BENCHMARKS.md.
Nothing is asserted; figures depend on the machine (recorded in the JSON).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import httpx

from bench.common import bench_parser, fmt, log, spread, write_json

CLIENT = Path(__file__).resolve().parents[1] / ".peers/sglang/bin/sglang-bench"  # where bench/peers.sh puts it
BACKENDS = {"generate": "sglang", "completions": "vllm"}  # ours: the client's backend that posts there
FIGURES = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "completed")


def run_client(url: str, served: str, backend: str, tokenizer: str, args, prompts: int, output_len: int,
               seed: int) -> dict:
    """One run of SGLang's client (`served`: the model name completions' `model` gives): its
    figures (FIGURES) as its --output-file has them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.jsonl"
        command = [str(CLIENT), "--backend", backend, "--base-url", url, "--model", tokenizer, "--tokenizer", tokenizer,
                   "--served-model-name", served,
                   "--dataset-name", "random-ids", "--random-input-len", str(args.input_len),
                   "--random-output-len", str(output_len), "--random-range-ratio", "1.0",
                   "--num-prompts", str(prompts), "--max-concurrency", str(args.concurrency),
                   "--seed", str(seed), "--output-file", str(out)]
        if args.tokenize_prompt and backend == "sglang":
            command.append("--tokenize-prompt")
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"sglang.bench_serving failed ({done.returncode}): {done.stderr[-2000:]}")
        result = json.loads(out.read_text().splitlines()[-1])
    return {k: result[k] for k in FIGURES}


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("sglang_client", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--input-len", type=int, default=500, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="tokens out (ignore_eos)")
    p.add_argument("--prompts", type=int, default=16, help="prompts a run")
    p.add_argument("--concurrency", type=int, default=16, help="requests at once")
    p.add_argument("--repeats", type=int, default=3, help="runs of each backend, alternated")
    p.add_argument("--tokenize-prompt", action="store_true", help="/generate gets the prompt's ids (input_ids)")
    p.add_argument("--colocated", action="store_true", help="one colocated token service, no prompt service")
    p.add_argument("--seed", type=int, default=1, help="the client's dataset seeds: 1000 x this, and on (one a run)")
    p.add_argument("--out", default="", metavar="FILE.json", help="write the figures here as JSON")
    args = p.parse_args(argv)
    if not CLIENT.exists():
        raise SystemExit(f"{CLIENT} not found: run bench/peers.sh sglang first")

    from common.model import resolve_model_path
    from dejavu import placement
    from dejavu.cluster import Cluster

    model_path = str(resolve_model_path(args.model, progress=log))
    cores, why = placement.host_cores()
    prompts, tokens = (0, 1) if args.colocated else (1, 1)
    plan = placement.plan(cores, prompts, tokens, "auto", 1, 1) if cores else {}
    log(f"CPU placement: {placement.describe(plan, cores) if plan else 'none: ' + why}")
    runs = []
    env = {"DEJAVU_COLOCATED": str(args.colocated).lower()}
    with Cluster(args.model, port=0, prompt_services=prompts, token_services=tokens, cache_stores=0, env=env,
                 echo_logs=False, placement=plan) as cluster:
        # every run its own prompts (the dataset's seed): none finds another's in the prefix cache
        seeds = iter(range(args.seed * 1000, args.seed * 1000 + 1000))
        served = httpx.get(cluster.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        for name, backend in BACKENDS.items():  # warm-up, unrecorded
            run_client(cluster.url, served, backend, model_path, args, 2, 8, next(seeds))
        for r in range(1, args.repeats + 1):
            for name, backend in BACKENDS.items():
                run = {"api": name, "repeat": r, **run_client(cluster.url, served, backend, model_path, args,
                                                               args.prompts, args.output_len, next(seeds))}
                runs.append(run)
                log(f"repeat {r}/{args.repeats} {name:<12}: {run['output_throughput']:.1f} tok/s, median TTFT "
                    f"{run['median_ttft_ms']:.0f} ms, TPOT {run['median_tpot_ms']:.1f} ms, "
                    f"{run['completed']}/{args.prompts} completed")
    summary = {}
    for name in BACKENDS:
        mine = [r for r in runs if r["api"] == name]
        summary[name] = {k: spread([r[k] for r in mine]) for k in FIGURES[:3]}
        summary[name]["failed"] = sum(args.prompts - r["completed"] for r in mine)
    summary["ratio_output_throughput"] = (summary["generate"]["output_throughput"]["median"]
                                          / summary["completions"]["output_throughput"]["median"])
    for name in BACKENDS:
        s = summary[name]
        print(f"{name:<12}: {fmt(s['output_throughput'])} tok/s, median TTFT {fmt(s['median_ttft_ms'], 0)} ms, "
              f"median TPOT {fmt(s['median_tpot_ms'])} ms, {s['failed']} failed")
    print(f"/generate / /v1/completions output throughput: {summary['ratio_output_throughput']:.2f}x")
    write_json(args.out, summary, runs=runs, args=vars(args))


if __name__ == "__main__":
    main()
