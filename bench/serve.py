"""Serving benchmark: our cluster against Hugging Face `generate` on the same model.

What one run does, step by step:

1. load the tokenizer and the model in this process (the baseline) and build a prompt of exactly
   --prompt-tokens token ids for every request ours serves (each repeat and concurrency its own, and
   the warm-up's): each starts differently, so no prefix is shared and our prefix cache serves none
   (reused across repeats, prompts came back from it: a repeat's TTFT ~50 ms);
2. start a cluster (1 prompt service, 1 token service, --cache-stores cache stores: none by default,
   DEJAVU_MAX_SEQS >= the highest concurrency) unless --url names a running gateway; warm both sides
   up once;
3. for each repeat and each concurrency c, alternately:
   - baseline: one prefill (`generate` with max_new_tokens=1) gives its TTFT, one full greedy
     `generate` of --new-tokens tokens gives its tokens/s. HF serves c requests one after another,
     so its tokens/s does not depend on c; its TTFT is the single-request one (the c-th queued
     request would wait about (c - 1) full generates more);
   - ours: c concurrent streaming /v1/completions (greedy, ignore_eos, usage in the stream); each
     request's TTFT is the time to its first chunk with text; tokens/s = all completion tokens /
     wall time of the batch;
4. print medians (min-max over repeats), the ratio ours/HF and the target line (>= 4x HF's tokens/s
   at 16 concurrent); with --out, write JSON. No plot.

Progress goes to stderr, the table to stdout. The cluster and the baseline share the machine's
cores, but never run at the same time. Nothing is asserted: this measures, it does not test.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass

import httpx

from bench.common import bench_parser, fmt, log, spread, sse_chunks, write_json
from common.model import load_model, load_tokenizer, resolve_model_path
from dejavu.cluster import Cluster

TARGET_RATIO, TARGET_CONCURRENCY = 4.0, 16
PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his father "
             "had taught him, and wrote the weather, the ships and the colour of the sea into a ledger that "
             "nobody had read in forty years. ")


@dataclass
class Measurement:
    side: str                # "ours" | "hf"
    repeat: int
    concurrency: int
    ttft_ms: list[float]     # one per request (HF: the single-request prefill)
    tokens: int              # completion tokens generated in the batch
    wall_s: float            # wall time of the batch (HF: one full generate)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttft_ms)


def build_prompts(tokenizer, tokens: int, count: int) -> list[list[int]]:
    """`count` prompts of exactly `tokens` ids; a distinct opening keeps their prefixes apart."""
    prompts = []
    for i in range(count):
        text = f"Log {i + 1}, page {7 * i + 3}. "
        while len(ids := tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
            text += PARAGRAPH
        prompts.append(ids[:tokens])
    return prompts


# --- the baseline: Hugging Face generate, in this process -------------------------------------

class HFBaseline:
    def __init__(self, path):
        import torch

        self.torch, self.model = torch, load_model(path)
        config = self.model.generation_config  # a pad id keeps generate from warning on every call
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.pad_id = pad[0] if isinstance(pad, (list, tuple)) else pad

    def generate(self, ids: list[int], new_tokens: int) -> float:
        """Seconds for one greedy generate of exactly `new_tokens` tokens."""
        inputs = self.torch.tensor([ids], device=self.model.device)
        start = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(inputs, attention_mask=self.torch.ones_like(inputs), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=self.pad_id)
        if inputs.is_cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - start

    def measure(self, repeat: int, concurrency: int, ids: list[int], new_tokens: int) -> Measurement:
        ttft = self.generate(ids, 1)
        wall = self.generate(ids, new_tokens)
        return Measurement("hf", repeat, concurrency, [ttft * 1000], new_tokens, wall)


# --- ours: concurrent streaming requests to the gateway ---------------------------------------

async def stream_one(client: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    """(TTFT in s, completion tokens) of one streaming completion."""
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        async for chunk in sse_chunks(resp):
            choices = chunk.get("choices") or []
            if first is None and choices and (choices[0].get("text") or choices[0].get("logprobs")):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first or time.perf_counter()) - start, tokens


async def run_batch(client: httpx.AsyncClient, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], int, float]:
    bodies = [{"prompt": ids, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}} for ids in prompts]
    start = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, body) for body in bodies))
    wall = time.perf_counter() - start
    return [ttft for ttft, _ in results], sum(tokens for _, tokens in results), wall


def measure_ours(url: str, repeat: int, prompts: list[list[int]], new_tokens: int) -> Measurement:
    async def go():
        limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0), limits=limits) as client:
            return await run_batch(client, prompts, new_tokens)

    ttfts, tokens, wall = asyncio.run(go())
    return Measurement("ours", repeat, len(prompts), [t * 1000 for t in ttfts], tokens, wall)


# --- the run -------------------------------------------------------------------------------------

def run(args, url: str, hf: HFBaseline, prompts: list[list[int]]) -> list[Measurement]:
    """prompts: 1 + repeats x sum(concurrency), each sent to us once (HF's baseline has no cache)."""
    log("warming up both sides")
    hf.generate(prompts[0], 4)
    measure_ours(url, 0, prompts[:1], 4)
    done, fresh = [], iter(prompts[1:])
    for r in range(1, args.repeats + 1):
        for c in args.concurrency:
            mine = [next(fresh) for _ in range(c)]
            m = hf.measure(r, c, mine[0], args.new_tokens)
            log(f"repeat {r}/{args.repeats} c={c:<3} HF   : TTFT {m.ttft_p50_ms:7.0f} ms, {m.tokens_per_s:7.1f} tok/s")
            o = measure_ours(url, r, mine, args.new_tokens)
            log(f"repeat {r}/{args.repeats} c={c:<3} ours : TTFT p50 {o.ttft_p50_ms:7.0f} ms (max {max(o.ttft_ms):.0f}), "
                f"{o.tokens_per_s:7.1f} tok/s ({o.tokens} tokens in {o.wall_s:.1f} s)")
            done += [m, o]
    return done


def summarize(measurements: list[Measurement], concurrency: list[int]) -> tuple[dict, list[dict]]:
    rows = []
    for c in concurrency:
        ours = [m for m in measurements if m.side == "ours" and m.concurrency == c]
        hf = [m for m in measurements if m.side == "hf" and m.concurrency == c]
        row = {"concurrency": c, "ours_ttft_p50_ms": spread([m.ttft_p50_ms for m in ours]),
               "ours_tokens_per_s": spread([m.tokens_per_s for m in ours]),
               "hf_ttft_ms": spread([m.ttft_p50_ms for m in hf]), "hf_tokens_per_s": spread([m.tokens_per_s for m in hf])}
        row["ratio"] = row["ours_tokens_per_s"]["median"] / row["hf_tokens_per_s"]["median"]
        rows.append(row)
    summary = {}
    for row in rows:
        c = row["concurrency"]
        summary[f"tokens_per_s_ratio_{c}"] = row["ratio"]
        summary[f"tokens_per_s_{c}"] = row["ours_tokens_per_s"]["median"]
        summary[f"ttft_ms_{c}"] = row["ours_ttft_p50_ms"]["median"]
    summary["hf_tokens_per_s"] = statistics.median(m.tokens_per_s for m in measurements if m.side == "hf")
    summary["hf_ttft_ms"] = statistics.median(m.ttft_p50_ms for m in measurements if m.side == "hf")
    at_target = summary.get(f"tokens_per_s_ratio_{TARGET_CONCURRENCY}")
    summary["target_met"] = None if at_target is None else at_target >= TARGET_RATIO
    return summary, rows


def print_table(rows: list[dict], summary: dict, args) -> None:
    print(f"\nprompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.repeats} repeat(s); "
          "median [min-max] over repeats")
    print(f"{'conc':>4}  {'ours TTFT p50 ms':>22}  {'ours tok/s':>22}  {'HF tok/s':>20}  {'ours/HF':>7}")
    for row in rows:
        print(f"{row['concurrency']:>4}  {fmt(row['ours_ttft_p50_ms'], 0):>22}  {fmt(row['ours_tokens_per_s']):>22}  "
              f"{fmt(row['hf_tokens_per_s']):>20}  {row['ratio']:>6.2f}x")
    print(f"HF TTFT (one request alone; the c-th of c queued requests waits ~c-1 full generates more): "
          f"{summary['hf_ttft_ms']:.0f} ms")
    ratio = summary.get(f"tokens_per_s_ratio_{TARGET_CONCURRENCY}")
    verdict = "not measured" if ratio is None else f"{'MET' if ratio >= TARGET_RATIO else 'NOT MET'} ({ratio:.2f}x)"
    print(f"target: >= {TARGET_RATIO:g}x HF tokens/s at {TARGET_CONCURRENCY} concurrent: {verdict}")


def parse_args(argv: list[str] | None = None):
    p = bench_parser("serve", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model folder")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every concurrency, HF and ours alternating")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt length per request, tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (ignore_eos)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrent request counts")
    p.add_argument("--url", default="", help="a running gateway (default: start a cluster)")
    p.add_argument("--cache-stores", type=int, default=0,
                   help="cache stores in the started cluster")
    p.add_argument("--out", default="", metavar="FILE.json", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency {args.concurrency!r}: give comma-separated integers, e.g. 1,16")
    if min(args.concurrency) < 1 or min(args.repeats, args.prompt_tokens, args.new_tokens) < 1:
        p.error("--concurrency, --repeats, --prompt-tokens and --new-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = resolve_model_path(args.model, progress=log)
    prompts = build_prompts(load_tokenizer(path), args.prompt_tokens, 1 + args.repeats * sum(args.concurrency))
    hf = HFBaseline(path)
    if args.url:
        measurements = run(args, args.url.rstrip("/"), hf, prompts)
    else:
        log("starting a cluster (1 prompt service, 1 token service)")
        env = {"DEJAVU_MAX_SEQS": str(max(16, max(args.concurrency)))}
        with Cluster(model=args.model, port=0, prompt_services=1, token_services=1, cache_stores=args.cache_stores, env=env,
                     echo_logs=False) as cluster:
            log(f"cluster ready at {cluster.url}")
            measurements = run(args, cluster.url, hf, prompts)
    summary, rows = summarize(measurements, args.concurrency)
    print_table(rows, summary, args)
    raw = [{**asdict(m), "tokens_per_s": m.tokens_per_s} for m in measurements]
    write_json(args.out, summary, config={k: v for k, v in vars(args).items() if k != "out"}, rows=rows, raw=raw)


if __name__ == "__main__":
    main()
