"""Load benchmark: open-loop Poisson arrivals against OpenAI-compatible servers, ours and others.

What one run does, step by step:

1. build prompt texts of exactly --prompt-tokens tokens (the model's tokenizer), a fresh one for every
   request of the run: distinct openings, so no prefix is shared and no prefix cache helps; sample one
   output length per request (below) and, per rate, Poisson arrival times (exponential gaps of mean
   1/rate). Lengths and arrival times from --seed: every target gets the same prompts, arrival times
   and lengths;
2. for each target, one at a time, each stopped (all its processes) before the next starts:
   disaggregated (our cluster: 1 prompt service, 1 token service, 1 cache store, 16 seqs), colocated
   (the same with no prompt service: the token service prefills, DEJAVU_COLOCATED=1), hf (bench/hf_server.py:
   `generate`, one request at a time), llama.cpp and vllm (installed by bench/peers.sh under .peers/;
   not installed: skipped); --url benchmarks one running endpoint instead. Wait for /v1/models, warm up
   with one request of 4 tokens. With --alternate, every target is started at once instead (each idle
   while another is measured) and they take turns: each single request, and each repeat of the closed
   loop (the order rotating from repeat to repeat), so that a slow spell of a shared VM spreads over
   every target. Before each turn the host's CPUs must be idle (vLLM's engine spins a core for ~1 s
   after a request: measured right after it, our single-request TTFT read 1.25 s instead of ~0.67);
3. --single requests alone, one after another, of --concurrent-output-tokens tokens: the TTFT and
   TPOT of an idle server;
4. closed loop, the headline: 16 concurrent streaming requests of --concurrent-output-tokens tokens,
   --repeats times: output tokens / wall time, median [min-max];
5. open loop, each rate: request i is sent at its arrival time whatever the answers do (streaming,
   greedy unless --temperature, ignore_eos, max_tokens L_i). Per request: TTFT, TPOT = (latency - TTFT)
   / (tokens - 1), normalized latency = latency / tokens, and the tokens received (usage, else chunks
   counted) against L_i. Per rate: requests/s and tokens/s from the first send to the last answer,
   p50/p95/p99, errors;
6. print the tables, the ratios over HF and over the best peer, the targets (>= 4x HF and >= 1x the
   best peer at 16 concurrent); write JSON and plots. A target that fails is reported skipped, not 0.

Progress goes to stderr, the tables to stdout. --out FILE.json writes the figures there and the plots
beside it (FILE-latency.png, FILE-ttft.png, FILE-concurrent.png); without --out, only the plots, in
bench/out/ (load-latency.png, ...).

Output lengths: the paper samples LMSys-Chat-1M's, which cannot be downloaded here. We draw from a
log-normal with LMSYS-Chat-1M's mean response length, 214.5 tokens (Zheng et al. 2023, arXiv:2309.11998,
Table 1), and sigma 1.0 for a heavy chat-like tail (median 130, p90 469, p99 1332 tokens), clipped to
[1, --max-output-tokens=1024] (2% are): mean 204, median 130, p90 469. Each length is then scaled by
--output-scale (default 0.25: mean 51, median 32, p90 117, p99 256 tokens).

Default sizes fit a 2-core CPU in ~20-25 minutes for the 3 default targets. We decode ~60 tok/s at 16
concurrent, HF ~18 tok/s one at a time, a 500-token prefill takes ~1.4 s: an average request costs HF
~4 s (it saturates near 0.25 req/s), ours saturates near 0.5 req/s (prefill and decode share the cores).
So rates 0.2, 0.4, 0.8 go from light load to overload for us; 16 requests a rate take ~3-4 minutes a
target; the closed loop ~2.5 minutes for ours and ~7 for HF (16 x (1.4 s + 128 / 18 s) a repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field

import httpx

from bench.common import bench_parser, fmt, log, percentile, plot_path, pyplot, save, spread, sse_chunks, write_json
from bench.serve import build_prompts
from bench.targets import CONCURRENT, Skipped, started
from common.model import load_tokenizer, resolve_model_path

LMSYS_MEAN_OUTPUT, SIGMA = 214.5, 1.0      # tokens; LMSYS-Chat-1M's mean response length (Table 1)
TARGET_OVER_HF, TARGET_OVER_PEER = 4.0, 1.0
OURS, PEERS = ("disaggregated", "colocated"), ("llama.cpp", "vllm")
REQUEST_TIMEOUT_S = 1800.0


@dataclass
class Result:
    target: str
    phase: str            # "rate 0.2" | "concurrent r1" | "warmup"
    index: int            # request number within the phase
    sent_s: float         # since the phase started
    ttft_s: float         # send -> first chunk with text
    latency_s: float      # send -> end of the stream
    tokens: int           # output tokens received
    expected: int         # max_tokens asked (ignore_eos: exactly this many are owed)
    counted: str          # "usage" | "chunks" (the target sent no usage)
    error: str = ""

    @property
    def tpot_s(self) -> float:
        return (self.latency_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else math.nan

    @property
    def norm_latency_s(self) -> float:
        return self.latency_s / self.tokens if self.tokens else math.nan


@dataclass
class Workload:
    rates: dict[float, tuple[list[str], list[float]]]   # rate -> (prompts, arrival times in s)
    lengths: list[int]                                   # output tokens of request i, at every rate
    concurrent: list[list[str]]                          # per repeat, CONCURRENT prompts
    warmup: str
    single: list[str]                                    # one prompt per single request


@dataclass
class Endpoint:
    target: str
    client: httpx.AsyncClient   # based at the target's URL
    model: str                  # the name its /v1/models gives
    sampling: dict = field(default_factory=lambda: {"temperature": 0})  # --temperature: each request's


# --- the workload ---------------------------------------------------------------------------------

def output_lengths(args) -> list[int]:
    """Chat-like: log-normal (mean 214.5, sigma 1.0), clipped, then scaled by --output-scale."""
    rng, mu = random.Random(args.seed), math.log(LMSYS_MEAN_OUTPUT) - SIGMA ** 2 / 2
    clipped = [min(max(round(rng.lognormvariate(mu, SIGMA)), 1), args.max_output_tokens) for _ in range(args.requests)]
    return [max(1, round(n * args.output_scale)) for n in clipped]


def arrivals(args, rate: float) -> list[float]:
    """Send times (s from the start) of a Poisson process: exponential gaps, the first at 0."""
    rng = random.Random(f"{args.seed}/{rate}")
    return list(itertools.accumulate((rng.expovariate(rate) for _ in range(args.requests - 1)), initial=0.0))


def workload(args, tokenizer) -> Workload:
    """Every request its own prompt: the single requests' too. They once took the first repeat's
    prompts (and, past 16, their own again), which our prefix cache then served from memory: that
    repeat of ours ran 1.2-1.5x faster than the next, and single requests past the 16th took ~50 ms."""
    n, k = args.requests, CONCURRENT
    texts = [tokenizer.decode(ids) for ids in build_prompts(tokenizer, args.prompt_tokens, 1 + len(args.rates) * n
                                                            + args.repeats * k + args.single)]
    sizes = sorted({len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts})
    log(f"{len(texts)} prompts of {sizes} tokens (asked {args.prompt_tokens})")
    rates = {rate: (texts[1 + j * n:1 + (j + 1) * n], arrivals(args, rate)) for j, rate in enumerate(args.rates)}
    rest = texts[1 + len(args.rates) * n:]
    concurrent = [rest[r * k:(r + 1) * k] for r in range(args.repeats)]
    return Workload(rates, output_lengths(args), concurrent, texts[0], rest[args.repeats * k:])


# --- one request and the two loops -----------------------------------------------------------------

async def request(ep: Endpoint, phase: str, index: int, prompt: str, max_tokens: int, t0: float) -> Result:
    body = {"model": ep.model, "prompt": prompt, "max_tokens": max_tokens, **ep.sampling, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent, first, chunks, usage, error = time.perf_counter(), None, 0, None, ""
    try:
        async with ep.client.stream("POST", "/v1/completions", json=body) as resp:
            async for chunk in sse_chunks(resp):
                if any(c.get("text") for c in chunk.get("choices") or []):
                    chunks += 1
                    first = first or time.perf_counter()
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    return Result(ep.target, phase, index, sent - t0, (first or end) - sent, end - sent,
                  chunks if usage is None else usage, max_tokens, "chunks" if usage is None else "usage", error)


async def open_loop(ep: Endpoint, rate: float, prompts: list[str], times: list[float], lengths: list[int]):
    phase, t0, done = f"rate {rate:g}", time.perf_counter(), 0

    async def one(i: int) -> Result:
        nonlocal done
        await asyncio.sleep(max(0.0, t0 + times[i] - time.perf_counter()))  # never waits for answers
        r = await request(ep, phase, i, prompts[i], lengths[i], t0)
        done += 1
        log(f"{ep.target} rate {rate:g}/s: {done}/{len(times)} done (request {i}: {r.tokens}/{r.expected} tokens "
            f"in {r.latency_s:.1f} s{', ' + r.error if r.error else ''})")
        return r

    return list(await asyncio.gather(*(one(i) for i in range(len(times)))))


async def closed_loop(ep: Endpoint, repeat: int, prompts: list[str], tokens: int) -> tuple[list[Result], float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(request(ep, f"concurrent r{repeat}", i, p, tokens, t0)
                                     for i, p in enumerate(prompts)))
    return list(results), time.perf_counter() - t0


def why_skipped(e: BaseException) -> str:
    """What the report says of a target that could not be measured: a Skipped's own words, else the error."""
    return str(e) if isinstance(e, Skipped) else f"failed: {type(e).__name__}: {e}"


async def settle(busy_cores: float = 0.3, window_s: float = 0.5, most_s: float = 15.0) -> float:
    """Wait until the host's CPUs are idle (under `busy_cores` cores' worth of work over two windows
    in a row, from /proc/stat; steal time, another tenant's, does not count; at most `most_s`), so
    that a target does not pay for the last one's work: vLLM's engine keeps a core spinning for a
    second or so after its last request. Returns the wait (s)."""
    def ticks() -> tuple[int, int]:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(f), f[0] + f[1] + f[2] + f[5] + f[6]  # all, busy
    start, cores = time.perf_counter(), os.cpu_count() or 1
    try:
        calm, before = 0, ticks()
        while calm < 2 and time.perf_counter() - start < most_s:
            await asyncio.sleep(window_s)
            now = ticks()
            total, busy = now[0] - before[0], now[1] - before[1]
            calm = calm + 1 if total and busy / total * cores < busy_cores else 0
            before = now
    except (OSError, ValueError, IndexError):  # no /proc/stat: a fixed pause instead
        await asyncio.sleep(2.0)
    return time.perf_counter() - start


async def measure(urls: dict[str, str], args, work: Workload, out: dict[str, dict], skipped: dict[str, str]) -> None:
    """Every target in `urls` (started already), phase by phase, taking turns within each: the
    single requests one each in turn, the closed loop's repeats each target in turn (the order
    rotating from repeat to repeat), then each target's open-loop rates. One target: as measured
    alone. Several (--alternate): a slow spell of a shared machine spreads over all of them, and
    each turn waits for the host to settle. Fills `out` (target -> figures; "complete" once all
    are in) as it goes; a target whose warm-up fails goes to `skipped` and the others go on."""
    limits = httpx.Limits(max_connections=max(args.requests, CONCURRENT) + 4)
    async with contextlib.AsyncExitStack() as stack:
        eps = {}
        for target, url in urls.items():
            try:
                client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S,
                                                                           limits=limits))
                ep = Endpoint(target, client, (await client.get("/v1/models")).json()["data"][0]["id"],
                              {"temperature": args.temperature} | ({"seed": args.seed} if args.temperature else {}))
                warm = await request(ep, "warmup", 0, work.warmup, 4, time.perf_counter())
                if warm.error:
                    raise Skipped(f"the warm-up request failed: {warm.error}")
            except (Skipped, httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                skipped[target] = why_skipped(e)
                log(f"{target}: SKIPPED: {skipped[target]}")
                continue
            eps[target] = ep
            out[target] = {"raw": [], "tokens_per_s": [], "errors": 0, "complete": False}
        turns = len(eps) > 1

        async def turn() -> None:
            if turns:
                await settle()
        for i in range(args.single):  # one request alone: the TTFT and TPOT of an idle server
            for target, ep in eps.items():
                await turn()
                out[target]["raw"].append(alone := await request(ep, "single", i, work.single[i],
                                                                 args.concurrent_output_tokens, time.perf_counter()))
                log(f"{target} single request {i + 1}/{args.single}: TTFT {alone.ttft_s * 1e3:.0f} ms, "
                    f"TPOT {alone.tpot_s * 1e3:.1f} ms")
        order = list(eps)
        for r, prompts in enumerate(work.concurrent, 1):
            for target in order[(r - 1) % len(order):] + order[:(r - 1) % len(order)]:
                m = out[target]
                await turn()
                results, wall = await closed_loop(eps[target], r, prompts, args.concurrent_output_tokens)
                m["tokens_per_s"].append(sum(x.tokens for x in results if not x.error) / wall)  # failed ones count 0
                m["errors"] += sum(bool(x.error) for x in results)
                log(f"{target} {CONCURRENT} concurrent, repeat {r}/{args.repeats}: {m['tokens_per_s'][-1]:.1f} tok/s "
                    f"({wall:.1f} s, {sum(bool(x.error) for x in results)} errors)")
                m["raw"] += results
        for target, ep in eps.items():
            if work.rates:
                await turn()
            for rate, (prompts, times) in work.rates.items():
                out[target]["raw"] += await open_loop(ep, rate, prompts, times, work.lengths)
            out[target]["complete"] = True


# --- figures, tables, plots --------------------------------------------------------------------------

def aggregate(results: list[Result]) -> dict:
    ok = [r for r in results if not r.error]
    span = max(r.sent_s + r.latency_s for r in results) - min(r.sent_s for r in results)
    row = {"requests": len(results), "errors": len(results) - len(ok), "counted": sorted({r.counted for r in ok}),
           "mismatched": [f"request {r.index}: {r.tokens}/{r.expected}" for r in ok if r.tokens != r.expected],
           "requests_per_s": len(ok) / span, "tokens_per_s": sum(r.tokens for r in ok) / span}
    for name in ("ttft_s", "tpot_s", "norm_latency_s"):
        values = [v for v in (getattr(r, name) for r in ok) if not math.isnan(v)]
        row[name] = {f"p{q}": percentile(values, q) for q in (50, 95, 99)}
    return row


def summarize(measured: dict[str, dict], skipped: dict[str, str], args) -> tuple[dict, list[dict]]:
    rows, summary = [], {t: {"skipped": why} for t, why in skipped.items()}
    for target, m in measured.items():
        mine = [{"target": target, "rate": rate, **aggregate([r for r in m["raw"] if r.phase == f"rate {rate:g}"])}
                for rate in args.rates]
        rows += mine
        tps = spread(m["tokens_per_s"])
        closed = aggregate([r for r in m["raw"] if r.phase.startswith("concurrent")])
        single = [r for r in m["raw"] if r.phase == "single" and not r.error]
        summary[target] = {"tokens_per_s_16_concurrent": tps["median"], "tokens_per_s_16_concurrent_spread": tps,
                           "errors_16_concurrent": m["errors"], "ttft_s_16_concurrent_p50": closed["ttft_s"]["p50"],
                           "tpot_s_16_concurrent_p50": closed["tpot_s"]["p50"],
                           "ttft_s_single_p50": percentile([r.ttft_s for r in single], 50),
                           "tpot_s_single_p50": percentile([r.tpot_s for r in single], 50),
                           "rates": {f"{row['rate']:g}": {f"{k}_p50": row[k]["p50"] for k in
                                                          ("ttft_s", "tpot_s", "norm_latency_s")} for row in mine}}
    tps = {t: summary[t]["tokens_per_s_16_concurrent"] for t in measured}
    best = max((p for p in PEERS if p in tps), key=tps.get, default=None)
    summary["best_peer"], summary["target_met"] = best, {}
    for ours in (o for o in OURS if o in tps):
        over = {"hf": tps[ours] / tps["hf"] if "hf" in tps else None,
                "best_peer": tps[ours] / tps[best] if best else None}
        summary[f"{ours}_over_hf"], summary[f"{ours}_over_best_peer"] = over["hf"], over["best_peer"]
        summary["target_met"][ours] = {f"{goal:g}x_{k}": None if over[k] is None else over[k] >= goal
                                       for k, goal in (("hf", TARGET_OVER_HF), ("best_peer", TARGET_OVER_PEER))}
    return summary, rows


def print_tables(summary: dict, rows: list[dict], args) -> None:
    def three(p: dict, scale: float, width: int, digits: int) -> str:
        return "/".join(f"{p[q] * scale:>{width}.{digits}f}" for q in ("p50", "p95", "p99"))

    print(f"\nopen loop: {args.requests} requests a rate, prompt {args.prompt_tokens} tokens, chat-like output "
          f"x{args.output_scale:g}; p50/p95/p99 of TTFT (ms), TPOT (ms), normalized latency (s/token)")
    print(f"{'target':<14}{'rate':>5}{'req/s':>7}{'tok/s':>7}{'err':>4}{'mism':>5}  {'TTFT':>17}  {'TPOT':>14}  "
          f"{'norm. latency':>17}")
    for r in rows:
        print(f"{r['target']:<14}{r['rate']:>5g}{r['requests_per_s']:>7.2f}{r['tokens_per_s']:>7.1f}{r['errors']:>4}"
              f"{len(r['mismatched']):>5}  {three(r['ttft_s'], 1e3, 5, 0)}  {three(r['tpot_s'], 1e3, 4, 0)}  "
              f"{three(r['norm_latency_s'], 1, 5, 2)}")
    print(f"\nclosed loop: {CONCURRENT} concurrent x {args.concurrent_output_tokens} tokens, {args.repeats} repeat(s): "
          "output tok/s, median [min-max]")
    for target in args.targets:
        s = summary.get(target, {"skipped": "not run"})
        print(f"{target:<14}" + (f"SKIPPED: {s['skipped'].splitlines()[0]}" if "skipped" in s
                                 else f"{fmt(s['tokens_per_s_16_concurrent_spread']):>22}   "
                                      f"TTFT p50 {s['ttft_s_16_concurrent_p50']:.2f} s, TPOT p50 "
                                      f"{s['tpot_s_16_concurrent_p50'] * 1e3:.0f} ms; alone: TTFT "
                                      f"{s['ttft_s_single_p50'] * 1e3:.0f} ms, TPOT {s['tpot_s_single_p50'] * 1e3:.1f} ms"
                                      f"; {s['errors_16_concurrent']} failed requests"))
    for ours, met in summary["target_met"].items():
        hf, peer = summary[f"{ours}_over_hf"], summary[f"{ours}_over_best_peer"]
        print(f"target {ours}: >= {TARGET_OVER_HF:g}x HF: {'not measured' if hf is None else f'{hf:.2f}x'}; "
              f">= {TARGET_OVER_PEER:g}x best peer ({summary['best_peer'] or 'none ran'}): "
              f"{'not measured' if peer is None else f'{peer:.2f}x'} -> {met}")


def plot(summary: dict, rows: list[dict], args) -> None:
    plt, targets = pyplot(), sorted({r["target"] for r in rows}, key=[r["target"] for r in rows].index)
    if plt is None or not targets:
        return
    for name, key, label in (("latency", "norm_latency_s", "normalized latency (s/token)"),
                             ("ttft", "ttft_s", "TTFT (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for target in targets:
            rates, p = zip(*[(r["rate"], r[key]) for r in rows if r["target"] == target])
            line, = ax.plot(rates, [x["p50"] for x in p], "o-", label=f"{target} p50")
            if key == "norm_latency_s":
                ax.plot(rates, [x["p95"] for x in p], "x--", color=line.get_color(), label=f"{target} p95")
        ax.set(xlabel="request rate (req/s)", ylabel=label, title=f"{label} against load")
        ax.legend(fontsize=8)
        save(fig, plot_path(args.out, "load", name))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(targets, [summary[t]["tokens_per_s_16_concurrent"] for t in targets])
    ax.set(ylabel="output tokens/s", title=f"{CONCURRENT} concurrent, {args.concurrent_output_tokens} tokens each")
    save(fig, plot_path(args.out, "load", "concurrent"))


def config(args, work: Workload) -> dict:
    n = work.lengths
    lengths = {"distribution": f"lognormal(mean {LMSYS_MEAN_OUTPUT} tokens, sigma {SIGMA}), clipped to "
               "[1, max_output_tokens], times output_scale", "source": "LMSYS-Chat-1M mean response length, "
               "Zheng et al. 2023 (arXiv:2309.11998) Table 1", "sampled": n, "mean": sum(n) / len(n),
               "p50": percentile(n, 50), "p90": percentile(n, 90)}
    return {**{k: v for k, v in vars(args).items() if k != "out"}, "concurrent": CONCURRENT, "output_lengths": lengths,
            "arrivals_s": {f"{rate:g}": times for rate, (_, times) in work.rates.items()}}


def parse_args(argv: list[str] | None = None):
    p = bench_parser("load", __doc__)
    p.add_argument("--url", default="", help="benchmark this running OpenAI-compatible endpoint only, instead of "
                   "--targets")
    p.add_argument("--targets", default="disaggregated,colocated,hf",
                   help="comma list of " + ", ".join((*OURS, "hf", *PEERS)))
    p.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model folder")
    p.add_argument("--cpu-placement", choices=("auto", "split", "turns", "off"), default="auto",
                   help="our clusters' engines as `dejavu up --cpu-placement` places them")
    p.add_argument("--prompt-tokens", type=int, default=500, help="prompt length of every request, tokens")
    p.add_argument("--max-output-tokens", type=int, default=1024, help="clip of the sampled output lengths, tokens")
    p.add_argument("--output-scale", type=float, default=0.25, help="multiplies every sampled output length")
    p.add_argument("--rates", default="0.2,0.4,0.8", help="comma list of request rates, req/s ('none': only "
                   "the 16-concurrent closed loop)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="of our engines and vLLM's (llama.cpp serves its f32 GGUF, hf float32)")
    p.add_argument("--requests", type=int, default=16, help="requests per rate (the open loop)")
    p.add_argument("--concurrent-output-tokens", type=int, default=128,
                   help="tokens each request of the closed loop and each single request generates")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the 16-concurrent closed loop")
    p.add_argument("--single", type=int, default=3, help="requests sent alone, one after another, before the "
                   "closed loop (the TTFT and TPOT of an idle server)")
    p.add_argument("--alternate", action="store_true",
                   help="start every target at once and take turns, repeat by repeat, instead of one target after "
                   "another: on a noisy shared machine, ratios between targets then compare like with like "
                   "(needs the memory of all of them at once)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the output lengths and arrival times (and of every request, with --temperature)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="every request's (0: greedy; above, seeded with --seed: what sampling costs the servers)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 requests at 0.5 req/s, 1 repeat of 32 tokens")
    p.add_argument("--out", default="", metavar="FILE.json",
                   help="write the figures to this JSON file (plots beside it)")
    args = p.parse_args(argv)
    try:
        args.rates = [] if args.rates == "none" else [float(r) for r in args.rates.split(",")]
    except ValueError:
        p.error(f"--rates {args.rates!r}: give comma-separated numbers, e.g. 0.2,0.4")
    if args.quick:
        args.requests, args.rates, args.repeats, args.concurrent_output_tokens = 4, [0.5], 1, 32
    args.targets = ["url"] if args.url else list(dict.fromkeys(t.strip() for t in args.targets.split(",") if t.strip()))
    if unknown := set(args.targets) - {"url", *OURS, "hf", *PEERS}:
        p.error(f"--targets: unknown {', '.join(sorted(unknown))}; choose from {', '.join((*OURS, 'hf', *PEERS))}")
    if min(args.rates, default=1) <= 0 or min(args.requests, args.repeats, args.prompt_tokens, args.max_output_tokens,
                                   args.concurrent_output_tokens) < 1 or args.output_scale <= 0:
        p.error("--rates and --output-scale must be > 0, the counts and token numbers >= 1")
    return args


def interrupt(signum, frame):
    raise KeyboardInterrupt  # a SIGTERM ends the run like Ctrl-C: every started process is stopped


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    model_path = resolve_model_path(args.model, progress=log)
    work = workload(args, load_tokenizer(model_path))
    measured, skipped = {}, {}
    groups = [args.targets] if args.alternate else [[t] for t in args.targets]
    for group in groups:
        why = ""
        try:
            with contextlib.ExitStack() as stack:
                urls = {}
                for target in group:
                    log(f"{target}: starting")
                    try:
                        urls[target] = stack.enter_context(started(target, args, model_path))
                    except Exception as e:  # a target that fails is reported and skipped; the run goes on
                        skipped[target] = why_skipped(e)
                        log(f"{target}: SKIPPED: {skipped[target]}")
                        continue
                    log(f"{target}: ready at {urls[target]}")
                if urls:
                    asyncio.run(measure(urls, args, work, measured, skipped))
        except KeyboardInterrupt:
            why = "interrupted"
        except Exception as e:  # a target that fails is reported and skipped; the run goes on
            why = why_skipped(e)
        for target in group:
            if target in measured and not measured[target]["complete"]:
                del measured[target]  # only targets measured whole are reported
            if target not in measured and target not in skipped:
                skipped[target] = why or "not measured whole"
                log(f"{target}: SKIPPED: {skipped[target]}")
        if why == "interrupted":
            log("interrupted; reporting what was measured")
            break
    summary, rows = summarize(measured, skipped, args)
    print_tables(summary, rows, args)
    raw = [{**asdict(r), "tpot_s": r.tpot_s, "norm_latency_s": r.norm_latency_s}
           for m in measured.values() for r in m["raw"]]
    write_json(args.out, summary, config=config(args, work), results=rows, raw=raw)
    plot(summary, rows, args)


if __name__ == "__main__":
    main()
