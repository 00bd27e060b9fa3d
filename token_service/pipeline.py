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

Every stage registers in Redis (kind "stage": its pipeline id, index, layer range, transport
address); the head registers as a token service only once it has found its stages there and set
the pipeline up. Activations move stage to stage over the KV transport (UCX or TCP), never through
Redis or HTTP.

A stage holds no request state: the head allocates every block (all pools have the same number
of blocks, so one block table serves every stage) and sends each step's block tables with it.
Prompt KV that a prompt service (or a replica) brings for a later stage's layers comes to the head,
which sends it on down the chain in a "kv" frame; frames on a link arrive in order, so a
sequence's KV is in place before its first step reaches the stage.

Failure: a link that breaks ends the pipeline. A stage whose downstream link breaks closes its
upstream one; the head then fails (its decode loop dies, the process exits and its lease lapses),
its streams resume on another token service as after any token-service death, and the head,
restarted, sets the pipeline up again with whatever stages are registered. A stage that loses its
upstream link waits for the next setup.

Frames (transport frames: a JSON header, one payload):
  head -> 1 -> ... -> S-1   {"op": "setup", "session", "pipeline", "links": [[address, start, stop], ...], ...}
                            {"op": "kv", "stage", "layers", "tokens", "dtype", "shape", "meta"}: payload = meta + KV slab
                            {"op": "step", "step", "dtype", "shape", "meta"}: payload = meta + hidden states
  head -> S-1               {"op": "results", "session"}: the link the last stage answers on
  S-1 -> head               {"op": "ready"} | {"op": "logits", "step", "shape"} | {"op": "error", "step", "message"}
`meta` is the byte length of a JSON prefix of the payload (block tables, segments), padded to 16.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram

from common.kv.transport import Connection, Transport, TransportError
from engine.attention import Segment, slots_of
from engine.runner import ModelRunner

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 30.0
STAGE_STEPS = Counter("dejavu_stage_steps", "forward steps this pipeline stage computed")
STAGE_STEP_SECONDS = Histogram("dejavu_stage_step_seconds", "one forward of this stage's layers",
                               buckets=(.005, .01, .025, .05, .1, .2, .4, .8, 1.6))
STAGE_LINKED = Gauge("dejavu_stage_linked", "1 while this stage is part of a set-up pipeline (a head linked to it)")
_ALIGN = 16


class PipelineError(Exception):
    """A stage is missing, does not match the head, or failed a step."""


# -- frames ---------------------------------------------------------------------------------------

def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


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
        dtype = getattr(torch, header["dtype"])
        words = payload[m:].view(_np_dtype(dtype))
        tensor = torch.from_numpy(words).view(dtype).reshape(header["shape"])
    return header, meta, tensor


def segments_meta(segments: list[Segment], block_size: int) -> list:
    """What a later stage needs of a step's segments: start, new tokens, the block table up to the end."""
    return [[s.start, len(s.tokens), list(s.blocks[: -(-s.end // block_size)])] for s in segments]


def segments_of(meta: list) -> list[Segment]:
    return [Segment([0] * n, start, blocks) for start, n, blocks in meta]


# -- a stage (1..S-1) -----------------------------------------------------------------------------

class Stage:
    """A stage worker: computes its layers for whatever its upstream link sends, and passes the
    result downstream (or, the last stage, the logits back to the head)."""

    def __init__(self, runner: ModelRunner, num_blocks: int, stage: int, stages: int, model_id: str,
                 transport: Transport):
        self.runner, self.stage, self.stages, self.model_id, self.transport = runner, stage, stages, model_id, transport
        self.num_blocks = num_blocks
        self.pool = runner.new_pool(num_blocks)
        self.session = ""           # the head's, from its latest setup
        self.upstream: Connection | None = None
        self.downstream: Connection | None = None  # the next stage's link (not the last stage)
        self.results: dict[str, Connection] = {}    # session -> the head's results link (the last stage)
        self.results_ready: dict[str, asyncio.Event] = {}
        self.steps = 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    async def handle(self, conn: Connection) -> None:
        """The transport handler of every link this stage accepts: from the stage before it, or
        (the last stage) the head's results link."""
        raw, payload = await conn.recv()
        header, meta, _ = decode(raw, payload)
        if header["op"] == "results":
            await self._results_link(conn, header["session"])
        elif header["op"] == "setup":
            await self._upstream_link(conn, header)
        else:
            log.warning("a link that opened with %r, not setup or results: closed", header["op"])

    async def _results_link(self, conn: Connection, session: str) -> None:
        self.results[session] = conn
        self.results_ready.setdefault(session, asyncio.Event()).set()
        try:
            await conn.recv()  # the head sends nothing more on it: this returns when the link ends
        except TransportError:
            pass
        finally:
            if self.results.get(session) is conn:
                del self.results[session]
                self.results_ready.pop(session, None)

    async def _upstream_link(self, conn: Connection, setup: dict) -> None:
        try:
            self._check_setup(setup)
        except PipelineError as exc:
            log.error("pipeline setup refused: %s", exc)
            await self._answer(setup["session"], {"op": "error", "step": -1, "message": str(exc)})
            return
        if self.upstream is not None:  # a new head (restarted) replaces the old one's chain
            log.info("a new setup (session %s) replaces session %s", setup["session"], self.session)
            await self.upstream.close()
        if self.downstream is not None:
            await self.downstream.close()
            self.downstream = None
        self.upstream, self.session = conn, setup["session"]
        STAGE_LINKED.set(1)
        if not self.last:
            address = setup["links"][self.stage + 1][0]
            self.downstream = await self.transport.connect(address)
            await self.downstream.send(*encode(setup))
            asyncio.create_task(self._watch(self.downstream, conn))
        else:
            await self._answer(self.session, {"op": "ready", "stage": self.stage})
        log.info("pipeline %s set up: stage %d of %d, layers [%d, %d)", setup["pipeline"], self.stage, self.stages,
                 self.runner.layers.start, self.runner.layers.stop)
        try:
            while True:
                raw, payload = await conn.recv()
                await self._frame(raw, payload)
        except TransportError as exc:
            log.info("upstream link ended: %s", exc)
        finally:
            if self.upstream is conn:  # not replaced meanwhile: tell the stages after this one
                self.upstream = None
                STAGE_LINKED.set(0)
                if self.downstream is not None:
                    await self.downstream.close()
                    self.downstream = None

    async def _watch(self, downstream: Connection, upstream: Connection) -> None:
        """Nothing comes back on a downstream link: when it ends, the stages after this one are gone
        (or this one replaced it), and the link from upstream closes too, up to the head."""
        with contextlib.suppress(TransportError):
            await downstream.recv()
        if self.downstream is downstream:
            log.warning("the link to stage %d ended: closing the pipeline", self.stage + 1)
            await upstream.close()

    def _check_setup(self, setup: dict) -> None:
        layers = self.runner.layers
        want = dict(model_id=self.model_id, dtype=self.runner.dtype_name, block_size=self.runner.block_size,
                    num_blocks=self.num_blocks, stages=self.stages)
        got = {k: setup.get(k) for k in want}
        if got != want:
            raise PipelineError(f"stage {self.stage}: the head's {got} is not this stage's {want}")
        links = setup.get("links")
        if not (isinstance(links, list) and len(links) == self.stages and isinstance(links[self.stage], list)):
            raise PipelineError(f"stage {self.stage}: a setup without the {self.stages} stages' links")
        if links[self.stage][1:] != [layers.start, layers.stop]:
            raise PipelineError(f"stage {self.stage}: the head expects layers {links[self.stage][1:]}, "
                                f"this stage holds [{layers.start}, {layers.stop})")

    async def _frame(self, raw: bytes, payload: np.ndarray) -> None:
        header, meta, tensor = decode(raw, payload)
        op = header["op"]
        if op == "step":
            await self._step(header, meta, tensor)
        elif op == "kv" and header["stage"] == self.stage:
            (start, stop), (t0, t1) = header["layers"], header["tokens"]
            local = slice(start - self.runner.layers.start, stop - self.runner.layers.start)
            self.pool[local, :, slots_of(meta, self.runner.block_size, t0, t1)] = tensor
        elif op in ("kv", "error") and not self.last:
            await self.downstream.send(raw, payload)  # for a stage after this one, or the head: as it came
        elif op == "error":
            await self._answer(self.session, header)
        else:
            log.warning("unexpected %r frame on the upstream link: skipped", op)

    async def _step(self, header: dict, meta: list, hidden: torch.Tensor) -> None:
        step, start = header["step"], time.perf_counter()
        try:
            out = await self.runner.run(self.runner.forward, segments_of(meta), self.pool, None, hidden)
        except Exception as exc:  # noqa: BLE001 - a step this stage cannot compute fails that step only
            log.exception("step %d failed", step)
            error = {"op": "error", "step": step, "message": f"stage {self.stage}: {type(exc).__name__}: {exc}"}
            await (self._answer(self.session, error) if self.last else self.downstream.send(*encode(error)))
            return
        self.steps += 1
        STAGE_STEPS.inc()
        STAGE_STEP_SECONDS.observe(time.perf_counter() - start)
        if self.last:
            await self._answer(self.session, {"op": "logits", "step": step}, out)
        else:
            await self.downstream.send(*encode({"op": "step", "step": step}, meta, out))

    async def _answer(self, session: str, header: dict, tensor: torch.Tensor | None = None) -> None:
        """A frame to the head, on its results link (waited for a while: it may open after the setup)."""
        ready = self.results_ready.setdefault(session, asyncio.Event())
        try:
            await asyncio.wait_for(ready.wait(), SETUP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("no results link from the head of session %s: %s frame dropped", session, header["op"])
            return
        await self.results[session].send(*encode(header, None, tensor))


# -- the head's side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageInfo:
    stage: int
    address: str
    layers: range


class Pipeline:
    """The head's links to its stages: `forward` a step's hidden states through them for logits,
    `send_kv` a later stage's part of a prompt's KV. A broken link fails every step in flight and
    every later one (the head's decode loop then ends the process)."""

    def __init__(self, transport: Transport, runner: ModelRunner, stages: list[StageInfo], on_broken: Callable[[], None]):
        self.transport, self.runner, self.stages = transport, runner, stages
        self.on_broken = on_broken
        self.session = secrets.token_hex(8)
        self.first: Connection | None = None    # to stage 1
        self.results: Connection | None = None  # from the last stage (the same link when there are 2)
        self.pending: dict[int, asyncio.Future] = {}
        self.next_step = 0
        self.broken: Exception | None = None
        self.reader: asyncio.Task | None = None
        self.watcher: asyncio.Task | None = None
        self.closing = False

    def stage_of(self, layer: int) -> int:
        return next(s.stage for s in self.stages if layer in s.layers)

    async def open(self, setup: dict) -> None:
        """Connect, set the pipeline up, and wait until the last stage says it is ready."""
        last = self.stages[-1]
        self.results = await self.transport.connect(last.address)
        await self.results.send(*encode({"op": "results", "session": self.session}))
        self.first = await self.transport.connect(self.stages[1].address)
        stages = [[s.address, s.layers.start, s.layers.stop] for s in self.stages]
        await self.first.send(*encode({**setup, "op": "setup", "session": self.session, "links": stages}))
        raw, payload = await asyncio.wait_for(self.results.recv(), SETUP_TIMEOUT_S)
        header, _, _ = decode(raw, payload)
        if header["op"] != "ready":
            raise PipelineError(f"pipeline setup failed: {header.get('message', header)}")
        self.reader = asyncio.create_task(self._read())
        self.watcher = asyncio.create_task(self._watch_first())

    async def _read(self) -> None:
        try:
            while True:
                raw, payload = await self.results.recv()
                header, _, tensor = decode(raw, payload)
                future = self.pending.pop(header.get("step"), None)
                if future is None or future.done():
                    continue
                if header["op"] == "logits":
                    future.set_result(tensor)
                else:
                    future.set_exception(PipelineError(header.get("message", f"a {header['op']!r} frame")))
        except (TransportError, PipelineError, ValueError) as exc:
            self._break(TransportError(f"the pipeline's results link broke: {exc}"))
        except asyncio.CancelledError:
            self._break(TransportError("the pipeline was closed"))
            raise

    async def _watch_first(self) -> None:
        """Stage 1 sends nothing back on its link: when it ends, a stage failed (or was replaced)."""
        with contextlib.suppress(TransportError):
            await self.first.recv()
        self._break(TransportError("the link to stage 1 ended"))

    def _break(self, exc: Exception) -> None:
        if self.broken is None:
            self.broken = exc
            if not self.closing:
                log.error("pipeline broken: %s", exc)
                self.on_broken()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
        self.pending.clear()

    async def forward(self, segments: list[Segment], hidden: torch.Tensor) -> torch.Tensor:
        """The stages after the head, on the head's output for these segments -> float32 logits."""
        if self.broken is not None:
            raise self.broken
        step, self.next_step = self.next_step, self.next_step + 1
        future = self.pending[step] = asyncio.get_running_loop().create_future()
        try:
            await self.first.send(*encode({"op": "step", "step": step},
                                          segments_meta(segments, self.runner.block_size), hidden))
        except TransportError as exc:
            self._break(exc)
        return await future

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
        for task in (self.reader, self.watcher):
            if task:
                task.cancel()
        for conn in (self.first, self.results):
            if conn is not None:
                await conn.close()
