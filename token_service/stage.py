"""A pipeline's stage worker (1..S-1, token_service/pipeline.py says how a pipeline works): it
computes its layers for whatever its upstream link sends and passes the result on (the last
stage: the logits back to the head), holds the KV of its layers, and takes a prompt's KV straight
from a prompt service for the requests the head announced. prompt_service/pipeline.py extends it
for prompt pipelines.

Frames are read as they come and applied in order by one worker task per link; with --swap a
step's KV starts moving in when its frame is read (engine/swap.py). A "replicate" frame's KV is
copied in its turn and sent to the cache store in the background (see token_service/pipeline.py);
a "fetch" frame's layers are read from the store in the background too, into the blocks it names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram

from redis.exceptions import RedisError

from common.kv.copy import gather, scatter
from common.kv.fetch import ACK_TIMEOUT_S, FetchError, fetch_replica, fetch_while_leased
from common.kv.peers import KVRejected, Peers
from common.kv.receiver import kv_server
from common.kv.transport import Connection, Transport, TransportError
from common.kv.wire import FENCED, Header, as_tensor
from common.metadata import Registry, RequestStore
from engine.attention import slots_of
from engine.runner import ModelRunner
from token_service.pipeline import SETUP_TIMEOUT_S, PipelineError, decode, encode, segments_of
from token_service.room import new_pool

log = logging.getLogger(__name__)

STAGE_STEPS = Counter("dejavu_stage_steps", "forward steps this pipeline stage computed")
STAGE_STEP_SECONDS = Histogram("dejavu_stage_step_seconds", "one forward of this stage's layers",
                               buckets=(.005, .01, .025, .05, .1, .2, .4, .8, 1.6))
STAGE_LINKED = Gauge("dejavu_stage_linked", "1 while this stage is part of a set-up pipeline (a head linked to it)")
STAGE_REQUESTS = Gauge("dejavu_stage_requests", "requests whose prompt KV this stage accepts (reserved, not released)")
STAGE_KV_BYTES = Counter("dejavu_stage_kv_bytes", "KV written to this stage's pool, by the way it came: a prompt's straight "
                         "from a prompt service, or sent on by the head; a replica's fetched from a cache store", ["via"])
for _via in ("direct", "head", "store"):
    STAGE_KV_BYTES.labels(_via)
STAGE_REPLICATED_BYTES = Counter("dejavu_stage_replicated_bytes", "KV bytes of this stage's layers acknowledged by "
                                 "cache stores")
STAGE_REPLICATE_FAILURES = Counter("dejavu_stage_replicate_failures", "replication sends of this stage that failed "
                                   "(the head starts the replica over)")
KV_WAIT_S = 10.0  # a prompt's KV may outrun the head's "reserve" frame down the chain: it waits this long
RELEASED = 4096  # released request ids a stage remembers, to refuse their late KV at once


@dataclass
class Frame:
    """A frame read from upstream, waiting for its turn; `staged`: its step's KV swapping in (--swap)."""

    header: dict
    meta: object
    tensor: torch.Tensor | None
    raw: bytes
    payload: np.ndarray
    staged: Future | None = None
    lags: bool = False  # read while an earlier frame held prefetches back: see Stage._read_frame


@dataclass
class Prompt:
    """A request whose prompt KV this stage accepts: its prompt's blocks, and per layer of this
    stage the tokens [0, n) that are in."""

    blocks: list[int]
    length: int
    received: list[int]


class KVRefused(Exception):
    """A KV message for this stage that it will not write (answered with an error frame)."""


class Prepended:
    """A connection whose first frame was already read (to tell a KV link from a pipeline link)."""

    def __init__(self, conn: Connection, first: tuple[bytes, np.ndarray]):
        self.conn, self.first = conn, first

    async def recv(self, alloc=None):
        if self.first is not None:
            first, self.first = self.first, None
            return first
        return await self.conn.recv(alloc)

    def __getattr__(self, name):
        return getattr(self.conn, name)


@dataclass
class Link:
    """One setup of a stage: the head's session, the link from the stage before and the one to the
    stage after (none on the last). A newer setup replaces it whole; the old one's frames, if any
    are still being computed, go nowhere. Frames are read as they come and applied in order, one
    at a time, by `worker`."""

    session: str
    upstream: Connection
    downstream: Connection | None = None
    watcher: asyncio.Task | None = None
    worker: asyncio.Task | None = None
    frames: asyncio.Queue = field(default_factory=asyncio.Queue)
    lagging: int = 0  # queued frames that a prefetch must not overtake
    prompts: dict[str, Prompt] = field(default_factory=dict)  # requests whose prompt KV may come straight here
    announced: asyncio.Event = field(default_factory=asyncio.Event)  # set (and cleared) at each "reserve"
    released: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # the last RELEASED ids


class Stage:
    """A stage worker: computes its layers for whatever its upstream link sends, and passes the
    result downstream (or, the last stage, the logits back to the head)."""

    def __init__(self, runner: ModelRunner, num_blocks: int, stage: int, stages: int, model_id: str,
                 transport: Transport, device_blocks: int = 0, peers: Peers | None = None):
        self.runner, self.stage, self.stages, self.model_id, self.transport = runner, stage, stages, model_id, transport
        self.peers = peers or Peers(transport)  # to cache stores: this stage's layers of each replica
        self.requests: RequestStore | None = None  # Redis, once registered: each replica's index for our layers
        self.registry: Registry | None = None  # this cluster's, once registered: a store's lease (a restore's fetch)
        self.background: set[asyncio.Task] = set()
        self.num_blocks = num_blocks
        # --swap: the pool in host memory, each step computed over the device's KV (engine/swap.py)
        if device_blocks:  # imported here: a prompt pipeline's stages never swap, nor list dejavu_swap_* series
            from engine.swap import SwapPool

            self.swap = SwapPool(runner, num_blocks, device_blocks)
        else:
            self.swap = None
        self.pool = self.swap.host if self.swap else new_pool(runner, num_blocks)
        self.link: Link | None = None               # the current setup
        self.results: dict[str, Connection] = {}    # session -> the head's results link (the last stage)
        self.results_ready: dict[str, asyncio.Event] = {}
        self.steps = 0
        self._kv_server = kv_server(self.receive_kv, (KVRefused,),  # nothing over one layer range of a whole sequence
                                    max_payload=runner.pool_bytes_per_token * runner.block_size * num_blocks)

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.peers.close()
        if self.swap is not None:
            self.swap.close()

    @property
    def linked(self) -> bool:
        return self.link is not None

    async def handle(self, conn: Connection) -> None:
        """The transport handler of every link this stage accepts: from the stage before it, (the
        last stage) the head's results link, or a prompt service's KV link."""
        raw, payload = await conn.recv()
        try:
            first = json.loads(raw)
            kv_link = isinstance(first, dict) and "kind" in first  # a KV message (common/kv/wire.py), not a pipeline frame
        except (ValueError, RecursionError):
            kv_link = False
        if kv_link:
            return await self._kv_server(Prepended(conn, (raw, payload)))
        header, _, _ = decode(raw, payload)
        if header["op"] == "results" and isinstance(header.get("session"), str):
            await self._results_link(conn, header["session"])
        elif header["op"] == "setup" and isinstance(header.get("session"), str):
            await self._upstream_link(conn, header)
        else:
            log.warning("a link that opened with a %r frame, not setup or results: closed", header["op"])

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
            error = {"op": "error", "step": -1, "message": str(exc)}
            if self.last:
                await self._answer(setup["session"], error, wait=True)
            else:  # the head reads its link to stage 1 during the setup; a stage between relays it
                await conn.send(*encode(error))
            return
        await self._unlink("a new setup (session %s) replaces it" % setup["session"])
        link = self.link = Link(setup["session"], conn)
        STAGE_LINKED.set(1)
        try:
            if not self.last:
                link.downstream = await self.transport.connect(setup["links"][self.stage + 1][0])
                await link.downstream.send(*encode(setup))
                link.watcher = asyncio.create_task(self._watch(link))
            else:
                await self._answer(link.session, {"op": "ready", "stage": self.stage}, wait=True)
            log.info("pipeline %s set up: stage %d of %d, layers [%d, %d)", setup["pipeline"], self.stage,
                     self.stages, self.runner.layers.start, self.runner.layers.stop)
            link.worker = asyncio.create_task(self._work(link))
            while self.link is link:
                raw, payload = await conn.recv()
                if self.link is link:  # not replaced while it waited: a prefetch would go nowhere
                    self._read_frame(link, raw, payload)
        except TransportError as exc:
            log.info("pipeline link ended: %s", exc)
        finally:
            if self.link is link:
                await self._unlink("its upstream link ended")

    def _read_frame(self, link: Link, raw: bytes, payload: np.ndarray) -> None:
        """Queue a frame for the worker. With --swap a step's KV starts moving in as soon as its frame
        is here, while the step before it computes, unless a frame queued before it must be applied
        first (KV for this stage: the step may read it) or was itself held back: prefetches start
        in the order the steps compute, which the swap pool needs (engine/swap.py)."""
        header, meta, tensor = decode(raw, payload)
        frame = Frame(header, meta, tensor, raw, payload)
        op = header["op"]
        if self.swap is not None and (op == "step" or op == "kv" and header.get("stage") == self.stage):
            if op == "step" and link.lagging == 0:
                frame.staged = self.swap.prefetch(segments_of(meta))
            else:
                frame.lags, link.lagging = True, link.lagging + 1
        link.frames.put_nowait(frame)

    async def _work(self, link: Link) -> None:
        """Apply the link's frames in order. One that cannot be applied (malformed, or KV that does
        not fit) ends the link, and with it the pipeline, rather than compute on KV that is not there."""
        try:
            while True:
                frame = await link.frames.get()
                if frame.lags and frame.header["op"] == "step":
                    frame.staged = self.swap.prefetch(segments_of(frame.meta))
                    link.lagging -= 1
                await self._frame(link, frame)
                if frame.lags and frame.header["op"] == "kv":
                    link.lagging -= 1
        except Exception as exc:  # noqa: BLE001 - whatever it was, this link's frames can no longer be trusted
            if self.link is link:
                log.error("pipeline frame not applied: %s: %s", type(exc).__name__, exc)
                await self._unlink("a frame could not be applied")

    async def _unlink(self, why: str) -> None:
        """Drop the current setup: its links close, down the chain (and up: see _watch)."""
        link, self.link = self.link, None
        STAGE_LINKED.set(0)
        if link is None:
            return
        log.info("pipeline session %s ended here: %s", link.session, why)
        for task in (link.watcher, link.worker):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        link.prompts.clear()  # a new head reserves anew
        STAGE_REQUESTS.set(0)
        while not link.frames.empty():  # steps that will not compute: their device room back
            staged = link.frames.get_nowait().staged
            if staged is not None:
                self.swap.discard(staged)
        for conn in (link.upstream, link.downstream):
            if conn is not None:
                await conn.close()

    async def _watch(self, link: Link) -> None:
        """Nothing comes back on a downstream link but a refused setup: when it ends, the stages
        after this one are gone, and this stage's links close too, up to the head."""
        try:
            raw, payload = await link.downstream.recv()
            await link.upstream.send(raw, payload)  # a later stage refused the setup: the head reads why
        except TransportError:
            pass
        if self.link is link:
            log.warning("the link to stage %d ended: closing the pipeline", self.stage + 1)
            await self._unlink("the next stage's link ended")

    def _check_setup(self, setup: dict) -> None:
        layers = self.runner.layers
        want = dict(model_id=self.model_id, dtype=self.runner.dtype_name, block_size=self.runner.block_size,
                    num_blocks=self.num_blocks, stages=self.stages,
                    device_blocks=self.swap.device_blocks if self.swap else 0)  # --swap: each step must fit everywhere
        got = {k: setup.get(k) for k in want}
        if got != want:
            raise PipelineError(f"stage {self.stage}: the head's {got} is not this stage's {want}")
        links = setup.get("links")
        if not (isinstance(links, list) and len(links) == self.stages and isinstance(links[self.stage], list)
                and all(isinstance(x, list) and x and isinstance(x[0], str) for x in links)):
            raise PipelineError(f"stage {self.stage}: a setup without the {self.stages} stages' links")
        if links[self.stage][1:] != [layers.start, layers.stop]:
            raise PipelineError(f"stage {self.stage}: the head expects layers {links[self.stage][1:]}, "
                                f"this stage holds [{layers.start}, {layers.stop})")

    async def _frame(self, link: Link, frame: Frame) -> None:
        """One frame from upstream, its turn come. Raises for one that cannot be applied."""
        header, meta, tensor, raw, payload = frame.header, frame.meta, frame.tensor, frame.raw, frame.payload
        op = header["op"]
        if op == "step":
            await self._step(link, header, meta, tensor, frame.staged)
        elif op == "replicate":
            t0, t1 = header["tokens"]
            mine = gather(self.pool, slots_of(meta, self.runner.block_size, t0, t1))  # now: a later step may reuse the blocks
            if not self.last:
                await link.downstream.send(raw, payload)
            self._spawn(self._replicate(link, header, mine))
        elif op == "fetch":
            if not self.last:
                await link.downstream.send(raw, payload)
            self._spawn(self._fetch(link, header, list(meta)))
        elif op == "kv" and header["stage"] == self.stage:
            (start, stop), (t0, t1) = header["layers"], header["tokens"]
            if not (self.runner.layers.start <= start < stop <= self.runner.layers.stop):
                raise PipelineError(f"KV of layers [{start}, {stop}) on stage {self.stage}")
            local = slice(start - self.runner.layers.start, stop - self.runner.layers.start)
            scatter(self.pool, slots_of(meta, self.runner.block_size, t0, t1), local, tensor)
            STAGE_KV_BYTES.labels("head").inc(tensor.nbytes)
        elif op == "landed":  # this stage's counts added to the ones before: the last stage answers
            mine = link.prompts.get(header["request"])
            counts = torch.tensor(mine.received if mine else [0] * len(self.runner.layers), dtype=torch.int64)
            counts = counts if tensor is None else torch.cat([tensor, counts])
            if self.last:
                await self._answer(link.session, {"op": "result", "step": header["step"]}, counts)
            else:
                await link.downstream.send(*encode({"op": "landed", "step": header["step"], "request": header["request"]},
                                                   None, counts))
        elif op in ("reserve", "release"):
            # in turn, not when read: "kv" frames queued ahead of it may be for the blocks' last owner
            # (a restore of a request since released), and must land before the new prompt's KV
            rid = header["request"]
            if op == "reserve":
                link.prompts[rid] = Prompt(list(meta), int(header["prompt"]), [0] * len(self.runner.layers))
                link.released.pop(rid, None)
                link.announced.set()
                link.announced.clear()
            elif link.prompts.pop(rid, None) is not None:
                link.released[rid] = None
                if len(link.released) > RELEASED:
                    link.released.popitem(last=False)
            STAGE_REQUESTS.set(len(link.prompts))
            if not self.last:
                await link.downstream.send(raw, payload)
        elif op in ("kv", "error", "replicated", "fetched") and not self.last:
            await link.downstream.send(raw, payload)  # for a stage after this one, or the head: as it came
        elif op in ("error", "replicated", "fetched"):
            await self._answer(link.session, header)
        else:
            log.warning("unexpected %r frame on the upstream link: skipped", op)

    async def _replicate(self, link: Link, header: dict, kv: torch.Tensor) -> None:
        """This stage's layers of a "replicate" frame's tokens to its cache store, recorded in Redis
        once the store has them; then the report, down the chain to the head."""
        rid, epoch, (t0, t1), layers = header["request"], header["epoch"], header["tokens"], self.runner.layers
        report = {"op": "replicated", "step": header["step"], "stage": self.stage}
        try:
            if self.requests is None:
                raise RuntimeError("not connected to Redis yet")
            peer = await self.peers.get(header["store"])
            ack = await peer.send(kv, request_id=rid, epoch=epoch, layer_start=layers.start, layer_end=layers.stop,
                                  token_start=t0, token_end=t1)
            await asyncio.wait_for(ack, ACK_TIMEOUT_S)
            STAGE_REPLICATED_BYTES.inc(kv.nbytes)
            try:
                if await self.requests.advance_replicated(rid, epoch, t1, header["store_id"], layers,
                                                          header["num_layers"], header["gen"]) < 0:
                    report["fenced"] = True
            except RedisError as exc:  # the store has them: not a reason to start the replica over
                log.warning("the store has tokens [0, %d) of %s, layers [%d, %d), but Redis could not be told: %s",
                            t1, rid, layers.start, layers.stop, exc)
        except KVRejected as exc:
            report["error"], report["fenced"] = str(exc), str(exc).startswith(FENCED)
        except Exception as exc:  # noqa: BLE001 - the head starts the replica over
            report["error"] = f"{type(exc).__name__}: {exc}"
        if report.get("error") and not report.get("fenced"):
            STAGE_REPLICATE_FAILURES.inc()
            log.warning("request %s: tokens [%d, %d) of layers [%d, %d) not replicated: %s", rid, t0, t1,
                        layers.start, layers.stop, report["error"])
        await self._report(link, report)

    async def _fetch(self, link: Link, header: dict, blocks: list[int]) -> None:
        """A restore: this stage's layers of tokens [0, n) of a replica, from the cache store into
        the blocks of the "fetch" frame (the head holds them for the request until every stage has
        reported); then the report, down the chain to the head."""
        rid, n, layers, kv_shape = header["request"], header["tokens"], self.runner.layers, self.runner.kv
        report = {"op": "fetched", "step": header["step"], "stage": self.stage}
        try:
            kv = await fetch_while_leased(fetch_replica(self.transport, header["store"], rid, header["epoch"], n,
                                                        layers=layers),
                                          self.registry, header.get("store_id", ""), header.get("store_url", ""))
            if kv.dtype != self.pool.dtype:
                raise FetchError(f"the replica is {kv.dtype}, this stage runs {self.pool.dtype}")
            if tuple(kv.shape) != (len(layers), 2, n, kv_shape.kv_heads, kv_shape.head_dim):
                raise FetchError(f"the replica's layers [{layers.start}, {layers.stop}) have shape {tuple(kv.shape)}, "
                                 f"not ({len(layers)}, 2, {n}, kv_heads, head_dim) of this stage's model")
            if self.link is link:  # else set up again meanwhile: the blocks are nobody's here now
                scatter(self.pool, slots_of(blocks, self.runner.block_size, 0, n), slice(0, len(layers)), kv)
                STAGE_KV_BYTES.labels("store").inc(kv.nbytes)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the head hears of it now (not at its timeout)
            report["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("request %s: layers [%d, %d) of its replica not fetched: %s", rid, layers.start, layers.stop,
                        report["error"])
        await self._report(link, report)

    async def _report(self, link: Link, report: dict) -> None:
        """A report of this stage's down the chain to the head (the last stage: on the results link)."""
        if self.link is not link:
            return  # the pipeline was set up again: nobody waits for it
        with contextlib.suppress(TransportError):  # a link that ends ends the pipeline: the head hears of that
            if self.last:
                await self._answer(link.session, report)
            else:
                await link.downstream.send(*encode(report))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def receive_kv(self, header: Header, payload: np.ndarray) -> None:
        """A KV message from a prompt service: layers of this stage, tokens of a prompt the head
        reserved here, in order per layer (a retried prefill may start again from 0)."""
        link, rid = self.link, header.request_id
        deadline = time.monotonic() + KV_WAIT_S
        while link is not None and rid not in link.prompts and rid not in link.released and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):  # the head's "reserve" may still be on its way
                await asyncio.wait_for(link.announced.wait(), deadline - time.monotonic())
        prompt = link.prompts.get(rid) if link is not None and link is self.link else None
        if prompt is None:
            raise KVRefused(f"stage {self.stage}: no KV room reserved here for request {rid}")
        layers, kv = self.runner.layers, self.runner.kv
        start, stop, t0, t1 = header.layer_start, header.layer_end, header.token_start, header.token_end
        want = (stop - start, 2, t1 - t0, kv.kv_heads, kv.head_dim)
        if not (layers.start <= start < stop <= layers.stop) or tuple(payload.shape) != want or t1 > prompt.length:
            raise KVRefused(f"stage {self.stage} (layers [{layers.start}, {layers.stop})): a KV message of shape "
                            f"{tuple(payload.shape)} for layers [{start}, {stop}) tokens [{t0}, {t1}) does not fit "
                            f"request {rid}'s {prompt.length}-token prompt")
        if header.dtype != self.runner.dtype_name:
            raise KVRefused(f"KV dtype {header.dtype} does not match this stage's {self.runner.dtype_name} "
                            "(run every service with the same --dtype)")
        local = range(start - layers.start, stop - layers.start)
        if any(prompt.received[i] < t0 for i in local):
            raise KVRefused(f"request {rid}: tokens [{t0}, {t1}) of layers [{start}, {stop}) would leave a gap")
        scatter(self.pool, slots_of(prompt.blocks, self.runner.block_size, t0, t1), slice(local.start, local.stop),
                as_tensor(header, payload))
        for i in local:
            prompt.received[i] = max(prompt.received[i], t1)
        STAGE_KV_BYTES.labels("direct").inc(payload.nbytes)

    async def _step(self, link: Link, header: dict, meta: list, hidden: torch.Tensor, staged: Future | None) -> None:
        step, start = header["step"], time.perf_counter()
        try:
            if staged is not None:
                out = await self.runner.run(self.swap.forward, self.runner, staged, hidden)
            else:
                out = await self.runner.run(self.runner.forward, segments_of(meta), self.pool, None, hidden)
        except Exception as exc:  # noqa: BLE001 - a step this stage cannot compute fails that step only
            log.exception("step %d failed", step)
            error = {"op": "error", "step": step, "message": f"stage {self.stage}: {type(exc).__name__}: {exc}"}
            await (self._answer(link.session, error) if self.last else link.downstream.send(*encode(error)))
            return
        finally:
            if staged is not None:
                self.swap.discard(staged)  # a no-op once its forward ran
        self.steps += 1
        STAGE_STEPS.inc()
        STAGE_STEP_SECONDS.observe(time.perf_counter() - start)
        if self.link is not link:
            return  # replaced while it computed: the new head's chain does not want it
        if self.last:
            await self._answer(link.session, {"op": "result", "step": step}, out)
        else:
            await link.downstream.send(*encode({"op": "step", "step": step}, meta, out))

    async def _answer(self, session: str, header: dict, tensor: torch.Tensor | None = None, wait: bool = False) -> None:
        """A frame to the head, on its results link; during the setup the link may open after it,
        and is waited for a while. Without one (the head is gone) the frame is dropped."""
        if wait and session not in self.results:
            ready = self.results_ready.setdefault(session, asyncio.Event())
            try:
                await asyncio.wait_for(ready.wait(), SETUP_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
            finally:
                if session not in self.results:
                    self.results_ready.pop(session, None)
        conn = self.results.get(session)
        if conn is None:
            log.warning("no results link from the head of session %s: %s frame dropped", session, header["op"])
            return
        await conn.send(*encode(header, None, tensor))
