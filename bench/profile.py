"""`dejavu profile`: measure this machine and this model, for `dejavu plan` and `dejavu simulate`.

    dejavu profile [--model smollm2] [--dtype auto] [--stages 1] [--quick] [--no-serving] [--out profile.json]

Step by step (about two minutes on the bundled model on 2 cores; --quick: a few seconds):
1. load the model (--model, --dtype) and a ModelRunner as the services build it (our kernels,
   the paged KV pool);
2. prefill: for each batch in --prefill-batches and length in --prompt-lens, one forward of that
   many distinct random prompts with no pool (a prompt service's), a warm-up then --repeats
   times: the median;
3. decode: for each batch in --decode-batches and KV length in --kv-lens, one decode step over a
   pool holding that much KV per sequence (blocks scattered, as on a busy service), a warm-up
   then --steps times: the median. With --stages S, the S stages' forwards back to back in this
   process (the hops between stage processes are not counted);
   in 2 and 3 the points take turns, one timing each per round, so that a slow moment of a noisy
   machine spreads over every point instead of skewing one;
4. m, the KV streaming overhead: a 512-token prefill (shorter if the model's context is) whose
   K/V is copied into one buffer every fifth of the layers and sent over a local socket to a
   reader thread, as a prompt service streams it, against the same prefill without; alternated
   --repeats times, the ratio of the medians (below 1 is noise: recorded as 1, the ratio kept);
5. the serving overhead (unless --no-serving; --quick skips it unless --serving is given): what a
   decode step costs in a serving cluster beyond the same step in this process, measured through a
   local cluster and fitted as a + c·b seconds a step (bench/serving_overhead.py says how);
6. write the profile (planner/profile.py) to --out: the samples, KV bytes per token, weights,
   the machine's memory and CPU, the serving overhead, and how each was measured.

Lengths past the model's context are dropped. Progress goes to stderr, a summary to stdout.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

from bench.common import log, machine
from bench.serving_overhead import serving_overhead

QUICK = {"prefill_batches": [1, 2], "prompt_lens": [16, 32], "decode_batches": [1, 2], "kv_lens": [16, 32],
         "repeats": 1, "steps": 2, "serving_batches": [1, 2], "serving_repeats": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="as `dejavu up --dtype` (auto: the model's dtype on CUDA, float32 on CPU)")
    p.add_argument("--stages", type=int, default=1, help="token-service pipeline stages to time the decode step of")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block of the paged KV pool")
    p.add_argument("--prefill-batches", type=_ints, default=[1, 4], help="comma list: prompts per prefill forward")
    p.add_argument("--prompt-lens", type=_ints, default=[128, 512, 1024], help="comma list: prompt lengths (tokens)")
    p.add_argument("--decode-batches", type=_ints, default=[1, 4, 16, 32], help="comma list: sequences per decode step")
    p.add_argument("--kv-lens", type=_ints, default=[128, 512, 1024], help="comma list: KV tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per point (and of m)")
    p.add_argument("--steps", type=int, default=5, help="timed decode steps per point")
    p.add_argument("--serving", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the serving overhead through a local cluster (default: on, off with --quick)")
    p.add_argument("--serving-layout", choices=("disaggregated", "colocated"), default="disaggregated",
                   help="the cluster of the serving overhead: 1 prompt + 1 token service, or 1 colocated token "
                   "service (each with a cache store, CPU placement auto, as `dejavu up`)")
    p.add_argument("--serving-batches", type=_ints, default=[1, 8],
                   help="comma list: requests sent at once, each count in turn in every serving round")
    p.add_argument("--serving-repeats", type=int, default=3, help="serving rounds")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 x 2 tiny points each, 1 repeat, "
                   "no serving overhead (for tests; the figures are too coarse to plan with)")
    p.add_argument("--out", default="profile.json", help="where to write the profile (JSON)")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,4,16") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return sorted(set(values))


def check(args, p: argparse.ArgumentParser) -> None:
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.serving is None:
        args.serving = not args.quick
    if not 1 <= args.stages <= 64 or args.threads < 0 or args.block_size < 1 or \
            min(args.repeats, args.steps, args.serving_repeats) < 1:
        p.error("--stages must be in 1..64, --threads >= 0, --block-size, --repeats, --steps and --serving-repeats "
                ">= 1")


def run(args):
    """Measure; returns the planner's Profile (not yet written)."""
    import torch

    from common.model import load_model, resolve_model_path
    from engine.runner import ModelRunner, stage_layers
    from planner.profile import Profile, Sample

    start = time.monotonic()
    path = resolve_model_path(args.model, progress=log)
    model = load_model(path, args.threads, args.dtype)
    runner = ModelRunner(model, block_size=args.block_size)
    layers = runner.kv.layers
    stages = [ModelRunner(model, args.block_size, layers=stage_layers(layers, args.stages, s))
              for s in range(args.stages)] if args.stages > 1 else [runner]
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 20
    log(f"{path.name}: {layers} layers, {runner.dtype_name}, {runner.name}, {torch.get_num_threads()} threads, "
        f"context {context}")
    with torch.inference_mode():
        prefill = [Sample(b, n, s) for b, n, s in _prefill_grid(runner, args, context)]
        decode = [Sample(b, n, s) for b, n, s in _decode_grid(stages, args, context)]
        m, ratio = _stream_overhead(runner, min(512, context), args.repeats)
        steps = lambda points: _decode_steps(stages, points, args.steps, "")  # noqa: E731
        a, c, serving = serving_overhead(args, context, stages[0].vocab_size, steps) if args.serving else (0.0, 0.0, {
            "skipped": "--no-serving" if not args.quick else "--quick"})
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    info = machine()
    cpu = info["cpu"] + (f" + {torch.cuda.get_device_name(0)}" if runner.device.type == "cuda" else "")
    memory = (torch.cuda.get_device_properties(0).total_memory if runner.device.type == "cuda"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    meta = {**info, "engine": runner.name, "m_ratio": ratio, "quick": args.quick, "serving": serving,
            "seconds": round(time.monotonic() - start, 1), "how": "dejavu profile (bench/profile.py)"}
    return Profile(model=args.model, dtype=runner.dtype_name, stages=args.stages, cpu=cpu, block_size=args.block_size,
                   layers=layers, kv_bytes_per_token=runner.kv.bytes_per_token, weights_bytes=weights,
                   memory_bytes=memory, m=m, prefill=tuple(prefill), decode=tuple(decode), serving_step_s=a,
                   serving_token_s=c, meta=meta)


def _median_s(fn, times: int) -> float:
    return _interleaved([fn], times, "")[0]


def _interleaved(fns: list, rounds: int, what: str) -> list[float]:
    """Median seconds of each fn, timed round-robin `rounds` times after one warm-up each (oneDNN
    builds its kernels on first use): a slow moment of a noisy machine then hits every point
    once, not one point every time."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for fn, mine in zip(fns, samples):
            start = time.perf_counter()
            fn()
            mine.append(time.perf_counter() - start)
        if what:
            log(f"{what}: round {r + 1}/{rounds} of {len(fns)} points")
    return [statistics.median(s) for s in samples]


def _prefill_grid(runner, args, context: int):
    import torch

    from engine.attention import Segment

    points = [(b, n) for b in args.prefill_batches for n in args.prompt_lens if n <= context]
    if not points:
        raise ValueError(f"--prompt-lens: every length is past the model's context ({context} tokens)")
    gen = torch.Generator().manual_seed(0)
    batches = [[Segment(p) for p in torch.randint(0, runner.vocab_size, (b, n), generator=gen).tolist()]
               for b, n in points]
    seconds = _interleaved([lambda segments=segments: runner.forward(segments) for segments in batches],
                           args.repeats, "prefill")
    for (b, n), s in zip(points, seconds):
        log(f"prefill {b} x {n} tokens: {s * 1e3:.1f} ms")
    return [(b, n, s) for (b, n), s in zip(points, seconds)]


def _decode_grid(stages, args, context: int):
    points = [(b, n) for b in args.decode_batches for n in args.kv_lens if n < context]
    if not points:
        raise ValueError(f"--kv-lens: every length is past the model's context ({context} tokens)")
    seconds = _decode_steps(stages, points, args.steps, "decode")
    for (b, n), s in zip(points, seconds):
        log(f"decode {b} sequences x {n} KV tokens: {s * 1e3:.1f} ms a step")
    return [(b, n, s) for (b, n), s in zip(points, seconds)]


def _decode_steps(stages, points: list[tuple[int, int]], rounds: int, what: str) -> list[float]:
    """Median seconds of one decode step of each (batch, KV length) point (_interleaved)."""
    import torch

    from engine.attention import Segment

    size = stages[0].block_size
    per_seq = -(-(max(n for _, n in points) + 1) // size)
    blocks = per_seq * max(b for b, _ in points) + 8
    pools = [s.new_pool(blocks) for s in stages]  # zeros: the values do not change the time
    token = min(100, stages[0].vocab_size - 1)

    def step(segments) -> None:  # the stages back to back, each handing its hidden states on
        hidden = None
        for runner, pool in zip(stages, pools):
            hidden = runner.forward(segments, pool, hidden=hidden)

    steps = []
    for b, n in points:
        need = -(-(n + 1) // size)
        order = torch.randperm(blocks)[: need * b].view(b, need).tolist()  # blocks scattered over the pool
        segments = [Segment([token], n, order[i]) for i in range(b)]
        steps.append(lambda segments=segments: step(segments))
    return _interleaved(steps, rounds, what)


def _stream_overhead(runner, tokens: int, repeats: int) -> tuple[float, float]:
    """(m, the measured ratio): a prefill streaming its KV out against one that does not."""
    import torch

    from engine.attention import Segment

    kv, layers = runner.kv, runner.kv.layers
    every = -(-layers // 5)  # prompt_service/engine.py's default: a message every fifth of the layers
    slab = torch.empty(every, 2, tokens, kv.kv_heads, kv.head_dim, dtype=runner.dtype)
    sender, reader = socket.socketpair()
    drain = threading.Thread(target=_drain, args=(reader,), daemon=True)
    drain.start()

    def on_layer(layer: int, k, v) -> None:  # k, v: (tokens, kv_heads, head_dim)
        slab[layer % every, 0].copy_(k)
        slab[layer % every, 1].copy_(v)
        if layer % every == every - 1 or layer == layers - 1:
            sender.sendall(slab[: layer % every + 1].contiguous().view(torch.uint8).numpy())

    prompt = [Segment(torch.randint(0, runner.vocab_size, (tokens,)).tolist())]
    plain, streamed = [], []
    try:
        for _ in range(repeats):
            plain.append(_median_s(lambda: runner.forward(prompt), 1))
            streamed.append(_median_s(lambda: runner.forward(prompt, None, on_layer), 1))
    finally:
        sender.close()
        drain.join(timeout=5)
        reader.close()
    ratio = statistics.median(streamed) / statistics.median(plain)
    log(f"m: a {tokens}-token prefill {statistics.median(plain) * 1e3:.1f} ms, streaming its KV "
        f"{statistics.median(streamed) * 1e3:.1f} ms: ratio {ratio:.3f}")
    return max(1.0, ratio), ratio


def _drain(sock: socket.socket) -> None:
    buf = bytearray(1 << 20)
    while sock.recv_into(buf):
        pass


def report(profile) -> None:
    print(f"profile of {profile.model} ({profile.dtype}, {profile.stages} stage(s)) on {profile.cpu}")
    print(f"  KV {profile.kv_bytes_per_token} bytes/token, weights {profile.weights_bytes / 2**20:.1f} MiB, "
          f"memory {profile.memory_bytes / 2**30:.1f} GiB, m {profile.m:.3f}")
    serving = profile.meta.get("serving", {})
    print(f"  serving overhead {profile.serving_step_s * 1e3:.1f} ms + {profile.serving_token_s * 1e3:.2f} ms x batch "
          f"a decode step" + (f" (not measured: {serving['skipped']})" if "skipped" in serving else ""))
    for s in profile.prefill:
        print(f"  prefill {s.batch:>3} x {s.tokens:>5} tokens  {s.seconds * 1e3:9.1f} ms")
    for s in profile.decode:
        print(f"  decode  {s.batch:>3} x {s.tokens:>5} KV      {s.seconds * 1e3:9.1f} ms a step")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dejavu profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    check(args, p)
    return write(args)


def write(args) -> int:
    profile = run(args)
    profile.save(args.out)
    log(f"wrote {args.out} ({profile.meta['seconds']:.0f} s)")
    report(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
