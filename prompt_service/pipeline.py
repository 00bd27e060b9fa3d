"""A prompt service as a pipeline of stages (`--stages S`), for a model whose prefill does not fit
one device: S processes, each with a contiguous range of the layers (token_service/pipeline.py
links them, the same way as a token pipeline's).

    gateway ──HTTP──> stage 0, the head: the prompt service the gateway sees (its API, batching,
                      sampling of the first token), layers [0, a) with the embedding
                        │ "prefill" frames: the forward's pieces + the residual stream after layer a
                        v
                      stage 1 .. S-1 (python -m prompt_service --stages S --stage K --pipeline ID)
                        │ the last one's logits of each piece's last token, back to the head
                        └──────> head

Every stage streams the KV of its own layers, layer group by layer group as they are computed,
straight to the token service's process that holds those layers (a token pipeline's stage, or
the one token service): DéjàVu's stream_out / stream_in, which regroup layers between pipelines
of different depths. A stage sends its output on only once the token side has acknowledged its
KV, so logits back at the head mean every layer of every piece has landed.

A chunked prompt's earlier chunks are attended to from a pool of its own on every stage (its
layers), dropped after its last chunk, a "drop" frame from the head (the request ended early), or
the link's end. A stage that fails a step answers an error for the whole step: the head fails the
step's requests (the gateway retries them). A stage that dies ends the pipeline: the head exits,
and its requests fail over as on any prompt service's death.

Frames, besides token_service/pipeline.py's setup/results/ready/result/error:
  head -> 1 -> ... -> S-1   {"op": "prefill", "step", "dtype", "shape", "meta"}: payload = meta
                            (a piece each: [request, epoch, start, end, prompt length, routes])
                            + the hidden states
                            {"op": "drop", "request"}
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from common.kv.peers import Peers
from common.kv.transport import TransportError
from common.settings import PromptSettings
from engine.attention import Segment
from prompt_service.engine import (Sink, _forget, layer_sink, layers_per_message, message_groups, open_links,
                                   send_messages)
from token_service.pipeline import Pipeline, encode
from token_service.stage import STAGE_STEP_SECONDS, STAGE_STEPS, Frame, Link, Stage

log = logging.getLogger(__name__)


class PromptPipeline(Pipeline):
    """The prompt head's links to its stages."""

    async def prefill(self, pieces: list, hidden: torch.Tensor) -> torch.Tensor:
        """The stages after the head on its output: their layers computed and streamed -> logits."""
        return await self._request({"op": "prefill"}, pieces, hidden)

    def drop(self, request_id: str) -> None:
        """A chunked prompt that ends early: its pools on the stages go."""
        if self.broken is None:
            task = asyncio.ensure_future(self._post({"op": "drop", "request": request_id}))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


class PromptStage(Stage):
    """A prompt pipeline's stage worker: computes its layers of each prefill, streams their KV."""

    def __init__(self, runner, stage: int, stages: int, model_id: str, transport, settings: PromptSettings):
        super().__init__(runner, 0, stage, stages, model_id, transport)
        self.settings = settings
        self.peers = Peers(transport, fault_rate=settings.inject_kv_faults)
        self.pools: dict[str, torch.Tensor] = {}  # a chunked prompt's KV so far, this stage's layers

    async def close(self) -> None:
        await self.peers.close()
        await super().close()

    @property
    def layers_per_message(self) -> int:
        return layers_per_message(self.settings, self.runner.kv.layers)

    async def _frame(self, link: Link, frame: Frame) -> None:
        op = frame.header["op"]
        if op == "prefill":
            await self._prefill(link, frame.header["step"], frame.meta, frame.tensor)
        elif op == "drop":
            self.pools.pop(frame.header["request"], None)
            if not self.last:
                await link.downstream.send(frame.raw, frame.payload)
        else:
            await super()._frame(link, frame)

    async def _unlink(self, why: str) -> None:
        self.pools.clear()
        await super()._unlink(why)

    async def _prefill(self, link: Link, step: int, pieces: list, hidden: torch.Tensor) -> None:
        start_time, loop, mine = time.perf_counter(), asyncio.get_running_loop(), self.runner.layers
        sinks, senders, acks, at, ended = [], [], [], 0, []
        rid, _, first, last, total, _ = pieces[0]
        chunk = len(pieces) == 1 and (first > 0 or last < total)  # a prompt's chunk: alone in its forward
        try:
            table = pool = None
            if chunk:  # blocks 0, 1, ... of the prompt's own pool
                table = list(range(-(-total // self.runner.block_size)))
                if rid not in self.pools:
                    self.pools[rid] = self.runner.new_pool(len(table))
                pool = self.pools[rid]
            segments = []
            for request_id, epoch, start, end, _, routes in pieces:
                routes = [tuple(r) for r in routes]
                links = await open_links(self.peers, routes, mine, "of request " + request_id)
                outbox: asyncio.Queue = asyncio.Queue()
                sinks.append(Sink(slice(at, at + end - start), range(start, end),
                                  message_groups(routes, self.layers_per_message, mine), outbox))
                senders.append(asyncio.create_task(send_messages(outbox, links, request_id, epoch,
                                                                 lambda: bool(ended), acks)))
                segments.append(Segment([0] * (end - start), start, table))
                at += end - start
            out = await self.runner.run(self.runner.forward, segments, pool, layer_sink(loop, sinks), hidden)
            for sink in sinks:
                sink.outbox.put_nowait(None)
            await asyncio.gather(*senders)
            await asyncio.wait_for(asyncio.gather(*acks), self.settings.ack_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a step this stage cannot compute or stream fails that step only
            log.warning("prefill step %d failed: %s: %s", step, type(exc).__name__, exc)
            ended.append(True)
            if chunk:
                self.pools.pop(rid, None)  # the head fails the request
            for sink in sinks:
                sink.outbox.put_nowait(None)
            for sender in senders:
                sender.cancel()
            _forget(acks)
            error = {"op": "error", "step": step, "message": f"prompt stage {self.stage}: {type(exc).__name__}: {exc}"}
            try:
                await (self._answer(link.session, error) if self.last else link.downstream.send(*encode(error)))
            except TransportError:
                pass
            return
        if chunk and last == total:
            self.pools.pop(rid, None)
        self.steps += 1
        STAGE_STEPS.inc()
        STAGE_STEP_SECONDS.observe(time.perf_counter() - start_time)
        if self.link is not link:
            return
        if self.last:
            await self._answer(link.session, {"op": "result", "step": step}, out)
        else:
            await link.downstream.send(*encode({"op": "prefill", "step": step}, pieces, out))
