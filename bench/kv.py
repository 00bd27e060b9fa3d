"""KV microbenchmark: how close each KV transport gets to a memcpy, and what buffered copies save
over one small copy per layer, K/V and token.

What one run does, step by step:

1. start one receiver process per transport (`python -m bench.kv --serve NAME`, which prints its
   address) and connect to it, once for the run: ucx+cma is make_transport("ucx") as the services
   run it (on one host, payloads of 8 MiB or more read by the receiver from the sender's memory,
   those of 64 KiB or more through a shared-memory ring; common/kv/shm.py: below 8 MiB ucx+cma is
   ucx+ring), ucx+ring with rings only, ucx-tcp neither (UCX over loopback TCP); tcp+cma, tcp+ring
   and tcp our TcpTransport likewise; ucx-shm (bench only) ucxx endpoints from worker addresses
   swapped over the receiver's stdin/stdout, error handling off, the receiver on UCX_TLS=SHM_TLS.
   Each connection has a task that always reads it, as a service's KV sender has
   (common/kv/peers.py), and acknowledgements come from it;
2. warm up with two messages of each size on each connection (a ring or the sender's memory is
   offered and taken then);
3. --repeats times:
   - for each size and configuration in turn (memcpy, then the transports): send messages one at
     a time, each received into a preallocated buffer by the Connection.recv allocator (as a token
     service receives KV) and acknowledged by a small frame, for >= 0.3 s and >= 3 messages (2
     from 128 MiB). The limit, memcpy, is np.copyto between two preallocated arrays in this process;
   - streamed, on each connection: 8 messages of 16 MiB (or the smallest size) with at most 2 not
     yet acknowledged, as a prefill's layers go out: the receiver's copy of one overlaps the
     sender's next;
   - the per-hop cost (issue #11): on each connection, a frame of a 64-byte header and no payload
     sent and answered by the receiver's acknowledgement, back to back for >= 0.3 s: the round
     trip a pipeline stage's small activation message would pay, in ms;
4. close the connections, stop the receivers (SIGTERM: they close UCX and exit; else SIGKILL);
5. in this process, copy SmolLM2-135M's float32 KV of --tokens tokens out of and into a pool laid
   out like the token service's (256 blocks of 16 tokens, the request's blocks picked at random):
   buffered (`common.kv.copy.gather`/`scatter`, one strided copy) against naive (one copy per
   layer, K/V and token: the DejaVu paper's baseline), alternating, --repeats times, each timed
   for >= 0.2 s;
6. print median [min-max] over repeats, fractions of memcpy, speedups, the targets (ucx+cma >= 0.7
   of memcpy at 16 and 256 MiB, buffered >= 50x naive, a small frame's round trip <= 0.5 ms).
   GB = 1e9 bytes. Nothing is asserted: this measures, it does not test.

Progress goes to stderr, the tables to stdout. --out FILE.json writes the figures there and the plot
beside it (FILE-throughput.png); without --out, only the plot, as bench/out/kv-throughput.png.
A default run took ~1 min on the 2-vCPU VM of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

from bench.common import bench_parser, fmt, log, plot_path, pyplot, save, spread, write_json
from bench.kv_peer import SHM_TLS, open_shm, serve, transport_of
from common.kv.ucx import UCXX_PROGRESS

MIB = 1 << 20
TRANSPORTS = ("ucx+cma", "ucx+ring", "ucx-tcp", "ucx-shm", "tcp+cma", "tcp+ring", "tcp")
DEFAULT_TRANSPORT = "ucx+cma"  # the product's, on one host
MIN_SECONDS = 0.3  # per measurement
STALL_S = 120.0  # a measurement taking longer has hung (ucx-shm has no error handling)
BLOCK, POOL_BLOCKS, MAX_LEN = 16, 256, 2048  # the pool: 256 blocks of 16 tokens (189 MB of SmolLM2 fp32 KV)
TARGET_FRACTION, TARGET_SPEEDUP = 0.7, 50.0
TARGET_RTT_MS = 0.5  # issue #11: a small frame's round trip
STREAM_MIB, STREAM_MESSAGES, STREAM_WINDOW = 16, 8, 2  # the streamed figure: 8 x 16 MiB, 2 in flight
SMALL_HEADER = b"h" * 64  # a small frame: about what a KV or activation header takes


# --- the sender: this process ----------------------------------------------------------------------

def spawn(name: str, args) -> subprocess.Popen:
    env = {**os.environ, **({"UCX_TLS": SHM_TLS} if name == "ucx-shm" else {}), **args.ucx_env}
    cmd = [sys.executable, "-m", "bench.kv", "--serve", name, "--sizes-mib", str(max(args.sizes))]
    # A session of its own: Ctrl-C reaches only us, and we stop it after closing our end.
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (the receiver closes its transport and exits), SIGKILL if it has not within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        log(f"receiver {proc.pid} ignored SIGTERM: killed")
        proc.kill()


async def read_line(proc: subprocess.Popen) -> str:
    with contextlib.suppress(asyncio.TimeoutError):
        if line := (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)).strip():
            return line
    raise RuntimeError(f"receiver {proc.args[4]} (pid {proc.pid}) gave no address; exit code {proc.poll()}")


async def open_link(name: str, args, stack: contextlib.AsyncExitStack):
    """Start the receiver of `name` and connect to it. The stack closes the connection, then
    stops the receiver."""
    proc = stack.enter_context(spawn(name, args))  # on exit: closes its pipes, waits for it
    stack.callback(stop_process, proc)
    if name == "ucx-shm":
        async def exchange(own: str) -> str:
            proc.stdin.write(own + "\n")
            proc.stdin.flush()
            return await read_line(proc)

        return await read_always(await open_shm(stack, exchange), stack)
    transport = transport_of(name)
    stack.push_async_callback(transport.close)
    return await read_always(await transport.connect(await read_line(proc)), stack)


class Reading:
    """A connection whose frames a task of its own reads as they come (the transport contract's
    always-reading task); `recv` takes the next one from it."""

    def __init__(self, conn):
        self.conn, self.frames = conn, asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())
        if hasattr(conn, "keep_reading"):  # (ucx-shm's is not a Connection)
            conn.keep_reading()

    async def _read(self) -> None:
        while True:
            try:
                frame = await self.conn.recv()
            except Exception as e:  # noqa: BLE001 - handed to whoever waits for a frame
                self.frames.put_nowait(e)
                return
            self.frames.put_nowait(frame)

    async def send(self, header: bytes, payload=None) -> None:
        await self.conn.send(header, payload)

    async def recv(self):
        frame = await self.frames.get()
        if isinstance(frame, Exception):
            raise frame
        return frame


async def read_always(conn, stack: contextlib.AsyncExitStack) -> Reading:
    link = Reading(conn)

    async def stop() -> None:
        link.reader.cancel()
        await asyncio.gather(link.reader, return_exceptions=True)

    stack.push_async_callback(stop)  # before the connection closes (the stack runs it first)
    return link


def steps(links: dict, src: np.ndarray, dst: np.ndarray, nbytes: int) -> dict:
    """One unit of work per configuration: a memcpy, or a message sent and acknowledged."""
    src, dst = src[:nbytes], dst[:nbytes]

    async def memcpy() -> None:
        np.copyto(dst, src)

    def message(conn):
        async def send() -> None:
            await conn.send(b"kv", src)
            await conn.recv()  # the ack: every byte is in the receiver's buffer
        return send

    return {"memcpy": memcpy, **{name: message(conn) for name, conn in links.items()}}


async def rate(step, nbytes: int) -> dict:
    """Repeat `await step()` for >= MIN_SECONDS and >= 3 times (2 from 128 MiB)."""
    least = 3 if nbytes < 128 * MIB else 2
    n, start = 0, time.perf_counter()
    while n < least or time.perf_counter() - start < MIN_SECONDS:
        await step()
        n += 1
    seconds = time.perf_counter() - start
    return {"messages": n, "seconds": seconds, "gbps": n * nbytes / seconds / 1e9}


async def measure_transports(args) -> list[dict]:
    src = np.full(max(args.sizes) * MIB, 7, dtype=np.uint8)
    dst, rows = np.ones_like(src), []
    async with contextlib.AsyncExitStack() as stack:
        links = {name: await open_link(name, args, stack) for name in args.transports}
        log(f"receivers started, connected: {', '.join(links) or 'none'}")
        for size in args.sizes:  # warm-up: a link offers its ring or memory at its second large payload
            for step in steps(links, src, dst, size * MIB).values():
                await asyncio.wait_for(step(), STALL_S)
                await asyncio.wait_for(step(), STALL_S)
        for r in range(1, args.repeats + 1):
            for size in args.sizes:
                for name, step in steps(links, src, dst, size * MIB).items():
                    rows.append({"repeat": r, "config": name, "size_mib": size,
                                 **await asyncio.wait_for(rate(step, size * MIB), STALL_S)})
                    log(f"repeat {r}/{args.repeats} {size:>4} MiB {name:<8} {rows[-1]['gbps']:6.2f} GB/s")
            for name, conn in links.items():
                size = STREAM_MIB if STREAM_MIB in args.sizes else min(args.sizes)
                rows.append({"repeat": r, "config": name, "size_mib": size, "streamed": True,
                             **await asyncio.wait_for(rate(streamed(conn, src[:size * MIB]), STREAM_MESSAGES * size * MIB),
                                                      STALL_S)})
                log(f"repeat {r}/{args.repeats} {size:>4} MiB {name:<8} {rows[-1]['gbps']:6.2f} GB/s streamed")
            for name, conn in links.items():
                rows.append({"repeat": r, "config": name, "size_mib": 0,
                             **await asyncio.wait_for(round_trips(conn), STALL_S)})
                log(f"repeat {r}/{args.repeats} small frame {name:<8} {rows[-1]['rtt_ms']:6.3f} ms a round trip")
    return rows


def streamed(conn, src: np.ndarray):
    """STREAM_MESSAGES messages, up to STREAM_WINDOW of them not yet acknowledged, as a prefill's
    layers stream: the receiver's copy of one overlaps the sender's of the next."""
    async def step() -> None:
        acked = 0
        for i in range(STREAM_MESSAGES):
            if i - acked >= STREAM_WINDOW:
                await conn.recv()
                acked += 1
            await conn.send(b"kv", src)
        for _ in range(STREAM_MESSAGES - acked):
            await conn.recv()
    return step


async def round_trips(conn) -> dict:
    """A header-only frame and its acknowledgement, back to back for >= MIN_SECONDS."""
    n, start = 0, time.perf_counter()
    while n < 10 or time.perf_counter() - start < MIN_SECONDS:
        await conn.send(SMALL_HEADER)
        await conn.recv()
        n += 1
    seconds = time.perf_counter() - start
    return {"messages": n, "seconds": seconds, "rtt_ms": seconds / n * 1e3}


def rtt_table(rows: list[dict], args) -> list[dict]:
    return [{"config": c, "rtt_ms": spread([r["rtt_ms"] for r in rows if r["config"] == c and "rtt_ms" in r])}
            for c in args.transports]


def stream_table(rows: list[dict], transports: list[dict], args) -> list[dict]:
    """The streamed figures, each against the memcpy of its size in `transports` (transport_table's)."""
    memcpy = {t["size_mib"]: t["gbps"] for t in transports if t["config"] == "memcpy"}
    table = []
    for c in args.transports:
        got = [r for r in rows if r.get("streamed") and r["config"] == c]
        if got:
            s = spread([r["gbps"] for r in got])
            table.append({"config": c, "size_mib": got[0]["size_mib"], "gbps": s,
                          "fraction_of_memcpy": s["median"] / memcpy[got[0]["size_mib"]]["median"]})
    return table


def transport_table(rows: list[dict], args) -> list[dict]:
    table = []
    for size in args.sizes:
        gbps = {c: spread([r["gbps"] for r in rows if (r["config"], r["size_mib"]) == (c, size)])
                for c in ("memcpy", *args.transports)}
        table += [{"config": c, "size_mib": size, "gbps": s, "fraction_of_memcpy": s["median"] / gbps["memcpy"]["median"]}
                  for c, s in gbps.items()]
    return table


# --- buffered vs naive copies ----------------------------------------------------------------------

def smollm2_kv():
    """SmolLM2-135M's KVShape, from a config with its numbers (loading the model is not needed)."""
    import torch  # here, not at the top: the receiver processes never need torch
    from transformers import LlamaConfig

    from engine.runner import KVShape

    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    return KVShape.of(SimpleNamespace(config=config, dtype=torch.float32))


def naive(pool, slots: list[int], buf, into_pool: bool) -> None:
    """The paper's baseline: one (kv_heads, head_dim) copy per layer, K/V and token between the
    pool's slots and buf: (layers, 2, tokens, kv_heads, head_dim)."""
    for layer in range(buf.shape[0]):
        for kv in range(2):
            for t, slot in enumerate(slots):
                cell, part = pool[layer, kv, slot], buf[layer, kv, t]
                if into_pool:
                    cell.copy_(part)
                else:
                    part.copy_(cell)


def ms_per_call(fn, min_s: float = 0.2) -> float:
    n, start = 0, time.perf_counter()
    while n < 1 or time.perf_counter() - start < min_s:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e3


def measure_copies(args, kv) -> list[dict]:
    import torch

    from common.kv.copy import gather, scatter
    from engine.attention import slots_of

    # the paged pool (layers, 2, blocks * BLOCK, kv_heads, head_dim); one request's block table,
    # its blocks scattered over the pool as a busy service's are
    blocks = -(-args.tokens // BLOCK)
    pool = torch.empty(kv.layers, 2, POOL_BLOCKS * BLOCK, kv.kv_heads, kv.head_dim, dtype=kv.dtype).normal_()
    table = torch.randperm(POOL_BLOCKS)[:blocks].tolist()
    slots = slots_of(table, BLOCK, 0, args.tokens)
    buf = torch.empty(kv.layers, 2, args.tokens, kv.kv_heads, kv.head_dim, dtype=kv.dtype)
    layers, slot_list = slice(0, kv.layers), slots.tolist()
    ops = {("gather", "buffered"): lambda: gather(pool, slots, layers),
           ("gather", "naive"): lambda: naive(pool, slot_list, buf, into_pool=False),
           ("scatter", "buffered"): lambda: scatter(pool, slots, layers, buf),
           ("scatter", "naive"): lambda: naive(pool, slot_list, buf, into_pool=True)}
    rows = []
    with torch.inference_mode():  # no autograd bookkeeping on either side
        naive(pool, slot_list, buf, into_pool=False)
        if not torch.equal(buf, gather(pool, slots, layers)):
            raise RuntimeError("naive and buffered gather disagree")
        for r in range(1, args.repeats + 1):
            for (op, how), fn in ops.items():
                rows.append({"repeat": r, "op": op, "copy": how, "ms": ms_per_call(fn)})
                log(f"repeat {r}/{args.repeats} {op:<7} {how:<8} {rows[-1]['ms']:8.2f} ms")
    return rows


def copy_table(rows: list[dict]) -> dict:
    ms = {(op, how): spread([r["ms"] for r in rows if (r["op"], r["copy"]) == (op, how)])
          for op in ("gather", "scatter") for how in ("buffered", "naive")}
    med = {key: s["median"] for key, s in ms.items()}
    speedup = {op: med[op, "naive"] / med[op, "buffered"] for op in ("gather", "scatter")}
    speedup["both"] = sum(med[op, "naive"] for op in ("gather", "scatter")) / sum(
        med[op, "buffered"] for op in ("gather", "scatter"))
    return {"ms": [{"op": op, "copy": how, "ms": s} for (op, how), s in ms.items()], "speedup": speedup}


# --- the report ----------------------------------------------------------------------------------

def key(config: str) -> str:
    """A configuration's name in the summary's keys: ucx+ring -> ucx_ring."""
    return config.replace("-", "_").replace("+", "_")


def summarize(transports: list[dict], copies: dict, rtts: list[dict]) -> dict:
    fraction = {(t["config"], t["size_mib"]): t["fraction_of_memcpy"] for t in transports if t["config"] != "memcpy"}
    s = {"default_transport": DEFAULT_TRANSPORT}
    s.update({f"small_frame_rtt_ms_{key(r['config'])}": r["rtt_ms"]["median"] for r in rtts})
    s.update({f"transport_fraction_of_memcpy_{n}mib": fraction.get((DEFAULT_TRANSPORT, n)) for n in (16, 256)})
    s.update({f"fraction_of_memcpy_{key(c)}_{n}mib": f for (c, n), f in fraction.items()})
    sp = copies["speedup"]
    s.update(buffered_speedup=sp["both"], buffered_speedup_gather=sp["gather"], buffered_speedup_scatter=sp["scatter"])
    for n in (16, 256):
        f = s[f"transport_fraction_of_memcpy_{n}mib"]
        s[f"target_met_transport_{n}mib"] = None if f is None else f >= TARGET_FRACTION
    s["target_met_buffered"] = sp["both"] >= TARGET_SPEEDUP
    s["target_met"] = all(v for k, v in s.items() if k.startswith("target_met_") and v is not None)
    return s


def print_report(transports: list[dict], copies: dict, summary: dict, kv, args, rtts: list[dict]) -> None:
    configs, cell = ["memcpy", *args.transports], {(t["config"], t["size_mib"]): t for t in transports}
    print(f"\nKV transports, GB/s, median [min-max] over {args.repeats} repeat(s) (fraction of memcpy)")
    print(f"{'MiB':>5}" + "".join(f"  {c:>28}" for c in configs))
    for n in args.sizes:
        print(f"{n:>5}" + "".join(f"  {fmt(cell[c, n]['gbps'], 2):>20} ({cell[c, n]['fraction_of_memcpy']:4.2f})"
                                  for c in configs))
    print(f"\nKV copies, ms: SmolLM2-135M ({kv.layers} layers x 2 x {kv.kv_heads} x {kv.head_dim}, float32), {args.tokens} "
          f"tokens = {args.tokens * kv.bytes_per_token / 1e6:.1f} MB, pool {POOL_BLOCKS} blocks x {BLOCK}")
    ms = {(m["op"], m["copy"]): m["ms"] for m in copies["ms"]}
    print(f"{'op':<8}  {'buffered':>22}  {'naive':>22}  {'naive/buffered':>14}")
    for op in ("gather", "scatter", "both"):
        times = [fmt(ms[op, how], 2) if op != "both" else "" for how in ("buffered", "naive")]
        print(f"{op:<8}  {times[0]:>22}  {times[1]:>22}  {copies['speedup'][op]:>13.1f}x")
    for n in (16, 256):
        f = summary[f"transport_fraction_of_memcpy_{n}mib"]
        verdict = "not measured" if f is None else f"{'MET' if f >= TARGET_FRACTION else 'NOT MET'} ({f:.2f})"
        print(f"target: {DEFAULT_TRANSPORT} >= {TARGET_FRACTION:g} of memcpy at {n} MiB: {verdict}")
    print(f"target: buffered copies >= {TARGET_SPEEDUP:g}x naive (gather + scatter): "
          f"{'MET' if summary['target_met_buffered'] else 'NOT MET'} ({copies['speedup']['both']:.1f}x)")
    print(f"\nSmall frame ({len(SMALL_HEADER)}-byte header, no payload) and its acknowledgement, ms a round trip, "
          f"median [min-max] (issue #11 target: <= {TARGET_RTT_MS:g} ms on one host)")
    for r in rtts:
        verdict = "MET" if r["rtt_ms"]["median"] <= TARGET_RTT_MS else "NOT MET"
        print(f"  {r['config']:<8}  {fmt(r['rtt_ms'], 3):>24}  {verdict}")


def plot(transports: list[dict], args) -> None:
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in ("memcpy", *args.transports):
        rows = [t["gbps"] for t in transports if t["config"] == config]
        err = [[g["median"] - g["min"] for g in rows], [g["max"] - g["median"] for g in rows]]
        ax.errorbar(args.sizes, [g["median"] for g in rows], yerr=err, marker="o", capsize=3, label=config)
    ax.set(xscale="log", yscale="log", xlabel="message size (MiB)", ylabel="GB/s (median, min-max)",
           title="KV transports between two processes vs in-process memcpy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, plot_path(args.out, "kv", "throughput"))


def parse_args(argv: list[str] | None = None):
    p = bench_parser("kv", __doc__)
    p.add_argument("--sizes-mib", default="1,16,256", help="comma-separated message sizes, MiB")
    p.add_argument("--transports", default=",".join(TRANSPORTS),
                   help="comma-separated, of " + ",".join(TRANSPORTS) + " (default: all of them)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of every configuration")
    p.add_argument("--tokens", type=int, default=500,
                   help=f"tokens of the request whose KV is copied in step 5 (<= {MAX_LEN}; its blocks are scattered "
                   "over the pool)")
    p.add_argument("--ucx-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra UCX setting for both ends of the ucx transports (repeatable; none by default)")
    p.add_argument("--quick", action="store_true", help="smoke run: sizes 1,16 MiB, 1 repeat")
    p.add_argument("--out", default="", metavar="FILE.json",
                   help="write the figures to this JSON file (the plot beside it)")
    p.add_argument("--serve", choices=TRANSPORTS, help=argparse.SUPPRESS)  # a receiver process
    args = p.parse_args(argv)
    try:
        args.sizes = [1, 16] if args.quick else [int(s) for s in args.sizes_mib.split(",")]
    except ValueError:
        p.error(f"--sizes-mib {args.sizes_mib!r}: give comma-separated integers, e.g. 1,16,256")
    args.repeats = 1 if args.quick else args.repeats
    args.transports = list(dict.fromkeys(t for t in args.transports.split(",") if t))
    if unknown := set(args.transports) - set(TRANSPORTS):
        p.error(f"--transports: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TRANSPORTS)}")
    if bad := [e for e in args.ucx_env if not e.startswith("UCX_") or "=" not in e]:
        p.error(f"--ucx-env {bad[0]!r}: expected KEY=VALUE with a UCX_ key, e.g. UCX_TCP_SNDBUF=4M (ucxx's UCXPY_ "
                "progress settings are fixed: UCXX_PROGRESS in common/kv/ucx.py)")
    args.ucx_env = dict(e.split("=", 1) for e in args.ucx_env)
    if min(args.sizes) < 1 or args.repeats < 1 or not 1 <= args.tokens <= MAX_LEN:
        p.error(f"--sizes-mib and --repeats must be >= 1, --tokens in [1, {MAX_LEN}]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve, max(args.sizes) * MIB))
        return
    os.environ.update(args.ucx_env)  # ucxx reads its settings at import, here and in the receivers
    transfer_rows = asyncio.run(measure_transports(args))
    kv = smollm2_kv()
    copy_rows = measure_copies(args, kv)
    rtts = rtt_table(transfer_rows, args)
    transfer_rows_sized = [r for r in transfer_rows if r["size_mib"] and not r.get("streamed")]
    transports, copies = transport_table(transfer_rows_sized, args), copy_table(copy_rows)
    streams = stream_table(transfer_rows, transports, args)
    summary = summarize(transports, copies, rtts)
    summary.update({f"streamed_fraction_of_memcpy_{key(t['config'])}": t["fraction_of_memcpy"] for t in streams})
    print_report(transports, copies, summary, kv, args, rtts)
    print(f"\nStreamed: {STREAM_MESSAGES} messages, at most {STREAM_WINDOW} not yet acknowledged (as a prefill's layers "
          f"go), GB/s median [min-max] (fraction of memcpy at the same size)")
    for t in streams:
        print(f"  {t['config']:<8}  {t['size_mib']:>4} MiB  {fmt(t['gbps'], 2):>24}  ({t['fraction_of_memcpy']:.2f})")
    config = {**{k: v for k, v in vars(args).items() if k not in ("out", "serve", "sizes_mib")},
              "kv_shape": {**vars(kv), "dtype": str(kv.dtype)}, "pool": {"blocks": POOL_BLOCKS, "block_size": BLOCK},
              "shm_tls": SHM_TLS, "min_seconds": MIN_SECONDS,
              "ucx_env_sender": {k: v for k, v in sorted(os.environ.items()) if k.startswith("UCX")},
              "ucxx_progress": UCXX_PROGRESS}
    write_json(args.out, summary, config=config, transports=transports, copies=copies, small_frames=rtts, streamed=streams,
               raw={"transports": transfer_rows, "copies": copy_rows})
    plot(transports, args)


if __name__ == "__main__":
    main()
