"""Swap benchmark (the paper's Figure 10, at our scale): at one fixed device KV budget, the largest
decode batch and the throughput of a token pipeline with microbatch KV swapping (--swap) against
the same pipeline without it; and how long steps waited for their KV to swap in.

Both layouts are a prompt service and one token service of `--stages` stages with `--microbatches`
steps in flight (the paper: one per stage; more than two is where swapping pays), every stage
with the same device budget, `--device-seqs` sequences of prompt + new tokens of its layers:
- without swapping the budget is the whole KV pool: all the microbatches' KV must fit in it, so
  at most `device-seqs` sequences decode at once (the gateway queues the rest);
- with swapping the pool is in host memory and the budget holds only the microbatch computing and
  the next one: each microbatch may take half the budget, and `microbatches` of them run at once.
`--concurrency` requests (default: as many as swapping can run) are sent at once, repeat after
repeat, alternating the layouts. The largest batch is the most sequences the head ran at once.

On CPU the "device" is host memory too: the budget is a cap we set, the swaps are memory copies
that take the same cores the stages compute on, and a bigger batch helps only as much as the
CPU's matmuls gain from more rows. On a GPU the budget is HBM left after the weights, the swaps
are PCIe copies on their own stream beside the compute, and a bigger batch is nearly free until
the GPU is compute-bound: that is where the paper measures up to 1.8x.

Step by step:
1. From the model's config (no weights): the device budget of a stage, --device-seqs sequences of
   --prompt-tokens + --new-tokens (in whole blocks of 16 tokens) of the largest stage's layers, in
   --dtype (DEJAVU_KV_DEVICE_BYTES); build one prompt of --prompt-tokens ids per request.
2. Start both clusters, which stay up for the run: each 1 prompt service and 1 token service of
   --stages stages with --microbatches steps in flight, no cache store, each engine on cores of its
   own as `dejavu up --cpu-placement split` places it: "no-swap", and "swap" (DEJAVU_SWAP=true).
3. Warm each up with 2 requests, then --repeats rounds, the layouts taking turns: all requests at
   once (non-streaming, greedy, ignore_eos); tokens/s = completion tokens / wall time, the largest
   batch (the head's running requests, sampled every 50 ms), the swap-in wait a step and the bytes
   swapped a token (from the head's and stages' /metrics).
4. Print per layout tokens/s (median [min-max]), its ratio to no-swap (medians of the same runs), the
   largest batch, the swap-in wait and the bytes swapped; with --out, write JSON (no plot).
Progress goes to stderr, the table to stdout. Nothing is asserted: this measures, it does not test.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import httpx

from bench.common import alternated, bench_parser, fmt, log, spread, write_json
from bench.failure import batch, metric
from bench.serve import build_prompts
from common.model import load_tokenizer, resolve_model_path
from dejavu import placement
from dejavu.cluster import Cluster
from engine.runner import stage_layers

LAYOUTS = ("no-swap", "swap")
BLOCK = 16


def budget_bytes(path, args) -> tuple[int, int]:
    """(device budget in bytes, blocks of one sequence): `device_seqs` sequences of the largest stage."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    heads = c.num_attention_heads
    kv_heads, head_dim = getattr(c, "num_key_value_heads", None) or heads, getattr(c, "head_dim", None) or c.hidden_size // heads
    layers = len(stage_layers(c.num_hidden_layers, args.stages, 0))
    itemsize = 4 if args.dtype == "float32" else 2
    seq_blocks = -(-max_model_len(args) // BLOCK)
    return args.device_seqs * seq_blocks * BLOCK * 2 * layers * kv_heads * head_dim * itemsize, seq_blocks


def max_model_len(args) -> int:
    """A request's prompt + new tokens, whole blocks: a "sequence" of the budget is what one commits."""
    return -(-(args.prompt_tokens + args.new_tokens) // BLOCK) * BLOCK


def launch(stack: contextlib.ExitStack, name: str, args, env: dict) -> Cluster:
    cores, why = placement.host_cores()
    plan = placement.plan(cores, 1, 1, "split", args.stages) if cores else {}
    log(f"starting '{name}': {placement.describe(plan, cores) if plan else 'no placement: ' + why}")
    env = {**env, "DEJAVU_SWAP": str(name == "swap").lower()}
    return stack.enter_context(Cluster(args.model, port=0, prompt_services=1, token_services=1, cache_stores=0,
                                       env=env, echo_logs=False, placement=plan, stages=args.stages))


def swap_wait(client: httpx.Client, cluster: Cluster) -> tuple[float, float]:
    """(seconds steps waited for a swap-in, steps), summed over the head and its stages."""
    urls = [c.url for c in cluster.of("token") + cluster.of("stage")]
    return (sum(metric(client, u, "dejavu_swap_wait_seconds_sum") for u in urls),
            sum(metric(client, u, "dejavu_swap_wait_seconds_count") for u in urls))


def swapped_bytes(client: httpx.Client, cluster: Cluster) -> float:
    urls = [c.url for c in cluster.of("token") + cluster.of("stage")]
    return sum(metric(client, u, "dejavu_swap_in_bytes_total") + metric(client, u, "dejavu_swap_out_bytes_total")
               for u in urls)


async def run_batch(cluster: Cluster, bodies: list[dict]) -> tuple[int, int]:
    """(completion tokens, the most sequences the head ran at once, sampled every 50 ms)."""
    head, most = cluster.of("token")[0].url, 0

    async def watch() -> None:
        nonlocal most
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                text = (await client.get(head + "/metrics")).text
                line = next(x for x in text.splitlines() if x.startswith("dejavu_token_running_requests "))
                most = max(most, int(float(line.split()[1])))
                await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        tokens = await batch(cluster.url, bodies)
    finally:
        watcher.cancel()
    return tokens, most


def measure(cluster: Cluster, bodies: list[dict]) -> dict:
    with httpx.Client(timeout=30) as client:
        (wait0, steps0), bytes0 = swap_wait(client, cluster), swapped_bytes(client, cluster)
        t0 = time.perf_counter()
        tokens, most = asyncio.run(run_batch(cluster, bodies))
        wall = time.perf_counter() - t0
        (wait1, steps1), bytes1 = swap_wait(client, cluster), swapped_bytes(client, cluster)
    steps = steps1 - steps0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "largest_batch": most,
            "swap_wait_ms_per_step": (wait1 - wait0) / steps * 1e3 if steps else 0.0,
            "swapped_bytes_per_token": (bytes1 - bytes0) / tokens if tokens else 0.0}


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("swap", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--stages", type=int, default=2, help="stages of the token pipeline")
    p.add_argument("--microbatches", type=int, default=4, help="steps in flight through the pipeline")
    p.add_argument("--device-seqs", type=int, default=8,
                   help="the device KV budget, in sequences of prompt + new tokens (of the largest stage's layers)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="concurrent requests (0: as many as swapping runs at once, microbatches x device-seqs / 2)")
    p.add_argument("--repeats", type=int, default=3, help="alternated runs of each layout")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length per request (tokens)")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per request")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="of every engine, and of the KV the budget counts")
    p.add_argument("--kv-transport", default="tcp", choices=("tcp", "ucx"),
                   help="the transport of the prompt's KV and of the stages' messages (DEJAVU_KV_TRANSPORT)")
    p.add_argument("--out", default="", metavar="FILE.json", help="write the runs and a summary to this JSON file")
    args = p.parse_args(argv)
    if args.stages < 1 or args.microbatches < 1 or args.device_seqs < 2:
        p.error("--stages and --microbatches must be >= 1, --device-seqs >= 2 (swapping holds two steps)")
    path = resolve_model_path(args.model, progress=log)
    budget, seq_blocks = budget_bytes(path, args)
    concurrency = args.concurrency or args.microbatches * (args.device_seqs // 2)
    tokenizer = load_tokenizer(path)
    bodies = [{"prompt": ids, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
              for ids in build_prompts(tokenizer, args.prompt_tokens, concurrency)]
    env = {"DEJAVU_LOG_LEVEL": "warning", "DEJAVU_MAX_SEQS": str(max(concurrency, args.device_seqs)),
           "DEJAVU_DTYPE": args.dtype, "DEJAVU_MAX_MODEL_LEN": str(max_model_len(args)),
           "DEJAVU_KV_TRANSPORT": args.kv_transport, "DEJAVU_MICROBATCHES": str(args.microbatches),
           "DEJAVU_KV_DEVICE_BYTES": str(budget), "DEJAVU_BLOCK_SIZE": str(BLOCK)}
    log(f"device KV budget {budget / 2**20:.1f} MiB a stage: {args.device_seqs} sequences of "
        f"{max_model_len(args)} tokens ({seq_blocks} blocks each); {concurrency} concurrent requests")
    with contextlib.ExitStack() as stack:
        clusters = {name: launch(stack, name, args, env) for name in LAYOUTS}
        runs = alternated(clusters, lambda c: measure(c, bodies[:2]), lambda c: measure(c, bodies), args.repeats,
                          lambda run: f"{run['tokens_per_s']:6.1f} tok/s, largest batch {run['largest_batch']}, "
                                      f"swap-in wait {run['swap_wait_ms_per_step']:.2f} ms a step")
    base = statistics.median(r["tokens_per_s"] for r in runs if r["layout"] == LAYOUTS[0])
    summary, rows = {"device_budget_bytes": budget, "concurrency": concurrency}, []
    print(f"\n{args.stages} stages, {args.microbatches} microbatches, device budget {budget / 2**20:.1f} MiB a stage "
          f"({args.device_seqs} sequences), {concurrency} concurrent, prompt {args.prompt_tokens}, {args.new_tokens} "
          f"new tokens, {args.dtype}; median [min-max] of {args.repeats}, ratios against '{LAYOUTS[0]}'")
    print(f"{'layout':<10}{'tok/s':>24}{'ratio':>8}{'largest batch':>15}{'swap-in wait/step':>19}{'swapped/token':>15}")
    for name in LAYOUTS:
        mine = [r for r in runs if r["layout"] == name]
        rate = [r["tokens_per_s"] for r in mine]
        most = max(r["largest_batch"] for r in mine)
        wait = statistics.median(r["swap_wait_ms_per_step"] for r in mine)
        moved = statistics.median(r["swapped_bytes_per_token"] for r in mine)
        ratio = statistics.median(rate) / base
        key = name.replace("-", "_")
        summary.update({f"tokens_per_s_{key}": statistics.median(rate), f"ratio_{key}": ratio,
                        f"largest_batch_{key}": most, f"swap_wait_ms_per_step_{key}": wait,
                        f"swapped_bytes_per_token_{key}": moved})
        rows.append({"layout": name, "tokens_per_s": spread(rate), "ratio": ratio, "largest_batch": most,
                     "swap_wait_ms_per_step": wait, "swapped_bytes_per_token": moved})
        print(f"{name:<10}{fmt(spread(rate)):>24}{ratio:>8.2f}{most:>15}{wait:>16.2f} ms{moved / 2**10:>11.0f} KiB")
    write_json(args.out, summary, config={**{k: v for k, v in vars(args).items() if k != "out"},
                                          "concurrency": concurrency, "device_budget_bytes": budget},
               rows=rows, runs=runs)


if __name__ == "__main__":
    main()
