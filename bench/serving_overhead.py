"""The serving overhead of `dejavu profile` (its step 5): what a decode step costs in a serving
cluster beyond the same step in the profiling process. On 2 cores it was mostly the forward itself
running slower in the service, until each engine process kept one OpenMP team and ucxx's progress
thread stopped waking every millisecond (docs/BENCHMARKS.md §5); the rest is scheduling, sampling
and the streams.

A local cluster as `dejavu up` starts it (--serving-layout: 1 prompt + 1 token service, or one
colocated token service; a cache store; CPU placement auto; with --stages S a token pipeline of S
processes) serves streaming greedy requests of 128 prompt tokens (random ids) and 64 output tokens
(ignore_eos) from this process: each round sends, in turn, each --serving-batches count of them at
once; --serving-repeats rounds after a warm-up. The time a step of a burst, as the client sees it:
over the window in which every request of the burst is decoding (from the last first token to the
first last token, so that no prefill is in it), the span of each stream's chunks over their gaps (a
chunk is a token, but for a held-back partial character); its median over the rounds, less the
in-process decode step at the same batch and mean KV length, timed once the cluster has stopped, is
the overhead at that batch. A least-squares line through them, overhead(b) = a + c·b seconds a
step, used clipped at 0 (planner/profile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass

from bench.common import log, sse_chunks

SERVING_TOKENS = (128, 64)   # (prompt, output) tokens of every serving request; --quick: QUICK_SERVING_TOKENS
QUICK_SERVING_TOKENS = (16, 8)


class ServingError(RuntimeError):
    """The serving measurement could not run (the cluster did not start, a request failed)."""


@dataclass
class Stream:
    times: list[float]   # perf_counter when each chunk with text arrived (a token each, mostly)
    prompt_tokens: int   # as the gateway counted them (usage)


def steady_step(streams: list[Stream]) -> tuple[float, float]:
    """(seconds a step, mean KV length of those steps) of a burst, over the window in which every
    stream is decoding: from the last first chunk to the first last chunk, so that no prefill of
    the burst falls in it. A chunk's index is taken as its token's: the step after chunk k holds
    prompt + k tokens of KV. ServingError if the window holds no step."""
    start, end = max(s.times[0] for s in streams), min(s.times[-1] for s in streams)
    span = gaps = kv = 0.0
    for s in streams:
        inside = [k for k, t in enumerate(s.times) if start <= t <= end]
        if len(inside) > 1:
            span += s.times[inside[-1]] - s.times[inside[0]]
            gaps += len(inside) - 1
            kv += sum(s.prompt_tokens + k for k in inside[:-1])
    if not gaps:
        raise ServingError("no step had every request of a burst decoding: the requests are too short")
    return span / gaps, kv / gaps


def serving_overhead(args, context: int, vocab: int, steps) -> tuple[float, float, dict]:
    """(a, c, what was measured): the line a + c·b through the measured overheads. steps(points):
    the in-process seconds of a decode step at each (batch, KV length) point."""
    from planner.profile import fit_overhead

    prompt, output = QUICK_SERVING_TOKENS if args.quick else SERVING_TOKENS
    prompt = max(1, min(prompt, context - output - 1))
    started = time.monotonic()
    measured, placement = _serve(args, prompt, output, vocab)
    served = {b: statistics.median(s for s, _ in rounds) for b, rounds in measured.items()}
    kv = {b: round(statistics.mean(k for _, k in rounds)) for b, rounds in measured.items()}
    forward = dict(zip(measured, steps([(b, kv[b]) for b in measured])))
    points = []
    for b in measured:
        points.append({"batch": b, "kv_len": kv[b], "served_step_s": served[b], "step_s": forward[b],
                       "overhead_s": served[b] - forward[b], "served_step_s_rounds": [s for s, _ in measured[b]]})
        log(f"serving: {b} at once: {served[b] * 1e3:.1f} ms a step served, {forward[b] * 1e3:.1f} ms in process "
            f"at {kv[b]} KV tokens: overhead {(served[b] - forward[b]) * 1e3:.1f} ms")
    a, c = fit_overhead([(p["batch"], p["overhead_s"]) for p in points])
    log(f"serving overhead: {a * 1e3:.1f} ms + {c * 1e3:.2f} ms x batch a decode step (clipped at 0)")
    return a, c, {"layout": args.serving_layout, "placement": placement, "prompt_tokens": prompt,
                  "output_tokens": output, "repeats": args.serving_repeats, "points": points,
                  "fit": "least squares overhead_s = a + c * batch over the points, used as max(0, a + c * batch)",
                  "seconds": round(time.monotonic() - started, 1)}


def _serve(args, prompt: int, output: int, vocab: int) -> tuple[dict[int, list[tuple[float, float]]], str]:
    """Start the cluster, run the rounds, stop it: {batch: [(s a step, mean KV) a round]}, the placement."""
    from dejavu.cluster import ClusterError
    from dejavu.redis_server import RedisNotInstalled

    cluster, placement = _cluster(args)
    rng = random.Random(0)  # fresh random prompts: no prefix is shared
    prompts = ([rng.randrange(100, vocab) for _ in range(prompt)] for _ in itertools.count())
    try:
        with _sigterm_interrupts(), cluster:
            log(f"serving: cluster ready at {cluster.url}")
            return asyncio.run(_rounds(cluster.url, args, prompts, output)), placement
    except (ClusterError, RedisNotInstalled, OSError) as exc:
        raise ServingError(f"the serving measurement's cluster: {exc}") from None


@contextlib.contextmanager
def _sigterm_interrupts():
    """A SIGTERM ends the measurement as Ctrl-C does, so that the cluster is stopped (its processes
    run in sessions of their own: they would outlive us). Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _cluster(args):
    """The cluster `dejavu up` starts for --serving-layout (a cache store, CPU placement auto)."""
    import torch

    from dejavu.cluster import Cluster
    from dejavu.placement import describe, host_cores, plan

    prompts = 0 if args.serving_layout == "colocated" else 1
    cores, why_not = host_cores()
    placement = plan(cores, prompts, 1, "auto", args.stages) if cores else {}
    line = describe(placement, cores) if placement else f"off ({why_not})"
    log(f"serving: starting {args.serving_layout} ({prompts} prompt + 1 token service"
        f"{f' of {args.stages} stages' if args.stages > 1 else ''}, 1 cache store), CPU placement: {line}")
    if placement and placement["token-0"].threads != torch.get_num_threads():  # the overhead would absorb it
        log(f"serving: WARNING: the token service runs {placement['token-0'].threads} torch threads, the in-process "
            f"steps {torch.get_num_threads()} (--threads): the difference counts as serving overhead")
    env = {"DEJAVU_MAX_SEQS": str(max(16, *args.serving_batches)), "DEJAVU_DTYPE": args.dtype,
           "DEJAVU_BLOCK_SIZE": str(args.block_size), "DEJAVU_COLOCATED": str(prompts == 0).lower()}
    return Cluster(model=args.model, port=0, prompt_services=prompts, token_services=1, cache_stores=1, env=env,
                   echo_logs=False, placement=placement, stages=args.stages), line


async def _rounds(url: str, args, prompts, output: int) -> dict[int, list[tuple[float, float]]]:
    import httpx

    measured: dict[int, list[tuple[float, float]]] = {b: [] for b in args.serving_batches}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for b in sorted({1, max(args.serving_batches)}):  # warm-up: the kernels of these shapes
            await _burst(client, prompts, b, 4)
        for r in range(args.serving_repeats):
            for b in args.serving_batches:
                measured[b].append(steady_step(await _burst(client, prompts, b, output)))
            log(f"serving: round {r + 1}/{args.serving_repeats}: " + ", ".join(
                f"{b} at once {rounds[-1][0] * 1e3:.1f} ms a step" for b, rounds in measured.items()))
    return measured


async def _burst(client, prompts, batch: int, tokens: int) -> list[Stream]:
    return list(await asyncio.gather(*(_stream(client, next(prompts), tokens) for _ in range(batch))))


async def _stream(client, ids: list[int], tokens: int) -> Stream:
    """One streaming greedy completion of exactly `tokens` tokens (ignore_eos), timed chunk by chunk."""
    import httpx

    body = {"prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    times, usage = [], {}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            async for chunk in sse_chunks(resp):
                if any(c.get("text") for c in chunk.get("choices") or []):
                    times.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except (httpx.HTTPError, RuntimeError) as exc:
        raise ServingError(f"a serving request failed: {type(exc).__name__}: {exc}") from None
    if usage.get("completion_tokens") != tokens or not times:
        raise ServingError(f"a serving request got {usage.get('completion_tokens')} tokens, not {tokens}")
    return Stream(times, usage["prompt_tokens"])
