"""Replication benchmark: what replicating every request's KV to a cache store costs decode
throughput, for each replication chunk k (the token service's --replicate-every,
DEJAVU_REPLICATE_EVERY: one message per k new tokens).

Step by step:
1. Build --concurrency prompts of --prompt-tokens token ids (the model's tokenizer; distinct
   openings, so no two share a prefix).
2. Start the baseline, a cluster of 1 prompt service, 1 token service and no cache store
   (replication off), and warm it up with 2 requests; it stays up for the whole run.
3. For each k of --every: start a cluster of 1 prompt service, 1 token service and 1 cache store,
   DEJAVU_REPLICATE_EVERY=k, and warm it up; then --repeats times, off then on: all --concurrency
   requests at once (non-streaming, greedy, ignore_eos, --new-tokens tokens each); tokens/s =
   completion tokens / wall time, and the MiB the token service replicated meanwhile
   (dejavu_token_replicated_bytes_total). Stop it before the next k.
4. Print, per k, tokens/s on and off (median [min-max]), on/off (ratio of the medians, off measured
   in the same period) and the MiB replicated per batch.
Progress goes to stderr, the table to stdout; --out FILE.json writes the runs and a summary
(ratio_on_off_kK). No plot. Nothing is asserted: this measures, it does not test.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import httpx

from bench.failure import batch, launch, metric
from bench.common import bench_parser, fmt, log, spread, write_json
from bench.serve import build_prompts
from common.model import load_tokenizer, resolve_model_path


def measure(url: str, bodies: list[dict]) -> dict:
    t0 = time.perf_counter()
    tokens = asyncio.run(batch(url, bodies))
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def replicated_bytes(cluster) -> float:
    with httpx.Client(timeout=10) as client:
        return sum(metric(client, t.url, "dejavu_token_replicated_bytes_total") for t in cluster.of("token"))


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("replication", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--every", default="4,16,64", help="comma-separated replication chunks k (tokens) to measure")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side, per k")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent requests (all sent at once)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt length per request (tokens)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--out", default="", metavar="FILE.json", help="write the raw runs and a summary to this JSON file")
    args = p.parse_args(argv)
    try:
        chunks = [int(k) for k in args.every.split(",")]
    except ValueError:
        chunks = []
    if not chunks or min(chunks) < 1:
        p.error(f"--every {args.every!r}: give comma-separated whole numbers of tokens, each at least 1")
    tokenizer = load_tokenizer(resolve_model_path(args.model, progress=log))
    bodies = [{"prompt": ids, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
              for ids in build_prompts(tokenizer, args.prompt_tokens, args.concurrency)]
    env = {"DEJAVU_LOG_LEVEL": "warning", "DEJAVU_MAX_SEQS": str(max(16, args.concurrency)),
           "DEJAVU_MAX_MODEL_LEN": str(max(2048, args.prompt_tokens + args.new_tokens + 16))}
    runs = []
    with contextlib.ExitStack() as stack:
        off = launch(stack, "replication off", args.model, 1, 0, env)
        measure(off.url, bodies[:2])  # warm-up
        for k in chunks:
            with contextlib.ExitStack() as inner:
                on = launch(inner, f"replication on, k={k}", args.model, 1, 1, {**env, "DEJAVU_REPLICATE_EVERY": str(k)})
                measure(on.url, bodies[:2])
                for r in range(1, args.repeats + 1):
                    for side, cluster in (("off", off), (f"k={k}", on)):
                        before = replicated_bytes(cluster)
                        run = {"k": k, "side": side, "repeat": r, **measure(cluster.url, bodies),
                               "replicated_mib": (replicated_bytes(cluster) - before) / 2**20}
                        runs.append(run)
                        log(f"k={k} repeat {r}/{args.repeats} {side:<6}: {run['tokens_per_s']:6.1f} tok/s, "
                            f"{run['replicated_mib']:.0f} MiB replicated")
    summary = {}
    print(f"\n{args.concurrency} concurrent, prompt {args.prompt_tokens}, {args.new_tokens} new tokens; "
          f"median [min-max] of {args.repeats}")
    print(f"{'k':>4} {'on tok/s':>22} {'off tok/s':>22} {'on/off':>7} {'MiB/batch':>10}")
    for k in chunks:
        on = [r["tokens_per_s"] for r in runs if r["side"] == f"k={k}"]
        off = [r["tokens_per_s"] for r in runs if r["k"] == k and r["side"] == "off"]
        ratio = statistics.median(on) / statistics.median(off)
        mib = statistics.median(r["replicated_mib"] for r in runs if r["side"] == f"k={k}")
        summary[f"ratio_on_off_k{k}"] = ratio
        print(f"{k:>4} {fmt(spread(on)):>22} {fmt(spread(off)):>22} {ratio:>7.3f} {mib:>10.0f}")
    write_json(args.out, summary, config={k: v for k, v in vars(args).items() if k != "out"}, runs=runs)


if __name__ == "__main__":
    main()
