"""Pipeline benchmark (the paper's Figure 7, at our scale): decode throughput of a token pipeline of
2 stages with microbatches in flight, against the same pipeline one step at a time, the same
pipeline without disaggregation (prompts prefilled through the token pipeline, colocated), and one
stage alone; with how busy each stage was (its forward time over the wall time).

Every layout is a cluster of real processes on this host, each engine pinned to its own cores
where there are enough (as `dejavu up --cpu-placement split` pins them); all of them stay up and
take turns, repeat after repeat, on the same batch of concurrent requests. On a CPU host the
stages share the host's cores and memory bandwidth: a stage is a slice of the cores, not a device
of its own, so the figure says whether the microbatches keep the stages busy at once, not what a
GPU pipeline would gain.

One wave of --concurrency requests by default (every prompt at the start); with --requests above
it, a closed loop in which prompts keep arriving while the others decode: the paper's regime, where
a microbatch carrying a prompt holds every stage of a pipeline that prefills its own prompts.

Step by step:
1. Build max(--requests, --concurrency) prompts of --prompt-tokens token ids (distinct openings);
   each asks for --new-tokens tokens, or, when --requests is above --concurrency, a length drawn
   (seed 0) from [new/2, 3*new/2].
2. Start a cluster for each layout of --layouts, all of them up for the whole run (no cache store;
   --dtype; messages over --kv-transport), each engine on cores of its own as
   `dejavu up --cpu-placement split` places it:
   - 1-stage: 1 prompt service and 1 token service;
   - 2-stage: 1 prompt service and a token service of 2 stages (the head and one stage process),
     a microbatch in flight per stage (DEJAVU_MICROBATCHES=0);
   - 2-stage-serial: the same, one step at a time (DEJAVU_MICROBATCHES=1);
   - 2-stage-colocated: the 2-stage token service alone, prefilling the prompts too.
3. Warm each up with 2 requests, then --repeats rounds, the layouts taking turns: every request,
   --concurrency at a time in a closed loop (non-streaming, greedy, ignore_eos); tokens/s =
   completion tokens / wall time, and how busy each stage and the prompt service were (their
   forward seconds, from /metrics, over the wall time).
4. Print per layout tokens/s (median [min-max]), its ratio to the first layout of --layouts (medians
   of the same runs) and the median busy fractions; with --out, write JSON (no plot).
Progress goes to stderr, the table to stdout. Nothing is asserted: this measures, it does not test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time

import httpx

from bench.common import alternated, bench_parser, fmt, log, spread, write_json
from bench.failure import batch, metric
from bench.serve import build_prompts
from common.model import load_tokenizer, resolve_model_path
from dejavu import placement
from dejavu.cluster import Cluster

# name -> (stages, microbatches, colocated): 1 prompt service and one token service of `stages`,
# or (colocated) the token pipeline alone, prefilling the prompts too
LAYOUTS = {
    "1-stage": (1, 0, False),
    "2-stage": (2, 0, False),             # a microbatch in flight per stage
    "2-stage-serial": (2, 1, False),      # one step at a time through the 2 stages
    "2-stage-colocated": (2, 0, True),    # prompts through the token pipeline: its bubbles
}


def launch(stack: contextlib.ExitStack, name: str, args, env: dict) -> Cluster:
    stages, microbatches, colocated = LAYOUTS[name]
    prompts = 0 if colocated else 1
    cores, why = placement.host_cores()
    plan = placement.plan(cores, prompts, 1, "split", stages) if cores else {}
    log(f"starting '{name}': {placement.describe(plan, cores) if plan else 'no placement: ' + why}")
    env = {**env, "DEJAVU_COLOCATED": str(colocated).lower(), "DEJAVU_MICROBATCHES": str(microbatches)}
    return stack.enter_context(Cluster(args.model, port=0, prompt_services=prompts, token_services=1, cache_stores=0,
                                       env=env, echo_logs=False, placement=plan, stages=stages))


def busy_seconds(client: httpx.Client, cluster: Cluster) -> list[float]:
    """Forward seconds so far of each stage (the head's own layers first, then stage 1, ...), then
    of the prompt service's prefills, if the layout has one."""
    head = metric(client, cluster.of("token")[0].url, "dejavu_token_forward_seconds_sum")
    stages = sorted(cluster.of("stage"), key=lambda c: c.name)
    return ([head] + [metric(client, s.url, "dejavu_stage_step_seconds_sum") for s in stages]
            + [metric(client, p.url, "dejavu_prompt_prefill_seconds_sum") for p in cluster.of("prompt")])


def measure(cluster: Cluster, bodies: list[dict], concurrency: int) -> dict:
    with httpx.Client(timeout=30) as client:
        before = busy_seconds(client, cluster)
        t0 = time.perf_counter()
        tokens = asyncio.run(batch(cluster.url, bodies, concurrency))  # a closed loop past `concurrency` bodies
        wall = time.perf_counter() - t0
        busy = [(b - a) / wall for a, b in zip(before, busy_seconds(client, cluster))]
    stages = len(cluster.of("stage")) + 1
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "stage_busy": busy[:stages],
            "prompt_busy": busy[stages:]}


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("pipeline", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    p.add_argument("--repeats", type=int, default=3, help="alternated runs of each layout")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent requests")
    p.add_argument("--requests", type=int, default=0,
                   help="requests a run; more than --concurrency runs a closed loop with output lengths "
                        "spread over [new/2, 3*new/2] (seeded), so prompts keep arriving during decode "
                        "(default: 0, which is --concurrency: one wave)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length per request (tokens)")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per request")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="of every engine")
    p.add_argument("--kv-transport", default="tcp", choices=("tcp", "ucx"),
                   help="the transport of the prompt's KV and of the stages' messages (DEJAVU_KV_TRANSPORT)")
    p.add_argument("--out", default="", metavar="FILE.json", help="write the runs and a summary to this JSON file")
    args = p.parse_args(argv)
    layouts = [name.strip() for name in args.layouts.split(",")]
    if unknown := [name for name in layouts if name not in LAYOUTS]:
        p.error(f"unknown layout(s) {unknown}: choose from {list(LAYOUTS)}")
    requests = max(args.requests, args.concurrency)
    tokenizer = load_tokenizer(resolve_model_path(args.model, progress=log))
    rng = random.Random(0)
    lengths = [args.new_tokens if requests == args.concurrency
               else rng.randint(max(1, args.new_tokens // 2), args.new_tokens * 3 // 2) for _ in range(requests)]
    bodies = [{"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True}
              for ids, n in zip(build_prompts(tokenizer, args.prompt_tokens, requests), lengths)]
    env = {"DEJAVU_LOG_LEVEL": "warning", "DEJAVU_MAX_SEQS": str(max(16, args.concurrency)), "DEJAVU_DTYPE": args.dtype,
           "DEJAVU_MAX_MODEL_LEN": str(max(1024, args.prompt_tokens + max(lengths) + 16)),
           "DEJAVU_KV_TRANSPORT": args.kv_transport}
    with contextlib.ExitStack() as stack:
        clusters = {name: launch(stack, name, args, env) for name in layouts}
        runs = alternated(clusters, lambda c: measure(c, bodies[:2], 2),
                          lambda c: measure(c, bodies, args.concurrency), args.repeats,
                          lambda run: f"{run['tokens_per_s']:6.1f} tok/s, stages busy "
                                      + " / ".join(f"{b:.2f}" for b in run["stage_busy"])
                                      + "".join(f", prompt service {b:.2f}" for b in run["prompt_busy"]))
    base = statistics.median(r["tokens_per_s"] for r in runs if r["layout"] == layouts[0])
    summary, rows = {}, []
    loop = f"{requests} requests in a closed loop of " if requests > args.concurrency else ""
    new = f"{min(lengths)}-{max(lengths)}" if loop else str(args.new_tokens)
    print(f"\n{loop}{args.concurrency} concurrent, prompt {args.prompt_tokens}, {new} new tokens, {args.dtype}; "
          f"median [min-max] of {args.repeats}, ratios against '{layouts[0]}' of the same runs")
    print(f"{'layout':<20}{'tok/s':>24}{'ratio':>8}  busy (forward time / wall): stages; prompt service")
    for name in layouts:
        mine = [r for r in runs if r["layout"] == name]
        rate = [r["tokens_per_s"] for r in mine]
        busy = [statistics.median(r["stage_busy"][k] for r in mine) for k in range(len(mine[0]["stage_busy"]))]
        prompt = [statistics.median(r["prompt_busy"][k] for r in mine) for k in range(len(mine[0]["prompt_busy"]))]
        ratio = statistics.median(rate) / base
        key = name.replace("-", "_")
        summary[f"tokens_per_s_{key}"], summary[f"ratio_{key}"], summary[f"stage_busy_{key}"] = (
            statistics.median(rate), ratio, busy)
        summary[f"prompt_busy_{key}"] = prompt
        rows.append({"layout": name, "tokens_per_s": spread(rate), "ratio": ratio, "stage_busy": busy,
                     "prompt_busy": prompt})
        print(f"{name:<20}{fmt(spread(rate)):>24}{ratio:>8.2f}  " + " / ".join(f"{b:.2f}" for b in busy)
              + ("; " + " / ".join(f"{b:.2f}" for b in prompt) if prompt else ""))
    write_json(args.out, summary, config={k: v for k, v in vars(args).items() if k != "out"}, rows=rows, runs=runs)


if __name__ == "__main__":
    main()
