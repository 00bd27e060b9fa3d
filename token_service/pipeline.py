"""A token service as a pipeline of stages (`--stages S`): S processes, each holding a contiguous
range of the model's layers and the paged KV of those layers only, so that a model bigger than one
device (or host) can be served.

    gateway ──HTTP──> stage 0, the head: the token service the gateway sees (its API, scheduler,
                      block tables, sampling), layers [0, a) with the embedding
                        │ step frames: segments + the residual stream after layer a
                        v
                      stage 1: layers [a, b)      (python -m token_service --stage 1 ...)
                        │
                        v
                      stage S-1: layers [.., L), the final norm and LM head
                        │ logits of each segment's last token, straight back to the head
                        └──────> head

This module holds the frames and the head's side (Pipeline); a stage worker is token_service/
stage.py, its process token_service/stage_app.py.

Every stage registers in Redis (kind "stage": its pipeline id, index, layer range, transport
address); the head registers as a token service only once it has found its stages there and set
the pipeline up. Activations move stage to stage over the KV transport (UCX or TCP), never through
Redis or HTTP.

A stage holds no request state but what prompt KV needs: the head allocates every block (all
pools have the same number of blocks, so one block table serves every stage) and sends each step's
block tables with it.

Prompt KV goes straight to the stage that holds its layers (DéjàVu's stream_out/stream_in,
regrouping layers when the prompt side has another shape): the head's reservation names each
stage's address and layer range (Reservation.kv_routes), and the prompt service sends each layer's
KV to its owner. A stage accepts KV messages on the address its pipeline links use (the first frame
of a connection says which it is), for requests the head announced in a "reserve" frame (their
prompt's blocks), until a "release" frame; it acknowledges each message once it is in its pool, so
a prompt service answers only when every stage has its layers. Before a sequence's first step, the
head asks its stages how much of the prompt each layer has ("landed"): the answer comes back down
the chain after every earlier frame, and the steps after it are read after the KV was written.
KV that comes to the head for later layers anyway (from an older prompt service) is sent on in a
"kv" frame; frames on a link arrive in order, so it is in place before the first step.

Replication (issue #11's per-stage fault tolerance): the head picks a request's cache store and the
tokens to replicate (token_service/replicator.py) and sends its own layers' KV there; a "replicate"
frame goes down the chain in order with the steps, and each stage copies its layers' K/V of those
tokens when the frame's turn comes (a later step may reuse the blocks), sends them straight to the
same store, records them in Redis under its own layer range (common/metadata.py: the request's
index is the least over the layers), and reports back to the head ("replicated", down the chain
and back on the results link). The head sends the request's next message once every stage has
reported; a stage that failed starts the replica over. A replica on the store is one per request
whatever the pipeline's depth (cache_store/store.py keeps per layer the tokens it has), so any
token service, a pipeline of any depth or one process, resumes from it. A restore on a pipeline
fetches the same way: the head its own layers, each stage its own (a "fetch" frame, in order with
the frames before it; the stage reads its layer range from the store into the blocks the frame
names and reports "fetched"), so no stage's KV passes through the head.

Failure: a link that breaks ends the pipeline. A stage whose downstream link breaks closes its
upstream one; the head then fails (its decode loop dies, the process exits and its lease lapses),
its streams resume on another token service as after any token-service death, and the head,
restarted, sets the pipeline up again with whatever stages are registered. A stage that loses its
upstream link waits for the next setup.

Frames (transport frames: a JSON header, one payload):
  head -> 1 -> ... -> S-1   {"op": "setup", "session", "pipeline", "links": [[address, start, stop], ...], ...}
                            {"op": "reserve", "request", "prompt"}: payload = meta (the prompt's blocks)
                            {"op": "release", "request"}
                            {"op": "landed", "step", "request"}: payload = the counts so far (int64, a layer each)
                            {"op": "kv", "stage", "layers", "tokens", "dtype", "shape", "meta"}: payload = meta + KV slab
                            {"op": "step", "step", "dtype", "shape", "meta"}: payload = meta + hidden states
                            {"op": "replicate", "step", "request", "epoch", "gen", "tokens", "store", "store_id",
                             "num_layers"}: payload = meta (the block table)
                            {"op": "fetch", "step", "request", "epoch", "tokens", "store", "store_id",
                             "store_url"}: payload = meta
  head -> S-1               {"op": "results", "session"}: the link the last stage answers on
  S-1 -> head               {"op": "ready"} | {"op": "result", "step", "shape"} | {"op": "error", "step", "message"}
  k -> k+1 -> .. -> head     {"op": "replicated", "step", "stage", "error"?, "fenced"?}: stage k's report
                            {"op": "fetched", "step", "stage", "error"?}: likewise, of a "fetch"
`meta` is the byte length of a JSON prefix of the payload (block tables, segments), padded to 16.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import Unavailable
from common.protocol import FETCH_TIMEOUT_S, STAGE_MARGIN_S
from common.kv.transport import Connection, Transport, TransportError
from common.kv.wire import numpy_dtype
from common.metadata import Registry
from common.protocol import ServiceInfo, ServiceKind
from common.service import answers_health
from engine.attention import Segment
from engine.runner import ModelRunner

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 30.0
STEP_TIMEOUT_S = 60.0  # a step not back by then means a hung stage: the pipeline ends (a CPU step takes < 1 s)
STAGE_CHECK_S = 1.0  # how often the head checks that its stages renew their leases (Pipeline._watch_leases)
STAGE_HEALTH_S = 2.0  # ... and how long one whose lease is gone has to answer /health
_ALIGN = 16


class PipelineError(Exception):
    """A stage is missing, does not match the head, or failed a step."""


# -- frames ---------------------------------------------------------------------------------------

def encode(header: dict, meta: object = None, tensor: torch.Tensor | None = None) -> tuple[bytes, np.ndarray | None]:
    """One frame: `header` (JSON) and a payload of `meta` (JSON, padded) followed by `tensor`'s bytes."""
    parts = []
    if meta is not None:
        raw = json.dumps(meta, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % _ALIGN)
        header = {**header, "meta": len(raw)}
        parts.append(np.frombuffer(raw, dtype=np.uint8))
    if tensor is not None:
        tensor = tensor.detach().contiguous().cpu()
        header = {**header, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        words = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        parts.append(words.numpy().reshape(-1).view(np.uint8))
    payload = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else None)
    return json.dumps(header, separators=(",", ":")).encode(), payload


def decode(raw_header: bytes, payload: np.ndarray) -> tuple[dict, object, torch.Tensor | None]:
    """(header, meta, tensor) of a frame `encode` made; the tensor shares the payload's memory."""
    header = json.loads(raw_header)
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise PipelineError(f"not a pipeline frame: {raw_header[:100]!r}")
    m = header.get("meta", 0)
    meta = json.loads(payload[:m].tobytes()) if m else None
    tensor = None
    if "shape" in header:
        words = payload[m:].view(numpy_dtype(header["dtype"]))  # the wire's dtypes: bf16 travels as int16 words
        tensor = torch.from_numpy(words).view(getattr(torch, header["dtype"])).reshape(header["shape"])
    return header, meta, tensor


def segments_meta(segments: list[Segment], block_size: int) -> list:
    """What a later stage needs of a step's segments: start, new tokens, the block table up to the end."""
    return [[s.start, len(s.tokens), list(s.blocks[: -(-s.end // block_size)])] for s in segments]


def segments_of(meta: list) -> list[Segment]:
    return [Segment([0] * n, start, blocks) for start, n, blocks in meta]


# -- the head's side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageInfo:
    stage: int
    address: str
    layers: range
    service_id: str = ""  # its registration (the head's own: "")
    url: str = ""         # its HTTP API (/health)


class Pipeline:
    """The head's links to its stages: `forward` a step's hidden states through them for logits,
    `send_kv` a later stage's part of a prompt's KV. A broken link fails every step in flight and
    every later one (the head's decode loop then ends the process)."""

    def __init__(self, transport: Transport, runner: ModelRunner, stages: list[StageInfo], on_broken: Callable[[], None]):
        self.transport, self.runner, self.stages = transport, runner, stages
        self.on_broken = on_broken
        self.registry: Registry | None = None  # where the stages' leases are (watch_leases)
        self.session = secrets.token_hex(8)
        self.first: Connection | None = None    # to stage 1
        self.results: Connection | None = None  # from the last stage (the same link when there are 2)
        self.pending: dict[int, asyncio.Future] = {}
        self.reports: dict[int, tuple[asyncio.Future, list[dict]]] = {}  # "replicate" step -> reports so far
        self.next_step = 0
        self.broken: Exception | None = None
        self.reader: asyncio.Task | None = None
        self.watcher: asyncio.Task | None = None
        self.lease_watcher: asyncio.Task | None = None
        self.closing = False

    async def open(self, setup: dict) -> None:
        """Connect, set the pipeline up, and wait until the last stage says it is ready. A stage
        that refuses the setup says why: the last on the results link, the others up the chain."""
        last = self.stages[-1]
        self.results = await self.transport.connect(last.address)
        await self.results.send(*encode({"op": "results", "session": self.session}))
        self.first = await self.transport.connect(self.stages[1].address)
        stages = [[s.address, s.layers.start, s.layers.stop] for s in self.stages]
        await self.first.send(*encode({**setup, "op": "setup", "session": self.session, "links": stages}))
        upstream = asyncio.create_task(self.first.recv())  # read until the link ends: it is also the watch on stage 1
        ready = asyncio.create_task(self.results.recv())
        done, _ = await asyncio.wait([upstream, ready], timeout=SETUP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            upstream.cancel()
            if upstream in done and upstream.exception() is None:
                raw, payload = upstream.result()
                raise PipelineError(f"pipeline setup refused: {decode(raw, payload)[0].get('message')}")
            raise PipelineError("pipeline setup failed: " + (f"stage 1's link ended ({upstream.exception()})"
                                                            if upstream in done else f"no answer in {SETUP_TIMEOUT_S:.0f} s"))
        header, _, _ = decode(*ready.result())
        if header["op"] != "ready":
            upstream.cancel()
            raise PipelineError(f"pipeline setup refused: {header.get('message', header)}")
        self.reader = asyncio.create_task(self._read())
        self.watcher = asyncio.create_task(self._watch_first(upstream))

    def watch_leases(self, registry: Registry) -> None:
        """From now on, end the pipeline when a stage hangs (_watch_leases); the registry's
        connection is the pipeline's, closed with it."""
        self.registry = registry
        self.lease_watcher = asyncio.create_task(self._watch_leases())

    async def _read(self) -> None:
        try:
            while True:
                raw, payload = await self.results.recv()
                header, _, tensor = decode(raw, payload)
                if header["op"] in ("replicated", "fetched"):
                    self._report(header)
                    continue
                future = self.pending.pop(header.get("step"), None)
                if future is None or future.done():
                    continue
                if header["op"] == "result":
                    future.set_result(tensor)
                else:
                    future.set_exception(PipelineError(header.get("message", f"a {header['op']!r} frame")))
        except (TransportError, PipelineError, ValueError) as exc:
            self._break(TransportError(f"the pipeline's results link broke: {exc}"))
        except asyncio.CancelledError:
            self._break(TransportError("the pipeline was closed"))
            raise

    def _report(self, header: dict) -> None:
        future, reports = self.reports.get(header.get("step"), (None, []))
        if future is None:
            return  # its waiter gave up
        reports.append(header)
        if len(reports) == len(self.stages) - 1:
            del self.reports[header["step"]]
            if not future.done():
                future.set_result(reports)

    async def _watch_first(self, recv: asyncio.Task) -> None:
        """Stage 1 sends nothing back on its link once set up: when it ends, a stage failed (or was
        replaced). `recv` is the read open() started."""
        with contextlib.suppress(TransportError):
            await recv
        self._break(TransportError("the link to stage 1 ended"))

    async def _watch_leases(self) -> None:
        """A stage that hangs (SIGSTOPped, or its host gone without a reset) keeps its links open: a
        step would wait STEP_TIMEOUT_S for it, a minute of every client's time (a prefill's too, with
        another pipeline idle). Every STAGE_CHECK_S: a stage whose lease is gone from the registry
        and that does not answer /health ends the pipeline, about a lease TTL after it stopped. A
        lease gone from a Redis that restarted empty is no death (the stage answers), and Redis
        unreachable says nothing of the stages."""
        while True:
            await asyncio.sleep(STAGE_CHECK_S)
            try:
                listed = {s.id for s in await self.registry.services(ServiceKind.STAGE)}
                for s in self.stages[1:]:
                    if s.service_id and s.service_id not in listed and not await answers_health(s.url, STAGE_HEALTH_S):
                        self._break(TransportError(f"stage {s.stage} ({s.service_id}) stopped renewing its lease and "
                                                   "does not answer /health: hung or dead"))
                        return
            except Unavailable:  # Redis unreachable: nothing to tell
                continue
            except Exception:  # noqa: BLE001 - the watch goes on; a hung stage is still caught at STEP_TIMEOUT_S
                log.exception("checking the pipeline's stages' leases failed; going on")

    def _break(self, exc: Exception) -> None:
        if self.broken is None:
            self.broken = exc
            if not self.closing:
                log.error("pipeline broken: %s", exc)
                self.on_broken()
        for future in [*self.pending.values(), *(f for f, _ in self.reports.values())]:
            if not future.done():
                future.set_exception(exc)
        self.pending.clear()
        self.reports.clear()

    async def forward(self, segments: list[Segment], hidden: torch.Tensor) -> torch.Tensor:
        """The stages after the head, on the head's output for these segments -> float32 logits."""
        return await self._request({"op": "step"}, segments_meta(segments, self.runner.block_size), hidden)

    async def replicate(self, request_id: str, epoch: int, gen: int, blocks: list[int], tokens: range,
                        store: ServiceInfo, num_layers: int) -> list[dict]:
        """Each stage after the head sends its layers' K/V of `tokens` of the sequence with block
        table `blocks` to `store`, and records them in Redis: one report per stage ({"stage",
        "error"?, "fenced"?}), in no order. Asked for in order with the steps: a token's KV is there
        once the step that computed it has come back. The caller bounds the wait."""
        return await self._ask({"op": "replicate", "request": request_id, "epoch": epoch, "gen": gen,
                                "tokens": [tokens.start, tokens.stop], "store": store.kv_address,
                                "store_id": store.id, "num_layers": num_layers}, blocks, tokens.stop)

    async def fetch(self, request_id: str, epoch: int, blocks: list[int], tokens: int, store_address: str,
                    store_id: str = "", store_url: str = "") -> None:
        """A restore: each stage after the head fetches its own layers of tokens [0, tokens) of the
        request's replica from the cache store at `store_address` into the blocks `blocks`, as the
        head does its own, and drops it once that store (`store_id`, `store_url`) is gone
        (common/kv/fetch.py, while_store_leased). Raises PipelineError naming the stages that could
        not. A stage silent past its fetch's own bound ends the pipeline: its write could still land
        in the blocks after they went to another request."""
        reports = await self._ask({"op": "fetch", "request": request_id, "epoch": epoch, "tokens": tokens,
                                   "store": store_address, "store_id": store_id, "store_url": store_url},
                                  blocks, tokens, timeout=FETCH_TIMEOUT_S + STAGE_MARGIN_S)
        if failed := [r for r in reports if r.get("error")]:
            raise PipelineError("; ".join(f"stage {r.get('stage')}: {r['error']}" for r in sorted(
                failed, key=lambda r: r.get("stage", 0))))

    async def _ask(self, header: dict, blocks: list[int], tokens: int, timeout: float | None = None) -> list[dict]:
        """A frame down the chain (in order with the steps) that every stage after the head answers
        with a report: the reports, in no order."""
        if self.broken is not None:
            raise self.broken
        step, self.next_step = self.next_step, self.next_step + 1
        future = asyncio.get_running_loop().create_future()
        self.reports[step] = (future, [])
        try:
            await self.first.send(*encode({**header, "step": step},
                                          list(blocks[: -(-tokens // self.runner.block_size)])))
        except TransportError as exc:
            self._break(exc)
        try:
            return await (future if timeout is None else asyncio.wait_for(asyncio.shield(future), timeout))
        except asyncio.TimeoutError:
            self.reports.pop(step, None)
            future.cancel()  # as _request's: _break would set an exception no one retrieves
            self._break(TransportError(f"{header['op']} {step}: not every stage reported in {timeout:.0f} s"))
            raise self.broken from None
        finally:
            self.reports.pop(step, None)

    async def _request(self, header: dict, meta: list, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """One frame down the chain, and the tensor the last stage answers it with."""
        if self.broken is not None:
            raise self.broken
        step, self.next_step = self.next_step, self.next_step + 1
        future = self.pending[step] = asyncio.get_running_loop().create_future()
        try:
            await self.first.send(*encode({**header, "step": step}, meta, tensor))
        except TransportError as exc:
            self._break(exc)
        try:
            return await asyncio.wait_for(asyncio.shield(future), STEP_TIMEOUT_S)
        except asyncio.TimeoutError:  # a stage hangs (stopped, or its host gone without a reset)
            self.pending.pop(step, None)
            future.cancel()
            self._break(TransportError(f"step {step} not back from the stages in {STEP_TIMEOUT_S:.0f} s"))
            raise self.broken from None

    @property
    def kv_routes(self) -> list[tuple[str, int, int]]:
        """Where each of the stages after the head takes its layers' prompt KV."""
        return [(s.address, s.layers.start, s.layers.stop) for s in self.stages[1:]]

    async def reserve(self, request_id: str, blocks: list[int], prompt_len: int) -> None:
        """Tell the stages a prompt's KV may come to them straight: its blocks (all of the prompt's)."""
        await self._post({"op": "reserve", "request": request_id, "prompt": prompt_len}, list(blocks))

    async def release(self, request_id: str) -> None:
        await self._post({"op": "release", "request": request_id})

    async def landed(self, request_id: str) -> list[int]:
        """Per layer after the head's, the prompt tokens [0, n) of `request_id` that reached its stage."""
        return (await self._request({"op": "landed", "request": request_id}, None)).tolist()

    async def _post(self, header: dict, meta: object = None) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            await self.first.send(*encode(header, meta))
        except TransportError as exc:
            self._break(exc)
            raise

    async def send_kv(self, blocks: list[int], layers: range, tokens: range, kv: torch.Tensor) -> None:
        """KV (len(layers), 2, len(tokens), kv_heads, head_dim) of layers past the head's, to the
        stages that hold them."""
        if self.broken is not None:
            raise self.broken
        meta = list(blocks[: -(-tokens.stop // self.runner.block_size)])
        for s in self.stages[1:]:
            lo, hi = max(layers.start, s.layers.start), min(layers.stop, s.layers.stop)
            if lo >= hi:
                continue
            part = kv[lo - layers.start: hi - layers.start]
            frame = encode({"op": "kv", "stage": s.stage, "layers": [lo, hi], "tokens": [tokens.start, tokens.stop]},
                           meta, part)
            try:
                await self.first.send(*frame)
            except TransportError as exc:
                self._break(exc)
                raise

    async def close(self) -> None:
        self.closing = True
        for task in (self.reader, self.watcher, self.lease_watcher):
            if task:
                task.cancel()
        if self.registry is not None:
            await self.registry.redis.aclose()
        for conn in (self.first, self.results):
            if conn is not None:
                await conn.close()
